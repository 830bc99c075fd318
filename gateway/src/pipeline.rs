//! The one decision pipeline every front hands its `EgressRequest` to:
//! identity -> target normalisation -> policy -> rate limit -> resolution -> guard on every
//! address -> dial from the egress pool -> (front relays) -> close event.
//! Audit events are emitted here, before the client gets an answer and before the first byte
//! goes upstream.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use arc_swap::{ArcSwap, ArcSwapOption};

use crate::audit::{
    Audit, ClientInfo, CloseInfo, DecisionInfo, End, Event, EventKind, ResolvedAddr, TargetInfo, now_rfc3339,
};
use crate::config::{self, Loaded};
use crate::dial::{self, DialError, Pools};
use crate::guard::{Guard, Verdict};
use crate::identity::{Identity, IdentityTable};
use crate::inputs::KubeInputs;
use crate::metrics::Metrics;
use crate::policy::{Action, Decision, HttpFacts, Reason, Snapshot};
use crate::request::{ClientConn, EgressRequest, Front, RawTarget};
use crate::resolve::Resolver;
use crate::target::{self, Host, Target, TargetError};

/// Everything derived from one config load, swapped whole.
pub struct State {
    /// The config and its policies.
    pub loaded: Loaded,
    /// Compiled policies.
    pub snapshot: Snapshot,
    /// Client identities.
    pub identities: IdentityTable,
    /// The guard.
    pub guard: Guard,
    /// Source-address pools.
    pub pools: Pools,
    /// Checks the relays' PROXY header MACs (`transparent.relayKeyFile`, `relayMaxSkew`).
    pub relay_auth: egress_netio::proxy::Verifier,
}

impl State {
    /// Compiles a loaded config and, in Kubernetes mode, the API's policies and Pods.
    /// `previous` lends its rate-limit buckets to unchanged policies.
    pub fn build(loaded: Loaded, kube: Option<&KubeInputs>, previous: Option<&State>, own: &[IpAddr]) -> State {
        let c = &loaded.config;
        let mut policies: Vec<_> = loaded.policies.iter().map(|(_, p)| p.clone()).collect();
        if let Some(k) = kube {
            policies.extend(k.policies.iter().cloned());
        }
        let snapshot = Snapshot::compile(c.default_action, &policies, previous.map(|p| &p.snapshot));
        let pods = kube.map(|k| k.pods.as_slice()).unwrap_or(&[]);
        State {
            identities: IdentityTable::build(&c.clients, pods, |id| snapshot.selected(Some(id))),
            snapshot,
            guard: Guard::new(c.guard.allow_cidrs.clone(), own.to_vec()),
            pools: Pools::new(&c.egress_addresses),
            relay_auth: egress_netio::proxy::Verifier::new(loaded.relay_keys.clone(), c.transparent.relay_max_skew),
            loaded,
        }
    }
}

/// The result of resolving an allowed name and checking every address.
#[derive(Debug, Clone)]
pub struct Checked {
    /// The decision, turned into a denial when no address survived.
    pub decision: Decision,
    /// Every resolved address with its verdict.
    pub resolved: Vec<ResolvedAddr>,
    /// Addresses that may be dialled.
    pub addrs: Vec<IpAddr>,
    /// DNS error text.
    pub detail: Option<String>,
}

