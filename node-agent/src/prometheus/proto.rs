//! Namespace scoping of the Prometheus protobuf exposition
//! (`application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily;
//! encoding=delimited`), on the stream: a body is a sequence of `MetricFamily` messages, each
//! preceded by its length as a varint.
//!
//! Walked by hand over the wire format rather than decoded into prost messages, because the
//! filter needs only a few fields (a family's name and type, each metric's labels, the
//! exemplars' labels) and passes a kept metric on as the bytes it arrived in: decoding would
//! allocate a `String` per label and a message per bucket of every metric, dropped or kept,
//! and encode the kept ones again, for nothing the filter looks at. Here a family is read once
//! for its fields' tags and lengths, each metric once for its labels; values, histograms and
//! timestamps are copied, not decoded.
//!
//! Memory is bounded like the text filter's: one family at a time, held only when it spans
//! chunks, and at most [`DEFAULT_MAX_FAMILY`] bytes of it (the kubelet's largest cAdvisor family
//! is a few hundred bytes per container). Fail closed: a truncated varint, a length past its
//! message, a wire type `metrics.proto` does not give the field, an unknown field where labels
//! live (`MetricFamily`, `Metric`, `LabelPair`), a repeated scalar that decides scope, a family
//! over the cap or a body that ends inside a family are errors, and the caller's answer ends
//! with that error: no byte the filter did not understand leaves it. Inside a kept metric's
//! value messages (`Counter`, `Histogram`, …) only exemplars carry labels; they are read when
//! the word `namespace` appears in those bytes, and a metric whose exemplar names another
//! namespace than its own is dropped, as the text filter drops such a line.

use super::filter::{FilterRules, FilterStats};
use super::scan::MetricType;
use std::sync::Arc;

/// The largest `MetricFamily` the filter holds. The kubelet's cAdvisor families are a few
/// hundred bytes per container (tens of KiB on a full node); the cap bounds what one scrape may
/// hold, as the text filter's line cap does.
pub const DEFAULT_MAX_FAMILY: usize = 8 << 20;

/// Why a protobuf body could not be filtered; the answer ends with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("protobuf metrics body cannot be filtered (family at byte {offset}): {reason}")]
pub struct ProtoError {
    /// Where the length prefix of the family that failed starts, in the decoded body.
    pub offset: u64,
    pub reason: &'static str,
}

const VARINT: u8 = 0;
const I64: u8 = 1;
const LEN: u8 = 2;
const I32: u8 = 5;

/// A varint at `pos`: its value and the position after it; `None` when it is truncated or
/// longer than ten bytes / 64 bits.
#[inline(always)]
fn varint(buf: &[u8], pos: usize) -> Option<(u64, usize)> {
    let first = *buf.get(pos)?;
    if first < 0x80 {
        return Some((u64::from(first), pos + 1));
    }
    let mut value = u64::from(first & 0x7f);
    let mut shift = 7;
    let mut i = pos + 1;
    loop {
        let b = *buf.get(i)?;
        i += 1;
        if shift == 63 && b > 1 {
            return None;
        }
        value |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Some((value, i));
        }
        shift += 7;
        if shift > 63 {
            return None;
        }
    }
}

fn put_varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// One field of a message: its number and wire type, where its payload lies (a `LEN` field's
/// bytes; a varint's bytes), its value when it is a varint, and where the next field starts.
#[derive(Clone, Copy, Debug)]
struct Field {
    number: u64,
    wire: u8,
    body: (usize, usize),
    value: u64,
    end: usize,
}

/// The field starting at `pos` of the message `buf[..limit]`.
#[inline(always)]
fn field(buf: &[u8], pos: usize, limit: usize) -> Result<Field, &'static str> {
    let buf = &buf[..limit];
    let (tag, p) = varint(buf, pos).ok_or("truncated or overlong tag")?;
    let number = tag >> 3;
    let wire = (tag & 7) as u8;
    if number == 0 || number > (1 << 29) - 1 {
        return Err("field number out of range");
    }
    let (body, value, end) = match wire {
        VARINT => {
            let (v, e) = varint(buf, p).ok_or("truncated or overlong varint")?;
            ((p, e), v, e)
        }
        I64 => {
            let e = p
                .checked_add(8)
                .filter(|e| *e <= limit)
                .ok_or("truncated")?;
            ((p, e), 0, e)
        }
        LEN => {
            let (len, q) = varint(buf, p).ok_or("truncated or overlong length")?;
            let e = usize::try_from(len)
                .ok()
                .and_then(|l| q.checked_add(l))
                .filter(|e| *e <= limit)
                .ok_or("length past the end of its message")?;
            ((q, e), len, e)
        }
        I32 => {
            let e = p
                .checked_add(4)
                .filter(|e| *e <= limit)
                .ok_or("truncated")?;
            ((p, e), 0, e)
        }
        _ => return Err("group or unknown wire type"),
    };
    Ok(Field {
        number,
        wire,
        body,
        value,
        end,
    })
}

