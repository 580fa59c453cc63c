//! What the bookkeeping needs of a tracer: the writes completed so far, per
//! volume, and whether any were lost. [`Tracer`](super::Tracer) is the real
//! source; the bookkeeping's unit tests use a fake one.

use super::Dirty;
use crate::AgentError;

/// The writes of one volume since the last take.
#[derive(Debug, Default)]
pub struct Writes {
    /// The blocks written, with their written pages.
    pub dirty: Dirty,
    /// When the first of them was seen (ms since the epoch).
    pub first_ms: Option<i64>,
    /// Bytes the writes covered on the volume.
    pub bytes: u64,
}

/// A source of completed writes for the volumes tracked, numbered as they
/// were given to it.
pub trait EventSource {
    /// Bring in every write that completed before this call. Returns
    /// whether events were lost since the last call (then what
    /// [`take`](Self::take) returns is incomplete).
    fn sync(&mut self) -> Result<bool, AgentError>;

    /// Take the writes of volume `volume` since the last take.
    fn take(&mut self, volume: usize) -> Writes;
}
