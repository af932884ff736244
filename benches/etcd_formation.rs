//! How much time the agent adds to etcd's own start-up, per step and for a
//! whole 3-member formation. A benchmark, not a timed test: it prints a table
//! and whether the target (agent overhead ≤ 10 % over etcd's own times) is
//! met; it panics only when a formation itself fails.
//!
//! Run as root (network namespaces), with etcd built by `.ci/setup` (the
//! harness links it into every node's `/opt/bin`):
//!
//! ```text
//! cargo bench --bench etcd_formation
//! ```
//!
//! `cargo bench` builds the `cluster-agent` binary with the bench profile
//! (release) before this target — Cargo builds a package's binaries for its
//! integration tests and benches and sets `CARGO_BIN_EXE_cluster-agent` for
//! them — so `tests/support`'s `AGENT` is the freshly built release agent.
//! `cargo bench --bench etcd_formation --no-run` only builds. Without the
//! `--bench` argument `cargo bench` passes (e.g. `cargo test
//! --all-targets`) the target prints how to run it and exits.
//!
//! Settings (environment): `ETCD_BENCH_RUNS` (default 5, plus one warm-up
//! run that is not counted), `ETCD_BENCH_POLL_MS` (own poller interval,
//! default 3), `ETCD_BENCH_KEEP_LOGS=<dir>` (copy the last run's etcd logs,
//! agent stderr and journals there), `ETCD_BENCH_AGENT_LOG=<filter>`
//! (`RUST_LOG` for the agents, e.g. `debug` to see every connection).
//!
//! Scenarios, each on fresh nodes in their own network namespaces
//! (`Cluster::isolated`, as `tests/etcd_formation.rs`):
//! 1. master-first: cp-1's agent alone founds the cluster;
//! 2. learner join: then cp-2's agent joins it (learner → promoted);
//! 3. all three agents started together, spawn → last agent exit.
//!
//! 1+2 run once more without the own poller, to show it does not distort
//! the agent's times (there, etcd's own log is the reference).
//!
//! What is stamped, on the wall clock (the journal's clock):
//!
//! * **etcd exec** — the process backend writes the pid file right after
//!   `spawn()` returned, and `spawn()` returns once etcd's `exec` succeeded
//!   (std waits on a CLOEXEC pipe). The write is atomic: a temp file
//!   `.etcd.service.pid.tmp-<pid>` is created, fsynced, renamed. An inotify
//!   watch on the pid directory stamps the *creation* of that temp file
//!   (blocking read, no polling tick). Checks printed: the fork, from
//!   `/proc/<pid>/stat` (10 ms ticks), comes a few ms before the stamp;
//!   etcd's own first log line (µs) ~10–20 ms after it (Go runtime start).
//!   The rename is later by an fsync, hence not used.
//! * **etcd ready (own)** — a poller of the bench, on a thread that has
//!   entered cp-1's namespace (`setns`; a current-thread runtime, so its
//!   sockets are created there), asks every `ETCD_BENCH_POLL_MS` for etcd's
//!   status through a fresh TLS client with the healthcheck-client
//!   certificate the agent issued. Ready = the first answer naming a leader,
//!   the criterion of the agent's `etcd-start` (`local_member_with_leader`).
//!   etcd listens early but serves its client port only once ready, so
//!   a handshake pending then completes the moment etcd serves. Checked
//!   against etcd's own log line "serving client traffic securely" (ms).
//! * **member started / voter (own)** — for a joiner, the same poller asks
//!   the founder for the member list: "started" once the leader has applied
//!   the learner's publish entry, i.e. the learner has replicated the log up
//!   to then and can be promoted (etcd's in-sync check); "voter" once the
//!   promotion is applied.
//! * **agent observed** — the journal's `finished_at` of `etcd-start`
//!   (founder) or `etcd-promote` (joiner): when the agent concluded the step
//!   after recording what it saw. Its exit is later by unrelated steps and
//!   shutdown; printed, not used for the ratio.
//!
//! Overhead = (agent observed − etcd ready) / (etcd ready − etcd exec). For
//! the learner, "etcd ready" is reported both as "promotable" (listed as
//! started) and as the learner's own READY (it serves clients: it learns
//! the commit index one heartbeat later). For scenario 3 the wall time is
//! cut along the critical path into etcd's start-ups, etcd's strict
//! reconfiguration rule (no member add until the leader has been connected
//! to every voter for 5 s; the connection time is the leader's "peer became
//! active" log line) and the agent's share: everything else.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::os::fd::AsFd;
use std::process::{Child, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use support::{Cluster, text};

const MASTERS: &[(&str, &[&str])] = &[
    ("cp-1", &["control-plane"]),
    ("cp-2", &["control-plane"]),
    ("cp-3", &["control-plane"]),
];
const FOUNDER: &str = "cp-1";
const TARGET: f64 = 10.0;
/// etcd's `HealthInterval`: with the strict reconfiguration check (on by
/// default) a member is added only when the leader has been connected to
/// every voting member for this long.
const ETCD_HEALTH_INTERVAL: Duration = Duration::from_secs(5);
/// Seconds a whole run may take before the bench gives up on it.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("etcd_formation: a benchmark; run it with `cargo bench --bench etcd_formation`");
        return;
    }
    preflight();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runs = env_number("ETCD_BENCH_RUNS", 5).max(1) as usize;
    let poll = Duration::from_millis(env_number("ETCD_BENCH_POLL_MS", 3).max(1));
    println!(
        "etcd formation bench: {runs} runs (+1 warm-up) per scenario, own poller every {poll:?}, agent {}",
        support::AGENT
    );

    let mut founders = Vec::new();
    let mut learners = Vec::new();
    for run in 0..=runs {
        let (founder, learner) = founder_then_learner(poll, true);
        println!("  [1+2] {}: {founder}; {learner}", tag(run));
        if run > 0 {
            founders.push(founder);
            learners.push(learner);
        }
    }
    // The same without the own poller: the agent's times alone, to see
    // whether the poller's load on etcd and the CPUs shifts them.
    let mut unpolled = Vec::new();
    for run in 1..=runs {
        let (founder, learner) = founder_then_learner(poll, false);
        println!(
            "  [1+2, no poller] {}: founder agent {:.1} ms, learner agent {:.1} ms",
            tag(run),
            founder.agent,
            learner.agent
        );
        unpolled.push((founder, learner));
    }
    let mut formations = Vec::new();
    for run in 0..=runs {
        let f = three_together(poll);
        println!("  [3] {}: {}", tag(run), f.timeline);
        if run > 0 {
            formations.push(f);
        }
    }
    report(&founders, &learners, &unpolled, &formations);
}

