//! The engine with the sizing policy: executors that ran out of memory are replaced by bigger
//! ones; unit tests of the rules and property tests over random exits.

use proptest::prelude::*;
use stoker_core::{
    Action, AppPhase, Engine, EngineConfig, EventKind, ExecutorId, ExecutorSize, ExitReason,
    Observation, ResizePolicy, ResourceProfile, Sizing,
};

fn profile(heap: u64, overhead: u64) -> ResourceProfile {
    ResourceProfile {
        id: 0,
        cores: 1,
        heap_mib: heap,
        overhead_mib: overhead,
        ..ResourceProfile::default()
    }
}

fn engine(max_failures: u32, policy: Option<ResizePolicy>) -> Engine {
    let config = EngineConfig {
        max_failures,
        ..EngineConfig::default()
    };
    Engine::new(config, [0], 0, 0).with_sizing(Sizing::new(policy), &[profile(512, 384)])
}

fn policy(factor_permille: u32, max_memory_mib: u64) -> Option<ResizePolicy> {
    Some(ResizePolicy {
        factor_permille,
        max_memory_mib,
    })
}

fn launches(actions: &[Action]) -> Vec<(u64, Option<ExecutorSize>)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Launch { id, size, .. } => Some((id.get(), *size)),
            Action::Terminate { .. } => None,
        })
        .collect()
}

fn resizes(e: &Engine) -> Vec<String> {
    e.events_after(0)
        .filter_map(|ev| match &ev.kind {
            EventKind::Resized(r) => Some(r.message()),
            _ => None,
        })
        .collect()
}

fn warnings(e: &Engine) -> Vec<String> {
    e.events_after(0)
        .filter_map(|ev| match &ev.kind {
            EventKind::AppWarning { message } => Some(message.clone()),
            _ => None,
        })
        .collect()
}

fn exit(code: Option<i32>, reason: ExitReason) -> Observation {
    Observation::Exited {
        code,
        reason,
        message: String::new(),
    }
}

fn oom_killed() -> Observation {
    exit(Some(137), ExitReason::OomKilled)
}

fn jvm_oom() -> Observation {
    exit(Some(52), ExitReason::Error)
}

fn size(heap_mib: u64, overhead_mib: u64) -> Option<ExecutorSize> {
    Some(ExecutorSize {
        heap_mib,
        overhead_mib,
    })
}

#[test]
fn oom_killed_executor_is_replaced_by_a_bigger_one_and_running_ones_keep_their_size() {
    let mut e = engine(3, policy(1_500, 4_096));
    e.set_targets(&[(0, 2)], 1).expect("valid");
    assert_eq!(
        launches(&e.take_actions()),
        vec![(1, size(512, 384)), (2, size(512, 384))]
    );
    e.observe(ExecutorId::new(1), oom_killed(), 2);
    // 896 MiB × 1.5 = 1344 MiB: the heap stays, the overhead takes the rest.
    assert_eq!(launches(&e.take_actions()), vec![(3, size(512, 832))]);
    assert_eq!(
        e.executor(ExecutorId::new(2)).and_then(|x| x.size),
        size(512, 384),
        "a running executor keeps its size"
    );
    assert_eq!(
        resizes(&e),
        vec![
            "profile 0 now starts executors with 512 MiB heap + 832 MiB overhead after executor 1 \
             was OOM-killed"
        ]
    );
    assert_eq!(e.failures(), 0, "the resized failure is deferred");
}

#[test]
fn jvm_out_of_memory_grows_the_heap() {
    let mut e = engine(3, policy(1_500, 4_096));
    e.set_targets(&[(0, 1)], 1).expect("valid");
    e.take_actions();
    e.observe(ExecutorId::new(1), jvm_oom(), 2);
    assert_eq!(launches(&e.take_actions()), vec![(2, size(768, 576))]);
}

#[test]
fn other_failures_keep_the_size_and_count() {
    let mut e = engine(3, policy(1_500, 4_096));
    e.set_targets(&[(0, 1)], 1).expect("valid");
    e.take_actions();
    e.observe(ExecutorId::new(1), exit(Some(1), ExitReason::Error), 2);
    assert_eq!(launches(&e.take_actions()), vec![(2, size(512, 384))]);
    e.observe(ExecutorId::new(2), exit(None, ExitReason::Evicted), 3);
    assert_eq!(launches(&e.take_actions()), vec![(3, size(512, 384))]);
    assert!(resizes(&e).is_empty());
    assert_eq!(e.failures(), 1, "the error counts, the eviction does not");
}

