//! The `volumes` table: each server's volumes, their size at the latest
//! point and the point their staging image equals.

use rusqlite::{params, OptionalExtension};

use super::Catalog;
use crate::ReceiveError;

/// A volume row.
#[derive(Debug, Clone)]
pub struct VolumeRow {
    /// Row id.
    pub id: i64,
    /// Volume name.
    pub name: String,
    /// Block size.
    pub block_size: u32,
    /// Size at the latest point.
    pub size: u64,
    /// The point the staging image is known to equal.
    pub staging_point: i64,
}

impl Catalog {
    /// The volume `name` of server `server_id`.
    pub fn volume(&self, server_id: i64, name: &str) -> Result<Option<VolumeRow>, ReceiveError> {
        Ok(self
            .conn
            .query_row(
                "SELECT id, name, block_size, size, staging_point FROM volumes WHERE server_id=?1 AND name=?2",
                params![server_id, name],
                volume_row,
            )
            .optional()?)
    }

    /// All volumes of a server.
    pub fn volumes(&self, server_id: i64) -> Result<Vec<VolumeRow>, ReceiveError> {
        let mut st = self.conn.prepare(
            "SELECT id, name, block_size, size, staging_point FROM volumes WHERE server_id=?1 ORDER BY name",
        )?;
        let rows = st.query_map(params![server_id], volume_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Check a declared volume against the catalog: the block size of an
    /// existing volume is fixed. Creates nothing (the first commit does).
    pub fn check_volume(
        &self,
        server_id: i64,
        name: &str,
        block_size: u32,
    ) -> Result<(), ReceiveError> {
        if let Some(v) = self.volume(server_id, name)? {
            if v.block_size != block_size {
                return Err(ReceiveError::Protocol(format!(
                    "volume {name} has block size {} on this receiver; the agent declared {block_size}",
                    v.block_size
                )));
            }
        }
        Ok(())
    }

    /// Record that the staging image of a volume equals `point`.
    pub fn set_staging_point(&mut self, volume_id: i64, point: i64) -> Result<(), ReceiveError> {
        self.conn.execute(
            "UPDATE volumes SET staging_point=?2 WHERE id=?1",
            params![volume_id, point],
        )?;
        Ok(())
    }
}

fn volume_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<VolumeRow> {
    Ok(VolumeRow {
        id: r.get(0)?,
        name: r.get(1)?,
        block_size: r.get(2)?,
        size: r.get::<_, i64>(3)? as u64,
        staging_point: r.get(4)?,
    })
}
