//! Admission: the two budgets a connection passes through. Before it has
//! authenticated, a connection holds a pre-authentication place (global, and
//! per source address) for at most the first-byte deadline plus the TLS
//! handshake; only an enrolled, authorized peer then takes one of the
//! session slots (`max_connections`; a session's control connection takes
//! the slots of its data streams when it opens, and they take them when
//! they connect). Idle or slow TCP connections from one
//! address therefore cannot take the slots of enrolled agents, and a full
//! receiver answers an authenticated agent `Busy` instead of a reset.
//!
//! A connection that finds no pre-authentication place free waits for one
//! in a bounded waiting room (`max_preauth_waiting`, and per address
//! `max_preauth_waiting_per_ip`), first come first served, for at most
//! `preauth_wait_secs` (longer than an agent's connect timeout, so that an
//! agent kept waiting gives up and backs off by itself): hundreds of agents starting at once (all from one
//! address behind a NAT, or on loopback) queue for their TLS handshakes
//! instead of being dropped, which they would see as "connection reset by
//! peer". Only past the waiting room is a connection dropped.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::ReceiverConfig;
use crate::ReceiveError;

/// The connection budgets of a serving receiver.
pub(crate) struct Admission {
    /// Pre-authentication places, all addresses together.
    preauth: Arc<Semaphore>,
    /// By source address: its pre-authentication places, and how many of
    /// its connections wait for one or hold one.
    per_ip: Mutex<HashMap<IpAddr, (Arc<Semaphore>, usize)>>,
    /// Most pre-authentication places of one address.
    max_per_ip: usize,
    /// Places in the waiting room, all addresses together.
    waiting: Arc<Semaphore>,
    /// Most connections of one address waiting or holding a place.
    max_waiting_per_ip: usize,
    /// Authenticated connection slots.
    sessions: Arc<Semaphore>,
}

/// A connection's place in the waiting room: it waits there (its TLS
/// ClientHello unread) for a pre-authentication place, instead of being
/// dropped, which the peer would see as a connection reset. Given back on
/// drop.
pub(crate) struct Waiting {
    _room: OwnedSemaphorePermit,
    ip: IpAddr,
    admission: Arc<Admission>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.admission.leave(self.ip);
    }
}

/// A connection's place before it has authenticated; given back on drop.
pub(crate) struct PreAuth {
    _global: OwnedSemaphorePermit,
    _ip: OwnedSemaphorePermit,
    _waiting: Waiting,
}

impl Admission {
    /// The budgets of `cfg`.
    pub(crate) fn new(cfg: &ReceiverConfig) -> Arc<Self> {
        Arc::new(Self {
            preauth: Arc::new(Semaphore::new(cfg.max_preauth_connections.max(1))),
            per_ip: Mutex::new(HashMap::new()),
            max_per_ip: cfg.max_preauth_per_ip.max(1),
            waiting: Arc::new(Semaphore::new(cfg.max_preauth_waiting.max(1))),
            max_waiting_per_ip: cfg.max_preauth_waiting_per_ip.max(1),
            sessions: Arc::new(Semaphore::new(cfg.max_connections.max(1))),
        })
    }

    /// A place in the waiting room for a connection from `ip`, or `None`
    /// when the room, or that address's share of it, is full (the
    /// connection is then dropped).
    pub(crate) fn enqueue(self: &Arc<Self>, ip: IpAddr) -> Option<Waiting> {
        let mut m = self.per_ip.lock().ok()?;
        if m.get(&ip)
            .is_some_and(|(_, n)| *n >= self.max_waiting_per_ip)
        {
            return None;
        }
        let room = self.waiting.clone().try_acquire_owned().ok()?;
        m.entry(ip)
            .or_insert_with(|| (Arc::new(Semaphore::new(self.max_per_ip)), 0))
            .1 += 1;
        Some(Waiting {
            _room: room,
            ip,
            admission: self.clone(),
        })
    }

    /// Wait (first come, first served) for a pre-authentication place:
    /// one of the address's, then one of all. `None` only when the budgets
    /// are closed.
    pub(crate) async fn place(&self, w: Waiting) -> Option<PreAuth> {
        let ip_places = self.per_ip.lock().ok()?.get(&w.ip)?.0.clone();
        let ip = ip_places.acquire_owned().await.ok()?;
        let global = self.preauth.clone().acquire_owned().await.ok()?;
        Some(PreAuth {
            _global: global,
            _ip: ip,
            _waiting: w,
        })
    }

