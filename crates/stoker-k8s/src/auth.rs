//! Who a driver is, asked of the API server: a bearer token checked with a `TokenReview` (the
//! audience stoker expects), and what that identity may do checked with a
//! `SubjectAccessReview`. stoker keeps no copy of the cluster's rules: the API server answers.
//!
//! Reviews are cached ([`TtlCache`]): a token's identity for [`IDENTITY_TTL`], a refusal for
//! [`REFUSAL_TTL`] (so a caller repeating a bad token does not become API-server load), keyed by
//! the token's SHA-256 (no token is kept), in at most [`CACHE_ENTRIES`] entries.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};
use sha2::{Digest, Sha256};
use stoker_core::DriverIdentity;
use tokio::time::Instant;

/// How long a reviewed token's identity is trusted without asking again. The kubelet rotates
/// projected tokens long before they expire; a revoked ServiceAccount is noticed within this.
pub const IDENTITY_TTL: Duration = Duration::from_secs(60);
/// How long a refused token stays refused without asking again.
pub const REFUSAL_TTL: Duration = Duration::from_secs(10);
/// Cached reviews at most (identities and refusals together).
pub const CACHE_ENTRIES: usize = 10_000;

/// Why a caller is not authenticated or a review could not be made.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// The API server says the token is not valid (expired, wrong audience, unknown or deleted
    /// ServiceAccount, bound pod gone).
    #[error("token refused by the Kubernetes API server: {0}")]
    Refused(String),
    /// The review itself failed (API server unreachable, stoker not allowed to review).
    #[error("cannot review the token with the Kubernetes API server: {0}")]
    Unavailable(String),
}

// === the cache (pure) ===

/// A map whose entries expire, bounded in size: when full, the oldest insertion goes first.
#[derive(Debug)]
pub struct TtlCache<K, V> {
    capacity: usize,
    entries: HashMap<K, (V, Instant)>,
    order: VecDeque<(K, Instant)>,
}

impl<K: Clone + Eq + Hash, V: Clone> TtlCache<K, V> {
    /// An empty cache of at most `capacity` entries.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            entries: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// The value, if present and not expired at `now`.
    pub fn get(&mut self, key: &K, now: Instant) -> Option<V> {
        match self.entries.get(key) {
            Some((value, expires)) if now < *expires => Some(value.clone()),
            Some(_) => {
                self.entries.remove(key);
                None
            }
            None => None,
        }
    }

    /// Stores `value` until `now + ttl`.
    pub fn insert(&mut self, key: K, value: V, ttl: Duration, now: Instant) {
        let expires = now + ttl;
        self.entries.insert(key.clone(), (value, expires));
        self.order.push_back((key, expires));
        while self.entries.len() > self.capacity || self.order.len() > 2 * self.capacity {
            let Some((old, stamp)) = self.order.pop_front() else {
                break;
            };
            // Only if that insertion is still the live one (the key may have been re-inserted).
            if self.entries.get(&old).is_some_and(|(_, e)| *e == stamp) {
                self.entries.remove(&old);
            }
        }
    }

    /// Entries held (some may have expired).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The identity a TokenReview's status names, if it authenticated the token for `audience`.
pub fn identity_of(review: &TokenReview, audience: &str) -> Result<DriverIdentity, AuthError> {
    let status = review.status.as_ref().ok_or_else(|| {
        AuthError::Unavailable("the TokenReview came back without a status".into())
    })?;
    if status.authenticated != Some(true) {
        let why = status
            .error
            .clone()
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| "not authenticated".into());
        return Err(AuthError::Refused(why));
    }
    // An API server that ignores audiences answers without them; one that checked returns the
    // audiences the token is valid for.
    let audiences = status.audiences.clone().unwrap_or_default();
    if !audiences.iter().any(|a| a == audience) {
        return Err(AuthError::Refused(format!(
            "the token is not meant for stoker (audience {audience:?}; it is for {audiences:?})"
        )));
    }
    let user = status
        .user
        .as_ref()
        .ok_or_else(|| AuthError::Refused("the review names no user".into()))?;
    let username = user.username.clone().unwrap_or_default();
    if username.is_empty() {
        return Err(AuthError::Refused("the review names no user".into()));
    }
    let extra = user.extra.clone().unwrap_or_default();
    let first = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
    Ok(DriverIdentity {
        username,
        uid: user.uid.clone().unwrap_or_default(),
        groups: user.groups.clone().unwrap_or_default(),
        pod_name: first("authentication.kubernetes.io/pod-name"),
        pod_uid: first("authentication.kubernetes.io/pod-uid"),
    })
}

