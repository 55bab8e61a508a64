//! stoker's Kubernetes backend: executors as pods that the official `apache/spark` image runs
//! unchanged.
//!
//! * [`pod`] builds each executor's pod the way Spark's own backend does, on top of the
//!   application's pod template.
//! * One shared watch over every pod this stoker manages (label
//!   `app.kubernetes.io/managed-by=stoker` and `stoker.dev/instance=<instance>`) feeds every
//!   application's engine; [`status`] turns pod status into exit reasons.
//! * Creation runs with bounded concurrency under a client-side rate limit (QPS and burst), with
//!   backoff on 429, 5xx and quota rejections; deletion uses the engine's grace period.
//! * Restart safety: on start the backend lists its pods and keeps them until their driver
//!   re-registers with the same token ([`ExecutorBackend::claim`]); pods whose driver does not
//!   come back within the adoption window are deleted.

pub mod client;
pub mod limiter;
pub mod pod;
pub mod status;
pub use client::client;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use stoker_core::{
    AppId, BackendObservation, ExecutorBackend, ExecutorId, ExecutorTemplate, ExitReason,
    LaunchRequest, Millis, Observation, ObservationSink, ProfileId, RecoveredExecutor,
};
use tracing::{debug, info, warn};

use crate::limiter::Limiter;
use crate::pod::{DriverPod, PodDefaults};
use crate::status::PodView;

/// How the backend talks to the cluster.
#[derive(Clone, Debug)]
pub struct KubernetesConfig {
    /// Namespace, image and instance label defaults.
    pub defaults: PodDefaults,
    /// Client-side rate limit for pod creation and deletion (requests per second; 0 = none).
    pub qps: f64,
    /// Burst above the rate.
    pub burst: u32,
    /// Pod creations in flight at once.
    pub create_concurrency: usize,
    /// Watch and list only this namespace (for a namespaced Role); `None`: all namespaces.
    pub watch_namespace: Option<String>,
    /// Pods of an earlier stoker whose driver has not re-registered this long after start are
    /// deleted.
    pub adoption_window: Duration,
}

/// Why the backend could not start.
#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    /// The initial list of this stoker's pods failed (permissions, connectivity).
    #[error("cannot list executor pods (selector {selector}): {source}")]
    List {
        /// The label selector.
        selector: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The client could not be built from the configuration (TLS material, credentials).
    #[error("cannot build the Kubernetes client: {source}")]
    Client {
        /// What kube reported.
        #[source]
        source: kube::Error,
    },
}

type Key = (AppId, ExecutorId);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reported {
    Nothing,
    Accepted,
    Running,
}

#[derive(Debug)]
struct Record {
    namespace: String,
    pod_name: String,
    created: bool,
    cancelled: bool,
    /// stoker asked for the deletion (scale-down, kill, application end).
    deleting: bool,
    reported: Reported,
    /// The driver was told the pod cannot be scheduled (once per pod).
    told_unschedulable: bool,
}

#[derive(Debug)]
struct Unclaimed {
    namespace: String,
    pod_name: String,
    token_digest: String,
    profile: ProfileId,
    view: PodView,
}

struct Inner {
    client: Client,
    /// The shared watch's client (its own connection).
    watch_client: Client,
    config: KubernetesConfig,
    sink: ObservationSink,
    records: DashMap<Key, Record>,
    unclaimed: Mutex<HashMap<AppId, BTreeMap<ExecutorId, Unclaimed>>>,
    create_slots: tokio::sync::Semaphore,
    limiter: Limiter,
    driver_uids: DashMap<(String, String), String>,
}

/// The Kubernetes backend. Cheap to clone.
#[derive(Clone)]
pub struct KubernetesBackend {
    inner: Arc<Inner>,
}

/// The label selector of this stoker's pods.
pub fn selector(instance: &str) -> String {
    format!(
        "app.kubernetes.io/managed-by={},{}={}",
        pod::MANAGED_BY,
        pod::LABEL_INSTANCE,
        pod::label_value(instance)
    )
}

