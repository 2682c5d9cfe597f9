//! The control plane: one versioned policy document per workload (the destinations with
//! their routes, mirrors and policies, and the authorization rules, in the proxy file's
//! TOML form), kept under `<data-dir>/mesh/`, edited through `/api/v1/mesh/policy` and
//! followed by proxies started with `--control-plane URL --workload NAME` (long polls that
//! also report what each proxy runs: `/api/v1/mesh/proxies`, like `istioctl
//! proxy-status`).
//!
//! - `GET /api/v1/mesh/policy`: every workload's current version.
//! - `GET /api/v1/mesh/policy/{workload}[?after=N&wait_ms=…]`: the document; with
//!   `after`, waits (at most `wait_ms`, 30 s) for a version newer than N.
//! - `PUT /api/v1/mesh/policy/{workload}`: a new document (TOML body); refused with 400
//!   with every problem (`problems`) when it does not parse or check, the running version
//!   kept.
//! - `serve --policy-dir DIR`: `DIR/<workload>.toml` files, read at start and every 2 s,
//!   stored as the next version when their text changes ([`Mesh::load_dir`]).
//! - `GET /api/v1/mesh/proxies`: each proxy that polled, its applied and the latest
//!   version, whether it is in sync, its last error and certificate expiry.
//! - `GET /api/v1/mesh/changes[?service=&workload=&start=&end=&limit=]`: the change log,
//!   newest first: each version's field-by-field changes, who and when, and the services
//!   it touched ([`changes`]).

pub mod changes;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use changes::{Change, ChangeLog, Origin};

/// One workload's current document.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Policy {
    pub workload: String,
    pub version: u64,
    pub updated_at: String,
    pub document: String,
}

/// What a proxy said of itself on its last poll.
#[derive(Debug, Clone, Serialize)]
struct ProxyStatus {
    workload: String,
    instance: String,
    applied_version: u64,
    last_error: Option<String>,
    certificate_expiry_unix: Option<u64>,
    last_seen: String,
}

/// The store; cheap to clone.
#[derive(Clone)]
pub struct Mesh {
    dir: PathBuf,
    policies: Arc<Mutex<BTreeMap<String, Policy>>>,
    changed: watch::Sender<u64>,
    proxies: Arc<Mutex<BTreeMap<(String, String), ProxyStatus>>>,
    changes: Arc<Mutex<ChangeLog>>,
}

