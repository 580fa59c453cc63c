//! Operator experience: status of both sides, Prometheus metrics during a
//! transfer, the send-rate cap, the config file, and the service units.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pilotlight::{
    agent_config, bin, replicate_once, require_tools, run_bin, sample_image, ChildGuard, Deadline,
    TestReceiver,
};
use rand::{RngCore, SeedableRng};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A port the OS picked for us (bound, then released for the child to take).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

use pilotlight::scrape_metrics as scrape;

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn status_metrics_and_config_file_through_the_binaries() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let dir = root.join("rcv");
    let id = root.join("ops.pem");
    assert!(run_bin("pilotlight-receiver", &["init", "--dir", s(&dir)])
        .status
        .success());
    assert!(run_bin(
        "pilotlight-receiver",
        &[
            "enroll",
            "--dir",
            s(&dir),
            "--server",
            "ops",
            "--out",
            s(&id)
        ]
    )
    .status
    .success());
    let rport = free_port();
    let mut child = Command::new(bin("pilotlight-receiver"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--print-addr",
            "--metrics",
            &format!("127.0.0.1:{rport}"),
            "--dir",
            s(&dir),
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let _rx = ChildGuard(child);
    let addr = line.trim().to_owned();

    let img = root.join("ops.img");
    sample_image(&img, 8 << 20, 4);
    let state = root.join("state");
    // The config file holds everything; a flag overrides one key.
    let config = root.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "receiver = \"127.0.0.1:1\"\nidentity = \"{}\"\nstate = \"{}\"\ninterval = \"100ms\"\nlog_format = \"json\"\n[volumes]\nroot = \"{}\"\n",
            id.display(),
            state.display(),
            img.display()
        ),
    )
    .unwrap();
    let aport = free_port();
    let agent = Command::new(bin("pilotlight-agent"))
        .args([
            "run",
            "--config",
            s(&config),
            "--receiver",
            &addr,
            "--metrics",
            &format!("127.0.0.1:{aport}"),
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let agent = ChildGuard(agent);

    // Counters move while the agent replicates.
    let deadline = Deadline::after(Duration::from_secs(60)).every(Duration::from_millis(20));
    let mut seen = Vec::new();
    while seen.len() < 2 {
        if let Some(text) = scrape(aport) {
            let points = metric(&text, "pilotlight_agent_points_total");
            if points >= 1.0 && seen.last().is_none_or(|&(p, _)| points > p) {
                seen.push((points, metric(&text, "pilotlight_agent_bytes_read_total")));
            }
        }
        deadline.next_blocking(|| format!("agent metrics did not move: {seen:?}"));
    }
    assert!(seen[1].1 > seen[0].1, "bytes read did not grow: {seen:?}");
    let text = scrape(rport).expect("receiver metrics");
    assert!(
        metric(&text, "pilotlight_receiver_points_total") >= 2.0,
        "{text}"
    );
    assert!(metric(&text, "pilotlight_receiver_bytes_received_total") > 0.0);
    assert!(
        text.contains("pilotlight_receiver_commit_seconds_bucket"),
        "no histogram buckets"
    );
    assert_eq!(metric(&text, "pilotlight_receiver_sessions"), 1.0);

    // Receiver status while the agent is connected.
    let out = run_bin(
        "pilotlight-receiver",
        &["status", "--dir", s(&dir), "--json"],
    );
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = &v[0];
    for key in [
        "server",
        "state",
        "points",
        "last_point",
        "last_point_time",
        "lag_seconds",
        "bytes_stored",
        "volumes",
    ] {
        assert!(row.get(key).is_some(), "receiver status lacks {key}: {row}");
    }
    assert_eq!(row["server"], "ops");
    assert_eq!(row["state"], "replicating");
    assert!(row["points"].as_u64().unwrap() >= 2);
    assert!(row["bytes_stored"].as_u64().unwrap() > 0);
    drop(agent);

    let out = run_bin(
        "pilotlight-agent",
        &["status", "--state", s(&state), "--json"],
    );
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in [
        "state",
        "receiver",
        "last_point",
        "last_point_time",
        "last_point_lag_seconds",
        "pending_points",
        "volumes",
        "updated",
    ] {
        assert!(v.get(key).is_some(), "agent status lacks {key}: {v}");
    }
    assert_eq!(v["receiver"], addr.as_str());
    assert!(v["last_point"].as_u64().unwrap() >= 2);
    assert_eq!(v["volumes"][0]["name"], "root");
    // Plain output is a readable table, not JSON.
    let out = run_bin("pilotlight-receiver", &["status", "--dir", s(&dir)]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("server") && text.contains("ops"), "{text}");
}

/// 50 MiB of incompressible data at --limit-mbps 100 takes no less than
/// the 4.2 s the cap allows (less 10%: the bucket's burst is 0.05 s): the
/// cap is applied. How closely it is held is the throttle's paced,
/// paused-clock unit test (`agent/src/throttle.rs`); how long a capped
/// transfer takes on a real machine is a figure for the benchmarks, not a
/// timed test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_rate_cap_is_applied() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let rcv = TestReceiver::create(root).await;
    let id = rcv.enroll("slow");
    let img = root.join("slow.img");
    let mut data = vec![0u8; 50 << 20];
    rand::rngs::StdRng::seed_from_u64(50).fill_bytes(&mut data);
    std::fs::write(&img, &data).unwrap();
    let mut cfg = agent_config(rcv.addr, &id, &root.join("state"), &[("root", &img)]);
    cfg.limit_mbps = Some(100);
    let start = Instant::now();
    let report = replicate_once(&cfg).await;
    let took = start.elapsed().as_secs_f64();
    let expected = (50u64 << 20) as f64 * 8.0 / 100e6;
    assert!(report.payload_bytes >= 50 << 20);
    assert!(
        took >= expected * 0.9,
        "took {took:.2} s; the cap allows no less than {expected:.2} s"
    );
    rcv.stop().await;
}

#[test]
#[ignore = "needs systemd-analyze (package systemd)"]
fn service_units_verify() {
    require_tools(&["systemd-analyze"]);
    let out = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    let tmp = tempfile::tempdir().unwrap();
    for name in ["pilotlight-agent", "pilotlight-receiver"] {
        let unit = std::fs::read_to_string(format!(
            "{}/deploy/{name}.service",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        // Point ExecStart at the binary just built, which systemd checks exists.
        let unit = unit.replace(&format!("/usr/local/bin/{name}"), s(&bin(name)));
        let path = tmp.path().join(format!("{name}.service"));
        std::fs::write(&path, unit).unwrap();
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "{name}.service: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn completions_and_man_pages() {
    for b in ["pilotlight-agent", "pilotlight-receiver"] {
        let out = run_bin(b, &["completions", "bash"]);
        assert!(out.status.success());
        assert!(String::from_utf8_lossy(&out.stdout).contains(b));
        let out = run_bin(b, &["man"]);
        assert!(out.status.success());
        assert!(String::from_utf8_lossy(&out.stdout).contains(".TH"));
    }
}
