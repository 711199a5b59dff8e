//! Why an issuance was refused, in words an operator and a caller can act on.

/// A refusal from the pure core. Each variant maps to one audit reason code and one
/// gRPC status at the edge.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum IssueError {
    /// The CSR is not PEM/DER, or not a PKCS#10 request.
    #[error("the CSR could not be parsed: {0}")]
    MalformedCsr(String),
    /// The CSR's self-signature does not verify with its own public key.
    #[error("the CSR signature does not verify")]
    BadCsrSignature,
    /// The CSR's key type or size is not one we issue for.
    #[error("unsupported key in CSR: {0} (accepted: ECDSA P-256, P-384, RSA 2048-4096)")]
    UnsupportedKey(String),
    /// The requested lifetime exceeds the configured maximum.
    #[error("requested TTL {requested_secs}s exceeds the maximum of {max_secs}s")]
    TtlTooLong {
        /// What the caller asked for, in seconds.
        requested_secs: i64,
        /// The configured maximum, in seconds.
        max_secs: i64,
    },
    /// The signing CA has expired or expires too soon to issue anything useful.
    #[error("the signing CA certificate is expired or about to expire")]
    SignerExpired,
    /// Signing failed, or what was signed did not pass the re-check. Never the caller's fault.
    #[error("internal signing failure: {0}")]
    Internal(String),
}

impl IssueError {
    /// Stable reason code for audit records and metrics.
    pub fn reason_code(&self) -> &'static str {
        match self {
            IssueError::MalformedCsr(_) => "malformed_csr",
            IssueError::BadCsrSignature => "bad_csr_signature",
            IssueError::UnsupportedKey(_) => "unsupported_key",
            IssueError::TtlTooLong { .. } => "ttl_too_long",
            IssueError::SignerExpired => "signer_expired",
            IssueError::Internal(_) => "internal",
        }
    }
}
