//! Fair share: how many executors each application is admitted, across queues.
//!
//! [`allocate`] is a pure function of the queue configuration, the applications' requests and
//! their current executors. The caller (the server) runs it whenever one of those changes and
//! sets each application's effective target to `min(requested, admitted)` per resource profile.
//!
//! # Units
//!
//! Capacity, guarantees and maxima are amounts of executors, cores and memory
//! ([`config::Resources`]): cores and memory are what a platform team's ResourceQuota speaks,
//! and executors are what a capacity such as "60 executors" speaks; a limit bounds each unit it
//! names. Sharing is by **dominant share** (DRF): an application's share is the largest, over
//! the capacity's units, of the fraction of the capacity its admitted executors take (an executor
//! of 4 cores and 16 GiB in a cluster of 240 cores and 960 GiB costs 1/60). With a capacity in
//! executors only, every executor costs the same and sharing is by executor count; with no
//! capacity at all, too. Executors are admitted one at a time, in whole numbers.
//!
//! # Order of admission
//!
//! 1. **Floors.** Each application's floor (its `spark.dynamicAllocation.minExecutors`, raised to
//!    its queue's floor, lowered to its request) is admitted first, one executor per application
//!    in turn (fewest admitted first), so that when floors alone exceed the capacity every
//!    application gets its first executor before any gets a second. Floors are bounded by the
//!    capacity and by the queue's max like everything else: floors that do not fit are not
//!    admitted.
//! 2. **Guarantees.** Each queue is then admitted up to its guarantee while its applications
//!    ask for more, lowest weighted share first. The guarantees fit in the capacity (the
//!    configuration checks it), so a queue gets its guarantee unless other queues' floors took
//!    the room (or, for a guarantee that names fewer units than the capacity, other queues took
//!    the unit it does not name: give guarantees in all the capacity's units).
//! 3. **Weighted max-min.** What is left goes one executor at a time to the queue with the
//!    lowest dominant share divided by its weight, and inside that queue to the application with
//!    the lowest dominant share (equal weights inside a queue), among those that can still grow:
//!    unmet request, and the next executor fits the capacity and the queue's max. A guarantee is
//!    thus a minimum, not a head start: queues above their guarantee share the rest by weight.
//!
//! Inside an application, the executor goes to the profile with the smallest admitted fraction of
//! its request (then the lowest profile id). Ties between queues or applications go to the one
//! that would otherwise have to give back a running executor, then to the smaller name.
//!
//! # Guarantees
//!
//! * Never more than requested, per profile.
//! * The admitted total fits the capacity and each queue fits its max, in every unit given.
//! * Work-conserving: when an application is admitted less than it requested, its next executor
//!   would not fit the capacity or its queue's max.
//! * Deterministic: the same input gives the same output; the input is keyed by application id,
//!   so its order cannot matter.
//! * Without configuration, everyone is admitted what it requested (stoker as without queues).
//! * Admitted may be below what is running: the difference is reported per application
//!   ([`AppAllocation::reclaim`]); asking for it back is the caller's job.

pub mod config;

#[cfg(test)]
mod tests;

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BinaryHeap};

use crate::types::{AppId, ProfileId};

pub use config::{
    queue_for, ConfigError, ConfigProblem, Queue, QueueConfig, QueueName, Refusal, Resources, Rule,
    Unit,
};

/// What one executor of a resource profile takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Shape {
    /// `spark.executor.cores`.
    pub cores: u32,
    /// The container's memory in MiB (heap + overhead + off-heap + PySpark).
    pub memory_mib: u64,
}

impl Shape {
    /// The shape of an executor of `profile`.
    pub fn of(profile: &crate::types::ResourceProfile) -> Self {
        Self {
            cores: profile.cores,
            memory_mib: profile.total_memory_mib(),
        }
    }
}

