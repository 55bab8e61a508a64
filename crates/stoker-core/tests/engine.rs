//! Unit tests of the allocation engine's rules.

use stoker_core::{
    Action, AppPhase, Engine, EngineConfig, EngineError, Event, EventKind, ExecutorId,
    ExecutorPhase, ExitReason, Observation,
};

fn engine(config: EngineConfig) -> Engine {
    Engine::new(config, [0, 1], 0, 0)
}

fn id(n: u64) -> ExecutorId {
    ExecutorId::new(n)
}

fn launches(actions: &[Action]) -> Vec<u64> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Launch { id, .. } => Some(id.get()),
            Action::Terminate { .. } => None,
        })
        .collect()
}

fn terminates(actions: &[Action]) -> Vec<u64> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Terminate { id, .. } => Some(id.get()),
            Action::Launch { .. } => None,
        })
        .collect()
}

fn exits(events: &[Event]) -> Vec<(u64, ExitReason, bool)> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Executor(ev) if ev.phase == ExecutorPhase::Exited => {
                let exit = ev.exit.as_ref()?;
                Some((ev.id.get(), exit.reason, exit.caused_by_app))
            }
            _ => None,
        })
        .collect()
}

fn exited(code: i32, reason: ExitReason) -> Observation {
    Observation::Exited {
        code: Some(code),
        reason,
        message: String::new(),
    }
}

fn running() -> Observation {
    Observation::Running {
        host: "127.0.0.1".into(),
        backend_name: "pid:1".into(),
    }
}

#[test]
fn target_creates_executors_with_increasing_ids() {
    let mut e = engine(EngineConfig::default());
    e.set_targets(&[(0, 3)], 1).expect("valid target");
    assert_eq!(launches(&e.take_actions()), vec![1, 2, 3]);
    let requested: Vec<u64> = e
        .events_after(0)
        .filter_map(|ev| match &ev.kind {
            EventKind::Executor(x) if x.phase == ExecutorPhase::Requested => Some(x.id.get()),
            _ => None,
        })
        .collect();
    assert_eq!(requested, vec![1, 2, 3]);
}

#[test]
fn ids_start_above_the_drivers_last_id() {
    let mut e = Engine::new(EngineConfig::default(), [0], 41, 0);
    e.set_targets(&[(0, 2)], 1).expect("valid target");
    assert_eq!(launches(&e.take_actions()), vec![42, 43]);
}

#[test]
fn unknown_profile_is_rejected_and_changes_nothing() {
    let mut e = engine(EngineConfig::default());
    let err = e
        .set_targets(&[(0, 2), (7, 1)], 1)
        .expect_err("profile 7 is unknown");
    assert_eq!(err, EngineError::UnknownProfile(7));
    assert!(e.take_actions().is_empty());
    assert!(e.targets().is_empty());
    assert_eq!(e.last_seq(), 0);
}

#[test]
fn absurd_target_is_rejected() {
    let config = EngineConfig {
        max_executors_per_profile: 10,
        ..EngineConfig::default()
    };
    let mut e = engine(config);
    let err = e.set_targets(&[(0, 11)], 1).expect_err("over the limit");
    assert!(matches!(err, EngineError::TargetTooLarge { total: 11, .. }));
    assert!(e.take_actions().is_empty());
}

#[test]
fn failed_executor_is_replaced_and_reported_as_caused_by_app() {
    let mut e = engine(EngineConfig::default());
    e.set_targets(&[(0, 2)], 1).expect("valid");
    e.take_actions();
    e.observe(id(1), running(), 2);
    e.observe(id(1), exited(1, ExitReason::Error), 3);
    assert_eq!(launches(&e.take_actions()), vec![3]);
    let events: Vec<Event> = e.events_after(0).cloned().collect();
    assert_eq!(exits(&events), vec![(1, ExitReason::Error, true)]);
    assert_eq!(e.failures(), 1);
}

#[test]
fn duplicate_exit_is_reported_once() {
    let mut e = engine(EngineConfig::default());
    e.set_targets(&[(0, 1)], 1).expect("valid");
    e.observe(id(1), exited(137, ExitReason::OomKilled), 2);
    assert!(!e.observe(id(1), exited(137, ExitReason::OomKilled), 3));
    let events: Vec<Event> = e.events_after(0).cloned().collect();
    assert_eq!(exits(&events), vec![(1, ExitReason::OomKilled, true)]);
}

