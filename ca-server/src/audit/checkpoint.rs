//! Signed checkpoints: the CA's signature over every chain's head at one moment.
//!
//! The hash chains catch an edit, a deletion or a truncation, but not someone with
//! write access to the database who rewrites a chain consistently from some record on,
//! head included. A checkpoint the CA signed before the rewrite catches that: the
//! rewritten chain no longer holds the checkpointed hash at the checkpointed position.
//! Checkpoints are stored (every `--audit-checkpoint-interval`, and on `audit
//! checkpoint`), and can be copied out and kept where the database's writers cannot
//! reach; `audit verify --checkpoint FILE --ca-cert FILE` checks one offline against
//! the CA certificate and then against the store.
//!
//! Retention deletes a chain's oldest records and moves the chain's anchor (the
//! position and hash verification starts from) past them. Someone with write access
//! could do the same to records retention would have kept; so the CA signs every
//! anchor it moves ([`anchor_statement`]), and verification refuses an anchor past the
//! chain's start that does not carry the CA's signature.

use serde::{Deserialize, Serialize};

use super::store::{AuditError, AuditStore};

/// One chain's head in a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointHead {
    /// The chain's name.
    pub chain: String,
    /// Its last sequence number then (0: empty).
    pub seq: u64,
    /// That record's hash, hex.
    pub hash: String,
}

/// What a checkpoint states.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointBody {
    /// When it was made, RFC 3339.
    pub time: String,
    /// Every chain's head, by name.
    pub chains: Vec<CheckpointHead>,
}

/// A checkpoint as stored and as handed out: the body exactly as signed, and the
/// CA's signature over it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The body, JSON, byte for byte as signed.
    pub body: String,
    /// The signature, hex.
    pub signature: String,
}

impl Checkpoint {
    /// The body, parsed.
    pub fn statement(&self) -> Result<CheckpointBody, String> {
        serde_json::from_str(&self.body).map_err(|e| format!("checkpoint body: {e}"))
    }

    /// Checks the signature against the signing CA's certificate (DER).
    pub fn verify_signature(&self, ca_cert_der: &[u8]) -> Result<(), String> {
        let signature = super::record::decode_hex(&self.signature)
            .ok_or_else(|| "checkpoint signature is not hex".to_string())?;
        ca_core::statement::verify_statement(ca_cert_der, self.body.as_bytes(), &signature)
            .map_err(|e| e.to_string())
    }
}

/// The statement the CA signs when retention moves `chain`'s anchor to `seq`, the
/// record before it having hashed to `hash`. JSON, so that no two anchors share a
/// text, and with no field of a [`CheckpointBody`], so that neither can pass for the
/// other.
pub fn anchor_statement(chain: &str, seq: u64, hash: &[u8]) -> Vec<u8> {
    serde_json::json!({
        "audit_anchor": { "chain": chain, "seq": seq, "hash": ca_core::x509::hex(hash) }
    })
    .to_string()
    .into_bytes()
}

/// Signs the current heads with `ca`, stores the checkpoint and returns it.
pub async fn make(
    store: &AuditStore,
    ca: &ca_core::CertificateAuthority,
) -> Result<Checkpoint, AuditError> {
    let body = CheckpointBody {
        time: super::record::rfc3339_us(super::store::now_us()),
        chains: store.heads().await?,
    };
    let body = serde_json::to_string(&body).map_err(|e| AuditError::Corrupt(e.to_string()))?;
    let signature = ca
        .sign_statement(body.as_bytes())
        .map_err(|e| AuditError::Corrupt(e.to_string()))?;
    let checkpoint = Checkpoint {
        body,
        signature: ca_core::x509::hex(&signature),
    };
    store.save_checkpoint(&checkpoint).await?;
    Ok(checkpoint)
}

/// Checks `checkpoint` against the store (and, given the CA certificate, its
/// signature); the problems found, each naming the checkpoint's time.
pub async fn check(
    store: &AuditStore,
    checkpoint: &Checkpoint,
    ca_cert_der: Option<&[u8]>,
) -> Result<Vec<String>, AuditError> {
    let body = match checkpoint.statement() {
        Ok(b) => b,
        Err(e) => return Ok(vec![e]),
    };
    let mut problems = Vec::new();
    if let Some(der) = ca_cert_der
        && let Err(e) = checkpoint.verify_signature(der)
    {
        problems.push(format!("checkpoint of {}: {e}", body.time));
        return Ok(problems);
    }
    for head in &body.chains {
        if let Some(p) = store.check_head(head).await? {
            problems.push(format!(
                "checkpoint of {}: chain {}: {p}",
                body.time, head.chain
            ));
        }
    }
    Ok(problems)
}

/// [`AuditStore::verify`], then every stored checkpoint and every one in `published`
/// checked against the store. Signatures (of checkpoints and of anchors) are checked
/// when the signing CA's certificate is given; one that does not verify is a problem.
pub async fn verify_all(
    store: &AuditStore,
    ca_cert_der: Option<&[u8]>,
    published: &[Checkpoint],
) -> Result<super::VerifyReport, AuditError> {
    let mut report = store.verify(ca_cert_der).await?;
    let stored = store.checkpoints().await?;
    for c in stored.iter().chain(published) {
        report.problems.extend(check(store, c, ca_cert_der).await?);
        report.checkpoints += 1;
    }
    Ok(report)
}
