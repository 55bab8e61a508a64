//! What an application's Spark-built executor pods need besides themselves (see
//! [`crate::spark_pod`]): the executor ConfigMap, created when the application registers and
//! deleted when it ends, and each executor's on-demand PersistentVolumeClaims, created after its
//! pod, as Spark's `ExecutorPodsAllocator` does.
//!
//! Ownership, as under Spark's own backend:
//! * the ConfigMap is owned by the driver pod when there is one (so it goes with the driver), and
//!   deleted by stoker when the application ends in any case;
//! * a claim is owned by the driver pod when `spark.kubernetes.driver.ownPersistentVolumeClaim`
//!   is true (Spark's default) and there is a driver pod, and stoker deletes the application's
//!   claims when it ends (Spark deletes them by label when its driver stops); otherwise by the
//!   executor's pod, so the garbage collector deletes it with the pod.
//!
//! Pod creation waits until the application's ConfigMaps exist (or their creation failed), so
//! that no pod waits on a volume that is still to come.
//!
//! Every write checks the leader-election write gate first, as pod writes do: a replica that
//! stopped leading creates and deletes nothing (the next leader creates what is missing).

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::runtime::watcher::DefaultBackoff;
use kube::{Api, Resource};
use stoker_core::{AppId, DriverIdentity, ExecutorTemplate, LaunchRequest};
use tokio::sync::{watch, Notify};
use tracing::{debug, info, warn};

use crate::claims::{Admission, ClaimPool};
use crate::index::Key;
use crate::pod::{self, DriverPod};
use crate::spark_pod::{ExecutorObjects, SparkApp};
use crate::KubernetesBackend;

/// Attempts at one write before giving up on it.
const ATTEMPTS: usize = 8;
/// Why a write was not made.
const NOT_LEADER: &str = "not the leader (any more): not written";

/// One application's parsed Spark-built pods.
struct AppEntry {
    /// The template they were parsed from (a new resource profile brings a new one).
    template: Arc<ExecutorTemplate>,
    app: Arc<SparkApp>,
    /// True once the application's ConfigMaps exist (or could not be created).
    ready: watch::Receiver<bool>,
}

/// The applications that use Spark-built pods, the claims of pods being created, and each
/// application's claims that a later executor may take over.
#[derive(Default)]
pub(crate) struct SparkApps {
    apps: DashMap<AppId, AppEntry>,
    claims: DashMap<Key, Vec<PersistentVolumeClaim>>,
    pools: DashMap<AppId, ClaimPool>,
    /// Woken whenever a claim may have come free or a waiting executor may be called off.
    claims_changed: Notify,
}

fn owner(kind: &str, name: String, uid: String, controller: bool) -> OwnerReference {
    OwnerReference {
        api_version: "v1".into(),
        kind: kind.into(),
        name,
        uid,
        controller: Some(controller),
        block_owner_deletion: Some(false),
    }
}

fn driver_owner(driver: &DriverPod) -> OwnerReference {
    owner("Pod", driver.name.clone(), driver.uid.clone(), true)
}

fn retryable(err: &kube::Error) -> bool {
    match err {
        kube::Error::Api(s) => s.code == 429 || s.code >= 500,
        _ => true,
    }
}

/// Creates `object` (409: it exists already, fine), retrying transient errors.
async fn create<K>(
    backend: &KubernetesBackend,
    identity: Option<&DriverIdentity>,
    namespace: &str,
    object: &K,
) -> Result<(), String>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + k8s_openapi::serde::Serialize
        + k8s_openapi::serde::de::DeserializeOwned,
    K::DynamicType: Default,
{
    // As the driver, like its pods (--auth kubernetes).
    let as_user = identity.map(|i| i.username.as_str());
    backend
        .may_create(identity, &K::plural(&K::DynamicType::default()), namespace)
        .await?;
    let client = backend.writer_client(as_user).map_err(|e| e.to_string())?;
    let api: Api<K> = Api::namespaced(client, namespace);
    let mut backoff = DefaultBackoff::default();
    let mut last = String::new();
    for _ in 0..ATTEMPTS {
        backend.inner.limiter.acquire().await;
        if !backend.inner.config.gate.is_open() {
            return Err(NOT_LEADER.into());
        }
        match api.create(&PostParams::default(), object).await {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 => return Ok(()),
            Err(err) if retryable(&err) => last = err.to_string(),
            Err(err) => return Err(err.to_string()),
        }
        tokio::time::sleep(backoff.next().unwrap_or(Duration::from_secs(30))).await;
    }
    Err(last)
}

