//! Executor pods as Spark's own `KubernetesExecutorBuilder` built them in the driver (the
//! protocol's `SparkPods`): parsed once per application into typed objects, then filled in per
//! executor. Pure functions, no I/O.
//!
//! The driver builds each resource profile's pod for one placeholder executor id. What differs
//! from one executor to the next is exactly (pinned by the plugin's `StokerExecutorPodsTest`):
//! the pod name and `spec.hostname`, the `spark-exec-id` label, `SPARK_EXECUTOR_ID`, the id inside
//! `SPARK_JAVA_OPT_<n>` (`{{EXECUTOR_ID}}`), persistentVolumeClaim claim names (OnDemand claims
//! are `<spark pod name>-pvc-<n>`, `SPARK_EXECUTOR_ID` in a claim name becomes the id) and the
//! names of the on-demand claims themselves. Each is one small step below.
//!
//! Names: stoker keeps its own pod name ([`pod::pod_name`]: unique per application and executor
//! across every application in a namespace, at most 63 characters, what the pod index and
//! adoption after a restart rely on) rather than Spark's `<podNamePrefix>-exec-<id>`, whose
//! prefix a user may set to the same value in two applications. A name that starts with Spark's
//! pod name (the OnDemand claims) is renamed after stoker's, so `<stoker pod name>-pvc-<n>`.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{ConfigMap, Container, PersistentVolumeClaim, Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::serde::de::DeserializeOwned;
use stoker_core::{AppId, ExecutorId, ExecutorTemplate, ProfileId, SparkPods};

use crate::claims::{Admission, ClaimPool, Shape, Wanted};
use crate::pod::{self, PodDefaults};

/// Spark's key: on-demand claims are owned by the driver pod (Spark's default: true).
pub const OWN_PVC_KEY: &str = "spark.kubernetes.driver.ownPersistentVolumeClaim";
/// Spark's key: a new executor takes over a free on-demand claim of an executor that ended
/// (Spark's default: true; only claims the driver pod owns, see [`crate::claims`]).
pub const REUSE_PVC_KEY: &str = "spark.kubernetes.driver.reusePersistentVolumeClaim";
/// The plugin's key that turns warnings about keys stoker does not honour into refusals.
pub const STRICT_KEY: &str = "spark.stoker.strictConf";

/// Why the Spark-built pods of an application cannot be used. Each names what is wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SparkPodError {
    /// Spark's builder failed in the driver (its message names the key when known).
    #[error(
        "spark_pods: Spark cannot build the executor pod of resource profile {profile}: {message}"
    )]
    Build {
        /// The resource profile.
        profile: ProfileId,
        /// The driver's message.
        message: String,
    },
    /// A key stoker does not honour, and the driver asked to be strict.
    #[error("{key}: {reason} ({STRICT_KEY}=true refuses keys stoker does not honour)")]
    Strict {
        /// The configuration key.
        key: String,
        /// Why stoker does not honour it.
        reason: String,
    },
    /// A JSON object that does not parse into its Kubernetes type.
    #[error("spark_pods.{what}: not a valid {kind}: {message}")]
    Json {
        /// Which object.
        what: String,
        /// The expected kind.
        kind: &'static str,
        /// What serde reported.
        message: String,
    },
    /// An object of a kind stoker does not create.
    #[error("spark_pods.{what}: kind {found:?}, expected {expected}")]
    Kind {
        /// Which object.
        what: String,
        /// Its kind.
        found: String,
        /// The kind stoker accepts there.
        expected: &'static str,
    },
    /// The pod has no container (Spark's executor container is the last one).
    #[error("spark_pods.profiles[{0}].pod_json: the pod has no container")]
    NoContainer(ProfileId),
    /// The driver set no image and stoker has no `--kube-image`.
    #[error(
        "kubernetes.image: no executor image (set spark.kubernetes.container.image or \
         spark.kubernetes.executor.container.image, or start stoker with --kube-image)"
    )]
    NoImage,
    /// The executor's resource profile has no Spark-built pod.
    #[error("resource profile {0} has no Spark-built executor pod")]
    UnknownProfile(ProfileId),
}

