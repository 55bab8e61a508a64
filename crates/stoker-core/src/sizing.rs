//! The sizing policy: executors that ran out of memory are replaced by bigger ones.
//!
//! # Flow
//!
//! The engine asks [`Sizing::size`] for the size of every executor it creates and hands every
//! executor exit to [`Sizing::on_exit`], with the size that executor was started at. The verdict
//! says whether the profile grew and which failures count toward the failure limit.
//!
//! # Rules
//!
//! * Only memory failures grow a profile, and the cause decides what grows:
//!   - [`ExitReason::OomKilled`] (the container went over its memory limit: off-heap memory,
//!     Python workers, overhead): the memory limit grows by the factor, all of it as
//!     **overhead**; the heap stays.
//!   - the JVM's own `OutOfMemoryError` (Spark's executor exits with code 52, reported as
//!     [`ExitReason::Error`]): heap and overhead grow together by the factor, so the **heap** and
//!     the limit grow.
//!   - anything else (eviction, node loss, deletion, kills, other errors): same size.
//! * Growth stops at the ceiling: the executor's memory (heap + overhead + off-heap + PySpark)
//!   never exceeds it.
//! * Only an executor that ran at the profile's current size in the dimension that failed can
//!   grow it: an older, smaller executor failing for the same cause is already answered by the
//!   bigger size, so several executors failing together grow the profile once, and a size never
//!   grows again because of executors started before the last growth (no resizing loop).
//! * Failures: the failure that caused a growth is deferred, not counted; it counts only if an
//!   executor at the grown size then fails for the same cause. A failure at the ceiling counts at
//!   once. An older executor's failure that is already answered by a growth does not count.
//! * Executors already running keep their size: only executors created after the change are
//!   bigger.
//! * A grown size the backend refuses to start ([`ExitReason::StartFailed`] of an executor above
//!   the configured size; on Kubernetes a LimitRange's maximum or an admission policy, which
//!   stoker's own identity cannot read beforehand) is not tried again: the profile steps back to
//!   the size before that growth and grows no further, and the failures that growth deferred
//!   count now (the bigger executor never ran). The refused start itself does not count, and
//!   neither do other refused starts at sizes above the one stepped back to. Probing for the
//!   largest size between the two would cost a refused start per step, so stoker does not.

use std::collections::BTreeMap;

use crate::types::{ExecutorId, ExitReason, ProfileId, ResourceProfile};

mod step_down;

pub use step_down::{ProfileUsage, StepDown};

/// Spark's exit code for an executor that died of `java.lang.OutOfMemoryError`
/// (`SparkExitCode.OOM`).
pub const JVM_OOM_EXIT_CODE: i32 = 52;

/// The memory of one executor that stoker chooses. Off-heap and PySpark memory stay as the
/// profile configures them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ExecutorSize {
    /// JVM heap in MiB (`-Xmx`, `SPARK_EXECUTOR_MEMORY`).
    pub heap_mib: u64,
    /// Memory overhead in MiB (part of the container's memory limit outside the heap).
    pub overhead_mib: u64,
}

impl ExecutorSize {
    /// The size a profile configures.
    pub fn of(profile: &ResourceProfile) -> Self {
        Self {
            heap_mib: profile.heap_mib,
            overhead_mib: profile.overhead_mib,
        }
    }
}

/// The application's resizing settings (`spark.stoker.resize.*`), already bounded by the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResizePolicy {
    /// Growth factor in thousandths (1500 = ×1.5); above 1000.
    pub factor_permille: u32,
    /// Most memory (heap + overhead + off-heap + PySpark) one executor may get, in MiB.
    pub max_memory_mib: u64,
}

