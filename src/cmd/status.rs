use crate::cli::GlobalArgs;
use crate::paths::HostPaths;
use crate::state::{Marker, StateStore, StepStatus};

use super::{CliError, EXIT_FAILURE, EXIT_OK, EXIT_PROGRESSING, print_json};

/// Exit code: 0 every step complete, 1 a step failed, 4 still in progress
/// (or never started).
pub fn status(global: &GlobalArgs, paths: &HostPaths) -> Result<i32, CliError> {
    let store = StateStore::new(paths.state_dir());
    let journal = store.load_journal()?;
    let bootstrap_state = store
        .read_marker(Marker::BootstrapState)?
        .unwrap_or_else(|| "uninitialized".to_string());
    let code = match &journal {
        Some(j) if j.all_complete() => EXIT_OK,
        Some(j) if j.steps.iter().any(|s| s.status == StepStatus::Failed) => EXIT_FAILURE,
        _ => EXIT_PROGRESSING,
    };
    if global.json {
        print_json(&serde_json::json!({
            "bootstrap_state": bootstrap_state,
            "journal": journal,
        }));
        return Ok(code);
    }
    let Some(journal) = journal else {
        println!(
            "no bootstrap recorded in {} (state {bootstrap_state})",
            paths.state_dir().display()
        );
        return Ok(code);
    };
    println!(
        "node {} — role {} — state {bootstrap_state}",
        journal.node, journal.role
    );
    for s in &journal.steps {
        let took = match (s.started_at, s.finished_at) {
            (Some(a), Some(b)) => format!("{:.2}s", (b - a).as_seconds_f64()),
            _ => String::new(),
        };
        let status = serde_json::to_value(s.status)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        println!(
            "  {:<8} {:<24} {:<8} {:>8} attempts {}",
            s.phase, s.name, status, took, s.attempts
        );
        for (label, text) in [
            ("waiting for", &s.waiting_for),
            ("error", &s.last_error),
            ("note", &s.note),
        ] {
            if let Some(text) = text {
                println!("           {label}: {text}");
            }
        }
    }
    Ok(code)
}
