//! Google's signing keys, cached. Refreshed when the cache expires (honouring
//! `Cache-Control: max-age`) or when a token names an unknown `kid` — at most once per
//! `min_refetch` — and kept in use while the endpoint is down.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::sync::Mutex;

use super::jwt::RsaKey;
use crate::httpclient::HttpClient;

#[derive(Deserialize)]
struct Jwk {
    kid: String,
    kty: String,
    #[serde(default)]
    alg: Option<String>,
    n: Option<String>,
    e: Option<String>,
}

#[derive(Deserialize)]
struct JwkSet {
    keys: Vec<Jwk>,
}

#[derive(Default)]
struct State {
    keys: HashMap<String, RsaKey>,
    fresh_until: Option<Instant>,
    last_fetch: Option<Instant>,
}

/// The JWKS cache.
pub struct JwksCache {
    url: String,
    client: HttpClient,
    min_refetch: Duration,
    state: Mutex<State>,
}

const DEFAULT_MAX_AGE: Duration = Duration::from_secs(3600);
const MAX_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

impl JwksCache {
    /// For the JWKS at `url`.
    pub fn new(url: String, client: HttpClient, min_refetch: Duration) -> Self {
        JwksCache {
            url,
            client,
            min_refetch,
            state: Mutex::new(State::default()),
        }
    }

    /// The key for `kid`, refreshing the set when it is stale or does not know `kid`.
    pub async fn key(&self, kid: &str) -> Option<RsaKey> {
        let mut st = self.state.lock().await;
        let now = Instant::now();
        let stale = st.fresh_until.is_none_or(|t| now >= t);
        let known = st.keys.contains_key(kid);
        let may_fetch = st
            .last_fetch
            .is_none_or(|t| now.duration_since(t) >= self.min_refetch);
        if (stale || !known) && may_fetch {
            st.last_fetch = Some(now);
            metrics::counter!("ca_gce_jwks_fetches_total").increment(1);
            match self.fetch().await {
                Ok((keys, max_age)) => {
                    st.keys = keys;
                    st.fresh_until = Some(now + max_age);
                }
                // Keep the cached keys: tokens signed with them stay verifiable.
                Err(e) => {
                    tracing::warn!(url = %self.url, error = %e, cached_keys = st.keys.len(), "JWKS refresh failed")
                }
            }
        }
        st.keys.get(kid).cloned()
    }

    async fn fetch(&self) -> Result<(HashMap<String, RsaKey>, Duration), String> {
        let resp = self.client.get(&self.url, &[]).await?;
        if resp.status != 200 {
            return Err(format!("HTTP {}", resp.status));
        }
        let set: JwkSet =
            serde_json::from_slice(&resp.body).map_err(|e| format!("not a JWK set: {e}"))?;
        let mut keys = HashMap::new();
        for k in set.keys {
            if k.kty != "RSA" || k.alg.as_deref().is_some_and(|a| a != "RS256") {
                continue;
            }
            if let (Some(n), Some(e)) = (k.n, k.e) {
                keys.insert(k.kid, RsaKey::from_jwk(&n, &e)?);
            }
        }
        let max_age = resp
            .max_age
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_MAX_AGE)
            .min(MAX_MAX_AGE);
        Ok((keys, max_age))
    }
}
