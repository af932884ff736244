//! `cluster-agent status`: what the journal says this node did, and what the
//! systems it set up say now. Read-only, lock-free (it works while `run`
//! holds the lock), and bounded: every live check shares one deadline.

mod checks;

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::cli::{GlobalArgs, StatusArgs};
use crate::paths::HostPaths;
use crate::state::{Journal, Marker, StateStore, StepRecord, StepStatus};

use checks::{Health, Section};

use super::{CliError, EXIT_FAILURE, EXIT_OK, EXIT_PROGRESSING, print_json};

/// Budget for all live checks together. With the local work around them,
/// `status` answers within 2.5 s even when every peer is down.
pub const CHECK_BUDGET: Duration = Duration::from_secs(2);

const MARKERS: [Marker; 4] = [
    Marker::BootstrapState,
    Marker::ClusterJoined,
    Marker::NodeRole,
    Marker::EtcdMemberId,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Overall {
    Healthy,
    Progressing,
    Failed,
}

#[derive(Debug, Serialize)]
pub struct StepView {
    #[serde(flatten)]
    pub record: StepRecord,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_s: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub node: Option<String>,
    pub role: Option<String>,
    pub ceph_role: Option<crate::role::CephRole>,
    pub os: Option<String>,
    pub bootstrap_state: String,
    pub markers: BTreeMap<&'static str, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config_error: Option<String>,
    pub steps: Vec<StepView>,
    /// The step running now and what it waits for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub now: Option<String>,
    pub checks: Vec<Section>,
    pub health: Overall,
    pub exit_code: i32,
    /// Why the health is not `healthy`, one sentence each.
    pub problems: Vec<String>,
    pub elapsed_ms: u128,
}

/// Exit code: 0 healthy (every step complete, every configured check ok or
/// warning), 4 progressing (no step failed but some are not complete, or no
/// run yet), 1 failed (a step failed, or the node is bootstrapped but a
/// check failed).
pub async fn status(
    global: &GlobalArgs,
    paths: &HostPaths,
    args: &StatusArgs,
) -> Result<i32, CliError> {
    if !args.watch {
        let report = gather(global, paths).await?;
        show(global, &report);
        return Ok(report.exit_code);
    }
    let interval = Duration::from_secs_f64(args.interval);
    // One listener for the whole loop: a Ctrl-C that arrives while a report
    // is being gathered stays pending and ends the loop right after it.
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| CliError::Failed(format!("cannot watch for Ctrl-C: {e}")))?;
    loop {
        let report = gather(global, paths).await?;
        if !global.json {
            // Clear the screen and home the cursor, then redraw.
            print!("\x1b[2J\x1b[H");
        }
        show(global, &report);
        let _ = std::io::stdout().flush();
        tokio::select! {
            _ = interrupt.recv() => return Ok(report.exit_code),
            () = tokio::time::sleep(interval) => {}
        }
    }
}

fn show(global: &GlobalArgs, report: &Report) {
    if global.json {
        print_json(report);
    } else {
        print!("{}", render(report));
    }
}

