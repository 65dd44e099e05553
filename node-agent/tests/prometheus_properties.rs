//! Properties of the Prometheus filter, by proptest and by bolero.
//!
//! The bolero target runs as an ordinary bounded test under `cargo test` (3000 random inputs).
//! For long runs under libFuzzer (nightly toolchain and `cargo install cargo-bolero`; it builds
//! with the workspace's `[profile.fuzz]`), see `docs/fuzzing.md`:
//!
//! ```text
//! nice -n 19 cargo +nightly bolero test -p nodegate-agent fuzz_filter_properties -T 480s
//! ```
//!
//! The corpus goes to `node-agent/tests/__fuzz__/filter_properties/` (not committed).
//!
//! Properties, for every input: no panic; the output does not depend on how the input is split
//! into chunks; every output line is an input line (modulo added labels), in input order; no
//! output sample has a namespace outside the grant (and none lacks one without `all`); the
//! output, filtered again with `all`, is unchanged (it parses).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use nodegate_agent::prometheus::{Filter, FilterConfig, FilterRules, Format, Grant, filter_bytes};
use nodegate_crds::ResolvedNamespaces;
use nodegate_crds::policy::MetricsTransform;
use proptest::prelude::*;
use std::sync::{Arc, LazyLock};

fn rules(names: &[&str], all: bool, add: &[(&str, &str)]) -> Arc<FilterRules> {
    let metrics = (!add.is_empty()).then(|| MetricsTransform {
        add_labels: add
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    });
    let config = FilterConfig {
        grants: vec![Grant {
            namespaces: ResolvedNamespaces {
                all,
                names: names.iter().map(|s| s.to_string()).collect(),
            },
            metrics,
        }],
    };
    Arc::new(FilterRules::new(&config).unwrap())
}

static SCOPE_A: LazyLock<Arc<FilterRules>> = LazyLock::new(|| rules(&["a"], false, &[]));
static SCOPE_AB_LABELS: LazyLock<Arc<FilterRules>> =
    LazyLock::new(|| rules(&["a", "b"], false, &[("cluster", "c\"1")]));
static ALL: LazyLock<Arc<FilterRules>> = LazyLock::new(|| rules(&[], true, &[]));
const ADDED: &str = "cluster=\"c\\\"1\"";

