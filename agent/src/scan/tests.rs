//! Tests of the scan: listed blocks, work units, zero runs.
#![allow(clippy::unwrap_used)] // test code
use pilotlight_protocol::{Encoding, Frame, ZeroRunFrame};

use super::*;

#[test]
fn a_listed_scan_sends_exactly_the_listed_blocks_that_changed() {
    // 64 blocks of 4 KiB, each distinct; the base says block 9 is
    // already as it is now.
    let bs = 4096u32;
    let data: Vec<u8> = (0..64u32 * bs)
        .map(|i| (i / bs * 7 + i % 251) as u8)
        .collect();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &data).unwrap();
    let size = data.len() as u64;
    let mut base = zero_table(size, bs);
    base[9] = BlockHash::of(&data[9 * 4096..10 * 4096]);
    // Gaps of 1, 2 and 17 blocks: the short ones are read through.
    let only = [1, 3, 6, 9, 10, 28, 63];
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (tx, rx) = async_channel::bounded(128);
    let window = Arc::new(Semaphore::new(64 << 20));
    let stop = CancellationToken::new();
    let job = ScanJob {
        vol_idx: 0,
        name: "v",
        path: file.path(),
        size,
        block_size: bs,
        base: &base,
        tag: 1,
        only: Some(&only),
        partial: &[],
        range: None,
        direct: false,
        from_memory: false,
    };
    let sink = Sink {
        tx: &tx,
        window: &window,
        rt: rt.handle(),
        stop: &stop,
        progress: None,
        zero_runs: true,
    };
    let result = scan(&job, &sink, 3, 1).unwrap();
    let mut changed: Vec<u64> = result.changed.iter().map(|c| c.0).collect();
    changed.sort_unstable();
    assert_eq!(changed, [1, 3, 6, 10, 28, 63]);
    // Spans 1..=10 (gaps of 1 and 2 read through), 28, 63.
    assert_eq!(result.bytes_read, (10 + 1 + 1) * 4096);
    let mut sent: Vec<(u64, BlockHash)> = std::iter::from_fn(|| rx.try_recv().ok())
        .filter_map(|o| match o.frame {
            Frame::Block(b) => Some((b.index, b.hash)),
            _ => None,
        })
        .collect();
    sent.sort_unstable_by_key(|s| s.0);
    let want: Vec<(u64, BlockHash)> = [1u64, 3, 6, 10, 28, 63]
        .iter()
        .map(|&i| (i, BlockHash::of(&data[i as usize * 4096..][..4096])))
        .collect();
    assert_eq!(sent, want);
}

/// Scan `data` (4 KiB blocks) against `base`; the frames sent.
fn frames_of(data: &[u8], base: &[BlockHash], zero_runs: bool) -> (ScanResult, Vec<Frame>) {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), data).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (tx, rx) = async_channel::bounded(1024);
    let window = Arc::new(Semaphore::new(64 << 20));
    let stop = CancellationToken::new();
    let base = base.to_vec();
    let job = ScanJob {
        vol_idx: 0,
        name: "v",
        path: file.path(),
        size: data.len() as u64,
        block_size: 4096,
        base: &base,
        tag: 1,
        only: None,
        partial: &[],
        range: None,
        direct: false,
        from_memory: false,
    };
    let sink = Sink {
        tx: &tx,
        window: &window,
        rt: rt.handle(),
        stop: &stop,
        progress: None,
        zero_runs,
    };
    let result = scan(&job, &sink, 1, 1).unwrap();
    let mut frames: Vec<Frame> = std::iter::from_fn(|| rx.try_recv().ok())
        .map(|o| o.frame)
        .collect();
    frames.sort_by_key(|f| match f {
        Frame::Block(b) => b.index,
        Frame::ZeroRun(z) => z.first,
        _ => u64::MAX,
    });
    (result, frames)
}

#[test]
fn blocks_that_became_zeros_go_as_runs_or_one_zero_block_each() {
    // 12 blocks, all data in the base; now blocks 2..5 and 7 are
    // zeros, and the short last block (100 bytes) too.
    let bs = 4096usize;
    let size = 11 * bs + 100;
    let base: Vec<BlockHash> = (0..12).map(|i| BlockHash([i as u8 + 1; 32])).collect();
    let mut data = vec![0u8; size];
    for i in [0usize, 1, 5, 6, 8, 9, 10] {
        data[i * bs..(i + 1) * bs].fill(i as u8 + 1);
    }
    let (r, frames) = frames_of(&data, &base, true);
    let run = |first, count| {
        Frame::ZeroRun(ZeroRunFrame {
            tag: 1,
            volume: 0,
            first,
            count,
        })
    };
    let zero_runs: Vec<&Frame> = frames
        .iter()
        .filter(|f| matches!(f, Frame::ZeroRun(_)))
        .collect();
    assert_eq!(zero_runs, [&run(2, 3), &run(7, 1), &run(11, 1)]);
    assert_eq!(r.frames, frames.len() as u64);
    assert_eq!(r.frames, 7 + 3);
    // Every block is in `changed`, zeros with their zero hash.
    assert_eq!(r.changed.len(), 12);
    assert!(r.changed.contains(&(11, zero_hash(100))));
    assert!(r.changed.contains(&(3, zero_hash(bs))));

    // To a receiver without ZeroRun: one zero Block per block.
    let (r, frames) = frames_of(&data, &base, false);
    assert_eq!(r.frames, 12);
    let zeros: Vec<(u64, u32)> = frames
        .iter()
        .filter_map(|f| match f {
            Frame::Block(b) if b.encoding == Encoding::Zero => Some((b.index, b.raw_len)),
            _ => None,
        })
        .collect();
    assert_eq!(
        zeros,
        [(2, 4096), (3, 4096), (4, 4096), (7, 4096), (11, 100)]
    );
}