/// A `LabelPair` (`name` = 1, `value` = 2): the two byte ranges (empty when absent).
///
/// Every label a kubelet writes is a name then a value, each shorter than 128 bytes: that shape
/// is read from four bytes without the general field walk (a third of a scan's time when every
/// label went through it). Anything else takes the general walk, which gives the same ranges.
#[inline(always)]
fn label_pair(buf: &[u8], (start, end): (usize, usize)) -> Result<LabelRanges, &'static str> {
    if end >= start + 4 && buf[start] == 0x0a && buf[start + 1] < 0x80 {
        let value_tag = start + 2 + usize::from(buf[start + 1]);
        if value_tag + 2 <= end
            && buf[value_tag] == 0x12
            && buf[value_tag + 1] < 0x80
            && value_tag + 2 + usize::from(buf[value_tag + 1]) == end
        {
            return Ok(LabelRanges {
                name: (start + 2, value_tag),
                value: (value_tag + 2, end),
            });
        }
    }
    label_pair_fields(buf, (start, end))
}

/// [`label_pair`] by the general field walk.
fn label_pair_fields(
    buf: &[u8],
    (start, end): (usize, usize),
) -> Result<LabelRanges, &'static str> {
    let mut name = None;
    let mut value = None;
    let mut pos = start;
    while pos < end {
        let f = field(buf, pos, end)?;
        let slot = match (f.number, f.wire) {
            (1, LEN) => &mut name,
            (2, LEN) => &mut value,
            _ => return Err("unexpected field in LabelPair"),
        };
        if slot.replace(f.body).is_some() {
            return Err("repeated field in LabelPair");
        }
        pos = f.end;
    }
    Ok(LabelRanges {
        name: name.unwrap_or((start, start)),
        value: value.unwrap_or((start, start)),
    })
}

#[derive(Clone, Copy, Debug)]
struct LabelRanges {
    name: (usize, usize),
    value: (usize, usize),
}

/// The `Metric.label` field for an added label: tag, length and the `LabelPair`.
pub(super) fn label_field(name: &[u8], value: &[u8]) -> Vec<u8> {
    let mut pair = Vec::with_capacity(name.len() + value.len() + 6);
    pair.push(0x0a);
    put_varint(name.len() as u64, &mut pair);
    pair.extend_from_slice(name);
    pair.push(0x12);
    put_varint(value.len() as u64, &mut pair);
    pair.extend_from_slice(value);
    let mut out = Vec::with_capacity(pair.len() + 3);
    out.push(0x0a);
    put_varint(pair.len() as u64, &mut out);
    out.extend_from_slice(&pair);
    out
}

/// What a metric's walk found.
struct MetricScan {
    /// The `namespace` label's value, when present.
    namespace: Option<(usize, usize)>,
    /// The bytes from the first label field to the end of the last, when no other field lies
    /// between them: one ASCII check of it stands for the UTF-8 check of every label string.
    label_span: Option<(usize, usize)>,
    labels_split: bool,
    /// `namespace` named twice: the metric is dropped (which one would a reader take?).
    duplicate_namespace: bool,
    /// `Counter` and `Histogram` fields, which may carry exemplars.
    exemplar_carriers: [Option<(u64, (usize, usize))>; 2],
    more_carriers: bool,
}

/// `MetricFamily.type` to the text filter's type (for the series names `drop` may list).
fn metric_type(value: u64) -> Option<MetricType> {
    Some(match value {
        0 => MetricType::Counter,
        1 => MetricType::Gauge,
        2 => MetricType::Summary,
        3 => MetricType::Untyped,
        4 => MetricType::Histogram,
        5 => MetricType::GaugeHistogram,
        _ => return None,
    })
}

