//! The control plane's change log: every new policy version with what changed (field by
//! field), who made it (the API token's name), where it came from (the API or a file of the
//! policy directory) and the services it touched: the workload whose proxies run it and
//! every destination whose policy changed. Kept as `<data-dir>/mesh/changes.jsonl`, one JSON
//! object a line, appended when the version is stored; answered by
//! `GET /api/v1/mesh/changes` and drawn as marks on those services' charts in the UI.

use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The changes kept in memory and answered (the file keeps the same, rewritten when it
/// grows past twice as many lines).
pub const KEPT: usize = 10_000;

/// At most this many field changes are listed for one version; the rest are counted.
const MAX_LINES: usize = 40;

/// Who made a change and through what.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    /// The API token's name; `None` when the server runs without tokens or the change came
    /// from a file.
    pub by: Option<String>,
    /// `api`, or `policy-dir <file>`.
    pub source: String,
}

impl Origin {
    pub fn api(by: Option<String>) -> Origin {
        Origin {
            by,
            source: "api".into(),
        }
    }

    pub fn file(path: &Path) -> Origin {
        Origin {
            by: None,
            source: format!("policy-dir {}", path.display()),
        }
    }
}

/// One new version of one workload's policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    pub workload: String,
    pub version: u64,
    /// RFC 3339, UTC.
    pub at: String,
    pub by: Option<String>,
    pub source: String,
    /// What changed, one field a line: `destination[cart].endpoint[v2].weight: 10 → 50`,
    /// `destination[cart].route[beta]: added`.
    pub changes: Vec<String>,
    /// The workload and every destination whose part of the document changed.
    pub services: Vec<String>,
}

/// The changes from `old` (none: the workload's first version) to `new`, both policy
/// documents as JSON values, and the services they touch.
pub fn diff(workload: &str, old: Option<&Value>, new: &Value) -> (Vec<String>, Vec<String>) {
    let mut lines = Vec::new();
    match old {
        None => lines.push("first version".to_string()),
        Some(old) => walk("", Some(old), Some(new), &mut lines),
    }
    let mut services = vec![workload.to_string()];
    for line in &lines {
        if let Some(rest) = line.strip_prefix("destination[")
            && let Some((name, _)) = rest.split_once(']')
            && !services.iter().any(|s| s == name)
        {
            services.push(name.to_string());
        }
    }
    if old.is_none() {
        // A first version touches every destination it names.
        for d in new["destination"].as_array().into_iter().flatten() {
            if let Some(name) = d["name"].as_str()
                && !services.iter().any(|s| s == name)
            {
                services.push(name.to_string());
            }
        }
    }
    if lines.len() > MAX_LINES {
        let more = lines.len() - MAX_LINES;
        lines.truncate(MAX_LINES);
        lines.push(format!("and {more} more"));
    }
    (lines, services)
}

fn absent(v: Option<&Value>) -> bool {
    matches!(v, None | Some(Value::Null))
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 80 {
        format!("{}…", s.chars().take(80).collect::<String>())
    } else {
        s
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// The field that names the elements of an array of tables in both versions (a
/// destination's or route's `name`, an endpoint's `version` or `address`), when every
/// element has one and no two share it.
fn element_key(a: &[Value], b: &[Value]) -> Option<&'static str> {
    ["name", "version", "address"].into_iter().find(|k| {
        [a, b].iter().all(|list| {
            let names: Vec<&Value> = list.iter().map(|e| &e[*k]).collect();
            names.iter().all(|n| n.is_string())
                && names
                    .iter()
                    .enumerate()
                    .all(|(i, n)| !names[..i].contains(n))
        })
    })
}

fn walk(path: &str, a: Option<&Value>, b: Option<&Value>, out: &mut Vec<String>) {
    match (a, b) {
        _ if absent(a) && absent(b) => {}
        (_, Some(b)) if absent(a) => match b {
            Value::Object(_) | Value::Array(_) => out.push(format!("{path}: added")),
            leaf => out.push(format!("{path}: {}", short(leaf))),
        },
        _ if absent(b) => out.push(format!("{path}: removed")),
        (Some(Value::Object(a)), Some(Value::Object(b))) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                walk(&join(path, k), a.get(k), b.get(k), out);
            }
        }
        (Some(Value::Array(a)), Some(Value::Array(b)))
            if a.iter().chain(b).all(Value::is_object) =>
        {
            match element_key(a, b) {
                Some(k) => {
                    let name = |e: &Value| e[k].as_str().unwrap_or_default().to_string();
                    let mut names: Vec<String> = a.iter().map(name).collect();
                    for n in b.iter().map(name) {
                        if !names.contains(&n) {
                            names.push(n);
                        }
                    }
                    for n in names {
                        let find = |list: &[Value]| list.iter().find(|e| name(e) == n).cloned();
                        walk(
                            &format!("{path}[{n}]"),
                            find(a).as_ref(),
                            find(b).as_ref(),
                            out,
                        );
                    }
                }
                None => {
                    for i in 0..a.len().max(b.len()) {
                        walk(&format!("{path}[{i}]"), a.get(i), b.get(i), out);
                    }
                }
            }
        }
        (Some(a), Some(b)) if a != b => out.push(format!("{path}: {} → {}", short(a), short(b))),
        _ => {}
    }
}

