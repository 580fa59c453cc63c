//! `status.json` in the state directory: what the agent last did, for
//! `pilotlight-agent status`.
//!
//! When the state directory lies on a volume the agent traces, the status
//! (rewritten every second) lives in [`RUNTIME_DIR`] instead, and
//! `status.json` in the state directory is a symbolic link to it: written
//! there, every update would be a change to replicate, and the volume would
//! never be idle.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use pilotlight_protocol::atomic_file::Access;
use pilotlight_protocol::clock::{now_ms, rfc3339};

use crate::state::write_atomic;
use crate::AgentError;

/// File name in the state directory.
pub const STATUS_FILE: &str = "status.json";

/// Where the status of a state directory on a traced volume is written.
pub const RUNTIME_DIR: &str = "/run/pilotlight";

/// Put the status of `state_dir` in [`RUNTIME_DIR`] (`elsewhere`) or back
/// in the state directory. Writes to the state directory only when that
/// changes.
pub fn place(state_dir: &Path, elsewhere: bool) -> Result<(), AgentError> {
    let link = state_dir.join(STATUS_FILE);
    let current = std::fs::read_link(&link).ok();
    let io = |p: &Path, e| AgentError::State {
        path: p.to_owned(),
        source: e,
    };
    if !elsewhere {
        if current.is_some() {
            std::fs::remove_file(&link).map_err(|e| io(&link, e))?;
        }
        return Ok(());
    }
    let dir = runtime_dir(state_dir)?;
    std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
    let target = dir.join(STATUS_FILE);
    if current.as_deref() == Some(target.as_path()) {
        return Ok(());
    }
    // Carry the last status over, then swap the link in atomically.
    if let Ok(old) = std::fs::read(&link) {
        write_atomic(&dir, STATUS_FILE, &old, Access::Umask)?;
    }
    let tmp = state_dir.join(format!(".{STATUS_FILE}.link"));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&target, &tmp).map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, &link).map_err(|e| io(&link, e))
}

/// The directory in [`RUNTIME_DIR`] that holds the status of `state_dir`:
/// named by a hash of the state directory's canonical path.
fn runtime_dir(state_dir: &Path) -> Result<PathBuf, AgentError> {
    let canonical = std::fs::canonicalize(state_dir).map_err(|e| AgentError::State {
        path: state_dir.to_owned(),
        source: e,
    })?;
    let key = blake3::hash(canonical.as_os_str().as_encoded_bytes()).to_hex();
    Ok(Path::new(RUNTIME_DIR).join(&key.as_str()[..16]))
}

/// Where the status of `state_dir` is written through its link: only the
/// runtime directory [`place`] makes for it, and only if that directory,
/// canonicalised, is still that one (no `..`, no link out of
/// [`RUNTIME_DIR`]). Anything else a link says is not trusted.
fn trusted_runtime_dir(state_dir: &Path, target: &Path) -> Option<PathBuf> {
    let expected = runtime_dir(state_dir).ok()?;
    if target != expected.join(STATUS_FILE) {
        return None;
    }
    let canonical = std::fs::canonicalize(&expected).ok()?;
    let runtime = std::fs::canonicalize(RUNTIME_DIR).ok()?;
    (canonical.parent() == Some(runtime.as_path()) && canonical.file_name() == expected.file_name())
        .then_some(expected)
}

/// What the agent is doing, as `status.json` and `status` say it.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// Sending every block of a volume the receiver has nothing of.
    #[default]
    InitialSync,
    /// Points come every interval (or as soon as the changes call for one).
    Continuous,
    /// Live tracking: the oldest write not yet durable is far older than the
    /// interval.
    Backlog,
    /// Live tracking: a volume is scanned in full (its changes are unknown).
    Rescan,
    /// Points have waited longer than `stall_after` for their ack.
    Stalled,
    /// The connection to the receiver failed; reconnecting.
    Disconnected,
    /// Stopped.
    Stopped,
}

impl State {
    /// The word `status.json` holds.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InitialSync => "initial-sync",
            Self::Continuous => "continuous",
            Self::Backlog => "backlog",
            Self::Rescan => "rescan",
            Self::Stalled => "stalled",
            Self::Disconnected => "disconnected",
            Self::Stopped => "stopped",
        }
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The agent's last reported status.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    /// What the agent is doing.
    pub state: State,
    /// Receiver address.
    pub receiver: String,
    /// Last durable point id.
    pub last_point: Option<u64>,
    /// When the last durable point was taken (RFC 3339).
    pub last_point_time: Option<String>,
    /// The same, in milliseconds since the epoch.
    #[serde(default)]
    pub last_point_ms: Option<i64>,
    /// Seconds between taking the last durable point and its ack.
    pub last_point_lag_seconds: Option<f64>,
    /// Points sent and not yet durable.
    pub pending_points: usize,
    /// Live tracking: age in seconds of the oldest write not yet durable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_seconds: Option<f64>,
    /// Live tracking: bytes of blocks written and not yet durable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backlog_bytes: Option<u64>,
    /// Live tracking: when (ms since the epoch) the agent last brought in
    /// trace events; every write completed before then is durable or counted
    /// in `backlog_bytes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collected_ms: Option<i64>,
    /// Live tracking: rescans and freeze durations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking: Option<crate::trace::TrackStats>,
    /// A full sync (initial sync or rescan) under way: its progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<SyncStatus>,
    /// Last error, if the agent is retrying.
    pub last_error: Option<String>,
    /// Volumes: name, size, block size.
    pub volumes: Vec<StatusVolume>,
    /// When this status was written (RFC 3339).
    pub updated: String,
}

