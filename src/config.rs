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
    /// Lists the queues of the fair share (`serve --queues`) and what each is admitted.
    Queues(ClientArgs),
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
    /// The server's gRPC address: http://host:port, or https://host:port for a server with TLS.
    #[arg(long, env = "STOKER_SERVER", default_value = "http://127.0.0.1:7077")]
    pub server: String,
    /// The admin token (or an application token for `executors`). Defaults to the token file
    /// the server wrote into its work directory.
    #[arg(long, env = "STOKER_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The server's work directory, where it wrote `admin-token`.
    #[arg(long, env = "STOKER_WORK_DIR")]
    pub work_dir: Option<PathBuf>,
    /// PEM CA certificates to verify an https:// server with; default: the system's trust store.
    #[arg(long, env = "STOKER_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate, for a server started with --tls-client-ca.
    #[arg(
        long = "tls-cert",
        env = "STOKER_CLIENT_TLS_CERT",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long = "tls-key", env = "STOKER_CLIENT_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The name the server's certificate must carry, when it differs from the URL's host
    /// (e.g. connecting to 127.0.0.1 through a port-forward).
    #[arg(long, env = "STOKER_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,
    /// A Kubernetes token to present instead of the admin token (`--auth kubernetes`): its
    /// identity needs `get`/`list` on `applications.stoker.dev` (the ClusterRole
    /// `stoker-viewer`). E.g. `kubectl create token <sa> --audience stoker > token`.
    #[arg(long, env = "STOKER_BEARER_TOKEN_FILE")]
    pub bearer_token_file: Option<PathBuf>,
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

/// How callers are authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AuthMode {
    /// Nobody: the per-application token is the only credential (one machine, one user).
    None,
    /// A Kubernetes bearer token on every call, reviewed by the API server (TokenReview); pods
    /// are created and deleted as that identity.
    Kubernetes,
}

