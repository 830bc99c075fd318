//! egress-gateway: an explicit HTTP/CONNECT and SOCKS5 egress proxy with domain-aware policy,
//! a built-in guard for metadata and internal ranges, checked DNS, fixed egress source
//! addresses and an audit event for every decision.
//!
//! Data path: `front` (one per protocol, parse and answer only) -> `request::EgressRequest` ->
//! `pipeline` (identity, normalisation, policy, rate limit, resolution, guard, dial) -> `relay`,
//! with `audit` events along the way.

#![forbid(unsafe_code)]
// Visibility says what is API: `pub` only where the binary, the benches or the tests use it.
#![warn(unreachable_pub)]

/// A fault-injection point for the crash tests (`fail` crate, configured by the `FAILPOINTS`
/// environment variable). Without the `failpoints` feature, which release builds never have, it
/// expands to nothing.
#[cfg(feature = "failpoints")]
macro_rules! failpoint {
    ($name:expr) => {
        fail::fail_point!($name)
    };
    ($name:expr, $f:expr) => {
        fail::fail_point!($name, $f)
    };
}
#[cfg(not(feature = "failpoints"))]
macro_rules! failpoint {
    ($name:expr) => {};
    ($name:expr, $f:expr) => {};
}

/// Property-test cases: `n`, times `EGRESS_FUZZ_SCALE` (scripts/fuzz.sh runs a longer budget
/// than the test command).
#[cfg(test)]
pub(crate) fn fuzz_cases(n: u32) -> u32 {
    n * std::env::var("EGRESS_FUZZ_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1)
}

pub(crate) mod admin;
pub mod audit;
pub(crate) mod certs;
pub mod check;
pub mod config;
pub(crate) mod dial;
pub(crate) mod front;
pub mod guard;
pub mod identity;
pub(crate) mod inputs;
pub(crate) mod k8s;
pub(crate) mod limits;
pub(crate) mod metrics;
pub(crate) mod pipeline;
pub mod policy;
pub mod reason;
pub(crate) mod relay;
pub mod report;
pub(crate) mod request;
pub(crate) mod resolve;
pub(crate) mod runtime;
pub mod server;
pub mod suggest;
pub mod target;
pub mod token;
