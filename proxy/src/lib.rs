//! # meshscope-proxy
//!
//! The bundled sidecar proxy: it stands in front of one service instance, so a team can
//! see the whole loop (traffic → telemetry → service graph) without installing a mesh.
//!
//! ```text
//!  caller ──▶ inbound listener ──trace(SERVER)──▶ forward ──▶ local app
//!                                                             │
//!  local app ──▶ outbound listener ──router (Host → destination + policy)
//!        ──trace(CLIENT)──rate_limit──fault──timeout──breaker──retry──split──forward──▶ next proxy
//!
//!  trace ──(finished request: bounded queue; metrics: registry)──▶ exporter (own thread:
//!        makes the span and access log) ──OTLP/gRPC──▶ meshscope serve
//! ```
//!
//! ## Layout
//! - [`config`]: the TOML file (`deny_unknown_fields`, validated), service registry and
//!   per-destination policy.
//! - [`layers`]: one small tower layer per concern: [`layers::trace`] (W3C trace context,
//!   span, hand-off to telemetry), [`layers::rate_limit`], [`layers::fault`],
//!   [`layers::timeout`], [`layers::breaker`], [`layers::retry`], [`layers::split`], and
//!   [`layers::forward`] (the pooled HTTP/1.1 / h2c client).
//! - [`outbound`] / [`inbound`]: the two stacks.
//! - [`telemetry`]: request metrics registry, span and access-log records, the batching
//!   OTLP/gRPC [`telemetry::export::Exporter`].
//! - [`server`]: accepting HTTP/1.1 and h2c connections; [`admin`]: `/stats`, `/metrics`.
//! - [`Proxy`]: starts it all, reloads the registry when the file changes, stops cleanly.

pub mod admin;
pub mod config;
pub mod control;
pub mod identity;
pub mod inbound;
pub mod layers;
pub mod outbound;
pub mod routes;
pub mod server;
pub mod telemetry;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use config::ProxyConfig;
use outbound::{Routes, SharedRoutes};
use telemetry::Telemetry;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Export(#[from] telemetry::export::ExportError),
    #[error("cannot start the telemetry exporter's thread: {0}")]
    Thread(std::io::Error),
    #[error("the proxy config has neither an inbound nor an outbound listener")]
    NothingToDo,
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
}

/// A running proxy.
pub struct Proxy {
    /// Bound addresses (port 0 in the config becomes the chosen port).
    pub inbound: Option<SocketAddr>,
    pub outbound: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    telemetry: Telemetry,
    config: ProxyConfig,
    routes: SharedRoutes,
    authz: layers::authz::SharedAuthz,
    mesh: Option<Arc<identity::MeshIdentity>>,
    stop_listeners: watch::Sender<bool>,
    stop_exporter: watch::Sender<bool>,
    listeners: Vec<JoinHandle<()>>,
    /// Told when the exporter's thread has sent the last telemetry.
    exporter: tokio::sync::oneshot::Receiver<()>,
    /// What the control plane's policy this proxy runs (version 0: its file's).
    applied: Arc<std::sync::Mutex<control::Applied>>,
    reloads: Arc<Reloads>,
}

/// The config file's reloads, as `/stats` (`config`) and `/metrics`
/// (`meshscope_proxy_config_reloads_total{result}`) show them.
#[derive(Debug, Default)]
pub struct Reloads {
    /// Changed files that parsed and now run.
    pub applied: AtomicU64,
    /// Changed files refused (the previous config kept).
    pub rejected: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl Reloads {
    /// Why the last refused file was refused (`None` once a later one applied).
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }

