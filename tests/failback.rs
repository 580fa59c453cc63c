//! Fail back by delta (issue 17), through the real binaries over TLS on
//! 127.0.0.1: `pilotlight-agent restore` fetches only the blocks that
//! differ, byte-exact to a file and to a loop device; an interrupted restore
//! run again fetches only what still differs; restore grants are enforced
//! both ways; a damaged stored block fails the restore, naming it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use pilotlight::{
    assert_same_bytes, bin, overwrite_random_4k, run_bin, sample_image, spawn_receiver, ChildGuard,
    Deadline,
};
use rand::{RngCore, SeedableRng};

const BS: u64 = 65536;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A receiver binary serving a fresh directory, and the servers enrolled.
struct Site {
    root: PathBuf,
    dir: PathBuf,
    addr: std::net::SocketAddr,
    _rcv: ChildGuard,
}

impl Site {
    fn new(root: &Path) -> Self {
        let dir = root.join("rcv");
        assert!(run_bin("pilotlight-receiver", &["init", "--dir", s(&dir)])
            .status
            .success());
        let (rcv, addr) = spawn_receiver(&dir);
        Self {
            root: root.to_owned(),
            dir,
            addr,
            _rcv: rcv,
        }
    }

    fn enroll(&self, server: &str) -> PathBuf {
        let out = self.root.join(format!("{server}.pem"));
        let r = run_bin(
            "pilotlight-receiver",
            &[
                "enroll",
                "--dir",
                s(&self.dir),
                "--server",
                server,
                "--out",
                s(&out),
            ],
        );
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        out
    }

