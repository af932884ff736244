//! What the Kubernetes benches share: a `cluster-agent lab up --netns`
//! cluster, questions asked from inside a node's namespace, and the plain
//! launcher that starts the daemons from the units the agent rendered.
#![allow(dead_code)] // each bench uses a different part of it

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use cluster_agent::services::{parse_unit, unit::read_env_file};

use super::support;

pub const NETNS_PREFIX: &str = "calab-";
pub const POLL: Duration = Duration::from_millis(50);
pub const DEADLINE: Duration = Duration::from_secs(600);

/// How many runs a bench makes (`env`, default 3), or `None` when cargo
/// merely builds or lists benches (no `--bench` argument).
pub fn runs(bench: &str, env: &str) -> Option<usize> {
    if !std::env::args().any(|a| a == "--bench") {
        println!("{bench}: run with `cargo bench --bench {bench}` (root, .ci/setup's binaries)");
        return None;
    }
    Some(
        std::env::var(env)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3),
    )
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64()
}

pub fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

pub fn node_root(lab: &Path, node: &str) -> PathBuf {
    lab.join(node)
}

/// The built kubectl as the lab's admin, run in `node`'s namespace.
pub fn kubectl(lab: &Path, node: &str, args: &[&str]) -> Option<Output> {
    Command::new("nsenter")
        .arg(format!("--net=/run/netns/{NETNS_PREFIX}{node}"))
        .arg("--")
        .arg(support::built_binary("kubectl"))
        .arg("--kubeconfig")
        .arg(node_root(lab, "cp-1").join("var/lib/cluster-state/admin.conf"))
        .args(args)
        .arg("--request-timeout=2s")
        .stderr(Stdio::null())
        .output()
        .ok()
}

/// `cluster-agent lab up --netns` with `args`, from spawn to exit.
pub fn lab_up(lab: &Path, args: &[&str]) -> Child {
    Command::new(support::AGENT)
        .args(["lab", "up", "--netns", "--dir"])
        .arg(lab)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run cluster-agent lab up")
}

/// [`lab_up`] to success, with how long it took printed.
pub fn lab_up_ok(lab: &Path, args: &[&str]) {
    let started = Instant::now();
    let status = lab_up(lab, args).wait().unwrap();
    assert!(
        status.success(),
        "lab up failed ({status}); see {}/*/agent.log",
        lab.display()
    );
    println!("lab up: {:.0} ms", ms(started.elapsed()));
}

/// A count from the environment variable `env`, else `default`.
pub fn count(env: &str, default: usize) -> usize {
    std::env::var(env)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn lab_down(lab: &Path) {
    let out = Command::new(support::AGENT)
        .args(["lab", "down", "--dir"])
        .arg(lab)
        .output()
        .unwrap();
    assert!(out.status.success(), "lab down: {}", support::text(&out));
}

/// Polls `done` every [`POLL`] until it answers, within [`DEADLINE`].
pub fn wait<T>(what: &str, started: Instant, mut done: impl FnMut() -> Option<T>) -> (Duration, T) {
    loop {
        if let Some(value) = done() {
            return (started.elapsed(), value);
        }
        assert!(
            started.elapsed() < DEADLINE,
            "{what}: not within {DEADLINE:?}"
        );
        std::thread::sleep(POLL);
    }
}

/// The steps that took longest on `nodes`, from their journals.
pub fn slowest_steps(lab: &Path, nodes: &[&str], count: usize) -> String {
    let mut steps: Vec<(Duration, String)> = Vec::new();
    for node in nodes {
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

/// Kills every process the lab's process backend started on `nodes`, by
/// their pid files (each leads its own process group).
pub fn kill_lab_daemons(lab: &Path, nodes: &[&str]) {
    for node in nodes {
        let run = node_root(lab, node).join("run/cluster-agent");
        for entry in std::fs::read_dir(&run).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "pid") {
                kill_pid_file(&path);
            }
        }
    }
}

/// `node` loses power: its link goes silent (nothing answers, nothing is
/// reset) and every daemon dies.
pub fn power_cut(lab: &Path, node: &str) {
    let out = Command::new("ip")
        .args([
            "-n",
            &format!("{NETNS_PREFIX}{node}"),
            "link",
            "set",
            "eth0",
            "down",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", support::text(&out));
    kill_lab_daemons(lab, &[node]);
}

/// Kills one unit the lab's process backend started on `node`.
pub fn kill_unit(lab: &Path, node: &str, unit: &str) {
    signal_unit(lab, node, unit, nix::sys::signal::Signal::SIGKILL);
}

/// Sends `signal` to the process group of a unit the lab's process backend
/// started on `node` and waits until it is gone (SIGTERM: as systemd stops
/// it).
pub fn signal_unit(lab: &Path, node: &str, unit: &str, signal: nix::sys::signal::Signal) {
    signal_pid_file(
        &node_root(lab, node)
            .join("run/cluster-agent")
            .join(format!("{unit}.pid")),
        signal,
    );
}

fn kill_pid_file(path: &Path) {
    signal_pid_file(path, nix::sys::signal::Signal::SIGKILL);
}

/// Signals the process group a pid file names and waits until it is gone.
fn signal_pid_file(path: &Path, signal: nix::sys::signal::Signal) {
    if let Some(pid) = std::fs::read_to_string(path)
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<i32>().ok())
    {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), signal);
        wait_gone(pid);
    }
}