/// One resource profile's pod as Spark built it, parsed.
#[derive(Clone, Debug)]
pub struct ProfilePod {
    pod: Pod,
    /// Spark's name for the placeholder executor's pod.
    spark_name: String,
    /// The on-demand claims each executor gets.
    claims: Vec<PersistentVolumeClaim>,
}

/// What one executor gets: its pod and the claims to create after it.
#[derive(Clone, Debug)]
pub struct ExecutorObjects {
    /// The pod, with no owner reference yet.
    pub pod: Pod,
    /// On-demand claims, named and labelled, with no owner reference yet.
    pub claims: Vec<PersistentVolumeClaim>,
}

impl ExecutorObjects {
    /// The on-demand claims this executor takes over from `pool` instead of creating them
    /// (Spark's `replacePVCsIfNeeded`): its pod mounts the reused claim in their place and they
    /// leave [`Self::claims`]. `Go` lists `(claim it would have created, claim it takes over)`;
    /// `Wait` (with `limit`, see [`ClaimPool::admit`]) changes nothing.
    pub fn take_over(
        &mut self,
        pool: &mut ClaimPool,
        executor: ExecutorId,
        limit: Option<usize>,
    ) -> Admission {
        let wanted: Vec<Wanted> = self
            .claims
            .iter()
            .filter_map(|c| {
                Some(Wanted {
                    name: c.metadata.name.clone()?,
                    shape: shape_of(c),
                })
            })
            .collect();
        let swaps = match pool.admit(executor, &wanted, limit) {
            Admission::Go(swaps) => swaps,
            wait @ Admission::Wait { .. } => return wait,
        };
        for (wanted, reused) in &swaps {
            for volume in pod_spec(&mut self.pod).volumes.iter_mut().flatten() {
                if let Some(claim) = volume.persistent_volume_claim.as_mut() {
                    if &claim.claim_name == wanted {
                        claim.claim_name = reused.clone();
                    }
                }
            }
            self.claims
                .retain(|c| c.metadata.name.as_deref() != Some(wanted.as_str()));
        }
        Admission::Go(swaps)
    }
}

/// What makes two on-demand claims interchangeable: storage class and requested size.
pub fn shape_of(claim: &PersistentVolumeClaim) -> Shape {
    let spec = claim.spec.as_ref();
    Shape {
        storage_class: spec.and_then(|s| s.storage_class_name.clone()),
        size: spec
            .and_then(|s| s.resources.as_ref())
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get("storage"))
            .map(|q| q.0.clone()),
    }
}

/// An application's Spark-built pods, parsed once (at registration, and again when a new
/// resource profile arrives), and what it shares.
#[derive(Clone, Debug)]
pub struct SparkApp {
    placeholder: String,
    profiles: BTreeMap<ProfileId, ProfilePod>,
    /// The executor ConfigMap(s), with namespace and stoker's labels, no owner yet.
    pub config_maps: Vec<ConfigMap>,
    /// The namespace of every object.
    pub namespace: String,
    /// On-demand claims are owned by the driver pod (when there is one), not by their pod.
    pub driver_owns_claims: bool,
    /// A new executor takes over free claims of ended executors (those the driver pod owns).
    pub reuse_claims: bool,
    /// `spark.kubernetes.driver.waitToReusePersistentVolumeClaim`: with this many claims and
    /// none free, a new executor waits (only with reuse and a driver pod, where claims outlive
    /// their executors: without them no claim would ever come free).
    pub claims_before_waiting: Option<usize>,
    /// `spark.kubernetes.executor.deleteOnTermination=false`.
    keep_on_exit: bool,
    /// `--kube-instance`.
    instance: String,
}

fn parse<T: DeserializeOwned>(
    what: String,
    kind: &'static str,
    json: &str,
) -> Result<T, SparkPodError> {
    let value: serde_json::Value = serde_json::from_str(json).map_err(|e| SparkPodError::Json {
        what: what.clone(),
        kind,
        message: e.to_string(),
    })?;
    let found = value.get("kind").and_then(|k| k.as_str()).unwrap_or(kind);
    if found != kind {
        return Err(SparkPodError::Kind {
            what,
            found: found.to_string(),
            expected: kind,
        });
    }
    serde_json::from_value(value).map_err(|e| SparkPodError::Json {
        what,
        kind,
        message: e.to_string(),
    })
}