/// Deletes `name` (404: gone already, fine), retrying transient errors.
async fn delete<K>(
    backend: &KubernetesBackend,
    as_user: Option<&str>,
    namespace: &str,
    name: &str,
) -> Result<(), String>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + k8s_openapi::serde::de::DeserializeOwned,
    K::DynamicType: Default,
{
    // As the driver, like its pods (--auth kubernetes).
    let client = backend.writer_client(as_user).map_err(|e| e.to_string())?;
    let api: Api<K> = Api::namespaced(client, namespace);
    let mut backoff = DefaultBackoff::default();
    let mut last = String::new();
    for _ in 0..ATTEMPTS {
        backend.inner.limiter.acquire().await;
        if !backend.inner.config.gate.is_open() {
            return Err(NOT_LEADER.into());
        }
        match api.delete(name, &DeleteParams::background()).await {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => return Ok(()),
            Err(err) if retryable(&err) => last = err.to_string(),
            Err(err) => return Err(err.to_string()),
        }
        tokio::time::sleep(backoff.next().unwrap_or(Duration::from_secs(30))).await;
    }
    Err(last)
}

impl KubernetesBackend {
    /// The registration check: Spark-built pods when the driver sent them, else the template.
    pub(crate) fn check_app_template(&self, template: &ExecutorTemplate) -> Result<(), String> {
        match &template.spark_pods {
            Some(pods) => SparkApp::parse(template, pods, &self.inner.config.defaults)
                .map(|_| ())
                .map_err(|e| e.to_string()),
            None => pod::check_template(template, &self.inner.config.defaults)
                .map_err(|e| e.to_string()),
        }
    }

    /// The application's parsed pods, parsed again when its template changed. `None`: the
    /// application sent no Spark-built pods.
    fn spark_app(
        &self,
        app_id: &AppId,
        template: &Arc<ExecutorTemplate>,
    ) -> Option<Result<Arc<SparkApp>, String>> {
        let pods = template.spark_pods.as_ref()?;
        let apps = &self.inner.spark.apps;
        if let Some(entry) = apps.get(app_id) {
            if Arc::ptr_eq(&entry.template, template) {
                return Some(Ok(Arc::clone(&entry.app)));
            }
        }
        let parsed = match SparkApp::parse(template, pods, &self.inner.config.defaults) {
            Ok(app) => Arc::new(app),
            Err(err) => return Some(Err(err.to_string())),
        };
        let ready = match apps.get(app_id) {
            Some(entry) => entry.ready.clone(),
            None => watch::channel(true).1,
        };
        apps.insert(
            app_id.clone(),
            AppEntry {
                template: Arc::clone(template),
                app: Arc::clone(&parsed),
                ready,
            },
        );
        Some(Ok(parsed))
    }

    /// Executor `request`'s pod: Spark's, filled in, when the driver sent Spark-built pods
    /// (its on-demand claims are kept for [`Self::take_over_claims`] and [`Self::pod_created`]);
    /// else stoker's own.
    pub(crate) fn build_pod(&self, request: &LaunchRequest, digest: &str) -> Result<Pod, String> {
        let app = match self.spark_app(&request.app_id, &request.template) {
            None => {
                return pod::executor_pod(
                    &request.app_id,
                    request.executor_id,
                    request.profile,
                    &request.template,
                    &self.inner.config.defaults,
                    digest,
                    None,
                )
                .map_err(|e| e.to_string())
            }
            Some(app) => app?,
        };
        let objects = app
            .executor(
                &request.app_id,
                request.executor_id,
                request.profile,
                digest,
            )
            .map_err(|e| e.to_string())?;
        if !objects.claims.is_empty() {
            let key = (request.app_id.clone(), request.executor_id);
            self.inner.spark.claims.insert(key, objects.claims);
        }
        Ok(objects.pod)
    }