// === the I/O shell ===

type Verdict = Result<DriverIdentity, AuthError>;
/// A SubjectAccessReview's question: user, uid, verb, group/resource, namespace.
type Access = (String, String, String, String, String);

/// Reviews tokens and permissions with the API server, with a cache.
pub struct Reviewer {
    client: kube::Client,
    audience: String,
    cache: Mutex<TtlCache<[u8; 32], Verdict>>,
    /// SubjectAccessReview answers by (user, uid, verb, resource, namespace).
    access: Mutex<TtlCache<Access, bool>>,
}

impl Reviewer {
    /// A reviewer that accepts tokens issued for `audience`.
    pub fn new(client: kube::Client, audience: String) -> Self {
        Self {
            client,
            audience,
            cache: Mutex::new(TtlCache::new(CACHE_ENTRIES)),
            access: Mutex::new(TtlCache::new(CACHE_ENTRIES)),
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, TtlCache<[u8; 32], Verdict>> {
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The identity of the bearer of `token`.
    pub async fn authenticate(&self, token: &str) -> Verdict {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(verdict) = self.cache().get(&key, Instant::now()) {
            return verdict;
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let answer = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|err| AuthError::Unavailable(err.to_string()))?;
        let verdict = identity_of(&answer, &self.audience);
        let ttl = match &verdict {
            Ok(_) => IDENTITY_TTL,
            Err(AuthError::Refused(_)) => REFUSAL_TTL,
            // Not cached: the next call asks again.
            Err(AuthError::Unavailable(_)) => return verdict,
        };
        self.cache()
            .insert(key, verdict.clone(), ttl, Instant::now());
        verdict
    }

    /// Whether `identity` may `verb` core-group `resource` in `namespace` (a
    /// SubjectAccessReview).
    pub async fn may(
        &self,
        identity: &DriverIdentity,
        verb: &str,
        resource: &str,
        namespace: &str,
    ) -> Result<bool, AuthError> {
        self.may_in_group(identity, "", verb, resource, Some(namespace))
            .await
    }

    /// Whether `identity` may `verb` `group`/`resource` in `namespace` (`None`: in all
    /// namespaces, or a cluster-scoped resource). RBAC needs no such resource to exist, so a
    /// virtual one (`applications.stoker.dev`) can be granted with a ClusterRole.
    pub async fn may_in_group(
        &self,
        identity: &DriverIdentity,
        group: &str,
        verb: &str,
        resource: &str,
        namespace: Option<&str>,
    ) -> Result<bool, AuthError> {
        let key = (
            identity.username.clone(),
            identity.uid.clone(),
            verb.to_owned(),
            format!("{group}/{resource}"),
            namespace.unwrap_or_default().to_owned(),
        );
        let cached = self
            .access
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&key, Instant::now());
        if let Some(allowed) = cached {
            return Ok(allowed);
        }
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(identity.username.clone()),
                uid: Some(identity.uid.clone()).filter(|u| !u.is_empty()),
                groups: Some(identity.groups.clone()),
                resource_attributes: Some(ResourceAttributes {
                    namespace: namespace.map(str::to_owned),
                    group: Some(group.to_owned()).filter(|g| !g.is_empty()),
                    verb: Some(verb.to_owned()),
                    resource: Some(resource.to_owned()),
                    ..ResourceAttributes::default()
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        };
        let api: Api<SubjectAccessReview> = Api::all(self.client.clone());
        let answer = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|err| AuthError::Unavailable(err.to_string()))?;
        let allowed = answer.status.is_some_and(|s| s.allowed);
        self.access
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key, allowed, IDENTITY_TTL, Instant::now());
        Ok(allowed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn review(status: serde_json::Value) -> TokenReview {
        serde_json::from_value(json!({"spec": {}, "status": status})).expect("review")
    }

    #[test]
    fn a_reviewed_service_account_token_is_its_identity() {
        let r = review(json!({
            "authenticated": true,
            "audiences": ["stoker"],
            "user": {"username": "system:serviceaccount:etl:spark", "uid": "u1",
                "groups": ["system:serviceaccounts", "system:serviceaccounts:etl", "system:authenticated"],
                "extra": {"authentication.kubernetes.io/pod-name": ["driver-0"],
                          "authentication.kubernetes.io/pod-uid": ["p1"]}}
        }));
        let id = identity_of(&r, "stoker").expect("identity");
        assert_eq!(id.service_account(), Some(("etl", "spark")));
        assert_eq!(id.pod_name.as_deref(), Some("driver-0"));
        assert_eq!(id.pod_uid.as_deref(), Some("p1"));
        assert_eq!(id.groups.len(), 3);
    }

    #[test]
    fn refused_tokens_and_other_audiences_are_refused_with_the_reason() {
        let refused = review(json!({"authenticated": false, "error": "token has expired"}));
        assert_eq!(
            identity_of(&refused, "stoker"),
            Err(AuthError::Refused("token has expired".into()))
        );
        let other = review(
            json!({"authenticated": true, "audiences": ["https://kubernetes.default.svc"],
            "user": {"username": "system:serviceaccount:etl:spark"}}),
        );
        assert!(
            matches!(identity_of(&other, "stoker"), Err(AuthError::Refused(m)) if m.contains("not meant for stoker"))
        );
        let no_status: TokenReview = TokenReview::default();
        assert!(matches!(
            identity_of(&no_status, "stoker"),
            Err(AuthError::Unavailable(_))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn cached_entries_expire_and_the_cache_stays_bounded() {
        let mut cache = TtlCache::new(3);
        let now = Instant::now();
        cache.insert(1, "a", Duration::from_secs(60), now);
        cache.insert(2, "b", Duration::from_secs(10), now);
        assert_eq!(cache.get(&1, now), Some("a"));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(cache.get(&2, Instant::now()), None, "expired");
        assert_eq!(cache.get(&1, Instant::now()), Some("a"));
        for k in 3..100 {
            cache.insert(k, "x", Duration::from_secs(60), Instant::now());
            assert!(cache.len() <= 3, "bounded: {}", cache.len());
        }
        assert_eq!(cache.get(&1, Instant::now()), None, "the oldest went first");
        assert_eq!(cache.get(&99, Instant::now()), Some("x"));
        // A key re-inserted is not evicted by its older stamp.
        let mut cache = TtlCache::new(2);
        cache.insert(1, "a", Duration::from_secs(60), Instant::now());
        cache.insert(1, "b", Duration::from_secs(60), Instant::now());
        cache.insert(2, "c", Duration::from_secs(60), Instant::now());
        assert_eq!(cache.get(&1, Instant::now()), Some("b"));
    }

    #[test]
    fn service_account_names_are_read_from_the_username() {
        let id = |u: &str| DriverIdentity {
            username: u.into(),
            ..DriverIdentity::default()
        };
        assert_eq!(
            id("system:serviceaccount:a:b").service_account(),
            Some(("a", "b"))
        );
        assert_eq!(id("alice").service_account(), None);
        assert_eq!(id("system:serviceaccount::b").service_account(), None);
    }
}
