//! `serve --console ADDR`: a read-only web console of the receiver, served
//! by `serve` itself. HTML is rendered here (`pages`), with inline SVG
//! charts (`chart`) and no JavaScript; `/api/` serves the same data as
//! JSON for scripts.
//!
//! On a loopback address the console speaks plain HTTP to loopback clients.
//! On any other address it speaks only TLS, with a client certificate of an
//! operator identity issued by the receiver's CA (`enroll --operator NAME`):
//! a source server's identity, or none, is refused at the handshake. A
//! plain-HTTP console never answers a client that is not on loopback.

mod chart;
mod pages;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::ReceiveError;

/// How long a client has for its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more wait in the accept queue.
const MAX_CONNECTIONS: usize = 64;

/// How the console is reached.
pub struct Console {
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    dir: PathBuf,
}

impl Console {
    /// Bind `addr` for the receiver directory `dir`. TLS with operator
    /// identities when `tls` is set or the address is not loopback.
    pub async fn bind(addr: &str, dir: PathBuf, tls: bool) -> Result<Self, ReceiveError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| ReceiveError::Refused(format!("console cannot listen on {addr}: {e}")))?;
        let local = listener.local_addr().map_err(ReceiveError::Net)?;
        let tls = if needs_tls(local, tls) {
            Some(TlsAcceptor::from(crate::pki::operator_server_config(&dir)?))
        } else {
            None
        };
        Ok(Self { listener, tls, dir })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> Result<SocketAddr, ReceiveError> {
        self.listener.local_addr().map_err(ReceiveError::Net)
    }

    /// The console's base URL.
    pub fn url(&self) -> Result<String, ReceiveError> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        Ok(format!("{scheme}://{}/", self.local_addr()?))
    }

    /// Serve until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let router = pages::router(Arc::new(self.dir));
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        loop {
            let permit = tokio::select! {
                () = shutdown.cancelled() => return,
                p = slots.clone().acquire_owned() => p,
            };
            let Ok(permit) = permit else {
                return;
            };
            let (stream, peer) = tokio::select! {
                () = shutdown.cancelled() => return,
                r = self.listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!("console accept: {e}");
                        continue;
                    }
                },
            };
            let tls = self.tls.clone();
            let router = router.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let _permit = permit;
                tokio::select! {
                    () = shutdown.cancelled() => {}
                    () = connection(stream, peer, tls, router) => {}
                }
            });
        }
    }
}

/// Whether a console on `local` speaks TLS with operator identities: asked
/// for, or on any address other than loopback.
fn needs_tls(local: SocketAddr, asked: bool) -> bool {
    asked || !local.ip().is_loopback()
}

/// One client: the TLS handshake and identity check where the console needs
/// them, the loopback check where it does not, then HTTP/1.1.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    router: axum::Router,
) {
    let service = TowerToHyperService::new(router);
    let http = hyper::server::conn::http1::Builder::new();
    match tls {
        None if !peer.ip().is_loopback() => {
            tracing::warn!(%peer, "console: refused a client not on loopback (plain HTTP serves loopback only)");
        }
        None => {
            if let Err(e) = http.serve_connection(TokioIo::new(stream), service).await {
                tracing::debug!(%peer, "console connection: {e}");
            }
        }
        Some(acceptor) => {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::warn!(%peer, "console: TLS handshake refused: {e}");
                    return;
                }
                Err(_) => {
                    tracing::warn!(%peer, "console: TLS handshake timed out");
                    return;
                }
            };
            let certs = tls.get_ref().1.peer_certificates().unwrap_or_default();
            match crate::pki::operator_identity(certs) {
                Ok(name) => tracing::info!(%peer, operator = %name, "console: operator connected"),
                Err(e) => {
                    tracing::warn!(%peer, "console: refused: {e}");
                    return;
                }
            }
            if let Err(e) = http.serve_connection(TokioIo::new(tls), service).await {
                tracing::debug!(%peer, "console connection: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_may_be_plain() {
        let at = |a: &str| a.parse::<SocketAddr>().unwrap();
        assert!(!needs_tls(at("127.0.0.1:8080"), false));
        assert!(!needs_tls(at("[::1]:8080"), false));
        assert!(needs_tls(at("127.0.0.1:8080"), true));
        assert!(needs_tls(at("0.0.0.0:8080"), false));
        assert!(needs_tls(at("[::]:8080"), false));
        assert!(needs_tls(at("10.1.2.3:8080"), false));
    }
}
