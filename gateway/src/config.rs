//! The gateway's YAML configuration: parsing, validation with precise errors (file, document,
//! field), and loading of the policy documents it names.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use egress_crds::AnyPolicy;
use ipnet::IpNet;
use serde::{Deserialize, Deserializer};

/// `Allow` or `Deny`, for clients no policy selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
pub enum DefaultAction {
    /// Allow (still subject to the guard).
    Allow,
    /// Deny (the default).
    #[default]
    Deny,
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// Listener addresses; each absent one is off.
    #[serde(default)]
    pub listen: Listen,
    /// Action for clients no policy selects.
    #[serde(default)]
    pub default_action: DefaultAction,
    /// DNS resolution.
    #[serde(default)]
    pub resolver: ResolverConfig,
    /// Built-in guard exemptions.
    #[serde(default)]
    pub guard: GuardConfig,
    /// Source-address pools: name -> source IPs. `default` (when absent or empty) lets the kernel choose.
    #[serde(default)]
    pub egress_addresses: BTreeMap<String, Vec<IpAddr>>,
    /// Standalone identity: source CIDR -> who.
    #[serde(default)]
    pub clients: Vec<ClientEntry>,
    /// Files or directories of YAML policy documents.
    #[serde(default)]
    pub policy_files: Vec<PathBuf>,
    /// Inline policy documents.
    #[serde(default)]
    pub policies: Vec<serde_json::Value>,
    /// SOCKS5 settings.
    #[serde(default)]
    pub socks5: Socks5Config,
    /// Audit sinks.
    #[serde(default)]
    pub audit: AuditConfig,
    /// Timeouts and sizes.
    #[serde(default)]
    pub limits: Limits,
    /// Graceful shutdown.
    #[serde(default)]
    pub shutdown: Shutdown,
    /// Kubernetes mode.
    #[serde(default)]
    pub kubernetes: KubernetesConfig,
    /// Transparent front.
    #[serde(default)]
    pub transparent: TransparentConfig,
    /// Operational logs (stderr).
    #[serde(default)]
    pub log: LogConfig,
    /// Workload identity beyond the source address.
    #[serde(default)]
    pub identity: IdentityConfig,
    /// TLS of the HTTPS proxy front (`listen.https`).
    #[serde(default)]
    pub https: HttpsConfig,
}

/// The HTTPS proxy front: the explicit proxy spoken over TLS (`curl --proxy https://...`),
/// optionally with client certificates that identify the client (`client.identity_source:
/// certificate`). Paths are relative to the config file; the files are re-read on reload, so a
/// renewed certificate is served to new connections without a restart.
#[derive(Debug, Clone, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpsConfig {
    /// The gateway's certificate chain (PEM, leaf first).
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// The CA certificates (PEM) client certificates must chain to.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// `None`, `Optional` or `Required`; default `Required` with `clientCa`, else `None`.
    #[serde(default)]
    pub client_cert: Option<ClientCertMode>,
}

/// Whether the HTTPS front asks for client certificates.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub enum ClientCertMode {
    /// Not asked for.
    None,
    /// Asked for: a client without one is served and identified by its address; one that does
    /// not verify ends the handshake.
    Optional,
    /// Required: the handshake ends without one that verifies.
    Required,
}

impl HttpsConfig {
    /// The mode in force: `clientCert`, else `Required` with a `clientCa` and `None` without.
    pub fn client_cert_mode(&self) -> ClientCertMode {
        self.client_cert.unwrap_or(if self.client_ca.is_some() {
            ClientCertMode::Required
        } else {
            ClientCertMode::None
        })
    }
}

/// Operational logging (stderr; the audit trail is separate). The filter is the `EGRESS_LOG`
/// environment variable (`info` by default).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LogConfig {
    /// `text` (the default; coloured only on a terminal) or `json` (one object per line, for log
    /// collectors). Read at start; `EGRESS_LOG_FORMAT` overrides it.
    #[serde(default)]
    pub format: egress_log::Format,
    /// One concise line at info level per denied request (who, where to, why, request id), for
    /// denials that a client only sees in a status code or SOCKS5 reply. Also filterable with
    /// `EGRESS_LOG=info,egress_gateway::denials=off`.
    #[serde(default = "yes")]
    pub denials: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { format: egress_log::Format::Text, denials: true }
    }
}

/// Transparent front settings.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TransparentConfig {
    /// Addresses of the node-redirector relays allowed to send PROXY v2 headers. Connections from
    /// anywhere else are closed and audited as `untrusted_relay`.
    #[serde(default)]
    pub trusted_relays: Vec<IpNet>,
    /// The relays' key file (one base64 key per line, at least 32 bytes each; in Kubernetes a
    /// Secret shared with the node-redirector). Every PROXY header must carry a MAC under one of
    /// these keys: an address in `trustedRelays` is not proof, since a masquerading node gives
    /// its Pods the node's address. Required with `listen.transparent`; re-read on reload.
    #[serde(default)]
    pub relay_key_file: Option<PathBuf>,
    /// How far a header's timestamp may be from this clock (both ways) before it is refused.
    #[serde(deserialize_with = "duration", default = "d30s")]
    pub relay_max_skew: Duration,
    /// How long the front waits for a client's first bytes (a TLS ClientHello or an HTTP request
    /// head) before deciding on the original destination alone, as server-speaks-first protocols
    /// (SMTP, SSH banners, databases) send nothing first.
    #[serde(deserialize_with = "duration", default = "d500ms")]
    pub first_byte_timeout: Duration,
}

impl Default for TransparentConfig {
    fn default() -> Self {
        TransparentConfig {
            trusted_relays: Vec::new(),
            relay_key_file: None,
            relay_max_skew: d30s(),
            first_byte_timeout: d500ms(),
        }
    }
}

fn d500ms() -> Duration {
    Duration::from_millis(500)
}

/// Kubernetes mode settings.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubernetesConfig {
    /// Watch EgressPolicy, ClusterEgressPolicy, Namespaces and Pods and decide with them.
    #[serde(default)]
    pub enabled: bool,
    /// Kubeconfig file; absent: `KUBECONFIG`, `~/.kube/config`, then the in-cluster service account.
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    /// Write policy status (only the replica holding the Lease writes).
    #[serde(default = "yes")]
    pub write_status: bool,
    /// Namespace of the status-writer Lease; default `$POD_NAMESPACE`, else `default`.
    #[serde(default)]
    pub lease_namespace: Option<String>,
    /// Name of the status-writer Lease.
    #[serde(default = "default_lease_name")]
    pub lease_name: String,
    /// A holder that has not renewed for this long loses the Lease.
    #[serde(deserialize_with = "duration", default = "d15s")]
    pub lease_duration: Duration,
    /// Share each policy's `rateLimit` among the gateway's ready replicas: every replica
    /// enforces `requestsPerSecond / N` and `burst / N` (at least 1), N being the Ready Pods
    /// these labels select in the namespace. Absent: each replica enforces the whole rate.
    #[serde(default)]
    pub rate_limit_replicas: Option<ReplicaSelector>,
}

/// The gateway's own Pods, counted to share rate limits among them.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReplicaSelector {
    /// Labels every gateway Pod carries (the Deployment's selector); at least one.
    pub match_labels: BTreeMap<String, String>,
    /// Namespace of the gateway's Pods; default `$POD_NAMESPACE`, else `default`.
    #[serde(default)]
    pub namespace: Option<String>,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        KubernetesConfig {
            enabled: false,
            kubeconfig: None,
            write_status: true,
            lease_namespace: None,
            lease_name: default_lease_name(),
            lease_duration: d15s(),
            rate_limit_replicas: None,
        }
    }
}

fn yes() -> bool {
    true
}
fn default_lease_name() -> String {
    "egress-gateway-status".into()
}
fn d15s() -> Duration {
    Duration::from_secs(15)
}

/// Listener addresses.
#[derive(Debug, Clone, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Listen {
    /// Explicit HTTP proxy (absolute-form and CONNECT).
    pub http: Option<SocketAddr>,
    /// SOCKS5 proxy.
    pub socks5: Option<SocketAddr>,
    /// `/metrics`, `/healthz`, `/readyz`.
    pub admin: Option<SocketAddr>,
    /// Transparent front: PROXY protocol v2 connections from node-redirector relays.
    pub transparent: Option<SocketAddr>,
    /// The explicit proxy over TLS (`https`), with optional client certificates.
    pub https: Option<SocketAddr>,
}

/// DNS resolution settings.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResolverConfig {
    /// `ip:port` of the nameservers (UDP, TCP fallback). Empty: the system's resolv.conf.
    #[serde(default)]
    pub nameservers: Vec<SocketAddr>,
    /// Deadline of one lookup (both families, every nameserver and retry): past it the request
    /// is denied with `dns_failure`.
    #[serde(deserialize_with = "duration", default = "d5s")]
    pub timeout: Duration,
}

