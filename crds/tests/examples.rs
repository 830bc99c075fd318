//! Every example in crds/examples/ is accepted, and every counter-example in crds/examples/invalid/
//! is rejected, by the three places that judge a policy: the CRD's structural schema (JSON Schema),
//! its CEL admission rules (kube-cel: the Kubernetes CEL libraries, evaluated offline), and the
//! Rust validation the gateway runs. They must agree.

use std::path::{Path, PathBuf};

use egress_crds::{AnyPolicy, ClusterEgressPolicy, EgressPolicy};
use kube::CustomResourceExt;
use serde::Deserialize;
use serde_json::Value;

fn schema_of(kind: &str) -> Value {
    let crd = match kind {
        "EgressPolicy" => serde_json::to_value(EgressPolicy::crd()).unwrap(),
        "ClusterEgressPolicy" => serde_json::to_value(ClusterEgressPolicy::crd()).unwrap(),
        other => panic!("unknown kind {other}"),
    };
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

/// The openAPIV3Schema as a JSON Schema: `nullable: true` becomes a type union with null.
fn as_json_schema(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut out = serde_json::Map::new();
            for (k, x) in m {
                if k.starts_with("x-kubernetes-") || k == "nullable" {
                    continue;
                }
                out.insert(k.clone(), as_json_schema(x));
            }
            if m.get("nullable") == Some(&Value::Bool(true))
                && let Some(Value::String(t)) = m.get("type")
            {
                out.insert("type".into(), serde_json::json!([t, "null"]));
            }
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(a.iter().map(as_json_schema).collect()),
        other => other.clone(),
    }
}

fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    v.sort();
    v
}

/// (schema errors, CEL errors, Rust errors) for one document.
fn judge(doc: &Value) -> (Vec<String>, Vec<String>, Vec<String>) {
    let kind = doc["kind"].as_str().unwrap();
    let schema = schema_of(kind);
    let validator = jsonschema::validator_for(&as_json_schema(&schema)).expect("the CRD schema compiles");
    let schema_errors: Vec<String> =
        validator.iter_errors(doc).map(|e| format!("{}: {}", e.instance_path(), e)).collect();
    let cel_errors: Vec<String> = match kube::core::cel::Validator::new().validate(&schema, doc, None) {
        Ok(()) => vec![],
        Err(errs) => errs.into_vec().into_iter().map(|e| format!("{}: {}", e.field_path, e.message)).collect(),
    };
    let rust_errors: Vec<String> = match AnyPolicy::from_value(doc.clone()) {
        Ok(p) => p.validate().into_iter().map(|e| e.to_string()).collect(),
        Err(e) => vec![format!("decode: {e}")],
    };
    (schema_errors, cel_errors, rust_errors)
}

#[test]
fn every_cel_rule_compiles() {
    for kind in ["EgressPolicy", "ClusterEgressPolicy"] {
        let compiled = kube::core::cel::compile_schema(&schema_of(kind));
        assert!(!compiled.has_errors(), "{kind}: {:?}", compiled.compilation_errors());
    }
}

#[test]
fn examples_are_accepted_everywhere() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut n = 0;
    for f in files(&dir) {
        for doc in documents(&f) {
            let (s, c, r) = judge(&doc);
            assert!(s.is_empty() && c.is_empty() && r.is_empty(), "{}: schema {s:?} CEL {c:?} Rust {r:?}", f.display());
            n += 1;
        }
    }
    assert!(n >= 4, "examples found: {n}");
}

#[test]
fn counter_examples_are_rejected_everywhere() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/invalid");
    let files = files(&dir);
    assert!(files.len() >= 20);
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let expect = text
            .lines()
            .find_map(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{}: no '# expect: <field>' line", f.display()))
            .to_string();
        for doc in documents(&f) {
            let (s, c, r) = judge(&doc);
            assert!(!(s.is_empty() && c.is_empty()), "{}: the API server would accept it", f.display());
            assert!(!r.is_empty(), "{}: the gateway would accept it (schema {s:?}, CEL {c:?})", f.display());
            let decode_error = r.iter().any(|e| e.starts_with("decode:"));
            assert!(
                decode_error || r.iter().any(|e| e.starts_with(&expect)),
                "{}: expected an error at {expect}, got {r:?}",
                f.display()
            );
        }
    }
}

