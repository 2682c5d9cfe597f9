//! `ExportTraceServiceRequest` -> `spans` batch.

use std::sync::Arc;

use arrow::array::{
    ArrayBuilder, ArrayRef, Int32Builder, Int64Builder, ListArray, StringBuilder, StructArray,
    TimestampNanosecondBuilder,
};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::{Span, span::SpanKind, status::StatusCode};

use super::attributes::{AttrBuilder, append_attrs, attr_builder, find_i64, find_str};
use super::{Converted, Rejections, check_id, hex_id, ts_ns};
use crate::schema::{Table, event_fields, link_fields};

/// Where the service graph looks for the name of an uninstrumented peer, in order.
pub const PEER_ATTRIBUTES: &[&str] = &[
    "peer.service",
    "db.namespace",
    "db.name",
    "db.system.name",
    "db.system",
    "server.address",
    "net.peer.name",
    "messaging.destination.name",
];

/// Envoy's tracer names an egress span's peer only here (after [`PEER_ATTRIBUTES`]).
pub const ENVOY_PEER_ATTRIBUTE: &str = "upstream_cluster";

/// The span attributes whose URL's host names the peer last of all.
pub const URL_ATTRIBUTES: &[&str] = &["url.full", "http.url"];

/// The host of an absolute URL (`http://cart:8080/x` → `cart`), without user, port or
/// path; `None` for a relative one.
pub fn url_host(url: &str) -> Option<&str> {
    let (_, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(v6) = host.strip_prefix('[') {
        v6.split(']').next()?
    } else {
        host.split(':').next()?
    };
    non_empty(host)
}

/// The path of an absolute or relative URL, without its query (`http://h/a/b?x` → `/a/b`).
pub fn url_path(url: &str) -> Option<&str> {
    let rest = match url.split_once("://") {
        Some((_, rest)) => &rest[rest.find('/')?..],
        None => url,
    };
    non_empty(rest.split(['?', '#']).next()?).filter(|p| p.starts_with('/'))
}

/// The peer a CLIENT or PRODUCER span names (the `peer_name` column): the first of
/// [`PEER_ATTRIBUTES`], then Envoy's `upstream_cluster`, then the host of `url.full` /
/// `http.url`.
pub fn peer_name(attrs: &[KeyValue]) -> Option<String> {
    find_str(attrs, PEER_ATTRIBUTES)
        .or_else(|| find_str(attrs, &[ENVOY_PEER_ATTRIBUTE]))
        .filter(|s| !s.is_empty())
        .or_else(|| {
            let url = find_str(attrs, URL_ATTRIBUTES)?;
            url_host(&url).map(str::to_string)
        })
}

/// Why a proxy answered a request itself (the `proxy_reason` column): meshscope's proxy
/// says so in `meshscope.proxy_response` (the `x-meshscope-proxy` answer it made or saw);
/// Envoy in `response_flags`, mapped to the same names where one exists
/// (`UO` circuit-open, `RL`/`RLSE` rate-limited, `FI` fault-abort, `UF`/`URX`
/// connect-failed/retry-limit, `UH` no-healthy-upstream, `UT`/`SI` timeout, `NR`
/// no-route, `UAEX` unauthorized, `DC`/`DPE`/…: the flag itself, lowercased).
pub fn proxy_reason(attrs: &[KeyValue]) -> Option<String> {
    if let Some(r) = find_str(attrs, &["meshscope.proxy_response"]).filter(|r| !r.is_empty()) {
        return Some(r);
    }
    let flags = find_str(attrs, &["response_flags"])?;
    envoy_reason(&flags).map(str::to_string)
}

/// Envoy's `%RESPONSE_FLAGS%` (comma-separated short flags, `-` for none) as a reason;
/// flags that only mark a request (delay injected, downstream closed) are not one.
pub fn envoy_reason(flags: &str) -> Option<&str> {
    let mut other = None;
    for flag in flags.split(',').map(str::trim) {
        let named = match flag {
            "UO" => "circuit-open",
            "RL" | "RLSE" => "rate-limited",
            "FI" => "fault-abort",
            "UF" => "connect-failed",
            "URX" => "retry-limit",
            "UH" => "no-healthy-upstream",
            "UT" | "SI" => "timeout",
            "NR" | "NC" => "no-route",
            "UAEX" | "RBAC" => "unauthorized",
            "" | "-" | "DI" | "DC" | "UC" | "UR" | "LR" | "DPE" | "UPE" | "OM" => continue,
            _ => {
                other.get_or_insert(flag);
                continue;
            }
        };
        return Some(named);
    }
    other
}

/// The `span_kind` column's text for an OTLP kind.
pub fn span_kind_name(kind: i32) -> &'static str {
    match SpanKind::try_from(kind).unwrap_or(SpanKind::Unspecified) {
        SpanKind::Unspecified => "UNSPECIFIED",
        SpanKind::Internal => "INTERNAL",
        SpanKind::Server => "SERVER",
        SpanKind::Client => "CLIENT",
        SpanKind::Producer => "PRODUCER",
        SpanKind::Consumer => "CONSUMER",
    }
}

