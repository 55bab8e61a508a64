//! The pod index: everything the Kubernetes backend knows about its executor pods, in one pure
//! struct. The I/O shell (the watch in [`crate::watch`], the writer in [`crate::writer`], the
//! backend in the crate root) feeds it what it sees and carries out the [`Effect`]s it returns.
//! The index itself never talks to the API server, never spawns and never sleeps, so every race
//! between the watch, a re-list, a pod creation and a driver re-attaching is decided here, under
//! one lock, and unit-tested here.
//!
//! # Flow
//!
//! * A [`Record`] exists for every executor an application asked for, from
//!   [`PodIndex::launch`] until the application has been told, once, that the executor is gone.
//! * An [`Unclaimed`] pod is one that an earlier stoker created (found by the start-up list)
//!   whose driver has not re-attached yet. [`PodIndex::claim`] turns an application's
//!   unclaimed pods into records in one step; [`PodIndex::reap_unclaimed`] gives up on the rest.
//! * Watch events ([`PodIndex::apply`], [`PodIndex::delete`]) move records along
//!   (pending, running, exited) and produce reports for the applications.
//! * A re-list ([`PodIndex::relist_started`], [`PodIndex::relist_apply`],
//!   [`PodIndex::relist_done`]) replaces the view after the watch lost events (410 Gone, an
//!   API-server restart, a broken connection).
//!
//! # Guarantees
//!
//! * **A live pod is deleted only when it is asked for**: by its application (kill, scale-down,
//!   application end), because it exited, because nobody claimed it within the adoption window,
//!   or because no application of this stoker owns it (neither a record nor unclaimed).
//!   Claiming moves pods from unclaimed to records atomically, so a watch event never finds an
//!   adopted pod in neither place.
//! * **A re-list judges only what its snapshot can prove.** `relist_started` is handled before
//!   the watcher sends its LIST (kube-runtime emits `Init` first, then lists, with the
//!   most-recent, quorum-read semantics). A pod whose creation or first sighting the index
//!   learnt *before* that moment is in the snapshot unless it is gone; one learnt later (its
//!   create returned while the list was running) is not judged by that re-list.
//! * **Every executor gets exactly one terminal report** (`Observation::Exited`): the record is
//!   removed in the same step that reports its end, and nothing is reported for a key without a
//!   record.
//! * **No executor id is created twice**: `launch` refuses a key the index already tracks, as a
//!   record or as an unclaimed pod.
//!
//! # Assumptions
//!
//! * The watcher lists with `ListSemantic::MostRecent` (kube-runtime's default) and emits
//!   `Init` before it lists.
//! * Pod names are unique per (application, executor) (see [`crate::pod::pod_name`]).

use std::collections::{BTreeMap, HashMap, HashSet};

use k8s_openapi::api::core::v1::Pod;
use stoker_core::{AppId, ExecutorId, ExitReason, Observation, ProfileId, RecoveredExecutor};

use crate::pod;
use crate::status::{self, PodView};

/// An executor: its application and id.
pub type Key = (AppId, ExecutorId);

/// A pod to delete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRef {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its uid, when known: the deletion carries it as a precondition, so that it can only ever
    /// delete the pod the index meant.
    pub uid: Option<String>,
    /// The driver identity to delete it as (the one it was created as), when drivers
    /// authenticate.
    pub as_user: Option<String>,
}

/// What the shell must do after a call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Tell the executor's application.
    Report {
        /// Which executor.
        key: Key,
        /// What happened.
        observation: Observation,
    },
    /// Delete a pod, with this grace period.
    Delete {
        /// The pod.
        pod: PodRef,
        /// Grace period in seconds.
        grace_seconds: u32,
        /// Why, for the log.
        why: DeleteWhy,
    },
}

/// Why the index asks for a deletion (logs and tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeleteWhy {
    /// The application asked (kill, scale-down, application end).
    Asked,
    /// The executor exited; its pod is cleaned up.
    Exited,
    /// The executor was removed while its pod was being created.
    Cancelled,
    /// No application of this stoker owns the pod.
    Orphan,
    /// The pod's driver did not re-attach within the adoption window.
    Unclaimed,
}

