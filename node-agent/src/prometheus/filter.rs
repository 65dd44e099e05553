//! The push-based line filter: bytes in, the caller's share of the exposition out.

use super::scan::{self, Format, Line, MetaKind, MetricType};
use memchr::memmem;
use nodegate_crds::ResolvedNamespaces;
use nodegate_crds::policy::MetricsTransform;
use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

/// Lines longer than this are dropped: a kubelet line is a few hundred bytes, and the carry-over
/// buffer between chunks must stay bounded whatever upstream sends.
pub const DEFAULT_MAX_LINE: usize = 1 << 20;

/// What one matching policy rule lets the caller see.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Grant {
    /// Whose samples; node-level samples (no or empty `namespace` label) need `all`.
    pub namespaces: ResolvedNamespaces,
    /// Optional keep/drop by metric name and labels to add.
    pub metrics: Option<MetricsTransform>,
}

/// Every grant a caller holds for the request: a sample is kept when one of them admits it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FilterConfig {
    pub grants: Vec<Grant>,
}

/// A configuration the filter cannot apply without emitting invalid exposition or widening scope.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FilterConfigError {
    #[error(
        "metrics.addLabels key {0:?} is not a label name a policy may add (must match [a-zA-Z_][a-zA-Z0-9_]*, not start with __, not be namespace)"
    )]
    InvalidAddedLabel(String),
}

#[derive(Debug)]
pub(super) struct CompiledGrant {
    pub(super) namespaces: ResolvedNamespaces,
    pub(super) keep: HashSet<Vec<u8>>,
    pub(super) drop: HashSet<Vec<u8>>,
    /// Added labels: the name, and `name="escaped value"` ready to write.
    add: Vec<(Vec<u8>, Vec<u8>)>,
    /// Added labels for the protobuf filter: the name, and the `Metric.label` field (tag,
    /// length and `LabelPair`) ready to append to a metric.
    pub(super) proto_add: Vec<(Vec<u8>, Vec<u8>)>,
}

/// A [`FilterConfig`] checked and prepared once, shared by the filters of many responses.
#[derive(Debug)]
pub struct FilterRules {
    pub(super) grants: Vec<CompiledGrant>,
    pub(super) any_all: bool,
    namespace_finder: memmem::Finder<'static>,
    /// Without `all`, and with few namespaces: each namespace as it must appear quoted in a line
    /// that has it as a label value (escaping is unique, so this is exact as a precondition).
    value_finders: Option<Vec<memmem::Finder<'static>>>,
    /// Tests: search for `namespace` before scanning, as the filter did before it left that to
    /// lines that fail to scan (the reference the shortcut is tested against).
    #[cfg(test)]
    namespace_first: bool,
}

/// Up to this many namespaces, a line is first searched for their quoted values.
const MAX_VALUE_FINDERS: usize = 4;

impl FilterRules {
    /// Checks added label names (the CRD's CEL rules check them too; the filter must not rely
    /// on that to stay valid and in scope) and prepares lookups.
    pub fn new(config: &FilterConfig) -> Result<FilterRules, FilterConfigError> {
        let mut grants = Vec::with_capacity(config.grants.len());
        for grant in &config.grants {
            let mut namespaces = grant.namespaces.clone();
            // `allows` binary-searches: keep it exact even if a config arrives unsorted.
            namespaces.names.sort();
            namespaces.names.dedup();
            let (keep, drop, add, proto_add) = match &grant.metrics {
                None => (HashSet::new(), HashSet::new(), Vec::new(), Vec::new()),
                Some(m) => {
                    let names = |v: &Vec<String>| v.iter().map(|n| n.as_bytes().to_vec()).collect();
                    let mut add = Vec::with_capacity(m.add_labels.len());
                    let mut proto_add = Vec::with_capacity(m.add_labels.len());
                    for (name, value) in &m.add_labels {
                        if !scan::is_label_name(name.as_bytes())
                            || name.starts_with("__")
                            || name == "namespace"
                        {
                            return Err(FilterConfigError::InvalidAddedLabel(name.clone()));
                        }
                        let mut encoded = Vec::with_capacity(name.len() + value.len() + 3);
                        encoded.extend_from_slice(name.as_bytes());
                        encoded.extend_from_slice(b"=\"");
                        scan::escape_label_value(value, &mut encoded);
                        encoded.push(b'"');
                        add.push((name.as_bytes().to_vec(), encoded));
                        proto_add.push((
                            name.as_bytes().to_vec(),
                            super::proto::label_field(name.as_bytes(), value.as_bytes()),
                        ));
                    }
                    (names(&m.keep), names(&m.drop), add, proto_add)
                }
            };
            grants.push(CompiledGrant {
                namespaces,
                keep,
                drop,
                add,
                proto_add,
            });
        }
        let any_all = grants.iter().any(|g| g.namespaces.all);
        let mut names: Vec<&String> = grants
            .iter()
            .flat_map(|g| g.namespaces.names.iter())
            .filter(|n| !n.is_empty())
            .collect();
        names.sort();
        names.dedup();
        let value_finders = (!any_all && names.len() <= MAX_VALUE_FINDERS).then(|| {
            names
                .iter()
                .map(|n| {
                    let mut quoted = vec![b'"'];
                    scan::escape_label_value(n, &mut quoted);
                    quoted.push(b'"');
                    memmem::Finder::new(&quoted).into_owned()
                })
                .collect()
        });
        Ok(FilterRules {
            grants,
            any_all,
            namespace_finder: memmem::Finder::new(b"namespace").into_owned(),
            value_finders,
            #[cfg(test)]
            namespace_first: false,
        })
    }
}

