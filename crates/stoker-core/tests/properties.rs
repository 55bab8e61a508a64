//! Property tests: random interleavings of driver commands, backend observations and time.
//!
//! A simulated backend keeps the executors it was asked to launch and reports their fate in a
//! random order. Invariants checked after every step and at the end:
//! * stoker never keeps more counted executors than the target, except running ones waiting for
//!   the driver to pick which to kill, and those being deleted;
//! * every executor the driver heard of gets exactly one terminal event;
//! * no executor outlives its application;
//! * ids never repeat and increase.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use stoker_core::{
    Action, AppPhase, Engine, EngineConfig, EventKind, ExecutorId, ExecutorPhase, ExitReason,
    Observation,
};

#[derive(Clone, Debug)]
enum Step {
    SetTarget { profile: i32, total: u64 },
    Kill { pick: usize, adjust: bool },
    Decommission { pick: usize },
    Accept { pick: usize },
    Run { pick: usize },
    Exit { pick: usize, code: i32, oom: bool },
    Duplicate { pick: usize },
    Advance { ms: u64 },
    Heartbeat { ack: bool },
    Unregister,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0..2i32, 0..6u64).prop_map(|(profile, total)| Step::SetTarget { profile, total }),
        2 => (any::<usize>(), any::<bool>()).prop_map(|(pick, adjust)| Step::Kill { pick, adjust }),
        1 => any::<usize>().prop_map(|pick| Step::Decommission { pick }),
        4 => any::<usize>().prop_map(|pick| Step::Accept { pick }),
        4 => any::<usize>().prop_map(|pick| Step::Run { pick }),
        3 => (any::<usize>(), -1..3i32, any::<bool>())
            .prop_map(|(pick, code, oom)| Step::Exit { pick, code, oom }),
        1 => any::<usize>().prop_map(|pick| Step::Duplicate { pick }),
        2 => (1..400u64).prop_map(|ms| Step::Advance { ms }),
        2 => any::<bool>().prop_map(|ack| Step::Heartbeat { ack }),
        1 => Just(Step::Unregister),
    ]
}

/// The backend as the engine sees it: processes launched and not yet reported gone.
#[derive(Default)]
struct SimBackend {
    alive: BTreeSet<ExecutorId>,
    reported_gone: BTreeSet<ExecutorId>,
    terminating: BTreeSet<ExecutorId>,
    launched: Vec<ExecutorId>,
}

impl SimBackend {
    fn apply(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Launch { id, .. } => {
                    assert!(self.alive.insert(id), "launched {id} twice");
                    self.launched.push(id);
                }
                Action::Terminate { id, .. } => {
                    self.terminating.insert(id);
                }
            }
        }
    }

    fn pick(&self, n: usize) -> Option<ExecutorId> {
        if self.alive.is_empty() {
            return None;
        }
        self.alive.iter().nth(n % self.alive.len()).copied()
    }
}

struct Harness {
    engine: Engine,
    backend: SimBackend,
    now: u64,
    ack_cursor: u64,
    requested: BTreeSet<ExecutorId>,
    terminal: BTreeMap<ExecutorId, u32>,
    last_requested: u64,
}

impl Harness {
    fn new(config: EngineConfig) -> Self {
        Self {
            engine: Engine::new(config, [0, 1], 0, 0),
            backend: SimBackend::default(),
            now: 0,
            ack_cursor: 0,
            requested: BTreeSet::new(),
            terminal: BTreeMap::new(),
            last_requested: 0,
        }
    }

    /// Reads new events like a driver would, checking id order and terminal uniqueness.
    fn drain_events(&mut self) {
        let events: Vec<_> = self.engine.events_after(self.ack_cursor).cloned().collect();
        for event in events {
            assert_eq!(event.seq, self.ack_cursor + 1, "gap in sequence numbers");
            self.ack_cursor = event.seq;
            if let EventKind::Executor(ev) = event.kind {
                match ev.phase {
                    ExecutorPhase::Requested => {
                        assert!(
                            ev.id.get() > self.last_requested,
                            "id {} not above {}",
                            ev.id,
                            self.last_requested
                        );
                        self.last_requested = ev.id.get();
                        assert!(self.requested.insert(ev.id), "id {} requested twice", ev.id);
                    }
                    ExecutorPhase::Exited => {
                        assert!(self.requested.contains(&ev.id), "exit of unknown {}", ev.id);
                        *self.terminal.entry(ev.id).or_default() += 1;
                    }
                    ExecutorPhase::Pending | ExecutorPhase::Running => {
                        assert!(self.requested.contains(&ev.id));
                        assert!(!self.terminal.contains_key(&ev.id), "{} after exit", ev.id);
                    }
                }
            }
        }
    }

    fn exit(&mut self, id: ExecutorId, code: i32, reason: ExitReason) {
        self.backend.alive.remove(&id);
        self.backend.reported_gone.insert(id);
        self.engine.observe(
            id,
            Observation::Exited {
                code: Some(code),
                reason,
                message: String::new(),
            },
            self.now,
        );
    }

