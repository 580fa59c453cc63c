//! The catalog journal: every change to the catalog since the last
//! snapshot is in the bucket before the point that made it is
//! acknowledged `DURABLE`.
//!
//! **Capture.** When the directory has a store, triggers on every catalog
//! table (`install`: any table, so one a later schema adds is followed
//! too) append the key of each row an `INSERT`, `UPDATE` or `DELETE`
//! touches to `journal(id, tbl, k1..k4)` (schema version 7), in the very
//! transaction that touches it.
//!
//! **Ship** (`Offsite::ship`). In one read transaction: the journal's ids
//! `FROM..=TO` and, for every key they name, the row as it is now or that
//! no row has it (a tombstone: pruned points, blocks GC dropped). They go
//! up as one record, tombstones first, then rows, then `sqlite_sequence`,
//! in sealed parts (`record`); then ids `..=TO` leave the journal.
//! A record is the catalog as it was at its read, for every row changed
//! since the previous record.
//!
//! ```text
//! journal/TO-FROM/PART        part PART (5 digits) of the record of ids FROM..=TO
//! journal/TO-FROM/PART.last   its last part              (TO, FROM: 20 digits)
//! ```
//!
//! **Order in a commit:** packs in the bucket, the SQLite commit (its
//! journal rows with it), the ship, `DURABLE`. A crash between the commit
//! and the ship leaves journal rows that the next ship sends (`serve`
//! ships when it starts): such a point was never acknowledged, and is not
//! lost either. Garbage collection ships before it deletes objects.
//!
//! **Rebuild** ([`super::replay`]): the newest snapshot, whose
//! `sqlite_sequence` says up to which journal id it includes, then every
//! whole record after that in order of TO. A snapshot trims the records it
//! covers.

use rusqlite::types::Value;
use rusqlite::{Connection, Transaction, TransactionBehavior};

use super::crypto::seal_all;
use super::record::{PartWriter, TableShape};
use super::{Offsite, OffsiteError};
use crate::store::CATALOG_FILE;

/// Key columns a journal row holds (`k1..k4`).
pub(crate) const KEY_COLS: usize = 4;
/// Where records go, under the prefix.
pub(crate) const JOURNAL_DIR: &str = "journal";

/// The object name of part `part` of the record of ids `from..=to`.
pub(crate) fn record_name(to: u64, from: u64, part: u32, last: bool) -> String {
    let tail = if last { ".last" } else { "" };
    format!("{JOURNAL_DIR}/{to:020}-{from:020}/{part:05}{tail}")
}

/// `(to, from, part, last)` of a record part's name.
pub(crate) fn parse_record_name(name: &str) -> Option<(u64, u64, u32, bool)> {
    let rest = name.strip_prefix(JOURNAL_DIR)?.strip_prefix('/')?;
    let (range, part) = rest.split_once('/')?;
    let (to, from) = range.split_once('-')?;
    let (part, last) = match part.strip_suffix(".last") {
        Some(p) => (p, true),
        None => (part, false),
    };
    Some((
        to.parse().ok()?,
        from.parse().ok()?,
        part.parse().ok()?,
        last,
    ))
}

fn sql_err(e: rusqlite::Error) -> OffsiteError {
    OffsiteError::local(std::path::Path::new(CATALOG_FILE), std::io::Error::other(e))
}

/// A name we put in SQL text: only our own tables and columns qualify.
pub(crate) fn plain_identifier(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The tables the journal follows, as the catalog has them now: every
/// table but SQLite's own and the journal.
pub(crate) fn shapes(conn: &Connection) -> Result<Vec<TableShape>, OffsiteError> {
    let mut stmt = conn
        .prepare(
            "SELECT name FROM sqlite_master WHERE type = 'table'
               AND name NOT LIKE 'sqlite_%' AND name <> 'journal' ORDER BY name",
        )
        .map_err(sql_err)?;
    let names: Vec<String> = stmt
        .query_map([], |r| r.get(0))
        .and_then(Iterator::collect)
        .map_err(sql_err)?;
    let mut info = conn
        .prepare("SELECT name, pk FROM pragma_table_info(?1) ORDER BY cid")
        .map_err(sql_err)?;
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let cols: Vec<(String, i64)> = info
            .query_map([&name], |r| Ok((r.get(0)?, r.get(1)?)))
            .and_then(Iterator::collect)
            .map_err(sql_err)?;
        let mut pk: Vec<(i64, String)> = cols
            .iter()
            .filter(|(_, k)| *k > 0)
            .map(|(c, k)| (*k, c.clone()))
            .collect();
        pk.sort();
        let mut all: Vec<String> = cols.into_iter().map(|(c, _)| c).collect();
        let keys: Vec<String> = if pk.is_empty() {
            // No declared key: the rowid is the key, and travels with the row.
            all.insert(0, "rowid".into());
            vec!["rowid".into()]
        } else {
            pk.into_iter().map(|(_, c)| c).collect()
        };
        if keys.len() > KEY_COLS
            || !plain_identifier(&name)
            || !all.iter().all(|c| plain_identifier(c))
        {
            return Err(OffsiteError::Damaged {
                object: format!("catalog table {name}"),
                why: "the journal cannot follow it (a key of more than 4 columns, or an unusual name)",
            });
        }
        out.push(TableShape {
            name,
            keys,
            cols: all,
        });
    }
    Ok(out)
}

