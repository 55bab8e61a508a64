//! The `stoker` command: `serve`, `apps`, `executors`.

use std::io::IsTerminal;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Parser;
use stoker::config::{
    AuthMode, AuthzMode, BackendKind, Cli, Command, LogFormat, NamespaceSource, ServeArgs,
};
use stoker::server::{self, Settings};
use stoker::tls::{ServerTls, TlsListener, TlsSettings};
use stoker_core::{EngineConfig, ExecutorBackend};
use stoker_k8s::lease::{Elector, LeaseConfig, WriteGate};
use stoker_k8s::pod::PodDefaults;
use stoker_k8s::{KubernetesBackend, KubernetesConfig, WriteAs};
use stoker_local::{LocalBackend, LocalConfig};
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

/// The Spark version the project's set-up installs (pyspark from PyPI).
const SPARK_VERSION: &str = "4.2.0";

/// jemalloc, with its background thread purging freed pages, instead of glibc's malloc. A ramp of
/// N executors holds every pending pod (the built Pod and its create task, about 20 KiB each)
/// until its create slot comes; that peak is freed once the pods exist, but glibc kept the pages
/// (RSS stayed at the peak, 300 MiB after 10,000 pods, while its live heap was a few MiB).
/// jemalloc hands them back within seconds (README, "Scale").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::ExecGuard { parent, command } = &cli.command {
        return exec_guard(*parent, command);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("stoker: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve(*args).await,
            Command::Apps(args) => {
                print!("{}", stoker::cli::apps(args).await?);
                Ok(())
            }
            Command::Queues(args) => {
                print!("{}", stoker::cli::queues(args).await?);
                Ok(())
            }
            Command::Executors { app_id, client } => {
                print!("{}", stoker::cli::executors(app_id, client).await?);
                Ok(())
            }
            Command::ExecGuard { .. } => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("stoker: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Ties the life of `command` to the stoker process `parent`: asks the kernel for SIGKILL when
/// the parent dies, then becomes the command (exec keeps the death signal).
fn exec_guard(parent: i32, command: &[String]) -> ExitCode {
    use nix::sys::signal::Signal;
    if let Err(err) = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL) {
        eprintln!("stoker exec-guard: cannot set the parent-death signal: {err}");
        return ExitCode::from(126);
    }
    // The parent may have died before the death signal was armed.
    if nix::unistd::getppid().as_raw() != parent {
        eprintln!("stoker exec-guard: stoker (pid {parent}) is gone; not starting");
        return ExitCode::from(125);
    }
    let Some((program, args)) = command.split_first() else {
        eprintln!("stoker exec-guard: no command given");
        return ExitCode::from(2);
    };
    let err = std::process::Command::new(program).args(args).exec();
    eprintln!("stoker exec-guard: cannot run {program}: {err}");
    ExitCode::from(127)
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
    if args.default_max_failures > args.limits.max_failure_limit {
        bail!(
            "--default-max-failures {} is above --max-failure-limit {}",
            args.default_max_failures,
            args.limits.max_failure_limit
        );
    }
    // Created private (0700) when missing; an existing directory keeps its mode (the
    // Deployment mounts an emptyDir there and passes the admin token by environment).
    stoker::secret::create_private_dir(&args.work_dir)
        .context("cannot create the work directory")?;
    let admin_token = match &args.admin_token {
        Some(token) if token.len() >= 16 => token.clone(),
        Some(_) => bail!("--admin-token must be at least 16 characters"),
        None => {
            let token = stoker::random_token();
            let path = stoker::secret::write_secret(&args.work_dir, "admin-token", &token)
                .context(
                    "cannot keep the admin token in the work directory: use a --work-dir that \
                     only this user can write to (mode 0700), or pass --admin-token",
                )?;
            info!(path = %path.display(), "admin token written");
            token
        }
    };
    let engine = EngineConfig {
        lease_ttl: args.lease_ttl,
        start_timeout: args.start_timeout,
        delete_grace: args.delete_grace,
        decommission_timeout: args.decommission_timeout,
        reclaim_timeout: args.reclaim_timeout,
        max_failures: args.default_max_failures,
        failure_window: None,
        max_executors_per_profile: args.limits.max_executors_per_profile,
        max_event_log: 100_000,
    };
    let mut limits = args.limits.clone();
    // Refused unless --allowed-namespaces names it (see Limits::namespace_allowed).
    limits.own_namespace = std::env::var("POD_NAMESPACE")
        .ok()
        .filter(|n| !n.is_empty());
    limits.namespaces = match args.backend {
        BackendKind::Local => NamespaceSource::Single,
        BackendKind::Kubernetes => NamespaceSource::Kubernetes {
            default: args.kube.namespace.clone(),
        },
    };
    // Sizes across runs: a file in the local backend's work directory; on Kubernetes a
    // ConfigMap, opened once this replica leads (below).
    limits.sizes_file = match args.backend {
        BackendKind::Local => Some(args.work_dir.join("sizes.tsv")),
        BackendKind::Kubernetes => None,
    };
    let tls = server_tls(&args)?;
    let mut settings = Settings {
        listen: args.listen,
        metrics_listen: Some(args.metrics_listen),
        engine,
        limits,
        admin_token,
        incarnation: stoker::random_token()[..16].to_owned(),
        tls: tls.clone(),
        namespace_selector: None,
        queues: queue_settings(&args)?,
    };
    let mut backend_slot: Option<LocalBackend> = None;
    // The Kubernetes backend's remembered sizes, flushed at shutdown.
    let mut sizes_slot: Option<Arc<stoker_k8s::sizes_configmap::SizesConfigMap>> = None;
    // With --leader-elect: the task that keeps the Lease, and how to tell it to release it.
    let mut lease: Option<(LeaseTask, tokio::sync::oneshot::Sender<()>)> = None;
    let auth = auth_mode(&args)?;
    let running = match args.backend {
        BackendKind::Local => {
            let local = local_config(&args)?;
            info!(
                backend = "local",
                spark_home = %local.spark_home.display(),
                java = %local.java.display(),
                work_dir = %local.work_dir.display(),
                "starting stoker"
            );
            server::start(settings, |sink| {
                let backend = LocalBackend::new(local, sink)?;
                backend_slot = Some(backend.clone());
                Ok(Arc::new(backend) as Arc<dyn ExecutorBackend>)
            })
            .await?
        }
        BackendKind::Kubernetes => {
            let kube_config = kube::Config::infer().await.context(
                "no Kubernetes configuration: set KUBECONFIG, or run in a pod with a service account",
            )?;
            // Reviews and the lease share one HTTP/2 connection, the watch gets its own, pod
            // writes a few (--kube-write-connections).
            let client = stoker_k8s::client(kube_config.clone())?;
            let watch_client = stoker_k8s::client(kube_config.clone())?;
            let kubernetes_auth = auth == AuthMode::Kubernetes;
            let reviewer = Arc::new(stoker_k8s::auth::Reviewer::new(
                client.clone(),
                args.auth_audience.clone(),
            ));
            let gate = if args.kube.leader_elect {
                let mut candidate = elector_for(&args, client.clone())?;
                let own_pod = own_pod();
                if let Some((ns, pod)) = &own_pod {
                    // A restarted container of the old leader's pod must not keep attracting
                    // drivers through the Service.
                    stoker_k8s::lease::label_own_pod(client.clone(), ns, pod, false)
                        .await
                        .with_context(|| {
                            format!("cannot remove the leader label from pod {ns}/{pod}")
                        })?;
                }
                // A standby only waits: no list, no watch, no writes, no gRPC port (so its
                // readiness fails and drivers go to the leader). Liveness: the metrics port.
                let standby = standby_metrics(args.metrics_listen, tls.clone()).await?;
                tokio::select! {
                    acquired = candidate.acquire() => acquired?,
                    signal = wait_for_signal() => {
                        signal?;
                        info!("stopped while standing by");
                        return Ok(());
                    }
                }
                standby.stop().await;
                if let Some((ns, pod)) = &own_pod {
                    if let Err(err) =
                        stoker_k8s::lease::label_own_pod(client.clone(), ns, pod, true).await
                    {
                        // Drivers that use the replicas' addresses still find the leader.
                        error!(error = %err, pod = %pod, "cannot label this pod as the leader: the Service will not route to it");
                    }
                }
                let gate = candidate.gate();
                // Renewals start now, before the backend lists and adopts (which can take a
                // while with many pods).
                let (release, released) = tokio::sync::oneshot::channel::<()>();
                let task = tokio::spawn(candidate.keep(async move {
                    let _ = released.await;
                }));
                lease = Some((task, release));
                gate
            } else {
                WriteGate::always_open()
            };
            if let Some((namespace, name)) = sizes_configmap(&args)? {
                let sizes = Arc::new(
                    stoker_k8s::sizes_configmap::SizesConfigMap::open(
                        client.clone(),
                        &namespace,
                        &name,
                        Arc::clone(&gate),
                    )
                    .await,
                );
                settings.limits.sizes_medium = Some(stoker::sizes::SharedMedium(
                    Arc::clone(&sizes) as Arc<dyn stoker::sizes::Medium>,
                ));
                sizes_slot = Some(sizes);
            } else {
                info!("no --sizes-configmap and no POD_NAMESPACE: executor sizes are not remembered across runs");
            }
            let config = KubernetesConfig {
                defaults: PodDefaults {
                    namespace: args.kube.namespace.clone(),
                    image: args.kube.image.clone(),
                    instance: args.kube.instance.clone(),
                },
                qps: args.kube.qps,
                burst: args.kube.burst,
                create_concurrency: args.kube.create_concurrency,
                write_connections: usize::from(args.kube.write_connections),
                watch_namespace: args.kube.watch_namespace.clone(),
                // A driver re-attaches within a lease; give it one more.
                adoption_window: std::time::Duration::from_millis(args.lease_ttl.saturating_mul(2)),
                gate,
                // Pods are written as the driver: the API server judges the driver's rights.
                write_as: match (kubernetes_auth, args.authz) {
                    (false, _) => WriteAs::Stoker,
                    (true, AuthzMode::Impersonate) => {
                        WriteAs::Impersonate(Box::new(kube_config.clone()))
                    }
                    (true, AuthzMode::SubjectAccessReview) => {
                        WriteAs::Review(Arc::clone(&reviewer))
                    }
                },
            };
            info!(backend = "kubernetes", instance = %config.defaults.instance,
                watch_namespace = ?config.watch_namespace, qps = config.qps, "starting stoker");
            // The backend's own start is async (it lists its pods), so it starts before the
            // server and gets its sink through a slot the server fills.
            let slot: Arc<std::sync::OnceLock<stoker_core::ObservationSink>> = Arc::default();
            let forward = Arc::clone(&slot);
            let sink: stoker_core::ObservationSink = Arc::new(move |o| {
                if let Some(s) = forward.get() {
                    s(o);
                }
            });
            let writers = stoker_k8s::client::Clients::new(&kube_config, config.write_connections)?;
            let backend = KubernetesBackend::start(writers, watch_client, config, sink)
                .await
                .context("cannot start the Kubernetes backend")?;
            if let Some(selector) = &args.limits.allowed_namespace_selector {
                let check =
                    stoker_k8s::namespaces::NamespaceSelector::new(client.clone(), selector)
                        .await
                        .context("--allowed-namespace-selector")?;
                info!(selector = %selector, "serving the namespaces this label selector selects");
                settings.namespace_selector = Some(Arc::new(check));
            }
            let authenticator: Arc<dyn stoker::auth::Authenticator> = if kubernetes_auth {
                info!(audience = %args.auth_audience, "drivers authenticate with Kubernetes tokens; pods are written as the driver");
                stoker::auth::KubernetesAuth::new(reviewer)
            } else {
                Arc::new(stoker::auth::NoAuth)
            };
            server::start_with_auth(settings, authenticator, move |real_sink| {
                let _ = slot.set(real_sink);
                Ok(Arc::new(backend) as Arc<dyn ExecutorBackend>)
            })
            .await?
        }
    };
    println!(
        "stoker listening on {} (metrics on {})",
        running.grpc_addr,
        running
            .metrics_addr
            .map_or_else(|| "-".to_owned(), |a| a.to_string())
    );

    let lease = match lease {
        None => {
            wait_for_signal().await?;
            None
        }
        Some((mut task, release)) => {
            tokio::select! {
                lost = &mut task => {
                    // Writes are already shut (the gate closes before the task ends). Exit at
                    // once, to be restarted as a standby; drivers re-attach to the new leader.
                    match lost {
                        Ok(Err(why)) => error!(error = %why, "leadership lost: exiting"),
                        Ok(Ok(())) => error!("leader election ended: exiting"),
                        Err(err) => error!(error = %err, "leader election task failed: exiting"),
                    }
                    std::process::exit(3);
                }
                signal = wait_for_signal() => signal?,
            }
            Some((task, release))
        }
    };
    info!("shutting down: ending streams, then stopping executors");
    let shutdown = running.shutdown().await;
    if let Some(sizes) = &sizes_slot {
        // While this replica still holds the Lease: the last runs' sizes are written.
        if !sizes.flush(std::time::Duration::from_secs(5)).await {
            warn!(configmap = %sizes.describe(), "remembered executor sizes not all written before exit");
        }
    }
    if let Some((task, release)) = lease {
        // After the streams ended: the standby takes over at its next read.
        let _ = release.send(());
        if let Ok(Err(why)) = task.await {
            error!(error = %why, "leader election ended with an error");
        }
    }
    if let Some(backend) = backend_slot {
        backend.shutdown(args.delete_grace.min(10_000)).await;
    }
    if let Err(err) = &shutdown {
        error!(error = %err, "server stopped with an error");
    }
    info!("stopped");
    shutdown
}

/// `--queues`: the queue file, read at start (by the server) and every reload interval.
fn queue_settings(args: &ServeArgs) -> anyhow::Result<Option<stoker::queues::QueueSettings>> {
    let Some(path) = &args.queues else {
        return Ok(None);
    };
    if args.queues_reload_interval == 0 {
        bail!("--queues-reload-interval must be positive");
    }
    Ok(Some(stoker::queues::QueueSettings {
        path: path.clone(),
        reload_interval: std::time::Duration::from_millis(args.queues_reload_interval),
        debounce: std::time::Duration::from_millis(150),
    }))
}

/// `--sizes-configmap` as (namespace, name); by default `stoker-sizes` in POD_NAMESPACE, none
/// outside a pod.
fn sizes_configmap(args: &ServeArgs) -> anyhow::Result<Option<(String, String)>> {
    let Some(flag) = &args.kube.sizes_configmap else {
        return Ok(std::env::var("POD_NAMESPACE")
            .ok()
            .filter(|ns| !ns.is_empty())
            .map(|ns| (ns, "stoker-sizes".to_owned())));
    };
    match flag.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(Some((ns.to_owned(), name.to_owned())))
        }
        _ => bail!("--sizes-configmap {flag:?}: expected <namespace>/<name>"),
    }
}

