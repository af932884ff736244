//! The step engine. A phase is data — an ordered list of named steps — and
//! one engine runs every phase of every role: check whether the step's
//! effect already holds, act only if not, record each transition in the
//! journal before moving on. A crash at any instant therefore resumes at the
//! first step whose effect is missing.
//!
//! Phases form a graph by their `requires`: each starts as soon as the
//! phases it requires have succeeded and runs beside the others (Ceph does
//! not wait for etcd), all on the agent's one task, so the journal has one
//! writer; steps within a phase run in order.

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
    /// The files and directories the phase's steps create on the node
    /// (under `--root`; its units are found by their header instead):
    /// what `reset` removes. `node` is `None` when this node cannot be
    /// identified any more.
    pub owns: fn(&HostPaths, Option<&NodeSpec>) -> Vec<std::path::PathBuf>,
}

/// [`Phase::owns`] of a phase that writes no file of its own.
pub fn owns_nothing(_: &HostPaths, _: Option<&NodeSpec>) -> Vec<std::path::PathBuf> {
    Vec::new()
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
    /// The step each running phase is at, in the order the phases started.
    running: Vec<(String, String)>,
    /// What each running step waits for, for the combined STATUS line.
    waits: std::collections::BTreeMap<String, String>,
}

tokio::task_local! {
    /// The phase whose step is being polled: which step `waiting` is about
    /// when several phases run at once.
    static PHASE: &'static str;
}

