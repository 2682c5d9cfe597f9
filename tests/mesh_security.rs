//! Zero-trust between the bundled proxies, end to end: the real `meshscope serve` (the
//! binary) as the mesh CA, real proxies (the library, in this process) with certificates
//! it signed, real TLS on loopback, and Debian's `openssl` as the stranger at the door.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use common::Server;
use common::proxy::{admin_metrics, admin_stats};
use meshscope_proxy::Proxy;
use meshscope_proxy::config::{
    AuthorizationRule, AuthzMode, Destination, IdentityConfig, MtlsMode, Policy, ProxyConfig,
};
use serde_json::Value;

const TD: &str = "meshscope.local";

/// `meshscope identity token`, as an operator runs it; the token in a private file.
fn token_file(server: &Server, dir: &Path, namespace: &str, workloads: &[&str]) -> PathBuf {
    let mut cmd = Command::new(common::binary());
    cmd.args(["identity", "token", "--data-dir"])
        .arg(&server.data_dir)
        .args(["--namespace", namespace]);
    for w in workloads {
        cmd.args(["--workload", w]);
    }
    let out = cmd.output().expect("meshscope identity token");
    common::assert_success(&out, "meshscope identity token");
    let token = String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_string();
    assert!(token.starts_with("msb_"), "{token}");
    let path = dir.join(format!("{namespace}-{}.token", workloads.join("-")));
    std::fs::write(&path, &token).expect("write token");
    path
}

/// An app that counts what reaches it and says which caller header it saw.
struct App {
    hits: AtomicU64,
}

async fn app_handler(State(app): State<Arc<App>>, req: Request) -> Response {
    app.hits.fetch_add(1, Ordering::SeqCst);
    let seen = req
        .headers()
        .get("x-meshscope-source-workload")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    axum::Json(serde_json::json!({ "source_header": seen })).into_response()
}

async fn start_app() -> (SocketAddr, Arc<App>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let app = Arc::new(App {
        hits: AtomicU64::new(0),
    });
    let router = axum::Router::new()
        .fallback(app_handler)
        .with_state(Arc::clone(&app));
    tokio::spawn(async move {
        let _ = axum::serve(l, router).await;
    });
    (addr, app)
}

struct Mesh<'a> {
    server: &'a Server,
    token: PathBuf,
}

impl Mesh<'_> {
    /// A proxy of `workload` in namespace `shop`: inbound in front of `app` (if any),
    /// outbound to `destinations`.
    fn config(
        &self,
        workload: &str,
        app: Option<SocketAddr>,
        mode: MtlsMode,
        authorization: Vec<AuthorizationRule>,
        destinations: Vec<Destination>,
    ) -> ProxyConfig {
        ProxyConfig {
            identity: IdentityConfig {
                mode,
                ca_url: Some(self.server.url("")),
                token_file: Some(self.token.clone()),
                ca_file: None,
                trust_domain: None,
                namespace: None,
            },
            authorization,
            destinations,
            ..common::proxy::proxy_config(workload, "shop", app, &self.server.grpc_url())
        }
    }
}