#[test]
fn resized_failure_counts_only_when_the_bigger_executor_fails_the_same_way() {
    // Failure limit 2: without resizing, two OOM kills would fail the application.
    let mut e = engine(2, policy(1_500, 100_000));
    e.set_targets(&[(0, 1)], 1).expect("valid");
    e.take_actions();
    e.observe(ExecutorId::new(1), oom_killed(), 2);
    assert_eq!(e.failures(), 0);
    e.take_actions();
    // The bigger executor fails of heap: another cause, the first failure stays uncounted.
    e.observe(ExecutorId::new(2), jvm_oom(), 3);
    assert_eq!(e.failures(), 0);
    e.take_actions();
    // The executor with the bigger heap runs out of heap again: the heap failure counts now.
    e.observe(ExecutorId::new(3), jvm_oom(), 4);
    assert_eq!(e.failures(), 1);
    assert_eq!(e.phase(), AppPhase::Active);
    assert_eq!(resizes(&e).len(), 3);
}

#[test]
fn at_the_ceiling_failures_count_and_the_driver_is_told_once() {
    let mut e = engine(3, policy(1_500, 1_000));
    e.set_targets(&[(0, 1)], 1).expect("valid");
    e.take_actions();
    e.observe(ExecutorId::new(1), oom_killed(), 2);
    assert_eq!(launches(&e.take_actions()), vec![(2, size(512, 488))]);
    e.observe(ExecutorId::new(2), oom_killed(), 3);
    assert_eq!(launches(&e.take_actions()), vec![(3, size(512, 488))]);
    // The deferred failure and this one.
    assert_eq!(e.failures(), 2);
    e.observe(ExecutorId::new(3), oom_killed(), 4);
    assert_eq!(e.phase(), AppPhase::Failed);
    let ceiling: Vec<String> = warnings(&e)
        .into_iter()
        .filter(|w| w.contains("ceiling"))
        .collect();
    assert_eq!(ceiling.len(), 1, "{ceiling:?}");
    assert!(ceiling[0].contains("spark.stoker.resize.maxMemory"));
}

#[test]
fn executors_failing_together_grow_the_profile_once() {
    let mut e = engine(3, policy(1_500, 100_000));
    e.set_targets(&[(0, 3)], 1).expect("valid");
    e.take_actions();
    for n in 1..=3 {
        e.observe(ExecutorId::new(n), oom_killed(), 2);
    }
    assert_eq!(resizes(&e).len(), 1);
    assert_eq!(e.failures(), 0);
    let sizes: Vec<Option<ExecutorSize>> = launches(&e.take_actions())
        .into_iter()
        .map(|(_, s)| s)
        .collect();
    assert_eq!(sizes, vec![size(512, 832); 3]);
}

#[test]
fn without_a_policy_memory_failures_count_and_nothing_grows() {
    let mut e = engine(2, None);
    e.set_targets(&[(0, 1)], 1).expect("valid");
    e.take_actions();
    e.observe(ExecutorId::new(1), oom_killed(), 2);
    assert_eq!(launches(&e.take_actions()), vec![(2, size(512, 384))]);
    e.observe(ExecutorId::new(2), jvm_oom(), 3);
    assert_eq!(e.phase(), AppPhase::Failed);
    assert!(resizes(&e).is_empty());
}

#[test]
fn an_engine_without_sizes_launches_at_the_configured_size() {
    let mut e = Engine::new(EngineConfig::default(), [0], 0, 0);
    e.set_targets(&[(0, 1)], 1).expect("valid");
    assert_eq!(launches(&e.take_actions()), vec![(1, None)]);
}

// === properties ===

#[derive(Clone, Debug)]
enum Fate {
    OomKilled,
    JvmOom,
    Error,
    Evicted,
    Killed,
}

