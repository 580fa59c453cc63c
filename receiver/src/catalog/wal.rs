//! Checkpoints of the catalog's WAL off the commit path.
//!
//! SQLite's default copies the WAL back into the database file at the end
//! of the commit that takes it past 1000 pages, in the committing thread:
//! with block rows keyed by hash (a page or more per new block), nearly
//! every large commit paid for a checkpoint (random writes into the
//! database file and its fsync) before it could answer. The store's writer
//! connection turns that off ([`Catalog::checkpoint_in_background`]) and a
//! thread of its own, on a connection of its own, runs a `PASSIVE`
//! checkpoint after commits instead (nudged through a channel of one: a
//! nudge while one is queued is dropped). Durability does not change: a
//! commit is durable once its WAL frames are synced (`synchronous=FULL`),
//! and a checkpoint never holds a writer up.

use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::JoinHandle;

use rusqlite::Connection;

use super::Catalog;
use crate::ReceiveError;

/// The checkpoint thread: nudged after commits, stopped and joined when
/// the catalog is dropped, so that nothing holds the catalog's files open
/// once its `Catalog` is gone (a store on a filesystem being unmounted,
/// a directory being removed).
pub(super) struct Wal {
    nudge: Option<SyncSender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Wal {
    fn drop(&mut self) {
        self.nudge.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Catalog {
    /// Stop checkpointing in the committing thread; start a thread that
    /// checkpoints the WAL of the catalog at `path` after this
    /// connection's commits. The thread ends with this connection.
    pub fn checkpoint_in_background(&mut self, path: &Path) -> Result<(), ReceiveError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        let (tx, rx) = sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("catalog-wal".into())
            .spawn(move || checkpoints(&conn, &rx))
            .map_err(|e| ReceiveError::storage(path, e))?;
        self.conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        self.wal = Some(Wal {
            nudge: Some(tx),
            thread: Some(thread),
        });
        Ok(())
    }

    /// After a commit: let the checkpoint thread copy the WAL back.
    pub(super) fn nudge_checkpoint(&self) {
        if let Some(tx) = self.wal.as_ref().and_then(|w| w.nudge.as_ref()) {
            let _ = tx.try_send(());
        }
    }
}

/// The checkpoint thread: one `PASSIVE` checkpoint per nudge, until the
/// catalog is dropped.
fn checkpoints(conn: &Connection, nudges: &Receiver<()>) {
    while nudges.recv().is_ok() {
        let done = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
            ))
        });
        match done {
            Ok((_, log, copied)) => {
                metrics::gauge!("pilotlight_receiver_catalog_wal_pages").set(log as f64);
                metrics::counter!("pilotlight_receiver_catalog_checkpointed_pages_total")
                    .increment(copied.max(0) as u64);
            }
            Err(e) => {
                tracing::warn!(cause = %e, "catalog checkpoint failed; retried after the next commit")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code
    use super::*;

    /// A commit no longer checkpoints in the committing connection; the
    /// thread copies the WAL into the database file after it.
    #[test]
    fn commits_are_checkpointed_by_the_thread_not_the_committer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        let mut cat = Catalog::open(&path).unwrap();
        // Everything so far in the database file itself.
        cat.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
        cat.checkpoint_in_background(&path).unwrap();
        let auto: i64 = cat
            .conn
            .pragma_query_value(None, "wal_autocheckpoint", |r| r.get(0))
            .unwrap();
        assert_eq!(auto, 0);
        let before = std::fs::metadata(&path).unwrap().len();
        cat.atomically(|tx| {
            tx.execute_batch(
                "CREATE TABLE filler(x BLOB);
                 WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < 2000)
                 INSERT INTO filler SELECT randomblob(200) FROM c;",
            )?;
            Ok(())
        })
        .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::fs::metadata(&path).unwrap().len() <= before {
            assert!(
                std::time::Instant::now() < deadline,
                "the WAL was never checkpointed"
            );
            std::thread::yield_now();
        }
    }

    /// Once the catalog is dropped, no handle on its files is left open
    /// (the checkpoint thread's connection included): the power-loss test
    /// unmounts the store's filesystem right after.
    #[test]
    fn dropping_the_catalog_closes_the_checkpoint_threads_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        let open_on_dir = || {
            std::fs::read_dir("/proc/self/fd")
                .unwrap()
                .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|t| t.starts_with(dir.path()))
                .count()
        };
        let mut cat = Catalog::open(&path).unwrap();
        cat.checkpoint_in_background(&path).unwrap();
        cat.atomically(|tx| {
            tx.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")?;
            Ok(())
        })
        .unwrap();
        assert!(open_on_dir() > 0);
        drop(cat);
        assert_eq!(open_on_dir(), 0, "a file of the catalog is still open");
    }
}
