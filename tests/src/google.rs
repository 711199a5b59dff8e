//! A stand-in for the Google endpoints the CA and the agent talk to, on 127.0.0.1, with
//! their real wire formats:
//! - the metadata server's identity-token and email endpoints (`Metadata-Flavor: Google`),
//! - the JWKS endpoint (`/oauth2/v3/certs`, with `Cache-Control: max-age`),
//! - an OAuth2 token endpoint that a service-account key JSON's `token_uri` points to,
//! - the Compute API's instance GET, which requires the bearer access token.
//!
//! The test controls the signing keys (and can rotate them), the instance, and faults.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use der::{Decode, Reader, SliceReader, asn1::UintRef};
use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use serde_json::{Value, json};

/// The access token the OAuth2 stand-in hands out and the Compute stand-in requires.
pub const ACCESS_TOKEN: &str = "ya29.stand-in-access-token";

/// An RSA signing key with its JWK parameters.
pub struct SigningKey {
    /// Key id.
    pub kid: String,
    pair: RsaKeyPair,
    n: String,
    e: String,
    /// PKCS#8 PEM (for a service-account key file).
    pub pem: String,
    /// SubjectPublicKeyInfo PEM (to forge HS256 tokens keyed with the public key).
    pub public_pem: String,
}

impl SigningKey {
    /// A fresh RSA-2048 key.
    pub fn generate(kid: &str) -> SigningKey {
        let key = ca_core::keys::KeyAlgorithm::Rsa(2048).generate().unwrap();
        let pair = RsaKeyPair::from_pkcs8(&key.serialize_der()).unwrap();
        let mut r = SliceReader::new(key.public_key_raw()).unwrap();
        let (n, e) = r
            .sequence(|r| {
                let n = UintRef::decode(r)?;
                let e = UintRef::decode(r)?;
                Ok::<_, der::Error>((n.as_bytes().to_vec(), e.as_bytes().to_vec()))
            })
            .unwrap();
        SigningKey {
            kid: kid.into(),
            pair,
            n: B64.encode(n),
            e: B64.encode(e),
            pem: key.serialize_pem(),
            public_pem: key.public_key_pem(),
        }
    }

    /// An RS256 JWT with this key.
    pub fn sign(&self, header: &Value, claims: &Value) -> String {
        let input = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let mut sig = vec![0u8; self.pair.public().modulus_len()];
        self.pair
            .sign(
                &RSA_PKCS1_SHA256,
                &ring::rand::SystemRandom::new(),
                input.as_bytes(),
                &mut sig,
            )
            .unwrap();
        format!("{input}.{}", B64.encode(sig))
    }

    fn jwk(&self) -> Value {
        json!({"kty": "RSA", "alg": "RS256", "use": "sig", "kid": self.kid, "n": self.n, "e": self.e})
    }
}

/// An HS256 JWT keyed with `secret` (the classic algorithm-confusion forgery).
pub fn sign_hs256(secret: &[u8], header: &Value, claims: &Value) -> String {
    let input = format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string())
    );
    let tag = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret),
        input.as_bytes(),
    );
    format!("{input}.{}", B64.encode(tag.as_ref()))
}

/// The instance the metadata server speaks for, and the Compute API knows.
#[derive(Clone, Debug)]
pub struct Instance {
    /// Project id.
    pub project: String,
    /// Zone.
    pub zone: String,
    /// Name.
    pub name: String,
    /// Numeric id.
    pub id: String,
    /// Unix seconds.
    pub created: i64,
    /// Compute status.
    pub status: String,
    /// Labels.
    pub labels: HashMap<String, String>,
    /// Service-account email.
    pub email: String,
}

impl Instance {
    /// A running instance created an hour ago.
    pub fn running(project: &str, zone: &str, name: &str) -> Instance {
        Instance {
            project: project.into(),
            zone: zone.into(),
            name: name.into(),
            id: "4620390121736400897".into(),
            created: time::OffsetDateTime::now_utc().unix_timestamp() - 3600,
            status: "RUNNING".into(),
            labels: HashMap::new(),
            email: format!("vm-sa@{project}.iam.gserviceaccount.com"),
        }
    }

    /// The claims of a `format=full` identity token for this instance.
    pub fn claims(&self, audience: &str) -> Value {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        json!({
            "iss": "https://accounts.google.com",
            "aud": audience,
            "azp": "117890123456789012345",
            "sub": "117890123456789012345",
            "email": self.email,
            "email_verified": true,
            "iat": now,
            "exp": now + 3600,
            "google": {"compute_engine": {
                "project_id": self.project,
                "project_number": 123456789012u64,
                "zone": self.zone,
                "instance_id": self.id,
                "instance_name": self.name,
                "instance_creation_timestamp": self.created,
            }}
        })
    }
}

