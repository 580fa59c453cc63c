//! NBD over TLS: an export with `--tls` answers only after `STARTTLS`, and
//! only to an operator identity of this receiver (`enroll --operator`):
//! `nbdinfo`/`nbdcopy` with that identity read the point as `restore`
//! writes it; plain NBD, and a source server's identity, are refused.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};

use pilotlight::{
    agent_config, assert_same_bytes, bin, file_len, replicate_once, require_tools, sample_image,
    ChildGuard, TestReceiver,
};

/// `pilotlight-receiver export --tls` of `server`/root at `point`; returns
/// the process and its `nbds://` URI.
fn export_tls(dir: &Path, server: &str, point: u64) -> (ChildGuard, String) {
    let mut child = Command::new(bin("pilotlight-receiver"))
        .args(["export", "--server", server, "--volume", "root", "--point"])
        .arg(point.to_string())
        .args(["--listen", "127.0.0.1:0", "--tls", "--dir"])
        .arg(dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn export");
    let stdout = child.stdout.take().unwrap();
    let guard = ChildGuard(child);
    let mut uri = String::new();
    std::io::BufReader::new(stdout).read_line(&mut uri).unwrap();
    let uri = uri.trim().to_owned();
    assert!(
        uri.starts_with("nbds://127.0.0.1:"),
        "export printed {uri:?}"
    );
    (guard, uri)
}

/// Split an agent's identity bundle (cert, CA, key) into the layout libnbd
/// reads, to show that a source server's identity gets nothing.
fn agent_as_nbd_dir(bundle: &Path, out: &Path) {
    let text = std::fs::read_to_string(bundle).unwrap();
    let end = "-----END CERTIFICATE-----";
    let mut certs = text.split_inclusive(end);
    let cert = certs.next().unwrap().trim_start();
    let ca = certs.next().unwrap().trim_start();
    let key_at = text.find("-----BEGIN PRIVATE KEY-----").unwrap();
    std::fs::create_dir_all(out).unwrap();
    std::fs::write(out.join("client-cert.pem"), format!("{cert}\n")).unwrap();
    std::fs::write(out.join("ca-cert.pem"), format!("{ca}\n")).unwrap();
    std::fs::write(out.join("client-key.pem"), &text[key_at..]).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nbdinfo, nbdcopy"]
async fn an_operator_reads_a_point_over_tls_and_nobody_else_does() {
    require_tools(&["nbdinfo", "nbdcopy"]);
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let rcv = TestReceiver::create(root).await;
    let agent_id = rcv.enroll("db1");
    let src = root.join("root.img");
    sample_image(&src, 4 << 20, 11);
    let cfg = agent_config(rcv.addr, &agent_id, &root.join("state"), &[("root", &src)]);
    let point = replicate_once(&cfg).await.point;

    let bundle = root.join("alice.pem");
    let certs = pilotlight_receiver::admin::enroll_operator(&rcv.dir, "alice", &bundle).unwrap();
    for f in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
        assert!(certs.join(f).exists(), "{f}");
    }
    let (export, uri) = export_tls(&rcv.dir, "db1", point);
    let with = |dir: &Path| format!("{uri}?tls-certificates={}", dir.display());

    // The operator: size and bytes as restore has them.
    let out = Command::new("nbdinfo")
        .args(["--size", &with(&certs)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nbdinfo over TLS: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        file_len(&src).to_string()
    );
    let copied = root.join("copied.img");
    let st = Command::new("nbdcopy")
        .args([&with(&certs), copied.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(st.success(), "nbdcopy over TLS");
    let restored = root.join("restored.img");
    rcv.restore("db1", "root", point, &restored);
    assert_same_bytes(&copied, &restored, file_len(&restored));

    // Plain NBD to the TLS export: refused (TLS required).
    let plain = uri.replacen("nbds://", "nbd://", 1);
    let out = Command::new("nbdinfo")
        .args(["--size", &plain])
        .output()
        .unwrap();
    assert!(!out.status.success(), "plain NBD got an answer");
    // A source server's identity, from the same CA: refused.
    let agent_dir = root.join("agent.nbd");
    agent_as_nbd_dir(&agent_id, &agent_dir);
    let out = Command::new("nbdinfo")
        .args(["--size", &with(&agent_dir)])
        .output()
        .unwrap();
    assert!(!out.status.success(), "an agent identity read the export");
    // The operator still can.
    let out = Command::new("nbdinfo")
        .args(["--size", &with(&certs)])
        .output()
        .unwrap();
    assert!(out.status.success());
    drop(export);
    rcv.stop().await;
}