/// Filters one protobuf body. Pure: no I/O, and the output (and whether and where it fails) is
/// the same however the input is split into chunks.
#[derive(Debug)]
pub struct ProtoFilter {
    rules: Arc<FilterRules>,
    max_family: usize,
    /// Bytes of a length prefix split by a chunk boundary (at most ten).
    prefix: Vec<u8>,
    /// The family being gathered: the length its prefix announced.
    family_len: Option<usize>,
    buf: Vec<u8>,
    /// Bytes of the body consumed so far, and where the current family's prefix started.
    offset: u64,
    record_start: u64,
    failed: Option<ProtoError>,
    stats: FilterStats,
    // Scratch, reused across families.
    family_ok: Vec<bool>,
    headers: Vec<(usize, usize)>,
    metrics: Vec<(usize, (usize, usize))>,
    /// The current metric's labels and value fields (number, bytes), from its one walk.
    labels: Vec<LabelRanges>,
    values: Vec<(u64, (usize, usize))>,
    out_family: Vec<u8>,
}

impl ProtoFilter {
    pub fn new(rules: Arc<FilterRules>) -> ProtoFilter {
        ProtoFilter {
            rules,
            max_family: DEFAULT_MAX_FAMILY,
            prefix: Vec::new(),
            family_len: None,
            buf: Vec::new(),
            offset: 0,
            record_start: 0,
            failed: None,
            stats: FilterStats::default(),
            family_ok: Vec::new(),
            headers: Vec::new(),
            metrics: Vec::new(),
            labels: Vec::new(),
            values: Vec::new(),
            out_family: Vec::new(),
        }
    }

    /// Sets the largest family (its message, without the length prefix) the filter accepts.
    pub fn with_max_family(mut self, max_family: usize) -> ProtoFilter {
        self.max_family = max_family;
        self
    }

    /// Counters: `lines` counts families, `samples_*` metrics (`invalid_lines`: metrics
    /// dropped for a second `namespace` or an exemplar of another namespace), `oversized_lines`
    /// families over the cap.
    pub fn stats(&self) -> FilterStats {
        self.stats
    }

