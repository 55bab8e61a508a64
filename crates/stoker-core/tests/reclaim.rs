//! Spark-aware reclaim in the engine: a driver running more executors than it is admitted is
//! asked once per change to give the difference back, the count shrinks as it does, and past
//! the deadline the newest executors still over the share are removed. Time is the engine's
//! own clock, passed in.

use std::collections::BTreeMap;

use stoker_core::{
    Action, Engine, EngineConfig, Event, EventKind, ExecutorId, ExitReason, Observation,
    ReclaimRequest,
};

const TIMEOUT: u64 = 60_000;
const REASON: &str = "over its fair share in queue etl";

/// An application that asked for `n` executors, all running (ids 1..=n), admitted all of them.
fn running(n: u64) -> Engine {
    let config = EngineConfig {
        reclaim_timeout: TIMEOUT,
        lease_ttl: 10_000_000,
        ..EngineConfig::default()
    };
    let mut engine = Engine::new(config, [0], 0, 0);
    engine.set_admitted(Some(BTreeMap::from([(0, 100)])), None, 0);
    engine.set_targets(&[(0, n)], 0).expect("valid target");
    for id in 1..=n {
        let observation = Observation::Running {
            host: "10.0.0.1".into(),
            backend_name: format!("pod-{id}"),
        };
        assert!(engine.observe(ExecutorId::new(id), observation, 1));
    }
    engine.take_actions();
    engine
}

/// An allocation that admits `n` and saw the engine as it is now (its over-share count is
/// `ProfileAllocation::reclaim`: running executors still asked for, minus admitted).
fn admit(engine: &mut Engine, n: u32, now: u64) {
    let running = engine.counted().get(&0).copied().unwrap_or(0);
    let requested = engine.targets().get(&0).copied().unwrap_or(0);
    let seen = running.min(requested).saturating_sub(n);
    engine.set_reclaim_basis(REASON.into(), BTreeMap::from([(0, seen)]));
    engine.set_admitted(
        Some(BTreeMap::from([(0, n)])),
        Some(format!("admitted {n}")),
        now,
    );
}

fn reclaim_events(events: Vec<&Event>) -> Vec<ReclaimRequest> {
    events
        .into_iter()
        .filter_map(|e| match &e.kind {
            EventKind::Reclaim(r) => Some(r.clone()),
            _ => None,
        })
        .collect()
}

fn terminated(actions: &[Action]) -> Vec<u64> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Terminate { id, .. } => Some(id.get()),
            Action::Launch { .. } => None,
        })
        .collect()
}

#[test]
fn the_driver_is_asked_once_per_change_of_the_over_share_count() {
    let mut engine = running(4);
    admit(&mut engine, 2, 1_000);
    let asked = reclaim_events(engine.events_after(0).collect());
    assert_eq!(
        asked,
        [ReclaimRequest {
            profile: 0,
            count: 2,
            deadline: 1_000 + TIMEOUT,
            reason: REASON.into(),
        }]
    );
    assert_eq!(
        asked[0].message(1_000),
        "give back 2 executors of resource profile 0 within 60 s (over its fair share in queue etl)"
    );
    assert!(
        terminated(&engine.take_actions()).is_empty(),
        "running executors stay"
    );

    // The same allocation again (the allocator runs on every change of anyone): not again.
    let seen = engine.last_seq();
    admit(&mut engine, 2, 2_000);
    engine.tick(3_000);
    assert!(reclaim_events(engine.events_after(seen).collect()).is_empty());

    // A lower admission: asked again, for the whole count, with a new deadline.
    admit(&mut engine, 1, 4_000);
    let again = reclaim_events(engine.events_after(seen).collect());
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].count, again[0].deadline), (3, 4_000 + TIMEOUT));
    assert_eq!(engine.next_deadline(), Some(4_000 + TIMEOUT));
}

#[test]
fn the_count_shrinks_as_the_driver_gives_back_and_nothing_is_removed() {
    let mut engine = running(4);
    admit(&mut engine, 2, 1_000);
    let seen = engine.last_seq();

    // The driver decommissions one (the idle one it chose), then another.
    engine
        .decommission(&[ExecutorId::new(2)], false, 2_000)
        .expect("active");
    assert_eq!(
        engine.reclaims().collect::<Vec<_>>(),
        [(0, 1, 1_000 + TIMEOUT)]
    );
    engine
        .decommission(&[ExecutorId::new(3)], false, 3_000)
        .expect("active");
    assert_eq!(engine.reclaims().count(), 0, "given back in full");
    assert!(
        reclaim_events(engine.events_after(seen).collect()).is_empty(),
        "no new request as the count shrinks"
    );

    // The deadline passes: nothing over the share, nothing removed but the decommissioned ones
    // at their own deadline (later), and no replacement (admitted 2, 2 count).
    engine.tick(1_000 + TIMEOUT);
    assert!(terminated(&engine.take_actions()).is_empty());
    assert_eq!(engine.counted()[&0], 2);
    assert_eq!(engine.over_share(0), 0);
}

