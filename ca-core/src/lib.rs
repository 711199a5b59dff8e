//! The pure core of the certificate authority.
//!
//! Everything here is deterministic given its inputs (the clock is a parameter, the
//! randomness comes from `ring`), does no I/O and knows nothing of gRPC, files or
//! Kubernetes. The issuance path is:
//!
//! ```text
//!   CSR bytes ──► csr::VerifiedCsr        (parse, self-signature, allowed key types)
//!   caller    ──► spiffe::SpiffeId        (from the authenticator, never the CSR)
//!   policy    ──► policy::IssuancePolicy  (TTL default / maximum, signer lifetime)
//!            ──► authority::CertificateAuthority::issue
//!                   template → sign (behind `CaSigner`) → recheck
//!            ──► authority::IssuedCertificate
//! ```
#![forbid(unsafe_code)]

pub mod authority;
pub mod csr;
pub mod error;
pub mod keys;
mod leaf;
pub mod pem;
pub mod policy;
pub mod reread;
pub mod spiffe;
pub mod statement;
pub mod x509;

pub use authority::{CaSigner, CertificateAuthority, IssuedCertificate};
pub use csr::{KeyKind, VerifiedCsr};
pub use error::IssueError;
pub use policy::IssuancePolicy;
pub use spiffe::SpiffeId;
