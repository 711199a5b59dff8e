//! A small HTTP(S) client for the Google endpoints the CA consults (JWKS, Compute API):
//! hyper with rustls (ring) and the system's roots; plain `http://` is allowed so that a
//! test stand-in or a local proxy can be named by URL.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

const MAX_BODY: usize = 1024 * 1024;

/// A response, fully read.
#[derive(Debug)]
pub struct Fetched {
    /// HTTP status.
    pub status: u16,
    /// `Cache-Control: max-age` in seconds, when present.
    pub max_age: Option<u64>,
    /// The body (at most 1 MiB).
    pub body: Bytes,
}

/// Shared client; cheap to clone.
#[derive(Clone)]
pub struct HttpClient {
    inner: Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>,
    timeout: Duration,
}

impl HttpClient {
    /// A client with the system's trust roots.
    pub fn new(timeout: Duration) -> Result<Self, String> {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(std::sync::Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .map_err(|e| format!("loading the system's TLS roots: {e}"))?
            .https_or_http()
            .enable_http1()
            .build();
        Ok(HttpClient {
            inner: Client::builder(TokioExecutor::new()).build(https),
            timeout,
        })
    }

    /// GET `url` with extra headers.
    pub async fn get(&self, url: &str, headers: &[(&str, &str)]) -> Result<Fetched, String> {
        let mut req = http::Request::get(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Empty::new()).map_err(|e| format!("{url}: {e}"))?;
        let fetch = async {
            let resp = self
                .inner
                .request(req)
                .await
                .map_err(|e| format!("{url}: {e}"))?;
            let status = resp.status().as_u16();
            let max_age = resp
                .headers()
                .get(http::header::CACHE_CONTROL)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| {
                    v.split(',')
                        .filter_map(|d| d.trim().strip_prefix("max-age="))
                        .find_map(|n| n.trim().parse().ok())
                });
            let body = Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| format!("{url}: reading the body: {e}"))?
                .to_bytes();
            Ok(Fetched {
                status,
                max_age,
                body,
            })
        };
        tokio::time::timeout(self.timeout, fetch)
            .await
            .map_err(|_| format!("{url}: no answer within {:?}", self.timeout))?
    }
}
