//! The control plane (issue #17), against the real server: policy documents through
//! `/api/v1/mesh/policy`, a running proxy following them within two seconds, a bad
//! document refused with the running one kept, `/api/v1/mesh/proxies` in sync, a proxy
//! restarted during a change, and the documents kept across a server restart.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::Server;
use meshscope_proxy::Proxy;
use meshscope_proxy::config::ProxyConfig;
use meshscope_proxy::control::ControlPlane;
use serde_json::Value;

async fn app(name: &'static str) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let a = l.local_addr().expect("addr");
    let router = axum::Router::new().fallback(move || async move { name });
    tokio::spawn(async move {
        let _ = axum::serve(l, router).await;
    });
    a
}

fn document(to: SocketAddr, version: &str) -> String {
    format!(
        r#"
[[destination]]
name = "shop"
endpoint = [{{ address = "{to}", version = "{version}" }}]
policy = {{ timeout-ms = 1000 }}
"#
    )
}

async fn put(server: &Server, doc: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .put(server.url("/api/v1/mesh/policy/caller"))
        .body(doc.to_string())
        .send()
        .await
        .expect("PUT");
    (r.status().as_u16(), r.json().await.expect("JSON"))
}

async fn start_proxy(server: &Server) -> Proxy {
    let config = ProxyConfig::parse(
        r#"
[service]
name = "caller"
[listen]
outbound = "127.0.0.1:0"
admin = "127.0.0.1:0"
"#,
    )
    .expect("config");
    let mut p = Proxy::start(config, None).await.expect("proxy");
    p.follow(ControlPlane {
        url: server.url(""),
        workload: "caller".into(),
    });
    p
}

/// Waits (at most `secs`) until the proxy answers `want` for host `shop`.
async fn answers(proxy: &Proxy, want: &str, secs: u64) -> Duration {
    let out = proxy.outbound.expect("outbound");
    let started = Instant::now();
    let client = reqwest::Client::new();
    loop {
        let got = client
            .get(format!("http://{out}/"))
            .header("host", "shop")
            .send()
            .await
            .expect("through the proxy");
        let (status, body) = (got.status().as_u16(), got.text().await.unwrap_or_default());
        if status == 200 && body == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(secs),
            "still {status} {body:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proxies_follow_the_policy_documents_of_the_control_plane() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("data");
    let server = Server::start(&data);
    let (v1, v2) = (app("shop v1").await, app("shop v2").await);
    let (s, v) = put(&server, &document(v1, "v1")).await;
    assert_eq!((s, v["version"].as_u64()), (200, Some(1)), "{v}");

    let proxy = start_proxy(&server).await;
    answers(&proxy, "shop v1", 5).await;
    // A change reaches the running proxy within 2 s (a long poll: at once, in practice).
    let (s, v) = put(&server, &document(v2, "v2")).await;
    assert_eq!((s, v["version"].as_u64()), (200, Some(2)), "{v}");
    let took = answers(&proxy, "shop v2", 2).await;
    eprintln!("version 2 applied {took:?} after the PUT answered");
    assert_eq!(proxy.applied().version, 2);
    // …and it says so: in sync at version 2.
    let deadline = Instant::now() + Duration::from_secs(25);
    loop {
        let list: Value = reqwest::get(server.url("/api/v1/mesh/proxies"))
            .await
            .expect("proxies")
            .json()
            .await
            .expect("json");
        let me = list
            .as_array()
            .and_then(|l| l.iter().find(|p| p["workload"] == "caller"))
            .cloned()
            .unwrap_or(Value::Null);
        if me["applied_version"] == 2 {
            assert_eq!(me["latest_version"], 2, "{me}");
            assert_eq!(me["in_sync"], true, "{me}");
            assert!(me["last_error"].is_null(), "{me}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never reported version 2: {list}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A bad document is refused with every problem, each listed; the running one stays.
    let bad = format!(
        "{}\n[[destination.route]]\nmatch = [{{ headers = [{{ name = \"x\", regex = \"(\" }}] }}]\nbackends = [{{ version = \"v9\" }}]\n\
         [[destination]]\nname = \"empty\"\nendpoint = []\n[destination.policy]\ntimeout-ms = 0\n",
        document(v2, "v2")
    );
    let (s, v) = put(&server, &bad).await;
    assert_eq!(s, 400, "{v}");
    let e = v["error"].as_str().expect("error");
    assert!(e.contains("running one kept"), "{e}");
    let problems: Vec<&str> = v["problems"]
        .as_array()
        .expect("problems")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for expected in ["regex", "\"v9\"", "\"empty\" has no endpoint", "timeout-ms is 0"] {
        assert_eq!(
            problems.iter().filter(|p| p.contains(expected)).count(),
            1,
            "{expected} in {problems:?}"
        );
    }
    let (s, v) = put(&server, "[[destination]]\nname = \"shop\"\nendpont = []\n").await;
    assert_eq!(s, 400, "{v}");
    let current: Value = reqwest::get(server.url("/api/v1/mesh/policy/caller"))
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(current["version"], 2);
    answers(&proxy, "shop v2", 1).await;

    // A proxy restarted while the policy changes starts from the newest version.
    proxy.stop().await;
    let (s, _) = put(&server, &document(v1, "v1")).await;
    assert_eq!(s, 200);
    let proxy = start_proxy(&server).await;
    answers(&proxy, "shop v1", 5).await;
    assert_eq!(proxy.applied().version, 3);
    proxy.stop().await;

    // The documents outlive the server.
    server.terminate();
    let server = Server::start(&data);
    let list: Value = reqwest::get(server.url("/api/v1/mesh/policy"))
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert_eq!(list[0]["workload"], "caller", "{list}");
    assert_eq!(list[0]["version"], 3, "{list}");
    let r = reqwest::get(server.url("/api/v1/mesh/policy/nobody"))
        .await
        .expect("get");
    assert_eq!(r.status(), 404);
}
