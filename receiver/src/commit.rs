//! The committer: turns a point whose blocks have all arrived into a durable
//! catalog point. It takes plain data (the session and the `EndPoint`
//! values) and does no socket I/O, so it is unit-tested without a network.
//!
//! # Commit order
//!
//! The durability contract, in this order and nowhere else:
//!
//! 1. **pack fsync**: `fdatasync` of every pack this point appended to
//!    ([`sync_packs`]), then, with an object store, what the point added
//!    to them sealed and in the bucket ([`crate::objstore::seal_packs`]:
//!    while the store is unreachable the point waits here);
//! 2. **directory fsync**: the `packs/` directory entry of each new pack,
//!    which `PackWriter` fsyncs when it creates the pack, before any record
//!    that a point could reference is written to it;
//! 3. **SQLite commit**: in the catalog's next group commit
//!    ([`crate::catalog::Group`]: the points of other servers waiting at
//!    the same time share its transaction and its WAL fsync, each in a
//!    savepoint of its own), the identity is re-checked (a revoked or
//!    superseded identity commits nothing more), and so is the server's
//!    quota (a point that would pass it commits nothing), then the point's
//!    rows are written, with that its server has stored each of its blocks
//!    (`server_blocks`); once that transaction is durable, the committed
//!    blocks enter the in-memory index and the server's owned blocks
//!    ([`record_point`]);
//!    With an object store, what the transaction changed in the catalog
//!    then goes to the bucket's journal ([`crate::objstore::committed`]),
//!    so that a rebuild has the point;
//! 4. **`DURABLE` ack**: sent by the connection once [`Committer::commit`]
//!    returns;
//! 5. **staging**: the connection then asks the staging task
//!    ([`crate::staging`]) to bring the server's images up to the point.
//!
//! A crash after any step leaves every acknowledged point restorable:
//! unfinished pack tails are cut and staging images repaired when the store
//! is next opened to serve.
//!
//! # Whose clock
//!
//! A point's `created` is the receiver's clock when its transaction is
//! recorded (step 3): retention and `restore --at` go by it, so an agent
//! whose clock is wrong, or lies, cannot age its own history out. The time
//! in `EndPoint` is kept beside it as the point's `source_ms`, and a skew
//! over `max_clock_skew_secs` is logged once per session.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};

use pilotlight_protocol::clock::now_ms;

use pilotlight_protocol::frame::{CommitMode, Consistency};

use crate::catalog::{Catalog, NewPoint};
use crate::handshake::still_authorized;
use crate::session::{PendingPoint, Session, SessionState};
use crate::store::{blocking, pack_file, Store};
use crate::ReceiveError;

/// A point made durable: its catalog key (internal) and its number among
/// its server's points (what the agent is told).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Committed {
    /// The catalog's key of the point.
    pub(crate) key: i64,
    /// The point's number among its server's points.
    pub(crate) seq: i64,
}

/// What the agent's `EndPoint` frame says about a point.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EndPoint {
    /// The point's tag in the session.
    pub(crate) tag: u64,
    /// How many blocks the agent sent for it.
    pub(crate) blocks: u64,
    /// When the agent says it took the point, by its clock (ms since the
    /// epoch): recorded as the point's `source_ms`, never as its time.
    pub(crate) created_ms: i64,
    /// How the point was made consistent.
    pub(crate) consistency: Consistency,
    /// The commit mode the point was sent under.
    pub(crate) commit: CommitMode,
}

/// Makes points durable in the store (steps 1 to 3 of the commit order).
pub(crate) struct Committer {
    store: Arc<Store>,
    /// How long to wait without progress for a point's blocks.
    idle: Duration,
    /// The agent's clock may differ from ours by this much before we warn.
    max_skew: Duration,
    /// Whether this committer (one per session) has warned of the skew.
    skew_warned: AtomicBool,
}

impl Committer {
    /// A committer into `store` that gives up on a point whose blocks stop
    /// arriving for `idle`.
    pub(crate) fn new(store: Arc<Store>, idle: Duration) -> Self {
        Self {
            store,
            idle,
            max_skew: crate::config::ReceiverConfig::default().max_clock_skew(),
            skew_warned: AtomicBool::new(false),
        }
    }

    /// Warn when an agent's clock is off ours by more than `max_skew`.
    pub(crate) fn with_max_clock_skew(mut self, max_skew: Duration) -> Self {
        self.max_skew = max_skew;
        self
    }

