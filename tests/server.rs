//! Server tests over a real loopback gRPC connection, with a recording backend that plays the
//! part of the executors (no JVM): every RPC, validation with its status codes and no change of
//! state, isolation between applications, lease expiry, event resume, every limit of
//! `stoker serve` (refused with its code and flag, nothing changed, counted), and reflection.

use std::sync::Arc;
use std::time::Duration;

use stoker::config::{Limits, NamespaceSource};
use stoker::proto::v1 as pb;
use stoker::proto::v1::executor_allocator_client::ExecutorAllocatorClient;
use stoker::server::{self, Running, Settings};
use stoker_core::{EngineConfig, ExecutorBackend, Millis};
use tonic::transport::Channel;
use tonic::Code;

mod common;

use common::{template, FakeBackend, Shared};

const ADMIN: &str = "admin-token-for-tests-0123456789";

struct Harness {
    running: Running,
    backend: Arc<FakeBackend>,
    client: ExecutorAllocatorClient<Channel>,
}

/// The limits most tests run with.
fn test_limits() -> Limits {
    Limits {
        max_applications: 3,
        max_executors_per_profile: 50,
        max_string_bytes: 256,
        max_entries: 8,
        ..Limits::default()
    }
}

async fn start(lease_ttl: Millis) -> Harness {
    start_with(lease_ttl, test_limits()).await
}

async fn start_with(lease_ttl: Millis, limits: Limits) -> Harness {
    let backend = Arc::new(FakeBackend::default());
    let for_start = Arc::clone(&backend);
    let settings = Settings {
        listen: "127.0.0.1:0".parse().expect("addr"),
        metrics_listen: Some("127.0.0.1:0".parse().expect("addr")),
        engine: EngineConfig {
            lease_ttl,
            max_failures: 3,
            ..EngineConfig::default()
        },
        limits,
        admin_token: ADMIN.into(),
        incarnation: "test-incarnation".into(),
        tls: None,
        namespace_selector: None,
        queues: None,
    };
    let running = server::start(settings, move |sink| {
        *for_start.sink.lock().expect("sink") = Some(sink);
        Ok(Arc::new(Shared(for_start)) as Arc<dyn ExecutorBackend>)
    })
    .await
    .expect("server starts");
    let client = ExecutorAllocatorClient::connect(format!("http://{}", running.grpc_addr))
        .await
        .expect("client connects");
    Harness {
        running,
        backend,
        client,
    }
}

fn register_request(app: &str) -> pb::RegisterApplicationRequest {
    pb::RegisterApplicationRequest {
        app_id: app.into(),
        app_name: "test".into(),
        template: Some(template()),
        ..Default::default()
    }
}

async fn register(client: &mut ExecutorAllocatorClient<Channel>, app: &str) -> String {
    client
        .register_application(register_request(app))
        .await
        .expect("register")
        .into_inner()
        .token
}

async fn set_total(client: &mut ExecutorAllocatorClient<Channel>, app: &str, token: &str, n: i64) {
    client
        .request_total_executors(pb::RequestTotalExecutorsRequest {
            app_id: app.into(),
            token: token.into(),
            targets: vec![pb::ProfileTarget {
                resource_profile_id: 0,
                total: n,
            }],
        })
        .await
        .expect("request total");
}

async fn info(client: &mut ExecutorAllocatorClient<Channel>, app: &str) -> pb::ApplicationInfo {
    client
        .get_application(pb::GetApplicationRequest {
            app_id: app.into(),
            token: ADMIN.into(),
        })
        .await
        .expect("get application")
        .into_inner()
}

/// Reads events until `pred` holds for the collected list, or fails after 10 s.
async fn collect_until(
    stream: &mut tonic::Streaming<pb::WatchEvent>,
    events: &mut Vec<pb::WatchEvent>,
    pred: impl Fn(&[pb::WatchEvent]) -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !pred(events) {
        let next = tokio::time::timeout_at(deadline, stream.message())
            .await
            .expect("events arrive in time")
            .expect("stream ok")
            .expect("stream open");
        events.push(next);
    }
}

fn executor(event: &pb::WatchEvent) -> Option<&pb::ExecutorEvent> {
    match &event.kind {
        Some(pb::watch_event::Kind::Executor(e)) => Some(e),
        _ => None,
    }
}

fn count_state(events: &[pb::WatchEvent], state: pb::ExecutorState) -> usize {
    events
        .iter()
        .filter_map(executor)
        .filter(|e| e.state == state as i32)
        .count()
}

async fn wait_for(mut cond: impl FnMut() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("condition not reached in 10 s");
}

/// Asserts a refusal by a limit: its code, and a message that names the limit's flag.
fn assert_limit(status: &tonic::Status, code: Code, flag: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(flag),
        "message {:?} should name {flag}",
        status.message()
    );
}

async fn app_count(client: &mut ExecutorAllocatorClient<Channel>) -> usize {
    client
        .list_applications(pb::ListApplicationsRequest {
            admin_token: ADMIN.into(),
        })
        .await
        .expect("list")
        .into_inner()
        .applications
        .len()
}

/// A counter's value from /metrics.
async fn metric(h: &Harness, series: &str) -> u64 {
    let addr = h.running.metrics_addr.expect("metrics");
    let body = http_get(addr, "/metrics").await;
    let prefix = format!("{series} ");
    body.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in {body}"))
}

