//! Stage 1, admit: runs when a front has a client and, for tunnels, a request, before any
//! policy.
//!
//! A connection is admitted under `limits.maxConnections` and `limits.maxConnectionsPerClient`,
//! a tunnel under `limits.maxTunnelsPerClient` (refused: `connection_limit`, HTTP 503, SOCKS5
//! 0x01, a reset on the transparent front). A request the front could not parse (malformed,
//! origin-form, an unsupported SOCKS5 command, failed authentication, an untrusted relay, a
//! header timeout) is refused here too, with its reason: it never reaches policy, but it is
//! audited like every other decision.

use std::sync::Arc;

use super::normalise::raw_host_port;
use super::{Pipeline, Refusal, RefusalKind};
use crate::audit::{DecisionInfo, TargetInfo};
use crate::policy::Action;
use crate::reason::Reason;
use crate::request::{ClientConn, EgressRequest, Front};
use crate::target;

impl Pipeline {
    /// Admits a client connection under `limits.maxConnections` and
    /// `limits.maxConnectionsPerClient`; a refusal is audited (`connection_limit`) and returned
    /// for the front to answer in its protocol. `conn` is the client as decisions see it.
    pub(crate) fn admit_connection(
        &self,
        conn: &Arc<ClientConn>,
        front: Front,
    ) -> Result<crate::limits::ConnPermit, Refusal> {
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
    pub(crate) fn admit_tunnel(&self, req: &EgressRequest) -> Result<OpenTunnel, Refusal> {
        let max = self.state.load().loaded.config.limits.max_tunnels_per_client;
        let permit = self
            .conn_limits
            .admit_tunnel(target::canonical_ip(req.conn.peer.ip()), max)
            .map_err(|hit| self.refuse_malformed(req, Reason::ConnectionLimit, &hit.to_string()))?;
        self.metrics.open_tunnels.inc();
        Ok(OpenTunnel { _permit: permit, gauge: self.metrics.open_tunnels.clone() })
    }

    /// Refuses a request the front could not parse (malformed, origin-form, bad SOCKS command...)
    /// and audits it. The connection never reaches policy.
    pub(crate) fn refuse_malformed(&self, req: &EgressRequest, reason: Reason, detail: &str) -> Refusal {
        let id = self.state.load().identities.lookup(req.conn.peer.ip());
        let (host, port) = raw_host_port(&req.target);
        let mut client = Self::client_info(req.conn.peer, id.as_ref(), super::identify::IdentitySource::Address);
        // A refused certificate's SPIFFE ID is part of the record (a token never is).
        if let Some(crate::request::Credential::Certificate(c)) = &req.credential {
            client.spiffe_id = c.spiffe.as_ref().map(|s| s.id.as_str().into());
        }
        let ev = Self::event(
            req,
            client,
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
            Reason::TokenInvalid => RefusalKind::AuthRequired,
            Reason::IdentityMismatch => RefusalKind::Denied,
            _ => RefusalKind::BadRequest,
        };
        Refusal { kind, reason, request_id: req.id.clone(), detail: detail.to_string() }
    }
}

/// An admitted tunnel: its slot under `limits.maxTunnelsPerClient`, counted in
/// `egress_open_tunnels` until it is dropped.
pub(crate) struct OpenTunnel {
    _permit: crate::limits::TunnelPermit,
    gauge: prometheus_client::metrics::gauge::Gauge,
}

impl Drop for OpenTunnel {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}
