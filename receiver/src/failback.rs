//! Fail back by delta: a restore connection (`Restore` after `Hello`, from
//! an agent whose `Hello` has [`FEATURE_RESTORE`]). The receiver checks that
//! the agent's server may restore the volume (its own, or another server's
//! with a grant in the catalog), pins the point against prune, answers
//! `RestoreInfo` and the point's block hashes (`HashesPacked` to an agent
//! whose `Hello` has [`FEATURE_HASHPACK`], `Hashes` to others), then serves
//! `Fetch` requests with `Fetched` blocks until `Goodbye`.
//!
//! ```text
//! frame reader --(Fetch indexes, mpsc(FETCH_QUEUE))--> block sender --> TLS
//!    refuses a Fetch past the window          reads the next batch off the
//!    (blocks asked for, not yet sent)         async workers while it sends
//!                                             this one, in order
//! ```
//!
//! The send side is bounded like the receive side: at most
//! [`FETCH_WINDOW`] blocks asked for and not yet sent, checked before the
//! request is queued, and at most two batches of [`FETCH_BATCH_BYTES`] of
//! blocks read ahead of the socket (one sent while the next is read).

mod source;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pilotlight_protocol::frame::{BlockFrame, PointSelector, RestoreInfo, RestoreRequest};
use pilotlight_protocol::limits::{FEATURE_HASHPACK, FEATURE_RESTORE, FETCH_WINDOW};
use pilotlight_protocol::Frame;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::export::pin::{self, Pin};
use crate::handshake::AuthorizedPeer;
use crate::hashes::Listing;
use crate::restore::{point_blocks, point_volume, resolve_point, PointSel};
use crate::store::{blocking, Store};
use crate::wire::{next_or_eof, send, unexpected, Reader, Writer};
use crate::ReceiveError;

use source::{Source, Worker};

/// Depth of the queue of `Fetch` requests between the frame reader and the
/// block sender (the window bounds what they hold).
const FETCH_QUEUE: usize = 16;
/// Bytes of blocks read ahead of the socket, at most (at least one block).
const FETCH_BATCH_BYTES: usize = 8 << 20;

/// Serve one restore connection to its end, or until `cancel` (the
/// receiver shuts down).
pub(crate) async fn serve(
    store: &Arc<Store>,
    (rd, wr): (&mut Reader, &mut Writer),
    peer: &AuthorizedPeer,
    (features, req): (u32, RestoreRequest),
    (cancel, idle): (&CancellationToken, Duration),
) -> Result<(), ReceiveError> {
    tokio::select! {
        () = cancel.cancelled() => Err(ReceiveError::Shutdown),
        r = restore(store, (rd, wr), peer, (features, req), idle) => r,
    }
}

/// The restore: the point and its hashes, then the fetches.
async fn restore(
    store: &Arc<Store>,
    (rd, wr): (&mut Reader, &mut Writer),
    peer: &AuthorizedPeer,
    (features, req): (u32, RestoreRequest),
    idle: Duration,
) -> Result<(), ReceiveError> {
    if features & FEATURE_RESTORE == 0 {
        return Err(ReceiveError::Protocol(
            "Restore from a peer whose Hello did not advertise the restore feature".into(),
        ));
    }
    let (st, who) = (store.clone(), peer.clone());
    let (source, _pin) = blocking(move || prepare(st, &who, &req)).await?;
    let source = Arc::new(source);
    tracing::info!(
        server = %peer.server,
        from = %source.server,
        volume = %source.volume,
        point = source.point,
        "restore started"
    );
    let info = Frame::RestoreInfo(RestoreInfo {
        point: source.point as u64,
        size: source.size,
        block_size: source.block_size,
    });
    send(wr, &info).await?;
    let listing = Listing::new(0, source.size, source.block_size, source.hashes());
    let total = listing.total;
    let packed = features & FEATURE_HASHPACK != 0;
    for frame in listing {
        send(wr, &pack(frame, packed)).await?;
    }
    let end = Frame::HashesEnd {
        volume: 0,
        point: source.point as u64,
        blocks: total,
    };
    send(wr, &end).await?;
    let outstanding = AtomicUsize::new(0);
    let (tx, rx) = mpsc::channel(FETCH_QUEUE);
    let read = requests(rd, tx, &source, &outstanding, idle);
    let write = blocks(wr, rx, &source, &outstanding);
    tokio::try_join!(read, write).map(|_| ())
}

/// `Hashes` as `HashesPacked` when the agent takes them (`packed`).
fn pack(frame: Frame, packed: bool) -> Frame {
    match frame {
        Frame::Hashes {
            volume,
            start,
            hashes,
        } if packed => Frame::HashesPacked {
            volume,
            start,
            hashes,
        },
        other => other,
    }
}

/// Check the agent's right to the volume, find the point and its blocks,
/// and pin the point. Blocking.
fn prepare(
    store: Arc<Store>,
    peer: &AuthorizedPeer,
    req: &RestoreRequest,
) -> Result<(Source, Pin), ReceiveError> {
    let server = if req.server.is_empty() {
        peer.server.clone()
    } else {
        req.server.clone()
    };
    {
        let cat = store.catalog()?;
        let allowed = match cat.server(&server)? {
            Some(row) => cat.may_restore(peer.server_id, row.id)?,
            None => false,
        };
        if !allowed {
            return Err(ReceiveError::Unauthorized(refusal(&peer.server, &server)));
        }
    }
    let sel = match req.point {
        PointSelector::Latest => PointSel::Latest,
        PointSelector::Id(id) => PointSel::Id(i64::try_from(id).unwrap_or(i64::MAX)),
        PointSelector::At(ms) => PointSel::At(ms),
    };
    let point = resolve_point(&store, &server, sel)?;
    let vol = point_volume(&store, &point, &server, &req.volume)?;
    let pin = pin::pin(store.dir(), &server, &vol.name, point.key, || {
        resolve_point(&store, &server, PointSel::Id(point.id)).map(|_| ())
    })?;
    let blocks = point_blocks(&store, &vol, point.key)?;
    let source = Source {
        store,
        server,
        volume: vol.name,
        point: point.id,
        size: vol.size,
        block_size: vol.block_size,
        blocks,
    };
    Ok((source, pin))
}