/// Counters of what the filter did with a body, for logs and the agent's metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FilterStats {
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Lines seen, dropped ones included.
    pub lines: u64,
    pub samples_kept: u64,
    /// Samples outside every grant (namespace, keep or drop).
    pub samples_dropped: u64,
    /// Lines that could not be parsed or named a label twice, and HELP/TYPE/UNIT lines that
    /// repeat a family's metadata or come after its samples.
    pub invalid_lines: u64,
    /// Lines longer than the filter's maximum.
    pub oversized_lines: u64,
    /// OpenMetrics lines after `# EOF`.
    pub lines_after_eof: u64,
}

const HELP_BIT: u8 = 1;
const TYPE_BIT: u8 = 2;
const UNIT_BIT: u8 = 4;

/// Bound on the names of families whose metadata was emitted (kept to emit a family's HELP/TYPE
/// at most once per body, as the Prometheus parser demands).
const MAX_EMITTED_FAMILY_BYTES: usize = 1 << 20;

/// The metric family the last HELP/TYPE/UNIT lines named, with those lines held until a sample
/// of the family is kept.
#[derive(Debug, Default)]
struct Family {
    active: bool,
    name: Vec<u8>,
    kind: Option<MetricType>,
    seen: u8,
    held: Vec<u8>,
    /// A sample of the family was kept: its metadata is out, later metadata is dropped.
    sampled: bool,
    /// The family's metadata was already emitted earlier in the body: drop it this time.
    suppressed: bool,
}

impl Family {
    fn start(&mut self, name: &[u8]) {
        self.active = true;
        self.name.clear();
        self.name.extend_from_slice(name);
        self.kind = None;
        self.seen = 0;
        self.held.clear();
        self.sampled = false;
        self.suppressed = false;
    }

    fn close(&mut self) {
        self.active = false;
        self.held.clear();
    }

    fn contains(&self, metric: &[u8]) -> bool {
        if !self.active {
            return false;
        }
        if metric == self.name.as_slice() {
            return true;
        }
        match (self.kind, metric.strip_prefix(self.name.as_slice())) {
            (Some(kind), Some(suffix)) => kind.suffixes().contains(&suffix),
            _ => false,
        }
    }
}

/// Filters one response body. Pure: no I/O, and the output is the same however the input is
/// split into chunks.
#[derive(Debug)]
pub struct Filter {
    rules: Arc<FilterRules>,
    format: Format,
    max_line: usize,
    /// The start of a line whose end has not arrived yet (at most `max_line` bytes).
    carry: Vec<u8>,
    /// Inside a line longer than `max_line`: discard up to the next newline.
    skipping: bool,
    after_eof: bool,
    family: Family,
    /// Ordered, not hashed: a lookup is a few byte comparisons (no SipHash of the name on every
    /// new family), and its worst case does not depend on what names upstream sends.
    emitted_families: BTreeSet<Vec<u8>>,
    emitted_family_bytes: usize,
    /// The metric name of the last sample line that started with one: the samples of a series
    /// are consecutive, so the next line's name is most often the same bytes.
    last_name: Vec<u8>,
    scanner: scan::LabelScanner,
    exemplar_labels: Vec<scan::LabelSpan>,
    unescaped: Vec<u8>,
    stats: FilterStats,
}

