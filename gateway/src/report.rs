//! `egress-gateway audit report`: what happened, from `egress.v1` events, for a person.
//!
//! Per workload and per policy: decisions allowed, denied and would-deny (Audit mode) by reason,
//! the top destinations and the top denied ones, bytes up and down (from close events), the
//! busiest hours (UTC), every refusal of the built-in guard (a metadata attempt is always worth
//! a line) and DNS failures. `text` for a terminal; `html` is one self-contained file (inline CSS
//! and SVG charts drawn here: no script, no font, nothing from the network).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::Value;

use crate::suggest::workload_of;

/// Destinations listed in a top list.
const TOP: usize = 10;

/// Counts of one subject (a workload, a policy, everything).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    /// Decisions.
    pub requests: u64,
    /// Allowed by a rule or the default action.
    pub allowed: u64,
    /// Denied.
    pub denied: u64,
    /// Let through by Audit mode (`audit_would_deny`).
    pub would_deny: u64,
    /// Decisions by reason code.
    pub reasons: BTreeMap<String, u64>,
    /// `host:port` -> decisions.
    pub destinations: BTreeMap<String, u64>,
    /// `host:port` -> denials.
    pub denied_destinations: BTreeMap<String, u64>,
    /// Bytes client -> upstream, from close events.
    pub bytes_up: u64,
    /// Bytes upstream -> client.
    pub bytes_down: u64,
}

impl Tally {
    fn decision(&mut self, e: &Value) {
        let (action, reason) =
            (e["decision"]["action"].as_str().unwrap_or(""), e["decision"]["reason"].as_str().unwrap_or("unknown"));
        self.requests += 1;
        match (action, reason) {
            ("allow", "audit_would_deny") => self.would_deny += 1,
            ("allow", _) => self.allowed += 1,
            _ => self.denied += 1,
        }
        *self.reasons.entry(reason.to_string()).or_default() += 1;
        let dest = destination(e);
        *self.destinations.entry(dest.clone()).or_default() += 1;
        if action != "allow" {
            *self.denied_destinations.entry(dest).or_default() += 1;
        }
    }

    /// `N decisions: a allowed, d denied, w would-deny; X up, Y down`.
    fn summary(&self) -> String {
        format!(
            "{} decisions: {} allowed, {} denied, {} would-deny; {} up, {} down",
            self.requests,
            self.allowed,
            self.denied,
            self.would_deny,
            bytes(self.bytes_up),
            bytes(self.bytes_down)
        )
    }

    fn close(&mut self, e: &Value) {
        self.bytes_up += e["close"]["bytes_up"].as_u64().unwrap_or(0);
        self.bytes_down += e["close"]["bytes_down"].as_u64().unwrap_or(0);
    }
}

fn destination(e: &Value) -> String {
    let host = e["target"]["host"].as_str().unwrap_or("?");
    let port = e["target"]["port"].as_u64().unwrap_or(0);
    if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") }
}

/// Everything the report shows.
#[derive(Debug, Default)]
pub struct Report {
    /// All decisions.
    pub total: Tally,
    /// By workload (`namespace/{labels}, ServiceAccount sa`; `unknown clients` for the rest).
    pub workloads: BTreeMap<String, Tally>,
    /// By deciding policy (`(none)` for decisions no policy made).
    pub policies: BTreeMap<String, Tally>,
    /// Decisions per hour of the day (UTC).
    pub hours: [u64; 24],
    /// Guard refusals: (workload, `host:port`, reason) -> count.
    pub guard: BTreeMap<(String, String, String), u64>,
    /// DNS failures: `host:port` -> count.
    pub dns_failures: BTreeMap<String, u64>,
    /// First and last event time.
    pub span: Option<(String, String)>,
}

fn who(e: &Value) -> String {
    workload_of(e).map_or_else(|| "unknown clients".to_string(), |w| w.to_string())
}

