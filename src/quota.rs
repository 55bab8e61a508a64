//! Quotas over what all applications hold together: applications in all and per namespace,
//! executors per application and in all.
//!
//! Flow: registration asks [`Quotas::admit`] for an [`Admission`] before the application enters
//! the registry; the application's actor owns it and asks [`Admission::reserve`] before any
//! command that raises its targets, then [`Admission::settle`]s on what the engine holds after
//! every input. Dropping the admission (the actor has ended, or the registration lost a race)
//! gives everything back.
//!
//! Guarantees: the counts never exceed their limits, even under concurrent registrations and
//! target changes (every check-and-count happens under one lock, held for a few additions and
//! never across an `.await`); lowering a target is never refused; a refusal changes nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use stoker_core::{AppId, ExecutorTemplate, ProfileId};

use crate::config::{Limits, NamespaceSource};
use crate::error::{Limit, LimitError};

/// Whom an application's usage counts against.
///
/// Today its namespace only: drivers do not authenticate yet, so there is no identity to count
/// by, and none is invented. When they authenticate with their Kubernetes identity, the
/// identity (ServiceAccount) joins this key and a per-identity limit counts by it the way
/// `--max-applications-per-namespace` counts by the namespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct QuotaKey {
    /// The application's namespace; empty for the local backend (one namespace for all).
    pub namespace: String,
    /// The driver identity that registered it (`--auth kubernetes`), by user name.
    pub identity: Option<String>,
}

impl QuotaKey {
    /// The key of an application registered with `template`.
    pub fn of(template: &ExecutorTemplate, source: &NamespaceSource) -> Self {
        let namespace = match source {
            NamespaceSource::Single => String::new(),
            NamespaceSource::Kubernetes { default } => {
                if template.kubernetes.namespace.is_empty() {
                    default.clone()
                } else {
                    template.kubernetes.namespace.clone()
                }
            }
        };
        Self {
            namespace,
            identity: template.identity.as_ref().map(|i| i.username.clone()),
        }
    }

    fn describe_namespace(&self) -> String {
        if self.namespace.is_empty() {
            "this stoker's one namespace (local backend)".to_owned()
        } else {
            format!("namespace {:?}", self.namespace)
        }
    }
}

#[derive(Debug, Default)]
struct Usage {
    applications: usize,
    per_namespace: HashMap<String, usize>,
    per_identity: HashMap<String, usize>,
    executors: u64,
}

/// The counts and their limits, shared by all applications.
#[derive(Debug)]
pub struct Quotas {
    max_applications: usize,
    max_applications_per_namespace: usize,
    max_applications_per_identity: usize,
    max_executors_per_application: u64,
    max_executors: u64,
    usage: Mutex<Usage>,
}

impl Quotas {
    /// Empty counts under `limits`.
    pub fn new(limits: &Limits) -> Self {
        Self {
            max_applications: limits.max_applications,
            max_applications_per_namespace: limits.max_applications_per_namespace,
            max_applications_per_identity: limits.max_applications_per_identity,
            max_executors_per_application: limits.max_executors_per_application,
            max_executors: limits.max_executors,
            usage: Mutex::new(Usage::default()),
        }
    }

    fn usage(&self) -> MutexGuard<'_, Usage> {
        // The critical sections only add and compare; a panic there leaves consistent counts.
        self.usage.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applications counted now.
    pub fn applications(&self) -> usize {
        self.usage().applications
    }

    /// Executors asked for by all applications now (the sum of their targets).
    pub fn executors(&self) -> u64 {
        self.usage().executors
    }

    /// Counts a new application `app_id` of `key` with `executors` asked for at registration
    /// (its initial targets), or refuses it and counts nothing.
    pub fn admit(
        self: &Arc<Self>,
        app_id: &AppId,
        key: QuotaKey,
        executors: u64,
    ) -> Result<Admission, LimitError> {
        self.check_application("initial_targets", app_id, executors)?;
        let mut usage = self.usage();
        if usage.applications >= self.max_applications {
            return Err(LimitError::new(
                Limit::Applications,
                format!(
                    "applications: this stoker serves {} applications, the limit set by {}; \
                     retry when one has ended",
                    usage.applications,
                    Limit::Applications.flag()
                ),
            ));
        }
        let in_namespace = usage
            .per_namespace
            .get(&key.namespace)
            .copied()
            .unwrap_or(0);
        if in_namespace >= self.max_applications_per_namespace {
            return Err(LimitError::new(
                Limit::ApplicationsPerNamespace,
                format!(
                    "applications: {} has {in_namespace} applications, the limit set by {}; \
                     retry when one has ended",
                    key.describe_namespace(),
                    Limit::ApplicationsPerNamespace.flag()
                ),
            ));
        }
        if let Some(identity) = &key.identity {
            let by_identity = usage.per_identity.get(identity).copied().unwrap_or(0);
            if by_identity >= self.max_applications_per_identity {
                return Err(LimitError::new(
                    Limit::ApplicationsPerIdentity,
                    format!(
                        "applications: {identity} has {by_identity} applications, the limit set \
                         by {}; retry when one has ended",
                        Limit::ApplicationsPerIdentity.flag()
                    ),
                ));
            }
        }
        self.check_executors(&usage, 0, executors, app_id, "initial_targets")?;
        if let Some(identity) = &key.identity {
            *usage.per_identity.entry(identity.clone()).or_default() += 1;
        }
        usage.applications += 1;
        *usage
            .per_namespace
            .entry(key.namespace.clone())
            .or_default() += 1;
        usage.executors += executors;
        drop(usage);
        Ok(Admission {
            quotas: Arc::clone(self),
            key,
            executors,
        })
    }