/// `launch` was called for an executor the index already tracks.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("executor {executor} of application {app} is already tracked (pod {pod})")]
pub struct AlreadyTracked {
    /// The application.
    pub app: AppId,
    /// The executor.
    pub executor: ExecutorId,
    /// The pod that already stands for it.
    pub pod: String,
}

/// What the create task is to do next.
#[derive(Debug, PartialEq, Eq)]
pub enum CreateStep {
    /// Send (or resend) the create request.
    Send,
    /// Stop: the pod exists (the watch saw it) or the record is gone. Carry out the effects.
    Stop(Vec<Effect>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reported {
    Nothing,
    Accepted,
    Running,
}

/// One requested executor.
#[derive(Debug)]
struct Record {
    namespace: String,
    pod_name: String,
    uid: Option<String>,
    /// The driver identity its pod is written as.
    owner: Option<String>,
    /// The pod exists (its create returned, or the watch saw it).
    created: bool,
    /// The re-list generation in which the index first knew the pod exists (see
    /// [`PodIndex::relist_done`]).
    known_since: u64,
    /// Removed before its pod was created; the create task finishes the removal.
    cancelled: bool,
    /// stoker asked for the deletion (scale-down, kill, application end).
    deleting: bool,
    reported: Reported,
    /// The driver was told the pod cannot be scheduled (once per pod).
    told_unschedulable: bool,
}

/// A pod of an earlier stoker whose driver has not re-attached yet.
#[derive(Debug)]
struct Unclaimed {
    namespace: String,
    pod_name: String,
    uid: Option<String>,
    owner: Option<String>,
    token_digest: String,
    profile: ProfileId,
    running_ip: Option<String>,
    known_since: u64,
}

#[derive(Debug)]
struct Relist {
    generation: u64,
    seen: HashSet<Key>,
}

/// Every executor record and every unclaimed pod of one stoker. See the module documentation.
#[derive(Debug, Default)]
pub struct PodIndex {
    records: HashMap<Key, Record>,
    unclaimed: HashMap<AppId, BTreeMap<ExecutorId, Unclaimed>>,
    /// Incremented when a re-list starts.
    generation: u64,
    relist: Option<Relist>,
}

/// The executor a pod of this stoker stands for, from its annotation and label.
pub fn key_of(pod: &Pod) -> Option<Key> {
    let annotations = pod.metadata.annotations.as_ref()?;
    let labels = pod.metadata.labels.as_ref()?;
    let app = AppId::parse(annotations.get(pod::ANNOTATION_APP_ID)?).ok()?;
    let id: u64 = labels.get(pod::LABEL_EXEC_ID)?.parse().ok()?;
    if id == 0 || id > i32::MAX as u64 {
        return None;
    }
    Some((app, ExecutorId::new(id)))
}

fn owner_of(p: &Pod) -> Option<String> {
    p.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(pod::ANNOTATION_OWNER))
        .cloned()
}

fn pod_ref(p: &Pod) -> PodRef {
    PodRef {
        namespace: p.metadata.namespace.clone().unwrap_or_default(),
        name: p.metadata.name.clone().unwrap_or_default(),
        uid: p.metadata.uid.clone(),
        as_user: owner_of(p),
    }
}

impl Record {
    fn pod_ref(&self) -> PodRef {
        PodRef {
            namespace: self.namespace.clone(),
            name: self.pod_name.clone(),
            uid: self.uid.clone(),
            as_user: self.owner.clone(),
        }
    }
}

fn report(key: &Key, observation: Observation) -> Effect {
    Effect::Report {
        key: key.clone(),
        observation,
    }
}

fn exited(key: &Key, code: Option<i32>, reason: ExitReason, message: String) -> Effect {
    report(
        key,
        Observation::Exited {
            code,
            reason,
            message,
        },
    )
}

impl PodIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Executors tracked (requested and not yet reported gone).
    pub fn tracked(&self) -> usize {
        self.records.len()
    }

    /// Pods of an earlier stoker still waiting for their drivers.
    pub fn unclaimed(&self) -> usize {
        self.unclaimed.values().map(BTreeMap::len).sum()
    }

