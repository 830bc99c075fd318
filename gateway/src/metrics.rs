//! Prometheus metrics. Counters on the hot path are pre-created (no map lookup, no lock).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use std::sync::Arc;

use crate::reason::Reason;
use crate::request::Front;

/// Every metric the gateway exports.
pub struct Metrics {
    registry: Registry,
    /// The process's own metrics (`process_*`, no prefix).
    process: Registry,
    /// Accepted client connections per front.
    pub connections: [Counter; Front::ALL.len()],
    /// Client addresses the policies' rate limiters hold state for (pruned every 10 s).
    pub rate_limiter_keys: Gauge,
    /// Client states dropped by that pruning.
    pub rate_limiter_pruned: Counter,
    /// Replicas every rate limit is shared among (`kubernetes.rateLimitReplicas`; 1: not shared).
    pub rate_limit_replicas: Gauge,
    /// Client connections currently open.
    pub active_connections: Gauge,
    /// Tunnels (CONNECT, SOCKS5, transparent) currently open.
    pub open_tunnels: Gauge,
    decisions_allow: Vec<Counter>,
    decisions_deny: Vec<Counter>,
    /// Decided requests by how the client's identity was established, in the order of
    /// [`IDENTITY_SOURCES`].
    identities: Vec<Counter>,
    /// Bytes client -> upstream.
    pub bytes_up: Counter,
    /// Bytes upstream -> client.
    pub bytes_down: Counter,
    /// Upstream TCP connect latency (successful connects).
    pub connect_seconds: Histogram,
    /// Upstream connect failures.
    pub connect_failures: Counter,
    /// DNS lookup latency.
    pub dns_seconds: Histogram,
    /// DNS lookup failures.
    pub dns_failures: Counter,
    /// Address families put on hold for a name (failed while the other family answered).
    pub dns_family_held: Counter,
    /// Config reloads by result.
    pub reloads_ok: Counter,
    /// Failed config reloads (the previous config stays in force).
    pub reloads_failed: Counter,
    /// 1 when the last reload attempt failed.
    pub config_stale: Gauge,
    /// Audit events written.
    pub audit_events: Counter,
    /// Writes of buffered events to the sinks (no spool): events / writes is the batching.
    pub audit_direct_writes: Counter,
    /// Audit write errors.
    pub audit_errors: Counter,
    /// Seconds the Kubernetes snapshot has been possibly stale (0: watchers healthy).
    pub kube_stale_seconds: Gauge,
    /// Policies from the Kubernetes API skipped whole: invalid, or not decodable.
    pub kube_policies_invalid: Gauge,
    /// Audit events that could not be committed (spool full or unwritable).
    pub audit_dropped: Counter,
    /// 1 while audit events cannot be committed.
    pub audit_unavailable: Gauge,
    /// Bytes in the audit spool.
    pub audit_spool_bytes: Gauge,
    /// `audit.spool.maxBytes`.
    pub audit_spool_max_bytes: Gauge,
    /// Decisions per deciding policy: `egress_policy_decisions_total{policy, action}`.
    policy_decisions: Family<PolicyLabels, Counter>,
    /// The counters of the policies in force, by key (`allow`, `deny`, `would_deny`): a
    /// decision costs a lookup, no allocation; replaced when the policy set changes.
    policy_counters: arc_swap::ArcSwap<std::collections::HashMap<Arc<str>, [Counter; 3]>>,
    /// Per-sink delivery metrics.
    pub audit_sinks: SinkMetricFamilies,
}

/// Per-sink audit delivery metrics (label `sink`).
#[derive(Default)]
pub struct SinkMetricFamilies {
    delivered: Family<SinkLabels, Counter>,
    retried: Family<SinkLabels, Counter>,
    failed: Family<SinkLabels, Counter>,
    dead_lettered: Family<SinkLabels, Counter>,
    lag: Family<SinkLabels, Gauge>,
    oldest_age: Family<SinkLabels, Gauge>,
    last_success: Family<SinkLabels, Gauge>,
}

