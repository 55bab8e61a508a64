//! The local backend: Spark executors as JVM processes on this machine.
//!
//! Each executor is `java … org.apache.spark.executor.CoarseGrainedExecutorBackend` started from
//! a Spark installation (`spark_home`, for example the pyspark package's directory), with the
//! heap of its resource profile, the template's environment, Java options and startup
//! configuration, and its output in a log file of its own
//! (`<work_dir>/<app>/executor-<id>.log`).
//!
//! Sizes: the executor's heap is the launch request's [`LaunchRequest::size`] (`-Xmx` and
//! `SPARK_EXECUTOR_MEMORY`), so executors replaced after a `java.lang.OutOfMemoryError` (exit
//! code 52) start with the bigger heap. The overhead is not enforced: a local process has no
//! memory limit (no cgroup), so this backend never reports `OomKilled`; a process the kernel's
//! OOM killer ends is reported as `Signaled` (code 137).
//!
//! # Guarantees
//!
//! * Every launched executor is reported `Exited` exactly once: with its exit code, or with the
//!   signal that ended it, or as `StartFailed` when it could not be spawned.
//! * `terminate` sends SIGTERM to the executor's process group, then SIGKILL after the grace
//!   period.
//! * No child survives stoker: each executor runs in its own process group, is killed when its
//!   handle drops, and — when a `wrapper` is configured (the stoker binary's `exec-guard`) — gets
//!   SIGKILL from the kernel if stoker itself dies (`PR_SET_PDEATHSIG`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use stoker_core::{
    AppId, BackendObservation, ExecutorBackend, ExecutorId, ExitReason, LaunchRequest, Millis,
    Observation, ObservationSink,
};
use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tokio::sync::mpsc;
use tracing::{info, warn};

mod hosts;
use hosts::HostPicker;
pub use hosts::{BadExecutorHost, ExecutorHosts};

/// Errors of the local backend's set-up.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// The Spark installation has no `jars/` folder.
    #[error("spark home {0} has no jars/ folder: not a Spark installation")]
    NotSparkHome(PathBuf),
    /// The work directory could not be created.
    #[error("cannot create work directory {path}")]
    WorkDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Configuration of the local backend.
#[derive(Clone, Debug)]
pub struct LocalConfig {
    /// The Spark installation executors run from (must contain `jars/`).
    pub spark_home: PathBuf,
    /// The `java` to run.
    pub java: PathBuf,
    /// Where executor logs and scratch directories go.
    pub work_dir: PathBuf,
    /// The host each executor advertises and binds (see [`ExecutorHosts`]).
    pub hosts: ExecutorHosts,
    /// Program and arguments put before `java`, e.g. the stoker binary's `exec-guard` that ties
    /// the executor's life to stoker's.
    pub wrapper: Vec<String>,
}

impl LocalConfig {
    /// Checks the configuration and creates the work directory.
    pub fn validate(&self) -> Result<(), LocalError> {
        if !self.spark_home.join("jars").is_dir() {
            return Err(LocalError::NotSparkHome(self.spark_home.clone()));
        }
        std::fs::create_dir_all(&self.work_dir).map_err(|source| LocalError::WorkDir {
            path: self.work_dir.clone(),
            source,
        })
    }
}

type Key = (AppId, ExecutorId);

/// Control of a running executor process.
struct Handle {
    stop: mpsc::UnboundedSender<Millis>,
}

/// The local backend. Cheap to clone.
#[derive(Clone)]
pub struct LocalBackend {
    config: Arc<LocalConfig>,
    hosts: Arc<HostPicker>,
    sink: ObservationSink,
    processes: Arc<Mutex<HashMap<Key, Handle>>>,
}

