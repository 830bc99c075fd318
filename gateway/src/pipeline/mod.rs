//! The one decision pipeline every front hands its `EgressRequest` to. Its stages, in order,
//! each in its own file with what it may refuse and why:
//!
//! 1. [`admit`]: connection and tunnel limits, and requests the front could not parse;
//! 2. [`normalise`]: the raw target into one canonical `Target`;
//! 3. [`identify`]: who the client is: its address, or a verified ServiceAccount token;
//! 4. [`decide`]: the built-in guard on IP literals, policy, then the rate limit; for a
//!    transparent connection whose payload names nothing, [`names`]: the DNS names the Pod
//!    resolved to its address;
//! 5. [`resolve`]: the gateway's own resolution, the guard and cluster Deny rules on every address;
//! 6. [`dial`]: from the policy's egress address pool, or reuse of a pooled upstream;
//! 7. [`events`]: the decision event (committed before the client gets an answer and before the
//!    first byte goes upstream) and the close event once the front's relay ends.
//!
//! Every refusal is a [`Refusal`], already audited, which the front turns into its protocol's
//! answer. The state a request is decided on is loaded once ([`state`]) and used to the end.
//! The pipeline knows nothing of listeners, shutdown or readiness (`runtime`), nor of the
//! Kubernetes API (it is handed `inputs::KubeInputs`).

mod admit;
mod decide;
mod dial;
mod events;
mod identify;
mod names;
mod normalise;
mod refusal;
mod resolve;
mod state;

pub(crate) use dial::Permit;
pub(crate) use events::CloseLog;
pub(crate) use normalise::{http_facts, parse_target};
pub(crate) use refusal::{Refusal, RefusalKind};
pub(crate) use resolve::{Checked, resolve_checked};
pub(crate) use state::{State, own_addresses};

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::{ArcSwap, ArcSwapOption};

use crate::audit::Audit;
use crate::config::{self, Loaded};
use crate::inputs::KubeInputs;
use crate::metrics::Metrics;
use crate::policy::Action;
use crate::request::{ClientConn, EgressRequest, Front};
use crate::resolve::Resolver;

/// Verified ServiceAccount tokens kept (a few hundred bytes each).
const TOKEN_CACHE: usize = 100_000;

/// The decision pipeline of a running gateway: the state in force (swapped whole on reload
/// and on every Kubernetes change), the resolver, the audit log and the metrics. Fronts hand it
/// their requests; it knows nothing of listeners, shutdown or readiness (`runtime`).
pub(crate) struct Pipeline {
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
    /// ServiceAccount tokens verified before (`identity.tokens`).
    token_cache: crate::token::Cache,
    /// The token issuer's keys from the API server (Kubernetes mode without `jwksFile`).
    api_keys: Option<Arc<crate::token::ApiKeys>>,
}

