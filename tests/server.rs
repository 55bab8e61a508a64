//! Server tests over a real loopback gRPC connection, with a recording backend that plays the
//! part of the executors (no JVM): every RPC, validation with its status codes and no change of
//! state, isolation between applications, lease expiry, and event resume.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stoker::config::Limits;
use stoker::proto::v1 as pb;
use stoker::proto::v1::executor_allocator_client::ExecutorAllocatorClient;
use stoker::server::{self, Running, Settings};
use stoker_core::{
    AppId, BackendObservation, EngineConfig, ExecutorBackend, ExecutorId, ExitReason,
    LaunchRequest, Millis, Observation, ObservationSink,
};
use tonic::transport::Channel;
use tonic::Code;

const ADMIN: &str = "admin-token-for-tests-0123456789";

/// Executors that "run" at once and exit when terminated.
#[derive(Default)]
struct FakeBackend {
    sink: Mutex<Option<ObservationSink>>,
    alive: Mutex<HashMap<(AppId, ExecutorId), ()>>,
}

impl FakeBackend {
    fn emit(&self, app_id: &AppId, executor_id: ExecutorId, observation: Observation) {
        let sink = self.sink.lock().expect("sink").clone();
        if let Some(sink) = sink {
            sink(BackendObservation {
                app_id: app_id.clone(),
                executor_id,
                observation,
            });
        }
    }

    fn alive(&self, app: &str) -> usize {
        self.alive
            .lock()
            .expect("alive")
            .keys()
            .filter(|(a, _)| a.as_str() == app)
            .count()
    }

    fn crash(&self, app: &str, id: u64, code: i32) {
        let app_id = AppId::parse(app).expect("app id");
        let executor_id = ExecutorId::new(id);
        self.alive
            .lock()
            .expect("alive")
            .remove(&(app_id.clone(), executor_id));
        self.emit(
            &app_id,
            executor_id,
            Observation::Exited {
                code: Some(code),
                reason: ExitReason::Error,
                message: String::new(),
            },
        );
    }
}

struct Shared(Arc<FakeBackend>);

impl ExecutorBackend for Shared {
    fn name(&self) -> &'static str {
        "fake"
    }

    fn launch(&self, request: LaunchRequest) {
        self.0
            .alive
            .lock()
            .expect("alive")
            .insert((request.app_id.clone(), request.executor_id), ());
        self.0.emit(
            &request.app_id,
            request.executor_id,
            Observation::Running {
                host: "127.0.0.1".into(),
                backend_name: format!("fake-{}", request.executor_id),
            },
        );
    }

    fn terminate(&self, app_id: &AppId, executor_id: ExecutorId, _grace: Millis) {
        let removed = self
            .0
            .alive
            .lock()
            .expect("alive")
            .remove(&(app_id.clone(), executor_id));
        if removed.is_some() {
            self.0.emit(
                app_id,
                executor_id,
                Observation::Exited {
                    code: Some(143),
                    reason: ExitReason::Signaled,
                    message: String::new(),
                },
            );
        }
    }
}

struct Harness {
    running: Running,
    backend: Arc<FakeBackend>,
    client: ExecutorAllocatorClient<Channel>,
}

async fn start(lease_ttl: Millis) -> Harness {
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
        limits: Limits {
            max_applications: 3,
            max_executors_per_profile: 50,
            max_string_bytes: 256,
            max_entries: 8,
            ..Limits::default()
        },
        admin_token: ADMIN.into(),
        incarnation: "test-incarnation".into(),
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

fn template() -> pb::ExecutorTemplate {
    pb::ExecutorTemplate {
        driver_url: "spark://CoarseGrainedScheduler@127.0.0.1:40000".into(),
        spark_version: "4.2.0".into(),
        spark_user: "tester".into(),
        profiles: vec![pb::ResourceProfile {
            id: 0,
            cores: 1,
            heap_mib: 512,
            overhead_mib: 384,
            ..Default::default()
        }],
        ..Default::default()
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
    assert_eq!(status.code(), Code::ResourceExhausted);
    set_total(&mut h.client, "app-1", &token, 2).await;
    let backend = Arc::clone(&h.backend);
    wait_for(|| backend.alive("app-1") == 2).await;
    let removed = h
        .client
        .unregister_application(pb::UnregisterApplicationRequest {
            app_id: "app-1".into(),
            token: token.clone(),
        })
        .await
        .expect("unregister")
        .into_inner();
    assert_eq!(removed.removed_executors, 2);
    wait_for(|| backend.alive("app-1") == 0).await;
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
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
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
    h.running.shutdown().await.expect("shutdown");
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