    /// True when the index tracks this executor (as a record or an unclaimed pod).
    pub fn knows(&self, key: &Key) -> bool {
        self.records.contains_key(key)
            || self
                .unclaimed
                .get(&key.0)
                .is_some_and(|m| m.contains_key(&key.1))
    }

    /// Whether `key`'s pod is still to be created (launched, not created, not called off).
    pub fn wants_pod(&self, key: &Key) -> bool {
        self.records
            .get(key)
            .is_some_and(|r| !r.created && !r.cancelled)
    }

    // === start-up and adoption ===

    /// Takes the pods the start-up list found (before the watch starts): live ones wait for
    /// their drivers, exited ones are cleaned up (unless kept), pods being deleted are left to
    /// finish.
    pub fn adopt_listed(&mut self, pods: &[Pod]) -> Vec<Effect> {
        let mut effects = Vec::new();
        for p in pods {
            let Some(key) = key_of(p) else { continue };
            if p.metadata.deletion_timestamp.is_some() || self.knows(&key) {
                continue;
            }
            let view = status::classify(p);
            if let PodView::Exited { .. } = view {
                if !pod::keep_on_exit(p) {
                    effects.push(Effect::Delete {
                        pod: pod_ref(p),
                        grace_seconds: 0,
                        why: DeleteWhy::Exited,
                    });
                }
                continue;
            }
            let annotations = p.metadata.annotations.clone().unwrap_or_default();
            let labels = p.metadata.labels.clone().unwrap_or_default();
            let unclaimed = Unclaimed {
                namespace: p.metadata.namespace.clone().unwrap_or_default(),
                pod_name: p.metadata.name.clone().unwrap_or_default(),
                uid: p.metadata.uid.clone(),
                owner: owner_of(p),
                token_digest: annotations
                    .get(pod::ANNOTATION_TOKEN)
                    .cloned()
                    .unwrap_or_default(),
                profile: labels
                    .get(pod::LABEL_PROFILE)
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(0),
                running_ip: match view {
                    PodView::Running { ip } => Some(ip),
                    _ => None,
                },
                known_since: self.generation,
            };
            self.unclaimed
                .entry(key.0)
                .or_default()
                .insert(key.1, unclaimed);
        }
        effects
    }

    /// Hands an application's unclaimed pods that carry its token digest over to it, as
    /// records, in one step. Pods with another digest stay unclaimed.
    pub fn claim(&mut self, app: &AppId, token_digest: &str) -> Vec<RecoveredExecutor> {
        let Some(pods) = self.unclaimed.remove(app) else {
            return Vec::new();
        };
        let (mine, others): (BTreeMap<_, _>, BTreeMap<_, _>) = pods
            .into_iter()
            .partition(|(_, u)| u.token_digest == token_digest);
        if !others.is_empty() {
            self.unclaimed.insert(app.clone(), others);
        }
        let mut out = Vec::with_capacity(mine.len());
        for (id, u) in mine {
            self.records.insert(
                (app.clone(), id),
                Record {
                    namespace: u.namespace,
                    pod_name: u.pod_name.clone(),
                    uid: u.uid,
                    owner: u.owner,
                    created: true,
                    known_since: u.known_since,
                    cancelled: false,
                    deleting: false,
                    reported: if u.running_ip.is_some() {
                        Reported::Running
                    } else {
                        Reported::Accepted
                    },
                    told_unschedulable: false,
                },
            );
            out.push(RecoveredExecutor {
                executor_id: id,
                profile: u.profile,
                running_host: u.running_ip,
                backend_name: u.pod_name,
            });
        }
        out
    }

    /// Pods of other applications with other tokens that `claim` left unclaimed, per app.
    pub fn unclaimed_of(&self, app: &AppId) -> usize {
        self.unclaimed.get(app).map_or(0, BTreeMap::len)
    }