/// Counters and switches the test reads and flips.
#[derive(Default)]
pub struct Counters {
    /// JWKS GETs received (including those answered with a failure).
    pub jwks_fetches: u64,
    /// Compute instance GETs answered.
    pub compute_lookups: u64,
    /// OAuth2 token requests.
    pub token_requests: u64,
    /// Identity tokens handed out by the metadata server.
    pub identity_tokens: u64,
}

struct Inner {
    published: Vec<Arc<SigningKey>>,
    signing: Arc<SigningKey>,
    instance: Instance,
    jwks_down: bool,
    /// How long the JWKS endpoint takes to answer.
    jwks_delay: Option<std::time::Duration>,
    metadata_down: bool,
    jwks_max_age: u64,
    counters: Counters,
}

/// The running stand-in.
#[derive(Clone)]
pub struct Google {
    /// Its address; base URLs are `http://{addr}/...`.
    pub addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
}

type Shared = Arc<Mutex<Inner>>;

impl Google {
    /// Starts with one signing key and `instance`.
    pub async fn start(instance: Instance) -> Google {
        let key = Arc::new(SigningKey::generate("key-1"));
        let inner = Arc::new(Mutex::new(Inner {
            published: vec![key.clone()],
            signing: key,
            instance,
            jwks_down: false,
            jwks_delay: None,
            metadata_down: false,
            jwks_max_age: 3600,
            counters: Counters::default(),
        }));
        let app = Router::new()
            .route("/oauth2/v3/certs", get(jwks))
            .route("/token", post(token))
            .route(
                "/compute/v1/projects/{project}/zones/{zone}/instances/{name}",
                get(instance_get),
            )
            .route(
                "/computeMetadata/v1/instance/service-accounts/default/identity",
                get(identity),
            )
            .route(
                "/computeMetadata/v1/instance/service-accounts/default/email",
                get(email),
            )
            .route("/computeMetadata/v1/", get(metadata_root))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Google { addr, inner }
    }

    /// `http://addr/oauth2/v3/certs`.
    pub fn jwks_url(&self) -> String {
        format!("http://{}/oauth2/v3/certs", self.addr)
    }

    /// `http://addr/compute/v1`.
    pub fn compute_url(&self) -> String {
        format!("http://{}/compute/v1", self.addr)
    }

    /// Writes a service-account key JSON whose `token_uri` is this stand-in.
    pub fn write_service_account_key(&self, path: &std::path::Path) {
        let key = SigningKey::generate("sa-key");
        let json = json!({
            "type": "service_account",
            "project_id": "ca-project",
            "private_key_id": "sa-key",
            "private_key": key.pem,
            "client_email": "istio-ca@ca-project.iam.gserviceaccount.com",
            "client_id": "1",
            "token_uri": format!("http://{}/token", self.addr),
        });
        std::fs::write(path, json.to_string()).unwrap();
    }

    /// A token for the current instance, signed with the current key.
    pub fn token(&self, audience: &str) -> String {
        let g = self.inner.lock().unwrap();
        let claims = g.instance.claims(audience);
        g.signing.sign(
            &json!({"alg": "RS256", "kid": g.signing.kid, "typ": "JWT"}),
            &claims,
        )
    }

    /// A token with `claims` (and optionally another header), signed with the current key.
    pub fn sign(&self, header: Option<Value>, claims: &Value) -> String {
        let g = self.inner.lock().unwrap();
        let header =
            header.unwrap_or_else(|| json!({"alg": "RS256", "kid": g.signing.kid, "typ": "JWT"}));
        g.signing.sign(&header, claims)
    }

    /// The current signing key's public PEM.
    pub fn public_pem(&self) -> String {
        self.inner.lock().unwrap().signing.public_pem.clone()
    }

    /// Rotates: a new key signs from now on and is published next to the old one.
    pub fn rotate(&self) -> String {
        let mut g = self.inner.lock().unwrap();
        let kid = format!("key-{}", g.published.len() + 1);
        let key = Arc::new(SigningKey::generate(&kid));
        g.published.push(key.clone());
        g.signing = key;
        kid
    }

    /// Changes the instance.
    pub fn set_instance(&self, f: impl FnOnce(&mut Instance)) {
        f(&mut self.inner.lock().unwrap().instance);
    }

    /// The instance.
    pub fn instance(&self) -> Instance {
        self.inner.lock().unwrap().instance.clone()
    }

    /// JWKS endpoint answers 503 while down.
    pub fn set_jwks_down(&self, down: bool) {
        self.inner.lock().unwrap().jwks_down = down;
    }

    /// The JWKS endpoint takes `delay` to answer (None: at once).
    pub fn set_jwks_delay(&self, delay: Option<std::time::Duration>) {
        self.inner.lock().unwrap().jwks_delay = delay;
    }

