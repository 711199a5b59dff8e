//! The request path of every certificate: authenticate → policy → sign → audit →
//! answer. Both gRPC APIs and the admin socket go through here, so each decision is
//! made, and recorded, one way.

use std::sync::Arc;
use std::time::Instant;

use ca_core::{CertificateAuthority, IssuancePolicy, IssueError, IssuedCertificate, SpiffeId};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tonic::{Code, Status};

use crate::audit::{Api, AuditWriter, Decision, MAX_ATTACKER_TEXT, Outcome, bounded};
use crate::authn::{AuthChain, AuthFailure, Caller, CallerContext};
use crate::denials::Admit;

/// A certificate that was issued and durably recorded.
#[derive(Debug)]
pub struct Granted {
    /// The leaf.
    pub issued: IssuedCertificate,
    /// PEM of the CA certificates after the leaf: signing CA first, root last.
    pub ca_chain_pem: Vec<String>,
    /// Whether the signing CA is the (self-signed) root.
    pub signer_is_root: bool,
}

/// A refusal decided before signing, with its wire code and audit reason.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// gRPC code for the caller.
    pub code: Code,
    /// Stable reason code for the audit record.
    pub reason: &'static str,
    /// Message for the caller (no internals).
    pub message: String,
}

/// Everything the request path needs.
pub struct Issuance {
    /// The signing authority.
    pub ca: Arc<CertificateAuthority>,
    /// Policy for gRPC callers.
    pub policy: IssuancePolicy,
    /// Policy for callers of the legacy API (the old node agents): `policy`, with what
    /// `--legacy-ttl-above-max` says of requests above the maximum.
    pub legacy_policy: IssuancePolicy,
    /// Policy for admin exports (longer-lived bootstrap certificates).
    pub export_policy: IssuancePolicy,
    /// Trust domain of every identity we issue.
    pub trust_domain: String,
    /// How callers prove who they are.
    pub authn: AuthChain,
    /// Where decisions are recorded.
    pub audit: AuditWriter,
    /// Metric handles of the issued path, resolved once.
    pub issued_metrics: IssuedMetrics,
    /// Windows of unauthenticated callers' repeated denials.
    pub denials: crate::denials::DenialAggregator,
}

fn issue_code(e: &IssueError) -> Code {
    match e {
        IssueError::MalformedCsr(_)
        | IssueError::BadCsrSignature
        | IssueError::UnsupportedKey(_)
        | IssueError::TtlTooLong { .. } => Code::InvalidArgument,
        IssueError::SignerExpired => Code::Unavailable,
        IssueError::Internal(_) => Code::Internal,
    }
}

/// The audit record of a certificate the CA signed, on top of `base` (who asked, how):
/// serial, validity, granted TTL, digests, and the SPIFFE ID read back from the
/// certificate (none for the CA's own serving certificate). Every issuance path —
/// gRPC, admin export, Secret controller, serving certificate — records it this way.
pub fn issued_decision(
    base: Decision,
    issued: &IssuedCertificate,
    now: OffsetDateTime,
) -> Decision {
    let facts = &issued.facts;
    Decision {
        outcome: Some(Outcome::Issued),
        granted_ttl_secs: Some((facts.not_after - now).whole_seconds()),
        spiffe_id: facts.uri_sans.first().cloned(),
        serial: Some(facts.serial.clone()),
        not_before: Some(rfc3339(facts.not_before)),
        not_after: Some(rfc3339(facts.not_after)),
        spki_sha256: Some(issued.spki_sha256.clone()),
        cert_sha256: Some(issued.cert_sha256.clone()),
        ..base
    }
}

/// `base` with who the authenticated caller is.
pub fn caller_decision(base: Decision, caller: &Caller) -> Decision {
    Decision {
        authenticator: Some(caller.authenticator.into()),
        client_serial: caller.client_serial.clone(),
        caller: Some(
            caller
                .principal
                .clone()
                .unwrap_or_else(|| caller.identity.to_string()),
        ),
        ..base
    }
}