#[test]
fn failure_limit_fails_the_application_once() {
    let config = EngineConfig {
        max_failures: 2,
        ..EngineConfig::default()
    };
    let mut e = engine(config);
    e.set_targets(&[(0, 1)], 1).expect("valid");
    e.observe(id(1), exited(1, ExitReason::Error), 2);
    e.observe(id(2), exited(1, ExitReason::Error), 3);
    assert_eq!(e.phase(), AppPhase::Failed);
    let failed: Vec<String> = e
        .events_after(0)
        .filter_map(|ev| match &ev.kind {
            EventKind::AppFailed { message } => Some(message.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(failed.len(), 1);
    assert!(failed[0].contains("max number of executor failures (2) reached"));
    // No replacement for the second failure.
    assert_eq!(launches(&e.take_actions()), vec![1, 2]);
}

#[test]
fn failures_outside_the_window_do_not_count() {
    let config = EngineConfig {
        max_failures: 2,
        failure_window: Some(1_000),
        ..EngineConfig::default()
    };
    let mut e = engine(config);
    e.set_targets(&[(0, 1)], 1).expect("valid");
    e.heartbeat(0, 100);
    e.observe(id(1), exited(1, ExitReason::Error), 100);
    e.heartbeat(0, 2_000);
    e.observe(id(2), exited(1, ExitReason::Error), 2_000);
    assert_eq!(e.phase(), AppPhase::Active);
    assert_eq!(e.failures(), 1);
    assert_eq!(e.failures_total(), 2);
}

#[test]
fn infrastructure_losses_do_not_count_as_failures() {
    let config = EngineConfig {
        max_failures: 1,
        ..EngineConfig::default()
    };
    let mut e = engine(config);
    e.set_targets(&[(0, 1)], 1).expect("valid");
    e.observe(id(1), exited(0, ExitReason::Evicted), 2);
    e.observe(id(2), exited(0, ExitReason::NodeLost), 3);
    assert_eq!(e.phase(), AppPhase::Active);
    let events: Vec<Event> = e.events_after(0).cloned().collect();
    assert_eq!(
        exits(&events),
        vec![
            (1, ExitReason::Evicted, false),
            (2, ExitReason::NodeLost, false)
        ]
    );
}

#[test]
fn lowering_the_target_removes_only_unstarted_executors_newest_first() {
    let mut e = engine(EngineConfig::default());
    e.set_targets(&[(0, 4)], 1).expect("valid");
    e.take_actions();
    e.observe(id(1), running(), 2);
    e.observe(id(2), running(), 2);
    e.set_targets(&[(0, 1)], 3).expect("valid");
    // 4 and 3 are not running: removed. 1 and 2 run: the driver picks which to kill.
    assert_eq!(terminates(&e.take_actions()), vec![4, 3]);
}

#[test]
fn driver_kill_is_not_replaced_when_spark_lowered_the_target() {
    let mut e = engine(EngineConfig::default());
    e.set_targets(&[(0, 2)], 1).expect("valid");
    e.take_actions();
    e.observe(id(1), running(), 2);
    e.observe(id(2), running(), 2);
    e.set_targets(&[(0, 1)], 3).expect("valid");
    let killed = e.kill(&[id(2)], false, 3).expect("active");
    assert_eq!(killed, vec![id(2)]);
    assert_eq!(terminates(&e.take_actions()), vec![2]);
    e.observe(id(2), exited(143, ExitReason::Signaled), 4);
    assert!(launches(&e.take_actions()).is_empty());
    let events: Vec<Event> = e.events_after(0).cloned().collect();
    assert_eq!(exits(&events), vec![(2, ExitReason::KilledByDriver, false)]);
    assert_eq!(e.failures(), 0);
}

#[test]
fn kill_with_adjust_target_lowers_the_total() {
    let mut e = engine(EngineConfig::default());
    e.set_targets(&[(0, 2)], 1).expect("valid");
    e.take_actions();
    e.kill(&[id(1)], true, 2).expect("active");
    assert_eq!(e.targets().get(&0), Some(&1));
    e.observe(id(1), exited(143, ExitReason::Signaled), 3);
    assert!(launches(&e.take_actions()).is_empty());
}

#[test]
fn kill_without_adjust_replaces() {
    let mut e = engine(EngineConfig::default());
    e.set_targets(&[(0, 1)], 1).expect("valid");
    e.take_actions();
    e.kill(&[id(1)], false, 2).expect("active");
    assert_eq!(launches(&e.take_actions()), vec![2]);
}

#[test]
fn decommissioned_executor_is_reported_as_such_and_removed_at_its_deadline() {
    let config = EngineConfig {
        decommission_timeout: 100,
        ..EngineConfig::default()
    };
    let mut e = engine(config);
    e.set_targets(&[(0, 1)], 1).expect("valid");
    e.take_actions();
    e.observe(id(1), running(), 2);
    e.decommission(&[id(1)], true, 3).expect("active");
    assert!(e.take_actions().is_empty());
    e.tick(103);
    assert_eq!(terminates(&e.take_actions()), vec![1]);
    e.observe(id(1), exited(0, ExitReason::Completed), 104);
    let events: Vec<Event> = e.events_after(0).cloned().collect();
    assert_eq!(exits(&events), vec![(1, ExitReason::Decommissioned, false)]);
}

#[test]
fn executor_that_never_starts_times_out_and_counts_as_failure() {
    let config = EngineConfig {
        start_timeout: 50,
        ..EngineConfig::default()
    };
    let mut e = engine(config);
    e.set_targets(&[(0, 1)], 0).expect("valid");
    e.take_actions();
    e.heartbeat(0, 49);
    e.tick(49);
    assert!(e.take_actions().is_empty());
    e.tick(50);
    // The stuck executor is removed and replaced at once.
    let actions = e.take_actions();
    assert_eq!(terminates(&actions), vec![1]);
    assert_eq!(launches(&actions), vec![2]);
    e.observe(id(1), exited(0, ExitReason::DeletedExternally), 51);
    let events: Vec<Event> = e.events_after(0).cloned().collect();
    assert_eq!(exits(&events), vec![(1, ExitReason::StartTimeout, false)]);
    assert_eq!(e.failures(), 1);
}

#[test]
fn lease_expiry_removes_every_executor_and_finishes() {
    let config = EngineConfig {
        lease_ttl: 100,
        ..EngineConfig::default()
    };
    let mut e = engine(config);
    e.set_targets(&[(0, 2), (1, 1)], 0).expect("valid");
    e.take_actions();
    e.observe(id(1), running(), 10);
    e.tick(99);
    assert!(e.take_actions().is_empty());
    e.tick(100);
    assert_eq!(e.phase(), AppPhase::Ending);
    let mut stopped = terminates(&e.take_actions());
    stopped.sort_unstable();
    assert_eq!(stopped, vec![1, 2, 3]);
    assert!(!e.is_finished());
    for n in 1..=3 {
        e.observe(id(n), exited(143, ExitReason::Signaled), 101);
    }
    assert!(e.is_finished());
    assert!(e.set_targets(&[(0, 1)], 102).is_err());
}

#[test]
fn heartbeat_keeps_the_lease() {
    let config = EngineConfig {
        lease_ttl: 100,
        ..EngineConfig::default()
    };
    let mut e = engine(config);
    e.heartbeat(0, 90);
    e.tick(150);
    assert_eq!(e.phase(), AppPhase::Active);
    assert_eq!(e.next_deadline(), Some(190));
}

#[test]
fn acked_events_are_forgotten_and_resume_is_exact() {
    let mut e = engine(EngineConfig::default());
    e.set_targets(&[(0, 3)], 1).expect("valid");
    assert_eq!(e.last_seq(), 3);
    let after_one: Vec<u64> = e.events_after(1).map(|ev| ev.seq).collect();
    assert_eq!(after_one, vec![2, 3]);
    e.ack(2);
    let all: Vec<u64> = e.events_after(0).map(|ev| ev.seq).collect();
    assert_eq!(all, vec![3]);
    assert_eq!(e.events_after(3).count(), 0);
}

#[test]
fn known_executors_of_a_restarted_stoker_are_reported_lost() {
    let mut e = Engine::new(EngineConfig::default(), [0], 5, 0);
    e.report_unknown_as_lost(&[id(4), id(5)], 0);
    let events: Vec<Event> = e.events_after(0).cloned().collect();
    assert_eq!(
        exits(&events),
        vec![(4, ExitReason::Lost, false), (5, ExitReason::Lost, false)]
    );
    e.set_targets(&[(0, 1)], 1).expect("valid");
    assert_eq!(launches(&e.take_actions()), vec![6]);
}

#[test]
fn adopted_executors_count_toward_the_target() {
    let mut e = Engine::new(EngineConfig::default(), [0], 0, 0);
    assert!(e.adopt(id(7), 0, Some("10.0.0.1".into()), "pod-7".into(), 0));
    e.set_targets(&[(0, 2)], 1).expect("valid");
    assert_eq!(launches(&e.take_actions()), vec![8]);
}

#[test]
fn executor_id_parsing_rejects_malformed_ids() {
    for bad in [
        "",
        "0",
        "-1",
        "1.5",
        "abc",
        "99999999999",
        "2147483648",
        " 1",
    ] {
        assert!(
            bad.parse::<ExecutorId>().is_err(),
            "{bad:?} should be rejected"
        );
    }
    assert_eq!("2147483647".parse::<ExecutorId>(), Ok(id(2_147_483_647)));
}

#[test]
fn waiting_executor_warns_the_driver_and_stays_requested() {
    let mut e = engine(EngineConfig::default());
    e.set_targets(&[(0, 1)], 0).expect("target");
    assert_eq!(launches(&e.take_actions()), vec![1]);
    let before = e.events_after(0).count();
    let message = "exceeded quota: pods=1".to_string();
    assert!(e.observe(id(1), Observation::Waiting { message }, 10));
    let events: Vec<Event> = e.events_after(0).cloned().collect();
    assert_eq!(events.len(), before + 1);
    assert!(matches!(
        &events[events.len() - 1].kind,
        EventKind::AppWarning { message } if message.contains("executor 1 is waiting") && message.contains("quota")
    ));
    // Nothing is created twice, nothing exits, nothing counts as a failure.
    assert!(e.take_actions().is_empty());
    assert_eq!(e.phase(), AppPhase::Active);
    // Once it runs, a late warning is not repeated.
    e.observe(id(1), running(), 20);
    let n = e.events_after(0).count();
    e.observe(
        id(1),
        Observation::Waiting {
            message: "late".into(),
        },
        30,
    );
    assert_eq!(e.events_after(0).count(), n);
}
