//! The pod index driven with hand-built pods: the two races of issue 12 first, then every
//! transition, then random interleavings against a simulated API server.

use super::*;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::json;

const DIGEST: &str = "d1";

#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    Pending,
    Unschedulable,
    Running,
    Failed(i32),
}

fn app(name: &str) -> AppId {
    AppId::parse(name).expect("app id")
}

fn key(a: &str, id: u64) -> Key {
    (app(a), ExecutorId::new(id))
}

fn name_of(k: &Key) -> String {
    crate::pod::pod_name(&k.0, k.1)
}

/// A pod of this stoker as the API server shows it.
fn pod_with(k: &Key, uid: &str, phase: &Phase, deleting: bool, keep: bool) -> Pod {
    let container = |state: serde_json::Value| {
        json!([{"name": crate::pod::DEFAULT_CONTAINER, "image": "apache/spark:4.2.0", "imageID": "",
            "ready": true, "restartCount": 0, "state": state}])
    };
    let status = match phase {
        Phase::Pending => json!({"phase": "Pending"}),
        Phase::Unschedulable => json!({"phase": "Pending", "conditions": [{"type": "PodScheduled",
            "status": "False", "reason": "Unschedulable", "message": "0/1 nodes are available"}]}),
        Phase::Running => json!({"phase": "Running", "podIP": "10.0.0.7",
            "containerStatuses": container(json!({"running": {}}))}),
        Phase::Failed(code) => json!({"phase": "Failed",
            "containerStatuses": container(json!({"terminated": {"exitCode": code, "reason": "Error"}}))}),
    };
    let mut annotations = json!({
        crate::pod::ANNOTATION_APP_ID: k.0.as_str(),
        crate::pod::ANNOTATION_TOKEN: DIGEST,
    });
    if keep {
        annotations[crate::pod::ANNOTATION_KEEP] = json!("true");
    }
    let mut p: Pod = serde_json::from_value(json!({
        "metadata": {
            "name": name_of(k),
            "namespace": "spark",
            "uid": uid,
            "labels": {crate::pod::LABEL_EXEC_ID: k.1.to_string(), crate::pod::LABEL_PROFILE: "0"},
            "annotations": annotations,
        },
        "spec": {"containers": [{"name": crate::pod::DEFAULT_CONTAINER}]},
        "status": status,
    }))
    .expect("pod");
    if deleting {
        p.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
    }
    p
}

fn pod(k: &Key, phase: Phase) -> Pod {
    pod_with(k, &format!("uid-{}", k.1), &phase, false, false)
}

fn launched(index: &mut PodIndex, k: &Key) {
    index
        .launch(k.clone(), "spark".into(), name_of(k), None)
        .expect("launch");
}

fn deletes(effects: &[Effect]) -> Vec<(String, DeleteWhy)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Delete { pod, why, .. } => Some((pod.name.clone(), *why)),
            Effect::Report { .. } => None,
        })
        .collect()
}

fn reports(effects: &[Effect]) -> Vec<Observation> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Report { observation, .. } => Some(observation.clone()),
            Effect::Delete { .. } => None,
        })
        .collect()
}

fn exit_reason(effects: &[Effect]) -> Option<ExitReason> {
    reports(effects).into_iter().find_map(|o| match o {
        Observation::Exited { reason, .. } => Some(reason),
        _ => None,
    })
}

// === the two races of issue 12 ===

/// Window 1: the old backend took an application's pods out of `unclaimed` and inserted them
/// into `records` one at a time under another lock; a watch event in between found the pod in
/// neither map and deleted it as an orphan. Here the claim is one step, and every adopted pod's
/// next event finds its record.
#[test]
fn watch_events_right_after_a_claim_never_delete_adopted_pods() {
    let mut index = PodIndex::new();
    let keys: Vec<Key> = (1..=200).map(|i| key("app-a", i)).collect();
    let listed: Vec<Pod> = keys.iter().map(|k| pod(k, Phase::Running)).collect();
    assert!(index.adopt_listed(&listed).is_empty());
    assert_eq!(index.unclaimed(), 200);

    let recovered = index.claim(&app("app-a"), DIGEST);
    assert_eq!(recovered.len(), 200);
    assert_eq!(index.unclaimed(), 0);
    for k in &keys {
        let effects = index.apply(&pod(k, Phase::Running));
        assert!(
            effects.is_empty(),
            "executor {}: {effects:?} (an adopted, running pod needs nothing)",
            k.1
        );
    }
    assert_eq!(index.tracked(), 200);
}

