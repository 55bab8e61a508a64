//! Executor sizes remembered across runs, kept in one ConfigMap in stoker's own namespace
//! (`--sizes-configmap`, default `<POD_NAMESPACE>/stoker-sizes`): stoker's own state, the
//! Kubernetes counterpart of the local backend's `<work-dir>/sizes.tsv`.
//!
//! This module knows nothing of the document's format: it keeps one text under the data key
//! [`DATA_KEY`] and changes it only through an [`Update`], a pure function from the stored text
//! to the new one (the root package's `sizes.rs` decodes, merges, bounds and encodes there).
//!
//! # Flow
//!
//! * [`SizesConfigMap::open`] reads the ConfigMap once, at start (on the leader, after it took
//!   the Lease). A read that fails is logged and the copy starts empty: never fatal.
//! * [`SizesConfigMap::document`] is that copy, so that a registration never waits on the API
//!   server.
//! * [`SizesConfigMap::update`] applies the update to the copy at once and queues it for one
//!   writer task, which reads the ConfigMap, applies the update to what is stored, and replaces
//!   it with the `resourceVersion` it read (optimistic concurrency). On 409 Conflict it reads
//!   and applies again, up to [`MAX_ATTEMPTS`] times. The copy then becomes what was written,
//!   entries other writers added included, unless later updates still wait (the copy holds them).
//!
//! # Guarantees
//!
//! * No write while the leader-election [`WriteGate`] is shut: a replica that lost the Lease
//!   writes nothing (the write is dropped with a warning; the new leader writes its own runs).
//! * No update is lost to a concurrent writer: a conflict re-applies it to the newer document.
//! * The stored text is never larger than [`MAX_DOCUMENT_BYTES`] (a ConfigMap holds at most
//!   1 MiB of data): a larger one is refused here, and the caller bounds its documents below it.
//!
//! # Assumptions and caveats
//!
//! * stoker's ServiceAccount may `get` and `update` this one ConfigMap (a Role with
//!   `resourceNames`, deploy/base/rbac.yaml). `create` cannot be limited to a name, so it is not
//!   granted: deploy/base ships the ConfigMap empty, and a missing one is created only where
//!   stoker's identity may (the error says so otherwise).
//! * The copy is not refreshed from other writers between this replica's own writes: two stoker
//!   instances sharing one ConfigMap see each other's entries after their next write or restart.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use kube::Client;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::lease::WriteGate;

/// The data key that holds the document.
pub const DATA_KEY: &str = "sizes.tsv";

/// The largest document stored: a ConfigMap's data may not exceed 1 MiB (1,048,576 bytes); this
/// leaves room for the key.
pub const MAX_DOCUMENT_BYTES: usize = 1_000_000;

/// Reads and writes of one update before it is given up, when every write meets a conflict.
pub const MAX_ATTEMPTS: u32 = 8;

/// A change of the document: the stored text (`None`: none yet) to the new one.
pub type Update = Arc<dyn Fn(Option<&str>) -> String + Send + Sync>;

/// Why a write of the document failed.
#[derive(Debug, thiserror::Error)]
pub enum SizesConfigMapError {
    /// The ConfigMap could not be read.
    #[error("cannot read ConfigMap {namespace}/{name}: {source}")]
    Read {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The ConfigMap does not exist and could not be created.
    #[error(
        "ConfigMap {namespace}/{name} does not exist and cannot be created (deploy/base ships \
         it; stoker's ServiceAccount may only get and update it): {source}"
    )]
    Create {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The ConfigMap could not be replaced.
    #[error("cannot update ConfigMap {namespace}/{name}: {source}")]
    Update {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Another writer changed the ConfigMap before each of this replica's writes.
    #[error("ConfigMap {namespace}/{name} changed under each of {attempts} writes")]
    Conflicts {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Writes tried.
        attempts: u32,
    },
    /// This replica does not hold the Lease.
    #[error("ConfigMap {namespace}/{name} not written: this replica is not the leader")]
    NotLeader {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// The new document is larger than a ConfigMap holds.
    #[error("ConfigMap {namespace}/{name} not written: {bytes} bytes is above {max}")]
    TooLarge {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// The document's size.
        bytes: usize,
        /// [`MAX_DOCUMENT_BYTES`].
        max: usize,
    },
}

// === the pure part ===

/// The document a ConfigMap holds, if any (a ConfigMap without [`DATA_KEY`] holds none).
pub fn document_of(config_map: &ConfigMap) -> Option<&str> {
    config_map
        .data
        .as_ref()
        .and_then(|d| d.get(DATA_KEY))
        .map(String::as_str)
}

/// A new ConfigMap `name` holding `document`.
pub fn new_config_map(name: &str, document: String) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_owned(),
                "stoker".to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(DATA_KEY.to_owned(), document)])),
        ..ConfigMap::default()
    }
}

