//! One HTTP/2 connection: every stream on it is a unary call to one of the two APIs,
//! answered by its own task.
//!
//! The calls are served on the `h2` crate directly rather than through a general gRPC
//! framework: two unary methods need little of one, and its routing, middleware and
//! per-request boxing were a measurable part of the CPU each certificate costs
//! (docs/BENCHMARKS.md). What the framework did is here, and tested: the size limit,
//! the deadline (server-wide, shortened by `grpc-timeout`), status codes, draining.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::FusedFuture;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Method, Request, StatusCode};
use istio_ca_proto::{CsrRequest, IstioCertificateRequest};
use prost::Message;
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tonic::{Code, Status};

use super::limits::Gate;
use super::service::CaService;
use super::wire::{self, BodyError, UnaryBody};
use crate::audit::Api;
use crate::authn::CallerContext;
use crate::issuance::Refusal;

/// A stream's flow-control window: a whole request of the largest size (and its
/// frame prefix) fits, so no call waits for a WINDOW_UPDATE.
const STREAM_WINDOW: u32 = super::MAX_REQUEST_BYTES as u32 + 1024;
/// The connection's window: what a peer may have sent that the server has not read
/// yet, and so the most a connection's unread data can hold in memory.
const CONNECTION_WINDOW: u32 = 256 * 1024;
/// How long after the last possible deadline a draining connection may stay open.
const DRAIN_SLACK: Duration = Duration::from_secs(1);

/// What every stream of the server shares.
pub struct Calls {
    pub service: CaService,
    /// Deadline of a call when the client asks for none or a longer one.
    pub timeout: Duration,
    /// The front door's limits and what is open against them.
    pub gate: Arc<Gate>,
}

/// Who is at the other end of a connection.
struct Peer {
    addr: SocketAddr,
    certs: Option<Arc<Vec<CertificateDer<'static>>>>,
}

/// Serves the calls of one connection until the client closes it, or until `shutdown`
/// turns true: then no new call is accepted and the ones in flight finish.
pub async fn serve<T>(
    io: T,
    addr: SocketAddr,
    certs: Option<Arc<Vec<CertificateDer<'static>>>>,
    calls: Arc<Calls>,
    handshake_deadline: tokio::time::Instant,
    mut shutdown: watch::Receiver<bool>,
) where
    T: AsyncRead + AsyncWrite + Unpin,
{
    // One wait for the shutdown signal for the connection's life, not one per call.
    let stop = super::stopping(&mut shutdown);
    tokio::pin!(stop);
    let limits = &calls.gate.limits;
    let handshake = h2::server::Builder::new()
        .max_concurrent_streams(limits.max_streams_per_connection)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_header_list_size(limits.max_header_bytes)
        .handshake::<_, Bytes>(io);
    let mut conn = tokio::select! {
        r = tokio::time::timeout_at(handshake_deadline, handshake) => match r {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => {
                tracing::debug!(peer = %addr, error = %e, "HTTP/2 handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(peer = %addr, "HTTP/2 handshake timed out");
                return;
            }
        },
        () = &mut stop => return,
    };
    let peer = Arc::new(Peer { addr, certs });
    // Once draining, a client that never lets the connection close (it ignores the
    // GOAWAY's ping, or stops reading) is cut off when the last call's deadline is
    // past.
    let grace = tokio::time::sleep(Duration::MAX);
    tokio::pin!(grace);
    let mut draining = false;
    // No call for `idle_timeout`: the connection is closed (gracefully).
    let idle_timeout = calls.gate.limits.idle_timeout;
    let idle = tokio::time::sleep(idle_timeout);
    tokio::pin!(idle);
    let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut unanswered_ping = keepalive(&mut conn, &calls.gate.limits);
    loop {
        let now = tokio::time::Instant::now;
        // `accept` also drives the connection's I/O for the calls in flight.
        let next = tokio::select! {
            next = conn.accept() => next,
            () = &mut stop, if !draining => {
                draining = true;
                conn.graceful_shutdown();
                grace.as_mut().reset(now() + calls.timeout + DRAIN_SLACK);
                continue;
            }
            () = &mut grace, if draining => {
                tracing::debug!(peer = %addr, "connection still open after the drain; closing it");
                return;
            }
            () = &mut idle, if !draining => {
                if in_flight.load(std::sync::atomic::Ordering::Acquire) == 0 {
                    tracing::debug!(peer = %addr, "connection idle; closing it");
                    metrics::counter!("ca_connections_closed_total", "why" => "idle").increment(1);
                    draining = true;
                    conn.graceful_shutdown();
                    grace.as_mut().reset(now() + DRAIN_SLACK);
                } else {
                    idle.as_mut().reset(now() + idle_timeout);
                }
                continue;
            }
            Some(()) = async { (&mut unanswered_ping).await.ok() }, if !unanswered_ping.is_terminated() => {
                tracing::debug!(peer = %addr, "no answer to a keepalive ping; closing the connection");
                metrics::counter!("ca_connections_closed_total", "why" => "keepalive").increment(1);
                return;
            }
        };
        match next {
            Some(Ok((request, respond))) => {
                idle.as_mut().reset(now() + idle_timeout);
                let in_flight = InFlight::enter(&in_flight);
                let (calls, peer) = (calls.clone(), peer.clone());
                tokio::spawn(async move {
                    call(calls, peer, request, respond).await;
                    drop(in_flight);
                });
            }
            Some(Err(e)) => {
                tracing::debug!(peer = %addr, error = %e, "HTTP/2 connection ended");
                return;
            }
            None => return,
        }
    }
}

/// A call counted as in flight on its connection until dropped.
struct InFlight(Arc<std::sync::atomic::AtomicUsize>);

impl InFlight {
    fn enter(count: &Arc<std::sync::atomic::AtomicUsize>) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        InFlight(count.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Pings the peer every `keepalive_interval` from a task of its own; the receiver
/// resolves when a ping went unanswered for `keepalive_timeout` (a dead peer, or one
/// that stopped reading). It never resolves while the peer answers.
fn keepalive<T>(
    conn: &mut h2::server::Connection<T, Bytes>,
    limits: &super::limits::Limits,
) -> futures_util::future::Fuse<tokio::sync::oneshot::Receiver<()>>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    use futures_util::FutureExt;
    let (dead, unanswered) = tokio::sync::oneshot::channel();
    let (every, wait) = (limits.keepalive_interval, limits.keepalive_timeout);
    if let Some(mut pings) = conn.ping_pong() {
        let mut dead = dead;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(every) => {}
                    // The connection is gone.
                    () = dead.closed() => return,
                }
                match tokio::time::timeout(wait, pings.ping(h2::Ping::opaque())).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(_)) => return,
                    Err(_) => {
                        let _ = dead.send(());
                        return;
                    }
                }
            }
        });
    }
    unanswered.fuse()
}

