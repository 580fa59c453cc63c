//! The `servers` table: each enrolled server and the identity it may use.

use rusqlite::{params, OptionalExtension};

use super::Catalog;
use crate::ReceiveError;

/// A server row.
#[derive(Debug, Clone)]
pub struct ServerRow {
    /// Row id.
    pub id: i64,
    /// Server name.
    pub name: String,
    /// Serial (hex) of the identity currently allowed, if any.
    pub cert_serial: Option<String>,
    /// Whether the server's identity was revoked.
    pub revoked: bool,
}

impl Catalog {
    /// Record a newly enrolled identity for `name` (creating the server).
    pub fn set_identity(&mut self, name: &str, serial: &str) -> Result<(), ReceiveError> {
        self.conn.execute(
            "INSERT INTO servers(name, cert_serial, revoked) VALUES(?1, ?2, 0)
             ON CONFLICT(name) DO UPDATE SET cert_serial=excluded.cert_serial, revoked=0",
            params![name, serial],
        )?;
        Ok(())
    }

    /// Revoke the current identity of `name`.
    pub fn revoke(&mut self, name: &str) -> Result<bool, ReceiveError> {
        let n = self.conn.execute(
            "UPDATE servers SET revoked=1, cert_serial=NULL WHERE name=?1",
            params![name],
        )?;
        Ok(n > 0)
    }

    /// The server called `name`, or the error an operator sees when it does
    /// not exist.
    pub fn require_server(&self, name: &str) -> Result<ServerRow, ReceiveError> {
        self.server(name)?.ok_or_else(|| no_such_server(name))
    }

    /// The server called `name`, if it exists.
    pub fn server(&self, name: &str) -> Result<Option<ServerRow>, ReceiveError> {
        Ok(self
            .conn
            .query_row(
                "SELECT id, name, cert_serial, revoked FROM servers WHERE name=?1",
                params![name],
                server_row,
            )
            .optional()?)
    }

    /// All servers, by name.
    pub fn servers(&self) -> Result<Vec<ServerRow>, ReceiveError> {
        let mut st = self
            .conn
            .prepare("SELECT id, name, cert_serial, revoked FROM servers ORDER BY name")?;
        let rows = st.query_map([], server_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

fn server_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ServerRow> {
    Ok(ServerRow {
        id: r.get(0)?,
        name: r.get(1)?,
        cert_serial: r.get(2)?,
        revoked: r.get::<_, i64>(3)? != 0,
    })
}

/// The error for a server name the receiver does not know.
pub fn no_such_server(name: &str) -> ReceiveError {
    ReceiveError::NotFound(format!("there is no server named {name} on this receiver"))
}
