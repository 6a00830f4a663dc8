//! `S3Store`: the objects of a repository on an S3-compatible store (AWS, Garage, MinIO...),
//! through the `object_store` crate, under `s3://BUCKET/PREFIX/`.
//!
//! - The trait is synchronous and its callers are plain threads: the store has its own tokio
//!   runtime and each call waits on it.
//! - `put` is one PUT: atomic, durable and visible on its 200.
//! - `put_unsynced` queues the PUT (at most `parallel_uploads` in flight; the caller waits
//!   for a free slot) and `sync` waits for all of them; a failed upload fails `sync`, and
//!   every `put_unsynced` after it. An object being uploaded is visible to this store at once
//!   (from memory); to others once its PUT is done, whole (S3 has no half-written objects),
//!   possibly before the `sync`. An upload that never reaches its `sync` may thus be left
//!   behind, whole and unreferenced: gc removes it.
//! - `put_new` is HEAD then PUT: conditional PUTs are not relied on (Garage ignores
//!   `If-None-Match`), so two writers racing on one new name is prevented by the names
//!   themselves (backup ids are unique), not by the store.
//! - `remove_temporaries` has nothing to do: no multipart uploads, no temporaries.
//! - Chunks are uploaded with an unsigned payload (`UNSIGNED-PAYLOAD`; the request itself is
//!   signed): a chunk's name is the digest of its content (keyed, and the content sealed, in
//!   an encrypted repository), checked on every read, so hashing each body for the signature
//!   (here, and again by the store to check it) would only spend CPU. Every other object is
//!   signed with its payload's hash.
//! - Readers keep `PARALLEL_READS` downloads in flight (`parallel_reads`).
//! - `delete_many` is DeleteObjects requests of up to 1000 keys; `list_sized` takes the sizes
//!   from the listing.
//! - Requests that fail with a 5xx, a 429, an S3 error in a 200's body, or a connection error
//!   are retried with exponential backoff (0.1 s growing to 10 s, jittered) for
//!   `retry_timeout`, then fail cleanly (`RepoError::Store`). The first contact gives up on a
//!   wrong endpoint within seconds (bad input), but a store that answers 5xx or 429 to it is
//!   retried as long as any request and is then a failure of the store, not bad input.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::client::{
    ClientOptions, HttpClient, HttpConnector, HttpError, HttpRequest, HttpResponse, HttpService,
    ReqwestConnector,
};
use object_store::path::Path as ObjPath;
use object_store::{BackoffConfig, ObjectStore as _, ObjectStoreExt as _, RetryConfig};

use crate::location::{LocationError, S3Settings};
use crate::storage::{check_name, ObjectStore, RequestCounts};
use crate::{RepoError, Result};

/// Downloads a reader such as a restore keeps in flight: each costs one decoded chunk of
/// memory (4 MiB by default) in its thread.
const PARALLEL_READS: usize = 8;

/// Whether object `name` is uploaded with an unsigned payload (see the module's comment).
fn unsigned_payload(name: &str) -> bool {
    name.starts_with("chunks/")
}

/// Requests made, by kind (every attempt, retries included).
#[derive(Debug, Default)]
struct Counters {
    get: AtomicU64,
    put: AtomicU64,
    head: AtomicU64,
    list: AtomicU64,
    delete: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> RequestCounts {
        RequestCounts {
            get: self.get.load(Ordering::Relaxed),
            put: self.put.load(Ordering::Relaxed),
            head: self.head.load(Ordering::Relaxed),
            list: self.list.load(Ordering::Relaxed),
            delete: self.delete.load(Ordering::Relaxed),
        }
    }
}

/// Counts each HTTP request by kind, then hands it to reqwest.
#[derive(Debug)]
struct Counting {
    inner: HttpClient,
    counts: Arc<Counters>,
}

#[async_trait::async_trait]
impl HttpService for Counting {
    async fn call(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        let c = &self.counts;
        let counter = match *req.method() {
            http::Method::GET if req.uri().query().is_some_and(|q| q.contains("list-type")) => {
                &c.list
            }
            http::Method::GET => &c.get,
            http::Method::PUT => &c.put,
            http::Method::HEAD => &c.head,
            http::Method::DELETE | http::Method::POST => &c.delete,
            _ => &c.get,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.inner.execute(req).await
    }
}

#[derive(Debug)]
struct CountingConnector(Arc<Counters>);

impl HttpConnector for CountingConnector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let inner = ReqwestConnector::default().connect(options)?;
        Ok(HttpClient::new(Counting {
            inner,
            counts: self.0.clone(),
        }))
    }
}

