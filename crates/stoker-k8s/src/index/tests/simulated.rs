//! Random interleavings of watch events, re-lists (410 Gone), pod creations, kubelet progress,
//! deletions by others, driver kills and claims, against a simulated API server whose watch
//! delivers events in order and whose re-list snapshot is taken at a random moment after the
//! watcher's `Init`. The invariants of issue 12:
//!
//! * a pod stoker believes live is never deleted unless its application asked (or its end was
//!   already reported);
//! * every executor is reported gone at most once, never while its pod lives, and once it is
//!   gone it is reported;
//! * no executor pod is created twice, and none is left behind that nobody tracks.

use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;

use super::*;

#[derive(Clone, Debug)]
enum Op {
    Launch(u8),
    CreateSend(u8),
    CreateReturn(u8),
    CreateFail(u8),
    Deliver,
    Kubelet(u8),
    ExternalDelete(u8),
    FinishDeletion(u8),
    Terminate(u8, bool),
    Expire,
    ListSnapshot,
    RelistApply,
    Claim(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => any::<u8>().prop_map(Op::Launch),
        3 => any::<u8>().prop_map(Op::CreateSend),
        3 => any::<u8>().prop_map(Op::CreateReturn),
        1 => any::<u8>().prop_map(Op::CreateFail),
        6 => Just(Op::Deliver),
        3 => any::<u8>().prop_map(Op::Kubelet),
        1 => any::<u8>().prop_map(Op::ExternalDelete),
        2 => any::<u8>().prop_map(Op::FinishDeletion),
        2 => (any::<u8>(), any::<bool>()).prop_map(|(i, g)| Op::Terminate(i, g)),
        1 => Just(Op::Expire),
        2 => Just(Op::ListSnapshot),
        4 => Just(Op::RelistApply),
        1 => any::<u8>().prop_map(Op::Claim),
    ]
}

#[derive(Clone, Debug)]
struct WorldPod {
    key: Key,
    uid: String,
    phase: Phase,
    deleting: bool,
}

impl WorldPod {
    fn live(&self) -> bool {
        !matches!(self.phase, Phase::Failed(_))
    }
    fn to_pod(&self) -> Pod {
        pod_with(&self.key, &self.uid, &self.phase, self.deleting, false)
    }
}

enum WatchEvent {
    Apply(Pod),
    Delete(Pod),
}

enum Watcher {
    Watching {
        cursor: usize,
    },
    Listing,
    Delivering {
        snapshot: Vec<Pod>,
        next: usize,
        resume: usize,
    },
}

enum Task {
    ToSend(Key),
    Returned(Key, Option<String>),
}

#[derive(Default)]
struct Belief {
    asked: bool,
    terminal: u32,
}

struct Sim {
    index: PodIndex,
    pods: BTreeMap<String, WorldPod>,
    log: Vec<WatchEvent>,
    watcher: Watcher,
    tasks: Vec<Task>,
    beliefs: HashMap<Key, Belief>,
    next_id: [u64; 2],
    uids: u64,
    creates: HashMap<Key, u32>,
    claimed: [bool; 2],
}

const NEW_APPS: [&str; 2] = ["app-a", "app-b"];
const OLD_APPS: [&str; 2] = ["old-a", "old-b"];

impl Sim {
    /// Pods of an earlier stoker exist; this stoker lists them, then its watcher starts with a
    /// re-list of its own, as kube-runtime's does.
    fn new() -> Self {
        let mut sim = Sim {
            index: PodIndex::new(),
            pods: BTreeMap::new(),
            log: Vec::new(),
            watcher: Watcher::Listing,
            tasks: Vec::new(),
            beliefs: HashMap::new(),
            next_id: [1, 1],
            uids: 0,
            creates: HashMap::new(),
            claimed: [false, false],
        };
        for app in OLD_APPS {
            for (id, phase) in [
                (1, Phase::Running),
                (2, Phase::Pending),
                (3, Phase::Running),
            ] {
                let k = key(app, id);
                sim.put(k.clone(), phase);
                sim.creates.insert(k, 1);
            }
        }
        let listed: Vec<Pod> = sim.pods.values().map(WorldPod::to_pod).collect();
        let effects = sim.index.adopt_listed(&listed);
        sim.run(effects);
        sim.index.relist_started();
        sim
    }

    fn put(&mut self, k: Key, phase: Phase) -> String {
        self.uids += 1;
        let uid = format!("uid-{}", self.uids);
        let wp = WorldPod {
            key: k.clone(),
            uid: uid.clone(),
            phase,
            deleting: false,
        };
        self.log.push(WatchEvent::Apply(wp.to_pod()));
        self.pods.insert(name_of(&k), wp);
        uid
    }

    fn pick<T>(items: &[T], i: u8) -> Option<usize> {
        (!items.is_empty()).then(|| usize::from(i) % items.len())
    }

    fn finish_deletion(&mut self, name: &str) {
        if let Some(mut wp) = self.pods.remove(name) {
            if wp.live() {
                wp.phase = Phase::Failed(143);
            }
            wp.deleting = true;
            self.log.push(WatchEvent::Delete(wp.to_pod()));
        }
    }