fn tag(run: usize) -> String {
    if run == 0 {
        "warm-up".to_string()
    } else {
        format!("run {run}")
    }
}

fn preflight() {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root (the nodes run in network namespaces)".to_string());
    }
    let etcd = support::built_bin_dir().join("etcd");
    if !etcd.is_file() {
        missing.push(format!("{} (run .ci/setup)", etcd.display()));
    }
    if !std::path::Path::new("/usr/sbin/ip").exists() {
        missing.push("/usr/sbin/ip (apt-get install iproute2)".to_string());
    }
    if !missing.is_empty() {
        eprintln!(
            "etcd_formation bench: cannot run here; it needs {}",
            missing.join(", ")
        );
        std::process::exit(2);
    }
}

fn env_number(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

// ---------------------------------------------------------------- events

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Ev {
    /// The agent created the temp pid file: etcd has been exec'd.
    EtcdExec,
    /// The pid file is in place (after the agent's fsync and rename).
    PidFile,
    /// etcd answers its status with a leader (own poller).
    EtcdReady,
    /// The founder lists the member as started (own poller).
    MemberStarted,
    /// The founder lists the member as a voter (own poller).
    MemberVoter,
    /// The agent process exited.
    AgentExit,
}

/// First instant of every (node, event), on the wall clock (the journal's
/// clock).
#[derive(Default)]
struct Events(Mutex<HashMap<(String, Ev), SystemTime>>);

impl Events {
    fn mark(&self, node: &str, ev: Ev) {
        let now = SystemTime::now();
        self.0
            .lock()
            .unwrap()
            .entry((node.to_string(), ev))
            .or_insert(now);
    }

    fn get(&self, node: &str, ev: Ev) -> Option<SystemTime> {
        self.0.lock().unwrap().get(&(node.to_string(), ev)).copied()
    }

    fn need(&self, node: &str, ev: Ev) -> SystemTime {
        self.get(node, ev)
            .unwrap_or_else(|| panic!("{node}: {ev:?} was never observed"))
    }
}

/// Stamps, per node, the creation of etcd's temp pid file (≈ exec) and the
/// rename into place. Blocks in `read()` on inotify, so the stamp is taken
/// on wake-up, not on a polling tick. Ends when every node's pid file is in
/// place, or when the watched directories go away (the cluster is dropped).
fn watch_etcd_exec(c: &Cluster, nodes: &[&str], events: Arc<Events>) -> JoinHandle<()> {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC).expect("inotify");
    let mut by_wd = HashMap::new();
    for node in nodes {
        // The agent's create_dir_all accepts an existing directory.
        let dir = c.root(node).join("run/cluster-agent");
        std::fs::create_dir_all(&dir).unwrap();
        let wd = inotify
            .add_watch(
                &dir,
                AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_ONLYDIR,
            )
            .expect("inotify watch");
        by_wd.insert(wd, node.to_string());
    }
    std::thread::spawn(move || {
        let mut open = by_wd.len();
        let mut placed = 0;
        while open > 0 && placed < by_wd.len() {
            let Ok(batch) = inotify.read_events() else {
                return;
            };
            for e in batch {
                let Some(node) = by_wd.get(&e.wd) else {
                    continue;
                };
                if e.mask.contains(AddWatchFlags::IN_IGNORED) {
                    open -= 1;
                    continue;
                }
                let name = e.name.as_ref().map(|n| n.to_string_lossy().into_owned());
                match name.as_deref() {
                    Some(n) if n.starts_with(".etcd.service.pid.tmp-") => {
                        events.mark(node, Ev::EtcdExec)
                    }
                    Some("etcd.service.pid") if e.mask.contains(AddWatchFlags::IN_MOVED_TO) => {
                        if events.get(node, Ev::PidFile).is_none() {
                            placed += 1;
                        }
                        events.mark(node, Ev::PidFile);
                    }
                    _ => {}
                }
            }
        }
    })
}

