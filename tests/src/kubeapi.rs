//! A scripted Kubernetes API server: it speaks the real list and watch JSON of the API server
//! (`PodList` with `metadata.resourceVersion`, newline-delimited `WatchEvent`s, `410 Gone` as an
//! `ERROR` event with a `Status`), over plain HTTP on loopback, so that kube-rs runs unchanged
//! against it. The test changes objects; watchers see ADDED / MODIFIED / DELETED events.
//!
//! Behaviour relied on, and where the real API server documents it (Kubernetes "API Concepts"
//! unless noted):
//! - A list returns the collection's `resourceVersion`; a watch from that version streams every
//!   later change in order ("Efficient detection of changes").
//! - A watch from a compacted version gets an `ERROR` event with a `Status` of `code: 410`
//!   (`Expired`), after which clients relist ("Resource versions", "410 Gone responses").
//! - Writing `/status` bumps `resourceVersion` and emits a `MODIFIED` event ("Subresources" in
//!   "Custom Resources"); `metadata.generation` is not changed by status writes. The script sets
//!   `generation` itself where a real server would increment it on spec changes.
//! - A Lease `update` carrying a stale `metadata.resourceVersion` is refused with `409 Conflict`
//!   (optimistic concurrency, "Resource versions"); `create` of an existing name is `409
//!   AlreadyExists`.
//! - `/version` answers any authenticated client (the `system:public-info-viewer` role).
//! - A strategic merge patch of `pods/{name}/status` merges `status.conditions` by `type` (the
//!   list's `patchMergeKey` in the Pod API); a `metadata.uid` in a patch that differs from the
//!   object's is refused with `409 Conflict` (a uid precondition); another content type is refused
//!   with `415`.
//!
//! Where the script is simpler than a real server: server-side apply is recorded and applied as
//! "replace `.status`" (a real server merges by field manager: with one manager owning the whole
//! status, the result is the same); a paged list (`limit`/`continue`) serves its later pages from
//! the current objects rather than the first page's snapshot (the watch from that version replays
//! what changed, so the client ends in the same state); no bookmarks are sent; no authentication
//! or authorisation is enforced (the bearer token is only recorded to tell replicas apart; RBAC is checked separately against
//! deploy/rbac.yaml).

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use crate::rbac::{Attributes, Rbac};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use serde_json::{Value, json};

/// The collections served.
pub const PODS: &str = "/api/v1/pods";
/// Namespaces.
pub const NAMESPACES: &str = "/api/v1/namespaces";
/// EgressPolicies.
pub const POLICIES: &str = "/apis/egress.dev/v1alpha1/egresspolicies";
/// ClusterEgressPolicies.
pub const CLUSTER_POLICIES: &str = "/apis/egress.dev/v1alpha1/clusteregresspolicies";
/// EndpointSlices of namespace `egress-system`.
pub const SLICES: &str = "/apis/discovery.k8s.io/v1/namespaces/egress-system/endpointslices";

