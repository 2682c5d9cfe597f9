//! The service graph's edges from raw spans in one scan.
//!
//! The SQL form of the pairing ([`super::graph::requests_sql`]) reads the span files four
//! times and hash-joins 32-character hex ids. Here DataFusion scans the needed columns once,
//! and a plain function pairs them on binary ids (`u128` trace, `u64` span) in a hash map:
//!
//! 1. every span of the widened window goes into the map by `(trace, span)`;
//! 2. a SERVER (CONSUMER) span whose parent is a CLIENT (PRODUCER) span in the range is one
//!    request on the edge parent's service → its service, with the caller's latency;
//! 3. an in-range CLIENT or PRODUCER span left unpaired is a request to its virtual peer;
//! 4. an in-range SERVER span whose parent is not in the trace is a request from `user`.
//!
//! Percentiles are exact (sorted latencies, linear interpolation), as with `percentile_cont`.

use std::collections::HashMap;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Int64Type};

use super::graph::{NodeKind, Signals};
use super::range::TimeRange;
use crate::engine::{QueryEngine, QueryError};

const SERVER: u8 = 1;
const CLIENT: u8 = 2;
const PRODUCER: u8 = 3;
const CONSUMER: u8 = 4;

fn kind_code(s: &str) -> u8 {
    match s {
        "SERVER" => SERVER,
        "CLIENT" => CLIENT,
        "PRODUCER" => PRODUCER,
        "CONSUMER" => CONSUMER,
        _ => 0,
    }
}

fn hex_u128(s: &str) -> Option<u128> {
    u128::from_str_radix(s, 16).ok()
}

fn hex_u64(s: &str) -> Option<u64> {
    u64::from_str_radix(s, 16).ok()
}

struct Row {
    trace: u128,
    parent: Option<u64>,
    service: u32,
    kind: u8,
    error: bool,
    duration: i64,
    in_range: bool,
    peer: Option<u32>,
}

