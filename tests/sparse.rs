//! Sparse image files: the agent reads only their data (holes are found with
//! SEEK_DATA and count as zeros without a read), and every point restores
//! byte for byte, including a hole punched where data was.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use pilotlight::{agent_config, assert_same_bytes, file_len, replicate_once, TestReceiver};

const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

const MIB: u64 = 1 << 20;
/// The agent reads in chunks of this size (agent/src/scan.rs).
const CHUNK: u64 = 2 * MIB;

fn write_at(img: &Path, offset: u64, len: usize, seed: u8) {
    let data: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect();
    File::options()
        .write(true)
        .open(img)
        .unwrap()
        .write_all_at(&data, offset)
        .unwrap();
}

/// Punch a hole with `fallocate --punch-hole` (util-linux): the range
/// reads as zeros and holds no blocks.
fn punch_hole(img: &Path, offset: u64, len: u64) {
    let st = Command::new("fallocate")
        .args(["--punch-hole", "--offset", &offset.to_string(), "--length"])
        .arg(len.to_string())
        .arg(img)
        .status()
        .expect("run fallocate");
    assert!(st.success(), "fallocate --punch-hole failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sparse_image_is_read_only_where_it_holds_data() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let rcv = TestReceiver::create(root).await;
    let id = rcv.enroll("sparse");
    let img = root.join("sparse.img");
    // 1 GiB, holding four runs of data: one at the start, one across a
    // chunk boundary, one filling a whole chunk, one in the last chunk
    // (which ends with a short block).
    let size = 1024 * MIB + 12_345;
    File::create(&img).unwrap().set_len(size).unwrap();
    write_at(&img, 0, 300_000, 1);
    write_at(&img, 500 * MIB - 70_000, 200_000, 2);
    write_at(&img, 800 * MIB, CHUNK as usize, 5);
    write_at(&img, size - 5_000, 5_000, 3);
    let cfg = agent_config(rcv.addr, &id, &root.join("state"), &[("root", &img)]);

    let first = replicate_once(&cfg).await;
    // At most the chunks the data touches: 1 + 2 + 1 + 1.
    assert!(
        first.bytes_read <= 5 * CHUNK,
        "read {} bytes of a 1 GiB image holding 2.5 MB",
        first.bytes_read
    );
    assert!(first.bytes_read > 0);
    let out = root.join("restored-1");
    rcv.restore("sparse", "root", first.point, &out);
    assert_same_bytes(&out, &img, file_len(&img));
    let copy1 = root.join("copy-1");
    std::fs::copy(&img, &copy1).unwrap();

    // A hole where data was (in a chunk that keeps some, and a whole chunk
    // that becomes one hole, so it is not read at all) must reach the
    // receiver as zeros; new data in a former hole as data.
    punch_hole(&img, 500 * MIB - 64 * 1024, 128 * 1024);
    punch_hole(&img, 800 * MIB, CHUNK);
    write_at(&img, 700 * MIB + 3, 10_000, 4);
    let second = replicate_once(&cfg).await;
    // 2 + 32 blocks of zeros, 1 of new data, at least.
    assert!(second.blocks_sent >= 35, "{second:?}");
    let out2 = root.join("restored-2");
    rcv.restore("sparse", "root", second.point, &out2);
    assert_same_bytes(&out2, &img, file_len(&img));
    // The first point is unchanged.
    let again = root.join("restored-1-again");
    rcv.restore("sparse", "root", first.point, &again);
    assert_same_bytes(&again, &copy1, file_len(&copy1));
    rcv.stop().await;
}

/// The data extents of a file (byte ranges), by SEEK_DATA / SEEK_HOLE.
fn data_extents(path: &Path) -> Vec<(u64, u64)> {
    use nix::unistd::{lseek, Whence};
    let f = File::open(path).unwrap();
    let len = file_len(path);
    let mut out = Vec::new();
    let mut at = 0i64;
    while (at as u64) < len {
        let start = match lseek(&f, at, Whence::SeekData) {
            Ok(s) => s,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => panic!("SEEK_DATA: {e}"),
        };
        let end = lseek(&f, start, Whence::SeekHole).unwrap();
        out.push((start as u64, end as u64));
        at = end;
    }
    out
}

/// Two sparse files of the same length hold the same bytes: equal within
/// the data of either, and holes (zeros) in both everywhere else. Reads
/// only the data, so a 1 TiB image takes as long as its few MiB.
fn assert_same_sparse(a: &Path, b: &Path) {
    assert_eq!(file_len(a), file_len(b), "lengths differ");
    let (fa, fb) = (File::open(a).unwrap(), File::open(b).unwrap());
    let mut ranges = data_extents(a);
    ranges.extend(data_extents(b));
    let mut total = 0;
    for (start, end) in ranges {
        let mut at = start;
        while at < end {
            let n = (end - at).min(4 * MIB) as usize;
            let (mut x, mut y) = (vec![0u8; n], vec![0u8; n]);
            fa.read_exact_at(&mut x, at).unwrap();
            fb.read_exact_at(&mut y, at).unwrap();
            assert!(
                x == y,
                "{} and {} differ in {at}..{}",
                a.display(),
                b.display(),
                at + n as u64
            );
            at += n as u64;
            total += n as u64;
        }
    }
    assert!(total < 4 * GIB, "compared {total} bytes: not sparse");
}

/// A 1 TiB sparse image with a few MiB of data at both ends and in the
/// middle: the initial sync reads and sends only its data, a later point
/// that zeroes data (a punched hole, zeros written over data) sends each
/// run of zero blocks as one frame, and both points restore byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_tib_sparse_image_syncs_in_frames_of_its_data_and_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let rcv = TestReceiver::create(root).await;
    let id = rcv.enroll("huge");
    let img = root.join("huge.img");
    // Ends in a short block.
    let size = TIB + 12_345;
    File::create(&img).unwrap().set_len(size).unwrap();
    write_at(&img, 0, 3 * MIB as usize, 1);
    write_at(&img, TIB / 2 - MIB, 3 * MIB as usize, 2);
    write_at(&img, size - 3 * MIB, 3 * MIB as usize, 3);
    let cfg = agent_config(rcv.addr, &id, &root.join("state"), &[("root", &img)]);
    // 64 KiB blocks: 48 + 48 + 49 blocks of data (the last range starts
    // mid-block), 16 Mi blocks in all.
    let data_blocks = 48 + 48 + 49;

    let first = replicate_once(&cfg).await;
    assert!(first.bytes_read <= 3 * 2 * CHUNK + 9 * MIB, "{first:?}");
    assert!(first.blocks_sent <= data_blocks, "{first:?}");
    assert!(first.frames_sent <= data_blocks, "{first:?}");
    let out1 = root.join("restored-1");
    rcv.restore("huge", "root", first.point, &out1);
    assert_same_sparse(&out1, &img);
    std::fs::remove_file(&out1).unwrap();

    // The middle's data becomes a hole, the first MiB zeros written over
    // data (read back as zeros), and a block in a far hole gets data.
    punch_hole(&img, TIB / 2 - MIB, 3 * MIB);
    File::options()
        .write(true)
        .open(&img)
        .unwrap()
        .write_all_at(&vec![0u8; MIB as usize], 0)
        .unwrap();
    write_at(&img, TIB / 4, 100, 9);
    let second = replicate_once(&cfg).await;
    // 48 + 16 zero blocks and one of data, in two runs and a block (a
    // run may be cut where a worker's unit ends: a few frames more).
    assert_eq!(second.blocks_sent, 48 + 16 + 1, "{second:?}");
    assert!(second.frames_sent <= 8, "{second:?}");
    let out2 = root.join("restored-2");
    rcv.restore("huge", "root", second.point, &out2);
    assert_same_sparse(&out2, &img);
    rcv.stop().await;
}