/// How a driver's writes are authorised (`--auth kubernetes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AuthzMode {
    /// Impersonate the driver: the API server judges every write as the driver.
    Impersonate,
    /// Ask the API server first (SubjectAccessReview), then write as stoker.
    SubjectAccessReview,
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
    /// How callers prove who they are. Default: `kubernetes` with the Kubernetes backend,
    /// `none` with the local one. `none` is refused on any address that is not loopback.
    #[arg(long, env = "STOKER_AUTH", value_enum)]
    pub auth: Option<AuthMode>,
    /// The audience drivers' tokens must be issued for (`--auth kubernetes`).
    #[arg(long, env = "STOKER_AUTH_AUDIENCE", default_value = "stoker")]
    pub auth_audience: String,
    /// With `--auth kubernetes`: how a driver's writes are authorised. `impersonate` (default):
    /// made as the driver, judged by the API server in full. `subject-access-review`: made as
    /// stoker after a SubjectAccessReview for the driver, where impersonation is not allowed
    /// (admission policies and webhooks then see stoker, not the driver).
    #[arg(long, env = "STOKER_AUTHZ", value_enum, default_value = "impersonate")]
    pub authz: AuthzMode,
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
    /// Host local executors advertise and bind: `loopback` gives each executor a loopback
    /// address of its own (127.0.0.2, 127.0.0.3, …), so that Spark sees a host per executor as
    /// it does with pods; an address or host name is shared by every executor.
    #[arg(long, env = "STOKER_EXECUTOR_HOST", default_value = "loopback")]
    pub executor_host: stoker_local::ExecutorHosts,
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
    /// Under fair share (--queues): how long a driver asked to give back executors over its
    /// share has to decommission them before stoker removes the newest ones itself.
    #[arg(long, env = "STOKER_RECLAIM_TIMEOUT", default_value = "60s", value_parser = parse_millis)]
    pub reclaim_timeout: Millis,
    /// Failure limit when the driver sends none (Spark's default is max(3, 2 × executors)).
    #[arg(long, env = "STOKER_DEFAULT_MAX_FAILURES", default_value_t = 3)]
    pub default_max_failures: u32,
    /// Log format.
    #[arg(long, env = "STOKER_LOG_FORMAT", value_enum, default_value = "human")]
    pub log_format: LogFormat,
    /// Queue file (TOML) for fair share across applications: queues with weights, guarantees
    /// and maxima, the rules that map applications to them, and the capacity stoker admits in
    /// all. Read again every --queues-reload-interval; a file that does not parse keeps the last
    /// good one. Without it every request is admitted (no fair share).
    #[arg(long, env = "STOKER_QUEUES")]
    pub queues: Option<PathBuf>,
    /// How often the queue file is read again, e.g. 5s.
    #[arg(long, env = "STOKER_QUEUES_RELOAD_INTERVAL", default_value = "5s", value_parser = parse_millis)]
    pub queues_reload_interval: Millis,
    /// Kubernetes backend settings.
    #[command(flatten)]
    pub kube: KubeArgs,
    /// Request limits.
    #[command(flatten)]
    pub limits: Limits,
    /// TLS on the gRPC port (and the metrics endpoint).
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// TLS of `stoker serve`. Without --tls-cert and --tls-key, gRPC and metrics are plaintext.
#[derive(Debug, Clone, clap::Args)]
pub struct TlsArgs {
    /// PEM certificate chain of the gRPC port (server certificate first). Read again every
    /// --tls-reload-interval: a changed file is used from the next connection on.
    #[arg(long, env = "STOKER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert (PKCS#8, PKCS#1 or SEC1), reloaded with it.
    #[arg(long, env = "STOKER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates: gRPC clients must present a certificate that chains to one of them.
    /// Reloaded with the certificate.
    #[arg(long, env = "STOKER_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// How often the TLS files are read again, e.g. 10s. A bad new file keeps the previous
    /// certificate in use (logged, counted in stoker_tls_reloads_total{result="error"}).
    #[arg(long, env = "STOKER_TLS_RELOAD_INTERVAL", default_value = "10s", value_parser = parse_millis)]
    pub tls_reload_interval: Millis,
    /// Serve the metrics endpoint over HTTPS with the same certificate (no client certificate
    /// asked for).
    #[arg(long, env = "STOKER_METRICS_TLS", requires = "tls_cert")]
    pub metrics_tls: bool,
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
    /// Pod creations in flight at once; a freed one goes to the next application in turn, so
    /// one application's ramp does not hold back another's first executor.
    #[arg(
        long = "kube-create-concurrency",
        env = "STOKER_KUBE_CREATE_CONCURRENCY",
        default_value_t = 64
    )]
    pub create_concurrency: usize,
    /// Connections pod writes are spread over, per identity they are made as (stoker's own,
    /// or each impersonated driver's): on one HTTP/2 connection the API server reads every
    /// request's frames in one loop, which limits a ramp.
    #[arg(
        long = "kube-write-connections",
        env = "STOKER_KUBE_WRITE_CONNECTIONS",
        default_value_t = 4,
        value_parser = clap::value_parser!(u16).range(1..=64)
    )]
    pub write_connections: u16,
    /// Leader election for two or more replicas of one instance: only the holder of the Lease
    /// lists, watches, adopts and writes pods and serves gRPC; the others wait (their gRPC port
    /// is closed, so readiness fails and Services and multi-address drivers skip them). A
    /// leader that cannot renew within 10 s stops writing and exits.
    #[arg(long = "leader-elect", env = "STOKER_LEADER_ELECT")]
    pub leader_elect: bool,
    /// Namespace of the Lease (stoker's own; in a pod, set it from the downward API).
    #[arg(
        long = "leader-elect-namespace",
        env = "POD_NAMESPACE",
        default_value = "default"
    )]
    pub leader_elect_namespace: String,
    /// The ConfigMap (`namespace/name`) where executor sizes are remembered across runs
    /// (`spark.stoker.sizing.key`); stoker's own state, read at start and written by the
    /// leader. Default: `stoker-sizes` in stoker's own namespace (POD_NAMESPACE); outside a pod
    /// and without this flag, sizes are not remembered across runs.
    #[arg(long = "sizes-configmap", env = "STOKER_SIZES_CONFIGMAP")]
    pub sizes_configmap: Option<String>,
    /// Name of the Lease; default: `stoker-<instance>`.
    #[arg(long = "leader-elect-lease", env = "STOKER_LEADER_ELECT_LEASE")]
    pub leader_elect_lease: Option<String>,
    /// This replica's identity in the Lease; default: the pod name (POD_NAME), else the host
    /// name and process id.
    #[arg(long = "leader-elect-identity", env = "POD_NAME")]
    pub leader_elect_identity: Option<String>,
}