    fn run(&mut self, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::Report { key, observation } => {
                    let belief = self.beliefs.get_mut(&key).unwrap_or_else(|| {
                        panic!("report for an executor no driver knows: {key:?}")
                    });
                    assert_eq!(
                        belief.terminal, 0,
                        "report after the end of {key:?}: {observation:?}"
                    );
                    if let Observation::Exited { .. } = observation {
                        belief.terminal += 1;
                        let pod = self.pods.get(&name_of(&key));
                        assert!(
                            !pod.is_some_and(|wp| wp.live() && !wp.deleting),
                            "{key:?} reported gone ({observation:?}) while its pod lives: {pod:?}"
                        );
                    }
                }
                Effect::Delete {
                    pod,
                    grace_seconds,
                    why,
                } => {
                    let Some(wp) = self.pods.get_mut(&pod.name) else {
                        continue; // 404
                    };
                    if pod.uid.as_ref().is_some_and(|u| u != &wp.uid) {
                        continue; // 409: precondition failed
                    }
                    if wp.live() && !wp.deleting {
                        let allowed = self
                            .beliefs
                            .get(&wp.key)
                            .is_some_and(|b| b.asked || b.terminal > 0);
                        assert!(
                            allowed,
                            "live pod {} deleted ({why:?}) though no application asked",
                            pod.name
                        );
                    }
                    if !wp.deleting {
                        wp.deleting = true;
                        self.log.push(WatchEvent::Apply(wp.to_pod()));
                    }
                    if grace_seconds == 0 {
                        self.finish_deletion(&pod.name);
                    }
                }
            }
        }
    }

    fn step(&mut self, op: &Op) {
        match *op {
            Op::Launch(a) => {
                let a = usize::from(a) % 2;
                let k = key(NEW_APPS[a], self.next_id[a]);
                self.next_id[a] += 1;
                self.index
                    .launch(k.clone(), "spark".into(), name_of(&k), None)
                    .expect("fresh executor ids are accepted");
                self.beliefs.insert(k.clone(), Belief::default());
                self.tasks.push(Task::ToSend(k));
            }
            Op::CreateSend(i) => {
                let Some(i) = Self::pick(&self.tasks, i) else {
                    return;
                };
                let Task::ToSend(k) = &self.tasks[i] else {
                    return;
                };
                let k = k.clone();
                match self.index.create_step(&k) {
                    CreateStep::Send => {
                        let uid = if self.pods.contains_key(&name_of(&k)) {
                            None // 409 AlreadyExists
                        } else {
                            *self.creates.entry(k.clone()).or_default() += 1;
                            Some(self.put(k.clone(), Phase::Pending))
                        };
                        self.tasks[i] = Task::Returned(k, uid);
                    }
                    CreateStep::Stop(effects) => {
                        self.tasks.swap_remove(i);
                        self.run(effects);
                    }
                }
            }
            Op::CreateReturn(i) => {
                let Some(i) = Self::pick(&self.tasks, i) else {
                    return;
                };
                let Task::Returned(k, uid) = &self.tasks[i] else {
                    return;
                };
                let effects = self.index.created(k, uid.clone());
                self.tasks.swap_remove(i);
                self.run(effects);
            }
            Op::CreateFail(i) => {
                let Some(i) = Self::pick(&self.tasks, i) else {
                    return;
                };
                let Task::ToSend(k) = &self.tasks[i] else {
                    return;
                };
                let effects = self.index.create_failed(k, "refused".into());
                self.tasks.swap_remove(i);
                self.run(effects);
            }
            Op::Deliver => {
                let Watcher::Watching { cursor } = &mut self.watcher else {
                    return;
                };
                let Some(event) = self.log.get(*cursor) else {
                    return;
                };
                *cursor += 1;
                let effects = match event {
                    WatchEvent::Apply(p) => self.index.apply(p),
                    WatchEvent::Delete(p) => self.index.delete(p),
                };
                self.run(effects);
            }
            Op::Kubelet(i) => {
                let names: Vec<String> = self
                    .pods
                    .iter()
                    .filter(|(_, wp)| !wp.deleting && wp.live())
                    .map(|(n, _)| n.clone())
                    .collect();
                let Some(i) = Self::pick(&names, i) else {
                    return;
                };
                let Some(wp) = self.pods.get_mut(&names[i]) else {
                    return;
                };
                wp.phase = match wp.phase {
                    Phase::Pending | Phase::Unschedulable => Phase::Running,
                    _ => Phase::Failed(1),
                };
                let p = wp.to_pod();
                self.log.push(WatchEvent::Apply(p));
            }
            Op::ExternalDelete(i) => {
                let names: Vec<String> = self
                    .pods
                    .iter()
                    .filter(|(_, wp)| !wp.deleting)
                    .map(|(n, _)| n.clone())
                    .collect();
                let Some(i) = Self::pick(&names, i) else {
                    return;
                };
                let Some(wp) = self.pods.get_mut(&names[i]) else {
                    return;
                };
                wp.deleting = true;
                let p = wp.to_pod();
                self.log.push(WatchEvent::Apply(p));
            }
            Op::FinishDeletion(i) => {
                let names: Vec<String> = self
                    .pods
                    .iter()
                    .filter(|(_, wp)| wp.deleting)
                    .map(|(n, _)| n.clone())
                    .collect();
                let Some(i) = Self::pick(&names, i) else {
                    return;
                };
                self.finish_deletion(&names[i]);
            }
            Op::Terminate(i, graceful) => {
                let mut live: Vec<Key> = self
                    .beliefs
                    .iter()
                    .filter(|(_, b)| !b.asked && b.terminal == 0)
                    .map(|(k, _)| k.clone())
                    .collect();
                live.sort();
                let Some(i) = Self::pick(&live, i) else {
                    return;
                };
                let k = live[i].clone();
                if let Some(b) = self.beliefs.get_mut(&k) {
                    b.asked = true;
                }
                let effects = self.index.terminate(&k, if graceful { 30 } else { 0 });
                self.run(effects);
            }
            Op::Expire => {
                if let Watcher::Watching { .. } = self.watcher {
                    self.index.relist_started();
                    self.watcher = Watcher::Listing;
                }
            }
            Op::ListSnapshot => {
                if let Watcher::Listing = self.watcher {
                    self.watcher = Watcher::Delivering {
                        snapshot: self.pods.values().map(WorldPod::to_pod).collect(),
                        next: 0,
                        resume: self.log.len(),
                    };
                }
            }
            Op::RelistApply => {
                let Watcher::Delivering {
                    snapshot,
                    next,
                    resume,
                } = &mut self.watcher
                else {
                    return;
                };
                if let Some(p) = snapshot.get(*next) {
                    *next += 1;
                    let effects = self.index.relist_apply(p);
                    self.run(effects);
                } else {
                    let cursor = *resume;
                    self.watcher = Watcher::Watching { cursor };
                    let effects = self.index.relist_done();
                    self.run(effects);
                }
            }
            Op::Claim(a) => {
                let a = usize::from(a) % 2;
                if std::mem::replace(&mut self.claimed[a], true) {
                    return;
                }
                for r in self.index.claim(&app(OLD_APPS[a]), DIGEST) {
                    let k = (app(OLD_APPS[a]), r.executor_id);
                    assert!(
                        self.beliefs.insert(k.clone(), Belief::default()).is_none(),
                        "{k:?} handed over twice"
                    );
                }
            }
        }
    }

    /// Lets everything in flight finish: creates return, deletions complete, the watch catches
    /// up, a last re-list runs.
    fn quiesce(&mut self) {
        for round in 0..2 {
            for _ in 0..10_000 {
                let progress = match &self.watcher {
                    Watcher::Listing => Some(Op::ListSnapshot),
                    Watcher::Delivering { .. } => Some(Op::RelistApply),
                    Watcher::Watching { cursor } if *cursor < self.log.len() => Some(Op::Deliver),
                    Watcher::Watching { .. } => None,
                };
                let op = progress
                    .or_else(|| match self.tasks.first() {
                        Some(Task::ToSend(_)) => Some(Op::CreateSend(0)),
                        Some(Task::Returned(..)) => Some(Op::CreateReturn(0)),
                        None => None,
                    })
                    .or_else(|| {
                        self.pods
                            .values()
                            .any(|wp| wp.deleting)
                            .then_some(Op::FinishDeletion(0))
                    });
                match op {
                    Some(op) => self.step(&op),
                    None => break,
                }
            }
            if round == 0 {
                self.step(&Op::Expire);
            }
        }
    }

    fn check_end_state(&self) {
        for (k, n) in &self.creates {
            assert!(*n <= 1, "{k:?} created {n} times");
        }
        for (k, b) in &self.beliefs {
            let pod = self.pods.get(&name_of(k));
            if b.terminal > 0 {
                assert!(pod.is_none(), "{k:?} reported gone but its pod is there");
                assert!(
                    !self.index.knows(k),
                    "{k:?} reported gone but still tracked"
                );
            } else {
                assert!(
                    pod.is_some_and(WorldPod::live),
                    "{k:?} believed live, never reported gone, but its pod is {pod:?}"
                );
                assert!(self.index.knows(k), "{k:?} believed live but not tracked");
            }
        }
        for (name, wp) in &self.pods {
            let believed = self.beliefs.get(&wp.key).is_some_and(|b| b.terminal == 0);
            let unclaimed = !self.beliefs.contains_key(&wp.key) && self.index.knows(&wp.key);
            assert!(
                believed || unclaimed,
                "pod {name} ({wp:?}) is left behind: nobody tracks it"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn nothing_lost_duplicated_or_leaked(ops in proptest::collection::vec(op(), 1..160)) {
        let mut sim = Sim::new();
        for op in &ops {
            sim.step(op);
        }
        sim.quiesce();
        sim.check_end_state();
    }
}
