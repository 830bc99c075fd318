//! PROXY protocol v2 as the node-redirector's relay writes it and the gateway's transparent front
//! reads it, with an authentication TLV that only a holder of the relay key can produce.
//!
//! Why a MAC: a node that masquerades its Pods' traffic makes a Pod's connection to the gateway
//! arrive from the node's address, the very address `transparent.trustedRelays` admits. The
//! source address is no proof of the relay, so every header the relay writes carries
//!
//! ```text
//! TLV type 0xE7 (in the spec's custom range 0xE0-0xEF), 57 bytes:
//!   version   u8      1
//!   timestamp u64 BE  Unix seconds when the header was written
//!   nonce     16      sender id (8 random bytes per relay process) || counter u64 BE
//!   mac       32      HMAC-SHA256(key, the whole header with these 32 bytes zeroed)
//! ```
//!
//! The MAC covers everything the gateway believes: command, both addresses and ports, every TLV.
//! The gateway accepts a header only when the MAC verifies under one of its keys, the timestamp
//! is within the allowed skew of its own clock, and the nonce was not seen before (a sliding
//! window per sender, as IPsec and WireGuard keep one), so a captured header cannot be replayed.
//! Cost: one HMAC-SHA256 over about 100 bytes per connection on each side (see the `proxy_auth`
//! bench); the relay keeps splicing, since the bytes after the header are not touched.
//!
//! A second TLV of ours carries the DNS names the client (a Pod) recently resolved to the
//! original destination address, as the node-redirector's DNS forwarder saw them answered, so
//! that the gateway can decide a connection whose payload names nothing (no SNI, no Host):
//!
//! ```text
//! TLV type 0xE8, at most [`MAX_DNS_NAMES`] names, the most recently answered first:
//!   (length u8, name)...   each name 1-253 bytes of canonical DNS: lower-case a-z 0-9 - _,
//!                          labels of 1-63 separated by dots, no trailing dot
//! ```
//!
//! Like everything else in the header it is covered by the MAC, so only a relay holding the key
//! can state names; a header with a malformed names TLV is refused whole.
//!
//! The parser is a pure function of its input, and refuses anything it does not fully
//! understand: a wrong signature or version, an unknown command or family, a length beyond
//! [`MAX_LEN`], a TLV running past the end, two authentication or names TLVs, a names TLV that
//! is not a list of canonical DNS names.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use ring::hmac;

/// The 12-byte signature every v2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Longest header accepted, fixed part included: room for an IPv6 address block, the names TLV
/// at its largest and the authentication TLV, far from the 64 KiB the length field could claim.
pub const MAX_LEN: usize = 4608;
/// The authentication TLV's type.
pub const AUTH_TLV: u8 = 0xE7;
/// The DNS names TLV's type.
pub const DNS_NAMES_TLV: u8 = 0xE8;
/// Most names the names TLV carries.
pub const MAX_DNS_NAMES: usize = 16;
const AUTH_VERSION: u8 = 1;
const NONCE_LEN: usize = 16;
const MAC_LEN: usize = 32;
const AUTH_LEN: usize = 1 + 8 + NONCE_LEN + MAC_LEN;
/// Shortest key accepted, in bytes (HMAC-SHA256's block of security).
pub const MIN_KEY_LEN: usize = 32;

/// A LOCAL header (a health check: no client connection follows).
pub const LOCAL: [u8; 16] = {
    let mut h = [0u8; 16];
    let mut i = 0;
    while i < 12 {
        h[i] = SIGNATURE[i];
        i += 1;
    }
    h[12] = 0x20;
    h
};

/// Why a header was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyError {
    /// Not a PROXY v2 signature.
    Signature,
    /// Version other than 2.
    Version(u8),
    /// Command other than LOCAL (0) or PROXY (1).
    Command(u8),
    /// Length field beyond [`MAX_LEN`].
    TooLong(usize),
    /// Fewer bytes than the length field says, or an address block cut short.
    Truncated,
    /// Transport other than STREAM (TCP).
    NotStream,
    /// Address family other than IPv4 or IPv6.
    Family(u8),
    /// A TLV runs past the end of the header.
    BadTlv,
    /// More than one authentication TLV.
    DuplicateAuth,
    /// A names TLV that is not a list of at most [`MAX_DNS_NAMES`] canonical DNS names, or two
    /// of them.
    BadDnsNames,
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProxyError::Signature => write!(f, "not a PROXY protocol v2 header"),
            ProxyError::Version(v) => write!(f, "PROXY protocol version {v}, only 2 is accepted"),
            ProxyError::Command(c) => write!(f, "PROXY command {c} is neither LOCAL nor PROXY"),
            ProxyError::TooLong(n) => write!(f, "PROXY header of {n} bytes is longer than {MAX_LEN}"),
            ProxyError::Truncated => write!(f, "PROXY header shorter than its length field or address block"),
            ProxyError::NotStream => write!(f, "only TCP (STREAM) is proxied"),
            ProxyError::Family(x) => write!(f, "address family {x:#x} is neither IPv4 nor IPv6"),
            ProxyError::BadTlv => write!(f, "a TLV runs past the end of the PROXY header"),
            ProxyError::DuplicateAuth => write!(f, "more than one relay authentication TLV"),
            ProxyError::BadDnsNames => {
                write!(f, "the DNS names TLV is not one list of at most {MAX_DNS_NAMES} canonical DNS names")
            }
        }
    }
}

