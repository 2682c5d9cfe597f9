//! OTLP in: real SDK exporters over gRPC and HTTP, the specification's JSON examples,
//! partial success, and garbage of every kind.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::{Server, testdata};
use opentelemetry::KeyValue;
use opentelemetry::logs::{AnyValue, LogRecord as _, Logger as _, LoggerProvider as _, Severity};
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry::trace::{
    Span as _, SpanKind, TraceContextExt as _, Tracer as _, TracerProvider as _,
};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{
    AnyValue as PAnyValue, KeyValue as PKeyValue, KeyValueList, any_value,
};
use opentelemetry_proto::tonic::resource::v1::Resource as PResource;
use opentelemetry_proto::tonic::trace::v1::Span as PSpan;
use opentelemetry_sdk::Resource;
use prost::Message;

fn resource(service: &str) -> Resource {
    Resource::builder()
        .with_service_name(service.to_string())
        .build()
}

/// Polls a count until it reaches `want` (data must be visible within 2 s of the ack).
async fn eventually(server: &Server, sql: &str, want: i64) {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let got = server.scalar(sql).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{sql}: {got}, want {want} within 2 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn send_traces_over_http(endpoint: String, protocol: Protocol, service: &str, spans: usize) {
    let service = service.to_string();
    std::thread::spawn(move || {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(protocol)
            .with_endpoint(endpoint)
            .build()
            .expect("http exporter");
        let provider = common::otlp::sdk_tracer_provider(exporter, &service);
        let tracer = provider.tracer("e2e");
        for i in 0..spans {
            let mut span = tracer
                .span_builder(format!("GET /item/{i}"))
                .with_kind(SpanKind::Server)
                .with_attributes(vec![
                    KeyValue::new("http.route", "/item/{id}"),
                    KeyValue::new("http.response.status_code", 200),
                ])
                .start(&tracer);
            span.end();
        }
        provider.shutdown().expect("shutdown flushes every span");
    })
    .join()
    .expect("http exporter thread");
}

#[tokio::test(flavor = "multi_thread")]
async fn sdk_exporters_over_grpc_and_http_land_in_sql() {
    let server = Server::in_temp_dir(&[]);

    // Traces over gRPC (tonic), with a parent and a child.
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(server.grpc_url())
        .build()
        .expect("grpc exporter");
    let provider = common::otlp::sdk_tracer_provider(exporter, "checkout");
    let tracer = provider.tracer("e2e");
    let mut parent = tracer
        .span_builder("POST /checkout")
        .with_kind(SpanKind::Server)
        .with_attributes(vec![
            KeyValue::new("http.route", "/checkout"),
            KeyValue::new("http.request.method", "POST"),
        ])
        .start(&tracer);
    let cx = opentelemetry::Context::new().with_remote_span_context(parent.span_context().clone());
    let mut child = tracer
        .span_builder("GET payments")
        .with_kind(SpanKind::Client)
        .with_attributes(vec![KeyValue::new("peer.service", "payments")])
        .start_with_context(&tracer, &cx);
    child.end();
    parent.end();
    provider.shutdown().expect("grpc exporter shutdown");
    eventually(
        &server,
        "SELECT count(*) FROM spans WHERE service_name = 'checkout'",
        2,
    )
    .await;
    let v = server
        .sql("SELECT span_name, span_kind, http_route, http_method, peer_service, parent_span_id IS NULL AS root, span_attributes['http.route'] AS r FROM spans WHERE service_name = 'checkout' ORDER BY span_name DESC")
        .await;
    assert_eq!(
        v["rows"][0],
        serde_json::json!([
            "POST /checkout",
            "SERVER",
            "/checkout",
            "POST",
            null,
            true,
            "/checkout"
        ])
    );
    assert_eq!(
        v["rows"][1],
        serde_json::json!([
            "GET payments",
            "CLIENT",
            null,
            null,
            "payments",
            false,
            null
        ])
    );
    let linked = server
        .scalar("SELECT count(*) FROM spans c JOIN spans p ON c.parent_span_id = p.span_id AND c.trace_id = p.trace_id WHERE c.service_name = 'checkout'")
        .await;
    assert_eq!(linked, 1, "the child points at its parent");

    // Traces over HTTP, protobuf and JSON.
    send_traces_over_http(
        server.otlp_url("/v1/traces"),
        Protocol::HttpBinary,
        "cart",
        25,
    );
    send_traces_over_http(
        server.otlp_url("/v1/traces"),
        Protocol::HttpJson,
        "payments",
        15,
    );
    eventually(
        &server,
        "SELECT count(*) FROM spans WHERE service_name = 'cart' AND http_status_code = 200",
        25,
    )
    .await;
    eventually(
        &server,
        "SELECT count(*) FROM spans WHERE service_name = 'payments' AND http_route = '/item/{id}'",
        15,
    )
    .await;

    // Logs over gRPC.
    let exporter = opentelemetry_otlp::LogExporter::builder()
        .with_tonic()
        .with_endpoint(server.grpc_url())
        .build()
        .expect("log exporter");
    let logs = opentelemetry_sdk::logs::SdkLoggerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource("inventory"))
        .build();
    let logger = logs.logger("e2e");
    for i in 0..3 {
        let mut rec = logger.create_log_record();
        rec.set_body(AnyValue::from(format!("stock low for sku {i}")));
        rec.set_severity_number(Severity::Warn);
        rec.set_severity_text("WARN");
        rec.add_attribute("sku", i as i64);
        logger.emit(rec);
    }
    logs.shutdown().expect("log exporter shutdown");
    eventually(
        &server,
        "SELECT count(*) FROM logs WHERE service_name = 'inventory' AND severity_number = 13",
        3,
    )
    .await;
    let v = server.sql("SELECT body, log_attributes['sku'] FROM logs WHERE service_name = 'inventory' ORDER BY body").await;
    assert_eq!(
        v["rows"][2],
        serde_json::json!(["stock low for sku 2", "2"])
    );

    // Metrics over gRPC: a counter and a histogram.
    let exporter = opentelemetry_otlp::MetricExporter::builder()
        .with_tonic()
        .with_endpoint(server.grpc_url())
        .build()
        .expect("metric exporter");
    let meters = opentelemetry_sdk::metrics::SdkMeterProvider::builder()
        .with_periodic_exporter(exporter)
        .with_resource(resource("frontend"))
        .build();
    let meter = meters.meter("e2e");
    let counter = meter.u64_counter("requests").build();
    counter.add(5, &[KeyValue::new("route", "/")]);
    counter.add(2, &[KeyValue::new("route", "/cart")]);
    let hist = meter.f64_histogram("latency_ms").build();
    for v in [1.0, 2.0, 40.0] {
        hist.record(v, &[]);
    }
    meters.shutdown().expect("metric exporter shutdown");
    eventually(
        &server,
        "SELECT count(*) FROM metrics WHERE service_name = 'frontend' AND metric_name = 'requests'",
        2,
    )
    .await;
    let v = server
        .sql("SELECT CAST(value AS BIGINT), is_monotonic, temporality FROM metrics WHERE metric_name = 'requests' AND attributes['route'] = '/'")
        .await;
    assert_eq!(v["rows"][0], serde_json::json!([5, true, "cumulative"]));
    let v = server
        .sql("SELECT count, sum, metric_type FROM metrics WHERE metric_name = 'latency_ms'")
        .await;
    assert_eq!(v["rows"][0], serde_json::json!([3, 43.0, "histogram"]));
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).expect("gzip");
    e.finish().expect("gzip")
}

