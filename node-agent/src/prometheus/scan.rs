//! A scanner for one line of Prometheus text exposition (format 0.0.4) or OpenMetrics text.
//!
//! Written by hand: no Rust crate parses the exposition format line by line on a stream, and the
//! filter needs exact byte offsets (where the label set ends, where the `namespace` value lies) to
//! pass kept lines through byte-for-byte. The grammar follows the Prometheus text parser
//! (`expfmt.TextParser`): blanks are spaces and tabs, label values allow exactly the escapes `\\`,
//! `\"` and `\n`. Anything else is an error, and the filter drops a line it cannot parse (fail
//! closed), so this scanner may be stricter than Prometheus but never more lenient where that
//! would change which namespace a line belongs to.

use memchr::memchr2;

/// Which text format a body is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    /// `text/plain; version=0.0.4`.
    Text,
    /// `application/openmetrics-text` (1.0.0 or 0.0.1).
    OpenMetrics,
}

/// The type a `# TYPE` line declares; it decides which series names belong to the family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MetricType {
    Counter,
    Gauge,
    Histogram,
    GaugeHistogram,
    Summary,
    Info,
    StateSet,
    Untyped,
}

impl MetricType {
    fn parse(token: &[u8], format: Format) -> Option<MetricType> {
        let kind = match token {
            b"counter" => MetricType::Counter,
            b"gauge" => MetricType::Gauge,
            b"histogram" => MetricType::Histogram,
            b"summary" => MetricType::Summary,
            b"untyped" if format == Format::Text => MetricType::Untyped,
            b"unknown" if format == Format::OpenMetrics => MetricType::Untyped,
            b"gaugehistogram" if format == Format::OpenMetrics => MetricType::GaugeHistogram,
            b"info" if format == Format::OpenMetrics => MetricType::Info,
            b"stateset" if format == Format::OpenMetrics => MetricType::StateSet,
            _ => return None,
        };
        Some(kind)
    }

    /// The suffixes a series of a family of this type may add to the family name.
    pub(crate) fn suffixes(self) -> &'static [&'static [u8]] {
        match self {
            MetricType::Counter => &[b"_total", b"_created"],
            MetricType::Histogram => &[b"_bucket", b"_sum", b"_count", b"_created"],
            MetricType::GaugeHistogram => &[b"_bucket", b"_gsum", b"_gcount"],
            MetricType::Summary => &[b"_sum", b"_count", b"_created"],
            MetricType::Info => &[b"_info"],
            MetricType::Gauge | MetricType::StateSet | MetricType::Untyped => &[],
        }
    }
}

/// The kind of a metadata comment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MetaKind {
    Help,
    Type(MetricType),
    Unit,
}

/// What a line is, as far as the filter cares.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Line<'a> {
    /// Empty or only blanks.
    Blank,
    /// A comment that is not metadata: dropped.
    Comment,
    /// `# HELP`, `# TYPE` or (OpenMetrics) `# UNIT` for a family.
    Meta { kind: MetaKind, family: &'a [u8] },
    /// OpenMetrics `# EOF`.
    Eof,
    /// Anything else: a sample line, parsed on demand by [`scan_sample`].
    Sample,
    /// A comment line that looks like metadata but is malformed.
    Invalid,
}

fn is_blank(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn skip_blanks(line: &[u8], mut i: usize) -> usize {
    while i < line.len() && is_blank(line[i]) {
        i += 1;
    }
    i
}

/// Byte classes for names, one table lookup per byte on the hot path.
const LABEL_START: u8 = 1;
const LABEL_CHAR: u8 = 2;
const METRIC_START: u8 = 4;
const METRIC_CHAR: u8 = 8;

const CLASSES: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        let alpha = c.is_ascii_alphabetic() || c == b'_';
        let digit = c.is_ascii_digit();
        if alpha {
            t[b] |= LABEL_START | LABEL_CHAR | METRIC_START | METRIC_CHAR;
        }
        if digit {
            t[b] |= LABEL_CHAR | METRIC_CHAR;
        }
        if c == b':' {
            t[b] |= METRIC_START | METRIC_CHAR;
        }
        b += 1;
    }
    t
};