fn key_of(pod: &Pod) -> Option<Key> {
    let annotations = pod.metadata.annotations.as_ref()?;
    let labels = pod.metadata.labels.as_ref()?;
    let app = AppId::parse(annotations.get("stoker.dev/app-id")?).ok()?;
    let id: u64 = labels.get(pod::LABEL_EXEC_ID)?.parse().ok()?;
    if id == 0 || id > i32::MAX as u64 {
        return None;
    }
    Some((app, ExecutorId::new(id)))
}

fn is_retryable(status: &kube::core::Status) -> bool {
    status.code == 429
        || status.code >= 500
        || (status.code == 403 && status.message.contains("exceeded quota"))
}

impl KubernetesBackend {
    /// Lists this stoker's pods (kept for adoption), then starts the shared watch and the
    /// reaper of pods nobody claims. `watch_client` serves the shared watch: give it a client of
    /// its own (see [`client()`]) so the watch's stream of pod events does not share an HTTP/2
    /// connection with pod creations; a clone of `client` works too.
    pub async fn start(
        client: Client,
        watch_client: Client,
        config: KubernetesConfig,
        sink: ObservationSink,
    ) -> Result<Self, K8sError> {
        let selector = selector(&config.defaults.instance);
        let inner = Arc::new(Inner {
            limiter: Limiter::new(config.qps, config.burst),
            create_slots: tokio::sync::Semaphore::new(config.create_concurrency.max(1)),
            client,
            watch_client,
            config,
            sink,
            records: DashMap::new(),
            unclaimed: Mutex::new(HashMap::new()),
            driver_uids: DashMap::new(),
        });
        let backend = Self { inner };
        let pods = backend.pods_api(&backend.inner.client);
        let list = pods
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|source| K8sError::List {
                selector: selector.clone(),
                source,
            })?;
        let mut kept = 0usize;
        for p in list.items {
            let (Some(key), Some(name), Some(ns)) = (
                key_of(&p),
                p.metadata.name.clone(),
                p.metadata.namespace.clone(),
            ) else {
                continue;
            };
            if p.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let view = status::classify(&p);
            if matches!(view, PodView::Exited { .. }) {
                if !pod::keep_on_exit(&p) {
                    backend.delete_pod(ns, name, 0);
                }
                continue;
            }
            let annotations = p.metadata.annotations.clone().unwrap_or_default();
            let labels = p.metadata.labels.clone().unwrap_or_default();
            let unclaimed = Unclaimed {
                namespace: ns,
                pod_name: name,
                token_digest: annotations
                    .get(pod::ANNOTATION_TOKEN)
                    .cloned()
                    .unwrap_or_default(),
                profile: labels
                    .get(pod::LABEL_PROFILE)
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(0),
                view,
            };
            if let Ok(mut map) = backend.inner.unclaimed.lock() {
                map.entry(key.0).or_default().insert(key.1, unclaimed);
                kept += 1;
            }
        }
        info!(
            pods = kept,
            adoption_window_ms = backend.inner.config.adoption_window.as_millis() as u64,
            "kubernetes backend: pods of an earlier stoker wait for their drivers"
        );
        tokio::spawn(backend.clone().watch(selector));
        tokio::spawn(backend.clone().reap_unclaimed());
        Ok(backend)
    }

    fn pods_api(&self, client: &Client) -> Api<Pod> {
        match &self.inner.config.watch_namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }

    fn report(&self, key: &Key, observation: Observation) {
        (self.inner.sink)(BackendObservation {
            app_id: key.0.clone(),
            executor_id: key.1,
            observation,
        });
    }

    fn report_exit(&self, key: &Key, code: Option<i32>, reason: ExitReason, message: String) {
        self.report(
            key,
            Observation::Exited {
                code,
                reason,
                message,
            },
        );
    }

    /// Deletes a pod in the background (rate-limited, retried on transient errors).
    fn delete_pod(&self, namespace: String, name: String, grace_seconds: u32) {
        let this = self.clone();
        tokio::spawn(async move {
            let api: Api<Pod> = Api::namespaced(this.inner.client.clone(), &namespace);
            let params = DeleteParams {
                grace_period_seconds: Some(grace_seconds),
                ..DeleteParams::default()
            };
            let mut backoff = Duration::from_millis(200);
            for _ in 0..8 {
                this.inner.limiter.acquire().await;
                match api.delete(&name, &params).await {
                    Ok(_) => {
                        debug!(pod = %name, namespace = %namespace, grace_seconds, "pod deletion requested");
                        return;
                    }
                    Err(kube::Error::Api(s)) if s.code == 404 => return,
                    Err(kube::Error::Api(s)) if !is_retryable(&s) => {
                        warn!(pod = %name, namespace = %namespace, error = %s.message, "cannot delete pod");
                        return;
                    }
                    Err(err) => {
                        warn!(pod = %name, namespace = %namespace, error = %err, "pod deletion failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                    }
                }
            }
        });
    }

    async fn driver_owner(
        &self,
        template: &ExecutorTemplate,
        namespace: &str,
    ) -> Option<DriverPod> {
        let name = template.kubernetes.driver_pod_name.clone();
        if name.is_empty() {
            return None;
        }
        if !template.kubernetes.driver_pod_uid.is_empty() {
            return Some(DriverPod {
                name,
                uid: template.kubernetes.driver_pod_uid.clone(),
            });
        }
        let cache_key = (namespace.to_string(), name.clone());
        if let Some(uid) = self.inner.driver_uids.get(&cache_key) {
            return Some(DriverPod {
                name,
                uid: uid.clone(),
            });
        }
        let api: Api<Pod> = Api::namespaced(self.inner.client.clone(), namespace);
        self.inner.limiter.acquire().await;
        match api.get_opt(&name).await {
            Ok(Some(p)) => {
                let uid = p.metadata.uid?;
                self.inner.driver_uids.insert(cache_key, uid.clone());
                Some(DriverPod { name, uid })
            }
            Ok(None) => {
                warn!(namespace, driver_pod = %name, "driver pod not found: executors get no owner reference");
                None
            }
            Err(err) => {
                warn!(namespace, driver_pod = %name, error = %err, "cannot read the driver pod: executors get no owner reference");
                None
            }
        }
    }

    async fn create(self, key: Key, mut pod_spec: Pod, template: Arc<ExecutorTemplate>) {
        let namespace = pod_spec.metadata.namespace.clone().unwrap_or_default();
        let name = pod_spec.metadata.name.clone().unwrap_or_default();
        if let Some(driver) = self.driver_owner(&template, &namespace).await {
            pod_spec.metadata.owner_references = Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Pod".into(),
                name: driver.name,
                uid: driver.uid,
                controller: Some(true),
                block_owner_deletion: Some(false),
            }]);
        }
        let api: Api<Pod> = Api::namespaced(self.inner.client.clone(), &namespace);
        let mut backoff = Duration::from_millis(500);
        let mut told_quota = false;
        loop {
            let cancelled = self.inner.records.get(&key).is_none_or(|r| r.cancelled);
            if cancelled {
                self.inner.records.remove(&key);
                self.report_exit(
                    &key,
                    None,
                    ExitReason::ScaledDown,
                    "removed before its pod was created".into(),
                );
                return;
            }
            let result = {
                let _slot = self.inner.create_slots.acquire().await;
                self.inner.limiter.acquire().await;
                api.create(&PostParams::default(), &pod_spec).await
            };
            match result {
                Ok(_) => break,
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    debug!(app = %key.0, executor = %key.1, pod = %name, "pod already exists");
                    break;
                }
                Err(kube::Error::Api(s)) if is_retryable(&s) => {
                    if s.code == 403 && !told_quota {
                        told_quota = true;
                        warn!(app = %key.0, executor = %key.1, namespace = %namespace, error = %s.message,
                            "resource quota exceeded: the executor stays requested and creation is retried with backoff");
                        self.report(
                            &key,
                            Observation::Waiting {
                                message: format!(
                                    "namespace {namespace}: {} (stoker retries with backoff)",
                                    s.message
                                ),
                            },
                        );
                    } else {
                        debug!(app = %key.0, executor = %key.1, code = s.code, "pod creation refused for now; backing off");
                    }
                }
                Err(kube::Error::Api(s)) => {
                    warn!(app = %key.0, executor = %key.1, pod = %name, code = s.code, error = %s.message, "pod creation failed");
                    self.inner.records.remove(&key);
                    self.report_exit(
                        &key,
                        None,
                        ExitReason::StartFailed,
                        format!(
                            "the API server refused pod {namespace}/{name}: {} ({})",
                            s.message, s.reason
                        ),
                    );
                    return;
                }
                Err(err) => {
                    warn!(app = %key.0, executor = %key.1, error = %err, "pod creation failed; retrying");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
        // Created. Tell the engine unless the watch already did; delete it again if the engine
        // gave up on it meanwhile.
        let mut delete = false;
        match self.inner.records.get_mut(&key) {
            Some(mut r) => {
                r.created = true;
                if r.cancelled {
                    delete = true;
                } else if r.reported == Reported::Nothing {
                    r.reported = Reported::Accepted;
                    drop(r);
                    self.report(
                        &key,
                        Observation::Accepted {
                            backend_name: name.clone(),
                        },
                    );
                }
            }
            None => delete = true,
        }
        if delete {
            self.delete_pod(namespace, name, 0);
        }
    }

    async fn watch(self, selector: String) {
        let config = watcher::Config::default().labels(&selector);
        let mut stream = watcher::watcher(self.pods_api(&self.inner.watch_client), config)
            .default_backoff()
            .boxed();
        let mut relist: Option<HashSet<Key>> = None;
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Init) => relist = Some(HashSet::new()),
                Ok(watcher::Event::InitApply(p)) => {
                    if let (Some(seen), Some(k)) = (relist.as_mut(), key_of(&p)) {
                        seen.insert(k);
                    }
                    self.on_apply(&p);
                }
                Ok(watcher::Event::InitDone) => {
                    if let Some(seen) = relist.take() {
                        self.after_relist(&seen);
                    }
                }
                Ok(watcher::Event::Apply(p)) => self.on_apply(&p),
                Ok(watcher::Event::Delete(p)) => self.on_delete(&p),
                Err(err) => warn!(error = %err, "pod watch error; resuming with backoff"),
            }
        }
        warn!("pod watch ended");
    }

    fn on_apply(&self, p: &Pod) {
        let Some(key) = key_of(p) else { return };
        let name = p.metadata.name.clone().unwrap_or_default();
        let namespace = p.metadata.namespace.clone().unwrap_or_default();
        let view = status::classify(p);
        let mut report: Option<Observation> = None;
        let mut warning: Option<Observation> = None;
        let mut delete_grace: Option<u32> = None;
        let mut known = false;
        if let Some(mut r) = self.inner.records.get_mut(&key) {
            known = true;
            if r.pod_name != name {
                return;
            }
            r.created = true;
            match &view {
                PodView::Pending => {
                    if r.reported == Reported::Nothing {
                        r.reported = Reported::Accepted;
                        report = Some(Observation::Accepted {
                            backend_name: name.clone(),
                        });
                    }
                    if let Some(why) = status::unschedulable(p) {
                        if !r.told_unschedulable {
                            r.told_unschedulable = true;
                            warn!(app = %key.0, executor = %key.1, pod = %name, reason = %why,
                                "executor pod cannot be scheduled");
                            warning = Some(Observation::Waiting {
                                message: format!(
                                    "pod {namespace}/{name} cannot be scheduled: {why}"
                                ),
                            });
                        }
                    }
                }
                PodView::Running { ip } => {
                    if r.reported != Reported::Running {
                        r.reported = Reported::Running;
                        report = Some(Observation::Running {
                            host: ip.clone(),
                            backend_name: name.clone(),
                        });
                    }
                }
                PodView::Exited {
                    code,
                    reason,
                    message,
                } => {
                    // A pod being deleted that stoker did not delete: someone else removed it.
                    let by_someone_else = p.metadata.deletion_timestamp.is_some() && !r.deleting;
                    report = Some(if by_someone_else {
                        Observation::Exited {
                            code: *code,
                            reason: ExitReason::DeletedExternally,
                            message: format!(
                                "pod {name} was deleted (not by stoker); the executor {message}"
                            ),
                        }
                    } else {
                        Observation::Exited {
                            code: *code,
                            reason: *reason,
                            message: message.clone(),
                        }
                    });
                    if p.metadata.deletion_timestamp.is_none() && !pod::keep_on_exit(p) {
                        delete_grace = Some(0);
                    }
                }
            }
        }
        if known {
            if matches!(report, Some(Observation::Exited { .. })) {
                self.inner.records.remove(&key);
                info!(app = %key.0, executor = %key.1, pod = %name, "executor pod exited");
            }
            if let Some(o) = report {
                self.report(&key, o);
            }
            if let Some(o) = warning {
                self.report(&key, o);
            }
            if let Some(g) = delete_grace {
                self.delete_pod(namespace, name, g);
            }
            return;
        }
        // Exited pods the application asked to keep (deleteOnTermination=false) stay.
        let kept = matches!(view, PodView::Exited { .. }) && pod::keep_on_exit(p);
        let mut orphan = true;
        if let Ok(mut map) = self.inner.unclaimed.lock() {
            if let Some(u) = map.get_mut(&key.0).and_then(|m| m.get_mut(&key.1)) {
                orphan = false;
                if u.pod_name == name {
                    if matches!(view, PodView::Exited { .. })
                        && p.metadata.deletion_timestamp.is_none()
                        && !kept
                    {
                        delete_grace = Some(0);
                    }
                    u.view = view;
                }
            }
        }
        if orphan && p.metadata.deletion_timestamp.is_none() && !kept {
            warn!(app = %key.0, executor = %key.1, pod = %name, namespace = %namespace,
                "pod of this stoker that no application owns: deleting it");
            delete_grace = Some(0);
        }
        if let Some(g) = delete_grace {
            self.delete_pod(namespace, name, g);
        }
    }

    fn on_delete(&self, p: &Pod) {
        let Some(key) = key_of(p) else { return };
        let name = p.metadata.name.clone().unwrap_or_default();
        let removed = self
            .inner
            .records
            .remove_if(&key, |_, r| r.pod_name == name);
        if let Some((_, record)) = removed {
            let (code, reason, message) = match status::classify(p) {
                PodView::Exited {
                    code,
                    reason,
                    message,
                } if record.deleting => (code, reason, message),
                view => {
                    let code = match view {
                        PodView::Exited { code, .. } => code,
                        _ => None,
                    };
                    let message = format!("pod {name} was deleted (not by stoker)");
                    (code, ExitReason::DeletedExternally, message)
                }
            };
            info!(app = %key.0, executor = %key.1, pod = %name, %reason, "executor pod deleted");
            self.report_exit(&key, code, reason, message);
        }
        if let Ok(mut map) = self.inner.unclaimed.lock() {
            if let Some(m) = map.get_mut(&key.0) {
                m.remove(&key.1);
                if m.is_empty() {
                    map.remove(&key.0);
                }
            }
        }
    }

    /// After the watch re-listed: executors whose pods are gone were deleted while it was down.
    fn after_relist(&self, seen: &HashSet<Key>) {
        let gone: Vec<Key> = self
            .inner
            .records
            .iter()
            .filter(|e| e.value().created && !seen.contains(e.key()))
            .map(|e| e.key().clone())
            .collect();
        for key in gone {
            if let Some((_, r)) = self.inner.records.remove(&key) {
                warn!(app = %key.0, executor = %key.1, pod = %r.pod_name, "pod vanished while the watch was down");
                self.report_exit(
                    &key,
                    None,
                    ExitReason::DeletedExternally,
                    format!("pod {} is gone", r.pod_name),
                );
            }
        }
        if let Ok(mut map) = self.inner.unclaimed.lock() {
            for (app, m) in map.iter_mut() {
                m.retain(|id, _| seen.contains(&(app.clone(), *id)));
            }
            map.retain(|_, m| !m.is_empty());
        }
    }

    async fn reap_unclaimed(self) {
        tokio::time::sleep(self.inner.config.adoption_window).await;
        let left: Vec<(AppId, BTreeMap<ExecutorId, Unclaimed>)> = match self.inner.unclaimed.lock()
        {
            Ok(mut map) => map.drain().collect(),
            Err(_) => return,
        };
        for (app, pods) in left {
            warn!(app = %app, pods = pods.len(), "driver did not come back within the adoption window: deleting its pods");
            for (_, u) in pods {
                self.delete_pod(u.namespace, u.pod_name, 0);
            }
        }
    }

    /// Executors this backend tracks (created or being created).
    pub fn tracked(&self) -> usize {
        self.inner.records.len()
    }
}