/// etcd's start as `/proc/<pid>/stat` has it (10 ms ticks), from the pid
/// file the agent wrote: a cross-check of the inotify stamp.
fn proc_start(c: &Cluster, node: &str) -> Option<SystemTime> {
    let text =
        std::fs::read_to_string(c.root(node).join("run/cluster-agent/etcd.service.pid")).ok()?;
    let ticks: u64 = text.split_whitespace().nth(1)?.parse().ok()?;
    let since_boot = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).ok()?;
    let since_boot = Duration::from(since_boot);
    // USER_HZ is 100 on every Linux architecture the agent targets.
    let boot = SystemTime::now() - since_boot;
    Some(boot + Duration::from_millis(ticks * 10))
}

// ---------------------------------------------------------------- pollers

/// The etcd client files the agent issued to `node` (healthcheck client).
#[derive(Clone)]
struct ClientFiles {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl ClientFiles {
    async fn connect(&self, url: &str) -> Result<Client, etcd_client::Error> {
        let options = ConnectOptions::new()
            .with_tls(
                TlsOptions::new()
                    .ca_certificate(Certificate::from_pem(self.ca.clone()))
                    .identity(Identity::from_pem(self.cert.clone(), self.key.clone())),
            )
            .with_connect_timeout(Duration::from_secs(10))
            .with_timeout(Duration::from_secs(10));
        Client::connect([url], Some(options)).await
    }
}

/// What one poller thread watches.
struct PollPlan {
    /// Namespace the thread enters.
    netns: String,
    /// (node, client URL): polled for a status with a leader, once the node's
    /// etcd has been exec'd.
    ready: Vec<(String, String)>,
    /// Founder's client URL, and the joiners (name, peer URL) to follow in
    /// its member list until each is a voter.
    members: Option<(String, Vec<(String, String)>)>,
    /// Certificates: this node's, available once its etcd was exec'd.
    certs_of: String,
}

struct Poller {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl Poller {
    fn finish(self) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("poller thread");
    }
}

fn start_poller(c: &Cluster, plan: PollPlan, events: Arc<Events>, every: Duration) -> Poller {
    let stop = Arc::new(AtomicBool::new(false));
    let cert_dir_root = c.root(&plan.certs_of);
    let certs_of = plan.certs_of.clone();
    let thread = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let ns = std::fs::File::open(format!("/run/netns/{}", plan.netns))
                .expect("the node's namespace");
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("setns into the node's namespace");
            // Current-thread runtime: every socket is created on this thread,
            // hence in the namespace it has entered.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let stopped = || stop.load(Ordering::SeqCst);
                while events.get(&certs_of, Ev::EtcdExec).is_none() && !is_running(&cert_dir_root) {
                    if stopped() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                let files = load_files(&cert_dir_root);
                let mut tasks = Vec::new();
                for (node, url) in plan.ready.clone() {
                    let files = files.clone();
                    let events = events.clone();
                    let stop = stop.clone();
                    tasks.push(tokio::spawn(async move {
                        poll_ready(&files, &node, &url, &events, &stop, every).await
                    }));
                }
                if let Some((url, joiners)) = plan.members.clone() {
                    let files = files.clone();
                    let events = events.clone();
                    let stop = stop.clone();
                    tasks.push(tokio::spawn(async move {
                        poll_members(&files, &url, &joiners, &events, &stop, every).await
                    }));
                }
                for t in tasks {
                    let _ = t.await;
                }
            });
        })
    };
    Poller { stop, thread }
}

/// Whether `root`'s etcd was already running when the poller started.
fn is_running(root: &std::path::Path) -> bool {
    root.join("run/cluster-agent/etcd.service.pid").exists()
}

fn load_files(root: &std::path::Path) -> ClientFiles {
    let pki = root.join("etc/kubernetes/pki/etcd");
    let read =
        |f: &str| std::fs::read(pki.join(f)).expect("the agent issued its etcd certificates");
    ClientFiles {
        ca: read("ca.crt"),
        cert: read("healthcheck-client.crt"),
        key: read("healthcheck-client.key"),
    }
}

async fn poll_ready(
    files: &ClientFiles,
    node: &str,
    url: &str,
    events: &Events,
    stop: &AtomicBool,
    every: Duration,
) {
    while !stop.load(Ordering::SeqCst) {
        if let Ok(mut client) = files.connect(url).await {
            while !stop.load(Ordering::SeqCst) {
                match client.status().await {
                    Ok(s) if s.leader() != 0 => {
                        events.mark(node, Ev::EtcdReady);
                        return;
                    }
                    Ok(_) => tokio::time::sleep(every).await,
                    // A fresh client next time: no reconnect backoff of the
                    // channel between us and the first answer.
                    Err(_) => break,
                }
            }
        }
        tokio::time::sleep(every).await;
    }
}

