//! Pods bound to this kubelet's nodes: one watch over all pods, one worker task per pod that
//! runs its containers, reports status as a kubelet does, honours graceful deletion and applies
//! injected faults.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, PersistentVolume, PersistentVolumeClaim, Pod, Secret, ServiceAccount,
    Volume,
};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Api;
use nix::sys::signal::Signal;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, warn, Instrument};

use crate::mounts::{self, Mapping};
use crate::process;
use crate::spec::{self, PathMap, PreStop};
use crate::{now, Mode, Shared, FAULT_ANNOTATION};

/// What the dispatcher tells a worker.
enum Msg {
    /// The pod object changed.
    Update(Box<Pod>),
    /// The pod object is gone from the API server.
    Gone,
    /// The kubelet stops: kill everything, write nothing.
    Shutdown,
}

/// Watches every pod and hands the ones bound to our nodes to their workers, until `stop`.
pub async fn run(shared: Arc<Shared>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let pods: Api<Pod> = Api::all(shared.client.clone());
    let mut stream = watcher::watcher(pods, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut workers: HashMap<String, (mpsc::UnboundedSender<Msg>, tokio::task::JoinHandle<()>)> =
        HashMap::new();
    let mut done: HashSet<String> = HashSet::new();
    let mut relist: Option<HashSet<String>> = None;
    loop {
        let event = tokio::select! {
            e = stream.next() => e,
            _ = stop.changed() => break,
        };
        let Some(event) = event else { break };
        workers.retain(|uid, (_, handle)| {
            if handle.is_finished() {
                done.insert(uid.clone());
                false
            } else {
                true
            }
        });
        let pod = match event {
            Ok(watcher::Event::Init) => {
                relist = Some(HashSet::new());
                continue;
            }
            Ok(watcher::Event::InitDone) => {
                // Pods that vanished while the watch was down.
                if let Some(seen) = relist.take() {
                    for (uid, (tx, _)) in &workers {
                        if !seen.contains(uid) {
                            let _ = tx.send(Msg::Gone);
                        }
                    }
                }
                continue;
            }
            Ok(watcher::Event::Delete(pod)) => {
                if let Some(uid) = pod.metadata.uid.as_deref() {
                    if let Some((tx, _)) = workers.get(uid) {
                        let _ = tx.send(Msg::Gone);
                    }
                }
                continue;
            }
            Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => pod,
            Err(err) => {
                warn!(error = %err, "pod watch error; the watcher backs off and resumes");
                continue;
            }
        };
        let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
            continue;
        };
        if !shared.nodes.contains(&node) {
            continue;
        }
        let Some(uid) = pod.metadata.uid.clone() else {
            continue;
        };
        if let Some(seen) = relist.as_mut() {
            seen.insert(uid.clone());
        }
        if let Some((tx, _)) = workers.get(&uid) {
            let _ = tx.send(Msg::Update(Box::new(pod)));
            continue;
        }
        if done.contains(&uid) {
            continue;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let span = tracing::info_span!(
            "pod",
            pod = %format!("{}/{}", pod.metadata.namespace.as_deref().unwrap_or_default(),
                pod.metadata.name.as_deref().unwrap_or_default()),
            node = %node
        );
        let worker = Worker::new(shared.clone(), pod, node);
        let handle = tokio::spawn(worker.run(rx).instrument(span));
        workers.insert(uid, (tx, handle));
    }
    info!(pods = workers.len(), "stopping: killing every container");
    for (tx, _) in workers.values() {
        let _ = tx.send(Msg::Shutdown);
    }
    for (_, (_, handle)) in workers {
        let _ = tokio::time::timeout(Duration::from_secs(5), handle).await;
    }
}

/// Reported state of one container.
#[derive(Clone, Debug)]
enum State {
    Waiting {
        reason: String,
        message: String,
    },
    Running {
        started_at: String,
    },
    Terminated {
        code: i32,
        reason: String,
        message: String,
        started_at: String,
        finished_at: String,
    },
}

struct Ctr {
    name: String,
    image: String,
    state: State,
    last: Option<State>,
    restarts: u32,
    pid: Option<i32>,
    memory_limit: Option<u64>,
    /// Exit code and reason to report for the next exit instead of what the process returns
    /// (set when the kubelet itself kills it: OOM, injected fault, eviction).
    forced: Option<(i32, String)>,
    /// Its `preStop` hook while it runs (graceful deletion).
    hook: Option<Hook>,
    /// When it is SIGKILLed (graceful deletion): the end of the pod's grace period, or of the
    /// short window after its `preStop` hook.
    kill_at: Option<Instant>,
}

/// A running `preStop` hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hook {
    /// The `apache/spark` image's `/opt/decom.sh`, modelled: SIGPWR was sent to the container's
    /// main process; the hook ends when that process exits.
    SparkDecom,
    /// An exec hook's process (the leader of its own process group).
    Process(i32),
}

enum Local {
    Exited(usize, i32),
    Restart(usize),
    /// The `preStop` hook process of container `.0` ended with exit code `.1`.
    HookDone(usize, i32),
}

struct Worker {
    shared: Arc<Shared>,
    api: Api<Pod>,
    pod: Pod,
    name: String,
    namespace: String,
    uid: String,
    node: String,
    dir: PathBuf,
    init: Vec<Ctr>,
    ctrs: Vec<Ctr>,
    start_time: String,
    pod_reason: Option<(String, String)>,
    /// Terminal phase forced by an eviction.
    evicted: bool,
    applied_fault: Option<String>,
    deleting: bool,
    /// The node is lost: nothing is written any more.
    silent: bool,
    /// Volume name -> local folder.
    volumes: BTreeMap<String, PathBuf>,
    local_tx: mpsc::UnboundedSender<Local>,
    local_rx: mpsc::UnboundedReceiver<Local>,
}

fn ctr_from(c: &Container) -> Ctr {
    let memory_limit = c
        .resources
        .as_ref()
        .and_then(|r| r.limits.as_ref())
        .and_then(|l| l.get("memory"))
        .and_then(|q| spec::parse_bytes(&q.0).ok());
    Ctr {
        name: c.name.clone(),
        image: c.image.clone().unwrap_or_default(),
        state: State::Waiting {
            reason: "ContainerCreating".into(),
            message: String::new(),
        },
        last: None,
        restarts: 0,
        pid: None,
        memory_limit,
        forced: None,
        hook: None,
        kill_at: None,
    }
}

