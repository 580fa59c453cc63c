//! The catalog at scale (issue 15's target): a catalog of `ROWS` block
//! references generated directly with SQLite, then the latency of a
//! point's commit and of a restore's block map on it.
//!
//! The generated store has `SERVERS` servers, each with one volume of
//! 64 KiB blocks, an initial point that stores every block, and then
//! `POINTS` points each changing 1% of the blocks. Every reference is to a
//! block of its own (`blocks` and `server_blocks` hold a row per reference),
//! hashes (a big-endian counter, then 24 bytes of fill) in insertion order so that the generation appends to each tree.
//!
//!     SCALE_DIR=/big/dir cargo bench --bench catalog_scale -- ROWS [SERVERS]
//!
//! Prints the size of the catalog, the time to generate it, then p50/p99 of
//! a commit of a 1% point (one server at a time, as commits take the
//! catalog) and of the block map of a volume's newest point.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::panic)] // bench code

use std::path::Path;
use std::time::{Duration, Instant};

use pilotlight_protocol::{BlockHash, Encoding};
use pilotlight_receiver::catalog::{BlockRef, NewPoint};
use pilotlight_receiver::pack::BlockLoc;
use pilotlight_receiver::store::{Store, CATALOG_FILE};
use rusqlite::{params, Connection};

const BS: u32 = 64 << 10;
/// The last 24 bytes of every generated hash, in hex.
const FILL: &str = "abababababababababababababababababababababababab";
/// Incremental points per server after the initial one.
const POINTS: u64 = 10;

fn percentile(v: &mut [Duration], p: f64) -> f64 {
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1e3
}

/// Fill the catalog of `dir` with `servers` servers of `blocks` blocks.
fn generate(db: &Path, servers: u64, blocks: u64) -> u64 {
    let conn = Connection::open(db).unwrap();
    conn.execute_batch(
        "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-1048576;",
    )
    .unwrap();
    let changed = (blocks / 100).max(1);
    let mut rows = 0u64;
    conn.execute_batch("BEGIN").unwrap();
    // hash = big-endian counter (so each tree is appended to) + fill.
    let mut next_hash = 0u64;
    for s in 1..=servers {
        conn.execute(
            "INSERT INTO servers(id, name, cert_serial) VALUES(?1, 'gen' || ?1, '00')",
            params![s as i64],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO volumes(id, server_id, name, block_size, size) VALUES(?1, ?1, 'root', ?2, ?3)",
            params![s as i64, BS, (blocks * u64::from(BS)) as i64],
        )
        .unwrap();
    }
    // Points interleaved across servers, as commits would be.
    let mut point = 0i64;
    for round in 0..=POINTS {
        for s in 1..=servers {
            point += 1;
            conn.execute(
                "INSERT INTO points(id, server_id, created_ms, consistency, commit_mode, source_ms, seq)
                 VALUES(?1, ?2, ?1, 'fuzzy', 'sync', ?1, ?3)",
                params![point, s as i64, round as i64 + 1],
            )
            .unwrap();
            // Round 0: every block; then 1% of the blocks, spread.
            let (count, stride) = if round == 0 {
                (blocks, 1)
            } else {
                (changed, 100)
            };
            let first = next_hash;
            conn.execute(
                "WITH RECURSIVE c(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM c WHERE i + 1 < ?1)
                 INSERT INTO point_blocks(volume_id, block_index, point_id, hash)
                 SELECT ?2, (i * ?3 + ?4) % ?5, ?6, unhex(printf('%016x', ?7 + i) || ?8) FROM c",
                params![
                    count as i64,
                    s as i64,
                    stride,
                    round as i64,
                    blocks as i64,
                    point,
                    first as i64,
                    FILL
                ],
            )
            .unwrap();
            conn.execute(
                "WITH RECURSIVE c(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM c WHERE i + 1 < ?1)
                 INSERT INTO blocks(hash, pack_id, offset, stored_len, raw_len, encoding)
                 SELECT unhex(printf('%016x', ?2 + i) || ?4), 1 + (?2 + i) / 16384,
                        16 + ((?2 + i) % 16384) * 32768, 30000, ?3, 1 FROM c",
                params![count as i64, first as i64, BS, FILL],
            )
            .unwrap();
            conn.execute(
                "WITH RECURSIVE c(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM c WHERE i + 1 < ?1)
                 INSERT INTO server_blocks(server_id, hash)
                 SELECT ?2, unhex(printf('%016x', ?3 + i) || ?4) FROM c",
                params![count as i64, s as i64, first as i64, FILL],
            )
            .unwrap();
            next_hash += count;
            rows += count;
        }
    }
    conn.execute(
        "INSERT INTO packs(id, committed_len) SELECT DISTINCT pack_id, 16 + 16384 * 32768 FROM blocks",
        [],
    )
    .unwrap();
    conn.execute_batch("COMMIT").unwrap();
    rows
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum()
}

