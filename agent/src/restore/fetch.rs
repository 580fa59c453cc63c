//! Fetch the blocks that differ, pipelined on the one restore connection:
//!
//! ```text
//! requests: Fetch (256 indexes a frame) while the window has room
//! receive:  Fetched, in order, checked against the point's hash
//!           -(async_channel, bounded)-> writers (blocking): decode, verify
//!           BLAKE3, pwrite (O_DIRECT on a device)
//! ```
//!
//! At most [`FETCH_WINDOW`] blocks are asked for and not yet received (a
//! semaphore: a request takes permits, each block received gives one back),
//! so the receiver never refuses the agent's pace.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures_util::SinkExt;
use pilotlight_protocol::block::Decoder;
use pilotlight_protocol::frame::{BlockFrame, RestoreInfo};
use pilotlight_protocol::limits::{block_len, BLOCK_HEADER_LEN, FETCH_WINDOW, MAX_FETCH_PER_FRAME};
use pilotlight_protocol::{BlockHash, Encoding, Frame};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::connection::{codec_err, next, Reader, Writer};
use super::target::Target;
use crate::scan::AlignedBuf;
use crate::throttle::Throttle;
use crate::AgentError;

/// Depth of the queue of received blocks to the writers.
const WRITE_QUEUE: usize = 64;

/// What to fetch, and what it must be.
pub(crate) struct Plan {
    /// The volume's name (for errors).
    pub(crate) volume: String,
    /// The point, its size and block size.
    pub(crate) info: RestoreInfo,
    /// The point's hash of every block.
    pub(crate) hashes: Arc<Vec<BlockHash>>,
    /// The blocks to fetch, ascending.
    pub(crate) list: Arc<Vec<u64>>,
}

/// Counters of a fetch.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Blocks written to the target.
    pub(crate) blocks: AtomicU64,
    /// Bytes written to the target.
    pub(crate) bytes: AtomicU64,
    /// Shown to the user: bytes written.
    pub(crate) progress: Arc<super::Progress>,
}

/// Fetch and write every block of `plan.list`, with `workers` writers.
pub(crate) async fn fetch(
    (rd, wr): (&mut Reader, &mut Writer),
    target: Arc<Target>,
    plan: &Plan,
    (workers, throttle): (usize, Option<Arc<Throttle>>),
    counters: Arc<Counters>,
) -> Result<(), AgentError> {
    let window = Semaphore::new(FETCH_WINDOW);
    let (tx, rx) = async_channel::bounded::<BlockFrame>(WRITE_QUEUE);
    let mut writers = JoinSet::new();
    for _ in 0..workers.max(1) {
        let (rx, target, counters) = (rx.clone(), target.clone(), counters.clone());
        let (volume, point) = (plan.volume.clone(), plan.info.point);
        let bs = plan.info.block_size;
        writers.spawn_blocking(move || write_blocks(&rx, &target, (&volume, point, bs), &counters));
    }
    drop(rx);
    let requests = async {
        for chunk in plan.list.chunks(MAX_FETCH_PER_FRAME) {
            let n = u32::try_from(chunk.len()).unwrap_or(u32::MAX);
            window
                .acquire_many(n)
                .await
                .map_err(|_| AgentError::Internal("the fetch window closed".into()))?
                .forget();
            let frame = Frame::Fetch {
                indexes: chunk.to_vec(),
            };
            wr.send(&frame).await.map_err(codec_err)?;
        }
        Ok::<(), AgentError>(())
    };
    let window = &window;
    let receive = async move {
        for &index in plan.list.iter() {
            let block = match next(rd).await? {
                Frame::Fetched(b) => b,
                other => {
                    return Err(AgentError::Protocol(format!(
                        "expected Fetched, got {:?}",
                        other.kind()
                    )))
                }
            };
            check(plan, index, &block)?;
            window.add_permits(1);
            if let Some(t) = &throttle {
                t.take(block.payload.len() + BLOCK_HEADER_LEN).await;
            }
            if tx.send(block).await.is_err() {
                // Every writer stopped: the error is theirs.
                return Err(AgentError::Stopped);
            }
        }
        Ok(())
    };
    let sent = tokio::try_join!(requests, receive).map(|_| ());
    let mut first = None;
    while let Some(r) = writers.join_next().await {
        let r = r
            .map_err(|e| AgentError::task("restore writer", e))
            .and_then(|r| r);
        if let Err(e) = r {
            first.get_or_insert(e);
        }
    }
    match (first, sent) {
        (Some(e), _) => Err(e),
        (None, r) => r,
    }
}

/// A received block is the one asked for next, as the point holds it.
fn check(plan: &Plan, index: u64, b: &BlockFrame) -> Result<(), AgentError> {
    let info = &plan.info;
    let bad = |why: &str| AgentError::BadBlock {
        volume: plan.volume.clone(),
        point: info.point,
        index,
        why: why.to_owned(),
    };
    if b.index != index || b.tag != info.point || b.volume != 0 {
        return Err(AgentError::Protocol(format!(
            "expected block {index} of point {}, got block {} of point {}",
            info.point, b.index, b.tag
        )));
    }
    if b.raw_len != block_len(info.size, info.block_size, index) {
        return Err(bad("its length is not the volume's"));
    }
    if plan.hashes.get(index as usize) != Some(&b.hash) {
        return Err(bad("its hash is not the one the point listed"));
    }
    Ok(())
}

/// A writer: decode and verify each block, write it. Blocking. The first
/// failure closes the queue, so that the others stop too.
fn write_blocks(
    rx: &async_channel::Receiver<BlockFrame>,
    target: &Target,
    (volume, point, block_size): (&str, u64, u32),
    counters: &Counters,
) -> Result<(), AgentError> {
    let r = (|| {
        let mut dec = Decoder::new().map_err(|e| AgentError::Internal(format!("zstd: {e}")))?;
        let mut out = Vec::new();
        let mut buf = AlignedBuf::new(block_size as usize);
        while let Ok(b) = rx.recv_blocking() {
            dec.decode(b.encoding, &b.payload, b.raw_len, &b.hash, &mut out)
                .map_err(|e| AgentError::BadBlock {
                    volume: volume.to_owned(),
                    point,
                    index: b.index,
                    why: e.to_string(),
                })?;
            let offset = b.index * u64::from(block_size);
            match b.encoding {
                Encoding::Zero => target.zero(offset, out.len(), &mut buf)?,
                _ => target.write(&out, offset, &mut buf)?,
            }
            counters.blocks.fetch_add(1, Ordering::Relaxed);
            counters
                .bytes
                .fetch_add(out.len() as u64, Ordering::Relaxed);
            counters
                .progress
                .done
                .fetch_add(out.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    })();
    if r.is_err() {
        rx.close();
    }
    r
}
