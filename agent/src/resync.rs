//! The base each volume's next point is compared against, as the volume's
//! hash file: the local one when `state.bin` names the receiver's last
//! durable point, otherwise one rebuilt from the receiver's own hashes
//! (checksum resync), or all zeros when the receiver has nothing of this
//! server. A volume whose base is not the local state is scanned in full by
//! live tracking.

use std::path::Path;
use std::sync::Arc;

use pilotlight_protocol::Frame;

use crate::blocking::off_async;
use crate::hashfile::HashFile;
use crate::link::Link;
use crate::session::Volume;
use crate::state::{StateHeader, VolumeMeta};
use crate::trace::{RescanReason, Tracking};
use crate::AgentError;

/// The base hash files of `vols` (one per volume), and whether `state.bin`
/// still names the point they hold.
pub(crate) async fn base(
    link: &mut Link,
    vols: &[Volume],
    dir: &Path,
    local: Option<&StateHeader>,
    mut tracking: Option<&mut Tracking>,
    resumed: bool,
) -> Result<(Vec<Arc<HashFile>>, bool), AgentError> {
    if resumed {
        return resume(vols, dir, link.last_point, tracking);
    }
    let matches = local
        .filter(|s| {
            link.last_point != 0 && s.store_id == link.store_id && s.last_point == link.last_point
        })
        .is_some();
    let mut trusted = Vec::with_capacity(vols.len());
    for v in vols {
        let meta = local.and_then(|s| s.volume(&v.name));
        let fits =
            matches && meta.is_some_and(|m| m.size == v.size && m.block_size == v.block_size);
        let file = if fits {
            off_async(|| HashFile::open(dir, &v.name, v.size, v.block_size))?
        } else {
            None
        };
        trusted.push(file);
    }
    let all_trusted = trusted.iter().all(Option::is_some);
    if !all_trusted && local.is_some_and(|s| s.last_point != 0) {
        // No file changes while `state.bin` names a point.
        let untrusted = StateHeader {
            store_id: link.store_id,
            last_point: 0,
            volumes: vols
                .iter()
                .map(|v| VolumeMeta {
                    name: v.name.clone(),
                    size: v.size,
                    block_size: v.block_size,
                })
                .collect(),
        };
        off_async(|| untrusted.save(dir))?;
    }
    let mut out = Vec::with_capacity(vols.len());
    for (i, (v, file)) in vols.iter().zip(trusted).enumerate() {
        if let Some(f) = file {
            out.push(Arc::new(f));
            continue;
        }
        let f = off_async(|| HashFile::create_zero(dir, &v.name, v.size, v.block_size))?;
        if link.last_point == 0 {
            if let Some(t) = tracking.as_deref_mut() {
                t.force_rescan(i, RescanReason::InitialSync);
            }
            out.push(Arc::new(f));
            continue;
        }
        tracing::info!(volume = %v.name, "local state does not match the receiver; fetching its block hashes");
        if let Some(t) = tracking.as_deref_mut() {
            t.force_rescan(i, RescanReason::ChecksumResync);
        }
        let idx = u16::try_from(i)
            .map_err(|_| AgentError::Internal(format!("volume index {i} out of range")))?;
        fetch(link, idx, &f).await?;
        out.push(Arc::new(f));
    }
    Ok((out, matches && all_trusted))
}

/// A resumed sync: the hash files hold the receiver's last point and the
/// sync's checkpoints (`state.bin` names no point), and they are the base;
/// live tracking rescans every volume (writes while the agent was not
/// running are not in any dirty set).
fn resume(
    vols: &[Volume],
    dir: &Path,
    last_point: u64,
    mut tracking: Option<&mut Tracking>,
) -> Result<(Vec<Arc<HashFile>>, bool), AgentError> {
    let mut out = Vec::with_capacity(vols.len());
    for (i, v) in vols.iter().enumerate() {
        let Some(f) = off_async(|| HashFile::open(dir, &v.name, v.size, v.block_size))? else {
            return Err(AgentError::Internal(format!(
                "hash file of volume {} vanished while resuming its sync",
                v.name
            )));
        };
        if let Some(t) = tracking.as_deref_mut() {
            let reason = if last_point == 0 {
                RescanReason::InitialSync
            } else {
                RescanReason::ChecksumResync
            };
            t.force_rescan(i, reason);
        }
        out.push(Arc::new(f));
    }
    Ok((out, false))
}

/// The receiver's hashes of volume `idx` (`GetHashes`), into `file` (all
/// zeros before).
async fn fetch(link: &mut Link, idx: u16, file: &HashFile) -> Result<(), AgentError> {
    link.send(&Frame::GetHashes { volume: idx }).await?;
    loop {
        match link.recv().await? {
            Frame::Hashes {
                volume,
                start,
                hashes,
            } if volume == idx => off_async(|| file.fill(start, &hashes))?,
            Frame::HashesEnd { volume, .. } if volume == idx => return Ok(()),
            other => {
                return Err(AgentError::Protocol(format!(
                    "unexpected {:?} while fetching hashes",
                    other.kind()
                )))
            }
        }
    }
}
