//! What a cycle reads of each volume, why a volume is read in full, and
//! what a point sent but not yet durable took.

use std::collections::BTreeMap;

use roaring::RoaringTreemap;

use super::Pages;

/// Why a volume must be read in full before its next point. Its
/// [`Display`](std::fmt::Display) is the sentence the status and the logs
/// show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RescanReason {
    /// The receiver has nothing of the volume.
    InitialSync,
    /// Tracking started without a saved dirty set: the first start, or the
    /// agent did not stop cleanly.
    NoSavedDirtySet,
    /// The saved dirty set is stale: the device was written (or is another
    /// one) since the agent stopped.
    WrittenWhileStopped,
    /// The kernel dropped trace events (the trace buffer overran).
    LostEvents,
    /// The point of a full scan was not made durable.
    FullScanNotDurable,
    /// The agent's hashes do not match the receiver's (checksum resync).
    ChecksumResync,
}

impl RescanReason {
    /// The sentence shown in the status and the logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InitialSync => "initial sync",
            Self::NoSavedDirtySet => "tracking started without a saved dirty set (first start, or the agent did not stop cleanly)",
            Self::WrittenWhileStopped => "the device was written (or changed) while the agent was stopped",
            Self::LostEvents => "trace events were lost (the trace buffer overran)",
            Self::FullScanNotDurable => "the point of a full scan was not made durable",
            Self::ChecksumResync => "the local state does not match the receiver (checksum resync)",
        }
    }
}

impl std::fmt::Display for RescanReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a cycle reads of one volume.
#[derive(Debug, Clone)]
pub enum Plan {
    /// Every block (initial sync, lost events, unclean stop...).
    Full(RescanReason),
    /// Only these blocks, ascending; of those, the ones in the map were
    /// written only in these pages (see [`Dirty`](super::Dirty)).
    Blocks(Vec<u64>, BTreeMap<u64, Pages>),
}

impl Plan {
    /// Whether it reads nothing.
    pub fn is_empty(&self) -> bool {
        matches!(self, Self::Blocks(b, _) if b.is_empty())
    }
}

/// What one point took of one volume.
#[derive(Debug, Default)]
pub(super) struct Taken {
    /// Dirty blocks read for it.
    pub(super) set: RoaringTreemap,
    /// Whether the volume was scanned in full for it.
    pub(super) full: bool,
}

/// What one point sent but not yet durable took of each volume.
#[derive(Debug, Default)]
pub(super) struct InFlight {
    /// By volume, in the order tracking numbers them.
    pub(super) volumes: Vec<Taken>,
    /// When its oldest write (or unknown change) happened.
    pub(super) first: Option<i64>,
}

impl InFlight {
    /// Add what a plan took of volume `i` (volumes are added in order; a
    /// second plan for the same point adds to the first).
    pub(super) fn add(&mut self, i: usize, set: RoaringTreemap, full: bool) {
        match self.volumes.get_mut(i) {
            Some(t) => {
                t.set |= set;
                t.full |= full;
            }
            None => self.volumes.push(Taken { set, full }),
        }
    }
}

/// The earlier of two optional times.
pub(super) fn min_opt(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_read_as_before() {
        // The status and the logs show these sentences; tests/trace.rs looks
        // for "lost".
        let cases = [
            (RescanReason::InitialSync, "initial sync"),
            (
                RescanReason::NoSavedDirtySet,
                "tracking started without a saved dirty set (first start, or the agent did not stop cleanly)",
            ),
            (
                RescanReason::WrittenWhileStopped,
                "the device was written (or changed) while the agent was stopped",
            ),
            (
                RescanReason::LostEvents,
                "trace events were lost (the trace buffer overran)",
            ),
            (
                RescanReason::FullScanNotDurable,
                "the point of a full scan was not made durable",
            ),
            (
                RescanReason::ChecksumResync,
                "the local state does not match the receiver (checksum resync)",
            ),
        ];
        for (reason, text) in cases {
            assert_eq!(reason.to_string(), text);
        }
    }

    #[test]
    fn min_opt_takes_the_earlier_known_time() {
        let cases = [
            (None, None, None),
            (Some(3), None, Some(3)),
            (None, Some(4), Some(4)),
            (Some(5), Some(2), Some(2)),
        ];
        for (a, b, want) in cases {
            assert_eq!(min_opt(a, b), want, "{a:?} {b:?}");
        }
    }

    #[test]
    fn a_second_plan_adds_to_the_same_point() {
        let mut p = InFlight::default();
        p.add(0, RoaringTreemap::from_iter([1u64]), false);
        p.add(1, RoaringTreemap::new(), true);
        p.add(0, RoaringTreemap::from_iter([2u64]), false);
        p.add(1, RoaringTreemap::from_iter([9u64]), false);
        assert_eq!(p.volumes.len(), 2);
        assert_eq!(p.volumes[0].set.iter().collect::<Vec<_>>(), vec![1, 2]);
        assert!(!p.volumes[0].full);
        assert!(p.volumes[1].full);
    }
}
