//! `receiver.toml`: the receiver's configuration, written by `init`.
//! Command-line flags override it. Defaults live here and nowhere else.

use std::path::Path;
use std::time::Duration;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::quota::{DedupScope, Limits, Size};
use crate::session::SessionVolume;
use crate::ReceiveError;

/// Name of the config file in the receiver directory.
pub const CONFIG_FILE: &str = "receiver.toml";

/// The receiver's configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReceiverConfig {
    /// Address to listen on for agents.
    pub listen: String,
    /// Most authenticated connections (control and data) served at once;
    /// past it an agent gets a `Busy` error and backs off.
    pub max_connections: usize,
    /// Most connections not yet authenticated (before and during the TLS
    /// handshake), from all addresses together: kept apart from
    /// `max_connections`, so idle TCP connections cannot take the slots of
    /// enrolled agents.
    pub max_preauth_connections: usize,
    /// Most connections not yet authenticated from one source address.
    pub max_preauth_per_ip: usize,
    /// Most connections waiting for a pre-authentication place, from all
    /// addresses together: past the budgets above a new connection waits
    /// (up to `handshake_timeout_secs`) instead of being dropped; only past
    /// this one is it dropped (which the peer sees as a reset).
    pub max_preauth_waiting: usize,
    /// Most connections of one source address waiting for, or holding, a
    /// pre-authentication place.
    pub max_preauth_waiting_per_ip: usize,
    /// Seconds a connection may wait for a pre-authentication place before
    /// it is dropped: longer than an agent's own connect timeout (15 s), so
    /// that under a burst of connections an agent gives up and backs off
    /// by itself rather than see a reset.
    pub preauth_wait_secs: u64,
    /// Length of the listen queue (`listen(2)` backlog; the kernel caps it
    /// at `net.core.somaxconn`).
    pub listen_backlog: u32,
    /// Seconds a new TCP connection has to send its first byte (the start
    /// of the TLS ClientHello); then `handshake_timeout_secs` applies.
    pub first_byte_timeout_secs: u64,
    /// Seconds a peer has to finish the TLS handshake and its `Hello`.
    pub handshake_timeout_secs: u64,
    /// Seconds one frame may take to be written to a peer (a peer that stops
    /// reading, with a zero TCP window, is closed after it).
    pub write_timeout_secs: u64,
    /// How many times the blocks of its declared volumes one point may send:
    /// pre-copy rounds resend blocks written meanwhile, and the frozen
    /// delta resends them once more. More blocks in one point end the
    /// session with an error (it bounds the receiver's memory per point).
    /// At least 3: agents stop pre-copy rounds at twice their volumes'
    /// blocks, and the frozen delta adds at most once more.
    pub point_resend_factor: u64,
    /// Milliseconds between two checks of every live session's identity in
    /// the catalog: a revoked or superseded identity is closed within it.
    pub identity_check_ms: u64,
    /// Seconds a session may stay silent mid-transfer before it is closed.
    pub idle_timeout_secs: u64,
    /// Seconds a control connection whose agent sends `Ping` (every 20 s)
    /// may stay silent before it is closed; agents without `Ping` are not
    /// timed out (they cannot tell quiet from gone).
    pub control_idle_timeout_secs: u64,
    /// Most points of one session received but not yet committed.
    pub max_pending_points: usize,
    /// Most MiB of block frames of one session read but not yet applied.
    pub max_session_inflight_mib: usize,
    /// Address to serve Prometheus metrics on (none by default).
    pub metrics: Option<String>,
    /// Seconds between two passes of pruning (by `retention`) and garbage
    /// collection inside `serve`; 0 turns them off.
    pub prune_interval_secs: u64,
    /// Garbage collection rewrites a pack once this percentage of it is dead.
    pub gc_min_dead_percent: u8,
    /// Entries of the block index's cache (locations and ownerships of
    /// blocks found, about 100 bytes each); the index itself is the
    /// catalog, so this bounds memory, not the store.
    pub index_cache_entries: usize,
    /// An agent's clock may be off the receiver's by this many seconds
    /// before the receiver warns (points are dated by the receiver's clock
    /// either way; `status` shows each server's skew).
    pub max_clock_skew_secs: u64,
    /// Which stored blocks a block may be deduplicated against: `"server"`
    /// (the default: only the same server's) or `"global"` (any server's,
    /// at the price of an oracle across servers: see the README).
    pub dedup: DedupScope,
    /// Every server's quota (bytes, or a size such as `"500 GiB"`): the
    /// stored bytes of the blocks it has stored plus what its open session
    /// wrote and has not committed. Unlimited by default.
    pub quota: Size,
    /// Every server's recovery point objective: `status`, the console and
    /// `pilotlight_receiver_rpo_breached` flag a server whose newest point
    /// is older (humantime, default "5m").
    pub rpo_target: Span,
    /// Per-server quotas, overriding `quota`: `web1 = "2 TiB"`.
    pub quotas: BTreeMap<String, Size>,
    /// Per-server recovery point objectives, overriding `rpo_target`:
    /// `db1 = "1m"`.
    pub rpo_targets: BTreeMap<String, Span>,
    /// Most pack bytes a session's uncommitted points may write. By default
    /// what one point of the declared volumes may send (every block,
    /// `point_resend_factor` times) plus the in-flight window.
    pub max_session_uncommitted: Option<Size>,
    /// Which points `prune` keeps when no `--keep-*` flag is given, and the
    /// minimum history (`min_keep`) it keeps whatever the flags say.
    pub retention: crate::retention::Policy,
    /// Off-host history in S3-compatible object storage (`init --store`):
    /// none by default (the local directory holds everything).
    pub store: Option<StoreConfig>,
}

