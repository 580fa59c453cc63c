//! `live.json` in the receiver directory: which servers have a session open
//! right now, written by `serve` whenever that changes, read by `status`.

use pilotlight_protocol::atomic_file::Access;
use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::ReceiveError;

/// File name in the receiver directory.
pub const LIVE_FILE: &str = "live.json";

/// What a serving receiver reports about itself.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Live {
    /// Process id of `serve`.
    pub pid: u32,
    /// Servers with an open session, and since when (RFC 3339).
    pub connected: BTreeMap<String, String>,
}

impl Live {
    /// Write atomically into `dir`.
    pub fn save(&self, dir: &Path) -> Result<(), ReceiveError> {
        let text =
            serde_json::to_vec_pretty(self).map_err(|e| ReceiveError::Config(e.to_string()))?;
        pilotlight_protocol::atomic_file::write(dir, LIVE_FILE, &text, Access::Private)
            .map_err(|(path, e)| ReceiveError::storage(path, e))
    }

    /// Read from `dir`, if a receiver that is still running wrote it.
    pub fn load_running(dir: &Path) -> Option<Self> {
        let live: Self = serde_json::from_slice(&std::fs::read(dir.join(LIVE_FILE)).ok()?).ok()?;
        Path::new(&format!("/proc/{}", live.pid))
            .exists()
            .then_some(live)
    }
}
