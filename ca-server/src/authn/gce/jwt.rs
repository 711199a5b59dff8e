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
    let claims = crate::authn::unverified_claims(token)?;
    claims.get("iss")?.as_str().map(str::to_owned)
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

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = r#"{"alg":"RS256","kid":"k1"}"#;
    const CLAIMS: &str = r#"{"iss":"https://accounts.google.com","aud":"a","exp":2,"iat":1}"#;

    fn b64(text: &str) -> String {
        URL_SAFE_NO_PAD.encode(text)
    }

    fn token(header: &str, claims: &str, signature: &str) -> String {
        format!("{}.{}.{signature}", b64(header), b64(claims))
    }

    #[test]
    fn each_malformed_token_is_refused_with_its_reason() {
        let sig = b64("signature");
        let cases = [
            (String::new(), "three dot-separated parts"),
            ("a.b".to_owned(), "three dot-separated parts"),
            (
                format!("{}.x", token(HEADER, CLAIMS, &sig)),
                "three dot-separated parts",
            ),
            (
                format!("!!.{}.{sig}", b64(CLAIMS)),
                "header is not base64url",
            ),
            (token("[]", CLAIMS, &sig), "header is not the expected JSON"),
            (
                token(r#"{"kid":"k1"}"#, CLAIMS, &sig),
                "header is not the expected JSON",
            ),
            (
                format!("{}.%%.{sig}", b64(HEADER)),
                "payload is not base64url",
            ),
            (
                token(HEADER, "{}", &sig),
                "claims are not the expected JSON",
            ),
            (
                token(
                    HEADER,
                    r#"{"iss":"x","aud":"a","exp":"soon","iat":1}"#,
                    &sig,
                ),
                "claims are not the expected JSON",
            ),
            (token(HEADER, CLAIMS, "a+b/"), "signature is not base64url"),
        ];
        for (t, reason) in cases {
            match parse(&t) {
                Ok(_) => panic!("{t:?} was parsed"),
                Err(e) => assert!(e.contains(reason), "{t:?}: {e:?}, not {reason:?}"),
            }
        }
    }

    #[test]
    fn a_well_formed_token_yields_its_header_and_claims() {
        let claims = r#"{"iss":"https://accounts.google.com","aud":"grpc://ca","exp":20,"iat":10,
            "sub":"1234","google":{"compute_engine":{"project_id":"p","zone":"z",
            "instance_id":"99","instance_name":"vm","instance_creation_timestamp":5}}}"#;
        let parsed = parse(&token(HEADER, claims, &b64("signature"))).unwrap();
        assert_eq!(parsed.header.alg, "RS256");
        assert_eq!(parsed.header.kid.as_deref(), Some("k1"));
        assert_eq!((parsed.claims.iat, parsed.claims.exp), (10, 20));
        assert_eq!(parsed.claims.sub.as_deref(), Some("1234"));
        assert_eq!(parsed.claims.email, None);
        let vm = parsed.claims.compute_engine().unwrap();
        assert_eq!((vm.instance_name.as_str(), vm.zone.as_str()), ("vm", "z"));
        // A token without `format=full` has no instance claims.
        let plain = parse(&token(HEADER, CLAIMS, &b64("s"))).unwrap();
        assert!(plain.claims.compute_engine().is_none());
        // Any key that did not sign it is refused.
        let key = RsaKey::from_jwk(&b64("not a modulus"), "AQAB").unwrap();
        assert!(!parsed.verify_signature(&key));
        assert!(RsaKey::from_jwk("a+b", "AQAB").is_err());
    }

    #[test]
    fn unverified_reads_give_nothing_for_anything_but_a_jwt() {
        let t = token(HEADER, CLAIMS, &b64("s"));
        assert_eq!(
            unverified_issuer(&t).as_deref(),
            Some("https://accounts.google.com")
        );
        for not_a_jwt in ["", "x", "a.!!.c", &format!("a.{}.c", b64("[1]"))] {
            assert_eq!(unverified_issuer(not_a_jwt), None, "{not_a_jwt:?}");
        }
        assert_eq!(
            crate::authn::unverified_claims(&t).unwrap()["exp"].as_i64(),
            Some(2)
        );
    }
}
