//! End-to-end test harness: the real `egress-gateway` binary, a real DNS server (dnsmasq), real
//! upstream HTTP servers on loopback aliases, and real clients (curl, raw sockets).
//!
//! Every process a test starts is killed when its handle drops, also when the test fails.
//! Addresses: upstreams on 127.0.0.2-127.0.0.9 (exempted in each test's `guard.allowCidrs`), so
//! 127.0.0.1 stays a guarded loopback address for the guard tests.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The gateway binary: `EGRESS_GATEWAY_BIN`, or `target/<profile>/egress-gateway` next to this
/// test executable (build it first: `cargo build -p egress-gateway`).
pub fn gateway_bin() -> PathBuf {
    if let Ok(p) = std::env::var("EGRESS_GATEWAY_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>");
    let bin = dir.join("egress-gateway");
    assert!(bin.exists(), "{} is missing: run `cargo build --workspace --bins` first", bin.display());
    assert_fresh(&bin);
    bin
}

/// Panics when a source of the binary changed after `bin` was built: `cargo test` builds this
/// crate, not the binaries it runs, so an edit followed by `cargo nextest run -p egress-e2e`
/// alone would test the previous binaries (and pass or fail for the wrong reason). An explicit
/// `EGRESS_GATEWAY_BIN` is taken as it is.
fn assert_fresh(bin: &Path) {
    let name = bin.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    // The workspace crates each binary is built from.
    let crates: &[&str] = match name {
        "egress-gateway" => &["crds", "gateway", "logging", "netio"],
        "node-redirector" => &["crds", "logging", "netio", "node-redirector"],
        _ => return,
    };
    let mut newest: Option<(std::time::SystemTime, PathBuf)> = None;
    let mut dirs: Vec<PathBuf> = crates.iter().map(|c| repo_root().join(c).join("src")).collect();
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = e.path();
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|x| x == "rs")
                && let Ok(m) = meta.modified()
                && newest.as_ref().is_none_or(|(t, _)| m > *t)
            {
                newest = Some((m, path));
            }
        }
    }
    let built = std::fs::metadata(bin).and_then(|m| m.modified()).expect("binary's mtime");
    if let Some((changed, source)) = newest {
        assert!(
            built >= changed,
            "{} is older than {}: run `cargo build --workspace --bins` (./scripts/test.sh does) before the end-to-end tests",
            bin.display(),
            source.display()
        );
    }
}

/// The pinned external tools (helm, kubernetes-validate, hadolint, the OCSF and ECS definitions)
/// installed by scripts/tools.sh: `$EGRESS_TOOLS_DIR`, else target/tools. Panics naming the
/// command to run when `needed` (relative paths) are missing.
pub fn tools_dir(needed: &[&str]) -> PathBuf {
    let dir =
        std::env::var_os("EGRESS_TOOLS_DIR").map(PathBuf::from).unwrap_or_else(|| repo_root().join("target/tools"));
    for n in needed {
        assert!(
            dir.join(n).exists(),
            "{} is missing: run ./scripts/tools.sh (./scripts/test.sh does)",
            dir.join(n).display()
        );
    }
    dir
}

/// Polls `f` every 20 ms until it holds; panics naming `what` after `limit`.
pub fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

/// A TCP port on 127.0.0.1 that is held but not listened on: a connection to it is refused (the
/// kernel answers a SYN to a bound, non-listening socket with a reset) and no other test can take
/// it. `listen()` turns it into a listener on the same port, for a server that "comes up" later.
pub struct HeldPort(socket2::Socket);

impl HeldPort {
    /// Binds a fresh port.
    pub fn new() -> HeldPort {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
        HeldPort(s)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.0.local_addr().unwrap().as_socket().unwrap().port()
    }

    /// Starts listening on the held port.
    pub fn listen(self) -> TcpListener {
        self.0.listen(128).unwrap();
        self.0.into()
    }
}

impl Default for HeldPort {
    fn default() -> Self {
        HeldPort::new()
    }
}

