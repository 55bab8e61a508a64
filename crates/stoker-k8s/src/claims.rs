//! Which on-demand claims of an application a new executor may take over: Spark's
//! `spark.kubernetes.driver.reusePersistentVolumeClaim`, as its `ExecutorPodsAllocator`
//! (`getReusablePVCs`, `replacePVCsIfNeeded`) does it, kept in memory instead of listed from
//! the API server before every batch. Pure: no I/O, no clock.
//!
//! Spark's rule, kept here:
//! * only claims that outlive their executor can be reused, that is claims owned by the driver
//!   pod (`ownPersistentVolumeClaim`, the default, with a driver pod); the shell adds only those;
//! * a claim is free when no live executor pod of the application mounts it (Spark: no pod of
//!   the snapshot that is not failed, succeeded or deleted has it in its volumes);
//! * a new executor's on-demand claim is replaced by a free one of the **same storage class and
//!   the same requested size**, each free claim used once; the claims it replaces are not
//!   created.
//!
//! Where stoker differs: a claim is held from the moment stoker builds the executor's pod (not
//! from the pod's appearance in a snapshot), so Spark's guard against reusing a claim created less
//! than `spark.kubernetes.allocation.batch.delay` ago is not needed: nothing is reused twice.
//!
//! `spark.kubernetes.driver.waitToReusePersistentVolumeClaim` ([`ClaimPool::admit`] with a
//! limit): Spark creates no executor while no claim is free and the driver has created `maxPVCs`
//! claims or more (`requestNewExecutors`). The pool counts the claims it knows and those promised
//! to executors whose pods are being created (Spark's `PVC_COUNTER`, which a batch of creations
//! in flight would otherwise pass).

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use stoker_core::ExecutorId;

use crate::pod::LABEL_EXEC_ID;

/// What makes two on-demand claims interchangeable (Spark compares exactly these).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Shape {
    /// `spec.storageClassName`.
    pub storage_class: Option<String>,
    /// `spec.resources.requests.storage`, as written.
    pub size: Option<String>,
}

/// One claim the pool knows.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    shape: Shape,
    /// The executor whose pod mounts it; `None`: free.
    holder: Option<ExecutorId>,
}

/// A claim a new executor's pod asks for: the name it would be created under, and its shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    /// The on-demand claim's own name (`<pod>-pvc-<n>`).
    pub name: String,
    /// Its storage class and size.
    pub shape: Shape,
}

/// One application's reusable claims.
#[derive(Clone, Debug, Default)]
pub struct ClaimPool {
    claims: BTreeMap<String, Entry>,
    /// Claims to be created for executors being created (not yet in `claims`), by executor.
    promised: BTreeMap<ExecutorId, usize>,
}

/// What [`ClaimPool::admit`] decided for a new executor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Go on: the claims it takes over, as `(wanted name, reused claim name)`; the others are
    /// created (and promised until then).
    Go(Vec<(String, String)>),
    /// No claim is free and the application has `limit` claims or more: wait for one.
    Wait {
        /// Claims known and promised.
        claims: usize,
    },
}

impl ClaimPool {
    /// An empty pool.
    pub fn new() -> Self {
        Self::default()
    }

    /// For a new `executor` whose pod asks for `wanted`: the claims it takes over, as
    /// `(wanted name, reused claim name)`; those claims are held by `executor` from now on.
    /// A wanted claim without a free match is not in the answer (it is to be created).
    pub fn reuse(&mut self, executor: ExecutorId, wanted: &[Wanted]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for want in wanted {
            let free = self
                .claims
                .iter_mut()
                .find(|(_, e)| e.holder.is_none() && e.shape == want.shape);
            if let Some((name, entry)) = free {
                entry.holder = Some(executor);
                out.push((want.name.clone(), name.clone()));
            }
        }
        out
    }

    /// [`Self::reuse`], unless `limit` says to wait (Spark's `waitToReusePersistentVolumeClaim`:
    /// no claim free and `limit` claims or more, counting those promised); the claims `executor`
    /// is to create are promised until [`Self::created`] or [`Self::not_created`].
    pub fn admit(
        &mut self,
        executor: ExecutorId,
        wanted: &[Wanted],
        limit: Option<usize>,
    ) -> Admission {
        let claims = self.total();
        if let Some(limit) = limit {
            if !wanted.is_empty() && self.free() == 0 && claims >= limit {
                return Admission::Wait { claims };
            }
        }
        let swaps = self.reuse(executor, wanted);
        let to_create = wanted.len() - swaps.len();
        if to_create > 0 {
            *self.promised.entry(executor).or_default() += to_create;
        }
        Admission::Go(swaps)
    }

