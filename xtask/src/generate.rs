//! `cargo xtask generate [--check]`: the files generated from the Rust API types.

use anyhow::{Context, Result, bail};
use std::fs;

/// Where each generated CRD is written: the crate's copy (what tests and kubectl use), the Helm
/// chart's `crds/`, and the kustomize base.
const TARGET_DIRS: &[&str] = &["crds", "charts/nodegate/crds", "config/crd"];

pub fn run(check: bool) -> Result<()> {
    let root = crate::workspace_root();
    let files = nodegate_crds::crd::generated().context("rendering the CRDs")?;
    let mut stale = Vec::new();
    for dir in TARGET_DIRS {
        for (name, yaml) in &files {
            let path = root.join(dir).join(name);
            let current = fs::read_to_string(&path).unwrap_or_default();
            if current == *yaml {
                continue;
            }
            if check {
                stale.push(path.display().to_string());
            } else {
                fs::create_dir_all(root.join(dir))?;
                fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
                println!("wrote {}", path.display());
            }
        }
    }
    let doc = root.join("docs/endpoints.md");
    let current = fs::read_to_string(&doc).unwrap_or_default();
    let fresh = nodegate_crds::crd::endpoints_doc();
    if current != fresh {
        if check {
            stale.push(doc.display().to_string());
        } else {
            fs::write(&doc, fresh).with_context(|| format!("writing {}", doc.display()))?;
            println!("wrote {}", doc.display());
        }
    }
    if !stale.is_empty() {
        bail!(
            "generated files are stale (run `cargo xtask generate` and commit):\n  {}",
            stale.join("\n  ")
        );
    }
    if check {
        println!("generated files are up to date");
    }
    Ok(())
}