async fn poll_members(
    files: &ClientFiles,
    url: &str,
    joiners: &[(String, String)],
    events: &Events,
    stop: &AtomicBool,
    every: Duration,
) {
    let voters = || {
        joiners
            .iter()
            .all(|(n, _)| events.get(n, Ev::MemberVoter).is_some())
    };
    while !stop.load(Ordering::SeqCst) && !voters() {
        if let Ok(mut client) = files.connect(url).await {
            while !stop.load(Ordering::SeqCst) && !voters() {
                let Ok(list) = client.member_list().await else {
                    break;
                };
                for m in list.members() {
                    let Some((name, _)) = joiners
                        .iter()
                        .find(|(_, peer)| m.peer_urls().iter().any(|u| u == peer))
                    else {
                        continue;
                    };
                    if !m.name().is_empty() {
                        events.mark(name, Ev::MemberStarted);
                    }
                    if !m.is_learner() {
                        events.mark(name, Ev::MemberVoter);
                    }
                }
                tokio::time::sleep(every).await;
            }
        }
        tokio::time::sleep(every).await;
    }
}

// ---------------------------------------------------------------- agents

fn node_ip(c: &Cluster, node: &str) -> String {
    c.nodes.iter().find(|n| n.name == node).unwrap().ip.clone()
}

fn client_url(c: &Cluster, node: &str) -> String {
    format!("https://{}:2379", node_ip(c, node))
}

fn peer_url(c: &Cluster, node: &str) -> String {
    format!("https://{}:2380", node_ip(c, node))
}

/// Spawns `node`'s agent; a thread stamps its exit.
fn spawn_agent(c: &Cluster, node: &str, events: Arc<Events>) -> JoinHandle<Output> {
    let child: Child = c
        .agent(node)
        .arg("run")
        .envs(std::env::var("ETCD_BENCH_AGENT_LOG").map(|f| ("RUST_LOG", f)))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the agent");
    let node = node.to_string();
    std::thread::spawn(move || {
        let out = child.wait_with_output().expect("wait for the agent");
        events.mark(&node, Ev::AgentExit);
        out
    })
}

