//! Staging as its own task: after a point is `DURABLE`, the connection asks
//! this task (over a bounded channel) to bring the server's staging images
//! up to date, so that a slow image update never holds up the next point.
//!
//! The guarantee stays: every staging image eventually equals its server's
//! latest durable point. Requests that queue up while an update runs are
//! merged (one update per server, to its newest point); a failed update is
//! retried with the next batch of requests or after [`STAGING_RETRY`],
//! whichever comes first, and whatever is still behind
//! when the receiver stops is repaired from the store when it next serves
//! ([`Store::open_for_serve`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::store::{blocking, Store};

/// Depth of the queue of staging requests. A full queue holds up the
/// sessions that committed (backpressure), never the commit itself.
pub(crate) const STAGING_QUEUE: usize = 64;

/// Bring `server`'s staging images up to (at least) `point`.
#[derive(Debug, Clone)]
struct Request {
    server: String,
    server_id: i64,
    point: i64,
}

/// The handle sessions use to queue staging updates. The task ends (after
/// the queue is drained) when the last handle is dropped.
#[derive(Clone)]
pub(crate) struct Staging {
    tx: mpsc::Sender<Request>,
}

impl Staging {
    /// Start the staging task over `store`.
    pub(crate) fn start(store: Arc<Store>) -> (Self, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(STAGING_QUEUE);
        let task = tokio::spawn(run(store, rx));
        (Self { tx }, task)
    }

    /// Queue an update of `server`'s staging images to the durable `point`.
    pub(crate) async fn request(&self, server: &str, server_id: i64, point: i64) {
        let req = Request {
            server: server.to_owned(),
            server_id,
            point,
        };
        if self.tx.send(req).await.is_err() {
            // Only at shutdown; the next start repairs the image.
            tracing::debug!(
                server,
                point,
                "staging task is gone; staging left for repair"
            );
        }
    }
}

/// How long a failed update waits before it is tried again when no new
/// request comes first (a server gone idle must not keep a stale image).
pub(crate) const STAGING_RETRY: std::time::Duration = std::time::Duration::from_secs(30);

/// The task: take every request queued, merge them by server, update; try
/// failed updates again with the next requests or after [`STAGING_RETRY`].
async fn run(store: Arc<Store>, mut rx: mpsc::Receiver<Request>) {
    let mut retry: BTreeMap<i64, Request> = BTreeMap::new();
    loop {
        // `None`: the queue closed; `Some(None)`: time to retry.
        let woke = if retry.is_empty() {
            rx.recv().await.map(Some)
        } else {
            tokio::select! {
                r = rx.recv() => r.map(Some),
                () = tokio::time::sleep(STAGING_RETRY) => Some(None),
            }
        };
        let Some(first) = woke else { return };
        let mut due = std::mem::take(&mut retry);
        if let Some(first) = first {
            merge(&mut due, first);
        }
        while let Ok(more) = rx.try_recv() {
            merge(&mut due, more);
        }
        for (id, req) in due {
            if let Err(req) = stage(&store, req).await {
                retry.insert(id, req);
            }
        }
    }
}

/// Add `req` to `due`, keeping the newest point of each server.
fn merge(due: &mut BTreeMap<i64, Request>, req: Request) {
    match due.get(&req.server_id) {
        Some(have) if have.point >= req.point => {}
        _ => {
            due.insert(req.server_id, req);
        }
    }
}

/// Bring a server's images up to its latest point (no older than the one
/// requested). Gives the request back if it failed.
async fn stage(store: &Arc<Store>, req: Request) -> Result<(), Request> {
    let store = store.clone();
    let r = req.clone();
    let result = blocking(move || {
        let latest = store.catalog()?.latest_point(r.server_id)?;
        let point = latest.map_or(r.point, |l| l.max(r.point));
        store.update_staging(&r.server, r.server_id, point)
    })
    .await;
    result.map_err(|e| {
        tracing::warn!(server = %req.server, point = req.point, cause = %e, "staging update failed; retried later");
        req
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(server_id: i64, point: i64) -> Request {
        Request {
            server: format!("s{server_id}"),
            server_id,
            point,
        }
    }

    #[test]
    fn merging_keeps_the_newest_point_of_each_server() {
        let mut due = BTreeMap::new();
        for r in [req(1, 5), req(2, 3), req(1, 4), req(1, 7), req(2, 2)] {
            merge(&mut due, r);
        }
        let got: Vec<(i64, i64)> = due.values().map(|r| (r.server_id, r.point)).collect();
        assert_eq!(got, vec![(1, 7), (2, 3)]);
    }
}