async fn post(
    server: &Server,
    path: &str,
    content_type: &str,
    encoding: Option<&str>,
    body: Vec<u8>,
) -> (u16, Vec<u8>) {
    let mut req = reqwest::Client::new()
        .post(server.otlp_url(path))
        .header("content-type", content_type)
        .body(body);
    if let Some(e) = encoding {
        req = req.header("content-encoding", e);
    }
    let r = req.send().await.expect("POST");
    let status = r.status().as_u16();
    (status, r.bytes().await.expect("body").to_vec())
}

#[tokio::test(flavor = "multi_thread")]
async fn otlp_json_examples_with_upper_case_ids_and_gzip() {
    let server = Server::in_temp_dir(&[]);
    let (s, body) = post(
        &server,
        "/v1/traces",
        "application/json",
        None,
        testdata("trace.json"),
    )
    .await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&body).expect("json"),
        serde_json::json!({})
    );
    let (s, _) = post(
        &server,
        "/v1/metrics",
        "application/json",
        Some("gzip"),
        gzip(&testdata("metrics.json")),
    )
    .await;
    assert_eq!(s, 200);
    let (s, _) = post(
        &server,
        "/v1/logs",
        "application/json; charset=utf-8",
        None,
        testdata("logs.json"),
    )
    .await;
    assert_eq!(s, 200);

    let v = server
        .sql("SELECT trace_id, span_id, parent_span_id, service_name, span_kind, CAST(start_time AS VARCHAR), duration_ns, scope_name, span_attributes['my.span.attr'] FROM spans")
        .await;
    assert_eq!(
        v["rows"][0],
        serde_json::json!([
            "5b8efff798038103d269b633813fc60c",
            "eee19b7ec3c1b174",
            "eee19b7ec3c1b173",
            "my.service",
            "SERVER",
            "2018-12-13T14:51:00Z",
            1_000_000_000i64,
            "my.library",
            "some value"
        ])
    );
    assert_eq!(
        server
            .scalar(
                "SELECT count(*) FROM spans WHERE trace_id = '5b8efff798038103d269b633813fc60c'"
            )
            .await,
        1
    );
    let v = server
        .sql("SELECT metric_name, metric_type FROM metrics ORDER BY metric_name")
        .await;
    assert_eq!(
        v["rows"],
        serde_json::json!([
            ["my.counter", "sum"],
            ["my.gauge", "gauge"],
            ["my.histogram", "histogram"]
        ])
    );
    let v = server
        .sql("SELECT body, trace_id, span_id, severity_text FROM logs")
        .await;
    assert_eq!(
        v["rows"][0],
        serde_json::json!([
            "Example log record",
            "5b8efff798038103d269b633813fc60c",
            "eee19b7ec3c1b174",
            "Information"
        ])
    );
    let v = server
        .sql("SELECT bucket_counts, explicit_bounds FROM metrics WHERE metric_type = 'histogram'")
        .await;
    // Stored as sent (the example itself carries three counts for one bound).
    assert_eq!(v["rows"][0], serde_json::json!([[1, 1, 1], [1.0]]));
}