fn is_false(value: Option<&String>) -> bool {
    value.is_some_and(|v| v.trim().eq_ignore_ascii_case("false"))
}

impl SparkApp {
    /// Parses and checks an application's Spark-built pods: a builder error, a key stoker does
    /// not honour under `spark.stoker.strictConf`, JSON that is not the expected object, or no
    /// image anywhere is an error naming the culprit.
    pub fn parse(
        template: &ExecutorTemplate,
        pods: &SparkPods,
        defaults: &PodDefaults,
    ) -> Result<Self, SparkPodError> {
        if let Some((profile, pod)) = pods.profiles.iter().find(|(_, p)| !p.error.is_empty()) {
            return Err(SparkPodError::Build {
                profile: *profile,
                message: pod.error.clone(),
            });
        }
        if pods.strict {
            if let Some((key, reason)) = pods.unsupported_keys.iter().next() {
                return Err(SparkPodError::Strict {
                    key: key.clone(),
                    reason: reason.clone(),
                });
            }
        }
        let namespace = pod::namespace_of(template, defaults);
        let image = if pods.image_from_server {
            Some(defaults.image.clone().ok_or(SparkPodError::NoImage)?)
        } else {
            None
        };
        let mut profiles = BTreeMap::new();
        for (id, raw) in &pods.profiles {
            let what = format!("profiles[{id}]");
            let mut pod: Pod = parse(format!("{what}.pod_json"), "Pod", &raw.pod_json)?;
            if pod_spec(&mut pod).containers.is_empty() {
                return Err(SparkPodError::NoContainer(*id));
            }
            if let Some(image) = &image {
                replace_image(pod_spec(&mut pod), &pods.image_placeholder, image);
            }
            let claims = raw
                .resources_json
                .iter()
                .enumerate()
                .map(|(i, json)| {
                    parse::<PersistentVolumeClaim>(
                        format!("{what}.resources_json[{i}]"),
                        "PersistentVolumeClaim",
                        json,
                    )
                })
                .collect::<Result<Vec<_>, _>>()?;
            let spark_name = pod.metadata.name.clone().unwrap_or_default();
            profiles.insert(
                *id,
                ProfilePod {
                    pod,
                    spark_name,
                    claims,
                },
            );
        }
        let config_maps = pods
            .app_resources_json
            .iter()
            .enumerate()
            .map(|(i, json)| {
                parse::<ConfigMap>(format!("app_resources_json[{i}]"), "ConfigMap", json)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let other = &template.kubernetes.other;
        let mut app = Self {
            placeholder: pods.placeholder_executor_id.clone(),
            profiles,
            config_maps,
            namespace,
            driver_owns_claims: !is_false(other.get(OWN_PVC_KEY)),
            reuse_claims: !is_false(other.get(OWN_PVC_KEY)) && !is_false(other.get(REUSE_PVC_KEY)),
            claims_before_waiting: None,
            keep_on_exit: is_false(other.get(pod::DELETE_ON_TERMINATION_KEY)),
            instance: defaults.instance.clone(),
        };
        if app.reuse_claims
            && pods.claims_before_waiting > 0
            && !template.kubernetes.driver_pod_name.is_empty()
        {
            app.claims_before_waiting = usize::try_from(pods.claims_before_waiting).ok();
        }
        let maps = std::mem::take(&mut app.config_maps);
        app.config_maps = maps
            .into_iter()
            .map(|mut cm| {
                cm.metadata.namespace = Some(app.namespace.clone());
                cm
            })
            .collect();
        Ok(app)
    }

    /// The resource profiles this application has pods for.
    pub fn profiles(&self) -> impl Iterator<Item = ProfileId> + '_ {
        self.profiles.keys().copied()
    }

    /// Whether any profile's executors get on-demand claims.
    pub fn has_claims(&self) -> bool {
        self.profiles.values().any(|p| !p.claims.is_empty())
    }

    /// Labels of every object stoker creates for the application (pods, claims, ConfigMaps).
    pub fn stoker_labels(&self, app_id: &AppId) -> BTreeMap<String, String> {
        stoker_labels(app_id, &self.instance)
    }

    /// The label selector of the application's objects (claims, pods, ConfigMaps).
    pub fn selector(&self, app_id: &AppId) -> String {
        self.stoker_labels(app_id)
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Executor `executor_id`'s pod and claims.
    pub fn executor(
        &self,
        app_id: &AppId,
        executor_id: ExecutorId,
        profile: ProfileId,
        token_digest: &str,
    ) -> Result<ExecutorObjects, SparkPodError> {
        let built = self
            .profiles
            .get(&profile)
            .ok_or(SparkPodError::UnknownProfile(profile))?;
        let names = Names {
            placeholder: &self.placeholder,
            id: executor_id.to_string(),
            spark_pod: &built.spark_name,
            stoker_pod: pod::pod_name(app_id, executor_id),
        };
        let mut pod = built.pod.clone();
        let labels = self.stoker_labels(app_id);
        set_name(&mut pod.metadata, &names, &self.namespace);
        fill_metadata(&mut pod.metadata, &names);
        set_exec_id_label(&mut pod.metadata, &names.id);
        extend_labels(&mut pod.metadata, &labels);
        let spec = pod_spec(&mut pod);
        set_hostname(spec, &names.stoker_pod);
        rename_claims(spec, &names);
        let container = executor_container(spec, profile)?;
        let container_name = container.name.clone();
        fill_env(container, &names);
        set_annotations(
            &mut pod.metadata,
            app_id,
            token_digest,
            &container_name,
            self.keep_on_exit,
        );
        let claims = built
            .claims
            .iter()
            .map(|claim| {
                let mut claim = claim.clone();
                claim.metadata.name = claim.metadata.name.as_deref().map(|n| names.rename(n));
                claim.metadata.namespace = Some(self.namespace.clone());
                extend_labels(&mut claim.metadata, &labels);
                claim
            })
            .collect();
        Ok(ExecutorObjects { pod, claims })
    }
}

/// stoker's own labels: managed-by, instance, application.
pub fn stoker_labels(app_id: &AppId, instance: &str) -> BTreeMap<String, String> {
    [
        ("app.kubernetes.io/managed-by", pod::MANAGED_BY.to_string()),
        (pod::LABEL_INSTANCE, pod::label_value(instance)),
        (pod::LABEL_APP, pod::label_value(app_id.as_str())),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// The names one executor's objects get.
struct Names<'a> {
    placeholder: &'a str,
    id: String,
    spark_pod: &'a str,
    stoker_pod: String,
}

impl Names<'_> {
    /// Spark's name for the placeholder executor's object, as this executor's: Spark's pod name
    /// at the start becomes stoker's, then the placeholder id becomes the executor id.
    fn rename(&self, name: &str) -> String {
        let renamed = match name.strip_prefix(self.spark_pod) {
            Some(rest) if !self.spark_pod.is_empty() => format!("{}{rest}", self.stoker_pod),
            _ => name.to_string(),
        };
        renamed.replace(self.placeholder, &self.id)
    }
}

fn pod_spec(pod: &mut Pod) -> &mut PodSpec {
    pod.spec.get_or_insert_with(PodSpec::default)
}

/// Spark puts its executor container last (after the template's sidecars).
fn executor_container(
    spec: &mut PodSpec,
    profile: ProfileId,
) -> Result<&mut Container, SparkPodError> {
    spec.containers
        .last_mut()
        .ok_or(SparkPodError::NoContainer(profile))
}

fn set_name(meta: &mut ObjectMeta, names: &Names<'_>, namespace: &str) {
    meta.name = Some(names.stoker_pod.clone());
    meta.namespace = Some(namespace.to_string());
    meta.generate_name = None;
    meta.resource_version = None;
    meta.uid = None;
}

fn set_exec_id_label(meta: &mut ObjectMeta, id: &str) {
    meta.labels
        .get_or_insert_with(BTreeMap::new)
        .insert(pod::LABEL_EXEC_ID.to_string(), id.to_string());
}

fn extend_labels(meta: &mut ObjectMeta, labels: &BTreeMap<String, String>) {
    meta.labels
        .get_or_insert_with(BTreeMap::new)
        .extend(labels.iter().map(|(k, v)| (k.clone(), v.clone())));
}

/// Spark's rule (BasicExecutorFeatureStep): the last 63 characters of the pod name, leading
/// non-word characters dropped, any other character outside `[A-Za-z0-9_-]` as `_`.
pub fn hostname(pod_name: &str) -> String {
    let chars: Vec<char> = pod_name.chars().collect();
    let tail = &chars[chars.len().saturating_sub(63)..];
    let is_word = |c: &char| c.is_ascii_alphanumeric() || *c == '_';
    let mut out = String::new();
    let mut in_run = false;
    for c in tail.iter().skip_while(|c| !is_word(c)) {
        if is_word(c) || *c == '-' {
            out.push(*c);
            in_run = false;
        } else if !in_run {
            out.push('_');
            in_run = true;
        }
    }
    out
}

fn set_hostname(spec: &mut PodSpec, pod_name: &str) {
    spec.hostname = Some(hostname(pod_name));
}

/// `{{EXECUTOR_ID}}` in the values of `spark.kubernetes.executor.label.*` and `annotation.*`,
/// which Spark substituted with the placeholder id.
fn fill_metadata(meta: &mut ObjectMeta, names: &Names<'_>) {
    let labels = meta.labels.iter_mut().flatten();
    let annotations = meta.annotations.iter_mut().flatten();
    for (_, value) in labels.chain(annotations) {
        if value.contains(names.placeholder) {
            *value = value.replace(names.placeholder, &names.id);
        }
    }
}

fn rename_claims(spec: &mut PodSpec, names: &Names<'_>) {
    for volume in spec.volumes.iter_mut().flatten() {
        if let Some(claim) = volume.persistent_volume_claim.as_mut() {
            claim.claim_name = names.rename(&claim.claim_name);
        }
    }
}

/// `SPARK_EXECUTOR_ID`, and the id inside the Java options Spark substituted it into.
fn fill_env(container: &mut Container, names: &Names<'_>) {
    for var in container.env.iter_mut().flatten() {
        if var.name == "SPARK_EXECUTOR_ID" {
            var.value = Some(names.id.clone());
        } else if var.name.starts_with("SPARK_JAVA_OPT_") {
            if let Some(value) = var.value.as_mut() {
                *value = value.replace(names.placeholder, &names.id);
            }
        }
    }
}

fn replace_image(spec: &mut PodSpec, placeholder: &str, image: &str) {
    for container in spec
        .containers
        .iter_mut()
        .chain(spec.init_containers.iter_mut().flatten())
    {
        if container.image.as_deref() == Some(placeholder) {
            container.image = Some(image.to_string());
        }
    }
}

fn set_annotations(
    meta: &mut ObjectMeta,
    app_id: &AppId,
    token_digest: &str,
    container: &str,
    keep_on_exit: bool,
) {
    let annotations = meta.annotations.get_or_insert_with(BTreeMap::new);
    annotations.insert(pod::ANNOTATION_APP_ID.into(), app_id.as_str().into());
    annotations.insert(pod::ANNOTATION_CONTAINER.into(), container.into());
    if !token_digest.is_empty() {
        annotations.insert(pod::ANNOTATION_TOKEN.into(), token_digest.into());
    }
    if keep_on_exit {
        annotations.insert(pod::ANNOTATION_KEEP.into(), "true".into());
    }
}

/// The ConfigMaps to delete when the application ends: all of them, unless its exited pods are
/// kept (`deleteOnTermination=false`), which may still need theirs; Spark's backend keeps the
/// ConfigMap then too.
pub fn config_maps_to_delete(app: &SparkApp) -> BTreeSet<String> {
    if app.keep_on_exit {
        return BTreeSet::new();
    }
    app.config_maps
        .iter()
        .filter_map(|cm| cm.metadata.name.clone())
        .collect()
}

#[cfg(test)]
mod tests;
