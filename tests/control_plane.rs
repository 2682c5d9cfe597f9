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
        let list: Value = server.get_json("/api/v1/mesh/proxies").await;
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
    for expected in [
        "regex",
        "\"v9\"",
        "\"empty\" has no endpoint",
        "timeout-ms is 0",
    ] {
        assert_eq!(
            problems.iter().filter(|p| p.contains(expected)).count(),
            1,
            "{expected} in {problems:?}"
        );
    }
    let (s, v) = put(&server, "[[destination]]\nname = \"shop\"\nendpont = []\n").await;
    assert_eq!(s, 400, "{v}");
    let current: Value = server.get_json("/api/v1/mesh/policy/caller").await;
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
    let list: Value = server.get_json("/api/v1/mesh/policy").await;
    assert_eq!(list[0]["workload"], "caller", "{list}");
    assert_eq!(list[0]["version"], 3, "{list}");
    let r = reqwest::get(server.url("/api/v1/mesh/policy/nobody"))
        .await
        .expect("get");
    assert_eq!(r.status(), 404);
}

/// `serve --policy-dir`: the files are the documents (GitOps), read at start, followed
/// while the server runs, a bad file refused with its problems and the running version
/// kept, and a bad file at start stopping the server with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_directory_is_followed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (data, dir) = (tmp.path().join("data"), tmp.path().join("policies"));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let (v1, v2) = (app("shop v1").await, app("shop v2").await);
    std::fs::write(dir.join("caller.toml"), document(v1, "v1")).expect("write");
    // Not a policy document: ignored.
    std::fs::write(dir.join("README.md"), "policies of the shop").expect("write");
    let server = Server::start_with(&data, &["--policy-dir", dir.to_str().expect("utf-8")]);
    let get = |server: &Server| {
        let url = server.url("/api/v1/mesh/policy/caller");
        async move {
            let r = reqwest::get(url).await.expect("GET");
            let status = r.status().as_u16();
            let v: Value = r.json().await.expect("JSON");
            (status, v)
        }
    };
    let (s, v) = get(&server).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["version"], 1, "{v}");
    let proxy = start_proxy(&server).await;
    answers(&proxy, "shop v1", 1).await;

    // An edit of the file becomes version 2 and reaches the proxy.
    std::fs::write(dir.join("caller.toml"), document(v2, "v2")).expect("write");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, v) = get(&server).await;
        if v["version"] == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "the edit was not read: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    answers(&proxy, "shop v2", 1).await;

    // A PUT stands until the file's next edit: the unchanged file does not take it back.
    let (s, v) = put(&server, &document(v1, "v1")).await;
    assert_eq!((s, v["version"].as_u64()), (200, Some(3)), "{v}");
    answers(&proxy, "shop v1", 2).await;
    // The change log says where each version came from.
    let log: Value = server
        .get_json("/api/v1/mesh/changes?workload=caller")
        .await;
    let sources: Vec<&str> = log
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|c| c["source"].as_str())
        .collect();
    let file = format!("policy-dir {}", dir.join("caller.toml").display());
    assert_eq!(sources, ["api", file.as_str(), file.as_str()], "{log}");
    assert!(log[0]["by"].is_null(), "no tokens, so no name: {log}");

    // A bad edit is refused: the server logs it, version 3 stays.
    std::fs::write(
        dir.join("caller.toml"),
        "[[destination]]\nname = \"shop\"\nendpoint = []\n",
    )
    .expect("write");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&server.log)
        .unwrap_or_default()
        .contains("policy file refused")
    {
        assert!(Instant::now() < deadline, "no refusal logged");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        std::fs::read_to_string(&server.log)
            .unwrap_or_default()
            .contains("has no endpoint")
    );
    let (_, v) = get(&server).await;
    assert_eq!(v["version"], 3, "{v}");
    answers(&proxy, "shop v1", 1).await;
    proxy.stop().await;
    drop(server);

    // A bad file at start: the server does not start, and says why.
    let out = std::process::Command::new(common::binary())
        .args(["serve", "--data-dir"])
        .arg(tmp.path().join("data2"))
        .args([
            "--http-addr",
            "127.0.0.1:0",
            "--otlp-grpc-addr",
            "127.0.0.1:0",
        ])
        .args([
            "--otlp-http-addr",
            "127.0.0.1:0",
            "--pg-addr",
            "127.0.0.1:0",
        ])
        .arg("--policy-dir")
        .arg(&dir)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("caller.toml") && err.contains("has no endpoint"),
        "{err}"
    );
}

