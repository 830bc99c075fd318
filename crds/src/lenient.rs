//! Objects as a watch delivers them, readable or not.
//!
//! A kube-rs watcher decodes every object of a list (and every watch event) into its type; one
//! object that does not decode fails the whole list, and the watcher then retries that list for
//! ever: every other policy's change stops reaching decisions until someone fixes or deletes the
//! one object. Such an object is real: one written through a newer CRD (a field this version
//! does not know, during an upgrade), or stored before a schema tightened. A watch of
//! [`Lenient<K>`] decodes each object on its own: one that fails is kept as [`Undecodable`], with
//! its metadata, its status and every problem at its field path, so that it can be skipped whole
//! and reported like any other invalid policy while the watch goes on.

use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer};

use crate::{DecodeProblem, FieldError, PolicyStatus, decode_all, path_string};

/// An object of kind `K`, decoded, or kept with the reasons it could not be.
#[derive(Debug, Clone, PartialEq)]
pub enum Lenient<K> {
    /// The object, decoded.
    Decoded(K),
    /// An object that does not decode as `K` (rare: boxed).
    Undecodable(Box<Undecodable>),
}

/// What is known of an object that does not decode.
#[derive(Debug, Clone, PartialEq)]
pub struct Undecodable {
    /// Its metadata (name, namespace, generation, ...).
    pub metadata: ObjectMeta,
    /// Its status, when that part decodes.
    pub status: Option<PolicyStatus>,
    /// Every problem found, each at its field.
    pub problems: Vec<DecodeProblem>,
    /// The object as the API server sent it.
    pub raw: serde_json::Value,
}

impl Undecodable {
    /// `namespace/name`, or `name` for a cluster-scoped object (as `AnyPolicy::key`).
    pub fn key(&self) -> String {
        let name = self.metadata.name.as_deref().unwrap_or("");
        match &self.metadata.namespace {
            Some(ns) => format!("{ns}/{name}"),
            None => name.to_string(),
        }
    }

    /// The problems as validation errors (reason `Undecodable`), for logs and status.
    pub fn errors(&self) -> Vec<FieldError> {
        self.problems
            .iter()
            .map(|p| FieldError { path: path_string(&p.path), message: p.message.clone(), reason: "Undecodable" })
            .collect()
    }

    /// What can be read of its selection: the object with only the spec's selectors and
    /// `redirect` (no rules), decoded as `K`; `None` when even that part does not decode. What
    /// steering needs: a policy that cannot be applied must still not let its Pods walk around
    /// the gateway.
    pub fn selection<K: DeserializeOwned>(&self) -> Option<K> {
        const SELECTION: [&str; 4] = ["podSelector", "namespaceSelector", "serviceAccountSelector", "redirect"];
        let mut v = serde_json::Map::new();
        for k in ["apiVersion", "kind", "metadata"] {
            if let Some(x) = self.raw.get(k) {
                v.insert(k.into(), x.clone());
            }
        }
        let spec = self.raw.get("spec")?.as_object()?;
        let spec = spec.iter().filter(|(k, _)| SELECTION.contains(&k.as_str())).map(|(k, x)| (k.clone(), x.clone()));
        v.insert("spec".into(), serde_json::Value::Object(spec.collect()));
        K::deserialize(&serde_json::Value::Object(v)).ok()
    }
}

impl<K: DeserializeOwned + Clone> Lenient<K> {
    /// The object, or what can be read of its selection ([`Undecodable::selection`]).
    pub fn selection(&self) -> Option<K> {
        match self {
            Lenient::Decoded(k) => Some(k.clone()),
            Lenient::Undecodable(u) => u.selection(),
        }
    }
}

impl<'de, K: DeserializeOwned> Deserialize<'de> for Lenient<K> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(d)?;
        if let Ok(k) = K::deserialize(&value) {
            return Ok(Lenient::Decoded(k));
        }
        // An object without readable metadata cannot be named, skipped or reported: that one
        // still fails (the API server never sends one).
        let metadata = ObjectMeta::deserialize(value.get("metadata").unwrap_or(&serde_json::Value::Null))
            .map_err(|e| D::Error::custom(format!("metadata: {e}")))?;
        let status = value.get("status").and_then(|s| PolicyStatus::deserialize(s).ok());
        let problems = match decode_all::<K>(value.clone()) {
            Err(problems) => problems,
            // Not reached: the value did not decode above.
            Ok(_) => Vec::new(),
        };
        Ok(Lenient::Undecodable(Box::new(Undecodable { metadata, status, problems, raw: value })))
    }
}

impl<K: Resource> Resource for Lenient<K> {
    type DynamicType = K::DynamicType;
    type Scope = K::Scope;

