//! Packs go up while they fill: beside the snapshots, `serve` runs a
//! streamer that, every [`STREAM_TICK`], uploads what a local pack holds
//! past the bucket's chain of its segments in whole segments of
//! [`SEGMENT_MAX`], several side by side, so that a commit
//! has only the rest to upload (an initial sync's commit no longer uploads
//! the whole disk at once).
//!
//! The streamer uploads bytes no commit has reached yet. Each such
//! segment's BLAKE3 is kept: a commit keeps a streamed segment past its
//! committed length only if the file still holds those bytes
//! ([`Offsite::keep_to`]); bytes a refused point left and a rollback cut
//! and rewrote, or a tail read while a record was being written, are
//! uploaded again. After a crash, `serve`'s start deletes every segment
//! past the committed lengths, as it always did.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::upload::{pieces, SEGMENT_MAX, UPLOADS_IN_FLIGHT};
use super::{Offsite, OffsiteError};
use crate::pack::parse_pack_name;

/// How often the streamer looks at the local packs.
const STREAM_TICK: Duration = Duration::from_millis(100);
/// Most segments one look uploads (side by side): a commit that comes
/// meanwhile waits for them.
const STREAM_BATCH: usize = UPLOADS_IN_FLIGHT;

impl Offsite {
    /// `serve`'s streamer task, until `shutdown`.
    pub(super) async fn stream(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(STREAM_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => return,
            }
            let o = self.clone();
            match tokio::task::spawn_blocking(move || o.stream_once()).await {
                Ok(Ok(())) => {}
                // The commit uploads what the streamer could not.
                Ok(Err(e)) => {
                    tracing::debug!(cause = %e, "streaming a pack to the object store failed")
                }
                Err(e) => tracing::warn!(cause = %e, "the pack streamer failed"),
            }
        }
    }

    /// One look at the local packs: upload what is new enough in each.
    /// Blocking.
    pub(super) fn stream_once(&self) -> Result<(), OffsiteError> {
        if self.segments.lock().map(|s| s.is_none()).unwrap_or(true) {
            return Ok(());
        }
        let dir = self.dir.join("packs");
        let entries = std::fs::read_dir(&dir).map_err(|e| OffsiteError::local(&dir, e))?;
        let mut packs: Vec<(u64, u64)> = entries
            .flatten()
            .filter_map(|e| {
                let id = e.file_name().to_str().and_then(parse_pack_name)?;
                Some((id, e.metadata().ok()?.len()))
            })
            .collect();
        packs.sort_unstable();
        // Only whole segments: their bounds are those the commit would cut
        // (multiples of SEGMENT_MAX from the chain's end), so a look that
        // fails halfway uploads the very same segments the next time.
        let wanted = |packs: &[(u64, u64)]| -> Vec<(u64, u64, u64)> {
            packs
                .iter()
                .flat_map(|&(pack, len)| {
                    let from = self.uploaded_to(pack);
                    pieces(from, len)
                        .filter(|(s, e)| e - s == SEGMENT_MAX)
                        .map(move |(s, e)| (pack, s, e))
                })
                .take(STREAM_BATCH)
                .collect()
        };
        if wanted(&packs).is_empty() {
            return Ok(());
        }
        // A commit uploading now goes first; the next tick comes back.
        let Ok(_one) = self.upload.try_lock() else {
            return Ok(());
        };
        // Again under the lock: the commit may have taken some.
        let work = wanted(&packs);
        let started = std::time::Instant::now();
        self.block_on(async {
            use futures_util::{StreamExt, TryStreamExt};
            let uploads = work.iter().map(|&(pack, start, end)| async move {
                let hash = self.upload_segment(pack, start, end).await?;
                self.note_segment(pack, start, end, Some(hash));
                metrics::counter!("pilotlight_receiver_streamed_bytes_total")
                    .increment(end - start);
                Ok::<_, OffsiteError>(())
            });
            futures_util::stream::iter(uploads)
                .buffer_unordered(UPLOADS_IN_FLIGHT)
                .try_collect::<Vec<()>>()
                .await
        })?;
        tracing::debug!(
            segments = work.len(),
            ms = started.elapsed().as_millis() as u64,
            "segments streamed"
        );
        Ok(())
    }
}
