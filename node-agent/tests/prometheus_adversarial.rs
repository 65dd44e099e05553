//! The filter against hostile or broken input: look-alike labels, escapes, duplicate labels,
//! truncated lines, huge lines, CRLF, and the HELP/TYPE, keep/drop and addLabels semantics.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use nodegate_agent::prometheus::{
    Filter, FilterConfig, FilterConfigError, FilterRules, FilterStats, Format, Grant, filter_bytes,
};
use nodegate_crds::ResolvedNamespaces;
use nodegate_crds::policy::MetricsTransform;
use std::sync::Arc;

fn ns(names: &[&str]) -> ResolvedNamespaces {
    ResolvedNamespaces {
        all: false,
        names: names.iter().map(|s| s.to_string()).collect(),
    }
}

fn all() -> ResolvedNamespaces {
    ResolvedNamespaces {
        all: true,
        names: vec![],
    }
}

fn grant(namespaces: ResolvedNamespaces) -> Grant {
    Grant {
        namespaces,
        metrics: None,
    }
}

fn run_with(grants: Vec<Grant>, format: Format, input: &str) -> (String, FilterStats) {
    let rules = Arc::new(FilterRules::new(&FilterConfig { grants }).unwrap());
    let (out, stats) = filter_bytes(rules, format, input.as_bytes());
    (String::from_utf8(out).unwrap(), stats)
}

fn run(namespaces: ResolvedNamespaces, input: &str) -> (String, FilterStats) {
    run_with(vec![grant(namespaces)], Format::Text, input)
}

fn kept(namespaces: ResolvedNamespaces, line: &str) -> bool {
    let (out, _) = run(namespaces, &format!("{line}\n"));
    assert!(out.is_empty() || out == format!("{line}\n"), "{out:?}");
    !out.is_empty()
}

#[test]
fn look_alike_labels_do_not_fool_the_filter() {
    let team_a = || ns(&["team-a"]);
    for line in [
        r#"m{label="namespace=\"team-a\""} 1"#,
        r#"m{label="x\",namespace=\"team-a\""} 1"#,
        r#"m{label="x\\\",namespace=\"team-a\""} 1"#,
        r#"m{label="}, namespace=\"team-a\"} 1"} 1"#,
        r#"m{namespace="team-b",label="namespace=\"team-a\""} 1"#,
        r#"m{my_namespace="team-a"} 1"#,
        r#"m{namespaces="team-a"} 1"#,
        r#"m{Namespace="team-a"} 1"#,
        r#"m{namespace="team-a-other"} 1"#,
        r#"m{namespace="team-"} 1"#,
        r#"m{namespace="team-a\n"} 1"#,
        r#"namespace{x="team-a"} 1"#,
        r#"m_namespace 1"#,
    ] {
        assert!(!kept(team_a(), line), "kept {line}");
    }
    for line in [
        r#"m{label="x\\",namespace="team-a"} 1"#,
        r#"m{label="namespace=\"team-b\"",namespace="team-a"} 1"#,
        r#"m{namespace="team-a"} 1"#,
        r#"m { namespace = "team-a" , } 1"#,
        r#"m{namespace="team-a"}	1	1633253812125"#,
    ] {
        assert!(kept(team_a(), line), "dropped {line}");
    }
}

