//! Standalone configuration: the Pods on this node, the policies, the gateway endpoints.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use egress_crds::AnyPolicy;
use ipnet::IpNet;
use serde::Deserialize;

/// The file.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// This node's name: only Pods with this `nodeName` are steered. Default: `$NODE_NAME`.
    #[serde(default)]
    pub node_name: Option<String>,
    /// The relay.
    #[serde(default)]
    pub relay: RelayConfig,
    /// `/healthz`, `/readyz` (table applied), `/metrics`; absent = off.
    #[serde(default)]
    pub admin: Option<SocketAddr>,
    /// Gateway transparent endpoints (`ip:port`), tried in order (standalone; Kubernetes mode
    /// reads the EndpointSlices of `kubernetes.gatewayService`).
    #[serde(default)]
    pub gateways: Vec<SocketAddr>,
    /// Kubernetes mode.
    #[serde(default)]
    pub kubernetes: KubeConfig,
    /// Cluster DNS servers: selected Pods may send UDP/TCP 53 there directly.
    #[serde(default)]
    pub cluster_dns: Vec<IpAddr>,
    /// Destinations never steered (cluster Pod, Service and node CIDRs, the gateways, extras).
    #[serde(default)]
    pub exclude_cidrs: Vec<IpNet>,
    /// Pods (standalone input; Kubernetes mode watches them instead).
    #[serde(default)]
    pub pods: Vec<PodEntry>,
    /// Namespace labels (for ClusterEgressPolicy namespace selectors).
    #[serde(default)]
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// Files or directories of policy documents.
    #[serde(default)]
    pub policy_files: Vec<PathBuf>,
    /// Inline policy documents.
    #[serde(default)]
    pub policies: Vec<serde_json::Value>,
    /// The chained CNI plugin.
    #[serde(default)]
    pub cni: CniConfig,
    /// The DNS forwarder for selected Pods.
    #[serde(default)]
    pub dns: DnsConfig,
}

/// The chained CNI plugin (see `crate::cni`).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CniConfig {
    /// Serve the plugin's admission requests (and keep the conflist entry, with `confDir`).
    #[serde(default)]
    pub enabled: bool,
    /// The unix socket the plugin asks on.
    #[serde(default = "default_cni_socket")]
    pub socket: PathBuf,
    /// What the plugin does when this node-redirector cannot be reached or cannot decide:
    /// `Fail` (the Pod's sandbox fails and is retried) or `Ignore` (the Pod starts unsteered).
    #[serde(default)]
    pub failure_policy: crate::cni::FailurePolicy,
    /// The plugin's log file (on the node).
    #[serde(default = "default_cni_log")]
    pub log_file: PathBuf,
    /// The node's CNI bin dir: `install-cni` copies the plugin there (`uninstall` removes it).
    #[serde(default)]
    pub bin_dir: Option<PathBuf>,
    /// The node's CNI conf dir: `install-cni` adds the plugin to its primary conflist, `run`
    /// puts the entry back whenever it is missing, `uninstall` removes it.
    #[serde(default)]
    pub conf_dir: Option<PathBuf>,
}

impl Default for CniConfig {
    fn default() -> Self {
        CniConfig {
            enabled: false,
            socket: default_cni_socket(),
            failure_policy: Default::default(),
            log_file: default_cni_log(),
            bin_dir: None,
            conf_dir: None,
        }
    }
}

fn default_cni_socket() -> PathBuf {
    PathBuf::from(crate::cni::DEFAULT_SOCKET)
}
fn default_cni_log() -> PathBuf {
    PathBuf::from(crate::cni::DEFAULT_LOG)
}

/// The DNS forwarder: selected Pods' DNS to `clusterDns` goes through it, and it remembers which
/// names each Pod resolved to which addresses (for the names TLV of the PROXY header).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DnsConfig {
    /// Forward and record (default); off: selected Pods' DNS goes to `clusterDns` directly.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Port of the forwarder for the first `clusterDns` address; the N-th listens on
    /// `port + N` (UDP and TCP, IPv4 and IPv6).
    #[serde(default = "default_dns_port")]
    pub port: u16,
    /// How long a (name, address) pair outlives its TTL after the last answer containing it.
    #[serde(default = "default_grace", with = "humantime_serde_compat")]
    pub grace: std::time::Duration,
    /// Names kept per Pod (least recently answered evicted first).
    #[serde(default = "default_max_names")]
    pub max_names_per_pod: usize,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            enabled: true,
            port: default_dns_port(),
            grace: default_grace(),
            max_names_per_pod: default_max_names(),
        }
    }
}

fn yes() -> bool {
    true
}
fn default_dns_port() -> u16 {
    15053
}
fn default_grace() -> std::time::Duration {
    std::time::Duration::from_secs(60)
}
fn default_max_names() -> usize {
    2000
}