impl Default for ResolverConfig {
    fn default() -> Self {
        ResolverConfig { nameservers: vec![], timeout: d5s() }
    }
}

/// Guard settings.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GuardConfig {
    /// Ranges exempted from the built-in guard (both tiers). Logged at start-up, named in every
    /// decision that used them.
    #[serde(default)]
    pub allow_cidrs: Vec<IpNet>,
}

/// One row of the standalone identity table.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientEntry {
    /// Source prefix of the client (absent: a row only for certificate or token clients).
    #[serde(default)]
    pub cidr: Option<IpNet>,
    /// A client certificate (HTTPS front) that makes its holder this client: by its subject's
    /// common name or one of its subject alternative names.
    #[serde(default)]
    pub certificate: Option<CertificateMatch>,
    /// Namespace the client belongs to.
    pub namespace: String,
    /// Client (Pod) name.
    pub name: String,
    /// Service account.
    #[serde(default)]
    pub service_account: Option<String>,
    /// Labels, matched by `podSelector`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// Which client certificates a `clients` row stands for: exactly one of the two.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CertificateMatch {
    /// The subject's common name, exactly.
    #[serde(default)]
    pub common_name: Option<String>,
    /// A subject alternative name (DNS name, URI or e-mail address), exactly.
    #[serde(default)]
    pub san: Option<String>,
}

impl CertificateMatch {
    /// Whether a certificate with this common name and these SANs is the one meant.
    pub(crate) fn matches(&self, common_name: Option<&str>, sans: &[String]) -> bool {
        match (&self.common_name, &self.san) {
            (Some(cn), None) => common_name == Some(cn.as_str()),
            (None, Some(san)) => sans.iter().any(|s| s == san),
            _ => false,
        }
    }
}

/// Workload identity beyond the source address.
#[derive(Debug, Clone, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IdentityConfig {
    /// Kubernetes ServiceAccount tokens in `Proxy-Authorization` (HTTP and CONNECT); absent:
    /// the header is not read and clients are who their address says.
    #[serde(default)]
    pub tokens: Option<TokenConfig>,
    /// Accept a token whose Pod is not the one the connection comes from (clients outside the
    /// cluster; Kubernetes mode).
    #[serde(default)]
    pub allow_remote: bool,
}

/// Where ServiceAccount tokens come from and what they must say.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenConfig {
    /// The issuer (`iss`): the API server's `--service-account-issuer`.
    pub issuer: String,
    /// Accepted audiences (`aud`); a projected token is requested for one of them.
    #[serde(default = "default_audiences")]
    pub audiences: Vec<String>,
    /// The issuer's JWKS document (`kubectl get --raw /openid/v1/jwks`), read at start and on
    /// every reload. Not set, in Kubernetes mode: fetched from the API server.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(deserialize_with = "duration", default = "d60s")]
    pub leeway: Duration,
}

fn default_audiences() -> Vec<String> {
    vec!["egress.dev".into()]
}

/// SOCKS5 settings.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Socks5Config {
    /// RFC 1929 users; when non-empty, authentication is required.
    #[serde(default)]
    pub users: Vec<Socks5User>,
}

/// A SOCKS5 user.
#[derive(Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Socks5User {
    /// User name (1-255 bytes).
    pub username: String,
    /// Password (1-255 bytes).
    pub password: String,
    /// With `serviceAccount`: the identity this user has (a verified one, like a token's):
    /// namespace, ServiceAccount and labels for policy selection.
    #[serde(default)]
    pub namespace: Option<String>,
    /// The user's ServiceAccount (with `namespace`).
    #[serde(default)]
    pub service_account: Option<String>,
    /// The user's labels, matched by `podSelector` (with `namespace`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl fmt::Debug for Socks5User {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Socks5User").field("username", &self.username).finish_non_exhaustive()
    }
}

/// Audit settings.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuditConfig {
    /// Where events go. Default: one stdout sink.
    #[serde(default = "default_sinks", deserialize_with = "sinks")]
    pub sinks: Vec<SinkConfig>,
    /// The local spool every event is committed to before the client is answered; absent: events
    /// go from memory straight to the sinks (nothing survives a crash).
    #[serde(default)]
    pub spool: Option<SpoolConfig>,
    /// What happens when an event cannot be committed (spool full or unwritable).
    #[serde(default)]
    pub on_failure: OnFailure,
    /// Signed checkpoints of the hash chain; absent: the chain only.
    #[serde(default)]
    pub checkpoint: Option<CheckpointConfig>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig { sinks: default_sinks(), spool: None, on_failure: OnFailure::default(), checkpoint: None }
    }
}

/// Signed checkpoints.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Ed25519 private key, PKCS#8 PEM (`openssl genpkey -algorithm ed25519`); in Kubernetes, a
    /// Secret mounted as a file.
    pub key_file: PathBuf,
    /// A checkpoint after this many events ...
    #[serde(default = "default_checkpoint_every")]
    pub every: u64,
    /// ... or this long after the previous one, whichever comes first (only when events were written).
    #[serde(deserialize_with = "duration", default = "d60s")]
    pub interval: Duration,
}

fn default_checkpoint_every() -> u64 {
    1000
}
fn d60s() -> Duration {
    Duration::from_secs(60)
}

fn default_sinks() -> Vec<SinkConfig> {
    vec![SinkConfig::Stdout(StdoutSinkConfig::default())]
}

/// The audit spool.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SpoolConfig {
    /// Directory of the spool (segments and per-sink cursors); created when missing.
    pub dir: PathBuf,
    /// Upper bound of the spool on disk; when undelivered events fill it, `onFailure` applies.
    #[serde(default = "default_spool_max_bytes")]
    pub max_bytes: u64,
    /// Size at which a segment is closed and a new one started; delivered segments are deleted whole.
    #[serde(default = "default_segment_bytes")]
    pub segment_bytes: u64,
    /// `always`: fsync before answering (no loss on power failure); a duration such as `10ms`:
    /// answer once written, fsync every period (a power failure can lose that period).
    #[serde(default = "default_fsync", deserialize_with = "fsync_policy")]
    pub fsync: FsyncPolicy,
}

/// When the spool is flushed to stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Before every commit is acknowledged (commits are grouped).
    Always,
    /// Every period; commits are acknowledged once written to the file.
    Every(Duration),
}

fn default_spool_max_bytes() -> u64 {
    1 << 30
}
fn default_segment_bytes() -> u64 {
    16 << 20
}
fn default_fsync() -> FsyncPolicy {
    FsyncPolicy::Every(Duration::from_millis(10))
}

fn fsync_policy<'de, D: Deserializer<'de>>(d: D) -> Result<FsyncPolicy, D::Error> {
    let s = String::deserialize(d)?;
    if s == "always" {
        return Ok(FsyncPolicy::Always);
    }
    match humantime::parse_duration(&s) {
        Ok(p) if !p.is_zero() => Ok(FsyncPolicy::Every(p)),
        _ => Err(serde::de::Error::custom(format!("{s:?}: `always` or a period such as 10ms"))),
    }
}

/// Behaviour when audit events cannot be committed.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum OnFailure {
    /// Refuse new connections (HTTP 503, SOCKS5 0x01, transparent: reset) and report not ready
    /// until events can be committed again.
    #[default]
    FailClosed,
    /// Keep serving, count the events lost, and record their sequence range in an `audit_gap`
    /// event once writing works again.
    FailOpen,
}

/// One audit sink: `type` picks the kind, and each kind takes its own fields (any other is an
/// unknown field). Every kind has `name` and `format`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkConfig {
    /// Standard output.
    Stdout(StdoutSinkConfig),
    /// An append-only file, rotated by size.
    File(FileSinkConfig),
    /// A syslog collector (RFC 5424 over TCP, TLS or UDP).
    Syslog(SyslogSinkConfig),
    /// Batched HTTP POSTs (Splunk HEC, Elastic `_bulk`, NDJSON webhook).
    Http(Box<HttpSinkConfig>),
}

/// The sinks as written: `#[serde(tag = "type")]` on the public enum would buffer each entry
/// and lose which entry a problem is in, so each entry is read on its own and every problem is
/// reported with its index.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum TaggedSink {
    Stdout(StdoutSinkConfig),
    File(FileSinkConfig),
    Syslog(SyslogSinkConfig),
    Http(Box<HttpSinkConfig>),
}

