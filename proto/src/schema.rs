//! The Arrow schemas of the three tables. Column names and types are the contract
//! (`interfaces.md`, "Tables"); every timestamp is `Timestamp(ns, UTC)`, ids are lowercase
//! hex strings and attribute maps are `Map<Utf8, Utf8>` readable as `attrs['key']`.

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, LazyLock};

use arrow::array::{MapBuilder, StringBuilder};
use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};

/// One of the tables OTLP fills. (Tables other stages derive from these, such as the
/// query side's `rollups`, define themselves beside the code that computes them.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    Spans,
    Logs,
    Metrics,
}

impl Table {
    pub const ALL: [Table; 3] = [Table::Spans, Table::Logs, Table::Metrics];

    /// The table's name in SQL and its folder under the data directory.
    pub fn name(self) -> &'static str {
        match self {
            Table::Spans => "spans",
            Table::Logs => "logs",
            Table::Metrics => "metrics",
        }
    }

    pub fn schema(self) -> SchemaRef {
        match self {
            Table::Spans => SPANS.clone(),
            Table::Logs => LOGS.clone(),
            Table::Metrics => METRICS.clone(),
        }
    }

    /// The column that says when a row happened (used to order and prune).
    pub fn time_column(self) -> &'static str {
        match self {
            Table::Spans => "start_time",
            Table::Logs | Table::Metrics => "time",
        }
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Table {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Table::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| format!("unknown table {s:?}"))
    }
}

/// `Timestamp(ns, UTC)`.
pub fn timestamp_type() -> DataType {
    DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into()))
}

/// `Map<Utf8, Utf8>` exactly as [`MapBuilder`] with its default field names builds it.
pub fn attribute_map_type() -> DataType {
    static TYPE: LazyLock<DataType> = LazyLock::new(|| {
        let mut b = MapBuilder::new(None, StringBuilder::new(), StringBuilder::new());
        arrow::array::Array::data_type(&b.finish()).clone()
    });
    TYPE.clone()
}

fn ts(name: &str, nullable: bool) -> Field {
    Field::new(name, timestamp_type(), nullable)
}
fn utf8(name: &str, nullable: bool) -> Field {
    Field::new(name, DataType::Utf8, nullable)
}
fn attrs(name: &str) -> Field {
    Field::new(name, attribute_map_type(), false)
}
fn list_of(name: &str, item: DataType) -> Field {
    Field::new(
        name,
        DataType::List(Arc::new(Field::new("item", item, true))),
        true,
    )
}

/// The struct of one span event inside `spans.events`.
pub fn event_fields() -> Fields {
    Fields::from(vec![
        ts("time", false),
        utf8("name", false),
        attrs("attributes"),
    ])
}

/// The struct of one span link inside `spans.links`.
pub fn link_fields() -> Fields {
    Fields::from(vec![
        utf8("trace_id", false),
        utf8("span_id", false),
        utf8("trace_state", true),
        attrs("attributes"),
    ])
}

static SPANS: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        ts("start_time", false),
        ts("end_time", false),
        Field::new("duration_ns", DataType::Int64, false),
        utf8("trace_id", false),
        utf8("span_id", false),
        utf8("parent_span_id", true),
        utf8("trace_state", true),
        utf8("service_name", false),
        utf8("service_namespace", true),
        // The resource's `service.version`: the graph's per-version breakdown.
        utf8("service_version", true),
        utf8("span_name", false),
        utf8("span_kind", false),
        utf8("status_code", false),
        utf8("status_message", true),
        utf8("http_method", true),
        utf8("http_route", true),
        Field::new("http_status_code", DataType::Int32, true),
        utf8("peer_service", true),
        utf8("server_address", true),
        // For CLIENT and PRODUCER spans: the peer as the service graph names it when the
        // span has no child (`convert::spans::PEER_ATTRIBUTES`, then Envoy's
        // upstream_cluster and the host of http.url / url.full), so the graph need not
        // search the attribute map.
        utf8("peer_name", true),
        // Why a proxy answered the request itself (`circuit-open`, `rate-limited`,
        // `fault-abort`, `timeout`, `connect-failed` …), from meshscope's
        // `meshscope.proxy_response` or Envoy's `response_flags`; null otherwise.
        utf8("proxy_reason", true),
        // `shadow` on both spans of a mirrored copy (the caller proxy's CLIENT span and
        // the shadow's SERVER span), `primary` on the caller's span of the request that
        // was copied, from `meshscope.mirror`; null otherwise. The graph and the golden
        // signals leave shadow spans out: nobody waited for them.
        utf8("mirror", true),
        utf8("scope_name", true),
        utf8("scope_version", true),
        attrs("span_attributes"),
        attrs("resource_attributes"),
        list_of("events", DataType::Struct(event_fields())),
        list_of("links", DataType::Struct(link_fields())),
    ]))
});