/// `--auth`, defaulted by backend, and refused where it cannot protect anything.
fn auth_mode(args: &ServeArgs) -> anyhow::Result<AuthMode> {
    let mode = args.auth.unwrap_or(match args.backend {
        BackendKind::Local => AuthMode::None,
        BackendKind::Kubernetes => AuthMode::Kubernetes,
    });
    if mode == AuthMode::None && !args.listen.ip().is_loopback() {
        bail!(
            "--auth none on {}: refused, because anyone who reaches that address could run \
             executors as stoker; listen on a loopback address, or use --auth kubernetes",
            args.listen
        );
    }
    if mode == AuthMode::Kubernetes && args.backend == BackendKind::Local {
        bail!("--auth kubernetes needs --backend kubernetes (the local backend has no cluster to ask)");
    }
    Ok(mode)
}

/// The leader election of `stoker serve --leader-elect`.
fn elector_for(args: &ServeArgs, client: kube::Client) -> anyhow::Result<Elector> {
    let kube = &args.kube;
    let identity = match &kube.leader_elect_identity {
        Some(id) if !id.is_empty() => id.clone(),
        _ => {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "stoker".to_owned());
            format!("{host}-{}", std::process::id())
        }
    };
    let lease = kube
        .leader_elect_lease
        .clone()
        .unwrap_or_else(|| format!("stoker-{}", stoker_k8s::pod::label_value(&kube.instance)));
    let config = LeaseConfig::new(kube.leader_elect_namespace.clone(), lease, identity);
    info!(lease = %config.name, namespace = %config.namespace, identity = %config.identity,
        "leader election: standing by until this replica holds the lease");
    Elector::new(client, config, WriteGate::shut()).context("cannot set up leader election")
}

