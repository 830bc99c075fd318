//! `egress-gateway audit suggest`: least-privilege `EgressPolicy` documents from observed traffic.
//!
//! It reads `egress.v1` decision events (a `json` sink's files, rotated ones, gzip, or stdin)
//! and writes one policy per workload (namespace, the labels that identify its Pods, its
//! ServiceAccount when known) that allows exactly what the workload was seen doing:
//!
//! - what was observed: requests the gateway allowed, and those refused only for want of a rule
//!   (`no_rule_matched`, `default_deny`, `identity_required`: what an Audit-mode rollout records
//!   as `audit_would_deny` is allowed, so it counts too). Refusals by the built-in guard are
//!   never suggested: they are listed in a comment (a metadata attempt is always worth a look).
//!   Cluster Deny rules, malformed requests and failed lookups are left out;
//! - domains, each with the ports seen; `--wildcard-min` or more distinct names directly under
//!   the same parent become `*.parent`, never when the parent is a public suffix (the Public
//!   Suffix List, `psl`): `*.com` or `*.amazonaws.com` is never suggested;
//! - IP-literal destinations as `/32` (`/128`) CIDRs;
//! - with `--http-rules`, the methods and paths of destinations only ever reached by plain HTTP;
//! - each rule commented with its count and first and last time seen.
//!
//! The output validates as it is (`egress-gateway validate`), and replaying the same events
//! through `check` against it allows every one of them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read};
use std::net::IpAddr;
use std::path::Path;

use serde_json::Value;

/// Labels Kubernetes controllers set per Pod or per rollout: they never identify a workload.
const VOLATILE_LABELS: &[&str] = &[
    "pod-template-hash",
    "controller-revision-hash",
    "pod-template-generation",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
    "batch.kubernetes.io/controller-uid",
    "batch.kubernetes.io/job-name",
    "controller-uid",
    "job-name",
];

/// Paths kept per `--http-rules` destination; beyond, the rule allows any path.
const MAX_PATHS: usize = 32;

/// What to suggest from.
#[derive(Debug, Clone)]
pub struct Options {
    /// Only this namespace.
    pub namespace: Option<String>,
    /// Only events at or after this time (Unix seconds).
    pub since: Option<i64>,
    /// Leave out destinations seen fewer times.
    pub min_count: u64,
    /// Distinct names under one parent that make a `*.parent` wildcard.
    pub wildcard_min: usize,
    /// Suggest `http` method and path constraints for plain-HTTP-only destinations.
    pub http_rules: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options { namespace: None, since: None, min_count: 1, wildcard_min: 3, http_rules: false }
    }
}

/// Who: a workload.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Workload {
    pub(crate) namespace: String,
    pub(crate) service_account: Option<String>,
    pub(crate) labels: BTreeMap<String, String>,
}

impl std::fmt::Display for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let labels: Vec<String> = self.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        write!(f, "{}/{{{}}}", self.namespace, labels.join(","))?;
        if let Some(sa) = &self.service_account {
            write!(f, ", ServiceAccount {sa}")?;
        }
        Ok(())
    }
}

/// The workload of an event's client: its namespace, the labels that identify its Pods (those
/// controllers set per Pod or rollout left out) and its ServiceAccount; `None` for a client no
/// row or Pod names.
pub(crate) fn workload_of(e: &Value) -> Option<Workload> {
    let c = &e["client"];
    let ns = c["namespace"].as_str()?;
    let labels = c["labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(k, _)| !VOLATILE_LABELS.contains(&k.as_str()))
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    Some(Workload {
        namespace: ns.to_string(),
        service_account: c["serviceAccount"].as_str().map(str::to_string),
        labels,
    })
}

/// Where to: a name or an address.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Dest {
    Domain(String),
    Ip(IpAddr),
}

/// What was seen of one destination.
#[derive(Debug, Clone, Default)]
struct Seen {
    ports: BTreeSet<u16>,
    count: u64,
    first: String,
    last: String,
    /// Plain-HTTP requests' methods and paths.
    methods: BTreeSet<String>,
    paths: BTreeSet<String>,
    /// Seen other than as a plain-HTTP request (CONNECT, SOCKS5, transparent).
    opaque: bool,
}

impl Seen {
    fn add(&mut self, port: u16, time: &str, http: Option<(&str, &str)>) {
        self.ports.insert(port);
        self.count += 1;
        if self.first.is_empty() || time < self.first.as_str() {
            self.first = time.to_string();
        }
        if time > self.last.as_str() {
            self.last = time.to_string();
        }
        match http {
            Some((m, p)) => {
                self.methods.insert(m.to_string());
                self.paths.insert(p.to_string());
            }
            None => self.opaque = true,
        }
    }