fn status_name(code: i32) -> &'static str {
    match StatusCode::try_from(code).unwrap_or(StatusCode::Unset) {
        StatusCode::Unset => "UNSET",
        StatusCode::Ok => "OK",
        StatusCode::Error => "ERROR",
    }
}

/// The resource's `service.name` (`unknown_service` when absent, as the SDKs do).
pub(crate) fn service_name(resource_attrs: &[KeyValue]) -> String {
    find_str(resource_attrs, &["service.name"])
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown_service".to_string())
}

fn validate(span: &Span) -> Result<(), String> {
    if let Some(e) = check_id(&span.trace_id, 16, "trace_id") {
        return Err(e);
    }
    if let Some(e) = check_id(&span.span_id, 8, "span_id") {
        return Err(e);
    }
    if !span.parent_span_id.is_empty() && span.parent_span_id.len() != 8 {
        return Err(format!(
            "parent_span_id must be empty or 8 bytes, got {}",
            span.parent_span_id.len()
        ));
    }
    if span.end_time_unix_nano < span.start_time_unix_nano {
        return Err("end_time_unix_nano is before start_time_unix_nano".to_string());
    }
    Ok(())
}

struct Events {
    offsets: Vec<i32>,
    time: TimestampNanosecondBuilder,
    name: StringBuilder,
    attrs: AttrBuilder,
}

struct Links {
    offsets: Vec<i32>,
    trace_id: StringBuilder,
    span_id: StringBuilder,
    trace_state: StringBuilder,
    attrs: AttrBuilder,
}

