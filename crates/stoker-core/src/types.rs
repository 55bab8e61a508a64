//! Domain types shared by the engine, the backends and the server.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use crate::error::InvalidInput;

/// Milliseconds on a monotonic clock chosen by the caller. The engine never reads a clock itself.
pub type Millis = u64;

/// Spark's resource profile id; 0 is the default profile.
pub type ProfileId = i32;

/// Longest application id accepted (a Kubernetes label value is at most 63 characters, but the id
/// is stored hashed into labels by the Kubernetes backend, so the DNS-name limit applies).
pub const MAX_APP_ID_LEN: usize = 253;

/// A validated application id: 1..=253 characters of `[A-Za-z0-9._-]`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AppId(String);

impl AppId {
    /// Validates `raw` as an application id.
    pub fn parse(raw: &str) -> Result<Self, InvalidInput> {
        if raw.is_empty() {
            return Err(InvalidInput::new("app_id", "must not be empty"));
        }
        if raw.len() > MAX_APP_ID_LEN {
            return Err(InvalidInput::new(
                "app_id",
                format!(
                    "is {} characters long, more than {MAX_APP_ID_LEN}",
                    raw.len()
                ),
            ));
        }
        if let Some(bad) = raw
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(InvalidInput::new(
                "app_id",
                format!("contains {bad:?}; only letters, digits, '.', '_' and '-' are allowed"),
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AppId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An executor id: a positive decimal integer, unique and increasing within an application, as
/// Spark expects (it parses executor ids with `toInt`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ExecutorId(u64);

impl ExecutorId {
    /// The largest id handed out: Spark parses ids as `Int`.
    pub const MAX: u64 = i32::MAX as u64;

    /// Wraps a raw number. Callers own the range check (`1..=MAX`).
    pub fn new(raw: u64) -> Self {
        Self(raw)
    }

    /// The numeric value.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl FromStr for ExecutorId {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        if raw.is_empty() || raw.len() > 10 || !raw.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("{raw:?} is not a decimal executor id"));
        }
        let value: u64 = raw
            .parse()
            .map_err(|_| format!("{raw:?} is not a decimal executor id"))?;
        if value == 0 || value > Self::MAX {
            return Err(format!("{raw:?} is out of range 1..={}", Self::MAX));
        }
        Ok(Self(value))
    }
}

impl fmt::Display for ExecutorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What one executor of a resource profile gets.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ResourceProfile {
    /// Spark's profile id.
    pub id: ProfileId,
    /// Executor cores.
    pub cores: u32,
    /// JVM heap in MiB.
    pub heap_mib: u64,
    /// Memory overhead in MiB.
    pub overhead_mib: u64,
    /// Off-heap memory in MiB.
    pub off_heap_mib: u64,
    /// PySpark worker memory in MiB.
    pub pyspark_mib: u64,
    /// Other resources by name.
    pub resources: BTreeMap<String, u64>,
    /// Vendor domain per resource name.
    pub resource_vendors: BTreeMap<String, String>,
}

impl ResourceProfile {
    /// The memory a container of this profile needs: heap + overhead + off-heap + pyspark, as
    /// Spark's Kubernetes backend computes the pod's memory request and limit.
    pub fn total_memory_mib(&self) -> u64 {
        self.heap_mib
            .saturating_add(self.overhead_mib)
            .saturating_add(self.off_heap_mib)
            .saturating_add(self.pyspark_mib)
    }
}

/// The `spark.kubernetes.*` settings the Kubernetes backend honours.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
#[allow(missing_docs, reason = "fields mirror the documented protocol message")]
pub struct KubernetesSettings {
    pub namespace: String,
    pub image: String,
    pub image_pull_policy: String,
    pub image_pull_secrets: Vec<String>,
    pub service_account: String,
    pub node_selector: BTreeMap<String, String>,
    pub scheduler_name: String,
    pub pod_template_yaml: String,
    pub request_cores: String,
    pub limit_cores: String,
    pub driver_pod_name: String,
    pub driver_pod_uid: String,
    pub other: BTreeMap<String, String>,
}

/// Everything needed to start an executor of an application.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ExecutorTemplate {
    /// Spark's driver RPC endpoint.
    pub driver_url: String,
    /// The driver's Spark version.
    pub spark_version: String,
    /// SPARK_USER.
    pub spark_user: String,
    /// Resource profiles by id.
    pub profiles: BTreeMap<ProfileId, ResourceProfile>,
    /// Environment for every executor.
    pub environment: BTreeMap<String, String>,
    /// Extra JVM options.
    pub java_options: Vec<String>,
    /// Spark configuration needed before the executor reaches the driver.
    pub startup_conf: BTreeMap<String, String>,
    /// Extra class path entries.
    pub extra_class_path: String,
    /// Pod labels.
    pub labels: BTreeMap<String, String>,
    /// Pod annotations.
    pub annotations: BTreeMap<String, String>,
    /// Kubernetes settings.
    pub kubernetes: KubernetesSettings,
    /// Spark's authentication secret, if any.
    pub auth_secret: String,
    /// The executor pods Spark's own Kubernetes builder made in the driver, when it could (see
    /// [`SparkPods`]); the Kubernetes backend then uses them instead of building pods itself.
    pub spark_pods: Option<SparkPods>,
    /// How executors that run out of memory are resized (`spark.stoker.resize.*`); `None`:
    /// never.
    pub resize: Option<crate::sizing::ResizeSettings>,
    /// Who registered the application, as the cluster authenticated the driver (`--auth
    /// kubernetes`); `None` without authentication. The Kubernetes backend creates and deletes
    /// the application's pods as this identity.
    pub identity: Option<DriverIdentity>,
}

/// A driver's identity as the Kubernetes API server reported it in a TokenReview.
#[derive(Clone, Debug, PartialEq, Eq, Default, Hash)]
pub struct DriverIdentity {
    /// `system:serviceaccount:<namespace>:<name>` for a ServiceAccount.
    pub username: String,
    /// The user's uid (a ServiceAccount's uid: a deleted and recreated one differs).
    pub uid: String,
    /// Its groups.
    pub groups: Vec<String>,
    /// The pod the token is bound to, when it is (`authentication.kubernetes.io/pod-name`).
    pub pod_name: Option<String>,
    /// That pod's uid (`authentication.kubernetes.io/pod-uid`).
    pub pod_uid: Option<String>,
}

impl DriverIdentity {
    /// `(namespace, name)` when the identity is a ServiceAccount.
    pub fn service_account(&self) -> Option<(&str, &str)> {
        let rest = self.username.strip_prefix("system:serviceaccount:")?;
        let (namespace, name) = rest.split_once(':')?;
        (!namespace.is_empty() && !name.is_empty()).then_some((namespace, name))
    }

