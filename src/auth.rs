//! Who the caller is. `--auth none` (the local backend, loopback only): nobody is asked, the
//! per-application token is the only credential. `--auth kubernetes`: every call carries a
//! bearer token (gRPC metadata `authorization: Bearer <token>`, a projected ServiceAccount token
//! with audience `stoker` by default) that the API server reviews; the application is bound to
//! that identity and the Kubernetes backend acts as it.
//!
//! The per-application token stays as a second factor: two drivers of one ServiceAccount (two
//! jobs of one team) must not reach into each other's application, and the token is what tells
//! them apart.

use std::sync::Arc;

use stoker_core::DriverIdentity;
use stoker_k8s::auth::{AuthError, Reviewer};
use tonic::metadata::MetadataMap;

use crate::error::ApiError;

/// Identifies callers and asks what an identity may do.
#[tonic::async_trait]
pub trait Authenticator: Send + Sync {
    /// The caller's identity from its bearer token; `None` when authentication is off.
    async fn identify(&self, bearer: Option<&str>) -> Result<Option<DriverIdentity>, ApiError>;
    /// Whether `identity` may create pods in `namespace`.
    async fn may_create_pods(
        &self,
        identity: &DriverIdentity,
        namespace: &str,
    ) -> Result<bool, ApiError>;
    /// Whether `identity` may inspect applications (`verb` `get` or `list` on the virtual
    /// resource `applications.stoker.dev`) in `namespace` (`None`: all), without their tokens:
    /// platform teams grant it with the ClusterRole `stoker-viewer`.
    async fn may_inspect(
        &self,
        identity: &DriverIdentity,
        verb: &str,
        namespace: Option<&str>,
    ) -> Result<bool, ApiError>;
}

/// `--auth none`: no identity; bearer tokens are ignored.
pub struct NoAuth;

#[tonic::async_trait]
impl Authenticator for NoAuth {
    async fn identify(&self, _bearer: Option<&str>) -> Result<Option<DriverIdentity>, ApiError> {
        Ok(None)
    }

    async fn may_create_pods(&self, _: &DriverIdentity, _: &str) -> Result<bool, ApiError> {
        Ok(true)
    }

    async fn may_inspect(
        &self,
        _: &DriverIdentity,
        _: &str,
        _: Option<&str>,
    ) -> Result<bool, ApiError> {
        Ok(false)
    }
}

/// `--auth kubernetes`: TokenReview and SubjectAccessReview with the API server.
pub struct KubernetesAuth {
    reviewer: Arc<Reviewer>,
}

impl KubernetesAuth {
    /// Authenticates with `reviewer` (shared with the backend's subject-access-review writes, so
    /// both use one cache).
    pub fn new(reviewer: Arc<Reviewer>) -> Arc<Self> {
        Arc::new(Self { reviewer })
    }
}

fn api_error(err: AuthError) -> ApiError {
    match err {
        AuthError::Refused(_) => ApiError::NotAuthenticated(err.to_string()),
        AuthError::Unavailable(_) => ApiError::Unavailable(err.to_string()),
    }
}

#[tonic::async_trait]
impl Authenticator for KubernetesAuth {
    async fn identify(&self, bearer: Option<&str>) -> Result<Option<DriverIdentity>, ApiError> {
        let Some(token) = bearer else {
            return Err(ApiError::NotAuthenticated(
                "authorization: missing; this stoker needs the driver's Kubernetes token \
                 (a projected ServiceAccount token with audience stoker, see \
                 spark.stoker.auth.tokenFile)"
                    .into(),
            ));
        };
        self.reviewer
            .authenticate(token)
            .await
            .map(Some)
            .map_err(api_error)
    }

    async fn may_create_pods(
        &self,
        identity: &DriverIdentity,
        namespace: &str,
    ) -> Result<bool, ApiError> {
        self.reviewer
            .may(identity, "create", "pods", namespace)
            .await
            .map_err(api_error)
    }

    async fn may_inspect(
        &self,
        identity: &DriverIdentity,
        verb: &str,
        namespace: Option<&str>,
    ) -> Result<bool, ApiError> {
        self.reviewer
            .may_in_group(identity, "stoker.dev", verb, "applications", namespace)
            .await
            .map_err(api_error)
    }
}

/// The bearer token of a call (`authorization: Bearer <token>`), if it carries one.
pub fn bearer(metadata: &MetadataMap) -> Result<Option<String>, ApiError> {
    let Some(value) = metadata.get("authorization") else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| ApiError::NotAuthenticated("authorization: not valid ASCII".into()))?;
    let (scheme, token) = text.split_once(' ').ok_or_else(|| {
        ApiError::NotAuthenticated("authorization: expected `Bearer <token>`".into())
    })?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(ApiError::NotAuthenticated(
            "authorization: expected `Bearer <token>`".into(),
        ));
    }
    Ok(Some(token.trim().to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(value: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("authorization", value.parse().expect("ascii"));
        m
    }

    #[test]
    fn bearer_tokens_are_read_and_malformed_ones_refused() {
        assert_eq!(bearer(&MetadataMap::new()).ok(), Some(None));
        assert_eq!(
            bearer(&metadata("Bearer abc.def")).ok(),
            Some(Some("abc.def".to_owned()))
        );
        assert_eq!(
            bearer(&metadata("bearer xyz")).ok(),
            Some(Some("xyz".to_owned()))
        );
        for bad in ["Basic dXNlcg==", "Bearer", "Bearer  ", "token"] {
            assert!(
                matches!(bearer(&metadata(bad)), Err(ApiError::NotAuthenticated(_))),
                "{bad}"
            );
        }
    }
}
