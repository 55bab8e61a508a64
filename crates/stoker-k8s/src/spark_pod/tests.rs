//! The per-executor filling of Spark-built pods. The fixtures are the plugin's realistic pod
//! (`StokerExecutorPodsTest`: a template with a sidecar, volumes of every kind, secrets, tmpfs
//! local dirs, `{{EXECUTOR_ID}}` in the Java options), as Spark 4.2.0's builder made it.

use std::collections::BTreeMap;

use serde_json::Value;
use stoker_core::{KubernetesSettings, ResourceProfile, SparkProfilePod};

use super::*;

const POD: &str = include_str!("fixtures/pod.json");
const PVC: &str = include_str!("fixtures/pvc.json");
const CONFIG_MAP: &str = include_str!("fixtures/configmap.json");
const PLACEHOLDER: &str = "stokerexecid";
const SPARK_NAME: &str = "etl-nightly-7f3a-exec-stokerexecid";

fn defaults() -> PodDefaults {
    PodDefaults {
        namespace: "default".into(),
        image: Some("server/image:1".into()),
        instance: "stoker-test".into(),
    }
}

fn spark_pods() -> SparkPods {
    SparkPods {
        placeholder_executor_id: PLACEHOLDER.into(),
        profiles: [(
            0,
            SparkProfilePod {
                pod_json: POD.into(),
                resources_json: vec![PVC.into()],
                error: String::new(),
            },
        )]
        .into(),
        app_resources_json: vec![CONFIG_MAP.into()],
        image_from_server: false,
        image_placeholder: "stoker.invalid/server-default-image:unset".into(),
        unsupported_keys: BTreeMap::new(),
        strict: false,
        claims_before_waiting: 0,
    }
}

fn template(pods: SparkPods) -> ExecutorTemplate {
    ExecutorTemplate {
        profiles: [(
            0,
            ResourceProfile {
                id: 0,
                cores: 4,
                heap_mib: 6144,
                ..ResourceProfile::default()
            },
        )]
        .into(),
        kubernetes: KubernetesSettings {
            namespace: "team-a".into(),
            ..KubernetesSettings::default()
        },
        spark_pods: Some(pods),
        ..ExecutorTemplate::default()
    }
}

fn app_id() -> AppId {
    AppId::parse("spark-0123456789abcdef").expect("valid app id")
}

fn parsed(pods: SparkPods) -> Result<SparkApp, SparkPodError> {
    let t = template(pods.clone());
    SparkApp::parse(&t, &pods, &defaults())
}

fn executor(id: u64) -> ExecutorObjects {
    parsed(spark_pods())
        .expect("parses")
        .executor(&app_id(), ExecutorId::new(id), 0, "digest")
        .expect("fills in")
}

fn json<T: k8s_openapi::serde::Serialize>(object: &T) -> Value {
    serde_json::to_value(object).expect("serializes")
}

fn env(pod: &Value, name: &str) -> Value {
    let containers = pod["spec"]["containers"].as_array().expect("containers");
    let container = containers.last().expect("executor container");
    container["env"]
        .as_array()
        .expect("env")
        .iter()
        .find(|e| e["name"] == name)
        .cloned()
        .unwrap_or(Value::Null)
}

fn volume(pod: &Value, name: &str) -> Value {
    pod["spec"]["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == name)
        .cloned()
        .unwrap_or(Value::Null)
}

/// Paths whose values differ between two JSON trees.
fn diff(a: &Value, b: &Value, path: &str, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let null = Value::Null;
                diff(
                    x.get(k).unwrap_or(&null),
                    y.get(k).unwrap_or(&null),
                    &format!("{path}/{k}"),
                    out,
                );
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                diff(p, q, &format!("{path}/{i}"), out);
            }
        }
        _ if a == b => {}
        _ => out.push(path.to_string()),
    }
}

