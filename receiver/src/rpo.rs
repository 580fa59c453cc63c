//! Recovery point objectives: each server's target (`rpo_target` in
//! `receiver.toml`, 5 minutes by default, `[rpo_targets]` per server), the
//! rule that says a server is past it, and the gauges a serving receiver
//! keeps current for Prometheus (`pilotlight_receiver_lag_seconds`,
//! `pilotlight_receiver_rpo_target_seconds`, `pilotlight_receiver_rpo_breached`,
//! `pilotlight_receiver_quota_used_bytes`, `pilotlight_receiver_quota_bytes`,
//! each labelled `server`).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::ReceiverConfig;
use crate::store::{blocking, Store};
use crate::ReceiveError;

/// How often a serving receiver refreshes the gauges.
pub(crate) const REFRESH: Duration = Duration::from_secs(5);

/// Whether a server is past its recovery point objective: its newest point
/// is older than `target`. A server with no point yet is not (it has
/// promised nothing yet: `status` says `never-replicated`), nor is a revoked
/// one (it is not meant to replicate).
pub fn breached(lag_seconds: Option<f64>, target: Duration, revoked: bool) -> bool {
    !revoked && lag_seconds.is_some_and(|lag| lag > target.as_secs_f64())
}

/// Refresh the gauges every [`REFRESH`] until `shutdown`.
pub(crate) async fn publish(store: Arc<Store>, cfg: ReceiverConfig, shutdown: CancellationToken) {
    let cfg = Arc::new(cfg);
    let mut tick = tokio::time::interval(REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (store, cfg) = (store.clone(), cfg.clone());
        if let Err(e) = blocking(move || refresh(&store, &cfg)).await {
            tracing::warn!(cause = %e, "cannot refresh the RPO gauges");
        }
    }
}

/// Set every server's gauges from the catalog, now. Blocking.
fn refresh(store: &Store, cfg: &ReceiverConfig) -> Result<(), ReceiveError> {
    let now = pilotlight_protocol::clock::now_ms();
    let cat = store.catalog()?;
    for s in cat.servers()? {
        let lag = cat
            .latest_point_time(s.id)?
            .map(|created| (now - created).max(0) as f64 / 1000.0);
        let target = cfg.rpo_target_of(&s.name);
        let labels = [("server", s.name.clone())];
        if let Some(lag) = lag {
            metrics::gauge!("pilotlight_receiver_lag_seconds", &labels).set(lag);
        }
        metrics::gauge!("pilotlight_receiver_rpo_target_seconds", &labels)
            .set(target.as_secs_f64());
        let past = breached(lag, target, s.revoked);
        metrics::gauge!("pilotlight_receiver_rpo_breached", &labels).set(f64::from(u8::from(past)));
        metrics::gauge!("pilotlight_receiver_quota_used_bytes", &labels)
            .set(cat.server_usage(s.id)? as f64);
        if let Some(q) = cfg.quota_of(&s.name) {
            metrics::gauge!("pilotlight_receiver_quota_bytes", &labels).set(q as f64);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breached_only_past_the_target_with_a_point() {
        let five = Duration::from_secs(300);
        // (lag, revoked) -> breached
        let table = [
            (None, false, false),
            (Some(0.0), false, false),
            (Some(300.0), false, false),
            (Some(300.5), false, true),
            (Some(86_400.0), true, false),
        ];
        for (lag, revoked, want) in table {
            assert_eq!(breached(lag, five, revoked), want, "{lag:?} {revoked}");
        }
    }
}