/// `[store]`: where sealed packs and catalog snapshots go. Endpoint and
/// credentials come from the standard AWS environment (`AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL`); the key that
/// seals every object is `DIR/store.key`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// `s3://BUCKET/PREFIX`: every object of this receiver is under PREFIX,
    /// so several receivers may share one bucket.
    pub url: String,
    /// Most bytes of packs kept in the local directory: packs already in
    /// the bucket are evicted past it and downloaded again on a miss.
    pub cache: Size,
    /// Least seconds between two catalog snapshots (each commit's changes
    /// are in the bucket's journal before `DURABLE` in any case; a
    /// snapshot trims the journal).
    pub snapshot_secs: u64,
    /// How long a command (`gc`, `prune`, `verify`, `restore`, `rebuild`)
    /// waits for an unreachable store before it fails.
    pub command_wait_secs: u64,
    /// Immutable history: the bucket must have S3 Object Lock enabled with
    /// a default retention of at least this many days (checked at `init`
    /// and when `serve` starts), so every object is locked that long from
    /// its upload and garbage collection deletes none before its
    /// retention ends. Not set: no lock.
    pub object_lock_days: Option<u32>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            cache: Size(Some(8 << 30)),
            snapshot_secs: 300,
            command_wait_secs: 60,
            object_lock_days: None,
        }
    }
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:7443".into(),
            // 500 agents with a control connection and two data streams each.
            max_connections: 2048,
            max_preauth_connections: 128,
            max_preauth_per_ip: 8,
            max_preauth_waiting: 4096,
            max_preauth_waiting_per_ip: 2048,
            preauth_wait_secs: 60,
            listen_backlog: 4096,
            first_byte_timeout_secs: 3,
            handshake_timeout_secs: 10,
            write_timeout_secs: 30,
            point_resend_factor: 4,
            identity_check_ms: 1000,
            idle_timeout_secs: 120,
            control_idle_timeout_secs: 120,
            max_pending_points: 8,
            max_session_inflight_mib: 64,
            metrics: None,
            prune_interval_secs: 600,
            gc_min_dead_percent: 20,
            index_cache_entries: crate::catalog::DEFAULT_CACHE_ENTRIES,
            max_clock_skew_secs: 300,
            dedup: DedupScope::Server,
            quota: Size::UNLIMITED,
            rpo_target: Span(Duration::from_secs(300)),
            quotas: BTreeMap::new(),
            rpo_targets: BTreeMap::new(),
            max_session_uncommitted: None,
            retention: crate::retention::Policy::default(),
            store: None,
        }
    }
}