/// The progress of a full sync.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SyncStatus {
    /// Bytes of the volumes read so far (by this run of the agent).
    pub done_bytes: u64,
    /// Bytes of the volumes in all.
    pub total_bytes: u64,
    /// Seconds left at the rate so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<f64>,
}

/// A volume in the status.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusVolume {
    /// Name.
    pub name: String,
    /// Path.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
}

impl Status {
    /// Write to the state directory.
    /// (Where `status.json` is a link to the runtime directory: there.)
    pub fn save(&mut self, dir: &Path) -> Result<(), AgentError> {
        self.updated = rfc3339(now_ms());
        let text = serde_json::to_vec_pretty(self)
            .map_err(|e| AgentError::Config(format!("status: {e}")))?;
        let runtime = std::fs::read_link(dir.join(STATUS_FILE))
            .ok()
            .and_then(|target| trusted_runtime_dir(dir, &target));
        match runtime {
            Some(runtime) => write_atomic(&runtime, STATUS_FILE, &text, Access::Umask),
            None => write_atomic(dir, STATUS_FILE, &text, Access::Umask),
        }
    }

    /// Read from the state directory.
    pub fn load(dir: &Path) -> Result<Self, AgentError> {
        let path = dir.join(STATUS_FILE);
        let text = std::fs::read(&path).map_err(|e| match std::fs::read_link(&path) {
            Ok(target) if e.kind() == std::io::ErrorKind::NotFound => AgentError::Config(format!(
                "{} links to {}, which is gone: the agent keeps its status there while the state directory is on a traced volume, and has not run since that directory was emptied (a reboot)",
                path.display(),
                target.display()
            )),
            _ => AgentError::State {
                path: path.clone(),
                source: e,
            },
        })?;
        serde_json::from_slice(&text)
            .map_err(|e| AgentError::Config(format!("{} is not valid: {e}", path.display())))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code
    use super::*;

    #[test]
    fn a_status_linked_to_a_runtime_file_that_is_gone_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("run/pilotlight/0123/status.json");
        std::os::unix::fs::symlink(&gone, dir.path().join(STATUS_FILE)).unwrap();
        let err = Status::load(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("which is gone") && err.contains("has not run since"),
            "{err}"
        );
        // Once the agent writes there again, it reads as usual.
        std::fs::create_dir_all(gone.parent().unwrap()).unwrap();
        let mut st = Status {
            state: State::Continuous,
            ..Status::default()
        };
        write_atomic(
            gone.parent().unwrap(),
            STATUS_FILE,
            &serde_json::to_vec(&st).unwrap(),
            Access::Umask,
        )
        .unwrap();
        assert_eq!(Status::load(dir.path()).unwrap().state, State::Continuous);
        // A save through a link outside the runtime directory replaces the
        // link with a plain file.
        st.state = State::Stopped;
        st.save(dir.path()).unwrap();
        assert!(std::fs::read_link(dir.path().join(STATUS_FILE)).is_err());
        assert_eq!(Status::load(dir.path()).unwrap().state, State::Stopped);
    }

    /// A link that climbs out of the runtime directory with `..` is not
    /// written through: the status goes to the state directory, and the
    /// file the link names stays untouched.
    #[test]
    fn a_status_link_out_of_the_runtime_directory_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let victim = dir.path().join("victim");
        std::fs::create_dir_all(&state).unwrap();
        std::fs::create_dir_all(&victim).unwrap();
        std::fs::write(victim.join(STATUS_FILE), b"precious").unwrap();
        // Where the runtime directory exists (as root), the old check wrote
        // through this link.
        let _ = std::fs::create_dir_all(RUNTIME_DIR);
        let up = "../".repeat(RUNTIME_DIR.matches('/').count());
        let sneaky = Path::new(RUNTIME_DIR)
            .join(up)
            .join(victim.strip_prefix("/").unwrap())
            .join(STATUS_FILE);
        assert!(sneaky.starts_with(RUNTIME_DIR));
        std::os::unix::fs::symlink(&sneaky, state.join(STATUS_FILE)).unwrap();
        let mut st = Status {
            state: State::Continuous,
            ..Status::default()
        };
        st.save(&state).unwrap();
        assert_eq!(
            std::fs::read(victim.join(STATUS_FILE)).unwrap(),
            b"precious"
        );
        assert!(std::fs::read_link(state.join(STATUS_FILE)).is_err());
        assert_eq!(Status::load(&state).unwrap().state, State::Continuous);
    }

    /// The JSON words are those of the strings the state used to be.
    #[test]
    fn states_serialize_to_their_words() {
        let all = [
            (State::InitialSync, "initial-sync"),
            (State::Continuous, "continuous"),
            (State::Backlog, "backlog"),
            (State::Rescan, "rescan"),
            (State::Stalled, "stalled"),
            (State::Disconnected, "disconnected"),
            (State::Stopped, "stopped"),
        ];
        for (state, word) in all {
            assert_eq!(
                serde_json::to_string(&state).unwrap(),
                format!("\"{word}\"")
            );
            assert_eq!(state.to_string(), word);
            let back: State = serde_json::from_str(&format!("\"{word}\"")).unwrap();
            assert_eq!(back, state);
        }
    }
}