#[test]
fn work_units_cover_exactly_the_blocks_asked_for() {
    // The whole volume: chunks of 4, the last one short.
    assert_eq!(work_units(10, 4, 0, None), vec![(0, 4), (4, 4), (8, 2)]);
    // A list: consecutive runs, split at the chunk size; duplicates and
    // blocks past the end dropped.
    let only = [1, 2, 3, 4, 5, 5, 9, 11, 12, 40];
    assert_eq!(
        work_units(13, 4, 0, Some(&only)),
        vec![(1, 4), (5, 1), (9, 1), (11, 2)]
    );
    assert!(work_units(13, 4, 0, Some(&[])).is_empty());
    // Gaps of up to one block are read through, within the chunk size.
    assert_eq!(
        work_units(13, 4, 1, Some(&only)),
        vec![(1, 4), (5, 1), (9, 4)]
    );
    assert_eq!(
        work_units(100, 64, 1, Some(&[0, 2, 4, 7, 9])),
        vec![(0, 5), (7, 3)]
    );
}

#[test]
fn a_range_clips_the_units_to_its_span() {
    use crate::sparse::Unit;
    let units = vec![Unit::data(0, 4), Unit::data(4, 4), Unit::data(8, 2)];
    let got: Vec<(u64, u64)> = clip(units, (3, 6))
        .iter()
        .map(|u| (u.first, u.count))
        .collect();
    assert_eq!(got, [(3, 1), (4, 4), (8, 1)]);
}

/// Blocks planned as pages go as `PartialBlock`s over their base hash,
/// with exactly their pages' bytes; the others are read whole.
#[test]
fn blocks_planned_as_pages_go_as_their_pages() {
    use crate::trace::Pages;
    let bs = 64u32 << 10;
    let data: Vec<u8> = (0..4 * bs)
        .map(|i| (i / 4096 * 3 + i % 241) as u8)
        .collect();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &data).unwrap();
    let size = data.len() as u64;
    let mut base = zero_table(size, bs);
    base[2] = BlockHash([2; 32]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (tx, rx) = async_channel::bounded(128);
    let window = Arc::new(Semaphore::new(64 << 20));
    let stop = CancellationToken::new();
    let mut pages = Pages::one(1, 2);
    assert!(pages.add(5, 7, 16));
    let partial = [PartialRead {
        index: 2,
        pages,
        base: None,
    }];
    let job = ScanJob {
        vol_idx: 0,
        name: "v",
        path: file.path(),
        size,
        block_size: bs,
        base: &base,
        tag: 3,
        only: Some(&[0]),
        partial: &partial,
        range: None,
        direct: false,
        from_memory: false,
    };
    let sink = Sink {
        tx: &tx,
        window: &window,
        rt: rt.handle(),
        stop: &stop,
        progress: None,
        zero_runs: true,
    };
    let result = scan(&job, &sink, 2, 1).unwrap();
    assert_eq!(result.partial, 1);
    assert_eq!(result.partial_sent, [(2, pages, BlockHash([2; 32]))]);
    assert_eq!(result.bytes_read, u64::from(bs) + 3 * 4096);
    let mut changed = result.changed.clone();
    changed.sort_unstable_by_key(|c| c.0);
    assert_eq!(changed[1], (2, MERGED_LATER));
    let frames: Vec<Frame> = std::iter::from_fn(|| rx.try_recv().ok())
        .map(|o| o.frame)
        .collect();
    let p = frames
        .iter()
        .find_map(|f| match f {
            Frame::PartialBlock(p) => Some(p.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!((p.tag, p.index, p.raw_len), (3, 2, bs));
    assert_eq!(p.base_hash, BlockHash([2; 32]));
    let at = 2 * bs as usize;
    let want: Vec<u8> = [
        &data[at + 4096..at + 8192],
        &data[at + 5 * 4096..at + 7 * 4096],
    ]
    .concat();
    assert_eq!(&p.data[..], &want[..]);
    // Applied to the block's old content, the pages make the block as it is.
    let mut old = vec![0u8; bs as usize];
    assert!(p.apply(&mut old));
    assert_eq!(&old[4096..8192], &data[at + 4096..at + 8192]);
    assert!(frames
        .iter()
        .any(|f| matches!(f, Frame::Block(b) if b.index == 0)));
}