/// Kills a child process on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A misbehaving DNS server on UDP (hostile-input tests): answers A queries for its names and
/// NXDOMAIN for other names, but never answers AAAA (as some middleboxes drop them) and ignores
/// the first `lost` A queries (lost packets). Counts the queries it receives by type.
pub struct SilentAaaaDns {
    /// `127.0.0.1:port`.
    pub addr: SocketAddr,
    counts: std::sync::Arc<std::sync::Mutex<BTreeMap<u16, usize>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl SilentAaaaDns {
    /// Starts the server with `(name, IPv4 address)` records.
    pub fn start(records: &[(&str, std::net::Ipv4Addr)]) -> SilentAaaaDns {
        SilentAaaaDns::losing(records, 0)
    }

    /// Like `start`, and the first `lost` A queries go unanswered.
    pub fn losing(records: &[(&str, std::net::Ipv4Addr)], lost: usize) -> SilentAaaaDns {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let addr = sock.local_addr().unwrap();
        let records: BTreeMap<String, std::net::Ipv4Addr> =
            records.iter().map(|(n, a)| (n.to_ascii_lowercase(), *a)).collect();
        let counts = std::sync::Arc::<std::sync::Mutex<BTreeMap<u16, usize>>>::default();
        let stop = std::sync::Arc::<std::sync::atomic::AtomicBool>::default();
        let (c, st) = (counts.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !st.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok((n, peer)) = sock.recv_from(&mut buf) else { continue };
                let q = &buf[..n];
                // Header (12 bytes), then the question: labels, a zero byte, type, class.
                let (mut i, mut labels) = (12usize, Vec::new());
                while i < n && q[i] != 0 {
                    let len = q[i] as usize;
                    labels.push(String::from_utf8_lossy(&q[i + 1..i + 1 + len]).to_ascii_lowercase());
                    i += 1 + len;
                }
                let qend = i + 5;
                let qtype = u16::from_be_bytes([q[i + 1], q[i + 2]]);
                let seen = {
                    let mut c = c.lock().unwrap();
                    let n = c.entry(qtype).or_default();
                    *n += 1;
                    *n
                };
                if qtype == 28 || (qtype == 1 && seen <= lost) {
                    continue; // AAAA: never answered; the first `lost` A queries: lost
                }
                let known = records.get(&labels.join("."));
                let answer = known.filter(|_| qtype == 1);
                let rcode = if known.is_some() { 0 } else { 3 };
                let mut r = Vec::with_capacity(qend + 16);
                r.extend_from_slice(&q[..2]);
                r.extend_from_slice(&[0x81, 0x80 | rcode, 0, 1, 0, answer.is_some() as u8, 0, 0, 0, 0]);
                r.extend_from_slice(&q[12..qend]);
                if let Some(ip) = answer {
                    r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
                    r.extend_from_slice(&ip.octets());
                }
                let _ = sock.send_to(&r, peer);
            }
        });
        SilentAaaaDns { addr, counts, stop }
    }

    /// How many queries of `qtype` (1 = A, 28 = AAAA) arrived so far.
    pub fn queries(&self, qtype: u16) -> usize {
        self.counts.lock().unwrap().get(&qtype).copied().unwrap_or(0)
    }
}

impl Drop for SilentAaaaDns {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A dnsmasq instance answering for test names only (no upstream, no hosts file).
pub struct Dns {
    proc: Proc,
    /// `127.0.0.1:port`.
    pub addr: SocketAddr,
}

impl Dns {
    /// The dnsmasq process id.
    pub fn pid(&self) -> u32 {
        self.proc.0.id()
    }

    /// Starts dnsmasq with `(name, address)` records (several per name allowed; a value that is
    /// not an address makes `name` a CNAME of that name).
    pub fn start(records: &[(&str, &str)]) -> Dns {
        Dns::start_at(None, SocketAddr::from(([127, 0, 0, 1], 0)), records)
    }

    /// Starts dnsmasq on `addr` (port 0: a free one), inside `ns` when given. A record whose
    /// value is not an address is a CNAME to that (known) name; a name `*.domain` answers every
    /// name below the domain with its address.
    pub fn start_at(ns: Option<&Netns>, addr: SocketAddr, records: &[(&str, &str)]) -> Dns {
        let ip = addr.ip();
        let pick = move || match addr.port() {
            0 => loop {
                // Free for both UDP and TCP.
                let p = UdpSocket::bind((ip, 0)).unwrap().local_addr().unwrap().port();
                if TcpListener::bind((ip, p)).is_ok() {
                    break p;
                }
            },
            p => p,
        };
        let pick = || match ns {
            Some(n) => n.enter(pick),
            None => pick(),
        };
        let (child, port) = spawn_listening(pick, |port| Dns::spawn(ns, ip, port, records));
        Dns { proc: Proc(child), addr: SocketAddr::new(ip, port) }
    }

    fn spawn(ns: Option<&Netns>, ip: std::net::IpAddr, port: u16, records: &[(&str, &str)]) -> Child {
        let mut cmd = match ns {
            Some(n) => n.command("dnsmasq"),
            None => Command::new("dnsmasq"),
        };
        cmd.args([
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            "--bind-interfaces",
            &format!("--listen-address={ip}"),
            "--pid-file=",
            "--user=root",
            "--local-ttl=1",
            "--log-facility=-",
        ])
        .arg(format!("--port={port}"));
        let mut by_name: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (n, a) in records {
            if let Some(domain) = n.strip_prefix("*.") {
                // Every name below `domain` (and it) answers `a`.
                cmd.arg(format!("--address=/{domain}/{a}"));
            } else if a.parse::<std::net::IpAddr>().is_ok() {
                by_name.entry(n).or_default().push(a);
            } else {
                cmd.arg(format!("--cname={n},{a}"));
            }
        }
        // One record per address: a host-record holds at most one address of each family, and
        // dnsmasq answers with every record of the name.
        for (n, addrs) in by_name {
            for a in addrs {
                cmd.arg(format!("--host-record={n},{a}"));
            }
        }
        cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("dnsmasq (apt-get install dnsmasq-base)")
    }
}

/// Whether process `pid` listens on TCP `port` on a socket of its own (read from /proc, in the
/// process's network namespace): a server that came up, not another one answering on the port.
pub fn listens(pid: u32, port: u16) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return false };
    let inodes: std::collections::HashSet<String> = fds
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']').map(str::to_string))
        .collect();
    ["tcp", "tcp6"].iter().any(|f| {
        std::fs::read_to_string(format!("/proc/{pid}/net/{f}")).unwrap_or_default().lines().skip(1).any(|l| {
            let c: Vec<&str> = l.split_whitespace().collect();
            c.len() > 9
                && c[3] == "0A" // LISTEN
                && c[1].rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok()) == Some(port)
                && inodes.contains(c[9])
        })
    })
}