    /// Before executor `key`'s pod `pod` is created: the on-demand claims it takes over from
    /// executors that ended (its pod then mounts them and they are not created), or, under
    /// `spark.kubernetes.driver.waitToReusePersistentVolumeClaim` with no claim free and the
    /// application at its limit, a wait until one is (the driver is told once). Returns when the
    /// pod may be created, or when the executor is called off while it waits (the create task's
    /// next step then reports it).
    pub(crate) async fn take_over_claims(&self, key: &Key, pod: &mut Pod) {
        let Some(app) = self
            .inner
            .spark
            .apps
            .get(&key.0)
            .map(|e| Arc::clone(&e.app))
        else {
            return;
        };
        // Only claims the driver pod owns are ever in the pool (see pod_created).
        if !app.reuse_claims {
            return;
        }
        let Some((_, claims)) = self.inner.spark.claims.remove(key) else {
            return;
        };
        let mut objects = ExecutorObjects {
            pod: std::mem::take(pod),
            claims,
        };
        let mut told = false;
        loop {
            let changed = self.inner.spark.claims_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            // Called off, or its application ended (end_app drops the pool after the app).
            if !self.index().wants_pod(key) || !self.inner.spark.apps.contains_key(&key.0) {
                break;
            }
            let admission = {
                let mut pool = self.inner.spark.pools.entry(key.0.clone()).or_default();
                objects.take_over(&mut pool, key.1, app.claims_before_waiting)
            };
            match admission {
                Admission::Go(swaps) => {
                    for (instead_of, reused) in swaps {
                        info!(app = %key.0, executor = %key.1, claim = %reused, instead_of = %instead_of,
                            "the executor takes over the on-demand claim of an executor that ended");
                    }
                    break;
                }
                Admission::Wait { claims } => {
                    if !told {
                        told = true;
                        info!(app = %key.0, executor = %key.1, claims, "the executor waits to reuse an on-demand claim");
                        let message = format!(
                            "none of the application's {claims} on-demand claims is free to \
                             reuse, and spark.kubernetes.driver.waitToReusePersistentVolumeClaim=true \
                             allows no more: it waits for one"
                        );
                        self.apply(|index| index.waiting(key, message));
                    }
                    changed.await;
                }
            }
        }
        *pod = objects.pod;
        if !objects.claims.is_empty() {
            self.inner.spark.claims.insert(key.clone(), objects.claims);
        }
    }

    /// A claim may have come free, or an executor waiting for one may have been called off.
    pub(crate) fn claims_changed(&self) {
        self.inner.spark.claims_changed.notify_waiters();
    }

    /// The application registered: parse its Spark-built pods and create its ConfigMaps
    /// (owned by the driver pod when there is one). Pod creations wait for them.
    pub(crate) fn register_app(&self, app_id: &AppId, template: &Arc<ExecutorTemplate>) {
        let Some(Ok(app)) = self.spark_app(app_id, template) else {
            return;
        };
        if app.reuse_claims && app.has_claims() && !template.kubernetes.driver_pod_name.is_empty() {
            self.seed_claims(app_id, &app, template);
        }
        if app.config_maps.is_empty() {
            return;
        }
        let (ready_tx, ready_rx) = watch::channel(false);
        if let Some(mut entry) = self.inner.spark.apps.get_mut(app_id) {
            entry.ready = ready_rx;
        }
        let this = self.clone();
        let app_id = app_id.clone();
        let template = Arc::clone(template);
        tokio::spawn(async move {
            let driver = this.driver_owner(&template, &app.namespace).await;
            for config_map in &app.config_maps {
                let mut config_map: ConfigMap = config_map.clone();
                let name = config_map.metadata.name.clone().unwrap_or_default();
                config_map
                    .metadata
                    .labels
                    .get_or_insert_with(Default::default)
                    .extend(app.stoker_labels(&app_id));
                if let Some(driver) = &driver {
                    config_map.metadata.owner_references = Some(vec![driver_owner(driver)]);
                }
                match create(
                    &this,
                    template.identity.as_ref(),
                    &app.namespace,
                    &config_map,
                )
                .await
                {
                    Ok(()) => {
                        debug!(app = %app_id, namespace = %app.namespace, config_map = %name, "executor config map created")
                    }
                    Err(err) => {
                        warn!(app = %app_id, namespace = %app.namespace, config_map = %name, error = %err, "cannot create the executor config map; executor pods will wait for it")
                    }
                }
            }
            let _ = ready_tx.send(true);
        });
    }

