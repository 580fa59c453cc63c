//! Making a point consistent: reflink clones (FICLONE) of image files, or a
//! frozen filesystem (FIFREEZE/FITHAW). Anything else is labelled `fuzzy`.
//!
//! The freeze itself, its watchdog and guard are in [`crate::freeze`]. This
//! module has one `unsafe` call: FICLONE on two file descriptors we own.
#![allow(unsafe_code)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use pilotlight_protocol::frame::Consistency;

use crate::freeze::{Freezer, Frozen, Thawed};
use crate::AgentError;

mod ioctl {
    #![allow(missing_docs, unreachable_pub)]
    nix::ioctl_write_int!(ficlone, 0x94, 9);
}
use ioctl::ficlone;

/// What the user asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsistencyMode {
    /// Reflink clones where all volumes are image files on a filesystem that
    /// supports them; fuzzy otherwise.
    Auto,
    /// Reflink clones, or fail.
    Reflink,
    /// Freeze this mounted filesystem while the cycle reads.
    Freeze(PathBuf),
    /// Read the live volumes; points are fuzzy.
    None,
}

impl std::str::FromStr for ConsistencyMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "reflink" => Ok(Self::Reflink),
            "none" => Ok(Self::None),
            _ => match s.strip_prefix("freeze:") {
                Some(m) if !m.is_empty() => Ok(Self::Freeze(PathBuf::from(m))),
                _ => Err(format!(
                    "{s:?} is not one of auto, reflink, freeze:MOUNT, none"
                )),
            },
        }
    }
}

/// The sources a cycle reads, and how consistent they are. Dropping it
/// removes clones and thaws a frozen filesystem.
pub struct Snapshot {
    /// Path to read for each volume, in order.
    pub paths: Vec<PathBuf>,
    /// The label the point gets.
    pub consistency: Consistency,
    clones: Vec<PathBuf>,
    frozen: Option<Frozen>,
}

impl Snapshot {
    fn live(paths: Vec<PathBuf>) -> Self {
        Self {
            paths,
            consistency: Consistency::Fuzzy,
            clones: vec![],
            frozen: None,
        }
    }

    /// Whether a filesystem is frozen for this snapshot.
    pub fn is_frozen(&self) -> bool {
        self.frozen.is_some()
    }

    /// Thaw a frozen filesystem now. Idempotent; `None` if nothing was
    /// frozen.
    pub(crate) fn release_freeze(&mut self) -> Option<Thawed> {
        self.frozen.take().map(Frozen::thaw)
    }

    /// The freeze, to end elsewhere (after reading the delta).
    pub(crate) fn take_freeze(&mut self) -> Option<Frozen> {
        self.frozen.take()
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        self.release_freeze();
        for c in &self.clones {
            let _ = std::fs::remove_file(c);
        }
    }
}

fn clone_path(src: &Path) -> PathBuf {
    let name = src
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    src.with_file_name(format!(".{name}.pilotlight-clone"))
}

fn reflink(src: &Path) -> std::io::Result<PathBuf> {
    let dst = clone_path(src);
    let _ = std::fs::remove_file(&dst);
    let s = File::open(src)?;
    let d = File::options().write(true).create_new(true).open(&dst)?;
    // SAFETY: FICLONE with two fds we own; the kernel reads the int argument.
    let r = unsafe { ficlone(d.as_raw_fd(), s.as_raw_fd() as libc::c_ulong) };
    if let Err(e) = r {
        drop(d);
        let _ = std::fs::remove_file(&dst);
        return Err(std::io::Error::from(e));
    }
    Ok(dst)
}

/// Flush a mounted filesystem's dirty data and journal to its device
/// (syncfs), without freezing it.
pub fn sync_filesystem(mount: &Path) -> Result<(), AgentError> {
    let dir = File::open(mount).map_err(|e| {
        AgentError::Consistency(format!("cannot open mount {}: {e}", mount.display()))
    })?;
    nix::unistd::syncfs(&dir)
        .map_err(|e| AgentError::Consistency(format!("syncfs of {}: {e}", mount.display())))
}

/// Prepare the sources of one cycle.
pub(crate) fn prepare(
    mode: &ConsistencyMode,
    sources: &[(String, PathBuf, bool)],
    freezer: &Arc<Freezer>,
) -> Result<Snapshot, AgentError> {
    let live = || {
        sources
            .iter()
            .map(|(_, p, _)| p.clone())
            .collect::<Vec<_>>()
    };
    match mode {
        ConsistencyMode::None => Ok(Snapshot::live(live())),
        ConsistencyMode::Auto | ConsistencyMode::Reflink => {
            let strict = *mode == ConsistencyMode::Reflink;
            let mut snap = Snapshot {
                paths: Vec::new(),
                consistency: Consistency::Fuzzy,
                clones: vec![],
                frozen: None,
            };
            for (name, path, is_device) in sources {
                if *is_device {
                    if strict {
                        return Err(AgentError::Consistency(format!(
                            "volume {name} is a block device; it cannot be reflinked"
                        )));
                    }
                    return Ok(Snapshot::live(live()));
                }
                match reflink(path) {
                    Ok(c) => {
                        snap.clones.push(c.clone());
                        snap.paths.push(c);
                    }
                    Err(e) if strict => {
                        return Err(AgentError::Consistency(format!(
                            "cannot reflink {}: {e}",
                            path.display()
                        )));
                    }
                    Err(e) => {
                        tracing::debug!(cause = %e, "no reflink support; point will be fuzzy");
                        return Ok(Snapshot::live(live()));
                    }
                }
            }
            // Clones of several files are taken one after another, not at one
            // instant: only a single volume is honestly crash-consistent.
            if sources.len() == 1 {
                snap.consistency = Consistency::CrashConsistent;
            } else {
                tracing::info!("several image volumes were cloned one after another; the point is labelled fuzzy");
            }
            Ok(snap)
        }
        ConsistencyMode::Freeze(mount) => Ok(Snapshot {
            paths: live(),
            consistency: Consistency::CrashConsistent,
            clones: vec![],
            frozen: Some(freezer.freeze(mount)?),
        }),
    }
}