impl ExecutorBackend for KubernetesBackend {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    fn launch(&self, request: LaunchRequest) {
        let key = (request.app_id.clone(), request.executor_id);
        let digest = pod::token_digest(&request.token);
        let built = pod::executor_pod(
            &request.app_id,
            request.executor_id,
            request.profile,
            &request.template,
            &self.inner.config.defaults,
            &digest,
            None,
        );
        let pod_spec = match built {
            Ok(p) => p,
            Err(err) => {
                self.report_exit(&key, None, ExitReason::StartFailed, err.to_string());
                return;
            }
        };
        let record = Record {
            namespace: pod_spec.metadata.namespace.clone().unwrap_or_default(),
            pod_name: pod_spec.metadata.name.clone().unwrap_or_default(),
            created: false,
            cancelled: false,
            deleting: false,
            reported: Reported::Nothing,
            told_unschedulable: false,
        };
        debug!(app = %key.0, executor = %key.1, pod = %record.pod_name, "creating executor pod");
        self.inner.records.insert(key.clone(), record);
        tokio::spawn(self.clone().create(key, pod_spec, request.template));
    }

    fn terminate(&self, app_id: &AppId, executor_id: ExecutorId, grace: Millis) {
        let key = (app_id.clone(), executor_id);
        let target = match self.inner.records.get_mut(&key) {
            None => None,
            Some(mut r) => {
                if r.created {
                    r.deleting = true;
                    Some((r.namespace.clone(), r.pod_name.clone()))
                } else {
                    // The create task sees this and reports the exit (or deletes the pod if the
                    // creation was already under way).
                    r.cancelled = true;
                    return;
                }
            }
        };
        match target {
            Some((namespace, name)) => {
                let seconds = u32::try_from(grace.div_ceil(1000)).unwrap_or(u32::MAX);
                debug!(app = %app_id, executor = %executor_id, pod = %name, grace_seconds = seconds, "deleting executor pod");
                self.delete_pod(namespace, name, seconds);
            }
            None => self.report_exit(&key, None, ExitReason::KilledByDriver, String::new()),
        }
    }