    /// Feeds the next chunk of the body; appends the kept families to `out`. After an error
    /// every call returns it again and appends nothing.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> Result<(), ProtoError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let out_start = out.len();
        self.stats.bytes_in += chunk.len() as u64;
        let result = self.push_inner(chunk, out);
        self.stats.bytes_out += (out.len() - out_start) as u64;
        if let Err(e) = &result {
            self.failed = Some(e.clone());
        }
        result
    }

    /// Ends the body: an error when it ends inside a family or its length prefix.
    pub fn finish(&mut self) -> Result<(), ProtoError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.family_len.is_some() || !self.prefix.is_empty() {
            let e = self.error("body ends inside a metric family");
            self.failed = Some(e.clone());
            return Err(e);
        }
        Ok(())
    }

    fn error(&self, reason: &'static str) -> ProtoError {
        ProtoError {
            offset: self.record_start,
            reason,
        }
    }

    fn check_len(&mut self, len: u64) -> Result<usize, ProtoError> {
        match usize::try_from(len) {
            Ok(l) if l <= self.max_family => Ok(l),
            _ => {
                self.stats.lines += 1;
                self.stats.oversized_lines += 1;
                Err(self.error("metric family over the size cap"))
            }
        }
    }

    fn push_inner(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> Result<(), ProtoError> {
        let mut rest = chunk;
        loop {
            if let Some(len) = self.family_len {
                let take = (len - self.buf.len()).min(rest.len());
                self.buf.extend_from_slice(&rest[..take]);
                rest = &rest[take..];
                self.offset += take as u64;
                if self.buf.len() < len {
                    return Ok(());
                }
                let buf = std::mem::take(&mut self.buf);
                let result = self.family(&buf, out);
                self.buf = buf;
                self.buf.clear();
                self.family_len = None;
                result?;
                continue;
            }
            if rest.is_empty() {
                return Ok(());
            }
            if self.prefix.is_empty() {
                self.record_start = self.offset;
                if let Some((len, n)) = varint(rest, 0) {
                    let len = self.check_len(len)?;
                    if rest.len() - n >= len {
                        // The whole family is in this chunk: filter it in place.
                        self.family(&rest[n..n + len], out)?;
                        rest = &rest[n + len..];
                        self.offset += (n + len) as u64;
                    } else {
                        rest = &rest[n..];
                        self.offset += n as u64;
                        self.family_len = Some(len);
                    }
                    continue;
                }
                if rest.len() >= 10 {
                    return Err(self.error("overlong length prefix"));
                }
            }
            // A prefix split across chunks: one byte at a time.
            let b = rest[0];
            rest = &rest[1..];
            self.offset += 1;
            self.prefix.push(b);
            if b < 0x80 {
                let decoded = varint(&self.prefix, 0);
                self.prefix.clear();
                let Some((len, _)) = decoded else {
                    return Err(self.error("overlong length prefix"));
                };
                let len = self.check_len(len)?;
                self.family_len = Some(len);
            } else if self.prefix.len() >= 10 {
                return Err(self.error("overlong length prefix"));
            }
        }
    }

    /// One `MetricFamily` (`name` 1, `help` 2, `type` 3, `metric` 4, `unit` 5): its kept
    /// metrics, with its other fields, as one length-delimited message; nothing when none is
    /// kept.
    fn family(&mut self, fam: &[u8], out: &mut Vec<u8>) -> Result<(), ProtoError> {
        self.stats.lines += 1;
        self.headers.clear();
        self.metrics.clear();
        let mut name: Option<(usize, usize)> = None;
        let mut kind: Option<u64> = None;
        let mut pos = 0;
        while pos < fam.len() {
            let f = field(fam, pos, fam.len()).map_err(|r| self.error(r))?;
            if matches!((f.number, f.wire), (1 | 2 | 5, LEN))
                && std::str::from_utf8(&fam[f.body.0..f.body.1]).is_err()
            {
                return Err(self.error("MetricFamily string is not UTF-8"));
            }
            match (f.number, f.wire) {
                (4, LEN) => self.metrics.push((pos, f.body)),
                (1, LEN) => {
                    if name.replace(f.body).is_some() {
                        return Err(self.error("repeated MetricFamily.name"));
                    }
                    self.headers.push((pos, f.end));
                }
                (3, VARINT) => {
                    if kind.replace(f.value).is_some() {
                        return Err(self.error("repeated MetricFamily.type"));
                    }
                    self.headers.push((pos, f.end));
                }
                (2 | 5, LEN) => self.headers.push((pos, f.end)),
                _ => return Err(self.error("unexpected field in MetricFamily")),
            }
            pos = f.end;
        }
        let name = name.map_or(&fam[0..0], |(s, e)| &fam[s..e]);
        let suffixes = kind.and_then(metric_type).map_or(&[][..], |t| t.suffixes());
        // Which grants admit the family by name: `keep` names the family, `drop` the family or
        // any series name the text format would give it (so it is never wider than the text
        // filter, which keeps or drops those series one by one).
        let rules = Arc::clone(&self.rules);
        self.family_ok.clear();
        for g in &rules.grants {
            let kept = g.keep.is_empty() || g.keep.contains(name);
            let dropped = !g.drop.is_empty()
                && (g.drop.contains(name)
                    || suffixes.iter().any(|s| {
                        let mut series = name.to_vec();
                        series.extend_from_slice(s);
                        g.drop.contains(&series)
                    }));
            self.family_ok.push(kept && !dropped);
        }
        if !self.family_ok.iter().any(|ok| *ok) {
            self.stats.samples_dropped += self.metrics.len() as u64;
            return Ok(());
        }
        let mut body = std::mem::take(&mut self.out_family);
        body.clear();
        for &(s, e) in &self.headers {
            body.extend_from_slice(&fam[s..e]);
        }

        let header_len = body.len();
        let metrics = std::mem::take(&mut self.metrics);
        let result = self.metrics_of(fam, &rules, &metrics, &mut body);
        self.metrics = metrics;
        if let Err(reason) = result {
            self.out_family = body;
            return Err(self.error(reason));
        }
        if body.len() > header_len {
            put_varint(body.len() as u64, out);
            out.extend_from_slice(&body);
        }
        self.out_family = body;
        Ok(())
    }

    fn metrics_of(
        &mut self,
        fam: &[u8],
        rules: &FilterRules,
        metrics: &[(usize, (usize, usize))],
        body: &mut Vec<u8>,
    ) -> Result<(), &'static str> {
        for &(field_start, (start, end)) in metrics {
            let scan = self.metric(fam, start, end)?;
            if scan.duplicate_namespace {
                self.stats.invalid_lines += 1;
                continue;
            }
            let namespace: Option<&[u8]> = match scan.namespace {
                Some((s, e)) if e > s => Some(&fam[s..e]),
                _ => None,
            };
            let admitted = rules
                .grants
                .iter()
                .zip(&self.family_ok)
                .position(|(g, ok)| {
                    *ok && match namespace {
                        None => g.namespaces.all,
                        Some(ns) => {
                            g.namespaces.all
                                || g.namespaces
                                    .names
                                    .binary_search_by(|n| n.as_bytes().cmp(ns))
                                    .is_ok()
                        }
                    }
                });
            let Some(grant) = admitted else {
                self.stats.samples_dropped += 1;
                continue;
            };
            self.check_kept(fam, &scan)?;
            if !exemplars_in_scope(fam, &scan, namespace)? {
                self.stats.invalid_lines += 1;
                continue;
            }
            self.stats.samples_kept += 1;
            let adds = &rules.grants[grant].proto_add;
            let has = |n: &[u8]| self.labels.iter().any(|l| &fam[l.name.0..l.name.1] == n);
            if adds.iter().all(|(n, _)| has(n)) {
                body.extend_from_slice(&fam[field_start..end]);
                continue;
            }
            let added: usize = adds
                .iter()
                .filter(|(n, _)| !has(n))
                .map(|(_, f)| f.len())
                .sum();
            body.push(0x22);
            put_varint((end - start + added) as u64, body);
            body.extend_from_slice(&fam[start..end]);
            for (n, f) in adds {
                if !has(n) {
                    body.extend_from_slice(f);
                }
            }
        }
        Ok(())
    }

    /// A `Metric`: `label` 1, `gauge` 2, `counter` 3, `summary` 4, `untyped` 5,
    /// `timestamp_ms` 6, `histogram` 7. Fills `labels` and `values`; checks the wire type of
    /// every field and the shape of every label, not yet what a kept metric must also be
    /// ([`ProtoFilter::check_kept`]).
    fn metric(&mut self, fam: &[u8], start: usize, end: usize) -> Result<MetricScan, &'static str> {
        self.labels.clear();
        self.values.clear();
        let mut scan = MetricScan {
            namespace: None,
            label_span: None,
            labels_split: false,
            duplicate_namespace: false,
            exemplar_carriers: [None, None],
            more_carriers: false,
        };
        let mut carriers = 0;
        let mut pos = start;
        while pos < end {
            let f = field(fam, pos, end)?;
            match (f.number, f.wire) {
                (1, LEN) => {
                    let pair = label_pair(fam, f.body)?;
                    let (ns, ne) = pair.name;
                    if &fam[ns..ne] == b"namespace" && scan.namespace.replace(pair.value).is_some()
                    {
                        scan.duplicate_namespace = true;
                    }
                    self.labels.push(pair);
                    match &mut scan.label_span {
                        Some((_, span_end)) if *span_end == pos => *span_end = f.end,
                        Some(_) => scan.labels_split = true,
                        None => scan.label_span = Some((pos, f.end)),
                    }
                }
                (3 | 7, LEN) => {
                    if carriers < 2 {
                        scan.exemplar_carriers[carriers] = Some((f.number, f.body));
                        carriers += 1;
                    } else {
                        scan.more_carriers = true;
                    }
                    self.values.push((f.number, f.body));
                }
                (2 | 4 | 5, LEN) => self.values.push((f.number, f.body)),
                (6, VARINT) => {}
                _ => return Err("unexpected field in Metric"),
            }
            pos = f.end;
        }
        Ok(scan)
    }

    /// What a metric passed on must be beyond what [`ProtoFilter::metric`] checked: its label
    /// strings UTF-8 and its value messages whole against `metrics.proto`. Together the two are
    /// exactly `check_message` against `Metric` (a test holds them to it), without reading the
    /// labels a second time.
    fn check_kept(&self, fam: &[u8], scan: &MetricScan) -> Result<(), &'static str> {
        let ascii = match scan.label_span {
            Some((s, e)) => !scan.labels_split && fam[s..e].is_ascii(),
            None => true,
        };
        if !ascii {
            for l in &self.labels {
                if std::str::from_utf8(&fam[l.name.0..l.name.1]).is_err()
                    || std::str::from_utf8(&fam[l.value.0..l.value.1]).is_err()
                {
                    return Err("string is not UTF-8");
                }
            }
        }
        for &(number, body) in &self.values {
            let schema = match number {
                2 | 5 => VALUE,
                3 => COUNTER,
                4 => SUMMARY,
                _ => HISTOGRAM,
            };
            check_message(fam, body, schema)?;
        }
        Ok(())
    }
}