    /// A driver that registers with this stoker may have claims from before a restart of stoker:
    /// list them (one call; a second, for the pods, only when there are some) and offer the
    /// free ones to later executors, as a stoker that never stopped would.
    fn seed_claims(&self, app_id: &AppId, app: &Arc<SparkApp>, template: &Arc<ExecutorTemplate>) {
        let this = self.clone();
        let app_id = app_id.clone();
        let app = Arc::clone(app);
        let driver_pod = template.kubernetes.driver_pod_name.clone();
        let as_user = template.identity.as_ref().map(|i| i.username.clone());
        tokio::spawn(async move {
            let selector = app.selector(&app_id);
            let client = match this.writer_client(as_user.as_deref()) {
                Ok(client) => client,
                Err(err) => {
                    warn!(app = %app_id, error = %err, "cannot list the application's claims");
                    return;
                }
            };
            let params = ListParams::default().labels(&selector);
            let claims: Api<PersistentVolumeClaim> =
                Api::namespaced(client.clone(), &app.namespace);
            this.inner.limiter.acquire().await;
            let claims = match claims.list(&params).await {
                Ok(list) if list.items.is_empty() => return,
                Ok(list) => list.items,
                Err(err) => {
                    warn!(app = %app_id, error = %err, "cannot list the application's claims: earlier claims are not reused");
                    return;
                }
            };
            let pods: Api<Pod> = Api::namespaced(client, &app.namespace);
            this.inner.limiter.acquire().await;
            let pods = match pods.list(&params).await {
                Ok(list) => list.items,
                Err(err) => {
                    warn!(app = %app_id, error = %err, "cannot list the application's pods: earlier claims are not reused");
                    return;
                }
            };
            let in_use = crate::claims::in_use(&pods);
            if !this.inner.spark.apps.contains_key(&app_id) {
                return; // ended meanwhile
            }
            let mut pool = this.inner.spark.pools.entry(app_id.clone()).or_default();
            let added = pool.seed(&claims, &driver_pod, &in_use);
            if added > 0 {
                info!(app = %app_id, claims = added, free = pool.free(), "claims from before this stoker started are offered to later executors");
                drop(pool);
                this.claims_changed();
            }
        });
    }

    /// Waits until the application's ConfigMaps are there (or their creation gave up).
    pub(crate) async fn app_objects_ready(&self, app_id: &AppId) {
        let ready = self.inner.spark.apps.get(app_id).map(|e| e.ready.clone());
        if let Some(mut ready) = ready {
            // A dropped sender (the task ended without a word) also ends the wait.
            let _ = ready.wait_for(|ready| *ready).await;
        }
    }

    /// Executor `key`'s pod exists (`created`, or `None` when it existed already): create its
    /// on-demand claims, owned by the driver pod or by this pod.
    pub(crate) fn pod_created(&self, key: &Key, created: Option<&Pod>) {
        let Some((_, claims)) = self.inner.spark.claims.remove(key) else {
            return;
        };
        let Some(entry) = self.inner.spark.apps.get(&key.0) else {
            return;
        };
        let app = Arc::clone(&entry.app);
        let template = Arc::clone(&entry.template);
        drop(entry);
        let pod_ref =
            created.and_then(|p| Some((p.metadata.name.clone()?, p.metadata.uid.clone()?)));
        let this = self.clone();
        let key = key.clone();
        tokio::spawn(async move {
            let (owner_ref, by_driver) = match this
                .claim_owner(&app, &template, pod_ref, &key)
                .await
            {
                Some(o) => o,
                None => {
                    warn!(app = %key.0, executor = %key.1, "no owner for the executor's claims; not creating them");
                    for _ in &claims {
                        this.claim_not_pooled(&key);
                    }
                    return;
                }
            };
            for mut claim in claims {
                let name = claim.metadata.name.clone().unwrap_or_default();
                claim.metadata.owner_references = Some(vec![owner_ref.clone()]);
                match create(&this, template.identity.as_ref(), &app.namespace, &claim).await {
                    Ok(()) if by_driver && app.reuse_claims => {
                        debug!(app = %key.0, executor = %key.1, claim = %name, "on-demand claim created");
                        this.claim_outlives_its_executor(&key, name, &claim);
                    }
                    Ok(()) => {
                        debug!(app = %key.0, executor = %key.1, claim = %name, "on-demand claim created");
                        this.claim_not_pooled(&key);
                    }
                    Err(err) => {
                        warn!(app = %key.0, executor = %key.1, claim = %name, error = %err, "cannot create an on-demand claim; the executor's pod cannot start");
                        this.claim_not_pooled(&key);
                    }
                }
            }
        });
    }