fn valid_workload(w: &str) -> bool {
    !w.is_empty()
        && w.len() <= 128
        && w.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && !w.starts_with('.')
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl Mesh {
    /// Opens `<data_dir>/mesh/`, reading the documents kept there.
    pub fn open(data_dir: &std::path::Path) -> Result<Mesh, String> {
        let dir = data_dir.join("mesh");
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut policies = BTreeMap::new();
        for entry in std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))? {
            let path = entry.map_err(|e| e.to_string())?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let text =
                std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let p: Policy =
                serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
            policies.insert(p.workload.clone(), p);
        }
        let changes = ChangeLog::open(dir.join("changes.jsonl"))?;
        Ok(Mesh {
            dir,
            policies: Arc::new(Mutex::new(policies)),
            changed: watch::channel(0).0,
            proxies: Arc::default(),
            changes: Arc::new(Mutex::new(changes)),
        })
    }

    fn policies(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Policy>> {
        self.policies.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn change_log(&self) -> std::sync::MutexGuard<'_, ChangeLog> {
        self.changes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The change log's entries matching `filter`, newest first.
    pub fn changes(&self, filter: &changes::Filter, limit: usize) -> Vec<Change> {
        self.change_log().query(filter, limit)
    }

    pub fn get(&self, workload: &str) -> Option<Policy> {
        self.policies().get(workload).cloned()
    }

    /// Checks `document` and makes it the workload's next version (kept on disk first, and
    /// recorded in the change log with `origin`); refused with every problem found.
    pub fn put(
        &self,
        workload: &str,
        document: &str,
        origin: Origin,
    ) -> Result<Policy, Vec<String>> {
        if !valid_workload(workload) {
            return Err(vec![format!(
                "{workload:?} is not a workload name (letters, digits, - _ .)"
            )]);
        }
        // Checked as a proxy will: against a proxy of this workload with no other settings.
        let base = meshscope_proxy::config::ProxyConfig::parse(&format!(
            "[service]\nname = {}\n",
            toml::Value::String(workload.to_string())
        ))
        .map_err(|e| e.problems())?;
        let new = meshscope_proxy::control::PolicyDocument::check(document, &base)?;
        let mut all = self.policies();
        // What changed, from the running document (which checked when it was stored).
        let old = all.get(workload).and_then(|p| {
            toml::from_str::<meshscope_proxy::control::PolicyDocument>(&p.document).ok()
        });
        let as_json = |d: &meshscope_proxy::control::PolicyDocument| {
            serde_json::to_value(d).unwrap_or_default()
        };
        let (lines, services) =
            changes::diff(workload, old.as_ref().map(as_json).as_ref(), &as_json(&new));
        let version = all.get(workload).map_or(0, |p| p.version) + 1;
        let p = Policy {
            workload: workload.to_string(),
            version,
            updated_at: now(),
            document: document.to_string(),
        };
        let path = self.dir.join(format!("{workload}.json"));
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(&p).map_err(|e| vec![e.to_string()])?;
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| vec![format!("keeping the policy in {}: {e}", path.display())])?;
        let change = Change {
            workload: workload.to_string(),
            version,
            at: p.updated_at.clone(),
            by: origin.by,
            source: origin.source,
            changes: lines,
            services,
        };
        if let Err(e) = self.change_log().append(change) {
            tracing::warn!(workload, version, error = %e, "a policy change is not in the change log");
        }
        all.insert(workload.to_string(), p.clone());
        drop(all);
        self.changed.send_modify(|n| *n += 1);
        Ok(p)
    }

    /// Reads `dir`'s `<workload>.toml` files and stores each one whose text changed since
    /// `seen` last held it, and differs from its workload's current document, as the next
    /// version (so a PUT stands until the file's next edit). Returns how many were stored
    /// and the problems of those refused (`file: problem`), the running versions kept.
    pub fn load_dir(
        &self,
        dir: &std::path::Path,
        seen: &mut BTreeMap<PathBuf, String>,
    ) -> (usize, Vec<String>) {
        let mut stored = 0;
        let mut problems = Vec::new();
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) => return (0, vec![format!("{}: {e}", dir.display())]),
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("toml"))
            .collect();
        paths.sort();
        for path in paths {
            let Some(workload) = path.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) => {
                    problems.push(format!("{}: {e}", path.display()));
                    continue;
                }
            };
            if seen.get(&path) == Some(&text) {
                continue;
            }
            seen.insert(path.clone(), text.clone());
            if self.get(workload).is_some_and(|p| p.document == text) {
                continue;
            }
            match self.put(workload, &text, Origin::file(&path)) {
                Ok(p) => {
                    tracing::info!(workload, version = p.version, file = %path.display(), "policy loaded from the policy directory");
                    stored += 1;
                }
                Err(e) => {
                    problems.extend(e.into_iter().map(|e| format!("{}: {e}", path.display())))
                }
            }
        }
        (stored, problems)
    }

    /// Follows `dir` every 2 s until `stop`, from what the start-up read `seen`; a refused
    /// edit is logged once.
    pub async fn follow_dir(
        self,
        dir: PathBuf,
        mut seen: BTreeMap<PathBuf, String>,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        let every = Duration::from_secs(2);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = &mut stop => return,
            }
            let (mesh, d) = (self.clone(), dir.clone());
            let Ok((s, problems)) = tokio::task::spawn_blocking(move || {
                let r = mesh.load_dir(&d, &mut seen);
                (seen, r.1)
            })
            .await
            else {
                return;
            };
            seen = s;
            for p in &problems {
                tracing::warn!(problem = %p, "policy file refused; the running version kept");
            }
        }
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

async fn list(State(mesh): State<Mesh>) -> Response {
    let all: Vec<serde_json::Value> = mesh
        .policies()
        .values()
        .map(|p| serde_json::json!({ "workload": p.workload, "version": p.version, "updated_at": p.updated_at }))
        .collect();
    Json(all).into_response()
}

#[derive(Debug, Default, Deserialize)]
struct PollParams {
    after: Option<u64>,
    wait_ms: Option<u64>,
    instance: Option<String>,
    applied: Option<u64>,
    error: Option<String>,
    cert_expiry: Option<u64>,
}

