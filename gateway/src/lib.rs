//! egress-gateway: an explicit HTTP/CONNECT and SOCKS5 egress proxy with domain-aware policy,
//! a built-in guard for metadata and internal ranges, checked DNS, fixed egress source
//! addresses and an audit event for every decision.
//!
//! Data path: `front` (one per protocol, parse and answer only) -> `request::EgressRequest` ->
//! `pipeline` (identity, normalisation, policy, rate limit, resolution, guard, dial) -> `relay`,
//! with `audit` events along the way.

pub mod admin;
pub mod audit;
pub mod check;
pub mod config;
pub mod dial;
pub mod front;
pub mod guard;
pub mod identity;
pub mod k8s;
pub mod metrics;
pub mod pipeline;
pub mod policy;
pub mod relay;
pub mod request;
pub mod resolve;
pub mod server;
pub mod target;