/// Whether every exemplar label `namespace` of the metric's counter and histogram equals the
/// metric's own namespace (an exemplar of another namespace must not ride along). Read only
/// when the bytes contain `namespace`; a metric with more than two such value fields (a
/// malformed one) is refused.
fn exemplars_in_scope(
    fam: &[u8],
    scan: &MetricScan,
    namespace: Option<&[u8]>,
) -> Result<bool, &'static str> {
    if scan.more_carriers {
        return Ok(false);
    }
    for (number, (start, end)) in scan.exemplar_carriers.iter().flatten().copied() {
        if memchr::memmem::find(&fam[start..end], b"namespace").is_none() {
            continue;
        }
        let mut pos = start;
        while pos < end {
            let f = field(fam, pos, end)?;
            match (number, f.number, f.wire) {
                // Counter.exemplar, Histogram.exemplars
                (3, 2, LEN) | (7, 16, LEN) if !exemplar_in_scope(fam, f.body, namespace)? => {
                    return Ok(false);
                }
                // Histogram.bucket: its exemplar is field 3.
                (7, 3, LEN) => {
                    let mut p = f.body.0;
                    while p < f.body.1 {
                        let b = field(fam, p, f.body.1)?;
                        if b.number == 3
                            && b.wire == LEN
                            && !exemplar_in_scope(fam, b.body, namespace)?
                        {
                            return Ok(false);
                        }
                        p = b.end;
                    }
                }
                _ => {}
            }
            pos = f.end;
        }
    }
    Ok(true)
}

