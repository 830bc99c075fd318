//! Installing the chained plugin into the node's CNI configuration, the way Istio's and
//! Linkerd's CNI installers do: the plugin binary is copied into the CNI bin dir, and an entry is
//! added as the **last** plugin of the node's existing conflist (the primary CNI stays first and
//! is never replaced). Idempotent: an entry already there is updated in place. Removal takes the
//! entry out again. A file that is not valid JSON is left untouched and reported.
//!
//! The runtime uses the first file of the conf dir by name with the extension `.conflist`,
//! `.conf` or `.json` (libcni's order); a single-plugin `.conf` is turned into a `.conflist` of
//! the same name (the runtime reads plugin lists only from `.conflist` files).

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::cni::{FailurePolicy, PLUGIN_TYPE};

/// Our entry in a conflist.
pub fn entry(socket: &Path, failure_policy: FailurePolicy, log_file: &Path) -> Value {
    json!({
        "type": PLUGIN_TYPE,
        "socket": socket.display().to_string(),
        "failurePolicy": failure_policy,
        "logFile": log_file.display().to_string(),
    })
}

fn is_ours(p: &Value) -> bool {
    p["type"].as_str() == Some(PLUGIN_TYPE)
}

/// `text` (a conflist or a single-plugin conf) with `entry` as its last plugin; `None` when it is
/// already exactly so.
pub fn insert(text: &str, entry: &Value) -> Result<Option<Value>, String> {
    let mut v: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    let Some(obj) = v.as_object_mut() else { return Err("not a JSON object".into()) };
    if !obj.contains_key("plugins") {
        // A single-plugin conf: the same network as a list of one.
        if obj.get("type").and_then(Value::as_str).is_none() {
            return Err("neither a conflist (`plugins`) nor a plugin configuration (`type`)".into());
        }
        let mut plugin = obj.clone();
        let mut list = serde_json::Map::new();
        for k in ["cniVersion", "name"] {
            if let Some(x) = plugin.remove(k) {
                list.insert(k.to_string(), x);
            }
        }
        list.insert("plugins".into(), json!([plugin]));
        *obj = list;
    }
    let plugins = obj.get_mut("plugins").and_then(Value::as_array_mut).ok_or("`plugins` is not a list")?;
    if plugins.last() == Some(entry) && plugins.iter().filter(|p| is_ours(p)).count() == 1 {
        return Ok(None);
    }
    if plugins.iter().all(is_ours) {
        return Err("no primary plugin in the list (egress-redirector is chained after one)".into());
    }
    plugins.retain(|p| !is_ours(p));
    plugins.push(entry.clone());
    Ok(Some(v))
}

/// `text` without our entry; `None` when it has none.
pub fn remove(text: &str) -> Result<Option<Value>, String> {
    let mut v: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    let Some(plugins) = v.get_mut("plugins").and_then(Value::as_array_mut) else { return Ok(None) };
    let before = plugins.len();
    plugins.retain(|p| !is_ours(p));
    Ok((plugins.len() != before).then_some(v))
}

/// The configuration files of `dir` in the order the runtime reads them.
pub fn conf_files(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let rd = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut files: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && matches!(p.extension().and_then(|e| e.to_str()), Some("conflist" | "conf" | "json")))
        .collect();
    files.sort();
    Ok(files)
}

/// Writes `v` (pretty JSON) to `path` through a temporary file and a rename (the runtime never
/// reads half a file), with the permissions of the file it replaces, `like`.
fn write_json(path: &Path, like: &Path, v: &Value) -> Result<(), String> {
    let text = serde_json::to_string_pretty(v).map_err(|e| e.to_string())? + "\n";
    let tmp = path.with_extension("egress-redirector.tmp");
    std::fs::write(&tmp, text).map_err(|e| format!("{}: {e}", tmp.display()))?;
    if let Ok(m) = std::fs::metadata(like) {
        let _ = std::fs::set_permissions(&tmp, m.permissions());
    }
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

/// What [`install`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Installed {
    /// The entry was added or updated in this file.
    Changed(PathBuf),
    /// The file already had it.
    Unchanged(PathBuf),
    /// The conf dir has no configuration yet (the primary CNI has not written one).
    NoPrimary,
}

