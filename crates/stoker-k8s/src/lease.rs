//! Leader election over a `coordination.k8s.io/v1` Lease, for two (or more) stoker replicas of
//! one instance: only the leader lists, watches, adopts and writes pods; the others wait.
//!
//! # Flow
//!
//! The algorithm is client-go's `leaderelection` (the one kube-controller-manager uses), with
//! its default timings (lease 15 s, renew deadline 10 s, retry 2 s):
//!
//! * A candidate reads the Lease every retry period. It takes the Lease when it has no holder,
//!   when it names the candidate itself (a restarted container of the same pod), or when its
//!   record has not changed for a whole lease duration **as measured on the candidate's own
//!   monotonic clock since it saw that record**. Remote timestamps are never compared with the
//!   local clock, so clock skew between nodes does not matter.
//! * Writes carry the `resourceVersion` that was read: of two candidates, one wins, the other
//!   gets 409 Conflict and goes on waiting.
//! * The leader renews every retry period. Each renewal that succeeds opens the [`WriteGate`]
//!   until *the moment that renewal was sent* plus the renew deadline. A leader that cannot
//!   renew within the renew deadline (API server unreachable, a request that hangs) finds its
//!   gate shut and [`Elector::keep`] returns: the caller stops writing and exits.
//!
//! # Guarantees
//!
//! * No two replicas write at once: a candidate waits a lease duration (15 s) after it *saw*
//!   the holder's last renewal, which is later than that renewal was sent; the holder's gate
//!   shut at most a renew deadline (10 s) after it sent it.
//! * The gate is checked before every pod create and delete (see `writer.rs`).
//!
//! # Why not a crate
//!
//! `kube-lease-manager` 0.13 (kube 5) was read first: it reports leadership through a state
//! channel that stays `true` while renewals fail (its watcher logs the error and backs off), and
//! exposes no time until which the lock is known to be held, so it cannot shut writes at a
//! deadline. This module is the small part of client-go's algorithm stoker needs, with the
//! decision ([`Candidate`], [`claim`]) pure and unit-tested.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use tokio::time::Instant;
use tracing::{info, warn};

/// Timings and names. [`LeaseConfig::new`] gives client-go's defaults.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// Namespace of the Lease (stoker's own).
    pub namespace: String,
    /// Name of the Lease (one per stoker instance label).
    pub name: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// How long a holder's renewal keeps others away.
    pub lease_duration: Duration,
    /// How long the leader keeps writing without a successful renewal.
    pub renew_deadline: Duration,
    /// How often to read or renew.
    pub retry_period: Duration,
}

impl LeaseConfig {
    /// client-go's defaults: 15 s lease, 10 s renew deadline, 2 s retry.
    pub fn new(namespace: String, name: String, identity: String) -> Self {
        Self {
            namespace,
            name,
            identity,
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }

    /// Refuses timings under which two leaders could overlap.
    pub fn check(&self) -> Result<(), LeaseError> {
        if self.renew_deadline >= self.lease_duration {
            return Err(LeaseError::Timings(format!(
                "the renew deadline ({:?}) must be shorter than the lease duration ({:?})",
                self.renew_deadline, self.lease_duration
            )));
        }
        if self.retry_period >= self.renew_deadline {
            return Err(LeaseError::Timings(format!(
                "the retry period ({:?}) must be shorter than the renew deadline ({:?})",
                self.retry_period, self.renew_deadline
            )));
        }
        if self.identity.is_empty() {
            return Err(LeaseError::Timings("the identity must not be empty".into()));
        }
        Ok(())
    }
}

/// Why leader election stopped.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Settings that cannot work.
    #[error("leader election: {0}")]
    Timings(String),
    /// The API server refused for good (for example RBAC: no `get`/`create`/`update` on leases).
    #[error("leader election: the API server refused lease {namespace}/{name}: {source}")]
    Refused {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The leader could not renew within the renew deadline.
    #[error("leader election: lease {namespace}/{name} not renewed for {waited:?} (renew deadline {deadline:?}): stepping down")]
    NotRenewed {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Since the last renewal that succeeded was sent.
        waited: Duration,
        /// The renew deadline.
        deadline: Duration,
    },
    /// Another replica holds the lease now.
    #[error("leader election: lease {namespace}/{name} is now held by {holder}: stepping down")]
    Lost {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// The new holder.
        holder: String,
    },
}

// === the pure part ===

/// The fields of a Lease whose change shows its holder is alive.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Record {
    holder: Option<String>,
    renew_time: Option<MicroTime>,
    transitions: Option<i32>,
}

