use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::sizing::tests::profile;
use crate::sizing::{ResizePolicy, Verdict};
use crate::types::{ExecutorId, ExitReason};

fn size(heap_mib: u64, overhead_mib: u64) -> ExecutorSize {
    ExecutorSize {
        heap_mib,
        overhead_mib,
    }
}

/// Profile 0 configured at 512 + 384 MiB, started at `start` (a size remembered from an earlier
/// run), growth ×1.5.
fn started_at(start: ExecutorSize) -> Sizing {
    let mut s = Sizing::new(Some(ResizePolicy {
        factor_permille: 1_500,
        max_memory_mib: 8_192,
    }));
    s.add_profile(&profile(512, 384));
    s.start_at(0, start);
    s
}

fn used(heap: u64, rss: Option<u64>) -> BTreeMap<ProfileId, ProfileUsage> {
    [(
        0,
        ProfileUsage {
            peak_heap_mib: heap,
            peak_rss_mib: rss,
            complete: true,
        },
    )]
    .into()
}

#[test]
fn a_run_that_used_under_half_the_smaller_heap_steps_the_heap_down_one_notch() {
    let s = started_at(size(768, 576));
    let (sizes, steps) = s.sizes_to_remember(&used(200, None));
    // 768 / 1.5 = 512; 200 MiB used is under half of it. No process-tree metrics: the overhead
    // stays.
    assert_eq!(sizes[&0], size(512, 576));
    assert_eq!(steps.len(), 1);
    assert_eq!(
        steps[0].message("etl"),
        "profile 0's size steps down from 768 MiB heap + 576 MiB overhead to 512 MiB heap + \
         576 MiB overhead for the next run of spark.stoker.sizing.key \"etl\": its executors \
         used at most 200 MiB of heap"
    );
}

#[test]
fn a_run_that_used_more_than_half_the_smaller_heap_keeps_its_size() {
    let s = started_at(size(768, 576));
    let (sizes, steps) = s.sizes_to_remember(&used(257, None));
    assert_eq!(sizes[&0], size(768, 576));
    assert!(steps.is_empty());
    // Exactly half steps down.
    let (sizes, _) = s.sizes_to_remember(&used(256, None));
    assert_eq!(sizes[&0].heap_mib, 512);
}

#[test]
fn the_overhead_steps_down_only_on_resident_memory_against_the_smaller_limit() {
    let s = started_at(size(768, 576));
    // 576 / 1.5 = 384 (the configured overhead); new limit 512 + 384 = 896 MiB.
    let (sizes, steps) = s.sizes_to_remember(&used(200, Some(448)));
    assert_eq!(sizes[&0], size(512, 384));
    assert!(steps[0]
        .message("k")
        .ends_with("at most 200 MiB of heap and 448 MiB resident"));
    // More resident memory than half the smaller limit: the overhead stays.
    let (sizes, _) = s.sizes_to_remember(&used(200, Some(449)));
    assert_eq!(sizes[&0], size(512, 576));
}

#[test]
fn never_below_the_configured_size() {
    let s = started_at(size(600, 400));
    let (sizes, _) = s.sizes_to_remember(&used(10, Some(10)));
    assert_eq!(sizes[&0], size(512, 384));
    // At the configured size there is nothing to step down.
    let s = started_at(size(512, 384));
    let (sizes, steps) = s.sizes_to_remember(&used(10, Some(10)));
    assert_eq!(sizes[&0], size(512, 384));
    assert!(steps.is_empty());
}

#[test]
fn a_profile_that_grew_during_the_run_keeps_the_size_it_needed() {
    let mut s = started_at(size(768, 576));
    let current = s.size(0);
    let verdict = s.on_exit(0, ExecutorId::new(1), current, Some(52), ExitReason::Error);
    assert!(matches!(verdict, Verdict::Grew { .. }), "{verdict:?}");
    let grown = s.size(0).expect("profile 0");
    let (sizes, steps) = s.sizes_to_remember(&used(10, Some(10)));
    assert_eq!(sizes[&0], grown);
    assert!(steps.is_empty());
}

#[test]
fn without_a_measurement_of_every_executor_the_size_stays() {
    let s = started_at(size(768, 576));
    let mut partial = used(10, Some(10));
    partial.get_mut(&0).expect("profile 0").complete = false;
    assert_eq!(s.sizes_to_remember(&partial).0[&0], size(768, 576));
    assert_eq!(s.sizes_to_remember(&BTreeMap::new()).0[&0], size(768, 576));
}

#[test]
fn without_resizing_sizes_stay_configured() {
    let mut s = Sizing::new(None);
    s.add_profile(&profile(512, 384));
    let (sizes, steps) = s.sizes_to_remember(&used(10, Some(10)));
    assert_eq!(sizes[&0], size(512, 384));
    assert!(steps.is_empty());
}

proptest! {
    /// Whatever the sizes and the usage: the remembered size is between the configured size and
    /// the run's size in each dimension, changes at most one notch, and a dimension that steps
    /// down had its evidence.
    #[test]
    fn a_step_down_is_bounded_and_earned(
        conf_heap in 256u64..4_096,
        conf_overhead in 384u64..2_048,
        heap_extra in 0u64..8_192,
        overhead_extra in 0u64..4_096,
        factor_permille in 1_001u32..4_000,
        peak_heap in 0u64..16_384,
        peak_rss in proptest::option::of(0u64..16_384),
        complete in any::<bool>(),
    ) {
        let mut s = Sizing::new(Some(ResizePolicy { factor_permille, max_memory_mib: 1 << 20 }));
        s.add_profile(&profile(conf_heap, conf_overhead));
        let start = size(conf_heap + heap_extra, conf_overhead + overhead_extra);
        s.start_at(0, start);
        let usage = ProfileUsage { peak_heap_mib: peak_heap, peak_rss_mib: peak_rss, complete };
        let (sizes, steps) = s.sizes_to_remember(&[(0, usage)].into());
        let to = sizes[&0];
        prop_assert!(to.heap_mib >= conf_heap && to.heap_mib <= start.heap_mib);
        prop_assert!(to.overhead_mib >= conf_overhead && to.overhead_mib <= start.overhead_mib);
        prop_assert_eq!(steps.len(), usize::from(to != start));
        if !complete {
            prop_assert_eq!(to, start);
        }
        if to.heap_mib < start.heap_mib {
            prop_assert!(peak_heap * 2 <= to.heap_mib);
            // One notch: the run's heap divided by the factor, rounded down (or the configured
            // heap, the floor).
            let f = u64::from(factor_permille);
            prop_assert!(to.heap_mib == conf_heap || to.heap_mib * f <= start.heap_mib * 1_000);
            prop_assert!(to.heap_mib == conf_heap || (to.heap_mib + 1) * f > start.heap_mib * 1_000);
        }
        if to.overhead_mib < start.overhead_mib {
            let rss = peak_rss.expect("the overhead steps down only when resident memory is known");
            prop_assert!(rss * 2 <= to.heap_mib + to.overhead_mib);
        }
    }
}
