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
//!
//! What the backend knows lives in one pure [`index::PodIndex`] behind one lock: the watch
//! ([`watch`]), the writer that creates and deletes pods ([`writer`]) and the application-facing
//! calls below feed it and carry out the [`index::Effect`]s it returns. Reports reach the
//! applications in the order the index made them (they are sent under the lock; the sink never
//! blocks); deletions run in tasks of their own.

pub mod auth;
pub mod claims;
pub mod client;
pub mod decommission;
mod fair;
pub mod index;
pub mod lease;
pub mod limiter;
pub mod namespaces;
pub mod pod;
mod resources;
pub mod size;
pub mod sizes_configmap;
pub mod spark_pod;
pub mod status;
mod watch;
mod writer;
pub use client::client;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use dashmap::DashMap;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, Client};
use stoker_core::{
    AppId, BackendObservation, ExecutorBackend, ExecutorId, ExecutorTemplate, ExitReason,
    LaunchRequest, Millis, Observation, ObservationSink, RecoveredExecutor,
};
use tracing::{debug, info, warn};

use crate::index::{DeleteWhy, Effect, Key, PodIndex};
use crate::limiter::Limiter;
use crate::pod::PodDefaults;

/// How the backend talks to the cluster.
#[derive(Clone, Debug)]
pub struct KubernetesConfig {
    /// Namespace, image and instance label defaults.
    pub defaults: PodDefaults,
    /// Client-side rate limit for pod creation and deletion (requests per second; 0 = none).
    pub qps: f64,
    /// Burst above the rate.
    pub burst: u32,
    /// Pod creations in flight at once, handed to applications in turn (see `fair.rs`).
    pub create_concurrency: usize,
    /// Connections the writes of one identity (stoker's, or each impersonated driver's) are
    /// spread over (see [`client::Clients`]).
    pub write_connections: usize,
    /// Watch and list only this namespace (for a namespaced Role); `None`: all namespaces.
    pub watch_namespace: Option<String>,
    /// Pods of an earlier stoker whose driver has not re-registered this long after start are
    /// deleted.
    pub adoption_window: Duration,
    /// Every pod write checks it first: open while this replica leads (see [`lease`]), or
    /// always with one replica ([`lease::WriteGate::always_open`]).
    pub gate: Arc<lease::WriteGate>,
    /// Whose rights an application's writes use (`--auth kubernetes`, `--authz`).
    pub write_as: WriteAs,
}

/// Whose rights the writes for an application (pods, claims, ConfigMaps) are made with.
#[derive(Clone)]
pub enum WriteAs {
    /// stoker's own (`--auth none`).
    Stoker,
    /// The driver's, by impersonating it (`--authz impersonate`, the default): clients are made
    /// from this configuration with `Impersonate-User`, so the API server judges every write
    /// with the driver's RBAC, the namespace's Pod Security level, quotas and admission
    /// policies.
    Impersonate(Box<kube::Config>),
    /// stoker's own, after a SubjectAccessReview says the driver may create the object there
    /// (`--authz subject-access-review`, where impersonation is not allowed). Admission
    /// policies and webhooks that look at the requesting user see stoker, not the driver.
    Review(Arc<auth::Reviewer>),
}

impl std::fmt::Debug for WriteAs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Stoker => "Stoker",
            Self::Impersonate(_) => "Impersonate",
            Self::Review(_) => "Review",
        })
    }
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

