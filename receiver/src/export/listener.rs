//! Where an export listens: a unix socket, or TCP on a loopback address.
//! Plain NBD has neither encryption nor authentication, so a TCP address
//! that is not loopback is refused (NBD over TLS with an operator identity
//! is the next step). Also the export's URI, as `nbdinfo`, `nbdcopy`,
//! `qemu-img` and `nbdfuse` take it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};

use crate::ReceiveError;

/// Where to listen.
#[derive(Debug, Clone)]
pub enum Listen {
    /// TCP, loopback only (`127.0.0.1:10809`, `[::1]:0`, ...).
    Tcp(String),
    /// A unix socket at this path (created; removed when the export stops).
    Unix(PathBuf),
}

/// A bound listener.
pub(crate) enum Bound {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// A stream to a client.
pub(crate) trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> ClientStream for T {}

impl Bound {
    /// Bind `listen`; without `tls`, TCP only on a loopback address.
    pub(crate) async fn bind(listen: &Listen, tls: bool) -> Result<Self, ReceiveError> {
        match listen {
            Listen::Tcp(addr) => {
                let parsed: SocketAddr = addr.parse().map_err(|_| {
                    ReceiveError::Refused(format!("--listen {addr:?} is not an address (ip:port)"))
                })?;
                if !tls && !parsed.ip().is_loopback() {
                    return Err(ReceiveError::Refused(format!(
                        "--listen {addr}: plain NBD is only served on loopback (127.0.0.1, ::1) or a unix socket (--socket); add --tls to serve it over TLS to operator identities (`enroll --operator`)"
                    )));
                }
                let l = TcpListener::bind(parsed).await.map_err(ReceiveError::Net)?;
                Ok(Self::Tcp(l))
            }
            Listen::Unix(path) => {
                let l = UnixListener::bind(path).map_err(|e| ReceiveError::storage(path, e))?;
                Ok(Self::Unix(l, path.clone()))
            }
        }
    }

    /// The URI of export `name` on this listener (`nbds://` with `tls`).
    pub(crate) fn uri(&self, name: &str, tls: bool) -> Result<String, ReceiveError> {
        match self {
            Self::Tcp(l) => {
                let addr = l.local_addr().map_err(ReceiveError::Net)?;
                let scheme = if tls { "nbds" } else { "nbd" };
                Ok(format!("{scheme}://{addr}/{name}"))
            }
            Self::Unix(_, path) => {
                let abs = std::path::absolute(path).map_err(|e| ReceiveError::storage(path, e))?;
                Ok(format!("nbd+unix:///{name}?socket={}", abs.display()))
            }
        }
    }

    /// The next client, and a name for it in logs.
    pub(crate) async fn accept(&self) -> std::io::Result<(Box<dyn ClientStream>, String)> {
        match self {
            Self::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok((Box::new(s), peer.to_string()))
            }
            Self::Unix(l, _) => {
                let (s, _) = l.accept().await?;
                Ok((Box::new(s), "unix".into()))
            }
        }
    }

    /// Remove the socket file, if any.
    pub(crate) fn close(self) {
        if let Self::Unix(l, path) = self {
            drop(l);
            remove_socket(&path);
        }
    }
}

fn remove_socket(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        tracing::warn!(socket = %path.display(), cause = %e, "could not remove the socket");
    }
}
