//! What the node learns from the DNS answers its forwarder relays to selected Pods, and the
//! bounded table that keeps it: per Pod, the names it asked for and the addresses they were
//! answered with, so that the relay can tell the gateway which names a Pod resolved to the
//! address it dials (the PROXY header's names TLV).
//!
//! [`learn`] reads one answer (hickory-proto; any bytes at all, never a panic): the name the Pod
//! asked for binds the final addresses of the CNAME chain that starts at it inside the answer,
//! with the smallest TTL along the chain. Records outside that chain, and names that only appear
//! as CNAME targets, bind nothing: the policy decides on the name the Pod asked for.
//!
//! [`Names`] keeps, per Pod, at most `max_names` names (least recently answered evicted first)
//! and at most [`PAIRS_PER_NAME`] times as many (name, address) pairs; each pair lives for its
//! TTL plus the grace after the last answer that contained it.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::{DNSClass, RData, RecordType};

/// Addresses kept of one answer.
pub const MAX_ADDRS_PER_ANSWER: usize = 128;
/// (name, address) pairs a Pod may hold: this many times its name cap.
pub const PAIRS_PER_NAME: usize = 4;
/// CNAME hops followed.
const MAX_CHAIN: usize = 16;

/// What one answer binds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Learned {
    /// The name the Pod asked for, canonical (lower case, no trailing dot).
    pub name: String,
    /// The chain's final addresses, each with the smallest TTL along the chain (seconds).
    pub addrs: Vec<(IpAddr, u32)>,
}

/// The canonical form of a DNS name as the names TLV carries it, if it has one.
fn canonical(name: &hickory_proto::rr::Name) -> Option<String> {
    let s = name.to_lowercase().to_ascii();
    let s = s.strip_suffix('.').unwrap_or(&s).to_string();
    egress_netio::proxy::is_canonical_dns_name(s.as_bytes()).then_some(s)
}

/// What the answer `answer` to the query `query` binds: `None` unless it is a successful answer
/// (same id and question as the query, class IN, type A or AAAA) with at least one address at
/// the end of the asked name's CNAME chain.
pub fn learn(query: &[u8], answer: &[u8]) -> Option<Learned> {
    let q = Message::from_vec(query).ok()?;
    let a = Message::from_vec(answer).ok()?;
    if a.metadata.message_type != MessageType::Response
        || a.metadata.response_code != ResponseCode::NoError
        || a.metadata.id != q.metadata.id
        || a.queries.len() != 1
        || q.queries.len() != 1
    {
        return None;
    }
    let (asked, question) = (&a.queries[0], &q.queries[0]);
    if asked.query_class != DNSClass::IN
        || !matches!(asked.query_type, RecordType::A | RecordType::AAAA)
        || asked.query_type != question.query_type
        || asked.name.to_lowercase() != question.name.to_lowercase()
    {
        return None;
    }
    let name = canonical(&asked.name)?;
    let mut current = asked.name.to_lowercase();
    let mut ttl = u32::MAX;
    for _ in 0..MAX_CHAIN {
        let next = a.answers.iter().find_map(|r| match &r.data {
            RData::CNAME(target) if r.dns_class == DNSClass::IN && r.name.to_lowercase() == current => {
                Some((target.0.to_lowercase(), r.ttl))
            }
            _ => None,
        });
        match next {
            Some((target, t)) => {
                ttl = ttl.min(t);
                current = target;
            }
            None => break,
        }
    }
    let addrs: Vec<(IpAddr, u32)> = a
        .answers
        .iter()
        .filter(|r| r.dns_class == DNSClass::IN && r.name.to_lowercase() == current)
        .filter_map(|r| match &r.data {
            RData::A(v4) if asked.query_type == RecordType::A => Some((IpAddr::V4(v4.0), ttl.min(r.ttl))),
            RData::AAAA(v6) if asked.query_type == RecordType::AAAA => Some((IpAddr::V6(v6.0), ttl.min(r.ttl))),
            _ => None,
        })
        .take(MAX_ADDRS_PER_ANSWER)
        .collect();
    (!addrs.is_empty()).then_some(Learned { name, addrs })
}

/// One Pod's names.
#[derive(Debug, Default)]
struct PodNames {
    /// Name -> (when last answered, as a tick; its addresses).
    names: HashMap<String, (u64, Vec<IpAddr>)>,
    /// Tick -> name: the least recently answered first.
    order: BTreeMap<u64, String>,
    /// Address -> name -> expiry.
    by_addr: HashMap<IpAddr, HashMap<String, Instant>>,
    /// (name, address) pairs held.
    pairs: usize,
    tick: u64,
}

