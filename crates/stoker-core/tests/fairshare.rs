//! Property tests of the fair-share allocation ([`stoker_core::fairshare::allocate`]).
//!
//! Random queue configurations (capacity in executors, in cores and memory, in all three or
//! none; weights, guarantees, maxima, floors) and random applications (one to three profiles of
//! random sizes, requests, running executors). Checked:
//! * never more than requested; the total within the capacity; every queue within its max;
//! * work-conserving: an application short of its request could not take one more executor;
//! * floors first: when the floors fit, every application gets its floor; when they do not,
//!   every application gets its first executor before any gets a second;
//! * guarantees: a queue short of its guarantee is short only because its applications asked
//!   for no more (or, with floors, the floors took the room);
//! * weighted max-min: no queue is above an unsatisfied queue's weighted share by more than one
//!   executor, no application above an unsatisfied one of its queue by more than one;
//! * deterministic; departures never lower, arrivals never raise, anyone else's admitted count;
//! * without configuration, everything requested is admitted.

use std::collections::BTreeMap;

use proptest::prelude::*;
use stoker_core::fairshare::{
    allocate, AppDemand, ProfileDemand, Queue, QueueConfig, QueueName, Resources, Shape, Share,
    Usage,
};
use stoker_core::AppId;

const UNIFORM: Shape = Shape {
    cores: 2,
    memory_mib: 8 * 1024,
};

#[derive(Clone, Copy, Debug)]
struct Knobs {
    uniform: bool,
    floors: bool,
    guarantees: bool,
    maxes: bool,
}

#[derive(Clone, Debug)]
struct Scenario {
    config: QueueConfig,
    apps: BTreeMap<AppId, AppDemand>,
}

fn queue_name(i: usize) -> QueueName {
    // "q0".."q3": valid by construction.
    QueueName::parse(&format!("q{i}")).unwrap_or_else(|e| panic!("{e}"))
}

fn app_id(i: usize) -> AppId {
    AppId::parse(&format!("app-{i:02}")).unwrap_or_else(|e| panic!("{e}"))
}

fn capacity() -> impl Strategy<Value = Resources> {
    prop_oneof![
        (1..80u64).prop_map(Resources::executors),
        (1..200u64, 1..800u64).prop_map(|(c, g)| Resources::cores_memory(c, g * 1024)),
        (1..80u64, 1..200u64, 1..800u64).prop_map(|(e, c, g)| Resources {
            executors: Some(e),
            ..Resources::cores_memory(c, g * 1024)
        }),
        Just(Resources::UNBOUNDED),
    ]
}

#[derive(Clone, Debug)]
struct RawQueue {
    weight: u32,
    floor: u32,
    guarantee_part: u64,
    max: Option<(bool, u64)>,
}

fn raw_queue() -> impl Strategy<Value = RawQueue> {
    (
        1..6u32,
        0..4u32,
        0..4u64,
        prop::option::of((any::<bool>(), 1..60u64)),
    )
        .prop_map(|(weight, floor, guarantee_part, max)| RawQueue {
            weight,
            floor,
            guarantee_part,
            max,
        })
}

type RawProfile = (Shape, u32, u32);
type RawApp = (usize, u32, Vec<RawProfile>);

fn raw_app(uniform: bool) -> impl Strategy<Value = RawApp> {
    let shape = (1..5u32, 1..17u64).prop_map(move |(cores, gi)| {
        if uniform {
            UNIFORM
        } else {
            Shape {
                cores,
                memory_mib: gi * 1024,
            }
        }
    });
    let profile = (shape, 0..25u32, 0..25u32);
    (
        0..4usize,
        0..4u32,
        prop::collection::vec(profile, if uniform { 1..2 } else { 1..4 }),
    )
}

fn scenario(knobs: Knobs) -> impl Strategy<Value = Scenario> {
    (
        capacity(),
        prop::collection::vec(raw_queue(), 1..5),
        prop::collection::vec(raw_app(knobs.uniform), 0..9),
    )
        .prop_map(move |(capacity, raw_queues, raw_apps)| {
            build(knobs, capacity, &raw_queues, &raw_apps)
        })
}