/// Limits on requests and on what all callers together may hold, so that no caller, anonymous
/// or hostile, can exhaust the server or the cluster. A request beyond one is refused with
/// `INVALID_ARGUMENT` (the request alone is too large) or `RESOURCE_EXHAUSTED` (the server is
/// full), a message that names the flag, no change of state, and a count in
/// `stoker_limit_refusals_total{limit}`.
///
/// Per-identity limits (applications and executors per driver identity) wait for drivers to
/// authenticate with their Kubernetes identity: [`crate::quota::QuotaKey`] is where the identity
/// will join the namespace.
#[derive(Debug, Args, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Applications registered at once, in all.
    #[arg(long, env = "STOKER_MAX_APPLICATIONS", default_value_t = 1_000)]
    pub max_applications: usize,
    /// Applications registered at once in one Kubernetes namespace (the application's
    /// spark.kubernetes.namespace, else --kube-namespace). The local backend has one namespace,
    /// so there this caps all applications too. 200 leaves one team's namespace room for many
    /// concurrent jobs and the rest of --max-applications to the others.
    #[arg(
        long,
        env = "STOKER_MAX_APPLICATIONS_PER_NAMESPACE",
        default_value_t = 200
    )]
    pub max_applications_per_namespace: usize,
    /// Applications registered at once by one driver identity (a ServiceAccount), with
    /// `--auth kubernetes`: one team's runaway job submitter cannot take every slot.
    #[arg(
        long,
        env = "STOKER_MAX_APPLICATIONS_PER_IDENTITY",
        default_value_t = 100
    )]
    pub max_applications_per_identity: usize,
    /// Executors per resource profile of one application.
    #[arg(
        long,
        env = "STOKER_MAX_EXECUTORS_PER_PROFILE",
        default_value_t = 10_000
    )]
    pub max_executors_per_profile: u32,
    /// Executors one application may ask for, summed over its resource profiles (so that many
    /// profiles cannot multiply --max-executors-per-profile).
    #[arg(
        long,
        env = "STOKER_MAX_EXECUTORS_PER_APPLICATION",
        default_value_t = 10_000
    )]
    pub max_executors_per_application: u64,
    /// Executors all applications together may ask for (the sum of their targets). The default
    /// is twice the largest application; lower it to what the cluster can hold.
    #[arg(long, env = "STOKER_MAX_EXECUTORS", default_value_t = 20_000)]
    pub max_executors: u64,
    /// Bytes in one string field.
    #[arg(long, env = "STOKER_MAX_STRING_BYTES", default_value_t = 16_384)]
    pub max_string_bytes: usize,
    /// Bytes of the executor pod template (spark.kubernetes.executor.podTemplateFile). 64 KiB:
    /// pod templates are typically a few KiB, while every application keeps its template in
    /// memory and stoker parses it again for every executor pod, so 1,000 applications at the
    /// former 1 MiB could pin 1 GiB and parse a megabyte of YAML per pod; and the pod built from
    /// it is stored in etcd, whose default request limit is 1.5 MiB.
    #[arg(long, env = "STOKER_MAX_POD_TEMPLATE_BYTES", default_value_t = 65_536)]
    pub max_pod_template_bytes: usize,
    /// Entries in one map or list field.
    #[arg(long, env = "STOKER_MAX_ENTRIES", default_value_t = 1_024)]
    pub max_entries: usize,
    /// Executor ids in one kill, decommission or registration.
    #[arg(long, env = "STOKER_MAX_IDS", default_value_t = 100_000)]
    pub max_ids: usize,
    /// WatchExecutors streams open at once for one application. A driver keeps one; the rest
    /// is room for reconnections whose old stream the server has not yet seen close (a dead
    /// connection takes up to 40 s to be noticed through the HTTP/2 keepalive).
    #[arg(long, env = "STOKER_MAX_WATCHES_PER_APPLICATION", default_value_t = 8)]
    pub max_watches_per_application: usize,
    /// Concurrent HTTP/2 streams (calls in flight) on one client connection, announced as
    /// SETTINGS_MAX_CONCURRENT_STREAMS: the HTTP/2 layer refuses streams beyond it (gRPC
    /// clients queue them instead), so one connection cannot open unbounded calls. 100 is the
    /// minimum RFC 9113 recommends; a driver needs a handful.
    #[arg(long, env = "STOKER_MAX_STREAMS_PER_CONNECTION", default_value_t = 100)]
    pub max_streams_per_connection: u32,
    /// Largest failure limit (spark.executor.maxNumFailures) a driver may ask for; a larger
    /// one is lowered to this, logged and counted in stoker_failure_limits_lowered_total, not
    /// refused: Spark's own rule asks for Int.MaxValue under dynamic allocation without
    /// maxExecutors. The default is Spark's rule (2 × executors) at the default
    /// --max-executors-per-application; it bounds how many pods a crash-looping application
    /// can have created before it is failed.
    #[arg(long, env = "STOKER_MAX_FAILURE_LIMIT", default_value_t = 20_000)]
    pub max_failure_limit: u32,
    /// Most memory one executor may grow to (heap + overhead + off-heap + PySpark) when stoker
    /// replaces executors that ran out of memory by bigger ones (`spark.stoker.resize.*`), e.g.
    /// 64g or 8192m; an application's own ceiling above it is lowered to it.
    #[arg(
        long = "max-executor-memory",
        env = "STOKER_MAX_EXECUTOR_MEMORY",
        default_value = "64g",
        value_parser = parse_mib
    )]
    pub max_executor_memory_mib: u64,
    /// Sizes remembered across runs (`spark.stoker.sizing.key`), one per application key and
    /// resource profile; the least recently written are dropped beyond it.
    #[arg(long, env = "STOKER_MAX_REMEMBERED_SIZES", default_value_t = 1_000)]
    pub max_remembered_sizes: usize,
    /// Where sizes are remembered across runs; not a flag: `stoker serve` sets it for the local
    /// backend (`<work-dir>/sizes.tsv`). None: not remembered.
    #[arg(skip)]
    pub sizes_file: Option<PathBuf>,
    /// Where the Kubernetes backend remembers sizes (`--sizes-configmap`); not a flag:
    /// `stoker serve` sets it. Before `sizes_file` when both are set.
    #[arg(skip)]
    pub sizes_medium: Option<crate::sizes::SharedMedium>,
    /// How an application's namespace is found for --max-applications-per-namespace; not a
    /// flag: `stoker serve` sets it from the backend.
    #[arg(skip)]
    pub namespaces: NamespaceSource,
    /// The only namespaces applications may run in (comma-separated), on the Kubernetes
    /// backend, whatever their identity may do. Empty: every namespace but `kube-system` and
    /// stoker's own, which are refused unless named here. Defence in depth: with `--auth
    /// kubernetes` the API server already judges every pod as the driver.
    #[arg(long, env = "STOKER_ALLOWED_NAMESPACES", value_delimiter = ',')]
    pub allowed_namespaces: Vec<String>,
    /// Namespaces applications may run in, by label (a Kubernetes label selector such as
    /// `stoker.dev/serve=true`, matched by the API server; needs `list namespaces`): a
    /// namespace owner opts in by labelling the namespace. With --allowed-namespaces as well, a
    /// namespace either names or selects is served. `kube-system` and stoker's own namespace are
    /// served only when --allowed-namespaces names them, whatever their labels.
    #[arg(long, env = "STOKER_ALLOWED_NAMESPACE_SELECTOR")]
    pub allowed_namespace_selector: Option<String>,
    /// stoker's own namespace (POD_NAMESPACE); not a flag: `stoker serve` sets it.
    #[arg(skip)]
    pub own_namespace: Option<String>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_applications: 1_000,
            max_applications_per_namespace: 200,
            max_applications_per_identity: 100,
            max_executors_per_profile: 10_000,
            max_executors_per_application: 10_000,
            max_executors: 20_000,
            max_string_bytes: 16_384,
            max_pod_template_bytes: 65_536,
            max_entries: 1_024,
            max_ids: 100_000,
            max_watches_per_application: 8,
            max_streams_per_connection: 100,
            max_failure_limit: 20_000,
            max_executor_memory_mib: 64 * 1024,
            max_remembered_sizes: 1_000,
            sizes_file: None,
            sizes_medium: None,
            namespaces: NamespaceSource::default(),
            allowed_namespaces: Vec::new(),
            allowed_namespace_selector: None,
            own_namespace: None,
        }
    }
}

