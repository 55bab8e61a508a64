//! Applications bound to the identity that registered them (`--auth kubernetes`), over loopback
//! gRPC with an authenticator that stands in for the API server's TokenReview and
//! SubjectAccessReview (the real ones are exercised on the test bed, tests/e2e/test_identity.py).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stoker::auth::Authenticator;
use stoker::config::Limits;
use stoker::error::ApiError;
use stoker::proto::v1 as pb;
use stoker::proto::v1::executor_allocator_client::ExecutorAllocatorClient;
use stoker::queues::QueueSettings;
use stoker::server::{self, Running, Settings};
use stoker_core::{
    AppId, DriverIdentity, EngineConfig, ExecutorBackend, ExecutorId, LaunchRequest, Millis,
};
use tonic::transport::Channel;
use tonic::{Code, Request};

mod common;

use common::{template, warning_containing};

/// Bearer "alice" is system:serviceaccount:team-a:spark, "bob" is team-b's; anything else is
/// refused. Alice may also create pods in "shared".
struct FakeKubernetes;

fn identity(namespace: &str) -> DriverIdentity {
    DriverIdentity {
        username: format!("system:serviceaccount:{namespace}:spark"),
        uid: format!("uid-{namespace}"),
        groups: vec!["system:serviceaccounts".into()],
        pod_name: None,
        pod_uid: None,
    }
}

#[tonic::async_trait]
impl Authenticator for FakeKubernetes {
    async fn identify(&self, bearer: Option<&str>) -> Result<Option<DriverIdentity>, ApiError> {
        match bearer {
            Some("alice") => Ok(Some(identity("team-a"))),
            Some("bob") => Ok(Some(identity("team-b"))),
            Some("ops") => Ok(Some(identity("ops"))),
            Some(pod) if pod.starts_with("carol-pod-") => Ok(Some(DriverIdentity {
                pod_name: Some(pod.into()),
                pod_uid: Some(format!("uid-{pod}")),
                ..identity("team-c")
            })),
            Some(_) => Err(ApiError::NotAuthenticated("token refused".into())),
            None => Err(ApiError::NotAuthenticated("authorization: missing".into())),
        }
    }

    async fn may_inspect(
        &self,
        who: &DriverIdentity,
        _verb: &str,
        _namespace: Option<&str>,
    ) -> Result<bool, ApiError> {
        Ok(who.username.contains(":ops:"))
    }

    async fn may_create_pods(
        &self,
        who: &DriverIdentity,
        namespace: &str,
    ) -> Result<bool, ApiError> {
        Ok(who.username.contains(":team-a:") && namespace == "shared")
    }
}

/// An executor launched: its namespace and the identity it is written as.
type Launched = HashMap<(AppId, ExecutorId), (String, Option<String>)>;

/// Records what it was asked to launch, with the template's namespace and identity.
#[derive(Default)]
struct Recorder {
    launched: Mutex<Launched>,
}

struct Shared(Arc<Recorder>);

impl ExecutorBackend for Shared {
    fn name(&self) -> &'static str {
        "recorder"
    }
    fn launch(&self, request: LaunchRequest) {
        self.0.launched.lock().expect("lock").insert(
            (request.app_id.clone(), request.executor_id),
            (
                request.template.kubernetes.namespace.clone(),
                request
                    .template
                    .identity
                    .as_ref()
                    .map(|i| i.username.clone()),
            ),
        );
    }
    fn terminate(&self, _: &AppId, _: ExecutorId, _: Millis) {}
}

async fn start() -> (Running, Arc<Recorder>, ExecutorAllocatorClient<Channel>) {
    start_with_queues(None).await
}

/// The server with `queues` as its `--queues`.
async fn start_with_queues(
    queues: Option<QueueSettings>,
) -> (Running, Arc<Recorder>, ExecutorAllocatorClient<Channel>) {
    let recorder = Arc::new(Recorder::default());
    let for_start = Arc::clone(&recorder);
    let settings = Settings {
        listen: "127.0.0.1:0".parse().expect("addr"),
        metrics_listen: None,
        engine: EngineConfig::default(),
        limits: Limits::default(),
        admin_token: "admin-token-for-tests-0123456789".into(),
        incarnation: "test".into(),
        tls: None,
        namespace_selector: None,
        queues,
    };
    let running = server::start_with_auth(settings, Arc::new(FakeKubernetes), move |_sink| {
        Ok(Arc::new(Shared(for_start)) as Arc<dyn ExecutorBackend>)
    })
    .await
    .expect("server starts");
    let client = ExecutorAllocatorClient::connect(format!("http://{}", running.grpc_addr))
        .await
        .expect("connect");
    (running, recorder, client)
}

