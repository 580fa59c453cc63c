//! Fetch the blocks that differ, pipelined on the one restore connection
//! while the compare still hashes the target:
//!
//! ```text
//! compare --(runs of differing indexes, mpsc(FOUND_QUEUE))--> requests
//! requests: Fetch (up to 256 indexes a frame) while the window has room;
//!           Ping while it has nothing to ask for
//!           -(the indexes asked for, in order)->
//! receive:  Fetched, in order, checked against the point's hash
//!           -(async_channel, bounded)-> writers (blocking): decode, verify
//!           BLAKE3, pwrite (O_DIRECT on a device)
//! ```
//!
//! At most [`FETCH_WINDOW`] blocks are asked for and not yet received (a
//! semaphore: a request takes permits, each block received gives one back),
//! so the receiver never refuses the agent's pace.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::SinkExt;
use pilotlight_protocol::block::{BlockError, Decoder};
use pilotlight_protocol::frame::{BlockFrame, RestoreInfo};
use pilotlight_protocol::limits::{
    block_len, BLOCK_HEADER_LEN, FETCH_WINDOW, MAX_FETCH_PER_FRAME, PING_INTERVAL,
};
use pilotlight_protocol::{BlockHash, Encoding, Frame};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;

use super::connection::{codec_err, next, Reader, Writer};
use super::target::Target;
use super::Phase;
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
}

/// Counters of a fetch.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Blocks written to the target.
    pub(crate) blocks: AtomicU64,
    /// Bytes written to the target.
    pub(crate) bytes: AtomicU64,
    /// Shown to the user: bytes written, once the compare is done.
    pub(crate) progress: Arc<super::Progress>,
    /// The blocks written, when they are to be read back (`None`: not
    /// kept).
    pub(crate) written: Option<Mutex<Vec<u64>>>,
}

/// Fetch and write every block the compare sends on `found`, with
/// `workers` writers, until `found` closes.
pub(crate) async fn fetch(
    (rd, wr): (&mut Reader, &mut Writer),
    target: Arc<Target>,
    plan: &Plan,
    found: mpsc::Receiver<Vec<u64>>,
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
    // Every index asked for, in the order asked: what each `Fetched` must
    // be. The window bounds what it holds.
    let (asked_tx, asked_rx) = mpsc::channel::<Vec<u64>>(FETCH_WINDOW);
    let sent = tokio::try_join!(
        requests(wr, found, &window, asked_tx),
        receive(rd, plan, &window, asked_rx, (throttle, tx)),
    )
    .map(|_| ());
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

/// Ask for the blocks `found` names, at most [`MAX_FETCH_PER_FRAME`] a
/// frame and within the window; what is asked for goes to `asked`, in
/// order. Says `Ping` every [`PING_INTERVAL`] (the receiver closes a
/// restore connection that is silent for its idle time while nothing is
/// asked for, and a target that matches for long hashes a long time).
async fn requests(
    wr: &mut Writer,
    mut found: mpsc::Receiver<Vec<u64>>,
    window: &Semaphore,
    asked: mpsc::Sender<Vec<u64>>,
) -> Result<(), AgentError> {
    let mut pending: Vec<u64> = Vec::new();
    let mut ticks = tokio::time::interval(PING_INTERVAL);
    ticks.tick().await;
    loop {
        // Ask for full frames; a partial one only when nothing more is
        // ready (the compare is hashing), or at the end.
        let more = match found.try_recv() {
            Ok(run) => Some(run),
            Err(mpsc::error::TryRecvError::Disconnected) => None,
            Err(mpsc::error::TryRecvError::Empty) => {
                if !pending.is_empty() {
                    ask(wr, window, &asked, std::mem::take(&mut pending)).await?;
                    continue;
                }
                tokio::select! {
                    run = found.recv() => run,
                    _ = ticks.tick() => {
                        wr.send(&Frame::Ping).await.map_err(codec_err)?;
                        continue;
                    }
                }
            }
        };
        let Some(run) = more else {
            if !pending.is_empty() {
                ask(wr, window, &asked, pending).await?;
            }
            return Ok(());
        };
        pending.extend(run);
        while pending.len() >= MAX_FETCH_PER_FRAME {
            let rest = pending.split_off(MAX_FETCH_PER_FRAME);
            ask(wr, window, &asked, std::mem::replace(&mut pending, rest)).await?;
        }
    }
}

/// One `Fetch` of `indexes` (at most [`MAX_FETCH_PER_FRAME`]), once the
/// window has room for them.
async fn ask(
    wr: &mut Writer,
    window: &Semaphore,
    asked: &mpsc::Sender<Vec<u64>>,
    indexes: Vec<u64>,
) -> Result<(), AgentError> {
    let n = u32::try_from(indexes.len()).unwrap_or(u32::MAX);
    window
        .acquire_many(n)
        .await
        .map_err(|_| AgentError::Internal("the fetch window closed".into()))?
        .forget();
    let frame = Frame::Fetch {
        indexes: indexes.clone(),
    };
    wr.send(&frame).await.map_err(codec_err)?;
    // The receive half ended early: its error is the fetch's.
    asked.send(indexes).await.map_err(|_| AgentError::Stopped)
}

/// Receive the blocks asked for, in order, check each against the point
/// and queue it for the writers.
async fn receive(
    rd: &mut Reader,
    plan: &Plan,
    window: &Semaphore,
    mut asked: mpsc::Receiver<Vec<u64>>,
    (throttle, tx): (Option<Arc<Throttle>>, async_channel::Sender<BlockFrame>),
) -> Result<(), AgentError> {
    while let Some(indexes) = asked.recv().await {
        for index in indexes {
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
    }
    Ok(())
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

/// A raw block's payload is its length and has its hash.
fn check_raw(b: &BlockFrame) -> Result<(), BlockError> {
    if b.payload.len() != b.raw_len as usize {
        return Err(BlockError::Length);
    }
    if BlockHash::of(&b.payload) != b.hash {
        return Err(BlockError::HashMismatch);
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
            let bad = |e: BlockError| AgentError::BadBlock {
                volume: volume.to_owned(),
                point,
                index: b.index,
                why: e.to_string(),
            };
            // A raw block is checked and written from the frame's own
            // buffer; the others are decoded (and checked) into `out`.
            let data: &[u8] = if b.encoding == Encoding::Raw {
                check_raw(&b).map_err(bad)?;
                &b.payload
            } else {
                dec.decode(b.encoding, &b.payload, b.raw_len, &b.hash, &mut out)
                    .map_err(bad)?;
                &out
            };
            let offset = b.index * u64::from(block_size);
            match b.encoding {
                Encoding::Zero => target.zero(offset, data.len(), &mut buf)?,
                _ => target.write(data, offset, &mut buf)?,
            }
            let n = data.len() as u64;
            counters.blocks.fetch_add(1, Ordering::Relaxed);
            counters.bytes.fetch_add(n, Ordering::Relaxed);
            if counters.progress.phase() == Phase::Fetch {
                counters.progress.done.fetch_add(n, Ordering::Relaxed);
            }
            if let Some(w) = &counters.written {
                if let Ok(mut w) = w.lock() {
                    w.push(b.index);
                }
            }
        }
        Ok(())
    })();
    if r.is_err() {
        rx.close();
    }
    r
}
