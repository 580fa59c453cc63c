//! The session registry: which server has which live session, the takeover
//! of a superseded session, the sessions data streams may join, and what
//! every session still alive pins against garbage collection. It also keeps
//! `live.json` (see [`crate::live`]) in step, and watches the catalog for
//! revoked or superseded identities of live sessions
//! ([`Registry::watch_identities`]: `revoke` is another process, so the
//! catalog is polled, one small query per live session and period).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use pilotlight_protocol::clock::{now_ms, rfc3339};
use tokio::sync::OwnedMutexGuard;
use tokio_util::sync::CancellationToken;

use crate::gc::Pins;
use crate::handshake::admit;
use crate::live::Live;
use crate::session::Session;
use crate::store::{blocking, Store};
use crate::ReceiveError;

/// The live session of one server.
struct ActiveServer {
    /// Cancels that session (a newer one takes over).
    cancel: CancellationToken,
    /// Held by a session from takeover until it has finished committing.
    lock: Arc<tokio::sync::Mutex<()>>,
}

/// Every session of a serving receiver.
pub(crate) struct Registry {
    /// Receiver directory (for `live.json`).
    dir: PathBuf,
    /// Open control sessions, by session id, for data streams to join.
    sessions: Mutex<HashMap<u64, Arc<Session>>>,
    /// Every session still alive anywhere (a commit may outlive its control
    /// connection): garbage collection asks them all for pins.
    alive: Mutex<Vec<Weak<Session>>>,
    /// The live session of each server, by server row id.
    active: Mutex<HashMap<i64, ActiveServer>>,
    /// What `live.json` says.
    live: Mutex<Live>,
}

/// Proof that a session took over its server: held until the session ends.
pub(crate) struct Turn {
    _guard: OwnedMutexGuard<()>,
}

