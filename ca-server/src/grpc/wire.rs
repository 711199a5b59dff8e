//! gRPC over HTTP/2, the parts a unary server needs: the `grpc-timeout` header, the
//! length-prefixed message of a request body, and the three shapes of an answer
//! (<https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-HTTP2.md>).

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use tonic::Status;

/// `content-type` of every gRPC answer.
const GRPC_CONTENT_TYPE: HeaderValue = HeaderValue::from_static("application/grpc");
/// Sent on every answer: the server takes uncompressed messages only.
const ACCEPT_ENCODING: (&str, HeaderValue) =
    ("grpc-accept-encoding", HeaderValue::from_static("identity"));

/// Bytes before each message: a compression flag and a big-endian length.
const PREFIX: usize = 5;

/// The deadline a client asked for in `grpc-timeout` (`<up to 8 digits><H|M|S|m|u|n>`).
/// `Err` for a malformed value, which the caller answers rather than ignores.
pub fn parse_timeout(headers: &HeaderMap) -> Result<Option<Duration>, String> {
    let Some(value) = headers.get("grpc-timeout") else {
        return Ok(None);
    };
    // The value is the client's: quoted, and cut short (a header may be kilobytes).
    let bad = || {
        let shown = String::from_utf8_lossy(value.as_bytes());
        format!(
            "malformed grpc-timeout header: {:?}",
            crate::audit::bounded(&shown, 32)
        )
    };
    let text = value.to_str().map_err(|_| bad())?;
    let Some(unit) = text.chars().last() else {
        return Err(bad());
    };
    let digits = &text[..text.len() - unit.len_utf8()];
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    Ok(Some(match unit {
        'H' => Duration::from_secs(n * 3600),
        'M' => Duration::from_secs(n * 60),
        'S' => Duration::from_secs(n),
        'm' => Duration::from_millis(n),
        'u' => Duration::from_micros(n),
        'n' => Duration::from_nanos(n),
        _ => return Err(bad()),
    }))
}

/// Why a request body does not hold exactly one acceptable message.
#[derive(Debug, PartialEq, Eq)]
pub enum BodyError {
    /// The message is longer than the limit (its declared length).
    TooLarge(usize),
    /// The message is compressed; this server accepts none.
    Compressed,
    /// Truncated, missing, or followed by more data.
    Malformed(&'static str),
}

/// Accumulates a unary request body, refusing it as soon as it cannot be acceptable.
pub struct UnaryBody {
    buf: BytesMut,
    limit: usize,
}

impl UnaryBody {
    /// A body whose message may be at most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        UnaryBody {
            buf: BytesMut::new(),
            limit,
        }
    }

    /// Adds a DATA frame's bytes.
    pub fn push(&mut self, chunk: &[u8]) -> Result<(), BodyError> {
        self.buf.extend_from_slice(chunk);
        if let Some(len) = self.declared()? {
            if len > self.limit {
                return Err(BodyError::TooLarge(len));
            }
            if self.buf.len() > PREFIX + len {
                return Err(BodyError::Malformed(
                    "more than one message on a unary call",
                ));
            }
        }
        Ok(())
    }

    /// The message, once the body has ended.
    pub fn finish(mut self) -> Result<Bytes, BodyError> {
        match self.declared()? {
            Some(len) if self.buf.len() == PREFIX + len => Ok(self.buf.split_off(PREFIX).freeze()),
            Some(_) => Err(BodyError::Malformed("the message is truncated")),
            None if self.buf.is_empty() => Err(BodyError::Malformed("no request message")),
            None => Err(BodyError::Malformed("the message is truncated")),
        }
    }

    fn declared(&self) -> Result<Option<usize>, BodyError> {
        let Some(prefix) = self.buf.get(..PREFIX) else {
            return Ok(None);
        };
        if prefix[0] != 0 {
            return Err(BodyError::Compressed);
        }
        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]);
        Ok(Some(len as usize))
    }
}

/// A message in gRPC framing (flag byte, length, protobuf): a response body here, a
/// request body in the load tool.
pub fn frame(message: &impl prost::Message) -> Bytes {
    let len = message.encoded_len();
    let mut buf = BytesMut::with_capacity(PREFIX + len);
    buf.put_u8(0);
    buf.put_u32(len as u32);
    // Cannot fail: the buffer has exactly the room `encoded_len` asks for.
    let _ = message.encode(&mut buf);
    buf.freeze()
}

/// The headers that open a successful answer.
pub fn ok_headers() -> Response<()> {
    let mut response = Response::new(());
    let headers = response.headers_mut();
    headers.insert(http::header::CONTENT_TYPE, GRPC_CONTENT_TYPE);
    headers.insert(ACCEPT_ENCODING.0, ACCEPT_ENCODING.1);
    response
}

/// The trailers that close a successful answer.
pub fn ok_trailers() -> HeaderMap {
    let mut trailers = HeaderMap::with_capacity(1);
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    trailers
}

