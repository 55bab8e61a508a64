//! Command-line and environment configuration.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use stoker_core::Millis;

/// stoker: runs Apache Spark executors for drivers that use `spark+stoker://host:port`.
#[derive(Debug, Parser)]
#[command(name = "stoker", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Runs the stoker server.
    Serve(Box<ServeArgs>),
    /// Lists the applications of a running server.
    Apps(ClientArgs),
    /// Lists the executors of one application.
    Executors {
        /// The application id.
        app_id: String,
        /// Common client options.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Internal: runs a program that the kernel kills when stoker dies.
    #[command(hide = true)]
    ExecGuard {
        /// The stoker process the program's life is tied to.
        #[arg(long)]
        parent: i32,
        /// The program and its arguments.
        #[arg(trailing_var_arg = true, required = true)]
        command: Vec<String>,
    },
}

/// Options of the client subcommands.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The server's gRPC address.
    #[arg(long, env = "STOKER_SERVER", default_value = "http://127.0.0.1:7077")]
    pub server: String,
    /// The admin token (or an application token for `executors`). Defaults to the token file
    /// the server wrote into its work directory.
    #[arg(long, env = "STOKER_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The server's work directory, where it wrote `admin-token`.
    #[arg(long, env = "STOKER_WORK_DIR")]
    pub work_dir: Option<PathBuf>,
}

/// Where executors run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// Local JVM processes from a Spark installation.
    Local,
    /// Pods on Kubernetes (official apache/spark image), through the cluster in KUBECONFIG or
    /// the in-cluster service account.
    Kubernetes,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// Options of `stoker serve`.
#[derive(Debug, Args, Clone)]
pub struct ServeArgs {
    /// gRPC listen address.
    #[arg(long, env = "STOKER_LISTEN", default_value = "127.0.0.1:7077")]
    pub listen: SocketAddr,
    /// Prometheus metrics listen address (HTTP, path /metrics).
    #[arg(long, env = "STOKER_METRICS_LISTEN", default_value = "127.0.0.1:9077")]
    pub metrics_listen: SocketAddr,
    /// Executor backend.
    #[arg(long, env = "STOKER_BACKEND", value_enum, default_value = "local")]
    pub backend: BackendKind,
    /// Spark installation for the local backend (needs jars/). Defaults to the pyspark package
    /// of the project's set-up, else the pyspark that `python3` imports.
    #[arg(long, env = "STOKER_SPARK_HOME")]
    pub spark_home: Option<PathBuf>,
    /// `java` for local executors. Defaults to $JAVA_HOME/bin/java, else java on PATH.
    #[arg(long, env = "STOKER_JAVA")]
    pub java: Option<PathBuf>,
    /// Work directory: executor logs, scratch space, the admin token file.
    #[arg(long, env = "STOKER_WORK_DIR", default_value = "/tmp/stoker")]
    pub work_dir: PathBuf,
    /// Host name local executors advertise.
    #[arg(long, env = "STOKER_EXECUTOR_HOST", default_value = "127.0.0.1")]
    pub executor_host: String,
    /// Admin token for ListApplications/GetApplication; generated and written to
    /// <work-dir>/admin-token (mode 0600) when not set.
    #[arg(long, env = "STOKER_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Driver lease time-to-live, e.g. 30s.
    #[arg(long, env = "STOKER_LEASE_TTL", default_value = "30s", value_parser = parse_millis)]
    pub lease_ttl: Millis,
    /// Time an executor may take to start running, e.g. 10m.
    #[arg(long, env = "STOKER_START_TIMEOUT", default_value = "10m", value_parser = parse_millis)]
    pub start_timeout: Millis,
    /// Grace period between SIGTERM and SIGKILL when an executor is removed.
    #[arg(long, env = "STOKER_DELETE_GRACE", default_value = "30s", value_parser = parse_millis)]
    pub delete_grace: Millis,
    /// How long a decommissioning executor may take before it is removed.
    #[arg(long, env = "STOKER_DECOMMISSION_TIMEOUT", default_value = "2m", value_parser = parse_millis)]
    pub decommission_timeout: Millis,
    /// Failure limit when the driver sends none (Spark's default is max(3, 2 × executors)).
    #[arg(long, env = "STOKER_DEFAULT_MAX_FAILURES", default_value_t = 3)]
    pub default_max_failures: u32,
    /// Log format.
    #[arg(long, env = "STOKER_LOG_FORMAT", value_enum, default_value = "human")]
    pub log_format: LogFormat,
    /// Kubernetes backend settings.
    #[command(flatten)]
    pub kube: KubeArgs,
    /// Request limits.
    #[command(flatten)]
    pub limits: Limits,
}