/// A denial's record on top of `base`, with every text a caller may have chosen cut to
/// [`MAX_ATTACKER_TEXT`]: a request cannot make its record, or the log line, large.
fn denial(base: Decision, reason: &'static str, detail: &str) -> Decision {
    Decision {
        outcome: Some(Outcome::Denied),
        reason: Some(reason.into()),
        detail: Some(bounded(detail, MAX_ATTACKER_TEXT)),
        caller: base
            .caller
            .as_deref()
            .map(|c| bounded(c, MAX_ATTACKER_TEXT)),
        ..base
    }
}

/// Formats a time as stored in audit records and printed to admins.
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

impl Issuance {
    /// Serves one gRPC CSR: authenticate, then [`Issuance::sign_for`].
    pub async fn handle_csr(
        &self,
        api: Api,
        ctx: &CallerContext,
        csr: &[u8],
        requested_ttl_secs: i64,
        refusal: Option<Refusal>,
    ) -> Result<Granted, Status> {
        let started = Instant::now();
        let base = Decision {
            api: Some(api),
            peer: ctx.peer_addr.map(|a| a.to_string()),
            requested_ttl_secs,
            ..Default::default()
        };
        let caller = match self.authn.authenticate(ctx).await {
            Ok(c) => c,
            Err(AuthFailure {
                authenticator,
                reason,
                detail,
                code,
                principal,
            }) => {
                let d = Decision {
                    authenticator: Some(authenticator.into()),
                    caller: principal,
                    ..base
                };
                let msg = match code {
                    Code::PermissionDenied => format!("not allowed ({reason})"),
                    Code::Unavailable => format!("cannot authenticate right now ({reason})"),
                    _ => format!("authentication failed ({reason})"),
                };
                return Err(self
                    .deny_unauthenticated(d, code, reason, detail, msg)
                    .await);
            }
        };
        let base = caller_decision(base, &caller);
        if let Some(r) = refusal {
            return Err(self
                .deny(base, r.code, r.reason, r.message.clone(), r.message)
                .await);
        }
        let policy = match api {
            Api::Legacy => &self.legacy_policy,
            _ => &self.policy,
        };
        self.sign_for(base, &caller, csr, requested_ttl_secs, policy, started)
            .await
    }

    /// Policy, signing and audit for an authenticated caller.
    pub async fn sign_for(
        &self,
        base: Decision,
        caller: &Caller,
        csr: &[u8],
        requested_ttl_secs: i64,
        policy: &IssuancePolicy,
        started: Instant,
    ) -> Result<Granted, Status> {
        if caller.identity.trust_domain() != self.trust_domain {
            let msg = "identity is outside this CA's trust domain".to_string();
            return Err(self
                .deny(
                    base,
                    Code::PermissionDenied,
                    "foreign_trust_domain",
                    msg.clone(),
                    msg,
                )
                .await);
        }
        let now = OffsetDateTime::now_utc();
        let issued =
            match self
                .ca
                .issue_from_csr(csr, &caller.identity, requested_ttl_secs, policy, now)
            {
                Ok(i) => i,
                Err(e) => {
                    let msg = match &e {
                        IssueError::Internal(_) => "internal error".to_string(),
                        other => other.to_string(),
                    };
                    return Err(self
                        .deny(base, issue_code(&e), e.reason_code(), e.to_string(), msg)
                        .await);
                }
            };
        let facts = &issued.facts;
        let decision = issued_decision(base, &issued, now);
        let api = decision.api.map(|a| a.as_str()).unwrap_or("unknown");
        let authenticator = caller.authenticator;
        if let Err(e) = self.audit.record(decision).await {
            tracing::error!(error = %e, serial = %facts.serial, "audit record not durable: certificate withheld");
            count(api, "error", authenticator, "audit_unavailable");
            return Err(Status::unavailable(
                "the CA cannot record decisions right now; no certificate was issued",
            ));
        }
        // The audit record is the durable account; the log line is for debugging.
        tracing::debug!(api, identity = %caller.identity, serial = %facts.serial, not_after = %facts.not_after, "issued");
        self.issued_metrics.record(api, authenticator, started);
        Ok(Granted {
            ca_chain_pem: self.ca.ca_chain_pem().to_vec(),
            signer_is_root: self.ca.signer_is_root(),
            issued,
        })
    }

    /// Records a denial and builds the status for the caller.
    pub async fn deny(
        &self,
        base: Decision,
        code: Code,
        reason: &'static str,
        detail: String,
        message: String,
    ) -> Status {
        self.record_denial(denial(base, reason, &detail), code, reason, &message)
            .await
    }

