//! `receiver.toml`: the receiver's configuration, written by `init`.
//! Command-line flags override it. Defaults live here and nowhere else.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ReceiveError;

/// Name of the config file in the receiver directory.
pub const CONFIG_FILE: &str = "receiver.toml";

/// The receiver's configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReceiverConfig {
    /// Address to listen on for agents.
    pub listen: String,
    /// Most concurrent connections (control and data) served at once.
    pub max_connections: usize,
    /// Seconds a peer has to finish the TLS handshake and its `Hello`.
    pub handshake_timeout_secs: u64,
    /// Seconds a session may stay silent mid-transfer before it is closed.
    pub idle_timeout_secs: u64,
    /// Most points of one session received but not yet committed.
    pub max_pending_points: usize,
    /// Most MiB of block frames of one session read but not yet applied.
    pub max_session_inflight_mib: usize,
    /// Address to serve Prometheus metrics on (none by default).
    pub metrics: Option<String>,
    /// Seconds between two passes of pruning (by `retention`) and garbage
    /// collection inside `serve`; 0 turns them off.
    pub prune_interval_secs: u64,
    /// Garbage collection rewrites a pack once this percentage of it is dead.
    pub gc_min_dead_percent: u8,
    /// An agent's clock may be off the receiver's by this many seconds
    /// before the receiver warns (points are dated by the receiver's clock
    /// either way; `status` shows each server's skew).
    pub max_clock_skew_secs: u64,
    /// Which points `prune` keeps when no `--keep-*` flag is given, and the
    /// minimum history (`min_keep`) it keeps whatever the flags say.
    pub retention: crate::retention::Policy,
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:7443".into(),
            max_connections: 256,
            handshake_timeout_secs: 10,
            idle_timeout_secs: 120,
            max_pending_points: 8,
            max_session_inflight_mib: 64,
            metrics: None,
            prune_interval_secs: 600,
            gc_min_dead_percent: 20,
            max_clock_skew_secs: 300,
            retention: crate::retention::Policy::default(),
        }
    }
}

impl ReceiverConfig {
    /// Read `DIR/receiver.toml`, or the defaults if it does not exist.
    pub fn load(dir: &Path) -> Result<Self, ReceiveError> {
        let path = dir.join(CONFIG_FILE);
        match std::fs::read_to_string(&path) {
            Ok(s) => toml::from_str(&s)
                .map_err(|e| ReceiveError::Config(format!("{} is not valid: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(ReceiveError::storage(path, e)),
        }
    }

    /// Handshake timeout.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.handshake_timeout_secs.max(1))
    }

    /// How often `serve` prunes and collects garbage, if at all.
    pub fn prune_interval(&self) -> Option<Duration> {
        (self.prune_interval_secs > 0).then(|| Duration::from_secs(self.prune_interval_secs))
    }

    /// How far an agent's clock may be off before the receiver warns.
    pub fn max_clock_skew(&self) -> Duration {
        Duration::from_secs(self.max_clock_skew_secs)
    }

    /// Idle timeout.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs.max(1))
    }
}
