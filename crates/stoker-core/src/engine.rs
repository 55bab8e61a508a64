//! The allocation engine: one state machine per application.
//!
//! # Flow
//!
//! The owner (the server's per-application actor) feeds the engine driver commands
//! ([`Engine::set_targets`], [`Engine::kill`], [`Engine::decommission`], [`Engine::heartbeat`],
//! [`Engine::unregister`]), backend observations ([`Engine::observe`]) and clock ticks
//! ([`Engine::tick`]), then takes the resulting [`Action`]s with [`Engine::take_actions`] and
//! carries them out. Events for the driver accumulate in a log read with
//! [`Engine::events_after`] and trimmed with [`Engine::ack`].
//!
//! # Guarantees
//!
//! * Level-triggered: after every input the engine compares the desired totals with the
//!   executors it has and creates what is missing. When a total drops it removes executors that
//!   are not running yet (newest first); running executors are removed only when the driver kills
//!   or decommissions them, because only the driver knows which ones are idle (Spark's own
//!   Kubernetes backend does the same).
//! * Executor ids are decimal, start above the driver's `last_executor_id`, increase and never
//!   repeat within the application.
//! * Every executor the driver heard of (a `Requested` event) gets exactly one terminal
//!   (`Exited`) event, whatever the order and repetition of observations.
//! * When the lease expires or the driver unregisters, every executor is removed; the engine is
//!   [`Engine::is_finished`] once the backend has confirmed every exit.
//! * Failures (see [`ExitReason::counts_as_failure`]) within the validity window are counted;
//!   when they reach the limit the application fails: a terminal application event, no more
//!   executors created, not-yet-running ones removed.
//! * Admission (see [`crate::fairshare`]): once [`Engine::set_admitted`] is called with a count
//!   per profile, each profile's effective target is `min(requested, admitted)` (a profile
//!   without a count is admitted nothing), so pods are never created beyond what is admitted;
//!   executors not yet running above it are removed, running ones stay until the driver gives
//!   them back. The driver is told once per change of the admission message. Until then (no
//!   queues configured) the effective target is the requested one.
//! * Reclaim: when a profile runs more executors than it is admitted (and still asks for them:
//!   `min(counted, requested) - admitted`, the allocator's [`crate::fairshare::ProfileAllocation::reclaim`]),
//!   the driver gets one [`EventKind::Reclaim`] with that count and a deadline
//!   (`reclaim_timeout` from now), so that it decommissions the executors it chooses (idle ones
//!   first). Reclaims are opened by an allocation only ([`Engine::set_reclaim_basis`], then
//!   [`Engine::set_admitted`]), for at most the over-share count the allocation saw, so that a
//!   request raised since (a stale admission) is not taken for an over-share. The count shrinks
//!   as the driver gives executors back, without a new event; it is told again only when an
//!   allocation finds a larger over-share (a lower admission), with the whole count and a new
//!   deadline. At the deadline the newest executors still over the share are removed
//!   ([`ExitReason::Reclaimed`]) and the driver is told with a warning. Nothing is reclaimed
//!   while admitted ≥ what runs.
//! * Sizes (see [`crate::sizing`]): every executor is created at its profile's current size and
//!   keeps it; a memory failure may grow the size for executors created afterwards, with an
//!   [`EventKind::Resized`] event; how such failures count is the sizing policy's rule.
//!
//! # Assumptions
//!
//! The backend reports every executor it was asked to launch as exited eventually, also after a
//! terminate request. Time passed in never goes backwards.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::error::EngineError;
use crate::sizing::{ExecutorSize, Resize, Sizing, Verdict};
use crate::types::{
    ExecutorId, ExecutorPhase, ExitInfo, ExitReason, Millis, ProfileId, ResourceProfile,
};

/// Per-application policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineConfig {
    /// How long the driver's lease lasts without a heartbeat.
    pub lease_ttl: Millis,
    /// How long an executor may take from creation to running.
    pub start_timeout: Millis,
    /// Grace period for a normal deletion (SIGTERM to SIGKILL).
    pub delete_grace: Millis,
    /// How long a decommissioning executor may take before it is removed.
    pub decommission_timeout: Millis,
    /// How long the driver has to give back executors over its fair share before they are
    /// removed.
    pub reclaim_timeout: Millis,
    /// Failures at which the application fails.
    pub max_failures: u32,
    /// Only failures this recent count; `None` for all.
    pub failure_window: Option<Millis>,
    /// Largest total per profile.
    pub max_executors_per_profile: u32,
    /// Events kept when the driver acknowledges none; older ones are dropped beyond this.
    pub max_event_log: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            lease_ttl: 30_000,
            start_timeout: 600_000,
            delete_grace: 30_000,
            decommission_timeout: 120_000,
            reclaim_timeout: 60_000,
            max_failures: 3,
            failure_window: None,
            max_executors_per_profile: 10_000,
            max_event_log: 100_000,
        }
    }
}

