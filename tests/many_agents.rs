//! Many agents at once against a receiver whose budget is deliberately
//! small: real agent processes all started together, all on loopback (one
//! source address, so the pre-authentication budget of one address is
//! passed many times over), each making one point (`--once`, so that it
//! leaves the receiver when done). Each makes its point; none is refused for
//! good; those that found the receiver full were told `Busy` and came
//! back after their backoff; none saw a connection reset.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use pilotlight::{bin, sample_image, wait_until, ChildGuard, TestReceiver};
use pilotlight_receiver::ReceiverConfig;

/// Agent processes started at once.
const AGENTS: usize = 60;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_agents_at_once_all_make_their_point_and_the_refused_hear_busy() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    // Room for 8 agents of a control connection and one data stream.
    let rcv = TestReceiver::create_with(
        root,
        &ReceiverConfig {
            max_connections: 16,
            ..ReceiverConfig::default()
        },
    )
    .await;
    let mut agents = Vec::new();
    let mut logs = Vec::new();
    let mut launch = Vec::new();
    for i in 0..AGENTS {
        let name = format!("srv{i:03}");
        let id = rcv.enroll(&name);
        let img = root.join(format!("{name}.img"));
        sample_image(&img, 64 << 10, i as u64);
        let log = root.join(format!("{name}.log"));
        launch.push((id, img, log.clone(), root.join(format!("{name}-state"))));
        logs.push((name, log));
    }
    for (id, img, log, state) in &launch {
        let child = Command::new(bin("pilotlight-agent"))
            .args([
                "run",
                "--receiver",
                &rcv.addr.to_string(),
                "--identity",
                s(id),
            ])
            .args(["--state", s(state), "--volume", &format!("root={}", s(img))])
            .args(["--streams", "1", "--block-size", "4096"])
            .args(["--once", "--once-attempts", "1000"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .expect("spawn pilotlight-agent");
        agents.push(ChildGuard(child));
    }
    let dir = rcv.dir.clone();
    let servers_with_points = || {
        let points = pilotlight_receiver::admin::points(&dir, None).unwrap_or_default();
        let mut servers: Vec<String> = points.into_iter().map(|p| p.server).collect();
        servers.sort();
        servers.dedup();
        servers.len()
    };
    wait_until(
        Duration::from_secs(120),
        "every agent's first point",
        || servers_with_points() == AGENTS,
    )
    .await;
    // Each agent exits 0 once its point is durable.
    for (a, (name, log)) in agents.iter_mut().zip(&logs) {
        let status = a.0.wait().unwrap();
        assert!(
            status.success(),
            "{name} gave up: {}",
            std::fs::read_to_string(log).unwrap()
        );
    }
    drop(agents);
    let mut busy = 0;
    for (name, log) in &logs {
        let text = std::fs::read_to_string(log).unwrap();
        assert!(
            !text.to_lowercase().contains("reset"),
            "{name} saw a reset:\n{text}"
        );
        if text.contains("connection limit") {
            busy += 1;
        }
    }
    // 60 agents where 8 fit: most were told Busy at least once.
    assert!(busy > 0, "no agent was told Busy");
    eprintln!("{busy} of {AGENTS} agents were told Busy before their point");
    rcv.stop().await;
}