/// The two methods served.
#[derive(Clone, Copy)]
enum Rpc {
    CreateCertificate,
    HandleCsr,
}

impl Rpc {
    fn api(self) -> Api {
        match self {
            Rpc::CreateCertificate => Api::Modern,
            Rpc::HandleCsr => Api::Legacy,
        }
    }
}

/// Which method a request calls, or the answer for one that calls neither.
fn route<B>(request: &Request<B>) -> Result<Rpc, http::Response<()>> {
    if request.method() != Method::POST {
        return Err(wire::http_error(StatusCode::METHOD_NOT_ALLOWED));
    }
    if !wire::is_grpc(request.headers()) {
        return Err(wire::http_error(StatusCode::UNSUPPORTED_MEDIA_TYPE));
    }
    match request.uri().path() {
        istio_ca_proto::CREATE_CERTIFICATE_PATH => Ok(Rpc::CreateCertificate),
        istio_ca_proto::HANDLE_CSR_PATH => Ok(Rpc::HandleCsr),
        path => Err(wire::status_only(Status::unimplemented(format!(
            "no method {path}"
        )))),
    }
}

/// Answers one stream.
async fn call(
    calls: Arc<Calls>,
    peer: Arc<Peer>,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let rpc = match route(&request) {
        Ok(rpc) => rpc,
        Err(refusal) => {
            let _ = respond.send_response(refusal, true);
            return;
        }
    };
    // Shed before any work: no body read, no authentication, no record.
    let Some(_slot) = calls.gate.call_slot() else {
        let status = Status::unavailable("the CA is at its limit of concurrent calls; retry");
        let _ = respond.send_response(wire::status_only(status), true);
        return;
    };
    let deadline = match wire::parse_timeout(request.headers()) {
        Ok(asked) => asked.map_or(calls.timeout, |d| d.min(calls.timeout)),
        Err(why) => {
            let ctx = context(&peer, request.headers());
            let refusal = Refusal {
                code: Code::InvalidArgument,
                reason: "malformed_request",
                message: why,
            };
            let status = calls.service.refuse(rpc.api(), &ctx, refusal).await;
            let _ = respond.send_response(wire::status_only(status), true);
            return;
        }
    };
    let work = tokio::time::timeout(deadline, answer(&calls, &peer, rpc, request));
    // A call whose client reset it (or whose connection broke) is abandoned: its slot
    // is free for another call at once, so its work must not go on. Dropping it is
    // safe: a certificate is only handed over once its audit record is durable.
    let answer = tokio::select! {
        // A reset also fails the request body's read: see the reset first.
        biased;
        reason = std::future::poll_fn(|cx| respond.poll_reset(cx)) => {
            tracing::debug!(peer = %peer.addr, ?reason, "call reset by the client");
            return;
        }
        done = work => done.unwrap_or_else(|_| Err(Status::deadline_exceeded("deadline exceeded"))),
    };
    let sent = match answer {
        Ok(message) => send_message(&mut respond, message),
        Err(status) => respond
            .send_response(wire::status_only(status), true)
            .map(drop),
    };
    if let Err(e) = sent {
        // The client went away or reset the stream; nothing is left to tell it.
        tracing::debug!(peer = %peer.addr, error = %e, "could not send the answer");
    }
}

