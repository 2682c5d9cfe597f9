//! What survives a restart, under `<data-dir>/alerts/`:
//! - `state.json`: every alert (state, evidence, what each receiver was last told) and the
//!   delivery attempt log;
//! - `rules.json`: the rules created through the API.
//!
//! Each file is replaced atomically (write a temporary file, fsync it, rename it over the
//! old one, fsync the directory), so a crash leaves either the old or the new file.
//! Because an alert's `notified` map is written only after a receiver acknowledged, a
//! restart re-sends nothing that was delivered and loses nothing that was firing.

use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::clock::rfc3339;
use crate::eval::Alerts;
use crate::rule::RuleSpec;

/// The attempts the log keeps (the oldest go first).
pub const MAX_ATTEMPTS_KEPT: usize = 1000;

/// One try at delivering one notification.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliveryAttempt {
    #[serde(with = "rfc3339")]
    pub time: DateTime<Utc>,
    pub receiver: String,
    pub url: String,
    pub group_key: String,
    /// The notification's status: `firing` or `resolved`.
    pub status: String,
    /// The fingerprints of the alerts it carried.
    pub alerts: Vec<String>,
    /// 1 for the first try.
    pub attempt: u32,
    pub ok: bool,
    /// The receiver's HTTP status, when it answered.
    pub http_status: Option<u16>,
    pub error: Option<String>,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Persisted {
    pub alerts: Alerts,
    pub deliveries: VecDeque<DeliveryAttempt>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("alert state {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("alert state {path} is not valid: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// The files of one data directory.
#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl StateStore {
    /// `<data-dir>/alerts/`, created when missing.
    pub fn open(data_dir: &Path) -> Result<StateStore, StateError> {
        let dir = data_dir.join("alerts");
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        Ok(StateStore { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn read<T: for<'de> Deserialize<'de> + Default>(&self, name: &str) -> Result<T, StateError> {
        let path = self.dir.join(name);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|source| StateError::Corrupt { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
            Err(e) => Err(io(&path)(e)),
        }
    }

    fn write<T: Serialize>(&self, name: &str, value: &T) -> Result<(), StateError> {
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let bytes = serde_json::to_vec_pretty(value).map_err(|source| StateError::Corrupt {
            path: path.clone(),
            source,
        })?;
        {
            let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
            f.write_all(&bytes).map_err(io(&tmp))?;
            f.sync_all().map_err(io(&tmp))?;
        }
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        // The rename is durable once the directory is.
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
        Ok(())
    }

    pub fn load_state(&self) -> Result<Persisted, StateError> {
        self.read("state.json")
    }

    pub fn save_state(&self, state: &Persisted) -> Result<(), StateError> {
        self.write("state.json", state)
    }

    pub fn load_rules(&self) -> Result<Vec<RuleSpec>, StateError> {
        self.read("rules.json")
    }

    pub fn save_rules(&self, rules: &[RuleSpec]) -> Result<(), StateError> {
        self.write("rules.json", &rules)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_no_leftovers() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = StateStore::open(dir.path()).expect("open");
        assert!(store.load_state().expect("empty").alerts.is_empty());
        let mut p = Persisted::default();
        p.deliveries.push_back(DeliveryAttempt {
            time: DateTime::from_timestamp(1_800_000_000, 0).expect("t"),
            receiver: "r".into(),
            url: "http://127.0.0.1:1/".into(),
            group_key: "{}:{}".into(),
            status: "firing".into(),
            alerts: vec!["00".into()],
            attempt: 1,
            ok: false,
            http_status: Some(500),
            error: Some("500".into()),
            duration_ms: 3,
        });
        store.save_state(&p).expect("save");
        let back = store.load_state().expect("load");
        assert_eq!(back.deliveries, p.deliveries);
        let names: Vec<_> = std::fs::read_dir(store.dir())
            .expect("ls")
            .map(|e| e.expect("entry").file_name().into_string().expect("utf8"))
            .collect();
        assert_eq!(names, vec!["state.json".to_string()]);
    }

    #[test]
    fn a_corrupt_file_is_an_error_not_an_empty_state() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = StateStore::open(dir.path()).expect("open");
        std::fs::write(store.dir().join("state.json"), b"{not json").expect("write");
        assert!(matches!(
            store.load_state(),
            Err(StateError::Corrupt { .. })
        ));
    }
}