/// Builds the report from events (decision and close events count; others are ignored).
pub fn build(events: &[Value]) -> Report {
    let mut r = Report::default();
    for e in events {
        let time = e["time"].as_str().unwrap_or("");
        match e["event"].as_str() {
            Some("decision") => {
                r.total.decision(e);
                r.workloads.entry(who(e)).or_default().decision(e);
                let policy = e["decision"]["policy"].as_str().unwrap_or("(none)").to_string();
                r.policies.entry(policy).or_default().decision(e);
                if let Some(h) = time.get(11..13).and_then(|h| h.parse::<usize>().ok()).filter(|h| *h < 24) {
                    r.hours[h] += 1;
                }
                let reason = e["decision"]["reason"].as_str().unwrap_or("");
                if crate::suggest::guard_reason(reason) {
                    *r.guard.entry((who(e), destination(e), reason.to_string())).or_default() += 1;
                }
                if reason == "dns_failure" {
                    *r.dns_failures.entry(destination(e)).or_default() += 1;
                }
            }
            Some("close") => {
                r.total.close(e);
                r.workloads.entry(who(e)).or_default().close(e);
                if let Some(p) = e["decision"]["policy"].as_str() {
                    r.policies.entry(p.to_string()).or_default().close(e);
                }
            }
            _ => continue,
        }
        if !time.is_empty() {
            let span = r.span.get_or_insert_with(|| (time.to_string(), time.to_string()));
            if time < span.0.as_str() {
                span.0 = time.to_string();
            }
            if time > span.1.as_str() {
                span.1 = time.to_string();
            }
        }
    }
    r
}

fn top(m: &BTreeMap<String, u64>) -> Vec<(&String, u64)> {
    let mut v: Vec<(&String, u64)> = m.iter().map(|(k, n)| (k, *n)).collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    v.truncate(TOP);
    v
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let (mut v, mut i) = (n as f64, 0);
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[i]) }
}

impl Report {
    /// The first and last event time.
    fn span_text(&self) -> String {
        self.span.as_ref().map(|(a, b)| format!("{a} .. {b}")).unwrap_or_else(|| "no events".into())
    }

