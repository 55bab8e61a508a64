//! Applications: the registry, and one actor (task) per application that owns its engine.
//!
//! The registry maps application ids to handles. A handle holds what can be checked without the
//! actor (the token) and channels to it. The actor is the only writer of its engine: it takes
//! commands and backend observations in order, sleeps until the engine's next deadline, carries
//! out the engine's actions on the backend, and publishes the last event sequence number and a
//! summary. Once the application has ended and every executor is gone it removes itself from the
//! registry. No DashMap guard is held across an `.await`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use stoker_core::fairshare::{ProfileDemand, QueueName, Shape};
use stoker_core::{
    Action, AppId, AppPhase, BackendObservation, DriverIdentity, Engine, EngineConfig, EngineError,
    Event, EventKind, ExecutorBackend, ExecutorEvent, ExecutorId, ExecutorPhase, ExecutorSize,
    ExecutorTemplate, LaunchRequest, Millis, Observation, ProfileId, ProfileUsage, Sizing,
};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::clock::Clock;
use crate::config::Limits;
use crate::error::{ApiError, Limit, LimitError};
use crate::metrics::{CauseLabel, Metrics, ReasonLabel};
use crate::queues::{QueueInputs, Queues};
use crate::quota::{total_after, Admission, QuotaKey, Quotas};
use crate::sizes::SizeStore;

/// A snapshot of an application, published by its actor after every input.
#[derive(Clone, Debug, Default)]
pub struct AppSummary {
    /// Application name.
    pub app_name: String,
    /// SPARK_USER.
    pub spark_user: String,
    /// Phase name.
    pub phase: &'static str,
    /// Targets per profile.
    pub targets: BTreeMap<ProfileId, u32>,
    /// Executors requested or pending.
    pub pending: u32,
    /// Executors running.
    pub running: u32,
    /// Executors being removed.
    pub deleting: u32,
    /// Executors exited so far.
    pub exited: u64,
    /// Failures counted toward the limit.
    pub failures: u32,
    /// When the lease expires (monotonic ms).
    pub lease_deadline: Millis,
    /// Last event sequence number.
    pub last_seq: u64,
    /// When the application registered (Unix ms).
    pub registered_unix_ms: i64,
    /// The size new executors get, per profile.
    pub sizes: BTreeMap<ProfileId, ExecutorSize>,
    /// Size changes so far.
    pub resizes: u32,
    /// What the fair share sees of it, per profile: its request, its executors, their shape.
    pub demand: BTreeMap<ProfileId, ProfileDemand>,
    /// Its queue, once the fair share has placed it (`--queues`).
    pub queue: Option<QueueName>,
    /// Executors admitted over all profiles (`--queues`); `None` without admission.
    pub admitted: Option<u64>,
}

/// One executor as GetApplication shows it.
#[derive(Clone, Debug)]
pub struct ExecutorView {
    /// Id.
    pub id: ExecutorId,
    /// Profile.
    pub profile: ProfileId,
    /// Phase.
    pub phase: ExecutorPhase,
    /// Host.
    pub host: String,
    /// Pod name or pid.
    pub backend_name: String,
    /// Being removed.
    pub deleting: bool,
    /// Creation time (Unix ms).
    pub created_unix_ms: i64,
    /// Its memory, when the engine chose it.
    pub size: Option<ExecutorSize>,
}

/// What an actor answers to a re-registration.
#[derive(Clone, Debug)]
pub struct Reattached {
    /// Last event sequence number.
    pub last_seq: u64,
}

type Reply<T> = oneshot::Sender<Result<T, ApiError>>;