impl Worker {
    fn new(shared: Arc<Shared>, pod: Pod, node: String) -> Self {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let namespace = pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let dir = shared
            .work_dir
            .join(&namespace)
            .join(format!("{name}-{}", uid.get(..8).unwrap_or(&uid)));
        let spec = pod.spec.clone().unwrap_or_default();
        let init = spec
            .init_containers
            .iter()
            .flatten()
            .map(ctr_from)
            .collect();
        let ctrs = spec.containers.iter().map(ctr_from).collect();
        let (local_tx, local_rx) = mpsc::unbounded_channel();
        Worker {
            api: Api::namespaced(shared.client.clone(), &namespace),
            shared,
            pod,
            name,
            namespace,
            uid,
            node,
            dir,
            init,
            ctrs,
            start_time: now(),
            pod_reason: None,
            evicted: false,
            applied_fault: None,
            deleting: false,
            silent: false,
            volumes: BTreeMap::new(),
            local_tx,
            local_rx,
        }
    }

    fn restart_policy(&self) -> &str {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.as_deref())
            .unwrap_or("Always")
    }

    fn phase_of_status(&self) -> Option<String> {
        self.pod.status.as_ref().and_then(|s| s.phase.clone())
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        let phase = self.phase_of_status();
        let already_started = self
            .pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .is_some_and(|c| !c.is_empty());
        if matches!(phase.as_deref(), Some("Succeeded" | "Failed")) {
            // Terminal before we saw it (a previous kubelet run): only deletion is left to do.
            for c in &mut self.ctrs {
                c.state = State::Terminated {
                    code: 0,
                    reason: "Completed".into(),
                    message: String::new(),
                    started_at: self.start_time.clone(),
                    finished_at: self.start_time.clone(),
                };
            }
        } else if already_started && self.shared.mode == Mode::Process {
            // Containers of a previous kubelet run died with it.
            let t = now();
            for c in &mut self.ctrs {
                c.state = State::Terminated {
                    code: 137,
                    reason: "ContainerStatusUnknown".into(),
                    message: "The container could not be located when the pod was terminated"
                        .into(),
                    started_at: t.clone(),
                    finished_at: t.clone(),
                };
            }
            self.write_status().await;
        } else if self.pod.metadata.deletion_timestamp.is_none() {
            self.start().await;
        }
        let mut lost_rx = self.shared.lost.subscribe();
        let mut oom_tick = tokio::time::interval(self.shared.oom_check);
        loop {
            if self.pod.metadata.deletion_timestamp.is_some() && !self.deleting && !self.silent {
                self.begin_delete().await;
            }
            if self.deleting && !self.silent && self.all_stopped() {
                self.finish_delete().await;
                return;
            }
            let kill_at = self.ctrs.iter().filter_map(|c| c.kill_at).min();
            let running = self.ctrs.iter().any(|c| c.pid.is_some());
            tokio::select! {
                msg = rx.recv() => match msg {
                    None | Some(Msg::Shutdown) | Some(Msg::Gone) => {
                        self.kill_all(Signal::SIGKILL);
                        return;
                    }
                    Some(Msg::Update(pod)) => {
                        self.pod = *pod;
                        if !self.silent {
                            self.apply_fault().await;
                        }
                    }
                },
                Some(ev) = self.local_rx.recv() => match ev {
                    Local::Exited(i, code) => self.on_exit(i, code).await,
                    Local::Restart(i) => {
                        if !self.deleting {
                            self.start_container(i, false).await;
                            self.write_status().await;
                        }
                    }
                    Local::HookDone(i, code) => self.hook_done(i, code),
                },
                _ = oom_tick.tick(), if running && self.shared.mode == Mode::Process => self.check_oom(),
                _ = tokio::time::sleep_until(kill_at.unwrap_or_else(Instant::now)), if kill_at.is_some() => {
                    self.grace_over();
                }
                changed = lost_rx.changed() => {
                    if changed.is_err() { continue; }
                    let lost = lost_rx.borrow_and_update().contains(&self.node);
                    if lost && !self.silent {
                        warn!("node lost: containers die, nothing is reported");
                        self.silent = true;
                        self.kill_all(Signal::SIGKILL);
                    } else if !lost && self.silent {
                        self.silent = false;
                        // The node is back; its containers are gone.
                        let t = now();
                        for c in &mut self.ctrs {
                            if !matches!(c.state, State::Terminated { .. }) {
                                c.state = State::Terminated { code: 137, reason: "ContainerStatusUnknown".into(),
                                    message: "The container could not be located when the node came back".into(),
                                    started_at: t.clone(), finished_at: t.clone() };
                            }
                        }
                        self.write_status().await;
                    }
                }
            }
        }
    }

    fn all_stopped(&self) -> bool {
        self.ctrs.iter().all(|c| c.pid.is_none())
    }

    /// Prepares volumes, runs init containers, starts the containers, reports Running.
    async fn start(&mut self) {
        self.write_status().await;
        if self.shared.mode == Mode::NoProcess {
            let t = now();
            for c in &mut self.ctrs {
                c.state = State::Running {
                    started_at: t.clone(),
                };
            }
            self.write_status().await;
            return;
        }
        if let Some(bad) = self.ctrs.iter().find(|c| c.image.contains("nonexistent")) {
            let (name, image) = (bad.name.clone(), bad.image.clone());
            warn!(container = %name, image = %image, "image cannot be pulled (test-bed rule: name contains 'nonexistent')");
            for c in &mut self.ctrs {
                if c.name == name {
                    c.state = State::Waiting {
                        reason: "ErrImagePull".into(),
                        message: format!("failed to pull image \"{image}\": not found"),
                    };
                }
            }
            self.write_status().await;
            return;
        }
        if let Err(err) = std::fs::create_dir_all(self.dir.join("volumes")) {
            warn!(error = %err, "cannot create the pod folder");
        }
        let volumes = match self.claim_dirs().await {
            Ok(claims) => self.prepare_volumes(claims).await,
            Err(err) => Err(err),
        };
        let volumes = match volumes {
            Ok(v) => v,
            Err(err) => {
                warn!(error = %err, "volume setup failed");
                for c in &mut self.ctrs {
                    c.state = State::Waiting {
                        reason: "CreateContainerConfigError".into(),
                        message: err.to_string(),
                    };
                }
                self.write_status().await;
                return;
            }
        };
        self.volumes = volumes;
        for i in 0..self.init.len() {
            let code = self.run_init(i).await;
            if code != 0 && self.restart_policy() == "Never" {
                self.write_status().await;
                return;
            }
        }
        for i in 0..self.ctrs.len() {
            self.start_container(i, false).await;
        }
        self.write_status().await;
    }
}