    fn record(&self, outcome: Result<(), String>) {
        let counter = match &outcome {
            Ok(()) => &self.applied,
            Err(_) => &self.rejected,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut e) = self.last_error.lock() {
            *e = outcome.err();
        }
    }
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

impl Proxy {
    /// Binds the listeners and starts serving. With `path`, the `[[destination]]` and
    /// `[[authorization]]` tables are re-read whenever the file's content changes (checked
    /// twice a second); a file that does not parse is logged, counted in [`Proxy::reloads`]
    /// and the old registry kept.
    pub async fn start(config: ProxyConfig, path: Option<PathBuf>) -> Result<Proxy, ProxyError> {
        config.validate()?;
        if config.listen.inbound.is_none() && config.listen.outbound.is_none() {
            return Err(ProxyError::NothingToDo);
        }
        let (telemetry, exporter) = Telemetry::new(&config.service, &config.telemetry);
        exporter.check()?;
        let routes: SharedRoutes = Arc::new(RwLock::new(Arc::new(Routes::build(&config, None))));
        let authz: layers::authz::SharedAuthz =
            Arc::new(RwLock::new(Arc::new(layers::authz::Authz::build(&config))));
        let reloads = Arc::new(Reloads::default());
        let (stop_listeners, stop_l) = watch::channel(false);
        let (stop_exporter, stop_e) = watch::channel(false);
        let mut listeners = vec![];
        // The certificate first: nothing meshed can be served without it.
        let mesh = if config.identity.mode == config::MtlsMode::Off {
            None
        } else {
            let id = config
                .workload_identity()
                .map_err(|e| config::ConfigError::Invalid(format!("identity: {e}")))?;
            let (mesh, renewer) = identity::start(
                &config.identity,
                id,
                Duration::from_secs(30),
                stop_l.clone(),
            )
            .await?;
            telemetry.set_principal(&mesh.id().to_string());
            listeners.push(renewer);
            Some(mesh)
        };
        let forward = layers::forward::Forward::with_identity(mesh.clone());
        let mut proxy_inbound = None;
        if let (Some(addr), Some(app)) = (config.listen.inbound, config.listen.app) {
            let l = server::bind("inbound", addr).await?;
            proxy_inbound = l.local_addr().ok();
            let svc = inbound::stack(
                app,
                config.listen.app_h2c,
                telemetry.clone(),
                forward.clone(),
                Arc::clone(&authz),
            );
            listeners.push(tokio::spawn(server::serve(
                l,
                server::boxed(svc),
                stopped(stop_l.clone()),
                mesh.clone(),
            )));
        }
        let mut proxy_outbound = None;
        if let Some(addr) = config.listen.outbound {
            let l = server::bind("outbound", addr).await?;
            proxy_outbound = l.local_addr().ok();
            let svc = outbound::stack(Arc::clone(&routes), telemetry.clone(), forward.clone());
            // The app calls its sidecar over loopback in plaintext.
            listeners.push(tokio::spawn(server::serve(
                l,
                server::boxed(svc),
                stopped(stop_l.clone()),
                None,
            )));
        }
        let mut proxy_admin = None;
        if let Some(addr) = config.listen.admin {
            let l = server::bind("admin", addr).await?;
            proxy_admin = l.local_addr().ok();
            let router = admin::router(admin::Admin {
                telemetry: telemetry.clone(),
                routes: Arc::clone(&routes),
                mesh: mesh.clone(),
                reloads: Arc::clone(&reloads),
            });
            let stop = stopped(stop_l.clone());
            listeners.push(tokio::spawn(async move {
                let _ = axum::serve(l, router).with_graceful_shutdown(stop).await;
            }));
        }
        if let Some(path) = path {
            // What runs now, read before `start` returns: a change made after it is seen.
            let running = tokio::fs::read(&path).await.ok();
            listeners.push(tokio::spawn(watch_file(
                path,
                running,
                Arc::clone(&routes),
                Arc::clone(&authz),
                Arc::clone(&reloads),
                Duration::from_millis(500),
                stopped(stop_l.clone()),
            )));
        }
        // The exporter on a thread and runtime of its own: making and sending a batch never
        // holds up a worker that serves requests.
        let stop_exp = stopped(stop_e);
        let (exported, exporter_done) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("telemetry-export".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => {
                        if let Err(e) = rt.block_on(exporter.run(stop_exp)) {
                            tracing::error!(error = %e, "the telemetry exporter stopped");
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "no runtime for the telemetry exporter"),
                }
                let _ = exported.send(());
            })
            .map_err(ProxyError::Thread)?;
        Ok(Proxy {
            inbound: proxy_inbound,
            outbound: proxy_outbound,
            admin: proxy_admin,
            telemetry,
            config,
            routes,
            authz,
            mesh,
            stop_listeners,
            stop_exporter,
            listeners,
            exporter: exporter_done,
            applied: Default::default(),
            reloads,
        })
    }

    pub fn telemetry(&self) -> &Telemetry {
        &self.telemetry
    }

    /// The workload identity, when `[identity]` is on.
    pub fn identity(&self) -> Option<&Arc<identity::MeshIdentity>> {
        self.mesh.as_ref()
    }

    /// Replaces the authorization rules now (what a file change does).
    pub fn set_authorization(
        &self,
        rules: Vec<config::AuthorizationRule>,
    ) -> Result<(), ProxyError> {
        let config = ProxyConfig {
            authorization: rules,
            ..self.config.clone()
        };
        config.validate()?;
        swap_authz(&self.authz, &config);
        Ok(())
    }

    /// Replaces the registry and policies now (what a file change does); the identity,
    /// listeners and telemetry settings stay as they started.
    pub fn set_destinations(
        &self,
        destinations: Vec<config::Destination>,
    ) -> Result<(), ProxyError> {
        let config = ProxyConfig {
            destinations,
            ..self.config.clone()
        };
        config.validate()?;
        swap_routes(&self.routes, &config);
        Ok(())
    }