    fn merge(&mut self, o: &Seen) {
        self.ports.extend(&o.ports);
        self.count += o.count;
        if self.first.is_empty() || (!o.first.is_empty() && o.first < self.first) {
            self.first = o.first.clone();
        }
        if o.last > self.last {
            self.last = o.last.clone();
        }
        self.methods.extend(o.methods.iter().cloned());
        self.paths.extend(o.paths.iter().cloned());
        self.opaque |= o.opaque;
    }
}

/// Everything observed of one workload.
#[derive(Debug, Default)]
struct Observed {
    dests: BTreeMap<Dest, Seen>,
    /// Guard refusals: `host:port (reason)` -> count.
    guarded: BTreeMap<String, u64>,
    events: u64,
}

/// Reads events from files (`-`: stdin; `.gz`: gzip), line by line; lines that are not JSON
/// objects are skipped and counted.
pub fn read_events(paths: &[std::path::PathBuf]) -> Result<(Vec<Value>, u64), String> {
    let (mut events, mut skipped) = (Vec::new(), 0u64);
    for p in paths {
        let reader: Box<dyn Read> = if p == Path::new("-") {
            Box::new(std::io::stdin())
        } else {
            let f = std::fs::File::open(p).map_err(|e| format!("{}: {e}", p.display()))?;
            if p.extension().is_some_and(|e| e == "gz") {
                Box::new(flate2::read::MultiGzDecoder::new(f))
            } else {
                Box::new(f)
            }
        };
        for line in BufReader::new(reader).lines() {
            let line = line.map_err(|e| format!("{}: {e}", p.display()))?;
            match serde_json::from_str::<Value>(&line) {
                Ok(v) if v.is_object() => events.push(v),
                _ if line.trim().is_empty() => {}
                _ => skipped += 1,
            }
        }
    }
    Ok((events, skipped))
}

fn unix_seconds(rfc3339: &str) -> Option<i64> {
    time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(|t| t.unix_timestamp())
}

/// Whether a refusal means only that no rule allowed it (so the destination was wanted).
fn wanted(action: &str, reason: &str) -> bool {
    action == "allow" || matches!(reason, "no_rule_matched" | "default_deny" | "identity_required")
}

/// Whether a refusal came from the built-in guard (the target or its resolution).
pub(crate) fn guard_reason(reason: &str) -> bool {
    matches!(
        reason,
        "guard_blocked" | "guard_blocked_name" | "guard_internal" | "dns_guard_blocked" | "dns_internal_address"
    )
}

fn observe(events: &[Value], opts: &Options) -> BTreeMap<Workload, Observed> {
    let mut out: BTreeMap<Workload, Observed> = BTreeMap::new();
    for e in events.iter().filter(|e| e["event"] == "decision") {
        let c = &e["client"];
        let Some(ns) = c["namespace"].as_str() else { continue };
        if opts.namespace.as_deref().is_some_and(|n| n != ns) {
            continue;
        }
        let time = e["time"].as_str().unwrap_or("");
        if let Some(since) = opts.since
            && unix_seconds(time).is_none_or(|t| t < since)
        {
            continue;
        }
        let Some(w) = workload_of(e) else { continue };
        let (host, port) = (e["target"]["host"].as_str().unwrap_or(""), e["target"]["port"].as_u64().unwrap_or(0));
        let (action, reason) =
            (e["decision"]["action"].as_str().unwrap_or(""), e["decision"]["reason"].as_str().unwrap_or(""));
        let o = out.entry(w).or_default();
        o.events += 1;
        let Ok(port) = u16::try_from(port) else { continue };
        if host.is_empty() || port == 0 {
            continue;
        }
        if guard_reason(reason) {
            *o.guarded.entry(format!("{host}:{port} ({reason})")).or_default() += 1;
            continue;
        }
        if !wanted(action, reason) {
            continue;
        }
        let dest = match crate::target::parse_host(host) {
            Ok(crate::target::Host::Ip(ip)) => Dest::Ip(ip),
            Ok(crate::target::Host::Name(n)) => Dest::Domain(n),
            Err(_) => continue,
        };
        let http =
            e["target"]["http"].as_object().and_then(|h| Some((h.get("method")?.as_str()?, h.get("path")?.as_str()?)));
        let http = if e["front"] == "http" { http } else { None };
        o.dests.entry(dest).or_default().add(port, time, http);
    }
    out
}

