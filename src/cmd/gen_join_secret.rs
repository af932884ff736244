use rand::TryRngCore;

use crate::cli::GenJoinSecretArgs;
use crate::config::JOIN_SECRET_FILE;
use crate::fsutil::{self, SECRET_MODE};
use crate::paths::HostPaths;

use super::{CliError, EXIT_OK};

pub const JOIN_SECRET_LEN: usize = 32;

pub fn gen_join_secret(paths: &HostPaths, args: &GenJoinSecretArgs) -> Result<i32, CliError> {
    let path = args
        .output
        .clone()
        .unwrap_or_else(|| paths.config_dir().join(JOIN_SECRET_FILE));
    if path.exists() && !args.force {
        return Err(CliError::Usage(format!(
            "{} already exists; nodes use it to join. Pass --force to replace it",
            path.display()
        )));
    }
    let mut secret = [0u8; JOIN_SECRET_LEN];
    rand::rngs::OsRng
        .try_fill_bytes(&mut secret)
        .map_err(|e| CliError::Failed(format!("no randomness from the OS: {e}")))?;
    fsutil::write_atomic(&path, &secret, SECRET_MODE)
        .map_err(|e| CliError::Failed(crate::error_chain(&e)))?;
    println!(
        "wrote {} ({JOIN_SECRET_LEN} bytes, mode 0600)",
        path.display()
    );
    Ok(EXIT_OK)
}