struct Inner {
    /// Reads (lists, driver pods) and, with stoker's own rights, writes, in turn over its
    /// connections.
    clients: client::Clients,
    /// The shared watch's client (its own connection).
    watch_client: Client,
    config: KubernetesConfig,
    sink: ObservationSink,
    index: Mutex<PodIndex>,
    create_slots: fair::FairSlots,
    limiter: Limiter,
    driver_uids: DashMap<(String, String), String>,
    spark: resources::SparkApps,
    /// One client per driver identity that pods are written as (see
    /// [`KubernetesConfig::write_as`]).
    driver_clients: DashMap<String, client::Clients>,
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

impl KubernetesBackend {
    /// Lists this stoker's pods (kept for adoption), then starts the shared watch and the
    /// reaper of pods nobody claims. `clients` make the reads and stoker's own writes.
    /// `watch_client` serves the shared watch: give it a client of its own (see [`client()`])
    /// so the watch's stream of pod events does not share an HTTP/2 connection with pod
    /// creations; one of `clients` works too.
    pub async fn start(
        clients: client::Clients,
        watch_client: Client,
        config: KubernetesConfig,
        sink: ObservationSink,
    ) -> Result<Self, K8sError> {
        let selector = selector(&config.defaults.instance);
        let inner = Arc::new(Inner {
            limiter: Limiter::new(config.qps, config.burst),
            create_slots: fair::FairSlots::new(config.create_concurrency),
            clients,
            watch_client,
            config,
            sink,
            index: Mutex::new(PodIndex::new()),
            driver_uids: DashMap::new(),
            driver_clients: DashMap::new(),
            spark: resources::SparkApps::default(),
        });
        let backend = Self { inner };
        let pods = backend.pods_api(&backend.inner.clients.pick());
        let list = pods
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|source| K8sError::List {
                selector: selector.clone(),
                source,
            })?;
        let kept = backend.update(|index| {
            let effects = index.adopt_listed(&list.items);
            (index.unclaimed(), effects)
        });
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

    fn index(&self) -> MutexGuard<'_, PodIndex> {
        // The index stays consistent even if a holder panicked: every call leaves it whole.
        self.inner
            .index
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs one index call and carries out its effects: reports go to the applications under
    /// the lock (so in the index's order), deletions start after it is released.
    fn update<R>(&self, call: impl FnOnce(&mut PodIndex) -> (R, Vec<Effect>)) -> R {
        let mut deletions = Vec::new();
        let out = {
            let mut index = self.index();
            let (out, effects) = call(&mut index);
            for effect in effects {
                match effect {
                    Effect::Report { key, observation } => self.report(&key, observation),
                    Effect::Delete {
                        pod,
                        grace_seconds,
                        why,
                    } => deletions.push((pod, grace_seconds, why)),
                }
            }
            out
        };
        for (pod, grace_seconds, why) in deletions {
            match why {
                DeleteWhy::Orphan => warn!(pod = %pod.name, namespace = %pod.namespace,
                    "pod of this stoker that no application owns: deleting it"),
                DeleteWhy::Unclaimed => warn!(pod = %pod.name, namespace = %pod.namespace,
                    "driver did not come back within the adoption window: deleting its pod"),
                DeleteWhy::Asked | DeleteWhy::Exited | DeleteWhy::Cancelled => {
                    debug!(pod = %pod.name, namespace = %pod.namespace, grace_seconds, ?why, "deleting pod")
                }
            }
            self.delete_pod(pod, grace_seconds);
        }
        out
    }

    /// [`Self::update`] for calls that return only effects.
    fn apply(&self, call: impl FnOnce(&mut PodIndex) -> Vec<Effect>) {
        self.update(|index| ((), call(index)));
    }

    fn report(&self, key: &Key, observation: Observation) {
        match &observation {
            Observation::Exited {
                reason, message, ..
            } => {
                info!(app = %key.0, executor = %key.1, %reason, message = %message, "executor pod ended");
                self.executor_ended(key);
            }
            // Quota refusals are logged where they happen (writer.rs); the index reports pods
            // the scheduler cannot place.
            Observation::Waiting { message } if message.contains("cannot be scheduled") => {
                warn!(app = %key.0, executor = %key.1, reason = %message, "executor pod cannot be scheduled")
            }
            Observation::Waiting { message } => {
                debug!(app = %key.0, executor = %key.1, message = %message, "executor waits")
            }
            Observation::Accepted { .. } | Observation::Running { .. } => {}
        }
        (self.inner.sink)(BackendObservation {
            app_id: key.0.clone(),
            executor_id: key.1,
            observation,
        });
    }

