//! Operator commands that manage the receiver directory: `init`, `enroll`,
//! `revoke`, `grant`, `points`.

use std::net::IpAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use pilotlight_protocol::limits::valid_name;

use crate::catalog::{Catalog, PointInfo, RestoreGrant, ServerRow};
use crate::config::{ReceiverConfig, CONFIG_FILE};
use crate::store::{Store, CATALOG_FILE};
use crate::{pki, ReceiveError};

/// Create a receiver directory: CA, server certificate, `receiver.toml`,
/// an empty catalog and the `packs/` and `staging/` folders.
///
/// The directory and its folders are 0700 (an existing directory is made
/// so), keys, catalog and packs 0600, whatever the umask: the store holds
/// every enrolled server's data.
pub fn init(dir: &Path, listen: Option<&str>) -> Result<(), ReceiveError> {
    if dir.join(CONFIG_FILE).exists() || dir.join("ca.pem").exists() {
        return Err(ReceiveError::Refused(format!(
            "{} is already a receiver directory",
            dir.display()
        )));
    }
    for sub in ["", "packs", "staging"] {
        let p = dir.join(sub);
        crate::store::create_private_dir(&p)?;
        crate::store::set_mode(&p, crate::store::PRIVATE_DIR_MODE)?;
    }
    let mut cfg = ReceiverConfig::default();
    if let Some(l) = listen {
        cfg.listen = l.to_owned();
    }
    let mut ips: Vec<IpAddr> = Vec::new();
    if let Ok(addr) = cfg.listen.parse::<std::net::SocketAddr>() {
        if !addr.ip().is_unspecified() {
            ips.push(addr.ip());
        }
    }
    pki::create_ca(dir, &ips)?;
    let text = toml::to_string_pretty(&cfg)
        .map_err(|e| ReceiveError::Config(format!("writing {CONFIG_FILE}: {e}")))?;
    let header =
        "# pilotlight receiver configuration. Flags on the command line override these keys.\n";
    pki::write_new(
        &dir.join(CONFIG_FILE),
        format!("{header}{text}").as_bytes(),
        0o644,
    )?;
    let mut cat = Catalog::open(&dir.join(CATALOG_FILE))?;
    cat.store_id()?;
    crate::store::sync_dir(dir)?;
    Ok(())
}

/// Issue an identity for `server` into `out` (mode 0600). A new enrollment
/// supersedes the server's previous identity.
pub fn enroll(dir: &Path, server: &str, out: &Path) -> Result<(), ReceiveError> {
    if !valid_name(server) {
        return Err(ReceiveError::Refused(format!(
            "{server:?} is not a valid server name (use 1 to 64 of a-z, 0-9, '.', '_', '-')"
        )));
    }
    let store = Store::open(dir)?;
    let (pem, serial) = pki::issue_identity(dir, server)?;
    pki::write_new(out, pem.as_bytes(), 0o600)?;
    store.catalog()?.set_identity(server, &serial)?;
    Ok(())
}

/// Issue an operator identity `name` (remote export over TLS): the bundle
/// at `out` (0600, like an agent's), and beside it `OUT.nbd/` (0700) with
/// `ca-cert.pem`, `client-cert.pem` and `client-key.pem`, the layout libnbd
/// and QEMU read. Returns that directory.
pub fn enroll_operator(dir: &Path, name: &str, out: &Path) -> Result<PathBuf, ReceiveError> {
    if !valid_name(name) {
        return Err(ReceiveError::Refused(format!(
            "{name:?} is not a valid operator name (use 1 to 64 of a-z, 0-9, '.', '_', '-')"
        )));
    }
    let id = pki::issue_operator(dir, name)?;
    let mut certs = out.as_os_str().to_owned();
    certs.push(".nbd");
    let certs = PathBuf::from(certs);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&certs)
        .map_err(|e| ReceiveError::storage(&certs, e))?;
    let bundle = format!(
        "{}{}{}",
        id.cert,
        id.ca.trim_end().to_owned() + "\n",
        id.key
    );
    pki::write_new(out, bundle.as_bytes(), 0o600)?;
    pki::write_new(&certs.join("ca-cert.pem"), id.ca.as_bytes(), 0o600)?;
    pki::write_new(&certs.join("client-cert.pem"), id.cert.as_bytes(), 0o600)?;
    pki::write_new(&certs.join("client-key.pem"), id.key.as_bytes(), 0o600)?;
    Ok(certs)
}

/// Refuse the current identity of `server` from now on.
pub fn revoke(dir: &Path, server: &str) -> Result<(), ReceiveError> {
    let store = Store::open(dir)?;
    if !store.catalog()?.revoke(server)? {
        return Err(crate::catalog::no_such_server(server));
    }
    Ok(())
}