/// Resolves an allowed target (when it is a name) and keeps only the addresses the guard passes
/// and no cluster Deny CIDR rule covers. A denied decision is returned unchanged.
pub async fn resolve_checked(
    state: &State,
    resolver: Option<&Resolver>,
    metrics: Option<&Metrics>,
    mut decision: Decision,
    target: &Target,
) -> Checked {
    let name = match (&target.host, decision.action) {
        (_, Action::Deny) => {
            return Checked { decision, resolved: vec![], addrs: vec![], detail: None };
        }
        (Host::Ip(ip), _) => {
            return Checked { decision, resolved: vec![], addrs: vec![*ip], detail: None };
        }
        (Host::Name(n), _) => n,
    };
    let Some(resolver) = resolver else {
        return Checked { decision, resolved: vec![], addrs: vec![], detail: None };
    };
    let started = Instant::now();
    let lookup = resolver.lookup(name).await;
    if let Some(m) = metrics {
        m.dns_seconds.observe(started.elapsed().as_secs_f64());
    }
    let ips = match lookup {
        Ok(ips) => ips,
        Err(e) => {
            if let Some(m) = metrics {
                m.dns_failures.inc();
            }
            return Checked {
                decision: decision.deny(Reason::DnsFailure),
                resolved: vec![],
                addrs: vec![],
                detail: Some(e),
            };
        }
    };
    let mut resolved = Vec::with_capacity(ips.len());
    let mut addrs = Vec::with_capacity(ips.len());
    for ip in ips {
        let ip = target::canonical_ip(ip);
        let verdict = state.guard.check(ip);
        let mut denied_by = None;
        if matches!(verdict, Verdict::Pass | Verdict::Exempt(_)) {
            denied_by =
                state.snapshot.deny_for_address(&decision.selected, ip, target.port).map(|(p, r)| format!("{p}/{r}"));
            if denied_by.is_none() {
                addrs.push(ip);
                if let Verdict::Exempt(n) = verdict
                    && decision.guard_exempt.is_none()
                {
                    decision.guard_exempt = Some(n);
                }
            }
        }
        resolved.push(ResolvedAddr { address: ip, verdict, denied_by });
    }
    if addrs.is_empty() {
        let blocked = resolved.iter().find_map(|r| match r.verdict {
            Verdict::Blocked(c) => Some(c),
            _ => None,
        });
        let internal = resolved.iter().find_map(|r| match r.verdict {
            Verdict::Internal(c) => Some(c),
            _ => None,
        });
        decision = match (blocked, internal) {
            (Some(c), _) => {
                decision.guard_category = Some(c);
                decision.deny(Reason::DnsGuardBlocked)
            }
            (None, Some(c)) => {
                decision.guard_category = Some(c);
                decision.deny(Reason::DnsInternalAddress)
            }
            (None, None) if resolved.iter().any(|r| r.denied_by.is_some()) => decision.deny(Reason::ClusterDeny),
            (None, None) => decision.deny(Reason::DnsFailure),
        };
        let detail = resolved.is_empty().then(|| "no address".to_string());
        return Checked { decision, resolved, addrs, detail };
    }
    Checked { decision, resolved, addrs, detail: None }
}

/// How a front must refuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    /// Policy or guard said no.
    Denied,
    /// Rate limit exceeded.
    RateLimited,
    /// The request is malformed or its target invalid.
    BadRequest,
    /// The name did not resolve.
    DnsFailure,
    /// Every upstream address refused.
    ConnectRefused,
    /// The upstream connect timed out.
    ConnectTimeout,
    /// The upstream was unreachable.
    Unreachable,
    /// The decision could not be committed to the audit spool (`failClosed`).
    AuditUnavailable,
    /// The gateway ran out of file descriptors, ports or buffers.
    LocalResources,
    /// A connection limit (`limits.maxConnections`, `limits.maxConnectionsPerClient`).
    ConnectionLimit,
}

impl RefusalKind {
    /// The HTTP status and the words of the answer, for every front that answers in HTTP.
    pub fn http_status(self) -> (u16, &'static str) {
        match self {
            RefusalKind::Denied => (403, "denied by egress policy"),
            RefusalKind::RateLimited => (429, "rate limit exceeded"),
            RefusalKind::BadRequest => (400, "bad request"),
            RefusalKind::DnsFailure => (502, "name resolution failed"),
            RefusalKind::ConnectRefused | RefusalKind::Unreachable => (502, "upstream unreachable"),
            RefusalKind::ConnectTimeout => (504, "upstream connect timed out"),
            RefusalKind::AuditUnavailable => (503, "audit log unavailable"),
            RefusalKind::LocalResources => (503, "gateway out of local resources"),
            RefusalKind::ConnectionLimit => (503, "too many connections"),
        }
    }
}

