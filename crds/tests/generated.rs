//! The committed CRD YAML (crate, Helm chart, kustomize base) must equal a fresh generation
//! from the types; `cargo xtask generate` rewrites them.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::path::Path;

#[test]
fn committed_crds_are_fresh() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let files = nodegate_crds::crd::generated_files().unwrap();
    // Three CRDs in each of the three places, and the endpoint reference.
    assert_eq!(files.len(), 10);
    for (relative, content) in files {
        let path = root.join(&relative);
        let committed = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}; run `cargo xtask generate`", path.display()));
        assert!(
            committed == content,
            "{} is stale: run `cargo xtask generate` and commit the result",
            path.display()
        );
    }
}

#[test]
fn committed_endpoint_doc_is_fresh() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/endpoints.md");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == nodegate_crds::crd::endpoints_doc(),
        "docs/endpoints.md is stale: run `cargo xtask generate` and commit the result"
    );
}

#[test]
fn every_field_has_a_description() {
    fn walk(node: &serde_json::Value, path: &str, missing: &mut Vec<String>) {
        if let Some(props) = node.get("properties").and_then(|p| p.as_object()) {
            for (k, v) in props {
                let p = format!("{path}.{k}");
                if v.get("description").is_none() {
                    missing.push(p.clone());
                }
                walk(v, &p, missing);
            }
        }
        if let Some(items) = node.get("items") {
            walk(items, &format!("{path}[]"), missing);
        }
        if let Some(values) = node.get("additionalProperties") {
            walk(values, &format!("{path}{{}}"), missing);
        }
    }
    for (name, yaml) in nodegate_crds::crd::generated().unwrap() {
        let crd: serde_json::Value = serde_yaml::from_str(&yaml).unwrap();
        let version = &crd["spec"]["versions"][0];
        // Policies and configs have a status (the operator's, the agent's); a rule set has
        // none: nothing reports on it.
        let status = if name == "nodeagentrulesets.yaml" {
            serde_json::Value::Null
        } else {
            serde_json::json!({})
        };
        assert_eq!(version["subresources"]["status"], status, "{name}");
        assert!(
            version["additionalPrinterColumns"]
                .as_array()
                .unwrap()
                .len()
                >= 3
        );
        let mut missing = Vec::new();
        walk(&version["schema"]["openAPIV3Schema"], "", &mut missing);
        assert!(
            missing.is_empty(),
            "{name}: fields without description: {missing:?}"
        );
    }
}

#[test]
fn every_list_is_bounded() {
    fn walk(node: &serde_json::Value, path: &str, unbounded: &mut Vec<String>) {
        if node.get("type").and_then(|t| t.as_str()) == Some("array")
            && node.get("maxItems").is_none()
        {
            unbounded.push(path.to_string());
        }
        if node.get("type").and_then(|t| t.as_str()) == Some("object")
            && node.get("additionalProperties").is_some()
            && node.get("maxProperties").is_none()
            && !path.ends_with("metadata")
        {
            unbounded.push(format!("{path} (map)"));
        }
        if let Some(props) = node.get("properties").and_then(|p| p.as_object()) {
            for (k, v) in props {
                walk(v, &format!("{path}.{k}"), unbounded);
            }
        }
        if let Some(items) = node.get("items") {
            walk(items, &format!("{path}[]"), unbounded);
        }
    }
    for (name, yaml) in nodegate_crds::crd::generated().unwrap() {
        let crd: serde_json::Value = serde_yaml::from_str(&yaml).unwrap();
        let mut unbounded = Vec::new();
        walk(
            &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"],
            ".spec",
            &mut unbounded,
        );
        assert!(
            unbounded.is_empty(),
            "{name}: unbounded lists: {unbounded:?}"
        );
    }
}
