//! The Compute API cross-check: the instance the token names exists, is RUNNING, and
//! has the id and creation time the token claims. Lookups are cached for a bounded time.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::Mutex;

type Slot = Arc<Mutex<Option<(Instant, Lookup)>>>;

use crate::httpclient::HttpClient;

const SCOPE: &str = "https://www.googleapis.com/auth/compute.readonly";

/// The fields of a Compute `Instance` resource we use.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Instance {
    /// Numeric id, as a string.
    pub id: String,
    /// PROVISIONING, STAGING, RUNNING, STOPPING, STOPPED, TERMINATED...
    pub status: String,
    /// RFC 3339 creation time.
    pub creation_timestamp: String,
    /// Instance labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl Instance {
    /// Creation time in unix seconds.
    pub fn created_unix(&self) -> Option<i64> {
        OffsetDateTime::parse(&self.creation_timestamp, &Rfc3339)
            .ok()
            .map(|t| t.unix_timestamp())
    }
}

/// What a lookup found.
#[derive(Clone, Debug)]
pub enum Lookup {
    /// The instance.
    Found(Instance),
    /// HTTP 404.
    NotFound,
}

/// Looks instances up, with a cache.
pub struct ComputeClient {
    base_url: String,
    tokens: Arc<dyn gcp_auth::TokenProvider>,
    http: HttpClient,
    cache_ttl: Duration,
    /// One slot per instance; the slot's lock makes concurrent requests for the same
    /// instance wait for one lookup instead of each asking the API.
    cache: std::sync::Mutex<HashMap<(String, String, String), Slot>>,
}

impl ComputeClient {
    /// For `base_url` (e.g. `https://compute.googleapis.com/compute/v1`).
    pub fn new(
        base_url: String,
        tokens: Arc<dyn gcp_auth::TokenProvider>,
        http: HttpClient,
        cache_ttl: Duration,
    ) -> Self {
        ComputeClient {
            base_url: base_url.trim_end_matches('/').to_owned(),
            tokens,
            http,
            cache_ttl,
            cache: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The instance `project/zone/name`, from the cache when fresh.
    pub async fn instance(&self, project: &str, zone: &str, name: &str) -> Result<Lookup, String> {
        let key = (project.to_owned(), zone.to_owned(), name.to_owned());
        let slot: Slot = {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if cache.len() > 100_000 {
                cache.clear();
            }
            cache.entry(key).or_default().clone()
        };
        let mut entry = slot.lock().await;
        if let Some((at, found)) = entry.as_ref()
            && at.elapsed() < self.cache_ttl
        {
            return Ok(found.clone());
        }
        metrics::counter!("ca_gce_compute_lookups_total").increment(1);
        let token = self
            .tokens
            .token(&[SCOPE])
            .await
            .map_err(|e| format!("access token for the Compute API: {e}"))?;
        let url = format!(
            "{}/projects/{project}/zones/{zone}/instances/{name}",
            self.base_url
        );
        let auth = format!("Bearer {}", token.as_str());
        let resp = self
            .http
            .get(&url, &[("authorization", auth.as_str())])
            .await?;
        let found = match resp.status {
            200 => Lookup::Found(
                serde_json::from_slice(&resp.body)
                    .map_err(|e| format!("{url}: not an Instance: {e}"))?,
            ),
            404 => Lookup::NotFound,
            other => return Err(format!("{url}: HTTP {other}")),
        };
        *entry = Some((Instant::now(), found.clone()));
        Ok(found)
    }
}