/// Refusals counted for one limit.
async fn refusals(h: &Harness, limit: &str) -> u64 {
    metric(
        h,
        &format!("stoker_limit_refusals_total{{limit=\"{limit}\"}}"),
    )
    .await
}

/// Opens a watch stream of `app` now, and returns what resolves once the application is gone:
/// its stream ends when its actor has ended (and given back its share of the limits).
async fn watch_until_gone(
    client: &mut ExecutorAllocatorClient<Channel>,
    app: &str,
    token: &str,
) -> impl std::future::Future<Output = ()> {
    let mut stream = client
        .watch_executors(pb::WatchExecutorsRequest {
            app_id: app.into(),
            token: token.into(),
            after_seq: u64::MAX,
        })
        .await
        .expect("watch")
        .into_inner();
    async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::time::timeout_at(deadline, stream.message())
            .await
            .expect("the application ends in time")
            .expect("stream ok")
            .is_some()
        {}
    }
}

fn register_in(app: &str, namespace: &str) -> pb::RegisterApplicationRequest {
    let mut request = register_request(app);
    request.template.as_mut().expect("template").kubernetes = Some(pb::KubernetesSettings {
        namespace: namespace.into(),
        ..Default::default()
    });
    request
}

fn two_profiles() -> pb::ExecutorTemplate {
    let mut template = template();
    let mut second = template.profiles[0].clone();
    second.id = 1;
    template.profiles.push(second);
    template
}

fn targets(totals: &[(i32, i64)]) -> Vec<pb::ProfileTarget> {
    totals
        .iter()
        .map(|&(resource_profile_id, total)| pb::ProfileTarget {
            resource_profile_id,
            total,
        })
        .collect()
}

async fn request_totals(
    client: &mut ExecutorAllocatorClient<Channel>,
    app: &str,
    token: &str,
    totals: &[(i32, i64)],
) -> Result<(), tonic::Status> {
    client
        .request_total_executors(pb::RequestTotalExecutorsRequest {
            app_id: app.into(),
            token: token.into(),
            targets: targets(totals),
        })
        .await
        .map(|_| ())
}

