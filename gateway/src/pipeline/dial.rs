//! Stage 6, dial: runs once a request is allowed and its addresses checked.
//!
//! The front either dials (`Permit::connect`: every checked address, IPv6 and IPv4 interleaved,
//! from the policy's egress address pool) or reuses a pooled upstream connection that the permit
//! accepts (`Permit::reuse`: same port, a checked address, the same pool). The allow is
//! committed to the audit log before the first byte goes upstream; with `failClosed` a commit
//! that fails refuses the request (`audit_unavailable`). It refuses when the pool has no source
//! address for any checked address (`egress_address_unavailable`); a connect that fails is
//! audited as an allow followed by a `connect_failed` close, and answered 502/504 (503 with
//! `local_resource_limit` when the gateway itself ran out of descriptors or ports).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use super::{CloseLog, Pipeline, Refusal, RefusalKind, State};
use crate::audit::{End, Event};
use crate::dial::{self, DialError};
use crate::policy::Action;
use crate::reason::Reason;
use crate::target::Target;

/// An allowed, checked request, ready to dial or reuse.
pub(crate) struct Permit {
    gw: Arc<Pipeline>,
    base: Box<Event>,
    /// The normalised target.
    pub target: Target,
    /// Addresses that may be dialled.
    pub addrs: Vec<IpAddr>,
    /// Pool name.
    pub pool: Arc<str>,
    state: Arc<State>,
}

/// A dialled upstream.
pub(crate) struct Upstream {
    /// The TCP stream.
    pub stream: tokio::net::TcpStream,
    /// The address dialled.
    pub dialled: SocketAddr,
    /// The local (egress source) address it was dialled from, as audited.
    pub source: Option<SocketAddr>,
    /// Close-event handle.
    pub log: CloseLog,
}

impl Permit {
    pub(super) fn new(
        gw: Arc<Pipeline>,
        base: Box<Event>,
        target: Target,
        addrs: Vec<IpAddr>,
        pool: Arc<str>,
        state: Arc<State>,
    ) -> Permit {
        Permit { gw, base, target, addrs, pool, state }
    }

    /// Whether an existing upstream connection to `dialled` from pool `pool` may carry this request.
    pub(crate) fn accepts(&self, dialled: SocketAddr, pool: &str) -> bool {
        dialled.port() == self.target.port && self.addrs.contains(&dialled.ip()) && *self.pool == *pool
    }

    /// Audits the allow (with the dialled address, when there is one) and hands over the close
    /// log, once the event is committed; refuses when it cannot be (`failClosed`). The event is
    /// handed to the audit log at the call; the future holds the permit once, and the commit.
    fn allowed(
        mut self,
        dialled: Option<SocketAddr>,
        source: Option<SocketAddr>,
    ) -> impl Future<Output = Result<CloseLog, Refusal>> {
        self.base.dialled = dialled;
        self.base.egress_source = source;
        // Crash tests: the process dies right before / right after the commit.
        failpoint!("pipeline::before_commit", |_| std::process::abort());
        let committed = self.gw.audit.commit(self.base.clone());
        async move {
            if committed.await.is_err() {
                let mut ev = self.base;
                ev.decision.reason = Reason::AuditUnavailable;
                self.gw.log_denial(&ev);
                self.gw.metrics.decision(false, Reason::AuditUnavailable);
                return Err(Refusal::audit_unavailable(ev.request_id));
            }
            failpoint!("pipeline::after_commit", |_| std::process::abort());
            self.gw.metrics.decision(true, self.base.decision.reason);
            if let Some(p) = &self.base.decision.policy {
                self.gw.metrics.policy_decision(p, true, self.base.decision.reason);
            }
            Ok(CloseLog::start(self.gw, self.base))
        }
    }

    /// Reuses an upstream connection (plain HTTP keep-alive): audits the allow.
    pub(crate) fn reuse(
        self,
        dialled: SocketAddr,
        source: Option<SocketAddr>,
    ) -> impl Future<Output = Result<CloseLog, Refusal>> {
        self.allowed(Some(dialled), source)
    }

    /// Dials a checked address from the policy's pool and audits the allow. A failed connect is
    /// audited as an allow followed by a `connect_failed` close.
    pub(crate) async fn connect(self) -> Result<Upstream, Refusal> {
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
                Ok(Upstream { stream, dialled, source, log })
            }
            Err(e) => {
                self.gw.metrics.connect_failures.inc();
                let (kind, reason) = match e {
                    DialError::Refused(_) => (RefusalKind::ConnectRefused, self.base.decision.reason),
                    DialError::Timeout(_) => (RefusalKind::ConnectTimeout, self.base.decision.reason),
                    DialError::Unreachable(_) => (RefusalKind::Unreachable, self.base.decision.reason),
                    DialError::LocalResources(_) => (RefusalKind::LocalResources, Reason::LocalResourceLimit),
                };
                let log = self.allowed(None, None).await?;
                log.finish(0, 0, End::ConnectFailed, None, Some(e.to_string()));
                Err(Refusal { kind, reason, request_id, detail: e.to_string() })
            }
        }
    }
}