    /// Claims known and promised: what [`Self::admit`] compares with its limit.
    pub fn total(&self) -> usize {
        self.claims.len() + self.promised.values().sum::<usize>()
    }

    /// A claim promised to `executor` will not join the pool (its creation failed, or it is not
    /// owned by the driver pod).
    pub fn not_created(&mut self, executor: ExecutorId) {
        self.unpromise(executor);
    }

    fn unpromise(&mut self, executor: ExecutorId) {
        if let std::collections::btree_map::Entry::Occupied(mut n) = self.promised.entry(executor) {
            *n.get_mut() -= 1;
            if *n.get() == 0 {
                n.remove();
            }
        }
    }

    /// Claim `name` was created for `executor`, whose pod mounts it.
    pub fn created(&mut self, name: String, shape: Shape, executor: ExecutorId) {
        self.unpromise(executor);
        self.claims.insert(
            name,
            Entry {
                shape,
                holder: Some(executor),
            },
        );
    }

    /// `executor` has ended (its pod failed, succeeded, was deleted, or was never created):
    /// the claims it held are free. Returns how many.
    pub fn released(&mut self, executor: ExecutorId) -> usize {
        self.promised.remove(&executor);
        let mut freed = 0;
        for entry in self.claims.values_mut() {
            if entry.holder == Some(executor) {
                entry.holder = None;
                freed += 1;
            }
        }
        freed
    }

    /// After a restart of stoker: the application's claims as the API server lists them,
    /// each held by the live executor whose pod mounts it (`in_use`) or free. Only claims the
    /// driver pod `driver_pod` owns can outlive their executor, so only those are taken; a claim
    /// the pool knows already keeps what the pool knows (it was created or taken over since).
    pub fn seed(
        &mut self,
        claims: &[PersistentVolumeClaim],
        driver_pod: &str,
        in_use: &HashMap<String, ExecutorId>,
    ) -> usize {
        let mut added = 0;
        for claim in claims {
            let Some(name) = claim.metadata.name.clone() else {
                continue;
            };
            let by_driver = claim
                .metadata
                .owner_references
                .iter()
                .flatten()
                .any(|o| o.kind == "Pod" && o.name == driver_pod);
            if !by_driver || claim.metadata.deletion_timestamp.is_some() {
                continue;
            }
            if let std::collections::btree_map::Entry::Vacant(slot) = self.claims.entry(name) {
                let holder = in_use.get(slot.key()).copied();
                slot.insert(Entry {
                    shape: crate::spark_pod::shape_of(claim),
                    holder,
                });
                added += 1;
            }
        }
        added
    }

    /// Claims known, free or held.
    pub fn len(&self) -> usize {
        self.claims.len()
    }

    /// True when the pool knows no claim.
    pub fn is_empty(&self) -> bool {
        self.claims.is_empty()
    }

    /// Claims no executor holds.
    pub fn free(&self) -> usize {
        self.claims.values().filter(|e| e.holder.is_none()).count()
    }

    /// The executor holding claim `name`, if any.
    pub fn holder(&self, name: &str) -> Option<ExecutorId> {
        self.claims.get(name).and_then(|e| e.holder)
    }
}