/// What the owner must do for the engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Start an executor of the given profile.
    Launch {
        /// The new executor.
        id: ExecutorId,
        /// Its resource profile.
        profile: ProfileId,
        /// Its memory; `None` when the engine was not told the profile's size (then the
        /// profile's configured size).
        size: Option<ExecutorSize>,
    },
    /// Stop an executor: graceful signal, then a hard kill after `grace`.
    Terminate {
        /// The executor.
        id: ExecutorId,
        /// Grace period.
        grace: Millis,
    },
}

/// What a backend saw happen to an executor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Observation {
    /// The backend accepted the executor (pod created, process spawned).
    Accepted {
        /// Pod name or `pid:N`.
        backend_name: String,
    },
    /// It is running.
    Running {
        /// Host or pod IP.
        host: String,
        /// Pod name or `pid:N`.
        backend_name: String,
    },
    /// It cannot be created for now (e.g. a resource quota is exhausted); the backend keeps
    /// trying. The driver is told with an application warning; the executor stays requested.
    Waiting {
        /// Why, for people.
        message: String,
    },
    /// It is gone, with the backend's view of why.
    Exited {
        /// Exit code, when known.
        code: Option<i32>,
        /// The backend's classification.
        reason: ExitReason,
        /// Detail.
        message: String,
    },
}

/// Phase of the whole application.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppPhase {
    /// Normal operation.
    Active,
    /// The failure limit was reached; nothing new is created.
    Failed,
    /// Unregistered or lease expired; executors are being removed.
    Ending,
}

impl AppPhase {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Failed => "failed",
            Self::Ending => "ending",
        }
    }
}

/// One entry of the event log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Sequence number, from 1, without gaps.
    pub seq: u64,
    /// Engine time of the event.
    pub at: Millis,
    /// What happened.
    pub kind: EventKind,
}

/// Kinds of events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// An executor changed phase.
    Executor(ExecutorEvent),
    /// The application failed (terminal).
    AppFailed {
        /// Why.
        message: String,
    },
    /// A warning about the application (e.g. creation throttled).
    AppWarning {
        /// What.
        message: String,
    },
    /// A profile's executors are created at a new size from now on.
    Resized(Resize),
    /// The driver is asked to give executors back (fair share).
    Reclaim(ReclaimRequest),
}

/// A request to the driver to give back executors of a profile it runs over its fair share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReclaimRequest {
    /// The profile.
    pub profile: ProfileId,
    /// Executors to give back.
    pub count: u32,
    /// Engine time at which stoker removes those still over the share itself.
    pub deadline: Millis,
    /// Why, for people (e.g. `over its fair share in queue etl`).
    pub reason: String,
}

impl ReclaimRequest {
    /// What the driver is told, e.g. `give back 2 executors of resource profile 0 within 60 s
    /// (over its fair share in queue etl)`.
    pub fn message(&self, now: Millis) -> String {
        let count = self.count;
        let noun = if count == 1 { "executor" } else { "executors" };
        let secs = self.deadline.saturating_sub(now).div_ceil(1000);
        format!(
            "give back {count} {noun} of resource profile {} within {secs} s ({})",
            self.profile, self.reason
        )
    }
}

/// An open reclaim of one profile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Reclaim {
    /// The over-share count now (it shrinks as the driver gives executors back).
    count: u32,
    /// When the executors still over the share are removed.
    deadline: Millis,
}

/// An executor's change of phase.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecutorEvent {
    /// The executor.
    pub id: ExecutorId,
    /// Its profile.
    pub profile: ProfileId,
    /// Its new phase.
    pub phase: ExecutorPhase,
    /// Host, once running.
    pub host: String,
    /// Pod name or `pid:N`.
    pub backend_name: String,
    /// How it ended, when `phase` is `Exited`.
    pub exit: Option<ExitInfo>,
}

/// An executor the engine tracks (not yet exited).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Executor {
    /// Id.
    pub id: ExecutorId,
    /// Profile.
    pub profile: ProfileId,
    /// Phase (never `Exited`: exited executors are dropped).
    pub phase: ExecutorPhase,
    /// Host, once running.
    pub host: String,
    /// Pod name or `pid:N`.
    pub backend_name: String,
    /// When it was requested.
    pub created_at: Millis,
    /// Set once stoker decided to remove it, with the reason reported when it exits.
    pub deleting: Option<ExitReason>,
    /// Set while decommissioning: when it is removed if still alive.
    pub decommission_deadline: Option<Millis>,
    /// The memory it was created with (`None`: its profile's configured size).
    pub size: Option<ExecutorSize>,
}

impl Executor {
    /// Whether it counts toward its profile's total: alive and not on its way out.
    fn counts_toward_target(&self) -> bool {
        self.deleting.is_none() && self.decommission_deadline.is_none()
    }
}