    fn apply(&mut self, step: Step) {
        match step {
            Step::SetTarget { profile, total } => {
                let _ = self.engine.set_targets(&[(profile, total)], self.now);
            }
            Step::Kill { pick, adjust } => {
                if let Some(id) = self.backend.pick(pick) {
                    let _ = self.engine.kill(&[id], adjust, self.now);
                }
            }
            Step::Decommission { pick } => {
                if let Some(id) = self.backend.pick(pick) {
                    let _ = self.engine.decommission(&[id], true, self.now);
                }
            }
            Step::Accept { pick } => {
                if let Some(id) = self.backend.pick(pick) {
                    self.engine.observe(
                        id,
                        Observation::Accepted {
                            backend_name: format!("pod-{id}"),
                        },
                        self.now,
                    );
                }
            }
            Step::Run { pick } => {
                if let Some(id) = self.backend.pick(pick) {
                    self.engine.observe(
                        id,
                        Observation::Running {
                            host: "127.0.0.1".into(),
                            backend_name: format!("pod-{id}"),
                        },
                        self.now,
                    );
                }
            }
            Step::Exit { pick, code, oom } => {
                // A terminated executor exits; others may fail on their own.
                if let Some(id) = self.backend.pick(pick) {
                    let reason = match (oom, code) {
                        (true, _) => ExitReason::OomKilled,
                        (false, 0) => ExitReason::Completed,
                        (false, _) => ExitReason::Error,
                    };
                    self.exit(id, code, reason);
                }
            }
            Step::Duplicate { pick } => {
                let gone: Vec<ExecutorId> = self.backend.reported_gone.iter().copied().collect();
                if !gone.is_empty() {
                    let id = gone[pick % gone.len()];
                    let changed = self.engine.observe(
                        id,
                        Observation::Exited {
                            code: Some(1),
                            reason: ExitReason::Error,
                            message: String::new(),
                        },
                        self.now,
                    );
                    assert!(!changed, "a repeated exit of {id} changed the engine");
                }
            }
            Step::Advance { ms } => {
                self.now += ms;
                self.engine.tick(self.now);
            }
            Step::Heartbeat { ack } => {
                let acked = if ack { self.ack_cursor } else { 0 };
                self.engine.heartbeat(acked, self.now);
            }
            Step::Unregister => {
                self.engine.unregister(self.now);
            }
        }
        let actions = self.engine.take_actions();
        self.backend.apply(actions);
        self.drain_events();
        self.check_target_invariant();
    }

    fn check_target_invariant(&self) {
        let targets = self.engine.targets();
        for profile in [0, 1] {
            let target = u64::from(targets.get(&profile).copied().unwrap_or(0));
            let counted: Vec<_> = self
                .engine
                .executors()
                .filter(|e| {
                    e.profile == profile
                        && e.deleting.is_none()
                        && e.decommission_deadline.is_none()
                })
                .collect();
            let running = counted
                .iter()
                .filter(|e| e.phase == ExecutorPhase::Running)
                .count() as u64;
            let count = counted.len() as u64;
            assert!(
                count <= target.max(running),
                "profile {profile}: {count} counted executors, target {target}, running {running}"
            );
            if self.engine.phase() == AppPhase::Active {
                assert!(
                    count >= target,
                    "profile {profile}: {count} below target {target}"
                );
            }
        }
    }

    /// Ends the application and lets the backend finish every executor.
    fn finish(&mut self) {
        self.engine.unregister(self.now);
        let actions = self.engine.take_actions();
        self.backend.apply(actions);
        let terminating: Vec<ExecutorId> = self.backend.alive.iter().copied().collect();
        for id in terminating {
            assert!(
                self.backend.terminating.contains(&id),
                "executor {id} outlives its application: never asked to stop"
            );
            self.exit(id, 143, ExitReason::Signaled);
        }
        self.drain_events();
        assert!(self.engine.is_finished());
        assert!(self.engine.executors().next().is_none());
        for id in &self.requested {
            assert_eq!(
                self.terminal.get(id).copied().unwrap_or(0),
                1,
                "executor {id} got {} terminal events",
                self.terminal.get(id).copied().unwrap_or(0)
            );
        }
        let launched: BTreeSet<_> = self.backend.launched.iter().copied().collect();
        assert_eq!(launched, self.requested, "launched and requested differ");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn invariants_hold_over_random_interleavings(
        steps in prop::collection::vec(step(), 1..120),
        max_failures in 1..6u32,
        lease_ttl in 200..2_000u64,
    ) {
        let config = EngineConfig {
            lease_ttl,
            start_timeout: 700,
            decommission_timeout: 300,
            max_failures,
            max_executors_per_profile: 5,
            ..EngineConfig::default()
        };
        let mut harness = Harness::new(config);
        for step in steps {
            harness.apply(step);
        }
        harness.finish();
    }
}