/// Commands to an application's actor.
pub enum AppCommand {
    /// A driver registered again with the same token.
    Reattach {
        /// Its (possibly larger) template.
        template: Arc<ExecutorTemplate>,
        /// Its current totals.
        targets: Vec<(ProfileId, u64)>,
        /// Its highest executor id.
        last_executor_id: u64,
        /// Reply.
        reply: Reply<Reattached>,
    },
    /// RequestTotalExecutors.
    SetTargets {
        /// Totals.
        targets: Vec<(ProfileId, u64)>,
        /// Reply.
        reply: Reply<()>,
    },
    /// KillExecutors.
    Kill {
        /// Ids.
        ids: Vec<ExecutorId>,
        /// Lower targets.
        adjust_target: bool,
        /// Reply with the ids killed.
        reply: Reply<Vec<ExecutorId>>,
    },
    /// DecommissionExecutors.
    Decommission {
        /// Ids.
        ids: Vec<ExecutorId>,
        /// Lower targets.
        adjust_target: bool,
        /// Reply with the ids affected.
        reply: Reply<Vec<ExecutorId>>,
    },
    /// Heartbeat.
    Heartbeat {
        /// Highest sequence handled by the driver.
        acked_seq: u64,
        /// Reply.
        reply: Reply<()>,
    },
    /// UnregisterApplication.
    Unregister {
        /// What the run's executors used at most, per profile (validated).
        usage: BTreeMap<ProfileId, ProfileUsage>,
        /// Reply with the number of executors being removed and notes for the driver's log.
        reply: Reply<(usize, Vec<String>)>,
    },
    /// Events after a sequence number (at most `limit`).
    Events {
        /// Cursor.
        after_seq: u64,
        /// Batch size.
        limit: usize,
        /// Reply.
        reply: oneshot::Sender<Vec<Event>>,
    },
    /// Executors for GetApplication.
    Executors {
        /// Reply.
        reply: oneshot::Sender<Vec<ExecutorView>>,
    },
    /// Something the backend saw.
    Observe(ExecutorId, Observation),
    /// The fair share's allocation for the application.
    Admit {
        /// Admitted executors per profile.
        admitted: BTreeMap<ProfileId, u32>,
        /// What to tell the driver, when it gets less than it asks for.
        message: Option<String>,
        /// Executors per profile it runs over its share, in the allocation's view, and why.
        reclaim: (String, BTreeMap<ProfileId, u32>),
        /// Its queue.
        queue: QueueName,
    },
}

/// The registry's entry for an application.
pub struct AppHandle {
    /// The application.
    pub app_id: AppId,
    token: String,
    generation: u64,
    commands: mpsc::UnboundedSender<AppCommand>,
    /// Last event sequence number, updated by the actor.
    pub seq: watch::Receiver<u64>,
    /// Summary, updated by the actor.
    pub summary: watch::Receiver<AppSummary>,
    /// WatchExecutors streams open now.
    watches: AtomicUsize,
    /// Who registered it, when drivers authenticate.
    identity: Option<DriverIdentity>,
    /// Its Kubernetes namespace (empty on the local backend).
    namespace: String,
    /// What its queue is decided from (`--queues`).
    queue_inputs: Option<QueueInputs>,
}

impl AppHandle {
    /// Whether `token` is this application's, compared in constant time.
    pub fn token_matches(&self, token: &str) -> bool {
        constant_time_eq(self.token.as_bytes(), token.as_bytes())
    }

    /// The application's token.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The identity that registered it (`--auth kubernetes`).
    pub fn identity(&self) -> Option<&DriverIdentity> {
        self.identity.as_ref()
    }

    /// Its Kubernetes namespace, when it has one.
    pub fn namespace(&self) -> Option<&str> {
        Some(self.namespace.as_str()).filter(|n| !n.is_empty())
    }

    /// What its queue is decided from, under fair share.
    pub fn queue_inputs(&self) -> Option<&QueueInputs> {
        self.queue_inputs.as_ref()
    }

    /// Sends a command that needs no reply; dropped if the actor is gone.
    pub fn send(&self, command: AppCommand) {
        let _ = self.commands.send(command);
    }

    /// Sends a command and waits for the reply.
    pub async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> AppCommand) -> Result<T, ApiError> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(make(tx)).map_err(|_| self.gone())?;
        rx.await.map_err(|_| self.gone())?
    }

    /// Asks for events after `after_seq`; empty if the actor is gone.
    pub async fn events(&self, after_seq: u64, limit: usize) -> Option<Vec<Event>> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(AppCommand::Events {
                after_seq,
                limit,
                reply: tx,
            })
            .ok()?;
        rx.await.ok()
    }

    /// Asks for the executors; None if the actor is gone.
    pub async fn executors(&self) -> Option<Vec<ExecutorView>> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(AppCommand::Executors { reply: tx })
            .ok()?;
        rx.await.ok()
    }

    /// Counts a new WatchExecutors stream, or refuses it when `limit` are open already. The
    /// stream is counted until the guard is dropped.
    pub fn open_watch(self: &Arc<Self>, limit: usize) -> Result<WatchGuard, LimitError> {
        self.watches
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < limit).then_some(open + 1)
            })
            .map_err(|open| {
                LimitError::new(
                    Limit::WatchesPerApplication,
                    format!(
                        "watch streams: application {} has {open} open, the limit set by {}; \
                         close one first",
                        self.app_id,
                        Limit::WatchesPerApplication.flag()
                    ),
                )
            })?;
        Ok(WatchGuard {
            handle: Arc::clone(self),
        })
    }

    /// Forwards a backend observation.
    pub fn observe(&self, id: ExecutorId, observation: Observation) {
        let _ = self.commands.send(AppCommand::Observe(id, observation));
    }

    fn gone(&self) -> ApiError {
        ApiError::Unavailable(format!(
            "application {} has ended; register again",
            self.app_id
        ))
    }
}

