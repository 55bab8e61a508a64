//! Resizing through the server (issue 14): `spark.stoker.resize.*` validated at registration,
//! and an executor that ran out of memory replaced by a bigger one, with the driver told and
//! the size visible in GetApplication and the metrics. A recording backend plays the executors.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use stoker::config::Limits;
use stoker::proto::v1 as pb;
use stoker::proto::v1::executor_allocator_client::ExecutorAllocatorClient;
use stoker::server::{self, Running, Settings};
use stoker_core::{
    AppId, BackendObservation, EngineConfig, ExecutorBackend, ExecutorId, ExecutorSize, ExitReason,
    LaunchRequest, Millis, Observation, ObservationSink,
};
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tonic::Code;

mod common;

use common::warning_containing;

const DEADLINE: Duration = Duration::from_secs(10);

/// Records launches (with their size) and reports them running; `honours_size` as configured.
struct Recorder {
    sink: Mutex<Option<ObservationSink>>,
    launches: mpsc::UnboundedSender<(ExecutorId, ExecutorSize)>,
    honours_size: bool,
}

impl Recorder {
    fn emit(&self, app: &AppId, executor_id: ExecutorId, observation: Observation) {
        let sink = self.sink.lock().expect("sink").clone();
        if let Some(sink) = sink {
            sink(BackendObservation {
                app_id: app.clone(),
                executor_id,
                observation,
            });
        }
    }
}

struct Shared(Arc<Recorder>);

impl ExecutorBackend for Shared {
    fn name(&self) -> &'static str {
        "recorder"
    }

    fn honours_size(&self) -> bool {
        self.0.honours_size
    }

    fn launch(&self, request: LaunchRequest) {
        let _ = self.0.launches.send((request.executor_id, request.size));
        self.0.emit(
            &request.app_id,
            request.executor_id,
            Observation::Running {
                host: "127.0.0.1".into(),
                backend_name: format!("rec-{}", request.executor_id),
            },
        );
    }

    fn terminate(&self, app: &AppId, executor_id: ExecutorId, _grace: Millis) {
        self.0
            .emit(app, executor_id, exited(Some(143), ExitReason::Signaled));
    }
}

struct Harness {
    running: Running,
    backend: Arc<Recorder>,
    launches: mpsc::UnboundedReceiver<(ExecutorId, ExecutorSize)>,
    client: ExecutorAllocatorClient<Channel>,
}

impl Harness {
    /// Registers run `app` of the sizing key `nightly etl`; its token.
    async fn register_keyed(&mut self, app: &str) -> String {
        self.client
            .register_application(request(app, keyed()))
            .await
            .expect("registered")
            .into_inner()
            .token
    }

    /// Unregisters `app`, reporting `usage`; the notes for the driver.
    async fn unregister(
        &mut self,
        app: &str,
        token: String,
        usage: Vec<pb::ProfileUsage>,
    ) -> Vec<String> {
        self.client
            .unregister_application(pb::UnregisterApplicationRequest {
                app_id: app.into(),
                token,
                usage,
            })
            .await
            .expect("unregistered")
            .into_inner()
            .notes
    }
}

async fn start(honours_size: bool, max_executor_memory_mib: u64) -> Harness {
    start_with(
        honours_size,
        Limits {
            max_executor_memory_mib,
            ..Limits::default()
        },
    )
    .await
}

async fn start_with(honours_size: bool, limits: Limits) -> Harness {
    let (tx, launches) = mpsc::unbounded_channel();
    let backend = Arc::new(Recorder {
        sink: Mutex::new(None),
        launches: tx,
        honours_size,
    });
    let for_start = Arc::clone(&backend);
    let settings = Settings {
        listen: "127.0.0.1:0".parse().expect("addr"),
        metrics_listen: Some("127.0.0.1:0".parse().expect("addr")),
        engine: EngineConfig {
            max_failures: 2,
            ..EngineConfig::default()
        },
        limits,
        admin_token: "admin-token-for-tests-0123456789".into(),
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
        launches,
        client,
    }
}