impl std::error::Error for ProxyError {}

/// The total length of the header whose first 16 bytes are `head` (fixed part included).
pub fn header_len(head: &[u8; 16]) -> Result<usize, ProxyError> {
    if head[..12] != SIGNATURE {
        return Err(ProxyError::Signature);
    }
    if head[12] >> 4 != 2 {
        return Err(ProxyError::Version(head[12] >> 4));
    }
    let len = 16 + u16::from_be_bytes([head[14], head[15]]) as usize;
    if len > MAX_LEN {
        return Err(ProxyError::TooLong(len));
    }
    Ok(len)
}

/// A parsed header; borrows the raw bytes, which the MAC is checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header<'a> {
    /// `None` for LOCAL; `Some((source, destination))` for PROXY.
    pub addresses: Option<(SocketAddr, SocketAddr)>,
    raw: &'a [u8],
    /// Offset of the authentication TLV's value in `raw`.
    auth: Option<usize>,
    /// Range of the names TLV's value in `raw` (already checked).
    names: Option<(usize, usize)>,
}

impl<'a> Header<'a> {
    /// The DNS names of the names TLV, most recently answered first (none without one). Trust
    /// them only once the header's MAC verified.
    pub fn dns_names(&self) -> impl Iterator<Item = &'a str> + 'a {
        let raw: &'a [u8] = self.raw;
        let mut at = self.names.map_or(0, |(a, _)| a);
        let end = self.names.map_or(0, |(_, e)| e);
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let len = raw[at] as usize;
            let name = std::str::from_utf8(&raw[at + 1..at + 1 + len]).ok()?;
            at += 1 + len;
            Some(name)
        })
    }
}

/// Whether `name` is a canonical DNS name as the names TLV carries it: 1-253 bytes, lower-case
/// `a-z 0-9 - _`, dot-separated labels of 1-63 bytes, no trailing dot.
pub fn is_canonical_dns_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split(|&b| b == b'.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.iter().all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        })
}

/// Checks a names TLV value: at most [`MAX_DNS_NAMES`] length-prefixed canonical names, nothing
/// left over.
fn check_names(value: &[u8]) -> Result<(), ProxyError> {
    let (mut at, mut count) = (0, 0);
    while at < value.len() {
        let len = value[at] as usize;
        let name = value.get(at + 1..at + 1 + len).ok_or(ProxyError::BadDnsNames)?;
        count += 1;
        if count > MAX_DNS_NAMES || !is_canonical_dns_name(name) {
            return Err(ProxyError::BadDnsNames);
        }
        at += 1 + len;
    }
    if count == 0 {
        return Err(ProxyError::BadDnsNames);
    }
    Ok(())
}

/// Parses one complete header (exactly [`header_len`] bytes).
pub fn parse(raw: &[u8]) -> Result<Header<'_>, ProxyError> {
    let head: &[u8; 16] = raw.get(..16).and_then(|h| h.try_into().ok()).ok_or(ProxyError::Truncated)?;
    let len = header_len(head)?;
    if raw.len() != len {
        return Err(ProxyError::Truncated);
    }
    let body = &raw[16..];
    let (addresses, used) = match head[12] & 0x0f {
        0 => (None, 0), // LOCAL: the address block, if any, is ignored (the spec says so)
        1 => {
            let (family, proto) = (head[13] >> 4, head[13] & 0x0f);
            if proto != 1 {
                return Err(ProxyError::NotStream);
            }
            match family {
                1 => {
                    let b: &[u8; 12] = body.get(..12).and_then(|b| b.try_into().ok()).ok_or(ProxyError::Truncated)?;
                    let ip = |o: usize| IpAddr::V4(Ipv4Addr::new(b[o], b[o + 1], b[o + 2], b[o + 3]));
                    let port = |o: usize| u16::from_be_bytes([b[o], b[o + 1]]);
                    (Some((SocketAddr::new(ip(0), port(8)), SocketAddr::new(ip(4), port(10)))), 12)
                }
                2 => {
                    let b: &[u8; 36] = body.get(..36).and_then(|b| b.try_into().ok()).ok_or(ProxyError::Truncated)?;
                    let ip = |o: usize| {
                        let mut a = [0u8; 16];
                        a.copy_from_slice(&b[o..o + 16]);
                        IpAddr::V6(Ipv6Addr::from(a))
                    };
                    let port = |o: usize| u16::from_be_bytes([b[o], b[o + 1]]);
                    (Some((SocketAddr::new(ip(0), port(32)), SocketAddr::new(ip(16), port(34)))), 36)
                }
                f => return Err(ProxyError::Family(f)),
            }
        }
        c => return Err(ProxyError::Command(c)),
    };
    // TLVs: type u8, length u16 BE, value.
    let mut auth = None;
    let mut names = None;
    if addresses.is_some() {
        let mut at = 16 + used;
        while at < raw.len() {
            let t = raw.get(at..at + 3).ok_or(ProxyError::BadTlv)?;
            let vlen = u16::from_be_bytes([t[1], t[2]]) as usize;
            let value = at + 3;
            if value + vlen > raw.len() {
                return Err(ProxyError::BadTlv);
            }
            if t[0] == AUTH_TLV {
                if auth.is_some() {
                    return Err(ProxyError::DuplicateAuth);
                }
                auth = Some(value);
            }
            if t[0] == DNS_NAMES_TLV {
                if names.is_some() {
                    return Err(ProxyError::BadDnsNames);
                }
                check_names(&raw[value..value + vlen])?;
                names = Some((value, value + vlen));
            }
            at = value + vlen;
        }
    }
    Ok(Header { addresses, raw, auth, names })
}