impl PodNames {
    fn forget(&mut self, name: &str) {
        if let Some((tick, addrs)) = self.names.remove(name) {
            self.order.remove(&tick);
            for ip in addrs {
                if let Some(m) = self.by_addr.get_mut(&ip) {
                    if m.remove(name).is_some() {
                        self.pairs -= 1;
                    }
                    if m.is_empty() {
                        self.by_addr.remove(&ip);
                    }
                }
            }
        }
    }

    /// The least recently answered name other than `but`.
    fn oldest(&self, but: &str) -> Option<String> {
        self.order.values().find(|n| n.as_str() != but).cloned()
    }
}

/// Per Pod (`K`: the Pod's key, e.g. its uid), the names it resolved and to what; bounded.
#[derive(Debug)]
pub struct Names<K> {
    pods: HashMap<K, PodNames>,
    max_names: usize,
    grace: Duration,
    /// Names evicted to stay within the caps (`egress_redirector_dns_evicted_total`).
    pub evicted: u64,
}

impl<K: Eq + Hash + Clone> Names<K> {
    /// An empty table: at most `max_names` names per Pod, each address kept for its TTL plus
    /// `grace` after the last answer that contained it.
    pub fn new(max_names: usize, grace: Duration) -> Names<K> {
        Names { pods: HashMap::new(), max_names: max_names.max(1), grace, evicted: 0 }
    }

    /// Records that `pod` was answered `learned` at `now`.
    pub fn record(&mut self, pod: &K, learned: &Learned, now: Instant) {
        let (max_names, grace) = (self.max_names, self.grace);
        let p = self.pods.entry(pod.clone()).or_default();
        p.tick += 1;
        let tick = p.tick;
        if !p.names.contains_key(&learned.name) {
            while p.names.len() >= max_names {
                let Some(old) = p.oldest(&learned.name) else { break };
                p.forget(&old);
                self.evicted += 1;
            }
            p.names.insert(learned.name.clone(), (tick, Vec::new()));
            p.order.insert(tick, learned.name.clone());
        }
        for &(ip, ttl) in &learned.addrs {
            let until = now + Duration::from_secs(u64::from(ttl)) + grace;
            let by_name = p.by_addr.entry(ip).or_default();
            match by_name.get_mut(&learned.name) {
                Some(t) => *t = (*t).max(until),
                None => {
                    by_name.insert(learned.name.clone(), until);
                    p.pairs += 1;
                    if let Some(entry) = p.names.get_mut(&learned.name) {
                        entry.1.push(ip);
                    }
                }
            }
        }
        if let Some(entry) = p.names.get_mut(&learned.name) {
            p.order.remove(&entry.0);
            entry.0 = tick;
            p.order.insert(tick, learned.name.clone());
        }
        // The pair cap: evict the least recently answered other names.
        while p.pairs > max_names * PAIRS_PER_NAME {
            let Some(old) = p.oldest(&learned.name) else { break };
            p.forget(&old);
            self.evicted += 1;
        }
    }

    /// The names `pod` resolved to `ip` whose pair has not expired at `now`, most recently
    /// answered first, at most `limit`.
    pub fn lookup(&self, pod: &K, ip: IpAddr, now: Instant, limit: usize) -> Vec<String> {
        let Some(p) = self.pods.get(pod) else { return Vec::new() };
        let Some(by_name) = p.by_addr.get(&ip) else { return Vec::new() };
        let mut live: Vec<(u64, &String)> = by_name
            .iter()
            .filter(|(_, until)| **until > now)
            .map(|(n, _)| (p.names.get(n).map_or(0, |(t, _)| *t), n))
            .collect();
        live.sort_unstable_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
        live.into_iter().take(limit).map(|(_, n)| n.clone()).collect()
    }

    /// Drops expired pairs and names left without one, and the Pods `keep` says are gone.
    pub fn sweep(&mut self, now: Instant, keep: impl Fn(&K) -> bool) {
        self.pods.retain(|k, _| keep(k));
        for p in self.pods.values_mut() {
            let mut dropped = 0;
            p.by_addr.retain(|_, by_name| {
                let before = by_name.len();
                by_name.retain(|_, until| *until > now);
                dropped += before - by_name.len();
                !by_name.is_empty()
            });
            p.pairs -= dropped;
            let (by_addr, order) = (&p.by_addr, &mut p.order);
            p.names.retain(|n, (tick, addrs)| {
                addrs.retain(|ip| by_addr.get(ip).is_some_and(|m| m.contains_key(n)));
                if addrs.is_empty() {
                    order.remove(tick);
                }
                !addrs.is_empty()
            });
        }
        self.pods.retain(|_, p| !p.names.is_empty());
    }