fn sinks<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SinkConfig>, D::Error> {
    let raw = Vec::<serde_yaml_ng::Value>::deserialize(d)?;
    let (mut out, mut problems) = (Vec::with_capacity(raw.len()), Vec::new());
    for (i, v) in raw.into_iter().enumerate() {
        match serde_yaml_ng::from_value::<TaggedSink>(v) {
            Ok(TaggedSink::Stdout(s)) => out.push(SinkConfig::Stdout(s)),
            Ok(TaggedSink::File(s)) => out.push(SinkConfig::File(s)),
            Ok(TaggedSink::Syslog(s)) => out.push(SinkConfig::Syslog(s)),
            Ok(TaggedSink::Http(s)) => out.push(SinkConfig::Http(s)),
            Err(e) => problems.push(format!("sinks[{i}]: {e}")),
        }
    }
    if problems.is_empty() { Ok(out) } else { Err(serde::de::Error::custom(problems.join("; "))) }
}

/// A `stdout` sink.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StdoutSinkConfig {
    /// Name of the sink (its delivery cursor in the spool is kept under it); default `<type>-<index>`.
    #[serde(default)]
    pub name: Option<String>,
    /// Serialisation: `json` (egress.v1), `ocsf` or `ecs`; one JSON object per line.
    #[serde(default)]
    pub format: AuditFormat,
}

/// A `file` sink.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileSinkConfig {
    /// Name of the sink; default `file-<index>`.
    #[serde(default)]
    pub name: Option<String>,
    /// Serialisation.
    #[serde(default)]
    pub format: AuditFormat,
    /// The file (appended to; created if absent).
    pub path: PathBuf,
    /// Rotate when the file would exceed this many bytes (absent: never; at least 4096).
    #[serde(default)]
    pub max_bytes: Option<u64>,
    /// Rotated files kept (`<path>.1` newest ... `<path>.<maxFiles>`); 1 to 1000, default 5.
    #[serde(default = "default_max_files")]
    pub max_files: u32,
}

fn default_max_files() -> u32 {
    5
}

/// A `syslog` sink.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SyslogSinkConfig {
    /// Name of the sink; default `syslog-<index>`.
    #[serde(default)]
    pub name: Option<String>,
    /// Serialisation.
    #[serde(default)]
    pub format: AuditFormat,
    /// `host:port` of the collector.
    pub address: String,
    /// `tcp` (default, octet-counting framing), `tls` (RFC 5425) or `udp` (RFC 5426, lossy).
    #[serde(default)]
    pub transport: SyslogTransport,
    /// Transport `tls`: CA bundle, optional client certificate and key, server name.
    #[serde(default)]
    pub tls: Option<SinkTls>,
    /// Facility number 0-23 (default 16, local0).
    #[serde(default = "default_facility")]
    pub facility: u8,
    /// APP-NAME (default `egress-gateway`).
    #[serde(default = "default_app_name")]
    pub app_name: String,
}

fn default_facility() -> u8 {
    16
}
fn default_app_name() -> String {
    "egress-gateway".into()
}

/// An `http` sink.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpSinkConfig {
    /// Name of the sink; default `http-<index>`.
    #[serde(default)]
    pub name: Option<String>,
    /// Serialisation.
    #[serde(default)]
    pub format: AuditFormat,
    /// The endpoint (`https://...`; HEC: `.../services/collector/event`, Elastic: `.../_bulk`).
    pub url: String,
    /// `splunk_hec`, `elastic_bulk` or `ndjson`.
    pub preset: HttpPreset,
    /// The credential (HEC token, Elastic API key, webhook bearer token); prefer `tokenFile`.
    #[serde(default)]
    pub token: Option<String>,
    /// A file holding the credential (a mounted Secret); read at start.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Gzip request bodies (default true).
    #[serde(default = "yes")]
    pub gzip: bool,
    /// Batch bounds.
    #[serde(default)]
    pub batch: BatchConfig,
    /// Request timeout (default 30s).
    #[serde(default = "d30s", deserialize_with = "duration")]
    pub timeout: Duration,
    /// Elastic `_index` or HEC `index`.
    #[serde(default)]
    pub index: Option<String>,
    /// `splunk_hec`: indexer acknowledgement and the envelope's source and sourcetype.
    #[serde(default)]
    pub hec: Option<HecConfig>,
    /// TLS client settings (CA bundle, client certificate and key) for the endpoint.
    #[serde(default)]
    pub tls: Option<SinkTls>,
    /// Where events the receiver rejects for good (HTTP 400, Elastic item 400) are written;
    /// default `<spool dir>/dead-letter/<sink>.jsonl`.
    #[serde(default)]
    pub dead_letter: Option<PathBuf>,
}

/// HTTP sink preset.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum HttpPreset {
    /// Splunk HTTP Event Collector.
    SplunkHec,
    /// Elasticsearch / OpenSearch `_bulk`.
    ElasticBulk,
    /// A generic NDJSON webhook.
    Ndjson,
}

/// Batch bounds of an HTTP sink: a request carries at most this much, and an event waits at
/// most `maxAge` for company.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BatchConfig {
    /// Events per request (default 500).
    #[serde(default = "default_batch_events")]
    pub max_events: usize,
    /// Uncompressed bytes per request (default 1 MiB).
    #[serde(default = "default_batch_bytes")]
    pub max_bytes: usize,
    /// Longest wait for a fuller batch (default 1s).
    #[serde(default = "d1s", deserialize_with = "duration")]
    pub max_age: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig { max_events: default_batch_events(), max_bytes: default_batch_bytes(), max_age: d1s() }
    }
}

fn default_batch_events() -> usize {
    500
}
fn default_batch_bytes() -> usize {
    1 << 20
}
fn d1s() -> Duration {
    Duration::from_secs(1)
}

fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

/// Splunk HEC settings.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HecConfig {
    /// Wait for indexer acknowledgement of every batch (the HEC token must have it on).
    #[serde(default)]
    pub ack: bool,
    /// How long to poll for an acknowledgement before sending the batch again (default 60s).
    #[serde(default, deserialize_with = "opt_duration")]
    pub ack_timeout: Option<Duration>,
    /// The `X-Splunk-Request-Channel` (a UUID); default: a new one per start.
    #[serde(default)]
    pub channel: Option<String>,
    /// Envelope `source` (default `egress-gateway`).
    #[serde(default)]
    pub source: Option<String>,
    /// Envelope `sourcetype` (default `egress:audit`).
    #[serde(default)]
    pub sourcetype: Option<String>,
}

/// The settings of an HTTP sink, checked, with defaults applied and the token read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpSettings {
    /// Endpoint.
    pub url: String,
    /// Preset.
    pub preset: HttpPreset,
    /// Credential.
    pub token: Option<String>,
    /// Gzip bodies.
    pub gzip: bool,
    /// Events per request.
    pub max_events: usize,
    /// Bytes per request.
    pub max_bytes: usize,
    /// Longest wait for a fuller batch.
    pub max_age: Duration,
    /// Request timeout.
    pub timeout: Duration,
    /// TLS.
    pub tls: Option<SinkTls>,
    /// Index.
    pub index: Option<String>,
    /// HEC acknowledgement.
    pub ack: bool,
    /// HEC ack timeout.
    pub ack_timeout: Duration,
    /// HEC channel.
    pub channel: Option<String>,
    /// HEC source.
    pub source: Option<String>,
    /// HEC sourcetype.
    pub sourcetype: Option<String>,
}

impl HttpSinkConfig {
    /// The settings the sink runs with (reads `tokenFile`).
    pub fn settings(&self) -> anyhow::Result<HttpSettings> {
        let token = match (&self.token, &self.token_file) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(f)) => Some(
                std::fs::read_to_string(f)
                    .map_err(|e| anyhow::anyhow!("tokenFile {}: {e}", f.display()))?
                    .trim()
                    .to_string(),
            ),
            (None, None) => None,
        };
        let hec = self.hec.clone().unwrap_or_default();
        let channel = match (&hec.channel, hec.ack && self.preset == HttpPreset::SplunkHec) {
            (Some(c), _) => Some(c.clone()),
            (None, true) => Some(uuid::Uuid::new_v4().to_string()),
            (None, false) => None,
        };
        Ok(HttpSettings {
            url: self.url.clone(),
            preset: self.preset,
            token,
            gzip: self.gzip,
            max_events: self.batch.max_events,
            max_bytes: self.batch.max_bytes,
            max_age: self.batch.max_age,
            timeout: self.timeout,
            tls: self.tls.clone(),
            index: self.index.clone(),
            ack: hec.ack,
            ack_timeout: hec.ack_timeout.unwrap_or(Duration::from_secs(60)),
            channel,
            source: hec.source,
            sourcetype: hec.sourcetype,
        })
    }

    fn check(&self, out: &mut Vec<(&'static str, String)>) {
        let u = &self.url;
        if !(u.starts_with("https://") || u.starts_with("http://")) || u.parse::<http::Uri>().is_err() {
            out.push((".url", format!("{u:?} is not an http(s) URL")));
        }
        if self.token.is_some() && self.token_file.is_some() {
            out.push((".token", "token or tokenFile, not both".into()));
        }
        if self.preset == HttpPreset::SplunkHec && self.token.is_none() && self.token_file.is_none() {
            out.push((".tokenFile", "Splunk HEC needs a token".into()));
        }
        if self.hec.is_some() && self.preset != HttpPreset::SplunkHec {
            out.push((".hec", "only for preset splunk_hec".into()));
        }
        if self.batch.max_events == 0 || self.batch.max_events > 100_000 {
            out.push((".batch.maxEvents", "1 to 100000".into()));
        }
        if self.batch.max_bytes < 8192 {
            out.push((".batch.maxBytes", "at least 8192".into()));
        }
        if let Some(t) = &self.tls {
            t.check(out);
        }
    }
}

