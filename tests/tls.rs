//! TLS on every listener, against the real binary with real clients: curl (HTTP/1.1 and
//! HTTP/2), `openssl s_client`, psql with `sslmode=verify-full`, and the OpenTelemetry SDK's
//! gRPC exporter; client certificates required with `--tls-client-ca`. Certificates are
//! made by Debian's openssl for each test.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::Server;
use opentelemetry::trace::{Span, SpanKind, Tracer, TracerProvider};
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("run");
    common::assert_success(&out, &format!("{cmd:?}"));
    out
}

/// A CA and a certificate it signed for `name` (SAN 127.0.0.1 and localhost): `name.pem`,
/// `name.key`, and `ca.pem` in `dir`.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new(dir: &Path, ca: &str) -> Pki {
        let dir = dir.join(ca);
        std::fs::create_dir_all(&dir).expect("mkdir");
        run(Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
            ])
            .args(["-nodes", "-days", "1", "-subj", &format!("/CN={ca}")])
            .args(["-keyout", "ca.key", "-out", "ca.pem"])
            .current_dir(&dir));
        Pki { dir }
    }

    fn issue(&self, name: &str) -> (PathBuf, PathBuf) {
        let ext = self.dir.join(format!("{name}.ext"));
        std::fs::write(
            &ext,
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
        )
        .expect("ext");
        run(Command::new("openssl")
            .args([
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
            ])
            .args(["-subj", &format!("/CN={name}")])
            .args([
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ])
            .current_dir(&self.dir));
        run(Command::new("openssl")
            .args([
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
            ])
            .args(["-CAkey", "ca.key", "-CAcreateserial", "-days", "1"])
            .args([
                "-extfile",
                &format!("{name}.ext"),
                "-out",
                &format!("{name}.pem"),
            ])
            .current_dir(&self.dir));
        (
            self.dir.join(format!("{name}.pem")),
            self.dir.join(format!("{name}.key")),
        )
    }

    fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
}