impl Registry {
    /// An empty registry for the receiver directory `dir`.
    pub(crate) fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            sessions: Mutex::new(HashMap::new()),
            alive: Mutex::new(Vec::new()),
            active: Mutex::new(HashMap::new()),
            live: Mutex::new(Live {
                pid: std::process::id(),
                ..Default::default()
            }),
        }
    }

    /// Write `live.json` as it stands (no server connected yet at start).
    pub(crate) async fn publish(self: &Arc<Self>) {
        let me = self.clone();
        let _ = blocking(move || {
            if let Ok(live) = me.live.lock() {
                let _ = live.save(&me.dir);
            }
            Ok(())
        })
        .await;
    }

    /// Take over from an older session of the same server: cancel it and
    /// wait until it has finished committing. Fails with `Superseded` if a
    /// newer session takes over from `session` meanwhile.
    pub(crate) async fn take_over(&self, session: &Session) -> Result<Turn, ReceiveError> {
        let lock = {
            let mut active = lock(&self.active, "active sessions")?;
            let entry = active
                .entry(session.server_id)
                .or_insert_with(|| ActiveServer {
                    cancel: CancellationToken::new(),
                    lock: Arc::new(tokio::sync::Mutex::new(())),
                });
            entry.cancel.cancel();
            entry.cancel = session.cancel.clone();
            entry.lock.clone()
        };
        tokio::select! {
            g = lock.lock_owned() => Ok(Turn { _guard: g }),
            () = session.cancel.cancelled() => Err(ReceiveError::Superseded),
        }
    }

    /// List a session that took over: data streams may join it, garbage
    /// collection keeps what it pins, `live.json` shows its server.
    pub(crate) async fn enter(
        self: &Arc<Self>,
        session: &Arc<Session>,
    ) -> Result<(), ReceiveError> {
        lock(&self.sessions, "sessions")?.insert(session.id, session.clone());
        lock(&self.alive, "alive sessions")?.push(Arc::downgrade(session));
        metrics::gauge!("pilotlight_receiver_sessions").increment(1.0);
        self.set_live(&session.server, Some(rfc3339(now_ms())))
            .await;
        Ok(())
    }

    /// The session's control connection is over: cancel the session (its
    /// data streams end) and unlist it. Its pins stay until the last
    /// reference to it is gone.
    pub(crate) async fn leave(self: &Arc<Self>, session: &Session) -> Result<(), ReceiveError> {
        self.set_live(&session.server, None).await;
        metrics::gauge!("pilotlight_receiver_sessions").decrement(1.0);
        session.cancel.cancel();
        session.release_slots();
        lock(&self.sessions, "sessions")?.remove(&session.id);
        Ok(())
    }

    /// A connection slot one of `server_id`'s open sessions kept for a data
    /// stream, for a connection of that server that just authenticated.
    pub(crate) fn reserved_slot(
        &self,
        server_id: i64,
    ) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, ReceiveError> {
        let sessions = lock(&self.sessions, "sessions")?;
        Ok(sessions
            .values()
            .filter(|s| s.server_id == server_id)
            .find_map(|s| s.take_slot()))
    }

    /// The open session `session_id`, if it is one of `server_id`'s.
    pub(crate) fn find(
        &self,
        session_id: u64,
        server_id: i64,
    ) -> Result<Option<Arc<Session>>, ReceiveError> {
        let sessions = lock(&self.sessions, "sessions")?;
        Ok(sessions
            .get(&session_id)
            .filter(|s| s.server_id == server_id)
            .cloned())
    }

    /// What the sessions alive now hold on to. Call from a blocking context.
    pub(crate) fn pins(&self) -> Result<Pins, ReceiveError> {
        let mut pins = Pins::default();
        let mut alive = lock(&self.alive, "alive sessions")?;
        alive.retain(|w| w.strong_count() > 0);
        for s in alive.iter().filter_map(Weak::upgrade) {
            s.pins(&mut pins)?;
        }
        Ok(pins)
    }

    /// Until `shutdown`: every `every`, check the identity of each open
    /// session against the catalog, and end the sessions whose identity was
    /// revoked or superseded (with that error: nothing more of them commits).
    pub(crate) async fn watch_identities(
        self: Arc<Self>,
        store: Arc<Store>,
        every: Duration,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let open: Vec<Arc<Session>> = match lock(&self.sessions, "sessions") {
                Ok(s) => s.values().cloned().collect(),
                Err(_) => return,
            };
            if open.is_empty() {
                continue;
            }
            let store = store.clone();
            let checked = blocking(move || {
                let cat = store.catalog()?;
                let mut refused = Vec::new();
                for s in open {
                    let row = cat.server(&s.server)?;
                    if let Err(e) = admit(row.as_ref(), &s.server, &s.serial) {
                        refused.push((s, e));
                    }
                }
                Ok(refused)
            })
            .await;
            match checked {
                Ok(refused) => {
                    for (s, e) in refused {
                        tracing::warn!(server = %s.server, session = s.id, cause = %e, "closing a live session");
                        s.fail(&e);
                    }
                }
                Err(e) => {
                    tracing::warn!(cause = %e, "cannot check the identities of live sessions")
                }
            }
        }
    }

    /// Record that `server` connected (or, with `None`, disconnected), and
    /// rewrite `live.json` off the async workers.
    async fn set_live(self: &Arc<Self>, server: &str, since: Option<String>) {
        let me = self.clone();
        let server = server.to_owned();
        let _ = blocking(move || {
            let Ok(mut live) = me.live.lock() else {
                return Ok(());
            };
            match since {
                Some(t) => live.connected.insert(server, t),
                None => live.connected.remove(&server),
            };
            if let Err(e) = live.save(&me.dir) {
                tracing::debug!(cause = %e, "cannot write live.json");
            }
            Ok(())
        })
        .await;
    }
}

fn lock<'a, T>(m: &'a Mutex<T>, what: &'static str) -> Result<MutexGuard<'a, T>, ReceiveError> {
    m.lock().map_err(|_| ReceiveError::poisoned(what))
}
