//! What a pod's status means for its executor: pure classification, no I/O.

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use stoker_core::ExitReason;

use crate::pod::{ANNOTATION_CONTAINER, DEFAULT_CONTAINER};

/// The executor's state as the pod shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodView {
    /// Created, not running yet (scheduling, pulling, starting).
    Pending,
    /// The executor container runs.
    Running {
        /// Pod IP.
        ip: String,
    },
    /// Over: the executor will not run (again). The pod should be deleted.
    Exited {
        /// Container exit code, when there is one.
        code: Option<i32>,
        /// Structured reason.
        reason: ExitReason,
        /// For people.
        message: String,
    },
}

fn executor_status(pod: &Pod) -> Option<&ContainerStatus> {
    let name = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_CONTAINER))
        .map_or(DEFAULT_CONTAINER, String::as_str);
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    statuses.iter().find(|s| s.name == name)
}

/// Waiting reasons after which the container will never start without a change to the pod.
const START_FAILURES: [&str; 6] = [
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
    "CreateContainerError",
];

/// Why the scheduler cannot place a pending pod (its `PodScheduled=False, Unschedulable`
/// condition's message, e.g. "0/3 nodes are available: 3 Insufficient memory."), if it cannot.
/// The pod stays pending and may still be placed later (a node joins, the autoscaler adds one).
pub fn unschedulable(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    if status.phase.as_deref().is_some_and(|p| p != "Pending") {
        return None;
    }
    status.conditions.as_ref()?.iter().find_map(|c| {
        (c.type_ == "PodScheduled"
            && c.status == "False"
            && c.reason.as_deref() == Some("Unschedulable"))
        .then(|| c.message.clone().unwrap_or_else(|| "Unschedulable".into()))
    })
}

