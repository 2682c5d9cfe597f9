//! Alerting end to end: the real binary with rules in its `--config` file, spans sent over
//! OTLP/JSON, and real receivers: a webhook server in the test, and Debian's
//! `prometheus-alertmanager` (installed by scripts/install-test-deps).

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use common::{Server, now_ns};
use serde_json::{Value, json};

type Inbox = Arc<Mutex<Vec<(HeaderMap, Value)>>>;

async fn hook(State(inbox): State<Inbox>, headers: HeaderMap, body: Bytes) -> StatusCode {
    match serde_json::from_slice(&body) {
        Ok(v) => {
            inbox.lock().expect("lock").push((headers, v));
            StatusCode::OK
        }
        Err(_) => StatusCode::BAD_REQUEST,
    }
}

/// `POST /hook`, keeping every JSON body in the returned inbox; and its listener on
/// 127.0.0.1:0.
async fn hook_app() -> (Router, Inbox, tokio::net::TcpListener) {
    let inbox = Inbox::default();
    let app = Router::new()
        .route("/hook", post(hook))
        .with_state(Arc::clone(&inbox));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    (app, inbox, l)
}

/// A webhook receiver on 127.0.0.1:0 that keeps every JSON body it gets.
async fn receiver() -> (SocketAddr, Inbox) {
    let (app, inbox, l) = hook_app().await;
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(l, app).await });
    (addr, inbox)
}

