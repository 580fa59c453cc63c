//! Restore cost of an old point after many newer ones: the catalog lookup
//! that turns a point into its block map. A volume of 16384 blocks (1 GiB at
//! 64 KiB) gets a full first point and then 1000 points changing 1% each;
//! the map of the oldest point is compared with the map of the newest.
//! (Reading the blocks themselves runs at pack read speed either way.)
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)] // criterion macros; bench code

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pilotlight_protocol::{BlockHash, Encoding};
use pilotlight_receiver::catalog::{BlockRef, Catalog, NewPoint};
use pilotlight_receiver::pack::BlockLoc;
use rand::{Rng, SeedableRng};

const BLOCKS: u64 = 16384;
const BLOCK: u32 = 64 << 10;
const NEWER: u64 = 1000;

fn block(n: u64) -> (BlockHash, BlockLoc) {
    let h = BlockHash::of(&n.to_le_bytes());
    let loc = BlockLoc {
        pack: 1,
        offset: 16 + n * 100,
        stored_len: 52,
        raw_len: BLOCK,
        encoding: Encoding::Zstd,
    };
    (h, loc)
}

fn commit(cat: &mut Catalog, server_id: i64, indices: &[u64], first: u64) -> i64 {
    let new: Vec<(BlockHash, BlockLoc)> = (0..indices.len() as u64)
        .map(|i| block(first + i))
        .collect();
    let refs: Vec<BlockRef> = indices
        .iter()
        .zip(&new)
        .map(|(&index, (h, _))| BlockRef {
            volume: 0,
            index,
            raw_len: BLOCK,
            hash: Some(*h),
        })
        .collect();
    cat.commit_point(&NewPoint {
        server_id,
        created_ms: first as i64,
        source_ms: first as i64,
        consistency: "fuzzy",
        commit: "sync",
        volumes: &[("root", BLOCK, BLOCKS * u64::from(BLOCK))],
        blocks: &refs,
        zero_runs: &[],
        new_blocks: &new,
        packs: &[(1, 1 << 40)],
        merge_sync: false,
    })
    .unwrap()
}

fn restore_cost(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let mut cat = Catalog::open(&dir.path().join("catalog.db")).unwrap();
    cat.set_identity("bench", "00").unwrap();
    let server_id = cat.require_server("bench").unwrap().id;
    let all: Vec<u64> = (0..BLOCKS).collect();
    let oldest = commit(&mut cat, server_id, &all, 0);
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut next = BLOCKS;
    let mut newest = oldest;
    for _ in 0..NEWER {
        let mut changed: Vec<u64> = (0..BLOCKS / 100)
            .map(|_| rng.random_range(0..BLOCKS))
            .collect();
        changed.sort_unstable();
        changed.dedup();
        newest = commit(&mut cat, server_id, &changed, next);
        next += changed.len() as u64;
    }
    let volume = cat.volume(server_id, "root").unwrap().unwrap().id;
    let mut g = c.benchmark_group("block_map_1GiB_volume_after_1000_points");
    g.throughput(Throughput::Elements(BLOCKS));
    g.sample_size(10);
    g.bench_function("oldest_point", |b| {
        b.iter(|| {
            assert_eq!(
                cat.block_map(volume, oldest, 0).unwrap().len() as u64,
                BLOCKS
            )
        })
    });
    g.bench_function("newest_point", |b| {
        b.iter(|| {
            assert_eq!(
                cat.block_map(volume, newest, 0).unwrap().len() as u64,
                BLOCKS
            )
        })
    });
    g.finish();
}

criterion_group!(benches, restore_cost);
criterion_main!(benches);
