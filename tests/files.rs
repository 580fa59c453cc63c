//! File safety (issue 14, items 7 and 9): a restore never writes through a
//! planted symbolic link nor onto a mounted device, the receiver's files are
//! its own whatever the umask, and the agent refuses a state directory or
//! identity another user could change.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use pilotlight::{
    agent_config, assert_same_bytes, bin, file_len, replicate_once, sample_image, wait_until,
    ChildGuard, LoopDevice, SmallFs, TestReceiver,
};
use pilotlight_agent::error::Exposure;
use pilotlight_agent::AgentError;
use pilotlight_receiver::restore::{restore, PointSel, RestoreRequest};
use pilotlight_receiver::ReceiveError;

const MIB: u64 = 1 << 20;

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

fn request(server: &str, point: u64, to: &Path, force: bool) -> RestoreRequest {
    RestoreRequest {
        server: server.into(),
        volume: "root".into(),
        point: PointSel::Id(point as i64),
        to: to.to_owned(),
        force,
        progress: false,
    }
}

/// A receiver with one point of a volume of `size` bytes; returns the
/// receiver, the point and a copy of the volume at it.
async fn one_point(root: &Path, size: u64) -> (TestReceiver, u64, PathBuf) {
    let rcv = TestReceiver::create(root).await;
    let identity = rcv.enroll("web");
    let img = root.join("web.img");
    sample_image(&img, size, 7);
    let cfg = agent_config(rcv.addr, &identity, &root.join("state"), &[("root", &img)]);
    let point = replicate_once(&cfg).await.point;
    (rcv, point, img)
}

/// A symbolic link planted at the name the partial file used to have, or at
/// the target itself, is never written through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_never_writes_through_a_planted_symlink() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (rcv, point, img) = one_point(root, 4 * MIB).await;
    let victim = root.join("victim");
    std::fs::write(&victim, b"precious").unwrap();

    // At the partial file's old, predictable name.
    let out = root.join("out.img");
    std::os::unix::fs::symlink(&victim, root.join(".out.img.pilotlight-partial")).unwrap();
    restore(&rcv.dir, &request("web", point, &out, false)).unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert_same_bytes(&out, &img, file_len(&img));
    assert_eq!(mode(&out), 0o600);

    // At the target: refused, with --force too.
    let linked = root.join("linked.img");
    std::os::unix::fs::symlink(&victim, &linked).unwrap();
    for force in [false, true] {
        let err = restore(&rcv.dir, &request("web", point, &linked, force)).unwrap_err();
        assert!(matches!(err, ReceiveError::Refused(_)), "{err}");
    }
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert!(std::fs::read_link(&linked).is_ok());
    // No partial file is left behind.
    let partial = std::fs::read_dir(root)
        .unwrap()
        .filter_map(Result::ok)
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .contains("pilotlight-partial-")
        });
    assert!(!partial, "a partial file was left behind");
    rcv.stop().await;
}

/// `sh -c 'umask 0; exec BIN ARGS'`.
fn umask0(name: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("umask 0; exec \"$@\"")
        .arg("sh")
        .arg(bin(name))
        .args(args)
        .env("RUST_LOG", "warn");
    cmd
}

fn run_ok(mut cmd: Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every directory and file under `dir` with its mode. The receiver is
/// running: a file it renames or removes between the listing and the look
/// at it (a staging image's temporary, say) is left out; the files the
/// test requires are checked by name afterwards.
fn walk(dir: &Path, out: &mut Vec<(PathBuf, u32)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let m = match std::fs::symlink_metadata(&path) {
            Ok(meta) => meta.permissions().mode() & 0o7777,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => panic!("{}: {e}", path.display()),
        };
        out.push((path.clone(), m));
        if path.is_dir() {
            walk(&path, out);
        }
    }
}

/// Under umask 000 the receiver's directory and folders are 0700 and its
/// packs, staging images, lock and catalog (with `-wal` and `-shm`) 0600;
/// only the certificates and `receiver.toml`, which hold no secret, are
/// readable by others. A restored file is 0600.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_the_receiver_creates_are_private_under_umask_0() {
    use std::io::BufRead;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let dir = root.join("rcv");
    let d = dir.to_str().unwrap();
    let id = root.join("web.pem");
    run_ok(umask0("pilotlight-receiver", &["init", "--dir", d]));
    run_ok(umask0(
        "pilotlight-receiver",
        &[
            "enroll",
            "--dir",
            d,
            "--server",
            "web",
            "--out",
            id.to_str().unwrap(),
        ],
    ));
    let mut child = umask0(
        "pilotlight-receiver",
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--print-addr",
            "--dir",
            d,
        ],
    )
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let stdout = child.stdout.take().unwrap();
    let serve = ChildGuard(child);
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .unwrap();
    let addr = line.trim().parse().unwrap();

    let img = root.join("web.img");
    sample_image(&img, 4 * MIB, 3);
    let cfg = agent_config(addr, &id, &root.join("state"), &[("root", &img)]);
    let point = replicate_once(&cfg).await.point;
    let staged = dir.join("staging/web/root.img");
    wait_until(Duration::from_secs(60), "the staging image", || {
        staged.exists()
    })
    .await;

    let mut seen = vec![(dir.clone(), mode(&dir))];
    walk(&dir, &mut seen);
    drop(serve);
    let public = ["ca.pem", "server.pem", "receiver.toml"];
    for (path, m) in &seen {
        let name = path.file_name().unwrap().to_string_lossy();
        if path.is_dir() {
            assert_eq!(*m, 0o700, "{}", path.display());
        } else if public.contains(&name.as_ref()) {
            assert_eq!(m & 0o022, 0, "{}", path.display());
        } else {
            assert_eq!(*m, 0o600, "{} is {m:o}", path.display());
        }
    }
    let names: Vec<String> = seen
        .iter()
        .map(|(p, _)| p.strip_prefix(&dir).unwrap().display().to_string())
        .collect();
    for want in [
        "packs",
        "staging/web",
        "staging/web/root.img",
        "catalog.db",
        "catalog.db-wal",
        "serve.lock",
        "ca.key",
    ] {
        assert!(names.iter().any(|n| n == want), "no {want} in {names:?}");
    }
    assert!(names.iter().any(|n| n.starts_with("packs/") && n.len() > 6));

    let out = root.join("out.img");
    let p = point.to_string();
    run_ok(umask0(
        "pilotlight-receiver",
        &[
            "restore",
            "--dir",
            d,
            "--server",
            "web",
            "--volume",
            "root",
            "--point",
            &p,
            "--to",
            out.to_str().unwrap(),
        ],
    ));
    assert_eq!(mode(&out), 0o600);
    assert_same_bytes(&out, &img, file_len(&img));
}

