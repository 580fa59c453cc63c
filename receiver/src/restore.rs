//! Restore a point of a volume to a file or a block device, checking every
//! block's BLAKE3 as it is written. How the target is opened and put in
//! place (no symlink followed, no file clobbered without `--force`, no
//! mounted device written) is in `restore/target.rs`.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use pilotlight_protocol::limits::{block_count, block_len};
use pilotlight_protocol::BlockHash;

use crate::catalog::{PointInfo, PointVolumeInfo};
use crate::pack::BlockLoc;
use crate::store::{BlockFetcher, Store};
use crate::ReceiveError;

mod target;

use target::Target;

/// Which point to restore.
#[derive(Debug, Clone, Copy)]
pub enum PointSel {
    /// A point by id.
    Id(i64),
    /// The latest point created at or before this time (ms since the epoch).
    At(i64),
    /// The newest point.
    Latest,
}

/// What to restore, and where.
#[derive(Debug, Clone)]
pub struct RestoreRequest {
    /// Server name.
    pub server: String,
    /// Volume name.
    pub volume: String,
    /// Which point.
    pub point: PointSel,
    /// Target file or block device.
    pub to: PathBuf,
    /// Overwrite an existing target.
    pub force: bool,
    /// Show a progress bar (only if stderr is a terminal).
    pub progress: bool,
}

/// What a restore did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoreReport {
    /// The restored point.
    pub point: i64,
    /// Bytes of the volume.
    pub size: u64,
    /// Blocks written with data.
    pub blocks_written: u64,
}

/// Find a point of `server` by selector; errors name what is missing.
pub fn resolve_point(
    store: &Store,
    server: &str,
    sel: PointSel,
) -> Result<PointInfo, ReceiveError> {
    let cat = store.catalog()?;
    cat.require_server(server)?;
    let points = cat.points(Some(server))?;
    if let PointSel::Id(id) = sel {
        if !points.iter().any(|p| p.id == id) {
            cat.refuse_in_progress(server, id)?;
        }
    }
    let found = match sel {
        PointSel::Id(id) => points.into_iter().find(|p| p.id == id),
        PointSel::At(ms) => points.into_iter().rfind(|p| p.created_ms <= ms),
        PointSel::Latest => points.into_iter().next_back(),
    };
    found.ok_or_else(|| match sel {
        PointSel::Id(id) => ReceiveError::NotFound(format!("server {server} has no point {id}")),
        PointSel::At(ms) => ReceiveError::NotFound(format!(
            "server {server} has no point at or before {}",
            pilotlight_protocol::clock::rfc3339(ms)
        )),
        PointSel::Latest => ReceiveError::NotFound(format!("server {server} has no points yet")),
    })
}

/// A block of a volume at a point: index, and hash and location unless zero.
pub type PointBlock = (u64, Option<(BlockHash, BlockLoc)>);

/// The data blocks of a volume at the point whose catalog key is `point`
/// ([`PointInfo::key`]): `(index, hash, location)`.
pub fn point_blocks(
    store: &Store,
    vol: &PointVolumeInfo,
    point: i64,
) -> Result<Vec<PointBlock>, ReceiveError> {
    let map = store.catalog()?.block_map(vol.volume_id, point, 0)?;
    let mut locs: HashMap<BlockHash, BlockLoc> = HashMap::new();
    let cat = store.catalog()?;
    let mut out = Vec::with_capacity(map.len());
    for (index, hash) in map {
        if block_len(vol.size, vol.block_size, index) == 0 {
            continue;
        }
        let entry = match hash {
            None => None,
            Some(h) => {
                let loc = match locs.get(&h) {
                    Some(l) => *l,
                    None => {
                        let l = cat.block(&h)?.ok_or_else(|| {
                            ReceiveError::Corrupt(format!(
                                "block {} of point {point} is not stored",
                                h.to_hex()
                            ))
                        })?;
                        locs.insert(h, l);
                        l
                    }
                };
                Some((h, loc))
            }
        };
        out.push((index, entry));
    }
    Ok(out)
}

/// Restore one volume of one point.
pub fn restore(dir: &Path, req: &RestoreRequest) -> Result<RestoreReport, ReceiveError> {
    let store = Store::open(dir)?;
    let point = resolve_point(&store, &req.server, req.point)?;
    let vol = requested_volume(&store, &point, req)?;
    let blocks = point_blocks(&store, &vol, point.key)?;
    let target = Target::open(&req.to, req.force, &vol.name, vol.size)?;
    let work = work(blocks, &vol, target.is_device);

    let bar = progress_bar(req.progress, vol.size);
    let result = write_blocks(dir, &store, &vol, &work, &target, bar.as_ref());
    let written = match result {
        Ok(n) => n,
        Err(e) => {
            target.abandon();
            return Err(e);
        }
    };
    target.finish()?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(RestoreReport {
        point: point.id,
        size: vol.size,
        blocks_written: written,
    })
}

