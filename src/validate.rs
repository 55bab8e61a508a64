//! Validation of requests into domain types. Every error names the field at fault.

use std::collections::{BTreeMap, HashMap};

use stoker_core::{
    AppId, ExecutorId, ExecutorTemplate, KubernetesSettings, ProfileId, ProfileUsage,
    ResizeSettings, ResourceProfile, SparkPods, SparkProfilePod,
};

use crate::config::Limits;
use crate::error::{ApiError, Limit, LimitError};
use crate::proto::v1 as pb;

/// Shortest token a driver may choose.
pub const MIN_TOKEN_LEN: usize = 32;
/// Longest token accepted.
pub const MAX_TOKEN_LEN: usize = 256;

/// A validated RegisterApplication request.
#[derive(Debug)]
pub struct Registration {
    /// The application.
    pub app_id: AppId,
    /// Its name.
    pub app_name: String,
    /// The token the driver presented or proposed, if any.
    pub token: Option<String>,
    /// The template.
    pub template: ExecutorTemplate,
    /// Targets to apply.
    pub targets: Vec<(ProfileId, u64)>,
    /// The driver's highest executor id.
    pub last_executor_id: u64,
    /// Executors the driver believes alive.
    pub known_executor_ids: Vec<ExecutorId>,
    /// Failure limit (None: server default).
    pub max_failures: Option<u32>,
    /// Failure validity window (None: forever).
    pub failure_window: Option<u64>,
    /// The queue the application asks for (`spark.stoker.queue`); None: the rules decide.
    pub queue: Option<String>,
    /// `spark.dynamicAllocation.minExecutors` (0 without dynamic allocation).
    pub min_executors: u32,
}

/// Validates the application id field.
pub fn app_id(raw: &str) -> Result<AppId, ApiError> {
    Ok(AppId::parse(raw)?)
}

/// Validates a token field: present, of sane length and characters.
pub fn token(raw: &str) -> Result<&str, ApiError> {
    if raw.is_empty() {
        return Err(ApiError::Unauthenticated);
    }
    check_token_shape("token", raw)?;
    Ok(raw)
}

fn check_token_shape(field: &str, raw: &str) -> Result<(), ApiError> {
    if raw.len() > MAX_TOKEN_LEN {
        return Err(ApiError::invalid(
            field,
            format!("is {} bytes long, more than {MAX_TOKEN_LEN}", raw.len()),
        ));
    }
    if !raw.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::invalid(
            field,
            "must be printable ASCII without spaces",
        ));
    }
    Ok(())
}

/// Validates executor ids.
pub fn executor_ids(
    field: &str,
    raw: &[String],
    limits: &Limits,
) -> Result<Vec<ExecutorId>, ApiError> {
    if raw.len() > limits.max_ids {
        return Err(ApiError::invalid(
            field,
            format!("has {} ids, more than {}", raw.len(), limits.max_ids),
        ));
    }
    raw.iter()
        .enumerate()
        .map(|(i, id)| {
            id.parse::<ExecutorId>()
                .map_err(|problem| ApiError::invalid(format!("{field}[{i}]"), problem))
        })
        .collect()
}

/// Validates targets (profile membership is the engine's check).
pub fn targets(
    field: &str,
    raw: &[pb::ProfileTarget],
    limits: &Limits,
) -> Result<Vec<(ProfileId, u64)>, ApiError> {
    if raw.len() > limits.max_entries {
        return Err(ApiError::invalid(
            field,
            format!(
                "has {} entries, more than {}",
                raw.len(),
                limits.max_entries
            ),
        ));
    }
    let mut seen = HashMap::new();
    let mut out = Vec::with_capacity(raw.len());
    for (i, target) in raw.iter().enumerate() {
        if target.total < 0 {
            return Err(ApiError::invalid(
                format!("{field}[{i}].total"),
                format!("{} is negative", target.total),
            ));
        }
        let total = target.total.unsigned_abs();
        if total > u64::from(limits.max_executors_per_profile) {
            return Err(LimitError::new(
                Limit::ExecutorsPerProfile,
                format!(
                    "{field}[{i}].total: {total} exceeds the limit of {} executors per resource \
                     profile set by {}",
                    limits.max_executors_per_profile,
                    Limit::ExecutorsPerProfile.flag()
                ),
            )
            .into());
        }
        if let Some(first) = seen.insert(target.resource_profile_id, i) {
            return Err(ApiError::invalid(
                format!("{field}[{i}].resource_profile_id"),
                format!(
                    "profile {} already given at {field}[{first}]",
                    target.resource_profile_id
                ),
            ));
        }
        out.push((target.resource_profile_id, total));
    }
    Ok(out)
}

