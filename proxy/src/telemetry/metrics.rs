//! Request metrics, kept as cumulative series (each with the time it started) and read
//! out as OTLP data points every batch interval, or as Prometheus text on `/metrics`.
//!
//! - `meshscope_requests_total` (monotonic sum) and
//!   `meshscope_request_duration_milliseconds` (histogram), labelled `reporter`
//!   (`source` on the outbound side, `destination` inbound), `source_workload`,
//!   `destination_workload`, `destination_service_name`, `destination_version`,
//!   `response_code` — the labels the service graph's `mesh_edges` reads;
//! - `meshscope_requests_in_flight` (gauge), labelled `direction` and
//!   `destination_service_name` — read as the service's saturation.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint, Sum,
    metric, number_data_point,
};

use super::{now_ns, string_kv};

/// Histogram bucket upper bounds, milliseconds.
pub const BOUNDS_MS: [f64; 16] = [
    0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
    30000.0, 60000.0,
];

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SeriesKey {
    pub reporter: &'static str,
    pub source_workload: Option<Arc<str>>,
    pub destination_workload: Arc<str>,
    pub destination_service: Arc<str>,
    pub destination_version: Arc<str>,
    pub response_code: u16,
}

impl SeriesKey {
    fn attributes(&self) -> Vec<KeyValue> {
        let mut a = vec![
            string_kv("reporter", self.reporter),
            string_kv("destination_workload", &self.destination_workload),
            string_kv("destination_service_name", &self.destination_service),
            string_kv("destination_version", &self.destination_version),
            string_kv("response_code", &self.response_code.to_string()),
        ];
        if let Some(s) = &self.source_workload {
            a.push(string_kv("source_workload", s));
        }
        a
    }

    fn prometheus_labels(&self) -> String {
        let mut s = format!(
            "reporter=\"{}\",destination_workload=\"{}\",destination_service_name=\"{}\",destination_version=\"{}\",response_code=\"{}\"",
            self.reporter,
            self.destination_workload,
            self.destination_service,
            self.destination_version,
            self.response_code
        );
        if let Some(src) = &self.source_workload {
            let _ = write!(s, ",source_workload=\"{src}\"");
        }
        s
    }
}