/// Window 2: a re-list snapshot taken while a create was in flight does not contain the pod;
/// the create returns before `InitDone`. The old backend reported the executor as deleted and
/// then deleted its live pod as an orphan on the next event.
#[test]
fn a_create_that_returns_during_a_relist_is_not_reported_vanished() {
    let mut index = PodIndex::new();
    let k = key("app-a", 1);
    launched(&mut index, &k);
    assert_eq!(index.create_step(&k), CreateStep::Send);

    index.relist_started();
    // The LIST runs; its snapshot predates the pod. The create returns meanwhile.
    let effects = index.created(&k, Some("uid-1".into()));
    assert_eq!(
        reports(&effects),
        vec![Observation::Accepted {
            backend_name: name_of(&k)
        }]
    );
    assert!(
        index.relist_done().is_empty(),
        "nothing the snapshot can prove is gone"
    );

    // The watch resumes after the list: the pod's events arrive and nothing is deleted.
    let effects = index.apply(&pod(&k, Phase::Running));
    assert!(deletes(&effects).is_empty(), "{effects:?}");
    assert_eq!(
        reports(&effects),
        vec![Observation::Running {
            host: "10.0.0.7".into(),
            backend_name: name_of(&k)
        }]
    );
}

/// The same for a pod the watch sighted after the re-list started.
#[test]
fn a_pod_first_seen_during_a_relist_is_not_judged_by_it() {
    let mut index = PodIndex::new();
    let k = key("app-a", 1);
    launched(&mut index, &k);
    index.relist_started();
    // relist_apply of other pods only; this one arrives through a racing path.
    let _ = index.apply(&pod(&k, Phase::Pending));
    assert!(index.relist_done().is_empty());
    assert_eq!(index.tracked(), 1);
}

// === re-lists ===

#[test]
fn a_relist_reports_pods_gone_while_the_watch_was_down_exactly_once() {
    let mut index = PodIndex::new();
    let (gone, kept) = (key("app-a", 1), key("app-a", 2));
    for k in [&gone, &kept] {
        launched(&mut index, k);
        let _ = index.created(k, Some(format!("uid-{}", k.1)));
    }
    index.relist_started();
    let _ = index.relist_apply(&pod(&kept, Phase::Running));
    let effects = index.relist_done();
    assert_eq!(effects.len(), 1, "{effects:?}");
    assert!(matches!(&effects[0], Effect::Report { key, .. } if key == &gone));
    assert_eq!(exit_reason(&effects), Some(ExitReason::DeletedExternally));
    // A second re-list and a late delete event say nothing more about it.
    index.relist_started();
    let _ = index.relist_apply(&pod(&kept, Phase::Running));
    assert!(index.relist_done().is_empty());
    assert!(index.delete(&pod(&gone, Phase::Running)).is_empty());
}

#[test]
fn a_relist_forgets_unclaimed_pods_that_are_gone() {
    let mut index = PodIndex::new();
    let (a, b) = (key("app-a", 1), key("app-a", 2));
    let _ = index.adopt_listed(&[pod(&a, Phase::Running), pod(&b, Phase::Running)]);
    index.relist_started();
    let _ = index.relist_apply(&pod(&b, Phase::Running));
    assert!(index.relist_done().is_empty());
    let recovered = index.claim(&app("app-a"), DIGEST);
    assert_eq!(
        recovered.iter().map(|r| r.executor_id).collect::<Vec<_>>(),
        vec![ExecutorId::new(2)]
    );
}

// === creation ===

#[test]
fn launch_refuses_an_executor_the_index_already_tracks() {
    let mut index = PodIndex::new();
    let k = key("app-a", 1);
    launched(&mut index, &k);
    assert!(index
        .launch(k.clone(), "spark".into(), name_of(&k), None)
        .is_err());
    let adopted = key("app-b", 1);
    let _ = index.adopt_listed(&[pod(&adopted, Phase::Running)]);
    let err = index
        .launch(adopted.clone(), "spark".into(), name_of(&adopted), None)
        .expect_err("unclaimed pods count");
    assert_eq!(err.pod, name_of(&adopted));
}