    /// Wait for all of the point's blocks on all of the session's data
    /// streams, then make it durable.
    pub(crate) async fn commit(
        &self,
        session: &Arc<Session>,
        end: EndPoint,
    ) -> Result<Committed, ReceiveError> {
        if end.tag != session.state()?.committed_tag + 1 {
            return Err(ReceiveError::Protocol(format!(
                "EndPoint for tag {} out of order",
                end.tag
            )));
        }
        let pending = self.gather(session, end).await?;
        let store = self.store.clone();
        let s = session.clone();
        let started = Instant::now();
        let blocks = end.blocks;
        let (point, created_ms) = blocking(move || {
            sync_packs(&store, &pending)?;
            let done = record_point(&store, &s, end, &pending)?;
            crate::objstore::committed(store.dir(), &store.open_packs())?;
            Ok(done)
        })
        .await
        .inspect_err(|e| {
            if matches!(e, ReceiveError::QuotaExceeded { .. }) {
                // The data streams close with this error too, not as if
                // a newer session had taken over.
                session.fail(e);
            }
        })?;
        tracing::info!(server = %session.server, point = point.seq, key = point.key, tag = end.tag, blocks, "point durable");
        self.check_skew(session, end.created_ms, created_ms);
        metrics::counter!("pilotlight_receiver_points_total").increment(1);
        metrics::histogram!("pilotlight_receiver_commit_seconds")
            .record(started.elapsed().as_secs_f64());
        Ok(point)
    }

    /// Log (once per session) an agent clock off the receiver's by more
    /// than the limit; `status` shows the skew of every server's last point.
    fn check_skew(&self, session: &Session, source_ms: i64, created_ms: i64) {
        let skew_ms = source_ms.saturating_sub(created_ms);
        let limit = i64::try_from(self.max_skew.as_millis()).unwrap_or(i64::MAX);
        if skew_ms.saturating_abs() > limit && !self.skew_warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                server = %session.server,
                skew_seconds = skew_ms / 1000,
                agent_time = %pilotlight_protocol::clock::rfc3339(source_ms),
                receiver_time = %pilotlight_protocol::clock::rfc3339(created_ms),
                "the agent's clock is off the receiver's; points are dated by the receiver"
            );
        }
    }

    /// Wait until every block of the point has been recorded, then move it
    /// from `pending` to `committing`.
    async fn gather(
        &self,
        session: &Session,
        end: EndPoint,
    ) -> Result<Arc<PendingPoint>, ReceiveError> {
        let EndPoint { tag, blocks, .. } = end;
        loop {
            let notified = session.progress.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = session.state()?;
                let received = st.pending.get(&tag).map_or(0, |p| p.received);
                if received > blocks {
                    return Err(ReceiveError::Protocol(format!(
                        "point tag {tag} announced {blocks} blocks but {received} arrived"
                    )));
                }
                // A part of the point being spilled is in neither the
                // point nor its sync yet.
                if received == blocks && !st.spilling(tag) {
                    let p = Arc::new(st.pending.remove(&tag).unwrap_or_default());
                    st.committing.insert(tag, p.clone());
                    return Ok(p);
                }
            }
            tokio::select! {
                () = &mut notified => {}
                () = session.cancel.cancelled() => return Err(session.cancel_reason()),
                () = tokio::time::sleep(self.idle) => {
                    return Err(ReceiveError::Timeout("waiting for the blocks of a point"))
                }
            }
        }
    }
}

/// Step 1: the point's pack data on disk, then (with an object store) in
/// the bucket. Blocking.
pub(crate) fn sync_packs(store: &Store, pending: &PendingPoint) -> Result<(), ReceiveError> {
    for (id, (file, _)) in &pending.packs {
        file.sync_data()
            .map_err(|e| ReceiveError::storage(pack_file(store.dir(), *id), e))?;
    }
    let lens: Vec<(u64, u64, u64)> = pending
        .packs
        .iter()
        .map(|(id, (_, end))| (*id, store.committed_len(*id), *end))
        .collect();
    crate::objstore::seal_packs(store.dir(), &lens)
}

