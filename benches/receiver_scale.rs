//! Receiver memory and the catalog at scale (issue 15 item 4): where the
//! receiver's memory goes per block reference of a point in flight and per
//! unique stored block, and how long a commit holds the catalog.
//!
//! Memory is the growth of this process's resident set (`VmRSS`, and the
//! peak `VmHWM` reset through `/proc/self/clear_refs`) while the real
//! structures fill: a session recording `N` blocks (as a data stream does),
//! the store's block index and owners, and a garbage collection over a
//! catalog of `N` blocks. Time is the wall time of commits, alone and two
//! servers at once.
//!
//!     cargo test --release --bench receiver_scale -- [N]
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::panic)] // bench code

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pilotlight_protocol::frame::CommitMode;
use pilotlight_protocol::{BlockHash, Encoding};
use pilotlight_receiver::catalog::{BlockRef, NewPoint};
use pilotlight_receiver::pack::BlockLoc;
use pilotlight_receiver::session::{Session, SessionVolume};
use pilotlight_receiver::store::Store;
use tokio_util::sync::CancellationToken;

const BS: u32 = 64 << 10;

/// (VmRSS, VmHWM) in bytes.
fn memory() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib = |key: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (kib("VmRSS:") * 1024, kib("VmHWM:") * 1024)
}

/// Reset the peak to the current resident set.
fn reset_peak() {
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
}

