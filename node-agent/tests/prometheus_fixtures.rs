//! The filter over real kubelet captures (`../shared/fixtures/kubelet/*.txt`, read in place, never
//! copied into the repo): scope holds for several grants, `all` changes nothing but orphan
//! comments, and the output stays valid for `promtool check metrics`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use nodegate_agent::prometheus::{Filter, FilterConfig, FilterRules, Format, Grant, filter_bytes};
use nodegate_crds::ResolvedNamespaces;
use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;

// The counted-skip protocol of `nodegate-tests` (std only; a dependency on that crate would be a
// cycle through the agent).
#[path = "../../tests/src/skip.rs"]
#[allow(dead_code)] // the cluster classes are for nodegate-tests
mod skip;

fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/kubelet")
}

/// The captures, or None (a recorded skip) where `../shared` is absent outside CI; CI always has
/// it, so there it is a failure.
fn captures() -> Option<Vec<(String, Vec<u8>)>> {
    let dir = fixtures_dir();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        skip::skip_or_fail(
            skip::Class::ProvidedByCi,
            &format!("no kubelet captures at {}", dir.display()),
            "check out the shared fixtures next to the repository (../shared/fixtures/kubelet/)",
        );
        return None;
    };
    let mut files: Vec<(String, Vec<u8>)> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no *.txt capture in {}", dir.display());
    Some(files)
}

fn rules(namespaces: &[&str], all: bool) -> Arc<FilterRules> {
    let config = FilterConfig {
        grants: vec![Grant {
            namespaces: ResolvedNamespaces {
                all,
                names: namespaces.iter().map(|s| s.to_string()).collect(),
            },
            metrics: None,
        }],
    };
    Arc::new(FilterRules::new(&config).unwrap())
}

/// A deliberately simple, separate label-set reader (char by char) to check the filter's output.
/// None when the line is not a sample or cannot be read.
fn sample_labels(line: &str) -> Option<Vec<(String, String)>> {
    if line.starts_with('#') || line.trim().is_empty() {
        return None;
    }
    let open = line.find(['{', ' '])?;
    if line.as_bytes()[open] == b' ' {
        return Some(vec![]);
    }
    let mut chars = line[open + 1..].chars();
    let mut labels = Vec::new();
    loop {
        let mut name = String::new();
        loop {
            match chars.next()? {
                '=' => break,
                '}' if name.trim().is_empty() => return Some(labels),
                ',' if name.trim().is_empty() => {}
                c => name.push(c),
            }
        }
        if chars.next()? != '"' {
            return None;
        }
        let mut value = String::new();
        loop {
            match chars.next()? {
                '"' => break,
                '\\' => match chars.next()? {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                c => value.push(c),
            }
        }
        labels.push((name.trim().to_string(), value));
        match chars.next()? {
            ',' => {}
            '}' => return Some(labels),
            _ => return None,
        }
    }
}

fn namespace_of(labels: &[(String, String)]) -> Option<&str> {
    labels
        .iter()
        .find(|(n, _)| n == "namespace")
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.is_empty())
}

/// The namespaces that occur in a capture, most frequent first.
fn namespaces_in(input: &str) -> Vec<String> {
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for line in input.lines() {
        if let Some(labels) = sample_labels(line)
            && let Some(ns) = namespace_of(&labels)
        {
            *counts.entry(ns.to_string()).or_default() += 1;
        }
    }
    let mut v: Vec<_> = counts.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v.into_iter().map(|(n, _)| n).collect()
}

