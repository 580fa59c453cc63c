//! Which blocks of the target differ from the point: worker threads read
//! the target in runs of blocks (about 4 MiB each), hash every block with
//! BLAKE3, compare it with the point's hash of that block, and hand the
//! run's differing blocks to the fetch at once (a bounded queue): blocks
//! are fetched and written while the next runs are hashed, and a full
//! queue holds the compare back to the fetch's pace.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use pilotlight_protocol::limits::block_len;
use pilotlight_protocol::BlockHash;
use tokio::sync::mpsc;

use super::target::Target;
use crate::scan::AlignedBuf;
use crate::AgentError;

/// Bytes read per work unit.
const RUN_BYTES: u64 = 4 << 20;
/// Runs compared ahead of the fetch, at most (their differing blocks wait
/// in the queue; at 64 KiB blocks a run is 64 indexes).
pub(crate) const FOUND_QUEUE: usize = 32;

/// Hash the blocks of `target` on `workers` threads and send the indexes of
/// those whose hash is not the one in `hashes` to `found`, a run at a time
/// (ascending within a run, runs roughly in order); `done` counts the bytes
/// compared. Returns how many blocks differ. Stops with
/// [`AgentError::Stopped`] when `found` is closed (the fetch failed: its
/// error is the restore's). Blocking.
pub(crate) fn differing(
    target: &Target,
    (size, block_size): (u64, u32),
    hashes: &[BlockHash],
    workers: usize,
    done: &AtomicU64,
    found: &mpsc::Sender<Vec<u64>>,
) -> Result<u64, AgentError> {
    let per_run = (RUN_BYTES / u64::from(block_size)).max(1);
    let total = hashes.len() as u64;
    let runs = total.div_ceil(per_run);
    let next = AtomicUsize::new(0);
    let differ = AtomicU64::new(0);
    let first_error: Mutex<Option<AgentError>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..workers.max(1) {
            s.spawn(|| {
                let mut buf = AlignedBuf::new((per_run * u64::from(block_size)) as usize);
                loop {
                    let run = next.fetch_add(1, Ordering::Relaxed) as u64;
                    if run >= runs || first_error.lock().map_or(true, |e| e.is_some()) {
                        break;
                    }
                    let first = run * per_run;
                    let last = (first + per_run).min(total);
                    let r = compare_run(target, (size, block_size), hashes, first..last, &mut buf)
                        .and_then(|(diff, bytes)| {
                            done.fetch_add(bytes, Ordering::Relaxed);
                            if diff.is_empty() {
                                return Ok(());
                            }
                            differ.fetch_add(diff.len() as u64, Ordering::Relaxed);
                            found.blocking_send(diff).map_err(|_| AgentError::Stopped)
                        });
                    if let Err(e) = r {
                        if let Ok(mut slot) = first_error.lock() {
                            slot.get_or_insert(e);
                        }
                        break;
                    }
                }
            });
        }
    });
    match first_error.into_inner() {
        Ok(None) => Ok(differ.into_inner()),
        Ok(Some(e)) => Err(e),
        Err(_) => Err(AgentError::Internal("a compare worker panicked".into())),
    }
}

/// The blocks of `list` that still differ from the point when read back
/// (after the restore wrote and synced them); `done` counts bytes. Blocking.
pub(crate) fn recheck(
    target: &Target,
    (size, block_size): (u64, u32),
    hashes: &[BlockHash],
    list: &[u64],
    done: &AtomicU64,
) -> Result<Vec<u64>, AgentError> {
    let mut buf = AlignedBuf::new(block_size as usize);
    let mut diff = Vec::new();
    for &i in list {
        let (d, bytes) = compare_run(target, (size, block_size), hashes, i..i + 1, &mut buf)?;
        diff.extend(d);
        done.fetch_add(bytes, Ordering::Relaxed);
    }
    Ok(diff)
}

/// Compare the blocks `range` in one read; returns those that differ and
/// the bytes read.
fn compare_run(
    target: &Target,
    (size, block_size): (u64, u32),
    hashes: &[BlockHash],
    range: std::ops::Range<u64>,
    buf: &mut AlignedBuf,
) -> Result<(Vec<u64>, u64), AgentError> {
    let bs = u64::from(block_size);
    let start = range.start * bs;
    let end = (range.end * bs).min(size);
    let data = target.read(buf, start, (end - start) as usize)?;
    let mut diff = Vec::new();
    for i in range {
        let at = ((i * bs) - start) as usize;
        let len = block_len(size, block_size, i) as usize;
        let block = data.get(at..at + len).unwrap_or_default();
        let want = hashes.get(i as usize);
        if want != Some(&BlockHash::of(block)) {
            diff.push(i);
        }
    }
    Ok((diff, end - start))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // test code
mod tests {
    use super::*;

    #[test]
    fn only_the_blocks_that_differ_are_listed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.img");
        let bs = 4096u32;
        // 300 blocks and a short one: several runs on several workers.
        let size = 300 * 4096 + 100;
        let mut data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let hashes: Vec<BlockHash> = data.chunks(bs as usize).map(BlockHash::of).collect();
        data[5 * 4096] ^= 1;
        data[299 * 4096 + 7] ^= 1;
        data[300 * 4096 + 99] ^= 1;
        std::fs::write(&path, &data).unwrap();
        let target = Target::open(&path, false).unwrap();
        let done = AtomicU64::new(0);
        let (tx, mut rx) = mpsc::channel(FOUND_QUEUE);
        let n = std::thread::scope(|s| {
            let compare = s.spawn(|| differing(&target, (size as u64, bs), &hashes, 3, &done, &tx));
            let mut got = Vec::new();
            while got.len() < 3 {
                got.extend(rx.blocking_recv().unwrap());
            }
            got.sort_unstable();
            assert_eq!(got, vec![5, 299, 300]);
            compare.join().unwrap().unwrap()
        });
        assert_eq!(n, 3);
        assert_eq!(done.load(Ordering::Relaxed), size as u64);
    }

    #[test]
    fn the_compare_stops_when_the_fetch_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.img");
        std::fs::write(&path, vec![1u8; 64 * 4096]).unwrap();
        let hashes = vec![BlockHash::of(&[0u8; 4096]); 64];
        let target = Target::open(&path, false).unwrap();
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let r = differing(
            &target,
            (64 * 4096, 4096),
            &hashes,
            2,
            &AtomicU64::new(0),
            &tx,
        );
        assert!(matches!(r, Err(AgentError::Stopped)), "{r:?}");
    }
}
