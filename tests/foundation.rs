//! The foundation end to end through the binary: plan, run, lock, crash
//! injection at every step, journal atomicity.

mod support;

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use support::{Cluster, journal_outcome, plan_steps, text};

const WORKER_ONLY: &[(&str, &[&str])] = &[("cp-1", &["control-plane"]), ("w-1", &["worker"])];

#[test]
fn run_converges_and_a_second_run_changes_nothing() {
    let c = Cluster::new(WORKER_ONLY);
    let out = c.run("w-1", &["run"]);
    assert!(out.status.success(), "{}", text(&out));
    let first = c.journal("w-1");
    assert!(
        journal_outcome(&first)
            .iter()
            .all(|(_, s)| s == "done" || s == "skipped"),
        "{first:#}"
    );
    let hostname = std::fs::read_to_string(c.root("w-1").join("etc/hostname")).unwrap();
    assert_eq!(hostname.trim(), "w-1");
    let network = std::fs::read_to_string(
        c.root("w-1")
            .join("etc/systemd/network/10-cluster-agent.network"),
    )
    .unwrap();
    assert!(
        network.contains(&format!("Address={}/24", c.nodes[1].ip)),
        "{network}"
    );
    assert!(
        network.contains(&format!("MACAddress={}", c.nodes[1].mac)),
        "{network}"
    );
    for (marker, want) in [("bootstrap-state", "joined"), ("node-role", "worker")] {
        let got = std::fs::read_to_string(c.state_dir("w-1").join(marker)).unwrap();
        assert_eq!(got.trim(), want, "{marker}");
    }

    let out = c.run("w-1", &["run"]);
    assert!(out.status.success(), "{}", text(&out));
    let second = c.journal("w-1");
    // Only skipped steps are re-attempted; done steps are only re-checked.
    for (a, b) in first["steps"]
        .as_array()
        .unwrap()
        .iter()
        .zip(second["steps"].as_array().unwrap())
    {
        if a["status"] == "done" {
            assert_eq!(a, b, "a done step must not be re-applied");
        }
    }
}

#[test]
fn crash_at_every_step_then_rerun_converges() {
    let reference = Cluster::new(WORKER_ONLY);
    let out = reference.run("w-1", &["run"]);
    assert!(out.status.success(), "{}", text(&out));
    let want = journal_outcome(&reference.journal("w-1"));
    // Steps skipped because an earlier one skipped the rest of its phase
    // (no kubelet in this root) never run, so they cannot crash.
    let never_run: Vec<String> = reference.journal("w-1")["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| {
            s["note"]
                .as_str()
                .is_some_and(|n| n.starts_with("skipped with "))
        })
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    let steps: Vec<String> = plan_steps(&reference, "w-1")
        .into_iter()
        .filter(|s| !never_run.contains(s))
        .collect();
    assert!(steps.len() >= 3, "{steps:?}");

    for step in &steps {
        for when in ["before", "after"] {
            let c = Cluster::new(WORKER_ONLY);
            let crashed = c
                .agent("w-1")
                .arg("run")
                .env("CLUSTER_AGENT_CRASH_AT", format!("{step}:{when}"))
                .output()
                .unwrap();
            assert_eq!(
                crashed.status.signal(),
                Some(libc_sigabrt()),
                "crash at {step}:{when} must abort: {}",
                text(&crashed)
            );
            let out = c.run("w-1", &["run"]);
            assert!(
                out.status.success(),
                "rerun after {step}:{when}: {}",
                text(&out)
            );
            assert_eq!(
                journal_outcome(&c.journal("w-1")),
                want,
                "after {step}:{when}"
            );
        }
    }
}

fn libc_sigabrt() -> i32 {
    nix::sys::signal::Signal::SIGABRT as i32
}

