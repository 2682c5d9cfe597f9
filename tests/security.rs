//! A backend you can expose: tokens with scopes on every listener (the OpenTelemetry SDK over
//! gRPC and HTTP, curl-like HTTP clients, psql), the refusal to listen beyond loopback
//! without them, and the auth file's own checks. Everything against the real binary.

mod common;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Server;
use opentelemetry::KeyValue;
use opentelemetry::trace::{Span, SpanKind, Tracer, TracerProvider};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig, WithTonicConfig};
use serde_json::json;

const INGEST: &str = "ingest-secret-for-the-proxies-0001";
const READ: &str = "read-secret-for-grafana-000000002";
const ADMIN: &str = "admin-secret-for-on-call-00000003";

/// An auth file with three tokens: `proxies` (ingest, plaintext secret, so mode 0600),
/// `grafana` (read, by its SHA-256) and `ops` (admin).
fn auth_file(dir: &Path) -> std::path::PathBuf {
    let digest = {
        let out = Command::new("sha256sum")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().expect("stdin").write_all(READ.as_bytes())?;
                c.wait_with_output()
            })
            .expect("sha256sum");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .expect("digest")
            .to_string()
    };
    let path = dir.join("auth.toml");
    std::fs::write(
        &path,
        format!(
            "[[token]]\nname = \"proxies\"\nsecret = \"{INGEST}\"\nscopes = [\"ingest\"]\n\n\
             [[token]]\nname = \"grafana\"\nsecret-sha256 = \"{digest}\"\nscopes = [\"read\"]\n\n\
             [[token]]\nname = \"ops\"\nsecret = \"{ADMIN}\"\nscopes = [\"admin\"]\n"
        ),
    )
    .expect("write auth file");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    path
}