#[test]
fn every_per_executor_part_is_filled_in() {
    let objects = executor(7);
    let pod = json(&objects.pod);
    let name = pod::pod_name(&app_id(), ExecutorId::new(7));
    let cases: [(&str, Value, Value); 11] = [
        ("name", pod["metadata"]["name"].clone(), name.clone().into()),
        (
            "namespace",
            pod["metadata"]["namespace"].clone(),
            "team-a".into(),
        ),
        (
            "spark-exec-id",
            pod["metadata"]["labels"]["spark-exec-id"].clone(),
            "7".into(),
        ),
        (
            "{{EXECUTOR_ID}} in a label (spark.kubernetes.executor.label.*)",
            pod["metadata"]["labels"]["shard"].clone(),
            "shard-7".into(),
        ),
        (
            "{{EXECUTOR_ID}} in an annotation",
            pod["metadata"]["annotations"]["logs.example.com/path"].clone(),
            "/logs/etl/7".into(),
        ),
        (
            "hostname",
            pod["spec"]["hostname"].clone(),
            name.clone().into(),
        ),
        (
            "SPARK_EXECUTOR_ID",
            env(&pod, "SPARK_EXECUTOR_ID")["value"].clone(),
            "7".into(),
        ),
        (
            "{{EXECUTOR_ID}} in a Java option",
            env(&pod, "SPARK_JAVA_OPT_2")["value"].clone(),
            "-Dexec.id=7".into(),
        ),
        (
            "OnDemand claim",
            volume(&pod, "data")["persistentVolumeClaim"]["claimName"].clone(),
            format!("{name}-pvc-4").into(),
        ),
        (
            "SPARK_EXECUTOR_ID in a claim name",
            volume(&pod, "ckpt")["persistentVolumeClaim"]["claimName"].clone(),
            "ckpt-7".into(),
        ),
        (
            "a fixed claim name stays",
            volume(&pod, "ref")["persistentVolumeClaim"]["claimName"].clone(),
            "reference-data".into(),
        ),
    ];
    for (what, got, want) in cases {
        assert_eq!(got, want, "{what}");
    }
    assert_eq!(
        env(&pod, "SPARK_JAVA_OPT_3")["value"],
        "-Xlog:gc:file=/var/log/spark/gc-7.log"
    );
    assert_eq!(objects.claims.len(), 1);
    let claim = json(&objects.claims[0]);
    assert_eq!(claim["metadata"]["name"], format!("{name}-pvc-4"));
    assert_eq!(claim["metadata"]["namespace"], "team-a");
    assert_eq!(
        claim["metadata"]["labels"][pod::LABEL_APP],
        app_id().as_str()
    );
    assert_eq!(
        claim["spec"]["storageClassName"], "fast-ssd",
        "Spark's spec kept"
    );
}

#[test]
fn stoker_adds_its_labels_and_annotations() {
    let pod = json(&executor(3).pod);
    let labels = &pod["metadata"]["labels"];
    let annotations = &pod["metadata"]["annotations"];
    let cases: [(&Value, &str, &str); 8] = [
        (labels, "app.kubernetes.io/managed-by", pod::MANAGED_BY),
        (labels, pod::LABEL_INSTANCE, "stoker-test"),
        (labels, pod::LABEL_APP, "spark-0123456789abcdef"),
        (labels, "spark-role", "executor"),
        (labels, pod::LABEL_PROFILE, "0"),
        (
            annotations,
            pod::ANNOTATION_APP_ID,
            "spark-0123456789abcdef",
        ),
        (annotations, pod::ANNOTATION_TOKEN, "digest"),
        (annotations, pod::ANNOTATION_CONTAINER, "spark-executor"),
    ];
    for (map, key, want) in cases {
        assert_eq!(map[key], want, "{key}");
    }
    assert_eq!(annotations["prometheus.io/scrape"], "true", "Spark's kept");
    assert!(annotations.get(pod::ANNOTATION_KEEP).is_none());
}

