//! The service graph from raw spans: one parallel scan, paired in Rust.
//!
//! The SQL form of the pairing ([`super::graph::requests_sql`]) reads the span files four
//! times and hash-joins 32-character hex ids. Here DataFusion scans the needed columns once
//! (its partitions decoded concurrently), and plain functions pair them on binary ids:
//!
//! 1. **decode** (one task per scan partition): each span becomes a 56-byte [`Span`] (ids
//!    parsed from hex, service and peer names interned), put in one of [`SHARDS`] shards by
//!    its trace id, so that a trace's spans all land in the same shard; the per-service
//!    signals (SERVER and CONSUMER spans of the range) are tallied on the way;
//! 2. **pair** (one task per shard): every span of the widened window goes into a hash map
//!    by `(trace, span)`; a SERVER (CONSUMER) span whose parent is a CLIENT (PRODUCER) span
//!    in the range is one request on the edge parent's service → its service, with the
//!    caller's latency; an in-range CLIENT or PRODUCER span left unpaired is a request to its
//!    virtual peer; an in-range SERVER span whose parent is not in the trace is a request
//!    from `user`;
//! 3. **merge**: the shards' latencies per edge are joined and their percentiles taken by
//!    selection (linear interpolation between the closest ranks, as `percentile_cont`),
//!    which is linear where a sort is not.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Int64Type, TimestampNanosecondType};
use futures::StreamExt;

use super::graph::{NodeKind, Signals};
use super::range::TimeRange;
use crate::engine::{QueryEngine, QueryError};

const SERVER: u8 = 1;
const CLIENT: u8 = 2;
const PRODUCER: u8 = 3;
const CONSUMER: u8 = 4;

const ERROR: u8 = 1;
const IN_RANGE: u8 = 2;

/// Shards of the pairing; a trace's spans all go to one.
pub(crate) const SHARDS: usize = 16;

/// No peer name.
const NO_PEER: u32 = u32::MAX;

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