/// Converts a trace export request. Invalid spans are counted, not stored.
pub fn spans(req: &ExportTraceServiceRequest) -> Result<Converted, ArrowError> {
    let n: usize = req
        .resource_spans
        .iter()
        .flat_map(|r| &r.scope_spans)
        .map(|s| s.spans.len())
        .sum();
    let tz = "UTC";
    let mut start = TimestampNanosecondBuilder::with_capacity(n).with_timezone(tz);
    let mut end = TimestampNanosecondBuilder::with_capacity(n).with_timezone(tz);
    let mut duration = Int64Builder::with_capacity(n);
    let mut trace_id = StringBuilder::with_capacity(n, n * 32);
    let mut span_id = StringBuilder::with_capacity(n, n * 16);
    let mut parent = StringBuilder::with_capacity(n, n * 16);
    let mut trace_state = StringBuilder::new();
    let mut service = StringBuilder::with_capacity(n, n * 16);
    let mut namespace = StringBuilder::new();
    let mut version = StringBuilder::new();
    let mut name = StringBuilder::with_capacity(n, n * 24);
    let mut kind = StringBuilder::with_capacity(n, n * 6);
    let mut status = StringBuilder::with_capacity(n, n * 5);
    let mut status_msg = StringBuilder::new();
    let mut http_method = StringBuilder::new();
    let mut http_route = StringBuilder::new();
    let mut http_status = Int32Builder::with_capacity(n);
    let mut peer_service = StringBuilder::new();
    let mut peer = StringBuilder::new();
    let mut reason = StringBuilder::new();
    let mut mirror = StringBuilder::new();
    let mut server_address = StringBuilder::new();
    let mut scope_name = StringBuilder::new();
    let mut scope_version = StringBuilder::new();
    let mut span_attrs = attr_builder(n, 12);
    let mut res_attrs = attr_builder(n, 4);
    let mut events = Events {
        offsets: vec![0],
        time: TimestampNanosecondBuilder::new().with_timezone(tz),
        name: StringBuilder::new(),
        attrs: attr_builder(0, 0),
    };
    let mut links = Links {
        offsets: vec![0],
        trace_id: StringBuilder::new(),
        span_id: StringBuilder::new(),
        trace_state: StringBuilder::new(),
        attrs: attr_builder(0, 0),
    };
    let mut rejections = Rejections::default();
    let mut buf = [0u8; 64];

    for rs in &req.resource_spans {
        let rattrs: &[KeyValue] = rs
            .resource
            .as_ref()
            .map(|r| r.attributes.as_slice())
            .unwrap_or(&[]);
        let svc = service_name(rattrs);
        let ns = find_str(rattrs, &["service.namespace"]);
        let ver = find_str(rattrs, &["service.version"]).filter(|v| !v.is_empty());
        for ss in &rs.scope_spans {
            let (sname, sversion) = match &ss.scope {
                Some(s) => (Some(s.name.as_str()), Some(s.version.as_str())),
                None => (None, None),
            };
            for span in &ss.spans {
                if let Err(why) = validate(span) {
                    rejections.reject(|| format!("span {:?} of {svc}: {why}", span.name));
                    continue;
                }
                let s = ts_ns(span.start_time_unix_nano);
                let e = ts_ns(span.end_time_unix_nano);
                start.append_value(s);
                end.append_value(e);
                duration.append_value(e - s);
                trace_id.append_value(hex_id(&span.trace_id, &mut buf));
                span_id.append_value(hex_id(&span.span_id, &mut buf));
                if span.parent_span_id.is_empty() || span.parent_span_id.iter().all(|b| *b == 0) {
                    parent.append_null();
                } else {
                    parent.append_value(hex_id(&span.parent_span_id, &mut buf));
                }
                trace_state.append_option(non_empty(&span.trace_state));
                service.append_value(&svc);
                namespace.append_option(ns.as_deref());
                version.append_option(ver.as_deref());
                name.append_value(&span.name);
                kind.append_value(span_kind_name(span.kind));
                let (code, msg) = span
                    .status
                    .as_ref()
                    .map(|st| (st.code, st.message.as_str()))
                    .unwrap_or((0, ""));
                status.append_value(status_name(code));
                status_msg.append_option(non_empty(msg));
                let a = &span.attributes;
                http_method.append_option(find_str(a, &["http.request.method", "http.method"]));
                http_route.append_option(find_str(a, &["http.route"]));
                http_status.append_option(
                    find_i64(a, &["http.response.status_code", "http.status_code"])
                        .and_then(|v| i32::try_from(v).ok()),
                );
                peer_service.append_option(find_str(a, &["peer.service"]));
                let kind_code = SpanKind::try_from(span.kind).unwrap_or(SpanKind::Unspecified);
                if matches!(kind_code, SpanKind::Client | SpanKind::Producer) {
                    peer.append_option(peer_name(a));
                } else {
                    peer.append_null();
                }
                reason.append_option(proxy_reason(a));
                mirror.append_option(
                    find_str(a, &["meshscope.mirror"]).filter(|m| m == "shadow" || m == "primary"),
                );
                server_address.append_option(find_str(a, &["server.address", "net.peer.name"]));
                scope_name.append_option(sname.and_then(non_empty));
                scope_version.append_option(sversion.and_then(non_empty));
                append_attrs(&mut span_attrs, a);
                append_attrs(&mut res_attrs, rattrs);
                for ev in &span.events {
                    events.time.append_value(ts_ns(ev.time_unix_nano));
                    events.name.append_value(&ev.name);
                    append_attrs(&mut events.attrs, &ev.attributes);
                }
                events.offsets.push(events.time.len() as i32);
                for l in &span.links {
                    links.trace_id.append_value(hex_id(&l.trace_id, &mut buf));
                    links.span_id.append_value(hex_id(&l.span_id, &mut buf));
                    links.trace_state.append_option(non_empty(&l.trace_state));
                    append_attrs(&mut links.attrs, &l.attributes);
                }
                links.offsets.push(links.trace_id.len() as i32);
            }
        }
    }

    let events_struct = StructArray::try_new(
        event_fields(),
        vec![
            Arc::new(events.time.finish()) as ArrayRef,
            Arc::new(events.name.finish()),
            Arc::new(events.attrs.finish()),
        ],
        None,
    )?;
    let links_struct = StructArray::try_new(
        link_fields(),
        vec![
            Arc::new(links.trace_id.finish()) as ArrayRef,
            Arc::new(links.span_id.finish()),
            Arc::new(links.trace_state.finish()),
            Arc::new(links.attrs.finish()),
        ],
        None,
    )?;
    let list = |fields, offsets: Vec<i32>, values: StructArray| -> Result<ArrayRef, ArrowError> {
        let item = Arc::new(Field::new("item", DataType::Struct(fields), true));
        Ok(Arc::new(ListArray::try_new(
            item,
            OffsetBuffer::new(offsets.into()),
            Arc::new(values),
            None,
        )?))
    };

    let columns: Vec<ArrayRef> = vec![
        Arc::new(start.finish()),
        Arc::new(end.finish()),
        Arc::new(duration.finish()),
        Arc::new(trace_id.finish()),
        Arc::new(span_id.finish()),
        Arc::new(parent.finish()),
        Arc::new(trace_state.finish()),
        Arc::new(service.finish()),
        Arc::new(namespace.finish()),
        Arc::new(version.finish()),
        Arc::new(name.finish()),
        Arc::new(kind.finish()),
        Arc::new(status.finish()),
        Arc::new(status_msg.finish()),
        Arc::new(http_method.finish()),
        Arc::new(http_route.finish()),
        Arc::new(http_status.finish()),
        Arc::new(peer_service.finish()),
        Arc::new(server_address.finish()),
        Arc::new(peer.finish()),
        Arc::new(reason.finish()),
        Arc::new(mirror.finish()),
        Arc::new(scope_name.finish()),
        Arc::new(scope_version.finish()),
        Arc::new(span_attrs.finish()),
        Arc::new(res_attrs.finish()),
        list(event_fields(), events.offsets, events_struct)?,
        list(link_fields(), links.offsets, links_struct)?,
    ];
    let batch = RecordBatch::try_new(Table::Spans.schema(), columns)?;
    let (rejected, message) = rejections.into_parts();
    Ok(Converted {
        batch,
        rejected,
        message,
    })
}

