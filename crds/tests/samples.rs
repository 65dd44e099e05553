//! Every sample policy is checked against the CRD's CEL rules client-side (kube's `cel`
//! feature): valid samples pass, and each invalid sample fails with exactly its rule's message.
//! `nodegate-tests` checks the same samples against a real API server.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use kube::CustomResourceExt;
use kube::core::Message;
use kube::core::cel::Validator;
use nodegate_crds::{NodeApiPolicy, rules};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn samples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/samples")
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

fn load(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::from_str(&text).unwrap()
}

fn schema() -> Value {
    let crd = NodeApiPolicy::crd();
    let schema = crd.spec.versions[0].schema.as_ref().unwrap();
    serde_json::to_value(schema.open_api_v3_schema.as_ref().unwrap()).unwrap()
}

fn message(rule: &kube::core::Rule) -> String {
    match rule.message.as_ref().unwrap() {
        Message::Message(m) => m.clone(),
        Message::Expression(e) => panic!("rules use plain messages, found expression {e}"),
    }
}

#[test]
fn valid_samples_pass_every_rule_and_parse() {
    let schema = schema();
    let files = yaml_files(&samples_dir());
    assert!(
        files.len() >= 5,
        "expected the sample policies, found {files:?}"
    );
    for file in files {
        let object = load(&file);
        let result = Validator::new().validate(&schema, &object, None);
        assert!(result.is_ok(), "{}: {result:?}", file.display());
        let policy: NodeApiPolicy = serde_json::from_value(object).unwrap();
        assert!(!policy.spec.access.is_empty());
    }
}

#[test]
fn each_invalid_sample_fails_with_its_rules_message_only() {
    let schema = schema();
    let files = yaml_files(&samples_dir().join("invalid"));
    let mut seen = Vec::new();
    for file in &files {
        let name = file.file_stem().unwrap().to_str().unwrap();
        let (_, rule) = rules::ALL
            .iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("{name}.yaml names no rule in rules::ALL"));
        let want = message(&rule());
        let errors = Validator::new()
            .validate(&schema, &load(file), None)
            .expect_err(name)
            .into_vec();
        let got: Vec<String> = errors.iter().map(|e| e.message.clone()).collect();
        assert_eq!(got, vec![want], "{name}: {errors:?}");
        seen.push(name.to_string());
    }
    for (name, _) in rules::ALL {
        assert!(
            seen.iter().any(|s| s == name),
            "rule {name} has no invalid sample"
        );
    }
}

#[test]
fn rules_are_in_the_generated_crd() {
    let crd = serde_json::to_string(&NodeApiPolicy::crd()).unwrap();
    for (name, rule) in rules::ALL {
        let rule = rule();
        assert!(crd.contains(&message(&rule)), "{name} missing from the CRD");
    }
}