impl LocalBackend {
    /// A backend that reports to `sink`.
    pub fn new(config: LocalConfig, sink: ObservationSink) -> Result<Self, LocalError> {
        config.validate()?;
        Ok(Self {
            hosts: Arc::new(HostPicker::new(config.hosts.clone())),
            config: Arc::new(config),
            sink,
            processes: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    /// Number of executor processes alive.
    pub fn running(&self) -> usize {
        self.processes.lock().map(|p| p.len()).unwrap_or(0)
    }

    /// Stops every executor (SIGTERM, SIGKILL after `grace`) and waits until all are gone or
    /// `grace` plus a second has passed.
    pub async fn shutdown(&self, grace: Millis) {
        let handles: Vec<mpsc::UnboundedSender<Millis>> = match self.processes.lock() {
            Ok(processes) => processes.values().map(|h| h.stop.clone()).collect(),
            Err(_) => Vec::new(),
        };
        for stop in handles {
            let _ = stop.send(grace);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_millis(grace + 1_000);
        while self.running() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn report(&self, app_id: &AppId, executor_id: ExecutorId, observation: Observation) {
        (self.sink)(BackendObservation {
            app_id: app_id.clone(),
            executor_id,
            observation,
        });
    }

    fn command(
        &self,
        request: &LaunchRequest,
        host: &str,
        log: &Path,
        local_dir: &Path,
    ) -> Command {
        let config = &self.config;
        let template = &request.template;
        let profile = template.profiles.get(&request.profile);
        let heap = request.size.heap_mib.max(32);
        let cores = profile.map_or(1, |p| p.cores.max(1));

        let mut class_path = Vec::new();
        if !template.extra_class_path.is_empty() {
            class_path.push(template.extra_class_path.clone());
        }
        class_path.push(config.spark_home.join("conf").display().to_string());
        class_path.push(format!("{}/*", config.spark_home.join("jars").display()));

        let mut argv: Vec<String> = config.wrapper.clone();
        argv.push(config.java.display().to_string());
        argv.push("-cp".into());
        argv.push(class_path.join(":"));
        argv.push(format!("-Xmx{heap}m"));
        for (key, value) in &template.startup_conf {
            argv.push(format!("-D{key}={value}"));
        }
        argv.extend(template.java_options.iter().cloned());
        argv.push(format!("-Dspark.log.path={}", log.display()));
        argv.extend(
            [
                "org.apache.spark.executor.CoarseGrainedExecutorBackend",
                "--driver-url",
                &template.driver_url,
                "--executor-id",
                &request.executor_id.to_string(),
                "--hostname",
                host,
                "--bind-address",
                host,
                "--cores",
                &cores.to_string(),
                "--app-id",
                request.app_id.as_str(),
                "--resourceProfileId",
                &request.profile.to_string(),
            ]
            .map(String::from),
        );

        let mut command = Command::new(&argv[0]);
        command.args(&argv[1..]);
        command.env_clear();
        for inherited in ["PATH", "HOME", "LANG", "TZ", "JAVA_HOME", "TMPDIR"] {
            if let Some(value) = std::env::var_os(inherited) {
                command.env(inherited, value);
            }
        }
        command.envs(&template.environment);
        command.env("SPARK_HOME", &config.spark_home);
        command.env("SPARK_EXECUTOR_ID", request.executor_id.to_string());
        command.env("SPARK_APPLICATION_ID", request.app_id.as_str());
        command.env("SPARK_EXECUTOR_CORES", cores.to_string());
        command.env("SPARK_EXECUTOR_MEMORY", format!("{heap}m"));
        command.env("SPARK_RESOURCE_PROFILE_ID", request.profile.to_string());
        command.env("SPARK_LOCAL_DIRS", local_dir);
        if !template.spark_user.is_empty() {
            command.env("SPARK_USER", &template.spark_user);
        }
        if !template.auth_secret.is_empty() {
            command.env("_SPARK_AUTH_SECRET", &template.auth_secret);
        }
        command.current_dir(local_dir);
        command.stdin(Stdio::null());
        command.process_group(0);
        command.kill_on_drop(true);
        command
    }

    async fn run(self, request: LaunchRequest, mut stop: mpsc::UnboundedReceiver<Millis>) {
        let app = request.app_id.clone();
        let id = request.executor_id;
        let key = (app.clone(), id);
        let outcome = self.run_process(&request, &mut stop).await;
        if let Ok(mut processes) = self.processes.lock() {
            processes.remove(&key);
        }
        self.report(&app, id, outcome);
    }

    async fn run_process(
        &self,
        request: &LaunchRequest,
        stop: &mut mpsc::UnboundedReceiver<Millis>,
    ) -> Observation {
        let app = &request.app_id;
        let id = request.executor_id;
        let app_dir = self.config.work_dir.join(app.as_str());
        let local_dir = app_dir.join(format!("executor-{id}"));
        let log = app_dir.join(format!("executor-{id}.log"));
        if let Err(err) = std::fs::create_dir_all(&local_dir) {
            return start_failed(format!("cannot create {}: {err}", local_dir.display()));
        }
        let log_file = match std::fs::File::create(&log) {
            Ok(file) => file,
            Err(err) => return start_failed(format!("cannot create {}: {err}", log.display())),
        };
        let stderr = match log_file.try_clone() {
            Ok(file) => file,
            Err(err) => return start_failed(format!("cannot open {}: {err}", log.display())),
        };
        // A terminate that arrived before the spawn: never start it.
        if let Ok(grace) = stop.try_recv() {
            let _ = grace;
            return Observation::Exited {
                code: None,
                reason: ExitReason::Completed,
                message: format!("executor {id} stopped before it started"),
            };
        }
        let host = self.hosts.next();
        let mut command = self.command(request, &host, &log, &local_dir);
        command.stdout(log_file).stderr(stderr);
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(err) => {
                warn!(app = %app, executor = %id, error = %err, "cannot start executor process");
                return start_failed(format!("cannot start executor process: {err}"));
            }
        };
        let Some(pid) = child.id() else {
            return start_failed("executor process exited before it could be tracked".into());
        };
        let backend_name = format!("pid:{pid}");
        info!(
            app = %app,
            executor = %id,
            profile = request.profile,
            pid,
            host = %host,
            heap_mib = request.size.heap_mib,
            log = %log.display(),
            "executor process started"
        );
        self.report(
            app,
            id,
            Observation::Accepted {
                backend_name: backend_name.clone(),
            },
        );
        self.report(app, id, Observation::Running { host, backend_name });

        let group = Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX));
        let mut stopping = false;
        let status = loop {
            tokio::select! {
                status = child.wait() => break status,
                grace = stop.recv(), if !stopping => {
                    stopping = true;
                    let grace = grace.unwrap_or(0);
                    info!(app = %app, executor = %id, pid, grace_ms = grace, "stopping executor");
                    let _ = killpg(group, Signal::SIGTERM);
                    let group_to_kill = group;
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(grace)).await;
                        // The group may already be gone: ESRCH is fine.
                        let _ = killpg(group_to_kill, Signal::SIGKILL);
                    });
                }
            }
        };
        // Python workers and other children of the executor go with it.
        let _ = killpg(group, Signal::SIGKILL);
        match status {
            Ok(status) => classify(id, status, &log).await,
            Err(err) => Observation::Exited {
                code: None,
                reason: ExitReason::Lost,
                message: format!("cannot wait for executor process {pid}: {err}"),
            },
        }
    }
}