/// The application's `spark.stoker.resize.*` settings, validated (factor above 1, ceiling not
/// below any profile's memory).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResizeSettings {
    /// Growth factor in thousandths (1500 = ×1.5); above 1000.
    pub factor_permille: u32,
    /// `spark.stoker.resize.maxMemory`: most memory one executor may get (heap + overhead +
    /// off-heap + PySpark), in MiB; `None`: [`Self::DEFAULT_CEILING_MULTIPLE`] times the largest
    /// profile's memory.
    pub max_memory_mib: Option<u64>,
    /// `spark.stoker.sizing.key`: sizes are remembered across runs under it; `None`: not.
    pub sizing_key: Option<String>,
}

impl ResizeSettings {
    /// How many times its configured memory an executor may grow to when the application sets
    /// no ceiling.
    pub const DEFAULT_CEILING_MULTIPLE: u64 = 4;

    /// The policy for `profiles`, bounded by the server's `server_max_mib`
    /// (`--max-executor-memory`): the application's ceiling, or by default
    /// [`Self::DEFAULT_CEILING_MULTIPLE`] times the largest profile's memory, never above the
    /// server's.
    pub fn policy<'a>(
        &self,
        profiles: impl IntoIterator<Item = &'a ResourceProfile>,
        server_max_mib: u64,
    ) -> ResizePolicy {
        let largest = profiles
            .into_iter()
            .map(ResourceProfile::total_memory_mib)
            .max()
            .unwrap_or(0);
        let wanted = self
            .max_memory_mib
            .unwrap_or_else(|| largest.saturating_mul(Self::DEFAULT_CEILING_MULTIPLE));
        ResizePolicy {
            factor_permille: self.factor_permille,
            max_memory_mib: wanted.min(server_max_mib),
        }
    }
}

/// Why an executor ran out of memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MemoryCause {
    /// The container went over its memory limit (OOM_KILLED): more overhead.
    Container,
    /// The JVM ran out of heap (exit code 52): more heap.
    Heap,
}

impl MemoryCause {
    /// The memory cause of an exit, if it is one.
    pub fn of(code: Option<i32>, reason: ExitReason) -> Option<Self> {
        match (reason, code) {
            (ExitReason::OomKilled, _) => Some(Self::Container),
            (ExitReason::Error, Some(JVM_OOM_EXIT_CODE)) => Some(Self::Heap),
            _ => None,
        }
    }

    /// Stable lower-case name for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Container => "oom_killed",
            Self::Heap => "heap",
        }
    }

    fn index(self) -> usize {
        match self {
            Self::Container => 0,
            Self::Heap => 1,
        }
    }
}

/// A size the backend refused to start (a LimitRange's maximum, an admission policy).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused {
    /// The executor's total memory (heap + overhead + off-heap + PySpark), in MiB.
    pub total_mib: u64,
    /// When an earlier run learnt it (Unix ms); `None`: learnt in this run.
    pub since_unix_ms: Option<i64>,
}

/// A change of a profile's size, for the driver, the logs and the metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resize {
    /// The profile.
    pub profile: ProfileId,
    /// The executor whose failure caused it.
    pub executor: ExecutorId,
    /// Why.
    pub cause: MemoryCause,
    /// The size before.
    pub from: ExecutorSize,
    /// The size executors now start with.
    pub to: ExecutorSize,
}

impl Resize {
    /// The message for the driver, e.g. `profile 0 now starts executors with 1536 MiB heap +
    /// 640 MiB overhead after executor 3 was OOM-killed`.
    pub fn message(&self) -> String {
        let why = match self.cause {
            MemoryCause::Container => "was OOM-killed".to_owned(),
            MemoryCause::Heap => {
                format!("ran out of heap (OutOfMemoryError, exit code {JVM_OOM_EXIT_CODE})")
            }
        };
        format!(
            "profile {} now starts executors with {} MiB heap + {} MiB overhead after executor {} {why}",
            self.profile, self.to.heap_mib, self.to.overhead_mib, self.executor
        )
    }
}

