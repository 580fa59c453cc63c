//! Off-host history in S3-compatible object storage (`init --store
//! s3://BUCKET/PREFIX`).
//!
//! What leaves the host is sealed with the receiver's store key
//! ([`crypto`]). Under PREFIX (several receivers may share a bucket):
//!
//! ```text
//! packs/PACK/START-END.seg   bytes START..END of pack PACK, sealed: each
//!                            commit uploads what it added to a pack (the
//!                            segments of a pack chain from 0 to its
//!                            committed length)
//! catalog/MS.db              a snapshot of the catalog (`VACUUM INTO`)
//! catalog/files              receiver.toml and the PKI files
//! catalog/manifest           JSON naming the newest snapshot
//! journal/TO-FROM/PART       the catalog's changes since the snapshot
//! ```
//!
//! The commit order gains two steps: between the pack fsync and the
//! catalog transaction, the point's packs are uploaded (`seal_packs`);
//! between the transaction and `DURABLE`, what it changed in the catalog
//! goes up as a journal record (`committed`, [`journal`]). Both are
//! retried with backoff for as long as the store is unreachable (the point
//! waits, unacknowledged; `status` and `pilotlight_receiver_store_waiting`
//! show it). The catalog is snapshotted after commits, at most every
//! `[store] snapshot_secs` ([`snapshot`]), which trims the journal; local
//! packs are a bounded cache ([`cache`]); `rebuild` recreates a directory
//! from the bucket: the snapshot, then the journal ([`rebuild`],
//! [`replay`]).

pub mod cache;
pub mod client;
pub mod crypto;
pub mod journal;
pub mod lock;
pub mod rebuild;
mod record;
pub mod replay;
pub mod setup;
pub mod snapshot;
mod state;
mod stream;
mod upload;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

pub use client::{Offsite, StoreUrl};
pub use crypto::{StoreKey, KEY_FILE};
pub use state::{OffsiteState, STATE_FILE};

use crate::ReceiveError;

/// What can go wrong with the object store, each as one sentence.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OffsiteError {
    /// The `--store` URL is not `s3://BUCKET/PREFIX`.
    #[error("{0:?} is not an object store URL: write s3://BUCKET/PREFIX")]
    BadUrl(String),
    /// The key file is missing or malformed.
    #[error("the store key {} {why}", path.display())]
    Key {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// An object did not open with the key: a wrong key, or a tampered object.
    #[error(
        "object {object} does not open with this store key: a wrong key, or the object was altered"
    )]
    Unsealed {
        /// The object's name under the prefix.
        object: String,
    },
    /// An object is malformed.
    #[error("object {object} is damaged: {why}")]
    Damaged {
        /// The object's name under the prefix.
        object: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// More chunks than a nonce can count.
    #[error("an object is too large to seal")]
    TooLarge,
    /// The bucket refused our credentials.
    #[error("the object store refused the credentials for bucket {bucket} (check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY): {cause}")]
    Credentials {
        /// The bucket.
        bucket: String,
        /// The store's own words.
        cause: String,
    },
    /// The bucket does not exist.
    #[error("the bucket {bucket} does not exist at the object store (create it first, or check AWS_ENDPOINT_URL and AWS_REGION)")]
    NoBucket {
        /// The bucket.
        bucket: String,
    },
    /// The endpoint did not answer.
    #[error("cannot reach the object store for bucket {bucket} (check AWS_ENDPOINT_URL and the network): {cause}")]
    Unreachable {
        /// The bucket.
        bucket: String,
        /// The client's own words.
        cause: String,
    },
    /// An object that should be there is not.
    #[error("object {0} is missing from the bucket")]
    Missing(String),
    /// Any other answer of the store.
    #[error("object store error on {object}: {cause}")]
    Store {
        /// The object's name under the prefix.
        object: String,
        /// The store's own words.
        cause: String,
    },
    /// A local file.
    #[error("{}: {cause}", path.display())]
    Local {
        /// The file.
        path: PathBuf,
        /// The error.
        cause: std::io::Error,
    },
    /// `object_lock_days` is set, and the bucket's Object Lock does not
    /// cover it.
    #[error("the bucket {bucket} has {found}, but [store] object_lock_days = {days} needs S3 Object Lock with a default retention of at least {days} days (create the bucket with Object Lock enabled and give it that default retention, or remove object_lock_days)")]
    NoLock {
        /// The bucket.
        bucket: String,
        /// The retention asked for.
        days: u32,
        /// What the bucket has.
        found: String,
    },
    /// Stopped while waiting for the store.
    #[error("stopped while waiting for the object store")]
    Cancelled,
}

impl OffsiteError {
    /// Worth trying again (the store may come back).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unreachable { .. } | Self::Store { .. })
    }

    pub(crate) fn local(path: &Path, cause: std::io::Error) -> Self {
        Self::Local {
            path: path.to_owned(),
            cause,
        }
    }
}

impl From<OffsiteError> for ReceiveError {
    fn from(e: OffsiteError) -> Self {
        match e {
            OffsiteError::Unsealed { .. } | OffsiteError::Damaged { .. } => {
                ReceiveError::Corrupt(e.to_string())
            }
            OffsiteError::Missing(_) => ReceiveError::NotFound(e.to_string()),
            OffsiteError::Cancelled => ReceiveError::Timeout("waiting for the object store"),
            other => ReceiveError::Refused(other.to_string()),
        }
    }
}

