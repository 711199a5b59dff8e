//! A stand-in for the Kubernetes API server on 127.0.0.1, speaking its real HTTP/JSON:
//! today the TokenReview endpoint, backed by a token table the test controls. The CA
//! reaches it through the normal `kube::Client`, configured by a kubeconfig whose only
//! difference from a real one is the server URL.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use serde_json::{Value, json};

/// Who a token belongs to.
#[derive(Clone, Debug)]
pub struct TokenOwner {
    /// `system:serviceaccount:<ns>:<sa>` or a user name.
    pub username: String,
    /// Groups.
    pub groups: Vec<String>,
    /// Audiences the token is valid for.
    pub audiences: Vec<String>,
}

impl TokenOwner {
    /// A service account's bound token for `audiences`.
    pub fn service_account(ns: &str, sa: &str, audiences: &[&str]) -> TokenOwner {
        TokenOwner {
            username: format!("system:serviceaccount:{ns}:{sa}"),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{ns}"),
                "system:authenticated".into(),
            ],
            audiences: audiences.iter().map(|a| a.to_string()).collect(),
        }
    }
}

#[derive(Default)]
struct Inner {
    tokens: HashMap<String, TokenOwner>,
    reviews: u64,
}

/// The running stand-in.
#[derive(Clone)]
pub struct KubeApi {
    /// Its address.
    pub addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
}

/// A JWT-shaped token (unsigned: the API server, not the CA, decides what it means)
/// with the claims a projected service-account token carries.
pub fn make_token(ns: &str, sa: &str, seed: &str) -> String {
    let b = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let claims = json!({
        "aud": ["istio-ca"], "exp": now + 3600, "iat": now,
        "iss": "https://kubernetes.default.svc.cluster.local",
        "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa, "uid": seed}},
        "sub": format!("system:serviceaccount:{ns}:{sa}"),
    });
    format!(
        "{}.{}.{}",
        b.encode(r#"{"alg":"RS256","kid":"k"}"#),
        b.encode(claims.to_string()),
        b.encode(seed)
    )
}

impl KubeApi {
    /// Starts an empty API server.
    pub async fn start() -> KubeApi {
        let inner = Arc::new(Mutex::new(Inner::default()));
        let app = Router::new()
            .route(
                "/apis/authentication.k8s.io/v1/tokenreviews",
                post(token_review),
            )
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        KubeApi { addr, inner }
    }

    /// Registers a token.
    pub fn add_token(&self, token: &str, owner: TokenOwner) {
        self.inner
            .lock()
            .unwrap()
            .tokens
            .insert(token.to_owned(), owner);
    }

    /// TokenReviews answered so far.
    pub fn reviews(&self) -> u64 {
        self.inner.lock().unwrap().reviews
    }

    /// Writes a kubeconfig pointing at this server.
    pub fn write_kubeconfig(&self, path: &Path) {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster:\n    server: http://{}\n\
             contexts:\n- name: stand-in\n  context:\n    cluster: stand-in\n    user: stand-in\n\
             current-context: stand-in\nusers:\n- name: stand-in\n  user: {{}}\n",
            self.addr
        );
        std::fs::write(path, text).unwrap();
    }
}

fn json_body(status: StatusCode, v: Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

async fn token_review(State(s): State<Arc<Mutex<Inner>>>, body: String) -> Response {
    let Ok(review) = serde_json::from_str::<Value>(&body) else {
        return json_body(
            StatusCode::BAD_REQUEST,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "BadRequest", "code": 400}),
        );
    };
    let mut g = s.lock().unwrap();
    g.reviews += 1;
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    let wanted: Vec<String> = review["spec"]["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let status = match g.tokens.get(token) {
        None => {
            json!({"authenticated": false, "error": "[invalid bearer token, square/go-jose: error in cryptographic primitive]", "user": {}})
        }
        Some(owner) => {
            let matched: Vec<&String> = wanted
                .iter()
                .filter(|a| owner.audiences.contains(a))
                .collect();
            if !wanted.is_empty() && matched.is_empty() {
                json!({"authenticated": false, "error": format!("[invalid bearer token, token audiences {:?} is invalid for the target audiences {:?}]", owner.audiences, wanted), "user": {}})
            } else {
                json!({
                    "authenticated": true,
                    "user": {"username": owner.username, "uid": "3f1d", "groups": owner.groups},
                    "audiences": matched,
                })
            }
        }
    };
    json_body(
        StatusCode::CREATED,
        json!({
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": null},
            "spec": review["spec"],
            "status": status,
        }),
    )
}
