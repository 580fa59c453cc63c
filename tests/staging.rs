//! Staging failures (issue 14, item 3): a staging image that cannot be
//! written never keeps `serve` from starting nor other servers from
//! replicating; `status` names it with its error and since when, and it is
//! repaired in the background once the fault is gone. A volume larger than
//! the staging filesystem can hold is refused at `Open`, before any data.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use pilotlight::{
    agent_config, assert_same_bytes, file_len, overwrite_random_4k, replicate_once, restore_point,
    run_bin, sample_image, spawn_receiver, wait_until, SmallFs, TestReceiver,
};
use pilotlight_agent::AgentError;
use pilotlight_protocol::frame::ErrorCode;

const MIB: u64 = 1 << 20;

/// `status --json` of the receiver directory `dir`.
fn status_json(dir: &Path) -> serde_json::Value {
    let out = run_bin(
        "pilotlight-receiver",
        &["status", "--json", "--dir", dir.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The staging failures `status --json` lists for `server`.
fn staging_failures(dir: &Path, server: &str) -> Vec<serde_json::Value> {
    let status = status_json(dir);
    let line = status
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["server"] == server)
        .unwrap_or_else(|| panic!("no status line for {server}: {status}"))
        .clone();
    line.get("staging_failures")
        .and_then(|f| f.as_array().cloned())
        .unwrap_or_default()
}

/// Whether the file at `a` holds exactly the bytes of `b`.
fn same_file(a: &Path, b: &Path) -> bool {
    std::fs::read(a).ok() == Some(std::fs::read(b).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_staging_image_never_stops_serve_and_is_repaired_in_the_background() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let rcv = TestReceiver::create(root).await;
    let (web_id, db_id) = (rcv.enroll("web"), rcv.enroll("db"));
    let (web_root, web_data, db_img) = (
        root.join("web-root.img"),
        root.join("web-data.img"),
        root.join("db.img"),
    );
    sample_image(&web_root, 4 * MIB, 1);
    sample_image(&web_data, 2 * MIB, 2);
    sample_image(&db_img, 3 * MIB, 3);
    let web_volumes = [("root", web_root.as_path()), ("data", web_data.as_path())];
    let web_state = root.join("web-state");
    let web = agent_config(rcv.addr, &web_id, &web_state, &web_volumes);
    replicate_once(&web).await;
    rcv.wait_staging("web").await;
    let dir = rcv.dir.clone();
    rcv.stop().await;

    // The fault: a directory where web's staging image of root belongs.
    let staged = dir.join("staging/web/root.img");
    std::fs::remove_file(&staged).unwrap();
    std::fs::create_dir(&staged).unwrap();
    std::fs::write(staged.join("in-the-way"), b"x").unwrap();

    // serve starts; another server replicates and restores.
    let (_serve, addr) = spawn_receiver(&dir);
    let db = agent_config(addr, &db_id, &root.join("db-state"), &[("root", &db_img)]);
    let point = replicate_once(&db).await.point;
    let out = root.join("db-restored.img");
    restore_point(&dir, "db", "root", point, &out);
    assert_same_bytes(&out, &db_img, file_len(&db_img));
    // The failing server itself replicates, and its other volume's image
    // follows.
    overwrite_random_4k(&web_data, 16, 4);
    let web = agent_config(addr, &web_id, &web_state, &web_volumes);
    replicate_once(&web).await;
    let staged_data = dir.join("staging/web/data.img");
    wait_until(
        Duration::from_secs(30),
        "web's data image to follow",
        || same_file(&staged_data, &web_data),
    )
    .await;

    // status names the failing volume, with its error and since when.
    wait_until(
        Duration::from_secs(30),
        "status to list web/root failing",
        || !staging_failures(&dir, "web").is_empty(),
    )
    .await;
    let failures = staging_failures(&dir, "web");
    assert_eq!(failures.len(), 1, "{failures:?}");
    let f = &failures[0];
    assert_eq!(f["volume"], "root", "{f}");
    assert!(
        f["error"].as_str().unwrap().contains("Is a directory"),
        "{f}"
    );
    assert!(f["since"].as_str().unwrap().ends_with('Z'), "{f}");
    assert!(staging_failures(&dir, "db").is_empty());
    let text = run_bin(
        "pilotlight-receiver",
        &["status", "--dir", dir.to_str().unwrap()],
    );
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("staging of web/root failing since "),
        "{text}"
    );

    // The fault goes: the image is repaired in the background, with no
    // new point of web.
    std::fs::remove_dir_all(&staged).unwrap();
    wait_until(
        Duration::from_secs(90),
        "web's root image to be repaired",
        || staging_failures(&dir, "web").is_empty(),
    )
    .await;
    assert!(same_file(&staged, &web_root), "the repaired image differs");
    assert!(same_file(&staged_data, &web_data));
}

/// A tmpfs mounted at `path` (holds a sparse source file of any size);
/// unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path) -> Self {
        std::fs::create_dir_all(path).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
            .arg(path)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount tmpfs at {}", path.display());
        Self(path.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root (loop-mounted ext4, tmpfs)"]
async fn a_volume_the_staging_filesystem_cannot_hold_is_refused_at_open() {
    pilotlight::require_root("a loop-mounted ext4 and a tmpfs");
    pilotlight::require_tools(&["mkfs.ext4", "mount", "umount", "losetup"]);
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    // The receiver directory on ext4 with 4 KiB blocks: files of at most
    // 16 TiB.
    let fs = SmallFs::create(root, 64 * MIB);
    let rcv = TestReceiver::create(&fs.mount).await;
    let identity = rcv.enroll("big");
    // A 17 TiB source volume (sparse, on a tmpfs, which holds any size).
    let src = Tmpfs::mount(&root.join("src"));
    let img = src.0.join("big.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(17 << 40)
        .unwrap();

    let cfg = agent_config(rcv.addr, &identity, &root.join("state"), &[("root", &img)]);
    let err = pilotlight_agent::run(cfg, tokio_util::sync::CancellationToken::new())
        .await
        .unwrap_err();
    match &err {
        AgentError::Remote { code, message } => {
            assert_eq!(*code, ErrorCode::Other, "{message}");
            assert!(
                message.contains("volume root (18691697672192 bytes) is larger than the staging filesystem can hold"),
                "{message}"
            );
        }
        other => panic!("expected the receiver's refusal, got {other}"),
    }
    assert!(!err.is_retryable(), "{err}");

    // Nothing of it was accepted: no volume, no point, no probe file left.
    let store = pilotlight_receiver::store::Store::open(&rcv.dir).unwrap();
    let id = store.catalog().unwrap().require_server("big").unwrap().id;
    assert!(store.catalog().unwrap().volumes(id).unwrap().is_empty());
    assert_eq!(store.catalog().unwrap().latest_point(id).unwrap(), None);
    let left: Vec<_> = std::fs::read_dir(rcv.dir.join("staging/big"))
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
    drop(store);
    rcv.stop().await;
}