/// Input minus blank lines, comments other than HELP/TYPE, and HELP/TYPE groups not followed by
/// a sample (kubelet output puts each family's samples right after its metadata).
fn expected_for_all(input: &str) -> String {
    let mut out = String::new();
    let mut pending: Vec<&str> = Vec::new();
    let mut pending_family = "";
    for line in input.lines() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            continue;
        }
        if let Some(rest) = line
            .strip_prefix("# HELP ")
            .or(line.strip_prefix("# TYPE "))
        {
            let family = rest.split(' ').next().unwrap();
            if family != pending_family {
                pending.clear();
                pending_family = family;
            }
            pending.push(line);
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        for p in pending.drain(..) {
            out.push_str(p);
            out.push('\n');
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[test]
fn all_keeps_everything_but_orphan_comments() {
    let Some(files) = captures() else { return };
    for (name, input) in files {
        let (out, stats) = filter_bytes(rules(&[], true), Format::Text, &input);
        let expected = expected_for_all(std::str::from_utf8(&input).unwrap());
        assert!(
            out == expected.as_bytes(),
            "{name}: `all` output differs from the input minus orphan comments"
        );
        assert_eq!(stats.invalid_lines, 0, "{name}");
        assert_eq!(stats.oversized_lines, 0, "{name}");
        assert!(stats.samples_kept > 0, "{name}");
    }
}

#[test]
fn scoped_grants_keep_only_their_namespaces() {
    let Some(files) = captures() else { return };
    for (name, input) in files {
        let text = std::str::from_utf8(&input).unwrap();
        let present = namespaces_in(text);
        let input_lines: std::collections::HashSet<&str> = text.lines().collect();
        let mut scopes: Vec<Vec<String>> = vec![vec!["no-such-namespace".into()]];
        if let Some(first) = present.first() {
            scopes.push(vec![first.clone()]);
        }
        if present.len() >= 2 {
            let mut two = vec![present[0].clone(), present[present.len() - 1].clone()];
            two.sort();
            scopes.push(two);
        }
        for scope in scopes {
            let refs: Vec<&str> = scope.iter().map(String::as_str).collect();
            let (out, stats) = filter_bytes(rules(&refs, false), Format::Text, &input);
            let out = String::from_utf8(out).unwrap();
            let mut kept = 0;
            for line in out.lines() {
                if line.starts_with('#') {
                    continue;
                }
                let labels =
                    sample_labels(line).unwrap_or_else(|| panic!("{name}: unreadable {line}"));
                let ns = namespace_of(&labels).unwrap_or_else(|| {
                    panic!("{name} {scope:?}: sample without namespace: {line}")
                });
                assert!(
                    scope.iter().any(|s| s == ns),
                    "{name} {scope:?}: foreign {line}"
                );
                assert!(
                    input_lines.contains(line),
                    "{name}: output line not in input: {line}"
                );
                kept += 1;
            }
            // Every in-scope sample of the input is kept.
            let expected = text
                .lines()
                .filter(|l| {
                    sample_labels(l).is_some_and(|labels| {
                        namespace_of(&labels).is_some_and(|ns| scope.iter().any(|s| s == ns))
                    })
                })
                .count();
            assert_eq!(kept, expected, "{name} {scope:?}");
            assert_eq!(stats.samples_kept as usize, expected, "{name} {scope:?}");
            if scope[0] == "no-such-namespace" {
                assert!(
                    out.is_empty(),
                    "{name}: output for an absent namespace: {out}"
                );
            }
        }
    }
}

#[test]
fn output_does_not_depend_on_chunking() {
    let Some(files) = captures() else { return };
    let rules = rules(&["kube-system"], false);
    for (name, input) in files {
        let (whole, _) = filter_bytes(rules.clone(), Format::Text, &input);
        for size in [1usize, 7, 4096, 65536] {
            let mut filter = Filter::new(rules.clone(), Format::Text);
            let mut out = Vec::new();
            for chunk in input.chunks(size) {
                filter.push(chunk, &mut out);
            }
            filter.finish(&mut out);
            assert!(out == whole, "{name}: chunks of {size} change the output");
        }
    }
}

/// Runs `promtool check metrics` on `input`: exit code and the set of problems it reports.
fn promtool(input: &[u8]) -> Option<(i32, BTreeSet<String>)> {
    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            skip::skip_or_fail(
                skip::Class::ProvidedByCi,
                &format!("promtool not found ({e})"),
                "install the Debian package prometheus (see .ci/install-deps)",
            );
            return None;
        }
    };
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let output = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    let problems = String::from_utf8_lossy(&output.stdout)
        .lines()
        .chain(String::from_utf8_lossy(&output.stderr).lines())
        .map(str::to_string)
        .collect();
    Some((output.status.code().unwrap_or(-1), problems))
}

#[test]
fn output_passes_promtool_with_no_new_problems() {
    let Some(files) = captures() else { return };
    for (name, input) in files {
        let Some((input_code, input_problems)) = promtool(&input) else {
            return;
        };
        assert_ne!(
            input_code, 1,
            "{name}: promtool cannot parse the capture itself"
        );
        let present = namespaces_in(std::str::from_utf8(&input).unwrap());
        let mut configs = vec![rules(&[], true)];
        if let Some(first) = present.first() {
            configs.push(rules(&[first], false));
        }
        for rules in configs {
            let (out, _) = filter_bytes(rules, Format::Text, &input);
            let (code, problems) = promtool(&out).unwrap();
            let new: Vec<_> = problems.difference(&input_problems).collect();
            assert!(
                new.is_empty(),
                "{name}: promtool reports new problems: {new:?}"
            );
            assert!(
                code == 0 || code == input_code,
                "{name}: promtool exit code {code}"
            );
        }
    }
}
