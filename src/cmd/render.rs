use std::path::{Path, PathBuf};

use crate::cli::{GlobalArgs, RenderCommand};
use crate::fsutil::{self, SECRET_MODE};
use crate::paths::HostPaths;
use crate::provision::{BootSource, Bundle, ProvisionError, ignition};

use super::{CliError, EXIT_OK};

/// An invalid configuration or a missing secret is the operator's to fix
/// (exit 2); only a failed write is a runtime failure.
pub(super) fn cli_error(e: ProvisionError) -> CliError {
    match e {
        ProvisionError::Config(e) => CliError::Config(e),
        ProvisionError::Write(e) => CliError::Failed(crate::error_chain(&e)),
        other => CliError::Usage(crate::error_chain(&other)),
    }
}

fn report(written: &[PathBuf]) {
    for path in written {
        println!("wrote {}", path.display());
    }
}

pub fn render(
    global: &GlobalArgs,
    paths: &HostPaths,
    command: &RenderCommand,
) -> Result<i32, CliError> {
    match command {
        RenderCommand::Ignition(args) => {
            let bundle = Bundle::load(paths.config_dir()).map_err(cli_error)?;
            if let Some(dir) = args.output_dir.as_deref().filter(|_| args.all_nodes) {
                report(&bundle.write_ignition_all(dir).map_err(cli_error)?);
                return Ok(EXIT_OK);
            }
            let name = global.node.as_deref().ok_or_else(|| {
                CliError::Usage(
                    "render ignition needs --node NAME, or --all-nodes --output-dir DIR".into(),
                )
            })?;
            let node = bundle.node(name).map_err(cli_error)?;
            let json = ignition::to_json(&bundle.ignition(node));
            if args.output == Path::new("-") {
                print!("{json}");
            } else {
                fsutil::write_atomic(&args.output, json.as_bytes(), SECRET_MODE)
                    .map_err(|e| cli_error(e.into()))?;
                report(std::slice::from_ref(&args.output));
            }
        }
        RenderCommand::Matchbox(args) => {
            let source = BootSource::new(&args.matchbox_url, &args.kernel, &args.initrd)
                .map_err(|e| cli_error(e.into()))?;
            let bundle = Bundle::load(paths.config_dir()).map_err(cli_error)?;
            report(
                &bundle
                    .write_matchbox(&args.output_dir, &source)
                    .map_err(cli_error)?,
            );
        }
    }
    Ok(EXIT_OK)
}