/// Starts a server process that binds its port itself (`spawn(port)`), on a port from `pick`,
/// and waits until it listens there. A port taken by someone else between the pick and the bind
/// makes the server exit: then another one is picked. Returns the process and its port.
pub fn spawn_listening(mut pick: impl FnMut() -> u16, mut spawn: impl FnMut(u16) -> Child) -> (Child, u16) {
    for _ in 0..10 {
        let port = pick();
        let mut child = spawn(port);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if child.try_wait().unwrap().is_some() {
                break; // could not bind: another port
            }
            if listens(child.id(), port) {
                return (child, port);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("the server did not come up on any of ten ports");
}

/// Polls `f` until it is true or the deadline passes (then panics).
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "condition not reached within {limit:?}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// An upstream HTTP/1.1 server answering every request with JSON describing it:
/// `{"method","path","peer","host","body_len"}`; `/bytes/N` answers the N bytes of [`pattern`].
pub struct Upstream {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The server thread's id, once it runs.
    tid: std::sync::Arc<std::sync::OnceLock<rustix::thread::Pid>>,
    peers: std::sync::Arc<std::sync::Mutex<Vec<SocketAddr>>>,
}

impl Upstream {
    /// The source address of every connection accepted so far, in order.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap().clone()
    }

    /// Connections accepted so far.
    pub fn hits(&self) -> usize {
        self.peers.lock().unwrap().len()
    }

    /// Starts on `ip:0`.
    pub fn start(ip: &str) -> Upstream {
        Upstream::serve(TcpListener::bind((ip, 0)).expect("bind upstream"))
    }

    /// Serves on an already bound listener.
    pub fn serve(std_listener: TcpListener) -> Upstream {
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        let peers = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = peers.clone();
        let tid = std::sync::Arc::new(std::sync::OnceLock::new());
        let its_tid = tid.clone();
        let thread = std::thread::spawn(move || {
            let _ = its_tid.set(rustix::thread::gettid());
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
                loop {
                    tokio::select! {
                        _ = &mut rx => return,
                        a = listener.accept() => {
                            let Ok((s, peer)) = a else { continue };
                            seen.lock().unwrap().push(peer);
                            tokio::spawn(serve_upstream(s, peer));
                        }
                    }
                }
            });
        });
        Upstream { addr, stop: Some(tx), thread: Some(thread), tid, peers }
    }

    /// Pins the server's thread to one CPU (benchmarks).
    pub fn pin_to(&self, cpu: usize) {
        let tid = *self.tid.wait();
        rustix::thread::sched_setaffinity(Some(tid), &cpu_set(cpu)).expect("sched_setaffinity");
    }
}

fn cpu_set(cpu: usize) -> rustix::thread::CpuSet {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    set
}

/// Pins every thread of process `pid` (0: the calling thread only) to one CPU (benchmarks).
/// Processes and threads started later by a pinned thread inherit the pin.
pub fn pin(pid: u32, cpu: usize) {
    let set = cpu_set(cpu);
    let tids: Vec<i32> = if pid == 0 {
        vec![0]
    } else {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter_map(|t| t.ok()?.file_name().to_str()?.parse().ok())
            .collect()
    };
    for tid in tids {
        // A vanished thread only returns an error.
        let _ = rustix::thread::sched_setaffinity(rustix::thread::Pid::from_raw(tid), &set);
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Bytes that differ by position (what `/bytes/N` answers), so that a lost, repeated or
/// reordered chunk shows.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// The upstream's answer: a JSON echo, or [`pattern`] made as it is sent (64 KiB at a time, so
/// that many large downloads at once cost no memory).
enum UpBody {
    Full(Option<bytes::Bytes>),
    Pattern { at: usize, len: usize },
}

impl hyper::body::Body for UpBody {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        let chunk = match self.get_mut() {
            UpBody::Full(b) => b.take(),
            UpBody::Pattern { at, len } => (*at < *len).then(|| {
                // One period-aligned copy of the pattern, sliced (no copy per chunk).
                static BLOCK: std::sync::OnceLock<bytes::Bytes> = std::sync::OnceLock::new();
                let block = BLOCK.get_or_init(|| bytes::Bytes::from(pattern((64 << 10) + 251)));
                let n = (64 << 10).min(*len - *at);
                let c = block.slice(*at % 251..*at % 251 + n);
                *at += n;
                c
            }),
        };
        std::task::Poll::Ready(chunk.map(|c| Ok(hyper::body::Frame::data(c))))
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            UpBody::Full(b) => hyper::body::SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            UpBody::Pattern { at, len } => hyper::body::SizeHint::with_exact((len - at) as u64),
        }
    }
}