/// One resource profile of an application.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ProfileDemand {
    /// What one of its executors takes.
    pub shape: Shape,
    /// The total the driver asks for.
    pub requested: u32,
    /// Executors it has now that count toward the total (alive, not being removed).
    pub running: u32,
}

/// One application, as the allocation sees it.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct AppDemand {
    /// Its queue; `None`, or a queue the configuration does not define, is the default queue.
    pub queue: Option<QueueName>,
    /// `spark.dynamicAllocation.minExecutors` (0 when not set).
    pub min_executors: u32,
    /// Its profiles.
    pub profiles: BTreeMap<ProfileId, ProfileDemand>,
}

/// Executors, cores and memory in use or asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct Usage {
    /// Executors.
    pub executors: u64,
    /// Cores.
    pub cores: u64,
    /// Memory in MiB.
    pub memory_mib: u64,
}

impl Usage {
    /// `n` executors of `shape`.
    pub fn of(shape: Shape, n: u32) -> Self {
        let n = u64::from(n);
        Self {
            executors: n,
            cores: u64::from(shape.cores).saturating_mul(n),
            memory_mib: shape.memory_mib.saturating_mul(n),
        }
    }

    /// The amount in `unit`.
    pub fn get(&self, unit: Unit) -> u64 {
        match unit {
            Unit::Executors => self.executors,
            Unit::Cores => self.cores,
            Unit::MemoryMib => self.memory_mib,
        }
    }

    /// The sum.
    pub fn plus(self, other: Usage) -> Usage {
        Usage {
            executors: self.executors.saturating_add(other.executors),
            cores: self.cores.saturating_add(other.cores),
            memory_mib: self.memory_mib.saturating_add(other.memory_mib),
        }
    }

    /// `n` times as much.
    pub fn times(self, n: u64) -> Usage {
        Usage {
            executors: self.executors.saturating_mul(n),
            cores: self.cores.saturating_mul(n),
            memory_mib: self.memory_mib.saturating_mul(n),
        }
    }

    /// The difference, at least 0 in each unit.
    pub fn minus(self, other: Usage) -> Usage {
        Usage {
            executors: self.executors.saturating_sub(other.executors),
            cores: self.cores.saturating_sub(other.cores),
            memory_mib: self.memory_mib.saturating_sub(other.memory_mib),
        }
    }

    /// Whether it is within `limit` in every unit the limit gives.
    pub fn fits(&self, limit: &Resources) -> bool {
        limit.given().all(|(unit, amount)| self.get(unit) <= amount)
    }
}

/// A dominant share as an exact fraction, so that equal shares compare equal.
#[derive(Clone, Copy, Debug)]
pub struct Share {
    num: u128,
    den: u128,
}

impl Share {
    /// The dominant share of `usage` in `capacity`: the largest fraction over the capacity's
    /// units; with no capacity, the executor count. Divided by `weight` (at least 1).
    pub fn of(usage: &Usage, capacity: &Resources, weight: u32) -> Share {
        let weight = u128::from(weight.max(1));
        let mut best = Share {
            num: u128::from(usage.executors),
            den: weight,
        };
        let mut first = true;
        for (unit, amount) in capacity.given() {
            let candidate = Share {
                num: u128::from(usage.get(unit)),
                den: u128::from(amount.max(1)) * weight,
            };
            if first || candidate > best {
                best = candidate;
            }
            first = false;
        }
        best
    }

    /// As a float, for people.
    pub fn as_f64(self) -> f64 {
        // Precision loss is fine for display.
        self.num as f64 / self.den as f64
    }
}

impl PartialEq for Share {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Share {}

impl PartialOrd for Share {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Share {
    fn cmp(&self, other: &Self) -> Ordering {
        // Usage below 2^64 and denominators below 2^56 (amounts ≤ 2^40, weights ≤ 2^14): the
        // products stay below 2^120.
        (self.num * other.den).cmp(&(other.num * self.den))
    }
}

/// Why an application is admitted less than it requested.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// It is admitted everything it requested.
    None,
    /// The capacity is shared: this is its fair share.
    FairShare,
    /// Its queue is at its max.
    QueueMax,
}

/// One profile's outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ProfileAllocation {
    /// What the driver asks for.
    pub requested: u32,
    /// What it is admitted: its effective target is `min(requested, admitted)` = `admitted`.
    pub admitted: u32,
    /// What it has now.
    pub running: u32,
}

