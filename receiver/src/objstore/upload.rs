//! Uploading packs: what a commit added to each of its packs goes to the
//! bucket as sealed segments of at most [`SEGMENT_MAX`], several at once, and
//! is retried with backoff for as long as the store does not take it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use pilotlight_protocol::clock::now_ms;
use tokio_util::sync::CancellationToken;

use super::client::segment_name;
use super::crypto::{Sealer, CHUNK_LEN};
use super::{Offsite, OffsiteError};
use crate::pack::pack_path;

/// Most bytes of one segment: what a commit (or the streamer) uploads of
/// a pack is cut at multiples of this from where the bucket's chain ends,
/// and the pieces go up side by side as single puts (what multipart parts
/// would give, without the store assembling them).
pub(crate) const SEGMENT_MAX: u64 = 16 << 20;
/// Segments uploaded at once.
pub(super) const UPLOADS_IN_FLIGHT: usize = 4;
/// First and longest wait between two tries of an upload.
const BACKOFF_FIRST: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// `start..end` cut into segments of at most [`SEGMENT_MAX`], from
/// `start`.
pub(super) fn pieces(start: u64, end: u64) -> impl Iterator<Item = (u64, u64)> {
    (start..end)
        .step_by(usize::try_from(SEGMENT_MAX).unwrap_or(usize::MAX))
        .map(move |s| (s, end.min(s.saturating_add(SEGMENT_MAX))))
}

impl Offsite {
    /// Upload what `packs` (id, committed length, durable length) hold past
    /// what the bucket has of them, the packs in parallel; wait until it is
    /// there. What the bucket holds past the committed length stays only
    /// if this process streamed it early ([`super::stream`]) and the file
    /// still holds those very bytes; anything else there was uploaded for
    /// a point that then failed to commit (its bytes were cut and written
    /// anew) and is replaced. Blocking.
    pub(crate) fn upload_packs(&self, packs: &[(u64, u64, u64)]) -> Result<(), OffsiteError> {
        use futures_util::{StreamExt, TryStreamExt};
        let cancel = &self.stop;
        let _one = self.upload.lock().map_err(|_| OffsiteError::Cancelled)?;
        let started = std::time::Instant::now();
        self.block_on(async {
            self.retrying(cancel, || self.segments_listed()).await?;
            let mut work = Vec::new();
            for &(pack, committed, end) in packs {
                let start = self.keep_to(pack, committed);
                if end > start {
                    self.retrying(cancel, || self.drop_stale(pack, start))
                        .await?;
                    work.extend(pieces(start, end).map(|(s, e)| (pack, s, e)));
                }
            }
            let uploads = work.iter().map(|&(pack, start, end)| async move {
                self.retrying(cancel, || async {
                    self.upload_segment(pack, start, end).await.map(|_| ())
                })
                .await?;
                self.note_segment(pack, start, end, None);
                Ok::<_, OffsiteError>(())
            });
            futures_util::stream::iter(uploads)
                .buffer_unordered(UPLOADS_IN_FLIGHT)
                .try_collect::<Vec<()>>()
                .await?;
            let bytes: u64 = work.iter().map(|(_, s, e)| e - s).sum();
            tracing::debug!(
                bytes,
                ms = started.elapsed().as_millis() as u64,
                "packs uploaded at commit"
            );
            Ok::<_, OffsiteError>(())
        })?;
        self.state
            .update(&self.url.to_string(), |s| s.last_upload_ms = Some(now_ms()));
        Ok(())
    }

    /// Where the bucket's chain of segments of `pack` can be kept to: the
    /// segments wholly within `committed`, then those this process
    /// streamed whose bytes the file still holds (their BLAKE3 checked).
    /// Blocking (reads the file).
    pub(super) fn keep_to(&self, pack: u64, committed: u64) -> u64 {
        let segs = self.segments_of(pack);
        let mut at = 0;
        while let Some(&end) = segs.get(&at) {
            if end > committed {
                let early = self
                    .early
                    .lock()
                    .ok()
                    .and_then(|e| e.get(&(pack, at)).copied());
                match early {
                    // A file cut shorter holds other bytes by definition.
                    Some((e, hash))
                        if e == end && self.hash_range(pack, at, end).ok() == Some(hash) => {}
                    _ => return at,
                }
            }
            at = end;
        }
        at
    }

