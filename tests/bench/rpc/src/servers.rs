//! The two servers under test: stoker's real server with a null backend, and the ceiling, a
//! minimal tonic server of the same service whose handlers answer a default response at once.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use stoker::config::Limits;
use stoker::proto::v1 as pb;
use stoker::proto::v1::executor_allocator_server::{ExecutorAllocator, ExecutorAllocatorServer};
use stoker::server::{self, Running, Settings};
use stoker_core::{
    AppId, BackendObservation, EngineConfig, ExecutorBackend, ExecutorId, ExitReason,
    LaunchRequest, Millis, Observation, ObservationSink,
};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

/// The admin token of the benchmarked stoker server.
pub const ADMIN_TOKEN: &str = "stoker-bench-admin-token-0123456789abcdef";

/// A backend with no executors behind it: every launch is reported Accepted and then Running,
/// every terminate Exited, at once, through the observation sink.
struct NullBackend {
    sink: ObservationSink,
}

impl NullBackend {
    fn emit(&self, app_id: &AppId, executor_id: ExecutorId, observation: Observation) {
        (self.sink)(BackendObservation {
            app_id: app_id.clone(),
            executor_id,
            observation,
        });
    }
}

impl ExecutorBackend for NullBackend {
    fn name(&self) -> &'static str {
        "null"
    }

    fn launch(&self, request: LaunchRequest) {
        let backend_name = format!("null-{}", request.executor_id);
        self.emit(
            &request.app_id,
            request.executor_id,
            Observation::Accepted {
                backend_name: backend_name.clone(),
            },
        );
        self.emit(
            &request.app_id,
            request.executor_id,
            Observation::Running {
                host: "127.0.0.1".into(),
                backend_name,
            },
        );
    }

    fn terminate(&self, app_id: &AppId, executor_id: ExecutorId, _grace: Millis) {
        self.emit(
            app_id,
            executor_id,
            Observation::Exited {
                code: Some(143),
                reason: ExitReason::Signaled,
                message: String::new(),
            },
        );
    }
}

/// Starts stoker's real server on 127.0.0.1 (any port) with the null backend.
pub async fn start_stoker() -> anyhow::Result<Running> {
    let settings = Settings {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        metrics_listen: None,
        engine: EngineConfig {
            // Longer than any run: the throughput loops over RequestTotalExecutors send no
            // heartbeat, and an expired lease would end the application mid-run.
            lease_ttl: 3_600_000,
            ..EngineConfig::default()
        },
        limits: Limits::default(),
        admin_token: ADMIN_TOKEN.into(),
        incarnation: "stoker-bench".into(),
        tls: None,
        namespace_selector: None,
        queues: None,
    };
    server::start(settings, |sink| {
        Ok(Arc::new(NullBackend { sink }) as Arc<dyn ExecutorBackend>)
    })
    .await
    .context("cannot start the stoker server")
}

/// Handlers that return a default response at once: what tonic alone costs on this machine, with
/// tonic's default socket options.
struct Ceiling;

#[tonic::async_trait]
impl ExecutorAllocator for Ceiling {
    async fn register_application(
        &self,
        _request: Request<pb::RegisterApplicationRequest>,
    ) -> Result<Response<pb::RegisterApplicationResponse>, Status> {
        Ok(Response::new(pb::RegisterApplicationResponse::default()))
    }

    async fn request_total_executors(
        &self,
        _request: Request<pb::RequestTotalExecutorsRequest>,
    ) -> Result<Response<pb::RequestTotalExecutorsResponse>, Status> {
        Ok(Response::new(pb::RequestTotalExecutorsResponse::default()))
    }

    async fn kill_executors(
        &self,
        _request: Request<pb::KillExecutorsRequest>,
    ) -> Result<Response<pb::KillExecutorsResponse>, Status> {
        Ok(Response::new(pb::KillExecutorsResponse::default()))
    }

    async fn decommission_executors(
        &self,
        _request: Request<pb::DecommissionExecutorsRequest>,
    ) -> Result<Response<pb::DecommissionExecutorsResponse>, Status> {
        Ok(Response::new(pb::DecommissionExecutorsResponse::default()))
    }

    type WatchExecutorsStream = tokio_stream::Empty<Result<pb::WatchEvent, Status>>;

    async fn watch_executors(
        &self,
        _request: Request<pb::WatchExecutorsRequest>,
    ) -> Result<Response<Self::WatchExecutorsStream>, Status> {
        Ok(Response::new(tokio_stream::empty()))
    }

    async fn heartbeat(
        &self,
        _request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        Ok(Response::new(pb::HeartbeatResponse::default()))
    }

    async fn unregister_application(
        &self,
        _request: Request<pb::UnregisterApplicationRequest>,
    ) -> Result<Response<pb::UnregisterApplicationResponse>, Status> {
        Ok(Response::new(pb::UnregisterApplicationResponse::default()))
    }

    async fn get_application(
        &self,
        _request: Request<pb::GetApplicationRequest>,
    ) -> Result<Response<pb::ApplicationInfo>, Status> {
        Ok(Response::new(pb::ApplicationInfo::default()))
    }

    async fn list_applications(
        &self,
        _request: Request<pb::ListApplicationsRequest>,
    ) -> Result<Response<pb::ListApplicationsResponse>, Status> {
        Ok(Response::new(pb::ListApplicationsResponse::default()))
    }

    async fn list_queues(
        &self,
        _request: Request<pb::ListQueuesRequest>,
    ) -> Result<Response<pb::ListQueuesResponse>, Status> {
        Ok(Response::new(pb::ListQueuesResponse::default()))
    }
}

/// The running ceiling server.
pub struct CeilingServer {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl CeilingServer {
    /// Starts it on 127.0.0.1 (any port).
    pub async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .context("cannot listen for the ceiling server")?;
        let addr = listener.local_addr().context("no local address")?;
        // TCP_NODELAY on every accepted connection, as `Server::serve` would set it (the
        // builder's `tcp_nodelay` is ignored by `serve_with_incoming*`).
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(ExecutorAllocatorServer::new(Ceiling))
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stopped.await;
                }),
        );
        Ok(Self { addr, stop, task })
    }

    /// Stops it and waits for it.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.task
            .await
            .context("ceiling server task failed")?
            .context("ceiling server failed")
    }
}
