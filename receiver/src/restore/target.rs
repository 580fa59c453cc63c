//! Where a restore writes, opened so that nobody else's file is touched.
//!
//! - A new file is written to a temporary beside the target, created with
//!   `O_CREAT|O_EXCL|O_NOFOLLOW` at mode 0600 under a random name (a planted
//!   symbolic link is never followed), then put in place with
//!   `renameat2(RENAME_NOREPLACE)` (or a hard link where the filesystem lacks
//!   it): a file that appeared at the target meanwhile is refused, not
//!   clobbered. With `--force` the temporary is renamed over the target.
//! - A block device is opened with `O_EXCL`: Linux refuses that with `EBUSY`
//!   while the device is mounted or otherwise claimed, so a restore never
//!   writes under a live filesystem, `--force` or not.
//! - A symbolic link at the target is resolved (with `--force`) only when it
//!   leads to a block device (`/dev/disk/by-id/…`, `/dev/mapper/…`); a link to
//!   anything else is refused, so a planted link cannot redirect the
//!   restore onto a file of the link's choosing.
//! - Any other existing target (directory, character device, FIFO) is refused.

use std::fs::{File, Metadata};
use std::io::{ErrorKind, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};

use crate::store::sync_dir;
use crate::ReceiveError;

/// Mode of a restored file (the umask can only take bits away).
pub(super) const FILE_MODE: u32 = 0o600;

/// An open restore target.
pub(super) struct Target {
    /// Where the blocks are written.
    pub(super) file: File,
    /// The partial file, put in place at the end; `None` for a device.
    tmp: Option<PathBuf>,
    /// The path written to (for errors).
    pub(super) path: PathBuf,
    /// The path asked for.
    to: PathBuf,
    /// Whether the target is a block device (written in place).
    pub(super) is_device: bool,
    /// Whether an existing file may be replaced.
    force: bool,
}

impl Target {
    /// Open `to` for a volume `volume` of `size` bytes. An existing target
    /// needs `force`; a device must be large enough and not in use.
    pub(super) fn open(
        to: &Path,
        force: bool,
        volume: &str,
        size: u64,
    ) -> Result<Self, ReceiveError> {
        let existing = match std::fs::symlink_metadata(to) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == ErrorKind::NotFound => None,
            Err(e) => return Err(ReceiveError::storage(to, e)),
        };
        let Some(meta) = existing else {
            return Self::new_file(to, force, size);
        };
        if !force {
            return Err(ReceiveError::Refused(format!(
                "{} already exists; pass --force to overwrite it",
                to.display()
            )));
        }
        let kind = meta.file_type();
        if kind.is_symlink() {
            let real = resolve_device_link(to)?;
            return Self::device(to, &real, volume, size);
        }
        if kind.is_block_device() {
            return Self::device(to, to, volume, size);
        }
        if kind.is_file() {
            return Self::new_file(to, force, size);
        }
        Err(ReceiveError::Refused(format!(
            "{} is neither a regular file nor a block device; not restoring onto it",
            to.display()
        )))
    }

    /// A temporary beside `to`, private and new, of `size` bytes.
    fn new_file(to: &Path, force: bool, size: u64) -> Result<Self, ReceiveError> {
        let name = to
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| {
                ReceiveError::Refused(format!("{} does not name a file", to.display()))
            })?;
        let tmp = to.with_file_name(format!(
            ".{name}.pilotlight-partial-{:016x}",
            rand::random::<u64>()
        ));
        let file = File::options()
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(|e| ReceiveError::storage(&tmp, e))?;
        if let Err(e) = file.set_len(size) {
            let _ = std::fs::remove_file(&tmp);
            return Err(ReceiveError::storage(&tmp, e));
        }
        Ok(Self {
            file,
            tmp: Some(tmp.clone()),
            path: tmp,
            to: to.to_owned(),
            is_device: false,
            force,
        })
    }

    /// The block device `real` (asked for as `to`), opened exclusively.
    fn device(to: &Path, real: &Path, volume: &str, size: u64) -> Result<Self, ReceiveError> {
        let mut file = File::options()
            .write(true)
            .custom_flags(libc::O_EXCL | libc::O_NOFOLLOW)
            .open(real)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EBUSY) => ReceiveError::Refused(format!(
                    "{} is in use (mounted?); unmount it before restoring onto it",
                    to.display()
                )),
                _ => ReceiveError::storage(real, e),
            })?;
        // The path may have changed since it was looked at.
        let meta: Metadata = file
            .metadata()
            .map_err(|e| ReceiveError::storage(real, e))?;
        if !meta.file_type().is_block_device() {
            return Err(ReceiveError::Refused(format!(
                "{} changed while it was being opened; not restoring onto it",
                to.display()
            )));
        }
        let dev_size = file
            .seek(SeekFrom::End(0))
            .map_err(|e| ReceiveError::storage(real, e))?;
        if dev_size < size {
            return Err(ReceiveError::Refused(format!(
                "{} holds {dev_size} bytes but volume {volume} is {size} bytes",
                to.display()
            )));
        }
        Ok(Self {
            file,
            tmp: None,
            path: real.to_owned(),
            to: to.to_owned(),
            is_device: true,
            force: true,
        })
    }

    /// Make the written data durable and, for a file, put it in place:
    /// over the target with `force`, else only where nothing is.
    pub(super) fn finish(&self) -> Result<(), ReceiveError> {
        self.file
            .sync_all()
            .map_err(|e| ReceiveError::storage(&self.path, e))?;
        let Some(tmp) = &self.tmp else {
            return Ok(());
        };
        let placed = if self.force {
            std::fs::rename(tmp, &self.to).map_err(|e| ReceiveError::storage(&self.to, e))
        } else {
            place_new(tmp, &self.to)
        };
        if let Err(e) = placed {
            self.abandon();
            return Err(e);
        }
        if let Some(parent) = self.to.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
        Ok(())
    }

    /// Remove the partial file after a failure.
    pub(super) fn abandon(&self) {
        if let Some(t) = &self.tmp {
            let _ = std::fs::remove_file(t);
        }
    }
}

