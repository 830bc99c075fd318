//! Stage 2, normalise: runs first on every request that reached the pipeline (after admission).
//!
//! A front's raw target (an authority, a host and port, or an address) becomes one `Target`:
//! lower-case names without a trailing dot, IP literals in every spelling the kernel would accept
//! turned into the address they mean (so that `0x7f.1` cannot walk around a guard that checks
//! `127.0.0.1`), IPv4-mapped IPv6 addresses made IPv4, port 0 refused. It refuses what cannot be
//! normalised (`invalid_target`, HTTP 400).

use crate::policy::HttpFacts;
use crate::request::RawTarget;
use crate::target::{self, Host, Target, TargetError};

/// Normalises a front's raw target.
pub(crate) fn parse_target(raw: &RawTarget) -> Result<Target, TargetError> {
    match raw {
        RawTarget::Authority(a) => target::parse_authority(a),
        RawTarget::HostPort(h, p) => {
            if *p == 0 {
                return Err(TargetError::Port(format!("{h}:0")));
            }
            Ok(Target { host: target::parse_host(h)?, port: *p })
        }
        RawTarget::Addr(sa) => {
            if sa.port() == 0 {
                return Err(TargetError::Port(sa.to_string()));
            }
            Ok(Target { host: Host::Ip(target::canonical_ip(sa.ip())), port: sa.port() })
        }
    }
}

pub(super) fn raw_host_port(raw: &RawTarget) -> (String, u16) {
    match raw {
        RawTarget::Authority(a) => match a.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().unwrap_or(0)),
            None => (a.clone(), 0),
        },
        RawTarget::HostPort(h, p) => (h.clone(), *p),
        RawTarget::Addr(sa) => (sa.ip().to_string(), sa.port()),
    }
}

/// HTTP facts of a request.
pub(crate) fn http_facts(method: &str, path: &str) -> HttpFacts {
    HttpFacts { method: method.into(), path: path.into() }
}
