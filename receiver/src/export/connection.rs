//! One client's connection: the handshake (under a deadline), then
//! transmission until the client leaves or the export stops. Whatever the
//! client sends, the worst outcome is an NBD error or this connection
//! closed: nothing here panics, and other clients are not affected.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use super::disk::Disk;
use super::options::{negotiate, ExportInfo, Haggled};
use super::transmission::transmit;
use crate::ReceiveError;

/// How long a client may take from connecting to starting transmission.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnError {
    /// The socket failed or the client went away.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    /// The client sent bytes that are not NBD.
    #[error("malformed: {0}")]
    Malformed(&'static str),
    /// The client asked for more than a limit allows.
    #[error("{what} of {len} bytes is over the limit")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// Its length.
        len: u64,
    },
    /// `NBD_OPT_EXPORT_NAME` with a name we do not export (the protocol
    /// has no way to say so but closing).
    #[error("unknown export name")]
    UnknownExport,
    /// The handshake took too long.
    #[error("handshake timed out")]
    Timeout,
    /// Our own bug (a disk task that panicked).
    #[error(transparent)]
    Internal(ReceiveError),
}

/// Serve one client to the end.
pub(crate) async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    info: &ExportInfo,
    disk: &Arc<Disk>,
    stop: &CancellationToken,
) -> Result<(), ConnError> {
    let haggled = tokio::select! {
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, negotiate(&mut stream, info)) => {
            r.map_err(|_| ConnError::Timeout)??
        }
        () = stop.cancelled() => return Ok(()),
    };
    match haggled {
        Haggled::Aborted => Ok(()),
        Haggled::Transmit(neg) => transmit(&mut stream, disk, neg, stop).await,
    }
}
