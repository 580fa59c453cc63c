//! A volume's block device as sysfs describes it: the device the trace
//! events name, where the volume starts on it, its write counters, and the
//! blocks a completed request touched.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::{trace_err, Dirty};
use crate::AgentError;

/// A volume's device as the block layer reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Device {
    /// `major << 20 | minor` of the device the events name (the whole disk
    /// for a partition).
    pub dev: u32,
    /// First sector of the volume on that device (a partition's start).
    pub start: u64,
    /// The volume's own `major:minor` (for its write counters).
    pub own: (u32, u32),
}

impl Device {
    /// Resolve the block device at `path`.
    pub fn of(name: &str, path: &Path) -> Result<Self, AgentError> {
        let meta = std::fs::metadata(path).map_err(|e| AgentError::Source {
            volume: name.to_owned(),
            path: path.to_owned(),
            source: e,
        })?;
        if !meta.file_type().is_block_device() {
            return Err(AgentError::Config(format!(
                "--track trace needs a block device; volume {name} ({}) is not one (use --track scan)",
                path.display()
            )));
        }
        Self::of_dev(meta.rdev())
    }

    /// The device `major:minor` encoded in `rdev` (a partition resolved to
    /// its disk and start).
    pub(super) fn of_dev(rdev: u64) -> Result<Self, AgentError> {
        let (major, minor) = (
            nix::sys::stat::major(rdev) as u32,
            nix::sys::stat::minor(rdev) as u32,
        );
        let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
        let (disk, start) = if sys.join("partition").exists() {
            let start = read_u64(&sys.join("start"))?;
            let parent = std::fs::read_to_string(sys.join("../dev"))
                .map_err(|e| trace_err(format!("{}: {e}", sys.join("../dev").display())))?;
            let (ma, mi) = parse_major_minor(parent.trim()).ok_or_else(|| {
                trace_err(format!(
                    "cannot parse the disk of partition {major}:{minor}"
                ))
            })?;
            ((ma, mi), start)
        } else {
            ((major, minor), 0)
        };
        Ok(Self {
            dev: (disk.0 << 20) | disk.1,
            start,
            own: (major, minor),
        })
    }

    /// Completed writes and discards so far: `[write I/Os, write sectors,
    /// discard I/Os, discard sectors]`.
    pub fn write_counters(&self) -> Result<[u64; 4], AgentError> {
        let path = format!("/sys/dev/block/{}:{}/stat", self.own.0, self.own.1);
        let text = std::fs::read_to_string(&path).map_err(|e| trace_err(format!("{path}: {e}")))?;
        let f: Vec<u64> = text
            .split_whitespace()
            .map(|t| t.parse().unwrap_or(0))
            .collect();
        let at = |i: usize| f.get(i).copied().unwrap_or(0);
        Ok([at(4), at(6), at(11), at(13)])
    }
}

fn parse_major_minor(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

fn read_u64(path: &Path) -> Result<u64, AgentError> {
    std::fs::read_to_string(path)
        .map_err(|e| trace_err(format!("{}: {e}", path.display())))?
        .trim()
        .parse()
        .map_err(|e| trace_err(format!("{}: {e}", path.display())))
}

/// A volume as the tracer maps it.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// Its device.
    pub device: Device,
    /// Volume size in bytes.
    pub size: u64,
    /// Block size.
    pub block_size: u32,
}

impl Target {
    /// Mark the blocks (and pages) a completed request of `nr` sectors at
    /// `sector` touched; the bytes of the volume it covered (0: none).
    pub(super) fn mark(&self, dirty: &mut Dirty, sector: u64, nr: u64) -> u64 {
        let end = sector.saturating_add(nr);
        let (lo, hi) = (
            self.device.start,
            self.device.start + self.size.div_ceil(512),
        );
        if nr == 0 || end <= lo || sector >= hi {
            return 0;
        }
        let first = (sector.max(lo) - lo) * 512;
        let last = ((end.min(hi) - lo) * 512).min(self.size.max(1));
        dirty.mark(first, last.max(first + 1));
        last.saturating_sub(first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_the_blocks_a_request_touches() {
        let t = Target {
            device: Device {
                dev: 1,
                start: 2048,
                own: (1, 1),
            },
            size: 1 << 20,
            block_size: 4096,
        };
        let mut s = Dirty::new(4096);
        // Sectors 2048+7 .. 2048+9 straddle blocks 0 and 1 of the partition.
        assert_eq!(t.mark(&mut s, 2055, 2), 1024);
        assert_eq!(s.blocks.iter().collect::<Vec<_>>(), vec![0, 1]);
        // Before the partition, and past its end: nothing.
        assert_eq!(t.mark(&mut s, 0, 2048), 0);
        assert_eq!(t.mark(&mut s, 2048 + 2048, 8), 0);
        // Overlapping the end is clipped to the last block.
        assert_eq!(t.mark(&mut s, 2048 + 2040, 64), 8 * 512);
        assert_eq!(s.blocks.max(), Some(255));
    }

    #[test]
    fn parses_a_major_minor_pair() {
        assert_eq!(parse_major_minor("259:3"), Some((259, 3)));
        assert_eq!(parse_major_minor("259"), None);
        assert_eq!(parse_major_minor("a:3"), None);
    }
}