async fn serve_upstream(s: tokio::net::TcpStream, peer: SocketAddr) {
    use http_body_util::BodyExt;
    let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| async move {
        let method = req.method().to_string();
        let path = req.uri().path().to_string();
        let host = req.headers().get("host").and_then(|h| h.to_str().ok()).unwrap_or("").to_string();
        let hosts = req.headers().get_all("host").iter().count();
        let path_and_query = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
        let hop = req.headers().contains_key("proxy-authorization") || req.headers().contains_key("proxy-connection");
        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let out = if let Some(n) = path.strip_prefix("/bytes/") {
            UpBody::Pattern { at: 0, len: n.parse().unwrap_or(0) }
        } else {
            let v = serde_json::json!({
                "method": method, "path": path, "path_and_query": path_and_query, "peer": peer.to_string(),
                "host": host, "hosts": hosts,
                "body_len": body.len(), "proxy_headers_seen": hop,
            });
            UpBody::Full(Some(bytes::Bytes::from(v.to_string())))
        };
        Ok::<_, std::convert::Infallible>(hyper::Response::new(out))
    });
    let _ = hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(s), svc).await;
}

/// A running gateway with its own config directory, listeners and audit file.
pub struct Gateway {
    proc: Option<Proc>,
    /// Config directory (kept until drop).
    pub dir: tempfile::TempDir,
    /// Explicit proxy.
    pub http: SocketAddr,
    /// SOCKS5.
    pub socks: SocketAddr,
    /// Admin.
    pub admin: SocketAddr,
    /// Transparent front (configured only when the body sets `transparent.trustedRelays`).
    pub transparent: SocketAddr,
    /// HTTPS proxy front (configured only when the body has an `https:` section).
    pub https: SocketAddr,
    /// stderr log of the process.
    pub log: PathBuf,
    /// Network namespace the gateway runs in (None: the test's own).
    pub netns: Option<String>,
    /// A command the binary runs under (`setpriv ...`); empty: none.
    pub launcher: Vec<String>,
}

impl Gateway {
    /// Writes `gateway.yaml` = listeners + audit file + resolver + `body`, starts the binary
    /// and waits until `/readyz` answers 200.
    pub fn start(dns: &Dns, body: &str) -> Gateway {
        Gateway::start_with(Some(dns.addr), None, body)
    }

    /// Like `start`, with an optional nameserver and inside an optional network namespace.
    pub fn start_with(dns: Option<SocketAddr>, netns: Option<&Netns>, body: &str) -> Gateway {
        let mut g = Gateway::unstarted(netns, &[]);
        // In a namespace, relays reach the transparent front from other namespaces (0.0.0.0).
        g.write_config_with(dns, body);
        g.spawn("/readyz");
        g
    }

    /// Starts the gateway and waits only until it is alive (`/healthz`), not ready.
    pub fn start_alive(dns: &Dns, body: &str) -> Gateway {
        let mut g = Gateway::unstarted(None, &[]);
        g.write_config(dns, body);
        g.spawn("/healthz");
        g
    }

    /// Like `start`, with the binary run under `launcher` (for example `setpriv` dropping
    /// capabilities).
    pub fn start_under(dns: &Dns, launcher: &[&str], body: &str) -> Gateway {
        let mut g = Gateway::unstarted(None, launcher);
        g.write_config(dns, body);
        g.spawn("/readyz");
        g
    }