/// Uploads queued by `put_unsynced` and not yet synced.
#[derive(Default)]
struct Unsynced {
    /// Name -> (upload number, data), while its upload runs.
    data: HashMap<String, (u64, Bytes)>,
    tasks: tokio::task::JoinSet<Result<()>>,
    /// The first upload that failed since the last `sync`.
    failed: Option<RepoError>,
    next: u64,
}

pub struct S3Store {
    runtime: Option<tokio::runtime::Runtime>,
    client: Arc<AmazonS3>,
    /// The same, uploading with an unsigned payload: for chunks.
    chunk_client: Arc<AmazonS3>,
    /// `""` or `"a/b/"`.
    prefix: String,
    /// `s3://bucket/prefix/`, for messages.
    location: String,
    slots: Arc<tokio::sync::Semaphore>,
    unsynced: Arc<Mutex<Unsynced>>,
    counts: Arc<Counters>,
}

fn store_error(what: &'static str, name: &str, e: object_store::Error) -> RepoError {
    match e {
        object_store::Error::NotFound { .. } => RepoError::NotFound(name.to_string()),
        e => RepoError::Store {
            what,
            name: name.to_string(),
            detail: crate::error_chain(&e),
        },
    }
}

/// Each wait is drawn between 0.1 s and 3 times the previous one (object_store's
/// "decorrelated jitter"), at most 10 s: about 1.5 times longer each retry on average (with
/// the factor 2 it grew by only 50 ms a retry). `max_retries` is set high for the requests
/// of a backup, so that `retry_timeout` is what bounds them: with 10 retries a store that
/// throttled for longer than ~20 s failed the backup whatever `retry_timeout` said.
fn retry_config(retry_timeout: Duration, max_retries: usize) -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            base: 3.0,
        },
        max_retries,
        retry_timeout,
    }
}

/// As many retries as `retry_timeout` may take (waits of at least 0.1 s each): the timeout,
/// not a count, ends them.
fn retries_within(retry_timeout: Duration) -> usize {
    (retry_timeout.as_millis() / 100).clamp(10, 100_000) as usize
}

/// Whether a failed request's error says the store answered with a 5xx or a 429 (after its
/// retries): it is there and the credentials were not refused, it is failing or throttling.
fn store_failing(detail: &str) -> bool {
    ["status code: 5", "status code: 429"]
        .iter()
        .any(|s| detail.contains(s))
}

fn build(
    bucket: &str,
    s: &S3Settings,
    retry_timeout: Duration,
    max_retries: usize,
    counts: Arc<Counters>,
    unsigned_payload: bool,
) -> Result<AmazonS3, LocationError> {
    let (Some(id), Some(secret)) = (&s.access_key_id, &s.secret_access_key) else {
        // Without keys the client would ask the cloud's instance metadata service: never.
        return Err(LocationError::NoCredentials);
    };
    let mut b = AmazonS3Builder::new()
        .with_bucket_name(bucket)
        .with_region(&s.region)
        .with_access_key_id(id)
        .with_secret_access_key(secret.expose())
        .with_virtual_hosted_style_request(!s.path_style)
        .with_unsigned_payload(unsigned_payload)
        .with_http_connector(CountingConnector(counts))
        .with_client_options(
            ClientOptions::new()
                .with_connect_timeout(Duration::from_secs(5))
                .with_timeout(Duration::from_secs(60)),
        )
        .with_retry(retry_config(retry_timeout, max_retries));
    if let Some(e) = &s.endpoint {
        let e = crate::location::check_endpoint(e)?;
        b = b.with_allow_http(e.starts_with("http://"));
        b = if s.path_style {
            b.with_endpoint(e)
        } else {
            // Virtual-host addressing: the bucket is the first label of the host.
            let (scheme, host) = e.split_once("://").unwrap_or(("https", &e));
            b.with_endpoint(format!("{scheme}://{bucket}.{host}"))
        };
    }
    b.build().map_err(|e| LocationError::Setting(e.to_string()))
}