/// Relay settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RelayConfig {
    /// Port redirected connections arrive on (IPv4 and IPv6).
    #[serde(default = "default_port")]
    pub port: u16,
    /// Gateway connect timeout per endpoint.
    #[serde(default = "default_connect_timeout", with = "humantime_serde_compat")]
    pub connect_timeout: std::time::Duration,
    /// Longest a bulk direction holds a partial read while batching (egress-netio's read
    /// batching, as the gateway's `limits.tunnelCoalesce`); `0s` turns it off.
    #[serde(default = "default_coalesce", with = "humantime_serde_compat")]
    pub coalesce: std::time::Duration,
    /// The relay key file shared with the gateways (`transparent.relayKeyFile` there): one base64
    /// key per line; the relay signs every PROXY header with the first. Required.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// How often an endpoint marked down (a connect that failed or timed out) is probed; the
    /// first probe that connects brings it back.
    #[serde(default = "default_probe_interval", with = "humantime_serde_compat")]
    pub probe_interval: std::time::Duration,
    /// The node's own addresses that steered connections are DNAT'ed to, at most one IPv4 and one
    /// IPv6 (empty: found at start, an address of the default route's interface; see
    /// `routes::node_addresses`).
    #[serde(default)]
    pub addresses: Vec<std::net::IpAddr>,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            port: default_port(),
            connect_timeout: default_connect_timeout(),
            coalesce: default_coalesce(),
            key_file: None,
            probe_interval: default_probe_interval(),
            addresses: Vec::new(),
        }
    }
}

fn default_probe_interval() -> std::time::Duration {
    std::time::Duration::from_secs(1)
}

fn default_port() -> u16 {
    15001
}
fn default_coalesce() -> std::time::Duration {
    egress_netio::DEFAULT_HOLD
}
fn default_connect_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(2)
}

mod humantime_serde_compat {
    use serde::{Deserialize, Deserializer};
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<std::time::Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

/// Kubernetes mode settings.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubeConfig {
    /// Watch Pods on this node, policies, Namespaces and the gateway's EndpointSlices.
    #[serde(default)]
    pub enabled: bool,
    /// Kubeconfig file; absent: `KUBECONFIG`, `~/.kube/config`, then in-cluster.
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    /// The gateway's transparent Service: `namespace/name`.
    #[serde(default)]
    pub gateway_service: Option<String>,
    /// Name of the Service port of the transparent front (default: the slice's first port).
    #[serde(default)]
    pub gateway_port_name: Option<String>,
}

/// One Pod.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodEntry {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Node it runs on.
    pub node_name: String,
    /// Its IPs.
    pub ips: Vec<IpAddr>,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The Pod's ServiceAccount (`spec.serviceAccountName`), for `serviceAccountSelector`.
    #[serde(default)]
    pub service_account: Option<String>,
    /// The host-side interface of the Pod (anti-spoofing keys on it). Absent: the interface of
    /// the node's host route to the Pod's address, when there is one (see `docs/redirector.md`).
    #[serde(default)]
    pub interface: Option<String>,
    /// The Pod's uid (Kubernetes mode; the standalone file has none).
    #[serde(skip)]
    pub uid: String,
}

/// A path of the config file: absolute as it is, relative to the config file's folder `base`.
fn relative_to(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() { p.to_path_buf() } else { base.join(p) }
}

/// A loaded, validated config with its policies.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The config.
    pub config: Config,
    /// Valid policies.
    pub policies: Vec<AnyPolicy>,
    /// The file it came from.
    pub path: PathBuf,
}

impl Loaded {
    /// The relay keys of `relay.keyFile` (read when the relay starts, not by `validate`: a config
    /// rendered elsewhere validates without the Secret it will find mounted); the first signs.
    pub fn relay_keys(&self) -> Result<Vec<egress_netio::proxy::RelayKey>, String> {
        let k = self.config.relay.key_file.as_ref().ok_or("relay.keyFile: required")?;
        let base = self.path.parent().unwrap_or(Path::new("."));
        egress_netio::proxy::RelayKey::load(&relative_to(base, k)).map_err(|e| format!("relay.keyFile: {e}"))
    }

    /// This node's name.
    pub fn node_name(&self) -> String {
        self.config.node_name.clone().or_else(|| std::env::var("NODE_NAME").ok()).unwrap_or_default()
    }

    /// The standalone inputs (Pods, namespaces, policies, gateways from the file).
    pub fn inputs(&self) -> crate::rules::Inputs {
        crate::rules::Inputs {
            node_name: self.node_name(),
            pods: self.config.pods.clone(),
            namespaces: self.config.namespaces.clone(),
            policies: self.policies.clone(),
            gateways: self.config.gateways.clone(),
            interfaces: Default::default(),
            changed_at: None,
        }
    }
}