    fn check_template(&self, template: &ExecutorTemplate) -> Result<(), String> {
        pod::check_template(template, &self.inner.config.defaults).map_err(|e| e.to_string())
    }

    fn claim(&self, app_id: &AppId, token: &str) -> Vec<RecoveredExecutor> {
        let digest = pod::token_digest(token);
        let taken = match self.inner.unclaimed.lock() {
            Ok(mut map) => match map.remove(app_id) {
                Some(pods) => {
                    let (mine, others): (BTreeMap<_, _>, BTreeMap<_, _>) = pods
                        .into_iter()
                        .partition(|(_, u)| u.token_digest == digest);
                    if !others.is_empty() {
                        warn!(app = %app_id, pods = others.len(), "pods carry another token: not handed over");
                        map.insert(app_id.clone(), others);
                    }
                    mine
                }
                None => BTreeMap::new(),
            },
            Err(_) => BTreeMap::new(),
        };
        let mut out = Vec::with_capacity(taken.len());
        for (id, u) in taken {
            let running_host = match &u.view {
                PodView::Running { ip } => Some(ip.clone()),
                _ => None,
            };
            self.inner.records.insert(
                (app_id.clone(), id),
                Record {
                    namespace: u.namespace,
                    pod_name: u.pod_name.clone(),
                    created: true,
                    cancelled: false,
                    deleting: false,
                    reported: if running_host.is_some() {
                        Reported::Running
                    } else {
                        Reported::Accepted
                    },
                    told_unschedulable: false,
                },
            );
            out.push(RecoveredExecutor {
                executor_id: id,
                profile: u.profile,
                running_host,
                backend_name: u.pod_name,
            });
        }
        if !out.is_empty() {
            info!(app = %app_id, executors = out.len(), "driver re-registered: its pods are handed back");
        }
        out
    }
}
