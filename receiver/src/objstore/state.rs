//! Whether the object store keeps up: `offsite.json` in the receiver
//! directory, written by `serve` when the state changes and read by
//! `status`, and the gauge `pilotlight_receiver_store_waiting` (1 while a
//! point waits for its uploads).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use pilotlight_protocol::atomic_file::{self, Access};
use serde::{Deserialize, Serialize};

/// Name of the state file in the receiver directory.
pub const STATE_FILE: &str = "offsite.json";

/// What `status` shows of the object store.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OffsiteState {
    /// The store's URL.
    pub url: String,
    /// Since when (ms since the epoch) points wait for the store; `None`
    /// while it keeps up.
    pub waiting_since_ms: Option<i64>,
    /// Why they wait (the last error, one sentence).
    pub cause: Option<String>,
    /// When the last upload finished (ms since the epoch).
    pub last_upload_ms: Option<i64>,
    /// When the last catalog snapshot was uploaded (ms since the epoch).
    pub last_snapshot_ms: Option<i64>,
}

impl OffsiteState {
    /// The state a running (or the last) `serve` of `dir` wrote, if any.
    pub fn load(dir: &Path) -> Option<Self> {
        let text = std::fs::read_to_string(dir.join(STATE_FILE)).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// One line for `status`.
    pub fn line(&self, now_ms: i64) -> String {
        match (self.waiting_since_ms, &self.cause) {
            (Some(since), cause) => format!(
                "object store {}: UNREACHABLE for {}s, points wait for their uploads ({})",
                self.url,
                (now_ms - since).max(0) / 1000,
                cause.as_deref().unwrap_or("no answer")
            ),
            (None, _) => format!(
                "object store {}: ok (last upload {}, last catalog snapshot {})",
                self.url,
                self.last_upload_ms
                    .map_or("never".into(), pilotlight_protocol::clock::rfc3339),
                self.last_snapshot_ms
                    .map_or("never".into(), pilotlight_protocol::clock::rfc3339),
            ),
        }
    }
}

/// The writer of `offsite.json`.
pub(crate) struct StateFile {
    dir: PathBuf,
    state: Mutex<OffsiteState>,
}

impl StateFile {
    pub(crate) fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            state: Mutex::new(OffsiteState::default()),
        }
    }

    /// Change the state with `f` and write it if it changed. Blocking.
    pub(crate) fn update(&self, url: &str, f: impl FnOnce(&mut OffsiteState)) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        let before = st.clone();
        st.url = url.to_owned();
        f(&mut st);
        metrics::gauge!("pilotlight_receiver_store_waiting").set(
            if st.waiting_since_ms.is_some() {
                1.0
            } else {
                0.0
            },
        );
        if *st == before {
            return;
        }
        let Ok(text) = serde_json::to_vec_pretty(&*st) else {
            return;
        };
        if let Err((path, e)) = atomic_file::write(&self.dir, STATE_FILE, &text, Access::Umask) {
            tracing::warn!(path = %path.display(), cause = %e, "cannot write the object store state");
        }
    }
}
