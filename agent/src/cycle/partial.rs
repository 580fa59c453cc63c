//! Partial blocks on the agent's side (issue 19): which planned blocks go
//! as their written pages, and the new hashes the receiver gives back.
//!
//! A block goes as pages (`PartialBlock`) only over a base the receiver
//! committed: the receiver must advertise `FEATURE_PARTIAL`, no full sync
//! may be under way (its checkpoints put hashes of no point in the hash
//! files), no session may have ended with partial blocks unconfirmed since
//! the last durable point (the receiver may have refused one), and the
//! block itself must not be in a point sent and not yet durable, nor sent
//! already by this point (its content there is not the committed one).
//! Anything else is read whole: correctness over bytes. Blocks left whole
//! here are left whole before the frozen delta is captured, so the memory
//! file holds every byte the scan reads.
//!
//! The scan records a partial block's hash as
//! [`MERGED_LATER`](crate::scan::MERGED_LATER); the receiver answers each
//! `PartialBlock` with `PartialApplied` (kept by the link) before the
//! `Received` that covers it, so once every frame sent is acknowledged
//! (a barrier) every answer is in. A point's `DURABLE` waits for that
//! barrier, then resolves its partial blocks' hashes before they reach the
//! durable hashes; one the receiver never answered is a protocol error (the
//! next session then fetches the receiver's own hashes).

use std::collections::{BTreeMap, HashMap};

use pilotlight_protocol::frame::ErrorCode;
use pilotlight_protocol::BlockHash;

use super::Point;
use crate::scan::{PartialRead, MERGED_LATER};
use crate::session::{Pending, Session};
use crate::trace::{Pages, Plan, PAGE};
use crate::AgentError;

/// What a point sent of one volume as pages: by block, its pages and its
/// base.
pub(super) type SentPages = HashMap<u64, (Pages, BlockHash)>;

/// Split a plan's blocks into those read whole and those read as pages
/// (over the base of `sent`, for a block this point sent as pages before).
pub(super) fn split(
    blocks: &[u64],
    pages: &BTreeMap<u64, Pages>,
    sent: Option<&SentPages>,
) -> (Vec<u64>, Vec<PartialRead>) {
    if pages.is_empty() {
        return (blocks.to_vec(), Vec::new());
    }
    let whole = blocks
        .iter()
        .copied()
        .filter(|b| !pages.contains_key(b))
        .collect();
    let partial = pages
        .iter()
        .map(|(&index, &pages)| PartialRead {
            index,
            pages,
            base: sent.and_then(|s| s.get(&index)).map(|e| e.1),
        })
        .collect();
    (whole, partial)
}

/// The pages of a block this point sent as pages, added to `pages`; false
/// if the block is now to be read whole.
fn with_earlier(pages: &mut Pages, earlier: &Pages, per_block: u16) -> bool {
    earlier
        .runs()
        .iter()
        .all(|&(a, e)| pages.add(a, e, per_block))
}

