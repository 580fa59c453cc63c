//! The client: where the store is (`s3://BUCKET/PREFIX` and the standard
//! AWS environment), object names under the prefix, and how a blocking
//! caller runs the client's futures.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, RetryConfig};
use tokio::sync::Notify;

use super::state::StateFile;
use super::{OffsiteError, StoreKey};
use crate::config::StoreConfig;
use crate::ReceiveError;

/// `s3://BUCKET/PREFIX`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreUrl {
    /// The bucket.
    pub bucket: String,
    /// The prefix every object of this receiver is under ("" for none).
    pub prefix: String,
}

impl StoreUrl {
    /// Parse `s3://BUCKET/PREFIX`.
    pub fn parse(url: &str) -> Result<Self, OffsiteError> {
        let bad = || OffsiteError::BadUrl(url.to_owned());
        let rest = url.strip_prefix("s3://").ok_or_else(bad)?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let ok = !bucket.is_empty()
            && bucket
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
        if !ok || prefix.split('/').any(|p| p == "." || p == "..") {
            return Err(bad());
        }
        Ok(Self {
            bucket: bucket.to_owned(),
            prefix: prefix.trim_matches('/').to_owned(),
        })
    }

    /// The full path of `name` (a name under the prefix).
    pub fn path(&self, name: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(name)
        } else {
            ObjectPath::from(format!("{}/{name}", self.prefix))
        }
    }

    /// The name under the prefix of a full path.
    pub fn name_of<'a>(&self, path: &'a str) -> &'a str {
        if self.prefix.is_empty() {
            path
        } else {
            path.strip_prefix(&self.prefix)
                .and_then(|p| p.strip_prefix('/'))
                .unwrap_or(path)
        }
    }
}

impl std::fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.prefix)
    }
}

/// Name of the segment `start..end` of pack `pack`.
pub fn segment_name(pack: u64, start: u64, end: u64) -> String {
    format!("packs/{pack:010}/{start:013}-{end:013}.seg")
}

/// The pack and range of a segment name.
pub fn parse_segment_name(name: &str) -> Option<(u64, u64, u64)> {
    let rest = name.strip_prefix("packs/")?;
    let (pack, file) = rest.split_once('/')?;
    let (start, end) = file.strip_suffix(".seg")?.split_once('-')?;
    let (start, end) = (start.parse().ok()?, end.parse().ok()?);
    (start < end).then_some(())?;
    Some((pack.parse().ok()?, start, end))
}

/// Segments the streamer uploaded: (pack, start) → (end, BLAKE3 of the
/// bytes).
pub(super) type Streamed = std::collections::HashMap<(u64, u64), (u64, [u8; 32])>;

/// How a blocking caller runs the client's futures: on the runtime it was
/// made in (`serve`, from its blocking threads), or on a small runtime of
/// its own (the commands).
enum Exec {
    Handle(tokio::runtime::Handle),
    Own(tokio::runtime::Runtime),
}

/// A receiver's object store: the client, the key, and what this process
/// knows of the bucket.
pub struct Offsite {
    pub(super) url: StoreUrl,
    pub(super) client: Arc<dyn ObjectStore>,
    pub(super) key: StoreKey,
    pub(super) dir: PathBuf,
    /// Most bytes of packs kept locally.
    pub(super) cache_budget: u64,
    exec: Exec,
    /// Segments in the bucket, by pack: start → end (listed on first use).
    pub(super) segments: Mutex<Option<BTreeMap<u64, BTreeMap<u64, u64>>>>,
    /// One upload at a time: commits that share a pack upload in order.
    pub(super) upload: Mutex<()>,
    /// Segments the streamer uploaded: (pack, start) → (end, BLAKE3).
    pub(super) early: Mutex<Streamed>,
    /// One cache fill at a time.
    pub(super) fill: Mutex<()>,
    /// Commits since the last snapshot.
    pub(super) dirty: AtomicU64,
    pub(super) snapshot_wanted: Notify,
    pub(super) state: Arc<StateFile>,
    /// Packs garbage collection removed, whose objects go after the next
    /// snapshot.
    pub(super) doomed: Mutex<Vec<u64>>,
    /// Cancelled when `serve` stops: uploads stop waiting for the store.
    pub(super) stop: tokio_util::sync::CancellationToken,
    /// How long a command (not `serve`) waits for an unreachable store
    /// before it gives up; `None`: until `stop`.
    pub(super) patience: Option<Duration>,
    /// The catalog connection that ships the journal; one ship at a time.
    pub(super) journal: Mutex<Option<rusqlite::Connection>>,
    /// Least time between two catalog snapshots.
    pub(super) snapshot_every: Duration,
    /// When the newest snapshot in the bucket was taken (ms since the
    /// epoch; 0: none known).
    pub(super) last_snapshot_ms: AtomicI64,
    /// `[store] object_lock_days` ([`super::lock`]).
    pub(super) lock_days: Option<u32>,
    /// The bucket's default retention, once asked.
    pub(super) lock_period: Mutex<Option<Duration>>,
    /// The newest upload of each pack this process knows of (ms since
    /// the epoch): where its retention runs from.
    pub(super) newest: Mutex<std::collections::HashMap<u64, i64>>,
}