/// A failed call: one HEADERS frame carrying the status ("Trailers-Only").
pub fn status_only(status: Status) -> Response<()> {
    let mut response = status.into_http();
    response
        .headers_mut()
        .insert(ACCEPT_ENCODING.0, ACCEPT_ENCODING.1);
    response
}

/// An HTTP-level refusal, for requests that are not gRPC at all.
pub fn http_error(code: StatusCode) -> Response<()> {
    let mut response = Response::new(());
    *response.status_mut() = code;
    response
}

/// Whether a request's `content-type` is gRPC's (`application/grpc`, optionally
/// `+proto` or another suffix).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct == "application/grpc"
                || ct.starts_with("application/grpc+")
                || ct.starts_with("application/grpc;")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(timeout: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("grpc-timeout", HeaderValue::from_str(timeout).unwrap());
        h
    }

    #[test]
    fn grpc_timeout_units() {
        for (text, want) in [
            ("1H", Duration::from_secs(3600)),
            ("2M", Duration::from_secs(120)),
            ("3S", Duration::from_secs(3)),
            ("250m", Duration::from_millis(250)),
            ("7u", Duration::from_micros(7)),
            ("99999999n", Duration::from_nanos(99_999_999)),
        ] {
            assert_eq!(parse_timeout(&headers(text)), Ok(Some(want)), "{text}");
        }
        assert_eq!(parse_timeout(&HeaderMap::new()), Ok(None));
        for bad in ["", "S", "10", "10s", "123456789S", "-1S", "1.5S", "１S"] {
            let mut h = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_str(bad) {
                h.insert("grpc-timeout", v);
                assert!(parse_timeout(&h).is_err(), "{bad:?} accepted");
            }
        }
    }

    fn framed(flag: u8, message: &[u8]) -> Vec<u8> {
        let mut v = vec![flag];
        v.extend_from_slice(&(message.len() as u32).to_be_bytes());
        v.extend_from_slice(message);
        v
    }

    #[test]
    fn one_message_in_any_number_of_frames() {
        let body = framed(0, b"hello");
        for split in 0..body.len() {
            let mut b = UnaryBody::new(64);
            b.push(&body[..split]).unwrap();
            b.push(&body[split..]).unwrap();
            assert_eq!(b.finish().unwrap(), Bytes::from_static(b"hello"), "{split}");
        }
        let mut empty = UnaryBody::new(64);
        empty.push(&framed(0, b"")).unwrap();
        assert_eq!(empty.finish().unwrap(), Bytes::new());
    }

    #[test]
    fn refuses_what_is_not_one_plain_message() {
        let mut b = UnaryBody::new(4);
        assert_eq!(b.push(&framed(0, b"hello")), Err(BodyError::TooLarge(5)));
        // Refused from the prefix alone, before the message arrives.
        let mut b = UnaryBody::new(4);
        assert_eq!(
            b.push(&framed(0, b"hello")[..5]),
            Err(BodyError::TooLarge(5))
        );
        let mut b = UnaryBody::new(64);
        assert_eq!(b.push(&framed(1, b"x")), Err(BodyError::Compressed));
        let mut b = UnaryBody::new(64);
        let mut two = framed(0, b"a");
        two.extend(framed(0, b"b"));
        assert!(matches!(b.push(&two), Err(BodyError::Malformed(_))));
        let mut b = UnaryBody::new(64);
        b.push(&framed(0, b"hello")[..7]).unwrap();
        assert!(matches!(b.finish(), Err(BodyError::Malformed(_))));
        let mut b = UnaryBody::new(64);
        b.push(&[0, 0]).unwrap();
        assert!(matches!(b.finish(), Err(BodyError::Malformed(_))));
        assert!(matches!(
            UnaryBody::new(64).finish(),
            Err(BodyError::Malformed(_))
        ));
    }

    #[test]
    fn framing_round_trips() {
        let msg = istio_ca_proto::IstioCertificateResponse {
            cert_chain: vec!["a".into(), "bc".into()],
        };
        let bytes = frame(&msg);
        let mut b = UnaryBody::new(1024);
        b.push(&bytes).unwrap();
        let decoded: istio_ca_proto::IstioCertificateResponse =
            prost::Message::decode(b.finish().unwrap()).unwrap();
        assert_eq!(decoded, msg);
    }

    #[test]
    fn content_types() {
        for (ct, ok) in [
            ("application/grpc", true),
            ("application/grpc+proto", true),
            ("application/grpc;charset=utf-8", true),
            ("application/grpcx", false),
            ("application/json", false),
        ] {
            let mut h = HeaderMap::new();
            h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static(ct));
            assert_eq!(is_grpc(&h), ok, "{ct}");
        }
        assert!(!is_grpc(&HeaderMap::new()));
    }
}