/// This replica's pod (POD_NAMESPACE, POD_NAME from the downward API), when it runs in one.
fn own_pod() -> Option<(String, String)> {
    let ns = std::env::var("POD_NAMESPACE")
        .ok()
        .filter(|v| !v.is_empty())?;
    let pod = std::env::var("POD_NAME").ok().filter(|v| !v.is_empty())?;
    Some((ns, pod))
}

/// The task that keeps the Lease (see [`Elector::keep`]).
type LeaseTask = tokio::task::JoinHandle<Result<(), stoker_k8s::lease::LeaseError>>;

/// While a replica stands by, its metrics port answers (`stoker_leader 0`), for liveness.
struct StandbyMetrics {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn standby_metrics(
    addr: std::net::SocketAddr,
    tls: Option<Arc<ServerTls>>,
) -> anyhow::Result<StandbyMetrics> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for metrics on {addr}"))?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let text: Arc<dyn Fn() -> String + Send + Sync> = Arc::new(|| {
        "# HELP stoker_leader 1 when this replica leads.\n# TYPE stoker_leader gauge\nstoker_leader 0\n# EOF\n".to_owned()
    });
    let stopped = async move {
        let _ = stopped.await;
    };
    // With --metrics-tls the probes speak HTTPS to the standby too.
    let task = match tls.filter(|tls| tls.settings().metrics) {
        None => tokio::spawn(stoker::metrics::serve(listener, text, stopped)),
        Some(tls) => {
            // The acceptor ends with the listener's task; its shutdown signal never fires.
            let (_never, no_shutdown) = tokio::sync::watch::channel(false);
            let listener = TlsListener::metrics(listener, tls, no_shutdown)
                .context("no local address for the standby metrics endpoint")?;
            tokio::spawn(stoker::metrics::serve(listener, text, stopped))
        }
    };
    Ok(StandbyMetrics { stop, task })
}

