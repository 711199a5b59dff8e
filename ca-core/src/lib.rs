//! The pure core of the certificate authority.
//!
//! Everything here does no I/O and knows nothing of gRPC, files or Kubernetes; the
//! randomness comes from `ring`. The issuance time is a parameter; serial numbers
//! (`authority::fresh_serial`) still read the wall clock themselves. The issuance
//! path is:
//!
//! ```text
//!   CSR bytes ──► csr::VerifiedCsr        (parse, self-signature, allowed key types)
//!   caller    ──► spiffe::SpiffeId        (from the authenticator, never the CSR)
//!   policy    ──► policy::IssuancePolicy  (TTL default / maximum, signer lifetime)
//!            ──► authority::CertificateAuthority::issue_from_csr
//!                   template → sign (behind `CaSigner`) → recheck
//!            ──► authority::IssuedCertificate
//! ```
#![forbid(unsafe_code)]

pub mod authority;
pub mod csr;
pub mod dns;
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
pub use dns::DnsName;
pub use error::IssueError;
pub use policy::IssuancePolicy;
pub use spiffe::SpiffeId;
