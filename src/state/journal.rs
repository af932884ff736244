//! The step journal: one record per planned step, persisted after every
//! transition so `status` and a resumed `run` see exactly where a node is.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// Bumped when the on-disk shape changes incompatibly. An agent refuses a
/// journal newer than it understands rather than overwrite it.
pub const JOURNAL_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepStatus {
    Pending,
    Running,
    Done,
    Skipped,
    Failed,
    /// Not attempted because a phase this one depends on failed.
    Blocked,
}

impl StepStatus {
    pub fn is_complete(self) -> bool {
        matches!(self, StepStatus::Done | StepStatus::Skipped)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    pub phase: String,
    pub name: String,
    pub status: StepStatus,
    /// How many times the step's action was attempted (a check that finds the
    /// effect already in place does not count).
    pub attempts: u32,
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub started_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub finished_at: Option<OffsetDateTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// What the step is blocked on right now, while it waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<String>,
    /// Why a step was skipped, or a short result worth showing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl StepRecord {
    fn pending(phase: &str, name: &str) -> StepRecord {
        StepRecord {
            phase: phase.to_string(),
            name: name.to_string(),
            status: StepStatus::Pending,
            attempts: 0,
            started_at: None,
            finished_at: None,
            last_error: None,
            waiting_for: None,
            note: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journal {
    pub version: u32,
    pub node: String,
    pub role: String,
    pub steps: Vec<StepRecord>,
}

impl Journal {
    pub fn new(node: &str, role: &str) -> Journal {
        Journal {
            version: JOURNAL_VERSION,
            node: node.to_string(),
            role: role.to_string(),
            steps: Vec::new(),
        }
    }

    /// Lays the records out in plan order, keeping what is known about steps
    /// that were planned before and dropping steps no longer planned.
    pub fn align_with_plan<'a>(&mut self, planned: impl IntoIterator<Item = (&'a str, &'a str)>) {
        let mut old = std::mem::take(&mut self.steps);
        for (phase, name) in planned {
            let record = match old.iter().position(|r| r.phase == phase && r.name == name) {
                Some(i) => old.swap_remove(i),
                None => StepRecord::pending(phase, name),
            };
            self.steps.push(record);
        }
    }

    pub fn step(&self, name: &str) -> Option<&StepRecord> {
        self.steps.iter().find(|r| r.name == name)
    }

    pub fn step_mut(&mut self, name: &str) -> Option<&mut StepRecord> {
        self.steps.iter_mut().find(|r| r.name == name)
    }

    pub fn all_complete(&self) -> bool {
        self.steps.iter().all(|r| r.status.is_complete())
    }
}
