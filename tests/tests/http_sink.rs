//! The HTTP batch sink against a scripted receiver (a real hyper server in the test) that behaves
//! like Splunk HEC (event endpoint, indexer acknowledgement, 503 with Retry-After) and like
//! Elasticsearch `_bulk` (per-item statuses: 201, 409, 429, 400), and a generic NDJSON webhook:
//! every event arrives, in order, once (or, for `_bulk`, rejected ones go to the dead-letter file).

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use egress_e2e::*;
use http_body_util::BodyExt;
use serde_json::{Value, json};

/// One request the receiver got (body decompressed).
#[derive(Clone, Debug)]
struct Seen {
    path: String,
    headers: HashMap<String, String>,
    body: Vec<u8>,
    at: Instant,
}

type Handler = dyn Fn(&Seen, &mut Store) -> (u16, Vec<(&'static str, String)>, String) + Send + Sync;

/// What the receiver keeps across requests.
#[derive(Default)]
struct Store {
    requests: Vec<Seen>,
    /// Event ids stored, in arrival order.
    ids: Vec<String>,
    counter: u64,
    state: HashMap<String, u64>,
}

struct Receiver {
    addr: SocketAddr,
    store: Arc<Mutex<Store>>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Receiver {
    fn start(handler: Arc<Handler>) -> Receiver {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let store = Arc::new(Mutex::new(Store::default()));
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        let st = store.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
                loop {
                    tokio::select! {
                        _ = &mut rx => return,
                        a = listener.accept() => {
                            let Ok((s, _)) = a else { continue };
                            let (st, h) = (st.clone(), handler.clone());
                            tokio::spawn(async move {
                                let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                                    let (st, h) = (st.clone(), h.clone());
                                    async move {
                                        let path = req.uri().to_string();
                                        let headers: HashMap<String, String> = req.headers().iter()
                                            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string())).collect();
                                        let raw = req.into_body().collect().await.map(|b| b.to_bytes().to_vec()).unwrap_or_default();
                                        let body = if headers.get("content-encoding").map(String::as_str) == Some("gzip") {
                                            let mut out = Vec::new();
                                            flate2::read::GzDecoder::new(&raw[..]).read_to_end(&mut out).expect("gzip body");
                                            out
                                        } else {
                                            raw
                                        };
                                        let seen = Seen { path, headers, body, at: Instant::now() };
                                        let (status, hdrs, text) = {
                                            let mut s = st.lock().unwrap();
                                            s.requests.push(seen.clone());
                                            h(&seen, &mut s)
                                        };
                                        let mut resp = hyper::Response::builder().status(status).header("content-type", "application/json");
                                        for (k, v) in hdrs {
                                            resp = resp.header(k, v);
                                        }
                                        Ok::<_, std::convert::Infallible>(resp.body(http_body_util::Full::new(bytes::Bytes::from(text))).unwrap())
                                    }
                                });
                                let _ = hyper::server::conn::http1::Builder::new()
                                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc).await;
                            });
                        }
                    }
                }
            });
        });
        Receiver { addr, store, _stop: tx }
    }
}

fn policy(port: u16, audit: &str) -> String {
    format!(
        "guard: {{allowCidrs: [127.0.0.2/32]}}\nclients: [{{cidr: 127.0.0.1/32, namespace: ns, name: c, labels: {{}}}}]\n{audit}\npolicies:\n  - apiVersion: egress.dev/v1alpha1\n    kind: EgressPolicy\n    metadata: {{name: p, namespace: ns}}\n    spec:\n      podSelector: {{}}\n      rules: [{{name: up, to: [{{domain: up.test}}], ports: [{{port: {port}}}]}}]\n"
    )
}