    fn kind(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::kind(dt)
    }

    fn group(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::group(dt)
    }

    fn version(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::version(dt)
    }

    fn api_version(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::api_version(dt)
    }

    fn plural(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::plural(dt)
    }

    fn meta(&self) -> &ObjectMeta {
        match self {
            Lenient::Decoded(k) => k.meta(),
            Lenient::Undecodable(u) => &u.metadata,
        }
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Lenient::Decoded(k) => k.meta_mut(),
            Lenient::Undecodable(u) => &mut u.metadata,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ClusterEgressPolicy, EgressPolicy};
    use serde_json::json;

    fn policy(ports: serde_json::Value) -> serde_json::Value {
        json!({"apiVersion": "egress.dev/v1alpha1", "kind": "EgressPolicy",
               "metadata": {"name": "p", "namespace": "shop", "generation": 3},
               "spec": {"podSelector": {}, "rules": [{"to": [{"domain": "up.test"}], "ports": ports}]},
               "status": {"observedGeneration": 2}})
    }

    #[test]
    fn a_valid_object_decodes_as_its_kind() {
        let l: Lenient<EgressPolicy> = serde_json::from_value(policy(json!([{"port": 443}]))).unwrap();
        let Lenient::Decoded(p) = l else { panic!("{l:?}") };
        assert_eq!(p.spec.rules[0].ports[0].port, 443);
    }

    #[test]
    fn rejects_nothing_that_has_metadata_and_says_where_each_problem_is() {
        let bad = policy(json!([{"port": "https", "endPort": 444}]));
        let l: Lenient<EgressPolicy> = serde_json::from_value(bad).unwrap();
        let Lenient::Undecodable(u) = &l else { panic!("{l:?}") };
        assert_eq!(u.metadata.name.as_deref(), Some("p"));
        assert_eq!(u.metadata.generation, Some(3));
        assert_eq!(u.status.as_ref().and_then(|s| s.observed_generation), Some(2));
        let errors = u.errors();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].path, "spec.rules[0].ports[0].port");
        assert!(errors[0].message.contains("invalid type"), "{errors:?}");
        assert_eq!(errors[0].reason, "Undecodable");
        assert_eq!(l.meta().namespace.as_deref(), Some("shop"));
        // Every unknown field is reported, not only the first.
        let mut newer = policy(json!([{"port": 443}]));
        newer["spec"]["futureField"] = json!(true);
        newer["spec"]["rules"][0]["alsoNew"] = json!(1);
        let Lenient::Undecodable(u) = serde_json::from_value::<Lenient<EgressPolicy>>(newer).unwrap() else { panic!() };
        let paths: Vec<String> = u.errors().into_iter().map(|e| e.path).collect();
        assert_eq!(paths, ["spec.futureField", "spec.rules[0].alsoNew"]);
    }

    #[test]
    fn the_selection_of_an_undecodable_policy_is_read_without_its_rules() {
        let mut bad = policy(json!([{"port": "https"}]));
        bad["spec"]["podSelector"] = json!({"matchLabels": {"app": "legacy"}});
        bad["spec"]["redirect"] = json!("Transparent");
        let l: Lenient<EgressPolicy> = serde_json::from_value(bad.clone()).unwrap();
        let p = l.selection().expect("selectors and redirect decode");
        assert_eq!(p.spec.pod_selector.match_labels.get("app").map(String::as_str), Some("legacy"));
        assert_eq!(p.spec.redirect, crate::Redirect::Transparent);
        assert!(p.spec.rules.is_empty());
        assert_eq!(p.metadata.name.as_deref(), Some("p"));
        // A selector that does not decode either: nothing can be said of what it selects.
        bad["spec"]["podSelector"] = json!({"matchLabels": ["app"]});
        let l: Lenient<EgressPolicy> = serde_json::from_value(bad).unwrap();
        assert!(l.selection().is_none());
    }

    #[test]
    fn rejects_an_object_without_readable_metadata() {
        let mut v = policy(json!([]));
        v["metadata"] = json!("not a map");
        v["spec"] = json!(1);
        assert!(serde_json::from_value::<Lenient<EgressPolicy>>(v).is_err());
    }

    #[test]
    fn names_the_kind_of_what_it_wraps() {
        assert_eq!(Lenient::<EgressPolicy>::plural(&()), "egresspolicies");
        assert_eq!(Lenient::<ClusterEgressPolicy>::kind(&()), "ClusterEgressPolicy");
        assert_eq!(Lenient::<EgressPolicy>::api_version(&()), "egress.dev/v1alpha1");
        assert_eq!(Lenient::<EgressPolicy>::url_path(&(), Some("shop")), EgressPolicy::url_path(&(), Some("shop")));
    }
}