pub async fn gather(global: &GlobalArgs, paths: &HostPaths) -> Result<Report, CliError> {
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + CHECK_BUDGET;
    let store = StateStore::new(paths.state_dir());
    let journal = store.load_journal()?;
    let mut markers = BTreeMap::new();
    for m in MARKERS {
        if let Some(v) = store.read_marker(m)? {
            markers.insert(m.file_name(), v);
        }
    }
    let bootstrap_state = markers
        .get(Marker::BootstrapState.file_name())
        .cloned()
        .unwrap_or_else(|| "uninitialized".to_string());

    // Identity as `run` resolves it; without it, the journal's node.
    let (config, config_error) = match super::load_config(paths) {
        Ok(c) => (Some(c), None),
        Err(e) => (None, Some(crate::error_chain(&e))),
    };
    let identified = config.as_ref().and_then(|c| {
        super::target(global, paths, c)
            .ok()
            .map(|(n, t)| (n.clone(), t))
    });
    let node_name = identified
        .as_ref()
        .map(|(n, _)| n.name.clone())
        .or_else(|| journal.as_ref().map(|j| j.node.clone()));
    let node = match (&identified, &config, &node_name) {
        (Some((n, _)), _, _) => Some(n.clone()),
        (None, Some(c), Some(name)) => c.nodes.iter().find(|n| &n.name == name).cloned(),
        _ => None,
    };
    let role = match (&identified, &config, &node) {
        (Some((_, t)), _, _) => Some(t.role),
        (None, Some(c), Some(n)) => Some(crate::role::decide(c, n)),
        _ => None,
    };
    let ceph_role = match (&config, &node) {
        (Some(c), Some(n)) => Some(crate::role::decide_ceph(c, n)),
        _ => None,
    };

    let probe = checks::Probe {
        paths: paths.clone(),
        config,
        node,
        services: global.services,
        deadline,
    };
    let checks = checks::run_all(&probe, CHECK_BUDGET).await;

    let (health, problems) = judge(journal.as_ref(), config_error.as_deref(), &checks);
    let steps = journal
        .as_ref()
        .map(|j| j.steps.iter().map(step_view).collect())
        .unwrap_or_default();
    // Phases run side by side: every running step, in plan order.
    let now = journal.as_ref().and_then(|j| {
        let running: Vec<String> = j
            .steps
            .iter()
            .filter(|s| s.status == StepStatus::Running)
            .map(|s| match &s.waiting_for {
                Some(w) => format!("{} waits for {w}", s.name),
                None => format!("{} is running", s.name),
            })
            .collect();
        (!running.is_empty()).then(|| running.join("; "))
    });
    Ok(Report {
        node: node_name,
        role: role
            .map(|r| r.as_str().to_string())
            .or_else(|| journal.as_ref().map(|j| j.role.clone())),
        ceph_role,
        os: os_release(paths),
        bootstrap_state,
        markers,
        config_error,
        steps,
        now,
        checks,
        exit_code: match health {
            Overall::Healthy => EXIT_OK,
            Overall::Progressing => EXIT_PROGRESSING,
            Overall::Failed => EXIT_FAILURE,
        },
        health,
        problems,
        elapsed_ms: started.elapsed().as_millis(),
    })
}

/// A failed step or a configuration `run` cannot use wins; then an
/// incomplete journal (checks of things not set up yet are expected to
/// fail); then the live checks.
fn judge(
    journal: Option<&Journal>,
    config_error: Option<&str>,
    checks: &[Section],
) -> (Overall, Vec<String>) {
    if let Some(e) = config_error {
        return (
            Overall::Failed,
            vec![format!("`run` cannot use the configuration: {e}")],
        );
    }
    let Some(journal) = journal else {
        return (
            Overall::Progressing,
            vec!["no run recorded yet: `cluster-agent run` has not started on this node".into()],
        );
    };
    let failed: Vec<String> = journal
        .steps
        .iter()
        .filter(|s| s.status == StepStatus::Failed)
        .map(|s| {
            format!(
                "step {} failed: {}",
                s.name,
                s.last_error.as_deref().unwrap_or("no error recorded")
            )
        })
        .collect();
    if !failed.is_empty() {
        return (Overall::Failed, failed);
    }
    if !journal.all_complete() {
        let pending = journal.steps.iter().filter(|s| !s.status.is_complete());
        return (
            Overall::Progressing,
            vec![format!("{} step(s) not complete yet", pending.count())],
        );
    }
    let failing: Vec<String> = checks
        .iter()
        .filter(|c| c.health == Health::Failed)
        .map(|c| format!("{}: {}", c.name, c.summary))
        .collect();
    if failing.is_empty() {
        (Overall::Healthy, Vec::new())
    } else {
        (Overall::Failed, failing)
    }
}

fn step_view(s: &StepRecord) -> StepView {
    StepView {
        duration_s: match (s.started_at, s.finished_at) {
            (Some(a), Some(b)) => Some((b - a).as_seconds_f64()),
            _ => None,
        },
        record: s.clone(),
    }
}

/// `PRETTY_NAME` from `<root>/etc/os-release`, else `NAME VERSION_ID`.
fn os_release(paths: &HostPaths) -> Option<String> {
    let text = std::fs::read_to_string(paths.host("/etc/os-release")).ok()?;
    let fields: BTreeMap<&str, String> = text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim(), v.trim().trim_matches('"').to_string()))
        .collect();
    fields.get("PRETTY_NAME").cloned().or_else(|| {
        let name = fields.get("NAME")?;
        Some(match fields.get("VERSION_ID") {
            Some(v) => format!("{name} {v}"),
            None => name.clone(),
        })
    })
}

