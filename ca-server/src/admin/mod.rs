//! Admin operations while the CA runs. Signing needs the CA key, which only the server
//! holds; revocations made here take effect on this replica at once (others follow
//! within a second). The server listens on a Unix socket, `<state-dir>/admin.sock`,
//! mode 0600 inside a 0700 directory: whoever can open it is as trusted as the CA's
//! own user. The peer's uid is recorded in the audit.
//!
//! Protocol: one JSON request line, one JSON response line, then the server closes.

mod socket;

use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::audit::{
    Api, AuditRecord, Checkpoint, Decision, ListFilter, Outcome, Revoke, VerifyReport,
};
use crate::authn::Caller;
use crate::issuance::Issuance;

pub use socket::{AdminClient, serve_socket};

/// A request on the admin socket.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum AdminRequest {
    /// Sign a CSR for a service account (export-bundle). The key stays with the admin.
    Sign {
        /// Namespace of the identity.
        namespace: String,
        /// Service account of the identity.
        service_account: String,
        /// Requested lifetime in seconds.
        ttl_secs: i64,
        /// The CSR, PEM.
        csr_pem: String,
    },
    /// Revoke a certificate this CA issued.
    Revoke {
        /// Serial, hex.
        serial: String,
        /// Why.
        reason: String,
    },
    /// Query the audit log.
    AuditList {
        /// Filters.
        filter: ListFilter,
    },
    /// Every record about one serial.
    AuditShow {
        /// Serial, hex.
        serial: String,
    },
    /// Verify every hash chain, and the checkpoints stored and given.
    AuditVerify {
        /// Published checkpoints to check the store against.
        #[serde(default)]
        checkpoints: Vec<Checkpoint>,
        /// The signing CA's certificate (PEM), to check checkpoint signatures.
        #[serde(default)]
        ca_cert_pem: Option<String>,
    },
    /// Sign the chains' current heads (the running CA only: it holds the key).
    AuditCheckpoint,
}

/// A response on the admin socket.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum AdminResponse {
    /// The signed chain and trust bundle.
    Signed {
        /// Leaf first, root last.
        cert_chain_pem: Vec<String>,
        /// Trust bundle.
        root_cert_pem: String,
        /// Serial of the leaf.
        serial: String,
        /// End of validity, RFC 3339.
        not_after: String,
        /// Identity in the leaf.
        spiffe_id: String,
    },
    /// The revocation record.
    Revoked {
        /// Its audit record.
        record: Box<AuditRecord>,
    },
    /// Matching records.
    Records {
        /// Oldest first.
        records: Vec<AuditRecord>,
    },
    /// Chain verification result.
    Verified {
        /// The report.
        report: VerifyReport,
    },
    /// A checkpoint the CA just signed and stored.
    Checkpointed {
        /// It.
        checkpoint: Checkpoint,
    },
    /// The request failed.
    Error {
        /// Why, for the admin.
        message: String,
    },
}

fn error(message: impl Into<String>) -> AdminResponse {
    AdminResponse::Error {
        message: message.into(),
    }
}

/// Checks a revocation request against the store (the serial is a certificate this CA
/// issued that has not expired, and is not revoked yet) and builds its decision;
/// shared by the admin socket and the command line. Returns what to revoke and the
/// decision to record.
pub async fn revocation_decision(
    store: &crate::audit::AuditStore,
    serial: &str,
    reason: &str,
    authenticator: &str,
    caller: String,
) -> Result<(Revoke, Decision), String> {
    let serial = ca_core::x509::parse_serial(serial)?;
    if reason.trim().is_empty() {
        return Err("a revocation needs a --reason".into());
    }
    let issued = store
        .certificate(&serial)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| {
            format!(
                "serial {serial} was not issued by this CA, or has expired (no unexpired certificate with it is in the audit store)"
            )
        })?;
    if let Some(r) = store.revocation(&serial).await.map_err(|e| e.to_string())? {
        return Err(match r.cause {
            Some(cause) => format!(
                "serial {serial} is already revoked: it was renewed from revoked certificate {cause}"
            ),
            None => format!("serial {serial} is already revoked ({})", r.reason),
        });
    }
    // The identity, for the record, when retention has kept the issuance's record.
    let spiffe_id = store
        .issued_record(&serial)
        .await
        .map_err(|e| e.to_string())?
        .and_then(|r| r.decision.spiffe_id);
    let decision = Decision {
        api: Some(Api::Admin),
        outcome: Some(Outcome::Revoked),
        spiffe_id,
        reason: Some("admin_revocation".into()),
        detail: Some(reason.to_owned()),
        authenticator: Some(authenticator.to_owned()),
        caller: Some(caller),
        serial: Some(serial.clone()),
        not_after: Some(crate::audit::rfc3339_secs(issued.not_after)),
        ..Default::default()
    };
    Ok((
        Revoke {
            serial,
            not_after: issued.not_after,
        },
        decision,
    ))
}