/// What an exit means for the profile's size and the failure count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not a memory failure, or resizing is off: the exit counts as its reason says.
    Unchanged,
    /// The profile grew; the exit is deferred, not counted.
    Grew {
        /// The change.
        resize: Resize,
        /// Failures deferred by an earlier growth that now count (0 or 1): the grown size
        /// failed for the same cause.
        deferred_now_counted: u32,
    },
    /// The executor was smaller than the profile's current size: the growth that answers its
    /// failure already happened. Not counted.
    AlreadyResized,
    /// The backend refused to start an executor at a grown size: the profile is back at the
    /// size before that growth and grows no further.
    SteppedBack {
        /// The executor refused.
        executor: ExecutorId,
        /// The size refused.
        from: ExecutorSize,
        /// The size executors now start with.
        to: ExecutorSize,
        /// Failures deferred by the growth that now count.
        deferred_now_counted: u32,
    },
    /// The profile cannot grow further: the exit counts.
    AtCeiling {
        /// The ceiling in MiB.
        ceiling_mib: u64,
        /// The ceiling is the size the backend last accepted, after it refused a bigger one
        /// (see [`Verdict::SteppedBack`]), not the configured one.
        refused_above: bool,
        /// Failures deferred by an earlier growth that now count (0 or 1).
        deferred_now_counted: u32,
        /// First time this profile hit the ceiling for this cause (warn the driver once).
        first: bool,
    },
}

impl Verdict {
    /// Failures this exit adds to the count, besides those already deferred.
    pub fn counted(&self, reason: ExitReason) -> u32 {
        match self {
            Self::Unchanged => u32::from(reason.counts_as_failure()),
            Self::Grew {
                deferred_now_counted,
                ..
            } => *deferred_now_counted,
            Self::AlreadyResized => 0,
            Self::SteppedBack {
                deferred_now_counted,
                ..
            } => *deferred_now_counted,
            Self::AtCeiling {
                deferred_now_counted,
                ..
            } => 1 + deferred_now_counted,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct ProfileSizing {
    /// Off-heap + PySpark memory: never changed by stoker, part of the total.
    fixed_mib: u64,
    configured: ExecutorSize,
    current: ExecutorSize,
    /// The size before the last growth (or a size started at), where a refusal steps back to.
    previous: Option<ExecutorSize>,
    /// The backend refused a bigger size: no more growth.
    capped: bool,
    /// The smallest total memory the backend refused to start, in this run or an earlier one of
    /// the sizing key: growth never reaches it.
    refused: Option<Refused>,
    /// Per cause: the size of the failure dimension after the growth that deferred a failure;
    /// a failure at that size or above for the same cause makes the deferred one count.
    deferred: [Option<u64>; 2],
    ceiling_warned: [bool; 2],
    /// The profile grew during this run: the size it ends with was needed.
    grew: bool,
}

impl ProfileSizing {
    fn total(&self, size: ExecutorSize) -> u64 {
        size.heap_mib
            .saturating_add(size.overhead_mib)
            .saturating_add(self.fixed_mib)
    }

    /// The dimension that a cause looks at: the heap for a heap failure, the whole limit for a
    /// container failure.
    fn dimension(&self, cause: MemoryCause, size: ExecutorSize) -> u64 {
        match cause {
            MemoryCause::Heap => size.heap_mib,
            MemoryCause::Container => self.total(size),
        }
    }
}

/// The sizes of one application's profiles. See the module documentation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sizing {
    policy: Option<ResizePolicy>,
    profiles: BTreeMap<ProfileId, ProfileSizing>,
}

impl Sizing {
    /// Sizing under `policy`; `None` keeps every profile at its configured size.
    pub fn new(policy: Option<ResizePolicy>) -> Self {
        debug_assert!(policy.is_none_or(|p| p.factor_permille > 1_000));
        Self {
            policy,
            profiles: BTreeMap::new(),
        }
    }

    /// The policy.
    pub fn policy(&self) -> Option<ResizePolicy> {
        self.policy
    }

    /// Adds a profile at its configured size; a profile already known keeps its current size.
    pub fn add_profile(&mut self, profile: &ResourceProfile) {
        self.profiles
            .entry(profile.id)
            .or_insert_with(|| ProfileSizing {
                fixed_mib: profile.off_heap_mib.saturating_add(profile.pyspark_mib),
                configured: ExecutorSize::of(profile),
                current: ExecutorSize::of(profile),
                previous: None,
                capped: false,
                refused: None,
                deferred: [None; 2],
                ceiling_warned: [false; 2],
                grew: false,
            });
    }

    /// Starts a profile at `size` instead of its configured size (a size remembered from an
    /// earlier run). Ignored for an unknown profile.
    pub fn start_at(&mut self, profile: ProfileId, size: ExecutorSize) {
        if let Some(p) = self.profiles.get_mut(&profile) {
            p.previous = Some(p.current);
            p.current = size;
        }
    }

    /// The size new executors of `profile` get, if the profile is known.
    pub fn size(&self, profile: ProfileId) -> Option<ExecutorSize> {
        self.profiles.get(&profile).map(|p| p.current)
    }

    /// The current sizes of every known profile.
    pub fn sizes(&self) -> impl Iterator<Item = (ProfileId, ExecutorSize)> + '_ {
        self.profiles.iter().map(|(&id, p)| (id, p.current))
    }

    /// Per profile, the smallest total memory the backend refused to start, where one was.
    pub fn refused(&self) -> impl Iterator<Item = (ProfileId, Refused)> + '_ {
        self.profiles
            .iter()
            .filter_map(|(&id, p)| p.refused.map(|r| (id, r)))
    }