/// Settings of the Kubernetes backend.
#[derive(Debug, Clone, clap::Args)]
pub struct KubeArgs {
    /// Namespace for applications that set no spark.kubernetes.namespace.
    #[arg(
        long = "kube-namespace",
        env = "STOKER_KUBE_NAMESPACE",
        default_value = "default"
    )]
    pub namespace: String,
    /// Executor image for applications that set no spark.kubernetes.container.image.
    #[arg(long = "kube-image", env = "STOKER_KUBE_IMAGE")]
    pub image: Option<String>,
    /// Value of the stoker.dev/instance label: this stoker's pods. Unique per stoker in a
    /// cluster.
    #[arg(
        long = "kube-instance",
        env = "STOKER_KUBE_INSTANCE",
        default_value = "stoker"
    )]
    pub instance: String,
    /// Watch and manage pods in this namespace only (for a namespaced Role); default: all.
    #[arg(long = "kube-watch-namespace", env = "STOKER_KUBE_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,
    /// Client-side limit on pod create/delete requests per second (0: none).
    #[arg(long = "kube-qps", env = "STOKER_KUBE_QPS", default_value_t = 200.0)]
    pub qps: f64,
    /// Burst above --kube-qps.
    #[arg(long = "kube-burst", env = "STOKER_KUBE_BURST", default_value_t = 400)]
    pub burst: u32,
    /// Pod creations in flight at once.
    #[arg(
        long = "kube-create-concurrency",
        env = "STOKER_KUBE_CREATE_CONCURRENCY",
        default_value_t = 64
    )]
    pub create_concurrency: usize,
}

/// Limits on requests; anything beyond them is INVALID_ARGUMENT or RESOURCE_EXHAUSTED.
#[derive(Debug, Args, Clone)]
pub struct Limits {
    /// Applications at once.
    #[arg(long, env = "STOKER_MAX_APPLICATIONS", default_value_t = 1_000)]
    pub max_applications: usize,
    /// Executors per resource profile of one application.
    #[arg(
        long,
        env = "STOKER_MAX_EXECUTORS_PER_PROFILE",
        default_value_t = 10_000
    )]
    pub max_executors_per_profile: u32,
    /// Bytes in one string field.
    #[arg(long, env = "STOKER_MAX_STRING_BYTES", default_value_t = 16_384)]
    pub max_string_bytes: usize,
    /// Bytes of the executor pod template.
    #[arg(
        long,
        env = "STOKER_MAX_POD_TEMPLATE_BYTES",
        default_value_t = 1_048_576
    )]
    pub max_pod_template_bytes: usize,
    /// Entries in one map or list field.
    #[arg(long, env = "STOKER_MAX_ENTRIES", default_value_t = 1_024)]
    pub max_entries: usize,
    /// Executor ids in one kill, decommission or registration.
    #[arg(long, env = "STOKER_MAX_IDS", default_value_t = 100_000)]
    pub max_ids: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_applications: 1_000,
            max_executors_per_profile: 10_000,
            max_string_bytes: 16_384,
            max_pod_template_bytes: 1_048_576,
            max_entries: 1_024,
            max_ids: 100_000,
        }
    }
}

/// Parses a duration such as `500ms`, `30s`, `10m`, `1h` or plain milliseconds.
pub fn parse_millis(raw: &str) -> Result<Millis, String> {
    let raw = raw.trim();
    let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
    let (number, unit) = raw.split_at(split);
    let value: u64 = number
        .parse()
        .map_err(|_| format!("{raw:?} is not a duration like 500ms, 30s, 10m or 1h"))?;
    let factor = match unit {
        "" | "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(format!("{raw:?}: unknown unit {unit:?}; use ms, s, m or h")),
    };
    value
        .checked_mul(factor)
        .ok_or_else(|| format!("{raw:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::parse_millis;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_millis("250"), Ok(250));
        assert_eq!(parse_millis("500ms"), Ok(500));
        assert_eq!(parse_millis("30s"), Ok(30_000));
        assert_eq!(parse_millis("10m"), Ok(600_000));
        assert_eq!(parse_millis("1h"), Ok(3_600_000));
        assert!(parse_millis("ten").is_err());
        assert!(parse_millis("5d").is_err());
        assert!(parse_millis("-5s").is_err());
    }
}