#[test]
fn a_cancelled_creation_is_reported_once_or_its_pod_deleted() {
    let mut index = PodIndex::new();
    let k = key("app-a", 1);
    // Cancelled before the request was sent: reported as scaled down, nothing else.
    launched(&mut index, &k);
    assert!(index.terminate(&k, 30).is_empty());
    let CreateStep::Stop(effects) = index.create_step(&k) else {
        panic!("the create must stop")
    };
    assert_eq!(exit_reason(&effects), Some(ExitReason::ScaledDown));
    assert_eq!(index.tracked(), 0);

    // Cancelled while the request was in flight: the pod is deleted when it shows up, and its
    // deletion reports the end.
    let k2 = key("app-a", 2);
    launched(&mut index, &k2);
    assert_eq!(index.create_step(&k2), CreateStep::Send);
    assert!(index.terminate(&k2, 30).is_empty());
    let effects = index.created(&k2, Some("uid-2".into()));
    assert_eq!(
        deletes(&effects),
        vec![(name_of(&k2), DeleteWhy::Cancelled)]
    );
    assert!(reports(&effects).is_empty());
    let effects = index.delete(&pod_with(&k2, "uid-2", &Phase::Failed(143), true, false));
    assert_eq!(reports(&effects).len(), 1);
    assert_eq!(index.tracked(), 0);
}

#[test]
fn a_create_that_fails_for_good_is_reported_start_failed() {
    let mut index = PodIndex::new();
    let k = key("app-a", 1);
    launched(&mut index, &k);
    let effects = index.create_failed(&k, "forbidden".into());
    assert_eq!(exit_reason(&effects), Some(ExitReason::StartFailed));
    assert!(index.create_failed(&k, "again".into()).is_empty());
    assert_eq!(index.create_step(&k), CreateStep::Stop(Vec::new()));
}

#[test]
fn a_create_retried_after_the_watch_saw_the_pod_stops() {
    let mut index = PodIndex::new();
    let k = key("app-a", 1);
    launched(&mut index, &k);
    let _ = index.apply(&pod(&k, Phase::Pending));
    assert_eq!(index.create_step(&k), CreateStep::Stop(Vec::new()));
    // The quota warning is not sent for a pod that exists.
    assert!(index.waiting(&k, "quota".into()).is_empty());
}

// === watch events ===

#[test]
fn an_exited_executor_is_reported_once_and_its_pod_deleted_unless_kept() {
    let mut index = PodIndex::new();
    let (k, kept) = (key("app-a", 1), key("app-a", 2));
    for k in [&k, &kept] {
        launched(&mut index, k);
        let _ = index.created(k, None);
    }
    let effects = index.apply(&pod(&k, Phase::Failed(52)));
    assert_eq!(exit_reason(&effects), Some(ExitReason::Error));
    assert_eq!(deletes(&effects), vec![(name_of(&k), DeleteWhy::Exited)]);
    // Its deletion, seen later, is not a second report.
    assert!(
        reports(&index.delete(&pod_with(&k, "uid-1", &Phase::Failed(52), true, false))).is_empty()
    );

    let effects = index.apply(&pod_with(&kept, "uid-2", &Phase::Failed(1), false, true));
    assert_eq!(exit_reason(&effects), Some(ExitReason::Error));
    assert!(deletes(&effects).is_empty(), "kept pods stay: {effects:?}");
    // And a kept pod is never reaped as an orphan afterwards.
    assert!(index
        .apply(&pod_with(&kept, "uid-2", &Phase::Failed(1), false, true))
        .is_empty());
}

#[test]
fn pods_deleted_by_someone_else_are_reported_deleted_externally() {
    let mut index = PodIndex::new();
    let k = key("app-a", 1);
    launched(&mut index, &k);
    let _ = index.created(&k, None);
    let effects = index.apply(&pod_with(&k, "uid-1", &Phase::Failed(143), true, false));
    assert_eq!(exit_reason(&effects), Some(ExitReason::DeletedExternally));
    assert!(deletes(&effects).is_empty());

    let k2 = key("app-a", 2);
    launched(&mut index, &k2);
    let _ = index.created(&k2, None);
    let effects = index.delete(&pod(&k2, Phase::Running));
    assert_eq!(exit_reason(&effects), Some(ExitReason::DeletedExternally));
}

