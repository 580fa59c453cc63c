//! Rebuild's second half: after the newest catalog snapshot, the journal
//! records the bucket holds past it ([`super::journal`]), applied in order.
//!
//! The snapshot's `sqlite_sequence` row of `journal` says up to which
//! journal id its catalog includes (`covered`). Records are taken in order
//! of their last id: one whose last id is at or below `covered` is already
//! in; a whole one (parts `0..` up to a `.last` part) that starts at or
//! before `covered + 1` is applied in one transaction, its tombstones
//! deleting, its rows replacing; one cut short (a ship a crash stopped,
//! never acknowledged) is passed over. A record that starts past
//! `covered + 1` means records are missing: rebuild refuses to guess.
//! Applying a record twice changes nothing.

use std::collections::BTreeMap;
use std::path::Path;

use futures_util::StreamExt;
use rusqlite::{params_from_iter, Connection, OptionalExtension};

use super::client::classify;
use super::journal::{parse_record_name, plain_identifier, record_name, JOURNAL_DIR};
use super::record::{read_part, Entry, Part};
use super::{Offsite, OffsiteError};

/// What [`Offsite::replay`] applied.
#[derive(Debug, Clone, Copy, Default)]
pub struct Replayed {
    /// Records applied.
    pub records: usize,
    /// The last journal id the catalog now includes.
    pub covered: u64,
}

/// The records in the bucket: `(to, from)` → parts, each `(part, last)`.
type Records = BTreeMap<(u64, u64), Vec<(u32, bool)>>;

fn sql(object: &str) -> impl Fn(rusqlite::Error) -> OffsiteError + '_ {
    move |e| OffsiteError::Damaged {
        object: object.to_owned(),
        why: match e {
            rusqlite::Error::SqliteFailure(_, _) => "it does not apply to the catalog",
            _ => "it does not fit the catalog",
        },
    }
}

impl Offsite {
    /// Every journal record in the bucket.
    pub(super) async fn records(&self) -> Result<Records, OffsiteError> {
        let mut out = Records::new();
        let prefix = self.url.path(JOURNAL_DIR);
        let mut list = self.client.list(Some(&prefix));
        while let Some(meta) = list.next().await {
            let meta = meta.map_err(|e| classify(&self.url, "journal/", e))?;
            let full = meta.location.to_string();
            if let Some((to, from, part, last)) = parse_record_name(self.url.name_of(&full)) {
                out.entry((to, from)).or_default().push((part, last));
            }
        }
        Ok(out)
    }