    /// Denies a caller that did not authenticate: the first identical denial of a
    /// window is recorded, the rest are counted into its summary
    /// ([`crate::denials`]), so that a flood costs the store a record per window.
    pub async fn deny_unauthenticated(
        &self,
        base: Decision,
        code: Code,
        reason: &'static str,
        detail: String,
        message: String,
    ) -> Status {
        let decision = denial(base, reason, &detail);
        match self.denials.admit(&decision, reason, Instant::now()) {
            Admit::Record => self.record_denial(decision, code, reason, &message).await,
            Admit::Counted => {
                let api = decision.api.map(|a| a.as_str()).unwrap_or("unknown");
                let authenticator = decision.authenticator.unwrap_or_else(|| "none".into());
                count(api, "denied", authenticator, reason);
                Status::new(code, bounded(&message, MAX_ATTACKER_TEXT))
            }
        }
    }

    /// Records the summaries of the denial windows that closed (all of them with
    /// `everything`, when the server stops).
    pub async fn flush_denials(&self, everything: bool) {
        for summary in self.denials.take_closed(Instant::now(), everything) {
            if let Err(e) = self.audit.record(summary).await {
                tracing::error!(error = %e, "could not record a summary of denials");
            }
        }
    }

    async fn record_denial(
        &self,
        decision: Decision,
        code: Code,
        reason: &'static str,
        message: &str,
    ) -> Status {
        let api = decision.api.map(|a| a.as_str()).unwrap_or("unknown");
        let authenticator = decision
            .authenticator
            .clone()
            .unwrap_or_else(|| "none".into());
        tracing::warn!(api, reason, detail = ?decision.detail, peer = ?decision.peer, caller = ?decision.caller, "denied");
        count(api, "denied", authenticator, reason);
        if let Err(e) = self.audit.record(decision).await {
            tracing::error!(error = %e, "could not record a denial");
            return Status::unavailable("the CA cannot record decisions right now");
        }
        Status::new(code, bounded(message, MAX_ATTACKER_TEXT))
    }

    /// The identity an admin export is for.
    pub fn export_identity(
        &self,
        namespace: &str,
        service_account: &str,
    ) -> Result<SpiffeId, String> {
        SpiffeId::for_service_account(&self.trust_domain, namespace, service_account)
            .map_err(|e| e.to_string())
    }
}

/// The request counter and latency histogram of issued certificates, per API and
/// authenticator, resolved once. Naming a labelled metric builds and hashes its key
/// and looks it up in the registry on every call; the issued path runs thousands of
/// times a second, every other outcome goes through [`count`].
#[derive(Default)]
pub struct IssuedMetrics(std::sync::Mutex<std::collections::HashMap<IssuedLabels, IssuedHandles>>);

/// API and authenticator.
type IssuedLabels = (&'static str, &'static str);
/// Request counter and latency histogram.
type IssuedHandles = (metrics::Counter, metrics::Histogram);

impl IssuedMetrics {
    fn record(&self, api: &'static str, authenticator: &'static str, started: Instant) {
        let mut handles = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let (counter, histogram) = handles.entry((api, authenticator)).or_insert_with(|| {
            (
                requests_counter(api, "issued", authenticator, ""),
                metrics::histogram!("ca_issuance_duration_seconds", "api" => api),
            )
        });
        counter.increment(1);
        histogram.record(started.elapsed().as_secs_f64());
    }
}

/// Counts a request that was not issued (denied, or refused for want of an audit).
fn count(
    api: &'static str,
    outcome: &'static str,
    authenticator: impl Into<metrics::SharedString>,
    reason: &'static str,
) {
    requests_counter(api, outcome, authenticator, reason).increment(1);
}

/// `ca_requests_total` for one combination of labels; the one place they are named.
pub(crate) fn requests_counter(
    api: &'static str,
    outcome: &'static str,
    authenticator: impl Into<metrics::SharedString>,
    reason: &'static str,
) -> metrics::Counter {
    metrics::counter!(
        "ca_requests_total",
        "api" => api,
        "outcome" => outcome,
        "authenticator" => authenticator,
        "reason" => reason
    )
}
