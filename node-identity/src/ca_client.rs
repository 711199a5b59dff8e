//! One call to the CA: fresh key, CSR, `CreateCertificate` over mutual TLS.

use std::time::Duration;

use ca_core::keys::KeyAlgorithm;
use istio_ca_proto::IstioCertificateRequest;
use istio_ca_proto::istio_certificate_service_client::IstioCertificateServiceClient;
use rcgen::{KeyPair, PublicKeyData};
use tonic::Code;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::credential::{Credential, Proof};

/// Where and how to reach the CA.
#[derive(Clone, Debug)]
pub struct CaEndpoint {
    /// `HOST:PORT`.
    pub address: String,
    /// Name the CA's serving certificate must carry.
    pub server_name: String,
    /// Connect and request deadline.
    pub timeout: Duration,
}

/// How a call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The CA refused this credential (`UNAUTHENTICATED` / `PERMISSION_DENIED`):
    /// retrying with it will not help.
    #[error("the CA refused the {source_name} credential: {message}")]
    Refused {
        /// Which credential.
        source_name: &'static str,
        /// The CA's message.
        message: String,
    },
    /// Anything that may work later: unreachable CA, TLS failure, `UNAVAILABLE`...
    #[error("{0}")]
    Transient(String),
    /// A local failure (key generation).
    #[error("{0}")]
    Local(String),
}

/// The new key and the CA's raw answer.
pub struct Answer {
    /// The freshly generated key. Never logged.
    pub key: KeyPair,
    /// `cert_chain` of the response.
    pub chain: Vec<String>,
}

/// Generates a key, sends a CSR with `credential`, returns the answer unverified.
pub async fn request_certificate(
    ca: &CaEndpoint,
    credential: &Credential,
    key_type: KeyAlgorithm,
    ttl: Duration,
) -> Result<Answer, CallError> {
    let key = key_type
        .generate()
        .map_err(|e| CallError::Local(format!("key generation: {e}")))?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .map_err(|e| CallError::Local(format!("CSR: {e}")))?;
    let roots = ca_core::pem::parse_certificates(credential.roots_pem.as_bytes()).map_err(|e| {
        CallError::Local(format!(
            "trust bundle of the {} credential: {e}",
            credential.source
        ))
    })?;
    let mut tls = ClientTlsConfig::new()
        .ca_certificates(
            roots
                .iter()
                .map(|r| Certificate::from_pem(ca_core::pem::certificate(r))),
        )
        .domain_name(ca.server_name.clone());
    let mut bearer = None;
    match &credential.proof {
        Proof::ClientCert { chain_pem, key_pem } => {
            tls = tls.identity(Identity::from_pem(chain_pem, key_pem))
        }
        Proof::Bearer { token } => bearer = Some(token),
    }
    let endpoint = Endpoint::from_shared(format!("https://{}", ca.address))
        .map_err(|e| CallError::Local(format!("--ca-address {}: {e}", ca.address)))?
        .tls_config(tls)
        .map_err(|e| CallError::Local(format!("TLS configuration: {e}")))?
        .connect_timeout(ca.timeout)
        .timeout(ca.timeout);
    let channel = endpoint.connect().await.map_err(|e| {
        CallError::Transient(format!(
            "cannot reach the CA at {}: {}",
            ca.address,
            source_chain(&e)
        ))
    })?;
    let mut request = tonic::Request::new(IstioCertificateRequest {
        csr: csr.pem().map_err(|e| CallError::Local(e.to_string()))?,
        validity_duration: ttl.as_secs() as i64,
        metadata: None,
    });
    if let Some(token) = bearer {
        let value = format!("Bearer {token}").parse().map_err(|_| {
            CallError::Local("the identity token is not a valid header value".into())
        })?;
        request.metadata_mut().insert("authorization", value);
    }
    match IstioCertificateServiceClient::new(channel)
        .create_certificate(request)
        .await
    {
        Ok(resp) => Ok(Answer {
            key,
            chain: resp.into_inner().cert_chain,
        }),
        Err(s) if matches!(s.code(), Code::Unauthenticated | Code::PermissionDenied) => {
            Err(CallError::Refused {
                source_name: credential.source,
                message: s.message().to_owned(),
            })
        }
        Err(s) => Err(CallError::Transient(format!(
            "the CA answered {:?}: {}",
            s.code(),
            s.message()
        ))),
    }
}

impl Answer {
    /// DER SubjectPublicKeyInfo of the new key.
    pub fn spki_der(&self) -> Vec<u8> {
        self.key.subject_public_key_info()
    }
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}
