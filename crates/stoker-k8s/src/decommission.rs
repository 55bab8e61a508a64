//! Spark's `spark.kubernetes.executor.decommissionLabel[Value]`: when the driver decommissions
//! executors, their pods get that label (Spark's `labelDecommissioningExecs`), so that whatever
//! watches pods (a cost-aware autoscaler, a dashboard) sees which executors are on their way
//! out. Written as the driver (`--auth kubernetes`; with `--authz subject-access-review`, after
//! asking whether the driver may patch pods) after the leader-election write gate, like every
//! other write.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams};
use kube::Api;
use stoker_core::{AppId, ExecutorId, ExecutorTemplate};
use tracing::{debug, warn};

use crate::pod;
use crate::KubernetesBackend;

/// Spark's key: the label put on decommissioning executors' pods.
pub const LABEL_KEY: &str = "spark.kubernetes.executor.decommissionLabel";
/// Spark's key: that label's value (Spark's default: empty).
pub const VALUE_KEY: &str = "spark.kubernetes.executor.decommissionLabelValue";

/// The label to put on decommissioning pods, if the driver set one.
pub fn label(other: &BTreeMap<String, String>) -> Option<(String, String)> {
    let key = other.get(LABEL_KEY)?.trim();
    if key.is_empty() {
        return None;
    }
    let value = other.get(VALUE_KEY).map(|v| v.trim()).unwrap_or_default();
    Some((key.to_string(), value.to_string()))
}

/// The merge patch that sets `label` on a pod.
pub fn patch((key, value): &(String, String)) -> serde_json::Value {
    serde_json::json!({ "metadata": { "labels": { key: value } } })
}

impl KubernetesBackend {
    /// Labels the pods of `executors` as Spark does, when the application set the label.
    pub(crate) fn label_decommissioning(
        &self,
        app_id: &AppId,
        template: &Arc<ExecutorTemplate>,
        executors: &[ExecutorId],
    ) {
        let Some(label) = label(&template.kubernetes.other) else {
            return;
        };
        let namespace = pod::namespace_of(template, &self.inner.config.defaults);
        let names: Vec<(ExecutorId, String)> = executors
            .iter()
            .map(|&id| (id, pod::pod_name(app_id, id)))
            .collect();
        let as_user = template.identity.as_ref().map(|i| i.username.clone());
        let this = self.clone();
        let app_id = app_id.clone();
        let identity = template.identity.clone();
        tokio::spawn(async move {
            // Never more than the driver may do: under --authz subject-access-review stoker
            // patches with its own rights, so it asks first.
            if let Err(why) = this
                .may(identity.as_ref(), "patch", "pods", &namespace)
                .await
            {
                warn!(app = %app_id, error = %why, "decommissioning pods not labelled");
                return;
            }
            let client = match this.writer_client(as_user.as_deref()) {
                Ok(client) => client,
                Err(err) => {
                    warn!(app = %app_id, error = %err, "cannot label decommissioning pods");
                    return;
                }
            };
            let api: Api<Pod> = Api::namespaced(client, &namespace);
            let body = patch(&label);
            for (executor, name) in names {
                this.inner.limiter.acquire().await;
                if !this.inner.config.gate.is_open() {
                    return;
                }
                match api
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&body))
                    .await
                {
                    Ok(_) => {
                        debug!(app = %app_id, executor = %executor, pod = %name, label = %label.0, "decommissioning pod labelled")
                    }
                    // Gone already: nothing to label.
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(err) => {
                        warn!(app = %app_id, executor = %executor, pod = %name, error = %err, "cannot label a decommissioning pod")
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn other(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_label_is_sparks_key_and_value_and_only_when_set() {
        assert_eq!(label(&other(&[])), None);
        assert_eq!(label(&other(&[(VALUE_KEY, "yes")])), None, "a value alone");
        assert_eq!(label(&other(&[(LABEL_KEY, " ")])), None);
        assert_eq!(
            label(&other(&[(LABEL_KEY, "draining")])),
            Some(("draining".into(), String::new())),
            "Spark's default value is empty"
        );
        let l = label(&other(&[(LABEL_KEY, "draining"), (VALUE_KEY, "yes")]));
        assert_eq!(l, Some(("draining".into(), "yes".into())));
        assert_eq!(
            l.map(|l| patch(&l)),
            Some(serde_json::json!({"metadata": {"labels": {"draining": "yes"}}}))
        );
    }
}
