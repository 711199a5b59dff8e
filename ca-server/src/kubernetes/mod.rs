//! Kubernetes integration beyond authentication: the controller that keeps an
//! `istio.<sa>` Secret for every service account of every managed namespace and the
//! `istio-ca-root-cert` ConfigMap in each of them.

pub mod leader;
pub mod secrets;

pub use leader::LeaderElection;
pub use secrets::{ControllerConfig, SecretController};

use std::sync::Arc;
use std::time::Duration;

use ca_core::CertificateAuthority;
use tokio::sync::watch;

use crate::audit::AuditWriter;

/// Runs the Secret controller while this replica holds the Lease; with `lease = None`
/// (a single replica) it runs unconditionally.
pub async fn run_controllers(
    client: kube::Client,
    ca: Arc<CertificateAuthority>,
    trust_domain: String,
    audit: AuditWriter,
    cfg: ControllerConfig,
    lease: Option<(String, Duration)>,
    mut shutdown: watch::Receiver<bool>,
) {
    let (leading_tx, mut leading) = watch::channel(lease.is_none());
    // Without an election the sender must outlive the loop: a closed channel would
    // read as "leadership lost".
    let mut _always_leading = None;
    let election = match lease {
        Some((identity, duration)) => {
            let e = LeaderElection::new(client.clone(), &cfg.ca_namespace, identity, duration);
            Some(tokio::spawn(e.run(leading_tx, shutdown.clone())))
        }
        None => {
            _always_leading = Some(leading_tx);
            None
        }
    };
    loop {
        tokio::select! {
            r = leading.wait_for(|l| *l) => if r.is_err() { break },
            _ = shutdown.wait_for(|s| *s) => break,
        }
        let (stop_tx, stop_rx) = watch::channel(false);
        let controller = Arc::new(SecretController::new(
            client.clone(),
            ca.clone(),
            &trust_domain,
            audit.clone(),
            cfg.clone(),
        ));
        let task = tokio::spawn(controller.run(stop_rx));
        tokio::select! {
            _ = leading.wait_for(|l| !*l) => {}
            _ = shutdown.wait_for(|s| *s) => {}
        }
        let _ = stop_tx.send(true);
        let _ = task.await;
        if *shutdown.borrow() {
            break;
        }
    }
    if let Some(e) = election {
        let _ = e.await;
    }
}
