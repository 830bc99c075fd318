//! Applying and checking the table with the kernel, through the `nftables` crate (libnftables
//! JSON, `nft -j -f -`, one transaction).

use serde_json::Value;

use crate::rules::{Desired, TABLE};

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

/// Replaces the whole table in one transaction.
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

/// Deletes the table (graceful shutdown). Absent is fine.
pub fn remove() -> Result<(), NftError> {
    let out = std::process::Command::new("nft")
        .args(["delete", "table", "inet", TABLE])
        .output()
        .map_err(|e| NftError::Nft(e.to_string()))?;
    if out.status.success() || String::from_utf8_lossy(&out.stderr).contains("No such file") {
        Ok(())
    } else {
        Err(NftError::Nft(String::from_utf8_lossy(&out.stderr).trim().to_string()))
    }
}

/// What the kernel has now: `None` when the table is missing; otherwise the selected addresses
/// and the number of rules, enough to tell drift from the desired state.
pub fn observed() -> Result<Option<(Vec<String>, usize)>, NftError> {
    let out = std::process::Command::new("nft")
        .args(["-j", "list", "table", "inet", TABLE])
        .output()
        .map_err(|e| NftError::Nft(e.to_string()))?;
    if !out.status.success() {
        return Ok(None);
    }
    let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| NftError::Nft(e.to_string()))?;
    let items = v["nftables"].as_array().cloned().unwrap_or_default();
    let mut selected = Vec::new();
    let mut rules = 0;
    for it in &items {
        if let Some(s) = it.get("set")
            && s["name"].as_str().is_some_and(|n| n.starts_with("selected_"))
        {
            for e in s["elem"].as_array().into_iter().flatten() {
                if let Some(a) = e.as_str() {
                    selected.push(a.to_string());
                }
            }
        }
        if it.get("rule").is_some() {
            rules += 1;
        }
    }
    selected.sort();
    Ok(Some((selected, rules)))
}

/// The same fingerprint for the desired state.
pub fn fingerprint(d: &Desired) -> (Vec<String>, usize) {
    let mut s: Vec<String> = d.selected.iter().map(|a| a.to_string()).collect();
    s.sort();
    (s, 10)
}
