//! Where a network restore writes: an image file (created 0600 if missing,
//! extended or cut to the volume's size) or a block device (written in
//! place with O_DIRECT, as the agent reads devices, and opened with
//! `O_EXCL` so that Linux refuses it while it is mounted). Both are
//! written in place: what already matches stays, so an interrupted restore
//! run again fetches only what still differs.

use std::fs::File;
use std::io::{ErrorKind, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::scan::{AlignedBuf, DIRECT_ALIGN};
use crate::status::{State, Status};
use crate::volume::VolumeSpec;
use crate::AgentError;

/// Mode of a target file the restore creates.
const FILE_MODE: u32 = 0o600;

/// An open restore target.
pub(crate) struct Target {
    /// The path asked for.
    pub(crate) path: PathBuf,
    /// Read and written; O_DIRECT on a device.
    file: File,
    /// A file read with O_DIRECT (the compare reads the whole target once:
    /// through the page cache, copying it costs more CPU than hashing it),
    /// when its filesystem allows.
    direct: Option<File>,
    /// A buffered handle on a device, for a last block whose length is not
    /// a multiple of the sector (O_DIRECT cannot write it).
    tail: Option<File>,
    /// Whether it is a block device.
    pub(crate) is_device: bool,
    /// Its size in bytes.
    pub(crate) size: u64,
}

impl Target {
    /// Open `path`. Without `force`, a device that is mounted (or otherwise
    /// claimed) is refused.
    pub(crate) fn open(path: &Path, force: bool) -> Result<Self, AgentError> {
        let err = |e| target_err(path, e);
        let meta = match std::fs::metadata(path) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == ErrorKind::NotFound => None,
            Err(e) => return Err(err(e)),
        };
        let is_device = meta
            .as_ref()
            .is_some_and(|m| m.file_type().is_block_device());
        if let Some(m) = &meta {
            if !is_device && !m.is_file() {
                return Err(AgentError::Config(format!(
                    "{} is neither a file nor a block device",
                    path.display()
                )));
            }
        }
        let mut opts = File::options();
        opts.read(true).write(true);
        if is_device {
            let excl = if force { 0 } else { libc::O_EXCL };
            opts.custom_flags(libc::O_DIRECT | excl);
        } else if meta.is_none() {
            opts.create_new(true).mode(FILE_MODE);
        }
        let mut file = match opts.open(path) {
            Err(e) if is_device && e.raw_os_error() == Some(libc::EBUSY) => {
                return Err(AgentError::Config(format!(
                    "{} is mounted or in use (the kernel refused to open it exclusively); \
                     unmount it first, or pass --force",
                    path.display()
                )))
            }
            r => r.map_err(err)?,
        };
        let size = file.seek(SeekFrom::End(0)).map_err(err)?;
        let tail = if is_device {
            Some(File::options().write(true).open(path).map_err(err)?)
        } else {
            None
        };
        let direct = if is_device {
            None
        } else {
            File::options()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(path)
                .ok()
        };
        Ok(Self {
            path: path.to_owned(),
            file,
            direct,
            tail,
            is_device,
            size,
        })
    }

    /// Make the target hold exactly a volume of `size` bytes: a file is
    /// extended (the new part reads as zeros) or cut; a device smaller than
    /// the volume is refused.
    pub(crate) fn fit(&mut self, size: u64) -> Result<(), AgentError> {
        if self.is_device {
            if self.size < size {
                return Err(AgentError::Config(format!(
                    "{} holds {} bytes, less than the volume's {size}",
                    self.path.display(),
                    self.size
                )));
            }
            return Ok(());
        }
        if self.size != size {
            self.file
                .set_len(size)
                .map_err(|e| target_err(&self.path, e))?;
            self.size = size;
        }
        Ok(())
    }

    /// Read `len` bytes at `offset` into `buf` (aligned for O_DIRECT).
    /// Blocking.
    pub(crate) fn read<'a>(
        &self,
        buf: &'a mut AlignedBuf,
        offset: u64,
        len: usize,
    ) -> Result<&'a [u8], AgentError> {
        // O_DIRECT reads whole sectors; the bytes past `len` are dropped.
        let want = len.next_multiple_of(DIRECT_ALIGN);
        let dst = buf
            .get_mut(want)
            .ok_or_else(|| AgentError::Internal("read past its buffer".into()))?;
        let mut done = 0;
        let mut direct = self.direct.as_ref();
        while done < len {
            let at = dst.get_mut(done..).unwrap_or_default();
            match direct
                .unwrap_or(&self.file)
                .read_at(at, offset + done as u64)
            {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // A filesystem that opens O_DIRECT but refuses the read:
                // through the page cache, then.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) && direct.is_some() => {
                    direct = None;
                }
                Err(e) => return Err(target_err(&self.path, e)),
            }
        }
        // Past the end of a file reads as zeros (it was extended to fit).
        dst.get_mut(done..len).unwrap_or_default().fill(0);
        Ok(dst.get(..len).unwrap_or_default())
    }

    /// Write one block at `offset`; `buf` is scratch for O_DIRECT. Blocking.
    pub(crate) fn write(
        &self,
        data: &[u8],
        offset: u64,
        buf: &mut AlignedBuf,
    ) -> Result<(), AgentError> {
        let r = match &self.tail {
            None => self.file.write_all_at(data, offset),
            Some(tail) if !data.len().is_multiple_of(DIRECT_ALIGN) => {
                tail.write_all_at(data, offset)
            }
            Some(_) => {
                let dst = buf
                    .get_mut(data.len())
                    .filter(|d| d.len() == data.len())
                    .ok_or_else(|| AgentError::Internal("block larger than its buffer".into()))?;
                dst.copy_from_slice(data);
                self.file.write_all_at(dst, offset)
            }
        };
        r.map_err(|e| target_err(&self.path, e))
    }

    /// Make `len` bytes at `offset` zeros: a hole in a file (as a restore
    /// to a new file leaves them), zeros written on a device (or where the
    /// filesystem cannot punch holes). `buf` is scratch. Blocking.
    pub(crate) fn zero(
        &self,
        offset: u64,
        len: usize,
        buf: &mut AlignedBuf,
    ) -> Result<(), AgentError> {
        use nix::fcntl::{fallocate, FallocateFlags};
        if self.tail.is_none() {
            let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
            if let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) {
                if fallocate(&self.file, flags, off, l).is_ok() {
                    return Ok(());
                }
            }
        }
        let zeros = vec![0u8; len];
        self.write(&zeros, offset, buf)
    }

    /// Make every write durable. Blocking.
    pub(crate) fn sync(&self) -> Result<(), AgentError> {
        if let Some(tail) = &self.tail {
            tail.sync_all().map_err(|e| target_err(&self.path, e))?;
        }
        self.file.sync_all().map_err(|e| target_err(&self.path, e))
    }
}