impl Limits {
    /// Whether applications may run in `namespace` (see [`Limits::allowed_namespaces`] and
    /// [`Limits::allowed_namespace_selector`]).
    pub fn namespace_allowed(&self, namespace: &str) -> NamespaceVerdict {
        if self.allowed_namespaces.iter().any(|n| n == namespace) {
            return NamespaceVerdict::Allowed;
        }
        if namespace == "kube-system" || self.own_namespace.as_deref() == Some(namespace) {
            return NamespaceVerdict::Refused(format!(
                "namespace {namespace} is refused: kube-system and stoker's own namespace serve \
                 only when --allowed-namespaces names them"
            ));
        }
        match (
            &self.allowed_namespace_selector,
            self.allowed_namespaces.is_empty(),
        ) {
            (Some(selector), _) => NamespaceVerdict::IfSelected(selector.clone()),
            (None, true) => NamespaceVerdict::Allowed,
            (None, false) => NamespaceVerdict::Refused(format!(
                "namespace {namespace} is not one this stoker serves (--allowed-namespaces: {})",
                self.allowed_namespaces.join(",")
            )),
        }
    }
}

/// What [`Limits::namespace_allowed`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamespaceVerdict {
    /// Served.
    Allowed,
    /// Not served; why.
    Refused(String),
    /// Served if the namespace's labels match this selector (the API server decides).
    IfSelected(String),
}