struct Series {
    start_ns: u64,
    count: AtomicU64,
    sum_us: AtomicU64,
    buckets: [AtomicU64; BOUNDS_MS.len() + 1],
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct GaugeKey {
    direction: &'static str,
    destination_service: Arc<str>,
}

#[derive(Default)]
pub struct Registry {
    series: RwLock<HashMap<SeriesKey, Arc<Series>>>,
    in_flight: RwLock<HashMap<GaugeKey, Arc<AtomicI64>>>,
}

/// Decrements the in-flight gauge when the request ends (however it ends).
pub struct InFlight(Arc<AtomicI64>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Registry {
    pub fn observe(&self, key: SeriesKey, duration: Duration) {
        let series = self.series.read().ok().and_then(|m| m.get(&key).cloned());
        let series = match series {
            Some(s) => s,
            None => {
                let Ok(mut m) = self.series.write() else {
                    return;
                };
                Arc::clone(m.entry(key).or_insert_with(|| {
                    Arc::new(Series {
                        start_ns: now_ns(),
                        count: AtomicU64::new(0),
                        sum_us: AtomicU64::new(0),
                        buckets: Default::default(),
                    })
                }))
            }
        };
        let ms = duration.as_secs_f64() * 1000.0;
        let i = BOUNDS_MS.partition_point(|b| *b < ms);
        series.buckets[i].fetch_add(1, Ordering::Relaxed);
        series
            .sum_us
            .fetch_add(duration.as_micros() as u64, Ordering::Relaxed);
        series.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn in_flight(&self, direction: &'static str, destination_service: &Arc<str>) -> InFlight {
        let key = GaugeKey {
            direction,
            destination_service: Arc::clone(destination_service),
        };
        let g = self
            .in_flight
            .read()
            .ok()
            .and_then(|m| m.get(&key).cloned());
        let g = match g {
            Some(g) => g,
            None => match self.in_flight.write() {
                Ok(mut m) => Arc::clone(m.entry(key).or_default()),
                Err(_) => Arc::new(AtomicI64::new(0)),
            },
        };
        g.fetch_add(1, Ordering::Relaxed);
        InFlight(g)
    }

    /// Total requests observed (all series).
    pub fn requests(&self) -> u64 {
        self.series
            .read()
            .map(|m| m.values().map(|s| s.count.load(Ordering::Relaxed)).sum())
            .unwrap_or(0)
    }

    /// The current values as OTLP metrics (cumulative, start time = series creation).
    pub fn snapshot(&self) -> Vec<Metric> {
        let now = now_ns();
        let mut counts = vec![];
        let mut histos = vec![];
        if let Ok(m) = self.series.read() {
            for (k, s) in m.iter() {
                let attributes = k.attributes();
                let count = s.count.load(Ordering::Relaxed);
                counts.push(NumberDataPoint {
                    attributes: attributes.clone(),
                    start_time_unix_nano: s.start_ns,
                    time_unix_nano: now,
                    value: Some(number_data_point::Value::AsDouble(count as f64)),
                    ..Default::default()
                });
                histos.push(HistogramDataPoint {
                    attributes,
                    start_time_unix_nano: s.start_ns,
                    time_unix_nano: now,
                    count,
                    sum: Some(s.sum_us.load(Ordering::Relaxed) as f64 / 1000.0),
                    bucket_counts: s
                        .buckets
                        .iter()
                        .map(|b| b.load(Ordering::Relaxed))
                        .collect(),
                    explicit_bounds: BOUNDS_MS.to_vec(),
                    ..Default::default()
                });
            }
        }
        let mut gauges = vec![];
        if let Ok(m) = self.in_flight.read() {
            for (k, g) in m.iter() {
                gauges.push(NumberDataPoint {
                    attributes: vec![
                        string_kv("direction", k.direction),
                        string_kv("destination_service_name", &k.destination_service),
                    ],
                    time_unix_nano: now,
                    value: Some(number_data_point::Value::AsDouble(
                        g.load(Ordering::Relaxed) as f64,
                    )),
                    ..Default::default()
                });
            }
        }
        let cumulative = AggregationTemporality::Cumulative as i32;
        let mut out = vec![];
        if !counts.is_empty() {
            out.push(Metric {
                name: "meshscope_requests_total".into(),
                description: "Requests through the proxy, by source, destination and status."
                    .into(),
                unit: "1".into(),
                data: Some(metric::Data::Sum(Sum {
                    data_points: counts,
                    aggregation_temporality: cumulative,
                    is_monotonic: true,
                })),
                ..Default::default()
            });
            out.push(Metric {
                name: "meshscope_request_duration_milliseconds".into(),
                description: "Request duration seen by the proxy.".into(),
                unit: "ms".into(),
                data: Some(metric::Data::Histogram(Histogram {
                    data_points: histos,
                    aggregation_temporality: cumulative,
                })),
                ..Default::default()
            });
        }
        if !gauges.is_empty() {
            out.push(Metric {
                name: "meshscope_requests_in_flight".into(),
                description: "Requests the proxy is handling now.".into(),
                unit: "1".into(),
                data: Some(metric::Data::Gauge(Gauge {
                    data_points: gauges,
                })),
                ..Default::default()
            });
        }
        out
    }

    /// The same as Prometheus text.
    pub fn prometheus(&self, out: &mut String) {
        let _ = writeln!(out, "# TYPE meshscope_requests_total counter");
        if let Ok(m) = self.series.read() {
            for (k, s) in m.iter() {
                let _ = writeln!(
                    out,
                    "meshscope_requests_total{{{}}} {}",
                    k.prometheus_labels(),
                    s.count.load(Ordering::Relaxed)
                );
            }
            let _ = writeln!(
                out,
                "# TYPE meshscope_request_duration_milliseconds histogram"
            );
            for (k, s) in m.iter() {
                let labels = k.prometheus_labels();
                let mut cum = 0;
                for (i, b) in s.buckets.iter().enumerate() {
                    cum += b.load(Ordering::Relaxed);
                    let le = BOUNDS_MS
                        .get(i)
                        .map(|b| b.to_string())
                        .unwrap_or_else(|| "+Inf".into());
                    let _ = writeln!(
                        out,
                        "meshscope_request_duration_milliseconds_bucket{{{labels},le=\"{le}\"}} {cum}"
                    );
                }
                let _ = writeln!(
                    out,
                    "meshscope_request_duration_milliseconds_sum{{{labels}}} {}\nmeshscope_request_duration_milliseconds_count{{{labels}}} {}",
                    s.sum_us.load(Ordering::Relaxed) as f64 / 1000.0,
                    s.count.load(Ordering::Relaxed)
                );
            }
        }
        let _ = writeln!(out, "# TYPE meshscope_requests_in_flight gauge");
        if let Ok(m) = self.in_flight.read() {
            for (k, g) in m.iter() {
                let _ = writeln!(
                    out,
                    "meshscope_requests_in_flight{{direction=\"{}\",destination_service_name=\"{}\"}} {}",
                    k.direction,
                    k.destination_service,
                    g.load(Ordering::Relaxed)
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(code: u16) -> SeriesKey {
        SeriesKey {
            reporter: "source",
            source_workload: Some(Arc::from("frontend")),
            destination_workload: Arc::from("cart"),
            destination_service: Arc::from("cart"),
            destination_version: Arc::from("v1"),
            response_code: code,
        }
    }

    #[test]
    fn counts_and_buckets_are_cumulative_with_a_start_time() {
        let r = Registry::default();
        r.observe(key(200), Duration::from_micros(300)); // <= 0.5 ms
        r.observe(key(200), Duration::from_millis(7)); // (5, 10]
        r.observe(key(503), Duration::from_millis(70)); // (50, 100]
        let g = r.in_flight("outbound", &Arc::from("cart"));
        let m = r.snapshot();
        let names: Vec<&str> = m.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "meshscope_requests_total",
                "meshscope_request_duration_milliseconds",
                "meshscope_requests_in_flight"
            ]
        );
        let Some(metric::Data::Sum(sum)) = &m[0].data else {
            panic!("sum")
        };
        assert!(sum.is_monotonic);
        assert_eq!(
            sum.aggregation_temporality,
            AggregationTemporality::Cumulative as i32
        );
        let total: f64 = sum
            .data_points
            .iter()
            .map(|p| match p.value {
                Some(number_data_point::Value::AsDouble(v)) => v,
                _ => 0.0,
            })
            .sum();
        assert_eq!(total, 3.0);
        assert!(
            sum.data_points
                .iter()
                .all(|p| p.start_time_unix_nano > 0 && p.start_time_unix_nano <= p.time_unix_nano)
        );
        let Some(metric::Data::Histogram(h)) = &m[1].data else {
            panic!("histogram")
        };
        let ok = h
            .data_points
            .iter()
            .find(|p| {
                p.attributes.iter().any(|a| {
                    a.key == "response_code" && format!("{:?}", a.value).contains("\"200\"")
                })
            })
            .expect("200 series");
        assert_eq!(ok.count, 2);
        assert_eq!(ok.bucket_counts[0], 1);
        assert_eq!(ok.bucket_counts[4], 1);
        let Some(metric::Data::Gauge(gauge)) = &m[2].data else {
            panic!("gauge")
        };
        assert_eq!(
            gauge.data_points[0].value,
            Some(number_data_point::Value::AsDouble(1.0))
        );
        drop(g);
        let mut text = String::new();
        r.prometheus(&mut text);
        assert!(text.contains("meshscope_requests_in_flight{direction=\"outbound\",destination_service_name=\"cart\"} 0"), "{text}");
        assert!(text.contains("le=\"+Inf\"} 1"), "{text}");
    }
}
