//! Name resolution with hickory-resolver (system resolv.conf or the configured nameservers),
//! answers cached per TTL. Names are always looked up fully qualified: no search domains, so the
//! name that was decided is the name that is resolved. A and AAAA are asked in parallel; a family
//! that fails while the other answers is held for a while (see [`Resolver`]).

use std::net::IpAddr;
use std::pin::pin;
use std::time::Duration;

use futures::future::{Either, select};
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig as HickoryConfig};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RecordType;
use prometheus_client::metrics::counter::Counter;

use crate::config::ResolverConfig;

/// Once one address family of a name has answered, how long the other may still take.
pub(crate) const SECOND_FAMILY_WAIT: Duration = Duration::from_secs(2);
/// How long before the lookup's deadline the wait for a second family ends.
const DEADLINE_MARGIN: Duration = Duration::from_millis(50);
/// How long a family that failed (server error, or no answer within `SECOND_FAMILY_WAIT`) while
/// the other answered is not asked again for that name.
pub(crate) const FAMILY_HOLD: Duration = Duration::from_secs(30);

/// An address family: which query (A or AAAA) an answer came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn record_type(self) -> RecordType {
        match self {
            Family::V4 => RecordType::A,
            Family::V6 => RecordType::AAAA,
        }
    }

    fn other(self) -> Family {
        match self {
            Family::V4 => Family::V6,
            Family::V6 => Family::V4,
        }
    }
}

/// The gateway's resolver.
///
/// Every name is asked for A and AAAA in parallel, each answer cached per its TTL (negative
/// answers per the zone's SOA) by hickory. A family whose query fails while the other answers
/// (a resolver that drops or refuses AAAA, say) is different: hickory caches no failure, so
/// without more every connection would ask again and wait for the failure. So once one family
/// has answered, the other gets `SECOND_FAMILY_WAIT`; a family that fails is held (not asked)
/// for that name for `FAMILY_HOLD`, and counted in `egress_dns_family_held_total`.
#[derive(Clone)]
pub(crate) struct Resolver {
    inner: TokioResolver,
    /// name -> the family not asked until the entry expires.
    held: moka::sync::Cache<String, Family>,
    held_total: Counter,
    /// `resolver.timeout`: the deadline of one lookup.
    timeout: Duration,
}