/// The metrics of one sink.
#[derive(Clone)]
pub struct SinkMetrics {
    /// Events delivered.
    pub delivered: Counter,
    /// Delivery attempts repeated after a failure.
    pub retried: Counter,
    /// Delivery attempts that failed.
    pub failed: Counter,
    /// Events the receiver rejected for good, written to the dead-letter file.
    pub dead_lettered: Counter,
    /// Committed events not yet delivered.
    pub lag: Gauge,
    /// Age in seconds of the oldest undelivered event (0 when caught up).
    pub oldest_age: Gauge,
    /// Unix time of the last successful delivery.
    pub last_success: Gauge,
}

impl SinkMetricFamilies {
    /// The metrics of the sink `name`.
    pub fn sink(&self, name: &str) -> SinkMetrics {
        let l = SinkLabels { sink: name.to_string() };
        SinkMetrics {
            delivered: self.delivered.get_or_create(&l).clone(),
            retried: self.retried.get_or_create(&l).clone(),
            failed: self.failed.get_or_create(&l).clone(),
            dead_lettered: self.dead_lettered.get_or_create(&l).clone(),
            lag: self.lag.get_or_create(&l).clone(),
            oldest_age: self.oldest_age.get_or_create(&l).clone(),
            last_success: self.last_success.get_or_create(&l).clone(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct SinkLabels {
    sink: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct PolicyLabels {
    policy: String,
    action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct SourceLabels {
    source: &'static str,
}

/// How a client's identity was established, as `egress_client_identities_total{source}` says it.
pub(crate) const IDENTITY_SOURCES: [&str; 4] = ["address", "token", "socks5_user", "certificate"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct DecisionLabels {
    action: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct FrontLabels {
    front: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct DirLabels {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("egress");
        egress_netio::exposition::register_build_info(&mut registry, env!("CARGO_PKG_VERSION"));
        let conns = Family::<FrontLabels, Counter>::default();
        let connections = Front::ALL.map(|f| conns.get_or_create(&FrontLabels { front: f.as_str() }).clone());
        registry.register("connections", "Accepted client connections", conns);
        let active_connections = Gauge::default();
        registry.register("active_connections", "Client connections currently open", active_connections.clone());
        let open_tunnels = Gauge::default();
        registry.register(
            "open_tunnels",
            "Tunnels currently open (CONNECT, SOCKS5, transparent), admitted under limits.maxTunnelsPerClient",
            open_tunnels.clone(),
        );
        let rate_limiter_keys = Gauge::default();
        registry.register(
            "rate_limiter_keys",
            "Client addresses the policies' rate limiters hold state for (idle ones are pruned every 10 s)",
            rate_limiter_keys.clone(),
        );
        let rate_limiter_pruned = Counter::default();
        registry.register(
            "rate_limiter_pruned",
            "Client states the rate limiters dropped because they were back to a full bucket",
            rate_limiter_pruned.clone(),
        );
        let rate_limit_replicas = Gauge::default();
        rate_limit_replicas.set(1);
        registry.register(
            "rate_limit_replicas",
            "Ready gateway replicas each policy's rate limit is shared among (kubernetes.rateLimitReplicas; 1: each replica enforces the whole rate)",
            rate_limit_replicas.clone(),
        );
        let decisions = Family::<DecisionLabels, Counter>::default();
        // Only the combinations that can happen are exported (an allow is rule_allow,
        // default_allow or audit_would_deny; a denial anything else): the others count into
        // counters no scrape sees.
        let allows = |r: &Reason| matches!(r, Reason::RuleAllow | Reason::DefaultAllow | Reason::AuditWouldDeny);
        let mk = |action: &'static str| {
            Reason::ALL
                .iter()
                .map(|r| {
                    if allows(r) == (action == "allow") {
                        decisions.get_or_create(&DecisionLabels { action, reason: r.as_str() }).clone()
                    } else {
                        Counter::default()
                    }
                })
                .collect::<Vec<_>>()
        };
        let (decisions_allow, decisions_deny) = (mk("allow"), mk("deny"));
        registry.register("decisions", "Decisions by action and reason", decisions);
        let by_source = Family::<SourceLabels, Counter>::default();
        let identities =
            IDENTITY_SOURCES.iter().map(|&source| by_source.get_or_create(&SourceLabels { source }).clone()).collect();
        registry.register(
            "client_identities",
            "Requests decided by policy, by how the client's identity was established (address, token, socks5_user, certificate)",
            by_source,
        );
        let bytes = Family::<DirLabels, Counter>::default();
        let bytes_up = bytes.get_or_create(&DirLabels { direction: "up" }).clone();
        let bytes_down = bytes.get_or_create(&DirLabels { direction: "down" }).clone();
        registry.register("bytes", "Bytes relayed (up: client to upstream)", bytes);
        let connect_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register("upstream_connect_seconds", "Upstream TCP connect latency", connect_seconds.clone());
        let connect_failures = Counter::default();
        registry.register("upstream_connect_failures", "Upstream connects that failed", connect_failures.clone());
        let dns_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        registry.register("dns_lookup_seconds", "DNS lookup latency (cache hits included)", dns_seconds.clone());
        let dns_failures = Counter::default();
        registry.register("dns_lookup_failures", "DNS lookups that failed", dns_failures.clone());
        let dns_family_held = Counter::default();
        registry.register(
            "dns_family_held",
            format!(
                "A or AAAA queries that failed while the other family answered; that family is not asked for the name for {} s",
                crate::resolve::FAMILY_HOLD.as_secs()
            ),
            dns_family_held.clone(),
        );
        let reloads = Family::<ResultLabels, Counter>::default();
        let reloads_ok = reloads.get_or_create(&ResultLabels { result: "ok" }).clone();
        let reloads_failed = reloads.get_or_create(&ResultLabels { result: "failed" }).clone();
        registry.register("config_reloads", "Config reload attempts by result", reloads);
        let config_stale = Gauge::default();
        registry.register(
            "config_reload_failing",
            "1 while the last reload failed and the previous config is in force",
            config_stale.clone(),
        );
        let audit_events = Counter::default();
        registry.register("audit_events", "Audit events written", audit_events.clone());
        let audit_direct_writes = Counter::default();
        registry.register(
            "audit_direct_writes",
            "Writes of buffered audit events to the sinks without a spool (each carries every event since the last)",
            audit_direct_writes.clone(),
        );
        let audit_errors = Counter::default();
        registry.register("audit_write_errors", "Audit sink write errors", audit_errors.clone());
        let kube_stale_seconds = Gauge::default();
        registry.register(
            "kube_stale_seconds",
            "Seconds since a Kubernetes watcher started failing (0 while all are healthy); the last snapshot keeps serving",
            kube_stale_seconds.clone(),
        );
        let kube_policies_invalid = Gauge::default();
        registry.register(
            "kube_policies_invalid",
            "Policies from the Kubernetes API skipped whole because they are invalid or do not decode (see their Accepted condition)",
            kube_policies_invalid.clone(),
        );
        let audit_dropped = Counter::default();
        registry.register(
            "audit_dropped",
            "Audit events that could not be committed (spool full or unwritable)",
            audit_dropped.clone(),
        );
        let audit_unavailable = Gauge::default();
        registry.register("audit_unavailable", "1 while audit events cannot be committed", audit_unavailable.clone());
        let audit_spool_bytes = Gauge::default();
        registry.register("audit_spool_bytes", "Bytes in the audit spool", audit_spool_bytes.clone());
        let audit_spool_max_bytes = Gauge::default();
        registry.register(
            "audit_spool_max_bytes",
            "The audit spool's bound (audit.spool.maxBytes; 0 without a spool)",
            audit_spool_max_bytes.clone(),
        );
        let policy_decisions = Family::<PolicyLabels, Counter>::default();
        registry.register(
            "policy_decisions",
            "Decisions made by each policy in force: allow, deny, or would_deny (Audit mode)",
            policy_decisions.clone(),
        );
        let audit_sinks = SinkMetricFamilies::default();
        registry.register("audit_sink_delivered", "Audit events delivered, per sink", audit_sinks.delivered.clone());
        registry.register("audit_sink_retried", "Audit deliveries retried, per sink", audit_sinks.retried.clone());
        registry.register(
            "audit_sink_failed",
            "Audit delivery attempts that failed, per sink",
            audit_sinks.failed.clone(),
        );
        registry.register(
            "audit_sink_dead_lettered",
            "Audit events rejected for good by the receiver (dead-letter file), per sink",
            audit_sinks.dead_lettered.clone(),
        );
        registry.register("audit_sink_lag_events", "Committed audit events not yet delivered", audit_sinks.lag.clone());
        registry.register(
            "audit_sink_oldest_undelivered_seconds",
            "Age of the oldest undelivered audit event (0 when caught up)",
            audit_sinks.oldest_age.clone(),
        );
        registry.register(
            "audit_sink_last_success_timestamp_seconds",
            "Unix time of the last successful delivery",
            audit_sinks.last_success.clone(),
        );
        registry.register_collector(Box::new(egress_netio::RelayCollector));
        Metrics {
            audit_dropped,
            audit_unavailable,
            audit_spool_bytes,
            audit_spool_max_bytes,
            policy_decisions,
            policy_counters: arc_swap::ArcSwap::from_pointee(std::collections::HashMap::new()),
            audit_sinks,
            kube_stale_seconds,
            kube_policies_invalid,
            registry,
            process: egress_netio::exposition::process_registry(),
            connections,
            rate_limiter_keys,
            rate_limiter_pruned,
            rate_limit_replicas,
            active_connections,
            open_tunnels,
            decisions_allow,
            decisions_deny,
            identities,
            bytes_up,
            bytes_down,
            connect_seconds,
            connect_failures,
            dns_seconds,
            dns_failures,
            dns_family_held,
            reloads_ok,
            reloads_failed,
            config_stale,
            audit_events,
            audit_direct_writes,
            audit_errors,
        }
    }

    /// Counts a request decided by policy for a client identified by `IDENTITY_SOURCES[source]`.
    pub fn identified(&self, source: usize) {
        if let Some(c) = self.identities.get(source) {
            c.inc();
        }
    }

    /// The policies in force (their keys): their counters are created, and those of policies
    /// gone are removed from the exposition (the label set stays bounded by the policies).
    pub fn set_policies<'a>(&self, keys: impl Iterator<Item = &'a Arc<str>>) {
        let old = self.policy_counters.load_full();
        let mut next = std::collections::HashMap::new();
        for k in keys {
            let counters = old.get(k).cloned().unwrap_or_else(|| {
                ["allow", "deny", "would_deny"].map(|action| {
                    self.policy_decisions.get_or_create(&PolicyLabels { policy: k.to_string(), action }).clone()
                })
            });
            next.insert(k.clone(), counters);
        }
        for k in old.keys().filter(|k| !next.contains_key(*k)) {
            for action in ["allow", "deny", "would_deny"] {
                self.policy_decisions.remove(&PolicyLabels { policy: k.to_string(), action });
            }
        }
        self.policy_counters.store(Arc::new(next));
    }

    /// Counts a decision of `policy`.
    pub fn policy_decision(&self, policy: &str, allow: bool, reason: Reason) {
        if let Some(c) = self.policy_counters.load().get(policy) {
            let i = match (allow, reason) {
                (true, Reason::AuditWouldDeny) => 2,
                (true, _) => 0,
                (false, _) => 1,
            };
            c[i].inc();
        }
    }

    /// Counts a decision.
    pub fn decision(&self, allow: bool, reason: Reason) {
        let v = if allow { &self.decisions_allow } else { &self.decisions_deny };
        v[reason.index()].inc();
    }

    /// The exposition (OpenMetrics when asked for, else the Prometheus text format) with the
    /// process's own metrics, and its `Content-Type`.
    pub fn render(&self, openmetrics: bool) -> (String, &'static str) {
        egress_netio::exposition::render(&[&self.registry, &self.process], openmetrics)
    }
}