/// A relay key (HMAC-SHA256). Its `Debug` never shows the key.
#[derive(Clone)]
pub struct RelayKey(hmac::Key);

impl fmt::Debug for RelayKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RelayKey(..)")
    }
}

impl RelayKey {
    /// A key from raw bytes; at least [`MIN_KEY_LEN`].
    pub fn new(bytes: &[u8]) -> Result<RelayKey, String> {
        if bytes.len() < MIN_KEY_LEN {
            return Err(format!("a relay key needs at least {MIN_KEY_LEN} bytes, this one has {}", bytes.len()));
        }
        Ok(RelayKey(hmac::Key::new(hmac::HMAC_SHA256, bytes)))
    }

    /// The keys of a key file: one base64 key per line (`openssl rand -base64 32`), blank lines
    /// and `#` comments ignored, at least one. The relay signs with the first; the gateway
    /// accepts any (add the new key on the gateway first to rotate, then on the relays).
    pub fn parse_file(text: &str) -> Result<Vec<RelayKey>, String> {
        let mut keys = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(line)
                .map_err(|e| format!("line {}: not base64 ({e})", i + 1))?;
            keys.push(RelayKey::new(&bytes).map_err(|e| format!("line {}: {e}", i + 1))?);
        }
        if keys.is_empty() {
            return Err("no key in the file (one base64 key per line: `openssl rand -base64 32`)".into());
        }
        Ok(keys)
    }

    /// [`RelayKey::parse_file`] on a file's contents; errors name the file.
    pub fn load(path: &std::path::Path) -> Result<Vec<RelayKey>, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        RelayKey::parse_file(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// Writes signed headers (the relay's side).
pub struct Signer {
    key: RelayKey,
    sender: [u8; 8],
    counter: AtomicU64,
}

impl Signer {
    /// A signer with a fresh random sender id.
    pub fn new(key: RelayKey) -> Result<Signer, String> {
        let mut sender = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut sender)
            .map_err(|_| "no randomness for the relay's sender id".to_string())?;
        Ok(Signer { key, sender, counter: AtomicU64::new(0) })
    }

    /// The PROXY header for a TCP connection from `source` to `original` (the destination the
    /// client dialled), signed at `now`. Mixed families are written as IPv6 (IPv4-mapped), or
    /// as IPv4 when the IPv6 side is itself IPv4-mapped.
    pub fn header(&self, source: SocketAddr, original: SocketAddr, now: SystemTime) -> Vec<u8> {
        self.header_with_names(source, original, &[], now)
    }

    /// [`Signer::header`] with a names TLV carrying `names` (the first [`MAX_DNS_NAMES`]
    /// canonical ones; none: no TLV).
    pub fn header_with_names(
        &self,
        source: SocketAddr,
        original: SocketAddr,
        names: &[&str],
        now: SystemTime,
    ) -> Vec<u8> {
        let (source, original) = same_family(source, original);
        let mut tlv = Vec::new();
        for n in names.iter().filter(|n| is_canonical_dns_name(n.as_bytes())).take(MAX_DNS_NAMES) {
            tlv.push(n.len() as u8);
            tlv.extend_from_slice(n.as_bytes());
        }
        let mut h = Vec::with_capacity(16 + 36 + 3 + AUTH_LEN);
        h.extend_from_slice(&SIGNATURE);
        h.push(0x21);
        let addr_len = match (source, original) {
            (SocketAddr::V4(s), SocketAddr::V4(o)) => {
                h.push(0x11);
                h.extend_from_slice(&[0, 0]);
                h.extend_from_slice(&s.ip().octets());
                h.extend_from_slice(&o.ip().octets());
                12
            }
            (s, o) => {
                h.push(0x21);
                h.extend_from_slice(&[0, 0]);
                h.extend_from_slice(&v6(s.ip()).octets());
                h.extend_from_slice(&v6(o.ip()).octets());
                36
            }
        };
        h.extend_from_slice(&source.port().to_be_bytes());
        h.extend_from_slice(&original.port().to_be_bytes());
        let names_len = if tlv.is_empty() { 0 } else { 3 + tlv.len() };
        let len = (addr_len + names_len + 3 + AUTH_LEN) as u16;
        h[14..16].copy_from_slice(&len.to_be_bytes());
        if !tlv.is_empty() {
            h.push(DNS_NAMES_TLV);
            h.extend_from_slice(&(tlv.len() as u16).to_be_bytes());
            h.extend_from_slice(&tlv);
        }
        h.push(AUTH_TLV);
        h.extend_from_slice(&(AUTH_LEN as u16).to_be_bytes());
        h.push(AUTH_VERSION);
        h.extend_from_slice(&unix_seconds(now).to_be_bytes());
        h.extend_from_slice(&self.sender);
        h.extend_from_slice(&(self.counter.fetch_add(1, Ordering::Relaxed) + 1).to_be_bytes());
        let mac_at = h.len();
        h.extend_from_slice(&[0u8; MAC_LEN]);
        let tag = hmac::sign(&self.key.0, &h);
        h[mac_at..].copy_from_slice(tag.as_ref());
        h
    }
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    }
}

