//! Stage 4, decide and rate-limit: runs on every normalised request.
//!
//! The client's identity (stage 3) and the target go to the compiled
//! policy snapshot, which applies the decision order of DESIGN.md: the built-in guard on an IP
//! literal first (metadata and blocked ranges are refused whatever a policy says), then cluster
//! Deny rules, then the policies selecting the client, then the default action. An allow by a
//! policy with a `rateLimit` then takes a token from that policy's bucket for the client's
//! address. It refuses with the guard's reasons (`guard_blocked`, `guard_internal`,
//! `guard_blocked_name`), `cluster_deny`, `no_rule_matched`, `default_deny` and `rate_limited`
//! (HTTP 429). A name is not resolved here: stage 5 checks its addresses.

use super::{Charge, State};
use crate::identity::Identity;
use crate::policy::{Action, Decision};
use crate::reason::Reason;
use crate::request::EgressRequest;
use crate::target::{self, Target};

/// The decision for `target` by the client of `req`, rate limit included (unless `charge` says
/// the request was counted already).
pub(super) fn decide(
    state: &State,
    identity: Option<&Identity>,
    target: &Target,
    req: &EgressRequest,
    charge: Charge,
) -> Decision {
    let decision = state.snapshot.decide(&state.guard, identity, target, req.http.as_ref());
    if decision.action == Action::Allow
        && charge == Charge::Token
        && let Some(pi) = decision.policy_index
        && let Some(rate) = &state.snapshot.policies[pi].rate_limit
        && rate.limiter.check_key(&target::canonical_ip(req.conn.peer.ip())).is_err()
    {
        return decision.deny(Reason::RateLimited);
    }
    decision
}