#[test]
fn a_grown_size_the_namespace_refuses_steps_back_and_is_not_tried_again() {
    let mut e = engine(3, policy(1_500, 4_096));
    e.set_targets(&[(0, 1)], 1).expect("valid");
    e.take_actions();
    e.observe(ExecutorId::new(1), oom_killed(), 2);
    assert_eq!(launches(&e.take_actions()), vec![(2, size(512, 832))]);
    // The API server refuses the 1344 MiB pod (a LimitRange's maximum of 1 GiB).
    let refusal = "refused by the Kubernetes API server: pods \"x\" is forbidden: maximum memory \
                   usage per Container is 1Gi, but limit is 1344Mi (Forbidden; pod ns/x)";
    e.observe(
        ExecutorId::new(2),
        Observation::Exited {
            code: None,
            reason: ExitReason::StartFailed,
            message: refusal.to_owned(),
        },
        3,
    );
    // Replaced at the size before the growth; the OOM kill counts now, the refusal does not.
    assert_eq!(launches(&e.take_actions()), vec![(3, size(512, 384))]);
    assert_eq!(e.failures(), 1);
    let told: Vec<String> = warnings(&e)
        .into_iter()
        .filter(|w| w.contains("goes back"))
        .collect();
    assert_eq!(
        told,
        vec![
            "profile 0 goes back to 512 MiB heap + 384 MiB overhead and grows no further: \
             executor 2 with 512 MiB heap + 832 MiB overhead could not be started (see its exit: \
             a LimitRange or an admission policy may cap executor memory in this namespace); the \
             out-of-memory failure that grew it counts now"
        ]
    );
    // Another OOM kill: no growth (it would be refused again), it counts, the driver is told.
    e.observe(ExecutorId::new(3), oom_killed(), 4);
    assert_eq!(launches(&e.take_actions()), vec![(4, size(512, 384))]);
    assert_eq!(e.failures(), 2);
    assert!(
        warnings(&e)
            .iter()
            .any(|w| w.contains("largest size this namespace started")),
        "{:?}",
        warnings(&e)
    );
}

fn fate() -> impl Strategy<Value = Fate> {
    prop_oneof![
        3 => Just(Fate::OomKilled),
        3 => Just(Fate::JvmOom),
        1 => Just(Fate::Error),
        1 => Just(Fate::Evicted),
        1 => Just(Fate::Killed),
    ]
}

fn total(s: ExecutorSize) -> u64 {
    s.heap_mib + s.overhead_mib
}