    /// Remembers that the backend refused to start an executor of `profile` with `total_mib`
    /// memory in an earlier run, at `since_unix_ms`: growth stops below it. Ignored for an
    /// unknown profile.
    pub fn refuse_from(&mut self, profile: ProfileId, total_mib: u64, since_unix_ms: i64) {
        if let Some(p) = self.profiles.get_mut(&profile) {
            if p.refused.is_none_or(|r| total_mib < r.total_mib) {
                p.refused = Some(Refused {
                    total_mib,
                    since_unix_ms: Some(since_unix_ms),
                });
            }
        }
    }

    /// Applies an executor's exit: `size` is what it was started with.
    pub fn on_exit(
        &mut self,
        profile: ProfileId,
        executor: ExecutorId,
        size: Option<ExecutorSize>,
        code: Option<i32>,
        reason: ExitReason,
    ) -> Verdict {
        let Some(policy) = self.policy else {
            return Verdict::Unchanged;
        };
        if reason == ExitReason::StartFailed {
            return self.on_refused(profile, executor, size);
        }
        let Some(cause) = MemoryCause::of(code, reason) else {
            return Verdict::Unchanged;
        };
        let Some(p) = self.profiles.get_mut(&profile) else {
            return Verdict::Unchanged;
        };
        let size = size.unwrap_or(p.current);
        let failed_at = p.dimension(cause, size);
        if failed_at < p.dimension(cause, p.current) {
            return Verdict::AlreadyResized;
        }
        let slot = cause.index();
        let deferred_now_counted = match p.deferred[slot] {
            Some(grown) if failed_at >= grown => {
                p.deferred[slot] = None;
                1
            }
            _ => 0,
        };
        let from = p.current;
        let grown = if p.capped {
            None
        } else {
            grow(p, policy, cause)
        };
        // A size the backend refused before (in an earlier run too) is not tried again.
        let refused = p.capped
            || grown.is_some_and(|to| p.refused.is_some_and(|r| p.total(to) >= r.total_mib));
        let Some(to) = grown.filter(|_| !refused) else {
            let first = !p.ceiling_warned[slot];
            p.ceiling_warned[slot] = true;
            return Verdict::AtCeiling {
                ceiling_mib: if refused {
                    p.total(p.current)
                } else {
                    policy.max_memory_mib
                },
                refused_above: refused,
                deferred_now_counted,
                first,
            };
        };
        p.previous = Some(from);
        p.current = to;
        p.grew = true;
        p.deferred[slot] = Some(p.dimension(cause, to));
        Verdict::Grew {
            resize: Resize {
                profile,
                executor,
                cause,
                from,
                to,
            },
            deferred_now_counted,
        }
    }
}