impl ProfileAllocation {
    /// Executors it runs above its share: running executors it still asks for but is not
    /// admitted, to be asked back. Those above its own request are not counted: the driver
    /// releases them itself (Spark kills idle executors after lowering its total).
    pub fn reclaim(&self) -> u32 {
        self.running
            .min(self.requested)
            .saturating_sub(self.admitted)
    }
}

/// One application's outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppAllocation {
    /// Its queue (`None` without configuration).
    pub queue: Option<QueueName>,
    /// Its floor as admitted first (before the capacity bound).
    pub floor: u32,
    /// Per profile.
    pub profiles: BTreeMap<ProfileId, ProfileAllocation>,
    /// Why it got less than it asked for.
    pub limit: Limit,
}

impl AppAllocation {
    /// Executors requested, over all profiles.
    pub fn requested(&self) -> u64 {
        self.profiles.values().map(|p| u64::from(p.requested)).sum()
    }

    /// Executors admitted, over all profiles.
    pub fn admitted(&self) -> u64 {
        self.profiles.values().map(|p| u64::from(p.admitted)).sum()
    }

    /// Executors running, over all profiles.
    pub fn running(&self) -> u64 {
        self.profiles.values().map(|p| u64::from(p.running)).sum()
    }

    /// Executors running over its share, over all profiles (see [`ProfileAllocation::reclaim`]).
    pub fn reclaim(&self) -> u64 {
        self.profiles.values().map(|p| u64::from(p.reclaim())).sum()
    }

    /// Why the application runs over what it is admitted, for a reclaim request: `over its fair
    /// share in queue etl`, or `queue etl is at its max`.
    pub fn reclaim_reason(&self) -> String {
        let queue = self.queue.as_ref().map_or("-", QueueName::as_str);
        match self.limit {
            Limit::QueueMax => format!("queue {queue} is at its max"),
            Limit::None | Limit::FairShare => format!("over its fair share in queue {queue}"),
        }
    }

    /// What to tell the driver when it gets less than it asks for; `None` when it gets all.
    pub fn message(&self) -> Option<String> {
        let (admitted, requested) = (self.admitted(), self.requested());
        let queue = self.queue.as_ref().map_or("-", QueueName::as_str);
        match self.limit {
            Limit::None => None,
            Limit::FairShare => Some(format!(
                "admitted {admitted} of {requested} executors (queue {queue}, fair share {admitted})"
            )),
            Limit::QueueMax => Some(format!(
                "admitted {admitted} of {requested} executors (queue {queue} is at its max)"
            )),
        }
    }
}

/// One queue's totals.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct QueueAllocation {
    /// Requested by its applications.
    pub requested: Usage,
    /// Admitted to them.
    pub admitted: Usage,
    /// Running for them.
    pub running: Usage,
    /// Its applications.
    pub applications: u32,
}

/// The outcome of [`allocate`].
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Allocation {
    /// Per application.
    pub apps: BTreeMap<AppId, AppAllocation>,
    /// Per queue (every configured queue; none without configuration).
    pub queues: BTreeMap<QueueName, QueueAllocation>,
}

/// Admits executors to applications. See the module documentation for the rules; `None`
/// configuration admits every request in full.
pub fn allocate(config: Option<&QueueConfig>, apps: &BTreeMap<AppId, AppDemand>) -> Allocation {
    let Some(config) = config else {
        return unconstrained(apps);
    };
    let mut problem = Problem::new(config, apps);
    if problem.everything_fits() {
        // What progressive filling would reach one executor at a time.
        problem.admit_everything();
        return problem.outcome(apps);
    }
    problem.fill_floors();
    problem.fill_queues(Phase::Guarantees);
    problem.fill_queues(Phase::Fair);
    problem.outcome(apps)
}