impl Record {
    fn of(lease: Option<&Lease>) -> Self {
        let spec = lease.and_then(|l| l.spec.as_ref());
        Self {
            holder: spec
                .and_then(|s| s.holder_identity.clone())
                .filter(|h| !h.is_empty()),
            renew_time: spec.and_then(|s| s.renew_time.clone()),
            transitions: spec.and_then(|s| s.lease_transitions),
        }
    }
}

/// What a candidate may do after reading the Lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Write itself in as the holder (free, expired, or already its own).
    Take,
    /// Someone else holds it.
    HeldBy {
        /// The holder's identity.
        holder: String,
        /// Until it expires, if it is not renewed (local clock).
        expires_in: Duration,
    },
}

/// A candidate's memory of the Lease: the record it last saw and when it first saw it.
#[derive(Debug)]
pub struct Candidate {
    identity: String,
    lease_duration: Duration,
    observed: Option<(Record, Instant)>,
}

impl Candidate {
    /// A candidate with no observation yet.
    pub fn new(identity: String, lease_duration: Duration) -> Self {
        Self {
            identity,
            lease_duration,
            observed: None,
        }
    }

    /// Takes in the Lease as read at `now` (`None`: it does not exist).
    pub fn observe(&mut self, lease: Option<&Lease>, now: Instant) -> Verdict {
        let record = Record::of(lease);
        let Some(holder) = record.holder.clone() else {
            self.observed = Some((record, now));
            return Verdict::Take;
        };
        if holder == self.identity {
            self.observed = Some((record, now));
            return Verdict::Take;
        }
        let seen_at = match &self.observed {
            Some((last, at)) if *last == record => *at,
            _ => {
                self.observed = Some((record, now));
                now
            }
        };
        // The holder's own lease duration if it wrote one, else ours.
        let duration = lease
            .and_then(|l| l.spec.as_ref())
            .and_then(|s| s.lease_duration_seconds)
            .and_then(|s| u64::try_from(s).ok())
            .map_or(self.lease_duration, Duration::from_secs);
        let expires = seen_at + duration;
        if now >= expires {
            return Verdict::Take;
        }
        Verdict::HeldBy {
            holder,
            expires_in: expires - now,
        }
    }
}

/// The Lease with `identity` as its holder, renewed at `now`: acquired (a new acquire time, one
/// more transition) if someone else held it, renewed otherwise.
pub fn claim(lease: Option<&Lease>, config: &LeaseConfig, now: MicroTime) -> Lease {
    let mut out = lease.cloned().unwrap_or_else(|| Lease {
        metadata: ObjectMeta {
            name: Some(config.name.clone()),
            namespace: Some(config.namespace.clone()),
            ..ObjectMeta::default()
        },
        spec: None,
    });
    let previous = out.spec.take().unwrap_or_default();
    let ours = previous.holder_identity.as_deref() == Some(config.identity.as_str());
    let seconds = i32::try_from(config.lease_duration.as_secs()).unwrap_or(i32::MAX);
    out.spec = Some(LeaseSpec {
        holder_identity: Some(config.identity.clone()),
        lease_duration_seconds: Some(seconds),
        acquire_time: if ours {
            previous.acquire_time.clone().or_else(|| Some(now.clone()))
        } else {
            Some(now.clone())
        },
        renew_time: Some(now),
        // As client-go counts them: every change of holder, also from a released (empty)
        // Lease; a Lease created now starts at 0.
        lease_transitions: Some(if ours || lease.is_none() {
            previous.lease_transitions.unwrap_or(0)
        } else {
            previous.lease_transitions.unwrap_or(0).saturating_add(1)
        }),
        ..previous
    });
    out
}

/// Now, for the Lease's timestamps (which only people and other clients read).
pub fn now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

/// Open while this replica holds the Lease with a renewal younger than the renew deadline.
/// Every pod write checks it first.
#[derive(Debug)]
pub struct WriteGate {
    base: Instant,
    /// Nanoseconds after `base` until which writes are allowed; 0 = shut. `u64::MAX`: always
    /// open (no leader election).
    until: AtomicU64,
}

impl WriteGate {
    /// A gate that is always open: one replica, no election.
    pub fn always_open() -> Arc<Self> {
        Arc::new(Self {
            base: Instant::now(),
            until: AtomicU64::new(u64::MAX),
        })
    }

    /// A gate that is shut until [`Elector`] opens it.
    pub fn shut() -> Arc<Self> {
        Arc::new(Self {
            base: Instant::now(),
            until: AtomicU64::new(0),
        })
    }

