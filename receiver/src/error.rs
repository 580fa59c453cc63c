//! The receiver's error type, split by cause.

use std::path::PathBuf;

use pilotlight_protocol::frame::ErrorCode;
use pilotlight_protocol::{BlockError, DecodeError};

/// Everything that can go wrong in the receiver.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReceiveError {
    /// A socket or TLS failure talking to a peer.
    #[error("connection failed: {0}")]
    Net(#[source] std::io::Error),
    /// The peer sent bytes that are not valid frames.
    #[error("bad frame from peer: {0}")]
    Decode(#[from] DecodeError),
    /// The peer sent a valid frame at the wrong time or with wrong values.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// A block failed verification.
    #[error("block {index} of volume {volume} rejected: {source}")]
    BadBlock {
        /// Volume name.
        volume: String,
        /// Block index.
        index: u64,
        /// What was wrong.
        source: BlockError,
    },
    /// The peer is not allowed to do this.
    #[error("not authorized: {0}")]
    Unauthorized(String),
    /// The peer was too slow.
    #[error("timed out: {0}")]
    Timeout(&'static str),
    /// Another connection of the same session failed; this is its error.
    #[error("{message}")]
    SessionFailed {
        /// The failure's code.
        code: ErrorCode,
        /// The failure's sentence.
        message: String,
    },
    /// A newer session of the same server took over.
    #[error("superseded by a newer session of the same server")]
    Superseded,
    /// The receiver is shutting down.
    #[error("receiver is shutting down")]
    Shutdown,
    /// The receiver is at its session limit.
    #[error("receiver is busy: {0}")]
    Busy(&'static str),
    /// A disk operation on the store failed.
    #[error("storage I/O error on {path}: {source}")]
    Storage {
        /// The file involved.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The catalog database failed.
    #[error("catalog error: {0}")]
    Catalog(#[from] rusqlite::Error),
    /// The catalog was written by a newer receiver.
    #[error(
        "catalog schema version {found} is newer than this receiver supports ({supported}); upgrade pilotlight-receiver"
    )]
    CatalogTooNew {
        /// The catalog's schema version.
        found: i64,
        /// The newest version this receiver reads.
        supported: i64,
    },
    /// A declared volume is larger than the staging filesystem can hold as
    /// one file: refused at `Open`, before any of its data is accepted.
    #[error(
        "volume {volume} ({size} bytes) is larger than the staging filesystem can hold: a file of that size cannot be made at {}; put the receiver's staging on a filesystem that can (xfs, or ext4 with larger blocks)", .path.display()
    )]
    VolumeTooLarge {
        /// Volume name.
        volume: String,
        /// Declared size in bytes.
        size: u64,
        /// The staging image that could not be that large.
        path: PathBuf,
    },
    /// A server's blocks would take more than its quota: the block is
    /// refused and nothing of its point is committed. Retryable: pruning
    /// (then garbage collection) or a raised quota makes room.
    #[error(
        "server {server} is over its quota: it stores {used} bytes, {needed} more would pass its quota of {quota} bytes; prune its points (the space counts as free after the next garbage collection) or raise its quota in receiver.toml"
    )]
    QuotaExceeded {
        /// Server name.
        server: String,
        /// Bytes charged to the server: its stored blocks and what its
        /// session wrote and has not committed.
        used: u64,
        /// Bytes the refused block (or point) needs.
        needed: u64,
        /// The server's quota in bytes.
        quota: u64,
    },
    /// Stored data is damaged.
    #[error("store is damaged: {0}")]
    Corrupt(String),
    /// A configuration or key file problem.
    #[error("{0}")]
    Config(String),
    /// Something the user asked for does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A user request that cannot be carried out as given.
    #[error("{0}")]
    Refused(String),
    /// A bug in the receiver itself (a task that panicked or was cancelled,
    /// a lock poisoned by a panic): not the peer's fault, not damage in the
    /// store, and not worth retrying.
    #[error("internal error in the receiver: {0}")]
    Internal(String),
}

impl ReceiveError {
    /// Shorthand for a storage error on `path`.
    pub fn storage(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Storage {
            path: path.into(),
            source,
        }
    }

    /// A lock poisoned by a panic while `what` held it.
    pub fn poisoned(what: &'static str) -> Self {
        Self::Internal(format!("the {what} lock was poisoned by a panic"))
    }

    /// A task doing `what` that panicked or was cancelled.
    pub fn join(what: &'static str, err: tokio::task::JoinError) -> Self {
        Self::Internal(format!("{what} task failed: {err}"))
    }

    /// Whether the agent may reconnect and try the same again.
    pub fn is_retryable(&self) -> bool {
        self.code().is_retryable()
    }

    /// The wire code reported to the peer for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Net(_) | Self::Decode(_) | Self::Protocol(_) => ErrorCode::Protocol,
            Self::BadBlock { .. } => ErrorCode::BadBlock,
            Self::Unauthorized(_) => ErrorCode::Unauthorized,
            Self::Timeout(_) => ErrorCode::Timeout,
            Self::Superseded => ErrorCode::Superseded,
            Self::SessionFailed { code, .. } => *code,
            Self::Shutdown => ErrorCode::Shutdown,
            Self::Busy(_) => ErrorCode::Busy,
            Self::QuotaExceeded { .. } => ErrorCode::QuotaExceeded,
            Self::Storage { .. } | Self::Catalog(_) | Self::Corrupt(_) => ErrorCode::Storage,
            Self::Config(_)
            | Self::NotFound(_)
            | Self::Refused(_)
            | Self::CatalogTooNew { .. }
            | Self::VolumeTooLarge { .. } => ErrorCode::Other,
            Self::Internal(_) => ErrorCode::Internal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_errors_have_their_own_code_and_are_not_blamed_on_the_store() {
        let e = ReceiveError::poisoned("session");
        assert_eq!(e.code(), ErrorCode::Internal);
        // The receiver's bug, not the agent's: the agent comes back with its
        // backoff, and gets through once the receiver is restarted.
        assert!(e.is_retryable());
        assert!(!e.to_string().contains("damaged"), "{e}");
    }

    #[test]
    fn a_quota_error_has_its_code_and_the_agent_retries_it() {
        let e = ReceiveError::QuotaExceeded {
            server: "web1".into(),
            used: 900,
            needed: 200,
            quota: 1000,
        };
        assert_eq!(e.code(), ErrorCode::QuotaExceeded);
        // Pruning and garbage collection, or a raised quota, make room: the
        // agent comes back with its backoff.
        assert!(e.is_retryable());
        assert!(e.to_string().contains("over its quota"), "{e}");
    }

    #[test]
    fn storage_errors_stay_retryable() {
        let e = ReceiveError::storage("/x", std::io::Error::other("disk"));
        assert_eq!(e.code(), ErrorCode::Storage);
        assert!(e.is_retryable());
    }
}
