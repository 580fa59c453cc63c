//! Checkpoints of a full sync: the blocks an agent has sent so far for its
//! initial sync or rescan made durable as the server's in-progress sync
//! (`catalog::syncs`), so that a killed agent or receiver does not make the
//! agent start over. An in-progress sync is never a point.
//!
//! # Checkpoint order
//!
//! The commit order of [`crate::commit`], with the in-progress sync in
//! place of the point:
//!
//! 1. **pack fsync** of every pack the blocks since the last checkpoint
//!    were appended to (their directory entries were synced when the packs
//!    were created);
//! 2. **SQLite commit**: identity and quota re-checked, then one
//!    transaction records the blocks in `sync_blocks`, the new blocks'
//!    locations, the server's stored blocks and the packs' committed
//!    lengths; the blocks enter the in-memory index;
//! 3. **`Checkpointed`** to the agent, which only then records the
//!    checkpoint on its side.
//!
//! The point's `EndPoint` later commits the rest, and the sync becomes part
//! of that point in the same transaction.
//!
//! The receiver takes the same path on its own ([`spill`]) to bound the
//! memory of a point that no agent checkpoints: see `Session::spill`. Such
//! a sync is the receiver's alone (`AttachedSync::spilled`); an agent's
//! `Checkpoint` of the point continues it and makes it the agent's, and the
//! receiver never spills into an agent's sync.

use std::sync::Arc;
use std::time::Duration;

use pilotlight_protocol::clock::now_ms;
use pilotlight_protocol::Frame;

use crate::catalog::{volumes_signature, NewCheckpoint};
use crate::commit::{authorize, check_quota, pack_lens, settle, sync_packs};
use crate::session::{AttachedSync, PendingPoint, Session};
use crate::store::{blocking, Store};
use crate::ReceiveError;

/// What the agent's `Checkpoint` frame asks.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CheckpointRequest {
    /// The full sync's point tag.
    pub(crate) tag: u64,
    /// Blocks of that point sent so far (since its start).
    pub(crate) blocks: u64,
    /// Bytes the agent has read.
    pub(crate) done: u64,
    /// Bytes it reads in all.
    pub(crate) total: u64,
}

/// Make the blocks of `req` durable as the server's in-progress sync;
/// returns the `Checkpointed` answer. `idle`: how long to wait without
/// progress for the blocks announced.
pub(crate) async fn checkpoint(
    store: &Arc<Store>,
    idle: Duration,
    session: &Arc<Session>,
    req: CheckpointRequest,
) -> Result<Frame, ReceiveError> {
    if req.tag != session.state()?.committed_tag + 1 {
        return Err(ReceiveError::Protocol(format!(
            "Checkpoint for tag {} out of order",
            req.tag
        )));
    }
    let part = take_received(session, req, idle).await?;
    let (st, s) = (store.clone(), session.clone());
    let p = part.clone();
    let result = blocking(move || {
        sync_packs(&st, &p)?;
        record(&st, &s, req, &p)
    })
    .await;
    session.state()?.committing.remove(&req.tag);
    let (sync, generation) = result.inspect_err(|e| {
        if matches!(e, ReceiveError::QuotaExceeded { .. }) {
            session.fail(e);
        }
    })?;
    tracing::info!(server = %session.server, tag = req.tag, sync = format_args!("{sync:016x}"), generation, done = req.done, total = req.total, "checkpoint durable");
    metrics::counter!("pilotlight_receiver_checkpoints_total").increment(1);
    Ok(Frame::Checkpointed {
        tag: req.tag,
        sync,
        generation,
    })
}

/// Wait until the point has received `req.blocks` blocks, then take what
/// arrived since the last checkpoint out of it (the point keeps its count).
async fn take_received(
    session: &Session,
    req: CheckpointRequest,
    idle: Duration,
) -> Result<Arc<PendingPoint>, ReceiveError> {
    loop {
        let notified = session.progress.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        {
            let mut st = session.state()?;
            let received = st.pending.get(&req.tag).map_or(0, |p| p.received);
            let spilling = st.spilling(req.tag);
            if received > req.blocks {
                return Err(ReceiveError::Protocol(format!(
                    "checkpoint of tag {} announced {} blocks but {received} arrived",
                    req.tag, req.blocks
                )));
            }
            if received == req.blocks && !spilling {
                let p = st.pending.entry(req.tag).or_default();
                // A checkpoint keeps blocks, not runs: an agent sends the
                // zero blocks of a checkpointed sync as blocks.
                if !p.zero_runs.is_empty() {
                    return Err(ReceiveError::Protocol(format!(
                        "checkpoint of tag {} after ZeroRun frames: a checkpointed sync sends zero blocks as blocks",
                        req.tag
                    )));
                }
                let part = Arc::new(PendingPoint {
                    refs: std::mem::take(&mut p.refs),
                    new_blocks: std::mem::take(&mut p.new_blocks),
                    packs: std::mem::take(&mut p.packs),
                    received,
                    zero_runs: Vec::new(),
                });
                st.committing.insert(req.tag, part.clone());
                return Ok(part);
            }
        }
        tokio::select! {
            () = &mut notified => {}
            () = session.cancel.cancelled() => return Err(session.cancel_reason()),
            () = tokio::time::sleep(idle) => {
                return Err(ReceiveError::Timeout("waiting for the blocks of a checkpoint"))
            }
        }
    }
}