#[test]
fn second_agent_exits_3_while_the_first_holds_the_lock() {
    let c = Cluster::new(WORKER_ONLY);
    let state = c.state_dir("w-1");
    std::fs::create_dir_all(&state).unwrap();
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(state.join("agent.lock"))
        .unwrap();
    let held = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| e)
        .unwrap();
    let out = c.run("w-1", &["run"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("another cluster-agent"));
    assert!(
        !state.join("journal.json").exists(),
        "nothing written while locked"
    );
    drop(held);
    let out = c.run("w-1", &["run"]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn invalid_config_exits_2_and_writes_nothing() {
    let c = Cluster::new(WORKER_ONLY);
    let broken = c.cluster_yaml().replace(&c.nodes[1].ip, "10.0.0.300");
    c.write_config("w-1", &broken);
    let out = c.run("w-1", &["run"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cluster.yaml:") && stderr.contains("nodes[1].ip"),
        "{stderr}"
    );
    assert!(!c.state_dir("w-1").exists(), "no partial state");
    assert!(
        !c.root("w-1").join("etc/systemd").exists(),
        "no partial state"
    );
}

#[test]
fn corrupt_journal_stops_the_agent_and_is_kept() {
    let c = Cluster::new(WORKER_ONLY);
    let out = c.run("w-1", &["run"]);
    assert!(out.status.success(), "{}", text(&out));
    let path = c.state_dir("w-1").join("journal.json");
    std::fs::write(&path, b"{\"version\": 1, \"steps\": [").unwrap();
    let out = c.run("w-1", &["run"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("corrupt"),
        "{}",
        text(&out)
    );
    assert_eq!(
        std::fs::read(&path).unwrap(),
        b"{\"version\": 1, \"steps\": ["
    );
}

#[test]
fn identity_by_mac_is_case_insensitive_and_physical_only() {
    let c = Cluster::new(WORKER_ONLY);
    let net = c.root("w-1").join("sys/class/net");
    // A bridge carrying cp-1's MAC must not count: it has no device link.
    std::fs::create_dir_all(net.join("br0")).unwrap();
    std::fs::write(net.join("br0/address"), format!("{}\n", c.nodes[0].mac)).unwrap();
    std::fs::create_dir_all(net.join("eth0/device")).unwrap();
    std::fs::write(
        net.join("eth0/address"),
        format!("{}\n", c.nodes[1].mac.to_uppercase()),
    )
    .unwrap();
    let out = std::process::Command::new(support::AGENT)
        .args(["--json", "--root"])
        .arg(c.root("w-1"))
        .arg("plan")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["node"], "w-1");
    assert_eq!(plan["role"], "worker");
    assert_eq!(plan["identity"]["by"], "mac");

    // Both MACs physical: ambiguous.
    std::fs::create_dir_all(net.join("br0/device")).unwrap();
    assert_identity_error(&c, "several nodes");

    // No match at all.
    std::fs::remove_dir_all(&net).unwrap();
    assert_identity_error(&c, "no node");

    // The identity file wins over MACs.
    std::fs::write(c.config_dir("w-1").join("node-identity"), "cp-1\n").unwrap();
    let out = std::process::Command::new(support::AGENT)
        .args(["--json", "--root"])
        .arg(c.root("w-1"))
        .arg("plan")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["node"], "cp-1");
    assert_eq!(plan["role"], "master-first");
}

#[test]
fn roles_follow_natural_name_order_on_every_node() {
    for masters in [1usize, 3, 5] {
        // Declared in scrambled order; cp-9 < cp-10 < cp-11 naturally.
        let names: Vec<String> = [10, 9, 11, 12, 13][..masters]
            .iter()
            .map(|i| format!("cp-{i}"))
            .collect();
        let mut spec: Vec<(&str, &[&str])> = names
            .iter()
            .map(|n| (n.as_str(), &["control-plane", "ceph-mon"][..]))
            .collect();
        spec.push(("w-1", &["worker"]));
        let c = Cluster::new(&spec);
        let first = if masters == 1 { "cp-10" } else { "cp-9" };
        for (name, _) in &spec {
            let out = c.run(name, &["--json", "plan", "--all-nodes"]);
            assert!(out.status.success(), "{}", text(&out));
            let plans: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
            for p in &plans {
                let want = match p["node"].as_str().unwrap() {
                    "w-1" => "worker",
                    n if n == first => "master-first",
                    _ => "master-additional",
                };
                assert_eq!(p["role"], want, "{masters} masters, seen from {name}: {p}");
                let ceph_first = p["node"] == first;
                if p["node"] != "w-1" {
                    assert_eq!(
                        p["ceph_role"],
                        if ceph_first {
                            "mon-first"
                        } else {
                            "mon-additional"
                        }
                    );
                }
            }
        }
    }
}

#[test]
fn journal_writes_survive_sigkill_whole() {
    // A child rewrites the journal as fast as it can; SIGKILL it at varied
    // moments: the file must always parse as one complete version.
    let dir = tempfile::tempdir().unwrap();
    for round in 0..20u64 {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "journal_writer_child",
                "--nocapture",
                "--ignored",
            ])
            .env("JOURNAL_WRITER_DIR", dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let journal = dir.path().join("journal.json");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !journal.exists() && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        std::thread::sleep(Duration::from_micros(500 + round * 731 % 5000));
        child.kill().unwrap();
        child.wait().unwrap();
        let store = cluster_agent::state::StateStore::new(dir.path());
        let loaded = store
            .load_journal()
            .expect("journal never torn")
            .expect("present");
        assert_eq!(loaded.node, "cp-1");
        assert!(loaded.steps.len() >= 2);
    }
}

#[test]
#[ignore = "child process of journal_writes_survive_sigkill_whole"]
fn journal_writer_child() {
    let Some(dir) = std::env::var_os("JOURNAL_WRITER_DIR") else {
        return;
    };
    let store = cluster_agent::state::StateStore::new(std::path::Path::new(&dir));
    let mut journal = cluster_agent::state::Journal::new("cp-1", "master-first");
    let names: Vec<String> = (0..200).map(|i| format!("step-{i}")).collect();
    journal.align_with_plan(names.iter().map(|n| ("node", n.as_str())));
    for i in 0u32.. {
        journal.steps[(i as usize) % names.len()].attempts = i;
        store.save_journal(&journal).unwrap();
    }
}

/// `plan` without `--node` must refuse with exit 2 and say `why`.
fn assert_identity_error(c: &Cluster, why: &str) {
    let out = std::process::Command::new(support::AGENT)
        .arg("--root")
        .arg(c.root("w-1"))
        .arg("plan")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(why),
        "{}",
        text(&out)
    );
}