impl Progress {
    pub fn new(store: StateStore, journal: Journal) -> Progress {
        Progress {
            inner: Arc::new(Mutex::new(ProgressInner {
                store,
                journal,
                running: Vec::new(),
                waits: Default::default(),
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
        let status = {
            let mut inner = self.lock();
            match inner.running.iter_mut().find(|(p, _)| p == phase) {
                Some(entry) => entry.1 = step.to_string(),
                None => inner.running.push((phase.to_string(), step.to_string())),
            }
            inner.waits.remove(phase);
            inner.status_line()
        };
        notify::status(&status);
    }

    fn leave(&self, phase: &str) {
        let status = {
            let mut inner = self.lock();
            inner.running.retain(|(p, _)| p != phase);
            inner.waits.remove(phase);
            inner.status_line()
        };
        if !status.is_empty() {
            notify::status(&status);
        }
    }

    /// The step the calling phase is at: the task-local phase, else the
    /// one phase running (a step's own spawned task).
    fn current(&self) -> Option<(String, String)> {
        let inner = self.lock();
        let phase = PHASE.try_with(|p| p.to_string()).ok();
        match phase {
            Some(phase) => inner.running.iter().find(|(p, _)| *p == phase).cloned(),
            None if inner.running.len() == 1 => inner.running.first().cloned(),
            None => None,
        }
    }

    /// Tells the operator (journal, `systemctl status`) what the current step
    /// is waiting for. Failing to record it must not fail the wait.
    pub fn waiting(&self, what: &str) {
        if let Some((phase, step)) = self.current() {
            let status = {
                let mut inner = self.lock();
                inner.waits.insert(phase.clone(), what.to_string());
                inner.status_line()
            };
            notify::status(&status);
            notify::extend_timeout(notify::WAIT_EXTENSION);
            let what = what.to_string();
            if let Err(e) = self.update(&step, |r| r.waiting_for = Some(what)) {
                tracing::warn!(error = %e, "could not record wait in journal");
            }
        }
    }
}

impl ProgressInner {
    /// Every running phase, its step and what it waits for:
    /// `etcd: etcd-start: waiting for …; ceph: ceph-keys`.
    fn status_line(&self) -> String {
        self.running
            .iter()
            .map(|(phase, step)| match self.waits.get(phase) {
                Some(what) => format!("{phase}: {step}: waiting for {what}"),
                None => format!("{phase}: {step}"),
            })
            .collect::<Vec<_>>()
            .join("; ")
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

/// Runs every phase of the plan, each as soon as the phases it requires
/// have succeeded, side by side with the others. A failed phase stops its
/// own remaining steps and blocks the phases that require it (and theirs);
/// independent phases still run. A required phase that is not in the plan
/// counts as met.
pub async fn execute(
    plan: &Plan,
    ctx: &Context,
    crash: Option<CrashPoint>,
) -> Result<RunSummary, StateError> {
    use futures_util::StreamExt as _;
    use std::collections::BTreeSet;

    let mut summary = RunSummary::default();
    let mut succeeded: BTreeSet<&str> = BTreeSet::new();
    let mut waiting: Vec<&Phase> = plan.phases.iter().collect();
    let mut running = futures_util::stream::FuturesUnordered::new();
    let crash = &crash;
    loop {
        let unfinished =
            |name: &&str| plan.phases.iter().any(|p| p.name == *name) && !succeeded.contains(name);
        let mut still_waiting = Vec::new();
        for phase in waiting {
            let unmet: Vec<&str> = phase
                .requires
                .iter()
                .copied()
                .filter(|r| {
                    summary.failed.iter().any(|(p, _)| p == r)
                        || summary.blocked.iter().any(|p| p == r)
                })
                .collect();
            if !unmet.is_empty() {
                block(ctx, phase, &unmet)?;
                summary.blocked.push(phase.name.to_string());
            } else if phase.requires.iter().any(unfinished) {
                still_waiting.push(phase);
            } else {
                running.push(PHASE.scope(phase.name, async move {
                    (phase.name, run_phase(phase, ctx, crash).await)
                }));
            }
        }
        waiting = still_waiting;
        let Some((name, result)) = running.next().await else {
            break;
        };
        ctx.progress.leave(name);
        match result? {
            Ok(()) => {
                succeeded.insert(name);
            }
            Err(e) => {
                tracing::error!(phase = name, "phase {name} failed: {e}");
                summary.failed.push((name.to_string(), e));
            }
        }
    }
    // Only a plan whose requires form a cycle leaves phases waiting.
    for phase in waiting {
        let unmet: Vec<&str> = phase.requires.clone();
        block(ctx, phase, &unmet)?;
        summary.blocked.push(phase.name.to_string());
    }
    Ok(summary)
}

/// Records every step of `phase` not yet complete as blocked by `unmet`.
fn block(ctx: &Context, phase: &Phase, unmet: &[&str]) -> Result<(), StateError> {
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
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A step that records when it ran, waits `delay`, then does `outcome`
    /// (or fails).
    struct Probe {
        name: &'static str,
        delay: Duration,
        outcome: Result<Outcome, &'static str>,
        log: Arc<Mutex<Vec<String>>>,
    }

    #[async_trait]
    impl Step for Probe {
        fn name(&self) -> &'static str {
            self.name
        }
        fn summary(&self) -> &'static str {
            "test probe"
        }
        async fn check(&self, _ctx: &Context) -> Result<bool, StepError> {
            Ok(false)
        }
        async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
            self.log
                .lock()
                .unwrap()
                .push(format!("{} start", self.name));
            ctx.progress.waiting(&format!("{} to settle", self.name));
            let seen = ctx.progress.current().map(|(_, step)| step);
            tokio::time::sleep(self.delay).await;
            // Still this step's after the other phases ran meanwhile.
            assert_eq!(ctx.progress.current().map(|(_, step)| step), seen);
            assert_eq!(seen.as_deref(), Some(self.name), "waits are the waiter's");
            self.log.lock().unwrap().push(format!("{} end", self.name));
            self.outcome
                .clone()
                .map_err(|e| StepError::Precondition(e.to_string()))
        }
    }

    /// A phase as the tests write it: name, requires, steps.
    type PhaseSpec = (&'static str, Vec<&'static str>, Vec<Box<dyn Step>>);

    struct Fixture {
        _dir: tempfile::TempDir,
        ctx: Context,
        log: Arc<Mutex<Vec<String>>>,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let paths = HostPaths::new(dir.path(), None, None);
        let config = crate::config::load(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/example"),
        )
        .unwrap();
        let node = config.nodes[0].clone();
        let store = StateStore::new(paths.state_dir());
        let ctx = Context {
            services: Arc::new(crate::services::ProcessManager::new(paths.clone())),
            paths,
            config,
            node,
            role: Role::MasterFirst,
            ceph_role: CephRole::None,
            progress: Progress::new(store, Journal::new("test", "master-first")),
        };
        Fixture {
            _dir: dir,
            ctx,
            log: Arc::default(),
        }
    }

    impl Fixture {
        fn step(
            &self,
            name: &'static str,
            ms: u64,
            outcome: Result<Outcome, &'static str>,
        ) -> Box<dyn Step> {
            Box::new(Probe {
                name,
                delay: Duration::from_millis(ms),
                outcome,
                log: self.log.clone(),
            })
        }

        fn plan(&self, phases: Vec<PhaseSpec>) -> Plan {
            let plan = Plan {
                phases: phases
                    .into_iter()
                    .map(|(name, requires, steps)| Phase {
                        owns: owns_nothing,
                        name,
                        requires,
                        steps,
                    })
                    .collect(),
            };
            let mut journal = self.ctx.progress.journal();
            journal.align_with_plan(plan.step_names());
            *self.ctx.progress.lock() = ProgressInner {
                store: self.ctx.progress.store(),
                journal,
                running: Vec::new(),
                waits: Default::default(),
            };
            plan
        }

        fn status(&self, step: &str) -> (StepStatus, Option<String>) {
            let journal = self.ctx.progress.journal();
            let record = journal.step(step).unwrap();
            (
                record.status,
                record.note.clone().or(record.last_error.clone()),
            )
        }

        fn log(&self) -> Vec<String> {
            self.log.lock().unwrap().clone()
        }
    }

    #[tokio::test]
    async fn independent_phases_run_side_by_side_and_dependents_wait() {
        let f = fixture();
        let plan = f.plan(vec![
            ("node", vec![], vec![f.step("n", 1, Ok(Outcome::Done))]),
            (
                "etcd",
                vec!["node"],
                vec![f.step("e", 200, Ok(Outcome::Done))],
            ),
            (
                "ceph",
                vec!["node"],
                vec![f.step("c", 20, Ok(Outcome::Done))],
            ),
            (
                "control-plane",
                vec!["etcd"],
                vec![f.step("k", 1, Ok(Outcome::Done))],
            ),
        ]);
        let summary = execute(&plan, &f.ctx, None).await.unwrap();
        assert!(summary.succeeded(), "{summary:?}");
        // Ceph starts and ends while etcd still waits; the control plane
        // only after etcd.
        assert_eq!(
            f.log(),
            [
                "n start", "n end", "e start", "c start", "c end", "e end", "k start", "k end"
            ]
        );
        // Each wait was recorded on its own step, not on the other phase's.
        let journal = f.ctx.progress.journal();
        assert_eq!(
            journal.step("e").unwrap().waiting_for,
            None,
            "cleared when done"
        );
        assert_eq!(journal.step("c").unwrap().status, StepStatus::Done);
    }

    #[tokio::test]
    async fn a_failure_blocks_its_dependents_transitively_and_nothing_else() {
        let f = fixture();
        let plan = f.plan(vec![
            ("node", vec![], vec![f.step("n", 1, Ok(Outcome::Done))]),
            (
                "etcd",
                vec!["node"],
                vec![
                    f.step("e1", 1, Err("no quorum")),
                    f.step("e2", 1, Ok(Outcome::Done)),
                ],
            ),
            (
                "control-plane",
                vec!["etcd"],
                vec![f.step("k", 1, Ok(Outcome::Done))],
            ),
            (
                "kubelet",
                vec!["control-plane"],
                vec![f.step("l", 1, Ok(Outcome::Done))],
            ),
            (
                "ceph",
                vec!["node"],
                vec![f.step("c", 30, Ok(Outcome::Done))],
            ),
        ]);
        let summary = execute(&plan, &f.ctx, None).await.unwrap();
        assert_eq!(summary.failed.len(), 1);
        assert_eq!(summary.failed[0].0, "etcd");
        assert!(summary.failed[0].1.contains("e1: no quorum"), "{summary:?}");
        assert_eq!(summary.blocked, ["control-plane", "kubelet"]);
        assert_eq!(f.status("e1").0, StepStatus::Failed);
        assert_eq!(
            f.status("e2").0,
            StepStatus::Pending,
            "a failed phase stops"
        );
        let (status, note) = f.status("l");
        assert_eq!(status, StepStatus::Blocked);
        assert_eq!(note.as_deref(), Some("phase control-plane did not succeed"));
        assert_eq!(
            f.status("c").0,
            StepStatus::Done,
            "independent phases still run"
        );
    }

    #[tokio::test]
    async fn skip_rest_skips_the_phase_which_still_counts_as_succeeded() {
        let f = fixture();
        let plan = f.plan(vec![
            (
                "kubelet",
                vec![],
                vec![
                    f.step("binary", 1, Ok(Outcome::SkipRest("no kubelet".into()))),
                    f.step("start", 1, Ok(Outcome::Done)),
                ],
            ),
            (
                "kube-proxy",
                vec!["kubelet"],
                vec![f.step("p", 1, Ok(Outcome::Done))],
            ),
        ]);
        let summary = execute(&plan, &f.ctx, None).await.unwrap();
        assert!(summary.succeeded(), "{summary:?}");
        assert_eq!(
            f.status("binary"),
            (StepStatus::Skipped, Some("no kubelet".into()))
        );
        assert_eq!(
            f.status("start"),
            (
                StepStatus::Skipped,
                Some("skipped with binary: no kubelet".into())
            )
        );
        assert_eq!(f.status("p").0, StepStatus::Done);
        assert!(!f.log().contains(&"start start".to_string()));
    }

    #[tokio::test]
    async fn requires_outside_the_plan_are_met_and_cycles_are_blocked() {
        let f = fixture();
        let plan = f.plan(vec![
            (
                "a",
                vec!["not-in-this-plan"],
                vec![f.step("a1", 1, Ok(Outcome::Done))],
            ),
            ("b", vec!["c"], vec![f.step("b1", 1, Ok(Outcome::Done))]),
            ("c", vec!["b"], vec![f.step("c1", 1, Ok(Outcome::Done))]),
        ]);
        let summary = execute(&plan, &f.ctx, None).await.unwrap();
        assert_eq!(f.status("a1").0, StepStatus::Done);
        assert_eq!(summary.blocked, ["b", "c"]);
        assert_eq!(f.status("b1").0, StepStatus::Blocked);
    }

    #[test]
    fn the_status_line_names_every_running_phase_and_its_wait() {
        let inner = ProgressInner {
            store: StateStore::new(std::path::Path::new("/nonexistent")),
            journal: Journal::new("n", "worker"),
            running: vec![
                ("etcd".into(), "etcd-start".into()),
                ("ceph".into(), "ceph-keys".into()),
            ],
            waits: [("etcd".to_string(), "a leader".to_string())].into(),
        };
        assert_eq!(
            inner.status_line(),
            "etcd: etcd-start: waiting for a leader; ceph: ceph-keys"
        );
    }
}