pub(crate) fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray, MapArray};
    use arrow::datatypes::Int64Type;
    use opentelemetry_proto::tonic::common::v1::{AnyValue, any_value::Value};
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Status, span::Event};

    fn kv(k: &str, v: Value) -> KeyValue {
        KeyValue {
            key: k.into(),
            value: Some(AnyValue { value: Some(v) }),
            ..Default::default()
        }
    }

    fn span(trace: u8, id: u8, parent: Option<u8>) -> Span {
        Span {
            trace_id: vec![trace; 16],
            span_id: vec![id; 8],
            parent_span_id: parent.map(|p| vec![p; 8]).unwrap_or_default(),
            name: format!("op{id}"),
            kind: SpanKind::Server as i32,
            start_time_unix_nano: 1_000,
            end_time_unix_nano: 1_500,
            attributes: vec![
                kv("http.route", Value::StringValue("/cart".into())),
                kv("http.status_code", Value::IntValue(503)),
            ],
            status: Some(Status {
                code: StatusCode::Error as i32,
                message: "boom".into(),
            }),
            events: vec![Event {
                time_unix_nano: 1_200,
                name: "retry".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn request(spans: Vec<Span>) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", Value::StringValue("cart".into()))],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    #[test]
    fn peers_are_named_as_envoy_and_the_semantic_conventions_name_them() {
        let s = |k: &str, v: &str| kv(k, Value::StringValue(v.into()));
        assert_eq!(url_host("http://cart:8080/x?y"), Some("cart"));
        assert_eq!(
            url_host("https://user:pw@pay.example.com/charge"),
            Some("pay.example.com")
        );
        assert_eq!(url_host("http://[::1]:9000/"), Some("::1"));
        assert_eq!(url_host("/relative/path"), None);
        assert_eq!(url_path("http://cart:8080/a/b?x=1#f"), Some("/a/b"));
        assert_eq!(url_path("/stock?sku=1"), Some("/stock"));
        assert_eq!(url_path("http://cart:8080"), None);
        // The contract's order first, then Envoy's upstream cluster, then the URL's host.
        assert_eq!(
            peer_name(&[
                s("http.url", "http://a/"),
                s("upstream_cluster", "b"),
                s("peer.service", "c")
            ]),
            Some("c".to_string())
        );
        assert_eq!(
            peer_name(&[s("http.url", "http://a/"), s("upstream_cluster", "b")]),
            Some("b".to_string())
        );
        assert_eq!(
            peer_name(&[s("url.full", "https://a:443/")]),
            Some("a".to_string())
        );
        assert_eq!(peer_name(&[s("peer.address", "10.0.0.1")]), None);
    }

    #[test]
    fn proxy_reasons_from_meshscope_and_envoy() {
        let s = |k: &str, v: &str| kv(k, Value::StringValue(v.into()));
        assert_eq!(
            proxy_reason(&[
                s("meshscope.proxy_response", "circuit-open"),
                s("response_flags", "RL")
            ]),
            Some("circuit-open".to_string())
        );
        assert_eq!(
            proxy_reason(&[s("response_flags", "UO")]),
            Some("circuit-open".to_string())
        );
        assert_eq!(proxy_reason(&[s("response_flags", "-")]), None);
        assert_eq!(proxy_reason(&[]), None);
        // Marks that are not an answer give way to one that is; unknown flags stay as they are.
        assert_eq!(envoy_reason("DI,FI"), Some("fault-abort"));
        assert_eq!(envoy_reason("DC"), None);
        assert_eq!(envoy_reason("XYZ"), Some("XYZ"));
        assert_eq!(envoy_reason("UF,URX"), Some("connect-failed"));
    }

    #[test]
    fn converts_columns_and_promotes_attributes() {
        let c =
            spans(&request(vec![span(0xAB, 1, None), span(0xAB, 2, Some(1))])).expect("convert");
        assert_eq!(c.rejected, 0);
        let b = &c.batch;
        assert_eq!(b.num_rows(), 2);
        let col = |n: &str| b.column_by_name(n).expect(n).clone();
        assert_eq!(col("trace_id").as_string::<i32>().value(0), "ab".repeat(16));
        assert!(col("parent_span_id").is_null(0));
        assert_eq!(
            col("parent_span_id").as_string::<i32>().value(1),
            "01".repeat(8)
        );
        assert_eq!(col("duration_ns").as_primitive::<Int64Type>().value(0), 500);
        assert_eq!(col("span_kind").as_string::<i32>().value(0), "SERVER");
        assert_eq!(col("status_code").as_string::<i32>().value(0), "ERROR");
        assert_eq!(col("http_route").as_string::<i32>().value(0), "/cart");
        assert_eq!(
            col("http_status_code")
                .as_primitive::<arrow::datatypes::Int32Type>()
                .value(0),
            503
        );
        assert_eq!(col("service_name").as_string::<i32>().value(1), "cart");
        let attrs = col("span_attributes");
        let m: &MapArray = attrs.as_map();
        assert_eq!(m.value(0).len(), 2);
        let events = col("events");
        assert_eq!(events.as_list::<i32>().value(0).len(), 1);
    }

    #[test]
    fn rejects_bad_ids_and_keeps_the_rest() {
        let mut bad_trace = span(1, 1, None);
        bad_trace.trace_id = vec![1; 5];
        let mut zero_span = span(1, 2, None);
        zero_span.span_id = vec![0; 8];
        let mut backwards = span(1, 3, None);
        backwards.end_time_unix_nano = 10;
        let c = spans(&request(vec![
            bad_trace,
            zero_span,
            backwards,
            span(1, 4, None),
        ]))
        .expect("convert");
        assert_eq!(c.batch.num_rows(), 1);
        assert_eq!(c.rejected, 3);
        let msg = c.message.expect("message");
        assert!(msg.contains("trace_id must be 16 bytes"), "{msg}");
        assert!(msg.contains("span_id must not be all zeros"), "{msg}");
    }

    #[test]
    fn missing_service_name_is_unknown_service() {
        let mut req = request(vec![span(1, 1, None)]);
        req.resource_spans[0].resource = None;
        let c = spans(&req).expect("convert");
        let svc = c.batch.column_by_name("service_name").expect("col").clone();
        assert_eq!(svc.as_string::<i32>().value(0), "unknown_service");
    }
}