/// The log: the last [`KEPT`] changes in memory, all of them appended to the file.
#[derive(Debug)]
pub struct ChangeLog {
    path: PathBuf,
    kept: VecDeque<Change>,
    lines_in_file: usize,
}

impl ChangeLog {
    /// Reads `path` (missing: an empty log). A line that does not parse (a write cut short
    /// by a crash) is skipped and logged.
    pub fn open(path: PathBuf) -> Result<ChangeLog, String> {
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let mut kept = VecDeque::new();
        let mut lines_in_file = 0;
        for (i, line) in text.lines().enumerate() {
            lines_in_file += 1;
            match serde_json::from_str::<Change>(line) {
                Ok(c) => {
                    if kept.len() == KEPT {
                        kept.pop_front();
                    }
                    kept.push_back(c);
                }
                Err(e) => {
                    tracing::warn!(file = %path.display(), line = i + 1, error = %e, "skipping a change-log line that does not parse")
                }
            }
        }
        let mut log = ChangeLog {
            path,
            kept,
            lines_in_file,
        };
        if !text.is_empty() && !text.ends_with('\n') {
            // A torn last line: rewritten now, so the next line starts on its own.
            log.rewrite()
                .map_err(|e| format!("{}: {e}", log.path.display()))?;
        }
        Ok(log)
    }

    /// Appends `change` to the file (rewriting it with the kept changes when it has grown
    /// past twice [`KEPT`] lines), then to memory.
    pub fn append(&mut self, change: Change) -> Result<(), String> {
        if self.kept.len() == KEPT {
            self.kept.pop_front();
        }
        self.kept.push_back(change);
        let result = if self.lines_in_file >= 2 * KEPT {
            self.rewrite()
        } else {
            self.append_line()
        };
        if result.is_err() {
            self.kept.pop_back();
        }
        result.map_err(|e| format!("keeping the change log in {}: {e}", self.path.display()))
    }

    fn append_line(&mut self) -> std::io::Result<()> {
        let Some(last) = self.kept.back() else {
            return Ok(());
        };
        let mut line = serde_json::to_vec(last)?;
        line.push(b'\n');
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        f.write_all(&line)?;
        f.sync_data()?;
        self.lines_in_file += 1;
        Ok(())
    }

    fn rewrite(&mut self) -> std::io::Result<()> {
        let tmp = self.path.with_extension("jsonl.tmp");
        let mut text = Vec::new();
        for c in &self.kept {
            serde_json::to_writer(&mut text, c)?;
            text.push(b'\n');
        }
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&text)?;
        f.sync_data()?;
        std::fs::rename(&tmp, &self.path)?;
        self.lines_in_file = self.kept.len();
        Ok(())
    }

    /// The changes matching `filter`, newest first, at most `limit`.
    pub fn query(&self, filter: &Filter, limit: usize) -> Vec<Change> {
        self.kept
            .iter()
            .rev()
            .filter(|c| filter.matches(c))
            .take(limit)
            .cloned()
            .collect()
    }
}

