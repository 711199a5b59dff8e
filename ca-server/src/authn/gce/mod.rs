//! GCE instance identity tokens (docs/COMPATIBILITY.md): signature against Google's keys,
//! issuer, audience, token age, a required project allow-list, optional zone and
//! instance-age limits, an optional Compute API cross-check, then the mapping from the
//! instance to a mesh identity. Standard-format tokens (no instance claims; what the
//! old node agents send) name only a Google service account, and get an identity only
//! from an explicit per-service-account grant.

mod compute;
pub mod config;
pub mod jwks;
pub mod jwt;
pub mod mapping;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ca_core::SpiffeId;
use time::OffsetDateTime;
use tonic::Code;

pub use config::GceConfig;

use self::compute::{ComputeClient, Lookup};
use self::jwks::JwksCache;
use self::mapping::InstanceFacts;
use super::{AuthFailure, AuthResult, Authenticator, Caller, CallerContext};
use crate::httpclient::HttpClient;

const NAME: &str = "gce-token";
const GOOGLE_ISSUER: &str = "https://accounts.google.com";
/// Google's tokens: `exp` is at most one hour after `iat`.
const MAX_LIFETIME: i64 = 3600;

/// The authenticator.
pub struct GceAuthenticator {
    cfg: GceConfig,
    trust_domain: String,
    jwks: JwksCache,
    compute: Option<ComputeClient>,
}

fn unauth(reason: &'static str, detail: impl Into<String>) -> AuthFailure {
    AuthFailure::unauthenticated(NAME, reason, detail)
}

impl GceAuthenticator {
    /// Builds the authenticator; loads Compute API credentials when the cross-check is on.
    pub async fn new(cfg: GceConfig, trust_domain: &str) -> Result<Self, String> {
        let http = HttpClient::new(Duration::from_secs(5))?;
        let compute = match &cfg.compute {
            None => None,
            Some(c) => {
                let tokens: Arc<dyn gcp_auth::TokenProvider> = if c.credentials == "metadata" {
                    Arc::new(gcp_auth::MetadataServiceAccount::new().await.map_err(|e| {
                        format!("Compute API credentials from the metadata server: {e}")
                    })?)
                } else {
                    Arc::new(
                        gcp_auth::CustomServiceAccount::from_file(&c.credentials).map_err(|e| {
                            format!("Compute API credentials {}: {e}", c.credentials)
                        })?,
                    )
                };
                Some(ComputeClient::new(
                    c.base_url.clone(),
                    tokens,
                    http.clone(),
                    c.cache_ttl,
                ))
            }
        };
        let jwks = JwksCache::new(cfg.jwks_url.clone(), http, cfg.jwks_min_refetch_interval);
        Ok(GceAuthenticator {
            cfg,
            trust_domain: trust_domain.to_owned(),
            jwks,
            compute,
        })
    }

    /// Whether a bearer token is for this authenticator: Google-issued, or anything that
    /// is not a Kubernetes service-account token (those go to the Kubernetes
    /// authenticator). A forged issuer is thus refused here, with a reason.
    fn claims_bearer(token: &str) -> bool {
        match jwt::unverified_issuer(token) {
            Some(_) => !super::kubernetes::is_kubernetes_token(token),
            None => true,
        }
    }

