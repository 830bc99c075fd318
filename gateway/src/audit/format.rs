//! Sink formats: the native `egress.v1` JSON lines, OCSF 1.5.0 and ECS. Both mappings start
//! from the egress.v1 event as written (one parsed line), so every sink of every format carries
//! the same facts; the field tables are in docs/audit.md.

use serde_json::{Map, Value, json};

use crate::config::AuditFormat;

/// The OCSF version the `ocsf` format follows.
pub(crate) const OCSF_VERSION: &str = "1.5.0";
/// The ECS version the `ecs` format declares in `ecs.version`.
pub(crate) const ECS_VERSION: &str = "8.11.0";
const PRODUCT: &str = "egress-gateway";

/// What a formatter knows besides the event: who is writing.
#[derive(Debug, Clone)]
pub(crate) struct Context {
    /// The host the gateway runs on.
    pub hostname: String,
}

impl Context {
    /// The local host name (`HOSTNAME`, else `/proc/sys/kernel/hostname`, else empty).
    pub(crate) fn local() -> Context {
        let hostname = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|s| s.trim().to_string()))
            .unwrap_or_default();
        Context { hostname }
    }
}

/// Renders whole egress.v1 lines into `out` in `format` (one line per event). A line that is not
/// valid JSON (cannot happen: the writer produced it) is passed through as it is.
pub(crate) fn render(format: AuditFormat, ctx: &Context, lines: &[u8], out: &mut Vec<u8>) {
    for line in lines.split_inclusive(|b| *b == b'\n') {
        let body = line.strip_suffix(b"\n").unwrap_or(line);
        if body.is_empty() {
            continue;
        }
        let mapped = match serde_json::from_slice::<Value>(body) {
            Ok(ev) => match format {
                AuditFormat::Json => None,
                AuditFormat::Ocsf => Some(ocsf(&ev, ctx)),
                AuditFormat::Ecs => Some(ecs(&ev, ctx)),
            },
            Err(_) => None,
        };
        match mapped {
            Some(v) if serde_json::to_writer(&mut *out, &v).is_ok() => {}
            _ => out.extend_from_slice(body),
        }
        out.push(b'\n');
    }
}

fn s<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_str()
}

fn u(v: &Value, path: &[&str]) -> Option<u64> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_u64()
}

/// Milliseconds since the epoch of an RFC 3339 time.
fn epoch_ms(t: &str) -> i64 {
    time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
        .map(|d| (d.unix_timestamp_nanos() / 1_000_000) as i64)
        .unwrap_or(0)
}

/// Inserts `v` under `k` unless it is null (OCSF and ECS both prefer absent to null).
fn put(m: &mut Map<String, Value>, k: &str, v: Value) {
    if !v.is_null() {
        m.insert(k.to_string(), v);
    }
}

fn ip_of(addr: &str) -> Option<String> {
    addr.parse::<std::net::SocketAddr>().ok().map(|a| a.ip().to_string())
}

/// The target: `name_key` = the host when it is a name, `ip` = the dialled address (or the
/// IP-literal target), `port`.
fn destination(ev: &Value, name_key: &str) -> Map<String, Value> {
    let host = s(ev, &["target", "host"]).unwrap_or("");
    let mut m = Map::new();
    if is_name(host) {
        put(&mut m, name_key, json!(host));
    }
    if let Some(d) = s(ev, &["dialled"]) {
        put(&mut m, "ip", json!(ip_of(d)));
    } else if !host.is_empty() && !is_name(host) {
        put(&mut m, "ip", json!(host.trim_start_matches('[').trim_end_matches(']')));
    }
    if let Some(port) = u(ev, &["target", "port"]).filter(|p| *p > 0) {
        put(&mut m, "port", json!(port));
    }
    m
}

/// The facts of a traffic event (`decision` or `close`) both mappings start from.
struct Traffic<'a> {
    front: &'a str,
    allow: bool,
    reason: &'a str,
    close: bool,
    host: &'a str,
    port: u64,
    method: Option<&'a str>,
    /// `allowed`, `denied` or `closed`, for the one-line message.
    verb: &'static str,
}