    /// The adoption window is over: every pod still unclaimed is deleted.
    pub fn reap_unclaimed(&mut self) -> Vec<Effect> {
        let mut effects = Vec::new();
        for (_, pods) in self.unclaimed.drain() {
            for (_, u) in pods {
                effects.push(Effect::Delete {
                    pod: PodRef {
                        namespace: u.namespace,
                        name: u.pod_name,
                        uid: u.uid,
                        as_user: u.owner,
                    },
                    grace_seconds: 0,
                    why: DeleteWhy::Unclaimed,
                });
            }
        }
        effects
    }

    // === what the applications ask ===

    /// An application asked for an executor whose pod will be `namespace/pod_name`.
    pub fn launch(
        &mut self,
        key: Key,
        namespace: String,
        pod_name: String,
        owner: Option<String>,
    ) -> Result<(), AlreadyTracked> {
        if let Some(r) = self.records.get(&key) {
            return Err(AlreadyTracked {
                app: key.0.clone(),
                executor: key.1,
                pod: r.pod_name.clone(),
            });
        }
        if let Some(u) = self.unclaimed.get(&key.0).and_then(|m| m.get(&key.1)) {
            return Err(AlreadyTracked {
                app: key.0.clone(),
                executor: key.1,
                pod: u.pod_name.clone(),
            });
        }
        self.records.insert(
            key,
            Record {
                namespace,
                pod_name,
                uid: None,
                owner,
                created: false,
                known_since: 0,
                cancelled: false,
                deleting: false,
                reported: Reported::Nothing,
                told_unschedulable: false,
            },
        );
        Ok(())
    }

    /// An application no longer wants an executor: its pod is deleted with this grace, or its
    /// creation is called off.
    pub fn terminate(&mut self, key: &Key, grace_seconds: u32) -> Vec<Effect> {
        let Some(r) = self.records.get_mut(key) else {
            // Nothing to stop: the executor never reached the backend, or is already reported.
            return vec![exited(key, None, ExitReason::KilledByDriver, String::new())];
        };
        if !r.created {
            // The create task sees this and finishes the removal (see `create_step`, `created`).
            r.cancelled = true;
            return Vec::new();
        }
        r.deleting = true;
        vec![Effect::Delete {
            pod: r.pod_ref(),
            grace_seconds,
            why: DeleteWhy::Asked,
        }]
    }

    // === what the create task learns ===

    /// Before each create attempt: go on, or stop.
    pub fn create_step(&mut self, key: &Key) -> CreateStep {
        let Some(r) = self.records.get(key) else {
            return CreateStep::Stop(Vec::new());
        };
        if r.created {
            return CreateStep::Stop(Vec::new());
        }
        if r.cancelled {
            self.records.remove(key);
            return CreateStep::Stop(vec![exited(
                key,
                None,
                ExitReason::ScaledDown,
                "removed before its pod was created".into(),
            )]);
        }
        CreateStep::Send
    }

    /// The create request returned the pod (or `409 AlreadyExists`: `uid` is then unknown).
    pub fn created(&mut self, key: &Key, uid: Option<String>) -> Vec<Effect> {
        let generation = self.generation;
        let Some(r) = self.records.get_mut(key) else {
            // Already reported gone (e.g. the watch saw it exit while a retry was under way).
            return Vec::new();
        };
        if r.uid.is_none() {
            r.uid = uid;
        }
        if !r.created {
            r.created = true;
            r.known_since = generation;
        }
        if r.cancelled && !r.deleting {
            r.deleting = true;
            return vec![Effect::Delete {
                pod: r.pod_ref(),
                grace_seconds: 0,
                why: DeleteWhy::Cancelled,
            }];
        }
        if r.reported == Reported::Nothing {
            r.reported = Reported::Accepted;
            return vec![report(
                key,
                Observation::Accepted {
                    backend_name: r.pod_name.clone(),
                },
            )];
        }
        Vec::new()
    }

    /// The API server refused the pod for good.
    pub fn create_failed(&mut self, key: &Key, message: String) -> Vec<Effect> {
        match self.records.get(key) {
            Some(r) if !r.created => {
                self.records.remove(key);
                vec![exited(key, None, ExitReason::StartFailed, message)]
            }
            _ => Vec::new(),
        }
    }

