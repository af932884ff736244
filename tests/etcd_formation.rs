//! etcd formation against the real etcd (3.6, built by `.ci/setup`): three
//! control-plane nodes, each in its own network namespace, each a
//! `cluster-agent run --services process` under its own root. Checked with
//! etcdctl and raw TLS clients.

mod support;

use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use support::etcd::{
    assert_converged, etcdctl, finish, formation, members, node_ip, run_ok, spawn_run,
};
use support::{Cluster, built_binary, install_built, text};

const MASTERS: &[(&str, &[&str])] = &[
    ("cp-1", &["control-plane"]),
    ("cp-2", &["control-plane"]),
    ("cp-3", &["control-plane"]),
];
const SIGABRT: i32 = 6;

fn masters() -> Cluster {
    let c = Cluster::isolated(MASTERS);
    c.share_ca();
    c
}

/// Waits (polling) until `node`'s agent has started executing steps, so the
/// next node really starts after it.
fn wait_started(c: &Cluster, node: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let journal = c.state_dir(node).join("journal.json");
    while !journal.exists() {
        assert!(Instant::now() < deadline, "{node} never started");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn three_masters_started_together_form_one_cluster() {
    let c = masters();
    let children: Vec<_> = ["cp-1", "cp-2", "cp-3"]
        .iter()
        .map(|n| (*n, spawn_run(&c, n, None)))
        .collect();
    for (node, child) in children {
        finish(node, child);
    }
    assert_converged(&c, &["cp-1", "cp-2", "cp-3"]);

    // A second run changes nothing and adds no member.
    run_ok(&c, "cp-2");
    run_ok(&c, "cp-1");
    assert_converged(&c, &["cp-1", "cp-2", "cp-3"]);
}

#[test]
fn every_start_order_forms_one_cluster() {
    let orders = [
        ["cp-1", "cp-2", "cp-3"],
        ["cp-1", "cp-3", "cp-2"],
        ["cp-2", "cp-1", "cp-3"],
        ["cp-2", "cp-3", "cp-1"],
        ["cp-3", "cp-1", "cp-2"],
        ["cp-3", "cp-2", "cp-1"],
    ];
    for order in orders {
        let c = masters();
        let mut children = Vec::new();
        for node in order {
            children.push((node, spawn_run(&c, node, None)));
            wait_started(&c, node);
        }
        for (node, child) in children {
            finish(node, child);
        }
        assert_converged(&c, &["cp-1", "cp-2", "cp-3"]);
    }
}

#[test]
fn clients_without_tls_or_certificate_are_refused() {
    let c = Cluster::isolated(&MASTERS[..1]);
    c.share_ca();
    run_ok(&c, "cp-1");
    let ip = node_ip(&c, "cp-1");
    let plaintext = c
        .command_on("cp-1", built_binary("etcdctl"))
        .arg(format!("--endpoints=http://{ip}:2379"))
        .args(["--command-timeout=2s", "get", "x"])
        .output()
        .unwrap();
    assert!(
        !plaintext.status.success(),
        "plaintext accepted: {}",
        text(&plaintext)
    );
    let ca = c.root("cp-1").join("etc/kubernetes/pki/etcd/ca.crt");
    let certless = c
        .command_on("cp-1", built_binary("etcdctl"))
        .arg(format!("--endpoints=https://{ip}:2379"))
        .arg(format!("--cacert={}", ca.display()))
        .args(["--command-timeout=2s", "get", "x"])
        .output()
        .unwrap();
    assert!(
        !certless.status.success(),
        "no client cert accepted: {}",
        text(&certless)
    );
    // The peer port demands a client certificate too: an HTTP request for
    // its member list gets an answer only with one.
    let peer_get = |with_cert: bool| {
        let pki = c.root("cp-1").join("etc/kubernetes/pki/etcd");
        let mut cmd = c.command_on("cp-1", "openssl");
        cmd.args([
            "s_client",
            "-quiet",
            "-connect",
            &format!("{ip}:2380"),
            "-CAfile",
        ])
        .arg(&ca);
        if with_cert {
            cmd.arg("-cert")
                .arg(pki.join("peer.crt"))
                .arg("-key")
                .arg(pki.join("peer.key"));
        }
        let mut child = cmd
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"GET /members HTTP/1.0\r\n\r\n")
            .unwrap();
        let out = child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let answered = peer_get(true);
    assert!(
        answered.contains("HTTP/1.0 200"),
        "peer with cert: {answered}"
    );
    let refused = peer_get(false);
    assert!(
        !refused.contains("HTTP/1.0"),
        "peer port served a certless client: {refused}"
    );
    let ok = etcdctl(&c, "cp-1", &["put", "k", "v"]);
    assert!(ok.status.success(), "{}", text(&ok));
}

/// The description `etcd --help` gives `flag`: its line and the indented
/// lines below it, up to the next option.
fn help_entry(help: &str, flag: &str) -> Option<String> {
    let mut lines = help.lines().skip_while(|l| {
        let l = l.trim_start();
        !(l == flag || l.starts_with(&format!("{flag} ")))
    });
    let first = lines.next()?;
    let rest = lines.take_while(|l| l.starts_with("    ") && !l.trim_start().starts_with("--"));
    Some(
        std::iter::once(first)
            .chain(rest)
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

/// Every variable the agent renders into etcd's environment is one the built
/// etcd (3.6) knows, uses and does not call deprecated: etcd's own log lists
/// each as "recognized and used" and none as "unrecognized" (3.6 dropped the
/// v2 store's `ETCD_ENABLE_V2`, for one), and `etcd --help` describes none of
/// the matching flags as deprecated (3.6 deprecated the `--experimental-*`
/// flags in favour of plain flags and feature gates).
#[test]
fn etcd_takes_every_rendered_variable_and_none_is_deprecated() {
    let c = Cluster::new(&MASTERS[..1]);
    c.share_ca();
    run_ok(&c, "cp-1");
    let env_path = c.root("cp-1").join("etc/etcd/etcd.env");
    let vars = cluster_agent::services::unit::parse_env_file(
        &std::fs::read_to_string(&env_path).unwrap(),
        &env_path,
    )
    .unwrap();
    assert!(vars.contains_key("ETCD_NAME"), "{vars:?}");

    let log_path = c
        .root("cp-1")
        .join("var/log/cluster-agent/etcd.service.log");
    let log = std::fs::read_to_string(&log_path).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let unrecognized: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["msg"] == "unrecognized environment variable")
        .collect();
    assert!(unrecognized.is_empty(), "etcd ignored: {unrecognized:#?}");
    let used: std::collections::BTreeSet<&str> = lines
        .iter()
        .filter(|l| l["msg"] == "recognized and used environment variable")
        .filter_map(|l| l["variable-name"].as_str())
        .collect();
    for name in vars.keys() {
        assert!(
            used.contains(name.as_str()),
            "etcd did not report using {name}; it used {used:?} ({})",
            log_path.display()
        );
    }
    let deprecations: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["level"] == "warn" && l.to_string().to_lowercase().contains("deprecat"))
        .collect();
    assert!(deprecations.is_empty(), "{deprecations:#?}");

    let help = std::process::Command::new(built_binary("etcd"))
        .arg("--help")
        .output()
        .unwrap();
    let help = format!(
        "{}{}",
        String::from_utf8_lossy(&help.stdout),
        String::from_utf8_lossy(&help.stderr)
    );
    for name in vars.keys() {
        let flag = format!(
            "--{}",
            name.trim_start_matches("ETCD_")
                .to_lowercase()
                .replace('_', "-")
        );
        let entry = help_entry(&help, &flag)
            .unwrap_or_else(|| panic!("{name}: the built etcd has no {flag}"));
        assert!(
            !entry.to_lowercase().contains("deprecated"),
            "{name} is deprecated in the built etcd: {entry}"
        );
    }
}

fn etcd_steps(c: &Cluster, node: &str) -> Vec<String> {
    let out = c.run(node, &["--json", "plan"]);
    assert!(out.status.success(), "{}", text(&out));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    plan["phases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["name"] == "etcd")
        .flat_map(|p| p["steps"].as_array().unwrap().clone())
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect()
}

/// Runs `node` with a crash at `at`; it must abort there, unless the point
/// is `:after` a step whose effect already held (it never applies then).
fn crash_then_rerun(c: &Cluster, node: &str, at: &str) {
    let out = spawn_run(c, node, Some(at)).wait_with_output().unwrap();
    if out.status.signal() != Some(SIGABRT) {
        let (step, when) = at.split_once(':').unwrap();
        assert!(
            out.status.success() && when == "after",
            "{node} crash at {at}: {}",
            text(&out)
        );
        let journal = c.journal(node);
        let record = journal["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == step)
            .unwrap()
            .clone();
        assert_eq!(
            record["attempts"], 0,
            "{at} applied but did not crash: {record}"
        );
    }
    run_ok(c, node);
}

#[test]
fn crash_at_every_etcd_step_on_every_role_converges() {
    let probe = masters();
    let steps = etcd_steps(&probe, "cp-1");
    assert_eq!(steps, etcd_steps(&probe, "cp-2"), "both roles run one plan");
    assert!(steps.len() >= 6, "{steps:?}");
    drop(probe);
    for step in &steps {
        for when in ["before", "after"] {
            let at = format!("{step}:{when}");
            let c = masters();
            crash_then_rerun(&c, "cp-1", &at);
            crash_then_rerun(&c, "cp-2", &at);
            run_ok(&c, "cp-3");
            assert_converged(&c, &["cp-1", "cp-2", "cp-3"]);
        }
    }
}

/// A tiny deterministic generator, so a failing round can be replayed from
/// the printed seed.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % below
    }
}

#[test]
fn sigkill_at_random_moments_then_rerun_converges() {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("sigkill seed {seed}");
    let mut rng = Lcg(seed);
    for round in 0..4 {
        let c = masters();
        let mut children: Vec<_> = ["cp-1", "cp-2", "cp-3"]
            .iter()
            .map(|n| (*n, spawn_run(&c, n, None)))
            .collect();
        // The kill lands anywhere in formation: from the first step to after
        // the learners' promotion (formation takes ~1–3 s here).
        let victim = rng.next(3) as usize;
        let delay = Duration::from_millis(rng.next(2500));
        let started = Instant::now();
        while started.elapsed() < delay {
            if let Ok(Some(_)) = children[victim].1.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = children[victim].1.kill();
        let _ = children[victim].1.wait();
        eprintln!(
            "round {round}: killed {} after {delay:?}",
            children[victim].0
        );
        // As systemd's Restart=on-failure would: the victim runs again while
        // the others are still at work (a learner it added before dying
        // blocks their own learner additions until it is promoted).
        let victim_name = children[victim].0;
        children[victim].1 = spawn_run(&c, victim_name, None);
        for (node, child) in children {
            finish(node, child);
        }
        assert_converged(&c, &["cp-1", "cp-2", "cp-3"]);
    }
}

#[test]
fn reimaged_master_first_rejoins_the_existing_cluster() {
    let c = masters();
    for node in ["cp-1", "cp-2", "cp-3"] {
        run_ok(&c, node);
    }
    let before = members(&c, "cp-2");
    let old_id = before.iter().find(|m| m.name == "cp-1").unwrap().id.clone();

    // Re-image: the machine loses everything but its configuration.
    c.kill_daemons("cp-1");
    let root = c.root("cp-1");
    let keep = c.dir.path().join("cp-1-config");
    std::fs::rename(c.config_dir("cp-1"), &keep).unwrap();
    std::fs::remove_dir_all(&root).unwrap();
    std::fs::create_dir_all(c.config_dir("cp-1").parent().unwrap()).unwrap();
    std::fs::rename(&keep, c.config_dir("cp-1")).unwrap();
    // The fresh image ships etcd again.
    install_built(&root, &["etcd"]);

    run_ok(&c, "cp-1");
    assert_eq!(
        formation(&c, "cp-1"),
        "join",
        "must not found a second cluster"
    );
    assert_converged(&c, &["cp-1", "cp-2", "cp-3"]);
    let after = members(&c, "cp-3");
    let new_id = &after.iter().find(|m| m.name == "cp-1").unwrap().id;
    assert_ne!(*new_id, old_id, "the stale member was replaced");
}

#[test]
fn a_data_dir_of_another_member_stops_the_agent_with_a_reset_hint() {
    let c = masters();
    for node in ["cp-1", "cp-2"] {
        run_ok(&c, node);
    }
    // cp-2's recorded member id no longer matches what its data dir holds.
    let record_path = c.state_dir("cp-2").join("etcd-bootstrap.json");
    let mut record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record_path).unwrap()).unwrap();
    record["member_id"] = "1234abcd".into();
    std::fs::write(&record_path, serde_json::to_vec(&record).unwrap()).unwrap();
    let mut journal = c.journal("cp-2");
    for step in journal["steps"].as_array_mut().unwrap() {
        if step["name"] == "etcd-start" {
            step["status"] = "pending".into();
        }
    }
    std::fs::write(
        c.state_dir("cp-2").join("journal.json"),
        serde_json::to_vec(&journal).unwrap(),
    )
    .unwrap();
    let out = c.run("cp-2", &["run"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cluster-agent reset"), "{stderr}");
    assert!(stderr.contains("1234abcd"), "{stderr}");
}

/// A joiner whose etcd never starts after its learner was added (its node
/// died right after `member add`) holds etcd's one learner slot; the next
/// joiner waits, and says for whom: its journal names the blocking
/// member, that it never started, and how to remove it. Removing it lets
/// the joiner through.
#[test]
fn a_joiner_behind_a_dead_learner_names_it_and_goes_on_once_it_is_removed() {
    let c = masters();
    run_ok(&c, "cp-1");
    let died = spawn_run(&c, "cp-2", Some("etcd-member-add:after"))
        .wait_with_output()
        .unwrap();
    assert_eq!(died.status.signal(), Some(SIGABRT), "{}", text(&died));
    let stuck = members(&c, "cp-1")
        .into_iter()
        .find(|m| m.learner)
        .expect("cp-2's learner is in the member list");
    assert!(!stuck.started);

    let mut joiner = spawn_run(&c, "cp-3", None);
    let waiting_for = || {
        c.journal("cp-3")["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "etcd-member-add")
            .map(|s| s["waiting_for"].as_str().unwrap_or_default().to_string())
            .unwrap_or_default()
    };
    wait_started(&c, "cp-3");
    let deadline = Instant::now() + Duration::from_secs(90);
    while !waiting_for().contains("one learner at a time") {
        assert!(
            joiner.try_wait().unwrap().is_none(),
            "cp-3 gave up instead of waiting"
        );
        assert!(
            Instant::now() < deadline,
            "cp-3 waits silently: {:?}",
            waiting_for()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let said = waiting_for();
    for part in [
        stuck.id.as_str(),
        "a node that has not started its etcd",
        "etcdctl member remove",
    ] {
        assert!(said.contains(part), "{part}: {said}");
    }

    let removed = etcdctl(&c, "cp-1", &["member", "remove", &stuck.id]);
    assert!(removed.status.success(), "{}", text(&removed));
    finish("cp-3", joiner);
    assert_converged(&c, &["cp-1", "cp-3"]);
}