/// Classifies a pod.
pub fn classify(pod: &Pod) -> PodView {
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
    let pod_reason = status.and_then(|s| s.reason.as_deref()).unwrap_or_default();
    let pod_message = status
        .and_then(|s| s.message.as_deref())
        .unwrap_or_default();
    let exec = executor_status(pod);
    let terminated = exec
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.terminated.as_ref());

    if pod_reason == "Evicted" {
        return PodView::Exited {
            code: terminated.map(|t| t.exit_code),
            reason: ExitReason::Evicted,
            message: format!("pod evicted: {pod_message}"),
        };
    }
    if pod_reason == "DeadlineExceeded" {
        return PodView::Exited {
            code: terminated.map(|t| t.exit_code),
            reason: ExitReason::DeadlineExceeded,
            message: format!("pod ran past activeDeadlineSeconds: {pod_message}"),
        };
    }
    if pod_reason == "NodeLost" || pod_reason == "UnexpectedAdmissionError" {
        return PodView::Exited {
            code: None,
            reason: ExitReason::NodeLost,
            message: format!("{pod_reason}: {pod_message}"),
        };
    }
    if let Some(t) = terminated {
        // The executor container is done; with restartPolicy Never it stays done.
        let container_reason = t.reason.as_deref().unwrap_or_default();
        let (reason, what) = if container_reason == "OOMKilled" {
            (
                ExitReason::OomKilled,
                "killed for exceeding its memory limit (OOMKilled)".to_string(),
            )
        } else if t.exit_code == 0 {
            (ExitReason::Completed, "exited with code 0".to_string())
        } else if matches!(container_reason, "StartError" | "ContainerCannotRun") {
            (
                ExitReason::StartFailed,
                format!("could not start ({container_reason})"),
            )
        } else {
            (
                ExitReason::Error,
                format!(
                    "exited with code {} ({})",
                    t.exit_code,
                    if container_reason.is_empty() {
                        "Error"
                    } else {
                        container_reason
                    }
                ),
            )
        };
        let detail = t.message.as_deref().filter(|m| !m.is_empty());
        return PodView::Exited {
            code: Some(t.exit_code),
            reason,
            message: match detail {
                Some(d) => format!("{what}: {d}"),
                None => what,
            },
        };
    }
    if matches!(phase, "Failed" | "Succeeded") {
        return PodView::Exited {
            code: None,
            reason: if phase == "Failed" {
                ExitReason::Error
            } else {
                ExitReason::Completed
            },
            message: format!("pod {phase}: {pod_reason} {pod_message}")
                .trim()
                .to_string(),
        };
    }
    if let Some(w) = exec
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.waiting.as_ref())
    {
        let reason = w.reason.as_deref().unwrap_or_default();
        if START_FAILURES.contains(&reason) {
            return PodView::Exited {
                code: None,
                reason: ExitReason::StartFailed,
                message: format!(
                    "{reason}: {}",
                    w.message.as_deref().unwrap_or("the container cannot start")
                ),
            };
        }
    }
    // A node that stopped reporting: the node lifecycle controller flips the pod's Ready
    // condition to False and nothing else (MarkPodsNotReady keeps the condition's reason and
    // leaves ContainersReady alone); its taint manager may evict the pod much later (default
    // toleration 300 s, DisruptionTarget DeletionByTaintManager). A kubelet never writes Ready
    // False with ContainersReady True unless a readiness gate is unmet, so that pair, on a pod
    // without readiness gates, is the node controller's mark.
    let conditions = status.and_then(|s| s.conditions.as_ref());
    let condition = |kind: &str| {
        conditions
            .into_iter()
            .flatten()
            .find(|c| c.type_ == kind)
            .map(|c| c.status.as_str())
    };
    let no_gates = pod
        .spec
        .as_ref()
        .and_then(|s| s.readiness_gates.as_ref())
        .is_none_or(|g| g.is_empty());
    let marked_not_ready = no_gates
        && condition("Ready") == Some("False")
        && condition("ContainersReady") == Some("True");
    let evicted_by_taint = conditions.into_iter().flatten().any(|c| {
        c.type_ == "DisruptionTarget"
            && c.status == "True"
            && c.reason.as_deref() == Some("DeletionByTaintManager")
    });
    let node_gone = marked_not_ready || evicted_by_taint;
    if node_gone && phase == "Running" {
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
            .unwrap_or("?");
        return PodView::Exited {
            code: None,
            reason: ExitReason::NodeLost,
            message: format!("node {node} stopped reporting; the executor is presumed lost"),
        };
    }
    let running = exec
        .and_then(|c| c.state.as_ref())
        .is_some_and(|s| s.running.is_some());
    if phase == "Running" && running {
        let ip = status.and_then(|s| s.pod_ip.clone()).unwrap_or_default();
        return PodView::Running { ip };
    }
    PodView::Pending
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "annotations": {ANNOTATION_CONTAINER: "exec"}},
            "spec": {"containers": [{"name": "exec"}], "nodeName": "n1"},
            "status": status,
        }))
        .expect("pod")
    }

    fn terminated(code: i32, reason: &str) -> serde_json::Value {
        json!({"phase": "Failed", "containerStatuses": [{"name": "exec", "image": "i", "imageID": "", "ready": false,
            "restartCount": 0, "state": {"terminated": {"exitCode": code, "reason": reason}}}]})
    }

    #[test]
    fn unschedulable_pods_say_why_and_others_do_not() {
        let cond = |status: &str, reason: &str| {
            json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": status,
                "reason": reason, "message": "0/1 nodes are available: 1 Insufficient memory."}]})
        };
        assert_eq!(
            unschedulable(&pod(cond("False", "Unschedulable"))).as_deref(),
            Some("0/1 nodes are available: 1 Insufficient memory.")
        );
        assert_eq!(unschedulable(&pod(cond("True", ""))), None);
        assert_eq!(unschedulable(&pod(cond("False", "SchedulingGated"))), None);
        assert_eq!(unschedulable(&pod(json!({"phase": "Pending"}))), None);
        assert_eq!(unschedulable(&pod(terminated(1, "Error"))), None);
        // Still pending: the driver is told, the executor is not given up.
        assert_eq!(
            classify(&pod(cond("False", "Unschedulable"))),
            PodView::Pending
        );
    }

    #[test]
    fn classifies_exits() {
        let v = classify(&pod(terminated(137, "OOMKilled")));
        assert!(
            matches!(
                v,
                PodView::Exited {
                    code: Some(137),
                    reason: ExitReason::OomKilled,
                    ..
                }
            ),
            "{v:?}"
        );
        let v = classify(&pod(terminated(42, "Error")));
        assert!(
            matches!(
                v,
                PodView::Exited {
                    code: Some(42),
                    reason: ExitReason::Error,
                    ..
                }
            ),
            "{v:?}"
        );
        let v = classify(&pod(terminated(0, "Completed")));
        assert!(matches!(
            v,
            PodView::Exited {
                code: Some(0),
                reason: ExitReason::Completed,
                ..
            }
        ));
        let mut s = terminated(137, "Error");
        s["reason"] = json!("Evicted");
        s["message"] = json!("low on memory");
        let v = classify(&pod(s));
        assert!(
            matches!(
                v,
                PodView::Exited {
                    reason: ExitReason::Evicted,
                    ..
                }
            ),
            "{v:?}"
        );
        let mut s = json!({"phase": "Failed", "reason": "DeadlineExceeded"});
        s["message"] = json!("x");
        assert!(matches!(
            classify(&pod(s)),
            PodView::Exited {
                reason: ExitReason::DeadlineExceeded,
                ..
            }
        ));
    }

    #[test]
    fn classifies_start_and_running() {
        assert_eq!(
            classify(&pod(json!({"phase": "Pending"}))),
            PodView::Pending
        );
        let pull = json!({"phase": "Pending", "containerStatuses": [{"name": "exec", "image": "i", "imageID": "",
            "ready": false, "restartCount": 0, "state": {"waiting": {"reason": "ErrImagePull", "message": "not found"}}}]});
        let v = classify(&pod(pull));
        assert!(
            matches!(&v, PodView::Exited { reason: ExitReason::StartFailed, message, .. } if message.contains("not found")),
            "{v:?}"
        );
        let running = json!({"phase": "Running", "podIP": "10.1.2.3", "containerStatuses": [{"name": "exec", "image": "i",
            "imageID": "", "ready": true, "restartCount": 0, "state": {"running": {}}}],
            "conditions": [{"type": "Ready", "status": "True"}]});
        assert_eq!(
            classify(&pod(running.clone())),
            PodView::Running {
                ip: "10.1.2.3".into()
            }
        );
        // The node lifecycle controller's mark (as MarkPodsNotReady leaves it): Ready False,
        // ContainersReady still True.
        let mut lost = running.clone();
        lost["conditions"] = json!([{"type": "Ready", "status": "False"},
            {"type": "ContainersReady", "status": "True"}]);
        assert!(matches!(
            classify(&pod(lost.clone())),
            PodView::Exited {
                reason: ExitReason::NodeLost,
                ..
            }
        ));
        // The kubelet's own not-ready (a container not ready) is not a lost node.
        let mut unready = running.clone();
        unready["conditions"] = json!([{"type": "Ready", "status": "False"},
            {"type": "ContainersReady", "status": "False"}]);
        assert!(matches!(classify(&pod(unready)), PodView::Running { .. }));
        // Nor is an unmet readiness gate.
        let mut gated = pod(lost);
        gated
            .spec
            .get_or_insert_with(Default::default)
            .readiness_gates = Some(vec![Default::default()]);
        assert!(matches!(classify(&gated), PodView::Running { .. }));
        // The taint manager's eviction.
        let mut evicted = running;
        evicted["conditions"] = json!([{"type": "DisruptionTarget", "status": "True",
            "reason": "DeletionByTaintManager"}]);
        assert!(matches!(
            classify(&pod(evicted)),
            PodView::Exited {
                reason: ExitReason::NodeLost,
                ..
            }
        ));
    }
}
