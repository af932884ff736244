use std::io::{BufRead, IsTerminal, Write};

use crate::cli::{GlobalArgs, ResetArgs};
use crate::paths::HostPaths;
use crate::phases::node::NETWORK_FILE;
use crate::state::StateStore;

use super::{CliError, EXIT_OK};

/// Removes what the agent created so the next `run` starts clean. Takes the
/// agent lock first so it never pulls state from under a running agent.
pub fn reset(_global: &GlobalArgs, paths: &HostPaths, args: &ResetArgs) -> Result<i32, CliError> {
    let store = StateStore::new(paths.state_dir());
    let targets = [paths.host(NETWORK_FILE), paths.state_dir().to_path_buf()];
    let existing: Vec<_> = targets.iter().filter(|p| p.exists()).collect();
    if args.dry_run {
        for p in &existing {
            println!("would remove {}", p.display());
        }
        return Ok(EXIT_OK);
    }
    if !args.yes && !confirm(&existing)? {
        return Err(CliError::Usage(
            "reset not confirmed; nothing was changed".into(),
        ));
    }
    let lock = store.lock()?;
    let network = paths.host(NETWORK_FILE);
    match std::fs::remove_file(&network) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(CliError::Failed(format!(
                "cannot remove {}: {e}",
                network.display()
            )));
        }
        _ => {}
    }
    drop(lock);
    store.remove_all()?;
    println!("reset done; the next `cluster-agent run` starts from the beginning");
    Ok(EXIT_OK)
}

fn confirm(paths: &[&std::path::PathBuf]) -> Result<bool, CliError> {
    if !std::io::stdin().is_terminal() {
        return Err(CliError::Usage(
            "reset needs --yes when not run interactively (or --dry-run to see what it does)"
                .into(),
        ));
    }
    for p in paths {
        println!("will remove {}", p.display());
    }
    print!("Proceed? [y/N] ");
    let _ = std::io::stdout().flush();
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .map_err(|e| CliError::Failed(format!("cannot read answer: {e}")))?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}
