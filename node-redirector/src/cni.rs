//! The chained CNI plugin (`node-redirector cni`, or the binary installed as
//! `egress-redirector` in the node's CNI bin dir), and the node-redirector's side of it.
//!
//! The container runtime runs the plugin after the Pod's primary CNI has set up its network and
//! before any of the Pod's containers start (CNI spec 1.0.0: `ADD`, `DEL`, `CHECK`, `VERSION`).
//! On `ADD` the plugin asks the local node-redirector, over a unix socket, to admit the Pod's
//! addresses (from `prevResult`); the node-redirector decides with what it knows (the watched
//! Pods, a direct GET on a cache miss, or the standalone `pods` list) and, when a `redirect:
//! Transparent` policy selects the Pod, has its addresses in the kernel's set before it answers.
//! So a selected Pod is steered from its first packet. The plugin passes `prevResult` on
//! unchanged.
//!
//! When the node-redirector cannot be reached or cannot decide, `failurePolicy: Fail` (default)
//! fails `ADD` with a message naming the cause (the kubelet retries the sandbox); `Ignore` lets
//! the Pod start unsteered and writes a warning to the plugin's log file.
//!
//! Wire protocol on the socket: one JSON [`Request`] line, one JSON [`Response`] line.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Where the node-redirector listens for the plugin (`cni.socket`).
pub const DEFAULT_SOCKET: &str = "/var/run/egress-redirector/cni.sock";
/// The plugin's log file (warnings under `failurePolicy: Ignore`).
pub const DEFAULT_LOG: &str = "/var/run/egress-redirector/cni.log";
/// The plugin's `type` in a conflist, and its file name in the CNI bin dir.
pub const PLUGIN_TYPE: &str = "egress-redirector";
/// CNI spec versions this plugin speaks.
pub const SUPPORTED: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0"];

/// A request from the plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Request {
    /// `ADD`, `DEL` or `CHECK`.
    pub command: String,
    /// `CNI_CONTAINERID`: the sandbox.
    pub container_id: String,
    /// `K8S_POD_NAMESPACE`.
    pub namespace: String,
    /// `K8S_POD_NAME`.
    pub name: String,
    /// The Pod's addresses (from `prevResult.ips`).
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// The host-side interface (from `prevResult.interfaces`), when the result names one.
    #[serde(default)]
    pub interface: Option<String>,
}

/// The node-redirector's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Response {
    /// Whether the request was carried out.
    pub ok: bool,
    /// Whether a `redirect: Transparent` policy selects the Pod (its addresses are steered).
    #[serde(default)]
    pub selected: bool,
    /// Why not, or what was done.
    #[serde(default)]
    pub message: String,
}

/// What to do when the node-redirector cannot be reached or cannot decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum FailurePolicy {
    /// `ADD` fails; the kubelet retries the sandbox.
    #[default]
    Fail,
    /// The Pod starts unsteered; a warning goes to the plugin's log.
    Ignore,
}

/// The plugin's own entry in the conflist (as the runtime passes it, with `prevResult`).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NetConf {
    #[serde(default)]
    cni_version: Option<String>,
    #[serde(default)]
    socket: Option<PathBuf>,
    #[serde(default)]
    failure_policy: FailurePolicy,
    #[serde(default)]
    log_file: Option<PathBuf>,
    #[serde(default)]
    prev_result: Option<Value>,
}

/// A CNI error: code and message, printed as the spec's error JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    /// Spec codes: 1 incompatible version, 4 invalid environment, 6 cannot decode, 7 invalid
    /// network config, 11 try again later; 100 and up are ours.
    pub code: u32,
    /// What went wrong, for the kubelet's event.
    pub msg: String,
    /// More detail.
    pub details: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> CniError {
        CniError { code, msg: msg.into(), details: details.into() }
    }

    /// The spec's error JSON.
    pub fn json(&self, version: &str) -> Value {
        json!({"cniVersion": version, "code": self.code, "msg": self.msg, "details": self.details})
    }
}

/// `K8S_POD_NAMESPACE` and `K8S_POD_NAME` from `CNI_ARGS` (`K=V;K=V`).
pub fn pod_from_args(args: &str) -> Option<(String, String)> {
    let kv: BTreeMap<&str, &str> = args.split(';').filter_map(|p| p.split_once('=')).collect();
    Some((kv.get("K8S_POD_NAMESPACE")?.to_string(), kv.get("K8S_POD_NAME")?.to_string()))
}

