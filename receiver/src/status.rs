//! `status`: each server's replication state as an operator reads it, from
//! the catalog, and from `live.json` and `staging.json` of a running
//! `serve`.
//!
//! The state of a server is a pure decision over plain data
//! ([`ServerState::of`]); [`status`] does the reading.

use std::path::Path;

use serde::Serialize;

use crate::catalog::{PointInfo, ServerRow};
use crate::live::Live;
use crate::staging::{StagingFailure, StagingHealth};
use crate::store::Store;
use crate::ReceiveError;

/// What a server is doing, as far as the receiver knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServerState {
    /// The server's identity was revoked.
    Revoked,
    /// No `serve` runs on the receiver directory.
    ReceiverStopped,
    /// The server has a session open.
    Replicating,
    /// The server has no point yet and no session.
    NeverReplicated,
    /// The server has points but no session.
    Disconnected,
}

impl ServerState {
    /// The state of `server`, which has a point (`has_points`) or not, given
    /// what the running `serve` reports (`None`: none runs).
    pub fn of(server: &ServerRow, has_points: bool, live: Option<&Live>) -> Self {
        match (live, server.revoked) {
            (_, true) => Self::Revoked,
            (None, _) => Self::ReceiverStopped,
            (Some(l), _) if l.connected.contains_key(&server.name) => Self::Replicating,
            (Some(_), _) if !has_points => Self::NeverReplicated,
            (Some(_), _) => Self::Disconnected,
        }
    }

    /// The state's name, as in the JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Revoked => "revoked",
            Self::ReceiverStopped => "receiver-stopped",
            Self::Replicating => "replicating",
            Self::NeverReplicated => "never-replicated",
            Self::Disconnected => "disconnected",
        }
    }
}

impl std::fmt::Display for ServerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// One server's line of `status`.
///
/// The fields are in alphabetical order: that is the order of the keys in
/// the JSON output, as it was when a map built it.
#[derive(Debug, Clone, Serialize)]
pub struct ServerStatus {
    /// Bytes in packs of the distinct blocks the server's points reference.
    pub bytes_stored: u64,
    /// How far the agent's clock was ahead of the receiver's (negative:
    /// behind) when the newest point was committed, in seconds. Points are
    /// dated by the receiver's clock; the agent's time is their
    /// `source_time`.
    pub clock_skew_seconds: Option<f64>,
    /// Since when the server's open session runs (RFC 3339).
    pub connected_since: Option<String>,
    /// Seconds from the newest point until now.
    pub lag_seconds: Option<f64>,
    /// Id of the newest point.
    pub last_point: Option<i64>,
    /// Creation time of the newest point (RFC 3339).
    pub last_point_time: Option<String>,
    /// Number of points.
    pub points: usize,
    /// The server's quota in bytes, per `receiver.toml` (`null`: unlimited).
    pub quota: Option<u64>,
    /// Bytes charged to the server's quota: the stored bytes of every
    /// block it has stored (shared with other servers or not; blocks of
    /// pruned points count until the next garbage collection).
    pub quota_used: u64,
    /// Whether the newest point is older than the server's recovery point
    /// objective (`rpo_target`).
    pub rpo_breached: bool,
    /// The server's recovery point objective, in seconds.
    pub rpo_target_seconds: f64,
    /// Server name.
    pub server: String,
    /// Staging images of the server that fail to update (each with its
    /// error and since when); left out of the JSON when there are none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub staging_failures: Vec<StagingFailure>,
    /// What the server is doing.
    pub state: ServerState,
    /// The server's full sync in progress (initial sync or rescan), as of
    /// its last checkpoint; left out of the JSON when there is none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync: Option<SyncStatus>,
    /// The volumes of the newest point.
    pub volumes: Vec<VolumeStatus>,
}

/// A full sync in progress as of its last checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SyncStatus {
    /// Bytes the agent had read.
    pub done_bytes: u64,
    /// Bytes the sync reads in all.
    pub total_bytes: u64,
    /// When the last checkpoint was made durable (RFC 3339).
    pub checkpoint_time: String,
    /// Seconds left at the rate from the first checkpoint to the last.
    pub eta_seconds: Option<f64>,
}