fn same_family(source: SocketAddr, original: SocketAddr) -> (SocketAddr, SocketAddr) {
    match (source, original) {
        (SocketAddr::V6(s), SocketAddr::V4(o)) => match s.ip().to_ipv4_mapped() {
            Some(v4) => (SocketAddr::from((v4, s.port())), SocketAddr::V4(o)),
            None => (SocketAddr::V6(s), SocketAddr::from((o.ip().to_ipv6_mapped(), o.port()))),
        },
        (SocketAddr::V4(s), SocketAddr::V6(o)) => match o.ip().to_ipv4_mapped() {
            Some(v4) => (SocketAddr::V4(s), SocketAddr::from((v4, o.port()))),
            None => (SocketAddr::from((s.ip().to_ipv6_mapped(), s.port())), SocketAddr::V6(o)),
        },
        other => other,
    }
}

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Why an authenticated header was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// No authentication TLV: not written by a relay that holds a key.
    Missing,
    /// A TLV of another version or length.
    Malformed,
    /// The MAC verifies under none of the keys.
    BadMac,
    /// The timestamp is further from this clock than the allowed skew (seconds, signed: negative
    /// = from the future).
    Stale(i64),
    /// This nonce was seen before (or is older than the replay window).
    Replayed,
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthError::Missing => write!(f, "no relay authentication in the PROXY header"),
            AuthError::Malformed => write!(f, "relay authentication TLV of an unknown version or length"),
            AuthError::BadMac => write!(f, "relay authentication does not verify under any relay key"),
            AuthError::Stale(age) => write!(f, "relay authentication is {age} s old, beyond the allowed skew"),
            AuthError::Replayed => write!(f, "relay authentication nonce replayed"),
        }
    }
}

impl std::error::Error for AuthError {}

/// Bits in each sender's replay window: a header may arrive this many counters behind the newest
/// one seen from the same relay process and still be accepted once.
pub const REPLAY_WINDOW: u64 = 8192;

struct Window {
    newest: u64,
    bits: Box<[u64; (REPLAY_WINDOW / 64) as usize]>,
    seen: Instant,
}

impl Window {
    fn new(counter: u64) -> Window {
        let mut w =
            Window { newest: counter, bits: Box::new([0; (REPLAY_WINDOW / 64) as usize]), seen: Instant::now() };
        w.set(counter);
        w
    }

    fn bit(c: u64) -> (usize, u64) {
        let i = c % REPLAY_WINDOW;
        ((i / 64) as usize, 1 << (i % 64))
    }

    fn set(&mut self, c: u64) {
        let (w, b) = Window::bit(c);
        self.bits[w] |= b;
    }

    /// Records `c`; false when it was seen before or is too old to tell.
    fn accept(&mut self, c: u64) -> bool {
        self.seen = Instant::now();
        if c > self.newest {
            if c - self.newest >= REPLAY_WINDOW {
                self.bits.fill(0);
            } else {
                for x in self.newest + 1..=c {
                    let (w, b) = Window::bit(x);
                    self.bits[w] &= !b;
                }
            }
            self.newest = c;
            self.set(c);
            return true;
        }
        if self.newest - c >= REPLAY_WINDOW {
            return false;
        }
        let (w, b) = Window::bit(c);
        if self.bits[w] & b != 0 {
            return false;
        }
        self.bits[w] |= b;
        true
    }
}