/// The state machine of one application. See the module documentation.
#[derive(Debug)]
pub struct Engine {
    config: EngineConfig,
    phase: AppPhase,
    profiles: BTreeSet<ProfileId>,
    targets: BTreeMap<ProfileId, u32>,
    /// Admitted executors per profile; `None`: no admission control.
    admitted: Option<BTreeMap<ProfileId, u32>>,
    /// The admission message the driver was last told, if any.
    admission_message: Option<String>,
    /// Why the application may be over its share, for reclaim requests; `None` until an
    /// allocation gave one.
    reclaim_reason: Option<String>,
    /// The allocation's over-share counts per profile, for the next [`Engine::set_admitted`]
    /// (see [`Engine::set_reclaim_basis`]).
    reclaim_basis: BTreeMap<ProfileId, u32>,
    /// Open reclaims per profile.
    reclaims: BTreeMap<ProfileId, Reclaim>,
    executors: BTreeMap<ExecutorId, Executor>,
    next_id: u64,
    lease_deadline: Millis,
    failures: VecDeque<Millis>,
    failures_total: u32,
    exited_total: u64,
    log: VecDeque<Event>,
    last_seq: u64,
    dropped_events: u64,
    actions: Vec<Action>,
    sizing: Sizing,
    now: Millis,
}

impl Engine {
    /// A new application at time `now`, with the given resource profiles. Ids start above
    /// `last_executor_id`. Each of `known_executor_ids` that the engine does not track (none,
    /// unless adopted with [`Engine::adopt`] first) gets a terminal `Lost` event, so that a
    /// driver re-attaching to a restarted stoker hears the fate of every executor it knew.
    pub fn new(
        config: EngineConfig,
        profiles: impl IntoIterator<Item = ProfileId>,
        last_executor_id: u64,
        now: Millis,
    ) -> Self {
        Self {
            lease_deadline: now.saturating_add(config.lease_ttl),
            config,
            phase: AppPhase::Active,
            profiles: profiles.into_iter().collect(),
            targets: BTreeMap::new(),
            admitted: None,
            admission_message: None,
            reclaim_reason: None,
            reclaim_basis: BTreeMap::new(),
            reclaims: BTreeMap::new(),
            executors: BTreeMap::new(),
            next_id: last_executor_id.saturating_add(1).max(1),
            failures: VecDeque::new(),
            failures_total: 0,
            exited_total: 0,
            log: VecDeque::new(),
            last_seq: 0,
            dropped_events: 0,
            actions: Vec::new(),
            sizing: Sizing::default(),
            now,
        }
    }

