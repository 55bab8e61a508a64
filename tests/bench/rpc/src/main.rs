//! stoker-bench: control-plane benchmarks of stoker over loopback gRPC (issue 5, items 4 and 5).
//!
//! * Throughput: stoker's real server (in this process, with a null backend) against a ceiling,
//!   a minimal tonic server of the same service whose handlers answer at once. Each client has
//!   its own connection and application and calls `RequestTotalExecutors` (totals cycling through
//!   0..=50) or `Heartbeat` in a loop for a fixed time; calls/s and latency percentiles per
//!   concurrency level, stoker beside the ceiling and as a ratio of it.
//! * Memory: in a separate process, VmRSS before and after 10,000 executors (100 applications x
//!   100) are tracked and Running; bytes per executor.
//! * `bare-create`: the test bed's pod-creation ceiling for `bench_k8s.py` (see [`bare`]).
//!
//! `stoker-bench --out DIR [--quick]` prints a markdown table, writes it to `DIR/rpc.md` and the
//! raw samples to `DIR/rpc-samples.json`. Nothing here asserts a timing.

mod bare;
mod load;
mod memory;
mod servers;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::load::{AppRef, Client, Rpc, RunResult};
use crate::memory::MemoryResult;
use crate::servers::CeilingServer;

#[derive(Parser, Debug)]
#[command(
    name = "stoker-bench",
    about = "Control-plane throughput and memory benchmarks of stoker over loopback gRPC"
)]
struct Cli {
    /// Folder for rpc.md and rpc-samples.json.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Fewer concurrency levels, shorter runs, fewer applications (under a minute).
    #[arg(long)]
    quick: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Internal: the memory measurement, in a process of its own.
    #[command(name = "memory-child", hide = true)]
    MemoryChild {
        /// Applications.
        #[arg(long)]
        apps: u32,
        /// Executors per application.
        #[arg(long)]
        executors: u32,
    },
    /// The test bed's pod-creation ceiling: a bare client creates COUNT copies of a pod
    /// (KUBECONFIG's cluster), CONCURRENCY at a time, as fast as the API server takes them.
    #[command(name = "bare-create")]
    BareCreate(bare::Options),
}

/// How much to measure.
#[derive(Clone, Debug)]
struct Plan {
    mode: &'static str,
    levels: Vec<usize>,
    warmup: Duration,
    duration: Duration,
    runs: usize,
    memory_apps: u32,
    memory_executors: u32,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                mode: "quick",
                levels: vec![1, 64],
                warmup: Duration::from_millis(300),
                duration: Duration::from_secs(2),
                runs: 1,
                memory_apps: 100,
                memory_executors: 100,
            }
        } else {
            Self {
                mode: "full",
                levels: vec![1, 16, 64],
                warmup: Duration::from_secs(1),
                duration: Duration::from_secs(5),
                runs: 3,
                memory_apps: 100,
                memory_executors: 100,
            }
        }
    }
}

/// The machine the figures come from.
struct Machine {
    cpus: usize,
    cpu_model: String,
    profile: &'static str,
}