/// How long a command waits for an unreachable store by default.
pub const COMMAND_WAIT: Duration = Duration::from_secs(60);

impl std::fmt::Debug for Offsite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Offsite({})", self.url)
    }
}

/// The client for `url`, configured from the AWS environment. `locked`:
/// the bucket has Object Lock, which wants a checksum with every upload
/// (SHA-256, the digest the signature computes anyway).
pub fn client_for(url: &StoreUrl, locked: bool) -> Result<Arc<dyn ObjectStore>, OffsiteError> {
    let endpoint = std::env::var("AWS_ENDPOINT_URL").unwrap_or_default();
    let mut options = ClientOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(120))
        .with_allow_http(endpoint.starts_with("http://"));
    if locked {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "x-amz-sdk-checksum-algorithm",
            http::HeaderValue::from_static("SHA256"),
        );
        options = options.with_default_headers(headers);
    }
    let mut b = AmazonS3Builder::from_env()
        .with_bucket_name(&url.bucket)
        .with_client_options(options)
        .with_retry(RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(2),
                base: 2.0,
            },
            max_retries: 3,
            retry_timeout: Duration::from_secs(20),
        });
    if locked {
        b = b.with_checksum_algorithm(object_store::aws::Checksum::SHA256);
    }
    // No SHA-256 of every payload for the signature (a third of the
    // receiver's CPU while it uploads): each object is sealed with
    // AES-256-GCM, which a changed byte fails on read, and HTTPS guards
    // the transfer. (With Object Lock, the checksum S3 wants is SHA-256.)
    b = b.with_unsigned_payload(true);
    if std::env::var_os("AWS_REGION").is_none() && std::env::var_os("AWS_DEFAULT_REGION").is_none()
    {
        b = b.with_region("us-east-1");
    }
    if !endpoint.is_empty() {
        // Path-style requests: what MinIO, Ceph RGW, Garage and moto serve.
        b = b.with_virtual_hosted_style_request(false);
    }
    let client = b.build().map_err(|e| OffsiteError::Store {
        object: String::new(),
        cause: e.to_string(),
    })?;
    Ok(Arc::new(client))
}

/// One sentence for what the store answered about `object`.
pub(crate) fn classify(url: &StoreUrl, object: &str, e: object_store::Error) -> OffsiteError {
    // One line: a store may answer with a multi-line body.
    let text = e.to_string().replace(['\n', '\r'], " ");
    match e {
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => OffsiteError::Credentials {
            bucket: url.bucket.clone(),
            cause: text,
        },
        _ if text.contains("NoSuchBucket") => OffsiteError::NoBucket {
            bucket: url.bucket.clone(),
        },
        _ if text.contains("InvalidAccessKeyId") || text.contains("SignatureDoesNotMatch") => {
            OffsiteError::Credentials {
                bucket: url.bucket.clone(),
                cause: text,
            }
        }
        object_store::Error::NotFound { .. } => OffsiteError::Missing(object.to_owned()),
        _ if text.contains("error sending request")
            || text.contains("Connection refused")
            || text.contains("connect")
            || text.contains("timed out") =>
        {
            OffsiteError::Unreachable {
                bucket: url.bucket.clone(),
                cause: text,
            }
        }
        _ => OffsiteError::Store {
            object: object.to_owned(),
            cause: text,
        },
    }
}

