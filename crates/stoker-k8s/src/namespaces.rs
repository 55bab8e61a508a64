//! Which namespaces stoker serves by their labels (`--allowed-namespace-selector`). The API
//! server matches the selector (a list of namespaces with the label selector and the
//! namespace's name as a field selector), so the selector's syntax and meaning are Kubernetes'
//! own and a namespace owner opts in by labelling the namespace.

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ListParams};
use kube::Client;

/// A label selector over namespaces, matched by the API server.
#[derive(Clone)]
pub struct NamespaceSelector {
    namespaces: Api<Namespace>,
    selector: String,
}

/// The selector could not be checked.
#[derive(Debug, thiserror::Error)]
pub enum NamespaceSelectorError {
    /// The API server refused the selector itself (syntax) or the list.
    #[error("cannot list namespaces with label selector {selector:?}: {source}")]
    List {
        /// The selector.
        selector: String,
        /// What the API server said.
        #[source]
        source: kube::Error,
    },
}

impl std::fmt::Debug for NamespaceSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NamespaceSelector")
            .field("selector", &self.selector)
            .finish()
    }
}

impl NamespaceSelector {
    /// A selector checked once with the API server: a selector it cannot parse, or a missing
    /// `list namespaces` permission, is an error here rather than at a driver's registration.
    pub async fn new(client: Client, selector: &str) -> Result<Self, NamespaceSelectorError> {
        let this = Self {
            namespaces: Api::all(client),
            selector: selector.to_owned(),
        };
        this.list(ListParams::default().labels(selector).limit(1))
            .await?;
        Ok(this)
    }

    /// The selector, as given.
    pub fn selector(&self) -> &str {
        &self.selector
    }

    /// Whether `namespace` exists and its labels match the selector.
    pub async fn selects(&self, namespace: &str) -> Result<bool, NamespaceSelectorError> {
        let params = ListParams::default()
            .labels(&self.selector)
            .fields(&format!("metadata.name={namespace}"));
        Ok(self.list(params).await? > 0)
    }

    async fn list(&self, params: ListParams) -> Result<usize, NamespaceSelectorError> {
        let listed = self
            .namespaces
            .list_metadata(&params)
            .await
            .map_err(|source| NamespaceSelectorError::List {
                selector: self.selector.clone(),
                source,
            })?;
        Ok(listed.items.len())
    }
}
