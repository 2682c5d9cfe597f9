//! The service graph from raw spans: one parallel scan, paired in Rust.
//!
//! As SQL, the pairing is a join and two anti joins on 32-character hex ids that read the
//! span files four times (session 1's form; DuckDB runs it in 2 s over 10M spans). Here the
//! needed columns are read once, in parallel (`storage/src/scan.rs`), and plain functions
//! pair them on binary ids:
//!
//! 1. **decode** (one task per scan partition): each span becomes a 56-byte [`Span`] (ids
//!    parsed from hex, service and peer names interned), put in one of [`SHARDS`] shards by
//!    its trace id, so that a trace's spans all land in the same shard; the per-service
//!    signals (SERVER and CONSUMER spans of the range) are tallied on the way;
//! 2. **pair** (one task per shard): the CLIENT and PRODUCER spans of the widened window go
//!    into a hash map by `(trace, span)`; a SERVER (CONSUMER) span whose parent is a CLIENT
//!    (PRODUCER) span in the range is one request on the edge parent's service → its
//!    service, with the caller's latency; an in-range CLIENT or PRODUCER span left unpaired
//!    is a request to its peer; an in-range SERVER span without a parent, or whose parent
//!    is not in the trace (checked against the other spans only for those few), is a
//!    request from the entry point (an id of its own, so a service called `user` stays
//!    apart). Each request is tallied in a [`Cell`] of its edge: the callee's version and
//!    the reason a proxy answered it, if one did. A mirrored copy (`mirror` = `shadow`
//!    on either side) is paired, so it sends nobody to the entry point or a virtual
//!    node, and counted nowhere. The same pairing bucketed by minute feeds
//!    the rollups, and over short windows the `/metrics` counters;
//! 3. **merge**: the shards' cells per edge are joined; an unpaired caller's peer that is
//!    an instrumented service of the range ([`instrumented`]) is that service's edge, not
//!    a virtual node; `model.rs` takes the percentiles by selection (linear interpolation
//!    between the closest ranks, as `percentile_cont`), which is linear where a sort is not.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, AsArray, PrimitiveArray, RecordBatch, StringViewArray};
use arrow::datatypes::{DataType, Field, Int32Type, Int64Type, TimestampNanosecondType};
use datafusion::datasource::physical_plan::parquet::ParquetFileReaderFactory;
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryReservation};
use meshscope_proto::Table;
use meshscope_storage::provider::reader_factory;
use meshscope_storage::{ColumnScan, Rows, ScanPart};

use super::model::{NodeKind, PAIR_WINDOW, USER, USER_ENTRY};
use super::range::TimeRange;
use crate::engine::{QueryEngine, QueryError};

const SERVER: u8 = 1;
const CLIENT: u8 = 2;
const PRODUCER: u8 = 3;
const CONSUMER: u8 = 4;

const ERROR: u8 = 1;
const IN_RANGE: u8 = 2;
/// A span of a mirrored copy (`mirror` = `shadow`): paired like any other, tallied nowhere.
const SHADOW: u8 = 4;

/// Shards of the pairing; a trace's spans all go to one.
pub(crate) const SHARDS: usize = 16;

const MINUTE_NS: i64 = 60_000_000_000;

/// No name (no peer, no version, no reason).
const NONE: u32 = u32::MAX;

type Hasher = ahash::RandomState;

/// `SERVER`, `CLIENT` … as a code, from the first two bytes.
fn kind_code(s: &[u8]) -> u8 {
    match s {
        b"SERVER" => SERVER,
        b"CLIENT" => CLIENT,
        b"PRODUCER" => PRODUCER,
        b"CONSUMER" => CONSUMER,
        _ => 0,
    }
}

