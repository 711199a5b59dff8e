//! Leader election on a `coordination.k8s.io/v1` Lease: any number of replicas serve
//! gRPC, one runs the controllers.
//!
//! - The holder renews every third of the lease duration. A stopping leader releases
//!   the lease so the next one takes over at once.
//! - Expiry is judged by the follower's own monotonic clock, never by comparing the
//!   holder's `renewTime` with the local wall clock (clocks differ between nodes): a
//!   follower remembers when it last saw the lease record change, and takes the lease
//!   only when it has not changed for a whole lease duration, with an optimistic update
//!   (409: someone else was faster). This is what client-go's leader election does.
//! - Every API call has a timeout of a third of the lease duration, so a hung request
//!   cannot keep a replica leading: a leader that has not renewed for two thirds of the
//!   lease stops leading, before any follower can have seen the lease unchanged for a
//!   whole duration.

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
    /// The other holder's lease record as last seen, and when it was first seen so.
    observed: Option<(Record, Instant)>,
}

/// What identifies one renewal of a lease.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Record {
    holder: Option<String>,
    renew_time: Option<String>,
    resource_version: Option<String>,
}

enum Attempt {
    Leading,
    Following(Option<String>),
}

/// Why an attempt did not reach a decision.
#[derive(Debug, thiserror::Error)]
enum ElectionError {
    #[error(transparent)]
    Api(#[from] kube::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
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
            observed: None,
        }
    }

    /// How often the holder renews, and how long any one API call may take.
    fn period(&self) -> Duration {
        (self.lease_duration / 3).max(Duration::from_millis(500))
    }

    async fn call<T>(
        &self,
        call: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<Result<T, kube::Error>, ElectionError> {
        tokio::time::timeout(self.period(), call)
            .await
            .map_err(|_| {
                metrics::counter!("ca_kubernetes_api_timeouts_total", "call" => "lease")
                    .increment(1);
                ElectionError::Timeout(self.period())
            })
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

    /// Whether another holder's lease has gone a whole lease duration unchanged, by
    /// this replica's clock.
    fn expired(&mut self, lease: &Lease, spec: &LeaseSpec) -> bool {
        let record = Record {
            holder: spec.holder_identity.clone(),
            renew_time: spec.renew_time.as_ref().map(|t| t.0.to_string()),
            resource_version: lease.metadata.resource_version.clone(),
        };
        let duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(self.lease_duration, Duration::from_secs);
        match &self.observed {
            Some((seen, since)) if *seen == record => since.elapsed() >= duration,
            _ => {
                self.observed = Some((record, Instant::now()));
                false
            }
        }
    }

    async fn attempt(&mut self) -> Result<Attempt, ElectionError> {
        let pp = PostParams::default();
        let Some(mut lease) = self.call(self.api.get_opt(LEASE_NAME)).await?? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(LEASE_NAME.into()),
                    ..Default::default()
                },
                spec: Some(self.spec(Some(MicroTime(Timestamp::now())), 0)),
            };
            return match self.call(self.api.create(&pp, &lease)).await? {
                Ok(_) => Ok(Attempt::Leading),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::Following(None)),
                Err(e) => Err(e.into()),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let mine = holder.as_deref() == Some(self.identity.as_str());
        if !mine && holder.is_some() && !self.expired(&lease, &spec) {
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
        match self.call(self.api.replace(LEASE_NAME, &pp, &lease)).await? {
            Ok(_) => {
                self.observed = None;
                Ok(Attempt::Leading)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::Following(holder)),
            Err(e) => Err(e.into()),
        }
    }

    /// Runs the election, publishing whether this replica leads, until `shutdown`.
    pub async fn run(mut self, leading: watch::Sender<bool>, mut shutdown: watch::Receiver<bool>) {
        let period = self.period();
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
                    if last_renewal.is_some_and(|t| t.elapsed() + period >= self.lease_duration) {
                        tracing::warn!(identity = %self.identity, "lease not renewed in time: stopped leading");
                        last_renewal = None;
                        let _ = leading.send(false);
                    }
                }
            }
            metrics::gauge!("ca_leader").set(if *leading.borrow() { 1.0 } else { 0.0 });
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = shutdown.wait_for(|s| *s) => break,
            }
        }
        if *leading.borrow() {
            let _ = leading.send(false);
            self.release().await;
        }
        metrics::gauge!("ca_leader").set(0.0);
    }

    async fn release(&self) {
        if let Ok(Ok(Some(mut lease))) = self.call(self.api.get_opt(LEASE_NAME)).await
            && let Some(spec) = lease.spec.as_mut()
            && spec.holder_identity.as_deref() == Some(self.identity.as_str())
        {
            spec.holder_identity = None;
            spec.renew_time = None;
            let pp = PostParams::default();
            let released = self.call(self.api.replace(LEASE_NAME, &pp, &lease)).await;
            match released.and_then(|r| r.map_err(ElectionError::from)) {
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