    /// True when writes are allowed now.
    pub fn is_open(&self) -> bool {
        let until = self.until.load(Ordering::Acquire);
        until == u64::MAX || self.nanos(Instant::now()) < until
    }

    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX - 1)
    }

    /// Allows writes until `until` (never moves the deadline back).
    fn open_until(&self, until: Instant) {
        let nanos = self.nanos(until).max(1);
        self.until.fetch_max(nanos, Ordering::AcqRel);
    }

    /// Shuts the gate for good.
    fn shut_now(&self) {
        self.until.store(0, Ordering::Release);
    }
}

// === the I/O shell ===

/// Acquires, holds and releases the Lease.
pub struct Elector {
    api: Api<Lease>,
    config: LeaseConfig,
    gate: Arc<WriteGate>,
    /// The Lease as this replica last wrote it (its resourceVersion is the next precondition).
    held: Option<Lease>,
    /// When the last write of the Lease that succeeded was sent.
    last_success: Instant,
}

impl Elector {
    /// An elector for `config`; `gate` is opened while the Lease is held.
    pub fn new(
        client: kube::Client,
        config: LeaseConfig,
        gate: Arc<WriteGate>,
    ) -> Result<Self, LeaseError> {
        config.check()?;
        Ok(Self {
            api: Api::namespaced(client, &config.namespace),
            config,
            gate,
            held: None,
            last_success: Instant::now(),
        })
    }

    /// The gate this elector opens while it leads.
    pub fn gate(&self) -> Arc<WriteGate> {
        Arc::clone(&self.gate)
    }

    fn refused(&self, source: kube::Error) -> LeaseError {
        LeaseError::Refused {
            namespace: self.config.namespace.clone(),
            name: self.config.name.clone(),
            source,
        }
    }

    /// Waits until this replica holds the Lease. Transient errors are retried; a refusal that
    /// will not change (403, 401) is returned.
    pub async fn acquire(&mut self) -> Result<(), LeaseError> {
        let mut candidate =
            Candidate::new(self.config.identity.clone(), self.config.lease_duration);
        let mut last_holder: Option<String> = None;
        loop {
            let sent = Instant::now();
            match self.try_take(&mut candidate).await {
                Ok(Some(holder)) => {
                    if last_holder.as_ref() != Some(&holder) {
                        info!(lease = %self.config.name, %holder, identity = %self.config.identity,
                            "standby: another replica leads");
                        last_holder = Some(holder);
                    }
                }
                Ok(None) => {
                    self.last_success = sent;
                    self.gate.open_until(sent + self.config.renew_deadline);
                    info!(lease = %self.config.name, identity = %self.config.identity, "leader: lease acquired");
                    return Ok(());
                }
                Err(kube::Error::Api(s)) if matches!(s.code, 401 | 403 | 404 | 422) => {
                    return Err(self.refused(kube::Error::Api(s)));
                }
                Err(err) => {
                    warn!(lease = %self.config.name, error = %err, "leader election: cannot read or take the lease; retrying");
                }
            }
            tokio::time::sleep(self.config.retry_period).await;
        }
    }

    /// One read and, if the verdict allows, one write. `Ok(None)`: the Lease is ours now;
    /// `Ok(Some(holder))`: someone else holds it (or won the race).
    async fn try_take(&mut self, candidate: &mut Candidate) -> Result<Option<String>, kube::Error> {
        let timeout = self.config.retry_period;
        let current = with_timeout(timeout, self.api.get_opt(&self.config.name)).await?;
        match candidate.observe(current.as_ref(), Instant::now()) {
            Verdict::HeldBy { holder, .. } => Ok(Some(holder)),
            Verdict::Take => {
                let wanted = claim(current.as_ref(), &self.config, now());
                let written = match current {
                    None => {
                        with_timeout(timeout, self.api.create(&PostParams::default(), &wanted))
                            .await
                    }
                    Some(_) => {
                        with_timeout(
                            timeout,
                            self.api
                                .replace(&self.config.name, &PostParams::default(), &wanted),
                        )
                        .await
                    }
                };
                match written {
                    Ok(lease) => {
                        self.held = Some(lease);
                        Ok(None)
                    }
                    // Another candidate wrote first.
                    Err(kube::Error::Api(s)) if s.code == 409 => {
                        Ok(Some("(another candidate)".into()))
                    }
                    Err(err) => Err(err),
                }
            }
        }
    }

