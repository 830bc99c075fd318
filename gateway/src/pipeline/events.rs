//! Stage 7, events: the audit events of a request and the operator's denial line.
//!
//! A decision event is built once per request from the front's facts, the client's identity and
//! the decision; a denial is committed (`failClosed`: refused as `audit_unavailable` if it cannot
//! be) before the client gets its answer, an allow before the first byte goes upstream (dial
//! stage). The close event follows when the front's relay or request ends, exactly once, also
//! when the task is dropped half-way. This stage refuses nothing itself.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use super::identify::{IdentitySource, Who};
use super::{Checked, Pipeline, Refusal, RefusalKind};
use crate::audit::{ClientInfo, CloseInfo, DecisionInfo, End, Event, EventKind, TargetInfo, Timestamp};
use crate::identity::Identity;
use crate::reason::Reason;
use crate::request::EgressRequest;
use crate::target::{self, Host, Target};

/// An upstream connection or request in progress; emits the close event exactly once.
pub(crate) struct CloseLog {
    gw: Arc<Pipeline>,
    base: Option<Box<Event>>,
    started: Instant,
}

impl CloseLog {
    /// Starts timing the connection or request of an allow already committed as `base`.
    pub(super) fn start(gw: Arc<Pipeline>, base: Box<Event>) -> CloseLog {
        CloseLog { gw, base: Some(base), started: Instant::now() }
    }

    /// Emits the close event.
    pub(crate) fn finish(mut self, up: u64, down: u64, end: End, http_status: Option<u16>, error: Option<String>) {
        self.emit(up, down, end, http_status, error);
    }

    fn emit(&mut self, up: u64, down: u64, end: End, http_status: Option<u16>, error: Option<String>) {
        if let Some(mut ev) = self.base.take() {
            self.gw.metrics.bytes_up.inc_by(up);
            self.gw.metrics.bytes_down.inc_by(down);
            ev.event = EventKind::Close;
            ev.time = Timestamp::now();
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

impl Pipeline {
    pub(super) fn client_info(peer: SocketAddr, id: Option<&Arc<Identity>>, source: IdentitySource) -> ClientInfo {
        ClientInfo {
            address: target::canonical_ip(peer.ip()),
            identity_source: source.as_str(),
            identity: id.cloned(),
            port: peer.port(),
            spiffe_id: None,
        }
    }

    /// A request's event, boxed: it is moved from stage to stage and into the audit log's queue
    /// (about 570 bytes).
    pub(super) fn event(
        req: &EgressRequest,
        client: ClientInfo,
        target: TargetInfo,
        decision: DecisionInfo,
    ) -> Box<Event> {
        Box::new(Event {
            schema: "egress.v1",
            event: EventKind::Decision,
            id: uuid::Uuid::nil(),
            seq: 0,
            time: Timestamp::now(),
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
        })
    }

    /// One concise line per denial (`log.denials`, target `egress_gateway::denials`): the
    /// protocol answer (a status code, a SOCKS5 reply) is all a client sees, and the audit trail
    /// is not where an operator trying a policy looks first.
    pub(super) fn log_denial(&self, ev: &Event) {
        if !self.state.load().loaded.config.log.denials {
            return;
        }
        let who = match ev.client.identity.as_deref() {
            Some(i) => format!("{}/{}", i.namespace, i.name),
            None => "unknown client".to_string(),
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

    /// The decision event of a request that went through stages 2 to 4.
    pub(super) fn decision_event(
        &self,
        req: &EgressRequest,
        who: &Who,
        target: &Target,
        checked: &Checked,
    ) -> Box<Event> {
        self.metrics.identified(who.source.index());
        let d = &checked.decision;
        let mut ev = Self::event(
            req,
            ClientInfo {
                spiffe_id: who.spiffe_id.clone(),
                ..Self::client_info(req.conn.peer, who.identity.as_ref(), who.source)
            },
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
        if let Some(t) = ev.transparent.as_mut() {
            if matches!(target.host, Host::Name(_)) && !checked.resolved.is_empty() {
                t.original_in_resolved = Some(checked.resolved.iter().any(|r| r.address == t.original_dst.ip()));
            }
            t.dns_name = checked.dns_name.clone();
        }
        ev.resolved = checked.resolved.clone();
        ev.egress_pool = Some(d.egress_address.clone());
        ev
    }

    /// Commits a denial and turns it into the refusal the front answers with (`failClosed`: an
    /// uncommitted denial is answered `audit_unavailable`). The event is handed to the audit log
    /// at the call; the future only waits for the commit (and holds no event: it is part of
    /// every request's future).
    pub(super) fn deny(&self, ev: Box<Event>, detail: Option<String>) -> impl Future<Output = Refusal> + '_ {
        let (reason, request_id) = (ev.decision.reason, ev.request_id.clone());
        if let Some(p) = &ev.decision.policy {
            self.metrics.policy_decision(p, false, reason);
        }
        self.log_denial(&ev);
        let committed = self.audit.commit(ev);
        async move {
            let committed = committed.await;
            self.metrics.decision(false, reason);
            if committed.is_err() {
                return Refusal::audit_unavailable(request_id);
            }
            let kind = match reason {
                Reason::RateLimited => RefusalKind::RateLimited,
                Reason::DnsFailure => RefusalKind::DnsFailure,
                Reason::IdentityRequired => RefusalKind::AuthRequired,
                _ => RefusalKind::Denied,
            };
            Refusal { kind, reason, request_id, detail: detail.unwrap_or_default() }
        }
    }
}
