//! The status reporter: owns the agent's [`Status`], sets its state and
//! figures, and writes `status.json` off the async workers. A status that
//! cannot be written is a warning, never the end of replication.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::blocking::off_async;
use crate::policy;
use pilotlight_protocol::clock::rfc3339;

use crate::status::{State, Status, StatusVolume};
use crate::trace::Tracking;
use crate::{AgentConfig, AgentError};

/// Least time between two periodic writes of the status.
const TICK_EVERY: Duration = Duration::from_secs(1);

/// Keeps and writes the status of one agent.
pub(crate) struct Reporter {
    status: Status,
    dir: PathBuf,
    interval: Duration,
    stall_after: Duration,
    /// When the periodic update last wrote the status.
    last_tick: Instant,
    /// Whether the last write failed (warned once until one succeeds).
    failing: bool,
}

impl Reporter {
    pub(crate) fn new(cfg: &AgentConfig) -> Self {
        Self {
            status: Status {
                receiver: cfg.receiver.clone(),
                state: State::InitialSync,
                ..Status::default()
            },
            dir: cfg.state_dir.clone(),
            interval: cfg.interval,
            stall_after: cfg.stall_after,
            last_tick: Instant::now(),
            failing: false,
        }
    }

    /// Write the status now. A failure is logged, not returned.
    pub(crate) fn save(&mut self) {
        let (status, dir) = (&mut self.status, &self.dir);
        match off_async(|| status.save(dir)) {
            Ok(()) => self.failing = false,
            Err(e) if !self.failing => {
                self.failing = true;
                tracing::warn!(cause = %e, "cannot write the status; replication goes on");
            }
            Err(_) => {}
        }
    }

    /// A full sync's progress `(done, total, eta)`, or none under way.
    /// Returns whether none was shown before.
    pub(crate) fn sync_progress(&mut self, p: Option<(u64, u64, Option<f64>)>) -> bool {
        let first = self.status.sync.is_none();
        self.status.sync = p.map(|(done, total, eta)| crate::status::SyncStatus {
            done_bytes: done.min(total),
            total_bytes: total,
            eta_seconds: eta.map(|s| (s * 10.0).round() / 10.0),
        });
        first
    }

    pub(crate) fn set_state(&mut self, state: State) {
        self.status.state = state;
    }

    /// The state while tracking live (`continuous` without it), the oldest
    /// pending point having waited `ack_wait` for its ack.
    pub(crate) fn live_state(&self, t: Option<&Tracking>, ack_wait: Option<Duration>) -> State {
        let Some(t) = t else {
            return State::Continuous;
        };
        let lag = t.lag();
        policy::live_state(ack_wait, self.stall_after, lag, self.interval)
    }

    /// Whether a periodic update is due (at most once a second); if so,
    /// the next one counts from now.
    pub(crate) fn due(&mut self) -> bool {
        if self.last_tick.elapsed() < TICK_EVERY {
            return false;
        }
        self.last_tick = Instant::now();
        true
    }

    /// Copy tracking's lag, backlog and counters into the status and the
    /// metrics.
    pub(crate) fn track(&mut self, t: &Tracking) {
        let lag = t.lag_ms() as f64 / 1000.0;
        self.status.lag_seconds = Some(lag);
        self.status.backlog_bytes = Some(t.backlog_bytes());
        self.status.collected_ms = Some(t.collected_ms);
        self.status.tracking = Some(t.stats.clone());
        metrics::gauge!("pilotlight_agent_lag_seconds").set(lag);
        metrics::gauge!("pilotlight_agent_backlog_bytes").set(t.backlog_bytes() as f64);
    }

    /// The volumes of a new session.
    pub(crate) fn volumes(&mut self, vols: impl Iterator<Item = StatusVolume>) {
        self.status.volumes = vols.collect();
    }

    pub(crate) fn pending(&mut self, points: usize) {
        self.status.pending_points = points;
    }

    /// A point became durable (taken at `created_ms`).
    pub(crate) fn durable(&mut self, point: u64, created_ms: i64, now_ms: i64) {
        self.status.last_point = Some(point);
        self.status.last_point_time = Some(rfc3339(created_ms));
        self.status.last_point_ms = Some(created_ms);
        self.status.last_point_lag_seconds = Some((now_ms - created_ms).max(0) as f64 / 1000.0);
        self.status.last_error = None;
    }

    /// A session failed; the agent reconnects.
    pub(crate) fn disconnected(&mut self, e: &AgentError) {
        self.status.state = State::Disconnected;
        self.status.last_error = Some(e.to_string());
        self.save();
    }

    /// Replication stopped (`finished`: with no point left pending).
    pub(crate) fn stopped(&mut self, finished: bool) {
        self.status.state = State::Stopped;
        if finished {
            self.status.pending_points = 0;
        }
        self.save();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code
    use super::*;

    #[test]
    fn a_status_that_cannot_be_written_is_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        // The state "directory" is a file: every write fails.
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"").unwrap();
        let cfg = AgentConfig::new("r:1".into(), "id".into(), file, Vec::new());
        let mut r = Reporter::new(&cfg);
        r.save();
        r.stopped(true);
        assert!(r.failing);
    }

    #[test]
    fn writes_the_state_and_the_last_point() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = AgentConfig::new("r:1".into(), "id".into(), dir.path().into(), Vec::new());
        let mut r = Reporter::new(&cfg);
        r.durable(7, 1_000, 3_500);
        r.set_state(State::Continuous);
        r.save();
        let st = Status::load(dir.path()).unwrap();
        assert_eq!(st.state, State::Continuous);
        assert_eq!(st.last_point, Some(7));
        assert_eq!(st.last_point_lag_seconds, Some(2.5));
        r.stopped(true);
        assert_eq!(Status::load(dir.path()).unwrap().state, State::Stopped);
    }
}
