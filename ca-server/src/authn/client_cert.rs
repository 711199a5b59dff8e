//! Client certificates issued by this CA: chain to a current root, signed by this CA's
//! own signing certificate (with a plugged-in CA, the operator's root also signs other
//! intermediates, whose certificates are not ours to renew), within validity, not
//! revoked; the identity is the certificate's SPIFFE URI SAN.
//!
//! The TLS layer accepts any client certificate whose key the peer proves it holds, so
//! that a bad certificate reaches this code and is refused *with an audit record*
//! instead of failing the handshake silently.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::{CertificateDer, UnixTime};
use time::OffsetDateTime;

use super::{AuthFailure, AuthResult, Authenticator, Caller, CallerContext};
use crate::audit::RevocationView;

const NAME: &str = "client-cert";
const CACHE_LIMIT: usize = 16_384;

#[derive(Clone)]
struct Verified {
    caller: Caller,
    serial: String,
    not_after: OffsetDateTime,
}

/// Authenticates by a client certificate this CA issued.
pub struct ClientCertAuthenticator {
    verifier: Arc<dyn ClientCertVerifier>,
    /// The same check with this CA's signing certificates as the only anchors: passes
    /// only for a leaf one of them signed. `None` when they are the roots themselves
    /// (a self-signed CA): `verifier` already says so, and one signature check is
    /// enough.
    issued_here: Option<Arc<dyn ClientCertVerifier>>,
    trust_domain: String,
    revoked: Arc<RevocationView>,
    /// Successful chain verifications by SHA-256 of the leaf. The chain check costs a
    /// signature verification; a node renewing over one connection should not pay it on
    /// every request. Expiry and revocation are still checked on every request.
    cache: Mutex<HashMap<[u8; 32], Verified>>,
}

fn fail(reason: &'static str, detail: impl Into<String>) -> AuthFailure {
    AuthFailure::unauthenticated(NAME, reason, detail)
}

impl ClientCertAuthenticator {
    /// Builds the authenticator for a trust bundle (DER roots) and the certificates
    /// whose leaves may renew (`issuers`, DER: the signing certificate, or every root
    /// when the CA signs with its self-signed roots).
    pub fn new(
        roots: &[Vec<u8>],
        issuers: &[Vec<u8>],
        trust_domain: &str,
        revoked: Arc<RevocationView>,
    ) -> Result<Self, String> {
        Ok(ClientCertAuthenticator {
            verifier: verifier(roots).map_err(|e| format!("trust bundle: {e}"))?,
            issued_here: if issuers == roots {
                None
            } else {
                Some(verifier(issuers).map_err(|e| format!("signing certificate: {e}"))?)
            },
            trust_domain: trust_domain.to_owned(),
            revoked,
            cache: Mutex::new(HashMap::new()),
        })
    }

    fn check(&self, chain: &[CertificateDer<'static>]) -> AuthResult {
        let Some(leaf) = chain.first() else {
            return Ok(None);
        };
        let now = OffsetDateTime::now_utc();
        let key: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, leaf)
            .as_ref()
            .try_into()
            .unwrap_or([0; 32]);
        let cached = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned();
        let verified = match cached {
            Some(v) if v.not_after > now => v,
            _ => {
                let v = self.verify_chain(leaf, &chain[1..])?;
                let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                if cache.len() >= CACHE_LIMIT {
                    cache.clear();
                }
                cache.insert(key, v.clone());
                v
            }
        };
        let revoked = self
            .revoked
            .is_revoked(&verified.serial)
            .map_err(|stale| AuthFailure {
                code: tonic::Code::Unavailable,
                ..fail(
                    "revocations_stale",
                    format!(
                        "cannot renew {}: {stale}; refusing rather than trusting a stale list",
                        verified.serial
                    ),
                )
            })?;
        if revoked {
            return Err(fail(
                "cert_revoked",
                format!(
                    "client certificate {} for {} is revoked",
                    verified.serial, verified.caller.identity
                ),
            ));
        }
        Ok(Some(verified.caller))
    }

    fn verify_chain(
        &self,
        leaf: &CertificateDer<'static>,
        intermediates: &[CertificateDer<'static>],
    ) -> Result<Verified, AuthFailure> {
        use rustls::{CertificateError, Error};
        let facts = ca_core::x509::inspect(leaf).map_err(|e| fail("cert_invalid", e))?;
        self.verifier
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .map_err(|e| match e {
                Error::InvalidCertificate(
                    CertificateError::Expired | CertificateError::ExpiredContext { .. },
                ) => fail(
                    "cert_expired",
                    format!(
                        "client certificate {} expired at {}",
                        facts.serial, facts.not_after
                    ),
                ),
                Error::InvalidCertificate(
                    CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
                ) => fail(
                    "cert_not_yet_valid",
                    format!("client certificate {} is not valid yet", facts.serial),
                ),
                Error::InvalidCertificate(
                    CertificateError::UnknownIssuer | CertificateError::BadSignature,
                ) => fail(
                    "cert_unknown_issuer",
                    format!(
                        "client certificate {} does not chain to a current root",
                        facts.serial
                    ),
                ),
                other => fail(
                    "cert_invalid",
                    format!("client certificate {}: {other}", facts.serial),
                ),
            })?;
        // Under the root, but signed by someone else (a sibling intermediate of a
        // plugged-in CA): not a certificate this CA issued, so not one it can revoke.
        if let Some(issued_here) = &self.issued_here
            && issued_here
                .verify_client_cert(leaf, &[], UnixTime::now())
                .is_err()
        {
            return Err(fail(
                "cert_foreign_issuer",
                format!(
                    "client certificate {} was not issued by this CA's signing certificate",
                    facts.serial
                ),
            ));
        }
        let identity = facts.spiffe_id().ok_or_else(|| {
            fail(
                "cert_no_spiffe_id",
                "client certificate has no single SPIFFE URI SAN",
            )
        })?;
        if identity.trust_domain() != self.trust_domain {
            return Err(fail(
                "foreign_trust_domain",
                format!(
                    "client certificate identity {identity} is outside trust domain {}",
                    self.trust_domain
                ),
            ));
        }
        Ok(Verified {
            caller: Caller {
                identity,
                authenticator: NAME,
                principal: None,
                client_serial: Some(facts.serial.clone()),
            },
            serial: facts.serial,
            not_after: facts.not_after,
        })
    }
}

/// A client-certificate verifier (ring) anchored at `anchors` (DER).
fn verifier(anchors: &[Vec<u8>]) -> Result<Arc<dyn ClientCertVerifier>, String> {
    let mut store = RootCertStore::empty();
    for a in anchors {
        store
            .add(CertificateDer::from(a.clone()))
            .map_err(|e| e.to_string())?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider)
        .build()
        .map_err(|e| e.to_string())
}

impl Authenticator for ClientCertAuthenticator {
    fn name(&self) -> &'static str {
        NAME
    }

    fn authenticate<'a>(
        &'a self,
        ctx: &'a CallerContext,
    ) -> Pin<Box<dyn Future<Output = AuthResult> + Send + 'a>> {
        Box::pin(async move {
            match &ctx.peer_certs {
                Some(chain) => self.check(chain),
                None => Ok(None),
            }
        })
    }
}