/// The Pod's addresses and host-side interface from a `prevResult` (any of the supported
/// versions): `ips[].address` in CIDR form; the interface is the one entry of `interfaces`
/// without a `sandbox` (the host end of the Pod's link) that is not a bridge (`is_bridge`), when
/// there is exactly one. Bridge CNIs (the bridge plugin, flannel, kubenet) list the bridge they
/// attached the Pod's veth to next to that veth.
pub fn addresses(prev: &Value, is_bridge: impl Fn(&str) -> bool) -> Result<(Vec<IpAddr>, Option<String>), String> {
    let mut ips = Vec::new();
    for ip in prev["ips"].as_array().into_iter().flatten() {
        let a = ip["address"].as_str().ok_or("prevResult.ips[].address missing")?;
        let addr = a.split_once('/').map_or(a, |(a, _)| a);
        ips.push(addr.parse::<IpAddr>().map_err(|e| format!("prevResult.ips[].address {a:?}: {e}"))?);
    }
    let host: Vec<&str> = prev["interfaces"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| i["sandbox"].as_str().is_none_or(str::is_empty))
        .filter_map(|i| i["name"].as_str())
        .filter(|name| !is_bridge(name))
        .collect();
    let iface = (host.len() == 1).then(|| host[0].to_string());
    Ok((ips, iface))
}

/// Sends one request to the node-redirector and reads its answer.
pub fn ask(socket: &Path, req: &Request, timeout: Duration) -> Result<Response, String> {
    let mut s = UnixStream::connect(socket)
        .map_err(|e| format!("cannot reach the node-redirector at {}: {e}", socket.display()))?;
    s.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    let mut line = serde_json::to_vec(req).map_err(|e| e.to_string())?;
    line.push(b'\n');
    s.write_all(&line).map_err(|e| format!("writing to the node-redirector: {e}"))?;
    let mut answer = String::new();
    BufReader::new(s)
        .read_line(&mut answer)
        .map_err(|e| format!("no answer from the node-redirector within {timeout:?}: {e}"))?;
    serde_json::from_str(&answer).map_err(|e| format!("unreadable answer from the node-redirector: {e}: {answer:?}"))
}

/// How long the plugin waits for the node-redirector.
const TIMEOUT: Duration = Duration::from_secs(10);

/// The plugin: `env` is the CNI environment, `stdin` the network config. Returns what to print
/// on stdout and whether it is a success.
pub fn plugin(env: &BTreeMap<String, String>, stdin: &str) -> (String, bool) {
    let command = env.get("CNI_COMMAND").map(String::as_str).unwrap_or("");
    if command == "VERSION" {
        return (json!({"cniVersion": "1.0.0", "supportedVersions": SUPPORTED}).to_string(), true);
    }
    let conf: NetConf = match serde_json::from_str(stdin) {
        Ok(c) => c,
        Err(e) => {
            return (
                CniError::new(6, "cannot decode the network configuration", e.to_string()).json("1.0.0").to_string(),
                false,
            );
        }
    };
    let version = conf.cni_version.clone().unwrap_or_else(|| "1.0.0".into());
    match run_plugin(command, env, &conf) {
        Ok(out) => (out, true),
        Err(e) if conf.failure_policy == FailurePolicy::Ignore && e.code == 11 && command == "ADD" => {
            log(&conf, &format!("WARNING: the Pod starts unsteered (failurePolicy: Ignore): {}: {}", e.msg, e.details));
            (passthrough(&conf, &version), true)
        }
        Err(e) => {
            log(&conf, &format!("{command} failed: {}: {}", e.msg, e.details));
            (e.json(&version).to_string(), false)
        }
    }
}

fn passthrough(conf: &NetConf, version: &str) -> String {
    let mut r = conf.prev_result.clone().unwrap_or_else(|| json!({}));
    r["cniVersion"] = json!(version);
    r.to_string()
}

fn log(conf: &NetConf, line: &str) {
    let path = conf.log_file.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_LOG));
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(&path) {
        let _ = writeln!(f, "{} {line}", humantime::format_rfc3339_seconds(std::time::SystemTime::now()));
    }
}