/// One open WatchExecutors stream of an application; closing the stream drops it.
pub struct WatchGuard {
    handle: Arc<AppHandle>,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.handle.watches.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Compares two secrets in time independent of where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Shared server state.
pub struct Apps {
    /// The registry.
    pub registry: DashMap<AppId, Arc<AppHandle>>,
    generation: AtomicU64,
    /// The backend.
    pub backend: Arc<dyn ExecutorBackend>,
    /// The clock.
    pub clock: Clock,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// What all applications hold together.
    pub quotas: Arc<Quotas>,
    /// `--max-executor-memory` in MiB: no executor grows beyond it.
    max_executor_memory_mib: u64,
    /// Sizes remembered across runs, when the backend keeps them.
    sizes: Option<Arc<SizeStore>>,
    /// The fair share, with `--queues`.
    pub queues: Option<Arc<Queues>>,
}

/// What a new application starts with.
pub struct NewApp {
    /// Its id.
    pub app_id: AppId,
    /// Its token.
    pub token: String,
    /// Name.
    pub app_name: String,
    /// Template.
    pub template: Arc<ExecutorTemplate>,
    /// Engine policy.
    pub config: EngineConfig,
    /// Initial targets.
    pub targets: Vec<(ProfileId, u64)>,
    /// The driver's highest executor id.
    pub last_executor_id: u64,
    /// Executors the driver believes alive.
    pub known_executor_ids: Vec<ExecutorId>,
    /// Whom it counts against.
    pub quota_key: QuotaKey,
    /// What its queue is decided from, under fair share (`--queues`).
    pub queue_inputs: Option<QueueInputs>,
}

impl Apps {
    /// Empty state under `limits`.
    pub fn new(
        backend: Arc<dyn ExecutorBackend>,
        clock: Clock,
        metrics: Arc<Metrics>,
        limits: &Limits,
    ) -> Self {
        Self {
            registry: DashMap::new(),
            generation: AtomicU64::new(0),
            backend,
            clock,
            metrics,
            quotas: Arc::new(Quotas::new(limits)),
            max_executor_memory_mib: limits.max_executor_memory_mib,
            sizes: SizeStore::from_limits(limits).map(Arc::new),
            queues: None,
        }
    }

    /// Admits executors by fair share across the queues of `queues`.
    pub fn with_queues(mut self, queues: Option<Arc<Queues>>) -> Self {
        self.queues = queues;
        self
    }

    /// Under fair share, an application is admitted nothing until the allocation has seen it.
    fn hold_until_allocated(&self, engine: &mut Engine, now: Millis) {
        if self.queues.is_some() {
            engine.set_admitted(Some(BTreeMap::new()), None, now);
        }
    }

    fn poke_allocator(&self) {
        if let Some(queues) = &self.queues {
            queues.poke();
        }
    }