/// The claims that live executor pods mount, by the executor (Spark: claims of pods that are
/// not failed, succeeded or deleted are in use).
pub fn in_use(pods: &[Pod]) -> HashMap<String, ExecutorId> {
    let mut out = HashMap::new();
    for pod in pods {
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded" | "Failed"))
            || pod.metadata.deletion_timestamp.is_some()
        {
            continue;
        }
        let Some(executor) = pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_EXEC_ID))
            .and_then(|id| id.parse::<u64>().ok())
            .map(ExecutorId::new)
        else {
            continue;
        };
        let volumes = pod.spec.as_ref().and_then(|s| s.volumes.as_ref());
        for volume in volumes.into_iter().flatten() {
            if let Some(claim) = &volume.persistent_volume_claim {
                out.insert(claim.claim_name.clone(), executor);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashMap};

    use proptest::prelude::*;

    use super::*;

    fn shape(class: &str, size: &str) -> Shape {
        Shape {
            storage_class: Some(class.into()),
            size: Some(size.into()),
        }
    }

    fn want(name: &str, class: &str, size: &str) -> Wanted {
        Wanted {
            name: name.into(),
            shape: shape(class, size),
        }
    }

    #[test]
    fn a_replacement_takes_over_the_claim_of_the_executor_that_ended() {
        let mut pool = ClaimPool::new();
        pool.created("e1-pvc-0".into(), shape("fast", "1Gi"), ExecutorId::new(1));
        pool.created("e2-pvc-0".into(), shape("fast", "1Gi"), ExecutorId::new(2));
        assert!(pool
            .reuse(ExecutorId::new(3), &[want("e3-pvc-0", "fast", "1Gi")])
            .is_empty());
        assert_eq!(pool.released(ExecutorId::new(1)), 1);
        assert_eq!(
            pool.reuse(ExecutorId::new(4), &[want("e4-pvc-0", "fast", "1Gi")]),
            vec![("e4-pvc-0".to_string(), "e1-pvc-0".to_string())]
        );
        assert_eq!(pool.holder("e1-pvc-0"), Some(ExecutorId::new(4)));
        // Taken: a second newcomer gets nothing.
        assert!(pool
            .reuse(ExecutorId::new(5), &[want("e5-pvc-0", "fast", "1Gi")])
            .is_empty());
    }

    #[test]
    fn only_a_claim_of_the_same_class_and_size_is_reused() {
        let mut pool = ClaimPool::new();
        pool.created("a".into(), shape("fast", "1Gi"), ExecutorId::new(1));
        pool.released(ExecutorId::new(1));
        assert!(pool
            .reuse(ExecutorId::new(2), &[want("x", "slow", "1Gi")])
            .is_empty());
        assert!(pool
            .reuse(ExecutorId::new(2), &[want("x", "fast", "2Gi")])
            .is_empty());
        let no_class = Wanted {
            name: "x".into(),
            shape: Shape {
                storage_class: None,
                size: Some("1Gi".into()),
            },
        };
        assert!(pool.reuse(ExecutorId::new(2), &[no_class]).is_empty());
        assert_eq!(pool.free(), 1);
    }

    #[test]
    fn an_executor_with_two_claims_takes_two_and_gives_back_two() {
        let mut pool = ClaimPool::new();
        pool.created("e1-pvc-0".into(), shape("fast", "1Gi"), ExecutorId::new(1));
        pool.created("e1-pvc-1".into(), shape("big", "10Gi"), ExecutorId::new(1));
        assert_eq!(pool.released(ExecutorId::new(1)), 2);
        let got = pool.reuse(
            ExecutorId::new(2),
            &[
                want("e2-pvc-0", "fast", "1Gi"),
                want("e2-pvc-1", "big", "10Gi"),
            ],
        );
        assert_eq!(
            got,
            vec![
                ("e2-pvc-0".to_string(), "e1-pvc-0".to_string()),
                ("e2-pvc-1".to_string(), "e1-pvc-1".to_string())
            ]
        );
        assert_eq!(pool.free(), 0);
        assert_eq!(pool.released(ExecutorId::new(2)), 2);
    }

    #[test]
    fn releasing_an_executor_that_holds_nothing_frees_nothing() {
        let mut pool = ClaimPool::new();
        pool.created("a".into(), shape("fast", "1Gi"), ExecutorId::new(1));
        assert_eq!(pool.released(ExecutorId::new(7)), 0);
        assert_eq!(pool.free(), 0);
        assert_eq!(pool.len(), 1);
    }

    #[test]
    fn at_the_limit_with_nothing_free_a_new_executor_waits_counting_claims_being_created() {
        let mut pool = ClaimPool::new();
        let limit = Some(2);
        let go = |pool: &mut ClaimPool, id: u64| {
            pool.admit(
                ExecutorId::new(id),
                &[want(&format!("e{id}-pvc-0"), "fast", "1Gi")],
                limit,
            )
        };
        assert_eq!(go(&mut pool, 1), Admission::Go(vec![]));
        assert_eq!(go(&mut pool, 2), Admission::Go(vec![]));
        // Both claims are still being created: they count (a burst cannot pass the limit).
        assert_eq!(pool.len(), 0);
        assert_eq!(go(&mut pool, 3), Admission::Wait { claims: 2 });
        pool.created("e1-pvc-0".into(), shape("fast", "1Gi"), ExecutorId::new(1));
        // Executor 2's claim could not be created: it does not count any more.
        pool.not_created(ExecutorId::new(2));
        assert_eq!(pool.total(), 1);
        assert_eq!(go(&mut pool, 3), Admission::Go(vec![]));
        assert_eq!(go(&mut pool, 4), Admission::Wait { claims: 2 });
        // Executor 1 ends: executor 4 takes its claim; executor 3 ends before its claim exists.
        pool.released(ExecutorId::new(1));
        assert_eq!(
            go(&mut pool, 4),
            Admission::Go(vec![("e4-pvc-0".into(), "e1-pvc-0".into())])
        );
        pool.released(ExecutorId::new(3));
        assert_eq!(pool.total(), 1);
        // No limit: never waits.
        assert_eq!(
            pool.admit(ExecutorId::new(5), &[want("e5", "fast", "1Gi")], None),
            Admission::Go(vec![])
        );
        // Nothing wanted: nothing to wait for.
        assert_eq!(
            pool.admit(ExecutorId::new(6), &[], Some(0)),
            Admission::Go(vec![])
        );
    }

    fn listed_claim(name: &str, owner: &str, deleting: bool) -> PersistentVolumeClaim {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": name,
                "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": owner, "uid": "u"}],
                "deletionTimestamp": if deleting { Some("2026-11-30T00:00:00Z") } else { None },
            },
            "spec": {"storageClassName": "fast", "resources": {"requests": {"storage": "1Gi"}}},
        }))
        .expect("claim")
    }

    fn listed_pod(exec_id: &str, claim: &str, phase: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("p-{exec_id}"), "labels": {"spark-exec-id": exec_id}},
            "spec": {"containers": [], "volumes": [
                {"name": "spark-local-dir-1", "persistentVolumeClaim": {"claimName": claim}}]},
            "status": {"phase": phase},
        }))
        .expect("pod")
    }

    #[test]
    fn after_a_restart_the_drivers_claims_are_seeded_held_by_live_pods_or_free() {
        let pods = [
            listed_pod("3", "c-held", "Running"),
            listed_pod("1", "c-free", "Failed"),
            listed_pod("x", "c-odd", "Running"),
        ];
        let used = in_use(&pods);
        assert_eq!(used.get("c-held"), Some(&ExecutorId::new(3)));
        assert_eq!(used.get("c-free"), None, "a failed pod holds nothing");
        assert_eq!(
            used.get("c-odd"),
            None,
            "no executor id: not an executor of ours"
        );
        let mut pool = ClaimPool::new();
        pool.created("c-new".into(), shape("fast", "1Gi"), ExecutorId::new(9));
        let claims = [
            listed_claim("c-held", "driver", false),
            listed_claim("c-free", "driver", false),
            listed_claim("c-pods", "p-2", false),
            listed_claim("c-going", "driver", true),
            listed_claim("c-new", "driver", false),
        ];
        assert_eq!(pool.seed(&claims, "driver", &used), 2);
        assert_eq!(pool.holder("c-held"), Some(ExecutorId::new(3)));
        assert_eq!(pool.holder("c-free"), None);
        assert_eq!(
            pool.holder("c-new"),
            Some(ExecutorId::new(9)),
            "what the pool knew stays"
        );
        assert_eq!(
            pool.len(),
            3,
            "claims of pods and claims being deleted are not taken"
        );
        assert_eq!(
            pool.reuse(ExecutorId::new(10), &[want("c-10", "fast", "1Gi")]),
            vec![("c-10".to_string(), "c-free".to_string())]
        );
    }

    #[derive(Clone, Debug)]
    enum Step {
        /// A new executor asks for `n` claims of shape `s`.
        Launch { n: usize, s: u8 },
        /// The executor launched `k` steps ago (mod live count) ends.
        End(usize),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (1usize..3, 0u8..2).prop_map(|(n, s)| Step::Launch { n, s }),
            any::<usize>().prop_map(Step::End),
        ]
    }

    proptest! {
        /// Over any sequence of launches and ends: a claim is never held by two live executors,
        /// a live executor holds exactly the claims it asked for (reused or created), an ended
        /// executor holds none, and no claim is created while a free one of its shape exists.
        #[test]
        fn no_claim_is_ever_held_twice_and_none_is_created_when_one_is_free(
            steps in proptest::collection::vec(step(), 1..60)
        ) {
            let mut pool = ClaimPool::new();
            let mut live: Vec<(ExecutorId, usize)> = Vec::new();
            let mut next_id: u64 = 1;
            for s in steps {
                match s {
                    Step::Launch { n, s } => {
                        let id = ExecutorId::new(next_id);
                        next_id += 1;
                        let class = if s == 0 { "fast" } else { "slow" };
                        let wanted: Vec<Wanted> = (0..n)
                            .map(|i| want(&format!("e{next_id}-pvc-{i}"), class, "1Gi"))
                            .collect();
                        let free_before = pool
                            .claims
                            .values()
                            .filter(|e| e.holder.is_none() && e.shape == shape(class, "1Gi"))
                            .count();
                        let reused = pool.reuse(id, &wanted);
                        prop_assert_eq!(reused.len(), n.min(free_before));
                        let reused_names: BTreeSet<&String> = reused.iter().map(|(w, _)| w).collect();
                        for w in &wanted {
                            if !reused_names.contains(&w.name) {
                                pool.created(w.name.clone(), w.shape.clone(), id);
                            }
                        }
                        live.push((id, n));
                    }
                    Step::End(k) => {
                        if live.is_empty() {
                            continue;
                        }
                        let (id, n) = live.remove(k % live.len());
                        prop_assert_eq!(pool.released(id), n);
                    }
                }
                let mut held: HashMap<ExecutorId, usize> = HashMap::new();
                for e in pool.claims.values() {
                    if let Some(h) = e.holder {
                        *held.entry(h).or_default() += 1;
                    }
                }
                let expected: HashMap<ExecutorId, usize> = live.iter().copied().collect();
                prop_assert_eq!(held, expected);
            }
        }

        /// With Spark's waitToReusePersistentVolumeClaim and one claim per executor: the claims
        /// (created or being created) never exceed the limit, and an executor waits only when
        /// none is free; whatever order creations, failures and ends come in.
        #[test]
        fn with_a_limit_claims_never_exceed_it_and_no_executor_waits_while_one_is_free(
            limit in 1usize..5,
            steps in proptest::collection::vec((0u8..4, any::<usize>()), 1..80)
        ) {
            let mut pool = ClaimPool::new();
            // Executors admitted whose claim is being created, and those holding one.
            let mut creating: Vec<ExecutorId> = Vec::new();
            let mut holding: Vec<ExecutorId> = Vec::new();
            let mut next_id: u64 = 1;
            for (op, k) in steps {
                match op {
                    0 => {
                        let id = ExecutorId::new(next_id);
                        next_id += 1;
                        let free = pool.free();
                        match pool.admit(id, &[want(&format!("e{}", id.get()), "fast", "1Gi")], Some(limit)) {
                            Admission::Go(swaps) if swaps.is_empty() => creating.push(id),
                            Admission::Go(_) => holding.push(id),
                            Admission::Wait { claims } => {
                                prop_assert_eq!(free, 0);
                                prop_assert!(claims >= limit);
                            }
                        }
                    }
                    1 if !creating.is_empty() => {
                        let id = creating.remove(k % creating.len());
                        pool.created(format!("e{}", id.get()), shape("fast", "1Gi"), id);
                        holding.push(id);
                    }
                    2 if !creating.is_empty() => {
                        let id = creating.remove(k % creating.len());
                        pool.not_created(id);
                        pool.released(id);
                    }
                    3 if !holding.is_empty() => {
                        let id = holding.remove(k % holding.len());
                        pool.released(id);
                    }
                    _ => {}
                }
                prop_assert!(pool.total() <= limit, "{} claims, limit {}", pool.total(), limit);
                prop_assert_eq!(pool.total() - pool.len(), creating.len());
            }
        }
    }
}
