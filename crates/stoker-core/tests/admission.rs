//! The engine under admission control: effective target = min(requested, admitted).

use std::collections::BTreeMap;

use stoker_core::fairshare::{
    allocate, AppDemand, ProfileDemand, Queue, QueueConfig, QueueName, Resources, Shape,
};
use stoker_core::{Action, AppId, Engine, EngineConfig, Event, EventKind, ExecutorId, Observation};

fn engine() -> Engine {
    Engine::new(EngineConfig::default(), [0, 1], 0, 0)
}

fn launched(actions: &[Action]) -> usize {
    actions
        .iter()
        .filter(|a| matches!(a, Action::Launch { .. }))
        .count()
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

fn warnings(events: Vec<&Event>) -> Vec<String> {
    events
        .into_iter()
        .filter_map(|e| match &e.kind {
            EventKind::AppWarning { message } => Some(message.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn without_admission_the_requested_total_is_the_target() {
    let mut engine = engine();
    engine.set_targets(&[(0, 40)], 0).expect("valid target");
    assert_eq!(launched(&engine.take_actions()), 40);
    assert_eq!(engine.effective_target(0), 40);
    assert_eq!(engine.admitted(), None);
}

#[test]
fn pods_are_created_only_up_to_the_admitted_count() {
    let mut engine = engine();
    let message = "admitted 12 of 40 executors (queue etl, fair share 12)".to_owned();
    engine.set_admitted(Some(BTreeMap::from([(0, 12)])), Some(message.clone()), 0);
    engine.set_targets(&[(0, 40)], 1).expect("valid target");
    assert_eq!(launched(&engine.take_actions()), 12);
    assert_eq!(engine.targets()[&0], 40, "the request is kept");
    assert_eq!(engine.effective_target(0), 12);

    // The same admission again: nothing new for the driver.
    engine.set_admitted(Some(BTreeMap::from([(0, 12)])), Some(message.clone()), 2);
    assert_eq!(warnings(engine.events_after(0).collect()), [message]);

    // More admitted than requested: the request still bounds.
    engine.set_admitted(Some(BTreeMap::from([(0, 100)])), None, 3);
    assert_eq!(launched(&engine.take_actions()), 28);
    assert_eq!(
        warnings(engine.events_after(0).collect())
            .last()
            .map(String::as_str),
        Some("admitted every executor requested")
    );
}

#[test]
fn a_lower_admission_removes_executors_not_yet_running_and_keeps_running_ones() {
    let mut engine = engine();
    engine.set_targets(&[(0, 4)], 0).expect("valid target");
    assert_eq!(launched(&engine.take_actions()), 4);
    for n in 1..=2 {
        let running = Observation::Running {
            host: "10.0.0.1".into(),
            backend_name: format!("pod-{n}"),
        };
        engine.observe(ExecutorId::new(n), running, 1);
    }
    engine.set_admitted(
        Some(BTreeMap::from([(0, 1)])),
        Some("admitted 1 of 4".into()),
        2,
    );
    // 3 and 4 are pending: removed, newest first. 1 and 2 run: the driver gives one back.
    assert_eq!(terminated(&engine.take_actions()), [4, 3]);
    assert_eq!(engine.counted()[&0], 2);
}

#[test]
fn a_profile_without_an_admitted_count_gets_nothing() {
    let mut engine = engine();
    engine.set_admitted(Some(BTreeMap::from([(0, 5)])), None, 0);
    engine
        .set_targets(&[(0, 2), (1, 3)], 1)
        .expect("valid targets");
    assert_eq!(launched(&engine.take_actions()), 2);
    assert_eq!(engine.effective_target(1), 0);
}

/// The server's loop in small: requests from the engines, an allocation, admissions back.
#[test]
fn engines_fed_by_the_allocation_stay_within_the_capacity() {
    let default = QueueName::parse("default").expect("valid name");
    let config = QueueConfig::new(
        Resources::executors(60),
        vec![Queue::new(default.clone())],
        default,
        vec![],
    )
    .expect("valid configuration");
    let mut engines: BTreeMap<AppId, Engine> = BTreeMap::new();
    let mut created: BTreeMap<AppId, usize> = BTreeMap::new();
    for (i, (name, total)) in [("a", 200u64), ("b", 100), ("c", 100)]
        .into_iter()
        .enumerate()
    {
        let id = AppId::parse(name).expect("valid id");
        let mut engine = engine();
        let now = u64::try_from(i).unwrap_or(0) * 10;
        // Admitted nothing until the allocation has seen it.
        engine.set_admitted(Some(BTreeMap::new()), None, now);
        engine
            .set_targets(&[(0, total)], now)
            .expect("valid target");
        engines.insert(id, engine);

        let demands: BTreeMap<AppId, AppDemand> = engines
            .iter()
            .map(|(id, engine)| {
                let counted = engine.counted();
                let profiles = engine
                    .targets()
                    .iter()
                    .map(|(&profile, &requested)| {
                        let demand = ProfileDemand {
                            shape: Shape {
                                cores: 1,
                                memory_mib: 1024,
                            },
                            requested,
                            running: counted.get(&profile).copied().unwrap_or(0),
                        };
                        (profile, demand)
                    })
                    .collect();
                let demand = AppDemand {
                    queue: None,
                    min_executors: 0,
                    profiles,
                };
                (id.clone(), demand)
            })
            .collect();
        let allocation = allocate(Some(&config), &demands);
        for (id, engine) in &mut engines {
            let app = &allocation.apps[id];
            let admitted = app.profiles.iter().map(|(&p, a)| (p, a.admitted)).collect();
            engine.set_admitted(Some(admitted), app.message(), now + 1);
            *created.entry(id.clone()).or_default() += launched(&engine.take_actions());
        }
        let effective: u32 = engines.values().map(|e| e.effective_target(0)).sum();
        assert_eq!(effective, 60, "after {} applications", i + 1);
    }
    // Nothing ran, so the lowered admissions removed pending executors: 20 each remain.
    for engine in engines.values() {
        assert_eq!(engine.counted()[&0], 20);
    }
    let last = engines
        .get(&AppId::parse("a").expect("valid id"))
        .map(|e| warnings(e.events_after(0).collect()));
    assert_eq!(
        last.and_then(|w| w.last().cloned()).as_deref(),
        Some("admitted 20 of 200 executors (queue default, fair share 20)")
    );
}