impl Offsite {
    /// The store of the receiver directory `dir`.
    pub fn new(dir: &Path, cfg: &StoreConfig, key: StoreKey) -> Result<Self, ReceiveError> {
        let url = StoreUrl::parse(&cfg.url)?;
        let client = client_for(&url, cfg.object_lock_days.is_some())?;
        let mut o = Self::with_client(dir, url, client, key, cfg.cache.0.unwrap_or(u64::MAX))?;
        o.snapshot_every = Duration::from_secs(cfg.snapshot_secs);
        if o.patience.is_some() {
            o.patience = Some(Duration::from_secs(cfg.command_wait_secs));
        }
        o.lock_days = cfg.object_lock_days;
        Ok(o)
    }

    /// The store of `dir` through `client` (tests: an in-memory store).
    pub(crate) fn with_client(
        dir: &Path,
        url: StoreUrl,
        client: Arc<dyn ObjectStore>,
        key: StoreKey,
        cache_budget: u64,
    ) -> Result<Self, ReceiveError> {
        let (exec, patience) = match tokio::runtime::Handle::try_current() {
            Ok(h) => (Exec::Handle(h), None),
            Err(_) => (
                Exec::Own(
                    tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(2)
                        .enable_all()
                        .build()
                        .map_err(|e| ReceiveError::storage(dir, e))?,
                ),
                Some(COMMAND_WAIT),
            ),
        };
        Ok(Self {
            url,
            client,
            key,
            dir: dir.to_owned(),
            cache_budget,
            exec,
            segments: Mutex::new(None),
            upload: Mutex::new(()),
            early: Mutex::default(),
            fill: Mutex::new(()),
            dirty: AtomicU64::new(0),
            snapshot_wanted: Notify::new(),
            state: Arc::new(StateFile::new(dir)),
            doomed: Mutex::new(Vec::new()),
            stop: tokio_util::sync::CancellationToken::new(),
            patience,
            journal: Mutex::new(None),
            snapshot_every: Duration::ZERO,
            last_snapshot_ms: AtomicI64::new(0),
            lock_days: None,
            lock_period: Mutex::new(None),
            newest: Mutex::default(),
        })
    }

    /// Where the store is.
    pub fn url(&self) -> &StoreUrl {
        &self.url
    }

    /// Run a future of the client from a blocking thread.
    pub(super) fn block_on<F: Future>(&self, f: F) -> F::Output {
        match &self.exec {
            Exec::Handle(h) => h.block_on(f),
            Exec::Own(rt) => rt.block_on(f),
        }
    }

    /// Check that the bucket is reachable and writable: put and delete a
    /// small object. One sentence for wrong credentials, a missing bucket
    /// or an endpoint that does not answer.
    pub async fn probe(&self) -> Result<(), OffsiteError> {
        probe(&self.url, &*self.client).await
    }

    /// Check the bucket from a blocking caller.
    pub fn probe_blocking(&self) -> Result<(), OffsiteError> {
        self.block_on(self.probe())
    }

    /// The segments of every pack in the bucket (listed once, then kept
    /// up to date by this process's uploads and deletes).
    pub(super) async fn segments_listed(&self) -> Result<(), OffsiteError> {
        if self.segments.lock().map(|s| s.is_some()).unwrap_or(false) {
            return Ok(());
        }
        let mut map: BTreeMap<u64, BTreeMap<u64, u64>> = BTreeMap::new();
        let prefix = self.url.path("packs");
        let mut list = self.client.list(Some(&prefix));
        while let Some(meta) = list.next().await {
            let meta = meta.map_err(|e| classify(&self.url, "packs/", e))?;
            let full = meta.location.to_string();
            if let Some((pack, start, end)) = parse_segment_name(self.url.name_of(&full)) {
                map.entry(pack).or_default().insert(start, end);
                self.note_upload_time(pack, meta.last_modified.timestamp_millis());
            }
        }
        if let Ok(mut s) = self.segments.lock() {
            s.get_or_insert(map);
        }
        Ok(())
    }

    /// The segments of `pack` (start → end) as this process knows them.
    pub(super) fn segments_of(&self, pack: u64) -> BTreeMap<u64, u64> {
        self.segments
            .lock()
            .ok()
            .and_then(|s| s.as_ref().and_then(|m| m.get(&pack).cloned()))
            .unwrap_or_default()
    }