/// Syslog transport.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum SyslogTransport {
    /// TCP, octet-counting framing (RFC 6587).
    #[default]
    Tcp,
    /// TLS (RFC 5425).
    Tls,
    /// UDP (RFC 5426): one datagram per event, no delivery guarantee.
    Udp,
}

/// TLS client settings of a sink.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SinkTls {
    /// PEM bundle of the CA certificates that sign the collector's certificate.
    pub ca: PathBuf,
    /// Client certificate chain (PEM), for collectors that require mutual TLS.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// Name to verify the collector's certificate against (default: the host of `address`).
    #[serde(default)]
    pub server_name: Option<String>,
}

impl SinkTls {
    fn check(&self, out: &mut Vec<(&'static str, String)>) {
        if self.cert.is_some() != self.key.is_some() {
            out.push((".tls", "cert and key go together".into()));
        }
    }
}

impl SyslogSinkConfig {
    fn check(&self, out: &mut Vec<(&'static str, String)>) {
        let a = &self.address;
        if a.rsplit_once(':').is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err()) {
            out.push((".address", format!("{a:?} is not host:port")));
        }
        match (&self.tls, self.transport) {
            (None, SyslogTransport::Tls) => out.push((".tls", "required for transport tls (at least `ca`)".into())),
            (Some(_), SyslogTransport::Tcp | SyslogTransport::Udp) => {
                out.push((".tls", "only for transport tls".into()))
            }
            (Some(t), SyslogTransport::Tls) => t.check(out),
            (None, _) => {}
        }
        if self.facility > 23 {
            out.push((".facility", "0 to 23".into()));
        }
    }
}

impl FileSinkConfig {
    fn check(&self, out: &mut Vec<(&'static str, String)>) {
        if self.max_bytes.is_some_and(|b| b < 4096) {
            out.push((".maxBytes", "at least 4096".into()));
        }
        if self.max_files == 0 || self.max_files > 1000 {
            out.push((".maxFiles", "1 to 1000".into()));
        }
    }
}

impl SinkConfig {
    /// The `type`: `stdout`, `file`, `syslog` or `http`.
    pub fn kind(&self) -> &'static str {
        match self {
            SinkConfig::Stdout(_) => "stdout",
            SinkConfig::File(_) => "file",
            SinkConfig::Syslog(_) => "syslog",
            SinkConfig::Http(_) => "http",
        }
    }

    /// The serialisation of its events.
    pub fn format(&self) -> AuditFormat {
        match self {
            SinkConfig::Stdout(s) => s.format,
            SinkConfig::File(s) => s.format,
            SinkConfig::Syslog(s) => s.format,
            SinkConfig::Http(s) => s.format,
        }
    }

    /// The sink's name: `name`, or `<type>-<index>`.
    pub fn name_or_default(&self, index: usize) -> String {
        let name = match self {
            SinkConfig::Stdout(s) => &s.name,
            SinkConfig::File(s) => &s.name,
            SinkConfig::Syslog(s) => &s.name,
            SinkConfig::Http(s) => &s.name,
        };
        name.clone().unwrap_or_else(|| format!("{}-{index}", self.kind()))
    }

    /// The sink's own checks, each as (field path below the sink, problem). What its type
    /// does not take was refused when it was read.
    pub fn check(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        match self {
            SinkConfig::Stdout(_) => {}
            SinkConfig::File(s) => s.check(&mut out),
            SinkConfig::Syslog(s) => s.check(&mut out),
            SinkConfig::Http(s) => s.check(&mut out),
        }
        out
    }
}

/// Event serialisation.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum AuditFormat {
    /// egress.v1 JSON lines.
    #[default]
    Json,
    /// OCSF 1.5.0 (HTTP Activity, Network Activity; security_control and network_proxy profiles).
    Ocsf,
    /// Elastic Common Schema.
    Ecs,
}

/// Timeouts and sizes.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Limits {
    /// Upstream TCP connect timeout (all addresses together).
    #[serde(deserialize_with = "duration", default = "d5s")]
    pub connect_timeout: Duration,
    /// A tunnel or keep-alive connection with no traffic either way for this long is closed.
    #[serde(deserialize_with = "duration", default = "d300s")]
    pub idle_timeout: Duration,
    /// Time a client has to send a complete request head (HTTP) or handshake (SOCKS5).
    #[serde(deserialize_with = "duration", default = "d10s")]
    pub header_timeout: Duration,
    /// Largest request head accepted (HTTP); larger gets 431.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// TCP_NODELAY on tunnel sockets (CONNECT, SOCKS5, transparent). On by default: the relay
    /// already sends whatever has arrived in one call, and Nagle on top of that holds every write
    /// smaller than the MSS until the previous one is acknowledged, which a delayed ACK on the
    /// client can stretch to 40 ms (measured: 16% of a TLS download spent stalled on loopback).
    /// The endpoints' own Nagle settings still apply to what they send.
    #[serde(default = "yes")]
    pub tunnel_no_delay: bool,
    /// Read batching on bulk tunnel directions: once data has arrived back to back for 1 MiB,
    /// the relay asks the kernel to wake it per 256 KiB queued instead of per segment, and holds
    /// a partial batch at most this long before it moves what it has and stops batching until
    /// the next such run. `0s` turns it off. Measured on a loopback HTTPS download: about 40%
    /// of the gateway's CPU per GiB.
    #[serde(deserialize_with = "duration", default = "d1ms")]
    pub tunnel_coalesce: Duration,
    /// Client connections open at once on this replica, all fronts together; beyond it new
    /// ones are refused (HTTP 503, SOCKS5 0x01, transparent: reset) and audited as
    /// `connection_limit`.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Connections one client address may have open at once on this replica (on the
    /// transparent front, the Pod's address from the PROXY header, not the relay's).
    #[serde(default = "default_max_connections_per_client")]
    pub max_connections_per_client: usize,
    /// Tunnels (CONNECT, SOCKS5, transparent connections) one client address may have open at
    /// once on this replica: at most its connections, lower to keep long-lived opaque tunnels
    /// from taking all of a client's share.
    #[serde(default = "default_max_connections_per_client")]
    pub max_tunnels_per_client: usize,
}

fn default_max_connections() -> usize {
    10_000
}
fn default_max_connections_per_client() -> usize {
    1_000
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connect_timeout: d5s(),
            idle_timeout: d300s(),
            header_timeout: d10s(),
            max_header_bytes: default_max_header_bytes(),
            tunnel_no_delay: true,
            tunnel_coalesce: d1ms(),
            max_connections: default_max_connections(),
            max_connections_per_client: default_max_connections_per_client(),
            max_tunnels_per_client: default_max_connections_per_client(),
        }
    }
}

/// Graceful shutdown.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Shutdown {
    /// After SIGTERM, how long open connections may finish before they are closed.
    #[serde(deserialize_with = "duration", default = "d30s")]
    pub grace: Duration,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown { grace: d30s() }
    }
}

fn d1ms() -> Duration {
    egress_netio::DEFAULT_HOLD
}
fn d5s() -> Duration {
    Duration::from_secs(5)
}
fn d10s() -> Duration {
    Duration::from_secs(10)
}
fn d30s() -> Duration {
    Duration::from_secs(30)
}
fn d300s() -> Duration {
    Duration::from_secs(300)
}
fn default_max_header_bytes() -> usize {
    65536
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s)
        .map_err(|e| serde::de::Error::custom(format!("{s:?} is not a duration like 5s or 2m: {e}")))
}

/// Where a policy document came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The file.
    pub file: PathBuf,
    /// Zero-based document index in the file (or in the inline `policies` list).
    pub document: usize,
    /// Whether it is inline in the config file.
    pub inline: bool,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.inline {
            write!(f, "{}: policies[{}]", self.file.display(), self.document)
        } else {
            write!(f, "{}: document {}", self.file.display(), self.document + 1)
        }
    }
}