/// The replay windows, one per relay process (sender id). Kept for the gateway's lifetime, across
/// configuration reloads (a key change must not reopen the window for headers already seen).
#[derive(Default)]
pub struct ReplayGuard {
    windows: Mutex<HashMap<[u8; 8], Window>>,
}

impl ReplayGuard {
    /// Records `counter` of `sender`; false when it was seen before. A sender silent for twice
    /// `max_skew` can only send fresh headers (anything it wrote before is stale), so its window
    /// can go: windows are pruned when a new sender arrives (the only time the map grows), not
    /// on every connection.
    fn accept(&self, sender: [u8; 8], counter: u64, max_skew: Duration) -> bool {
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = windows.get_mut(&sender) {
            return w.accept(counter);
        }
        windows.retain(|_, w| w.seen.elapsed() <= max_skew * 2);
        windows.insert(sender, Window::new(counter));
        true
    }
}

/// Checks signed headers (the gateway's side): the keys and the allowed clock skew.
#[derive(Clone)]
pub struct Verifier {
    keys: Vec<RelayKey>,
    max_skew: Duration,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier").field("keys", &self.keys.len()).field("max_skew", &self.max_skew).finish()
    }
}

impl Verifier {
    /// A verifier accepting any of `keys`, timestamps within `max_skew` of this clock.
    pub fn new(keys: Vec<RelayKey>, max_skew: Duration) -> Verifier {
        Verifier { keys, max_skew }
    }

