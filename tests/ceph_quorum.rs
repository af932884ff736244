//! The Ceph phase against Debian's real ceph-mon 16.2: monitors on their own
//! 127.x addresses, each a `cluster-agent run --services process` under its
//! own root. Checked with the `ceph` CLI and `ceph-authtool`.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};
use std::time::Duration;

use support::etcd::{finish, run_ok, spawn_run};
use support::{Cluster, journal_outcome, text};

const SIGABRT: i32 = 6;
const CEPH_STEPS: &[&str] = &[
    "ceph-discover",
    "ceph-keys",
    "ceph-conf",
    "ceph-mon-mkfs",
    "ceph-mon-config",
    "ceph-mon-start",
    "ceph-mgr-key",
    "ceph-mgr-config",
    "ceph-mgr-start",
];

/// `names` as monitor-only nodes, plus the control-plane node every
/// configuration needs (listed, never run: storage does not need it).
fn mons(names: &[&'static str]) -> Cluster {
    require_ceph();
    let mut spec: Vec<(&str, &[&str])> = vec![("cp-0", &["control-plane"][..])];
    spec.extend(names.iter().map(|n| (*n, &["ceph-mon"][..])));
    let c = Cluster::new(&spec);
    for n in names {
        c.ceph_test_overrides(n);
    }
    c
}

/// The agent runs ceph-mon; the tests check with ceph and ceph-authtool.
/// All three up front, so a test fails at once, naming what is missing.
fn require_ceph() {
    support::require_tool("ceph-mon", "ceph-mon");
    support::require_tool("ceph", "ceph-common");
    support::require_tool("ceph-authtool", "ceph-common");
}

/// The monitors in quorum, sorted (Ceph lists them by rank).
fn quorum_names(status: &serde_json::Value) -> Vec<String> {
    let mut names: Vec<String> = status["quorum_names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

fn fsid(c: &Cluster, node: &str) -> String {
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(c.state_dir(node).join("ceph-bootstrap.json")).unwrap(),
    )
    .unwrap();
    record["fsid"].as_str().unwrap().to_string()
}

/// One cluster, exactly `nodes` in its monmap and quorum, one fsid on
/// every node, every Ceph step done, a manager per node (one active, the
/// others standby), `HEALTH_OK`.
fn assert_quorum(c: &Cluster, nodes: &[&str]) {
    let status = c.ceph_json(nodes[0], &["quorum_status"]);
    assert_eq!(quorum_names(&status), nodes, "{status:#}");
    let monmap: Vec<&str> = status["monmap"]["mons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(monmap.len(), nodes.len(), "no monitor twice: {monmap:?}");
    let cluster_fsid = status["monmap"]["fsid"].as_str().unwrap();
    for node in nodes {
        assert_eq!(fsid(c, node), cluster_fsid, "{node}");
        let done: Vec<_> = journal_outcome(&c.journal(node))
            .into_iter()
            .filter(|(s, _)| s.starts_with("ceph-"))
            .collect();
        assert!(done.iter().all(|(_, st)| st == "done"), "{node}: {done:?}");
        let mgr_keyring = format!("var/lib/ceph/mgr/ceph-{node}/keyring");
        for key in [
            "etc/ceph/ceph.client.admin.keyring",
            "var/lib/ceph/bootstrap-osd/ceph.keyring",
            "var/lib/cluster-state/ceph-mon.keyring",
            &mgr_keyring,
        ] {
            let mode = std::fs::metadata(c.root(node).join(key))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{node}: {key}");
        }
    }
    for node in nodes {
        let auth = c.ceph_json(nodes[0], &["auth", "get", &format!("mgr.{node}")]);
        assert_eq!(
            auth[0]["caps"],
            serde_json::json!({"mds": "allow *", "mon": "allow profile mgr", "osd": "allow *"}),
            "the caps Ceph documents for a manager: {auth:#}"
        );
    }
    let (active, mut standbys) = wait_for_managers(c, nodes[0], nodes.len());
    standbys.push(active);
    standbys.sort();
    assert_eq!(standbys, nodes, "one manager per monitor node");
    // Health settles a moment after quorum; poll, never sleep blindly.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let health = c.ceph_json(nodes[0], &["health"]);
        if health["status"] == "HEALTH_OK" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{health:#}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// (active, standbys) once the mgr map has an available active manager and
/// `count` managers in all.
fn wait_for_managers(c: &Cluster, via: &str, count: usize) -> (String, Vec<String>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let map = c.ceph_json(via, &["mgr", "dump"]);
        let active = map["active_name"].as_str().unwrap_or_default().to_string();
        let standbys: Vec<String> = map["standbys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect();
        if map["available"] == true && standbys.len() + 1 == count {
            return (active, standbys);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not {count} managers with one active: active {active:?}, standbys {standbys:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn first_monitor_seeds_a_healthy_cluster() {
    let c = mons(&["m-1"]);
    run_ok(&c, "m-1");
    assert_quorum(&c, &["m-1"]);
    let s = c.ceph("m-1", &["-s"]);
    assert!(text(&s).contains("HEALTH_OK"), "{}", text(&s));

    // The keys we generated are keys ceph-authtool accepts as its own.
    let keyring = c.state_dir("m-1").join("ceph-mon.keyring");
    for entity in ["mon.", "client.admin", "client.bootstrap-osd"] {
        let out = Command::new("ceph-authtool")
            .arg(&keyring)
            .args(["-n", entity, "-p"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{entity}: {}", text(&out));
        let key = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let copy = c.root("m-1").join("authtool.keyring");
        let add = Command::new("ceph-authtool")
            .arg("-C")
            .arg(&copy)
            .args(["-n", "client.check", "--add-key", &key])
            .output()
            .unwrap();
        assert!(add.status.success(), "{entity}: {}", text(&add));
    }
    // And the cluster authenticates with them: `auth get` as client.admin.
    let auth = c.ceph_json("m-1", &["auth", "get", "client.bootstrap-osd"]);
    assert_eq!(auth[0]["entity"], "client.bootstrap-osd", "{auth:#}");

    // A second run changes nothing.
    let before = fsid(&c, "m-1");
    run_ok(&c, "m-1");
    assert_eq!(fsid(&c, "m-1"), before);
    assert_quorum(&c, &["m-1"]);
}

#[test]
fn three_monitors_started_together_form_one_quorum() {
    let c = mons(&["m-1", "m-2", "m-3"]);
    let children: Vec<_> = ["m-3", "m-2", "m-1"]
        .iter()
        .map(|n| (*n, spawn_run(&c, n, None)))
        .collect();
    for (node, child) in children {
        finish(node, child);
    }
    assert_quorum(&c, &["m-1", "m-2", "m-3"]);
    // Re-runs add no monitor.
    run_ok(&c, "m-2");
    run_ok(&c, "m-1");
    assert_quorum(&c, &["m-1", "m-2", "m-3"]);
}

fn crash_then_converge(c: &Cluster, node: &str, at: &str) {
    let out = spawn_run(c, node, Some(at)).wait_with_output().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&out.status),
        Some(SIGABRT),
        "{at}: did not crash there: {}",
        text(&out)
    );
    run_ok(c, node);
}

#[test]
fn a_crash_at_any_seed_step_converges_on_one_cluster() {
    for step in CEPH_STEPS {
        for when in ["before", "after"] {
            let c = mons(&["m-1"]);
            crash_then_converge(&c, "m-1", &format!("{step}:{when}"));
            assert_quorum(&c, &["m-1"]);
        }
    }
}

#[test]
fn a_crash_at_any_join_step_converges_without_a_second_monitor_entry() {
    let c = mons(&["m-1", "m-2"]);
    run_ok(&c, "m-1");
    let seeded = fsid(&c, "m-1");
    // Each crash point in turn on the same joiner: the later runs resume
    // whatever the earlier ones left.
    for step in CEPH_STEPS {
        let out = spawn_run(&c, "m-2", Some(&format!("{step}:after")))
            .wait_with_output()
            .unwrap();
        let crashed = std::os::unix::process::ExitStatusExt::signal(&out.status) == Some(SIGABRT);
        let already_done = out.status.success();
        assert!(crashed || already_done, "{step}: {}", text(&out));
    }
    run_ok(&c, "m-2");
    assert_quorum(&c, &["m-1", "m-2"]);
    assert_eq!(fsid(&c, "m-2"), seeded);
}

#[test]
fn a_half_initialised_store_is_made_again() {
    let c = mons(&["m-1"]);
    crash_then_converge(&c, "m-1", "ceph-mon-mkfs:before");
    assert_quorum(&c, &["m-1"]);
    let c = mons(&["m-1"]);
    let out = spawn_run(&c, "m-1", Some("ceph-mon-mkfs:before"))
        .wait_with_output()
        .unwrap();
    assert!(!out.status.success());
    // What a power cut in the middle of mkfs leaves: a store without our
    // completion mark, with junk in it.
    let store = c.root("m-1").join("var/lib/ceph/mon/ceph-m-1");
    std::fs::create_dir_all(store.join("store.db")).unwrap();
    std::fs::write(store.join("store.db/CURRENT"), b"garbage").unwrap();
    std::fs::write(store.join("keyring"), b"[mon.]\n\tkey = x\n").unwrap();
    run_ok(&c, "m-1");
    assert_quorum(&c, &["m-1"]);
}

#[test]
fn sigkill_at_random_moments_of_a_join_converges() {
    let c = mons(&["m-1", "m-2"]);
    run_ok(&c, "m-1");
    for round in 0..3u64 {
        let mut child = spawn_run(&c, "m-2", None);
        // Spread over the join's ~6 s (monmap fetch, mkfs, election).
        let delay = Duration::from_millis(300 + (round * 1700 + rand::random::<u64>() % 900));
        std::thread::sleep(delay);
        let _ = child.kill();
        let _ = child.wait();
    }
    run_ok(&c, "m-2");
    assert_quorum(&c, &["m-1", "m-2"]);
}

/// Storage does not wait for Kubernetes: a node with both roles whose
/// control plane cannot be built (no join secret for the etcd CA fetch
/// here: it is an additional master whose first master never comes) still
/// seeds its monitor, and `run` names the failed phase.
#[test]
fn monitors_seed_when_the_kubernetes_side_fails() {
    require_ceph();
    let c = Cluster::new(&[
        ("cp-1", &["control-plane"]),
        ("cp-2", &["control-plane", "ceph-mon"]),
    ]);
    c.ceph_test_overrides("cp-2");
    // cp-1 never runs, so cp-2's etcd join cannot get the CAs; make it fail
    // fast instead of waiting out its deadline.
    std::fs::remove_file(c.config_dir("cp-2").join("secrets/join-secret")).unwrap();
    let out = c.run("cp-2", &["run"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("etcd"),
        "names the failed phase: {}",
        text(&out)
    );
    let outcome = journal_outcome(&c.journal("cp-2"));
    let ceph_done = outcome
        .iter()
        .filter(|(s, _)| s.starts_with("ceph-"))
        .all(|(_, st)| st == "done");
    assert!(ceph_done, "{outcome:?}");
    let status = c.ceph_json("cp-2", &["quorum_status"]);
    assert_eq!(quorum_names(&status), ["cp-2"], "{status:#}");
}

/// Storage never waits for Kubernetes: an additional master that is also
/// the first monitor seeds Ceph while its etcd phase still waits for a
/// first master that has not booted (phases run side by side), and its
/// journal shows both at once.
#[test]
fn a_master_seeds_ceph_while_its_etcd_waits_for_the_first_master() {
    require_ceph();
    let c = Cluster::new(&[
        ("cp-1", &["control-plane"]),
        ("cp-2", &["control-plane", "ceph-mon"]),
    ]);
    c.ceph_test_overrides("cp-2");
    let mut run = spawn_run(&c, "cp-2", None);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let journal_path = c.state_dir("cp-2").join("journal.json");
    loop {
        if journal_path.exists() {
            let outcome = journal_outcome(&c.journal("cp-2"));
            let ceph_done = outcome
                .iter()
                .filter(|(s, _)| s.starts_with("ceph-"))
                .all(|(_, st)| st == "done");
            if ceph_done {
                let etcd_waiting = outcome
                    .iter()
                    .any(|(s, st)| (s == "pki-ca" || s == "etcd-discover") && st == "running");
                assert!(etcd_waiting, "etcd still waits for cp-1: {outcome:?}");
                break;
            }
        }
        assert!(
            run.try_wait().unwrap().is_none(),
            "the run ended before Ceph was seeded: {}",
            text(&run.wait_with_output().unwrap())
        );
        assert!(
            std::time::Instant::now() < deadline,
            "Ceph not seeded while etcd waits: {:?}",
            journal_outcome(&c.journal("cp-2"))
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = c.ceph_json("cp-2", &["quorum_status"]);
    assert_eq!(quorum_names(&status), ["cp-2"], "{status:#}");
    run.kill().unwrap();
    run.wait().unwrap();
}

/// `reset` on a monitor stops its manager and deletes its key, then takes
/// the monitor out of the monmap through the quorum before stopping it;
/// the next `run` brings both back. The last monitor is
/// not removed without --force.
#[test]
fn reset_leaves_the_monmap_and_run_rejoins() {
    let c = mons(&["m-1", "m-2", "m-3"]);
    for n in ["m-1", "m-2", "m-3"] {
        run_ok(&c, n);
    }
    assert_quorum(&c, &["m-1", "m-2", "m-3"]);
    let dry = c.run("m-3", &["reset", "--dry-run"]);
    assert!(
        text(&dry).contains("remove Ceph monitor m-3 from the monmap"),
        "{}",
        text(&dry)
    );
    let stop_mgr = position(&dry, "stop ceph-mgr@m-3.service");
    let forget_mgr = position(&dry, "delete Ceph manager m-3's key (mgr.m-3)");
    let leave = position(&dry, "remove Ceph monitor m-3 from the monmap");
    assert!(
        stop_mgr < forget_mgr && forget_mgr < leave,
        "{}",
        text(&dry)
    );
    let out = c.run("m-3", &["reset", "--yes"]);
    assert!(out.status.success(), "{}", text(&out));
    let status = c.ceph_json("m-1", &["quorum_status"]);
    assert_eq!(quorum_names(&status), ["m-1", "m-2"], "{status:#}");
    assert_eq!(status["monmap"]["mons"].as_array().unwrap().len(), 2);
    assert!(!c.root("m-3").join("var/lib/ceph/mon/ceph-m-3").exists());
    assert!(!c.root("m-3").join("var/lib/ceph/mgr/ceph-m-3").exists());
    let key = c.ceph("m-1", &["auth", "get", "mgr.m-3"]);
    assert_eq!(key.status.code(), Some(2), "ENOENT: {}", text(&key));
    let (_, standbys) = wait_for_managers(&c, "m-1", 2);
    assert!(!standbys.contains(&"m-3".to_string()), "{standbys:?}");
    // The operator's overrides are not the agent's to remove.
    assert!(c.root("m-3").join("etc/default/ceph").exists());
    run_ok(&c, "m-3");
    assert_quorum(&c, &["m-1", "m-2", "m-3"]);

    let single = mons(&["m-1"]);
    run_ok(&single, "m-1");
    let refused = single.run("m-1", &["reset", "--yes"]);
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    assert!(text(&refused).contains("last"), "{}", text(&refused));
    // Forced past that guard, the monitor stays but its manager goes.
    let forced = single.run("m-1", &["reset", "--force", "--dry-run"]);
    assert!(
        text(&forced).contains("delete Ceph manager m-1's key")
            && !text(&forced).contains("remove Ceph monitor m-1"),
        "{}",
        text(&forced)
    );
    assert!(
        single
            .root("m-1")
            .join("var/lib/ceph/mon/ceph-m-1/done")
            .exists()
    );
}

/// A manager beside every monitor: one active, two standby. The active one
/// SIGKILLed, a standby takes over within the (shortened) beacon grace and
/// serves manager commands; the cluster stays HEALTH_OK longer than the
/// shortened `mon_mgr_mkfs_grace`/`mon_mgr_inactive_grace`; the next run
/// brings the lost manager back as a standby; with every manager gone,
/// `status` warns.
#[test]
fn a_standby_manager_takes_over_from_a_lost_active_one() {
    let nodes = ["m-1", "m-2", "m-3"];
    let c = mons(&nodes);
    let children: Vec<_> = nodes.iter().map(|n| (*n, spawn_run(&c, n, None))).collect();
    for (node, child) in children {
        finish(node, child);
    }
    assert_quorum(&c, &nodes);
    assert_healthy_for(&c, "m-1", Duration::from_secs(support::MGR_GRACE + 2));
    // A command only an active manager answers.
    let balancer = c.ceph_json("m-1", &["balancer", "status"]);
    assert!(balancer.get("mode").is_some(), "{balancer:#}");

    let (lost, _) = wait_for_managers(&c, "m-1", 3);
    c.stop_unit(&lost, &format!("ceph-mgr@{lost}.service"));
    let killed = std::time::Instant::now();
    let deadline = killed + Duration::from_secs(support::MGR_BEACON_GRACE * 4);
    let successor = loop {
        let map = c.ceph_json("m-1", &["mgr", "dump"]);
        let active = map["active_name"].as_str().unwrap_or_default();
        if map["available"] == true && !active.is_empty() && active != lost {
            break active.to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no standby took over from {lost}: {map:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!(
        "manager {successor} active {:?} after {lost} was killed",
        killed.elapsed()
    );
    let balancer = c.ceph_json("m-1", &["balancer", "status"]);
    assert!(balancer.get("mode").is_some(), "{balancer:#}");
    assert_healthy_for(&c, "m-1", Duration::from_secs(support::MGR_GRACE + 2));

    // The lost manager's node runs again: it comes back as a standby.
    run_ok(&c, &lost);
    let (active, standbys) = wait_for_managers(&c, "m-1", 3);
    assert_eq!(active, successor);
    assert!(standbys.contains(&lost), "{standbys:?}");
    let managers = c.status_section(&lost, "ceph")["data"]["managers"].clone();
    assert_eq!(managers["active"], successor.as_str(), "{managers:#}");

    // Every manager gone: the mgr map and `status` say so. (Ceph 16 raises
    // MGR_DOWN only for a cluster with OSDs, which these have none of.)
    for n in nodes {
        c.stop_unit(n, &format!("ceph-mgr@{n}.service"));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(support::MGR_BEACON_GRACE * 4);
    while c.ceph_json("m-1", &["mgr", "dump"])["available"] == true {
        assert!(
            std::time::Instant::now() < deadline,
            "the monitors still see an active manager"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let section = c.status_section("m-2", "ceph");
    assert_eq!(section["health"], "warning", "{section:#}");
    assert!(
        section["data"]["managers"]["active"].is_null(),
        "{section:#}"
    );
}

/// Where `line` starts in the output, or a failure showing it.
fn position(out: &Output, line: &str) -> usize {
    let all = text(out);
    all.find(line)
        .unwrap_or_else(|| panic!("no {line:?} in: {all}"))
}

/// HEALTH_OK at every look for `window`: an observation over time, not a
/// wait for readiness.
fn assert_healthy_for(c: &Cluster, via: &str, window: Duration) {
    let end = std::time::Instant::now() + window;
    while std::time::Instant::now() < end {
        let health = c.ceph_json(via, &["health"]);
        assert_eq!(health["status"], "HEALTH_OK", "{health:#}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A node that has its manager's key but never got the unit (a crash
/// before `ceph-mgr-config`, or an image without ceph-mgr): reset forgets
/// the key and stops no unit that is not there.
#[test]
fn reset_forgets_a_manager_whose_unit_was_never_installed() {
    let c = mons(&["m-1", "m-2"]);
    run_ok(&c, "m-1");
    let out = spawn_run(&c, "m-2", Some("ceph-mgr-config:before"))
        .wait_with_output()
        .unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&out.status),
        Some(SIGABRT),
        "{}",
        text(&out)
    );
    let dry = c.run("m-2", &["reset", "--dry-run"]);
    assert!(
        text(&dry).contains("delete Ceph manager m-2's key")
            && !text(&dry).contains("stop ceph-mgr@m-2"),
        "{}",
        text(&dry)
    );
    let reset = c.run("m-2", &["reset", "--yes"]);
    assert!(reset.status.success(), "{}", text(&reset));
    let key = c.ceph("m-1", &["auth", "get", "mgr.m-2"]);
    assert_eq!(key.status.code(), Some(2), "ENOENT: {}", text(&key));
    run_ok(&c, "m-2");
    assert_quorum(&c, &["m-1", "m-2"]);
}