/// A configuration with its policy documents, all validated.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The config file's path.
    pub path: PathBuf,
    /// The parsed config.
    pub config: Config,
    /// Every policy document with its origin.
    pub policies: Vec<(Origin, AnyPolicy)>,
    /// The relay keys of `transparent.relayKeyFile` (empty without it).
    pub relay_keys: Vec<egress_netio::proxy::RelayKey>,
    /// The token issuer's keys (`identity.tokens.jwksFile`).
    pub(crate) token_keys: Option<std::sync::Arc<crate::token::KeySet>>,
    /// The HTTPS front's TLS configuration (`https`), read from its files.
    pub(crate) https: Option<std::sync::Arc<rustls::ServerConfig>>,
}

/// Every error found while loading, each naming file, document and field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Loads and validates the config file and every policy document it names. All errors are
/// collected, not just the first.
pub fn load(path: &Path) -> Result<Loaded, ConfigErrors> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors(vec![format!("{file}: {e}")]))?;
    let mut errors = Vec::new();
    let config: Config = match serde_yaml_ng::from_str(&text) {
        Ok(c) => c,
        Err(e) => {
            // A sink entry that cannot be read: report every such entry, and check the rest of
            // the file without them, so that one run names every problem.
            errors = sink_problems(&text, &file);
            let mut doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap_or_default();
            if let Some(audit) = doc.get_mut("audit").and_then(|a| a.as_mapping_mut()) {
                audit.remove("sinks");
            }
            match serde_yaml_ng::from_value(doc) {
                Ok(c) if !errors.is_empty() => c,
                _ => return Err(ConfigErrors(vec![format!("{file}: {e}")])),
            }
        }
    };
    validate_config(&config, &file, &mut errors);
    let base = path.parent().unwrap_or(Path::new("."));
    let mut policies = Vec::new();
    for (i, v) in config.policies.iter().enumerate() {
        let origin = Origin { file: path.to_path_buf(), document: i, inline: true };
        read_document(v.clone(), origin, None, &mut policies, &mut errors);
    }
    for p in &config.policy_files {
        let p = relative_to(base, p);
        for f in policy_paths(&p, &mut errors) {
            read_policy_file(&f, &mut policies, &mut errors);
        }
    }
    check_policy_set(&config, &policies, &mut errors);
    if errors.is_empty() {
        Ok(Loaded { path: path.to_path_buf(), config, policies, relay_keys: Vec::new(), token_keys: None, https: None })
    } else {
        Err(ConfigErrors(errors))
    }
}

/// Reads each `audit.sinks` entry on its own, so that its problems name the entry and its line
/// (the error of the whole file names only the list), every entry's, not the first.
fn sink_problems(text: &str, file: &str) -> Vec<String> {
    use egress_crds::PathSegment::{Index, Key};
    let Ok(doc) = serde_yaml_ng::from_str::<serde_yaml_ng::Value>(text) else {
        return Vec::new();
    };
    let Some(list) = doc.get("audit").and_then(|a| a.get("sinks")).and_then(|s| s.as_sequence()) else {
        return Vec::new();
    };
    list.iter()
        .enumerate()
        .filter_map(|(i, v)| {
            let e = serde_yaml_ng::from_value::<TaggedSink>(v.clone()).err()?;
            let path = [Key("audit".into()), Key("sinks".into()), Index(i)];
            Some(match line_of(text, 0, &path) {
                Some(line) => format!("{file}, line {line}: audit.sinks[{i}]: {e}"),
                None => format!("{file}: audit.sinks[{i}]: {e}"),
            })
        })
        .collect()
}

/// A path of the config file: absolute as it is, relative to the config file's folder `base`.
pub fn relative_to(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() { p.to_path_buf() } else { base.join(p) }
}

/// [`load`], then the secrets the configuration names (the relays' keys): what `run` and every
/// reload use. `validate` checks the file alone, so that a config rendered elsewhere (CI, a
/// chart) validates without the Secrets it will find mounted.
pub fn load_with_secrets(path: &Path) -> Result<Loaded, ConfigErrors> {
    let mut loaded = load(path)?;
    if let Some(k) = &loaded.config.transparent.relay_key_file {
        let base = path.parent().unwrap_or(Path::new("."));
        loaded.relay_keys = egress_netio::proxy::RelayKey::load(&relative_to(base, k))
            .map_err(|e| ConfigErrors(vec![format!("{}: transparent.relayKeyFile: {e}", path.display())]))?;
    }
    if let Some(f) = loaded.config.identity.tokens.as_ref().and_then(|t| t.jwks_file.as_ref()) {
        let base = path.parent().unwrap_or(Path::new("."));
        let file = relative_to(base, f);
        let keys = std::fs::read(&file)
            .map_err(|e| e.to_string())
            .and_then(|doc| crate::token::KeySet::from_jwks(&doc))
            .map_err(|e| {
                ConfigErrors(vec![format!("{}: identity.tokens.jwksFile: {}: {e}", path.display(), file.display())])
            })?;
        loaded.token_keys = Some(std::sync::Arc::new(keys));
    }
    let h = &loaded.config.https;
    if loaded.config.listen.https.is_some()
        && let (Some(cert), Some(key)) = (&h.cert, &h.key)
    {
        use crate::certs::ClientAuth;
        let base = path.parent().unwrap_or(Path::new("."));
        let auth = match h.client_cert_mode() {
            ClientCertMode::None => ClientAuth::None,
            ClientCertMode::Optional => ClientAuth::Optional,
            ClientCertMode::Required => ClientAuth::Required,
        };
        let ca = h.client_ca.as_ref().map(|c| relative_to(base, c));
        let config =
            crate::certs::server_config(&relative_to(base, cert), &relative_to(base, key), ca.as_deref(), auth)
                .map_err(|e| ConfigErrors(vec![format!("{}: https: {e}", path.display())]))?;
        loaded.https = Some(config);
    }
    Ok(loaded)
}

