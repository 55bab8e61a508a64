//! Fair share across applications (`stoker serve --queues`), over loopback gRPC with a backend
//! whose executors run at once: admitted counts reach the backend (no creation beyond them), the
//! driver hears the admission once per change, registration picks or refuses a queue, a bad
//! reload keeps the last good file and is counted, and without `--queues` nothing changes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use stoker::config::Limits;
use stoker::proto::v1 as pb;
use stoker::proto::v1::executor_allocator_client::ExecutorAllocatorClient;
use stoker::queues::QueueSettings;
use stoker::server::{self, Running, Settings};
use stoker_core::{EngineConfig, ExecutorBackend};
use tonic::transport::Channel;
use tonic::Code;

mod common;

use common::{template, FakeBackend, Shared};

const ADMIN: &str = "admin-token-for-tests-0123456789";

struct Harness {
    running: Running,
    backend: Arc<FakeBackend>,
    client: ExecutorAllocatorClient<Channel>,
    _dir: tempfile::TempDir,
}

const FOUR_EXECUTORS: &str = r#"
default_queue = "default"

[capacity]
executors = 4

[[queues]]
name = "default"
allow = ["*"]

[[queues]]
name = "etl"
allow = ["system:serviceaccount:etl:*"]
"#;

fn engine_config() -> EngineConfig {
    EngineConfig {
        lease_ttl: 60_000,
        ..EngineConfig::default()
    }
}

fn settings(queues: Option<QueueSettings>, engine: EngineConfig) -> Settings {
    Settings {
        listen: "127.0.0.1:0".parse().expect("addr"),
        metrics_listen: Some("127.0.0.1:0".parse().expect("addr")),
        engine,
        limits: Limits::default(),
        admin_token: ADMIN.into(),
        incarnation: "test".into(),
        tls: None,
        namespace_selector: None,
        queues,
    }
}

fn queue_settings(path: &Path, reload_interval: Duration) -> QueueSettings {
    QueueSettings {
        path: path.to_owned(),
        reload_interval,
        debounce: Duration::from_millis(20),
    }
}

/// A server with `file` as its queue file (`None`: no `--queues`).
async fn start(file: Option<&str>, reload_interval: Duration) -> Harness {
    start_with(file, reload_interval, engine_config()).await
}

/// As [`start`], with an engine policy.
async fn start_with(
    file: Option<&str>,
    reload_interval: Duration,
    engine: EngineConfig,
) -> Harness {
    let dir = tempfile::tempdir().expect("temp dir");
    let queues = file.map(|text| {
        let path = dir.path().join("queues.toml");
        std::fs::write(&path, text).expect("write queue file");
        queue_settings(&path, reload_interval)
    });
    let backend = Arc::new(FakeBackend::default());
    let for_start = Arc::clone(&backend);
    let running = server::start(settings(queues, engine), move |sink| {
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
        _dir: dir,
    }
}

fn registration(app: &str, total: i64) -> pb::RegisterApplicationRequest {
    pb::RegisterApplicationRequest {
        app_id: app.into(),
        app_name: "test".into(),
        template: Some(template()),
        initial_targets: vec![pb::ProfileTarget {
            resource_profile_id: 0,
            total,
        }],
        ..Default::default()
    }
}

async fn register(h: &mut Harness, request: pb::RegisterApplicationRequest) -> String {
    h.client
        .register_application(request)
        .await
        .expect("register")
        .into_inner()
        .token
}

async fn info(h: &mut Harness, app: &str) -> pb::ApplicationInfo {
    h.client
        .get_application(pb::GetApplicationRequest {
            app_id: app.into(),
            token: ADMIN.into(),
        })
        .await
        .expect("get application")
        .into_inner()
}

async fn watch(h: &mut Harness, app: &str, token: &str) -> tonic::Streaming<pb::WatchEvent> {
    h.client
        .watch_executors(pb::WatchExecutorsRequest {
            app_id: app.into(),
            token: token.into(),
            after_seq: 0,
        })
        .await
        .expect("watch")
        .into_inner()
}

/// The next application WARNING on the stream (10 s at most).
async fn next_warning(stream: &mut tonic::Streaming<pb::WatchEvent>) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let event = tokio::time::timeout_at(deadline, stream.message())
            .await
            .expect("a warning in time")
            .expect("stream ok")
            .expect("stream open");
        if let Some(pb::watch_event::Kind::Application(app)) = event.kind {
            return app.message;
        }
    }
}