/// Runs the store-only requests (everything but signing) on `store`: for the running
/// server and for the command line alike.
pub async fn query(store: &crate::audit::AuditStore, req: &AdminRequest) -> Option<AdminResponse> {
    let result = match req {
        AdminRequest::AuditList { filter } => store
            .list(filter)
            .await
            .map(|records| AdminResponse::Records { records }),
        AdminRequest::AuditShow { serial } => match ca_core::x509::parse_serial(serial) {
            Ok(s) => store
                .show(&s)
                .await
                .map(|records| AdminResponse::Records { records }),
            Err(e) => return Some(error(e)),
        },
        AdminRequest::AuditVerify {
            checkpoints,
            ca_cert_pem,
        } => {
            let der = match ca_cert_pem
                .as_deref()
                .map(|p| ca_core::pem::parse_certificates(p.as_bytes()))
            {
                Some(Ok(mut certs)) if !certs.is_empty() => Some(certs.remove(0)),
                Some(_) => return Some(error("--ca-cert holds no certificate")),
                None => None,
            };
            crate::audit::checkpoint::verify_all(
                store,
                der.as_ref().map(|d| d.as_ref()),
                checkpoints,
            )
            .await
            .map(|report| AdminResponse::Verified { report })
        }
        AdminRequest::Sign { .. } | AdminRequest::Revoke { .. } | AdminRequest::AuditCheckpoint => {
            return None;
        }
    };
    Some(result.unwrap_or_else(|e| error(e.to_string())))
}

/// Executes admin requests against the running CA.
#[derive(Clone)]
pub struct AdminService {
    issuance: Arc<Issuance>,
}

impl AdminService {
    /// Over the CA's request path and audit store.
    pub fn new(issuance: Arc<Issuance>) -> Self {
        AdminService { issuance }
    }

    /// Handles one request from `admin` (e.g. `uid:1000`).
    pub async fn handle(&self, req: AdminRequest, admin: String) -> AdminResponse {
        let store = self.issuance.audit.store().clone();
        if let Some(answer) = query(&store, &req).await {
            return answer;
        }
        match req {
            AdminRequest::Sign {
                namespace,
                service_account,
                ttl_secs,
                csr_pem,
            } => {
                self.sign(namespace, service_account, ttl_secs, csr_pem, admin)
                    .await
            }
            AdminRequest::Revoke { serial, reason } => self.revoke(serial, reason, admin).await,
            AdminRequest::AuditCheckpoint => {
                match crate::audit::checkpoint::make(&store, &self.issuance.ca).await {
                    Ok(checkpoint) => AdminResponse::Checkpointed { checkpoint },
                    Err(e) => error(e.to_string()),
                }
            }
            _ => error("unexpected request"),
        }
    }

    async fn sign(
        &self,
        ns: String,
        sa: String,
        ttl_secs: i64,
        csr_pem: String,
        admin: String,
    ) -> AdminResponse {
        let identity = match self.issuance.export_identity(&ns, &sa) {
            Ok(id) => id,
            Err(e) => return error(e),
        };
        let base = Decision {
            api: Some(Api::Admin),
            authenticator: Some("admin-socket".into()),
            caller: Some(admin),
            requested_ttl_secs: ttl_secs,
            ..Default::default()
        };
        let caller = Caller {
            identity,
            authenticator: "admin-socket",
            principal: None,
            client_serial: None,
        };
        let policy = self.issuance.export_policy;
        match self
            .issuance
            .sign_for(
                base,
                &caller,
                csr_pem.as_bytes(),
                ttl_secs,
                &policy,
                Instant::now(),
            )
            .await
        {
            Ok(granted) => {
                let mut chain = vec![granted.issued.pem()];
                chain.extend(granted.ca_chain_pem);
                AdminResponse::Signed {
                    cert_chain_pem: chain,
                    root_cert_pem: self.issuance.ca.roots_pem().to_owned(),
                    serial: granted.issued.facts.serial.clone(),
                    not_after: crate::issuance::rfc3339(granted.issued.facts.not_after),
                    spiffe_id: caller.identity.to_string(),
                }
            }
            Err(status) => error(status.message()),
        }
    }

    async fn revoke(&self, serial: String, reason: String, admin: String) -> AdminResponse {
        let store = self.issuance.audit.store();
        let (revoke, decision) =
            match revocation_decision(store, &serial, &reason, "admin-socket", admin).await {
                Ok(d) => d,
                Err(e) => return error(e),
            };
        let serial = revoke.serial.clone();
        match self.issuance.audit.revoke(decision, revoke).await {
            Ok(record) => {
                tracing::info!(%serial, "revoked");
                AdminResponse::Revoked {
                    record: Box::new(record),
                }
            }
            Err(e) => error(e.to_string()),
        }
    }
}