/// The TLS of `stoker serve --tls-cert … --tls-key …`, loaded now so that unusable files stop
/// stoker at start.
fn server_tls(args: &ServeArgs) -> anyhow::Result<Option<Arc<ServerTls>>> {
    let tls = &args.tls;
    let (Some(cert), Some(key)) = (&tls.tls_cert, &tls.tls_key) else {
        return Ok(None);
    };
    if tls.tls_reload_interval == 0 {
        bail!("--tls-reload-interval must be positive");
    }
    let settings = TlsSettings {
        cert: cert.clone(),
        key: key.clone(),
        client_ca: tls.tls_client_ca.clone(),
        reload_interval: std::time::Duration::from_millis(tls.tls_reload_interval),
        metrics: tls.metrics_tls,
    };
    let loaded = ServerTls::start(settings)
        .context("cannot use --tls-cert, --tls-key and --tls-client-ca")?;
    Ok(Some(loaded))
}

impl StandbyMetrics {
    /// Frees the port for the leader's own metrics endpoint.
    async fn stop(self) {
        let _ = self.stop.send(());
        if let Ok(Err(err)) = self.task.await {
            error!(error = %err, "standby metrics endpoint failed");
        }
    }
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = int.recv() => info!("SIGINT received"),
    }
    Ok(())
}

