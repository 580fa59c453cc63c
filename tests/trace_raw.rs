//! The tracer's raw reader (`per_cpu/cpuN/trace_pipe_raw`) on a real loop
//! device: under fio's 4 KiB random writes it reports exactly the blocks
//! fio wrote, as the text reader of another instance does for the same
//! writes, and a buffer too small for a burst is reported as lost, through
//! the kernel's flag in the raw pages. They need root, loop devices, tracefs
//! and fio, so they are `#[ignore]`d with that reason.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use pilotlight::tracing_agent::require_tracing;
use pilotlight::{require_tools, Deadline, LoopDevice};
use pilotlight_agent::trace::{Device, EventSource, ReaderKind, Target, Tracer};

const MIB: u64 = 1 << 20;
const BLOCK: u32 = 4096;

fn target(dev: &LoopDevice, size: u64) -> Target {
    Target {
        device: Device::of("vol", &dev.path).unwrap(),
        size,
        block_size: BLOCK,
    }
}

/// fio writing `io_mib` MiB of 4 KiB random writes (O_DIRECT) over the
/// first `span_mib` MiB of `dev` at `rate` (e.g. "8m", "" for no limit),
/// logging each I/O to `log`.
fn fio(dev: &Path, span_mib: u64, io_mib: u64, rate: &str, log: &Path) -> Child {
    let rate = if rate.is_empty() {
        String::from("--rate=0")
    } else {
        format!("--rate={rate}")
    };
    Command::new("fio")
        .args([
            "--name=raw",
            "--rw=randwrite",
            "--bs=4k",
            "--direct=1",
            "--ioengine=psync",
            "--randrepeat=0",
            &format!("--filename={}", dev.display()),
            &format!("--size={span_mib}M"),
            &format!("--io_size={io_mib}M"),
            &format!("--write_iolog={}", log.display()),
            &rate,
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

/// The 4 KiB blocks fio's I/O log says it wrote.
fn logged_blocks(log: &Path) -> BTreeSet<u64> {
    let text = std::fs::read_to_string(log).unwrap();
    let mut blocks = BTreeSet::new();
    for line in text.lines() {
        let t: Vec<&str> = line.split_whitespace().collect();
        let Some(i) = t.iter().position(|w| *w == "write") else {
            continue;
        };
        let off: u64 = t[i + 1].parse().unwrap();
        let len: u64 = t[i + 2].parse().unwrap();
        let b = u64::from(BLOCK);
        blocks.extend(off / b..(off + len).div_ceil(b));
    }
    blocks
}

/// Sync `t` and add what it took to `into`; panics on lost events.
fn collect(t: &mut Tracer, into: &mut BTreeSet<u64>) {
    assert!(!t.sync().unwrap(), "events lost ({:?})", t.reader_kind());
    into.extend(t.take(0).dirty.blocks.iter());
}

#[test]
#[ignore = "needs root, loop devices, tracefs and fio"]
fn the_raw_reader_reports_every_block_fio_wrote_as_the_text_reader_does() {
    require_tracing();
    require_tools(&["fio"]);
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("disk.img");
    let size = 256 * MIB;
    std::fs::File::create(&img).unwrap().set_len(size).unwrap();
    let dev = LoopDevice::attach(&img);
    let mut raw = Tracer::start_with(vec![target(&dev, size)], 4096, ReaderKind::Raw).unwrap();
    assert_eq!(
        raw.reader_kind(),
        ReaderKind::Raw,
        "the raw files are there"
    );
    let mut text = Tracer::start_with(vec![target(&dev, size)], 4096, ReaderKind::Text).unwrap();
    assert_eq!(text.reader_kind(), ReaderKind::Text);

    let log = tmp.path().join("fio.log");
    // About 3 s of writes, so that many syncs fall while they go on.
    let mut child = fio(&dev.path, 128, 24, "8m", &log);
    let (mut by_raw, mut by_text) = (BTreeSet::new(), BTreeSet::new());
    // Sync both while fio writes: pages the kernel is still filling are
    // read, then read on from where the last read stopped.
    let deadline = Deadline::after(Duration::from_secs(300)).every(Duration::from_millis(20));
    let mut syncs = 0;
    while child.try_wait().unwrap().is_none() {
        collect(&mut raw, &mut by_raw);
        collect(&mut text, &mut by_text);
        syncs += 1;
        deadline.next_blocking(|| "fio did not finish within 300 s".into());
    }
    assert!(child.wait().unwrap().success());
    collect(&mut raw, &mut by_raw);
    collect(&mut text, &mut by_text);

    let wrote = logged_blocks(&log);
    assert!(wrote.len() > 4000, "fio wrote {} blocks", wrote.len());
    assert!(syncs > 20, "only {syncs} syncs during the writes");
    assert_eq!(by_raw.len(), wrote.len());
    assert!(by_raw == wrote, "the raw reader's blocks differ from fio's");
    assert!(by_raw == by_text, "the raw and text readers differ");
    // Every event once: as many read through the pages as through the text.
    assert_eq!(raw.write_events(), text.write_events());
    assert!(raw.write_events() >= wrote.len() as u64);
    let stats = raw.raw_stats().unwrap();
    assert!(stats.pages > 0);
    assert_eq!((stats.missed_pages, stats.malformed_pages), (0, 0));
}

#[test]
#[ignore = "needs root, loop devices, tracefs and fio"]
fn an_overflow_of_the_raw_buffer_is_reported_as_lost() {
    require_tracing();
    require_tools(&["fio"]);
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("disk.img");
    let size = 64 * MIB;
    std::fs::File::create(&img).unwrap().set_len(size).unwrap();
    let dev = LoopDevice::attach(&img);
    // The smallest buffer (a page or two per CPU), then a burst of writes
    // with no sync between.
    let mut raw = Tracer::start_with(vec![target(&dev, size)], 1, ReaderKind::Raw).unwrap();
    assert_eq!(raw.reader_kind(), ReaderKind::Raw);
    assert!(!raw.sync().unwrap());
    let log = tmp.path().join("fio.log");
    assert!(fio(&dev.path, 64, 8, "", &log).wait().unwrap().success());
    assert!(
        raw.sync().unwrap(),
        "a burst of 2048 writes into one page was not reported as lost"
    );
    let stats = raw.raw_stats().unwrap();
    assert!(
        stats.missed_pages > 0,
        "the raw pages did not carry the kernel's missed-events flag: {stats:?}"
    );
    assert_eq!(stats.malformed_pages, 0);
    // Reported once: the next sync, with nothing written, is clean.
    let again = raw.sync().unwrap();
    assert!(!again, "lost again: {:?} then {:?}", stats, raw.raw_stats());
}

/// CPU time (user + system, in clock ticks) of the calling thread: a
/// reader's `read` calls (the kernel formatting text, or copying pages)
/// and its parsing both land there.
fn thread_cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat(5), counted from the state (field 3).
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// The text and the raw reader on two instances recording the same fio
/// writes (libaio, iodepth 4, `RATE` MB/s, default 20, for `SECS` s,
/// default 5), each synced every 100 ms on a thread of its own: both see
/// the same blocks. And a measurement (`--nocapture` prints it): each
/// thread's CPU time per MB written; BENCHMARKS.md has it with `SECS=20`
/// and a release build. No speed is asserted here.
#[test]
#[ignore = "needs root, loop devices, tracefs and fio"]
fn both_readers_see_the_same_blocks_and_their_cpu_per_mb() {
    require_tracing();
    require_tools(&["fio"]);
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (rate, secs) = (env("RATE", 20), env("SECS", 5));
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("disk.img");
    let size = 512 * MIB;
    std::fs::File::create(&img).unwrap().set_len(size).unwrap();
    let dev = LoopDevice::attach(&img);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = [ReaderKind::Text, ReaderKind::Raw]
        .into_iter()
        .map(|kind| {
            let mut t = Tracer::start_with(vec![target(&dev, size)], 4096, kind).unwrap();
            assert_eq!(t.reader_kind(), kind);
            let done = done.clone();
            std::thread::spawn(move || {
                let c0 = thread_cpu_ticks();
                let mut blocks = BTreeSet::new();
                let pace =
                    Deadline::after(Duration::from_secs(3600)).every(Duration::from_millis(100));
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    collect(&mut t, &mut blocks);
                    pace.next_blocking(|| "an hour".into());
                }
                collect(&mut t, &mut blocks);
                let ticks = thread_cpu_ticks() - c0;
                (kind, ticks, blocks)
            })
        })
        .collect();
    let out = Command::new("fio")
        .args([
            "--name=measure",
            "--rw=randwrite",
            "--bs=4k",
            "--direct=1",
            "--ioengine=libaio",
            "--iodepth=4",
            "--time_based",
            &format!("--runtime={secs}"),
            &format!("--rate={rate}m"),
            &format!("--filename={}", dev.path.display()),
            "--size=256M",
        ])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(out.success());
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let tick = 10.0; // ms per clock tick (USER_HZ 100)
    let mb = (rate * secs) as f64;
    let mut seen: Vec<BTreeSet<u64>> = Vec::new();
    for r in readers {
        let (kind, ticks, blocks) = r.join().unwrap();
        println!(
            "{kind:?}: {:.0} ms CPU for ~{mb:.0} MB written ({} blocks): {:.2} ms per MB",
            ticks as f64 * tick,
            blocks.len(),
            ticks as f64 * tick / mb
        );
        seen.push(blocks);
    }
    assert!(
        seen[0] == seen[1],
        "the text and raw readers saw different blocks"
    );
    assert!(
        seen[0].len() > 1000,
        "only {} blocks written",
        seen[0].len()
    );
}
