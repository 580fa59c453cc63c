//! The tracefs side: a private tracing instance recording the volumes'
//! completed writes, read up to a marker on each sync (through the raw
//! per-CPU pages, or the text pipe when those cannot be used), and removed
//! on drop (with the instances agents that were killed left).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::parse::Line;
use super::raw::{RawReader, RawStats};
use super::text::TextPipe;
use pilotlight_protocol::clock::now_ms;

use crate::blocking::off_async;

use super::{trace_err, Dirty, EventSource, Target, Writes};
use crate::AgentError;

/// Where tracefs is usually mounted.
const TRACEFS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];
/// The events recorded.
const EVENTS: [&str; 2] = ["block/block_rq_complete", "block/block_bio_complete"];
/// Set to `1` to read the text `trace_pipe` even where the raw pages work.
pub const FORCE_TEXT_ENV: &str = "PILOTLIGHT_TRACE_TEXT";

/// How the tracer reads its instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReaderKind {
    /// `per_cpu/cpuN/trace_pipe_raw`, decoded with the format files.
    Raw,
    /// The text of `trace_pipe`.
    Text,
}

/// The open reader.
enum Reader {
    Raw(RawReader),
    Text(TextPipe),
}

/// A private tracing instance recording the volumes' completed writes.
/// Removed on drop.
pub struct Tracer {
    dir: PathBuf,
    /// `None` only while syncing or dropping (an open pipe keeps the
    /// instance busy).
    reader: Option<Reader>,
    volumes: Vec<Traced>,
    /// Number of the last sync marker written.
    seq: u64,
    /// The kernel's lost-event counters at the last sync.
    lost_seen: u64,
    /// Completion events read, of any device.
    write_events: u64,
}

/// One volume as the tracer sees it.
struct Traced {
    target: Target,
    /// Written since the last take.
    writes: Writes,
}

impl Tracer {
    /// Start recording for `targets`, with `buffer_kb` of trace buffer per
    /// CPU, read through the raw pages unless they cannot be used or
    /// [`FORCE_TEXT_ENV`] is `1`.
    pub fn start(targets: Vec<Target>, buffer_kb: u32) -> Result<Self, AgentError> {
        let want = match std::env::var(FORCE_TEXT_ENV).as_deref() {
            Ok("1") => ReaderKind::Text,
            _ => ReaderKind::Raw,
        };
        Self::start_with(targets, buffer_kb, want)
    }

    /// Like [`start`](Self::start), reading with `want` (the text pipe if
    /// the raw pages cannot be used).
    pub fn start_with(
        targets: Vec<Target>,
        buffer_kb: u32,
        want: ReaderKind,
    ) -> Result<Self, AgentError> {
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
        let reader = open_reader(&dir, want)?;
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
            reader: Some(reader),
            volumes,
            write_events: 0,
            seq: 0,
        };
        t.lost_seen = lost_counter(&t.dir)?;
        Ok(t)
    }

    /// How this tracer reads its instance.
    pub fn reader_kind(&self) -> ReaderKind {
        match self.reader {
            Some(Reader::Text(_)) => ReaderKind::Text,
            _ => ReaderKind::Raw,
        }
    }

    /// Completion events (not reads) read so far: two readers of the same
    /// writes read as many, none twice, none skipped.
    pub fn write_events(&self) -> u64 {
        self.write_events
    }

    /// The raw reader's counters (`None` with the text pipe).
    pub fn raw_stats(&self) -> Option<RawStats> {
        match &self.reader {
            Some(Reader::Raw(r)) => Some(r.stats),
            _ => None,
        }
    }

    /// The instance's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
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
        let Some(mut reader) = self.reader.take() else {
            return Err(trace_err("the trace reader is closed"));
        };
        let now = now_ms();
        let (dir, seen) = (&self.dir, self.lost_seen);
        let lost_now = || Ok(lost_counter(dir)? != seen);
        let mut lost = false;
        let mut on_line = |line: Line| match line {
            Line::Write { dev, sector, nr } => {
                mark(&mut self.volumes, dev, sector, nr, now);
                self.write_events += 1;
                false
            }
            Line::Marker(m) => m == marker,
            Line::Lost => {
                lost = true;
                false
            }
            Line::Other => false,
        };
        let r = match &mut reader {
            Reader::Raw(raw) => super::read_to_marker(raw, &mut on_line, lost_now),
            Reader::Text(text) => super::read_to_marker(text, &mut on_line, lost_now),
        };
        self.reader = Some(reader);
        let lost = r? | lost;
        let counter = lost_counter(&self.dir)?;
        if counter != self.lost_seen {
            self.lost_seen = counter;
            return Ok(true);
        }
        Ok(lost)
    }
}

/// Mark `nr` sectors at `sector` of device `dev` written, in every volume
/// on it.
fn mark(volumes: &mut [Traced], dev: u32, sector: u64, nr: u64, now: i64) {
    tracing::trace!(dev, sector, nr, "write completed");
    for v in volumes.iter_mut().filter(|v| v.target.device.dev == dev) {
        let w = &mut v.writes;
        let bytes = v.target.mark(&mut w.dirty, sector, nr);
        if bytes > 0 {
            w.bytes += bytes;
            w.first_ms.get_or_insert(now);
        }
    }
}

/// Open the reader `want`, or the text pipe if the raw pages cannot be
/// used (said once, here).
fn open_reader(dir: &Path, want: ReaderKind) -> Result<Reader, AgentError> {
    if want == ReaderKind::Raw {
        match RawReader::open(dir, &EVENTS) {
            Ok(r) => {
                tracing::info!("reading trace events from the raw per-CPU buffers");
                return Ok(Reader::Raw(r));
            }
            Err(why) => {
                tracing::warn!(cause = %why, "cannot read the raw trace buffers; parsing the text trace_pipe instead");
            }
        }
    } else {
        tracing::info!("reading trace events from the text trace_pipe ({FORCE_TEXT_ENV}=1)");
    }
    TextPipe::open(dir).map(Reader::Text)
}

/// Sum of events the kernel dropped or overwrote, over all CPUs.
fn lost_counter(dir: &Path) -> Result<u64, AgentError> {
    let per_cpu = dir.join("per_cpu");
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
        drop(self.reader.take());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn falls_back_to_the_text_pipe_where_the_raw_files_cannot_be_used() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("trace_pipe"), "").unwrap();
        assert!(matches!(
            open_reader(dir.path(), ReaderKind::Raw),
            Ok(Reader::Text(_))
        ));
        assert!(matches!(
            open_reader(dir.path(), ReaderKind::Text),
            Ok(Reader::Text(_))
        ));
        std::fs::remove_file(dir.path().join("trace_pipe")).unwrap();
        assert!(open_reader(dir.path(), ReaderKind::Raw).is_err());
    }
}