fn start_failed(message: String) -> Observation {
    Observation::Exited {
        code: None,
        reason: ExitReason::StartFailed,
        message,
    }
}

async fn classify(id: ExecutorId, status: std::process::ExitStatus, log: &Path) -> Observation {
    use std::os::unix::process::ExitStatusExt;
    let tail = log_tail(log).await;
    let with_tail = |head: String| {
        if tail.is_empty() {
            format!("{head}; log {}", log.display())
        } else {
            format!("{head}; log {}; last lines:\n{tail}", log.display())
        }
    };
    if let Some(code) = status.code() {
        let reason = if code == 0 {
            ExitReason::Completed
        } else {
            ExitReason::Error
        };
        let hint = match code {
            // Spark's SparkExitCode.OOM: the JVM ran out of heap.
            52 => " (java.lang.OutOfMemoryError in the executor)",
            _ => "",
        };
        return Observation::Exited {
            code: Some(code),
            reason,
            message: with_tail(format!("executor {id} exited with code {code}{hint}")),
        };
    }
    let signal = status.signal().unwrap_or(0);
    Observation::Exited {
        // The shell convention, as Kubernetes reports a signal death: 128 + signal.
        code: Some(128 + signal),
        reason: ExitReason::Signaled,
        message: with_tail(format!("executor {id} was killed by signal {signal}")),
    }
}

async fn log_tail(log: &Path) -> String {
    const TAIL_BYTES: usize = 1_500;
    let Ok(mut file) = tokio::fs::File::open(log).await else {
        return String::new();
    };
    let mut bytes = Vec::new();
    if file.read_to_end(&mut bytes).await.is_err() {
        return String::new();
    }
    let start = bytes.len().saturating_sub(TAIL_BYTES);
    let text = String::from_utf8_lossy(&bytes[start..]);
    let lines: Vec<&str> = text.lines().collect();
    let keep = lines.len().saturating_sub(8);
    lines[keep..].join("\n")
}

impl ExecutorBackend for LocalBackend {
    fn name(&self) -> &'static str {
        "local"
    }

    /// The heap only: see the module documentation.
    fn honours_size(&self) -> bool {
        true
    }

    fn launch(&self, request: LaunchRequest) {
        let (stop_tx, stop_rx) = mpsc::unbounded_channel();
        let key = (request.app_id.clone(), request.executor_id);
        match self.processes.lock() {
            Ok(mut processes) => {
                processes.insert(key, Handle { stop: stop_tx });
            }
            Err(_) => {
                self.report(
                    &request.app_id,
                    request.executor_id,
                    start_failed("local backend state is poisoned".into()),
                );
                return;
            }
        }
        // Spawned from a runtime worker thread: PR_SET_PDEATHSIG follows the spawning thread,
        // and worker threads live as long as the runtime (blocking-pool threads do not).
        tokio::spawn(self.clone().run(request, stop_rx));
    }

    fn terminate(&self, app_id: &AppId, executor_id: ExecutorId, grace: Millis) {
        let stop = match self.processes.lock() {
            Ok(processes) => processes
                .get(&(app_id.clone(), executor_id))
                .map(|h| h.stop.clone()),
            Err(_) => None,
        };
        match stop {
            Some(stop) => {
                let _ = stop.send(grace);
            }
            None => {
                // Already gone: its exit was (or is being) reported by its task.
            }
        }
    }
}