fn build(
    knobs: Knobs,
    capacity: Resources,
    raw_queues: &[RawQueue],
    raw_apps: &[RawApp],
) -> Scenario {
    let parts: u64 = raw_queues.iter().map(|q| q.guarantee_part).sum();
    let mut queues = Vec::new();
    for (i, raw) in raw_queues.iter().enumerate() {
        let mut queue = Queue::new(queue_name(i));
        queue.weight = raw.weight;
        queue.floor = if knobs.floors { raw.floor } else { 0 };
        if knobs.guarantees && raw.guarantee_part > 0 {
            // Shares of the capacity that add up to less than all of it, in its units.
            let part = |amount: u64| amount * raw.guarantee_part / (parts + 1);
            queue.guaranteed = Resources {
                executors: capacity.executors.map(part),
                cores: capacity.cores.map(part),
                memory_mib: capacity.memory_mib.map(part),
            };
        }
        if let (true, Some((in_cores, amount))) = (knobs.maxes, raw.max) {
            // At least the guarantee, as the configuration requires.
            if in_cores {
                queue.max.cores = Some((amount * 3).max(queue.guaranteed.cores.unwrap_or(0)));
            } else {
                queue.max.executors = Some(amount.max(queue.guaranteed.executors.unwrap_or(0)));
            }
        }
        queues.push(queue);
    }
    let n = queues.len();
    let config = QueueConfig::new(capacity, queues, queue_name(0), vec![])
        .unwrap_or_else(|e| panic!("generated configuration refused: {e}"));
    let apps = raw_apps
        .iter()
        .enumerate()
        .map(|(i, (queue, min, profiles))| {
            let profiles = profiles
                .iter()
                .enumerate()
                .map(|(p, &(shape, requested, running))| {
                    let profile = ProfileDemand {
                        shape,
                        requested,
                        running,
                    };
                    (i32::try_from(p).unwrap_or(0), profile)
                })
                .collect();
            let demand = AppDemand {
                queue: Some(queue_name(queue % n)),
                min_executors: if knobs.floors { *min } else { 0 },
                profiles,
            };
            (app_id(i), demand)
        })
        .collect();
    Scenario { config, apps }
}

// === helpers over the outcome ===

fn queue_of<'a>(s: &'a Scenario, demand: &AppDemand) -> &'a Queue {
    demand
        .queue
        .as_ref()
        .and_then(|q| s.config.queue(q))
        .or_else(|| s.config.queue(s.config.default_queue()))
        .unwrap_or_else(|| panic!("no queue"))
}

fn one(shape: Shape) -> Usage {
    Usage::of(shape, 1)
}

/// The shape of every profile short of its request.
fn unmet_shapes(
    demand: &AppDemand,
    allocation: &stoker_core::fairshare::AppAllocation,
) -> Vec<Shape> {
    demand
        .profiles
        .iter()
        .filter(|(id, _)| {
            let p = &allocation.profiles[*id];
            p.admitted < p.requested
        })
        .map(|(_, d)| d.shape)
        .collect()
}

fn effective_floor(s: &Scenario, demand: &AppDemand) -> u64 {
    let requested: u64 = demand
        .profiles
        .values()
        .map(|p| u64::from(p.requested))
        .sum();
    u64::from(demand.min_executors.max(queue_of(s, demand).floor)).min(requested)
}

fn knobs() -> impl Strategy<Value = Knobs> {
    (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>()).prop_map(
        |(uniform, floors, guarantees, maxes)| Knobs {
            uniform,
            floors,
            guarantees,
            maxes,
        },
    )
}

