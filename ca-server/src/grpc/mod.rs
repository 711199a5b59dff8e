//! The gRPC/TLS listener: both Istio CA APIs on one port.
//!
//! `serve` accepts TCP connections and completes their TLS handshakes; each connection
//! is then served by [`connection::serve`], each call on it by [`service::CaService`].

mod coalesce;
mod connection;
pub mod limits;
mod service;
pub mod tls;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;

pub use service::CaService;
pub use wire::frame;

/// Largest request message we decode (a CSR is a few KiB; RSA-4096 under 4 KiB).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Serves until `shutdown` turns true, then lets the calls in flight finish and
/// returns once every connection has closed.
pub async fn serve(
    listener: TcpListener,
    tls: rustls::ServerConfig,
    service: CaService,
    request_timeout: Duration,
    limits: limits::Limits,
    mut shutdown: watch::Receiver<bool>,
) {
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let gate = limits::Gate::new(limits);
    let calls = Arc::new(connection::Calls {
        service,
        timeout: request_timeout,
        gate: gate.clone(),
    });
    // Every connection task holds a sender; when all are gone, `open.recv()` ends.
    let (alive, mut open) = mpsc::channel::<()>(1);
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
            () = stopping(&mut shutdown) => break,
        };
        // Over a connection limit: closed before the TLS handshake costs anything.
        let slot = match gate.admit(peer.ip()) {
            Ok(slot) => slot,
            Err(why) => {
                tracing::debug!(%peer, ?why, "connection refused: at a limit");
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let calls = calls.clone();
        let mut shutdown = shutdown.clone();
        let alive = alive.clone();
        tokio::spawn(async move {
            let _alive = alive;
            let _slot = slot;
            // One deadline for the TLS and the HTTP/2 handshakes together.
            let deadline = tokio::time::Instant::now() + calls.gate.limits.handshake_timeout;
            let handshake = tokio::time::timeout_at(deadline, acceptor.accept(tcp));
            let stream = tokio::select! {
                r = handshake => match r {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
                },
                () = stopping(&mut shutdown) => return,
            };
            let certs = stream
                .get_ref()
                .1
                .peer_certificates()
                .map(|chain| Arc::new(chain.iter().map(|c| c.clone().into_owned()).collect()));
            let io = coalesce::CoalescedFlush::new(stream);
            connection::serve(io, peer, certs, calls, deadline, shutdown).await;
        });
    }
    drop(listener);
    drop(alive);
    let _ = open.recv().await;
}

/// Resolves once `shutdown` is true.
async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}