/// Whether `name` is a public suffix (`com`, `co.uk`, `amazonaws.com`, ...), under which a
/// wildcard would open names of unrelated owners.
fn is_public_suffix(name: &str) -> bool {
    psl::suffix(name.as_bytes()).is_some_and(|s| s.as_bytes() == name.as_bytes())
}

/// Domains grouped: `wildcard_min` or more distinct names directly under one parent that is not
/// a public suffix become `*.parent`.
fn group_domains(dests: &BTreeMap<Dest, Seen>, wildcard_min: usize) -> BTreeMap<Dest, Seen> {
    let mut by_parent: BTreeMap<String, Vec<&String>> = BTreeMap::new();
    for d in dests.keys() {
        if let Dest::Domain(n) = d
            && let Some((_, parent)) = n.split_once('.')
        {
            by_parent.entry(parent.to_string()).or_default().push(n);
        }
    }
    let mut out: BTreeMap<Dest, Seen> = BTreeMap::new();
    let mut grouped: BTreeSet<&String> = BTreeSet::new();
    for (parent, names) in &by_parent {
        if names.len() >= wildcard_min.max(2) && parent.contains('.') && !is_public_suffix(parent) {
            let mut seen = Seen::default();
            for n in names {
                seen.merge(&dests[&Dest::Domain((*n).clone())]);
                grouped.insert(n);
            }
            out.insert(Dest::Domain(format!("*.{parent}")), seen);
        }
    }
    for (d, s) in dests {
        if let Dest::Domain(n) = d
            && grouped.contains(n)
        {
            continue;
        }
        out.entry(d.clone()).or_default().merge(s);
    }
    out
}

/// A name for Kubernetes (`metadata.name`): lower-case letters, digits and `-`, at most 63.
fn dns_label(raw: &str) -> String {
    let mut s: String =
        raw.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
    s.truncate(63);
    let s = s.trim_matches('-').to_string();
    if s.is_empty() { "workload".into() } else { s }
}

fn json(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

/// The suggested policies, as YAML documents with comments.
pub fn suggest(events: &[Value], opts: &Options) -> String {
    let observed = observe(events, opts);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Suggested by `egress-gateway audit suggest` from {} decision events (min count {}, wildcard at {} names).",
        observed.values().map(|o| o.events).sum::<u64>(),
        opts.min_count,
        opts.wildcard_min
    );
    let mut names_used: BTreeSet<(String, String)> = BTreeSet::new();
    for (w, o) in &observed {
        let dests = group_domains(&o.dests, opts.wildcard_min);
        let (kept, rare): (Vec<_>, Vec<_>) = dests.iter().partition(|(_, s)| s.count >= opts.min_count);
        let who = w.to_string();
        let base = dns_label(&format!(
            "suggested-{}",
            w.service_account
                .clone()
                .or_else(|| w.labels.get("app").cloned())
                .or_else(|| w.labels.values().next().cloned())
                .unwrap_or_else(|| "all".into())
        ));
        let mut name = base.clone();
        let mut n = 2;
        while !names_used.insert((w.namespace.clone(), name.clone())) {
            name = dns_label(&format!("{base}-{n}"));
            n += 1;
        }
        let _ = writeln!(out, "---\n# {who}: {} decision events.", o.events);
        for (what, count) in &o.guarded {
            let _ =
                writeln!(out, "# Refused by the built-in guard, never suggested: {what}, {}.", times(*count, "time"));
        }
        for (d, s) in &rare {
            let _ = writeln!(
                out,
                "# Seen fewer than {} times, left out: {} ({}).",
                opts.min_count,
                dest_text(d),
                times(s.count, "time")
            );
        }
        let _ = writeln!(out, "apiVersion: egress.dev/v1alpha1\nkind: EgressPolicy\nmetadata:");
        let _ = writeln!(out, "  name: {}\n  namespace: {}", json(&name), json(&w.namespace));
        let _ = writeln!(out, "spec:\n  podSelector:");
        if w.labels.is_empty() {
            let _ = writeln!(out, "    {{}}");
        } else {
            let _ = writeln!(out, "    matchLabels:");
            for (k, v) in &w.labels {
                let _ = writeln!(out, "      {}: {}", json(k), json(v));
            }
        }
        if let Some(sa) = &w.service_account {
            let _ = writeln!(out, "  serviceAccountSelector:\n    names: [{}]", json(sa));
        }
        if kept.is_empty() {
            let _ = writeln!(out, "  rules: []");
            continue;
        }
        let _ = writeln!(out, "  rules:");
        let mut rule_names = BTreeSet::new();
        for (d, s) in kept {
            let mut rule = match d {
                Dest::Domain(n) => dns_label(&n.replace("*.", "any.")),
                Dest::Ip(ip) => dns_label(&format!("ip-{ip}")),
            };
            let mut k = 2;
            let base = rule.clone();
            while !rule_names.insert(rule.clone()) {
                rule = format!("{base}-{k}");
                k += 1;
            }
            let _ = writeln!(out, "    # {}, first {}, last {}", times(s.count, "request"), s.first, s.last);
            let _ = writeln!(out, "    - name: {}", json(&rule));
            let _ = match d {
                Dest::Domain(n) => writeln!(out, "      to: [{{domain: {}}}]", json(n)),
                Dest::Ip(IpAddr::V4(a)) => writeln!(out, "      to: [{{cidr: \"{a}/32\"}}]"),
                Dest::Ip(IpAddr::V6(a)) => writeln!(out, "      to: [{{cidr: \"{a}/128\"}}]"),
            };
            let ports: Vec<String> = s.ports.iter().map(|p| format!("{{port: {p}}}")).collect();
            let _ = writeln!(out, "      ports: [{}]", ports.join(", "));
            if opts.http_rules && !s.opaque && !s.methods.is_empty() {
                let methods: Vec<String> = s.methods.iter().map(|m| json(m)).collect();
                let _ = write!(out, "      http: {{methods: [{}]", methods.join(", "));
                if s.paths.len() <= MAX_PATHS {
                    let paths: Vec<String> = s.paths.iter().map(|p| json(&http_path(p))).collect();
                    let _ = write!(out, ", paths: [{}]", paths.join(", "));
                }
                let _ = writeln!(out, "}}");
            }
        }
    }
    out
}