fn hash(i: u64, salt: u8) -> BlockHash {
    let mut h = [salt; 32];
    h[..8].copy_from_slice(&i.to_le_bytes());
    h[8..16].copy_from_slice(&i.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
    BlockHash(h)
}

fn loc(i: u64) -> BlockLoc {
    BlockLoc {
        pack: 1 + i / 16384,
        offset: 16 + (i % 16384) * 4096,
        stored_len: 4000,
        raw_len: BS,
        encoding: Encoding::Zstd,
    }
}

fn per(bytes: u64, n: u64) -> f64 {
    bytes as f64 / n as f64
}

struct Fixture {
    _tmp: tempfile::TempDir,
    store: Arc<Store>,
    servers: Vec<i64>,
}

fn fixture(dir: &Path, servers: usize) -> Fixture {
    let tmp = tempfile::tempdir_in(dir).unwrap();
    let rdir = tmp.path().join("receiver");
    pilotlight_receiver::admin::init(&rdir, None).unwrap();
    let mut ids = Vec::new();
    for s in 0..servers {
        let name = format!("s{s}");
        pilotlight_receiver::admin::enroll(&rdir, &name, &tmp.path().join(format!("{name}.pem")))
            .unwrap();
    }
    let store = Arc::new(Store::open_for_serve(&rdir).unwrap());
    for s in 0..servers {
        ids.push(
            store
                .catalog()
                .unwrap()
                .require_server(&format!("s{s}"))
                .unwrap()
                .id,
        );
    }
    Fixture {
        _tmp: tmp,
        store,
        servers: ids,
    }
}

fn session(f: &Fixture, n: u64) -> Session {
    let serial = f
        .store
        .catalog()
        .unwrap()
        .require_server("s0")
        .unwrap()
        .cert_serial
        .unwrap();
    let mut s = Session::new(
        1,
        f.servers[0],
        "s0".into(),
        CommitMode::Sync,
        1,
        vec![SessionVolume {
            name: "root".into(),
            size: n * u64::from(BS),
            block_size: BS,
        }],
        CancellationToken::new(),
        4,
        f.store.clone(),
        8 << 20,
    );
    s.serial = serial;
    s
}

/// A session recording `n` new blocks of one point (an initial sync: every
/// block first stored by the point), then `n` blocks already stored.
fn session_memory(dir: &Path, n: u64) {
    let f = fixture(dir, 1);
    let file = Arc::new(tempfile::tempfile_in(dir).unwrap());
    let s = session(&f, n);
    let (before, _) = memory();
    for i in 0..n {
        let h = hash(i, 1);
        assert!(s.claim(&h, 1).unwrap());
        let r = BlockRef {
            volume: 0,
            index: i,
            raw_len: BS,
            hash: Some(h),
        };
        s.record(1, r, Some((h, loc(i), file.clone()))).unwrap();
    }
    let (new, _) = memory();
    let s2 = session(&f, n);
    for i in 0..n {
        let r = BlockRef {
            volume: 0,
            index: i,
            raw_len: BS,
            hash: Some(hash(i, 2)),
        };
        s2.record(1, r, None).unwrap();
    }
    let (dedup, _) = memory();
    // As data streams do: spill after each block.
    let s3 = Arc::new(session(&f, n));
    let t = Instant::now();
    for i in 0..n {
        let h = hash(i, 5);
        assert!(s3.claim(&h, 1).unwrap());
        let r = BlockRef {
            volume: 0,
            index: i,
            raw_len: BS,
            hash: Some(h),
        };
        s3.record(1, r, Some((h, loc(i), file.clone()))).unwrap();
        s3.spill().unwrap();
    }
    let spill_time = t.elapsed();
    let (spilled, _) = memory();
    let held = s3
        .state()
        .unwrap()
        .pending
        .get(&1)
        .map_or(0, |p| p.refs.len());
    println!(
        "| session, new block (ref + location + pending hash) | {:.0} |",
        per(new - before, n)
    );
    println!(
        "| session, block already stored (ref only) | {:.0} |",
        per(dedup - new, n)
    );
    println!(
        "| session spilling every {} refs, new block (memory, session and store) | {:.0} ({held} refs held at the end, {:.0} k refs/s recorded and spilled) |",
        pilotlight_receiver::session::SPILL_REFS,
        per(spilled.saturating_sub(dedup), n),
        n as f64 / spill_time.as_secs_f64() / 1e3
    );
    let gib16 = (16u64 << 40) / u64::from(BS);
    println!(
        "| (16 TiB initial sync at 64 KiB blocks = {gib16} refs: {:.1} GiB) | |",
        per(new - before, n) * gib16 as f64 / f64::from(1u32 << 30)
    );
}

/// The store's block index over `n` unique blocks, committed, then each
/// looked up as a data stream does (held in the catalog; memory is its
/// bounded cache and SQLite's page caches).
fn index_memory(dir: &Path, n: u64) {
    let f = fixture(dir, 1);
    let (refs, new) = point_of(n, 3);
    let hashes: Vec<BlockHash> = new.iter().map(|(h, _)| *h).collect();
    let size = n * u64::from(BS);
    f.store
        .catalog()
        .unwrap()
        .commit_point(&new_point(f.servers[0], &refs, &new, size))
        .unwrap();
    drop((refs, new));
    let (before, _) = memory();
    let t = Instant::now();
    for h in &hashes {
        let _gate = f.store.index_read().unwrap();
        let found = f
            .store
            .find(
                f.servers[0],
                h,
                pilotlight_receiver::quota::DedupScope::Server,
            )
            .unwrap();
        assert!(found.is_some());
    }
    let took = t.elapsed();
    let (after, _) = memory();
    println!(
        "| block index (catalog + cache of {} entries), resident growth per unique block looked up | {:.0} ({:.0} k lookups/s, {} cached) |",
        pilotlight_receiver::catalog::DEFAULT_CACHE_ENTRIES,
        per(after.saturating_sub(before), n),
        n as f64 / took.as_secs_f64() / 1e3,
        f.store.index().cached()
    );
}

fn new_point<'a>(
    server_id: i64,
    blocks: &'a [BlockRef],
    new_blocks: &'a [(BlockHash, BlockLoc)],
    size: u64,
) -> NewPoint<'a> {
    NewPoint {
        server_id,
        created_ms: 1,
        source_ms: 1,
        consistency: "fuzzy",
        commit: "sync",
        volumes: Box::leak(Box::new([("root", BS, size)])),
        blocks,
        zero_runs: &[],
        new_blocks,
        packs: &[],
        merge_sync: false,
    }
}

fn point_of(n: u64, salt: u8) -> (Vec<BlockRef>, Vec<(BlockHash, BlockLoc)>) {
    let refs = (0..n)
        .map(|i| BlockRef {
            volume: 0,
            index: i,
            raw_len: BS,
            hash: Some(hash(i, salt)),
        })
        .collect();
    let new = (0..n).map(|i| (hash(i, salt), loc(i))).collect();
    (refs, new)
}