/// The error for an I/O failure on the target.
pub(crate) fn target_err(path: &Path, source: std::io::Error) -> AgentError {
    AgentError::Target {
        path: path.to_owned(),
        source,
    }
}

/// Refuse `path` when it is one of the volumes the agent replicates (from
/// its configuration) and the agent's status in `state_dir` says it is
/// running: a restore under a running agent would be replicated half done.
pub(crate) fn check_not_replicated(
    path: &Path,
    volumes: &[VolumeSpec],
    state_dir: Option<&Path>,
) -> Result<(), AgentError> {
    let Ok(target) = std::fs::metadata(path) else {
        return Ok(());
    };
    let Some(vol) = volumes
        .iter()
        .find(|v| std::fs::metadata(&v.path).is_ok_and(|m| same_file(&m, &target)))
    else {
        return Ok(());
    };
    let state = state_dir
        .and_then(|d| Status::load(d).ok())
        .map(|s| s.state);
    match state {
        Some(State::Stopped) => Ok(()),
        Some(s) => Err(AgentError::Config(format!(
            "{} is volume {} that the agent replicates, and the agent is running \
             (status: {}); stop it first, or pass --force",
            path.display(),
            vol.name,
            s.as_str()
        ))),
        None => Err(AgentError::Config(format!(
            "{} is volume {} that the agent replicates, and whether the agent runs is \
             unknown (no status in its state directory); stop it first, or pass --force",
            path.display(),
            vol.name
        ))),
    }
}

/// Whether two paths are the same file or the same block device.
fn same_file(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    let dev = |m: &std::fs::Metadata| m.file_type().is_block_device();
    if dev(a) && dev(b) {
        a.rdev() == b.rdev()
    } else {
        a.dev() == b.dev() && a.ino() == b.ino()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // test code
mod tests {
    use super::*;

    #[test]
    fn a_file_is_created_private_and_fitted_to_the_volume() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.img");
        let mut t = Target::open(&path, false).unwrap();
        assert_eq!(t.size, 0);
        t.fit(10_000).unwrap();
        let m = std::fs::metadata(&path).unwrap();
        assert_eq!((m.len(), m.mode() & 0o777), (10_000, 0o600));
        let mut buf = AlignedBuf::new(8192);
        t.write(&[7u8; 4096], 4096, &mut buf).unwrap();
        let got = t.read(&mut buf, 4096, 5000).unwrap().to_vec();
        assert_eq!(&got[..4096], &[7u8; 4096][..]);
        assert!(got[4096..].iter().all(|&b| b == 0));
        t.zero(4096, 4096, &mut buf).unwrap();
        assert!(t
            .read(&mut buf, 4096, 4096)
            .unwrap()
            .iter()
            .all(|&b| b == 0));
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            10_000,
            "a hole keeps the size"
        );
        t.fit(4096).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4096);
    }

    #[test]
    fn a_replicated_volume_is_refused_while_the_agent_runs() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("root.img");
        std::fs::write(&img, b"x").unwrap();
        let vols = vec![VolumeSpec {
            name: "root".into(),
            path: img.clone(),
        }];
        let other = dir.path().join("other.img");
        std::fs::write(&other, b"y").unwrap();
        assert!(check_not_replicated(&other, &vols, None).is_ok());
        let no_status = check_not_replicated(&img, &vols, Some(dir.path()));
        assert!(matches!(no_status, Err(AgentError::Config(m)) if m.contains("volume root")));
        let mut st = Status {
            state: State::Continuous,
            ..Status::default()
        };
        st.save(dir.path()).unwrap();
        let running = check_not_replicated(&img, &vols, Some(dir.path()));
        assert!(matches!(running, Err(AgentError::Config(m)) if m.contains("continuous")));
        st.state = State::Stopped;
        st.save(dir.path()).unwrap();
        assert!(check_not_replicated(&img, &vols, Some(dir.path())).is_ok());
    }
}