fn local_config(args: &ServeArgs) -> anyhow::Result<LocalConfig> {
    if args.limits.allowed_namespace_selector.is_some()
        || !args.limits.allowed_namespaces.is_empty()
    {
        anyhow::bail!(
            "--allowed-namespaces and --allowed-namespace-selector need --backend kubernetes: \
             the local backend has no namespaces"
        );
    }
    let spark_home = match &args.spark_home {
        Some(path) => path.clone(),
        None => default_spark_home().context(
            "no Spark installation found: pass --spark-home (or STOKER_SPARK_HOME), or run the \
             project's set-up (scripts/setup.sh) that installs pyspark",
        )?,
    };
    let java = match &args.java {
        Some(java) => java.clone(),
        None => match std::env::var_os("JAVA_HOME") {
            Some(home) => PathBuf::from(home).join("bin/java"),
            None => PathBuf::from("java"),
        },
    };
    // /proc/self/exe, not the path: in the forked child it is still this binary even when the
    // file has been replaced (rebuilt, upgraded) since stoker started.
    std::fs::metadata("/proc/self/exe").context("cannot find the stoker executable")?;
    let wrapper = vec![
        "/proc/self/exe".to_owned(),
        "exec-guard".to_owned(),
        "--parent".to_owned(),
        std::process::id().to_string(),
        "--".to_owned(),
    ];
    Ok(LocalConfig {
        spark_home,
        java,
        work_dir: args.work_dir.clone(),
        hosts: args.executor_host.clone(),
        wrapper,
    })
}

/// The pyspark package of the project's set-up, else the one `python3` imports.
fn default_spark_home() -> Option<PathBuf> {
    let cache = std::env::var_os("STOKER_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/stoker")))?;
    let venv_lib = cache
        .join(format!("venv-pyspark-{SPARK_VERSION}"))
        .join("lib");
    if let Ok(entries) = std::fs::read_dir(&venv_lib) {
        for entry in entries.flatten() {
            let candidate = entry.path().join("site-packages/pyspark");
            if candidate.join("jars").is_dir() {
                return Some(candidate);
            }
        }
    }
    let output = std::process::Command::new("python3")
        .args([
            "-c",
            "import os, pyspark; print(os.path.dirname(pyspark.__file__))",
        ])
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    let path = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    path.join("jars").is_dir().then_some(path)
}