impl Machine {
    fn detect() -> Self {
        let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| {
                info.lines()
                    .find(|line| line.starts_with("model name"))
                    .and_then(|line| line.split_once(':'))
                    .map(|(_, model)| model.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        let profile = if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        };
        Self {
            cpus,
            cpu_model,
            profile,
        }
    }
}

/// One (target, rpc, level, run) measurement.
struct Sample {
    target: &'static str,
    rpc: Rpc,
    clients: usize,
    run: usize,
    result: RunResult,
}

impl Sample {
    fn to_json(&self) -> serde_json::Value {
        let r = &self.result;
        serde_json::json!({
            "target": self.target,
            "rpc": self.rpc.name(),
            "clients": self.clients,
            "run": self.run,
            "calls": r.calls,
            "errors": r.errors,
            "first_error": r.first_error,
            "elapsed_s": r.elapsed.as_secs_f64(),
            "calls_per_s": r.calls_per_s(),
            "latency_us": {
                "mean": r.mean_latency_us(),
                "p50": r.latency_us(0.50),
                "p90": r.latency_us(0.90),
                "p99": r.latency_us(0.99),
                "p999": r.latency_us(0.999),
                "max": r.latency_us(1.0),
            },
        })
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    match cli.command {
        Some(Command::MemoryChild { apps, executors }) => {
            runtime.block_on(memory::child(apps, executors))
        }
        Some(Command::BareCreate(options)) => {
            let json = std::fs::read_to_string(&options.pod)
                .with_context(|| format!("cannot read the pod JSON {}", options.pod.display()))?;
            runtime.block_on(bare::run(&json, &options))
        }
        None => {
            let out = cli
                .out
                .context("--out DIR is required (where rpc.md and rpc-samples.json go)")?;
            runtime.block_on(bench(&out, Plan::new(cli.quick)))
        }
    }
}

async fn bench(out: &Path, plan: Plan) -> anyhow::Result<()> {
    let machine = Machine::detect();
    if machine.profile != "release" {
        eprintln!(
            "warning: a {} build; run with --release for meaningful figures",
            machine.profile
        );
    }
    let header = format!(
        "stoker-bench (rpc): {} CPUs, {}, {} build, {} mode; {} clients; {:?} per run after {:?} warm-up, {} run(s) per figure (median shown)",
        machine.cpus,
        machine.cpu_model,
        machine.profile,
        plan.mode,
        plan.levels
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("/"),
        plan.duration,
        plan.warmup,
        plan.runs,
    );
    eprintln!("{header}");

    let samples = throughput(&plan).await?;
    eprintln!(
        "memory: {} applications x {} executors, in a separate process",
        plan.memory_apps, plan.memory_executors
    );
    let memory = memory::measure(plan.memory_apps, plan.memory_executors).await?;

    let table = render_table(&plan, &samples, &memory);
    let markdown = format!("{header}\n\n{table}");
    println!("{markdown}");

    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let md_path = out.join("rpc.md");
    std::fs::write(&md_path, &markdown)
        .with_context(|| format!("cannot write {}", md_path.display()))?;
    let json = serde_json::json!({
        "benchmark": "rpc",
        "unix_time": SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        "machine": {
            "cpus": machine.cpus,
            "cpu_model": machine.cpu_model,
            "build_profile": machine.profile,
        },
        "plan": {
            "mode": plan.mode,
            "levels": plan.levels,
            "warmup_s": plan.warmup.as_secs_f64(),
            "duration_s": plan.duration.as_secs_f64(),
            "runs": plan.runs,
        },
        "throughput": samples.iter().map(Sample::to_json).collect::<Vec<_>>(),
        "memory": memory.to_json(),
    });
    let json_path = out.join("rpc-samples.json");
    let text = serde_json::to_string_pretty(&json).context("cannot encode the samples")?;
    std::fs::write(&json_path, text)
        .with_context(|| format!("cannot write {}", json_path.display()))?;
    eprintln!("wrote {} and {}", md_path.display(), json_path.display());
    Ok(())
}

/// Both servers run side by side; every run of stoker is followed by the same run against the
/// ceiling, so that both see the same machine load.
async fn throughput(plan: &Plan) -> anyhow::Result<Vec<Sample>> {
    let stoker = servers::start_stoker().await?;
    let ceiling = CeilingServer::start().await?;
    let most = plan.levels.iter().copied().max().unwrap_or(1);

    // One application per client, registered once and reused at every level.
    let mut admin = load::connect(stoker.grpc_addr).await?;
    let mut apps: Vec<AppRef> = Vec::with_capacity(most);
    for n in 0..most {
        apps.push(load::register(&mut admin, &format!("bench-rpc-{n:03}")).await?);
    }
    drop(admin);

    let mut samples = Vec::new();
    for &level in &plan.levels {
        let mut stoker_clients: Vec<(Client, AppRef)> = Vec::with_capacity(level);
        let mut ceiling_clients: Vec<(Client, AppRef)> = Vec::with_capacity(level);
        for app in apps.iter().take(level) {
            stoker_clients.push((load::connect(stoker.grpc_addr).await?, app.clone()));
            ceiling_clients.push((
                load::connect(ceiling.addr).await?,
                AppRef {
                    app_id: app.app_id.clone(),
                    token: String::new(),
                },
            ));
        }
        for rpc in [Rpc::RequestTotalExecutors, Rpc::Heartbeat] {
            for clients in [&stoker_clients, &ceiling_clients] {
                let _warmup = load::run(clients, rpc, plan.warmup).await?;
            }
            for run in 0..plan.runs {
                for (target, clients) in
                    [("stoker", &stoker_clients), ("ceiling", &ceiling_clients)]
                {
                    let result = load::run(clients, rpc, plan.duration).await?;
                    eprintln!(
                        "  {target:7} {:22} {level:3} clients, run {}: {:9.0} calls/s, p50 {:8.1} us, p99 {:8.1} us{}",
                        rpc.name(),
                        run + 1,
                        result.calls_per_s(),
                        result.latency_us(0.50),
                        result.latency_us(0.99),
                        if result.errors > 0 {
                            format!(
                                ", {} errors (first: {})",
                                result.errors,
                                result.first_error.as_deref().unwrap_or("?")
                            )
                        } else {
                            String::new()
                        }
                    );
                    samples.push(Sample {
                        target,
                        rpc,
                        clients: level,
                        run,
                        result,
                    });
                }
            }
        }
    }
    ceiling.shutdown().await?;
    stoker.shutdown().await?;
    Ok(samples)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values.get(mid).copied().unwrap_or(f64::NAN)
    } else {
        let (a, b) = (
            values.get(mid - 1).copied().unwrap_or(f64::NAN),
            values.get(mid).copied().unwrap_or(f64::NAN),
        );
        (a + b) / 2.0
    }
}

fn figure(
    samples: &[Sample],
    target: &str,
    rpc: Rpc,
    level: usize,
    value: impl Fn(&RunResult) -> f64,
) -> f64 {
    median(
        samples
            .iter()
            .filter(|s| s.target == target && s.rpc == rpc && s.clients == level)
            .map(|s| value(&s.result))
            .collect(),
    )
}

fn clients_label(level: usize) -> String {
    if level == 1 {
        "1 client".into()
    } else {
        format!("{level} clients")
    }
}

struct Row {
    benchmark: String,
    figure: String,
    stoker: String,
    ceiling: String,
    ratio: String,
    unit: String,
}

fn fmt_num(value: f64, decimals: usize) -> String {
    if value.is_finite() {
        format!("{value:.decimals$}")
    } else {
        "n/a".into()
    }
}

fn render_table(plan: &Plan, samples: &[Sample], memory: &MemoryResult) -> String {
    let mut rows = Vec::new();
    type Getter = fn(&RunResult) -> f64;
    let figures: [(&str, Getter, usize, &str); 3] = [
        ("throughput", RunResult::calls_per_s, 0, "calls/s"),
        ("p50 latency", |r| r.latency_us(0.50), 1, "µs"),
        ("p99 latency", |r| r.latency_us(0.99), 1, "µs"),
    ];
    for rpc in [Rpc::RequestTotalExecutors, Rpc::Heartbeat] {
        for &level in &plan.levels {
            for (name, get, decimals, unit) in figures {
                let s = figure(samples, "stoker", rpc, level, get);
                let c = figure(samples, "ceiling", rpc, level, get);
                rows.push(Row {
                    benchmark: format!("{}, {}", rpc.name(), clients_label(level)),
                    figure: name.into(),
                    stoker: fmt_num(s, decimals),
                    ceiling: fmt_num(c, decimals),
                    ratio: fmt_num(s / c, 2),
                    unit: unit.into(),
                });
            }
            let errors: u64 = samples
                .iter()
                .filter(|s| s.rpc == rpc && s.clients == level)
                .map(|s| s.result.errors)
                .sum();
            if errors > 0 {
                rows.push(Row {
                    benchmark: format!("{}, {}", rpc.name(), clients_label(level)),
                    figure: "failed calls (all runs, both servers)".into(),
                    stoker: errors.to_string(),
                    ceiling: String::new(),
                    ratio: String::new(),
                    unit: "calls".into(),
                });
            }
        }
    }
    let mib = |bytes: u64| fmt_num(bytes as f64 / (1024.0 * 1024.0), 1);
    let bench = format!(
        "Memory, {} apps x {} executors",
        memory.apps, memory.executors_per_app
    );
    let dash = || "—".to_owned();
    for (figure, value, unit) in [
        (
            "RSS before (server started, no application)",
            mib(memory.rss_before),
            "MiB",
        ),
        (
            "RSS after (all executors Running)",
            mib(memory.rss_after),
            "MiB",
        ),
        (
            "RSS after drivers acknowledged events",
            mib(memory.rss_after_ack),
            "MiB",
        ),
        (
            "per executor (after - before) / executors",
            fmt_num(memory.bytes_per_executor(memory.rss_after), 0),
            "bytes",
        ),
        (
            "per executor, events acknowledged",
            fmt_num(memory.bytes_per_executor(memory.rss_after_ack), 0),
            "bytes",
        ),
        (
            "time to all Running (register + request + poll)",
            fmt_num(memory.settle.as_secs_f64() * 1_000.0, 0),
            "ms",
        ),
    ] {
        rows.push(Row {
            benchmark: bench.clone(),
            figure: figure.into(),
            stoker: value,
            ceiling: dash(),
            ratio: dash(),
            unit: unit.into(),
        });
    }

    let head = Row {
        benchmark: "benchmark".into(),
        figure: "figure".into(),
        stoker: "stoker".into(),
        ceiling: "ceiling (bare tonic)".into(),
        ratio: "ratio stoker/ceiling".into(),
        unit: "unit".into(),
    };
    let cells = |row: &Row| {
        [
            row.benchmark.clone(),
            row.figure.clone(),
            row.stoker.clone(),
            row.ceiling.clone(),
            row.ratio.clone(),
            row.unit.clone(),
        ]
    };
    let mut widths = [0usize; 6];
    for row in std::iter::once(&head).chain(&rows) {
        for (width, cell) in widths.iter_mut().zip(cells(row)) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |values: [String; 6]| {
        let mut text = String::from("|");
        for (i, (value, width)) in values.iter().zip(widths).enumerate() {
            let pad = width.saturating_sub(value.chars().count());
            // Numbers right-aligned, words left-aligned.
            if (2..=4).contains(&i) {
                text.push_str(&format!(" {}{} |", " ".repeat(pad), value));
            } else {
                text.push_str(&format!(" {}{} |", value, " ".repeat(pad)));
            }
        }
        text
    };
    let mut table = line(cells(&head));
    table.push('\n');
    let mut rule = String::from("|");
    for (i, width) in widths.iter().enumerate() {
        let dashes = "-".repeat((*width).max(3));
        if (2..=4).contains(&i) {
            rule.push_str(&format!(" {}: |", &dashes[1..]));
        } else {
            rule.push_str(&format!(" {dashes} |"));
        }
    }
    table.push_str(&rule);
    table.push('\n');
    for row in &rows {
        table.push_str(&line(cells(row)));
        table.push('\n');
    }
    table
}