impl SyncStatus {
    /// The status of a catalog's sync row.
    pub fn of(row: &crate::catalog::SyncRow) -> Self {
        let done = row.done_bytes.min(row.total_bytes);
        let secs = (row.updated_ms - row.started_ms).max(0) as f64 / 1000.0;
        let eta_seconds = (done > 0 && secs > 0.0).then(|| {
            let rate = done as f64 / secs;
            (row.total_bytes - done) as f64 / rate
        });
        Self {
            done_bytes: done,
            total_bytes: row.total_bytes,
            checkpoint_time: pilotlight_protocol::clock::rfc3339(row.updated_ms),
            eta_seconds: eta_seconds.map(|s| s.round()),
        }
    }
}

/// One volume of a server's newest point.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeStatus {
    /// Volume name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
}

/// Every server's status, by name. Serializes as a JSON array.
#[derive(Debug, Clone, Serialize)]
#[serde(transparent)]
pub struct Status {
    /// One line per server, by name.
    pub servers: Vec<ServerStatus>,
}

/// The status of every server of the receiver directory `dir`, now.
pub fn status(dir: &Path) -> Result<Status, ReceiveError> {
    let now = pilotlight_protocol::clock::now_ms();
    let staging = StagingHealth::load_running(dir).unwrap_or_default();
    status_with(dir, Live::load_running(dir).as_ref(), &staging, now)
}

/// The status of every server of `dir` at `now_ms`, with `live` as what the
/// running `serve` reports (`None`: none runs).
pub fn status_at(dir: &Path, live: Option<&Live>, now_ms: i64) -> Result<Status, ReceiveError> {
    status_with(dir, live, &StagingHealth::default(), now_ms)
}

/// [`status_at`], with `staging` as the staging failures the running
/// `serve` reports.
pub fn status_with(
    dir: &Path,
    live: Option<&Live>,
    staging: &StagingHealth,
    now_ms: i64,
) -> Result<Status, ReceiveError> {
    let cfg = crate::config::ReceiverConfig::load(dir)?;
    let store = Store::open(dir)?;
    let cat = store.catalog()?;
    let points = cat.points(None)?;
    let mut servers = Vec::new();
    for s in cat.servers()? {
        let mine: Vec<&PointInfo> = points.iter().filter(|p| p.server == s.name).collect();
        let stored = cat.stored_bytes(s.id)?;
        let target = cfg.rpo_target_of(&s.name);
        let mut line = server_status(&s, &mine, stored, live, (now_ms, target));
        line.quota = cfg.quota_of(&s.name);
        line.quota_used = cat.server_usage(s.id)?;
        line.staging_failures = staging.of_server(&s.name).cloned().collect();
        line.sync = cat.sync_of(s.id)?.as_ref().map(SyncStatus::of);
        servers.push(line);
    }
    Ok(Status { servers })
}