fn file_events(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap_or_default().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// The gateway, the event ids its json sink wrote, and the DNS server and upstream it needs.
fn run_requests(n: usize, audit: &str) -> (Gateway, Vec<String>, (Dns, Upstream)) {
    let dns = Dns::start(&[("up.test", "127.0.0.2")]);
    let up = Upstream::start("127.0.0.2");
    let p = up.addr.port();
    let gw = Gateway::start(&dns, &policy(p, audit));
    for i in 0..n {
        assert_eq!(curl(&["-x", &format!("http://{}", gw.http), &format!("http://up.test:{p}/{i}")]).status, 200);
    }
    wait_for("the json sink", Duration::from_secs(10), || file_events(&gw.audit_path()).len() >= 2 * n);
    let ids = file_events(&gw.audit_path()).iter().map(|e| e["id"].as_str().unwrap().to_string()).collect();
    (gw, ids, (dns, up))
}

#[test]
fn splunk_hec_with_acknowledgement_and_retry_after() {
    let rx = Receiver::start(Arc::new(|seen: &Seen, s: &mut Store| {
        if seen.path.ends_with("/services/collector/ack") {
            let v: Value = serde_json::from_slice(&seen.body).unwrap();
            let id = v["acks"][0].as_u64().unwrap();
            // Indexed only at the second poll.
            let polls = s.state.entry(format!("ack{id}")).or_insert(0);
            *polls += 1;
            return (200, vec![], json!({"acks": {id.to_string(): *polls >= 2}}).to_string());
        }
        assert_eq!(seen.headers.get("authorization").map(String::as_str), Some("Splunk 00000000-hec-token"));
        s.counter += 1;
        if s.counter == 1 {
            return (503, vec![("retry-after", "1".into())], r#"{"text":"Server is busy","code":9}"#.into());
        }
        for env in serde_json::Deserializer::from_slice(&seen.body).into_iter::<Value>() {
            let env = env.expect("HEC envelope JSON");
            assert_eq!(env["sourcetype"], "egress:audit");
            assert!(env["time"].as_f64().unwrap() > 1.7e9);
            s.ids.push(env["event"]["id"].as_str().unwrap().to_string());
        }
        (200, vec![], json!({"text": "Success", "code": 0, "ackId": s.counter}).to_string())
    }));
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("hec-token");
    std::fs::write(&token, "00000000-hec-token\n").unwrap();
    let audit = format!(
        "audit:\n  spool: {{dir: $DIR/spool}}\n  sinks:\n    - {{name: file, type: file, path: $DIR/audit.jsonl}}\n    - name: splunk\n      type: http\n      preset: splunk_hec\n      url: http://{}/services/collector/event\n      tokenFile: {}\n      batch: {{maxEvents: 8, maxAge: 200ms}}\n      hec: {{ack: true}}\n",
        rx.addr,
        token.display()
    );
    let (gw, ids, _keep) = run_requests(15, &audit);
    wait_for("every event at HEC", Duration::from_secs(30), || rx.store.lock().unwrap().ids.len() >= ids.len());
    let store = rx.store.lock().unwrap();
    assert_eq!(store.ids, ids, "every event, once, in order");
    let posts: Vec<&Seen> = store.requests.iter().filter(|r| r.path.ends_with("/event")).collect();
    assert!(posts.iter().all(|r| r.headers.get("content-encoding").map(String::as_str) == Some("gzip")));
    let channel = posts[0].headers.get("x-splunk-request-channel").cloned().expect("a channel with acks");
    assert!(store.requests.iter().all(|r| r.headers.get("x-splunk-request-channel") == Some(&channel)));
    for r in &posts {
        let n = serde_json::Deserializer::from_slice(&r.body).into_iter::<Value>().count();
        assert!(n <= 8, "batch.maxEvents: {n}");
    }
    // The busy answer's Retry-After (1 s) was honoured before the next attempt.
    assert!(posts[1].at.duration_since(posts[0].at) >= Duration::from_millis(950), "Retry-After honoured");
    // Every batch was acknowledged before the next one was sent: the receiver answers `true`
    // for an ack id at its second poll, so between two batches the previous batch's id must
    // have been polled twice (the first post got the 503 and no ack id).
    let (mut posts_seen, mut pending, mut polls) = (0u64, None::<u64>, HashMap::<u64, u32>::new());
    for r in &store.requests {
        if r.path.ends_with("/ack") {
            let v: Value = serde_json::from_slice(&r.body).unwrap();
            *polls.entry(v["acks"][0].as_u64().unwrap()).or_default() += 1;
            continue;
        }
        posts_seen += 1;
        if let Some(id) = pending {
            assert!(polls.get(&id).copied().unwrap_or(0) >= 2, "batch {posts_seen} sent before ack {id} was indexed");
        }
        pending = (posts_seen >= 2).then_some(posts_seen);
    }
    assert!(posts_seen >= 3, "several batches: {posts_seen}");
    drop(store);
    wait_for("lag 0", Duration::from_secs(5), || {
        gw.metric("egress_audit_sink_lag_events{sink=\"splunk\"}") == Some(0.0)
    });
}

#[test]
fn elastic_bulk_retries_items_treats_409_as_delivered_and_dead_letters_400() {
    // Per item request: (id, seq, status answered).
    type Answers = Vec<Vec<(String, u64, u16)>>;
    let answers: Arc<Mutex<Answers>> = Arc::default();
    let a2 = answers.clone();
    let rx = Receiver::start(Arc::new(move |seen: &Seen, s: &mut Store| {
        assert_eq!(seen.headers.get("content-type").map(String::as_str), Some("application/x-ndjson"));
        assert_eq!(seen.headers.get("authorization").map(String::as_str), Some("ApiKey ZWxhc3RpYzprZXk="));
        s.counter += 1;
        if s.counter == 1 {
            return (429, vec![("retry-after", "1".into())], r#"{"error":"too many requests"}"#.into());
        }
        let lines: Vec<Value> = seen
            .body
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        let mut items = Vec::new();
        let mut answered = Vec::new();
        for pair in lines.chunks(2) {
            let (action, doc) = (&pair[0], &pair[1]);
            let id = action["create"]["_id"].as_str().unwrap().to_string();
            assert_eq!(action["create"]["_index"], "egress-audit");
            assert_eq!(doc["id"], id.as_str(), "_id is the event id");
            let tries = s.state.entry(id.clone()).or_insert(0);
            *tries += 1;
            let seq = doc["seq"].as_u64().unwrap();
            let status = if s.ids.contains(&id) {
                409
            } else if seq == 5 {
                400
            } else if seq == 3 && *tries <= 2 {
                429
            } else {
                s.ids.push(id.clone());
                201
            };
            answered.push((id.clone(), seq, status));
            let mut item = json!({"_id": id, "status": status});
            if status == 400 {
                item["error"] = json!({"type": "mapper_parsing_exception", "reason": "failed to parse"});
            }
            items.push(json!({"create": item}));
        }
        a2.lock().unwrap().push(answered);
        if s.counter == 2 {
            // Stored, but the answer is lost on the way (a proxy in front of Elasticsearch fails):
            // the whole request goes again and what was stored answers 409.
            return (502, vec![], "bad gateway".into());
        }
        (200, vec![], json!({"took": 1, "errors": true, "items": items}).to_string())
    }));
    let audit = format!(
        "audit:\n  spool: {{dir: $DIR/spool}}\n  sinks:\n    - {{name: file, type: file, path: $DIR/audit.jsonl}}\n    - {{name: elastic, type: http, preset: elastic_bulk, url: \"http://{}/_bulk\", token: ZWxhc3RpYzprZXk=, index: egress-audit, format: json, batch: {{maxEvents: 6, maxAge: 100ms}}}}\n",
        rx.addr
    );
    let (gw, ids, _keep) = run_requests(10, &audit);
    wait_for("every event stored or dead-lettered", Duration::from_secs(30), || {
        rx.store.lock().unwrap().ids.len() + 1 >= ids.len()
    });
    wait_for("lag 0", Duration::from_secs(10), || {
        gw.metric("egress_audit_sink_lag_events{sink=\"elastic\"}") == Some(0.0)
    });
    let store = rx.store.lock().unwrap();
    let answers = answers.lock().unwrap().clone();
    let find = |seq: u64| answers.iter().flatten().find(|(_, s, _)| *s == seq).unwrap().0.clone();
    let (poisoned, slow) = (find(5), find(3));
    let expected: Vec<String> = ids.iter().filter(|i| **i != poisoned).cloned().collect();
    let mut stored = store.ids.clone();
    let mut exp_sorted = expected.clone();
    stored.sort();
    exp_sorted.sort();
    assert_eq!(stored, exp_sorted, "every event stored once, except the rejected one");
    // The lost answer made the whole request go again: what was stored answered 409 and counted
    // as delivered (lag 0 above, nothing stored twice).
    assert!(answers[0].iter().any(|a| a.2 == 201) && answers[1].iter().any(|a| a.2 == 409), "{answers:?}");
    // After an answer with item results, only the items answered 429 go again: the request
    // after seq 3's second 429 carries seq 3 alone.
    let second_429 = answers.iter().position(|r| r.iter().any(|a| a.1 == 3 && a.2 == 429)).unwrap();
    let second_429 = second_429
        + 1
        + answers[second_429 + 1..].iter().position(|r| r.iter().any(|a| a.1 == 3 && a.2 == 429)).unwrap();
    assert_eq!(answers[second_429 + 1], vec![(slow.clone(), 3, 201)], "{answers:?}");
    // The 400 is in the dead-letter file once (the first one's answer was lost), with the
    // receiver's reason.
    let dead = std::fs::read_to_string(gw.dir.path().join("spool/dead-letter/elastic.jsonl")).unwrap();
    let dead: Vec<Value> = dead.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["event"]["id"], poisoned.as_str());
    assert!(dead[0]["rejected"].as_str().unwrap().contains("mapper_parsing_exception"));
    assert_eq!(gw.metric("egress_audit_sink_dead_lettered_total{sink=\"elastic\"}"), Some(1.0));
    assert!(gw.metric("egress_audit_sink_retried_total{sink=\"elastic\"}").unwrap() >= 2.0, "the 429s were retried");
    let first_two: Vec<Instant> = store.requests.iter().take(2).map(|r| r.at).collect();
    // A lower bound only (load can only lengthen the wait): the retry waited for Retry-After.
    assert!(first_two[1].duration_since(first_two[0]) >= Duration::from_millis(950), "Retry-After honoured");
}

#[test]
fn ndjson_webhook_resends_a_failed_batch_with_the_same_idempotency_key() {
    let rx = Receiver::start(Arc::new(|seen: &Seen, s: &mut Store| {
        let key = seen.headers.get("idempotency-key").cloned().expect("Idempotency-Key");
        assert_eq!(seen.headers.get("authorization").map(String::as_str), Some("Bearer webhook-secret"));
        s.counter += 1;
        if s.counter == 2 {
            s.state.insert(format!("failed {key}"), 1);
            return (500, vec![], "oops".into());
        }
        if s.state.contains_key(&key) {
            return (200, vec![], "duplicate ignored".into());
        }
        s.state.insert(key, 1);
        for l in seen.body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let v: Value = serde_json::from_slice(l).unwrap();
            s.ids.push(v["id"].as_str().unwrap().to_string());
        }
        (202, vec![], "".into())
    }));
    let audit = format!(
        "audit:\n  spool: {{dir: $DIR/spool}}\n  sinks:\n    - {{name: file, type: file, path: $DIR/audit.jsonl}}\n    - {{name: hook, type: http, preset: ndjson, url: \"http://{}/ingest\", token: webhook-secret, gzip: false, batch: {{maxEvents: 4, maxAge: 100ms}}}}\n",
        rx.addr
    );
    let (_gw, ids, _keep) = run_requests(8, &audit);
    wait_for("every event at the webhook", Duration::from_secs(30), || rx.store.lock().unwrap().ids.len() >= ids.len());
    let store = rx.store.lock().unwrap();
    assert_eq!(store.ids, ids, "every event, once, in order");
    let failed_key =
        store.state.keys().find_map(|k| k.strip_prefix("failed ")).expect("one request failed").to_string();
    let with_key = store.requests.iter().filter(|r| r.headers.get("idempotency-key") == Some(&failed_key)).count();
    assert!(with_key >= 2, "the failed batch went again with the same Idempotency-Key");
    assert!(store.requests.iter().all(|r| !r.headers.contains_key("content-encoding")), "gzip: false");
}