impl Sizing {
    /// An executor the backend refused to start: see the module documentation.
    fn on_refused(
        &mut self,
        profile: ProfileId,
        executor: ExecutorId,
        size: Option<ExecutorSize>,
    ) -> Verdict {
        let Some(p) = self.profiles.get_mut(&profile) else {
            return Verdict::Unchanged;
        };
        let size = size.unwrap_or(p.current);
        let refused = p.total(size);
        if refused <= p.total(p.configured) {
            // Not a size stoker chose: an ordinary start failure.
            return Verdict::Unchanged;
        }
        if refused > p.total(p.current) {
            // Started before an earlier step back, which already answered it.
            return Verdict::AlreadyResized;
        }
        let to = p
            .previous
            .filter(|prev| p.total(*prev) < refused)
            .unwrap_or(p.configured);
        p.current = to;
        p.previous = None;
        p.capped = true;
        // Refused now: the cap is confirmed at this run's end, whatever an earlier run said.
        if p.refused.is_none_or(|r| refused <= r.total_mib) {
            p.refused = Some(Refused {
                total_mib: refused,
                since_unix_ms: None,
            });
        }
        let deferred_now_counted = p
            .deferred
            .iter_mut()
            .filter_map(Option::take)
            .fold(0u32, |n, _| n.saturating_add(1));
        Verdict::SteppedBack {
            executor,
            from: size,
            to,
            deferred_now_counted,
        }
    }
}

