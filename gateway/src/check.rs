//! `egress-gateway check`: the policy simulator. Runs the same decision and resolution code as
//! the proxy for one client and target and prints the verdict as JSON.

use std::net::IpAddr;

use serde_json::json;

use crate::config::Loaded;
use crate::pipeline::{State, resolve_checked};
use crate::policy::{Action, HttpFacts};
use crate::resolve::Resolver;
use crate::target::{self, Target};

/// A `check` target: the parsed target and what the gateway would see of HTTP.
pub fn parse_check_target(raw: &str, method: Option<&str>) -> Result<(Target, Option<HttpFacts>), String> {
    if let Some((scheme, _)) = raw.split_once("://") {
        let uri: http::Uri = raw.parse().map_err(|e| format!("{raw:?} is not a URL: {e}"))?;
        let host = uri.host().ok_or_else(|| format!("{raw:?} has no host"))?;
        let host = target::parse_host(host).map_err(|e| e.to_string())?;
        match scheme.to_ascii_lowercase().as_str() {
            "http" => {
                let port = uri.port_u16().unwrap_or(80);
                let facts =
                    HttpFacts { method: method.unwrap_or("GET").to_ascii_uppercase().into(), path: uri.path().into() };
                Ok((Target { host, port }, Some(facts)))
            }
            "https" => Ok((Target { host, port: uri.port_u16().unwrap_or(443) }, None)),
            other => Err(format!("scheme {other:?} is not supported: use http://, https:// or host:port")),
        }
    } else {
        target::parse_authority(raw).map(|t| (t, None)).map_err(|e| e.to_string())
    }
}

/// Runs a check; returns the JSON and whether it was allowed.
pub async fn check(
    loaded: Loaded,
    client: IpAddr,
    verified: bool,
    method: Option<&str>,
    raw_target: &str,
    resolve: bool,
) -> anyhow::Result<(serde_json::Value, bool)> {
    let (target, http) = parse_check_target(raw_target, method).map_err(anyhow::Error::msg)?;
    let resolver = if resolve { Some(Resolver::new(&loaded.config.resolver, Default::default())?) } else { None };
    let own = crate::pipeline::own_addresses(&loaded.config.listen);
    let state = State::build(loaded, None, None, &own);
    let identity = state.identities.lookup(client).map(|id| {
        if verified { std::sync::Arc::new(crate::identity::Identity { verified: true, ..(*id).clone() }) } else { id }
    });
    let decision = state.snapshot.decide(&state.guard, identity.as_deref(), &target, http.as_ref());
    let checked = resolve_checked(&state, resolver.as_ref(), None, decision, &target).await;
    let d = &checked.decision;
    let allowed = d.action == Action::Allow;
    let out = json!({
        "action": d.action,
        "reason_code": d.reason,
        "policy": d.policy,
        "rule": d.rule,
        "mode": d.mode,
        "target": {"host": target.host.to_string(), "port": target.port, "http": http},
        "client": {"address": client, "identity": identity.as_deref(), "verified": verified},
        "guard_exempt": d.guard_exempt,
        "guard_category": d.guard_category,
        "egress_address": d.egress_address,
        "resolved": if resolve { json!(checked.resolved) } else { json!(null) },
        "detail": checked.detail,
    });
    Ok((out, allowed))
}
