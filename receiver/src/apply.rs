//! Data streams: a stream joins its session, reads `Block` frames, and a
//! blocking applier decodes and verifies each block, deduplicates it against
//! the blocks its server stored (or, with `dedup = "global"`, any server's)
//! and the session, checks the session's uncommitted-bytes cap and the
//! server's quota, appends it to a pack and records it in the session.
//! A `ZeroRun` frame is checked against its volume and recorded as one run
//! (no per-block work until the commit writes its rows). A `PartialBlock`
//! is merged with its base into a whole block first (`partial`), and its
//! `PartialApplied` answer goes out before the `Received` that covers it.
//! Acks (`RECEIVED`) are cumulative and coalesced.
//!
//! ```text
//! socket reader -(in-flight byte budget)-> mpsc(APPLY_QUEUE) -> applier (blocking)
//!        ^                                                          |
//!        +-- Received{seq} <- coalesce <- mpsc(ACK_QUEUE) <---------+
//! ```

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use pilotlight_protocol::block::Decoder;
use pilotlight_protocol::frame::{BlockFrame, PartialAppliedFrame};
use pilotlight_protocol::limits::{block_count, block_len, BLOCK_HEADER_LEN, ZERO_RUN_LEN};
use pilotlight_protocol::{Encoding, Frame, PartialBlockFrame, ZeroRunFrame};
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use crate::catalog::BlockRef;
use crate::pack::PackWriter;
use crate::partial::Merger;
use crate::registry::Registry;
use crate::session::Session;
use crate::store::Store;
use crate::wire::{next_or_eof, send_in, unexpected, Reader, Writer};
use crate::ReceiveError;

/// Depth of the queue from a data stream's reader to its applier.
const APPLY_QUEUE: usize = 8;
/// Depth of the queue of acks from an applier (must exceed `APPLY_QUEUE` + 2).
const ACK_QUEUE: usize = 64;

/// What a data stream carries to its applier.
enum Item {
    /// One block.
    Block(BlockFrame),
    /// A run of zero blocks.
    Zeros(ZeroRunFrame),
    /// Some byte ranges of a block.
    Partial(PartialBlockFrame),
}

impl Item {
    fn tag(&self) -> u64 {
        match self {
            Self::Block(b) => b.tag,
            Self::Zeros(z) => z.tag,
            Self::Partial(p) => p.tag,
        }
    }

    /// Its share of the in-flight byte budget.
    fn cost(&self) -> u32 {
        let len = match self {
            Self::Block(b) => b.payload.len() + BLOCK_HEADER_LEN,
            Self::Zeros(_) => ZERO_RUN_LEN,
            // The merged block is as large as the block.
            Self::Partial(p) => p.body_len().max(p.raw_len as usize) + BLOCK_HEADER_LEN,
        };
        u32::try_from(len).unwrap_or(u32::MAX)
    }
}

/// A block (or zero run) on its way to the applier, with its share of the
/// session's in-flight byte budget.
type Applying = (u64, Item, OwnedSemaphorePermit);

/// What the applier reports: the seq of a block applied (with the answer
/// to a partial block), or why it stopped.
type Ack = Result<(u64, Option<PartialAppliedFrame>), ReceiveError>;

/// Serve a data stream that asked to join `session_id`, until the agent
/// ends it or the session ends.
pub(crate) async fn serve_stream(
    registry: &Registry,
    store: &Arc<Store>,
    idle: Duration,
    (rd, wr): (&mut Reader, &mut Writer),
    server_id: i64,
    session_id: u64,
) -> Result<(), ReceiveError> {
    let session = join(registry, server_id, session_id)?;
    send_in(wr, &Frame::Joined, &session).await?;
    let (apply_tx, apply_rx) = mpsc::channel::<Applying>(APPLY_QUEUE);
    let (ack_tx, ack_rx) = mpsc::channel::<Ack>(ACK_QUEUE);
    let (store, s) = (store.clone(), session.clone());
    let applier = tokio::task::spawn_blocking(move || apply_loop(&s, &store, apply_rx, &ack_tx));
    let mut stream = Stream {
        session: &session,
        idle,
        apply_tx: Some(apply_tx),
        ack_rx,
    };
    let result = stream.run(rd, wr).await;
    drop(stream);
    let _ = applier.await;
    if let Err(e) = &result {
        if !matches!(
            e,
            ReceiveError::Superseded | ReceiveError::SessionFailed { .. } | ReceiveError::Shutdown
        ) {
            // A failed stream fails the whole session: nothing of it is committed.
            session.fail(e);
        }
    }
    // The last reference may drop the session, which cuts pack tails.
    let _ = tokio::task::spawn_blocking(move || drop(session)).await;
    result
}