/// Hex digit values; 0xFF where a byte is not one (either case).
static HEX: [u8; 256] = {
    let mut t = [0xFFu8; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        t[b'A' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

/// Eight ASCII hex digits, already checked, as a number: all eight at once in a `u64`
/// (the digit of `'a'`/`'A'` is its low nibble plus 9, which bit 6 marks).
fn hex8(b: [u8; 8]) -> u64 {
    let v = u64::from_le_bytes(b);
    let d = (v & 0x0F0F_0F0F_0F0F_0F0F) + ((v >> 6) & 0x0101_0101_0101_0101) * 9;
    // Byte i holds digit i (the first the most significant): pair them, then the pairs.
    let d = ((d & 0x000F_000F_000F_000F) << 4) | ((d & 0x0F00_0F00_0F00_0F00) >> 8);
    let d = (d & 0x0000_00FF_0000_00FF) | ((d & 0x00FF_0000_00FF_0000) >> 8);
    let d = (d & 0x0000_0000_0000_FFFF) | ((d & 0x0000_FFFF_0000_0000) >> 16);
    u64::from((d as u32).swap_bytes())
}

/// Up to 16 hex digits as a number; `None` when empty, too long or not hex.
fn hex_u64(s: &[u8]) -> Option<u64> {
    if let Ok(full) = <&[u8; 16]>::try_from(s) {
        // The common case: every id meshscope stores is 16 or 32 lowercase digits.
        let ok = full.iter().fold(true, |ok, c| ok & c.is_ascii_hexdigit());
        let (hi, lo) = full.split_at(8);
        let (Ok(hi), Ok(lo)) = (<[u8; 8]>::try_from(hi), <[u8; 8]>::try_from(lo)) else {
            return None;
        };
        return ok.then(|| (hex8(hi) << 32) | hex8(lo));
    }
    if s.is_empty() || s.len() > 16 {
        return None;
    }
    let mut v = 0u64;
    let mut bad = 0u8;
    for &c in s {
        let d = HEX[c as usize];
        bad |= d;
        v = (v << 4) | u64::from(d & 0x0F);
    }
    (bad & 0xF0 == 0).then_some(v)
}

/// A trace id (up to 32 hex digits) as two halves.
fn hex_u128(s: &[u8]) -> Option<[u64; 2]> {
    if s.len() > 32 {
        return None;
    }
    let split = s.len().saturating_sub(16);
    let hi = if split == 0 { 0 } else { hex_u64(&s[..split])? };
    Some([hi, hex_u64(&s[split..])?])
}

fn shard_of(trace: [u64; 2]) -> usize {
    // Ids are random, but mix anyway so that sequential test ids spread too.
    let h = (trace[0] ^ trace[1]).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (h >> 59) as usize % SHARDS
}

/// One span as the pairing needs it: 56 bytes (the pairing holds millions of them, so
/// every byte is memory the kernel must hand over and zero on each query).
#[derive(Debug, Clone, Copy)]
struct Span {
    trace: [u64; 2],
    span: u64,
    /// 0 for none (0 is not a valid span id).
    parent: u64,
    duration: i64,
    /// The service's name id (the high bits), the kind and the flags (the low
    /// [`META_BITS`]).
    meta: u32,
    /// A caller's (CLIENT or PRODUCER in the range) peer name; a callee's (SERVER or
    /// CONSUMER) version, resource `service.version`; else [`NONE`].
    name: u32,
    /// Why a proxy answered the request itself (`proxy_reason`), or [`NONE`].
    reason: u32,
    /// Minutes since the first minute of the scanned window (for per-minute rollups).
    minute: u32,
}

/// Bits of [`Span::meta`] for the kind (3) and the flags (3).
const META_BITS: u32 = 6;

/// A decoder's name ids stay below this, so that a service's fits beside the kind and flags.
const MAX_NAMES: usize = 1 << (32 - META_BITS);

impl Span {
    fn meta(service: u32, kind: u8, flags: u8) -> u32 {
        (service << META_BITS) | u32::from(kind & 0x7) | (u32::from(flags & 0x7) << 3)
    }

    fn service(&self) -> u32 {
        self.meta >> META_BITS
    }

    fn kind(&self) -> u8 {
        (self.meta & 0x7) as u8
    }

    fn flags(&self) -> u8 {
        ((self.meta >> 3) & 0x7) as u8
    }

    fn is_caller(&self) -> bool {
        matches!(self.kind(), CLIENT | PRODUCER)
    }
}

/// Spans in fixed-size chunks: growing never copies what is already there (a `Vec` of
/// millions of spans would, at every doubling).
#[derive(Default)]
struct Chunks {
    chunks: Vec<Vec<Span>>,
}

/// 4096 spans, 224 KiB: small enough for the allocator to reuse its pages rather than map
/// (and the kernel zero) fresh ones for every chunk.
const CHUNK: usize = 4 * 1024;

impl Chunks {
    fn push(&mut self, s: Span) {
        match self.chunks.last_mut() {
            Some(c) if c.len() < CHUNK => c.push(s),
            _ => {
                let mut c = Vec::with_capacity(CHUNK);
                c.push(s);
                self.chunks.push(c);
            }
        }
    }

    fn len(&self) -> usize {
        self.chunks.iter().map(Vec::len).sum()
    }

    fn get(&self, i: usize) -> &Span {
        &self.chunks[i / CHUNK][i % CHUNK]
    }

    fn iter(&self) -> impl Iterator<Item = &Span> {
        self.chunks.iter().flatten()
    }
}

/// Interned strings (service and peer names), local to one decoder.
#[derive(Default)]
struct Names {
    ids: HashMap<String, u32, Hasher>,
    names: Vec<String>,
}

impl Names {
    fn id(&mut self, s: &str) -> u32 {
        if let Some(i) = self.ids.get(s) {
            return *i;
        }
        let i = self.names.len() as u32;
        self.names.push(s.to_string());
        self.ids.insert(s.to_string(), i);
        i
    }
}

/// The requests of one (version, reason) of an edge or a service: latencies and errors.
#[derive(Debug, Default, Clone, PartialEq)]
struct Cell {
    version: u32,
    reason: u32,
    latencies: Vec<i64>,
    errors: u64,
}

/// The requests of one edge or service, split by the callee's version and by the reason a
/// proxy answered (a handful of cells at most, looked through in order).
#[derive(Debug, Default, Clone, PartialEq)]
struct Tally {
    cells: Vec<Cell>,
}

impl Tally {
    fn cell(&mut self, version: u32, reason: u32) -> &mut Cell {
        let i = match self
            .cells
            .iter()
            .position(|c| c.version == version && c.reason == reason)
        {
            Some(i) => i,
            None => {
                self.cells.push(Cell {
                    version,
                    reason,
                    ..Cell::default()
                });
                self.cells.len() - 1
            }
        };
        &mut self.cells[i]
    }

    fn add(&mut self, version: u32, reason: u32, latency: i64, error: bool) {
        let c = self.cell(version, reason);
        c.latencies.push(latency);
        c.errors += u64::from(error);
    }

    /// Adds another tally's cells, with their names mapped by `remap`.
    fn merge(&mut self, other: Tally, remap: impl Fn(u32) -> u32) {
        for c in other.cells {
            let into = self.cell(remap(c.version), remap(c.reason));
            if into.latencies.is_empty() {
                into.latencies = c.latencies;
            } else {
                into.latencies.extend(c.latencies);
            }
            into.errors += c.errors;
        }
    }
}

/// A service's own requests (SERVER and CONSUMER spans of the range).
#[derive(Debug, Default)]
struct Own {
    tally: Tally,
    namespace: Option<String>,
    /// The service has a span of any kind in the range: it is instrumented, so a caller
    /// naming it without a child span still called it.
    seen: bool,
}

/// What one scan partition decoded.
#[derive(Default)]
struct Decoded {
    names: Names,
    shards: Vec<Chunks>,
    /// By local service id.
    own: Vec<Own>,
    /// The latest end of a CLIENT span of the range (nanoseconds): its children start
    /// before it (give or take [`SLACK_NS`]).
    caller_end: i64,
    /// A PRODUCER span is in the range: its CONSUMER children may start at any time.
    producers: bool,
    /// The widened window's first minute, which spans' minutes count from.
    base_minute: i64,
}

/// Bytes a decoded span costs through the pairing: itself, and the latency its edge keeps.
const HELD_PER_SPAN: usize = std::mem::size_of::<Span>() + std::mem::size_of::<i64>();

impl Decoded {
    /// The bytes this partition holds, as accounted in the query memory pool: its spans'
    /// chunks (and their edges' latencies later) and the services' own latencies.
    fn held(&self) -> usize {
        let spans: usize = self
            .shards
            .iter()
            .flat_map(|s| &s.chunks)
            .map(Vec::capacity)
            .sum();
        let own: usize = self
            .own
            .iter()
            .flat_map(|o| &o.tally.cells)
            .map(|c| c.latencies.capacity())
            .sum();
        spans * HELD_PER_SPAN + own * std::mem::size_of::<i64>()
    }
}

/// The refusal when the pairing would need more than the query memory pool has left.
fn too_big(e: datafusion::error::DataFusionError) -> QueryError {
    QueryError::ResourcesExhausted(format!(
        "the service graph from raw spans over this range needs more query memory than is \
         free (--query-memory-bytes, shared by all queries): choose a shorter range, or leave \
         out source=spans to read the per-minute rollups ({e})"
    ))
}

/// The columns the decoder reads, in this order, with the types it reads them as: ids as
/// views into the decoded pages, low-cardinality names as dictionaries.
fn scan_schema() -> Vec<Field> {
    let spans = Table::Spans.schema();
    let dict = DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8));
    [
        ("trace_id", Some(DataType::Utf8View)),
        ("span_id", Some(DataType::Utf8View)),
        ("parent_span_id", Some(DataType::Utf8View)),
        ("service_name", Some(dict.clone())),
        ("service_namespace", Some(dict.clone())),
        ("span_kind", Some(dict.clone())),
        ("status_code", Some(dict.clone())),
        ("duration_ns", None),
        ("start_time", None),
        ("peer_name", Some(dict.clone())),
        ("service_version", Some(dict.clone())),
        ("proxy_reason", Some(dict.clone())),
        ("span_name", Some(dict.clone())),
        ("mirror", Some(dict)),
    ]
    .into_iter()
    .map(|(name, as_type)| {
        let f = spans
            .field_with_name(name)
            .map(|f| f.as_ref().clone())
            .unwrap_or_else(|_| Field::new(name, DataType::Utf8, true));
        // Nullable: an older file without the column reads as nulls.
        match as_type {
            Some(t) => f.with_data_type(t),
            None => f,
        }
        .with_nullable(true)
    })
    .collect()
}

/// A dictionary column's keys, and a value per dictionary entry.
fn dict_map<T>(
    b: &RecordBatch,
    i: usize,
    mut f: impl FnMut(&str) -> T,
) -> Result<(PrimitiveArray<Int32Type>, Vec<T>), QueryError> {
    let d = b
        .column(i)
        .as_dictionary_opt::<Int32Type>()
        .ok_or_else(|| QueryError::Internal(format!("column {i} is not a dictionary")))?;
    let values = d.values().as_string_opt::<i32>().ok_or_else(|| {
        QueryError::Internal(format!("column {i} is not a dictionary of strings"))
    })?;
    let mapped = (0..values.len()).map(|k| f(values.value(k))).collect();
    Ok((d.keys().clone(), mapped))
}

fn views(b: &RecordBatch, i: usize) -> Result<&StringViewArray, QueryError> {
    b.column(i)
        .as_string_view_opt()
        .ok_or_else(|| QueryError::Internal(format!("column {i} is not a string view")))
}

impl Decoded {
    /// A decoder of the window starting at `start` (nanoseconds).
    fn new(start: i64) -> Self {
        Decoded {
            shards: (0..SHARDS).map(|_| Chunks::default()).collect(),
            base_minute: start.div_euclid(MINUTE_NS),
            ..Decoded::default()
        }
    }

    fn service(&mut self, name: &str) -> u32 {
        let id = self.names.id(name);
        if self.own.len() <= id as usize {
            self.own.resize_with(id as usize + 1, Own::default);
        }
        id
    }

    /// Adds a batch of [`scan_schema`]'s columns: the spans starting in `wide` (the part of
    /// the widened window this scan reads), with those in `range` marked.
    fn add(
        &mut self,
        b: &RecordBatch,
        (lo, hi): (i64, i64),
        wide: (i64, i64),
    ) -> Result<(), QueryError> {
        let (trace, span, parent) = (views(b, 0)?, views(b, 1)?, views(b, 2)?);
        let (service, services) = dict_map(b, 3, |s| self.service(s))?;
        let (namespace, namespaces) = dict_map(b, 4, str::to_string)?;
        let (kind, kinds) = dict_map(b, 5, |s| kind_code(s.as_bytes()))?;
        let (status, errors) = dict_map(b, 6, |s| s == "ERROR")?;
        let (peer, peers) = dict_map(b, 9, |s| self.names.id(s))?;
        let (version, versions) = dict_map(b, 10, |s| self.names.id(s))?;
        let (reason, reasons) = dict_map(b, 11, |s| self.names.id(s))?;
        if self.names.names.len() >= MAX_NAMES {
            return Err(QueryError::ResourcesExhausted(format!(
                "more than {MAX_NAMES} distinct service, peer, version and reason names in \
                 one scan partition: choose a shorter range, or leave out source=spans"
            )));
        }
        // Envoy's outbound listener, with `spawn_upstream_span`, makes a SERVER span per
        // outgoing request (`egress <host>`): the app's call, not a request it served.
        let (span_name, outbound) = dict_map(b, 12, |s| s.starts_with("egress "))?;
        let (mirror, shadows) = dict_map(b, 13, |s| s == "shadow")?;
        let duration = b.column(7).as_primitive::<Int64Type>();
        let start = b.column(8).as_primitive::<TimestampNanosecondType>();
        let at = |keys: &PrimitiveArray<Int32Type>, i: usize| {
            (!keys.is_null(i)).then(|| keys.value(i) as usize)
        };
        for i in 0..b.num_rows() {
            if start.is_null(i) {
                continue;
            }
            let t = start.value(i);
            if t < wide.0 || t >= wide.1 {
                continue;
            }
            let Some(svc) = at(&service, i).map(|k| services[k]) else {
                continue;
            };
            let k = match at(&kind, i).map_or(0, |k| kinds[k]) {
                SERVER if at(&span_name, i).is_some_and(|n| outbound[n]) => 0,
                k => k,
            };
            let error = at(&status, i).is_some_and(|k| errors[k]);
            let shadow = at(&mirror, i).is_some_and(|k| shadows[k]);
            let in_range = t >= lo && t < hi;
            let d = if duration.is_null(i) {
                0
            } else {
                duration.value(i)
            };
            let ver = at(&version, i).map_or(NONE, |k| versions[k]);
            let why = at(&reason, i).map_or(NONE, |k| reasons[k]);
            if in_range && !shadow {
                self.own[svc as usize].seen = true;
            }
            if in_range && k == CLIENT {
                self.caller_end = self.caller_end.max(t.saturating_add(d));
            }
            self.producers |= in_range && k == PRODUCER;
            if in_range && (k == SERVER || k == CONSUMER) && !shadow {
                let own = &mut self.own[svc as usize];
                own.tally.add(ver, NONE, d, error);
                if let Some(ns) = at(&namespace, i).map(|k| &namespaces[k])
                    && own.namespace.as_ref().is_none_or(|cur| ns > cur)
                {
                    own.namespace = Some(ns.clone());
                }
            }
            if trace.is_null(i) || span.is_null(i) {
                continue;
            }
            let (Some(tr), Some(sp)) = (
                hex_u128(trace.value(i).as_bytes()),
                hex_u64(span.value(i).as_bytes()),
            ) else {
                continue;
            };
            let par = if parent.is_null(i) {
                0
            } else {
                hex_u64(parent.value(i).as_bytes()).unwrap_or(0)
            };
            let name = match k {
                CLIENT | PRODUCER if in_range => at(&peer, i).map_or(NONE, |p| peers[p]),
                SERVER | CONSUMER => ver,
                _ => NONE,
            };
            let flags = if error { ERROR } else { 0 }
                | if in_range { IN_RANGE } else { 0 }
                | if shadow { SHADOW } else { 0 };
            self.shards[shard_of(tr)].push(Span {
                trace: tr,
                span: sp,
                parent: par,
                duration: d,
                meta: Span::meta(svc, k, flags),
                name,
                reason: why,
                minute: (t.div_euclid(MINUTE_NS) - self.base_minute) as u32,
            });
        }
        Ok(())
    }
}

/// (source, target, target kind, minute — 0 unless bucketing by minute).
type EdgeKey = (u32, u32, NodeKind, u32);

/// (source, target, kind) → tally, over global name ids: a flat table when the names are
/// few (a mesh of tens of services), a hash map otherwise.
struct Tallies {
    names: usize,
    slots: Vec<u32>,
    entries: Vec<(EdgeKey, Tally)>,
    map: HashMap<EdgeKey, u32, Hasher>,
    /// The edge whose requests are kept one by one, when one is wanted.
    want: Option<Arc<Want>>,
    exemplars: Vec<Exemplar>,
}

/// The edge [`edge_exemplars`] asks for, over global name ids: its source, and every
/// target id that means its target (the service, and peer names that resolve to it).
#[derive(Debug)]
struct Want {
    source: u32,
    targets: std::collections::HashSet<u32>,
}

/// One request of the wanted edge: its trace (as the pairing holds it), latency, whether it
/// failed, and the minute it started (since the scanned window's first).
#[derive(Debug, Clone, Copy)]
struct Exemplar {
    trace: [u64; 2],
    latency: i64,
    error: bool,
    minute: u32,
}

/// Up to this many names, a shard's tallies are found by index.
const DENSE_NAMES: usize = 256;

/// One request to tally: its callee's version, why a proxy answered it (or [`NONE`]),
/// the latency and whether it failed.
#[derive(Debug, Clone, Copy)]
struct Request {
    version: u32,
    reason: u32,
    latency: i64,
    error: bool,
}

impl Tallies {
    fn new(names: usize, by_minute: bool) -> Self {
        let dense = names <= DENSE_NAMES && !by_minute;
        Tallies {
            names,
            slots: if dense {
                vec![u32::MAX; names * names * 2]
            } else {
                Vec::new()
            },
            entries: Vec::new(),
            map: HashMap::default(),
            want: None,
            exemplars: Vec::new(),
        }
    }

    /// Tallies one request of `trace`, started in minute `started`.
    fn add(&mut self, key: EdgeKey, r: Request, trace: [u64; 2], started: u32) {
        let (s, t, k, _) = key;
        if let Some(w) = &self.want
            && w.source == s
            && w.targets.contains(&t)
        {
            self.exemplars.push(Exemplar {
                trace,
                latency: r.latency,
                error: r.error,
                minute: started,
            });
        }
        let dense = |names: usize| {
            (s as usize * names + t as usize) * 2 + usize::from(k == NodeKind::Virtual)
        };
        let slot = if self.slots.is_empty() {
            self.map.get(&key).copied()
        } else {
            Some(self.slots[dense(self.names)]).filter(|&e| e != u32::MAX)
        };
        let e = match slot {
            Some(e) => e as usize,
            None => {
                let e = self.entries.len();
                self.entries.push((key, Tally::default()));
                if self.slots.is_empty() {
                    self.map.insert(key, e as u32);
                } else {
                    let i = dense(self.names);
                    self.slots[i] = e as u32;
                }
                e
            }
        };
        self.entries[e]
            .1
            .add(r.version, r.reason, r.latency, r.error);
    }
}

/// One decoder's spans of a shard, with its name ids' global ids.
struct Piece {
    remap: Arc<Vec<u32>>,
    spans: Chunks,
}

/// Pairs the spans of one shard (all spans of its traces), read where the decoders left
/// them.
///
/// Only callers (CLIENT and PRODUCER spans) are indexed; a SERVER span whose parent is not
/// a caller is checked against the other spans afterwards, which is rare in a mesh (an
/// entry point, a parent outside the window, a gateway's INTERNAL span).
///
/// A request is tallied under the callee's version (none for a caller left unpaired) and
/// the reason a proxy answered it by itself: the caller's side's, else the callee's.
fn pair_shard(
    pieces: &[Piece],
    user: u32,
    names: usize,
    by_minute: bool,
    want: Option<Arc<Want>>,
) -> Tallies {
    let callers: usize = pieces
        .iter()
        .map(|p| p.spans.iter().filter(|s| s.is_caller()).count())
        .sum();
    // (trace, span) → (piece, row)
    let mut index: HashMap<(u64, u64, u64), (u32, u32), Hasher> =
        HashMap::with_capacity_and_hasher(callers, Hasher::new());
    for (pi, p) in pieces.iter().enumerate() {
        for (i, s) in p.spans.iter().enumerate() {
            if s.is_caller() {
                index.insert((s.trace[0], s.trace[1], s.span), (pi as u32, i as u32));
            }
        }
    }
    let mut tallies = Tallies::new(names, by_minute);
    tallies.want = want;
    let bucket = |s: &Span| if by_minute { s.minute } else { 0 };
    let global = |remap: &[u32], id: u32| if id == NONE { NONE } else { remap[id as usize] };
    let mut paired: Vec<Vec<bool>> = pieces.iter().map(|p| vec![false; p.spans.len()]).collect();
    // SERVER spans of the range whose parent is not a caller: (trace, parent) → their
    // (service, minute, request).
    type Entry = (u32, u32, Request);
    let mut orphans: HashMap<(u64, u64, u64), Vec<Entry>, Hasher> = HashMap::default();
    for p in pieces {
        for r in p.spans.iter() {
            let kind = r.kind();
            if kind != SERVER && kind != CONSUMER {
                continue;
            }
            let service = p.remap[r.service() as usize];
            let caller = if r.parent == 0 {
                None
            } else {
                index.get(&(r.trace[0], r.trace[1], r.parent)).copied()
            };
            let caller_kind = if kind == SERVER { CLIENT } else { PRODUCER };
            match caller {
                Some((cp, ci)) => {
                    let cpiece = &pieces[cp as usize];
                    let c = cpiece.spans.get(ci as usize);
                    let (cflags, rflags) = (c.flags(), r.flags());
                    if c.kind() == caller_kind
                        && cflags & IN_RANGE != 0
                        && (cflags | rflags) & SHADOW != 0
                    {
                        // A mirrored copy: its caller is paired, and nothing is counted.
                        paired[cp as usize][ci as usize] = true;
                    } else if c.kind() == caller_kind && cflags & IN_RANGE != 0 {
                        paired[cp as usize][ci as usize] = true;
                        let reason = match global(&cpiece.remap, c.reason) {
                            NONE => global(&p.remap, r.reason),
                            why => why,
                        };
                        tallies.add(
                            (
                                cpiece.remap[c.service() as usize],
                                service,
                                NodeKind::Service,
                                bucket(c),
                            ),
                            Request {
                                version: global(&p.remap, r.name),
                                reason,
                                latency: c.duration,
                                error: (cflags | rflags) & ERROR != 0,
                            },
                            c.trace,
                            c.minute,
                        );
                    }
                }
                None if kind == SERVER && r.flags() & (IN_RANGE | SHADOW) == IN_RANGE => {
                    let request = Request {
                        version: global(&p.remap, r.name),
                        reason: global(&p.remap, r.reason),
                        latency: r.duration,
                        error: r.flags() & ERROR != 0,
                    };
                    if r.parent == 0 {
                        tallies.add(
                            (user, service, NodeKind::Service, bucket(r)),
                            request,
                            r.trace,
                            r.minute,
                        );
                    } else {
                        orphans
                            .entry((r.trace[0], r.trace[1], r.parent))
                            .or_default()
                            .push((service, r.minute, request));
                    }
                }
                None => {}
            }
        }
    }
    if !orphans.is_empty() {
        // A parent that is in the trace, whatever its kind, makes it not an entry point.
        for p in pieces {
            for s in p.spans.iter() {
                if !s.is_caller() {
                    orphans.remove(&(s.trace[0], s.trace[1], s.span));
                }
            }
        }
        for ((t0, t1, _), entries) in orphans {
            for (service, minute, request) in entries {
                let bucketed = if by_minute { minute } else { 0 };
                tallies.add(
                    (user, service, NodeKind::Service, bucketed),
                    request,
                    [t0, t1],
                    minute,
                );
            }
        }
    }
    for (p, paired) in pieces.iter().zip(paired) {
        for (s, was_paired) in p.spans.iter().zip(paired) {
            if s.is_caller() && s.name != NONE && !was_paired && s.flags() & SHADOW == 0 {
                tallies.add(
                    (
                        p.remap[s.service() as usize],
                        p.remap[s.name as usize],
                        NodeKind::Virtual,
                        bucket(s),
                    ),
                    Request {
                        version: NONE,
                        reason: global(&p.remap, s.reason),
                        latency: s.duration,
                        error: s.flags() & ERROR != 0,
                    },
                    s.trace,
                    s.minute,
                );
            }
        }
    }
    tallies
}

/// The requests of one edge, one callee version and one proxy reason: those that started
/// in one minute (the caller's start; the server's for `user` requests) when bucketed by
/// minute. An edge is the sum of its cells.
#[derive(Debug, Clone)]
pub(crate) struct EdgeRequests {
    /// The minute, when bucketed; otherwise the first minute of the scanned window.
    pub minute: chrono::DateTime<chrono::Utc>,
    /// The caller's service; `None` for the entry point (the `user` node).
    pub source: Option<String>,
    pub target: String,
    pub target_kind: NodeKind,
    /// The callee's `service.version`, when it has one.
    pub version: Option<String>,
    /// Why a proxy answered these requests itself, when one did.
    pub reason: Option<String>,
    pub latencies_ns: Vec<i64>,
    pub errors: u64,
}

/// A service's own requests (SERVER and CONSUMER spans of the range) of one version.
#[derive(Debug, Clone)]
pub(crate) struct ServiceRequests {
    pub service: String,
    pub namespace: Option<String>,
    pub version: Option<String>,
    pub latencies_ns: Vec<i64>,
    pub errors: u64,
}

/// The graph's ingredients from raw spans.
pub(crate) struct FromSpans {
    pub edges: Vec<EdgeRequests>,
    pub services: Vec<ServiceRequests>,
}

/// What one scan and pairing found, over global name ids.
struct Paired {
    names: Vec<String>,
    /// The id of the entry point (`user`), which no service name shares.
    user: u32,
    /// The epoch minute of [`EdgeKey`]'s minute 0.
    base_minute: i64,
    edges: HashMap<EdgeKey, Tally, Hasher>,
    own: HashMap<u32, Own, Hasher>,
    /// The wanted edge's requests, one by one.
    exemplars: Vec<Exemplar>,
}

impl Paired {
    fn name(&self, id: u32) -> Option<String> {
        (id != NONE).then(|| self.names[id as usize].clone())
    }

    fn edge_requests(&self, edges: HashMap<EdgeKey, Tally, Hasher>) -> Vec<EdgeRequests> {
        let mut out = Vec::with_capacity(edges.len());
        for ((s, t, kind, minute), tally) in edges {
            let minute = chrono::DateTime::from_timestamp_nanos(
                (self.base_minute + i64::from(minute)).saturating_mul(MINUTE_NS),
            );
            for c in tally.cells {
                out.push(EdgeRequests {
                    minute,
                    source: (s != self.user).then(|| self.names[s as usize].clone()),
                    target: self.names[t as usize].clone(),
                    target_kind: kind,
                    version: self.name(c.version),
                    reason: self.name(c.reason),
                    latencies_ns: c.latencies,
                    errors: c.errors,
                });
            }
        }
        out
    }
}

/// The graph from raw spans over `range`: the requests of each edge and each service.
pub(crate) async fn analyse(
    engine: &QueryEngine,
    range: &TimeRange,
) -> Result<FromSpans, QueryError> {
    let mut found = scan_and_pair(engine, range, false, pair_window(), None).await?;
    let edges = std::mem::take(&mut found.edges);
    let own = std::mem::take(&mut found.own);
    let mut services = Vec::new();
    for (s, o) in own {
        for c in o.tally.cells {
            services.push(ServiceRequests {
                service: found.names[s as usize].clone(),
                namespace: o.namespace.clone(),
                version: found.name(c.version),
                latencies_ns: c.latencies,
                errors: c.errors,
            });
        }
    }
    Ok(FromSpans {
        edges: found.edge_requests(edges),
        services,
    })
}

/// The requests of `range` per edge and minute, for the rollups.
pub(crate) async fn requests_by_minute(
    engine: &QueryEngine,
    range: &TimeRange,
) -> Result<Vec<EdgeRequests>, QueryError> {
    let mut found = scan_and_pair(engine, range, true, pair_window(), None).await?;
    let edges = std::mem::take(&mut found.edges);
    Ok(found.edge_requests(edges))
}

/// The requests of `range` per edge and minute, looking for the other half of a pair only
/// `window` either side (for the short, frequent windows of the `/metrics` counters).
pub(crate) async fn requests_by_minute_within(
    engine: &QueryEngine,
    range: &TimeRange,
    window: chrono::Duration,
) -> Result<Vec<EdgeRequests>, QueryError> {
    let mut found = scan_and_pair(engine, range, true, window, None).await?;
    let edges = std::mem::take(&mut found.edges);
    Ok(found.edge_requests(edges))
}

/// One request of an edge, as an example of its traffic.
#[derive(Debug, Clone, PartialEq)]
pub struct EdgeExemplar {
    /// Lowercase hex, as the `spans` table has it.
    pub trace_id: String,
    pub latency_ns: i64,
    pub error: bool,
    /// The minute it started.
    pub minute: chrono::DateTime<chrono::Utc>,
}

/// Every request of the edge `source → target` in `range` (the graph's names of its ends:
/// `user` or `user (entry)` for the entry point), found by the graph's own pairing, so
/// examples of an edge (an alert's evidence) are requests the graph counted on it.
pub async fn edge_exemplars(
    engine: &QueryEngine,
    range: &TimeRange,
    source: &str,
    target: &str,
) -> Result<Vec<EdgeExemplar>, QueryError> {
    let wanted = Some((source.to_string(), target.to_string()));
    let found = scan_and_pair(engine, range, false, pair_window(), wanted).await?;
    Ok(found
        .exemplars
        .iter()
        .map(|x| EdgeExemplar {
            trace_id: format!("{:016x}{:016x}", x.trace[0], x.trace[1]),
            latency_ns: x.latency,
            error: x.error,
            minute: chrono::DateTime::from_timestamp_nanos(
                (found.base_minute + i64::from(x.minute)).saturating_mul(MINUTE_NS),
            ),
        })
        .collect())
}

fn pair_window() -> chrono::Duration {
    chrono::Duration::minutes(PAIR_WINDOW)
}

/// How far a child span may start outside its caller's interval (before its start, after
/// its end), and a parent end before its child starts: the clock skew between hosts the
/// pairing allows for. The range plus this much either side is read whole.
const SLACK_NS: i64 = 5_000_000_000;

/// One scan partition: its share of the files, what it decoded so far, and the query
/// memory it holds for that.
struct Partition {
    part: ScanPart,
    decoded: Decoded,
    reservation: MemoryReservation,
}

/// Reads `scans` (disjoint parts of the widened window) into every partition, in parallel.
async fn read_partitions(
    partitions: Vec<Partition>,
    scans: Vec<ColumnScan>,
    files: &Arc<dyn ParquetFileReaderFactory>,
    bounds: (i64, i64),
) -> Result<Vec<Partition>, QueryError> {
    let scans = Arc::new(scans);
    let tasks: Vec<_> = partitions
        .into_iter()
        .map(|mut p| {
            let (scans, files) = (Arc::clone(&scans), Arc::clone(files));
            tokio::spawn(async move {
                for scan in scans.iter() {
                    let d = &mut p.decoded;
                    let reservation = &mut p.reservation;
                    p.part
                        .read(scan, &files, |b| {
                            d.add(&b, bounds, scan.range)?;
                            // What the partition decodes is accounted in the query memory
                            // pool, batch by batch: a range too large for it is refused,
                            // not grown into.
                            let held = d.held();
                            if held > reservation.size() {
                                reservation
                                    .try_grow(held - reservation.size())
                                    .map_err(too_big)?;
                            }
                            Ok::<(), QueryError>(())
                        })
                        .await?;
                }
                Ok::<_, QueryError>(p)
            })
        })
        .collect();
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(join(t).await??);
    }
    Ok(out)
}

