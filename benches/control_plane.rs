//! Cold start of the control plane: three masters, each in its own network
//! namespace (`cluster-agent lab up --netns --masters 3`), against the same
//! binaries with the same flags started by a plain launcher, timed in the
//! same run on the same machine (release agent). A benchmark, not a timed
//! test: it prints a table, the medians and the ratios (target ≤ 1.1); it
//! panics only when a control plane does not come up.
//!
//! ```text
//! cargo bench --bench control_plane
//! ```
//!
//! * **agent**: `lab up` spawned → the first master's kube-apiserver
//!   answers `/readyz`, and → all three masters' do (the last of them is
//!   the third master to be ready, whichever it is). In between: PKI,
//!   etcd founded by the first and joined as learners, promoted, by the
//!   others, the CA material through the join service, every component.
//! * **plain**: a static bootstrap, as a script does it: the certificates
//!   and configs the agent made are kept, etcd's data wiped, and etcd and
//!   kube-apiserver on all three masters started at once with the command
//!   lines and environment of the agent's units — except that every etcd
//!   gets the full `ETCD_INITIAL_CLUSTER` and state `new` (a static
//!   three-member bootstrap instead of the agent's learner joins). Each is
//!   started again the moment it exits. Same poller, same criterion.
//!
//! `/readyz` is asked through the built kubectl every 50 ms from inside
//! each master's namespace, at that master's own address.
//! `CONTROL_PLANE_BENCH_RUNS` (default 3) runs.

#[path = "../tests/support/mod.rs"]
mod support;

#[path = "support/lab.rs"]
mod lab;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use lab::{Plain, median, ms, node_root, ratio};

const MASTERS: [&str; 3] = ["cp-1", "cp-2", "cp-3"];
const ETCD_ENV: &str = "etc/etcd/etcd.env";

fn main() {
    let Some(runs) = lab::runs("control_plane", "CONTROL_PLANE_BENCH_RUNS") else {
        return;
    };
    let mut results: Vec<[Duration; 4]> = Vec::new();
    for run in 0..runs {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("lab");
        let (first, third) = agent_cold_start(&dir);
        let (plain_first, plain_third) = plain_cold_start(&dir);
        lab::lab_down(&dir);
        println!(
            "run {run}: first master ready: agent {:>6.0} ms, plain {:>6.0} ms ({:.2}) | all three: agent {:>6.0} ms, plain {:>6.0} ms ({:.2})",
            ms(first),
            ms(plain_first),
            ratio(first, plain_first),
            ms(third),
            ms(plain_third),
            ratio(third, plain_third)
        );
        results.push([first, plain_first, third, plain_third]);
    }
    let column = |i: usize| median(results.iter().map(|r| r[i]).collect());
    let verdict = |r: f64| if r <= 1.1 { "met" } else { "not met" };
    for (what, agent, plain) in [
        ("first master's /readyz", column(0), column(1)),
        ("all three masters' /readyz", column(2), column(3)),
    ] {
        println!(
            "median {what}: agent {:>6.0} ms  plain {:>6.0} ms  ratio {:.2} (target ≤ 1.10: {})",
            ms(agent),
            ms(plain),
            ratio(agent, plain),
            verdict(ratio(agent, plain))
        );
    }
}

/// The address a master's kube-apiserver advertises, from its unit.
fn api_address(dir: &Path, node: &str) -> String {
    let unit = std::fs::read_to_string(
        node_root(dir, node).join("etc/systemd/system/kube-apiserver.service"),
    )
    .unwrap_or_default();
    unit.split_whitespace()
        .find_map(|w| w.strip_prefix("--advertise-address="))
        .map(str::to_string)
        .unwrap_or_default()
}

/// `node`'s own kube-apiserver answers `/readyz` with `ok`.
fn ready(dir: &Path, node: &str) -> Option<()> {
    let address = api_address(dir, node);
    if address.is_empty() {
        return None;
    }
    let server = format!("--server=https://{address}:6443");
    let out = lab::kubectl(dir, node, &[&server, "get", "--raw", "/readyz"])?;
    (out.status.success() && out.stdout == b"ok").then_some(())
}

fn all_ready(dir: &Path) -> Option<()> {
    MASTERS.iter().try_for_each(|m| ready(dir, m))
}

fn agent_cold_start(dir: &Path) -> (Duration, Duration) {
    let started = Instant::now();
    let mut up = lab::lab_up(
        dir,
        &["--masters", "3", "--workers", "0", "--ceph-mons", "0"],
    );
    let (first, ()) = lab::wait("agent: cp-1's /readyz", started, || ready(dir, "cp-1"));
    let (third, ()) = lab::wait("agent: every master's /readyz", started, || all_ready(dir));
    let status = up.wait().unwrap();
    assert!(
        status.success(),
        "lab up failed ({status}); see {}/*/agent.log",
        dir.display()
    );
    println!(
        "agent: slowest steps: {}",
        lab::slowest_steps(dir, &MASTERS, 6)
    );
    (first, third)
}

fn env_var(dir: &Path, node: &str, name: &str) -> String {
    let path = node_root(dir, node).join(ETCD_ENV);
    let text = std::fs::read_to_string(&path).unwrap();
    cluster_agent::services::parse_env_file(&text, &path)
        .unwrap()
        .remove(name)
        .unwrap_or_else(|| panic!("{node}: {name} not in {}", path.display()))
}

fn plain_cold_start(dir: &Path) -> (Duration, Duration) {
    lab::kill_lab_daemons(dir, &MASTERS);
    let initial_cluster = MASTERS
        .iter()
        .map(|n| {
            format!(
                "{n}={}",
                env_var(dir, n, "ETCD_INITIAL_ADVERTISE_PEER_URLS")
            )
        })
        .collect::<Vec<_>>()
        .join(",");
    let static_bootstrap: BTreeMap<String, String> = [
        ("ETCD_INITIAL_CLUSTER", initial_cluster),
        ("ETCD_INITIAL_CLUSTER_STATE", "new".to_string()),
    ]
    .map(|(k, v)| (k.to_string(), v))
    .into();
    for node in MASTERS {
        let _ = std::fs::remove_dir_all(node_root(dir, node).join("var/lib/etcd"));
    }
    let daemons: Vec<(&str, &str)> = MASTERS
        .iter()
        .flat_map(|n| [(*n, "etcd"), (*n, "kube-apiserver")])
        .collect();
    let overrides = MASTERS
        .iter()
        .map(|n| (n.to_string(), static_bootstrap.clone()))
        .collect();
    let started = Instant::now();
    let mut plain = Plain::start(dir, &daemons, overrides);
    let (first, ()) = lab::wait("plain: cp-1's /readyz", started, || {
        plain.tend();
        ready(dir, "cp-1")
    });
    let (third, ()) = lab::wait("plain: every master's /readyz", started, || {
        plain.tend();
        all_ready(dir)
    });
    println!("plain: {} daemon restart(s)", plain.restarts);
    (first, third)
}