/// Validates the memory use an UnregisterApplication reports, per profile (profile membership is
/// the application's check: a profile it does not know is ignored).
pub fn usage(
    raw: &[pb::ProfileUsage],
    limits: &Limits,
) -> Result<BTreeMap<ProfileId, ProfileUsage>, ApiError> {
    const MIB: u64 = 1 << 20;
    if raw.len() > limits.max_entries {
        return Err(ApiError::invalid(
            "usage",
            format!(
                "has {} entries, more than {}",
                raw.len(),
                limits.max_entries
            ),
        ));
    }
    let mut out = BTreeMap::new();
    for (i, u) in raw.iter().enumerate() {
        if u.executors_measured > u.executors {
            return Err(ApiError::invalid(
                format!("usage[{i}].executors_measured"),
                format!(
                    "{} is more than the {} executors of the profile",
                    u.executors_measured, u.executors
                ),
            ));
        }
        let usage = ProfileUsage {
            peak_heap_mib: u.peak_heap_bytes.div_ceil(MIB),
            peak_rss_mib: (u.peak_rss_bytes > 0).then(|| u.peak_rss_bytes.div_ceil(MIB)),
            complete: u.executors > 0 && u.executors_measured == u.executors,
        };
        if out.insert(u.resource_profile_id, usage).is_some() {
            return Err(ApiError::invalid(
                format!("usage[{i}].resource_profile_id"),
                format!("profile {} is given twice", u.resource_profile_id),
            ));
        }
    }
    Ok(out)
}

/// Validates a RegisterApplication request.
pub fn registration(
    request: pb::RegisterApplicationRequest,
    limits: &Limits,
) -> Result<Registration, ApiError> {
    let app_id = app_id(&request.app_id)?;
    string("app_name", &request.app_name, limits)?;
    let token = if request.token.is_empty() {
        None
    } else {
        check_token_shape("token", &request.token)?;
        if request.token.len() < MIN_TOKEN_LEN {
            return Err(ApiError::invalid(
                "token",
                format!(
                    "is {} bytes long; a token chosen by the driver needs at least {MIN_TOKEN_LEN}",
                    request.token.len()
                ),
            ));
        }
        Some(request.token)
    };
    let template = request
        .template
        .ok_or_else(|| ApiError::invalid("template", "is required"))?;
    let template = executor_template(template, limits)?;
    let targets = targets("initial_targets", &request.initial_targets, limits)?;
    for (i, (profile, _)) in targets.iter().enumerate() {
        if !template.profiles.contains_key(profile) {
            return Err(ApiError::invalid(
                format!("initial_targets[{i}].resource_profile_id"),
                format!("profile {profile} is not in template.profiles"),
            ));
        }
    }
    if request.last_executor_id > ExecutorId::MAX {
        return Err(ApiError::invalid(
            "last_executor_id",
            format!(
                "{} is above the largest executor id {}",
                request.last_executor_id,
                ExecutorId::MAX
            ),
        ));
    }
    let known_executor_ids =
        executor_ids("known_executor_ids", &request.known_executor_ids, limits)?;
    let policy = request.failure_policy.unwrap_or_default();
    // Whether the queue exists is the fair share's decision (with the file in force).
    string("queue", &request.queue, limits)?;
    let queue = Some(request.queue.trim().to_owned()).filter(|q| !q.is_empty());
    if request.min_executors > limits.max_executors_per_profile {
        return Err(ApiError::invalid(
            "min_executors",
            format!(
                "{} is above the limit of {} executors per resource profile",
                request.min_executors, limits.max_executors_per_profile
            ),
        ));
    }
    Ok(Registration {
        app_id,
        app_name: request.app_name,
        token,
        template,
        targets,
        last_executor_id: request.last_executor_id,
        known_executor_ids,
        max_failures: (policy.max_failures > 0).then_some(policy.max_failures),
        failure_window: (policy.validity_interval_ms > 0).then_some(policy.validity_interval_ms),
        queue,
        min_executors: request.min_executors,
    })
}

