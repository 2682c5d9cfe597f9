//! Per-minute rollups: the golden signals of every service, endpoint and edge, kept as
//! mergeable aggregates (counts and a [`Sketch`]) in their own table, `rollups`.
//!
//! A background task rolls up each complete minute once it is [`Rollups::delay`] old (so
//! both halves of a pair have usually arrived): one DataFusion query per chunk of minutes
//! buckets the latencies by sketch key (vectorised), the rows are assembled into sketches
//! here and written through the same durable path as spans (log, then Parquet). Where it
//! stands is derived from the table itself (`max(minute)`), so a restart neither skips nor
//! repeats a minute. Spans arriving later than the delay are not in the rollups (they are
//! in the raw path, which short ranges use).
//!
//! Long ranges read the rollups and merge the sketches ([`aggregates`], [`by_minute`]); both paths agree
//! within the sketch's 1%.

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};

use arrow::array::{
    ArrayRef, Float64Builder, Int32Builder, Int64Builder, ListBuilder, RecordBatch, StringBuilder,
    TimestampNanosecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use chrono::{DateTime, Duration, DurationRound, Utc};
use meshscope_proto::schema::timestamp_type;
use meshscope_storage::Storage;
use meshscope_storage::table_def::{FileRules, SortKey, Source, TableDef};

use super::model::{Measure, NodeKind, Signals, USER};
use super::range::{TimeRange, ts_literal};
use super::sketch::{Sketch, key_sql};
use super::typed;
use crate::engine::{QueryEngine, QueryError};

/// Minutes rolled up by one query at most.
const CHUNK_MINUTES: i64 = 60;

/// One group of one minute.
#[derive(Debug, Clone, Default)]
pub struct Agg {
    pub requests: u64,
    pub errors: u64,
    pub latency_sum_ns: f64,
    pub sketch: Sketch,
}

impl Agg {
    pub fn merge(&mut self, other: &Agg) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.latency_sum_ns += other.latency_sum_ns;
        self.sketch.merge(&other.sketch);
    }

    pub fn signals(&self, seconds: f64) -> Signals {
        let q = |p: f64| self.sketch.quantile(p);
        Signals::new(
            self.requests,
            self.errors,
            seconds,
            [q(0.5), q(0.95), q(0.99)],
        )
    }
}

/// What one rollup row aggregates (the rollups table's key columns).
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    /// `service`, `endpoint` or `edge`.
    pub kind: String,
    /// The service, or the edge's caller (`user` for the entry point).
    pub source: String,
    /// The endpoint, or the edge's callee.
    pub target: Option<String>,
    /// For edges: `service` or `virtual`.
    pub target_kind: Option<String>,
    pub namespace: Option<String>,
    /// For edges: `user` (the entry point) or `service`.
    pub source_kind: Option<String>,
    /// The service's, or the edge's callee's, version.
    pub version: Option<String>,
    /// For edges: why a proxy answered these requests itself.
    pub reason: Option<String>,
}

/// The `rollups` table: one row per minute per service, endpoint or edge (and version and
/// proxy reason), written by the node that serves queries through its own log.
pub static TABLE: TableDef = TableDef {
    name: "rollups",
    schema,
    time_column: "minute",
    source: Source::Derived,
    flushed: FILES,
    compacted: FILES,
};

/// Read by kind and source over a range of minutes.
const FILES: FileRules = FileRules {
    sort: &[
        SortKey::Column("kind"),
        SortKey::Column("source"),
        SortKey::Column("minute"),
    ],
    unique: &[],
    blooms: &[],
};