impl Resolver {
    /// Builds a resolver from the config (system configuration when no nameserver is given).
    /// `held_total` counts families put on hold.
    pub(crate) fn new(cfg: &ResolverConfig, held_total: Counter) -> anyhow::Result<Self> {
        let mut builder = if cfg.nameservers.is_empty() {
            TokioResolver::builder_tokio()?
        } else {
            let servers = cfg
                .nameservers
                .iter()
                .map(|sa| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = sa.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = sa.port();
                    NameServerConfig::new(sa.ip(), true, vec![udp, tcp])
                })
                .collect();
            let mut b = TokioResolver::builder_with_config(
                HickoryConfig::from_name_servers(servers),
                TokioRuntimeProvider::default(),
            );
            b.options_mut().use_hosts_file = ResolveHosts::Never;
            b
        };
        let opts = builder.options_mut();
        opts.ndots = 0;
        opts.cache_size = 4096;
        let held = moka::sync::Cache::builder().max_capacity(4096).time_to_live(FAMILY_HOLD).build();
        Ok(Resolver { inner: builder.build()?, held, held_total, timeout: cfg.timeout })
    }

    /// Every address of a (normalised) name, IPv4 first, then IPv6, within `resolver.timeout`.
    pub(crate) async fn lookup(&self, name: &str) -> Result<Vec<IpAddr>, String> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        match tokio::time::timeout_at(deadline, self.lookup_families(name, deadline)).await {
            Ok(r) => r,
            Err(_) => Err(format!("{name}: no answer within resolver.timeout ({:?})", self.timeout)),
        }
    }

    async fn lookup_families(&self, name: &str, deadline: tokio::time::Instant) -> Result<Vec<IpAddr>, String> {
        let fqdn = format!("{name}.");
        if let Some(held) = self.held.get(name) {
            match self.family(&fqdn, held.other()).await {
                Ok(ips) if !ips.is_empty() => return Ok(ips),
                // The family that answered before does not now: ask both again.
                _ => self.held.invalidate(name),
            }
        }
        let (v4, v6) = (pin!(self.family(&fqdn, Family::V4)), pin!(self.family(&fqdn, Family::V6)));
        let (first, first_r, rest) = match select(v4, v6).await {
            Either::Left((r, rest)) => (Family::V4, r, rest),
            Either::Right((r, rest)) => (Family::V6, r, rest),
        };
        // The second family's wait ends before the lookup's deadline, so that the first
        // family's addresses are not lost to it.
        let left = deadline.saturating_duration_since(tokio::time::Instant::now()).saturating_sub(DEADLINE_MARGIN);
        let second_r = match &first_r {
            Ok(ips) if !ips.is_empty() => match tokio::time::timeout(SECOND_FAMILY_WAIT.min(left), rest).await {
                Ok(r) => r,
                Err(_) => Err(Failed::Timeout),
            },
            // NXDOMAIN is about the name, not a type: the other family cannot have records.
            Err(Failed::NoRecords { nx_domain: true, .. }) => return Err(format!("{name}: no such name (NXDOMAIN)")),
            _ => rest.await,
        };
        let (mut v4, mut v6) = match first {
            Family::V4 => (first_r, second_r),
            Family::V6 => (second_r, first_r),
        };
        for (family, r, other) in [(Family::V4, &v4, &v6), (Family::V6, &v6, &v4)] {
            if let (Err(e), Ok(ips)) = (r, other)
                && e.is_failure()
                && !ips.is_empty()
            {
                self.hold(name, family, e);
            }
        }
        let ips = match (&mut v4, &mut v6) {
            (Ok(a), Ok(b)) => {
                a.append(b);
                std::mem::take(a)
            }
            (Ok(a), Err(_)) | (Err(_), Ok(a)) => std::mem::take(a),
            // Both outcomes, in a sentence.
            (Err(Failed::NoRecords { nx_domain: true, .. }), _)
            | (_, Err(Failed::NoRecords { nx_domain: true, .. })) => {
                return Err(format!("{name}: no such name (NXDOMAIN)"));
            }
            (Err(Failed::NoRecords { .. }), Err(Failed::NoRecords { .. })) => {
                return Err(format!("{name} has no A or AAAA records"));
            }
            (Err(a), Err(b)) => return Err(format!("{name}: A: {a}; AAAA: {b}")),
        };
        if ips.is_empty() {
            return Err(format!("{name} has no A or AAAA records"));
        }
        Ok(ips)
    }

    /// The addresses of one family (none: an authoritative "no such name" or "no such record").
    async fn family(&self, fqdn: &str, family: Family) -> Result<Vec<IpAddr>, Failed> {
        match self.inner.lookup(fqdn, family.record_type()).await {
            Ok(l) => {
                let mut v: Vec<IpAddr> = l
                    .answers()
                    .iter()
                    .filter_map(|r| r.data.ip_addr())
                    .filter(|ip| ip.is_ipv4() == (family == Family::V4))
                    .collect();
                v.dedup();
                Ok(v)
            }
            Err(e) if e.is_no_records_found() => Err(Failed::NoRecords { nx_domain: e.is_nx_domain() }),
            Err(e) => Err(Failed::Error(e)),
        }
    }

    fn hold(&self, name: &str, family: Family, why: &Failed) {
        tracing::warn!(
            name,
            family = ?family,
            error = %why,
            hold = ?FAMILY_HOLD,
            "DNS: one address family failed while the other answered; not asking it for this name for a while"
        );
        self.held.insert(name.to_string(), family);
        self.held_total.inc();
    }
}

/// Why a family has no addresses.
enum Failed {
    /// An authoritative negative answer (NXDOMAIN, or NODATA for this type), cached by hickory.
    NoRecords { nx_domain: bool },
    /// The server failed, refused or did not answer.
    Error(NetError),
    /// No answer within `SECOND_FAMILY_WAIT` after the other family's.
    Timeout,
}

impl Failed {
    fn is_failure(&self) -> bool {
        !matches!(self, Failed::NoRecords { .. })
    }
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failed::NoRecords { nx_domain: true, .. } => f.write_str("no such name (NXDOMAIN)"),
            Failed::NoRecords { .. } => f.write_str("no records"),
            Failed::Error(e) => write!(f, "the server failed or refused ({e})"),
            Failed::Timeout => f.write_str("no answer in time after the other family answered"),
        }
    }
}