    /// One point of `img` as volume `root`, by `pilotlight-agent run --once`.
    fn replicate(&self, id: &Path, img: &Path) -> u64 {
        let state = self.root.join(format!(
            "state-{}",
            id.file_stem().unwrap().to_string_lossy()
        ));
        let out = run_bin(
            "pilotlight-agent",
            &[
                "run",
                "--receiver",
                &self.addr.to_string(),
                "--identity",
                s(id),
                "--state",
                s(&state),
                "--volume",
                &format!("root={}", s(img)),
                "--once",
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }

    fn restore_args<'a>(&'a self, addr: &'a str, id: &'a Path, to: &'a Path) -> Vec<&'a str> {
        vec![
            "restore",
            "--receiver",
            addr,
            "--identity",
            s(id),
            "--volume",
            "root",
            "--to",
            s(to),
            "--json",
        ]
    }

    /// `pilotlight-agent restore ... --json` with `extra` flags.
    fn restore(&self, id: &Path, to: &Path, extra: &[&str]) -> Output {
        let addr = self.addr.to_string();
        let mut args = self.restore_args(&addr, id, to);
        args.extend_from_slice(extra);
        run_bin("pilotlight-agent", &args)
    }

    fn grant(&self, args: &[&str]) -> Output {
        let mut all = vec!["grant", "--dir", s(&self.dir)];
        all.extend_from_slice(args);
        run_bin("pilotlight-receiver", &all)
    }
}

/// The report of a restore that succeeded.
fn report(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "restore failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["complete"], true, "{v}");
    v
}

/// The stderr of a command that failed.
fn refused(out: &Output) -> String {
    assert!(!out.status.success(), "it succeeded");
    assert!(out.stdout.is_empty(), "a failed restore printed a report");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The 64 KiB blocks in which `a` and `b` (both `len` bytes) differ.
fn differing_blocks(a: &Path, b: &Path, len: u64) -> u64 {
    let (fa, fb) = (
        std::fs::File::open(a).unwrap(),
        std::fs::File::open(b).unwrap(),
    );
    let (mut ba, mut bb) = (vec![0u8; BS as usize], vec![0u8; BS as usize]);
    (0..len.div_ceil(BS))
        .filter(|i| {
            let n = (len - i * BS).min(BS) as usize;
            fa.read_exact_at(&mut ba[..n], i * BS).unwrap();
            fb.read_exact_at(&mut bb[..n], i * BS).unwrap();
            ba[..n] != bb[..n]
        })
        .count() as u64
}

fn random_image(path: &Path, size: u64, seed: u64) {
    let mut data = vec![0u8; size as usize];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    std::fs::write(path, data).unwrap();
}

#[test]
fn a_restore_to_a_file_is_byte_exact_and_then_fetches_only_what_differs() {
    let tmp = tempfile::tempdir().unwrap();
    let site = Site::new(tmp.path());
    let id = site.enroll("web1");
    let img = tmp.path().join("web1.img");
    let size = 8 << 20;
    sample_image(&img, size, 17);
    let point = site.replicate(&id, &img);

    // A target that does not exist: created, and every block that is not
    // zeros (a new file reads as zeros) is fetched.
    let out = tmp.path().join("out.img");
    let first = report(&site.restore(&id, &out, &["--latest"]));
    assert_same_bytes(&out, &img, size);
    assert_eq!(std::fs::metadata(&out).unwrap().len(), size);
    assert_eq!(first["point"], point);
    assert_eq!(first["blocks_compared"], size / BS);
    let nonzero = {
        let zeros = tmp.path().join("zeros.img");
        std::fs::File::create(&zeros)
            .unwrap()
            .set_len(size)
            .unwrap();
        differing_blocks(&img, &zeros, size)
    };
    assert_eq!(first["blocks_fetched"], nonzero);

    // A few 4 KiB writes: only their blocks come back.
    let offsets = overwrite_random_4k(&out, 6, 99);
    let changed = differing_blocks(&img, &out, size);
    assert!(changed > 0 && changed <= offsets.len() as u64);
    let p = point.to_string();
    let second = report(&site.restore(&id, &out, &["--point", &p]));
    assert_same_bytes(&out, &img, size);
    assert_eq!(second["blocks_fetched"], changed, "{second}");
    // The wire carried the hash list (32 bytes a block), the changed
    // blocks and little else.
    let wire = second["wire_bytes"].as_u64().unwrap();
    assert!(
        wire < changed * BS + (size / BS) * 32 + (64 << 10),
        "{wire} bytes on the wire for {changed} blocks"
    );

    // Nothing differs: nothing is fetched.
    let third = report(&site.restore(&id, &out, &["--latest"]));
    assert_eq!(third["blocks_fetched"], 0, "{third}");
}

/// A target that differs entirely (a replaced disk) is not read in full
/// only to be overwritten: after a stretch of runs in which every block
/// differed, runs are judged by a sample and fetched unread. The restore is
/// still byte-exact, and the report says how many blocks were not read.
#[test]
fn a_target_that_differs_entirely_is_fetched_mostly_unread_and_byte_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let site = Site::new(tmp.path());
    let id = site.enroll("replaced");
    let img = tmp.path().join("replaced.img");
    let size: u64 = 48 << 20; // twelve 4 MiB runs of the compare
    random_image(&img, size, 5);
    site.replicate(&id, &img);
    let out = tmp.path().join("other.img");
    random_image(&out, size, 6);

    let r = report(&site.restore(&id, &out, &["--latest"]));
    assert_same_bytes(&out, &img, size);
    let (compared, unread) = (
        r["blocks_compared"].as_u64().unwrap(),
        r["blocks_unread"].as_u64().unwrap(),
    );
    assert_eq!(r["blocks_fetched"], size / BS, "{r}");
    assert_eq!(compared + unread, size / BS, "{r}");
    assert!(unread > 0, "every block was read: {r}");

    // The same target again: it matches now, so it is compared in full and
    // nothing is fetched or left unread.
    let again = report(&site.restore(&id, &out, &["--latest"]));
    assert_eq!(again["blocks_fetched"], 0, "{again}");
    assert_eq!(again["blocks_unread"], 0, "{again}");
}

/// The hash listing goes packed (repeats coded short: a volume mostly of
/// zeros lists in a few bytes, not 32 a block), and `--read-back` checks
/// what was written once more after the sync.
#[test]
fn the_listing_of_a_sparse_volume_is_small_and_read_back_checks_the_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let site = Site::new(tmp.path());
    let id = site.enroll("sparse");
    let img = tmp.path().join("sparse.img");
    let size: u64 = 256 << 20; // 4096 blocks: a plain listing is 128 KiB
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(size).unwrap();
    f.write_all_at(&[7u8; 70_000], 5 * BS).unwrap();
    drop(f);
    site.replicate(&id, &img);

    let out = tmp.path().join("out.img");
    std::fs::copy(&img, &out).unwrap();
    let same = report(&site.restore(&id, &out, &["--latest"]));
    assert_eq!(same["blocks_fetched"], 0, "{same}");
    let wire = same["wire_bytes"].as_u64().unwrap();
    assert!(
        wire < (size / BS) * 32 / 4,
        "{wire} bytes on the wire to compare {} blocks",
        size / BS
    );

    std::fs::File::options()
        .write(true)
        .open(&out)
        .unwrap()
        .write_all_at(&[9u8; 4096], 6 * BS)
        .unwrap();
    let checked = report(&site.restore(&id, &out, &["--latest", "--read-back"]));
    assert_eq!(checked["blocks_fetched"], 1, "{checked}");
    assert_same_bytes(&out, &img, size);
}

#[test]
fn an_interrupted_restore_run_again_fetches_only_what_still_differs() {
    let tmp = tempfile::tempdir().unwrap();
    let site = Site::new(tmp.path());
    let id = site.enroll("web1");
    let img = tmp.path().join("web1.img");
    let size: u64 = 16 << 20;
    random_image(&img, size, 5);
    site.replicate(&id, &img);

    // At 8 Mbit/s the 16 MiB take some 16 s: killed (SIGKILL) once about
    // 2 MiB are in the target.
    let out = tmp.path().join("out.img");
    let addr = site.addr.to_string();
    let mut args = site.restore_args(&addr, &id, &out);
    args.extend_from_slice(&["--latest", "--limit-mbps", "8"]);
    let mut child = ChildGuard(
        Command::new(bin("pilotlight-agent"))
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Deadline::after(Duration::from_secs(60));
    while std::fs::metadata(&out).map_or(0, |m| m.blocks() * 512) < 2 << 20 {
        deadline.next_blocking(|| "the restore wrote nothing".into());
    }
    child.0.kill().unwrap();
    child.0.wait().unwrap();

    let left = differing_blocks(&img, &out, size);
    assert!(
        left > 0 && left < size / BS,
        "{left} blocks left: the kill came too late or too early"
    );
    let again = report(&site.restore(&id, &out, &["--latest"]));
    assert_eq!(again["blocks_fetched"], left, "{again}");
    assert_same_bytes(&out, &img, size);
}

#[test]
fn restore_grants_are_enforced_both_ways() {
    let tmp = tempfile::tempdir().unwrap();
    let site = Site::new(tmp.path());
    let web1 = site.enroll("web1");
    let rec = site.enroll("web1-recovery");
    let img = tmp.path().join("web1.img");
    sample_image(&img, 2 << 20, 3);
    site.replicate(&web1, &img);
    // The recovery server ran meanwhile, and changed.
    let rec_img = tmp.path().join("rec.img");
    sample_image(&rec_img, 2 << 20, 4);
    site.replicate(&rec, &rec_img);

    let out = tmp.path().join("back.img");
    let from_rec = ["--server", "web1-recovery", "--latest"];
    let sentence = "server web1 may not restore the volumes of server web1-recovery";
    let err = refused(&site.restore(&web1, &out, &from_rec));
    assert!(err.contains(sentence), "{err}");

    let g = site.grant(&["--server", "web1", "--restore-from", "web1-recovery"]);
    assert!(g.status.success(), "{}", String::from_utf8_lossy(&g.stderr));
    let list = site.grant(&["--list"]);
    assert!(
        String::from_utf8_lossy(&list.stdout)
            .contains("web1 may restore the volumes of web1-recovery"),
        "{list:?}"
    );
    report(&site.restore(&web1, &out, &from_rec));
    assert_same_bytes(&out, &rec_img, 2 << 20);

    // The grant is one way: the recovery server may not take web1's.
    let other = tmp.path().join("other.img");
    let err = refused(&site.restore(&rec, &other, &["--server", "web1", "--latest"]));
    assert!(
        err.contains("server web1-recovery may not restore the volumes of server web1"),
        "{err}"
    );

    let g = site.grant(&[
        "--server",
        "web1",
        "--restore-from",
        "web1-recovery",
        "--revoke",
    ]);
    assert!(g.status.success());
    let err = refused(&site.restore(&web1, &out, &from_rec));
    assert!(err.contains(sentence), "{err}");
    // Its own volumes need no grant.
    report(&site.restore(&web1, &out, &["--latest"]));
    assert_same_bytes(&out, &img, 2 << 20);
}

#[test]
fn a_damaged_stored_block_fails_the_restore_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let site = Site::new(tmp.path());
    let id = site.enroll("dmg");
    let img = tmp.path().join("dmg.img");
    sample_image(&img, 4 << 20, 45);
    site.replicate(&id, &img);

    // Flip a byte in the middle of a stored block, as verify's test does.
    let store = pilotlight_receiver::store::Store::open(&site.dir).unwrap();
    let sel = pilotlight_receiver::restore::PointSel::Latest;
    let point = pilotlight_receiver::restore::resolve_point(&store, "dmg", sel).unwrap();
    let vol = point.volumes[0].clone();
    let blocks = pilotlight_receiver::restore::point_blocks(&store, &vol, point.key).unwrap();
    let (index, (_, loc)) = blocks.iter().find_map(|(i, e)| e.map(|e| (*i, e))).unwrap();
    drop(store);
    let pack = pilotlight_receiver::store::pack_file(&site.dir, loc.pack);
    let f = std::fs::File::options()
        .read(true)
        .write(true)
        .open(&pack)
        .unwrap();
    let at = loc.offset + 48 + u64::from(loc.stored_len) / 2;
    let mut byte = [0u8];
    f.read_exact_at(&mut byte, at).unwrap();
    f.write_all_at(&[byte[0] ^ 0x40], at).unwrap();

    let out = tmp.path().join("out.img");
    let err = refused(&site.restore(&id, &out, &["--latest"]));
    assert!(
        err.contains(&format!("block {index} of volume root")),
        "{err}"
    );
}

#[test]
#[ignore = "needs root (loop devices, mkfs.ext4, mount)"]
fn a_restore_to_a_loop_device_is_byte_exact() {
    pilotlight::require_root("loop devices");
    pilotlight::require_tools(&["losetup"]);
    let tmp = tempfile::tempdir().unwrap();
    let site = Site::new(tmp.path());
    let id = site.enroll("web1");
    let img = tmp.path().join("web1.img");
    let size = 8 << 20;
    sample_image(&img, size, 8);
    site.replicate(&id, &img);
    // A device larger than the volume, full of other data.
    let backing = tmp.path().join("disk.img");
    random_image(&backing, size + (1 << 20), 9);
    let dev = pilotlight::LoopDevice::attach(&backing);
    let first = report(&site.restore(&id, &dev.path, &["--latest"]));
    assert_same_bytes(&dev.path, &img, size);
    assert_eq!(first["blocks_fetched"], size / BS, "every block differed");
    let again = report(&site.restore(&id, &dev.path, &["--latest"]));
    assert_eq!(again["blocks_fetched"], 0);
    // A device smaller than the volume is refused.
    let small = tmp.path().join("small.img");
    random_image(&small, size / 2, 10);
    let small = pilotlight::LoopDevice::attach(&small);
    let err = refused(&site.restore(&id, &small.path, &["--latest"]));
    assert!(err.contains("less than the volume"), "{err}");
    // A mounted device is refused (the kernel refuses it exclusively).
    pilotlight::require_tools(&["mkfs.ext4", "mount"]);
    let fs = pilotlight::SmallFs::create(tmp.path(), size * 2);
    let err = refused(&site.restore(&id, fs.device(), &["--latest"]));
    assert!(err.contains("is mounted or in use"), "{err}");
}

/// The runbook's last step: web1's disk, failed back from web1-recovery by
/// delta while web1's agent was stopped, replicates again as web1 with
/// only the blocks the restore changed (a checksum against web1's own last
/// point), not the whole disk.
#[test]
fn after_failing_back_replication_sends_only_what_the_restore_changed() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let site = Site::new(root);
    let web1 = site.enroll("web1");
    let rec = site.enroll("web1-recovery");
    let img = root.join("web1.img");
    let size = 4 << 20;
    sample_image(&img, size, 21);
    let config = root.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "receiver = \"{}\"\nidentity = \"{}\"\nstate = \"{}\"\n[volumes]\nroot = \"{}\"\n",
            site.addr,
            s(&web1),
            s(&root.join("web1-state")),
            s(&img)
        ),
    )
    .unwrap();
    let run_once = || {
        let out = run_bin(
            "pilotlight-agent",
            &["run", "--config", s(&config), "--once"],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run_once();

    // Failed over: the recovery server ran from web1's data and changed it.
    let rec_img = root.join("rec.img");
    std::fs::copy(&img, &rec_img).unwrap();
    overwrite_random_4k(&rec_img, 8, 7);
    site.replicate(&rec, &rec_img);
    let changed = differing_blocks(&img, &rec_img, size);
    assert!(changed > 0);

    // Fail back by delta onto web1's own disk (its agent is stopped).
    assert!(site
        .grant(&["--server", "web1", "--restore-from", "web1-recovery"])
        .status
        .success());
    let out = run_bin(
        "pilotlight-agent",
        &[
            "restore",
            "--config",
            s(&config),
            "--server",
            "web1-recovery",
            "--volume",
            "root",
            "--latest",
            "--to",
            s(&img),
            "--json",
        ],
    );
    assert_eq!(report(&out)["blocks_fetched"], changed);
    assert_same_bytes(&img, &rec_img, size);

    // Normal replication resumes: the next point carries those blocks only.
    run_once();
    let points = run_bin(
        "pilotlight-receiver",
        &[
            "points",
            "--dir",
            s(&site.dir),
            "--server",
            "web1",
            "--json",
        ],
    );
    let v: serde_json::Value = serde_json::from_slice(&points.stdout).unwrap();
    let last = v.as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["id"], 2, "{v}");
    assert_eq!(
        last["volumes"][0]["changed_bytes"],
        changed * BS,
        "the point after the fail back resent more than the restore changed: {v}"
    );
    let back = root.join("back.img");
    pilotlight::restore_point(&site.dir, "web1", "root", 2, &back);
    assert_same_bytes(&back, &rec_img, size);
}