/// Scans the range (widened by `window`) and pairs.
///
/// Only the spans that can pair with a span of the range are read from the widened part:
/// the range plus [`SLACK_NS`] either side whole; before it, the spans still running
/// [`SLACK_NS`] before the range starts (the only ones that can be a parent of a span of
/// the range: a parent's interval holds its child's start); after it, the spans starting
/// before the last CLIENT span of the range ends (plus the slack), and, when the range has
/// PRODUCER spans, every CONSUMER span of the window (a message may wait in its queue).
/// The window therefore costs what the spans crossing its edges cost, not what all the
/// traffic of the widened window does (13 times the range for the `/metrics` counters'
/// 10 s windows, 11 for a rollup's minute).
async fn scan_and_pair(
    engine: &QueryEngine,
    range: &TimeRange,
    by_minute: bool,
    window: chrono::Duration,
    wanted: Option<(String, String)>,
) -> Result<Paired, QueryError> {
    let wide = range.widened(window);
    let ns = |t: chrono::DateTime<chrono::Utc>| t.timestamp_nanos_opt().unwrap_or(i64::MAX);
    let bounds = (ns(range.start), ns(range.end));
    let wide = (ns(wide.start), ns(wide.end));
    let table = Arc::clone(engine.storage().table(Table::Spans));
    let ctx = Arc::clone(engine.context());
    engine
        .executor()
        .spawn(async move {
            let started = std::time::Instant::now();
            let runtime = ctx.runtime_env();
            let pool = &runtime.memory_pool;
            let files = reader_factory(&table, &runtime)?;
            let all = ColumnScan::new(scan_schema(), "start_time", wide);
            let clamp = |t: i64| t.clamp(wide.0, wide.1);
            let whole = (
                clamp(bounds.0.saturating_sub(SLACK_NS)),
                clamp(bounds.1.saturating_add(SLACK_NS)),
            );
            let partitions: Vec<Partition> = table
                .scan_parts(ctx.state().config().target_partitions())
                .into_iter()
                .map(|part| Partition {
                    part,
                    decoded: Decoded::new(wide.0),
                    reservation: MemoryConsumer::new("service graph pairing").register(pool),
                })
                .collect();
            let before = all.over(
                (wide.0, whole.0),
                Rows::AtLeast {
                    column: "end_time".to_string(),
                    min: bounds.0.saturating_sub(SLACK_NS),
                },
            );
            let partitions = read_partitions(
                partitions,
                vec![all.over(whole, Rows::All), before],
                &files,
                bounds,
            )
            .await?;
            let caller_end = partitions
                .iter()
                .map(|p| p.decoded.caller_end)
                .max()
                .unwrap_or(i64::MIN);
            let producers = partitions.iter().any(|p| p.decoded.producers);
            let children_until = clamp(caller_end.saturating_add(SLACK_NS)).max(whole.1);
            let mut after = vec![all.over((whole.1, children_until), Rows::All)];
            if producers {
                after.push(all.over(
                    (children_until, wide.1),
                    Rows::Equals {
                        column: "span_kind".to_string(),
                        value: "CONSUMER".to_string(),
                    },
                ));
            }
            let partitions = read_partitions(partitions, after, &files, bounds).await?;
            let mut parts = Vec::with_capacity(partitions.len());
            let mut reservations = Vec::with_capacity(partitions.len());
            for p in partitions {
                parts.push(p.decoded);
                reservations.push(p.reservation);
            }
            let scanned = started.elapsed();
            let decoded: usize = parts.iter().flat_map(|d| &d.shards).map(Chunks::len).sum();
            let wanted = wanted.as_ref().map(|(s, t)| (s.as_str(), t.as_str()));
            let mut found = merge(parts, by_minute, wanted).await?;
            found.base_minute = wide.0.div_euclid(MINUTE_NS);
            tracing::debug!(
                scan_ms = scanned.as_millis() as u64,
                pair_ms = (started.elapsed() - scanned).as_millis() as u64,
                decoded,
                by_minute,
                "pairing of raw spans"
            );
            Ok(found)
        })
        .await
        .map_err(|e| QueryError::Internal(format!("pairing task failed: {e}")))?
}