async fn policy(
    State(mesh): State<Mesh>,
    Path(workload): Path<String>,
    Query(q): Query<PollParams>,
) -> Response {
    if let Some(instance) = q.instance.clone().filter(|i| i.len() <= 200) {
        let status = ProxyStatus {
            workload: workload.clone(),
            instance: instance.clone(),
            applied_version: q.applied.unwrap_or(0),
            last_error: q.error.clone().map(|e| e.chars().take(2000).collect()),
            certificate_expiry_unix: q.cert_expiry,
            last_seen: now(),
        };
        let mut proxies = mesh.proxies.lock().unwrap_or_else(|p| p.into_inner());
        // Bounded: a stale instance gives way when there are too many.
        if proxies.len() >= 10_000
            && !proxies.contains_key(&(workload.clone(), instance.clone()))
            && let Some(oldest) = proxies
                .iter()
                .min_by(|a, b| a.1.last_seen.cmp(&b.1.last_seen))
                .map(|(k, _)| k.clone())
        {
            proxies.remove(&oldest);
        }
        proxies.insert((workload.clone(), instance), status);
    }
    if let Some(after) = q.after {
        let wait = Duration::from_millis(q.wait_ms.unwrap_or(30_000).min(30_000));
        let mut rx = mesh.changed.subscribe();
        let newer = |m: &Mesh| m.get(&workload).is_some_and(|p| p.version > after);
        let _ = tokio::time::timeout(wait, async {
            while !newer(&mesh) {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
    }
    match mesh.get(&workload) {
        Some(p) => Json(p).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            format!("no policy for workload {workload:?}"),
        ),
    }
}

async fn put(
    State(mesh): State<Mesh>,
    Path(workload): Path<String>,
    caller: Option<axum::Extension<meshscope_auth::http::Caller>>,
    body: String,
) -> Response {
    let m = mesh.clone();
    let w = workload.clone();
    let origin = Origin::api(caller.map(|c| c.0.0));
    match tokio::task::spawn_blocking(move || m.put(&w, &body, origin)).await {
        Ok(Ok(p)) => Json(serde_json::json!({ "workload": p.workload, "version": p.version, "updated_at": p.updated_at })).into_response(),
        Ok(Err(problems)) => (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({
                "error": format!("policy for {workload:?} refused, the running one kept: {}", problems.join("; ")),
                "problems": problems,
            })),
        )
            .into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn proxies(State(mesh): State<Mesh>) -> Response {
    let latest: BTreeMap<String, u64> = mesh
        .policies()
        .values()
        .map(|p| (p.workload.clone(), p.version))
        .collect();
    let list: Vec<serde_json::Value> = mesh
        .proxies
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .map(|s| {
            let latest = latest.get(&s.workload).copied().unwrap_or(0);
            let mut v = serde_json::to_value(s).unwrap_or_default();
            v["latest_version"] = serde_json::json!(latest);
            v["in_sync"] = serde_json::json!(s.applied_version == latest && s.last_error.is_none());
            v
        })
        .collect();
    Json(list).into_response()
}

#[derive(Debug, Default, Deserialize)]
struct ChangesParams {
    service: Option<String>,
    workload: Option<String>,
    start: Option<String>,
    end: Option<String>,
    limit: Option<usize>,
}

fn instant(name: &str, v: Option<String>) -> Result<Option<chrono::DateTime<chrono::Utc>>, String> {
    v.map(|t| {
        chrono::DateTime::parse_from_rfc3339(&t)
            .map(|t| t.with_timezone(&chrono::Utc))
            .map_err(|e| format!("{name}={t:?} is not an RFC 3339 time: {e}"))
    })
    .transpose()
}

async fn changes(State(mesh): State<Mesh>, Query(q): Query<ChangesParams>) -> Response {
    let filter = match (instant("start", q.start), instant("end", q.end)) {
        (Ok(start), Ok(end)) => changes::Filter {
            service: q.service,
            workload: q.workload,
            start,
            end,
        },
        (Err(e), _) | (_, Err(e)) => return error(StatusCode::BAD_REQUEST, e),
    };
    let limit = q.limit.unwrap_or(200).min(changes::KEPT);
    Json(mesh.changes(&filter, limit)).into_response()
}

pub fn router(mesh: Mesh) -> Router {
    Router::new()
        .route("/api/v1/mesh/policy", get(list))
        .route("/api/v1/mesh/policy/{workload}", get(policy).put(put))
        .route("/api/v1/mesh/proxies", get(proxies))
        .route("/api/v1/mesh/changes", get(changes))
        .with_state(mesh)
}
