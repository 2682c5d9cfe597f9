//! `ExportLogsServiceRequest` -> `logs` batch.

use std::sync::Arc;

use arrow::array::{ArrayRef, Int32Builder, StringBuilder, TimestampNanosecondBuilder};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::logs::v1::LogRecord;

use super::attributes::{any_value_to_string, append_attrs, attr_builder};
use super::spans::{non_empty, service_name};
use super::{Converted, Rejections, check_id, hex_id, ts_ns};
use crate::schema::Table;

fn validate(r: &LogRecord) -> Result<(), String> {
    if !r.trace_id.is_empty()
        && let Some(e) = check_id(&r.trace_id, 16, "trace_id")
    {
        return Err(e);
    }
    if !r.span_id.is_empty()
        && let Some(e) = check_id(&r.span_id, 8, "span_id")
    {
        return Err(e);
    }
    Ok(())
}

/// Converts a logs export request. `now_ns` stands in for a record with neither a time nor
/// an observed time (the receiver's observation, as the specification allows).
pub fn logs(req: &ExportLogsServiceRequest, now_ns: i64) -> Result<Converted, ArrowError> {
    let n: usize = req
        .resource_logs
        .iter()
        .flat_map(|r| &r.scope_logs)
        .map(|s| s.log_records.len())
        .sum();
    let mut time = TimestampNanosecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut observed = TimestampNanosecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut trace_id = StringBuilder::new();
    let mut span_id = StringBuilder::new();
    let mut sev_num = Int32Builder::with_capacity(n);
    let mut sev_text = StringBuilder::new();
    let mut service = StringBuilder::new();
    let mut body = StringBuilder::new();
    let mut event_name = StringBuilder::new();
    let mut attrs = attr_builder(n, 8);
    let mut res_attrs = attr_builder(n, 4);
    let mut scope_name = StringBuilder::new();
    let mut rejections = Rejections::default();
    let mut buf = [0u8; 64];

    for rl in &req.resource_logs {
        let rattrs: &[KeyValue] = rl
            .resource
            .as_ref()
            .map(|r| r.attributes.as_slice())
            .unwrap_or(&[]);
        let svc = service_name(rattrs);
        for sl in &rl.scope_logs {
            let sname = sl
                .scope
                .as_ref()
                .map(|s| s.name.as_str())
                .and_then(non_empty);
            for r in &sl.log_records {
                if let Err(why) = validate(r) {
                    rejections.reject(|| format!("log record of {svc}: {why}"));
                    continue;
                }
                let obs = match r.observed_time_unix_nano {
                    0 => now_ns,
                    t => ts_ns(t),
                };
                let t = match r.time_unix_nano {
                    0 => obs,
                    t => ts_ns(t),
                };
                time.append_value(t);
                observed.append_value(obs);
                if r.trace_id.is_empty() {
                    trace_id.append_null();
                } else {
                    trace_id.append_value(hex_id(&r.trace_id, &mut buf));
                }
                if r.span_id.is_empty() {
                    span_id.append_null();
                } else {
                    span_id.append_value(hex_id(&r.span_id, &mut buf));
                }
                sev_num.append_value(r.severity_number);
                sev_text.append_option(non_empty(&r.severity_text));
                service.append_value(&svc);
                body.append_option(r.body.as_ref().map(any_value_to_string));
                event_name.append_option(non_empty(&r.event_name));
                append_attrs(&mut attrs, &r.attributes);
                append_attrs(&mut res_attrs, rattrs);
                scope_name.append_option(sname);
            }
        }
    }

    let columns: Vec<ArrayRef> = vec![
        Arc::new(time.finish()),
        Arc::new(observed.finish()),
        Arc::new(trace_id.finish()),
        Arc::new(span_id.finish()),
        Arc::new(sev_num.finish()),
        Arc::new(sev_text.finish()),
        Arc::new(service.finish()),
        Arc::new(body.finish()),
        Arc::new(event_name.finish()),
        Arc::new(attrs.finish()),
        Arc::new(res_attrs.finish()),
        Arc::new(scope_name.finish()),
    ];
    let batch = RecordBatch::try_new(Table::Logs.schema(), columns)?;
    let (rejected, message) = rejections.into_parts();
    Ok(Converted {
        batch,
        rejected,
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::TimestampNanosecondType;
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValueList, any_value::Value};
    use opentelemetry_proto::tonic::logs::v1::{ResourceLogs, ScopeLogs};

    fn req(records: Vec<LogRecord>) -> ExportLogsServiceRequest {
        ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                scope_logs: vec![ScopeLogs {
                    log_records: records,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    #[test]
    fn time_falls_back_to_observed_then_now_and_bodies_become_text() {
        let structured = AnyValue {
            value: Some(Value::KvlistValue(KeyValueList {
                values: vec![KeyValue {
                    key: "k".into(),
                    value: Some(AnyValue {
                        value: Some(Value::IntValue(7)),
                    }),
                    ..Default::default()
                }],
            })),
        };
        let records = vec![
            LogRecord {
                time_unix_nano: 5,
                observed_time_unix_nano: 9,
                ..Default::default()
            },
            LogRecord {
                observed_time_unix_nano: 9,
                body: Some(structured),
                ..Default::default()
            },
            LogRecord {
                trace_id: vec![1; 16],
                span_id: vec![2; 8],
                ..Default::default()
            },
            LogRecord {
                trace_id: vec![1; 3],
                ..Default::default()
            },
        ];
        let c = logs(&req(records), 42).expect("convert");
        assert_eq!(c.rejected, 1);
        let b = c.batch;
        assert_eq!(b.num_rows(), 3);
        let t = b
            .column_by_name("time")
            .expect("time")
            .as_primitive::<TimestampNanosecondType>()
            .clone();
        assert_eq!((t.value(0), t.value(1), t.value(2)), (5, 9, 42));
        let body = b
            .column_by_name("body")
            .expect("body")
            .as_string::<i32>()
            .clone();
        assert_eq!(body.value(1), r#"{"k":7}"#);
        assert!(body.is_null(0));
        let tid = b
            .column_by_name("trace_id")
            .expect("trace")
            .as_string::<i32>()
            .clone();
        assert!(tid.is_null(0));
        assert_eq!(tid.value(2), "01".repeat(16));
        let svc = b
            .column_by_name("service_name")
            .expect("svc")
            .as_string::<i32>()
            .clone();
        assert_eq!(svc.value(0), "unknown_service");
    }
}
