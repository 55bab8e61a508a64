//! The election's decisions on hand-built Leases, on paused time.

use super::*;

fn lease(holder: Option<&str>, renew_second: i64, transitions: i32) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some("stoker".into()),
            namespace: Some("stoker".into()),
            resource_version: Some("7".into()),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: holder.map(str::to_owned),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(
                k8s_openapi::jiff::Timestamp::from_second(renew_second).expect("time"),
            )),
            acquire_time: Some(MicroTime(
                k8s_openapi::jiff::Timestamp::from_second(1).expect("time"),
            )),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }),
    }
}

fn config(identity: &str) -> LeaseConfig {
    LeaseConfig::new("stoker".into(), "stoker".into(), identity.into())
}

#[tokio::test(start_paused = true)]
async fn a_missing_or_free_lease_is_taken_at_once() {
    let mut candidate = Candidate::new("b".into(), Duration::from_secs(15));
    assert_eq!(candidate.observe(None, Instant::now()), Verdict::Take);
    assert_eq!(
        candidate.observe(Some(&lease(None, 10, 3)), Instant::now()),
        Verdict::Take
    );
}

#[tokio::test(start_paused = true)]
async fn a_held_lease_is_taken_only_after_a_lease_duration_without_change() {
    let mut candidate = Candidate::new("b".into(), Duration::from_secs(15));
    let held = lease(Some("a"), 100, 0);
    assert!(matches!(
        candidate.observe(Some(&held), Instant::now()),
        Verdict::HeldBy { ref holder, expires_in } if holder == "a" && expires_in == Duration::from_secs(15)
    ));
    tokio::time::advance(Duration::from_secs(14)).await;
    assert!(matches!(
        candidate.observe(Some(&held), Instant::now()),
        Verdict::HeldBy { expires_in, .. } if expires_in == Duration::from_secs(1)
    ));
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(
        candidate.observe(Some(&held), Instant::now()),
        Verdict::Take
    );
}

#[tokio::test(start_paused = true)]
async fn each_renewal_restarts_the_wait_whatever_the_remote_clock_says() {
    let mut candidate = Candidate::new("b".into(), Duration::from_secs(15));
    // A renew time far in the past by our wall clock: it is never compared with it.
    let _ = candidate.observe(Some(&lease(Some("a"), 1, 0)), Instant::now());
    tokio::time::advance(Duration::from_secs(10)).await;
    let renewed = lease(Some("a"), 2, 0);
    assert!(matches!(
        candidate.observe(Some(&renewed), Instant::now()),
        Verdict::HeldBy { expires_in, .. } if expires_in == Duration::from_secs(15)
    ));
    tokio::time::advance(Duration::from_secs(10)).await;
    assert!(matches!(
        candidate.observe(Some(&renewed), Instant::now()),
        Verdict::HeldBy { .. }
    ));
}

#[tokio::test(start_paused = true)]
async fn a_lease_naming_this_replica_is_its_own() {
    let mut candidate = Candidate::new("a".into(), Duration::from_secs(15));
    assert_eq!(
        candidate.observe(Some(&lease(Some("a"), 100, 4)), Instant::now()),
        Verdict::Take
    );
}

#[test]
fn claiming_counts_transitions_and_keeps_the_acquire_time_on_renewal() {
    let at = MicroTime(k8s_openapi::jiff::Timestamp::from_second(500).expect("time"));
    let taken = claim(Some(&lease(Some("a"), 100, 4)), &config("b"), at.clone());
    let spec = taken.spec.as_ref().expect("spec");
    assert_eq!(spec.holder_identity.as_deref(), Some("b"));
    assert_eq!(spec.lease_transitions, Some(5));
    assert_eq!(spec.acquire_time, Some(at.clone()));
    assert_eq!(spec.renew_time, Some(at.clone()));
    assert_eq!(spec.lease_duration_seconds, Some(15));
    // The resourceVersion read is kept: it is the write's precondition.
    assert_eq!(taken.metadata.resource_version.as_deref(), Some("7"));

    let renewed = claim(Some(&taken), &config("b"), now());
    let spec = renewed.spec.as_ref().expect("spec");
    assert_eq!(spec.lease_transitions, Some(5));
    assert_eq!(spec.acquire_time, Some(at));

    let after_release = claim(Some(&lease(None, 100, 5)), &config("a"), now());
    assert_eq!(
        after_release
            .spec
            .as_ref()
            .and_then(|s| s.lease_transitions),
        Some(6)
    );

    let fresh = claim(None, &config("a"), now());
    assert_eq!(fresh.metadata.name.as_deref(), Some("stoker"));
    assert_eq!(
        fresh.spec.as_ref().and_then(|s| s.lease_transitions),
        Some(0)
    );
}

#[tokio::test(start_paused = true)]
async fn the_write_gate_shuts_at_its_deadline_and_never_moves_back() {
    let gate = WriteGate::shut();
    assert!(!gate.is_open());
    gate.open_until(Instant::now() + Duration::from_secs(10));
    assert!(gate.is_open());
    gate.open_until(Instant::now() + Duration::from_secs(5));
    tokio::time::advance(Duration::from_secs(9)).await;
    assert!(
        gate.is_open(),
        "an older renewal must not shorten the deadline"
    );
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(!gate.is_open());
    gate.open_until(Instant::now() + Duration::from_secs(10));
    gate.shut_now();
    assert!(!gate.is_open());
    assert!(WriteGate::always_open().is_open());
}

#[test]
fn timings_that_could_overlap_two_leaders_are_refused() {
    let mut c = config("a");
    assert!(c.check().is_ok());
    c.renew_deadline = c.lease_duration;
    assert!(c.check().is_err());
    let mut c = config("a");
    c.retry_period = c.renew_deadline;
    assert!(c.check().is_err());
    assert!(config("").check().is_err());
}
