//! The `restore_grants` table (schema version 5): which server may restore
//! the volumes of which other server over the network (fail back: `web1`
//! restores from `web1-recovery`). A server always restores its own volumes;
//! anything else needs a row here, written by `pilotlight-receiver grant`.

use rusqlite::{params, OptionalExtension};

use super::Catalog;
use crate::ReceiveError;

/// One grant: `server` may restore the volumes of `from`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RestoreGrant {
    /// The server that restores.
    pub server: String,
    /// The server whose volumes it may restore.
    pub restore_from: String,
    /// When the grant was made (ms since the epoch, receiver's clock).
    pub granted_ms: i64,
}

impl Catalog {
    /// Let `server` restore the volumes of `from`; both must be enrolled.
    /// Returns false when the grant existed already.
    pub fn grant_restore(&mut self, server: &str, from: &str) -> Result<bool, ReceiveError> {
        let to = self.require_server(server)?;
        let src = self.require_server(from)?;
        if to.id == src.id {
            return Err(ReceiveError::Refused(format!(
                "server {server} restores its own volumes without a grant"
            )));
        }
        let n = self.conn.execute(
            "INSERT OR IGNORE INTO restore_grants(server_id, from_server_id, granted_ms)
             VALUES(?1, ?2, ?3)",
            params![to.id, src.id, pilotlight_protocol::clock::now_ms()],
        )?;
        Ok(n > 0)
    }

    /// Withdraw the grant that lets `server` restore the volumes of `from`.
    /// Returns false when there was none.
    pub fn revoke_restore(&mut self, server: &str, from: &str) -> Result<bool, ReceiveError> {
        let to = self.require_server(server)?;
        let src = self.require_server(from)?;
        let n = self.conn.execute(
            "DELETE FROM restore_grants WHERE server_id=?1 AND from_server_id=?2",
            params![to.id, src.id],
        )?;
        Ok(n > 0)
    }

    /// Whether the server with row id `server_id` may restore the volumes
    /// of the server with row id `from_id` (always, for its own).
    pub fn may_restore(&self, server_id: i64, from_id: i64) -> Result<bool, ReceiveError> {
        if server_id == from_id {
            return Ok(true);
        }
        Ok(self
            .conn
            .query_row(
                "SELECT 1 FROM restore_grants WHERE server_id=?1 AND from_server_id=?2",
                params![server_id, from_id],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    /// Every grant, by server then source.
    pub fn restore_grants(&self) -> Result<Vec<RestoreGrant>, ReceiveError> {
        let mut st = self.conn.prepare(
            "SELECT s.name, f.name, g.granted_ms FROM restore_grants g
               JOIN servers s ON s.id = g.server_id
               JOIN servers f ON f.id = g.from_server_id
             ORDER BY s.name, f.name",
        )?;
        let rows = st.query_map([], |r| {
            Ok(RestoreGrant {
                server: r.get(0)?,
                restore_from: r.get(1)?,
                granted_ms: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // test code
mod tests {
    use super::*;

    fn catalog() -> (tempfile::TempDir, Catalog) {
        let dir = tempfile::tempdir().unwrap();
        let mut cat = Catalog::open(&dir.path().join("catalog.db")).unwrap();
        cat.set_identity("web1", "aa").unwrap();
        cat.set_identity("web1-recovery", "bb").unwrap();
        (dir, cat)
    }

    #[test]
    fn a_grant_lets_one_server_restore_anothers_volumes_one_way_until_revoked() {
        let (_dir, mut cat) = catalog();
        let web1 = cat.require_server("web1").unwrap().id;
        let rec = cat.require_server("web1-recovery").unwrap().id;
        assert!(cat.may_restore(web1, web1).unwrap());
        assert!(!cat.may_restore(web1, rec).unwrap());
        assert!(cat.grant_restore("web1", "web1-recovery").unwrap());
        assert!(!cat.grant_restore("web1", "web1-recovery").unwrap());
        assert!(cat.may_restore(web1, rec).unwrap());
        assert!(!cat.may_restore(rec, web1).unwrap(), "one way only");
        assert_eq!(cat.restore_grants().unwrap().len(), 1);
        assert!(cat.revoke_restore("web1", "web1-recovery").unwrap());
        assert!(!cat.revoke_restore("web1", "web1-recovery").unwrap());
        assert!(!cat.may_restore(web1, rec).unwrap());
        assert!(cat.restore_grants().unwrap().is_empty());
    }

    #[test]
    fn grants_name_enrolled_servers() {
        let (_dir, mut cat) = catalog();
        assert!(matches!(
            cat.grant_restore("web1", "nobody"),
            Err(ReceiveError::NotFound(_))
        ));
        assert!(matches!(
            cat.grant_restore("web1", "web1"),
            Err(ReceiveError::Refused(_))
        ));
    }
}