async fn join<T>(t: tokio::task::JoinHandle<T>) -> Result<T, QueryError> {
    t.await
        .map_err(|e| QueryError::Internal(format!("pairing task failed: {e}")))
}

/// The instrumented service a peer name means, if any: the name itself, without its
/// port, the host of an Istio cluster name (`outbound|8080||cart.shop.svc.cluster.local`),
/// or the first label of a Kubernetes service name (`cart.shop.svc…`).
pub(crate) fn instrumented(peer: &str, is_service: impl Fn(&str) -> bool) -> Option<&str> {
    let host = peer.rsplit('|').next().unwrap_or(peer);
    let no_port = host.rsplit_once(':').map_or(host, |(h, port)| {
        if port.bytes().all(|b| b.is_ascii_digit()) {
            h
        } else {
            host
        }
    });
    let first_label = no_port
        .split_once('.')
        .filter(|(_, rest)| rest.contains("svc"))
        .map(|(label, _)| label);
    [Some(peer), Some(host), Some(no_port), first_label]
        .into_iter()
        .flatten()
        .find(|candidate| is_service(candidate))
}

/// Gives every partition's names global ids, pairs the shards in parallel and merges;
/// then a caller left unpaired whose peer is an instrumented service of the range counts
/// on the edge to that service.
async fn merge(
    parts: Vec<Decoded>,
    by_minute: bool,
    wanted: Option<(&str, &str)>,
) -> Result<Paired, QueryError> {
    let mut names = Names::default();
    // The entry point's id: not interned, so a service called `user` has its own.
    names.names.push("user".to_string());
    let user = 0;
    let remaps: Vec<Arc<Vec<u32>>> = parts
        .iter()
        .map(|p| Arc::new(p.names.names.iter().map(|n| names.id(n)).collect()))
        .collect();

    // Per-service signals.
    let mut own: HashMap<u32, Own, Hasher> = HashMap::default();
    let mut shards: Vec<Vec<Piece>> = (0..SHARDS).map(|_| Vec::new()).collect();
    for (part, remap) in parts.into_iter().zip(&remaps) {
        for (local, o) in part.own.into_iter().enumerate() {
            if !o.seen {
                continue;
            }
            let g = own.entry(remap[local]).or_default();
            g.seen = true;
            g.tally.merge(
                o.tally,
                |id| if id == NONE { NONE } else { remap[id as usize] },
            );
            if o.namespace > g.namespace {
                g.namespace = o.namespace;
            }
        }
        for (i, spans) in part.shards.into_iter().enumerate() {
            shards[i].push(Piece {
                remap: Arc::clone(remap),
                spans,
            });
        }
    }

    let count = names.names.len();
    let by_name: HashMap<&str, u32> = own
        .keys()
        .map(|&id| (names.names[id as usize].as_str(), id))
        .collect();
    // The edge whose requests are kept, by the graph's names of its ends.
    let want = wanted.and_then(|(source, target)| {
        let source = match source {
            USER_ENTRY => user,
            USER if !by_name.contains_key(USER) => user,
            s => *names.ids.get(s)?,
        };
        let targets = (0..count as u32)
            .filter(|&id| {
                let n = &names.names[id as usize];
                id != user
                    && (n == target || instrumented(n, |c| by_name.contains_key(c)) == Some(target))
            })
            .collect();
        Some(Arc::new(Want { source, targets }))
    });
    let tasks: Vec<_> = shards
        .into_iter()
        .map(|pieces| {
            let want = want.clone();
            tokio::spawn(async move { pair_shard(&pieces, user, count, by_minute, want) })
        })
        .collect();
    // A virtual peer's name → the instrumented service it is, once per name.
    let mut resolved: HashMap<u32, Option<u32>, Hasher> = HashMap::default();
    let mut exemplars = Vec::new();
    let mut edges: HashMap<EdgeKey, Tally, Hasher> = HashMap::default();
    for t in tasks {
        let tallies = join(t).await?;
        exemplars.extend(tallies.exemplars);
        for ((s, t, kind, minute), tally) in tallies.entries {
            let key = if kind == NodeKind::Virtual {
                let service = *resolved.entry(t).or_insert_with(|| {
                    instrumented(&names.names[t as usize], |n| by_name.contains_key(n))
                        .and_then(|n| by_name.get(n).copied())
                });
                match service {
                    Some(svc) => (s, svc, NodeKind::Service, minute),
                    None => (s, t, kind, minute),
                }
            } else {
                (s, t, kind, minute)
            };
            edges.entry(key).or_default().merge(tally, |id| id);
        }
    }
    // Services that only answered nothing (no SERVER spans) need no own entry any more.
    own.retain(|_, o| !o.tally.cells.is_empty());
    Ok(Paired {
        names: names.names,
        user,
        base_minute: 0,
        edges,
        own,
        exemplars,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn a_span_takes_56_bytes() {
        // The README's memory figure for the raw-span graph.
        assert_eq!(std::mem::size_of::<Span>(), 56);
    }

    #[test]
    fn peer_names_resolve_to_instrumented_services() {
        let services = ["cart", "inventory"];
        let is = |n: &str| services.contains(&n);
        assert_eq!(instrumented("cart", is), Some("cart"));
        assert_eq!(instrumented("cart:8080", is), Some("cart"));
        assert_eq!(
            instrumented("outbound|8080||inventory.shop.svc.cluster.local", is),
            Some("inventory")
        );
        assert_eq!(instrumented("cart.shop.svc", is), Some("cart"));
        // A public host that merely starts like a service is not that service.
        assert_eq!(instrumented("cart.example.com", is), None);
        assert_eq!(instrumented("postgres", is), None);
    }

    #[test]
    fn hex_ids_parse_in_either_case_and_refuse_the_rest() {
        assert_eq!(hex_u64(b"00f067aa0ba902b7"), Some(0x00f0_67aa_0ba9_02b7));
        assert_eq!(hex_u64(b"00F067AA0BA902B7"), Some(0x00f0_67aa_0ba9_02b7));
        assert_eq!(hex_u64(b"0g"), None);
        assert_eq!(hex_u64(b"0123456789abcdef"), Some(0x0123_4567_89ab_cdef));
        assert_eq!(hex_u64(b"FEDCBA9876543210"), Some(0xfedc_ba98_7654_3210));
        assert_eq!(hex_u64(b"0123456789abcdeg"), None);
        assert_eq!(hex_u64(b"0123456789abcde:"), None);
        assert_eq!(hex_u64(b"G123456789abcdef"), None);
        let mut seed = 1u64;
        for _ in 0..1000 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            assert_eq!(hex_u64(format!("{seed:016x}").as_bytes()), Some(seed));
            assert_eq!(hex_u64(format!("{seed:016X}").as_bytes()), Some(seed));
        }
        assert_eq!(hex_u64(b""), None);
        assert_eq!(hex_u64(b"00000000000000001"), None);
        assert_eq!(
            hex_u128(b"4bf92f3577b34da6a3ce929d0e0e4736"),
            Some([0x4bf9_2f35_77b3_4da6, 0xa3ce_929d_0e0e_4736])
        );
        assert_eq!(hex_u128(b"ff"), Some([0, 0xff]));
        assert_eq!(hex_u128(b"4bf92f3577b34da6a3ce929d0e0e4736ff"), None);
    }

    fn span(trace: u64, id: u64, parent: u64, service: u32, kind: u8, in_range: bool) -> Span {
        Span {
            trace: [0, trace],
            span: id,
            parent,
            duration: (id * 10) as i64,
            meta: Span::meta(service, kind, if in_range { IN_RANGE } else { 0 }),
            name: NONE,
            reason: NONE,
            minute: 0,
        }
    }

    /// Every rule of the contract's pairing, on spans spread over two decoders' pieces.
    #[test]
    fn pairing_follows_the_contract() {
        const INTERNAL: u8 = 0;
        // Names: 0 user, 1 a, 2 b, 3 db (local ids of both pieces map to themselves).
        let (user, a, b, db) = (0, 1, 2, 3);
        let remap = Arc::new(vec![0, 1, 2, 3]);
        let mut one = Chunks::default();
        let mut two = Chunks::default();
        // Trace 1: a entry (no parent) → a CLIENT → b SERVER, in different pieces.
        one.push(span(1, 10, 0, a, SERVER, true));
        one.push(span(1, 11, 10, a, CLIENT, true));
        two.push(span(1, 12, 11, b, SERVER, true));
        // Trace 2: b SERVER under a parent never received → from user.
        two.push(span(2, 20, 99, b, SERVER, true));
        // Trace 3: b SERVER under an INTERNAL span of a → not an entry, no edge.
        one.push(span(3, 30, 0, a, INTERNAL, true));
        two.push(span(3, 31, 30, b, SERVER, true));
        // Trace 4: a CLIENT with no child, naming its peer → virtual db; an errored one.
        let mut c = span(4, 40, 0, a, CLIENT, true);
        c.name = db;
        c.meta = Span::meta(a, CLIENT, IN_RANGE | ERROR);
        one.push(c);
        // Trace 5: a CLIENT outside the range whose child is inside → nothing.
        one.push(span(5, 50, 0, a, CLIENT, false));
        two.push(span(5, 51, 50, b, SERVER, true));
        // Trace 6: PRODUCER → CONSUMER; a SERVER under a PRODUCER is not a pair.
        one.push(span(6, 60, 0, a, PRODUCER, true));
        two.push(span(6, 61, 60, b, CONSUMER, true));
        two.push(span(6, 62, 60, b, SERVER, true));
        let pieces = [
            Piece {
                remap: Arc::clone(&remap),
                spans: one,
            },
            Piece { remap, spans: two },
        ];
        let want: BTreeMap<_, _> = [
            ((user, a, false), (vec![100], 0)),
            ((user, b, false), (vec![200], 0)),
            ((a, b, false), (vec![110, 600], 0)),
            ((a, db, true), (vec![400], 1)),
        ]
        .into_iter()
        .collect();
        // The flat table and the hash map give the same.
        for names in [4, DENSE_NAMES + 1] {
            let t = pair_shard(&pieces, user, names, false, None);
            let got: BTreeMap<_, _> = t
                .entries
                .into_iter()
                .map(|((s, t, k, _), tally)| {
                    assert_eq!(tally.cells.len(), 1);
                    let mut c = tally.cells[0].clone();
                    c.latencies.sort_unstable();
                    ((s, t, k == NodeKind::Virtual), (c.latencies, c.errors))
                })
                .collect();
            assert_eq!(got, want, "{names} names");
        }
    }
}