fn as_bearer<T>(message: T, bearer: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(b) = bearer {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {b}").parse().expect("ascii"),
        );
    }
    request
}

fn registration(app: &str, namespace: &str) -> pb::RegisterApplicationRequest {
    pb::RegisterApplicationRequest {
        app_id: app.into(),
        app_name: "test".into(),
        template: Some(pb::ExecutorTemplate {
            kubernetes: Some(pb::KubernetesSettings {
                namespace: namespace.into(),
                ..Default::default()
            }),
            ..template()
        }),
        initial_targets: vec![pb::ProfileTarget {
            resource_profile_id: 0,
            total: 1,
        }],
        ..Default::default()
    }
}

#[tokio::test]
async fn calls_without_a_valid_token_are_unauthenticated_and_change_nothing() {
    let (running, recorder, mut client) = start().await;
    for bearer in [None, Some("mallory")] {
        let err = client
            .register_application(as_bearer(registration("a", ""), bearer))
            .await
            .expect_err("refused");
        assert_eq!(err.code(), Code::Unauthenticated, "{bearer:?}: {err}");
    }
    assert!(running.apps.registry.is_empty());
    assert!(recorder.launched.lock().expect("lock").is_empty());
}

#[tokio::test]
async fn an_application_runs_in_its_identity_namespace_as_that_identity() {
    let (running, recorder, mut client) = start().await;
    client
        .register_application(as_bearer(registration("a", ""), Some("alice")))
        .await
        .expect("registered");
    let launched = loop {
        let l = recorder.launched.lock().expect("lock").clone();
        if !l.is_empty() {
            break l;
        }
        tokio::task::yield_now().await;
    };
    let (namespace, owner) = launched.values().next().expect("one").clone();
    assert_eq!(namespace, "team-a");
    assert_eq!(owner.as_deref(), Some("system:serviceaccount:team-a:spark"));
    drop(running);
}

#[tokio::test]
async fn another_namespace_needs_the_api_servers_yes() {
    let (running, _, mut client) = start().await;
    client
        .register_application(as_bearer(registration("a", "shared"), Some("alice")))
        .await
        .expect("alice may create pods in shared");
    let err = client
        .register_application(as_bearer(registration("b", "kube-system"), Some("bob")))
        .await
        .expect_err("bob may not");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("kube-system") && err.message().contains("team-b"),
        "{err}"
    );
    assert_eq!(running.apps.registry.len(), 1);
}

#[tokio::test]
async fn another_identity_cannot_touch_an_application_even_with_its_token() {
    let (running, _, mut client) = start().await;
    let token = client
        .register_application(as_bearer(registration("a", ""), Some("alice")))
        .await
        .expect("registered")
        .into_inner()
        .token;
    let kill = pb::KillExecutorsRequest {
        app_id: "a".into(),
        token: token.clone(),
        executor_ids: vec!["1".into()],
        adjust_target: true,
    };
    let err = client
        .kill_executors(as_bearer(kill.clone(), Some("bob")))
        .await
        .expect_err("bob");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    let err = client
        .kill_executors(as_bearer(kill.clone(), None))
        .await
        .expect_err("anonymous");
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    let watch = pb::WatchExecutorsRequest {
        app_id: "a".into(),
        token: token.clone(),
        after_seq: 0,
    };
    let err = client
        .watch_executors(as_bearer(watch, Some("bob")))
        .await
        .expect_err("bob may not watch");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    let mut reattach = registration("a", "");
    reattach.token = token.clone();
    let err = client
        .register_application(as_bearer(reattach.clone(), Some("bob")))
        .await
        .expect_err("bob may not re-attach");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    // The owner still can.
    client
        .register_application(as_bearer(reattach, Some("alice")))
        .await
        .expect("alice re-attaches");
    client
        .kill_executors(as_bearer(kill, Some("alice")))
        .await
        .expect("alice kills");
    assert_eq!(running.apps.registry.len(), 1);
}