    /// Same user: the name and the uid (a ServiceAccount deleted and recreated under the same
    /// name is another identity).
    pub fn same_user(&self, other: &DriverIdentity) -> bool {
        self.username == other.username && self.uid == other.uid
    }
}

/// Executor pods as Spark's `KubernetesExecutorBuilder` builds them in the driver, one per
/// resource profile, for one placeholder executor id (the protocol's `SparkPods`, checked).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct SparkPods {
    /// The executor id the pods were built with; it stands for the real id.
    pub placeholder_executor_id: String,
    /// Per resource profile: the pod and its extra resources.
    pub profiles: BTreeMap<ProfileId, SparkProfilePod>,
    /// Objects every executor of the application shares (the executor ConfigMap), as JSON.
    pub app_resources_json: Vec<String>,
    /// The executor container's image is [`Self::image_placeholder`], to be replaced by the
    /// server's default image.
    pub image_from_server: bool,
    /// See [`Self::image_from_server`].
    pub image_placeholder: String,
    /// `spark.kubernetes.*` keys the driver was given that stoker does not honour, with why.
    pub unsupported_keys: BTreeMap<String, String>,
    /// The driver asked (`spark.stoker.strictConf`) to be refused when there are any.
    pub strict: bool,
    /// `spark.kubernetes.driver.waitToReusePersistentVolumeClaim`: with this many on-demand
    /// claims and none free, a new executor waits for one (Spark's `maxPVCs`); 0: never waits.
    pub claims_before_waiting: u32,
}

