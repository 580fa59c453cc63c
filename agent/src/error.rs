//! The agent's error type, split by cause.

use std::path::PathBuf;

use pilotlight_protocol::frame::ErrorCode;
use pilotlight_protocol::DecodeError;

/// Everything that can go wrong in the agent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// Reading a source volume failed.
    #[error("cannot read volume {volume} ({path}): {source}")]
    Source {
        /// Volume name.
        volume: String,
        /// Its path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The agent's state directory failed.
    #[error("state directory {path}: {source}")]
    State {
        /// The file involved.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Reading or writing the target of a restore failed.
    #[error("restore target {path}: {source}")]
    Target {
        /// The target.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A block fetched for a restore is not what the point holds.
    #[error("block {index} of volume {volume} (point {point}) failed verification: {why}")]
    BadBlock {
        /// Volume name.
        volume: String,
        /// The point.
        point: u64,
        /// Block index.
        index: u64,
        /// What was wrong.
        why: String,
    },
    /// Connecting to or talking with the receiver failed.
    #[error("connection to the receiver failed: {0}")]
    Net(#[source] std::io::Error),
    /// The receiver sent bytes that are not valid frames.
    #[error("bad frame from the receiver: {0}")]
    Decode(#[from] DecodeError),
    /// The receiver sent something unexpected.
    #[error("protocol violation by the receiver: {0}")]
    Protocol(String),
    /// The receiver reported an error and closed the session.
    #[error("receiver refused: {message}")]
    Remote {
        /// The receiver's error code.
        code: ErrorCode,
        /// The receiver's sentence.
        message: String,
    },
    /// The receiver ended the session while partial blocks were not
    /// confirmed (a base it does not hold, a merge that failed): the
    /// agent reconnects and sends whole blocks until a point is durable.
    #[error("receiver refused (partial blocks were in flight; sending whole blocks): {0}")]
    PartialRefused(String),
    /// Consistency could not be established as asked.
    #[error("consistency: {0}")]
    Consistency(String),
    /// Bad configuration or identity.
    #[error("{0}")]
    Config(String),
    /// A volume changed size while replicating.
    #[error("volume {0} changed size; reconnecting to declare the new size")]
    Resized(String),
    /// The state directory or the identity file could be changed by another
    /// user than the agent's: whoever can, can make the agent send what they
    /// like or impersonate it.
    #[error("{what} {} {problem}", .path.display())]
    Unprotected {
        /// "state directory" or "identity file".
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Who else could change it, and the fix.
        problem: Exposure,
    },
    /// Live tracking (tracefs) failed.
    #[error("live tracking: {0}")]
    Trace(String),
    /// Stopped by the caller.
    #[error("stopped")]
    Stopped,
    /// A bug in the agent itself: a task that panicked or was cancelled, a
    /// poisoned lock, a table that does not fit its volume. Never the
    /// receiver's fault, and reconnecting would not help.
    #[error("internal error in the agent: {0}")]
    Internal(String),
}

impl AgentError {
    /// Whether reconnecting and trying again may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Net(_) | Self::Resized(_) => true,
            Self::Remote { code, .. } => code.is_retryable() || *code == ErrorCode::Superseded,
            Self::Decode(_) | Self::Protocol(_) | Self::PartialRefused(_) => true,
            Self::Source { .. }
            | Self::State { .. }
            | Self::Target { .. }
            | Self::BadBlock { .. }
            | Self::Consistency(_)
            | Self::Config(_)
            | Self::Unprotected { .. }
            | Self::Trace(_)
            | Self::Stopped
            | Self::Internal(_) => false,
        }
    }

    /// A blocking task that did not finish: it panicked or was cancelled.
    pub(crate) fn task(what: &str, e: tokio::task::JoinError) -> Self {
        Self::Internal(format!("{what} task failed: {e}"))
    }
}

/// Why a file or directory of the agent is not private enough.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Exposure {
    /// Writable by its group or by everyone (permission bits `mode`).
    Writable {
        /// The permission bits.
        mode: u32,
    },
    /// Owned by another user.
    Owner {
        /// Its owner's uid.
        owner: u32,
        /// The agent's effective uid.
        agent: u32,
    },
}

impl std::fmt::Display for Exposure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Writable { mode } => write!(
                f,
                "is writable by other users (mode {mode:04o}); make it the agent's alone with chmod go-w"
            ),
            Self::Owner { owner, agent } => write!(
                f,
                "is owned by uid {owner}, not by the agent's uid {agent}; give it to the agent with chown {agent}"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agents_own_bugs_are_not_retried() {
        assert!(!AgentError::Internal("a scan worker panicked".into()).is_retryable());
        assert!(AgentError::Protocol("unexpected Hashes".into()).is_retryable());
    }
}