fn status_word(status: StepStatus) -> String {
    serde_json::to_value(status)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

pub fn render(r: &Report) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let unknown = || "unknown".to_string();
    let _ = writeln!(
        out,
        "node {} — role {} — {}",
        r.node.clone().unwrap_or_else(unknown),
        r.role.clone().unwrap_or_else(unknown),
        r.os.clone().unwrap_or_else(|| "OS unknown".into())
    );
    let _ = writeln!(out, "bootstrap state: {}", r.bootstrap_state);
    if let Some(e) = &r.config_error {
        let _ = writeln!(out, "configuration: {e}");
    }
    if r.steps.is_empty() {
        let _ = writeln!(out, "steps: none recorded yet");
    } else {
        let _ = writeln!(out, "steps:");
    }
    for v in &r.steps {
        let s = &v.record;
        let took = v.duration_s.map(|d| format!("{d:.2}s")).unwrap_or_default();
        let _ = writeln!(
            out,
            "  {:<14} {:<24} {:<8} {:>8}  attempts {}",
            s.phase,
            s.name,
            status_word(s.status),
            took,
            s.attempts
        );
        for (label, text) in [
            ("waiting for", &s.waiting_for),
            ("error", &s.last_error),
            ("note", &s.note),
        ] {
            if let Some(text) = text {
                let _ = writeln!(out, "      {label}: {text}");
            }
        }
    }
    if let Some(now) = &r.now {
        let _ = writeln!(out, "now: {now}");
    }
    for c in &r.checks {
        let _ = writeln!(out, "{}: {} — {}", c.name, c.health.as_str(), c.summary);
        for l in &c.lines {
            let _ = writeln!(out, "  {l}");
        }
    }
    let word = match r.health {
        Overall::Healthy => "healthy",
        Overall::Progressing => "progressing",
        Overall::Failed => "failed",
    };
    let _ = writeln!(out, "health: {word} (exit {})", r.exit_code);
    for p in &r.problems {
        let _ = writeln!(out, "  {p}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(health: Health) -> Section {
        Section {
            name: "etcd",
            health,
            summary: "x".into(),
            lines: vec![],
            data: serde_json::Value::Null,
        }
    }

    #[test]
    fn failed_step_beats_progress_and_progress_beats_checks() {
        assert_eq!(judge(None, None, &[]).0, Overall::Progressing);
        let mut j = Journal::new("cp-1", "master-first");
        j.align_with_plan([("node", "a"), ("node", "b")]);
        let down = [section(Health::Failed)];
        assert_eq!(judge(Some(&j), None, &down).0, Overall::Progressing);
        j.step_mut("a").unwrap().status = StepStatus::Failed;
        assert_eq!(judge(Some(&j), None, &[]).0, Overall::Failed);
        j.step_mut("a").unwrap().status = StepStatus::Done;
        j.step_mut("b").unwrap().status = StepStatus::Skipped;
        assert_eq!(
            judge(Some(&j), None, &[section(Health::Warning)]).0,
            Overall::Healthy
        );
        let (health, problems) = judge(Some(&j), None, &down);
        assert_eq!(health, Overall::Failed);
        assert_eq!(problems, ["etcd: x"]);
        assert_eq!(
            judge(Some(&j), None, &[section(Health::NotConfigured)]).0,
            Overall::Healthy
        );
        assert_eq!(judge(Some(&j), Some("bad"), &[]).0, Overall::Failed);
    }

    #[test]
    fn os_release_prefers_pretty_name() {
        let dir = tempfile::tempdir().unwrap();
        let paths = HostPaths::new(dir.path(), None, None);
        assert_eq!(os_release(&paths), None);
        std::fs::create_dir_all(dir.path().join("etc")).unwrap();
        std::fs::write(
            dir.path().join("etc/os-release"),
            "NAME=\"Flatcar Container Linux by Kinvolk\"\nVERSION_ID=4081.2.0\n",
        )
        .unwrap();
        assert_eq!(
            os_release(&paths).as_deref(),
            Some("Flatcar Container Linux by Kinvolk 4081.2.0")
        );
        std::fs::write(
            dir.path().join("etc/os-release"),
            "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n",
        )
        .unwrap();
        assert_eq!(
            os_release(&paths).as_deref(),
            Some("Debian GNU/Linux 12 (bookworm)")
        );
    }
}
