//! The final delta, read into memory while the filesystem is frozen.
//!
//! Each volume's planned blocks are read (O_DIRECT from a device, as the
//! scan does) and written at their own offsets into an anonymous memory
//! file (memfd) the size of the volume: blocks not read are holes that take
//! no memory. A block planned as its written pages is read as those pages
//! only (the scan sends them as a partial block and reads nothing else of
//! it). After the thaw, the scan reads that file by its
//! `/proc/self/fd` path exactly as it would read the volume, hashes,
//! compresses and sends. The budget is checked before the first byte is
//! allocated.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;

use crate::scan::AlignedBuf;
use crate::trace::{Plan, PAGE};
use crate::AgentError;
use nix::sys::memfd::{memfd_create, MFdFlags};

/// Largest single read.
const READ_BYTES: u64 = 2 << 20;
/// Most threads reading a volume's delta side by side.
const READERS: usize = 8;
/// Runs from which one more reader is worth its thread.
const RUNS_PER_READER: usize = 16;

/// One volume as the capture sees it.
pub(crate) struct Source {
    pub(crate) name: String,
    pub(crate) path: PathBuf,
    pub(crate) size: u64,
    pub(crate) block_size: u32,
    pub(crate) is_device: bool,
}

/// The captured volumes: a memory file per volume that had something to
/// read. Dropping it frees the memory.
#[derive(Default)]
pub(crate) struct Captured {
    files: Vec<Option<File>>,
    /// Bytes read.
    pub(crate) bytes: u64,
}

impl Captured {
    /// Whether volume `i` was captured.
    pub(crate) fn holds(&self, i: usize) -> bool {
        matches!(self.files.get(i), Some(Some(_)))
    }

    /// Where the scan reads volume `i`: its memory file, or `live`.
    pub(crate) fn path(&self, i: usize, live: &std::path::Path) -> PathBuf {
        match self.files.get(i) {
            Some(Some(f)) => PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd())),
            _ => live.to_owned(),
        }
    }
}

/// The extents `(offset, len)` in bytes a plan reads of a volume of
/// `size` in blocks of `bs`: runs of whole blocks at most `per_read`
/// bytes long, and the written pages of blocks planned as pages.
fn extents(plan: Option<&Plan>, size: u64, bs: u64, per_read: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let blocks = size.div_ceil(bs.max(1));
    match plan {
        Some(Plan::Blocks(list, pages)) => {
            for &b in list.iter().filter(|&&b| b < blocks) {
                let at = b * bs;
                if let Some(p) = pages.get(&b) {
                    for &(first, end) in p.runs() {
                        let len = u64::from(end.saturating_sub(first)) * PAGE;
                        out.push((at + u64::from(first) * PAGE, len));
                    }
                    continue;
                }
                let len = bs.min(size - at);
                match out.last_mut() {
                    Some((o, n)) if *o + *n == at && *n + len <= per_read => *n += len,
                    Some((o, n)) if at < *o + *n => {}
                    _ => out.push((at, len)),
                }
            }
        }
        Some(Plan::Full(_)) | None => {
            let step = per_read.max(bs) / bs.max(1) * bs.max(1);
            let mut at = 0;
            while at < size {
                let n = step.min(size - at);
                out.push((at, n));
                at += n;
            }
        }
    }
    out
}

/// Bytes the plans read of the volumes (every volume in full without plans).
pub(crate) fn delta_bytes(vols: &[Source], plans: Option<&[Plan]>) -> u64 {
    vols.iter()
        .enumerate()
        .map(|(i, v)| {
            extents(
                plans.and_then(|p| p.get(i)),
                v.size,
                u64::from(v.block_size),
                u64::MAX,
            )
            .iter()
            .map(|e| e.1)
            .fold(0u64, u64::saturating_add)
        })
        .fold(0u64, u64::saturating_add)
}

/// Read what `plans` says of every volume into memory (blocking). The
/// caller checked the budget with [`delta_bytes`]. `None` if the memory
/// could not be had (the kernel refused a memory file or its pages): the
/// caller then reads live, as for a delta over the budget. A volume that
/// cannot be read is an error.
pub(crate) fn capture(
    vols: &[Source],
    plans: Option<&[Plan]>,
) -> Result<Option<Captured>, AgentError> {
    match capture_all(vols, plans) {
        Ok(c) => Ok(Some(c)),
        Err(Failed::Memory(e)) => {
            tracing::warn!(cause = %e, "no memory for the frozen delta; it is read live and the point is fuzzy");
            Ok(None)
        }
        Err(Failed::Source(e)) => Err(e),
    }
}

/// Why a capture failed.
enum Failed {
    /// The memory file: not the volume's fault.
    Memory(std::io::Error),
    Source(AgentError),
}

fn capture_all(vols: &[Source], plans: Option<&[Plan]>) -> Result<Captured, Failed> {
    let mut out = Captured::default();
    for (i, v) in vols.iter().enumerate() {
        let bs = u64::from(v.block_size);
        let per_read = (READ_BYTES / bs).max(1) * bs;
        let runs = extents(plans.and_then(|p| p.get(i)), v.size, bs, per_read);
        if runs.is_empty() {
            out.files.push(None);
            continue;
        }
        let src_err = |e| {
            Failed::Source(AgentError::Source {
                volume: v.name.clone(),
                path: v.path.clone(),
                source: e,
            })
        };
        let src = if v.is_device {
            File::options()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(&v.path)
        } else {
            File::open(&v.path)
        }
        .map_err(src_err)?;
        let mem = memory_file(v.size).map_err(Failed::Memory)?;
        out.bytes += copy_runs(&src, &mem, &runs, per_read).map_err(|e| match e {
            Copy::Read(e) => src_err(e),
            Copy::Write(e) => Failed::Memory(e),
            Copy::Internal(m) => Failed::Source(AgentError::Internal(m)),
        })?;
        out.files.push(Some(mem));
    }
    metrics::counter!("pilotlight_agent_bytes_read_total").increment(out.bytes);
    Ok(out)
}