    /// The BLAKE3 of bytes `start..end` of the local pack `pack`.
    fn hash_range(&self, pack: u64, start: u64, end: u64) -> Result<[u8; 32], OffsiteError> {
        let path = pack_path(&self.dir, pack);
        let file = File::open(&path).map_err(|e| OffsiteError::local(&path, e))?;
        let mut h = blake3::Hasher::new();
        let mut buf = vec![0u8; CHUNK_LEN];
        let mut at = start;
        while at < end {
            let n = usize::try_from((end - at).min(CHUNK_LEN as u64)).unwrap_or(CHUNK_LEN);
            file.read_exact_at(&mut buf[..n], at)
                .map_err(|e| OffsiteError::local(&path, e))?;
            h.update(&buf[..n]);
            at += n as u64;
        }
        Ok(*h.finalize().as_bytes())
    }

    /// The bucket now holds segment `start..end` of `pack` (`early`: the
    /// BLAKE3 of its bytes when the streamer uploaded it).
    pub(super) fn note_segment(&self, pack: u64, start: u64, end: u64, early: Option<[u8; 32]>) {
        if let Ok(mut s) = self.segments.lock() {
            if let Some(m) = s.as_mut() {
                m.entry(pack).or_default().insert(start, end);
            }
        }
        self.note_upload_time(pack, pilotlight_protocol::clock::now_ms());
        if let (Some(hash), Ok(mut e)) = (early, self.early.lock()) {
            e.insert((pack, start), (end, hash));
        }
    }

