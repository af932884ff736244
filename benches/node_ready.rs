//! Cold start to every Node Ready: one master and two workers, each in its
//! own network namespace (`cluster-agent lab up --netns`), against the
//! same binaries started by a plain launcher, timed in the same run on the
//! same machine (release agent). A benchmark, not a timed test: it prints
//! a table, the medians and the ratio (target ≤ 1.2); it panics only when
//! a cluster does not come up.
//!
//! ```text
//! cargo bench --bench node_ready
//! ```
//!
//! * **agent**: `lab up` spawned → the first moment the API lists three
//!   Nodes, all Ready. Everything happens in that time: PKI, etcd, the
//!   control plane, the join service, the workers' join material and TLS
//!   bootstrap, containerd, pod CIDRs, CNI configs, routes. `lab up`'s own
//!   exit (kube-proxy too) is printed beside it.
//! * **plain**: what a hand-written script does on nodes provisioned in
//!   advance, as in Kubernetes the Hard Way: the certificates, kubeconfigs,
//!   the workers' kubelet client certificates and the CNI configs the agent
//!   made are kept, etcd's data, containerd's and the kubelet's state are
//!   wiped, and every daemon (etcd, kube-apiserver, controller-manager,
//!   scheduler, containerd, kubelets) is started at once with exactly the
//!   command line and environment of the unit the agent rendered, each in
//!   its node's namespace, and started again the moment it exits (as
//!   `Restart=always` without its delay: a kubelet exits while containerd
//!   is not up yet). Same poller, same criterion. It is a lower bound: it
//!   does no PKI, no etcd decision, no bootstrap and no ordering.
//!
//! The API is asked through the built kubectl every 50 ms, from inside the
//! master's namespace. `NODE_BENCH_RUNS` (default 3) runs. No Ceph monitor
//! runs: the plain launcher would start none.

#[path = "../tests/support/mod.rs"]
mod support;

#[path = "support/lab.rs"]
mod lab;

use std::path::Path;
use std::time::{Duration, Instant};

use lab::{Plain, median, ms, node_root, ratio};

const NODES: [&str; 3] = ["cp-1", "w-1", "w-2"];
/// What a node needs for its Node to be Ready.
const MASTER_DAEMONS: [&str; 6] = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "containerd",
    "kubelet",
];
const WORKER_DAEMONS: [&str; 2] = ["containerd", "kubelet"];

fn main() {
    let Some(runs) = lab::runs("node_ready", "NODE_BENCH_RUNS") else {
        return;
    };
    let (mut agent, mut plain) = (Vec::new(), Vec::new());
    for run in 0..runs {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("lab");
        let (ready, up, uids) = agent_cold_start(&dir);
        let baseline = plain_cold_start(&dir, &uids);
        lab::lab_down(&dir);
        println!(
            "run {run}: agent {:>7.0} ms to all Ready (lab up exits at {:>7.0} ms) | plain {:>7.0} ms | ratio {:.2}",
            ms(ready),
            ms(up),
            ms(baseline),
            ratio(ready, baseline)
        );
        agent.push(ready);
        plain.push(baseline);
    }
    let (a, p) = (median(agent), median(plain));
    println!(
        "median cold start to 3 Nodes Ready: agent {:>7.0} ms  plain {:>7.0} ms  ratio {:.2} (target ≤ 1.20: {})",
        ms(a),
        ms(p),
        ratio(a, p),
        if ratio(a, p) <= 1.2 { "met" } else { "not met" }
    );
}

/// The uids of the three Nodes once every one is Ready; `None` before.
fn ready_nodes(dir: &Path) -> Option<Vec<String>> {
    let out = lab::kubectl(dir, "cp-1", &["get", "nodes", "-o", "json"])?;
    let list = serde_json::from_slice::<serde_json::Value>(&out.stdout).ok()?;
    let items = list["items"].as_array().cloned().unwrap_or_default();
    let all_ready = items.len() == NODES.len()
        && items.iter().all(|n| {
            n["status"]["conditions"].as_array().is_some_and(|c| {
                c.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
        });
    all_ready.then(|| {
        items
            .iter()
            .map(|n| {
                n["metadata"]["uid"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            })
            .collect()
    })
}

fn agent_cold_start(dir: &Path) -> (Duration, Duration, Vec<String>) {
    let started = Instant::now();
    let mut up = lab::lab_up(
        dir,
        &["--masters", "1", "--workers", "2", "--ceph-mons", "0"],
    );
    let (ready, uids) = lab::wait("agent: three Nodes Ready", started, || ready_nodes(dir));
    let status = up.wait().unwrap();
    let exited = started.elapsed();
    assert!(
        status.success(),
        "lab up failed ({status}); see {}/*/agent.log",
        dir.display()
    );
    println!(
        "agent: slowest steps: {}",
        lab::slowest_steps(dir, &NODES, 6)
    );
    (ready, exited, uids)
}

/// Removes runtime state the plain launcher starts without; keeps what a
/// provisioned node has (certificates, kubeconfigs, configs, CNI config).
fn wipe_runtime_state(dir: &Path) {
    for node in NODES {
        let root = node_root(dir, node);
        let _ = cluster_agent::fsutil::unmount_under(&root.join("var/lib/kubelet"));
        for state in ["var/lib/etcd", "var/lib/containerd", "run/containerd"] {
            let _ = std::fs::remove_dir_all(root.join(state));
        }
        let kubelet = root.join("var/lib/kubelet");
        for entry in std::fs::read_dir(&kubelet).into_iter().flatten().flatten() {
            let name = entry.file_name();
            if name != "pki" && name != "config.yaml" {
                let path = entry.path();
                let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
            }
        }
    }
}

/// `before`: the agent's Nodes, which must not count (etcd was wiped, so
/// every Node the plain run sees Ready registered anew).
fn plain_cold_start(dir: &Path, before: &[String]) -> Duration {
    lab::kill_lab_daemons(dir, &NODES);
    wipe_runtime_state(dir);
    let daemons: Vec<(&str, &str)> = MASTER_DAEMONS
        .iter()
        .map(|d| ("cp-1", *d))
        .chain(
            ["w-1", "w-2"]
                .iter()
                .flat_map(|w| WORKER_DAEMONS.iter().map(move |d| (*w, *d))),
        )
        .collect();
    let started = Instant::now();
    let mut plain = Plain::start(dir, &daemons, Default::default());
    let (ready, ()) = lab::wait("plain: three fresh Nodes Ready", started, || {
        plain.tend();
        ready_nodes(dir)
            .is_some_and(|uids| uids.iter().all(|u| !before.contains(u)))
            .then_some(())
    });
    println!(
        "plain: {} daemon restart(s) before all Ready",
        plain.restarts
    );
    ready
}