impl ReceiverConfig {
    /// Read `DIR/receiver.toml`, or the defaults if it does not exist.
    pub fn load(dir: &Path) -> Result<Self, ReceiveError> {
        let path = dir.join(CONFIG_FILE);
        match std::fs::read_to_string(&path) {
            Ok(s) => toml::from_str(&s)
                .map_err(|e| ReceiveError::Config(format!("{} is not valid: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(ReceiveError::storage(path, e)),
        }
    }

    /// How long a connection may wait for a pre-authentication place.
    pub fn preauth_wait(&self) -> Duration {
        Duration::from_secs(self.preauth_wait_secs.max(1))
    }

    /// How long a peer has to finish the TLS handshake and its `Hello`.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.handshake_timeout_secs.max(1))
    }

    /// First-byte deadline of a new connection.
    pub fn first_byte_timeout(&self) -> Duration {
        Duration::from_secs(self.first_byte_timeout_secs.max(1))
    }

    /// Write deadline of one frame.
    pub fn write_timeout(&self) -> Duration {
        Duration::from_secs(self.write_timeout_secs.max(1))
    }

    /// Period of the identity check of live sessions.
    pub fn identity_check(&self) -> Duration {
        Duration::from_millis(self.identity_check_ms.max(100))
    }

    /// How often `serve` prunes and collects garbage, if at all.
    pub fn prune_interval(&self) -> Option<Duration> {
        (self.prune_interval_secs > 0).then(|| Duration::from_secs(self.prune_interval_secs))
    }

    /// How far an agent's clock may be off before the receiver warns.
    pub fn max_clock_skew(&self) -> Duration {
        Duration::from_secs(self.max_clock_skew_secs)
    }

    /// How long a pinging agent's control connection may stay silent.
    pub fn control_idle_timeout(&self) -> Duration {
        Duration::from_secs(self.control_idle_timeout_secs.max(1))
    }

    /// Bytes of block frames one session may have read and not applied.
    pub fn session_inflight_bytes(&self) -> usize {
        self.max_session_inflight_mib.max(8) << 20
    }

    /// The recovery point objective of `server`.
    pub fn rpo_target_of(&self, server: &str) -> Duration {
        self.rpo_targets.get(server).unwrap_or(&self.rpo_target).0
    }

    /// The quota of `server` (`None`: unlimited).
    pub fn quota_of(&self, server: &str) -> Option<u64> {
        crate::quota::quota_of(self.quota, &self.quotas, server)
    }

    /// The bounds of a session of `server` that declared `volumes`.
    pub fn limits_for(&self, server: &str, volumes: &[SessionVolume]) -> Limits {
        let max_uncommitted = match self.max_session_uncommitted {
            Some(s) => s.bytes().unwrap_or(u64::MAX),
            None => crate::quota::default_uncommitted_cap(
                volumes,
                self.point_resend_factor,
                self.session_inflight_bytes() as u64,
            ),
        };
        Limits {
            dedup: self.dedup,
            quota: self.quota_of(server),
            max_uncommitted,
        }
    }

    /// Idle timeout.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs.max(1))
    }
}

/// A duration written for humans in `receiver.toml` ("5m", "90s", "1h").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span(pub Duration);

impl Serialize for Span {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text)
            .map(Span)
            .map_err(|e| serde::de::Error::custom(format!("{text:?} is not a duration: {e}")))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code
    use super::*;

    #[test]
    fn quotas_and_the_dedup_scope_read_from_toml() {
        let cfg: ReceiverConfig = toml::from_str(
            r#"
            dedup = "global"
            quota = "500 GiB"
            max_session_uncommitted = "8 GiB"
            [quotas]
            web1 = "2 TiB"
            build = "unlimited"
            db2 = 1048576
            "#,
        )
        .unwrap();
        assert_eq!(cfg.dedup, DedupScope::Global);
        assert_eq!(cfg.quota_of("web1"), Some(2 << 40));
        assert_eq!(cfg.quota_of("build"), None);
        assert_eq!(cfg.quota_of("db2"), Some(1 << 20));
        assert_eq!(cfg.quota_of("other"), Some(500 << 30));
        assert_eq!(cfg.limits_for("other", &[]).max_uncommitted, 8 << 30);
        assert!(toml::from_str::<ReceiverConfig>("dedup = \"everyone\"").is_err());
        assert!(toml::from_str::<ReceiverConfig>("quota = \"lots\"").is_err());
    }

    #[test]
    fn the_store_section_reads_from_toml_and_is_absent_by_default() {
        let cfg: ReceiverConfig = toml::from_str(
            r#"
            [store]
            url = "s3://bucket/site-a"
            cache = "2 GiB"
            "#,
        )
        .unwrap();
        let store = cfg.store.unwrap();
        assert_eq!(store.url, "s3://bucket/site-a");
        assert_eq!(store.cache, Size(Some(2 << 30)));
        assert!(ReceiverConfig::default().store.is_none());
        assert!(toml::from_str::<ReceiverConfig>("[store]\nurl = \"s3://b\"\nbogus = 1").is_err());
    }

    #[test]
    fn the_defaults_scope_dedup_per_server_without_quota_and_round_trip() {
        let cfg = ReceiverConfig::default();
        assert_eq!(cfg.dedup, DedupScope::Server);
        assert_eq!(cfg.quota_of("web1"), None);
        let text = toml::to_string(&cfg).unwrap();
        let back: ReceiverConfig = toml::from_str(&text).unwrap();
        assert_eq!(back.dedup, DedupScope::Server);
        assert_eq!(back.quota, Size::UNLIMITED);
        assert!(back.quotas.is_empty() && back.max_session_uncommitted.is_none());
    }
}
