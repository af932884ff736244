//! Ceph quorum formation: the agent against the raw daemon steps, timed in
//! the same run on the same machine (release build).
//!
//! * agent, first quorum: `cluster-agent run` on the first monitor, from
//!   process start to the moment its `ceph-mon-start` step recorded the
//!   monitor in quorum (journal `finished_at`);
//! * agent, quorum of three: that, plus the same for the second and third
//!   monitors run one after the other (each fetching fsid and keyring
//!   through the first one's join service);
//! * raw: what an operator's script does with Ceph's own tools —
//!   `ceph-authtool` keys, ceph.conf, `monmaptool`, `ceph-mon --mkfs`, start,
//!   poll the admin socket until in quorum; growing: `ceph mon getmap`,
//!   mkfs, start, poll.
//!
//! * HEALTH_OK with a manager, first monitor only: from the start (of
//!   `cluster-agent run`, or of the raw script) until `ceph mgr dump` shows
//!   an available active manager and `ceph health` says HEALTH_OK, both
//!   polled the same way. The raw script adds `ceph auth get-or-create
//!   mgr.<id>`, the keyring file and `ceph-mgr` to its monitor steps; the
//!   agent's run includes its other phases (node, join service). Both
//!   clusters get the tests' overrides (no OSDs, a full disk).
//!
//! `CEPH_BENCH_RUNS` (default 3) runs; medians are printed with the ratio
//! agent / raw (target ≤ 1.2).
//!
//! The agent runs with the process backend (no systemd here). Each run also
//! prints the first monitor's `ceph-mon-start` step alone (start to
//! quorum, polled through the admin socket).

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use support::Cluster;

const MONS: [&str; 3] = ["m-1", "m-2", "m-3"];

