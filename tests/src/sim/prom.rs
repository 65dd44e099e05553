//! Writing the Prometheus text exposition format (0.0.4) as the kubelet's Go client does: label
//! names sorted, values escaped, floats in Go's shortest `%g` form (`2.687844352e+09`), so
//! filters see the byte shapes real scrapes have.

use std::fmt::Write;

/// The content type the kubelet answers Prometheus text with.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The protobuf exposition content type (for testing that the agent refuses it).
pub const PROTOBUF_CONTENT_TYPE: &str =
    "application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily; encoding=delimited";

pub fn family(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// One sample line. `labels` need not be sorted; they are written sorted by name.
pub fn sample(
    out: &mut String,
    name: &str,
    labels: &[(&str, &str)],
    value: f64,
    timestamp_ms: Option<i64>,
) {
    out.push_str(name);
    if !labels.is_empty() {
        let mut sorted: Vec<&(&str, &str)> = labels.iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(b.0));
        out.push('{');
        for (i, (k, v)) in sorted.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(k);
            out.push_str("=\"");
            escape_into(out, v);
            out.push('"');
        }
        out.push('}');
    }
    out.push(' ');
    out.push_str(&go_float(value));
    if let Some(ts) = timestamp_ms {
        let _ = write!(out, " {ts}");
    }
    out.push('\n');
}

fn escape_into(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Go's `strconv.FormatFloat(v, 'g', -1, 64)`: shortest digits, exponent form when the
/// exponent is below -4 or at least 6 (at least two exponent digits, with sign).
pub fn go_float(v: f64) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    if v.is_infinite() {
        return if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        };
    }
    if v == 0.0 {
        return "0".into();
    }
    let sci = format!("{v:e}");
    let Some((mantissa, exp)) = sci.split_once('e') else {
        return format!("{v}");
    };
    let exp: i32 = exp.parse().unwrap_or(0);
    if !(-4..6).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_like_go() {
        assert_eq!(go_float(479_232.0), "479232");
        assert_eq!(go_float(2_687_844_352.0), "2.687844352e+09");
        assert_eq!(go_float(1_048_576.0), "1.048576e+06");
        assert_eq!(go_float(0.159133), "0.159133");
        assert_eq!(go_float(0.00001), "1e-05");
        assert_eq!(go_float(1.0), "1");
        assert_eq!(go_float(-3.5), "-3.5");
        assert_eq!(go_float(f64::INFINITY), "+Inf");
    }

    #[test]
    fn labels_sorted_and_escaped() {
        let mut out = String::new();
        sample(
            &mut out,
            "m",
            &[("pod", "p"), ("container", "a\"b\\c\nd")],
            2.0,
            Some(5),
        );
        assert_eq!(out, "m{container=\"a\\\"b\\\\c\\nd\",pod=\"p\"} 2 5\n");
    }
}
