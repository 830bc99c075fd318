//! The ServiceAccount token issuer's keys, from the API server (Kubernetes mode, when
//! `identity.tokens.jwksFile` is not set).
//!
//! The API server publishes them itself: OIDC discovery at `/.well-known/openid-configuration`
//! names the issuer, and `/openid/v1/jwks` holds the keys (RBAC: `get` on these two non-resource
//! URLs; the stock ClusterRole `system:service-account-issuer-discovery` has it, and the chart
//! grants it explicitly). The keys are fetched at start (the gateway is not ready before the
//! first set), every [`REFRESH`], and early when a token names a key the set does not have (the
//! cluster rotated its signing key): such a fetch happens at most once per [`MIN_INTERVAL`],
//! whatever clients send; the requests that asked wait for it when it is due within their
//! wait, and are refused at once otherwise. A fetch that fails keeps the set in force. A set equal to the one in force is not swapped, so verified tokens stay cached.

use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::token::{ApiKeys, KeyAsks, KeySet};

/// A regular fetch this often.
pub(crate) const REFRESH: Duration = Duration::from_secs(300);
/// An early fetch (unknown `kid`) at most this often.
pub(crate) const MIN_INTERVAL: Duration = Duration::from_secs(10);
/// How long a request asking for an early fetch waits for it (`Pipeline`'s wait is the same):
/// one due later is not waited for.
const KEY_WAIT: Duration = crate::token::KEY_WAIT;
/// Requests waiting for one early fetch at most.
const WAITING: usize = 1024;
/// Longest document read.
const MAX_DOCUMENT: usize = 1024 * 1024;

/// Where the API server publishes them.
pub(crate) const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";
/// The key set.
pub(crate) const JWKS_PATH: &str = "/openid/v1/jwks";

async fn get(client: &Client, path: &str) -> Result<String, String> {
    let req = http::Request::get(path).body(Vec::new()).map_err(|e| e.to_string())?;
    let text = tokio::time::timeout(Duration::from_secs(10), client.request_text(req))
        .await
        .map_err(|_| format!("GET {path}: no answer in 10s"))?
        .map_err(|e| format!("GET {path}: {e}"))?;
    if text.len() > MAX_DOCUMENT {
        return Err(format!("GET {path}: larger than {MAX_DOCUMENT} bytes"));
    }
    Ok(text)
}

/// The issuer the API server announces, when discovery answers.
async fn announced_issuer(client: &Client) -> Result<String, String> {
    let doc: serde_json::Value =
        serde_json::from_str(&get(client, DISCOVERY_PATH).await?).map_err(|e| format!("{DISCOVERY_PATH}: {e}"))?;
    doc["issuer"].as_str().map(str::to_string).ok_or_else(|| format!("{DISCOVERY_PATH}: no issuer"))
}

/// Fetches the keys until `draining` fires; see the module documentation.
pub(crate) async fn follow(
    client: Client,
    issuer: String,
    keys: Arc<ApiKeys>,
    mut asks: KeyAsks,
    draining: CancellationToken,
) {
    let mut in_force: Option<String> = None;
    let mut last_fetch: Option<Instant> = None;
    // The last fetch made because a request asked, and the next one due.
    let mut last_early: Option<Instant> = None;
    let mut early_due: Option<Instant> = None;
    let mut waiting = Vec::new();
    let mut warned_issuer: Option<String> = None;
    let mut retry = Duration::from_secs(1);
    loop {
        if in_force.is_some() {
            let periodic = last_fetch.map_or_else(Instant::now, |t| t + REFRESH);
            let next = early_due.map_or(periodic, |e| e.min(periodic));
            tokio::select! {
                _ = draining.cancelled() => return,
                _ = tokio::time::sleep_until(next) => {}
                Some(first) = asks.recv() => {
                    // Asks beyond the bound, or while the next early fetch is further away than a
                    // request waits, are declined at once (dropping the sender answers them).
                    let allowed = last_early.map_or_else(Instant::now, |t| t + MIN_INTERVAL);
                    let mut take = |w| {
                        if allowed <= Instant::now() + KEY_WAIT && waiting.len() < WAITING {
                            waiting.push(w);
                        }
                    };
                    take(first);
                    while let Ok(w) = asks.try_recv() {
                        take(w);
                    }
                    if waiting.is_empty() {
                        continue;
                    }
                    if allowed > Instant::now() {
                        early_due = Some(allowed);
                        continue;
                    }
                }
            }
        }
        let now = Instant::now();
        last_fetch = Some(now);
        if !waiting.is_empty() {
            last_early = Some(now);
        }
        early_due = None;
        match announced_issuer(&client).await {
            Ok(announced) if announced != issuer && warned_issuer.as_deref() != Some(announced.as_str()) => {
                tracing::warn!(announced = %announced, configured = %issuer, "the API server's ServiceAccount token issuer is not identity.tokens.issuer: its tokens will be refused (token_invalid: issuer)");
                warned_issuer = Some(announced);
            }
            Ok(_) => {}
            // Discovery is informative only; the keys are what matter.
            Err(e) => tracing::debug!(error = %e, "OIDC discovery failed"),
        }
        let fetched = get(&client, JWKS_PATH).await.and_then(|text| {
            let set = KeySet::from_jwks(text.as_bytes()).map_err(|e| format!("{JWKS_PATH}: {e}"))?;
            Ok((text, set))
        });
        match fetched {
            Ok((text, set)) => {
                retry = Duration::from_secs(1);
                if in_force.as_deref() != Some(text.as_str()) {
                    tracing::info!(keys = ?set, "ServiceAccount token keys fetched from the API server");
                    keys.set(set);
                    in_force = Some(text);
                }
            }
            Err(e) if in_force.is_some() => {
                tracing::warn!(error = %e, "fetching the ServiceAccount token keys failed; the keys fetched before stay in force");
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?retry, "fetching the ServiceAccount token keys failed; not ready until they are fetched (RBAC: get on {JWKS_PATH})");
                tokio::select! {
                    _ = draining.cancelled() => return,
                    _ = tokio::time::sleep(retry) => {}
                }
                retry = (retry * 2).min(Duration::from_secs(30));
            }
        }
        for w in waiting.drain(..) {
            let _ = w.send(());
        }
    }
}
