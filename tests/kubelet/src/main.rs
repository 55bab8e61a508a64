//! `process-kubelet`: the test bed's kubelet. It registers Node objects on a real API server,
//! keeps them Ready (status and Lease), and runs the containers of every pod bound to them as
//! local processes (or, with `--mode no-process`, just reports them Running). See
//! tests/testbed/README.md.

mod hosts;
mod mounts;
mod node;
mod pod;
mod process;
mod spec;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tracing::{error, info};

/// Label on the Node objects of one kubelet run.
pub const LABEL_KUBELET: &str = "testbed.stoker.dev/kubelet";
/// Node annotation `"true"`: the node is lost (stops reporting, its containers die).
pub const LOST_ANNOTATION: &str = "testbed.stoker.dev/lost";
/// Pod annotation: `oom`, `kill`, `exit:<code>` or `evict`, applied once per value.
pub const FAULT_ANNOTATION: &str = "testbed.stoker.dev/fault";

#[derive(Parser)]
#[command(
    name = "process-kubelet",
    about = "Test-bed kubelet: pods as local processes"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// (internal) Tie a container process to the kubelet's life, then exec it.
    #[command(hide = true)]
    ExecGuard {
        #[arg(long)]
        parent: i32,
        #[arg(last = true)]
        command: Vec<String>,
    },
}

/// Whether containers become processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Containers run as local processes.
    Process,
    /// No processes: pods go Running at once (scale tests).
    NoProcess,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Node name; with --nodes N > 1 the nodes are <name>-0 … <name>-(N-1).
    #[arg(long, default_value = "testbed-node")]
    node_name: String,
    /// How many nodes to register.
    #[arg(long, default_value_t = 1)]
    nodes: u32,
    /// CPU capacity of each node.
    #[arg(long, default_value = "32")]
    cpu: String,
    /// Memory capacity of each node.
    #[arg(long, default_value = "128Gi")]
    memory: String,
    /// Pod capacity of each node.
    #[arg(long, default_value_t = 250)]
    max_pods: u32,
    #[arg(long, value_enum, default_value_t = Mode::Process)]
    mode: Mode,
    /// Local Spark installation standing in for /opt/spark of the apache/spark image.
    #[arg(long, env = "SPARK_HOME")]
    spark_home: Option<PathBuf>,
    /// Folder for pod folders (volumes, logs).
    #[arg(long, default_value = "/tmp/process-kubelet")]
    work_dir: PathBuf,
    /// Memory limits are checked this often (milliseconds).
    #[arg(long, default_value_t = 500)]
    oom_check_ms: u64,
    /// API calls for pod status in flight at once.
    #[arg(long, default_value_t = 32)]
    api_concurrency: usize,
    /// Delete this kubelet's Node objects on exit.
    #[arg(long)]
    delete_nodes_on_exit: bool,
    /// How long a pod's persistentVolumeClaim may take to be Bound before its containers fail
    /// with CreateContainerConfigError (seconds).
    #[arg(long, default_value_t = 60)]
    claim_wait_secs: u64,
    /// Give each pod a host name of its own, `<pod>.<namespace>.pod`: written as
    /// `127.0.0.1 <name>` to this hosts file (made with this machine's entries when missing;
    /// kubelets may share it) before the pod's containers start. An `apache/spark` executor then
    /// advertises the name (`--hostname`), binds 127.0.0.1 (`--bind-address`) and resolves
    /// names with the file (`-Djdk.net.hosts.file`, which replaces /etc/hosts and DNS for the
    /// JVM; give a driver the same). The pod's IP stays 127.0.0.1.
    #[arg(long)]
    pod_hosts_file: Option<PathBuf>,
}

/// Node capacity as reported.
pub struct Capacity {
    cpu: String,
    memory: String,
    pods: u32,
}