/// An `Exemplar` (`label` 1): false when a `namespace` label differs from `namespace`.
fn exemplar_in_scope(
    fam: &[u8],
    (start, end): (usize, usize),
    namespace: Option<&[u8]>,
) -> Result<bool, &'static str> {
    let mut pos = start;
    while pos < end {
        let f = field(fam, pos, end)?;
        if f.number == 1 && f.wire == LEN {
            let pair = label_pair(fam, f.body)?;
            if &fam[pair.name.0..pair.name.1] == b"namespace" {
                let value = &fam[pair.value.0..pair.value.1];
                if namespace != Some(value) {
                    return Ok(false);
                }
            }
        }
        pos = f.end;
    }
    Ok(true)
}

/// The wire shape of a field `metrics.proto` defines, for checking a kept metric whole.
#[derive(Clone, Copy, Debug)]
enum Shape {
    Varint,
    Fixed64,
    /// A UTF-8 string.
    Str,
    Msg(Schema),
    /// A repeated varint or double, packed or not.
    RepeatedVarint,
    RepeatedFixed64,
}

/// A message's fields by number (index 0 and numbers it does not define: `None`), so a field's
/// shape is one index away, not a search.
type Schema = &'static [Option<Shape>];

const TIMESTAMP: Schema = &[None, Some(Shape::Varint), Some(Shape::Varint)];
const LABEL_PAIR: Schema = &[None, Some(Shape::Str), Some(Shape::Str)];
const EXEMPLAR: Schema = &[
    None,
    Some(Shape::Msg(LABEL_PAIR)),
    Some(Shape::Fixed64),
    Some(Shape::Msg(TIMESTAMP)),
];
const VALUE: Schema = &[None, Some(Shape::Fixed64)];
const COUNTER: Schema = &[
    None,
    Some(Shape::Fixed64),
    Some(Shape::Msg(EXEMPLAR)),
    Some(Shape::Msg(TIMESTAMP)),
];
const QUANTILE: Schema = &[None, Some(Shape::Fixed64), Some(Shape::Fixed64)];
const SUMMARY: Schema = &[
    None,
    Some(Shape::Varint),
    Some(Shape::Fixed64),
    Some(Shape::Msg(QUANTILE)),
    Some(Shape::Msg(TIMESTAMP)),
];
const BUCKET: Schema = &[
    None,
    Some(Shape::Varint),
    Some(Shape::Fixed64),
    Some(Shape::Msg(EXEMPLAR)),
    Some(Shape::Fixed64),
];
const SPAN: Schema = &[None, Some(Shape::Varint), Some(Shape::Varint)];
const HISTOGRAM: Schema = &[
    None,
    Some(Shape::Varint),
    Some(Shape::Fixed64),
    Some(Shape::Msg(BUCKET)),
    Some(Shape::Fixed64),
    Some(Shape::Varint),
    Some(Shape::Fixed64),
    Some(Shape::Varint),
    Some(Shape::Fixed64),
    Some(Shape::Msg(SPAN)),
    Some(Shape::RepeatedVarint),
    Some(Shape::RepeatedFixed64),
    Some(Shape::Msg(SPAN)),
    Some(Shape::RepeatedVarint),
    Some(Shape::RepeatedFixed64),
    Some(Shape::Msg(TIMESTAMP)),
    Some(Shape::Msg(EXEMPLAR)),
];
/// `Metric` whole: what [`ProtoFilter::check_kept`] and [`ProtoFilter::metric`] check together.
#[cfg(test)]
const METRIC: Schema = &[
    None,
    Some(Shape::Msg(LABEL_PAIR)),
    Some(Shape::Msg(VALUE)),
    Some(Shape::Msg(COUNTER)),
    Some(Shape::Msg(SUMMARY)),
    Some(Shape::Msg(VALUE)),
    Some(Shape::Varint),
    Some(Shape::Msg(HISTOGRAM)),
];