    /// Where the segments of `pack` reach, chained from 0.
    pub(super) fn uploaded_to(&self, pack: u64) -> u64 {
        let mut at = 0;
        let segs = self.segments_of(pack);
        while let Some(end) = segs.get(&at) {
            at = *end;
        }
        at
    }

    /// Put `bytes` (already sealed) at `name`.
    pub(super) async fn put(&self, name: &str, bytes: Vec<u8>) -> Result<(), OffsiteError> {
        self.client
            .put(&self.url.path(name), bytes.into())
            .await
            .map(|_| ())
            .map_err(|e| classify(&self.url, name, e))
    }

    /// Get the whole object `name` (still sealed).
    pub(super) async fn get(&self, name: &str) -> Result<bytes::Bytes, OffsiteError> {
        let r = self
            .client
            .get(&self.url.path(name))
            .await
            .map_err(|e| classify(&self.url, name, e))?;
        r.bytes().await.map_err(|e| classify(&self.url, name, e))
    }

    /// Delete `name` (a missing object is not an error).
    pub(super) async fn delete(&self, name: &str) -> Result<(), OffsiteError> {
        match self.client.delete(&self.url.path(name)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(classify(&self.url, name, e)),
        }
    }
}

/// Put and delete a probe object under `url`'s prefix.
pub async fn probe(url: &StoreUrl, client: &dyn ObjectStore) -> Result<(), OffsiteError> {
    let name = format!(".probe-{:016x}", rand::random::<u64>());
    let path = url.path(&name);
    client
        .put(&path, b"pilotlight".to_vec().into())
        .await
        .map_err(|e| match classify(url, &name, e) {
            // A 404 on a put can only be the bucket.
            OffsiteError::Missing(_) => OffsiteError::NoBucket {
                bucket: url.bucket.clone(),
            },
            other => other,
        })?;
    client
        .delete(&path)
        .await
        .map_err(|e| classify(url, &name, e))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code
    use super::*;

    #[test]
    fn store_urls_parse_bucket_and_prefix() {
        let u = StoreUrl::parse("s3://dr-bucket/site-a/rx1/").unwrap();
        assert_eq!(u.bucket, "dr-bucket");
        assert_eq!(u.prefix, "site-a/rx1");
        assert_eq!(
            u.path("catalog/manifest").to_string(),
            "site-a/rx1/catalog/manifest"
        );
        assert_eq!(u.name_of("site-a/rx1/catalog/manifest"), "catalog/manifest");
        let bare = StoreUrl::parse("s3://b").unwrap();
        assert_eq!(bare.path("x").to_string(), "x");
        for bad in ["http://b/p", "s3://", "s3://B/p", "s3://b/../p"] {
            assert!(StoreUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn store_answers_become_one_sentence_each() {
        let url = StoreUrl::parse("s3://b/p").unwrap();
        let denied = object_store::Error::PermissionDenied {
            path: "p/x".into(),
            source: "403 AccessDenied".into(),
        };
        assert!(matches!(
            classify(&url, "x", denied),
            OffsiteError::Credentials { .. }
        ));
        let generic = |text: &str| object_store::Error::Generic {
            store: "S3",
            source: text.to_owned().into(),
        };
        let bad_key = generic("403 Forbidden: <Code>InvalidAccessKeyId</Code>");
        assert!(matches!(
            classify(&url, "x", bad_key),
            OffsiteError::Credentials { .. }
        ));
        let no_bucket = generic("404: <Code>NoSuchBucket</Code>\n<Message>gone</Message>");
        assert!(matches!(
            classify(&url, "x", no_bucket),
            OffsiteError::NoBucket { .. }
        ));
        let down = classify(&url, "x", generic("HTTP error: error sending request"));
        assert!(matches!(down, OffsiteError::Unreachable { .. }));
        assert!(down.is_retryable());
        let e = classify(&url, "x", generic("500 line one\nline two"));
        assert!(!e.to_string().contains('\n'), "{e}");
    }

    #[test]
    fn segment_names_round_trip_and_sort_by_start() {
        let n = segment_name(7, 16, 4096);
        assert_eq!(parse_segment_name(&n), Some((7, 16, 4096)));
        assert!(segment_name(7, 16, 20) < segment_name(7, 4096, 5000));
        assert_eq!(parse_segment_name("packs/7/5-5.seg"), None);
        assert_eq!(parse_segment_name("catalog/manifest"), None);
    }
}
