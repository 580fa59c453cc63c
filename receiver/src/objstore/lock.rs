//! Immutable history: S3 Object Lock (`[store] object_lock_days`).
//!
//! **The bucket locks, not each request.** The bucket must have Object Lock
//! enabled and a default retention (`COMPLIANCE`, or `GOVERNANCE` for
//! credentials without `s3:BypassGovernanceRetention`) of at least
//! `object_lock_days`: every object this receiver writes is then locked
//! from its upload for that period by the store itself, whatever a
//! compromised staging host asks. `init --object-lock-days` and the start
//! of `serve` read the bucket's configuration (`GET ?object-lock`, signed
//! with the client's own SigV4 signer, since `object_store` has no call
//! for it) and refuse, in one sentence, a bucket without it. Uploads then
//! carry a SHA-256 checksum (`x-amz-checksum-sha256` and
//! `x-amz-sdk-checksum-algorithm`), which S3 requires of every upload into
//! a locked bucket.
//!
//! **Garbage collection waits.** A pack GC removed is written to
//! `store_deferred(pack, due_ms)` (catalog schema version 9) at once, as
//! never due, then given the end of the retention of its newest segment:
//! its upload time (the store's `LastModified`, or this process's clock
//! once the upload returned) plus the bucket's default retention (a store
//! that does not answer leaves that to the next collection). Its id is
//! never given to a new pack while the row is there. Every collection (`gc`, `prune`,
//! `serve`'s maintenance) ships that table in the journal, then deletes
//! the objects of the packs that are due, and their rows; a pack not yet
//! due is left alone, and `serve`'s start does not treat its objects as
//! uploads no commit reached. The table travels in the journal and the
//! snapshots like every catalog table, so a rebuilt directory knows which
//! objects are still locked and deletes them when due. Without
//! `object_lock_days`, a removed pack is due at once (the same table, so
//! a crash between the catalog and the delete leaves the next collection
//! the work).
//!
//! Object Lock implies versioning: a `DELETE` leaves a delete marker and
//! keeps the version, which the bucket's lifecycle rule for noncurrent
//! versions frees once its retention has ended (see the README).

use std::collections::HashSet;
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey, AwsAuthorizer};
use object_store::client::{HttpConnector, HttpRequestBody, ReqwestConnector};
use object_store::ClientOptions;
use pilotlight_protocol::clock::now_ms;
use rusqlite::Connection;

use super::client::StoreUrl;
use super::{Offsite, OffsiteError};

/// `store_deferred.due_ms` of a pack whose retention is not worked out yet
/// (the store did not answer): never due.
const UNRESOLVED: i64 = i64::MAX;

/// The default retention of a bucket with Object Lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retention {
    /// `COMPLIANCE` or `GOVERNANCE`.
    pub mode: String,
    /// How long each new object is locked (a year counted as 366 days, so
    /// that a delete never comes early).
    pub period: Duration,
}

/// What the bucket's Object Lock configuration says: `None` without
/// Object Lock; `Some(None)` with Object Lock but no default retention.
pub(crate) type LockConfig = Option<Option<Retention>>;

/// The text between `<tag>` and `</tag>` in `xml` (the first one).
fn tag<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let start = xml.find(&open)? + open.len();
    let len = xml[start..].find(&format!("</{tag}>"))?;
    Some(xml[start..start + len].trim())
}

