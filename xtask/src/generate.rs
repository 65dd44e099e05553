//! `cargo xtask generate [--check]`: the files generated from the Rust API types.

use anyhow::{Context, Result, bail};
use std::fs;

pub fn run(check: bool) -> Result<()> {
    let root = crate::workspace_root();
    let files = nodegate_crds::crd::generated_files().context("rendering the generated files")?;
    let mut stale = Vec::new();
    for (relative, content) in &files {
        let path = root.join(relative);
        if fs::read_to_string(&path).unwrap_or_default() == *content {
            continue;
        }
        if check {
            stale.push(path.display().to_string());
            continue;
        }
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        fs::write(&path, content).with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    if !stale.is_empty() {
        bail!(
            "generated files are stale (run `cargo xtask generate` and commit):\n  {}",
            stale.join("\n  ")
        );
    }
    if check {
        println!("{} generated files are up to date", files.len());
    }
    Ok(())
}
