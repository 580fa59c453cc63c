//! Shrink then grow (issue 14, item 8): a point that shrinks a volume ends
//! the rows beyond its new size, so every point restores byte for byte,
//! the grown tail reads as zeros where the source has zeros, and the
//! staging image equals the latest point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use pilotlight::{
    agent_config, assert_same_bytes, copy_bytes, file_len, replicate_once, sample_image,
    TestReceiver,
};

const MIB: u64 = 1 << 20;

/// What happens to the image before a point.
type Step = fn(&Path);

/// Resize `img` to `size` (truncate or extend with zeros, as a grown
/// file or device reads).
fn resize(img: &Path, size: u64) {
    let f = File::options().write(true).open(img).unwrap();
    f.set_len(size).unwrap();
    f.sync_all().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shrink_then_grow_restores_every_point_byte_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let rcv = TestReceiver::create(root).await;
    let identity = rcv.enroll("web");
    let img = root.join("web.img");
    let cfg = agent_config(rcv.addr, &identity, &root.join("state"), &[("root", &img)]);
    // Each step changes the image, then makes a point and keeps a copy of
    // the image as it was at that point.
    let mut copies: Vec<(u64, PathBuf)> = Vec::new();
    let steps: [(&str, Step); 5] = [
        ("full", |p| sample_image(p, 8 * MIB, 11)),
        // Not a multiple of the block size: the short last block is resent.
        ("shrunk", |p| resize(p, 2 * MIB + 1000)),
        // The tail reads zeros on the source: nothing to send for it.
        ("grown", |p| resize(p, 8 * MIB)),
        // Data in part of the grown tail.
        ("written", |p| {
            let f = File::options().write(true).open(p).unwrap();
            f.write_all_at(&[0xa5; 3 * 65536], 5 * MIB).unwrap();
            f.sync_all().unwrap();
        }),
        // Shrink and grow again between two points.
        ("shrunk-grown", |p| {
            resize(p, MIB);
            resize(p, 6 * MIB + 512);
        }),
    ];
    for (name, step) in steps {
        step(&img);
        let point = replicate_once(&cfg).await.point;
        let copy = root.join(format!("at-{name}.img"));
        copy_bytes(&img, &copy, file_len(&img));
        copies.push((point, copy));
    }
    for (point, copy) in &copies {
        let out = root.join(format!("restored-{point}.img"));
        rcv.restore("web", "root", *point, &out);
        assert_eq!(file_len(&out), file_len(copy), "size of point {point}");
        assert_same_bytes(&out, copy, file_len(copy));
    }
    rcv.wait_staging("web").await;
    let staging = rcv.dir.join("staging/web/root.img");
    let (_, last) = copies.last().unwrap();
    assert_eq!(file_len(&staging), file_len(last));
    assert_same_bytes(&staging, last, file_len(last));
    rcv.stop().await;
}
