//! The docs say what the code does: the step tables of
//! docs/architecture.md list exactly the steps the plans run, and the
//! command reference of docs/usage.md exactly the subcommands `--help`
//! lists. Either side changing alone fails here.

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

fn repo(file: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(file)).unwrap()
}

/// The first cell of every table row that is one backticked word.
fn table_keys(doc: &str, word: impl Fn(&str) -> Option<String>) -> BTreeSet<String> {
    doc.lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|rest| word(rest.split('`').next()?))
        .collect()
}

#[test]
fn every_step_the_plans_run_is_documented_and_no_other() {
    let out = Command::new(support::AGENT)
        .args([
            "--config-dir",
            "docs/example",
            "--json",
            "plan",
            "--all-nodes",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", support::text(&out));
    let plans: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let planned: BTreeSet<String> = plans
        .iter()
        .flat_map(|p| p["steps"].as_array().unwrap().iter())
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    // Step names are lower-case words joined by `-`; other tables of the
    // document name files and functions.
    let documented = table_keys(&repo("docs/architecture.md"), |w| {
        w.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            .then(|| w.to_string())
    });
    let undocumented: Vec<_> = planned.difference(&documented).collect();
    let stale: Vec<_> = documented.difference(&planned).collect();
    assert!(
        undocumented.is_empty() && stale.is_empty(),
        "docs/architecture.md lacks the steps {undocumented:?} and documents steps no plan runs: {stale:?}"
    );
}

#[test]
fn every_subcommand_is_in_the_command_reference_and_no_other() {
    let out = Command::new(support::AGENT).arg("--help").output().unwrap();
    assert!(out.status.success(), "{}", support::text(&out));
    let help = String::from_utf8(out.stdout).unwrap();
    let listed: BTreeSet<String> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect();
    assert!(listed.contains("run") && listed.contains("lab"), "{help}");
    let usage = repo("docs/usage.md");
    let reference =
        &usage[usage.find("## Commands").unwrap()..usage.find("### Global options").unwrap()];
    let documented = table_keys(reference, |cell| {
        cell.split_whitespace().next().map(str::to_string)
    });
    assert_eq!(
        documented, listed,
        "docs/usage.md's command table against `cluster-agent --help`"
    );
}