/// Parse a `GetObjectLockConfiguration` answer.
pub(crate) fn parse_lock_config(xml: &str) -> LockConfig {
    if tag(xml, "ObjectLockEnabled") != Some("Enabled") {
        return None;
    }
    let Some(rule) = tag(xml, "DefaultRetention") else {
        return Some(None);
    };
    let mode = tag(rule, "Mode").unwrap_or_default().to_owned();
    let num = |t: &str| {
        tag(rule, t)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let days = num("Days").saturating_add(num("Years").saturating_mul(366));
    if mode.is_empty() || days == 0 {
        return Some(None);
    }
    Some(Some(Retention {
        mode,
        period: Duration::from_secs(days.saturating_mul(86_400)),
    }))
}

/// The Object Lock configuration of `url`'s bucket, through the AWS
/// environment `client_for` uses.
pub(crate) async fn bucket_lock(url: &StoreUrl) -> Result<LockConfig, OffsiteError> {
    let store_err = |cause: String| OffsiteError::Store {
        object: "?object-lock".into(),
        cause,
    };
    let mut b = AmazonS3Builder::from_env().with_bucket_name(&url.bucket);
    let region = b
        .get_config_value(&AmazonS3ConfigKey::Region)
        .or_else(|| b.get_config_value(&AmazonS3ConfigKey::DefaultRegion))
        .unwrap_or_else(|| "us-east-1".into());
    b = b.with_region(&region);
    let endpoint = b.get_config_value(&AmazonS3ConfigKey::Endpoint);
    let uri = match &endpoint {
        Some(e) => format!("{}/{}?object-lock", e.trim_end_matches('/'), url.bucket),
        None => format!(
            "https://{}.s3.{region}.amazonaws.com/?object-lock",
            url.bucket
        ),
    };
    let s3 = b.build().map_err(|e| store_err(e.to_string()))?;
    let cred = s3
        .credentials()
        .get_credential()
        .await
        .map_err(|e| super::client::classify(url, "?object-lock", e))?;
    let mut req = object_store::client::HttpRequest::new(HttpRequestBody::empty());
    *req.uri_mut() = uri.parse().map_err(|_| OffsiteError::BadUrl(uri.clone()))?;
    AwsAuthorizer::new(&cred, "s3", &region)
        .try_authorize(&mut req, None)
        .map_err(|e| store_err(e.to_string()))?;
    let options = ClientOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(30))
        .with_allow_http(uri.starts_with("http://"));
    let http = ReqwestConnector::default()
        .connect(&options)
        .map_err(|e| store_err(e.to_string()))?;
    let resp = http
        .execute(req)
        .await
        .map_err(|e| OffsiteError::Unreachable {
            bucket: url.bucket.clone(),
            cause: e.to_string().replace(['\n', '\r'], " "),
        })?;
    let status = resp.status().as_u16();
    let body = resp.into_body().bytes().await.unwrap_or_default();
    let text = String::from_utf8_lossy(&body);
    match status {
        200 => Ok(parse_lock_config(&text)),
        _ if text.contains("ObjectLockConfigurationNotFound") => Ok(None),
        _ if text.contains("NoSuchBucket") => Err(OffsiteError::NoBucket {
            bucket: url.bucket.clone(),
        }),
        401 | 403 => Err(OffsiteError::Credentials {
            bucket: url.bucket.clone(),
            cause: format!("{status} {}", tag(&text, "Code").unwrap_or_default()),
        }),
        _ => Err(store_err(format!(
            "{status} {}",
            tag(&text, "Code").unwrap_or_default()
        ))),
    }
}

/// The bucket's default retention, if it covers `days`; else the one
/// sentence that says what is missing.
pub(crate) async fn require(url: &StoreUrl, days: u32) -> Result<Retention, OffsiteError> {
    let found = match bucket_lock(url).await? {
        Some(Some(r)) if r.period >= Duration::from_secs(u64::from(days) * 86_400) => return Ok(r),
        Some(Some(r)) => format!(
            "a default retention of only {} days",
            r.period.as_secs() / 86_400
        ),
        Some(None) => "Object Lock without a default retention".into(),
        None => "no Object Lock".into(),
    };
    Err(OffsiteError::NoLock {
        bucket: url.bucket.clone(),
        days,
        found,
    })
}

fn sql_err(e: rusqlite::Error) -> OffsiteError {
    OffsiteError::Store {
        object: "catalog store_deferred".into(),
        cause: e.to_string(),
    }
}

/// The packs whose objects wait for their retention to end.
pub(crate) fn deferred_packs(conn: &Connection) -> Result<HashSet<u64>, OffsiteError> {
    let mut stmt = conn
        .prepare("SELECT pack FROM store_deferred")
        .map_err(sql_err)?;
    let packs = stmt
        .query_map([], |r| r.get::<_, i64>(0))
        .and_then(|rows| rows.map(|p| p.map(|p| p as u64)).collect())
        .map_err(sql_err)?;
    Ok(packs)
}

/// The highest pack id in `store_deferred` of the receiver directory
/// `dir` (0 for none): a new pack never takes the id of one whose objects
/// still wait in the bucket (their names would mix). Blocking.
pub(crate) fn highest_deferred_pack(dir: &std::path::Path) -> Result<u64, crate::ReceiveError> {
    let conn = Connection::open(dir.join(crate::store::CATALOG_FILE))
        .map_err(crate::ReceiveError::Catalog)?;
    let max: i64 = conn
        .query_row(
            "SELECT coalesce(max(pack), 0) FROM store_deferred",
            [],
            |r| r.get(0),
        )
        .map_err(crate::ReceiveError::Catalog)?;
    Ok(u64::try_from(max).unwrap_or(0))
}

impl Offsite {
    /// The bucket's default retention when `object_lock_days` is set
    /// (checked to cover it, asked once per process); zero otherwise.
    pub(crate) async fn lock_period(&self) -> Result<Duration, OffsiteError> {
        let Some(days) = self.lock_days else {
            return Ok(Duration::ZERO);
        };
        if let Some(p) = self.lock_period.lock().ok().and_then(|p| *p) {
            return Ok(p);
        }
        let r = require(&self.url, days).await?;
        if let Ok(mut p) = self.lock_period.lock() {
            *p = Some(r.period);
        }
        Ok(r.period)
    }