    /// The per-application cap, which needs no counts.
    fn check_application(&self, field: &str, app_id: &AppId, total: u64) -> Result<(), LimitError> {
        if total <= self.max_executors_per_application {
            return Ok(());
        }
        Err(LimitError::new(
            Limit::ExecutorsPerApplication,
            format!(
                "{field}: {total} executors for application {app_id} (summed over its resource \
                 profiles) exceed the limit of {} per application set by {}",
                self.max_executors_per_application,
                Limit::ExecutorsPerApplication.flag()
            ),
        ))
    }

    /// Whether all applications may hold `total` executors instead of `held` for one of them.
    fn check_executors(
        &self,
        usage: &Usage,
        held: u64,
        total: u64,
        app_id: &AppId,
        field: &str,
    ) -> Result<(), LimitError> {
        let others = usage.executors.saturating_sub(held);
        let after = others.saturating_add(total);
        if after <= self.max_executors {
            return Ok(());
        }
        Err(LimitError::new(
            Limit::Executors,
            format!(
                "{field}: {total} executors for application {app_id} would bring this stoker to \
                 {after} executors, above the limit of {} set by {}",
                self.max_executors,
                Limit::Executors.flag()
            ),
        ))
    }
}

/// One application's share of the quotas, given back when dropped.
#[derive(Debug)]
pub struct Admission {
    quotas: Arc<Quotas>,
    key: QuotaKey,
    executors: u64,
}

impl Admission {
    /// Executors charged to the application now.
    pub fn executors(&self) -> u64 {
        self.executors
    }

    /// Makes room for the application to hold `total` executors before its targets change, or
    /// refuses and changes nothing. A lower total is always allowed; it is counted when
    /// [`Admission::settle`]d, after the engine took it, so that the room is never given away
    /// before the targets have really dropped.
    pub fn reserve(&mut self, app_id: &AppId, field: &str, total: u64) -> Result<(), LimitError> {
        if total <= self.executors {
            return Ok(());
        }
        self.quotas.check_application(field, app_id, total)?;
        let mut usage = self.quotas.usage();
        self.quotas
            .check_executors(&usage, self.executors, total, app_id, field)?;
        usage.executors = usage.executors.saturating_sub(self.executors) + total;
        self.executors = total;
        Ok(())
    }

    /// Charges what the application's engine holds now (after a command took effect or was
    /// refused, or the application is ending). Never above what was reserved.
    pub fn settle(&mut self, total: u64) {
        if total == self.executors {
            return;
        }
        debug_assert!(
            total < self.executors,
            "settle({total}) above the reservation {}",
            self.executors
        );
        let mut usage = self.quotas.usage();
        usage.executors = usage.executors.saturating_sub(self.executors) + total;
        self.executors = total;
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut usage = self.quotas.usage();
        usage.applications = usage.applications.saturating_sub(1);
        if let Some(count) = usage.per_namespace.get_mut(&self.key.namespace) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                usage.per_namespace.remove(&self.key.namespace);
            }
        }
        if let Some(identity) = &self.key.identity {
            if let Some(count) = usage.per_identity.get_mut(identity) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    usage.per_identity.remove(identity);
                }
            }
        }
        usage.executors = usage.executors.saturating_sub(self.executors);
    }
}

