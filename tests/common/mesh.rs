//! Generated meshes as OTLP/JSON, for the browser tests and the render benchmark.

use serde_json::{Value, json};

fn attr(k: &str, v: &str) -> Value {
    json!({ "key": k, "value": { "stringValue": v } })
}

/// A generated mesh: 50 services in 5 namespaces (`ns0`…`ns4`, `ns<k>-svc<i>`), 163 edges
/// (each service calls the next three of its namespace and one of the next namespace;
/// users call three), with two versions of every fifth service.
pub fn big_mesh(t0_ns: u64) -> Value {
    generated_mesh(5, 10, t0_ns)
}

/// A generated mesh of `namespaces` × `per_namespace` services, shaped as [`big_mesh`]
/// (`per_namespace` ≥ 4), starting at `t0_ns`: for the render benchmark at 500 services.
pub fn generated_mesh(namespaces: usize, per_namespace: usize, t0_ns: u64) -> Value {
    let name = |k: usize, i: usize| format!("ns{k}-svc{i}");
    let mut by_service: std::collections::BTreeMap<String, Vec<Value>> = Default::default();
    let mut seed = 100u64;
    let span = |trace: &str, id: String, parent: Option<&str>, kind: u8, start: u64, ms: u64| {
        json!({
            "traceId": trace, "spanId": id, "parentSpanId": parent.unwrap_or(""),
            "name": "GET /", "kind": kind,
            "startTimeUnixNano": start.to_string(), "endTimeUnixNano": (start + ms * 1_000_000).to_string(),
            "attributes": [attr("http.request.method", "GET")],
        })
    };
    let mut call =
        |from: Option<String>,
         to: String,
         by_service: &mut std::collections::BTreeMap<String, Vec<Value>>| {
            for r in 0..3u64 {
                seed += 1;
                let trace = format!("{:032x}", seed);
                let t = t0_ns + seed * 1_000_000;
                let (client, server) = (
                    format!("{:016x}", seed * 2),
                    format!("{:016x}", seed * 2 + 1),
                );
                let callee = span(
                    &trace,
                    server,
                    from.as_ref().map(|_| client.as_str()),
                    2,
                    t,
                    3 + r,
                );
                if let Some(f) = &from {
                    by_service.entry(f.clone()).or_default().push(span(
                        &trace,
                        client.clone(),
                        None,
                        3,
                        t,
                        4 + r,
                    ));
                }
                by_service.entry(to.clone()).or_default().push(callee);
            }
        };
    for k in 0..namespaces {
        for i in 0..per_namespace {
            if k == 0 && i < 3 {
                call(None, name(0, i), &mut by_service);
            }
            for j in [i + 1, i + 2, i + 3] {
                if j < per_namespace {
                    call(Some(name(k, i)), name(k, j), &mut by_service);
                }
            }
            if k + 1 < namespaces {
                call(
                    Some(name(k, i)),
                    name(k + 1, (i * 3) % per_namespace),
                    &mut by_service,
                );
            }
        }
    }
    let resources: Vec<Value> = by_service
        .into_iter()
        .flat_map(|(svc, spans)| {
            let ns = svc.split('-').next().unwrap_or_default().to_string();
            let i: usize = svc
                .rsplit("svc")
                .next()
                .and_then(|i| i.parse().ok())
                .unwrap_or(1);
            let versioned = i.is_multiple_of(5);
            // Every third span of a versioned service is v2's.
            let (mut v1, mut v2) = (Vec::new(), Vec::new());
            for (i, s) in spans.into_iter().enumerate() {
                if versioned && i % 3 == 2 {
                    v2.push(s)
                } else {
                    v1.push(s)
                }
            }
            [("v1", v1), ("v2", v2)]
                .into_iter()
                .filter(|(_, s)| !s.is_empty())
                .map(|(v, s)| {
                    let r = json!({ "attributes": [attr("service.name", &svc),
                        attr("service.namespace", &ns), attr("service.version", v)] });
                    json!({ "resource": r, "scopeSpans": [{ "spans": s }] })
                })
                .collect::<Vec<_>>()
        })
        .collect();
    json!({ "resourceSpans": resources })
}
