//! The step engine. A phase is data — an ordered list of named steps — and
//! one engine runs every phase of every role: check whether the step's
//! effect already holds, act only if not, record each transition in the
//! journal before moving on. A crash at any instant therefore resumes at the
//! first step whose effect is missing.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use time::OffsetDateTime;

use crate::config::{ClusterConfig, NodeSpec};
use crate::paths::HostPaths;
use crate::role::{CephRole, Role};
use crate::services::ServiceManager;
use crate::state::{Journal, StateError, StateStore, StepStatus};
use crate::{error_chain, notify};

pub use crate::step_error::StepError;

/// What a step's action achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// The step does not apply here; the reason is recorded and shown.
    Skipped(String),
    /// Neither this step nor the rest of its phase applies here (an image
    /// without the phase's programs); all are recorded as skipped, with
    /// the reason, and the phase counts as succeeded.
    SkipRest(String),
}

#[async_trait]
pub trait Step: Send + Sync {
    /// Unique across a plan; used by `plan`, the journal and
    /// `CLUSTER_AGENT_CRASH_AT`.
    fn name(&self) -> &'static str;
    /// One line for `plan`.
    fn summary(&self) -> &'static str;
    /// Does the step's effect already hold? Must not change anything.
    async fn check(&self, ctx: &Context) -> Result<bool, StepError>;
    /// Bring the effect about. May assume `check` just returned false, but
    /// must tolerate partial work left by a crash.
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError>;
}

pub struct Phase {
    pub name: &'static str,
    /// Phases that must have succeeded before this one runs.
    pub requires: Vec<&'static str>,
    pub steps: Vec<Box<dyn Step>>,
}

pub struct Plan {
    pub phases: Vec<Phase>,
}

impl Plan {
    /// `(phase, step)` pairs in execution order.
    pub fn step_names(&self) -> impl Iterator<Item = (&'static str, &'static str)> + '_ {
        self.phases
            .iter()
            .flat_map(|p| p.steps.iter().map(move |s| (p.name, s.name())))
    }
}

/// Everything a step may use. Built once per run.
pub struct Context {
    pub paths: HostPaths,
    pub config: ClusterConfig,
    pub node: NodeSpec,
    pub role: Role,
    pub ceph_role: CephRole,
    pub progress: Progress,
    /// Runs the units the steps render (systemd or detached processes).
    pub services: Arc<dyn ServiceManager>,
}

/// The journal as the run goes, plus the operator-facing progress signals
/// (sd_notify STATUS, the journal's `waiting_for`).
#[derive(Clone)]
pub struct Progress {
    inner: Arc<Mutex<ProgressInner>>,
}

struct ProgressInner {
    store: StateStore,
    journal: Journal,
    current: Option<(String, String)>,
}

impl Progress {
    pub fn new(store: StateStore, journal: Journal) -> Progress {
        Progress {
            inner: Arc::new(Mutex::new(ProgressInner {
                store,
                journal,
                current: None,
            })),
        }
    }

    pub fn store(&self) -> StateStore {
        self.lock().store.clone()
    }

    pub fn journal(&self) -> Journal {
        self.lock().journal.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ProgressInner> {
        // A panic while holding the lock leaves a consistent journal value
        // (updates are single assignments), so poisoning is not fatal.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(
        &self,
        step: &str,
        change: impl FnOnce(&mut crate::state::StepRecord),
    ) -> Result<(), StateError> {
        let mut inner = self.lock();
        if let Some(record) = inner.journal.step_mut(step) {
            change(record);
        }
        inner.store.save_journal(&inner.journal)
    }

    fn enter(&self, phase: &str, step: &str) {
        self.lock().current = Some((phase.to_string(), step.to_string()));
        notify::status(&format!("{phase}: {step}"));
    }

    /// Tells the operator (journal, `systemctl status`) what the current step
    /// is waiting for. Failing to record it must not fail the wait.
    pub fn waiting(&self, what: &str) {
        let current = self.lock().current.clone();
        if let Some((phase, step)) = current {
            notify::status(&format!("{phase}: {step}: waiting for {what}"));
            notify::extend_timeout(notify::WAIT_EXTENSION);
            let what = what.to_string();
            if let Err(e) = self.update(&step, |r| r.waiting_for = Some(what)) {
                tracing::warn!(error = %e, "could not record wait in journal");
            }
        }
    }
}

/// Where `CLUSTER_AGENT_CRASH_AT=<step>[:before|:after]` aborts the process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrashPoint {
    pub step: String,
    pub after: bool,
}

pub const CRASH_ENV: &str = "CLUSTER_AGENT_CRASH_AT";

impl CrashPoint {
    /// A malformed spec is a usage error: a typo must not silently crash
    /// somewhere else (or nowhere).
    pub fn from_env() -> Result<Option<CrashPoint>, String> {
        let Ok(spec) = std::env::var(CRASH_ENV) else {
            return Ok(None);
        };
        let (step, when) = spec.split_once(':').unwrap_or((spec.as_str(), "before"));
        let after = match when {
            "before" => false,
            "after" => true,
            other => {
                return Err(format!(
                    "{CRASH_ENV}={spec}: `{other}` is neither `before` nor `after`"
                ));
            }
        };
        Ok(Some(CrashPoint {
            step: step.to_string(),
            after,
        }))
    }

