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

#[inline(always)]
fn is_blank(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

#[inline(always)]
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

pub(crate) fn is_metric_char(b: u8) -> bool {
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

/// Bit 7 of each byte of the result is set where that byte of `word` is not `[a-zA-Z0-9_]`:
/// eight bytes of a label name are classified with a dozen integer operations instead of a
/// table lookup, a test and a branch per byte.
#[inline(always)]
fn non_label_chars(word: u64) -> u64 {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    // Per 7-bit byte `x`, bit 7 of `x + (0x80 - a)` is `x >= a`; no sum carries into the next
    // byte. Bytes with bit 7 set are no label characters (added back at the end).
    let x = word & !HI;
    let digit = (x + LO * (0x80 - 0x30)) & !(x + LO * (0x80 - 0x3a));
    // Setting bit 5 folds `A`-`Z` onto `a`-`z` and moves nothing else into that range.
    let folded = x | (LO * 0x20);
    let alpha = (folded + LO * (0x80 - 0x61)) & !(folded + LO * (0x80 - 0x7b));
    let diff = x ^ (LO * u64::from(b'_'));
    let underscore = !((diff + LO * 0x7f) | diff);
    (!(digit | alpha | underscore) & HI) | (word & HI)
}

#[inline(always)]
fn label_name_end(line: &[u8], i: usize) -> usize {
    if i >= line.len() || !is_label_start(line[i]) {
        return i;
    }
    let mut j = i + 1;
    while let Some(bytes) = line.get(j..j + 8) {
        let Ok(bytes) = <[u8; 8]>::try_from(bytes) else {
            break;
        };
        let not_name = non_label_chars(u64::from_le_bytes(bytes));
        if not_name != 0 {
            return j + (not_name.trailing_zeros() / 8) as usize;
        }
        j += 8;
    }
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
    if !is_ascii(text) && std::str::from_utf8(text).is_err() {
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
    /// Two label names may be equal: [`labels_unique`] must decide.
    pub maybe_duplicate: bool,
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
#[inline(always)]
fn find_quote_or_backslash(line: &[u8], from: usize) -> Option<usize> {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    const QUOTES: u64 = LO * b'"' as u64;
    const BACKSLASHES: u64 = LO * b'\\' as u64;
    let swar_end = line.len().min(from + 40);
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

/// A bit standing for a label name in a 64-bit set: two names on different bits differ, so a
/// label set whose names all land on different bits has no duplicate and needs no pairwise
/// comparison ([`labels_unique`] does that only on a collision).
#[inline(always)]
fn label_bit(line: &[u8], start: usize, end: usize) -> u64 {
    let key = (end - start) as u64 | u64::from(line[start]) << 8 | u64::from(line[end - 1]) << 16;
    // Fibonacci hashing: the top six bits of the product. Kubelet label sets (`container`,
    // `namespace`, `pod`, `pod_uid`, `id`, `image`, `name`, …) land on distinct bits.
    1u64 << (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58)
}

/// Whether `line[start..end]` is `namespace`, without a call to `memcmp` (this runs for every
/// label of every line).
#[inline(always)]
fn is_namespace(line: &[u8], start: usize, end: usize) -> bool {
    end - start == 9
        && line.get(start..start + 8) == Some(b"namespac".as_slice())
        && line.get(start + 8) == Some(&b'e')
}

/// A scanned label set: where its `}` is, and whether two label names may be equal (only then
/// must [`labels_unique`] compare them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LabelSet {
    pub close: usize,
    pub maybe_duplicate: bool,
}

/// Scans a label set whose `{` is at `open`; fills `labels`.
/// A second `namespace` label is an error here already, because it decides scope.
fn scan_labels(
    line: &[u8],
    open: usize,
    labels: &mut Vec<LabelSpan>,
    namespace: &mut Option<usize>,
) -> Result<LabelSet, ScanError> {
    let start = Resume {
        comma: open as u32,
        seen: 0,
        maybe_duplicate: false,
    };
    scan_labels_from::<false>(line, start, labels, namespace, &mut Vec::new())
}

/// Where [`scan_labels`] stood right after a label's `,`: the scan read no byte past the comma,
/// so a line with the same bytes up to and including it is in the same state there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Resume {
    /// The `,` (or, to start a scan, the `{`): the scan goes on at the next byte.
    comma: u32,
    seen: u64,
    maybe_duplicate: bool,
}

/// [`scan_labels`] from a state it reached before (`labels` and `namespace` hold what it had
/// found by then); with `RECORD`, the state after each label's `,` is appended to `resumes`.
#[inline(always)]
fn scan_labels_from<const RECORD: bool>(
    line: &[u8],
    start: Resume,
    labels: &mut Vec<LabelSpan>,
    namespace: &mut Option<usize>,
    resumes: &mut Vec<Resume>,
) -> Result<LabelSet, ScanError> {
    let mut j = start.comma as usize + 1;
    let mut seen = start.seen;
    let mut maybe_duplicate = start.maybe_duplicate;
    loop {
        let mut b = *line.get(j).ok_or(ScanError::Syntax)?;
        if is_blank(b) {
            j = skip_blanks(line, j);
            b = *line.get(j).ok_or(ScanError::Syntax)?;
        }
        if b == b'}' {
            return Ok(LabelSet {
                close: j,
                maybe_duplicate,
            });
        }
        let name_start = j;
        let name_end = label_name_end(line, j);
        if name_end == name_start {
            return Err(ScanError::Syntax);
        }
        // Exporters write `name="`; blanks around `=` are allowed but rare.
        if line.get(name_end..name_end + 2) == Some(b"=\"".as_slice()) {
            j = name_end + 2;
        } else {
            j = skip_blanks(line, name_end);
            if line.get(j) != Some(&b'=') {
                return Err(ScanError::Syntax);
            }
            j = skip_blanks(line, j + 1);
            if line.get(j) != Some(&b'"') {
                return Err(ScanError::Syntax);
            }
            j += 1;
        }
        let value_start = j;
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
        if is_namespace(line, name_start, name_end) {
            if namespace.is_some() {
                return Err(ScanError::DuplicateNamespace);
            }
            *namespace = Some(labels.len());
        }
        let bit = label_bit(line, name_start, name_end);
        maybe_duplicate |= seen & bit != 0;
        seen |= bit;
        labels.push(LabelSpan {
            name: (name_start as u32, name_end as u32),
            value: (value_start as u32, value_end as u32),
            escaped,
        });
        j = value_end + 1;
        let mut b = *line.get(j).ok_or(ScanError::Syntax)?;
        if is_blank(b) {
            j = skip_blanks(line, j);
            b = *line.get(j).ok_or(ScanError::Syntax)?;
        }
        match b {
            b',' => {
                if RECORD {
                    resumes.push(Resume {
                        comma: j as u32,
                        seen,
                        maybe_duplicate,
                    });
                }
                j += 1;
            }
            b'}' => {
                return Ok(LabelSet {
                    close: j,
                    maybe_duplicate,
                });
            }
            _ => return Err(ScanError::Syntax),
        }
    }
}

/// The length of the common prefix of `a` and `b`, eight bytes at a time.
fn common_prefix_len(a: &[u8], b: &[u8]) -> usize {
    let n = a.len().min(b.len());
    let mut i = 0;
    while i + 8 <= n {
        let (Ok(x), Ok(y)) = (
            <[u8; 8]>::try_from(&a[i..i + 8]),
            <[u8; 8]>::try_from(&b[i..i + 8]),
        ) else {
            break;
        };
        let diff = u64::from_le_bytes(x) ^ u64::from_le_bytes(y);
        if diff != 0 {
            return i + (diff.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while i < n && a[i] == b[i] {
        i += 1;
    }
    i
}

/// Scans the sample lines of one body, remembering the label scan of the last one.
///
/// Consecutive samples mostly belong to one series family and repeat their leading labels byte
/// for byte (`container`, `namespace`, `pod`, `pod_uid` of one container's probes or cAdvisor
/// series): the scan is a left-to-right state machine, so where a line repeats the last one's
/// bytes up to a label's `,`, it resumes after that label with the labels found so far instead
/// of reading names and values again. The result is [`scan_sample_after_name`]'s, exactly.
#[derive(Debug, Default)]
pub(crate) struct LabelScanner {
    labels: Vec<LabelSpan>,
    /// The last scanned line up to and including its last label `,` in `resumes`.
    prev: Vec<u8>,
    /// Where the last scanned line's `{` was.
    open: usize,
    /// The state after each `,` of the last scanned line, in order.
    resumes: Vec<Resume>,
    /// The `namespace` label the last scan had found (an index into `labels`).
    namespace: Option<usize>,
}

impl LabelScanner {
    /// The labels of the last scanned line (as far as the scan got).
    pub(crate) fn labels(&self) -> &[LabelSpan] {
        &self.labels
    }

    /// [`scan_sample_after_name`], resuming after the labels `line` shares with the last line.
    pub(crate) fn scan(
        &mut self,
        line: &[u8],
        name_start: usize,
        name_end: usize,
    ) -> Result<SampleScan, ScanError> {
        if line.len() > u32::MAX as usize || name_end == name_start {
            self.forget();
            return Err(ScanError::Syntax);
        }
        let open = skip_blanks(line, name_end);
        if line.get(open) != Some(&b'{') {
            self.forget();
            return Ok(SampleScan {
                name_start,
                name_end,
                braces: None,
                namespace: None,
                maybe_duplicate: false,
                tail_start: name_end,
            });
        }
        let mut common = 0;
        let mut reused = 0;
        if open == self.open && !self.resumes.is_empty() {
            common = common_prefix_len(line, &self.prev);
            while self
                .resumes
                .get(reused)
                .is_some_and(|r| (r.comma as usize) < common)
            {
                reused += 1;
            }
        }
        let start = match reused.checked_sub(1) {
            None => Resume {
                comma: open as u32,
                seen: 0,
                maybe_duplicate: false,
            },
            Some(last) => self.resumes[last],
        };
        self.labels.truncate(reused);
        self.resumes.truncate(reused);
        let mut namespace = self.namespace.filter(|i| *i < reused);
        let set = scan_labels_from::<true>(
            line,
            start,
            &mut self.labels,
            &mut namespace,
            &mut self.resumes,
        );
        self.namespace = namespace;
        self.open = open;
        // `prev` already holds the common bytes: copy only the rest up to the last comma.
        let need = self.resumes.last().map_or(0, |r| r.comma as usize + 1);
        let keep = common.min(need);
        self.prev.truncate(keep);
        self.prev.extend_from_slice(&line[keep..need]);
        let set = set?;
        Ok(SampleScan {
            name_start,
            name_end,
            braces: Some((open, set.close)),
            namespace,
            maybe_duplicate: set.maybe_duplicate,
            tail_start: set.close + 1,
        })
    }

    fn forget(&mut self) {
        self.labels.clear();
        self.resumes.clear();
        self.prev.clear();
        self.namespace = None;
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

/// [`scan_sample`] for a line whose name [`metric_name_span`] already found (the reference
/// [`LabelScanner::scan`] is tested against).
#[cfg(test)]
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
        let set = scan_labels(line, j, labels, &mut namespace)?;
        Ok(SampleScan {
            name_start,
            name_end,
            braces: Some((j, set.close)),
            namespace,
            maybe_duplicate: set.maybe_duplicate,
            tail_start: set.close + 1,
        })
    } else {
        Ok(SampleScan {
            name_start,
            name_end,
            braces: None,
            namespace,
            maybe_duplicate: false,
            tail_start: name_end,
        })
    }
}

/// Whether no two labels share a name (pairwise: called only when [`scan_labels`] saw two
/// names on the same bit).
pub(crate) fn labels_unique(line: &[u8], labels: &[LabelSpan]) -> bool {
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

/// The end of the float token starting at `i` (the next blank or the line's end), or `None` when
/// the token is not a float. Decimal numbers are read in the same pass that finds the token's
/// end; anything else (`Inf`, `NaN`, or not a number) goes to [`is_float`] on the whole token.
fn float_token_end(line: &[u8], i: usize) -> Option<usize> {
    if let Some(end) = decimal_end(line, i) {
        return Some(end);
    }
    let (_, end) = token(line, i);
    is_float(&line[i..end]).then_some(end)
}

/// The end of the run of ASCII digits starting at `i`. Values and timestamps are runs of 6 to 13
/// digits: eight bytes are classified at once (exactly: a byte is flagged unless it is `0`–`9`).
fn digits_end(line: &[u8], mut i: usize) -> usize {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    while let Some(bytes) = line.get(i..i + 8) {
        let Ok(bytes) = <[u8; 8]>::try_from(bytes) else {
            break;
        };
        let t = u64::from_le_bytes(bytes) ^ (LO * u64::from(b'0'));
        // Per byte, no carry between bytes: `t & 0x7f` plus 0x76 sets the high bit iff it is
        // 10 or more; a byte whose `t` has the high bit set is no digit either.
        let not_digit = (((t & !HI) + LO * 0x76) | t) & HI;
        if not_digit != 0 {
            return i + (not_digit.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while line.get(i).is_some_and(u8::is_ascii_digit) {
        i += 1;
    }
    i
}

/// Where the decimal number at `i` ends, when it is followed by a blank or the line's end; the
/// grammar is [`is_float`]'s without the `Inf`/`NaN` spellings, so a `Some` here is a token
/// `is_float` accepts.
fn decimal_end(line: &[u8], mut i: usize) -> Option<usize> {
    if let Some(b'+' | b'-') = line.get(i) {
        i += 1;
    }
    let int_end = digits_end(line, i);
    let mut digits = int_end - i;
    i = int_end;
    if line.get(i) == Some(&b'.') {
        let frac_end = digits_end(line, i + 1);
        digits += frac_end - (i + 1);
        i = frac_end;
    }
    if digits == 0 {
        return None;
    }
    if let Some(b'e' | b'E') = line.get(i) {
        i += 1;
        if let Some(b'+' | b'-') = line.get(i) {
            i += 1;
        }
        let exp_end = digits_end(line, i);
        if exp_end == i {
            return None;
        }
        i = exp_end;
    }
    match line.get(i) {
        None | Some(b' ' | b'\t') => Some(i),
        _ => None,
    }
}

/// The end of the text-format timestamp (an `i64`) starting at `i`, or `None` when it is not one.
/// Up to 18 digits always fit; longer ones go to [`is_int`].
fn int_token_end(line: &[u8], i: usize) -> Option<usize> {
    let mut j = i;
    if let Some(b'+' | b'-') = line.get(j) {
        j += 1;
    }
    let digits_start = j;
    j = digits_end(line, j);
    if (1..=18).contains(&(j - digits_start)) && matches!(line.get(j), None | Some(b' ' | b'\t')) {
        return Some(j);
    }
    let (_, end) = token(line, i);
    is_int(&line[i..end]).then_some(end)
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
    let Some(ve) = float_token_end(line, i) else {
        return false;
    };
    if ve == line.len() {
        return true;
    }
    let mut i = skip_blanks(line, ve);
    if i == line.len() {
        return false;
    }
    if line[i] != b'#' {
        let te = match format {
            Format::Text => int_token_end(line, i),
            Format::OpenMetrics => float_token_end(line, i),
        };
        let Some(te) = te else {
            return false;
        };
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
    let Ok(LabelSet {
        close,
        maybe_duplicate,
    }) = scan_labels(line, open, scratch, &mut ns)
    else {
        return false;
    };
    if maybe_duplicate && !labels_unique(line, scratch) {
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
    fn swar_label_classes_match_the_table() {
        for b in 0..=255u8 {
            for at in 0..8 {
                let mut word = [b'a'; 8];
                word[at] = b;
                let flagged = non_label_chars(u64::from_le_bytes(word));
                let want = if is_label_char(b) {
                    0
                } else {
                    0x80u64 << (8 * at)
                };
                assert_eq!(flagged, want, "{b} at {at}");
            }
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

    /// The value/timestamp check as it was before the one-pass readers: find the token, then
    /// judge it.
    fn check_tail_reference(line: &[u8], tail_start: usize, format: Format) -> bool {
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
        let i = skip_blanks(line, ve);
        if i == line.len() || line[i] == b'#' {
            return false;
        }
        let (ts, te) = token(line, i);
        let ok = match format {
            Format::Text => is_int(&line[ts..te]),
            Format::OpenMetrics => is_float(&line[ts..te]),
        };
        ok && te == line.len()
    }

    /// Pieces of label sets: whole labels with their comma, and the bytes that break them.
    fn label_piece() -> impl proptest::strategy::Strategy<Value = &'static str> {
        proptest::sample::select(vec![
            "a=\"x\",",
            "namespace=\"a\",",
            "namespace=\"b\",",
            "pod=\"p\\\"q\",",
            "le=\"1\"",
            "a=\"xy\",",
            "b = \"x\" ,",
            "c=\"\\\\\",",
            "pod_uid=\"0123456789abcdef0123456789abcdef0123\",",
            "x",
            "=",
            "\"",
            ",",
            " ",
            "\t",
            "}",
            "é",
        ])
    }

    /// Tails made of the bytes that matter to numbers and tokens.
    fn tail_strategy() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        let piece = prop_oneof![
            Just(b" ".to_vec()),
            Just(b"\t".to_vec()),
            Just(b"Inf".to_vec()),
            Just(b"NaN".to_vec()),
            Just(b"infinity".to_vec()),
            Just(b"1633253812125".to_vec()),
            Just(b"9223372036854775807".to_vec()),
            Just(b"-9223372036854775809".to_vec()),
            Just(b"1.686306e+06".to_vec()),
            prop::collection::vec(
                prop::sample::select(b"0123456789.eE+-xI#/:\x80 ".to_vec()),
                1..12
            ),
        ];
        prop::collection::vec(piece, 0..6).prop_map(|v| v.concat())
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(3000))]

        #[test]
        fn one_pass_tail_matches_the_token_reference(tail in tail_strategy(), om in proptest::bool::ANY) {
            let format = if om { Format::OpenMetrics } else { Format::Text };
            let mut line = b"m".to_vec();
            line.extend_from_slice(&tail);
            let mut scratch = Vec::new();
            let exemplar = line[1..].contains(&b'#');
            // Exemplars are not part of the reference; lines with `#` are only checked for the
            // text format, where they are always refused.
            if !exemplar || format == Format::Text {
                proptest::prop_assert_eq!(
                    check_tail(&line, 1, format, None, &mut scratch),
                    check_tail_reference(&line, 1, format),
                    "{:?}", String::from_utf8_lossy(&line)
                );
            }
        }

        /// The scanner that resumes after the labels a line shares with the last one finds what
        /// a fresh scan finds, on runs of lines that share prefixes of every length (cut inside
        /// names, values, escapes and blanks, and lines that fail to scan).
        #[test]
        fn resumed_scan_matches_a_fresh_scan(
            base in proptest::collection::vec(label_piece(), 0..8),
            lines in proptest::collection::vec(
                (0usize..9, proptest::collection::vec(label_piece(), 0..4), 0usize..4),
                1..12,
            ),
        ) {
            let mut scanner = LabelScanner::default();
            let mut fresh = Vec::new();
            for (keep, extra, name) in &lines {
                // Most lines repeat a prefix of `base`: the scanner has states to resume from.
                let mut line = [&b"m"[..], b"m_total", b" m", b"m"][*name].to_vec();
                line.push(b'{');
                for p in base.iter().take(*keep).chain(extra) {
                    line.extend_from_slice(p.as_bytes());
                }
                line.extend_from_slice(b"} 1");
                let (start, end) = metric_name_span(&line);
                let want = scan_sample_after_name(&line, start, end, &mut fresh);
                let got = scanner.scan(&line, start, end);
                proptest::prop_assert_eq!(got, want, "{:?}", String::from_utf8_lossy(&line));
                if want.is_ok() {
                    proptest::prop_assert_eq!(scanner.labels(), fresh.as_slice());
                }
                // A shorter line right after: the last one's states must not be trusted past it.
                let cut = &line[..line.len() / 2];
                let (start, end) = metric_name_span(cut);
                let want = scan_sample_after_name(cut, start, end, &mut fresh);
                proptest::prop_assert_eq!(scanner.scan(cut, start, end), want);
                if want.is_ok() {
                    proptest::prop_assert_eq!(scanner.labels(), fresh.as_slice());
                }
            }
        }

        #[test]
        fn label_name_ends_match_a_byte_loop(bytes in proptest::collection::vec(
            proptest::sample::select(b"azAZ09_:/@[`{\x7f\x80\xdf= \"".to_vec()), 0..30), from in 0usize..30) {
            let from = from.min(bytes.len());
            let naive = if bytes.get(from).is_some_and(|b| is_label_start(*b)) {
                from + 1 + bytes[from + 1..].iter().take_while(|b| is_label_char(**b)).count()
            } else {
                from
            };
            proptest::prop_assert_eq!(label_name_end(&bytes, from), naive);
        }

        #[test]
        fn digit_runs_match_a_byte_loop(bytes in proptest::collection::vec(
            proptest::sample::select(b"0123456789/:\x00\xb0\xb5 a".to_vec()), 0..40), from in 0usize..40) {
            let from = from.min(bytes.len());
            let naive = from + bytes[from..].iter().take_while(|b| b.is_ascii_digit()).count();
            proptest::prop_assert_eq!(digits_end(&bytes, from), naive);
        }

        #[test]
        fn no_duplicate_flag_means_distinct_names(names in proptest::collection::vec(
            proptest::sample::select(vec!["a", "b", "ab", "ba", "le", "id", "pod", "pod_uid",
                "container", "namespace", "namespacf", "name", "image", "cpu", "_", "A9"]), 0..8)) {
            let mut line = b"m{".to_vec();
            for (i, n) in names.iter().enumerate() {
                if i > 0 {
                    line.push(b',');
                }
                line.extend_from_slice(n.as_bytes());
                line.extend_from_slice(b"=\"v\"");
            }
            line.extend_from_slice(b"} 1");
            let mut labels = Vec::new();
            let distinct = {
                let mut sorted = names.clone();
                sorted.sort();
                sorted.dedup();
                sorted.len() == names.len()
            };
            match scan_sample(&line, &mut labels) {
                Ok(scan) => {
                    proptest::prop_assert_eq!(
                        !scan.maybe_duplicate || labels_unique(&line, &labels),
                        distinct
                    );
                }
                Err(e) => {
                    proptest::prop_assert_eq!(e, ScanError::DuplicateNamespace);
                    proptest::prop_assert!(!distinct);
                }
            }
        }
    }
}
