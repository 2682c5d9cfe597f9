//! What storage knows about a table: its name, its schema, the column that says when a row
//! happened, who writes it, and how its Parquet files are laid out.
//!
//! Storage has no table of its own in its code paths: the write path, compaction,
//! retention and the query node's listing all read a [`TableDef`]. The three OTLP signal
//! tables are defined here ([`SPANS`], [`LOGS`], [`METRICS`]: their schemas are the
//! contract's, in `meshscope_proto::schema`; their file layouts are storage's). A table
//! another stage derives (the query side's per-minute `rollups`) brings its own definition,
//! beside the code that computes it, and is opened with [`crate::Storage::open`].

use std::fmt;

use arrow::datatypes::SchemaRef;
use meshscope_proto::Table;
use parquet::basic::Encoding;

/// One table of a data directory (`<data-dir>/<name>/`, its log in `<data-dir>/wal/<name>/`).
#[derive(Debug)]
pub struct TableDef {
    /// The table's name in SQL and its folder.
    pub name: &'static str,
    pub schema: fn() -> SchemaRef,
    /// The timestamp column that orders rows in time: retention's age and `arrivals`.
    pub time_column: &'static str,
    pub source: Source,
    /// The files the write path flushes.
    pub flushed: FileRules,
    /// The files compaction writes (once, in the background, read by whole columns).
    pub compacted: FileRules,
}

/// Who writes a table, which decides how a query node of a split deployment opens it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// OTLP fills it through a collector: a query node reads every collector's files.
    Signal(Table),
    /// Computed from the other tables by whichever node serves queries, which writes it
    /// through its own log.
    Derived,
}

/// How one kind of file of a table is written.
#[derive(Debug, Clone, Copy)]
pub struct FileRules {
    /// The keys rows are sorted by: they cluster what queries look up together and make
    /// the encodings compress.
    pub sort: &'static [SortKey],
    /// Columns of (nearly) unique values: no dictionary, and the encoding that suits them.
    pub unique: &'static [(&'static str, Option<Encoding>)],
    /// Columns with a bloom filter per row group, for lookups by value.
    pub blooms: &'static [Bloom],
}

/// One key of a sort order.
#[derive(Debug, Clone, Copy)]
pub enum SortKey {
    Column(&'static str),
    /// The hour of a timestamp column.
    Hour(&'static str),
}

/// A bloom filter on one column, sized for the distinct values a row group holds.
#[derive(Debug, Clone, Copy)]
pub struct Bloom {
    pub column: &'static str,
    pub distinct: Distinct,
}

/// How many distinct values a bloom filter is sized for (the writer folds each filter
/// down to the values it saw).
#[derive(Debug, Clone, Copy)]
pub enum Distinct {
    /// One value per this many rows of a row group.
    RowsPer(usize),
    Fixed(u64),
}

impl TableDef {
    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn schema(&self) -> SchemaRef {
        (self.schema)()
    }

    pub fn time_column(&self) -> &'static str {
        self.time_column
    }

    /// The OTLP signal this table holds, if OTLP fills it.
    pub fn signal(&self) -> Option<Table> {
        match self.source {
            Source::Signal(t) => Some(t),
            Source::Derived => None,
        }
    }
}

impl fmt::Display for TableDef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

impl PartialEq for TableDef {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}
impl Eq for TableDef {}

/// The definition of an OTLP signal's table.
pub fn signal(table: Table) -> &'static TableDef {
    match table {
        Table::Spans => &SPANS,
        Table::Logs => &LOGS,
        Table::Metrics => &METRICS,
    }
}

/// The signal tables, in [`Table::ALL`]'s order.
pub const SIGNALS: [&TableDef; 3] = [&SPANS, &LOGS, &METRICS];

const DELTA: Option<Encoding> = Some(Encoding::DELTA_BINARY_PACKED);

/// Compacted files hold many services; a lookup by service skips the others.
const SERVICE_BLOOM: Bloom = Bloom {
    column: "service_name",
    distinct: Distinct::Fixed(1024),
};

