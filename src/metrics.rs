//! Prometheus metrics, served over HTTP at `/metrics`.

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::error::Limit;

/// Labels of RPC metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    /// The RPC method.
    pub method: String,
    /// The gRPC status code name.
    pub code: String,
}

/// Labels of backend operations.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    /// Backend name.
    pub backend: String,
    /// Operation.
    pub operation: String,
}

/// A single string label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// Executor state.
    pub state: String,
}

/// A single reason label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Exit reason.
    pub reason: String,
}

/// Why a profile's executors grew.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CauseLabel {
    /// `oom_killed` (more overhead) or `heap` (more heap).
    pub cause: &'static str,
}

/// The limit that refused a request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabel {
    /// [`Limit::name`].
    pub limit: &'static str,
}

/// The queue of the fair share (`stoker serve --queues`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabel {
    /// Its name.
    pub queue: String,
}

/// Every metric stoker exports.
pub struct Metrics {
    registry: Registry,
    /// Applications registered now.
    pub applications: Gauge,
    /// Executors by state.
    pub executors: Family<StateLabel, Gauge>,
    /// RPC latency.
    pub rpc_duration: Family<RpcLabels, Histogram>,
    /// Backend operations requested.
    pub backend_operations: Family<BackendLabels, Counter>,
    /// Executor exits by reason (backend failures among them).
    pub executor_exits: Family<ReasonLabel, Counter>,
    /// Applications registered since start.
    pub applications_registered: Counter,
    /// Leases that expired.
    pub leases_expired: Counter,
    /// Requests refused by a limit, by limit.
    pub limit_refusals: Family<LimitLabel, Counter>,
    /// Registrations whose failure limit was lowered to `--max-failure-limit`.
    pub failure_limits_lowered: Counter,
    /// Profiles whose executors grew after a memory failure, by cause.
    pub executor_resizes: Family<CauseLabel, Counter>,
    /// Queue files refused (at a reload; the last good configuration stays in force).
    pub queue_config_errors: Counter,
    /// 1 when the last read of the queue file was used, 0 when it was refused.
    pub queue_config_last_reload_success: Gauge,
    /// Executors admitted per queue.
    pub queue_admitted: Family<QueueLabel, Gauge>,
    /// Executors requested per queue.
    pub queue_requested: Family<QueueLabel, Gauge>,
    /// Executors running (alive and counted toward a target) per queue.
    pub queue_running: Family<QueueLabel, Gauge>,
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("stoker");
        let applications = Gauge::default();
        registry.register(
            "applications",
            "Applications registered now",
            applications.clone(),
        );
        let executors = Family::<StateLabel, Gauge>::default();
        registry.register(
            "executors",
            "Executors by state (pending, running, deleting)",
            executors.clone(),
        );
        let rpc_duration = Family::<RpcLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_05, 2.0, 18))
        });
        registry.register(
            "rpc_duration_seconds",
            "gRPC request latency by method and status code",
            rpc_duration.clone(),
        );
        let backend_operations = Family::<BackendLabels, Counter>::default();
        registry.register(
            "backend_operations",
            "Executor launches and terminations asked of the backend",
            backend_operations.clone(),
        );
        let executor_exits = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "executor_exits",
            "Executor exits by reason (ERROR, OOM_KILLED, START_FAILED, ... are failures)",
            executor_exits.clone(),
        );
        let applications_registered = Counter::default();
        registry.register(
            "applications_registered",
            "Applications registered since start",
            applications_registered.clone(),
        );
        let leases_expired = Counter::default();
        registry.register(
            "leases_expired",
            "Driver leases that expired",
            leases_expired.clone(),
        );
        let limit_refusals = Family::<LimitLabel, Counter>::default();
        registry.register(
            "limit_refusals",
            "Requests refused by a limit, by limit (its flag: --max-<limit>, - for _)",
            limit_refusals.clone(),
        );
        // Every limit shows, at zero until it refuses something.
        for limit in Limit::ALL {
            let _ = limit_refusals.get_or_create(&LimitLabel {
                limit: limit.name(),
            });
        }
        let failure_limits_lowered = Counter::default();
        registry.register(
            "failure_limits_lowered",
            "Registrations whose failure limit was lowered to --max-failure-limit",
            failure_limits_lowered.clone(),
        );
        let executor_resizes = Family::<CauseLabel, Counter>::default();
        registry.register(
            "executor_resizes",
            "Resource profiles whose new executors got more memory after a memory failure, by \
             cause (oom_killed: more overhead; heap: more heap)",
            executor_resizes.clone(),
        );
        let queue_config_errors = Counter::default();
        registry.register(
            "queue_config_errors",
            "Queue files (--queues) refused at a reload; the last good configuration stays in force",
            queue_config_errors.clone(),
        );
        let queue_config_last_reload_success = Gauge::default();
        registry.register(
            "queue_config_last_reload_success",
            "1 when the queue file's last change was taken, 0 when it was refused",
            queue_config_last_reload_success.clone(),
        );
        let queue_admitted = Family::<QueueLabel, Gauge>::default();
        registry.register(
            "queue_admitted",
            "Executors admitted to the applications of a queue (fair share)",
            queue_admitted.clone(),
        );
        let queue_requested = Family::<QueueLabel, Gauge>::default();
        registry.register(
            "queue_requested",
            "Executors the applications of a queue ask for",
            queue_requested.clone(),
        );
        let queue_running = Family::<QueueLabel, Gauge>::default();
        registry.register(
            "queue_running",
            "Executors the applications of a queue have (alive, not being removed)",
            queue_running.clone(),
        );
        Self {
            registry,
            applications,
            executors,
            rpc_duration,
            backend_operations,
            executor_exits,
            applications_registered,
            leases_expired,
            limit_refusals,
            failure_limits_lowered,
            executor_resizes,
            queue_config_errors,
            queue_config_last_reload_success,
            queue_admitted,
            queue_requested,
            queue_running,
        }
    }

    /// Registers the TLS reload counts (`stoker_tls_reloads_total{result}`).
    pub fn with_tls_reloads(mut self, reloads: Family<crate::tls::ReloadLabel, Counter>) -> Self {
        self.registry.register(
            "tls_reloads",
            "TLS certificate reloads by result (ok: new files in use; error: refused, the previous certificate kept)",
            reloads,
        );
        self
    }

    /// Counts a request refused by `limit`.
    pub fn limit_refused(&self, limit: Limit) {
        self.limit_refusals
            .get_or_create(&LimitLabel {
                limit: limit.name(),
            })
            .inc();
    }

    /// Counts a backend operation.
    pub fn backend_op(&self, backend: &str, operation: &str) {
        self.backend_operations
            .get_or_create(&BackendLabels {
                backend: backend.to_owned(),
                operation: operation.to_owned(),
            })
            .inc();
    }

    /// Records an RPC's latency.
    pub fn rpc(&self, method: &str, code: tonic::Code, started: Instant) {
        self.rpc_duration
            .get_or_create(&RpcLabels {
                method: method.to_owned(),
                code: format!("{code:?}"),
            })
            .observe(started.elapsed().as_secs_f64());
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Serves `/metrics` on `listener` (a `TcpListener`, or a [`crate::tls::TlsListener`]) until
/// `shutdown` resolves.
pub async fn serve<L>(
    listener: L,
    refresh: Arc<dyn Fn() -> String + Send + Sync>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let refresh = Arc::clone(&refresh);
            async move { refresh() }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
