use crate::cli::GlobalArgs;
use crate::config::{self, ConfigError};
use crate::paths::HostPaths;

use super::{CliError, EXIT_OK, EXIT_USAGE, print_json};

pub fn validate(global: &GlobalArgs, paths: &HostPaths) -> Result<i32, CliError> {
    match config::load(paths.config_dir()) {
        Ok(cfg) => {
            if global.json {
                print_json(&serde_json::json!({
                    "valid": true,
                    "nodes": cfg.nodes.len(),
                    "warnings": cfg.warnings,
                }));
            } else {
                for w in &cfg.warnings {
                    eprintln!("{w}");
                }
                println!(
                    "{}: valid ({} nodes, {} warning(s))",
                    paths.config_dir().display(),
                    cfg.nodes.len(),
                    cfg.warnings.len()
                );
            }
            Ok(EXIT_OK)
        }
        Err(ConfigError::Invalid { report, .. }) if global.json => {
            print_json(&serde_json::json!({
                "valid": false,
                "errors": report.errors,
                "warnings": report.warnings,
            }));
            Ok(EXIT_USAGE)
        }
        Err(e) => Err(e.into()),
    }
}