    /// Claim `name` of executor `key` is owned by the driver pod, so it outlives the
    /// executor: a later executor may take it over once `key` has ended.
    fn claim_outlives_its_executor(&self, key: &Key, name: String, claim: &PersistentVolumeClaim) {
        // Under the index lock: either `key` has ended already (its end was reported before we
        // looked, so the claim is free now) or its end is reported later and frees it then
        // (`executor_ended`, called from the report, takes the index lock's holder path).
        let index = self.index();
        let mut pool = self.inner.spark.pools.entry(key.0.clone()).or_default();
        pool.created(name, crate::spark_pod::shape_of(claim), key.1);
        if !index.knows(key) {
            pool.released(key.1);
            drop(pool);
            self.claims_changed();
        }
    }

    /// A claim promised to executor `key` will not be in its application's pool.
    fn claim_not_pooled(&self, key: &Key) {
        if let Some(mut pool) = self.inner.spark.pools.get_mut(&key.0) {
            pool.not_created(key.1);
        }
        self.claims_changed();
    }

    /// Executor `key` ended (any reason, reported once): the claims it held are free.
    pub(crate) fn executor_ended(&self, key: &Key) {
        if let Some(mut pool) = self.inner.spark.pools.get_mut(&key.0) {
            let freed = pool.released(key.1);
            if freed > 0 {
                debug!(app = %key.0, executor = %key.1, claims = freed, free = pool.free(), "claims free for a later executor");
            }
        }
        self.claims_changed();
    }

    /// Who owns an executor's on-demand claims, and whether that is the driver pod.
    async fn claim_owner(
        &self,
        app: &SparkApp,
        template: &ExecutorTemplate,
        pod_ref: Option<(String, String)>,
        key: &Key,
    ) -> Option<(OwnerReference, bool)> {
        if app.driver_owns_claims {
            if let Some(driver) = self.driver_owner(template, &app.namespace).await {
                return Some((driver_owner(&driver), true));
            }
        }
        let (name, uid) = match pod_ref {
            Some(r) => r,
            None => {
                let name = pod::pod_name(&key.0, key.1);
                let api: Api<Pod> = Api::namespaced(self.inner.clients.pick(), &app.namespace);
                self.inner.limiter.acquire().await;
                let uid = api.get_opt(&name).await.ok()??.metadata.uid?;
                (name, uid)
            }
        };
        Some((owner("Pod", name, uid, true), false))
    }

    /// The application ended: delete its ConfigMaps, and its claims when the driver owned them
    /// (claims owned by pods go with their pods).
    pub(crate) fn end_app(&self, app_id: &AppId) {
        self.inner.spark.claims.retain(|key, _| &key.0 != app_id);
        let entry = self.inner.spark.apps.remove(app_id);
        self.inner.spark.pools.remove(app_id);
        self.claims_changed();
        let Some((_, entry)) = entry else {
            return;
        };
        let app = entry.app;
        let as_user = entry.template.identity.as_ref().map(|i| i.username.clone());
        let this = self.clone();
        let app_id = app_id.clone();
        tokio::spawn(async move {
            for name in crate::spark_pod::config_maps_to_delete(&app) {
                if let Err(err) =
                    delete::<ConfigMap>(&this, as_user.as_deref(), &app.namespace, &name).await
                {
                    warn!(app = %app_id, namespace = %app.namespace, config_map = %name, error = %err, "cannot delete the executor config map");
                }
            }
            if !(app.driver_owns_claims && app.has_claims()) {
                return;
            }
            let selector = app.selector(&app_id);
            let client = match this.writer_client(as_user.as_deref()) {
                Ok(client) => client,
                Err(err) => {
                    warn!(app = %app_id, namespace = %app.namespace, error = %err, "cannot list the application's claims");
                    return;
                }
            };
            let api: Api<PersistentVolumeClaim> = Api::namespaced(client, &app.namespace);
            this.inner.limiter.acquire().await;
            let claims = match api.list(&ListParams::default().labels(&selector)).await {
                Ok(list) => list.items,
                Err(err) => {
                    warn!(app = %app_id, namespace = %app.namespace, error = %err, "cannot list the application's claims");
                    return;
                }
            };
            for claim in claims {
                let Some(name) = claim.metadata.name else {
                    continue;
                };
                if let Err(err) = delete::<PersistentVolumeClaim>(
                    &this,
                    as_user.as_deref(),
                    &app.namespace,
                    &name,
                )
                .await
                {
                    warn!(app = %app_id, claim = %name, error = %err, "cannot delete an on-demand claim");
                }
            }
            info!(app = %app_id, namespace = %app.namespace, "application's claims deleted");
        });
    }
}
