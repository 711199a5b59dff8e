//! The GCE authentication file (`--gce-config`), TOML. Example in
//! `deploy/kubernetes/components/gce/gce-auth.toml`.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::mapping::{Rule, ServiceAccountToken};

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(serde::de::Error::custom)
}

fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

fn default_jwks() -> String {
    "https://www.googleapis.com/oauth2/v3/certs".into()
}
fn default_audience() -> String {
    "istio-ca".into()
}
fn default_legacy_audience() -> String {
    "grpc://istio-citadel:8060".into()
}
fn default_leeway() -> Duration {
    Duration::from_secs(60)
}
fn default_token_age() -> Duration {
    Duration::from_secs(3600)
}
fn default_refetch() -> Duration {
    Duration::from_secs(30)
}
fn default_compute() -> String {
    "https://compute.googleapis.com/compute/v1".into()
}
fn default_cache() -> Duration {
    Duration::from_secs(60)
}

/// The Compute API cross-check.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComputeCheck {
    /// API base URL.
    #[serde(default = "default_compute")]
    pub base_url: String,
    /// `metadata` (the CA runs on GCE/GKE) or the path of a service-account key JSON.
    pub credentials: String,
    /// How long a lookup is reused.
    #[serde(default = "default_cache", deserialize_with = "duration")]
    pub cache_ttl: Duration,
}

/// Everything the GCE authenticator is told.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GceConfig {
    /// The `aud` tokens must carry (what the agent asks the metadata server for).
    #[serde(default = "default_audience")]
    pub audience: String,
    /// Projects whose instances may authenticate. Required and non-empty.
    pub allowed_projects: Vec<String>,
    /// Zones instances may be in (empty: any).
    #[serde(default)]
    pub allowed_zones: Vec<String>,
    /// Refuse instances created longer ago than this.
    #[serde(default, deserialize_with = "opt_duration")]
    pub max_instance_age: Option<Duration>,
    /// Refuse tokens issued longer ago than this.
    #[serde(default = "default_token_age", deserialize_with = "duration")]
    pub max_token_age: Duration,
    /// Clock skew tolerated on `iat` and `exp`.
    #[serde(default = "default_leeway", deserialize_with = "duration")]
    pub leeway: Duration,
    /// Google's signing keys.
    #[serde(default = "default_jwks")]
    pub jwks_url: String,
    /// At most one JWKS refetch per this interval for unknown key ids.
    #[serde(default = "default_refetch", deserialize_with = "duration")]
    pub jwks_min_refetch_interval: Duration,
    /// Optional Compute API cross-check.
    #[serde(default)]
    pub compute: Option<ComputeCheck>,
    /// Instance → identity rules, first match wins.
    #[serde(default, rename = "mapping")]
    pub mappings: Vec<Rule>,
    /// The `aud` of standard-format tokens (the old node agents ask for this fixed
    /// audience, whatever the CA's address).
    #[serde(default = "default_legacy_audience")]
    pub legacy_audience: String,
    /// Google service accounts whose standard-format tokens are accepted, and the
    /// identity each gets. Empty: such tokens are refused (`gce_not_an_instance`).
    #[serde(default, rename = "service_account_token")]
    pub service_account_tokens: Vec<ServiceAccountToken>,
}

impl GceConfig {
    /// Reads and validates the file; errors are one line for the operator.
    pub fn load(path: &Path, trust_domain: &str) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let cfg: GceConfig = toml::from_str(&text).map_err(|e| {
            let line = e
                .span()
                .map(|sp| text[..sp.start.min(text.len())].matches('\n').count() + 1);
            let at = line.map(|l| format!(" (line {l})")).unwrap_or_default();
            format!("{}: {}{at}", path.display(), e.message().trim())
        })?;
        if cfg.allowed_projects.is_empty() {
            return Err(format!(
                "{}: allowed_projects must list at least one project",
                path.display()
            ));
        }
        if cfg.mappings.is_empty() && cfg.service_account_tokens.is_empty() {
            return Err(format!(
                "{}: no [[mapping]] or [[service_account_token]] rule: no instance could obtain an identity",
                path.display()
            ));
        }
        for (i, t) in cfg.service_account_tokens.iter().enumerate() {
            if t.unique_id.is_empty() || !t.unique_id.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!(
                    "{}: service_account_token {}: unique_id {:?} is not a service account's numeric unique id",
                    path.display(),
                    i + 1,
                    t.unique_id
                ));
            }
            ca_core::SpiffeId::for_service_account(trust_domain, &t.namespace, &t.service_account)
                .map_err(|e| format!("{}: service_account_token {}: {e}", path.display(), i + 1))?;
        }
        for (i, r) in cfg.mappings.iter().enumerate() {
            ca_core::SpiffeId::for_service_account(trust_domain, &r.namespace, &r.service_account)
                .map_err(|e| format!("{}: mapping {}: {e}", path.display(), i + 1))?;
            if !r.labels.is_empty() && cfg.compute.is_none() {
                return Err(format!(
                    "{}: mapping {} matches on labels, which come from the Compute API: add a [compute] section",
                    path.display(),
                    i + 1
                ));
            }
        }
        Ok(cfg)
    }
}
