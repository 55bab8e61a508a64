//! The port every backend implements.

use std::sync::Arc;

use crate::engine::Observation;
use crate::sizing::ExecutorSize;
use crate::types::{AppId, ExecutorId, ExecutorTemplate, Millis, ProfileId};

/// An executor an earlier stoker started that is still there (found after a restart).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveredExecutor {
    /// Its id.
    pub executor_id: ExecutorId,
    /// Its resource profile.
    pub profile: ProfileId,
    /// Its host when it runs.
    pub running_host: Option<String>,
    /// Pod name or `pid:N`.
    pub backend_name: String,
}

/// A request to start one executor.
#[derive(Clone, Debug)]
pub struct LaunchRequest {
    /// The application.
    pub app_id: AppId,
    /// The new executor's id.
    pub executor_id: ExecutorId,
    /// Its resource profile (present in `template.profiles`).
    pub profile: ProfileId,
    /// Its memory: the heap (`-Xmx`, `SPARK_EXECUTOR_MEMORY`) and the overhead, which may be
    /// larger than the profile's configured size after memory failures (see
    /// [`crate::sizing`]). The container's memory limit is heap + overhead + the profile's
    /// off-heap and PySpark memory. Backends start the executor at this size, not at
    /// `template.profiles[profile]`'s.
    pub size: ExecutorSize,
    /// The application's template.
    pub template: Arc<ExecutorTemplate>,
    /// The application's token (a backend may record a digest of it, so that only the same
    /// driver can adopt the executor after a stoker restart).
    pub token: Arc<str>,
}

/// An observation with the executor it concerns.
#[derive(Clone, Debug)]
pub struct BackendObservation {
    /// The application.
    pub app_id: AppId,
    /// The executor.
    pub executor_id: ExecutorId,
    /// What happened.
    pub observation: Observation,
}

/// Where a backend sends what it sees. Must not block.
pub type ObservationSink = Arc<dyn Fn(BackendObservation) + Send + Sync>;

/// Something that runs executors. Calls return at once; outcomes arrive as observations,
/// including a failure to start (`Exited` with `StartFailed`).
pub trait ExecutorBackend: Send + Sync {
    /// Short name for logs and metrics ("local", "kubernetes").
    fn name(&self) -> &'static str;
    /// Whether executors are started at [`LaunchRequest::size`]. A backend that ignores it
    /// keeps every executor at its profile's configured size, and stoker then does not grow
    /// sizes (it would tell the driver of sizes that do not run).
    fn honours_size(&self) -> bool {
        false
    }
    /// Starts an executor.
    fn launch(&self, request: LaunchRequest);
    /// Stops an executor: a graceful signal, then a hard kill after `grace` milliseconds. The
    /// backend reports `Exited` when it is gone, also if it was never started.
    fn terminate(&self, app_id: &AppId, executor_id: ExecutorId, grace: Millis);
    /// The driver is decommissioning these executors (they leave on their own once their
    /// blocks are migrated): the backend may mark them (the Kubernetes backend applies Spark's
    /// `spark.kubernetes.executor.decommissionLabel`). Must not block.
    fn decommissioning(
        &self,
        _app_id: &AppId,
        _template: &Arc<ExecutorTemplate>,
        _executors: &[ExecutorId],
    ) {
    }
    /// Checks an application's template at registration, before anything is created. The error
    /// names the field that is wrong.
    fn check_template(&self, _template: &ExecutorTemplate) -> Result<(), String> {
        Ok(())
    }
    /// The application registered with `template` (a first registration in this stoker, after
    /// [`Self::claim`] and before any launch): the backend may prepare what its executors share
    /// (the Kubernetes backend creates the executor ConfigMap). Must not block.
    fn registered(&self, _app_id: &AppId, _template: &Arc<ExecutorTemplate>) {}
    /// The application is gone (every executor reported exited): the backend releases what
    /// [`Self::registered`] prepared. Must not block.
    fn ended(&self, _app_id: &AppId) {}
    /// Hands over, once, the executors of `app_id` that an earlier stoker started for the same
    /// `token` and that still exist. Called when the application registers.
    fn claim(&self, _app_id: &AppId, _token: &str) -> Vec<RecoveredExecutor> {
        Vec::new()
    }
}
