//! `meshscope demo` end to end: the real binary, its graph filled within 30 seconds, and a
//! clean stop on Ctrl-C (SIGINT).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn edges_of(g: &Value) -> impl Iterator<Item = &Value> {
    g["edges"].as_array().into_iter().flatten()
}

/// The demo's process, killed if the test fails before it stops it (a failed assertion
/// must not leave a demo mesh running).
struct Demo(std::process::Child);

impl std::ops::Deref for Demo {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Demo {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_fills_the_graph_within_30_seconds_and_stops_cleanly_on_ctrl_c() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("demo.out");
    let err = dir.path().join("demo.err");
    let child = Command::new(common::binary())
        .arg("demo")
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--http-addr", "127.0.0.1:0"])
        .args(["--otlp-grpc-addr", "127.0.0.1:0"])
        .args(["--otlp-http-addr", "127.0.0.1:0"])
        .args(["--pg-addr", "127.0.0.1:0"])
        .stdout(std::fs::File::create(&out).expect("out"))
        .stderr(std::fs::File::create(&err).expect("err"))
        .stdin(Stdio::null())
        .spawn()
        .expect("start the demo");
    let mut child = Demo(child);
    let log = || {
        format!(
            "stdout:\n{}\nstderr (tail):\n{}",
            std::fs::read_to_string(&out).unwrap_or_default(),
            std::fs::read_to_string(&err)
                .unwrap_or_default()
                .lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .join("\n")
        )
    };

    // It says where to look once it runs.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&out)
        .unwrap_or_default()
        .contains("Ctrl-C stops everything")
    {
        assert!(
            Instant::now() < deadline,
            "the demo did not start; {}",
            log()
        );
        assert!(
            child.try_wait().expect("wait").is_none(),
            "the demo exited; {}",
            log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let printed = std::fs::read_to_string(&out).unwrap_or_default();
    // The port the server bound (asked for port 0), as the demo prints it.
    let http: u16 = printed
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("UI:")?
                .trim()
                .strip_prefix("http://127.0.0.1:")
        })
        .and_then(|rest| rest.trim_end_matches('/').parse().ok())
        .unwrap_or_else(|| panic!("no UI address printed: {printed}"));
    assert!(printed.contains("meshscope sql --server"), "{printed}");