    /// Starts the application's profiles at the sizes remembered for its sizing key; the
    /// driver is told of each size taken and each entry ignored.
    fn recall_sizes(&self, app_id: &AppId, template: &ExecutorTemplate, engine: &mut Engine) {
        let (Some(store), Some(key), Some(policy)) = (
            &self.sizes,
            template
                .resize
                .as_ref()
                .and_then(|r| r.sizing_key.as_deref()),
            engine.sizing().policy(),
        ) else {
            return;
        };
        let now_unix_ms = self.clock.unix_ms(self.clock.now());
        let recalled = store.recall(key, &template.profiles, policy.max_memory_mib, now_unix_ms);
        for warning in recalled.warnings {
            warn!(app = %app_id, sizing_key = key, "{warning}");
            engine.warn(warning);
        }
        for (profile, size) in recalled.sizes {
            let message = format!(
                "profile {profile} starts executors with {} MiB heap + {} MiB overhead, the size \
                 an earlier run of spark.stoker.sizing.key {key:?} ended with",
                size.heap_mib, size.overhead_mib
            );
            info!(app = %app_id, profile, sizing_key = key, "{message}");
            engine.start_at(profile, size);
            engine.warn(message);
        }
        for (profile, refused) in recalled.refused {
            let refused_mib = refused.total_mib;
            let message = format!(
                "profile {profile} grows no further than below {refused_mib} MiB per executor: \
                 an earlier run of spark.stoker.sizing.key {key:?} could not start an executor \
                 of that size (a LimitRange or an admission policy may cap executor memory in \
                 this namespace; tried again 7 days after)"
            );
            info!(app = %app_id, profile, sizing_key = key, refused_mib, "{message}");
            engine.refuse_from(
                profile,
                refused_mib,
                refused.since_unix_ms.unwrap_or(now_unix_ms),
            );
            engine.warn(message);
        }
    }

    /// The sizing policy of a new application: its `spark.stoker.resize.*` settings bounded by
    /// the server, or none when the backend cannot start executors at a chosen size.
    fn sizing(&self, app_id: &AppId, template: &ExecutorTemplate) -> (Sizing, Option<String>) {
        let Some(settings) = &template.resize else {
            return (Sizing::new(None), None);
        };
        if !self.backend.honours_size() {
            let message = format!(
                "spark.stoker.resize.enabled is ignored: the {} backend does not start executors \
                 at a chosen size yet; executors keep their configured size",
                self.backend.name()
            );
            return (Sizing::new(None), Some(message));
        }
        let policy = settings.policy(template.profiles.values(), self.max_executor_memory_mib);
        info!(
            app = %app_id,
            factor_permille = policy.factor_permille,
            max_memory_mib = policy.max_memory_mib,
            "executors that run out of memory are replaced by bigger ones"
        );
        (Sizing::new(Some(policy)), None)
    }

    /// Looks an application up.
    pub fn get(&self, app_id: &AppId) -> Option<Arc<AppHandle>> {
        self.registry.get(app_id).map(|e| Arc::clone(e.value()))
    }

    /// Routes a backend observation to its application's actor.
    pub fn route(&self, observation: BackendObservation) {
        match self.get(&observation.app_id) {
            Some(handle) => handle.observe(observation.executor_id, observation.observation),
            None => debug!(
                app = %observation.app_id,
                executor = %observation.executor_id,
                "observation for an application that is gone"
            ),
        }
    }

