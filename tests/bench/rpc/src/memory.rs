//! Resident memory of a stoker server tracking many executors, measured in a process of its own
//! (the benchmark re-executes itself with a hidden subcommand).

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use stoker::proto::v1 as pb;

use crate::load::{self, AppRef};
use crate::servers::{self, ADMIN_TOKEN};

/// The hidden subcommand that runs the measurement.
pub const CHILD_COMMAND: &str = "memory-child";

/// How long the child may take in all.
const CHILD_TIMEOUT: Duration = Duration::from_secs(300);

/// How long the server may take to report every executor Running.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(120);

/// What the child measured.
#[derive(Clone, Debug)]
pub struct MemoryResult {
    /// Applications.
    pub apps: u32,
    /// Executors per application.
    pub executors_per_app: u32,
    /// VmRSS with the server started and a client connected, before any application.
    pub rss_before: u64,
    /// VmRSS once the server reports every executor Running.
    pub rss_after: u64,
    /// VmRSS once every driver acknowledged its events (Heartbeat with the last sequence).
    pub rss_after_ack: u64,
    /// From the first registration until the server reported every executor Running.
    pub settle: Duration,
}

impl MemoryResult {
    /// Executors tracked.
    pub fn executors(&self) -> u64 {
        u64::from(self.apps) * u64::from(self.executors_per_app)
    }

    /// (after - before) / executors, possibly negative.
    pub fn bytes_per_executor(&self, after: u64) -> f64 {
        (after as f64 - self.rss_before as f64) / self.executors().max(1) as f64
    }

    /// As JSON.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "apps": self.apps,
            "executors_per_app": self.executors_per_app,
            "executors": self.executors(),
            "rss_before_bytes": self.rss_before,
            "rss_after_bytes": self.rss_after,
            "rss_after_ack_bytes": self.rss_after_ack,
            "settle_ms": self.settle.as_secs_f64() * 1_000.0,
            "bytes_per_executor": self.bytes_per_executor(self.rss_after),
            "bytes_per_executor_after_ack": self.bytes_per_executor(self.rss_after_ack),
        })
    }

    fn from_json(value: &serde_json::Value) -> anyhow::Result<Self> {
        let field = |name: &str| -> anyhow::Result<u64> {
            value
                .get(name)
                .and_then(serde_json::Value::as_u64)
                .with_context(|| format!("the memory child's report has no {name}"))
        };
        let settle_ms = value
            .get("settle_ms")
            .and_then(serde_json::Value::as_f64)
            .context("the memory child's report has no settle_ms")?;
        Ok(Self {
            apps: u32::try_from(field("apps")?).context("apps")?,
            executors_per_app: u32::try_from(field("executors_per_app")?)
                .context("executors_per_app")?,
            rss_before: field("rss_before_bytes")?,
            rss_after: field("rss_after_bytes")?,
            rss_after_ack: field("rss_after_ack_bytes")?,
            settle: Duration::from_secs_f64(settle_ms.max(0.0) / 1_000.0),
        })
    }
}

/// This process's resident set size in bytes (VmRSS in /proc/self/status).
fn rss_bytes() -> anyhow::Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("cannot read /proc/self/status")?;
    let line = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .context("no VmRSS in /proc/self/status")?;
    let kib: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .with_context(|| format!("cannot parse {line:?}"))?;
    Ok(kib * 1024)
}

/// Runs in the child: starts the server, registers `apps` applications with `per_app`
/// executors each over gRPC, waits until the server reports them all Running, and prints the
/// result as one JSON line.
pub async fn child(apps: u32, per_app: u32) -> anyhow::Result<()> {
    let server = servers::start_stoker().await?;
    let mut client = load::connect(server.grpc_addr).await?;
    // One call first, so that the connection's buffers are part of the baseline.
    let _ = client
        .list_applications(pb::ListApplicationsRequest {
            admin_token: ADMIN_TOKEN.into(),
        })
        .await
        .context("ListApplications failed")?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_before = rss_bytes()?;

    let started = Instant::now();
    let mut refs: Vec<AppRef> = Vec::with_capacity(apps as usize);
    for n in 0..apps {
        let app = load::register(&mut client, &format!("bench-memory-{n:04}")).await?;
        load::request_total(&mut client, &app, i64::from(per_app))
            .await
            .with_context(|| format!("RequestTotalExecutors for {} failed", app.app_id))?;
        refs.push(app);
    }

    let deadline = started + SETTLE_TIMEOUT;
    let mut last_seqs = vec![0u64; refs.len()];
    let mut pending: Vec<usize> = (0..refs.len()).collect();
    while !pending.is_empty() {
        if Instant::now() > deadline {
            bail!(
                "{} applications still not reporting {per_app} running executors after {:?}",
                pending.len(),
                SETTLE_TIMEOUT
            );
        }
        let mut still = Vec::new();
        for index in pending {
            let Some(app) = refs.get(index) else { continue };
            let info = client
                .get_application(pb::GetApplicationRequest {
                    app_id: app.app_id.clone(),
                    token: ADMIN_TOKEN.into(),
                })
                .await
                .with_context(|| format!("GetApplication for {} failed", app.app_id))?
                .into_inner();
            if info.running == per_app && info.pending == 0 {
                if let Some(seq) = last_seqs.get_mut(index) {
                    *seq = info.last_seq;
                }
            } else {
                still.push(index);
            }
        }
        pending = still;
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let settle = started.elapsed();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_after = rss_bytes()?;

    for (app, &seq) in refs.iter().zip(&last_seqs) {
        load::heartbeat(&mut client, app, seq)
            .await
            .with_context(|| format!("Heartbeat for {} failed", app.app_id))?;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_after_ack = rss_bytes()?;

    let result = MemoryResult {
        apps,
        executors_per_app: per_app,
        rss_before,
        rss_after,
        rss_after_ack,
        settle,
    };
    println!("{}", result.to_json());
    drop(client);
    server.shutdown().await
}

/// Runs the child and reads its result.
pub async fn measure(apps: u32, per_app: u32) -> anyhow::Result<MemoryResult> {
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let child = tokio::process::Command::new(&exe)
        .arg(CHILD_COMMAND)
        .arg("--apps")
        .arg(apps.to_string())
        .arg("--executors")
        .arg(per_app.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", exe.display()))?;
    let output = tokio::time::timeout(CHILD_TIMEOUT, child.wait_with_output())
        .await
        .with_context(|| format!("the memory child did not end within {CHILD_TIMEOUT:?}"))?
        .context("cannot wait for the memory child")?;
    if !output.status.success() {
        bail!("the memory child failed: {}", output.status);
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|line| line.trim_start().starts_with('{'))
        .context("the memory child printed no result")?;
    let value: serde_json::Value =
        serde_json::from_str(line).context("the memory child's result is not JSON")?;
    MemoryResult::from_json(&value)
}
