//! Authentication: who is calling. A chain of authenticators; each looks for its own
//! kind of credential. Kubernetes and GCE token authenticators plug into the same chain.

mod client_cert;
pub mod gce;
pub mod kubernetes;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use ca_core::SpiffeId;
use rustls_pki_types::CertificateDer;

pub use client_cert::ClientCertAuthenticator;

/// What the transport tells us about the caller.
#[derive(Clone, Debug, Default)]
pub struct CallerContext {
    /// The TCP peer.
    pub peer_addr: Option<SocketAddr>,
    /// The TLS client certificate chain, leaf first, if one was presented. The TLS
    /// handshake proved possession of the leaf's key; nothing else is checked yet.
    pub peer_certs: Option<Arc<Vec<CertificateDer<'static>>>>,
    /// The bearer token from `authorization: Bearer ...`, if any.
    pub bearer_token: Option<String>,
    /// A GCE identity token sent in the legacy API's `node_agent_credential` with
    /// `credential_type = "gcp"`.
    pub legacy_gcp_token: Option<String>,
}

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The identity the caller proved.
    pub identity: SpiffeId,
    /// Which authenticator proved it (`client-cert`, `gce-token`, ...).
    pub authenticator: &'static str,
    /// What was authenticated, when it is more than the identity (e.g. the GCE
    /// instance); recorded in the audit log.
    pub principal: Option<String>,
    /// Serial of the client certificate that proved the identity, when one did: a
    /// certificate issued to this caller is renewed from it.
    pub client_serial: Option<String>,
}

/// A credential was presented and is not acceptable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthFailure {
    /// Which authenticator refused.
    pub authenticator: &'static str,
    /// Stable reason code (audit, metrics).
    pub reason: &'static str,
    /// Operator-facing detail; safe to log, not sent to the caller.
    pub detail: String,
    /// The gRPC code for the caller: `UNAUTHENTICATED` for a bad credential,
    /// `PERMISSION_DENIED` for a good credential that may not have a certificate,
    /// `UNAVAILABLE` when a dependency (e.g. the Compute API) could not be asked.
    pub code: tonic::Code,
    /// Who presented the credential, when known (audited as the caller).
    pub principal: Option<String>,
}

impl AuthFailure {
    /// A credential that does not prove anything.
    pub fn unauthenticated(
        authenticator: &'static str,
        reason: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        AuthFailure {
            authenticator,
            reason,
            detail: detail.into(),
            code: tonic::Code::Unauthenticated,
            principal: None,
        }
    }
}

/// Result of one authenticator: `Ok(None)` when its kind of credential is absent.
pub type AuthResult = Result<Option<Caller>, AuthFailure>;

/// One way of proving identity.
pub trait Authenticator: Send + Sync {
    /// Name used in audit records.
    fn name(&self) -> &'static str;
    /// Examines the context.
    fn authenticate<'a>(
        &'a self,
        ctx: &'a CallerContext,
    ) -> Pin<Box<dyn Future<Output = AuthResult> + Send + 'a>>;
}

/// A JWT's claims, decoded without checking anything: to route a token to its
/// authenticator or bound a cache entry, never to trust what it says.
pub fn unverified_claims(token: &str) -> Option<serde_json::Value> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The ordered chain. The first authenticator that accepts wins; when none does, the
/// first failure explains why (a bad certificate says more than "no credential").
#[derive(Clone, Default)]
pub struct AuthChain {
    authenticators: Vec<Arc<dyn Authenticator>>,
}

impl AuthChain {
    /// Adds an authenticator at the end of the chain.
    pub fn with(mut self, a: Arc<dyn Authenticator>) -> Self {
        self.authenticators.push(a);
        self
    }

    /// Authenticates the caller.
    pub async fn authenticate(&self, ctx: &CallerContext) -> Result<Caller, AuthFailure> {
        let mut first_failure = None;
        for a in &self.authenticators {
            match a.authenticate(ctx).await {
                Ok(Some(caller)) => return Ok(caller),
                Ok(None) => {}
                Err(f) => {
                    first_failure.get_or_insert(f);
                }
            }
        }
        Err(first_failure.unwrap_or_else(|| {
            AuthFailure::unauthenticated(
                "none",
                "no_credential",
                if ctx.bearer_token.is_some() || ctx.legacy_gcp_token.is_some() {
                    "a token was presented but no token authenticator is configured"
                } else {
                    "no client certificate or bearer token"
                },
            )
        }))
    }
}