fn span(trace: Vec<u8>, id: u8, name: &str) -> PSpan {
    PSpan {
        trace_id: trace,
        span_id: vec![id; 8],
        name: name.into(),
        kind: 2,
        start_time_unix_nano: 1_700_000_000_000_000_000,
        end_time_unix_nano: 1_700_000_000_100_000_000,
        ..Default::default()
    }
}

fn request(service: &str, spans: Vec<PSpan>) -> ExportTraceServiceRequest {
    common::otlp::traces(service, spans)
}

#[tokio::test(flavor = "multi_thread")]
async fn partial_success_keeps_the_good_records() {
    let server = Server::in_temp_dir(&[]);
    let req = request(
        "partial",
        vec![
            span(vec![7; 16], 1, "good"),
            span(vec![7; 5], 2, "short id"),
            span(vec![7; 16], 3, "good too"),
        ],
    );

    // HTTP protobuf.
    let (s, body) = post(
        &server,
        "/v1/traces",
        "application/x-protobuf",
        None,
        req.encode_to_vec(),
    )
    .await;
    assert_eq!(s, 200);
    let resp = ExportTraceServiceResponse::decode(&body[..]).expect("protobuf answer");
    let partial = resp.partial_success.expect("partial_success");
    assert_eq!(partial.rejected_spans, 1);
    assert!(
        partial.error_message.contains("trace_id must be 16 bytes"),
        "{}",
        partial.error_message
    );

    // gRPC.
    let mut client = TraceServiceClient::connect(server.grpc_url())
        .await
        .expect("connect");
    let mut req2 = req.clone();
    req2.resource_spans[0].resource = Some(PResource {
        attributes: vec![PKeyValue {
            key: "service.name".into(),
            value: Some(PAnyValue {
                value: Some(any_value::Value::StringValue("partial-grpc".into())),
            }),
            ..Default::default()
        }],
        ..Default::default()
    });
    let resp = client.export(req2).await.expect("export").into_inner();
    assert_eq!(
        resp.partial_success
            .expect("partial_success")
            .rejected_spans,
        1
    );

    // HTTP JSON: a 2-byte trace id decodes but is rejected; the rest is kept.
    let json = r#"{"resourceSpans":[{"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"partial-json"}}]},
        "scopeSpans":[{"spans":[
          {"traceId":"ABCD","spanId":"0102030405060708","name":"bad","kind":2,"startTimeUnixNano":"1","endTimeUnixNano":"2"},
          {"traceId":"0102030405060708090A0B0C0D0E0F10","spanId":"0102030405060708","name":"ok","kind":2,"startTimeUnixNano":"1","endTimeUnixNano":2}
        ]}]}]}"#;
    let (s, body) = post(
        &server,
        "/v1/traces",
        "application/json",
        None,
        json.as_bytes().to_vec(),
    )
    .await;
    assert_eq!(s, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(
        v["partialSuccess"]["rejectedSpans"].as_i64().or_else(|| {
            v["partialSuccess"]["rejectedSpans"]
                .as_str()
                .and_then(|s| s.parse().ok())
        }),
        Some(1),
        "{v}"
    );

    let v = server
        .sql("SELECT service_name, count(*) FROM spans GROUP BY service_name ORDER BY service_name")
        .await;
    assert_eq!(
        v["rows"],
        serde_json::json!([["partial", 2], ["partial-grpc", 2], ["partial-json", 1]])
    );
}