/// Why a container could not be started: the waiting or terminated reason and a message.
struct StartFailure {
    reason: &'static str,
    message: String,
}

impl Worker {
    fn container_spec(&self, init: bool, i: usize) -> Option<Container> {
        let spec = self.pod.spec.as_ref()?;
        if init {
            spec.init_containers.as_ref()?.get(i).cloned()
        } else {
            spec.containers.get(i).cloned()
        }
    }

    /// Where the container's paths are: `/opt/spark` of a Spark image is the local Spark; each
    /// volume mount is a symlink `<pod dir>/root/<mountPath>` to the volume's folder (see
    /// [`mounts::materialise`]).
    fn path_map(&self, c: &Container) -> std::io::Result<PathMap> {
        let mut fixed = Vec::new();
        if spec::is_spark_image(c.image.as_deref().unwrap_or_default()) {
            fixed.push(Mapping {
                path: "/opt/spark".into(),
                local: self.shared.host.spark_home.clone(),
            });
        }
        let mut mounts = Vec::new();
        for m in c.volume_mounts.iter().flatten() {
            if let Some(local) = self.volumes.get(&m.name) {
                let local = match m.sub_path.as_deref() {
                    Some(sub) if !sub.is_empty() => local.join(sub),
                    _ => local.clone(),
                };
                mounts.push(Mapping {
                    path: m.mount_path.clone(),
                    local,
                });
            }
        }
        mounts::materialise(
            &self.dir.join("root"),
            &self.dir.join(format!("root-{}", c.name)),
            &fixed,
            &mounts,
        )
    }

    /// Container `c`'s working directory on this machine: its `workingDir` mapped, when that
    /// exists, else the pod's folder.
    fn working_dir(&self, c: &Container, paths: &PathMap) -> PathBuf {
        c.working_dir
            .as_deref()
            .map(|w| PathBuf::from(paths.rewrite(w)))
            .filter(|p| p.is_dir())
            .unwrap_or_else(|| self.dir.clone())
    }

    /// Starts container `c`; stdout and stderr go to `<pod dir>/<name>.log`.
    async fn launch(&self, c: &Container) -> Result<process::Started, StartFailure> {
        let paths = self.path_map(c).map_err(|e| StartFailure {
            reason: "CreateContainerConfigError",
            message: format!("cannot create the mount points: {e}"),
        })?;
        let env = self
            .container_env(c, &paths)
            .await
            .map_err(|e| StartFailure {
                reason: "CreateContainerConfigError",
                message: e.to_string(),
            })?;
        let image = c.image.clone().unwrap_or_default();
        let pod_host = self.pod_host().map_err(|e| StartFailure {
            reason: "CreateContainerConfigError",
            message: format!("cannot add the pod to the pod hosts file: {e}"),
        })?;
        let mut cl = spec::command_line(
            &image,
            c.command.as_deref().unwrap_or_default(),
            c.args.as_deref().unwrap_or_default(),
            &env,
            &self.shared.host,
            pod_host.as_ref(),
        )
        .map_err(|e| StartFailure {
            reason: "StartError",
            message: e.to_string(),
        })?;
        cl.program = paths.rewrite(&cl.program);
        cl.args = cl.args.iter().map(|a| paths.rewrite(a)).collect();
        let cwd = self.working_dir(c, &paths);
        let log = self.dir.join(format!("{}.log", c.name));
        debug!(container = %c.name, program = %cl.program, args = ?cl.args, "starting");
        process::start(&cl, &env, &cwd, &log).map_err(|e| StartFailure {
            reason: "StartError",
            message: format!("cannot start {}: {e}", cl.program),
        })
    }

    /// With `--pod-hosts-file`: the pod's own host name, in the file before any of its
    /// containers starts.
    fn pod_host(&self) -> std::io::Result<Option<spec::PodHost>> {
        let Some(hosts) = &self.shared.pod_hosts else {
            return Ok(None);
        };
        let name = crate::hosts::pod_host_name(&self.name, &self.namespace);
        hosts.add(&name)?;
        Ok(Some(spec::PodHost {
            name,
            hosts_file: hosts.path().to_path_buf(),
        }))
    }

    async fn run_init(&mut self, i: usize) -> i32 {
        let Some(c) = self.container_spec(true, i) else {
            return 0;
        };
        let started_at = now();
        self.init[i].state = State::Running {
            started_at: started_at.clone(),
        };
        let (code, reason, message) = match self.launch(&c).await {
            Ok(mut started) => match started.child.wait().await {
                Ok(status) => {
                    let code = process::exit_code(status);
                    (
                        code,
                        if code == 0 { "Completed" } else { "Error" }.to_string(),
                        String::new(),
                    )
                }
                Err(err) => (128, "StartError".to_string(), err.to_string()),
            },
            Err(f) => (128, f.reason.to_string(), f.message),
        };
        info!(container = %c.name, code, "init container finished");
        self.init[i].state = State::Terminated {
            code,
            reason,
            message,
            started_at,
            finished_at: now(),
        };
        code
    }

    async fn start_container(&mut self, i: usize, _restart: bool) {
        let Some(c) = self.container_spec(false, i) else {
            return;
        };
        match self.launch(&c).await {
            Ok(started) => {
                let pid = started.pid;
                info!(container = %c.name, pid, "container started");
                self.ctrs[i].pid = Some(pid);
                self.ctrs[i].state = State::Running { started_at: now() };
                let tx = self.local_tx.clone();
                let mut child = started.child;
                tokio::spawn(async move {
                    let code = match child.wait().await {
                        Ok(status) => process::exit_code(status),
                        Err(_) => 255,
                    };
                    let _ = tx.send(Local::Exited(i, code));
                });
            }
            Err(f) => {
                warn!(container = %c.name, reason = f.reason, message = %f.message, "container cannot start");
                let t = now();
                self.ctrs[i].state = if f.reason == "CreateContainerConfigError" {
                    State::Waiting {
                        reason: f.reason.into(),
                        message: f.message,
                    }
                } else {
                    State::Terminated {
                        code: 128,
                        reason: f.reason.into(),
                        message: f.message,
                        started_at: t.clone(),
                        finished_at: t,
                    }
                };
            }
        }
    }

