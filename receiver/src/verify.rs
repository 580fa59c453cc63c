//! Verify: re-read, decompress and re-hash every block that the selected
//! points need, and name every damaged point, volume and block.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use pilotlight_protocol::BlockHash;

use crate::pack::BlockLoc;
use crate::restore::point_blocks;
use crate::store::{BlockFetcher, Store};
use crate::ReceiveError;

/// One damaged block of one point.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Damage {
    /// Point id.
    pub point: i64,
    /// Server name.
    pub server: String,
    /// Volume name.
    pub volume: String,
    /// Block index.
    pub block: u64,
    /// Expected BLAKE3 (hex).
    pub hash: String,
    /// What is wrong.
    pub error: String,
}

/// The result of a verify run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VerifyReport {
    /// True when nothing is damaged.
    pub ok: bool,
    /// Points checked.
    pub points_checked: usize,
    /// Distinct stored blocks read and re-hashed.
    pub blocks_checked: usize,
    /// Every damaged block, by point and volume.
    pub damaged: Vec<Damage>,
}

/// Verify the points of `server` (or all), or just `point`.
pub fn verify(
    dir: &Path,
    server: Option<&str>,
    point: Option<i64>,
    progress: bool,
) -> Result<VerifyReport, ReceiveError> {
    let store = Store::open(dir)?;
    if let Some(s) = server {
        store.catalog()?.require_server(s)?;
    }
    if let (Some(id), None) = (point, server) {
        return Err(ReceiveError::Refused(format!(
            "point {id} of which server? Point ids are numbered per server"
        )));
    }
    let points: Vec<_> = store
        .catalog()?
        .points(server)?
        .into_iter()
        .filter(|p| point.is_none_or(|id| p.id == id))
        .collect();
    if let (Some(id), true) = (point, points.is_empty()) {
        if let Some(s) = server {
            store.catalog()?.refuse_in_progress(s, id)?;
        }
        return Err(ReceiveError::NotFound(format!(
            "there is no point {id}{}",
            server
                .map(|s| format!(" of server {s}"))
                .unwrap_or_default()
        )));
    }
    // Which (point, volume, block) need which stored block.
    let mut needs: Vec<(usize, usize, u64, BlockHash)> = Vec::new();
    let mut distinct: HashMap<BlockHash, BlockLoc> = HashMap::new();
    for (pi, p) in points.iter().enumerate() {
        for (vi, v) in p.volumes.iter().enumerate() {
            for (index, entry) in point_blocks(&store, v, p.key)? {
                if let Some((h, loc)) = entry {
                    needs.push((pi, vi, index, h));
                    distinct.insert(h, loc);
                }
            }
        }
    }
    let list: Vec<(BlockHash, BlockLoc)> = distinct.into_iter().collect();
    crate::objstore::cache::reachable_for(dir, list.iter().map(|(_, l)| l.pack))?;
    let bad: Mutex<HashMap<BlockHash, String>> = Mutex::new(HashMap::new());
    let next = AtomicUsize::new(0);
    let bar = crate::restore::progress_bar(progress, list.len() as u64);
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(8);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                let Ok(mut fetch) = BlockFetcher::new(dir) else {
                    return;
                };
                let mut buf = Vec::new();
                while let Some((h, loc)) = list.get(next.fetch_add(1, Ordering::Relaxed)) {
                    if let Err(e) = fetch.fetch_current(&store, loc, h, &mut buf) {
                        if let Ok(mut b) = bad.lock() {
                            b.insert(*h, e.to_string());
                        }
                    }
                    if let Some(b) = &bar {
                        b.inc(1);
                    }
                }
            });
        }
    });
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let bad = bad
        .into_inner()
        .map_err(|_| ReceiveError::poisoned("verify"))?;
    let mut damaged = Vec::new();
    for (pi, vi, index, h) in needs {
        if let Some(err) = bad.get(&h) {
            let (Some(p), Some(v)) = (
                points.get(pi),
                points.get(pi).and_then(|p| p.volumes.get(vi)),
            ) else {
                continue;
            };
            damaged.push(Damage {
                point: p.id,
                server: p.server.clone(),
                volume: v.name.clone(),
                block: index,
                hash: h.to_hex(),
                error: err.clone(),
            });
        }
    }
    Ok(VerifyReport {
        ok: damaged.is_empty(),
        points_checked: points.len(),
        blocks_checked: list.len(),
        damaged,
    })
}
