//! `node-identity`: the VM agent. It proves the machine's identity to the CA, obtains a
//! SPIFFE certificate, publishes `key.pem`, `cert-chain.pem` and `root-cert.pem` for the
//! sidecar, and renews before expiry — surviving CA outages and machines that were off
//! longer than a certificate's life.
//!
//! One renewal: [`credential`] (best valid way to prove identity) → [`ca_client`]
//! (fresh key, CSR, `CreateCertificate` over mutual TLS) → [`verify`] (check the
//! answer) → [`publish`] (atomic generation swap) → [`schedule`] (when next).
//! [`agent`] runs that loop; [`status`] records and reports it.
#![forbid(unsafe_code)]

pub mod agent;
pub mod ca_client;
pub mod cli;
pub mod credential;
pub mod gce;
pub mod publish;
pub mod schedule;
pub mod status;
pub mod verify;