    /// Run `op` until it succeeds, waiting longer each time (up to
    /// [`BACKOFF_MAX`]); while it fails, the state says the store is
    /// unreachable. `cancel` ends the wait, and so does the end of a
    /// command's patience (its last error is returned; an error no retry
    /// can mend, such as credentials, at once).
    pub(super) async fn retrying<F, Fut>(
        &self,
        cancel: &CancellationToken,
        mut op: F,
    ) -> Result<(), OffsiteError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<(), OffsiteError>>,
    {
        let mut wait = BACKOFF_FIRST;
        let url = self.url.to_string();
        let started = tokio::time::Instant::now();
        loop {
            // `status` shows serve's waits, not a command's.
            let serving = self.patience.is_none();
            match op().await {
                Ok(()) => {
                    if serving {
                        self.state.update(&url, |s| {
                            s.waiting_since_ms = None;
                            s.cause = None;
                        });
                    }
                    return Ok(());
                }
                // serve waits out anything (a bucket re-created, a disk
                // freed); a command only what may pass.
                Err(e) if self.patience.is_some() && !e.is_retryable() => return Err(e),
                Err(e) if self.patience.is_some_and(|p| started.elapsed() >= p) => {
                    return Err(e);
                }
                Err(e) => {
                    let retry_in_ms = wait.as_millis() as u64;
                    if serving {
                        tracing::warn!(cause = %e, retry_in_ms, "object store: upload failed; the point waits");
                    } else {
                        // A command says it once, when it gives up.
                        tracing::debug!(cause = %e, retry_in_ms, "object store unreachable; waiting");
                    }
                    let cause = e.to_string();
                    if serving {
                        self.state.update(&url, |s| {
                            s.waiting_since_ms.get_or_insert_with(now_ms);
                            s.cause = Some(cause);
                        });
                    }
                }
            }
            tokio::select! {
                () = cancel.cancelled() => return Err(OffsiteError::Cancelled),
                () = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(BACKOFF_MAX);
        }
    }

    /// Delete segments of `pack` at or past `start`: a crash after their
    /// upload and before their commit left them, and the bytes they held
    /// were cut and written anew.
    async fn drop_stale(&self, pack: u64, start: u64) -> Result<(), OffsiteError> {
        let stale: Vec<(u64, u64)> = self
            .segments_of(pack)
            .range(start..)
            .map(|(s, e)| (*s, *e))
            .collect();
        for (s, e) in stale {
            self.delete(&segment_name(pack, s, e)).await?;
            if let Ok(mut m) = self.segments.lock() {
                if let Some(p) = m.as_mut().and_then(|m| m.get_mut(&pack)) {
                    p.remove(&s);
                }
            }
        }
        Ok(())
    }

    /// Seal bytes `start..end` of pack `pack` and put them in the bucket;
    /// returns the BLAKE3 of the bytes it read.
    pub(super) async fn upload_segment(
        &self,
        pack: u64,
        start: u64,
        end: u64,
    ) -> Result<[u8; 32], OffsiteError> {
        let path = pack_path(&self.dir, pack);
        let file = File::open(&path).map_err(|e| OffsiteError::local(&path, e))?;
        let name = segment_name(pack, start, end);
        let (mut sealer, header) = Sealer::new(&self.key, &name);
        let mut plain = vec![0u8; CHUNK_LEN];
        let mut sealed = header;
        let mut at = start;
        let hasher = std::cell::RefCell::new(blake3::Hasher::new());
        let read = |at: u64, buf: &mut Vec<u8>| -> Result<usize, OffsiteError> {
            let n = usize::try_from((end - at).min(CHUNK_LEN as u64)).unwrap_or(CHUNK_LEN);
            buf.resize(n, 0);
            // The caller is a blocking thread (the commit's), not a worker.
            file.read_exact_at(buf, at)
                .map_err(|e| OffsiteError::local(&path, e))?;
            hasher.borrow_mut().update(buf);
            Ok(n)
        };
        // At most SEGMENT_MAX (plus the seal) in memory: one put, no
        // multipart upload (several segments go side by side instead).
        while at < end {
            let n = read(at, &mut plain)?;
            at += n as u64;
            sealer.seal(&plain, at == end, &mut sealed)?;
        }
        self.put(&name, sealed).await?;
        let hash = *hasher.borrow().finalize().as_bytes();
        Ok(hash)
    }

    /// Delete every object of pack `pack` (garbage collection removed it,
    /// and its retention is over: [`super::lock`]). Blocking.
    pub(crate) fn delete_pack(&self, pack: u64) -> Result<(), OffsiteError> {
        self.block_on(async {
            self.segments_listed().await?;
            for (s, e) in self.segments_of(pack) {
                self.delete(&segment_name(pack, s, e)).await?;
            }
            if let Ok(mut m) = self.segments.lock() {
                if let Some(m) = m.as_mut() {
                    m.remove(&pack);
                }
            }
            Ok(())
        })
    }
}

impl Offsite {
    /// When `serve` starts: delete what the bucket holds past the catalog's
    /// committed lengths (`committed`: pack → length), uploads that a crash
    /// kept from their commit. Blocking.
    pub(crate) fn reconcile(
        &self,
        committed: &std::collections::HashMap<u64, u64>,
        deferred: &std::collections::HashSet<u64>,
    ) -> Result<(), OffsiteError> {
        self.block_on(async {
            self.segments_listed().await?;
            let packs: Vec<u64> = self
                .segments
                .lock()
                .ok()
                .and_then(|s| s.as_ref().map(|m| m.keys().copied().collect()))
                .unwrap_or_default();
            // Packs garbage collection removed wait for their retention
            // ([`super::lock`]), not for this.
            for pack in packs.into_iter().filter(|p| !deferred.contains(p)) {
                let len = committed.get(&pack).copied().unwrap_or(0);
                let mut keep_to = 0;
                let segs = self.segments_of(pack);
                while let Some(&end) = segs.get(&keep_to) {
                    if end > len {
                        break;
                    }
                    keep_to = end;
                }
                if segs.range(keep_to..).next().is_some() {
                    tracing::info!(pack, from = keep_to, "deleting uploads no commit reached");
                    self.drop_stale(pack, keep_to).await?;
                }
            }
            Ok(())
        })
    }
}