    /// Accepts `h` once: the MAC verifies, the timestamp is fresh, the nonce is new to `replay`.
    pub fn verify(&self, h: &Header<'_>, now: SystemTime, replay: &ReplayGuard) -> Result<(), AuthError> {
        let at = h.auth.ok_or(AuthError::Missing)?;
        let end = at + AUTH_LEN;
        let tlv_len = u16::from_be_bytes([h.raw[at - 2], h.raw[at - 1]]) as usize;
        if tlv_len != AUTH_LEN || h.raw[at] != AUTH_VERSION {
            return Err(AuthError::Malformed);
        }
        let v = &h.raw[at..end];
        let field = |r: std::ops::Range<usize>| -> [u8; 8] { v[r].try_into().unwrap_or([0; 8]) };
        let stamp = u64::from_be_bytes(field(1..9));
        let age = unix_seconds(now) as i64 - stamp as i64;
        if age.unsigned_abs() > self.max_skew.as_secs() {
            return Err(AuthError::Stale(age));
        }
        let mut zeroed = [0u8; MAX_LEN];
        let raw = &mut zeroed[..h.raw.len()];
        raw.copy_from_slice(h.raw);
        raw[end - MAC_LEN..end].fill(0);
        let mac = &h.raw[end - MAC_LEN..end];
        if !self.keys.iter().any(|k| hmac::verify(&k.0, raw, mac).is_ok()) {
            return Err(AuthError::BadMac);
        }
        if !replay.accept(field(9..17), u64::from_be_bytes(field(17..25)), self.max_skew) {
            return Err(AuthError::Replayed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> RelayKey {
        RelayKey::new(&[b; 32]).unwrap()
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn round_trips_both_families_and_mixed_ones() {
        let s = Signer::new(key(1)).unwrap();
        let now = SystemTime::now();
        for (src, dst, want) in [
            ("10.0.0.1:40000", "93.184.216.34:443", ("10.0.0.1:40000", "93.184.216.34:443")),
            ("[2001:db8::1]:5", "[2001:db8::2]:6", ("[2001:db8::1]:5", "[2001:db8::2]:6")),
            ("[::ffff:10.0.0.1]:7", "1.2.3.4:8", ("10.0.0.1:7", "1.2.3.4:8")),
            ("[2001:db8::1]:7", "1.2.3.4:8", ("[2001:db8::1]:7", "[::ffff:1.2.3.4]:8")),
            ("10.0.0.1:7", "[2001:db8::2]:8", ("[::ffff:10.0.0.1]:7", "[2001:db8::2]:8")),
        ] {
            let raw = s.header(sa(src), sa(dst), now);
            assert_eq!(header_len(raw[..16].try_into().unwrap()), Ok(raw.len()));
            let h = parse(&raw).unwrap();
            assert_eq!(h.addresses, Some((sa(want.0), sa(want.1))));
            Verifier::new(vec![key(1)], Duration::from_secs(30)).verify(&h, now, &ReplayGuard::default()).unwrap();
        }
    }

    #[test]
    fn carries_dns_names_under_the_mac() {
        let s = Signer::new(key(1)).unwrap();
        let now = SystemTime::now();
        let names = ["db.example.com", "x_y.internal-1.example", "a"];
        let raw = s.header_with_names(sa("[2001:db8::1]:5"), sa("[2001:db8::2]:5432"), &names, now);
        let h = parse(&raw).unwrap();
        assert_eq!(h.dns_names().collect::<Vec<_>>(), names);
        Verifier::new(vec![key(1)], Duration::from_secs(30)).verify(&h, now, &ReplayGuard::default()).unwrap();
        // A name changed in flight (still canonical): the MAC no longer verifies.
        let mut forged = raw.clone();
        let at = forged.windows(2).position(|w| w == b"db").unwrap();
        forged[at] = b'x';
        let h = parse(&forged).unwrap();
        assert_eq!(h.dns_names().next(), Some("xb.example.com"));
        let v = Verifier::new(vec![key(1)], Duration::from_secs(30));
        assert_eq!(v.verify(&h, now, &ReplayGuard::default()), Err(AuthError::BadMac));
        // At most 16 names, non-canonical ones left out by the signer.
        let many: Vec<String> = (0..20).map(|i| format!("n{i}.example")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).chain(["Upper.example", "trailing.dot."]).collect();
        let raw = s.header_with_names(sa("10.0.0.1:1"), sa("10.0.0.2:2"), &many, now);
        assert_eq!(parse(&raw).unwrap().dns_names().count(), MAX_DNS_NAMES);
        // The longest names TLV fits.
        let long = format!("{}.{}.{}.{}", "a".repeat(63), "b".repeat(63), "c".repeat(63), "d".repeat(61));
        let raw = s.header_with_names(sa("[2001:db8::1]:5"), sa("[2001:db8::2]:5"), &[long.as_str(); 16], now);
        assert!(raw.len() <= MAX_LEN);
        assert_eq!(parse(&raw).unwrap().dns_names().count(), 16);
    }

    /// A header carrying `value` as its names TLV (unsigned: only the parser is exercised).
    fn with_names_tlv(value: &[u8], twice: bool) -> Vec<u8> {
        let mut h = SIGNATURE.to_vec();
        h.extend_from_slice(&[0x21, 0x11, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2, 0, 1, 0, 2]);
        for _ in 0..if twice { 2 } else { 1 } {
            h.push(DNS_NAMES_TLV);
            h.extend_from_slice(&(value.len() as u16).to_be_bytes());
            h.extend_from_slice(value);
        }
        let len = (h.len() - 16) as u16;
        h[14..16].copy_from_slice(&len.to_be_bytes());
        h
    }

    #[test]
    fn rejects_names_tlvs_that_are_not_canonical_name_lists() {
        assert!(parse(&with_names_tlv(b"\x02ok", false)).is_ok());
        for (value, why) in [
            (&b""[..], "no name"),
            (b"\x00", "an empty name"),
            (b"\x02Ok", "upper case"),
            (b"\x03ok.", "a trailing dot"),
            (b"\x03a..b"[..4].as_ref(), "an empty label"),
            (b"\x05ok", "a length past the end"),
            (b"\x02ok\x01", "a length byte without its name"),
            (b"\x03o k", "a space"),
            (b"\x02\xc3\xa9", "not ASCII"),
        ] {
            assert_eq!(parse(&with_names_tlv(value, false)), Err(ProxyError::BadDnsNames), "{why}");
        }
        let seventeen: Vec<u8> = (0..17).flat_map(|_| b"\x01a".iter().copied()).collect();
        assert_eq!(parse(&with_names_tlv(&seventeen, false)), Err(ProxyError::BadDnsNames));
        assert_eq!(parse(&with_names_tlv(b"\x02ok", true)), Err(ProxyError::BadDnsNames), "two names TLVs");
        let label64 = [&[64u8][..], &[b'a'; 64]].concat();
        assert_eq!(parse(&with_names_tlv(&label64, false)), Err(ProxyError::BadDnsNames), "a 64-byte label");
    }

    #[test]
    fn local_is_a_health_check() {
        assert_eq!(header_len(&LOCAL), Ok(16));
        let h = parse(&LOCAL).unwrap();
        assert_eq!(h.addresses, None);
    }

    #[test]
    fn rejects_a_wrong_signature_version_command_family_or_transport() {
        let s = Signer::new(key(1)).unwrap();
        let good = s.header(sa("10.0.0.1:1"), sa("10.0.0.2:2"), SystemTime::now());
        let mut h = good.clone();
        h[0] = b'X';
        assert_eq!(parse(&h), Err(ProxyError::Signature));
        let mut h = good.clone();
        h[12] = 0x11;
        assert_eq!(parse(&h), Err(ProxyError::Version(1)));
        let mut h = good.clone();
        h[12] = 0x22;
        assert_eq!(parse(&h), Err(ProxyError::Command(2)));
        let mut h = good.clone();
        h[13] = 0x12;
        assert_eq!(parse(&h), Err(ProxyError::NotStream));
        let mut h = good.clone();
        h[13] = 0x31;
        assert_eq!(parse(&h), Err(ProxyError::Family(3)));
    }

    #[test]
    fn rejects_lengths_that_lie() {
        let s = Signer::new(key(1)).unwrap();
        let good = s.header(sa("10.0.0.1:1"), sa("10.0.0.2:2"), SystemTime::now());
        assert_eq!(parse(&good[..good.len() - 1]), Err(ProxyError::Truncated));
        assert_eq!(parse(&good[..10]), Err(ProxyError::Truncated));
        let mut long = LOCAL;
        long[14..16].copy_from_slice(&60000u16.to_be_bytes());
        assert_eq!(header_len(&long), Err(ProxyError::TooLong(60016)));
        // An address block shorter than its family needs.
        let mut h = LOCAL.to_vec();
        h[12] = 0x21;
        h[13] = 0x21;
        h[14..16].copy_from_slice(&12u16.to_be_bytes());
        h.extend_from_slice(&[0; 12]);
        assert_eq!(parse(&h), Err(ProxyError::Truncated));
        // A TLV whose length runs past the end.
        let mut h = good.clone();
        let tlv = 16 + 12;
        h[tlv + 1..tlv + 3].copy_from_slice(&100u16.to_be_bytes());
        assert_eq!(parse(&h), Err(ProxyError::BadTlv));
        // A TLV header cut short.
        let mut h = LOCAL.to_vec();
        h[12] = 0x21;
        h[13] = 0x11;
        h[14..16].copy_from_slice(&14u16.to_be_bytes());
        h.extend_from_slice(&[0; 14]);
        assert_eq!(parse(&h), Err(ProxyError::BadTlv));
    }

    #[test]
    fn rejects_two_auth_tlvs() {
        let s = Signer::new(key(1)).unwrap();
        let good = s.header(sa("10.0.0.1:1"), sa("10.0.0.2:2"), SystemTime::now());
        let tlv = good[28..].to_vec();
        let mut h = good.clone();
        h.extend_from_slice(&tlv);
        let len = (h.len() - 16) as u16;
        h[14..16].copy_from_slice(&len.to_be_bytes());
        assert_eq!(parse(&h), Err(ProxyError::DuplicateAuth));
    }

    #[test]
    fn rejects_headers_without_auth_or_with_the_wrong_key() {
        let now = SystemTime::now();
        let (v, r) = (Verifier::new(vec![key(1)], Duration::from_secs(30)), ReplayGuard::default());
        // A plain header (as any Pod can write): no TLV.
        let mut plain = LOCAL.to_vec();
        plain[12] = 0x21;
        plain[13] = 0x11;
        plain[14..16].copy_from_slice(&12u16.to_be_bytes());
        plain.extend_from_slice(&[10, 0, 0, 1, 1, 2, 3, 4, 0, 1, 1, 187]);
        assert_eq!(v.verify(&parse(&plain).unwrap(), now, &r), Err(AuthError::Missing));
        let forged = Signer::new(key(2)).unwrap().header(sa("10.0.0.1:1"), sa("1.2.3.4:443"), now);
        assert_eq!(v.verify(&parse(&forged).unwrap(), now, &r), Err(AuthError::BadMac));
        // Any key of several.
        let two = Verifier::new(vec![key(3), key(2)], Duration::from_secs(30));
        assert_eq!(two.verify(&parse(&forged).unwrap(), now, &r), Ok(()));
    }

    #[test]
    fn rejects_any_changed_byte() {
        let now = SystemTime::now();
        let s = Signer::new(key(1)).unwrap();
        let good = s.header(sa("10.0.0.1:40000"), sa("93.184.216.34:443"), now);
        for i in 0..good.len() {
            let mut h = good.clone();
            h[i] ^= 0x01;
            let v = Verifier::new(vec![key(1)], Duration::from_secs(3600));
            let r = parse(&h)
                .map_err(|e| e.to_string())
                .and_then(|p| v.verify(&p, now, &ReplayGuard::default()).map_err(|e| e.to_string()));
            assert!(r.is_err(), "byte {i} changed and still accepted");
        }
    }

    #[test]
    fn rejects_stale_and_future_timestamps() {
        let s = Signer::new(key(1)).unwrap();
        let (v, r) = (Verifier::new(vec![key(1)], Duration::from_secs(30)), ReplayGuard::default());
        let now = SystemTime::now();
        let old = s.header(sa("10.0.0.1:1"), sa("1.2.3.4:443"), now - Duration::from_secs(31));
        assert!(matches!(v.verify(&parse(&old).unwrap(), now, &r), Err(AuthError::Stale(31))));
        let future = s.header(sa("10.0.0.1:1"), sa("1.2.3.4:443"), now + Duration::from_secs(40));
        assert!(matches!(v.verify(&parse(&future).unwrap(), now, &r), Err(AuthError::Stale(-40))));
        let ok = s.header(sa("10.0.0.1:1"), sa("1.2.3.4:443"), now - Duration::from_secs(29));
        assert_eq!(v.verify(&parse(&ok).unwrap(), now, &r), Ok(()));
    }

    #[test]
    fn rejects_replays_and_accepts_reordering_within_the_window() {
        let s = Signer::new(key(1)).unwrap();
        let (v, r) = (Verifier::new(vec![key(1)], Duration::from_secs(30)), ReplayGuard::default());
        let now = SystemTime::now();
        let hs: Vec<Vec<u8>> = (0..5).map(|_| s.header(sa("10.0.0.1:1"), sa("1.2.3.4:443"), now)).collect();
        for i in [2, 0, 4, 1, 3] {
            assert_eq!(v.verify(&parse(&hs[i]).unwrap(), now, &r), Ok(()), "header {i}");
        }
        for h in &hs {
            assert_eq!(v.verify(&parse(h).unwrap(), now, &r), Err(AuthError::Replayed));
        }
        // Beyond the window behind the newest: refused (it cannot be told apart from a replay).
        let late = s.header(sa("10.0.0.1:1"), sa("1.2.3.4:443"), now);
        for _ in 0..REPLAY_WINDOW {
            s.header(sa("10.0.0.1:1"), sa("1.2.3.4:443"), now);
        }
        let newest = s.header(sa("10.0.0.1:1"), sa("1.2.3.4:443"), now);
        assert_eq!(v.verify(&parse(&newest).unwrap(), now, &r), Ok(()));
        assert_eq!(v.verify(&parse(&late).unwrap(), now, &r), Err(AuthError::Replayed));
        // Another relay process (another sender id) has its own window.
        let other = Signer::new(key(1)).unwrap();
        assert_eq!(v.verify(&parse(&other.header(sa("10.0.0.1:1"), sa("1.2.3.4:443"), now)).unwrap(), now, &r), Ok(()));
    }

    #[test]
    fn key_files() {
        let k = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        assert_eq!(RelayKey::parse_file(&format!("# rotated 2026-11\n\n{k}\n{k}\n")).unwrap().len(), 2);
        assert!(RelayKey::parse_file("# nothing\n").unwrap_err().contains("no key"));
        assert!(RelayKey::parse_file("not base64!\n").unwrap_err().starts_with("line 1: not base64"));
        let short = base64::engine::general_purpose::STANDARD.encode([7u8; 16]);
        assert!(RelayKey::parse_file(&short).unwrap_err().contains("at least 32 bytes"));
        assert_eq!(format!("{:?}", key(1)), "RelayKey(..)");
    }

    proptest::proptest! {
        /// Hostile bytes: parsing and verifying never panic, and nothing unsigned is accepted.
        #[test]
        fn arbitrary_bytes_never_panic_nor_verify(mut bytes in proptest::collection::vec(proptest::num::u8::ANY, 16..300), proxy in proptest::bool::ANY) {
            if proxy {
                bytes[..12].copy_from_slice(&SIGNATURE);
                bytes[12] = 0x21;
                let len = (bytes.len() - 16) as u16;
                bytes[14..16].copy_from_slice(&len.to_be_bytes());
            }
            let v = Verifier::new(vec![key(1)], Duration::from_secs(u32::MAX as u64));
            if let Ok(h) = parse(&bytes) {
                proptest::prop_assert!(v.verify(&h, SystemTime::now(), &ReplayGuard::default()).is_err());
            }
        }

        /// Hostile names TLVs (names of any bytes and lengths, length bytes that lie): never a
        /// panic, and whatever parses yields canonical names only, at most 16.
        #[test]
        fn hostile_names_tlvs_never_panic_and_yield_only_canonical_names(
            names in proptest::collection::vec(proptest::collection::vec(proptest::sample::select(b"ab-_.Z0 \xff".to_vec()), 0..70), 0..20),
            lie in proptest::option::of(proptest::num::u8::ANY),
        ) {
            let mut value = Vec::new();
            for n in &names {
                value.push(lie.unwrap_or(n.len() as u8));
                value.extend_from_slice(n);
            }
            if let Ok(h) = parse(&with_names_tlv(&value, false)) {
                let got: Vec<&str> = h.dns_names().collect();
                proptest::prop_assert!(!got.is_empty() && got.len() <= MAX_DNS_NAMES);
                proptest::prop_assert!(got.iter().all(|n| is_canonical_dns_name(n.as_bytes())));
            }
        }
    }
}