/// The next size after a failure for `cause`, or `None` when the ceiling leaves no room.
fn grow(p: &ProfileSizing, policy: ResizePolicy, cause: MemoryCause) -> Option<ExecutorSize> {
    let size = p.current;
    let total = p.total(size);
    let wanted = total
        .saturating_mul(u64::from(policy.factor_permille))
        .div_ceil(1_000);
    let target = wanted.min(policy.max_memory_mib);
    if target <= total {
        return None;
    }
    let extra = target - total;
    let next = match cause {
        MemoryCause::Container => ExecutorSize {
            heap_mib: size.heap_mib,
            overhead_mib: size.overhead_mib.saturating_add(extra),
        },
        MemoryCause::Heap => {
            // Heap and overhead grow in proportion, so the heap gets its share of the extra.
            let grown = size.heap_mib.saturating_add(size.overhead_mib).max(1);
            let heap_extra =
                u64::try_from(u128::from(extra) * u128::from(size.heap_mib) / u128::from(grown))
                    .unwrap_or(extra);
            if heap_extra == 0 {
                return None;
            }
            ExecutorSize {
                heap_mib: size.heap_mib.saturating_add(heap_extra),
                overhead_mib: size.overhead_mib.saturating_add(extra - heap_extra),
            }
        }
    };
    debug_assert!(p.total(next) <= policy.max_memory_mib);
    Some(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn profile(heap: u64, overhead: u64) -> ResourceProfile {
        ResourceProfile {
            id: 0,
            cores: 1,
            heap_mib: heap,
            overhead_mib: overhead,
            ..ResourceProfile::default()
        }
    }

    fn sizing(factor_permille: u32, max_memory_mib: u64) -> Sizing {
        let mut s = Sizing::new(Some(ResizePolicy {
            factor_permille,
            max_memory_mib,
        }));
        s.add_profile(&profile(1024, 384));
        s
    }

    fn id(n: u64) -> ExecutorId {
        ExecutorId::new(n)
    }

    #[test]
    fn oom_kill_grows_the_limit_as_overhead_and_keeps_the_heap() {
        let mut s = sizing(1_500, 8_192);
        let before = s.size(0);
        let verdict = s.on_exit(0, id(3), before, Some(137), ExitReason::OomKilled);
        let Verdict::Grew { resize, .. } = verdict else {
            panic!("grows: {verdict:?}");
        };
        // 1408 MiB × 1.5 = 2112 MiB: 704 MiB more overhead.
        assert_eq!(
            resize.to,
            ExecutorSize {
                heap_mib: 1024,
                overhead_mib: 1088
            }
        );
        assert_eq!(s.size(0), Some(resize.to));
        assert_eq!(
            resize.message(),
            "profile 0 now starts executors with 1024 MiB heap + 1088 MiB overhead after \
             executor 3 was OOM-killed"
        );
    }

    #[test]
    fn jvm_out_of_memory_grows_heap_and_limit() {
        let mut s = sizing(1_500, 8_192);
        let before = s.size(0);
        let verdict = s.on_exit(0, id(1), before, Some(52), ExitReason::Error);
        let Verdict::Grew { resize, .. } = verdict else {
            panic!("grows: {verdict:?}");
        };
        assert_eq!(resize.cause, MemoryCause::Heap);
        assert_eq!(
            resize.to,
            ExecutorSize {
                heap_mib: 1536,
                overhead_mib: 576
            }
        );
    }

    #[test]
    fn other_exits_keep_the_size() {
        for (code, reason) in [
            (Some(1), ExitReason::Error),
            (Some(137), ExitReason::Signaled),
            (None, ExitReason::Evicted),
            (None, ExitReason::NodeLost),
            (None, ExitReason::DeletedExternally),
            (Some(143), ExitReason::KilledByDriver),
            (Some(52), ExitReason::KilledByDriver),
            (None, ExitReason::StartFailed),
        ] {
            let mut s = sizing(1_500, 8_192);
            let before = s.size(0);
            assert_eq!(
                s.on_exit(0, id(1), before, code, reason),
                Verdict::Unchanged,
                "{reason} {code:?}"
            );
            assert_eq!(s.size(0), before);
        }
    }

    #[test]
    fn disabled_never_grows() {
        let mut s = Sizing::new(None);
        s.add_profile(&profile(1024, 384));
        let before = s.size(0);
        let verdict = s.on_exit(0, id(1), before, None, ExitReason::OomKilled);
        assert_eq!(verdict, Verdict::Unchanged);
        assert_eq!(verdict.counted(ExitReason::OomKilled), 1);
        assert_eq!(s.size(0), before);
    }

    #[test]
    fn growth_stops_at_the_ceiling_and_then_counts() {
        // 1408 → 1600 (capped), then no room.
        let mut s = sizing(1_500, 1_600);
        let first = s.on_exit(0, id(1), s.size(0), None, ExitReason::OomKilled);
        assert!(matches!(first, Verdict::Grew { .. }), "{first:?}");
        assert_eq!(s.size(0).map(|z| z.heap_mib + z.overhead_mib), Some(1_600));
        let second = s.on_exit(0, id(2), s.size(0), None, ExitReason::OomKilled);
        assert_eq!(
            second,
            Verdict::AtCeiling {
                ceiling_mib: 1_600,
                refused_above: false,
                deferred_now_counted: 1,
                first: true
            }
        );
        assert_eq!(second.counted(ExitReason::OomKilled), 2);
        let third = s.on_exit(0, id(3), s.size(0), None, ExitReason::OomKilled);
        assert_eq!(
            third,
            Verdict::AtCeiling {
                ceiling_mib: 1_600,
                refused_above: false,
                deferred_now_counted: 0,
                first: false
            }
        );
    }

    #[test]
    fn a_size_refused_in_an_earlier_run_is_not_tried_again_but_a_smaller_growth_is() {
        // Configured 1024 + 384 = 1408 MiB; ×1.5 would be 2112, refused in an earlier run.
        let mut s = sizing(1_500, 8_192);
        s.refuse_from(0, 2_112, 7);
        let configured = s.size(0);
        let oom = s.on_exit(0, id(1), configured, Some(137), ExitReason::OomKilled);
        assert_eq!(
            oom,
            Verdict::AtCeiling {
                ceiling_mib: 1_408,
                refused_above: true,
                deferred_now_counted: 0,
                first: true
            }
        );
        assert_eq!(
            oom.counted(ExitReason::OomKilled),
            1,
            "no growth answers it"
        );
        assert_eq!(s.size(0), configured);
        let earlier = Refused {
            total_mib: 2_112,
            since_unix_ms: Some(7),
        };
        assert_eq!(s.refused().collect::<Vec<_>>(), [(0, earlier)]);
        // With a smaller factor the growth stays below the refused size: it is tried.
        let mut s = sizing(1_200, 8_192);
        s.refuse_from(0, 2_112, 7);
        let grew = s.on_exit(0, id(1), configured, Some(137), ExitReason::OomKilled);
        assert!(matches!(grew, Verdict::Grew { .. }), "{grew:?}");
        // A refusal in this run lowers what is remembered, learnt now.
        let grown = s.size(0);
        s.on_exit(0, id(2), grown, None, ExitReason::StartFailed);
        let now = Refused {
            total_mib: 1_690,
            since_unix_ms: None,
        };
        assert_eq!(s.refused().collect::<Vec<_>>(), [(0, now)]);
    }

    #[test]
    fn a_refused_grown_size_steps_back_once_and_grows_no_further() {
        let mut s = sizing(1_500, 8_192);
        let configured = s.size(0);
        let grew = s.on_exit(0, id(1), configured, Some(137), ExitReason::OomKilled);
        assert!(matches!(grew, Verdict::Grew { .. }), "{grew:?}");
        let grown = s.size(0);
        // Two replacements at the grown size, both refused (a LimitRange's maximum).
        let refused = s.on_exit(0, id(2), grown, None, ExitReason::StartFailed);
        assert_eq!(
            refused,
            Verdict::SteppedBack {
                executor: id(2),
                from: grown.unwrap_or_default(),
                to: configured.unwrap_or_default(),
                deferred_now_counted: 1,
            }
        );
        // The OOM kill that grew it counts now; the refusal itself does not.
        assert_eq!(refused.counted(ExitReason::StartFailed), 1);
        assert_eq!(s.size(0), configured);
        let again = s.on_exit(0, id(3), grown, None, ExitReason::StartFailed);
        assert_eq!(again, Verdict::AlreadyResized);
        assert_eq!(again.counted(ExitReason::StartFailed), 0);
        // The next OOM kill at the size the namespace allows counts: no growth, no loop.
        let oom = s.on_exit(0, id(4), configured, Some(137), ExitReason::OomKilled);
        assert_eq!(
            oom,
            Verdict::AtCeiling {
                ceiling_mib: 1_408,
                refused_above: true,
                deferred_now_counted: 0,
                first: true
            }
        );
        assert_eq!(oom.counted(ExitReason::OomKilled), 1);
        assert_eq!(s.size(0), configured);
        // A refused start at the configured size is an ordinary start failure.
        let plain = s.on_exit(0, id(5), configured, None, ExitReason::StartFailed);
        assert_eq!(plain, Verdict::Unchanged);
        assert_eq!(plain.counted(ExitReason::StartFailed), 1);
    }

    #[test]
    fn a_refusal_after_two_growths_steps_back_to_the_size_before_the_last() {
        let mut s = sizing(1_500, 8_192);
        s.on_exit(0, id(1), s.size(0), Some(137), ExitReason::OomKilled);
        let first_growth = s.size(0);
        s.on_exit(0, id(2), first_growth, Some(137), ExitReason::OomKilled);
        let second_growth = s.size(0);
        let refused = s.on_exit(0, id(3), second_growth, None, ExitReason::StartFailed);
        let Verdict::SteppedBack { to, .. } = refused else {
            panic!("steps back: {refused:?}");
        };
        assert_eq!(Some(to), first_growth);
        assert_eq!(s.size(0), first_growth);
    }

    #[test]
    fn a_refused_remembered_size_steps_back_to_the_configured_one() {
        let mut s = sizing(1_500, 8_192);
        let configured = s.size(0);
        let remembered = ExecutorSize {
            heap_mib: 1024,
            overhead_mib: 1088,
        };
        s.start_at(0, remembered);
        let refused = s.on_exit(0, id(1), Some(remembered), None, ExitReason::StartFailed);
        assert!(
            matches!(
                refused,
                Verdict::SteppedBack {
                    deferred_now_counted: 0,
                    ..
                }
            ),
            "{refused:?}"
        );
        assert_eq!(s.size(0), configured);
    }

    #[test]
    fn older_smaller_executors_do_not_grow_the_profile_again() {
        let mut s = sizing(1_500, 8_192);
        let old = s.size(0);
        let grew = s.on_exit(0, id(1), old, None, ExitReason::OomKilled);
        assert!(matches!(grew, Verdict::Grew { .. }));
        let after = s.size(0);
        // Executor 2 was started before the growth and fails the same way.
        let verdict = s.on_exit(0, id(2), old, None, ExitReason::OomKilled);
        assert_eq!(verdict, Verdict::AlreadyResized);
        assert_eq!(verdict.counted(ExitReason::OomKilled), 0);
        assert_eq!(s.size(0), after);
    }

    #[test]
    fn a_grown_executor_failing_the_same_way_counts_the_deferred_failure() {
        let mut s = sizing(1_500, 100_000);
        s.on_exit(0, id(1), s.size(0), Some(52), ExitReason::Error);
        let verdict = s.on_exit(0, id(2), s.size(0), Some(52), ExitReason::Error);
        let Verdict::Grew {
            deferred_now_counted,
            ..
        } = verdict
        else {
            panic!("grows again: {verdict:?}");
        };
        assert_eq!(deferred_now_counted, 1);
    }

    #[test]
    fn a_grown_executor_failing_another_way_does_not_count_the_deferred_failure() {
        let mut s = sizing(1_500, 100_000);
        s.on_exit(0, id(1), s.size(0), Some(52), ExitReason::Error);
        let verdict = s.on_exit(0, id(2), s.size(0), None, ExitReason::OomKilled);
        let Verdict::Grew {
            deferred_now_counted,
            resize,
        } = verdict
        else {
            panic!("grows the limit: {verdict:?}");
        };
        assert_eq!(deferred_now_counted, 0);
        assert_eq!(resize.cause, MemoryCause::Container);
    }

    #[test]
    fn the_ceiling_defaults_to_four_times_the_largest_profile_and_the_server_bounds_it() {
        let small = profile(512, 384);
        let settings = ResizeSettings {
            factor_permille: 1_500,
            max_memory_mib: None,
            sizing_key: None,
        };
        assert_eq!(settings.policy([&small], 65_536).max_memory_mib, 4 * 896);
        assert_eq!(settings.policy([&small], 2_000).max_memory_mib, 2_000);
        let explicit = ResizeSettings {
            max_memory_mib: Some(10_000),
            ..settings.clone()
        };
        assert_eq!(explicit.policy([&small], 8_192).max_memory_mib, 8_192);
        assert_eq!(explicit.policy([&small], 65_536).max_memory_mib, 10_000);
    }

    #[test]
    fn heap_failure_of_an_executor_whose_heap_never_grew_still_grows_the_heap() {
        let mut s = sizing(1_500, 100_000);
        let old = s.size(0);
        // The limit grew; the heap did not.
        s.on_exit(0, id(1), old, None, ExitReason::OomKilled);
        let verdict = s.on_exit(0, id(2), old, Some(52), ExitReason::Error);
        assert!(matches!(verdict, Verdict::Grew { .. }), "{verdict:?}");
    }
}
