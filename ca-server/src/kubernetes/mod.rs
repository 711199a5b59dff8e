//! Kubernetes integration beyond authentication: the controller that keeps an
//! `istio.<sa>` Secret for every service account of every managed namespace and the
//! `istio-ca-root-cert` ConfigMap in each of them.

pub mod secrets;

pub use secrets::{ControllerConfig, SecretController};