    /// Follows a control plane from now on (`meshscope proxy --control-plane`): each new
    /// version of this workload's policy document replaces the registry, routes, policies
    /// and authorization rules at once; what runs is reported with every poll and readable
    /// with [`Proxy::applied`].
    pub fn follow(&mut self, cp: control::ControlPlane) {
        let (routes, authz) = (Arc::clone(&self.routes), Arc::clone(&self.authz));
        let mesh = self.mesh.clone();
        let inbound = self.mesh.clone();
        let stop = self.stop_listeners.subscribe();
        self.listeners.push(tokio::spawn(control::follow(
            cp,
            self.config.clone(),
            move || mesh.as_ref().map(|m| m.expiry_unix()),
            Arc::clone(&self.applied),
            move |c| {
                swap_routes(&routes, c);
                swap_authz(&authz, c);
                if let Some(m) = &inbound {
                    m.set_mode(c.identity.mode);
                }
            },
            stopped(stop),
        )));
    }

    /// How often the config file was reloaded or refused since the start.
    pub fn reloads(&self) -> &Reloads {
        &self.reloads
    }

    /// The control plane's policy version this proxy runs, and the last refused one.
    pub fn applied(&self) -> control::Applied {
        self.applied.lock().map(|a| a.clone()).unwrap_or_default()
    }

    /// Stops accepting, lets open requests finish, then sends the last telemetry.
    pub async fn stop(self) {
        let _ = self.stop_listeners.send(true);
        for l in self.listeners {
            let _ = l.await;
        }
        let _ = self.stop_exporter.send(true);
        let _ = self.exporter.await;
    }
}

fn swap_routes(routes: &SharedRoutes, config: &ProxyConfig) {
    let old = routes.read().ok().map(|r| Arc::clone(&r));
    let new = Arc::new(Routes::build(config, old.as_deref()));
    if let Ok(mut r) = routes.write() {
        *r = new;
    }
}

fn swap_authz(authz: &layers::authz::SharedAuthz, config: &ProxyConfig) {
    let new = Arc::new(layers::authz::Authz::build(config));
    if let Ok(mut a) = authz.write() {
        *a = new;
    }
}

async fn watch_file(
    path: PathBuf,
    running: Option<Vec<u8>>,
    routes: SharedRoutes,
    authz: layers::authz::SharedAuthz,
    reloads: Arc<Reloads>,
    every: Duration,
    stop: impl Future<Output = ()>,
) {
    // By content, not modification time: two writes within the file system's mtime
    // granularity are still two changes.
    let mut last = running;
    let mut tick = tokio::time::interval(every);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = tick.tick() => {},
            () = &mut stop => return,
        }
        let now = tokio::fs::read(&path).await.ok();
        if now == last {
            continue;
        }
        last = now;
        let parsed = match &last {
            Some(bytes) => std::str::from_utf8(bytes)
                .map_err(|e| format!("not UTF-8: {e}"))
                .and_then(|text| ProxyConfig::parse(text).map_err(|e| e.to_string())),
            None => Err("the file cannot be read".to_string()),
        };
        match parsed {
            Ok(c) => {
                swap_routes(&routes, &c);
                swap_authz(&authz, &c);
                tracing::info!(path = %path.display(), destinations = c.destinations.len(), rules = c.authorization.len(), "proxy config reloaded");
                reloads.record(Ok(()));
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "proxy config not reloaded; keeping the previous one");
                reloads.record(Err(e));
            }
        }
    }
}

/// `meshscope proxy --config FILE [--control-plane URL --workload NAME]`: runs until `stop`.
pub async fn run(
    path: PathBuf,
    control_plane: Option<control::ControlPlane>,
    stop: impl Future<Output = ()>,
) -> Result<(), ProxyError> {
    let config = ProxyConfig::load(&path)?;
    let service = config.service.name.clone();
    // Following a control plane, the file gives the listeners, identity and telemetry; its
    // destinations and rules serve until the first document arrives.
    let watch = control_plane.is_none().then_some(path);
    let mut proxy = Proxy::start(config, watch).await?;
    if let Some(cp) = control_plane {
        tracing::info!(url = %cp.url, workload = %cp.workload, "following the control plane");
        proxy.follow(cp);
    }
    if let Some(a) = proxy.inbound {
        tracing::info!(service = %service, "proxy inbound listening on {a}");
    }
    if let Some(a) = proxy.outbound {
        tracing::info!(service = %service, "proxy outbound listening on {a}");
    }
    if let Some(a) = proxy.admin {
        tracing::info!(service = %service, "proxy admin listening on {a}");
    }
    stop.await;
    tracing::info!("proxy stopping: finishing requests, sending the last telemetry");
    proxy.stop().await;
    Ok(())
}
