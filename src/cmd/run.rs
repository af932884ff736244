use time::format_description::well_known::Rfc3339;

use crate::cli::GlobalArgs;
use crate::engine::{self, CRASH_ENV, Context, CrashPoint, Progress};
use crate::notify;
use crate::paths::HostPaths;
use crate::phases;
use crate::role::Role;
use crate::services;
use crate::state::{Journal, Marker, StateError, StateStore};

use super::{CliError, EXIT_OK, load_config, target};

pub async fn run(global: &GlobalArgs, paths: &HostPaths) -> Result<i32, CliError> {
    // Validation and identity come first: a bad configuration exits 2
    // before anything is written.
    let config = load_config(paths)?;
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    let (node, target) = target(global, paths, &config)?;
    let node = node.clone();
    let plan = phases::build(target.role, target.ceph_role, &config);
    let crash = CrashPoint::from_env().map_err(CliError::Usage)?;
    if let Some(c) = &crash
        && !plan.step_names().any(|(_, s)| s == c.step)
    {
        return Err(CliError::Usage(format!(
            "{CRASH_ENV}: {} has no step `{}` (see `cluster-agent plan`)",
            node.name, c.step
        )));
    }

    let store = StateStore::new(paths.state_dir());
    let _lock = store.lock()?;
    let mut journal = match store.load_journal()? {
        Some(j) if j.node != node.name => {
            return Err(StateError::ForeignState {
                dir: store.dir().to_path_buf(),
                recorded: j.node,
                recorded_role: j.role,
                node: node.name.clone(),
            }
            .into());
        }
        Some(mut j) => {
            if j.role != target.role.as_str() {
                tracing::warn!(
                    recorded = %j.role,
                    now = %target.role,
                    "the configuration now gives this node another role; steps re-check what exists"
                );
                j.role = target.role.as_str().to_string();
            }
            j
        }
        None => Journal::new(&node.name, target.role.as_str()),
    };
    journal.align_with_plan(plan.step_names());
    store.save_journal(&journal)?;
    store.write_marker(Marker::NodeRole, target.role.as_str())?;
    if store.read_marker(Marker::BootstrapState)?.is_none() {
        store.write_marker(Marker::BootstrapState, "uninitialized")?;
    }
    tracing::info!(node = %node.name, role = %target.role, identity = ?target.identity, "starting");

    let services =
        services::connect(super::services_backend(global.services, paths), paths).await?;
    let ctx = Context {
        paths: paths.clone(),
        config,
        node,
        role: target.role,
        ceph_role: target.ceph_role,
        progress: Progress::new(store.clone(), journal),
        services,
    };
    let summary = engine::execute(&plan, &ctx, crash).await?;
    if !summary.succeeded() {
        let mut parts: Vec<String> = summary
            .failed
            .iter()
            .map(|(phase, e)| format!("phase {phase} failed: {e}"))
            .collect();
        parts.extend(
            summary
                .blocked
                .iter()
                .map(|p| format!("phase {p} not run (a phase it requires failed)")),
        );
        let text = parts.join("; ");
        notify::status(&format!("failed: {text}"));
        return Err(CliError::Failed(format!(
            "{text}. Fix the cause and re-run; completed steps are kept (see `cluster-agent status`)"
        )));
    }
    let finished = match target.role {
        Role::MasterFirst => "bootstrapped",
        Role::MasterAdditional | Role::Worker => "joined",
    };
    store.write_marker(Marker::BootstrapState, finished)?;
    let stamp = time::OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_default();
    store.write_marker(Marker::ClusterJoined, &stamp)?;
    notify::ready(&format!("{finished} as {}", target.role));
    println!("{}: {finished} as {}", ctx.node.name, target.role);
    Ok(EXIT_OK)
}