/// Spans: flushed files keep a trace's spans side by side; compacted ones are sorted by
/// service and hour, each trace's spans still clustered.
pub static SPANS: TableDef = TableDef {
    name: "spans",
    schema: || Table::Spans.schema(),
    time_column: "start_time",
    source: Source::Signal(Table::Spans),
    flushed: FileRules {
        sort: &[SortKey::Column("trace_id"), SortKey::Column("start_time")],
        // Ids and times are nearly unique: a dictionary only costs. Times and durations
        // are delta-encoded; sorted trace ids share prefixes. (Measured on realistic mesh
        // spans: 42.8 -> 36.7 bytes per span at the same zstd level; see BENCHMARKS.md.)
        unique: &[
            ("trace_id", Some(Encoding::DELTA_BYTE_ARRAY)),
            ("span_id", None),
            ("parent_span_id", None),
            ("start_time", DELTA),
            ("end_time", DELTA),
            ("duration_ns", DELTA),
        ],
        // Sized for a trace of two spans per row group at most.
        blooms: &[Bloom {
            column: "trace_id",
            distinct: Distinct::RowsPer(2),
        }],
    },
    compacted: FileRules {
        sort: &[
            SortKey::Column("service_name"),
            SortKey::Hour("start_time"),
            SortKey::Column("trace_id"),
            SortKey::Column("start_time"),
        ],
        // Sorted by service, hour and trace, start and end times jump about within the
        // hour: zstd does better on the values split into byte streams (the high bytes of
        // nearby times alike; -0.6 bytes per span against plain values, -1.4 against
        // deltas), and span ids pack better with their lengths delta-encoded apart from
        // the digits (-1.3); so do trace ids, whose repeats (a trace's spans in one
        // service) zstd then finds whole (-0.5 against prefix sharing, and faster to
        // decode for a lookup). pyarrow, DuckDB, polars and parquet-java 1.14+ (Spark 4,
        // Trino) read BYTE_STREAM_SPLIT integers.
        unique: &[
            ("trace_id", Some(Encoding::DELTA_LENGTH_BYTE_ARRAY)),
            ("span_id", Some(Encoding::DELTA_LENGTH_BYTE_ARRAY)),
            ("parent_span_id", None),
            ("start_time", Some(Encoding::BYTE_STREAM_SPLIT)),
            ("end_time", Some(Encoding::BYTE_STREAM_SPLIT)),
            ("duration_ns", Some(Encoding::BYTE_STREAM_SPLIT)),
        ],
        blooms: &[
            Bloom {
                column: "trace_id",
                distinct: Distinct::RowsPer(2),
            },
            SERVICE_BLOOM,
        ],
    },
};

const LOG_FILES: FileRules = FileRules {
    sort: &[SortKey::Column("service_name"), SortKey::Column("time")],
    unique: &[
        ("time", DELTA),
        ("observed_time", DELTA),
        ("trace_id", None),
        ("span_id", None),
    ],
    blooms: &[Bloom {
        column: "trace_id",
        distinct: Distinct::RowsPer(1),
    }],
};

pub static LOGS: TableDef = TableDef {
    name: "logs",
    schema: || Table::Logs.schema(),
    time_column: "time",
    source: Source::Signal(Table::Logs),
    flushed: LOG_FILES,
    compacted: FileRules {
        blooms: &[
            Bloom {
                column: "trace_id",
                distinct: Distinct::RowsPer(1),
            },
            SERVICE_BLOOM,
        ],
        ..LOG_FILES
    },
};

const METRIC_FILES: FileRules = FileRules {
    sort: &[
        SortKey::Column("metric_name"),
        SortKey::Column("service_name"),
        SortKey::Column("time"),
    ],
    unique: &[("time", DELTA), ("start_time", DELTA)],
    blooms: &[],
};

pub static METRICS: TableDef = TableDef {
    name: "metrics",
    schema: || Table::Metrics.schema(),
    time_column: "time",
    source: Source::Signal(Table::Metrics),
    flushed: METRIC_FILES,
    compacted: METRIC_FILES,
};

#[cfg(test)]
mod tests {
    use super::*;

    /// Every column a layout names exists in the table's schema, and the time column is a
    /// timestamp.
    #[test]
    fn layouts_name_columns_of_their_schema() {
        for def in SIGNALS {
            let schema = def.schema();
            assert_eq!(
                schema
                    .field_with_name(def.time_column)
                    .expect("time column")
                    .data_type(),
                &meshscope_proto::schema::timestamp_type()
            );
            for rules in [def.flushed, def.compacted] {
                let sorted = rules.sort.iter().map(|k| match k {
                    SortKey::Column(c) | SortKey::Hour(c) => *c,
                });
                let unique = rules.unique.iter().map(|(c, _)| *c);
                let blooms = rules.blooms.iter().map(|b| b.column);
                for c in sorted.chain(unique).chain(blooms) {
                    assert!(schema.field_with_name(c).is_ok(), "{def}.{c}");
                }
            }
        }
        for t in Table::ALL {
            assert_eq!(signal(t).name, t.name());
            assert_eq!(signal(t).signal(), Some(t));
        }
    }
}
