//! `init --store s3://BUCKET/PREFIX`: check the bucket before anything is
//! written, then record the store in `receiver.toml` and write the key.

use std::path::Path;

use pilotlight_protocol::atomic_file::{self, Access};

use super::client::{client_for, probe};
use super::crypto::KEY_FILE;
use super::{OffsiteError, StoreKey, StoreUrl};
use crate::config::{ReceiverConfig, StoreConfig, CONFIG_FILE};
use crate::ReceiveError;

/// Check that the store at `url` is reachable and writable (from the AWS
/// environment), without a receiver directory; with `object_lock_days`,
/// that the bucket's Object Lock default retention covers it.
pub fn check(url: &str, object_lock_days: Option<u32>) -> Result<StoreUrl, OffsiteError> {
    let url = StoreUrl::parse(url)?;
    let client = client_for(&url, object_lock_days.is_some())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| OffsiteError::local(Path::new("."), e))?;
    rt.block_on(async {
        if let Some(days) = object_lock_days {
            // Before the probe: a put into a bucket without Object Lock
            // would succeed, and say nothing.
            super::lock::require(&url, days).await?;
        }
        probe(&url, &*client).await
    })?;
    Ok(url)
}

/// Record the store in the new receiver directory `dir` and write its key
/// (`DIR/store.key`, 0600), with `object_lock_days` as `init` was given
/// it. Returns the key file's path.
pub fn record(
    dir: &Path,
    url: &StoreUrl,
    object_lock_days: Option<u32>,
) -> Result<std::path::PathBuf, ReceiveError> {
    let mut cfg = ReceiverConfig::load(dir)?;
    cfg.store = Some(StoreConfig {
        url: url.to_string(),
        object_lock_days,
        ..StoreConfig::default()
    });
    let text = toml::to_string_pretty(&cfg)
        .map_err(|e| ReceiveError::Config(format!("writing {CONFIG_FILE}: {e}")))?;
    let header =
        "# pilotlight receiver configuration. Flags on the command line override these keys.\n";
    atomic_file::write(
        dir,
        CONFIG_FILE,
        format!("{header}{text}").as_bytes(),
        Access::Umask,
    )
    .map_err(|(p, e)| ReceiveError::storage(p, e))?;
    // From now on every change to the catalog is journaled.
    let db = dir.join(crate::store::CATALOG_FILE);
    let conn = rusqlite::Connection::open(&db).map_err(ReceiveError::Catalog)?;
    super::journal::install(&conn)?;
    let key = dir.join(KEY_FILE);
    StoreKey::create(&key)?;
    Ok(key)
}
