//! Replace a small file so that a crash leaves the old or the new content,
//! never a mix: write a temporary file beside it, fsync it, rename it over the
//! old one, fsync the directory. Who may read the new file is the caller's
//! choice ([`Access`]).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Who may read a file [`write()`] replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The owner only (0600), whatever the umask: state, keys, anything a
    /// receiver keeps.
    Private,
    /// As the umask allows (0666 minus the umask), like a file `create`d:
    /// status that operators' tools read.
    Umask,
}

impl Access {
    fn mode(self) -> u32 {
        match self {
            Self::Private => 0o600,
            Self::Umask => 0o666,
        }
    }
}

/// The temporary name `write` uses for `name` (hidden, beside it).
pub fn temp_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!(".{name}.tmp"))
}

/// Atomically replace `dir/name` with `data`, durably. On error the path that
/// failed is returned with the cause.
pub fn write(
    dir: &Path,
    name: &str,
    data: &[u8],
    access: Access,
) -> Result<(), (PathBuf, io::Error)> {
    let path = dir.join(name);
    let tmp = temp_path(dir, name);
    // A temporary left by a crash may have other permissions: start afresh.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err((tmp, e)),
        _ => {}
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(access.mode())
        .open(&tmp)
        .map_err(|e| (tmp.clone(), e))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .map_err(|e| (tmp.clone(), e))?;
    drop(f);
    std::fs::rename(&tmp, &path).map_err(|e| (path, e))?;
    sync_dir(dir).map_err(|e| (dir.to_owned(), e))
}

/// fsync a directory, making the entries created or renamed in it durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "f", b"one", Access::Umask).unwrap();
        write(dir.path(), "f", b"two", Access::Private).unwrap();
        assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), b"two");
        assert!(!temp_path(dir.path(), "f").exists());
        let mode = std::fs::metadata(dir.path().join("f"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_missing_directory_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("gone");
        let (path, e) = write(&gone, "f", b"x", Access::Private).unwrap_err();
        assert_eq!(path, temp_path(&gone, "f"));
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
