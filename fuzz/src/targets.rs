//! The targets and their seeds.

use std::path::PathBuf;

use bytes::BytesMut;
use datafusion::sql::parser::DFParser;
use datafusion_postgres::pgwire::messages::{DecodeContext, PgWireFrontendMessage};
use meshscope_proto::convert;
use meshscope_query::readonly::{self, Surface};
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;

use crate::Target;

pub fn targets() -> Vec<Target> {
    vec![
        Target {
            name: "otlp_protobuf",
            run: otlp_protobuf,
            seeds: protobuf_seeds,
            text: false,
        },
        Target {
            name: "otlp_json",
            run: otlp_json,
            seeds: json_seeds,
            text: true,
        },
        Target {
            name: "traceparent",
            run: traceparent,
            seeds: traceparent_seeds,
            text: true,
        },
        Target {
            name: "proxy_toml",
            run: proxy_toml,
            seeds: toml_seeds,
            text: true,
        },
        Target {
            name: "readonly_sql",
            run: readonly_sql,
            seeds: sql_seeds,
            text: true,
        },
        Target {
            name: "pg_startup",
            run: pg_startup,
            seeds: pg_seeds,
            text: false,
        },
    ]
}

/// An OTLP/HTTP body as the receiver decodes it, then its conversion to Arrow rows, for
/// each of the three signals (the first byte picks which).
fn otlp(json: bool, input: &[u8]) {
    let Some((which, body)) = input.split_first() else {
        return;
    };
    use meshscope_collector::http::decode_otlp;
    match which % 3 {
        0 => {
            if let Ok(r) = decode_otlp::<ExportTraceServiceRequest>(json, body) {
                let _ = convert::spans(&r);
            }
        }
        1 => {
            if let Ok(r) = decode_otlp::<ExportMetricsServiceRequest>(json, body) {
                let _ = convert::metrics(&r);
            }
        }
        _ => {
            if let Ok(r) = decode_otlp::<ExportLogsServiceRequest>(json, body) {
                let _ = convert::logs(&r, 1_700_000_000_000_000_000);
            }
        }
    }
}

fn otlp_protobuf(input: &[u8]) {
    otlp(false, input);
}

fn otlp_json(input: &[u8]) {
    otlp(true, input);
}

fn traceparent(input: &[u8]) {
    let _ = meshscope_proxy::layers::trace::parse_traceparent(&String::from_utf8_lossy(input));
}

fn proxy_toml(input: &[u8]) {
    let _ = meshscope_proxy::config::ProxyConfig::parse(&String::from_utf8_lossy(input));
}

fn readonly_sql(input: &[u8]) {
    if let Ok(statements) = DFParser::parse_sql(&String::from_utf8_lossy(input)) {
        for s in &statements {
            let _ = readonly::check_df(s, Surface::Http);
        }
    }
}

/// The first bytes of a Postgres connection (SSLRequest, StartupMessage) or, with the
/// first byte odd, the messages after start-up (password, queries, the extended protocol).
fn pg_startup(input: &[u8]) {
    use datafusion_postgres::pgwire::messages::startup::PasswordMessageFamily::Raw;
    let Some((mode, bytes)) = input.split_first() else {
        return;
    };
    let mut ctx = DecodeContext::default();
    if mode % 2 == 1 {
        ctx.awaiting_frontend_ssl = false;
        ctx.awaiting_frontend_startup = false;
    }
    let mut buf = BytesMut::from(bytes);
    // Decode messages until the buffer runs out or is refused.
    for _ in 0..64 {
        match PgWireFrontendMessage::decode(&mut buf, &ctx) {
            Ok(Some(PgWireFrontendMessage::SslNegotiation(_))) => ctx.awaiting_frontend_ssl = false,
            Ok(Some(PgWireFrontendMessage::Startup(_))) => {
                ctx.awaiting_frontend_ssl = false;
                ctx.awaiting_frontend_startup = false;
            }
            // The server reads a password message as a password, or as a SASL exchange.
            Ok(Some(PgWireFrontendMessage::PasswordMessageFamily(Raw(body)))) => {
                let _ = Raw(body.clone()).into_password();
                let _ = Raw(body.clone()).into_sasl_initial_response();
                let _ = Raw(body).into_sasl_response();
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return,
        }
    }
}

fn testdata() -> PathBuf {
    std::env::var("MESHSCOPE_TESTDATA")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/testdata/otlp-json")
        })
}