/// Each new version is in the change log: what changed field by field, who (the admin
/// token's name, never a header), when, and the services it touched; refused writes leave
/// nothing; the log outlives the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_changes_are_logged_with_what_who_and_when() {
    use std::os::unix::fs::PermissionsExt;
    const ADMIN: &str = "admin-secret-for-the-platform-team-01";
    const READ: &str = "read-secret-for-the-dashboards-0002";
    let tmp = tempfile::tempdir().expect("tempdir");
    let auth = tmp.path().join("auth.toml");
    std::fs::write(
        &auth,
        format!(
            "[[token]]\nname = \"platform-team\"\nsecret = \"{ADMIN}\"\nscopes = [\"admin\"]\n\n\
             [[token]]\nname = \"dashboards\"\nsecret = \"{READ}\"\nscopes = [\"read\"]\n"
        ),
    )
    .expect("auth file");
    std::fs::set_permissions(&auth, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let data = tmp.path().join("data");
    let flags = ["--auth-file", auth.to_str().expect("utf-8")];
    let server = Server::start_with(&data, &flags);
    let (v1, v2) = (app("shop v1").await, app("shop v2").await);
    let split = |w1: u32, w2: u32| {
        format!(
            "[[destination]]\nname = \"shop\"\nendpoint = [{{ address = \"{v1}\", version = \"v1\", weight = {w1} }}, \
             {{ address = \"{v2}\", version = \"v2\", weight = {w2} }}]\n"
        )
    };
    let client = reqwest::Client::new();
    let put_as = |secret: Option<&'static str>, doc: String| {
        let mut req = client
            .put(server.url("/api/v1/mesh/policy/caller"))
            .header("x-user", "mallory")
            .body(doc);
        if let Some(s) = secret {
            req = req.bearer_auth(s);
        }
        async move { req.send().await.expect("PUT").status().as_u16() }
    };
    assert_eq!(put_as(Some(ADMIN), split(90, 10)).await, 200);
    // Refused writes: no token, a read token, a bad document. None is logged.
    assert_eq!(put_as(None, split(0, 100)).await, 401);
    assert_eq!(put_as(Some(READ), split(0, 100)).await, 403);
    assert_eq!(put_as(Some(ADMIN), "[[destination]]\n".into()).await, 400);
    assert_eq!(put_as(Some(ADMIN), split(50, 50)).await, 200);

    let changes = |server: &Server, query: &str| {
        let req = client
            .get(server.url(&format!("/api/v1/mesh/changes{query}")))
            .bearer_auth(READ);
        async move {
            let r = req.send().await.expect("GET changes");
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.expect("JSON")
        }
    };
    let log = changes(&server, "?service=shop").await;
    let log = log.as_array().expect("a list");
    assert_eq!(log.len(), 2, "{log:?}");
    let (newest, first) = (&log[0], &log[1]);
    assert_eq!(newest["version"], 2);
    assert_eq!(newest["by"], "platform-team");
    assert_eq!(newest["source"], "api");
    assert_eq!(
        newest["changes"],
        serde_json::json!([
            "destination[shop].endpoint[v1].weight: 90 → 50",
            "destination[shop].endpoint[v2].weight: 10 → 50"
        ])
    );
    assert_eq!(newest["services"], serde_json::json!(["caller", "shop"]));
    assert_eq!(first["version"], 1);
    assert_eq!(first["changes"], serde_json::json!(["first version"]));
    // The time is the version's own, and a range before it finds nothing.
    let policy: Value = client
        .get(server.url("/api/v1/mesh/policy/caller"))
        .bearer_auth(READ)
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("JSON");
    assert_eq!(newest["at"], policy["updated_at"]);
    let before = changes(&server, "?end=2026-01-01T00:00:00Z").await;
    assert_eq!(before, serde_json::json!([]));
    assert_eq!(
        changes(&server, "?service=elsewhere").await,
        serde_json::json!([])
    );
    let r = client
        .get(server.url("/api/v1/mesh/changes?start=yesterday"))
        .bearer_auth(READ)
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status(), 400);

    // The log outlives the server.
    server.terminate();
    let server = Server::start_with(&data, &flags);
    let log = changes(&server, "?workload=caller&limit=1").await;
    assert_eq!(log[0]["version"], 2, "{log}");
    assert_eq!(log.as_array().map(Vec::len), Some(1));
}