    /// A config directory; nothing written or started yet (the listeners' addresses are known
    /// once it runs).
    fn unstarted(netns: Option<&Netns>, launcher: &[&str]) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let unbound = SocketAddr::from(([127, 0, 0, 1], 0));
        Gateway {
            proc: None,
            http: unbound,
            socks: unbound,
            admin: unbound,
            transparent: unbound,
            https: unbound,
            log: dir.path().join("gateway.log"),
            netns: netns.map(|n| n.name.clone()),
            launcher: launcher.iter().map(|s| s.to_string()).collect(),
            dir,
        }
    }

    /// The config file path.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("gateway.yaml")
    }

    /// The audit file path.
    pub fn audit_path(&self) -> PathBuf {
        self.dir.path().join("audit.jsonl")
    }

    /// (Re)writes the config file (atomically, as editors and ConfigMaps do).
    pub fn write_config(&self, dns: &Dns, body: &str) {
        self.write_config_with(Some(dns.addr), body)
    }

    fn write_config_with(&self, dns: Option<SocketAddr>, body: &str) {
        let resolver = dns.map(|d| format!("resolver: {{nameservers: [{d}]}}\n")).unwrap_or_default();
        // The transparent listener needs trusted relays; only tests that configure them get it.
        // Every listener on port 0: the gateway binds a free port itself (no port picked here and
        // released before use, which another test could take meanwhile); `spawn` reads the
        // bound addresses from its log.
        let transparent_ip = if self.netns.is_some() { "0.0.0.0" } else { "127.0.0.1" };
        let mut transparent =
            if body.contains("trustedRelays") { format!(", transparent: {transparent_ip}:0") } else { String::new() };
        if body.starts_with("https:") || body.contains("\nhttps:") {
            transparent.push_str(", https: 127.0.0.1:0");
        }
        // A body with its own `audit:` replaces the default file sink; `$DIR` is the config directory.
        let audit = if body.contains("\naudit:") || body.starts_with("audit:") {
            String::new()
        } else {
            format!("audit: {{sinks: [{{type: file, path: {}}}]}}\n", self.audit_path().display())
        };
        let body = body
            .replace("$DIR", &self.dir.path().display().to_string())
            .replace("$RELAY_KEY", &relay_key_file().display().to_string());
        let text = format!(
            "listen: {{http: 127.0.0.1:0, socks5: 127.0.0.1:0, admin: 127.0.0.1:0{transparent}}}\n{resolver}{audit}{body}\n"
        );
        let tmp = self.dir.path().join(".gateway.yaml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.config_path()).unwrap();
    }

    fn spawn(&mut self, wait_for: &str) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let log_start = log.metadata().map(|m| m.len() as usize).unwrap_or(0);
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(gateway_bin());
                c
            }
            None if !self.launcher.is_empty() => {
                let mut c = Command::new(&self.launcher[0]);
                c.args(&self.launcher[1..]).arg(gateway_bin());
                c
            }
            None => Command::new(gateway_bin()),
        };
        let child = cmd
            .args(["run", "--config"])
            .arg(self.config_path())
            .env("EGRESS_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start egress-gateway");
        self.proc = Some(Proc(child));
        let start = Instant::now();
        // The addresses it bound, from this run's part of the log.
        let config = std::fs::read_to_string(self.config_path()).unwrap_or_default();
        let (transparent, https) = (config.contains(", transparent: "), config.contains(", https: "));
        loop {
            let text = std::fs::read(&self.log).unwrap_or_default();
            let text = strip_ansi(&String::from_utf8_lossy(&text[log_start.min(text.len())..]));
            // Text lines (`... HTTP proxy listening addr=127.0.0.1:4711`) or JSON lines
            // (`log.format: json`: `{"fields": {"message": ..., "addr": ...}}`).
            let bound = |what: &str| -> Option<SocketAddr> {
                let line = text.lines().find(|l| l.contains(what))?;
                match serde_json::from_str::<Value>(line) {
                    Ok(v) => v["fields"]["addr"].as_str()?.parse().ok(),
                    Err(_) => line.split("addr=").nth(1)?.split_whitespace().next()?.parse().ok(),
                }
            };
            if let (Some(h), Some(s), Some(a)) =
                (bound("HTTP proxy listening"), bound("SOCKS5 proxy listening"), bound("admin listening"))
            {
                let t = bound("transparent front listening");
                let tls = bound("HTTPS proxy listening");
                if (t.is_some() || !transparent) && (tls.is_some() || !https) {
                    (self.http, self.socks, self.admin) = (h, s, a);
                    if let Some(t) = t {
                        self.transparent = t;
                    }
                    if let Some(t) = tls {
                        self.https = t;
                    }
                    break;
                }
            }
            if let Some(Some(status)) = self.proc.as_mut().map(|p| p.0.try_wait().ok().flatten()) {
                panic!("gateway exited with {status}: {}", std::fs::read_to_string(&self.log).unwrap_or_default());
            }
            assert!(start.elapsed() < Duration::from_secs(15), "gateway did not bind: {}", self.log_text());
            std::thread::sleep(Duration::from_millis(10));
        }
        while self.admin_get(wait_for).map(|(s, _)| s) != Some(200) {
            if let Some(Some(status)) = self.proc.as_mut().map(|p| p.0.try_wait().ok().flatten()) {
                panic!("gateway exited with {status}: {}", std::fs::read_to_string(&self.log).unwrap_or_default());
            }
            assert!(start.elapsed() < Duration::from_secs(15), "gateway not ready: {}", self.log_text());
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Starts the binary again with the same config (after it exited or was killed) and waits
    /// for `/readyz`.
    pub fn respawn(&mut self) {
        self.spawn("/readyz");
    }

    /// The process's stderr so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The child process.
    pub fn child(&mut self) -> &mut Child {
        &mut self.proc.as_mut().expect("running").0
    }

    /// The process id of the running gateway.
    pub fn pid(&self) -> u32 {
        self.proc.as_ref().expect("running").0.id()
    }

    /// Sends a signal to the gateway.
    pub fn signal(&mut self, sig: &str) {
        let pid = self.child().id().to_string();
        let ok = Command::new("kill").args(["-s", sig, &pid]).status().unwrap().success();
        assert!(ok, "kill -s {sig} {pid}");
    }

    /// Every audit event written so far (waits briefly for the writer to flush `min` events).
    pub fn events_at_least(&self, min: usize) -> Vec<Value> {
        let start = Instant::now();
        loop {
            let v = self.events();
            if v.len() >= min || start.elapsed() > Duration::from_secs(5) {
                return v;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Every audit event written so far.
    pub fn events(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(self.audit_path()).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line is not JSON ({e}): {l}")))
            .collect()
    }

    /// Events of one request id (waits until at least one is written).
    pub fn request_events(&self, request_id: &str) -> Vec<Value> {
        let start = Instant::now();
        loop {
            let v: Vec<Value> = self.events().into_iter().filter(|e| e["request_id"] == request_id).collect();
            if !v.is_empty() || start.elapsed() > Duration::from_secs(5) {
                return v;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The latest decision event matching `f`, waiting for the audit writer to flush it.
    pub fn decision(&self, f: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            if let Some(e) = self.events().into_iter().rev().find(|e| e["event"] == "decision" && f(e)) {
                return e;
            }
            assert!(start.elapsed() < Duration::from_secs(5), "no matching decision in {:#?}", self.events());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The first decision event matching `f` among those written after the first `from` events
    /// (`events().len()` taken before the request was sent), waiting for the audit writer: a
    /// request cannot be mistaken for an earlier one that matched too (a reused source port).
    pub fn decision_since(&self, from: usize, f: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            if let Some(e) = self.events().into_iter().skip(from).find(|e| e["event"] == "decision" && f(e)) {
                return e;
            }
            assert!(start.elapsed() < Duration::from_secs(5), "no matching decision in {:#?}", self.events());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until an event with `decision.reason == reason` is written.
    pub fn wait_reason(&self, reason: &str) {
        let start = Instant::now();
        while !self.events().iter().any(|e| e["decision"]["reason"] == reason) {
            assert!(start.elapsed() < Duration::from_secs(5), "no {reason} event in {:#?}", self.events());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `GET path` on the admin listener, from the gateway's network namespace.
    pub fn admin_get(&self, path: &str) -> Option<(u16, String)> {
        match &self.netns {
            None => admin_get(self.admin, path),
            Some(ns) => {
                let (ns, admin, path) = (Netns { name: ns.clone() }, self.admin, path.to_string());
                let r = ns.enter(move || admin_get(admin, &path));
                std::mem::forget(ns); // not ours to delete
                r
            }
        }
    }

    /// A metric's value from `/metrics` (the first sample whose line starts with `prefix`).
    pub fn metric(&self, prefix: &str) -> Option<f64> {
        let (_, body) = self.admin_get("/metrics")?;
        body.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok())
    }

    /// Stops the process and returns its exit status.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child().try_wait().unwrap() {
                return s;
            }
            assert!(start.elapsed() < limit, "gateway did not exit within {limit:?}");
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

/// `GET path` on the admin listener: (status, body).
pub fn admin_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split(' ').nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((status, body))
}

/// The result of one curl run.
#[derive(Debug)]
pub struct CurlResult {
    /// curl's exit code.
    pub exit: i32,
    /// HTTP status of the last response (0 when none).
    pub status: u16,
    /// Body.
    pub body: String,
}

impl CurlResult {
    /// The body as JSON (the upstream's echo).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }

    /// `request_id:` line of a gateway refusal body.
    pub fn request_id(&self) -> String {
        self.body
            .lines()
            .find_map(|l| l.strip_prefix("request_id: "))
            .unwrap_or_else(|| panic!("no request_id in {self:?}"))
            .to_string()
    }
}

/// Runs curl with `args` (silent, 10 s limit, no environment proxies) and the status appended.
pub fn curl(args: &[&str]) -> CurlResult {
    curl_in(None, args)
}

/// Another binary of this workspace, next to the gateway.
pub fn workspace_bin(name: &str) -> PathBuf {
    let bin = gateway_bin().with_file_name(name);
    assert!(bin.exists(), "{} is missing: run `cargo build --workspace --bins` first", bin.display());
    if std::env::var_os("EGRESS_GATEWAY_BIN").is_none() {
        assert_fresh(&bin);
    }
    bin
}

/// `curl` inside a network namespace.
pub fn curl_in(ns: Option<&Netns>, args: &[&str]) -> CurlResult {
    let mut cmd = match ns {
        Some(n) => n.command("curl"),
        None => Command::new("curl"),
    };
    let out = cmd
        .args(["-s", "--max-time", "10", "--noproxy", "", "-w", "\n%{http_code}"])
        .args(args)
        .env_remove("http_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("https_proxy")
        .env_remove("HTTPS_PROXY")
        .env_remove("ALL_PROXY")
        .env_remove("all_proxy")
        .output()
        .expect("curl (apt-get install curl)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    CurlResult {
        exit: out.status.code().unwrap_or(-1),
        status: code.trim().parse().unwrap_or(0),
        body: body.to_string(),
    }
}

/// Sends raw bytes on a fresh connection and reads the answer until close or `limit`.
pub fn raw_exchange(addr: SocketAddr, bytes: &[u8], limit: Duration) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(limit)).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Reads one HTTP/1.1 response head from a buffered stream: (status, headers lower-cased).
pub fn read_head(r: &mut BufReader<TcpStream>) -> (u16, BTreeMap<String, String>) {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status = line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut headers = BTreeMap::new();
    loop {
        let mut l = String::new();
        if r.read_line(&mut l).unwrap() == 0 || l == "\r\n" {
            return (status, headers);
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
}

/// SOCKS5 CONNECT by hand (no auth) with a domain target: returns the reply code.
pub fn socks5_domain(addr: SocketAddr, host: &str, port: u16) -> (TcpStream, u8) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&[5, 1, 0]).unwrap();
    let mut m = [0u8; 2];
    s.read_exact(&mut m).unwrap();
    assert_eq!(m, [5, 0]);
    let mut req = vec![5, 1, 0, 3, host.len() as u8];
    req.extend_from_slice(host.as_bytes());
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req).unwrap();
    let mut rep = [0u8; 10];
    s.read_exact(&mut rep).unwrap();
    (s, rep[1])
}

/// `text` without ANSI colour sequences (`ESC [ ... letter`).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A short tag unique to this process and call: the test process id and a counter, so that
/// tests running in parallel (threads of one `cargo test` process, or processes under nextest)
/// never pick the same namespace or interface name. At most 9 characters.
pub fn unique_tag() -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}{}", std::process::id() % 100_000, n % 10_000)
}

/// A network namespace created by a test, with its veth links; deleted on drop (also when the
/// test fails). Names carry [`unique_tag`] so that parallel tests never collide.
pub struct Netns {
    /// The namespace name (`ip netns` name).
    pub name: String,
}

impl Netns {
    /// Creates an empty namespace with loopback up.
    pub fn new(tag: &str) -> Netns {
        let name = format!("egw-{tag}-{}", unique_tag());
        let _ = Command::new("ip").args(["netns", "del", &name]).stderr(Stdio::null()).status();
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.exec_ok("ip", &["link", "set", "lo", "up"]);
        ns
    }

    /// Runs a command inside the namespace and asserts success.
    pub fn exec_ok(&self, cmd: &str, args: &[&str]) {
        let mut a = vec!["netns", "exec", &self.name, cmd];
        a.extend_from_slice(args);
        run("ip", &a);
    }

    /// A `Command` that runs inside the namespace.
    pub fn command(&self, cmd: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(cmd);
        c
    }

    /// Connects two namespaces with a veth pair: `(a_if, a_addrs) <-> (b_if, b_addrs)`, addresses
    /// in CIDR form; the first address of each side is primary.
    pub fn link(a: &Netns, a_if: &str, a_addrs: &[&str], b: &Netns, b_if: &str, b_addrs: &[&str]) {
        run("ip", &["link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if, "netns", &b.name]);
        for (ns, ifname, addrs) in [(a, a_if, a_addrs), (b, b_if, b_addrs)] {
            for addr in addrs {
                if addr.contains(':') {
                    // No duplicate address detection: the address is usable at once.
                    ns.exec_ok("ip", &["addr", "add", addr, "dev", ifname, "nodad"]);
                } else {
                    ns.exec_ok("ip", &["addr", "add", addr, "dev", ifname]);
                }
            }
            ns.exec_ok("ip", &["link", "set", ifname, "up"]);
        }
    }

    /// Runs `f` on a thread that has entered this namespace: sockets it creates live there.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn(f).join().expect("netns thread")
    }

    /// Runs `f` on a new thread inside the namespace, without waiting for it.
    pub fn spawn<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("netns file");
            use std::os::fd::AsFd;
            // Only this (new) thread moves.
            rustix::thread::move_into_link_name_space(file.as_fd(), Some(rustix::thread::LinkNameSpaceType::Network))
                .expect("setns");
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace also deletes its veth ends (and their peers).
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl Upstream {
    /// Starts an upstream whose listening socket lives in `ns`.
    pub fn start_in(ns: &Netns, ip: &str) -> Upstream {
        let ip = ip.to_string();
        let std_listener = ns.enter(move || TcpListener::bind((ip.as_str(), 0)).expect("bind upstream in netns"));
        Upstream::serve(std_listener)
    }
}
pub mod kubeapi;
pub mod rbac;

/// A stand-in for the node-redirector's relay: accepts on 127.0.0.1, connects to the gateway's
/// transparent port from `source_ip`, sends a PROXY protocol v2 header signed with the tests'
/// relay key (source = the accepted client, destination = `original_dst`), then copies bytes
/// both ways.
pub struct TestRelay {
    /// Where clients connect.
    pub addr: SocketAddr,
    _rt: tokio::runtime::Runtime,
}

/// The relay key the tests share between the node-redirector, the stand-in relay and the
/// gateway (`$RELAY_KEY` in a gateway config body): a file written once per test process.
pub fn relay_key_file() -> &'static Path {
    static FILE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    FILE.get_or_init(|| {
        // One file for every test process (the same content; written through a rename, so a
        // reader never sees half of it).
        let dir = repo_root().join("target/e2e");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("relay.key");
        let tmp = dir.join(format!(".relay.key.{}", unique_tag()));
        std::fs::write(&tmp, format!("# test relay key\n{RELAY_KEY_B64}\n")).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        path
    })
}

/// The tests' relay key, base64 (32 bytes).
pub const RELAY_KEY_B64: &str = "ZWdyZXNzLWUyZS10ZXN0LXJlbGF5LWtleS0zMi1ieXRlcyE=";

/// A signer with the tests' relay key, as the node-redirector's relay signs.
pub fn relay_signer() -> egress_netio::proxy::Signer {
    let keys = egress_netio::proxy::RelayKey::parse_file(RELAY_KEY_B64).unwrap();
    egress_netio::proxy::Signer::new(keys[0].clone()).unwrap()
}

/// A PROXY protocol v2 header (PROXY command, TCP) with no authentication, written by hand from
/// the specification: what any Pod can write.
pub fn proxy_v2_header(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21);
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            h.push(0x11);
            h.extend_from_slice(&12u16.to_be_bytes());
            h.extend_from_slice(&s.ip().octets());
            h.extend_from_slice(&d.ip().octets());
            h.extend_from_slice(&s.port().to_be_bytes());
            h.extend_from_slice(&d.port().to_be_bytes());
        }
        (SocketAddr::V6(s), SocketAddr::V6(d)) => {
            h.push(0x21);
            h.extend_from_slice(&36u16.to_be_bytes());
            h.extend_from_slice(&s.ip().octets());
            h.extend_from_slice(&d.ip().octets());
            h.extend_from_slice(&s.port().to_be_bytes());
            h.extend_from_slice(&d.port().to_be_bytes());
        }
        _ => panic!("mixed address families"),
    }
    h
}

impl TestRelay {
    /// Starts a relay towards `gateway` for connections to `original_dst`.
    pub fn start(gateway: SocketAddr, source_ip: &str, original_dst: SocketAddr) -> TestRelay {
        TestRelay::start_with_names(gateway, source_ip, original_dst, &[])
    }

    /// Like `start`, stating `names` in the header's DNS names TLV (as the node-redirector
    /// does for the names the Pod resolved to `original_dst`).
    pub fn start_with_names(
        gateway: SocketAddr,
        source_ip: &str,
        original_dst: SocketAddr,
        names: &[&str],
    ) -> TestRelay {
        let names: std::sync::Arc<Vec<String>> = std::sync::Arc::new(names.iter().map(|n| n.to_string()).collect());
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let src: std::net::IpAddr = source_ip.parse().unwrap();
        let signer = std::sync::Arc::new(relay_signer());
        rt.spawn(async move {
            loop {
                let Ok((mut client, peer)) = listener.accept().await else { continue };
                let (signer, names) = (signer.clone(), names.clone());
                tokio::spawn(async move {
                    let sock = tokio::net::TcpSocket::new_v4().unwrap();
                    sock.bind(SocketAddr::new(src, 0)).unwrap();
                    let Ok(mut gw) = sock.connect(gateway).await else { return };
                    use tokio::io::AsyncWriteExt;
                    let names: Vec<&str> = names.iter().map(String::as_str).collect();
                    let header = signer.header_with_names(peer, original_dst, &names, std::time::SystemTime::now());
                    if gw.write_all(&header).await.is_err() {
                        return;
                    }
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut gw).await;
                });
            }
        });
        TestRelay { addr, _rt: rt }
    }
}

/// A real HTTPS upstream: `openssl s_server -www` with a fresh self-signed certificate for `name`.
pub struct TlsUpstream {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The certificate (pass to curl's `--cacert`).
    pub cert: PathBuf,
    _proc: Proc,
    _dir: tempfile::TempDir,
}

impl TlsUpstream {
    /// Starts on `ip` with a certificate for `name`.
    pub fn start(ip: &str, name: &str) -> TlsUpstream {
        TlsUpstream::start_in(None, ip, name, None)
    }

    /// Starts inside `ns` (when given) on `ip` (and `port`, else a free one), certificate for `name`.
    pub fn start_in(ns: Option<&Netns>, ip: &str, name: &str, port: Option<u16>) -> TlsUpstream {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        let ok = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
            .args(["-subj", &format!("/CN={name}"), "-addext", &format!("subjectAltName=DNS:{name}")])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("openssl (apt-get install openssl)");
        assert!(ok.success());
        let pick = || {
            let ip = ip.to_string();
            let free = move || TcpListener::bind((ip.as_str(), 0)).unwrap().local_addr().unwrap().port();
            port.unwrap_or_else(|| match ns {
                Some(n) => n.enter(free),
                None => free(),
            })
        };
        let at = |port: u16| -> SocketAddr {
            if ip.contains(':') { format!("[{ip}]:{port}") } else { format!("{ip}:{port}") }.parse().unwrap()
        };
        let (child, port) = spawn_listening(pick, |port| {
            let mut cmd = match ns {
                Some(n) => n.command("openssl"),
                None => Command::new("openssl"),
            };
            cmd.args(["s_server", "-quiet", "-www", "-accept", &at(port).to_string()])
                .arg("-cert")
                .arg(&cert)
                .arg("-key")
                .arg(&key)
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        });
        TlsUpstream { addr: at(port), cert, _proc: Proc(child), _dir: dir }
    }
}

/// A blocking TCP connection to `dst` from a chosen local address.
pub fn connect_from(src_ip: &str, dst: SocketAddr) -> TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let src: std::net::IpAddr = src_ip.parse().unwrap();
    let s = rt.block_on(async {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(SocketAddr::new(src, 0)).unwrap();
        sock.connect(dst).await.unwrap()
    });
    let std = s.into_std().unwrap();
    std.set_nonblocking(false).unwrap();
    std
}

/// Creates a FIFO at `path` and opens its read end without blocking, with the smallest pipe
/// buffer (4 KiB): a writer stalls after a few lines unless it is drained.
pub fn small_fifo(path: &std::path::Path) -> std::fs::File {
    use std::os::unix::fs::OpenOptionsExt;
    rustix::fs::mknodat(rustix::fs::CWD, path, rustix::fs::FileType::Fifo, rustix::fs::Mode::from_raw_mode(0o600), 0)
        .expect("mkfifo");
    let reader = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).unwrap();
    assert!(rustix::pipe::fcntl_setpipe_size(&reader, 4096).expect("F_SETPIPE_SZ") >= 4096);
    reader
}
