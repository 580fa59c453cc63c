//! Whose clock dates a point: the receiver's. Real agent binaries whose
//! clocks are 30 days ahead and reset to 1970 (`faketime`) replicate over
//! real TLS; prune keeps all of their history, and still prunes another
//! server whose points are genuinely old by the receiver's clock.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};

use pilotlight::{
    agent_config, bin, overwrite_random_4k, replicate_once, require_tools, run_bin, sample_image,
    TestReceiver,
};

const DAY_MS: i64 = 86_400_000;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A process run under `faketime`, which forks the real program and waits
/// for it: stopping `faketime` alone would leave the receiver running (and
/// holding the store's lock), so the guard signals the whole process group.
struct FakedGuard(std::process::Child);

impl Drop for FakedGuard {
    /// SIGTERM to the group, then wait until none of it is left: the
    /// receiver under `faketime` may outlive `faketime` for a moment, still
    /// holding the store's lock.
    fn drop(&mut self) {
        let group = format!("-{}", self.0.id());
        let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
        let _ = self.0.wait();
        let alive = || {
            Command::new("kill")
                .args(["-0", "--", &group])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        let deadline = pilotlight::Deadline::after(std::time::Duration::from_secs(20));
        while alive() {
            deadline.next_blocking(|| "the receiver under faketime did not stop".into());
        }
    }
}

/// `pilotlight-receiver serve` under `faketime -f OFFSET`, in its own process
/// group; returns the guard and the address it printed.
fn spawn_receiver_faked(dir: &Path, offset: &str) -> (FakedGuard, SocketAddr) {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    let mut child = Command::new("faketime")
        .args(["-f", offset])
        .arg(bin("pilotlight-receiver"))
        .args(["serve", "--listen", "127.0.0.1:0", "--print-addr", "--dir"])
        .arg(dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("spawn faketime pilotlight-receiver");
    let stdout = child.stdout.take().unwrap();
    let guard = FakedGuard(child);
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("receiver printed {line:?}, not an address"));
    (guard, addr)
}

/// One point by the real agent binary under `faketime ARGS`.
fn agent_once_faked(faketime: &[&str], addr: SocketAddr, id: &Path, state: &Path, img: &Path) {
    let out = Command::new("faketime")
        .args(faketime)
        .arg(bin("pilotlight-agent"))
        .args(["run", "--receiver", &addr.to_string(), "--identity", s(id)])
        .args(["--state", s(state), "--volume", &format!("root={}", s(img))])
        .arg("--once")
        .env("RUST_LOG", "warn")
        .output()
        .expect("spawn faketime pilotlight-agent");
    assert!(
        out.status.success(),
        "agent under faketime {faketime:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `pilotlight-receiver ARGS --json`, parsed.
fn json(args: &[&str]) -> serde_json::Value {
    let out = run_bin("pilotlight-receiver", args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn ms(rfc3339: &serde_json::Value) -> i64 {
    pilotlight_protocol::clock::parse_rfc3339(rfc3339.as_str().unwrap()).unwrap()
}

/// Point ids of each server, from `points --json`.
fn ids(dir: &Path) -> BTreeMap<String, Vec<i64>> {
    let mut out: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for p in json(&["points", "--dir", s(dir), "--json"])
        .as_array()
        .unwrap()
    {
        out.entry(p["server"].as_str().unwrap().to_owned())
            .or_default()
            .push(p["id"].as_i64().unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs faketime"]
async fn an_agent_with_a_wrong_clock_cannot_shorten_history() {
    require_tools(&["faketime"]);
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let dir = root.join("receiver");
    pilotlight_receiver::admin::init(&dir, Some("127.0.0.1:0")).unwrap();
    let enroll = |server: &str| {
        let out = root.join(format!("{server}.pem"));
        pilotlight_receiver::admin::enroll(&dir, server, &out).unwrap();
        out
    };
    let (old, fast, reset) = (enroll("old"), enroll("fast"), enroll("reset"));
    let image = |name: &str, seed: u64| {
        let img = root.join(format!("{name}.img"));
        sample_image(&img, 1 << 20, seed);
        img
    };

    // Points that are genuinely 30 days old by the receiver's clock: the
    // receiver itself ran 30 days in the past (the agent's clock is right).
    let started = pilotlight_protocol::clock::now_ms();
    let (rx, addr) = spawn_receiver_faked(&dir, "-30d");
    let img = image("old", 1);
    let cfg = agent_config(addr, &old, &root.join("st-old"), &[("root", &img)]);
    for i in 0..3 {
        overwrite_random_4k(&img, 2, i);
        replicate_once(&cfg).await;
    }
    drop(rx);

    // The receiver on the right time; agents 30 days ahead and in 1970.
    let rcv = TestReceiver::serve(&dir).await;
    let wrong: [(&str, &Path, &[&str]); 2] = [
        ("fast", &fast, &["-f", "+30d"]),
        ("reset", &reset, &["1970-01-02 00:00:00"]),
    ];
    for (i, (name, id, faketime)) in wrong.iter().enumerate() {
        let img = image(name, 10 + i as u64);
        let state = root.join(format!("st-{name}"));
        for j in 0..3 {
            overwrite_random_4k(&img, 2, 100 + j);
            agent_once_faked(faketime, rcv.addr, id, &state, &img);
        }
    }
    rcv.stop().await;
    let now = pilotlight_protocol::clock::now_ms();

    // Each point is dated by the receiver; the agent's time is its source_time.
    let points = json(&["points", "--dir", s(&dir), "--json"]);
    for p in points.as_array().unwrap() {
        let (created, source) = (ms(&p["created"]), ms(&p["source_time"]));
        match p["server"].as_str().unwrap() {
            "old" => {
                assert!((created - (started - 30 * DAY_MS)).abs() < DAY_MS, "{p}");
                assert!(source >= started && source <= now, "{p}");
            }
            "fast" => {
                assert!(created >= started && created <= now, "{p}");
                assert!((source - created - 30 * DAY_MS).abs() < DAY_MS, "{p}");
            }
            _ => {
                assert!(created >= started && created <= now, "{p}");
                assert!(source < 2 * DAY_MS, "{p}");
            }
        }
    }
    // status shows each server's skew at its newest point.
    let status = json(&["status", "--dir", s(&dir), "--json"]);
    let skew = |server: &str| {
        let line = status
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["server"] == server)
            .unwrap();
        line["clock_skew_seconds"].as_f64().unwrap()
    };
    assert!((skew("fast") - 30.0 * 86_400.0).abs() < 86_400.0);
    assert!(skew("reset") < -(now - 2 * DAY_MS) as f64 / 1000.0 + 86_400.0);
    assert!((skew("old") - 30.0 * 86_400.0).abs() < 86_400.0);

    // A tight policy: keep the last point. min_keep (7 days by default)
    // keeps every point of the servers with wrong clocks, since they are
    // young by the receiver's clock; the old server is pruned as before.
    let before = ids(&dir);
    let items = json(&["prune", "--dir", s(&dir), "--keep-last", "1", "--json"]);
    let removed: Vec<i64> = items
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["keep"] == false)
        .map(|i| {
            assert!(i.get("error").is_none(), "{i}");
            i["point"].as_i64().unwrap()
        })
        .collect();
    assert_eq!(removed, before["old"][..2].to_vec());
    let after = ids(&dir);
    assert_eq!(after["fast"], before["fast"]);
    assert_eq!(after["reset"], before["reset"]);
    assert_eq!(after["old"], before["old"][2..].to_vec());
    for i in items.as_array().unwrap() {
        if i["server"] != "old" {
            let reasons = i["reasons"].as_array().unwrap();
            assert!(reasons.iter().any(|r| r == "min-keep"), "{i}");
        }
    }
    // The default policy keeps them too, and every kept point is whole.
    json(&["prune", "--dir", s(&dir), "--json"]);
    assert_eq!(ids(&dir), after);
    let v = pilotlight_receiver::verify::verify(&dir, None, None, false).unwrap();
    assert!(v.ok && v.points_checked == 7, "{v:?}");
}
