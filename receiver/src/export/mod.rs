//! Instant export: serve a recovery point of one volume as a block device
//! over NBD, straight from the store, while replication goes on.
//!
//! ```text
//! Export::open: store (read-only, no serve.lock) -> resolve the point
//!               -> pin (exports/PID-POINT-VOLUME.pin, flock'd) -> block map
//!               -> overlay (--writable) -> listener (unix socket, loopback TCP)
//! Export::serve: accept loop (at most MAX_CLIENTS at once)
//!   -> connection: options (fixed newstyle haggling) -> transmission
//!        -> disk: overlay over image (packs, BLAKE3 on every read, cache)
//! ```
//!
//! Rooms: `wire` (NBD numbers and layouts), `options` (handshake and
//! option haggling), `transmission` (requests), `reply` (a READ's answer:
//! data and hole chunks, vectored writes), `connection` (one
//! client), `listener` (socket, URI), `disk` / `image` / `cache` /
//! `overlay` (what is served), `pin` (kept from prune while exported),
//! `drill` (every volume of a point, writable, overlays discarded).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::restore::{resolve_point, PointSel};
use crate::store::{blocking, Store};
use crate::ReceiveError;

mod cache;
mod connection;
mod disk;
mod drill;
mod image;
mod listener;
mod options;
mod overlay;
pub mod pin;
mod reply;
mod transmission;
mod wire;

pub use drill::{Drill, DrillRequest};
pub use listener::Listen;

use disk::Disk;
use image::PointImage;
use listener::Bound;
use options::ExportInfo;

/// Clients served at once; one more is closed at once.
pub const MAX_CLIENTS: usize = 16;

/// What to export, and how.
#[derive(Debug, Clone)]
pub struct ExportRequest {
    /// Server name.
    pub server: String,
    /// Volume name.
    pub volume: String,
    /// Which point.
    pub point: PointSel,
    /// Where to listen.
    pub listen: Listen,
    /// Accept writes, into a copy-on-write overlay.
    pub writable: bool,
    /// Keep the overlay at this path when the export stops.
    pub keep_overlay: Option<PathBuf>,
    /// Serve NBD over TLS (`STARTTLS` required) to operator identities of
    /// this receiver (`enroll --operator`); needed off loopback.
    pub tls: bool,
}

/// An export, bound and ready for clients.
pub struct Export {
    server: String,
    volume: String,
    point: i64,
    info: Arc<ExportInfo>,
    disk: Arc<Disk>,
    bound: Bound,
    uri: String,
    /// With `--tls`: the handshake after `STARTTLS`.
    tls: Option<tokio_rustls::TlsAcceptor>,
    _pin: pin::Pin,
}

impl Export {
    /// Resolve and pin the point, load its block map and bind the listener.
    pub async fn open(dir: &Path, req: &ExportRequest) -> Result<Self, ReceiveError> {
        if req.keep_overlay.is_some() && !req.writable {
            return Err(ReceiveError::Refused(
                "--keep-overlay needs --writable: a read-only export has no overlay".into(),
            ));
        }
        let (dir2, req2) = (dir.to_owned(), req.clone());
        let (disk, point, pin) = blocking(move || prepare(&dir2, &req2)).await?;
        let tls = if req.tls {
            let cfg = crate::pki::operator_server_config(dir)?;
            Some(tokio_rustls::TlsAcceptor::from(cfg))
        } else {
            None
        };
        let bound = Bound::bind(&req.listen, req.tls).await?;
        let name = format!("{}/{}", req.server, req.volume);
        let uri = bound.uri(&name, req.tls)?;
        let mut flags = wire::TF_HAS_FLAGS | wire::TF_SEND_FLUSH | wire::TF_CAN_MULTI_CONN;
        flags |= if disk.writable() {
            wire::TF_SEND_FUA | wire::TF_SEND_TRIM | wire::TF_SEND_WRITE_ZEROES
        } else {
            wire::TF_READ_ONLY
        };
        let info = ExportInfo {
            description: format!(
                "pilotlight point {point} of {name}{}",
                if disk.writable() {
                    " (writable overlay)"
                } else {
                    ""
                }
            ),
            name,
            size: disk.size(),
            flags,
            preferred_block: disk.block_size().clamp(512, wire::MAX_PAYLOAD),
        };
        Ok(Self {
            server: req.server.clone(),
            volume: req.volume.clone(),
            point,
            info: Arc::new(info),
            disk: Arc::new(disk),
            bound,
            uri,
            tls,
            _pin: pin,
        })
    }

    /// The URI clients connect to.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The exported point.
    pub fn point(&self) -> i64 {
        self.point
    }

    /// Serve clients until `stop`; then close them, drop (or keep) the
    /// overlay, remove the socket and the pin.
    pub async fn serve(self, stop: CancellationToken) -> Result<(), ReceiveError> {
        let clients = Arc::new(Semaphore::new(MAX_CLIENTS));
        let tracker = TaskTracker::new();
        loop {
            let (stream, peer) = tokio::select! {
                () = stop.cancelled() => break,
                accepted = self.bound.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(cause = %e, "accept failed");
                        continue;
                    }
                },
            };
            let Ok(permit) = clients.clone().try_acquire_owned() else {
                tracing::warn!(%peer, limit = MAX_CLIENTS, "too many clients: connection closed");
                continue;
            };
            let (info, disk, stop) = (self.info.clone(), self.disk.clone(), stop.clone());
            let tls = self.tls.clone();
            tracker.spawn(async move {
                let _permit = permit;
                tracing::debug!(%peer, "client connected");
                match connection::serve(stream, &info, &disk, &stop, tls.as_ref()).await {
                    Ok(()) => tracing::debug!(%peer, "client left"),
                    Err(e) => tracing::info!(%peer, cause = %e, "client connection closed"),
                }
            });
        }
        tracker.close();
        tracker.wait().await;
        self.bound.close();
        let Self {
            server,
            volume,
            point,
            disk,
            ..
        } = self;
        blocking(move || disk.finish(&server, &volume, point)).await
    }
}

/// The blocking part of [`Export::open`]: the point, pinned, and its disk.
fn prepare(dir: &Path, req: &ExportRequest) -> Result<(Disk, i64, pin::Pin), ReceiveError> {
    let store = Store::open(dir)?;
    let point = resolve_point(&store, &req.server, req.point)?;
    let vol = point
        .volumes
        .iter()
        .find(|v| v.name == req.volume)
        .cloned()
        .ok_or_else(|| {
            ReceiveError::NotFound(format!(
                "volume {} is not part of point {} of server {}",
                req.volume, point.id, req.server
            ))
        })?;
    // Pins name the catalog key: point ids are numbered per server.
    let pin = pin::pin(dir, &req.server, &req.volume, point.key, || {
        let there = store
            .catalog()?
            .points(Some(&req.server))?
            .iter()
            .any(|p| p.key == point.key);
        if there {
            Ok(())
        } else {
            Err(ReceiveError::NotFound(format!(
                "point {} of server {} was pruned meanwhile",
                point.id, req.server
            )))
        }
    })?;
    let image = PointImage::open(store, &vol, point.key)?;
    let disk = Disk::new(dir, image, req.writable, req.keep_overlay.as_deref())?;
    Ok((disk, point.id, pin))
}
