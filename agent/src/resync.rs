//! The base each volume's next point is compared against: the local state
//! when it matches the receiver's last durable point, otherwise the
//! receiver's own hashes (checksum resync), or zeros when the receiver has
//! nothing of this server. A volume whose base is not the local state is
//! scanned in full by live tracking.

use pilotlight_protocol::limits::block_count;
use pilotlight_protocol::{BlockHash, Frame};

use crate::link::Link;
use crate::scan::zero_table;
use crate::session::Volume;
use crate::state::AgentState;
use crate::trace::{RescanReason, Tracking};
use crate::AgentError;

/// The base hash tables of `vols`, one per volume.
pub(crate) async fn base(
    link: &mut Link,
    vols: &[Volume],
    local: Option<AgentState>,
    mut tracking: Option<&mut Tracking>,
) -> Result<Vec<Vec<BlockHash>>, AgentError> {
    let mut out = Vec::with_capacity(vols.len());
    for (i, v) in vols.iter().enumerate() {
        if link.last_point == 0 {
            out.push(zero_table(v.size, v.block_size));
            if let Some(t) = tracking.as_deref_mut() {
                t.force_rescan(i, RescanReason::InitialSync);
            }
            continue;
        }
        let count = block_count(v.size, v.block_size);
        let trusted = local
            .as_ref()
            .filter(|s| s.store_id == link.store_id && s.last_point == link.last_point)
            .and_then(|s| {
                s.volumes
                    .iter()
                    .find(|h| h.name == v.name && h.size == v.size && h.block_size == v.block_size)
            })
            .filter(|h| h.hashes.len() as u64 == count);
        if let Some(h) = trusted {
            out.push(h.hashes.clone());
            continue;
        }
        tracing::info!(volume = %v.name, "local state does not match the receiver; fetching its block hashes");
        if let Some(t) = tracking.as_deref_mut() {
            t.force_rescan(i, RescanReason::ChecksumResync);
        }
        let idx = u16::try_from(i)
            .map_err(|_| AgentError::Internal(format!("volume index {i} out of range")))?;
        out.push(fetch(link, idx, v).await?);
    }
    Ok(out)
}

/// The receiver's hashes of volume `idx` (`GetHashes`).
async fn fetch(link: &mut Link, idx: u16, v: &Volume) -> Result<Vec<BlockHash>, AgentError> {
    link.send(&Frame::GetHashes { volume: idx }).await?;
    let mut table = zero_table(v.size, v.block_size);
    loop {
        match link.recv().await? {
            Frame::Hashes {
                volume,
                start,
                hashes,
            } if volume == idx => {
                for (k, h) in hashes.into_iter().enumerate() {
                    if let Some(slot) = usize::try_from(start)
                        .ok()
                        .and_then(|s| table.get_mut(s + k))
                    {
                        *slot = h;
                    }
                }
            }
            Frame::HashesEnd { volume, .. } if volume == idx => return Ok(table),
            other => {
                return Err(AgentError::Protocol(format!(
                    "unexpected {:?} while fetching hashes",
                    other.kind()
                )))
            }
        }
    }
}