fn nested_json(depth: usize) -> Vec<u8> {
    let mut value = r#"{"stringValue":"leaf"}"#.to_string();
    for _ in 0..depth {
        value = format!(r#"{{"kvlistValue":{{"values":[{{"key":"k","value":{value}}}]}}}}"#);
    }
    format!(
        r#"{{"resourceSpans":[{{"scopeSpans":[{{"spans":[{{"traceId":"0102030405060708090a0b0c0d0e0f10","spanId":"0102030405060708","name":"deep","startTimeUnixNano":"1","endTimeUnixNano":"2","attributes":[{{"key":"deep","value":{value}}}]}}]}}]}}]}}"#
    )
    .into_bytes()
}

fn nested_protobuf(depth: usize) -> Vec<u8> {
    let mut v = PAnyValue {
        value: Some(any_value::Value::StringValue("leaf".into())),
    };
    for _ in 0..depth {
        v = PAnyValue {
            value: Some(any_value::Value::KvlistValue(KeyValueList {
                values: vec![PKeyValue {
                    key: "k".into(),
                    value: Some(v),
                    ..Default::default()
                }],
            })),
        };
    }
    let mut s = span(vec![9; 16], 9, "deep");
    s.attributes = vec![PKeyValue {
        key: "deep".into(),
        value: Some(v),
        ..Default::default()
    }];
    request("deep", vec![s]).encode_to_vec()
}

/// Sends one gRPC call with a raw (possibly invalid) protobuf message; returns grpc-status.
async fn raw_grpc(server: &Server, message: &[u8]) -> String {
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(message);
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("h2 client");
    let r = client
        .post(format!(
            "{}/opentelemetry.proto.collector.trace.v1.TraceService/Export",
            server.grpc_url()
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(frame)
        .send()
        .await
        .expect("gRPC POST");
    if let Some(s) = r.headers().get("grpc-status") {
        return s.to_str().expect("status").to_string();
    }
    // Trailers-only answers carry the status in headers; others in trailers.
    let mut r = r;
    let _ = r.chunk().await;
    "no status".into()
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_gets_clear_errors_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    // A 1 MiB body limit keeps the bombs small (and the test fast in a debug build).
    let mut server = Server::start_with(&dir.path().join("data"), &["--max-body-bytes", "1048576"]);
    let keep = request("keeper", vec![span(vec![1; 16], 1, "kept")]);
    assert_eq!(
        post(
            &server,
            "/v1/traces",
            "application/x-protobuf",
            None,
            keep.encode_to_vec()
        )
        .await
        .0,
        200
    );

    let good = request("never", vec![span(vec![2; 16], 2, "x"); 20]).encode_to_vec();
    // (what, content type, content encoding, body, expected status)
    type Case<'a> = (&'a str, &'a str, Option<&'a str>, Vec<u8>, u16);
    let cases: Vec<Case<'_>> = vec![
        ("truncated protobuf", "application/x-protobuf", None, good[..good.len() / 2].to_vec(), 400),
        ("random bytes", "application/x-protobuf", None, vec![0xff; 64], 400),
        ("broken JSON", "application/json", None, br#"{"resourceSpans":[{"scopeSpans":"#.to_vec(), 400),
        ("odd-length hex id", "application/json", None,
            br#"{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"abc","spanId":"0102030405060708"}]}]}]}"#.to_vec(), 400),
        ("wrong content type", "text/plain", None, good.clone(), 415),
        ("unknown content encoding", "application/x-protobuf", Some("br"), good.clone(), 415),
        ("invalid gzip", "application/x-protobuf", Some("gzip"), b"not gzip at all".to_vec(), 400),
        ("gzip bomb", "application/x-protobuf", Some("gzip"), gzip(&vec![0u8; 8 << 20]), 413),
        ("oversized body", "application/x-protobuf", None, vec![0u8; 2 << 20], 413),
        ("deeply nested JSON", "application/json", None, nested_json(500), 400),
        ("deeply nested protobuf", "application/x-protobuf", None, nested_protobuf(500), 400),
    ];
    for (what, ct, enc, body, want) in cases {
        let (status, answer) = post(&server, "/v1/traces", ct, enc, body).await;
        assert_eq!(status, want, "{what}: {}", String::from_utf8_lossy(&answer));
        assert!(!answer.is_empty(), "{what}: the error says why");
        assert!(server.is_running(), "{what} must not take the server down");
    }
    // JSON errors come back as JSON with a readable message.
    let (_, answer) = post(
        &server,
        "/v1/traces",
        "application/json",
        None,
        b"{".to_vec(),
    )
    .await;
    let v: serde_json::Value = serde_json::from_slice(&answer).expect("JSON error body");
    assert!(
        v["message"]
            .as_str()
            .expect("message")
            .contains("invalid OTLP/JSON"),
        "{v}"
    );

    // gRPC: undecodable message -> INVALID_ARGUMENT; oversized -> RESOURCE_EXHAUSTED.
    assert_eq!(raw_grpc(&server, &[0xff; 32]).await, "3");
    let mut client = TraceServiceClient::connect(server.grpc_url())
        .await
        .expect("connect")
        .max_encoding_message_size(64 << 20);
    let mut huge = span(vec![3; 16], 3, "huge");
    huge.attributes = vec![PKeyValue {
        key: "blob".into(),
        value: Some(PAnyValue {
            value: Some(any_value::Value::StringValue("x".repeat(2 << 20))),
        }),
        ..Default::default()
    }];
    let err = client
        .export(request("huge", vec![huge]))
        .await
        .expect_err("too large");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");

    // A moderately nested value (within the limits) is stored, as JSON text.
    let (s, _) = post(
        &server,
        "/v1/traces",
        "application/json",
        None,
        nested_json(20),
    )
    .await;
    assert_eq!(s, 200);
    let v = server
        .sql("SELECT span_attributes['deep'] FROM spans WHERE span_name = 'deep'")
        .await;
    assert!(
        v["rows"][0][0]
            .as_str()
            .expect("text")
            .starts_with(r#"{"k":{"k":"#),
        "{v}"
    );

    // Nothing else was lost or added.
    assert!(server.is_running());
    let v = server
        .sql("SELECT service_name, span_name FROM spans ORDER BY service_name")
        .await;
    assert_eq!(
        v["rows"],
        serde_json::json!([["keeper", "kept"], ["unknown_service", "deep"]])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn overload_is_a_retryable_answer_not_unbounded_memory() {
    let dir = tempfile::tempdir().expect("tmp");
    // A buffer limit of one byte: every write finds the buffers full.
    let server = Server::start_with(&dir.path().join("data"), &["--max-buffered-bytes", "1"]);
    let req = request("overloaded", vec![span(vec![4; 16], 4, "x")]);
    let r = reqwest::Client::new()
        .post(server.otlp_url("/v1/traces"))
        .header("content-type", "application/x-protobuf")
        .body(req.encode_to_vec())
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let mut client = TraceServiceClient::connect(server.grpc_url())
        .await
        .expect("connect");
    let err = client.export(req).await.expect_err("overloaded");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    assert!(err.message().contains("retry later"), "{err}");
    assert_eq!(server.scalar("SELECT count(*) FROM spans").await, 0);
    let metrics = server.get_text("/metrics").await;
    assert!(
        metrics.contains(r#"meshscope_ingest_refused_requests_total{table="spans"} 2"#),
        "{metrics}"
    );
}

/// `meshscope bench overload` at a small scale: ten times the measured rate is refused
/// retryably (`UNAVAILABLE`), the server takes exports again once the load stops, and
/// every acknowledged span is stored. (The figures at full scale are in BENCHMARKS.md.)
#[test]
fn overload_is_refused_retryably_and_every_acknowledged_span_is_kept() {
    let out = std::process::Command::new(common::binary())
        .args([
            "bench",
            "overload",
            "--calibrate-secs",
            "3",
            "--seconds",
            "5",
        ])
        .args(["--batch", "500", "--max-buffered-bytes", "16777216"])
        .output()
        .expect("meshscope bench overload");
    let text = String::from_utf8_lossy(&out.stdout);
    common::assert_success(&out, &format!("{text}\n"));
    let line = |key: &str| {
        text.lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("no {key:?} in\n{text}"))
            .to_string()
    };
    assert!(line("complete").contains("yes"), "{text}");
    assert!(line("recovered").contains(" in "), "{text}");
    assert!(line("failed otherwise").ends_with(" 0"), "{text}");
    let refused: u64 = line("refused (UNAVAILABLE)")
        .split_whitespace()
        .nth(2)
        .and_then(|n| n.parse().ok())
        .expect("refused count");
    assert!(refused > 0, "ten times the rate was never refused:\n{text}");
}

/// `--max-inflight-exports`: an export beyond the bound is refused at once (503 with
/// `Retry-After`, gRPC `UNAVAILABLE`) while the admitted one is still being received.
#[tokio::test(flavor = "multi_thread")]
async fn exports_beyond_the_inflight_bound_are_refused_at_once() {
    use std::io::Write;
    let server = Server::in_temp_dir(&["--max-inflight-exports", "1"]);
    // An export whose body has not arrived yet holds the only place.
    let mut slow = std::net::TcpStream::connect(("127.0.0.1", server.otlp_http)).expect("connect");
    write!(
        slow,
        "POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{{"
    )
    .expect("headers");
    slow.flush().expect("flush");
    let body = common::testdata("trace.json");
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = loop {
        let r = reqwest::Client::new()
            .post(server.otlp_url("/v1/traces"))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .expect("POST");
        if r.status() == 503 {
            break r;
        }
        assert!(Instant::now() < deadline, "never refused: {}", r.status());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(refused.headers()["retry-after"], "1");
    let text = refused.text().await.expect("body");
    assert!(text.contains("--max-inflight-exports"), "{text}");
    let mut client = TraceServiceClient::connect(server.grpc_url())
        .await
        .expect("connect");
    let err = client
        .export(request("busy", vec![span(vec![5; 16], 5, "x")]))
        .await
        .expect_err("no place");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    assert!(server.metric("meshscope_ingest_shed_requests_total").await >= Some(2.0));
    // Once the slow export goes away, exports are taken again.
    drop(slow);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client
            .export(request("again", vec![span(vec![6; 16], 6, "x")]))
            .await
        {
            Ok(_) => break,
            Err(e) if e.code() == tonic::Code::Unavailable => {}
            Err(e) => panic!("{e}"),
        }
        assert!(Instant::now() < deadline, "the place was not given back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