type LogEntry = (u64, &'static str, Value, Option<Value>);

#[derive(Default)]
struct Kind {
    objects: BTreeMap<String, Value>,
    /// (resourceVersion, event type, object, the object before the change)
    log: Vec<LogEntry>,
    /// History up to and including this resourceVersion is gone.
    compacted_through: u64,
    /// The field manager that owns each object's `.status` (server-side apply).
    status_manager: HashMap<String, String>,
}

#[derive(Default)]
struct State {
    rv: u64,
    kinds: HashMap<String, Kind>,
    /// (bearer token, request line)
    requests: Vec<(String, String)>,
    /// Request lines answered 403.
    forbidden: Vec<String>,
    rbac: Rbac,
    /// The server's own bound on a watch's duration (a real one ends watches after
    /// `--min-request-timeout`, randomised, or the client's `timeoutSeconds`, whichever is less).
    watch_timeout: Option<Duration>,
    down: bool,
    leases: BTreeMap<String, Value>,
    /// Every Lease write: (bearer token, the Lease as written).
    lease_writes: Vec<(String, Value)>,
    daemonsets: BTreeMap<String, Value>,
    /// Events recorded (`events.k8s.io/v1`), as posted.
    events: Vec<Value>,
    /// The ServiceAccount token issuer (OIDC discovery) and its keys (`/openid/v1/jwks`).
    issuer: String,
    jwks: Value,
    patches: Vec<Patch>,
    on_patch: Option<PatchHook>,
}

type PatchHook = Arc<dyn Fn(&Patch) + Send + Sync>;

/// A status patch the API received.
#[derive(Debug, Clone)]
pub struct Patch {
    /// Bearer token of the client that sent it (tells replicas apart).
    pub token: String,
    /// Request path.
    pub path: String,
    /// Query string (`fieldManager=...&force=true`).
    pub query: String,
    /// Content type (`application/apply-patch+yaml` for server-side apply).
    pub content_type: String,
    /// The body.
    pub body: Value,
}

/// The scripted API.
pub struct FakeApi {
    /// Where it listens.
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    notify: tokio::sync::broadcast::Sender<()>,
    rt: Option<tokio::runtime::Runtime>,
}

fn key(obj: &Value) -> String {
    let m = &obj["metadata"];
    format!("{}/{}", m["namespace"].as_str().unwrap_or(""), m["name"].as_str().unwrap_or(""))
}

fn list_kind(path: &str) -> (&'static str, &'static str) {
    match path {
        PODS => ("v1", "PodList"),
        NAMESPACES => ("v1", "NamespaceList"),
        POLICIES => ("egress.dev/v1alpha1", "EgressPolicyList"),
        SLICES => ("discovery.k8s.io/v1", "EndpointSliceList"),
        _ => ("egress.dev/v1alpha1", "ClusterEgressPolicyList"),
    }
}

impl FakeApi {
    /// Starts on 127.0.0.1 with empty collections.
    pub fn start() -> FakeApi {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let rbac = |f: &str| std::fs::read_to_string(crate::repo_root().join("deploy").join(f)).expect("deploy RBAC");
        let (gateway, redirector) = (rbac("rbac.yaml"), rbac("node-redirector-rbac.yaml"));
        let mut st = State {
            rv: 1,
            rbac: Rbac::from_manifests(&[&gateway, &redirector]),
            issuer: "https://kubernetes.default.svc".into(),
            jwks: json!({"keys": []}),
            ..Default::default()
        };
        for k in [PODS, NAMESPACES, POLICIES, CLUSTER_POLICIES, SLICES] {
            st.kinds.insert(k.to_string(), Kind::default());
        }
        let state = Arc::new(Mutex::new(st));
        let (notify, _) = tokio::sync::broadcast::channel(1024);
        let (s2, n2) = (state.clone(), notify.clone());
        rt.spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    continue;
                };
                if s2.lock().unwrap().down {
                    drop(sock);
                    continue;
                }
                let (s3, n3) = (s2.clone(), n2.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| handle(s3.clone(), n3.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(sock), svc)
                        .await;
                });
            }
        });
        FakeApi { addr, state, notify, rt: Some(rt) }
    }

    /// A kubeconfig pointing at this server.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: 'http://{}'}}}}]\nusers: [{{name: u, user: {{token: test}}}}]\ncontexts: [{{name: c, context: {{cluster: fake, user: u}}}}]\ncurrent-context: c\n",
            self.addr
        )
    }

    /// Creates or replaces an object (ADDED or MODIFIED). For the policy kinds, as for any custom
    /// resource with a status subresource, the main resource's write keeps the stored `.status`
    /// (whatever the object carries) and `metadata.generation` is the server's: 1 at creation,
    /// one more on every change of `.spec`.
    pub fn apply(&self, path: &str, mut obj: Value) {
        let mut st = self.state.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let k = st.kinds.get_mut(path).unwrap();
        if path == POLICIES || path == CLUSTER_POLICIES {
            let prev = k.objects.get(&key(&obj));
            let generation = match prev {
                None => 1,
                Some(p) => {
                    let g = p["metadata"]["generation"].as_i64().unwrap_or(1);
                    if p["spec"] == obj["spec"] { g } else { g + 1 }
                }
            };
            obj["metadata"]["generation"] = json!(generation);
            match prev.map(|p| p["status"].clone()) {
                Some(status) if !status.is_null() => obj["status"] = status,
                _ => {
                    obj.as_object_mut().unwrap().remove("status");
                }
            }
            if let Some(mf) = prev.map(|p| p["metadata"]["managedFields"].clone()).filter(|m| !m.is_null()) {
                obj["metadata"]["managedFields"] = mf;
            }
        }
        let prev = k.objects.insert(key(&obj), obj.clone());
        let kind = if prev.is_some() { "MODIFIED" } else { "ADDED" };
        k.log.push((rv, kind, obj, prev));
        drop(st);
        let _ = self.notify.send(());
    }

    /// Starts a graceful deletion, as `kubectl delete` of a Pod does: the object stays, with
    /// `metadata.deletionTimestamp` and `deletionGracePeriodSeconds` set (a `MODIFIED` event),
    /// until `delete` removes it (the kubelet's final delete once the containers have stopped).
    pub fn begin_delete(&self, path: &str, namespace: &str, name: &str) {
        let mut st = self.state.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        let k = st.kinds.get_mut(path).unwrap();
        if let Some(obj) = k.objects.get_mut(&format!("{namespace}/{name}")) {
            let prev = obj.clone();
            obj["metadata"]["deletionTimestamp"] = json!("2026-11-26T01:00:00Z");
            obj["metadata"]["deletionGracePeriodSeconds"] = json!(30);
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            let obj = obj.clone();
            k.log.push((rv, "MODIFIED", obj, Some(prev)));
        }
        drop(st);
        let _ = self.notify.send(());
    }

    /// Writes an object's `.status` by server-side apply as another field manager (`kubectl`, an
    /// older controller): it then owns `.status`, and an apply by any other manager conflicts
    /// unless forced.
    pub fn apply_status_as(&self, path: &str, namespace: &str, name: &str, manager: &str, status: Value) {
        let key = format!("{namespace}/{name}");
        let st = self.state.lock().unwrap();
        let _ = apply_status(st, &self.notify, path, &key, manager, true, status);
    }

    /// Ends every watch after `d` (a real server ends each watch after its request timeout; the
    /// client then watches again from the last resourceVersion it saw, a bookmark's included).
    pub fn set_watch_timeout(&self, d: Duration) {
        self.state.lock().unwrap().watch_timeout = Some(d);
    }

    /// Replaces the RBAC rules the server authorises with (by default those of every manifest in
    /// `deploy/`): any other request is answered `403 Forbidden`.
    pub fn set_rbac(&self, manifests: &[&str]) {
        self.state.lock().unwrap().rbac = Rbac::from_manifests(manifests);
    }

    /// The Events recorded (`events.k8s.io/v1`).
    pub fn events(&self) -> Vec<Value> {
        self.state.lock().unwrap().events.clone()
    }

    /// Publishes `jwks` as the ServiceAccount token issuer's keys (`/openid/v1/jwks`).
    pub fn set_jwks(&self, jwks: Value) {
        self.state.lock().unwrap().jwks = jwks;
    }

    /// Request lines answered `403 Forbidden`.
    pub fn forbidden(&self) -> Vec<String> {
        self.state.lock().unwrap().forbidden.clone()
    }

    /// Every Lease write (create or update): the bearer token that wrote it and the Lease.
    pub fn lease_writes(&self) -> Vec<(String, Value)> {
        self.state.lock().unwrap().lease_writes.clone()
    }

    /// Deletes an object (DELETED).
    pub fn delete(&self, path: &str, namespace: &str, name: &str) {
        let mut st = self.state.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        let k = st.kinds.get_mut(path).unwrap();
        if let Some(mut obj) = k.objects.remove(&format!("{namespace}/{name}")) {
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            k.log.push((rv, "DELETED", obj, None));
        }
        drop(st);
        let _ = self.notify.send(());
    }

    /// Compacts a collection's history up to the current resourceVersion, as etcd compaction
    /// does: a watch that still needs a change from before it (one that is behind, open or new)
    /// gets `410 Gone` and must relist; a watch that has seen everything goes on.
    pub fn compact(&self, path: &str) {
        let rv = self.state.lock().unwrap().rv;
        self.compact_through(path, rv);
    }

    /// Compacts a collection's history up to and including `rv`.
    pub fn compact_through(&self, path: &str, rv: u64) {
        let mut st = self.state.lock().unwrap();
        let k = st.kinds.get_mut(path).unwrap();
        k.compacted_through = rv;
        k.log.retain(|(r, ..)| *r > rv);
        drop(st);
        let _ = self.notify.send(());
    }

    /// Makes the API unreachable (open watches end, new connections are closed) or back.
    pub fn set_down(&self, down: bool) {
        self.state.lock().unwrap().down = down;
        let _ = self.notify.send(());
    }

    /// Request lines seen so far (`GET /api/v1/pods?...`).
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.iter().map(|(_, l)| l.clone()).collect()
    }

    /// Request lines of the client with this bearer token.
    pub fn requests_by(&self, token: &str) -> Vec<String> {
        self.state.lock().unwrap().requests.iter().filter(|(t, _)| t == token).map(|(_, l)| l.clone()).collect()
    }

    /// Runs `f` on every accepted Pod status patch before it is applied (visible) and answered, so
    /// that a test can check what else is true at the moment a client writes a status.
    pub fn on_patch(&self, f: impl Fn(&Patch) + Send + Sync + 'static) {
        self.state.lock().unwrap().on_patch = Some(Arc::new(f));
    }

    /// Status patches received so far.
    pub fn patches(&self) -> Vec<Patch> {
        self.state.lock().unwrap().patches.clone()
    }

    /// A Lease as stored.
    /// Stores a DaemonSet (`apps/v1`) as it is, status included: the test plays the DaemonSet
    /// controller.
    pub fn set_daemonset(&self, obj: Value) {
        let key =
            format!("{}/{}", obj["metadata"]["namespace"].as_str().unwrap(), obj["metadata"]["name"].as_str().unwrap());
        self.state.lock().unwrap().daemonsets.insert(key, obj);
    }

    /// A DaemonSet as stored.
    pub fn daemonset(&self, namespace: &str, name: &str) -> Option<Value> {
        self.state.lock().unwrap().daemonsets.get(&format!("{namespace}/{name}")).cloned()
    }

    /// A Lease as stored.
    pub fn lease(&self, namespace: &str, name: &str) -> Option<Value> {
        self.state.lock().unwrap().leases.get(&format!("{namespace}/{name}")).cloned()
    }

    /// The stored object.
    pub fn object(&self, path: &str, namespace: &str, name: &str) -> Option<Value> {
        self.state.lock().unwrap().kinds[path].objects.get(&format!("{namespace}/{name}")).cloned()
    }

    /// A kubeconfig pointing at this server with a given bearer token.
    pub fn kubeconfig_with_token(&self, token: &str) -> String {
        self.kubeconfig().replace("token: test", &format!("token: {token}"))
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn json_response(status: u16, v: &Value) -> hyper::Response<Body> {
    let mut r = hyper::Response::new(Full::new(Bytes::from(v.to_string())).boxed());
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
    r.headers_mut().insert("content-type", "application/json".parse().unwrap());
    r
}

/// While the API is "down", every request on an already open connection fails and the
/// connection is closed (hyper closes a connection whose service errors), like a dead server.
async fn handle(
    state: Arc<Mutex<State>>,
    notify: tokio::sync::broadcast::Sender<()>,
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<Body>, std::io::Error> {
    if state.lock().unwrap().down {
        return Err(std::io::Error::other("API down"));
    }
    let path = req.uri().path().to_string();
    let query: HashMap<String, String> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect();
    let line = format!("{} {}", req.method(), req.uri());
    let token = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .trim_start_matches("Bearer ")
        .to_string();
    {
        let mut st = state.lock().unwrap();
        st.requests.push((token.clone(), line.clone()));
        // The authoriser: RBAC of the manifests; a non-resource URL (`/version`) is open to every
        // authenticated client.
        let user = format!("system:serviceaccount:egress-system:{token}");
        match Attributes::of(req.method().as_str(), &req.uri().to_string()) {
            Some(a) if !st.rbac.allows(&a) => {
                st.forbidden.push(line);
                return Ok(status_with(403, "Forbidden", &a.forbidden(&user)));
            }
            None if !st.rbac.allows_url(req.method().as_str(), &path) => {
                st.forbidden.push(line);
                let msg = format!("forbidden: User \"{user}\" cannot get path \"{path}\"");
                return Ok(status_with(403, "Forbidden", &msg));
            }
            _ => {}
        }
    }
    if !state.lock().unwrap().kinds.contains_key(&path) {
        return Ok(other(state, notify, req, token).await);
    }
    let kind = path.clone();
    let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    let st = state.lock().unwrap();
    let selector = match Selector::parse(&kind, &query) {
        Ok(s) => s,
        Err(e) => return Ok(status_with(400, "BadRequest", &e)),
    };
    let asked: Option<u64> = query.get("resourceVersion").and_then(|v| v.parse().ok());
    if !watch {
        // A list at an exact resourceVersion that compaction has removed is 410 (a list at "0",
        // none, or `NotOlderThan` is served from the current state).
        if query.get("resourceVersionMatch").map(String::as_str) == Some("Exact")
            && asked.is_some_and(|v| v < st.kinds[&kind].compacted_through)
        {
            return Ok(status_with(410, "Expired", "too old resource version"));
        }
        // Pages (`limit`, `continue`), as a real server serves a list in chunks: each page after
        // the first goes on after the last key of the one before and carries the first page's
        // resourceVersion, which the client then watches from. (A real server serves every page
        // from that version's snapshot; here the later pages come from the current objects, which
        // the watch from that version then replays: the client ends in the same state.)
        let (rv, after) = match query.get("continue") {
            Some(token) => match continue_token(token) {
                Some((v, key)) => (v, Some(key)),
                None => return Ok(status_with(400, "BadRequest", "invalid continue token")),
            },
            None => (st.rv, None),
        };
        let limit = query.get("limit").and_then(|l| l.parse::<usize>().ok()).filter(|l| *l > 0);
        let mut matching = st.kinds[&kind]
            .objects
            .iter()
            .filter(|(key, _)| after.as_ref().is_none_or(|a| key.as_str() > a.as_str()))
            .filter(|(_, o)| selector.matches(o));
        let page: Vec<(&String, &Value)> = matching.by_ref().take(limit.unwrap_or(usize::MAX)).collect();
        let remaining = matching.count();
        let items: Vec<Value> = page.iter().map(|(_, o)| (*o).clone()).collect();
        let (api_version, list) = list_kind(&kind);
        let mut metadata = json!({"resourceVersion": rv.to_string()});
        if remaining > 0
            && let Some((last, _)) = page.last()
        {
            metadata["continue"] = json!(continue_token_of(rv, last));
            metadata["remainingItemCount"] = json!(remaining);
        }
        let list = json!({"apiVersion": api_version, "kind": list, "metadata": metadata, "items": items});
        return Ok(json_response(200, &list));
    }
    let mut cursor: u64 = asked.unwrap_or(0);
    // The watch ends after the client's `timeoutSeconds` or the server's bound, whichever is less;
    // with `allowWatchBookmarks` a BOOKMARK carrying the current resourceVersion comes last.
    let mut limit = query.get("timeoutSeconds").and_then(|v| v.parse().ok()).map(Duration::from_secs);
    if let Some(server) = st.watch_timeout {
        limit = Some(limit.map_or(server, |l| l.min(server)));
    }
    let deadline = limit.map(|l| tokio::time::Instant::now() + l);
    let bookmarks = query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    drop(st);
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    let mut sub = notify.subscribe();
    tokio::spawn(async move {
        loop {
            let (events, gone, down, now_rv) = {
                let st = state.lock().unwrap();
                let k = &st.kinds[&kind];
                let gone = cursor < k.compacted_through;
                let ev: Vec<(u64, &'static str, Value)> = k
                    .log
                    .iter()
                    .filter(|(rv, ..)| *rv > cursor)
                    .map(|(rv, t, obj, prev)| (*rv, selector.event(t, obj, prev.as_ref()), obj.clone()))
                    .collect();
                (ev, gone, st.down, st.rv)
            };
            if down {
                return;
            }
            if gone {
                let status = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "message": "too old resource version", "reason": "Expired", "code": 410}});
                let _ = tx.send(Bytes::from(format!("{status}\n"))).await;
                return;
            }
            for (rv, t, obj) in events {
                cursor = rv;
                if t.is_empty() {
                    continue; // outside the selector before and after
                }
                if tx.send(Bytes::from(format!("{}\n", json!({"type": t, "object": obj})))).await.is_err() {
                    return;
                }
            }
            if let Some(d) = deadline
                && tokio::time::Instant::now() >= d
            {
                if bookmarks {
                    let (api_version, list) = list_kind(&kind);
                    let object = json!({"apiVersion": api_version, "kind": list.trim_end_matches("List"),
                        "metadata": {"resourceVersion": now_rv.to_string()}});
                    let _ = tx.send(Bytes::from(format!("{}\n", json!({"type": "BOOKMARK", "object": object})))).await;
                }
                return; // the watch ends normally
            }
            let wait = deadline.map_or(Duration::from_millis(500), |d| {
                d.saturating_duration_since(tokio::time::Instant::now()).min(Duration::from_millis(500))
            });
            let _ = tokio::time::timeout(wait, sub.recv()).await;
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    let mut r = hyper::Response::new(BodyExt::boxed(StreamBody::new(stream)));
    r.headers_mut().insert("content-type", "application/json".parse().unwrap());
    Ok(r)
}

/// A list/watch's `labelSelector` and `fieldSelector`, as the API server applies them: equality
/// (`=`, `==`), inequality (`!=`) and existence (`key`, `!key`) for labels; `=`/`!=` on the fields
/// the server supports for the kind (others are refused with 400, as the real one does).
#[derive(Debug, Default)]
struct Selector {
    labels: Vec<(String, Option<String>, bool)>,
    fields: Vec<(String, String, bool)>,
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).to_string()
}

impl Selector {
    fn parse(kind: &str, query: &HashMap<String, String>) -> Result<Selector, String> {
        let mut sel = Selector::default();
        for term in query
            .get("labelSelector")
            .map(|v| percent_decode(v))
            .unwrap_or_default()
            .split(',')
            .filter(|t| !t.is_empty())
        {
            if let Some((k, v)) = term.split_once("!=") {
                sel.labels.push((k.into(), Some(v.into()), false));
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                sel.labels.push((k.into(), Some(v.into()), true));
            } else if let Some(k) = term.strip_prefix('!') {
                sel.labels.push((k.into(), None, false));
            } else {
                sel.labels.push((term.into(), None, true));
            }
        }
        let supported: &[&str] = if kind == PODS {
            &["metadata.name", "metadata.namespace", "spec.nodeName", "status.phase"]
        } else {
            &["metadata.name", "metadata.namespace"]
        };
        for term in query
            .get("fieldSelector")
            .map(|v| percent_decode(v))
            .unwrap_or_default()
            .split(',')
            .filter(|t| !t.is_empty())
        {
            let (f, v, eq) = match term.split_once("!=") {
                Some((f, v)) => (f, v, false),
                None => {
                    let (f, v) = term
                        .split_once("==")
                        .or_else(|| term.split_once('='))
                        .ok_or(format!("invalid field selector {term:?}"))?;
                    (f, v, true)
                }
            };
            if !supported.contains(&f) {
                return Err(format!("field label not supported: {f}"));
            }
            sel.fields.push((f.into(), v.into(), eq));
        }
        Ok(sel)
    }

    fn matches(&self, obj: &Value) -> bool {
        let labels = &obj["metadata"]["labels"];
        let labels_ok = self.labels.iter().all(|(k, v, eq)| match v {
            Some(v) => (labels[k].as_str() == Some(v.as_str())) == *eq,
            None => labels.get(k).is_some() == *eq,
        });
        let field =
            |f: &str| -> String { f.split('.').fold(obj, |v, part| &v[part]).as_str().unwrap_or("").to_string() };
        labels_ok && self.fields.iter().all(|(f, v, eq)| (field(f) == *v) == *eq)
    }

    /// The event a watch with this selector sees ("" for none): an object that comes into the
    /// selection is ADDED, one that leaves it is DELETED.
    fn event(&self, t: &'static str, obj: &Value, prev: Option<&Value>) -> &'static str {
        let now = self.matches(obj);
        let before = prev.is_some_and(|p| self.matches(p));
        match (t, before, now) {
            ("DELETED", _, true) => "DELETED",
            ("DELETED", _, false) => "",
            (_, true, true) => "MODIFIED",
            (_, false, true) => "ADDED",
            (_, true, false) => "DELETED",
            _ => "",
        }
    }
}

fn status_with(code: u16, reason: &str, message: &str) -> hyper::Response<Body> {
    json_response(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "code": code, "reason": reason, "message": message}),
    )
}

fn status(code: u16, reason: &str) -> hyper::Response<Body> {
    json_response(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "code": code, "reason": reason, "message": reason}),
    )
}

