//! Target normalisation: host names to their canonical form, IP literals in every spelling a
//! client library accepts (dotted, decimal, hex, octal, short forms, IPv4-mapped IPv6) to the IP
//! they mean. Ambiguous or invalid hosts are rejected, never guessed.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use egress_crds::domain::{self, last_label_is_numeric};

/// A normalised host.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// A canonical ASCII host name (lower case, punycode, no trailing dot).
    Name(String),
    /// An IP address. IPv4-mapped IPv6 addresses are stored as the IPv4 address they mean.
    Ip(IpAddr),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::Ip(IpAddr::V6(a)) => write!(f, "[{a}]"),
            Host::Ip(IpAddr::V4(a)) => f.write_str(Ipv4Text::new(*a).as_str()),
        }
    }
}

/// An IPv4 address in dotted decimal, exactly as `Ipv4Addr`'s `Display` writes it, made octet by
/// octet on the stack: `Display` goes through the formatter's padding machinery, and every
/// request's events and target carry two or three addresses.
pub(crate) struct Ipv4Text {
    buf: [u8; 15],
    len: usize,
}

impl Ipv4Text {
    /// The text of `a`.
    pub(crate) fn new(a: Ipv4Addr) -> Ipv4Text {
        let mut t = Ipv4Text { buf: [0; 15], len: 0 };
        for (i, o) in a.octets().into_iter().enumerate() {
            if i > 0 {
                t.buf[t.len] = b'.';
                t.len += 1;
            }
            let mut digits = itoa::Buffer::new();
            let d = digits.format(o).as_bytes();
            t.buf[t.len..t.len + d.len()].copy_from_slice(d);
            t.len += d.len();
        }
        t
    }

    /// The text.
    pub(crate) fn as_str(&self) -> &str {
        // Digits and dots only.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default()
    }
}

/// A normalised host and port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    /// Where to.
    pub host: Host,
    /// TCP port, never 0.
    pub port: u16,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// Why a target was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// The host is neither a valid name nor a valid IP literal.
    #[error("invalid host {0:?}: {1}")]
    Host(String, String),
    /// Port missing, zero or not a number.
    #[error("invalid port in {0:?}")]
    Port(String),
}

/// Canonicalises an IP address: IPv4-mapped IPv6 becomes IPv4.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// Normalises a host as found in a URL authority, a CONNECT target or a SOCKS domain.
/// IPv6 literals may come with or without brackets.
pub fn parse_host(raw: &str) -> Result<Host, TargetError> {
    let err = |m: &str| TargetError::Host(raw.to_string(), m.to_string());
    if raw.is_empty() {
        return Err(err("empty"));
    }
    let inner = raw.strip_prefix('[').and_then(|r| r.strip_suffix(']'));
    if inner.is_some() || raw.contains(':') {
        let text = inner.unwrap_or(raw);
        if text.contains('%') {
            return Err(err("IPv6 zone identifiers are not allowed"));
        }
        return text
            .parse::<Ipv6Addr>()
            .map(|a| Host::Ip(canonical_ip(IpAddr::V6(a))))
            .map_err(|_| err("not a valid IPv6 address"));
    }
    let no_dot = raw.strip_suffix('.').unwrap_or(raw);
    let last = no_dot.rsplit('.').next().unwrap_or("");
    if last_label_is_numeric(last) {
        return parse_ipv4_whatwg(no_dot)
            .map(|a| Host::Ip(IpAddr::V4(a)))
            .ok_or_else(|| err("numeric host that is not a valid IPv4 address"));
    }
    match domain::normalize_name(raw) {
        Ok(n) => Ok(Host::Name(n)),
        Err(domain::DomainError::NumericTld) => Err(err("numeric host that is not a valid IPv4 address")),
        Err(e) => Err(err(&e.to_string())),
    }
}

/// Parses `host:port` (`[v6]:port` for IPv6), as in a CONNECT request line or `check` target.
pub fn parse_authority(raw: &str) -> Result<Target, TargetError> {
    let (host, port) = raw.rsplit_once(':').ok_or_else(|| TargetError::Port(raw.to_string()))?;
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return Err(TargetError::Host(raw.to_string(), "IPv6 literals need brackets".into()));
    }
    let port = parse_port(port).ok_or_else(|| TargetError::Port(raw.to_string()))?;
    Ok(Target { host: parse_host(host)?, port })
}

/// A decimal port 1..65535, no sign, no leading `+`.
pub fn parse_port(s: &str) -> Option<u16> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u16>().ok().filter(|p| *p != 0)
}

/// The WHATWG URL IPv4 parser (what browsers, curl and most libraries accept): 1-4 parts, each
/// decimal, `0x` hex or leading-zero octal; the last part fills the remaining bytes.
pub fn parse_ipv4_whatwg(s: &str) -> Option<Ipv4Addr> {
    // At most four parts, on the stack: every IP-literal target comes through here.
    let mut parts = [0u64; 4];
    let mut len = 0;
    for p in s.split('.') {
        *parts.get_mut(len)? = parse_ipv4_part(p)?;
        len += 1;
    }
    let nums = &parts[..len];
    let (last, init) = nums.split_last()?;
    if init.iter().any(|n| *n > 255) {
        return None;
    }
    let bits_left = 8 * (5 - nums.len() as u32);
    if bits_left < 64 && *last >= (1u64 << bits_left) {
        return None;
    }
    let mut value = *last;
    for (i, n) in init.iter().enumerate() {
        value += n << (8 * (3 - i as u32));
    }
    u32::try_from(value).ok().map(Ipv4Addr::from)
}

