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
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Method, Request, StatusCode};
use istio_ca_proto::{CsrRequest, IstioCertificateRequest};
use prost::Message;
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tonic::{Code, Status};

use super::service::CaService;
use super::wire::{self, BodyError, UnaryBody};
use crate::audit::Api;
use crate::authn::CallerContext;
use crate::issuance::Refusal;

/// Streams one client may have open at once.
const MAX_CONCURRENT_STREAMS: u32 = 200;
/// Flow-control windows: a whole request fits in the first window.
const WINDOW: u32 = 1024 * 1024;
/// Largest header block accepted.
const MAX_HEADER_LIST: u32 = 16 * 1024;
/// How long after the last possible deadline a draining connection may stay open.
const DRAIN_SLACK: Duration = Duration::from_secs(1);

/// What every stream of the server shares.
pub struct Calls {
    pub service: CaService,
    /// Deadline of a call when the client asks for none or a longer one.
    pub timeout: Duration,
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
    mut shutdown: watch::Receiver<bool>,
) where
    T: AsyncRead + AsyncWrite + Unpin,
{
    // One wait for the shutdown signal for the connection's life, not one per call.
    let stop = super::stopping(&mut shutdown);
    tokio::pin!(stop);
    let handshake = h2::server::Builder::new()
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .initial_window_size(WINDOW)
        .initial_connection_window_size(WINDOW)
        .max_header_list_size(MAX_HEADER_LIST)
        .handshake::<_, Bytes>(io);
    let mut conn = tokio::select! {
        r = tokio::time::timeout(super::HANDSHAKE_TIMEOUT, handshake) => match r {
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
    loop {
        // `accept` also drives the connection's I/O for the calls in flight.
        let next = tokio::select! {
            next = conn.accept() => next,
            () = &mut stop, if !draining => {
                draining = true;
                conn.graceful_shutdown();
                grace.as_mut().reset(tokio::time::Instant::now() + calls.timeout + DRAIN_SLACK);
                continue;
            }
            () = &mut grace, if draining => {
                tracing::debug!(peer = %addr, "connection still open after the drain; closing it");
                return;
            }
        };
        match next {
            Some(Ok((request, respond))) => {
                tokio::spawn(call(calls.clone(), peer.clone(), request, respond));
            }
            Some(Err(e)) => {
                tracing::debug!(peer = %addr, error = %e, "HTTP/2 connection ended");
                return;
            }
            None => return,
        }
    }
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
        BodyError::TooLarge(len) => Refusal {
            code: Code::OutOfRange,
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
