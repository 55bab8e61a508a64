//! An executor started at a size stoker chose (a replacement grown after an out-of-memory
//! failure, see `stoker_core::sizing`) instead of its profile's: one typed step over the built
//! pod, whichever way it was built (stoker's template merge or Spark's own builder).
//!
//! The executor container's `SPARK_EXECUTOR_MEMORY` (the image's entrypoint makes it `-Xms` and
//! `-Xmx`) becomes the chosen heap, and its memory request and limit grow by the difference
//! between the chosen and the configured heap + overhead. Adding the difference keeps whatever
//! else is in the quantity (off-heap, PySpark memory, a template's own figure), and a pod at its
//! configured size is left exactly as it was built.

use k8s_openapi::api::core::v1::{Container, EnvVar, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use stoker_core::{ExecutorSize, ResourceProfile};

use crate::pod::{ANNOTATION_CONTAINER, DEFAULT_CONTAINER};

/// Why the chosen size cannot be applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SizeError {
    /// The pod has no executor container.
    #[error("the pod has no executor container {0:?}")]
    NoContainer(String),
    /// A memory quantity stoker cannot add to.
    #[error("cannot grow the executor's memory {which} {value:?}: not a quantity stoker reads")]
    Quantity {
        /// `requests` or `limits`.
        which: &'static str,
        /// The quantity.
        value: String,
    },
}

/// Bytes in a Kubernetes quantity (`6758Mi`, `2Gi`, `512M`, `1073741824`), when it is a whole
/// number of bytes with a suffix stoker knows.
pub fn bytes(quantity: &str) -> Option<u128> {
    let q = quantity.trim();
    let split = q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len());
    let (digits, suffix) = q.split_at(split);
    let n: u128 = digits.parse().ok()?;
    let factor: u128 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        _ => return None,
    };
    n.checked_mul(factor)
}

fn grow(quantity: &mut Quantity, by_mib: i128, which: &'static str) -> Result<(), SizeError> {
    let current = bytes(&quantity.0).ok_or_else(|| SizeError::Quantity {
        which,
        value: quantity.0.clone(),
    })?;
    let mib = i128::try_from(current.div_ceil(1 << 20)).unwrap_or(i128::MAX);
    let grown = mib.saturating_add(by_mib).max(1);
    quantity.0 = format!("{grown}Mi");
    Ok(())
}

fn set_env(container: &mut Container, name: &str, value: String) {
    let env = container.env.get_or_insert_with(Vec::new);
    match env.iter_mut().find(|e| e.name == name) {
        Some(var) => {
            var.value = Some(value);
            var.value_from = None;
        }
        None => env.push(EnvVar {
            name: name.to_owned(),
            value: Some(value),
            value_from: None,
        }),
    }
}

/// Starts the executor of `pod` at `size` instead of `profile`'s configured size.
pub fn apply(
    pod: &mut Pod,
    profile: &ResourceProfile,
    size: ExecutorSize,
) -> Result<(), SizeError> {
    let configured = ExecutorSize::of(profile);
    if size == configured {
        return Ok(());
    }
    let name = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_CONTAINER))
        .cloned()
        .unwrap_or_else(|| DEFAULT_CONTAINER.to_owned());
    let container = pod
        .spec
        .as_mut()
        .and_then(|s| s.containers.iter_mut().find(|c| c.name == name))
        .ok_or_else(|| SizeError::NoContainer(name.clone()))?;
    let as_i128 = |v: u64| i128::from(v);
    let delta = as_i128(size.heap_mib) + as_i128(size.overhead_mib)
        - as_i128(configured.heap_mib)
        - as_i128(configured.overhead_mib);
    set_env(
        container,
        "SPARK_EXECUTOR_MEMORY",
        format!("{}m", size.heap_mib.max(32)),
    );
    let resources = container.resources.get_or_insert_with(Default::default);
    if let Some(q) = resources
        .requests
        .as_mut()
        .and_then(|r| r.get_mut("memory"))
    {
        grow(q, delta, "requests")?;
    }
    if let Some(q) = resources.limits.as_mut().and_then(|r| r.get_mut("memory")) {
        grow(q, delta, "limits")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn profile() -> ResourceProfile {
        ResourceProfile {
            heap_mib: 512,
            overhead_mib: 384,
            ..ResourceProfile::default()
        }
    }

    fn pod(memory: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"annotations": {ANNOTATION_CONTAINER: "exec"}},
            "spec": {"containers": [
                {"name": "sidecar", "resources": {"limits": {"memory": "64Mi"}}},
                {"name": "exec", "env": [{"name": "SPARK_EXECUTOR_MEMORY", "value": "512m"}],
                 "resources": {"requests": {"memory": memory}, "limits": {"memory": memory}}}]}
        }))
        .expect("pod")
    }

    fn exec(pod: &Pod) -> &Container {
        &pod.spec.as_ref().expect("spec").containers[1]
    }

    #[test]
    fn a_grown_executor_gets_the_heap_and_the_limit_and_nothing_else_changes() {
        let mut p = pod("896Mi");
        apply(
            &mut p,
            &profile(),
            ExecutorSize {
                heap_mib: 768,
                overhead_mib: 576,
            },
        )
        .expect("applied");
        let c = exec(&p);
        let env = c.env.as_ref().expect("env");
        assert_eq!(env[0].value.as_deref(), Some("768m"));
        let r = c.resources.as_ref().expect("resources");
        assert_eq!(r.requests.as_ref().expect("requests")["memory"].0, "1344Mi");
        assert_eq!(r.limits.as_ref().expect("limits")["memory"].0, "1344Mi");
        let sidecar = &p.spec.as_ref().expect("spec").containers[0];
        assert_eq!(
            sidecar
                .resources
                .as_ref()
                .and_then(|r| r.limits.as_ref())
                .expect("limits")["memory"]
                .0,
            "64Mi"
        );
    }

    #[test]
    fn an_executor_at_its_configured_size_is_left_as_built() {
        let mut p = pod("1Gi");
        let before = p.clone();
        apply(&mut p, &profile(), ExecutorSize::of(&profile())).expect("applied");
        assert_eq!(p, before);
    }

    #[test]
    fn other_units_are_read_and_unknown_ones_refused() {
        let mut p = pod("1Gi");
        apply(
            &mut p,
            &profile(),
            ExecutorSize {
                heap_mib: 512,
                overhead_mib: 640,
            },
        )
        .expect("applied");
        assert_eq!(
            exec(&p)
                .resources
                .as_ref()
                .and_then(|r| r.limits.as_ref())
                .expect("l")["memory"]
                .0,
            "1280Mi"
        );
        let mut bad = pod("1.5Gi");
        let err = apply(
            &mut bad,
            &profile(),
            ExecutorSize {
                heap_mib: 768,
                overhead_mib: 384,
            },
        );
        assert!(matches!(err, Err(SizeError::Quantity { .. })), "{err:?}");
        assert_eq!(bytes("512M"), Some(512_000_000));
        assert_eq!(bytes("2Ki"), Some(2048));
        assert_eq!(bytes("x"), None);
    }
}
