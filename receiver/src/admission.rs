//! Admission: the two budgets a connection passes through. Before it has
//! authenticated, a connection holds a pre-authentication place (global, and
//! per source address) for at most the first-byte deadline plus the TLS
//! handshake; only an enrolled, authorized peer then takes one of the
//! session slots (`max_connections`). Idle or slow TCP connections from one
//! address therefore cannot take the slots of enrolled agents, and a full
//! receiver answers an authenticated agent `Busy` instead of a reset.

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
    /// Pre-authentication places taken, by source address.
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    /// Most pre-authentication places of one address.
    max_per_ip: usize,
    /// Authenticated connection slots.
    sessions: Arc<Semaphore>,
}

/// A connection's place before it has authenticated; given back on drop.
pub(crate) struct PreAuth {
    _global: OwnedSemaphorePermit,
    ip: IpAddr,
    admission: Arc<Admission>,
}

impl Drop for PreAuth {
    fn drop(&mut self) {
        if let Ok(mut m) = self.admission.per_ip.lock() {
            if let Some(n) = m.get_mut(&self.ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    m.remove(&self.ip);
                }
            }
        }
    }
}

impl Admission {
    /// The budgets of `cfg`.
    pub(crate) fn new(cfg: &ReceiverConfig) -> Arc<Self> {
        Arc::new(Self {
            preauth: Arc::new(Semaphore::new(cfg.max_preauth_connections.max(1))),
            per_ip: Mutex::new(HashMap::new()),
            max_per_ip: cfg.max_preauth_per_ip.max(1),
            sessions: Arc::new(Semaphore::new(cfg.max_connections.max(1))),
        })
    }

    /// A pre-authentication place for a connection from `ip`, or `None`
    /// when the global budget or that address's share is used up.
    pub(crate) fn pre_auth(self: &Arc<Self>, ip: IpAddr) -> Option<PreAuth> {
        let mut m = self.per_ip.lock().ok()?;
        if m.get(&ip).copied().unwrap_or(0) >= self.max_per_ip {
            return None;
        }
        let global = self.preauth.clone().try_acquire_owned().ok()?;
        *m.entry(ip).or_insert(0) += 1;
        Some(PreAuth {
            _global: global,
            ip,
            admission: self.clone(),
        })
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

    #[test]
    fn session_slots_are_apart_and_say_busy() {
        let a = admission(1, 1, 1);
        let _s = a.session().unwrap();
        assert!(matches!(a.session(), Err(ReceiveError::Busy(_))));
        assert!(a.pre_auth("127.0.0.1".parse().unwrap()).is_some());
    }
}
