//! Applying, adopting and checking the table with the kernel, through the `nftables` crate (libnftables
//! JSON, `nft -j -f -`, one transaction).

use serde_json::Value;

use std::collections::{BTreeMap, BTreeSet};

use crate::rules::{Desired, SHAPE_MARK, TABLE, Table, canonical};

/// Errors talking to nft.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// The generated JSON does not fit the nftables schema.
    #[error("ruleset does not fit the nftables JSON schema: {0}")]
    Schema(String),
    /// nft refused or failed.
    #[error("nft: {0}")]
    Nft(String),
}

/// Replaces both tables whole in one transaction.
pub fn apply(d: &Desired) -> Result<(), NftError> {
    run(d.json())
}

/// Moves the kernel from `current` to `next`: set elements only when the table's shape is the
/// same (rules untouched), otherwise the whole table. Returns whether it was incremental.
pub fn update(current: &Desired, next: &Desired) -> Result<bool, NftError> {
    match next.delta_from(current) {
        Some(delta) if delta["nftables"].as_array().is_some_and(|a| a.is_empty()) => Ok(true),
        Some(delta) => run(delta).map(|()| true),
        None => apply(next).map(|()| false),
    }
}

fn run(v: Value) -> Result<(), NftError> {
    let nft: nftables::schema::Nftables = serde_json::from_value(v).map_err(|e| NftError::Schema(e.to_string()))?;
    nftables::helper::apply_ruleset(&nft).map_err(|e| NftError::Nft(e.to_string()))
}

/// Brings a table a previous instance left up to date without replacing it, when its shape is
/// the desired one (its dynamic sets refilled, in one transaction); otherwise replaces it whole
/// (also one transaction). Either way no packet ever sees no table. Returns whether it adopted.
pub fn adopt(d: &Desired) -> Result<bool, NftError> {
    match observed()? {
        Some(o) if o.shape.as_deref() == Some(d.shape().as_str()) && o.rules == d.rule_count() => {
            run(d.refill_json()).map(|()| true)
        }
        _ => apply(d).map(|()| false),
    }
}

/// Whether the kernel has nf_tables' `bridge` family: `nft --check` sends the table to the kernel
/// and leaves nothing behind.
pub fn bridge_family_available() -> bool {
    std::process::Command::new("nft")
        .args(["--check", "add", "table", "bridge", TABLE])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Deletes both tables (`node-redirector uninstall`: an explicit act, never on shutdown). Absent
/// is fine, and so is the `bridge` one where the kernel has no such family.
pub fn remove() -> Result<(), NftError> {
    for table in Table::ALL {
        if table == Table::Bridge && !bridge_family_available() {
            continue;
        }
        let out = std::process::Command::new("nft")
            .args(["delete", "table", table.family(), TABLE])
            .output()
            .map_err(|e| NftError::Nft(e.to_string()))?;
        if !out.status.success() && !String::from_utf8_lossy(&out.stderr).contains("No such file") {
            return Err(NftError::Nft(String::from_utf8_lossy(&out.stderr).trim().to_string()));
        }
    }
    Ok(())
}

/// The tables as the kernel has them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// The shape fingerprint from the first rule's comment.
    pub shape: Option<String>,
    /// Number of rules, in both tables.
    pub rules: usize,
    /// Every set's elements, canonical (see [`crate::rules::canonical`]).
    pub elements: BTreeMap<String, BTreeSet<String>>,
}

impl Observed {
    /// Whether this is exactly `d`.
    pub fn matches(&self, d: &Desired) -> bool {
        self.shape.as_deref() == Some(d.shape().as_str())
            && self.rules == d.rule_count()
            && self.elements == d.elements()
    }

    /// Counts the rules and sets of one table's `nft -j list table` output.
    fn add(&mut self, v: &Value) {
        for it in v["nftables"].as_array().into_iter().flatten() {
            if let Some(s) = it.get("set") {
                let elems = s["elem"].as_array().into_iter().flatten().map(canonical).collect();
                self.elements.insert(s["name"].as_str().unwrap_or_default().to_string(), elems);
            }
            if let Some(r) = it.get("rule") {
                self.rules += 1;
                if let Some(shape) = r["comment"].as_str().and_then(|c| c.strip_prefix(SHAPE_MARK)) {
                    self.shape = Some(shape.to_string());
                }
            }
        }
    }
}

/// What the kernel has now: `None` when the `inet` table is missing (a missing `bridge` table
/// shows as fewer rules and sets than desired).
pub fn observed() -> Result<Option<Observed>, NftError> {
    let mut o = Observed { shape: None, rules: 0, elements: BTreeMap::new() };
    for table in Table::ALL {
        let out = std::process::Command::new("nft")
            .args(["-j", "list", "table", table.family(), TABLE])
            .output()
            .map_err(|e| NftError::Nft(e.to_string()))?;
        if !out.status.success() {
            if table == Table::Inet {
                return Ok(None);
            }
            continue;
        }
        let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| NftError::Nft(e.to_string()))?;
        o.add(&v);
    }
    Ok(Some(o))
}
