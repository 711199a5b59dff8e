//! Audits requests that tonic refuses before our handlers run (today: messages over
//! the size limit, answered `OUT_OF_RANGE`), so that every denial leaves a record.
//! Our handlers never answer `OUT_OF_RANGE`, so the code identifies these.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tower::{Layer, Service};

use crate::audit::{Api, AuditWriter, Decision, Outcome};

/// Layer that wraps the gRPC routes.
#[derive(Clone)]
pub struct AuditRejectionsLayer {
    audit: AuditWriter,
}

impl AuditRejectionsLayer {
    /// New layer recording into `audit`.
    pub fn new(audit: AuditWriter) -> Self {
        AuditRejectionsLayer { audit }
    }
}

impl<S> Layer<S> for AuditRejectionsLayer {
    type Service = AuditRejections<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuditRejections {
            inner,
            audit: self.audit.clone(),
        }
    }
}

/// See the module documentation.
#[derive(Clone)]
pub struct AuditRejections<S> {
    inner: S,
    audit: AuditWriter,
}

const OUT_OF_RANGE: &str = "11";

impl<S, B, RB> Service<http::Request<B>> for AuditRejections<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
    RB: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let peer = req
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|i| i.get_ref().remote_addr());
        let api = if req.uri().path() == istio_ca_proto::HANDLE_CSR_PATH {
            Api::Legacy
        } else {
            Api::Modern
        };
        let audit = self.audit.clone();
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let resp = inner.call(req).await?;
            if resp
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                == Some(OUT_OF_RANGE)
            {
                tracing::warn!(?peer, "request larger than the limit refused");
                crate::issuance::requests_counter(
                    api.as_str(),
                    "denied",
                    "none",
                    "request_too_large",
                )
                .increment(1);
                let decision = Decision {
                    api: Some(api),
                    outcome: Some(Outcome::Denied),
                    reason: Some("request_too_large".into()),
                    detail: Some(format!(
                        "request message over {} bytes",
                        super::MAX_REQUEST_BYTES
                    )),
                    peer: peer.map(|a| a.to_string()),
                    ..Default::default()
                };
                if let Err(e) = audit.record(decision).await {
                    tracing::error!(error = %e, "could not record a denial");
                }
            }
            Ok(resp)
        })
    }
}