/// Spark's pod and stoker's differ in the per-executor parts and in what stoker adds, nothing
/// else: sidecars, volumes, secrets, resources, probes, tolerations are Spark's, byte for byte.
#[test]
fn nothing_else_differs_from_sparks_pod() {
    let spark: Value = serde_json::from_str(POD).expect("fixture");
    let ours = json(&executor(7).pod);
    let mut paths = Vec::new();
    diff(&spark, &ours, "", &mut paths);
    let containers = spark["spec"]["containers"].as_array().expect("containers");
    let last = containers.len() - 1;
    let env_index = |name: &str| {
        containers[last]["env"]
            .as_array()
            .expect("env")
            .iter()
            .position(|e| e["name"] == name)
            .expect("env var")
    };
    let volume_index = |name: &str| {
        spark["spec"]["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .position(|v| v["name"] == name)
            .expect("volume")
    };
    let mut expected: Vec<String> = vec![
        "/metadata/name".into(),
        "/metadata/namespace".into(),
        "/metadata/labels/spark-exec-id".into(),
        // {{EXECUTOR_ID}} in spark.kubernetes.executor.label.shard / annotation.*.
        "/metadata/labels/shard".into(),
        "/metadata/annotations/logs.example.com/path".into(),
        "/metadata/labels/app.kubernetes.io~1managed-by".replace("~1", "/"),
        format!("/metadata/labels/{}", pod::LABEL_INSTANCE),
        format!("/metadata/labels/{}", pod::LABEL_APP),
        format!("/metadata/annotations/{}", pod::ANNOTATION_APP_ID),
        format!("/metadata/annotations/{}", pod::ANNOTATION_TOKEN),
        format!("/metadata/annotations/{}", pod::ANNOTATION_CONTAINER),
        "/spec/hostname".into(),
        format!(
            "/spec/containers/{last}/env/{}/value",
            env_index("SPARK_EXECUTOR_ID")
        ),
        format!(
            "/spec/containers/{last}/env/{}/value",
            env_index("SPARK_JAVA_OPT_2")
        ),
        format!(
            "/spec/containers/{last}/env/{}/value",
            env_index("SPARK_JAVA_OPT_3")
        ),
        format!(
            "/spec/volumes/{}/persistentVolumeClaim/claimName",
            volume_index("data")
        ),
        format!(
            "/spec/volumes/{}/persistentVolumeClaim/claimName",
            volume_index("ckpt")
        ),
    ];
    expected.sort();
    paths.sort();
    assert_eq!(paths, expected);
}

#[test]
fn two_executors_differ_only_in_their_id() {
    let a = json(&executor(7).pod);
    let b = json(&executor(1234).pod);
    let mut paths = Vec::new();
    diff(&a, &b, "", &mut paths);
    assert_eq!(
        paths.len(),
        10,
        "name, 2 labels, 1 annotation, hostname, 1 env, 2 java options, 2 claims: {paths:?}"
    );
}

#[test]
fn the_hostname_follows_sparks_rule() {
    let long = format!("{}-exec-42", "a".repeat(70));
    let cases = [
        ("etl-exec-7", "etl-exec-7".to_string()),
        ("--etl-exec-7", "etl-exec-7".to_string()),
        ("etl.nightly-exec-7", "etl_nightly-exec-7".to_string()),
        ("etl..nightly-exec-7", "etl_nightly-exec-7".to_string()),
        (long.as_str(), format!("{}-exec-42", "a".repeat(55))),
    ];
    for (name, want) in cases {
        assert_eq!(hostname(name), want, "{name}");
        assert!(hostname(name).len() <= 63);
    }
}

#[test]
fn refusals_name_what_is_wrong() {
    let builder_error = {
        let mut p = spark_pods();
        if let Some(pod) = p.profiles.get_mut(&0) {
            pod.error =
                "spark.kubernetes.executor.volumes.hostPath.data.mount.path: missing".into();
        }
        p
    };
    let strict = {
        let mut p = spark_pods();
        p.strict = true;
        p.unsupported_keys.insert(
            "spark.kubernetes.executor.podDeletionCost".into(),
            "no deletion cost is applied".into(),
        );
        p
    };
    let wrong_kind = {
        let mut p = spark_pods();
        p.app_resources_json = vec![PVC.into()];
        p
    };
    let not_json = {
        let mut p = spark_pods();
        if let Some(pod) = p.profiles.get_mut(&0) {
            pod.pod_json = "{".into();
        }
        p
    };
    let cases = [
        (
            builder_error,
            "spark.kubernetes.executor.volumes.hostPath.data.mount.path",
        ),
        (strict, "spark.kubernetes.executor.podDeletionCost"),
        (
            wrong_kind,
            "app_resources_json[0]: kind \"PersistentVolumeClaim\", expected ConfigMap",
        ),
        (not_json, "profiles[0].pod_json: not a valid Pod"),
    ];
    for (pods, named) in cases {
        let err = parsed(pods).expect_err(named).to_string();
        assert!(err.contains(named), "{err:?} names {named:?}");
    }
}

#[test]
fn unsupported_keys_without_strict_are_only_warned_about() {
    let mut p = spark_pods();
    p.unsupported_keys.insert(
        "spark.kubernetes.executor.podDeletionCost".into(),
        "x".into(),
    );
    assert!(parsed(p).is_ok());
}

#[test]
fn the_server_image_replaces_the_placeholder() {
    let mut p = spark_pods();
    p.image_from_server = true;
    p.image_placeholder = "apache/spark:4.2.0".into();
    let app = parsed(p.clone()).expect("parses");
    let pod = json(
        &app.executor(&app_id(), ExecutorId::new(1), 0, "")
            .expect("pod")
            .pod,
    );
    assert_eq!(pod["spec"]["containers"][1]["image"], "server/image:1");
    assert_eq!(
        pod["spec"]["containers"][0]["image"], "fluent/fluent-bit:3.1",
        "sidecar kept"
    );
    let t = template(p.clone());
    let no_default = PodDefaults {
        image: None,
        ..defaults()
    };
    assert_eq!(
        SparkApp::parse(&t, &p, &no_default).expect_err("no image"),
        SparkPodError::NoImage
    );
}

#[test]
fn kubernetes_keys_decide_ownership_and_keeping() {
    let cases = [
        (None, None, true, false),
        (Some("false"), None, false, false),
        (Some("true"), Some("false"), true, true),
    ];
    for (own, delete_on_termination, owns, keeps) in cases {
        let pods = spark_pods();
        let mut t = template(pods.clone());
        if let Some(v) = own {
            t.kubernetes.other.insert(OWN_PVC_KEY.into(), v.into());
        }
        if let Some(v) = delete_on_termination {
            t.kubernetes
                .other
                .insert(pod::DELETE_ON_TERMINATION_KEY.into(), v.into());
        }
        let app = SparkApp::parse(&t, &pods, &defaults()).expect("parses");
        assert_eq!(app.driver_owns_claims, owns, "{own:?}");
        let pod = json(
            &app.executor(&app_id(), ExecutorId::new(1), 0, "")
                .expect("pod")
                .pod,
        );
        assert_eq!(
            pod["metadata"]["annotations"]
                .get(pod::ANNOTATION_KEEP)
                .is_some(),
            keeps,
            "{delete_on_termination:?}"
        );
    }
}

#[test]
fn the_config_map_goes_to_the_applications_namespace() {
    let app = parsed(spark_pods()).expect("parses");
    assert_eq!(app.config_maps.len(), 1);
    assert_eq!(
        app.config_maps[0].metadata.namespace.as_deref(),
        Some("team-a")
    );
    assert_eq!(
        config_maps_to_delete(&app).into_iter().collect::<Vec<_>>(),
        vec!["spark-exec-00879ca22abd72f1-conf-map".to_string()]
    );
    // Kept exited pods may still mount it: kept too, as Spark's backend keeps it.
    let pods = spark_pods();
    let mut t = template(pods.clone());
    t.kubernetes
        .other
        .insert(pod::DELETE_ON_TERMINATION_KEY.into(), "false".into());
    let keeping = SparkApp::parse(&t, &pods, &defaults()).expect("parses");
    assert!(config_maps_to_delete(&keeping).is_empty());
}

#[test]
fn an_unknown_profile_is_an_error_not_a_panic() {
    let app = parsed(spark_pods()).expect("parses");
    assert_eq!(
        app.executor(&app_id(), ExecutorId::new(1), 9, "")
            .expect_err("profile 9")
            .to_string(),
        "resource profile 9 has no Spark-built executor pod"
    );
    assert_eq!(app.profiles().collect::<Vec<_>>(), vec![0]);
    assert!(app.has_claims());
    assert_eq!(SPARK_NAME, app.profiles[&0].spark_name);
}

#[test]
fn a_new_executor_mounts_a_free_claim_of_the_same_shape_instead_of_creating_one() {
    let shape = shape_of(&executor(7).claims[0]);
    assert_eq!(
        (shape.storage_class.as_deref(), shape.size.as_deref()),
        (Some("fast-ssd"), Some("100Gi"))
    );
    let mut pool = ClaimPool::new();
    pool.created("from-executor-7".into(), shape.clone(), ExecutorId::new(7));
    // Executor 7 still runs: executor 8 creates its own claim.
    let mut eighth = executor(8);
    assert_eq!(
        eighth.take_over(&mut pool, ExecutorId::new(8), None),
        Admission::Go(vec![])
    );
    assert_eq!(eighth.claims.len(), 1);
    pool.released(ExecutorId::new(7));
    let mut ninth = executor(9);
    let own = pod::pod_name(&app_id(), ExecutorId::new(9)) + "-pvc-4";
    assert_eq!(
        ninth.take_over(&mut pool, ExecutorId::new(9), None),
        Admission::Go(vec![(own, "from-executor-7".to_string())])
    );
    assert!(
        ninth.claims.is_empty(),
        "the taken-over claim is not created"
    );
    let pod = json(&ninth.pod);
    assert_eq!(
        volume(&pod, "data")["persistentVolumeClaim"]["claimName"],
        "from-executor-7"
    );
    // The other claims of the pod (not on-demand) are untouched.
    assert_eq!(
        volume(&pod, "ckpt")["persistentVolumeClaim"]["claimName"],
        "ckpt-9"
    );
    // A claim of another size is not taken.
    let mut pool = ClaimPool::new();
    let other = crate::claims::Shape {
        size: Some("50Gi".into()),
        ..shape
    };
    pool.created("small".into(), other, ExecutorId::new(1));
    pool.released(ExecutorId::new(1));
    assert_eq!(
        executor(10).take_over(&mut pool, ExecutorId::new(10), None),
        Admission::Go(vec![])
    );
}

#[test]
fn claims_are_reused_only_when_the_driver_owns_them_and_reuse_is_on() {
    let cases = [
        (None, None, true),
        (Some("false"), None, false),
        (None, Some("false"), false),
        (Some("true"), Some("true"), true),
    ];
    for (own, reuse, reused) in cases {
        let pods = spark_pods();
        let mut t = template(pods.clone());
        if let Some(v) = own {
            t.kubernetes.other.insert(OWN_PVC_KEY.into(), v.into());
        }
        if let Some(v) = reuse {
            t.kubernetes.other.insert(REUSE_PVC_KEY.into(), v.into());
        }
        let app = SparkApp::parse(&t, &pods, &defaults()).expect("parses");
        assert_eq!(app.reuse_claims, reused, "own {own:?} reuse {reuse:?}");
    }
}

#[test]
fn executors_wait_for_a_claim_only_with_reuse_a_driver_pod_and_a_limit() {
    // (limit sent, driver pod, reuse off, expected)
    let cases = [
        (2, "drv", false, Some(2)),
        (0, "drv", false, None),
        (2, "", false, None),
        (2, "drv", true, None),
    ];
    for (limit, driver, reuse_off, expected) in cases {
        let mut pods = spark_pods();
        pods.claims_before_waiting = limit;
        let mut t = template(pods.clone());
        t.kubernetes.driver_pod_name = driver.into();
        if reuse_off {
            t.kubernetes
                .other
                .insert(REUSE_PVC_KEY.into(), "false".into());
        }
        let app = SparkApp::parse(&t, &pods, &defaults()).expect("parses");
        assert_eq!(
            app.claims_before_waiting, expected,
            "limit {limit} driver {driver:?} reuse off {reuse_off}"
        );
    }
    // At the limit with nothing free, the executor waits and nothing changes.
    let shape = shape_of(&executor(1).claims[0]);
    let mut pool = ClaimPool::new();
    pool.created("c1".into(), shape.clone(), ExecutorId::new(1));
    pool.created("c2".into(), shape, ExecutorId::new(2));
    let mut third = executor(3);
    let before = json(&third.pod);
    assert_eq!(
        third.take_over(&mut pool, ExecutorId::new(3), Some(2)),
        Admission::Wait { claims: 2 }
    );
    assert_eq!(json(&third.pod), before);
    assert_eq!(third.claims.len(), 1);
    pool.released(ExecutorId::new(1));
    assert_eq!(
        third.take_over(&mut pool, ExecutorId::new(3), Some(2)),
        Admission::Go(vec![(
            pod::pod_name(&app_id(), ExecutorId::new(3)) + "-pvc-4",
            "c1".to_string()
        )])
    );
}