/// The block device a symbolic link at `to` leads to; a link to anything
/// else is refused.
fn resolve_device_link(to: &Path) -> Result<PathBuf, ReceiveError> {
    let real = std::fs::canonicalize(to).map_err(|e| {
        ReceiveError::Refused(format!(
            "{} is a symbolic link that does not resolve ({e}); not restoring through it",
            to.display()
        ))
    })?;
    let is_device = std::fs::metadata(&real).is_ok_and(|m| m.file_type().is_block_device());
    if !is_device {
        return Err(ReceiveError::Refused(format!(
            "{} is a symbolic link to {}, which is not a block device; restore to a path that is not a link",
            to.display(),
            real.display()
        )));
    }
    Ok(real)
}

/// Move `tmp` to `to` only if nothing is at `to`: `renameat2` with
/// `RENAME_NOREPLACE`, or where the filesystem lacks it, a hard link (which
/// never replaces either) and removing `tmp`.
fn place_new(tmp: &Path, to: &Path) -> Result<(), ReceiveError> {
    let appeared = || {
        ReceiveError::Refused(format!(
            "{} appeared while the restore ran; pass --force to overwrite it",
            to.display()
        ))
    };
    match renameat2(AT_FDCWD, tmp, AT_FDCWD, to, RenameFlags::RENAME_NOREPLACE) {
        Ok(()) => Ok(()),
        Err(Errno::EEXIST) => Err(appeared()),
        Err(Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP) => {
            match std::fs::hard_link(tmp, to) {
                Ok(()) => std::fs::remove_file(tmp).map_err(|e| ReceiveError::storage(tmp, e)),
                Err(e) if e.kind() == ErrorKind::AlreadyExists => Err(appeared()),
                Err(e) => Err(ReceiveError::storage(to, e)),
            }
        }
        Err(errno) => Err(ReceiveError::storage(to, std::io::Error::from(errno))),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_file_that_appears_during_the_restore_is_not_clobbered() {
        let dir = tempfile::tempdir().unwrap();
        let to = dir.path().join("out.img");
        let target = Target::open(&to, false, "v", 4096).unwrap();
        std::fs::write(&to, b"theirs").unwrap();
        let err = target.finish().unwrap_err();
        assert!(matches!(err, ReceiveError::Refused(_)), "{err}");
        assert!(
            err.to_string().contains("appeared while the restore ran"),
            "{err}"
        );
        assert_eq!(std::fs::read(&to).unwrap(), b"theirs");
        // The partial file is gone.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn with_force_the_restore_replaces_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let to = dir.path().join("out.img");
        std::fs::write(&to, b"old").unwrap();
        let target = Target::open(&to, true, "v", 4096).unwrap();
        target.finish().unwrap();
        assert_eq!(std::fs::metadata(&to).unwrap().len(), 4096);
        assert_eq!(mode(&to), FILE_MODE);
    }

    #[test]
    fn a_new_file_is_private_and_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let to = dir.path().join("out.img");
        let target = Target::open(&to, false, "v", 8192).unwrap();
        assert_eq!(mode(&target.path), FILE_MODE);
        target.finish().unwrap();
        assert_eq!(std::fs::metadata(&to).unwrap().len(), 8192);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_symlink_at_the_target_is_refused_and_its_target_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let to = dir.path().join("out.img");
        std::os::unix::fs::symlink(&victim, &to).unwrap();
        for force in [false, true] {
            let err = Target::open(&to, force, "v", 4096).err().unwrap();
            assert!(matches!(err, ReceiveError::Refused(_)), "{err}");
        }
        let err = Target::open(&to, true, "v", 4096).err().unwrap();
        assert!(err.to_string().contains("not a block device"), "{err}");
        // A dangling link is refused too.
        let dangling = dir.path().join("dangling");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
        let err = Target::open(&dangling, true, "v", 4096).err().unwrap();
        assert!(err.to_string().contains("does not resolve"), "{err}");
        assert!(!dir.path().join("nowhere").exists());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    }

    #[test]
    fn other_kinds_of_file_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = Target::open(dir.path(), true, "v", 4096).err().unwrap();
        assert!(err.to_string().contains("neither a regular file"), "{err}");
        let err = Target::open(Path::new("/dev/null"), true, "v", 4096)
            .err()
            .unwrap();
        assert!(err.to_string().contains("neither a regular file"), "{err}");
    }
}
