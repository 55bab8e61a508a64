//! Executor pods as Spark's own Kubernetes backend builds them, on top of the user's pod
//! template: pure functions, no I/O.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use stoker_core::{AppId, ExecutorId, ExecutorTemplate, ProfileId};

/// `app.kubernetes.io/managed-by` value on every pod stoker creates.
pub const MANAGED_BY: &str = "stoker";
/// Label: the stoker application id.
pub const LABEL_APP: &str = "stoker.dev/app";
/// Label: which stoker installation owns the pod (several may share a cluster).
pub const LABEL_INSTANCE: &str = "stoker.dev/instance";
/// Spark's label with the executor id.
pub const LABEL_EXEC_ID: &str = "spark-exec-id";
/// Spark's label with the application id.
pub const LABEL_SPARK_APP: &str = "spark-app-selector";
/// Spark's label with the resource profile id.
pub const LABEL_PROFILE: &str = "spark-exec-resourceprofile-id";
/// Annotation: SHA-256 of the application token, so that only the driver that created a pod can
/// adopt it after a stoker restart.
pub const ANNOTATION_TOKEN: &str = "stoker.dev/token-sha256";
/// Annotation with the application id (ids may be longer than a label value allows).
pub const ANNOTATION_APP_ID: &str = "stoker.dev/app-id";
/// Annotation: the driver identity (Kubernetes username) the pod was created as; stoker deletes
/// it as the same identity.
pub const ANNOTATION_OWNER: &str = "stoker.dev/owner";
/// Annotation: the name of the executor container (the template may add sidecars).
pub const ANNOTATION_CONTAINER: &str = "stoker.dev/executor-container";
/// Annotation: the pod stays after its executor exits (the application set
/// `spark.kubernetes.executor.deleteOnTermination=false`, to look at failed executors).
pub const ANNOTATION_KEEP: &str = "stoker.dev/keep-on-exit";
/// Spark's key for keeping exited executor pods.
pub const DELETE_ON_TERMINATION_KEY: &str = "spark.kubernetes.executor.deleteOnTermination";
/// Spark's default executor container name.
pub const DEFAULT_CONTAINER: &str = "spark-kubernetes-executor";
/// Spark's key naming the template's executor container.
pub const TEMPLATE_CONTAINER_KEY: &str = "spark.kubernetes.executor.podTemplateContainerName";
const LOCAL_DIR_VOLUME: &str = "spark-local-dir-1";

/// Why a pod cannot be built from an application's template.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PodSpecError {
    /// The pod template is not a YAML Pod.
    #[error("kubernetes.pod_template_yaml: {0}")]
    Template(String),
    /// No image anywhere.
    #[error(
        "kubernetes.image: no executor image (set spark.kubernetes.container.image or \
         spark.kubernetes.executor.container.image, or start stoker with --kube-image)"
    )]
    NoImage,
    /// The executor's resource profile is not in the template.
    #[error("resource profile {0} is not in the application's template")]
    UnknownProfile(ProfileId),
    /// A quantity that Kubernetes would refuse.
    #[error("kubernetes.{field}: {value:?} is not a Kubernetes quantity")]
    Quantity {
        /// Field name.
        field: &'static str,
        /// The value.
        value: String,
    },
    /// The result is not a valid Pod object.
    #[error("the executor pod does not form a valid Pod: {0}")]
    Invalid(String),
}

/// Settings that are the server's, not the application's.
#[derive(Clone, Debug)]
pub struct PodDefaults {
    /// Namespace when the application names none.
    pub namespace: String,
    /// Image when the application names none.
    pub image: Option<String>,
    /// Value of [`LABEL_INSTANCE`].
    pub instance: String,
}

/// The driver pod, for the owner reference.
#[derive(Clone, Debug)]
pub struct DriverPod {
    /// Its name.
    pub name: String,
    /// Its uid.
    pub uid: String,
}

/// True when the pod is to stay after its executor exited (see [`ANNOTATION_KEEP`]).
pub fn keep_on_exit(pod: &k8s_openapi::api::core::v1::Pod) -> bool {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_KEEP))
        .is_some_and(|v| v == "true")
}