    async fn check(&self, token: &str) -> AuthResult {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let parsed = jwt::parse(token).map_err(|e| unauth("gce_token_malformed", e))?;
        if parsed.header.alg != "RS256" {
            return Err(unauth(
                "gce_bad_algorithm",
                format!(
                    "token algorithm {:?}; only RS256 is accepted",
                    parsed.header.alg
                ),
            ));
        }
        let kid = parsed
            .header
            .kid
            .as_deref()
            .ok_or_else(|| unauth("gce_token_malformed", "token header has no kid"))?;
        let key = self.jwks.key(kid).await.ok_or_else(|| {
            unauth(
                "gce_unknown_key",
                format!("no Google signing key with kid {kid:?}"),
            )
        })?;
        if !parsed.verify_signature(&key) {
            return Err(unauth(
                "gce_bad_signature",
                "token signature does not verify",
            ));
        }
        let c = &parsed.claims;
        if c.iss != GOOGLE_ISSUER {
            return Err(unauth("gce_wrong_issuer", format!("issuer {:?}", c.iss)));
        }
        // A standard-format token (no instance claims) answers to its own audience when
        // such tokens are granted at all.
        let standard = c.compute_engine().is_none() && !self.cfg.service_account_tokens.is_empty();
        let audience = if standard {
            &self.cfg.legacy_audience
        } else {
            &self.cfg.audience
        };
        if c.aud != *audience {
            return Err(unauth(
                "gce_wrong_audience",
                format!("audience {:?}, expected {audience:?}", c.aud),
            ));
        }
        let leeway = self.cfg.leeway.as_secs() as i64;
        if now > c.exp + leeway {
            return Err(unauth(
                "gce_token_expired",
                format!("token expired at {}", c.exp),
            ));
        }
        if c.iat > now + leeway {
            return Err(unauth(
                "gce_token_from_future",
                format!("token issued at {}, {}s in the future", c.iat, c.iat - now),
            ));
        }
        if now - c.iat > self.cfg.max_token_age.as_secs() as i64 + leeway {
            return Err(unauth(
                "gce_token_too_old",
                format!("token issued {}s ago", now - c.iat),
            ));
        }
        if c.exp - c.iat > MAX_LIFETIME {
            return Err(unauth(
                "gce_token_malformed",
                format!("token lifetime {}s exceeds one hour", c.exp - c.iat),
            ));
        }
        let Some(ce) = c.compute_engine() else {
            return self.service_account_token(c);
        };
        let principal = format!(
            "gce:{}/{}/{} (id {})",
            ce.project_id, ce.zone, ce.instance_name, ce.instance_id
        );
        let deny = |code: Code, reason: &'static str, detail: String| AuthFailure {
            authenticator: NAME,
            reason,
            detail,
            code,
            principal: Some(principal.clone()),
        };
        if !self
            .cfg
            .allowed_projects
            .iter()
            .any(|p| p == &ce.project_id)
        {
            return Err(deny(
                Code::PermissionDenied,
                "gce_project_not_allowed",
                format!("project {} is not allowed", ce.project_id),
            ));
        }
        if !self.cfg.allowed_zones.is_empty()
            && !self.cfg.allowed_zones.iter().any(|z| z == &ce.zone)
        {
            return Err(deny(
                Code::PermissionDenied,
                "gce_zone_not_allowed",
                format!("zone {} is not allowed", ce.zone),
            ));
        }
        if let Some(max) = self.cfg.max_instance_age
            && now - ce.instance_creation_timestamp > max.as_secs() as i64
        {
            return Err(deny(
                Code::PermissionDenied,
                "gce_instance_too_old",
                format!(
                    "instance created at {}, more than {} ago",
                    ce.instance_creation_timestamp,
                    humantime::format_duration(max)
                ),
            ));
        }
        let instance = match &self.compute {
            None => None,
            Some(api) => match api
                .instance(&ce.project_id, &ce.zone, &ce.instance_name)
                .await
            {
                Err(e) => return Err(deny(Code::Unavailable, "gce_compute_unavailable", e)),
                Ok(Lookup::NotFound) => {
                    return Err(deny(
                        Code::PermissionDenied,
                        "gce_instance_not_found",
                        "the Compute API does not know the instance".into(),
                    ));
                }
                Ok(Lookup::Found(i)) => {
                    if i.status != "RUNNING" {
                        return Err(deny(
                            Code::PermissionDenied,
                            "gce_instance_not_running",
                            format!("instance status is {}", i.status),
                        ));
                    }
                    if i.id != ce.instance_id
                        || i.created_unix() != Some(ce.instance_creation_timestamp)
                    {
                        return Err(deny(
                            Code::PermissionDenied,
                            "gce_instance_mismatch",
                            format!(
                                "the Compute API has id {} created {} for this name; the token says id {} created {}",
                                i.id,
                                i.creation_timestamp,
                                ce.instance_id,
                                ce.instance_creation_timestamp
                            ),
                        ));
                    }
                    Some(i)
                }
            },
        };
        let facts = InstanceFacts {
            project: &ce.project_id,
            zone: &ce.zone,
            instance_name: &ce.instance_name,
            service_account_email: c.email.as_deref(),
            labels: instance.as_ref().map(|i| &i.labels),
        };
        let rule = mapping::first_match(&self.cfg.mappings, &facts).ok_or_else(|| {
            deny(
                Code::PermissionDenied,
                "gce_no_mapping_rule",
                "no mapping rule matches this instance".into(),
            )
        })?;
        let identity = SpiffeId::for_service_account(
            &self.trust_domain,
            &rule.namespace,
            &rule.service_account,
        )
        .map_err(|e| deny(Code::Internal, "gce_mapping_invalid", e.to_string()))?;
        Ok(Some(Caller {
            identity,
            authenticator: NAME,
            principal: Some(principal),
            client_serial: None,
        }))
    }
}

impl GceAuthenticator {
    /// A standard-format token, as the old node agents send: the Google service
    /// account's unique id (`sub`) is all it proves, so only an explicit
    /// `[[service_account_token]]` grant for that id gives an identity.
    fn service_account_token(&self, c: &jwt::Claims) -> AuthResult {
        if self.cfg.service_account_tokens.is_empty() {
            return Err(unauth(
                "gce_not_an_instance",
                "the token has no google.compute_engine claims (not from a VM, or not format=full; the standard-format tokens of old node agents need a [[service_account_token]] grant)",
            ));
        }
        let sub = c.sub.as_deref().unwrap_or_default();
        let principal = format!("gce-service-account:{sub}");
        let grant = self
            .cfg
            .service_account_tokens
            .iter()
            .find(|t| t.unique_id == sub)
            .ok_or_else(|| AuthFailure {
                authenticator: NAME,
                reason: "gce_no_mapping_rule",
                detail: "no service_account_token grant for this service account".into(),
                code: Code::PermissionDenied,
                principal: Some(principal.clone()),
            })?;
        let identity = SpiffeId::for_service_account(
            &self.trust_domain,
            &grant.namespace,
            &grant.service_account,
        )
        .map_err(|e| AuthFailure {
            authenticator: NAME,
            reason: "gce_mapping_invalid",
            detail: e.to_string(),
            code: Code::Internal,
            principal: Some(principal.clone()),
        })?;
        Ok(Some(Caller {
            identity,
            authenticator: NAME,
            principal: Some(principal),
            client_serial: None,
        }))
    }
}

impl Authenticator for GceAuthenticator {
    fn name(&self) -> &'static str {
        NAME
    }

    fn authenticate<'a>(
        &'a self,
        ctx: &'a CallerContext,
    ) -> Pin<Box<dyn Future<Output = AuthResult> + Send + 'a>> {
        Box::pin(async move {
            let token = match (&ctx.legacy_gcp_token, &ctx.bearer_token) {
                (Some(t), _) => t,
                (None, Some(t)) if Self::claims_bearer(t) => t,
                _ => return Ok(None),
            };
            self.check(token).await
        })
    }
}