fn request(app: &str, resize: Option<pb::ResizePolicy>) -> pb::RegisterApplicationRequest {
    pb::RegisterApplicationRequest {
        app_id: app.into(),
        app_name: "resize".into(),
        template: Some(pb::ExecutorTemplate {
            driver_url: "spark://CoarseGrainedScheduler@127.0.0.1:40000".into(),
            spark_version: "4.2.0".into(),
            profiles: vec![pb::ResourceProfile {
                id: 0,
                cores: 1,
                heap_mib: 512,
                overhead_mib: 384,
                ..Default::default()
            }],
            resize,
            ..Default::default()
        }),
        initial_targets: vec![pb::ProfileTarget {
            resource_profile_id: 0,
            total: 1,
        }],
        ..Default::default()
    }
}

fn policy(factor: f64, max_memory_mib: u64) -> Option<pb::ResizePolicy> {
    Some(pb::ResizePolicy {
        enabled: true,
        factor,
        max_memory_mib,
        sizing_key: String::new(),
    })
}

/// An executor's exit with no message.
fn exited(code: Option<i32>, reason: ExitReason) -> Observation {
    Observation::Exited {
        code,
        reason,
        message: String::new(),
    }
}

/// A server whose sizes across runs are kept in `dir`.
async fn start_remembering(dir: &tempfile::TempDir) -> Harness {
    start_with(
        true,
        Limits {
            sizes_file: Some(dir.path().join("sizes.tsv")),
            ..Limits::default()
        },
    )
    .await
}

/// Resizing ×1.5 with the sizing key `nightly etl`.
fn keyed() -> Option<pb::ResizePolicy> {
    Some(pb::ResizePolicy {
        sizing_key: "nightly etl".into(),
        ..policy(1.5, 0).expect("policy")
    })
}

async fn next_launch(
    launches: &mut mpsc::UnboundedReceiver<(ExecutorId, ExecutorSize)>,
) -> (u64, u64, u64) {
    let (id, size) = tokio::time::timeout(DEADLINE, launches.recv())
        .await
        .expect("a launch in time")
        .expect("backend open");
    (id.get(), size.heap_mib, size.overhead_mib)
}

