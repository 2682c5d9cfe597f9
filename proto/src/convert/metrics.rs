//! `ExportMetricsServiceRequest` -> `metrics` batch: one row per data point.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanBuilder, Float64Builder, Int32Builder, Int64Builder, ListBuilder,
    StringBuilder, TimestampNanosecondBuilder,
};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, ExponentialHistogramDataPoint, HistogramDataPoint, Metric,
    NumberDataPoint, SummaryDataPoint, exponential_histogram_data_point::Buckets, metric::Data,
    number_data_point,
};

use super::attributes::{AttrBuilder, append_attrs, attr_builder};
use super::spans::{non_empty, service_name};
use super::{Converted, Rejections, ts_ns};
use crate::schema::Table;

/// The per-row columns, appended one data point at a time.
struct Rows {
    time: TimestampNanosecondBuilder,
    start_time: TimestampNanosecondBuilder,
    service: StringBuilder,
    name: StringBuilder,
    description: StringBuilder,
    unit: StringBuilder,
    kind: StringBuilder,
    monotonic: BooleanBuilder,
    temporality: StringBuilder,
    attrs: AttrBuilder,
    res_attrs: AttrBuilder,
    scope_name: StringBuilder,
    value: Float64Builder,
    count: Int64Builder,
    sum: Float64Builder,
    min: Float64Builder,
    max: Float64Builder,
    bucket_counts: ListBuilder<Int64Builder>,
    explicit_bounds: ListBuilder<Float64Builder>,
    exp_scale: Int32Builder,
    exp_zero_count: Int64Builder,
    exp_zero_threshold: Float64Builder,
    exp_pos_offset: Int32Builder,
    exp_pos_counts: ListBuilder<Int64Builder>,
    exp_neg_offset: Int32Builder,
    exp_neg_counts: ListBuilder<Int64Builder>,
    quantiles: ListBuilder<Float64Builder>,
    quantile_values: ListBuilder<Float64Builder>,
}

/// What the common columns of one data point hold.
struct Point<'a> {
    metric: &'a Metric,
    kind: &'static str,
    monotonic: Option<bool>,
    temporality: Option<&'static str>,
    attributes: &'a [KeyValue],
    start: u64,
    time: u64,
}

impl<'a> Point<'a> {
    fn of(
        metric: &'a Metric,
        kind: &'static str,
        monotonic: Option<bool>,
        temporality: Option<&'static str>,
        dp: &'a dyn DataPoint,
    ) -> Point<'a> {
        let (start, time) = dp.times();
        Point {
            metric,
            kind,
            monotonic,
            temporality,
            attributes: dp.attributes(),
            start,
            time,
        }
    }
}

/// An exponential histogram's scale, zero count, zero threshold and bucket ranges.
type ExpParts<'a> = (i32, u64, f64, Option<&'a Buckets>, Option<&'a Buckets>);

/// The type-specific columns of one data point.
#[derive(Default)]
struct Values<'a> {
    value: Option<f64>,
    count: Option<u64>,
    sum: Option<f64>,
    min: Option<f64>,
    max: Option<f64>,
    bucket_counts: Option<&'a [u64]>,
    explicit_bounds: Option<&'a [f64]>,
    exp: Option<ExpParts<'a>>,
    quantiles: Option<(Vec<f64>, Vec<f64>)>,
}

/// A point's start time, when it can be one: not 0, not before 2000 and not after the
/// point's own time. Envoy 1.40's stats sink writes cumulative points' start in
/// microseconds (a 1970 date read as nanoseconds): that is scaled when the result is
/// plausible; anything else is stored as null, so a counter's increase is still counted
/// (from its first point in the range) rather than mistaken for a restart.
pub(crate) fn plausible_start(start: u64, time: u64) -> Option<i64> {
    const Y2000_NS: u64 = 946_684_800_000_000_000;
    let fits = |s: u64| (Y2000_NS..=time).contains(&s);
    if start == 0 {
        None
    } else if fits(start) {
        Some(ts_ns(start))
    } else if start < Y2000_NS && fits(start.saturating_mul(1000)) {
        Some(ts_ns(start * 1000))
    } else {
        None
    }
}

fn counts(v: &[u64]) -> impl Iterator<Item = Option<i64>> + '_ {
    v.iter()
        .map(|c| Some(i64::try_from(*c).unwrap_or(i64::MAX)))
}