    async fn on_exit(&mut self, i: usize, code: i32) {
        let policy = self.restart_policy().to_string();
        let deleting = self.deleting || self.evicted;
        let c = &mut self.ctrs[i];
        c.pid = None;
        c.kill_at = None;
        match c.hook.take() {
            // decom.sh waits for the JVM to exit (`tail --pid`): it has.
            Some(Hook::SparkDecom) => {
                info!(container = %c.name, "preStop hook done: the main process exited")
            }
            // An exec'd hook dies with its container.
            Some(Hook::Process(hook)) => process::kill_container(hook),
            None => {}
        }
        let (code, reason) = c.forced.take().unwrap_or_else(|| {
            (
                code,
                if code == 0 { "Completed" } else { "Error" }.to_string(),
            )
        });
        let started_at = match &c.state {
            State::Running { started_at } => started_at.clone(),
            _ => now(),
        };
        info!(container = %c.name, code, reason = %reason, "container exited");
        c.state = State::Terminated {
            code,
            reason,
            message: String::new(),
            started_at,
            finished_at: now(),
        };
        let restart = !deleting
            && match policy.as_str() {
                "Always" => true,
                "OnFailure" => code != 0,
                _ => false,
            };
        if restart {
            c.last = Some(c.state.clone());
            c.restarts += 1;
            let delay = Duration::from_secs(u64::from(c.restarts.min(10)));
            let tx = self.local_tx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = tx.send(Local::Restart(i));
            });
        }
        if !self.deleting {
            self.write_status().await;
        }
    }

    /// Applies the `testbed.stoker.dev/fault` annotation once per distinct value.
    async fn apply_fault(&mut self) {
        let value = self
            .pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(FAULT_ANNOTATION))
            .cloned();
        if value == self.applied_fault {
            return;
        }
        self.applied_fault = value.clone();
        let Some(value) = value else { return };
        let forced: (i32, String) = match value.as_str() {
            "oom" => (137, "OOMKilled".into()),
            "kill" => (137, "Error".into()),
            "evict" => {
                warn!("fault: evicting the pod");
                self.evicted = true;
                self.pod_reason = Some((
                    "Evicted".into(),
                    "The node was low on resource: memory. (test-bed fault injection)".into(),
                ));
                for c in &mut self.ctrs {
                    if !matches!(c.state, State::Terminated { .. }) {
                        c.forced = Some((137, "Error".into()));
                    }
                }
                self.kill_all(Signal::SIGKILL);
                if self.shared.mode == Mode::NoProcess {
                    for i in 0..self.ctrs.len() {
                        self.on_exit(i, 137).await;
                    }
                }
                self.write_status().await;
                return;
            }
            v => match v.strip_prefix("exit:").and_then(|n| n.parse::<i32>().ok()) {
                Some(code) => (code, if code == 0 { "Completed" } else { "Error" }.into()),
                None => {
                    warn!(fault = %v, "unknown fault (use oom, kill, exit:<code> or evict); ignored");
                    return;
                }
            },
        };
        let Some(i) = self
            .ctrs
            .iter()
            .position(|c| matches!(c.state, State::Running { .. }))
        else {
            warn!(fault = %value, "no running container to apply the fault to");
            return;
        };
        warn!(fault = %value, container = %self.ctrs[i].name, "fault: killing container");
        let code = forced.0;
        self.ctrs[i].forced = Some(forced);
        match self.ctrs[i].pid {
            Some(pid) => process::kill_container(pid),
            None => self.on_exit(i, code).await,
        }
    }

    /// The memory limit covers every process of the container (its group and all descendants,
    /// as a cgroup does), and going over it kills all of them (`memory.oom.group=1`).
    fn check_oom(&mut self) {
        let procs = process::processes();
        for c in &mut self.ctrs {
            let (Some(pid), Some(limit)) = (c.pid, c.memory_limit) else {
                continue;
            };
            let members = process::container_members(&procs, pid);
            let used: u64 = members.iter().map(|p| p.rss).sum();
            if used > limit && c.forced.is_none() {
                let processes: Vec<(i32, u64)> = members.iter().map(|p| (p.pid, p.rss)).collect();
                warn!(container = %c.name, used, limit, ?processes, "memory limit exceeded: OOM kill");
                c.forced = Some((137, "OOMKilled".into()));
                process::kill_container(pid);
            }
        }
    }

    fn kill_all(&mut self, signal: Signal) {
        for c in &mut self.ctrs {
            if signal == Signal::SIGKILL {
                if let Some(Hook::Process(hook)) = c.hook.take() {
                    process::kill_container(hook);
                }
            }
            if let Some(pid) = c.pid {
                if signal == Signal::SIGKILL {
                    process::kill_container(pid);
                } else {
                    process::signal_group(pid, signal);
                }
            }
        }
    }

    /// A graceful deletion stops each running container as the kubelet does: its `preStop`
    /// hook first (if it has one), SIGTERM once the hook returns, SIGKILL when the grace period
    /// is over (the hook's time counts against it; at least [`spec::MIN_GRACE_AFTER_HOOK`] after
    /// the SIGTERM). Grace 0: SIGKILL at once, no hook.
    async fn begin_delete(&mut self) {
        self.deleting = true;
        let grace = self
            .pod
            .metadata
            .deletion_grace_period_seconds
            .unwrap_or(30)
            .max(0);
        let grace = u64::try_from(grace).unwrap_or(0);
        info!(grace_seconds = grace, "pod deleted: stopping containers");
        if grace == 0 {
            self.kill_all(Signal::SIGKILL);
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(grace);
        for i in 0..self.ctrs.len() {
            let Some(pid) = self.ctrs[i].pid else {
                continue;
            };
            self.ctrs[i].kill_at = Some(deadline);
            let Some(c) = self.container_spec(false, i) else {
                process::signal_group(pid, Signal::SIGTERM);
                continue;
            };
            let hook = c.lifecycle.as_ref().and_then(|l| l.pre_stop.as_ref());
            match spec::pre_stop(c.image.as_deref().unwrap_or_default(), hook) {
                PreStop::None => process::signal_group(pid, Signal::SIGTERM),
                PreStop::SparkDecom => {
                    // The apache/spark image's /opt/decom.sh (not in the pyspark package) finds
                    // the executor JVM (`ps -o pid,cmd -C java | grep Executor`), sends it
                    // `kill -s SIGPWR` and waits for it to exit (`tail --pid=$WORKER_PID -f
                    // /dev/null`); its closing `sleep 1`s do not outlast the container, which
                    // ends with the JVM. Here the JVM is the container's main process: SIGPWR to
                    // it alone (not its group: the default action of SIGPWR would end PySpark's
                    // workers), and the hook is over when it exits (see on_exit).
                    info!(container = %c.name, pid, script = spec::SPARK_DECOM_SCRIPT,
                        "preStop hook: SIGPWR to the executor JVM, waiting for it to exit");
                    process::signal_pid(pid, Signal::SIGPWR);
                    self.ctrs[i].hook = Some(Hook::SparkDecom);
                }
                PreStop::Exec(command) => match self.start_hook(&c, i, &command).await {
                    Ok(hook) => {
                        info!(container = %c.name, ?command, hook_pid = hook, "preStop hook started");
                        self.ctrs[i].hook = Some(Hook::Process(hook));
                    }
                    Err(err) => {
                        // The kubelet records a FailedPreStopHook event and stops the container.
                        warn!(container = %c.name, ?command, error = %err,
                            "FailedPreStopHook: the preStop hook cannot run; SIGTERM");
                        process::signal_group(pid, Signal::SIGTERM);
                    }
                },
                PreStop::Unsupported(why) => {
                    warn!(container = %c.name, why = %why, "preStop hook not run; SIGTERM");
                    process::signal_group(pid, Signal::SIGTERM);
                }
            }
        }
    }

    /// Starts container `c`'s exec `preStop` hook as a process with the container's environment,
    /// path mapping and working directory; its output goes to `<pod dir>/<name>.prestop.log`.
    /// Its end comes back as [`Local::HookDone`].
    async fn start_hook(&self, c: &Container, i: usize, command: &[String]) -> anyhow::Result<i32> {
        let paths = self.path_map(c)?;
        let env = self.container_env(c, &paths).await?;
        let (program, args) = command
            .split_first()
            .ok_or_else(|| anyhow::anyhow!("empty command"))?;
        let cl = spec::CommandLine {
            program: paths.rewrite(program),
            args: args.iter().map(|a| paths.rewrite(a)).collect(),
        };
        let cwd = self.working_dir(c, &paths);
        let log = self.dir.join(format!("{}.prestop.log", c.name));
        let mut started = process::start(&cl, &env, &cwd, &log)?;
        let tx = self.local_tx.clone();
        tokio::spawn(async move {
            let code = match started.child.wait().await {
                Ok(status) => process::exit_code(status),
                Err(_) => 255,
            };
            let _ = tx.send(Local::HookDone(i, code));
        });
        Ok(started.pid)
    }

    /// Container `i`'s exec hook ended: SIGTERM now, SIGKILL at the end of the grace period.
    fn hook_done(&mut self, i: usize, code: i32) {
        let c = &mut self.ctrs[i];
        if !matches!(c.hook, Some(Hook::Process(_))) {
            return; // timed out or the container is gone: already handled
        }
        c.hook = None;
        if code == 0 {
            info!(container = %c.name, "preStop hook done; SIGTERM");
        } else {
            // exec-guard exits 127 when the command cannot be run.
            warn!(container = %c.name, code, "FailedPreStopHook: the preStop hook failed; SIGTERM");
        }
        if let Some(pid) = c.pid {
            let now = Instant::now();
            process::signal_group(pid, Signal::SIGTERM);
            c.kill_at = Some(spec::kill_deadline_after_hook(
                c.kill_at.unwrap_or(now),
                now,
            ));
        }
    }

    /// The grace period of some container is over: one still in its hook gets SIGTERM and the
    /// short window; the others SIGKILL.
    fn grace_over(&mut self) {
        let now = Instant::now();
        for c in &mut self.ctrs {
            if c.kill_at.is_none_or(|t| t > now) {
                continue;
            }
            let Some(pid) = c.pid else {
                c.kill_at = None;
                continue;
            };
            if let Some(hook) = c.hook.take() {
                warn!(container = %c.name, "preStop hook not completed in the grace period; SIGTERM");
                if let Hook::Process(hook) = hook {
                    process::kill_container(hook);
                }
                process::signal_group(pid, Signal::SIGTERM);
                c.kill_at = Some(now + spec::MIN_GRACE_AFTER_HOOK);
            } else {
                warn!(container = %c.name, "grace period over; SIGKILL");
                c.kill_at = None;
                process::kill_container(pid);
            }
        }
    }

    async fn finish_delete(&mut self) {
        self.write_status().await;
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(self.uid.clone()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        let _permit = self.shared.api_limit.acquire().await;
        match self.api.delete(&self.name, &dp).await {
            Ok(_) => info!("pod object removed"),
            Err(kube::Error::Api(s)) if s.is_not_found() || s.is_conflict() => {}
            Err(err) => warn!(error = %err, "final pod delete failed"),
        }
    }

    fn phase(&self) -> &'static str {
        if self.evicted {
            return "Failed";
        }
        let policy = self.restart_policy();
        let init_failed = self
            .init
            .iter()
            .any(|c| matches!(c.state, State::Terminated { code, .. } if code != 0));
        if init_failed && policy == "Never" {
            return "Failed";
        }
        let any_running = self
            .ctrs
            .iter()
            .any(|c| matches!(c.state, State::Running { .. }));
        let all_terminated = self
            .ctrs
            .iter()
            .all(|c| matches!(c.state, State::Terminated { .. }));
        if all_terminated && (policy == "Never" || self.deleting || policy == "OnFailure") {
            let ok = self
                .ctrs
                .iter()
                .all(|c| matches!(c.state, State::Terminated { code: 0, .. }));
            if ok {
                return "Succeeded";
            }
            if policy != "OnFailure" || self.deleting {
                return "Failed";
            }
        }
        if any_running
            || self
                .ctrs
                .iter()
                .any(|c| c.restarts > 0 || matches!(c.state, State::Terminated { .. }))
        {
            "Running"
        } else {
            "Pending"
        }
    }

    fn status_json(&self) -> Value {
        let phase = self.phase();
        let t = now();
        let all_running = self
            .ctrs
            .iter()
            .all(|c| matches!(c.state, State::Running { .. }));
        let started = self
            .ctrs
            .iter()
            .any(|c| !matches!(c.state, State::Waiting { .. }));
        let init_done = self
            .init
            .iter()
            .all(|c| matches!(c.state, State::Terminated { code: 0, .. }));
        let cond = |kind: &str, ok: bool| json!({"type": kind, "status": if ok { "True" } else { "False" }, "lastTransitionTime": t});
        let mut conditions = vec![
            cond("PodReadyToStartContainers", started || phase != "Pending"),
            cond("Initialized", init_done),
            cond("Ready", all_running && !self.deleting),
            cond("ContainersReady", all_running && !self.deleting),
            cond("PodScheduled", true),
        ];
        if self.evicted {
            conditions.push(json!({"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet",
                "message": "The node was low on resource: memory.", "lastTransitionTime": t}));
        }
        let statuses = |cs: &[Ctr]| -> Vec<Value> {
            cs.iter()
                .map(|c| {
                    let running = matches!(c.state, State::Running { .. });
                    let mut v = json!({
                        "name": c.name,
                        "image": c.image,
                        "imageID": format!("process://{}", c.image),
                        "ready": running && !self.deleting,
                        "started": running,
                        "restartCount": c.restarts,
                        "state": state_json(&c.state, c.pid),
                        "lastState": c.last.as_ref().map_or(json!({}), |s| state_json(s, None)),
                    });
                    if let Some(pid) = c.pid {
                        v["containerID"] = json!(format!("process://{pid}"));
                    }
                    v
                })
                .collect()
        };
        let (reason, message) = match &self.pod_reason {
            Some((r, m)) => (json!(r), json!(m)),
            None => (Value::Null, Value::Null),
        };
        let mut status = json!({
            "phase": phase,
            "conditions": conditions,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
            "startTime": self.start_time,
            "containerStatuses": statuses(&self.ctrs),
            "reason": reason,
            "message": message,
        });
        if !self.init.is_empty() {
            status["initContainerStatuses"] = json!(statuses(&self.init));
        }
        json!({ "status": status })
    }

    async fn write_status(&self) {
        if self.silent {
            return;
        }
        let body = self.status_json();
        for attempt in 1..=5u64 {
            let result = {
                let _permit = self.shared.api_limit.acquire().await;
                self.api
                    .patch_status(&self.name, &PatchParams::default(), &Patch::Merge(&body))
                    .await
            };
            match result {
                Ok(_) => return,
                Err(kube::Error::Api(s)) if s.is_not_found() => return,
                Err(err) => {
                    warn!(attempt, error = %err, "pod status update failed");
                    tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
                }
            }
        }
    }

    // ---- volumes and environment ----

    /// The pod's volumes.
    fn volumes(&self) -> Vec<Volume> {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.clone())
            .unwrap_or_default()
    }

    /// The local folder of every persistentVolumeClaim volume: the hostPath of the
    /// PersistentVolume its claim is bound to. Waits up to `claim_wait` for each claim to be
    /// Bound, reporting the containers waiting (ContainerCreating) with what it waits for.
    async fn claim_dirs(&mut self) -> anyhow::Result<BTreeMap<String, PathBuf>> {
        let volumes = self.volumes();
        let mut out = BTreeMap::new();
        for v in volumes {
            if let Some(pvc) = &v.persistent_volume_claim {
                let dir = self.claim_dir(&pvc.claim_name).await?;
                out.insert(v.name.clone(), dir);
            }
        }
        Ok(out)
    }

    /// Waits, on watches of the claim and of this pod (no polling), until `claim` is Bound
    /// (then its volume's folder), the wait runs out, or the pod is deleted meanwhile.
    async fn claim_dir(&mut self, claim: &str) -> anyhow::Result<PathBuf> {
        enum Seen {
            Claim(Box<Result<watcher::Event<PersistentVolumeClaim>, watcher::Error>>),
            Pod(Box<Result<watcher::Event<Pod>, watcher::Error>>),
        }
        let by_name =
            |name: &str| watcher::Config::default().fields(&format!("metadata.name={name}"));
        let claims: Api<PersistentVolumeClaim> =
            Api::namespaced(self.shared.client.clone(), &self.namespace);
        let claim_events = watcher::watcher(claims, by_name(claim))
            .default_backoff()
            .map(|e| Seen::Claim(Box::new(e)));
        let pod_events = watcher::watcher(self.api.clone(), by_name(&self.name))
            .default_backoff()
            .map(|e| Seen::Pod(Box::new(e)));
        let mut events = futures::stream::select(claim_events.boxed(), pod_events.boxed());
        let deadline = tokio::time::Instant::now() + self.shared.claim_wait;
        let mut why = "not found".to_string();
        let mut reported = String::new();
        let mut pod_listed = false;
        loop {
            let event = match tokio::time::timeout_at(deadline, events.next()).await {
                Ok(Some(event)) => event,
                Ok(None) => anyhow::bail!("the watch of persistentvolumeclaim \"{claim}\" ended"),
                Err(_) => anyhow::bail!(
                    "persistentvolumeclaim \"{claim}\" (namespace {}) is not bound after {} s: {why}",
                    self.namespace,
                    self.shared.claim_wait.as_secs()
                ),
            };
            let deleted = || {
                anyhow::anyhow!(
                    "the pod was deleted while waiting for persistentvolumeclaim \"{claim}\""
                )
            };
            let claim_event = match event {
                Seen::Claim(claim_event) => *claim_event,
                Seen::Pod(pod_event) => {
                    match *pod_event {
                        Ok(watcher::Event::Init) => pod_listed = false,
                        Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => {
                            pod_listed = true;
                            if p.metadata.deletion_timestamp.is_some()
                                || p.metadata.uid.as_deref() != Some(self.uid.as_str())
                            {
                                return Err(deleted());
                            }
                        }
                        Ok(watcher::Event::InitDone) if !pod_listed => return Err(deleted()),
                        Ok(watcher::Event::Delete(_)) => return Err(deleted()),
                        Ok(watcher::Event::InitDone) => {}
                        Err(err) => debug!(error = %err, "cannot watch the pod"),
                    }
                    continue;
                }
            };
            match claim_event {
                Ok(watcher::Event::Apply(pvc) | watcher::Event::InitApply(pvc)) => {
                    let phase = pvc
                        .status
                        .and_then(|s| s.phase)
                        .unwrap_or_else(|| "Pending".into());
                    let volume = pvc
                        .spec
                        .and_then(|s| s.volume_name)
                        .filter(|v| !v.is_empty());
                    match (phase.as_str(), volume) {
                        ("Bound", Some(pv)) => return self.volume_dir(claim, &pv).await,
                        _ => why = format!("it is {phase}"),
                    }
                }
                Ok(watcher::Event::Init) => {
                    why = "not found".into();
                    continue; // a (re-)list follows: report what it shows
                }
                Ok(watcher::Event::Delete(_)) => why = "not found".into(),
                Ok(watcher::Event::InitDone) => {}
                Err(err) => why = format!("cannot read it: {err}"),
            }
            let message =
                format!("waiting for persistentvolumeclaim \"{claim}\" to be bound: {why}");
            if message != reported {
                info!(claim, why = %why, "waiting for the claim to be bound");
                for c in &mut self.ctrs {
                    c.state = State::Waiting {
                        reason: "ContainerCreating".into(),
                        message: message.clone(),
                    };
                }
                self.write_status().await;
                reported = message;
            }
        }
    }

    /// The local folder of PersistentVolume `pv` (bound to `claim`): its hostPath, created if
    /// missing. Other kinds of volume cannot be mounted here.
    async fn volume_dir(&self, claim: &str, pv: &str) -> anyhow::Result<PathBuf> {
        let api: Api<PersistentVolume> = Api::all(self.shared.client.clone());
        let volume = api.get(pv).await.map_err(|e| {
            anyhow::anyhow!(
                "persistentvolumeclaim \"{claim}\": cannot read persistentvolume \"{pv}\": {e}"
            )
        })?;
        let Some(path) = volume.spec.and_then(|s| s.host_path).map(|h| h.path) else {
            anyhow::bail!(
                "persistentvolumeclaim \"{claim}\" is bound to persistentvolume \"{pv}\", which is not a hostPath volume: the test-bed kubelet mounts only hostPath persistent volumes"
            );
        };
        let path = PathBuf::from(path);
        std::fs::create_dir_all(&path).map_err(|e| {
            anyhow::anyhow!(
                "persistentvolumeclaim \"{claim}\": cannot create {}: {e}",
                path.display()
            )
        })?;
        info!(claim, volume = pv, path = %path.display(), "claim mounted");
        Ok(path)
    }

    async fn prepare_volumes(
        &self,
        mut claims: BTreeMap<String, PathBuf>,
    ) -> anyhow::Result<BTreeMap<String, PathBuf>> {
        let mut out = BTreeMap::new();
        let volumes = self.volumes();
        for v in volumes {
            if let Some(hp) = &v.host_path {
                out.insert(v.name.clone(), PathBuf::from(&hp.path));
                continue;
            }
            if let Some(dir) = claims.remove(&v.name) {
                out.insert(v.name.clone(), dir);
                continue;
            }
            let local = self.dir.join("volumes").join(&v.name);
            std::fs::create_dir_all(&local)?;
            if let Some(cm) = &v.config_map {
                let data = self
                    .config_map_data(&cm.name, cm.optional.unwrap_or(false))
                    .await?;
                write_items(&local, &data, cm.items.as_deref())?;
            } else if let Some(s) = &v.secret {
                let name = s.secret_name.clone().unwrap_or_default();
                let data = self.secret_data(&name, s.optional.unwrap_or(false)).await?;
                write_items(&local, &data, s.items.as_deref())?;
            } else if let Some(p) = &v.projected {
                for src in p.sources.iter().flatten() {
                    if let Some(t) = &src.service_account_token {
                        let token = self
                            .service_account_token(t.audience.as_deref(), t.expiration_seconds)
                            .await?;
                        write_file(&local.join(&t.path), token.as_bytes())?;
                    }
                    if let Some(cm) = &src.config_map {
                        let data = self
                            .config_map_data(&cm.name, cm.optional.unwrap_or(false))
                            .await?;
                        write_items(&local, &data, cm.items.as_deref())?;
                    }
                    if let Some(s) = &src.secret {
                        let data = self
                            .secret_data(&s.name, s.optional.unwrap_or(false))
                            .await?;
                        write_items(&local, &data, s.items.as_deref())?;
                    }
                    if let Some(d) = &src.downward_api {
                        for item in d.items.iter().flatten() {
                            if let Some(f) = &item.field_ref {
                                let value = self.field(&f.field_path).unwrap_or_default();
                                write_file(&local.join(&item.path), value.as_bytes())?;
                            }
                        }
                    }
                }
            } else if let Some(d) = &v.downward_api {
                for item in d.items.iter().flatten() {
                    if let Some(f) = &item.field_ref {
                        let value = self.field(&f.field_path).unwrap_or_default();
                        write_file(&local.join(&item.path), value.as_bytes())?;
                    }
                }
            }
            out.insert(v.name.clone(), local);
        }
        Ok(out)
    }

    /// Data of a ConfigMap; waits up to 10 s for one that is not optional to appear.
    async fn config_map_data(
        &self,
        name: &str,
        optional: bool,
    ) -> anyhow::Result<BTreeMap<String, Vec<u8>>> {
        let api: Api<ConfigMap> = Api::namespaced(self.shared.client.clone(), &self.namespace);
        for _ in 0..20 {
            if let Some(cm) = api.get_opt(name).await? {
                let mut data: BTreeMap<String, Vec<u8>> = cm
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes()))
                    .collect();
                data.extend(
                    cm.binary_data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.0)),
                );
                return Ok(data);
            }
            if optional {
                return Ok(BTreeMap::new());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        anyhow::bail!(
            "configmap \"{name}\" not found in namespace {}",
            self.namespace
        )
    }

    async fn secret_data(
        &self,
        name: &str,
        optional: bool,
    ) -> anyhow::Result<BTreeMap<String, Vec<u8>>> {
        let api: Api<Secret> = Api::namespaced(self.shared.client.clone(), &self.namespace);
        for _ in 0..20 {
            if let Some(s) = api.get_opt(name).await? {
                let mut data: BTreeMap<String, Vec<u8>> = s
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0))
                    .collect();
                data.extend(
                    s.string_data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.into_bytes())),
                );
                return Ok(data);
            }
            if optional {
                return Ok(BTreeMap::new());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        anyhow::bail!(
            "secret \"{name}\" not found in namespace {}",
            self.namespace
        )
    }

    /// A token of the pod's ServiceAccount bound to the pod, as the kubelet projects it.
    async fn service_account_token(
        &self,
        audience: Option<&str>,
        expiration: Option<i64>,
    ) -> anyhow::Result<String> {
        let sa = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into());
        let api: Api<ServiceAccount> = Api::namespaced(self.shared.client.clone(), &self.namespace);
        let request: TokenRequest = serde_json::from_value(json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "audiences": audience.map(|a| vec![a.to_string()]).unwrap_or_default(),
                "expirationSeconds": expiration.unwrap_or(3607),
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": self.name, "uid": self.uid},
            }
        }))?;
        let response = api
            .create_token_request(&sa, &PostParams::default(), &request)
            .await?;
        response.status.and_then(|s| s.token).ok_or_else(|| {
            anyhow::anyhow!("token request for service account {sa} returned no token")
        })
    }

    fn field(&self, path: &str) -> Option<String> {
        let meta = &self.pod.metadata;
        let lookup = |map: &Option<BTreeMap<String, String>>, prefix: &str| {
            let key = path.strip_prefix(prefix)?.strip_suffix("']")?;
            map.as_ref()?.get(key).cloned()
        };
        match path {
            "metadata.name" => Some(self.name.clone()),
            "metadata.namespace" => Some(self.namespace.clone()),
            "metadata.uid" => Some(self.uid.clone()),
            "spec.nodeName" => Some(self.node.clone()),
            "spec.serviceAccountName" => Some(
                self.pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.service_account_name.clone())
                    .unwrap_or_else(|| "default".into()),
            ),
            "status.podIP" | "status.podIPs" | "status.hostIP" | "status.hostIPs" => {
                Some("127.0.0.1".into())
            }
            p if p.starts_with("metadata.labels['") => lookup(&meta.labels, "metadata.labels['"),
            p if p.starts_with("metadata.annotations['") => {
                lookup(&meta.annotations, "metadata.annotations['")
            }
            _ => None,
        }
    }

    async fn container_env(
        &self,
        c: &Container,
        paths: &PathMap,
    ) -> anyhow::Result<BTreeMap<String, String>> {
        let mut env = self.shared.base_env.clone();
        env.insert("HOSTNAME".into(), self.name.clone());
        if spec::is_spark_image(c.image.as_deref().unwrap_or_default()) {
            env.insert(
                "SPARK_HOME".into(),
                self.shared.host.spark_home.display().to_string(),
            );
        }
        for from in c.env_from.iter().flatten() {
            let prefix = from.prefix.clone().unwrap_or_default();
            let data = if let Some(cm) = &from.config_map_ref {
                self.config_map_data(&cm.name, cm.optional.unwrap_or(false))
                    .await?
            } else if let Some(s) = &from.secret_ref {
                self.secret_data(&s.name, s.optional.unwrap_or(false))
                    .await?
            } else {
                BTreeMap::new()
            };
            for (k, v) in data {
                env.insert(
                    format!("{prefix}{k}"),
                    String::from_utf8_lossy(&v).into_owned(),
                );
            }
        }
        for e in c.env.iter().flatten() {
            let value = if let Some(v) = &e.value {
                Some(spec::expand(v, &env))
            } else if let Some(from) = &e.value_from {
                if let Some(f) = &from.field_ref {
                    Some(self.field(&f.field_path).ok_or_else(|| {
                        anyhow::anyhow!("env {}: unsupported fieldRef {}", e.name, f.field_path)
                    })?)
                } else if let Some(r) = &from.resource_field_ref {
                    Some(self.resource(c, &r.resource, r.divisor.as_ref().map(|d| d.0.as_str()))?)
                } else if let Some(k) = &from.config_map_key_ref {
                    let optional = k.optional.unwrap_or(false);
                    let data = self.config_map_data(&k.name, optional).await?;
                    match data.get(&k.key) {
                        Some(v) => Some(String::from_utf8_lossy(v).into_owned()),
                        None if optional => None,
                        None => anyhow::bail!(
                            "env {}: key {} not in configmap {}",
                            e.name,
                            k.key,
                            k.name
                        ),
                    }
                } else if let Some(k) = &from.secret_key_ref {
                    let optional = k.optional.unwrap_or(false);
                    let data = self.secret_data(&k.name, optional).await?;
                    match data.get(&k.key) {
                        Some(v) => Some(String::from_utf8_lossy(v).into_owned()),
                        None if optional => None,
                        None => {
                            anyhow::bail!("env {}: key {} not in secret {}", e.name, k.key, k.name)
                        }
                    }
                } else {
                    None
                }
            } else {
                Some(String::new())
            };
            if let Some(v) = value {
                env.insert(e.name.clone(), v);
            }
        }
        for v in env.values_mut() {
            *v = paths.rewrite(v);
        }
        Ok(env)
    }

    fn resource(
        &self,
        c: &Container,
        resource: &str,
        divisor: Option<&str>,
    ) -> anyhow::Result<String> {
        let r = c.resources.as_ref();
        let get = |kind: &str, name: &str| {
            let map = if kind == "limits" {
                r.and_then(|r| r.limits.as_ref())
            } else {
                r.and_then(|r| r.requests.as_ref())
            };
            map.and_then(|m| m.get(name)).map(|q| q.0.clone())
        };
        let (kind, name) = resource
            .split_once('.')
            .ok_or_else(|| anyhow::anyhow!("bad resource {resource}"))?;
        let quantity = get(kind, name)
            .or_else(|| {
                if kind == "requests" {
                    get("limits", name)
                } else {
                    None
                }
            })
            .unwrap_or_else(|| match name {
                "cpu" => self.shared.capacity.cpu.clone(),
                "memory" => self.shared.capacity.memory.clone(),
                _ => "0".into(),
            });
        if name == "cpu" {
            let m = spec::parse_millicores(&quantity)?;
            let d = spec::parse_millicores(divisor.unwrap_or("1"))?.max(1);
            Ok(m.div_ceil(d).to_string())
        } else {
            let b = spec::parse_bytes(&quantity)?;
            let d = spec::parse_bytes(divisor.unwrap_or("1"))?.max(1);
            Ok(b.div_ceil(d).to_string())
        }
    }
}

