//! The two Istio CA APIs, translated onto [`crate::issuance::Issuance`].

use std::sync::Arc;

use istio_ca_proto::google::rpc::Status as RpcStatus;
use istio_ca_proto::{CsrRequest, CsrResponse, IstioCertificateRequest, IstioCertificateResponse};
use tonic::{Code, Status};

use crate::audit::{Api, Decision};
use crate::authn::CallerContext;
use crate::issuance::{Issuance, Refusal};

/// The request options (`metadata` keys) that carry a value, sorted; `None` when there
/// are none. We honour no option (`CertSigner`, `ImpersonatedIdentity`, ...), so any key
/// with a value is refused rather than silently issuing something other than what was
/// asked. A key whose value is empty or null is unset, as istiod reads it: Istio's own
/// client (1.12 and later) sends `{"CertSigner": ""}` on every request.
fn unsupported_metadata(metadata: Option<&prost_types::Struct>) -> Option<Vec<&str>> {
    use prost_types::value::Kind;
    let mut keys: Vec<&str> = metadata?
        .fields
        .iter()
        .filter(|(_, v)| match &v.kind {
            None | Some(Kind::NullValue(_)) => false,
            Some(Kind::StringValue(s)) => !s.is_empty(),
            Some(_) => true,
        })
        .map(|(k, _)| k.as_str())
        .collect();
    keys.sort_unstable();
    (!keys.is_empty()).then_some(keys)
}

/// Implements both gRPC services over one [`Issuance`].
#[derive(Clone)]
pub struct CaService {
    issuance: Arc<Issuance>,
}

impl CaService {
    /// Wraps the request path.
    pub fn new(issuance: Arc<Issuance>) -> Self {
        CaService { issuance }
    }

    /// Records, counts and answers a call refused before it reached either API (its
    /// message was too large or not a message, a malformed header). A caller whose
    /// credential holds is named in the record; repeats from callers without one are
    /// aggregated ([`crate::denials`]).
    pub async fn refuse(&self, api: Api, ctx: &CallerContext, refusal: Refusal) -> Status {
        let base = Decision {
            api: Some(api),
            peer: ctx.peer_addr.map(|a| a.to_string()),
            ..Default::default()
        };
        let Refusal {
            code,
            reason,
            message,
        } = refusal;
        // Who sent it, when the call carries a credential that holds: the record names
        // them, one record per call; anyone else's repeats are aggregated.
        match self.issuance.authn.authenticate(ctx).await {
            Ok(caller) => {
                let base = crate::issuance::caller_decision(base, &caller);
                self.issuance
                    .deny(base, code, reason, message.clone(), message)
                    .await
            }
            Err(_) => {
                self.issuance
                    .deny_unauthenticated(base, code, reason, message.clone(), message)
                    .await
            }
        }
    }

    /// `IstioCertificateService/CreateCertificate`.
    pub async fn create_certificate(
        &self,
        ctx: CallerContext,
        req: IstioCertificateRequest,
    ) -> Result<IstioCertificateResponse, Status> {
        let refusal = unsupported_metadata(req.metadata.as_ref()).map(|keys| Refusal {
            code: Code::InvalidArgument,
            reason: "unsupported_metadata",
            message: format!("unsupported request metadata: {}", keys.join(", ")),
        });
        let granted = self
            .issuance
            .handle_csr(
                Api::Modern,
                &ctx,
                req.csr.as_bytes(),
                req.validity_duration,
                refusal,
            )
            .await?;
        let mut cert_chain = vec![granted.issued.pem()];
        cert_chain.extend(granted.ca_chain_pem);
        Ok(IstioCertificateResponse { cert_chain })
    }

    /// `IstioCAService/HandleCSR`.
    pub async fn handle_csr(
        &self,
        mut ctx: CallerContext,
        req: CsrRequest,
    ) -> Result<CsrResponse, Status> {
        // Authenticate from the TLS peer or bearer metadata, like the original server;
        // an `onprem` `node_agent_credential` is informational. A `gcp` one is a GCE
        // identity token and is verified like a bearer token.
        if req.credential_type == "gcp" {
            ctx.legacy_gcp_token = Some(
                String::from_utf8_lossy(&req.node_agent_credential)
                    .trim()
                    .to_owned(),
            );
        }
        let ttl_secs = i64::from(req.requested_ttl_minutes.max(0)) * 60;
        let granted = self
            .issuance
            .handle_csr(Api::Legacy, &ctx, &req.csr_pem, ttl_secs, None)
            .await?;
        let cert_chain = if granted.signer_is_root {
            String::new()
        } else {
            granted.ca_chain_pem.concat()
        };
        Ok(CsrResponse {
            is_approved: true,
            status: Some(RpcStatus {
                code: 0,
                message: String::new(),
                details: vec![],
            }),
            signed_cert: granted.issued.pem().into_bytes(),
            cert_chain: cert_chain.into_bytes(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::unsupported_metadata;
    use prost_types::value::Kind;
    use prost_types::{Struct, Value};

    fn metadata(fields: &[(&str, Option<Kind>)]) -> Struct {
        Struct {
            fields: fields
                .iter()
                .map(|(k, v)| (k.to_string(), Value { kind: v.clone() }))
                .collect(),
        }
    }

    fn string(s: &str) -> Option<Kind> {
        Some(Kind::StringValue(s.into()))
    }

    #[test]
    fn empty_and_null_values_are_unset_any_other_value_is_refused() {
        assert_eq!(unsupported_metadata(None), None);
        assert_eq!(unsupported_metadata(Some(&metadata(&[]))), None);
        // What Istio's client sends on every request.
        assert_eq!(
            unsupported_metadata(Some(&metadata(&[("CertSigner", string(""))]))),
            None
        );
        let unset = metadata(&[
            ("CertSigner", Some(Kind::NullValue(0))),
            ("ImpersonatedIdentity", None),
        ]);
        assert_eq!(unsupported_metadata(Some(&unset)), None);
        let set = metadata(&[
            (
                "ImpersonatedIdentity",
                string("spiffe://cluster.local/ns/a/sa/b"),
            ),
            ("CertSigner", string("")),
            ("Other", Some(Kind::BoolValue(false))),
        ]);
        assert_eq!(
            unsupported_metadata(Some(&set)),
            Some(vec!["ImpersonatedIdentity", "Other"])
        );
        assert_eq!(
            unsupported_metadata(Some(&metadata(&[(
                "CertSigner",
                string("kubernetes.io/x")
            )]))),
            Some(vec!["CertSigner"])
        );
    }
}
