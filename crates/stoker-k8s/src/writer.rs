//! Pod creation and deletion: the only writes the backend makes. Creation runs with bounded
//! concurrency under the client-side rate limit; both retry transient refusals (429, 5xx,
//! exceeded quota, connection errors) with kube-runtime's jittered exponential backoff (the
//! parameters client-go uses). Every outcome goes back through the pod index.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DeleteParams, PostParams, Preconditions};
use kube::runtime::watcher::DefaultBackoff;
use kube::Api;
use std::sync::Arc;
use stoker_core::ExecutorTemplate;
use tracing::{debug, warn};

use crate::index::{CreateStep, Key, PodRef};
use crate::pod::DriverPod;
use crate::{K8sError, KubernetesBackend, WriteAs};

/// Attempts at a deletion before it is left to the orphan sweep of a later event or re-list.
const DELETE_ATTEMPTS: usize = 8;

/// Refusals worth retrying: the API server is busy or failing, or a quota is full for now.
fn is_retryable(status: &kube::core::Status) -> bool {
    status.code == 429
        || status.code >= 500
        || (status.code == 403 && status.message.contains("exceeded quota"))
}

fn next_delay(backoff: &mut DefaultBackoff) -> Duration {
    backoff.next().unwrap_or(Duration::from_secs(30))
}

impl KubernetesBackend {
    /// The client a pod write goes through: stoker's own, or, with [`WriteAs::Impersonate`],
    /// one that impersonates `as_user`; either way the next of its identity's
    /// `write_connections` connections in turn.
    pub(crate) fn writer_client(&self, as_user: Option<&str>) -> Result<kube::Client, K8sError> {
        let (WriteAs::Impersonate(base), Some(user)) = (&self.inner.config.write_as, as_user)
        else {
            return Ok(self.inner.clients.pick());
        };
        let clients = self
            .inner
            .driver_clients
            .entry(user.to_owned())
            .or_try_insert_with(|| {
                let mut config = (**base).clone();
                config.auth_info.impersonate = Some(user.to_owned());
                crate::client::Clients::new(&config, self.inner.config.write_connections)
            })?;
        Ok(clients.pick())
    }

    /// With [`WriteAs::Review`]: whether the driver may create `resource` in `namespace`
    /// (a SubjectAccessReview); the error is for the driver. Otherwise always yes: the API
    /// server judges the write itself.
    pub(crate) async fn may_create(
        &self,
        identity: Option<&stoker_core::DriverIdentity>,
        resource: &str,
        namespace: &str,
    ) -> Result<(), String> {
        self.may(identity, "create", resource, namespace).await
    }