/// Step 3: in the catalog's next group commit, re-check the identity and
/// the quota and write the point (dated by the receiver's clock); once that
/// transaction is durable, index the new blocks and close the point in the
/// session. Returns the point and its time. Blocking.
fn record_point(
    store: &Arc<Store>,
    s: &Arc<Session>,
    end: EndPoint,
    pending: &Arc<PendingPoint>,
) -> Result<(Committed, i64), ReceiveError> {
    let volumes: Vec<(String, u32, u64)> = s
        .volumes
        .iter()
        .map(|v| (v.name.clone(), v.block_size, v.size))
        .collect();
    let packs = pack_lens(pending);
    // The point completes the in-progress sync its session checkpointed
    // (or resumed); any other sync of the server is dropped by the commit.
    // (Only this session attaches a sync, and not while its point commits.)
    let merge_sync = s.state()?.sync.is_some_and(|a| a.tag == end.tag);
    let (store, s, pending) = (store.clone(), s.clone(), pending.clone());
    store.clone().write(move |cat| {
        authorize(cat, &s)?;
        let created_ms = now_ms();
        let volumes: Vec<(&str, u32, u64)> = volumes
            .iter()
            .map(|(n, b, z)| (n.as_str(), *b, *z))
            .collect();
        let (key, charged) = cat.commit_point_charged(&NewPoint {
            server_id: s.server_id,
            created_ms,
            source_ms: end.created_ms,
            consistency: end.consistency.label(),
            commit: end.commit.label(),
            volumes: &volumes,
            blocks: &pending.refs,
            zero_runs: &pending.zero_runs,
            new_blocks: &pending.new_blocks,
            packs: &packs,
            merge_sync,
        })?;
        // Past the quota: the job fails, and its savepoint takes the rows back.
        check_quota(&store, &s, charged)?;
        let point = Committed {
            key,
            seq: cat.point_seq(key)?,
        };
        Ok(move || {
            let mut st = settle(&store, &s, &pending, &packs, charged)?;
            st.committed_tag = end.tag;
            st.committing.remove(&end.tag);
            st.sync = None;
            Ok((point, created_ms))
        })
    })?
}

/// `(pack id, durable length)` of the packs a session's blocks went to.
pub(crate) fn pack_lens(pending: &PendingPoint) -> Vec<(u64, u64)> {
    pending
        .packs
        .iter()
        .map(|(id, (_, end))| (*id, *end))
        .collect()
}

/// Inside the transaction that records what a session received (a point's
/// or a checkpoint's): the identity must still be good (one revoked or
/// superseded while the session ran records nothing more).
pub(crate) fn authorize(cat: &Catalog, s: &Session) -> Result<(), ReceiveError> {
    if !still_authorized(cat.server(&s.server)?.as_ref(), &s.serial) {
        return Err(ReceiveError::Unauthorized(format!(
            "the identity of server {} was revoked or superseded",
            s.server
        )));
    }
    Ok(())
}

/// Once that transaction is durable (the catalog still held by the group
/// commit): the new blocks' locations and the server's ownership into the
/// index's cache, what the transaction `charged` into the server's usage,
/// note the packs' committed lengths, give back the session's uncommitted
/// bytes and forget the hashes it held pending. Returns the session's state
/// for the caller's own bookkeeping.
pub(crate) fn settle<'a>(
    store: &Store,
    s: &'a Session,
    pending: &PendingPoint,
    packs: &[(u64, u64)],
    charged: u64,
) -> Result<MutexGuard<'a, SessionState>, ReceiveError> {
    store.index_blocks(&pending.new_blocks)?;
    let hashes = pending.refs.iter().filter_map(|r| r.hash.as_ref());
    store.index().owned(s.server_id, hashes)?;
    store.owners().charge(s.server_id, charged)?;
    store.note_committed(packs)?;
    let written: u64 = pending
        .new_blocks
        .iter()
        .map(|(_, l)| u64::from(l.stored_len))
        .sum();
    let _ = s
        .uncommitted
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
            Some(n.saturating_sub(written))
        });
    let mut st = s.state()?;
    for (h, _) in &pending.new_blocks {
        st.pending_hashes.remove(h);
    }
    Ok(st)
}

/// Refuse the point if what it adds to its server's stored blocks
/// (`charged`: counted by its own transaction, blocks it shares with other
/// servers too) would pass the server's quota. Called inside that
/// transaction (the group commit holds the catalog, so that the usage
/// cannot change under it), which an error rolls back. Blocking.
pub(crate) fn check_quota(store: &Store, s: &Session, charged: u64) -> Result<(), ReceiveError> {
    let Some(quota) = s.limits.quota else {
        return Ok(());
    };
    let used = store.owners().used(s.server_id);
    if used.saturating_add(charged) > quota {
        return Err(ReceiveError::QuotaExceeded {
            server: s.server.clone(),
            used,
            needed: charged,
            quota,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
