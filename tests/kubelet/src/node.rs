//! Node objects: registration with capacity, Ready condition, Lease renewal, and the
//! `testbed.stoker.dev/lost` fault (a node that stops reporting).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::Api;
use serde_json::json;
use tracing::{info, warn};

use crate::{micro_now, now, Shared, LABEL_KUBELET, LOST_ANNOTATION};

/// How often the Lease is renewed (the real kubelet: 10 s against a 50 s grace period; the test
/// bed's controller manager allows 20 s, see tests/testbed/cmd/testbed/main.go).
const LEASE_RENEW: Duration = Duration::from_secs(5);
/// How often the Node status heartbeat is written even without a change.
const STATUS_EVERY: u32 = 6;

/// Creates (or takes over) every Node of this kubelet and reports it Ready.
pub async fn register(shared: &Shared) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(shared.client.clone());
    for name in &shared.nodes {
        let node: Node = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "labels": {
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "node.kubernetes.io/instance-type": "process",
                    LABEL_KUBELET: shared.kubelet_id,
                }
            },
            "spec": {}
        }))?;
        match nodes.create(&PostParams::default(), &node).await {
            Ok(_) => info!(node = %name, "node registered"),
            Err(kube::Error::Api(s)) if s.is_already_exists() => {
                info!(node = %name, "node exists; taking it over");
                // A previous run may have left the fault annotation.
                let patch = json!({"metadata": {"annotations": {LOST_ANNOTATION: null}}});
                nodes
                    .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
            }
            Err(err) => return Err(err.into()),
        }
        write_status(shared, name).await?;
        renew_lease(shared, name).await?;
    }
    Ok(())
}

async fn write_status(shared: &Shared, name: &str) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(shared.client.clone());
    let t = now();
    let cond = |kind: &str, status: &str, reason: &str, message: &str| {
        json!({"type": kind, "status": status, "reason": reason, "message": message,
               "lastHeartbeatTime": t, "lastTransitionTime": shared.started_at})
    };
    let capacity = json!({
        "cpu": shared.capacity.cpu,
        "memory": shared.capacity.memory,
        "pods": shared.capacity.pods.to_string(),
        "ephemeral-storage": "100Gi",
    });
    let status = json!({"status": {
        "capacity": capacity,
        "allocatable": capacity,
        "conditions": [
            cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
            cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            cond("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
            cond("Ready", "True", "KubeletReady", "test-bed process kubelet is posting ready status"),
        ],
        "addresses": [
            {"type": "InternalIP", "address": "127.0.0.1"},
            {"type": "Hostname", "address": name},
        ],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
        "nodeInfo": {
            "machineID": shared.kubelet_id,
            "systemUUID": shared.kubelet_id,
            "bootID": shared.kubelet_id,
            "kernelVersion": "",
            "osImage": "stoker test bed (containers are local processes)",
            "containerRuntimeVersion": "process://0.1.0",
            "kubeletVersion": "v1.37.2",
            "kubeProxyVersion": "",
            "operatingSystem": "linux",
            "architecture": "amd64",
        },
    }});
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    Ok(())
}

async fn renew_lease(shared: &Shared, name: &str) -> anyhow::Result<()> {
    let leases: Api<Lease> = Api::namespaced(shared.client.clone(), "kube-node-lease");
    let renew = json!({"spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": micro_now()}});
    match leases
        .patch(name, &PatchParams::default(), &Patch::Merge(&renew))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.is_not_found() => {
            let node: Node = Api::<Node>::all(shared.client.clone()).get(name).await?;
            let lease: Lease = serde_json::from_value(json!({
                "metadata": {
                    "name": name,
                    "namespace": "kube-node-lease",
                    "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": name,
                                         "uid": node.metadata.uid}],
                },
                "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": micro_now()}
            }))?;
            leases.create(&PostParams::default(), &lease).await?;
            Ok(())
        }
        Err(err) => Err(err.into()),
    }
}

/// Renews the Lease of every node that is not lost, and rewrites node status now and then.
pub async fn heartbeat(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(LEASE_RENEW);
    tick.tick().await;
    let mut n: u32 = 0;
    loop {
        tick.tick().await;
        n = n.wrapping_add(1);
        let lost = shared.lost.borrow().clone();
        for name in shared.nodes.iter().filter(|n| !lost.contains(*n)) {
            if let Err(err) = renew_lease(&shared, name).await {
                warn!(node = %name, error = %err, "lease renewal failed");
            }
            if n.is_multiple_of(STATUS_EVERY) {
                if let Err(err) = write_status(&shared, name).await {
                    warn!(node = %name, error = %err, "node status update failed");
                }
            }
        }
    }
}

/// Follows the `testbed.stoker.dev/lost` annotation on this kubelet's nodes.
pub async fn watch_faults(shared: Arc<Shared>) {
    let nodes: Api<Node> = Api::all(shared.client.clone());
    let config =
        watcher::Config::default().labels(&format!("{LABEL_KUBELET}={}", shared.kubelet_id));
    let mut stream = watcher::watcher(nodes, config).boxed();
    while let Some(event) = stream.next().await {
        let node = match event {
            Ok(watcher::Event::Apply(n) | watcher::Event::InitApply(n)) => n,
            Ok(_) => continue,
            Err(err) => {
                warn!(error = %err, "node watch failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let Some(name) = node.metadata.name.clone() else {
            continue;
        };
        let lost = node
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(LOST_ANNOTATION))
            .is_some_and(|v| v == "true");
        shared.lost.send_if_modified(|set: &mut BTreeSet<String>| {
            if lost && set.insert(name.clone()) {
                warn!(node = %name, "fault: node lost; its pods die and nothing is reported any more");
                true
            } else if !lost && set.remove(&name) {
                info!(node = %name, "node back; reporting again");
                true
            } else {
                false
            }
        });
    }
}