fn main() {
    let mut args = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse::<u64>().ok());
    let rows: u64 = args.next().unwrap_or(1_000_000);
    let servers: u64 = args.next().unwrap_or(100);
    let base = std::env::var_os("SCALE_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let tmp = tempfile::tempdir_in(base).unwrap();
    let dir = tmp.path().join("receiver");
    pilotlight_receiver::admin::init(&dir, None).unwrap();
    // Rows per server: the full point plus POINTS points of 1%.
    let blocks = (rows as f64 / servers as f64 / (1.0 + POINTS as f64 / 100.0)) as u64;
    let t = Instant::now();
    let made = generate(&dir.join(CATALOG_FILE), servers, blocks);
    let generated = t.elapsed();
    let t = Instant::now();
    let store = Store::open(&dir).unwrap();
    let opened = t.elapsed();
    println!(
        "{made} block rows ({servers} servers x {blocks} blocks of 64 KiB, {POINTS} points of 1% each): \
         generated in {:.0} s, catalog {:.2} GiB ({:.0} bytes per row), opened in {:.1} s",
        generated.as_secs_f64(),
        dir_size(&dir) as f64 / f64::from(1u32 << 30),
        dir_size(&dir) as f64 / made as f64,
        opened.as_secs_f64(),
    );

    // Commits: points of 10, 100, 1000 blocks and of 1% of the volume,
    // each size once per server of the first 50, in turn.
    let mut next = u64::MAX / 2;
    let mut pack = 1_000_000u64;
    for changed in [10, 100, 1000, (blocks / 100).max(1)] {
        let mut commits = Vec::new();
        for s in 1..=servers.min(50) {
            pack += 1;
            commits.push(commit(&store, s, blocks, changed, next, pack));
            next += changed;
        }
        let n = commits.len();
        println!(
            "commit of a point of {changed} new blocks, {n} servers: p50 {:.1} ms, p99 {:.1} ms",
            percentile(&mut commits, 0.5),
            percentile(&mut commits, 0.99)
        );
    }

    // Block maps: the newest point of each of the first servers.
    let mut maps = Vec::new();
    for s in 1..=servers.min(50) {
        let cat = store.catalog().unwrap();
        let point = cat.latest_point(s as i64).unwrap().unwrap();
        let t = Instant::now();
        let map = cat.block_map(s as i64, point, 0).unwrap();
        maps.push(t.elapsed());
        assert_eq!(map.len() as u64, blocks);
    }
    let n = maps.len();
    println!(
        "block map of a volume's newest point ({blocks} blocks), {n} volumes: p50 {:.0} ms, p99 {:.0} ms",
        percentile(&mut maps, 0.5),
        percentile(&mut maps, 0.99)
    );
}

/// Commit a point of server `s` with `changed` new blocks spread over its
/// volume of `blocks`; its time.
fn commit(store: &Store, s: u64, blocks: u64, changed: u64, first: u64, pack: u64) -> Duration {
    let refs: Vec<BlockRef> = (0..changed)
        .map(|i| BlockRef {
            volume: 0,
            index: (i * (blocks / changed).max(1) + 7) % blocks,
            raw_len: BS,
            hash: Some(hash(first + i)),
        })
        .collect();
    let new: Vec<(BlockHash, BlockLoc)> = (0..changed)
        .map(|i| {
            let loc = BlockLoc {
                pack,
                offset: 16 + i * 32768,
                stored_len: 30000,
                raw_len: BS,
                encoding: Encoding::Zstd,
            };
            (hash(first + i), loc)
        })
        .collect();
    let packs = [(pack, 16 + changed * 32768)];
    let size = blocks * u64::from(BS);
    let t = Instant::now();
    store
        .catalog()
        .unwrap()
        .commit_point(&NewPoint {
            server_id: s as i64,
            created_ms: 1,
            source_ms: 1,
            consistency: "fuzzy",
            commit: "sync",
            volumes: &[("root", BS, size)],
            blocks: &refs,
            zero_runs: &[],
            new_blocks: &new,
            packs: &packs,
            merge_sync: false,
        })
        .unwrap();
    t.elapsed()
}

fn hash(i: u64) -> BlockHash {
    let mut h = [0xab; 32];
    h[..8].copy_from_slice(&i.to_le_bytes());
    BlockHash(h)
}
