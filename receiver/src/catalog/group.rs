//! Group commit: the catalog writes of concurrent callers (points of
//! different servers, checkpoints, spills) batched into one SQLite
//! transaction, so that one WAL fsync makes all of them durable.
//!
//! A caller queues its job and takes the catalog. Whoever holds the catalog
//! drains the queue (its own job, and every job queued while the previous
//! batch ran), runs each job in a savepoint of its own inside one
//! `BEGIN IMMEDIATE` transaction, commits, and only then runs each job's
//! `after` step (in batch order, the catalog still held: the in-memory
//! index follows the catalog) and hands each caller its result. A caller
//! whose job an earlier holder ran finds its result when it gets the
//! catalog, and returns at once.
//!
//! Nothing is acknowledged before its transaction is durable: a job's
//! result is handed over only after `COMMIT` returned, and a failed `COMMIT`
//! fails every job of the batch. A job that fails rolls back its own
//! savepoint only; the rest of the batch commits.

use std::sync::{Arc, Mutex};

use super::Catalog;
use crate::ReceiveError;

/// What a job does once its transaction is durable.
type After = Box<dyn FnOnce() + Send>;

/// One caller's writes, run inside the batch's transaction.
type Job = Box<dyn FnOnce(&mut Catalog) -> Result<After, ReceiveError> + Send>;

/// A job's result, set by whoever ran its batch.
type Slot = Arc<Mutex<Option<Result<(), ReceiveError>>>>;

/// The queue of jobs waiting for the catalog.
#[derive(Default)]
pub struct Group {
    queue: Mutex<Vec<(Job, Slot)>>,
    /// Transactions run so far.
    batches: std::sync::atomic::AtomicU64,
}

impl Group {
    /// Run `job` in the next batch transaction over `catalog`; once that
    /// transaction is durable, its `after` step gives the result. Blocking.
    pub fn write<T, A, F>(&self, catalog: &Mutex<Catalog>, job: F) -> Result<T, ReceiveError>
    where
        T: Send + 'static,
        A: FnOnce() -> T + Send + 'static,
        F: FnOnce(&mut Catalog) -> Result<A, ReceiveError> + Send + 'static,
    {
        let out: Arc<Mutex<Option<T>>> = Arc::default();
        let put = out.clone();
        let job: Job = Box::new(move |cat| {
            let after = job(cat)?;
            Ok(Box::new(move || {
                let value = after();
                if let Ok(mut o) = put.lock() {
                    *o = Some(value);
                }
            }) as After)
        });
        let slot = Slot::default();
        self.queue
            .lock()
            .map_err(|_| poisoned())?
            .push((job, slot.clone()));
        {
            let mut cat = catalog.lock().map_err(|_| poisoned())?;
            // Whoever held the catalog before ran every job queued before it
            // took the queue; if ours was not among them, it is ours to run.
            if slot.lock().map_err(|_| poisoned())?.is_none() {
                let batch = std::mem::take(&mut *self.queue.lock().map_err(|_| poisoned())?);
                self.batches
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                run(&mut cat, batch);
            }
        }
        let result = slot
            .lock()
            .map_err(|_| poisoned())?
            .take()
            .ok_or_else(|| ReceiveError::Internal("a catalog job was never run".into()))?;
        result?;
        let value = out.lock().map_err(|_| poisoned())?.take();
        value.ok_or_else(|| ReceiveError::Internal("a catalog job left no result".into()))
    }
}

impl Group {
    /// Jobs waiting for the catalog.
    #[cfg(test)]
    fn queued(&self) -> usize {
        self.queue.lock().map_or(0, |q| q.len())
    }
}