    /// A pre-authentication place for a connection from `ip` at once, or
    /// `None` when the global budget or that address's share is used up.
    #[cfg(test)]
    pub(crate) fn pre_auth(self: &Arc<Self>, ip: IpAddr) -> Option<PreAuth> {
        let w = self.enqueue(ip)?;
        let ip_places = self.per_ip.lock().ok()?.get(&ip)?.0.clone();
        let ip = ip_places.try_acquire_owned().ok()?;
        let global = self.preauth.clone().try_acquire_owned().ok()?;
        Some(PreAuth {
            _global: global,
            _ip: ip,
            _waiting: w,
        })
    }

    /// A connection of `ip` left the waiting room (or gave back its place).
    fn leave(&self, ip: IpAddr) {
        if let Ok(mut m) = self.per_ip.lock() {
            if let Some((_, n)) = m.get_mut(&ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    m.remove(&ip);
                }
            }
        }
    }

    /// Slots for the `streams` data streams a session declared, taken at
    /// once when it opens (or `Busy`): an agent either gets room for all
    /// of its connections or is told to come back, so that many agents
    /// starting at once cannot each hold a control connection whose data
    /// streams find no room (none would ever finish).
    pub(crate) fn reserve(&self, streams: u16) -> Result<Vec<OwnedSemaphorePermit>, ReceiveError> {
        let mut all = self
            .sessions
            .clone()
            .try_acquire_many_owned(u32::from(streams))
            .map_err(|_| ReceiveError::Busy("at the connection limit; try again later"))?;
        let mut one_each = Vec::with_capacity(usize::from(streams));
        while let Some(p) = all.split(1) {
            one_each.push(p);
        }
        Ok(one_each)
    }

    /// A session slot for an authenticated connection, or `Busy`.
    pub(crate) fn session(&self) -> Result<OwnedSemaphorePermit, ReceiveError> {
        self.sessions
            .clone()
            .try_acquire_owned()
            .map_err(|_| ReceiveError::Busy("at the connection limit; try again later"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(global: usize, per_ip: usize, sessions: usize) -> Arc<Admission> {
        Admission::new(&ReceiverConfig {
            max_preauth_connections: global,
            max_preauth_per_ip: per_ip,
            max_connections: sessions,
            ..ReceiverConfig::default()
        })
    }

    #[test]
    fn one_address_cannot_take_more_than_its_share() {
        let a = admission(10, 2, 1);
        let (x, y) = ("127.0.0.2".parse().unwrap(), "127.0.0.1".parse().unwrap());
        let held: Vec<_> = (0..2).map(|_| a.pre_auth(x)).collect();
        assert!(held.iter().all(Option::is_some));
        assert!(a.pre_auth(x).is_none(), "a third place for one address");
        assert!(a.pre_auth(y).is_some(), "another address still gets in");
        drop(held);
        assert!(a.pre_auth(x).is_some(), "places come back on drop");
        assert!(a.per_ip.lock().unwrap().is_empty());
    }

    #[test]
    fn the_global_budget_holds_across_addresses() {
        let a = admission(2, 2, 1);
        let ips: Vec<IpAddr> = (1..=3)
            .map(|i| format!("127.0.0.{i}").parse().unwrap())
            .collect();
        let _p1 = a.pre_auth(ips[0]).unwrap();
        let _p2 = a.pre_auth(ips[1]).unwrap();
        assert!(a.pre_auth(ips[2]).is_none());
        // A refusal leaves no count behind.
        assert!(!a.per_ip.lock().unwrap().contains_key(&ips[2]));
    }

    #[tokio::test]
    async fn past_the_budget_a_connection_waits_its_turn_not_dropped() {
        let a = Admission::new(&ReceiverConfig {
            max_preauth_connections: 2,
            max_preauth_per_ip: 1,
            max_preauth_waiting: 3,
            max_preauth_waiting_per_ip: 2,
            ..ReceiverConfig::default()
        });
        let (x, y) = ("127.0.0.2".parse().unwrap(), "127.0.0.1".parse().unwrap());
        let first = a.place(a.enqueue(x).unwrap()).await.unwrap();
        // The address's place is taken: the next one waits in the room.
        let second = a.enqueue(x).unwrap();
        // That address's share of the room is full; the room is not.
        assert!(a.enqueue(x).is_none());
        let other = a.place(a.enqueue(y).unwrap()).await.unwrap();
        let mut waiting = std::pin::pin!(a.place(second));
        assert!(futures_util::poll!(waiting.as_mut()).is_pending());
        drop(first);
        let second = waiting.await.unwrap();
        drop((second, other));
        assert!(a.per_ip.lock().unwrap().is_empty());
        assert_eq!(a.waiting.available_permits(), 3);
    }

    #[test]
    fn session_slots_are_apart_and_say_busy() {
        let a = admission(1, 1, 1);
        let _s = a.session().unwrap();
        assert!(matches!(a.session(), Err(ReceiveError::Busy(_))));
        assert!(a.pre_auth("127.0.0.1".parse().unwrap()).is_some());
    }
}
