//! node-redirector: steers the TCP egress of Pods selected by `redirect: Transparent` policies
//! to the egress gateway with nftables, and relays those connections with a PROXY v2 header.

#![forbid(unsafe_code)]

pub mod admin;
pub mod admit;
pub mod cni;
pub mod config;
pub mod conflist;
pub mod dns;
pub mod dnsfwd;
pub mod k8s;
pub mod nft;
pub mod relay;
pub mod routes;
pub mod rules;