/// Let `server` restore the volumes of `from` over the network (fail back:
/// `web1` restores from `web1-recovery`). Returns false if it already could.
pub fn grant_restore(dir: &Path, server: &str, from: &str) -> Result<bool, ReceiveError> {
    let store = Store::open(dir)?;
    let granted = store.catalog()?.grant_restore(server, from)?;
    Ok(granted)
}

/// Withdraw the grant that lets `server` restore the volumes of `from`;
/// restores already running finish. Returns false if there was none.
pub fn revoke_restore(dir: &Path, server: &str, from: &str) -> Result<bool, ReceiveError> {
    let store = Store::open(dir)?;
    let revoked = store.catalog()?.revoke_restore(server, from)?;
    Ok(revoked)
}

/// Every restore grant.
pub fn restore_grants(dir: &Path) -> Result<Vec<RestoreGrant>, ReceiveError> {
    let store = Store::open(dir)?;
    let grants = store.catalog()?.restore_grants()?;
    Ok(grants)
}

/// The points of one server or of all.
pub fn points(dir: &Path, server: Option<&str>) -> Result<Vec<PointInfo>, ReceiveError> {
    let store = Store::open(dir)?;
    if let Some(s) = server {
        store.catalog()?.require_server(s)?;
    }
    let points = store.catalog()?.points(server)?;
    Ok(points)
}

/// The in-progress syncs (of one server, or all), each with the number
/// its point will get: `points` lists them as in progress.
pub fn syncs(
    dir: &Path,
    server: Option<&str>,
) -> Result<Vec<(i64, crate::catalog::SyncRow)>, ReceiveError> {
    let store = Store::open(dir)?;
    let cat = store.catalog()?;
    let mut out = Vec::new();
    for row in cat.syncs(server)? {
        if let Some(s) = cat.sync_seq(&row.server)? {
            out.push(s);
        }
    }
    Ok(out)
}

/// Collect garbage: free the pack space no point needs. Takes the store the
/// way `serve` does (repairs included), so it refuses while `serve` runs;
/// `serve` collects by itself every `prune_interval_secs`.
pub fn gc(dir: &Path, opts: crate::gc::GcOptions) -> Result<crate::gc::GcReport, ReceiveError> {
    let store = Store::open_for_serve(dir)?;
    crate::gc::collect(&store, &|| Ok(crate::gc::Pins::default()), opts)
}

/// What `prune` decided for one point.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PruneItem {
    /// Server name.
    pub server: String,
    /// Point id.
    pub point: i64,
    /// Created, by the receiver's clock (RFC 3339).
    pub created: String,
    /// Kept, or removed (or to be removed, when `error` says why it was not).
    pub keep: bool,
    /// Why it is kept.
    pub reasons: Vec<&'static str>,
    /// Why the point the policy let go is still there: its removal failed,
    /// and prune went on with the next point.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl PruneItem {
    /// Whether the point was removed (or, in a dry run, would be).
    pub fn removed(&self) -> bool {
        !self.keep && self.error.is_none()
    }
}

/// Apply a retention policy to the points of one server or of all; with
/// `dry_run`, only say what would go. Removed points' changes are folded into
/// the next point, so every kept point restores exactly as before. A point
/// whose removal fails is reported in its item (`error`) and the others are
/// still pruned.
pub fn prune(
    dir: &Path,
    server: Option<&str>,
    policy: &crate::retention::Policy,
    dry_run: bool,
) -> Result<Vec<PruneItem>, ReceiveError> {
    prune_store(&Store::open(dir)?, server, policy, dry_run)
}

/// [`prune`] on an open store (`serve` prunes its own on a schedule). Ages
/// are by the receiver's clock now.
pub fn prune_store(
    store: &Store,
    server: Option<&str>,
    policy: &crate::retention::Policy,
    dry_run: bool,
) -> Result<Vec<PruneItem>, ReceiveError> {
    if let Some(s) = server {
        store.catalog()?.require_server(s)?;
    }
    // The server list first: a catalog guard held across the loop would
    // deadlock on the next `catalog()`.
    let all = store.catalog()?.servers()?;
    let mut servers = Vec::new();
    for s in all {
        if server.is_none_or(|n| n == s.name) {
            let points = store.catalog()?.points(Some(&s.name))?;
            servers.push((s, points));
        }
    }
    let mut delete = |server_id: i64, id: i64| -> Result<(), ReceiveError> {
        if dry_run {
            return Ok(());
        }
        store.catalog()?.delete_point(server_id, id)
    };
    let now = pilotlight_protocol::clock::now_ms();
    // Points a running export pins stay; the pins cannot change until the
    // deletions are done (see `export::pin`).
    let _pins = crate::export::pin::lock(store.dir())?;
    let pinned = crate::export::pin::pinned_points(store.dir())?;
    Ok(prune_servers(&servers, policy, now, &pinned, &mut delete))
}

