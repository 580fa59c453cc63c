//! A drill as an operator runs it: an ext4 filesystem replicated as a
//! point, exported by `pilotlight-receiver export`, attached through
//! `nbdfuse` and a read-only loop device, checked by `e2fsck -n` and
//! mounted read-only, its files read back equal (issue 16).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use pilotlight::{
    agent_config, replicate_once, require_root, require_tools, ChildGuard, Deadline, SmallFs,
    TestReceiver,
};

const MIB: u64 = 1 << 20;

fn run(program: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A filesystem mounted at `.0`, unmounted on drop.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A read-only loop device, detached on drop.
struct ReadOnlyLoop(String);

impl ReadOnlyLoop {
    fn attach(file: &Path) -> Self {
        let out = run(
            "losetup",
            &["-r", "--find", "--show", file.to_str().unwrap()],
        );
        Self(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

impl Drop for ReadOnlyLoop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// `nbdfuse` serving an NBD URI as the file `dir/disk`; unmounted (which
/// ends nbdfuse) and the process reaped on drop.
struct Fuse {
    dir: PathBuf,
    _child: ChildGuard,
}

impl Fuse {
    fn attach(dir: &Path, uri: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let pidfile = dir.with_extension("pid");
        let child = Command::new("nbdfuse")
            .arg("-r")
            .arg("-P")
            .arg(&pidfile)
            .arg(dir.join("disk"))
            .arg(uri)
            .spawn()
            .expect("spawn nbdfuse");
        let fuse = Self {
            dir: dir.to_owned(),
            _child: ChildGuard(child),
        };
        let deadline = Deadline::after(Duration::from_secs(20));
        while !pidfile.exists() {
            deadline.next_blocking(|| "nbdfuse did not become ready".into());
        }
        fuse
    }

    fn file(&self) -> PathBuf {
        self.dir.join("disk")
    }
}

impl Drop for Fuse {
    fn drop(&mut self) {
        // Root unmounts a FUSE mount like any other; nbdfuse then exits.
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}

/// Files of several sizes (one spanning many blocks, one tiny, one in a
/// subdirectory): relative path and content.
fn sample_files() -> Vec<(&'static str, Vec<u8>)> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut random = |len: usize| -> Vec<u8> {
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    };
    vec![
        ("big.bin", random(5 * MIB as usize + 1234)),
        (
            "notes.txt",
            b"a drill never changes a stored point\n".repeat(300),
        ),
        ("tiny", b"x".to_vec()),
        ("etc/fstab", b"/dev/vda1 / ext4 defaults 0 1\n".to_vec()),
        ("var/lib/db.dat", random(700_000)),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, nbdfuse, FUSE"]
async fn an_ext4_point_attached_through_nbdfuse_checks_clean_and_mounts_read_only() {
    require_root("loop devices and mounts");
    require_tools(&[
        "nbdfuse",
        "losetup",
        "mkfs.ext4",
        "e2fsck",
        "mount",
        "umount",
    ]);
    assert!(
        Path::new("/dev/fuse").exists(),
        "this test needs FUSE (/dev/fuse is absent: load the fuse module or run where FUSE is available)"
    );
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();

    // An ext4 filesystem (with its journal, as a real root filesystem has)
    // with files, cleanly unmounted: that is the source volume.
    let files = sample_files();
    let fs = SmallFs::create_with(root, 64 * MIB, &["mkfs.ext4", "-q", "-F", "-m", "0"]);
    for (name, data) in &files {
        let path = fs.mount.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, data).unwrap();
    }
    run("umount", &[fs.mount.to_str().unwrap()]);
    drop(fs);
    let img = root.join("smallfs.img");

    let rcv = TestReceiver::create(root).await;
    let identity = rcv.enroll("db1");
    let cfg = agent_config(rcv.addr, &identity, &root.join("state"), &[("root", &img)]);
    let point = replicate_once(&cfg).await.point;

    // Guards drop in reverse order: mount, loop device, FUSE, export.
    let sock = root.join("drill.sock");
    let mut child = Command::new(pilotlight::bin("pilotlight-receiver"))
        .args(["export", "--server", "db1", "--volume", "root", "--point"])
        .arg(point.to_string())
        .arg("--dir")
        .arg(&rcv.dir)
        .arg("--socket")
        .arg(&sock)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn export");
    let stdout = child.stdout.take().unwrap();
    let _export = ChildGuard(child);
    let mut uri = String::new();
    std::io::BufReader::new(stdout).read_line(&mut uri).unwrap();
    let uri = uri.trim().to_owned();
    assert!(uri.starts_with("nbd+unix://"), "export printed {uri:?}");

    let fuse = Fuse::attach(&root.join("fuse"), &uri);
    assert_eq!(
        std::fs::metadata(fuse.file()).unwrap().len(),
        64 * MIB,
        "the FUSE file has the volume's size"
    );
    let dev = ReadOnlyLoop::attach(&fuse.file());
    let fsck = run("e2fsck", &["-n", "-f", &dev.0]);
    assert!(fsck.status.success());

    let mnt = root.join("restored-mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    run("mount", &["-o", "ro", &dev.0, mnt.to_str().unwrap()]);
    let mounted = Mounted(mnt.clone());
    for (name, data) in &files {
        let back = std::fs::read(mnt.join(name)).unwrap();
        assert!(
            back == *data,
            "{name} reads back different through the export ({} bytes, want {})",
            back.len(),
            data.len()
        );
    }
    drop(mounted);
    drop(dev);
    drop(fuse);
    rcv.stop().await;
}
