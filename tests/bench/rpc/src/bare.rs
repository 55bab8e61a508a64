//! The physical limit of pod creation on a test bed (issue 13's ramp-up ceiling): a bare client,
//! the same `kube` client stoker uses but with nothing of stoker's around it (no rate limiter,
//! no index, no per-application turns), creates `count` copies of one pod with `concurrency`
//! requests in flight, as fast as the API server takes them. `bench_k8s.py` runs it beside
//! stoker's and Spark's ramps and times the pods on the same watch.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use kube::runtime::watcher::DefaultBackoff;
use kube::{Api, Client};
use stoker_k8s::client::Clients;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// Attempts per pod when the API server answers 429 or 5xx (a bare client still has to be
/// polite enough to finish).
const ATTEMPTS: u32 = 5;

/// The client a bare run creates its pods through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Connection {
    /// stoker's own clients (`stoker_k8s::client::Clients`): HTTP/2 by ALPN, `--connections`
    /// connections taken in turn.
    Stoker,
    /// kube's default client: HTTP/1.1, one connection per request in flight.
    Kube,
}

/// What `bare-create` is told.
#[derive(Debug, clap::Args)]
pub struct Options {
    /// File with the pod as JSON (a v1 Pod; its name is replaced).
    #[arg(long)]
    pub pod: PathBuf,
    /// Namespace to create the pods in.
    #[arg(long)]
    pub namespace: String,
    /// Pod names are PREFIX-0, PREFIX-1, ...
    #[arg(long, default_value = "bare")]
    pub prefix: String,
    /// How many pods.
    #[arg(long)]
    pub count: usize,
    /// Creates in flight.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Which client: `stoker` (stoker's own: HTTP/2, `--connections` connections) or `kube`
    /// (kube's default: HTTP/1.1, a connection per request in flight).
    #[arg(long, value_enum, default_value_t = Connection::Stoker)]
    pub client: Connection,
    /// With `--client stoker`: connections the creates are spread over (stoker's
    /// --kube-write-connections).
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Also watch the created pods (by the pod's labels) on a connection of its own while
    /// creating, as a controller such as stoker does.
    #[arg(long)]
    pub watch: bool,
}

/// Creates `count` pods named `<prefix>-<i>` from the pod in `pod_json` (KUBECONFIG's cluster);
/// prints one JSON line: created, seconds, retries.
pub async fn run(pod_json: &str, options: &Options) -> anyhow::Result<()> {
    let namespace = options.namespace.as_str();
    let template: Pod = serde_json::from_str(pod_json).context("the pod JSON is not a v1 Pod")?;
    let config = kube::Config::infer()
        .await
        .context("cannot read KUBECONFIG")?;
    // A controller's load beside the creates: one watch of the pods it creates, on a connection
    // of its own, as stoker watches its executor pods (its events are read and dropped).
    let watcher = if options.watch {
        let client =
            stoker_k8s::client(config.clone()).context("cannot build the watch's client")?;
        let api: Api<Pod> = Api::namespaced(client, namespace);
        let labels = template
            .metadata
            .labels
            .iter()
            .flatten()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let stream = kube::runtime::watcher(
            api,
            kube::runtime::watcher::Config::default().labels(&labels),
        );
        Some(tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while stream.next().await.is_some() {}
        }))
    } else {
        None
    };
    let clients =
        match options.client {
            Connection::Kube => Clients::from_clients(vec![Client::try_from(config)
                .context("cannot build a Kubernetes client from KUBECONFIG")?]),
            Connection::Stoker => Clients::new(&config, options.connections)
                .context("cannot build stoker's Kubernetes client")?,
        };
    let slots = Arc::new(Semaphore::new(options.concurrency.max(1)));
    let mut tasks = JoinSet::new();
    let started = Instant::now();
    for i in 0..options.count {
        let permit = Arc::clone(&slots).acquire_owned().await?;
        let mut pod = template.clone();
        pod.metadata.name = Some(format!("{}-{i}", options.prefix));
        let api: Api<Pod> = Api::namespaced(clients.pick(), namespace);
        tasks.spawn(async move {
            let _slot = permit;
            let mut retries = 0u32;
            // kube-runtime's jittered backoff, as stoker's own writer uses.
            let mut backoff = DefaultBackoff::default();
            loop {
                match api.create(&PostParams::default(), &pod).await {
                    Ok(_) => break Ok(retries),
                    Err(kube::Error::Api(s))
                        if (s.code == 429 || s.code >= 500) && retries + 1 < ATTEMPTS =>
                    {
                        retries += 1;
                        let delay = backoff.next().unwrap_or(std::time::Duration::from_secs(1));
                        tokio::time::sleep(delay).await;
                    }
                    Err(err) => break Err(err),
                }
            }
        });
    }
    let mut retries = 0u32;
    while let Some(done) = tasks.join_next().await {
        retries += done
            .context("a create task panicked")?
            .context("a pod create failed")?;
    }
    let seconds = started.elapsed().as_secs_f64();
    // The pods' later events (scheduled, running) go on after the creates; the figure is the
    // creation rate, so the watch stops here.
    if let Some(task) = watcher {
        task.abort();
    }
    println!(
        "{}",
        serde_json::json!({"created": options.count, "seconds": seconds, "retries": retries,
                           "concurrency": options.concurrency, "client": format!("{:?}", options.client),
                           "connections": clients.len(), "watch": options.watch})
    );
    Ok(())
}
