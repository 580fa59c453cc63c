//! The raw reader: every CPU's `per_cpu/cpuN/trace_pipe_raw` of the
//! instance, read page by page and decoded with the instance's own format
//! files, instead of the text of `trace_pipe`.
//!
//! # Why a drain after `sync()` starts sees every write completed before
//!
//! - A block completion tracepoint runs in the completion path before the
//!   waiter is told (`blk_update_request` and `bio_endio` trace, then end
//!   the bio). So for a write that completed before `sync()` was called,
//!   its event was committed to the ring buffer of the CPU that completed
//!   it before the call, and the wake-up chain that told anyone of the
//!   completion (locks, a full barrier) makes that commit visible to the
//!   CPU that reads.
//! - The sync reads every CPU's buffer, one after the other, until its
//!   non-blocking read says `EAGAIN`. A read (`ring_buffer_read_page` with
//!   `full = 0`) returns the page the writer is still filling too: it
//!   copies out the committed events from the reader's position, and moves
//!   the position past them; a later read starts there. So no event is
//!   read twice or skipped, and `EAGAIN` means that CPU had no committed
//!   event left when it was read, after `sync()` started.
//! - No order across CPUs is needed: each event is marked on its own, and a
//!   take is the union of what the sync read. (The text pipe merges CPUs by
//!   timestamp; the raw pages need not.)
//! - The marker is still written and must come back (on whichever CPU the
//!   writing thread ran): it proves the instance records, as the text path
//!   does, and a sync without it (a full buffer dropped it) falls back on
//!   the lost-event counters.
//! - One window is the ring buffer's, and the text pipe has it too: a CPU
//!   publishes its events when its outermost writer commits, so an event
//!   written from an interrupt that came in while another event was being
//!   written on the same CPU shows up when that write commits
//!   (microseconds later, preemption off).
//! - A CPU brought online after the start: its file is opened at the next
//!   sync, and its buffer is read from its beginning. One taken offline
//!   whose file refuses reads is dropped and opened again when it is back
//!   (its buffer keeps what it recorded).
//!
//! Lost events: the kernel flags a page read after events were overwritten
//! or dropped (`MISSED_EVENTS` in the commit word); that is
//! [`Line::Lost`], as `[LOST n EVENTS]` is in the text. A page that cannot
//! be what the kernel writes is counted and also reported as lost, so the
//! volumes are rescanned.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::format::{page_layout, read_format, Decoder};
use super::parse::Line;
use super::ring::{walk_page, PageError, PageLayout};
use super::{trace_err, MarkerSource};
use crate::AgentError;

/// Counters of the raw reader, for tests and status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RawStats {
    /// Pages read.
    pub pages: u64,
    /// Pages the kernel flagged: events were lost before them.
    pub missed_pages: u64,
    /// Pages that could not be parsed (each made the sync report lost
    /// events).
    pub malformed_pages: u64,
}

/// One CPU's buffer.
struct Cpu {
    n: u32,
    path: PathBuf,
    /// `None` while the CPU is offline (retried at each drain).
    file: Option<File>,
}

/// Reads every CPU's raw buffer of one instance.
pub(super) struct RawReader {
    cpus: Vec<Cpu>,
    layout: PageLayout,
    decoder: Decoder,
    buf: Vec<u8>,
    pub(super) stats: RawStats,
}

impl RawReader {
    /// Open the raw buffers of the instance at `dir`, recording `events`.
    /// `Err` says why the raw files cannot be used (then the text pipe is).
    pub(super) fn open(dir: &Path, events: &[&str]) -> Result<Self, String> {
        if cfg!(not(target_endian = "little")) {
            return Err("the raw pages are decoded as little-endian only".into());
        }
        let events_dir = dir.join("events");
        let header =
            read_format(&events_dir.join("header_page")).ok_or("no readable events/header_page")?;
        let mut layout = page_layout(&header).ok_or("events/header_page is not understood")?;
        // A sub-buffer bigger than a page (`buffer_subbuf_size_kb`) is
        // what one read returns.
        if let Some(kb) = std::fs::read_to_string(dir.join("buffer_subbuf_size_kb"))
            .ok()
            .and_then(|t| t.trim().parse::<usize>().ok())
        {
            layout.page_size = layout.page_size.max(kb.saturating_mul(1024));
        }
        if layout.page_size > super::ring::MAX_PAGE {
            return Err(format!("raw pages of {} bytes", layout.page_size));
        }
        let mut formats = Vec::new();
        for ev in events {
            let path = events_dir.join(ev).join("format");
            if path.exists() {
                formats.push(read_format(&path).ok_or(format!("{} unreadable", path.display()))?);
            }
        }
        let print = read_format(&events_dir.join("ftrace/print/format"))
            .ok_or("no readable events/ftrace/print/format")?;
        let texts: Vec<&str> = formats.iter().map(String::as_str).collect();
        let decoder = Decoder::new(&texts, &print).ok_or("an event's format lacks a field")?;
        let cpus = online_cpus(dir)?;
        Ok(Self {
            buf: vec![0; layout.page_size],
            cpus,
            layout,
            decoder,
            stats: RawStats::default(),
        })
    }