/// One resource profile's executor pod, as Spark built it.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct SparkProfilePod {
    /// The pod as JSON.
    pub pod_json: String,
    /// Extra per-executor objects (on-demand PersistentVolumeClaims), as JSON.
    pub resources_json: Vec<String>,
    /// Why Spark could not build the pod (naming the key when known); empty when it could.
    pub error: String,
}

/// Lifecycle of an executor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ExecutorPhase {
    /// Id assigned, creation asked of the backend.
    Requested,
    /// The backend accepted it; not running yet.
    Pending,
    /// Running.
    Running,
    /// Gone (terminal).
    Exited,
}

/// Why an executor exited.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExitReason {
    /// Exit code 0.
    Completed,
    /// Non-zero exit code.
    Error,
    /// Killed for exceeding its memory limit.
    OomKilled,
    /// Killed by a signal stoker did not send.
    Signaled,
    /// The driver killed it.
    KilledByDriver,
    /// Removed after decommissioning.
    Decommissioned,
    /// Removed because the target dropped before it ran.
    ScaledDown,
    /// Removed because the application ended.
    ApplicationEnded,
    /// Evicted by the cluster.
    Evicted,
    /// Its node was lost.
    NodeLost,
    /// Deleted by someone other than stoker.
    DeletedExternally,
    /// Could not be started.
    StartFailed,
    /// Did not start within the start timeout.
    StartTimeout,
    /// Ran past its active deadline.
    DeadlineExceeded,
    /// stoker lost track of it.
    Lost,
    /// Removed because the application ran over its fair share past the reclaim deadline.
    Reclaimed,
}

impl ExitReason {
    /// Whether the exit is the application's own doing, for Spark's `exitCausedByApp`: a process
    /// that failed on its own is; kills, scale-down, eviction, node loss and other infrastructure
    /// causes are not.
    pub fn caused_by_app(self) -> bool {
        matches!(
            self,
            Self::Completed
                | Self::Error
                | Self::OomKilled
                | Self::Signaled
                | Self::DeadlineExceeded
        )
    }

    /// Whether the exit counts toward the application's failure limit
    /// (`spark.executor.maxNumFailures`): executors that failed or could not start, but not those
    /// stoker or the driver removed, nor infrastructure losses (eviction, node loss), which Spark
    /// on YARN does not count either (preemption).
    pub fn counts_as_failure(self) -> bool {
        matches!(
            self,
            Self::Error
                | Self::OomKilled
                | Self::Signaled
                | Self::StartFailed
                | Self::StartTimeout
                | Self::DeadlineExceeded
        )
    }

    /// Stable upper-case name, as in the protocol (e.g. `OOM_KILLED`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "COMPLETED",
            Self::Error => "ERROR",
            Self::OomKilled => "OOM_KILLED",
            Self::Signaled => "SIGNALED",
            Self::KilledByDriver => "KILLED_BY_DRIVER",
            Self::Decommissioned => "DECOMMISSIONED",
            Self::ScaledDown => "SCALED_DOWN",
            Self::ApplicationEnded => "APPLICATION_ENDED",
            Self::Evicted => "EVICTED",
            Self::NodeLost => "NODE_LOST",
            Self::DeletedExternally => "DELETED_EXTERNALLY",
            Self::StartFailed => "START_FAILED",
            Self::StartTimeout => "START_TIMEOUT",
            Self::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Self::Lost => "LOST",
            Self::Reclaimed => "RECLAIMED",
        }
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How an executor ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExitInfo {
    /// Exit code, when known.
    pub code: Option<i32>,
    /// Why.
    pub reason: ExitReason,
    /// Detail for people.
    pub message: String,
    /// Spark's `exitCausedByApp`.
    pub caused_by_app: bool,
}