fn parse_ipv4_part(p: &str) -> Option<u64> {
    if p.is_empty() {
        return None;
    }
    let (digits, radix) = if let Some(h) = p.strip_prefix("0x").or_else(|| p.strip_prefix("0X")) {
        (h, 16)
    } else if p.len() > 1 && p.starts_with('0') {
        (&p[1..], 8)
    } else {
        (p, 10)
    };
    if digits.is_empty() {
        // "0x" alone is 0 in WHATWG.
        return (radix == 16).then_some(0);
    }
    if digits.len() > 20 {
        return None;
    }
    u64::from_str_radix(digits, radix).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_text_is_what_display_writes() {
        for a in [[0, 0, 0, 0], [255, 255, 255, 255], [10, 0, 100, 9], [127, 0, 0, 1], [1, 22, 203, 90]] {
            let a = Ipv4Addr::from(a);
            assert_eq!(Ipv4Text::new(a).as_str(), a.to_string());
            assert_eq!(Host::Ip(IpAddr::V4(a)).to_string(), a.to_string());
        }
    }

    fn ip(s: &str) -> Host {
        Host::Ip(s.parse().unwrap())
    }

    #[test]
    fn every_ipv4_spelling_means_the_same_address() {
        for s in [
            "169.254.169.254",
            "2852039166",
            "0xA9FEA9FE",
            "0xa9fea9fe",
            "0251.0376.0251.0376",
            "169.254.43518",
            "169.16689662",
            "0xa9.0xfe.0xa9.0xfe",
            "169.254.169.254.",
            "[::ffff:169.254.169.254]",
            "[::ffff:a9fe:a9fe]",
        ] {
            assert_eq!(parse_host(s).unwrap(), ip("169.254.169.254"), "{s}");
        }
        assert_eq!(parse_host("0").unwrap(), ip("0.0.0.0"));
        assert_eq!(parse_host("127.1").unwrap(), ip("127.0.0.1"));
        assert_eq!(parse_host("0x7f.1").unwrap(), ip("127.0.0.1"));
    }

    #[test]
    fn ambiguous_numeric_hosts_are_rejected() {
        for s in ["256.0.0.1", "1.2.3.4.5", "4294967296", "1.2.3.09", "1..2", "a.b.0x", "1.2.3.4.."] {
            assert!(parse_host(s).is_err(), "{s} should be rejected");
        }
    }

    #[test]
    fn names_are_canonical() {
        assert_eq!(parse_host("API.Stripe.COM.").unwrap(), Host::Name("api.stripe.com".into()));
        assert_eq!(parse_host("bücher.example").unwrap(), Host::Name("xn--bcher-kva.example".into()));
        assert!(parse_host("a%2eb.com").is_err());
        assert!(parse_host("").is_err());
        assert!(parse_host("[fe80::1%eth0]").is_err());
    }

    #[test]
    fn authorities() {
        assert_eq!(parse_authority("[2001:db8::1]:443").unwrap(), Target { host: ip("2001:db8::1"), port: 443 });
        assert_eq!(parse_authority("Example.COM:80").unwrap().to_string(), "example.com:80");
        assert!(parse_authority("example.com").is_err());
        assert!(parse_authority("example.com:0").is_err());
        assert!(parse_authority("example.com:+80").is_err());
        assert!(parse_authority("example.com:65536").is_err());
        assert!(parse_authority("2001:db8::1:443").is_err());
    }

    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::fuzz_cases(5000)))]

        /// Hostile hosts and authorities: never a panic; whatever is accepted is canonical (its
        /// own normal form) and a name is never a numeric host in disguise.
        #[test]
        fn never_panics_and_accepts_only_canonical_hosts(raw in "\\PC{0,80}") {
            if let Ok(h) = parse_host(&raw) {
                let again = parse_host(h.to_string().trim_start_matches('[').trim_end_matches(']'));
                prop_assert_eq!(again.as_ref().ok(), Some(&h));
                if let Host::Name(n) = &h {
                    prop_assert!(parse_ipv4_whatwg(n.trim_end_matches('.')).is_none(), "{}", n);
                }
            }
            let _ = parse_authority(&raw);
        }

        /// Every spelling of an IPv4 address (decimal, hex, octal parts; 1 to 4 parts) is the
        /// same address, as the WHATWG parser, curl and browsers read it.
        #[test]
        fn every_spelling_of_an_ipv4_address_is_that_address(a in any::<u32>(), parts in 1usize..=4, base in 0u8..3) {
            let bytes = a.to_be_bytes();
            let fmt = |v: u64| match base { 0 => v.to_string(), 1 => format!("0x{v:x}"), _ => format!("0{v:o}") };
            let lead: Vec<String> = bytes[..parts - 1].iter().map(|b| fmt(u64::from(*b))).collect();
            let rest = bytes[parts - 1..].iter().fold(0u64, |acc, b| acc << 8 | u64::from(*b));
            let spelled = lead.into_iter().chain(std::iter::once(fmt(rest))).collect::<Vec<_>>().join(".");
            prop_assert_eq!(parse_host(&spelled).ok(), Some(Host::Ip(IpAddr::V4(Ipv4Addr::from(a)))), "{}", spelled);
        }
    }
}
