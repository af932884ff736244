//! Persistent, crash-safe node state under the state dir: the versioned step
//! journal plus the seed scripts' single-value files, which existing
//! operator scripts read.

mod journal;
mod lock;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

pub use journal::{JOURNAL_VERSION, Journal, StepRecord, StepStatus};
pub use lock::AgentLock;

use crate::fsutil::{self, PUBLIC_MODE};

pub const JOURNAL_FILE: &str = "journal.json";
pub const LOCK_FILE: &str = "agent.lock";

/// The seed's state files, kept for scripts that read them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marker {
    /// `uninitialized` | `bootstrapped` | `joined`.
    BootstrapState,
    /// Present (with a timestamp) once the node has joined the cluster.
    ClusterJoined,
    /// `master-first` | `master-additional` | `worker`.
    NodeRole,
    /// This node's etcd member id, hex.
    EtcdMemberId,
}

impl Marker {
    pub fn file_name(self) -> &'static str {
        match self {
            Marker::BootstrapState => "bootstrap-state",
            Marker::ClusterJoined => "cluster-joined",
            Marker::NodeRole => "node-role",
            Marker::EtcdMemberId => "etcd-member-id",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot access {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Write(#[from] fsutil::WriteError),
    #[error(
        "another cluster-agent holds {path}; wait for it to finish (see `cluster-agent status`)"
    )]
    Locked { path: PathBuf },
    #[error(
        "journal {path} is corrupt ({reason}); it was left untouched. Inspect it, then move it aside or run `cluster-agent reset`"
    )]
    CorruptJournal { path: PathBuf, reason: String },
    #[error(
        "journal {path} has version {found}, this agent understands up to {JOURNAL_VERSION}; run the newer agent or `cluster-agent reset`"
    )]
    NewerJournal { path: PathBuf, found: u32 },
    #[error(
        "state in {dir} belongs to node {recorded:?} (role {recorded_role}), not {node:?}; run `cluster-agent reset` if this machine was re-purposed"
    )]
    ForeignState {
        dir: PathBuf,
        recorded: String,
        recorded_role: String,
        node: String,
    },
}

#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    pub fn new(dir: &Path) -> StateStore {
        StateStore {
            dir: dir.to_path_buf(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn io_error(&self, path: &Path) -> impl FnOnce(io::Error) -> StateError + use<> {
        let path = path.to_path_buf();
        move |source| StateError::Io { path, source }
    }

    /// Creates the state dir (0700: it holds secrets' neighbours and member
    /// ids) and takes the agent lock.
    pub fn lock(&self) -> Result<AgentLock, StateError> {
        fsutil::create_dir_with_mode(&self.dir, 0o700).map_err(self.io_error(&self.dir))?;
        lock::acquire(&self.dir.join(LOCK_FILE))
    }

    pub fn journal_path(&self) -> PathBuf {
        self.dir.join(JOURNAL_FILE)
    }

    /// `Ok(None)` when no journal exists yet. A journal that does not parse or
    /// comes from a newer agent is an error: it is never overwritten silently.
    pub fn load_journal(&self) -> Result<Option<Journal>, StateError> {
        let path = self.journal_path();
        let Some(bytes) = fsutil::read_optional(&path).map_err(self.io_error(&path))? else {
            return Ok(None);
        };
        let value: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| StateError::CorruptJournal {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        let found = value.get("version").and_then(serde_json::Value::as_u64);
        match found {
            Some(v) if v > u64::from(JOURNAL_VERSION) => {
                return Err(StateError::NewerJournal {
                    path,
                    found: u32::try_from(v).unwrap_or(u32::MAX),
                });
            }
            Some(_) => {}
            None => {
                return Err(StateError::CorruptJournal {
                    path,
                    reason: "no version field".into(),
                });
            }
        }
        serde_json::from_value(value)
            .map(Some)
            .map_err(|e| StateError::CorruptJournal {
                path,
                reason: e.to_string(),
            })
    }

    pub fn save_journal(&self, journal: &Journal) -> Result<(), StateError> {
        let mut bytes = serde_json::to_vec_pretty(journal).expect("journal serialises");
        bytes.push(b'\n');
        fsutil::write_atomic(&self.journal_path(), &bytes, PUBLIC_MODE)?;
        Ok(())
    }

    pub fn read_marker(&self, marker: Marker) -> Result<Option<String>, StateError> {
        let path = self.dir.join(marker.file_name());
        Ok(fsutil::read_optional(&path)
            .map_err(self.io_error(&path))?
            .map(|b| String::from_utf8_lossy(&b).trim().to_string()))
    }

    pub fn write_marker(&self, marker: Marker, value: &str) -> Result<(), StateError> {
        let path = self.dir.join(marker.file_name());
        fsutil::write_atomic(&path, format!("{value}\n").as_bytes(), PUBLIC_MODE)?;
        Ok(())
    }

    /// Removes the whole state dir (used by `reset`).
    pub fn remove_all(&self) -> Result<(), StateError> {
        match fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(self.io_error(&self.dir)(e)),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_round_trip_and_alignment() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path());
        assert!(store.load_journal().unwrap().is_none());
        let mut j = Journal::new("cp-1", "master-first");
        j.align_with_plan([("node", "a"), ("node", "b")]);
        j.step_mut("b").unwrap().status = StepStatus::Done;
        store.save_journal(&j).unwrap();
        let mut loaded = store.load_journal().unwrap().unwrap();
        assert_eq!(loaded, j);
        loaded.align_with_plan([("node", "b"), ("etcd", "c")]);
        let names: Vec<_> = loaded.steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["b", "c"]);
        assert_eq!(loaded.step("b").unwrap().status, StepStatus::Done);
    }

    #[test]
    fn corrupt_and_newer_journals_are_refused_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path());
        fs::write(store.journal_path(), b"{\"version\": 1, \"node\": ").unwrap();
        let err = store.load_journal().unwrap_err();
        assert!(matches!(err, StateError::CorruptJournal { .. }), "{err}");
        fs::write(store.journal_path(), b"{\"version\": 99}").unwrap();
        let err = store.load_journal().unwrap_err();
        assert!(
            matches!(err, StateError::NewerJournal { found: 99, .. }),
            "{err}"
        );
        assert_eq!(
            fs::read(store.journal_path()).unwrap(),
            b"{\"version\": 99}"
        );
    }

    #[test]
    fn second_lock_is_refused_until_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(&dir.path().join("state"));
        let first = store.lock().unwrap();
        assert!(matches!(store.lock(), Err(StateError::Locked { .. })));
        drop(first);
        store.lock().unwrap();
    }
}