fn main() {
    let runs: usize = std::env::var("CEPH_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (mut agent_first, mut agent_three, mut raw_first, mut raw_three) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut agent_healthy, mut raw_healthy) = (Vec::new(), Vec::new());
    for run in 0..runs {
        let (first, three, healthy) = agent(run);
        let (rfirst, rthree, rhealthy) = rt.block_on(raw());
        println!(
            "run {run}: agent first {:>6.0} ms, three {:>6.0} ms, HEALTH_OK+mgr {:>6.0} ms | raw first {:>6.0} ms, three {:>6.0} ms, HEALTH_OK+mgr {:>6.0} ms",
            ms(first),
            ms(three),
            ms(healthy),
            ms(rfirst),
            ms(rthree),
            ms(rhealthy)
        );
        agent_first.push(first);
        agent_three.push(three);
        raw_first.push(rfirst);
        raw_three.push(rthree);
        agent_healthy.push(healthy);
        raw_healthy.push(rhealthy);
    }
    let (ah, rh) = (median(agent_healthy), median(raw_healthy));
    println!(
        "median HEALTH_OK, mgr:   agent {:>6.0} ms  raw {:>6.0} ms  ratio {:.2}",
        ms(ah),
        ms(rh),
        ah.as_secs_f64() / rh.as_secs_f64()
    );
    let (af, at, rf, rt3) = (
        median(agent_first),
        median(agent_three),
        median(raw_first),
        median(raw_three),
    );
    println!(
        "median first quorum:     agent {:>6.0} ms  raw {:>6.0} ms  ratio {:.2}",
        ms(af),
        ms(rf),
        af.as_secs_f64() / rf.as_secs_f64()
    );
    println!(
        "median quorum of three:  agent {:>6.0} ms  raw {:>6.0} ms  ratio {:.2}",
        ms(at),
        ms(rt3),
        at.as_secs_f64() / rt3.as_secs_f64()
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// The tests' overrides: no OSDs here, and a disk fuller than Ceph likes.
const OVERRIDES: &str = "--mon_data_avail_warn=1 --mon_warn_on_too_few_osds=false";

/// Polls until the managers' map has an available active one and the
/// cluster is HEALTH_OK; the moment it saw both.
fn wait_healthy(conf: &str, keyring: &str) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(120);
    let ask = |args: &[&str]| -> serde_json::Value {
        let out = Command::new("ceph")
            .args(["--connect-timeout", "10", "-c", conf])
            .args(args)
            .args(["-f", "json"])
            .env("CEPH_ARGS", format!("--keyring {keyring}"))
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    };
    loop {
        if ask(&["mgr", "dump"])["available"] == true && ask(&["health"])["status"] == "HEALTH_OK" {
            return Instant::now();
        }
        assert!(Instant::now() < deadline, "never HEALTH_OK with a manager");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Agent: time from process start to "in quorum" per monitor, and the
/// first monitor's time to HEALTH_OK with its manager.
fn agent(run: usize) -> (Duration, Duration, Duration) {
    let spec: Vec<(&str, &[&str])> = std::iter::once(("cp-0", &["control-plane"][..]))
        .chain(MONS.iter().map(|m| (*m, &["ceph-mon"][..])))
        .collect();
    let c = Cluster::new(&spec);
    for node in MONS {
        let defaults = c.root(node).join("etc/default/ceph");
        std::fs::create_dir_all(defaults.parent().unwrap()).unwrap();
        std::fs::write(&defaults, format!("CEPH_ARGS=\"{OVERRIDES}\"\n")).unwrap();
    }
    let mut total = Duration::ZERO;
    let mut first = Duration::ZERO;
    let mut healthy = Duration::ZERO;
    let stamp = |step: &serde_json::Value, field: &str| -> SystemTime {
        time::OffsetDateTime::parse(
            step[field].as_str().expect("stamped"),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap()
        .into()
    };
    for (i, node) in MONS.iter().enumerate() {
        let started = SystemTime::now();
        let began = Instant::now();
        let out = c.run(node, &["run"]);
        assert!(
            out.status.success(),
            "run {run} {node}: {}",
            support::text(&out)
        );
        let journal = c.journal(node);
        let step = journal["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "ceph-mon-start")
            .expect("ceph-mon-start recorded")
            .clone();
        let took = stamp(&step, "finished_at").duration_since(started).unwrap();
        if i == 0 {
            first = took;
            let root = c.root(node);
            healthy = wait_healthy(
                &root.join("etc/ceph/ceph.conf").to_string_lossy(),
                &root
                    .join("etc/ceph/ceph.client.admin.keyring")
                    .to_string_lossy(),
            )
            .duration_since(began);
            let start_step = stamp(&step, "finished_at")
                .duration_since(stamp(&step, "started_at"))
                .unwrap();
            println!(
                "run {run}: first monitor's ceph-mon-start step (start + quorum) {:.0} ms",
                ms(start_step)
            );
        }
        total += took;
    }
    (first, total, healthy)
}

struct RawMon {
    child: Child,
}

impl Drop for RawMon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tool(program: &str, args: &[&str], env: &[(&str, String)]) {
    let out = Command::new(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        support::text(&out)
    );
}

async fn wait_quorum(asok: &Path) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut delay = Duration::from_millis(5);
    loop {
        if let Ok(s) = cluster_agent::ceph::mon_status(asok).await
            && s.in_quorum()
        {
            return;
        }
        assert!(Instant::now() < deadline, "raw monitor never in quorum");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(100));
    }
}

/// The raw steps, for three monitors on their own loopback /24, and a
/// manager beside the first.
async fn raw() -> (Duration, Duration, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let subnet = support::loopback_subnet();
    let ip = |i: usize| format!("127.{subnet}.0.{}", 21 + i);
    let p = |rel: &str| -> String { d.join(rel).to_string_lossy().into_owned() };
    for sub in ["run", "log", "mon", "mgr/ceph-r0"] {
        std::fs::create_dir_all(d.join(sub)).unwrap();
    }
    let conf = p("ceph.conf");
    let fsid = cluster_agent::ceph::generate_fsid();
    let mon_host: Vec<String> = (0..3)
        .map(|i| format!("[v2:{}:3300,v1:{}:6789]", ip(i), ip(i)))
        .collect();
    let keyring = p("mon.keyring");
    let asok = |i: usize| PathBuf::from(p(&format!("run/ceph-mon.r{i}.asok")));
    let start_mon = |i: usize| -> RawMon {
        let id = format!("r{i}");
        RawMon {
            child: Command::new("ceph-mon")
                .args([
                    "-f",
                    "--cluster",
                    "ceph",
                    "--id",
                    &id,
                    "-c",
                    &conf,
                    "--public-addr",
                    &ip(i),
                ])
                .env("CEPH_ARGS", OVERRIDES)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        }
    };
    let mkfs = |i: usize, monmap: &str| {
        let id = format!("r{i}");
        tool(
            "ceph-mon",
            &[
                "--mkfs",
                "--cluster",
                "ceph",
                "-c",
                &conf,
                "-i",
                &id,
                "--monmap",
                monmap,
                "--keyring",
                &keyring,
                "--public-addr",
                &ip(i),
            ],
            &[],
        );
    };

    // The `ceph` CLI through the quorum, as the operator's script calls it.
    let ceph_cli = |args: &[&str], env: &[(&str, String)]| {
        let all: Vec<&str> = ["--connect-timeout", "10", "-c", conf.as_str()]
            .into_iter()
            .chain(args.iter().copied())
            .collect();
        tool("ceph", &all, env);
    };

    let t0 = Instant::now();
    tool(
        "ceph-authtool",
        &[
            "--create-keyring",
            &keyring,
            "--gen-key",
            "-n",
            "mon.",
            "--cap",
            "mon",
            "allow *",
        ],
        &[],
    );
    tool(
        "ceph-authtool",
        &[
            &keyring,
            "--gen-key",
            "-n",
            "client.admin",
            "--cap",
            "mon",
            "allow *",
            "--cap",
            "osd",
            "allow *",
            "--cap",
            "mds",
            "allow *",
            "--cap",
            "mgr",
            "allow *",
        ],
        &[],
    );
    tool(
        "ceph-authtool",
        &[
            &keyring,
            "--gen-key",
            "-n",
            "client.bootstrap-osd",
            "--cap",
            "mon",
            "profile bootstrap-osd",
            "--cap",
            "mgr",
            "allow r",
        ],
        &[],
    );
    std::fs::write(
        &conf,
        format!(
            "[global]\nfsid = {fsid}\nmon_host = {}\npublic_network = 127.{subnet}.0.0/24\nauth_cluster_required = cephx\nauth_service_required = cephx\nauth_client_required = cephx\nms_bind_ipv6 = false\nrun_dir = {run}\nadmin_socket = {run}/$cluster-$name.asok\nlog_file = {log}/$cluster-$name.log\n[mon]\nmon_data = {mon}/$cluster-$id\nmgr_initial_modules = iostat nfs\n[mgr]\nmgr_data = {mgr}/$cluster-$id\nkeyring = {mgr}/$cluster-$id/keyring\n",
            mon_host.join(","),
            mgr = p("mgr"),
            run = p("run"),
            log = p("log"),
            mon = p("mon"),
        ),
    )
    .unwrap();
    let seed = p("seed.monmap");
    tool(
        "monmaptool",
        &[
            "--create",
            "--enable-all-features",
            "--fsid",
            &fsid,
            "--addv",
            "r0",
            &mon_host[0],
            &seed,
        ],
        &[],
    );
    mkfs(0, &seed);
    let mut mons = vec![start_mon(0)];
    wait_quorum(&asok(0)).await;
    let first = t0.elapsed();
    let admin_env = [("CEPH_ARGS", format!("--keyring {keyring} {OVERRIDES}"))];
    let mgr_keyring = p("mgr/ceph-r0/keyring");
    ceph_cli(
        &[
            "auth",
            "get-or-create",
            "mgr.r0",
            "mon",
            "allow profile mgr",
            "osd",
            "allow *",
            "mds",
            "allow *",
            "-o",
            &mgr_keyring,
        ],
        &admin_env,
    );
    mons.push(RawMon {
        child: Command::new("ceph-mgr")
            .args(["-f", "--cluster", "ceph", "--id", "r0", "-c", &conf])
            .args(["--public-addr", &ip(0)])
            .env("CEPH_ARGS", OVERRIDES)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    });
    let healthy = wait_healthy(&conf, &keyring).duration_since(t0);

    let mut three = first;
    for i in 1..3 {
        let t = Instant::now();
        let current = p(&format!("current-{i}.monmap"));
        ceph_cli(
            &["mon", "getmap", "-o", &current],
            // The monitor keyring holds client.admin too.
            &[("CEPH_ARGS", format!("--keyring {keyring}"))],
        );
        mkfs(i, &current);
        mons.push(start_mon(i));
        wait_quorum(&asok(i)).await;
        three += t.elapsed();
    }
    drop(mons);
    (first, three, healthy)
}
