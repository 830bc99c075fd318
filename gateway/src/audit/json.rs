//! The event's JSON line, written by hand: byte for byte what `serde_json::to_writer` makes of
//! an [`Event`] (the derive in event.rs stays the reference; a property test holds the two
//! equal), at a fraction of the cost. serde_json escapes every key and every string byte by
//! byte; here keys are literals and a string is copied whole once one pass (which the compiler
//! vectorises) finds nothing to escape. Every event is written this way on the audit writer's
//! thread, two per proxied HTTP request. Rare and nested parts (resolved addresses, transparent
//! facts) still go through serde_json.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};

use super::event::{ClientInfo, CloseInfo, DecisionInfo, End, Event, EventKind, TargetInfo};
use crate::policy::Action;

/// Appends `ev` as compact JSON (no newline) to `out`.
pub(super) fn write_event(out: &mut Vec<u8>, ev: &Event) {
    out.extend_from_slice(b"{\"client\":");
    client(out, &ev.client);
    if let Some(c) = &ev.close {
        out.extend_from_slice(b",\"close\":");
        close(out, c);
    }
    out.extend_from_slice(b",\"connection_id\":");
    string(out, &ev.connection_id);
    out.extend_from_slice(b",\"decision\":");
    decision(out, &ev.decision);
    opt_sock(out, b",\"dialled\":", ev.dialled.as_ref());
    opt_string(out, b",\"egress_pool\":", ev.egress_pool.as_deref());
    opt_sock(out, b",\"egress_source\":", ev.egress_source.as_ref());
    out.extend_from_slice(b",\"event\":\"");
    out.extend_from_slice(match ev.event {
        EventKind::Decision => b"decision\"".as_slice(),
        EventKind::Close => b"close\"".as_slice(),
    });
    out.extend_from_slice(b",\"front\":\"");
    out.extend_from_slice(ev.front.as_str().as_bytes());
    out.push(b'"');
    opt_string(out, b",\"hash\":", ev.hash.as_deref());
    out.extend_from_slice(b",\"id\":\"");
    out.extend_from_slice(ev.id.hyphenated().encode_lower(&mut uuid::Uuid::encode_buffer()).as_bytes());
    out.push(b'"');
    out.extend_from_slice(b",\"instance\":");
    string(out, &ev.instance);
    opt_string(out, b",\"prev_hash\":", ev.prev_hash.as_deref());
    out.extend_from_slice(b",\"request_id\":");
    string(out, &ev.request_id);
    if !ev.resolved.is_empty() {
        out.extend_from_slice(b",\"resolved\":");
        serde(out, &ev.resolved);
    }
    out.extend_from_slice(b",\"schema\":");
    string(out, ev.schema);
    out.extend_from_slice(b",\"seq\":");
    number(out, ev.seq);
    out.extend_from_slice(b",\"target\":");
    target(out, &ev.target);
    out.extend_from_slice(b",\"time\":\"");
    ev.time.write(out);
    out.push(b'"');
    if let Some(t) = &ev.transparent {
        out.extend_from_slice(b",\"transparent\":");
        serde(out, t);
    }
    out.push(b'}');
}

fn client(out: &mut Vec<u8>, c: &ClientInfo) {
    out.extend_from_slice(b"{\"address\":\"");
    ip(out, c.address);
    out.push(b'"');
    out.extend_from_slice(b",\"identity_source\":");
    string(out, c.identity_source);
    if let Some(labels) = c.labels() {
        out.extend_from_slice(b",\"labels\":{");
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            string(out, k);
            out.push(b':');
            string(out, v);
        }
        out.push(b'}');
    }
    opt_string(out, b",\"name\":", c.name());
    opt_string(out, b",\"namespace\":", c.namespace());
    out.extend_from_slice(b",\"port\":");
    number(out, u64::from(c.port));
    opt_string(out, b",\"serviceAccount\":", c.service_account());
    opt_string(out, b",\"spiffe_id\":", c.spiffe_id.as_deref());
    out.push(b'}');
}