impl Refusal {
    /// The words of the answer: what refused the request, in terms a user can act on (the
    /// built-in guard is not a policy, and says why).
    pub fn words(&self) -> &'static str {
        match (self.kind, self.reason) {
            (RefusalKind::Denied, Reason::GuardBlocked | Reason::GuardBlockedName) => {
                "denied by the built-in guard: the destination is cloud metadata, loopback, link-local or another blocked range, which only guard.allowCidrs opens"
            }
            (RefusalKind::Denied, Reason::GuardInternal) => {
                "denied by the built-in guard: the destination is an internal address (RFC 1918, CGNAT, ULA), which only a cidr rule naming it opens"
            }
            (RefusalKind::Denied, Reason::DnsGuardBlocked) => {
                "denied by the built-in guard: the name resolves only to blocked addresses (cloud metadata, loopback, link-local, ...)"
            }
            (RefusalKind::Denied, Reason::DnsInternalAddress) => {
                "denied by the built-in guard: the name resolves only to internal addresses, which a domain rule never opens"
            }
            (RefusalKind::Denied, Reason::ClusterDeny) => "denied by a ClusterEgressPolicy Deny rule",
            (RefusalKind::Denied, Reason::DefaultDeny | Reason::NoRuleMatched) => {
                "denied by egress policy: no rule allows this destination for this client"
            }
            (kind, _) => kind.http_status().1,
        }
    }
}

/// A refusal, already audited.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// What kind of answer the front gives.
    pub kind: RefusalKind,
    /// Reason code.
    pub reason: Reason,
    /// Request id to show the client.
    pub request_id: Arc<str>,
    /// Detail for the client (never policy internals beyond names).
    pub detail: String,
}

impl Refusal {
    /// The audit event could not be committed: nothing may pass unaudited.
    fn audit_unavailable(request_id: Arc<str>) -> Refusal {
        Refusal {
            kind: RefusalKind::AuditUnavailable,
            reason: Reason::AuditUnavailable,
            request_id,
            detail: "audit log unavailable; try again later".into(),
        }
    }
}

/// An allowed, checked request, ready to dial or reuse.
pub struct Permit {
    gw: Arc<Pipeline>,
    base: Event,
    /// The normalised target.
    pub target: Target,
    /// Addresses that may be dialled.
    pub addrs: Vec<IpAddr>,
    /// Pool name.
    pub pool: Arc<str>,
    state: Arc<State>,
}

/// An upstream connection or request in progress; emits the close event exactly once.
pub struct CloseLog {
    gw: Arc<Pipeline>,
    base: Option<Event>,
    started: Instant,
}

/// A dialled upstream.
pub struct Upstream {
    /// The TCP stream.
    pub stream: tokio::net::TcpStream,
    /// The address dialled.
    pub dialled: SocketAddr,
    /// Close-event handle.
    pub log: CloseLog,
}

/// The decision pipeline of a running gateway: the state in force (swapped whole on reload
/// and on every Kubernetes change), the resolver, the audit log and the metrics. Fronts hand it
/// their requests; it knows nothing of listeners, shutdown or readiness (`runtime`).
pub struct Pipeline {
    state: ArcSwap<State>,
    config_path: PathBuf,
    own: Vec<IpAddr>,
    /// The resolver.
    pub resolver: Resolver,
    /// The audit log.
    pub audit: Audit,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Instance id.
    pub instance: Arc<str>,
    next_conn: AtomicU64,
    kube: ArcSwapOption<KubeInputs>,
    /// Relay headers already accepted (kept across reloads).
    relay_replay: egress_netio::proxy::ReplayGuard,
    /// Client connections open, in total and per client.
    conn_limits: Arc<crate::limits::ConnLimits>,
}