/// Adds (or updates) our entry in the primary conflist of `conf_dir`.
pub fn install(conf_dir: &Path, entry: &Value) -> Result<Installed, String> {
    let Some(primary) = conf_files(conf_dir)?.into_iter().next() else { return Ok(Installed::NoPrimary) };
    let text = std::fs::read_to_string(&primary).map_err(|e| format!("{}: {e}", primary.display()))?;
    let new = insert(&text, entry).map_err(|e| format!("{}: {e}; left untouched", primary.display()))?;
    let Some(new) = new else { return Ok(Installed::Unchanged(primary)) };
    let is_list = primary.extension().and_then(|e| e.to_str()) == Some("conflist");
    if is_list {
        write_json(&primary, &primary, &new)?;
        return Ok(Installed::Changed(primary));
    }
    let list = primary.with_extension("conflist");
    write_json(&list, &primary, &new)?;
    std::fs::remove_file(&primary).map_err(|e| format!("{}: {e}", primary.display()))?;
    Ok(Installed::Changed(list))
}

/// Removes our entry from every configuration file of `conf_dir`; the files changed. A file that
/// cannot be read as JSON is left alone.
pub fn uninstall(conf_dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut changed = Vec::new();
    let files = match conf_files(conf_dir) {
        Ok(f) => f,
        Err(_) if !conf_dir.exists() => return Ok(changed),
        Err(e) => return Err(e),
    };
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else { continue };
        if let Ok(Some(new)) = remove(&text) {
            write_json(&f, &f, &new)?;
            changed.push(f);
        }
    }
    Ok(changed)
}