    /// Names held, all Pods together.
    pub fn len(&self) -> usize {
        self.pods.values().map(|p| p.names.len()).sum()
    }

    /// Whether no Pod holds a name.
    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{OpCode, Query};
    use hickory_proto::rr::rdata::{A, AAAA, CNAME};
    use hickory_proto::rr::{Name, Record};

    fn query(name: &str, t: RecordType) -> Message {
        let mut m = Message::new(4711, MessageType::Query, OpCode::Query);
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        m
    }

    fn answer(q: &Message, records: Vec<Record>) -> Vec<u8> {
        let mut a = q.clone();
        a.metadata.message_type = MessageType::Response;
        a.answers = records;
        a.to_vec().unwrap()
    }

    fn a(name: &str, ip: &str, ttl: u32) -> Record {
        Record::from_rdata(Name::from_ascii(name).unwrap(), ttl, RData::A(A(ip.parse().unwrap())))
    }

    fn cname(name: &str, to: &str, ttl: u32) -> Record {
        Record::from_rdata(Name::from_ascii(name).unwrap(), ttl, RData::CNAME(CNAME(Name::from_ascii(to).unwrap())))
    }

    #[test]
    fn the_asked_name_binds_the_end_of_its_cname_chain_only() {
        let q = query("Alias.Example.", RecordType::A);
        let ans = answer(
            &q,
            vec![
                cname("alias.example.", "mid.example.", 300),
                cname("mid.example.", "target.example.", 60),
                a("target.example.", "192.0.2.1", 120),
                a("target.example.", "192.0.2.2", 30),
                a("unrelated.example.", "192.0.2.9", 300),
            ],
        );
        let l = learn(&q.to_vec().unwrap(), &ans).unwrap();
        assert_eq!(l.name, "alias.example");
        assert_eq!(l.addrs, vec![("192.0.2.1".parse().unwrap(), 60), ("192.0.2.2".parse().unwrap(), 30)]);
    }

    #[test]
    fn rejects_answers_that_bind_nothing() {
        let q = query("a.example.", RecordType::A);
        let raw_q = q.to_vec().unwrap();
        // No address at the end of the chain; a loop; another question; an error; another id.
        assert_eq!(learn(&raw_q, &answer(&q, vec![cname("a.example.", "b.example.", 5)])), None);
        let looped = answer(&q, vec![cname("a.example.", "b.example.", 5), cname("b.example.", "a.example.", 5)]);
        assert_eq!(learn(&raw_q, &looped), None);
        let other = query("b.example.", RecordType::A);
        assert_eq!(learn(&raw_q, &answer(&other, vec![a("b.example.", "192.0.2.1", 5)])), None);
        let mut failed = q.clone();
        failed.metadata.message_type = MessageType::Response;
        failed.metadata.response_code = ResponseCode::ServFail;
        failed.answers = vec![a("a.example.", "192.0.2.1", 5)];
        assert_eq!(learn(&raw_q, &failed.to_vec().unwrap()), None);
        let mut other_id = query("a.example.", RecordType::A);
        other_id.metadata.id = 1;
        assert_eq!(learn(&other_id.to_vec().unwrap(), &answer(&q, vec![a("a.example.", "192.0.2.1", 5)])), None);
        // An AAAA record in an answer to an A question binds nothing.
        let v6 = Record::from_rdata(
            Name::from_ascii("a.example.").unwrap(),
            5,
            RData::AAAA(AAAA("2001:db8::1".parse().unwrap())),
        );
        assert_eq!(learn(&raw_q, &answer(&q, vec![v6])), None);
        // Truncated and garbage bytes.
        let good = answer(&q, vec![a("a.example.", "192.0.2.1", 5)]);
        assert!(learn(&raw_q, &good).is_some());
        for cut in 0..good.len() - 1 {
            assert_eq!(learn(&raw_q, &good[..cut]), None, "cut at {cut}");
        }
    }

    fn learned(name: &str, ips: &[&str], ttl: u32) -> Learned {
        Learned { name: name.into(), addrs: ips.iter().map(|i| (i.parse().unwrap(), ttl)).collect() }
    }