/// MicroTime (microsecond precision), as Leases need it.
pub fn micro_now() -> String {
    chrono::Utc::now()
        .format("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string()
}

/// State every task shares.
pub struct Shared {
    client: kube::Client,
    nodes: Vec<String>,
    kubelet_id: String,
    started_at: String,
    capacity: Capacity,
    mode: Mode,
    host: spec::Host,
    work_dir: PathBuf,
    base_env: BTreeMap<String, String>,
    api_limit: tokio::sync::Semaphore,
    oom_check: Duration,
    /// How long to wait for a persistentVolumeClaim to be Bound.
    claim_wait: Duration,
    /// `--pod-hosts-file`: every pod gets a host name of its own there.
    pod_hosts: Option<hosts::PodHosts>,
    lost: tokio::sync::watch::Sender<BTreeSet<String>>,
}

/// RFC 3339 time with second precision, as Kubernetes writes it.
pub fn now() -> String {
    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Cmd::ExecGuard { parent, command }) = cli.command {
        return exec_guard(parent, &command);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(err) => {
            eprintln!("process-kubelet: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.run)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            error!("{err:#}");
            eprintln!("process-kubelet: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let config = kube::Config::infer()
        .await
        .context("no Kubernetes client configuration (set KUBECONFIG)")?;
    let api_host = config.cluster_url.host().unwrap_or("127.0.0.1").to_string();
    let api_port = config.cluster_url.port_u16().unwrap_or(443);
    let client = kube::Client::try_from(config).context("cannot build the Kubernetes client")?;
    let nodes: Vec<String> = if args.nodes <= 1 {
        vec![args.node_name.clone()]
    } else {
        (0..args.nodes)
            .map(|i| format!("{}-{i}", args.node_name))
            .collect()
    };
    let spark_home = match (&args.spark_home, args.mode) {
        (Some(p), _) => p.clone(),
        (None, Mode::NoProcess) => PathBuf::from("/opt/spark"),
        (None, Mode::Process) => {
            anyhow::bail!("--spark-home (or SPARK_HOME) is needed to run apache/spark executors")
        }
    };
    let java_home = std::env::var("JAVA_HOME").ok();
    let java = java_home
        .as_ref()
        .map(|h| format!("{h}/bin/java"))
        .unwrap_or_else(|| "java".to_string());
    let mut base_env = BTreeMap::new();
    base_env.insert(
        "PATH".to_string(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
    );
    if let Some(h) = &java_home {
        base_env.insert("JAVA_HOME".to_string(), h.clone());
    }
    // What the kubelet injects for the `kubernetes` Service, so in-cluster clients find the API.
    base_env.insert("KUBERNETES_SERVICE_HOST".into(), api_host);
    base_env.insert("KUBERNETES_SERVICE_PORT".into(), api_port.to_string());
    base_env.insert("KUBERNETES_SERVICE_PORT_HTTPS".into(), api_port.to_string());
    std::fs::create_dir_all(&args.work_dir)
        .with_context(|| format!("cannot create {}", args.work_dir.display()))?;
    base_env.insert("HOME".into(), args.work_dir.display().to_string());
    let pod_hosts = match &args.pod_hosts_file {
        Some(path) => Some(
            hosts::PodHosts::open(path)
                .with_context(|| format!("cannot create the pod hosts file {}", path.display()))?,
        ),
        None => None,
    };
    let kubelet_id = format!("{}-{}", args.node_name, std::process::id());
    let (lost, _) = tokio::sync::watch::channel(BTreeSet::new());
    let shared = Arc::new(Shared {
        client,
        nodes,
        kubelet_id,
        started_at: now(),
        capacity: Capacity {
            cpu: args.cpu,
            memory: args.memory,
            pods: args.max_pods,
        },
        mode: args.mode,
        host: spec::Host { spark_home, java },
        work_dir: args.work_dir,
        base_env,
        api_limit: tokio::sync::Semaphore::new(args.api_concurrency.max(1)),
        oom_check: Duration::from_millis(args.oom_check_ms.max(50)),
        claim_wait: Duration::from_secs(args.claim_wait_secs),
        pod_hosts,
        lost,
    });
    node::register(&shared)
        .await
        .context("cannot register the nodes")?;
    info!(nodes = ?shared.nodes, mode = ?shared.mode,
          pod_hosts = ?shared.pod_hosts.as_ref().map(hosts::PodHosts::path), "process kubelet ready");
    let heartbeat = tokio::spawn(node::heartbeat(shared.clone()));
    let faults = tokio::spawn(node::watch_faults(shared.clone()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let pods = tokio::spawn(pod::run(shared.clone(), stop_rx));
    wait_for_signal().await;
    info!("signal received; stopping");
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), pods).await;
    heartbeat.abort();
    faults.abort();
    if args.delete_nodes_on_exit {
        let api: kube::Api<k8s_openapi::api::core::v1::Node> =
            kube::Api::all(shared.client.clone());
        for n in &shared.nodes {
            let _ = api.delete(n, &Default::default()).await;
        }
    }
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Arms SIGKILL on the kubelet's death, then becomes the container command.
fn exec_guard(parent: i32, command: &[String]) -> ExitCode {
    use nix::sys::signal::Signal;
    if let Err(err) = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL) {
        eprintln!("exec-guard: cannot set the parent-death signal: {err}");
        return ExitCode::from(126);
    }
    if nix::unistd::getppid().as_raw() != parent {
        eprintln!("exec-guard: the kubelet (pid {parent}) is gone; not starting");
        return ExitCode::from(125);
    }
    let Some((program, args)) = command.split_first() else {
        eprintln!("exec-guard: no command given");
        return ExitCode::from(2);
    };
    let err = std::process::Command::new(program).args(args).exec();
    eprintln!("exec-guard: cannot run {program}: {err}");
    ExitCode::from(127)
}