impl Session<'_> {
    /// Whether this point may send partial blocks at all.
    fn partial_allowed(&self, point: &Point) -> bool {
        self.agent.cfg.partial_blocks
            && self.link.partial
            && point.sync.is_none()
            && self.sync_tag.is_none()
            && !self.resumed
            && self
                .agent
                .collector
                .get()
                .is_some_and(|t| t.partial_allowed())
    }

    /// Keep the pages of the planned blocks that may go as partial blocks
    /// of `point`; the others are read whole.
    pub(super) fn keep_pages(&self, plans: &mut [Plan], point: &Point) {
        let allowed = self.partial_allowed(point);
        // Points from this tag on are not durable (the oldest pending, or
        // this one).
        let open = self
            .pending
            .front()
            .map_or(point.tag, |p| p.tag.min(point.tag));
        for (i, plan) in plans.iter_mut().enumerate() {
            let Plan::Blocks(_, pages) = plan else {
                continue;
            };
            let (Some(v), Some(view), true) = (self.vols.get(i), self.view.get(i), allowed) else {
                pages.clear();
                continue;
            };
            let whole_blocks = v.size / u64::from(v.block_size);
            let per_block = u16::try_from(u64::from(v.block_size) / PAGE).unwrap_or(0);
            let sent = point.pages_sent.get(i);
            pages.retain(|&b, p| {
                if b >= whole_blocks {
                    return false;
                }
                match view.sent(b) {
                    None => true,
                    Some((hash, tag)) if tag < open => hash != MERGED_LATER,
                    Some((hash, tag)) if tag == point.tag && hash == MERGED_LATER => sent
                        .and_then(|s| s.get(&b))
                        .is_some_and(|(earlier, _)| with_earlier(p, earlier, per_block)),
                    Some(_) => false,
                }
            });
        }
    }

    /// Record what a scan of volume `i` sent as pages for `point`.
    pub(super) fn note_pages_sent(point: &mut Point, i: usize, sent: Vec<(u64, Pages, BlockHash)>) {
        if sent.is_empty() {
            return;
        }
        if point.pages_sent.len() <= i {
            point.pages_sent.resize_with(i + 1, SentPages::new);
        }
        if let Some(m) = point.pages_sent.get_mut(i) {
            for (b, pages, base) in sent {
                m.insert(b, (pages, base));
            }
        }
    }

    /// Before `p`'s `DURABLE` is taken: the new hashes of its partial
    /// blocks, from the receiver's answers. Every frame sent is
    /// acknowledged first (a barrier): `DURABLE` may overtake the answers
    /// on their data streams, and a block sent as pages twice in the point
    /// must take the later answer, never an earlier one already in.
    pub(crate) async fn resolve_partial(&mut self, p: &mut Pending) -> Result<(), AgentError> {
        if p.partial == 0 {
            return Ok(());
        }
        self.link.barrier().await?;
        if self.try_resolve(p) {
            return Ok(());
        }
        Err(AgentError::Protocol(format!(
            "point {} is durable without the new hash of each of its partial blocks",
            p.tag
        )))
    }

    /// Replace each [`MERGED_LATER`] of `p` by the receiver's answer, in
    /// its changes and in the view; whether none is left. (A block sent as
    /// pages twice in a point has the later answer: the pre-copy barrier
    /// ordered them.)
    fn try_resolve(&mut self, p: &mut Pending) -> bool {
        let mut left = 0;
        for (i, changes) in p.changes.iter_mut().enumerate() {
            let vol = u16::try_from(i).unwrap_or(u16::MAX);
            for (index, hash) in changes.iter_mut().filter(|c| c.1 == MERGED_LATER) {
                match self.link.learned(p.tag, vol, *index) {
                    Some(h) => {
                        *hash = h;
                        if let Some(view) = self.view.get_mut(i) {
                            view.resolve(p.tag, *index, h);
                        }
                    }
                    None => left += 1,
                }
            }
        }
        if left == 0 {
            self.link.forget_learned(p.tag);
        }
        left == 0
    }

    /// Whether partial blocks were sent and are not confirmed by a durable
    /// point.
    fn partial_in_doubt(&self) -> bool {
        self.partial_tag > self.durable_tag
    }

    /// A session ending with `e`: with partial blocks in doubt, the next
    /// sends whole blocks until a point is durable, and a refusal by the
    /// receiver (which may be of a partial block: its base missing, a merge
    /// that failed) is worth reconnecting for.
    pub(crate) fn partial_fallback(&mut self, e: AgentError) -> AgentError {
        if !self.partial_in_doubt() {
            return e;
        }
        if let Some(t) = self.agent.collector.get_mut() {
            t.pause_partial();
        }
        match e {
            AgentError::Remote {
                code: ErrorCode::Protocol,
                message,
            } => AgentError::PartialRefused(message),
            e => e,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_round_adds_the_earlier_pages() {
        let mut p = Pages::one(4, 5);
        assert!(with_earlier(&mut p, &Pages::one(1, 2), 16));
        assert_eq!(p.runs(), [(1, 2), (4, 5)]);
        let mut p = Pages::one(0, 6);
        assert!(
            !with_earlier(&mut p, &Pages::one(8, 11), 16),
            "over half: whole"
        );
    }

    #[test]
    fn blocks_with_pages_go_apart() {
        let mut pages = BTreeMap::new();
        pages.insert(4, Pages::one(1, 2));
        let (whole, partial) = split(&[1, 4, 9], &pages, None);
        assert_eq!(whole, [1, 9]);
        assert_eq!(
            partial,
            [PartialRead {
                index: 4,
                pages: Pages::one(1, 2),
                base: None,
            }]
        );
        // Sent as pages before in the same point: over the same base.
        let mut sent = SentPages::new();
        sent.insert(4, (Pages::one(0, 1), BlockHash([4; 32])));
        let (_, partial) = split(&[4], &pages, Some(&sent));
        assert_eq!(partial[0].base, Some(BlockHash([4; 32])));
        let (whole, partial) = split(&[1, 4], &BTreeMap::new(), None);
        assert_eq!(whole, [1, 4]);
        assert!(partial.is_empty());
    }
}