    #[test]
    fn names_live_for_ttl_plus_grace_after_their_last_answer_and_most_recent_come_first() {
        let t0 = Instant::now();
        let mut n: Names<&str> = Names::new(10, Duration::from_secs(60));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        n.record(&"pod", &learned("a.example", &["192.0.2.1"], 30), t0);
        n.record(&"pod", &learned("b.example", &["192.0.2.1", "192.0.2.2"], 0), t0 + Duration::from_secs(1));
        assert_eq!(n.lookup(&"pod", ip, t0 + Duration::from_secs(2), 16), ["b.example", "a.example"]);
        assert_eq!(n.lookup(&"other", ip, t0, 16), Vec::<String>::new(), "per Pod");
        // TTL 0 counts as 0 plus the grace.
        assert_eq!(n.lookup(&"pod", ip, t0 + Duration::from_secs(62), 16), ["a.example"]);
        assert_eq!(n.lookup(&"pod", ip, t0 + Duration::from_secs(91), 16), Vec::<String>::new());
        // A new answer without the old address leaves that address its own grace.
        n.record(&"pod", &learned("a.example", &["192.0.2.3"], 30), t0 + Duration::from_secs(80));
        assert_eq!(n.lookup(&"pod", ip, t0 + Duration::from_secs(89), 16), ["a.example"]);
        assert_eq!(n.lookup(&"pod", "192.0.2.3".parse().unwrap(), t0 + Duration::from_secs(169), 16), ["a.example"]);
        n.sweep(t0 + Duration::from_secs(100), |_| true);
        assert_eq!(n.len(), 1, "b.example had no live pair left");
        n.sweep(t0 + Duration::from_secs(100), |_| false);
        assert!(n.is_empty(), "a gone Pod is forgotten");
    }

    #[test]
    fn a_flood_of_names_stays_within_the_caps() {
        let t0 = Instant::now();
        let mut n: Names<u8> = Names::new(100, Duration::from_secs(60));
        for i in 0..10_000u32 {
            let ip = format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255);
            n.record(&1, &learned(&format!("n{i}.example"), &[&ip], 300), t0);
        }
        assert_eq!(n.len(), 100);
        assert_eq!(n.evicted, 9_900);
        assert_eq!(n.lookup(&1, "10.0.39.15".parse().unwrap(), t0, 16), ["n9999.example"]);
        // Many addresses per name: the pair cap evicts older names, never the one just answered.
        let many: Vec<String> = (0..MAX_ADDRS_PER_ANSWER).map(|i| format!("172.16.0.{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        for i in 0..10 {
            n.record(&1, &learned(&format!("wide{i}.example"), &many, 300), t0);
        }
        let pairs: usize = n.pods[&1].pairs;
        assert!(pairs <= 100 * PAIRS_PER_NAME, "{pairs}");
        assert_eq!(
            n.lookup(&1, "172.16.0.77".parse().unwrap(), t0, 16),
            ["wide9.example", "wide8.example", "wide7.example"]
        );
    }

    proptest::proptest! {
        /// Any bytes as an answer (and as a query): never a panic, and whatever is learned is a
        /// canonical name with at most `MAX_ADDRS_PER_ANSWER` addresses.
        #[test]
        fn hostile_answers_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600), cut in 0usize..600) {
            let q = query("a.example.", RecordType::A).to_vec().unwrap();
            for (qq, aa) in [(&q[..], &bytes[..]), (&bytes[..], &bytes[..]), (&q[..], &bytes[..cut.min(bytes.len())])] {
                if let Some(l) = learn(qq, aa) {
                    proptest::prop_assert!(egress_netio::proxy::is_canonical_dns_name(l.name.as_bytes()));
                    proptest::prop_assert!(!l.addrs.is_empty() && l.addrs.len() <= MAX_ADDRS_PER_ANSWER);
                }
            }
        }

        /// Real answers with compression pointers bent anywhere: never a panic.
        #[test]
        fn bent_compression_pointers_never_panic(at in 12usize..80, to in 0u8..=255) {
            let q = query("a.b.example.", RecordType::A);
            let mut ans = answer(&q, vec![cname("a.b.example.", "c.b.example.", 5), a("c.b.example.", "192.0.2.1", 5)]);
            if at + 1 < ans.len() {
                ans[at] = 0xC0;
                ans[at + 1] = to;
            }
            let _ = learn(&q.to_vec().unwrap(), &ans);
        }
    }
}