/// GC over a catalog of `n` stored blocks, every one referenced: the peak
/// over the store as `serve` holds it.
fn gc_memory(dir: &Path, n: u64) {
    let f = fixture(dir, 1);
    let (refs, new) = point_of(n, 4);
    let size = n * u64::from(BS);
    f.store
        .catalog()
        .unwrap()
        .commit_point(&new_point(f.servers[0], &refs, &new, size))
        .unwrap();
    drop((refs, new));
    reset_peak();
    let (before, _) = memory();
    let report =
        pilotlight_receiver::gc::collect(&f.store, &|| Ok(Default::default()), Default::default())
            .unwrap();
    let (_, peak) = memory();
    assert_eq!(report.blocks_dropped, 0);
    println!(
        "| GC, peak over the store, per stored block | {:.0} |",
        per(peak.saturating_sub(before), n)
    );
}

/// Commit a point of `refs`: in the store's group commit, as sessions do,
/// or (`grouped` false) holding the catalog for the whole commit, as
/// sessions did before it.
fn commit(
    store: &Store,
    server: i64,
    refs: Vec<BlockRef>,
    new: Vec<(BlockHash, BlockLoc)>,
    size: u64,
    grouped: bool,
) {
    if !grouped {
        store
            .catalog()
            .unwrap()
            .commit_point(&new_point(server, &refs, &new, size))
            .unwrap();
        return;
    }
    store
        .write(move |cat| {
            cat.commit_point(&new_point(server, &refs, &new, size))?;
            Ok(|| ())
        })
        .unwrap();
}

/// `k` servers' points of `n` new blocks each committed at once (a thread
/// each, as sessions' commits): each one's time, and all done.
fn at_once(f: &Fixture, k: usize, n: u64, salt: u8, grouped: bool) -> (Vec<Duration>, Duration) {
    let size = n * u64::from(BS);
    let start = std::sync::Barrier::new(k);
    let both = Instant::now();
    let times = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..k)
            .map(|i| {
                let (refs, new) = point_of(n, salt + i as u8);
                let store = f.store.clone();
                let server = f.servers[i];
                let start = &start;
                sc.spawn(move || {
                    start.wait();
                    let t = Instant::now();
                    commit(&store, server, refs, new, size, grouped);
                    t.elapsed()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    (times, both.elapsed())
}

/// Commit latency: points of `n` new blocks, one server alone, then two
/// and four servers at once; held catalog (before the group commit) beside
/// the group commit, in the same run.
fn commit_times(dir: &Path) {
    println!("\n| blocks per point | commit | one alone, ms | two at once: each, ms | both done, ms | four at once: all done, ms |");
    println!("|---|---|---|---|---|---|");
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    for (round, n) in [(1u8, 100u64), (2, 10_000), (3, 100_000)] {
        for grouped in [false, true] {
            let f = fixture(dir, 4);
            let salt = 40 * round + if grouped { 20 } else { 0 };
            let (refs, new) = point_of(n, salt);
            let t = Instant::now();
            commit(
                &f.store,
                f.servers[0],
                refs,
                new,
                n * u64::from(BS),
                grouped,
            );
            let alone = t.elapsed();
            let (two, two_done) = at_once(&f, 2, n, salt + 1, grouped);
            let (_, four_done) = at_once(&f, 4, n, salt + 3, grouped);
            println!(
                "| {n} | {} | {:.1} | {:.1} / {:.1} | {:.1} | {:.1} |",
                if grouped {
                    "group commit"
                } else {
                    "catalog held throughout"
                },
                ms(alone),
                ms(two[0]),
                ms(two[1]),
                ms(two_done),
                ms(four_done)
            );
        }
    }
}

fn main() {
    let n: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let dir = std::env::var_os("SCALE_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    println!("N = {n}, block size {BS}\n");
    println!("| what | bytes |\n|---|---|");
    session_memory(&dir, n);
    index_memory(&dir, n);
    gc_memory(&dir, n);
    commit_times(&dir);
}