/// The sentence a server hears when it asks for another server's volume
/// without a grant (the same whether that server exists or not).
pub(crate) fn refusal(server: &str, from: &str) -> String {
    format!(
        "server {server} may not restore the volumes of server {from}: no grant \
         (pilotlight-receiver grant --server {server} --restore-from {from})"
    )
}

/// Read `Fetch` requests until `Goodbye` (or the end), refusing one past the
/// window or the volume's end, and queue them for [`blocks`].
async fn requests(
    rd: &mut Reader,
    tx: mpsc::Sender<Vec<u64>>,
    source: &Source,
    outstanding: &AtomicUsize,
    idle: Duration,
) -> Result<(), ReceiveError> {
    loop {
        let frame = tokio::select! {
            f = next_or_eof(rd) => f?,
            () = tokio::time::sleep(idle) => {
                if outstanding.load(Ordering::Acquire) == 0 {
                    return Err(ReceiveError::Timeout("restore connection silent (no Fetch)"));
                }
                continue;
            }
        };
        match frame {
            None | Some(Frame::Goodbye) => return Ok(()),
            Some(Frame::Ping) => {}
            Some(Frame::Fetch { indexes }) => {
                source.check(&indexes)?;
                let n = indexes.len();
                let now = outstanding.fetch_add(n, Ordering::AcqRel) + n;
                if now > FETCH_WINDOW {
                    return Err(ReceiveError::Protocol(format!(
                        "fetch window exceeded: {now} blocks asked for and not yet sent, \
                         at most {FETCH_WINDOW}"
                    )));
                }
                if tx.send(indexes).await.is_err() {
                    // The sender ended; its error is the connection's.
                    return Ok(());
                }
            }
            Some(other) => return Err(unexpected(&other, "Fetch or Goodbye")),
        }
    }
}

/// Send the blocks of each queued request, in order, in batches of at most
/// [`FETCH_BATCH_BYTES`]: the next batch is read (off the async workers)
/// while this one is sent, so at most two are in memory.
async fn blocks(
    wr: &mut Writer,
    mut rx: mpsc::Receiver<Vec<u64>>,
    source: &Arc<Source>,
    outstanding: &AtomicUsize,
) -> Result<(), ReceiveError> {
    let batch = (FETCH_BATCH_BYTES / source.block_size as usize).max(1);
    let mut parts: VecDeque<Vec<u64>> = VecDeque::new();
    let mut spare: Vec<Vec<Worker>> = Vec::new();
    let mut reading = None;
    loop {
        let current = match reading.take() {
            Some(r) => r,
            None => match next_part(&mut parts, &mut rx, batch, true).await {
                Some(part) => read(source, part, spare.pop().unwrap_or_default()),
                None => return Ok(()),
            },
        };
        let (frames, pool) = current
            .await
            .map_err(|e| ReceiveError::join("fetch read", e))?;
        spare.push(pool);
        if let Some(part) = next_part(&mut parts, &mut rx, batch, false).await {
            reading = Some(read(source, part, spare.pop().unwrap_or_default()));
        }
        let frames = frames?;
        metrics::counter!("pilotlight_receiver_fetched_blocks_total")
            .increment(frames.len() as u64);
        for f in frames {
            send(wr, &Frame::Fetched(f)).await?;
            outstanding.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Blocks read for a batch, and the workers that read them.
type Batch = (Result<Vec<BlockFrame>, ReceiveError>, Vec<Worker>);

/// Read the blocks `part` on the blocking pool with the workers `pool`.
fn read(source: &Arc<Source>, part: Vec<u64>, mut pool: Vec<Worker>) -> JoinHandle<Batch> {
    let src = source.clone();
    tokio::task::spawn_blocking(move || {
        let r = src.read_batch(&part, &mut pool);
        (r, pool)
    })
}

/// The next batch of indexes: from what is queued, else from the next
/// request (waiting for one only if `wait`); `None` when there is none.
async fn next_part(
    parts: &mut VecDeque<Vec<u64>>,
    rx: &mut mpsc::Receiver<Vec<u64>>,
    batch: usize,
    wait: bool,
) -> Option<Vec<u64>> {
    if parts.is_empty() {
        let indexes = if wait {
            rx.recv().await?
        } else {
            rx.try_recv().ok()?
        };
        parts.extend(indexes.chunks(batch).map(<[u64]>::to_vec));
    }
    parts.pop_front()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refusal_is_one_sentence_naming_both_servers_and_the_fix() {
        let m = refusal("web1", "web1-recovery");
        assert_eq!(m.matches(". ").count(), 0, "{m}");
        assert!(m.contains("server web1 may not restore the volumes of server web1-recovery"));
        assert!(m.contains("grant --server web1 --restore-from web1-recovery"));
    }
}