/// Interned strings (service and peer names).
#[derive(Default)]
struct Names {
    ids: HashMap<String, u32, ahash::RandomState>,
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

/// The columns the pairing reads, in this order.
pub(crate) fn scan_sql(range: &TimeRange, wide: &TimeRange) -> String {
    format!(
        "SELECT trace_id, span_id, parent_span_id, service_name, span_kind, status_code = 'ERROR' AS error, duration_ns,
                {inrange} AS in_range, peer_name AS peer
         FROM spans WHERE {wide}",
        inrange = range.sql("start_time"),
        wide = wide.sql("start_time"),
    )
}

fn utf8(b: &RecordBatch, i: usize) -> Result<arrow::array::StringArray, QueryError> {
    let col = b.column(i);
    let col = if col.data_type() == &DataType::Utf8 {
        col.clone()
    } else {
        arrow::compute::cast(col, &DataType::Utf8)
            .map_err(|e| QueryError::Internal(e.to_string()))?
    };
    Ok(col.as_string::<i32>().clone())
}

/// Edges `(source, target, target kind, signals)` from the scanned batches.
pub(crate) fn pair(
    batches: &[RecordBatch],
    seconds: f64,
) -> Result<Vec<(String, String, NodeKind, Signals)>, QueryError> {
    let total: usize = batches.iter().map(|b| b.num_rows()).sum();
    let mut rows: Vec<Row> = Vec::with_capacity(total);
    let mut index: HashMap<(u128, u64), u32, ahash::RandomState> =
        HashMap::with_capacity_and_hasher(total, ahash::RandomState::new());
    let mut names = Names::default();
    for b in batches {
        let (trace, span, parent, service, kind) = (
            utf8(b, 0)?,
            utf8(b, 1)?,
            utf8(b, 2)?,
            utf8(b, 3)?,
            utf8(b, 4)?,
        );
        let error = b.column(5).as_boolean().clone();
        let duration = b.column(6).as_primitive::<Int64Type>().clone();
        let in_range = b.column(7).as_boolean().clone();
        let peer = utf8(b, 8)?;
        for i in 0..b.num_rows() {
            let (Some(t), Some(s)) = (hex_u128(trace.value(i)), hex_u64(span.value(i))) else {
                continue;
            };
            let row = Row {
                trace: t,
                parent: if parent.is_null(i) {
                    None
                } else {
                    hex_u64(parent.value(i))
                },
                service: names.id(service.value(i)),
                kind: kind_code(kind.value(i)),
                error: error.is_valid(i) && error.value(i),
                duration: duration.value(i),
                in_range: in_range.is_valid(i) && in_range.value(i),
                peer: if peer.is_null(i) {
                    None
                } else {
                    Some(names.id(peer.value(i)))
                },
            };
            index.insert((t, s), rows.len() as u32);
            rows.push(row);
        }
    }

    // (source, target, kind) -> (latencies, errors)
    type Tally = (Vec<i64>, u64);
    let mut edges: HashMap<(u32, u32, NodeKind), Tally, ahash::RandomState> = HashMap::default();
    let user = names.id("user");
    let mut paired = vec![false; rows.len()];
    for r in &rows {
        if r.kind != SERVER && r.kind != CONSUMER {
            continue;
        }
        let parent = r
            .parent
            .and_then(|p| index.get(&(r.trace, p)))
            .map(|i| *i as usize);
        let caller_kind = if r.kind == SERVER { CLIENT } else { PRODUCER };
        match parent {
            Some(p) if rows[p].kind == caller_kind && rows[p].in_range => {
                paired[p] = true;
                let e = edges
                    .entry((rows[p].service, r.service, NodeKind::Service))
                    .or_default();
                e.0.push(rows[p].duration);
                e.1 += u64::from(rows[p].error || r.error);
            }
            Some(_) => {}
            None if r.kind == SERVER && r.in_range => {
                let e = edges
                    .entry((user, r.service, NodeKind::Service))
                    .or_default();
                e.0.push(r.duration);
                e.1 += u64::from(r.error);
            }
            None => {}
        }
    }
    for (i, r) in rows.iter().enumerate() {
        if (r.kind == CLIENT || r.kind == PRODUCER)
            && r.in_range
            && !paired[i]
            && let Some(peer) = r.peer
        {
            let e = edges
                .entry((r.service, peer, NodeKind::Virtual))
                .or_default();
            e.0.push(r.duration);
            e.1 += u64::from(r.error);
        }
    }
    Ok(edges
        .into_iter()
        .map(|((s, t, kind), (mut lat, errors))| {
            lat.sort_unstable();
            let requests = lat.len() as u64;
            let pct = |p: f64| {
                let rank = p * (lat.len() - 1) as f64;
                let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
                lat[lo] as f64 + (lat[hi] - lat[lo]) as f64 * (rank - lo as f64)
            };
            let signals = Signals::new(requests, errors, seconds, [pct(0.5), pct(0.95), pct(0.99)]);
            (
                names.names[s as usize].clone(),
                names.names[t as usize].clone(),
                kind,
                signals,
            )
        })
        .collect())
}

/// Scans once and pairs.
pub(crate) async fn edges(
    engine: &QueryEngine,
    range: &TimeRange,
) -> Result<Vec<(String, String, NodeKind, Signals)>, QueryError> {
    let wide = range.widened(chrono::Duration::minutes(super::graph::PAIR_WINDOW));
    let result = engine.sql(&scan_sql(range, &wide)).await?;
    let seconds = range.seconds();
    // The pairing is CPU-bound: run it on the query runtime's blocking pool.
    engine
        .executor()
        .spawn(async move { tokio::task::block_in_place(|| pair(&result.batches, seconds)) })
        .await
        .map_err(|e| QueryError::Internal(format!("pairing task failed: {e}")))?
}