impl Pipeline {
    /// Builds the pipeline from a loaded config.
    pub fn new(loaded: Loaded, metrics: Arc<Metrics>) -> anyhow::Result<Arc<Pipeline>> {
        let instance: Arc<str> = uuid::Uuid::new_v4().simple().to_string()[..12].into();
        let own = own_addresses(&loaded.config.listen);
        for net in &loaded.config.guard.allow_cidrs {
            tracing::warn!(cidr = %net, "guard.allowCidrs exempts this range from the built-in guard");
        }
        let resolver = Resolver::new(&loaded.config.resolver, metrics.dns_family_held.clone())?;
        let (audit, instance) = Audit::start(&loaded.config.audit, instance, metrics.clone())?;
        let config_path = loaded.path.clone();
        let state = State::build(loaded, None, None, &own);
        Ok(Arc::new(Pipeline {
            state: ArcSwap::from_pointee(state),
            config_path,
            own,
            resolver,
            audit,
            metrics,
            instance,
            next_conn: AtomicU64::new(0),
            kube: ArcSwapOption::empty(),
            relay_replay: egress_netio::proxy::ReplayGuard::default(),
            conn_limits: Arc::default(),
        }))
    }

    /// The state in force.
    pub fn state(&self) -> Arc<State> {
        self.state.load_full()
    }

    /// The limits in force (`limits`), for the fronts' timeouts and relays.
    pub fn limits(&self) -> config::Limits {
        self.state.load().loaded.config.limits.clone()
    }

    /// The SOCKS5 users in force (`socks5.users`); empty: no authentication.
    pub fn socks5_users(&self) -> Vec<config::Socks5User> {
        self.state.load().loaded.config.socks5.users.clone()
    }

    /// The transparent front's settings in force (`transparent`).
    pub fn transparent(&self) -> config::TransparentConfig {
        self.state.load().loaded.config.transparent.clone()
    }

    /// Checks a relay's PROXY v2 header: its MAC under a key of `transparent.relayKeyFile`, its
    /// age within `transparent.relayMaxSkew`, and that it was never accepted before.
    pub fn verify_relay(&self, h: &egress_netio::proxy::Header<'_>) -> Result<(), egress_netio::proxy::AuthError> {
        self.state.load().relay_auth.verify(h, std::time::SystemTime::now(), &self.relay_replay)
    }

    /// Whether an egress address pool is configured.
    pub fn pool_exists(&self, pool: &str) -> bool {
        self.state.load().loaded.config.egress_addresses.contains_key(pool)
    }

    /// Drops the rate limiters' per-client states that are back to a full bucket
    /// (indistinguishable from a new client) and updates `egress_rate_limiter_keys` and
    /// `egress_rate_limiter_pruned_total`.
    pub fn prune_rate_limiters(&self) {
        let state = self.state.load();
        let (mut keys, mut pruned) = (0, 0);
        for p in &state.snapshot.policies {
            if let Some((_, limiter)) = &p.rate_limit {
                let before = limiter.len();
                limiter.retain_recent();
                limiter.shrink_to_fit();
                keys += limiter.len();
                pruned += before.saturating_sub(limiter.len());
            }
        }
        self.metrics.rate_limiter_keys.set(keys as i64);
        self.metrics.rate_limiter_pruned.inc_by(pruned as u64);
    }

    /// Recompiles the snapshot with what the Kubernetes API contributes now (called on every
    /// coalesced watch change).
    pub fn apply_kube(&self, inputs: Arc<KubeInputs>) {
        let state = self.state.load();
        self.kube.store(Some(inputs.clone()));
        let next = State::build(state.loaded.clone(), Some(&inputs), Some(&state), &self.own);
        self.state.store(Arc::new(next));
    }

