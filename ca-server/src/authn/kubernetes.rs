//! Kubernetes service-account tokens, checked with a TokenReview
//! (`authentication.k8s.io/v1`). Only `authenticated: true` reviews for a user
//! `system:serviceaccount:<ns>:<sa>` in group `system:serviceaccounts` are accepted.
//! The review must also name one of the audiences asked for in `status.audiences`: an
//! empty list means the token is valid for the API server itself, not for the CA.
//!
//! Positive reviews are cached by the SHA-256 of the token until the token's own
//! expiry or five minutes, whichever is first; negative ones for a few seconds, so a
//! renewal burst does not become an API-server burst. The cache is an LRU of a fixed
//! size, and reviews of tokens not in it are rate-limited: a caller sending a new
//! bogus token on every request costs the API server at most the configured rate.

use std::future::Future;
use std::num::NonZeroUsize;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ca_core::SpiffeId;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};

use super::{AuthFailure, AuthResult, Authenticator, Caller, CallerContext};

const NAME: &str = "kubernetes-token";
const POSITIVE_TTL: Duration = Duration::from_secs(300);
const NEGATIVE_TTL: Duration = Duration::from_secs(5);

/// Bounds on what unseen tokens cost.
#[derive(Clone, Debug)]
pub struct ReviewLimits {
    /// Reviews cached at most (least recently used out first).
    pub cache_entries: usize,
    /// TokenReviews a second for tokens not in the cache.
    pub rate: f64,
    /// How many may be sent at once before the rate applies.
    pub burst: u32,
}

#[derive(Clone)]
enum Cached {
    Ok(Caller),
    Refused(AuthFailure),
}

/// The TokenReview authenticator.
pub struct KubernetesTokenAuthenticator {
    reviews: Api<TokenReview>,
    audiences: Vec<String>,
    trust_domain: String,
    /// Review every bearer token (no other token authenticator is configured), or only
    /// those that look like Kubernetes tokens.
    all_bearer_tokens: bool,
    cache: Mutex<lru::LruCache<[u8; 32], (Instant, Cached)>>,
    reviews_allowed: crate::ratelimit::TokenBucket,
}

fn unauth(reason: &'static str, detail: impl Into<String>) -> AuthFailure {
    AuthFailure::unauthenticated(NAME, reason, detail)
}

/// Whether a bearer token looks like a Kubernetes service-account token (its issuer or
/// its claims say so). The GCE authenticator takes the others.
pub fn is_kubernetes_token(token: &str) -> bool {
    let Some(v) = super::unverified_claims(token) else {
        return false;
    };
    v.get("kubernetes.io").is_some()
        || v.get("iss").and_then(|i| i.as_str()) == Some("kubernetes/serviceaccount")
}

/// The token's `exp`, read without verification (only to bound the cache).
fn token_expiry(token: &str) -> Option<i64> {
    super::unverified_claims(token)?.get("exp")?.as_i64()
}

impl KubernetesTokenAuthenticator {
    /// Reviews tokens through `client`, requiring one of `audiences`.
    pub fn new(
        client: kube::Client,
        audiences: Vec<String>,
        trust_domain: &str,
        all_bearer_tokens: bool,
        limits: &ReviewLimits,
    ) -> Self {
        let entries = NonZeroUsize::new(limits.cache_entries).unwrap_or(NonZeroUsize::MIN);
        KubernetesTokenAuthenticator {
            reviews: Api::all(client),
            audiences,
            trust_domain: trust_domain.to_owned(),
            all_bearer_tokens,
            cache: Mutex::new(lru::LruCache::new(entries)),
            reviews_allowed: crate::ratelimit::TokenBucket::new(limits.rate, limits.burst),
        }
    }

    async fn review(&self, token: &str) -> Result<Caller, AuthFailure> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(self.audiences.clone()),
            },
            ..Default::default()
        };
        metrics::counter!("ca_kubernetes_token_reviews_total").increment(1);
        let answer = self
            .reviews
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| AuthFailure {
                code: tonic::Code::Unavailable,
                ..unauth("kubernetes_unavailable", format!("TokenReview failed: {e}"))
            })?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status.error.unwrap_or_else(|| "not authenticated".into());
            return Err(unauth("token_rejected", format!("TokenReview: {why}")));
        }
        let granted = status.audiences.unwrap_or_default();
        if !granted.iter().any(|a| self.audiences.contains(a)) {
            return Err(unauth(
                "token_audience_mismatch",
                format!(
                    "TokenReview authenticated the token for audiences {granted:?}, none of {:?}",
                    self.audiences
                ),
            ));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let groups = user.groups.unwrap_or_default();
        if !groups.iter().any(|g| g == "system:serviceaccounts") {
            return Err(unauth(
                "not_a_service_account",
                format!("user {username:?} is not in group system:serviceaccounts"),
            ));
        }
        let Some((ns, sa)) = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|r| r.split_once(':'))
        else {
            return Err(unauth(
                "not_a_service_account",
                format!("user {username:?} is not a service account"),
            ));
        };
        let identity = SpiffeId::for_service_account(&self.trust_domain, ns, sa)
            .map_err(|e| unauth("not_a_service_account", e.to_string()))?;
        Ok(Caller {
            identity,
            authenticator: NAME,
            principal: None,
            client_serial: None,
        })
    }

    async fn check(&self, token: &str) -> AuthResult {
        let key: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
            .as_ref()
            .try_into()
            .unwrap_or([0; 32]);
        if let Some((until, cached)) = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned()
            && Instant::now() < until
        {
            return match cached {
                Cached::Ok(c) => Ok(Some(c)),
                Cached::Refused(f) => Err(f),
            };
        }
        if !self.reviews_allowed.try_take(Instant::now()) {
            metrics::counter!("ca_kubernetes_token_reviews_throttled_total").increment(1);
            return Err(AuthFailure {
                code: tonic::Code::Unavailable,
                ..unauth(
                    "token_reviews_throttled",
                    "too many TokenReviews for tokens not seen before; try again",
                )
            });
        }
        let result = self.review(token).await;
        let until = match &result {
            Ok(_) => {
                let left = token_expiry(token)
                    .map(|exp| {
                        Duration::from_secs(
                            (exp - time::OffsetDateTime::now_utc().unix_timestamp()).max(0) as u64,
                        )
                    })
                    .unwrap_or(POSITIVE_TTL);
                Instant::now() + left.min(POSITIVE_TTL)
            }
            // Not the caller's fault and not cached: the next request asks again.
            Err(f) if f.code == tonic::Code::Unavailable => return result.map(Some),
            Err(_) => Instant::now() + NEGATIVE_TTL,
        };
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).put(
            key,
            (
                until,
                match &result {
                    Ok(c) => Cached::Ok(c.clone()),
                    Err(f) => Cached::Refused(f.clone()),
                },
            ),
        );
        result.map(Some)
    }
}

impl Authenticator for KubernetesTokenAuthenticator {
    fn name(&self) -> &'static str {
        NAME
    }

    fn authenticate<'a>(
        &'a self,
        ctx: &'a CallerContext,
    ) -> Pin<Box<dyn Future<Output = AuthResult> + Send + 'a>> {
        Box::pin(async move {
            match &ctx.bearer_token {
                Some(t) if self.all_bearer_tokens || is_kubernetes_token(t) => self.check(t).await,
                _ => Ok(None),
            }
        })
    }
}
