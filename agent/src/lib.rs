//! pilotlight agent: finds the blocks of a server's volumes that changed since
//! the last durable point, and streams them to the receiver.
//!
//! The binary `pilotlight-agent` is a thin CLI over [`run`].

mod blocking;
pub mod checkpoint;
mod collector;
pub mod consistency;
mod cycle;
mod durable;
pub mod error;
pub mod freeze;
#[doc(hidden)]
pub mod fuzzing;
pub mod hashfile;
pub mod identity;
pub mod link;
mod policy;
mod replicate;
mod reporter;
pub mod restore;
mod resync;
mod saturation;
pub mod scan;
mod session;
mod sparse;
pub mod state;
pub mod status;
pub mod throttle;
pub mod trace;
pub mod volume;

use std::path::PathBuf;
use std::time::Duration;

pub use consistency::ConsistencyMode;
pub use error::AgentError;
pub use pilotlight_protocol::frame::CommitMode;
pub use replicate::{run, PointReport};
pub use volume::VolumeSpec;

/// Tracking method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Track {
    /// Read and hash every block each cycle.
    Scan,
    /// Read only the blocks the kernel's block tracepoints saw written
    /// (block devices only; see [`trace`]).
    Trace,
}

/// Everything `run` needs. Defaults live in [`AgentConfig::new`].
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// `host:port` of the receiver.
    pub receiver: String,
    /// Identity file from `pilotlight-receiver enroll`.
    pub identity: PathBuf,
    /// Directory for the agent's durable state.
    pub state_dir: PathBuf,
    /// Volumes to replicate.
    pub volumes: Vec<VolumeSpec>,
    /// Tracking method.
    pub track: Track,
    /// Commit mode.
    pub commit: CommitMode,
    /// Time between the starts of points in continuous mode (a point that
    /// took longer is followed at once, after its acks).
    pub interval: Duration,
    /// Live tracking: how long points may wait for their ack before the
    /// status says `stalled`.
    pub stall_after: Duration,
    /// Make one point and stop.
    pub once: bool,
    /// How points are made consistent.
    pub consistency: ConsistencyMode,
    /// Parallel data streams.
    pub streams: u16,
    /// Block size for volumes new to the receiver.
    pub block_size: u32,
    /// zstd level.
    pub zstd_level: i32,
    /// Scan worker threads (0 = one per core).
    pub workers: usize,
    /// Most points sent but not yet durable in async mode.
    pub max_async_pending: usize,
    /// Connection attempts of `--once` before giving up.
    pub once_attempts: u32,
    /// Cap on the send rate in megabits per second.
    pub limit_mbps: Option<u32>,
    /// Trace buffer per CPU in KiB (`--track trace`).
    pub trace_buffer_kb: u32,
    /// Start a point before the interval is up once this many bytes are
    /// dirty (`--track trace`).
    pub early_point_bytes: u64,
    /// Counter of bytes read by scans, for a progress display.
    pub progress: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
    /// How often the control connection says `Ping` to a receiver that
    /// closes silent ones ([`pilotlight_protocol::limits::PING_INTERVAL`]).
    pub ping_interval: Duration,
    /// When a full sync checkpoints (with a receiver that keeps
    /// checkpoints): every 1 GiB sent or 30 s by default.
    pub checkpoints: checkpoint::CheckpointPolicy,
    /// With `--consistency freeze:MOUNT`: the freeze's hard limit
    /// (`--freeze-limit`, 2 s), the memory the frozen delta may take
    /// (256 MiB) and the guard process (see [`freeze`]).
    pub freeze: freeze::FreezeOptions,
    /// Live tracking: send a block written only in a few pages as those
    /// pages (`PartialBlock`) to a receiver that merges them (true;
    /// `--partial-blocks off` sends whole blocks).
    pub partial_blocks: bool,
    /// Live tracking: the lag (age of the oldest write not yet durable)
    /// the agent may let build while the disk is saturated by its
    /// workload, deferring points so that writes coalesce (`--max-lag`,
    /// 30 s; see [`policy`](crate) and `saturation`). It also ends a
    /// point's pre-copy rounds at three quarters of it.
    pub max_lag: Duration,
}

impl AgentConfig {
    /// A configuration with the documented defaults.
    pub fn new(
        receiver: String,
        identity: PathBuf,
        state_dir: PathBuf,
        volumes: Vec<VolumeSpec>,
    ) -> Self {
        Self {
            receiver,
            identity,
            state_dir,
            volumes,
            track: Track::Scan,
            commit: CommitMode::Sync,
            interval: Duration::from_secs(60),
            stall_after: Duration::from_secs(60),
            once: false,
            consistency: ConsistencyMode::Auto,
            streams: 2,
            block_size: pilotlight_protocol::limits::DEFAULT_BLOCK_SIZE,
            zstd_level: 1,
            workers: 0,
            max_async_pending: 4,
            once_attempts: 3,
            limit_mbps: None,
            trace_buffer_kb: 8192,
            early_point_bytes: 64 << 20,
            progress: None,
            ping_interval: pilotlight_protocol::limits::PING_INTERVAL,
            checkpoints: checkpoint::CheckpointPolicy::default(),
            freeze: freeze::FreezeOptions::default(),
            partial_blocks: true,
            max_lag: Duration::from_secs(30),
        }
    }
}
