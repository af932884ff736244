//! Ignition's own tools as judges: `ignition-validate`, built by
//! `.ci/setup` from the pinned module in tools/kube-bins/ignition.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

use super::{built_binary, text};

/// Ignition's own validator, the judge of every config. It exits 1 on an
/// error but 0 after printing a warning (an unknown key, say, which Ignition
/// on a node ignores), so a config passes only with exit 0 and nothing
/// printed.
pub struct Validator {
    program: PathBuf,
}

impl Validator {
    pub fn new() -> Validator {
        Validator {
            program: built_binary("ignition-validate"),
        }
    }

    /// What ignition-validate says about `config` (read from stdin).
    pub fn judge(&self, config: &[u8]) -> Output {
        let mut child = Command::new(&self.program)
            .arg("-")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", self.program.display()));
        child.stdin.take().unwrap().write_all(config).unwrap();
        child.wait_with_output().unwrap()
    }

    /// Everything ignition-validate objects to, warnings included: empty
    /// only for a config that passes.
    pub fn problems(&self, config: &[u8]) -> String {
        let out = self.judge(config);
        if out.status.success() && out.stdout.is_empty() && out.stderr.is_empty() {
            String::new()
        } else {
            text(&out)
        }
    }

    pub fn assert_valid(&self, what: &str, config: &[u8]) {
        let problems = self.problems(config);
        assert!(problems.is_empty(), "{what}: ignition-validate: {problems}");
        let config: Value = serde_json::from_slice(config).unwrap();
        assert_eq!(config["ignition"]["version"], "3.4.0", "{what}");
    }
}
