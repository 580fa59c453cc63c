//! Criterion benchmarks of the hot path: delta hashing (BLAKE3 of blocks
//! against a stored hash table), block encode/decode (zstd levels on
//! compressible and random data), and framing of encoded blocks.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)] // criterion macros; bench code

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pilotlight_protocol::block::{is_zero, Decoder, Encoder};
use pilotlight_protocol::frame::BlockFrame;
use pilotlight_protocol::{BlockHash, Frame};
use rand::{RngCore, SeedableRng};

const VOLUME: usize = 64 << 20;

fn mixed(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    let text = b"pilotlight keeps a warm copy of every disk; restores are checked byte for byte. ";
    for (i, chunk) in v.chunks_mut(64 * 1024).enumerate() {
        match i % 4 {
            0 | 1 => rng.fill_bytes(chunk),
            2 => {}
            _ => chunk
                .iter_mut()
                .enumerate()
                .for_each(|(j, b)| *b = text[j % text.len()]),
        }
    }
    v
}

fn delta_hashing(c: &mut Criterion) {
    let data = mixed(VOLUME, 1);
    let mut g = c.benchmark_group("delta_hashing");
    g.throughput(Throughput::Bytes(VOLUME as u64));
    g.sample_size(10);
    for bs in [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20] {
        let table: Vec<BlockHash> = data.chunks(bs).map(BlockHash::of).collect();
        g.bench_with_input(BenchmarkId::from_parameter(bs), &bs, |b, &bs| {
            b.iter(|| {
                let mut changed = 0usize;
                for (i, block) in data.chunks(bs).enumerate() {
                    let h = if is_zero(block) {
                        table[i]
                    } else {
                        BlockHash::of(block)
                    };
                    changed += usize::from(h != table[i]);
                }
                changed
            })
        });
    }
    g.finish();
}

fn block_codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("block_codec");
    // 64 KiB: the default block size; 4 KiB: what trace mode ships for a
    // random 4 KiB write, where zstd's per-call cost counts.
    for block in [64 * 1024, 4 * 1024] {
        let compressible = mixed(64 * 1024 * 4, 2)[3 * 64 * 1024..][..block].to_vec();
        let mut random = vec![0u8; block];
        rand::rngs::StdRng::seed_from_u64(3).fill_bytes(&mut random);
        g.throughput(Throughput::Bytes(block as u64));
        for (name, data) in [("text", &compressible), ("random", &random)] {
            for level in [1, 3] {
                let mut enc = Encoder::new(level).unwrap();
                let id = format!("{}k/{level}", block / 1024);
                g.bench_function(BenchmarkId::new(format!("encode_{name}"), &id), |b| {
                    b.iter(|| enc.encode(data).1.len())
                });
                let (e, payload) = enc.encode(data);
                let payload = payload.to_vec();
                let hash = BlockHash::of(data);
                let mut dec = Decoder::new().unwrap();
                let mut out = Vec::new();
                g.bench_function(
                    BenchmarkId::new(format!("decode_verify_{name}"), &id),
                    |b| {
                        b.iter(|| {
                            dec.decode(e, &payload, data.len() as u32, &hash, &mut out)
                                .unwrap()
                        })
                    },
                );
            }
        }
    }
    g.finish();
}

fn framing(c: &mut Criterion) {
    let data = mixed(64 * 1024 * 16, 4);
    let mut enc = Encoder::new(1).unwrap();
    let frames: Vec<BlockFrame> = data
        .chunks(64 * 1024)
        .enumerate()
        .map(|(i, b)| {
            let (e, p) = enc.encode(b);
            BlockFrame {
                tag: 1,
                volume: 0,
                encoding: e,
                index: i as u64,
                raw_len: b.len() as u32,
                hash: BlockHash::of(b),
                payload: Bytes::copy_from_slice(p),
            }
        })
        .collect();
    let wire_len: usize = frames.iter().map(|f| f.payload.len() + 100).sum();
    let mut g = c.benchmark_group("framing");
    g.throughput(Throughput::Bytes(wire_len as u64));
    g.bench_function("encode_decode_16_blocks", |b| {
        let mut buf = BytesMut::with_capacity(wire_len * 2);
        b.iter(|| {
            for (seq, f) in frames.iter().enumerate() {
                Frame::Block(f.clone()).encode(seq as u64, &mut buf);
            }
            let mut n = 0;
            while let Ok(Some(_)) = Frame::decode(&mut buf) {
                n += 1;
            }
            n
        })
    });
    g.finish();
}

criterion_group!(benches, delta_hashing, block_codec, framing);
criterion_main!(benches);