    /// Creates an application and starts its actor. The engine validates the targets first,
    /// then the quotas admit the application: on error nothing is registered. Fails with
    /// `AlreadyExists` if the id was taken meanwhile (the caller retries as a re-attachment).
    pub fn create(self: &Arc<Self>, new: NewApp) -> Result<(Arc<AppHandle>, u64), ApiError> {
        let now = self.clock.now();
        let profiles: Vec<ProfileId> = new.template.profiles.keys().copied().collect();
        let (sizing, sizing_warning) = self.sizing(&new.app_id, &new.template);
        let mut engine = Engine::new(
            new.config.clone(),
            profiles.clone(),
            new.last_executor_id,
            now,
        )
        .with_sizing(sizing.clone(), new.template.profiles.values());
        self.recall_sizes(&new.app_id, &new.template, &mut engine);
        self.hold_until_allocated(&mut engine, now);
        engine.set_targets(&new.targets, now)?;
        let initial = total_after(engine.targets(), &[]);
        // Dropped, and so given back, if the id turns out to be taken below.
        let admission = self
            .quotas
            .admit(&new.app_id, new.quota_key.clone(), initial)?;

        let (commands, rx) = mpsc::unbounded_channel();
        let (seq_tx, seq_rx) = watch::channel(engine.last_seq());
        let summary = AppSummary {
            app_name: new.app_name.clone(),
            spark_user: new.template.spark_user.clone(),
            registered_unix_ms: self.clock.unix_ms(now),
            ..AppSummary::default()
        };
        let (summary_tx, summary_rx) = watch::channel(summary);
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        let handle = Arc::new(AppHandle {
            app_id: new.app_id.clone(),
            token: new.token.clone(),
            generation,
            commands,
            seq: seq_rx,
            summary: summary_rx,
            watches: AtomicUsize::new(0),
            identity: new.template.identity.clone(),
            namespace: new.template.kubernetes.namespace.clone(),
            queue_inputs: new.queue_inputs.clone(),
        });
        match self.registry.entry(new.app_id.clone()) {
            dashmap::Entry::Occupied(_) => {
                return Err(ApiError::AlreadyExists(format!(
                    "application {} is already registered",
                    new.app_id
                )))
            }
            dashmap::Entry::Vacant(slot) => {
                slot.insert(Arc::clone(&handle));
            }
        }
        // Only now that the id is ours: take over the executors an earlier stoker started for
        // this application (found by the backend after a restart), before the targets are
        // applied, so that they count toward them and no duplicates are created.
        let recovered = self.backend.claim(&new.app_id, &new.token);
        self.backend.registered(&new.app_id, &new.template);
        if !recovered.is_empty() {
            let mut adopted = Engine::new(new.config, profiles, new.last_executor_id, now)
                .with_sizing(sizing, new.template.profiles.values());
            self.recall_sizes(&new.app_id, &new.template, &mut adopted);
            self.hold_until_allocated(&mut adopted, now);
            for r in &recovered {
                if !adopted.adopt(
                    r.executor_id,
                    r.profile,
                    r.running_host.clone(),
                    r.backend_name.clone(),
                    now,
                ) {
                    warn!(app = %new.app_id, executor = %r.executor_id, "recovered executor not adopted (duplicate id)");
                }
            }
            // The same targets were accepted above on an engine with the same profiles.
            if let Err(err) = adopted.set_targets(&new.targets, now) {
                warn!(app = %new.app_id, error = %err, "targets refused after adoption; keeping the adopted executors only");
            }
            info!(app = %new.app_id, adopted = recovered.len(), "adopted executors from an earlier stoker");
            engine = adopted;
        }
        engine.report_unknown_as_lost(&new.known_executor_ids, now);
        if let Some(message) = sizing_warning {
            warn!(app = %new.app_id, "{message}");
            engine.warn(message);
        }
        let _ = seq_tx.send(engine.last_seq());
        let last_seq = engine.last_seq();
        let actor = Actor {
            admission,
            apps: Arc::clone(self),
            app_id: new.app_id,
            generation,
            engine,
            template: new.template,
            token: Arc::from(new.token.as_str()),
            commands: rx,
            seq: seq_tx,
            summary: summary_tx,
            counted_seq: 0,
            seen_by_allocator: None,
        };
        info!(app = %actor.app_id, "application registered");
        self.metrics.applications_registered.inc();
        tokio::spawn(actor.run());
        Ok((handle, last_seq))
    }

    fn remove(&self, app_id: &AppId, generation: u64) {
        self.registry
            .remove_if(app_id, |_, handle| handle.generation == generation);
    }
}

struct Actor {
    /// The application's share of the quotas, given back when the actor ends.
    admission: Admission,
    apps: Arc<Apps>,
    app_id: AppId,
    generation: u64,
    engine: Engine,
    template: Arc<ExecutorTemplate>,
    token: Arc<str>,
    commands: mpsc::UnboundedReceiver<AppCommand>,
    seq: watch::Sender<u64>,
    summary: watch::Sender<AppSummary>,
    counted_seq: u64,
    /// What the fair share last saw of the application (phase, demand), to poke it on change.
    seen_by_allocator: Option<(AppPhase, BTreeMap<ProfileId, ProfileDemand>)>,
}

impl Actor {
    async fn run(mut self) {
        self.after_input();
        loop {
            if self.engine.is_finished() {
                break;
            }
            let deadline = self.engine.next_deadline();
            let sleep = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(self.apps.clock.instant(at)).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                command = self.commands.recv() => match command {
                    Some(command) => self.handle(command),
                    // Every handle is gone: only possible once removed from the registry.
                    None => break,
                },
                () = sleep => {
                    let now = self.apps.clock.now();
                    let before = self.engine.phase();
                    self.engine.tick(now);
                    if before != AppPhase::Ending && self.engine.phase() == AppPhase::Ending {
                        warn!(app = %self.app_id, "driver lease expired; removing the application's executors");
                        self.apps.metrics.leases_expired.inc();
                    }
                }
            }
            self.after_input();
        }
        // Before the id is free again, so that a new registration's objects are not released.
        self.apps.backend.ended(&self.app_id);
        self.apps.remove(&self.app_id, self.generation);
        // Give the quotas back before the command channel closes, so that a caller who sees
        // the application gone (its watch stream ends) can register another at once.
        drop(self.admission);
        // Its share is free for the others.
        self.apps.poke_allocator();
        info!(app = %self.app_id, exited = self.engine.exited_total(), "application removed");
    }

