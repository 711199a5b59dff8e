//! Authentication: who is calling. A chain of authenticators; each looks for its own
//! kind of credential. Kubernetes and GCE token authenticators plug into the same chain.

mod client_cert;

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
}

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The identity the caller proved.
    pub identity: SpiffeId,
    /// Which authenticator proved it (`client-cert`, `kubernetes-token`, ...).
    pub authenticator: &'static str,
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
        Err(first_failure.unwrap_or(AuthFailure {
            authenticator: "none",
            reason: "no_credential",
            detail: if ctx.bearer_token.is_some() {
                "a bearer token was presented but no token authenticator is configured".into()
            } else {
                "no client certificate or bearer token".into()
            },
        }))
    }
}