impl<'a> Traffic<'a> {
    fn of(ev: &'a Value) -> Traffic<'a> {
        let allow = s(ev, &["decision", "action"]) == Some("allow");
        let close = s(ev, &["event"]) == Some("close");
        Traffic {
            front: s(ev, &["front"]).unwrap_or(""),
            allow,
            reason: s(ev, &["decision", "reason"]).unwrap_or(""),
            close,
            host: s(ev, &["target", "host"]).unwrap_or(""),
            port: u(ev, &["target", "port"]).unwrap_or(0),
            method: s(ev, &["target", "http", "method"]),
            verb: if close {
                "closed"
            } else if allow {
                "allowed"
            } else {
                "denied"
            },
        }
    }
}

/// An event about the audit log itself (`audit_gap`, `checkpoint`), not about traffic.
struct LogEvent {
    activity: &'static str,
    ecs_action: &'static str,
    ok: bool,
    message: String,
}

fn log_event(ev: &Value) -> Option<LogEvent> {
    match s(ev, &["event"])? {
        "audit_gap" => {
            let (from, to) = (u(ev, &["gap", "from_seq"]).unwrap_or(0), u(ev, &["gap", "to_seq"]).unwrap_or(0));
            Some(LogEvent {
                activity: "Audit Gap",
                ecs_action: "audit-gap",
                ok: false,
                message: format!("audit events {from}..={to} of instance {} were lost", ev["instance"]),
            })
        }
        "checkpoint" => Some(LogEvent {
            activity: "Checkpoint",
            ecs_action: "audit-checkpoint",
            ok: true,
            message: format!(
                "signed checkpoint of events up to {} of instance {}",
                u(ev, &["checkpoint", "covers_to_seq"]).unwrap_or(0),
                ev["instance"]
            ),
        }),
        _ => None,
    }
}

/// Whether a target host is a name (not an IP literal).
fn is_name(host: &str) -> bool {
    host.trim_start_matches('[').trim_end_matches(']').parse::<std::net::IpAddr>().is_err()
}

fn severity(reason: &str, allow: bool) -> (u64, &'static str) {
    if allow {
        return (1, "Informational");
    }
    match reason {
        // Someone tried a metadata or internal address: worth a look.
        "guard_blocked"
        | "guard_blocked_name"
        | "guard_internal"
        | "dns_guard_blocked"
        | "dns_internal_address"
        | "untrusted_relay" => (3, "Medium"),
        _ => (2, "Low"),
    }
}

/// The egress.v1 fields OCSF and ECS have no place for, kept verbatim.
fn extras(ev: &Value) -> Value {
    let mut m = Map::new();
    for k in
        ["front", "instance", "connection_id", "request_id", "resolved", "egress_source", "egress_pool", "transparent"]
    {
        if let Some(v) = ev.get(k) {
            m.insert(k.to_string(), v.clone());
        }
    }
    if let Some(d) = ev.get("decision") {
        let mut dm = Map::new();
        for k in ["reason", "mode", "guard_exempt", "guard_category", "detail"] {
            if let Some(v) = d.get(k) {
                dm.insert(k.to_string(), v.clone());
            }
        }
        m.insert("decision".into(), Value::Object(dm));
    }
    if let Some(c) = ev.get("close") {
        let mut cm = Map::new();
        for k in ["end", "error"] {
            if let Some(v) = c.get(k) {
                cm.insert(k.to_string(), v.clone());
            }
        }
        m.insert("close".into(), Value::Object(cm));
    }
    for k in ["gap", "checkpoint", "prev_hash", "hash"] {
        if let Some(v) = ev.get(k) {
            m.insert(k.to_string(), v.clone());
        }
    }
    Value::Object(m)
}

/// The client's Kubernetes (or `clients` table) identity.
fn kubernetes(ev: &Value) -> Value {
    let c = &ev["client"];
    if c.get("namespace").is_none() {
        return Value::Null;
    }
    let mut m = Map::new();
    for (from, to) in
        [("namespace", "namespace"), ("name", "pod"), ("serviceAccount", "service_account"), ("labels", "labels")]
    {
        if let Some(v) = c.get(from) {
            m.insert(to.into(), v.clone());
        }
    }
    Value::Object(m)
}

/// One egress.v1 event as OCSF 1.5.0: HTTP Activity (4002) for the `http` and `connect` fronts,
/// Network Activity (4001) for `socks5` and `transparent`, Event Log Activity (1008) for
/// `audit_gap`; profiles `security_control` and `network_proxy`.
pub(crate) fn ocsf(ev: &Value, ctx: &Context) -> Value {
    let kind = s(ev, &["event"]).unwrap_or("");
    let time = s(ev, &["time"]).unwrap_or("");
    let mut out = Map::new();
    let mut metadata = json!({
        "version": OCSF_VERSION,
        "product": {"name": PRODUCT, "vendor_name": PRODUCT, "version": env!("CARGO_PKG_VERSION")},
        "uid": ev["id"],
        "sequence": ev["seq"],
        "original_time": time,
        "log_name": "egress.v1",
        "event_code": kind,
        "profiles": ["security_control", "network_proxy"],
    });
    if let Some(r) = s(ev, &["request_id"]) {
        metadata["correlation_uid"] = json!(r);
    }
    let proxy_endpoint = json!({"name": PRODUCT, "hostname": ctx.hostname, "uid": ev["instance"]});
    if let Some(log) = log_event(ev) {
        metadata["profiles"] = json!([]);
        put(&mut out, "class_uid", json!(1008));
        put(&mut out, "class_name", json!("Event Log Activity"));
        put(&mut out, "category_uid", json!(1));
        put(&mut out, "category_name", json!("System Activity"));
        put(&mut out, "activity_id", json!(99));
        put(&mut out, "activity_name", json!(log.activity));
        put(&mut out, "type_uid", json!(100899));
        put(&mut out, "type_name", json!("Event Log Activity: Other"));
        let (sev_id, sev, status_id, status) =
            if log.ok { (1, "Informational", 1, "Success") } else { (4, "High", 2, "Failure") };
        put(&mut out, "severity_id", json!(sev_id));
        put(&mut out, "severity", json!(sev));
        put(&mut out, "status_id", json!(status_id));
        put(&mut out, "status", json!(status));
        put(&mut out, "message", json!(log.message));
        put(&mut out, "log_name", json!("egress.v1"));
        put(&mut out, "log_provider", json!(PRODUCT));
        put(&mut out, "time", json!(epoch_ms(time)));
        put(&mut out, "metadata", metadata);
        put(&mut out, "unmapped", json!({"egress": extras(ev)}));
        return Value::Object(out);
    }
    let Traffic { front, allow, reason, close, host, port, method, verb } = Traffic::of(ev);
    let http_class = front == "http" || front == "connect";

    let (class_uid, class_name, activity_id, activity_name) = if http_class {
        let m = if front == "connect" { "CONNECT" } else { method.unwrap_or("") };
        let (id, name) = match m {
            "CONNECT" => (1, "Connect"),
            "DELETE" => (2, "Delete"),
            "GET" => (3, "Get"),
            "HEAD" => (4, "Head"),
            "OPTIONS" => (5, "Options"),
            "POST" => (6, "Post"),
            "PUT" => (7, "Put"),
            "TRACE" => (8, "Trace"),
            "" => (0, "Unknown"),
            _ => (99, "Other"),
        };
        (4002, "HTTP Activity", id, name)
    } else {
        let (id, name) = match (close, allow) {
            (true, _) => (2, "Close"),
            (false, true) => (1, "Open"),
            (false, false) => (5, "Refuse"),
        };
        (4001, "Network Activity", id, name)
    };
    let (sev_id, sev) = severity(reason, allow);
    put(&mut out, "class_uid", json!(class_uid));
    put(&mut out, "class_name", json!(class_name));
    put(&mut out, "category_uid", json!(4));
    put(&mut out, "category_name", json!("Network Activity"));
    put(&mut out, "activity_id", json!(activity_id));
    put(&mut out, "activity_name", json!(if activity_id == 99 { method.unwrap_or("Other") } else { activity_name }));
    put(&mut out, "type_uid", json!(class_uid * 100 + activity_id));
    put(&mut out, "type_name", json!(format!("{class_name}: {activity_name}")));
    put(&mut out, "severity_id", json!(sev_id));
    put(&mut out, "severity", json!(sev));
    put(&mut out, "time", json!(epoch_ms(time)));
    put(&mut out, "status_id", json!(if allow { 1 } else { 2 }));
    put(&mut out, "status", json!(if allow { "Success" } else { "Failure" }));
    put(&mut out, "status_code", json!(reason));
    if let Some(d) = s(ev, &["decision", "detail"]).or_else(|| s(ev, &["close", "error"])) {
        put(&mut out, "status_detail", json!(d));
    }
    let target = if http_class && method.is_some() {
        format!("{} http://{host}:{port}{}", method.unwrap_or(""), s(ev, &["target", "http", "path"]).unwrap_or(""))
    } else {
        format!("{host}:{port}")
    };
    put(&mut out, "message", json!(format!("{front} {target} {verb} ({reason})")));
    put(&mut out, "metadata", metadata);

    // Who: the client address, its Pod and service account.
    let mut src = json!({"ip": ev["client"]["address"], "port": ev["client"]["port"]});
    if let Some(n) = s(ev, &["client", "name"]) {
        src["name"] = json!(n);
    }
    if let (Some(ns), Some(sa)) = (s(ev, &["client", "namespace"]), s(ev, &["client", "serviceAccount"])) {
        src["owner"] =
            json!({"name": format!("system:serviceaccount:{ns}:{sa}"), "type_id": 99, "type": "ServiceAccount"});
    }
    put(&mut out, "src_endpoint", src);
    // Where to: the name asked for, the address dialled.
    put(&mut out, "dst_endpoint", Value::Object(destination(ev, "hostname")));
    let mut conn = json!({"direction_id": 2, "direction": "Outbound", "protocol_name": "tcp", "protocol_num": 6});
    if let Some(c) = s(ev, &["connection_id"]) {
        conn["uid"] = json!(c);
    }
    put(&mut out, "connection_info", conn);
    if http_class {
        let mut url = json!({"hostname": host, "port": port});
        match s(ev, &["target", "http", "path"]) {
            Some(path) => {
                url["path"] = json!(path);
                url["scheme"] = json!("http");
                url["url_string"] = json!(format!("http://{host}:{port}{path}"));
            }
            // CONNECT: the request target is the authority.
            None => url["url_string"] = json!(format!("{host}:{port}")),
        }
        let mut req = json!({"url": url});
        let m = if front == "connect" { Some("CONNECT") } else { method };
        // OCSF 1.5.0 lists these methods; others (PATCH, WebDAV...) are named by activity_name.
        if let Some(m) =
            m.filter(|m| ["CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "POST", "PUT", "TRACE"].contains(m))
        {
            req["http_method"] = json!(m);
        }
        put(&mut out, "http_request", req);
        if let Some(code) = u(ev, &["close", "http_status"]) {
            put(&mut out, "http_response", json!({"code": code}));
        }
    }
    if close {
        let (up, down) = (u(ev, &["close", "bytes_up"]).unwrap_or(0), u(ev, &["close", "bytes_down"]).unwrap_or(0));
        let duration = u(ev, &["close", "duration_ms"]).unwrap_or(0);
        // OCSF: bytes_out from the source (client) to the destination, bytes_in back.
        put(&mut out, "traffic", json!({"bytes_out": up, "bytes_in": down, "bytes": up + down}));
        put(&mut out, "duration", json!(duration));
        put(&mut out, "end_time", json!(epoch_ms(time)));
        put(&mut out, "start_time", json!(epoch_ms(time) - duration as i64));
    }
    // security_control profile.
    let audit_only = reason == "audit_would_deny";
    put(&mut out, "action_id", json!(if allow { 1 } else { 2 }));
    put(&mut out, "action", json!(if allow { "Allowed" } else { "Denied" }));
    let (disp_id, disp) = if audit_only {
        (17, "Logged")
    } else if allow {
        (1, "Allowed")
    } else {
        (2, "Blocked")
    };
    put(&mut out, "disposition_id", json!(disp_id));
    put(&mut out, "disposition", json!(disp));
    if let Some(p) = s(ev, &["decision", "policy"]) {
        put(&mut out, "policy", json!({"name": p, "uid": p, "is_applied": !audit_only}));
        if let Some(r) = s(ev, &["decision", "rule"]) {
            put(&mut out, "firewall_rule", json!({"name": r, "uid": format!("{p}/{r}"), "type": "EgressPolicy"}));
        }
    }
    // network_proxy profile: the gateway itself.
    put(&mut out, "proxy_endpoint", proxy_endpoint);
    let mut unmapped = Map::new();
    unmapped.insert("egress".into(), extras(ev));
    put(&mut unmapped, "kubernetes", kubernetes(ev));
    put(&mut out, "unmapped", Value::Object(unmapped));
    Value::Object(out)
}

/// One egress.v1 event as ECS: categorisation `event.*`, `source.*`, `destination.*`, `url.*`,
/// `http.*`, `tls.client.server_name`, `rule.*`, `orchestrator.*`, `observer.*`, `network.*`;
/// everything else under the custom `egress.*` object.
pub(crate) fn ecs(ev: &Value, ctx: &Context) -> Value {
    let time = s(ev, &["time"]).unwrap_or("");
    let mut out = Map::new();
    put(&mut out, "@timestamp", json!(time));
    put(&mut out, "ecs", json!({"version": ECS_VERSION}));
    put(
        &mut out,
        "observer",
        json!({"type": "proxy", "product": PRODUCT, "vendor": PRODUCT, "version": env!("CARGO_PKG_VERSION"),
               "hostname": ctx.hostname, "name": ev["instance"]}),
    );
    let mut event = json!({
        "kind": "event", "id": ev["id"], "sequence": ev["seq"], "dataset": "egress_gateway.audit",
        "module": "egress_gateway", "created": time,
    });
    if let Some(log) = log_event(ev) {
        event["category"] = json!(["configuration"]);
        event["type"] = json!(["info"]);
        event["action"] = json!(log.ecs_action);
        event["outcome"] = json!(if log.ok { "success" } else { "failure" });
        event["reason"] = json!(log.message);
        put(&mut out, "event", event);
        put(&mut out, "message", json!(log.message));
        put(&mut out, "egress", extras(ev));
        return Value::Object(out);
    }
    let Traffic { front, allow, reason, close, host, port, method, verb } = Traffic::of(ev);

    let mut category = vec!["network"];
    if front == "http" || front == "connect" {
        category.push("web");
    }
    event["category"] = json!(category);
    event["type"] = if close {
        json!(["connection", "end"])
    } else if allow {
        json!(["connection", "start", "allowed"])
    } else {
        json!(["connection", "denied"])
    };
    event["action"] = json!(if close { "egress-close" } else { "egress-decision" });
    event["outcome"] = json!(if close {
        if s(ev, &["close", "end"]) == Some("completed") { "success" } else { "failure" }
    } else if allow {
        "success"
    } else {
        "failure"
    });
    event["reason"] = json!(reason);
    if close {
        let ms = u(ev, &["close", "duration_ms"]).unwrap_or(0);
        event["duration"] = json!(ms.saturating_mul(1_000_000));
        event["end"] = json!(time);
    }
    put(&mut out, "event", event);
    put(&mut out, "message", json!(format!("{front} {host}:{port} {verb} ({reason})")));

    let mut source =
        json!({"ip": ev["client"]["address"], "port": ev["client"]["port"], "address": ev["client"]["address"]});
    let mut destination = destination(ev, "domain");
    put(&mut destination, "address", json!(host));
    let mut network = json!({"direction": "egress", "transport": "tcp"});
    if let Some(ip) = ev["client"]["address"].as_str() {
        network["type"] = json!(if ip.contains(':') { "ipv6" } else { "ipv4" });
    }
    if close {
        let (up, down) = (u(ev, &["close", "bytes_up"]).unwrap_or(0), u(ev, &["close", "bytes_down"]).unwrap_or(0));
        // ECS: source.bytes from the source to the destination, destination.bytes back.
        source["bytes"] = json!(up);
        destination.insert("bytes".into(), json!(down));
        network["bytes"] = json!(up + down);
    }
    put(&mut out, "source", source);
    put(&mut out, "destination", Value::Object(destination));
    if let Some(m) = method {
        let path = s(ev, &["target", "http", "path"]).unwrap_or("");
        network["protocol"] = json!("http");
        put(
            &mut out,
            "url",
            json!({"domain": host, "port": port, "path": path, "scheme": "http",
                   "full": format!("http://{host}:{port}{path}"), "original": format!("http://{host}:{port}{path}")}),
        );
        let mut http = json!({"request": {"method": m}});
        if let Some(code) = u(ev, &["close", "http_status"]) {
            http["response"] = json!({"status_code": code});
        }
        put(&mut out, "http", http);
    } else if front == "connect" {
        put(&mut out, "http", json!({"request": {"method": "CONNECT"}}));
    }
    put(&mut out, "network", network);
    if let Some(sni) = s(ev, &["transparent", "sni"]) {
        put(&mut out, "tls", json!({"client": {"server_name": sni}}));
    }
    if let Some(p) = s(ev, &["decision", "policy"]) {
        let mut rule = json!({"ruleset": p, "category": "EgressPolicy"});
        if let Some(r) = s(ev, &["decision", "rule"]) {
            rule["name"] = json!(r);
            rule["id"] = json!(format!("{p}/{r}"));
        }
        put(&mut out, "rule", rule);
    }
    if let Some(ns) = s(ev, &["client", "namespace"]) {
        let mut o = json!({"type": "kubernetes", "namespace": ns});
        if let Some(n) = s(ev, &["client", "name"]) {
            o["resource"] = json!({"type": "pod", "name": n});
        }
        put(&mut out, "orchestrator", o);
    }
    let mut egress = extras(ev);
    put(egress.as_object_mut().expect("object"), "client", kubernetes(ev));
    put(&mut out, "egress", egress);
    Value::Object(out)
}