    fn handle(&mut self, command: AppCommand) {
        let now = self.apps.clock.now();
        match command {
            AppCommand::Reattach {
                template,
                targets,
                last_executor_id,
                reply,
            } => {
                let result = self.reattach(template, &targets, last_executor_id, now);
                let _ = reply.send(result);
            }
            AppCommand::SetTargets { targets, reply } => {
                let result = self.set_targets("targets", &targets, now);
                let _ = reply.send(result);
            }
            AppCommand::Kill {
                ids,
                adjust_target,
                reply,
            } => {
                let result = self
                    .engine
                    .kill(&ids, adjust_target, now)
                    .map_err(ApiError::from);
                self.settle();
                let _ = reply.send(result);
            }
            AppCommand::Decommission {
                ids,
                adjust_target,
                reply,
            } => {
                let result = self
                    .engine
                    .decommission(&ids, adjust_target, now)
                    .map_err(ApiError::from);
                if let Ok(affected) = &result {
                    if !affected.is_empty() {
                        self.apps
                            .backend
                            .decommissioning(&self.app_id, &self.template, affected);
                    }
                }
                self.settle();
                let _ = reply.send(result);
            }
            AppCommand::Heartbeat { acked_seq, reply } => {
                let result = if self.engine.phase() == AppPhase::Ending {
                    Err(ApiError::Engine(EngineError::Ending))
                } else {
                    self.engine.heartbeat(acked_seq, now);
                    Ok(())
                };
                let _ = reply.send(result);
            }
            AppCommand::Unregister { usage, reply } => {
                // A run that ends on its own, not failed: its sizes are the ones to start from.
                let notes = if self.engine.phase() == AppPhase::Active {
                    self.remember_sizes(&usage)
                } else {
                    Vec::new()
                };
                let removed = self.engine.unregister(now);
                info!(app = %self.app_id, removed, "application unregistered");
                self.settle();
                let _ = reply.send(Ok((removed, notes)));
            }
            AppCommand::Events {
                after_seq,
                limit,
                reply,
            } => {
                let events = self
                    .engine
                    .events_after(after_seq)
                    .take(limit)
                    .cloned()
                    .collect();
                let _ = reply.send(events);
            }
            AppCommand::Executors { reply } => {
                let clock = self.apps.clock;
                let views = self
                    .engine
                    .executors()
                    .map(|e| ExecutorView {
                        id: e.id,
                        profile: e.profile,
                        phase: e.phase,
                        host: e.host.clone(),
                        backend_name: e.backend_name.clone(),
                        deleting: e.deleting.is_some(),
                        created_unix_ms: clock.unix_ms(e.created_at),
                        size: e.size,
                    })
                    .collect();
                let _ = reply.send(views);
            }
            AppCommand::Observe(id, observation) => {
                self.observe(id, observation, now);
            }
            AppCommand::Admit {
                admitted,
                message,
                reclaim,
                queue,
            } => self.admit(admitted, message, reclaim, queue, now),
        }
    }

    fn reattach(
        &mut self,
        template: Arc<ExecutorTemplate>,
        targets: &[(ProfileId, u64)],
        last_executor_id: u64,
        now: Millis,
    ) -> Result<Reattached, ApiError> {
        if self.engine.phase() == AppPhase::Ending {
            return Err(ApiError::Unavailable(format!(
                "application {} is ending (unregistered or lease expired); register again once it is gone",
                self.app_id
            )));
        }
        self.engine.add_profiles(template.profiles.keys().copied());
        self.engine.add_profile_sizes(template.profiles.values());
        self.engine.raise_last_executor_id(last_executor_id);
        if !targets.is_empty() {
            self.set_targets("initial_targets", targets, now)?;
        } else {
            self.engine.heartbeat(0, now);
        }
        self.template = template;
        info!(app = %self.app_id, "driver re-attached");
        Ok(Reattached {
            last_seq: self.engine.last_seq(),
        })
    }