fn executor_template(
    raw: pb::ExecutorTemplate,
    limits: &Limits,
) -> Result<ExecutorTemplate, ApiError> {
    string("template.driver_url", &raw.driver_url, limits)?;
    if !raw.driver_url.starts_with("spark://") {
        return Err(ApiError::invalid(
            "template.driver_url",
            format!(
                "{:?} is not a Spark RPC address (spark://CoarseGrainedScheduler@host:port)",
                truncate(&raw.driver_url)
            ),
        ));
    }
    string("template.spark_version", &raw.spark_version, limits)?;
    string("template.spark_user", &raw.spark_user, limits)?;
    string("template.extra_class_path", &raw.extra_class_path, limits)?;
    string("template.auth_secret", &raw.auth_secret, limits)?;
    if raw.profiles.is_empty() {
        return Err(ApiError::invalid(
            "template.profiles",
            "must define at least the default profile",
        ));
    }
    count("template.profiles", raw.profiles.len(), limits)?;
    let mut profiles = BTreeMap::new();
    for (i, p) in raw.profiles.into_iter().enumerate() {
        let field = format!("template.profiles[{i}]");
        if p.id < 0 {
            return Err(ApiError::invalid(
                format!("{field}.id"),
                format!("{} is negative", p.id),
            ));
        }
        if p.cores == 0 || p.cores > 4_096 {
            return Err(ApiError::invalid(
                format!("{field}.cores"),
                format!("{} is outside 1..=4096", p.cores),
            ));
        }
        const MAX_MIB: u64 = 64 * 1024 * 1024; // 64 TiB
        for (name, value) in [
            ("heap_mib", p.heap_mib),
            ("overhead_mib", p.overhead_mib),
            ("off_heap_mib", p.off_heap_mib),
            ("pyspark_mib", p.pyspark_mib),
        ] {
            if value > MAX_MIB {
                return Err(ApiError::invalid(
                    format!("{field}.{name}"),
                    format!("{value} MiB is absurd (more than {MAX_MIB})"),
                ));
            }
        }
        if p.heap_mib == 0 {
            return Err(ApiError::invalid(
                format!("{field}.heap_mib"),
                "must be positive",
            ));
        }
        let resources = map_u64(&format!("{field}.resources"), p.resources, limits)?;
        let resource_vendors = map(
            &format!("{field}.resource_vendors"),
            p.resource_vendors,
            limits,
        )?;
        let profile = ResourceProfile {
            id: p.id,
            cores: p.cores,
            heap_mib: p.heap_mib,
            overhead_mib: p.overhead_mib,
            off_heap_mib: p.off_heap_mib,
            pyspark_mib: p.pyspark_mib,
            resources,
            resource_vendors,
        };
        if profiles.insert(p.id, profile).is_some() {
            return Err(ApiError::invalid(
                format!("{field}.id"),
                format!("profile {} is defined twice", p.id),
            ));
        }
    }
    let environment = map("template.environment", raw.environment, limits)?;
    for key in environment.keys() {
        if key.is_empty() || key.contains('=') || key.contains('\0') {
            return Err(ApiError::invalid(
                "template.environment",
                format!(
                    "{:?} is not a valid environment variable name",
                    truncate(key)
                ),
            ));
        }
    }
    count("template.java_options", raw.java_options.len(), limits)?;
    for (i, option) in raw.java_options.iter().enumerate() {
        string(&format!("template.java_options[{i}]"), option, limits)?;
    }
    let startup_conf = map("template.startup_conf", raw.startup_conf, limits)?;
    for key in startup_conf.keys() {
        if !key.starts_with("spark.") {
            return Err(ApiError::invalid(
                "template.startup_conf",
                format!("{:?} is not a spark.* key", truncate(key)),
            ));
        }
    }
    let labels = map("template.labels", raw.labels, limits)?;
    let annotations = map("template.annotations", raw.annotations, limits)?;
    let kubernetes = kubernetes(raw.kubernetes.unwrap_or_default(), limits)?;
    let resize = resize(raw.resize, &profiles)?;
    let spark_pods = match raw.spark_pods {
        Some(pods) => Some(spark_pods(pods, &profiles, limits)?),
        None => None,
    };
    Ok(ExecutorTemplate {
        driver_url: raw.driver_url,
        spark_version: raw.spark_version,
        spark_user: raw.spark_user,
        profiles,
        environment,
        java_options: raw.java_options,
        startup_conf,
        extra_class_path: raw.extra_class_path,
        labels,
        annotations,
        kubernetes,
        auth_secret: raw.auth_secret,
        spark_pods,
        identity: None,
        resize,
    })
}

