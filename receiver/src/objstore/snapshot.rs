//! Catalog snapshots: after commits, at most every `[store] snapshot_secs`,
//! `serve` copies the catalog with `VACUUM INTO` (a consistent copy while
//! commits go on), seals it and puts it in the bucket with the directory's
//! small files, then the manifest that names them, then deletes the
//! journal records the copy includes ([`super::journal`]: every commit's
//! changes are in the bucket before `DURABLE` anyway, so snapshots can be
//! rare). Commits made during one snapshot are taken by the next (they
//! coalesce); at shutdown the last one is taken.
//!
//! ```text
//! catalog/manifest     sealed JSON: {"format": 1, "snapshot": NAME,
//!                      "files": NAME, "created_ms": MS, "journal_to": ID}
//! catalog/MS.db        the sealed SQLite snapshot
//! catalog/MS.files     sealed JSON: file name -> text (receiver.toml, the
//!                      PKI files)
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use pilotlight_protocol::clock::now_ms;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::crypto::{open_all, seal_all};
use super::{Offsite, OffsiteError};
use crate::store::CATALOG_FILE;

/// Name of the manifest under the prefix.
pub const MANIFEST: &str = "catalog/manifest";
/// Files of the receiver directory that go with each snapshot.
pub const DIR_FILES: [&str; 5] = [
    crate::config::CONFIG_FILE,
    "ca.pem",
    "ca.key",
    "server.pem",
    "server.key",
];
/// Snapshots kept in the bucket (the newest ones).
const KEEP: usize = 2;

/// What the manifest says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Version of this layout (1).
    pub format: u32,
    /// The newest snapshot's object name.
    pub snapshot: String,
    /// Its directory files' object name.
    pub files: String,
    /// When it was taken (ms since the epoch).
    pub created_ms: i64,
    /// The last journal id the snapshot includes (0 before the journal).
    #[serde(default)]
    pub journal_to: u64,
}

impl Offsite {
    /// A commit happened: a snapshot is due.
    pub(crate) fn snapshot_due(&self) {
        self.dirty.fetch_add(1, Ordering::SeqCst);
        self.snapshot_wanted.notify_one();
    }

    /// `serve`'s snapshot task: one snapshot after commits (coalesced, at
    /// most every `snapshot_every`), and one at shutdown if commits are not
    /// in the bucket's newest snapshot yet.
    /// The pack streamer (`stream`) runs beside it.
    pub async fn snapshots(self: Arc<Self>, shutdown: CancellationToken) {
        let streamer = self.clone().stream(shutdown.clone());
        tokio::join!(streamer, self.snapshot_loop(shutdown));
    }