    /// Sets targets within the quotas: room for a higher total is reserved first; whatever the
    /// engine then holds is settled before the caller hears the answer, so that room given back
    /// is free for the next request.
    fn set_targets(
        &mut self,
        field: &str,
        targets: &[(ProfileId, u64)],
        now: Millis,
    ) -> Result<(), ApiError> {
        // An ending application is refused by the engine (FAILED_PRECONDITION), whatever the
        // quotas say.
        if self.engine.phase() != AppPhase::Ending {
            let total = total_after(self.engine.targets(), targets);
            self.admission.reserve(&self.app_id, field, total)?;
        }
        let result = self
            .engine
            .set_targets(targets, now)
            .map_err(ApiError::from);
        self.settle();
        result
    }

    /// Takes the fair share's allocation: the engine creates executors only up to it and tells
    /// the driver when the message changes.
    fn admit(
        &mut self,
        admitted: BTreeMap<ProfileId, u32>,
        message: Option<String>,
        reclaim: (String, BTreeMap<ProfileId, u32>),
        queue: QueueName,
        now: Millis,
    ) {
        if self.engine.phase() == AppPhase::Ending {
            return;
        }
        let total: u64 = admitted.values().map(|&n| u64::from(n)).sum();
        let changed = self.engine.admitted() != Some(&admitted);
        if changed {
            match &message {
                Some(message) => {
                    info!(app = %self.app_id, queue = %queue, admitted = total, "{message}")
                }
                None => {
                    debug!(app = %self.app_id, queue = %queue, admitted = total, "admitted every executor requested")
                }
            }
        }
        let (reason, counts) = reclaim;
        self.engine.set_reclaim_basis(reason, counts);
        self.engine.set_admitted(Some(admitted), message, now);
        self.summary.send_modify(|s| {
            s.queue = Some(queue);
            s.admitted = Some(total);
        });
    }

    /// What the fair share sees of the application: per profile its request, the executors it
    /// has that count toward it, and the shape new executors get (grown ones included).
    fn demand(&self) -> BTreeMap<ProfileId, ProfileDemand> {
        let counted = self.engine.counted();
        let sizes: BTreeMap<ProfileId, ExecutorSize> = self.engine.sizing().sizes().collect();
        self.template
            .profiles
            .iter()
            .map(|(&id, profile)| {
                let mut shape = Shape::of(profile);
                if let Some(size) = sizes.get(&id) {
                    shape.memory_mib = size
                        .heap_mib
                        .saturating_add(size.overhead_mib)
                        .saturating_add(profile.off_heap_mib)
                        .saturating_add(profile.pyspark_mib);
                }
                let demand = ProfileDemand {
                    shape,
                    requested: self.engine.targets().get(&id).copied().unwrap_or(0),
                    running: counted.get(&id).copied().unwrap_or(0),
                };
                (id, demand)
            })
            .collect()
    }

    /// Records the sizes the application ends with under its sizing key, a size stepped down
    /// where the run's executors used far less (`usage`); returns the notes for the driver.
    fn remember_sizes(&self, usage: &BTreeMap<ProfileId, ProfileUsage>) -> Vec<String> {
        let (Some(store), Some(key)) = (
            &self.apps.sizes,
            self.template
                .resize
                .as_ref()
                .and_then(|r| r.sizing_key.as_deref()),
        ) else {
            return Vec::new();
        };
        if self.engine.sizing().policy().is_none() {
            return Vec::new();
        }
        let (sizes, steps) = self.engine.sizing().sizes_to_remember(usage);
        let refused = self.engine.sizing().refused().collect();
        let now_unix_ms = self.apps.clock.unix_ms(self.apps.clock.now());
        match store.remember(key, &sizes, &refused, &self.template.profiles, now_unix_ms) {
            Ok(()) => {
                debug!(app = %self.app_id, sizing_key = key, "sizes remembered");
                steps
                    .iter()
                    .map(|step| {
                        let message = step.message(key);
                        info!(app = %self.app_id, profile = step.profile, sizing_key = key, "{message}");
                        message
                    })
                    .collect()
            }
            Err(err) => {
                warn!(app = %self.app_id, sizing_key = key, error = %err, "cannot remember sizes");
                vec![format!(
                    "the sizes of spark.stoker.sizing.key {key:?} cannot be remembered: {err}"
                )]
            }
        }
    }

    /// Charges the quotas with the targets the engine holds; none once the application ends.
    fn settle(&mut self) {
        let total = if self.engine.phase() == AppPhase::Ending {
            0
        } else {
            total_after(self.engine.targets(), &[])
        };
        self.admission.settle(total);
    }