/// The next event on the stream that `pick` takes (10 s at most).
async fn next_event<T>(
    stream: &mut tonic::Streaming<pb::WatchEvent>,
    mut pick: impl FnMut(pb::watch_event::Kind) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let event = tokio::time::timeout_at(deadline, stream.message())
            .await
            .expect("the event in time")
            .expect("stream ok")
            .expect("stream open");
        if let Some(found) = event.kind.and_then(&mut pick) {
            return found;
        }
    }
}

async fn metrics_text(h: &Harness) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = h.running.metrics_addr.expect("metrics");
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut body = String::new();
    stream.read_to_string(&mut body).await.expect("read");
    body
}

fn metric(text: &str, series: &str) -> Option<i64> {
    let prefix = format!("{series} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|value| value.trim().parse().ok())
}

async fn queues(h: &mut Harness) -> pb::ListQueuesResponse {
    h.client
        .list_queues(pb::ListQueuesRequest {
            admin_token: ADMIN.into(),
        })
        .await
        .expect("list queues")
        .into_inner()
}

#[tokio::test]
async fn two_applications_share_the_capacity_and_hear_of_it_once_per_change() {
    let mut h = start(Some(FOUR_EXECUTORS), Duration::from_secs(3600)).await;

    // A alone asks for 10 of a capacity of 4: 4 are admitted and created, no more.
    let token_a = register(&mut h, registration("app-a", 10)).await;
    let mut events_a = watch(&mut h, "app-a", &token_a).await;
    assert_eq!(
        next_warning(&mut events_a).await,
        "admitted 4 of 10 executors (queue default, fair share 4)"
    );
    h.backend.wait_launched("app-a", 4).await;
    let a = info(&mut h, "app-a").await;
    assert_eq!((a.admitted, a.queue.as_deref()), (Some(4), Some("default")));
    assert_eq!(
        h.backend.launched("app-a"),
        4,
        "no creation beyond admitted"
    );

    // B arrives with minExecutors 2 and asks for 3: the capacity is shared, 2 and 2.
    let mut request = registration("app-b", 3);
    request.min_executors = 2;
    let token_b = register(&mut h, request).await;
    assert_eq!(
        next_warning(&mut events_a).await,
        "admitted 2 of 10 executors (queue default, fair share 2)"
    );
    h.backend.wait_launched("app-b", 2).await;
    let b = info(&mut h, "app-b").await;
    assert_eq!(b.admitted, Some(2));
    assert_eq!(
        h.backend.launched("app-b"),
        2,
        "no creation beyond admitted"
    );
    assert_eq!(
        h.backend.launched("app-a"),
        4,
        "A's running executors are kept (the driver gives them back), none created"
    );

    // A's driver gives back two executors: they are not replaced (A is admitted 2).
    let killed = h
        .client
        .kill_executors(pb::KillExecutorsRequest {
            app_id: "app-a".into(),
            token: token_a.clone(),
            executor_ids: vec!["3".into(), "4".into()],
            adjust_target: false,
        })
        .await
        .expect("kill")
        .into_inner()
        .killed;
    assert_eq!(killed, ["3", "4"]);

    // B leaves: A is admitted 4 again and its next warning says so, with nothing repeated in
    // between (each change is told once, however many allocations ran).
    h.client
        .unregister_application(pb::UnregisterApplicationRequest {
            app_id: "app-b".into(),
            token: token_b,
            ..Default::default()
        })
        .await
        .expect("unregister");
    assert_eq!(
        next_warning(&mut events_a).await,
        "admitted 4 of 10 executors (queue default, fair share 4)"
    );
    h.backend.wait_launched("app-a", 6).await;
    assert_eq!(info(&mut h, "app-a").await.running, 4);

    // The queue table and the per-queue gauges.
    let listed = queues(&mut h).await;
    assert!(listed.enabled);
    assert_eq!(listed.capacity, "4 executors");
    let default = listed
        .queues
        .iter()
        .find(|q| q.name == "default")
        .expect("default queue listed");
    assert_eq!(
        (default.admitted, default.requested, default.applications),
        (4, 10, 1)
    );
    let text = metrics_text(&h).await;
    assert_eq!(
        metric(&text, "stoker_queue_admitted{queue=\"default\"}"),
        Some(4)
    );
    assert_eq!(
        metric(&text, "stoker_queue_requested{queue=\"default\"}"),
        Some(10)
    );
    let table = stoker::cli::queues_table(&listed);
    assert!(table.starts_with("QUEUE"), "{table}");
    assert!(table.contains("capacity: 4 executors"), "{table}");
    h.running.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn an_application_over_its_share_is_asked_to_give_back_and_the_rest_is_removed_at_the_deadline(
) {
    let engine = EngineConfig {
        reclaim_timeout: 1_500,
        ..engine_config()
    };
    let mut h = start_with(Some(FOUR_EXECUTORS), Duration::from_secs(3600), engine).await;
    let token_a = register(&mut h, registration("app-a", 10)).await;
    let mut events_a = watch(&mut h, "app-a", &token_a).await;
    h.backend.wait_launched("app-a", 4).await;

    // B arrives: A is admitted 2 of the 4 it runs, and asked once to give 2 back.
    let mut request = registration("app-b", 3);
    request.min_executors = 2;
    let token_b = register(&mut h, request).await;
    let reclaim = next_event(&mut events_a, |kind| match kind {
        pb::watch_event::Kind::Reclaim(r) => Some(r),
        _ => None,
    })
    .await;
    assert_eq!(
        (
            reclaim.resource_profile_id,
            reclaim.count,
            reclaim.timeout_ms,
            reclaim.reason.as_str()
        ),
        (0, 2, 1_500, "over its fair share in queue default")
    );
    assert!(reclaim.deadline_unix_ms > 0);
    h.backend.wait_launched("app-b", 2).await;

    // The driver decommissions one executor (the idle one it chose), not the second.
    let decommissioning = h
        .client
        .decommission_executors(pb::DecommissionExecutorsRequest {
            app_id: "app-a".into(),
            token: token_a.clone(),
            executor_ids: vec!["1".into()],
            adjust_target: false,
        })
        .await
        .expect("decommission")
        .into_inner()
        .decommissioning;
    assert_eq!(decommissioning, ["1"]);

    // Past the deadline stoker removes the newest executor still over the share, says so, and
    // reports its exit as RECLAIMED; no second reclaim request came in between.
    let warning = next_event(&mut events_a, |kind| match kind {
        pb::watch_event::Kind::Reclaim(r) => panic!("asked again: {r:?}"),
        pb::watch_event::Kind::Application(app) => Some(app.message),
        pb::watch_event::Kind::Executor(_) => None,
    })
    .await;
    assert_eq!(
        warning,
        "removing executor 4 of resource profile 0: not given back by the reclaim deadline \
         (over its fair share in queue default)"
    );
    let exit = next_event(&mut events_a, |kind| match kind {
        pb::watch_event::Kind::Executor(ev) if ev.state == pb::ExecutorState::Exited as i32 => {
            Some(ev)
        }
        _ => None,
    })
    .await;
    assert_eq!(
        (exit.executor_id.as_str(), exit.reason, exit.caused_by_app),
        ("4", pb::ExitReason::Reclaimed as i32, false)
    );
    let a = info(&mut h, "app-a").await;
    assert_eq!(a.admitted, Some(2));
    assert_eq!(
        h.backend.launched("app-a"),
        4,
        "nothing replaced what was given back or reclaimed"
    );
    drop(token_b);
    h.running.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn an_unknown_or_forbidden_queue_is_refused_naming_it_and_nothing_is_registered() {
    let mut h = start(Some(FOUR_EXECUTORS), Duration::from_secs(3600)).await;

    let mut request = registration("app-a", 2);
    request.queue = "nightly".into();
    let status = h
        .client
        .register_application(request)
        .await
        .expect_err("unknown queue refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("\"nightly\""), "{status:?}");

    // etl is only for etl's ServiceAccounts; this driver is not authenticated.
    let mut request = registration("app-a", 2);
    request.queue = "etl".into();
    let status = h
        .client
        .register_application(request)
        .await
        .expect_err("forbidden queue refused");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("\"etl\""), "{status:?}");

    let listed = h
        .client
        .list_applications(pb::ListApplicationsRequest {
            admin_token: ADMIN.into(),
        })
        .await
        .expect("list")
        .into_inner();
    assert!(listed.applications.is_empty(), "nothing registered");
    assert_eq!(h.backend.launched("app-a"), 0);

    // The default queue, asked for by name, is open to everyone.
    let mut request = registration("app-a", 2);
    request.queue = "default".into();
    register(&mut h, request).await;
    h.backend.wait_launched("app-a", 2).await;
    h.running.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_bad_queue_file_at_start_stops_the_server_naming_the_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("queues.toml");
    std::fs::write(
        &path,
        "[capacity]\nexecutors = 4\n\n[[queues]]\nname = \"default\"\nweight = -1\n",
    )
    .expect("write");
    let result = server::start(
        settings(
            Some(queue_settings(&path, Duration::from_secs(1))),
            engine_config(),
        ),
        |_sink| Ok(Arc::new(Shared(Arc::new(FakeBackend::default()))) as Arc<dyn ExecutorBackend>),
    )
    .await;
    let Err(err) = result else {
        panic!("a bad queue file must stop the start");
    };
    let message = format!("{err:#}");
    assert!(message.contains("--queues"), "{message}");
    assert!(message.contains("line 6"), "{message}");
    assert!(message.contains("queues[0].weight"), "{message}");
}

#[tokio::test]
async fn a_bad_reload_keeps_the_last_good_configuration_and_is_counted() {
    let mut h = start(Some(FOUR_EXECUTORS), Duration::from_secs(3600)).await;
    let queues = Arc::clone(h.running.apps.queues.as_ref().expect("queues on"));
    let path: PathBuf = h._dir.path().join("queues.toml");

    std::fs::write(
        &path,
        "[capacity]\nexecutors = 8\n\n[[queues]]\nname = \"default\"\nweight = 0\n",
    )
    .expect("write");
    let err = queues.reload().expect_err("refused");
    assert!(err.to_string().contains("line 6"), "{err}");
    // The same bad content read again is not counted again.
    assert!(!queues.reload().expect("unchanged"));

    let listed = self::queues(&mut h).await;
    assert_eq!(listed.capacity, "4 executors", "the last good file stays");
    assert!(listed.config_error.contains("line 6"), "{listed:?}");
    let text = metrics_text(&h).await;
    assert_eq!(metric(&text, "stoker_queue_config_errors_total"), Some(1));
    assert_eq!(
        metric(&text, "stoker_queue_config_last_reload_success"),
        Some(0)
    );

    // Applications are still admitted by the configuration in force.
    register(&mut h, registration("app-a", 10)).await;
    h.backend.wait_launched("app-a", 4).await;
    assert_eq!(info(&mut h, "app-a").await.admitted, Some(4));

    // A good file again: taken, and the running application is admitted more.
    std::fs::write(
        &path,
        FOUR_EXECUTORS.replace("executors = 4", "executors = 6"),
    )
    .expect("write");
    assert!(queues.reload().expect("taken"));
    h.backend.wait_launched("app-a", 6).await;
    let text = metrics_text(&h).await;
    assert_eq!(
        metric(&text, "stoker_queue_config_last_reload_success"),
        Some(1)
    );
    assert!(self::queues(&mut h).await.config_error.is_empty());
    h.running.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_configmap_style_symlink_swap_is_picked_up_by_the_reload_loop() {
    // Kubernetes mounts ConfigMap keys as symlinks through `..data`, swapped on update: the
    // file's own modification time never changes, its content does.
    let dir = tempfile::tempdir().expect("temp dir");
    let first = dir.path().join("..2024_01");
    let second = dir.path().join("..2024_02");
    std::fs::create_dir(&first).expect("mkdir");
    std::fs::create_dir(&second).expect("mkdir");
    std::fs::write(first.join("queues.toml"), FOUR_EXECUTORS).expect("write");
    std::fs::write(
        second.join("queues.toml"),
        FOUR_EXECUTORS.replace("executors = 4", "executors = 2"),
    )
    .expect("write");
    std::os::unix::fs::symlink("..2024_01", dir.path().join("..data")).expect("link");
    let path = dir.path().join("queues.toml");
    std::os::unix::fs::symlink("..data/queues.toml", &path).expect("link");

    let running = server::start(
        settings(
            Some(queue_settings(&path, Duration::from_millis(20))),
            engine_config(),
        ),
        |_sink| Ok(Arc::new(Shared(Arc::new(FakeBackend::default()))) as Arc<dyn ExecutorBackend>),
    )
    .await
    .expect("server starts");
    let queues = Arc::clone(running.apps.queues.as_ref().expect("queues on"));
    let mut config = queues.watch_config();
    assert_eq!(config.borrow().capacity().executors, Some(4));

    let swap = dir.path().join("..data.tmp");
    std::os::unix::fs::symlink("..2024_02", &swap).expect("link");
    std::fs::rename(&swap, dir.path().join("..data")).expect("swap");
    tokio::time::timeout(
        Duration::from_secs(10),
        config.wait_for(|c| c.capacity().executors == Some(2)),
    )
    .await
    .expect("reloaded in time")
    .expect("queues alive");
    running.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn without_queues_nothing_changes() {
    let mut h = start(None, Duration::from_secs(3600)).await;
    // A queue asked for is ignored: there are none.
    let mut request = registration("app-a", 10);
    request.queue = "nightly".into();
    request.min_executors = 3;
    register(&mut h, request).await;
    h.backend.wait_launched("app-a", 10).await;
    let a = info(&mut h, "app-a").await;
    assert_eq!((a.admitted, a.queue), (None, None));
    assert!(!queues(&mut h).await.enabled);
    let text = metrics_text(&h).await;
    assert!(!text.contains("stoker_queue_admitted{"), "{text}");
    assert!(h.running.apps.queues.is_none());
    h.running.shutdown().await.expect("shutdown");
}