fn unconstrained(apps: &BTreeMap<AppId, AppDemand>) -> Allocation {
    let apps = apps
        .iter()
        .map(|(id, demand)| {
            let profiles = demand
                .profiles
                .iter()
                .map(|(&profile, d)| {
                    let allocation = ProfileAllocation {
                        requested: d.requested,
                        admitted: d.requested,
                        running: d.running,
                    };
                    (profile, allocation)
                })
                .collect();
            let allocation = AppAllocation {
                queue: demand.queue.clone(),
                floor: 0,
                profiles,
                limit: Limit::None,
            };
            (id.clone(), allocation)
        })
        .collect();
    Allocation {
        apps,
        queues: BTreeMap::new(),
    }
}

// === the progressive filling ===

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Guarantees,
    Fair,
}

struct ProfileState {
    id: ProfileId,
    shape: Shape,
    requested: u32,
    running: u32,
    admitted: u32,
}

struct AppState {
    queue: usize,
    floor: u32,
    profiles: Vec<ProfileState>,
    usage: Usage,
    admitted: u32,
    running: u32,
}

impl AppState {
    /// The profile that gets the app's next executor, among those with an unmet request whose
    /// executor `fits`: smallest admitted fraction of its request, then the one that would give
    /// back a running executor, then the lowest id.
    fn next_profile(&self, fits: impl Fn(Shape) -> bool) -> Option<usize> {
        let mut best: Option<usize> = None;
        for (i, p) in self.profiles.iter().enumerate() {
            if p.admitted >= p.requested || !fits(p.shape) {
                continue;
            }
            let better = match best {
                None => true,
                Some(b) => {
                    let q = &self.profiles[b];
                    let lhs = u64::from(p.admitted) * u64::from(q.requested);
                    let rhs = u64::from(q.admitted) * u64::from(p.requested);
                    // Profiles are in id order: on a full tie the earlier one stays.
                    lhs < rhs || (lhs == rhs && p.admitted < p.running && q.admitted >= q.running)
                }
            };
            if better {
                best = Some(i);
            }
        }
        best
    }
}

struct QueueState {
    name: QueueName,
    weight: u32,
    guaranteed: Resources,
    max: Resources,
    usage: Usage,
    admitted: u32,
    running: u32,
    apps: Vec<usize>,
}

struct Problem {
    capacity: Resources,
    total: Usage,
    queues: Vec<QueueState>,
    apps: Vec<AppState>,
}

impl Problem {
    fn new(config: &QueueConfig, demands: &BTreeMap<AppId, AppDemand>) -> Self {
        let mut queues: Vec<QueueState> = config
            .queues()
            .values()
            .map(|q| QueueState {
                name: q.name.clone(),
                weight: q.weight,
                guaranteed: q.guaranteed,
                max: q.max,
                usage: Usage::default(),
                admitted: 0,
                running: 0,
                apps: Vec::new(),
            })
            .collect();
        let index_of = |name: &QueueName| queues.iter().position(|q| &q.name == name);
        let default_index = index_of(config.default_queue()).unwrap_or(0);
        let mut apps = Vec::with_capacity(demands.len());
        for demand in demands.values() {
            let queue = demand
                .queue
                .as_ref()
                .and_then(index_of)
                .unwrap_or(default_index);
            let queue_floor = config
                .queues()
                .values()
                .nth(queue)
                .map_or(config::DEFAULT_FLOOR, |q| q.floor);
            let profiles: Vec<ProfileState> = demand
                .profiles
                .iter()
                .map(|(&id, d)| ProfileState {
                    id,
                    shape: d.shape,
                    requested: d.requested,
                    running: d.running,
                    admitted: 0,
                })
                .collect();
            let requested: u64 = profiles.iter().map(|p| u64::from(p.requested)).sum();
            let running: u64 = profiles.iter().map(|p| u64::from(p.running)).sum();
            let floor = demand.min_executors.max(queue_floor);
            let floor = u32::try_from(u64::from(floor).min(requested)).unwrap_or(floor);
            apps.push(AppState {
                queue,
                floor,
                profiles,
                usage: Usage::default(),
                admitted: 0,
                running: u32::try_from(running).unwrap_or(u32::MAX),
            });
        }
        for (i, app) in apps.iter().enumerate() {
            if let Some(queue) = queues.get_mut(app.queue) {
                queue.apps.push(i);
                queue.running = queue.running.saturating_add(app.running);
            }
        }
        Self {
            capacity: *config.capacity(),
            total: Usage::default(),
            queues,
            apps,
        }
    }