fn close(out: &mut Vec<u8>, c: &CloseInfo) {
    out.extend_from_slice(b"{\"bytes_down\":");
    number(out, c.bytes_down);
    out.extend_from_slice(b",\"bytes_up\":");
    number(out, c.bytes_up);
    out.extend_from_slice(b",\"duration_ms\":");
    number(out, c.duration_ms);
    out.extend_from_slice(b",\"end\":\"");
    out.extend_from_slice(end(c.end).as_bytes());
    out.push(b'"');
    opt_string(out, b",\"error\":", c.error.as_deref());
    if let Some(s) = c.http_status {
        out.extend_from_slice(b",\"http_status\":");
        number(out, u64::from(s));
    }
    out.push(b'}');
}

fn decision(out: &mut Vec<u8>, d: &DecisionInfo) {
    out.extend_from_slice(match d.action {
        Action::Allow => b"{\"action\":\"allow\"".as_slice(),
        Action::Deny => b"{\"action\":\"deny\"".as_slice(),
    });
    opt_string(out, b",\"detail\":", d.detail.as_deref());
    opt_string(out, b",\"guard_category\":", d.guard_category);
    if !d.guard_exempt.is_empty() {
        out.extend_from_slice(b",\"guard_exempt\":[");
        for (i, n) in d.guard_exempt.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            display(out, n);
        }
        out.push(b']');
    }
    out.extend_from_slice(match d.mode {
        egress_crds::Mode::Enforce => b",\"mode\":\"Enforce\"".as_slice(),
        egress_crds::Mode::Audit => b",\"mode\":\"Audit\"".as_slice(),
    });
    opt_string(out, b",\"policy\":", d.policy.as_deref());
    out.extend_from_slice(b",\"reason\":\"");
    out.extend_from_slice(d.reason.as_str().as_bytes());
    out.push(b'"');
    opt_string(out, b",\"rule\":", d.rule.as_deref());
    out.push(b'}');
}

fn target(out: &mut Vec<u8>, t: &TargetInfo) {
    out.extend_from_slice(b"{\"host\":");
    string(out, &t.host);
    if let Some(h) = &t.http {
        out.extend_from_slice(b",\"http\":{\"method\":");
        string(out, &h.method);
        out.extend_from_slice(b",\"path\":");
        string(out, &h.path);
        out.push(b'}');
    }
    out.extend_from_slice(b",\"port\":");
    number(out, u64::from(t.port));
    out.push(b'}');
}

fn end(e: End) -> &'static str {
    match e {
        End::Completed => "completed",
        End::ClientClosed => "client_closed",
        End::UpstreamClosed => "upstream_closed",
        End::IdleTimeout => "idle_timeout",
        End::Shutdown => "shutdown",
        End::ConnectFailed => "connect_failed",
        End::ClientError => "client_error",
        End::Error => "error",
    }
}

/// `key` (`,"name":`) and the string, when there is one.
fn opt_string(out: &mut Vec<u8>, key: &[u8], v: Option<&str>) {
    if let Some(v) = v {
        out.extend_from_slice(key);
        string(out, v);
    }
}

/// `key` and the socket address's string (`1.2.3.4:80`, `[::1]:80`), when there is one.
fn opt_sock(out: &mut Vec<u8>, key: &[u8], v: Option<&SocketAddr>) {
    if let Some(v) = v {
        out.extend_from_slice(key);
        out.push(b'"');
        match v {
            SocketAddr::V4(a) => {
                ip(out, IpAddr::V4(*a.ip()));
                out.push(b':');
                number(out, u64::from(a.port()));
            }
            SocketAddr::V6(_) => {
                let _ = write!(Utf8(out), "{v}");
            }
        }
        out.push(b'"');
    }
}

/// An address as its `Display` string, without the quotes. IPv4 (nearly every address in an
/// event) octet by octet: `Ipv4Addr`'s `Display` goes through the formatter's padding machinery
/// and cost more than the rest of the event's numbers together.
fn ip(out: &mut Vec<u8>, a: IpAddr) {
    match a {
        IpAddr::V4(a) => out.extend_from_slice(crate::target::Ipv4Text::new(a).as_str().as_bytes()),
        IpAddr::V6(_) => {
            let _ = write!(Utf8(out), "{a}");
        }
    }
}

/// A JSON string: copied whole when nothing in it needs escaping (no quote, backslash or control
/// character: serde_json's and ECMAScript's rule), else escaped by serde_json. The test looks at
/// every byte without stopping early, which the compiler turns into a few vector compares.
fn string(out: &mut Vec<u8>, s: &str) {
    let needs_escape = s.bytes().fold(false, |any, b| any | (b < 0x20) | (b == b'"') | (b == b'\\'));
    if !needs_escape {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        serde(out, s);
    }
}

