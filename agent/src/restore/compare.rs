//! Which blocks of the target differ from the point: worker threads read
//! the target in runs of blocks (about 4 MiB each), hash every block with
//! BLAKE3, compare it with the point's hash of that block, and hand the
//! run's differing blocks to the fetch at once (a bounded queue): blocks
//! are fetched and written while the next runs are hashed, and a full
//! queue holds the compare back to the fetch's pace.
//!
//! A target that differs entirely (a blank or replaced disk) would be read
//! whole only to learn that every block must be fetched, and the reads
//! compete with the writes on the same disk. So after [`SAMPLE_AFTER`]
//! runs in a row in which every block differed, a run is first judged by
//! one block of it: if that block differs too, the whole run is fetched
//! unread; if it matches, the run is compared in full and the streak starts
//! again. What this can cost is bytes: blocks of a sampled run that
//! already matched are fetched (and rewritten with the same bytes), at
//! most until the first sampled block that matches.

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
/// Runs in a row whose every block differed (32 MiB of target) before
/// runs are judged by a sample.
pub(crate) const SAMPLE_AFTER: u64 = 8;

/// What the compare found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Compared {
    /// Blocks sent to the fetch: those that differ, and those of sampled
    /// runs fetched unread.
    pub(crate) differ: u64,
    /// Blocks fetched without being read (their run's sample differed).
    pub(crate) unread: u64,
}

/// Runs in a row (as the workers finish them) whose every block differed.
#[derive(Default)]
struct Streak(AtomicU64);

impl Streak {
    fn sampling(&self) -> bool {
        self.0.load(Ordering::Relaxed) >= SAMPLE_AFTER
    }

    fn record(&self, all_differ: bool) {
        if all_differ {
            self.0.fetch_add(1, Ordering::Relaxed);
        } else {
            self.0.store(0, Ordering::Relaxed);
        }
    }
}

