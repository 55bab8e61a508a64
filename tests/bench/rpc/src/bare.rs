//! The physical limit of pod creation on a test bed (issue 13's ramp-up ceiling): a bare client,
//! the same `kube` client stoker uses but with nothing of stoker's around it (no rate limiter,
//! no index, no per-application turns), creates `count` copies of one pod with `concurrency`
//! requests in flight, as fast as the API server takes them. `bench_k8s.py` runs it beside
//! stoker's and Spark's ramps and times the pods on the same watch.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
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

/// Creates `count` pods named `<prefix>-<i>` from the pod in `pod_json` (KUBECONFIG's cluster);
/// prints one JSON line: created, seconds, retries.
pub async fn run(
    pod_json: &str,
    namespace: &str,
    prefix: &str,
    count: usize,
    concurrency: usize,
    connection: Connection,
    connections: usize,
) -> anyhow::Result<()> {
    let template: Pod = serde_json::from_str(pod_json).context("the pod JSON is not a v1 Pod")?;
    let clients = match connection {
        Connection::Kube => Clients::from_clients(vec![Client::try_default()
            .await
            .context("cannot build a Kubernetes client from KUBECONFIG")?]),
        Connection::Stoker => {
            let config = kube::Config::infer()
                .await
                .context("cannot read KUBECONFIG")?;
            Clients::new(&config, connections).context("cannot build stoker's Kubernetes client")?
        }
    };
    let slots = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut tasks = JoinSet::new();
    let started = Instant::now();
    for i in 0..count {
        let permit = Arc::clone(&slots).acquire_owned().await?;
        let mut pod = template.clone();
        pod.metadata.name = Some(format!("{prefix}-{i}"));
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
    println!(
        "{}",
        serde_json::json!({"created": count, "seconds": seconds, "retries": retries,
                           "concurrency": concurrency, "client": format!("{connection:?}"),
                           "connections": clients.len()})
    );
    Ok(())
}