/// One SERVER span of `service` through the SDK's gRPC exporter, with `token` if given.
fn sdk_grpc(endpoint: String, service: &str, token: Option<&str>) {
    let mut metadata = tonic::metadata::MetadataMap::new();
    if let Some(t) = token {
        metadata.insert(
            "authorization",
            format!("Bearer {t}").parse().expect("metadata value"),
        );
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_metadata(metadata)
        .build()
        .expect("grpc exporter");
    export_one(exporter, service);
}

/// The same through the SDK's HTTP/protobuf exporter.
fn sdk_http(endpoint: String, service: &str, token: Option<&str>) {
    let service = service.to_string();
    let token = token.map(str::to_string);
    // The blocking HTTP client may not run on the test's runtime.
    std::thread::spawn(move || {
        let headers: HashMap<String, String> = token
            .map(|t| ("authorization".to_string(), format!("Bearer {t}")))
            .into_iter()
            .collect();
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(endpoint)
            .with_headers(headers)
            .build()
            .expect("http exporter");
        export_one(exporter, &service);
    })
    .join()
    .expect("http exporter thread");
}

fn export_one(exporter: opentelemetry_otlp::SpanExporter, service: &str) {
    let provider = common::otlp::sdk_tracer_provider(exporter, service);
    let tracer = provider.tracer("security");
    let mut span = tracer
        .span_builder("GET /secure")
        .with_kind(SpanKind::Server)
        .with_attributes(vec![KeyValue::new("http.route", "/secure")])
        .start(&tracer);
    span.end();
    // A refused export is the exporter's error, logged by the SDK; the rows tell.
    let _ = provider.shutdown();
}

/// `psql` against the server's Postgres port as `user` (with `password` if given), one
/// statement, unaligned tuples only; `extra` goes before `-c`.
fn psql(
    server: &Server,
    user: &str,
    password: Option<&str>,
    extra: &[&str],
    sql: &str,
) -> std::process::Output {
    let mut cmd = Command::new("psql");
    cmd.args(["-h", "127.0.0.1", "-p", &server.pg.to_string(), "-U", user])
        .args(["-d", "meshscope", "-X", "-A", "-t"])
        .args(extra)
        .args(["-c", sql])
        .env("PGCONNECT_TIMEOUT", "10");
    if let Some(p) = password {
        cmd.env("PGPASSWORD", p);
    }
    cmd.output().expect("psql (Debian postgresql-client)")
}

async fn status_of(request: reqwest::RequestBuilder) -> (u16, reqwest::header::HeaderMap, String) {
    let r = request.send().await.expect("request");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.text().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_with_scopes_guard_every_listener() {
    let dir = tempfile::tempdir().expect("tmp");
    let auth = auth_file(dir.path());
    let mut server = Server::start_with(
        &dir.path().join("data"),
        &["--auth-file", auth.to_str().expect("path")],
    );
    let http = reqwest::Client::new();

    // OTLP: the SDK with the ingest token lands, without a token or with another scope's
    // token nothing does.
    sdk_grpc(server.grpc_url(), "grpc-with-token", Some(INGEST));
    sdk_grpc(server.grpc_url(), "grpc-without-token", None);
    sdk_grpc(server.grpc_url(), "grpc-read-token", Some(READ));
    sdk_http(
        server.otlp_url("/v1/traces"),
        "http-with-token",
        Some(INGEST),
    );
    sdk_http(server.otlp_url("/v1/traces"), "http-without-token", None);
    sdk_http(
        server.otlp_url("/v1/traces"),
        "http-wrong-token",
        Some("not-a-token"),
    );

    // Raw OTLP/HTTP: 401 with WWW-Authenticate, 403 for the wrong scope, in the request's
    // encoding (`google.rpc.Status` as JSON here).
    let body = common::testdata("trace.json");
    let post = |token: Option<&str>| {
        let r = http
            .post(server.otlp_url("/v1/traces"))
            .header("content-type", "application/json")
            .body(body.clone());
        match token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    };
    let (s, h, b) = status_of(post(None)).await;
    assert_eq!(s, 401, "{b}");
    assert_eq!(h["www-authenticate"], "Bearer realm=\"meshscope\"");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&b).expect("json")["code"],
        16
    );
    let (s, _, b) = status_of(post(Some(ADMIN))).await;
    assert_eq!(s, 403, "{b}");
    assert!(b.contains("does not have the ingest scope"), "{b}");

    // The API: the read token reads, the ingest token may not, nothing without a token;
    // probes and the UI's files stay open.
    server.token = Some(READ.into());
    let services = |token: Option<&str>| {
        let r = http.get(server.url("/api/v1/services"));
        match token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    };
    assert_eq!(status_of(services(None)).await.0, 401);
    assert_eq!(status_of(services(Some(INGEST))).await.0, 403);
    assert_eq!(status_of(services(Some(READ))).await.0, 200);
    assert_eq!(status_of(services(Some(ADMIN))).await.0, 200);
    for open in ["/healthz", "/readyz", "/"] {
        assert_eq!(status_of(http.get(server.url(open))).await.0, 200, "{open}");
    }
    let (s, _, b) = status_of(
        http.post(server.url("/api/v1/sql"))
            .json(&json!({"sql": "SELECT 1"})),
    )
    .await;
    assert_eq!(s, 401, "{b}");
    assert!(b.contains("authentication required"), "{b}");

    // Exactly the accepted exports are rows; a wrong token never created one.
    let deadline = Instant::now() + Duration::from_secs(10);
    let sql = "SELECT service_name FROM spans GROUP BY service_name ORDER BY service_name";
    let services = loop {
        let v = server.sql(sql).await;
        let got: Vec<String> = v["rows"]
            .as_array()
            .expect("rows")
            .iter()
            .map(|r| r[0].as_str().unwrap_or_default().to_string())
            .collect();
        if got.len() >= 2 || Instant::now() > deadline {
            break got;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        services,
        ["grpc-with-token", "http-with-token"],
        "only exports with the ingest token land"
    );

    // Changing alert rules needs admin.
    let rule = json!({"name": "busy", "signal": "requests", "service": "checkout", "op": ">=",
        "threshold": 10, "window-secs": 120});
    let (s, _, b) = status_of(
        http.post(server.url("/api/v1/alerts/rules"))
            .bearer_auth(READ)
            .json(&rule),
    )
    .await;
    assert_eq!(s, 403, "{b}");
    let (s, _, b) = status_of(
        http.post(server.url("/api/v1/alerts/rules"))
            .bearer_auth(ADMIN)
            .json(&rule),
    )
    .await;
    assert_eq!(s, 201, "{b}");

    // psql: user = the token's name, password = its secret.
    let sql = "SELECT count(*) FROM spans WHERE service_name LIKE '%with-token'";
    let login = |user: &str, password: &str| psql(&server, user, Some(password), &[], sql);
    let out = login("grafana", READ);
    common::assert_success(&out, "psql as grafana");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "2");
    let out = login("grafana", "wrong");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("password authentication failed"), "{err}");
    let out = login("proxies", INGEST);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not have the read scope"), "{err}");

    // A token given by its plaintext secret logs in with SCRAM-SHA-256: through a relay
    // that keeps every byte, the server asks for SCRAM and the secret never crosses the
    // wire; a wrong secret fails the proof. `grafana` (by its SHA-256) asked for a
    // cleartext password above, which the relay shows too.
    let (relay, wire) = wire_tap(server.pg).await;
    let via_relay = |user: &str, password: &str| {
        Command::new("psql")
            .arg(format!(
                "host=127.0.0.1 port={relay} user={user} dbname=meshscope sslmode=disable"
            ))
            .args(["-X", "-A", "-t", "-c", sql])
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "10")
            .output()
            .expect("psql")
    };
    let out = via_relay("ops", ADMIN);
    common::assert_success(&out, "psql as ops over SCRAM");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "2");
    let (to_server, to_client) = wire.take();
    assert!(contains(&to_client, b"SCRAM-SHA-256"), "SCRAM offered");
    assert!(contains(&to_server, b"SCRAM-SHA-256"), "SCRAM chosen");
    assert!(
        !contains(&to_server, ADMIN.as_bytes()),
        "the secret crossed the wire"
    );
    let out = via_relay("ops", "not-the-secret-of-ops");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("password authentication failed"), "{err}");
    let out = via_relay("grafana", READ);
    common::assert_success(&out, "psql as grafana, cleartext");
    let (to_server, _) = wire.take();
    assert!(
        contains(&to_server, READ.as_bytes()),
        "cleartext password sent"
    );

    // Each refusal is counted by listener and reason, each acceptance by token name; no
    // secret appears in /metrics or the log.
    for (series, at_least) in [
        (
            "meshscope_auth_failures_total{surface=\"otlp_grpc\",reason=\"missing\"}",
            1.0,
        ),
        (
            "meshscope_auth_failures_total{surface=\"otlp_grpc\",reason=\"scope\"}",
            1.0,
        ),
        (
            "meshscope_auth_failures_total{surface=\"otlp_http\",reason=\"missing\"}",
            2.0,
        ),
        (
            "meshscope_auth_failures_total{surface=\"otlp_http\",reason=\"invalid\"}",
            1.0,
        ),
        (
            "meshscope_auth_failures_total{surface=\"otlp_http\",reason=\"scope\"}",
            1.0,
        ),
        (
            "meshscope_auth_failures_total{surface=\"api\",reason=\"missing\"}",
            2.0,
        ),
        (
            "meshscope_auth_failures_total{surface=\"api\",reason=\"scope\"}",
            2.0,
        ),
        (
            "meshscope_auth_failures_total{surface=\"postgres\",reason=\"invalid\"}",
            2.0,
        ),
        (
            "meshscope_auth_failures_total{surface=\"postgres\",reason=\"scope\"}",
            1.0,
        ),
        (
            "meshscope_auth_accepted_total{token=\"proxies\",surface=\"otlp_grpc\"}",
            1.0,
        ),
        (
            "meshscope_auth_accepted_total{token=\"proxies\",surface=\"otlp_http\"}",
            1.0,
        ),
        (
            "meshscope_auth_accepted_total{token=\"grafana\",surface=\"postgres\"}",
            2.0,
        ),
        (
            "meshscope_auth_accepted_total{token=\"ops\",surface=\"postgres\"}",
            1.0,
        ),
    ] {
        let v = server.metric(series).await;
        assert!(v.is_some_and(|v| v >= at_least), "{series} = {v:?}");
    }
    let metrics = server.get_text("/metrics").await;
    let log = std::fs::read_to_string(&server.log).expect("log");
    for secret in [INGEST, READ, ADMIN] {
        assert!(!metrics.contains(secret) && !log.contains(secret));
    }
    assert!(log.contains("refused a request"), "{log}");
}

