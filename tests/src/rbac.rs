//! Checks the API requests a binary made (as recorded by the scripted API server) against RBAC
//! manifests: every request must be allowed by a Role or ClusterRole rule of the manifest.

use std::collections::BTreeSet;

use serde_json::Value;

/// One permission: (namespace or "" for cluster-wide, apiGroup, resource, resourceName or "", verb).
type Grant = (String, String, String, String, String);

/// The non-resource URL rules (`nonResourceURLs`, ClusterRoles only) of a manifest: (URL, verb);
/// a URL ending in `*` is a prefix.
pub fn url_grants(manifest: &str) -> Vec<(String, String)> {
    let mut allowed = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(manifest) {
        let v: Value = serde::Deserialize::deserialize(doc).expect("RBAC manifest parses");
        if v["kind"] != "ClusterRole" {
            continue;
        }
        for rule in v["rules"].as_array().expect("rules") {
            for url in rule["nonResourceURLs"].as_array().into_iter().flatten() {
                for verb in rule["verbs"].as_array().unwrap() {
                    allowed.push((url.as_str().unwrap().to_string(), verb.as_str().unwrap().to_string()));
                }
            }
        }
    }
    allowed
}

/// Non-resource URLs every authenticated client may get (the stock ClusterRoles
/// `system:public-info-viewer` and `system:discovery`).
pub fn public_url(path: &str) -> bool {
    matches!(path, "/version" | "/version/" | "/healthz" | "/livez" | "/readyz" | "/api" | "/apis")
        || path.starts_with("/api/")
        || path.starts_with("/apis/")
        || path.starts_with("/openapi/")
}

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
            if rule.get("nonResourceURLs").is_some() {
                continue;
            }
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

/// What a set of RBAC rules allows, as the API server's authoriser decides it for one request.
#[derive(Debug, Clone, Default)]
pub struct Rbac(Vec<Grant>, Vec<(String, String)>);

/// A request as the authoriser sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attributes {
    /// `get`, `list`, `watch`, `create`, `update`, `patch` or `delete`.
    pub verb: String,
    /// API group ("" for the core group).
    pub group: String,
    /// Resource, with its subresource (`pods/status`).
    pub resource: String,
    /// Namespace ("" for cluster scope).
    pub namespace: String,
    /// Object name ("" for a collection).
    pub name: String,
}

impl Attributes {
    /// The attributes of `METHOD /path?query`; `None` for a non-resource URL (`/version`).
    pub fn of(method: &str, uri: &str) -> Option<Attributes> {
        let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let (group, rest) = match parts.first() {
            Some(&"api") if parts.len() > 2 => ("", &parts[2..]),
            Some(&"apis") if parts.len() > 3 => (parts[1], &parts[3..]),
            _ => return None,
        };
        let (ns, rest) =
            if rest.first() == Some(&"namespaces") && rest.len() > 2 { (rest[1], &rest[2..]) } else { ("", rest) };
        let resource = if rest.len() == 3 { format!("{}/{}", rest[0], rest[2]) } else { rest[0].to_string() };
        let name = rest.get(1).copied().unwrap_or("");
        let watch = query.split('&').any(|kv| kv == "watch=true" || kv == "watch=1");
        let verb = match (method, name.is_empty()) {
            ("GET", true) if watch => "watch",
            ("GET", true) => "list",
            ("GET", false) => "get",
            ("POST", _) => "create",
            ("PUT", _) => "update",
            ("PATCH", _) => "patch",
            ("DELETE", _) => "delete",
            (m, _) => panic!("unexpected method {m}"),
        };
        Some(Attributes { verb: verb.into(), group: group.into(), resource, namespace: ns.into(), name: name.into() })
    }

    /// The message of the API server's 403 (`Status.message`).
    pub fn forbidden(&self, user: &str) -> String {
        let plural = self.resource.split('/').next().unwrap_or("");
        let name = if self.name.is_empty() { String::new() } else { format!(" \"{}\"", self.name) };
        let scope = if self.namespace.is_empty() {
            "at the cluster scope".to_string()
        } else {
            format!("in the namespace \"{}\"", self.namespace)
        };
        format!(
            "{plural}{name} is forbidden: User \"{user}\" cannot {} resource \"{}\" in API group \"{}\" {scope}",
            self.verb, self.resource, self.group
        )
    }
}

impl Rbac {
    /// The rules of every Role and ClusterRole of the manifests (bound to the one client).
    pub fn from_manifests(manifests: &[&str]) -> Rbac {
        Rbac(manifests.iter().flat_map(|m| grants(m)).collect(), manifests.iter().flat_map(|m| url_grants(m)).collect())
    }

    /// Whether the rules allow `METHOD path` of a non-resource URL (public ones always).
    pub fn allows_url(&self, method: &str, path: &str) -> bool {
        let verb = match method {
            "GET" | "HEAD" => "get",
            "POST" => "post",
            "PUT" => "put",
            "DELETE" => "delete",
            other => return other.is_empty(),
        };
        public_url(path)
            || self.1.iter().any(|(url, v)| {
                (v == verb || v == "*")
                    && match url.strip_suffix('*') {
                        Some(prefix) => path.starts_with(prefix),
                        None => url == path,
                    }
            })
    }

    /// Whether the rules allow the request.
    pub fn allows(&self, a: &Attributes) -> bool {
        self.0.iter().any(|(ns, g, r, n, v)| {
            (ns.is_empty() || *ns == a.namespace)
                && *g == a.group
                && *r == a.resource
                && (n.is_empty() || *n == a.name)
                && *v == a.verb
        })
    }
}

/// Asserts that each recorded request (`"METHOD /path?query"`) is allowed by `manifest`, naming
/// the first that is not; returns what was exercised, as `"verb resource"`.
pub fn assert_covered(requests: &[String], manifest: &str, manifest_name: &str) -> BTreeSet<String> {
    let rbac = Rbac::from_manifests(&[manifest]);
    let mut seen = BTreeSet::new();
    for line in requests {
        let (method, uri) = line.split_once(' ').unwrap();
        let Some(a) = Attributes::of(method, uri) else {
            // A non-resource URL: public (`/version`), or granted by `nonResourceURLs`.
            let path = uri.split('?').next().unwrap_or(uri);
            if !public_url(path) {
                seen.insert(format!("{} {path}", method.to_ascii_lowercase()));
            }
            assert!(rbac.allows_url(method, path), "{line} needs get on the URL {path}: not in {manifest_name}");
            continue;
        };
        seen.insert(format!("{} {}", a.verb, a.resource));
        assert!(
            rbac.allows(&a),
            "{line} needs {} on {}/{} {} in {:?}: not in {manifest_name}",
            a.verb,
            a.group,
            a.resource,
            a.name,
            a.namespace
        );
    }
    seen
}

/// The Role of the chart's pre-delete hook (`node-redirector uninstall-daemonset`) for a
/// DaemonSet named `egress-node-redirector` in `egress-system`. tests/tests/chart.rs checks that
/// the chart renders exactly these rules; tests/tests/redirector.rs runs the hook under them.
pub const UNINSTALL_HOOK_ROLE: &str = "kind: Role
metadata: {name: egress-node-redirector-uninstall, namespace: egress-system}
rules:
  - apiGroups: [apps]
    resources: [daemonsets]
    resourceNames: [egress-node-redirector]
    verbs: [get, patch]
";
