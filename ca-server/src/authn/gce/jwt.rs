//! Google instance identity tokens: RS256 JWTs, verified with ring directly. Only
//! RS256 is accepted, so `none`, HS256-with-the-public-key and every other algorithm
//! confusion are refused before any key is looked at.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;

/// The header fields we use.
#[derive(Debug, Deserialize)]
pub struct Header {
    /// Must be `RS256`.
    pub alg: String,
    /// Key id in Google's JWKS.
    pub kid: Option<String>,
}

/// `google.compute_engine` claims (`format=full`).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct ComputeEngine {
    /// Project id.
    pub project_id: String,
    /// Project number.
    #[serde(default)]
    pub project_number: serde_json::Value,
    /// Zone, e.g. `us-central1-a`.
    pub zone: String,
    /// Numeric instance id, as a string.
    pub instance_id: String,
    /// Instance name.
    pub instance_name: String,
    /// Unix seconds.
    pub instance_creation_timestamp: i64,
}

#[derive(Debug, Deserialize)]
struct Google {
    compute_engine: Option<ComputeEngine>,
}

/// The claims we check.
#[derive(Debug, Deserialize)]
pub struct Claims {
    /// Issuer.
    pub iss: String,
    /// Audience.
    pub aud: String,
    /// Expiry, unix seconds.
    pub exp: i64,
    /// Issued at, unix seconds.
    pub iat: i64,
    /// Subject (the instance service account's unique id).
    #[serde(default)]
    pub sub: Option<String>,
    /// The instance service account's email.
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    google: Option<Google>,
}

impl Claims {
    /// The instance claims, when the token came from a GCE instance with `format=full`.
    pub fn compute_engine(&self) -> Option<&ComputeEngine> {
        self.google.as_ref()?.compute_engine.as_ref()
    }
}

/// A token split and decoded, signature not yet checked.
pub struct Parsed {
    /// Header.
    pub header: Header,
    /// Claims.
    pub claims: Claims,
    signing_input: String,
    signature: Vec<u8>,
}

/// Splits and decodes a compact JWT.
pub fn parse(token: &str) -> Result<Parsed, String> {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("not a compact JWT (three dot-separated parts)".into());
    };
    let decode = |what: &str, part: &str| {
        URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|e| format!("{what} is not base64url: {e}"))
    };
    let header: Header = serde_json::from_slice(&decode("header", h)?)
        .map_err(|e| format!("header is not the expected JSON: {e}"))?;
    let claims: Claims = serde_json::from_slice(&decode("payload", p)?)
        .map_err(|e| format!("claims are not the expected JSON: {e}"))?;
    Ok(Parsed {
        header,
        claims,
        signing_input: format!("{h}.{p}"),
        signature: decode("signature", s)?,
    })
}

/// The `iss` of a token, without verifying anything (to route it to an authenticator).
pub fn unverified_issuer(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let v: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()?;
    v.get("iss")?.as_str().map(str::to_owned)
}

/// An RSA public key from a JWK.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RsaKey {
    n: Vec<u8>,
    e: Vec<u8>,
}

impl RsaKey {
    /// From the base64url `n` and `e` of a JWK.
    pub fn from_jwk(n: &str, e: &str) -> Result<Self, String> {
        Ok(RsaKey {
            n: URL_SAFE_NO_PAD
                .decode(n)
                .map_err(|err| format!("JWK n: {err}"))?,
            e: URL_SAFE_NO_PAD
                .decode(e)
                .map_err(|err| format!("JWK e: {err}"))?,
        })
    }
}

impl Parsed {
    /// Checks the RS256 signature with `key`.
    pub fn verify_signature(&self, key: &RsaKey) -> bool {
        ring::signature::RsaPublicKeyComponents {
            n: &key.n,
            e: &key.e,
        }
        .verify(
            &ring::signature::RSA_PKCS1_2048_8192_SHA256,
            self.signing_input.as_bytes(),
            &self.signature,
        )
        .is_ok()
    }
}