fn state_json(s: &State, pid: Option<i32>) -> Value {
    match s {
        State::Waiting { reason, message } => {
            json!({"waiting": {"reason": reason, "message": message}})
        }
        State::Running { started_at } => json!({"running": {"startedAt": started_at}}),
        State::Terminated {
            code,
            reason,
            message,
            started_at,
            finished_at,
        } => {
            let mut t = json!({"exitCode": code, "reason": reason, "startedAt": started_at, "finishedAt": finished_at});
            if !message.is_empty() {
                t["message"] = json!(message);
            }
            if let Some(pid) = pid {
                t["containerID"] = json!(format!("process://{pid}"));
            }
            json!({ "terminated": t })
        }
    }
}

fn write_file(path: &Path, data: &[u8]) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(path, data)
}

fn write_items(
    dir: &Path,
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&[k8s_openapi::api::core::v1::KeyToPath]>,
) -> anyhow::Result<()> {
    match items {
        Some(items) => {
            for item in items {
                let value = data.get(&item.key).ok_or_else(|| {
                    anyhow::anyhow!("key {} not found for volume item {}", item.key, item.path)
                })?;
                write_file(&dir.join(&item.path), value)?;
            }
        }
        None => {
            for (k, v) in data {
                write_file(&dir.join(k), v)?;
            }
        }
    }
    Ok(())
}