    async fn reap_unclaimed(self) {
        tokio::time::sleep(self.inner.config.adoption_window).await;
        self.apply(PodIndex::reap_unclaimed);
    }

    /// Executors this backend tracks (created or being created).
    pub fn tracked(&self) -> usize {
        self.index().tracked()
    }
}

impl ExecutorBackend for KubernetesBackend {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    fn honours_size(&self) -> bool {
        true
    }

    fn launch(&self, request: LaunchRequest) {
        let key = (request.app_id.clone(), request.executor_id);
        let digest = pod::token_digest(&request.token);
        let mut pod_spec = match self.build_pod(&request, &digest) {
            Ok(p) => p,
            Err(err) => {
                self.report(
                    &key,
                    Observation::Exited {
                        code: None,
                        reason: ExitReason::StartFailed,
                        message: err.to_string(),
                    },
                );
                return;
            }
        };
        // A replacement grown after an out-of-memory failure starts at its chosen size.
        let sized = match request.template.profiles.get(&request.profile) {
            Some(profile) => {
                size::apply(&mut pod_spec, profile, request.size).map_err(|e| e.to_string())
            }
            None => Err(format!("resource profile {} is unknown", request.profile)),
        };
        if let Err(message) = sized {
            self.report(
                &key,
                Observation::Exited {
                    code: None,
                    reason: ExitReason::StartFailed,
                    message,
                },
            );
            return;
        }
        let namespace = pod_spec.metadata.namespace.clone().unwrap_or_default();
        let name = pod_spec.metadata.name.clone().unwrap_or_default();
        let owner = request
            .template
            .identity
            .as_ref()
            .map(|id| id.username.clone());
        if let Some(owner) = &owner {
            // Whom to act as when this pod is deleted later, even by a restarted stoker.
            pod_spec
                .metadata
                .annotations
                .get_or_insert_with(Default::default)
                .insert(pod::ANNOTATION_OWNER.into(), owner.clone());
        }
        if let Err(err) = self
            .index()
            .launch(key.clone(), namespace, name.clone(), owner)
        {
            // The engine never reuses an id; this is a bug somewhere, and creating the pod
            // again could only produce a duplicate.
            warn!(app = %key.0, executor = %key.1, pod = %name, error = %err, "launch refused");
            return;
        }
        debug!(app = %key.0, executor = %key.1, pod = %name, "creating executor pod");
        tokio::spawn(self.clone().create(key, pod_spec, request.template));
    }

    fn terminate(&self, app_id: &AppId, executor_id: ExecutorId, grace: Millis) {
        let key = (app_id.clone(), executor_id);
        let seconds = u32::try_from(grace.div_ceil(1000)).unwrap_or(u32::MAX);
        self.apply(|index| index.terminate(&key, seconds));
        // An executor waiting for a claim to reuse stops waiting.
        self.claims_changed();
    }

    fn check_template(&self, template: &ExecutorTemplate) -> Result<(), String> {
        self.check_app_template(template)
    }

    fn decommissioning(
        &self,
        app_id: &AppId,
        template: &Arc<ExecutorTemplate>,
        executors: &[ExecutorId],
    ) {
        self.label_decommissioning(app_id, template, executors);
    }

    fn registered(&self, app_id: &AppId, template: &Arc<ExecutorTemplate>) {
        self.register_app(app_id, template);
    }

    fn ended(&self, app_id: &AppId) {
        self.end_app(app_id);
    }

    fn claim(&self, app_id: &AppId, token: &str) -> Vec<RecoveredExecutor> {
        let digest = pod::token_digest(token);
        let (out, others) = {
            let mut index = self.index();
            let out = index.claim(app_id, &digest);
            (out, index.unclaimed_of(app_id))
        };
        if others > 0 {
            warn!(app = %app_id, pods = others, "pods carry another token: not handed over");
        }
        if !out.is_empty() {
            info!(app = %app_id, executors = out.len(), "driver re-registered: its pods are handed back");
        }
        out
    }
}