    /// Whether every request fits the capacity and every queue's max at once.
    fn everything_fits(&self) -> bool {
        let requested = |app: &AppState| {
            app.profiles.iter().fold(Usage::default(), |sum, p| {
                sum.plus(Usage::of(p.shape, p.requested))
            })
        };
        let mut per_queue = vec![Usage::default(); self.queues.len()];
        let mut total = Usage::default();
        for app in &self.apps {
            let usage = requested(app);
            per_queue[app.queue] = per_queue[app.queue].plus(usage);
            total = total.plus(usage);
        }
        total.fits(&self.capacity)
            && per_queue
                .iter()
                .zip(&self.queues)
                .all(|(usage, queue)| usage.fits(&queue.max))
    }

    fn admit_everything(&mut self) {
        for app in &mut self.apps {
            for profile in &mut app.profiles {
                let usage = Usage::of(profile.shape, profile.requested);
                profile.admitted = profile.requested;
                app.admitted = app.admitted.saturating_add(profile.requested);
                app.usage = app.usage.plus(usage);
                let queue = &mut self.queues[app.queue];
                queue.usage = queue.usage.plus(usage);
                queue.admitted = queue.admitted.saturating_add(profile.requested);
                self.total = self.total.plus(usage);
            }
        }
    }

    /// Admits one executor of profile `p` of app `a`.
    fn admit(&mut self, a: usize, p: usize) {
        let app = &mut self.apps[a];
        let profile = &mut app.profiles[p];
        let one = Usage::of(profile.shape, 1);
        profile.admitted += 1;
        app.admitted += 1;
        app.usage = app.usage.plus(one);
        let queue = &mut self.queues[app.queue];
        queue.usage = queue.usage.plus(one);
        queue.admitted += 1;
        self.total = self.total.plus(one);
    }

    /// Whether one more executor of `shape` for a queue at `queue_usage` fits the capacity, the
    /// queue's max and, in the guarantee phase, its guarantee.
    fn fits(&self, queue: usize, shape: Shape, phase: Option<Phase>) -> bool {
        let one = Usage::of(shape, 1);
        let q = &self.queues[queue];
        let after = q.usage.plus(one);
        self.total.plus(one).fits(&self.capacity)
            && after.fits(&q.max)
            && (phase != Some(Phase::Guarantees) || after.fits(&q.guaranteed))
    }

    fn fill_floors(&mut self) {
        // Round-robin: fewest admitted first, then by application id (the index order).
        let mut heap: BinaryHeap<Reverse<(u32, usize)>> = (0..self.apps.len())
            .filter(|&a| self.apps[a].floor > 0)
            .map(|a| Reverse((0, a)))
            .collect();
        while let Some(Reverse((_, a))) = heap.pop() {
            let queue = self.apps[a].queue;
            let Some(p) = self.apps[a].next_profile(|shape| self.fits(queue, shape, None)) else {
                // Nothing more fits: the capacity and the max only shrink from here.
                continue;
            };
            self.admit(a, p);
            let app = &self.apps[a];
            if app.admitted < app.floor {
                heap.push(Reverse((app.admitted, a)));
            }
        }
    }