fn any_scenario() -> impl Strategy<Value = Scenario> {
    knobs().prop_flat_map(scenario)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn bounds_hold(s in any_scenario()) {
        let allocation = allocate(Some(&s.config), &s.apps);
        prop_assert_eq!(allocation.apps.len(), s.apps.len());
        let mut total = Usage::default();
        for (id, app) in &allocation.apps {
            for (profile, p) in &app.profiles {
                prop_assert!(p.admitted <= p.requested, "{id} profile {profile}: {p:?}");
                prop_assert_eq!(p.reclaim(), p.running.min(p.requested).saturating_sub(p.admitted));
                total = total.plus(Usage::of(s.apps[id].profiles[profile].shape, p.admitted));
            }
        }
        prop_assert!(total.fits(s.config.capacity()), "{total:?} over {:?}", s.config.capacity());
        for (name, q) in &allocation.queues {
            let max = s.config.queue(name).map(|q| q.max).unwrap_or_default();
            prop_assert!(q.admitted.fits(&max), "queue {name}: {:?} over {max:?}", q.admitted);
        }
    }

    #[test]
    fn no_application_is_short_while_its_next_executor_would_fit(s in any_scenario()) {
        let allocation = allocate(Some(&s.config), &s.apps);
        let total = allocation.queues.values().fold(Usage::default(), |t, q| t.plus(q.admitted));
        for (id, demand) in &s.apps {
            let queue = queue_of(&s, demand);
            let queue_usage = allocation.queues[&queue.name].admitted;
            for shape in unmet_shapes(demand, &allocation.apps[id]) {
                let fits_capacity = total.plus(one(shape)).fits(s.config.capacity());
                let fits_max = queue_usage.plus(one(shape)).fits(&queue.max);
                prop_assert!(!(fits_capacity && fits_max), "{id} could take a {shape:?}");
            }
        }
    }

    #[test]
    fn floors_that_fit_are_admitted(s in knobs().prop_flat_map(|k| scenario(Knobs { floors: true, ..k }))) {
        let allocation = allocate(Some(&s.config), &s.apps);
        // Enough room for every floor at the most any of its requested executors takes in each
        // unit, in the capacity and in each max.
        let floor_usage = |d: &AppDemand| {
            let asked = d.profiles.values().filter(|p| p.requested > 0);
            let biggest = asked.fold(Usage { executors: 1, ..Usage::default() }, |b, p| Usage {
                executors: 1,
                cores: b.cores.max(u64::from(p.shape.cores)),
                memory_mib: b.memory_mib.max(p.shape.memory_mib),
            });
            biggest.times(effective_floor(&s, d))
        };
        let all = s.apps.values().fold(Usage::default(), |t, d| t.plus(floor_usage(d)));
        let fits_queues = s.config.queues().values().all(|q| {
            s.apps.values().filter(|d| queue_of(&s, d).name == q.name)
                .fold(Usage::default(), |t, d| t.plus(floor_usage(d)))
                .fits(&q.max)
        });
        prop_assume!(all.fits(s.config.capacity()) && fits_queues);
        for (id, demand) in &s.apps {
            let floor = effective_floor(&s, demand);
            prop_assert!(allocation.apps[id].admitted() >= floor, "{id}: floor {floor}");
        }
    }

    #[test]
    fn floors_beyond_the_capacity_give_first_executors_before_second_ones(
        s in scenario(Knobs { uniform: true, floors: true, guarantees: false, maxes: false })
    ) {
        let allocation = allocate(Some(&s.config), &s.apps);
        let starved = s.apps.iter().any(|(id, d)| {
            effective_floor(&s, d) >= 1 && allocation.apps[id].admitted() == 0
        });
        if starved {
            for (id, app) in &allocation.apps {
                prop_assert!(app.admitted() <= 1, "{id} has {} while another has none", app.admitted());
            }
        }
    }

    #[test]
    fn a_queue_short_of_its_guarantee_asked_for_no_more(s in any_scenario()) {
        let allocation = allocate(Some(&s.config), &s.apps);
        let total = allocation.queues.values().fold(Usage::default(), |t, q| t.plus(q.admitted));
        for (id, demand) in &s.apps {
            let queue = queue_of(&s, demand);
            if queue.guaranteed.is_unbounded() {
                continue;
            }
            let queue_usage = allocation.queues[&queue.name].admitted;
            for shape in unmet_shapes(demand, &allocation.apps[id]) {
                let after = queue_usage.plus(one(shape));
                if after.fits(&queue.guaranteed) && after.fits(&queue.max) {
                    // Only other queues' floors can have taken the room.
                    prop_assert!(!total.plus(one(shape)).fits(s.config.capacity()),
                        "queue {} below its guarantee while {id} asks for a {shape:?}", queue.name);
                }
            }
        }
    }

    #[test]
    fn without_floors_a_guarantee_is_met_whenever_demanded(
        s in knobs().prop_flat_map(|k| scenario(Knobs { floors: false, guarantees: true, ..k }))
    ) {
        let allocation = allocate(Some(&s.config), &s.apps);
        for (id, demand) in &s.apps {
            let queue = queue_of(&s, demand);
            if queue.guaranteed.is_unbounded() {
                continue;
            }
            let queue_usage = allocation.queues[&queue.name].admitted;
            for shape in unmet_shapes(demand, &allocation.apps[id]) {
                let after = queue_usage.plus(one(shape));
                prop_assert!(!(after.fits(&queue.guaranteed) && after.fits(&queue.max)),
                    "queue {} ({queue_usage:?}) below its guarantee {:?} while {id} asks for a {shape:?}",
                    queue.name, queue.guaranteed);
            }
        }
    }

    #[test]
    fn shares_are_weighted_max_min(
        s in scenario(Knobs { uniform: true, floors: false, guarantees: false, maxes: true })
    ) {
        let allocation = allocate(Some(&s.config), &s.apps);
        let count = |name: &QueueName| allocation.queues[name].admitted.executors;
        for (id, demand) in &s.apps {
            let app = &allocation.apps[id];
            if app.admitted() >= app.requested() {
                continue;
            }
            let queue = queue_of(&s, demand);
            let queue_usage = allocation.queues[&queue.name].admitted;
            if !queue_usage.plus(one(UNIFORM)).fits(&queue.max) {
                continue; // held by its own queue's max, not by the others
            }
            // Unsatisfied by the capacity: nobody else is more than one executor above it.
            let n_q = count(&queue.name);
            for other in s.config.queues().values() {
                let n_r = count(&other.name);
                if n_r == 0 {
                    continue;
                }
                prop_assert!(
                    (n_r - 1) * u64::from(queue.weight) <= n_q * u64::from(other.weight),
                    "queue {} ({n_r}, weight {}) above unsatisfied {} ({n_q}, weight {})",
                    other.name, other.weight, queue.name, queue.weight
                );
            }
            for (other_id, other_demand) in &s.apps {
                if queue_of(&s, other_demand).name != queue.name {
                    continue;
                }
                let n_b = allocation.apps[other_id].admitted();
                prop_assert!(n_b <= app.admitted() + 1,
                    "{other_id} ({n_b}) above unsatisfied {id} ({}) in queue {}", app.admitted(), queue.name);
            }
        }
    }

    #[test]
    fn applications_of_a_queue_share_by_dominant_share(
        s in scenario(Knobs { uniform: false, floors: false, guarantees: false, maxes: false })
    ) {
        let allocation = allocate(Some(&s.config), &s.apps);
        let capacity = s.config.capacity();
        // Single-profile applications: their share is n executors of one shape.
        let single = |d: &AppDemand| (d.profiles.len() == 1).then(|| d.profiles.values().next().map(|p| p.shape)).flatten();
        for (id, demand) in &s.apps {
            let app = &allocation.apps[id];
            let Some(shape_a) = single(demand) else { continue };
            if app.admitted() >= app.requested() {
                continue;
            }
            let share_a = Share::of(&Usage::of(shape_a, u32::try_from(app.admitted()).unwrap_or(u32::MAX)), capacity, 1);
            for (other_id, other) in &s.apps {
                let Some(shape_b) = single(other) else { continue };
                let n_b = u32::try_from(allocation.apps[other_id].admitted()).unwrap_or(u32::MAX);
                // Whenever b's executor fit, a's smaller one did: a was there to take it.
                let smaller = shape_a.cores <= shape_b.cores && shape_a.memory_mib <= shape_b.memory_mib;
                if n_b == 0 || !smaller || queue_of(&s, other).name != queue_of(&s, demand).name {
                    continue;
                }
                let share_b_before_last = Share::of(&Usage::of(shape_b, n_b - 1), capacity, 1);
                prop_assert!(share_b_before_last <= share_a,
                    "{other_id} ({n_b} of {shape_b:?}) above unsatisfied {id} ({} of {shape_a:?})", app.admitted());
            }
        }
    }

    #[test]
    fn the_same_input_gives_the_same_output(s in any_scenario()) {
        let first = allocate(Some(&s.config), &s.apps);
        // The same applications inserted in the reverse order.
        let reversed: BTreeMap<AppId, AppDemand> =
            s.apps.iter().rev().map(|(k, v)| (k.clone(), v.clone())).collect();
        prop_assert_eq!(&first, &allocate(Some(&s.config), &reversed));
        prop_assert_eq!(&first, &allocate(Some(&s.config), &s.apps));
    }

    #[test]
    fn a_departure_never_lowers_anyone_else(
        s in scenario(Knobs { uniform: true, floors: false, guarantees: false, maxes: true }),
        pick in any::<usize>(),
    ) {
        prop_assume!(!s.apps.is_empty());
        let before = allocate(Some(&s.config), &s.apps);
        let gone = s.apps.keys().nth(pick % s.apps.len()).cloned().unwrap_or_else(|| app_id(0));
        let mut rest = s.apps.clone();
        rest.remove(&gone);
        let after = allocate(Some(&s.config), &rest);
        for (id, app) in &after.apps {
            prop_assert!(app.admitted() >= before.apps[id].admitted(),
                "{id}: {} after {gone} left, {} before", app.admitted(), before.apps[id].admitted());
        }
    }

    #[test]
    fn without_configuration_everything_is_admitted(s in any_scenario()) {
        let allocation = allocate(None, &s.apps);
        for (id, demand) in &s.apps {
            for (profile, d) in &demand.profiles {
                prop_assert_eq!(allocation.apps[id].profiles[profile].admitted, d.requested);
            }
        }
    }
}