/// Checks `buf[start..end]` as a message of `schema`, all the way down: every field known with
/// its wire type, strings UTF-8, packed values whole. A kept metric passes only when it is, so
/// the caller gets nothing the filter did not read (and prost or Go decode what it does get).
fn check_message(
    buf: &[u8],
    (start, end): (usize, usize),
    schema: Schema,
) -> Result<(), &'static str> {
    let mut pos = start;
    while pos < end {
        let f = field(buf, pos, end)?;
        let Some(shape) = usize::try_from(f.number)
            .ok()
            .and_then(|n| schema.get(n).copied().flatten())
        else {
            return Err("unknown field in a metric");
        };
        match (shape, f.wire) {
            (Shape::Varint | Shape::RepeatedVarint, VARINT)
            | (Shape::Fixed64 | Shape::RepeatedFixed64, I64) => {}
            (Shape::Str, LEN) => {
                if std::str::from_utf8(&buf[f.body.0..f.body.1]).is_err() {
                    return Err("string is not UTF-8");
                }
            }
            (Shape::Msg(inner), LEN) => check_message(buf, f.body, inner)?,
            (Shape::RepeatedVarint, LEN) => {
                let mut p = f.body.0;
                while p < f.body.1 {
                    p = varint(&buf[..f.body.1], p).ok_or("bad packed varint")?.1;
                }
            }
            (Shape::RepeatedFixed64, LEN) => {
                if (f.body.1 - f.body.0) % 8 != 0 {
                    return Err("bad packed double");
                }
            }
            _ => return Err("wrong wire type in a metric"),
        }
        pos = f.end;
    }
    Ok(())
}

