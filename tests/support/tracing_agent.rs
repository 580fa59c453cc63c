//! A `pilotlight-agent run --track trace` process on a block device, and
//! the checks a live-tracking test needs first (shared by tests/trace.rs and
//! tests/power.rs).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use pilotlight_agent::status::{State, Status};

use crate::{bin, require_root, require_tools, ChildGuard, Deadline};

/// Fail the test, saying why, unless live tracking can be tested here:
/// root, tracefs (mounted if it is not) and the block tracepoints.
pub fn require_tracing() {
    require_root("loop devices and tracefs");
    require_tools(&["losetup", "blockdev"]);
    let inst = Path::new("/sys/kernel/tracing/instances");
    if !inst.is_dir() {
        let _ = Command::new("mount")
            .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
            .status();
    }
    assert!(
        inst.is_dir(),
        "this test needs tracefs, which cannot be mounted at /sys/kernel/tracing"
    );
    assert!(
        Path::new("/sys/kernel/tracing/events/block/block_rq_complete").is_dir(),
        "this test needs the kernel's block_rq_complete tracepoint, which it lacks"
    );
}

/// A live-tracking agent process: killed at drop, [`TracingAgent::stop`]
/// stops it cleanly (SIGTERM, which saves the dirty set).
pub struct TracingAgent {
    /// The agent process.
    pub child: ChildGuard,
    /// Its state directory.
    pub state: PathBuf,
    /// Its log (stderr).
    pub log: PathBuf,
}

impl TracingAgent {
    /// Start `pilotlight-agent run --track trace` on `dev` (volume `root`,
    /// 4 KiB blocks unless `extra` says), logging beside its state directory.
    pub fn start(addr: &str, id: &Path, state: &Path, dev: &Path, extra: &[&str]) -> Self {
        Self::start_logging_to(addr, id, state, dev, extra, &state.with_extension("log"))
    }

    /// [`Self::start`], logging to `log_path`.
    pub fn start_logging_to(
        addr: &str,
        id: &Path,
        state: &Path,
        dev: &Path,
        extra: &[&str],
        log_path: &Path,
    ) -> Self {
        Self::start_with_env(addr, id, state, dev, extra, log_path, &[])
    }

    /// [`Self::start_logging_to`] with more environment variables.
    pub fn start_with_env(
        addr: &str,
        id: &Path,
        state: &Path,
        dev: &Path,
        extra: &[&str],
        log_path: &Path,
        env: &[(&str, &str)],
    ) -> Self {
        let log = std::fs::File::create(log_path).unwrap();
        let block_size: &[&str] = if extra.contains(&"--block-size") {
            &[]
        } else {
            &["--block-size", "4096"]
        };
        let child = Command::new(bin("pilotlight-agent"))
            .args(["run", "--receiver", addr, "--identity"])
            .arg(id)
            .arg("--state")
            .arg(state)
            .arg("--volume")
            .arg(format!("root={}", dev.display()))
            .args(["--track", "trace"])
            .args(block_size)
            .args(extra)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Self {
            child: ChildGuard(child),
            state: state.to_owned(),
            log: log_path.to_owned(),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// The status it last wrote, if any.
    pub fn status(&self) -> Option<Status> {
        Status::load(&self.state).ok()
    }

    /// Wait until `cond` holds for the status; panics with the last status
    /// and the agent's log after `secs`.
    pub async fn wait(&mut self, secs: u64, what: &str, cond: impl Fn(&Status) -> bool) -> Status {
        let deadline = Deadline::after(Duration::from_secs(secs));
        loop {
            if let Some(st) = self.status().filter(|s| cond(s)) {
                return st;
            }
            if let Some(code) = self.child.0.try_wait().unwrap() {
                panic!(
                    "agent exited ({code}) while waiting for {what}; log:\n{}",
                    self.log()
                );
            }
            deadline
                .next(|| {
                    format!(
                        "timed out waiting for {what}; status: {:?}\nlog:\n{}",
                        self.status(),
                        self.log()
                    )
                })
                .await;
        }
    }

    /// Wait for the initial sync: a durable point, and live tracking.
    pub async fn initial_sync(&mut self) -> Status {
        self.wait(60, "the initial sync", |s| {
            s.last_point.is_some() && s.state == State::Continuous
        })
        .await
    }

    /// Wait until every write completed before `since` (ms) is durable;
    /// returns the point that holds them.
    pub async fn caught_up(&mut self, since: i64) -> u64 {
        let st = self
            .wait(60, "the agent to catch up", |s| {
                s.collected_ms.is_some_and(|c| c > since)
                    && s.backlog_bytes == Some(0)
                    && s.pending_points == 0
                    && s.last_point.is_some()
            })
            .await;
        st.last_point.unwrap()
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, and wait for a clean exit.
    pub async fn stop(mut self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        let deadline = Deadline::after(Duration::from_secs(30));
        loop {
            if let Some(code) = self.child.0.try_wait().unwrap() {
                assert!(
                    code.success(),
                    "agent exited with {code}; log:\n{}",
                    self.log()
                );
                break;
            }
            deadline.next(|| "agent did not stop".into()).await;
        }
        let pid = self.pid();
        let left: Vec<String> = std::fs::read_dir("/sys/kernel/tracing/instances")
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&format!("pilotlight-{pid}-")))
            .collect();
        assert!(left.is_empty(), "tracing instance left behind: {left:?}");
    }
}