    /// The report for a terminal.
    pub fn text(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "egress report: {}\n{}\n", self.span_text(), self.total.summary());
        if !self.guard.is_empty() {
            let _ = writeln!(o, "Refused by the built-in guard:");
            for ((w, d, reason), n) in &self.guard {
                let _ = writeln!(o, "  {n:>6}  {w} -> {d} ({reason})");
            }
            let _ = writeln!(o);
        }
        if !self.dns_failures.is_empty() {
            let _ = writeln!(o, "DNS failures:");
            for (d, n) in top(&self.dns_failures) {
                let _ = writeln!(o, "  {n:>6}  {d}");
            }
            let _ = writeln!(o);
        }
        for (title, map) in [("Workload", &self.workloads), ("Policy", &self.policies)] {
            for (name, t) in map {
                let _ = writeln!(o, "{title} {name}: {}", t.summary());
                let reasons: Vec<String> = t.reasons.iter().map(|(r, n)| format!("{r} {n}")).collect();
                let _ = writeln!(o, "  reasons: {}", reasons.join(", "));
                for (label, m) in [("top destinations", &t.destinations), ("top denied", &t.denied_destinations)] {
                    if m.is_empty() {
                        continue;
                    }
                    let _ = writeln!(o, "  {label}:");
                    for (d, n) in top(m) {
                        let _ = writeln!(o, "    {n:>6}  {d}");
                    }
                }
                let _ = writeln!(o);
            }
        }
        let busiest: Vec<String> = {
            let mut h: Vec<(usize, u64)> = self.hours.iter().copied().enumerate().filter(|(_, n)| *n > 0).collect();
            h.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            h.iter().take(3).map(|(h, n)| format!("{h:02}:00 UTC ({n})")).collect()
        };
        let _ = writeln!(o, "Busiest hours: {}", if busiest.is_empty() { "-".into() } else { busiest.join(", ") });
        o
    }

    /// The report as one self-contained HTML page.
    pub fn html(&self) -> String {
        let esc = |s: &str| s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;");
        let mut o = String::new();
        let span = self.span_text();
        let _ = write!(
            o,
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>egress report</title><style>\
             body{{font-family:system-ui,sans-serif;margin:2em;color:#222}}h1{{font-size:1.4em}}h2{{font-size:1.1em;margin-top:2em}}\
             table{{border-collapse:collapse;margin:.5em 0}}td,th{{border:1px solid #ccc;padding:.2em .6em;text-align:left}}\
             td.n{{text-align:right}}.allow{{fill:#2e7d32}}.deny{{fill:#c62828}}.audit{{fill:#f9a825}}.bar{{fill:#1565c0}}\
             .legend span{{display:inline-block;width:.8em;height:.8em;margin:0 .3em 0 1em}}.warn{{color:#c62828}}\
             </style></head><body>\n<h1>Egress report</h1>\n<p>{}</p>\n",
            esc(&span)
        );
        let _ = writeln!(o, "<p>{}.</p>", self.total.summary());
        // Decisions per workload: stacked horizontal bars.
        let _ = writeln!(
            o,
            "<h2>Decisions per workload</h2><p class=\"legend\"><span style=\"background:#2e7d32\"></span>allowed\
             <span style=\"background:#c62828\"></span>denied<span style=\"background:#f9a825\"></span>would-deny</p>"
        );
        let max = self.workloads.values().map(|t| t.requests).max().unwrap_or(1).max(1) as f64;
        let row = 28.0;
        let _ = writeln!(
            o,
            "<svg id=\"workloads\" xmlns=\"http://www.w3.org/2000/svg\" width=\"900\" height=\"{}\" role=\"img\">",
            (self.workloads.len() as f64 * row + 10.0) as u64
        );
        for (i, (name, t)) in self.workloads.iter().enumerate() {
            let y = i as f64 * row + 5.0;
            let mut x = 300.0;
            for (n, class) in [(t.allowed, "allow"), (t.denied, "deny"), (t.would_deny, "audit")] {
                let w = n as f64 / max * 580.0;
                if n > 0 {
                    let _ = writeln!(
                        o,
                        "<rect class=\"{class}\" x=\"{x:.1}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"20\"><title>{n} {class}</title></rect>"
                    );
                }
                x += w;
            }
            let _ = writeln!(
                o,
                "<text x=\"0\" y=\"{:.1}\" font-size=\"12\">{} ({})</text>",
                y + 14.0,
                esc(&name.chars().take(45).collect::<String>()),
                t.requests
            );
        }
        let _ = writeln!(o, "</svg>");
        // Busiest hours: a bar per hour.
        let hmax = self.hours.iter().copied().max().unwrap_or(1).max(1) as f64;
        let _ = writeln!(
            o,
            "<h2>Decisions per hour (UTC)</h2><svg id=\"hours\" xmlns=\"http://www.w3.org/2000/svg\" width=\"900\" height=\"170\" role=\"img\">"
        );
        for (h, n) in self.hours.iter().enumerate() {
            let height = *n as f64 / hmax * 130.0;
            let x = 10.0 + h as f64 * 36.0;
            let _ = writeln!(
                o,
                "<rect class=\"bar\" x=\"{x:.1}\" y=\"{:.1}\" width=\"28\" height=\"{height:.1}\"><title>{h:02}:00 {n}</title></rect>\
                 <text x=\"{:.1}\" y=\"160\" font-size=\"10\">{h:02}</text>",
                140.0 - height,
                x + 8.0
            );
        }
        let _ = writeln!(o, "</svg>");
        if !self.guard.is_empty() {
            let _ = writeln!(
                o,
                "<h2 class=\"warn\">Refused by the built-in guard</h2><table><tr><th>count</th><th>workload</th><th>destination</th><th>reason</th></tr>"
            );
            for ((w, d, reason), n) in &self.guard {
                let _ = writeln!(
                    o,
                    "<tr><td class=\"n\">{n}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    esc(w),
                    esc(d),
                    esc(reason)
                );
            }
            let _ = writeln!(o, "</table>");
        }
        if !self.dns_failures.is_empty() {
            let _ = writeln!(o, "<h2>DNS failures</h2><table><tr><th>count</th><th>destination</th></tr>");
            for (d, n) in top(&self.dns_failures) {
                let _ = writeln!(o, "<tr><td class=\"n\">{n}</td><td>{}</td></tr>", esc(d));
            }
            let _ = writeln!(o, "</table>");
        }
        for (title, map) in [("Workload", &self.workloads), ("Policy", &self.policies)] {
            for (name, t) in map {
                let _ = writeln!(o, "<h2>{title} {}</h2><p>{}.</p>", esc(name), t.summary());
                let _ = writeln!(o, "<table><tr><th>reason</th><th>count</th></tr>");
                for (r, n) in &t.reasons {
                    let _ = writeln!(o, "<tr><td>{}</td><td class=\"n\">{n}</td></tr>", esc(r));
                }
                let _ = writeln!(o, "</table>");
                for (label, m) in [("Top destinations", &t.destinations), ("Top denied", &t.denied_destinations)] {
                    if m.is_empty() {
                        continue;
                    }
                    let _ = writeln!(o, "<table><tr><th>{label}</th><th>count</th></tr>");
                    for (d, n) in top(m) {
                        let _ = writeln!(o, "<tr><td>{}</td><td class=\"n\">{n}</td></tr>", esc(d));
                    }
                    let _ = writeln!(o, "</table>");
                }
            }
        }
        let _ = writeln!(o, "</body></html>");
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn decision(
        app: &str,
        host: &str,
        port: u16,
        action: &str,
        reason: &str,
        policy: Option<&str>,
        time: &str,
    ) -> Value {
        json!({"event": "decision", "time": time, "front": "connect",
               "client": {"namespace": "shop", "labels": {"app": app}, "serviceAccount": app},
               "target": {"host": host, "port": port},
               "decision": {"action": action, "reason": reason, "policy": policy}})
    }

    /// A fixture of known counts.
    fn fixture() -> Vec<Value> {
        let mut v = Vec::new();
        for i in 0..5 {
            v.push(decision(
                "api",
                "api.stripe.com",
                443,
                "allow",
                "rule_allow",
                Some("shop/api"),
                &format!("2026-11-29T10:0{i}:00Z"),
            ));
        }
        for _ in 0..3 {
            v.push(decision(
                "api",
                "evil.example",
                443,
                "deny",
                "no_rule_matched",
                Some("shop/api"),
                "2026-11-29T11:00:00Z",
            ));
        }
        v.push(decision("api", "169.254.169.254", 80, "deny", "guard_blocked", None, "2026-11-29T11:30:00Z"));
        v.push(decision(
            "web",
            "cdn.example",
            443,
            "allow",
            "audit_would_deny",
            Some("shop/observe"),
            "2026-11-29T10:59:00Z",
        ));
        v.push(decision(
            "web",
            "nowhere.example",
            443,
            "deny",
            "dns_failure",
            Some("shop/observe"),
            "2026-11-29T12:00:00Z",
        ));
        v.push(json!({"event": "close", "time": "2026-11-29T10:05:00Z",
                      "client": {"namespace": "shop", "labels": {"app": "api"}, "serviceAccount": "api"},
                      "decision": {"policy": "shop/api"}, "close": {"bytes_up": 2048, "bytes_down": 3 * 1024 * 1024}}));
        v.push(json!({"event": "checkpoint", "time": "2026-11-29T12:30:00Z"}));
        v
    }

    #[test]
    fn counts_what_the_events_say() {
        let r = build(&fixture());
        assert_eq!((r.total.requests, r.total.allowed, r.total.denied, r.total.would_deny), (11, 5, 5, 1));
        let api = &r.workloads["shop/{app=api}, ServiceAccount api"];
        assert_eq!((api.requests, api.allowed, api.denied, api.bytes_up, api.bytes_down), (9, 5, 4, 2048, 3 << 20));
        assert_eq!(api.denied_destinations["evil.example:443"], 3);
        assert_eq!(r.policies["shop/observe"].would_deny, 1);
        assert_eq!(r.hours[10], 6);
        assert_eq!(r.hours[11], 4);
        assert_eq!(r.dns_failures["nowhere.example:443"], 1);
        assert_eq!(r.span, Some(("2026-11-29T10:00:00Z".into(), "2026-11-29T12:00:00Z".into())));
        let text = r.text();
        for line in [
            "11 decisions: 5 allowed, 5 denied, 1 would-deny; 2.0 KiB up, 3.0 MiB down",
            "       1  shop/{app=api}, ServiceAccount api -> 169.254.169.254:80 (guard_blocked)",
            "Workload shop/{app=api}, ServiceAccount api: 9 decisions: 5 allowed, 4 denied, 0 would-deny; 2.0 KiB up, 3.0 MiB down",
            "  reasons: guard_blocked 1, no_rule_matched 3, rule_allow 5",
            "       3  evil.example:443",
            "Policy shop/observe: 2 decisions: 0 allowed, 1 denied, 1 would-deny; 0 B up, 0 B down",
            "Busiest hours: 10:00 UTC (6), 11:00 UTC (4), 12:00 UTC (1)",
        ] {
            assert!(text.contains(line), "{line:?} not in:\n{text}");
        }
    }

    #[test]
    fn the_html_is_self_contained_and_escapes_what_it_shows() {
        let mut events = fixture();
        events.push(decision(
            "<script>alert(1)</script>",
            "x.example",
            443,
            "allow",
            "rule_allow",
            None,
            "2026-11-29T10:00:00Z",
        ));
        let html = build(&events).html();
        assert!(
            html.starts_with("<!DOCTYPE html>")
                && html.contains("<svg id=\"workloads\"")
                && html.contains("<svg id=\"hours\"")
        );
        assert!(!html.contains("<script"), "no script, and what the events say is escaped");
        assert!(html.contains("&lt;script&gt;"));
        for remote in ["http://", "https://", "url("] {
            let outside_svg_ns = html.replace("http://www.w3.org/2000/svg", "");
            assert!(!outside_svg_ns.contains(remote), "nothing from the network: {remote}");
        }
    }
}
