//! Pods admitted by the CNI plugin: known to the node-redirector before its watch (or file) shows
//! their addresses. Each admission is merged into the inputs, so the table steers the Pod from
//! the moment the plugin returns; it lives until the plugin's `DEL`, or, in Kubernetes mode, until
//! the watch no longer lists the Pod (a `DEL` lost with a node's reboot).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::config::PodEntry;
use crate::rules::Inputs;

/// An admission older than this whose Pod the watch does not list is forgotten.
pub const ORPHAN_AFTER: Duration = Duration::from_secs(120);

#[derive(Debug, Clone)]
struct Admitted {
    entry: PodEntry,
    at: Instant,
}

/// The admitted Pods, by sandbox (container id).
#[derive(Debug, Clone, Default)]
pub struct Admissions {
    by_sandbox: BTreeMap<String, Admitted>,
}

impl Admissions {
    /// Records (or replaces) the admission of a sandbox.
    pub fn add(&mut self, sandbox: &str, entry: PodEntry) {
        self.by_sandbox.insert(sandbox.to_string(), Admitted { entry, at: Instant::now() });
    }

    /// Forgets a sandbox; whether it was known.
    pub fn remove(&mut self, sandbox: &str) -> bool {
        self.by_sandbox.remove(sandbox).is_some()
    }

    /// Loads the admissions a previous instance saved (a restart must not forget a Pod the watch
    /// or the file does not list); none when the file is missing or unreadable.
    pub fn load(path: &std::path::Path) -> Admissions {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(_) => return Admissions::default(),
        };
        match serde_json::from_str::<BTreeMap<String, PodEntry>>(&text) {
            Ok(m) => Admissions {
                by_sandbox: m.into_iter().map(|(k, entry)| (k, Admitted { entry, at: Instant::now() })).collect(),
            },
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "saved CNI admissions unreadable; starting without them");
                Admissions::default()
            }
        }
    }

    /// Saves the admissions (a temporary file and a rename).
    pub fn save(&self, path: &std::path::Path) -> std::io::Result<()> {
        let m: BTreeMap<&String, &PodEntry> = self.by_sandbox.iter().map(|(k, a)| (k, &a.entry)).collect();
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(&m).map_err(std::io::Error::other)?)?;
        std::fs::rename(&tmp, path)
    }

    /// Number of admissions.
    pub fn len(&self) -> usize {
        self.by_sandbox.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_sandbox.is_empty()
    }

    /// `inputs` with every admission in: a Pod the inputs already list gains the admitted
    /// addresses and the interface it lacks; any other is added as admitted.
    pub fn merged(&self, inputs: &Inputs) -> Inputs {
        let mut out = inputs.clone();
        for a in self.by_sandbox.values() {
            let e = &a.entry;
            match out.pods.iter_mut().find(|p| p.namespace == e.namespace && p.name == e.name) {
                Some(p) => {
                    for ip in &e.ips {
                        if !p.ips.contains(ip) {
                            p.ips.push(*ip);
                        }
                    }
                    if p.interface.is_none() {
                        p.interface = e.interface.clone();
                    }
                }
                None => out.pods.push(e.clone()),
            }
        }
        out
    }

    /// Kubernetes mode: forgets admissions older than [`ORPHAN_AFTER`] whose Pod the synced watch
    /// does not list (deleted without a `DEL`).
    pub fn prune(&mut self, watched: &Inputs) {
        self.by_sandbox.retain(|_, a| {
            a.at.elapsed() < ORPHAN_AFTER
                || watched.pods.iter().any(|p| p.namespace == a.entry.namespace && p.name == a.entry.name)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ips: &[&str], iface: Option<&str>) -> PodEntry {
        PodEntry {
            namespace: "shop".into(),
            name: name.into(),
            node_name: "n".into(),
            ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
            labels: Default::default(),
            service_account: None,
            interface: iface.map(str::to_string),
            uid: String::new(),
        }
    }

    #[test]
    fn admissions_merge_into_the_watched_pods() {
        let watched =
            Inputs { pods: vec![pod("web-1", &[], None), pod("db-1", &["10.0.0.9"], None)], ..Default::default() };
        let mut a = Admissions::default();
        a.add("c1", pod("web-1", &["10.0.0.5"], Some("cali1")));
        a.add("c2", pod("new-1", &["10.0.0.6"], None));
        let m = a.merged(&watched);
        assert_eq!(m.pods.len(), 3);
        assert_eq!(m.pods[0].ips, vec!["10.0.0.5".parse::<std::net::IpAddr>().unwrap()]);
        assert_eq!(m.pods[0].interface.as_deref(), Some("cali1"));
        assert_eq!(m.pods[2].name, "new-1");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("admissions.json");
        a.save(&file).unwrap();
        let b = Admissions::load(&file);
        assert_eq!(b.merged(&watched).pods.len(), 3, "a restart remembers them");
        assert!(Admissions::load(&dir.path().join("missing.json")).is_empty());
        assert!(a.remove("c2") && !a.remove("c2"));
        a.prune(&watched);
        assert_eq!(a.len(), 1, "young admissions stay even when the watch has not shown them yet");
    }
}