    /// The pod cannot be created for now (quota); the creation is retried.
    pub fn waiting(&self, key: &Key, message: String) -> Vec<Effect> {
        match self.records.get(key) {
            Some(r) if !r.created && !r.cancelled => {
                vec![report(key, Observation::Waiting { message })]
            }
            _ => Vec::new(),
        }
    }

    // === what the watch sees ===

    /// A pod was added or changed.
    pub fn apply(&mut self, p: &Pod) -> Vec<Effect> {
        let Some(key) = key_of(p) else {
            return Vec::new();
        };
        let name = p.metadata.name.clone().unwrap_or_default();
        if let Some(r) = self.records.get(&key) {
            if r.pod_name != name {
                return Vec::new();
            }
            return self.apply_record(key, p);
        }
        let view = status::classify(p);
        let exited = matches!(view, PodView::Exited { .. });
        // Exited pods the application asked to keep (deleteOnTermination=false) stay.
        let kept = exited && pod::keep_on_exit(p);
        let gone = p.metadata.deletion_timestamp.is_some();
        if let Some(pods) = self.unclaimed.get_mut(&key.0) {
            if let Some(u) = pods.get_mut(&key.1) {
                if u.pod_name != name {
                    return Vec::new();
                }
                if !exited {
                    u.running_ip = match view {
                        PodView::Running { ip } => Some(ip),
                        _ => None,
                    };
                    return Vec::new();
                }
                // Its executor ended before the driver came back: the re-attaching driver
                // hears of it as an executor the new stoker does not have.
                pods.remove(&key.1);
                if pods.is_empty() {
                    self.unclaimed.remove(&key.0);
                }
                if gone || kept {
                    return Vec::new();
                }
                return vec![Effect::Delete {
                    pod: pod_ref(p),
                    grace_seconds: 0,
                    why: DeleteWhy::Exited,
                }];
            }
        }
        if gone || kept {
            return Vec::new();
        }
        vec![Effect::Delete {
            pod: pod_ref(p),
            grace_seconds: 0,
            why: if exited {
                DeleteWhy::Exited
            } else {
                DeleteWhy::Orphan
            },
        }]
    }

    fn apply_record(&mut self, key: Key, p: &Pod) -> Vec<Effect> {
        let generation = self.generation;
        let Some(r) = self.records.get_mut(&key) else {
            return Vec::new();
        };
        let name = r.pod_name.clone();
        if r.uid.is_none() {
            r.uid = p.metadata.uid.clone();
        }
        if !r.created {
            r.created = true;
            r.known_since = generation;
        }
        let mut effects = Vec::new();
        if r.cancelled && !r.deleting {
            // Called off while its create was in flight, and the watch saw the pod first.
            r.deleting = true;
            effects.push(Effect::Delete {
                pod: pod_ref(p),
                grace_seconds: 0,
                why: DeleteWhy::Cancelled,
            });
        }
        match status::classify(p) {
            PodView::Pending => {
                if r.reported == Reported::Nothing {
                    r.reported = Reported::Accepted;
                    effects.push(report(
                        &key,
                        Observation::Accepted {
                            backend_name: name.clone(),
                        },
                    ));
                }
                if let Some(why) = status::unschedulable(p) {
                    if !r.told_unschedulable {
                        r.told_unschedulable = true;
                        effects.push(report(
                            &key,
                            Observation::Waiting {
                                message: format!(
                                    "pod {}/{name} cannot be scheduled: {why}",
                                    r.namespace
                                ),
                            },
                        ));
                    }
                }
            }
            PodView::Running { ip } => {
                if r.reported != Reported::Running {
                    r.reported = Reported::Running;
                    effects.push(report(
                        &key,
                        Observation::Running {
                            host: ip,
                            backend_name: name,
                        },
                    ));
                }
            }
            PodView::Exited {
                code,
                reason,
                message,
            } => {
                // A pod being deleted that stoker did not delete: someone else removed it.
                let gone = p.metadata.deletion_timestamp.is_some();
                let by_someone_else = gone && !r.deleting;
                let keep = pod::keep_on_exit(p);
                self.records.remove(&key);
                effects.push(if by_someone_else {
                    exited(
                        &key,
                        code,
                        ExitReason::DeletedExternally,
                        format!("pod {name} was deleted (not by stoker); the executor {message}"),
                    )
                } else {
                    exited(&key, code, reason, message)
                });
                if !gone && !keep {
                    effects.push(Effect::Delete {
                        pod: pod_ref(p),
                        grace_seconds: 0,
                        why: DeleteWhy::Exited,
                    });
                }
            }
        }
        effects
    }