/// Filters a whole body held in memory (tests, benchmarks).
pub fn filter_proto_bytes(
    rules: Arc<FilterRules>,
    input: &[u8],
) -> (Vec<u8>, Result<(), ProtoError>, FilterStats) {
    let mut filter = ProtoFilter::new(rules);
    let mut out = Vec::with_capacity(input.len() / 4);
    let result = filter.push(input, &mut out).and_then(|()| filter.finish());
    (out, result, filter.stats())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn len_field(number: u8, body: &[u8], out: &mut Vec<u8>) {
        out.push((number << 3) | LEN);
        put_varint(body.len() as u64, out);
        out.extend_from_slice(body);
    }

    /// A `Metric` from `choices`: labels (short, long, non-UTF-8, with a field missing or
    /// repeated), value messages of each kind with a field of each shape, a timestamp; values
    /// and labels interleaved at times.
    fn metric_bytes(choices: &[u8]) -> Vec<u8> {
        let strings: [&[u8]; 6] = [
            b"namespace",
            b"a",
            b"",
            &[0xff, 0x61],
            "\u{e9}t\u{e9}".as_bytes(),
            &[b'x'; 200],
        ];
        let mut out = Vec::new();
        let mut it = choices.chunks(3);
        while let Some(&[kind, a, b]) = it.next() {
            let mut inner = Vec::new();
            match kind % 9 {
                0..=3 => {
                    if kind & 0x10 == 0 || kind % 9 == 3 {
                        len_field(1, strings[a as usize % 6], &mut inner);
                    }
                    if kind & 0x20 == 0 {
                        len_field(2, strings[b as usize % 6], &mut inner);
                    }
                    if kind % 9 == 3 {
                        len_field(1, strings[b as usize % 6], &mut inner);
                    }
                    len_field(1, &inner, &mut out);
                }
                4 => {
                    inner.push(0x09);
                    inner.extend_from_slice(&[a; 8]);
                    len_field(2 + (b % 2) * 3, &inner, &mut out);
                }
                5 => {
                    inner.push(0x09);
                    inner.extend_from_slice(&[a; 8]);
                    let mut exemplar = Vec::new();
                    let mut pair = Vec::new();
                    len_field(1, strings[b as usize % 6], &mut pair);
                    len_field(1, &pair, &mut exemplar);
                    len_field(2, &exemplar, &mut inner);
                    len_field(3, &inner, &mut out);
                }
                6 => {
                    inner.extend_from_slice(&[0x08, a & 0x7f, 0x19]);
                    inner.extend_from_slice(&[b; 8]);
                    len_field(4, &inner, &mut out);
                }
                7 => {
                    // sample_count, schema, a packed span list and packed deltas.
                    inner.extend_from_slice(&[0x08, a & 0x7f, 0x28, b & 0x7f]);
                    len_field(9, &[0x08, 0x01, 0x10, 0x02], &mut inner);
                    len_field(10, &[a, b & 0x7f], &mut inner);
                    len_field(11, &[b; 8], &mut inner);
                    len_field(7, &inner, &mut out);
                }
                _ => out.extend_from_slice(&[0x30, a & 0x7f]),
            }
        }
        out
    }

    /// `metric` then `check_kept` accept exactly what `metric` then `check_message` against
    /// `Metric` accepted (the check a kept metric had before it was split in two).
    fn kept_check_agrees(bytes: &[u8]) -> Option<bool> {
        let rules = Arc::new(FilterRules::new(&Default::default()).unwrap());
        let mut filter = ProtoFilter::new(rules);
        let scan = filter.metric(bytes, 0, bytes.len()).ok()?;
        let split = filter.check_kept(bytes, &scan).is_ok();
        let whole = check_message(bytes, (0, bytes.len()), METRIC).is_ok();
        assert_eq!(split, whole, "{bytes:02x?}");
        Some(split)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        #[test]
        fn the_kept_check_is_the_metric_schema_check(
            choices in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40),
            damage in proptest::collection::vec((proptest::prelude::any::<usize>(), proptest::prelude::any::<u8>()), 0..3),
        ) {
            let mut bytes = metric_bytes(&choices);
            for (at, byte) in damage {
                if !bytes.is_empty() {
                    let i = at % bytes.len();
                    bytes[i] = byte;
                }
            }
            kept_check_agrees(&bytes);
        }
    }

    /// The property above sees both answers, and the fast label path's shapes.
    #[test]
    fn the_kept_check_sees_both_answers() {
        let mut answers = [0usize; 2];
        for seed in 0u32..4000 {
            let choices: Vec<u8> = (0..12u32)
                .map(|i| (seed.wrapping_mul(2_654_435_761).wrapping_add(i * 40_503) >> 7) as u8)
                .collect();
            if let Some(ok) = kept_check_agrees(&metric_bytes(&choices)) {
                answers[usize::from(ok)] += 1;
            }
        }
        assert!(answers[0] > 100 && answers[1] > 100, "{answers:?}");
        // A fast-path pair and the general walk give the same ranges.
        let mut pair = Vec::new();
        len_field(1, b"namespace", &mut pair);
        len_field(2, b"kube-system", &mut pair);
        let fast = label_pair(&pair, (0, pair.len())).unwrap();
        let general = label_pair_fields(&pair, (0, pair.len())).unwrap();
        assert_eq!((fast.name, fast.value), (general.name, general.value));
        assert_eq!(&pair[fast.value.0..fast.value.1], b"kube-system");
    }

    #[test]
    fn varints() {
        assert_eq!(varint(&[0x00], 0), Some((0, 1)));
        assert_eq!(varint(&[0x96, 0x01], 0), Some((150, 2)));
        assert_eq!(varint(&[0x96], 0), None);
        let max = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
        assert_eq!(varint(&max, 0), Some((u64::MAX, 10)));
        let over = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02];
        assert_eq!(varint(&over, 0), None);
        let long = [
            0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00,
        ];
        assert_eq!(varint(&long, 0), None);
        for v in [0u64, 1, 127, 128, 300, 1 << 35, u64::MAX] {
            let mut b = Vec::new();
            put_varint(v, &mut b);
            assert_eq!(varint(&b, 0), Some((v, b.len())));
        }
    }
}
