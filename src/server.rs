//! Wiring: the gRPC server (stoker's service, health, reflection as `v1` and `v1alpha`), the
//! metrics endpoint, and the route from backend observations to application actors.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use anyhow::Context;
use stoker_core::{BackendObservation, EngineConfig, ExecutorBackend, ObservationSink};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tracing::info;

use crate::api::Service;
use crate::app::Apps;
use crate::clock::Clock;
use crate::config::Limits;
use crate::metrics::{Metrics, StateLabel};
use crate::proto::v1::executor_allocator_server::ExecutorAllocatorServer;
use crate::proto::FILE_DESCRIPTOR_SET;
use crate::queues::Queues;
use crate::tls::{ServerTls, TlsListener};

/// What the server needs besides a backend.
#[derive(Clone, Debug)]
pub struct Settings {
    /// gRPC address (port 0 for any).
    pub listen: SocketAddr,
    /// Metrics address, if metrics are served.
    pub metrics_listen: Option<SocketAddr>,
    /// Engine policy defaults.
    pub engine: EngineConfig,
    /// Request limits.
    pub limits: Limits,
    /// Admin token.
    pub admin_token: String,
    /// This run's identity, reported to drivers.
    pub incarnation: String,
    /// TLS on the gRPC port (and the metrics endpoint, if its settings say so); none:
    /// plaintext.
    pub tls: Option<Arc<ServerTls>>,
    /// `--allowed-namespace-selector`, checked with the API server (Kubernetes backend only).
    pub namespace_selector: Option<Arc<stoker_k8s::namespaces::NamespaceSelector>>,
    /// Fair share across applications (`--queues`); none: every request is admitted.
    pub queues: Option<crate::queues::QueueSettings>,
}

/// A running server.
pub struct Running {
    /// Where gRPC listens.
    pub grpc_addr: SocketAddr,
    /// Where metrics are served.
    pub metrics_addr: Option<SocketAddr>,
    /// The applications.
    pub apps: Arc<Apps>,
    shutdown: watch::Sender<bool>,
    grpc: JoinHandle<Result<(), tonic::transport::Error>>,
    metrics: Option<JoinHandle<std::io::Result<()>>>,
}

impl Running {
    /// Stops accepting requests, ends event streams and waits for the servers to stop.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(true);
        self.grpc
            .await
            .context("gRPC server task failed")?
            .context("gRPC server failed")?;
        if let Some(metrics) = self.metrics {
            metrics
                .await
                .context("metrics server task failed")?
                .context("metrics server failed")?;
        }
        Ok(())
    }
}

/// Starts the server with the backend that `make_backend` builds around the observation sink,
/// without caller authentication (`--auth none`).
pub async fn start(
    settings: Settings,
    make_backend: impl FnOnce(ObservationSink) -> anyhow::Result<Arc<dyn ExecutorBackend>>,
) -> anyhow::Result<Running> {
    start_with_auth(settings, Arc::new(crate::auth::NoAuth), make_backend).await
}

