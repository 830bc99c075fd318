//! Writes the CRD manifests generated from the Rust types.
//!
//! `cargo run -p egress-crds --bin crdgen` rewrites `crds/*.yaml` and the Helm chart's copies in
//! `charts/egress-gateway/crds/`; `--check` exits 1 when a checked-in file differs from the
//! generated one (the tests do the same).

#![forbid(unsafe_code)]

use std::path::PathBuf;

fn main() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let chart = dir.join("../charts/egress-gateway/crds");
    let check = std::env::args().any(|a| a == "--check");
    let mut stale = false;
    for (file, yaml) in egress_crds::manifests::all() {
        for path in [dir.join(file), chart.join(file)] {
            if check {
                if std::fs::read_to_string(&path).ok().as_deref() != Some(yaml.as_str()) {
                    eprintln!("{} is out of date: run `cargo run -p egress-crds --bin crdgen`", path.display());
                    stale = true;
                }
            } else {
                std::fs::write(&path, &yaml).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
                println!("wrote {}", path.display());
            }
        }
    }
    std::process::exit(i32::from(stale));
}