/// A token kept only as digests (`meshscope auth hash`): the bearer header works through
/// `secret-sha256`, the Postgres wire asks for SCRAM-SHA-256 through `scram-salted-password`
/// and the secret never crosses it; over TLS the exchange is SCRAM-SHA-256-PLUS, bound to
/// the server's certificate (libpq's `channel_binding=require` insists on it).
#[tokio::test(flavor = "multi_thread")]
async fn a_hashed_token_logs_in_with_scram_bound_to_tls() {
    use std::io::Write as _;
    let dir = tempfile::tempdir().expect("tmp");
    let mut hash = Command::new(common::binary())
        .args(["auth", "hash"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("meshscope auth hash");
    writeln!(hash.stdin.take().expect("stdin"), "{READ}").expect("write");
    let out = hash.wait_with_output().expect("auth hash");
    common::assert_success(&out, "meshscope auth hash");
    let lines = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        lines.contains("secret-sha256 = \"") && lines.contains("scram-salted-password = \"4096:"),
        "{lines}"
    );
    assert!(!lines.contains(READ), "the secret is not printed");
    let auth = dir.path().join("auth.toml");
    // No plaintext in the file: it may be readable by others.
    std::fs::write(
        &auth,
        format!("[[token]]\nname = \"grafana\"\n{lines}scopes = [\"read\"]\n"),
    )
    .expect("write");
    std::fs::set_permissions(&auth, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let auth = auth.to_str().expect("path");

    let server = Server::start_with(&dir.path().join("plain"), &["--auth-file", auth]);
    let (status, _, body) = status_of(
        reqwest::Client::new()
            .get(server.url("/api/v1/services"))
            .bearer_auth(READ),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (relay, wire) = wire_tap(server.pg).await;
    let psql_at = |conninfo: String, password: &str| {
        Command::new("psql")
            .arg(conninfo)
            .args(["-X", "-A", "-t", "-c", "SELECT 1"])
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "10")
            .output()
            .expect("psql")
    };
    let at = |port: u16, options: &str| {
        format!("host=127.0.0.1 port={port} user=grafana dbname=meshscope {options}")
    };
    let out = psql_at(at(relay, "sslmode=disable"), READ);
    common::assert_success(&out, "psql as grafana over SCRAM");
    let (to_server, to_client) = wire.take();
    assert!(contains(&to_client, b"SCRAM-SHA-256"), "SCRAM offered");
    assert!(
        !contains(&to_client, b"SCRAM-SHA-256-PLUS"),
        "no channel binding without TLS"
    );
    assert!(
        !contains(&to_server, READ.as_bytes()),
        "the secret crossed the wire"
    );
    let out = psql_at(at(relay, "sslmode=disable"), "not-the-secret-of-grafana");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("password authentication failed"), "{err}");

    let tls = Server::start_with(
        &dir.path().join("tls"),
        &["--auth-file", auth, "--tls-auto"],
    );
    let out = psql_at(at(tls.pg, "sslmode=require channel_binding=require"), READ);
    common::assert_success(&out, "psql with channel_binding=require over TLS");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");
    let out = psql_at(
        at(tls.pg, "sslmode=require channel_binding=require"),
        "not-the-secret-of-grafana",
    );
    assert!(!out.status.success(), "a wrong secret with channel binding");
}

/// The bytes a [`wire_tap`] saw: to the server, to the client.
#[derive(Clone, Default)]
struct Wire(std::sync::Arc<std::sync::Mutex<(Vec<u8>, Vec<u8>)>>);

impl Wire {
    /// What crossed since the last call.
    fn take(&self) -> (Vec<u8>, Vec<u8>) {
        let mut w = self.0.lock().expect("wire");
        (std::mem::take(&mut w.0), std::mem::take(&mut w.1))
    }
}

/// A TCP relay on a free loopback port in front of `port`, keeping every byte each way.
async fn wire_tap(port: u16) -> (u16, Wire) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let relay = l.local_addr().expect("addr").port();
    let wire = Wire::default();
    let kept = wire.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = l.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
                continue;
            };
            let (c, s) = (client.into_split(), server.into_split());
            for (mut from, mut to, to_server) in [(c.0, s.1, true), (s.0, c.1, false)] {
                let kept = kept.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16384];
                    while let Ok(n @ 1..) = from.read(&mut buf).await {
                        {
                            let mut w = kept.0.lock().expect("wire");
                            let side = if to_server { &mut w.0 } else { &mut w.1 };
                            side.extend_from_slice(&buf[..n]);
                        }
                        if to.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown().await;
                });
            }
        }
    });
    (relay, wire)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// `meshscope serve` with `args`, expected to exit at start-up; its stderr.