/// Loads and validates; every error names the file and field.
pub fn load(path: &Path) -> Result<Loaded, Vec<String>> {
    let f = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| vec![format!("{f}: {e}")])?;
    let config: Config = serde_yaml_ng::from_str(&text).map_err(|e| vec![format!("{f}: {e}")])?;
    let mut errors = Vec::new();
    if config.kubernetes.enabled {
        if config.kubernetes.gateway_service.as_deref().is_none_or(|s| s.split_once('/').is_none()) {
            errors.push(format!(
                "{f}: kubernetes.gatewayService: `namespace/name` of the gateway's transparent Service is required"
            ));
        }
    } else if config.gateways.is_empty() {
        errors.push(format!("{f}: gateways: at least one gateway transparent endpoint is required"));
    }
    for v4 in [true, false] {
        let of: Vec<_> = config.relay.addresses.iter().filter(|a| a.is_ipv4() == v4).collect();
        if of.len() > 1 {
            errors.push(format!("{f}: relay.addresses: at most one IPv{} address", if v4 { 4 } else { 6 }));
        }
    }
    if let Some(a) = config.relay.addresses.iter().find(|a| a.is_loopback() || a.is_unspecified() || a.is_multicast()) {
        errors.push(format!("{f}: relay.addresses: {a} is not an address forwarded packets can be delivered to"));
    }
    if let Err(e) = egress_netio::check_hold(config.relay.coalesce) {
        errors.push(format!("{f}: relay.coalesce: {e}"));
    }
    if config.relay.key_file.is_none() {
        errors.push(format!(
            "{f}: relay.keyFile: required: the key the gateways check every PROXY header with \
             (the same file as their transparent.relayKeyFile)"
        ));
    }
    let base = path.parent().unwrap_or(Path::new("."));
    for (name, d) in
        [("relay.connectTimeout", config.relay.connect_timeout), ("relay.probeInterval", config.relay.probe_interval)]
    {
        if d.is_zero() {
            errors.push(format!("{f}: {name}: must be greater than zero"));
        }
    }
    if config.dns.enabled {
        if config.dns.max_names_per_pod == 0 {
            errors.push(format!("{f}: dns.maxNamesPerPod: must be at least 1"));
        }
        if config.cluster_dns.len() > 8 {
            errors.push(format!("{f}: clusterDns: at most 8 addresses (one forwarder port each)"));
        }
        let last = u32::from(config.dns.port) + config.cluster_dns.len() as u32;
        if config.dns.port == 0 || last > 65536 {
            errors.push(format!("{f}: dns.port: {} leaves no room for a port per clusterDns address", config.dns.port));
        } else if (u32::from(config.dns.port)..last).contains(&u32::from(config.relay.port)) {
            errors.push(format!("{f}: dns.port: the forwarder ports overlap relay.port {}", config.relay.port));
        }
    }
    if config.node_name.is_none() && std::env::var("NODE_NAME").is_err() {
        errors.push(format!("{f}: nodeName: required (or set NODE_NAME)"));
    }
    let mut docs: Vec<(String, serde_json::Value)> =
        config.policies.iter().enumerate().map(|(i, v)| (format!("{f}: policies[{i}]"), v.clone())).collect();
    for p in &config.policy_files {
        let p = relative_to(base, p);
        let files: Vec<PathBuf> = if p.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(&p)
                .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
                .unwrap_or_default();
            v.retain(|x| x.extension().is_some_and(|e| e == "yaml" || e == "yml"));
            v.sort();
            v
        } else {
            vec![p]
        };
        for file in files {
            match std::fs::read_to_string(&file) {
                Ok(t) => {
                    for (i, d) in serde_yaml_ng::Deserializer::from_str(&t).enumerate() {
                        match serde_json::Value::deserialize(d) {
                            Ok(serde_json::Value::Null) => {}
                            Ok(v) => docs.push((format!("{}: document {}", file.display(), i + 1), v)),
                            Err(e) => errors.push(format!("{}: document {}: {e}", file.display(), i + 1)),
                        }
                    }
                }
                Err(e) => errors.push(format!("{}: {e}", file.display())),
            }
        }
    }
    let mut policies = Vec::new();
    for (origin, v) in docs {
        match AnyPolicy::from_value(v) {
            Ok(p) => {
                let problems = p.validate();
                if problems.is_empty() {
                    policies.push(p);
                } else {
                    errors.extend(problems.into_iter().map(|e| format!("{origin} ({}): {e}", p.key())));
                }
            }
            Err(e) => errors.push(format!("{origin}: {e}")),
        }
    }
    if errors.is_empty() { Ok(Loaded { config, policies, path: path.to_path_buf() }) } else { Err(errors) }
}