    /// With `--authz subject-access-review`: whether the driver may `verb` `resource` in
    /// `namespace` (stoker then writes with its own rights); otherwise writes are made as the
    /// driver and the API server judges them, so this says yes.
    pub(crate) async fn may(
        &self,
        identity: Option<&stoker_core::DriverIdentity>,
        verb: &str,
        resource: &str,
        namespace: &str,
    ) -> Result<(), String> {
        let (WriteAs::Review(reviewer), Some(identity)) = (&self.inner.config.write_as, identity)
        else {
            return Ok(());
        };
        match reviewer.may(identity, verb, resource, namespace).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(format!(
                "refused by a SubjectAccessReview: {} may not {verb} {resource} in namespace {namespace}",
                identity.username
            )),
            Err(err) => Err(err.to_string()),
        }
    }

    /// Deletes a pod in the background (rate-limited, retried on transient errors). The pod's
    /// uid, when known, is a precondition: a pod recreated under the same name is not touched.
    pub(crate) fn delete_pod(&self, pod: PodRef, grace_seconds: u32) {
        let this = self.clone();
        tokio::spawn(async move {
            let client = match this.writer_client(pod.as_user.as_deref()) {
                Ok(client) => client,
                Err(err) => {
                    warn!(pod = %pod.name, namespace = %pod.namespace, error = %err, "cannot delete pod");
                    return;
                }
            };
            let api: Api<Pod> = Api::namespaced(client, &pod.namespace);
            let params = DeleteParams {
                grace_period_seconds: Some(grace_seconds),
                preconditions: pod.uid.clone().map(|uid| Preconditions {
                    uid: Some(uid),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            let mut backoff = DefaultBackoff::default();
            for _ in 0..DELETE_ATTEMPTS {
                this.inner.limiter.acquire().await;
                if !this.inner.config.gate.is_open() {
                    warn!(pod = %pod.name, namespace = %pod.namespace, "not the leader (any more): pod not deleted");
                    return;
                }
                match api.delete(&pod.name, &params).await {
                    Ok(_) => {
                        debug!(pod = %pod.name, namespace = %pod.namespace, grace_seconds, "pod deletion requested");
                        return;
                    }
                    // Gone already, or another pod now has the name.
                    Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => return,
                    Err(kube::Error::Api(s)) if !is_retryable(&s) => {
                        warn!(pod = %pod.name, namespace = %pod.namespace, error = %s.message, "cannot delete pod");
                        return;
                    }
                    Err(err) => {
                        warn!(pod = %pod.name, namespace = %pod.namespace, error = %err, "pod deletion failed; retrying");
                        tokio::time::sleep(next_delay(&mut backoff)).await;
                    }
                }
            }
        });
    }

    pub(crate) async fn driver_owner(
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
        let api: Api<Pod> = Api::namespaced(self.inner.clients.pick(), namespace);
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

    /// Creates one executor's pod; the index decides before every attempt whether to go on.
    pub(crate) async fn create(self, key: Key, mut pod_spec: Pod, template: Arc<ExecutorTemplate>) {
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
        let as_user = template.identity.as_ref().map(|id| id.username.as_str());
        let client = match self.writer_client(as_user) {
            Ok(client) => client,
            Err(err) => {
                let message = format!("cannot act as {}: {err}", as_user.unwrap_or("?"));
                self.apply(|index| index.create_failed(&key, message));
                return;
            }
        };
        if let Err(why) = self
            .may_create(template.identity.as_ref(), "pods", &namespace)
            .await
        {
            warn!(app = %key.0, executor = %key.1, pod = %name, error = %why, "pod not created");
            self.apply(|index| index.create_failed(&key, why));
            return;
        }
        let api: Api<Pod> = Api::namespaced(client, &namespace);
        let mut backoff = DefaultBackoff::default();
        let mut told_quota = false;
        self.app_objects_ready(&key.0).await;
        self.take_over_claims(&key, &mut pod_spec).await;
        loop {
            let step = self.update(|index| match index.create_step(&key) {
                CreateStep::Send => (true, Vec::new()),
                CreateStep::Stop(effects) => (false, effects),
            });
            if !step {
                return;
            }
            let result = {
                // Per application in turn: another application's ramp does not hold this one's
                // first executor back (see fair.rs).
                let _slot = self.inner.create_slots.acquire(key.0.as_str()).await;
                debug!(app = %key.0, executor = %key.1, "create slot taken");
                self.inner.limiter.acquire().await;
                if !self.inner.config.gate.is_open() {
                    // Leadership is gone; the process is stepping down. The next leader adopts
                    // what exists and creates what is missing.
                    warn!(app = %key.0, executor = %key.1, pod = %name, "not the leader (any more): pod not created");
                    return;
                }
                api.create(&PostParams::default(), &pod_spec).await
            };
            match result {
                Ok(created) => {
                    debug!(app = %key.0, executor = %key.1, pod = %name, "pod created");
                    self.pod_created(&key, Some(&created));
                    let uid = created.metadata.uid;
                    self.apply(|index| index.created(&key, uid));
                    return;
                }
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    debug!(app = %key.0, executor = %key.1, pod = %name, "pod already exists");
                    self.pod_created(&key, None);
                    self.apply(|index| index.created(&key, None));
                    return;
                }
                Err(kube::Error::Api(s)) if is_retryable(&s) => {
                    if s.code == 403 && !told_quota {
                        told_quota = true;
                        warn!(app = %key.0, executor = %key.1, namespace = %namespace, error = %s.message,
                            "resource quota exceeded: the executor stays requested and creation is retried with backoff");
                        let message = format!(
                            "namespace {namespace}: {} (stoker retries with backoff)",
                            s.message
                        );
                        self.apply(|index| index.waiting(&key, message));
                    } else {
                        debug!(app = %key.0, executor = %key.1, code = s.code, "pod creation refused for now; backing off");
                    }
                }
                Err(kube::Error::Api(s)) => {
                    warn!(app = %key.0, executor = %key.1, pod = %name, code = s.code, error = %s.message, "pod creation failed");
                    let message = format!(
                        "refused by the Kubernetes API server: {} ({}; pod {namespace}/{name})",
                        s.message, s.reason
                    );
                    self.apply(|index| index.create_failed(&key, message));
                    return;
                }
                Err(err) => {
                    warn!(app = %key.0, executor = %key.1, error = %err, "pod creation failed; retrying");
                }
            }
            tokio::time::sleep(next_delay(&mut backoff)).await;
        }
    }
}