fn finish(c: &Cluster, node: &str, agent: JoinHandle<Output>) {
    let out = agent.join().expect("agent waiter");
    if let Ok(dir) = std::env::var("ETCD_BENCH_KEEP_LOGS") {
        let dir = std::path::Path::new(&dir);
        let _ = std::fs::write(dir.join(format!("{node}-agent.log")), &out.stderr);
        let _ = std::fs::copy(
            c.state_dir(node).join("journal.json"),
            dir.join(format!("{node}-journal.json")),
        );
    }
    if !out.status.success() {
        let log =
            std::fs::read_to_string(c.root(node).join("var/log/cluster-agent/etcd.service.log"))
                .unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        panic!(
            "{node}'s agent failed: {}\netcd log tail:\n{}",
            text(&out),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
}

/// (started_at, finished_at) of a journal step.
fn step_times(c: &Cluster, node: &str, step: &str) -> (Option<SystemTime>, Option<SystemTime>) {
    let journal = c.journal(node);
    let record = journal["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == step)
        .unwrap_or_else(|| panic!("{node}: no step {step} in the journal"))
        .clone();
    let at = |field: &str| {
        record[field].as_str().map(|s| {
            SystemTime::from(
                time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                    .expect("RFC 3339 timestamp"),
            )
        })
    };
    (at("started_at"), at("finished_at"))
}

fn finished(c: &Cluster, node: &str, step: &str) -> SystemTime {
    step_times(c, node, step)
        .1
        .unwrap_or_else(|| panic!("{node}: {step} has no finished_at"))
}

fn formation_of(c: &Cluster, node: &str) -> String {
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(c.state_dir(node).join("etcd-bootstrap.json")).expect("etcd record"),
    )
    .unwrap();
    record["formation"].as_str().unwrap_or_default().to_string()
}

/// Waits for the agents in order, but gives up on the whole run (with the
/// cluster's logs) rather than hang.
fn wait_all(c: &Cluster, agents: Vec<(&str, JoinHandle<Output>)>) {
    let deadline = std::time::Instant::now() + RUN_TIMEOUT;
    while agents.iter().any(|(_, a)| !a.is_finished()) {
        if std::time::Instant::now() > deadline {
            for (node, _) in &agents {
                c.kill_daemons(node);
            }
            panic!("formation did not finish within {RUN_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    for (node, a) in agents {
        finish(c, node, a);
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `b − a` in ms, negative if `b` came first.
fn span(a: SystemTime, b: SystemTime) -> f64 {
    match b.duration_since(a) {
        Ok(d) => ms(d),
        Err(e) => -ms(e.duration()),
    }
}

// ---------------------------------------------------------------- etcd logs

fn etcd_log(c: &Cluster, node: &str) -> String {
    std::fs::read_to_string(c.root(node).join("var/log/cluster-agent/etcd.service.log"))
        .unwrap_or_default()
}

/// etcd's structured (zap) log lines.
fn zap_lines(log: &str) -> impl Iterator<Item = serde_json::Value> + '_ {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
}

fn zap_ts(line: &serde_json::Value) -> Option<SystemTime> {
    let ts = line["ts"].as_str()?;
    time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(SystemTime::from)
}

/// etcd's first log line (zap, UTC, µs: the flags it read from the
/// environment): what its main() does first.
fn first_log_line(log: &str) -> Option<SystemTime> {
    zap_lines(log).next().and_then(|l| zap_ts(&l))
}

/// When etcd logged `msg` first.
fn logged(log: &str, msg: &str) -> Option<SystemTime> {
    zap_lines(log)
        .find(|l| l["msg"] == msg)
        .and_then(|l| zap_ts(&l))
}

/// etcd's own log line for the moment it serves clients (after its READY),
/// with ms precision: a check of the own poller, and the reference for the
/// runs without it.
const SERVING: &str = "serving client traffic securely";

/// When the leader first saw `peer` (hex member id) as active: etcd's
/// strict reconfiguration check counts its health interval from here.
fn peer_active_since(leader_log: &str, peer: &str) -> Option<SystemTime> {
    zap_lines(leader_log)
        .find(|l| l["msg"] == "peer became active" && l["peer-id"] == peer)
        .and_then(|l| zap_ts(&l))
}

/// etcd's warnings about refused membership changes, by message.
fn rejections(leader_log: &str) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for l in zap_lines(leader_log) {
        let msg = l["msg"].as_str().unwrap_or_default();
        if l["level"] == "warn" && (msg.starts_with("rejecting member") || msg.contains("learner"))
        {
            *counts.entry(msg.to_string()).or_default() += 1;
        }
    }
    counts
}

fn member_id(c: &Cluster, node: &str) -> String {
    std::fs::read_to_string(c.state_dir(node).join("etcd-member-id"))
        .expect("recorded member id")
        .trim()
        .to_string()
}

// ---------------------------------------------------------------- scenarios

/// Times of scenario 1, in ms from etcd's exec. NaN where not measured (the
/// runs without the own poller).
struct Founder {
    /// → status with a leader (own poller).
    etcd: f64,
    /// → etcd-start finished_at.
    agent: f64,
    /// → agent exit.
    exit: f64,
    /// exec stamp − `/proc` start time.
    proc_skew: f64,
    /// → pid file renamed into place.
    pid_file: f64,
    /// → etcd's first log line.
    first_log: f64,
    /// → etcd logs that it serves clients.
    log_ready: f64,
}

/// Times of scenario 2, in ms from the learner's exec.
struct Learner {
    /// → the founder lists the member as started (promotable).
    started: f64,
    /// → the learner itself answers with a leader (its READY=1).
    answers: f64,
    /// → etcd-start finished_at.
    start_done: f64,
    /// → etcd-promote started_at.
    promote_started: f64,
    /// → the founder lists the member as a voter.
    voter: f64,
    /// → etcd-promote finished_at.
    agent: f64,
    /// etcd-member-add finished_at → exec (etcd-config, spawn).
    add_to_exec: f64,
    promote_attempts: u64,
    first_log: f64,
    /// → the learner logs that it serves clients.
    log_ready: f64,
}

impl std::fmt::Display for Founder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "founder: etcd ready {:.1}, agent {:.1} ms",
            self.etcd, self.agent
        )
    }
}

impl std::fmt::Display for Learner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "learner: started {:.1}, answers {:.1}, start-step done {:.1}, promote from {:.1}, voter {:.1}, agent {:.1} ms ({} attempt)",
            self.started,
            self.answers,
            self.start_done,
            self.promote_started,
            self.voter,
            self.agent,
            self.promote_attempts,
        )
    }
}

/// Overhead of `agent` over `etcd` (both measured from the same start), %.
fn pct(agent: f64, etcd: f64) -> f64 {
    (agent - etcd) / etcd * 100.0
}

