//! Live change tracking of block devices through the kernel's block
//! tracepoints, with no kernel module.
//!
//! A private tracing instance (`tracefs/instances/pilotlight-PID-N`) records
//! `block_rq_complete` and `block_bio_complete` for the volumes' devices
//! only (a filter on `dev`). Completion, not submission: a block is marked
//! dirty once its new data can be read, so reading it after the mark never
//! returns the old data for good (a write still in flight while a block is
//! read completes later, and marks it again).
//!
//! The agent reads the instance on demand ([`EventSource::sync`] of
//! [`Tracer`]): it writes a numbered marker to `trace_marker`, then reads
//! every CPU's binary buffer (`per_cpu/cpuN/trace_pipe_raw`, decoded with
//! the instance's format files) until none has anything committed left and
//! the marker came back, so every write that completed before the call is
//! accounted for (`raw.rs` says why). Where the raw files or format files
//! cannot be used, or `PILOTLIGHT_TRACE_TEXT=1`, it reads the text
//! `trace_pipe` up to the marker instead, and says so once in the log.
//! Events the kernel dropped (a full buffer: the `overrun` and `dropped
//! events` counters of `per_cpu/cpu*/stats`, the missed-events flag of a raw
//! page, or `[LOST n EVENTS]` in the text) and a raw page that cannot be
//! parsed make every volume need a full rescan: tracking never loses a
//! change silently.
//!
//! [`Tracking`] is what the replication loop uses: the dirty blocks not yet
//! in a point, the blocks of points sent but not yet durable (put back if
//! the session dies), which volumes need a rescan and why
//! ([`RescanReason`]), and the dirty set saved at a clean stop, reused at
//! the next start only if the device's write counters
//! (`/sys/dev/block/M:m/stat`) show no write in between.
//!
//! | file | holds |
//! |---|---|
//! | `device.rs` | [`Device`] (sysfs: disk, partition start, write counters), [`Target`] (sectors to blocks) |
//! | `tracer.rs` | [`Tracer`]: the tracefs instance, its sync marker, which reader, stale instance cleanup |
//! | `raw.rs` | the raw reader: per-CPU `trace_pipe_raw` files, drained at each sync (the ordering argument) |
//! | `ring.rs` | the ring buffer's pages and events (byte diagram), walked without trusting them |
//! | `format.rs` | the format files: page header layout, event fields, records decoded |
//! | `text.rs` | the text reader: `trace_pipe` up to the marker (the fallback) |
//! | `parse.rs` | the text lines of `trace_pipe`; `Line` is what both readers yield |
//! | `source.rs` | [`EventSource`]: what the bookkeeping needs of a tracer |
//! | `plan.rs` | [`Plan`], [`RescanReason`], the points in flight |
//! | `pages.rs` | [`Dirty`]: dirty blocks and the written 4 KiB pages of each ([`Pages`]) |
//! | `book.rs` | [`Tracking`]: the bookkeeping, one record per volume |
//! | `saved.rs` | the dirty set of a clean stop ([`DIRTY_FILE`]), with its byte diagram |

mod book;
mod device;
mod format;
mod pages;
mod parse;
mod plan;
mod raw;
mod ring;
pub(crate) mod saved;
mod source;
mod text;
mod tracer;

pub use book::{TrackStats, TrackedVolume, Tracking, ECHO_HOLD};
pub use device::{Device, Target};
pub use pages::{Dirty, Pages, MAX_RANGED_BLOCKS, MAX_RUNS, PAGE};
pub use plan::{Plan, RescanReason};
pub use raw::RawStats;
pub use saved::DIRTY_FILE;
pub use source::{EventSource, Writes};
pub use tracer::{ReaderKind, Tracer, FORCE_TEXT_ENV};

use crate::AgentError;
use parse::Line;

/// How long a sync marker may take to come back.
const SYNC_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// A reader of a tracing instance's events (the raw per-CPU pages or the
/// text pipe), as [`read_to_marker`] drives it.
trait MarkerSource {
    /// Read what is there now, giving each line to `line` (which says
    /// whether it was the awaited marker); whether the marker was among
    /// them.
    fn read_now(&mut self, line: &mut impl FnMut(Line) -> bool) -> Result<bool, AgentError>;

    /// Wait a little for more.
    fn wait(&self);
}

/// Read `source` until the sync marker comes back. While it has not,
/// `lost_now` says whether events were lost (the marker may be among
/// them): then it stops and returns `true`. Fails after [`SYNC_DEADLINE`].
fn read_to_marker(
    source: &mut impl MarkerSource,
    line: &mut impl FnMut(Line) -> bool,
    mut lost_now: impl FnMut() -> Result<bool, AgentError>,
) -> Result<bool, AgentError> {
    let deadline = std::time::Instant::now() + SYNC_DEADLINE;
    loop {
        if source.read_now(line)? {
            return Ok(false);
        }
        if lost_now()? {
            return Ok(true);
        }
        if std::time::Instant::now() > deadline {
            return Err(trace_err(
                "the trace marker did not come back within 10 s; tracing stopped working",
            ));
        }
        source.wait();
    }
}

fn trace_err(what: impl std::fmt::Display) -> AgentError {
    AgentError::Trace(what.to_string())
}