/// Copies this executable into `bin_dir` as the plugin (temporary file and rename: a runtime
/// running the old copy keeps it).
pub fn install_binary(bin_dir: &Path) -> Result<PathBuf, String> {
    let me = std::env::current_exe().map_err(|e| format!("this executable: {e}"))?;
    std::fs::create_dir_all(bin_dir).map_err(|e| format!("{}: {e}", bin_dir.display()))?;
    let dest = bin_dir.join(PLUGIN_TYPE);
    let tmp = bin_dir.join(format!(".{PLUGIN_TYPE}.tmp"));
    std::fs::copy(&me, &tmp).map_err(|e| format!("{} -> {}: {e}", me.display(), tmp.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, &dest).map_err(|e| format!("{}: {e}", dest.display()))?;
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ours() -> Value {
        entry(
            Path::new("/var/run/egress-redirector/cni.sock"),
            FailurePolicy::Fail,
            Path::new("/var/run/egress-redirector/cni.log"),
        )
    }

    /// Real-shaped configurations as the CNIs' installers write them.
    const CALICO: &str = r#"{
  "name": "k8s-pod-network",
  "cniVersion": "0.3.1",
  "plugins": [
    {"type": "calico", "log_level": "info", "log_file_path": "/var/log/calico/cni/cni.log", "datastore_type": "kubernetes",
     "nodename": "node-1", "mtu": 0, "ipam": {"type": "calico-ipam"}, "policy": {"type": "k8s"},
     "kubernetes": {"kubeconfig": "/etc/cni/net.d/calico-kubeconfig"}},
    {"type": "portmap", "snat": true, "capabilities": {"portMappings": true}},
    {"type": "bandwidth", "capabilities": {"bandwidth": true}}
  ]
}"#;
    const CILIUM: &str = r#"{
  "cniVersion": "0.3.1",
  "name": "cilium",
  "plugins": [
    {"type": "cilium-cni", "enable-debug": false, "log-file": "/var/run/cilium/cilium-cni.log"}
  ]
}"#;
    const FLANNEL: &str = r#"{
  "name": "cbr0",
  "cniVersion": "0.3.1",
  "plugins": [
    {"type": "flannel", "delegate": {"hairpinMode": true, "isDefaultGateway": true}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}"#;
    const KINDNET: &str = r#"{
	"cniVersion": "0.3.1",
	"name": "kindnet",
	"plugins": [
	{
		"type": "ptp",
		"ipMasq": false,
		"ipam": {"type": "host-local", "dataDir": "/run/cni-ipam-state", "routes": [{"dst": "0.0.0.0/0"}], "ranges": [[{"subnet": "10.244.0.0/24"}]]},
		"mtu": 1500
	},
	{"type": "portmap", "capabilities": {"portMappings": true}}
	]
}"#;

    #[test]
    fn adds_itself_last_to_each_cnis_conflist_readds_in_place_and_removes_itself() {
        for (name, text) in [("calico", CALICO), ("cilium", CILIUM), ("flannel", FLANNEL), ("kindnet", KINDNET)] {
            let original: Value = serde_json::from_str(text).unwrap();
            let added = insert(text, &ours()).unwrap().expect(name);
            let plugins = added["plugins"].as_array().unwrap();
            assert_eq!(plugins.last(), Some(&ours()), "{name}: last");
            assert_eq!(
                &plugins[..plugins.len() - 1],
                original["plugins"].as_array().unwrap().as_slice(),
                "{name}: primary untouched"
            );
            assert_eq!(
                (added["name"].clone(), added["cniVersion"].clone()),
                (original["name"].clone(), original["cniVersion"].clone())
            );
            // Re-adding changes nothing; a changed entry is updated in place, never duplicated.
            let text2 = added.to_string();
            assert_eq!(insert(&text2, &ours()).unwrap(), None, "{name}: idempotent");
            let mut other = ours();
            other["failurePolicy"] = json!("Ignore");
            let updated = insert(&text2, &other).unwrap().unwrap();
            assert_eq!(updated["plugins"].as_array().unwrap().iter().filter(|p| is_ours(p)).count(), 1);
            assert_eq!(updated["plugins"].as_array().unwrap().last(), Some(&other));
            // Not last any more (another installer appended after us): moved back to last.
            let mut shuffled = added.clone();
            shuffled["plugins"].as_array_mut().unwrap().push(json!({"type": "tuning"}));
            let fixed = insert(&shuffled.to_string(), &ours()).unwrap().unwrap();
            assert_eq!(fixed["plugins"].as_array().unwrap().last(), Some(&ours()));
            // Removal gives the original back.
            assert_eq!(remove(&text2).unwrap(), Some(original.clone()), "{name}");
            assert_eq!(remove(text).unwrap(), None, "{name}: nothing to remove");
        }
    }

    #[test]
    fn malformed_or_unknown_files_are_refused() {
        assert!(insert("{\"plugins\": [", &ours()).unwrap_err().starts_with("not valid JSON"));
        assert!(insert("[]", &ours()).unwrap_err().contains("not a JSON object"));
        assert!(insert("{\"name\": \"x\"}", &ours()).unwrap_err().contains("neither a conflist"));
        assert!(insert("{\"plugins\": {}}", &ours()).unwrap_err().contains("not a list"));
        assert!(insert("{\"plugins\": []}", &ours()).unwrap_err().contains("no primary plugin"));
        assert!(remove("{oops").is_err());
    }

    #[test]
    fn files_in_a_conf_dir() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert_eq!(install(d, &ours()).unwrap(), Installed::NoPrimary);
        // The runtime's choice: the first by name; other files are not touched.
        std::fs::write(d.join("20-other.conflist"), FLANNEL).unwrap();
        std::fs::write(d.join("10-calico.conflist"), CALICO).unwrap();
        std::fs::write(d.join("calico-kubeconfig"), "not a conf").unwrap();
        assert_eq!(install(d, &ours()).unwrap(), Installed::Changed(d.join("10-calico.conflist")));
        assert_eq!(install(d, &ours()).unwrap(), Installed::Unchanged(d.join("10-calico.conflist")));
        assert_eq!(std::fs::read_to_string(d.join("20-other.conflist")).unwrap(), FLANNEL);
        let v: Value = serde_json::from_str(&std::fs::read_to_string(d.join("10-calico.conflist")).unwrap()).unwrap();
        assert_eq!(v["plugins"].as_array().unwrap().len(), 4);
        assert_eq!(uninstall(d).unwrap(), vec![d.join("10-calico.conflist")]);
        assert_eq!(uninstall(d).unwrap(), Vec::<PathBuf>::new());
        let v: Value = serde_json::from_str(&std::fs::read_to_string(d.join("10-calico.conflist")).unwrap()).unwrap();
        assert_eq!(v, serde_json::from_str::<Value>(CALICO).unwrap());
        // A malformed primary is left untouched, with an error naming it.
        std::fs::write(d.join("05-broken.conflist"), "{\"plugins\": [").unwrap();
        let e = install(d, &ours()).unwrap_err();
        assert!(e.contains("05-broken.conflist") && e.contains("left untouched"), "{e}");
        assert_eq!(std::fs::read_to_string(d.join("05-broken.conflist")).unwrap(), "{\"plugins\": [");
        std::fs::remove_file(d.join("05-broken.conflist")).unwrap();
        // A single-plugin .conf becomes a .conflist of the same name.
        std::fs::write(
            d.join("00-bridge.conf"),
            r#"{"cniVersion": "0.4.0", "name": "bridge", "type": "bridge", "bridge": "cni0"}"#,
        )
        .unwrap();
        assert_eq!(install(d, &ours()).unwrap(), Installed::Changed(d.join("00-bridge.conflist")));
        assert!(!d.join("00-bridge.conf").exists());
        let v: Value = serde_json::from_str(&std::fs::read_to_string(d.join("00-bridge.conflist")).unwrap()).unwrap();
        assert_eq!(
            v,
            json!({"cniVersion": "0.4.0", "name": "bridge", "plugins": [{"type": "bridge", "bridge": "cni0"}, ours()]})
        );
    }
}
