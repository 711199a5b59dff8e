//! The fuzz targets' bodies: each takes arbitrary bytes, feeds them to one parser that
//! reads untrusted input, and checks what must hold whatever the input (no panic, and
//! the properties named on each). `fuzz/` runs them under libFuzzer (`scripts/fuzz.sh`);
//! `tests/corpora.rs` replays the committed corpora through them with the test suite.
#![forbid(unsafe_code)]

use ca_server::authn::gce::{jwks, jwt};
use ca_server::grpc::wire;

/// A target's body.
pub type Target = fn(&[u8]);

/// Every target, by the name of its `fuzz/fuzz_targets/<name>.rs` and corpus directory.
pub const TARGETS: &[(&str, Target)] = &[
    ("csr", csr),
    ("certificate", certificate),
    ("pem", pem),
    ("spiffe_id", spiffe_id),
    ("jwt", jwt),
    ("jwks", jwks),
    ("grpc_body", grpc_body),
    ("grpc_timeout", grpc_timeout),
    ("admin_request", admin_request),
];

/// A CSR as a caller sends it (PEM or DER): parse, classify the key, check the
/// self-signature.
pub fn csr(data: &[u8]) {
    let _ = ca_core::csr::verify(data);
}

/// A certificate through both readers: x509-parser (`x509::inspect`) and the re-check's
/// own strict DER reader (`reread::read`). When both accept it, they must agree on every
/// fact, or the re-check would be checking something other than what verifiers read.
pub fn certificate(data: &[u8]) {
    let inspected = ca_core::x509::inspect(data);
    let reread = ca_core::reread::read(data);
    if let (Ok(a), Ok(b)) = (&inspected, &reread) {
        assert_eq!(a, b, "the two certificate readers disagree");
    }
}

/// PEM as node-identity and the plugged-in CA read it.
pub fn pem(data: &[u8]) {
    if let Ok(certs) = ca_core::pem::parse_certificates(data) {
        for c in certs {
            // What parsed as PEM is written back identically.
            let again = ca_core::pem::parse_certificates(ca_core::pem::certificate(&c).as_bytes())
                .expect("re-reading a certificate PEM we wrote");
            assert_eq!(again.len(), 1);
            assert_eq!(again[0].as_ref(), c.as_ref());
        }
    }
    let _ = ca_core::pem::parse_csr(data);
}

/// A SPIFFE ID: what parses prints back as itself and parses to the same parts.
pub fn spiffe_id(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = ca_core::SpiffeId::parse(text) {
        let again = ca_core::SpiffeId::parse(id.as_str()).expect("a parsed ID parses again");
        assert_eq!(again.as_str(), id.as_str());
        assert_eq!(again.trust_domain(), id.trust_domain());
        assert_eq!(again.namespace(), id.namespace());
        assert_eq!(again.service_account(), id.service_account());
    }
}

/// A GCE identity token, before any signature check.
pub fn jwt(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = jwt::unverified_issuer(text);
    if let Ok(parsed) = jwt::parse(text) {
        let _ = parsed.claims.compute_engine();
    }
}

/// A JWK set as Google's endpoint serves it.
pub fn jwks(data: &[u8]) {
    let _ = jwks::parse(data);
}

/// A unary gRPC request body split into DATA frames where the input says: the first
/// byte picks the message limit, each following byte pair the next frame's length. A
/// body that is accepted is exactly one uncompressed message within the limit.
pub fn grpc_body(data: &[u8]) {
    let Some((&limit_byte, rest)) = data.split_first() else {
        return;
    };
    let limit = usize::from(limit_byte) * 16;
    let mut body = wire::UnaryBody::new(limit);
    let mut rest = rest;
    let mut sent = Vec::new();
    while rest.len() >= 2 {
        let n = usize::from(u16::from_be_bytes([rest[0], rest[1]])) % 512;
        let chunk = &rest[2..(2 + n).min(rest.len())];
        rest = &rest[(2 + n).min(rest.len())..];
        sent.extend_from_slice(chunk);
        if body.push(chunk).is_err() {
            return;
        }
    }
    if let Ok(message) = body.finish() {
        assert!(message.len() <= limit);
        assert_eq!(sent[0], 0, "uncompressed");
        assert_eq!(&sent[5..], &message[..], "the one message, whole");
    }
}

/// The `grpc-timeout` header, any bytes a peer can put in a header value.
pub fn grpc_timeout(data: &[u8]) {
    let Ok(value) = http::HeaderValue::from_bytes(data) else {
        return;
    };
    let mut headers = http::HeaderMap::new();
    headers.insert("grpc-timeout", value);
    let _ = wire::parse_timeout(&headers);
}

/// One line of the admin protocol: what parses serialises and parses again.
pub fn admin_request(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(req) = serde_json::from_str::<ca_server::admin::AdminRequest>(text) {
        let line = serde_json::to_string(&req).expect("serialising a request");
        serde_json::from_str::<ca_server::admin::AdminRequest>(&line)
            .expect("a serialised request parses again");
    }
}