    async fn snapshot_loop(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let mut stop = tokio::select! {
                () = self.snapshot_wanted.notified() => false,
                () = shutdown.cancelled() => true,
            };
            if !stop {
                let due = self.last_snapshot_ms.load(Ordering::SeqCst)
                    + i64::try_from(self.snapshot_every.as_millis()).unwrap_or(i64::MAX);
                let wait = u64::try_from(due.saturating_sub(now_ms())).unwrap_or(0);
                tokio::select! {
                    () = tokio::time::sleep(std::time::Duration::from_millis(wait)) => {}
                    () = shutdown.cancelled() => stop = true,
                }
            }
            if self.dirty.swap(0, Ordering::SeqCst) > 0 {
                if let Err(e) = self.snapshot().await {
                    // The next commit (or shutdown) tries again.
                    self.dirty.fetch_add(1, Ordering::SeqCst);
                    tracing::warn!(cause = %e, "catalog snapshot to the object store failed");
                }
            }
            if stop {
                self.stop.cancel();
                return;
            }
        }
    }

    /// When `serve` starts: learn when the bucket's newest snapshot was
    /// taken (the next is due `snapshot_every` after it); when there is
    /// none, one is due now. Not knowing (the store went away) only makes
    /// the first commit take one. Blocking.
    pub(crate) fn snapshot_known(&self) {
        match self.block_on(self.manifest()) {
            Ok(m) => self.last_snapshot_ms.store(m.created_ms, Ordering::SeqCst),
            Err(OffsiteError::Missing(_)) => self.snapshot_due(),
            Err(e) => {
                tracing::warn!(cause = %e, "cannot read the catalog manifest; the first commit takes a snapshot")
            }
        }
    }

    /// Take one snapshot and name it in the manifest.
    pub async fn snapshot(&self) -> Result<(), OffsiteError> {
        let ms = now_ms();
        let db_name = format!("catalog/{ms:013}.db");
        let files_name = format!("catalog/{ms:013}.files");
        let (key, dir, db) = (self.key.clone(), self.dir.clone(), db_name.clone());
        let files = files_name.clone();
        let sealed = tokio::task::spawn_blocking(move || -> Result<_, OffsiteError> {
            let (plain, covered) = vacuum_into(&dir)?;
            let sealed_db = seal_all(&key, &db, &plain)?;
            let bundle = serde_json::to_vec(&dir_files(&dir)).unwrap_or_default();
            Ok((sealed_db, seal_all(&key, &files, &bundle)?, covered))
        })
        .await
        .map_err(|_| OffsiteError::Cancelled)??;
        self.put(&db_name, sealed.0).await?;
        self.put(&files_name, sealed.1).await?;
        let manifest = Manifest {
            format: 1,
            snapshot: db_name,
            files: files_name,
            created_ms: ms,
            journal_to: sealed.2,
        };
        let text = serde_json::to_vec(&manifest).unwrap_or_default();
        self.put(MANIFEST, seal_all(&self.key, MANIFEST, &text)?)
            .await?;
        self.last_snapshot_ms.store(ms, Ordering::SeqCst);
        self.prune_snapshots().await?;
        self.trim_journal(manifest.journal_to).await?;
        let url = self.url.to_string();
        let state = self.state.clone();
        let _ = tokio::task::spawn_blocking(move || {
            state.update(&url, |s| s.last_snapshot_ms = Some(ms));
        })
        .await;
        tracing::debug!(snapshot = %manifest.snapshot, "catalog snapshot in the object store");
        Ok(())
    }

    /// Delete all but the newest [`KEEP`] snapshots.
    async fn prune_snapshots(&self) -> Result<(), OffsiteError> {
        use futures_util::StreamExt;
        let mut names: Vec<String> = Vec::new();
        let prefix = self.url.path("catalog");
        let mut list = self.client.list(Some(&prefix));
        while let Some(meta) = list.next().await {
            let meta = meta.map_err(|e| super::client::classify(&self.url, "catalog/", e))?;
            let full = meta.location.to_string();
            let name = self.url.name_of(&full);
            if let Some(stem) = name.strip_suffix(".db") {
                names.push(stem.to_owned());
            }
        }
        names.sort();
        let old = names.len().saturating_sub(KEEP);
        for stem in &names[..old] {
            self.delete(&format!("{stem}.db")).await?;
            self.delete(&format!("{stem}.files")).await?;
        }
        Ok(())
    }

    /// The manifest, opened (a wrong key fails here).
    pub async fn manifest(&self) -> Result<Manifest, OffsiteError> {
        let sealed = self.get(MANIFEST).await?;
        let plain = open_all(&self.key, MANIFEST, &sealed)?;
        serde_json::from_slice(&plain).map_err(|_| OffsiteError::Damaged {
            object: MANIFEST.into(),
            why: "it is not a manifest",
        })
    }
}

/// A consistent copy of the catalog of `dir`, read into memory, and the
/// last journal id it includes. Blocking.
pub(super) fn vacuum_into(dir: &Path) -> Result<(Vec<u8>, u64), OffsiteError> {
    let tmp = dir.join("catalog.snapshot.tmp");
    let _ = std::fs::remove_file(&tmp);
    let db = dir.join(CATALOG_FILE);
    let err = |e: rusqlite::Error| OffsiteError::local(&db, std::io::Error::other(e));
    let conn = rusqlite::Connection::open_with_flags(
        &db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(err)?;
    conn.busy_timeout(std::time::Duration::from_secs(30))
        .map_err(err)?;
    conn.execute("VACUUM INTO ?1", [tmp.to_string_lossy()])
        .map_err(err)?;
    drop(conn);
    let covered: Option<i64> = rusqlite::Connection::open(&tmp)
        .and_then(|c| {
            use rusqlite::OptionalExtension;
            c.query_row(
                "SELECT seq FROM sqlite_sequence WHERE name = 'journal'",
                [],
                |r| r.get(0),
            )
            .optional()
        })
        .map_err(err)?;
    let bytes = std::fs::read(&tmp).map_err(|e| OffsiteError::local(&tmp, e))?;
    let _ = std::fs::remove_file(&tmp);
    Ok((bytes, covered.unwrap_or(0).max(0) as u64))
}

/// The small files of `dir` that go with a snapshot.
fn dir_files(dir: &Path) -> BTreeMap<String, String> {
    DIR_FILES
        .iter()
        .filter_map(|f| {
            let text = std::fs::read_to_string(dir.join(f)).ok()?;
            Some(((*f).to_owned(), text))
        })
        .collect()
}