#[test]
fn namespace_values_compare_unescaped() {
    assert!(kept(ns(&["a\"b"]), r#"m{namespace="a\"b"} 1"#));
    assert!(kept(ns(&["a\\b"]), r#"m{namespace="a\\b"} 1"#));
    assert!(!kept(ns(&["a\\\"b"]), r#"m{namespace="a\"b"} 1"#));
}

#[test]
fn a_label_named_twice_drops_the_line() {
    for grants in [
        ns(&["team-a"]),
        ns(&["team-b"]),
        ns(&["team-a", "team-b"]),
        all(),
    ] {
        let (out, stats) = run(grants, "m{namespace=\"team-a\",namespace=\"team-b\"} 1\n");
        assert_eq!(out, "");
        assert_eq!(stats.invalid_lines, 1);
    }
    let (out, stats) = run(
        ns(&["team-a"]),
        "m{a=\"1\",namespace=\"team-a\",a=\"2\"} 1\n",
    );
    assert_eq!((out.as_str(), stats.invalid_lines), ("", 1));
}

#[test]
fn broken_lines_are_dropped_and_counted() {
    for line in [
        r#"m{namespace="team-a" 1"#,
        r#"m{namespace="team-a""#,
        r#"m{namespace="team-a"#,
        r#"m{namespace="team-a"}"#,
        r#"m{namespace="team-a"} "#,
        r#"m{namespace="team-a"} 1 "#,
        r#"m{namespace="team-a"}1"#,
        r#"m{namespace="team-a"} one"#,
        r#"m{namespace="team-a"} 1 1.5"#,
        r#"m{namespace="team-a"} 1 2 3"#,
        r#"m{namespace=team-a} 1"#,
        r#"m{namespace="team-a",,} 1"#,
        r#"m{namespace="te\am"} 1"#,
        r#"{namespace="team-a"} 1"#,
        r#"9m{namespace="team-a"} 1"#,
        r#"m{"namespace"="team-a"} 1"#,
        r#"m{namespace="team-a"} 1 # {trace_id="x"} 1"#,
    ] {
        for scope in [ns(&["team-a"]), all()] {
            let scoped = !scope.all;
            let (out, stats) = run(scope, &format!("{line}\nok{{namespace=\"team-a\"}} 2\n"));
            assert_eq!(out, "ok{namespace=\"team-a\"} 2\n", "{line}");
            assert_eq!(stats.samples_kept, 1, "{line}");
            if scoped {
                // A scoped filter may drop a line before parsing it when no granted
                // namespace appears in it at all.
                assert_eq!(stats.invalid_lines + stats.samples_dropped, 1, "{line}");
            } else {
                assert_eq!(stats.invalid_lines, 1, "{line}");
            }
        }
    }
    // Bytes that are not UTF-8 never reach the caller.
    let rules = Arc::new(
        FilterRules::new(&FilterConfig {
            grants: vec![grant(all())],
        })
        .unwrap(),
    );
    let (out, stats) = filter_bytes(rules, Format::Text, b"m{pod=\"\xff\"} 1\n");
    assert!(out.is_empty());
    assert_eq!(stats.invalid_lines, 1);
}

#[test]
fn huge_lines_are_dropped_and_the_stream_goes_on() {
    let rules = Arc::new(
        FilterRules::new(&FilterConfig {
            grants: vec![grant(all())],
        })
        .unwrap(),
    );
    let huge = format!(
        "m{{namespace=\"team-a\",x=\"{}\"}} 1\n",
        "y".repeat(2 << 20)
    );
    let input = format!("a 1\n{huge}b 2\n{huge}");
    for chunk in [1000usize, 1 << 16, input.len()] {
        let mut filter = Filter::new(rules.clone(), Format::Text);
        let mut out = Vec::new();
        for c in input.as_bytes().chunks(chunk) {
            filter.push(c, &mut out);
        }
        filter.finish(&mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "a 1\nb 2\n",
            "chunk {chunk}"
        );
        assert_eq!(filter.stats().oversized_lines, 2, "chunk {chunk}");
    }
    // The limit is on the line, whatever the chunking: a line of exactly the limit passes.
    let line = "m 1";
    for max in [2usize, 3] {
        for chunk in [1usize, 2, 10] {
            let mut filter = Filter::new(rules.clone(), Format::Text).with_max_line(max);
            let mut out = Vec::new();
            for c in format!("{line}\n{line}").as_bytes().chunks(chunk) {
                filter.push(c, &mut out);
            }
            filter.finish(&mut out);
            let expected = if max >= line.len() { "m 1\nm 1\n" } else { "" };
            assert_eq!(
                String::from_utf8(out).unwrap(),
                expected,
                "max {max} chunk {chunk}"
            );
        }
    }
}

#[test]
fn crlf_no_trailing_newline_and_empty_input() {
    let (out, _) = run(
        ns(&["a"]),
        "# HELP m help\r\n# TYPE m gauge\r\nm{namespace=\"a\"} 1\r\nm{namespace=\"b\"} 1\r\n",
    );
    assert_eq!(out, "# HELP m help\n# TYPE m gauge\nm{namespace=\"a\"} 1\n");
    let (out, _) = run(ns(&["a"]), "m{namespace=\"a\"} 1");
    assert_eq!(out, "m{namespace=\"a\"} 1\n");
    let (out, stats) = run(all(), "");
    assert_eq!(out, "");
    assert_eq!(stats, FilterStats::default());
    let (out, _) = run(all(), "\n\n  \n# a comment\n");
    assert_eq!(out, "");
}

#[test]
fn node_level_samples_only_for_all() {
    let input = "m 1\nm{namespace=\"\"} 2\nm{id=\"/\"} 3\nm{namespace=\"a\"} 4\n";
    assert_eq!(run(ns(&["a"]), input).0, "m{namespace=\"a\"} 4\n");
    assert_eq!(run(ns(&["a", ""]), input).0, "m{namespace=\"a\"} 4\n");
    assert_eq!(run(all(), input).0, input);
    // Another grant with `all` admits them even when the first does not.
    let (out, _) = run_with(vec![grant(ns(&["b"])), grant(all())], Format::Text, input);
    assert_eq!(out, input);
    // No grant at all: nothing.
    assert_eq!(run_with(vec![], Format::Text, input).0, "");
}

#[test]
fn help_and_type_only_before_a_kept_sample() {
    let input = "\
# HELP x Family x.
# TYPE x gauge
x{namespace=\"b\"} 1
x{namespace=\"a\"} 2
x{namespace=\"a\"} 3
# HELP y Family y, nothing kept.
# TYPE y gauge
y{namespace=\"b\"} 1
# HELP orphan No samples at all.
# TYPE orphan counter
# just a comment
z{namespace=\"a\"} 4
";
    let (out, stats) = run(ns(&["a"]), input);
    assert_eq!(
        out,
        "# HELP x Family x.\n# TYPE x gauge\nx{namespace=\"a\"} 2\nx{namespace=\"a\"} 3\nz{namespace=\"a\"} 4\n"
    );
    assert_eq!((stats.samples_kept, stats.samples_dropped), (3, 2));
    // A sample of another name ends the family: a later sample of it gets no metadata.
    let (out, _) = run(
        ns(&["a"]),
        "# TYPE x gauge\ny{namespace=\"a\"} 1\nx{namespace=\"a\"} 2\n",
    );
    assert_eq!(out, "y{namespace=\"a\"} 1\nx{namespace=\"a\"} 2\n");
    // Repeated metadata of one family is dropped and counted.
    let (out, stats) = run(all(), "# HELP x a\n# HELP x b\nx 1\n");
    assert_eq!(
        (out.as_str(), stats.invalid_lines),
        ("# HELP x a\nx 1\n", 1)
    );
    // Metadata after the family's samples, or for a family already out, is dropped too: the
    // Prometheus parser refuses a second TYPE, and filtering the output again changes nothing.
    let (out, stats) = run(all(), "# TYPE x gauge\nx 1\n# HELP x late\nx 2\n");
    assert_eq!(
        (out.as_str(), stats.invalid_lines),
        ("# TYPE x gauge\nx 1\nx 2\n", 1)
    );
    let (out, _) = run(
        ns(&["a"]),
        "# TYPE h histogram\nh_sum{namespace=\"a\"} 1\nx{namespace=\"b\"} 1\n# TYPE h histogram\nh_sum{namespace=\"a\"} 2\n",
    );
    assert_eq!(
        out,
        "# TYPE h histogram\nh_sum{namespace=\"a\"} 1\nh_sum{namespace=\"a\"} 2\n"
    );
}

fn transform(keep: &[&str], drop: &[&str], add: &[(&str, &str)]) -> Option<MetricsTransform> {
    Some(MetricsTransform {
        keep: keep.iter().map(|s| s.to_string()).collect(),
        drop: drop.iter().map(|s| s.to_string()).collect(),
        add_labels: add
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    })
}

const HISTOGRAM: &str = "\
# TYPE h histogram
h_bucket{namespace=\"a\",le=\"1\"} 1
h_bucket{namespace=\"a\",le=\"+Inf\"} 2
h_sum{namespace=\"a\"} 3
h_count{namespace=\"a\"} 2
# TYPE g gauge
g{namespace=\"a\"} 5
g_sum{namespace=\"a\"} 6
";

#[test]
fn keep_and_drop_by_metric_and_family_name() {
    let with = |keep: &[&str], drop: &[&str]| {
        run_with(
            vec![Grant {
                namespaces: ns(&["a"]),
                metrics: transform(keep, drop, &[]),
            }],
            Format::Text,
            HISTOGRAM,
        )
        .0
    };
    let family_h = "# TYPE h histogram\nh_bucket{namespace=\"a\",le=\"1\"} 1\nh_bucket{namespace=\"a\",le=\"+Inf\"} 2\nh_sum{namespace=\"a\"} 3\nh_count{namespace=\"a\"} 2\n";
    assert_eq!(with(&["h"], &[]), family_h);
    assert_eq!(with(&[], &["g", "g_sum"]), family_h);
    assert_eq!(with(&["h"], &["h_sum"]).lines().count(), 4);
    assert_eq!(
        with(&["h_count"], &[]),
        "# TYPE h histogram\nh_count{namespace=\"a\"} 2\n"
    );
    // A gauge's family does not take suffixes: g_sum is its own (untyped) series.
    assert_eq!(with(&["g"], &[]), "# TYPE g gauge\ng{namespace=\"a\"} 5\n");
    assert_eq!(
        with(&[], &["h"]),
        "# TYPE g gauge\ng{namespace=\"a\"} 5\ng_sum{namespace=\"a\"} 6\n"
    );
    assert_eq!(with(&["h"], &["h"]), "");
}

#[test]
fn added_labels_go_inside_the_label_set() {
    let add = |input: &str, labels: &[(&str, &str)]| {
        run_with(
            vec![Grant {
                namespaces: all(),
                metrics: transform(&[], &[], labels),
            }],
            Format::Text,
            input,
        )
        .0
    };
    let c = [("cluster", "c1"), ("team", "x\"y\\z\nw")];
    assert_eq!(
        add("m{namespace=\"a\"} 1 1633253812125\n", &c),
        "m{namespace=\"a\",cluster=\"c1\",team=\"x\\\"y\\\\z\\nw\"} 1 1633253812125\n"
    );
    assert_eq!(add("m 1\n", &c[..1]), "m{cluster=\"c1\"} 1\n");
    assert_eq!(add("m{} 1\n", &c[..1]), "m{cluster=\"c1\"} 1\n");
    assert_eq!(
        add("m{a=\"b\",} 1\n", &c[..1]),
        "m{a=\"b\",cluster=\"c1\"} 1\n"
    );
    assert_eq!(
        add("m { a=\"b\" } 1\n", &c[..1]),
        "m { a=\"b\" ,cluster=\"c1\"} 1\n"
    );
    // The sample's own label wins.
    assert_eq!(
        add("m{cluster=\"own\",namespace=\"a\"} 1\n", &c[..1]),
        "m{cluster=\"own\",namespace=\"a\"} 1\n"
    );
    // The first grant that admits the sample gives the labels.
    let (out, _) = run_with(
        vec![
            Grant {
                namespaces: ns(&["a"]),
                metrics: transform(&["other"], &[], &[("g", "1")]),
            },
            Grant {
                namespaces: ns(&["a"]),
                metrics: transform(&[], &[], &[("g", "2")]),
            },
            Grant {
                namespaces: ns(&["a"]),
                metrics: transform(&[], &[], &[("g", "3")]),
            },
        ],
        Format::Text,
        "m{namespace=\"a\"} 1\n",
    );
    assert_eq!(out, "m{namespace=\"a\",g=\"2\"} 1\n");
}

#[test]
fn labels_that_would_widen_scope_or_break_the_format_are_refused() {
    for name in ["namespace", "__name__", "1a", "a-b", "", "a b"] {
        let config = FilterConfig {
            grants: vec![Grant {
                namespaces: all(),
                metrics: transform(&[], &[], &[(name, "v")]),
            }],
        };
        assert_eq!(
            FilterRules::new(&config).err(),
            Some(FilterConfigError::InvalidAddedLabel(name.to_string())),
            "{name}"
        );
    }
}

#[test]
fn openmetrics_exemplars_unit_and_eof() {
    let input = "\
# TYPE foo counter
# UNIT foo seconds
# HELP foo Foo.
foo_total{namespace=\"a\"} 1 1.5 # {trace_id=\"t\"} 1 1.25
foo_created{namespace=\"a\"} 123
foo_total{namespace=\"b\"} 2
# TYPE bar histogram
bar_bucket{namespace=\"a\",le=\"+Inf\"} 1 # {namespace=\"b\"} 1
bar_bucket{namespace=\"a\",le=\"1\"} 1 # {namespace=\"a\"} 1
# EOF
after{namespace=\"a\"} 1
";
    let (out, stats) = run_with(vec![grant(ns(&["a"]))], Format::OpenMetrics, input);
    assert_eq!(
        out,
        "# TYPE foo counter\n# UNIT foo seconds\n# HELP foo Foo.\nfoo_total{namespace=\"a\"} 1 1.5 # {trace_id=\"t\"} 1 1.25\nfoo_created{namespace=\"a\"} 123\n# TYPE bar histogram\nbar_bucket{namespace=\"a\",le=\"1\"} 1 # {namespace=\"a\"} 1\n# EOF\n"
    );
    assert_eq!(stats.invalid_lines, 1, "the exemplar of another namespace");
    assert_eq!(stats.lines_after_eof, 1);
    let (out, _) = run_with(
        vec![Grant {
            namespaces: ns(&["a"]),
            metrics: transform(&["foo"], &[], &[("c", "1")]),
        }],
        Format::OpenMetrics,
        input,
    );
    assert!(
        out.contains("foo_total{namespace=\"a\",c=\"1\"} 1 1.5 # {trace_id=\"t\"} 1 1.25\n"),
        "{out}"
    );
    assert!(out.ends_with("# EOF\n") && !out.contains("bar"), "{out}");
    // In the text format `# EOF` is a comment, and exemplars are not allowed.
    let (out, _) = run(all(), "# EOF\nm 1 # {a=\"b\"} 1\nn 2\n");
    assert_eq!(out, "n 2\n");
}