#[tokio::test]
async fn register_is_idempotent_and_reattaches_with_the_same_token() {
    let mut h = start(30_000).await;
    let first = h
        .client
        .register_application(register_request("app-1"))
        .await
        .expect("register")
        .into_inner();
    assert_eq!(first.token.len(), 64);
    assert!(!first.reattached);
    assert_eq!(first.incarnation, "test-incarnation");
    assert_eq!(first.lease_ttl_ms, 30_000);

    let mut again = register_request("app-1");
    again.token = first.token.clone();
    let second = h
        .client
        .register_application(again)
        .await
        .expect("reattach")
        .into_inner();
    assert!(second.reattached);
    assert_eq!(second.token, first.token);

    let status = h
        .client
        .register_application(register_request("app-1"))
        .await
        .expect_err("no token");
    assert_eq!(status.code(), Code::AlreadyExists);

    let mut wrong = register_request("app-1");
    wrong.token = "x".repeat(40);
    let status = h
        .client
        .register_application(wrong)
        .await
        .expect_err("wrong token");
    assert_eq!(status.code(), Code::PermissionDenied);
    h.running.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn targets_create_executors_and_events_resume_without_loss() {
    let mut h = start(30_000).await;
    let token = register(&mut h.client, "app-1").await;
    set_total(&mut h.client, "app-1", &token, 3).await;
    let mut stream = h
        .client
        .watch_executors(pb::WatchExecutorsRequest {
            app_id: "app-1".into(),
            token: token.clone(),
            after_seq: 0,
        })
        .await
        .expect("watch")
        .into_inner();
    let mut events = Vec::new();
    collect_until(&mut stream, &mut events, |e| {
        count_state(e, pb::ExecutorState::Running) == 3
    })
    .await;
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    let ids: Vec<String> = events
        .iter()
        .filter_map(executor)
        .filter(|e| e.state == pb::ExecutorState::Requested as i32)
        .map(|e| e.executor_id.clone())
        .collect();
    assert_eq!(ids, vec!["1", "2", "3"]);
    drop(stream);

    // A crash while nobody watches: the driver resumes after its last sequence number.
    let last = events.last().expect("events").seq;
    h.backend.crash("app-1", 2, 1);
    let mut stream = h
        .client
        .watch_executors(pb::WatchExecutorsRequest {
            app_id: "app-1".into(),
            token: token.clone(),
            after_seq: last,
        })
        .await
        .expect("watch again")
        .into_inner();
    let mut resumed = Vec::new();
    collect_until(&mut stream, &mut resumed, |e| {
        count_state(e, pb::ExecutorState::Running) == 1
    })
    .await;
    assert_eq!(resumed[0].seq, last + 1);
    let exit = executor(&resumed[0]).expect("executor event");
    assert_eq!(exit.executor_id, "2");
    assert_eq!(exit.state, pb::ExecutorState::Exited as i32);
    assert_eq!(exit.exit_code, Some(1));
    assert_eq!(exit.reason, pb::ExitReason::Error as i32);
    assert!(exit.caused_by_app);
    // Replaced by a new id.
    let replacement = resumed
        .iter()
        .filter_map(executor)
        .find(|e| e.state == pb::ExecutorState::Requested as i32)
        .expect("replacement requested");
    assert_eq!(replacement.executor_id, "4");
    assert_eq!(h.backend.alive("app-1"), 3);
    h.running.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn kill_and_decommission_remove_executors_with_their_reasons() {
    let mut h = start(30_000).await;
    let token = register(&mut h.client, "app-1").await;
    set_total(&mut h.client, "app-1", &token, 2).await;
    let backend = Arc::clone(&h.backend);
    wait_for(|| backend.alive("app-1") == 2).await;
    let killed = h
        .client
        .kill_executors(pb::KillExecutorsRequest {
            app_id: "app-1".into(),
            token: token.clone(),
            executor_ids: vec!["1".into(), "99".into()],
            adjust_target: true,
        })
        .await
        .expect("kill")
        .into_inner();
    assert_eq!(killed.killed, vec!["1"]);
    let decommissioning = h
        .client
        .decommission_executors(pb::DecommissionExecutorsRequest {
            app_id: "app-1".into(),
            token: token.clone(),
            executor_ids: vec!["2".into()],
            adjust_target: true,
        })
        .await
        .expect("decommission")
        .into_inner();
    assert_eq!(decommissioning.decommissioning, vec!["2"]);
    let app = info(&mut h.client, "app-1").await;
    assert_eq!(app.targets[0].total, 0);
    wait_for(|| backend.alive("app-1") == 1).await;
    h.running.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn bad_input_gets_its_status_and_changes_nothing() {
    let mut h = start(30_000).await;
    let token = register(&mut h.client, "app-1").await;
    set_total(&mut h.client, "app-1", &token, 1).await;
    let before = info(&mut h.client, "app-1").await;

    let target = |total: i64, profile: i32| pb::RequestTotalExecutorsRequest {
        app_id: "app-1".into(),
        token: token.clone(),
        targets: vec![pb::ProfileTarget {
            resource_profile_id: profile,
            total,
        }],
    };
    let cases: Vec<(pb::RequestTotalExecutorsRequest, Code, &str)> = vec![
        (target(-1, 0), Code::InvalidArgument, "targets[0].total"),
        (target(51, 0), Code::InvalidArgument, "targets[0].total"),
        (target(1, 7), Code::InvalidArgument, "resource profile 7"),
        (
            pb::RequestTotalExecutorsRequest {
                app_id: "no such app".into(),
                ..target(1, 0)
            },
            Code::InvalidArgument,
            "app_id",
        ),
        (
            pb::RequestTotalExecutorsRequest {
                app_id: "unknown".into(),
                ..target(1, 0)
            },
            Code::NotFound,
            "unknown",
        ),
        (
            pb::RequestTotalExecutorsRequest {
                token: String::new(),
                ..target(1, 0)
            },
            Code::Unauthenticated,
            "token",
        ),
        (
            pb::RequestTotalExecutorsRequest {
                token: "y".repeat(64),
                ..target(1, 0)
            },
            Code::PermissionDenied,
            "token",
        ),
    ];
    for (request, code, needle) in cases {
        let status = h
            .client
            .request_total_executors(request.clone())
            .await
            .expect_err("refused");
        assert_eq!(status.code(), code, "{request:?}: {}", status.message());
        assert!(
            status.message().contains(needle),
            "message {:?} should name {needle:?}",
            status.message()
        );
    }
    let status = h
        .client
        .kill_executors(pb::KillExecutorsRequest {
            app_id: "app-1".into(),
            token: token.clone(),
            executor_ids: vec!["1".into(), "one".into()],
            adjust_target: false,
        })
        .await
        .expect_err("malformed id");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("executor_ids[1]"),
        "{}",
        status.message()
    );

    // Registration field checks.
    let mut bad = Vec::new();
    let mut r = register_request("app-2");
    r.template = None;
    bad.push((r, "template"));
    let mut r = register_request("app-2");
    r.template.as_mut().expect("template").driver_url = "http://x".into();
    bad.push((r, "template.driver_url"));
    let mut r = register_request("app-2");
    r.template.as_mut().expect("template").profiles[0].cores = 0;
    bad.push((r, "template.profiles[0].cores"));
    let mut r = register_request("app-2");
    r.app_name = "n".repeat(300);
    bad.push((r, "app_name"));
    let mut r = register_request("app-2");
    r.template.as_mut().expect("template").environment =
        (0..9).map(|i| (format!("K{i}"), "v".into())).collect();
    bad.push((r, "template.environment"));
    let mut r = register_request("app-2");
    r.initial_targets = vec![pb::ProfileTarget {
        resource_profile_id: 3,
        total: 1,
    }];
    bad.push((r, "initial_targets[0].resource_profile_id"));
    let mut r = register_request("app-2");
    r.token = "short".into();
    bad.push((r, "token"));
    let mut r = register_request("app-2");
    r.known_executor_ids = vec!["x".into()];
    bad.push((r, "known_executor_ids[0]"));
    // Spark-built pods: one per profile, for profiles of the template, a lower-case placeholder.
    let spark_pods = |profiles: Vec<i32>, placeholder: &str| pb::SparkPods {
        placeholder_executor_id: placeholder.into(),
        profiles: profiles
            .into_iter()
            .map(|id| pb::SparkProfilePod {
                resource_profile_id: id,
                pod_json: "{}".into(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    for (pods, field) in [
        (
            spark_pods(vec![], "stokerexecid"),
            "template.spark_pods.profiles",
        ),
        (
            spark_pods(vec![0, 5], "stokerexecid"),
            "template.spark_pods.profiles[1].resource_profile_id",
        ),
        (
            spark_pods(vec![0], "Exec-1"),
            "template.spark_pods.placeholder_executor_id",
        ),
    ] {
        let mut r = register_request("app-2");
        r.template.as_mut().expect("template").spark_pods = Some(pods);
        bad.push((r, field));
    }
    for (request, field) in bad {
        let status = h
            .client
            .register_application(request)
            .await
            .expect_err("invalid registration");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().starts_with(field),
            "message {:?} should start with {field:?}",
            status.message()
        );
    }

    let after = info(&mut h.client, "app-1").await;
    assert_eq!(after.targets, before.targets);
    assert_eq!(after.last_seq, before.last_seq);
    let apps = h
        .client
        .list_applications(pb::ListApplicationsRequest {
            admin_token: ADMIN.into(),
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(apps.applications.len(), 1, "no application was created");
    h.running.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn applications_cannot_see_or_touch_each_other() {
    let mut h = start(30_000).await;
    let token_a = register(&mut h.client, "app-a").await;
    let token_b = register(&mut h.client, "app-b").await;
    set_total(&mut h.client, "app-a", &token_a, 2).await;
    let backend = Arc::clone(&h.backend);
    wait_for(|| backend.alive("app-a") == 2).await;

    let status = h
        .client
        .kill_executors(pb::KillExecutorsRequest {
            app_id: "app-a".into(),
            token: token_b.clone(),
            executor_ids: vec!["1".into()],
            adjust_target: false,
        })
        .await
        .expect_err("b cannot kill a's executors");
    assert_eq!(status.code(), Code::PermissionDenied);
    // Killing "1" of app-b touches only app-b (which has no executor 1).
    let killed = h
        .client
        .kill_executors(pb::KillExecutorsRequest {
            app_id: "app-b".into(),
            token: token_b.clone(),
            executor_ids: vec!["1".into()],
            adjust_target: false,
        })
        .await
        .expect("own app")
        .into_inner();
    assert!(killed.killed.is_empty());
    for request in [
        pb::GetApplicationRequest {
            app_id: "app-a".into(),
            token: token_b.clone(),
        },
        pb::GetApplicationRequest {
            app_id: "app-b".into(),
            token: token_a.clone(),
        },
    ] {
        let status = h.client.get_application(request).await.expect_err("denied");
        assert_eq!(status.code(), Code::PermissionDenied);
    }
    let status = h
        .client
        .watch_executors(pb::WatchExecutorsRequest {
            app_id: "app-a".into(),
            token: token_b.clone(),
            after_seq: 0,
        })
        .await
        .expect_err("b cannot watch a");
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = h
        .client
        .list_applications(pb::ListApplicationsRequest {
            admin_token: token_a.clone(),
        })
        .await
        .expect_err("an app token is not the admin token");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(h.backend.alive("app-a"), 2);
    let own = h
        .client
        .get_application(pb::GetApplicationRequest {
            app_id: "app-a".into(),
            token: token_a.clone(),
        })
        .await
        .expect("own app")
        .into_inner();
    assert_eq!(own.executors.len(), 2);
    h.running.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn lease_expiry_removes_the_applications_executors() {
    let mut h = start(600).await;
    let token = register(&mut h.client, "app-1").await;
    set_total(&mut h.client, "app-1", &token, 3).await;
    let backend = Arc::clone(&h.backend);
    wait_for(|| backend.alive("app-1") == 3).await;
    // Heartbeats keep it.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        h.client
            .heartbeat(pb::HeartbeatRequest {
                app_id: "app-1".into(),
                token: token.clone(),
                acked_seq: 0,
            })
            .await
            .expect("heartbeat");
    }
    assert_eq!(backend.alive("app-1"), 3);
    // Silence: the lease expires, executors go, the application is forgotten.
    wait_for(|| backend.alive("app-1") == 0).await;
    let mut client = h.client.clone();
    for _ in 0..100 {
        let gone = client
            .get_application(pb::GetApplicationRequest {
                app_id: "app-1".into(),
                token: ADMIN.into(),
            })
            .await
            .err()
            .is_some_and(|s| s.code() == Code::NotFound);
        if gone {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = client
        .heartbeat(pb::HeartbeatRequest {
            app_id: "app-1".into(),
            token: token.clone(),
            acked_seq: 0,
        })
        .await
        .expect_err("forgotten");
    assert_eq!(status.code(), Code::NotFound);
    let metrics_addr = h.running.metrics_addr.expect("metrics");
    let body = http_get(metrics_addr, "/metrics").await;
    assert!(body.contains("stoker_leases_expired_total 1"), "{body}");
    assert!(body.contains("stoker_rpc_duration_seconds"), "{body}");
    h.running.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn unregister_removes_everything_and_application_limit_holds() {
    let mut h = start(30_000).await;
    let token = register(&mut h.client, "app-1").await;
    register(&mut h.client, "app-2").await;
    register(&mut h.client, "app-3").await;
    let status = h
        .client
        .register_application(register_request("app-4"))
        .await
        .expect_err("limit of 3");
    assert_limit(&status, Code::ResourceExhausted, "--max-applications");
    assert!(
        status.message().contains("serves 3 applications"),
        "{status:?}"
    );
    assert_eq!(app_count(&mut h.client).await, 3, "nothing registered");
    assert_eq!(refusals(&h, "applications").await, 1);
    let gone = watch_until_gone(&mut h.client, "app-1", &token).await;
    set_total(&mut h.client, "app-1", &token, 2).await;
    let backend = Arc::clone(&h.backend);
    wait_for(|| backend.alive("app-1") == 2).await;
    let removed = h
        .client
        .unregister_application(pb::UnregisterApplicationRequest {
            app_id: "app-1".into(),
            token: token.clone(),
            ..Default::default()
        })
        .await
        .expect("unregister")
        .into_inner();
    assert_eq!(removed.removed_executors, 2);
    wait_for(|| backend.alive("app-1") == 0).await;
    // Once app-1 is gone, its place is free.
    gone.await;
    register(&mut h.client, "app-4").await;
    assert_eq!(app_count(&mut h.client).await, 3);
    h.running.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn failure_limit_sends_a_terminal_application_event() {
    let mut h = start(30_000).await;
    let mut request = register_request("app-1");
    request.failure_policy = Some(pb::FailurePolicy {
        max_failures: 2,
        validity_interval_ms: 0,
    });
    let token = h
        .client
        .register_application(request)
        .await
        .expect("register")
        .into_inner()
        .token;
    set_total(&mut h.client, "app-1", &token, 1).await;
    let backend = Arc::clone(&h.backend);
    wait_for(|| backend.alive("app-1") == 1).await;
    backend.crash("app-1", 1, 1);
    wait_for(|| backend.alive("app-1") == 1).await;
    backend.crash("app-1", 2, 1);
    let mut stream = h
        .client
        .watch_executors(pb::WatchExecutorsRequest {
            app_id: "app-1".into(),
            token: token.clone(),
            after_seq: 0,
        })
        .await
        .expect("watch")
        .into_inner();
    let mut events = Vec::new();
    collect_until(&mut stream, &mut events, |e| {
        e.iter()
            .any(|ev| matches!(ev.kind, Some(pb::watch_event::Kind::Application(_))))
    })
    .await;
    let Some(pb::watch_event::Kind::Application(app)) = &events.last().expect("event").kind else {
        panic!("last event is the application's");
    };
    assert_eq!(app.kind, pb::application_event::Kind::Failed as i32);
    assert!(
        app.message.contains("max number of executor failures (2)"),
        "{}",
        app.message
    );
    assert_eq!(info(&mut h.client, "app-1").await.phase, "failed");
    h.running.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn health_and_reflection_are_served() {
    let h = start(30_000).await;
    let channel = Channel::from_shared(format!("http://{}", h.running.grpc_addr))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let response = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "stoker.v1.ExecutorAllocator".into(),
        })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(
        response.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    // Reflection in both versions; Python's grpcio-reflection speaks only v1alpha.
    for services in [
        reflection_v1alpha_services(channel.clone()).await,
        reflection_v1_services(channel.clone()).await,
    ] {
        for expected in [
            "stoker.v1.ExecutorAllocator",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ] {
            assert!(services.contains(&expected.to_owned()), "{services:?}");
        }
    }
    let files = reflection_v1alpha_file_of(channel, "stoker.v1.ExecutorAllocator").await;
    assert!(
        !files.is_empty(),
        "the descriptor of stoker's service is served"
    );
    h.running.shutdown().await.expect("shutdown");
}

async fn reflection_v1alpha_services(channel: Channel) -> Vec<String> {
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("v1alpha reflection is served")
        .into_inner();
    let response = responses
        .message()
        .await
        .expect("reflection stream")
        .expect("one response");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("not a service list: {response:?}");
    };
    list.service.into_iter().map(|s| s.name).collect()
}

async fn reflection_v1alpha_file_of(channel: Channel, symbol: &str) -> Vec<Vec<u8>> {
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(symbol.to_owned())),
    };
    let mut responses = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("v1alpha reflection is served")
        .into_inner();
    let response = responses
        .message()
        .await
        .expect("reflection stream")
        .expect("one response");
    let Some(MessageResponse::FileDescriptorResponse(files)) = response.message_response else {
        panic!("not a file descriptor: {response:?}");
    };
    files.file_descriptor_proto
}

async fn reflection_v1_services(channel: Channel) -> Vec<String> {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("v1 reflection is served")
        .into_inner();
    let response = responses
        .message()
        .await
        .expect("reflection stream")
        .expect("one response");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("not a service list: {response:?}");
    };
    list.service.into_iter().map(|s| s.name).collect()
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut body = String::new();
    stream.read_to_string(&mut body).await.expect("read");
    body
}

// === limits ===

#[tokio::test]
async fn applications_per_namespace_are_limited_with_the_default_namespace_counted() {
    let limits = Limits {
        max_applications: 6,
        max_applications_per_namespace: 2,
        namespaces: NamespaceSource::Kubernetes {
            default: "default".into(),
        },
        ..test_limits()
    };
    let mut h = start_with(30_000, limits).await;
    let mut spark = Vec::new();
    for app in ["a-1", "a-2"] {
        let response = h
            .client
            .register_application(register_in(app, "spark"))
            .await
            .expect("room in spark")
            .into_inner();
        spark.push(response.token);
    }
    let status = h
        .client
        .register_application(register_in("a-3", "spark"))
        .await
        .expect_err("spark is full");
    assert_limit(
        &status,
        Code::ResourceExhausted,
        "--max-applications-per-namespace",
    );
    assert!(
        status.message().contains("namespace \"spark\""),
        "{status:?}"
    );
    // Another namespace has room; an application that names none is in the default one.
    h.client
        .register_application(register_in("b-1", "other"))
        .await
        .expect("room in other");
    h.client
        .register_application(register_in("c-1", ""))
        .await
        .expect("room in default");
    h.client
        .register_application(register_in("c-2", "default"))
        .await
        .expect("room in default");
    let status = h
        .client
        .register_application(register_in("c-3", ""))
        .await
        .expect_err("default is full");
    assert_limit(
        &status,
        Code::ResourceExhausted,
        "--max-applications-per-namespace",
    );
    assert!(
        status.message().contains("namespace \"default\""),
        "{status:?}"
    );
    assert_eq!(app_count(&mut h.client).await, 5, "nothing registered");
    assert_eq!(refusals(&h, "applications_per_namespace").await, 2);

    // An application of spark ends: its place is free again.
    let gone = watch_until_gone(&mut h.client, "a-1", &spark[0]).await;
    h.client
        .unregister_application(pb::UnregisterApplicationRequest {
            app_id: "a-1".into(),
            token: spark[0].clone(),
            ..Default::default()
        })
        .await
        .expect("unregister");
    gone.await;
    h.client
        .register_application(register_in("a-3", "spark"))
        .await
        .expect("room in spark again");
    assert_eq!(app_count(&mut h.client).await, 5);
    h.running.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn the_local_backend_counts_every_application_in_one_namespace() {
    let limits = Limits {
        max_applications: 6,
        max_applications_per_namespace: 2,
        ..test_limits()
    };
    let mut h = start_with(30_000, limits).await;
    h.client
        .register_application(register_in("a-1", "spark"))
        .await
        .expect("first");
    h.client
        .register_application(register_in("a-2", "other"))
        .await
        .expect("second");
    let status = h
        .client
        .register_application(register_in("a-3", "third"))
        .await
        .expect_err("one namespace, full");
    assert_limit(
        &status,
        Code::ResourceExhausted,
        "--max-applications-per-namespace",
    );
    assert!(status.message().contains("local backend"), "{status:?}");
    assert_eq!(app_count(&mut h.client).await, 2);
    h.running.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn executors_per_application_are_summed_over_profiles() {
    let limits = Limits {
        max_executors_per_profile: 50,
        max_executors_per_application: 60,
        ..test_limits()
    };
    let mut h = start_with(30_000, limits).await;
    // At registration: nothing is registered.
    let mut request = register_request("app-1");
    request.template = Some(two_profiles());
    request.initial_targets = targets(&[(0, 40), (1, 30)]);
    let status = h
        .client
        .register_application(request.clone())
        .await
        .expect_err("70 > 60");
    assert_limit(
        &status,
        Code::InvalidArgument,
        "--max-executors-per-application",
    );
    assert!(
        status.message().starts_with("initial_targets"),
        "{status:?}"
    );
    assert_eq!(app_count(&mut h.client).await, 0);

    request.initial_targets = targets(&[(0, 40)]);
    let token = h
        .client
        .register_application(request)
        .await
        .expect("register")
        .into_inner()
        .token;
    let mut stream = h
        .client
        .watch_executors(pb::WatchExecutorsRequest {
            app_id: "app-1".into(),
            token: token.clone(),
            after_seq: 0,
        })
        .await
        .expect("watch")
        .into_inner();
    let mut events = Vec::new();
    collect_until(&mut stream, &mut events, |e| {
        count_state(e, pb::ExecutorState::Running) == 40
    })
    .await;
    let before = info(&mut h.client, "app-1").await;

    // Profile 1 alone is within its own limit, but the application's sum is not.
    let status = request_totals(&mut h.client, "app-1", &token, &[(1, 30)])
        .await
        .expect_err("40 + 30 > 60");
    assert_limit(
        &status,
        Code::InvalidArgument,
        "--max-executors-per-application",
    );
    assert!(status.message().starts_with("targets"), "{status:?}");
    assert!(status.message().contains("70 executors"), "{status:?}");
    let status = request_totals(&mut h.client, "app-1", &token, &[(1, 51)])
        .await
        .expect_err("51 > 50");
    assert_limit(
        &status,
        Code::InvalidArgument,
        "--max-executors-per-profile",
    );
    let after = info(&mut h.client, "app-1").await;
    assert_eq!(after.targets, before.targets);
    assert_eq!(after.last_seq, before.last_seq, "no executor was asked for");
    assert_eq!(h.backend.alive("app-1"), 40);
    assert_eq!(refusals(&h, "executors_per_application").await, 2);
    assert_eq!(refusals(&h, "executors_per_profile").await, 1);

    // Exactly the limit, moved between profiles in one request: allowed.
    request_totals(&mut h.client, "app-1", &token, &[(0, 10), (1, 50)])
        .await
        .expect("60 in all");
    collect_until(&mut stream, &mut events, |e| {
        count_state(e, pb::ExecutorState::Running) == 90
    })
    .await;
    h.running.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn executors_in_all_are_limited_and_room_given_back_is_free_at_once() {
    let limits = Limits {
        max_executors: 10,
        ..test_limits()
    };
    let mut h = start_with(30_000, limits).await;
    let token_a = register(&mut h.client, "app-a").await;
    let token_b = register(&mut h.client, "app-b").await;
    request_totals(&mut h.client, "app-a", &token_a, &[(0, 6)])
        .await
        .expect("6 of 10");
    let before = info(&mut h.client, "app-b").await;
    let status = request_totals(&mut h.client, "app-b", &token_b, &[(0, 5)])
        .await
        .expect_err("6 + 5 > 10");
    assert_limit(&status, Code::ResourceExhausted, "--max-executors");
    assert!(status.message().contains("to 11 executors"), "{status:?}");
    let after = info(&mut h.client, "app-b").await;
    assert_eq!(after.targets, before.targets);
    assert_eq!(after.last_seq, before.last_seq, "no executor was asked for");
    assert_eq!(h.backend.alive("app-b"), 0);
    // A registration asking for too many initial executors registers nothing.
    let mut request = register_request("app-c");
    request.initial_targets = targets(&[(0, 5)]);
    let status = h
        .client
        .register_application(request)
        .await
        .expect_err("6 + 5 > 10");
    assert_limit(&status, Code::ResourceExhausted, "--max-executors");
    assert_eq!(app_count(&mut h.client).await, 2);
    assert_eq!(refusals(&h, "executors").await, 2);

    request_totals(&mut h.client, "app-b", &token_b, &[(0, 4)])
        .await
        .expect("exactly 10");
    // Lowering is never refused, and the room it gives back is free before the reply.
    request_totals(&mut h.client, "app-a", &token_a, &[(0, 2)])
        .await
        .expect("lower");
    request_totals(&mut h.client, "app-b", &token_b, &[(0, 8)])
        .await
        .expect("2 + 8");
    let status = request_totals(&mut h.client, "app-b", &token_b, &[(0, 9)])
        .await
        .expect_err("2 + 9 > 10");
    assert_limit(&status, Code::ResourceExhausted, "--max-executors");
    // An application that ends gives back all of its executors.
    let gone = watch_until_gone(&mut h.client, "app-a", &token_a).await;
    h.client
        .unregister_application(pb::UnregisterApplicationRequest {
            app_id: "app-a".into(),
            token: token_a.clone(),
            ..Default::default()
        })
        .await
        .expect("unregister");
    request_totals(&mut h.client, "app-b", &token_b, &[(0, 10)])
        .await
        .expect("an ending application holds none");
    gone.await;
    let backend = Arc::clone(&h.backend);
    wait_for(|| backend.alive("app-b") == 10).await;
    h.running.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn an_oversized_pod_template_is_refused_by_its_flag() {
    let limits = Limits {
        max_pod_template_bytes: 1_024,
        ..test_limits()
    };
    let mut h = start_with(30_000, limits).await;
    let with_template = |app: &str, bytes: usize| {
        let mut request = register_request(app);
        request.template.as_mut().expect("template").kubernetes = Some(pb::KubernetesSettings {
            pod_template_yaml: "#".repeat(bytes),
            ..Default::default()
        });
        request
    };
    let status = h
        .client
        .register_application(with_template("app-1", 1_025))
        .await
        .expect_err("1025 > 1024");
    assert_limit(&status, Code::InvalidArgument, "--max-pod-template-bytes");
    assert!(
        status
            .message()
            .starts_with("template.kubernetes.pod_template_yaml"),
        "{status:?}"
    );
    assert_eq!(app_count(&mut h.client).await, 0);
    assert_eq!(refusals(&h, "pod_template_bytes").await, 1);
    h.client
        .register_application(with_template("app-1", 1_024))
        .await
        .expect("exactly the limit");
    assert_eq!(Limits::default().max_pod_template_bytes, 64 * 1024);
    h.running.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn watch_streams_per_application_are_limited_and_given_back_on_close() {
    let limits = Limits {
        max_watches_per_application: 2,
        ..test_limits()
    };
    let mut h = start_with(30_000, limits).await;
    let token = register(&mut h.client, "app-1").await;
    let other = register(&mut h.client, "app-2").await;
    let watch = |app: &str, token: &str| pb::WatchExecutorsRequest {
        app_id: app.into(),
        token: token.into(),
        after_seq: 0,
    };
    let mut first = h
        .client
        .watch_executors(watch("app-1", &token))
        .await
        .expect("first")
        .into_inner();
    let mut second = h
        .client
        .watch_executors(watch("app-1", &token))
        .await
        .expect("second")
        .into_inner();
    let status = h
        .client
        .watch_executors(watch("app-1", &token))
        .await
        .expect_err("third");
    assert_limit(
        &status,
        Code::ResourceExhausted,
        "--max-watches-per-application",
    );
    assert!(status.message().contains("has 2 open"), "{status:?}");
    assert_eq!(refusals(&h, "watches_per_application").await, 1);
    // The limit is per application.
    let _other_stream = h
        .client
        .watch_executors(watch("app-2", &other))
        .await
        .expect("another application's watch");
    // The open streams are untouched by the refusal.
    set_total(&mut h.client, "app-1", &token, 1).await;
    for stream in [&mut first, &mut second] {
        let mut events = Vec::new();
        collect_until(stream, &mut events, |e| {
            count_state(e, pb::ExecutorState::Running) == 1
        })
        .await;
    }
    // Closing one gives its place back once the server has seen it close.
    drop(first);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match h.client.watch_executors(watch("app-1", &token)).await {
            Ok(_) => break,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(tokio::time::Instant::now() < deadline, "never given back");
                tokio::task::yield_now().await;
            }
        }
    }
    h.running.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_requested_failure_limit_is_lowered_to_the_cap() {
    let limits = Limits {
        max_failure_limit: 2,
        ..test_limits()
    };
    let mut h = start_with(30_000, limits).await;
    let mut request = register_request("app-1");
    // What the plugin sends under dynamic allocation without maxExecutors (Spark's rule).
    request.failure_policy = Some(pb::FailurePolicy {
        max_failures: 2_147_483_647,
        validity_interval_ms: 0,
    });
    let token = h
        .client
        .register_application(request)
        .await
        .expect("registered, not refused")
        .into_inner()
        .token;
    assert_eq!(metric(&h, "stoker_failure_limits_lowered_total").await, 1);
    let mut stream = h
        .client
        .watch_executors(pb::WatchExecutorsRequest {
            app_id: "app-1".into(),
            token: token.clone(),
            after_seq: 0,
        })
        .await
        .expect("watch")
        .into_inner();
    set_total(&mut h.client, "app-1", &token, 1).await;
    let mut events = Vec::new();
    for (n, id) in [(1, 1), (2, 2)] {
        collect_until(&mut stream, &mut events, |e| {
            count_state(e, pb::ExecutorState::Running) == n
        })
        .await;
        h.backend.crash("app-1", id, 1);
    }
    collect_until(&mut stream, &mut events, |e| {
        e.iter()
            .any(|ev| matches!(ev.kind, Some(pb::watch_event::Kind::Application(_))))
    })
    .await;
    let Some(pb::watch_event::Kind::Application(app)) = &events.last().expect("event").kind else {
        panic!("last event is the application's");
    };
    assert!(
        app.message.contains("max number of executor failures (2)"),
        "{}",
        app.message
    );
    h.running.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn http2_streams_per_connection_are_announced_and_enforced() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let limits = Limits {
        max_streams_per_connection: 1,
        ..test_limits()
    };
    let h = start_with(30_000, limits).await;
    let mut tcp = tokio::net::TcpStream::connect(h.running.grpc_addr)
        .await
        .expect("connect");
    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len()).expect("short");
        let mut out = len.to_be_bytes()[1..].to_vec();
        out.extend([kind, flags]);
        out.extend(stream.to_be_bytes());
        out.extend(payload);
        out
    }
    async fn read_frame(tcp: &mut tokio::net::TcpStream) -> (u8, u8, u32, Vec<u8>) {
        let mut head = [0u8; 9];
        tcp.read_exact(&mut head).await.expect("frame header");
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        tcp.read_exact(&mut payload).await.expect("frame payload");
        (head[3], head[4], stream, payload)
    }
    const SETTINGS: u8 = 0x4;
    const HEADERS: u8 = 0x1;
    const RST_STREAM: u8 = 0x3;
    const END_HEADERS: u8 = 0x4;
    const ACK: u8 = 0x1;
    const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    const REFUSED_STREAM: u32 = 0x7;

    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &[]));
    tcp.write_all(&hello).await.expect("preface");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let announced = loop {
        let (kind, flags, _, payload) = tokio::time::timeout_at(deadline, read_frame(&mut tcp))
            .await
            .expect("server settings in time");
        if kind == SETTINGS && flags & ACK == 0 {
            break payload
                .chunks_exact(6)
                .find(|s| u16::from_be_bytes([s[0], s[1]]) == MAX_CONCURRENT_STREAMS)
                .map(|s| u32::from_be_bytes([s[2], s[3], s[4], s[5]]));
        }
    };
    assert_eq!(announced, Some(1));
    // Acknowledged, the setting applies: a second stream while the first is open is refused.
    // HPACK, literal and without Huffman coding: POST http localhost
    // /grpc.health.v1.Health/Watch, content-type application/grpc. Watch waits for its request
    // message, which never comes, so the first stream stays open.
    let mut block = vec![0x83, 0x86];
    let authority = b"localhost";
    block.push(0x01);
    block.push(u8::try_from(authority.len()).expect("short"));
    block.extend(authority);
    let path = b"/grpc.health.v1.Health/Watch";
    block.push(0x04);
    block.push(u8::try_from(path.len()).expect("short"));
    block.extend(path);
    let content_type = b"application/grpc";
    block.push(0x0f);
    block.push(31 - 15);
    block.push(u8::try_from(content_type.len()).expect("short"));
    block.extend(content_type);
    let mut streams = frame(SETTINGS, ACK, 0, &[]);
    streams.extend(frame(HEADERS, END_HEADERS, 1, &block));
    streams.extend(frame(HEADERS, END_HEADERS, 3, &block));
    tcp.write_all(&streams).await.expect("two streams");
    let reset = loop {
        let (kind, _, stream, payload) = tokio::time::timeout_at(deadline, read_frame(&mut tcp))
            .await
            .expect("the second stream is refused in time");
        if kind == RST_STREAM {
            assert_eq!(stream, 3, "only the second stream is reset");
            break u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
        }
    };
    assert_eq!(reset, REFUSED_STREAM);
    drop(tcp);
    h.running.shutdown().await.expect("shutdown");
}
