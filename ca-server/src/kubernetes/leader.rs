//! Leader election on a `coordination.k8s.io/v1` Lease: any number of replicas serve
//! gRPC, one runs the controllers. The holder renews every third of the lease
//! duration; a replica takes an expired lease with an optimistic update (409 means
//! someone else was faster); a stopping leader releases the lease so the next one
//! takes over at once; a leader that cannot renew for a whole lease duration stops
//! leading before anyone else may start.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;

/// Name of the Lease.
pub const LEASE_NAME: &str = "istio-ca-leader";

/// One replica's participation in the election.
pub struct LeaderElection {
    api: Api<Lease>,
    identity: String,
    lease_duration: Duration,
}

enum Attempt {
    Leading,
    Following(Option<String>),
}

impl LeaderElection {
    /// Competes for the Lease in `namespace` as `identity`.
    pub fn new(
        client: kube::Client,
        namespace: &str,
        identity: String,
        lease_duration: Duration,
    ) -> Self {
        LeaderElection {
            api: Api::namespaced(client, namespace),
            identity,
            lease_duration,
        }
    }

    fn spec(&self, acquire: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.lease_duration.as_secs().max(1) as i32),
            acquire_time: acquire,
            renew_time: Some(MicroTime(Timestamp::now())),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    async fn attempt(&self) -> Result<Attempt, kube::Error> {
        let pp = PostParams::default();
        let Some(mut lease) = self.api.get_opt(LEASE_NAME).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(LEASE_NAME.into()),
                    ..Default::default()
                },
                spec: Some(self.spec(Some(MicroTime(Timestamp::now())), 0)),
            };
            return match self.api.create(&pp, &lease).await {
                Ok(_) => Ok(Attempt::Leading),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::Following(None)),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let duration = i64::from(spec.lease_duration_seconds.unwrap_or(15));
        let expired = spec
            .renew_time
            .as_ref()
            .is_none_or(|t| t.0.as_second() + duration < Timestamp::now().as_second());
        let mine = holder.as_deref() == Some(self.identity.as_str());
        if !mine && !expired && holder.is_some() {
            return Ok(Attempt::Following(holder));
        }
        lease.spec = Some(if mine {
            self.spec(spec.acquire_time, spec.lease_transitions.unwrap_or(0))
        } else {
            self.spec(
                Some(MicroTime(Timestamp::now())),
                spec.lease_transitions.unwrap_or(0) + 1,
            )
        });
        match self.api.replace(LEASE_NAME, &pp, &lease).await {
            Ok(_) => Ok(Attempt::Leading),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::Following(holder)),
            Err(e) => Err(e),
        }
    }

    /// Runs the election, publishing whether this replica leads, until `shutdown`.
    pub async fn run(self, leading: watch::Sender<bool>, mut shutdown: watch::Receiver<bool>) {
        let renew_every = (self.lease_duration / 3).max(Duration::from_millis(500));
        let mut last_renewal: Option<Instant> = None;
        loop {
            match self.attempt().await {
                Ok(Attempt::Leading) => {
                    if !*leading.borrow() {
                        tracing::info!(identity = %self.identity, "became the leader: running the controllers");
                    }
                    last_renewal = Some(Instant::now());
                    let _ = leading.send(true);
                }
                Ok(Attempt::Following(holder)) => {
                    if *leading.borrow() {
                        tracing::warn!(identity = %self.identity, ?holder, "lost the lease");
                    }
                    last_renewal = None;
                    let _ = leading.send(false);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "lease update failed");
                    // Stop leading before the lease can expire for the others.
                    if last_renewal
                        .is_some_and(|t| t.elapsed() + renew_every >= self.lease_duration)
                    {
                        last_renewal = None;
                        let _ = leading.send(false);
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(renew_every) => {}
                _ = shutdown.wait_for(|s| *s) => break,
            }
        }
        if *leading.borrow() {
            let _ = leading.send(false);
            self.release().await;
        }
    }

    async fn release(&self) {
        if let Ok(Some(mut lease)) = self.api.get_opt(LEASE_NAME).await
            && let Some(spec) = lease.spec.as_mut()
            && spec.holder_identity.as_deref() == Some(self.identity.as_str())
        {
            spec.holder_identity = None;
            spec.renew_time = None;
            match self
                .api
                .replace(LEASE_NAME, &PostParams::default(), &lease)
                .await
            {
                Ok(_) => tracing::info!("released the lease"),
                Err(e) => tracing::warn!(error = %e, "could not release the lease; it will expire"),
            }
        }
    }
}

/// A name for this replica: the pod name (or host name) and the process id.
pub fn default_identity() -> String {
    format!("{}-{}", host_name(), std::process::id())
}

/// The pod name, else the host name, else `ca-server`.
pub fn host_name() -> String {
    std::env::var("POD_NAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| "ca-server".into())
}