/// [`start`], with callers identified by `auth`.
pub async fn start_with_auth(
    settings: Settings,
    auth: Arc<dyn crate::auth::Authenticator>,
    make_backend: impl FnOnce(ObservationSink) -> anyhow::Result<Arc<dyn ExecutorBackend>>,
) -> anyhow::Result<Running> {
    let apps_cell: Arc<OnceLock<Weak<Apps>>> = Arc::new(OnceLock::new());
    let sink_cell = Arc::clone(&apps_cell);
    let sink: ObservationSink = Arc::new(move |observation: BackendObservation| {
        if let Some(apps) = sink_cell.get().and_then(Weak::upgrade) {
            apps.route(observation);
        }
    });
    let backend = make_backend(sink)?;
    let metrics = match &settings.tls {
        Some(tls) => Metrics::new().with_tls_reloads(tls.reloads()),
        None => Metrics::new(),
    };
    let metrics = Arc::new(metrics);
    // A queue file that cannot be used stops stoker here, naming its line.
    let queues = match &settings.queues {
        Some(queue_settings) => Some(Arc::new(
            Queues::load(queue_settings.clone(), Arc::clone(&metrics)).context("--queues")?,
        )),
        None => None,
    };
    let apps = Arc::new(
        Apps::new(
            backend,
            Clock::new(),
            Arc::clone(&metrics),
            &settings.limits,
        )
        .with_queues(queues.clone()),
    );
    let _ = apps_cell.set(Arc::downgrade(&apps));

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    if let Some(queues) = &queues {
        tokio::spawn(crate::queues::reload_loop(
            Arc::downgrade(queues),
            shutdown_rx.clone(),
        ));
        tokio::spawn(crate::queues::allocate_loop(
            Arc::downgrade(&apps),
            Arc::clone(queues),
            shutdown_rx.clone(),
        ));
    }
    let service = Service::new(
        Arc::clone(&apps),
        settings.limits.clone(),
        settings.engine.clone(),
        settings.incarnation.clone(),
        settings.admin_token.clone(),
        shutdown_rx.clone(),
    )
    .with_auth(auth)
    .with_namespace_selector(settings.namespace_selector.clone());

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<ExecutorAllocatorServer<Service>>()
        .await;
    // Both versions: grpcurl and newer clients speak v1, others (Python's grpcio-reflection)
    // only v1alpha and would get UNIMPLEMENTED.
    let reflection_v1 = reflection()
        .build_v1()
        .context("cannot build the reflection service (v1)")?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .context("cannot build the reflection service (v1alpha)")?;

    let listener = TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("cannot listen for gRPC on {}", settings.listen))?;
    let grpc_addr = listener.local_addr().context("no local address")?;
    let mut grpc_shutdown = shutdown_rx.clone();
    let reporter = health_reporter.clone();
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        // Without it tonic announces no SETTINGS_MAX_CONCURRENT_STREAMS: unbounded streams
        // (and handler tasks) per connection.
        .max_concurrent_streams(Some(settings.limits.max_streams_per_connection))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(ExecutorAllocatorServer::new(service));
    let grpc_stopped = async move {
        let _ = grpc_shutdown.wait_for(|stop| *stop).await;
        reporter
            .set_not_serving::<ExecutorAllocatorServer<Service>>()
            .await;
    };
    let grpc = match &settings.tls {
        None => {
            // TCP_NODELAY (crate::tls::accept sets it too): replies come from the application's
            // actor task and can leave in two writes; with Nagle's algorithm the second waits
            // for the client's delayed ACK (~40 ms), which made one call in ten on a driver's
            // connection take 44 ms (found by the stoker-bench benchmark).
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            tokio::spawn(server.serve_with_incoming_shutdown(incoming, grpc_stopped))
        }
        Some(tls) => {
            // Our own acceptor rather than tonic's `tls_config`: it takes the configuration
            // in use at each connection, so that rotated certificates are served (crate::tls).
            let tls = Arc::clone(tls);
            let connections =
                crate::tls::accept(listener, move || tls.grpc_config(), shutdown_rx.clone());
            let incoming = tokio_stream::wrappers::ReceiverStream::new(connections)
                .map(|(stream, _peer)| Ok::<_, std::io::Error>(stream));
            tokio::spawn(server.serve_with_incoming_shutdown(incoming, grpc_stopped))
        }
    };
    info!(addr = %grpc_addr, incarnation = %settings.incarnation, tls = settings.tls.is_some(),
        "gRPC listening");

    let (metrics_addr, metrics_task) = match settings.metrics_listen {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for metrics on {addr}"))?;
            let bound = listener.local_addr().context("no local address")?;
            let refresh_apps = Arc::downgrade(&apps);
            let refresh: Arc<dyn Fn() -> String + Send + Sync> = Arc::new(move || {
                let Some(apps) = refresh_apps.upgrade() else {
                    return String::new();
                };
                refresh_gauges(&apps);
                apps.metrics.encode()
            });
            let mut stop = shutdown_rx.clone();
            let stopped = async move {
                let _ = stop.wait_for(|stop| *stop).await;
            };
            let metrics_tls = settings.tls.as_ref().filter(|tls| tls.settings().metrics);
            let task = match metrics_tls {
                None => tokio::spawn(crate::metrics::serve(listener, refresh, stopped)),
                Some(tls) => {
                    let listener =
                        TlsListener::metrics(listener, Arc::clone(tls), shutdown_rx.clone())
                            .context("no local address")?;
                    tokio::spawn(crate::metrics::serve(listener, refresh, stopped))
                }
            };
            info!(addr = %bound, tls = metrics_tls.is_some(), "metrics listening on /metrics");
            (Some(bound), Some(task))
        }
        None => (None, None),
    };

    Ok(Running {
        grpc_addr,
        metrics_addr,
        apps,
        shutdown: shutdown_tx,
        grpc,
        metrics: metrics_task,
    })
}

/// A reflection builder that knows every service on the port, both reflection versions among
/// them, so that either version lists them all.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
        .include_reflection_service(false)
}

fn refresh_gauges(apps: &Apps) {
    let (mut pending, mut running, mut deleting) = (0i64, 0i64, 0i64);
    let mut count = 0i64;
    for entry in apps.registry.iter() {
        let summary = entry.value().summary.borrow();
        pending += i64::from(summary.pending);
        running += i64::from(summary.running);
        deleting += i64::from(summary.deleting);
        count += 1;
    }
    apps.metrics.applications.set(count);
    for (state, value) in [
        ("pending", pending),
        ("running", running),
        ("deleting", deleting),
    ] {
        apps.metrics
            .executors
            .get_or_create(&StateLabel {
                state: state.to_owned(),
            })
            .set(value);
    }
}
