//! The start of every connection: TLS accept, the client certificate's
//! identity, and the catalog's say on whether that identity may replicate.
//! Nothing else in the server looks at raw certificates; the rest gets an
//! [`AuthorizedPeer`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::catalog::ServerRow;
use crate::store::{blocking, Store};
use crate::{pki, ReceiveError};

/// A peer whose certificate names an enrolled server whose current,
/// unrevoked identity it is.
#[derive(Debug, Clone)]
pub(crate) struct AuthorizedPeer {
    /// Server name (from the certificate).
    pub(crate) server: String,
    /// The server's catalog row id.
    pub(crate) server_id: i64,
    /// Serial (hex) of the identity presented.
    pub(crate) serial: String,
}

/// Accept TLS on `tcp`: its first byte within `first_byte`, then the whole
/// handshake within `timeout`. A failure is logged and ends the connection:
/// there is no channel yet to report it on.
pub(crate) async fn accept_tls(
    acceptor: &TlsAcceptor,
    tcp: TcpStream,
    (first_byte, timeout): (Duration, Duration),
    peer: SocketAddr,
) -> Option<TlsStream<TcpStream>> {
    let mut one = [0u8; 1];
    match tokio::time::timeout(first_byte, tcp.peek(&mut one)).await {
        Ok(Ok(n)) if n > 0 => {}
        Ok(_) => return None,
        Err(_) => {
            tracing::debug!(%peer, "no first byte in time");
            return None;
        }
    }
    match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) => {
            tracing::info!(%peer, cause = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::info!(%peer, "TLS handshake timed out");
            None
        }
    }
}

/// Who is on the other end of `tls`, and whether the catalog lets them in.
pub(crate) async fn authorize(
    store: &Arc<Store>,
    tls: &TlsStream<TcpStream>,
) -> Result<AuthorizedPeer, ReceiveError> {
    let (server, serial) = pki::peer_identity(tls.get_ref().1.peer_certificates().unwrap_or(&[]))?;
    let store = store.clone();
    let name = server.clone();
    let row = blocking(move || store.catalog()?.server(&name)).await?;
    let server_id = admit(row.as_ref(), &server, &serial)?;
    Ok(AuthorizedPeer {
        server,
        server_id,
        serial,
    })
}

/// Whether the identity `serial` of a server is still the one allowed to
/// replicate: enrolled, current and not revoked. Checked at connect and again
/// right before every commit.
pub(crate) fn still_authorized(row: Option<&ServerRow>, serial: &str) -> bool {
    row.is_some_and(|r| !r.revoked && r.cert_serial.as_deref() == Some(serial))
}

/// The server's row id if `serial` may replicate as `server`, or why not.
pub(crate) fn admit(
    row: Option<&ServerRow>,
    server: &str,
    serial: &str,
) -> Result<i64, ReceiveError> {
    match row {
        Some(r) if still_authorized(Some(r), serial) => Ok(r.id),
        Some(r) if r.revoked => Err(ReceiveError::Unauthorized(format!(
            "the identity of server {server} was revoked"
        ))),
        Some(_) => Err(ReceiveError::Unauthorized(format!(
            "this identity of server {server} was superseded by a newer enrollment"
        ))),
        None => Err(ReceiveError::Unauthorized(format!(
            "server {server} is not enrolled"
        ))),
    }
}

#[cfg(test)]
#[allow(clippy::panic)] // test code
mod tests {
    use super::*;

    fn row(serial: Option<&str>, revoked: bool) -> ServerRow {
        ServerRow {
            id: 7,
            name: "web".into(),
            cert_serial: serial.map(str::to_owned),
            revoked,
        }
    }

    #[test]
    fn admits_the_current_identity_only() {
        let cases: [(Option<ServerRow>, Option<&str>); 4] = [
            (Some(row(Some("ab"), false)), None),
            (Some(row(None, true)), Some("was revoked")),
            (Some(row(Some("cd"), false)), Some("superseded")),
            (None, Some("not enrolled")),
        ];
        for (r, refusal) in cases {
            let got = admit(r.as_ref(), "web", "ab");
            match refusal {
                None => assert_eq!(got.ok(), Some(7)),
                Some(why) => match got {
                    Err(ReceiveError::Unauthorized(m)) => assert!(m.contains(why), "{m}"),
                    other => panic!("expected a refusal ({why}), got {other:?}"),
                },
            }
            assert_eq!(still_authorized(r.as_ref(), "ab"), refusal.is_none());
        }
    }
}