/// The rollups' columns (the contract's `rollups` table).
pub fn schema() -> SchemaRef {
    static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
        let utf8 = |name: &str, nullable| Field::new(name, DataType::Utf8, nullable);
        let list_of = |name: &str, item| {
            Field::new(
                name,
                DataType::List(Arc::new(Field::new("item", item, true))),
                true,
            )
        };
        Arc::new(Schema::new(vec![
            Field::new("minute", timestamp_type(), false),
            // `service` (a service's own requests), `endpoint` (a service's route) or `edge`.
            utf8("kind", false),
            // The service, or the edge's source node.
            utf8("source", false),
            // The endpoint, or the edge's target node.
            utf8("target", true),
            // For edges: `service` or `virtual`.
            utf8("target_kind", true),
            utf8("namespace", true),
            // For edges: `user` when the source is the entry point, else `service` (null in
            // rollups written before versions: then `source = 'user'` is the entry point).
            utf8("source_kind", true),
            // A service's version, or an edge's callee version (`service.version`).
            utf8("version", true),
            // For edges: why a proxy answered these requests itself, when one did.
            utf8("reason", true),
            Field::new("requests", DataType::Int64, false),
            Field::new("errors", DataType::Int64, false),
            Field::new("latency_sum_ns", DataType::Float64, false),
            // The latency sketch: bucket keys and their counts (see [`Sketch`]).
            list_of("sketch_keys", DataType::Int32),
            list_of("sketch_counts", DataType::Int64),
        ]))
    });
    Arc::clone(&SCHEMA)
}

/// The background roller.
#[derive(Debug, Clone)]
pub struct Rollups {
    engine: QueryEngine,
    storage: Storage,
    pub delay: Duration,
}

fn minute_floor(t: DateTime<Utc>) -> DateTime<Utc> {
    t.duration_trunc(Duration::minutes(1)).unwrap_or(t)
}

/// One nullable timestamp (nanoseconds) read back from SQL: `min(…)` or `max(…)`.
#[derive(serde::Deserialize)]
struct Instant {
    ns: Option<i64>,
}

async fn instant(engine: &QueryEngine, sql: &str) -> Result<Option<DateTime<Utc>>, QueryError> {
    Ok(typed::<Instant>(engine, sql)
        .await?
        .first()
        .and_then(|r| r.ns)
        .map(DateTime::from_timestamp_nanos))
}

impl Rollups {
    pub fn new(engine: QueryEngine, storage: Storage, delay: Duration) -> Self {
        Rollups {
            engine,
            storage,
            delay,
        }
    }

    /// Rolls up every complete minute older than the delay that is not rolled up yet.
    /// Returns how many minutes with data it wrote.
    pub async fn run_once(&self, now: DateTime<Utc>) -> Result<usize, QueryError> {
        let limit = minute_floor(now - self.delay);
        let mut cursor = Rollups::covered_until(&self.engine)
            .await?
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        let mut written = 0;
        while cursor < limit {
            // Jump over minutes without spans.
            let next = instant(
                &self.engine,
                &format!(
                    "SELECT CAST(min(start_time) AS BIGINT) AS ns FROM spans WHERE start_time >= {} AND start_time < {}",
                    ts_literal(cursor.max(DateTime::from_timestamp_nanos(0))),
                    ts_literal(limit)
                ),
            )
            .await?;
            let Some(first) = next else {
                break;
            };
            let start = minute_floor(first);
            let end = (start + Duration::minutes(CHUNK_MINUTES)).min(limit);
            let range = TimeRange { start, end };
            let batch = self.chunk(&range).await?;
            written += batch.as_ref().map(|(_, minutes)| *minutes).unwrap_or(0);
            if let Some((batch, _)) = batch {
                self.storage
                    .named(TABLE.name)
                    .ok_or_else(|| QueryError::Internal("the rollups table is not open".into()))?
                    .write(batch)
                    .await
                    .map_err(|e| QueryError::Internal(format!("writing rollups: {e}")))?;
            }
            cursor = end;
        }
        Ok(written)
    }