    /// A pod is gone from the API server.
    pub fn delete(&mut self, p: &Pod) -> Vec<Effect> {
        let Some(key) = key_of(p) else {
            return Vec::new();
        };
        let name = p.metadata.name.clone().unwrap_or_default();
        if let Some(pods) = self.unclaimed.get_mut(&key.0) {
            if pods.get(&key.1).is_some_and(|u| u.pod_name == name) {
                pods.remove(&key.1);
                if pods.is_empty() {
                    self.unclaimed.remove(&key.0);
                }
            }
        }
        let deleting = match self.records.get(&key) {
            Some(r) if r.pod_name == name => r.deleting,
            _ => return Vec::new(),
        };
        self.records.remove(&key);
        let (code, reason, message) = match status::classify(p) {
            PodView::Exited {
                code,
                reason,
                message,
            } if deleting => (code, reason, message),
            // stoker asked, and the pod went before its container reported an exit (a kubelet
            // that deletes without a last status, a node gone): still stoker's own removal.
            _ if deleting => (
                None,
                ExitReason::KilledByDriver,
                format!("pod {name} was deleted by stoker"),
            ),
            view => {
                let code = match view {
                    PodView::Exited { code, .. } => code,
                    _ => None,
                };
                (
                    code,
                    ExitReason::DeletedExternally,
                    format!("pod {name} was deleted (not by stoker)"),
                )
            }
        };
        vec![exited(&key, code, reason, message)]
    }

    // === re-list ===

    /// The watcher starts a re-list (kube-runtime's `Init`), before it sends its LIST.
    pub fn relist_started(&mut self) {
        self.generation += 1;
        self.relist = Some(Relist {
            generation: self.generation,
            seen: HashSet::new(),
        });
    }

    /// A pod of the re-list's snapshot (`InitApply`).
    pub fn relist_apply(&mut self, p: &Pod) -> Vec<Effect> {
        if let (Some(relist), Some(key)) = (self.relist.as_mut(), key_of(p)) {
            relist.seen.insert(key);
        }
        self.apply(p)
    }

    /// The re-list is complete (`InitDone`): what the index knew to exist before it started and
    /// the snapshot lacks is gone. Executors are told (once); unclaimed pods are forgotten.
    /// Pods the index learnt of after the re-list started are not judged: the snapshot may
    /// predate them.
    pub fn relist_done(&mut self) -> Vec<Effect> {
        let Some(relist) = self.relist.take() else {
            return Vec::new();
        };
        let vanished = |key: &Key, known_since: u64| {
            known_since < relist.generation && !relist.seen.contains(key)
        };
        let gone: Vec<Key> = self
            .records
            .iter()
            .filter(|(k, r)| r.created && vanished(k, r.known_since))
            .map(|(k, _)| k.clone())
            .collect();
        let mut effects = Vec::with_capacity(gone.len());
        for key in gone {
            if let Some(r) = self.records.remove(&key) {
                let (reason, message) = if r.deleting {
                    (
                        ExitReason::KilledByDriver,
                        format!("pod {} is gone", r.pod_name),
                    )
                } else {
                    (
                        ExitReason::DeletedExternally,
                        format!(
                            "pod {} is gone (deleted while the watch was down)",
                            r.pod_name
                        ),
                    )
                };
                effects.push(exited(&key, None, reason, message));
            }
        }
        for (app, pods) in self.unclaimed.iter_mut() {
            pods.retain(|id, u| !vanished(&(app.clone(), *id), u.known_since));
        }
        self.unclaimed.retain(|_, pods| !pods.is_empty());
        effects
    }
}

#[cfg(test)]
mod tests;