/// A separate, deliberately naive reader of an output sample's labels (char by char).
fn labels(line: &str) -> Option<Vec<(String, String)>> {
    let line = line.trim_start_matches([' ', '\t']);
    let open = line.find(['{', ' ', '\t'])?;
    if line.as_bytes()[open] != b'{' {
        return Some(vec![]);
    }
    let mut chars = line[open + 1..].chars();
    let mut out = Vec::new();
    loop {
        let mut name = String::new();
        loop {
            match chars.next()? {
                '=' => break,
                '}' if name.trim().is_empty() => return Some(out),
                ',' if name.trim().is_empty() => {}
                c => name.push(c),
            }
        }
        for c in chars.by_ref() {
            if c == '"' {
                break;
            }
            if c != ' ' && c != '\t' {
                return None;
            }
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
        out.push((name.trim().to_string(), value));
        loop {
            match chars.next()? {
                ',' => break,
                '}' => return Some(out),
                ' ' | '\t' => {}
                _ => return None,
            }
        }
    }
}

fn filter_in_chunks(rules: &Arc<FilterRules>, input: &[u8], cuts: &[usize]) -> Vec<u8> {
    let mut filter = Filter::new(rules.clone(), Format::Text);
    let mut out = Vec::new();
    let mut start = 0;
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    cuts.sort();
    for cut in cuts {
        filter.push(&input[start..cut.max(start)], &mut out);
        start = cut.max(start);
    }
    filter.push(&input[start..], &mut out);
    filter.finish(&mut out);
    out
}

/// Checks every property for one input; panics with a message on a violation.
fn check_properties(input: &[u8], cuts: &[usize]) {
    let input_lines: Vec<&[u8]> = input
        .split(|b| *b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .collect();
    for (rules, scope, added) in [
        (&*SCOPE_A, &["a"][..], None),
        (&*SCOPE_AB_LABELS, &["a", "b"][..], Some(ADDED)),
        (&*ALL, &[][..], None),
    ] {
        let (whole, _) = filter_bytes(rules.clone(), Format::Text, input);
        assert_eq!(
            filter_in_chunks(rules, input, cuts),
            whole,
            "chunking changes the output"
        );
        let out = std::str::from_utf8(&whole).expect("output is UTF-8");
        assert!(whole.is_empty() || whole.ends_with(b"\n"));
        let mut next = 0;
        for line in out.lines() {
            let is_comment = line.trim_start_matches([' ', '\t']).starts_with('#');
            // Subset, in order: strip the one label the filter may add.
            let original = match added {
                Some(a) if !is_comment => {
                    let l = line.replacen(&format!(",{a}}}"), "}", 1).replacen(
                        &format!("{{{a}}}"),
                        "",
                        1,
                    );
                    if l.len() == line.len() {
                        line.replacen(&format!("{a}}}"), "}", 1)
                    } else {
                        l
                    }
                }
                _ => line.to_string(),
            };
            let found = input_lines[next..]
                .iter()
                .position(|l| *l == original.as_bytes() || *l == line.as_bytes());
            let Some(pos) = found else {
                panic!("output line {line:?} is not a later input line");
            };
            next += pos + 1;
            if is_comment {
                continue;
            }
            let labels = labels(line).unwrap_or_else(|| panic!("unreadable output {line:?}"));
            let namespaces: Vec<&str> = labels
                .iter()
                .filter(|(n, _)| n == "namespace")
                .map(|(_, v)| v.as_str())
                .collect();
            assert!(namespaces.len() <= 1, "namespace twice in {line:?}");
            if !scope.is_empty() {
                let ns = namespaces
                    .first()
                    .unwrap_or_else(|| panic!("no namespace: {line:?}"));
                assert!(scope.contains(ns), "foreign namespace in {line:?}");
            }
        }
        let (again, _) = filter_bytes(ALL.clone(), Format::Text, &whole);
        assert_eq!(again, whole, "output filtered again with `all` changes");
    }
}

/// Pieces that make up likely and unlikely exposition, so random choices reach deep states.
const PIECES: &[&str] = &[
    "m",
    "m_total",
    "h_bucket",
    "h",
    "{",
    "}",
    "namespace",
    "=",
    "\"a\"",
    "\"b\"",
    "\"\"",
    "\"",
    "\\",
    "\\\"",
    "\\\\",
    "\\n",
    ",",
    " ",
    "\t",
    "1",
    "-1.5e3",
    "+Inf",
    "NaN",
    "1633253812125",
    "\n",
    "\r\n",
    "# HELP m help\n",
    "# TYPE m counter\n",
    "# TYPE h histogram\n",
    "# HELP h x\\ny\n",
    "# TYPE m\n",
    "# comment\n",
    "# EOF\n",
    "le=\"1\"",
    "pod=\"p\"",
    "x=\"namespace=\\\"a\\\"\"",
    "namespace=\"a\"",
    "namespace=\"b\"",
    "namespace=\"c\"",
    "namespace=\"\"",
    "cluster=\"own\"",
    "\u{e9}",
    "\u{ff}",
    "m{namespace=\"a\"} 1\n",
    "m{namespace=\"c\"} 1\n",
    "m 1\n",
    "h_bucket{le=\"+Inf\",namespace=\"a\"} 2\n",
];

fn assemble(choices: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for c in choices {
        out.extend_from_slice(PIECES[*c as usize % PIECES.len()].as_bytes());
    }
    out
}

fn sample_line() -> impl Strategy<Value = String> {
    let ns = prop_oneof![
        Just(Some("a".to_string())),
        Just(Some("b".to_string())),
        Just(Some("c".to_string())),
        Just(Some(String::new())),
        Just(None),
    ];
    let other_value = prop_oneof![
        Just("p".to_string()),
        Just("namespace=\\\"a\\\"".to_string()),
        Just("x\\\\".to_string()),
        Just("},{namespace=\\\"a\\\"".to_string()),
        "[a-z,{}= ]{0,6}",
    ];
    let name = prop_oneof![
        Just("m"),
        Just("h_bucket"),
        Just("h_sum"),
        Just("cluster_x")
    ];
    (
        name,
        ns,
        prop::collection::vec(("[a-z_]{1,3}", other_value), 0..4),
        any::<prop::sample::Index>(),
        prop::bool::ANY,
    )
        .prop_map(|(name, ns, others, at, ts)| {
            let mut labels: Vec<String> = others
                .into_iter()
                .map(|(k, v)| format!("{k}=\"{v}\""))
                .collect();
            if let Some(ns) = ns {
                let i = at.index(labels.len() + 1);
                labels.insert(i, format!("namespace=\"{ns}\""));
            }
            let ts = if ts { " 1633253812125" } else { "" };
            if labels.is_empty() {
                format!("{name} 1{ts}")
            } else {
                format!("{name}{{{}}} 1{ts}", labels.join(","))
            }
        })
}

fn any_line() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => sample_line(),
        1 => Just("# HELP m Some help.".to_string()),
        1 => Just("# TYPE m counter".to_string()),
        1 => Just("# TYPE h histogram".to_string()),
        1 => Just("# a comment".to_string()),
        1 => Just(String::new()),
        1 => "[ -~]{0,30}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn properties_hold_on_exposition_like_input(
        lines in prop::collection::vec(any_line(), 0..40),
        crlf in prop::bool::ANY,
        trailing in prop::bool::ANY,
        cuts in prop::collection::vec(any::<usize>(), 0..6),
    ) {
        let sep = if crlf { "\r\n" } else { "\n" };
        let mut input = lines.join(sep);
        if trailing {
            input.push_str(sep);
        }
        check_properties(input.as_bytes(), &cuts);
    }

    #[test]
    fn properties_hold_on_assembled_pieces(
        choices in prop::collection::vec(any::<u8>(), 0..200),
        cuts in prop::collection::vec(any::<usize>(), 0..6),
    ) {
        check_properties(&assemble(&choices), &cuts);
    }

    #[test]
    fn no_panic_on_arbitrary_bytes(
        bytes in prop::collection::vec(any::<u8>(), 0..2000),
        cuts in prop::collection::vec(any::<usize>(), 0..6),
    ) {
        check_properties(&bytes, &cuts);
    }
}

#[test]
fn fuzz_filter_properties() {
    bolero::check!()
        .with_iterations(3000)
        .for_each(|data: &[u8]| {
            // The first bytes choose chunk boundaries; the rest is used raw and as piece choices.
            let cuts: Vec<usize> = data.iter().take(4).map(|b| *b as usize * 7).collect();
            let body = data.get(4..).unwrap_or_default();
            check_properties(body, &cuts);
            check_properties(&assemble(body), &cuts);
        });
}
