//! Recovery point objectives: `status` flags a server whose newest point is
//! older than its `rpo_target` (per-server overrides in `[rpo_targets]`), and
//! a serving receiver exports `pilotlight_receiver_rpo_breached` for alerts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::collections::BTreeMap;
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::Duration;

use pilotlight::{agent_config, bin, replicate_once, sample_image, ChildGuard, TestReceiver};
use pilotlight_receiver::config::Span;
use pilotlight_receiver::ReceiverConfig;

const MIN_MS: i64 = 60_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_flags_servers_past_their_rpo() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let cfg = ReceiverConfig {
        rpo_targets: BTreeMap::from([("relaxed".to_owned(), Span(Duration::from_secs(3600)))]),
        ..ReceiverConfig::default()
    };
    let rcv = TestReceiver::create_with(root, &cfg).await;
    for name in ["strict", "relaxed"] {
        let id = rcv.enroll(name);
        let img = root.join(format!("{name}.img"));
        sample_image(&img, 1 << 20, 3);
        replicate_once(&agent_config(
            rcv.addr,
            &id,
            &root.join(name),
            &[("root", &img)],
        ))
        .await;
    }
    rcv.enroll("idle");
    let at = |minutes: i64| {
        let now = pilotlight_protocol::clock::now_ms() + minutes * MIN_MS;
        let st = pilotlight_receiver::status::status_at(&rcv.dir, None, now).unwrap();
        st.servers
            .into_iter()
            .map(|s| (s.server.clone(), (s.rpo_breached, s.rpo_target_seconds)))
            .collect::<BTreeMap<_, _>>()
    };
    // Now: every point is young.
    let now = at(0);
    assert_eq!(now["strict"], (false, 300.0));
    assert_eq!(now["relaxed"], (false, 3600.0));
    // Ten minutes on: past the default 5 minutes, not past the hour; a
    // server with no point yet has promised nothing.
    let later = at(10);
    assert_eq!(later["strict"], (true, 300.0));
    assert_eq!(later["relaxed"], (false, 3600.0));
    assert_eq!(later["idle"], (false, 300.0));
    assert_eq!(at(61)["relaxed"], (true, 3600.0));
    rcv.stop().await;
}

use pilotlight::scrape_metrics as scrape;

/// The value of `name{server="SERVER"}` in a scrape.
fn gauge(text: &str, name: &str, server: &str) -> Option<f64> {
    let key = format!("{name}{{server=\"{server}\"}}");
    text.lines()
        .find(|l| l.starts_with(&key))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serving_receiver_exports_rpo_breaches() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    // One point, made through an in-process receiver; then the real binary
    // serves the directory with a 1 s objective and metrics on.
    let cfg = ReceiverConfig {
        rpo_target: Span(Duration::from_secs(1)),
        ..ReceiverConfig::default()
    };
    let rcv = TestReceiver::create_with(root, &cfg).await;
    let id = rcv.enroll("web");
    let img = root.join("web.img");
    sample_image(&img, 1 << 20, 5);
    replicate_once(&agent_config(
        rcv.addr,
        &id,
        &root.join("st"),
        &[("root", &img)],
    ))
    .await;
    let dir = rcv.dir.clone();
    rcv.stop().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(bin("pilotlight-receiver"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--print-addr",
            "--metrics",
        ])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--dir")
        .arg(&dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _serve = ChildGuard(child);
    let mut seen = None;
    pilotlight::wait_until(Duration::from_secs(30), "rpo gauges", || {
        seen = scrape(port).and_then(|t| {
            let breached = gauge(&t, "pilotlight_receiver_rpo_breached", "web")?;
            let lag = gauge(&t, "pilotlight_receiver_lag_seconds", "web")?;
            let target = gauge(&t, "pilotlight_receiver_rpo_target_seconds", "web")?;
            Some((breached, lag, target))
        });
        seen.is_some_and(|(b, _, _)| b == 1.0)
    })
    .await;
    let (_, lag, target) = seen.unwrap();
    assert!(lag > 1.0 && target == 1.0, "lag {lag}, target {target}");
    // status says the same.
    let out = pilotlight::run_bin(
        "pilotlight-receiver",
        &["status", "--dir", dir.to_str().unwrap()],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("RPO breached: web"), "{text}");
}