/// The volume `req` names in `point`; the error says whether the server has
/// no such volume at all or only not in this point.
fn requested_volume(
    store: &Store,
    point: &PointInfo,
    req: &RestoreRequest,
) -> Result<PointVolumeInfo, ReceiveError> {
    point_volume(store, point, &req.server, &req.volume)
}

/// The volume `volume` of `server` in `point`; the error says whether the
/// server has no such volume at all or only not in this point.
pub(crate) fn point_volume(
    store: &Store,
    point: &PointInfo,
    server: &str,
    volume: &str,
) -> Result<PointVolumeInfo, ReceiveError> {
    if let Some(vol) = point.volumes.iter().find(|v| v.name == volume) {
        return Ok(vol.clone());
    }
    let cat = store.catalog()?;
    let known = cat
        .server(server)?
        .map(|s| cat.volume(s.id, volume))
        .transpose()?
        .flatten();
    Err(ReceiveError::NotFound(match known {
        Some(_) => format!(
            "volume {volume} is not part of point {} of server {server}",
            point.id
        ),
        None => format!("server {server} has no volume named {volume}"),
    }))
}

/// The blocks to write: every data block; on a device also every zero
/// block, since the device's old content must not show through.
fn work(blocks: Vec<PointBlock>, vol: &PointVolumeInfo, is_device: bool) -> Vec<PointBlock> {
    if !is_device {
        return blocks.into_iter().filter(|(_, e)| e.is_some()).collect();
    }
    let mut work: Vec<PointBlock> = Vec::new();
    let mut it = blocks.into_iter().peekable();
    for i in 0..block_count(vol.size, vol.block_size) {
        match it.peek() {
            Some((idx, _)) if *idx == i => work.extend(it.next()),
            _ => work.push((i, None)),
        }
    }
    work
}

/// Write `work` to the target on a few threads, each fetching and checking
/// its blocks; returns the number of data blocks written.
fn write_blocks(
    dir: &Path,
    store: &Store,
    vol: &PointVolumeInfo,
    work: &[PointBlock],
    target: &Target,
    bar: Option<&indicatif::ProgressBar>,
) -> Result<u64, ReceiveError> {
    let next = AtomicUsize::new(0);
    let written = AtomicU64::new(0);
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(8);
    let chunk = 64usize;
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| -> Result<(), ReceiveError> {
                    let mut fetch = BlockFetcher::new(dir)?;
                    let mut buf = Vec::new();
                    let zeros = vec![0u8; vol.block_size as usize];
                    loop {
                        let start = next.fetch_add(chunk, Ordering::Relaxed);
                        let Some(items) = work.get(start..(start + chunk).min(work.len())) else {
                            break;
                        };
                        if items.is_empty() {
                            break;
                        }
                        for (index, entry) in items {
                            let offset = index * u64::from(vol.block_size);
                            let len = block_len(vol.size, vol.block_size, *index) as usize;
                            let data: &[u8] = match entry {
                                Some((h, loc)) => {
                                    fetch.fetch_current(store, loc, h, &mut buf).map_err(|e| {
                                        ReceiveError::Corrupt(format!(
                                            "block {index} of volume {}: {e}",
                                            vol.name
                                        ))
                                    })?;
                                    written.fetch_add(1, Ordering::Relaxed);
                                    &buf
                                }
                                None => zeros.get(..len).unwrap_or(&zeros),
                            };
                            target
                                .file
                                .write_all_at(data, offset)
                                .map_err(|e| ReceiveError::storage(&target.path, e))?;
                            if let Some(b) = bar {
                                b.inc(len as u64);
                            }
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        let mut first = Ok(());
        for h in handles {
            let r = h.join().unwrap_or_else(|_| {
                Err(ReceiveError::Internal("a restore worker panicked".into()))
            });
            if first.is_ok() {
                first = r;
            }
        }
        first
    })?;
    Ok(written.into_inner())
}

/// A byte progress bar on stderr, only when asked for and stderr is a terminal.
pub fn progress_bar(wanted: bool, total: u64) -> Option<indicatif::ProgressBar> {
    if !wanted || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
    ) {
        bar.set_style(style);
    }
    Some(bar)
}