/// A path as a rule may name it exactly: a trailing `*` would be a prefix, so it is cut there
/// and made one; `?` and `#` never take part (the query is not in the path).
fn http_path(p: &str) -> String {
    match p.find(['*', '?', '#']) {
        Some(i) => format!("{}*", &p[..i]),
        None => p.to_string(),
    }
}

/// `1 request`, `2 requests`.
fn times(n: u64, what: &str) -> String {
    if n == 1 { format!("1 {what}") } else { format!("{n} {what}s") }
}

fn dest_text(d: &Dest) -> String {
    match d {
        Dest::Domain(n) => n.clone(),
        Dest::Ip(ip) => ip.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(ns: &str, app: &str, host: &str, port: u16, reason: &str, time: &str) -> Value {
        let action =
            if matches!(reason, "rule_allow" | "default_allow" | "audit_would_deny") { "allow" } else { "deny" };
        json!({"schema": "egress.v1", "event": "decision", "time": time, "front": "connect",
               "client": {"address": "10.0.0.1", "namespace": ns, "name": format!("{app}-1"), "serviceAccount": app,
                          "labels": {"app": app, "pod-template-hash": "5d8f"}, "identity_source": "address"},
               "target": {"host": host, "port": port},
               "decision": {"action": action, "reason": reason, "mode": "Audit"}})
    }

    fn policies(yaml: &str) -> Vec<egress_crds::AnyPolicy> {
        serde_yaml_ng::Deserializer::from_str(yaml)
            .filter_map(|d| {
                let v: serde_json::Value = serde::Deserialize::deserialize(d).ok()?;
                (!v.is_null()).then(|| egress_crds::AnyPolicy::from_value(v).unwrap())
            })
            .collect()
    }

    #[test]
    fn groups_names_under_a_parent_only_from_the_threshold_and_never_a_public_suffix() {
        let t = "2026-11-29T00:00:00Z";
        let mut events: Vec<Value> = ["a", "b", "c"]
            .iter()
            .map(|n| ev("shop", "api", &format!("{n}.cdn.example.org"), 443, "audit_would_deny", t))
            .collect();
        events.extend(
            ["x", "y"].iter().map(|n| ev("shop", "api", &format!("{n}.two.example.org"), 443, "rule_allow", t)),
        );
        // Three names directly under public suffixes: never `*.com`, `*.co.uk`, `*.s3.amazonaws.com`.
        for h in [
            "one.com",
            "two.com",
            "three.com",
            "a.co.uk",
            "b.co.uk",
            "c.co.uk",
            "a.s3.amazonaws.com",
            "b.s3.amazonaws.com",
            "c.s3.amazonaws.com",
        ] {
            events.push(ev("shop", "api", h, 443, "rule_allow", t));
        }
        let out = suggest(&events, &Options::default());
        assert!(out.contains("{domain: \"*.cdn.example.org\"}"), "{out}");
        assert!(
            out.contains("{domain: \"x.two.example.org\"}") && !out.contains("*.two.example.org"),
            "below the threshold: {out}"
        );
        for never in ["*.com\"", "*.co.uk\"", "*.s3.amazonaws.com\"", "*.amazonaws.com\""] {
            assert!(!out.contains(never), "{never}: {out}");
        }
        let two = suggest(&events, &Options { wildcard_min: 2, ..Options::default() });
        assert!(two.contains("*.two.example.org"), "{two}");
        // Every document validates as it is.
        for p in policies(&out) {
            assert_eq!(p.validate(), vec![], "{out}");
        }
    }

    #[test]
    fn suggests_per_workload_with_counts_and_leaves_out_the_guard_and_the_rare() {
        let events = vec![
            ev("shop", "api", "api.stripe.com", 443, "audit_would_deny", "2026-11-29T00:00:01Z"),
            ev("shop", "api", "api.stripe.com", 443, "rule_allow", "2026-11-29T00:05:00Z"),
            ev("shop", "api", "api.stripe.com", 8443, "no_rule_matched", "2026-11-29T00:06:00Z"),
            ev("shop", "api", "169.254.169.254", 80, "guard_blocked", "2026-11-29T00:07:00Z"),
            ev("shop", "api", "rare.example", 443, "rule_allow", "2026-11-29T00:08:00Z"),
            ev("shop", "api", "10.40.1.2", 5432, "audit_would_deny", "2026-11-29T00:09:00Z"),
            ev("shop", "api", "10.40.1.2", 5432, "audit_would_deny", "2026-11-29T00:09:30Z"),
            ev("shop", "api", "gone.example", 443, "cluster_deny", "2026-11-29T00:10:00Z"),
            ev("shop", "web", "cdn.example", 443, "rule_allow", "2026-11-29T00:11:00Z"),
            ev("shop", "web", "cdn.example", 443, "rule_allow", "2026-11-29T00:11:10Z"),
        ];
        let out = suggest(&events, &Options { min_count: 2, ..Options::default() });
        let docs = policies(&out);
        assert_eq!(docs.len(), 2, "{out}");
        assert!(out.contains("# 3 requests, first 2026-11-29T00:00:01Z, last 2026-11-29T00:06:00Z"), "{out}");
        assert!(out.contains("ports: [{port: 443}, {port: 8443}]"), "{out}");
        assert!(out.contains("{cidr: \"10.40.1.2/32\"}"), "{out}");
        assert!(
            out.contains(
                "# Refused by the built-in guard, never suggested: 169.254.169.254:80 (guard_blocked), 1 time."
            ),
            "{out}"
        );
        assert!(out.contains("left out: rare.example (1 time)"), "{out}");
        assert!(!out.contains("gone.example\"}"), "a cluster Deny is not suggested: {out}");
        assert!(!out.contains("pod-template-hash"), "{out}");
        match &docs[0] {
            egress_crds::AnyPolicy::Namespaced(p) => {
                assert_eq!(p.metadata.name.as_deref(), Some("suggested-api"));
                assert_eq!(p.spec.pod_selector.match_labels, BTreeMap::from([("app".into(), "api".into())]));
                assert_eq!(p.spec.service_account_selector.as_ref().unwrap().names, vec!["api".to_string()]);
            }
            other => panic!("{other:?}"),
        }
        // --namespace and --since filter.
        let none = suggest(&events, &Options { namespace: Some("other".into()), ..Options::default() });
        assert!(policies(&none).is_empty(), "{none}");
        let late = suggest(&events, &Options { since: unix_seconds("2026-11-29T00:11:00Z"), ..Options::default() });
        assert_eq!(policies(&late).len(), 1, "{late}");
    }

    #[test]
    fn http_rules_only_for_destinations_seen_only_as_plain_http() {
        let mut a = ev("shop", "api", "httpbin.test", 80, "rule_allow", "2026-11-29T00:00:00Z");
        a["front"] = json!("http");
        a["target"]["http"] = json!({"method": "GET", "path": "/get"});
        let mut b = a.clone();
        b["target"]["http"] = json!({"method": "POST", "path": "/anything/x*y"});
        let c = ev("shop", "api", "mixed.test", 80, "rule_allow", "2026-11-29T00:00:00Z");
        let mut d = a.clone();
        d["target"]["host"] = json!("mixed.test");
        let out = suggest(&[a, b, c, d], &Options { http_rules: true, ..Options::default() });
        assert!(out.contains("http: {methods: [\"GET\", \"POST\"], paths: [\"/anything/x*\", \"/get\"]}"), "{out}");
        assert_eq!(out.matches("http:").count(), 1, "a destination also reached by CONNECT gets none: {out}");
        for p in policies(&out) {
            assert_eq!(p.validate(), vec![], "{out}");
        }
    }
}