impl Rows {
    fn new() -> Self {
        let tz = "UTC";
        Rows {
            time: TimestampNanosecondBuilder::new().with_timezone(tz),
            start_time: TimestampNanosecondBuilder::new().with_timezone(tz),
            service: StringBuilder::new(),
            name: StringBuilder::new(),
            description: StringBuilder::new(),
            unit: StringBuilder::new(),
            kind: StringBuilder::new(),
            monotonic: BooleanBuilder::new(),
            temporality: StringBuilder::new(),
            attrs: attr_builder(0, 0),
            res_attrs: attr_builder(0, 0),
            scope_name: StringBuilder::new(),
            value: Float64Builder::new(),
            count: Int64Builder::new(),
            sum: Float64Builder::new(),
            min: Float64Builder::new(),
            max: Float64Builder::new(),
            bucket_counts: ListBuilder::new(Int64Builder::new()),
            explicit_bounds: ListBuilder::new(Float64Builder::new()),
            exp_scale: Int32Builder::new(),
            exp_zero_count: Int64Builder::new(),
            exp_zero_threshold: Float64Builder::new(),
            exp_pos_offset: Int32Builder::new(),
            exp_pos_counts: ListBuilder::new(Int64Builder::new()),
            exp_neg_offset: Int32Builder::new(),
            exp_neg_counts: ListBuilder::new(Int64Builder::new()),
            quantiles: ListBuilder::new(Float64Builder::new()),
            quantile_values: ListBuilder::new(Float64Builder::new()),
        }
    }

    fn push(
        &mut self,
        svc: &str,
        rattrs: &[KeyValue],
        scope: Option<&str>,
        p: Point<'_>,
        v: Values<'_>,
    ) {
        self.time.append_value(ts_ns(p.time));
        self.start_time
            .append_option(plausible_start(p.start, p.time));
        self.service.append_value(svc);
        self.name.append_value(&p.metric.name);
        self.description
            .append_option(non_empty(&p.metric.description));
        self.unit.append_option(non_empty(&p.metric.unit));
        self.kind.append_value(p.kind);
        self.monotonic.append_option(p.monotonic);
        self.temporality.append_option(p.temporality);
        append_attrs(&mut self.attrs, p.attributes);
        append_attrs(&mut self.res_attrs, rattrs);
        self.scope_name.append_option(scope);
        self.value.append_option(v.value);
        self.count
            .append_option(v.count.map(|c| i64::try_from(c).unwrap_or(i64::MAX)));
        self.sum.append_option(v.sum);
        self.min.append_option(v.min);
        self.max.append_option(v.max);
        self.bucket_counts
            .append_option(v.bucket_counts.map(counts));
        self.explicit_bounds
            .append_option(v.explicit_bounds.map(|b| b.iter().map(|x| Some(*x))));
        match v.exp {
            Some((scale, zero_count, zero_threshold, pos, neg)) => {
                self.exp_scale.append_value(scale);
                self.exp_zero_count
                    .append_value(i64::try_from(zero_count).unwrap_or(i64::MAX));
                self.exp_zero_threshold.append_value(zero_threshold);
                self.exp_pos_offset
                    .append_value(pos.map(|b| b.offset).unwrap_or(0));
                self.exp_pos_counts.append_value(counts(
                    pos.map(|b| b.bucket_counts.as_slice()).unwrap_or(&[]),
                ));
                self.exp_neg_offset
                    .append_value(neg.map(|b| b.offset).unwrap_or(0));
                self.exp_neg_counts.append_value(counts(
                    neg.map(|b| b.bucket_counts.as_slice()).unwrap_or(&[]),
                ));
            }
            None => {
                self.exp_scale.append_null();
                self.exp_zero_count.append_null();
                self.exp_zero_threshold.append_null();
                self.exp_pos_offset.append_null();
                self.exp_pos_counts.append_null();
                self.exp_neg_offset.append_null();
                self.exp_neg_counts.append_null();
            }
        }
        match v.quantiles {
            Some((q, qv)) => {
                self.quantiles.append_value(q.into_iter().map(Some));
                self.quantile_values.append_value(qv.into_iter().map(Some));
            }
            None => {
                self.quantiles.append_null();
                self.quantile_values.append_null();
            }
        }
    }