#[test]
fn past_the_deadline_the_newest_executors_over_the_share_are_removed() {
    let mut engine = running(5);
    admit(&mut engine, 2, 1_000);
    // The driver gives back one of the three, and never the others.
    engine
        .decommission(&[ExecutorId::new(1)], false, 2_000)
        .expect("active");
    engine.take_actions();

    engine.tick(1_000 + TIMEOUT - 1);
    assert!(terminated(&engine.take_actions()).is_empty(), "not yet");
    let seen = engine.last_seq();
    engine.tick(1_000 + TIMEOUT);
    assert_eq!(terminated(&engine.take_actions()), [5, 4], "newest first");
    let warning = engine
        .events_after(seen)
        .find_map(|e| match &e.kind {
            EventKind::AppWarning { message } => Some(message.clone()),
            _ => None,
        })
        .expect("the driver is told");
    assert_eq!(
        warning,
        "removing executors 5, 4 of resource profile 0: not given back by the reclaim deadline \
         (over its fair share in queue etl)"
    );
    assert_eq!(engine.reclaims().count(), 0);

    // Their exit says why, and they are not replaced: 2 running, 2 admitted.
    let exited = Observation::Exited {
        code: Some(143),
        reason: ExitReason::Signaled,
        message: String::new(),
    };
    engine.observe(ExecutorId::new(5), exited, 1_000 + TIMEOUT + 10);
    let reason = engine.events_after(seen).find_map(|e| match &e.kind {
        EventKind::Executor(ev) => ev.exit.as_ref().map(|x| (x.reason, x.caused_by_app)),
        _ => None,
    });
    assert_eq!(reason, Some((ExitReason::Reclaimed, false)));
    assert_eq!(engine.failures(), 0, "a reclaim is not a failure");
    assert!(engine.take_actions().is_empty());
}

#[test]
fn nothing_is_reclaimed_while_admitted_covers_what_runs() {
    // Admitted 4 of 8 requested, 4 running: no reclaim, 4 more are simply not created.
    let mut engine = running(4);
    admit(&mut engine, 4, 1_000);
    engine.set_targets(&[(0, 8)], 1_000).expect("valid target");
    // Running above its own request (the driver lowered it and releases idle ones itself):
    // not counted either.
    engine.set_targets(&[(0, 2)], 2_000).expect("valid target");
    admit(&mut engine, 2, 2_000);
    assert!(reclaim_events(engine.events_after(0).collect()).is_empty());
    engine.tick(2_000 + TIMEOUT);
    assert!(terminated(&engine.take_actions()).is_empty());
}

#[test]
fn a_request_raised_after_the_allocation_is_not_read_as_an_over_share() {
    // A dynamic-allocation driver between stages: it asked for 1 (4 still run, idle), the
    // allocation admitted that 1; then the next stage starts and it asks for 4 again before the
    // allocation has seen it. The stale admission of 1 is not a reason to reclaim 3.
    let mut engine = running(4);
    engine.set_targets(&[(0, 1)], 1_000).expect("valid target");
    let basis = BTreeMap::from([(0, 0)]);
    engine.set_reclaim_basis(REASON.into(), basis.clone());
    engine.set_admitted(Some(BTreeMap::from([(0, 1)])), None, 1_000);
    engine.set_targets(&[(0, 4)], 1_010).expect("valid target");
    engine.set_reclaim_basis(REASON.into(), basis);
    engine.set_admitted(Some(BTreeMap::from([(0, 1)])), None, 1_020);
    assert!(reclaim_events(engine.events_after(0).collect()).is_empty());
    assert_eq!(engine.reclaims().count(), 0);
    // The next allocation sees the request: everything fits, nothing to reclaim.
    admit(&mut engine, 4, 1_200);
    assert!(reclaim_events(engine.events_after(0).collect()).is_empty());
}

#[test]
fn nothing_is_reclaimed_before_the_first_allocation() {
    // A re-attaching driver's executors while the fair share has not allocated yet (the hold
    // admits nothing): it must not be told to give everything back.
    let config = EngineConfig::default();
    let mut engine = Engine::new(config, [0], 0, 0);
    engine.set_targets(&[(0, 3)], 0).expect("valid target");
    for id in 1..=3 {
        let observation = Observation::Running {
            host: "h".into(),
            backend_name: format!("pod-{id}"),
        };
        engine.observe(ExecutorId::new(id), observation, 1);
    }
    engine.set_admitted(Some(BTreeMap::new()), None, 2);
    assert!(reclaim_events(engine.events_after(0).collect()).is_empty());
    assert_eq!(engine.next_deadline(), Some(engine.lease_deadline()));
}