fn is_metric_start(b: u8) -> bool {
    CLASSES[b as usize] & METRIC_START != 0
}

fn is_metric_char(b: u8) -> bool {
    CLASSES[b as usize] & METRIC_CHAR != 0
}

fn is_label_start(b: u8) -> bool {
    CLASSES[b as usize] & LABEL_START != 0
}

fn is_label_char(b: u8) -> bool {
    CLASSES[b as usize] & LABEL_CHAR != 0
}

/// End of the metric name starting at `i` (== `i` when there is none).
fn metric_name_end(line: &[u8], i: usize) -> usize {
    if i >= line.len() || !is_metric_start(line[i]) {
        return i;
    }
    let mut j = i + 1;
    while j < line.len() && is_metric_char(line[j]) {
        j += 1;
    }
    j
}

fn label_name_end(line: &[u8], i: usize) -> usize {
    if i >= line.len() || !is_label_start(line[i]) {
        return i;
    }
    let mut j = i + 1;
    while j < line.len() && is_label_char(line[j]) {
        j += 1;
    }
    j
}

/// Whether `name` is a valid label name (used to check configured labels).
pub(crate) fn is_label_name(name: &[u8]) -> bool {
    !name.is_empty() && label_name_end(name, 0) == name.len()
}

/// Classifies a line (without its line terminator).
pub(crate) fn classify(line: &[u8], format: Format) -> Line<'_> {
    let start = skip_blanks(line, 0);
    if start == line.len() {
        return Line::Blank;
    }
    if line[start] != b'#' {
        return Line::Sample;
    }
    if format == Format::OpenMetrics && line == b"# EOF" {
        return Line::Eof;
    }
    let kw_start = skip_blanks(line, start + 1);
    let mut kw_end = kw_start;
    while kw_end < line.len() && !is_blank(line[kw_end]) {
        kw_end += 1;
    }
    let keyword = &line[kw_start..kw_end];
    let is_meta = keyword == b"HELP"
        || keyword == b"TYPE"
        || (format == Format::OpenMetrics && keyword == b"UNIT");
    if !is_meta {
        return Line::Comment;
    }
    let name_start = skip_blanks(line, kw_end);
    if name_start == kw_end {
        return Line::Invalid;
    }
    let name_end = metric_name_end(line, name_start);
    if name_end == name_start || (name_end < line.len() && !is_blank(line[name_end])) {
        return Line::Invalid;
    }
    let family = &line[name_start..name_end];
    let rest_start = skip_blanks(line, name_end);
    let rest = &line[rest_start..];
    let kind = match keyword {
        b"HELP" => {
            if !help_text_valid(rest, format) {
                return Line::Invalid;
            }
            MetaKind::Help
        }
        b"TYPE" => {
            let mut end = 0;
            while end < rest.len() && !is_blank(rest[end]) {
                end += 1;
            }
            if skip_blanks(rest, end) != rest.len() {
                return Line::Invalid;
            }
            match MetricType::parse(&rest[..end], format) {
                Some(t) => MetaKind::Type(t),
                None => return Line::Invalid,
            }
        }
        _ => {
            // UNIT: a unit is a metric-name-like token (possibly empty).
            let end = metric_name_end(rest, 0);
            if skip_blanks(rest, end) != rest.len() {
                return Line::Invalid;
            }
            MetaKind::Unit
        }
    };
    Line::Meta { kind, family }
}

/// HELP text: valid UTF-8 with only the escapes the format defines.
fn help_text_valid(text: &[u8], format: Format) -> bool {
    if std::str::from_utf8(text).is_err() {
        return false;
    }
    let mut i = 0;
    while let Some(off) = memchr::memchr(b'\\', &text[i..]) {
        let esc = i + off + 1;
        match text.get(esc) {
            Some(b'\\') | Some(b'n') => {}
            Some(b'"') if format == Format::OpenMetrics => {}
            _ => return false,
        }
        i = esc + 1;
    }
    true
}

/// A label's name and its raw (still escaped) value, as offsets into the line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LabelSpan {
    pub name: (u32, u32),
    pub value: (u32, u32),
    pub escaped: bool,
}