fn number(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// A value serialised as its `Display` string, as serde does for addresses and networks (none
/// of which contains a character to escape).
fn display(out: &mut Vec<u8>, v: &impl std::fmt::Display) {
    out.push(b'"');
    let _ = write!(Utf8(out), "{v}");
    out.push(b'"');
}

fn serde(out: &mut Vec<u8>, v: &(impl serde::Serialize + ?Sized)) {
    let _ = serde_json::to_writer(&mut *out, v);
}

/// `fmt::Write` into a byte buffer.
struct Utf8<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Utf8<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.write_all(s.as_bytes()).map_err(|_| std::fmt::Error)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::*;
    use crate::audit::{ResolvedAddr, Timestamp};
    use crate::guard::Verdict;
    use crate::identity::Identity;
    use crate::policy::HttpFacts;
    use crate::reason::Reason;
    use crate::request::{Front, TransparentFacts};

    /// Strings with what needs escaping (quotes, backslashes, control characters), non-ASCII and
    /// plain text, so both paths of `string` are taken.
    fn text() -> impl Strategy<Value = String> {
        prop_oneof!["[a-z0-9./:-]{0,24}", any::<String>(), "[\"\\\\\u{0}-\u{1f}a\u{7f}é€😀]{0,8}",]
    }

    fn ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![any::<std::net::Ipv4Addr>().prop_map(IpAddr::V4), any::<std::net::Ipv6Addr>().prop_map(IpAddr::V6)]
    }

    fn sock() -> impl Strategy<Value = SocketAddr> {
        (ip(), any::<u16>()).prop_map(|(i, p)| SocketAddr::new(i, p))
    }

    fn arc(s: impl Strategy<Value = String>) -> impl Strategy<Value = Arc<str>> {
        s.prop_map(Arc::from)
    }

    fn identity() -> impl Strategy<Value = Arc<Identity>> {
        (text(), text(), prop::option::of(text()), prop::collection::btree_map(text(), text(), 0..4)).prop_map(
            |(namespace, name, service_account, labels)| {
                Arc::new(Identity {
                    namespace,
                    name,
                    service_account,
                    labels,
                    namespace_labels: BTreeMap::new(),
                    verified: false,
                    selected: Arc::from([]),
                })
            },
        )
    }

    fn client() -> impl Strategy<Value = ClientInfo> {
        (
            ip(),
            prop::sample::select(vec!["address", "token", "socks5_user", "certificate"]),
            prop::option::of(identity()),
            any::<u16>(),
            prop::option::of(arc(text())),
        )
            .prop_map(|(address, identity_source, identity, port, spiffe_id)| ClientInfo {
                address,
                identity_source,
                identity,
                port,
                spiffe_id,
            })
    }

    /// Any instant RFC 3339 can write (years 1970 to 9999), to the nanosecond.
    fn timestamp() -> impl Strategy<Value = Timestamp> {
        (0..253_402_300_800_000_000_000i128).prop_map(|n| Timestamp::from_unix_nanos(n).expect("in range"))
    }

    fn close() -> impl Strategy<Value = CloseInfo> {
        let ends = vec![
            End::Completed,
            End::ClientClosed,
            End::UpstreamClosed,
            End::IdleTimeout,
            End::Shutdown,
            End::ConnectFailed,
            End::ClientError,
            End::Error,
        ];
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            prop::sample::select(ends),
            prop::option::of(text()),
            any::<Option<u16>>(),
        )
            .prop_map(|(bytes_down, bytes_up, duration_ms, end, error, http_status)| CloseInfo {
                bytes_down,
                bytes_up,
                duration_ms,
                end,
                error,
                http_status,
            })
    }

    fn decision() -> impl Strategy<Value = DecisionInfo> {
        let net = (ip(), 0u8..=128).prop_map(|(a, l)| {
            let l = if a.is_ipv4() { l.min(32) } else { l };
            ipnet::IpNet::new(a, l).expect("prefix length in range")
        });
        (
            prop::sample::select(vec![Action::Allow, Action::Deny]),
            prop::option::of(text()),
            prop::option::of(prop::sample::select(vec!["metadata", "loopback", "private"])),
            prop::collection::vec(net, 0..3),
            prop::sample::select(vec![egress_crds::Mode::Enforce, egress_crds::Mode::Audit]),
            (prop::option::of(arc(text())), prop::sample::select(Reason::ALL.to_vec()), prop::option::of(arc(text()))),
        )
            .prop_map(|(action, detail, guard_category, guard_exempt, mode, (policy, reason, rule))| {
                DecisionInfo { action, detail, guard_category, guard_exempt, mode, policy, reason, rule }
            })
    }

    fn target() -> impl Strategy<Value = TargetInfo> {
        (text(), prop::option::of((text(), text())), any::<u16>()).prop_map(|(host, http, port)| TargetInfo {
            host,
            http: http.map(|(method, path): (String, String)| HttpFacts { method: method.into(), path: path.into() }),
            port,
        })
    }

    fn transparent() -> impl Strategy<Value = TransparentFacts> {
        (
            prop::option::of(arc(text())),
            prop::collection::vec(arc(text()), 0..3),
            prop::option::of(text()),
            sock(),
            any::<Option<bool>>(),
            sock(),
            prop::option::of(text()),
        )
            .prop_map(|(dns_name, dns_names, http_host, original_dst, original_in_resolved, relay, sni)| {
                TransparentFacts { dns_name, dns_names, http_host, original_dst, original_in_resolved, relay, sni }
            })
    }

    fn resolved() -> impl Strategy<Value = ResolvedAddr> {
        let verdict = prop_oneof![
            Just(Verdict::Pass),
            Just(Verdict::Blocked("metadata")),
            Just(Verdict::Internal("private")),
            ip().prop_map(|a| Verdict::Exempt(ipnet::IpNet::from(a))),
        ];
        (ip(), verdict, prop::option::of(text())).prop_map(|(address, verdict, denied_by)| ResolvedAddr {
            address,
            verdict,
            denied_by,
        })
    }

    fn event() -> impl Strategy<Value = Event> {
        (
            (client(), prop::option::of(close()), arc(text()), decision()),
            (prop::option::of(sock()), prop::option::of(arc(text())), prop::option::of(sock())),
            (
                prop::sample::select(vec![EventKind::Decision, EventKind::Close]),
                prop::sample::select(Front::ALL.to_vec()),
                prop::option::of(text()),
                any::<u128>().prop_map(uuid::Uuid::from_u128),
                arc(text()),
            ),
            (prop::option::of(text()), arc(text()), prop::collection::vec(resolved(), 0..3), any::<u64>()),
            (target(), timestamp(), prop::option::of(transparent().prop_map(Box::new))),
        )
            .prop_map(
                |(
                    (client, close, connection_id, decision),
                    (dialled, egress_pool, egress_source),
                    (event, front, hash, id, instance),
                    (prev_hash, request_id, resolved, seq),
                    (target, time, transparent),
                )| Event {
                    client,
                    close,
                    connection_id,
                    decision,
                    dialled,
                    egress_pool,
                    egress_source,
                    event,
                    front,
                    hash,
                    id,
                    instance,
                    prev_hash,
                    request_id,
                    resolved,
                    schema: "egress.v1",
                    seq,
                    target,
                    time,
                    transparent,
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// The hand-written line is exactly serde_json's: the same bytes, so the same hash, and
        /// every consumer of the serde form (docs, the verifier, the renderers) reads it alike.
        #[test]
        fn written_by_hand_equals_serde_json(ev in event()) {
            let mut fast = Vec::new();
            write_event(&mut fast, &ev);
            let reference = serde_json::to_vec(&ev).expect("serialises");
            prop_assert_eq!(String::from_utf8_lossy(&fast), String::from_utf8_lossy(&reference));
        }
    }

    #[test]
    fn strings_with_quotes_backslashes_and_controls_are_escaped() {
        let mut out = Vec::new();
        string(&mut out, "a\"b\\c\u{1}\n€");
        assert_eq!(String::from_utf8(out.clone()).unwrap(), r#""a\"b\\c\u0001\n€""#);
        out.clear();
        string(&mut out, "plain / text: 1.2.3.4");
        assert_eq!(out, br#""plain / text: 1.2.3.4""#);
    }
}