impl S3Store {
    /// Connects to `s3://bucket/prefix` and checks, with one listing, that the bucket exists
    /// and the credentials are accepted: an unknown bucket, a wrong endpoint or refused
    /// credentials are `RepoError::Location` (bad input), and nothing is written.
    pub fn open(bucket: &str, prefix: &str, s: &S3Settings) -> Result<S3Store> {
        // One process-wide TLS provider; a second install (another store) is refused, harmlessly.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let counts = Arc::new(Counters::default());
        let retries = retries_within(s.retry_timeout);
        let client = build(bucket, s, s.retry_timeout, retries, counts.clone(), false)?;
        let chunk_client = build(bucket, s, s.retry_timeout, retries, counts.clone(), true)?;
        // The first contact retries briefly: a wrong endpoint is reported in seconds.
        let probe = build(
            bucket,
            s,
            s.retry_timeout.min(Duration::from_secs(4)),
            2,
            counts.clone(),
            false,
        )?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("vmbackup-s3")
            .enable_all()
            .build()
            .map_err(|source| RepoError::Io {
                what: "start the S3 client",
                path: "s3".into(),
                source,
            })?;
        let prefix = if prefix.is_empty() {
            String::new()
        } else {
            format!("{prefix}/")
        };
        let store = S3Store {
            runtime: Some(runtime),
            client: Arc::new(client),
            chunk_client: Arc::new(chunk_client),
            location: format!("s3://{bucket}/{prefix}"),
            prefix,
            slots: Arc::new(tokio::sync::Semaphore::new(s.parallel_uploads.max(1))),
            unsynced: Arc::new(Mutex::new(Unsynced::default())),
            counts,
        };
        let endpoint = s
            .endpoint
            .clone()
            .unwrap_or_else(|| format!("AWS S3 ({})", s.region));
        let at =
            (!store.prefix.is_empty()).then(|| ObjPath::from(store.prefix.trim_end_matches('/')));
        let mut listed = store.run(async { probe.list_with_delimiter(at.as_ref()).await });
        if let Err(e) = &listed {
            if store_failing(&crate::error_chain(e)) {
                // Reached, but throttling or failing: retried as long as any request, then
                // a store error (the operation failed), not a bad setting.
                listed = store.run(async { store.client.list_with_delimiter(at.as_ref()).await });
                if let Err(e) = listed {
                    return Err(store_error("list", &store.location, e));
                }
            }
        }
        if let Err(e) = listed {
            let detail = crate::error_chain(&e);
            let key_id = s.access_key_id.clone().unwrap_or_default();
            return Err(match e {
                object_store::Error::NotFound { .. } => LocationError::NoBucket {
                    bucket: bucket.into(),
                    endpoint,
                },
                object_store::Error::PermissionDenied { .. }
                | object_store::Error::Unauthenticated { .. } => LocationError::Denied {
                    bucket: bucket.into(),
                    endpoint,
                    key_id,
                    detail,
                },
                _ if detail.contains("NoSuchBucket") => LocationError::NoBucket {
                    bucket: bucket.into(),
                    endpoint,
                },
                _ if detail.contains("AccessDenied")
                    || detail.contains("InvalidAccessKeyId")
                    || detail.contains("SignatureDoesNotMatch")
                    || detail.contains("AuthorizationHeaderMalformed")
                    || detail.contains("Forbidden") =>
                {
                    LocationError::Denied {
                        bucket: bucket.into(),
                        endpoint,
                        key_id,
                        detail,
                    }
                }
                _ => LocationError::Unreachable { endpoint, detail },
            }
            .into());
        }
        Ok(store)
    }

    /// Where this store is, `s3://bucket/prefix/`.
    pub fn location(&self) -> &str {
        &self.location
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime.as_ref().expect("present until dropped")
    }

