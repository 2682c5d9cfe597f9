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

use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, LabelSetEncoder, LabelValueEncoder,
    NoLabelSet,
};
use prometheus_client::metrics::MetricType;
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
    /// Istio's label: `mutual_tls`, `none`, or `unknown` (answered by the proxy itself
    /// before any connection).
    pub connection_security_policy: &'static str,
    /// The SPIFFE IDs proven by certificates, when the connection was mTLS.
    pub source_principal: Option<Arc<str>>,
    pub destination_principal: Option<Arc<str>>,
    /// Inbound: `deny` or `would-deny` when authorization did not admit the caller
    /// (absent when it did, or without rules).
    pub authz: Option<&'static str>,
    /// `shadow` for a mirrored copy (the caller's copy and the shadow's inbound), so
    /// golden signals can leave out what nobody waited for; absent otherwise.
    pub mirror: Option<&'static str>,
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
        a.push(string_kv(
            "connection_security_policy",
            self.connection_security_policy,
        ));
        if let Some(p) = &self.source_principal {
            a.push(string_kv("source_principal", p));
        }
        if let Some(p) = &self.destination_principal {
            a.push(string_kv("destination_principal", p));
        }
        if let Some(z) = self.authz {
            a.push(string_kv("authz", z));
        }
        if let Some(m) = self.mirror {
            a.push(string_kv("mirror", m));
        }
        a
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

/// The most request series (label sets) the proxy keeps; past it, new ones are counted
/// in `meshscope_metrics_series_dropped_total` instead.
pub const MAX_SERIES: usize = 10_000;

#[derive(Default)]
pub struct Registry {
    series: RwLock<HashMap<SeriesKey, Arc<Series>>>,
    in_flight: RwLock<HashMap<GaugeKey, Arc<AtomicI64>>>,
    dropped: AtomicU64,
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
                if m.len() >= MAX_SERIES && !m.contains_key(&key) {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    return;
                }
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

    /// Encodes the series (`GET /metrics` of the admin listener).
    pub fn encode(&self, enc: &mut DescriptorEncoder<'_>) -> std::fmt::Result {
        if let Ok(m) = self.series.read() {
            {
                let mut total = enc.encode_descriptor(
                    "meshscope_requests",
                    "Requests through the proxy, by source, destination and status.",
                    None,
                    MetricType::Counter,
                )?;
                for (k, s) in m.iter() {
                    total
                        .encode_family(k)?
                        .encode_counter::<NoLabelSet, _, u64>(
                            &s.count.load(Ordering::Relaxed),
                            None,
                        )?;
                }
            }
            let mut histo = enc.encode_descriptor(
                "meshscope_request_duration_milliseconds",
                "Request duration seen by the proxy.",
                None,
                MetricType::Histogram,
            )?;
            for (k, s) in m.iter() {
                let buckets: Vec<(f64, u64)> = s
                    .buckets
                    .iter()
                    .enumerate()
                    .map(|(i, b)| {
                        let bound = BOUNDS_MS.get(i).copied().unwrap_or(f64::MAX);
                        (bound, b.load(Ordering::Relaxed))
                    })
                    .collect();
                histo.encode_family(k)?.encode_histogram::<NoLabelSet>(
                    s.sum_us.load(Ordering::Relaxed) as f64 / 1000.0,
                    s.count.load(Ordering::Relaxed),
                    &buckets,
                    None,
                )?;
            }
        }
        if let Ok(m) = self.in_flight.read() {
            let mut g = enc.encode_descriptor(
                "meshscope_requests_in_flight",
                "Requests the proxy is handling now.",
                None,
                MetricType::Gauge,
            )?;
            for (k, v) in m.iter() {
                g.encode_family(k)?
                    .encode_gauge(&v.load(Ordering::Relaxed))?;
            }
        }
        enc.encode_descriptor(
            "meshscope_metrics_series_dropped",
            "Request series not kept because the proxy holds the most it keeps.",
            None,
            MetricType::Counter,
        )?
        .encode_counter::<NoLabelSet, _, u64>(&self.dropped.load(Ordering::Relaxed), None)
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

/// The registry's families alone as OpenMetrics text (for tests and diagnostics).
pub fn exposition(r: &Arc<Registry>) -> String {
    #[derive(Debug)]
    struct Alone(Arc<Registry>);
    impl prometheus_client::collector::Collector for Alone {
        fn encode(&self, mut e: DescriptorEncoder<'_>) -> std::fmt::Result {
            self.0.encode(&mut e)
        }
    }
    let mut reg = prometheus_client::registry::Registry::default();
    reg.register_collector(Box::new(Alone(Arc::clone(r))));
    let mut out = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut out, &reg);
    out
}

/// A label value from traffic, escaped as the exposition format wants: `prometheus-client`
/// writes label values as they are.
struct Escaped<'a>(&'a str);