    /// When the objects of `pack` are no longer locked (ms since the
    /// epoch): its newest upload plus `period`.
    fn due_ms(&self, pack: u64, period: Duration) -> i64 {
        if period.is_zero() {
            return 0;
        }
        let newest = self
            .newest
            .lock()
            .ok()
            .and_then(|n| n.get(&pack).copied())
            // Not seen uploaded: locked, at most, from now on.
            .unwrap_or_else(now_ms);
        newest.saturating_add(i64::try_from(period.as_millis()).unwrap_or(i64::MAX))
    }

    /// Garbage collection's end (see the module doc): the packs it
    /// removed into `store_deferred` (at once, locally; the end of their
    /// retention is worked out from the bucket next, and again by a later
    /// collection if the store does not answer now), the journal shipped,
    /// then the objects of every pack that is due deleted. Blocking.
    pub(crate) fn collect_objects(&self) -> Result<(), OffsiteError> {
        let doomed: Vec<u64> = self
            .doomed
            .lock()
            .map(|mut d| std::mem::take(&mut *d))
            .unwrap_or_default();
        self.with_catalog(|c| {
            for &pack in &doomed {
                c.execute(
                    "INSERT INTO store_deferred(pack, due_ms) VALUES(?1, ?2)
                     ON CONFLICT(pack) DO NOTHING",
                    [pack as i64, UNRESOLVED],
                )
                .map_err(sql_err)?;
            }
            Ok(())
        })?;
        self.resolve_due()?;
        self.ship()?;
        let now = now_ms();
        let due: Vec<u64> = self.with_catalog(|c| {
            let mut stmt = c
                .prepare("SELECT pack FROM store_deferred WHERE due_ms <= ?1 ORDER BY pack")
                .map_err(sql_err)?;
            let rows = stmt
                .query_map([now], |r| r.get::<_, i64>(0))
                .and_then(|rows| rows.map(|p| p.map(|p| p as u64)).collect());
            rows.map_err(sql_err)
        })?;
        if due.is_empty() {
            return Ok(());
        }
        for &pack in &due {
            self.delete_pack(pack)?;
            self.with_catalog(|c| {
                c.execute("DELETE FROM store_deferred WHERE pack = ?1", [pack as i64])
                    .map(|_| ())
                    .map_err(sql_err)
            })?;
        }
        // The bucket's journal learns the rows are gone (a rebuild that
        // missed it deletes objects that are gone already: no harm).
        self.ship()
    }

