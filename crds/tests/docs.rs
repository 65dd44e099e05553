//! `docs/policy-reference.md` is the reference a policy author reads: it must name every field of
//! both kinds (spec and status, as `path[].field` in backticks), every endpoint of the catalogue
//! and every validation rule, so a field or endpoint added to the types without a word in the
//! reference fails here.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::collections::BTreeSet;
use std::path::Path;

/// Every property path below `spec` and `status`, arrays as `[]`; map values are not descended
/// (`addLabels` is documented as a map).
fn field_paths(schema: &serde_json::Value, prefix: &str, out: &mut BTreeSet<String>) {
    if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
        for (name, child) in props {
            let path = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}.{name}")
            };
            out.insert(path.clone());
            field_paths(child, &path, out);
        }
    }
    if let Some(items) = schema.get("items") {
        field_paths(items, &format!("{prefix}[]"), out);
    }
}

#[test]
fn policy_reference_names_every_field_endpoint_and_rule() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/policy-reference.md");
    let doc = std::fs::read_to_string(&path).unwrap();
    let mut missing = Vec::new();
    for (file, yaml) in nodegate_crds::crd::generated().unwrap() {
        let crd: serde_json::Value = serde_yaml::from_str(&yaml).unwrap();
        let kind = crd["spec"]["names"]["kind"].as_str().unwrap().to_string();
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"];
        for top in ["spec", "status"] {
            let mut paths = BTreeSet::new();
            field_paths(&schema[top], top, &mut paths);
            for p in paths {
                if !doc.contains(&format!("`{p}`")) {
                    missing.push(format!("{kind} ({file}): `{p}`"));
                }
            }
        }
    }
    for endpoint in nodegate_crds::Endpoint::all() {
        if !doc.contains(&format!("`{}`", endpoint.name())) {
            missing.push(format!("endpoint `{}`", endpoint.name()));
        }
    }
    for (rule, _) in nodegate_crds::rules::ALL {
        if !doc.contains(&format!("`{rule}`")) {
            missing.push(format!("rule `{rule}`"));
        }
    }
    assert!(
        missing.is_empty(),
        "docs/policy-reference.md does not mention:\n{}",
        missing.join("\n")
    );
}
