//! The gRPC service: requests are validated into domain types at the edge, authorized, and
//! handed to the application's actor; domain results are turned back into protocol messages.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use stoker_core::{
    AppId, DriverIdentity, EngineConfig, Event, EventKind, ExecutorPhase, ExitReason, ProfileId,
};
use stoker_k8s::namespaces::NamespaceSelector;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::{debug, info};

use crate::app::{AppCommand, AppHandle, AppSummary, Apps, ExecutorView, NewApp};
use crate::auth::{Authenticator, NoAuth};
use crate::config::{Limits, NamespaceVerdict};
use crate::error::ApiError;
use crate::proto::v1 as pb;
use crate::proto::v1::executor_allocator_server::ExecutorAllocator;
use crate::queues::QueueInputs;
use crate::quota::QuotaKey;
use crate::validate;

/// Events sent per batch on a watch stream.
const EVENT_BATCH: usize = 512;

/// The ExecutorAllocator service.
pub struct Service {
    apps: Arc<Apps>,
    limits: Limits,
    engine_defaults: EngineConfig,
    incarnation: String,
    admin_token: String,
    shutdown: watch::Receiver<bool>,
    auth: Arc<dyn Authenticator>,
    namespace_selector: Option<Arc<NamespaceSelector>>,
}

impl Service {
    /// A service over `apps`.
    pub fn new(
        apps: Arc<Apps>,
        limits: Limits,
        engine_defaults: EngineConfig,
        incarnation: String,
        admin_token: String,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            apps,
            limits,
            engine_defaults,
            incarnation,
            admin_token,
            shutdown,
            auth: Arc::new(NoAuth),
            namespace_selector: None,
        }
    }

    /// Serves namespaces that `selector` selects (`--allowed-namespace-selector`).
    pub fn with_namespace_selector(mut self, selector: Option<Arc<NamespaceSelector>>) -> Self {
        self.namespace_selector = selector;
        self
    }

    /// Authenticates callers with `auth` (default: [`NoAuth`]).
    pub fn with_auth(mut self, auth: Arc<dyn Authenticator>) -> Self {
        self.auth = auth;
        self
    }

    fn finish<T>(
        &self,
        method: &'static str,
        started: Instant,
        result: Result<T, ApiError>,
    ) -> Result<Response<T>, Status> {
        let code = match &result {
            Ok(_) => tonic::Code::Ok,
            Err(err) => err.code(),
        };
        self.apps.metrics.rpc(method, code, started);
        match result {
            Ok(value) => Ok(Response::new(value)),
            Err(ApiError::Limit(err)) => {
                // Counted, and logged at debug only: a caller hammering a limit must not flood
                // the log.
                self.apps.metrics.limit_refused(err.limit);
                debug!(method, limit = err.limit.name(), error = %err, "refused by a limit");
                Err(ApiError::Limit(err).into())
            }
            Err(err) => {
                debug!(method, code = ?err.code(), error = %err, "request refused");
                Err(err.into())
            }
        }
    }

    /// Finds an application and checks the caller: its token, and, when the application was
    /// registered by an authenticated driver, that the caller is the same identity.
    fn authorize(
        &self,
        app_id: &str,
        token: &str,
        caller: Option<&DriverIdentity>,
    ) -> Result<Arc<AppHandle>, ApiError> {
        let app_id = validate::app_id(app_id)?;
        let token = validate::token(token)?;
        let handle = self
            .apps
            .get(&app_id)
            .ok_or_else(|| ApiError::NotFound(app_id.to_string()))?;
        same_identity(&app_id, handle.identity(), caller)?;
        if !handle.token_matches(token) {
            return Err(ApiError::PermissionDenied(format!(
                "token: does not belong to application {app_id}"
            )));
        }
        Ok(handle)
    }

    /// The namespace an authenticated driver's application runs in: the one it asked for
    /// (spark.kubernetes.namespace) if its identity may create pods there (the API server
    /// answers), else refused; its ServiceAccount's own namespace when it asked for none.
    async fn namespace_for(
        &self,
        identity: &DriverIdentity,
        asked: &str,
    ) -> Result<String, ApiError> {
        let own = identity.service_account().map(|(ns, _)| ns);
        if asked.is_empty() || Some(asked) == own {
            return own.map(str::to_owned).ok_or_else(|| {
                ApiError::invalid(
                    "template.kubernetes.namespace",
                    format!(
                        "must be set: {} is not a ServiceAccount, so it has no namespace of its own",
                        identity.username
                    ),
                )
            });
        }
        if self.auth.may_create_pods(identity, asked).await? {
            return Ok(asked.to_owned());
        }
        Err(ApiError::PermissionDenied(format!(
            "template.kubernetes.namespace: {} may not create pods in namespace {asked} \
             (the Kubernetes API server said so)",
            identity.username
        )))
    }

    /// Whether applications may run in `namespace`: the static policy, then the label
    /// selector, which the API server matches.
    async fn namespace_served(&self, namespace: &str) -> Result<(), ApiError> {
        let refused = |why: String| {
            ApiError::PermissionDenied(format!("template.kubernetes.namespace: {why}"))
        };
        let selector = match self.limits.namespace_allowed(namespace) {
            NamespaceVerdict::Allowed => return Ok(()),
            NamespaceVerdict::Refused(why) => return Err(refused(why)),
            NamespaceVerdict::IfSelected(selector) => selector,
        };
        let Some(check) = &self.namespace_selector else {
            return Err(ApiError::Unavailable(format!(
                "namespace {namespace}: --allowed-namespace-selector {selector} cannot be checked \
                 on this backend"
            )));
        };
        match check.selects(namespace).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(refused(format!(
                "namespace {namespace} is not one this stoker serves (its labels do not match \
                 --allowed-namespace-selector {selector}{})",
                if self.limits.allowed_namespaces.is_empty() {
                    String::new()
                } else {
                    format!(
                        ", and --allowed-namespaces does not name it: {}",
                        self.limits.allowed_namespaces.join(",")
                    )
                }
            ))),
            Err(err) => Err(ApiError::Unavailable(err.to_string())),
        }
    }

    fn is_admin(&self, token: &str) -> bool {
        crate::app::constant_time_eq(token.as_bytes(), self.admin_token.as_bytes())
    }

    async fn register(
        &self,
        request: pb::RegisterApplicationRequest,
        caller: Option<DriverIdentity>,
    ) -> Result<pb::RegisterApplicationResponse, ApiError> {
        let mut registration = validate::registration(request, &self.limits)?;
        if let Some(identity) = &caller {
            let asked = registration.template.kubernetes.namespace.clone();
            registration.template.kubernetes.namespace =
                self.namespace_for(identity, &asked).await?;
        }
        registration.template.identity = caller.clone();
        if let crate::config::NamespaceSource::Kubernetes { default } = &self.limits.namespaces {
            let template = &registration.template;
            let namespace = if template.kubernetes.namespace.is_empty() {
                default.as_str()
            } else {
                template.kubernetes.namespace.as_str()
            };
            self.namespace_served(namespace).await?;
        }
        self.apps
            .backend
            .check_template(&registration.template)
            .map_err(|problem| ApiError::invalid("template", problem))?;
        let template = Arc::new(registration.template);
        // Two attempts: a concurrent first registration of the same id turns the second into a
        // re-attachment.
        for _ in 0..2 {
            if let Some(handle) = self.apps.get(&registration.app_id) {
                same_identity(&registration.app_id, handle.identity(), caller.as_ref())?;
                let Some(token) = registration.token.as_deref() else {
                    return Err(ApiError::AlreadyExists(format!(
                        "application {} is already registered; pass its token to re-attach",
                        registration.app_id
                    )));
                };
                if !handle.token_matches(token) {
                    return Err(ApiError::PermissionDenied(format!(
                        "token: does not belong to application {}",
                        registration.app_id
                    )));
                }
                let reattached = handle
                    .call(|reply| AppCommand::Reattach {
                        template: Arc::clone(&template),
                        targets: registration.targets.clone(),
                        last_executor_id: registration.last_executor_id,
                        reply,
                    })
                    .await?;
                return Ok(pb::RegisterApplicationResponse {
                    token: handle.token().to_owned(),
                    lease_ttl_ms: self.engine_defaults.lease_ttl,
                    incarnation: self.incarnation.clone(),
                    reattached: true,
                    last_seq: reattached.last_seq,
                });
            }
            let token = registration
                .token
                .clone()
                .unwrap_or_else(crate::random_token);
            let mut config = self.engine_defaults.clone();
            config.max_executors_per_profile = self.limits.max_executors_per_profile;
            if let Some(max_failures) = registration.max_failures {
                config.max_failures = self.failure_limit(&registration.app_id, max_failures);
            }
            config.failure_window = registration.failure_window;
            let quota_key = QuotaKey::of(&template, &self.limits.namespaces);
            let queue_inputs = match &self.apps.queues {
                None => None,
                Some(queues) => {
                    let inputs = QueueInputs {
                        namespace: quota_key.namespace.clone(),
                        identity: quota_key.identity.clone(),
                        requested: registration.queue.clone(),
                        min_executors: registration.min_executors,
                    };
                    // Refused here, before anything is registered.
                    let queue = queues.admit(&inputs)?;
                    info!(app = %registration.app_id, queue = %queue,
                        min_executors = registration.min_executors, "fair share: queue chosen");
                    Some(inputs)
                }
            };
            let created = self.apps.create(NewApp {
                app_id: registration.app_id.clone(),
                token: token.clone(),
                app_name: registration.app_name.clone(),
                template: Arc::clone(&template),
                config,
                targets: registration.targets.clone(),
                last_executor_id: registration.last_executor_id,
                known_executor_ids: registration.known_executor_ids.clone(),
                quota_key,
                queue_inputs,
            });
            match created {
                Ok((_, last_seq)) => {
                    return Ok(pb::RegisterApplicationResponse {
                        token,
                        lease_ttl_ms: self.engine_defaults.lease_ttl,
                        incarnation: self.incarnation.clone(),
                        reattached: false,
                        last_seq,
                    })
                }
                Err(ApiError::AlreadyExists(_)) => continue,
                Err(err) => return Err(err),
            }
        }
        Err(ApiError::Unavailable(format!(
            "application {} is being registered concurrently; retry",
            registration.app_id
        )))
    }

    /// The failure limit a driver asked for, lowered to `--max-failure-limit`. Lowered, not
    /// refused: Spark's own rule asks for `Int.MaxValue` under dynamic allocation without
    /// `maxExecutors`, and such a driver must still run.
    fn failure_limit(&self, app_id: &AppId, requested: u32) -> u32 {
        let cap = self.limits.max_failure_limit;
        if requested <= cap {
            return requested;
        }
        self.apps.metrics.failure_limits_lowered.inc();
        info!(app = %app_id, requested, limit = cap,
            "failure limit lowered to --max-failure-limit");
        cap
    }

    async fn application_info(&self, app_id: &AppId, handle: &AppHandle) -> pb::ApplicationInfo {
        let summary: AppSummary = handle.summary.borrow().clone();
        let executors = handle.executors().await.unwrap_or_default();
        application_info(app_id, &summary, &executors, self.apps.clock.now())
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl ExecutorAllocator for Service {
    async fn register_application(
        &self,
        request: Request<pb::RegisterApplicationRequest>,
    ) -> Result<Response<pb::RegisterApplicationResponse>, Status> {
        let started = Instant::now();
        let bearer = crate::auth::bearer(request.metadata());
        let result = async {
            let caller = self.auth.identify(bearer?.as_deref()).await?;
            self.register(request.into_inner(), caller).await
        }
        .await;
        self.finish("RegisterApplication", started, result)
    }

    async fn request_total_executors(
        &self,
        request: Request<pb::RequestTotalExecutorsRequest>,
    ) -> Result<Response<pb::RequestTotalExecutorsResponse>, Status> {
        let started = Instant::now();
        let bearer = crate::auth::bearer(request.metadata());
        let request = request.into_inner();
        let result = async {
            let caller = self.auth.identify(bearer?.as_deref()).await?;
            let handle = self.authorize(&request.app_id, &request.token, caller.as_ref())?;
            let targets = validate::targets("targets", &request.targets, &self.limits)?;
            handle
                .call(|reply| AppCommand::SetTargets { targets, reply })
                .await?;
            Ok(pb::RequestTotalExecutorsResponse {})
        }
        .await;
        self.finish("RequestTotalExecutors", started, result)
    }

    async fn kill_executors(
        &self,
        request: Request<pb::KillExecutorsRequest>,
    ) -> Result<Response<pb::KillExecutorsResponse>, Status> {
        let started = Instant::now();
        let bearer = crate::auth::bearer(request.metadata());
        let request = request.into_inner();
        let result = async {
            let caller = self.auth.identify(bearer?.as_deref()).await?;
            let handle = self.authorize(&request.app_id, &request.token, caller.as_ref())?;
            let ids = validate::executor_ids("executor_ids", &request.executor_ids, &self.limits)?;
            let adjust_target = request.adjust_target;
            let killed = handle
                .call(|reply| AppCommand::Kill {
                    ids,
                    adjust_target,
                    reply,
                })
                .await?;
            Ok(pb::KillExecutorsResponse {
                killed: killed.iter().map(ToString::to_string).collect(),
            })
        }
        .await;
        self.finish("KillExecutors", started, result)
    }

    async fn decommission_executors(
        &self,
        request: Request<pb::DecommissionExecutorsRequest>,
    ) -> Result<Response<pb::DecommissionExecutorsResponse>, Status> {
        let started = Instant::now();
        let bearer = crate::auth::bearer(request.metadata());
        let request = request.into_inner();
        let result = async {
            let caller = self.auth.identify(bearer?.as_deref()).await?;
            let handle = self.authorize(&request.app_id, &request.token, caller.as_ref())?;
            let ids = validate::executor_ids("executor_ids", &request.executor_ids, &self.limits)?;
            let adjust_target = request.adjust_target;
            let affected = handle
                .call(|reply| AppCommand::Decommission {
                    ids,
                    adjust_target,
                    reply,
                })
                .await?;
            Ok(pb::DecommissionExecutorsResponse {
                decommissioning: affected.iter().map(ToString::to_string).collect(),
            })
        }
        .await;
        self.finish("DecommissionExecutors", started, result)
    }

    type WatchExecutorsStream = EventStream;

    async fn watch_executors(
        &self,
        request: Request<pb::WatchExecutorsRequest>,
    ) -> Result<Response<Self::WatchExecutorsStream>, Status> {
        let started = Instant::now();
        let bearer = crate::auth::bearer(request.metadata());
        let request = request.into_inner();
        let caller = match bearer {
            Ok(bearer) => self.auth.identify(bearer.as_deref()).await,
            Err(err) => Err(err),
        };
        let result = caller
            .and_then(|caller| self.authorize(&request.app_id, &request.token, caller.as_ref()))
            .and_then(|handle| {
                let guard = handle.open_watch(self.limits.max_watches_per_application)?;
                Ok((handle, guard))
            })
            .map(|(handle, guard)| {
                let (tx, rx) = mpsc::channel(EVENT_BATCH);
                let clock = self.apps.clock;
                let mut shutdown = self.shutdown.clone();
                tokio::spawn(async move {
                    // Counted as open until this task ends (the client went away, the
                    // application ended, or the server is shutting down).
                    let _guard = guard;
                    let mut cursor = request.after_seq;
                    let mut seq = handle.seq.clone();
                    loop {
                        if *shutdown.borrow() {
                            return;
                        }
                        seq.borrow_and_update();
                        let Some(batch) = handle.events(cursor, EVENT_BATCH).await else {
                            return;
                        };
                        if batch.is_empty() {
                            tokio::select! {
                                changed = seq.changed() => if changed.is_err() { return },
                                _ = shutdown.changed() => return,
                                () = tx.closed() => return,
                            }
                            continue;
                        }
                        for event in batch {
                            cursor = event.seq;
                            let message = watch_event(&event, clock.unix_ms(event.at));
                            if tx.send(Ok(message)).await.is_err() {
                                return;
                            }
                        }
                    }
                });
                Box::pin(ReceiverStream::new(rx)) as EventStream
            });
        self.finish("WatchExecutors", started, result)
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let started = Instant::now();
        let bearer = crate::auth::bearer(request.metadata());
        let request = request.into_inner();
        let result = async {
            let caller = self.auth.identify(bearer?.as_deref()).await?;
            let handle = self.authorize(&request.app_id, &request.token, caller.as_ref())?;
            let acked_seq = request.acked_seq;
            handle
                .call(|reply| AppCommand::Heartbeat { acked_seq, reply })
                .await?;
            Ok(pb::HeartbeatResponse {
                lease_ttl_ms: self.engine_defaults.lease_ttl,
                incarnation: self.incarnation.clone(),
            })
        }
        .await;
        self.finish("Heartbeat", started, result)
    }

    async fn unregister_application(
        &self,
        request: Request<pb::UnregisterApplicationRequest>,
    ) -> Result<Response<pb::UnregisterApplicationResponse>, Status> {
        let started = Instant::now();
        let bearer = crate::auth::bearer(request.metadata());
        let request = request.into_inner();
        let result = async {
            let caller = self.auth.identify(bearer?.as_deref()).await?;
            let handle = self.authorize(&request.app_id, &request.token, caller.as_ref())?;
            let usage = validate::usage(&request.usage, &self.limits)?;
            let (removed, notes) = handle
                .call(|reply| AppCommand::Unregister { usage, reply })
                .await?;
            Ok(pb::UnregisterApplicationResponse {
                removed_executors: u32::try_from(removed).unwrap_or(u32::MAX),
                notes,
            })
        }
        .await;
        self.finish("UnregisterApplication", started, result)
    }

    async fn get_application(
        &self,
        request: Request<pb::GetApplicationRequest>,
    ) -> Result<Response<pb::ApplicationInfo>, Status> {
        let started = Instant::now();
        let bearer = crate::auth::bearer(request.metadata());
        let request = request.into_inner();
        let result = async {
            let app_id = validate::app_id(&request.app_id)?;
            let handle = if self.is_admin(&request.token) {
                self.apps
                    .get(&app_id)
                    .ok_or_else(|| ApiError::NotFound(app_id.to_string()))?
            } else {
                let caller = self.auth.identify(bearer?.as_deref()).await?;
                match self.authorize(&request.app_id, &request.token, caller.as_ref()) {
                    Ok(handle) => handle,
                    // Not the application's driver: an identity RBAC lets inspect it.
                    Err(refused) => {
                        let Some(caller) = caller else {
                            return Err(refused);
                        };
                        let handle = self
                            .apps
                            .get(&app_id)
                            .ok_or_else(|| ApiError::NotFound(app_id.to_string()))?;
                        let namespace = handle.namespace().map(str::to_owned);
                        if !self
                            .auth
                            .may_inspect(&caller, "get", namespace.as_deref())
                            .await?
                        {
                            return Err(refused);
                        }
                        handle
                    }
                }
            };
            Ok(self.application_info(&app_id, &handle).await)
        }
        .await;
        self.finish("GetApplication", started, result)
    }

    async fn list_applications(
        &self,
        request: Request<pb::ListApplicationsRequest>,
    ) -> Result<Response<pb::ListApplicationsResponse>, Status> {
        let started = Instant::now();
        let bearer = crate::auth::bearer(request.metadata());
        let request = request.into_inner();
        let result = async {
            self.may_list(&request.admin_token, bearer).await?;
            let handles: Vec<_> = self
                .apps
                .registry
                .iter()
                .map(|e| Arc::clone(e.value()))
                .collect();
            let now = self.apps.clock.now();
            let mut applications: Vec<pb::ApplicationInfo> = handles
                .iter()
                .map(|h| application_info(&h.app_id, &h.summary.borrow().clone(), &[], now))
                .collect();
            applications.sort_by(|a, b| a.app_id.cmp(&b.app_id));
            Ok(pb::ListApplicationsResponse { applications })
        }
        .await;
        self.finish("ListApplications", started, result)
    }

    async fn list_queues(
        &self,
        request: Request<pb::ListQueuesRequest>,
    ) -> Result<Response<pb::ListQueuesResponse>, Status> {
        let started = Instant::now();
        let bearer = crate::auth::bearer(request.metadata());
        let request = request.into_inner();
        let result = async {
            self.may_list(&request.admin_token, bearer).await?;
            let Some(queues) = &self.apps.queues else {
                return Ok(pb::ListQueuesResponse {
                    enabled: false,
                    ..Default::default()
                });
            };
            Ok(queue_list(queues))
        }
        .await;
        self.finish("ListQueues", started, result)
    }
}

impl Service {
    /// The admin token, or an identity RBAC lets list applications (stoker-viewer).
    async fn may_list(
        &self,
        admin_token: &str,
        bearer: Result<Option<String>, ApiError>,
    ) -> Result<(), ApiError> {
        if admin_token.is_empty() {
            let Some(caller) = self.auth.identify(bearer?.as_deref()).await? else {
                return Err(ApiError::Unauthenticated);
            };
            if !self.auth.may_inspect(&caller, "list", None).await? {
                return Err(ApiError::PermissionDenied(format!(
                    "{} may not list applications.stoker.dev (a ClusterRole such as \
                     stoker-viewer grants it), and no admin_token was given",
                    caller.username
                )));
            }
            return Ok(());
        }
        if !self.is_admin(admin_token) {
            return Err(ApiError::PermissionDenied(
                "admin_token: is not this server's admin token".into(),
            ));
        }
        Ok(())
    }
}

fn queue_list(queues: &crate::queues::Queues) -> pb::ListQueuesResponse {
    let config = queues.config();
    let report = queues.report();
    let queues_info = config
        .queues()
        .values()
        .map(|queue| {
            let totals = report
                .allocation
                .queues
                .get(&queue.name)
                .copied()
                .unwrap_or_default();
            pb::QueueInfo {
                name: queue.name.to_string(),
                weight: queue.weight,
                guaranteed: queue.guaranteed.to_string(),
                max: queue.max.to_string(),
                requested: totals.requested.executors,
                admitted: totals.admitted.executors,
                running: totals.running.executors,
                pending: report.pending.get(&queue.name).copied().unwrap_or(0),
                applications: totals.applications,
            }
        })
        .collect();
    pb::ListQueuesResponse {
        enabled: true,
        queues: queues_info,
        capacity: config.capacity().to_string(),
        config_error: queues.last_error().unwrap_or_default(),
    }
}

/// An application registered by an authenticated driver answers only to that identity.
fn same_identity(
    app_id: &AppId,
    owner: Option<&DriverIdentity>,
    caller: Option<&DriverIdentity>,
) -> Result<(), ApiError> {
    let Some(owner) = owner else {
        return Ok(());
    };
    match caller {
        // A driver whose token is bound to its pod (a projected token) stays bound to that pod:
        // another pod of the same ServiceAccount is another driver.
        Some(caller) if caller.same_user(owner) && owner.pod_uid.is_some() && caller.pod_uid != owner.pod_uid => {
            Err(ApiError::PermissionDenied(format!(
                "application {app_id} belongs to the driver pod {} of {}; the caller is another pod",
                owner.pod_name.as_deref().unwrap_or("?"),
                owner.username
            )))
        }
        Some(caller) if caller.same_user(owner) => Ok(()),
        Some(caller) => Err(ApiError::PermissionDenied(format!(
            "application {app_id} belongs to {}; the caller is {}",
            owner.username, caller.username
        ))),
        None => Err(ApiError::NotAuthenticated(format!(
            "application {app_id} belongs to an authenticated driver: send its bearer token"
        ))),
    }
}

// === domain → protocol ===

fn application_info(
    app_id: &AppId,
    summary: &AppSummary,
    executors: &[ExecutorView],
    now: u64,
) -> pb::ApplicationInfo {
    pb::ApplicationInfo {
        app_id: app_id.to_string(),
        app_name: summary.app_name.clone(),
        spark_user: summary.spark_user.clone(),
        phase: summary.phase.to_owned(),
        targets: summary
            .targets
            .iter()
            .map(|(&resource_profile_id, &total)| pb::ProfileTarget {
                resource_profile_id,
                total: i64::from(total),
            })
            .collect(),
        pending: summary.pending,
        running: summary.running,
        exited: u32::try_from(summary.exited).unwrap_or(u32::MAX),
        failures: summary.failures,
        lease_remaining_ms: i64::try_from(summary.lease_deadline).unwrap_or(i64::MAX)
            - i64::try_from(now).unwrap_or(i64::MAX),
        last_seq: summary.last_seq,
        executors: executors.iter().map(executor_info).collect(),
        registered_unix_ms: summary.registered_unix_ms,
        sizes: summary
            .sizes
            .iter()
            .map(|(&resource_profile_id, size)| pb::ProfileSize {
                resource_profile_id,
                heap_mib: size.heap_mib,
                overhead_mib: size.overhead_mib,
            })
            .collect(),
        resizes: summary.resizes,
        queue: summary.queue.as_ref().map(ToString::to_string),
        admitted: summary
            .admitted
            .map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
    }
}

fn executor_info(view: &ExecutorView) -> pb::ExecutorInfo {
    pb::ExecutorInfo {
        executor_id: view.id.to_string(),
        resource_profile_id: view.profile,
        state: phase(view.phase) as i32,
        host: view.host.clone(),
        backend_name: view.backend_name.clone(),
        deleting: view.deleting,
        created_unix_ms: view.created_unix_ms,
        heap_mib: view.size.map_or(0, |s| s.heap_mib),
        overhead_mib: view.size.map_or(0, |s| s.overhead_mib),
    }
}

/// Converts an engine event.
pub fn watch_event(event: &Event, time_unix_ms: i64) -> pb::WatchEvent {
    let kind = match &event.kind {
        EventKind::Executor(ev) => pb::watch_event::Kind::Executor(pb::ExecutorEvent {
            executor_id: ev.id.to_string(),
            resource_profile_id: ev.profile as ProfileId,
            state: phase(ev.phase) as i32,
            host: ev.host.clone(),
            backend_name: ev.backend_name.clone(),
            exit_code: ev.exit.as_ref().and_then(|e| e.code),
            reason: ev
                .exit
                .as_ref()
                .map_or(pb::ExitReason::Unspecified, |e| reason(e.reason))
                as i32,
            message: ev
                .exit
                .as_ref()
                .map(|e| e.message.clone())
                .unwrap_or_default(),
            caused_by_app: ev.exit.as_ref().is_some_and(|e| e.caused_by_app),
        }),
        EventKind::AppFailed { message } => {
            pb::watch_event::Kind::Application(pb::ApplicationEvent {
                kind: pb::application_event::Kind::Failed as i32,
                message: message.clone(),
            })
        }
        EventKind::AppWarning { message } => {
            pb::watch_event::Kind::Application(pb::ApplicationEvent {
                kind: pb::application_event::Kind::Warning as i32,
                message: message.clone(),
            })
        }
        // A WARNING, so that every plugin version logs it.
        EventKind::Resized(resize) => pb::watch_event::Kind::Application(pb::ApplicationEvent {
            kind: pb::application_event::Kind::Warning as i32,
            message: resize.message(),
        }),
        EventKind::Reclaim(reclaim) => pb::watch_event::Kind::Reclaim(pb::ReclaimEvent {
            resource_profile_id: reclaim.profile,
            count: reclaim.count,
            deadline_unix_ms: time_unix_ms.saturating_add(
                i64::try_from(reclaim.deadline.saturating_sub(event.at)).unwrap_or(i64::MAX),
            ),
            timeout_ms: reclaim.deadline.saturating_sub(event.at),
            reason: reclaim.reason.clone(),
        }),
    };
    pb::WatchEvent {
        seq: event.seq,
        time_unix_ms,
        kind: Some(kind),
    }
}

fn phase(phase: ExecutorPhase) -> pb::ExecutorState {
    match phase {
        ExecutorPhase::Requested => pb::ExecutorState::Requested,
        ExecutorPhase::Pending => pb::ExecutorState::Pending,
        ExecutorPhase::Running => pb::ExecutorState::Running,
        ExecutorPhase::Exited => pb::ExecutorState::Exited,
    }
}

fn reason(reason: ExitReason) -> pb::ExitReason {
    match reason {
        ExitReason::Completed => pb::ExitReason::Completed,
        ExitReason::Error => pb::ExitReason::Error,
        ExitReason::OomKilled => pb::ExitReason::OomKilled,
        ExitReason::Signaled => pb::ExitReason::Signaled,
        ExitReason::KilledByDriver => pb::ExitReason::KilledByDriver,
        ExitReason::Decommissioned => pb::ExitReason::Decommissioned,
        ExitReason::ScaledDown => pb::ExitReason::ScaledDown,
        ExitReason::ApplicationEnded => pb::ExitReason::ApplicationEnded,
        ExitReason::Evicted => pb::ExitReason::Evicted,
        ExitReason::NodeLost => pb::ExitReason::NodeLost,
        ExitReason::DeletedExternally => pb::ExitReason::DeletedExternally,
        ExitReason::StartFailed => pb::ExitReason::StartFailed,
        ExitReason::StartTimeout => pb::ExitReason::StartTimeout,
        ExitReason::DeadlineExceeded => pb::ExitReason::DeadlineExceeded,
        ExitReason::Lost => pb::ExitReason::Lost,
        ExitReason::Reclaimed => pb::ExitReason::Reclaimed,
    }
}
