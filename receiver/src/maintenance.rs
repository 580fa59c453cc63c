//! Periodic maintenance of a serving receiver: prune points by the
//! configured retention policy, then collect garbage in the packs, keeping
//! whatever the live sessions pin.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::ReceiverConfig;
use crate::gc::{GcOptions, Pins};
use crate::registry::Registry;
use crate::store::{blocking, Store};
use crate::ReceiveError;

/// What a maintenance pass works on.
pub(crate) struct Maintenance {
    /// The store to prune and collect.
    pub(crate) store: Arc<Store>,
    /// Retention policy and garbage collection threshold.
    pub(crate) cfg: ReceiverConfig,
    /// The sessions whose pins garbage collection must keep.
    pub(crate) registry: Arc<Registry>,
}

impl Maintenance {
    /// Prune and collect garbage every `every`, off the async threads. One
    /// pass at a time; a failed pass is logged and retried at the next tick.
    pub(crate) async fn run(self, every: Duration, shutdown: CancellationToken) {
        let me = Arc::new(self);
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let m = me.clone();
            if let Err(e) = blocking(move || m.pass()).await {
                tracing::warn!(cause = %e, "maintenance (prune, garbage collection) failed");
            }
        }
    }

    /// Prune by the configured policy, then collect garbage. Blocking.
    fn pass(&self) -> Result<(), ReceiveError> {
        let store = &self.store;
        // A point that could not be removed is logged by prune, which goes
        // on with the others; garbage collection still runs.
        let removed = crate::admin::prune_store(store, None, &self.cfg.retention, false)?
            .iter()
            .filter(|i| i.removed())
            .count();
        let opts = GcOptions {
            min_dead_percent: self.cfg.gc_min_dead_percent,
        };
        let pins = || -> Result<Pins, ReceiveError> { self.registry.pins() };
        let report = crate::gc::collect(store, &pins, opts)?;
        metrics::counter!("pilotlight_receiver_points_pruned_total").increment(removed as u64);
        metrics::counter!("pilotlight_receiver_gc_bytes_freed_total").increment(report.bytes_freed);
        tracing::info!(
            pruned = removed,
            packs_removed = report.packs_removed,
            packs_rewritten = report.packs_rewritten,
            bytes_freed = report.bytes_freed,
            "maintenance done"
        );
        Ok(())
    }
}