fn send_message(respond: &mut SendResponse<Bytes>, message: Bytes) -> Result<(), h2::Error> {
    let mut stream = respond.send_response(wire::ok_headers(), false)?;
    stream.send_data(message, false)?;
    stream.send_trailers(wire::ok_trailers())
}

/// Reads, decodes and serves one call; the framed response message or the status.
async fn answer(
    calls: &Calls,
    peer: &Peer,
    rpc: Rpc,
    request: Request<RecvStream>,
) -> Result<Bytes, Status> {
    let (parts, body) = request.into_parts();
    let ctx = context(peer, &parts.headers);
    let refusal = match read_message(body, super::MAX_REQUEST_BYTES).await {
        Err(Read::Stream(status)) => return Err(status),
        Err(Read::Refused(e)) => body_refusal(e, super::MAX_REQUEST_BYTES),
        Ok(message) => match rpc {
            Rpc::CreateCertificate => match IstioCertificateRequest::decode(message) {
                Ok(req) => {
                    let response = calls.service.create_certificate(ctx, req).await?;
                    return Ok(wire::frame(&response));
                }
                Err(e) => undecodable(e),
            },
            Rpc::HandleCsr => match CsrRequest::decode(message) {
                Ok(req) => {
                    let response = calls.service.handle_csr(ctx, req).await?;
                    return Ok(wire::frame(&response));
                }
                Err(e) => undecodable(e),
            },
        },
    };
    Err(calls.service.refuse(rpc.api(), &ctx, refusal).await)
}

/// The refusal of a request body that is not one acceptable message.
fn body_refusal(e: BodyError, limit: usize) -> Refusal {
    match e {
        // gRPC's status table: a message over the server's limit is RESOURCE_EXHAUSTED.
        BodyError::TooLarge(len) => Refusal {
            code: Code::ResourceExhausted,
            reason: "request_too_large",
            message: format!("request message of {len} bytes, over the limit of {limit}"),
        },
        BodyError::Compressed => Refusal {
            code: Code::Unimplemented,
            reason: "compressed_request",
            message: "compressed messages are not accepted (grpc-accept-encoding: identity)".into(),
        },
        BodyError::Malformed(why) => Refusal {
            code: Code::InvalidArgument,
            reason: "malformed_request",
            message: format!("malformed request: {why}"),
        },
    }
}

/// The refusal of a message that does not decode.
fn undecodable(e: prost::DecodeError) -> Refusal {
    Refusal {
        code: Code::InvalidArgument,
        reason: "malformed_request",
        message: format!("malformed request: the message does not decode: {e}"),
    }
}

/// Why a request body was not read.
enum Read {
    /// The stream failed (the client reset it, or the connection broke).
    Stream(Status),
    /// The body is not one acceptable message.
    Refused(BodyError),
}

/// The request message, read while returning flow-control credit as it arrives.
async fn read_message(mut body: RecvStream, limit: usize) -> Result<Bytes, Read> {
    let mut message = UnaryBody::new(limit);
    while let Some(chunk) = body.data().await {
        let chunk =
            chunk.map_err(|e| Read::Stream(Status::cancelled(format!("request stream: {e}"))))?;
        let _ = body.flow_control().release_capacity(chunk.len());
        message.push(&chunk).map_err(Read::Refused)?;
    }
    message.finish().map_err(Read::Refused)
}

/// What the authenticators see of a call.
fn context(peer: &Peer, headers: &http::HeaderMap) -> CallerContext {
    let bearer_token = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(|t| t.trim().to_owned());
    CallerContext {
        peer_addr: Some(peer.addr),
        peer_certs: peer.certs.clone(),
        bearer_token,
        legacy_gcp_token: None,
    }
}