    /// Read every CPU's buffer until it has nothing committed left, giving
    /// each decoded record to `line` (and [`Line::Lost`] for a flagged or
    /// malformed page). An I/O error other than "nothing to read" is
    /// returned.
    pub(super) fn drain(&mut self, mut line: impl FnMut(Line)) -> std::io::Result<()> {
        for i in 0..self.cpus.len() {
            let Some(cpu) = self.cpus.get_mut(i) else {
                continue;
            };
            if cpu.file.is_none() {
                cpu.file = open_raw(&cpu.path).ok();
            }
            let Some(mut file) = cpu.file.take() else {
                continue;
            };
            let r = self.drain_cpu(&mut file, &mut line);
            let Some(cpu) = self.cpus.get_mut(i) else {
                continue;
            };
            match r {
                Ok(()) => cpu.file = Some(file),
                // A CPU taken offline may refuse reads: its file is opened
                // again once it is back.
                Err(_) if !cpu_listed(&online_list(), cpu.n) => {}
                Err(e) => {
                    cpu.file = Some(file);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    fn drain_cpu(&mut self, file: &mut File, line: &mut impl FnMut(Line)) -> std::io::Result<()> {
        loop {
            let n = match file.read(&mut self.buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.stats.pages += 1;
            let page = self.buf.get(..n).unwrap_or_default();
            match read_page(page, &self.layout, &self.decoder, &mut *line) {
                Ok(true) => {
                    self.stats.missed_pages += 1;
                    line(Line::Lost);
                }
                Ok(false) => {}
                Err(e) => {
                    self.stats.malformed_pages += 1;
                    tracing::warn!(cause = %e, "a raw trace page cannot be parsed; rescanning");
                    line(Line::Lost);
                }
            }
        }
    }
}

/// Decode one page, giving each record's line to `line`. Returns whether
/// the kernel flagged lost events before it. The records before an error
/// were given.
pub(super) fn read_page(
    page: &[u8],
    layout: &PageLayout,
    decoder: &Decoder,
    line: &mut impl FnMut(Line),
) -> Result<bool, PageError> {
    let info = walk_page(page, layout, |rec| {
        line(decoder.decode(rec)?);
        Ok(())
    })?;
    Ok(info.missed)
}

/// The instance's per-CPU raw files, open for the CPUs online now.
fn online_cpus(dir: &Path) -> Result<Vec<Cpu>, String> {
    let per_cpu = dir.join("per_cpu");
    let entries = std::fs::read_dir(&per_cpu).map_err(|e| format!("{}: {e}", per_cpu.display()))?;
    let online = online_list();
    let mut cpus = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(n) = name.strip_prefix("cpu").and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let path = e.path().join("trace_pipe_raw");
        let file = match open_raw(&path) {
            Ok(f) => Some(f),
            Err(e) if cpu_listed(&online, n) => {
                return Err(format!("{}: {e}", path.display()));
            }
            Err(_) => None,
        };
        cpus.push(Cpu { n, path, file });
    }
    if cpus.iter().all(|c| c.file.is_none()) {
        return Err(format!("no trace_pipe_raw under {}", per_cpu.display()));
    }
    Ok(cpus)
}

fn open_raw(path: &Path) -> std::io::Result<File> {
    File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
}

/// The CPUs online now, as the kernel lists them (`0-3,5`).
fn online_list() -> String {
    std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap_or_default()
}

/// Whether CPU `n` is in a list like `0-3,5,7-8`.
fn cpu_listed(list: &str, n: u32) -> bool {
    list.trim().split(',').any(|r| {
        let (a, b) = r.split_once('-').unwrap_or((r, r));
        match (a.trim().parse::<u32>(), b.trim().parse::<u32>()) {
            (Ok(a), Ok(b)) => (a..=b).contains(&n),
            _ => false,
        }
    })
}

impl MarkerSource for RawReader {
    /// Drain every CPU.
    fn read_now(&mut self, line: &mut impl FnMut(Line) -> bool) -> Result<bool, AgentError> {
        let mut seen = false;
        self.drain(|l| seen |= line(l))
            .map_err(|e| trace_err(format!("reading trace_pipe_raw: {e}")))?;
        Ok(seen)
    }

    /// Poll on these files wakes at `buffer_percent`, so it is only a
    /// timed wait.
    fn wait(&self) {
        let mut fds: Vec<_> = self
            .cpus
            .iter()
            .filter_map(|c| c.file.as_ref())
            .map(|f| nix::poll::PollFd::new(f.as_fd(), nix::poll::PollFlags::POLLIN))
            .collect();
        let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(10u8));
    }
}

#[cfg(test)]
#[path = "raw_tests.rs"]
mod tests;