/// Where an application's namespace comes from, for the per-namespace limit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum NamespaceSource {
    /// Every application in one namespace: the local backend, where namespaces mean nothing.
    #[default]
    Single,
    /// The application's `spark.kubernetes.namespace`, else `default` (the Kubernetes backend's
    /// --kube-namespace, where an application that names none gets its pods).
    Kubernetes {
        /// The namespace of applications that name none.
        default: String,
    },
}

/// Parses a memory size such as `512m`, `8g` or `1t` (Spark's units, binary) into MiB; a plain
/// number is MiB.
pub fn parse_mib(raw: &str) -> Result<u64, String> {
    let lower = raw.trim().to_ascii_lowercase();
    let unit_at = lower
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(lower.len());
    let (number, unit) = lower.split_at(unit_at);
    let value: u64 = number
        .parse()
        .map_err(|_| format!("{raw:?} is not a memory size like 512m or 8g"))?;
    let factor = match unit {
        "" | "m" | "mb" | "mib" => 1,
        "g" | "gb" | "gib" => 1024,
        "t" | "tb" | "tib" => 1024 * 1024,
        _ => return Err(format!("{raw:?}: unknown unit {unit:?}; use m, g or t")),
    };
    value
        .checked_mul(factor)
        .filter(|&mib| mib > 0)
        .ok_or_else(|| format!("{raw:?} is not a positive memory size"))
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
    use clap::Parser;

    use super::{parse_mib, parse_millis, Cli, Command, Limits};

    /// The README documents every `stoker serve` flag by name (its flag tables or its text), so
    /// a new flag cannot ship undocumented.
    #[test]
    fn the_readme_names_every_serve_flag() {
        use clap::CommandFactory;
        let readme = include_str!("../README.md");
        let cli = Cli::command();
        let serve = cli.find_subcommand("serve").expect("a serve subcommand");
        let missing: Vec<String> = serve
            .get_arguments()
            .filter_map(|a| a.get_long())
            .filter(|long| !["help", "version"].contains(long))
            .map(|long| format!("`--{long}`"))
            .filter(|flag| !readme.contains(flag.as_str()))
            .collect();
        assert!(missing.is_empty(), "README.md does not name {missing:?}");
    }

    #[test]
    fn limit_flags_default_to_limits_default() {
        let cli = Cli::try_parse_from(["stoker", "serve"]).expect("parses");
        let Command::Serve(args) = cli.command else {
            panic!("serve");
        };
        assert_eq!(args.limits, Limits::default());
        assert_eq!(args.limits.max_pod_template_bytes, 64 * 1024);
    }

    #[test]
    fn tls_flags_need_their_partners() {
        for partial in [
            &["stoker", "serve", "--tls-cert", "tls.crt"][..],
            &["stoker", "serve", "--tls-key", "tls.key"],
            &["stoker", "serve", "--tls-client-ca", "ca.crt"],
            &["stoker", "serve", "--metrics-tls"],
            &["stoker", "apps", "--tls-cert", "client.crt"],
        ] {
            assert!(Cli::try_parse_from(partial).is_err(), "{partial:?}");
        }
        let cli = Cli::try_parse_from([
            "stoker",
            "serve",
            "--tls-cert",
            "tls.crt",
            "--tls-key",
            "tls.key",
            "--tls-reload-interval",
            "1m",
        ])
        .expect("parses");
        let Command::Serve(args) = cli.command else {
            panic!("serve");
        };
        assert_eq!(args.tls.tls_cert.as_deref(), Some("tls.crt".as_ref()));
        assert_eq!(args.tls.tls_reload_interval, 60_000);
        assert!(!args.tls.metrics_tls);
    }

    #[test]
    fn memory_sizes_parse_with_units() {
        assert_eq!(parse_mib("512"), Ok(512));
        assert_eq!(parse_mib("512m"), Ok(512));
        assert_eq!(parse_mib("8g"), Ok(8_192));
        assert_eq!(parse_mib("1T"), Ok(1_048_576));
        assert!(parse_mib("lots").is_err());
        assert!(parse_mib("0g").is_err());
        assert!(parse_mib("8k").is_err());
    }

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

#[cfg(test)]
mod namespace_tests {
    use super::{Limits, NamespaceVerdict};

    fn refused(verdict: NamespaceVerdict, needle: &str) -> bool {
        matches!(verdict, NamespaceVerdict::Refused(why) if why.contains(needle))
    }

    #[test]
    fn kube_system_and_stokers_own_namespace_are_refused_unless_named() {
        let mut limits = Limits {
            own_namespace: Some("stoker".into()),
            ..Limits::default()
        };
        assert_eq!(limits.namespace_allowed("spark"), NamespaceVerdict::Allowed);
        assert!(refused(
            limits.namespace_allowed("kube-system"),
            "kube-system"
        ));
        assert!(refused(
            limits.namespace_allowed("stoker"),
            "--allowed-namespaces"
        ));
        limits.allowed_namespaces = vec!["kube-system".into(), "etl".into()];
        assert_eq!(
            limits.namespace_allowed("kube-system"),
            NamespaceVerdict::Allowed
        );
        assert_eq!(limits.namespace_allowed("etl"), NamespaceVerdict::Allowed);
        let spark = limits.namespace_allowed("spark");
        assert!(refused(spark.clone(), "spark") && refused(spark, "kube-system,etl"));
    }

    #[test]
    fn a_selector_is_asked_for_namespaces_the_list_does_not_name_but_never_for_system_ones() {
        let mut limits = Limits {
            own_namespace: Some("stoker".into()),
            allowed_namespace_selector: Some("stoker.dev/serve=true".into()),
            ..Limits::default()
        };
        let asks = NamespaceVerdict::IfSelected("stoker.dev/serve=true".into());
        assert_eq!(limits.namespace_allowed("spark"), asks);
        // A label on kube-system or stoker's own namespace is not enough.
        assert!(refused(
            limits.namespace_allowed("kube-system"),
            "kube-system"
        ));
        assert!(refused(limits.namespace_allowed("stoker"), "stoker"));
        // Named or selected: a named one needs no label.
        limits.allowed_namespaces = vec!["etl".into(), "stoker".into()];
        assert_eq!(limits.namespace_allowed("etl"), NamespaceVerdict::Allowed);
        assert_eq!(
            limits.namespace_allowed("stoker"),
            NamespaceVerdict::Allowed
        );
        assert_eq!(limits.namespace_allowed("spark"), asks);
    }
}
