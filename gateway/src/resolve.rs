//! Name resolution with hickory-resolver (system resolv.conf or the configured nameservers),
//! answers cached per TTL. Names are always looked up fully qualified: no search domains, so the
//! name that was decided is the name that is resolved.

use std::net::IpAddr;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig as HickoryConfig,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;

use crate::config::ResolverConfig;

/// The gateway's resolver.
#[derive(Clone)]
pub struct Resolver {
    inner: TokioResolver,
}

impl Resolver {
    /// Builds a resolver from the config (system configuration when no nameserver is given).
    pub fn new(cfg: &ResolverConfig) -> anyhow::Result<Self> {
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
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        opts.ndots = 0;
        opts.cache_size = 4096;
        Ok(Resolver { inner: builder.build()? })
    }

    /// Every address of a (normalised) name, A and AAAA.
    pub async fn lookup(&self, name: &str) -> Result<Vec<IpAddr>, String> {
        let fqdn = format!("{name}.");
        match self.inner.lookup_ip(fqdn.as_str()).await {
            Ok(l) => {
                let mut v: Vec<IpAddr> = l.iter().collect();
                v.dedup();
                Ok(v)
            }
            Err(e) => Err(e.to_string()),
        }
    }
}