/// Largest growth factor accepted: beyond it one failure would jump to absurd sizes.
pub const MAX_RESIZE_FACTOR: f64 = 10.0;

/// `spark.stoker.resize.*`: a factor above 1, a ceiling not below any profile's memory. The
/// field names the Spark key, as the driver's user knows it.
fn resize(
    raw: Option<pb::ResizePolicy>,
    profiles: &BTreeMap<ProfileId, ResourceProfile>,
) -> Result<Option<ResizeSettings>, ApiError> {
    let Some(raw) = raw.filter(|r| r.enabled) else {
        return Ok(None);
    };
    let factor = raw.factor;
    if !factor.is_finite() || factor <= 1.0 || factor > MAX_RESIZE_FACTOR {
        return Err(ApiError::invalid(
            "template.resize.factor (spark.stoker.resize.factor)",
            format!("{factor} must be above 1 and at most {MAX_RESIZE_FACTOR}"),
        ));
    }
    // Checked above: 1 < factor <= 10, so the product is 1001..=10000.
    let factor_permille = (factor * 1_000.0).round() as u32;
    if factor_permille <= 1_000 {
        return Err(ApiError::invalid(
            "template.resize.factor (spark.stoker.resize.factor)",
            format!("{factor} is too close to 1: growth would be under 0.1%"),
        ));
    }
    let max_memory_mib = match raw.max_memory_mib {
        0 => None,
        ceiling => {
            if let Some(p) = profiles.values().find(|p| p.total_memory_mib() > ceiling) {
                return Err(ApiError::invalid(
                    "template.resize.max_memory_mib (spark.stoker.resize.maxMemory)",
                    format!(
                        "{ceiling} MiB is below the {} MiB (heap + overhead + off-heap + \
                         PySpark) that resource profile {} already gives each executor",
                        p.total_memory_mib(),
                        p.id
                    ),
                ));
            }
            Some(ceiling)
        }
    };
    let sizing_key = match raw.sizing_key.as_str() {
        "" => None,
        key if crate::sizes::valid_key(key) => Some(key.to_owned()),
        key => {
            return Err(ApiError::invalid(
                "template.resize.sizing_key (spark.stoker.sizing.key)",
                format!(
                    "{:?} is not 1..=253 characters without control characters",
                    truncate(key)
                ),
            ))
        }
    };
    Ok(Some(ResizeSettings {
        factor_permille,
        max_memory_mib,
        sizing_key,
    }))
}

