//! The TLS server: the accept loop under the connection limit, and what
//! every connection shares. The rest lives in rooms of its own:
//!
//! ```text
//! server (accept loop, admission, shutdown, identity watch)
//!   -> admission: pre-authentication place (global, per address)
//!   -> connection: handshake (first byte, TLS, identity, authorization)
//!                  -> session slot (or Busy) -> Hello
//!        control: Open -> registry (takeover) -> Welcome
//!                 EndPoint -> commit (wait for blocks, fsync packs, catalog)
//!                          -> Durable -> staging task
//!                 GetHashes -> hashes
//!        data:    Join -> apply (verify, dedup, pack append) -> Received
//!   maintenance (prune, garbage collection), staging: tasks of their own
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::Admission;
use crate::config::ReceiverConfig;
use crate::connection::Connection;
use crate::maintenance::Maintenance;
use crate::registry::Registry;
use crate::staging::Staging;
use crate::store::{blocking, Store};
use crate::{pki, ReceiveError};

/// Grace period for in-flight work at shutdown (connections, then the
/// staging queue, within the same period).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// What every connection of a serving receiver shares.
pub(crate) struct Shared {
    /// The point store.
    pub(crate) store: Arc<Store>,
    /// The configuration it serves with.
    pub(crate) cfg: ReceiverConfig,
    /// Live sessions.
    pub(crate) registry: Arc<Registry>,
    /// Queue of staging updates.
    pub(crate) staging: Staging,
    /// The connection budgets.
    pub(crate) admission: Arc<Admission>,
}

/// Serve agents on `listener` from the receiver directory `dir` until
/// `shutdown` is cancelled.
pub async fn run(
    listener: TcpListener,
    dir: PathBuf,
    cfg: ReceiverConfig,
    shutdown: CancellationToken,
) -> Result<(), ReceiveError> {
    let open_dir = dir.clone();
    let cache = cfg.index_cache_entries;
    let store = Arc::new(
        blocking(move || Store::open_for_serve(&open_dir).map(|s| s.with_index_cache(cache)))
            .await?,
    );
    let offsite_dir = dir.clone();
    let offsite = blocking(move || crate::objstore::for_serve(&offsite_dir)).await?;
    let tls = TlsAcceptor::from(pki::server_config(&dir)?);
    let admission = Admission::new(&cfg);
    let registry = Arc::new(Registry::new(dir));
    registry.publish().await;
    let (staging, staging_task) = Staging::start(store.clone());
    tracing::info!(addr = ?listener.local_addr().ok(), "receiver serving");
    let tracker = TaskTracker::new();
    if let Some(every) = cfg.prune_interval() {
        let m = Maintenance {
            store: store.clone(),
            cfg: cfg.clone(),
            registry: registry.clone(),
        };
        tracker.spawn(m.run(every, shutdown.clone()));
    }
    if let Some(o) = offsite {
        tracker.spawn(o.snapshots(shutdown.clone()));
    }
    tracker.spawn(crate::rpo::publish(
        store.clone(),
        cfg.clone(),
        shutdown.clone(),
    ));
    tracker.spawn(registry.clone().watch_identities(
        store.clone(),
        cfg.identity_check(),
        shutdown.clone(),
    ));
    let shared = Arc::new(Shared {
        store,
        cfg,
        registry,
        staging,
        admission,
    });
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(cause = %e, "accept failed");
                        continue;
                    }
                };
                let Some(waiting) = shared.admission.enqueue(peer.ip()) else {
                    metrics::counter!("pilotlight_receiver_preauth_refused_total").increment(1);
                    tracing::debug!(%peer, "connection refused: the pre-authentication waiting room is full");
                    drop(tcp);
                    continue;
                };
                let conn = Connection { shared: shared.clone(), tls: tls.clone(), cancel: shutdown.child_token(), peer };
                tracker.spawn(conn.serve(tcp, waiting));
            }
        }
    }
    // One grace period for both: the connections, then the staging queue.
    let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
    tracker.close();
    if tokio::time::timeout_at(deadline, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the shutdown grace period");
    }
    // The staging task drains its queue once the last handle is gone; what
    // it leaves behind is repaired at the next start.
    drop(shared);
    match tokio::time::timeout_at(deadline, staging_task).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(cause = %e, "staging task failed"),
        Err(_) => tracing::warn!("staging still behind after the shutdown grace period"),
    }
    Ok(())
}