impl Filter {
    pub fn new(rules: Arc<FilterRules>, format: Format) -> Filter {
        Filter {
            rules,
            format,
            max_line: DEFAULT_MAX_LINE,
            carry: Vec::new(),
            skipping: false,
            after_eof: false,
            family: Family::default(),
            emitted_families: BTreeSet::new(),
            emitted_family_bytes: 0,
            last_name: Vec::new(),
            scanner: scan::LabelScanner::default(),
            exemplar_labels: Vec::new(),
            unescaped: Vec::new(),
            stats: FilterStats::default(),
        }
    }

    /// Sets the longest line (without its newline) the filter accepts.
    pub fn with_max_line(mut self, max_line: usize) -> Filter {
        self.max_line = max_line;
        self
    }

    pub fn stats(&self) -> FilterStats {
        self.stats
    }

    /// Feeds the next chunk of the body; appends the kept output to `out`.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        let out_start = out.len();
        self.stats.bytes_in += chunk.len() as u64;
        let mut rest = chunk;
        if self.skipping {
            match memchr::memchr(b'\n', rest) {
                None => return,
                Some(i) => {
                    self.skipping = false;
                    rest = &rest[i + 1..];
                }
            }
        }
        if !self.carry.is_empty() {
            match memchr::memchr(b'\n', rest) {
                None => {
                    if self.carry.len() + rest.len() > self.max_line {
                        self.start_skipping();
                    } else {
                        self.carry.extend_from_slice(rest);
                    }
                    self.stats.bytes_out += (out.len() - out_start) as u64;
                    return;
                }
                Some(i) => {
                    let mut line = std::mem::take(&mut self.carry);
                    if line.len() + i > self.max_line {
                        self.stats.lines += 1;
                        self.stats.oversized_lines += 1;
                    } else {
                        line.extend_from_slice(&rest[..i]);
                        self.line(&line, out);
                    }
                    line.clear();
                    self.carry = line;
                    rest = &rest[i + 1..];
                }
            }
        }
        let mut start = 0;
        for end in memchr::memchr_iter(b'\n', rest) {
            let line = &rest[start..end];
            if line.len() > self.max_line {
                self.stats.lines += 1;
                self.stats.oversized_lines += 1;
            } else {
                self.line(line, out);
            }
            start = end + 1;
        }
        let tail = &rest[start..];
        if tail.len() > self.max_line {
            self.start_skipping();
        } else {
            self.carry.extend_from_slice(tail);
        }
        self.stats.bytes_out += (out.len() - out_start) as u64;
    }

    /// Ends the body: a last line without a newline is filtered like any other (and gets one).
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        let out_start = out.len();
        if !self.carry.is_empty() {
            let line = std::mem::take(&mut self.carry);
            self.line(&line, out);
        }
        self.skipping = false;
        self.family.close();
        self.stats.bytes_out += (out.len() - out_start) as u64;
    }

    fn start_skipping(&mut self) {
        self.carry.clear();
        self.skipping = true;
        self.stats.lines += 1;
        self.stats.oversized_lines += 1;
    }

    /// One line, without its `\n`.
    fn line(&mut self, line: &[u8], out: &mut Vec<u8>) {
        self.stats.lines += 1;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if self.after_eof {
            self.stats.lines_after_eof += 1;
            return;
        }
        match scan::classify(line, self.format) {
            Line::Blank | Line::Comment => {}
            Line::Invalid => self.stats.invalid_lines += 1,
            Line::Eof => {
                self.family.close();
                self.after_eof = true;
                out.extend_from_slice(b"# EOF\n");
            }
            Line::Meta { kind, family } => {
                if !self.family.active || self.family.name != family {
                    self.family.start(family);
                    self.family.suppressed = self.emitted_families.contains(family);
                }
                let bit = match kind {
                    MetaKind::Help => HELP_BIT,
                    MetaKind::Type(_) => TYPE_BIT,
                    MetaKind::Unit => UNIT_BIT,
                };
                // Repeated metadata, or metadata after samples, is invalid exposition: drop it,
                // so the output stays parseable and filtering it again changes nothing.
                if self.family.seen & bit != 0 || self.family.sampled || self.family.suppressed {
                    self.stats.invalid_lines += 1;
                    return;
                }
                self.family.seen |= bit;
                if let MetaKind::Type(t) = kind {
                    self.family.kind = Some(t);
                }
                self.family.held.extend_from_slice(line);
                self.family.held.push(b'\n');
            }
            Line::Sample => self.sample(line, out),
        }
    }

    /// [`scan::metric_name_span`], but a line that starts with the last name followed by a byte
    /// that cannot continue a name has that name (a name is never blank, so the name starts at
    /// 0): one comparison instead of a class lookup per byte.
    fn metric_name_span(&mut self, line: &[u8]) -> (usize, usize) {
        let n = self.last_name.len();
        if n > 0
            && line.starts_with(&self.last_name)
            && line.get(n).is_none_or(|b| !scan::is_metric_char(*b))
        {
            return (0, n);
        }
        let (start, end) = scan::metric_name_span(line);
        if start == 0 && end > 0 {
            self.last_name.clear();
            self.last_name.extend_from_slice(&line[..end]);
        }
        (start, end)
    }

    fn sample(&mut self, line: &[u8], out: &mut Vec<u8>) {
        // The metric name first: it decides whether the held family goes on.
        let (name_start, name_end) = self.metric_name_span(line);
        let rules = &*self.rules;
        let name = &line[name_start..name_end];
        let in_family = self.family.contains(name);
        if !in_family && self.family.active {
            self.family.close();
        }
        // Fast path: without a grant for node-level data, a line in which no granted namespace
        // appears as a quoted value is out of scope. Likewise, when there are too many names to
        // search for, a line that does not even contain `namespace` (no namespace label).
        // With value finders, the `namespace` search is left to lines that fail to scan: a line
        // that scans and lacks it has no namespace label and is dropped below all the same, so
        // only the count of a line both unparseable and without `namespace` depends on it.
        #[cfg(test)]
        let namespace_first = rules.namespace_first;
        #[cfg(not(test))]
        let namespace_first = false;
        if !rules.any_all
            && match &rules.value_finders {
                Some(fs) => {
                    (namespace_first && rules.namespace_finder.find(line).is_none())
                        || fs.iter().all(|f| f.find(line).is_none())
                }
                None => rules.namespace_finder.find(line).is_none(),
            }
        {
            self.stats.samples_dropped += 1;
            return;
        }
        let scanned = match self.scanner.scan(line, name_start, name_end) {
            Ok(s) => s,
            Err(_) => {
                if !rules.any_all
                    && rules.value_finders.is_some()
                    && rules.namespace_finder.find(line).is_none()
                {
                    self.stats.samples_dropped += 1;
                } else {
                    self.stats.invalid_lines += 1;
                }
                return;
            }
        };
        let labels = self.scanner.labels();
        let raw_ns: Option<&[u8]> = scanned.namespace.map(|i| {
            let v = labels[i].value;
            &line[v.0 as usize..v.1 as usize]
        });
        // The namespace as bytes, unescaped. Compared with the granted names byte for byte,
        // which is `ResolvedNamespaces::allows` without first proving the value is UTF-8 (a
        // kept line is checked for UTF-8 below; a name is a String, so bytes that are not UTF-8
        // match none).
        let namespace: Option<&[u8]> = match raw_ns {
            None | Some(b"") => None,
            Some(raw) => {
                if scanned.namespace.is_some_and(|i| labels[i].escaped) {
                    scan::unescape_into(raw, &mut self.unescaped);
                    Some(self.unescaped.as_slice())
                } else {
                    Some(raw)
                }
            }
        };
        let family_name: Option<&[u8]> = in_family.then_some(self.family.name.as_slice());
        let named = |set: &HashSet<Vec<u8>>| {
            !set.is_empty() && (set.contains(name) || family_name.is_some_and(|f| set.contains(f)))
        };
        let admitted = rules.grants.iter().find(|g| {
            let in_scope = match namespace {
                None => g.namespaces.all,
                Some(ns) => {
                    g.namespaces.all
                        || g.namespaces
                            .names
                            .binary_search_by(|n| n.as_bytes().cmp(ns))
                            .is_ok()
                }
            };
            in_scope && (g.keep.is_empty() || named(&g.keep)) && !named(&g.drop)
        });
        let Some(grant) = admitted else {
            self.stats.samples_dropped += 1;
            return;
        };
        // Only kept lines are checked in full: they must stay valid exposition.
        if (scanned.maybe_duplicate && !scan::labels_unique(line, labels))
            || !scan::check_tail(
                line,
                scanned.tail_start,
                self.format,
                raw_ns,
                &mut self.exemplar_labels,
            )
            || (!scan::is_ascii(line) && std::str::from_utf8(line).is_err())
        {
            self.stats.invalid_lines += 1;
            return;
        }
        self.stats.samples_kept += 1;
        if in_family && !self.family.sampled {
            self.family.sampled = true;
            if !self.family.held.is_empty() {
                let name_len = self.family.name.len();
                if self.emitted_family_bytes + name_len <= MAX_EMITTED_FAMILY_BYTES {
                    self.emitted_family_bytes += name_len;
                    self.emitted_families.insert(self.family.name.clone());
                    out.extend_from_slice(&self.family.held);
                } else {
                    // Cannot remember it, so cannot promise it is not repeated: leave it out.
                    self.stats.invalid_lines += 1;
                }
            }
        }
        let labels = self.scanner.labels();
        let has_label = |n: &[u8]| {
            labels
                .iter()
                .any(|l| &line[l.name.0 as usize..l.name.1 as usize] == n)
        };
        let mut adds = grant.add.iter().filter(|(n, _)| !has_label(n)).peekable();
        if adds.peek().is_none() {
            out.extend_from_slice(line);
        } else {
            // Insert the labels at the end of the set; existing bytes are copied untouched.
            let insert_at = match scanned.braces {
                Some((_, close)) => close,
                None => scanned.name_end,
            };
            out.extend_from_slice(&line[..insert_at]);
            let mut need_comma = match scanned.braces {
                None => {
                    out.push(b'{');
                    false
                }
                Some((open, close)) => line[open + 1..close]
                    .iter()
                    .rev()
                    .find(|b| **b != b' ' && **b != b'\t')
                    .is_some_and(|b| *b != b','),
            };
            for (_, encoded) in adds {
                if need_comma {
                    out.push(b',');
                }
                out.extend_from_slice(encoded);
                need_comma = true;
            }
            if scanned.braces.is_none() {
                out.push(b'}');
            }
            out.extend_from_slice(&line[insert_at..]);
        }
        out.push(b'\n');
    }
}