    /// Re-reads the config file and its policies. On any error the previous state stays in force.
    pub fn reload(&self) -> Result<(), config::ConfigErrors> {
        match config::load_with_secrets(&self.config_path) {
            Ok(loaded) => {
                let old = self.state.load();
                let (a, b) = (&old.loaded.config, &loaded.config);
                if a.listen != b.listen || a.resolver != b.resolver || a.audit != b.audit {
                    tracing::warn!("listen, resolver and audit changes take effect at the next restart");
                }
                for net in b.guard.allow_cidrs.iter().filter(|n| !a.guard.allow_cidrs.contains(n)) {
                    tracing::warn!(cidr = %net, "guard.allowCidrs exempts this range from the built-in guard");
                }
                let n = loaded.policies.len();
                let kube = self.kube.load_full();
                let state = State::build(loaded, kube.as_deref(), Some(&old), &self.own);
                self.state.store(Arc::new(state));
                self.metrics.reloads_ok.inc();
                self.metrics.config_stale.set(0);
                tracing::info!(policies = n, "configuration reloaded");
                Ok(())
            }
            Err(e) => {
                self.metrics.reloads_failed.inc();
                self.metrics.config_stale.set(1);
                tracing::error!(errors = %e, "configuration reload failed; the previous configuration stays in force");
                Err(e)
            }
        }
    }

    /// A new client connection record.
    pub fn new_conn(&self, peer: SocketAddr, front: Front) -> Arc<ClientConn> {
        let n = self.next_conn.fetch_add(1, Ordering::Relaxed) + 1;
        self.metrics.connections[front_index(front)].inc();
        Arc::new(ClientConn::new(format!("{}-{n}", self.instance).into(), peer))
    }

    fn client_info(peer: SocketAddr, id: Option<&Identity>) -> ClientInfo {
        ClientInfo {
            address: target::canonical_ip(peer.ip()),
            port: peer.port(),
            namespace: id.map(|i| i.namespace.clone()),
            name: id.map(|i| i.name.clone()),
            service_account: id.and_then(|i| i.service_account.clone()),
            labels: id.map(|i| i.labels.clone()),
        }
    }

    fn event(req: &EgressRequest, client: ClientInfo, target: TargetInfo, decision: DecisionInfo) -> Event {
        Event {
            schema: "egress.v1",
            event: EventKind::Decision,
            id: String::new(),
            seq: 0,
            time: now_rfc3339(),
            instance: Arc::from(""),
            connection_id: req.conn.id.clone(),
            request_id: req.id.clone(),
            front: req.front,
            client,
            target,
            decision,
            resolved: Vec::new(),
            dialled: None,
            egress_source: None,
            egress_pool: None,
            transparent: req.transparent.clone(),
            close: None,
            prev_hash: None,
            hash: None,
        }
    }

    /// Refuses a request the front could not parse (malformed, origin-form, bad SOCKS command...)
    /// and audits it. The connection never reaches policy.
    /// Admits a client connection under `limits.maxConnections` and
    /// `limits.maxConnectionsPerClient`; a refusal is audited (`connection_limit`) and returned
    /// for the front to answer in its protocol. `conn` is the client as decisions see it.
    pub fn admit_connection(&self, conn: &Arc<ClientConn>, front: Front) -> Result<crate::limits::ConnPermit, Refusal> {
        let (max_total, max_client) = {
            let l = &self.state.load().loaded.config.limits;
            (l.max_connections, l.max_connections_per_client)
        };
        self.conn_limits.admit(target::canonical_ip(conn.peer.ip()), max_total, max_client).map_err(|hit| {
            self.refuse_malformed(&EgressRequest::bare(conn, front), Reason::ConnectionLimit, &hit.to_string())
        })
    }

    /// Admits a tunnel of the request's client under `limits.maxTunnelsPerClient`; a refusal is
    /// audited (`connection_limit`) and returned for the front to answer.
    pub fn admit_tunnel(&self, req: &EgressRequest) -> Result<crate::limits::TunnelPermit, Refusal> {
        let max = self.state.load().loaded.config.limits.max_tunnels_per_client;
        self.conn_limits
            .admit_tunnel(target::canonical_ip(req.conn.peer.ip()), max)
            .map_err(|hit| self.refuse_malformed(req, Reason::ConnectionLimit, &hit.to_string()))
    }

