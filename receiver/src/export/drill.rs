//! A drill: every volume of a point exported writable, each over its own
//! overlay and unix socket, so that a test machine can boot from the point
//! while replication goes on. The overlays are discarded when the drill
//! stops: a drill never changes a stored point.

use std::path::{Path, PathBuf};

use tokio_util::sync::CancellationToken;

use super::{Export, ExportRequest, Listen};
use crate::restore::{resolve_point, PointSel};
use crate::store::{blocking, create_private_dir, Store};
use crate::ReceiveError;

/// What to drill.
#[derive(Debug, Clone)]
pub struct DrillRequest {
    /// Server name.
    pub server: String,
    /// Which point.
    pub point: PointSel,
    /// Folder for the sockets (`VOLUME.sock`), created if missing.
    pub socket_dir: PathBuf,
}

/// A running drill: one writable export per volume of the point.
pub struct Drill {
    point: i64,
    exports: Vec<(String, Export)>,
}

impl Drill {
    /// Resolve the point once, then export each of its volumes.
    pub async fn open(dir: &Path, req: &DrillRequest) -> Result<Self, ReceiveError> {
        let (d, r) = (dir.to_owned(), req.clone());
        let point = blocking(move || resolve_point(&Store::open(&d)?, &r.server, r.point)).await?;
        let sockets = req.socket_dir.clone();
        blocking(move || create_private_dir(&sockets)).await?;
        let mut exports = Vec::new();
        for vol in &point.volumes {
            let ereq = ExportRequest {
                server: req.server.clone(),
                volume: vol.name.clone(),
                point: PointSel::Id(point.id),
                listen: Listen::Unix(req.socket_dir.join(format!("{}.sock", vol.name))),
                writable: true,
                keep_overlay: None,
                tls: false,
            };
            exports.push((vol.name.clone(), Export::open(dir, &ereq).await?));
        }
        Ok(Self {
            point: point.id,
            exports,
        })
    }

    /// The drilled point.
    pub fn point(&self) -> i64 {
        self.point
    }

    /// `(volume, URI)` of each export.
    pub fn uris(&self) -> Vec<(String, String)> {
        self.exports
            .iter()
            .map(|(v, e)| (v.clone(), e.uri().to_owned()))
            .collect()
    }

    /// How to attach the volumes: a `qemu-system` `-drive` line per volume
    /// and an `nbdfuse` line per volume.
    pub fn attach_lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (volume, uri) in self.uris() {
            out.push(format!(
                "{volume}: qemu-system-x86_64 ... -drive file={uri},format=raw,if=virtio\n{volume}: mkdir -p /mnt/{volume} && nbdfuse /mnt/{volume} '{uri}'"
            ));
        }
        out
    }

    /// Serve every export until `stop`; each discards its overlay.
    pub async fn serve(self, stop: CancellationToken) -> Result<(), ReceiveError> {
        let mut tasks = tokio::task::JoinSet::new();
        for (_, e) in self.exports {
            tasks.spawn(e.serve(stop.clone()));
        }
        let mut first = Ok(());
        while let Some(r) = tasks.join_next().await {
            let r = r
                .map_err(|e| ReceiveError::join("drill export", e))
                .and_then(|r| r);
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}