/// Application events (warnings) until one contains `needle`.
#[tokio::test]
async fn bad_resize_settings_are_refused_naming_the_key() {
    let mut h = start(true, 64 * 1024).await;
    for (resize, key) in [
        (policy(1.0, 0), "spark.stoker.resize.factor"),
        (policy(0.5, 0), "spark.stoker.resize.factor"),
        (policy(f64::NAN, 0), "spark.stoker.resize.factor"),
        (policy(1.5, 512), "spark.stoker.resize.maxMemory"),
        (policy(11.0, 0), "spark.stoker.resize.factor"),
        (
            Some(pb::ResizePolicy {
                sizing_key: "nightly\netl".into(),
                ..policy(1.5, 0).expect("policy")
            }),
            "spark.stoker.sizing.key",
        ),
    ] {
        let status = h
            .client
            .register_application(request("bad-resize", resize))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
        assert!(status.message().contains(key), "{}", status.message());
    }
    // Nothing was registered: a valid request takes the id.
    h.client
        .register_application(request("bad-resize", policy(1.5, 0)))
        .await
        .expect("valid settings register");
    h.running.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn jvm_out_of_memory_replaces_the_executor_with_a_bigger_heap() {
    let mut h = start(true, 64 * 1024).await;
    let response = h
        .client
        .register_application(request("grows", policy(1.5, 0)))
        .await
        .expect("registered")
        .into_inner();
    let mut stream = h
        .client
        .watch_executors(pb::WatchExecutorsRequest {
            app_id: "grows".into(),
            token: response.token.clone(),
            after_seq: 0,
        })
        .await
        .expect("watch")
        .into_inner();
    assert_eq!(next_launch(&mut h.launches).await, (1, 512, 384));
    let app = AppId::parse("grows").expect("app id");
    h.backend.emit(
        &app,
        ExecutorId::new(1),
        exited(Some(52), ExitReason::Error),
    );
    // 896 MiB × 1.5 = 1344 MiB, shared by heap and overhead in proportion.
    assert_eq!(next_launch(&mut h.launches).await, (2, 768, 576));
    let message = warning_containing(&mut stream, "now starts executors").await;
    assert_eq!(
        message,
        "profile 0 now starts executors with 768 MiB heap + 576 MiB overhead after executor 1 \
         ran out of heap (OutOfMemoryError, exit code 52)"
    );
    let info = h
        .client
        .get_application(pb::GetApplicationRequest {
            app_id: "grows".into(),
            token: response.token,
        })
        .await
        .expect("info")
        .into_inner();
    assert_eq!(info.failures, 0, "the resized failure is not counted");
    assert_eq!(info.resizes, 1);
    assert_eq!(
        info.sizes,
        vec![pb::ProfileSize {
            resource_profile_id: 0,
            heap_mib: 768,
            overhead_mib: 576,
        }]
    );
    let executor = info
        .executors
        .iter()
        .find(|e| e.executor_id == "2")
        .expect("executor 2 listed");
    assert_eq!((executor.heap_mib, executor.overhead_mib), (768, 576));
    // `stoker executors` shows it, and the metrics count it.
    let table = stoker::cli::executors_table(&info);
    assert!(table.contains("768m heap + 576m overhead"), "{table}");
    assert!(
        table.contains("profile 0: new executors get 768m heap + 576m overhead (1 resize(s)"),
        "{table}"
    );
    let metrics = h.running.apps.metrics.encode();
    assert!(
        metrics.contains("stoker_executor_resizes_total{cause=\"heap\"} 1"),
        "{metrics}"
    );
    h.running.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn the_servers_ceiling_bounds_the_applications() {
    // The application asks for up to 4 GiB; the server allows 1000 MiB per executor.
    let mut h = start(true, 1_000).await;
    h.client
        .register_application(request("capped", policy(2.0, 4_096)))
        .await
        .expect("registered");
    assert_eq!(next_launch(&mut h.launches).await, (1, 512, 384));
    let app = AppId::parse("capped").expect("app id");
    h.backend.emit(
        &app,
        ExecutorId::new(1),
        exited(Some(137), ExitReason::OomKilled),
    );
    assert_eq!(next_launch(&mut h.launches).await, (2, 512, 488));
    h.running.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_backend_that_ignores_sizes_keeps_them_and_says_so() {
    let mut h = start(false, 64 * 1024).await;
    let response = h
        .client
        .register_application(request("fixed", policy(1.5, 0)))
        .await
        .expect("registered")
        .into_inner();
    let mut stream = h
        .client
        .watch_executors(pb::WatchExecutorsRequest {
            app_id: "fixed".into(),
            token: response.token,
            after_seq: 0,
        })
        .await
        .expect("watch")
        .into_inner();
    let warning = warning_containing(&mut stream, "spark.stoker.resize.enabled").await;
    assert!(warning.contains("recorder backend"), "{warning}");
    assert_eq!(next_launch(&mut h.launches).await, (1, 512, 384));
    let app = AppId::parse("fixed").expect("app id");
    h.backend.emit(
        &app,
        ExecutorId::new(1),
        exited(Some(137), ExitReason::OomKilled),
    );
    assert_eq!(next_launch(&mut h.launches).await, (2, 512, 384));
    h.running.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn the_next_run_of_a_sizing_key_starts_at_the_size_the_last_one_ended_with() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut h = start_remembering(&dir).await;
    let first = h.register_keyed("run-1").await;
    assert_eq!(next_launch(&mut h.launches).await, (1, 512, 384));
    let app = AppId::parse("run-1").expect("app id");
    h.backend.emit(
        &app,
        ExecutorId::new(1),
        exited(Some(137), ExitReason::OomKilled),
    );
    assert_eq!(next_launch(&mut h.launches).await, (2, 512, 832));
    h.unregister("run-1", first, Vec::new()).await;

    let second = h.register_keyed("run-2").await;
    assert_eq!(
        next_launch(&mut h.launches).await,
        (1, 512, 832),
        "the second run starts at the grown size"
    );
    let mut stream = h
        .client
        .watch_executors(pb::WatchExecutorsRequest {
            app_id: "run-2".into(),
            token: second,
            after_seq: 0,
        })
        .await
        .expect("watch")
        .into_inner();
    let told = warning_containing(&mut stream, "earlier run").await;
    assert!(told.contains("\"nightly etl\""), "{told}");
    h.running.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_run_that_used_far_less_steps_the_remembered_size_down_one_notch() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut h = start_remembering(&dir).await;
    const MIB: u64 = 1 << 20;
    let small = |executors| {
        vec![pb::ProfileUsage {
            resource_profile_id: 0,
            peak_heap_bytes: 200 * MIB,
            peak_rss_bytes: 0,
            executors,
            executors_measured: executors,
        }]
    };

    // Run 1 runs out of heap and grows; it needed the grown size, so it keeps it whatever it
    // reports.
    let first = h.register_keyed("run-1").await;
    assert_eq!(next_launch(&mut h.launches).await, (1, 512, 384));
    let app = AppId::parse("run-1").expect("app id");
    h.backend.emit(
        &app,
        ExecutorId::new(1),
        exited(Some(52), ExitReason::Error),
    );
    assert_eq!(next_launch(&mut h.launches).await, (2, 768, 576));
    let notes = h.unregister("run-1", first, small(2)).await;
    assert!(notes.is_empty(), "{notes:?}");

    // Run 2 starts at the grown size. A usage report that does not add up is refused by name
    // and changes nothing; the right one steps the heap down one notch.
    let second = h.register_keyed("run-2").await;
    assert_eq!(next_launch(&mut h.launches).await, (1, 768, 576));
    let mut wrong = small(1);
    wrong[0].executors_measured = 2;
    let refused = h
        .client
        .unregister_application(pb::UnregisterApplicationRequest {
            app_id: "run-2".into(),
            token: second.clone(),
            usage: wrong,
        })
        .await
        .expect_err("more executors measured than ran");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().contains("usage[0].executors_measured"),
        "{}",
        refused.message()
    );
    h.client
        .heartbeat(pb::HeartbeatRequest {
            app_id: "run-2".into(),
            token: second.clone(),
            acked_seq: 0,
        })
        .await
        .expect("still registered");
    let notes = h.unregister("run-2", second, small(1)).await;
    assert_eq!(
        notes,
        [
            "profile 0's size steps down from 768 MiB heap + 576 MiB overhead to 512 MiB heap + \
          576 MiB overhead for the next run of spark.stoker.sizing.key \"nightly etl\": its \
          executors used at most 200 MiB of heap"
        ]
    );

    // Run 3 starts one notch smaller: the heap is back at its configured size; the overhead
    // stays (no resident memory was measured).
    let third = h.register_keyed("run-3").await;
    assert_eq!(next_launch(&mut h.launches).await, (1, 512, 576));
    // Without a usage report nothing steps down.
    let notes = h.unregister("run-3", third, Vec::new()).await;
    assert!(notes.is_empty(), "{notes:?}");
    h.running.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_size_the_backend_refused_is_not_tried_again_by_the_next_run_of_the_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut h = start_remembering(&dir).await;

    // Run 1: OOM-killed, grown to 512 + 832 MiB, and that size refused (a LimitRange): back to
    // the configured size.
    let first = h.register_keyed("run-1").await;
    let app = AppId::parse("run-1").expect("app id");
    assert_eq!(next_launch(&mut h.launches).await, (1, 512, 384));
    h.backend.emit(
        &app,
        ExecutorId::new(1),
        exited(Some(137), ExitReason::OomKilled),
    );
    assert_eq!(next_launch(&mut h.launches).await, (2, 512, 832));
    h.backend.emit(
        &app,
        ExecutorId::new(2),
        exited(None, ExitReason::StartFailed),
    );
    assert_eq!(next_launch(&mut h.launches).await, (3, 512, 384));
    h.unregister("run-1", first, Vec::new()).await;

    // Run 2 is told, and its OOM kill grows nothing: the replacement has the same size and the
    // failure counts.
    let second = h.register_keyed("run-2").await;
    let mut stream = h
        .client
        .watch_executors(pb::WatchExecutorsRequest {
            app_id: "run-2".into(),
            token: second,
            after_seq: 0,
        })
        .await
        .expect("watch")
        .into_inner();
    let told = warning_containing(&mut stream, "grows no further").await;
    assert_eq!(
        told,
        "profile 0 grows no further than below 1344 MiB per executor: an earlier run of \
         spark.stoker.sizing.key \"nightly etl\" could not start an executor of that size (a \
         LimitRange or an admission policy may cap executor memory in this namespace; tried \
         again 7 days after)"
    );
    let app = AppId::parse("run-2").expect("app id");
    assert_eq!(next_launch(&mut h.launches).await, (1, 512, 384));
    h.backend.emit(
        &app,
        ExecutorId::new(1),
        exited(Some(137), ExitReason::OomKilled),
    );
    assert_eq!(next_launch(&mut h.launches).await, (2, 512, 384));
    let counted = warning_containing(&mut stream, "cannot grow past").await;
    assert!(counted.contains("896 MiB per executor"), "{counted}");
    h.running.shutdown().await.expect("shutdown");
}