fn wait_gone(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // Gone, or a zombie its parent has yet to reap.
            Err(_) => return,
            Ok(stat) if stat.split_whitespace().nth(2) == Some("Z") => return,
            Ok(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// The daemons of a plain launch, each started again the moment it exits
/// (as `Restart=always` would, without its delay).
pub struct Plain<'a> {
    lab: &'a Path,
    daemons: Vec<(String, String, Child)>,
    overrides: BTreeMap<String, BTreeMap<String, String>>,
    pub restarts: usize,
}

impl<'a> Plain<'a> {
    /// Starts `daemons` of every node at once; `overrides` replaces
    /// environment variables of a node's daemons (by node name).
    pub fn start(
        lab: &'a Path,
        daemons: &[(&str, &str)],
        overrides: BTreeMap<String, BTreeMap<String, String>>,
    ) -> Plain<'a> {
        let mut plain = Plain {
            lab,
            daemons: Vec::new(),
            overrides,
            restarts: 0,
        };
        for (node, daemon) in daemons {
            let child = plain.launch(node, daemon);
            plain
                .daemons
                .push((node.to_string(), daemon.to_string(), child));
        }
        plain
    }

    /// Restarts whatever exited.
    pub fn tend(&mut self) {
        for i in 0..self.daemons.len() {
            if self.daemons[i].2.try_wait().unwrap().is_some() {
                let (node, daemon) = (self.daemons[i].0.clone(), self.daemons[i].1.clone());
                self.daemons[i].2 = self.launch(&node, &daemon);
                self.restarts += 1;
            }
        }
    }

    /// `nsenter` into the node's namespace, then the unit's command line
    /// with its environment (EnvironmentFile= over Environment=, as
    /// systemd), then the overrides.
    fn launch(&self, node: &str, daemon: &str) -> Child {
        let root = node_root(self.lab, node);
        let path = root.join(format!("etc/systemd/system/{daemon}.service"));
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{node}: the agent rendered no {daemon} unit: {e}"));
        let unit = parse_unit(&format!("{daemon}.service"), &text, &path).unwrap();
        let mut env = unit.service.environment.clone();
        if let Some(file) = &unit.service.environment_file {
            env.extend(read_env_file(file).unwrap());
        }
        env.extend(self.overrides.get(node).cloned().unwrap_or_default());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(root.join(format!("plain-{daemon}.log")))
            .unwrap();
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{NETNS_PREFIX}{node}"))
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
            .unwrap_or_else(|e| panic!("start {daemon} on {node}: {e}"))
    }
}

impl Drop for Plain<'_> {
    fn drop(&mut self) {
        for (_, _, child) in &mut self.daemons {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// HTTPS requests from a thread that lives in a node's network namespace.
pub struct InNamespace {
    namespace: PathBuf,
    pub ca: String,
    timeout: Duration,
}

impl InNamespace {
    pub fn new(node: &str, ca: &str, timeout: Duration) -> InNamespace {
        InNamespace {
            namespace: PathBuf::from(format!("/run/netns/{NETNS_PREFIX}{node}")),
            ca: ca.to_string(),
            timeout,
        }
    }

    /// Runs `body` on a fresh thread moved into the namespace, with a
    /// current-thread runtime and a client pinned to the cluster CA.
    pub fn run<T: Send + 'static>(
        &self,
        body: impl FnOnce(reqwest::Client) -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>>
        + Send
        + 'static,
    ) -> T {
        let namespace = self.namespace.clone();
        let ca = self.ca.clone();
        let timeout = self.timeout;
        std::thread::spawn(move || {
            let file = std::fs::File::open(&namespace).unwrap();
            nix::sched::setns(
                std::os::fd::AsFd::as_fd(&file),
                nix::sched::CloneFlags::CLONE_NEWNET,
            )
            .expect("enter the node's network namespace");
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let client = cluster_agent::k8s::pinned_client(&ca, timeout).unwrap();
            runtime.block_on(body(client))
        })
        .join()
        .unwrap()
    }
}

impl InNamespace {
    /// `GET` of `a` and `b` in turn, `n` times each, each on its own
    /// kept-alive connection (warmed first): the two series of latencies.
    pub fn latencies(&self, a: &str, b: &str, n: usize) -> (Vec<Duration>, Vec<Duration>) {
        let (a, b) = (a.to_string(), b.to_string());
        self.run(move |client| {
            Box::pin(async move {
                let time = |url: String| {
                    let client = client.clone();
                    async move {
                        let started = Instant::now();
                        let answer = client.get(&url).send().await.expect("GET");
                        assert!(answer.status().is_success(), "{url}: {}", answer.status());
                        answer.bytes().await.unwrap();
                        started.elapsed()
                    }
                };
                time(a.clone()).await;
                time(b.clone()).await;
                let (mut first, mut second) = (Vec::new(), Vec::new());
                for _ in 0..n {
                    first.push(time(a.clone()).await);
                    second.push(time(b.clone()).await);
                }
                (first, second)
            })
        })
    }
}

pub fn percentile(times: &[Duration], p: usize) -> Duration {
    let mut sorted = times.to_vec();
    sorted.sort();
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}
