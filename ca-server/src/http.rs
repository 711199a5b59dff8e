//! The HTTP side port: `/healthz`, `/readyz` (says why not ready), `/metrics`.

use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::audit::{AuditHealth, RevocationView};

/// Why the server is not ready; `None` when it is. Ready means started, not shutting
/// down, the audit store's last write succeeded (no record, no certificate), and the
/// revocation list is confirmed fresh (otherwise renewals by client certificate are
/// refused).
#[derive(Clone, Default)]
pub struct Readiness {
    reason: Arc<RwLock<Option<String>>>,
    audit: Arc<OnceLock<AuditHealth>>,
    revocations: Arc<OnceLock<Arc<RevocationView>>>,
}

impl Readiness {
    /// Not ready, because of `why`.
    pub fn starting(why: &str) -> Self {
        Readiness {
            reason: Arc::new(RwLock::new(Some(why.to_owned()))),
            audit: Arc::default(),
            revocations: Arc::default(),
        }
    }
    /// Sets the reason (or `None` for ready).
    pub fn set(&self, why: Option<String>) {
        *self.reason.write().unwrap_or_else(|p| p.into_inner()) = why;
    }
    /// From now on, a failing audit store also makes the server not ready.
    pub fn track_audit(&self, health: AuditHealth) {
        let _ = self.audit.set(health);
    }
    /// From now on, a revocation list that cannot be confirmed fresh also makes the
    /// server not ready.
    pub fn track_revocations(&self, view: Arc<RevocationView>) {
        let _ = self.revocations.set(view);
    }
    fn get(&self) -> Option<String> {
        let reason = self
            .reason
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        reason
            .or_else(|| {
                self.audit.get()?.failure().map(|why| {
                    format!("the audit store cannot record decisions, so nothing is issued ({why})")
                })
            })
            .or_else(|| {
                let stale = self.revocations.get()?.check_fresh().err()?;
                Some(format!(
                    "{stale}, so renewals by client certificate are refused"
                ))
            })
    }
}

/// Installs the process-wide Prometheus recorder once.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let latency = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0];
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("duration_seconds".into()), &latency)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full("ca_audit_batch_size".into()), &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]));
            match builder.and_then(|b| b.install_recorder()) {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed; /metrics will be empty");
                    PrometheusBuilder::new().build_recorder().handle()
                }
            }
        })
        .clone()
}

#[derive(Clone)]
struct AppState {
    ready: Readiness,
    metrics: PrometheusHandle,
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<AppState>) -> (StatusCode, String) {
    match s.ready.get() {
        None => (StatusCode::OK, "ready\n".into()),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

async fn metrics(State(s): State<AppState>) -> String {
    s.metrics.render()
}

/// How often recorded histogram samples are folded into their buckets.
const METRICS_UPKEEP: Duration = Duration::from_secs(5);

/// Folds the histogram samples recorded since the last pass into their buckets. The
/// recorder keeps every sample until then: without this, a CA that nobody scrapes grows
/// by 8 bytes per request and per audit flush (about 300 MB an hour at 10,000
/// certificates/s).
async fn metrics_upkeep(handle: PrometheusHandle, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(METRICS_UPKEEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => handle.run_upkeep(),
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

/// Serves the side port until `shutdown`, and keeps the metrics' memory bounded.
pub async fn serve(
    listener: TcpListener,
    ready: Readiness,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    tokio::spawn(metrics_upkeep(metrics_handle(), shutdown.clone()));
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(AppState {
            ready,
            metrics: metrics_handle(),
        });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|s| *s).await;
        })
        .await
}