/// `read` with its document replaced: everything else (its `resourceVersion`, the write's
/// precondition; other data keys; labels) kept.
pub fn with_document(mut read: ConfigMap, document: String) -> ConfigMap {
    read.data
        .get_or_insert_with(BTreeMap::new)
        .insert(DATA_KEY.to_owned(), document);
    read
}

/// Whether a write failed only because another writer came first.
fn is_conflict(err: &kube::Error) -> bool {
    matches!(err, kube::Error::Api(s) if s.code == 409)
}

/// The pause before attempt `attempt` (1-based) after a conflict: 20 ms doubling, at most 1 s.
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(20u64.saturating_mul(1 << attempt.min(6)).min(1_000))
}

// === the I/O shell ===

/// The sizes ConfigMap: a copy read at start and a writer task. See the module documentation.
#[derive(Debug)]
pub struct SizesConfigMap {
    namespace: String,
    name: String,
    copy: Arc<Mutex<Option<String>>>,
    queue: mpsc::UnboundedSender<Update>,
    /// Updates queued and not yet written or given up.
    pending: watch::Sender<usize>,
}

/// What the writer task needs.
struct Writer {
    api: Api<ConfigMap>,
    namespace: String,
    name: String,
    gate: Arc<WriteGate>,
}

impl SizesConfigMap {
    /// Reads ConfigMap `namespace/name` (never fatal) and starts its writer task, which writes
    /// only while `gate` is open.
    pub async fn open(client: Client, namespace: &str, name: &str, gate: Arc<WriteGate>) -> Self {
        let writer = Writer {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            gate,
        };
        let initial = match writer.api.get_opt(name).await {
            Ok(Some(config_map)) => {
                let document = document_of(&config_map).map(str::to_owned);
                info!(
                    namespace,
                    name,
                    bytes = document.as_ref().map_or(0, String::len),
                    "remembered executor sizes read"
                );
                document
            }
            Ok(None) => {
                info!(
                    namespace,
                    name, "no remembered executor sizes yet: the ConfigMap does not exist"
                );
                None
            }
            Err(err) => {
                warn!(namespace, name, error = %err,
                    "cannot read the remembered executor sizes: starting without them");
                None
            }
        };
        let copy = Arc::new(Mutex::new(initial));
        let (queue, updates) = mpsc::unbounded_channel();
        let (pending, _) = watch::channel(0);
        tokio::spawn(writer.run(updates, Arc::clone(&copy), pending.clone()));
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            copy,
            queue,
            pending,
        }
    }

    /// `namespace/name`, for messages.
    pub fn describe(&self) -> String {
        format!("ConfigMap {}/{}", self.namespace, self.name)
    }

    /// The document as this replica knows it: read at start, then as last written.
    pub fn document(&self) -> Option<String> {
        self.copy
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Applies `update` to the copy now and queues it to be written.
    pub fn update(&self, update: Update) {
        {
            // Counted under the copy's lock, so that the writer never replaces a copy that
            // holds an update it has not written yet (see Writer::run).
            let mut copy = self.copy.lock().unwrap_or_else(PoisonError::into_inner);
            self.pending.send_modify(|n| *n += 1);
            *copy = Some(update(copy.as_deref()));
        }
        if self.queue.send(update).is_err() {
            // The writer task is gone (the runtime is shutting down).
            self.pending.send_modify(|n| *n = n.saturating_sub(1));
            warn!(namespace = %self.namespace, name = %self.name,
                "remembered executor sizes not written: the writer has stopped");
        }
    }

    /// Waits until every queued update is written or given up, at most `timeout`; false when
    /// some are still pending then.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let mut pending = self.pending.subscribe();
        tokio::time::timeout(timeout, pending.wait_for(|n| *n == 0))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

impl Writer {
    async fn run(
        self,
        mut updates: mpsc::UnboundedReceiver<Update>,
        copy: Arc<Mutex<Option<String>>>,
        pending: watch::Sender<usize>,
    ) {
        while let Some(update) = updates.recv().await {
            match self.write(&update).await {
                Ok((document, attempts)) => {
                    debug!(namespace = %self.namespace, name = %self.name, attempts,
                        bytes = document.len(), "remembered executor sizes written");
                    // What was written holds other writers' entries too; but while later
                    // updates wait, the copy (which holds them) stays until the last is written.
                    let mut guard = copy.lock().unwrap_or_else(PoisonError::into_inner);
                    if *pending.borrow() == 1 {
                        *guard = Some(document);
                    }
                }
                Err(err) => warn!(error = %err, "remembered executor sizes not written"),
            }
            pending.send_modify(|n| *n = n.saturating_sub(1));
        }
    }

    /// Read, apply, write with the read `resourceVersion`; again on conflict. Returns what was
    /// written and after how many attempts.
    async fn write(&self, update: &Update) -> Result<(String, u32), SizesConfigMapError> {
        let (namespace, name) = (self.namespace.clone(), self.name.clone());
        for attempt in 1..=MAX_ATTEMPTS {
            let read =
                self.api
                    .get_opt(&self.name)
                    .await
                    .map_err(|source| SizesConfigMapError::Read {
                        namespace: namespace.clone(),
                        name: name.clone(),
                        source,
                    })?;
            let document = update(read.as_ref().and_then(document_of));
            if document.len() > MAX_DOCUMENT_BYTES {
                return Err(SizesConfigMapError::TooLarge {
                    namespace,
                    name,
                    bytes: document.len(),
                    max: MAX_DOCUMENT_BYTES,
                });
            }
            if !self.gate.is_open() {
                return Err(SizesConfigMapError::NotLeader { namespace, name });
            }
            let params = PostParams::default();
            let written = match read {
                None => self
                    .api
                    .create(&params, &new_config_map(&self.name, document.clone()))
                    .await
                    .map_err(|source| (source, true)),
                Some(read) => self
                    .api
                    .replace(&self.name, &params, &with_document(read, document.clone()))
                    .await
                    .map_err(|source| (source, false)),
            };
            match written {
                Ok(_) => return Ok((document, attempt)),
                // Someone wrote (or created) it since it was read: read and apply again.
                Err((source, _)) if is_conflict(&source) => {
                    debug!(namespace = %namespace, name = %name, attempt,
                        "the sizes ConfigMap changed since it was read: applying the update again");
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Err((source, true)) => {
                    return Err(SizesConfigMapError::Create {
                        namespace,
                        name,
                        source,
                    })
                }
                Err((source, false)) => {
                    return Err(SizesConfigMapError::Update {
                        namespace,
                        name,
                        source,
                    })
                }
            }
        }
        Err(SizesConfigMapError::Conflicts {
            namespace,
            name,
            attempts: MAX_ATTEMPTS,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_replaces_only_its_key_and_keeps_the_precondition() {
        let mut read = new_config_map("stoker-sizes", "old".to_owned());
        read.metadata.resource_version = Some("42".to_owned());
        if let Some(data) = read.data.as_mut() {
            data.insert("note".to_owned(), "kept".to_owned());
        }
        let written = with_document(read, "new".to_owned());
        assert_eq!(written.metadata.resource_version.as_deref(), Some("42"));
        assert_eq!(document_of(&written), Some("new"));
        assert_eq!(
            written
                .data
                .as_ref()
                .and_then(|d| d.get("note"))
                .map(String::as_str),
            Some("kept")
        );
    }

    #[test]
    fn a_config_map_without_the_key_holds_no_document() {
        let empty = ConfigMap {
            metadata: ObjectMeta {
                name: Some("stoker-sizes".to_owned()),
                ..ObjectMeta::default()
            },
            ..ConfigMap::default()
        };
        assert_eq!(document_of(&empty), None);
        assert_eq!(
            document_of(&with_document(empty, "x".to_owned())),
            Some("x")
        );
    }

    #[test]
    fn a_new_config_map_is_named_and_labelled() {
        let cm = new_config_map("stoker-sizes", "x".to_owned());
        assert_eq!(cm.metadata.name.as_deref(), Some("stoker-sizes"));
        assert_eq!(cm.metadata.resource_version, None);
        assert_eq!(document_of(&cm), Some("x"));
    }

    /// A scripted API server holding at most one ConfigMap: GET, POST (create) and PUT (replace
    /// with a matching resourceVersion, else 409), and another writer that changes the ConfigMap
    /// just before each of this replica's first `interfere` writes.
    #[derive(Default)]
    struct Fake {
        stored: Option<ConfigMap>,
        version: u64,
        interfere: u32,
        writes: u32,
    }

    impl Fake {
        fn store(&mut self, mut cm: ConfigMap) {
            self.version += 1;
            cm.metadata.resource_version = Some(self.version.to_string());
            self.stored = Some(cm);
        }

        fn answer(&mut self, method: &http::Method, body: &[u8]) -> (u16, serde_json::Value) {
            let not_found = serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": "configmaps \"stoker-sizes\" not found", "reason": "NotFound", "code": 404});
            let conflict = serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": "the object has been modified", "reason": "Conflict", "code": 409});
            if method == http::Method::GET {
                return match &self.stored {
                    Some(cm) => (200, serde_json::to_value(cm).unwrap_or_default()),
                    None => (404, not_found),
                };
            }
            let Ok(sent) = serde_json::from_slice::<ConfigMap>(body) else {
                return (400, serde_json::json!({"kind": "Status", "code": 400}));
            };
            self.writes += 1;
            if self.interfere > 0 {
                self.interfere -= 1;
                let mut other = self
                    .stored
                    .clone()
                    .unwrap_or_else(|| new_config_map("stoker-sizes", String::new()));
                let before = document_of(&other).unwrap_or_default().to_owned();
                other = with_document(other, format!("{before}other writer\n"));
                self.store(other);
                return (409, conflict);
            }
            let expected = self
                .stored
                .as_ref()
                .and_then(|c| c.metadata.resource_version.clone());
            if sent.metadata.resource_version != expected {
                return (409, conflict);
            }
            self.store(sent);
            (200, serde_json::to_value(&self.stored).unwrap_or_default())
        }
    }

    fn writer(fake: &Arc<Mutex<Fake>>, gate: Arc<WriteGate>) -> Writer {
        Writer {
            api: Api::namespaced(fake_client(fake), "stoker"),
            namespace: "stoker".to_owned(),
            name: "stoker-sizes".to_owned(),
            gate,
        }
    }

    fn fake_client(fake: &Arc<Mutex<Fake>>) -> Client {
        let fake = Arc::clone(fake);
        let service = tower::service_fn(move |req: http::Request<kube::client::Body>| {
            let fake = Arc::clone(&fake);
            async move {
                let (parts, body) = req.into_parts();
                let body = body.collect_bytes().await?;
                let (code, json) = fake
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .answer(&parts.method, &body);
                http::Response::builder()
                    .status(code)
                    .header("content-type", "application/json")
                    .body(kube::client::Body::from(json.to_string().into_bytes()))
                    .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
            }
        });
        Client::new(service, "stoker")
    }

    fn append(line: &'static str) -> Update {
        Arc::new(move |stored| format!("{}{line}\n", stored.unwrap_or_default()))
    }

    fn stored(fake: &Arc<Mutex<Fake>>) -> Option<String> {
        let fake = fake.lock().unwrap_or_else(PoisonError::into_inner);
        fake.stored
            .as_ref()
            .and_then(document_of)
            .map(str::to_owned)
    }

    #[tokio::test(start_paused = true)]
    async fn a_missing_config_map_is_created_then_updated_with_its_resource_version() {
        let fake = Arc::new(Mutex::new(Fake::default()));
        let w = writer(&fake, WriteGate::always_open());
        let (document, attempts) = w.write(&append("first")).await.expect("created");
        assert_eq!((document.as_str(), attempts), ("first\n", 1));
        w.write(&append("second")).await.expect("updated");
        assert_eq!(stored(&fake).as_deref(), Some("first\nsecond\n"));
    }

    #[tokio::test(start_paused = true)]
    async fn the_copy_is_read_at_start_changed_at_once_and_written_in_the_background() {
        let fake = Arc::new(Mutex::new(Fake::default()));
        fake.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .store(new_config_map("stoker-sizes", "stored\n".to_owned()));
        let sizes = SizesConfigMap::open(
            fake_client(&fake),
            "stoker",
            "stoker-sizes",
            WriteGate::always_open(),
        )
        .await;
        assert_eq!(sizes.document().as_deref(), Some("stored\n"));
        sizes.update(append("ours"));
        assert_eq!(sizes.document().as_deref(), Some("stored\nours\n"));
        assert!(sizes.flush(Duration::from_secs(5)).await);
        assert_eq!(stored(&fake).as_deref(), Some("stored\nours\n"));
        // Two updates in a row: the copy never loses the second while the first is written.
        sizes.update(append("a"));
        sizes.update(append("b"));
        assert_eq!(sizes.document().as_deref(), Some("stored\nours\na\nb\n"));
        tokio::task::yield_now().await;
        assert_eq!(sizes.document().as_deref(), Some("stored\nours\na\nb\n"));
        assert!(sizes.flush(Duration::from_secs(5)).await);
        assert_eq!(sizes.document(), stored(&fake));
        assert_eq!(stored(&fake).as_deref(), Some("stored\nours\na\nb\n"));
        assert_eq!(sizes.describe(), "ConfigMap stoker/stoker-sizes");
    }

    #[tokio::test(start_paused = true)]
    async fn a_conflict_applies_the_update_again_to_the_newer_document() {
        let fake = Arc::new(Mutex::new(Fake::default()));
        let w = writer(&fake, WriteGate::always_open());
        w.write(&append("first")).await.expect("created");
        fake.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .interfere = 2;
        let (document, attempts) = w.write(&append("ours")).await.expect("written");
        // Neither the other writer's changes nor ours are lost.
        assert_eq!(attempts, 3);
        assert_eq!(document, "first\nother writer\nother writer\nours\n");
        assert_eq!(stored(&fake), Some(document));
    }

    #[tokio::test(start_paused = true)]
    async fn endless_conflicts_give_up_after_the_last_attempt() {
        let fake = Arc::new(Mutex::new(Fake {
            interfere: u32::MAX,
            ..Fake::default()
        }));
        let w = writer(&fake, WriteGate::always_open());
        let err = w.write(&append("ours")).await.expect_err("given up");
        assert!(
            matches!(
                err,
                SizesConfigMapError::Conflicts {
                    attempts: MAX_ATTEMPTS,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(
            fake.lock().unwrap_or_else(PoisonError::into_inner).writes,
            MAX_ATTEMPTS
        );
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_is_written_while_the_gate_is_shut() {
        let fake = Arc::new(Mutex::new(Fake::default()));
        let w = writer(&fake, WriteGate::shut());
        let err = w.write(&append("ours")).await.expect_err("not the leader");
        assert!(
            matches!(err, SizesConfigMapError::NotLeader { .. }),
            "{err}"
        );
        assert_eq!(
            fake.lock().unwrap_or_else(PoisonError::into_inner).writes,
            0
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_document_above_the_config_map_limit_is_not_written() {
        let fake = Arc::new(Mutex::new(Fake::default()));
        let w = writer(&fake, WriteGate::always_open());
        let huge: Update = Arc::new(|_| "x".repeat(MAX_DOCUMENT_BYTES + 1));
        let err = w.write(&huge).await.expect_err("too large");
        assert!(matches!(err, SizesConfigMapError::TooLarge { .. }), "{err}");
        assert_eq!(
            fake.lock().unwrap_or_else(PoisonError::into_inner).writes,
            0
        );
    }

    #[test]
    fn backoff_grows_and_is_bounded() {
        assert!(backoff(1) < backoff(2));
        assert!((1..=MAX_ATTEMPTS + 4).all(|a| backoff(a) <= Duration::from_secs(1)));
    }
}
