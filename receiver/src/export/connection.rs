//! One client's connection: the handshake (under a deadline), then
//! transmission until the client leaves or the export stops. Whatever the
//! client sends, the worst outcome is an NBD error or this connection
//! closed: nothing here panics, and other clients are not affected.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use super::disk::Disk;
use super::options::{greet, haggle, ExportInfo, Haggled, Tls};
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
    /// The TLS handshake failed, or the client's certificate is not an
    /// operator identity of this receiver.
    #[error("TLS: {0}")]
    Tls(String),
    /// Our own bug (a disk task that panicked).
    #[error(transparent)]
    Internal(ReceiveError),
}

/// Serve one client to the end: plain NBD without `tls`, else NBD that
/// must `STARTTLS` and present an operator identity of this receiver.
pub(crate) async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    info: &ExportInfo,
    disk: &Arc<Disk>,
    stop: &CancellationToken,
    tls: Option<&tokio_rustls::TlsAcceptor>,
) -> Result<(), ConnError> {
    let Some(acceptor) = tls else {
        return serve_plain(stream, info, disk, stop).await;
    };
    let started = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
    let upgrade = async {
        let no_zeroes = greet(&mut stream).await?;
        match haggle(&mut stream, info, no_zeroes, Tls::Required).await? {
            Haggled::StartTls => {}
            Haggled::Aborted => return Ok(None),
            Haggled::Transmit(_) => return Err(ConnError::Malformed("transmission without TLS")),
        }
        let tls = acceptor
            .accept(stream)
            .await
            .map_err(|e| ConnError::Tls(e.to_string()))?;
        let (_, conn) = tls.get_ref();
        let certs = conn.peer_certificates().unwrap_or_default();
        let operator =
            crate::pki::operator_identity(certs).map_err(|e| ConnError::Tls(e.to_string()))?;
        Ok(Some((tls, operator, no_zeroes)))
    };
    let upgraded = tokio::select! {
        r = tokio::time::timeout_at(started, upgrade) => r.map_err(|_| ConnError::Timeout)??,
        () = stop.cancelled() => return Ok(()),
    };
    let Some((mut tls, operator, no_zeroes)) = upgraded else {
        return Ok(());
    };
    tracing::info!(%operator, export = %info.name, "operator connected over TLS");
    let haggled = tokio::select! {
        r = tokio::time::timeout_at(started, haggle(&mut tls, info, no_zeroes, Tls::Done)) => {
            r.map_err(|_| ConnError::Timeout)??
        }
        () = stop.cancelled() => return Ok(()),
    };
    match haggled {
        Haggled::Aborted | Haggled::StartTls => Ok(()),
        Haggled::Transmit(neg) => transmit(&mut tls, disk, neg, stop).await,
    }
}

/// Plain NBD (loopback or a unix socket).
async fn serve_plain<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    info: &ExportInfo,
    disk: &Arc<Disk>,
    stop: &CancellationToken,
) -> Result<(), ConnError> {
    let handshake = async {
        let no_zeroes = greet(&mut stream).await?;
        haggle(&mut stream, info, no_zeroes, Tls::Off).await
    };
    let haggled = tokio::select! {
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake) => {
            r.map_err(|_| ConnError::Timeout)??
        }
        () = stop.cancelled() => return Ok(()),
    };
    match haggled {
        Haggled::Aborted | Haggled::StartTls => Ok(()),
        Haggled::Transmit(neg) => transmit(&mut stream, disk, neg, stop).await,
    }
}