/// Runs the binary with `args`, which must fail to start: what it said on stderr.
fn refused(args: &[&str]) -> String {
    let out = Command::new(common::binary())
        .args(args)
        .output()
        .expect("meshscope");
    assert!(!out.status.success(), "{args:?} started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The HTTP status curl got for `url`, trusting `ca`, with `extra` arguments (a body).
fn curl_status(ca: &Path, extra: &[&str], url: &str) -> String {
    let mut args = vec!["--cacert", s(ca), "-w", "%{http_code}", "-o", "/dev/null"];
    args.extend_from_slice(extra);
    args.push(url);
    String::from_utf8_lossy(&curl(&args).stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn curl(args: &[&str]) -> Output {
    Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl")
}

fn s_client(port: u16, extra: &[&str]) -> String {
    s_client_sending(port, extra, None)
}

/// `openssl s_client`, sending `request` once the handshake is done (`-quiet` keeps reading
/// until the server closes: a refusal after a TLS 1.3 handshake shows as its alert).
fn s_client_sending(port: u16, extra: &[&str], request: Option<&str>) -> String {
    use std::io::Write;
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if request.is_some() {
        cmd.arg("-quiet").stdin(Stdio::piped());
    } else {
        cmd.stdin(Stdio::null());
    }
    let mut child = cmd.spawn().expect("openssl s_client");
    if let (Some(r), Some(mut stdin)) = (request, child.stdin.take()) {
        stdin.write_all(r.as_bytes()).expect("write request");
    }
    let out = child.wait_with_output().expect("openssl s_client");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn every_listener_speaks_tls() {
    let dir = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(dir.path(), "meshscope-test-ca");
    let (cert, key) = pki.issue("server");
    let ca = pki.ca();
    let server = Server::start_with(
        &dir.path().join("data"),
        &["--tls-cert", s(&cert), "--tls-key", s(&key)],
    );

    // The API over HTTP/2 and HTTP/1.1, verified against the CA; plaintext gets nothing.
    for version in ["--http2", "--http1.1"] {
        let url = format!("https://127.0.0.1:{}/api/v1/services", server.http);
        let out = curl(&[
            version,
            "--cacert",
            s(&ca),
            "-w",
            "%{http_code} %{http_version}",
            "-o",
            "/dev/null",
            &url,
        ]);
        let got = String::from_utf8_lossy(&out.stdout).into_owned();
        let want = if version == "--http2" {
            "200 2"
        } else {
            "200 1.1"
        };
        assert_eq!(got, want, "{}", String::from_utf8_lossy(&out.stderr));
    }
    let plain = curl(&[&format!("http://127.0.0.1:{}/api/v1/services", server.http)]);
    assert!(!plain.status.success(), "plaintext HTTP was answered");
    let unverified = curl(&[&format!("https://127.0.0.1:{}/healthz", server.http)]);
    assert!(
        !unverified.status.success(),
        "curl trusted a certificate of an unknown CA"
    );

    // openssl s_client: the chain verifies, TLS 1.3, h2 by ALPN.
    let text = s_client(server.http, &["-CAfile", s(&ca), "-alpn", "h2"]);
    assert!(text.contains("Verify return code: 0 (ok)"), "{text}");
    assert!(text.contains("TLSv1.3"), "{text}");
    assert!(text.contains("ALPN protocol: h2"), "{text}");

    // OTLP/HTTP over TLS with curl, OTLP/gRPC over TLS with the SDK.
    let body = dir.path().join("trace.json");
    std::fs::write(&body, common::testdata("trace.json")).expect("write");
    let status = curl_status(
        &ca,
        &[
            "-H",
            "content-type: application/json",
            "--data-binary",
            &format!("@{}", s(&body)),
        ],
        &format!("https://127.0.0.1:{}/v1/traces", server.otlp_http),
    );
    assert_eq!(status, "200");
    let ca_pem = std::fs::read(&ca).expect("ca");
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(format!("https://localhost:{}", server.grpc))
        .with_tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(ca_pem))
                .domain_name("localhost"),
        )
        .build()
        .expect("grpc exporter");
    let provider = common::otlp::sdk_tracer_provider(exporter, "over-tls");
    let tracer = provider.tracer("tls");
    let mut span = tracer
        .span_builder("GET /tls")
        .with_kind(SpanKind::Server)
        .start(&tracer);
    span.end();
    provider.shutdown().expect("flush over TLS");

    // psql with sslmode=verify-full reads both; without TLS it is refused.
    let psql = |sslmode: &str| {
        Command::new("psql")
            .arg(format!(
                "host=127.0.0.1 port={} user=meshscope dbname=meshscope sslmode={sslmode} sslrootcert={}",
                server.pg,
                s(&ca)
            ))
            .args(["-X", "-A", "-t", "-c"])
            .arg("SELECT count(*) FROM spans WHERE service_name IN ('over-tls', 'my.service')")
            .output()
            .expect("psql")
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = psql("verify-full");
        common::assert_success(&out, "psql sslmode=verify-full");
        if String::from_utf8_lossy(&out.stdout).trim() == "2" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the spans sent over TLS did not arrive"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = psql("disable");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("TLS connections only"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn client_certificates_are_required_with_a_client_ca() {
    let dir = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(dir.path(), "meshscope-test-ca");
    let (cert, key) = pki.issue("server");
    let (client_cert, client_key) = pki.issue("client");
    let other = Pki::new(dir.path(), "someone-else");
    let (other_cert, other_key) = other.issue("intruder");
    let ca = pki.ca();
    let server = Server::start_with(
        &dir.path().join("data"),
        &[
            "--tls-cert",
            s(&cert),
            "--tls-key",
            s(&key),
            "--tls-client-ca",
            s(&ca),
        ],
    );
    let url = format!("https://127.0.0.1:{}/healthz", server.http);

    let ok = curl(&[
        "--cacert",
        s(&ca),
        "--cert",
        s(&client_cert),
        "--key",
        s(&client_key),
        &url,
    ]);
    common::assert_success(&ok, "curl with a client certificate");
    assert_eq!(String::from_utf8_lossy(&ok.stdout), "ok");
    let none = curl(&["--cacert", s(&ca), &url]);
    assert!(
        !none.status.success(),
        "answered without a client certificate"
    );

    // openssl s_client: no certificate, or one from another CA: refused (in TLS 1.3 the
    // server's alert follows the client's Finished, so a request is sent to read it).
    let request = "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    for extra in [vec![], vec!["-cert", s(&other_cert), "-key", s(&other_key)]] {
        let mut args = vec!["-CAfile", s(&ca)];
        args.extend(extra.iter().copied());
        let text = s_client_sending(server.http, &args, Some(request));
        assert!(
            text.contains("alert certificate required")
                || text.contains("alert unknown ca")
                || text.contains("alert bad certificate"),
            "{text}"
        );
        assert!(!text.contains("200 OK"), "{text}");
    }
    let args = [
        "-CAfile",
        s(&ca),
        "-cert",
        s(&client_cert),
        "-key",
        s(&client_key),
    ];
    let with_cert = s_client_sending(server.http, &args, Some(request));
    assert!(with_cert.contains("HTTP/1.1 200 OK"), "{with_cert}");
}

#[test]
fn half_a_tls_configuration_is_refused() {
    let err = refused(&["serve", "--tls-cert", "/nonexistent.pem"]);
    assert!(err.contains("--tls-key"), "{err}");
    let err = refused(&[
        "serve",
        "--tls-cert",
        "/nonexistent.pem",
        "--tls-key",
        "/nonexistent.key",
    ]);
    assert!(
        err.contains("cannot read the TLS certificate /nonexistent.pem"),
        "{err}"
    );
}

/// `--tls-auto`: the mesh CA issues the server its own certificate; clients trust the
/// mesh root from the data directory (or the API), and the certificate changes at restart
/// while the root stays.
#[tokio::test(flavor = "multi_thread")]
async fn tls_auto_serves_every_listener_with_a_certificate_from_the_mesh_ca() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("data");
    let server = Server::start_with(&data, &["--tls-auto"]);
    let root = data.join("ca/root.pem");
    for host in ["127.0.0.1", "localhost"] {
        let out = curl(&[
            "--cacert",
            s(&root),
            "-w",
            "%{http_code}",
            "-o",
            "/dev/null",
            &format!(
                "https://{host}:{}/api/v1/identity/trust-anchors",
                server.http
            ),
        ]);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "200",
            "{host}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = s_client(server.http, &["-CAfile", s(&root)]);
    assert!(text.contains("Verify return code: 0 (ok)"), "{text}");
    assert!(text.contains("meshscope mesh CA"), "{text}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(data.join("ca/server.key"))
            .expect("server.key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }
    // psql verifies the Postgres wire's certificate by host name.
    let out = Command::new("psql")
        .arg(format!(
            "host=localhost port={} user=meshscope dbname=meshscope sslmode=verify-full sslrootcert={}",
            server.pg,
            s(&root)
        ))
        .args(["-X", "-A", "-t", "-c", "SELECT 1"])
        .output()
        .expect("psql");
    common::assert_success(&out, "psql sslmode=verify-full");
    let first = std::fs::read_to_string(data.join("ca/server.pem")).expect("server.pem");
    let root_pem = std::fs::read_to_string(&root).expect("root");
    server.terminate();
    let again = Server::start_with(&data, &["--tls-auto"]);
    assert_ne!(
        std::fs::read_to_string(data.join("ca/server.pem")).expect("server.pem"),
        first,
        "a new certificate at every start"
    );
    assert_eq!(std::fs::read_to_string(&root).expect("root"), root_pem);
    let status = curl_status(
        &root,
        &[],
        &format!("https://localhost:{}/healthz", again.http),
    );
    assert_eq!(status, "200");
    // With files as well it is refused, saying why.
    let err = refused(&[
        "serve",
        "--data-dir",
        s(&dir.path().join("d2")),
        "--tls-auto",
        "--tls-cert",
        "/nonexistent.pem",
        "--tls-key",
        "/nonexistent.key",
    ]);
    assert!(
        err.contains("tls-auto") || err.contains("cannot be used with"),
        "{err}"
    );
}