fn run_plugin(command: &str, env: &BTreeMap<String, String>, conf: &NetConf) -> Result<String, CniError> {
    let version = conf.cni_version.clone().unwrap_or_else(|| "1.0.0".into());
    if !SUPPORTED.contains(&version.as_str()) {
        return Err(CniError::new(
            1,
            format!("CNI version {version} is not supported"),
            format!("supported: {SUPPORTED:?}"),
        ));
    }
    let socket = conf.socket.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    let container_id = env.get("CNI_CONTAINERID").cloned().unwrap_or_default();
    let pod = env.get("CNI_ARGS").and_then(|a| pod_from_args(a));
    match command {
        "ADD" | "CHECK" => {
            if container_id.is_empty() {
                return Err(CniError::new(4, "CNI_CONTAINERID is not set", ""));
            }
            let Some((namespace, name)) = pod else {
                return Err(CniError::new(
                    4,
                    "CNI_ARGS names no Pod",
                    "K8S_POD_NAMESPACE and K8S_POD_NAME are required",
                ));
            };
            let prev = conf.prev_result.as_ref().ok_or_else(|| {
                CniError::new(
                    7,
                    "no prevResult",
                    "egress-redirector is a chained plugin: list it after the primary CNI plugin",
                )
            })?;
            // The plugin runs in the node's network namespace, as the runtime runs every plugin.
            let (ips, interface) =
                addresses(prev, crate::routes::is_bridge).map_err(|e| CniError::new(7, "prevResult unreadable", e))?;
            let req = Request {
                command: command.into(),
                container_id,
                namespace: namespace.clone(),
                name: name.clone(),
                ips,
                interface,
            };
            let r =
                ask(&socket, &req, TIMEOUT).map_err(|e| CniError::new(11, "egress node-redirector unavailable", e))?;
            if !r.ok {
                return Err(CniError::new(
                    11,
                    format!("egress node-redirector cannot admit {namespace}/{name}"),
                    r.message,
                ));
            }
            Ok(if command == "ADD" { passthrough(conf, &version) } else { String::new() })
        }
        "DEL" => {
            // Never fails: a Pod must always be deletable. Without an answer, the next reconcile
            // drops the Pod once the API no longer lists it.
            let (namespace, name) = pod.unwrap_or_default();
            let req =
                Request { command: "DEL".into(), container_id, namespace, name, ips: Vec::new(), interface: None };
            if let Err(e) = ask(&socket, &req, TIMEOUT) {
                log(conf, &format!("DEL: {e} (the Pod's addresses are dropped at the next reconcile)"));
            }
            Ok(String::new())
        }
        other => Err(CniError::new(4, format!("unknown CNI_COMMAND {other:?}"), "")),
    }
}

/// Runs the plugin on the process's environment and stdin (the `cni` subcommand).
pub fn main() -> std::process::ExitCode {
    let env: BTreeMap<String, String> = std::env::vars().filter(|(k, _)| k.starts_with("CNI_")).collect();
    let mut stdin = String::new();
    if env.get("CNI_COMMAND").map(String::as_str) != Some("VERSION") {
        let _ = std::io::stdin().read_to_string(&mut stdin);
    }
    let (out, ok) = plugin(&env, &stdin);
    if !out.is_empty() {
        println!("{out}");
    }
    if ok { std::process::ExitCode::SUCCESS } else { std::process::ExitCode::from(1) }
}

/// A request with the channel its answer goes back on.
pub type Pending = (Request, std::time::Instant, tokio::sync::oneshot::Sender<Response>);

