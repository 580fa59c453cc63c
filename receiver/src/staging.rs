//! Staging as its own task: after a point is `DURABLE`, the connection asks
//! this task (over a bounded channel) to bring the server's staging images
//! up to date, so that a slow image update never holds up the next point.
//! When `serve` starts, the task first repairs every server's images from
//! the store (whatever a stop or a crash left behind), in the background:
//! `serve` accepts agents meanwhile.
//!
//! The guarantee stays: every staging image eventually equals its server's
//! latest durable point. Requests that queue up while an update runs are
//! merged (one update per server, to its newest point). Failures are per
//! volume: a volume that fails is logged, recorded in `staging.json`
//! ([`StagingHealth`], shown by `status`) with its error and since when,
//! and tried again with the next request of its server or after
//! [`health::retry_after`]'s backoff, whichever comes first; the other
//! volumes and servers go on. Declared sizes the staging filesystem cannot
//! hold are refused at `Open` (`check_room`).

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::store::{blocking, BlockFetcher, Store};
use crate::ReceiveError;

mod health;
mod image;

pub use health::{retry_after, StagingFailure, StagingHealth, MAX_RETRY, STAGING_FILE};
pub(crate) use image::check_room;

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

/// A server whose update failed, and when to try it again.
#[derive(Debug)]
struct Retry {
    req: Request,
    at: Instant,
}

/// The handle sessions use to queue staging updates. The task ends (after
/// the update under way) when the last handle is dropped.
#[derive(Clone)]
pub(crate) struct Staging {
    tx: mpsc::Sender<Request>,
}

impl Staging {
    /// Start the staging task over `store`: it repairs every server's images
    /// first, then serves requests.
    pub(crate) fn start(store: Arc<Store>) -> (Self, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(STAGING_QUEUE);
        let task = Task {
            store,
            health: StagingHealth::new(),
            retry: BTreeMap::new(),
        };
        (Self { tx }, tokio::spawn(task.run(rx)))
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

/// The task's own state.
struct Task {
    store: Arc<Store>,
    health: StagingHealth,
    retry: BTreeMap<i64, Retry>,
}

impl Task {
    /// Repair, then take every request queued, merge them by server,
    /// update; try failed updates again with the next request of their
    /// server or when their backoff is up.
    async fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        // Replaces the report of an earlier run.
        self.publish().await;
        let mut due = self.repairs().await;
        loop {
            for (_, req) in std::mem::take(&mut due) {
                self.update(req).await;
            }
            let next_retry = self.retry.values().map(|r| r.at).min();
            // `None`: the queue closed; `Some(None)`: a retry is due.
            let woke = match next_retry {
                None => rx.recv().await.map(Some),
                Some(at) => tokio::select! {
                    r = rx.recv() => r.map(Some),
                    () = tokio::time::sleep_until(at) => Some(None),
                },
            };
            let Some(first) = woke else { return };
            if let Some(first) = first {
                merge(&mut due, first);
            }
            while let Ok(more) = rx.try_recv() {
                merge(&mut due, more);
            }
            let now = Instant::now();
            for (id, r) in &self.retry {
                if r.at <= now || due.contains_key(id) {
                    merge(&mut due, r.req.clone());
                }
            }
        }
    }

    /// Every server with a point, to its latest point: what the start
    /// repairs.
    async fn repairs(&self) -> BTreeMap<i64, Request> {
        let store = self.store.clone();
        let found = blocking(move || {
            let cat = store.catalog()?;
            let mut out = BTreeMap::new();
            for s in cat.servers()? {
                if let Some(point) = cat.latest_point(s.id)? {
                    let req = Request {
                        server: s.name,
                        server_id: s.id,
                        point,
                    };
                    out.insert(s.id, req);
                }
            }
            Ok(out)
        })
        .await;
        found.unwrap_or_else(|e| {
            tracing::error!(cause = %e, "cannot list the servers whose staging images to repair; each is updated with its next point");
            BTreeMap::new()
        })
    }

    /// Update one server's images, record what failed and what recovered,
    /// and schedule a retry if anything failed.
    async fn update(&mut self, req: Request) {
        let outcomes = stage(&self.store, &req).await;
        let now_ms = pilotlight_protocol::clock::now_ms();
        let mut changed = false;
        let mut failed = 0u32;
        for (volume, result) in outcomes {
            match result {
                Ok(()) => changed |= self.health.clear(&req.server, volume.as_deref()),
                Err(e) => {
                    let attempts =
                        self.health
                            .fail(&req.server, volume.as_deref(), e.to_string(), now_ms);
                    tracing::warn!(server = %req.server, volume = volume.as_deref().unwrap_or("-"), point = req.point, attempts, retry_in = ?retry_after(attempts), cause = %e, "staging update failed; retried in the background");
                    failed = failed.max(attempts);
                    changed = true;
                }
            }
        }
        if failed > 0 {
            let at = Instant::now() + retry_after(failed);
            self.retry.insert(req.server_id, Retry { req, at });
        } else if self.retry.remove(&req.server_id).is_some() {
            tracing::info!(server = %req.server, "staging images repaired");
        }
        if changed {
            self.publish().await;
        }
    }

    /// Write `staging.json` as it stands.
    async fn publish(&self) {
        let health = self.health.clone();
        let dir = self.store.dir().to_owned();
        if let Err(e) = blocking(move || health.save(&dir)).await {
            tracing::warn!(cause = %e, "cannot write the staging report");
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

/// What one volume's update (`Some(name)`) or the server's own part of it
/// (`None`: the catalog, the reader of the packs) came to.
type Outcome = (Option<String>, Result<(), ReceiveError>);

/// Bring a server's images up to its latest point (no older than the one
/// requested), each volume on its own: one that fails does not hold up the
/// others.
async fn stage(store: &Arc<Store>, req: &Request) -> Vec<Outcome> {
    let store = store.clone();
    let r = req.clone();
    let result = blocking(move || {
        let (latest, volumes) = {
            let cat = store.catalog()?;
            (cat.latest_point(r.server_id)?, cat.volumes(r.server_id)?)
        };
        let point = latest.map_or(r.point, |l| l.max(r.point));
        let mut fetch = BlockFetcher::new(store.dir())?;
        let mut buf = Vec::new();
        let mut out: Vec<Outcome> = vec![(None, Ok(()))];
        for v in volumes {
            let name = v.name.clone();
            let done = image::update(&store, &r.server, v, point, &mut fetch, &mut buf);
            out.push((Some(name), done));
        }
        Ok(out)
    })
    .await;
    result.unwrap_or_else(|e| vec![(None, Err(e))])
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