/// Which changes `GET /api/v1/mesh/changes` answers.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    /// Changes that touched this service.
    pub service: Option<String>,
    pub workload: Option<String>,
    /// RFC 3339 bounds, `start <= at < end`.
    pub start: Option<chrono::DateTime<chrono::Utc>>,
    pub end: Option<chrono::DateTime<chrono::Utc>>,
}

impl Filter {
    fn matches(&self, c: &Change) -> bool {
        if self
            .service
            .as_ref()
            .is_some_and(|s| !c.services.contains(s))
        {
            return false;
        }
        if self.workload.as_ref().is_some_and(|w| *w != c.workload) {
            return false;
        }
        if self.start.is_none() && self.end.is_none() {
            return true;
        }
        let Ok(at) = chrono::DateTime::parse_from_rfc3339(&c.at) else {
            return false;
        };
        let at = at.with_timezone(&chrono::Utc);
        self.start.is_none_or(|s| at >= s) && self.end.is_none_or(|e| at < e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_weight_shift_names_the_field_and_the_destination() {
        let old = json!({"destination": [
            {"name": "cart", "endpoint": [{"version": "v1", "weight": 90}, {"version": "v2", "weight": 10}]},
            {"name": "inventory", "endpoint": [{"version": "v1", "weight": 100}]},
        ], "authorization": []});
        let mut new = old.clone();
        new["destination"][0]["endpoint"][0]["weight"] = json!(50);
        new["destination"][0]["endpoint"][1]["weight"] = json!(50);
        let (lines, services) = diff("frontend", Some(&old), &new);
        assert_eq!(
            lines,
            [
                "destination[cart].endpoint[v1].weight: 90 → 50",
                "destination[cart].endpoint[v2].weight: 10 → 50"
            ]
        );
        assert_eq!(services, ["frontend", "cart"]);
    }

    #[test]
    fn added_and_removed_tables_are_one_line_each() {
        let old = json!({"destination": [{"name": "cart", "route": [{"name": "beta", "timeout_ms": 100}]}]});
        let new = json!({"destination": [{"name": "cart", "route": [{"name": "canary"}]}], "authorization": [{"allow": ["a"]}]});
        let (lines, services) = diff("frontend", Some(&old), &new);
        assert_eq!(
            lines,
            [
                "authorization: added",
                "destination[cart].route[beta]: removed",
                "destination[cart].route[canary]: added"
            ]
        );
        assert_eq!(services, ["frontend", "cart"]);
    }

    #[test]
    fn a_first_version_touches_every_destination() {
        let new = json!({"destination": [{"name": "cart"}, {"name": "db"}]});
        let (lines, services) = diff("frontend", None, &new);
        assert_eq!(lines, ["first version"]);
        assert_eq!(services, ["frontend", "cart", "db"]);
    }

    #[test]
    fn the_log_survives_a_reopen_and_skips_a_torn_line() {
        let dir = std::env::temp_dir().join(format!("changes-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("changes.jsonl");
        let mut log = ChangeLog::open(path.clone()).unwrap();
        for v in 1..=3 {
            log.append(Change {
                workload: "frontend".into(),
                version: v,
                at: format!("2026-12-02T10:0{v}:00.000Z"),
                by: Some("ops".into()),
                source: "api".into(),
                changes: vec![],
                services: vec!["frontend".into(), format!("svc{v}")],
            })
            .unwrap();
        }
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"{\"workload\": \"fr").unwrap();
        let mut log = ChangeLog::open(path.clone()).unwrap();
        let all = log.query(&Filter::default(), 10);
        assert_eq!(all.iter().map(|c| c.version).collect::<Vec<_>>(), [3, 2, 1]);
        // The torn line is gone, so the next change reads back after another reopen.
        let mut next = all[0].clone();
        next.version = 4;
        log.append(next).unwrap();
        let log = ChangeLog::open(path).unwrap();
        assert_eq!(log.query(&Filter::default(), 1)[0].version, 4);
        let svc2 = Filter {
            service: Some("svc2".into()),
            ..Filter::default()
        };
        assert_eq!(log.query(&svc2, 10)[0].version, 2);
        let late = Filter {
            start: Some("2026-12-02T10:02:00Z".parse().unwrap()),
            ..Filter::default()
        };
        assert_eq!(log.query(&late, 10).len(), 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