/// A message from the driver, cut to a length fit for a status message.
fn clip(value: &str) -> String {
    value.chars().take(1024).collect()
}

/// The Spark-built executor pods: one per profile of the template, within the size limits. What
/// they mean (the JSON, a builder error, keys stoker does not honour) is judged by the backend
/// that uses them (`check_template`): the local backend ignores them.
fn spark_pods(
    raw: pb::SparkPods,
    profiles: &BTreeMap<ProfileId, ResourceProfile>,
    limits: &Limits,
) -> Result<SparkPods, ApiError> {
    const FIELD: &str = "template.spark_pods";
    let placeholder = &raw.placeholder_executor_id;
    if placeholder.is_empty()
        || placeholder.len() > 63
        || !placeholder.bytes().all(|b| b.is_ascii_lowercase())
    {
        return Err(ApiError::invalid(
            format!("{FIELD}.placeholder_executor_id"),
            format!("{:?} is not 1..=63 letters a-z", truncate(placeholder)),
        ));
    }
    string(
        &format!("{FIELD}.image_placeholder"),
        &raw.image_placeholder,
        limits,
    )?;
    let unsupported_keys = map(
        &format!("{FIELD}.unsupported_keys"),
        raw.unsupported_keys,
        limits,
    )?;
    let bytes = |field: &str, json: &str| -> Result<(), ApiError> {
        if json.len() > limits.max_pod_template_bytes {
            return Err(ApiError::invalid(
                field,
                format!(
                    "is {} bytes, more than {}",
                    json.len(),
                    limits.max_pod_template_bytes
                ),
            ));
        }
        Ok(())
    };
    count(
        &format!("{FIELD}.app_resources_json"),
        raw.app_resources_json.len(),
        limits,
    )?;
    for (i, json) in raw.app_resources_json.iter().enumerate() {
        bytes(&format!("{FIELD}.app_resources_json[{i}]"), json)?;
    }
    count(&format!("{FIELD}.profiles"), raw.profiles.len(), limits)?;
    let mut pods = BTreeMap::new();
    for (i, p) in raw.profiles.into_iter().enumerate() {
        let field = format!("{FIELD}.profiles[{i}]");
        if !profiles.contains_key(&p.resource_profile_id) {
            return Err(ApiError::invalid(
                format!("{field}.resource_profile_id"),
                format!("{} is not a profile of the template", p.resource_profile_id),
            ));
        }
        bytes(&format!("{field}.pod_json"), &p.pod_json)?;
        count(
            &format!("{field}.resources_json"),
            p.resources_json.len(),
            limits,
        )?;
        for (j, json) in p.resources_json.iter().enumerate() {
            bytes(&format!("{field}.resources_json[{j}]"), json)?;
        }
        let pod = SparkProfilePod {
            pod_json: p.pod_json,
            resources_json: p.resources_json,
            error: clip(&p.error),
        };
        if pods.insert(p.resource_profile_id, pod).is_some() {
            return Err(ApiError::invalid(
                format!("{field}.resource_profile_id"),
                format!("profile {} is given twice", p.resource_profile_id),
            ));
        }
    }
    if let Some(missing) = profiles.keys().find(|id| !pods.contains_key(id)) {
        return Err(ApiError::invalid(
            format!("{FIELD}.profiles"),
            format!("resource profile {missing} has no pod"),
        ));
    }
    Ok(SparkPods {
        placeholder_executor_id: raw.placeholder_executor_id,
        profiles: pods,
        app_resources_json: raw.app_resources_json,
        image_from_server: raw.image_from_server,
        image_placeholder: raw.image_placeholder,
        unsupported_keys,
        strict: raw.strict,
        claims_before_waiting: raw.claims_before_waiting,
    })
}

