//! The receiver binary's directory management commands.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::process::Command;

fn receiver(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pilotlight-receiver"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn init_enroll_revoke() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("r");
    let d = dir.to_str().unwrap();
    assert!(receiver(&["init", "--dir", d]).status.success());
    let again = receiver(&["init", "--dir", d]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already a receiver directory"));
    let pem = tmp.path().join("a.pem");
    let p = pem.to_str().unwrap();
    assert!(
        receiver(&["enroll", "--dir", d, "--server", "alpha", "--out", p])
            .status
            .success()
    );
    let text = std::fs::read_to_string(&pem).unwrap();
    assert_eq!(text.matches("BEGIN CERTIFICATE").count(), 2);
    assert!(text.contains("PRIVATE KEY"));
    // The identity file is never overwritten.
    let dup = receiver(&["enroll", "--dir", d, "--server", "alpha", "--out", p]);
    assert!(!dup.status.success());
    assert!(String::from_utf8_lossy(&dup.stderr).contains("already exists"));
    let bad = receiver(&[
        "enroll",
        "--dir",
        d,
        "--server",
        "Alpha!",
        "--out",
        "/tmp/never.pem",
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a valid server name"));
    assert!(receiver(&["revoke", "--dir", d, "--server", "alpha"])
        .status
        .success());
    let unknown = receiver(&["revoke", "--dir", d, "--server", "beta"]);
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no server named beta"));
    let toml = std::fs::read_to_string(dir.join("receiver.toml")).unwrap();
    assert!(toml.contains("listen"));
}
