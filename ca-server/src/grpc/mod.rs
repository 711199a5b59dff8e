//! The gRPC/TLS listener: both Istio CA APIs on one port.

mod coalesce;
mod rejections;
mod service;
pub mod tls;

use std::sync::Arc;
use std::time::Duration;

use istio_ca_proto::istio_ca_service_server::IstioCaServiceServer;
use istio_ca_proto::istio_certificate_service_server::IstioCertificateServiceServer;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;

pub use service::CaService;

use crate::audit::AuditWriter;

/// Largest request message we decode (a CSR is a few KiB; RSA-4096 under 4 KiB).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves until `shutdown` turns true, then drains in-flight requests.
pub async fn serve(
    listener: TcpListener,
    tls: rustls::ServerConfig,
    service: CaService,
    audit: AuditWriter,
    request_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), tonic::transport::Error> {
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let (tx, rx) = mpsc::channel::<
        Result<
            coalesce::CoalescedFlush<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>,
            std::io::Error,
        >,
    >(64);
    let mut accept_shutdown = shutdown.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = accept_shutdown.changed() => break,
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(coalesce::CoalescedFlush::new(stream))).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    let modern = IstioCertificateServiceServer::new(service.clone())
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    let legacy = IstioCaServiceServer::new(service).max_decoding_message_size(MAX_REQUEST_BYTES);
    tonic::transport::Server::builder()
        .timeout(request_timeout)
        .layer(rejections::AuditRejectionsLayer::new(audit))
        .add_service(modern)
        .add_service(legacy)
        .serve_with_incoming_shutdown(ReceiverStream::new(rx), async move {
            let _ = shutdown.wait_for(|s| *s).await;
        })
        .await
}