fn validate_config(c: &Config, file: &str, errors: &mut Vec<String>) {
    let mut err = |field: &str, m: String| errors.push(format!("{file}: {field}: {m}"));
    for (name, addrs) in &c.egress_addresses {
        if name != "default" && addrs.is_empty() {
            err(&format!("egressAddresses.{name}"), "a pool needs at least one source address".into());
        }
        for (i, a) in addrs.iter().enumerate() {
            if a.is_unspecified() || a.is_multicast() {
                err(&format!("egressAddresses.{name}[{i}]"), format!("{a} cannot be a source address"));
            }
        }
    }
    for (i, s) in c.audit.sinks.iter().enumerate() {
        for (field, m) in s.check() {
            err(&format!("audit.sinks[{i}]{field}"), m);
        }
    }
    if let Some(t) = &c.identity.tokens {
        if t.issuer.is_empty() {
            err(
                "identity.tokens.issuer",
                "the issuer tokens must name (the API server's --service-account-issuer)".into(),
            );
        }
        if t.audiences.is_empty() || t.audiences.iter().any(String::is_empty) {
            err("identity.tokens.audiences", "at least one, none empty".into());
        }
        if t.jwks_file.is_none() && !c.kubernetes.enabled {
            err(
                "identity.tokens.jwksFile",
                "required outside Kubernetes mode: the issuer's keys (kubectl get --raw /openid/v1/jwks); in Kubernetes mode they are fetched from the API server when it is not set".into(),
            );
        }
    }
    if let Some(r) = &c.kubernetes.rate_limit_replicas
        && r.match_labels.is_empty()
    {
        err(
            "kubernetes.rateLimitReplicas.matchLabels",
            "at least one label (the gateway Deployment's selector)".into(),
        );
    }
    if c.audit.sinks.is_empty() {
        err("audit.sinks", "at least one sink is required: every decision is audited".into());
    }
    let mut names = std::collections::BTreeSet::new();
    for (i, s) in c.audit.sinks.iter().enumerate() {
        let name = s.name_or_default(i);
        if name.is_empty()
            || name.len() > 64
            || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
            || name.starts_with('.')
        {
            err(&format!("audit.sinks[{i}].name"), format!("{name:?}: 1-64 characters of [A-Za-z0-9._-]"));
        } else if !names.insert(name.clone()) {
            err(&format!("audit.sinks[{i}].name"), format!("{name:?} is used by another sink"));
        }
    }
    if c.audit.spool.is_none()
        && let Some(i) = c.audit.sinks.iter().position(|s| matches!(s, SinkConfig::Http(_)))
    {
        err(&format!("audit.sinks[{i}]"), "type http needs audit.spool (batches and retries are sent from it)".into());
    }
    if let Some(cp) = &c.audit.checkpoint {
        if cp.every == 0 {
            err("audit.checkpoint.every", "at least 1".into());
        }
        if cp.interval.is_zero() {
            err("audit.checkpoint.interval", "must be positive".into());
        }
    }
    if let Some(sp) = &c.audit.spool {
        if sp.segment_bytes < 4096 {
            err("audit.spool.segmentBytes", "at least 4096".into());
        }
        if sp.max_bytes < sp.segment_bytes.saturating_mul(4) {
            err("audit.spool.maxBytes", "at least 4 segments (4 x segmentBytes)".into());
        }
    }
    for (i, u) in c.socks5.users.iter().enumerate() {
        if u.username.is_empty() || u.username.len() > 255 {
            err(&format!("socks5.users[{i}].username"), "must be 1-255 bytes".into());
        }
        if u.password.is_empty() || u.password.len() > 255 {
            err(&format!("socks5.users[{i}].password"), "must be 1-255 bytes".into());
        }
        if u.namespace.is_some() != u.service_account.is_some() {
            err(&format!("socks5.users[{i}]"), "namespace and serviceAccount name an identity together".into());
        }
        if u.namespace.is_none() && !u.labels.is_empty() {
            err(&format!("socks5.users[{i}].labels"), "only with an identity (namespace and serviceAccount)".into());
        }
        if c.socks5.users[..i].iter().any(|o| o.username == u.username) {
            err(&format!("socks5.users[{i}].username"), format!("{:?} is listed twice", u.username));
        }
    }
    for (field, n) in [
        ("limits.maxConnections", c.limits.max_connections),
        ("limits.maxConnectionsPerClient", c.limits.max_connections_per_client),
        ("limits.maxTunnelsPerClient", c.limits.max_tunnels_per_client),
    ] {
        if n == 0 {
            err(field, "must be at least 1".into());
        }
    }
    if c.limits.max_header_bytes < 8192 {
        err("limits.maxHeaderBytes", "must be at least 8192".into());
    }
    for (name, d) in [
        ("resolver.timeout", c.resolver.timeout),
        ("limits.connectTimeout", c.limits.connect_timeout),
        ("limits.idleTimeout", c.limits.idle_timeout),
        ("limits.headerTimeout", c.limits.header_timeout),
    ] {
        if d.is_zero() {
            err(name, "must be greater than zero".into());
        }
    }
    if let Err(e) = egress_netio::check_hold(c.limits.tunnel_coalesce) {
        err("limits.tunnelCoalesce", e);
    }
    for (i, e) in c.clients.iter().enumerate() {
        if let Some(cidr) = e.cidr
            && cidr.trunc() != cidr
        {
            err(&format!("clients[{i}].cidr"), format!("{cidr} has host bits set; did you mean {}?", cidr.trunc()));
        }
        match &e.certificate {
            None if e.cidr.is_none() && e.service_account.is_none() => err(
                &format!("clients[{i}]"),
                "a row needs a cidr, a certificate or a serviceAccount (for token clients) to stand for anyone".into(),
            ),
            Some(m) if m.common_name.is_some() == m.san.is_some() => {
                err(&format!("clients[{i}].certificate"), "set exactly one of commonName or san".into())
            }
            Some(m) if m.common_name.as_deref() == Some("") || m.san.as_deref() == Some("") => {
                err(&format!("clients[{i}].certificate"), "must not be empty".into())
            }
            _ => {}
        }
        if e.namespace.is_empty() {
            err(&format!("clients[{i}].namespace"), "must not be empty".into());
        }
    }
    if c.listen.https.is_some() {
        if c.https.cert.is_none() || c.https.key.is_none() {
            err("https", "listen.https needs https.cert and https.key (PEM files)".into());
        }
        match (c.https.client_cert_mode(), &c.https.client_ca) {
            (ClientCertMode::Optional | ClientCertMode::Required, None) => {
                err("https.clientCa", "client certificates need the CA they must chain to".into())
            }
            (ClientCertMode::None, Some(_)) => err(
                "https.clientCert",
                "None, yet https.clientCa is set: say Optional or Required, or drop clientCa".into(),
            ),
            _ => {}
        }
    }
    if c.listen.transparent.is_some() && c.transparent.trusted_relays.is_empty() {
        err("transparent.trustedRelays", "listen.transparent needs the node-redirector relay addresses here".into());
    }
    if c.listen.transparent.is_some() && c.transparent.relay_key_file.is_none() {
        err(
            "transparent.relayKeyFile",
            "listen.transparent needs the relays' key file (the relay's address alone is no proof of the relay; \
             create one with `openssl rand -base64 32`)"
                .into(),
        );
    }
    if c.transparent.relay_max_skew < Duration::from_secs(1) {
        err("transparent.relayMaxSkew", "must be at least 1s".into());
    }
    if c.transparent.first_byte_timeout.is_zero() {
        err("transparent.firstByteTimeout", "must be greater than zero".into());
    }
    let listeners = [c.listen.http, c.listen.socks5, c.listen.admin, c.listen.transparent];
    let set: Vec<_> = listeners.iter().flatten().collect();
    for (i, a) in set.iter().enumerate() {
        if set[..i].contains(a) && a.port() != 0 {
            err("listen", format!("{a} is used by two listeners"));
        }
    }
}

fn policy_paths(p: &Path, errors: &mut Vec<String>) -> Vec<PathBuf> {
    if p.is_dir() {
        match std::fs::read_dir(p) {
            Ok(rd) => {
                let mut files: Vec<PathBuf> = rd
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|f| {
                        f.is_file() && matches!(f.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json"))
                    })
                    .collect();
                files.sort();
                files
            }
            Err(e) => {
                errors.push(format!("{}: {e}", p.display()));
                Vec::new()
            }
        }
    } else {
        vec![p.to_path_buf()]
    }
}

fn read_policy_file(f: &Path, out: &mut Vec<(Origin, AnyPolicy)>, errors: &mut Vec<String>) {
    let text = match std::fs::read_to_string(f) {
        Ok(t) => t,
        Err(e) => {
            errors.push(format!("{}: {e}", f.display()));
            return;
        }
    };
    let starts = document_starts(&text);
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
        let origin = Origin { file: f.to_path_buf(), document: i, inline: false };
        match serde_json::Value::deserialize(doc) {
            Ok(serde_json::Value::Null) => {} // empty document (e.g. a trailing `---`)
            Ok(v) => {
                let at = starts.get(i).map(|start| (text.as_str(), *start));
                read_document(v, origin, at, out, errors)
            }
            Err(e) => {
                errors.push(format!("{origin}: {e}"));
                return; // the YAML stream is broken past this point
            }
        }
    }
}

/// The first line (0-based) of each YAML document of `text`: documents are separated by `---`
/// lines; a `---` before anything but comments opens the first one.
fn document_starts(text: &str) -> Vec<usize> {
    let mut starts = vec![0];
    let mut content = false;
    for (n, line) in text.lines().enumerate() {
        if line.trim_end() == "---" || line.starts_with("--- ") {
            if content {
                starts.push(n + 1);
            } else {
                starts[0] = n + 1;
            }
            content = false;
        } else if !line.trim().is_empty() && !line.trim_start().starts_with('#') {
            content = true;
        }
    }
    starts
}

/// The line (1-based) of the field at `path` in the document starting at line `start` of
/// `text`: each key is looked for after the previous one, each list item counted among the
/// `- ` lines under its key (a flow list `[...]` stays on its key's line). A best effort for the
/// message: `None` when the walk loses its way.
fn line_of(text: &str, start: usize, path: &[egress_crds::PathSegment]) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut at = start;
    for seg in path {
        match seg {
            egress_crds::PathSegment::Key(k) => {
                let found = (at..lines.len()).find(|&n| {
                    let l = lines[n];
                    l.match_indices(k.as_str()).any(|(i, _)| {
                        let before = l[..i].chars().last();
                        let after = l[i + k.len()..].trim_start();
                        matches!(before, None | Some(' ' | '{' | ',' | '-' | '"' | '\'')) && {
                            let after = after.trim_start_matches(['"', '\'']);
                            after.starts_with(':')
                        }
                    })
                })?;
                at = found;
            }
            egress_crds::PathSegment::Index(i) => {
                let key_line = lines.get(at)?;
                if key_line.contains('[') {
                    continue; // a flow list: its items are on this line
                }
                let key_indent = indent(key_line);
                // The list's block: lines indented past the key, or `- ` items at its indentation.
                let items: Vec<usize> = (at + 1..lines.len())
                    .take_while(|&n| {
                        let l = lines[n];
                        l.trim().is_empty()
                            || indent(l) > key_indent
                            || (l.trim_start().starts_with("- ") && indent(l) >= key_indent)
                    })
                    .filter(|&n| lines[n].trim_start().starts_with('-'))
                    .collect();
                let item_indent = items.first().map(|&n| indent(lines[n]))?;
                // The item's line; its first key may share it (`- name: x`).
                at = *items.iter().filter(|&&n| indent(lines[n]) == item_indent).nth(*i)?;
            }
        }
    }
    Some(at + 1)
}