#[test]
fn a_pod_stoker_deletes_reports_its_own_exit() {
    let mut index = PodIndex::new();
    let k = key("app-a", 1);
    launched(&mut index, &k);
    let _ = index.created(&k, Some("uid-1".into()));
    let effects = index.terminate(&k, 30);
    assert_eq!(
        effects,
        vec![Effect::Delete {
            pod: PodRef {
                namespace: "spark".into(),
                name: name_of(&k),
                uid: Some("uid-1".into()),
                as_user: None,
            },
            grace_seconds: 30,
            why: DeleteWhy::Asked,
        }]
    );
    // Graceful deletion: the container exits, then the pod goes.
    let effects = index.apply(&pod_with(&k, "uid-1", &Phase::Failed(143), true, false));
    assert_eq!(exit_reason(&effects), Some(ExitReason::Error));
    assert!(index
        .delete(&pod_with(&k, "uid-1", &Phase::Failed(143), true, false))
        .is_empty());
}

#[test]
fn a_pod_stoker_deleted_that_vanishes_without_a_last_status_is_not_deleted_externally() {
    let mut index = PodIndex::new();
    let k = key("app-a", 1);
    launched(&mut index, &k);
    let _ = index.created(&k, Some("uid-1".into()));
    let _ = index.terminate(&k, 0);
    // The pod goes while it still shows Running (no terminated container status).
    let effects = index.delete(&pod(&k, Phase::Running));
    assert_eq!(exit_reason(&effects), Some(ExitReason::KilledByDriver));
}

#[test]
fn the_driver_hears_once_that_a_pod_cannot_be_scheduled() {
    let mut index = PodIndex::new();
    let k = key("app-a", 1);
    launched(&mut index, &k);
    let first = reports(&index.apply(&pod(&k, Phase::Unschedulable)));
    assert_eq!(first.len(), 2, "accepted, then the warning: {first:?}");
    assert!(
        matches!(&first[1], Observation::Waiting { message } if message.contains("cannot be scheduled"))
    );
    assert!(index.apply(&pod(&k, Phase::Unschedulable)).is_empty());
}

#[test]
fn pods_no_application_owns_are_deleted_and_kept_ones_left() {
    let mut index = PodIndex::new();
    let k = key("app-x", 9);
    assert_eq!(
        deletes(&index.apply(&pod(&k, Phase::Running))),
        vec![(name_of(&k), DeleteWhy::Orphan)]
    );
    assert!(index
        .apply(&pod_with(&k, "u", &Phase::Failed(1), false, true))
        .is_empty());
    assert!(index
        .apply(&pod_with(&k, "u", &Phase::Running, true, false))
        .is_empty());
}

// === adoption ===

#[test]
fn claims_hand_over_only_pods_with_the_same_token() {
    let mut index = PodIndex::new();
    let (mine, other) = (key("app-a", 1), key("app-a", 2));
    let mut foreign = pod(&other, Phase::Pending);
    foreign
        .metadata
        .annotations
        .as_mut()
        .expect("annotations")
        .insert(crate::pod::ANNOTATION_TOKEN.into(), "someone-else".into());
    let _ = index.adopt_listed(&[pod(&mine, Phase::Running), foreign]);
    let recovered = index.claim(&app("app-a"), DIGEST);
    assert_eq!(recovered.len(), 1);
    assert_eq!(recovered[0].running_host.as_deref(), Some("10.0.0.7"));
    assert_eq!(index.unclaimed_of(&app("app-a")), 1);
    // The foreign pod's events do not delete it while it waits, and the reaper does later.
    assert!(index.apply(&pod(&other, Phase::Running)).is_empty());
    assert_eq!(
        deletes(&index.reap_unclaimed()),
        vec![(name_of(&other), DeleteWhy::Unclaimed)]
    );
}

#[test]
fn an_unclaimed_pod_that_exits_is_cleaned_up_and_not_handed_over() {
    let mut index = PodIndex::new();
    let k = key("app-a", 1);
    let exited = pod(&key("app-a", 2), Phase::Failed(1));
    let effects = index.adopt_listed(&[pod(&k, Phase::Pending), exited]);
    assert_eq!(
        deletes(&effects),
        vec![(name_of(&key("app-a", 2)), DeleteWhy::Exited)]
    );
    let effects = index.apply(&pod(&k, Phase::Failed(137)));
    assert_eq!(deletes(&effects), vec![(name_of(&k), DeleteWhy::Exited)]);
    assert!(index.claim(&app("app-a"), DIGEST).is_empty());
}

mod simulated;
