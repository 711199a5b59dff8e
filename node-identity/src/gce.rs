//! The GCE credential: an instance identity token from the metadata server
//! (`Metadata-Flavor: Google`, `format=full`, the CA's audience). It proves the
//! instance; the CA maps the instance to a mesh identity.

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use time::OffsetDateTime;

use crate::credential::{Credential, CredentialSource, Found, Proof};

/// Where the metadata server is and what to ask it.
#[derive(Clone, Debug)]
pub struct GceSettings {
    /// `HOST[:PORT]` of the metadata server (`metadata.google.internal`).
    pub metadata_host: String,
    /// Audience of the identity token (what the CA expects).
    pub audience: String,
    /// Trust bundle for the CA's serving certificate (no bootstrap bundle on GCE).
    pub root_cert: PathBuf,
}

async fn get(host: &str, path_and_query: &str, timeout: Duration) -> Result<(u16, String), String> {
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let url = format!("http://{host}{path_and_query}");
    let req = http::Request::get(&url)
        .header("Metadata-Flavor", "Google")
        .body(Empty::new())
        .map_err(|e| format!("{url}: {e}"))?;
    let fetch = async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        let status = resp.status().as_u16();
        let flavor_ok = resp
            .headers()
            .get("metadata-flavor")
            .and_then(|v| v.to_str().ok())
            == Some("Google");
        let body = Limited::new(resp.into_body(), 64 * 1024)
            .collect()
            .await
            .map_err(|e| format!("{url}: {e}"))?
            .to_bytes();
        if status == 200 && !flavor_ok {
            return Err(format!(
                "{url}: the answer lacks Metadata-Flavor: Google (not a metadata server)"
            ));
        }
        Ok((status, String::from_utf8_lossy(&body).trim().to_owned()))
    };
    tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| format!("{url}: no answer within {timeout:?}"))?
}

/// Whether a GCE metadata server answers at `host` (for `--platform auto`).
pub async fn detect(host: &str) -> bool {
    matches!(
        get(host, "/computeMetadata/v1/", Duration::from_secs(1)).await,
        Ok((200, _))
    )
}

impl GceSettings {
    /// Fetches a fresh identity token and wraps it as a credential.
    pub async fn credential(&self) -> Found {
        let roots_pem = match std::fs::read_to_string(&self.root_cert) {
            Ok(r) => r,
            Err(e) => {
                return Found::Unusable(format!(
                    "no trust bundle for the CA at {} ({e}): copy the mesh's root-cert.pem there",
                    self.root_cert.display()
                ));
            }
        };
        let path = format!(
            "/computeMetadata/v1/instance/service-accounts/default/identity?audience={}&format=full",
            self.audience
        );
        let token = match get(&self.metadata_host, &path, Duration::from_secs(5)).await {
            Ok((200, token)) => token,
            Ok((status, body)) => {
                return Found::Unavailable(format!(
                    "the metadata server answered HTTP {status}: {body}"
                ));
            }
            Err(e) => {
                return Found::Unavailable(format!(
                    "no identity token from the metadata server: {e}"
                ));
            }
        };
        let (not_before, not_after) =
            token_times(&token).unwrap_or((OffsetDateTime::now_utc(), OffsetDateTime::now_utc()));
        Found::Credential(Box::new(Credential {
            source: "gce-token",
            proof: Proof::Bearer { token },
            identity: None,
            serial: "-".into(),
            not_before,
            not_after,
            roots_pem,
        }))
    }
}

/// `iat` and `exp` of a token, read without verification (the CA verifies it).
fn token_times(token: &str) -> Option<(OffsetDateTime, OffsetDateTime)> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let at = |k: &str| OffsetDateTime::from_unix_timestamp(v.get(k)?.as_i64()?).ok();
    Some((at("iat")?, at("exp")?))
}

impl CredentialSource for GceSettings {
    fn name(&self) -> &'static str {
        "GCE token"
    }

    fn load<'a>(
        &'a self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Found> + Send + 'a>> {
        Box::pin(self.credential())
    }
}