    let started = Instant::now();
    let want_nodes = [
        ("frontend", "service"),
        ("cart", "service"),
        ("checkout", "service"),
        ("payments", "service"),
        ("inventory", "service"),
        ("postgres", "virtual"),
        ("payments-gateway", "virtual"),
        ("user", "user"),
    ];
    let want_edges = [
        ("user", "frontend"),
        ("frontend", "cart"),
        ("frontend", "checkout"),
        ("checkout", "payments"),
        ("payments", "payments-gateway"),
        ("cart", "postgres"),
        ("inventory", "postgres"),
        ("frontend", "inventory"),
    ];
    let client = reqwest::Client::new();
    let mut last = Value::Null;
    let complete = loop {
        if let Ok(r) = client
            .get(format!("http://127.0.0.1:{http}/api/v1/graph"))
            .send()
            .await
            && let Ok(g) = r.json::<Value>().await
        {
            let nodes: Vec<(String, String)> = g["nodes"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|n| {
                            (
                                n["id"].as_str().unwrap_or("").into(),
                                n["kind"].as_str().unwrap_or("").into(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            let edges: Vec<(String, String)> = g["edges"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|e| {
                            (
                                e["source"].as_str().unwrap_or("").into(),
                                e["target"].as_str().unwrap_or("").into(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            let has_nodes = want_nodes
                .iter()
                .all(|(id, kind)| nodes.contains(&(id.to_string(), kind.to_string())));
            let has_edges = want_edges
                .iter()
                .all(|(s, t)| edges.contains(&(s.to_string(), t.to_string())));
            // The flaky inventory shows errors on its edges.
            let inventory_errors: u64 = edges_of(&g)
                .filter(|e| e["target"] == "inventory")
                .filter_map(|e| e["errors"].as_u64())
                .sum();
            // The canary is a version of cart, near its 10% weight once 200 requests are in.
            let cart_split = edges_of(&g)
                .find(|e| e["source"] == "frontend" && e["target"] == "cart")
                .and_then(|e| e["by_version"].as_array())
                .map(|vs| {
                    let n = |v: &str| {
                        vs.iter()
                            .find(|x| x["version"] == v)
                            .and_then(|x| x["requests"].as_u64())
                            .unwrap_or(0)
                    };
                    (n("v1"), n("v2"))
                })
                .unwrap_or((0, 0));
            let canary_near_10 = cart_split.0 + cart_split.1 >= 200 && {
                let share = cart_split.1 as f64 / (cart_split.0 + cart_split.1) as f64;
                (0.04..0.2).contains(&share)
            };
            // Zero trust on screen: every proxy-to-proxy edge all mTLS with the SPIFFE IDs
            // of both ends, the external gateway plaintext, the denied caller counted.
            let meshed = [
                ("frontend", "cart"),
                ("frontend", "checkout"),
                ("checkout", "payments"),
                ("frontend", "inventory"),
            ];
            let secure = meshed.iter().all(|(s, t)| {
                edges_of(&g)
                    .find(|e| e["source"] == *s && e["target"] == *t)
                    .is_some_and(|e| {
                        e["mtls_ratio"] == 1.0
                            && e["client_identities"]
                                == serde_json::json!([format!(
                                    "spiffe://meshscope.local/ns/demo/sa/{s}"
                                )])
                            && e["server_identities"].as_array().is_some_and(|ids| {
                                ids.iter().any(|i| {
                                    i == &format!("spiffe://meshscope.local/ns/demo/sa/{t}")
                                })
                            })
                    })
            });
            let plaintext_gateway = edges_of(&g)
                .find(|e| e["source"] == "payments" && e["target"] == "payments-gateway")
                .is_some_and(|e| e["mtls_ratio"] == 0.0);
            let denied = edges_of(&g)
                .find(|e| e["source"] == "frontend" && e["target"] == "payments")
                .and_then(|e| e["denied"].as_u64())
                .unwrap_or(0);
            last = g;
            if has_nodes
                && has_edges
                && inventory_errors > 0
                && canary_near_10
                && secure
                && plaintext_gateway
                && denied > 0
            {
                break true;
            }
        }
        if started.elapsed() > Duration::from_secs(30) {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(complete, "graph incomplete after 30 s: {last:#}\n{}", log());
    // One node per name: a database the spans show as virtual stays one node.
    let ids = common::strings(&last, "nodes", "id");
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(ids.len(), unique.len(), "{ids:?}");
    assert!(
        !ids.contains(&"cart-v2"),
        "the canary is a version of cart: {ids:?}"
    );
    let cart = last["nodes"]
        .as_array()
        .and_then(|a| a.iter().find(|n| n["id"] == "cart"))
        .expect("cart");
    let versions: Vec<&str> = cart["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .filter_map(|v| v["version"].as_str())
        .collect();
    assert_eq!(versions, vec!["v1", "v2"], "{cart}");
    // The A/B rule: beta users' calls to cart took the `beta` route, to v2 only.
    let beta = "SELECT count(*) AS n, count(*) FILTER (WHERE span_attributes['meshscope.version'] = 'v2') AS v2
                FROM spans WHERE span_attributes['meshscope.route'] = 'beta'";
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v: Value = client
            .post(format!("http://127.0.0.1:{http}/api/v1/sql"))
            .json(&serde_json::json!({ "sql": beta }))
            .send()
            .await
            .expect("sql")
            .json()
            .await
            .expect("json");
        let (n, v2) = (v["rows"][0][0].as_i64(), v["rows"][0][1].as_i64());
        if n.is_some_and(|n| n > 0) {
            assert_eq!(n, v2, "every beta call went to v2: {v}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no beta-routed calls: {v}\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The mirror: 10% of the checkouts copied to the shadow, compared pair by pair.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m: Value = client
            .get(format!(
                "http://127.0.0.1:{http}/api/v1/mirrors?source=frontend&target=checkout"
            ))
            .send()
            .await
            .expect("mirrors")
            .json()
            .await
            .expect("json");
        if m[0]["pairs"].as_u64().is_some_and(|n| n > 0) {
            assert_eq!(m[0]["route"], "mirror-v2", "{m}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no mirrored pairs: {m}\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The proxies take their policy from the control plane, all in sync.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list: Value = client
            .get(format!("http://127.0.0.1:{http}/api/v1/mesh/proxies"))
            .send()
            .await
            .expect("proxies")
            .json()
            .await
            .expect("json");
        let all = list.as_array().cloned().unwrap_or_default();
        let synced = all.iter().filter(|p| p["in_sync"] == true).count();
        if all.len() == 7 && synced == 7 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "proxies not in sync: {list}\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The printed command shifts the canary to 50% live: the next requests split evenly.
    let shift = printed
        .lines()
        .skip_while(|l| !l.contains("shift the cart canary to 50%"))
        .nth(1)
        .unwrap_or_else(|| panic!("no canary command printed: {printed}"))
        .trim()
        .to_string();
    let shifted_at = chrono::Utc::now();
    let ok = Command::new("sh")
        .args(["-c", &shift])
        .output()
        .expect("sh");
    common::assert_success(&ok, &shift);
    assert!(
        String::from_utf8_lossy(&ok.stdout).contains("\"version\":2"),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let start = (shifted_at + chrono::Duration::seconds(1))
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let g: Value = client
            .get(format!(
                "http://127.0.0.1:{http}/api/v1/graph?start={start}&source=spans"
            ))
            .send()
            .await
            .expect("graph")
            .json()
            .await
            .expect("json");
        let split = g["edges"]
            .as_array()
            .and_then(|e| {
                e.iter()
                    .find(|e| e["source"] == "frontend" && e["target"] == "cart")
            })
            .and_then(|e| e["by_version"].as_array().cloned())
            .unwrap_or_default();
        let n = |v: &str| {
            split
                .iter()
                .find(|x| x["version"] == v)
                .and_then(|x| x["requests"].as_u64())
                .unwrap_or(0)
        };
        let (v1, v2) = (n("v1"), n("v2"));
        if v1 + v2 >= 150 {
            let share = v2 as f64 / (v1 + v2) as f64;
            assert!(
                (0.35..0.65).contains(&share),
                "v2 took {share:.2} after the shift: {v1}/{v2}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not enough cart calls since the shift: {v1}/{v2}\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Ctrl-C: everything stops and the process exits 0.
    let ok = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(ok.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the demo did not stop; {}",
            log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "exit {status}; {}", log());
    assert!(
        std::fs::read_to_string(&err)
            .unwrap_or_default()
            .contains("every acknowledged row is in Parquet"),
        "{}",
        log()
    );
}

/// The split deployment of docker-compose.yml on loopback: the demo mesh without a server of
/// its own (`--collector`), a collector, and a query node reading the collector's files.
#[tokio::test(flavor = "multi_thread")]
async fn the_demo_mesh_feeds_a_collector_that_a_query_node_reads() {
    let dir = tempfile::tempdir().expect("tmp");
    let shared = dir.path().join("shared");
    let collector = common::Server::start_role(
        "collector",
        &shared,
        &["--node-id", "c1", "--flush-interval-secs", "1"],
    );
    let query = common::Server::start_role("query", &shared, &[]);
    let out = dir.path().join("demo.out");
    let child = Command::new(common::binary())
        .args(["demo", "--collector", &collector.grpc_url()])
        .stdout(std::fs::File::create(&out).expect("out"))
        .stderr(Stdio::null())
        .stdin(Stdio::null())
        .spawn()
        .expect("start the demo");
    let mut child = Demo(child);
    let client = reqwest::Client::new();
    let started = Instant::now();
    let mut last = Value::Null;
    loop {
        if let Ok(r) = client.get(query.url("/api/v1/graph")).send().await
            && let Ok(g) = r.json::<Value>().await
        {
            let has = |s: &str, t: &str| edges_of(&g).any(|e| e["source"] == s && e["target"] == t);
            if has("user", "frontend") && has("frontend", "cart") && has("checkout", "payments") {
                break;
            }
            last = g;
        }
        assert!(
            started.elapsed() < Duration::from_secs(45),
            "the query node's graph is incomplete after 45 s: {last:#}\n{}",
            std::fs::read_to_string(&out).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let printed = std::fs::read_to_string(&out).unwrap_or_default();
    assert!(
        printed.contains(&format!("OTLP/gRPC to {}", collector.grpc_url())),
        "{printed}"
    );
    assert!(!printed.contains("starting the server"), "{printed}");
    assert!(
        Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .expect("kill")
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "the demo did not stop");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "exit {status}");
    collector.terminate();
    query.terminate();
}