fn read_document(
    v: serde_json::Value,
    origin: Origin,
    at: Option<(&str, usize)>,
    out: &mut Vec<(Origin, AnyPolicy)>,
    errors: &mut Vec<String>,
) {
    match AnyPolicy::from_value(v) {
        Ok(p) => {
            let problems = p.validate();
            if problems.is_empty() {
                out.push((origin, p));
            } else {
                for e in problems {
                    errors.push(format!("{origin} ({}): {e}", p.key()));
                }
            }
        }
        Err(egress_crds::DocumentError::Decode(problems)) => {
            for p in problems {
                match at.and_then(|(text, start)| line_of(text, start, &p.path)) {
                    Some(line) => errors.push(format!("{origin}, line {line}: {p}")),
                    None => errors.push(format!("{origin}: {p}")),
                }
            }
        }
        Err(e) => errors.push(format!("{origin}: {e}")),
    }
}

fn check_policy_set(c: &Config, policies: &[(Origin, AnyPolicy)], errors: &mut Vec<String>) {
    let mut seen: BTreeMap<(bool, String), &Origin> = BTreeMap::new();
    for (origin, p) in policies {
        let key = (matches!(p, AnyPolicy::Cluster(_)), p.key());
        if let Some(first) = seen.get(&key) {
            errors.push(format!("{origin} ({}): metadata.name: duplicate of {first}", p.key()));
        } else {
            seen.insert(key, origin);
        }
        let pool = match p {
            AnyPolicy::Namespaced(p) => p.spec.egress_address.as_deref(),
            AnyPolicy::Cluster(p) => p.spec.egress_address.as_deref(),
        };
        if let Some(pool) = pool
            && pool != "default"
            && !c.egress_addresses.contains_key(pool)
        {
            errors.push(format!(
                "{origin} ({}): spec.egressAddress: pool {pool:?} is not configured in egressAddresses",
                p.key()
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Field paths are found on their lines, in block and flow style, past the first list item.
    #[test]
    fn line_of_finds_fields_by_path() {
        use egress_crds::PathSegment::{Index as I, Key as K};
        let text = "# comment\n---\napiVersion: x\nspec:\n  rules:\n    - name: a\n      to: [{domain: a.com}]\n    - name: b\n      to:\n        - domain: b.com\n        - domian: c.com\n---\nspec: {podSelectr: {}}\n";
        let starts = document_starts(text);
        assert_eq!(starts, vec![2, 12]);
        let k = |s: &str| K(s.to_string());
        assert_eq!(line_of(text, starts[0], &[k("spec"), k("rules"), I(1), k("to"), I(1), k("domian")]), Some(11));
        assert_eq!(line_of(text, starts[0], &[k("spec"), k("rules"), I(0), k("to"), I(0), k("domain")]), Some(7));
        assert_eq!(line_of(text, starts[0], &[k("spec"), k("rules"), I(1), k("name")]), Some(8));
        assert_eq!(line_of(text, starts[1], &[k("spec"), k("podSelectr")]), Some(13));
        assert_eq!(line_of(text, starts[0], &[k("nowhere")]), None);
    }

    /// Every unknown field of a document is reported, each with its line and path, not only the
    /// first; and the documents after it are read too.
    #[test]
    fn rejects_every_typo_with_file_document_line_and_path() {
        let dir = tempfile::tempdir().unwrap();
        let policies = "apiVersion: egress.dev/v1alpha1\nkind: EgressPolicy\nmetadata: {name: a, namespace: shop}\nspec:\n  podSelector: {}\n  rules:\n    - name: r\n      too: [{domain: x.com}]\n      prots: [{port: 443}]\n---\napiVersion: egress.dev/v1alpha1\nkind: EgressPolicy\nmetadata: {name: b, namespace: shop}\nspec:\n  podSelector: {}\n  rules: [{name: r, to: [{domian: y.com}]}]\n";
        write(dir.path(), "p.yaml", policies);
        let cfg = write(dir.path(), "gw.yaml", "policyFiles: [p.yaml]\n");
        let errs = load(&cfg).unwrap_err().0;
        let p = dir.path().join("p.yaml").display().to_string();
        assert!(
            errs.iter()
                .any(|e| e.starts_with(&format!("{p}: document 1, line 8: spec.rules[0].too: unknown field `too`"))),
            "{errs:#?}"
        );
        assert!(errs.iter().any(|e| e.starts_with(&format!("{p}: document 1, line 9: spec.rules[0].prots: unknown field `prots`"))), "{errs:#?}");
        assert!(
            errs.iter().any(|e| e
                .starts_with(&format!("{p}: document 2, line 16: spec.rules[0].to[0].domian: unknown field `domian`"))),
            "{errs:#?}"
        );
    }

    /// The token keys come from a file, except in Kubernetes mode, where the API server has them.
    #[test]
    fn rejects_tokens_without_keys_outside_kubernetes_mode() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = "identity: {tokens: {issuer: https://kubernetes.default.svc}}\n";
        let cfg = write(dir.path(), "gw.yaml", tokens);
        let errs = load(&cfg).unwrap_err().0;
        assert!(
            errs.iter().any(|e| e.contains("identity.tokens.jwksFile: required outside Kubernetes mode")),
            "{errs:#?}"
        );
        let cfg = write(dir.path(), "kube.yaml", &format!("kubernetes: {{enabled: true}}\n{tokens}"));
        let loaded = load(&cfg).unwrap();
        assert!(loaded.config.identity.tokens.is_some_and(|t| t.jwks_file.is_none()));
    }

    #[test]
    fn rejects_https_and_certificate_rows_that_cannot_work() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            ("listen: {https: 127.0.0.1:0}\n", "https: listen.https needs https.cert and https.key"),
            (
                "listen: {https: 127.0.0.1:0}\nhttps: {cert: c.pem, key: k.pem, clientCert: Required}\n",
                "https.clientCa: client certificates need the CA",
            ),
            (
                "listen: {https: 127.0.0.1:0}\nhttps: {cert: c.pem, key: k.pem, clientCa: ca.pem, clientCert: None}\n",
                "https.clientCert: None, yet https.clientCa is set",
            ),
            (
                "clients: [{namespace: a, name: b}]\n",
                "clients[0]: a row needs a cidr, a certificate or a serviceAccount",
            ),
            (
                "clients: [{namespace: a, name: b, certificate: {commonName: x, san: y}}]\n",
                "clients[0].certificate: set exactly one of commonName or san",
            ),
        ];
        for (i, (text, expected)) in cases.iter().enumerate() {
            let cfg = write(dir.path(), &format!("gw{i}.yaml"), text);
            let errs = load(&cfg).unwrap_err().0;
            assert!(errs.iter().any(|e| e.contains(expected)), "{text}: {errs:#?}");
        }
        // With clientCa, clientCert defaults to Required.
        let h = HttpsConfig { client_ca: Some("ca.pem".into()), ..Default::default() };
        assert_eq!(h.client_cert_mode(), ClientCertMode::Required);
        assert_eq!(HttpsConfig::default().client_cert_mode(), ClientCertMode::None);
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn errors_name_file_document_and_field() {
        let dir = std::env::temp_dir().join(format!("egw-config-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("pol")).unwrap();
        write(
            &dir.join("pol"),
            "a.yaml",
            "apiVersion: egress.dev/v1alpha1\nkind: EgressPolicy\nmetadata: {name: ok, namespace: ns}\nspec: {podSelector: {}}\n---\napiVersion: egress.dev/v1alpha1\nkind: EgressPolicy\nmetadata: {name: bad, namespace: ns}\nspec:\n  podSelector: {}\n  rules: [{to: [{domain: 'a.*.b'}]}]\n---\napiVersion: egress.dev/v1alpha1\nkind: EgressPolicy\nmetadata: {name: pool, namespace: ns}\nspec: {podSelector: {}, egressAddress: nowhere}\n",
        );
        let cfg = write(
            &dir,
            "gw.yaml",
            "policyFiles: [pol]\nlimits: {connectTimeout: 0s, tunnelCoalesce: 1s}\naudit: {sinks: [{type: file}]}\n",
        );
        let errs = load(&cfg).unwrap_err().0;
        let f = cfg.display().to_string();
        let pf = dir.join("pol/a.yaml").display().to_string();
        assert!(errs.contains(&format!("{f}, line 3: audit.sinks[0]: missing field `path`")), "{errs:#?}");
        assert!(errs.contains(&format!("{f}: limits.connectTimeout: must be greater than zero")), "{errs:#?}");
        assert!(
            errs.iter().any(|e| e.starts_with(&format!("{f}: limits.tunnelCoalesce: 1s is longer than 100ms"))),
            "{errs:#?}"
        );
        assert!(
            errs.iter().any(|e| e.starts_with(&format!("{pf}: document 2 (ns/bad): spec.rules[0].to[0].domain:"))),
            "{errs:#?}"
        );
        assert!(
            errs.iter().any(|e| e.starts_with(&format!("{pf}: document 3 (ns/pool): spec.egressAddress:"))),
            "{errs:#?}"
        );
        let cfg = write(&dir, "gw2.yaml", "listen: {htp: 1.2.3.4:5}\n");
        let errs = load(&cfg).unwrap_err().0;
        assert!(errs[0].contains("unknown field `htp`"), "{errs:#?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Each sink kind takes its own fields: another kind's field is an unknown field, reported
    /// with the entry's index and line, every entry's, and the rest of the file is still checked.
    #[test]
    fn sink_entries_are_read_and_checked_by_their_type() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = write(
            dir.path(),
            "gw.yaml",
            "limits: {connectTimeout: 0s}\naudit:\n  sinks:\n    - type: stdout\n    - type: file\n      path: /tmp/a\n      url: https://x\n    - type: syslog\n      address: c:514\n      facility: 30\n    - {type: http, url: 'https://c/_bulk'}\n    - type: kafka\n",
        );
        let f = cfg.display().to_string();
        let errs = load(&cfg).unwrap_err().0;
        let has = |prefix: &str| errs.iter().any(|e| e.starts_with(&format!("{f}{prefix}")));
        assert!(has(", line 5: audit.sinks[1]: unknown field `url`, expected one of"), "{errs:#?}");
        assert!(has(", line 11: audit.sinks[3]: missing field `preset`"), "{errs:#?}");
        assert!(has(", line 12: audit.sinks[4]: unknown variant `kafka`"), "{errs:#?}");
        assert!(has(": limits.connectTimeout: must be greater than zero"), "{errs:#?}");
        assert_eq!(errs.len(), 4, "{errs:#?}");
        // Values are checked per kind once every entry reads.
        let cfg = write(
            dir.path(),
            "gw2.yaml",
            "audit:\n  sinks:\n    - {type: syslog, address: 'c:514', facility: 30, transport: udp, tls: {ca: /ca.pem}}\n    - {type: file, path: /tmp/a, maxFiles: 0}\n    - {type: http, url: 'ftp://c', preset: ndjson, hec: {ack: true}}\n",
        );
        let f = cfg.display().to_string();
        let errs = load(&cfg).unwrap_err().0;
        for e in [
            "audit.sinks[0].facility: 0 to 23",
            "audit.sinks[0].tls: only for transport tls",
            "audit.sinks[1].maxFiles: 1 to 1000",
            "audit.sinks[2].url: \"ftp://c\" is not an http(s) URL",
            "audit.sinks[2].hec: only for preset splunk_hec",
            "audit.sinks[2]: type http needs audit.spool",
        ] {
            assert!(errs.iter().any(|x| x.starts_with(&format!("{f}: {e}"))), "{e}: {errs:#?}");
        }
    }

    #[test]
    fn the_transparent_front_needs_the_relay_key() {
        let dir = std::env::temp_dir().join(format!("egw-config-relay-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = |name: &str| dir.join(name).display().to_string();
        let base = "listen: {transparent: 127.0.0.1:0}\ntransparent: {trustedRelays: [10.0.0.0/8]";
        let cfg = write(&dir, "a.yaml", &format!("{base}, relayMaxSkew: 0s, firstByteTimeout: 0s}}\n"));
        let errs = load(&cfg).unwrap_err().0;
        for field in [
            "transparent.relayKeyFile: listen.transparent needs the relays' key file",
            "transparent.relayMaxSkew: must be at least 1s",
            "transparent.firstByteTimeout: must be greater than zero",
        ] {
            assert!(
                errs.contains(&format!("{}: {field}", f("a.yaml")))
                    || errs.iter().any(|e| e.starts_with(&format!("{}: {field}", f("a.yaml")))),
                "{field}: {errs:#?}"
            );
        }
        // `validate` checks the file alone; `run` reads the key, relative to the config's folder.
        let cfg = write(&dir, "b.yaml", &format!("{base}, relayKeyFile: keys/relay.key}}\n"));
        assert!(load(&cfg).is_ok());
        let errs = load_with_secrets(&cfg).unwrap_err().0;
        assert!(
            errs[0].starts_with(&format!("{}: transparent.relayKeyFile: {}", f("b.yaml"), f("keys/relay.key"))),
            "{errs:#?}"
        );
        std::fs::create_dir_all(dir.join("keys")).unwrap();
        write(&dir.join("keys"), "relay.key", "c2hvcnQ=\n");
        let errs = load_with_secrets(&cfg).unwrap_err().0;
        assert!(errs[0].contains("line 1: a relay key needs at least 32 bytes, this one has 5"), "{errs:#?}");
        write(
            &dir.join("keys"),
            "relay.key",
            "# new key first\nZWdyZXNzLWUyZS10ZXN0LXJlbGF5LWtleS0zMi1ieXRlcyE=\nZWdyZXNzLWUyZS10ZXN0LXJlbGF5LWtleS0zMi1ieXRlcyE=\n",
        );
        assert_eq!(load_with_secrets(&cfg).unwrap().relay_keys.len(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// Hostile configuration files: `load` never panics, and every rejection names the file (and,
/// where the problem is in a field, the field).
#[cfg(test)]
mod hostile_configs {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{Value, json};

    /// JSON values shaped like gateway configs: the config's keys (and a few that are not) at
    /// any depth, with any kind of value. `policyFiles` is left out: it names files to read.
    fn config() -> impl Strategy<Value = Value> {
        let keys = prop::sample::select(vec![
            "listen",
            "http",
            "socks5",
            "transparent",
            "admin",
            "egressAddresses",
            "default",
            "guard",
            "allowCidrs",
            "clients",
            "cidr",
            "namespace",
            "name",
            "labels",
            "serviceAccount",
            "resolver",
            "servers",
            "limits",
            "connectTimeout",
            "idleTimeout",
            "headerTimeout",
            "maxHeaderBytes",
            "maxConnections",
            "maxConnectionsPerClient",
            "maxTunnelsPerClient",
            "tunnelCoalesce",
            "audit",
            "sinks",
            "type",
            "path",
            "format",
            "maxBytes",
            "maxFiles",
            "address",
            "transport",
            "tls",
            "ca",
            "facility",
            "url",
            "preset",
            "batch",
            "maxEvents",
            "hec",
            "spool",
            "dir",
            "fsync",
            "segmentBytes",
            "onFailure",
            "checkpoint",
            "every",
            "interval",
            "kubernetes",
            "enabled",
            "leaseDuration",
            "policies",
            "defaultAction",
            "users",
            "username",
            "password",
            "log",
            "denials",
            "shutdown",
            "grace",
            "trustedRelays",
            "relayMaxSkew",
            "firstByteTimeout",
            "lisen",
            "",
        ]);
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(|f| json!(f)),
            "\\PC{0,24}".prop_map(Value::from),
            prop::sample::select(vec![
                "127.0.0.1:0",
                "[::1]:0",
                "10.0.0.0/8",
                "file",
                "stdout",
                "syslog",
                "http",
                "5s",
                "0s",
                "1ms",
                "always",
                "failOpen",
                "Deny",
                "json",
                "ocsf",
                "c:514",
                "https://c/_bulk",
                "ndjson",
                "splunk_hec",
            ])
            .prop_map(Value::from),
        ];
        leaf.prop_recursive(5, 64, 6, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::btree_map(keys.clone(), inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
            ]
        })
    }

    fn check(dir: &Path, text: &str) -> Result<(), TestCaseError> {
        let path = dir.join("gateway.yaml");
        std::fs::write(&path, text).unwrap();
        if let Err(ConfigErrors(errors)) = load(&path) {
            let file = path.display().to_string();
            prop_assert!(!errors.is_empty());
            for e in &errors {
                prop_assert!(e.starts_with(&file) && e.len() > file.len() + 2, "unnamed: {e:?}");
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::fuzz_cases(1500)))]

        /// Structured hostile configs (a mapping at the top, config keys anywhere).
        #[test]
        fn never_panics_on_hostile_configs(top in prop::collection::btree_map(prop::sample::select(vec![
            "listen", "guard", "clients", "resolver", "limits", "audit", "kubernetes", "policies",
            "defaultAction", "socks5", "log", "shutdown", "transparent", "egressAddresses", "lisen",
        ]), config(), 0..6)) {
            let dir = tempfile::tempdir().unwrap();
            let doc = Value::Object(top.into_iter().map(|(k, v)| (k.to_string(), v)).collect());
            check(dir.path(), &serde_yaml_ng::to_string(&doc).unwrap())?;
        }

        /// Any text at all.
        #[test]
        fn never_panics_on_hostile_text(text in "\\PC{0,200}|[\\[\\]{}:,\\-'\"#&*!|>%@` \\n\\ta-z0-9]{0,200}") {
            let dir = tempfile::tempdir().unwrap();
            check(dir.path(), &text)?;
        }
    }
}
