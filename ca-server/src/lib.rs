//! `ca-server`: the workload-identity CA.
//!
//! Request flow (one module per step):
//! [`grpc`] (TLS, both Istio APIs) → [`authn`] (who is calling) → [`issuance`]
//! (policy, signing with `ca_core`, audit) → [`audit`] (durable, hash-chained) → answer.
//! [`state`] loads the CA material, [`admin`] serves admin commands over a local
//! socket, [`http`] serves health and metrics, [`server`] wires it all, [`cli`] parses.
#![forbid(unsafe_code)]

pub mod admin;
pub mod audit;
pub mod authn;
pub mod cli;
pub mod denials;
pub mod fsutil;
pub mod grpc;
pub mod http;
pub mod httpclient;
pub mod issuance;
pub mod kubernetes;
pub mod ratelimit;
pub mod server;
pub mod state;
