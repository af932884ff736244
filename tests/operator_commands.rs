//! `status` and `reset` against real etcd: three control-plane nodes in
//! their own network namespaces, formed by `cluster-agent run`, then looked
//! at, reset and rejoined the way an operator would. Checked with etcdctl
//! and the file trees under each node's root.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use support::etcd::{assert_converged, finish, formation, members, run_ok, spawn_run};
use support::{Cluster, text};

const MASTERS: &[(&str, &[&str])] = &[
    ("cp-1", &["control-plane"]),
    ("cp-2", &["control-plane"]),
    ("cp-3", &["control-plane"]),
];
const ALL: [&str; 3] = ["cp-1", "cp-2", "cp-3"];

fn formed() -> Cluster {
    let c = Cluster::isolated(MASTERS);
    c.share_ca();
    let children: Vec<_> = ALL.iter().map(|n| (*n, spawn_run(&c, n, None))).collect();
    for (node, child) in children {
        finish(node, child);
    }
    assert_converged(&c, &ALL);
    c
}

fn status_json(c: &Cluster, node: &str) -> (Option<i32>, serde_json::Value) {
    let out = c.run(node, &["--json", "status"]);
    let json = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{node} status is not JSON ({e}): {}", text(&out)));
    (out.status.code(), json)
}

fn check<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {name} check in {status}"))
}

/// Every path under `root` with the content of every file, except what a
/// running etcd changes by itself (its data dir) and the daemons' logs.
fn tree(root: &Path) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            let kind = entry.file_type().unwrap();
            let volatile = rel.starts_with("var/lib/etcd/member") || rel.starts_with("var/log");
            if kind.is_dir() {
                out.insert(rel, None);
                if !volatile {
                    stack.push(path);
                }
            } else {
                let content = (!volatile && kind.is_file()).then(|| std::fs::read(&path).unwrap());
                out.insert(rel, content);
            }
        }
    }
    out
}

fn pid_of(c: &Cluster, node: &str, unit: &str) -> i32 {
    let file = c.root(node).join(format!("run/cluster-agent/{unit}.pid"));
    let text = std::fs::read_to_string(&file).unwrap();
    text.split_whitespace().next().unwrap().parse().unwrap()
}