/// The object store of the receiver directory `dir`, if its config names
/// one: one per directory in the process, made on first use.
pub fn for_dir(dir: &Path) -> Result<Option<Arc<Offsite>>, ReceiveError> {
    type Open = HashMap<PathBuf, Option<Arc<Offsite>>>;
    static OPEN: OnceLock<Mutex<Open>> = OnceLock::new();
    let key_dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
    let mut open = OPEN
        .get_or_init(Mutex::default)
        .lock()
        .map_err(|_| ReceiveError::Corrupt("object store registry poisoned".into()))?;
    if let Some(o) = open.get(&key_dir) {
        return Ok(o.clone());
    }
    let o = match crate::ReceiverConfig::load(dir)?.store {
        None => None,
        Some(store) => {
            let key = StoreKey::load(&dir.join(KEY_FILE))?;
            Some(Arc::new(Offsite::new(dir, &store, key)?))
        }
    };
    open.insert(key_dir, o.clone());
    Ok(o)
}

/// Commit order, between the pack fsync and the catalog transaction: upload
/// what a point (or checkpoint, or garbage collection) added to its packs
/// (`packs`: id, length committed so far, durable length), and wait until
/// it is in the bucket, for as long as `serve` runs. Nothing without a
/// store. Blocking.
pub(crate) fn seal_packs(dir: &Path, packs: &[(u64, u64, u64)]) -> Result<(), ReceiveError> {
    if let Some(o) = for_dir(dir)? {
        o.upload_packs(packs)?;
    }
    Ok(())
}

/// Commit order, between the catalog transaction and `DURABLE`: what the
/// commit changed in the catalog goes to the bucket's journal (waiting, as
/// uploads do, while the store is unreachable). Then a catalog snapshot is
/// due, and the cache may be over its budget (`open`: packs a writer may
/// still append to). Nothing without a store. Blocking.
pub(crate) fn committed(
    dir: &Path,
    open: &std::collections::HashSet<u64>,
) -> Result<(), ReceiveError> {
    let Some(o) = for_dir(dir)? else {
        return Ok(());
    };
    o.ship()?;
    crash_point();
    o.snapshot_due();
    if let Err(e) = o.evict(open) {
        tracing::warn!(cause = %e, "cannot evict packs from the local cache");
    }
    Ok(())
}

/// Crash tests only: with `PILOTLIGHT_TEST_KILL_AFTER_JOURNAL` set in its
/// environment, the process kills itself (SIGKILL) once a commit's journal
/// record is in the bucket, before `DURABLE` is sent.
fn crash_point() {
    if std::env::var_os("PILOTLIGHT_TEST_KILL_AFTER_JOURNAL").is_some() {
        tracing::error!("PILOTLIGHT_TEST_KILL_AFTER_JOURNAL: killing this process");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}

/// Garbage collection removed `pack` from the catalog: its objects are
/// deleted by [`after_gc`], once the bucket's journal no longer names them.
pub(crate) fn pack_removed(dir: &Path, pack: u64) -> Result<(), ReceiveError> {
    if let Some(o) = for_dir(dir)? {
        if let Ok(mut d) = o.doomed.lock() {
            d.push(pack);
        }
    }
    Ok(())
}

/// After garbage collection: its catalog changes in the journal (a
/// rebuild no longer names the removed packs), then the objects of removed
/// packs deleted once their Object Lock retention is over ([`lock`]: the
/// packs wait in the catalog, so a crash between leaves the next
/// collection the work). Blocking.
pub(crate) fn after_gc(dir: &Path) -> Result<(), ReceiveError> {
    let Some(o) = for_dir(dir)? else {
        return Ok(());
    };
    o.collect_objects()?;
    Ok(())
}

/// When `serve` starts: the store of `dir`, if any, checked reachable and
/// writable, with the bucket made to agree with the catalog. Blocking.
pub fn for_serve(dir: &Path) -> Result<Option<Arc<Offsite>>, ReceiveError> {
    let Some(o) = for_dir(dir)? else {
        return Ok(None);
    };
    o.probe_blocking()?;
    if let Some(days) = o.lock_days {
        let r = o.block_on(lock::require(&o.url, days))?;
        tracing::info!(mode = %r.mode, days = r.period.as_secs() / 86_400, "the bucket locks every object (S3 Object Lock)");
        if let Ok(mut p) = o.lock_period.lock() {
            *p = Some(r.period);
        }
    }
    let committed: HashMap<u64, u64> =
        crate::catalog::Catalog::open(&dir.join(crate::store::CATALOG_FILE))?
            .packs()?
            .into_iter()
            .collect();
    // Every change from here on is journaled (what a crash kept from the
    // bucket, never acknowledged, goes with the next ship).
    let deferred = {
        let conn = o.open_journal()?;
        match conn.as_ref() {
            Some(c) => lock::deferred_packs(c)?,
            None => Default::default(),
        }
    };
    o.reconcile(&committed, &deferred)?;
    o.snapshot_known();
    o.state.update(&o.url.to_string(), |_| {});
    Ok(Some(o))
}