/// Up to 16 hex digits as a number; `None` when empty, too long or not hex.
fn hex_u64(s: &[u8]) -> Option<u64> {
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

/// One span as the pairing needs it.
#[derive(Debug, Clone, Copy)]
struct Span {
    trace: [u64; 2],
    span: u64,
    /// 0 for none (0 is not a valid span id).
    parent: u64,
    duration: i64,
    service: u32,
    peer: u32,
    kind: u8,
    flags: u8,
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

/// A service's own requests (SERVER and CONSUMER spans of the range).
#[derive(Debug, Default)]
struct Own {
    durations: Vec<i64>,
    errors: u64,
    namespace: Option<String>,
}

/// What one scan partition decoded.
#[derive(Default)]
struct Decoded {
    names: Names,
    shards: Vec<Vec<Span>>,
    /// By local service id.
    own: Vec<Own>,
}

/// The columns the decoder reads, in this order.
fn scan_sql(wide: &TimeRange) -> String {
    format!(
        "SELECT trace_id, span_id, parent_span_id, service_name, service_namespace, span_kind,
                status_code, duration_ns, start_time, peer_name
         FROM spans WHERE {}",
        wide.sql("start_time"),
    )
}

fn utf8(b: &RecordBatch, i: usize) -> Result<StringArray, QueryError> {
    let col = b.column(i);
    let col = if col.data_type() == &DataType::Utf8 {
        Arc::clone(col)
    } else {
        arrow::compute::cast(col, &DataType::Utf8)
            .map_err(|e| QueryError::Internal(e.to_string()))?
    };
    Ok(col.as_string::<i32>().clone())
}

impl Decoded {
    fn new() -> Self {
        Decoded {
            shards: (0..SHARDS).map(|_| Vec::new()).collect(),
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

    fn add(&mut self, b: &RecordBatch, (lo, hi): (i64, i64)) -> Result<(), QueryError> {
        let (trace, span, parent, service, namespace, kind, status, peer) = (
            utf8(b, 0)?,
            utf8(b, 1)?,
            utf8(b, 2)?,
            utf8(b, 3)?,
            utf8(b, 4)?,
            utf8(b, 5)?,
            utf8(b, 6)?,
            utf8(b, 9)?,
        );
        let duration = b.column(7).as_primitive::<Int64Type>();
        let start = b.column(8).as_primitive::<TimestampNanosecondType>();
        // Names repeat in runs (files are sorted by service): remember the last one.
        let mut last_service: (&str, u32) = ("", u32::MAX);
        for i in 0..b.num_rows() {
            let name = service.value(i);
            let svc = if last_service.1 != u32::MAX && last_service.0 == name {
                last_service.1
            } else {
                let id = self.service(name);
                last_service = (name, id);
                id
            };
            let k = kind_code(kind.value(i).as_bytes());
            let error = status.value(i) == "ERROR";
            let t = start.value(i);
            let in_range = t >= lo && t < hi;
            let d = duration.value(i);
            if in_range && (k == SERVER || k == CONSUMER) {
                let own = &mut self.own[svc as usize];
                own.durations.push(d);
                own.errors += u64::from(error);
                if !namespace.is_null(i) {
                    let ns = namespace.value(i);
                    if own.namespace.as_deref().is_none_or(|cur| ns > cur) {
                        own.namespace = Some(ns.to_string());
                    }
                }
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
            let peer = if (k == CLIENT || k == PRODUCER) && in_range && !peer.is_null(i) {
                self.names.id(peer.value(i))
            } else {
                NO_PEER
            };
            self.shards[shard_of(tr)].push(Span {
                trace: tr,
                span: sp,
                parent: par,
                duration: d,
                service: svc,
                peer,
                kind: k,
                flags: if error { ERROR } else { 0 } | if in_range { IN_RANGE } else { 0 },
            });
        }
        Ok(())
    }
}

/// (source, target, kind) → (latencies, errors), over global name ids.
type Tallies = HashMap<(u32, u32, NodeKind), (Vec<i64>, u64), Hasher>;

/// Pairs the spans of one shard (all spans of its traces).
fn pair_shard(spans: &[Span], user: u32) -> Tallies {
    let mut index: HashMap<(u64, u64, u64), u32, Hasher> =
        HashMap::with_capacity_and_hasher(spans.len(), Hasher::new());
    for (i, s) in spans.iter().enumerate() {
        index.insert((s.trace[0], s.trace[1], s.span), i as u32);
    }
    let mut tallies = Tallies::default();
    let mut paired = vec![false; spans.len()];
    for r in spans {
        if r.kind != SERVER && r.kind != CONSUMER {
            continue;
        }
        let parent = if r.parent == 0 {
            None
        } else {
            index
                .get(&(r.trace[0], r.trace[1], r.parent))
                .map(|i| *i as usize)
        };
        let caller_kind = if r.kind == SERVER { CLIENT } else { PRODUCER };
        match parent {
            Some(p) if spans[p].kind == caller_kind && spans[p].flags & IN_RANGE != 0 => {
                let c = &spans[p];
                paired[p] = true;
                let e = tallies
                    .entry((c.service, r.service, NodeKind::Service))
                    .or_default();
                e.0.push(c.duration);
                e.1 += u64::from((c.flags | r.flags) & ERROR != 0);
            }
            Some(_) => {}
            None if r.kind == SERVER && r.flags & IN_RANGE != 0 => {
                let e = tallies
                    .entry((user, r.service, NodeKind::Service))
                    .or_default();
                e.0.push(r.duration);
                e.1 += u64::from(r.flags & ERROR != 0);
            }
            None => {}
        }
    }
    for (s, was_paired) in spans.iter().zip(paired) {
        if s.peer != NO_PEER && !was_paired {
            let e = tallies
                .entry((s.service, s.peer, NodeKind::Virtual))
                .or_default();
            e.0.push(s.duration);
            e.1 += u64::from(s.flags & ERROR != 0);
        }
    }
    tallies
}

/// p50, p95 and p99 of `values` (reordered), interpolated as `percentile_cont`.
pub(crate) fn percentiles(values: &mut [i64]) -> [f64; 3] {
    let n = values.len();
    if n == 0 {
        return [0.0; 3];
    }
    let mut out = [0.0; 3];
    // Each selection leaves everything at or above its rank to its right, so the next,
    // higher rank is looked for only there.
    let mut from = 0;
    for (o, p) in out.iter_mut().zip([0.5, 0.95, 0.99]) {
        let rank = p * (n - 1) as f64;
        let lo = rank.floor() as usize;
        let (_, at, right) = values[from..].select_nth_unstable(lo - from);
        let a = *at;
        let b = if rank > lo as f64 {
            right.iter().copied().min().unwrap_or(a)
        } else {
            a
        };
        *o = a as f64 + (b - a) as f64 * (rank - lo as f64);
        from = lo;
    }
    out
}

/// The graph's ingredients from raw spans.
pub(crate) struct FromSpans {
    /// `(source, target, target kind, signals)`.
    pub edges: Vec<(String, String, NodeKind, Signals)>,
    /// `(service, namespace, signals)` of each service's own requests.
    pub services: Vec<(String, Option<String>, Signals)>,
}

/// Scans the range (widened by the pairing window) once and pairs.
pub(crate) async fn analyse(
    engine: &QueryEngine,
    range: &TimeRange,
) -> Result<FromSpans, QueryError> {
    let wide = range.widened(chrono::Duration::minutes(super::graph::PAIR_WINDOW));
    let ns = |t: chrono::DateTime<chrono::Utc>| t.timestamp_nanos_opt().unwrap_or(i64::MAX);
    let bounds = (ns(range.start), ns(range.end));
    let seconds = range.seconds();
    let ctx = Arc::clone(engine.context());
    let sql = scan_sql(&wide);
    engine
        .executor()
        .spawn(async move {
            let started = std::time::Instant::now();
            let streams = ctx.sql(&sql).await?.execute_stream_partitioned().await?;
            let tasks: Vec<_> = streams
                .into_iter()
                .map(|mut stream| {
                    tokio::spawn(async move {
                        let mut d = Decoded::new();
                        while let Some(batch) = stream.next().await {
                            d.add(&batch?, bounds)?;
                        }
                        Ok::<_, QueryError>(d)
                    })
                })
                .collect();
            let mut parts = Vec::with_capacity(tasks.len());
            for t in tasks {
                parts.push(join(t).await??);
            }
            let scanned = started.elapsed();
            let found = merge(parts, seconds).await;
            tracing::debug!(
                scan_ms = scanned.as_millis() as u64,
                pair_ms = (started.elapsed() - scanned).as_millis() as u64,
                "graph from raw spans"
            );
            found
        })
        .await
        .map_err(|e| QueryError::Internal(format!("graph task failed: {e}")))?
}

async fn join<T>(t: tokio::task::JoinHandle<T>) -> Result<T, QueryError> {
    t.await
        .map_err(|e| QueryError::Internal(format!("graph task failed: {e}")))
}

/// Gives every partition's names global ids, pairs the shards in parallel and merges.
async fn merge(parts: Vec<Decoded>, seconds: f64) -> Result<FromSpans, QueryError> {
    let mut names = Names::default();
    let user = names.id("user");
    let remaps: Vec<Arc<Vec<u32>>> = parts
        .iter()
        .map(|p| Arc::new(p.names.names.iter().map(|n| names.id(n)).collect()))
        .collect();

    // Per-service signals.
    let mut own: HashMap<u32, Own, Hasher> = HashMap::default();
    let mut shards: Vec<Vec<(Arc<Vec<u32>>, Vec<Span>)>> =
        (0..SHARDS).map(|_| Vec::new()).collect();
    for (part, remap) in parts.into_iter().zip(&remaps) {
        for (local, o) in part.own.into_iter().enumerate() {
            if o.durations.is_empty() {
                continue;
            }
            let g = own.entry(remap[local]).or_default();
            g.durations.extend(o.durations);
            g.errors += o.errors;
            if o.namespace > g.namespace {
                g.namespace = o.namespace;
            }
        }
        for (i, spans) in part.shards.into_iter().enumerate() {
            shards[i].push((Arc::clone(remap), spans));
        }
    }

    let tasks: Vec<_> = shards
        .into_iter()
        .map(|pieces| {
            tokio::spawn(async move {
                let mut spans: Vec<Span> =
                    Vec::with_capacity(pieces.iter().map(|p| p.1.len()).sum());
                for (remap, piece) in pieces {
                    spans.extend(piece.into_iter().map(|mut s| {
                        s.service = remap[s.service as usize];
                        if s.peer != NO_PEER {
                            s.peer = remap[s.peer as usize];
                        }
                        s
                    }));
                }
                pair_shard(&spans, user)
            })
        })
        .collect();
    let mut tallies = Tallies::default();
    for t in tasks {
        for (key, (lat, errors)) in join(t).await? {
            let e = tallies.entry(key).or_default();
            if e.0.is_empty() {
                e.0 = lat;
            } else {
                e.0.extend(lat);
            }
            e.1 += errors;
        }
    }

    let name = |i: u32| names.names[i as usize].clone();
    let edges = tallies
        .into_iter()
        .map(|((s, t, kind), (mut lat, errors))| {
            let p = percentiles(&mut lat);
            (
                name(s),
                name(t),
                kind,
                Signals::new(lat.len() as u64, errors, seconds, p),
            )
        })
        .collect();
    let services = own
        .into_iter()
        .map(|(s, mut o)| {
            let p = percentiles(&mut o.durations);
            (
                name(s),
                o.namespace,
                Signals::new(o.durations.len() as u64, o.errors, seconds, p),
            )
        })
        .collect();
    Ok(FromSpans { edges, services })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_ids_parse_in_either_case_and_refuse_the_rest() {
        assert_eq!(hex_u64(b"00f067aa0ba902b7"), Some(0x00f0_67aa_0ba9_02b7));
        assert_eq!(hex_u64(b"00F067AA0BA902B7"), Some(0x00f0_67aa_0ba9_02b7));
        assert_eq!(hex_u64(b"0g"), None);
        assert_eq!(hex_u64(b""), None);
        assert_eq!(hex_u64(b"00000000000000001"), None);
        assert_eq!(
            hex_u128(b"4bf92f3577b34da6a3ce929d0e0e4736"),
            Some([0x4bf9_2f35_77b3_4da6, 0xa3ce_929d_0e0e_4736])
        );
        assert_eq!(hex_u128(b"ff"), Some([0, 0xff]));
        assert_eq!(hex_u128(b"4bf92f3577b34da6a3ce929d0e0e4736ff"), None);
    }

    /// The selection gives what sorting and interpolating gives.
    #[test]
    fn percentiles_match_sorting() {
        let mut seed = 7u64;
        for n in [1usize, 2, 3, 10, 101, 1000, 4097] {
            let values: Vec<i64> = (0..n)
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (seed >> 40) as i64 % 5000
                })
                .collect();
            let mut sorted = values.clone();
            sorted.sort_unstable();
            let want = [0.5, 0.95, 0.99].map(|p| {
                let rank = p * (n - 1) as f64;
                let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
                sorted[lo] as f64 + (sorted[hi] - sorted[lo]) as f64 * (rank - lo as f64)
            });
            let mut v = values;
            assert_eq!(percentiles(&mut v), want, "n = {n}");
        }
        assert_eq!(percentiles(&mut []), [0.0; 3]);
    }
}