    /// Waits for `f` on this store's runtime; from a thread that is itself inside a runtime
    /// (which may not block), on a helper thread.
    fn run<F: Future + Send>(&self, f: F) -> F::Output
    where
        F::Output: Send,
    {
        let rt = self.runtime();
        if tokio::runtime::Handle::try_current().is_ok() {
            std::thread::scope(|s| {
                s.spawn(|| rt.block_on(f))
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p))
            })
        } else {
            rt.block_on(f)
        }
    }

    fn path(&self, name: &str) -> Result<ObjPath> {
        check_name(name)?;
        ObjPath::parse(format!("{}{name}", self.prefix))
            .map_err(|_| RepoError::BadName(name.to_string()))
    }

    fn unsynced(&self) -> std::sync::MutexGuard<'_, Unsynced> {
        self.unsynced.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The client that uploads `name`.
    fn uploader(&self, name: &str) -> &Arc<AmazonS3> {
        if unsigned_payload(name) {
            &self.chunk_client
        } else {
            &self.client
        }
    }

    fn put_now(&self, name: &str, data: &[u8]) -> Result<()> {
        let path = self.path(name)?;
        let payload = Bytes::copy_from_slice(data);
        let client = self.uploader(name);
        self.run(async { client.put(&path, payload.into()).await })
            .map(|_| ())
            .map_err(|e| store_error("upload", name, e))
    }
}

