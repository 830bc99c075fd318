//! Kubernetes label selectors (`matchLabels` and `matchExpressions`) and their matching.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A label selector, as in `metav1.LabelSelector`. The requirements are ANDed; an empty selector
/// selects everything.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    /// Labels that must be present with exactly these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    /// Set-based requirements.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

/// One set-based requirement.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(transform = crate::cel::requirement)]
pub struct LabelSelectorRequirement {
    /// The label key.
    pub key: String,
    /// `In`, `NotIn`, `Exists` or `DoesNotExist`.
    pub operator: SelectorOperator,
    /// Values for `In` and `NotIn` (non-empty there); must be empty for `Exists` and `DoesNotExist`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

/// Operator of a set-based requirement.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, JsonSchema)]
pub enum SelectorOperator {
    /// The label's value is one of `values`.
    In,
    /// The label is absent or its value is none of `values`.
    NotIn,
    /// The label is present.
    Exists,
    /// The label is absent.
    DoesNotExist,
}

impl LabelSelector {
    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }

    /// Problems with the selector (operator/values consistency), as messages.
    pub fn problems(&self) -> Vec<String> {
        self.match_expressions
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                let needs_values = matches!(r.operator, SelectorOperator::In | SelectorOperator::NotIn);
                match (needs_values, r.values.is_empty()) {
                    (true, true) => {
                        Some(format!("matchExpressions[{i}]: operator {:?} needs at least one value", r.operator))
                    }
                    (false, false) => Some(format!("matchExpressions[{i}]: operator {:?} takes no values", r.operator)),
                    _ => None,
                }
            })
            .collect()
    }
}

impl LabelSelectorRequirement {
    /// Whether `labels` satisfy this requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            SelectorOperator::In => value.is_some_and(|v| self.values.contains(v)),
            SelectorOperator::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            SelectorOperator::Exists => value.is_some(),
            SelectorOperator::DoesNotExist => value.is_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn req(key: &str, operator: SelectorOperator, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement { key: key.into(), operator, values: values.iter().map(|v| v.to_string()).collect() }
    }

    #[test]
    fn empty_selects_everything() {
        assert!(LabelSelector::default().matches(&labels(&[])));
        assert!(LabelSelector::default().matches(&labels(&[("a", "b")])));
    }

    #[test]
    fn match_labels_and_expressions_are_anded() {
        let s = LabelSelector {
            match_labels: labels(&[("app", "api")]),
            match_expressions: vec![
                req("tier", SelectorOperator::In, &["web", "api"]),
                req("canary", SelectorOperator::DoesNotExist, &[]),
                req("env", SelectorOperator::NotIn, &["dev"]),
            ],
        };
        assert!(s.matches(&labels(&[("app", "api"), ("tier", "web")])));
        assert!(s.matches(&labels(&[("app", "api"), ("tier", "web"), ("env", "prod")])));
        assert!(!s.matches(&labels(&[("app", "api"), ("tier", "web"), ("env", "dev")])));
        assert!(!s.matches(&labels(&[("app", "api"), ("tier", "db")])));
        assert!(!s.matches(&labels(&[("app", "api"), ("tier", "web"), ("canary", "1")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "web")])));
        let exists =
            LabelSelector { match_expressions: vec![req("team", SelectorOperator::Exists, &[])], ..Default::default() };
        assert!(exists.matches(&labels(&[("team", "")])));
        assert!(!exists.matches(&labels(&[])));
    }

    #[test]
    fn problems_name_inconsistent_requirements() {
        let s = LabelSelector {
            match_expressions: vec![req("a", SelectorOperator::In, &[]), req("b", SelectorOperator::Exists, &["x"])],
            ..Default::default()
        };
        assert_eq!(s.problems().len(), 2);
    }
}