    /// `f` on the journal's catalog connection (nothing without one).
    fn with_catalog<T: Default>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, OffsiteError>,
    ) -> Result<T, OffsiteError> {
        let conn = self.open_journal()?;
        match conn.as_ref() {
            Some(c) => f(c),
            None => Ok(T::default()),
        }
    }

    /// Give every row of `store_deferred` not yet resolved the end of its
    /// pack's retention: its newest upload (as the bucket lists it) plus
    /// the bucket's default retention.
    fn resolve_due(&self) -> Result<(), OffsiteError> {
        let open: Vec<u64> = self.with_catalog(|c| {
            let mut stmt = c
                .prepare("SELECT pack FROM store_deferred WHERE due_ms = ?1")
                .map_err(sql_err)?;
            let rows = stmt
                .query_map([UNRESOLVED], |r| r.get::<_, i64>(0))
                .and_then(|rows| rows.map(|p| p.map(|p| p as u64)).collect());
            rows.map_err(sql_err)
        })?;
        if open.is_empty() {
            return Ok(());
        }
        let period = self.block_on(self.lock_period())?;
        if !period.is_zero() {
            self.block_on(self.segments_listed())?;
        }
        self.with_catalog(|c| {
            for &pack in &open {
                let due = self.due_ms(pack, period);
                if due > now_ms() {
                    tracing::info!(
                        pack,
                        due = %pilotlight_protocol::clock::rfc3339(due),
                        "the objects of a removed pack are under Object Lock: deleted once due"
                    );
                }
                c.execute(
                    "UPDATE store_deferred SET due_ms = ?2 WHERE pack = ?1",
                    [pack as i64, due],
                )
                .map_err(sql_err)?;
            }
            Ok(())
        })
    }

    /// Note that the bucket holds an upload of `pack` made at `ms`.
    pub(super) fn note_upload_time(&self, pack: u64, ms: i64) {
        if let Ok(mut n) = self.newest.lock() {
            let t = n.entry(pack).or_insert(ms);
            *t = (*t).max(ms);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code
    use super::*;

    /// A day, in milliseconds.
    const DAY_MS: i64 = 86_400_000;

    #[test]
    fn lock_configurations_parse_to_a_default_retention() {
        let xml = |rule: &str| {
            format!(
                "<?xml version=\"1.0\"?><ObjectLockConfiguration><ObjectLockEnabled>Enabled</ObjectLockEnabled>{rule}</ObjectLockConfiguration>"
            )
        };
        let days = xml("<Rule><DefaultRetention><Mode>COMPLIANCE</Mode><Days>30</Days></DefaultRetention></Rule>");
        assert_eq!(
            parse_lock_config(&days),
            Some(Some(Retention {
                mode: "COMPLIANCE".into(),
                period: Duration::from_secs(30 * 86_400)
            }))
        );
        let years = xml("<Rule><DefaultRetention><Mode>GOVERNANCE</Mode><Years>1</Years></DefaultRetention></Rule>");
        let r = parse_lock_config(&years).unwrap().unwrap();
        assert_eq!(
            r.period,
            Duration::from_secs(366 * 86_400),
            "a year never comes early"
        );
        assert_eq!(
            parse_lock_config(&xml("")),
            Some(None),
            "enabled, no default"
        );
        assert_eq!(parse_lock_config("<ObjectLockConfiguration/>"), None);
        assert_eq!(parse_lock_config("garbage"), None);
    }

    #[test]
    fn a_removed_pack_is_due_when_its_newest_upload_leaves_retention() {
        let dir = tempfile::tempdir().unwrap();
        let url = StoreUrl::parse("s3://b/p").unwrap();
        let mem = std::sync::Arc::new(object_store::memory::InMemory::new());
        let key = super::super::StoreKey::from_bytes(&[5; 32]);
        let o = Offsite::with_client(dir.path(), url, mem, key, u64::MAX).unwrap();
        let day = Duration::from_millis(DAY_MS as u64);
        assert_eq!(o.due_ms(7, Duration::ZERO), 0, "no lock: due at once");
        o.note_upload_time(7, 1_000);
        o.note_upload_time(7, 5_000);
        o.note_upload_time(7, 3_000);
        assert_eq!(o.due_ms(7, day), 5_000 + DAY_MS);
        let before = now_ms();
        assert!(o.due_ms(8, day) >= before + DAY_MS, "unknown: from now");
    }

    #[test]
    fn gc_deletes_a_removed_packs_objects_only_once_its_retention_ends() {
        use futures_util::StreamExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        std::fs::create_dir_all(dir.join("packs")).unwrap();
        drop(crate::catalog::Catalog::open(&dir.join(crate::store::CATALOG_FILE)).unwrap());
        let url = StoreUrl::parse("s3://b/p").unwrap();
        let mem = std::sync::Arc::new(object_store::memory::InMemory::new());
        let key = super::super::StoreKey::from_bytes(&[5; 32]);
        let mut o = Offsite::with_client(dir, url, mem, key, u64::MAX).unwrap();
        o.lock_days = Some(1);
        *o.lock_period.lock().unwrap() = Some(Duration::from_millis(DAY_MS as u64));
        for pack in [1, 2] {
            std::fs::write(crate::pack::pack_path(dir, pack), vec![pack as u8; 1000]).unwrap();
        }
        o.upload_packs(&[(1, 0, 1000), (2, 0, 1000)]).unwrap();
        // Pack 1 went up two days ago, pack 2 just now; GC removes both.
        o.newest.lock().unwrap().insert(1, now_ms() - 2 * DAY_MS);
        o.doomed.lock().unwrap().extend([1, 2]);
        o.collect_objects().unwrap();
        let segs: Vec<String> = o.block_on(async {
            o.client
                .list(None)
                .map(|m| m.unwrap().location.to_string())
                .filter(|n| std::future::ready(n.ends_with(".seg")))
                .collect()
                .await
        });
        assert_eq!(
            segs,
            vec![format!(
                "p/{}",
                super::super::client::segment_name(2, 0, 1000)
            )],
            "pack 1 is due and deleted, pack 2 is locked for a day"
        );
        let conn = Connection::open(dir.join(crate::store::CATALOG_FILE)).unwrap();
        assert_eq!(deferred_packs(&conn).unwrap(), HashSet::from([2]));
        assert_eq!(
            highest_deferred_pack(dir).unwrap(),
            2,
            "id 2 is not for reuse"
        );
        let due: i64 = conn
            .query_row("SELECT due_ms FROM store_deferred", [], |r| r.get(0))
            .unwrap();
        assert!(
            due >= now_ms() + DAY_MS - 60_000,
            "due a day from its upload"
        );
    }
}