    /// The rollup rows of `range` (whole minutes), and how many minutes had data.
    async fn chunk(&self, range: &TimeRange) -> Result<Option<(RecordBatch, usize)>, QueryError> {
        let groups = groups_from_spans(&self.engine, range).await?;
        if groups.is_empty() {
            return Ok(None);
        }
        let minutes = groups
            .keys()
            .map(|(m, _)| *m)
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        let batch = to_batch(&groups).map_err(|e| QueryError::Internal(e.to_string()))?;
        Ok(Some((batch, minutes)))
    }

    /// The minute up to which rollups exist (exclusive), if any.
    pub async fn covered_until(engine: &QueryEngine) -> Result<Option<DateTime<Utc>>, QueryError> {
        let last = instant(
            engine,
            "SELECT CAST(max(minute) AS BIGINT) AS ns FROM rollups",
        )
        .await?;
        Ok(last.map(|m| m + Duration::minutes(1)))
    }
}

/// Per minute and group, the aggregates of the spans in `range`, computed from raw spans
/// with the latencies bucketed by sketch key inside DataFusion.
pub async fn groups_from_spans(
    engine: &QueryEngine,
    range: &TimeRange,
) -> Result<BTreeMap<(DateTime<Utc>, Key), Agg>, QueryError> {
    let minute = "date_bin(INTERVAL '1 minute', start_time, TIMESTAMP '1970-01-01T00:00:00Z')";
    // Edges come from the same pairing as the graph (one scan, paired in memory), bucketed
    // by the minute each request started.
    let edge_minutes = super::pairing::requests_by_minute(engine, range).await?;
    /// One (minute, service, endpoint, version, sketch key) group of served spans.
    #[derive(serde::Deserialize)]
    struct EndpointRow {
        minute_ns: i64,
        service_name: String,
        endpoint: String,
        version: Option<String>,
        namespace: Option<String>,
        k: i64,
        n: i64,
        errors: i64,
        sum_ns: Option<f64>,
    }
    let endpoint_rows = typed::<EndpointRow>(
        engine,
        &format!(
            "SELECT CAST({minute} AS BIGINT) AS minute_ns, service_name, {endpoint} AS endpoint, service_version AS version,
                    max(service_namespace) AS namespace, CAST({k} AS BIGINT) AS k, count(*) AS n,
                    sum(CASE WHEN status_code = 'ERROR' THEN 1 ELSE 0 END) AS errors,
                    sum(CAST(duration_ns AS DOUBLE)) AS sum_ns
             FROM spans WHERE {r} AND {served} GROUP BY 1, 2, 3, 4, 6",
            endpoint = super::model::ENDPOINT_SQL,
            k = key_sql("duration_ns"),
            r = range.sql("start_time"),
            served = super::model::SERVED_SQL,
        ),
    )
    .await?;
    let mut groups: BTreeMap<(DateTime<Utc>, Key), Agg> = BTreeMap::new();
    for e in edge_minutes {
        if e.minute < range.start || e.minute >= range.end {
            continue;
        }
        let key = Key {
            kind: "edge".to_string(),
            source_kind: Some(
                if e.source.is_some() {
                    "service"
                } else {
                    "user"
                }
                .to_string(),
            ),
            source: e.source.unwrap_or_else(|| USER.to_string()),
            target: Some(e.target),
            target_kind: Some(
                match e.target_kind {
                    NodeKind::Virtual => "virtual",
                    _ => "service",
                }
                .to_string(),
            ),
            namespace: None,
            version: e.version,
            reason: e.reason,
        };
        let a = groups.entry((e.minute, key)).or_default();
        a.requests += e.latencies_ns.len() as u64;
        a.errors += e.errors;
        for ns in e.latencies_ns {
            a.latency_sum_ns += ns as f64;
            a.sketch.add(ns as f64);
        }
    }
    for r in endpoint_rows {
        let minute = DateTime::from_timestamp_nanos(r.minute_ns);
        let n = u64::try_from(r.n).unwrap_or(0);
        let service = Key {
            kind: "service".into(),
            source: r.service_name.clone(),
            namespace: r.namespace.clone(),
            version: r.version,
            ..Key::default()
        };
        let endpoint = Key {
            kind: "endpoint".into(),
            source: r.service_name,
            target: Some(r.endpoint),
            namespace: r.namespace,
            ..Key::default()
        };
        for key in [endpoint, service] {
            let a = groups.entry((minute, key)).or_default();
            a.requests += n;
            a.errors += u64::try_from(r.errors).unwrap_or(0);
            a.latency_sum_ns += r.sum_ns.unwrap_or(0.0);
            a.sketch.add_bucket(r.k as i32, n);
        }
    }
    Ok(groups)
}