    /// One concise line per denial (`log.denials`, target `egress_gateway::denials`): the
    /// protocol answer (a status code, a SOCKS5 reply) is all a client sees, and the audit trail
    /// is not where an operator trying a policy looks first.
    fn log_denial(&self, ev: &Event) {
        if !self.state.load().loaded.config.log.denials {
            return;
        }
        let who = match (&ev.client.namespace, &ev.client.name) {
            (Some(ns), Some(name)) => format!("{ns}/{name}"),
            (Some(ns), None) => ns.clone(),
            _ => "unknown client".to_string(),
        };
        tracing::info!(
            target: "egress_gateway::denials",
            front = ev.front.as_str(),
            client = %ev.client.address,
            who = %who,
            to = %format_args!("{}:{}", ev.target.host, ev.target.port),
            reason = ev.decision.reason.as_str(),
            policy = ev.decision.policy.as_deref().unwrap_or(""),
            request_id = %ev.request_id,
            "denied"
        );
    }

    pub fn refuse_malformed(&self, req: &EgressRequest, reason: Reason, detail: &str) -> Refusal {
        let id = self.state.load().identities.lookup(req.conn.peer.ip());
        let (host, port) = raw_host_port(&req.target);
        let ev = Self::event(
            req,
            Self::client_info(req.conn.peer, id.as_deref()),
            TargetInfo { host, port, http: req.http.clone() },
            DecisionInfo {
                action: Action::Deny,
                reason,
                policy: None,
                rule: None,
                mode: egress_crds::Mode::Enforce,
                guard_exempt: vec![],
                guard_category: None,
                detail: Some(detail.to_string()),
            },
        );
        self.log_denial(&ev);
        self.audit.emit(ev);
        self.metrics.decision(false, reason);
        let kind = match reason {
            Reason::AuthFailed => RefusalKind::Denied,
            Reason::ConnectionLimit => RefusalKind::ConnectionLimit,
            _ => RefusalKind::BadRequest,
        };
        Refusal { kind, reason, request_id: req.id.clone(), detail: detail.to_string() }
    }

    /// Runs identity, normalisation, policy, rate limit, resolution and the guard. A denial is
    /// audited before it is returned.
    pub async fn authorize(self: &Arc<Self>, req: &EgressRequest) -> Result<Permit, Refusal> {
        let state = self.state.load_full();
        let identity = state.identities.lookup(req.conn.peer.ip());
        let client = Self::client_info(req.conn.peer, identity.as_deref());
        let target = match parse_target(&req.target) {
            Ok(t) => t,
            Err(e) => {
                return Err(self.refuse_malformed(req, Reason::InvalidTarget, &e.to_string()));
            }
        };
        let mut decision = state.snapshot.decide(&state.guard, identity.as_deref(), &target, req.http.as_ref());
        if decision.action == Action::Allow
            && let Some(pi) = decision.policy_index
            && let Some((_, limiter)) = &state.snapshot.policies[pi].rate_limit
            && limiter.check_key(&client.address).is_err()
        {
            decision = decision.deny(Reason::RateLimited);
        }
        let checked = resolve_checked(&state, Some(&self.resolver), Some(&self.metrics), decision, &target).await;
        let d = &checked.decision;
        let mut ev = Self::event(
            req,
            client,
            TargetInfo { host: target.host.to_string(), port: target.port, http: req.http.clone() },
            DecisionInfo {
                action: d.action,
                reason: d.reason,
                policy: d.policy.clone(),
                rule: d.rule.clone(),
                mode: d.mode,
                guard_exempt: d.guard_exempt.into_iter().collect(),
                guard_category: d.guard_category,
                detail: checked.detail.clone(),
            },
        );
        if let Some(t) = ev.transparent.as_mut()
            && matches!(target.host, Host::Name(_))
            && !checked.resolved.is_empty()
        {
            t.original_in_resolved = Some(checked.resolved.iter().any(|r| r.address == t.original_dst.ip()));
        }
        ev.resolved = checked.resolved;
        ev.egress_pool = Some(d.egress_address.clone());
        if d.action == Action::Deny {
            self.log_denial(&ev);
            let committed = self.audit.commit(ev).await;
            self.metrics.decision(false, d.reason);
            if committed.is_err() {
                return Err(Refusal::audit_unavailable(req.id.clone()));
            }
            let kind = match d.reason {
                Reason::RateLimited => RefusalKind::RateLimited,
                Reason::DnsFailure => RefusalKind::DnsFailure,
                _ => RefusalKind::Denied,
            };
            let detail = checked.detail.unwrap_or_default();
            return Err(Refusal { kind, reason: d.reason, request_id: req.id.clone(), detail });
        }
        Ok(Permit { gw: self.clone(), pool: d.egress_address.clone(), base: ev, target, addrs: checked.addrs, state })
    }
}

