//! The load tool's gRPC client: HTTP/2 straight over TLS (the `h2` crate), with each
//! request message framed once, ahead of the run.
//!
//! The load tool shares the machine's cores with the server it measures, so every
//! microsecond it spends per request is taken from the server. A general-purpose client
//! (tonic's channel: a tower buffer task, codec and body adapters per call) costs
//! several times what the protocol needs. This one sends HEADERS and one DATA frame,
//! reads the response message and the `grpc-status` trailer, and walks the message's
//! framing to check that it carries a certificate chain.

use std::net::SocketAddr;

use bytes::Bytes;

/// One HTTP/2 connection to the CA, authenticated with a client certificate.
#[derive(Clone)]
pub struct Connection {
    send: h2::client::SendRequest<Bytes>,
    /// `https://istio-ca/istio.v1.auth.IstioCertificateService/CreateCertificate`,
    /// parsed once.
    uri: http::Uri,
}

impl Connection {
    /// Connects to `addr`, trusting `root_pem`, presenting `chain_pem` and `key_pem`.
    pub async fn open(
        addr: SocketAddr,
        root_pem: &str,
        chain_pem: &str,
        key_pem: &str,
    ) -> Result<Connection, String> {
        let send = e2e::h2_connect(addr, root_pem, Some((chain_pem, key_pem))).await?;
        let uri = format!(
            "https://istio-ca{}",
            istio_ca_proto::CREATE_CERTIFICATE_PATH
        )
        .parse()
        .map_err(|e: http::uri::InvalidUri| e.to_string())?;
        Ok(Connection { send, uri })
    }

    /// One `CreateCertificate` call with a pre-framed request; succeeds when the CA
    /// answers grpc-status 0 with a non-empty certificate chain.
    pub async fn create_certificate(&self, framed: Bytes) -> Result<(), String> {
        let request = http::Request::builder()
            .method("POST")
            .uri(self.uri.clone())
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .map_err(|e| e.to_string())?;
        let mut send = self.send.clone().ready().await.map_err(|e| e.to_string())?;
        let (response, mut stream) = send
            .send_request(request, false)
            .map_err(|e| e.to_string())?;
        stream.send_data(framed, true).map_err(|e| e.to_string())?;
        let response = response.await.map_err(|e| e.to_string())?;
        let (head, mut body) = response.into_parts();
        if head.status != http::StatusCode::OK {
            return Err(format!("HTTP {}", head.status));
        }
        // The answer usually arrives as one DATA frame: keep it without copying.
        let mut message = Bytes::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(|e| e.to_string())?;
            let _ = body.flow_control().release_capacity(chunk.len());
            message = if message.is_empty() {
                chunk
            } else {
                [message, chunk].concat().into()
            };
        }
        let trailers = body.trailers().await.map_err(|e| e.to_string())?;
        // A trailers-only answer (an error) carries grpc-status in the headers.
        let status = trailers
            .as_ref()
            .and_then(|t| t.get("grpc-status"))
            .or_else(|| head.headers.get("grpc-status"))
            .and_then(|v| v.to_str().ok())
            .unwrap_or("missing");
        if status != "0" {
            return Err(format!("grpc-status {status}"));
        }
        match chain_entries(&message) {
            Some(0) => Err("empty certificate chain".into()),
            Some(_) => Ok(()),
            None => Err("the answer is not an IstioCertificateResponse".into()),
        }
    }
}

/// How many `cert_chain` entries a framed `IstioCertificateResponse` holds, or `None`
/// when it is not one: an uncompressed gRPC frame of exactly the message's length,
/// whose fields are all non-empty `cert_chain` strings (field 1, length-delimited).
/// Walking the framing instead of decoding keeps the load tool from copying and
/// UTF-8-checking every certificate it is sent, as `prost` would.
fn chain_entries(framed: &[u8]) -> Option<usize> {
    let (&[compressed, a, b, c, d], mut rest) = framed.split_first_chunk::<5>()?;
    if compressed != 0 || u32::from_be_bytes([a, b, c, d]) as usize != rest.len() {
        return None;
    }
    let mut entries = 0;
    while let Some((&tag, after)) = rest.split_first() {
        if tag != 0x0a {
            return None;
        }
        let (len, after) = varint(after)?;
        if len == 0 || len > after.len() {
            return None;
        }
        rest = &after[len..];
        entries += 1;
    }
    Some(entries)
}

fn varint(bytes: &[u8]) -> Option<(usize, &[u8])> {
    let mut value = 0usize;
    for (i, &b) in bytes.iter().enumerate().take(4) {
        value |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, &bytes[i + 1..]));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use istio_ca_proto::IstioCertificateResponse;

    #[test]
    fn chain_entries_walks_the_response_framing() {
        let chain = |certs: Vec<String>| {
            ca_server::grpc::frame(&IstioCertificateResponse { cert_chain: certs })
        };
        let long = "x".repeat(1000);
        assert_eq!(
            chain_entries(&chain(vec![long.clone(), "root".into()])),
            Some(2)
        );
        assert_eq!(chain_entries(&chain(vec![])), Some(0));
        assert_eq!(
            chain_entries(&chain(vec!["".into()])),
            None,
            "an empty entry"
        );
        let good = chain(vec![long]);
        assert_eq!(chain_entries(&good[..good.len() - 1]), None, "short frame");
        let mut other_field = good.to_vec();
        other_field[5] = 0x12;
        assert_eq!(chain_entries(&other_field), None, "not field 1");
        assert_eq!(chain_entries(b"\x01\0\0\0\0"), None, "compressed");
    }
}
