//! Sink formats: the native `egress.v1` JSON lines, OCSF 1.5.0 and ECS. Both mappings start
//! from the egress.v1 event as written (one parsed line), so every sink of every format carries
//! the same facts; the field tables are in docs/audit.md.

use std::net::{IpAddr, SocketAddr};

use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::End;
use crate::config::AuditFormat;
use crate::policy::Action;
use crate::reason::Reason;
use crate::request::Front;

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
                AuditFormat::Ocsf => ocsf(&ev, ctx),
                AuditFormat::Ecs => ecs(&ev, ctx),
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

/// The members of an egress.v1 event the mappings read, typed and borrowed from the parsed
/// line. (Members carried over verbatim, under `unmapped` / `egress`, are copied from the line
/// itself.) A line that does not read as one is passed through unmapped.
#[derive(Deserialize, Default)]
#[serde(default)]
struct View<'a> {
    event: Kind,
    time: &'a str,
    id: &'a str,
    seq: u64,
    instance: &'a str,
    front: Option<Front>,
    request_id: Option<&'a str>,
    connection_id: Option<&'a str>,
    #[serde(borrow)]
    client: ClientView<'a>,
    #[serde(borrow)]
    target: TargetView<'a>,
    #[serde(borrow)]
    decision: Option<DecisionView<'a>>,
    #[serde(borrow)]
    close: Option<CloseView<'a>>,
    dialled: Option<SocketAddr>,
    #[serde(borrow)]
    transparent: Option<TransparentView<'a>>,
    gap: Option<GapView>,
    checkpoint: Option<CheckpointView>,
}

#[derive(Deserialize, Default, PartialEq, Eq, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum Kind {
    Decision,
    Close,
    AuditGap,
    Checkpoint,
    #[default]
    #[serde(other)]
    Other,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct ClientView<'a> {
    address: Option<IpAddr>,
    port: u16,
    namespace: Option<&'a str>,
    name: Option<&'a str>,
    service_account: Option<&'a str>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct TargetView<'a> {
    host: &'a str,
    port: u16,
    #[serde(borrow)]
    http: Option<HttpView<'a>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct HttpView<'a> {
    method: &'a str,
    path: &'a str,
}

#[derive(Deserialize)]
struct DecisionView<'a> {
    action: Action,
    reason: Reason,
    #[serde(default)]
    policy: Option<&'a str>,
    #[serde(default)]
    rule: Option<&'a str>,
    #[serde(default)]
    detail: Option<&'a str>,
}

#[derive(Deserialize)]
struct CloseView<'a> {
    end: End,
    #[serde(default)]
    error: Option<&'a str>,
    #[serde(default)]
    http_status: Option<u16>,
    #[serde(default)]
    bytes_up: u64,
    #[serde(default)]
    bytes_down: u64,
    #[serde(default)]
    duration_ms: u64,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct TransparentView<'a> {
    sni: Option<&'a str>,
}

#[derive(Deserialize)]
struct GapView {
    from_seq: u64,
    to_seq: u64,
}

#[derive(Deserialize)]
struct CheckpointView {
    covers_to_seq: u64,
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

/// The target: `name_key` = the host when it is a name, `ip` = the dialled address (or the
/// IP-literal target), `port`.
fn destination(v: &View<'_>, name_key: &str) -> Map<String, Value> {
    let host = v.target.host;
    let mut m = Map::new();
    if is_name(host) {
        put(&mut m, name_key, json!(host));
    }
    if let Some(d) = v.dialled {
        put(&mut m, "ip", json!(d.ip().to_string()));
    } else if !host.is_empty() && !is_name(host) {
        put(&mut m, "ip", json!(host.trim_start_matches('[').trim_end_matches(']')));
    }
    if v.target.port > 0 {
        put(&mut m, "port", json!(v.target.port));
    }
    m
}

/// The facts of a traffic event (`decision` or `close`) both mappings start from.
struct Traffic<'a> {
    front: Front,
    allow: bool,
    reason: Reason,
    close: bool,
    host: &'a str,
    port: u16,
    method: Option<&'a str>,
    /// `allowed`, `denied` or `closed`, for the one-line message.
    verb: &'static str,
}