fn attempts(c: &Cluster, node: &str, step: &str) -> u64 {
    c.journal(node)["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == step)
        .and_then(|s| s["attempts"].as_u64())
        .unwrap_or(0)
}

/// Runs `nodes`' agents (spawned together) with the exec watcher and, if
/// `plan` is given, the own poller.
fn observe(c: &Cluster, nodes: &[&str], plan: Option<PollPlan>, every: Duration) -> Arc<Events> {
    let events = Arc::new(Events::default());
    let watcher = watch_etcd_exec(c, nodes, events.clone());
    let poller = plan.map(|plan| start_poller(c, plan, events.clone(), every));
    let agents: Vec<_> = nodes
        .iter()
        .map(|n| (*n, spawn_agent(c, n, events.clone())))
        .collect();
    wait_all(c, agents);
    if let Some(p) = poller {
        p.finish();
    }
    watcher.join().unwrap();
    events
}

/// Scenario 1+2: cp-1 founds alone; then cp-2 joins as a learner and is
/// promoted. Without `polled`, no own poller runs (to see what it costs).
fn founder_then_learner(every: Duration, polled: bool) -> (Founder, Learner) {
    let c = Cluster::isolated(MASTERS);
    c.share_ca();
    let ns = c.netns(FOUNDER).expect("namespaced");
    let since = |exec: SystemTime, t: Option<SystemTime>| t.map_or(f64::NAN, |t| span(exec, t));

    // 1. master-first.
    let plan = PollPlan {
        netns: ns.clone(),
        ready: vec![(FOUNDER.into(), client_url(&c, FOUNDER))],
        members: None,
        certs_of: FOUNDER.into(),
    };
    let events = observe(&c, &[FOUNDER], polled.then_some(plan), every);
    assert_eq!(formation_of(&c, FOUNDER), "new");
    let exec = events.need(FOUNDER, Ev::EtcdExec);
    let founder = Founder {
        etcd: since(exec, events.get(FOUNDER, Ev::EtcdReady)),
        agent: span(exec, finished(&c, FOUNDER, "etcd-start")),
        exit: span(exec, events.need(FOUNDER, Ev::AgentExit)),
        proc_skew: proc_start(&c, FOUNDER).map_or(f64::NAN, |p| span(p, exec)),
        pid_file: span(exec, events.need(FOUNDER, Ev::PidFile)),
        first_log: since(exec, first_log_line(&etcd_log(&c, FOUNDER))),
        log_ready: since(exec, logged(&etcd_log(&c, FOUNDER), SERVING)),
    };

    // 2. learner join on cp-2.
    let joiner = "cp-2";
    let plan = PollPlan {
        netns: ns,
        ready: vec![(joiner.into(), client_url(&c, joiner))],
        members: Some((
            client_url(&c, FOUNDER),
            vec![(joiner.into(), peer_url(&c, joiner))],
        )),
        certs_of: FOUNDER.into(),
    };
    let events = observe(&c, &[joiner], polled.then_some(plan), every);
    assert_eq!(formation_of(&c, joiner), "join");
    let exec = events.need(joiner, Ev::EtcdExec);
    let learner = Learner {
        started: since(exec, events.get(joiner, Ev::MemberStarted)),
        answers: since(exec, events.get(joiner, Ev::EtcdReady)),
        start_done: span(exec, finished(&c, joiner, "etcd-start")),
        promote_started: since(exec, step_times(&c, joiner, "etcd-promote").0),
        voter: since(exec, events.get(joiner, Ev::MemberVoter)),
        agent: span(exec, finished(&c, joiner, "etcd-promote")),
        add_to_exec: span(finished(&c, joiner, "etcd-member-add"), exec),
        promote_attempts: attempts(&c, joiner, "etcd-promote"),
        first_log: since(exec, first_log_line(&etcd_log(&c, joiner))),
        log_ready: since(exec, logged(&etcd_log(&c, joiner), SERVING)),
    };
    (founder, learner)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// etcd starting up: exec → ready / started.
    Etcd,
    /// etcd's strict reconfiguration check: no member add until the leader
    /// has been connected to every voter for its health interval.
    EtcdRule,
    Agent,
}

struct Formation {
    /// Spawn of the three agents → last exit, ms.
    wall: f64,
    /// The critical path, in order: (label, ms, whose time).
    parts: Vec<(&'static str, f64, Side)>,
    timeline: String,
    rejections: HashMap<String, usize>,
}

/// Scenario 3: all three agents at once, as in
/// `three_masters_started_together_form_one_cluster`.
fn three_together(every: Duration) -> Formation {
    let c = Cluster::isolated(MASTERS);
    c.share_ca();
    let nodes = ["cp-1", "cp-2", "cp-3"];
    let plan = PollPlan {
        netns: c.netns(FOUNDER).unwrap(),
        ready: vec![(FOUNDER.into(), client_url(&c, FOUNDER))],
        members: Some((
            client_url(&c, FOUNDER),
            nodes[1..]
                .iter()
                .map(|n| (n.to_string(), peer_url(&c, n)))
                .collect(),
        )),
        certs_of: FOUNDER.into(),
    };
    let t0 = SystemTime::now();
    let events = observe(&c, &nodes, Some(plan), every);
    assert_eq!(formation_of(&c, FOUNDER), "new");
    if let Ok(dir) = std::env::var("ETCD_BENCH_KEEP_LOGS") {
        for n in nodes {
            let _ = std::fs::copy(
                c.root(n).join("var/log/cluster-agent/etcd.service.log"),
                std::path::Path::new(&dir).join(format!("{n}-etcd.log")),
            );
        }
    }

    let e = |n: &str, ev| events.need(n, ev);
    let added = |n: &str| finished(&c, n, "etcd-member-add");
    let last_exit = nodes.iter().map(|n| e(n, Ev::AgentExit)).max().unwrap();
    // Joiners in the order etcd accepted them as learners.
    let mut order: Vec<&str> = nodes[1..].to_vec();
    order.sort_by_key(|n| added(n));
    let (j1, j2) = (order[0], order[1]);
    let leader_log = etcd_log(&c, FOUNDER);

    let at = |t: SystemTime| span(t0, t);
    let mut timeline = String::new();
    for n in nodes {
        let _ = write!(timeline, "{n}: ");
        if n != FOUNDER {
            let _ = write!(timeline, "added {:.0}, ", at(added(n)));
        }
        let _ = write!(timeline, "exec {:.0}, ", at(e(n, Ev::EtcdExec)));
        if n == FOUNDER {
            let _ = write!(
                timeline,
                "ready {:.0}, agent {:.0}, ",
                at(e(n, Ev::EtcdReady)),
                at(finished(&c, n, "etcd-start"))
            );
        } else {
            let _ = write!(
                timeline,
                "started {:.0}, voter {:.0}, agent {:.0}, ",
                at(e(n, Ev::MemberStarted)),
                at(e(n, Ev::MemberVoter)),
                at(finished(&c, n, "etcd-promote"))
            );
        }
        let _ = write!(timeline, "exit {:.0} ms; ", at(e(n, Ev::AgentExit)));
    }

    let (f_exec, f_ready) = (e(FOUNDER, Ev::EtcdExec), e(FOUNDER, Ev::EtcdReady));
    let (j1_exec, j1_started, j1_voter) = (
        e(j1, Ev::EtcdExec),
        e(j1, Ev::MemberStarted),
        e(j1, Ev::MemberVoter),
    );
    let (j2_add, j2_exec, j2_started) = (added(j2), e(j2, Ev::EtcdExec), e(j2, Ev::MemberStarted));
    // The leader logs when it first saw the first joiner active; etcd
    // refuses the second add until the health interval has passed since.
    let active = peer_active_since(&leader_log, &member_id(&c, j1)).unwrap_or_else(|| {
        eprintln!("    (no \"peer became active\" for {j1} in the leader's log; using its exec)");
        j1_exec
    });
    let _ = write!(timeline, "{j1} active at {:.0} ms", at(active));
    let rule_end = (active + ETCD_HEALTH_INTERVAL).max(j1_voter).min(j2_add);
    let parts = vec![
        ("spawn → founder's etcd exec", span(t0, f_exec), Side::Agent),
        (
            "founder's etcd exec → ready",
            span(f_exec, f_ready),
            Side::Etcd,
        ),
        (
            "founder ready → 1st joiner added",
            span(f_ready, added(j1)),
            Side::Agent,
        ),
        (
            "1st joiner added → its etcd exec",
            span(added(j1), j1_exec),
            Side::Agent,
        ),
        (
            "1st joiner exec → started",
            span(j1_exec, j1_started),
            Side::Etcd,
        ),
        (
            "1st joiner started → voter",
            span(j1_started, j1_voter),
            Side::Agent,
        ),
        (
            "→ leader connected to it 5 s (etcd rule)",
            span(j1_voter, rule_end),
            Side::EtcdRule,
        ),
        (
            "→ 2nd joiner added (retry backoff)",
            span(rule_end, j2_add),
            Side::Agent,
        ),
        (
            "2nd joiner added → its etcd exec",
            span(j2_add, j2_exec),
            Side::Agent,
        ),
        (
            "2nd joiner exec → started",
            span(j2_exec, j2_started),
            Side::Etcd,
        ),
        (
            "2nd joiner started → last agent exit",
            span(j2_started, last_exit),
            Side::Agent,
        ),
    ];
    Formation {
        wall: at(last_exit),
        parts,
        timeline,
        rejections: rejections(&leader_log),
    }
}

// ---------------------------------------------------------------- report

fn min_median(values: &[f64]) -> (f64, f64) {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (v[0], median)
}

fn row(label: &str, values: &[f64], unit: &str) {
    let (min, median) = min_median(values);
    println!("  {label:<62} {min:>9.1} {median:>9.1} {unit}");
}

fn col<T>(items: &[T], f: impl Fn(&T) -> f64) -> Vec<f64> {
    items.iter().map(f).collect()
}

fn report(
    founders: &[Founder],
    learners: &[Learner],
    unpolled: &[(Founder, Learner)],
    formations: &[Formation],
) {
    println!();
    println!(
        "  {:<62} {:>9} {:>9}",
        format!("(N = {} runs each; times from etcd's exec)", founders.len()),
        "min",
        "median"
    );

    println!("1. master-first: etcd exec → healthy");
    row(
        "etcd own: status answers with a leader",
        &col(founders, |f| f.etcd),
        "ms",
    );
    row(
        "agent: etcd-start finished_at",
        &col(founders, |f| f.agent),
        "ms",
    );
    row("agent overhead", &col(founders, |f| f.agent - f.etcd), "ms");
    let founder_pct = col(founders, |f| pct(f.agent, f.etcd));
    row("agent overhead / etcd own", &founder_pct, "%");
    row("(info) agent exit", &col(founders, |f| f.exit), "ms");
    row(
        "(check) etcd's log: serving clients (ms resolution)",
        &col(founders, |f| f.log_ready),
        "ms",
    );
    row(
        "(no poller) agent overhead over etcd's log",
        &col(unpolled, |u| u.0.agent - u.0.log_ready),
        "ms",
    );
    row(
        "(no poller) agent overhead / etcd's log",
        &col(unpolled, |u| pct(u.0.agent, u.0.log_ready)),
        "%",
    );
    row(
        "(check) exec stamp − /proc start time (10 ms ticks, fork)",
        &col(founders, |f| f.proc_skew),
        "ms",
    );
    row(
        "(check) etcd's first log line (µs, its main())",
        &col(founders, |f| f.first_log),
        "ms",
    );
    row(
        "(check) pid file renamed into place (after fsync)",
        &col(founders, |f| f.pid_file),
        "ms",
    );

    println!("2. learner join (cp-2, cp-1 running): etcd exec → promoted");
    row(
        "etcd own: founder lists it as started (promotable)",
        &col(learners, |l| l.started),
        "ms",
    );
    row(
        "etcd own: learner answers with a leader (its READY=1)",
        &col(learners, |l| l.answers),
        "ms",
    );
    row(
        "agent: etcd-start finished_at",
        &col(learners, |l| l.start_done),
        "ms",
    );
    row(
        "agent: etcd-promote started_at",
        &col(learners, |l| l.promote_started),
        "ms",
    );
    row(
        "etcd: founder lists it as a voter (promotion applied)",
        &col(learners, |l| l.voter),
        "ms",
    );
    row(
        "agent: etcd-promote finished_at",
        &col(learners, |l| l.agent),
        "ms",
    );
    row(
        "agent overhead over promotable",
        &col(learners, |l| l.agent - l.started),
        "ms",
    );
    let learner_pct = col(learners, |l| pct(l.agent, l.started));
    row("agent overhead / etcd own (promotable)", &learner_pct, "%");
    let learner_ready_pct = col(learners, |l| pct(l.agent, l.answers));
    row(
        "agent overhead / etcd own (learner's READY)",
        &learner_ready_pct,
        "%",
    );
    row(
        "(info) etcd-promote attempts (journal)",
        &col(learners, |l| l.promote_attempts as f64),
        "",
    );
    row(
        "(info) etcd-member-add finished_at → exec (before the clock)",
        &col(learners, |l| -l.add_to_exec),
        "ms",
    );
    row(
        "(check) learner's log: serving clients (ms resolution)",
        &col(learners, |l| l.log_ready),
        "ms",
    );
    row(
        "(no poller) learner's log: serving clients",
        &col(unpolled, |u| u.1.log_ready),
        "ms",
    );
    row(
        "(no poller) agent: etcd-promote finished_at",
        &col(unpolled, |u| u.1.agent),
        "ms",
    );
    row(
        "(no poller) agent overhead / learner's logged READY",
        &col(unpolled, |u| pct(u.1.agent, u.1.log_ready)),
        "%",
    );
    row(
        "(check) etcd's first log line",
        &col(learners, |l| l.first_log),
        "ms",
    );

    println!("3. three agents started together → 3 voters, all agents exited");
    row(
        "wall: spawn → last agent exit",
        &col(formations, |f| f.wall),
        "ms",
    );
    for i in 0..formations[0].parts.len() {
        let (label, _, side) = formations[0].parts[i];
        let tag = match side {
            Side::Etcd => "etcd",
            Side::EtcdRule => "etcd rule",
            Side::Agent => "agent",
        };
        row(
            &format!("[{tag}] {label}"),
            &col(formations, |f| f.parts[i].1),
            "ms",
        );
    }
    let sum = |side: Side| {
        col(formations, |f| {
            f.parts.iter().filter(|p| p.2 == side).map(|p| p.1).sum()
        })
    };
    let (own, rule, agent) = (sum(Side::Etcd), sum(Side::EtcdRule), sum(Side::Agent));
    row("Σ etcd start-up on the critical path", &own, "ms");
    row("Σ etcd's health-interval rule", &rule, "ms");
    row("Σ agent (everything else)", &agent, "ms");
    let etcd_total: Vec<f64> = own.iter().zip(&rule).map(|(a, b)| a + b).collect();
    let formation_pct: Vec<f64> = formations
        .iter()
        .zip(&etcd_total)
        .map(|(f, e)| pct(f.wall, *e))
        .collect();
    row(
        "wall over etcd's own time (start-up + rule)",
        &formation_pct,
        "%",
    );
    let mut messages: Vec<&String> = formations
        .iter()
        .flat_map(|f| f.rejections.keys())
        .collect();
    messages.sort();
    messages.dedup();
    for msg in messages {
        let counts = col(formations, |f| *f.rejections.get(msg).unwrap_or(&0) as f64);
        let short: String = msg.chars().take(48).collect();
        row(&format!("(leader's log) \"{short}…\""), &counts, "×");
    }

    println!();
    let median = |v: &[f64]| min_median(v).1;
    for (what, v) in [
        ("master-first etcd-start", median(&founder_pct)),
        ("learner join (vs promotable)", median(&learner_pct)),
        (
            "learner join (vs learner's READY)",
            median(&learner_ready_pct),
        ),
        ("3-member formation", median(&formation_pct)),
    ] {
        println!(
            "  target agent overhead ≤ {TARGET} %: {what:<34} median {v:>6.1} %  {}",
            if v <= TARGET { "MET" } else { "NOT MET" }
        );
    }
}