/// Leases and status subresources.
async fn other(
    state: Arc<Mutex<State>>,
    notify: tokio::sync::broadcast::Sender<()>,
    req: hyper::Request<hyper::body::Incoming>,
    token: String,
) -> hyper::Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let header = |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let content_type = header("content-type");
    let bytes = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let mut st = state.lock().unwrap();
    // ServiceAccount token issuer discovery, as the API server serves it.
    if path == "/.well-known/openid-configuration" {
        let issuer = st.issuer.clone();
        return json_response(
            200,
            &json!({"issuer": issuer, "jwks_uri": format!("{issuer}/openid/v1/jwks"),
                    "response_types_supported": ["id_token"], "subject_types_supported": ["public"],
                    "id_token_signing_alg_values_supported": ["RS256", "ES256"]}),
        );
    }
    if path == "/openid/v1/jwks" {
        return json_response(200, &st.jwks);
    }
    if path == "/version" {
        return json_response(
            200,
            &json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0", "platform": "linux/amd64"}),
        );
    }
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    // /apis/coordination.k8s.io/v1/namespaces/{ns}/leases[/{name}]
    if parts.len() >= 6 && parts[1] == "coordination.k8s.io" && parts[5] == "leases" {
        let ns = parts[4];
        match (method.as_str(), parts.get(6)) {
            ("GET", Some(name)) => {
                return match st.leases.get(&format!("{ns}/{name}")) {
                    Some(l) => json_response(200, l),
                    None => status(404, "NotFound"),
                };
            }
            ("POST", None) => {
                let name = body["metadata"]["name"].as_str().unwrap_or("").to_string();
                if st.leases.contains_key(&format!("{ns}/{name}")) {
                    return status(409, "AlreadyExists");
                }
                st.rv += 1;
                let mut l = body.clone();
                l["metadata"]["namespace"] = json!(ns);
                l["metadata"]["resourceVersion"] = json!(st.rv.to_string());
                l["apiVersion"] = json!("coordination.k8s.io/v1");
                l["kind"] = json!("Lease");
                st.leases.insert(format!("{ns}/{name}"), l.clone());
                st.lease_writes.push((token, l.clone()));
                return json_response(201, &l);
            }
            ("PUT", Some(name)) => {
                let k = format!("{ns}/{name}");
                let Some(cur) = st.leases.get(&k) else {
                    return status(404, "NotFound");
                };
                if cur["metadata"]["resourceVersion"] != body["metadata"]["resourceVersion"] {
                    return status(409, "Conflict");
                }
                st.rv += 1;
                let mut l = body.clone();
                l["metadata"]["resourceVersion"] = json!(st.rv.to_string());
                st.leases.insert(k, l.clone());
                st.lease_writes.push((token, l.clone()));
                return json_response(200, &l);
            }
            _ => return status(405, "MethodNotAllowed"),
        }
    }
    if method == "PATCH"
        && let ["api", "v1", "namespaces", ns, "pods", name, "status"] = parts.as_slice()
    {
        if content_type != "application/strategic-merge-patch+json" {
            return status(415, "UnsupportedMediaType");
        }
        let key = format!("{ns}/{name}");
        let Some(obj) = st.kinds[PODS].objects.get(&key) else {
            return status(404, "NotFound");
        };
        if let Some(uid) = body["metadata"]["uid"].as_str()
            && obj["metadata"]["uid"].as_str() != Some(uid)
        {
            return status(409, "Conflict");
        }
        // The hook sees the world as it is when the write arrives, before it is visible.
        let patch = Patch { token, path: path.clone(), query, content_type, body: body.clone() };
        let hook = st.on_patch.clone();
        drop(st);
        if let Some(h) = hook {
            h(&patch);
        }
        let mut st = state.lock().unwrap();
        st.patches.push(patch);
        return modify(st, &notify, PODS, &key, |obj| {
            for c in body["status"]["conditions"].as_array().into_iter().flatten() {
                if !obj["status"]["conditions"].is_array() {
                    obj["status"]["conditions"] = json!([]);
                }
                let list = obj["status"]["conditions"].as_array_mut().unwrap();
                match list.iter_mut().find(|x| x["type"] == c["type"]) {
                    Some(x) => x.as_object_mut().unwrap().extend(c.as_object().unwrap().clone()),
                    None => list.push(c.clone()),
                }
            }
        });
    }
    // GET / PATCH (strategic merge of the fields a test checks) /apis/apps/v1/namespaces/{ns}/daemonsets/{name}
    if let ["apis", "apps", "v1", "namespaces", ns, "daemonsets", name] = parts.as_slice() {
        let key = format!("{ns}/{name}");
        let Some(mut ds) = st.daemonsets.get(&key).cloned() else { return status(404, "NotFound") };
        match method.as_str() {
            "GET" => return json_response(200, &ds),
            "PATCH" if content_type == "application/strategic-merge-patch+json" => {
                st.patches.push(Patch { token, path: path.clone(), query, content_type, body: body.clone() });
                // What a spec change does: a new generation, the patch recorded; the test
                // applies its meaning (and the controller's status) itself.
                let generation = ds["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
                ds["metadata"]["generation"] = json!(generation);
                st.rv += 1;
                ds["metadata"]["resourceVersion"] = json!(st.rv.to_string());
                st.daemonsets.insert(key, ds.clone());
                return json_response(200, &ds);
            }
            "PATCH" => return status(415, "UnsupportedMediaType"),
            _ => return status(405, "MethodNotAllowed"),
        }
    }
    // PATCH /apis/egress.dev/v1alpha1/namespaces/{ns}/egresspolicies/{name}/status
    // PATCH /apis/egress.dev/v1alpha1/clusteregresspolicies/{name}/status
    if method == "PATCH" && parts.last() == Some(&"status") {
        let (kind, key): (&str, String) = match parts.as_slice() {
            ["apis", "egress.dev", "v1alpha1", "namespaces", ns, "egresspolicies", name, "status"] => {
                (POLICIES, format!("{ns}/{name}"))
            }
            ["apis", "egress.dev", "v1alpha1", "clusteregresspolicies", name, "status"] => {
                (CLUSTER_POLICIES, format!("/{name}"))
            }
            _ => return status(404, "NotFound"),
        };
        // Custom resources take server-side apply and JSON merge patches, never strategic merge.
        if content_type != "application/apply-patch+yaml" {
            return status(415, "UnsupportedMediaType");
        }
        let params: HashMap<&str, &str> = query.split('&').filter_map(|kv| kv.split_once('=')).collect();
        let Some(manager) = params.get("fieldManager").map(|m| m.to_string()) else {
            return status_with(
                400,
                "BadRequest",
                "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
            );
        };
        let force = params.get("force") == Some(&"true");
        st.patches.push(Patch { token, path: path.clone(), query: query.clone(), content_type, body: body.clone() });
        return apply_status(st, &notify, kind, &key, &manager, force, body["status"].clone());
    }
    // /apis/events.k8s.io/v1/namespaces/{ns}/events[/{name}]: kept as recorded.
    if parts.len() >= 6 && parts[1] == "events.k8s.io" && parts[5] == "events" {
        let ns = parts[4].to_string();
        return match (method.as_str(), parts.get(6)) {
            ("POST", None) => {
                let mut e = body.clone();
                e["metadata"]["namespace"] = json!(ns);
                st.events.push(e.clone());
                json_response(201, &e)
            }
            ("PATCH", Some(name)) => {
                let found =
                    st.events.iter_mut().find(|e| e["metadata"]["name"] == *name && e["metadata"]["namespace"] == ns);
                match found {
                    Some(e) => {
                        if let (Some(into), Some(from)) = (e.as_object_mut(), body.as_object()) {
                            for (k, v) in from {
                                into.insert(k.clone(), v.clone());
                            }
                        }
                        json_response(200, e)
                    }
                    None => status(404, "NotFound"),
                }
            }
            _ => status(405, "MethodNotAllowed"),
        };
    }
    status(404, "NotFound")
}