/// Filters a whole body held in memory (tests, benchmarks, small bodies).
pub fn filter_bytes(
    rules: Arc<FilterRules>,
    format: Format,
    input: &[u8],
) -> (Vec<u8>, FilterStats) {
    let mut filter = Filter::new(rules, format);
    let mut out = Vec::with_capacity(input.len() / 4);
    filter.push(input, &mut out);
    filter.finish(&mut out);
    (out, filter.stats())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Searching for `namespace` only when a line fails to scan gives the output and the
        /// counts of searching for it first, whatever the lines (valid or not, with or without
        /// `namespace`, the granted value or another).
        #[test]
        fn namespace_search_on_failure_matches_searching_first(lines in prop::collection::vec(
            prop::collection::vec(prop::sample::select(vec![
                "m", "{", "}", "namespace", "=", "\"a\"", "\"b\"", "a", ",", " ", "1", "\"",
                "x=\"a\"", "namespace=\"a\"", "namespace=\"b\"", "# TYPE m counter", "\\",
            ]), 0..8).prop_map(|v| v.concat()),
            0..16,
        ), names in prop::sample::select(vec![vec!["a"], vec!["a", "b"], vec!["b", "c", "d"]])) {
            let config = FilterConfig {
                grants: vec![Grant {
                    namespaces: ResolvedNamespaces {
                        all: false,
                        names: names.iter().map(|n| n.to_string()).collect(),
                    },
                    metrics: None,
                }],
            };
            let body = lines.join("\n");
            let rules = FilterRules::new(&config).unwrap();
            let mut reference = FilterRules::new(&config).unwrap();
            reference.namespace_first = true;
            prop_assert_eq!(
                filter_bytes(Arc::new(rules), Format::Text, body.as_bytes()),
                filter_bytes(Arc::new(reference), Format::Text, body.as_bytes()),
                "{:?}", body
            );
        }

        /// The remembered name never changes where a line's name ends: lines share prefixes,
        /// extend the last name, stop one byte short of it, or start with blanks.
        #[test]
        fn remembered_name_gives_the_scanned_span(lines in prop::collection::vec(
            prop::collection::vec(prop::sample::select(vec![
                "m", "m_total", "m_", ":", "a1", " ", "\t", "{", "}", "1", "=", "\"", "é", "",
            ]), 0..5).prop_map(|v| v.concat()),
            0..20,
        )) {
            let rules = Arc::new(FilterRules::new(&FilterConfig::default()).unwrap());
            let mut filter = Filter::new(rules, Format::Text);
            for line in &lines {
                prop_assert_eq!(
                    filter.metric_name_span(line.as_bytes()),
                    scan::metric_name_span(line.as_bytes()),
                    "{:?}", line
                );
            }
        }
    }
}