/// Rules that only CEL can check (the structural schema accepts these documents) are really
/// evaluated: each is rejected by CEL with its field path.
#[test]
fn cel_alone_rejects_what_the_schema_cannot_see() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/invalid");
    for (file, field) in [
        ("cidr-host-bits.yaml", ".cidr"),
        ("except-outside-cidr.yaml", ".except"),
        ("except-equal-to-cidr.yaml", ".except"),
        ("both-domain-and-cidr.yaml", ""),
        ("endport-below-port.yaml", ".endPort"),
        ("wildcard-in-the-middle.yaml", ".domain"),
        ("uppercase-domain.yaml", ".domain"),
        ("ip-as-domain.yaml", ".domain"),
        ("duplicate-rule-names.yaml", ".rules"),
        ("selector-in-without-values.yaml", ".values"),
        ("connect-method.yaml", ".methods"),
        ("path-with-query.yaml", ".paths"),
        ("verified-transparent.yaml", ".identity"),
        ("service-account-name.yaml", ".names"),
    ] {
        let doc = &documents(&dir.join(file))[0];
        let (s, c, _) = judge(doc);
        assert!(s.is_empty(), "{file}: schema already rejects: {s:?}");
        assert!(!c.is_empty(), "{file}: CEL accepted it");
        assert!(c.iter().any(|e| e.contains(field)), "{file}: {c:?}");
    }
}

/// Every CEL rule stays within the API server's cost budget and refers only to bounded lists
/// (kube-cel's static estimate: a coarse model of the API server's, catching unbounded loops).
#[test]
fn cel_rules_are_bounded_and_within_the_cost_budget() {
    // `estimate_rule_cost` only: kube-cel 0.8's scope check (`analyze_rule`) reports the
    // variables bound by `all`/`filter` (r, x, e, ...) as unknown, which CEL allows.
    use kube::core::cel::{compile_schema, estimate_rule_cost};
    fn walk(node: &Value, out: &mut Vec<String>) {
        if let Some(rules) = node.get("x-kubernetes-validations").and_then(Value::as_array) {
            let compiled = compile_schema(node);
            for r in rules {
                let rule = r["rule"].as_str().unwrap();
                for w in estimate_rule_cost(rule, &compiled) {
                    out.push(format!("{rule}: {}", w.message));
                }
            }
        }
        for key in ["properties", "items", "additionalProperties"] {
            match node.get(key) {
                Some(Value::Object(m)) if key == "properties" => m.values().for_each(|v| walk(v, out)),
                Some(v @ Value::Object(_)) => walk(v, out),
                _ => {}
            }
        }
    }
    for kind in ["EgressPolicy", "ClusterEgressPolicy"] {
        let mut warnings = Vec::new();
        walk(&schema_of(kind), &mut warnings);
        assert!(warnings.is_empty(), "{kind}: {warnings:#?}");
    }
}

/// Policy documents shown to users: ```yaml blocks of README.md and docs/*.md, and the policy the
/// chart's NOTES.txt tells users to apply.
fn documentation_examples() -> Vec<(String, Value)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut sources = vec![root.join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    sources.extend(docs);
    let mut blocks: Vec<(String, String)> = Vec::new();
    for f in &sources {
        let text = std::fs::read_to_string(f).unwrap();
        let mut block: Option<String> = None;
        for line in text.lines() {
            match (&mut block, line.trim_start()) {
                (None, "```yaml") => block = Some(String::new()),
                (Some(b), "```") => {
                    blocks.push((f.display().to_string(), std::mem::take(b)));
                    block = None;
                }
                (Some(b), _) => {
                    b.push_str(line);
                    b.push('\n');
                }
                (None, _) => {}
            }
        }
    }
    let notes = root.join("charts/egress-gateway/templates/NOTES.txt");
    let text = std::fs::read_to_string(&notes).unwrap();
    let heredoc = text.find("<<'POLICY'").expect("NOTES.txt shows a policy");
    let start = heredoc + text[heredoc..].find('\n').unwrap() + 1;
    let end = start + text[start..].find("\nPOLICY\n").unwrap();
    blocks.push((notes.display().to_string(), text[start..end].to_string()));
    let mut out = Vec::new();
    for (file, b) in blocks {
        for d in serde_yaml_ng::Deserializer::from_str(&b) {
            let v = Value::deserialize(d).unwrap_or_else(|e| panic!("{file}: {e}"));
            if v["apiVersion"].as_str().is_some_and(|a| a.starts_with("egress.dev/")) {
                out.push((file.clone(), v));
            }
        }
    }
    out
}

#[test]
fn documentation_examples_are_accepted_everywhere() {
    let examples = documentation_examples();
    for (file, doc) in &examples {
        let (s, c, r) = judge(doc);
        assert!(
            s.is_empty() && c.is_empty() && r.is_empty(),
            "{file}: {}: schema {s:?} CEL {c:?} Rust {r:?}",
            doc["metadata"]["name"]
        );
    }
    let files: std::collections::BTreeSet<&str> = examples.iter().map(|(f, _)| f.as_str()).collect();
    assert!(files.len() >= 3 && examples.len() >= 4, "found {} examples in {files:?}", examples.len());
}
