//! Setting up: the directory (`init`, `rebuild`), identities (`enroll`,
//! `revoke`) and restore grants (`grant`).

use std::path::Path;

use pilotlight_receiver::admin;

use crate::cli::GrantArgs;

/// `init`: the bucket, when one is given, is checked before anything is
/// written.
pub(crate) fn init(
    dir: &Path,
    listen: Option<&str>,
    store: Option<&str>,
    object_lock_days: Option<u32>,
) -> anyhow::Result<()> {
    let url = store
        .map(|s| pilotlight_receiver::objstore::setup::check(s, object_lock_days))
        .transpose()?;
    admin::init(dir, listen)?;
    println!("initialized receiver directory {}", dir.display());
    if let Some(url) = url {
        let key = pilotlight_receiver::objstore::setup::record(dir, &url, object_lock_days)?;
        println!(
            "history goes to {url}, sealed with the key {}: keep a copy of that file offline, away from this host, since without it the bucket cannot be read to rebuild this receiver",
            key.display()
        );
    }
    Ok(())
}

/// `rebuild`: a new directory from the object store.
pub(crate) fn rebuild(dir: &Path, store: &str, key: Option<&Path>) -> anyhow::Result<()> {
    let r = pilotlight_receiver::objstore::rebuild::rebuild(dir, store, key)?;
    println!(
        "rebuilt {} from {store}: {} points of {} servers (catalog snapshot of {} and {} journal records after it); packs come back on first read, staging images when serve starts",
        dir.display(),
        r.points,
        r.servers,
        pilotlight_protocol::clock::rfc3339(r.snapshot_ms),
        r.journal_records
    );
    Ok(())
}

/// `enroll`: a server's identity, or an operator's.
pub(crate) fn enroll(
    dir: &Path,
    (server, operator): (Option<String>, Option<String>),
    out: &Path,
) -> anyhow::Result<()> {
    match (server, operator) {
        (Some(server), _) => {
            admin::enroll(dir, &server, out)?;
            println!("wrote identity of server {server} to {}", out.display());
        }
        (None, Some(name)) => {
            let certs = admin::enroll_operator(dir, &name, out)?;
            println!(
                "wrote operator identity {name} to {} and {}/ (for nbds:// clients: tls-certificates={})",
                out.display(),
                certs.display(),
                certs.display()
            );
        }
        (None, None) => anyhow::bail!("enroll needs --server NAME or --operator NAME"),
    }
    Ok(())
}

/// `revoke`.
pub(crate) fn revoke(dir: &Path, server: &str) -> anyhow::Result<()> {
    admin::revoke(dir, server)?;
    println!("revoked the identity of server {server}");
    Ok(())
}

/// `grant`: make or withdraw one, or list them.
pub(crate) fn grant(a: GrantArgs) -> anyhow::Result<()> {
    match (a.server, a.restore_from) {
        (Some(server), Some(from)) => grant_one(&a.dir, &server, &from, a.revoke),
        _ if a.list => print_grants(&admin::restore_grants(&a.dir)?, a.json),
        _ => anyhow::bail!("--server and --restore-from, or --list"),
    }
}

/// `grant`: make or withdraw one restore grant, saying what changed.
fn grant_one(dir: &std::path::Path, server: &str, from: &str, revoke: bool) -> anyhow::Result<()> {
    let line = if !revoke {
        if admin::grant_restore(dir, server, from)? {
            "may now restore"
        } else {
            "could already restore"
        }
    } else if admin::revoke_restore(dir, server, from)? {
        "may no longer restore"
    } else {
        "had no grant to restore"
    };
    println!("server {server} {line} the volumes of server {from}");
    Ok(())
}

/// `grant --list`.
fn print_grants(
    grants: &[pilotlight_receiver::catalog::RestoreGrant],
    json: bool,
) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(grants)?);
        return Ok(());
    }
    if grants.is_empty() {
        println!("no restore grants (each server restores only its own volumes)");
    }
    for g in grants {
        println!(
            "{} may restore the volumes of {} (granted {})",
            g.server,
            g.restore_from,
            pilotlight_protocol::clock::rfc3339(g.granted_ms)
        );
    }
    Ok(())
}
