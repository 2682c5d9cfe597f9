//! The bundled proxy's configuration as the tests start it: one workload, every listener on
//! a loopback port the OS picks.

use std::net::SocketAddr;

use meshscope_proxy::Proxy;
use meshscope_proxy::config::{
    Destination, Endpoint, Listen, Policy, ProxyConfig, ServiceIdentity, TelemetryConfig,
};
use serde_json::Value;

/// Port 0 on loopback: the proxy binds it and says which port it got.
pub fn loopback() -> Option<SocketAddr> {
    Some(SocketAddr::from(([127, 0, 0, 1], 0)))
}

/// A proxy for `name` (version `v1`) in `namespace`, in front of `app` when there is one
/// (else outbound only), exporting its telemetry to `otlp` every 200 ms; no identity, no
/// authorization and no destinations.
pub fn proxy_config(
    name: &str,
    namespace: &str,
    app: Option<SocketAddr>,
    otlp: &str,
) -> ProxyConfig {
    ProxyConfig {
        service: ServiceIdentity {
            name: name.into(),
            namespace: Some(namespace.into()),
            version: Some("v1".into()),
            workload: None,
        },
        listen: Listen {
            inbound: app.and(loopback()),
            app,
            outbound: loopback(),
            admin: loopback(),
            app_h2c: false,
        },
        telemetry: TelemetryConfig {
            otlp_endpoint: Some(otlp.into()),
            batch_interval_ms: 200,
            ..TelemetryConfig::default()
        },
        identity: Default::default(),
        authorization: vec![],
        destinations: vec![],
    }
}

/// A page of the proxy's admin listener.
async fn admin(proxy: &Proxy, path: &str) -> reqwest::Response {
    let admin = proxy.admin.expect("admin");
    reqwest::get(format!("http://{admin}{path}"))
        .await
        .expect("admin")
}

/// The proxy's admin `/metrics` (OpenMetrics text).
pub async fn admin_metrics(proxy: &Proxy) -> String {
    admin(proxy, "/metrics").await.text().await.expect("text")
}

/// The proxy's admin `/stats` (JSON).
pub async fn admin_stats(proxy: &Proxy) -> Value {
    admin(proxy, "/stats").await.json().await.expect("json")
}

/// A destination `name` over `endpoints` (address, version, weight; a version other than
/// `v1` runs as workload `<name>-<version>`) with `policy`, no routes and no mTLS.
pub fn destination(
    name: &str,
    endpoints: &[(SocketAddr, &str, u32)],
    policy: Policy,
) -> Destination {
    Destination {
        name: name.into(),
        aliases: vec![],
        db_system: None,
        h2c: false,
        mtls: None,
        namespace: None,
        endpoints: endpoints
            .iter()
            .map(|(a, v, w)| Endpoint {
                address: *a,
                version: (*v).into(),
                workload: (*v != "v1").then(|| format!("{name}-{v}")),
                weight: *w,
                identity: None,
            })
            .collect(),
        policy,
        routes: vec![],
    }
}