    /// Renews the Lease from now on, in the background of everything else the leader does,
    /// until `stop` completes (graceful shutdown: the Lease is released, `Ok`) or leadership is
    /// lost (`Err` with why; the gate is shut before this returns).
    pub async fn keep(
        mut self,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<(), LeaseError> {
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => {
                    self.release().await;
                    return Ok(());
                }
                () = tokio::time::sleep(self.config.retry_period) => {}
            }
            let sent = Instant::now();
            let left =
                (self.last_success + self.config.renew_deadline).saturating_duration_since(sent);
            match self.renew(left).await {
                Ok(()) => {
                    self.last_success = sent;
                    self.gate.open_until(sent + self.config.renew_deadline);
                }
                Err(Some(lost)) => {
                    self.gate.shut_now();
                    return Err(lost);
                }
                Err(None) => {
                    let waited = Instant::now().saturating_duration_since(self.last_success);
                    if waited >= self.config.renew_deadline {
                        self.gate.shut_now();
                        return Err(LeaseError::NotRenewed {
                            namespace: self.config.namespace.clone(),
                            name: self.config.name.clone(),
                            waited,
                            deadline: self.config.renew_deadline,
                        });
                    }
                }
            }
        }
    }

    /// One renewal. `Err(Some)`: leadership is gone; `Err(None)`: failed for now.
    async fn renew(&mut self, left: Duration) -> Result<(), Option<LeaseError>> {
        if left.is_zero() {
            return Err(None);
        }
        let wanted = claim(self.held.as_ref(), &self.config, now());
        match with_timeout(
            left,
            self.api
                .replace(&self.config.name, &PostParams::default(), &wanted),
        )
        .await
        {
            Ok(lease) => {
                self.held = Some(lease);
                Ok(())
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {
                // Our resourceVersion is stale: read it again and renew only if it is still ours.
                match with_timeout(left, self.api.get_opt(&self.config.name)).await {
                    Ok(current) => {
                        let holder = Record::of(current.as_ref()).holder;
                        if holder.as_deref() == Some(self.config.identity.as_str()) {
                            self.held = current;
                            Err(None)
                        } else {
                            Err(Some(LeaseError::Lost {
                                namespace: self.config.namespace.clone(),
                                name: self.config.name.clone(),
                                holder: holder.unwrap_or_else(|| "nobody".into()),
                            }))
                        }
                    }
                    Err(err) => {
                        warn!(lease = %self.config.name, error = %err, "cannot read the lease after a conflict");
                        Err(None)
                    }
                }
            }
            Err(err) => {
                warn!(lease = %self.config.name, error = %err, "cannot renew the lease");
                Err(None)
            }
        }
    }

    /// Gives the Lease up (graceful shutdown), so a standby takes over at its next read instead
    /// of after a lease duration. Writes stop first.
    async fn release(&mut self) {
        self.gate.shut_now();
        let Some(mut lease) = self.held.take() else {
            return;
        };
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            spec.renew_time = Some(now());
        }
        match with_timeout(
            self.config.retry_period,
            self.api
                .replace(&self.config.name, &PostParams::default(), &lease),
        )
        .await
        {
            Ok(_) => info!(lease = %self.config.name, "lease released"),
            Err(err) => {
                warn!(lease = %self.config.name, error = %err, "cannot release the lease; it expires on its own")
            }
        }
    }
}

/// The label a leader puts on its own pod, so that the Service (which selects it) sends drivers
/// to the leader only, while readiness stays true on every replica (a standby that never became
/// ready would stall every rolling update of the Deployment).
pub const LEADER_LABEL: &str = "stoker.dev/leader";

/// Sets (`leading`) or removes [`LEADER_LABEL`] on this replica's own pod.
pub async fn label_own_pod(
    client: kube::Client,
    namespace: &str,
    pod: &str,
    leading: bool,
) -> Result<(), kube::Error> {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{Patch, PatchParams};
    let value = if leading {
        serde_json::Value::String("true".into())
    } else {
        serde_json::Value::Null
    };
    let patch = serde_json::json!({"metadata": {"labels": {LEADER_LABEL: value}}});
    let api: Api<Pod> = Api::namespaced(client, namespace);
    api.patch(pod, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
}

async fn with_timeout<T>(
    limit: Duration,
    call: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, kube::Error> {
    match tokio::time::timeout(limit, call).await {
        Ok(result) => result,
        Err(_) => Err(kube::Error::Service(
            format!("no answer within {limit:?}").into(),
        )),
    }
}

#[cfg(test)]
mod tests;