/// One server's line from its points (oldest first), the bytes they keep
/// stored, what the running `serve` reports, and the time now with the
/// server's recovery point objective.
pub fn server_status(
    server: &ServerRow,
    points: &[&PointInfo],
    bytes_stored: u64,
    live: Option<&Live>,
    (now_ms, rpo_target): (i64, std::time::Duration),
) -> ServerStatus {
    let last = points.last();
    let lag_seconds = last.map(|p| (now_ms - p.created_ms).max(0) as f64 / 1000.0);
    ServerStatus {
        bytes_stored,
        clock_skew_seconds: last.map(|p| p.source_ms.saturating_sub(p.created_ms) as f64 / 1000.0),
        connected_since: live.and_then(|l| l.connected.get(&server.name).cloned()),
        lag_seconds,
        last_point: last.map(|p| p.id),
        last_point_time: last.map(|p| p.created.clone()),
        points: points.len(),
        quota: None,
        quota_used: 0,
        rpo_breached: crate::rpo::breached(lag_seconds, rpo_target, server.revoked),
        rpo_target_seconds: rpo_target.as_secs_f64(),
        server: server.name.clone(),
        staging_failures: Vec::new(),
        state: ServerState::of(server, last.is_some(), live),
        sync: None,
        volumes: last
            .map(|p| {
                p.volumes
                    .iter()
                    .map(|v| VolumeStatus {
                        name: v.name.clone(),
                        size: v.size,
                    })
                    .collect()
            })
            .unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code
    use std::collections::BTreeMap;

    use super::*;
    use crate::catalog::PointVolumeInfo;

    const FIVE_MIN: std::time::Duration = std::time::Duration::from_secs(300);

    fn server(name: &str, revoked: bool) -> ServerRow {
        ServerRow {
            id: 1,
            name: name.into(),
            cert_serial: None,
            revoked,
        }
    }

    fn point(id: i64, created_ms: i64) -> PointInfo {
        PointInfo {
            id,
            key: id,
            server: "web1".into(),
            created: pilotlight_protocol::clock::rfc3339(created_ms),
            created_ms,
            source_time: pilotlight_protocol::clock::rfc3339(created_ms + 90_000),
            source_ms: created_ms + 90_000,
            consistency: "crash-consistent".into(),
            commit: "sync".into(),
            volumes: vec![PointVolumeInfo {
                name: "root".into(),
                size: 1 << 20,
                changed_bytes: 4096,
                volume_id: 1,
                block_size: 4096,
            }],
        }
    }

    fn live(connected: &[&str]) -> Live {
        Live {
            pid: 1,
            connected: connected
                .iter()
                .map(|s| (s.to_string(), "2026-11-30T10:00:00Z".to_string()))
                .collect::<BTreeMap<_, _>>(),
        }
    }

    #[test]
    fn the_state_follows_revocation_then_serve_then_session_then_points() {
        let web1 = server("web1", false);
        let cases = [
            (server("web1", true), true, Some(live(&["web1"])), "revoked"),
            (web1.clone(), true, None, "receiver-stopped"),
            (web1.clone(), false, Some(live(&["web1"])), "replicating"),
            (
                web1.clone(),
                false,
                Some(live(&["db2"])),
                "never-replicated",
            ),
            (web1.clone(), true, Some(live(&[])), "disconnected"),
        ];
        for (s, has_points, live, want) in cases {
            let got = ServerState::of(&s, has_points, live.as_ref());
            assert_eq!(got.as_str(), want, "{s:?} {has_points} {live:?}");
            assert_eq!(serde_json::to_value(got).unwrap(), want);
        }
    }

    #[test]
    fn a_line_describes_the_newest_point_and_the_lag_since_it() {
        let (p1, p2) = (point(1, 1_000), point(2, 5_000));
        let line = server_status(
            &server("web1", false),
            &[&p1, &p2],
            123,
            Some(&live(&["web1"])),
            (7_500, FIVE_MIN),
        );
        let json = serde_json::to_string(&line).unwrap();
        assert_eq!(
            json,
            r#"{"bytes_stored":123,"clock_skew_seconds":90.0,"connected_since":"2026-11-30T10:00:00Z","lag_seconds":2.5,"last_point":2,"last_point_time":"1970-01-01T00:00:05Z","points":2,"quota":null,"quota_used":0,"rpo_breached":false,"rpo_target_seconds":300.0,"server":"web1","state":"replicating","volumes":[{"name":"root","size":1048576}]}"#
        );
    }

    #[test]
    fn a_failing_staging_image_is_listed_with_its_error_and_since_when() {
        let mut line = server_status(&server("web1", false), &[], 0, None, (7_500, FIVE_MIN));
        let mut health = StagingHealth::new();
        health.fail("web1", Some("root"), "Is a directory".into(), 1_000);
        health.fail("db2", Some("data"), "No space left".into(), 2_000);
        line.staging_failures = health.of_server("web1").cloned().collect();
        let json = serde_json::to_string(&line).unwrap();
        assert!(
            json.contains(r#""server":"web1","staging_failures":[{"attempts":1,"error":"Is a directory","server":"web1","since":"1970-01-01T00:00:01Z","since_ms":1000,"volume":"root"}],"state":"#),
            "{json}"
        );
    }

    #[test]
    fn a_server_without_points_has_no_last_point_and_no_volumes() {
        let line = server_status(&server("db2", false), &[], 0, None, (7_500, FIVE_MIN));
        let json = serde_json::to_string(&line).unwrap();
        assert_eq!(
            json,
            r#"{"bytes_stored":0,"clock_skew_seconds":null,"connected_since":null,"lag_seconds":null,"last_point":null,"last_point_time":null,"points":0,"quota":null,"quota_used":0,"rpo_breached":false,"rpo_target_seconds":300.0,"server":"db2","state":"receiver-stopped","volumes":[]}"#
        );
    }
}