/// One batch: every job in a savepoint of its own, one commit, then the
/// `after` steps in order and the results.
fn run(cat: &mut Catalog, batch: Vec<(Job, Slot)>) {
    if let Err(e) = cat.conn.execute_batch("BEGIN IMMEDIATE") {
        for (_, slot) in batch {
            set(&slot, Err(again(&e)));
        }
        return;
    }
    let mut done: Vec<(After, Slot)> = Vec::with_capacity(batch.len());
    for (job, slot) in batch {
        // An error SQLite answers by rolling the whole transaction back
        // (a full disk, an I/O error): nothing more runs outside it.
        if cat.conn.is_autocommit() {
            set(&slot, Err(lost()));
            continue;
        }
        if let Err(e) = cat.conn.execute_batch("SAVEPOINT job") {
            set(&slot, Err(e.into()));
            continue;
        }
        match job(cat) {
            Ok(after) => match cat.conn.execute_batch("RELEASE job") {
                Ok(()) => done.push((after, slot)),
                Err(e) => {
                    let _ = cat.conn.execute_batch("ROLLBACK TO job; RELEASE job");
                    set(&slot, Err(e.into()));
                }
            },
            Err(e) => {
                let _ = cat.conn.execute_batch("ROLLBACK TO job; RELEASE job");
                set(&slot, Err(e));
            }
        }
    }
    if cat.conn.is_autocommit() {
        for (_, slot) in done {
            set(&slot, Err(lost()));
        }
        return;
    }
    match cat.conn.execute_batch("COMMIT") {
        Ok(()) => {
            cat.nudge_checkpoint();
            metrics::histogram!("pilotlight_receiver_commit_batch").record(done.len() as f64);
            for (after, slot) in done {
                after();
                set(&slot, Ok(()));
            }
        }
        Err(e) => {
            let _ = cat.conn.execute_batch("ROLLBACK");
            for (_, slot) in done {
                set(&slot, Err(again(&e)));
            }
        }
    }
}

fn set(slot: &Slot, result: Result<(), ReceiveError>) {
    if let Ok(mut s) = slot.lock() {
        *s = Some(result);
    }
}

/// The same SQLite error for each job of a failed batch.
fn again(e: &rusqlite::Error) -> ReceiveError {
    let copy = match e {
        rusqlite::Error::SqliteFailure(code, msg) => {
            rusqlite::Error::SqliteFailure(*code, msg.clone())
        }
        other => rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
            Some(other.to_string()),
        ),
    };
    ReceiveError::Catalog(copy)
}

/// The batch's transaction is gone: what its jobs wrote was rolled back.
fn lost() -> ReceiveError {
    ReceiveError::Catalog(rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ABORT),
        Some("the group commit's transaction was rolled back".into()),
    ))
}

fn poisoned() -> ReceiveError {
    ReceiveError::poisoned("catalog")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code
    use std::sync::Barrier;

    use super::*;

    fn catalog() -> (tempfile::TempDir, Arc<Mutex<Catalog>>) {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::open(&dir.path().join("catalog.db")).unwrap();
        (dir, Arc::new(Mutex::new(cat)))
    }

    /// Jobs queued while a batch runs go together into the next one; each
    /// caller gets its own result, a failing job takes only its own writes
    /// back.
    #[test]
    fn concurrent_jobs_share_a_transaction_and_keep_their_own_results() {
        let (_dir, cat) = catalog();
        let group = Arc::new(Group::default());
        // Hold the catalog so that the jobs below queue up behind it.
        let held = cat.lock().unwrap();
        let start = Arc::new(Barrier::new(4));
        let handles: Vec<_> = (0..3)
            .map(|i| {
                let (cat, group, start) = (cat.clone(), group.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    group.write(&cat, move |c| {
                        c.set_identity(&format!("s{i}"), "01")?;
                        let tx_depth_ok = !c.conn.is_autocommit();
                        if i == 1 {
                            return Err(ReceiveError::Refused("job 1 fails".into()));
                        }
                        Ok(move || (i, tx_depth_ok))
                    })
                })
            })
            .collect();
        start.wait();
        // Every job queued before the catalog is free.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while group.queued() < 3 {
            assert!(std::time::Instant::now() < deadline, "jobs never queued");
            std::thread::yield_now();
        }
        drop(held);
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(results[0].as_ref().unwrap(), &(0, true));
        assert!(matches!(results[1], Err(ReceiveError::Refused(_))));
        assert_eq!(results[2].as_ref().unwrap(), &(2, true));
        let c = cat.lock().unwrap();
        assert!(c.server("s0").unwrap().is_some());
        assert!(
            c.server("s1").unwrap().is_none(),
            "a failed job's rows roll back"
        );
        assert!(c.server("s2").unwrap().is_some());
        assert!(c.conn.is_autocommit());
        let batches = group.batches.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(batches, 1, "one transaction for the three");
    }
}