    /// Sets the sizing policy and the profiles' configured sizes (before any executor is
    /// created). Without it every executor gets its profile's configured size.
    pub fn with_sizing<'a>(
        mut self,
        sizing: Sizing,
        profiles: impl IntoIterator<Item = &'a ResourceProfile>,
    ) -> Self {
        self.sizing = sizing;
        self.add_profile_sizes(profiles);
        self
    }

    /// Adds the configured sizes of profiles (a driver re-registering with new profiles);
    /// known profiles keep their current size.
    pub fn add_profile_sizes<'a>(
        &mut self,
        profiles: impl IntoIterator<Item = &'a ResourceProfile>,
    ) {
        for profile in profiles {
            self.sizing.add_profile(profile);
        }
    }

    /// The sizing state: current sizes per profile.
    pub fn sizing(&self) -> &Sizing {
        &self.sizing
    }

    /// Starts new executors of `profile` at `size` (a size remembered from an earlier run);
    /// before any executor is created.
    pub fn start_at(&mut self, profile: ProfileId, size: ExecutorSize) {
        self.sizing.start_at(profile, size);
    }

    /// Remembers that an earlier run (at `since_unix_ms`) could not start an executor of
    /// `profile` with `total_mib` memory: the profile grows no further than below it (see
    /// [`Sizing::refuse_from`]).
    pub fn refuse_from(&mut self, profile: ProfileId, total_mib: u64, since_unix_ms: i64) {
        self.sizing.refuse_from(profile, total_mib, since_unix_ms);
    }

    /// Tells the driver something about the application (an [`EventKind::AppWarning`]).
    pub fn warn(&mut self, message: String) {
        self.push_event(EventKind::AppWarning { message });
    }

    // === inspection ===

    /// The policy.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The application's phase.
    pub fn phase(&self) -> AppPhase {
        self.phase
    }

    /// Desired totals per profile, as the driver asked.
    pub fn targets(&self) -> &BTreeMap<ProfileId, u32> {
        &self.targets
    }

    /// Admitted executors per profile; `None` without admission control.
    pub fn admitted(&self) -> Option<&BTreeMap<ProfileId, u32>> {
        self.admitted.as_ref()
    }

    /// The total the engine works toward for `profile`: the requested one, lowered to the
    /// admitted count when there is admission control.
    pub fn effective_target(&self, profile: ProfileId) -> u32 {
        let requested = self.targets.get(&profile).copied().unwrap_or(0);
        match &self.admitted {
            None => requested,
            Some(admitted) => requested.min(admitted.get(&profile).copied().unwrap_or(0)),
        }
    }

    /// Executors per profile to give back now, with the deadline after which they are removed:
    /// the open reclaims.
    pub fn reclaims(&self) -> impl Iterator<Item = (ProfileId, u32, Millis)> + '_ {
        self.reclaims
            .iter()
            .map(|(&profile, r)| (profile, r.count, r.deadline))
    }

    /// Executors of `profile` running over its admitted count that it still asks for:
    /// `min(counted, requested) - admitted`; 0 without admission control.
    pub fn over_share(&self, profile: ProfileId) -> u32 {
        let Some(admitted) = &self.admitted else {
            return 0;
        };
        if self.phase != AppPhase::Active {
            return 0;
        }
        let counted = self.counted_of(profile);
        let requested = self.targets.get(&profile).copied().unwrap_or(0);
        counted
            .min(requested)
            .saturating_sub(admitted.get(&profile).copied().unwrap_or(0))
    }

    fn counted_of(&self, profile: ProfileId) -> u32 {
        let n = self
            .executors
            .values()
            .filter(|e| e.profile == profile && e.counts_toward_target())
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Executors per profile that count toward its total (alive, not being removed or
    /// decommissioned): what the application runs, for the fair-share allocation.
    pub fn counted(&self) -> BTreeMap<ProfileId, u32> {
        let mut counted = BTreeMap::new();
        for executor in self.executors.values() {
            if executor.counts_toward_target() {
                let n: &mut u32 = counted.entry(executor.profile).or_default();
                *n = n.saturating_add(1);
            }
        }
        counted
    }

    /// Executors not yet exited.
    pub fn executors(&self) -> impl Iterator<Item = &Executor> {
        self.executors.values()
    }

    /// One executor, if not yet exited.
    pub fn executor(&self, id: ExecutorId) -> Option<&Executor> {
        self.executors.get(&id)
    }

    /// Executors that exited so far.
    pub fn exited_total(&self) -> u64 {
        self.exited_total
    }

    /// Failures counted toward the limit (within the window at the last input).
    pub fn failures(&self) -> u32 {
        u32::try_from(self.failures.len()).unwrap_or(u32::MAX)
    }

    /// Failures ever seen.
    pub fn failures_total(&self) -> u32 {
        self.failures_total
    }

    /// When the lease expires.
    pub fn lease_deadline(&self) -> Millis {
        self.lease_deadline
    }

    /// Highest sequence number recorded.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Highest executor id handed out (0 if none).
    pub fn last_executor_id(&self) -> u64 {
        self.next_id.saturating_sub(1)
    }

    /// Unacknowledged events dropped because the log was full.
    pub fn dropped_events(&self) -> u64 {
        self.dropped_events
    }

    /// Whether the application has ended and every executor is confirmed gone.
    pub fn is_finished(&self) -> bool {
        self.phase == AppPhase::Ending && self.executors.is_empty()
    }

    /// Events with a sequence number greater than `after_seq`, oldest first.
    pub fn events_after(&self, after_seq: u64) -> impl Iterator<Item = &Event> {
        // The log is contiguous: index = seq - first_seq.
        let first = self.log.front().map_or(self.last_seq + 1, |e| e.seq);
        let skip = usize::try_from(after_seq.saturating_add(1).saturating_sub(first))
            .unwrap_or(usize::MAX);
        self.log.iter().skip(skip)
    }

    /// The earliest time at which [`Engine::tick`] has something to do.
    pub fn next_deadline(&self) -> Option<Millis> {
        let mut next = if self.phase == AppPhase::Ending {
            None
        } else {
            Some(self.lease_deadline)
        };
        for executor in self.executors.values() {
            let candidate = match (executor.deleting, executor.decommission_deadline) {
                (Some(_), _) => None,
                (None, Some(deadline)) => Some(deadline),
                (None, None) if executor.phase != ExecutorPhase::Running => Some(
                    executor
                        .created_at
                        .saturating_add(self.config.start_timeout),
                ),
                (None, None) => None,
            };
            next = earliest(next, candidate);
        }
        for reclaim in self.reclaims.values() {
            next = earliest(next, Some(reclaim.deadline));
        }
        next
    }

    /// Takes the actions decided so far.
    pub fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }

    // === driver commands ===

    /// Adds resource profiles (a driver re-registering with a larger template).
    pub fn add_profiles(&mut self, profiles: impl IntoIterator<Item = ProfileId>) {
        self.profiles.extend(profiles);
    }

    /// Raises the next executor id above `last_executor_id` (a re-attaching driver's knowledge).
    pub fn raise_last_executor_id(&mut self, last_executor_id: u64) {
        self.next_id = self.next_id.max(last_executor_id.saturating_add(1));
    }

    /// Sets desired totals. Validates all of them first: on error nothing changes.
    pub fn set_targets(
        &mut self,
        targets: &[(ProfileId, u64)],
        now: Millis,
    ) -> Result<(), EngineError> {
        if self.phase == AppPhase::Ending {
            return Err(EngineError::Ending);
        }
        for &(profile, total) in targets {
            if !self.profiles.contains(&profile) {
                return Err(EngineError::UnknownProfile(profile));
            }
            if total > u64::from(self.config.max_executors_per_profile) {
                return Err(EngineError::TargetTooLarge {
                    profile,
                    total,
                    limit: self.config.max_executors_per_profile,
                });
            }
        }
        self.advance(now);
        self.renew_lease();
        for &(profile, total) in targets {
            // Checked above against a u32 limit.
            let total = u32::try_from(total).unwrap_or(self.config.max_executors_per_profile);
            self.targets.insert(profile, total);
        }
        self.reconcile();
        Ok(())
    }

    /// Sets the admitted executors per profile (from [`crate::fairshare::allocate`]) and the
    /// message for the driver when it gets less than it asks for
    /// ([`crate::fairshare::AppAllocation::message`]). `None` admission turns admission control
    /// off. The driver hears the message once each time it changes, and once more when it is
    /// admitted everything again.
    pub fn set_admitted(
        &mut self,
        admitted: Option<BTreeMap<ProfileId, u32>>,
        message: Option<String>,
        now: Millis,
    ) {
        self.advance(now);
        self.admitted = admitted;
        if message != self.admission_message {
            let told = match &message {
                Some(message) => Some(message.clone()),
                None if self.admission_message.is_some() => {
                    Some("admitted every executor requested".to_owned())
                }
                None => None,
            };
            if let Some(told) = told {
                self.push_event(EventKind::AppWarning { message: told });
            }
            self.admission_message = message;
        }
        self.reconcile();
        self.open_reclaims();
    }

    /// Gives the allocation's over-share counts per profile
    /// ([`crate::fairshare::ProfileAllocation::reclaim`]) and why (e.g. `over its fair share in
    /// queue etl`), for the [`Engine::set_admitted`] that follows (which uses them once).
    ///
    /// A reclaim is opened or grown only there, and for at most the allocation's count: the
    /// allocation saw the request and the executors it admitted against, whereas the engine's
    /// own request may have risen since (a dynamic-allocation driver asks more as a stage
    /// starts), and a stale admission must not read as an over-share. Without a basis (the hold
    /// before the first allocation, no queues) nothing is reclaimed.
    pub fn set_reclaim_basis(&mut self, reason: String, counts: BTreeMap<ProfileId, u32>) {
        self.reclaim_reason = Some(reason);
        self.reclaim_basis = counts;
    }

    /// Kills executors. Returns those that were alive and are now being removed; unknown or
    /// already removed ids are ignored. With `adjust_target`, each kill lowers its profile's total.
    pub fn kill(
        &mut self,
        ids: &[ExecutorId],
        adjust_target: bool,
        now: Millis,
    ) -> Result<Vec<ExecutorId>, EngineError> {
        if self.phase == AppPhase::Ending {
            return Err(EngineError::Ending);
        }
        self.advance(now);
        self.renew_lease();
        let mut killed = Vec::new();
        for &id in ids {
            let Some(executor) = self.executors.get(&id) else {
                continue;
            };
            if executor.deleting.is_some() {
                continue;
            }
            let profile = executor.profile;
            let counted = executor.counts_toward_target();
            self.delete(id, ExitReason::KilledByDriver);
            if adjust_target && counted {
                if let Some(total) = self.targets.get_mut(&profile) {
                    *total = total.saturating_sub(1);
                }
            }
            killed.push(id);
        }
        self.reconcile();
        Ok(killed)
    }

    /// Starts decommissioning executors: they no longer count toward the totals, are not
    /// replaced, and are removed when `decommission_timeout` passes. Returns those affected.
    pub fn decommission(
        &mut self,
        ids: &[ExecutorId],
        adjust_target: bool,
        now: Millis,
    ) -> Result<Vec<ExecutorId>, EngineError> {
        if self.phase == AppPhase::Ending {
            return Err(EngineError::Ending);
        }
        self.advance(now);
        self.renew_lease();
        let deadline = now.saturating_add(self.config.decommission_timeout);
        let mut affected = Vec::new();
        for &id in ids {
            let Some(executor) = self.executors.get_mut(&id) else {
                continue;
            };
            if !executor.counts_toward_target() {
                continue;
            }
            executor.decommission_deadline = Some(deadline);
            let profile = executor.profile;
            if adjust_target {
                if let Some(total) = self.targets.get_mut(&profile) {
                    *total = total.saturating_sub(1);
                }
            }
            affected.push(id);
        }
        self.reconcile();
        Ok(affected)
    }

    /// Renews the lease and forgets events up to `acked_seq`.
    pub fn heartbeat(&mut self, acked_seq: u64, now: Millis) {
        self.advance(now);
        self.renew_lease();
        self.ack(acked_seq);
    }

    /// Forgets events with sequence numbers up to `acked_seq`: the driver has handled them.
    pub fn ack(&mut self, acked_seq: u64) {
        while self.log.front().is_some_and(|e| e.seq <= acked_seq) {
            self.log.pop_front();
        }
    }

    /// Ends the application now: every executor is removed.
    pub fn unregister(&mut self, now: Millis) -> usize {
        self.advance(now);
        self.end()
    }

    /// Records an executor that exists in the backend (a restarted stoker adopting pods). Ids are
    /// kept unique: an id at or below one already handed out that is not tracked is refused.
    pub fn adopt(
        &mut self,
        id: ExecutorId,
        profile: ProfileId,
        running: Option<String>,
        backend_name: String,
        now: Millis,
    ) -> bool {
        if self.executors.contains_key(&id) {
            return false;
        }
        self.advance(now);
        self.profiles.insert(profile);
        let phase = if running.is_some() {
            ExecutorPhase::Running
        } else {
            ExecutorPhase::Pending
        };
        self.executors.insert(
            id,
            Executor {
                id,
                profile,
                phase,
                host: running.unwrap_or_default(),
                backend_name,
                created_at: now,
                deleting: None,
                decommission_deadline: None,
                // Started by an earlier stoker at a size not recorded: taken as the current one.
                size: self.sizing.size(profile),
            },
        );
        self.next_id = self.next_id.max(id.get().saturating_add(1));
        true
    }

    /// Reports executors the driver knows but the engine does not track as lost (terminal
    /// `Lost` events). Used on the first registration in a new stoker incarnation.
    pub fn report_unknown_as_lost(&mut self, known: &[ExecutorId], now: Millis) {
        self.advance(now);
        for &id in known {
            if self.executors.contains_key(&id) {
                continue;
            }
            self.next_id = self.next_id.max(id.get().saturating_add(1));
            let message = format!(
                "executor {id} is unknown to this stoker (restarted without its executors)"
            );
            self.push_event(EventKind::Executor(ExecutorEvent {
                id,
                profile: 0,
                phase: ExecutorPhase::Exited,
                host: String::new(),
                backend_name: String::new(),
                exit: Some(ExitInfo {
                    code: None,
                    reason: ExitReason::Lost,
                    message,
                    caused_by_app: false,
                }),
            }));
        }
    }

    // === backend observations and time ===

    /// Applies what the backend saw. Returns false for an executor the engine does not track
    /// (never launched, or already exited): such observations change nothing.
    pub fn observe(&mut self, id: ExecutorId, observation: Observation, now: Millis) -> bool {
        self.advance(now);
        let Some(executor) = self.executors.get_mut(&id) else {
            return false;
        };
        match observation {
            Observation::Accepted { backend_name } => {
                if executor.phase != ExecutorPhase::Requested {
                    return true;
                }
                executor.phase = ExecutorPhase::Pending;
                executor.backend_name = backend_name;
                let event = snapshot(executor, None);
                self.push_event(EventKind::Executor(event));
            }
            Observation::Running { host, backend_name } => {
                if executor.phase == ExecutorPhase::Running {
                    return true;
                }
                executor.phase = ExecutorPhase::Running;
                executor.host = host;
                if !backend_name.is_empty() {
                    executor.backend_name = backend_name;
                }
                let event = snapshot(executor, None);
                self.push_event(EventKind::Executor(event));
            }
            Observation::Waiting { message } => {
                if matches!(
                    executor.phase,
                    ExecutorPhase::Requested | ExecutorPhase::Pending
                ) {
                    let message = format!("executor {id} is waiting: {message}");
                    self.push_event(EventKind::AppWarning { message });
                }
            }
            Observation::Exited {
                code,
                reason,
                message,
            } => {
                let Some(executor) = self.executors.remove(&id) else {
                    return false;
                };
                self.exited_total += 1;
                let reason = match (executor.deleting, executor.decommission_deadline) {
                    // stoker's own removal explains the exit, whatever the signal's exit code.
                    (Some(cause), _) => cause,
                    (None, Some(_)) => ExitReason::Decommissioned,
                    (None, None) => reason,
                };
                let message = if message.is_empty() {
                    describe(id, code, reason)
                } else {
                    message
                };
                let exit = ExitInfo {
                    code,
                    reason,
                    message,
                    caused_by_app: reason.caused_by_app(),
                };
                let event = snapshot(&executor, Some(exit));
                self.push_event(EventKind::Executor(event));
                let verdict =
                    self.sizing
                        .on_exit(executor.profile, id, executor.size, code, reason);
                for _ in 0..verdict.counted(reason) {
                    self.record_failure();
                }
                match verdict {
                    Verdict::Grew { resize, .. } => self.push_event(EventKind::Resized(resize)),
                    Verdict::AtCeiling {
                        ceiling_mib,
                        refused_above: false,
                        first: true,
                        ..
                    } => {
                        let message = format!(
                            "profile {} cannot grow past the ceiling of {ceiling_mib} MiB per \
                             executor (spark.stoker.resize.maxMemory, --max-executor-memory): \
                             executor {id} failed at that size and counts as a failure",
                            executor.profile
                        );
                        self.push_event(EventKind::AppWarning { message });
                    }
                    Verdict::SteppedBack {
                        executor: refused,
                        from,
                        to,
                        deferred_now_counted,
                    } => {
                        let counted = if deferred_now_counted > 0 {
                            "; the out-of-memory failure that grew it counts now"
                        } else {
                            ""
                        };
                        let message = format!(
                            "profile {} goes back to {} MiB heap + {} MiB overhead and grows no \
                             further: executor {refused} with {} MiB heap + {} MiB overhead could \
                             not be started (see its exit: a LimitRange or an admission policy may \
                             cap executor memory in this namespace){counted}",
                            executor.profile,
                            to.heap_mib,
                            to.overhead_mib,
                            from.heap_mib,
                            from.overhead_mib
                        );
                        self.push_event(EventKind::AppWarning { message });
                    }
                    Verdict::AtCeiling {
                        ceiling_mib,
                        refused_above: true,
                        first: true,
                        ..
                    } => {
                        let message = format!(
                            "profile {} cannot grow past {ceiling_mib} MiB per executor, the \
                             largest size this namespace started: executor {id} failed at that \
                             size and counts as a failure",
                            executor.profile
                        );
                        self.push_event(EventKind::AppWarning { message });
                    }
                    Verdict::Unchanged | Verdict::AlreadyResized | Verdict::AtCeiling { .. } => {}
                }
                self.reconcile();
            }
        }
        true
    }

    /// Applies the passage of time: lease expiry, start timeouts, decommission deadlines.
    pub fn tick(&mut self, now: Millis) {
        self.advance(now);
        if self.phase != AppPhase::Ending && now >= self.lease_deadline {
            self.end();
            return;
        }
        let mut overdue = Vec::new();
        for executor in self.executors.values() {
            if executor.deleting.is_some() {
                continue;
            }
            if let Some(deadline) = executor.decommission_deadline {
                if now >= deadline {
                    overdue.push((executor.id, ExitReason::Decommissioned));
                }
                continue;
            }
            if executor.phase != ExecutorPhase::Running
                && now
                    >= executor
                        .created_at
                        .saturating_add(self.config.start_timeout)
            {
                overdue.push((executor.id, ExitReason::StartTimeout));
            }
        }
        for (id, reason) in overdue {
            self.delete(id, reason);
        }
        let due: Vec<ProfileId> = self
            .reclaims
            .iter()
            .filter(|(_, r)| now >= r.deadline)
            .map(|(&p, _)| p)
            .collect();
        for profile in due {
            self.reclaims.remove(&profile);
            self.reclaim_now(profile);
        }
        self.reconcile();
    }

    /// Past a reclaim's deadline: removes the newest executors of `profile` still over the
    /// share and tells the driver.
    fn reclaim_now(&mut self, profile: ProfileId) {
        let over = usize::try_from(self.over_share(profile)).unwrap_or(usize::MAX);
        if over == 0 {
            return;
        }
        let victims: Vec<ExecutorId> = self
            .executors
            .values()
            .rev()
            .filter(|e| e.profile == profile && e.counts_toward_target())
            .take(over)
            .map(|e| e.id)
            .collect();
        for &id in &victims {
            self.delete(id, ExitReason::Reclaimed);
        }
        let ids: Vec<String> = victims.iter().map(ToString::to_string).collect();
        let noun = if victims.len() == 1 {
            "executor"
        } else {
            "executors"
        };
        let message = format!(
            "removing {noun} {} of resource profile {profile}: not given back by the reclaim \
             deadline ({})",
            ids.join(", "),
            self.reclaim_reason
                .as_deref()
                .unwrap_or("over its fair share")
        );
        self.push_event(EventKind::AppWarning { message });
    }

    // === internals ===

    fn advance(&mut self, now: Millis) {
        debug_assert!(now >= self.now, "time went backwards: {now} < {}", self.now);
        self.now = self.now.max(now);
        if let Some(window) = self.config.failure_window {
            let horizon = self.now.saturating_sub(window);
            while self.failures.front().is_some_and(|&t| t < horizon) {
                self.failures.pop_front();
            }
        }
    }

    fn renew_lease(&mut self) {
        if self.phase != AppPhase::Ending {
            self.lease_deadline = self.now.saturating_add(self.config.lease_ttl);
        }
    }

    fn end(&mut self) -> usize {
        if self.phase == AppPhase::Ending {
            return 0;
        }
        self.phase = AppPhase::Ending;
        self.targets.values_mut().for_each(|t| *t = 0);
        let alive: Vec<ExecutorId> = self
            .executors
            .values()
            .filter(|e| e.deleting.is_none())
            .map(|e| e.id)
            .collect();
        let removed = alive.len();
        for id in alive {
            self.delete(id, ExitReason::ApplicationEnded);
        }
        removed
    }

    fn record_failure(&mut self) {
        self.failures.push_back(self.now);
        self.failures_total = self.failures_total.saturating_add(1);
        if self.phase != AppPhase::Active {
            return;
        }
        let counted = self.failures();
        if counted < self.config.max_failures {
            return;
        }
        self.phase = AppPhase::Failed;
        let message = format!(
            "max number of executor failures ({}) reached: {counted} executors failed{}",
            self.config.max_failures,
            match self.config.failure_window {
                Some(window) => format!(" within {window} ms"),
                None => String::new(),
            }
        );
        self.push_event(EventKind::AppFailed { message });
        let unstarted: Vec<ExecutorId> = self
            .executors
            .values()
            .filter(|e| e.deleting.is_none() && e.phase != ExecutorPhase::Running)
            .map(|e| e.id)
            .collect();
        for id in unstarted {
            self.delete(id, ExitReason::ApplicationEnded);
        }
    }

    /// Marks an executor for removal and asks the backend to stop it. The terminal event comes
    /// when the backend confirms the exit.
    fn delete(&mut self, id: ExecutorId, reason: ExitReason) {
        let Some(executor) = self.executors.get_mut(&id) else {
            return;
        };
        if executor.deleting.is_some() {
            return;
        }
        executor.deleting = Some(reason);
        let grace = match executor.phase {
            // Nothing to wind down in an executor that never ran.
            ExecutorPhase::Requested | ExecutorPhase::Pending => 0,
            ExecutorPhase::Running | ExecutorPhase::Exited => self.config.delete_grace,
        };
        self.actions.push(Action::Terminate { id, grace });
    }

    fn reconcile(&mut self) {
        self.reconcile_targets();
        self.review_reclaims();
    }

    /// Shrinks and closes open reclaims as the over-share counts fall (the driver gives
    /// executors back, or asks for less).
    fn review_reclaims(&mut self) {
        let profiles: Vec<ProfileId> = self.reclaims.keys().copied().collect();
        for profile in profiles {
            let count = self.over_share(profile);
            match self.reclaims.get_mut(&profile) {
                Some(open) if count > 0 => open.count = open.count.min(count),
                _ => {
                    self.reclaims.remove(&profile);
                }
            }
        }
    }

    /// After an allocation: opens a reclaim, or asks again for a grown one, for each profile
    /// over its share both in the allocation's view and now (see the module documentation):
    /// one event per new or grown reclaim.
    fn open_reclaims(&mut self) {
        let basis = std::mem::take(&mut self.reclaim_basis);
        let Some(reason) = self.reclaim_reason.clone() else {
            return;
        };
        for (profile, seen) in basis {
            let count = seen.min(self.over_share(profile));
            if count == 0
                || self
                    .reclaims
                    .get(&profile)
                    .is_some_and(|r| count <= r.count)
            {
                continue;
            }
            let deadline = self.now.saturating_add(self.config.reclaim_timeout);
            self.reclaims.insert(profile, Reclaim { count, deadline });
            let request = ReclaimRequest {
                profile,
                count,
                deadline,
                reason: reason.clone(),
            };
            self.push_event(EventKind::Reclaim(request));
        }
    }

    fn reconcile_targets(&mut self) {
        if self.phase != AppPhase::Active {
            return;
        }
        let profiles: Vec<(ProfileId, u32)> = self
            .targets
            .keys()
            .map(|&p| (p, self.effective_target(p)))
            .collect();
        for (profile, target) in profiles {
            let counted: Vec<&Executor> = self
                .executors
                .values()
                .filter(|e| e.profile == profile && e.counts_toward_target())
                .collect();
            let have = u32::try_from(counted.len()).unwrap_or(u32::MAX);
            if have > target {
                // Remove not-yet-running executors, newest first; running ones wait for the
                // driver, which knows which are idle.
                let excess = usize::try_from(have - target).unwrap_or(usize::MAX);
                let victims: Vec<ExecutorId> = counted
                    .iter()
                    .rev()
                    .filter(|e| e.phase != ExecutorPhase::Running)
                    .take(excess)
                    .map(|e| e.id)
                    .collect();
                for id in victims {
                    self.delete(id, ExitReason::ScaledDown);
                }
                continue;
            }
            for _ in have..target {
                if self.next_id > ExecutorId::MAX {
                    let last = ExecutorId::new(ExecutorId::MAX);
                    let message = EngineError::IdsExhausted(last).to_string();
                    self.push_event(EventKind::AppWarning { message });
                    return;
                }
                let id = ExecutorId::new(self.next_id);
                self.next_id += 1;
                let size = self.sizing.size(profile);
                let executor = Executor {
                    id,
                    profile,
                    phase: ExecutorPhase::Requested,
                    host: String::new(),
                    backend_name: String::new(),
                    created_at: self.now,
                    deleting: None,
                    decommission_deadline: None,
                    size,
                };
                let event = snapshot(&executor, None);
                self.executors.insert(id, executor);
                self.push_event(EventKind::Executor(event));
                self.actions.push(Action::Launch { id, profile, size });
            }
        }
    }

    fn push_event(&mut self, kind: EventKind) {
        self.last_seq += 1;
        self.log.push_back(Event {
            seq: self.last_seq,
            at: self.now,
            kind,
        });
        while self.log.len() > self.config.max_event_log {
            self.log.pop_front();
            self.dropped_events += 1;
        }
    }
}

fn earliest(a: Option<Millis>, b: Option<Millis>) -> Option<Millis> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn snapshot(executor: &Executor, exit: Option<ExitInfo>) -> ExecutorEvent {
    ExecutorEvent {
        id: executor.id,
        profile: executor.profile,
        phase: if exit.is_some() {
            ExecutorPhase::Exited
        } else {
            executor.phase
        },
        host: executor.host.clone(),
        backend_name: executor.backend_name.clone(),
        exit,
    }
}

fn describe(id: ExecutorId, code: Option<i32>, reason: ExitReason) -> String {
    match code {
        Some(code) => format!("executor {id} exited with code {code} ({reason})"),
        None => format!("executor {id} exited ({reason})"),
    }
}
