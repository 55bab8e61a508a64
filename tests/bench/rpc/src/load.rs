//! The client side: registering applications and the timed loops of one RPC from many clients.

use std::time::{Duration, Instant};

use anyhow::Context;
use stoker::proto::v1 as pb;
use stoker::proto::v1::executor_allocator_client::ExecutorAllocatorClient;
use tonic::transport::Channel;

/// A gRPC client of the service.
pub type Client = ExecutorAllocatorClient<Channel>;

/// Upper bound on calls by one client in one run, so that every loop ends even if the clock
/// misbehaves.
const MAX_CALLS_PER_CLIENT: u64 = 50_000_000;

/// Totals that the RequestTotalExecutors loop cycles through.
const MAX_TOTAL: u64 = 50;

/// The RPCs that are measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rpc {
    /// `RequestTotalExecutors` with totals cycling through 0..=50.
    RequestTotalExecutors,
    /// `Heartbeat`.
    Heartbeat,
}

impl Rpc {
    /// The RPC's name in the protocol.
    pub fn name(self) -> &'static str {
        match self {
            Self::RequestTotalExecutors => "RequestTotalExecutors",
            Self::Heartbeat => "Heartbeat",
        }
    }
}

/// An application a client speaks for.
#[derive(Clone, Debug)]
pub struct AppRef {
    /// Its id.
    pub app_id: String,
    /// Its token (empty against the ceiling, which checks nothing).
    pub token: String,
}

/// Opens a new connection (one per client, as separate drivers would).
pub async fn connect(addr: std::net::SocketAddr) -> anyhow::Result<Client> {
    ExecutorAllocatorClient::connect(format!("http://{addr}"))
        .await
        .with_context(|| format!("cannot connect to {addr}"))
}

/// A template like the Spark plugin's: one default profile.
pub fn template() -> pb::ExecutorTemplate {
    pb::ExecutorTemplate {
        driver_url: "spark://CoarseGrainedScheduler@127.0.0.1:40000".into(),
        spark_version: "4.2.0".into(),
        spark_user: "bench".into(),
        profiles: vec![pb::ResourceProfile {
            id: 0,
            cores: 1,
            heap_mib: 1024,
            overhead_mib: 384,
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Registers an application and returns its reference.
pub async fn register(client: &mut Client, app_id: &str) -> anyhow::Result<AppRef> {
    let response = client
        .register_application(pb::RegisterApplicationRequest {
            app_id: app_id.into(),
            app_name: "stoker-bench".into(),
            template: Some(template()),
            ..Default::default()
        })
        .await
        .with_context(|| format!("cannot register {app_id}"))?
        .into_inner();
    Ok(AppRef {
        app_id: app_id.into(),
        token: response.token,
    })
}

/// Sets an application's total of the default profile.
pub async fn request_total(
    client: &mut Client,
    app: &AppRef,
    total: i64,
) -> Result<(), tonic::Status> {
    client
        .request_total_executors(pb::RequestTotalExecutorsRequest {
            app_id: app.app_id.clone(),
            token: app.token.clone(),
            targets: vec![pb::ProfileTarget {
                resource_profile_id: 0,
                total,
            }],
        })
        .await
        .map(|_| ())
}

/// Renews an application's lease.
pub async fn heartbeat(
    client: &mut Client,
    app: &AppRef,
    acked_seq: u64,
) -> Result<(), tonic::Status> {
    client
        .heartbeat(pb::HeartbeatRequest {
            app_id: app.app_id.clone(),
            token: app.token.clone(),
            acked_seq,
        })
        .await
        .map(|_| ())
}

/// What one timed run of one RPC from every client gave.
#[derive(Debug)]
pub struct RunResult {
    /// Calls that succeeded.
    pub calls: u64,
    /// Calls that failed.
    pub errors: u64,
    /// From the common start to the end of the last client.
    pub elapsed: Duration,
    /// Latency of every successful call, sorted, in nanoseconds.
    pub latencies_ns: Vec<u64>,
    /// The first error, if any.
    pub first_error: Option<String>,
}

impl RunResult {
    /// Successful calls per second.
    pub fn calls_per_s(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.calls as f64 / secs
        } else {
            0.0
        }
    }

    /// The `q` quantile (0..=1) of latency in microseconds, by nearest rank.
    pub fn latency_us(&self, q: f64) -> f64 {
        let n = self.latencies_ns.len();
        if n == 0 {
            return f64::NAN;
        }
        let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
        self.latencies_ns
            .get(rank - 1)
            .map_or(f64::NAN, |&ns| ns as f64 / 1_000.0)
    }

    /// Mean latency in microseconds.
    pub fn mean_latency_us(&self) -> f64 {
        if self.latencies_ns.is_empty() {
            return f64::NAN;
        }
        let sum: u128 = self.latencies_ns.iter().map(|&ns| u128::from(ns)).sum();
        sum as f64 / self.latencies_ns.len() as f64 / 1_000.0
    }
}

struct ClientOutcome {
    latencies_ns: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
    ended: Instant,
}

/// Every client calls `rpc` in a loop, one call at a time, for `duration`; all start together.
pub async fn run(
    clients: &[(Client, AppRef)],
    rpc: Rpc,
    duration: Duration,
) -> anyhow::Result<RunResult> {
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::with_capacity(clients.len());
    for (index, (client, app)) in clients.iter().enumerate() {
        let mut client = client.clone();
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            let mut outcome = ClientOutcome {
                latencies_ns: Vec::with_capacity(16_384),
                errors: 0,
                first_error: None,
                ended: start,
            };
            // Clients start at different points of the cycle of totals.
            let mut i = index as u64;
            let mut calls = 0u64;
            while calls < MAX_CALLS_PER_CLIENT && Instant::now() < deadline {
                let sent = Instant::now();
                let result = match rpc {
                    Rpc::RequestTotalExecutors => {
                        let total = i64::try_from(i % (MAX_TOTAL + 1)).unwrap_or(0);
                        request_total(&mut client, &app, total).await
                    }
                    Rpc::Heartbeat => heartbeat(&mut client, &app, 0).await,
                };
                let took = sent.elapsed();
                match result {
                    Ok(()) => outcome
                        .latencies_ns
                        .push(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX)),
                    Err(status) => {
                        outcome.errors += 1;
                        if outcome.first_error.is_none() {
                            outcome.first_error = Some(status.to_string());
                        }
                    }
                }
                i += 1;
                calls += 1;
            }
            outcome.ended = Instant::now();
            outcome
        }));
    }
    let mut result = RunResult {
        calls: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latencies_ns: Vec::new(),
        first_error: None,
    };
    for task in tasks {
        let outcome = task.await.context("a client task failed")?;
        result.calls += outcome.latencies_ns.len() as u64;
        result.errors += outcome.errors;
        result.elapsed = result.elapsed.max(outcome.ended.duration_since(start));
        result.latencies_ns.extend(outcome.latencies_ns);
        if result.first_error.is_none() {
            result.first_error = outcome.first_error;
        }
    }
    result.latencies_ns.sort_unstable();
    Ok(result)
}