static LOGS: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        ts("time", false),
        ts("observed_time", false),
        utf8("trace_id", true),
        utf8("span_id", true),
        Field::new("severity_number", DataType::Int32, false),
        utf8("severity_text", true),
        utf8("service_name", false),
        utf8("body", true),
        utf8("event_name", true),
        attrs("log_attributes"),
        attrs("resource_attributes"),
        utf8("scope_name", true),
    ]))
});

static METRICS: LazyLock<SchemaRef> = LazyLock::new(|| {
    let f64_list = |n: &str| list_of(n, DataType::Float64);
    let i64_list = |n: &str| list_of(n, DataType::Int64);
    Arc::new(Schema::new(vec![
        ts("time", false),
        ts("start_time", true),
        utf8("service_name", false),
        utf8("metric_name", false),
        utf8("metric_description", true),
        utf8("metric_unit", true),
        utf8("metric_type", false),
        Field::new("is_monotonic", DataType::Boolean, true),
        utf8("temporality", true),
        attrs("attributes"),
        attrs("resource_attributes"),
        utf8("scope_name", true),
        Field::new("value", DataType::Float64, true),
        Field::new("count", DataType::Int64, true),
        Field::new("sum", DataType::Float64, true),
        Field::new("min", DataType::Float64, true),
        Field::new("max", DataType::Float64, true),
        i64_list("bucket_counts"),
        f64_list("explicit_bounds"),
        // exponential histograms
        Field::new("exp_scale", DataType::Int32, true),
        Field::new("exp_zero_count", DataType::Int64, true),
        Field::new("exp_zero_threshold", DataType::Float64, true),
        Field::new("exp_positive_offset", DataType::Int32, true),
        i64_list("exp_positive_bucket_counts"),
        Field::new("exp_negative_offset", DataType::Int32, true),
        i64_list("exp_negative_bucket_counts"),
        // summaries
        f64_list("quantiles"),
        f64_list("quantile_values"),
    ]))
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_round_trip_by_name_and_have_their_time_column() {
        for t in Table::ALL {
            assert_eq!(t.name().parse::<Table>(), Ok(t));
            let schema = t.schema();
            let f = schema
                .field_with_name(t.time_column())
                .expect("time column");
            assert_eq!(f.data_type(), &timestamp_type());
        }
        assert!("nope".parse::<Table>().is_err());
    }

    #[test]
    fn contract_columns_are_present() {
        let spans = Table::Spans.schema();
        for c in [
            "start_time",
            "end_time",
            "duration_ns",
            "trace_id",
            "span_id",
            "parent_span_id",
            "trace_state",
            "service_name",
            "service_namespace",
            "span_name",
            "span_kind",
            "status_code",
            "status_message",
            "http_method",
            "http_route",
            "http_status_code",
            "peer_service",
            "server_address",
            "scope_name",
            "scope_version",
            "span_attributes",
            "resource_attributes",
            "events",
            "links",
        ] {
            assert!(spans.field_with_name(c).is_ok(), "spans.{c}");
        }
        let logs = Table::Logs.schema();
        for c in [
            "time",
            "observed_time",
            "trace_id",
            "span_id",
            "severity_number",
            "severity_text",
            "service_name",
            "body",
            "log_attributes",
            "resource_attributes",
            "scope_name",
        ] {
            assert!(logs.field_with_name(c).is_ok(), "logs.{c}");
        }
        let metrics = Table::Metrics.schema();
        for c in [
            "time",
            "start_time",
            "service_name",
            "metric_name",
            "metric_description",
            "metric_unit",
            "metric_type",
            "is_monotonic",
            "temporality",
            "attributes",
            "resource_attributes",
            "value",
            "count",
            "sum",
            "min",
            "max",
            "bucket_counts",
            "explicit_bounds",
        ] {
            assert!(metrics.field_with_name(c).is_ok(), "metrics.{c}");
        }
    }
}