/// The shared OTLP/JSON examples, each prefixed with the byte that selects its signal.
fn json_seeds() -> Vec<Vec<u8>> {
    [("trace.json", 0u8), ("metrics.json", 1), ("logs.json", 2)]
        .into_iter()
        .filter_map(|(file, which)| {
            let body = std::fs::read(testdata().join(file)).ok()?;
            Some([vec![which], body].concat())
        })
        .chain([
            vec![0, b'{', b'}'],
            vec![1, b'{', b'}'],
            vec![2, b'{', b'}'],
        ])
        .collect()
}

/// The same examples, re-encoded as protobuf.
fn protobuf_seeds() -> Vec<Vec<u8>> {
    use meshscope_collector::http::decode_otlp;
    let mut out = vec![vec![0], vec![1], vec![2]];
    for seed in json_seeds() {
        let Some((which, body)) = seed.split_first() else {
            continue;
        };
        let encoded = match which {
            0 => decode_otlp::<ExportTraceServiceRequest>(true, body).map(|r| r.encode_to_vec()),
            1 => decode_otlp::<ExportMetricsServiceRequest>(true, body).map(|r| r.encode_to_vec()),
            _ => decode_otlp::<ExportLogsServiceRequest>(true, body).map(|r| r.encode_to_vec()),
        };
        if let Ok(bytes) = encoded {
            out.push([vec![*which], bytes].concat());
        }
    }
    out
}

fn traceparent_seeds() -> Vec<Vec<u8>> {
    [
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        "ff-00000000000000000000000000000000-0000000000000000-01",
    ]
    .map(|s| s.as_bytes().to_vec())
    .to_vec()
}

/// Every sidecar configuration the README shows (its ```toml blocks that start with
/// `[service]`), and the smallest one.
fn toml_seeds() -> Vec<Vec<u8>> {
    let readme = include_str!("../../README.md");
    let mut seeds: Vec<Vec<u8>> = readme
        .split("```toml\n")
        .skip(1)
        .filter(|block| block.starts_with("[service]"))
        .filter_map(|block| block.split("```").next())
        .map(|block| block.as_bytes().to_vec())
        .collect();
    seeds.push(b"[service]\nname = \"a\"\n[listen]\noutbound = \"127.0.0.1:0\"\n".to_vec());
    seeds
}

fn sql_seeds() -> Vec<Vec<u8>> {
    [
        "SELECT service_name, count(*) FROM spans WHERE start_time > now() - INTERVAL '5 minutes' GROUP BY 1 ORDER BY 2 DESC LIMIT 10",
        "WITH t AS (SELECT trace_id FROM spans WHERE status_code = 'ERROR') SELECT * FROM t JOIN spans USING (trace_id)",
        "EXPLAIN ANALYZE SELECT span_attributes['http.route'] FROM spans",
        "SHOW TABLES",
        "COPY spans TO '/tmp/x.parquet'",
        "INSERT INTO spans SELECT * FROM spans",
        "CREATE EXTERNAL TABLE t STORED AS PARQUET LOCATION '/etc/'",
        "SET datafusion.execution.batch_size = 1",
        "SELECT * FROM read_parquet('/etc/passwd')",
        "DROP TABLE spans; SELECT 1",
    ]
    .map(|s| s.as_bytes().to_vec())
    .to_vec()
}

fn pg_seeds() -> Vec<Vec<u8>> {
    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }
    let ssl_request = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f].to_vec();
    let mut startup_body = 196_608i32.to_be_bytes().to_vec();
    startup_body
        .extend_from_slice(b"user\0grafana\0database\0meshscope\0application_name\0psql\0\0");
    let mut startup = ((startup_body.len() + 4) as i32).to_be_bytes().to_vec();
    startup.extend_from_slice(&startup_body);
    let after = [
        message(b'p', b"the-secret\0"),
        message(
            b'p',
            b"SCRAM-SHA-256\0\0\0\0\x1cn,,n=,r=rOprNGfwEbeRWgbNEkqO",
        ),
        message(b'Q', b"SELECT 1\0"),
        message(b'P', b"\0SELECT $1\0\0\x01\0\0\0\x17"),
        message(b'B', b"\0\0\0\0\0\x01\0\0\0\x011\0\0"),
        message(b'E', b"\0\0\0\0\0"),
        message(b'S', b""),
        message(b'X', b""),
    ]
    .concat();
    vec![
        [vec![0], ssl_request.clone(), startup.clone()].concat(),
        [vec![0], startup].concat(),
        [vec![1], after].concat(),
        [vec![0], ssl_request].concat(),
    ]
}