fn to_batch(
    groups: &BTreeMap<(DateTime<Utc>, Key), Agg>,
) -> Result<RecordBatch, arrow::error::ArrowError> {
    let mut minute = TimestampNanosecondBuilder::new().with_timezone("UTC");
    let (mut kind, mut source, mut target, mut tkind, mut ns) = (
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
    );
    let (mut skind, mut version, mut reason) = (
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
    );
    let (mut requests, mut errors, mut sum) = (
        Int64Builder::new(),
        Int64Builder::new(),
        Float64Builder::new(),
    );
    let mut keys = ListBuilder::new(Int32Builder::new());
    let mut counts = ListBuilder::new(Int64Builder::new());
    for ((m, key), agg) in groups {
        minute.append_value(m.timestamp_nanos_opt().unwrap_or(0));
        kind.append_value(&key.kind);
        source.append_value(&key.source);
        target.append_option(key.target.as_deref());
        tkind.append_option(key.target_kind.as_deref());
        ns.append_option(key.namespace.as_deref());
        skind.append_option(key.source_kind.as_deref());
        version.append_option(key.version.as_deref());
        reason.append_option(key.reason.as_deref());
        requests.append_value(i64::try_from(agg.requests).unwrap_or(i64::MAX));
        errors.append_value(i64::try_from(agg.errors).unwrap_or(i64::MAX));
        sum.append_value(agg.latency_sum_ns);
        let (ks, cs) = agg.sketch.parts();
        keys.append_value(ks.into_iter().map(Some));
        counts.append_value(cs.into_iter().map(Some));
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(minute.finish()),
        Arc::new(kind.finish()),
        Arc::new(source.finish()),
        Arc::new(target.finish()),
        Arc::new(tkind.finish()),
        Arc::new(ns.finish()),
        Arc::new(skind.finish()),
        Arc::new(version.finish()),
        Arc::new(reason.finish()),
        Arc::new(requests.finish()),
        Arc::new(errors.finish()),
        Arc::new(sum.finish()),
        Arc::new(keys.finish()),
        Arc::new(counts.finish()),
    ];
    RecordBatch::try_new(schema(), columns)
}

/// The aggregates of `range` per key, merged over its minutes: the stored rollups of
/// every whole minute they cover, plus the minutes after them computed from raw spans
/// into the same sketches.
pub async fn aggregates(
    engine: &QueryEngine,
    range: &TimeRange,
) -> Result<BTreeMap<Key, Agg>, QueryError> {
    // Straight into one aggregate per key: a long range's rollup rows (minutes × keys) are
    // never held per minute.
    let mut out: BTreeMap<Key, Agg> = BTreeMap::new();
    let (stored_part, raw_part) = split_at_covered(engine, range).await?;
    if let Some(r) = stored_part {
        stored(engine, &r, |_, key, agg| {
            out.entry(key).or_default().merge(&agg)
        })
        .await?;
    }
    if let Some(r) = raw_part {
        for ((_, key), agg) in groups_from_spans(engine, &r).await? {
            out.entry(key).or_default().merge(&agg);
        }
    }
    Ok(out)
}