    fn finish(mut self) -> Result<RecordBatch, ArrowError> {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.time.finish()),
            Arc::new(self.start_time.finish()),
            Arc::new(self.service.finish()),
            Arc::new(self.name.finish()),
            Arc::new(self.description.finish()),
            Arc::new(self.unit.finish()),
            Arc::new(self.kind.finish()),
            Arc::new(self.monotonic.finish()),
            Arc::new(self.temporality.finish()),
            Arc::new(self.attrs.finish()),
            Arc::new(self.res_attrs.finish()),
            Arc::new(self.scope_name.finish()),
            Arc::new(self.value.finish()),
            Arc::new(self.count.finish()),
            Arc::new(self.sum.finish()),
            Arc::new(self.min.finish()),
            Arc::new(self.max.finish()),
            Arc::new(self.bucket_counts.finish()),
            Arc::new(self.explicit_bounds.finish()),
            Arc::new(self.exp_scale.finish()),
            Arc::new(self.exp_zero_count.finish()),
            Arc::new(self.exp_zero_threshold.finish()),
            Arc::new(self.exp_pos_offset.finish()),
            Arc::new(self.exp_pos_counts.finish()),
            Arc::new(self.exp_neg_offset.finish()),
            Arc::new(self.exp_neg_counts.finish()),
            Arc::new(self.quantiles.finish()),
            Arc::new(self.quantile_values.finish()),
        ];
        RecordBatch::try_new(Table::Metrics.schema(), columns)
    }
}

/// What every kind of OTLP data point has: its attributes and its two times.
trait DataPoint {
    fn attributes(&self) -> &[KeyValue];
    fn times(&self) -> (u64, u64);
}

macro_rules! data_point {
    ($($t:ty),*) => {$(
        impl DataPoint for $t {
            fn attributes(&self) -> &[KeyValue] {
                &self.attributes
            }
            fn times(&self) -> (u64, u64) {
                (self.start_time_unix_nano, self.time_unix_nano)
            }
        }
    )*};
}
data_point!(
    NumberDataPoint,
    HistogramDataPoint,
    ExponentialHistogramDataPoint,
    SummaryDataPoint
);

fn temporality(t: i32) -> Option<&'static str> {
    match AggregationTemporality::try_from(t).ok()? {
        AggregationTemporality::Delta => Some("delta"),
        AggregationTemporality::Cumulative => Some("cumulative"),
        AggregationTemporality::Unspecified => None,
    }
}

/// Converts a metrics export request into one row per data point. A metric without data
/// and a data point without a time are rejected.
pub fn metrics(req: &ExportMetricsServiceRequest) -> Result<Converted, ArrowError> {
    let mut rows = Rows::new();
    let mut rejections = Rejections::default();
    for rm in &req.resource_metrics {
        let rattrs: &[KeyValue] = rm
            .resource
            .as_ref()
            .map(|r| r.attributes.as_slice())
            .unwrap_or(&[]);
        let svc = service_name(rattrs);
        for sm in &rm.scope_metrics {
            let scope = sm
                .scope
                .as_ref()
                .map(|s| s.name.as_str())
                .and_then(non_empty);
            for m in &sm.metrics {
                let mut push = |p: Point<'_>, v: Values<'_>| {
                    if p.time == 0 {
                        rejections
                            .reject(|| format!("data point of {:?}: time_unix_nano is 0", m.name));
                    } else {
                        rows.push(&svc, rattrs, scope, p, v);
                    }
                };
                let point = |kind, monotonic, temporality, dp| {
                    Point::of(m, kind, monotonic, temporality, dp)
                };
                match &m.data {
                    Some(Data::Gauge(g)) => {
                        for dp in &g.data_points {
                            let p = point("gauge", None, None, dp);
                            push(
                                p,
                                Values {
                                    value: number(&dp.value),
                                    ..Default::default()
                                },
                            );
                        }
                    }
                    Some(Data::Sum(s)) => {
                        let t = temporality(s.aggregation_temporality);
                        for dp in &s.data_points {
                            let p = point("sum", Some(s.is_monotonic), t, dp);
                            push(
                                p,
                                Values {
                                    value: number(&dp.value),
                                    ..Default::default()
                                },
                            );
                        }
                    }
                    Some(Data::Histogram(h)) => {
                        let t = temporality(h.aggregation_temporality);
                        for dp in &h.data_points {
                            let p = point("histogram", None, t, dp);
                            push(
                                p,
                                Values {
                                    count: Some(dp.count),
                                    sum: dp.sum,
                                    min: dp.min,
                                    max: dp.max,
                                    bucket_counts: Some(&dp.bucket_counts),
                                    explicit_bounds: Some(&dp.explicit_bounds),
                                    ..Default::default()
                                },
                            );
                        }
                    }
                    Some(Data::ExponentialHistogram(h)) => {
                        let t = temporality(h.aggregation_temporality);
                        for dp in &h.data_points {
                            let p = point("exponential_histogram", None, t, dp);
                            push(
                                p,
                                Values {
                                    count: Some(dp.count),
                                    sum: dp.sum,
                                    min: dp.min,
                                    max: dp.max,
                                    exp: Some((
                                        dp.scale,
                                        dp.zero_count,
                                        dp.zero_threshold,
                                        dp.positive.as_ref(),
                                        dp.negative.as_ref(),
                                    )),
                                    ..Default::default()
                                },
                            );
                        }
                    }
                    Some(Data::Summary(s)) => {
                        for dp in &s.data_points {
                            let p = point("summary", None, None, dp);
                            push(
                                p,
                                Values {
                                    count: Some(dp.count),
                                    sum: Some(dp.sum),
                                    quantiles: Some((
                                        dp.quantile_values.iter().map(|q| q.quantile).collect(),
                                        dp.quantile_values.iter().map(|q| q.value).collect(),
                                    )),
                                    ..Default::default()
                                },
                            );
                        }
                    }
                    None => rejections.reject(|| format!("metric {:?} has no data", m.name)),
                }
            }
        }
    }
    let batch = rows.finish()?;
    let (rejected, message) = rejections.into_parts();
    Ok(Converted {
        batch,
        rejected,
        message,
    })
}