impl EncodeLabelValue for Escaped<'_> {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        for c in self.0.chars() {
            match c {
                '\\' => encoder.write_str("\\\\")?,
                '"' => encoder.write_str("\\\"")?,
                '\n' => encoder.write_str("\\n")?,
                c => encoder.write_char(c)?,
            }
        }
        Ok(())
    }
}

impl EncodeLabelSet for SeriesKey {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> std::fmt::Result {
        let code = self.response_code.to_string();
        let mut labels = vec![
            ("reporter", Escaped(self.reporter)),
            ("destination_workload", Escaped(&self.destination_workload)),
            (
                "destination_service_name",
                Escaped(&self.destination_service),
            ),
            ("destination_version", Escaped(&self.destination_version)),
            ("response_code", Escaped(&code)),
        ];
        if let Some(s) = &self.source_workload {
            labels.push(("source_workload", Escaped(s)));
        }
        labels.push((
            "connection_security_policy",
            Escaped(self.connection_security_policy),
        ));
        if let Some(p) = &self.source_principal {
            labels.push(("source_principal", Escaped(p)));
        }
        if let Some(p) = &self.destination_principal {
            labels.push(("destination_principal", Escaped(p)));
        }
        if let Some(z) = self.authz {
            labels.push(("authz", Escaped(z)));
        }
        if let Some(m) = self.mirror {
            labels.push(("mirror", Escaped(m)));
        }
        labels.as_slice().encode(encoder)
    }
}

impl EncodeLabelSet for GaugeKey {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> std::fmt::Result {
        [
            ("direction", Escaped(self.direction)),
            (
                "destination_service_name",
                Escaped(&self.destination_service),
            ),
        ]
        .encode(encoder)
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
            connection_security_policy: "none",
            source_principal: None,
            destination_principal: None,
            authz: None,
            mirror: None,
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
        let text = exposition(&Arc::new(r));
        assert!(text.contains("meshscope_requests_in_flight{direction=\"outbound\",destination_service_name=\"cart\"} 0"), "{text}");
        assert!(text.contains("_bucket{le=\"+Inf\",reporter=\"source\",destination_workload=\"cart\",destination_service_name=\"cart\",destination_version=\"v1\",response_code=\"503\",source_workload=\"frontend\",connection_security_policy=\"none\"} 1"), "{text}");
        assert!(text.contains("meshscope_requests_total{reporter=\"source\",destination_workload=\"cart\",destination_service_name=\"cart\",destination_version=\"v1\",response_code=\"503\",source_workload=\"frontend\",connection_security_policy=\"none\"} 1"), "{text}");
    }

    #[test]
    fn series_are_capped_and_label_values_escaped() {
        let r = Registry::default();
        let mut k = key(200);
        k.destination_service = Arc::from("ca\"rt\nx");
        r.observe(k.clone(), Duration::from_millis(1));
        for i in 0..MAX_SERIES as u16 + 5 {
            let mut k = key(200);
            k.destination_workload = Arc::from(format!("w{i}"));
            r.observe(k, Duration::from_millis(1));
        }
        assert_eq!(r.series.read().unwrap().len(), MAX_SERIES);
        assert_eq!(r.dropped.load(Ordering::Relaxed), 6);
        let text = exposition(&Arc::new(r));
        assert!(
            text.contains(r#"destination_service_name="ca\"rt\nx""#),
            "escaped"
        );
        assert!(text.contains("meshscope_metrics_series_dropped_total 6"));
    }
}
