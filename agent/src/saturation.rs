//! Whether the disks under the traced volumes are saturated by their own
//! workload (`--max-lag`, issue 19).
//!
//! The signal is the number of writes the disk had in flight on average
//! (the kernel's write ticks, field 8 of `/sys/dev/block/M:m/stat`: the
//! time each write spent in flight, summed, over wall time). A workload
//! that keeps the disk busy keeps requests queued whatever the disk's
//! speed; %util says only that one request was in flight, which a disk
//! serving many at once reaches long before it is saturated. Writes are
//! what the agent must read back: a workload of reads leaves little to
//! replicate. The agent writes nothing to its volumes, but its reads slow
//! the workload's writes, so it samples only while it waits between
//! points. The average is smoothed over about a second ([`SMOOTHING`]) and
//! the disk counts as saturated from [`SATURATED_QUEUE`] writes.
//!
//! While saturated, the agent defers points within half of `--max-lag`:
//! writes to the same blocks coalesce, and one larger, more sequential
//! read later takes fewer of the foreground's operations than many small
//! ones now (see [`crate::policy::defer_point`]).

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Average writes in flight from which a disk counts as saturated.
pub(crate) const SATURATED_QUEUE: f64 = 2.0;
/// Time constant of the smoothing.
const SMOOTHING: Duration = Duration::from_secs(1);
/// Shortest window worth a sample.
const MIN_WINDOW: Duration = Duration::from_millis(50);

/// The load of the disks under the traced volumes.
#[derive(Debug)]
pub(crate) struct DiskLoad {
    stats: Vec<PathBuf>,
    /// The last sample: when, and the summed write ticks (ms).
    last: Option<(Instant, u64)>,
    /// Smoothed average of writes in flight.
    queue: Option<f64>,
}

impl DiskLoad {
    /// For the devices `(major, minor)` (a partition's own counters where
    /// the volume is one).
    pub(crate) fn new(devices: &[(u32, u32)]) -> Self {
        let mut stats: Vec<PathBuf> = devices
            .iter()
            .map(|(major, minor)| PathBuf::from(format!("/sys/dev/block/{major}:{minor}/stat")))
            .collect();
        stats.sort();
        stats.dedup();
        Self {
            stats,
            last: None,
            queue: None,
        }
    }

    /// Start a new window: what came before (the agent reading, which
    /// slows the workload's writes) is not counted.
    pub(crate) fn restart(&mut self) {
        self.last = self.read().map(|q| (Instant::now(), q));
    }

    /// Take a sample at the end of the window; the smoothed queue.
    pub(crate) fn sample(&mut self) -> Option<f64> {
        let now = Instant::now();
        let Some(q) = self.read() else {
            self.last = None;
            return self.queue;
        };
        match self.last {
            Some((at, before)) if now.duration_since(at) >= MIN_WINDOW => {
                let dt = now.duration_since(at);
                self.queue = Some(smooth(self.queue, in_flight(before, q, dt), dt));
                self.last = Some((now, q));
            }
            Some(_) => {}
            None => self.last = Some((now, q)),
        }
        self.queue
    }

    /// Whether the disks are saturated by their workload.
    pub(crate) fn saturated(&self) -> bool {
        self.queue.is_some_and(|q| q >= SATURATED_QUEUE)
    }

    /// The summed write ticks of the devices; `None` if one cannot be
    /// read (no signal: never saturated).
    fn read(&self) -> Option<u64> {
        if self.stats.is_empty() {
            return None;
        }
        let mut total = 0u64;
        for p in &self.stats {
            let text = std::fs::read_to_string(p).ok()?;
            total = total.saturating_add(write_ticks(&text)?);
        }
        Some(total)
    }
}

/// Field 8 of a block device's `stat`: ms spent by writes in flight,
/// summed over them.
fn write_ticks(stat: &str) -> Option<u64> {
    stat.split_whitespace().nth(7)?.parse().ok()
}

/// Average writes in flight over `dt`, from two write-ticks readings (a
/// counter that went back, as after a device reset, is 0).
fn in_flight(before: u64, now: u64, dt: Duration) -> f64 {
    let ms = dt.as_secs_f64() * 1000.0;
    if ms <= 0.0 {
        return 0.0;
    }
    now.saturating_sub(before) as f64 / ms
}

/// `sample` over a window of `dt` folded into `smoothed`.
fn smooth(smoothed: Option<f64>, sample: f64, dt: Duration) -> f64 {
    let Some(s) = smoothed else {
        return sample;
    };
    let alpha = 1.0 - (-dt.as_secs_f64() / SMOOTHING.as_secs_f64()).exp();
    s + alpha * (sample - s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_ticks_are_the_eighth_field() {
        let stat = "  3142  12 98765  421  27182  31 271828 5000  0  9000 12345 0 0 0 0 7 12\n";
        assert_eq!(write_ticks(stat), Some(5000));
        assert_eq!(write_ticks("1 2 3"), None);
        assert_eq!(write_ticks("1 2 3 4 5 6 7 x"), None);
    }

    #[test]
    fn in_flight_is_queue_time_over_wall_time() {
        let s = Duration::from_secs(1);
        assert_eq!(in_flight(1000, 4000, s), 3.0);
        assert_eq!(in_flight(1000, 1500, s), 0.5);
        // A counter that went back counts nothing.
        assert_eq!(in_flight(4000, 1000, s), 0.0);
        assert_eq!(in_flight(0, 10, Duration::ZERO), 0.0);
    }

    #[test]
    fn smoothing_follows_within_a_few_seconds() {
        let tenth = Duration::from_millis(100);
        assert_eq!(smooth(None, 3.0, tenth), 3.0);
        // One busy tenth of a second after an idle disk: not saturated.
        let s = smooth(Some(0.0), 4.0, tenth);
        assert!(s < SATURATED_QUEUE, "{s}");
        // Busy for two seconds: saturated.
        let mut s = Some(0.0);
        for _ in 0..20 {
            s = Some(smooth(s, 4.0, tenth));
        }
        assert!(s.unwrap() > SATURATED_QUEUE, "{s:?}");
    }

    #[test]
    fn missing_devices_give_no_signal() {
        let mut load = DiskLoad::new(&[(u32::MAX, u32::MAX)]);
        assert_eq!(load.sample(), None);
        assert_eq!(load.sample(), None);
        assert!(!load.saturated());
        let mut none = DiskLoad::new(&[]);
        assert_eq!(none.sample(), None);
    }

    #[test]
    fn a_real_device_is_sampled() {
        // Any block device of this machine: its counters parse.
        let (major, minor) = std::fs::read_dir("/sys/dev/block")
            .expect("/sys/dev/block")
            .filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                let (a, b) = name.split_once(':')?;
                Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?))
            })
            .next()
            .expect("a block device");
        let load = DiskLoad::new(&[(major, minor)]);
        assert!(load.read().is_some(), "{major}:{minor}");
    }
}