/// `--force` onto a mounted filesystem's device is refused, in one
/// sentence; through a link to an unmounted device the restore goes ahead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: loop devices"]
async fn a_restore_onto_a_mounted_device_is_refused() {
    pilotlight::require_root("loop devices");
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (rcv, point, img) = one_point(root, 4 * MIB).await;
    let fs = SmallFs::create(root, 16 * MIB);
    std::fs::write(fs.mount.join("kept"), b"still here").unwrap();
    let err = restore(&rcv.dir, &request("web", point, fs.device(), true)).unwrap_err();
    assert!(matches!(err, ReceiveError::Refused(_)), "{err}");
    assert!(err.to_string().contains("is in use (mounted?)"), "{err}");
    assert_eq!(std::fs::read(fs.mount.join("kept")).unwrap(), b"still here");
    drop(fs);

    let backing = root.join("dst.backing");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(8 * MIB)
        .unwrap();
    let dev = LoopDevice::attach(&backing);
    let link = root.join("by-id-disk");
    std::os::unix::fs::symlink(&dev.path, &link).unwrap();
    restore(&rcv.dir, &request("web", point, &link, true)).unwrap();
    assert_same_bytes(&dev.path, &img, file_len(&img));
    assert!(std::fs::read_link(&link).is_ok(), "the link stays a link");
    rcv.stop().await;
}

/// A configuration whose identity and state directory exist and are the
/// agent's, against a receiver that is never reached.
fn agent_files(root: &Path) -> pilotlight_agent::AgentConfig {
    let dir = root.join("rcv");
    pilotlight_receiver::admin::init(&dir, Some("127.0.0.1:0")).unwrap();
    let id = root.join("web.pem");
    pilotlight_receiver::admin::enroll(&dir, "web", &id).unwrap();
    let img = root.join("web.img");
    sample_image(&img, MIB, 1);
    let state = root.join("state");
    std::fs::create_dir_all(&state).unwrap();
    agent_config(
        "127.0.0.1:9".parse().unwrap(),
        &id,
        &state,
        &[("root", &img)],
    )
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

async fn run_err(cfg: &pilotlight_agent::AgentConfig) -> AgentError {
    pilotlight_agent::run(cfg.clone(), tokio_util::sync::CancellationToken::new())
        .await
        .unwrap_err()
}

/// The agent refuses a state directory or identity file that others can
/// write, naming the path and the fix, before it connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_refuses_a_state_directory_or_identity_others_can_write() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = agent_files(tmp.path());
    chmod(&cfg.state_dir, 0o777);
    let err = run_err(&cfg).await;
    assert!(
        matches!(
            err,
            AgentError::Unprotected {
                what: "state directory",
                problem: Exposure::Writable { mode: 0o777 },
                ..
            }
        ),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains(cfg.state_dir.to_str().unwrap()) && text.contains("chmod go-w"),
        "{text}"
    );
    chmod(&cfg.state_dir, 0o700);

    chmod(&cfg.identity, 0o666);
    let err = run_err(&cfg).await;
    assert!(
        matches!(
            err,
            AgentError::Unprotected {
                what: "identity file",
                problem: Exposure::Writable { .. },
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains(cfg.identity.to_str().unwrap()),
        "{err}"
    );
    assert!(!err.is_retryable());
}

/// An identity or state directory owned by another user is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: chown"]
async fn the_agent_refuses_files_of_another_user() {
    pilotlight::require_root("chown");
    let tmp = tempfile::tempdir().unwrap();
    let cfg = agent_files(tmp.path());
    let nobody = Some(65534);
    std::os::unix::fs::chown(&cfg.identity, nobody, None).unwrap();
    let err = run_err(&cfg).await;
    assert!(
        matches!(
            err,
            AgentError::Unprotected {
                what: "identity file",
                problem: Exposure::Owner { owner: 65534, .. },
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("chown"), "{err}");
    std::os::unix::fs::chown(&cfg.identity, Some(0), None).unwrap();
    std::os::unix::fs::chown(&cfg.state_dir, nobody, None).unwrap();
    let err = run_err(&cfg).await;
    assert!(
        matches!(
            err,
            AgentError::Unprotected {
                what: "state directory",
                problem: Exposure::Owner { .. },
                ..
            }
        ),
        "{err}"
    );
}