/// Find the session to join and count the stream against its declared
/// number of streams.
fn join(
    registry: &Registry,
    server_id: i64,
    session_id: u64,
) -> Result<Arc<Session>, ReceiveError> {
    let Some(session) = registry.find(session_id, server_id)? else {
        return Err(ReceiveError::Unauthorized(format!(
            "no session {session_id:#x} of this server to join"
        )));
    };
    {
        let mut st = session.state()?;
        if st.streams_joined >= session.streams {
            return Err(ReceiveError::Protocol(format!(
                "more than the {} declared data streams",
                session.streams
            )));
        }
        st.streams_joined += 1;
    }
    Ok(session)
}

/// The async half of a joined data stream.
struct Stream<'a> {
    session: &'a Arc<Session>,
    idle: Duration,
    /// `None` once the agent has sent everything (or the applier stopped).
    apply_tx: Option<mpsc::Sender<Applying>>,
    ack_rx: mpsc::Receiver<Ack>,
}

impl Stream<'_> {
    async fn run(&mut self, rd: &mut Reader, wr: &mut Writer) -> Result<(), ReceiveError> {
        let session = self.session;
        loop {
            tokio::select! {
                biased;
                () = session.cancel.cancelled() => {
                    return if session.ended.load(Ordering::SeqCst) { Ok(()) } else { Err(session.cancel_reason()) };
                }
                ack = self.ack_rx.recv() => match ack {
                    Some(Ok(done)) => self.ack(wr, done).await?,
                    Some(Err(e)) => return Err(e),
                    None => return Ok(()),
                },
                f = tokio::time::timeout(self.idle, next_or_eof(rd)), if self.apply_tx.is_some() => match f {
                    // Silence is fine between frames, not in the middle of one.
                    Err(_) if stalled(rd) => return Err(ReceiveError::Timeout("data stream idle mid-transfer")),
                    Err(_) => continue,
                    Ok(Err(e)) => return Err(e),
                    Ok(Ok(None)) | Ok(Ok(Some(Frame::Goodbye))) => self.apply_tx = None,
                    Ok(Ok(Some(Frame::Block(b)))) => {
                        let seq = rd.decoder().last_seq();
                        self.queue(seq, Item::Block(b)).await?;
                    }
                    Ok(Ok(Some(Frame::ZeroRun(z)))) => {
                        let seq = rd.decoder().last_seq();
                        self.queue(seq, Item::Zeros(z)).await?;
                    }
                    Ok(Ok(Some(Frame::PartialBlock(p)))) => {
                        let seq = rd.decoder().last_seq();
                        self.queue(seq, Item::Partial(p)).await?;
                    }
                    Ok(Ok(Some(other))) => return Err(unexpected(&other, "Block")),
                },
            }
        }
    }

    /// Ack `seq` and every block applied since (acks are cumulative); an
    /// applier error queued behind them is returned after the ack is sent.
    async fn ack(
        &mut self,
        wr: &mut Writer,
        (mut seq, applied): (u64, Option<PartialAppliedFrame>),
    ) -> Result<(), ReceiveError> {
        if let Some(a) = applied {
            send_in(wr, &Frame::PartialApplied(a), self.session).await?;
        }
        let mut failed = None;
        while let Ok(more) = self.ack_rx.try_recv() {
            match more {
                Ok((s, applied)) => {
                    if let Some(a) = applied {
                        send_in(wr, &Frame::PartialApplied(a), self.session).await?;
                    }
                    seq = s;
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        send_in(wr, &Frame::Received { seq }, self.session).await?;
        failed.map_or(Ok(()), Err)
    }

    /// Hand a block to the applier once the session's in-flight byte budget
    /// has room for it (the applier gives its share back).
    async fn queue(&mut self, seq: u64, b: Item) -> Result<(), ReceiveError> {
        let session = self.session;
        session.check_tag(b.tag())?;
        // Before any memory is reserved for the block.
        let max = session.limits.max_uncommitted;
        if session.uncommitted.load(Ordering::SeqCst) >= max {
            return Err(ReceiveError::Protocol(format!(
                "the uncommitted points of this session wrote {max} bytes to packs, the most allowed"
            )));
        }
        let cost = b.cost();
        let permit = tokio::select! {
            p = session.inflight.clone().acquire_many_owned(cost) => match p {
                Ok(p) => p,
                Err(_) => return Err(session.cancel_reason()),
            },
            () = session.cancel.cancelled() => return Err(session.cancel_reason()),
        };
        let Some(tx) = self.apply_tx.as_ref() else {
            return Ok(());
        };
        if tx.send((seq, b, permit)).await.is_err() {
            // The applier stopped; its error is in the ack queue.
            self.apply_tx = None;
        }
        Ok(())
    }
}

/// Whether a silent data stream is stuck: it is in the middle of a frame.
/// Between frames silence is normal (an agent scanning a large disk may find
/// nothing to send for minutes); TCP keepalive finds dead peers.
fn stalled(rd: &Reader) -> bool {
    !rd.read_buffer().is_empty()
}

/// The blocking half of a data stream: verify, deduplicate, append to a pack,
/// record in the session, ack.
fn apply_loop(
    session: &Arc<Session>,
    store: &Store,
    mut rx: mpsc::Receiver<Applying>,
    ack: &mpsc::Sender<Ack>,
) {
    let mut decoder = match Decoder::new() {
        Ok(d) => d,
        Err(e) => {
            let _ = ack.blocking_send(Err(ReceiveError::storage(store.dir(), e)));
            return;
        }
    };
    let mut writer = store.take_writer();
    let mut buf = Vec::new();
    let mut merger: Option<Merger> = None;
    while let Some((seq, b, _permit)) = rx.blocking_recv() {
        let r = match b {
            Item::Block(b) => apply_one(session, store, &mut decoder, &mut writer, &mut buf, b)
                .map(|()| (seq, None)),
            Item::Zeros(z) => apply_zeros(session, &z).map(|()| (seq, None)),
            Item::Partial(p) => {
                let merged = match merger.as_mut() {
                    Some(m) => m.merge(session, store, &p),
                    None => {
                        Merger::new(store).and_then(|m| merger.insert(m).merge(session, store, &p))
                    }
                };
                merged.and_then(|(b, applied)| {
                    apply_one(session, store, &mut decoder, &mut writer, &mut buf, b)
                        .map(|()| (seq, Some(applied)))
                })
            }
        }
        .and_then(|out| session.spill().map(|()| out));
        let failed = r.is_err();
        if ack.blocking_send(r).is_err() || failed {
            break;
        }
    }
    session.retire_writer(writer);
}

/// Check a block against the session's volumes and its own hash, then store
/// it (or refer to a copy already stored) and record it.
fn apply_one(
    session: &Session,
    store: &Store,
    decoder: &mut Decoder,
    writer: &mut PackWriter,
    buf: &mut Vec<u8>,
    b: BlockFrame,
) -> Result<(), ReceiveError> {
    let Some(v) = session.volumes.get(usize::from(b.volume)) else {
        return Err(ReceiveError::Protocol(format!(
            "block for undeclared volume {}",
            b.volume
        )));
    };
    let count = block_count(v.size, v.block_size);
    if b.index >= count {
        return Err(ReceiveError::Protocol(format!(
            "block index {} is out of range for volume {} ({count} blocks)",
            b.index, v.name
        )));
    }
    let expected = block_len(v.size, v.block_size, b.index);
    if b.raw_len != expected {
        return Err(ReceiveError::Protocol(format!(
            "block {} of volume {} is {} bytes; expected {expected}",
            b.index, v.name, b.raw_len
        )));
    }
    decoder
        .verify(b.encoding, &b.payload, b.raw_len, &b.hash, buf)
        .map_err(|source| ReceiveError::BadBlock {
            volume: v.name.clone(),
            index: b.index,
            source,
        })?;
    let r = BlockRef {
        volume: b.volume,
        index: b.index,
        raw_len: b.raw_len,
        hash: (b.encoding != Encoding::Zero).then_some(b.hash),
    };
    metrics::counter!("pilotlight_receiver_bytes_received_total").increment(u64::from(b.raw_len));
    if b.encoding == Encoding::Zero {
        return session.record(b.tag, r, None);
    }
    {
        let _gate = store.index_read()?;
        // Under the default scope a block counts as stored only if this
        // server stored it: a copy of another server's is written and
        // fsynced like a new block, so timing tells nothing about it.
        let stored = store
            .find(session.server_id, &b.hash, session.limits.dedup)?
            .is_some();
        if stored || !session.claim(&b.hash, b.tag)? {
            // Recorded while the index is held: a garbage collection either
            // sees this reference among the session's pins or has already
            // taken the block out of the index (and then it is written anew).
            return session.record(b.tag, r, None);
        }
        check_room(
            session,
            store.owners().used(session.server_id),
            b.payload.len() as u64,
        )?;
    }
    let (loc, pack) = writer.append(&b.hash, b.encoding, b.raw_len, &b.payload, || {
        store.alloc_pack_id()
    })?;
    session
        .uncommitted
        .fetch_add(u64::from(loc.stored_len), Ordering::SeqCst);
    metrics::counter!("pilotlight_receiver_bytes_stored_total")
        .increment(u64::from(loc.stored_len));
    session.record(b.tag, r, Some((b.hash, loc, pack.file)))
}

/// Check a run of zero blocks against its volume (its block count; the
/// session checks the point's block cap) and record it as one run.
fn apply_zeros(session: &Session, z: &ZeroRunFrame) -> Result<(), ReceiveError> {
    let Some(v) = session.volumes.get(usize::from(z.volume)) else {
        return Err(ReceiveError::Protocol(format!(
            "zero run for undeclared volume {}",
            z.volume
        )));
    };
    let count = block_count(v.size, v.block_size);
    if z.count == 0 || z.first >= count || z.end() > count {
        return Err(ReceiveError::Protocol(format!(
            "zero run of blocks {}..{} is out of range for volume {} ({count} blocks)",
            z.first,
            z.end(),
            v.name
        )));
    }
    metrics::counter!("pilotlight_receiver_zero_runs_total").increment(1);
    session.record_zeros(z)
}

/// Refuse to write `len` more pack bytes for `session` past its cap on
/// uncommitted bytes or its server's quota (`used`: what the server's
/// committed blocks take).
fn check_room(session: &Session, used: u64, len: u64) -> Result<(), ReceiveError> {
    let pending = session.uncommitted.load(Ordering::SeqCst);
    let limits = &session.limits;
    if pending.saturating_add(len) > limits.max_uncommitted {
        return Err(ReceiveError::Protocol(format!(
            "the uncommitted points of this session would write more than {} bytes to packs",
            limits.max_uncommitted
        )));
    }
    match limits.quota {
        Some(quota) if used.saturating_add(pending).saturating_add(len) > quota => {
            Err(ReceiveError::QuotaExceeded {
                server: session.server.clone(),
                used: used.saturating_add(pending),
                needed: len,
                quota,
            })
        }
        _ => Ok(()),
    }
}