proptest! {
    /// Whatever executors die of, in whatever order: sizes only grow, never past the ceiling,
    /// only after a memory failure; the number of growths is bounded (no resizing loop); and
    /// memory failures count only once growth cannot answer them.
    #[test]
    fn sizes_grow_only_on_memory_failures_within_the_ceiling(
        factor in 1_050u32..3_000,
        ceiling in 896u64..20_000,
        target in 1u64..4,
        exits in proptest::collection::vec((any::<usize>(), fate()), 1..60),
    ) {
        let mut e = engine(u32::MAX, policy(factor, ceiling));
        e.set_targets(&[(0, target)], 1).expect("valid");
        let mut alive: Vec<(ExecutorId, ExecutorSize)> = Vec::new();
        let mut last = ExecutorSize { heap_mib: 512, overhead_mib: 384 };
        let mut now = 1;
        let mut plain_failures = 0u32;
        for (pick, fate) in exits {
            for (id, size) in launches(&e.take_actions()) {
                let size = size.expect("the engine knows the profile's size");
                prop_assert!(total(size) <= ceiling.max(896), "{size:?} above {ceiling}");
                prop_assert!(size.heap_mib >= last.heap_mib && size.overhead_mib >= last.overhead_mib,
                    "sizes never shrink: {last:?} then {size:?}");
                last = size;
                alive.push((ExecutorId::new(id), size));
            }
            if alive.is_empty() {
                break;
            }
            let (id, _) = alive.remove(pick % alive.len());
            now += 1;
            let before = resizes(&e).len();
            let observation = match fate {
                Fate::OomKilled => oom_killed(),
                Fate::JvmOom => jvm_oom(),
                Fate::Error => exit(Some(1), ExitReason::Error),
                Fate::Evicted => exit(None, ExitReason::Evicted),
                Fate::Killed => exit(Some(143), ExitReason::KilledByDriver),
            };
            if matches!(fate, Fate::Error) {
                plain_failures += 1;
            }
            e.observe(id, observation, now);
            let grew = resizes(&e).len() - before;
            if matches!(fate, Fate::Error | Fate::Evicted | Fate::Killed) {
                prop_assert_eq!(grew, 0, "grew on a non-memory exit");
            }
            prop_assert!(grew <= 1);
        }
        // Every growth multiplies the memory by the factor (the last one up to the ceiling).
        let f = f64::from(factor) / 1000.0;
        let steps = ((ceiling.max(896) as f64 / 896.0).ln() / f.ln()).floor() as usize + 1;
        let grown = resizes(&e).len();
        prop_assert!(grown <= steps, "{grown} growths, at most {steps} fit under {ceiling}");
        // Memory failures counted: at most one per growth that did not help, plus those at the
        // ceiling; never fewer than the plain errors.
        prop_assert!(e.failures() >= plain_failures);
    }

    /// A namespace that refuses executors above `limit` MiB (a LimitRange): whatever the
    /// exits, once a size was refused no executor of that size or bigger is launched again, so
    /// refused starts are bounded by the executors launched before the first refusal was seen.
    #[test]
    fn a_refused_size_is_never_launched_again(
        factor in 1_050u32..3_000,
        limit in 896u64..6_000,
        target in 1u64..4,
        exits in proptest::collection::vec((any::<usize>(), fate()), 1..60),
    ) {
        let mut e = engine(u32::MAX, policy(factor, 20_000));
        e.set_targets(&[(0, target)], 1).expect("valid");
        let mut alive: Vec<ExecutorId> = Vec::new();
        let mut refused_at: Option<u64> = None;
        let mut refusals = 0u64;
        let mut now = 1;
        for (pick, fate) in exits {
            // The backend refuses what is above the limit at once; the rest start.
            loop {
                let launched = launches(&e.take_actions());
                if launched.is_empty() {
                    break;
                }
                for (id, size) in launched {
                    let size = size.expect("the engine knows the profile's size");
                    if let Some(refused) = refused_at {
                        prop_assert!(total(size) < refused, "{size:?} launched after {refused} MiB was refused");
                    }
                    if total(size) > limit {
                        refusals += 1;
                        refused_at = Some(refused_at.map_or(total(size), |r| r.min(total(size))));
                        now += 1;
                        e.observe(ExecutorId::new(id), exit(None, ExitReason::StartFailed), now);
                    } else {
                        alive.push(ExecutorId::new(id));
                    }
                }
            }
            if alive.is_empty() {
                break;
            }
            let id = alive.remove(pick % alive.len());
            now += 1;
            let observation = match fate {
                Fate::OomKilled => oom_killed(),
                Fate::JvmOom => jvm_oom(),
                Fate::Error => exit(Some(1), ExitReason::Error),
                Fate::Evicted => exit(None, ExitReason::Evicted),
                Fate::Killed => exit(Some(143), ExitReason::KilledByDriver),
            };
            e.observe(id, observation, now);
        }
        // One growth is refused, once per executor launched at it together.
        prop_assert!(refusals <= target, "{refusals} refused starts for {target} executors");
    }

    /// One executor that keeps failing for the same memory cause: every failure counts except
    /// the one behind the last growth, which counts only if the grown size fails the same way
    /// too; so while the size can still grow, exactly one failure is pending.
    #[test]
    fn repeated_memory_failures_count_all_but_the_last_growth(
        factor in 1_100u32..3_000,
        ceiling in 896u64..20_000,
        heap in any::<bool>(),
        n in 1usize..30,
    ) {
        let mut e = engine(u32::MAX, policy(factor, ceiling));
        e.set_targets(&[(0, 1)], 1).expect("valid");
        let mut now = 1;
        let mut at_ceiling = 0;
        for _ in 0..n {
            let (id, _) = launches(&e.take_actions())[0];
            now += 1;
            let before = resizes(&e).len();
            let observation = if heap { jvm_oom() } else { oom_killed() };
            e.observe(ExecutorId::new(id), observation, now);
            if resizes(&e).len() == before {
                at_ceiling += 1;
            }
        }
        let grown = resizes(&e).len();
        prop_assert_eq!(grown + at_ceiling, n);
        let expected = if grown == 0 || at_ceiling > 0 { n } else { n - 1 };
        prop_assert_eq!(e.failures() as usize, expected);
    }

    /// With resizing, a profile whose executors keep running out of memory fails only after
    /// it reached the ceiling: the failure limit still ends a hopeless application.
    #[test]
    fn a_hopeless_profile_still_reaches_the_failure_limit(
        factor in 1_100u32..3_000,
        ceiling in 896u64..10_000,
        heap in any::<bool>(),
    ) {
        let mut e = engine(3, policy(factor, ceiling));
        e.set_targets(&[(0, 1)], 1).expect("valid");
        let mut now = 1;
        for _ in 0..200 {
            let Some((id, _)) = launches(&e.take_actions()).first().copied() else {
                break;
            };
            now += 1;
            let observation = if heap { jvm_oom() } else { oom_killed() };
            e.observe(ExecutorId::new(id), observation, now);
        }
        prop_assert_eq!(e.phase(), AppPhase::Failed);
        let last = e.sizing().size(0).expect("known profile");
        prop_assert!(total(last) <= ceiling.max(896));
    }
}