/// Journals written by released agents must stay readable: every fixture
/// under `state-fixtures/` is a real state dir, and `status` must report it.
#[test]
fn state_fixtures_stay_readable() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("state-fixtures");
    let mut checked = 0;
    for entry in std::fs::read_dir(&fixtures).unwrap().flatten() {
        let root = entry.path();
        let state = root.join("var/lib/cluster-state");
        if !state.is_dir() {
            continue;
        }
        let copy = tempfile::tempdir().unwrap();
        support::copy_tree(&root, copy.path());
        let out = std::process::Command::new(support::AGENT)
            .arg("--root")
            .arg(copy.path())
            .args(["--json", "status"])
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}: {}",
            root.display(),
            text(&out)
        );
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let role = std::fs::read_to_string(state.join("node-role")).unwrap();
        assert!(status.to_string().contains(role.trim()), "{status}");
        let journal =
            cluster_agent::state::StateStore::new(&copy.path().join("var/lib/cluster-state"))
                .load_journal()
                .unwrap()
                .unwrap();
        assert!(journal.all_complete(), "{}", root.display());
        checked += 1;
    }
    assert!(
        checked >= 1,
        "no state fixtures found in {}",
        fixtures.display()
    );
}

#[test]
fn plan_piped_into_a_closed_pipe_ends_quietly() {
    let c = Cluster::new(WORKER_ONLY);
    // A reader that is gone before the first byte: like `plan | head -0`.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = c
        .agent("w-1")
        .args(["plan", "--all-nodes"])
        .stdout(writer)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    use std::os::unix::process::ExitStatusExt;
    let sigpipe = nix::sys::signal::Signal::SIGPIPE as i32;
    assert_eq!(out.status.signal(), Some(sigpipe), "{stderr}");
}
