//! Stepping a size back down at the end of a run whose executors used far less than they were
//! given, so that one run with unusual data does not make every later run of its sizing key
//! bigger for good.
//!
//! # Rules
//!
//! At the end of a run (the driver unregisters), for each profile started above its configured
//! size (a size remembered from an earlier run, or grown by an earlier run):
//!
//! * A profile that grew during this run keeps the size it ends with: that size was needed.
//! * Without a measurement of every executor of the profile that ran (the driver's peak executor
//!   metrics, [`ProfileUsage`]), the size stays: stoker never steps down on a guess.
//! * Each dimension steps down by one notch (divided by the growth factor, never below the
//!   configured size), only on its own evidence, and only when the peak used is at most half of
//!   the smaller size:
//!   - the **heap** on the peak heap used (Spark's `JVMHeapMemory`, which counts garbage not yet
//!     collected, so it over-states the need rather than under-states it);
//!   - the **overhead** on the peak resident memory of the executor's processes (Spark's
//!     process-tree metrics: JVM, Python and other children), against the whole smaller memory
//!     limit. Without process-tree metrics (`spark.executor.processTreeMetrics.enabled` is off by
//!     default) the overhead stays.
//! * One notch per run: a run that was far smaller than the size steps down once; the next such
//!   run steps down again.
//!
//! A run with more data at the smaller size runs out of memory and grows again as any run does
//! (its failure deferred, not counted). Nothing remembers that a smaller size once failed: the
//! half-used rule is what keeps a profile from stepping down on the evidence of a run that was
//! merely a little smaller.

use std::collections::BTreeMap;

use super::{ExecutorSize, ProfileSizing, Sizing};
use crate::types::ProfileId;

/// What the executors of one profile used at most during a run, as the driver measured it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProfileUsage {
    /// The largest JVM heap used by any executor of the profile, in MiB.
    pub peak_heap_mib: u64,
    /// The largest resident memory of any executor's processes (JVM and children), in MiB;
    /// `None`: not measured.
    pub peak_rss_mib: Option<u64>,
    /// Every executor of the profile that ran was measured.
    pub complete: bool,
}

/// A profile's size stepped down for the next run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepDown {
    /// The profile.
    pub profile: ProfileId,
    /// The size the run had.
    pub from: ExecutorSize,
    /// The size the next run starts at.
    pub to: ExecutorSize,
    /// What the run used.
    pub usage: ProfileUsage,
}

impl StepDown {
    /// The message for the driver and the log.
    pub fn message(&self, sizing_key: &str) -> String {
        let rss = self
            .usage
            .peak_rss_mib
            .map(|rss| format!(" and {rss} MiB resident"))
            .unwrap_or_default();
        format!(
            "profile {}'s size steps down from {} MiB heap + {} MiB overhead to {} MiB heap + \
             {} MiB overhead for the next run of spark.stoker.sizing.key {sizing_key:?}: its \
             executors used at most {} MiB of heap{rss}",
            self.profile,
            self.from.heap_mib,
            self.from.overhead_mib,
            self.to.heap_mib,
            self.to.overhead_mib,
            self.usage.peak_heap_mib,
        )
    }
}

impl Sizing {
    /// The sizes to remember at the end of a run that used `usage`, and the profiles that step
    /// down. See the module documentation.
    pub fn sizes_to_remember(
        &self,
        usage: &BTreeMap<ProfileId, ProfileUsage>,
    ) -> (BTreeMap<ProfileId, ExecutorSize>, Vec<StepDown>) {
        let mut sizes = BTreeMap::new();
        let mut steps = Vec::new();
        for (&profile, p) in &self.profiles {
            let to = match (self.policy, usage.get(&profile)) {
                (Some(policy), Some(used)) => {
                    step_down(p, policy.factor_permille, used).unwrap_or(p.current)
                }
                _ => p.current,
            };
            if to != p.current {
                steps.push(StepDown {
                    profile,
                    from: p.current,
                    to,
                    usage: usage.get(&profile).copied().unwrap_or_default(),
                });
            }
            sizes.insert(profile, to);
        }
        (sizes, steps)
    }
}

/// One notch below `value`, not below `floor`.
fn notch_below(value: u64, floor: u64, factor_permille: u32) -> u64 {
    let lower = value.saturating_mul(1_000) / u64::from(factor_permille.max(1_001));
    lower.max(floor).min(value)
}

fn step_down(p: &ProfileSizing, factor_permille: u32, used: &ProfileUsage) -> Option<ExecutorSize> {
    if p.grew || p.current == p.configured || !used.complete {
        return None;
    }
    let mut to = p.current;
    let heap = notch_below(p.current.heap_mib, p.configured.heap_mib, factor_permille);
    if heap < p.current.heap_mib && used.peak_heap_mib.saturating_mul(2) <= heap {
        to.heap_mib = heap;
    }
    let overhead = notch_below(
        p.current.overhead_mib,
        p.configured.overhead_mib,
        factor_permille,
    );
    if let Some(rss) = used.peak_rss_mib {
        let limit = p.total(ExecutorSize {
            heap_mib: to.heap_mib,
            overhead_mib: overhead,
        });
        if overhead < p.current.overhead_mib && rss.saturating_mul(2) <= limit {
            to.overhead_mib = overhead;
        }
    }
    (to != p.current).then_some(to)
}

#[cfg(test)]
mod tests;