impl Permit {
    /// Whether an existing upstream connection to `dialled` from pool `pool` may carry this request.
    pub fn accepts(&self, dialled: SocketAddr, pool: &str) -> bool {
        dialled.port() == self.target.port && self.addrs.contains(&dialled.ip()) && *self.pool == *pool
    }

    /// Audits the allow (with the dialled address, when there is one) and hands over the close
    /// log, once the event is committed; refuses when it cannot be (`failClosed`).
    async fn allowed(mut self, dialled: Option<SocketAddr>, source: Option<SocketAddr>) -> Result<CloseLog, Refusal> {
        self.base.dialled = dialled;
        self.base.egress_source = source;
        // Crash tests: the process dies right before / right after the commit.
        failpoint!("pipeline::before_commit", |_| std::process::abort());
        if self.gw.audit.commit(self.base.clone()).await.is_err() {
            let mut ev = self.base.clone();
            ev.decision.reason = Reason::AuditUnavailable;
            self.gw.log_denial(&ev);
            self.gw.metrics.decision(false, Reason::AuditUnavailable);
            return Err(Refusal::audit_unavailable(self.base.request_id.clone()));
        }
        failpoint!("pipeline::after_commit", |_| std::process::abort());
        self.gw.metrics.decision(true, self.base.decision.reason);
        Ok(CloseLog { gw: self.gw, base: Some(self.base), started: Instant::now() })
    }

    /// Reuses an upstream connection (plain HTTP keep-alive): audits the allow.
    pub async fn reuse(self, dialled: SocketAddr, source: Option<SocketAddr>) -> Result<CloseLog, Refusal> {
        self.allowed(Some(dialled), source).await
    }

    /// Dials a checked address from the policy's pool and audits the allow. A failed connect is
    /// audited as an allow followed by a `connect_failed` close.
    pub async fn connect(self) -> Result<Upstream, Refusal> {
        let port = self.target.port;
        let dests: Vec<SocketAddr> = self.addrs.iter().map(|ip| SocketAddr::new(*ip, port)).collect();
        let candidates: Vec<(SocketAddr, Option<IpAddr>)> = dial::interleave(&dests)
            .into_iter()
            .filter_map(|d| self.state.pools.source_for(&self.pool, d.ip()).ok().map(|s| (d, s)))
            .collect();
        let request_id = self.base.request_id.clone();
        if candidates.is_empty() {
            let mut ev = self.base;
            ev.decision.action = Action::Deny;
            ev.decision.reason = Reason::EgressAddressUnavailable;
            self.gw.log_denial(&ev);
            let committed = self.gw.audit.commit(ev).await;
            self.gw.metrics.decision(false, Reason::EgressAddressUnavailable);
            if committed.is_err() {
                return Err(Refusal::audit_unavailable(request_id));
            }
            return Err(Refusal {
                kind: RefusalKind::Denied,
                reason: Reason::EgressAddressUnavailable,
                request_id,
                detail: format!("egress address pool {:?} cannot reach this destination", self.pool),
            });
        }
        let timeout = self.state.loaded.config.limits.connect_timeout;
        let started = Instant::now();
        match dial::happy_eyeballs(candidates, timeout).await {
            Ok((stream, dialled)) => {
                self.gw.metrics.connect_seconds.observe(started.elapsed().as_secs_f64());
                let source = stream.local_addr().ok();
                let log = self.allowed(Some(dialled), source).await?;
                Ok(Upstream { stream, dialled, log })
            }
            Err(e) => {
                self.gw.metrics.connect_failures.inc();
                let (kind, reason) = match e {
                    DialError::Refused(_) => (RefusalKind::ConnectRefused, self.base.decision.reason),
                    DialError::Timeout(_) => (RefusalKind::ConnectTimeout, self.base.decision.reason),
                    DialError::Unreachable(_) | DialError::NoSource(_) => {
                        (RefusalKind::Unreachable, self.base.decision.reason)
                    }
                    DialError::LocalResources(_) => (RefusalKind::LocalResources, Reason::LocalResourceLimit),
                };
                let log = self.allowed(None, None).await?;
                log.finish(0, 0, End::ConnectFailed, None, Some(e.to_string()));
                Err(Refusal { kind, reason, request_id, detail: e.to_string() })
            }
        }
    }
}

