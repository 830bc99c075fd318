//! The host-side interface of a Pod address, from the node's host routes: the interface of a
//! `/32` (IPv4) or `/128` (IPv6) route to it, as point-to-point CNIs (Calico, Cilium with
//! per-endpoint routes, kindnet, the AWS VPC CNI) install one per Pod. Nothing else counts: a
//! subnet route (bridge CNIs) or the default route names an interface many hosts share, and
//! anti-spoofing keyed on it would drop traffic that is not the Pod's. Read from
//! `/proc/net/route` and `/proc/net/ipv6_route` of the redirector's network namespace (the
//! node's: it runs with `hostNetwork`).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Whether the node's interface `name` is a bridge.
pub fn is_bridge(name: &str) -> bool {
    sysfs_dir(name, "bridge")
}

/// Whether the node's interface `name` is a port of a bridge.
pub fn is_bridge_port(name: &str) -> bool {
    sysfs_dir(name, "brport")
}

fn sysfs_dir(name: &str, dir: &str) -> bool {
    !name.is_empty()
        && !name.contains('/')
        && !name.starts_with('.')
        && std::path::Path::new("/sys/class/net").join(name).join(dir).is_dir()
}

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

/// The interface of the default route of each family (the node's uplink), from
/// `/proc/net/route` and `/proc/net/ipv6_route`.
fn default_route_ifaces() -> (Option<String>, Option<String>) {
    let v4 = std::fs::read_to_string("/proc/net/route").ok().and_then(|t| default_v4(&t));
    let v6 = std::fs::read_to_string("/proc/net/ipv6_route").ok().and_then(|t| default_v6(&t));
    (v4, v6)
}

fn default_v4(text: &str) -> Option<String> {
    text.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1) == Some(&"00000000") && f.get(7) == Some(&"00000000")).then(|| f[0].to_string())
    })
}

fn default_v6(text: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let default = f.first().is_some_and(|d| d.bytes().all(|b| b == b'0')) && f.get(1) == Some(&"00");
        (default && f.get(9).is_some_and(|i| *i != "lo")).then(|| f[9].to_string())
    })
}

/// The node's own addresses that steered connections are sent to (`relay.addresses` unset), one
/// per family: an address of the interface that holds the family's default route (the node's
/// uplink: the address least likely to go away), else of any other interface that is up. Never a
/// loopback or link-local address (a forwarded packet is never delivered to those).
pub fn node_addresses() -> crate::rules::RelayTo {
    let ifaces = if_addrs::get_if_addrs().unwrap_or_default();
    // `lo` reports no operational state (UNKNOWN), yet a global address on it (some BGP setups
    // put the node's address there) is as local as any.
    let addrs: Vec<(String, IpAddr)> =
        ifaces.iter().filter(|i| i.is_oper_up() || i.name == "lo").map(|i| (i.name.clone(), i.ip())).collect();
    let (d4, d6) = default_route_ifaces();
    pick(&addrs, d4.as_deref(), d6.as_deref())
}

/// [`node_addresses`]' choice among `(interface, address)` pairs.
fn pick(addrs: &[(String, IpAddr)], default_v4: Option<&str>, default_v6: Option<&str>) -> crate::rules::RelayTo {
    /// The first of `addrs` that `of` takes, on `default`'s interface if it has one.
    fn choose<T: Copy>(
        addrs: &[(String, IpAddr)],
        default: Option<&str>,
        of: impl Fn(&IpAddr) -> Option<T>,
    ) -> Option<T> {
        let on_default = addrs.iter().filter(|(i, _)| Some(i.as_str()) == default);
        on_default.chain(addrs).find_map(|(_, ip)| of(ip))
    }
    crate::rules::RelayTo {
        v4: choose(addrs, default_v4, |ip| match ip {
            IpAddr::V4(a) if !a.is_loopback() && !a.is_link_local() && !a.is_unspecified() => Some(*a),
            _ => None,
        }),
        v6: choose(addrs, default_v6, |ip| match ip {
            IpAddr::V6(a)
                if !a.is_loopback() && !a.is_unicast_link_local() && !a.is_unspecified() && !a.is_multicast() =>
            {
                Some(*a)
            }
            _ => None,
        }),
    }
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

    #[test]
    fn the_default_routes_interface_is_found_in_both_tables() {
        let v4 = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                  cali1\t0A0200C0\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n\
                  ens5\t00000000\t0100000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n";
        assert_eq!(default_v4(v4).as_deref(), Some("ens5"));
        assert_eq!(default_v4("Iface\tDestination\n"), None);
        let v6 = "20010db8000200000000000000000010 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00000001 lxc12\n\
                  00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003 ens5\n\
                  00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200 lo\n";
        assert_eq!(default_v6(v6).as_deref(), Some("ens5"));
    }

    #[test]
    fn the_uplink_address_is_chosen_and_never_a_loopback_or_link_local_one() {
        let a = |i: &str, ip: &str| (i.to_string(), ip.parse::<IpAddr>().unwrap());
        let addrs = [
            a("lo", "127.0.0.1"),
            a("lo", "::1"),
            a("cni0", "10.244.0.1"),
            a("cni0", "fe80::1"),
            a("ens5", "169.254.10.1"),
            a("ens5", "10.0.0.5"),
            a("ens5", "2001:db8::5"),
        ];
        let r = pick(&addrs, Some("ens5"), Some("ens5"));
        assert_eq!(r.v4, Some("10.0.0.5".parse().unwrap()));
        assert_eq!(r.v6, Some("2001:db8::5".parse().unwrap()));
        // No default route (or its interface has no usable address): the first usable one.
        let r = pick(&addrs, None, Some("cni0"));
        assert_eq!(r.v4, Some("10.244.0.1".parse().unwrap()));
        assert_eq!(r.v6, Some("2001:db8::5".parse().unwrap()));
        let r = pick(&addrs[..4], None, None);
        assert_eq!((r.v4, r.v6), (Some("10.244.0.1".parse().unwrap()), None), "fe80::/10 is never chosen");
        assert_eq!(pick(&addrs[..2], None, None), crate::rules::RelayTo::default());
    }
}