#[tokio::test]
async fn inspection_needs_the_admin_token_or_an_identity_rbac_allows() {
    let (_running, _, mut client) = start().await;
    client
        .register_application(as_bearer(registration("a", ""), Some("alice")))
        .await
        .expect("registered");
    let list = pb::ListApplicationsRequest::default();
    let err = client
        .list_applications(as_bearer(list.clone(), Some("bob")))
        .await
        .expect_err("bob may not list");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(err.message().contains("applications.stoker.dev"), "{err}");
    let err = client
        .list_applications(as_bearer(list.clone(), None))
        .await
        .expect_err("anonymous");
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    let apps = client
        .list_applications(as_bearer(list, Some("ops")))
        .await
        .expect("ops may list")
        .into_inner()
        .applications;
    assert_eq!(apps.len(), 1);
    let get = pb::GetApplicationRequest {
        app_id: "a".into(),
        token: String::new(),
    };
    let err = client
        .get_application(as_bearer(get.clone(), Some("bob")))
        .await
        .expect_err("bob may not look");
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    // RBAC, not the application's token: ops needs none.
    let got = client
        .get_application(as_bearer(get, Some("ops")))
        .await
        .expect("ops may look")
        .into_inner();
    assert_eq!(got.app_id, "a");
}

#[tokio::test]
async fn a_driver_bound_to_its_pod_stays_bound_to_it() {
    let (_running, _, mut client) = start().await;
    let token = client
        .register_application(as_bearer(registration("a", ""), Some("carol-pod-1")))
        .await
        .expect("registered")
        .into_inner()
        .token;
    let heartbeat = pb::HeartbeatRequest {
        app_id: "a".into(),
        token,
        acked_seq: 0,
    };
    client
        .heartbeat(as_bearer(heartbeat.clone(), Some("carol-pod-1")))
        .await
        .expect("the same pod");
    let err = client
        .heartbeat(as_bearer(heartbeat, Some("carol-pod-2")))
        .await
        .expect_err("another pod of the same ServiceAccount");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(err.message().contains("carol-pod-1"), "{err}");
}

#[tokio::test]
async fn a_queue_is_chosen_only_by_the_identities_it_allows() {
    // etl admits team-a's ServiceAccounts; everyone else runs in adhoc.
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("queues.toml");
    std::fs::write(
        &path,
        r#"
default_queue = "adhoc"

[capacity]
executors = 8

[[queues]]
name = "adhoc"

[[queues]]
name = "etl"
allow = ["system:serviceaccount:team-a:*"]
"#,
    )
    .expect("write queue file");
    let (running, _recorder, mut client) = start_with_queues(Some(QueueSettings {
        path,
        reload_interval: Duration::from_secs(3600),
        debounce: Duration::from_millis(20),
    }))
    .await;

    // bob (team-b) may not choose etl: refused naming the queue and the identity, nothing
    // registered or launched.
    let mut bobs = registration("bob-app", "team-b");
    bobs.queue = "etl".into();
    let status = client
        .register_application(as_bearer(bobs, Some("bob")))
        .await
        .expect_err("etl is not bob's");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("\"etl\"")
            && status
                .message()
                .contains("system:serviceaccount:team-b:spark"),
        "{status:?}"
    );
    // alice (team-a) may; bob's own registration without a queue goes to adhoc.
    // Each asks for 20 of a capacity of 8: each is told what its queue admits.
    let mut alices = registration("alice-app", "team-a");
    alices.queue = "etl".into();
    alices.initial_targets[0].total = 20;
    let mut bobs = registration("bob-app", "team-b");
    bobs.initial_targets[0].total = 20;
    let alice = client
        .register_application(as_bearer(alices, Some("alice")))
        .await
        .expect("etl allows team-a")
        .into_inner();
    let bob = client
        .register_application(as_bearer(bobs, Some("bob")))
        .await
        .expect("bob in the default queue")
        .into_inner();
    for (app, token, bearer, queue) in [
        ("alice-app", alice.token, "alice", "etl"),
        ("bob-app", bob.token, "bob", "adhoc"),
    ] {
        let mut events = client
            .watch_executors(as_bearer(
                pb::WatchExecutorsRequest {
                    app_id: app.into(),
                    token,
                    after_seq: 0,
                },
                Some(bearer),
            ))
            .await
            .expect("watch")
            .into_inner();
        let told = warning_containing(&mut events, "admitted").await;
        assert!(told.contains(&format!("(queue {queue},")), "{app}: {told}");
    }
    // Had the refused registration been taken, bob-app would be in etl (a registration of the
    // same id re-attaches).
    running.shutdown().await.expect("shutdown");
}