    /// Apply the records past the snapshot at `db` (a catalog file no one
    /// else has open). Blocking.
    pub fn replay(&self, db: &Path) -> Result<Replayed, OffsiteError> {
        let local = |e: rusqlite::Error| OffsiteError::local(db, std::io::Error::other(e));
        let mut conn = Connection::open(db).map_err(local)?;
        conn.pragma_update(None, "foreign_keys", "OFF")
            .map_err(local)?;
        let covered: Option<i64> = conn
            .query_row(
                "SELECT seq FROM sqlite_sequence WHERE name = 'journal'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(local)?;
        let mut done = Replayed {
            records: 0,
            covered: covered.unwrap_or(0).max(0) as u64,
        };
        let records = self.block_on(self.records())?;
        let mut missing = None;
        for ((to, from), parts) in records {
            if to <= done.covered {
                continue;
            }
            let Some(last) = whole(&parts) else {
                tracing::info!(
                    from,
                    to,
                    "journal record cut short (never acknowledged): passed over"
                );
                continue;
            };
            if from > done.covered + 1 {
                missing.get_or_insert((done.covered + 1, from - 1));
                continue;
            }
            let tx = conn.transaction().map_err(local)?;
            for part in 0..=last {
                let name = record_name(to, from, part, part == last);
                let plain = self.block_on(self.download(&name))?;
                let p = read_part(&plain).map_err(|why| OffsiteError::Damaged {
                    object: name.clone(),
                    why,
                })?;
                if (p.from, p.to, p.part) != (from, to, part) {
                    return Err(OffsiteError::Damaged {
                        object: name,
                        why: "its header differs from its name",
                    });
                }
                apply(&tx, &p).map_err(sql(&name))?;
            }
            tx.commit().map_err(local)?;
            done = Replayed {
                records: done.records + 1,
                covered: to,
            };
        }
        if let Some((from, to)) = missing.filter(|(a, _)| *a > done.covered) {
            tracing::error!(from, to, "journal records missing from the bucket");
            return Err(OffsiteError::Damaged {
                object: format!("{JOURNAL_DIR}/"),
                why: "journal records after the snapshot are missing from the bucket, so the newest points cannot be rebuilt",
            });
        }
        // The rebuilt catalog journals on from here.
        conn.execute_batch("DELETE FROM journal;").map_err(local)?;
        set_seq(&conn, "journal", done.covered as i64).map_err(local)?;
        Ok(done)
    }

    /// Delete the records a snapshot covering journal ids up to `covered`
    /// includes.
    pub(super) async fn trim_journal(&self, covered: u64) -> Result<(), OffsiteError> {
        for ((to, from), parts) in self.records().await? {
            if to > covered {
                continue;
            }
            for (part, last) in parts {
                self.delete(&record_name(to, from, part, last)).await?;
            }
        }
        Ok(())
    }
}

/// The number of the last part if the record is whole.
fn whole(parts: &[(u32, bool)]) -> Option<u32> {
    let last = parts.iter().filter(|(_, l)| *l).map(|(p, _)| *p).min()?;
    (0..last)
        .all(|i| parts.contains(&(i, false)))
        .then_some(last)
}

/// Apply one part: tombstones delete, rows replace, sequences only grow.
fn apply(tx: &Connection, p: &Part) -> rusqlite::Result<()> {
    for t in &p.tables {
        if !plain_identifier(&t.name) || !t.keys.iter().chain(&t.cols).all(|c| plain_identifier(c))
        {
            return Err(rusqlite::Error::InvalidColumnName(t.name.clone()));
        }
    }
    for e in &p.entries {
        match e {
            Entry::Gone(t, key) => {
                let t = table(p, *t)?;
                let cond: Vec<String> = t
                    .keys
                    .iter()
                    .enumerate()
                    .map(|(i, k)| format!("\"{k}\" = ?{}", i + 1))
                    .collect();
                let sql = format!("DELETE FROM \"{}\" WHERE {}", t.name, cond.join(" AND "));
                tx.prepare_cached(&sql)?.execute(params_from_iter(key))?;
            }
            Entry::Row(t, row) => {
                let t = table(p, *t)?;
                let cols: Vec<String> = t.cols.iter().map(|c| format!("\"{c}\"")).collect();
                let marks: Vec<String> = (1..=cols.len()).map(|i| format!("?{i}")).collect();
                let sql = format!(
                    "INSERT OR REPLACE INTO \"{}\"({}) VALUES({})",
                    t.name,
                    cols.join(", "),
                    marks.join(", ")
                );
                tx.prepare_cached(&sql)?.execute(params_from_iter(row))?;
            }
            Entry::Seq(name, seq) => {
                let cur: Option<i64> = tx
                    .query_row(
                        "SELECT seq FROM sqlite_sequence WHERE name = ?1",
                        [name],
                        |r| r.get(0),
                    )
                    .optional()?;
                set_seq(tx, name, cur.unwrap_or(0).max(*seq))?;
            }
        }
    }
    Ok(())
}

fn table(p: &Part, t: usize) -> rusqlite::Result<&super::record::TableShape> {
    p.tables
        .get(t)
        .ok_or(rusqlite::Error::InvalidColumnIndex(t))
}

/// `sqlite_sequence` says `name` handed out ids up to `seq`.
fn set_seq(conn: &Connection, name: &str, seq: i64) -> rusqlite::Result<()> {
    let n = conn.execute(
        "UPDATE sqlite_sequence SET seq = ?2 WHERE name = ?1",
        rusqlite::params![name, seq],
    )?;
    if n == 0 {
        conn.execute(
            "INSERT INTO sqlite_sequence(name, seq) VALUES(?1, ?2)",
            rusqlite::params![name, seq],
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_record_is_whole_only_with_every_part_up_to_its_last() {
        use super::whole;
        assert_eq!(whole(&[(0, true)]), Some(0));
        assert_eq!(whole(&[(1, true), (0, false)]), Some(1));
        assert_eq!(whole(&[(0, false), (1, false)]), None);
        assert_eq!(whole(&[(2, true), (0, false)]), None);
        // Parts a crashed try left past the last one are not needed.
        assert_eq!(whole(&[(0, true), (1, false)]), Some(0));
    }
}
