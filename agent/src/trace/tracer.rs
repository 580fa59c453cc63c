//! The tracefs side: a private tracing instance recording the volumes'
//! completed writes, read through `trace_pipe` up to a marker on each sync,
//! and removed on drop (with the instances agents that were killed left).

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::parse::{parse_line, Line};
use pilotlight_protocol::clock::now_ms;

use crate::blocking::off_async;

use super::{trace_err, Dirty, EventSource, Target, Writes};
use crate::AgentError;

/// Where tracefs is usually mounted.
const TRACEFS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];
/// The events recorded.
const EVENTS: [&str; 2] = ["block/block_rq_complete", "block/block_bio_complete"];
/// How long a marker may take to come back through the pipe.
const SYNC_DEADLINE: Duration = Duration::from_secs(10);

/// A private tracing instance recording the volumes' completed writes.
/// Removed on drop.
pub struct Tracer {
    dir: PathBuf,
    /// `None` only while dropping (an open pipe keeps the instance busy).
    pipe: Option<File>,
    /// The end of the pipe's text not yet parsed (a line cut by a read).
    partial: Vec<u8>,
    volumes: Vec<Traced>,
    /// Number of the last sync marker written.
    seq: u64,
    /// The kernel's lost-event counters at the last sync.
    lost_seen: u64,
}

/// One volume as the tracer sees it.
struct Traced {
    target: Target,
    /// Written since the last take.
    writes: Writes,
}