impl<'a> Traffic<'a> {
    /// `None` for an event that is not about traffic or lacks its front or decision.
    fn of(v: &View<'a>) -> Option<Traffic<'a>> {
        let d = v.decision.as_ref()?;
        let allow = d.action == Action::Allow;
        let close = v.event == Kind::Close;
        Some(Traffic {
            front: v.front?,
            allow,
            reason: d.reason,
            close,
            host: v.target.host,
            port: v.target.port,
            method: v.target.http.as_ref().map(|h| h.method),
            verb: if close {
                "closed"
            } else if allow {
                "allowed"
            } else {
                "denied"
            },
        })
    }

    /// Whether OCSF files it under HTTP Activity and ECS under `web`.
    fn http_class(&self) -> bool {
        matches!(self.front, Front::Http | Front::Connect)
    }
}

/// An event about the audit log itself (`audit_gap`, `checkpoint`), not about traffic.
struct LogEvent {
    activity: &'static str,
    ecs_action: &'static str,
    ok: bool,
    message: String,
}

fn log_event(v: &View<'_>) -> Option<LogEvent> {
    match v.event {
        Kind::AuditGap => {
            let (from, to) = v.gap.as_ref().map_or((0, 0), |g| (g.from_seq, g.to_seq));
            Some(LogEvent {
                activity: "Audit Gap",
                ecs_action: "audit-gap",
                ok: false,
                message: format!("audit events {from}..={to} of instance {:?} were lost", v.instance),
            })
        }
        Kind::Checkpoint => Some(LogEvent {
            activity: "Checkpoint",
            ecs_action: "audit-checkpoint",
            ok: true,
            message: format!(
                "signed checkpoint of events up to {} of instance {:?}",
                v.checkpoint.as_ref().map_or(0, |c| c.covers_to_seq),
                v.instance
            ),
        }),
        _ => None,
    }
}

/// Whether a target host is a name (not an IP literal).
fn is_name(host: &str) -> bool {
    host.trim_start_matches('[').trim_end_matches(']').parse::<std::net::IpAddr>().is_err()
}

fn severity(reason: Reason, allow: bool) -> (u64, &'static str) {
    if allow {
        return (1, "Informational");
    }
    match reason {
        // Someone tried a metadata or internal address: worth a look.
        Reason::GuardBlocked
        | Reason::GuardBlockedName
        | Reason::GuardInternal
        | Reason::DnsGuardBlocked
        | Reason::DnsInternalAddress
        | Reason::UntrustedRelay => (3, "Medium"),
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
    for (from, to) in [
        ("namespace", "namespace"),
        ("name", "pod"),
        ("serviceAccount", "service_account"),
        ("labels", "labels"),
        ("identity_source", "identity_source"),
        ("spiffe_id", "spiffe_id"),
    ] {
        if let Some(v) = c.get(from) {
            m.insert(to.into(), v.clone());
        }
    }
    Value::Object(m)
}

/// One egress.v1 event as OCSF 1.5.0: HTTP Activity (4002) for the `http` and `connect` fronts,
/// Network Activity (4001) for `socks5` and `transparent`, Event Log Activity (1008) for
/// `audit_gap`; profiles `security_control` and `network_proxy`.
/// `None`: the event does not read as egress.v1 (it is then passed through as it is).
pub(crate) fn ocsf(ev: &Value, ctx: &Context) -> Option<Value> {
    let v = View::deserialize(ev).ok()?;
    let time = v.time;
    let mut out = Map::new();
    let mut metadata = json!({
        "version": OCSF_VERSION,
        "product": {"name": PRODUCT, "vendor_name": PRODUCT, "version": env!("CARGO_PKG_VERSION")},
        "uid": v.id,
        "sequence": v.seq,
        "original_time": time,
        "log_name": "egress.v1",
        "event_code": ev["event"],
        "profiles": ["security_control", "network_proxy"],
    });
    if let Some(r) = v.request_id {
        metadata["correlation_uid"] = json!(r);
    }
    let proxy_endpoint = json!({"name": PRODUCT, "hostname": ctx.hostname, "uid": v.instance});
    if let Some(log) = log_event(&v) {
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
        return Some(Value::Object(out));
    }
    let traffic = Traffic::of(&v)?;
    let http_class = traffic.http_class();
    let Traffic { front, allow, reason, close, host, port, method, verb } = traffic;

    let (class_uid, class_name, activity_id, activity_name) = if http_class {
        let m = if front == Front::Connect { "CONNECT" } else { method.unwrap_or("") };
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
    let path = v.target.http.as_ref().map(|h| h.path);
    if let Some(d) = v.decision.as_ref().and_then(|d| d.detail).or_else(|| v.close.as_ref().and_then(|c| c.error)) {
        put(&mut out, "status_detail", json!(d));
    }
    let target = if http_class && method.is_some() {
        format!("{} http://{host}:{port}{}", method.unwrap_or(""), path.unwrap_or(""))
    } else {
        format!("{host}:{port}")
    };
    put(&mut out, "message", json!(format!("{} {target} {verb} ({})", front.as_str(), reason.as_str())));
    put(&mut out, "metadata", metadata);

    // Who: the client address, its Pod and service account.
    let mut src = json!({"ip": v.client.address, "port": v.client.port});
    if let Some(n) = v.client.name {
        src["name"] = json!(n);
    }
    if let (Some(ns), Some(sa)) = (v.client.namespace, v.client.service_account) {
        src["owner"] =
            json!({"name": format!("system:serviceaccount:{ns}:{sa}"), "type_id": 99, "type": "ServiceAccount"});
    }
    put(&mut out, "src_endpoint", src);
    // Where to: the name asked for, the address dialled.
    put(&mut out, "dst_endpoint", Value::Object(destination(&v, "hostname")));
    let mut conn = json!({"direction_id": 2, "direction": "Outbound", "protocol_name": "tcp", "protocol_num": 6});
    if let Some(c) = v.connection_id {
        conn["uid"] = json!(c);
    }
    put(&mut out, "connection_info", conn);
    if http_class {
        let mut url = json!({"hostname": host, "port": port});
        match path {
            Some(path) => {
                url["path"] = json!(path);
                url["scheme"] = json!("http");
                url["url_string"] = json!(format!("http://{host}:{port}{path}"));
            }
            // CONNECT: the request target is the authority.
            None => url["url_string"] = json!(format!("{host}:{port}")),
        }
        let mut req = json!({"url": url});
        let m = if front == Front::Connect { Some("CONNECT") } else { method };
        // OCSF 1.5.0 lists these methods; others (PATCH, WebDAV...) are named by activity_name.
        if let Some(m) =
            m.filter(|m| ["CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "POST", "PUT", "TRACE"].contains(m))
        {
            req["http_method"] = json!(m);
        }
        put(&mut out, "http_request", req);
        if let Some(code) = v.close.as_ref().and_then(|c| c.http_status) {
            put(&mut out, "http_response", json!({"code": code}));
        }
    }
    if let (true, Some(c)) = (close, &v.close) {
        let (up, down, duration) = (c.bytes_up, c.bytes_down, c.duration_ms);
        // OCSF: bytes_out from the source (client) to the destination, bytes_in back.
        put(&mut out, "traffic", json!({"bytes_out": up, "bytes_in": down, "bytes": up + down}));
        put(&mut out, "duration", json!(duration));
        put(&mut out, "end_time", json!(epoch_ms(time)));
        put(&mut out, "start_time", json!(epoch_ms(time) - duration as i64));
    }
    // security_control profile.
    let audit_only = reason == Reason::AuditWouldDeny;
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
    if let Some(p) = v.decision.as_ref().and_then(|d| d.policy) {
        put(&mut out, "policy", json!({"name": p, "uid": p, "is_applied": !audit_only}));
        if let Some(r) = v.decision.as_ref().and_then(|d| d.rule) {
            put(&mut out, "firewall_rule", json!({"name": r, "uid": format!("{p}/{r}"), "type": "EgressPolicy"}));
        }
    }
    // network_proxy profile: the gateway itself.
    put(&mut out, "proxy_endpoint", proxy_endpoint);
    let mut unmapped = Map::new();
    unmapped.insert("egress".into(), extras(ev));
    put(&mut unmapped, "kubernetes", kubernetes(ev));
    put(&mut out, "unmapped", Value::Object(unmapped));
    Some(Value::Object(out))
}

/// One egress.v1 event as ECS: categorisation `event.*`, `source.*`, `destination.*`, `url.*`,
/// `http.*`, `tls.client.server_name`, `rule.*`, `orchestrator.*`, `observer.*`, `network.*`;
/// everything else under the custom `egress.*` object.
/// `None`: the event does not read as egress.v1 (it is then passed through as it is).
pub(crate) fn ecs(ev: &Value, ctx: &Context) -> Option<Value> {
    let v = View::deserialize(ev).ok()?;
    let time = v.time;
    let mut out = Map::new();
    put(&mut out, "@timestamp", json!(time));
    put(&mut out, "ecs", json!({"version": ECS_VERSION}));
    put(
        &mut out,
        "observer",
        json!({"type": "proxy", "product": PRODUCT, "vendor": PRODUCT, "version": env!("CARGO_PKG_VERSION"),
               "hostname": ctx.hostname, "name": v.instance}),
    );
    let mut event = json!({
        "kind": "event", "id": v.id, "sequence": v.seq, "dataset": "egress_gateway.audit",
        "module": "egress_gateway", "created": time,
    });
    if let Some(log) = log_event(&v) {
        event["category"] = json!(["configuration"]);
        event["type"] = json!(["info"]);
        event["action"] = json!(log.ecs_action);
        event["outcome"] = json!(if log.ok { "success" } else { "failure" });
        event["reason"] = json!(log.message);
        put(&mut out, "event", event);
        put(&mut out, "message", json!(log.message));
        put(&mut out, "egress", extras(ev));
        return Some(Value::Object(out));
    }
    let traffic = Traffic::of(&v)?;
    let mut category = vec!["network"];
    if traffic.http_class() {
        category.push("web");
    }
    let Traffic { front, allow, reason, close, host, port, method, verb } = traffic;
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
        if v.close.as_ref().is_some_and(|c| c.end == End::Completed) { "success" } else { "failure" }
    } else if allow {
        "success"
    } else {
        "failure"
    });
    event["reason"] = json!(reason);
    if close {
        let ms = v.close.as_ref().map_or(0, |c| c.duration_ms);
        event["duration"] = json!(ms.saturating_mul(1_000_000));
        event["end"] = json!(time);
    }
    put(&mut out, "event", event);
    put(&mut out, "message", json!(format!("{} {host}:{port} {verb} ({})", front.as_str(), reason.as_str())));

    let mut source = json!({"ip": v.client.address, "port": v.client.port, "address": v.client.address});
    let mut destination = destination(&v, "domain");
    put(&mut destination, "address", json!(host));
    let mut network = json!({"direction": "egress", "transport": "tcp"});
    if let Some(ip) = v.client.address {
        network["type"] = json!(if ip.is_ipv6() { "ipv6" } else { "ipv4" });
    }
    if let (true, Some(c)) = (close, &v.close) {
        let (up, down) = (c.bytes_up, c.bytes_down);
        // ECS: source.bytes from the source to the destination, destination.bytes back.
        source["bytes"] = json!(up);
        destination.insert("bytes".into(), json!(down));
        network["bytes"] = json!(up + down);
    }
    put(&mut out, "source", source);
    put(&mut out, "destination", Value::Object(destination));
    if let Some(m) = method {
        let path = v.target.http.as_ref().map_or("", |h| h.path);
        network["protocol"] = json!("http");
        put(
            &mut out,
            "url",
            json!({"domain": host, "port": port, "path": path, "scheme": "http",
                   "full": format!("http://{host}:{port}{path}"), "original": format!("http://{host}:{port}{path}")}),
        );
        let mut http = json!({"request": {"method": m}});
        if let Some(code) = v.close.as_ref().and_then(|c| c.http_status) {
            http["response"] = json!({"status_code": code});
        }
        put(&mut out, "http", http);
    } else if front == Front::Connect {
        put(&mut out, "http", json!({"request": {"method": "CONNECT"}}));
    }
    put(&mut out, "network", network);
    if let Some(sni) = v.transparent.as_ref().and_then(|t| t.sni) {
        put(&mut out, "tls", json!({"client": {"server_name": sni}}));
    }
    if let Some(p) = v.decision.as_ref().and_then(|d| d.policy) {
        let mut rule = json!({"ruleset": p, "category": "EgressPolicy"});
        if let Some(r) = v.decision.as_ref().and_then(|d| d.rule) {
            rule["name"] = json!(r);
            rule["id"] = json!(format!("{p}/{r}"));
        }
        put(&mut out, "rule", rule);
    }
    if let Some(ns) = v.client.namespace {
        let mut o = json!({"type": "kubernetes", "namespace": ns});
        if let Some(n) = v.client.name {
            o["resource"] = json!({"type": "pod", "name": n});
        }
        put(&mut out, "orchestrator", o);
    }
    let mut egress = extras(ev);
    put(egress.as_object_mut().expect("object"), "client", kubernetes(ev));
    put(&mut out, "egress", egress);
    Some(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Context {
        Context { hostname: "gw-host".into() }
    }

    fn event(front: &str, kind: &str, decision: Value, extra: Value) -> Value {
        let mut ev = json!({
            "schema": "egress.v1", "event": kind, "id": "id-1", "seq": 7, "time": "2026-11-28T10:00:00Z",
            "instance": "inst", "connection_id": "inst-1", "request_id": "inst-1-1", "front": front,
            "client": {"address": "10.0.0.1", "port": 5555, "namespace": "shop", "name": "api-1", "serviceAccount": "api", "identity_source": "certificate", "spiffe_id": "spiffe://cluster.local/ns/shop/sa/api"},
            "target": {"host": "169.254.169.254", "port": 80},
            "decision": decision,
        });
        for (k, v) in extra.as_object().unwrap() {
            ev[k] = v.clone();
        }
        ev
    }

    #[test]
    fn a_guard_denial_on_socks5_is_a_medium_network_refusal() {
        let ev = event(
            "socks5",
            "decision",
            json!({"action": "deny", "reason": "guard_blocked", "mode": "Enforce"}),
            json!({}),
        );
        let o = ocsf(&ev, &ctx()).unwrap();
        assert_eq!((o["class_uid"].as_u64(), o["activity_name"].as_str()), (Some(4001), Some("Refuse")));
        assert_eq!((o["severity_id"].as_u64(), o["status_code"].as_str()), (Some(3), Some("guard_blocked")));
        assert_eq!(o["src_endpoint"]["ip"], "10.0.0.1");
        assert_eq!(o["src_endpoint"]["owner"]["name"], "system:serviceaccount:shop:api");
        assert_eq!(o["dst_endpoint"]["ip"], "169.254.169.254");
        assert_eq!(o["message"], "socks5 169.254.169.254:80 denied (guard_blocked)");
        let e = ecs(&ev, &ctx()).unwrap();
        assert_eq!(e["event"]["category"], json!(["network"]));
        assert_eq!(e["event"]["type"], json!(["connection", "denied"]));
        assert_eq!(e["orchestrator"]["resource"]["name"], "api-1");
        assert_eq!(e["egress"]["client"]["identity_source"], "certificate");
        assert_eq!(o["unmapped"]["kubernetes"]["identity_source"], "certificate");
        assert_eq!(e["egress"]["client"]["spiffe_id"], "spiffe://cluster.local/ns/shop/sa/api");
        assert_eq!(o["unmapped"]["kubernetes"]["spiffe_id"], "spiffe://cluster.local/ns/shop/sa/api");
    }

    #[test]
    fn an_http_close_is_http_activity_with_its_status_and_bytes() {
        let ev = event(
            "http",
            "close",
            json!({"action": "allow", "reason": "rule_allow", "mode": "Enforce", "policy": "shop/api", "rule": "up"}),
            json!({"target": {"host": "up.test", "port": 8080, "http": {"method": "GET", "path": "/x"}},
                   "dialled": "93.184.216.34:8080",
                   "close": {"bytes_up": 10, "bytes_down": 90, "duration_ms": 5, "end": "completed", "http_status": 200}}),
        );
        let o = ocsf(&ev, &ctx()).unwrap();
        assert_eq!((o["class_uid"].as_u64(), o["activity_name"].as_str()), (Some(4002), Some("Get")));
        assert_eq!(o["http_response"]["code"], 200);
        assert_eq!(o["traffic"], json!({"bytes_out": 10, "bytes_in": 90, "bytes": 100}));
        assert_eq!(o["dst_endpoint"], json!({"hostname": "up.test", "ip": "93.184.216.34", "port": 8080}));
        assert_eq!(o["firewall_rule"]["uid"], "shop/api/up");
        let e = ecs(&ev, &ctx()).unwrap();
        assert_eq!(e["event"]["outcome"], "success");
        assert_eq!(e["url"]["full"], "http://up.test:8080/x");
        assert_eq!((e["source"]["bytes"].as_u64(), e["destination"]["bytes"].as_u64()), (Some(10), Some(90)));
    }

    #[test]
    fn a_connect_is_web_and_names_its_method() {
        let ev = event(
            "connect",
            "decision",
            json!({"action": "allow", "reason": "rule_allow", "mode": "Enforce"}),
            json!({}),
        );
        assert_eq!(ocsf(&ev, &ctx()).unwrap()["http_request"]["http_method"], "CONNECT");
        let e = ecs(&ev, &ctx()).unwrap();
        assert_eq!(e["event"]["category"], json!(["network", "web"]));
        assert_eq!(e["http"]["request"]["method"], "CONNECT");
    }

    #[test]
    fn lines_that_do_not_read_as_egress_v1_pass_through_unmapped() {
        let unknown = event(
            "socks5",
            "decision",
            json!({"action": "deny", "reason": "from_the_future", "mode": "Enforce"}),
            json!({}),
        );
        let lines = format!("{unknown}\nnot json\n");
        for f in [AuditFormat::Ocsf, AuditFormat::Ecs] {
            let mut out = Vec::new();
            render(f, &ctx(), lines.as_bytes(), &mut out);
            assert_eq!(String::from_utf8(out).unwrap(), lines, "{f:?}");
        }
    }
}
