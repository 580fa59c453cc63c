//! `staging.json` in the receiver directory: the staging images that are
//! failing to update, each with its error and since when, written by the
//! staging task of `serve` whenever that changes and read by `status`.
//!
//! A failure is per volume (or per server, when the failure comes before
//! any volume, as a catalog error does). It stays recorded while the task
//! retries with [`retry_after`]'s backoff, and goes when an update of it
//! succeeds.

use std::path::Path;
use std::time::Duration;

use pilotlight_protocol::atomic_file::Access;
use serde::{Deserialize, Serialize};

use crate::ReceiveError;

/// File name in the receiver directory.
pub const STAGING_FILE: &str = "staging.json";

/// First wait before a failed update is tried again.
const FIRST_RETRY: Duration = Duration::from_secs(1);

/// Longest wait between two tries of a failed update. A try may rebuild
/// a whole image (a damaged block fails it again each time), so a lasting
/// fault is not tried more often than this; a new point of the server is
/// tried at once.
pub const MAX_RETRY: Duration = Duration::from_secs(300);

/// How long to wait before trying a failed update again, after `attempts`
/// failed tries (1 for the first): 1 s, doubling, at most [`MAX_RETRY`] (5 minutes).
pub fn retry_after(attempts: u32) -> Duration {
    let doublings = attempts.saturating_sub(1).min(16);
    FIRST_RETRY.saturating_mul(1u32 << doublings).min(MAX_RETRY)
}

/// A staging image (or a server's whole staging) that fails to update.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagingFailure {
    /// Tries that failed in a row.
    pub attempts: u32,
    /// The last error.
    pub error: String,
    /// Server name.
    pub server: String,
    /// Since when it fails (RFC 3339).
    pub since: String,
    /// Since when it fails (ms since the epoch).
    pub since_ms: i64,
    /// The volume; `None` when the server's update failed before reaching
    /// its volumes.
    pub volume: Option<String>,
}

/// What the staging task of a running `serve` reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagingHealth {
    /// Process id of `serve`.
    pub pid: u32,
    /// The failing images, by server then volume.
    pub failing: Vec<StagingFailure>,
}

impl StagingHealth {
    /// An empty report of this process.
    pub fn new() -> Self {
        Self {
            pid: std::process::id(),
            failing: Vec::new(),
        }
    }

    /// Record that `server`/`volume` failed at `now_ms` with `error`;
    /// returns the failed tries in a row.
    pub fn fail(&mut self, server: &str, volume: Option<&str>, error: String, now_ms: i64) -> u32 {
        let at = self
            .failing
            .iter_mut()
            .find(|f| f.server == server && f.volume.as_deref() == volume);
        if let Some(f) = at {
            f.attempts = f.attempts.saturating_add(1);
            f.error = error;
            return f.attempts;
        }
        self.failing.push(StagingFailure {
            attempts: 1,
            error,
            server: server.to_owned(),
            since: pilotlight_protocol::clock::rfc3339(now_ms),
            since_ms: now_ms,
            volume: volume.map(str::to_owned),
        });
        self.failing
            .sort_by(|a, b| (&a.server, &a.volume).cmp(&(&b.server, &b.volume)));
        1
    }

    /// Record that `server`/`volume` updated; returns whether it was failing.
    pub fn clear(&mut self, server: &str, volume: Option<&str>) -> bool {
        let before = self.failing.len();
        self.failing
            .retain(|f| !(f.server == server && f.volume.as_deref() == volume));
        self.failing.len() != before
    }

    /// The failures of `server`.
    pub fn of_server<'a>(&'a self, server: &'a str) -> impl Iterator<Item = &'a StagingFailure> {
        self.failing.iter().filter(move |f| f.server == server)
    }

    /// Write atomically into `dir`.
    pub fn save(&self, dir: &Path) -> Result<(), ReceiveError> {
        let text =
            serde_json::to_vec_pretty(self).map_err(|e| ReceiveError::Config(e.to_string()))?;
        pilotlight_protocol::atomic_file::write(dir, STAGING_FILE, &text, Access::Private)
            .map_err(|(path, e)| ReceiveError::storage(path, e))
    }

    /// Read from `dir`, if a receiver that is still running wrote it.
    pub fn load_running(dir: &Path) -> Option<Self> {
        let health: Self =
            serde_json::from_slice(&std::fs::read(dir.join(STAGING_FILE)).ok()?).ok()?;
        Path::new(&format!("/proc/{}", health.pid))
            .exists()
            .then_some(health)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code
    use super::*;

    #[test]
    fn retries_wait_one_second_then_double_up_to_the_most() {
        let waits: Vec<u64> = (1..=11).map(|a| retry_after(a).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(retry_after(0), FIRST_RETRY);
        assert_eq!(retry_after(u32::MAX), MAX_RETRY);
    }

    #[test]
    fn a_failure_keeps_its_start_counts_tries_and_goes_when_cleared() {
        let mut h = StagingHealth::new();
        assert_eq!(h.fail("web", Some("root"), "EISDIR".into(), 1_000), 1);
        assert_eq!(h.fail("db", None, "catalog".into(), 2_000), 1);
        assert_eq!(h.fail("web", Some("root"), "EIO".into(), 5_000), 2);
        let web: Vec<_> = h.of_server("web").collect();
        assert_eq!(web.len(), 1);
        assert_eq!((web[0].since_ms, web[0].error.as_str()), (1_000, "EIO"));
        assert_eq!(web[0].since, "1970-01-01T00:00:01Z");
        // Sorted by server.
        assert_eq!(h.failing[0].server, "db");
        assert!(h.clear("web", Some("root")));
        assert!(!h.clear("web", Some("root")));
        assert_eq!(h.of_server("web").count(), 0);
    }

    #[test]
    fn the_report_of_a_running_receiver_is_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = StagingHealth::new();
        h.fail("web", Some("root"), "Is a directory".into(), 7);
        h.save(dir.path()).unwrap();
        assert_eq!(StagingHealth::load_running(dir.path()), Some(h.clone()));
        // Written by a process that is gone: not reported.
        h.pid = u32::MAX;
        h.save(dir.path()).unwrap();
        assert_eq!(StagingHealth::load_running(dir.path()), None);
    }
}