/// Why copying runs failed.
enum Copy {
    Read(std::io::Error),
    Write(std::io::Error),
    Internal(String),
}

/// Copy `runs` (each at most `per_read` bytes) from `src` to the same
/// offsets of `mem`, with up to [`READERS`] threads: a frozen delta of
/// written pages is many small reads, and the device serves them faster
/// side by side than one at a time. Returns the bytes copied.
fn copy_runs(src: &File, mem: &File, runs: &[(u64, u64)], per_read: u64) -> Result<u64, Copy> {
    let threads = runs.len().div_ceil(RUNS_PER_READER).clamp(1, READERS);
    let copy = |share: usize| -> Result<u64, Copy> {
        let mut buf = AlignedBuf::new(per_read as usize);
        let mut bytes = 0;
        for &(offset, len) in runs.iter().skip(share).step_by(threads) {
            let data = buf
                .get_mut(len as usize)
                .filter(|d| d.len() as u64 == len)
                .ok_or_else(|| Copy::Internal("capture larger than its buffer".into()))?;
            src.read_exact_at(data, offset).map_err(Copy::Read)?;
            mem.write_all_at(data, offset).map_err(Copy::Write)?;
            bytes += len;
        }
        Ok(bytes)
    };
    if threads == 1 {
        return copy(0);
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads).map(|i| s.spawn(move || copy(i))).collect();
        let mut total = 0;
        let mut failed = None;
        for h in handles {
            match h.join() {
                Ok(Ok(n)) => total += n,
                Ok(Err(e)) => failed = failed.or(Some(e)),
                Err(_) => {
                    failed = failed.or(Some(Copy::Internal("capture reader panicked".into())))
                }
            }
        }
        failed.map_or(Ok(total), Err)
    })
}

/// An anonymous memory file of `size` bytes, all holes.
fn memory_file(size: u64) -> std::io::Result<File> {
    let fd = memfd_create("pilotlight-frozen-delta", MFdFlags::MFD_CLOEXEC)?;
    let f = File::from(fd);
    f.set_len(size)?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::RescanReason;

    fn blocks(list: &[u64]) -> Plan {
        Plan::Blocks(list.to_vec(), Default::default())
    }

    #[test]
    fn extents_join_consecutive_blocks_up_to_a_read() {
        const K: u64 = 4096;
        let plan = blocks(&[0, 1, 2, 5, 6, 9, 20]);
        assert_eq!(
            extents(Some(&plan), 10 * K, K, 2 * K),
            vec![(0, 2 * K), (2 * K, K), (5 * K, 2 * K), (9 * K, K)]
        );
        assert_eq!(
            extents(None, 5 * K, K, 2 * K),
            vec![(0, 2 * K), (2 * K, 2 * K), (4 * K, K)]
        );
        let full = Plan::Full(RescanReason::LostEvents);
        assert_eq!(extents(Some(&full), 3 * K, K, 8 * K), vec![(0, 3 * K)]);
        assert!(extents(Some(&blocks(&[])), 3 * K, K, 8 * K).is_empty());
    }

    #[test]
    fn blocks_planned_as_pages_read_their_pages_only() {
        let bs = 64 << 10;
        let mut pages = std::collections::BTreeMap::new();
        pages.insert(1u64, crate::trace::Pages::one(2, 4));
        let plan = Plan::Blocks(vec![0, 1, 2], pages);
        assert_eq!(
            extents(Some(&plan), 4 * bs, bs, 1 << 20),
            vec![(0, bs), (bs + 2 * PAGE, 2 * PAGE), (2 * bs, bs)]
        );
    }

    fn source(path: PathBuf, size: u64) -> Source {
        Source {
            name: "v".into(),
            path,
            size,
            block_size: 4096,
            is_device: false,
        }
    }

    #[test]
    fn delta_bytes_count_the_short_last_block() {
        let v = [source(PathBuf::from("/x"), 3 * 4096 + 100)];
        assert_eq!(delta_bytes(&v, None), 3 * 4096 + 100);
        let plans = [blocks(&[1, 3])];
        assert_eq!(delta_bytes(&v, Some(&plans)), 4096 + 100);
    }

    #[test]
    fn the_captured_blocks_read_back_from_the_memory_file() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("v.img");
        let data: Vec<u8> = (0..4 * 4096u32).map(|i| (i / 4096 + 1) as u8).collect();
        std::fs::write(&img, &data).unwrap();
        let vols = [source(img.clone(), data.len() as u64)];
        let plans = [blocks(&[1, 3])];
        let c = capture(&vols, Some(&plans)).unwrap().unwrap();
        assert_eq!(c.bytes, 2 * 4096);
        // The volume changes after the capture: the memory file does not.
        std::fs::write(&img, vec![9u8; data.len()]).unwrap();
        let back = std::fs::read(c.path(0, &img)).unwrap();
        assert_eq!(back.len(), data.len());
        assert_eq!(&back[4096..8192], &data[4096..8192]);
        assert_eq!(&back[3 * 4096..], &data[3 * 4096..]);
        assert!(back[..4096].iter().all(|&b| b == 0), "not captured: a hole");
    }
}