impl Tracer {
    /// Start recording for `targets`, with `buffer_kb` of trace buffer per
    /// CPU.
    pub fn start(targets: Vec<Target>, buffer_kb: u32) -> Result<Self, AgentError> {
        let root = tracefs()?;
        let instances = root.join("instances");
        remove_stale(&instances);
        let dir = instances.join(format!(
            "pilotlight-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir(&dir)
            .map_err(|e| trace_err(format!("cannot create {}: {e}", dir.display())))?;
        // From here on, dropping `guard` removes the instance.
        let guard = InstanceGuard(dir.clone());
        write_file(&dir.join("buffer_size_kb"), &buffer_kb.max(1).to_string())?;
        // One clock for all CPUs, so that the pipe orders a write that
        // completed on one CPU before a marker written later on another.
        if let Err(e) = write_file(&dir.join("trace_clock"), "mono") {
            tracing::warn!(cause = %e, "cannot use the mono trace clock; events are ordered by per-CPU clocks");
        }
        let mut devs: Vec<u32> = targets.iter().map(|t| t.device.dev).collect();
        devs.sort_unstable();
        devs.dedup();
        let filter = devs
            .iter()
            .map(|d| format!("dev == {d}"))
            .collect::<Vec<_>>()
            .join(" || ");
        let mut enabled = 0;
        for ev in EVENTS {
            let ev_dir = dir.join("events").join(ev);
            if !ev_dir.exists() {
                continue;
            }
            write_file(&ev_dir.join("filter"), &filter)?;
            write_file(&ev_dir.join("enable"), "1")?;
            enabled += 1;
        }
        if enabled == 0 {
            return Err(trace_err(format!(
                "this kernel has no block completion tracepoints under {}",
                dir.join("events/block").display()
            )));
        }
        let pipe = File::options()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(dir.join("trace_pipe"))
            .map_err(|e| trace_err(format!("cannot open trace_pipe: {e}")))?;
        std::mem::forget(guard);
        let volumes = targets
            .into_iter()
            .map(|target| Traced {
                target,
                writes: Writes {
                    dirty: Dirty::new(target.block_size),
                    first_ms: None,
                    bytes: 0,
                },
            })
            .collect();
        let mut t = Self {
            lost_seen: 0,
            dir,
            pipe: Some(pipe),
            partial: Vec::new(),
            volumes,
            seq: 0,
        };
        t.lost_seen = t.lost_counter()?;
        Ok(t)
    }

    /// The instance's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Sum of events the kernel dropped or overwrote, over all CPUs.
    fn lost_counter(&self) -> Result<u64, AgentError> {
        let per_cpu = self.dir.join("per_cpu");
        let entries = std::fs::read_dir(&per_cpu)
            .map_err(|e| trace_err(format!("{}: {e}", per_cpu.display())))?;
        let mut sum = 0u64;
        for e in entries.flatten() {
            let Ok(text) = std::fs::read_to_string(e.path().join("stats")) else {
                continue;
            };
            for line in text.lines() {
                let Some((k, v)) = line.split_once(':') else {
                    continue;
                };
                if matches!(k.trim(), "overrun" | "dropped events" | "commit overrun") {
                    sum += v.trim().parse::<u64>().unwrap_or(0);
                }
            }
        }
        Ok(sum)
    }

    /// Read every event recorded up to now into the dirty sets (blocking).
    /// Returns whether events were lost since the last call.
    fn read_events(&mut self) -> Result<bool, AgentError> {
        self.seq += 1;
        let marker = self.seq;
        write_file(
            &self.dir.join("trace_marker"),
            &format!("pilotlight-sync-{marker}"),
        )?;
        let Some(mut pipe) = self.pipe.take() else {
            return Err(trace_err("the trace pipe is closed"));
        };
        let r = self.read_to_marker(&mut pipe, marker);
        self.pipe = Some(pipe);
        let lost = r?;
        let counter = self.lost_counter()?;
        if counter != self.lost_seen {
            self.lost_seen = counter;
            return Ok(true);
        }
        Ok(lost)
    }

    /// Read the pipe until `marker` comes back. Returns whether the pipe
    /// reported lost events.
    fn read_to_marker(&mut self, pipe: &mut File, marker: u64) -> Result<bool, AgentError> {
        let deadline = Instant::now() + SYNC_DEADLINE;
        let mut lost = false;
        let mut buf = vec![0u8; 64 << 10];
        let mut seen = false;
        while !seen {
            match pipe.read(&mut buf) {
                Ok(0) => {}
                Ok(n) => {
                    self.partial
                        .extend_from_slice(buf.get(..n).unwrap_or_default());
                    let (s, l) = self.consume(marker);
                    seen |= s;
                    lost |= l;
                    continue;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    // The marker itself may be among the events a full
                    // buffer dropped: then stop waiting, everything is
                    // rescanned anyway.
                    if self.lost_counter()? != self.lost_seen {
                        return Ok(true);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(trace_err(format!("reading trace_pipe: {e}"))),
            }
            if Instant::now() > deadline {
                return Err(trace_err(
                    "the trace marker did not come back within 10 s; tracing stopped working",
                ));
            }
            let mut fds = [nix::poll::PollFd::new(
                std::os::fd::AsFd::as_fd(&*pipe),
                nix::poll::PollFlags::POLLIN,
            )];
            let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(50u8));
        }
        Ok(lost)
    }

    /// Parse the complete lines in `partial`. Returns (marker seen, lost).
    fn consume(&mut self, marker: u64) -> (bool, bool) {
        let (mut seen, mut lost) = (false, false);
        let now = now_ms();
        let mut start = 0;
        while let Some(nl) = self
            .partial
            .get(start..)
            .and_then(|p| p.iter().position(|&b| b == b'\n'))
        {
            let line =
                String::from_utf8_lossy(self.partial.get(start..start + nl).unwrap_or_default());
            start += nl + 1;
            match parse_line(&line) {
                Line::Write { dev, sector, nr } => {
                    tracing::trace!(dev, sector, nr, "write completed");
                    for v in self
                        .volumes
                        .iter_mut()
                        .filter(|v| v.target.device.dev == dev)
                    {
                        let w = &mut v.writes;
                        let bytes = v.target.mark(&mut w.dirty, sector, nr);
                        if bytes > 0 {
                            w.bytes += bytes;
                            w.first_ms.get_or_insert(now);
                        }
                    }
                }
                Line::Marker(m) if m == marker => seen = true,
                Line::Lost => lost = true,
                Line::Marker(_) | Line::Other => {}
            }
        }
        self.partial.drain(..start);
        (seen, lost)
    }
}

impl EventSource for Tracer {
    /// A marker round trip through the pipe, off the async workers.
    fn sync(&mut self) -> Result<bool, AgentError> {
        off_async(|| self.read_events())
    }

    fn take(&mut self, volume: usize) -> Writes {
        match self.volumes.get_mut(volume) {
            Some(v) => Writes {
                dirty: v.writes.dirty.take(),
                first_ms: v.writes.first_ms.take(),
                bytes: std::mem::take(&mut v.writes.bytes),
            },
            None => Writes::default(),
        }
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        for ev in EVENTS {
            let _ = write_file(&self.dir.join("events").join(ev).join("enable"), "0");
        }
        drop(self.pipe.take());
        remove_instance(&self.dir);
    }
}

struct InstanceGuard(PathBuf);

impl Drop for InstanceGuard {
    fn drop(&mut self) {
        remove_instance(&self.0);
    }
}

fn remove_instance(dir: &Path) {
    if let Err(e) = std::fs::remove_dir(dir) {
        tracing::warn!(instance = %dir.display(), cause = %e, "cannot remove the tracing instance");
    }
}

/// Remove instances left by agents that are gone (killed).
fn remove_stale(instances: &Path) {
    let Ok(entries) = std::fs::read_dir(instances) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("pilotlight-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            tracing::info!(instance = %name, "removing a tracing instance a stopped agent left");
            remove_instance(&e.path());
        }
    }
}

fn tracefs() -> Result<PathBuf, AgentError> {
    for p in TRACEFS {
        if Path::new(p).join("instances").is_dir() {
            return Ok(PathBuf::from(p));
        }
    }
    let target = Path::new(TRACEFS[0]);
    nix::mount::mount(
        Some("nodev"),
        target,
        Some("tracefs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| {
        trace_err(format!(
            "tracefs is not mounted and cannot be mounted at {} ({e}); live tracking needs root and a kernel with tracing (use --track scan)",
            target.display()
        ))
    })?;
    if target.join("instances").is_dir() {
        Ok(target.to_owned())
    } else {
        Err(trace_err("tracefs has no instances directory"))
    }
}

fn write_file(path: &Path, text: &str) -> Result<(), AgentError> {
    let mut f = File::options()
        .write(true)
        .open(path)
        .map_err(|e| trace_err(format!("{}: {e}", path.display())))?;
    f.write_all(text.as_bytes())
        .map_err(|e| trace_err(format!("writing {text:?} to {}: {e}", path.display())))
}
