//! The agent's hash files after a crash: records that `state.bin` does not
//! name are never trusted. An agent that dies between writing a point's
//! records and naming the point in `state.bin` resyncs by checksum on its
//! next start, and every point restores byte for byte.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::path::Path;

use pilotlight::{
    agent_config, assert_same_bytes, file_len, overwrite_random_4k, replicate_once, sample_image,
    TestReceiver,
};
use pilotlight_agent::hashfile::file_name;
use pilotlight_agent::state::{StateHeader, STATE_FILE};

const MIB: u64 = 1 << 20;

/// Copy the state directory's files (`state.bin` and the hash file of `root`).
fn snapshot(state: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for name in [STATE_FILE.to_owned(), file_name("root")] {
        std::fs::copy(state.join(&name), to.join(&name)).unwrap();
    }
}

/// `old` with the first half of the records in which `new` differs from it:
/// a point's records half written.
fn half_written(old: &[u8], new: &[u8]) -> Vec<u8> {
    let mut out = old.to_vec();
    let differ: Vec<usize> = (0..old.len() / 32)
        .filter(|&i| old[i * 32..][..32] != new[i * 32..][..32])
        .collect();
    assert!(differ.len() >= 2, "the second point changed blocks");
    for &i in &differ[..differ.len() / 2] {
        out[i * 32..][..32].copy_from_slice(&new[i * 32..][..32]);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_the_records_and_state_bin_resyncs_and_restores_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let rcv = TestReceiver::create(root).await;
    let identity = rcv.enroll("s1");
    let img = root.join("s1.img");
    sample_image(&img, 16 * MIB, 7);
    let state = root.join("state");
    let cfg = agent_config(rcv.addr, &identity, &state, &[("root", &img)]);
    let p1 = replicate_once(&cfg).await;
    let copy1 = root.join("copy1");
    std::fs::copy(&img, &copy1).unwrap();
    let s1 = root.join("s1");
    snapshot(&state, &s1);

    overwrite_random_4k(&img, 40, 3);
    let p2 = replicate_once(&cfg).await;
    let copy2 = root.join("copy2");
    std::fs::copy(&img, &copy2).unwrap();
    let hashes = state.join(file_name("root"));

    // 1. As the brief's crash would leave it: state.bin still names point 1,
    // the hash file holds half of point 2's records. The receiver's last
    // point is 2: the agent does not trust the file.
    std::fs::copy(s1.join(STATE_FILE), state.join(STATE_FILE)).unwrap();
    let old = std::fs::read(s1.join(file_name("root"))).unwrap();
    let new = std::fs::read(&hashes).unwrap();
    std::fs::write(&hashes, half_written(&old, &new)).unwrap();
    assert_eq!(
        StateHeader::load(&state).unwrap().unwrap().last_point,
        p1.point
    );
    // Every block goes back to what it was at point 1: a block whose record
    // still says point 1 matches the disk, though the receiver holds point
    // 2's. Trusted, it would not be sent.
    std::fs::copy(&copy1, &img).unwrap();
    let p3 = replicate_once(&cfg).await;
    assert!(
        p3.wire_bytes < 16 * MIB / 4,
        "a checksum resync sends what differs, not the volume: {} bytes",
        p3.wire_bytes
    );
    let copy3 = root.join("copy3");
    std::fs::copy(&img, &copy3).unwrap();

    // 2. As this agent leaves it: state.bin withdrawn (no point) before the
    // first record changes, and records that are garbage.
    let mut header = StateHeader::load(&state).unwrap().unwrap();
    assert_eq!(header.last_point, p3.point);
    header.last_point = 0;
    header.save(&state).unwrap();
    let garbage: Vec<u8> = (0..file_len(&hashes)).map(|i| (i * 7 + 1) as u8).collect();
    std::fs::write(&hashes, garbage).unwrap();
    overwrite_random_4k(&img, 40, 5);
    let p4 = replicate_once(&cfg).await;

    for (point, copy) in [
        (p1.point, &copy1),
        (p2.point, &copy2),
        (p3.point, &copy3),
        (p4.point, &img),
    ] {
        let out = root.join(format!("out{point}"));
        rcv.restore("s1", "root", point, &out);
        assert_same_bytes(&out, copy, file_len(copy));
    }
    // And the state now names point 4 again, with the hashes it holds: a
    // next cycle with nothing changed sends nothing.
    assert_eq!(
        StateHeader::load(&state).unwrap().unwrap().last_point,
        p4.point
    );
    let p5 = replicate_once(&cfg).await;
    assert_eq!(p5.blocks_sent, 0);
    rcv.stop().await;
}