/// Hash the blocks of `target` on `workers` threads and send the indexes of
/// those whose hash is not the one in `hashes` to `found`, a run at a time
/// (ascending within a run, runs roughly in order); `done` counts the bytes
/// compared (or judged by a sample). Returns how many blocks were sent, and
/// how many of them unread (see the module's note). Stops with
/// [`AgentError::Stopped`] when `found` is closed (the fetch failed: its
/// error is the restore's). Blocking.
pub(crate) fn differing(
    target: &Target,
    (size, block_size): (u64, u32),
    hashes: &[BlockHash],
    workers: usize,
    done: &AtomicU64,
    found: &mpsc::Sender<Vec<u64>>,
) -> Result<Compared, AgentError> {
    let per_run = (RUN_BYTES / u64::from(block_size)).max(1);
    let total = hashes.len() as u64;
    let runs = total.div_ceil(per_run);
    let next = AtomicUsize::new(0);
    let (differ, unread) = (AtomicU64::new(0), AtomicU64::new(0));
    let streak = Streak::default();
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
                    let shape = (size, block_size);
                    let r = judge_run(target, shape, hashes, first..last, (&streak, &mut buf))
                        .and_then(|(diff, bytes, sampled)| {
                            done.fetch_add(bytes, Ordering::Relaxed);
                            if diff.is_empty() {
                                return Ok(());
                            }
                            differ.fetch_add(diff.len() as u64, Ordering::Relaxed);
                            if sampled {
                                unread.fetch_add(diff.len() as u64, Ordering::Relaxed);
                            }
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
        Ok(None) => Ok(Compared {
            differ: differ.into_inner(),
            unread: unread.into_inner(),
        }),
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

/// The blocks of `range` to fetch, the bytes they cover, and whether they
/// were judged by a sample (unread): while `streak` says so, the run's
/// first block is read alone, and if it differs the whole run is fetched;
/// otherwise the run is compared in full, and its outcome kept in
/// `streak`.
fn judge_run(
    target: &Target,
    (size, block_size): (u64, u32),
    hashes: &[BlockHash],
    range: std::ops::Range<u64>,
    (streak, buf): (&Streak, &mut AlignedBuf),
) -> Result<(Vec<u64>, u64, bool), AgentError> {
    let shape = (size, block_size);
    let whole = range.end - range.start;
    if streak.sampling() && whole > 1 {
        let (sample, _) = compare_run(target, shape, hashes, range.start..range.start + 1, buf)?;
        if !sample.is_empty() {
            let bs = u64::from(block_size);
            let bytes = (range.end * bs).min(size) - range.start * bs;
            return Ok((range.collect(), bytes, true));
        }
    }
    let (diff, bytes) = compare_run(target, shape, hashes, range, buf)?;
    streak.record(diff.len() as u64 == whole);
    Ok((diff, bytes, false))
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
        assert_eq!(
            n,
            Compared {
                differ: 3,
                unread: 0
            }
        );
        assert_eq!(done.load(Ordering::Relaxed), size as u64);
    }

    /// Compare `data` against `point` (4 KiB blocks) on one worker (the
    /// streak follows the runs in order); returns what was found and every
    /// index sent, sorted.
    fn compare_one_worker(data: &[u8], point: &[u8]) -> (Compared, Vec<u64>) {
        let bs = 4096u32;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.img");
        std::fs::write(&path, data).unwrap();
        let hashes: Vec<BlockHash> = point.chunks(bs as usize).map(BlockHash::of).collect();
        let target = Target::open(&path, false).unwrap();
        let done = AtomicU64::new(0);
        let (tx, mut rx) = mpsc::channel(FOUND_QUEUE);
        let size = data.len() as u64;
        let (found, mut got) = std::thread::scope(|s| {
            let compare = s.spawn(|| {
                let r = differing(&target, (size, bs), &hashes, 1, &done, &tx);
                drop(tx);
                r
            });
            let mut got = Vec::new();
            while let Some(run) = rx.blocking_recv() {
                got.extend(run);
            }
            (compare.join().unwrap().unwrap(), got)
        });
        assert_eq!(done.load(Ordering::Relaxed), size);
        got.sort_unstable();
        (found, got)
    }

    fn noise(len: usize, seed: u8) -> Vec<u8> {
        let mut h = blake3::Hasher::new();
        h.update(&[seed]);
        let mut out = vec![0u8; len];
        h.finalize_xof().fill(&mut out);
        out
    }

    #[test]
    fn a_target_that_differs_entirely_is_sampled_and_then_compared_again_where_it_matches() {
        const RUN: usize = RUN_BYTES as usize;
        let per_run = (RUN / 4096) as u64;
        // Ten runs that differ entirely, then four that match.
        let point = noise(14 * RUN, 1);
        let mut target = noise(10 * RUN, 2);
        target.extend_from_slice(&point[10 * RUN..]);
        let (found, got) = compare_one_worker(&target, &point);
        // Eight runs compared in full start the sampling; runs 8 and 9 are
        // fetched unread; run 10's sample matches, so it and the rest are
        // compared in full and nothing of them is fetched.
        assert_eq!(
            found,
            Compared {
                differ: 10 * per_run,
                unread: 2 * per_run
            }
        );
        assert_eq!(got, (0..10 * per_run).collect::<Vec<_>>());
    }

    #[test]
    fn a_sampled_run_is_fetched_whole_only_until_a_sample_matches() {
        const RUN: usize = RUN_BYTES as usize;
        let per_run = (RUN / 4096) as u64;
        let point = noise(12 * RUN, 3);
        let mut target = noise(8 * RUN, 4);
        target.extend_from_slice(&point[8 * RUN..]);
        // Run 8: only its first block differs (the sample): fetched whole,
        // the cost of sampling. Run 9 matches: its sample matches, it is
        // compared, and runs 10 and 11 have one differing block each, not
        // sampled any more.
        target[8 * RUN] ^= 1;
        target[10 * RUN + 4096 * 5] ^= 1;
        target[11 * RUN] ^= 1;
        let (found, got) = compare_one_worker(&target, &point);
        let mut want: Vec<u64> = (0..9 * per_run).collect();
        want.extend([10 * per_run + 5, 11 * per_run]);
        assert_eq!(got, want);
        assert_eq!(
            found,
            Compared {
                differ: 9 * per_run + 2,
                unread: per_run
            }
        );
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