fn refused_start(data_dir: &Path, args: &[&str]) -> String {
    let out = Command::new(common::binary())
        .arg("serve")
        .arg("--data-dir")
        .arg(data_dir)
        .args([
            "--otlp-grpc-addr",
            "127.0.0.1:0",
            "--otlp-http-addr",
            "127.0.0.1:0",
        ])
        .args(["--http-addr", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::null())
        .output()
        .expect("run meshscope");
    assert!(!out.status.success(), "started with {args:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn no_tokens_means_loopback_only() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("data");
    let err = refused_start(&data, &["--pg-addr", "0.0.0.0:0"]);
    assert!(
        err.contains("refusing to listen beyond loopback without tokens"),
        "{err}"
    );
    assert!(err.contains("Postgres wire protocol on 0.0.0.0:0"), "{err}");

    // Said out loud, it starts, and warns.
    let server = Server::start_with(&data, &["--pg-addr", "0.0.0.0:0", "--insecure-no-auth"]);
    let log = std::fs::read_to_string(&server.log).expect("log");
    assert!(log.contains("--insecure-no-auth"), "{log}");
    assert_eq!(
        common::http_status(server.http, "/api/v1/services").expect("GET"),
        200
    );

    // With tokens, any address is allowed.
    let auth = auth_file(dir.path());
    let server = Server::start_with(
        &dir.path().join("data2"),
        &[
            "--pg-addr",
            "0.0.0.0:0",
            "--auth-file",
            auth.to_str().expect("path"),
        ],
    );
    assert_eq!(
        common::http_status(server.http, "/api/v1/services").expect("GET"),
        401
    );
}

#[test]
fn auth_files_are_checked_at_start_up() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("data");
    let auth = auth_file(dir.path());
    std::fs::set_permissions(&auth, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let err = refused_start(&data, &["--auth-file", auth.to_str().expect("path")]);
    assert!(err.contains("chmod 600"), "{err}");

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[token]]\nname = \"x\"\nsecret-sha256 = \"abc\"\nscopes = [\"read\"]\n",
    )
    .expect("write");
    let err = refused_start(&data, &["--auth-file", bad.to_str().expect("path")]);
    assert!(err.contains("64 hex digits"), "{err}");

    // The same tables in the --config file.
    let config = dir.path().join("meshscope.toml");
    std::fs::write(
        &config,
        format!("[[token]]\nname = \"ci\"\nsecret = \"{READ}\"\nscopes = [\"read\", \"delete\"]\n"),
    )
    .expect("write");
    let err = refused_start(&data, &["--config", config.to_str().expect("path")]);
    assert!(err.contains("delete"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_bundled_proxy_exports_with_its_token_file() {
    use meshscope_proxy::Proxy;
    use meshscope_proxy::config::{Listen, ProxyConfig, ServiceIdentity, TelemetryConfig};
    use std::net::SocketAddr;

    let dir = tempfile::tempdir().expect("tmp");
    let auth = auth_file(dir.path());
    let mut server = Server::start_with(
        &dir.path().join("data"),
        &["--auth-file", auth.to_str().expect("path")],
    );
    server.token = Some(READ.into());
    let app_l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let app_addr = app_l.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(app_l, axum::Router::new().fallback(|| async { "ok" })).await;
    });
    let token_file = dir.path().join("ingest.token");
    std::fs::write(&token_file, format!("{INGEST}\n")).expect("write token");
    let loopback = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    let config = |token: std::path::PathBuf| ProxyConfig {
        service: ServiceIdentity {
            name: "secured-app".into(),
            namespace: None,
            version: None,
            workload: None,
        },
        listen: Listen {
            inbound: loopback,
            app: Some(app_addr),
            outbound: None,
            admin: None,
            app_h2c: false,
        },
        telemetry: TelemetryConfig {
            otlp_endpoint: Some(server.grpc_url()),
            otlp_token_file: Some(token),
            batch_interval_ms: 100,
            ..TelemetryConfig::default()
        },
        identity: Default::default(),
        authorization: vec![],
        destinations: vec![],
    };

    // A token file that is not there stops the proxy at start, saying which file.
    let err = Proxy::start(config(dir.path().join("missing.token")), None)
        .await
        .err()
        .expect("a missing token file is an error");
    assert!(err.to_string().contains("missing.token"), "{err}");

    let proxy = Proxy::start(config(token_file), None).await.expect("proxy");
    let inbound = proxy.inbound.expect("inbound");
    let r = reqwest::get(format!("http://{inbound}/hello"))
        .await
        .expect("GET");
    assert_eq!(r.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(15);
    let sql = "SELECT count(*) FROM spans WHERE service_name = 'secured-app'";
    while server.sql(sql).await["rows"][0][0].as_i64() != Some(1) {
        assert!(Instant::now() < deadline, "the proxy's span did not land");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let accepted = "meshscope_auth_accepted_total{token=\"proxies\",surface=\"otlp_grpc\"}";
    assert!(server.metric(accepted).await.is_some_and(|v| v >= 1.0));
    proxy.stop().await;
}

/// `n` SERVER spans of `service`, posted over OTLP/HTTP in one request.
async fn load_spans(server: &Server, service: &str, n: usize) {
    use opentelemetry_proto::tonic::trace::v1::Span as OtlpSpan;
    let now = common::now_ns();
    let spans = (0..n)
        .map(|i| OtlpSpan {
            trace_id: (i as u128 + 1).to_be_bytes().to_vec(),
            span_id: (i as u64 + 1).to_be_bytes().to_vec(),
            name: "GET /load".into(),
            kind: 2,
            start_time_unix_nano: now - 1_000_000,
            end_time_unix_nano: now,
            ..Default::default()
        })
        .collect();
    common::otlp::post(
        &server.otlp_url("/v1/traces"),
        &common::otlp::traces(service, spans),
    )
    .await;
}

/// A sum over a three-way cross join of 2,000 spans: 8e9 rows, which no query timeout of a
/// few seconds lets finish. (`count(*)` of the same join is answered from the files'
/// statistics at once.)
const ENDLESS: &str =
    "SELECT sum(a.duration_ns + b.duration_ns + c.duration_ns) FROM spans a, spans b, spans c";

#[tokio::test(flavor = "multi_thread")]
async fn queries_are_bounded_in_time_rows_and_number() {
    let server = Server::in_temp_dir(&[
        "--query-timeout-secs",
        "2",
        "--sql-max-rows",
        "5",
        "--max-concurrent-queries",
        "2",
    ]);
    load_spans(&server, "load", 2000).await;
    let http = reqwest::Client::new();

    // The row cap: a JSON answer says it was cut; a smaller one says it was not.
    let v = server.sql("SELECT span_id FROM spans").await;
    assert_eq!(v["rows"].as_array().map(Vec::len), Some(5), "{v}");
    assert_eq!(v["truncated"], true);
    let v = server.sql("SELECT span_id FROM spans LIMIT 3").await;
    assert_eq!(v["rows"].as_array().map(Vec::len), Some(3));
    assert_eq!(v["truncated"], false);
    // The Arrow stream is not capped.
    let bytes = http
        .post(server.url("/api/v1/sql"))
        .header("accept", "application/vnd.apache.arrow.stream")
        .json(&json!({"sql": "SELECT span_id FROM spans"}))
        .send()
        .await
        .expect("arrow")
        .bytes()
        .await
        .expect("body");
    let reader = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)
        .expect("an Arrow IPC stream");
    let rows: usize = reader.map(|b| b.expect("batch").num_rows()).sum();
    assert_eq!(rows, 2000);

    // A query that cannot finish ends at the timeout, and another is served meanwhile.
    let slow = {
        let url = server.url("/api/v1/sql");
        tokio::spawn(async move {
            let started = Instant::now();
            let r = reqwest::Client::new()
                .post(url)
                .json(&json!({ "sql": ENDLESS }))
                .send()
                .await
                .expect("slow query");
            (
                r.status().as_u16(),
                r.text().await.unwrap_or_default(),
                started.elapsed(),
            )
        })
    };
    server
        .wait_metric("meshscope_queries_running", 10, |v| v >= 1.0)
        .await;
    let started = Instant::now();
    assert_eq!(server.scalar("SELECT count(*) FROM spans").await, 2000);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the other query waited"
    );
    let (status, body, took) = slow.await.expect("join");
    assert_eq!(status, 408, "{body}");
    assert!(body.contains("cancelled after 2."), "{body}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    // Its work stopped with it.
    server
        .wait_metric("meshscope_queries_running", 10, |v| v == 0.0)
        .await;

    // The Postgres wire: the same timeout, as SQLSTATE 57014.
    let out = psql(
        &server,
        "meshscope",
        None,
        &["-v", "VERBOSITY=verbose"],
        ENDLESS,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("57014") && err.contains("cancelled after"),
        "{err}"
    );

    // Concurrency: two places. Three more requests wait; when the two running ones end at
    // the timeout, the first two waiting get their places and the last, whose wait (as long
    // as the timeout) ends first, gets 503 with Retry-After.
    let endless = |n: usize| {
        let url = server.url("/api/v1/sql");
        tokio::spawn(async move {
            let r = reqwest::Client::new()
                .post(url)
                .json(&json!({ "sql": ENDLESS }))
                .send()
                .await
                .expect("query");
            let retry = r.headers().get("retry-after").is_some();
            (
                n,
                r.status().as_u16(),
                retry,
                r.text().await.unwrap_or_default(),
            )
        })
    };
    let mut queries = vec![endless(1), endless(2)];
    server
        .wait_metric("meshscope_queries_running", 10, |v| v >= 2.0)
        .await;
    for n in 3..=5 {
        queries.push(endless(n));
        server
            .wait_metric("meshscope_queries_waiting", 10, |v| v >= (n - 2) as f64)
            .await;
    }
    let mut statuses = Vec::new();
    for q in queries {
        statuses.push(q.await.expect("join"));
    }
    for s in &statuses[..4] {
        assert_eq!(s.1, 408, "{statuses:?}");
    }
    let (_, status, retry, body) = &statuses[4];
    assert_eq!(*status, 503, "{statuses:?}");
    assert!(
        *retry && body.contains("--max-concurrent-queries"),
        "{body}"
    );
    assert!(server.metric("meshscope_queries_refused_busy_total").await >= Some(1.0));
    assert!(server.metric("meshscope_queries_timed_out_total").await >= Some(4.0));
    assert!(server.metric("meshscope_sql_answers_truncated_total").await >= Some(1.0));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_raw_span_graph_stays_within_the_query_memory_pool() {
    let dir = tempfile::tempdir().expect("tmp");
    // 1 MB for all queries; 20,000 spans decode to about 1.4 MB in the pairing.
    let server = Server::start_with(
        &dir.path().join("data"),
        &["--query-memory-bytes", "1000000"],
    );
    for i in 0..10 {
        load_spans(&server, &format!("svc{i}"), 2000).await;
    }
    let r = reqwest::get(server.url("/api/v1/graph?source=spans"))
        .await
        .expect("graph");
    let status = r.status().as_u16();
    let body = r.text().await.unwrap_or_default();
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("choose a shorter range, or leave out source=spans"),
        "{body}"
    );
    // The memory was given back: a small range is served.
    let small = server
        .url("/api/v1/graph?source=spans&start=2020-01-01T00:00:00Z&end=2020-01-01T00:01:00Z");
    assert_eq!(reqwest::get(small).await.expect("graph").status(), 200);
}

/// A malformed Postgres message (a Parse whose fields run past its length, found by the
/// fuzzer) ends its own connection with an error; the server goes on serving others.
#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_postgres_message_ends_only_its_connection() {
    use std::io::{Read, Write};
    let server = Server::in_temp_dir(&[]);
    let mut s = std::net::TcpStream::connect(("127.0.0.1", server.pg)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut startup = 196_608i32.to_be_bytes().to_vec();
    startup.extend_from_slice(b"user\0meshscope\0database\0meshscope\0\0");
    let mut msg = ((startup.len() + 4) as i32).to_be_bytes().to_vec();
    msg.extend_from_slice(&startup);
    s.write_all(&msg).expect("startup");
    // Read until ReadyForQuery ('Z').
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !seen.contains(&b'Z') {
        let n = s.read(&mut buf).expect("read");
        assert!(n > 0, "closed during start-up");
        seen.extend_from_slice(&buf[..n]);
    }
    // Parse: its length says 15 bytes, its fields claim more.
    s.write_all(b"P\x00\x00\x00\x0fthe-secret\x00Q\x00\"\x00\rSELECT 1\x00")
        .expect("write");
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    // The server answered with an error or closed; either way it still serves.
    let out = psql(&server, "meshscope", None, &[], "SELECT 41 + 1");
    common::assert_success(&out, "psql after the malformed Parse");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
    // (The decoder reads only the message's own 11 bytes and reports them malformed; no
    // panic: third_party/pgwire's README.)
    let mut server = server;
    assert!(server.is_running());
}