/// Server-side apply of `.status` by `manager`. With one applier owning the whole status the
/// merge is a replacement; another manager owning a different value is a conflict (409 unless
/// `force`, which takes the ownership over), as "Server-Side Apply: Conflicts" describes.
fn apply_status(
    mut st: std::sync::MutexGuard<'_, State>,
    notify: &tokio::sync::broadcast::Sender<()>,
    kind: &str,
    key: &str,
    manager: &str,
    force: bool,
    status: Value,
) -> hyper::Response<Body> {
    let k = st.kinds.get_mut(kind).unwrap();
    let Some(obj) = k.objects.get(key) else { return status_with(404, "NotFound", "not found") };
    if let Some(owner) = k.status_manager.get(key)
        && owner != manager
        && obj["status"] != status
        && !force
    {
        let owner = owner.clone();
        return status_with(
            409,
            "Conflict",
            &format!("Apply failed with 1 conflict: conflict with \"{owner}\": .status"),
        );
    }
    k.status_manager.insert(key.to_string(), manager.to_string());
    let api_version = obj["apiVersion"].clone();
    modify(st, notify, kind, key, |obj| {
        obj["status"] = status;
        obj["metadata"]["managedFields"] = json!([{"manager": manager, "operation": "Apply", "subresource": "status",
            "apiVersion": api_version, "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {}}}]);
    })
}

/// Applies `change` to a stored object (404 when there is none), gives it a new
/// `resourceVersion`, streams a `MODIFIED` event to the watchers and answers with the object.
fn modify(
    mut st: std::sync::MutexGuard<'_, State>,
    notify: &tokio::sync::broadcast::Sender<()>,
    kind: &str,
    key: &str,
    change: impl FnOnce(&mut Value),
) -> hyper::Response<Body> {
    if !st.kinds[kind].objects.contains_key(key) {
        return status(404, "NotFound");
    }
    st.rv += 1;
    let rv = st.rv;
    let k = st.kinds.get_mut(kind).unwrap();
    let obj = k.objects.get_mut(key).unwrap();
    let prev = obj.clone();
    change(obj);
    obj["metadata"]["resourceVersion"] = json!(rv.to_string());
    let obj = obj.clone();
    k.log.push((rv, "MODIFIED", obj.clone(), Some(prev)));
    drop(st);
    let _ = notify.send(());
    json_response(200, &obj)
}

/// A Pod object.
pub fn pod(namespace: &str, name: &str, ips: &[&str], labels: Value, phase: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{namespace}-{name}"), "labels": labels,
                     "creationTimestamp": "2026-11-26T00:00:00Z"},
        "spec": {"containers": [{"name": "c", "image": "x"}], "serviceAccountName": format!("{name}-sa"), "nodeName": "node-1"},
        "status": {"phase": phase, "podIP": ips.first().copied().unwrap_or(""),
                   "podIPs": ips.iter().map(|i| json!({"ip": i})).collect::<Vec<_>>()}
    })
}