impl<'a> Mesh<'a> {
    /// Workloads of namespace `shop` with a bootstrap token for `workloads`.
    fn new(server: &'a Server, dir: &Path, workloads: &[&str]) -> Mesh<'a> {
        Mesh {
            token: token_file(server, dir, "shop", workloads),
            server,
        }
    }

    /// [`Mesh::config`], started.
    async fn start(
        &self,
        workload: &str,
        app: Option<SocketAddr>,
        mode: MtlsMode,
        authorization: Vec<AuthorizationRule>,
        destinations: Vec<Destination>,
    ) -> Proxy {
        Proxy::start(
            self.config(workload, app, mode, authorization, destinations),
            None,
        )
        .await
        .unwrap_or_else(|e| panic!("the {workload} proxy: {e}"))
    }

    /// A strict `frontend` proxy, outbound only, calling `cart` at `cart_inbound`.
    async fn frontend_to_cart(&self, cart_inbound: SocketAddr) -> Proxy {
        let cart = vec![to("cart", cart_inbound)];
        self.start("frontend", None, MtlsMode::Strict, vec![], cart)
            .await
    }
}

fn to(name: &str, at: SocketAddr) -> Destination {
    common::proxy::destination(name, &[(at, "v1", 1)], Policy::default())
}

async fn get(outbound: SocketAddr, host: &str, headers: &[(&str, &str)]) -> (u16, String, Value) {
    let mut r = reqwest::Client::new()
        .get(format!("http://{outbound}/orders"))
        .header("host", host);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let r = r.send().await.expect("request through the proxy");
    let status = r.status().as_u16();
    let proxy = r
        .headers()
        .get("x-meshscope-proxy")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = r.text().await.unwrap_or_default();
    (
        status,
        proxy,
        serde_json::from_str(&body).unwrap_or(Value::Null),
    )
}

/// `openssl …` with `input` on stdin; stdout and stderr together.
fn openssl(args: &[&str], input: &str) -> String {
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl (Debian package openssl)");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        let _ = stdin.write_all(input.as_bytes());
    }
    let out = child.wait_with_output().expect("openssl output");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `openssl req` with a new P-256 key (to `key`) for the SPIFFE ID `id` (its URI SAN):
/// with `-new` a CSR, with `-x509` a self-signed certificate, written to `out` (`-`: the
/// output returned).
fn openssl_req(mode: &[&str], key: &str, out: &str, cn: &str, id: &str) -> String {
    let (subject, san) = (format!("/CN={cn}"), format!("subjectAltName=URI:{id}"));
    let mut args = vec!["req"];
    args.extend_from_slice(mode);
    args.extend([
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ]);
    args.extend(["-keyout", key]);
    if out != "-" {
        args.extend(["-out", out]);
    }
    args.extend(["-subj", &subject, "-addext", &san]);
    openssl(&args, "")
}

const HTTP_GET: &str = "GET /orders HTTP/1.1\r\nHost: payments\r\nConnection: close\r\n\r\n";

/// `openssl s_client` sending one HTTP request; extra args for the client certificate.
fn s_client(addr: SocketAddr, extra: &[&str]) -> String {
    let connect = addr.to_string();
    let mut args = vec![
        "s_client", "-connect", &connect, "-tls1_3", "-quiet", "-ign_eof",
    ];
    args.extend_from_slice(extra);
    openssl(&args, HTTP_GET)
}

/// A key and CSR made by openssl for `id`; the certificate from the CA's API.
async fn openssl_certificate(
    server: &Server,
    dir: &Path,
    id: &str,
    token: &str,
) -> (PathBuf, PathBuf, Value) {
    let key = dir.join("openssl.key");
    let csr = dir.join("openssl.csr");
    let out = openssl_req(
        &["-new"],
        key.to_str().expect("path"),
        csr.to_str().expect("path"),
        "openssl",
        id,
    );
    assert!(csr.exists(), "{out}");
    let r = reqwest::Client::new()
        .post(server.url("/api/v1/identity/certify"))
        .json(&serde_json::json!({
            "csr": std::fs::read_to_string(&csr).expect("csr"),
            "token": token,
        }))
        .send()
        .await
        .expect("certify");
    let status = r.status().as_u16();
    let body: Value = r.json().await.expect("json");
    assert_eq!(status, 200, "{body}");
    let chain = dir.join("openssl-chain.pem");
    std::fs::write(&chain, body["certificate_chain"].as_str().expect("chain")).expect("write");
    (key, chain, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_mesh_ca_signs_what_a_token_covers_refuses_the_rest_and_keeps_its_root() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("data");
    let server = Server::start(&data);
    let token = token_file(&server, dir.path(), "shop", &["cart"]);
    let token = std::fs::read_to_string(token).expect("token");
    let id = format!("spiffe://{TD}/ns/shop/sa/cart");
    let (_, chain, issued) = openssl_certificate(&server, dir.path(), &id, &token).await;
    assert_eq!(issued["identity"], id.as_str());
    assert!(issued["not_after_unix"].as_u64().expect("expiry") > 0);

    // openssl agrees: the leaf chains to the root, names the SPIFFE ID, serves both ends.
    let root = dir.path().join("root.pem");
    let anchors = server.get_text("/api/v1/identity/trust-anchors").await;
    assert_eq!(anchors, issued["trust_anchors"].as_str().expect("anchors"));
    std::fs::write(&root, &anchors).expect("root");
    let verify = openssl(
        &[
            "verify",
            "-CAfile",
            root.to_str().expect("p"),
            chain.to_str().expect("p"),
        ],
        "",
    );
    assert!(verify.contains(": OK"), "{verify}");
    let text = openssl(
        &["x509", "-noout", "-text", "-in", chain.to_str().expect("p")],
        "",
    );
    assert!(text.contains(&format!("URI:{id}")), "{text}");
    assert!(text.contains("DNS:cart.shop.meshscope.local"), "{text}");
    assert!(
        text.contains("TLS Web Client Authentication")
            && text.contains("TLS Web Server Authentication"),
        "{text}"
    );

    // Refusals, each with its status and a reason a person can act on.
    let certify = |body: Value| {
        let url = server.url("/api/v1/identity/certify");
        async move {
            let r = reqwest::Client::new()
                .post(url)
                .json(&body)
                .send()
                .await
                .expect("post");
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.expect("json"))
        }
    };
    let csr = std::fs::read_to_string(dir.path().join("openssl.csr")).expect("csr");
    let (s, b) = certify(serde_json::json!({ "csr": csr })).await;
    assert_eq!(s, 401, "{b}");
    assert!(
        b["error"]
            .as_str()
            .expect("error")
            .contains("no bootstrap token"),
        "{b}"
    );
    let (s, b) = certify(serde_json::json!({ "csr": csr, "token": "msb_forged" })).await;
    assert_eq!(s, 401, "{b}");
    let other = openssl_req(
        &["-new"],
        "/dev/null",
        "-",
        "x",
        &format!("spiffe://{TD}/ns/shop/sa/payments"),
    );
    let other_csr = &other[other.find("-----BEGIN CERTIFICATE REQUEST").expect("csr")..];
    let (s, b) = certify(serde_json::json!({ "csr": other_csr, "token": token })).await;
    assert_eq!(s, 403, "{b}");
    assert!(
        b["error"]
            .as_str()
            .expect("error")
            .contains("does not cover"),
        "{b}"
    );
    let (s, b) = certify(serde_json::json!({ "csr": "not a csr", "token": token })).await;
    assert_eq!(s, 400, "{b}");
    let r = reqwest::Client::new()
        .post(server.url("/api/v1/identity/certify"))
        .body("{")
        .send()
        .await
        .expect("post");
    assert_eq!(r.status().as_u16(), 400);

    assert_eq!(
        server
            .metric("meshscope_identity_certificates_issued_total")
            .await,
        Some(1.0)
    );
    assert_eq!(
        server
            .metric("meshscope_identity_certify_refused_total{status=\"401\"}")
            .await,
        Some(2.0)
    );
    let expiry = server
        .metric(&format!(
            "meshscope_identity_certificate_expiry_timestamp_seconds{{identity=\"{id}\"}}"
        ))
        .await
        .expect("expiry gauge");
    assert_eq!(
        expiry as u64,
        issued["not_after_unix"].as_u64().expect("expiry")
    );

    // The key is private; a restart keeps the same root.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(data.join("ca/root.key"))
            .expect("root.key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }
    server.terminate();
    let again = Server::start(&data);
    let anchors_again = again.get_text("/api/v1/identity/trust-anchors").await;
    assert_eq!(anchors_again, anchors, "the root survives a restart");
}

/// A server whose alert rules watch the edges' security, evaluated every second.
fn server_with_security_rules(dir: &Path) -> Server {
    let config = dir.join("meshscope.toml");
    std::fs::write(
        &config,
        r#"
[alerts]
evaluation-interval-secs = 1

[[alerts.rules]]
name = "plaintext-in-the-mesh"
kind = "plaintext-edge"
window-secs = 60

[[alerts.rules]]
name = "denied"
kind = "denied-requests"
window-secs = 60
"#,
    )
    .expect("config");
    Server::start_with(
        &dir.join("data"),
        &["--config", config.to_str().expect("p")],
    )
}

/// Waits (15 s at most) for a firing alert of `rule` on `source → target`.
async fn wait_alert(server: &Server, rule: &str, source: &str, target: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let alerts: Value = server.get_json("/api/v1/alerts?state=firing").await;
        let found = alerts.as_array().and_then(|a| {
            a.iter()
                .find(|x| {
                    x["rule"] == rule
                        && x["labels"]["source"] == source
                        && x["labels"]["target"] == target
                })
                .cloned()
        });
        if let Some(f) = found {
            return f;
        }
        assert!(
            Instant::now() < deadline,
            "no {rule} alert on {source} → {target}: {alerts}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn edge<'a>(g: &'a Value, source: &str, target: &str) -> Option<&'a Value> {
    g["edges"]
        .as_array()?
        .iter()
        .find(|e| e["source"] == source && e["target"] == target)
}

/// Polls `/api/v1/graph` until `ok` holds (15 s at most); the last answer either way.
async fn wait_graph(server: &Server, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let g: Value = server.get_json("/api/v1/graph").await;
        if ok(&g) || Instant::now() > deadline {
            return g;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn strict_mtls_admits_only_mesh_certificates_and_authorization_keeps_denied_callers_from_the_app()
 {
    let dir = tempfile::tempdir().expect("tmp");
    let server = server_with_security_rules(dir.path());
    let mesh = Mesh {
        token: token_file(
            &server,
            dir.path(),
            "shop",
            &["payments", "checkout", "frontend"],
        ),
        server: &server,
    };
    let (app_addr, app) = start_app().await;
    let allow_checkout = vec![AuthorizationRule {
        allow: vec!["ns/shop/sa/checkout".into()],
        mode: AuthzMode::Enforce,
    }];
    let payments = mesh
        .start(
            "payments",
            Some(app_addr),
            MtlsMode::Strict,
            allow_checkout,
            vec![],
        )
        .await;
    let inbound = payments.inbound.expect("inbound");
    let checkout = mesh
        .start(
            "checkout",
            None,
            MtlsMode::Strict,
            vec![],
            vec![to("payments", inbound)],
        )
        .await;
    let frontend = mesh
        .start(
            "frontend",
            None,
            MtlsMode::Strict,
            vec![],
            vec![to("payments", inbound)],
        )
        .await;

    // The allowed caller gets through; a workload header its app forges is not passed on.
    let (status, _, body) = get(
        checkout.outbound.expect("out"),
        "payments",
        &[("x-meshscope-source-workload", "frontend")],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["source_header"],
        Value::Null,
        "the app never sees the header"
    );
    assert_eq!(app.hits.load(Ordering::SeqCst), 1);

    // A mesh identity the rule does not admit: 403 from the proxy, the app never sees it.
    let (status, proxy_said, _) = get(frontend.outbound.expect("out"), "payments", &[]).await;
    assert_eq!((status, proxy_said.as_str()), (403, "unauthorized"));
    assert_eq!(
        app.hits.load(Ordering::SeqCst),
        1,
        "a denied request never reaches the app"
    );

    // Strangers at the door: plain HTTP, TLS without a certificate, one from another CA.
    let plain = reqwest::Client::new()
        .get(format!("http://{inbound}/orders"))
        .header("host", "payments")
        .send()
        .await;
    assert!(
        plain.is_err(),
        "plaintext to a strict inbound must fail: {plain:?}"
    );
    let no_cert = s_client(inbound, &[]);
    assert!(!no_cert.contains("HTTP/1.1"), "{no_cert}");
    assert!(no_cert.contains("alert"), "{no_cert}");
    let fkey = dir.path().join("foreign.key");
    let fcert = dir.path().join("foreign.pem");
    let out = openssl_req(
        &["-x509", "-days", "1"],
        fkey.to_str().expect("p"),
        fcert.to_str().expect("p"),
        "checkout",
        &format!("spiffe://{TD}/ns/shop/sa/checkout"),
    );
    assert!(fcert.exists(), "{out}");
    let foreign = s_client(
        inbound,
        &[
            "-cert",
            fcert.to_str().expect("p"),
            "-key",
            fkey.to_str().expect("p"),
        ],
    );
    assert!(!foreign.contains("HTTP/1.1"), "{foreign}");
    assert!(foreign.contains("alert"), "{foreign}");
    // The positive control: openssl with a certificate from the mesh CA for checkout.
    let token = std::fs::read_to_string(&mesh.token).expect("token");
    let (key, chain, _) = openssl_certificate(
        &server,
        dir.path(),
        &format!("spiffe://{TD}/ns/shop/sa/checkout"),
        &token,
    )
    .await;
    let ok = s_client(
        inbound,
        &[
            "-cert",
            chain.to_str().expect("p"),
            "-key",
            key.to_str().expect("p"),
        ],
    );
    assert!(ok.contains("HTTP/1.1 200"), "{ok}");
    assert_eq!(app.hits.load(Ordering::SeqCst), 2);
    let refused = admin_stats(&payments).await["identity"]["inbound_refused"]
        .as_u64()
        .expect("inbound_refused");
    assert!(
        refused >= 3,
        "plaintext, no certificate, foreign CA: {refused}"
    );

    // What the proxies report: the principals from certificates, Istio's security label.
    let checkout_id = format!("spiffe://{TD}/ns/shop/sa/checkout");
    let payments_id = format!("spiffe://{TD}/ns/shop/sa/payments");
    let m = admin_metrics(&payments).await;
    assert!(
        m.contains(&format!("source_workload=\"checkout\",connection_security_policy=\"mutual_tls\",source_principal=\"{checkout_id}\",destination_principal=\"{payments_id}\"")),
        "{m}"
    );
    assert!(!m.contains("source_workload=\"frontend\",connection_security_policy=\"mutual_tls\",source_principal=\"spiffe://meshscope.local/ns/shop/sa/checkout"), "{m}");
    assert!(
        m.contains("meshscope_proxy_certificate_expiry_timestamp_seconds "),
        "{m}"
    );
    let spans = server
        .eventually(
            &format!(
            "SELECT count(*) FROM spans WHERE service_name = 'payments' AND span_kind = 'SERVER'
               AND span_attributes['meshscope.tls'] = 'mtls'
               AND span_attributes['meshscope.peer_identity'] = '{checkout_id}'
               AND span_attributes['meshscope.source_workload'] = 'checkout'"
        ),
            |n| n >= 2,
        )
        .await;
    assert!(spans >= 2, "{spans}");
    let denied = server
        .eventually(
            "SELECT count(*) FROM logs WHERE service_name = 'payments'
           AND log_attributes['authz'] = 'deny' AND log_attributes['response_code'] = '403'
           AND log_attributes['source_principal'] = 'spiffe://meshscope.local/ns/shop/sa/frontend'",
            |n| n >= 1,
        )
        .await;
    assert_eq!(denied, 1);
    let client_side = server
        .eventually(
            &format!(
            "SELECT count(*) FROM spans WHERE service_name = 'checkout' AND span_kind = 'CLIENT'
               AND span_attributes['meshscope.tls'] = 'mtls'
               AND span_attributes['meshscope.peer_identity'] = '{payments_id}'"
        ),
            |n| n >= 1,
        )
        .await;
    assert_eq!(client_side, 1);
    // Nobody is named "frontend" as payments' caller but the one its certificate proves.
    let forged = server
        .scalar(
            "SELECT count(*) FROM spans WHERE service_name = 'payments'
               AND span_attributes['meshscope.source_workload'] = 'frontend'
               AND (span_attributes['meshscope.authz'] IS NULL OR span_attributes['meshscope.authz'] <> 'deny')",
        )
        .await;
    assert_eq!(forged, 0, "the forged header named no caller");

    // The graph: the padlock's numbers on each edge, from the proxies' own metrics.
    let g = wait_graph(&server, |g| {
        edge(g, "frontend", "payments").is_some_and(|e| e["denied"] == 1)
            && edge(g, "checkout", "payments").is_some_and(|e| e["mtls_ratio"] == 1.0)
    })
    .await;
    let allowed = edge(&g, "checkout", "payments").expect("checkout → payments");
    assert_eq!(
        allowed["client_identities"],
        serde_json::json!([checkout_id])
    );
    assert_eq!(
        allowed["server_identities"],
        serde_json::json!([payments_id])
    );
    assert_eq!(allowed["denied"], 0);
    let refused = edge(&g, "frontend", "payments").expect("frontend → payments");
    assert_eq!(refused["mtls_ratio"], 1.0, "{refused}");
    assert_eq!(refused["reasons"]["unauthorized"], 1, "{refused}");
    // The README's per-minute SQL says the same.
    let per_minute = server
        .sql(
            "SELECT date_trunc('minute', time) AS minute, log_attributes['downstream_workload'] AS source,
                    service_name AS target, count(*) FILTER (WHERE log_attributes['authz'] = 'deny') AS denied
             FROM logs WHERE log_attributes['direction'] = 'inbound' GROUP BY 1, 2, 3 ORDER BY 1",
        )
        .await;
    let denied_rows: i64 = per_minute["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .filter(|r| r[1] == "frontend" && r[2] == "payments")
        .filter_map(|r| r[3].as_i64())
        .sum();
    assert_eq!(denied_rows, 1, "{per_minute}");
    let mtls_rows = server
        .sql(
            "SELECT date_trunc('minute', time) AS minute,
                    log_attributes['source_workload'] AS source, log_attributes['destination_service_name'] AS target,
                    count(*) FILTER (WHERE log_attributes['connection_security_policy'] = 'mutual_tls') AS mtls,
                    count(*) FILTER (WHERE log_attributes['connection_security_policy'] = 'none') AS plaintext
             FROM logs WHERE log_attributes['direction'] = 'outbound' GROUP BY 1, 2, 3 ORDER BY 1",
        )
        .await;
    let (mtls, plain): (i64, i64) = mtls_rows["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .filter(|r| r[1] == "checkout" && r[2] == "payments")
        .fold((0, 0), |(m, p), r| {
            (
                m + r[3].as_i64().unwrap_or(0),
                p + r[4].as_i64().unwrap_or(0),
            )
        });
    assert_eq!((mtls, plain), (1, 0), "{mtls_rows}");
    let alert = wait_alert(&server, "denied", "frontend", "payments").await;
    assert_eq!(alert["evidence"]["value"], 1.0, "{alert}");
    let none: Value = server.get_json("/api/v1/alerts?state=firing").await;
    assert!(
        !none.to_string().contains("plaintext-in-the-mesh"),
        "all of it was mTLS: {none}"
    );

    for p in [payments, checkout, frontend] {
        p.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn permissive_takes_mtls_and_plaintext_on_one_port_and_labels_each_and_audit_only_marks() {
    let dir = tempfile::tempdir().expect("tmp");
    let server = server_with_security_rules(dir.path());
    let mesh = Mesh::new(&server, dir.path(), &["cart", "frontend"]);
    let (app_addr, app) = start_app().await;
    let audit = vec![AuthorizationRule {
        allow: vec!["ns/shop/sa/frontend".into()],
        mode: AuthzMode::Audit,
    }];
    let cart = mesh
        .start("cart", Some(app_addr), MtlsMode::Permissive, audit, vec![])
        .await;
    let inbound = cart.inbound.expect("inbound");
    let frontend = mesh.frontend_to_cart(inbound).await;
    let (status, _, _) = get(frontend.outbound.expect("out"), "cart", &[]).await;
    assert_eq!(status, 200);
    // Plaintext on the same port, with a forged caller header: accepted (audit only
    // marks), and the header names nobody.
    let r = reqwest::Client::new()
        .get(format!("http://{inbound}/orders"))
        .header("host", "cart")
        .header("x-meshscope-source-workload", "evil")
        // Nor does a plaintext caller hide its request from the golden signals by
        // claiming it is a mirror's copy.
        .header("x-meshscope-mirror", "1")
        .send()
        .await
        .expect("plaintext to permissive");
    assert_eq!(r.status().as_u16(), 200);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["source_header"], Value::Null);
    assert_eq!(app.hits.load(Ordering::SeqCst), 2);
    let m = admin_metrics(&cart).await;
    assert!(m.contains("connection_security_policy=\"mutual_tls\",source_principal=\"spiffe://meshscope.local/ns/shop/sa/frontend\""), "{m}");
    assert!(
        m.contains(
            "response_code=\"200\",connection_security_policy=\"none\",authz=\"would-deny\"} 1"
        ),
        "{m}"
    );
    assert!(!m.contains("evil"), "a header invents no caller: {m}");
    let would_deny = server
        .eventually(
            "SELECT count(*) FROM logs WHERE service_name = 'cart'
           AND log_attributes['authz'] = 'would-deny'
           AND log_attributes['connection_security_policy'] = 'none'",
            |n| n >= 1,
        )
        .await;
    assert_eq!(would_deny, 1);
    let plaintext_span = server
        .eventually(
            "SELECT count(*) FROM spans WHERE service_name = 'cart' AND span_kind = 'SERVER'
           AND span_attributes['meshscope.tls'] = 'plaintext'
           AND span_attributes['meshscope.source_workload'] IS NULL AND mirror IS NULL",
            |n| n >= 1,
        )
        .await;
    assert_eq!(plaintext_span, 1);
    // The plaintext caller has no proven name, so it is on no edge; the mTLS one is.
    let g = wait_graph(&server, |g| {
        edge(g, "frontend", "cart").is_some_and(|e| e["mtls_ratio"] == 1.0)
    })
    .await;
    assert!(
        edge(&g, "frontend", "cart").is_some_and(|e| e["mtls_ratio"] == 1.0),
        "{g}"
    );
    assert!(!g.to_string().contains("evil"), "{g}");

    // A replica of frontend configured to call cart in plaintext (its own certificate
    // notwithstanding): the edge between two meshed services is half plaintext, and said so.
    let mut plain_to_cart = to("cart", inbound);
    plain_to_cart.mtls = Some(false);
    let replica = mesh
        .start(
            "frontend",
            None,
            MtlsMode::Strict,
            vec![],
            vec![plain_to_cart],
        )
        .await;
    let (status, _, _) = get(replica.outbound.expect("out"), "cart", &[]).await;
    assert_eq!(status, 200);
    let g = wait_graph(&server, |g| {
        edge(g, "frontend", "cart").is_some_and(|e| e["mtls_ratio"] == 0.5)
    })
    .await;
    assert!(
        edge(&g, "frontend", "cart").is_some_and(|e| e["mtls_ratio"] == 0.5),
        "{g}"
    );
    let alert = wait_alert(&server, "plaintext-in-the-mesh", "frontend", "cart").await;
    assert_eq!(alert["evidence"]["value"], 0.5, "{alert}");
    replica.stop().await;
    cart.stop().await;
    frontend.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_second_certificates_rotate_under_steady_traffic_without_a_failed_request() {
    let dir = tempfile::tempdir().expect("tmp");
    let server = Server::start_with(&dir.path().join("data"), &["--cert-lifetime-secs", "10"]);
    let mesh = Mesh::new(&server, dir.path(), &["cart", "frontend"]);
    let (app_addr, app) = start_app().await;
    let cart = mesh
        .start("cart", Some(app_addr), MtlsMode::Strict, vec![], vec![])
        .await;
    let inbound = cart.inbound.expect("inbound");
    let frontend = mesh.frontend_to_cart(inbound).await;
    let first_expiry = cart.identity().expect("identity").expiry_unix();
    // Steady traffic, on new connections as well as pooled ones, until both proxies have
    // renewed twice (at 70% of 10 s, so about 14 s), bounded at 40 s.
    let outbound = frontend.outbound.expect("out");
    let (mut sent, mut failed) = (0u64, vec![]);
    let deadline = Instant::now() + Duration::from_secs(40);
    let renewed = |p: &Proxy| {
        p.identity()
            .map_or(0, |i| i.renewed.load(Ordering::Relaxed))
    };
    while renewed(&cart) < 2 || renewed(&frontend) < 2 {
        assert!(Instant::now() < deadline, "no second renewal within 40 s");
        // A fresh client each time: a new connection to the outbound listener.
        let (status, why, _) = get(outbound, "cart", &[]).await;
        sent += 1;
        if status != 200 {
            failed.push((status, why));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        failed.is_empty(),
        "{} of {sent} requests failed: {failed:?}",
        failed.len()
    );
    assert!(sent >= 100, "{sent}");
    assert_eq!(app.hits.load(Ordering::SeqCst), sent);
    let now_expiry = cart.identity().expect("identity").expiry_unix();
    assert!(now_expiry > first_expiry, "{now_expiry} vs {first_expiry}");
    // The first certificates have expired by now: a proxy that starts now and has no
    // pooled connection still gets through, so new handshakes use the renewed ones.
    let newcomer = mesh.frontend_to_cart(inbound).await;
    let (status, why, _) = get(newcomer.outbound.expect("out"), "cart", &[]).await;
    assert_eq!(status, 200, "{why}");
    assert_eq!(admin_stats(&cart).await["identity"]["renew_failures"], 0);
    for p in [cart, frontend, newcomer] {
        p.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn authorization_rules_reload_with_the_file_without_a_restart() {
    let dir = tempfile::tempdir().expect("tmp");
    let server = Server::start(&dir.path().join("data"));
    let token = token_file(&server, dir.path(), "shop", &["cart", "frontend"]);
    let (app_addr, app) = start_app().await;
    let file = dir.path().join("cart.toml");
    let write = |allow: &str| {
        let text = format!(
            "[service]\nname = \"cart\"\nnamespace = \"shop\"\n\
             [listen]\ninbound = \"127.0.0.1:0\"\napp = \"{app_addr}\"\n\
             [identity]\nmode = \"strict\"\nca-url = \"{}\"\ntoken-file = \"{}\"\n\
             [[authorization]]\nallow = [\"{allow}\"]\n",
            server.url(""),
            token.display()
        );
        // A new file renamed over the old: the watcher never reads half of it.
        let tmp = dir.path().join("cart.toml.tmp");
        std::fs::write(&tmp, text).expect("write");
        std::fs::rename(&tmp, &file).expect("rename");
    };
    write("ns/shop/sa/nobody");
    let cart = Proxy::start(
        ProxyConfig::load(&file).expect("config"),
        Some(file.clone()),
    )
    .await
    .expect("cart proxy");
    let inbound = cart.inbound.expect("inbound");
    let mesh = Mesh {
        server: &server,
        token: token.clone(),
    };
    let frontend = mesh.frontend_to_cart(inbound).await;
    let out = frontend.outbound.expect("out");
    assert_eq!(get(out, "cart", &[]).await.0, 403);
    // The proxy watches the file's content: the rewrite is one reload, then the new rule
    // holds.
    write("ns/shop/sa/frontend");
    let deadline = Instant::now() + Duration::from_secs(10);
    while cart.reloads().applied.load(Ordering::Relaxed) == 0 {
        assert!(
            Instant::now() < deadline,
            "the rewritten file was not reloaded"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, why, _) = get(out, "cart", &[]).await;
    assert_eq!(status, 200, "the new rule applies: {why}");
    assert_eq!(
        app.hits.load(Ordering::SeqCst),
        1,
        "only the allowed request reached the app"
    );
    cart.stop().await;
    frontend.stop().await;
}

/// A mesh that sends only traces: the proxies' spans alone put the security on the edge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_alone_say_how_an_edge_is_secured() {
    use common::otlp::{kv, post, traces};
    use opentelemetry_proto::tonic::trace::v1::{Span, span::SpanKind};
    let server = Server::in_temp_dir(&[]);
    let now = common::now_ns() - 60_000_000_000;
    let id = |w: &str| format!("spiffe://{TD}/ns/shop/sa/{w}");
    let span = |trace: u8, span: u8, parent: Option<u8>, kind: SpanKind, attrs: Vec<_>| Span {
        trace_id: vec![trace; 16],
        span_id: vec![span; 8],
        parent_span_id: parent.map(|p| vec![p; 8]).unwrap_or_default(),
        name: "GET /cart".into(),
        kind: kind as i32,
        start_time_unix_nano: now + u64::from(trace) * 1_000_000,
        end_time_unix_nano: now + u64::from(trace) * 1_000_000 + 2_000_000,
        attributes: attrs,
        ..Default::default()
    };
    // Three calls over mTLS (both sides' spans) and one in plaintext.
    let mut frontend = Vec::new();
    let mut cart = Vec::new();
    for t in 1..=4u8 {
        let tls = if t == 4 { "plaintext" } else { "mtls" };
        let mut client = vec![kv("peer.service", "cart"), kv("meshscope.tls", tls)];
        let mut server_side = vec![kv("meshscope.tls", tls)];
        if tls == "mtls" {
            client.push(kv("meshscope.peer_identity", &id("cart")));
            server_side.push(kv("meshscope.peer_identity", &id("frontend")));
            server_side.push(kv("meshscope.source_workload", "frontend"));
        }
        frontend.push(span(t, 1, None, SpanKind::Client, client));
        cart.push(span(t, 2, Some(1), SpanKind::Server, server_side));
    }
    post(
        &server.otlp_url("/v1/traces"),
        &traces("frontend", frontend),
    )
    .await;
    post(&server.otlp_url("/v1/traces"), &traces("cart", cart)).await;
    let g = wait_graph(&server, |g| {
        edge(g, "frontend", "cart").is_some_and(|e| e["mtls_ratio"] == 0.75)
    })
    .await;
    let e = edge(&g, "frontend", "cart").expect("frontend → cart");
    assert_eq!(e["mtls_ratio"], 0.75, "{e}");
    assert_eq!(
        e["client_identities"],
        serde_json::json!([id("frontend")]),
        "{e}"
    );
    assert_eq!(
        e["server_identities"],
        serde_json::json!([id("cart")]),
        "{e}"
    );
    assert_eq!(e["sources"], serde_json::json!(["spans"]), "{e}");
}

/// Proxies that report metrics beside one that writes only access logs: each edge gets its
/// security from what saw it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn access_logs_fill_the_edges_the_metrics_do_not_cover() {
    use common::otlp::{kv, logs_of, post};
    use opentelemetry_proto::tonic::logs::v1::LogRecord;
    let dir = tempfile::tempdir().expect("tmp");
    let server = Server::start(&dir.path().join("data"));
    let mesh = Mesh::new(&server, dir.path(), &["cart", "frontend"]);
    let (app_addr, _app) = start_app().await;
    let cart = mesh
        .start("cart", Some(app_addr), MtlsMode::Strict, vec![], vec![])
        .await;
    let frontend = mesh.frontend_to_cart(cart.inbound.expect("inbound")).await;
    assert_eq!(
        get(frontend.outbound.expect("out"), "cart", &[]).await.0,
        200
    );
    // A legacy sidecar of another make, logging its calls only, in plaintext.
    let now = common::now_ns();
    let record = LogRecord {
        time_unix_nano: now,
        attributes: vec![
            kv("source_workload", "legacy"),
            kv("destination_workload", "billing"),
            kv("destination_service_name", "billing"),
            kv("direction", "outbound"),
            kv("response_code", "200"),
            kv("duration_ms", "4"),
            kv("connection_security_policy", "none"),
        ],
        ..Default::default()
    };
    post(
        &server.otlp_url("/v1/logs"),
        &logs_of(
            vec![kv("service.name", "legacy")],
            vec![record.clone(), record],
        ),
    )
    .await;
    let g = wait_graph(&server, |g| {
        edge(g, "frontend", "cart").is_some_and(|e| e["mtls_ratio"] == 1.0)
            && edge(g, "legacy", "billing").is_some_and(|e| e["mtls_ratio"] == 0.0)
    })
    .await;
    assert_eq!(
        edge(&g, "frontend", "cart").expect("frontend → cart")["mtls_ratio"],
        1.0,
        "{g}"
    );
    assert_eq!(
        edge(&g, "legacy", "billing").expect("legacy → billing")["mtls_ratio"],
        0.0,
        "{g}"
    );
    cart.stop().await;
    frontend.stop().await;
}

/// The control plane's `mtls-mode` switches a running proxy's inbound listener between
/// strict and permissive (plaintext refused, then taken on the same port, then refused
/// again when the document no longer says); `off` is refused by the control plane, and a
/// proxy without a certificate refuses a document that asks for a mode, keeping its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_control_plane_switches_inbound_mtls_between_strict_and_permissive() {
    let dir = tempfile::tempdir().expect("tmp");
    let server = Server::start(&dir.path().join("data"));
    let mesh = Mesh::new(&server, dir.path(), &["cart"]);
    let (app_addr, app) = start_app().await;
    let mut cart = mesh
        .start("cart", Some(app_addr), MtlsMode::Strict, vec![], vec![])
        .await;
    let inbound = cart.inbound.expect("inbound");
    let client = reqwest::Client::new();
    let put = |workload: &'static str, doc: &'static str| {
        let req = client
            .put(server.url(&format!("/api/v1/mesh/policy/{workload}")))
            .body(doc);
        async move {
            let r = req.send().await.expect("PUT");
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.expect("JSON"))
        }
    };
    let plaintext = || {
        let req = client
            .get(format!("http://{inbound}/orders"))
            .header("host", "cart")
            .timeout(Duration::from_secs(5));
        async move { req.send().await.map(|r| r.status().as_u16()).ok() }
    };
    // Waits (bounded) until a plaintext request gets `want` (None: refused).
    let until = |want: Option<u16>| async move {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let got = plaintext().await;
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "plaintext got {got:?}, want {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    assert_eq!(put("cart", "mtls-mode = \"permissive\"\n").await.0, 200);
    assert_eq!(plaintext().await, None, "strict before it follows");
    cart.follow(meshscope_proxy::control::ControlPlane {
        url: server.url(""),
        workload: "cart".into(),
    });
    until(Some(200)).await;
    assert_eq!(admin_stats(&cart).await["identity"]["mode"], "permissive");
    assert_eq!(app.hits.load(Ordering::SeqCst), 1);
    // A keep-alive plaintext connection, open when the listener turns strict again (the
    // document no longer says, so the file's mode), is drained: closed, not kept.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut open = tokio::net::TcpStream::connect(inbound)
        .await
        .expect("connect");
    open.write_all(b"GET /orders HTTP/1.1\r\nhost: cart\r\n\r\n")
        .await
        .expect("write");
    let mut buf = vec![0u8; 4096];
    let n = open.read(&mut buf).await.expect("read");
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    assert_eq!(put("cart", "").await.0, 200);
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match open.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the plaintext connection stayed open under strict"
    );
    until(None).await;
    assert_eq!(admin_stats(&cart).await["identity"]["mode"], "strict");
    let refused = admin_stats(&cart).await["identity"]["inbound_refused"]
        .as_u64()
        .unwrap_or(0);
    assert!(refused >= 2, "{refused}");
    // `off` is not the control plane's to give.
    let (status, body) = put("cart", "mtls-mode = \"off\"\n").await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["problems"][0]
            .as_str()
            .is_some_and(|p| p.contains("strict\" or \"permissive")),
        "{body}"
    );
    cart.stop().await;

    // A proxy without a certificate cannot take a mode: reported, its own kept.
    let mut plain = Proxy::start(
        ProxyConfig {
            identity: IdentityConfig::default(),
            ..mesh.config("plain", Some(app_addr), MtlsMode::Off, vec![], vec![])
        },
        None,
    )
    .await
    .expect("plain proxy");
    assert_eq!(put("plain", "mtls-mode = \"strict\"\n").await.0, 200);
    plain.follow(meshscope_proxy::control::ControlPlane {
        url: server.url(""),
        workload: "plain".into(),
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while plain.applied().last_error.is_none() {
        assert!(Instant::now() < deadline, "never reported the refusal");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let error = plain.applied().last_error.unwrap_or_default();
    assert!(error.contains("needs a certificate"), "{error}");
    let r = client
        .get(format!("http://{}/orders", plain.inbound.expect("inbound")))
        .header("host", "plain")
        .send()
        .await
        .expect("plaintext to a proxy without identity");
    assert_eq!(r.status(), 200);
    plain.stop().await;
}
