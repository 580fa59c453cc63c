//! The local packs as a bounded cache of the bucket: packs already uploaded
//! are evicted past the budget (`[store] cache`), and a read that finds no
//! local pack (restore, export, verify, failback, GC) downloads and opens
//! its segments into the pack file first, each by ranged reads in parallel.

use std::collections::HashSet;
use std::path::Path;

use futures_util::StreamExt;
use object_store::ObjectStoreExt;

use super::client::{classify, segment_name};
use super::crypto::{Opener, SealHeader, SEAL_HEADER_LEN, TAG_LEN};
use super::{Offsite, OffsiteError};
use crate::pack::{pack_path, parse_pack_name};

/// Bytes of a segment one ranged read asks for.
const FETCH_RANGE: u64 = 8 << 20;
/// Ranged reads of one segment in flight at once.
const RANGES_IN_FLIGHT: usize = 4;

impl Offsite {
    /// Bring pack `pack` back from the bucket into the local directory.
    /// Blocking; one fill at a time (a pack another reader just brought
    /// back is not fetched again).
    pub fn fetch_pack(&self, pack: u64) -> Result<(), OffsiteError> {
        let _one = self.fill.lock().map_err(|_| OffsiteError::Cancelled)?;
        let path = pack_path(&self.dir, pack);
        if path.exists() {
            return Ok(());
        }
        let segs = self.block_on(async {
            self.segments_listed().await?;
            Ok::<_, OffsiteError>(self.segments_of(pack))
        })?;
        if segs.is_empty() {
            return Err(OffsiteError::Missing(format!("packs/{pack:010}/")));
        }
        let tmp = self
            .dir
            .join("packs")
            .join(format!(".fetch-{pack:010}.tmp"));
        let filled = self.fill_file(pack, &segs, &tmp);
        if filled.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        let len = filled?;
        std::fs::rename(&tmp, &path).map_err(|e| OffsiteError::local(&path, e))?;
        metrics::counter!("pilotlight_receiver_cache_fills_total").increment(1);
        tracing::info!(pack, bytes = len, "pack brought back from the object store");
        Ok(())
    }

    /// Write the segments of `pack`, chained from 0, opened, into `tmp`;
    /// returns the length.
    fn fill_file(
        &self,
        pack: u64,
        segs: &std::collections::BTreeMap<u64, u64>,
        tmp: &Path,
    ) -> Result<u64, OffsiteError> {
        let file = std::fs::File::create(tmp).map_err(|e| OffsiteError::local(tmp, e))?;
        let mut at = 0;
        while let Some(&end) = segs.get(&at) {
            let name = segment_name(pack, at, end);
            self.block_on(self.fetch_segment(&name, end - at, &file, at, tmp))?;
            at = end;
        }
        file.sync_all().map_err(|e| OffsiteError::local(tmp, e))?;
        Ok(at)
    }

