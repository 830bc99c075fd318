//! The host-side interface of a Pod address, from the node's host routes: the interface of a
//! `/32` (IPv4) or `/128` (IPv6) route to it, as point-to-point CNIs (Calico, Cilium with
//! per-endpoint routes, kindnet, the AWS VPC CNI) install one per Pod. Nothing else counts: a
//! subnet route (bridge CNIs) or the default route names an interface many hosts share, and
//! anti-spoofing keyed on it would drop traffic that is not the Pod's. Read from
//! `/proc/net/route` and `/proc/net/ipv6_route` of the redirector's network namespace (the
//! node's: it runs with `hostNetwork`).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Host routes: address -> interface.
pub fn host_routes() -> BTreeMap<IpAddr, String> {
    let mut out = BTreeMap::new();
    if let Ok(t) = std::fs::read_to_string("/proc/net/route") {
        out.extend(parse_v4(&t));
    }
    if let Ok(t) = std::fs::read_to_string("/proc/net/ipv6_route") {
        out.extend(parse_v6(&t));
    }
    out
}

/// `/proc/net/route`: `Iface Destination Gateway Flags RefCnt Use Metric Mask ...`, addresses as
/// the kernel's network-order words printed in hex.
fn parse_v4(text: &str) -> Vec<(IpAddr, String)> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let word = |s: &str| u32::from_str_radix(s, 16).ok().map(|w| Ipv4Addr::from(w.to_ne_bytes()));
            let (iface, dest, mask) = (f.first()?, word(f.get(1)?)?, word(f.get(7)?)?);
            (mask == Ipv4Addr::BROADCAST).then(|| (IpAddr::V4(dest), iface.to_string()))
        })
        .collect()
}

/// `/proc/net/ipv6_route`: `dest prefixlen src srclen nexthop metric refcnt use flags iface`.
fn parse_v6(text: &str) -> Vec<(IpAddr, String)> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let dest = u128::from_str_radix(f.first()?, 16).ok()?;
            let len = u8::from_str_radix(f.get(1)?, 16).ok()?;
            let iface = f.get(9)?;
            (len == 128 && *iface != "lo").then(|| (IpAddr::V6(Ipv6Addr::from(dest)), iface.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_host_routes_name_an_interface() {
        let v4 = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                  eth0\t00000000\t0100000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                  eth0\t0000000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                  cali1\t0A0200C0\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n";
        let got = parse_v4(v4);
        if cfg!(target_endian = "little") {
            assert_eq!(got, vec![("192.0.2.10".parse().unwrap(), "cali1".to_string())]);
        }
        let v6 = "20010db8000200000000000000000010 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00000001 lxc12\n\
                  20010db8000200000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001 eth0\n\
                  20010db8000200000000000000000001 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000002 00000000 80200001 lo\n";
        assert_eq!(parse_v6(v6), vec![("2001:db8:2::10".parse().unwrap(), "lxc12".to_string())]);
    }
}
