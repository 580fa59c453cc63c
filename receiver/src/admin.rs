//! Operator commands that manage the receiver directory: `init`, `enroll`,
//! `revoke`, `points`.

use std::net::IpAddr;
use std::path::Path;

use pilotlight_protocol::limits::valid_name;

use crate::catalog::{Catalog, PointInfo};
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

/// Refuse the current identity of `server` from now on.
pub fn revoke(dir: &Path, server: &str) -> Result<(), ReceiveError> {
    let store = Store::open(dir)?;
    if !store.catalog()?.revoke(server)? {
        return Err(crate::catalog::no_such_server(server));
    }
    Ok(())
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
    /// Created (RFC 3339).
    pub created: String,
    /// Kept or removed.
    pub keep: bool,
    /// Why it is kept.
    pub reasons: Vec<&'static str>,
}

/// Apply a retention policy to the points of one server or of all; with
/// `dry_run`, only say what would go. Removed points' changes are folded into
/// the next point, so every kept point restores exactly as before.
pub fn prune(
    dir: &Path,
    server: Option<&str>,
    policy: &crate::retention::Policy,
    dry_run: bool,
) -> Result<Vec<PruneItem>, ReceiveError> {
    prune_store(&Store::open(dir)?, server, policy, dry_run)
}

/// [`prune`] on an open store (`serve` prunes its own on a schedule).
pub fn prune_store(
    store: &Store,
    server: Option<&str>,
    policy: &crate::retention::Policy,
    dry_run: bool,
) -> Result<Vec<PruneItem>, ReceiveError> {
    if let Some(s) = server {
        store.catalog()?.require_server(s)?;
    }
    let servers = store.catalog()?.servers()?;
    let mut out = Vec::new();
    for s in servers
        .iter()
        .filter(|s| server.is_none_or(|n| n == s.name))
    {
        let points = store.catalog()?.points(Some(&s.name))?;
        let pairs: Vec<(i64, i64)> = points.iter().map(|p| (p.id, p.created_ms)).collect();
        for v in crate::retention::select(&pairs, policy) {
            let created = points
                .iter()
                .find(|p| p.id == v.id)
                .map(|p| p.created.clone())
                .unwrap_or_default();
            if !v.keep && !dry_run {
                store.catalog()?.delete_point(s.id, v.id)?;
            }
            out.push(PruneItem {
                server: s.name.clone(),
                point: v.id,
                created,
                keep: v.keep,
                reasons: v.reasons,
            });
        }
    }
    Ok(out)
}