/// The points of each server judged by `policy` at `now_ms`; `delete`
/// removes one (server row id, point key); `pinned` holds the keys of
/// exported points, which stay. A failed removal is logged and reported in
/// its item, and pruning goes on with the next point and the next server: one server's
/// refused point must not keep every other server's space from being freed.
fn prune_servers(
    servers: &[(ServerRow, Vec<PointInfo>)],
    policy: &crate::retention::Policy,
    now_ms: i64,
    pinned: &std::collections::HashSet<i64>,
    delete: &mut dyn FnMut(i64, i64) -> Result<(), ReceiveError>,
) -> Vec<PruneItem> {
    let mut out = Vec::new();
    for (s, points) in servers {
        let pairs: Vec<(i64, i64)> = points.iter().map(|p| (p.id, p.created_ms)).collect();
        for mut v in crate::retention::select(&pairs, policy, now_ms) {
            let Some(p) = points.iter().find(|p| p.id == v.id) else {
                continue;
            };
            if pinned.contains(&p.key) {
                v.keep = true;
                v.reasons.push("exported");
            }
            let error = if v.keep {
                None
            } else {
                delete(s.id, p.key).err().map(|e| {
                    tracing::warn!(server = %s.name, point = v.id, cause = %e, "could not prune a point");
                    e.to_string()
                })
            };
            out.push(PruneItem {
                server: s.name.clone(),
                point: v.id,
                created: p.created.clone(),
                keep: v.keep,
                reasons: v.reasons,
                error,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code
    use super::*;
    use crate::retention::Policy;

    fn server(id: i64, name: &str) -> ServerRow {
        ServerRow {
            id,
            name: name.into(),
            cert_serial: None,
            revoked: false,
        }
    }

    fn point(id: i64, server: &str, created_ms: i64) -> PointInfo {
        PointInfo {
            id,
            key: id,
            server: server.into(),
            created: pilotlight_protocol::clock::rfc3339(created_ms),
            created_ms,
            source_time: pilotlight_protocol::clock::rfc3339(created_ms),
            source_ms: created_ms,
            consistency: "crash-consistent".into(),
            commit: "sync".into(),
            volumes: Vec::new(),
        }
    }

    /// A point an export pins stays, whatever the policy says, and says why.
    #[test]
    fn prune_keeps_exported_points() {
        let h = 3_600_000;
        let servers = vec![(
            server(1, "a"),
            vec![point(1, "a", h), point(2, "a", 2 * h), point(3, "a", 3 * h)],
        )];
        let mut deleted = Vec::new();
        let mut delete = |_: i64, id: i64| {
            deleted.push(id);
            Ok(())
        };
        let pinned = std::collections::HashSet::from([1]);
        let items = prune_servers(&servers, &Policy::none(), 100 * h, &pinned, &mut delete);
        assert_eq!(deleted, vec![2]);
        let first = items.iter().find(|i| i.point == 1).unwrap();
        assert!(first.keep && first.reasons.contains(&"exported"));
    }

    /// A refused removal (here: every removal of server a's point 1) is
    /// reported, and the rest of a and all of b are still pruned.
    #[test]
    fn prune_goes_on_past_a_failing_removal() {
        let h = 3_600_000;
        let servers = vec![
            (
                server(1, "a"),
                vec![point(1, "a", h), point(2, "a", 2 * h), point(3, "a", 3 * h)],
            ),
            (server(2, "b"), vec![point(4, "b", h), point(5, "b", 2 * h)]),
        ];
        let mut deleted = Vec::new();
        let mut delete = |server_id: i64, id: i64| {
            if id == 1 {
                return Err(ReceiveError::Refused(format!("point {id} is held")));
            }
            deleted.push((server_id, id));
            Ok(())
        };
        let none = std::collections::HashSet::new();
        let items = prune_servers(&servers, &Policy::none(), 100 * h, &none, &mut delete);
        assert_eq!(deleted, vec![(1, 2), (2, 4)]);
        let by_point = |id: i64| items.iter().find(|i| i.point == id).unwrap();
        assert_eq!(by_point(1).error.as_deref(), Some("point 1 is held"));
        assert!(!by_point(1).keep && !by_point(1).removed());
        assert!(by_point(2).removed() && by_point(4).removed());
        assert!(by_point(3).keep && by_point(5).keep);
        let json = serde_json::to_value(by_point(1)).unwrap();
        assert_eq!(json["error"], "point 1 is held");
        assert!(serde_json::to_value(by_point(2))
            .unwrap()
            .get("error")
            .is_none());
    }
}
