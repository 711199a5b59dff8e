//! Google's signing keys, cached. Refreshed when the cache expires (honouring
//! `Cache-Control: max-age`) or when a token names an unknown `kid` — at most once per
//! `min_refetch` — and kept in use while the endpoint is down.
//!
//! No lock is held across the fetch: one caller fetches at a time, a caller whose key
//! is cached never waits for it (with a stale set it uses the cached key while one
//! refresh runs), and only callers that need the new set wait for that one fetch.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use std::sync::RwLock;

use serde::Deserialize;

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
    state: RwLock<State>,
    /// Held by the one caller fetching.
    fetching: tokio::sync::Mutex<()>,
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
            state: RwLock::new(State::default()),
            fetching: tokio::sync::Mutex::new(()),
        }
    }

    /// The key for `kid`, refreshing the set when it is stale or does not know `kid`.
    pub async fn key(&self, kid: &str) -> Option<RsaKey> {
        let (cached, stale) = self.lookup(kid);
        if let Some(key) = cached {
            if !stale {
                return Some(key);
            }
            // Stale but known: refresh if nobody is; meanwhile the cached key serves.
            let Ok(_fetching) = self.fetching.try_lock() else {
                return Some(key);
            };
            self.refresh_if_allowed().await;
            // The new set (a withdrawn key is gone), or the old one if the fetch failed.
            return self.lookup(kid).0;
        }
        // Unknown: wait for the one fetch, which another caller may be making.
        let _fetching = self.fetching.lock().await;
        if let (Some(key), _) = self.lookup(kid) {
            return Some(key);
        }
        self.refresh_if_allowed().await;
        self.lookup(kid).0
    }

    /// The cached key for `kid`, and whether the set is stale.
    fn lookup(&self, kid: &str) -> (Option<RsaKey>, bool) {
        let st = self.state.read().unwrap_or_else(|p| p.into_inner());
        let stale = st.fresh_until.is_none_or(|t| Instant::now() >= t);
        (st.keys.get(kid).cloned(), stale)
    }

    /// Fetches the set unless the last fetch was under `min_refetch` ago. Called with
    /// `fetching` held; the state lock is taken only around reads and the update.
    async fn refresh_if_allowed(&self) {
        let now = Instant::now();
        {
            let mut st = self.state.write().unwrap_or_else(|p| p.into_inner());
            if st
                .last_fetch
                .is_some_and(|t| now.duration_since(t) < self.min_refetch)
            {
                return;
            }
            st.last_fetch = Some(now);
        }
        metrics::counter!("ca_gce_jwks_fetches_total").increment(1);
        let fetched = self.fetch().await;
        let mut st = self.state.write().unwrap_or_else(|p| p.into_inner());
        match fetched {
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

    async fn fetch(&self) -> Result<(HashMap<String, RsaKey>, Duration), String> {
        let resp = self.client.get(&self.url, &[]).await?;
        if resp.status != 200 {
            return Err(format!("HTTP {}", resp.status));
        }
        let keys = parse(&resp.body)?;
        let max_age = resp
            .max_age
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_MAX_AGE)
            .min(MAX_MAX_AGE);
        Ok((keys, max_age))
    }
}

/// The RS256 keys of a JWK set, by `kid`; other key types are skipped.
pub fn parse(body: &[u8]) -> Result<HashMap<String, RsaKey>, String> {
    let set: JwkSet = serde_json::from_slice(body).map_err(|e| format!("not a JWK set: {e}"))?;
    let mut keys = HashMap::new();
    for k in set.keys {
        if k.kty != "RSA" || k.alg.as_deref().is_some_and(|a| a != "RS256") {
            continue;
        }
        if let (Some(n), Some(e)) = (k.n, k.e) {
            keys.insert(k.kid, RsaKey::from_jwk(&n, &e)?);
        }
    }
    Ok(keys)
}
