//! `rebuild --dir NEWDIR --store s3://BUCKET/PREFIX --key FILE`: a new
//! staging host recovers a receiver directory from the bucket: the newest
//! catalog snapshot (opened with the key, then checked) and the journal
//! records after it ([`super::replay`]: every point acknowledged `DURABLE`
//! is in them, every prune and collection too), the directory's
//! files (receiver.toml, the PKI, so enrolled agents keep their
//! identities), the key itself and empty `packs/` and `staging/`. Packs
//! come back on first read ([`super::cache`]); `serve` rebuilds the staging
//! images when it starts, as it repairs them after a crash.

use std::collections::BTreeMap;
use std::path::Path;

use super::crypto::{open_all, KEY_FILE};
use super::snapshot::DIR_FILES;
use super::{Offsite, OffsiteError, StoreKey};
use crate::config::{ReceiverConfig, StoreConfig, CONFIG_FILE};
use crate::store::{create_private_dir, set_mode, sync_dir, Store, CATALOG_FILE, PRIVATE_DIR_MODE};
use crate::ReceiveError;

/// What `rebuild` recovered.
#[derive(Debug, Clone)]
pub struct RebuildReport {
    /// When the snapshot it recovered was taken (ms since the epoch).
    pub snapshot_ms: i64,
    /// Journal records applied after the snapshot.
    pub journal_records: usize,
    /// Points in it.
    pub points: usize,
    /// Servers with points in it.
    pub servers: usize,
}

/// Recreate the receiver directory `dir` from the store at `url`, with the
/// key file `key`.
pub fn rebuild(dir: &Path, url: &str, key: Option<&Path>) -> Result<RebuildReport, ReceiveError> {
    let Some(key_path) = key else {
        return Err(ReceiveError::Refused(
            "rebuild needs the store key: pass --key FILE, the copy of store.key you kept offline when the store was set up (without it the bucket cannot be read)".into(),
        ));
    };
    let key = StoreKey::load(key_path)?;
    let key_bytes = std::fs::read(key_path).map_err(|e| ReceiveError::storage(key_path, e))?;
    if dir.exists()
        && std::fs::read_dir(dir)
            .map_err(|e| ReceiveError::storage(dir, e))?
            .next()
            .is_some()
    {
        return Err(ReceiveError::Refused(format!(
            "{} is not empty; rebuild makes a new receiver directory",
            dir.display()
        )));
    }
    create_private_dir(dir)?;
    let cfg = StoreConfig {
        url: url.to_owned(),
        ..StoreConfig::default()
    };
    let offsite = Offsite::new(dir, &cfg, key)?;
    let manifest = offsite.block_on(offsite.manifest()).map_err(|e| match e {
        OffsiteError::Unsealed { .. } => ReceiveError::Refused(format!(
            "the key {} does not open the store {url}: it is not the key this receiver's objects were sealed with",
            key_path.display()
        )),
        OffsiteError::Missing(_) => ReceiveError::NotFound(format!(
            "the store {url} holds no catalog snapshot (catalog/manifest): nothing to rebuild from"
        )),
        other => other.into(),
    })?;
    let db = offsite.block_on(offsite.download(&manifest.snapshot))?;
    let files_sealed = offsite.block_on(offsite.get(&manifest.files))?;
    let files: BTreeMap<String, String> =
        serde_json::from_slice(&open_all(&offsite.key, &manifest.files, &files_sealed)?).map_err(
            |_| OffsiteError::Damaged {
                object: manifest.files.clone(),
                why: "it is not the directory's files",
            },
        )?;
    write_dir(dir, url, &db, &files, &key_bytes)?;
    let replayed = offsite.replay(&dir.join(CATALOG_FILE))?;
    let store = Store::open(dir)?;
    let cat = store.catalog()?;
    let points = cat.points(None)?;
    let servers: std::collections::HashSet<&str> =
        points.iter().map(|p| p.server.as_str()).collect();
    Ok(RebuildReport {
        snapshot_ms: manifest.created_ms,
        journal_records: replayed.records,
        points: points.len(),
        servers: servers.len(),
    })
}

/// Lay the directory out: catalog, files, key, `packs/`, `staging/`.
fn write_dir(
    dir: &Path,
    url: &str,
    db: &[u8],
    files: &BTreeMap<String, String>,
    key: &[u8],
) -> Result<(), ReceiveError> {
    for sub in ["packs", "staging"] {
        let p = dir.join(sub);
        create_private_dir(&p)?;
        set_mode(&p, PRIVATE_DIR_MODE)?;
    }
    check_catalog(dir, db)?;
    for (name, text) in files {
        if !DIR_FILES.contains(&name.as_str()) {
            continue;
        }
        let text = if name == CONFIG_FILE {
            point_config_at(text, url)?
        } else {
            text.clone()
        };
        let mode = if name.ends_with(".key") { 0o600 } else { 0o644 };
        crate::pki::write_new(&dir.join(name), text.as_bytes(), mode)?;
    }
    crate::pki::write_new(&dir.join(KEY_FILE), key, 0o600)?;
    sync_dir(dir)
}

/// Write the snapshot as the catalog after SQLite says it is whole.
fn check_catalog(dir: &Path, db: &[u8]) -> Result<(), ReceiveError> {
    let path = dir.join(CATALOG_FILE);
    crate::pki::write_new(&path, db, 0o600)?;
    let conn = rusqlite::Connection::open(&path).map_err(ReceiveError::Catalog)?;
    let verdict: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .map_err(ReceiveError::Catalog)?;
    if verdict != "ok" {
        return Err(ReceiveError::Corrupt(format!(
            "the catalog snapshot fails SQLite's integrity check: {verdict}"
        )));
    }
    Ok(())
}

/// The snapshot's receiver.toml, with `[store] url` set to where it was
/// rebuilt from.
fn point_config_at(text: &str, url: &str) -> Result<String, ReceiveError> {
    let mut cfg: ReceiverConfig = toml::from_str(text)
        .map_err(|e| ReceiveError::Config(format!("the snapshot's {CONFIG_FILE}: {e}")))?;
    let mut store = cfg.store.take().unwrap_or_default();
    store.url = url.to_owned();
    cfg.store = Some(store);
    toml::to_string_pretty(&cfg)
        .map_err(|e| ReceiveError::Config(format!("writing {CONFIG_FILE}: {e}")))
}