    /// Metadata server answers 503 while down.
    pub fn set_metadata_down(&self, down: bool) {
        self.inner.lock().unwrap().metadata_down = down;
    }

    /// Reads the counters.
    pub fn counters<T>(&self, f: impl FnOnce(&Counters) -> T) -> T {
        f(&self.inner.lock().unwrap().counters)
    }
}

fn json_body(v: Value) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json; charset=UTF-8")],
        v.to_string(),
    )
        .into_response()
}

async fn jwks(State(s): State<Shared>) -> Response {
    let delay = {
        let mut g = s.lock().unwrap();
        g.counters.jwks_fetches += 1;
        g.jwks_delay
    };
    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }
    let g = s.lock().unwrap();
    if g.jwks_down {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let keys: Vec<Value> = g.published.iter().map(|k| k.jwk()).collect();
    (
        [(
            header::CACHE_CONTROL,
            format!(
                "public, max-age={}, must-revalidate, no-transform",
                g.jwks_max_age
            ),
        )],
        json_body(json!({ "keys": keys })),
    )
        .into_response()
}

async fn token(State(s): State<Shared>, body: String) -> Response {
    s.lock().unwrap().counters.token_requests += 1;
    if !body.contains("grant_type=urn") || !body.contains("assertion=") {
        return (StatusCode::BAD_REQUEST, "expected a JWT-bearer grant").into_response();
    }
    json_body(json!({"access_token": ACCESS_TOKEN, "expires_in": 3600, "token_type": "Bearer"}))
        .into_response()
}

async fn instance_get(
    State(s): State<Shared>,
    Path((project, zone, name)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let mut g = s.lock().unwrap();
    g.counters.compute_lookups += 1;
    if headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        != Some(&format!("Bearer {ACCESS_TOKEN}"))
    {
        return (StatusCode::UNAUTHORIZED, "missing or wrong access token").into_response();
    }
    let i = &g.instance;
    if (project.as_str(), zone.as_str(), name.as_str())
        != (i.project.as_str(), i.zone.as_str(), i.name.as_str())
    {
        return (
            StatusCode::NOT_FOUND,
            json_body(json!({"error": {"code": 404, "message": "not found"}})),
        )
            .into_response();
    }
    let created = time::OffsetDateTime::from_unix_timestamp(i.created)
        .unwrap()
        .to_offset(time::macros::offset!(-8))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    json_body(json!({
        "kind": "compute#instance",
        "id": i.id,
        "name": i.name,
        "status": i.status,
        "creationTimestamp": created,
        "zone": format!("https://www.googleapis.com/compute/v1/projects/{}/zones/{}", i.project, i.zone),
        "labels": i.labels,
        "serviceAccounts": [{"email": i.email, "scopes": ["https://www.googleapis.com/auth/cloud-platform"]}],
    }))
    .into_response()
}

fn metadata_guard(g: &Inner, headers: &HeaderMap) -> Option<Response> {
    if g.metadata_down {
        return Some(StatusCode::SERVICE_UNAVAILABLE.into_response());
    }
    if headers.get("metadata-flavor").and_then(|v| v.to_str().ok()) != Some("Google") {
        return Some(
            (
                StatusCode::FORBIDDEN,
                "Missing Metadata-Flavor:Google header.",
            )
                .into_response(),
        );
    }
    None
}

async fn identity(
    State(s): State<Shared>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let mut g = s.lock().unwrap();
    if let Some(r) = metadata_guard(&g, &headers) {
        return r;
    }
    let Some(aud) = q.get("audience") else {
        return (
            StatusCode::BAD_REQUEST,
            "non-empty audience parameter required",
        )
            .into_response();
    };
    let mut claims = g.instance.claims(aud);
    if q.get("format").map(String::as_str) != Some("full")
        && let Some(obj) = claims.as_object_mut()
    {
        obj.remove("google");
    }
    g.counters.identity_tokens += 1;
    let token = g.signing.sign(
        &json!({"alg": "RS256", "kid": g.signing.kid, "typ": "JWT"}),
        &claims,
    );
    ([("metadata-flavor", "Google")], token).into_response()
}

async fn email(State(s): State<Shared>, headers: HeaderMap) -> Response {
    let g = s.lock().unwrap();
    if let Some(r) = metadata_guard(&g, &headers) {
        return r;
    }
    ([("metadata-flavor", "Google")], g.instance.email.clone()).into_response()
}

async fn metadata_root(State(s): State<Shared>, headers: HeaderMap) -> Response {
    let g = s.lock().unwrap();
    if let Some(r) = metadata_guard(&g, &headers) {
        return r;
    }
    ([("metadata-flavor", "Google")], "instance/\nproject/\n").into_response()
}