    /// Download the segment `name` (`plain_len` bytes once opened) by
    /// ranges of about [`FETCH_RANGE`], [`RANGES_IN_FLIGHT`] at a time,
    /// open each chunk and write it at `base` + its offset in `file`. The
    /// caller is a blocking thread (the writes are `pwrite`s).
    async fn fetch_segment(
        &self,
        name: &str,
        plain_len: u64,
        file: &std::fs::File,
        base: u64,
        tmp: &Path,
    ) -> Result<(), OffsiteError> {
        use futures_util::TryStreamExt;
        use std::os::unix::fs::FileExt;
        let path = self.url.path(name);
        let err = |e| classify(&self.url, name, e);
        let head = self
            .client
            .get_range(&path, 0..SEAL_HEADER_LEN as u64)
            .await
            .map_err(err)?;
        let header = SealHeader::parse(name, &head)?;
        let chunk = header.chunk_len as u64;
        let chunks = plain_len.div_ceil(chunk).max(1);
        let per = (FETCH_RANGE / chunk).max(1);
        // Sealed offset of chunk `i` (every chunk before it is whole).
        let at = |i: u64| SEAL_HEADER_LEN as u64 + i * (chunk + TAG_LEN as u64);
        let plain_of = |i: u64| chunk.min(plain_len - i * chunk);
        let ranges = (0..chunks).step_by(per as usize).map(|first| {
            let end = (first + per).min(chunks);
            let sealed_end = at(end - 1) + plain_of(end - 1) + TAG_LEN as u64;
            let path = &path;
            async move {
                let bytes = self
                    .client
                    .get_range(path, at(first)..sealed_end)
                    .await
                    .map_err(err)?;
                if bytes.len() as u64 != sealed_end - at(first) {
                    return Err(OffsiteError::Damaged {
                        object: name.to_owned(),
                        why: "it is shorter than its name says",
                    });
                }
                let mut plain = Vec::with_capacity((end - first) as usize * chunk as usize);
                let mut off = 0usize;
                for i in first..end {
                    let n = (plain_of(i) + TAG_LEN as u64) as usize;
                    let sealed = bytes.get(off..off + n).unwrap_or_default();
                    let index = u32::try_from(i).map_err(|_| OffsiteError::TooLarge)?;
                    header.open_chunk(
                        &self.key,
                        name,
                        index,
                        i + 1 == chunks,
                        sealed,
                        &mut plain,
                    )?;
                    off += n;
                }
                file.write_all_at(&plain, base + first * chunk)
                    .map_err(|e| OffsiteError::local(tmp, e))
            }
        });
        futures_util::stream::iter(ranges)
            .buffer_unordered(RANGES_IN_FLIGHT)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    /// Download and open the object `name`.
    pub(super) async fn download(&self, name: &str) -> Result<Vec<u8>, OffsiteError> {
        let r = self
            .client
            .get(&self.url.path(name))
            .await
            .map_err(|e| classify(&self.url, name, e))?;
        let mut stream = r.into_stream();
        let mut opener = Opener::new(&self.key, name);
        let mut out = Vec::new();
        while let Some(piece) = stream.next().await {
            let piece = piece.map_err(|e| classify(&self.url, name, e))?;
            opener.push(&piece, &mut out)?;
        }
        opener.finish(&mut out)?;
        Ok(out)
    }

    /// Evict uploaded packs, oldest first, until the local packs fit the
    /// budget. `open`: packs a writer may still append to (never evicted).
    /// Blocking.
    pub(crate) fn evict(&self, open: &HashSet<u64>) -> Result<(), OffsiteError> {
        let dir = self.dir.join("packs");
        let mut packs: Vec<(u64, u64)> = Vec::new();
        let entries = std::fs::read_dir(&dir).map_err(|e| OffsiteError::local(&dir, e))?;
        for entry in entries.flatten() {
            let Some(id) = entry.file_name().to_str().and_then(parse_pack_name) else {
                continue;
            };
            let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
            packs.push((id, len));
        }
        let mut total: u64 = packs.iter().map(|(_, l)| l).sum();
        if total <= self.cache_budget {
            return Ok(());
        }
        packs.sort_unstable();
        let lowest_open = open.iter().min().copied().unwrap_or(u64::MAX);
        for (id, len) in packs {
            if total <= self.cache_budget {
                break;
            }
            // Only whole packs no writer reaches, every byte in the bucket.
            if id >= lowest_open || open.contains(&id) || self.uploaded_to(id) < len {
                continue;
            }
            let path = pack_path(&self.dir, id);
            std::fs::remove_file(&path).map_err(|e| OffsiteError::local(&path, e))?;
            total -= len;
            metrics::counter!("pilotlight_receiver_cache_evictions_total").increment(1);
            tracing::debug!(pack = id, bytes = len, "pack evicted from the local cache");
        }
        Ok(())
    }
}

/// The read path's hook: pack `pack` of `dir` is not on disk. If `dir` has
/// an object store, bring it back; `Ok(false)` if it has none.
pub fn fetch_missing(dir: &Path, pack: u64) -> Result<bool, crate::ReceiveError> {
    match super::for_dir(dir)? {
        Some(o) => {
            o.fetch_pack(pack)?;
            Ok(true)
        }
        None => Ok(false),
    }
}

/// Before a command reads many blocks (`verify`): if one of `packs` is not
/// in the local cache, the store of `dir` must answer, within the
/// command's patience; an unreachable store is then one sentence, not
/// every block reported damaged. Nothing without a store. Blocking.
pub fn reachable_for(
    dir: &Path,
    packs: impl IntoIterator<Item = u64>,
) -> Result<(), crate::ReceiveError> {
    let Some(o) = super::for_dir(dir)? else {
        return Ok(());
    };
    if packs.into_iter().all(|p| pack_path(dir, p).exists()) {
        return Ok(());
    }
    o.block_on(o.retrying(&o.stop, || o.segments_listed()))?;
    Ok(())
}