/// Waits (up to 30 s) until `pick` finds something in the inbox.
async fn wait_for<T>(
    inbox: &Inbox,
    what: &str,
    pick: impl Fn(&[(HeaderMap, Value)]) -> Option<T>,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(t) = pick(&inbox.lock().expect("lock")) {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "no {what} within 30 s; got {:#?}",
            inbox
                .lock()
                .expect("lock")
                .iter()
                .map(|(_, v)| v)
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn id(bytes: usize) -> String {
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let pid = std::process::id() as u64;
    format!("{:0width$x}", (pid << 32) | n, width = bytes * 2)
}

fn span(trace: &str, span_id: &str, parent: &str, kind: i32, start: u64, error: bool) -> Value {
    json!({
        "traceId": trace, "spanId": span_id, "parentSpanId": parent,
        "name": "GET /cart", "kind": kind,
        "startTimeUnixNano": start.to_string(),
        "endTimeUnixNano": (start + 4_000_000).to_string(),
        "status": { "code": if error { 2 } else { 1 } },
    })
}

/// OTLP/JSON over HTTP, spans grouped by service.
async fn send(server: &Server, by_service: Vec<(&str, Vec<Value>)>) {
    let body = json!({
        "resourceSpans": by_service.into_iter().map(|(service, spans)| json!({
            "resource": { "attributes": [
                { "key": "service.name", "value": { "stringValue": service } }
            ]},
            "scopeSpans": [{ "spans": spans }],
        })).collect::<Vec<_>>()
    });
    let r = reqwest::Client::new()
        .post(server.otlp_url("/v1/traces"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("export");
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
}

/// `n` entry requests to checkout, the first `errors` failing; their trace ids.
async fn checkout_requests(server: &Server, n: usize, errors: usize) -> Vec<String> {
    let start = now_ns() - 2_000_000_000;
    let mut spans = Vec::new();
    let mut traces = Vec::new();
    for i in 0..n {
        let t = id(16);
        spans.push(span(
            &t,
            &id(8),
            "",
            2,
            start + i as u64 * 1_000_000,
            i < errors,
        ));
        traces.push(t);
    }
    send(server, vec![("checkout", spans)]).await;
    traces
}

/// One call from `from` to `to` starting `ago_secs` before now.
fn call(from: &'static str, to: &'static str, ago_secs: u64) -> Vec<(&'static str, Vec<Value>)> {
    let start = now_ns() - ago_secs * 1_000_000_000;
    let (t, c) = (id(16), id(8));
    vec![
        (from, vec![span(&t, &c, "", 3, start, false)]),
        (to, vec![span(&t, &id(8), &c, 2, start + 100_000, false)]),
    ]
}

/// The rules `write_config` writes.
const RULES: usize = 2;

fn write_config(dir: &Path, receivers: &str) -> String {
    let path = dir.join("meshscope.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[alerts]
evaluation-interval-secs = 1

[[alerts.rules]]
name = "checkout-errors"
signal = "error_rate"
service = "checkout"
threshold = 0.1
window-secs = 60
for-secs = 0
severity = "critical"
annotations = {{ summary = "{{{{ $labels.service }}}} fails {{{{ $value }}}} of its requests" }}

[[alerts.rules]]
name = "frontend-new-edge"
kind = "edge-appeared"
source = "frontend"
window-secs = 20

{receivers}
"#
        ),
    )
    .expect("config");
    path.to_string_lossy().into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_gets_alertmanager_v4_with_evidence_and_structural_alerts() {
    let dir = tempfile::tempdir().expect("tmp");
    let (addr, inbox) = receiver().await;
    let config = write_config(
        dir.path(),
        &format!(
            "[[alerts.receivers]]\nname = \"ops\"\nurl = \"http://{addr}/hook\"\nhmac-secret = \"k\"\n"
        ),
    );
    let server = Server::start_with(&dir.path().join("data"), &["--config", &config]);

    // 10 requests, 6 failing: 60% > 10%.
    let traces = checkout_requests(&server, 10, 6).await;
    let firing = wait_for(&inbox, "checkout-errors notification", |got| {
        got.iter()
            .find(|(_, v)| v["groupLabels"]["alertname"] == "checkout-errors")
            .cloned()
    })
    .await;
    let (headers, v) = firing;
    assert_eq!(v["version"], "4");
    assert_eq!(v["status"], "firing");
    assert_eq!(v["receiver"], "ops");
    assert_eq!(v["externalURL"], server.url(""));
    let a = &v["alerts"][0];
    assert_eq!(a["status"], "firing");
    assert_eq!(a["labels"]["service"], "checkout");
    assert_eq!(a["labels"]["severity"], "critical");
    assert_eq!(a["annotations"]["value"], "0.6");
    assert_eq!(
        a["annotations"]["summary"],
        "checkout fails 0.6 of its requests"
    );
    assert_eq!(
        a["generatorURL"],
        server.url("/api/v1/alerts/rules/checkout-errors")
    );
    let exemplars: Vec<String> = a["annotations"]["exemplar_trace_ids"]
        .as_str()
        .expect("exemplar_trace_ids")
        .split(',')
        .map(str::to_string)
        .collect();
    assert_eq!(exemplars.len(), 5);
    assert!(
        exemplars.iter().all(|x| traces[..6].contains(x)),
        "{exemplars:?} vs failing {:?}",
        &traces[..6]
    );
    let sig = headers
        .get("x-meshscope-signature")
        .and_then(|s| s.to_str().ok())
        .expect("signed");
    assert!(sig.starts_with("sha256="), "{sig}");

    // The API shows it, with its evidence, and the attempt that delivered it.
    let http = reqwest::Client::new();
    let alerts: Value = server.get_json("/api/v1/alerts?state=firing").await;
    let mine = alerts
        .as_array()
        .expect("array")
        .iter()
        .find(|x| x["rule"] == "checkout-errors")
        .expect("firing alert");
    assert_eq!(mine["evidence"]["value"], 0.6);
    assert_eq!(
        mine["evidence"]["exemplar_trace_ids"]
            .as_array()
            .map(Vec::len),
        Some(5)
    );
    // The attempt is logged once the receiver's answer is back, just after the receiver
    // above got the payload.
    let delivered = |log: &Value| {
        log.as_array()
            .expect("array")
            .iter()
            .any(|d| d["ok"] == true && d["receiver"] == "ops")
    };
    let started = Instant::now();
    loop {
        let log = deliveries(&server).await;
        if delivered(&log) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "{log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // meshscope's own /metrics counts them.
    let metrics = server.get_text("/metrics").await;
    let sample = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("{name} in /metrics:\n{metrics}"))
    };
    assert_eq!(sample("meshscope_alerts{state=\"firing\"}"), 1.0);
    assert!(sample("meshscope_alert_notification_attempts_total{outcome=\"ok\"}") >= 1.0);
    assert!(sample("meshscope_alert_rule_evaluations_total{result=\"ok\"}") >= 2.0);

    // Structural: frontend→cart in the previous window; now frontend→cart and a new
    // frontend→payments.
    let mut spans = call("frontend", "cart", 30);
    spans.extend(call("frontend", "cart", 2));
    spans.extend(call("frontend", "payments", 2));
    send(&server, spans).await;
    let (_, v) = wait_for(&inbox, "frontend-new-edge notification", |got| {
        got.iter()
            .find(|(_, v)| v["groupLabels"]["alertname"] == "frontend-new-edge")
            .cloned()
    })
    .await;
    let labels = &v["alerts"][0]["labels"];
    assert_eq!(labels["source"], "frontend");
    assert_eq!(labels["target"], "payments");
    assert_eq!(labels["target_kind"], "service");
    assert_eq!(
        v["alerts"].as_array().map(Vec::len),
        Some(1),
        "cart was there before: {v}"
    );
    assert!(
        v["alerts"][0]["annotations"]["exemplar_trace_ids"]
            .as_str()
            .is_some_and(|s| s.len() == 32)
    );

    // Exactly one firing notification per alert so far (evaluations run every second).
    let count = |name: &str| {
        inbox
            .lock()
            .expect("lock")
            .iter()
            .filter(|(_, v)| v["groupLabels"]["alertname"] == name && v["status"] == "firing")
            .count()
    };
    // Let every rule be evaluated twice more (they run every second): no new notification.
    let evaluations = r#"meshscope_alert_rule_evaluations_total{result="ok"}"#;
    let before = server.wait_metric(evaluations, 10, |_| true).await;
    server
        .wait_metric(evaluations, 30, |n| n >= before + 2.0 * RULES as f64)
        .await;
    assert_eq!(count("checkout-errors"), 1);
    assert_eq!(count("frontend-new-edge"), 1);

    // A restart neither loses the firing alert nor sends it again.
    server.terminate();
    let server = Server::start_with(&dir.path().join("data"), &["--config", &config]);
    // Every rule evaluated twice by the new process: a re-send would have happened by then.
    server
        .wait_metric(evaluations, 30, |n| n >= 2.0 * RULES as f64)
        .await;
    assert_eq!(count("checkout-errors"), 1, "not re-sent after the restart");
    let alerts: Value = server.get_json("/api/v1/alerts?rule=checkout-errors").await;
    assert_eq!(alerts[0]["state"], "firing", "{alerts}");

    // A rule made through the API is evaluated too.
    let r = http
        .post(server.url("/api/v1/alerts/rules"))
        .json(&json!({"name": "checkout-busy", "signal": "requests", "service": "checkout", "op": ">=", "threshold": 10, "window-secs": 120}))
        .send()
        .await
        .expect("create");
    assert_eq!(r.status(), 201);
    wait_for(&inbox, "checkout-busy notification", |got| {
        got.iter()
            .find(|(_, v)| v["groupLabels"]["alertname"] == "checkout-busy")
            .cloned()
    })
    .await;
}

/// A running `prometheus-alertmanager` on a free loopback port, clustering off.
struct Alertmanager {
    child: Child,
    port: u16,
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn alertmanager(dir: &Path, webhook: SocketAddr) -> Alertmanager {
    let cfg = dir.join("alertmanager.yml");
    std::fs::write(
        &cfg,
        format!(
            "route:\n  receiver: hook\n  group_by: [alertname]\n  group_wait: 1s\n  group_interval: 1s\n  repeat_interval: 1h\nreceivers:\n  - name: hook\n    webhook_configs:\n      - url: http://{webhook}/hook\n        send_resolved: true\n"
        ),
    )
    .expect("alertmanager.yml");
    let storage = dir.join("am-data");
    std::fs::create_dir_all(&storage).expect("storage dir");
    let log_path = dir.join("alertmanager.log");
    let log = std::fs::File::create(&log_path).expect("log");
    // Port 0: Alertmanager binds a free port and logs it (`msg="Listening on"
    // address=127.0.0.1:PORT`); no bind-and-release race.
    let child = Command::new("/usr/bin/prometheus-alertmanager")
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!("--storage.path={}", storage.display()))
        .arg("--web.listen-address=127.0.0.1:0")
        .arg("--cluster.listen-address=")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("prometheus-alertmanager (Debian package; scripts/install-test-deps installs it)");
    let mut am = Alertmanager { child, port: 0 };
    let deadline = Instant::now() + Duration::from_secs(30);
    let logged = || std::fs::read_to_string(&log_path).unwrap_or_default();
    while am.port == 0 {
        am.port = logged()
            .lines()
            .filter(|l| l.contains("msg=\"Listening on\""))
            .find_map(|l| l.rsplit_once("address=127.0.0.1:")?.1.trim().parse().ok())
            .unwrap_or(0);
        assert!(
            Instant::now() < deadline,
            "alertmanager did not listen: {}",
            logged()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let port = am.port;
    while common::http_status(port, "/-/ready").ok() != Some(200) {
        assert!(
            Instant::now() < deadline,
            "alertmanager did not start: {}",
            logged()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    am
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_to_a_real_alertmanager() {
    let dir = tempfile::tempdir().expect("tmp");
    let (addr, inbox) = receiver().await;
    let am = alertmanager(dir.path(), addr);
    let config = write_config(
        dir.path(),
        &format!(
            "[[alerts.alertmanagers]]\nurl = \"http://127.0.0.1:{}\"\n",
            am.port
        ),
    );
    let server = Server::start_with(&dir.path().join("data"), &["--config", &config]);
    let traces = checkout_requests(&server, 10, 6).await;

    // Read back through Alertmanager's own API.
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let alert = loop {
        let list: Value = http
            .get(format!("http://127.0.0.1:{}/api/v2/alerts", am.port))
            .send()
            .await
            .expect("GET /api/v2/alerts")
            .json()
            .await
            .expect("json");
        if let Some(a) = list.as_array().and_then(|l| {
            l.iter()
                .find(|a| a["labels"]["alertname"] == "checkout-errors")
        }) {
            break a.clone();
        }
        assert!(
            Instant::now() < deadline,
            "alertmanager never got the alert: {list}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(alert["status"]["state"], "active");
    assert_eq!(alert["labels"]["service"], "checkout");
    assert_eq!(alert["annotations"]["value"], "0.6");
    let exemplars = alert["annotations"]["exemplar_trace_ids"]
        .as_str()
        .expect("exemplars");
    assert!(
        exemplars
            .split(',')
            .all(|x| traces[..6].iter().any(|t| t == x)),
        "{exemplars}"
    );
    assert_eq!(
        alert["generatorURL"],
        server.url("/api/v1/alerts/rules/checkout-errors")
    );

    // And Alertmanager routes it on to its own webhook receiver.
    let (_, v) = wait_for(&inbox, "Alertmanager's webhook", |got| {
        got.iter()
            .find(|(_, v)| v["groupLabels"]["alertname"] == "checkout-errors")
            .cloned()
    })
    .await;
    assert_eq!(v["version"], "4");
    assert_eq!(v["alerts"][0]["labels"]["service"], "checkout");

    let log = deliveries(&server).await;
    let first = &log[log.as_array().map(Vec::len).unwrap_or(1) - 1];
    assert_eq!(
        first["receiver"],
        format!("alertmanager:http://127.0.0.1:{}", am.port)
    );
    assert_eq!(first["ok"], true, "{log}");
}

/// `GET /api/v1/alerts/deliveries`: the logged delivery attempts.
async fn deliveries(server: &Server) -> Value {
    server.get_json("/api/v1/alerts/deliveries").await
}

#[test]
fn a_bad_rule_in_the_config_file_stops_start_up_with_its_problems() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[[alerts.rules]]\nname = \"x\"\nsignal = \"latency\"\n\n[[alerts.rules]]\nname = \"y\"\nsql = \"DELETE FROM spans\"\n",
    )
    .expect("write");
    let out = Command::new(common::binary())
        .arg("serve")
        .arg("--config")
        .arg(&path)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args([
            "--otlp-grpc-addr",
            "127.0.0.1:0",
            "--otlp-http-addr",
            "127.0.0.1:0",
        ])
        .args(["--http-addr", "127.0.0.1:0", "--pg-addr", "127.0.0.1:0"])
        .output()
        .expect("run meshscope");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot start alerting: invalid rule \"x\""),
        "{err}"
    );
    assert!(err.contains("unknown signal \"latency\""), "{err}");
    assert!(err.contains("threshold is required"), "{err}");
}

/// An `https://` webhook: the notification arrives over TLS when the receiver's
/// certificate verifies (here against its `ca-file`), and a receiver whose certificate does
/// not verify gets nothing, with the reason in the delivery log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_receivers_verify_the_certificate_against_the_system_roots_and_a_ca_file() {
    let dir = tempfile::tempdir().expect("tmp");
    // The receiver's certificate, from a CA of its own (the mesh CA code, in a directory
    // of the test's).
    let ca = meshscope_identity::ca::MeshCa::open(
        &dir.path().join("receiver-ca"),
        "receiver.test",
        Duration::from_secs(3600),
    )
    .expect("CA");
    let cert = ca
        .issue_server(
            &["localhost".into()],
            &["127.0.0.1".parse().expect("ip")],
            Duration::from_secs(3600),
        )
        .expect("certificate");
    let (cert_path, key_path, root) = (
        dir.path().join("hook.pem"),
        dir.path().join("hook.key"),
        dir.path().join("hook-ca.pem"),
    );
    std::fs::write(&cert_path, &cert.chain_pem).expect("write");
    std::fs::write(&key_path, &cert.key_pem).expect("write");
    std::fs::write(&root, ca.root_pem()).expect("write");
    let tls = meshscope_auth::tls::Tls::load(&meshscope_auth::tls::TlsFiles {
        cert: cert_path,
        key: key_path,
        client_ca: None,
    })
    .expect("tls");
    let (app, inbox, l) = hook_app().await;
    let port = l.local_addr().expect("addr").port();
    tokio::spawn(meshscope_auth::tls::serve_https(
        l,
        tls.http(),
        app,
        std::future::pending(),
    ));
    let config = write_config(
        dir.path(),
        &format!(
            "[[alerts.receivers]]\nname = \"secure\"\nurl = \"https://localhost:{port}/hook\"\nca-file = \"{}\"\n\n\
             [[alerts.receivers]]\nname = \"untrusted\"\nurl = \"https://localhost:{port}/hook\"\nmax-attempts = 1\n",
            root.display()
        ),
    );
    let server = Server::start_with(&dir.path().join("data"), &["--config", &config]);
    checkout_requests(&server, 10, 6).await;
    let (_, v) = wait_for(&inbox, "a notification over https", |got| {
        got.iter()
            .find(|(_, v)| {
                v["receiver"] == "secure" && v["groupLabels"]["alertname"] == "checkout-errors"
            })
            .cloned()
    })
    .await;
    assert_eq!(v["status"], "firing");
    let deadline = Instant::now() + Duration::from_secs(20);
    let refused = loop {
        let log = deliveries(&server).await;
        let found = log.as_array().and_then(|a| {
            a.iter()
                .find(|d| d["receiver"] == "untrusted" && d["ok"] == false)
                .cloned()
        });
        if let Some(d) = found {
            break d;
        }
        assert!(
            Instant::now() < deadline,
            "no failed attempt for untrusted: {log}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let why = refused["error"].as_str().unwrap_or_default().to_lowercase();
    assert!(
        why.contains("certificate") || why.contains("issuer"),
        "{refused}"
    );
    assert!(
        inbox
            .lock()
            .expect("lock")
            .iter()
            .all(|(_, v)| v["receiver"] != "untrusted"),
        "nothing reached the receiver through an unverified connection"
    );
}