/// Step 2 of the checkpoint order. Blocking.
fn record(
    store: &Arc<Store>,
    s: &Arc<Session>,
    req: CheckpointRequest,
    part: &Arc<PendingPoint>,
) -> Result<(u64, u64), ReceiveError> {
    keep(store, s, req, part, false)
}

/// The receiver's own checkpoint of point `tag` (see
/// [`Session::spill`]): `part` (taken out of the point) made durable in
/// the order of an agent's, with no `Checkpointed` to send. The sync keeps
/// the agent's progress figures of its last checkpoint, if it had one.
/// Blocking.
pub(crate) fn spill(
    store: &Arc<Store>,
    s: &Arc<Session>,
    tag: u64,
    part: &Arc<PendingPoint>,
) -> Result<(), ReceiveError> {
    sync_packs(store, part)?;
    let progress = store.catalog()?.sync_of(s.server_id)?;
    let (done, total) = match (s.state()?.sync, progress) {
        (Some(a), Some(row)) if row.sync_id == a.id => (row.done_bytes, row.total_bytes),
        _ => (0, 0),
    };
    let req = CheckpointRequest {
        tag,
        blocks: part.received,
        done,
        total,
    };
    let (sync, generation) = keep(store, s, req, part, true)?;
    tracing::debug!(server = %s.server, tag, sync = format_args!("{sync:016x}"), generation, refs = part.refs.len(), "point spilled to the catalog");
    metrics::counter!("pilotlight_receiver_spills_total").increment(1);
    Ok(())
}

/// Record `part` in the server's in-progress sync (the one attached to the
/// session, or a new one) and attach it to point `req.tag`; `spilled`: the
/// receiver's own checkpoint, which the agent is not told of. Its rows go
/// in the catalog's next group commit. Blocking.
fn keep(
    store: &Arc<Store>,
    s: &Arc<Session>,
    req: CheckpointRequest,
    part: &Arc<PendingPoint>,
    spilled: bool,
) -> Result<(u64, u64), ReceiveError> {
    let packs = pack_lens(part);
    let volumes = signature(s);
    let sizes: Vec<(u32, u64)> = s.volumes.iter().map(|v| (v.block_size, v.size)).collect();
    let (store, s, part) = (store.clone(), s.clone(), part.clone());
    store.clone().write(move |cat| {
        authorize(cat, &s)?;
        let attached = s.state()?.sync;
        let base_seq = cat.latest_seq(s.server_id)?;
        let (id, generation, charged) = cat.checkpoint_charged(&NewCheckpoint {
            server_id: s.server_id,
            continues: attached.map(|a| a.id),
            new_id: rand::random::<u64>().max(1),
            base_seq,
            now_ms: now_ms(),
            done_bytes: req.done,
            total_bytes: req.total,
            volumes: &volumes,
            blocks: &part.refs,
            zero_runs: &part.zero_runs,
            sizes: &sizes,
            new_blocks: &part.new_blocks,
            packs: &packs,
        })?;
        check_quota(&store, &s, charged)?;
        Ok(move || {
            let mut st = settle(&store, &s, &part, &packs, charged)?;
            st.sync = Some(AttachedSync {
                id,
                tag: req.tag,
                spilled,
            });
            Ok((id, generation))
        })
    })?
}

/// The session's volumes as a sync records them.
fn signature(s: &Session) -> String {
    volumes_signature(
        s.volumes
            .iter()
            .map(|v| (v.name.as_str(), v.block_size, v.size)),
    )
}

/// The answer to `Resume`: the server's in-progress sync, attached to the
/// session's first point when the agent holds one of its checkpoints and
/// nothing changed under it (same base point, same volumes).
pub(crate) async fn resume(
    store: &Arc<Store>,
    session: &Arc<Session>,
    sync: u64,
    generation: u64,
) -> Result<Frame, ReceiveError> {
    {
        let st = session.state()?;
        if st.committed_tag != 0 || !st.pending.is_empty() || st.sync.is_some() {
            return Err(ReceiveError::Protocol(
                "Resume after the session's first point began".into(),
            ));
        }
    }
    let (st, server_id) = (store.clone(), session.server_id);
    let (row, latest) = blocking(move || {
        let cat = st.catalog()?;
        Ok::<_, ReceiveError>((cat.sync_of(server_id)?, cat.latest_seq(server_id)?))
    })
    .await?;
    let Some(row) = row else {
        return Ok(Frame::SyncState {
            sync: 0,
            generation: 0,
            done: 0,
            total: 0,
            resumed: false,
        });
    };
    let resumed = sync != 0
        && row.sync_id == sync
        && row.generation >= generation
        && row.base_seq == latest
        && row.volumes == signature(session);
    if resumed {
        session.state()?.sync = Some(AttachedSync {
            id: sync,
            tag: 1,
            spilled: false,
        });
        tracing::info!(server = %session.server, sync = format_args!("{sync:016x}"), generation = row.generation, "the agent resumes its sync");
    }
    Ok(Frame::SyncState {
        sync: row.sync_id,
        generation: row.generation,
        done: row.done_bytes.min(row.total_bytes),
        total: row.total_bytes,
        resumed,
    })
}
