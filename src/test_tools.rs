//! For unit tests that check our output against a real program: find it or
//! fail, never pass without it.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

/// `name` as found on `PATH`. Panics, naming the Debian `package` that
/// ships it and `.ci/setup` (which installs it), when it is not there.
#[track_caller]
pub(crate) fn require_tool(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        });
    // Not in a closure, so the panic names the test's line.
    let Some(program) = found else {
        panic!(
            "`{name}` is not on PATH ({}) and this test needs it: run `.ci/setup` as root \
             (or `apt-get install {package}`)",
            path.to_string_lossy()
        )
    };
    program
}