    fn queue_key(&self, q: usize) -> (Share, bool, usize) {
        let queue = &self.queues[q];
        let share = Share::of(&queue.usage, &self.capacity, queue.weight);
        // `false` first: a queue below its running count wins ties.
        (share, queue.admitted >= queue.running, q)
    }

    fn app_key(&self, a: usize) -> (Share, bool, usize) {
        let app = &self.apps[a];
        let share = Share::of(&app.usage, &self.capacity, 1);
        (share, app.admitted >= app.running, a)
    }

    fn fill_queues(&mut self, phase: Phase) {
        let mut queue_heap = BinaryHeap::new();
        let mut app_heaps: Vec<BinaryHeap<Reverse<(Share, bool, usize)>>> =
            Vec::with_capacity(self.queues.len());
        for q in 0..self.queues.len() {
            let heap: BinaryHeap<_> = self.queues[q]
                .apps
                .iter()
                .map(|&a| Reverse(self.app_key(a)))
                .collect();
            let takes_part = match phase {
                Phase::Guarantees => !self.queues[q].guaranteed.is_unbounded(),
                Phase::Fair => true,
            };
            if takes_part && !heap.is_empty() {
                queue_heap.push(Reverse(self.queue_key(q)));
            }
            app_heaps.push(heap);
        }
        while let Some(Reverse((_, _, q))) = queue_heap.pop() {
            // The queue's application with the lowest share that can still grow. One that
            // cannot is dropped for the rest of the phase: the room only shrinks.
            while let Some(Reverse((_, _, a))) = app_heaps[q].pop() {
                let Some(p) = self.apps[a].next_profile(|shape| self.fits(q, shape, Some(phase)))
                else {
                    continue;
                };
                self.admit(a, p);
                app_heaps[q].push(Reverse(self.app_key(a)));
                break;
            }
            if !app_heaps[q].is_empty() {
                queue_heap.push(Reverse(self.queue_key(q)));
            }
        }
    }

    fn outcome(&self, demands: &BTreeMap<AppId, AppDemand>) -> Allocation {
        let mut apps = BTreeMap::new();
        for ((id, demand), app) in demands.iter().zip(&self.apps) {
            let queue = &self.queues[app.queue];
            let unmet: Vec<&ProfileState> = app
                .profiles
                .iter()
                .filter(|p| p.admitted < p.requested)
                .collect();
            let limit = if unmet.is_empty() {
                Limit::None
            } else if unmet
                .iter()
                .all(|p| !queue.usage.plus(Usage::of(p.shape, 1)).fits(&queue.max))
            {
                Limit::QueueMax
            } else {
                Limit::FairShare
            };
            let profiles = app
                .profiles
                .iter()
                .map(|p| {
                    let allocation = ProfileAllocation {
                        requested: p.requested,
                        admitted: p.admitted,
                        running: p.running,
                    };
                    (p.id, allocation)
                })
                .collect();
            debug_assert!(demand.profiles.len() == app.profiles.len());
            let allocation = AppAllocation {
                queue: Some(queue.name.clone()),
                floor: app.floor,
                profiles,
                limit,
            };
            apps.insert(id.clone(), allocation);
        }
        let mut queues: BTreeMap<QueueName, QueueAllocation> = self
            .queues
            .iter()
            .map(|q| (q.name.clone(), QueueAllocation::default()))
            .collect();
        for app in &self.apps {
            let Some(totals) = queues.get_mut(&self.queues[app.queue].name) else {
                continue;
            };
            totals.applications += 1;
            for p in &app.profiles {
                totals.requested = totals.requested.plus(Usage::of(p.shape, p.requested));
                totals.admitted = totals.admitted.plus(Usage::of(p.shape, p.admitted));
                totals.running = totals.running.plus(Usage::of(p.shape, p.running));
            }
        }
        Allocation { apps, queues }
    }
}
