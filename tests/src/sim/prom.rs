//! Writing the Prometheus text exposition format (0.0.4) as the kubelet's Go client does: label
//! names sorted, values escaped, floats in Go's shortest `%g` form (`2.687844352e+09`), so
//! filters see the byte shapes real scrapes have.

use std::fmt::Write;

/// The content type kubelet 1.37 answers Prometheus text with (client_golang adds the
/// `escaping` parameter; older kubelets send the same without it).
pub const TEXT_CONTENT_TYPE: &str =
    "text/plain; version=0.0.4; charset=utf-8; escaping=underscores";

/// The protobuf exposition content type, as kubelet 1.37 sends it.
pub const PROTOBUF_CONTENT_TYPE: &str = "application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily; encoding=delimited; escaping=underscores";

/// The exposition formats a kubelet chooses between.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Protobuf,
}

/// The format the kubelet's metrics handler (client_golang's `expfmt.Negotiate`) picks for an
/// `Accept` header: the first entry by quality that is delimited protobuf or text 0.0.4; text
/// when none is (OpenMetrics is not enabled in the kubelet, so it is answered with text).
pub fn negotiate(accept: Option<&str>) -> Format {
    let Some(accept) = accept else {
        return Format::Text;
    };
    let mut entries: Vec<(f64, usize, &str)> = accept
        .split(',')
        .enumerate()
        .map(|(i, entry)| {
            let q = entry
                .split(';')
                .skip(1)
                .filter_map(|p| p.trim().strip_prefix("q="))
                .find_map(|q| q.trim().parse::<f64>().ok())
                .unwrap_or(1.0);
            (q, i, entry)
        })
        .collect();
    entries.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    for (q, _, entry) in entries {
        if q <= 0.0 {
            continue;
        }
        let mut parts = entry.split(';').map(str::trim);
        let media = parts.next().unwrap_or("").to_ascii_lowercase();
        let params: Vec<(String, String)> = parts
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| {
                (
                    k.trim().to_ascii_lowercase(),
                    v.trim().trim_matches('"').to_string(),
                )
            })
            .collect();
        let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        if media == "application/vnd.google.protobuf"
            && param("proto") == Some("io.prometheus.client.MetricFamily")
            && param("encoding") == Some("delimited")
        {
            return Format::Protobuf;
        }
        if media == "text/plain" && matches!(param("version"), None | Some("0.0.4")) {
            return Format::Text;
        }
    }
    Format::Text
}

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
    fn negotiation_like_client_golang() {
        let proto = "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited";
        assert_eq!(negotiate(None), Format::Text);
        assert_eq!(negotiate(Some("*/*")), Format::Text);
        assert_eq!(negotiate(Some(proto)), Format::Protobuf);
        assert_eq!(
            negotiate(Some(&format!(
                "{proto};q=0.7,text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
            ))),
            Format::Protobuf
        );
        assert_eq!(
            negotiate(Some(&format!("text/plain;version=0.0.4;q=1,{proto};q=0.5"))),
            Format::Text
        );
        assert_eq!(
            negotiate(Some("application/openmetrics-text;version=1.0.0")),
            Format::Text
        );
        assert_eq!(
            negotiate(Some(
                "application/vnd.google.protobuf;proto=other;encoding=delimited"
            )),
            Format::Text
        );
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