impl Pipeline {
    /// Builds the pipeline from a loaded config; `api_keys`: the token issuer's keys as the
    /// Kubernetes watch fetches them (when `jwksFile` is not set).
    pub(crate) fn new(
        loaded: Loaded,
        metrics: Arc<Metrics>,
        api_keys: Option<Arc<crate::token::ApiKeys>>,
    ) -> anyhow::Result<Arc<Pipeline>> {
        let instance: Arc<str> = uuid::Uuid::new_v4().simple().to_string()[..12].into();
        let own = own_addresses(&loaded.config.listen);
        for net in &loaded.config.guard.allow_cidrs {
            tracing::warn!(cidr = %net, "guard.allowCidrs exempts this range from the built-in guard");
        }
        let resolver = Resolver::new(&loaded.config.resolver, metrics.dns_family_held.clone())?;
        let (audit, instance) = Audit::start(&loaded.config.audit, instance, metrics.clone())?;
        let config_path = loaded.path.clone();
        let state = State::build(loaded, None, None, &own);
        metrics.set_policies(state.snapshot.policies.iter().map(|p| &p.key));
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
            token_cache: crate::token::Cache::new(TOKEN_CACHE),
            api_keys,
        }))
    }

    /// The state in force.
    pub(crate) fn state(&self) -> Arc<State> {
        self.state.load_full()
    }

    /// The limits in force (`limits`), for the fronts' timeouts and relays.
    pub(crate) fn limits(&self) -> config::Limits {
        self.state.load().loaded.config.limits.clone()
    }

    /// The SOCKS5 users in force (`socks5.users`; empty: no authentication), shared with the
    /// state they came with (no copy per connection).
    pub(crate) fn socks5_users(&self) -> Arc<[config::Socks5User]> {
        self.state.load().socks5_users.clone()
    }

    /// Whether `relay` is one of `transparent.trustedRelays` (the only peers whose PROXY
    /// headers the transparent front reads).
    pub(crate) fn trusts_relay(&self, relay: IpAddr) -> bool {
        self.state.load().loaded.config.transparent.trusted_relays.iter().any(|n| n.contains(&relay))
    }

    /// The HTTPS front's TLS configuration in force (`https`; re-read on every reload).
    pub(crate) fn https_config(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.state.load().loaded.https.clone()
    }

    /// `transparent.firstByteTimeout`.
    pub(crate) fn first_byte_timeout(&self) -> std::time::Duration {
        self.state.load().loaded.config.transparent.first_byte_timeout
    }

    /// Checks a relay's PROXY v2 header: its MAC under a key of `transparent.relayKeyFile`, its
    /// age within `transparent.relayMaxSkew`, and that it was never accepted before.
    pub(crate) fn verify_relay(
        &self,
        h: &egress_netio::proxy::Header<'_>,
    ) -> Result<(), egress_netio::proxy::AuthError> {
        self.state.load().relay_auth.verify(h, std::time::SystemTime::now(), &self.relay_replay)
    }

    /// Whether an egress address pool is configured.
    pub(crate) fn pool_exists(&self, pool: &str) -> bool {
        self.state.load().loaded.config.egress_addresses.contains_key(pool)
    }

    /// Drops the rate limiters' per-client states that are back to a full bucket
    /// (indistinguishable from a new client) and updates `egress_rate_limiter_keys` and
    /// `egress_rate_limiter_pruned_total`.
    pub(crate) fn prune_rate_limiters(&self) {
        let state = self.state.load();
        let (mut keys, mut pruned) = (0, 0);
        for p in &state.snapshot.policies {
            if let Some(limiter) = p.rate_limit.as_ref().map(|r| &r.limiter) {
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
    pub(crate) fn apply_kube(&self, inputs: Arc<KubeInputs>) {
        let state = self.state.load();
        self.kube.store(Some(inputs.clone()));
        let next = State::build(state.loaded.clone(), Some(&inputs), Some(&state), &self.own);
        self.metrics.set_policies(next.snapshot.policies.iter().map(|p| &p.key));
        // Set before the state is stored: whoever sees the new state's decisions sees this too.
        self.metrics.kube_policies_invalid.set(inputs.invalid.len() as i64);
        self.state.store(Arc::new(next));
        if let Some(n) = inputs.ready_replicas {
            self.metrics.rate_limit_replicas.set(i64::from(n.max(1)));
        }
    }

    /// Re-reads the config file and its policies. On any error the previous state stays in force.
    pub(crate) fn reload(&self) -> Result<(), config::ConfigErrors> {
        match config::load_with_secrets(&self.config_path) {
            Ok(loaded) => {
                let old = self.state.load();
                let (a, b) = (&old.loaded.config, &loaded.config);
                if a.listen != b.listen || a.resolver != b.resolver || a.audit != b.audit {
                    tracing::warn!("listen, resolver and audit changes take effect at the next restart");
                }
                let from_api = |c: &config::Config| {
                    c.kubernetes.enabled && c.identity.tokens.as_ref().is_some_and(|t| t.jwks_file.is_none())
                };
                if from_api(a) != from_api(b) {
                    tracing::warn!(
                        "where the token keys come from (identity.tokens.jwksFile or the API server) changes at the next restart"
                    );
                }
                for net in b.guard.allow_cidrs.iter().filter(|n| !a.guard.allow_cidrs.contains(n)) {
                    tracing::warn!(cidr = %net, "guard.allowCidrs exempts this range from the built-in guard");
                }
                let n = loaded.policies.len();
                let kube = self.kube.load_full();
                let state = State::build(loaded, kube.as_deref(), Some(&old), &self.own);
                self.metrics.set_policies(state.snapshot.policies.iter().map(|p| &p.key));
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
    pub(crate) fn new_conn(&self, peer: SocketAddr, front: Front) -> Arc<ClientConn> {
        let n = self.next_conn.fetch_add(1, Ordering::Relaxed) + 1;
        self.metrics.connections[front_index(front)].inc();
        Arc::new(ClientConn::new(format!("{}-{n}", self.instance).into(), peer))
    }

    /// Runs a request through stages 2 to 5 (normalise, identify, decide and rate-limit,
    /// resolve and check) on one snapshot of the state. A denial is audited before it is returned; an allow
    /// is a [`Permit`] for stage 5, audited when it is used.
    pub(crate) async fn authorize(self: &Arc<Self>, req: &EgressRequest) -> Result<Permit, Refusal> {
        self.authorize_as(req, Charge::Token).await
    }

    /// [`Self::authorize`] for a request sent once more on a new connection after an upstream
    /// closed the kept one under it (the HTTP front's keep-alive race): decided again on the
    /// state in force now, without taking a second token from its rate limit, since the client
    /// asked once.
    pub(crate) async fn reauthorize(self: &Arc<Self>, req: &EgressRequest) -> Result<Permit, Refusal> {
        self.authorize_as(req, Charge::Paid).await
    }

    async fn authorize_as(self: &Arc<Self>, req: &EgressRequest, charge: Charge) -> Result<Permit, Refusal> {
        let state = self.state.load_full();
        let target = match parse_target(&req.target) {
            Ok(t) => t,
            Err(e) => return Err(self.refuse_malformed(req, crate::reason::Reason::InvalidTarget, &e.to_string())),
        };
        let mut who = self.identify(&state, req);
        if let (Err(e), Some(keys)) = (&who, &self.api_keys)
            && e.unknown_key
        {
            // A key the set lacks: the cluster may have rotated its signing key. Fetch the set
            // again (at most once per interval, whoever asks) and decide on what it holds.
            Box::pin(keys.refetch()).await; // rare: boxed, out of every request's future
            who = self.identify(&state, req);
        }
        let who = match who {
            Ok(who) => who,
            Err(e) => return Err(self.refuse_malformed(req, e.reason, &e.detail)),
        };
        let decision = decide::decide(&state, who.identity.as_deref(), &target, req, charge);
        let (target, checked) =
            match self.decide_by_names(&state, who.identity.as_deref(), req, &target, &decision, charge).await {
                Some(by_name) => by_name,
                None => {
                    let checked =
                        resolve_checked(&state, Some(&self.resolver), Some(&self.metrics), decision, &target).await;
                    (target, checked)
                }
            };
        let ev = self.decision_event(req, &who, &target, &checked);
        if checked.decision.action == Action::Deny {
            return Err(self.deny(ev, checked.detail).await);
        }
        let pool = checked.decision.egress_address.clone();
        Ok(Permit::new(self.clone(), ev, target, checked.addrs, pool, state))
    }
}

/// Whether a decision takes a token from the rate limit of the policy that allows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Charge {
    /// A request of the client's: it counts.
    Token,
    /// The same request once more, already counted.
    Paid,
}

fn front_index(f: Front) -> usize {
    Front::ALL.iter().position(|x| *x == f).unwrap_or(0)
}
