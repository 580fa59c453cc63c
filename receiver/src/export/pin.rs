//! Pins: an exported point is kept by `prune` (and so its blocks by
//! garbage collection, which keeps every block a point refers to) for as
//! long as the export runs.
//!
//! An export is its own process, beside `serve` (which prunes on a
//! schedule) and beside a `prune` command, so the pin is a file:
//! `DIR/exports/PID-N-POINT-VOLUME.pin` (JSON: pid, server, volume, point), on which
//! the export holds an exclusive `flock` for its whole life. A pin counts
//! while its lock is held: a pin whose process died (killed, crashed, the
//! machine rebooted) lost its lock with it, is ignored and removed by the
//! next prune. No pid is trusted, so a reused pid pins nothing.
//!
//! Pinning and pruning exclude each other through `DIR/exports/.lock`:
//! prune holds it from reading the pins until its last point is deleted;
//! an export holds it from writing its pin until it has seen that its
//! point is still there. So either prune sees the pin, or the export sees
//! the point gone and refuses to start.

use std::collections::HashSet;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use crate::store::{create_private_dir, PRIVATE_FILE_MODE};
use crate::ReceiveError;

/// Folder of pins (and unkept overlays) in the receiver directory.
pub const EXPORTS_DIR: &str = "exports";

/// Lock file pinning and pruning take in turn.
const LOCK_FILE: &str = ".lock";

/// What a pin file says.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct PinRecord {
    pid: u32,
    server: String,
    volume: String,
    /// The point's catalog key ([`crate::catalog::PointInfo::key`]).
    point: i64,
}

/// A live pin: the point is kept while this lives. Dropping it removes the
/// pin file (a crash leaves it, unlocked and so ignored).
pub(crate) struct Pin {
    _file: Flock<File>,
    path: PathBuf,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Held while pins are read and points deleted, or while a pin is made.
pub struct PinLock {
    _file: Flock<File>,
}

/// Take `DIR/exports/.lock` (waiting for whoever holds it).
pub fn lock(dir: &Path) -> Result<PinLock, ReceiveError> {
    let exports = dir.join(EXPORTS_DIR);
    create_private_dir(&exports)?;
    let path = exports.join(LOCK_FILE);
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(PRIVATE_FILE_MODE)
        .open(&path)
        .map_err(|e| ReceiveError::storage(&path, e))?;
    let file = Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, errno)| ReceiveError::storage(&path, errno.into()))?;
    Ok(PinLock { _file: file })
}

/// Pin `point` of `server`/`volume`, then run `check` (is the point still
/// there?) before anyone may prune; a failed check removes the pin.
pub(crate) fn pin(
    dir: &Path,
    server: &str,
    volume: &str,
    point: i64,
    check: impl FnOnce() -> Result<(), ReceiveError>,
) -> Result<Pin, ReceiveError> {
    let _guard = lock(dir)?;
    let exports = dir.join(EXPORTS_DIR);
    let pid = std::process::id();
    // One process may export several volumes of a point (a drill), and
    // `serve` may pin the same point for several network restores at once.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = format!("{pid}-{n}-{point}-{volume}.pin");
    let tmp = exports.join(format!(".{name}.tmp"));
    let path = exports.join(&name);
    let _ = std::fs::remove_file(&tmp);
    let file = File::options()
        .write(true)
        .create_new(true)
        .mode(PRIVATE_FILE_MODE)
        .open(&tmp)
        .map_err(|e| ReceiveError::storage(&tmp, e))?;
    let file = Flock::lock(file, FlockArg::LockExclusiveNonblock)
        .map_err(|(_, errno)| ReceiveError::storage(&tmp, errno.into()))?;
    let record = PinRecord {
        pid,
        server: server.to_owned(),
        volume: volume.to_owned(),
        point,
    };
    let json = serde_json::to_vec(&record)
        .map_err(|e| ReceiveError::Internal(format!("pin record: {e}")))?;
    std::io::Write::write_all(&mut &*file, &json).map_err(|e| ReceiveError::storage(&tmp, e))?;
    // Renamed only once locked and written: prune never sees it unlocked.
    std::fs::rename(&tmp, &path).map_err(|e| ReceiveError::storage(&path, e))?;
    let pin = Pin { _file: file, path };
    check()?;
    Ok(pin)
}

/// The ids of the points live exports pin. Stale pins (their process is
/// gone) are removed. Call with [`lock`] held across the deletions that
/// depend on the answer.
pub fn pinned_points(dir: &Path) -> Result<HashSet<i64>, ReceiveError> {
    let exports = dir.join(EXPORTS_DIR);
    let mut out = HashSet::new();
    let entries = match std::fs::read_dir(&exports) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(ReceiveError::storage(&exports, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| ReceiveError::storage(&exports, e))?;
        let path = entry.path();
        if path.extension().is_none_or(|x| x != "pin") {
            continue;
        }
        let Ok(file) = File::open(&path) else {
            continue; // gone meanwhile: its export stopped
        };
        match Flock::lock(file, FlockArg::LockSharedNonblock) {
            Ok(_stale) => {
                tracing::info!(pin = %path.display(), "removing the pin of an export that is gone");
                let _ = std::fs::remove_file(&path);
            }
            Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                let mut text = String::new();
                file.read_to_string(&mut text)
                    .map_err(|e| ReceiveError::storage(&path, e))?;
                let record: PinRecord = serde_json::from_str(&text).map_err(|e| {
                    ReceiveError::Corrupt(format!("pin {} is unreadable: {e}", path.display()))
                })?;
                out.insert(record.point);
            }
            Err((_, errno)) => return Err(ReceiveError::storage(&path, errno.into())),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pin_counts_while_it_lives_and_a_failed_check_unpins() {
        let dir = tempfile::tempdir().unwrap();
        let pin = pin(dir.path(), "db1", "root", 7, || Ok(())).unwrap();
        // Another open file description: the same process's flock is seen as held.
        assert_eq!(pinned_points(dir.path()).unwrap(), HashSet::from([7]));
        drop(pin);
        assert!(pinned_points(dir.path()).unwrap().is_empty());
        let refused = super::pin(dir.path(), "db1", "root", 8, || {
            Err(ReceiveError::NotFound("gone".into()))
        });
        assert!(refused.is_err());
        assert!(pinned_points(dir.path()).unwrap().is_empty());
    }

    #[test]
    fn a_pin_nobody_holds_is_stale_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let exports = dir.path().join(EXPORTS_DIR);
        std::fs::create_dir_all(&exports).unwrap();
        let stale = exports.join("999999-3.pin");
        std::fs::write(
            &stale,
            br#"{"pid":999999,"server":"a","volume":"v","point":3}"#,
        )
        .unwrap();
        assert!(pinned_points(dir.path()).unwrap().is_empty());
        assert!(!stale.exists());
    }
}
