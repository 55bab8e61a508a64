//! What the loopback server tests share: a backend that plays the executors (no JVM).
// Each test crate uses part of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stoker::proto::v1 as pb;
use stoker_core::{
    AppId, BackendObservation, ExecutorBackend, ExecutorId, ExitReason, LaunchRequest, Millis,
    Observation, ObservationSink,
};
use tokio::sync::watch;

/// A driver's template: one profile of 1 core, 512 MiB heap, 384 MiB overhead.
pub fn template() -> pb::ExecutorTemplate {
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

/// Executors that "run" at once and exit when terminated; launches are counted per
/// application.
pub struct FakeBackend {
    pub sink: Mutex<Option<ObservationSink>>,
    launched: watch::Sender<BTreeMap<String, usize>>,
    alive: Mutex<BTreeMap<(AppId, ExecutorId), ()>>,
}

impl Default for FakeBackend {
    fn default() -> Self {
        Self {
            sink: Mutex::new(None),
            launched: watch::channel(BTreeMap::new()).0,
            alive: Mutex::new(BTreeMap::new()),
        }
    }
}

impl FakeBackend {
    pub fn emit(&self, app_id: &AppId, executor_id: ExecutorId, observation: Observation) {
        let sink = self.sink.lock().expect("sink").clone();
        if let Some(sink) = sink {
            sink(BackendObservation {
                app_id: app_id.clone(),
                executor_id,
                observation,
            });
        }
    }

    /// Executors of `app` running now.
    pub fn alive(&self, app: &str) -> usize {
        self.alive
            .lock()
            .expect("alive")
            .keys()
            .filter(|(a, _)| a.as_str() == app)
            .count()
    }

    /// Executor `id` of `app` exits with `code` on its own.
    pub fn crash(&self, app: &str, id: u64, code: i32) {
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

    /// Launches of `app` so far.
    pub fn launched(&self, app: &str) -> usize {
        self.launched.borrow().get(app).copied().unwrap_or(0)
    }

    /// Waits until `app` has had `n` launches in all (10 s at most).
    pub async fn wait_launched(&self, app: &str, n: usize) {
        let mut rx = self.launched.subscribe();
        tokio::time::timeout(
            Duration::from_secs(10),
            rx.wait_for(|m| m.get(app).copied().unwrap_or(0) >= n),
        )
        .await
        .unwrap_or_else(|_| panic!("{app}: {n} launches in time"))
        .expect("backend alive");
    }
}

/// The [`ExecutorBackend`] the server gets; the test keeps the `Arc` to look inside.
pub struct Shared(pub Arc<FakeBackend>);

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
        self.0.launched.send_modify(|m| {
            *m.entry(request.app_id.to_string()).or_default() += 1;
        });
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

/// The next application warning on `stream` that contains `needle` (10 s at most).
pub async fn warning_containing(
    stream: &mut tonic::Streaming<pb::WatchEvent>,
    needle: &str,
) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let event = tokio::time::timeout_at(deadline, stream.message())
            .await
            .unwrap_or_else(|_| panic!("no warning containing {needle:?} in time"))
            .expect("stream ok")
            .expect("stream open");
        if let Some(pb::watch_event::Kind::Application(app)) = event.kind {
            if app.message.contains(needle) {
                return app.message;
            }
        }
    }
}
