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
//! master's namespace. `NODE_BENCH_RUNS` (default 3) runs.

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cluster_agent::services::{parse_unit, unit::read_env_file};

const NODES: [&str; 3] = ["cp-1", "w-1", "w-2"];
/// What a node needs for its Node to be Ready, in no particular order.
const DAEMONS: [&str; 6] = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "containerd",
    "kubelet",
];
const NETNS_PREFIX: &str = "calab-";
const POLL: Duration = Duration::from_millis(50);
const DEADLINE: Duration = Duration::from_secs(600);

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!(
            "node_ready: run with `cargo bench --bench node_ready` (root, .ci/setup's binaries)"
        );
        return;
    }
    let runs: usize = std::env::var("NODE_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let (mut agent, mut plain) = (Vec::new(), Vec::new());
    for run in 0..runs {
        let base = tempfile::tempdir().unwrap();
        let lab = base.path().join("lab");
        let (ready, up, uids) = agent_cold_start(&lab);
        let baseline = plain_cold_start(&lab, &uids);
        lab_down(&lab);
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

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn node_root(lab: &Path, node: &str) -> PathBuf {
    lab.join(node)
}

fn netns_arg(node: &str) -> String {
    format!("--net=/run/netns/{NETNS_PREFIX}{node}")
}

/// The uids of the three Nodes once every one is Ready, as the admin sees
/// them from the master; `None` before.
fn ready_nodes(lab: &Path) -> Option<Vec<String>> {
    let out = Command::new("nsenter")
        .arg(netns_arg("cp-1"))
        .arg("--")
        .arg(support::built_binary("kubectl"))
        .arg("--kubeconfig")
        .arg(node_root(lab, "cp-1").join("var/lib/cluster-state/admin.conf"))
        .args(["get", "nodes", "-o", "json", "--request-timeout=2s"])
        .stderr(Stdio::null())
        .output()
        .ok()?;
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

/// The steps that took longest on any node, from the journals.
fn slowest_steps(lab: &Path, count: usize) -> String {
    let mut steps: Vec<(Duration, String)> = Vec::new();
    for node in NODES {
        let store = cluster_agent::state::StateStore::new(
            &node_root(lab, node).join("var/lib/cluster-state"),
        );
        let Ok(Some(journal)) = store.load_journal() else {
            continue;
        };
        for step in journal.steps {
            if let (Some(start), Some(end)) = (step.started_at, step.finished_at) {
                let took = Duration::try_from(end - start).unwrap_or_default();
                steps.push((took, format!("{node} {}", step.name)));
            }
        }
    }
    steps.sort_by_key(|s| std::cmp::Reverse(s.0));
    steps
        .iter()
        .take(count)
        .map(|(d, s)| format!("{s} {:.0} ms", ms(*d)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn agent_cold_start(lab: &Path) -> (Duration, Duration, Vec<String>) {
    let started = Instant::now();
    let mut up = Command::new(support::AGENT)
        .args([
            "lab",
            "up",
            "--netns",
            "--masters",
            "1",
            "--workers",
            "2",
            "--dir",
        ])
        .arg(lab)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run cluster-agent lab up");
    let (ready, uids) = loop {
        if let Some(uids) = ready_nodes(lab) {
            break (started.elapsed(), uids);
        }
        assert!(
            started.elapsed() < DEADLINE,
            "agent: the Nodes were not Ready within {DEADLINE:?} (logs: {}/*/agent.log)",
            lab.display()
        );
        std::thread::sleep(POLL);
    };
    let status = up.wait().unwrap();
    let exited = started.elapsed();
    assert!(
        status.success(),
        "lab up failed ({status}); see {}/*/agent.log",
        lab.display()
    );
    println!("agent: slowest steps: {}", slowest_steps(lab, 6));
    (ready, exited, uids)
}

/// Every process the lab's process backend started, by its pid files.
fn kill_lab_daemons(lab: &Path) {
    for node in NODES {
        let run = node_root(lab, node).join("run/cluster-agent");
        for entry in std::fs::read_dir(&run).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "pid")
                && let Some(pid) = std::fs::read_to_string(&path)
                    .ok()
                    .and_then(|t| t.split_whitespace().next()?.parse::<i32>().ok())
            {
                // Each daemon leads its own process group (setsid).
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                wait_gone(pid);
            }
        }
    }
}

fn wait_gone(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        // Reaped by lab up's children or by init; /proc tells.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.split_whitespace().nth(2) == Some("Z") {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Removes runtime state the plain launcher starts without; keeps what a
/// provisioned node has (certificates, kubeconfigs, configs, CNI config).
fn wipe_runtime_state(lab: &Path) {
    for node in NODES {
        let root = node_root(lab, node);
        let _ = cluster_agent::fsutil::unmount_under(&root.join("var/lib/kubelet"));
        for dir in ["var/lib/etcd", "var/lib/containerd", "run/containerd"] {
            let _ = std::fs::remove_dir_all(root.join(dir));
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

/// `nsenter` into the node's namespace, then the unit's command line with
/// its environment (EnvironmentFile= over Environment=, as systemd).
fn launch(lab: &Path, node: &str, daemon: &str) -> Option<Child> {
    let root = node_root(lab, node);
    let path = root.join(format!("etc/systemd/system/{daemon}.service"));
    let text = std::fs::read_to_string(&path).ok()?;
    let unit = parse_unit(&format!("{daemon}.service"), &text, &path).unwrap();
    let mut env = unit.service.environment.clone();
    if let Some(file) = &unit.service.environment_file {
        env.extend(read_env_file(file).unwrap());
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(root.join(format!("plain-{daemon}.log")))
        .unwrap();
    let child = Command::new("nsenter")
        .arg(netns_arg(node))
        .arg("--")
        .args(&unit.service.exec_start)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .envs(env)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("start {daemon} on {node}: {e}"));
    Some(child)
}

/// `before`: the agent's Nodes, which must not count (etcd was wiped, so
/// every Node the plain run sees Ready registered anew).
fn plain_cold_start(lab: &Path, before: &[String]) -> Duration {
    kill_lab_daemons(lab);
    wipe_runtime_state(lab);
    let started = Instant::now();
    let mut daemons: Vec<(&str, &str, Child)> = NODES
        .iter()
        .flat_map(|node| {
            DAEMONS
                .iter()
                .filter_map(move |d| launch(lab, node, d).map(|c| (*node, *d, c)))
        })
        .collect();
    assert_eq!(
        daemons.len(),
        DAEMONS.len() + 2 * 2,
        "every daemon's unit was rendered"
    );
    let mut restarts = 0;
    let ready = loop {
        for (node, daemon, child) in &mut daemons {
            if child.try_wait().unwrap().is_some() {
                *child = launch(lab, node, daemon).expect("rendered before");
                restarts += 1;
            }
        }
        if ready_nodes(lab).is_some_and(|uids| uids.iter().all(|u| !before.contains(u))) {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < DEADLINE,
            "plain: the Nodes were not Ready within {DEADLINE:?} (logs: {}/*/plain-*.log)",
            lab.display()
        );
        std::thread::sleep(POLL);
    };
    println!("plain: {restarts} daemon restart(s) before all Ready");
    for (_, _, child) in &mut daemons {
        let _ = child.kill();
        let _ = child.wait();
    }
    ready
}

fn lab_down(lab: &Path) {
    let out = Command::new(support::AGENT)
        .args(["lab", "down", "--dir"])
        .arg(lab)
        .output()
        .unwrap();
    assert!(out.status.success(), "lab down: {}", support::text(&out));
}