/// Hex SHA-256 of an application token.
pub fn token_digest(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Namespace the application's executors go to.
pub fn namespace_of(template: &ExecutorTemplate, defaults: &PodDefaults) -> String {
    if template.kubernetes.namespace.is_empty() {
        defaults.namespace.clone()
    } else {
        template.kubernetes.namespace.clone()
    }
}

/// A DNS-1123 pod name, unique per application and executor, at most 63 characters so that it
/// can also be the pod's hostname: `<app, sanitised, ≤ 36>-<8 hex of the app id>-exec-<id>`.
pub fn pod_name(app_id: &AppId, executor_id: ExecutorId) -> String {
    let mut prefix: String = app_id
        .as_str()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    prefix.truncate(36);
    let prefix = prefix.trim_matches('-');
    let hash = &token_digest(app_id.as_str())[..8];
    if prefix.is_empty() {
        format!("stoker-{hash}-exec-{executor_id}")
    } else {
        format!("{prefix}-{hash}-exec-{executor_id}")
    }
}

/// A label value Kubernetes accepts (≤ 63 characters of `[A-Za-z0-9._-]`, alphanumeric ends).
pub fn label_value(raw: &str) -> String {
    let mut v: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect();
    v.truncate(63);
    v.trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string()
}

/// Parses and checks the pod template once, at registration: the same checks [`executor_pod`]
/// makes, so that a bad template is refused before any executor is asked for.
pub fn check_template(
    template: &ExecutorTemplate,
    defaults: &PodDefaults,
) -> Result<(), PodSpecError> {
    let Some(profile) = template.profiles.keys().next().copied() else {
        return Ok(());
    };
    let probe = AppId::parse("check").map_err(|e| PodSpecError::Invalid(e.to_string()))?;
    executor_pod(
        &probe,
        ExecutorId::new(1),
        profile,
        template,
        defaults,
        "",
        None,
    )
    .map(|_| ())
}

fn parse_template(yaml: &str) -> Result<Value, PodSpecError> {
    if yaml.trim().is_empty() {
        return Ok(json!({}));
    }
    let value: Value = serde_yaml::from_str(yaml)
        .map_err(|e| PodSpecError::Template(format!("not valid YAML: {e}")))?;
    match &value {
        Value::Object(map) => {
            if let Some(kind) = map.get("kind").and_then(Value::as_str) {
                if kind != "Pod" {
                    return Err(PodSpecError::Template(format!(
                        "kind is {kind:?}; a pod template must be a Pod"
                    )));
                }
            }
            Ok(value)
        }
        Value::Null => Ok(json!({})),
        _ => Err(PodSpecError::Template(
            "must be a YAML mapping (a Pod)".into(),
        )),
    }
}

fn obj<'a>(parent: &'a mut Value, key: &str) -> &'a mut Map<String, Value> {
    if !parent.get(key).is_some_and(Value::is_object) {
        parent[key] = json!({});
    }
    match parent.get_mut(key) {
        Some(Value::Object(map)) => map,
        // Unreachable: the key was just set to an object.
        _ => unreachable_map(),
    }
}

fn arr<'a>(parent: &'a mut Value, key: &str) -> &'a mut Vec<Value> {
    if !parent.get(key).is_some_and(Value::is_array) {
        parent[key] = json!([]);
    }
    match parent.get_mut(key) {
        Some(Value::Array(a)) => a,
        _ => unreachable_vec(),
    }
}

#[allow(
    clippy::panic,
    reason = "only reachable if serde_json's IndexMut broke its contract"
)]
fn unreachable_map() -> &'static mut Map<String, Value> {
    panic!("serde_json: value just set to an object is not an object")
}

#[allow(
    clippy::panic,
    reason = "only reachable if serde_json's IndexMut broke its contract"
)]
fn unreachable_vec() -> &'static mut Vec<Value> {
    panic!("serde_json: value just set to an array is not an array")
}

/// Puts `env` into a container's env list, replacing entries of the same name.
fn set_env(container: &mut Value, name: &str, value: Value) {
    let list = arr(container, "env");
    list.retain(|e| e.get("name").and_then(Value::as_str) != Some(name));
    let mut entry = json!({ "name": name });
    match value {
        Value::String(s) => entry["value"] = Value::String(s),
        other => entry["valueFrom"] = other,
    }
    list.push(entry);
}

