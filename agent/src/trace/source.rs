//! What the bookkeeping needs of a tracer: the writes completed so far, per
//! volume, and whether any were lost. [`Tracer`](super::Tracer) is the real
//! source; the bookkeeping's unit tests use a fake one.

use roaring::RoaringTreemap;

use crate::AgentError;

/// A source of completed writes for the volumes tracked, numbered as they
/// were given to it.
pub trait EventSource {
    /// Bring in every write that completed before this call. Returns
    /// whether events were lost since the last call (then what
    /// [`take`](Self::take) returns is incomplete).
    fn sync(&mut self) -> Result<bool, AgentError>;

    /// Take the blocks of volume `volume` written since the last take, and
    /// when (ms since the epoch) the first of them was seen.
    fn take(&mut self, volume: usize) -> (RoaringTreemap, Option<i64>);
}