/// A list's continue token: the version of its first page, and the last key of the page before
/// in hex (nothing in it to escape in a URL): `VERSION-HEXKEY`.
fn continue_token_of(rv: u64, last: &str) -> String {
    let hex: String = last.bytes().map(|b| format!("{b:02x}")).collect();
    format!("{rv}-{hex}")
}

/// The version and the key a [`continue_token_of`] token carries.
fn continue_token(token: &str) -> Option<(u64, String)> {
    let (v, hex) = token.split_once('-')?;
    let bytes: Option<Vec<u8>> =
        (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok()).collect();
    Some((v.parse().ok()?, String::from_utf8(bytes?).ok()?))
}

/// A Namespace object.
pub fn namespace(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_select_as_the_api_server_does() {
        let q = |k: &str, v: &str| HashMap::from([(k.to_string(), v.to_string())]);
        let on = |node: &str, app: &str| json!({"metadata": {"name": "p", "labels": {"app": app}}, "spec": {"nodeName": node}});
        let s = Selector::parse(PODS, &q("fieldSelector", "spec.nodeName%3Dnode-1")).unwrap();
        assert!(s.matches(&on("node-1", "a")) && !s.matches(&on("node-2", "a")));
        let s = Selector::parse(PODS, &q("labelSelector", "app%3Da%2Cenv")).unwrap();
        assert!(!s.matches(&on("n", "a")), "env must exist");
        let s = Selector::parse(PODS, &q("labelSelector", "app!=a")).unwrap();
        assert!(s.matches(&on("n", "b")) && !s.matches(&on("n", "a")));
        assert!(
            Selector::parse(NAMESPACES, &q("fieldSelector", "spec.nodeName=x")).unwrap_err().contains("not supported")
        );
        // Leaving the selection is a DELETED, entering it an ADDED.
        let s = Selector::parse(PODS, &q("labelSelector", "app=a")).unwrap();
        assert_eq!(s.event("MODIFIED", &on("n", "b"), Some(&on("n", "a"))), "DELETED");
        assert_eq!(s.event("MODIFIED", &on("n", "a"), Some(&on("n", "b"))), "ADDED");
        assert_eq!(s.event("MODIFIED", &on("n", "b"), Some(&on("n", "b"))), "");
    }
}
