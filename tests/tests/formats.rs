//! The `ocsf` and `ecs` sink formats: a run of real requests through every front (allowed,
//! denied, guarded, malformed; HTTP, CONNECT, SOCKS5, transparent TLS) plus a lost range
//! (`audit_gap`) goes to three sinks at once (json, ocsf, ecs). Then
//! - every OCSF event is validated offline against the OCSF 1.5.0 JSON Schema of its class with
//!   its profiles (tests/formats/check_ocsf.py, pinned ocsf-json-schema + jsonschema),
//! - every ECS field is checked for its documented name, type and allowed values
//!   (tests/formats/check_ecs.js, the pinned @elastic/ecs field definitions),
//! - each OCSF and ECS event is compared field by field with the egress.v1 event it came from.
//!
//! The validators are shown to reject broken events too.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use egress_e2e::*;
use serde_json::{Value, json};

fn tools() -> PathBuf {
    tools_dir(&["ecs/ecs_flat.js", "venv/bin/python"])
}

fn check_ocsf(file: &Path) -> (bool, String) {
    let out = Command::new(tools().join("venv/bin/python"))
        .arg(repo_root().join("tests/formats/check_ocsf.py"))
        .arg(file)
        .output()
        .unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn check_ecs(file: &Path) -> (bool, String) {
    let out = Command::new("node")
        .arg(repo_root().join("tests/formats/check_ecs.js"))
        .arg(tools().join("ecs/ecs_flat.js"))
        .arg(file)
        .output()
        .unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: not JSON ({e}): {l}", path.display())))
        .collect()
}

const RELAY_IP: &str = "127.0.0.7";

#[test]
fn ocsf_and_ecs_events_are_valid_and_carry_the_same_facts() {
    let dns = Dns::start(&[("up.test", "127.0.0.2"), ("no.test", "127.0.0.2"), ("meta.test", "169.254.169.254")]);
    let up = Upstream::start("127.0.0.2");
    let tls = TlsUpstream::start("127.0.0.2", "up.test");
    let (p, tp) = (up.addr.port(), tls.addr.port());
    let dir = tempfile::tempdir().unwrap();
    // A stalled json sink (a FIFO nobody reads, 4 KiB pipe) fills the small spool, so that
    // failOpen loses a range and writes an audit_gap event, which the other sinks receive.
    let fifo = dir.path().join("stalled.fifo");
    let reader = small_fifo(&fifo);
    let key = dir.path().join("checkpoint-key.pem");
    assert!(
        Command::new("openssl")
            .args(["genpkey", "-algorithm", "ed25519", "-out"])
            .arg(&key)
            .status()
            .unwrap()
            .success()
    );
    let body = format!(
        r#"
transparent: {{trustedRelays: ["{RELAY_IP}/32"], relayKeyFile: $RELAY_KEY}}
guard: {{allowCidrs: [127.0.0.2/32]}}
clients: [{{cidr: 127.0.0.1/32, namespace: shop, name: api-7f9c, serviceAccount: api, labels: {{app.kubernetes.io/name: api}}}}]
audit:
  onFailure: failOpen
  spool: {{dir: $DIR/spool, maxBytes: 65536, segmentBytes: 16384}}
  checkpoint: {{keyFile: {key}, every: 10}}
  sinks:
    - {{name: native, type: file, path: $DIR/json.jsonl, format: json}}
    - {{name: ocsf, type: file, path: $DIR/ocsf.jsonl, format: ocsf}}
    - {{name: ecs, type: file, path: $DIR/ecs.jsonl, format: ecs}}
    - {{name: stalled, type: file, path: {fifo}, format: json}}
policies:
  - apiVersion: egress.dev/v1alpha1
    kind: EgressPolicy
    metadata: {{name: api, namespace: shop}}
    spec:
      podSelector: {{}}
      rules:
        - name: up
          to: [{{domain: up.test}}, {{domain: meta.test}}]
          ports: [{{port: {p}}}, {{port: {tp}}}]
"#,
        fifo = fifo.display(),
        key = key.display()
    );
    let gw = Gateway::start(&dns, &body);
    let proxy = format!("http://{}", gw.http);
    let socks = gw.socks.to_string();
    assert_eq!(curl(&["-x", &proxy, &format!("http://up.test:{p}/get")]).status, 200);
    assert_eq!(curl(&["-x", &proxy, "-X", "POST", "-d", "x=1", &format!("http://up.test:{p}/post")]).status, 200);
    assert_eq!(curl(&["-x", &proxy, "-X", "PATCH", &format!("http://up.test:{p}/patch")]).status, 200);
    assert_eq!(curl(&["-x", &proxy, &format!("http://no.test:{p}/")]).status, 403);
    assert_eq!(curl(&["-x", &proxy, &format!("http://meta.test:{p}/")]).status, 403);
    assert_eq!(curl(&["-x", &proxy, "http://169.254.169.254/latest/meta-data/"]).status, 403);
    assert_eq!(curl(&["-p", "-x", &proxy, &format!("http://up.test:{p}/tunnel")]).status, 200);
    assert_ne!(curl(&["-p", "-x", &proxy, &format!("http://no.test:{p}/")]).status, 200);
    assert_eq!(curl(&["--socks5-hostname", &socks, &format!("http://up.test:{p}/socks")]).status, 200);
    assert_ne!(curl(&["--socks5-hostname", &socks, &format!("http://no.test:{p}/")]).status, 200);
    // Origin-form to the proxy port: malformed for a proxy.
    assert_eq!(curl(&[&format!("http://{}/", gw.http)]).status, 400);
    // Transparent TLS: decided by SNI.
    let relay = TestRelay::start(gw.transparent, RELAY_IP, format!("198.51.100.9:{tp}").parse().unwrap());
    let to = format!("up.test:{tp}:127.0.0.1:{}", relay.addr.port());
    let r =
        curl(&["--cacert", &tls.cert.display().to_string(), "--connect-to", &to, &format!("https://up.test:{tp}/")]);
    assert_eq!(r.status, 200, "{r:?}");
    // Fill the spool (the stalled sink holds it) until events are lost, then let it drain.
    let start = Instant::now();
    while gw.metric("egress_audit_dropped").unwrap_or(0.0) < 2.0 {
        assert_eq!(curl(&["-x", &proxy, &format!("http://up.test:{p}/fill")]).status, 200);
        assert!(start.elapsed() < Duration::from_secs(60), "the spool never filled");
    }
    std::thread::spawn(move || {
        use std::io::Read;
        let mut r = reader;
        let mut buf = vec![0u8; 65536];
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(60) {
            match r.read(&mut buf) {
                Ok(n) if n > 0 => {}
                _ => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    let start = Instant::now();
    while gw.metric("egress_audit_unavailable") != Some(0.0) {
        assert!(start.elapsed() < Duration::from_secs(30), "audit did not recover");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(curl(&["-x", &proxy, &format!("http://up.test:{p}/after")]).status, 200);
    let (json_f, ocsf_f, ecs_f) =
        (gw.dir.path().join("json.jsonl"), gw.dir.path().join("ocsf.jsonl"), gw.dir.path().join("ecs.jsonl"));
    let start = Instant::now();
    let native = loop {
        let n = lines(&json_f);
        let done = n.iter().any(|e| e["target"]["http"]["path"] == "/after" && e["event"] == "close");
        if done && lines(&ocsf_f).len() == n.len() && lines(&ecs_f).len() == n.len() {
            break n;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "sinks did not catch up");
        std::thread::sleep(Duration::from_millis(50));
    };
    let (ocsf, ecs) = (lines(&ocsf_f), lines(&ecs_f));

    // Every kind of event is in the sample.
    let has = |f: &dyn Fn(&Value) -> bool| native.iter().any(f);
    for (what, present) in [
        ("http allow", has(&|e| e["front"] == "http" && e["decision"]["action"] == "allow")),
        ("http deny", has(&|e| e["decision"]["reason"] == "no_rule_matched")),
        ("guard", has(&|e| e["decision"]["reason"] == "guard_blocked")),
        ("dns guard", has(&|e| e["decision"]["reason"] == "dns_guard_blocked")),
        ("connect close", has(&|e| e["front"] == "connect" && e["event"] == "close")),
        ("socks5 allow", has(&|e| e["front"] == "socks5" && e["decision"]["action"] == "allow")),
        ("socks5 deny", has(&|e| e["front"] == "socks5" && e["decision"]["action"] == "deny")),
        ("socks5 close", has(&|e| e["front"] == "socks5" && e["event"] == "close")),
        ("transparent", has(&|e| e["front"] == "transparent" && e["transparent"]["sni"] == "up.test")),
        ("malformed", has(&|e| e["decision"]["reason"] == "origin_form")),
        ("gap", has(&|e| e["event"] == "audit_gap")),
        ("checkpoint", has(&|e| e["event"] == "checkpoint")),
        ("PATCH", has(&|e| e["target"]["http"]["method"] == "PATCH")),
    ] {
        assert!(present, "{what} missing from the sample");
    }

    let (ok, report) = check_ocsf(&ocsf_f);
    assert!(ok, "OCSF validation:\n{report}");
    assert!(report.contains(&format!("{} OCSF events checked, 0 errors", native.len())), "{report}");
    let (ok, report) = check_ecs(&ecs_f);
    assert!(ok, "ECS validation:\n{report}");
    assert!(report.contains(&format!("{} ECS events checked, 0 errors", native.len())), "{report}");

    // Field by field: the same facts, in the same order.
    for ((n, o), e) in native.iter().zip(&ocsf).zip(&ecs) {
        assert_eq!(o["metadata"]["uid"], n["id"]);
        assert_eq!(o["metadata"]["sequence"], n["seq"]);
        assert_eq!(e["event"]["id"], n["id"]);
        assert_eq!(e["event"]["sequence"], n["seq"]);
        assert_eq!(e["@timestamp"], n["time"]);
        assert_eq!(o["metadata"]["original_time"], n["time"]);
        assert_eq!(o["unmapped"]["egress"]["hash"], n["hash"]);
        assert_eq!(e["egress"]["prev_hash"], n["prev_hash"]);
        if n["event"] == "audit_gap" {
            assert_eq!(o["class_uid"], 1008);
            assert_eq!(o["unmapped"]["egress"]["gap"], n["gap"]);
            assert_eq!(e["event"]["action"], "audit-gap");
            assert_eq!(e["egress"]["gap"], n["gap"]);
            continue;
        }
        if n["event"] == "checkpoint" {
            assert_eq!((o["class_uid"].as_u64(), o["activity_name"].as_str()), (Some(1008), Some("Checkpoint")));
            assert_eq!(o["unmapped"]["egress"]["checkpoint"], n["checkpoint"]);
            assert_eq!(e["event"]["action"], "audit-checkpoint");
            assert_eq!(e["egress"]["checkpoint"], n["checkpoint"]);
            continue;
        }
        let front = n["front"].as_str().unwrap();
        let allow = n["decision"]["action"] == "allow";
        let expected_class = if front == "http" || front == "connect" { 4002 } else { 4001 };
        assert_eq!(o["class_uid"], expected_class, "{n}");
        assert_eq!(o["action_id"], if allow { 1 } else { 2 });
        assert_eq!(o["status_code"], n["decision"]["reason"]);
        assert_eq!(o["src_endpoint"]["ip"], n["client"]["address"]);
        assert_eq!(o["src_endpoint"]["port"], n["client"]["port"]);
        assert_eq!(o["connection_info"]["direction_id"], 2);
        assert_eq!(o["connection_info"]["uid"], n["connection_id"]);
        assert_eq!(o["proxy_endpoint"]["uid"], n["instance"]);
        assert_eq!(e["source"]["ip"], n["client"]["address"]);
        assert_eq!(e["event"]["reason"], n["decision"]["reason"]);
        assert_eq!(
            e["event"]["outcome"],
            if n["event"] == "close" {
                if n["close"]["end"] == "completed" { "success" } else { "failure" }
            } else if allow {
                "success"
            } else {
                "failure"
            }
        );
        assert_eq!(e["observer"]["type"], "proxy");
        if n["target"]["port"].as_u64().unwrap_or(0) > 0 {
            assert_eq!(o["dst_endpoint"]["port"], n["target"]["port"]);
            assert_eq!(e["destination"]["port"], n["target"]["port"]);
        }
        if let Some(d) = n["dialled"].as_str() {
            let ip = d.parse::<std::net::SocketAddr>().unwrap().ip().to_string();
            assert_eq!(o["dst_endpoint"]["ip"], ip);
            assert_eq!(e["destination"]["ip"], ip);
        }
        if let Some(policy) = n["decision"]["policy"].as_str() {
            assert_eq!(o["policy"]["name"], policy);
            assert_eq!(e["rule"]["ruleset"], policy);
            if let Some(rule) = n["decision"]["rule"].as_str() {
                assert_eq!(o["firewall_rule"]["name"], rule);
                assert_eq!(e["rule"]["name"], rule);
            }
        }
        if let Some(m) = n["target"]["http"]["method"].as_str() {
            if m == "PATCH" {
                assert_eq!((o["activity_id"].as_u64(), o["activity_name"].as_str()), (Some(99), Some("PATCH")));
            } else {
                assert_eq!(o["http_request"]["http_method"], m);
            }
            assert_eq!(e["http"]["request"]["method"], m);
            assert_eq!(e["url"]["path"], n["target"]["http"]["path"]);
        }
        if let Some(ns) = n["client"]["namespace"].as_str() {
            assert_eq!(e["orchestrator"]["namespace"], ns);
            assert_eq!(e["orchestrator"]["resource"]["name"], n["client"]["name"]);
            assert_eq!(o["unmapped"]["kubernetes"]["namespace"], ns);
            assert_eq!(o["src_endpoint"]["owner"]["name"], format!("system:serviceaccount:{ns}:api"));
        }
        if let Some(sni) = n["transparent"]["sni"].as_str() {
            assert_eq!(e["tls"]["client"]["server_name"], sni);
            assert_eq!(o["unmapped"]["egress"]["transparent"]["sni"], sni);
        }
        if n["event"] == "close" {
            let c = &n["close"];
            // OCSF: bytes_out = source to destination; ECS: source.bytes = sent by the source.
            assert_eq!(o["traffic"]["bytes_out"], c["bytes_up"]);
            assert_eq!(o["traffic"]["bytes_in"], c["bytes_down"]);
            assert_eq!(o["duration"], c["duration_ms"]);
            assert_eq!(e["source"]["bytes"], c["bytes_up"]);
            assert_eq!(e["destination"]["bytes"], c["bytes_down"]);
            assert_eq!(e["event"]["duration"], c["duration_ms"].as_u64().unwrap() * 1_000_000);
            if front == "socks5" || front == "transparent" {
                assert_eq!(o["activity_id"], 2, "Network Activity: Close");
            }
            if let Some(code) = c["http_status"].as_u64() {
                assert_eq!(o["http_response"]["code"], code);
                assert_eq!(e["http"]["response"]["status_code"], code);
            }
        } else if front == "socks5" || front == "transparent" {
            assert_eq!(o["activity_id"], if allow { 1 } else { 5 }, "Network Activity: Open / Refuse");
        }
    }
}

#[test]
fn the_validators_reject_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let good_ocsf = json!({
        "class_uid": 4001, "category_uid": 4, "activity_id": 1, "type_uid": 400101, "severity_id": 1,
        "time": 1_790_000_000_000_i64, "metadata": {"version": "1.5.0", "product": {"name": "x"}, "profiles": ["security_control"]},
        "action_id": 1, "disposition_id": 1, "src_endpoint": {"ip": "10.0.0.1"},
    });
    let write = |name: &str, v: &Value| {
        let f = dir.path().join(name);
        std::fs::write(&f, format!("{v}\n")).unwrap();
        f
    };
    assert!(check_ocsf(&write("good.jsonl", &good_ocsf)).0, "{}", check_ocsf(&write("good.jsonl", &good_ocsf)).1);
    for (what, patch) in [
        ("unknown attribute", json!({"proxy_endpointz": {}})),
        ("wrong type", json!({"time": "yesterday"})),
        ("enum", json!({"action_id": 7})),
        ("type_uid", json!({"type_uid": 400102})),
        ("profile attribute without the profile", json!({"proxy_endpoint": {"name": "gw"}})),
    ] {
        let mut bad = good_ocsf.clone();
        for (k, v) in patch.as_object().unwrap() {
            bad[k] = v.clone();
        }
        let (ok, report) = check_ocsf(&write("bad.jsonl", &bad));
        assert!(!ok, "OCSF validator accepted an event with a wrong {what}: {report}");
    }
    let good_ecs = json!({"@timestamp": "2026-11-26T10:00:00Z", "event": {"kind": "event", "category": ["network"], "type": ["connection"], "outcome": "success"},
        "source": {"ip": "10.0.0.1", "port": 4000}, "egress": {"anything": [1, {"x": 2}]}});
    assert!(check_ecs(&write("good-ecs.jsonl", &good_ecs)).0, "{}", check_ecs(&write("g.jsonl", &good_ecs)).1);
    for (what, path, value) in [
        ("unknown field", "source", json!({"ipaddress": "10.0.0.1"})),
        ("wrong type", "source", json!({"ip": "not-an-ip"})),
        ("allowed value", "event", json!({"kind": "happening", "category": ["network"], "type": ["connection"]})),
        ("type for category", "event", json!({"kind": "event", "category": ["network"], "type": ["creation"]})),
        (
            "array",
            "event",
            json!({"kind": "event", "category": ["network"], "type": ["connection"], "outcome": ["success"]}),
        ),
    ] {
        let mut bad = good_ecs.clone();
        bad[path] = value;
        let (ok, report) = check_ecs(&write("bad-ecs.jsonl", &bad));
        assert!(!ok, "ECS checker accepted an event with a wrong {what}: {report}");
    }
}