fn check_quantity(field: &'static str, value: &str) -> Result<(), PodSpecError> {
    let ok = !value.is_empty()
        && value
            .trim_end_matches(|c: char| c.is_ascii_alphabetic())
            .parse::<f64>()
            .is_ok_and(|v| v >= 0.0)
        && matches!(
            value.trim_start_matches(|c: char| c.is_ascii_digit() || c == '.'),
            "" | "m" | "k" | "M" | "G" | "T" | "Ki" | "Mi" | "Gi" | "Ti"
        );
    if ok {
        Ok(())
    } else {
        Err(PodSpecError::Quantity {
            field,
            value: value.to_string(),
        })
    }
}

/// Builds executor `executor_id`'s pod: the user's template (tolerations, affinity, sidecars,
/// volumes, security context survive), with Spark's executor settings laid over it the way
/// Spark's `BasicExecutorFeatureStep` does.
pub fn executor_pod(
    app_id: &AppId,
    executor_id: ExecutorId,
    profile_id: ProfileId,
    template: &ExecutorTemplate,
    defaults: &PodDefaults,
    token_digest: &str,
    driver: Option<&DriverPod>,
) -> Result<Pod, PodSpecError> {
    let k8s = &template.kubernetes;
    let profile = template
        .profiles
        .get(&profile_id)
        .ok_or(PodSpecError::UnknownProfile(profile_id))?;
    let image = [
        k8s.image.as_str(),
        defaults.image.as_deref().unwrap_or_default(),
    ]
    .into_iter()
    .find(|s| !s.is_empty())
    .map(str::to_string);
    let mut pod = parse_template(&k8s.pod_template_yaml)?;
    let namespace = namespace_of(template, defaults);
    let name = pod_name(app_id, executor_id);
    pod["apiVersion"] = json!("v1");
    pod["kind"] = json!("Pod");

    // --- metadata ---
    {
        let meta = obj(&mut pod, "metadata");
        meta.remove("generateName");
        meta.remove("resourceVersion");
        meta.remove("uid");
        meta.insert("name".into(), json!(name));
        meta.insert("namespace".into(), json!(namespace));
    }
    let mut meta = pod
        .get_mut("metadata")
        .map(std::mem::take)
        .unwrap_or_default();
    {
        let labels = obj(&mut meta, "labels");
        for (k, v) in &template.labels {
            labels.insert(k.clone(), json!(v));
        }
        let ours: [(&str, String); 7] = [
            (LABEL_SPARK_APP, label_value(app_id.as_str())),
            (LABEL_EXEC_ID, executor_id.to_string()),
            ("spark-role", "executor".into()),
            (LABEL_PROFILE, profile_id.to_string()),
            ("app.kubernetes.io/managed-by", MANAGED_BY.into()),
            (LABEL_APP, label_value(app_id.as_str())),
            (LABEL_INSTANCE, label_value(&defaults.instance)),
        ];
        for (k, v) in ours {
            labels.insert(k.into(), json!(v));
        }
    }
    {
        let annotations = obj(&mut meta, "annotations");
        for (k, v) in &template.annotations {
            annotations.insert(k.clone(), json!(v));
        }
        annotations.insert(ANNOTATION_APP_ID.into(), json!(app_id.as_str()));
        let keep = k8s.other.get(DELETE_ON_TERMINATION_KEY);
        if keep.is_some_and(|v| v.trim().eq_ignore_ascii_case("false")) {
            annotations.insert(ANNOTATION_KEEP.into(), json!("true"));
        }
        if !token_digest.is_empty() {
            annotations.insert(ANNOTATION_TOKEN.into(), json!(token_digest));
        }
    }
    if let Some(d) = driver {
        let owners = arr(&mut meta, "ownerReferences");
        owners.push(json!({
            "apiVersion": "v1", "kind": "Pod", "name": d.name, "uid": d.uid,
            "controller": true, "blockOwnerDeletion": false,
        }));
    }

    // --- spec ---
    let mut spec = pod
        .get_mut("spec")
        .map(std::mem::take)
        .unwrap_or_else(|| json!({}));
    if !spec.is_object() {
        return Err(PodSpecError::Template("spec must be a mapping".into()));
    }
    spec["restartPolicy"] = json!("Never");
    let host: String = name.chars().take(63).collect();
    spec["hostname"] = json!(host.trim_end_matches('-'));
    if !k8s.node_selector.is_empty() {
        let sel = obj(&mut spec, "nodeSelector");
        for (k, v) in &k8s.node_selector {
            sel.insert(k.clone(), json!(v));
        }
    }
    if !k8s.scheduler_name.is_empty() {
        spec["schedulerName"] = json!(k8s.scheduler_name);
    }
    if !k8s.service_account.is_empty() {
        spec["serviceAccountName"] = json!(k8s.service_account);
    }
    if !k8s.image_pull_secrets.is_empty() {
        let secrets = arr(&mut spec, "imagePullSecrets");
        for s in &k8s.image_pull_secrets {
            if !secrets
                .iter()
                .any(|e| e.get("name").and_then(Value::as_str) == Some(s))
            {
                secrets.push(json!({ "name": s }));
            }
        }
    }
    let local_dir = format!(
        "/var/data/spark-{}",
        &crate::pod::token_digest(app_id.as_str())[..12]
    );
    {
        let volumes = arr(&mut spec, "volumes");
        if !volumes
            .iter()
            .any(|v| v.get("name").and_then(Value::as_str) == Some(LOCAL_DIR_VOLUME))
        {
            volumes.push(json!({ "name": LOCAL_DIR_VOLUME, "emptyDir": {} }));
        }
    }

    // --- the executor container ---
    let containers = arr(&mut spec, "containers");
    let wanted = k8s
        .other
        .get(TEMPLATE_CONTAINER_KEY)
        .filter(|s| !s.is_empty());
    let index = match wanted {
        Some(w) => containers
            .iter()
            .position(|c| c.get("name").and_then(Value::as_str) == Some(w.as_str()))
            .ok_or_else(|| {
                PodSpecError::Template(format!(
                    "{TEMPLATE_CONTAINER_KEY} names container {w:?}, which the template does not have"
                ))
            })?,
        None => 0,
    };
    if containers.is_empty() {
        containers.push(json!({}));
    }
    let container = &mut containers[index];
    if !container.is_object() {
        return Err(PodSpecError::Template("containers must be mappings".into()));
    }
    let container_name = container
        .get("name")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .unwrap_or(DEFAULT_CONTAINER)
        .to_string();
    container["name"] = json!(container_name);
    match image {
        Some(image) => container["image"] = json!(image),
        None if container
            .get("image")
            .and_then(Value::as_str)
            .is_some_and(|s| !s.is_empty()) => {}
        None => return Err(PodSpecError::NoImage),
    }
    if !k8s.image_pull_policy.is_empty() {
        container["imagePullPolicy"] = json!(k8s.image_pull_policy);
    } else if container.get("imagePullPolicy").is_none() {
        container["imagePullPolicy"] = json!("IfNotPresent");
    }
    container["args"] = json!(["executor"]);
    if let Some(c) = container.as_object_mut() {
        c.remove("command");
    }

    // Resources: memory request = limit = heap + overhead (+ off-heap, pyspark); cpu request =
    // spark.kubernetes.executor.request.cores or the profile's cores; optional cpu limit.
    let memory = format!("{}Mi", profile.total_memory_mib());
    let cpu_request = if k8s.request_cores.is_empty() {
        profile.cores.max(1).to_string()
    } else {
        check_quantity("request_cores", &k8s.request_cores)?;
        k8s.request_cores.clone()
    };
    {
        let resources = obj(container, "resources");
        let mut requests = resources
            .get("requests")
            .cloned()
            .filter(Value::is_object)
            .unwrap_or_else(|| json!({}));
        let mut limits = resources
            .get("limits")
            .cloned()
            .filter(Value::is_object)
            .unwrap_or_else(|| json!({}));
        requests["memory"] = json!(memory);
        requests["cpu"] = json!(cpu_request);
        limits["memory"] = json!(memory);
        if !k8s.limit_cores.is_empty() {
            check_quantity("limit_cores", &k8s.limit_cores)?;
            limits["cpu"] = json!(k8s.limit_cores);
        }
        for (resource, amount) in &profile.resources {
            let vendor = profile
                .resource_vendors
                .get(resource)
                .filter(|v| !v.is_empty());
            if let Some(vendor) = vendor {
                let key = format!("{vendor}/{resource}");
                limits[key.as_str()] = json!(amount.to_string());
            }
        }
        resources.insert("requests".into(), requests);
        resources.insert("limits".into(), limits);
    }
    {
        let ports = arr(container, "ports");
        if !ports
            .iter()
            .any(|p| p.get("name").and_then(Value::as_str) == Some("blockmanager"))
        {
            let port = template
                .startup_conf
                .get("spark.blockManager.port")
                .and_then(|p| p.parse::<u16>().ok())
                .filter(|p| *p != 0)
                .unwrap_or(7079);
            ports.push(json!({ "name": "blockmanager", "containerPort": port, "protocol": "TCP" }));
        }
    }
    {
        let mounts = arr(container, "volumeMounts");
        if !mounts
            .iter()
            .any(|m| m.get("name").and_then(Value::as_str) == Some(LOCAL_DIR_VOLUME))
        {
            mounts.push(json!({ "name": LOCAL_DIR_VOLUME, "mountPath": local_dir }));
        }
    }

    // Environment: the template's first, the application's executorEnv, then Spark's own.
    let heap = profile.heap_mib.max(32);
    for (k, v) in &template.environment {
        set_env(container, k, json!(v));
    }
    let mut ours: BTreeMap<&str, Value> = BTreeMap::new();
    ours.insert("SPARK_DRIVER_URL", json!(template.driver_url));
    ours.insert(
        "SPARK_EXECUTOR_CORES",
        json!(profile.cores.max(1).to_string()),
    );
    ours.insert("SPARK_EXECUTOR_MEMORY", json!(format!("{heap}m")));
    ours.insert("SPARK_APPLICATION_ID", json!(app_id.as_str()));
    ours.insert("SPARK_EXECUTOR_ID", json!(executor_id.to_string()));
    ours.insert("SPARK_RESOURCE_PROFILE_ID", json!(profile_id.to_string()));
    ours.insert("SPARK_LOCAL_DIRS", json!(local_dir));
    ours.insert(
        "SPARK_EXECUTOR_POD_IP",
        json!({"fieldRef": {"apiVersion": "v1", "fieldPath": "status.podIP"}}),
    );
    ours.insert(
        "SPARK_EXECUTOR_POD_NAME",
        json!({"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}),
    );
    if !template.spark_user.is_empty() {
        ours.insert("SPARK_USER", json!(template.spark_user));
    }
    if !template.auth_secret.is_empty() {
        ours.insert("_SPARK_AUTH_SECRET", json!(template.auth_secret));
    }
    if !template.extra_class_path.is_empty() {
        ours.insert("SPARK_CLASSPATH", json!(template.extra_class_path));
    }
    for (k, v) in ours {
        set_env(container, k, v);
    }
    let opts: Vec<String> = template
        .startup_conf
        .iter()
        .map(|(k, v)| format!("-D{k}={v}"))
        .chain(template.java_options.iter().cloned())
        .collect();
    for (i, opt) in opts.into_iter().enumerate() {
        set_env(container, &format!("SPARK_JAVA_OPT_{i}"), json!(opt));
    }
    obj(&mut meta, "annotations").insert(ANNOTATION_CONTAINER.into(), json!(container_name));

    pod["metadata"] = meta;
    pod["spec"] = spec;
    if let Some(status) = pod.as_object_mut() {
        status.remove("status");
    }
    serde_json::from_value(pod).map_err(|e| PodSpecError::Invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use stoker_core::{KubernetesSettings, ResourceProfile};

    fn template() -> ExecutorTemplate {
        let mut profiles = BTreeMap::new();
        profiles.insert(
            0,
            ResourceProfile {
                id: 0,
                cores: 2,
                heap_mib: 1024,
                overhead_mib: 384,
                ..ResourceProfile::default()
            },
        );
        ExecutorTemplate {
            driver_url: "spark://CoarseGrainedScheduler@10.0.0.1:7078".into(),
            spark_user: "alice".into(),
            profiles,
            java_options: vec!["-XX:+UseG1GC".into()],
            startup_conf: [("spark.driver.port".to_string(), "7078".to_string())].into(),
            labels: [("team".to_string(), "data".to_string())].into(),
            kubernetes: KubernetesSettings {
                namespace: "spark".into(),
                image: "apache/spark:4.2.0".into(),
                ..KubernetesSettings::default()
            },
            ..ExecutorTemplate::default()
        }
    }

    fn defaults() -> PodDefaults {
        PodDefaults {
            namespace: "default".into(),
            image: None,
            instance: "stoker".into(),
        }
    }

    fn app() -> AppId {
        AppId::parse("spark-0123456789abcdef").expect("app id")
    }

    fn env_of(pod: &Pod) -> BTreeMap<String, String> {
        let c = &pod.spec.as_ref().expect("spec").containers[0];
        c.env
            .iter()
            .flatten()
            .map(|e| {
                (
                    e.name.clone(),
                    e.value.clone().unwrap_or_else(|| "<from>".into()),
                )
            })
            .collect()
    }

    #[test]
    fn delete_on_termination_false_marks_the_pod_to_keep() {
        let build = |t: &ExecutorTemplate| {
            executor_pod(&app(), ExecutorId::new(1), 0, t, &defaults(), "d1", None).expect("pod")
        };
        assert!(!keep_on_exit(&build(&template())));
        let mut t = template();
        t.kubernetes
            .other
            .insert(DELETE_ON_TERMINATION_KEY.into(), "true".into());
        assert!(!keep_on_exit(&build(&t)));
        t.kubernetes
            .other
            .insert(DELETE_ON_TERMINATION_KEY.into(), " False".into());
        assert!(keep_on_exit(&build(&t)));
    }

    #[test]
    fn pod_like_sparks_own() {
        let pod = executor_pod(
            &app(),
            ExecutorId::new(7),
            0,
            &template(),
            &defaults(),
            "d1",
            None,
        )
        .expect("pod");
        let meta = &pod.metadata;
        assert_eq!(meta.namespace.as_deref(), Some("spark"));
        let name = meta.name.clone().expect("name");
        assert!(name.ends_with("-exec-7") && name.len() <= 63, "{name}");
        let labels = meta.labels.clone().expect("labels");
        assert_eq!(labels["spark-role"], "executor");
        assert_eq!(labels["spark-exec-id"], "7");
        assert_eq!(labels["spark-app-selector"], "spark-0123456789abcdef");
        assert_eq!(labels["app.kubernetes.io/managed-by"], "stoker");
        assert_eq!(labels["team"], "data");
        let spec = pod.spec.as_ref().expect("spec");
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        let c = &spec.containers[0];
        assert_eq!(c.name, DEFAULT_CONTAINER);
        assert_eq!(c.args.clone().unwrap_or_default(), ["executor"]);
        let res = c.resources.as_ref().expect("resources");
        let req = res.requests.as_ref().expect("requests");
        let lim = res.limits.as_ref().expect("limits");
        assert_eq!(req["memory"].0, "1408Mi");
        assert_eq!(lim["memory"].0, "1408Mi");
        assert_eq!(req["cpu"].0, "2");
        assert!(!lim.contains_key("cpu"));
        let env = env_of(&pod);
        assert_eq!(env["SPARK_EXECUTOR_MEMORY"], "1024m");
        assert_eq!(env["SPARK_EXECUTOR_ID"], "7");
        assert_eq!(env["SPARK_EXECUTOR_POD_IP"], "<from>");
        assert_eq!(env["SPARK_JAVA_OPT_0"], "-Dspark.driver.port=7078");
        assert_eq!(env["SPARK_JAVA_OPT_1"], "-XX:+UseG1GC");
        assert_eq!(env["SPARK_USER"], "alice");
    }

    #[test]
    fn template_survives_and_sparks_settings_win() {
        let mut t = template();
        t.kubernetes.pod_template_yaml = r#"
apiVersion: v1
kind: Pod
metadata:
  labels: {spark-role: driver, keep: "yes"}
spec:
  tolerations: [{key: dedicated, operator: Equal, value: spark, effect: NoSchedule}]
  securityContext: {runAsUser: 185}
  volumes: [{name: cache, emptyDir: {}}]
  containers:
  - name: sidecar
    image: busybox
    command: [sleep, "1000"]
  - name: exec
    image: ignored
    env: [{name: FROM_TEMPLATE, value: "1"}, {name: SPARK_EXECUTOR_ID, value: "bogus"}]
    volumeMounts: [{name: cache, mountPath: /cache}]
    resources: {limits: {ephemeral-storage: 1Gi}}
"#
        .into();
        t.kubernetes
            .other
            .insert(TEMPLATE_CONTAINER_KEY.into(), "exec".into());
        t.kubernetes.limit_cores = "3".into();
        t.kubernetes
            .node_selector
            .insert("pool".into(), "spark".into());
        let pod =
            executor_pod(&app(), ExecutorId::new(1), 0, &t, &defaults(), "", None).expect("pod");
        let labels = pod.metadata.labels.clone().expect("labels");
        assert_eq!(labels["spark-role"], "executor");
        assert_eq!(labels["keep"], "yes");
        let spec = pod.spec.as_ref().expect("spec");
        assert_eq!(spec.tolerations.as_ref().map(Vec::len), Some(1));
        assert!(spec.security_context.is_some());
        assert_eq!(
            spec.node_selector.clone().expect("selector")["pool"],
            "spark"
        );
        assert_eq!(spec.containers.len(), 2);
        assert_eq!(spec.containers[0].name, "sidecar");
        assert_eq!(spec.containers[0].image.as_deref(), Some("busybox"));
        let exec = &spec.containers[1];
        assert_eq!(exec.image.as_deref(), Some("apache/spark:4.2.0"));
        let lim = exec
            .resources
            .as_ref()
            .and_then(|r| r.limits.clone())
            .expect("limits");
        assert_eq!(lim["cpu"].0, "3");
        assert_eq!(lim["ephemeral-storage"].0, "1Gi");
        let env: BTreeMap<String, String> = exec
            .env
            .iter()
            .flatten()
            .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
            .collect();
        assert_eq!(env["FROM_TEMPLATE"], "1");
        assert_eq!(env["SPARK_EXECUTOR_ID"], "1");
        let mounts: Vec<String> = exec
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| m.name.clone())
            .collect();
        assert!(
            mounts.contains(&"cache".to_string()) && mounts.contains(&LOCAL_DIR_VOLUME.to_string())
        );
        assert_eq!(
            pod.metadata.annotations.clone().expect("annotations")[ANNOTATION_CONTAINER],
            "exec"
        );
    }

    #[test]
    fn bad_input_is_named() {
        let mut t = template();
        t.kubernetes.pod_template_yaml = "kind: Deployment".into();
        assert!(matches!(
            check_template(&t, &defaults()),
            Err(PodSpecError::Template(_))
        ));
        t.kubernetes.pod_template_yaml = "spec: [".into();
        assert!(matches!(
            check_template(&t, &defaults()),
            Err(PodSpecError::Template(_))
        ));
        t.kubernetes.pod_template_yaml = "spec: {containers: [{name: a}]}".into();
        t.kubernetes
            .other
            .insert(TEMPLATE_CONTAINER_KEY.into(), "nope".into());
        assert!(matches!(
            check_template(&t, &defaults()),
            Err(PodSpecError::Template(_))
        ));
        let mut t = template();
        t.kubernetes.image.clear();
        assert_eq!(check_template(&t, &defaults()), Err(PodSpecError::NoImage));
        let mut t = template();
        t.kubernetes.limit_cores = "lots".into();
        assert!(matches!(
            check_template(&t, &defaults()),
            Err(PodSpecError::Quantity {
                field: "limit_cores",
                ..
            })
        ));
        let t = template();
        assert_eq!(
            executor_pod(&app(), ExecutorId::new(1), 9, &t, &defaults(), "", None).err(),
            Some(PodSpecError::UnknownProfile(9))
        );
    }

    #[test]
    fn owner_reference_and_names() {
        let d = DriverPod {
            name: "drv".into(),
            uid: "u-1".into(),
        };
        let pod = executor_pod(
            &app(),
            ExecutorId::new(2),
            0,
            &template(),
            &defaults(),
            "",
            Some(&d),
        )
        .expect("pod");
        let owners = pod.metadata.owner_references.clone().expect("owners");
        assert_eq!(owners[0].uid, "u-1");
        let long = AppId::parse(&"A".repeat(120)).expect("id");
        let name = pod_name(&long, ExecutorId::new(2_147_483_647));
        assert!(name.len() <= 63 && name.starts_with("aaaa"), "{name}");
        assert_ne!(
            pod_name(&app(), ExecutorId::new(1)),
            pod_name(&long, ExecutorId::new(1))
        );
        assert_eq!(label_value("a b/c"), "a-b-c");
    }
}
