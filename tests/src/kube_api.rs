//! A stand-in for the Kubernetes API server on 127.0.0.1, speaking its real HTTP/JSON,
//! reached through the normal `kube::Client` with a kubeconfig whose only difference
//! from a real one is the server URL. It keeps state:
//!
//! - namespaces, serviceaccounts, secrets, configmaps (`/api/v1`), leases
//!   (`coordination.k8s.io/v1`) and events (`events.k8s.io/v1`): get, list (label and
//!   field selectors, `limit`/`continue`), create (409 AlreadyExists), update (409
//!   Conflict on a stale `resourceVersion`), merge patch, delete (404 NotFound), and
//!   watch from a `resourceVersion` with bookmarks, resume, and 410 Gone after
//!   compaction;
//! - the garbage collector's part: deleting an object deletes the objects whose
//!   `ownerReferences` name its uid (background propagation);
//! - TokenReview (`authentication.k8s.io/v1`) backed by a token table the test controls;
//! - faults: injected 500s, slow answers, dropped watches, writes of one kind refused
//!   with 403; and write counters.

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
    /// Answer as an authenticator that ignores audiences does: `status.audiences` empty.
    audience_unaware: bool,
}

/// The running stand-in.
#[derive(Clone)]
pub struct KubeApi {
    /// Its address.
    pub addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    resources: Resources,
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
        let resources = Resources::new();
        let app = Router::new()
            .route(
                "/apis/authentication.k8s.io/v1/tokenreviews",
                post(token_review),
            )
            .with_state(inner.clone())
            .merge(resources.router());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        KubeApi {
            addr,
            inner,
            resources,
        }
    }

    /// Writes so far, by kind and verb.
    pub fn writes(&self) -> Writes {
        self.resources.state.db.lock().unwrap().writes.clone()
    }

    /// The next `n` non-watch requests answer 500.
    pub fn fail_next(&self, n: u32) {
        self.resources.state.db.lock().unwrap().fail_next = n;
    }

    /// Writes (create, update, patch, delete) of `kind` answer 403 Forbidden while `on`.
    pub fn forbid_writes(&self, kind: Kind, on: bool) {
        let mut g = self.resources.state.db.lock().unwrap();
        if on {
            g.forbidden.insert(kind);
        } else {
            g.forbidden.remove(&kind);
        }
    }

    /// Requests that reached the resource routes, by kind (watches included).
    pub fn requests(&self, kind: Kind) -> u64 {
        let g = self.resources.state.db.lock().unwrap();
        g.requests.get(&kind).copied().unwrap_or(0)
    }

    /// Stores objects directly, as if created (uid and resourceVersion assigned), without
    /// events: for populating a large cluster before anything watches it.
    pub fn insert_unwatched(&self, kind: Kind, ns: &str, objects: impl IntoIterator<Item = Value>) {
        let mut g = self.resources.state.db.lock().unwrap();
        for mut obj in objects {
            let name = obj["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            g.stamp(kind, ns, &mut obj, true);
            g.objects.insert((kind, ns.to_owned(), name), obj);
        }
    }

    /// Every answer is delayed by `d` (None: no delay).
    pub fn set_slow(&self, d: Option<Duration>) {
        self.resources.state.db.lock().unwrap().slow = d;
    }

    /// Ends every open watch (within half a second), as a restarting API server does.
    pub fn drop_watches(&self) {
        self.resources.state.db.lock().unwrap().watch_generation += 1;
    }

    /// Forgets the event history: watches from older resource versions get 410 Gone.
    pub fn compact(&self) {
        let mut g = self.resources.state.db.lock().unwrap();
        g.compacted_before = g.rv + 1;
        g.events.clear();
    }

    /// Every object of `kind`.
    pub fn objects(&self, kind: Kind) -> Vec<Value> {
        let g = self.resources.state.db.lock().unwrap();
        g.objects
            .iter()
            .filter(|((k, _, _), _)| *k == kind)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// The current object, if any (`ns` empty for namespaces).
    pub fn get(&self, kind: Kind, ns: &str, name: &str) -> Option<Value> {
        self.resources
            .state
            .db
            .lock()
            .unwrap()
            .objects
            .get(&(kind, ns.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Registers a token.
    pub fn add_token(&self, token: &str, owner: TokenOwner) {
        self.inner
            .lock()
            .unwrap()
            .tokens
            .insert(token.to_owned(), owner);
    }

    /// From now on, TokenReviews answer as an audience-unaware authenticator does:
    /// authenticated, with an empty `status.audiences` (valid for the API server only).
    pub fn set_audience_unaware(&self, on: bool) {
        self.inner.lock().unwrap().audience_unaware = on;
    }

    /// TokenReviews answered so far.
    pub fn reviews(&self) -> u64 {
        self.inner.lock().unwrap().reviews
    }

    /// A CA started against this server, its kubeconfig written beside `state_dir`.
    pub fn start_ca(&self, state_dir: &Path, args: &[&str]) -> crate::CaProcess {
        let kubeconfig = state_dir.with_extension("kubeconfig");
        self.write_kubeconfig(&kubeconfig);
        let kubeconfig = kubeconfig.to_str().expect("UTF-8 path").to_owned();
        crate::CaProcess::start_with_env(state_dir, args, &[("KUBECONFIG", kubeconfig.as_str())])
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
            if g.audience_unaware {
                json!({
                    "authenticated": true,
                    "user": {"username": owner.username, "uid": "3f1d", "groups": owner.groups},
                    "audiences": [],
                })
            } else if !wanted.is_empty() && matched.is_empty() {
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

// ---------------------------------------------------------------------------------
// Stateful resources.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path as UrlPath, Query};
use axum::http::{HeaderMap, Method};
use axum::routing::any;
use tokio::sync::broadcast;

/// A resource the stand-in stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// core/v1 Namespace (cluster-scoped).
    Namespace,
    /// core/v1 ServiceAccount.
    ServiceAccount,
    /// core/v1 Secret.
    Secret,
    /// core/v1 ConfigMap.
    ConfigMap,
    /// coordination.k8s.io/v1 Lease.
    Lease,
    /// events.k8s.io/v1 Event.
    Event,
}

impl Kind {
    fn from_plural(p: &str) -> Option<Kind> {
        Some(match p {
            "namespaces" => Kind::Namespace,
            "serviceaccounts" => Kind::ServiceAccount,
            "secrets" => Kind::Secret,
            "configmaps" => Kind::ConfigMap,
            "leases" => Kind::Lease,
            "events" => Kind::Event,
            _ => return None,
        })
    }
    fn kind(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::ServiceAccount => "ServiceAccount",
            Kind::Secret => "Secret",
            Kind::ConfigMap => "ConfigMap",
            Kind::Lease => "Lease",
            Kind::Event => "Event",
        }
    }
    fn api_version(self) -> &'static str {
        match self {
            Kind::Lease => "coordination.k8s.io/v1",
            Kind::Event => "events.k8s.io/v1",
            _ => "v1",
        }
    }
}

#[derive(Clone, Debug)]
struct Event {
    rv: u64,
    kind: Kind,
    ty: &'static str,
    object: Value,
}

/// Writes counted per kind and verb.
#[derive(Clone, Debug, Default)]
pub struct Writes {
    /// (kind, verb) → count; verbs: create, update, patch, delete.
    pub by: BTreeMap<(String, String), u64>,
}

impl Writes {
    /// Writes of `kind` (e.g. "Secret"), all verbs.
    pub fn of(&self, kind: &str) -> u64 {
        self.by
            .iter()
            .filter(|((k, _), _)| k == kind)
            .map(|(_, n)| n)
            .sum()
    }
}

#[derive(Default)]
struct Store {
    objects: BTreeMap<(Kind, String, String), Value>,
    rv: u64,
    events: Vec<Event>,
    compacted_before: u64,
    writes: Writes,
    fail_next: u32,
    slow: Option<Duration>,
    watch_generation: u64,
    forbidden: std::collections::BTreeSet<Kind>,
    requests: HashMap<Kind, u64>,
}

type Db = Arc<Mutex<Store>>;

fn status(code: u16, reason: &str, message: String) -> Response {
    json_body(
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code}),
    )
}

/// `a=b`, `a!=b`, `a`, `!a`, comma-separated (the equality-based subset).
fn labels_match(selector: Option<&str>, obj: &Value) -> bool {
    let Some(sel) = selector.filter(|s| !s.is_empty()) else {
        return true;
    };
    let labels = &obj["metadata"]["labels"];
    sel.split(',').all(|term| {
        let term = term.trim();
        if let Some((k, v)) = term.split_once("!=") {
            labels[k.trim()].as_str() != Some(v.trim())
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            labels[k.trim()].as_str() == Some(v.trim())
        } else if let Some(k) = term.strip_prefix('!') {
            labels[k.trim()].is_null()
        } else {
            !labels[term].is_null()
        }
    })
}

/// `path=value`, `path==value`, `path!=value`, comma-separated, where `path` is a dotted
/// field path (`type`, `metadata.name`, `metadata.namespace`), as the API server's field
/// selectors for these kinds.
fn fields_match(selector: Option<&str>, obj: &Value) -> bool {
    let Some(sel) = selector.filter(|s| !s.is_empty()) else {
        return true;
    };
    let field = |path: &str| {
        path.trim()
            .split('.')
            .fold(obj, |v, k| &v[k])
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    sel.split(',').all(|term| {
        if let Some((k, v)) = term.split_once("!=") {
            field(k) != v.trim()
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            field(k) == v.trim()
        } else {
            false
        }
    })
}

fn selected(q: &ListParams, obj: &Value) -> bool {
    labels_match(q.label_selector.as_deref(), obj) && fields_match(q.field_selector.as_deref(), obj)
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().expect("object");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

impl Store {
    fn record(&mut self, kind: Kind, ty: &'static str, object: Value, verb: &str) -> Event {
        let e = Event {
            rv: self.rv,
            kind,
            ty,
            object,
        };
        self.events.push(e.clone());
        *self
            .writes
            .by
            .entry((kind.kind().to_string(), verb.to_string()))
            .or_default() += 1;
        e
    }

    fn stamp(&mut self, kind: Kind, ns: &str, obj: &mut Value, fresh: bool) {
        self.rv += 1;
        let m = obj["metadata"].as_object_mut().expect("metadata");
        m.insert("resourceVersion".into(), json!(self.rv.to_string()));
        if fresh {
            m.insert("uid".into(), json!(format!("uid-{}", self.rv)));
            m.insert(
                "creationTimestamp".into(),
                json!(
                    time::OffsetDateTime::now_utc()
                        .format(&time::format_description::well_known::Rfc3339)
                        .unwrap_or_default()
                ),
            );
        }
        if kind != Kind::Namespace {
            m.insert("namespace".into(), json!(ns));
        }
        obj["kind"] = json!(kind.kind());
        obj["apiVersion"] = json!(kind.api_version());
    }
}

/// Query parameters the stand-in honours.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListParams {
    label_selector: Option<String>,
    field_selector: Option<String>,
    watch: Option<String>,
    resource_version: Option<String>,
    allow_watch_bookmarks: Option<bool>,
    timeout_seconds: Option<u64>,
    limit: Option<usize>,
    #[serde(rename = "continue")]
    cont: Option<String>,
}

async fn resource(
    State(st): State<ApiState>,
    method: Method,
    UrlPath(parts): UrlPath<Vec<(String, String)>>,
    Query(q): Query<ListParams>,
    _headers: HeaderMap,
    body: String,
) -> Response {
    let p: HashMap<String, String> = parts.into_iter().collect();
    let Some(kind) = p.get("kind").and_then(|k| Kind::from_plural(k)) else {
        return status(
            404,
            "NotFound",
            "the server could not find the requested resource".into(),
        );
    };
    let ns = p.get("ns").cloned().unwrap_or_default();
    let name = p.get("name").cloned();
    let slow = {
        let mut g = st.db.lock().unwrap();
        *g.requests.entry(kind).or_default() += 1;
        if g.forbidden.contains(&kind) && method != Method::GET {
            return status(
                403,
                "Forbidden",
                format!(
                    "{}s is forbidden: writes refused by the test",
                    kind.kind().to_lowercase()
                ),
            );
        }
        if g.fail_next > 0 && q.watch.is_none() {
            g.fail_next -= 1;
            return status(500, "InternalError", "injected failure".into());
        }
        g.slow
    };
    if let Some(d) = slow {
        tokio::time::sleep(d).await;
    }
    match (method, name) {
        (Method::GET, None) if q.watch.as_deref().is_some_and(|w| w == "true" || w == "1") => {
            watch(st, kind, ns, q)
        }
        (Method::GET, None) => list(&st.db, kind, &ns, &q),
        (Method::GET, Some(name)) => {
            match st.db.lock().unwrap().objects.get(&(kind, ns, name.clone())) {
                Some(o) => json_body(StatusCode::OK, o.clone()),
                None => status(
                    404,
                    "NotFound",
                    format!("{}s \"{name}\" not found", kind.kind().to_lowercase()),
                ),
            }
        }
        (Method::POST, None) => {
            let Ok(mut obj) = serde_json::from_str::<Value>(&body) else {
                return status(400, "BadRequest", "invalid JSON".into());
            };
            let name = obj["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let mut g = st.db.lock().unwrap();
            let key = (kind, ns.clone(), name.clone());
            if g.objects.contains_key(&key) {
                return status(
                    409,
                    "AlreadyExists",
                    format!("{}s \"{name}\" already exists", kind.kind().to_lowercase()),
                );
            }
            g.stamp(kind, &ns, &mut obj, true);
            g.objects.insert(key, obj.clone());
            let _ = st
                .events
                .send(g.record(kind, "ADDED", obj.clone(), "create"));
            json_body(StatusCode::CREATED, obj)
        }
        (Method::PUT, Some(name)) => {
            let Ok(mut obj) = serde_json::from_str::<Value>(&body) else {
                return status(400, "BadRequest", "invalid JSON".into());
            };
            let mut g = st.db.lock().unwrap();
            let key = (kind, ns.clone(), name.clone());
            let Some(current) = g.objects.get(&key).cloned() else {
                return status(
                    404,
                    "NotFound",
                    format!("{}s \"{name}\" not found", kind.kind().to_lowercase()),
                );
            };
            let sent = obj["metadata"]["resourceVersion"]
                .as_str()
                .map(str::to_owned);
            if sent.is_some_and(|rv| {
                Some(rv.as_str()) != current["metadata"]["resourceVersion"].as_str()
            }) {
                return status(
                    409,
                    "Conflict",
                    format!(
                        "Operation cannot be fulfilled on {}s \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                        kind.kind().to_lowercase()
                    ),
                );
            }
            obj["metadata"]["uid"] = current["metadata"]["uid"].clone();
            obj["metadata"]["creationTimestamp"] = current["metadata"]["creationTimestamp"].clone();
            g.stamp(kind, &ns, &mut obj, false);
            g.objects.insert(key, obj.clone());
            let _ = st
                .events
                .send(g.record(kind, "MODIFIED", obj.clone(), "update"));
            json_body(StatusCode::OK, obj)
        }
        (Method::PATCH, Some(name)) => {
            let Ok(patch) = serde_json::from_str::<Value>(&body) else {
                return status(400, "BadRequest", "invalid JSON".into());
            };
            let mut g = st.db.lock().unwrap();
            let key = (kind, ns.clone(), name.clone());
            let Some(mut obj) = g.objects.get(&key).cloned() else {
                return status(
                    404,
                    "NotFound",
                    format!("{}s \"{name}\" not found", kind.kind().to_lowercase()),
                );
            };
            merge_patch(&mut obj, &patch);
            g.stamp(kind, &ns, &mut obj, false);
            g.objects.insert(key, obj.clone());
            let _ = st
                .events
                .send(g.record(kind, "MODIFIED", obj.clone(), "patch"));
            json_body(StatusCode::OK, obj)
        }
        (Method::DELETE, Some(name)) => {
            let mut g = st.db.lock().unwrap();
            let Some(mut obj) = g.objects.remove(&(kind, ns.clone(), name.clone())) else {
                return status(
                    404,
                    "NotFound",
                    format!("{}s \"{name}\" not found", kind.kind().to_lowercase()),
                );
            };
            g.stamp(kind, &ns, &mut obj, false);
            let _ = st
                .events
                .send(g.record(kind, "DELETED", obj.clone(), "delete"));
            collect_garbage(&mut g, &st.events, &obj);
            json_body(StatusCode::OK, obj)
        }
        _ => status(405, "MethodNotAllowed", "method not allowed".into()),
    }
}

/// What kube-controller-manager's garbage collector does after `owner` is deleted:
/// deletes every object that names it in `ownerReferences`, and so on down.
fn collect_garbage(g: &mut Store, events: &broadcast::Sender<Event>, owner: &Value) {
    let mut gone = vec![
        owner["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    ];
    while let Some(uid) = gone.pop() {
        let dependents: Vec<(Kind, String, String)> = g
            .objects
            .iter()
            .filter(|(_, o)| {
                o["metadata"]["ownerReferences"]
                    .as_array()
                    .is_some_and(|refs| refs.iter().any(|r| r["uid"] == uid.as_str()))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in dependents {
            let Some(mut obj) = g.objects.remove(&key) else {
                continue;
            };
            g.stamp(key.0, &key.1, &mut obj, false);
            gone.push(
                obj["metadata"]["uid"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            );
            let _ = events.send(g.record(key.0, "DELETED", obj, "garbage-collect"));
        }
    }
}

fn list(db: &Db, kind: Kind, ns: &str, q: &ListParams) -> Response {
    let g = db.lock().unwrap();
    let all: Vec<&Value> = g
        .objects
        .iter()
        .filter(|((k, n, _), _)| *k == kind && (ns.is_empty() || n == ns))
        .map(|(_, v)| v)
        .filter(|v| selected(q, v))
        .collect();
    let start: usize = q.cont.as_deref().and_then(|c| c.parse().ok()).unwrap_or(0);
    let limit = q.limit.filter(|l| *l > 0).unwrap_or(usize::MAX);
    let page: Vec<Value> = all
        .iter()
        .skip(start)
        .take(limit)
        .map(|v| (*v).clone())
        .collect();
    let mut meta = json!({"resourceVersion": g.rv.to_string()});
    if start + page.len() < all.len() {
        meta["continue"] = json!((start + page.len()).to_string());
    }
    json_body(
        StatusCode::OK,
        json!({"kind": format!("{}List", kind.kind()), "apiVersion": kind.api_version(), "metadata": meta, "items": page}),
    )
}

fn watch(st: ApiState, kind: Kind, ns: String, q: ListParams) -> Response {
    let from: u64 = q
        .resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = q.allow_watch_bookmarks.unwrap_or(false);
    let timeout = Duration::from_secs(q.timeout_seconds.unwrap_or(290).min(600));

    let (tx, rx) =
        tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::convert::Infallible>>(1024);
    let mut live = st.events.subscribe();
    let (backlog, gone, generation, mut last_rv) = {
        let g = st.db.lock().unwrap();
        let gone = from != 0 && from < g.compacted_before;
        let backlog: Vec<Event> = g.events.iter().filter(|e| e.rv > from).cloned().collect();
        (
            backlog,
            gone,
            g.watch_generation,
            from.max(if from == 0 { g.rv } else { 0 }),
        )
    };
    let db = st.db.clone();
    tokio::spawn(async move {
        let line = |ty: &str, object: &Value| {
            let mut s = json!({"type": ty, "object": object}).to_string();
            s.push('\n');
            Ok(bytes::Bytes::from(s))
        };
        if gone {
            let _ = tx
                .send(line("ERROR", &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Expired", "code": 410, "message": format!("too old resource version: {from}")})))
                .await;
            return;
        }
        let wanted = |e: &Event| {
            e.kind == kind
                && (ns.is_empty()
                    || e.object["metadata"]["namespace"].as_str() == Some(ns.as_str()))
                && selected(&q, &e.object)
        };
        if from != 0 {
            for e in backlog.iter().filter(|e| wanted(e)) {
                if tx.send(line(e.ty, &e.object)).await.is_err() {
                    return;
                }
                last_rv = e.rv;
            }
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return,
                ev = live.recv() => match ev {
                    Ok(e) if e.rv > last_rv && wanted(&e) => {
                        last_rv = e.rv;
                        if tx.send(line(e.ty, &e.object)).await.is_err() { return; }
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => return,
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = tick.tick() => {
                    let (current, rv) = { let g = db.lock().unwrap(); (g.watch_generation, g.rv) };
                    if current != generation { return; } // dropped by fault injection
                    if bookmarks {
                        let obj = json!({"kind": kind.kind(), "apiVersion": kind.api_version(), "metadata": {"resourceVersion": rv.to_string()}});
                        if tx.send(line("BOOKMARK", &obj)).await.is_err() { return; }
                    }
                }
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .unwrap()
}

/// Shared state of the resource routes.
#[derive(Clone)]
struct ApiState {
    db: Db,
    events: broadcast::Sender<Event>,
}

/// The stateful part of the stand-in.
#[derive(Clone)]
pub struct Resources {
    state: ApiState,
}

impl Resources {
    fn new() -> Resources {
        let (events, _) = broadcast::channel(65_536);
        Resources {
            state: ApiState {
                db: Arc::new(Mutex::new(Store::default())),
                events,
            },
        }
    }

    fn router(&self) -> Router {
        Router::new()
            .route("/api/v1/{kind}", any(resource))
            .route("/api/v1/{kind}/{name}", any(resource))
            .route("/api/v1/namespaces/{ns}/{kind}", any(resource))
            .route("/api/v1/namespaces/{ns}/{kind}/{name}", any(resource))
            .route("/apis/coordination.k8s.io/v1/{kind}", any(resource))
            .route(
                "/apis/coordination.k8s.io/v1/namespaces/{ns}/{kind}",
                any(resource),
            )
            .route(
                "/apis/coordination.k8s.io/v1/namespaces/{ns}/{kind}/{name}",
                any(resource),
            )
            .route("/apis/events.k8s.io/v1/{kind}", any(resource))
            .route(
                "/apis/events.k8s.io/v1/namespaces/{ns}/{kind}",
                any(resource),
            )
            .route(
                "/apis/events.k8s.io/v1/namespaces/{ns}/{kind}/{name}",
                any(resource),
            )
            .with_state(self.state.clone())
    }
}

/// Object metadata with a name and labels, for creating test objects.
pub fn meta(name: &str, labels: &[(&str, &str)]) -> kube::api::ObjectMeta {
    kube::api::ObjectMeta {
        name: Some(name.into()),
        labels: Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
        ..Default::default()
    }
}