/// The sum of an application's targets once `changes` are applied over `current`.
pub fn total_after(
    current: &std::collections::BTreeMap<ProfileId, u32>,
    changes: &[(ProfileId, u64)],
) -> u64 {
    let mut merged: std::collections::BTreeMap<ProfileId, u64> = current
        .iter()
        .map(|(&profile, &total)| (profile, u64::from(total)))
        .collect();
    for &(profile, total) in changes {
        merged.insert(profile, total);
    }
    merged.values().fold(0u64, |sum, &t| sum.saturating_add(t))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn quotas(apps: usize, per_ns: usize, per_app: u64, all: u64) -> Arc<Quotas> {
        Arc::new(Quotas::new(&Limits {
            max_applications: apps,
            max_applications_per_namespace: per_ns,
            max_executors_per_application: per_app,
            max_executors: all,
            ..Limits::default()
        }))
    }

    fn key(ns: &str) -> QuotaKey {
        QuotaKey {
            namespace: ns.into(),
            identity: None,
        }
    }

    #[test]
    fn one_identity_cannot_take_every_slot_and_gets_its_slots_back() {
        let q = Arc::new(Quotas::new(&Limits {
            max_applications_per_identity: 2,
            ..Limits::default()
        }));
        let of = |who: &str| QuotaKey {
            namespace: "etl".into(),
            identity: Some(who.into()),
        };
        let a = q.admit(&app("a"), of("alice"), 1).expect("a");
        let _b = q.admit(&app("b"), of("alice"), 1).expect("b");
        let err = q
            .admit(&app("c"), of("alice"), 1)
            .expect_err("alice is at her limit");
        assert_eq!(err.limit, Limit::ApplicationsPerIdentity);
        assert!(
            err.to_string().contains("--max-applications-per-identity"),
            "{err}"
        );
        assert_eq!(q.applications(), 2, "a refusal counts nothing");
        let _d = q.admit(&app("d"), of("bob"), 1).expect("bob has his own");
        drop(a);
        let _c = q
            .admit(&app("c"), of("alice"), 1)
            .expect("a slot came back");
    }

    fn app(name: &str) -> AppId {
        AppId::parse(name).expect("app id")
    }

    #[test]
    fn admissions_count_and_give_back() {
        let q = quotas(3, 2, 10, 15);
        let a = q.admit(&app("a"), key("x"), 5).expect("a");
        let b = q.admit(&app("b"), key("x"), 5).expect("b");
        let err = q.admit(&app("c"), key("x"), 0).expect_err("namespace full");
        assert_eq!(err.limit, Limit::ApplicationsPerNamespace);
        let err = q.admit(&app("c"), key("y"), 6).expect_err("executors full");
        assert_eq!(err.limit, Limit::Executors);
        let err = q.admit(&app("c"), key("y"), 11).expect_err("too large");
        assert_eq!(err.limit, Limit::ExecutorsPerApplication);
        assert_eq!(
            (q.applications(), q.executors()),
            (2, 10),
            "refusals count nothing"
        );
        let c = q.admit(&app("c"), key("y"), 5).expect("c");
        let err = q.admit(&app("d"), key("z"), 0).expect_err("all full");
        assert_eq!(err.limit, Limit::Applications);
        drop(a);
        assert_eq!((q.applications(), q.executors()), (2, 10));
        let _d = q.admit(&app("d"), key("x"), 0).expect("room again in x");
        drop((b, c));
        assert_eq!((q.applications(), q.executors()), (1, 0));
    }

    #[test]
    fn reserve_raises_only_within_limits_and_settle_lowers() {
        let q = quotas(3, 3, 10, 12);
        let mut a = q.admit(&app("a"), key(""), 4).expect("a");
        let mut b = q.admit(&app("b"), key(""), 4).expect("b");
        let err = a.reserve(&app("a"), "targets", 11).expect_err("per app");
        assert_eq!(err.limit, Limit::ExecutorsPerApplication);
        let err = a.reserve(&app("a"), "targets", 9).expect_err("in all");
        assert_eq!(err.limit, Limit::Executors);
        assert_eq!((a.executors(), q.executors()), (4, 8));
        a.reserve(&app("a"), "targets", 8).expect("exactly full");
        assert_eq!(q.executors(), 12);
        b.reserve(&app("b"), "targets", 1)
            .expect("lowering is allowed");
        assert_eq!(q.executors(), 12, "counted once settled");
        b.settle(1);
        assert_eq!(q.executors(), 9);
        a.settle(0);
        assert_eq!(q.executors(), 1);
    }

    #[test]
    fn total_after_merges_changes_over_current_targets() {
        let current = BTreeMap::from([(0, 3), (1, 4)]);
        assert_eq!(total_after(&current, &[]), 7);
        assert_eq!(total_after(&current, &[(1, 10)]), 13);
        assert_eq!(total_after(&current, &[(2, 1), (0, 0)]), 5);
    }

    #[test]
    fn keys_follow_the_backend() {
        let mut template = ExecutorTemplate::default();
        assert_eq!(QuotaKey::of(&template, &NamespaceSource::Single), key(""));
        let kube = NamespaceSource::Kubernetes {
            default: "default".into(),
        };
        assert_eq!(QuotaKey::of(&template, &kube), key("default"));
        template.kubernetes.namespace = "spark".into();
        assert_eq!(QuotaKey::of(&template, &kube), key("spark"));
        assert_eq!(QuotaKey::of(&template, &NamespaceSource::Single), key(""));
    }
}