/// The parts of a sample line the filter needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SampleScan {
    /// The metric name's end (the name starts at `name_start`).
    pub name_start: usize,
    pub name_end: usize,
    /// Offsets of `{` and `}` when the line has a label set.
    pub braces: Option<(usize, usize)>,
    /// Index into the label list of the `namespace` label, when present.
    pub namespace: Option<usize>,
    /// Where the value and what follows it begin (right after the name or the `}`).
    pub tail_start: usize,
}

/// Why a line was rejected; only counted, never shown to a caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ScanError {
    Syntax,
    DuplicateNamespace,
}

/// The next `"` or `\\` at or after `from`. Most label values are short: eight bytes at a time
/// with plain integer arithmetic beats setting up a vector search, which takes over for long
/// values.
fn find_quote_or_backslash(line: &[u8], from: usize) -> Option<usize> {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    const QUOTES: u64 = LO * b'"' as u64;
    const BACKSLASHES: u64 = LO * b'\\' as u64;
    let swar_end = line.len().min(from + 32);
    let mut i = from;
    while i + 8 <= swar_end {
        let Ok(bytes) = <[u8; 8]>::try_from(&line[i..i + 8]) else {
            break;
        };
        let word = u64::from_le_bytes(bytes);
        let q = word ^ QUOTES;
        let b = word ^ BACKSLASHES;
        // A zero byte in q or b is a match; the lowest flagged byte is always a true one.
        let found = (q.wrapping_sub(LO) & !q & HI) | (b.wrapping_sub(LO) & !b & HI);
        if found != 0 {
            return Some(i + (found.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    memchr2(b'"', b'\\', &line[i..]).map(|off| i + off)
}

#[cfg(test)]
#[test]
fn finds_quotes_and_backslashes_like_memchr() {
    let line = br#"abcdefgh"ijklmnopqrstuvwxyz0123456789\"ABCDEFGHIJKLMNOPQRSTUVWXYZ"""#;
    for from in 0..line.len() {
        assert_eq!(
            find_quote_or_backslash(line, from),
            memchr2(b'"', b'\\', &line[from..]).map(|o| from + o),
            "{from}"
        );
    }
    assert_eq!(
        find_quote_or_backslash(b"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", 0),
        None
    );
    assert_eq!(find_quote_or_backslash(b"\xfe\xff\x80\x00\"", 0), Some(4));
}

/// Scans a label set whose `{` is at `open`; fills `labels`; returns the index of `}`.
/// A second `namespace` label is an error here already, because it decides scope.
fn scan_labels(
    line: &[u8],
    open: usize,
    labels: &mut Vec<LabelSpan>,
    namespace: &mut Option<usize>,
) -> Result<usize, ScanError> {
    let mut j = open + 1;
    loop {
        j = skip_blanks(line, j);
        match line.get(j) {
            None => return Err(ScanError::Syntax),
            Some(b'}') => return Ok(j),
            Some(_) => {}
        }
        let name_start = j;
        let name_end = label_name_end(line, j);
        if name_end == name_start {
            return Err(ScanError::Syntax);
        }
        j = skip_blanks(line, name_end);
        if line.get(j) != Some(&b'=') {
            return Err(ScanError::Syntax);
        }
        j = skip_blanks(line, j + 1);
        if line.get(j) != Some(&b'"') {
            return Err(ScanError::Syntax);
        }
        let value_start = j + 1;
        let mut k = value_start;
        let mut escaped = false;
        let value_end = loop {
            let Some(at) = find_quote_or_backslash(line, k) else {
                return Err(ScanError::Syntax);
            };
            if line[at] == b'"' {
                break at;
            }
            match line.get(at + 1) {
                Some(b'\\') | Some(b'"') | Some(b'n') => {}
                _ => return Err(ScanError::Syntax),
            }
            escaped = true;
            k = at + 2;
        };
        if &line[name_start..name_end] == b"namespace" {
            if namespace.is_some() {
                return Err(ScanError::DuplicateNamespace);
            }
            *namespace = Some(labels.len());
        }
        labels.push(LabelSpan {
            name: (name_start as u32, name_end as u32),
            value: (value_start as u32, value_end as u32),
            escaped,
        });
        j = skip_blanks(line, value_end + 1);
        match line.get(j) {
            Some(b',') => j += 1,
            Some(b'}') => return Ok(j),
            _ => return Err(ScanError::Syntax),
        }
    }
}

/// Scans a sample line up to the end of its label set. The value, timestamp and exemplar are
/// checked separately by [`check_tail`], only for lines the filter keeps.
#[cfg(test)]
pub(crate) fn scan_sample(
    line: &[u8],
    labels: &mut Vec<LabelSpan>,
) -> Result<SampleScan, ScanError> {
    let (name_start, name_end) = metric_name_span(line);
    scan_sample_after_name(line, name_start, name_end, labels)
}

/// Where a sample line's metric name lies (empty when it does not start with one).
pub(crate) fn metric_name_span(line: &[u8]) -> (usize, usize) {
    let name_start = skip_blanks(line, 0);
    (name_start, metric_name_end(line, name_start))
}

/// [`scan_sample`] for a line whose name [`metric_name_span`] already found.
pub(crate) fn scan_sample_after_name(
    line: &[u8],
    name_start: usize,
    name_end: usize,
    labels: &mut Vec<LabelSpan>,
) -> Result<SampleScan, ScanError> {
    labels.clear();
    if line.len() > u32::MAX as usize {
        return Err(ScanError::Syntax);
    }
    if name_end == name_start {
        return Err(ScanError::Syntax);
    }
    let j = skip_blanks(line, name_end);
    let mut namespace = None;
    if line.get(j) == Some(&b'{') {
        let close = scan_labels(line, j, labels, &mut namespace)?;
        Ok(SampleScan {
            name_start,
            name_end,
            braces: Some((j, close)),
            namespace,
            tail_start: close + 1,
        })
    } else {
        Ok(SampleScan {
            name_start,
            name_end,
            braces: None,
            namespace,
            tail_start: name_end,
        })
    }
}

/// Whether no two labels share a name.
pub(crate) fn labels_unique(line: &[u8], labels: &[LabelSpan]) -> bool {
    // Cheap first pass: names that differ in length or first byte cannot be equal; compare
    // bytes only when two names land on the same bit.
    let mut seen = 0u64;
    let mut collision = false;
    for l in labels {
        let len = (l.name.1 - l.name.0) as u64;
        let first = u64::from(line[l.name.0 as usize]);
        let bit = 1u64 << ((len.wrapping_mul(31).wrapping_add(first)) & 63);
        collision |= seen & bit != 0;
        seen |= bit;
    }
    if !collision {
        return true;
    }
    for (i, a) in labels.iter().enumerate() {
        let an = &line[a.name.0 as usize..a.name.1 as usize];
        for b in &labels[i + 1..] {
            if an == &line[b.name.0 as usize..b.name.1 as usize] {
                return false;
            }
        }
    }
    true
}

/// The blank-delimited token starting at `i`.
fn token(line: &[u8], i: usize) -> (usize, usize) {
    let mut end = i;
    while end < line.len() && !is_blank(line[end]) {
        end += 1;
    }
    (i, end)
}

/// Checks what follows the label set: blanks, a value, optionally a timestamp and (OpenMetrics)
/// an exemplar ` # {labels} value [timestamp]`. `namespace` is the sample's raw namespace value:
/// an exemplar naming a different namespace is refused.
pub(crate) fn check_tail(
    line: &[u8],
    tail_start: usize,
    format: Format,
    namespace: Option<&[u8]>,
    scratch: &mut Vec<LabelSpan>,
) -> bool {
    // Blanks are required before the value, and trailing blanks are an error in Go's parser.
    let i = skip_blanks(line, tail_start);
    if i == tail_start || i == line.len() {
        return false;
    }
    let (_, ve) = token(line, i);
    if !is_float(&line[i..ve]) {
        return false;
    }
    if ve == line.len() {
        return true;
    }
    let mut i = skip_blanks(line, ve);
    if i == line.len() {
        return false;
    }
    if line[i] != b'#' {
        let (ts, te) = token(line, i);
        let ok = match format {
            Format::Text => is_int(&line[ts..te]),
            Format::OpenMetrics => is_float(&line[ts..te]),
        };
        if !ok {
            return false;
        }
        if te == line.len() {
            return true;
        }
        i = skip_blanks(line, te);
        if i == line.len() {
            return false;
        }
    }
    if format != Format::OpenMetrics || line[i] != b'#' {
        return false;
    }
    check_exemplar(line, i + 1, namespace, scratch)
}

fn check_exemplar(
    line: &[u8],
    after_hash: usize,
    namespace: Option<&[u8]>,
    scratch: &mut Vec<LabelSpan>,
) -> bool {
    let open = skip_blanks(line, after_hash);
    if open == after_hash || line.get(open) != Some(&b'{') {
        return false;
    }
    scratch.clear();
    let mut ns = None;
    let Ok(close) = scan_labels(line, open, scratch, &mut ns) else {
        return false;
    };
    if !labels_unique(line, scratch) {
        return false;
    }
    if let Some(idx) = ns {
        let span = scratch[idx].value;
        if namespace != Some(&line[span.0 as usize..span.1 as usize]) {
            return false;
        }
    }
    let i = skip_blanks(line, close + 1);
    if i == close + 1 || i == line.len() {
        return false;
    }
    let (_, ve) = token(line, i);
    if !is_float(&line[i..ve]) {
        return false;
    }
    if ve == line.len() {
        return true;
    }
    let i = skip_blanks(line, ve);
    if i == line.len() {
        return false;
    }
    let (_, te) = token(line, i);
    is_float(&line[i..te]) && te == line.len()
}

/// A float as Go's `strconv.ParseFloat` reads it in decimal: sign, digits, point, exponent,
/// or `Inf`/`Infinity` (signed) and `NaN` (unsigned), case-insensitively.
pub(crate) fn is_float(tok: &[u8]) -> bool {
    let (signed, body) = match tok.first() {
        Some(b'+') | Some(b'-') => (true, &tok[1..]),
        _ => (false, tok),
    };
    if body.eq_ignore_ascii_case(b"inf") || body.eq_ignore_ascii_case(b"infinity") {
        return true;
    }
    if body.eq_ignore_ascii_case(b"nan") {
        return !signed;
    }
    let mut i = 0;
    let mut digits = 0;
    while i < body.len() && body[i].is_ascii_digit() {
        i += 1;
        digits += 1;
    }
    if i < body.len() && body[i] == b'.' {
        i += 1;
        while i < body.len() && body[i].is_ascii_digit() {
            i += 1;
            digits += 1;
        }
    }
    if digits == 0 {
        return false;
    }
    if i < body.len() && (body[i] == b'e' || body[i] == b'E') {
        i += 1;
        if i < body.len() && (body[i] == b'+' || body[i] == b'-') {
            i += 1;
        }
        let exp_start = i;
        while i < body.len() && body[i].is_ascii_digit() {
            i += 1;
        }
        if i == exp_start {
            return false;
        }
    }
    i == body.len()
}

/// A 64-bit signed decimal integer (text format timestamps).
pub(crate) fn is_int(tok: &[u8]) -> bool {
    let (negative, digits) = match tok.first() {
        Some(b'-') => (true, &tok[1..]),
        Some(b'+') => (false, &tok[1..]),
        _ => (false, tok),
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return false;
    }
    // Up to 18 digits always fit in an i64 (millisecond timestamps have 13).
    if digits.len() <= 18 {
        return true;
    }
    // Overflow check without parsing into a string: accumulate the magnitude as i128.
    let mut magnitude: i128 = 0;
    for d in digits {
        magnitude = magnitude * 10 + i128::from(d - b'0');
        if magnitude > i128::from(i64::MAX) + 1 {
            return false;
        }
    }
    negative || magnitude <= i128::from(i64::MAX)
}

/// Whether every byte is ASCII: a branch-free fold over 8-byte words the compiler vectorises
/// (the standard library's check goes byte by byte on short slices).
pub(crate) fn is_ascii(bytes: &[u8]) -> bool {
    let chunks = bytes.chunks_exact(8);
    let tail = chunks.remainder().iter().fold(0u8, |acc, b| acc | b);
    let words = chunks.fold(0u64, |acc, c| {
        acc | <[u8; 8]>::try_from(c).map_or(u64::MAX, u64::from_le_bytes)
    });
    words & 0x8080_8080_8080_8080 == 0 && tail & 0x80 == 0
}

/// Unescapes a label value (`\\`, `\"`, `\n`) into `buf`.
pub(crate) fn unescape_into(raw: &[u8], buf: &mut Vec<u8>) {
    buf.clear();
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'\\' && i + 1 < raw.len() {
            buf.push(match raw[i + 1] {
                b'n' => b'\n',
                other => other,
            });
            i += 2;
        } else {
            buf.push(raw[i]);
            i += 1;
        }
    }
}

/// Escapes a label value for the exposition format.
pub(crate) fn escape_label_value(value: &str, out: &mut Vec<u8>) {
    for &b in value.as_bytes() {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'"' => out.extend_from_slice(b"\\\""),
            b'\n' => out.extend_from_slice(b"\\n"),
            _ => out.push(b),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn scan(line: &str) -> Result<(SampleScan, Vec<LabelSpan>), ScanError> {
        let mut labels = Vec::new();
        scan_sample(line.as_bytes(), &mut labels).map(|s| (s, labels))
    }

    fn ns_of(line: &str) -> Option<String> {
        let (s, labels) = scan(line).unwrap();
        s.namespace.map(|i| {
            let v = labels[i].value;
            line[v.0 as usize..v.1 as usize].to_string()
        })
    }

    #[test]
    fn finds_the_namespace_label_not_look_alikes() {
        assert_eq!(ns_of(r#"m{namespace="a"} 1"#).as_deref(), Some("a"));
        assert_eq!(
            ns_of(r#"m{x="namespace=\"a\"",namespace="b"} 1"#).as_deref(),
            Some("b")
        );
        assert_eq!(ns_of(r#"m{x="namespace=\"a\""} 1"#), None);
        assert_eq!(ns_of(r#"m{x="}, namespace=\"a\"", y="\\"} 1"#), None);
        assert_eq!(ns_of(r#"m{my_namespace="a",namespaces="b"} 1"#), None);
        assert_eq!(ns_of(r#"m { namespace = "a" , } 1"#).as_deref(), Some("a"));
        assert_eq!(ns_of("m 1"), None);
    }

    #[test]
    fn rejects_malformed_label_sets() {
        for bad in [
            r#"m{namespace="a" 1"#,
            r#"m{namespace="a} 1"#,
            r#"m{namespace=a} 1"#,
            r#"m{namespace} 1"#,
            r#"m{="a"} 1"#,
            r#"m{,} 1"#,
            r#"m{a="b"c="d"} 1"#,
            r#"m{a="\x"} 1"#,
            r#"m{a="\"} 1"#,
            r#"m{"quoted.name"} 1"#,
            r#"{namespace="a"} 1"#,
            r#"m{1a="b"} 1"#,
        ] {
            assert_eq!(scan(bad).err(), Some(ScanError::Syntax), "{bad}");
        }
        assert_eq!(
            scan(r#"m{namespace="a",namespace="b"} 1"#).err(),
            Some(ScanError::DuplicateNamespace)
        );
    }

    #[test]
    fn checks_values_timestamps_and_exemplars() {
        let mut s = Vec::new();
        let tail = |line: &str, f: Format, s: &mut Vec<LabelSpan>| {
            let (scan, _) = scan(line).unwrap();
            check_tail(line.as_bytes(), scan.tail_start, f, Some(b"a"), s)
        };
        for ok in ["m 1", "m{} 1.5e3 -12", "m +Inf", "m NaN", "m\t-0.5\t1"] {
            assert!(tail(ok, Format::Text, &mut s), "{ok}");
        }
        for bad in [
            "m",
            "m ",
            "m 1 ",
            "m 1 2 ",
            "m{}1",
            "m 1 2 3",
            "m x",
            "m 1 1.5",
            "m -NaN",
            "m 1e",
            "m .",
            "m 1 # {a=\"b\"} 1",
        ] {
            assert!(!tail(bad, Format::Text, &mut s), "{bad}");
        }
        for ok in [
            "m 1 1.5",
            r#"m_bucket{le="1"} 1 # {trace_id="x"} 0.5"#,
            r#"m_bucket{le="1"} 1 1 # {trace_id="x"} 0.5 1.25"#,
            r#"m{namespace="a"} 1 # {namespace="a"} 0.5"#,
        ] {
            assert!(tail(ok, Format::OpenMetrics, &mut s), "{ok}");
        }
        for bad in [
            r#"m 1 # {trace_id="x"}"#,
            r#"m 1 # trace"#,
            r#"m{namespace="a"} 1 # {namespace="b"} 0.5"#,
            r#"m 1 # {a="x",a="y"} 0.5"#,
        ] {
            assert!(!tail(bad, Format::OpenMetrics, &mut s), "{bad}");
        }
    }

    #[test]
    fn classifies_comments() {
        let t = Format::Text;
        assert_eq!(classify(b"", t), Line::Blank);
        assert_eq!(classify(b" \t", t), Line::Blank);
        assert_eq!(classify(b"# just a comment", t), Line::Comment);
        assert_eq!(classify(b"#", t), Line::Comment);
        assert_eq!(
            classify(b"# HELP foo Some \\\\ help\\n", t),
            Line::Meta {
                kind: MetaKind::Help,
                family: b"foo"
            }
        );
        assert_eq!(
            classify(b"# TYPE foo histogram", t),
            Line::Meta {
                kind: MetaKind::Type(MetricType::Histogram),
                family: b"foo"
            }
        );
        assert_eq!(classify(b"# TYPE foo info", t), Line::Invalid);
        assert_eq!(classify(b"# TYPE foo", t), Line::Invalid);
        assert_eq!(classify(b"# HELP foo bad \\x escape", t), Line::Invalid);
        assert_eq!(classify(b"# HELP", t), Line::Invalid);
        assert_eq!(classify(b"# EOF", t), Line::Comment);
        assert_eq!(classify(b"# UNIT foo seconds", t), Line::Comment);
        let om = Format::OpenMetrics;
        assert_eq!(classify(b"# EOF", om), Line::Eof);
        assert_eq!(
            classify(b"# UNIT foo seconds", om),
            Line::Meta {
                kind: MetaKind::Unit,
                family: b"foo"
            }
        );
        assert_eq!(classify(b"foo 1", t), Line::Sample);
    }

    #[test]
    fn floats_as_go_reads_them() {
        for ok in [
            "1", "-1", "+1.5", ".5", "5.", "1e10", "1E-3", "+Inf", "-inf", "Infinity", "NaN", "nan",
        ] {
            assert!(is_float(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "", "+", ".", "e5", "1e", "1e+", "+NaN", "0x10", "1_000", "1,5", "--1",
        ] {
            assert!(!is_float(bad.as_bytes()), "{bad}");
        }
        assert!(is_int(b"-1633253812125") && is_int(b"+1"));
        assert!(is_int(b"9223372036854775807") && is_int(b"-9223372036854775808"));
        assert!(!is_int(b"9223372036854775808") && !is_int(b"-9223372036854775809"));
        assert!(
            !is_int(b"1.5") && !is_int(b"99999999999999999999") && !is_int(b"-") && !is_int(b"")
        );
    }

    #[test]
    fn name_classes_match_the_format() {
        for b in 0..=255u8 {
            let alpha = b.is_ascii_alphabetic() || b == b'_';
            assert_eq!(is_label_start(b), alpha, "{b}");
            assert_eq!(is_label_char(b), alpha || b.is_ascii_digit(), "{b}");
            assert_eq!(is_metric_start(b), alpha || b == b':', "{b}");
            assert_eq!(
                is_metric_char(b),
                alpha || b == b':' || b.is_ascii_digit(),
                "{b}"
            );
        }
    }

    #[test]
    fn ascii_check() {
        assert!(is_ascii(b"") && is_ascii(b"plain ascii line of some length 123"));
        for n in 0..40 {
            let mut v = vec![b'a'; n + 1];
            v[n] = 0xc3;
            assert!(!is_ascii(&v), "{n}");
        }
    }

    #[test]
    fn escapes_round_trip() {
        let mut out = Vec::new();
        escape_label_value("a\\b\"c\nd", &mut out);
        assert_eq!(out, br#"a\\b\"c\nd"#);
        let mut back = Vec::new();
        unescape_into(&out, &mut back);
        assert_eq!(back, b"a\\b\"c\nd");
    }
}
