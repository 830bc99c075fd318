//! The built-in guard: ranges no policy can open, in two tiers.
//!
//! - Blocked: cloud metadata, loopback, link-local, unspecified, multicast, broadcast, reserved,
//!   the gateway's own addresses, and the IPv6 embeddings (IPv4-mapped/-compatible, NAT64, 6to4,
//!   Teredo) of any of those. Only `guard.allowCidrs` in the gateway config can exempt them.
//! - Internal: private (RFC 1918), CGNAT, benchmarking, ULA, site-local. Reachable only through an
//!   explicit `cidr` rule; a domain rule never opens them, whatever the name resolves to.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use serde::Serialize;

/// Host names that always mean a metadata service.
pub const METADATA_NAMES: &[&str] = &[
    "metadata.google.internal",
    "metadata.goog",
    "metadata",
    "instance-data",
    "instance-data.ec2.internal",
    "metadata.azure.internal",
    "metadata.tencentyun.com",
    "metadata.platformequinix.com",
];

/// The guard's verdict on one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not in any guarded range.
    Pass,
    /// In a blocked range but exempted by `guard.allowCidrs`.
    Exempt(IpNet),
    /// Always blocked (category).
    Blocked(&'static str),
    /// Internal (category): only an explicit cidr rule opens it.
    Internal(&'static str),
}

impl Serialize for Verdict {
    /// `{"verdict": "pass" | "exempt" | "blocked" | "internal", "category": ..., "exempt_by": ...}`
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        match self {
            Verdict::Pass => m.serialize_entry("verdict", "pass")?,
            Verdict::Exempt(n) => {
                m.serialize_entry("verdict", "exempt")?;
                m.serialize_entry("exempt_by", n)?;
            }
            Verdict::Blocked(c) => {
                m.serialize_entry("verdict", "blocked")?;
                m.serialize_entry("category", c)?;
            }
            Verdict::Internal(c) => {
                m.serialize_entry("verdict", "internal")?;
                m.serialize_entry("category", c)?;
            }
        }
        m.end()
    }
}

/// The guard with its configuration.
#[derive(Debug, Clone, Default)]
pub struct Guard {
    allow: Vec<IpNet>,
    own: Vec<IpAddr>,
}

impl Guard {
    /// A guard exempting `allow` and blocking `own` (the gateway's own addresses).
    pub fn new(allow: Vec<IpNet>, own: Vec<IpAddr>) -> Self {
        Guard { allow, own }
    }

    /// The configured exemptions.
    pub fn exemptions(&self) -> &[IpNet] {
        &self.allow
    }

    /// The verdict on one address.
    pub fn check(&self, ip: IpAddr) -> Verdict {
        let ip = crate::target::canonical_ip(ip);
        if let Some(net) = self.allow.iter().find(|n| n.contains(&ip)) {
            return Verdict::Exempt(*net);
        }
        if self.own.contains(&ip) {
            return Verdict::Blocked("gateway_self");
        }
        classify(ip)
    }

    /// Whether a host name is a metadata alias.
    pub fn blocked_name(name: &str) -> bool {
        METADATA_NAMES.contains(&name)
    }
}

/// Classifies an address with no exemptions.
pub fn classify(ip: IpAddr) -> Verdict {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

const METADATA_V4: &[Ipv4Addr] = &[
    Ipv4Addr::new(169, 254, 169, 254), // AWS, GCP, Azure, OCI, DigitalOcean, OpenStack
    Ipv4Addr::new(169, 254, 170, 2),   // AWS ECS task metadata
    Ipv4Addr::new(169, 254, 169, 123), // AWS time sync
    Ipv4Addr::new(169, 254, 169, 253), // AWS DNS
    Ipv4Addr::new(100, 100, 100, 200), // Alibaba Cloud
    Ipv4Addr::new(168, 63, 129, 16),   // Azure wire server
    Ipv4Addr::new(192, 0, 0, 192),     // Oracle Cloud (legacy)
];

fn in4(ip: Ipv4Addr, net: [u8; 4], len: u8) -> bool {
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    u32::from(ip) & mask == u32::from(Ipv4Addr::from(net)) & mask
}

fn classify_v4(ip: Ipv4Addr) -> Verdict {
    if METADATA_V4.contains(&ip) {
        return Verdict::Blocked("metadata");
    }
    let blocked: &[([u8; 4], u8, &str)] = &[
        ([0, 0, 0, 0], 8, "unspecified"),
        ([127, 0, 0, 0], 8, "loopback"),
        ([169, 254, 0, 0], 16, "link_local"),
        ([224, 0, 0, 0], 4, "multicast"),
        ([255, 255, 255, 255], 32, "broadcast"),
        ([240, 0, 0, 0], 4, "reserved"),
        ([192, 0, 0, 0], 24, "reserved"),
    ];
    if let Some((_, _, c)) = blocked.iter().find(|(n, l, _)| in4(ip, *n, *l)) {
        return Verdict::Blocked(c);
    }
    let internal: &[([u8; 4], u8, &str)] = &[
        ([10, 0, 0, 0], 8, "private"),
        ([172, 16, 0, 0], 12, "private"),
        ([192, 168, 0, 0], 16, "private"),
        ([100, 64, 0, 0], 10, "cgnat"),
        ([198, 18, 0, 0], 15, "benchmarking"),
    ];
    if let Some((_, _, c)) = internal.iter().find(|(n, l, _)| in4(ip, *n, *l)) {
        return Verdict::Internal(c);
    }
    Verdict::Pass
}

fn in6(ip: Ipv6Addr, net: Ipv6Addr, len: u8) -> bool {
    let mask = if len == 0 { 0 } else { u128::MAX << (128 - len) };
    u128::from(ip) & mask == u128::from(net) & mask
}

/// The IPv4 address embedded in an IPv6 address by a translation or tunnelling scheme.
pub fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let bits = u128::from(ip);
    let low32 = Ipv4Addr::from(bits as u32);
    let seg = ip.segments();
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4); // ::ffff:0:0/96
    }
    if seg[..6] == [0, 0, 0, 0, 0xffff, 0] {
        return Some(low32); // ::ffff:0:0:0/96, IPv4-translated
    }
    if seg[..6] == [0; 6] && bits > 1 {
        return Some(low32); // ::a.b.c.d, IPv4-compatible (deprecated)
    }
    if in6(ip, Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0), 96)
        || in6(ip, Ipv6Addr::new(0x64, 0xff9b, 1, 0, 0, 0, 0, 0), 48)
    {
        return Some(low32); // NAT64 well-known and local-use prefixes
    }
    if seg[0] == 0x2002 {
        return Some(Ipv4Addr::from(((seg[1] as u32) << 16) | seg[2] as u32)); // 6to4
    }
    if seg[0] == 0x2001 && seg[1] == 0 {
        return Some(Ipv4Addr::from(!(bits as u32))); // Teredo client address
    }
    None
}

