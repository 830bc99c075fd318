//! Checks the API requests a binary made (as recorded by the scripted API server) against RBAC
//! manifests: every request must be allowed by a Role or ClusterRole rule of the manifest.

use std::collections::BTreeSet;

use serde_json::Value;

/// One permission: (namespace or "" for cluster-wide, apiGroup, resource, resourceName or "", verb).
type Grant = (String, String, String, String, String);

/// The rules of every Role and ClusterRole in a multi-document YAML manifest.
pub fn grants(manifest: &str) -> Vec<Grant> {
    let mut allowed = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(manifest) {
        let v: Value = serde::Deserialize::deserialize(doc).expect("RBAC manifest parses");
        let ns = match v["kind"].as_str() {
            Some("ClusterRole") => "",
            Some("Role") => v["metadata"]["namespace"].as_str().expect("a Role has a namespace"),
            _ => continue,
        };
        for rule in v["rules"].as_array().expect("rules") {
            let names: Vec<String> = rule["resourceNames"]
                .as_array()
                .map(|a| a.iter().map(|n| n.as_str().unwrap().to_string()).collect())
                .unwrap_or_else(|| vec![String::new()]);
            for g in rule["apiGroups"].as_array().unwrap() {
                for r in rule["resources"].as_array().unwrap() {
                    for verb in rule["verbs"].as_array().unwrap() {
                        for n in &names {
                            allowed.push((
                                ns.into(),
                                g.as_str().unwrap().into(),
                                r.as_str().unwrap().into(),
                                n.clone(),
                                verb.as_str().unwrap().into(),
                            ));
                        }
                    }
                }
            }
        }
    }
    allowed
}

/// Asserts that each recorded request (`"METHOD /path?query"`) is allowed by `manifest`, naming
/// the first that is not; returns what was exercised, as `"verb resource"`.
pub fn assert_covered(requests: &[String], manifest: &str, manifest_name: &str) -> BTreeSet<String> {
    let allowed = grants(manifest);
    let permits = |ns: &str, group: &str, resource: &str, name: &str, verb: &str| {
        allowed.iter().any(|(ans, g, r, n, v)| {
            (ans.is_empty() || ans == ns) && g == group && r == resource && (n.is_empty() || n == name) && v == verb
        })
    };
    let mut seen = BTreeSet::new();
    for line in requests {
        let (method, uri) = line.split_once(' ').unwrap();
        let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
        if path == "/version" {
            continue; // non-resource URL, readable by every authenticated client (system:public-info-viewer)
        }
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let (group, rest) = if parts[0] == "api" { ("", &parts[2..]) } else { (parts[1], &parts[3..]) };
        let (ns, rest) =
            if rest.first() == Some(&"namespaces") && rest.len() > 2 { (rest[1], &rest[2..]) } else { ("", rest) };
        let resource = if rest.len() == 3 { format!("{}/{}", rest[0], rest[2]) } else { rest[0].to_string() };
        let name = rest.get(1).copied().unwrap_or("");
        let verb = match (method, name.is_empty()) {
            ("GET", true) if query.contains("watch=true") || query.contains("watch=1") => "watch",
            ("GET", true) => "list",
            ("GET", false) => "get",
            ("POST", _) => "create",
            ("PUT", _) => "update",
            ("PATCH", _) => "patch",
            (m, _) => panic!("unexpected method {m}"),
        };
        seen.insert(format!("{verb} {resource}"));
        assert!(
            permits(ns, group, &resource, name, verb),
            "{line} needs {verb} on {group}/{resource} {name} in {ns:?}: not in {manifest_name}"
        );
    }
    seen
}