    fn trigger(crash: &Option<CrashPoint>, step: &str, after: bool) {
        if let Some(c) = crash
            && c.step == step
            && c.after == after
        {
            eprintln!(
                "{CRASH_ENV}: aborting at {step}:{}",
                if after { "after" } else { "before" }
            );
            // abort, not exit: no destructors, no flushing — as close to a
            // power cut as a process can get.
            std::process::abort();
        }
    }
}

#[derive(Debug, Default)]
pub struct RunSummary {
    /// Phases that failed, with the error.
    pub failed: Vec<(String, String)>,
    /// Phases not run because a phase they require failed.
    pub blocked: Vec<String>,
}

impl RunSummary {
    pub fn succeeded(&self) -> bool {
        self.failed.is_empty() && self.blocked.is_empty()
    }
}

fn now() -> Option<OffsetDateTime> {
    Some(OffsetDateTime::now_utc())
}

/// Runs every phase in order. A failed phase stops its own remaining steps
/// and blocks phases that require it; independent phases still run.
pub async fn execute(
    plan: &Plan,
    ctx: &Context,
    crash: Option<CrashPoint>,
) -> Result<RunSummary, StateError> {
    let mut summary = RunSummary::default();
    for phase in &plan.phases {
        let unmet: Vec<&str> = phase
            .requires
            .iter()
            .copied()
            .filter(|r| {
                summary.failed.iter().any(|(p, _)| p == r) || summary.blocked.iter().any(|p| p == r)
            })
            .collect();
        if !unmet.is_empty() {
            let why = format!("phase {} did not succeed", unmet.join(", "));
            for step in &phase.steps {
                let why = why.clone();
                ctx.progress.update(step.name(), |r| {
                    if !r.status.is_complete() {
                        r.status = StepStatus::Blocked;
                        r.note = Some(why);
                    }
                })?;
            }
            summary.blocked.push(phase.name.to_string());
            continue;
        }
        if let Err(e) = run_phase(phase, ctx, &crash).await? {
            tracing::error!(phase = phase.name, "phase {} failed: {e}", phase.name);
            summary.failed.push((phase.name.to_string(), e));
        }
    }
    Ok(summary)
}

/// Outer error: the journal could not be written (stop everything).
/// Inner error: a step failed (this phase stops).
async fn run_phase(
    phase: &Phase,
    ctx: &Context,
    crash: &Option<CrashPoint>,
) -> Result<Result<(), String>, StateError> {
    let mut skip_rest: Option<String> = None;
    for step in &phase.steps {
        let name = step.name();
        if let Some(reason) = &skip_rest {
            let reason = reason.clone();
            ctx.progress.update(name, |r| {
                r.status = StepStatus::Skipped;
                r.finished_at = now();
                r.note = Some(reason);
            })?;
            continue;
        }
        ctx.progress.enter(phase.name, name);
        CrashPoint::trigger(crash, name, false);
        match step.check(ctx).await {
            Ok(true) => {
                tracing::info!(step = name, "{name}: already in place");
                // A check may itself have announced a wait it then did not
                // need; a done step must not look as if it were waiting.
                let recorded = ctx.progress.journal().step(name).cloned();
                if recorded.is_none_or(|r| r.status != StepStatus::Done || r.waiting_for.is_some())
                {
                    ctx.progress.update(name, |r| {
                        r.status = StepStatus::Done;
                        r.finished_at = now();
                        r.waiting_for = None;
                        r.last_error = None;
                    })?;
                }
                continue;
            }
            Ok(false) => {}
            Err(e) => return fail(ctx, name, &e),
        }
        ctx.progress.update(name, |r| {
            r.status = StepStatus::Running;
            r.attempts += 1;
            r.started_at = now();
            r.finished_at = None;
            r.waiting_for = None;
            r.note = None;
        })?;
        // The step is in the message too: `journalctl -u cluster-bootstrap`
        // shows messages, not fields.
        tracing::info!(step = name, "{name}: applying");
        match step.apply(ctx).await {
            Ok(outcome) => {
                if let Outcome::SkipRest(reason) = &outcome {
                    skip_rest = Some(format!("skipped with {name}: {reason}"));
                }
                CrashPoint::trigger(crash, name, true);
                ctx.progress.update(name, |r| {
                    r.finished_at = now();
                    r.waiting_for = None;
                    r.last_error = None;
                    match outcome {
                        Outcome::Done => r.status = StepStatus::Done,
                        Outcome::Skipped(reason) | Outcome::SkipRest(reason) => {
                            tracing::warn!(step = name, "{name}: skipped: {reason}");
                            r.status = StepStatus::Skipped;
                            r.note = Some(reason);
                        }
                    }
                })?;
            }
            Err(e) => return fail(ctx, name, &e),
        }
    }
    Ok(Ok(()))
}

fn fail(ctx: &Context, step: &str, error: &StepError) -> Result<Result<(), String>, StateError> {
    let message = format!("{step}: {}", error_chain(error));
    let recorded = message.clone();
    ctx.progress.update(step, |r| {
        r.status = StepStatus::Failed;
        r.finished_at = now();
        r.waiting_for = None;
        r.last_error = Some(recorded);
    })?;
    Ok(Err(message))
}