fn classify_v6(ip: Ipv6Addr) -> Verdict {
    if ip == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) {
        return Verdict::Blocked("metadata");
    }
    if ip.is_unspecified() {
        return Verdict::Blocked("unspecified");
    }
    if ip.is_loopback() {
        return Verdict::Blocked("loopback");
    }
    if let Some(v4) = embedded_v4(ip) {
        // The embedding is judged by what it carries, and never passes as a plain public address
        // when the carried address is guarded.
        return match classify_v4(v4) {
            Verdict::Pass => Verdict::Pass,
            other => other,
        };
    }
    let blocked: &[(Ipv6Addr, u8, &str)] = &[
        (Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10, "link_local"),
        (Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8, "multicast"),
        (Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 0), 64, "reserved"),
    ];
    if let Some((_, _, c)) = blocked.iter().find(|(n, l, _)| in6(ip, *n, *l)) {
        return Verdict::Blocked(c);
    }
    let internal: &[(Ipv6Addr, u8, &str)] = &[
        (Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7, "ula"),
        (Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 0), 10, "site_local"),
    ];
    if let Some((_, _, c)) = internal.iter().find(|(n, l, _)| in6(ip, *n, *l)) {
        return Verdict::Internal(c);
    }
    Verdict::Pass
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Verdict {
        classify(s.parse().unwrap())
    }

    #[test]
    fn blocked_tier() {
        for (s, c) in [
            ("169.254.169.254", "metadata"),
            ("169.254.170.2", "metadata"),
            ("100.100.100.200", "metadata"),
            ("168.63.129.16", "metadata"),
            ("fd00:ec2::254", "metadata"),
            ("127.0.0.1", "loopback"),
            ("127.255.255.254", "loopback"),
            ("::1", "loopback"),
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "unspecified"),
            ("::", "unspecified"),
            ("169.254.1.1", "link_local"),
            ("fe80::1", "link_local"),
            ("224.0.0.1", "multicast"),
            ("ff02::1", "multicast"),
            ("255.255.255.255", "broadcast"),
            ("::ffff:169.254.169.254", "metadata"),
            ("::ffff:127.0.0.1", "loopback"),
            ("64:ff9b::a9fe:a9fe", "metadata"),
            ("64:ff9b:1::7f00:1", "loopback"),
            ("2002:a9fe:a9fe::", "metadata"),
            ("2002:7f00:1::1", "loopback"),
            ("2001:0:1:2:3:4:5601:5601", "metadata"), // Teredo, client = !0x5601_5601
            ("::127.0.0.1", "loopback"),
        ] {
            assert_eq!(v(s), Verdict::Blocked(c), "{s}");
        }
    }

    #[test]
    fn internal_tier() {
        for (s, c) in [
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("100.64.0.1", "cgnat"),
            ("fd12::1", "ula"),
            ("::ffff:10.0.0.1", "private"),
            ("64:ff9b::a00:1", "private"),
            ("2002:c0a8:101::", "private"),
        ] {
            assert_eq!(v(s), Verdict::Internal(c), "{s}");
        }
    }

    #[test]
    fn public_passes() {
        for s in ["93.184.216.34", "172.32.0.1", "2606:4700::1111", "64:ff9b::808:808", "100.128.0.1"] {
            assert_eq!(v(s), Verdict::Pass, "{s}");
        }
    }

    #[test]
    fn allow_cidrs_exempt_and_own_addresses_block() {
        let g = Guard::new(vec!["127.0.0.2/32".parse().unwrap()], vec!["203.0.113.9".parse().unwrap()]);
        assert_eq!(g.check("127.0.0.2".parse().unwrap()), Verdict::Exempt("127.0.0.2/32".parse().unwrap()));
        assert_eq!(g.check("127.0.0.1".parse().unwrap()), Verdict::Blocked("loopback"));
        assert_eq!(g.check("203.0.113.9".parse().unwrap()), Verdict::Blocked("gateway_self"));
        assert_eq!(g.check("::ffff:127.0.0.2".parse().unwrap()), Verdict::Exempt("127.0.0.2/32".parse().unwrap()));
    }
}