/// `range` (from its first whole minute) split where the stored rollups end: the part they
/// cover and the part after, to be read from raw spans.
async fn split_at_covered(
    engine: &QueryEngine,
    range: &TimeRange,
) -> Result<(Option<TimeRange>, Option<TimeRange>), QueryError> {
    let start = minute_floor(range.start);
    let covered = Rollups::covered_until(engine)
        .await?
        .unwrap_or(start)
        .clamp(start, range.end);
    Ok((
        (covered > start).then_some(TimeRange {
            start,
            end: covered,
        }),
        (covered < range.end).then_some(TimeRange {
            start: covered,
            end: range.end,
        }),
    ))
}

/// The aggregates of `range` per minute and key: stored rollups where they exist, raw
/// spans (the same pairing) for the minutes after them.
pub async fn by_minute(
    engine: &QueryEngine,
    range: &TimeRange,
) -> Result<BTreeMap<(DateTime<Utc>, Key), Agg>, QueryError> {
    let mut out: BTreeMap<(DateTime<Utc>, Key), Agg> = BTreeMap::new();
    let (stored_part, raw_part) = split_at_covered(engine, range).await?;
    if let Some(r) = stored_part {
        stored(engine, &r, |minute, key, agg| {
            out.entry((minute, key)).or_default().merge(&agg)
        })
        .await?;
    }
    if let Some(r) = raw_part {
        for ((minute, key), agg) in groups_from_spans(engine, &r).await? {
            out.entry((minute, key)).or_default().merge(&agg);
        }
    }
    Ok(out)
}

/// The stored rollups of every whole minute in `range`, each row handed to `sink` with its
/// minute and key.
async fn stored(
    engine: &QueryEngine,
    range: &TimeRange,
    mut sink: impl FnMut(DateTime<Utc>, Key, Agg),
) -> Result<(), QueryError> {
    /// One stored rollup row.
    #[derive(serde::Deserialize)]
    struct RollupRow {
        minute_ns: i64,
        kind: String,
        source: String,
        target: Option<String>,
        target_kind: Option<String>,
        namespace: Option<String>,
        source_kind: Option<String>,
        version: Option<String>,
        reason: Option<String>,
        requests: i64,
        errors: i64,
        latency_sum_ns: f64,
        sketch_keys: Option<Vec<Option<i64>>>,
        sketch_counts: Option<Vec<Option<i64>>>,
    }
    let rs = typed::<RollupRow>(
        engine,
        &format!(
            "SELECT CAST(minute AS BIGINT) AS minute_ns, kind, source, target, target_kind, namespace,
                    source_kind, version, reason, requests, errors, latency_sum_ns, sketch_keys, sketch_counts
             FROM rollups WHERE {}",
            range.sql("minute")
        ),
    )
    .await?;
    for r in rs {
        let minute = DateTime::from_timestamp_nanos(r.minute_ns);
        let key = Key {
            kind: r.kind,
            source: r.source,
            target: r.target,
            target_kind: r.target_kind,
            namespace: r.namespace,
            source_kind: r.source_kind,
            version: r.version,
            reason: r.reason,
        };
        let flat = |v: Option<Vec<Option<i64>>>| -> Vec<i64> {
            v.unwrap_or_default().into_iter().flatten().collect()
        };
        let agg = Agg {
            requests: u64::try_from(r.requests).unwrap_or(0),
            errors: u64::try_from(r.errors).unwrap_or(0),
            latency_sum_ns: r.latency_sum_ns,
            sketch: Sketch::from_parts(&flat(r.sketch_keys), &flat(r.sketch_counts)),
        };
        sink(minute, key, agg);
    }
    Ok(())
}
impl Measure for Agg {
    fn absorb(&mut self, other: Agg) {
        self.merge(&other);
    }

    fn requests(&self) -> u64 {
        self.requests
    }

    fn signals(&mut self, seconds: f64) -> Signals {
        Agg::signals(self, seconds)
    }
}
