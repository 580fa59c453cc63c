//! The agent binary's argument checking.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::process::Command;

fn agent(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pilotlight-agent"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn invalid_volume_name_is_refused() {
    let out = agent(&[
        "run",
        "--receiver",
        "127.0.0.1:1",
        "--identity",
        "x",
        "--state",
        "s",
        "--volume",
        "Root=/dev/null",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a valid volume name"));
}

#[test]
fn invalid_block_size_is_refused() {
    let out = agent(&[
        "run",
        "--receiver",
        "127.0.0.1:1",
        "--identity",
        "x",
        "--state",
        "s",
        "--volume",
        "r=/dev/null",
        "--block-size",
        "5000",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--block-size 5000"));
}

#[test]
fn status_without_state_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let out = agent(&["status", "--state", dir.path().to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("status.json"));
}