/// The three triggers that journal the rows of `t`: name and SQL.
fn triggers(t: &TableShape) -> [(String, String); 3] {
    let n = &t.name;
    let cols: Vec<String> = (1..=t.keys.len()).map(|i| format!("k{i}")).collect();
    let cols = cols.join(", ");
    let side = |s: &str| -> String {
        t.keys
            .iter()
            .map(|k| format!("{s}.\"{k}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (new, old) = (side("NEW"), side("OLD"));
    let moved = t
        .keys
        .iter()
        .map(|k| format!("NEW.\"{k}\" IS NOT OLD.\"{k}\""))
        .collect::<Vec<_>>()
        .join(" OR ");
    let head = |op: &str| format!("CREATE TRIGGER \"journal_{n}_{op}\" AFTER");
    [
        (
            format!("journal_{n}_ins"),
            format!("{} INSERT ON \"{n}\" BEGIN INSERT INTO journal(tbl, {cols}) VALUES('{n}', {new}); END", head("ins")),
        ),
        (
            format!("journal_{n}_del"),
            format!("{} DELETE ON \"{n}\" BEGIN INSERT INTO journal(tbl, {cols}) VALUES('{n}', {old}); END", head("del")),
        ),
        (
            format!("journal_{n}_upd"),
            format!(
                "{} UPDATE ON \"{n}\" BEGIN INSERT INTO journal(tbl, {cols}) VALUES('{n}', {old}); \
                 INSERT INTO journal(tbl, {cols}) SELECT '{n}', {new} WHERE {moved}; END",
                head("upd")
            ),
        ),
    ]
}

/// Make every table's journal triggers what [`triggers`] says (creating
/// missing ones, replacing changed ones), in one transaction; returns how
/// many it wrote (0 when all were there).
pub(crate) fn install(conn: &Connection) -> Result<usize, OffsiteError> {
    let existing = |tx: &Connection, name: &str| -> Result<Option<String>, OffsiteError> {
        use rusqlite::OptionalExtension;
        tx.query_row(
            "SELECT sql FROM sqlite_master WHERE type = 'trigger' AND name = ?1",
            [name],
            |r| r.get(0),
        )
        .optional()
        .map_err(sql_err)
    };
    let wanted: Vec<(String, String)> = shapes(conn)?.iter().flat_map(triggers).collect();
    let mut stale = Vec::new();
    for (name, sql) in &wanted {
        if existing(conn, name)?.as_deref() != Some(sql.as_str()) {
            stale.push((name, sql));
        }
    }
    if stale.is_empty() {
        return Ok(0);
    }
    let tx = Transaction::new_unchecked(conn, TransactionBehavior::Immediate).map_err(sql_err)?;
    for (name, sql) in &stale {
        tx.execute_batch(&format!("DROP TRIGGER IF EXISTS \"{name}\"; {sql};"))
            .map_err(sql_err)?;
    }
    tx.commit().map_err(sql_err)?;
    Ok(stale.len())
}

impl Offsite {
    /// Ship the journal (see the module doc), waiting while the store is
    /// unreachable (until `serve` stops, or a command's patience ends).
    /// Nothing to do when the journal is empty. Blocking.
    pub(crate) fn ship(&self) -> Result<(), OffsiteError> {
        let conn = self.open_journal()?;
        let Some(c) = conn.as_ref() else {
            return Ok(());
        };
        if let Some(to) = self.ship_record(c)? {
            c.execute("DELETE FROM journal WHERE id <= ?1", [to as i64])
                .map_err(sql_err)?;
        }
        Ok(())
    }

    /// The journal's connection to the catalog, opened (and the triggers
    /// installed) on first use; held, it keeps other ships waiting.
    pub(crate) fn open_journal(
        &self,
    ) -> Result<std::sync::MutexGuard<'_, Option<Connection>>, OffsiteError> {
        let mut conn = self.journal.lock().map_err(|_| OffsiteError::Cancelled)?;
        if conn.is_none() {
            let path = self.dir.join(CATALOG_FILE);
            let c = Connection::open(&path).map_err(sql_err)?;
            c.busy_timeout(std::time::Duration::from_secs(30))
                .map_err(sql_err)?;
            install(&c)?;
            *conn = Some(c);
        }
        Ok(conn)
    }

    /// Read and upload one record; the last journal id it covers.
    fn ship_record(&self, conn: &Connection) -> Result<Option<u64>, OffsiteError> {
        let tx =
            Transaction::new_unchecked(conn, TransactionBehavior::Deferred).map_err(sql_err)?;
        let (from, to): (Option<i64>, Option<i64>) = tx
            .query_row("SELECT min(id), max(id) FROM journal", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .map_err(sql_err)?;
        let (Some(from), Some(to)) = (from, to) else {
            return Ok(None);
        };
        let (from, to) = (from as u64, to as u64);
        let shapes = shapes(&tx)?;
        let mut w = PartWriter::new(from, to);
        for t in &shapes {
            let keys = key_match(t);
            let sql = format!(
                "SELECT DISTINCT {} FROM journal j WHERE j.tbl = ?1 AND j.id <= ?2
                   AND NOT EXISTS (SELECT 1 FROM \"{}\" x WHERE {keys})",
                journal_keys(t),
                t.name
            );
            self.each_row(&tx, &sql, t, (from, to), &mut w, PartWriter::gone)?;
        }
        for t in &shapes {
            let cols: Vec<String> = t.cols.iter().map(|c| format!("x.\"{c}\"")).collect();
            let sql = format!(
                "SELECT {} FROM (SELECT DISTINCT {} FROM journal j WHERE j.tbl = ?1 AND j.id <= ?2) j
                   CROSS JOIN \"{}\" x ON {}",
                cols.join(", "),
                journal_keys(t),
                t.name,
                key_match(t)
            );
            self.each_row(&tx, &sql, t, (from, to), &mut w, PartWriter::row)?;
        }
        let mut seq = tx
            .prepare("SELECT name, seq FROM sqlite_sequence WHERE name <> 'journal'")
            .map_err(sql_err)?;
        let seqs: Vec<(String, i64)> = seq
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .and_then(Iterator::collect)
            .map_err(sql_err)?;
        for (name, n) in seqs {
            w.seq(&name, n);
        }
        self.put_part(&mut w, to, from, true)?;
        metrics::counter!("pilotlight_receiver_journal_records_total").increment(1);
        Ok(Some(to))
    }

    /// Run `sql` (parameters: the table, the last journal id) and add each
    /// row it returns to `w` with `add`, uploading parts as they fill.
    fn each_row(
        &self,
        tx: &Connection,
        sql: &str,
        t: &TableShape,
        (from, to): (u64, u64),
        w: &mut PartWriter,
        add: fn(&mut PartWriter, &TableShape, &[Value]),
    ) -> Result<(), OffsiteError> {
        let mut stmt = tx.prepare(sql).map_err(sql_err)?;
        let n = stmt.column_count();
        let mut rows = stmt
            .query(rusqlite::params![t.name, to as i64])
            .map_err(sql_err)?;
        let mut values = Vec::with_capacity(n);
        while let Some(row) = rows.next().map_err(sql_err)? {
            values.clear();
            for i in 0..n {
                values.push(row.get::<_, Value>(i).map_err(sql_err)?);
            }
            add(w, t, &values);
            if w.full() {
                self.put_part(w, to, from, false)?;
            }
        }
        Ok(())
    }

    /// Seal and upload the part under way of `w`.
    fn put_part(
        &self,
        w: &mut PartWriter,
        to: u64,
        from: u64,
        last: bool,
    ) -> Result<(), OffsiteError> {
        let (part, plain) = w
            .take()
            .map_err(|e| OffsiteError::local(std::path::Path::new("journal"), e))?;
        let name = record_name(to, from, part, last);
        let sealed = seal_all(&self.key, &name, &plain)?;
        self.block_on(self.retrying(&self.stop, || self.put(&name, sealed.clone())))
    }
}

/// `j.k1, j.k2, ..` for the keys of `t`.
fn journal_keys(t: &TableShape) -> String {
    (1..=t.keys.len())
        .map(|i| format!("j.k{i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `x."a" = j.k1 AND x."b" = j.k2 ..` for the keys of `t`.
fn key_match(t: &TableShape) -> String {
    t.keys
        .iter()
        .enumerate()
        .map(|(i, k)| format!("x.\"{k}\" = j.k{}", i + 1))
        .collect::<Vec<_>>()
        .join(" AND ")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code
    use super::*;

    #[test]
    fn record_names_round_trip_and_sort_by_the_last_id() {
        let n = record_name(42, 7, 3, true);
        assert_eq!(parse_record_name(&n), Some((42, 7, 3, true)));
        assert_eq!(
            parse_record_name(&record_name(42, 7, 0, false)),
            Some((42, 7, 0, false))
        );
        assert!(record_name(9, 1, 0, false) < record_name(10, 1, 0, false));
        assert_eq!(parse_record_name("catalog/manifest"), None);
    }
}