impl CloseLog {
    /// Emits the close event.
    pub fn finish(mut self, up: u64, down: u64, end: End, http_status: Option<u16>, error: Option<String>) {
        self.emit(up, down, end, http_status, error);
    }

    fn emit(&mut self, up: u64, down: u64, end: End, http_status: Option<u16>, error: Option<String>) {
        if let Some(mut ev) = self.base.take() {
            self.gw.metrics.bytes_up.inc_by(up);
            self.gw.metrics.bytes_down.inc_by(down);
            ev.event = EventKind::Close;
            ev.time = now_rfc3339();
            ev.resolved = Vec::new();
            ev.close = Some(CloseInfo {
                bytes_up: up,
                bytes_down: down,
                duration_ms: self.started.elapsed().as_millis() as u64,
                end,
                http_status,
                error,
            });
            self.gw.audit.emit(ev);
        }
    }
}

impl Drop for CloseLog {
    fn drop(&mut self) {
        // A request abandoned mid-way (client gone, task cancelled) still gets its close event.
        self.emit(0, 0, End::Error, None, Some("abandoned before completion".into()));
    }
}

fn front_index(f: Front) -> usize {
    Front::ALL.iter().position(|x| *x == f).unwrap_or(0)
}

/// Normalises a front's raw target.
pub fn parse_target(raw: &RawTarget) -> Result<Target, TargetError> {
    match raw {
        RawTarget::Authority(a) => target::parse_authority(a),
        RawTarget::HostPort(h, p) => {
            if *p == 0 {
                return Err(TargetError::Port(format!("{h}:0")));
            }
            Ok(Target { host: target::parse_host(h)?, port: *p })
        }
        RawTarget::Addr(sa) => {
            if sa.port() == 0 {
                return Err(TargetError::Port(sa.to_string()));
            }
            Ok(Target { host: Host::Ip(target::canonical_ip(sa.ip())), port: sa.port() })
        }
    }
}

fn raw_host_port(raw: &RawTarget) -> (String, u16) {
    match raw {
        RawTarget::Authority(a) => match a.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().unwrap_or(0)),
            None => (a.clone(), 0),
        },
        RawTarget::HostPort(h, p) => (h.clone(), *p),
        RawTarget::Addr(sa) => (sa.ip().to_string(), sa.port()),
    }
}

/// The gateway's own addresses (every interface, and the listeners'), blocked by the guard.
pub fn own_addresses(listen: &config::Listen) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> =
        if_addrs::get_if_addrs().map(|l| l.into_iter().map(|i| i.ip()).collect()).unwrap_or_default();
    for sa in [listen.http, listen.socks5, listen.admin, listen.transparent].into_iter().flatten() {
        if !sa.ip().is_unspecified() {
            v.push(sa.ip());
        }
    }
    v.sort();
    v.dedup();
    v
}

/// HTTP facts of a request.
pub fn http_facts(method: &str, path: &str) -> HttpFacts {
    HttpFacts { method: method.to_string(), path: path.to_string() }
}