fn kubernetes(
    raw: pb::KubernetesSettings,
    limits: &Limits,
) -> Result<KubernetesSettings, ApiError> {
    for (name, value) in [
        ("namespace", &raw.namespace),
        ("image", &raw.image),
        ("image_pull_policy", &raw.image_pull_policy),
        ("service_account", &raw.service_account),
        ("scheduler_name", &raw.scheduler_name),
        ("request_cores", &raw.request_cores),
        ("limit_cores", &raw.limit_cores),
        ("driver_pod_name", &raw.driver_pod_name),
        ("driver_pod_uid", &raw.driver_pod_uid),
    ] {
        string(&format!("template.kubernetes.{name}"), value, limits)?;
    }
    if raw.pod_template_yaml.len() > limits.max_pod_template_bytes {
        return Err(LimitError::new(
            Limit::PodTemplateBytes,
            format!(
                "template.kubernetes.pod_template_yaml: is {} bytes, more than the limit of {} \
                 set by {}",
                raw.pod_template_yaml.len(),
                limits.max_pod_template_bytes,
                Limit::PodTemplateBytes.flag()
            ),
        )
        .into());
    }
    count(
        "template.kubernetes.image_pull_secrets",
        raw.image_pull_secrets.len(),
        limits,
    )?;
    for (i, secret) in raw.image_pull_secrets.iter().enumerate() {
        string(
            &format!("template.kubernetes.image_pull_secrets[{i}]"),
            secret,
            limits,
        )?;
    }
    Ok(KubernetesSettings {
        namespace: raw.namespace,
        image: raw.image,
        image_pull_policy: raw.image_pull_policy,
        image_pull_secrets: raw.image_pull_secrets,
        service_account: raw.service_account,
        node_selector: map(
            "template.kubernetes.node_selector",
            raw.node_selector,
            limits,
        )?,
        scheduler_name: raw.scheduler_name,
        pod_template_yaml: raw.pod_template_yaml,
        request_cores: raw.request_cores,
        limit_cores: raw.limit_cores,
        driver_pod_name: raw.driver_pod_name,
        driver_pod_uid: raw.driver_pod_uid,
        other: map("template.kubernetes.other", raw.other, limits)?,
    })
}

fn string(field: &str, value: &str, limits: &Limits) -> Result<(), ApiError> {
    if value.len() > limits.max_string_bytes {
        return Err(ApiError::invalid(
            field,
            format!(
                "is {} bytes, more than {}",
                value.len(),
                limits.max_string_bytes
            ),
        ));
    }
    if value.contains('\0') {
        return Err(ApiError::invalid(field, "contains a NUL character"));
    }
    Ok(())
}

fn count(field: &str, len: usize, limits: &Limits) -> Result<(), ApiError> {
    if len > limits.max_entries {
        return Err(ApiError::invalid(
            field,
            format!("has {len} entries, more than {}", limits.max_entries),
        ));
    }
    Ok(())
}

fn map(
    field: &str,
    raw: HashMap<String, String>,
    limits: &Limits,
) -> Result<BTreeMap<String, String>, ApiError> {
    count(field, raw.len(), limits)?;
    for (key, value) in &raw {
        if key.is_empty() {
            return Err(ApiError::invalid(field, "has an empty key"));
        }
        string(&format!("{field}[{}]", truncate(key)), key, limits)?;
        string(&format!("{field}[{}]", truncate(key)), value, limits)?;
    }
    Ok(raw.into_iter().collect())
}

fn map_u64(
    field: &str,
    raw: HashMap<String, u64>,
    limits: &Limits,
) -> Result<BTreeMap<String, u64>, ApiError> {
    count(field, raw.len(), limits)?;
    for key in raw.keys() {
        if key.is_empty() {
            return Err(ApiError::invalid(field, "has an empty key"));
        }
        string(&format!("{field}[{}]", truncate(key)), key, limits)?;
    }
    Ok(raw.into_iter().collect())
}

/// At most 64 characters of a value, for error messages.
fn truncate(value: &str) -> String {
    value.chars().take(64).collect()
}