impl Drop for S3Store {
    fn drop(&mut self) {
        // Uploads never synced are abandoned (see the module's comment).
        self.unsynced().tasks.abort_all();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl ObjectStore for S3Store {
    fn put(&self, name: &str, data: &[u8]) -> Result<()> {
        self.put_now(name, data)
    }

    fn put_new(&self, name: &str, data: &[u8]) -> Result<()> {
        if self.exists(name)? {
            return Err(RepoError::Exists(name.to_string()));
        }
        self.put_now(name, data)
    }

    fn put_unsynced(&self, name: &str, data: &[u8]) -> Result<()> {
        let path = self.path(name)?;
        let check = |u: &mut Unsynced| -> Result<bool> {
            // Reap the uploads that are done, keeping the first failure.
            while let Some(done) = u.tasks.try_join_next() {
                match done {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        u.failed.get_or_insert(e);
                    }
                    Err(e) if e.is_cancelled() => {}
                    Err(e) => std::panic::resume_unwind(e.into_panic()),
                }
            }
            // A failed upload fails the backup: no point queueing more behind it.
            if let Some(e) = &u.failed {
                return Err(RepoError::Store {
                    what: "upload",
                    name: name.to_string(),
                    detail: format!("an earlier upload failed: {}", crate::error_chain(e)),
                });
            }
            Ok(u.data.contains_key(name))
        };
        if check(&mut self.unsynced())? {
            return Ok(());
        }
        // Waits while `parallel_uploads` are in flight.
        let permit = self
            .run(self.slots.clone().acquire_owned())
            .expect("the semaphore is never closed");
        let payload = Bytes::copy_from_slice(data);
        let mut u = self.unsynced();
        if check(&mut u)? {
            return Ok(());
        }
        let n = u.next;
        u.next += 1;
        u.data.insert(name.to_string(), (n, payload.clone()));
        let client = self.uploader(name).clone();
        let shared = self.unsynced.clone();
        let name = name.to_string();
        let handle = self.runtime().handle().clone();
        u.tasks.spawn_on(
            async move {
                let r = client.put(&path, payload.into()).await;
                drop(permit);
                let mut u = shared.lock().unwrap_or_else(|e| e.into_inner());
                // Done (or failed): from now on the store answers for it.
                if u.data.get(&name).is_some_and(|(m, _)| *m == n) {
                    u.data.remove(&name);
                }
                r.map(|_| ()).map_err(|e| store_error("upload", &name, e))
            },
            &handle,
        );
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        let (mut tasks, failed) = {
            let mut u = self.unsynced();
            (std::mem::take(&mut u.tasks), u.failed.take())
        };
        let mut first = failed;
        self.run(async {
            while let Some(done) = tasks.join_next().await {
                match done {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        if first.is_none() {
                            first = Some(e);
                            // The backup fails: the rest need not finish.
                            tasks.abort_all();
                        }
                    }
                    Err(e) if e.is_cancelled() => {}
                    Err(e) => std::panic::resume_unwind(e.into_panic()),
                }
            }
        });
        self.unsynced().data.clear();
        match first {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn forget_unsynced(&self) {
        let mut u = self.unsynced();
        u.tasks.abort_all();
        u.data.clear();
        u.failed = None;
    }

    fn remove_temporaries(&self) -> Result<usize> {
        Ok(0)
    }

    fn get(&self, name: &str) -> Result<Vec<u8>> {
        if let Some((_, d)) = self.unsynced().data.get(name) {
            return Ok(d.to_vec());
        }
        let path = self.path(name)?;
        self.run(async {
            let r = self.client.get(&path).await?;
            r.bytes().await
        })
        // (No copy when the buffer is not shared, as a whole download's is not.)
        .map(Vec::from)
        .map_err(|e| store_error("download", name, e))
    }

    fn exists(&self, name: &str) -> Result<bool> {
        if self.unsynced().data.contains_key(name) {
            return Ok(true);
        }
        let path = self.path(name)?;
        match self.run(async { self.client.head(&path).await }) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(store_error("look up", name, e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        Ok(self
            .list_sized(prefix)?
            .into_iter()
            .map(|(n, _)| n)
            .collect())
    }

    /// The sizes come with the listing (ListObjectsV2): no request per object.
    fn list_sized(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        let under = prefix.trim_end_matches('/');
        let full = format!("{}{under}", self.prefix);
        let at = if full.is_empty() {
            None
        } else {
            check_name(full.trim_end_matches('/'))?;
            Some(ObjPath::from(full.trim_end_matches('/')))
        };
        let mut out = self.run(async {
            let mut stream = self.client.list(at.as_ref());
            let mut out = Vec::new();
            while let Some(meta) = stream.next().await {
                let meta = meta?;
                if let Some(n) = meta.location.as_ref().strip_prefix(self.prefix.as_str()) {
                    out.push((n.to_string(), meta.size));
                }
            }
            Ok::<_, object_store::Error>(out)
        });
        if let Err(object_store::Error::NotFound { .. }) = out {
            out = Ok(Vec::new());
        }
        let mut out = out.map_err(|e| store_error("list", prefix, e))?;
        out.sort();
        Ok(out)
    }

    fn delete(&self, name: &str) -> Result<()> {
        let path = self.path(name)?;
        self.unsynced().data.remove(name);
        match self.run(async { self.client.delete(&path).await }) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(store_error("delete", name, e)),
        }
    }

    /// DeleteObjects requests of up to 1000 keys (several at once), through `object_store`.
    fn delete_many(&self, names: &[String]) -> Result<()> {
        let paths = names
            .iter()
            .map(|n| self.path(n))
            .collect::<Result<Vec<_>>>()?;
        {
            let mut u = self.unsynced();
            for n in names {
                u.data.remove(n.as_str());
            }
        }
        let results: Vec<object_store::Result<ObjPath>> = self.run(async {
            let input = futures_util::stream::iter(paths.into_iter().map(Ok)).boxed();
            self.client.delete_stream(input).collect().await
        });
        for r in results {
            match r {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => {
                    // A failed request names all its keys: keep the message short.
                    let mut detail = crate::error_chain(&e);
                    if detail.len() > 300 {
                        let mut cut = 300;
                        while !detail.is_char_boundary(cut) {
                            cut -= 1;
                        }
                        detail.truncate(cut);
                        detail.push_str("...");
                    }
                    return Err(RepoError::Store {
                        what: "delete",
                        name: format!("{} objects, from {}", names.len(), names[0]),
                        detail,
                    });
                }
            }
        }
        Ok(())
    }

    fn delete_batch(&self) -> usize {
        1000
    }

    fn listing_has_sizes(&self) -> bool {
        true
    }

    fn requests(&self) -> Option<RequestCounts> {
        Some(self.counts.snapshot())
    }

    fn parallel_reads(&self) -> usize {
        PARALLEL_READS
    }
}

#[cfg(test)]
mod tests {
    //! Against the Garage node of `scripts/garage` (its settings from the environment, else
    //! from its env file): never skipped.
    use super::*;
    use crate::location::Secret;

    fn settings() -> S3Settings {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let file = std::path::PathBuf::from(
            var("GARAGE_DIR").unwrap_or_else(|| "/var/tmp/vmbackup-garage".into()),
        )
        .join("env");
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        let get = |k: &str| {
            var(k).or_else(|| {
                text.lines()
                    .filter_map(|l| {
                        l.trim()
                            .strip_prefix("export ")
                            .unwrap_or(l)
                            .split_once('=')
                    })
                    .find(|(key, _)| key.trim() == k)
                    .map(|(_, v)| v.trim().to_string())
            })
        };
        let endpoint = get("VMBACKUP_S3_ENDPOINT").unwrap_or_else(|| {
            panic!(
                "no VMBACKUP_S3_ENDPOINT and no {}: run scripts/garage start",
                file.display()
            )
        });
        S3Settings {
            endpoint: Some(endpoint),
            region: get("AWS_REGION").unwrap_or_else(|| "garage".into()),
            access_key_id: get("AWS_ACCESS_KEY_ID"),
            secret_access_key: get("AWS_SECRET_ACCESS_KEY").map(Secret::new),
            retry_timeout: Duration::from_secs(5),
            ..S3Settings::default()
        }
    }

    #[test]
    fn throttling_and_5xx_are_told_from_other_failures_and_retried_for_the_timeout() {
        let e = "Generic S3 error: Error performing list request: Error performing GET \
                 http://127.0.0.1:1/b?list-type=2 in 2s, after 2 retries - Server returned \
                 non-2xx status code: 503 Service Unavailable: <Error><Code>SlowDown</Code>";
        assert!(store_failing(e));
        assert!(store_failing(
            "Server returned non-2xx status code: 429 Too Many Requests"
        ));
        assert!(store_failing(
            "Server returned non-2xx status code: 500 Internal Server Error"
        ));
        assert!(!store_failing(
            "Server returned non-2xx status code: 404 Not Found"
        ));
        assert!(!store_failing("error sending request: Connection refused"));
        // The timeout, not the count, ends the retries: even at the shortest wait.
        assert!(retries_within(Duration::from_secs(120)) >= 1200);
        assert_eq!(retries_within(Duration::from_secs(0)), 10);
        let c = retry_config(Duration::from_secs(3), 30);
        assert!(c.backoff.base > 2.0 && c.backoff.max_backoff == Duration::from_secs(10));
    }

    /// A store on a prefix of its own, emptied when dropped.
    struct Scratch(S3Store);
    impl Scratch {
        fn new(label: &str) -> Scratch {
            static N: AtomicU64 = AtomicU64::new(0);
            let prefix = format!(
                "unit-{label}-{}-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_micros(),
                N.fetch_add(1, Ordering::Relaxed)
            );
            Scratch(S3Store::open("vmbackup-test", &prefix, &settings()).unwrap())
        }
    }
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = self.0.delete_many(&self.0.list("").unwrap_or_default());
        }
    }

    #[test]
    fn put_get_exists_delete_and_put_new() {
        let s = Scratch::new("basic");
        let s = &s.0;
        assert!(!s.exists("a/b").unwrap());
        assert!(matches!(s.get("a/b"), Err(RepoError::NotFound(_))));
        s.put("a/b", b"one").unwrap();
        assert!(s.exists("a/b").unwrap());
        assert_eq!(s.get("a/b").unwrap(), b"one");
        assert!(matches!(
            s.put_new("a/b", b"two"),
            Err(RepoError::Exists(_))
        ));
        assert_eq!(s.get("a/b").unwrap(), b"one", "put_new never replaces");
        s.put_new("a/c", b"new").unwrap();
        assert_eq!(s.list("a/").unwrap(), ["a/b", "a/c"]);
        assert_eq!(s.list("").unwrap(), ["a/b", "a/c"]);
        assert!(s.list("nothing/").unwrap().is_empty());
        s.delete("a/b").unwrap();
        s.delete("a/b").unwrap();
        assert!(!s.exists("a/b").unwrap());
        assert!(s.check_name_escapes());
        let r = s.requests().unwrap();
        assert!(
            r.put >= 2 && r.head >= 3 && r.list >= 3 && r.delete >= 2,
            "{r:?}"
        );
    }

    impl S3Store {
        fn check_name_escapes(&self) -> bool {
            ["../x", "/x", "a//b"]
                .iter()
                .all(|n| matches!(self.put(n, b""), Err(RepoError::BadName(_))))
        }
    }

    #[test]
    fn unsynced_writes_are_seen_here_at_once_and_all_stored_by_sync() {
        let s = Scratch::new("sync");
        let s = &s.0;
        let data = |i: usize| format!("chunk {i}").repeat(100).into_bytes();
        for i in 0..40 {
            s.put_unsynced(&format!("chunks/{:02x}/c{i}", i % 7), &data(i))
                .unwrap();
            // Visible to this store at once, whether its upload is done or not.
            assert!(s.exists(&format!("chunks/{:02x}/c{i}", i % 7)).unwrap());
        }
        assert_eq!(s.get("chunks/00/c0").unwrap(), data(0));
        s.sync().unwrap();
        // After sync, another store (another host) sees every object, whole.
        let other =
            S3Store::open("vmbackup-test", s.prefix.trim_end_matches('/'), &settings()).unwrap();
        let names = other.list("chunks/").unwrap();
        assert_eq!(names.len(), 40);
        for i in 0..40 {
            assert_eq!(
                other.get(&format!("chunks/{:02x}/c{i}", i % 7)).unwrap(),
                data(i)
            );
        }
        assert_eq!(s.remove_temporaries().unwrap(), 0);
    }

    #[test]
    fn a_listing_pages_past_a_thousand_keys() {
        let s = Scratch::new("paging");
        let s = &s.0;
        for i in 0..1100 {
            s.put_unsynced(&format!("chunks/{:02x}/k{i:04}", i % 16), b"x")
                .unwrap();
        }
        s.sync().unwrap();
        let before = s.requests().unwrap();
        let names = s.list("chunks/").unwrap();
        let lists = s.requests().unwrap().since(&before).list;
        assert_eq!(names.len(), 1100);
        assert_eq!(
            names
                .iter()
                .collect::<std::collections::BTreeSet<_>>()
                .len(),
            1100
        );
        assert!(lists >= 2, "1100 keys in {lists} listing request(s)");
    }

    /// `list_sized` has the sizes Garage stores; `delete_many` removes 2500 objects (and a
    /// name that is not there) in 3 DeleteObjects requests.
    #[test]
    fn sized_listing_and_bulk_delete() {
        let s = Scratch::new("bulk");
        let s = &s.0;
        let names: Vec<String> = (0..2500)
            .map(|i| format!("chunks/{:02x}/o{i:04}", i % 16))
            .collect();
        for (i, n) in names.iter().enumerate() {
            s.put_unsynced(n, &vec![b'x'; i % 7]).unwrap();
        }
        s.put("other", b"abc").unwrap();
        s.sync().unwrap();
        let sized = s.list_sized("chunks/").unwrap();
        assert_eq!(sized.len(), 2500);
        for (n, size) in &sized {
            let i: usize = n.rsplit_once('o').unwrap().1.parse().unwrap();
            assert_eq!(*size, (i % 7) as u64, "{n}");
        }
        assert!(s
            .list_sized("")
            .unwrap()
            .contains(&("other".to_string(), 3)));
        assert_eq!(s.delete_batch(), 1000);
        let mut doomed = names.clone();
        doomed.push("chunks/00/never-written".into());
        let before = s.requests().unwrap();
        s.delete_many(&doomed).unwrap();
        let made = s.requests().unwrap().since(&before);
        assert_eq!(made.delete, 3, "{made:?}");
        assert!(s.list("chunks/").unwrap().is_empty());
        assert_eq!(s.list("").unwrap(), ["other"]);
        s.delete_many(&[]).unwrap();
        assert_eq!(s.requests().unwrap().since(&before).delete, 3);
    }

    /// gc of a repository on Garage: the bytes it reports freed are the sizes Garage listed
    /// for the chunks that went (and the deleted backup's stored bytes), and its N chunks go
    /// in ceil(N/1000) DeleteObjects requests, not N.
    #[test]
    fn gc_on_garage_frees_the_listed_bytes_in_bulk_deletes() {
        use crate::source::memory::MemorySource;
        let scratch = Scratch::new("gc");
        let d = tempfile::tempdir().unwrap();
        let prefix = scratch.0.prefix.trim_end_matches('/').to_string();
        let store = S3Store::open("vmbackup-test", &prefix, &settings()).unwrap();
        let repo = crate::Repository::open_with(d.path(), Box::new(store)).unwrap();
        // Small chunks, each its own: 4 KiB, numbered.
        let disk = |n: usize, seed: u8| {
            let mut data = vec![seed; n << 12];
            for (i, c) in data.chunks_mut(1 << 12).enumerate() {
                c[..8].copy_from_slice(&(i as u64).to_le_bytes());
            }
            MemorySource { data, zero: vec![] }
        };
        const N: usize = 2300;
        crate::teststores::publish_backup(
            &repo,
            "keep",
            "vm",
            "2026-01-01T00:00:00Z",
            &disk(40, 1),
            1 << 12,
        );
        crate::teststores::publish_backup(
            &repo,
            "drop",
            "vm",
            "2026-01-02T00:00:00Z",
            &disk(N, 2),
            1 << 12,
        );
        let stored = repo.load("drop").unwrap().stored_bytes;
        // What Garage lists, through another client.
        let other = S3Store::open("vmbackup-test", &prefix, &settings()).unwrap();
        let listed = other.list_sized("chunks/").unwrap();
        assert_eq!(listed.len(), 40 + N);
        repo.delete("drop").unwrap();
        let before = repo.store().requests().unwrap();
        let started = std::time::Instant::now();
        let c = repo.gc().unwrap().unwrap();
        let took = started.elapsed();
        let made = repo.store().requests().unwrap().since(&before);
        let left: std::collections::HashSet<String> =
            other.list("chunks/").unwrap().into_iter().collect();
        let freed: u64 = listed
            .iter()
            .filter(|(n, _)| !left.contains(n))
            .map(|(_, s)| s)
            .sum();
        assert_eq!((c.removed_chunks, c.kept_chunks), (N as u64, 40));
        assert_eq!(left.len(), 40);
        assert!(freed > 0);
        assert_eq!(c.removed_bytes, freed);
        assert_eq!(c.removed_bytes, stored);
        // ceil(2300/1000) = 3 DeleteObjects, and the lock's own DELETE when released.
        assert_eq!(made.delete, N.div_ceil(1000) as u64 + 1, "{made:?}");
        eprintln!("gc of {N} chunks on Garage: {took:?}, requests {made:?}");
        assert!(repo.verify("keep").unwrap().ok);
    }

    #[test]
    fn a_failed_upload_fails_sync_and_what_follows() {
        let mut scratch = Scratch::new("fail");
        let good = (scratch.0.client.clone(), scratch.0.chunk_client.clone());
        // The store goes away: its clients now reach a closed port, retried for a second.
        let mut gone = settings();
        gone.endpoint = Some("http://127.0.0.1:9".into());
        let counts = &scratch.0.counts;
        let to_gone = |unsigned| {
            let c = build(
                "vmbackup-test",
                &gone,
                Duration::from_secs(1),
                3,
                counts.clone(),
                unsigned,
            );
            Arc::new(c.unwrap())
        };
        (scratch.0.client, scratch.0.chunk_client) = (to_gone(false), to_gone(true));
        let s = &scratch.0;
        s.put_unsynced("chunks/a", b"data").unwrap();
        let started = std::time::Instant::now();
        let e = s.sync().expect_err("the upload cannot succeed");
        assert!(e.to_string().contains("upload chunks/a"), "{e}");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{:?}",
            started.elapsed()
        );
        // Later writes fail at once, until a sync reported the failure.
        s.put_unsynced("chunks/b", b"data").unwrap();
        std::thread::sleep(Duration::from_secs(3));
        assert!(s.put_unsynced("chunks/c", b"data").is_err());
        assert!(s.sync().is_err());
        // Back: the store works again.
        (scratch.0.client, scratch.0.chunk_client) = good;
        let s = &scratch.0;
        s.put_unsynced("chunks/ok", b"ok").unwrap();
        s.sync().unwrap();
        assert_eq!(s.get("chunks/ok").unwrap(), b"ok");
        assert!(!s.exists("chunks/a").unwrap());
    }

    #[test]
    fn unknown_bucket_wrong_endpoint_and_bad_credentials_are_location_errors() {
        let good = settings();
        let e = S3Store::open("no-such-bucket-vmbackup", "p", &good)
            .err()
            .unwrap();
        assert!(
            matches!(e, RepoError::Location(LocationError::NoBucket { .. })),
            "{e}"
        );
        let mut bad_key = good.clone();
        bad_key.secret_access_key = Some(Secret::new("wrong-secret-value".into()));
        let e = S3Store::open("vmbackup-test", "p", &bad_key).err().unwrap();
        assert!(
            matches!(e, RepoError::Location(LocationError::Denied { .. })),
            "{e}"
        );
        assert!(!e.to_string().contains("wrong-secret-value"), "{e}");
        let mut closed = good.clone();
        closed.endpoint = Some("http://127.0.0.1:9".into());
        let started = std::time::Instant::now();
        let e = S3Store::open("vmbackup-test", "p", &closed).err().unwrap();
        assert!(
            matches!(e, RepoError::Location(LocationError::Unreachable { .. })),
            "{e}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{:?}",
            started.elapsed()
        );
    }
}