fn alive(pid: i32) -> bool {
    // A zombie is gone for our purposes: it no longer serves anything.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

fn reset(c: &Cluster, node: &str, args: &[&str]) -> std::process::Output {
    c.agent(node)
        .arg("reset")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn member_names(c: &Cluster, via: &str) -> Vec<String> {
    let mut names: Vec<String> = members(c, via).into_iter().map(|m| m.name).collect();
    names.sort();
    names
}

/// The operator's whole life cycle on one formed cluster: look, dry-run,
/// reset a joiner, rejoin, be refused, reset the founder, rejoin, lose every
/// peer and still get an answer at once.
#[test]
fn status_and_reset_on_a_three_member_cluster() {
    let c = formed();

    // status: three healthy voters, the whole timeline, exit 0.
    let (code, status) = status_json(&c, "cp-2");
    assert_eq!(code, Some(0), "{status:#}");
    assert_eq!(status["health"], "healthy");
    assert_eq!(status["node"], "cp-2");
    assert_eq!(status["role"], "master-additional");
    let etcd = check(&status, "etcd");
    assert_eq!(etcd["health"], "ok", "{etcd:#}");
    assert_eq!(etcd["data"]["voters"], 3);
    assert_eq!(etcd["data"]["healthy_voters"], 3);
    let etcd_members = etcd["data"]["members"].as_array().unwrap();
    assert_eq!(etcd_members.len(), 3);
    assert!(
        etcd_members
            .iter()
            .all(|m| m["healthy"] == true && m["is_learner"] == false)
    );
    let services = check(&status, "services");
    assert_eq!(services["health"], "ok", "{services:#}");
    let units = services["data"]["units"].as_array().unwrap();
    for name in ["etcd.service", "cluster-join.service"] {
        let unit = units.iter().find(|u| u["unit"] == name);
        assert_eq!(
            unit.map(|u| &u["enabled"]),
            Some(&serde_json::json!(true)),
            "{name}: {units:#?}"
        );
    }
    assert_eq!(check(&status, "kubernetes")["health"], "not-configured");
    assert_eq!(check(&status, "ceph")["health"], "not-configured");
    let steps = status["steps"].as_array().unwrap();
    assert!(steps.iter().any(|s| s["name"] == "etcd-promote"
        && s["status"] == "done"
        && s["attempts"].as_u64() >= Some(1)
        && s["duration_s"].is_number()));
    let human = c.run("cp-2", &["status"]);
    let human_text = String::from_utf8_lossy(&human.stdout);
    assert!(
        human_text.contains("etcd: ok — 3 voting member(s), 3 healthy"),
        "{}",
        text(&human)
    );
    assert!(
        human_text.contains("health: healthy (exit 0)"),
        "{}",
        text(&human)
    );

    // reset --dry-run lists every action and changes nothing.
    let before = tree(&c.root("cp-3"));
    let dry = reset(&c, "cp-3", &["--dry-run"]);
    assert!(dry.status.success(), "{}", text(&dry));
    let plan = String::from_utf8_lossy(&dry.stdout);
    for expected in [
        "would remove etcd member",
        "would stop etcd.service",
        "etc/systemd/system/etcd.service",
        "etc/etcd/etcd.env",
        "var/lib/etcd",
        "etcd/peer.key",
        "var/lib/cluster-state/journal.json",
    ] {
        assert!(plan.contains(expected), "{expected} missing from:\n{plan}");
    }
    assert!(!plan.contains("cluster-config"), "{plan}");
    // Without a terminal and without --yes: refused, exit 2.
    let unconfirmed = reset(&c, "cp-3", &[]);
    assert_eq!(unconfirmed.status.code(), Some(2), "{}", text(&unconfirmed));
    assert_eq!(
        tree(&c.root("cp-3")),
        before,
        "dry run and refusal change nothing"
    );
    assert_eq!(member_names(&c, "cp-1"), ALL);

    // reset --yes on master-additional: leaves etcd, stops it, deletes only
    // what the agent created.
    let pid = pid_of(&c, "cp-3", "etcd.service");
    let config_before = tree(&c.config_dir("cp-3"));
    let done = reset(&c, "cp-3", &["--yes"]);
    assert!(done.status.success(), "{}", text(&done));
    assert_eq!(member_names(&c, "cp-1"), ["cp-1", "cp-2"]);
    assert!(!alive(pid), "etcd of cp-3 still runs");
    let root = c.root("cp-3");
    for gone in [
        "etc/systemd/system/etcd.service",
        "etc/systemd/system/multi-user.target.wants/etcd.service",
        "etc/etcd/etcd.env",
        "var/lib/etcd",
        "etc/kubernetes/pki/etcd/peer.crt",
        "etc/kubernetes/pki/etcd/healthcheck-client.key",
        "etc/kubernetes/pki/apiserver.crt",
        "etc/systemd/network/10-cluster-agent.network",
        "var/lib/cluster-state/journal.json",
        "var/lib/cluster-state/etcd-bootstrap.json",
    ] {
        assert!(!root.join(gone).exists(), "{gone} survived the reset");
    }
    for kept in [
        "etc/kubernetes/pki/ca.key",
        "etc/kubernetes/pki/etcd/ca.crt",
        "etc/kubernetes/pki/sa.key",
    ] {
        assert!(
            root.join(kept).exists(),
            "{kept} (shared CA material) was removed"
        );
    }
    assert_eq!(
        tree(&c.config_dir("cp-3")),
        config_before,
        "config dir untouched"
    );
    let (code, after) = status_json(&c, "cp-3");
    assert_eq!(code, Some(4), "a reset node is progressing: {after:#}");
    // Resetting again finds nothing left to do.
    let again = reset(&c, "cp-3", &["--yes"]);
    assert!(again.status.success(), "{}", text(&again));
    assert!(
        !String::from_utf8_lossy(&again.stdout).contains("done: "),
        "{}",
        text(&again)
    );
    assert_eq!(member_names(&c, "cp-1"), ["cp-1", "cp-2"]);

    // The next run rejoins as a new member: three members, no duplicate.
    run_ok(&c, "cp-3");
    assert_converged(&c, &ALL);

    // Refused when the remaining members could not keep a quorum.
    c.kill_daemons("cp-2");
    let before = tree(&c.root("cp-3"));
    let refused = reset(&c, "cp-3", &["--yes"]);
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(
        why.contains("remain are healthy") && why.contains("--force"),
        "{why}"
    );
    assert_eq!(
        tree(&c.root("cp-3")),
        before,
        "a refused reset changes nothing"
    );
    assert_eq!(member_names(&c, "cp-1"), ALL);
    run_ok(&c, "cp-2"); // starts cp-2's etcd again
    assert_converged(&c, &ALL);

    // Reset the founder: it leaves, then rejoins the existing cluster
    // instead of founding a second one.
    let done = reset(&c, "cp-1", &["--yes"]);
    assert!(done.status.success(), "{}", text(&done));
    assert_eq!(member_names(&c, "cp-2"), ["cp-2", "cp-3"]);
    run_ok(&c, "cp-1");
    assert_eq!(
        formation(&c, "cp-1"),
        "join",
        "must not found a second cluster"
    );
    assert_converged(&c, &ALL);

    // Every peer gone (one killed, two black-holed): status still answers
    // at once, and says failed.
    c.kill_daemons("cp-1");
    for peer in ["cp-2", "cp-3"] {
        let ns = c.netns(peer).unwrap();
        let out = std::process::Command::new("ip")
            .args(["-n", &ns, "link", "set", "eth0", "down"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
    }
    let started = Instant::now();
    let (code, status) = status_json(&c, "cp-1");
    let took = started.elapsed();
    eprintln!("status with every peer down took {took:?}");
    assert_eq!(code, Some(1), "{status:#}");
    assert_eq!(check(&status, "etcd")["health"], "failed");
    assert_eq!(check(&status, "services")["health"], "failed");
    assert!(
        took < Duration::from_secs(5),
        "status took {took:?} with every peer down"
    );

    // No peer can remove cp-1's member: refused, unless forced.
    let refused = reset(&c, "cp-1", &["--yes"]);
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("no healthy etcd voter answered"), "{why}");
    assert!(c.root("cp-1").join("var/lib/etcd/member").exists());
    let forced = reset(&c, "cp-1", &["--yes", "--force"]);
    assert!(forced.status.success(), "{}", text(&forced));
    let warned = String::from_utf8_lossy(&forced.stderr);
    assert!(warned.contains("going ahead (--force)"), "{warned}");
    assert!(!c.root("cp-1").join("var/lib/etcd").exists());
}

/// A node that never ran: progressing (4), and reset has nothing to do.
#[test]
fn fresh_node_status_and_reset() {
    let c = Cluster::new(&[("cp-1", &["control-plane"]), ("w-1", &["worker"])]);
    let (code, status) = status_json(&c, "w-1");
    assert_eq!(code, Some(4), "{status:#}");
    assert_eq!(status["health"], "progressing");
    assert_eq!(status["role"], "worker");
    assert!(status.get("config_error").is_none(), "{status:#}");
    assert_eq!(check(&status, "etcd")["health"], "not-configured");
    assert_eq!(check(&status, "services")["health"], "not-configured");

    // A Kubernetes API and a Ceph cluster that do not answer (TEST-NET-2 is
    // never routed): both checks fail, and status still answers at once.
    let kube = c.root("w-1").join("etc/kubernetes");
    std::fs::create_dir_all(&kube).unwrap();
    std::fs::write(
        kube.join("admin.conf"),
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://198.51.100.1:6443\n    insecure-skip-tls-verify: true\nusers:\n- name: u\n  user:\n    token: t\ncontexts:\n- name: x\n  context:\n    cluster: c\n    user: u\ncurrent-context: x\n",
    )
    .unwrap();
    let ceph = c.root("w-1").join("etc/ceph");
    std::fs::create_dir_all(&ceph).unwrap();
    std::fs::write(
        ceph.join("ceph.conf"),
        "[global]\nmon_host = 198.51.100.1\n",
    )
    .unwrap();
    let started = Instant::now();
    let (code, status) = status_json(&c, "w-1");
    let took = started.elapsed();
    eprintln!("status with an unreachable API server and Ceph took {took:?}");
    assert_eq!(code, Some(4), "{status:#}");
    assert_eq!(
        check(&status, "kubernetes")["health"],
        "failed",
        "{status:#}"
    );
    assert_eq!(check(&status, "ceph")["health"], "failed", "{status:#}");
    assert!(took < Duration::from_secs(5), "status took {took:?}");
    std::fs::remove_dir_all(&kube).unwrap();
    std::fs::remove_dir_all(&ceph).unwrap();

    let before = tree(&c.root("w-1"));
    let dry = reset(&c, "w-1", &["--dry-run"]);
    assert!(dry.status.success(), "{}", text(&dry));
    assert_eq!(String::from_utf8_lossy(&dry.stdout), "nothing to reset\n");
    assert_eq!(tree(&c.root("w-1")), before);

    // On a terminal, reset lists its plan and asks; only "y" proceeds.
    run_ok(&c, "w-1");
    let before = tree(&c.root("w-1"));
    let on_tty = |answer: &str| {
        let cmd = format!(
            "{} --root {} --node w-1 --services process reset",
            support::AGENT,
            c.root("w-1").display()
        );
        let mut child = std::process::Command::new("script")
            .args(["-q", "-e", "-c", &cmd, "/dev/null"])
            .env_remove("DBUS_SYSTEM_BUS_ADDRESS")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("script (util-linux) gives reset a terminal");
        use std::io::Write as _;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(format!("{answer}\n").as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let declined = on_tty("n");
    assert_eq!(declined.status.code(), Some(2), "{}", text(&declined));
    let asked = String::from_utf8_lossy(&declined.stdout);
    assert!(
        asked.contains("will remove") && asked.contains("Proceed? [y/N]"),
        "{asked}"
    );
    assert_eq!(tree(&c.root("w-1")), before, "declined: nothing changed");
    let accepted = on_tty("y");
    assert!(accepted.status.success(), "{}", text(&accepted));
    assert!(!c.state_dir("w-1").join("journal.json").exists());
}

/// With the systemd backend: `status` reads the unit's state over D-Bus and
/// `reset` stops it there, then removes its files. A real dbus-daemon, with
/// the systemd1 double from tests/support.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_reset_drive_systemd_over_the_bus() {
    use cluster_agent::paths::HostPaths;
    use cluster_agent::services::{self, ServiceManager, SystemdManager};

    let dir = tempfile::tempdir().unwrap();
    let paths = HostPaths::new(dir.path(), None, None);
    let socket = paths.host("/run/dbus/system_bus_socket");
    let bus = support::dbus::PrivateBus::start(dir.path(), &socket);
    let (_double, recorded) = support::systemd1_double::serve(&bus.address).await;
    let env_file = paths.host("/etc/demo/demo.env");
    let unit = services::Unit {
        name: "demo.service".into(),
        description: "demo".into(),
        service: services::ServiceSection {
            exec_start: vec!["/bin/sleep".into(), "1000".into()],
            environment_file: Some(services::EnvironmentFile {
                path: env_file.clone(),
                optional: false,
                vars: [("A".to_string(), "b".to_string())].into(),
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    services::install_unit(&paths, &unit).unwrap();
    let conn = zbus::connection::Builder::address(bus.address.as_str())
        .build()
        .await
        .unwrap();
    let manager = SystemdManager::with_connection(conn, paths.clone())
        .await
        .unwrap();
    manager.start("demo.service").await.unwrap();

    let agent = |args: &[&str]| {
        let mut cmd = tokio::process::Command::new(support::AGENT);
        cmd.arg("--root")
            .arg(dir.path())
            .args(["--services", "systemd"])
            .args(args)
            .env_remove("DBUS_SYSTEM_BUS_ADDRESS")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null());
        cmd.output()
    };
    let out = agent(&["--json", "status"]).await.unwrap();
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let svc = check(&status, "services");
    assert_eq!(svc["health"], "ok", "{status:#}");
    assert_eq!(svc["data"]["backend"], "systemd");
    assert_eq!(svc["data"]["units"][0]["unit"], "demo.service");
    assert_eq!(svc["data"]["units"][0]["active_state"], "active");

    let out = agent(&["reset", "--yes"]).await.unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let calls = recorded.lock().unwrap().calls.clone();
    assert!(
        calls.contains(&"StopUnit demo.service".to_string()),
        "{calls:?}"
    );
    assert_eq!(
        calls.last().map(String::as_str),
        Some("Reload"),
        "{calls:?}"
    );
    assert!(!services::unit_path(&paths, "demo.service").exists());
    assert!(!env_file.exists());
    let out = agent(&["--json", "status"]).await.unwrap();
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(check(&status, "services")["health"], "not-configured");
}

/// While `run` waits (a joiner with no cluster to join), `status` works
/// without the lock, says what the running step waits for, and exits 4.
#[test]
fn status_shows_what_a_running_step_waits_for() {
    let c = Cluster::new(&MASTERS[..2]);
    c.share_ca();
    let mut joiner = spawn_run(&c, "cp-2", None);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let (code, status) = status_json(&c, "cp-2");
        if status["now"]
            .as_str()
            .is_some_and(|n| n.contains("waits for a healthy etcd cluster"))
        {
            assert_eq!(code, Some(4), "{status:#}");
            break status;
        }
        assert!(Instant::now() < deadline, "never seen waiting: {status:#}");
        std::thread::sleep(Duration::from_millis(20));
    };
    joiner.kill().unwrap();
    joiner.wait().unwrap();
    assert_eq!(status["health"], "progressing");
    let step = status["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "etcd-member-add")
        .unwrap();
    assert_eq!(step["status"], "running", "{step:#}");
    assert_eq!(step["attempts"], 1, "{step:#}");
    assert!(
        step["waiting_for"].as_str().unwrap().contains("2379"),
        "{step:#}"
    );
}

/// `--watch` clears the screen and redraws at the interval until Ctrl-C,
/// then exits with the last status's code.
#[test]
fn watch_redraws_until_ctrl_c() {
    let c = Cluster::new(&[("cp-1", &["control-plane"]), ("w-1", &["worker"])]);
    let out = c.dir.path().join("watch.out");
    let mut child = c
        .agent("w-1")
        .args(["status", "--watch", "--interval", "0.1"])
        .stdout(std::fs::File::create(&out).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_to_string(&out)
        .unwrap_or_default()
        .matches("health: progressing")
        .count()
        < 3
    {
        assert!(Instant::now() < deadline, "no redraws");
        std::thread::sleep(Duration::from_millis(20));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(4));
    let screen = std::fs::read_to_string(&out).unwrap();
    assert!(screen.starts_with("\x1b[2J\x1b[H"), "{screen}");
}