    fn observe(&mut self, id: ExecutorId, observation: Observation, now: Millis) {
        if let Observation::Exited { reason, code, .. } = &observation {
            debug!(app = %self.app_id, executor = %id, ?code, %reason, "executor exited");
        }
        if !self.engine.observe(id, observation, now) {
            debug!(app = %self.app_id, executor = %id, "observation for an untracked executor");
        }
    }

    /// Carries out actions and publishes state.
    fn after_input(&mut self) {
        let backend = Arc::clone(&self.apps.backend);
        let backend_name = backend.name();
        for action in self.engine.take_actions() {
            match action {
                Action::Launch { id, profile, size } => {
                    // The engine knows every profile of the template; the template's size is
                    // the fallback for an engine that was not told.
                    let size = size
                        .or_else(|| self.template.profiles.get(&profile).map(ExecutorSize::of))
                        .unwrap_or_default();
                    debug!(
                        app = %self.app_id,
                        executor = %id,
                        profile,
                        heap_mib = size.heap_mib,
                        overhead_mib = size.overhead_mib,
                        "launching executor"
                    );
                    self.apps.metrics.backend_op(backend_name, "launch");
                    backend.launch(LaunchRequest {
                        app_id: self.app_id.clone(),
                        executor_id: id,
                        profile,
                        size,
                        template: Arc::clone(&self.template),
                        token: Arc::clone(&self.token),
                    });
                }
                Action::Terminate { id, grace } => {
                    debug!(app = %self.app_id, executor = %id, grace_ms = grace, "terminating executor");
                    self.apps.metrics.backend_op(backend_name, "terminate");
                    backend.terminate(&self.app_id, id, grace);
                }
            }
        }
        self.settle();
        self.publish();
    }

    fn publish(&mut self) {
        let last_seq = self.engine.last_seq();
        let mut resizes = 0;
        for event in self.engine.events_after(self.counted_seq) {
            match &event.kind {
                EventKind::Executor(ExecutorEvent {
                    exit: Some(exit), ..
                }) => {
                    self.apps
                        .metrics
                        .executor_exits
                        .get_or_create(&ReasonLabel {
                            reason: exit.reason.as_str().to_owned(),
                        })
                        .inc();
                }
                EventKind::Reclaim(reclaim) => {
                    info!(
                        app = %self.app_id,
                        profile = reclaim.profile,
                        count = reclaim.count,
                        "fair share: asked the driver to {}",
                        reclaim.message(event.at)
                    );
                }
                EventKind::Resized(resize) => {
                    resizes += 1;
                    info!(
                        app = %self.app_id,
                        profile = resize.profile,
                        executor = %resize.executor,
                        cause = resize.cause.as_str(),
                        heap_mib = resize.to.heap_mib,
                        overhead_mib = resize.to.overhead_mib,
                        "{}",
                        resize.message()
                    );
                    self.apps
                        .metrics
                        .executor_resizes
                        .get_or_create(&CauseLabel {
                            cause: resize.cause.as_str(),
                        })
                        .inc();
                }
                _ => {}
            }
        }
        self.counted_seq = last_seq;
        self.seq.send_if_modified(|seq| {
            let changed = *seq != last_seq;
            *seq = last_seq;
            changed
        });
        let mut pending = 0;
        let mut running = 0;
        let mut deleting = 0;
        for executor in self.engine.executors() {
            if executor.deleting.is_some() {
                deleting += 1;
            }
            match executor.phase {
                ExecutorPhase::Running => running += 1,
                _ => pending += 1,
            }
        }
        let mut poke = false;
        let demand = if self.apps.queues.is_some() {
            let demand = self.demand();
            let seen = (self.engine.phase(), demand.clone());
            if self.seen_by_allocator.as_ref() != Some(&seen) {
                self.seen_by_allocator = Some(seen);
                poke = true;
            }
            demand
        } else {
            BTreeMap::new()
        };
        let engine = &self.engine;
        self.summary.send_modify(|s| {
            s.demand = demand;
            s.phase = engine.phase().as_str();
            s.targets = engine.targets().clone();
            s.pending = pending;
            s.running = running;
            s.deleting = deleting;
            s.exited = engine.exited_total();
            s.failures = engine.failures();
            s.lease_deadline = engine.lease_deadline();
            s.last_seq = last_seq;
            s.sizes = engine.sizing().sizes().collect();
            s.resizes = s.resizes.saturating_add(resizes);
        });
        // After the summary it reads.
        if poke {
            self.apps.poke_allocator();
        }
    }
}
