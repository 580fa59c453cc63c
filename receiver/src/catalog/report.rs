//! What operators read from the catalog: the list of points with their
//! volumes, and the bytes a server's points keep stored.

use pilotlight_protocol::clock::rfc3339;
use rusqlite::params;

use super::Catalog;
use crate::ReceiveError;

/// A point with its volumes, as `points` lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PointInfo {
    /// Point id: its number among its server's points (1, 2, 3, ...), as
    /// agents, `--point` and every report show it.
    pub id: i64,
    /// The catalog's key of the point (unique across servers; internal).
    #[serde(skip)]
    pub key: i64,
    /// Server name.
    pub server: String,
    /// Creation time: the receiver's clock at the commit (RFC 3339).
    pub created: String,
    /// Creation time, milliseconds since the epoch.
    #[serde(skip)]
    pub created_ms: i64,
    /// When the agent says it took the point, by its own clock (RFC 3339).
    pub source_time: String,
    /// The agent's time, milliseconds since the epoch.
    #[serde(skip)]
    pub source_ms: i64,
    /// `crash-consistent` or `fuzzy`.
    pub consistency: String,
    /// `sync` or `async`.
    pub commit: String,
    /// The volumes in the point.
    pub volumes: Vec<PointVolumeInfo>,
}

/// One volume of a point.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PointVolumeInfo {
    /// Volume name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Bytes of blocks that changed since the parent point.
    pub changed_bytes: u64,
    /// Volume row id.
    #[serde(skip)]
    pub volume_id: i64,
    /// Block size.
    #[serde(skip)]
    pub block_size: u32,
}

impl Catalog {
    /// Points, newest last, optionally of one server only.
    pub fn points(&self, server: Option<&str>) -> Result<Vec<PointInfo>, ReceiveError> {
        let mut st = self.conn.prepare(
            "SELECT p.id, s.name, p.created_ms, p.consistency, p.commit_mode, p.source_ms, p.seq
             FROM points p JOIN servers s ON s.id = p.server_id
             WHERE ?1 IS NULL OR s.name = ?1 ORDER BY p.id",
        )?;
        let rows = st.query_map(params![server], |r| {
            Ok(PointInfo {
                id: r.get(6)?,
                key: r.get(0)?,
                server: r.get(1)?,
                created_ms: r.get(2)?,
                created: String::new(),
                source_ms: r.get(5)?,
                source_time: String::new(),
                consistency: r.get(3)?,
                commit: r.get(4)?,
                volumes: Vec::new(),
            })
        })?;
        let mut points: Vec<PointInfo> = rows.collect::<Result<_, _>>()?;
        let mut vst = self.conn.prepare_cached(
            "SELECT v.name, pv.size, pv.changed_bytes, v.id, v.block_size FROM point_volumes pv
             JOIN volumes v ON v.id = pv.volume_id WHERE pv.point_id=?1 ORDER BY v.name",
        )?;
        for p in &mut points {
            p.created = rfc3339(p.created_ms);
            p.source_time = rfc3339(p.source_ms);
            let vols = vst.query_map(params![p.key], |r| {
                Ok(PointVolumeInfo {
                    name: r.get(0)?,
                    size: r.get::<_, i64>(1)? as u64,
                    changed_bytes: r.get::<_, i64>(2)? as u64,
                    volume_id: r.get(3)?,
                    block_size: r.get(4)?,
                })
            })?;
            p.volumes = vols.collect::<Result<_, _>>()?;
        }
        Ok(points)
    }

    /// Bytes in packs of the distinct blocks a server's points reference.
    pub fn stored_bytes(&self, server_id: i64) -> Result<u64, ReceiveError> {
        let n: Option<i64> = self.conn.query_row(
            "SELECT sum(b.stored_len) FROM blocks b WHERE b.hash IN
               (SELECT DISTINCT pb.hash FROM point_blocks pb JOIN volumes v ON v.id = pb.volume_id
                WHERE v.server_id = ?1 AND pb.hash IS NOT NULL)",
            params![server_id],
            |r| r.get(0),
        )?;
        Ok(n.unwrap_or(0).max(0) as u64)
    }
}