fn number(v: &Option<number_data_point::Value>) -> Option<f64> {
    match v {
        Some(number_data_point::Value::AsDouble(d)) => Some(*d),
        Some(number_data_point::Value::AsInt(i)) => Some(*i as f64),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{Float64Type, Int64Type};
    use opentelemetry_proto::tonic::metrics::v1::{
        Gauge, Histogram, HistogramDataPoint, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
    };

    #[test]
    fn implausible_start_times_are_scaled_or_dropped() {
        let now = 1_764_000_000_000_000_000u64; // 2025-11
        let hour_ago = now - 3_600_000_000_000;
        assert_eq!(plausible_start(hour_ago, now), Some(hour_ago as i64));
        // Envoy 1.40's stats sink: microseconds.
        assert_eq!(
            plausible_start(hour_ago / 1000, now),
            Some((hour_ago / 1000 * 1000) as i64)
        );
        assert_eq!(plausible_start(0, now), None);
        assert_eq!(plausible_start(5, now), None);
        // After the point's own time.
        assert_eq!(plausible_start(now + 1, now), None);
    }

    #[test]
    fn one_row_per_data_point_of_each_type() {
        let metrics_list = vec![
            Metric {
                name: "inflight".into(),
                data: Some(Data::Gauge(Gauge {
                    data_points: vec![NumberDataPoint {
                        time_unix_nano: 10,
                        value: Some(number_data_point::Value::AsInt(3)),
                        ..Default::default()
                    }],
                })),
                ..Default::default()
            },
            Metric {
                name: "requests".into(),
                data: Some(Data::Sum(Sum {
                    data_points: vec![NumberDataPoint {
                        time_unix_nano: 10,
                        value: Some(number_data_point::Value::AsDouble(2.5)),
                        ..Default::default()
                    }],
                    aggregation_temporality: AggregationTemporality::Cumulative as i32,
                    is_monotonic: true,
                })),
                ..Default::default()
            },
            Metric {
                name: "latency".into(),
                data: Some(Data::Histogram(Histogram {
                    data_points: vec![HistogramDataPoint {
                        time_unix_nano: 10,
                        count: 4,
                        sum: Some(10.0),
                        bucket_counts: vec![1, 3],
                        explicit_bounds: vec![5.0],
                        ..Default::default()
                    }],
                    aggregation_temporality: AggregationTemporality::Delta as i32,
                })),
                ..Default::default()
            },
            Metric {
                name: "empty".into(),
                data: None,
                ..Default::default()
            },
        ];
        let req = ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                scope_metrics: vec![ScopeMetrics {
                    metrics: metrics_list,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let c = metrics(&req).expect("convert");
        assert_eq!(c.rejected, 1);
        let b = c.batch;
        assert_eq!(b.num_rows(), 3);
        let kind = b
            .column_by_name("metric_type")
            .expect("t")
            .as_string::<i32>()
            .clone();
        assert_eq!(
            (kind.value(0), kind.value(1), kind.value(2)),
            ("gauge", "sum", "histogram")
        );
        let value = b
            .column_by_name("value")
            .expect("v")
            .as_primitive::<Float64Type>()
            .clone();
        assert_eq!((value.value(0), value.value(1)), (3.0, 2.5));
        assert!(value.is_null(2));
        let temp = b
            .column_by_name("temporality")
            .expect("t")
            .as_string::<i32>()
            .clone();
        assert!(temp.is_null(0));
        assert_eq!(temp.value(1), "cumulative");
        assert_eq!(temp.value(2), "delta");
        let buckets = b
            .column_by_name("bucket_counts")
            .expect("b")
            .as_list::<i32>()
            .clone();
        assert_eq!(
            buckets
                .value(2)
                .as_primitive::<Int64Type>()
                .values()
                .to_vec(),
            vec![1, 3]
        );
    }
}