/// Serves the plugin's requests on `socket` (created, mode 0600, any stale one replaced), handing
/// each to the main loop on `tx`.
pub async fn serve(socket: PathBuf, tx: tokio::sync::mpsc::Sender<Pending>) -> std::io::Result<()> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(&socket);
    let listener = tokio::net::UnixListener::bind(&socket)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
    tracing::info!(socket = %socket.display(), "CNI plugin socket listening");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let tx = tx.clone();
            tokio::spawn(async move {
                use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
                let (rd, mut wr) = stream.into_split();
                let mut line = String::new();
                let mut rd = tokio::io::BufReader::new(rd.take(64 * 1024));
                let answer = match tokio::time::timeout(TIMEOUT, rd.read_line(&mut line)).await {
                    Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
                        Ok(req) => {
                            let (reply, rx) = tokio::sync::oneshot::channel();
                            if tx.send((req, std::time::Instant::now(), reply)).await.is_err() {
                                Response { ok: false, selected: false, message: "node-redirector is stopping".into() }
                            } else {
                                rx.await.unwrap_or(Response {
                                    ok: false,
                                    selected: false,
                                    message: "no decision".into(),
                                })
                            }
                        }
                        Err(e) => Response { ok: false, selected: false, message: format!("malformed request: {e}") },
                    },
                    _ => return,
                };
                let mut out = serde_json::to_vec(&answer).unwrap_or_default();
                out.push(b'\n');
                let _ = wr.write_all(&out).await;
            });
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(cmd: &str) -> BTreeMap<String, String> {
        [
            ("CNI_COMMAND", cmd),
            ("CNI_CONTAINERID", "abc123"),
            ("CNI_NETNS", "/var/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1;K8S_POD_INFRA_CONTAINER_ID=abc123"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    #[test]
    fn reads_pod_addresses_and_the_host_interface_from_prev_results() {
        // ptp / kindnet: host veth without sandbox, the Pod's eth0 with one.
        let ptp = json!({"cniVersion": "1.0.0",
            "interfaces": [{"name": "veth1234", "mac": "aa:bb:cc:dd:ee:ff"}, {"name": "eth0", "sandbox": "/var/run/netns/x"}],
            "ips": [{"address": "10.244.1.5/24", "gateway": "10.244.1.1", "interface": 1}, {"address": "fd00:10:244:1::5/64", "interface": 1}]});
        let no_bridge = |_: &str| false;
        assert_eq!(
            addresses(&ptp, no_bridge).unwrap(),
            (vec!["10.244.1.5".parse().unwrap(), "fd00:10:244:1::5".parse().unwrap()], Some("veth1234".into()))
        );
        // The bridge plugin (flannel, kubenet): the bridge, the Pod's port on it, the Pod's eth0.
        let bridge = json!({"cniVersion": "1.0.0",
            "interfaces": [{"name": "cni0", "mac": "aa:bb:cc:00:00:01"}, {"name": "veth5678", "mac": "aa:bb:cc:00:00:02"},
                           {"name": "eth0", "mac": "aa:bb:cc:00:00:03", "sandbox": "/var/run/netns/x"}],
            "ips": [{"address": "10.244.1.6/24", "gateway": "10.244.1.1", "interface": 2}]});
        let cni0 = |name: &str| name == "cni0";
        assert_eq!(addresses(&bridge, cni0).unwrap(), (vec!["10.244.1.6".parse().unwrap()], Some("veth5678".into())));
        // Two host-side interfaces, neither a bridge: none is taken for the Pod's.
        assert_eq!(addresses(&bridge, no_bridge).unwrap().1, None);
        // Calico 0.3.1: only the container's interface; the host interface comes from the route.
        let calico = json!({"cniVersion": "0.3.1", "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/x"}],
            "ips": [{"version": "4", "address": "192.168.1.7/32"}]});
        assert_eq!(addresses(&calico, no_bridge).unwrap(), (vec!["192.168.1.7".parse().unwrap()], None));
        assert!(
            addresses(&json!({"ips": [{"address": "not-an-ip/32"}]}), no_bridge).unwrap_err().contains("not-an-ip")
        );
        assert_eq!(pod_from_args("K8S_POD_NAME=a;K8S_POD_NAMESPACE=b"), Some(("b".into(), "a".into())));
        assert_eq!(pod_from_args("IgnoreUnknown=1"), None);
    }

    #[test]
    fn version_and_errors_follow_the_spec() {
        let (out, ok) = plugin(&env("VERSION"), "");
        assert!(ok);
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["supportedVersions"], json!(SUPPORTED));
        let (out, ok) = plugin(&env("ADD"), "{not json");
        assert!(!ok);
        assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["code"], 6);
        let dir = tempfile::tempdir().unwrap();
        let conf = |extra: &str| {
            format!(
                r#"{{"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "egress-redirector", "socket": "{}", "logFile": "{}"{extra}}}"#,
                dir.path().join("none.sock").display(),
                dir.path().join("cni.log").display()
            )
        };
        // No prevResult: a chained plugin listed first.
        let (out, ok) = plugin(&env("ADD"), &conf(""));
        assert!(!ok);
        assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["code"], 7, "{out}");
        let prev = r#", "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.244.1.5/32"}]}"#;
        // The redirector is not running: Fail fails with the cause; Ignore passes prevResult on
        // and logs a warning; DEL always succeeds.
        let (out, ok) = plugin(&env("ADD"), &conf(prev));
        assert!(!ok);
        let e: Value = serde_json::from_str(&out).unwrap();
        assert_eq!((e["code"].as_u64(), e["msg"].as_str()), (Some(11), Some("egress node-redirector unavailable")));
        assert!(e["details"].as_str().unwrap().contains("none.sock"), "{e}");
        let (out, ok) = plugin(&env("ADD"), &conf(&format!(r#"{prev}, "failurePolicy": "Ignore""#)));
        assert!(ok, "{out}");
        let r: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(r["ips"][0]["address"], "10.244.1.5/32");
        let log = std::fs::read_to_string(dir.path().join("cni.log")).unwrap();
        assert!(log.contains("WARNING: the Pod starts unsteered (failurePolicy: Ignore)"), "{log}");
        let (out, ok) = plugin(&env("DEL"), &conf(""));
        assert!(ok && out.is_empty(), "{out}");
        let (out, ok) =
            plugin(&env("ADD"), &conf(r#", "cniVersion": "2.0.0""#).replacen(r#""cniVersion": "1.0.0", "#, "", 1));
        assert!(!ok);
        assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["code"], 1, "{out}");
    }
}
