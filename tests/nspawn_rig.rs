//! End to end on real nodes: every node is a systemd-nspawn container that
//! boots real systemd as PID 1, and the agent runs as what it is in
//! production, `cluster-bootstrap.service`, driving systemd over D-Bus.
//! See `support/nspawn.rs` for how a node is made.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use support::nspawn::{Rig, poll, wait_for};

const BOOTSTRAP: &str = "cluster-bootstrap.service";
/// Generous: three masters meet etcd's 5 s reconfiguration rule twice, on
/// two shared cores.
const CONVERGE: Duration = Duration::from_secs(300);

/// etcdctl inside `node`, as its healthcheck client against its own etcd.
fn members(rig: &Rig, node: &str) -> Vec<serde_json::Value> {
    let ip = &rig.nodes.iter().find(|n| n.name == node).unwrap().ip;
    let pki = "/etc/kubernetes/pki/etcd";
    let out = rig.exec(
        node,
        "/opt/bin/etcdctl",
        &[
            &format!("--endpoints=https://{ip}:2379"),
            &format!("--cacert={pki}/ca.crt"),
            &format!("--cert={pki}/healthcheck-client.crt"),
            &format!("--key={pki}/healthcheck-client.key"),
            "--command-timeout=5s",
            "-w",
            "json",
            "member",
            "list",
        ],
    );
    assert!(
        out.status.success(),
        "etcdctl on {node}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    list["members"].as_array().cloned().unwrap_or_default()
}

/// Exactly one started, voting member per control-plane node.
fn assert_voters(rig: &Rig, asked: &str, expected: &[&str]) {
    let members = members(rig, asked);
    let names: BTreeSet<&str> = members.iter().filter_map(|m| m["name"].as_str()).collect();
    assert_eq!(members.len(), expected.len(), "members: {members:#?}");
    assert_eq!(names, expected.iter().copied().collect(), "{members:#?}");
    assert!(
        members
            .iter()
            .all(|m| m["isLearner"].as_bool() != Some(true)),
        "a learner is left: {members:#?}"
    );
}

/// `ceph quorum_status` inside `node`, with the /etc/ceph files the phase
/// wrote.
fn ceph_quorum_status(rig: &Rig, node: &str) -> serde_json::Value {
    let out = rig.exec(
        node,
        "ceph",
        &["--connect-timeout", "20", "quorum_status", "-f", "json"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The monitors in quorum, sorted (Ceph lists them by rank).
fn quorum_names(status: &serde_json::Value) -> Vec<&str> {
    let mut names: Vec<&str> = status["quorum_names"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n.as_str())
        .collect();
    names.sort();
    names
}

/// Waits until `node`'s bootstrap unit has finished successfully; fails at
/// once, with the agent's log, if it failed. Calls `seen` with every
/// STATUS= text along the way.
fn wait_bootstrapped(rig: &Rig, node: &str, mut seen: impl FnMut(&str)) {
    let mut last = Default::default();
    let done = poll(CONVERGE, || {
        let unit = rig.unit(node, BOOTSTRAP);
        let field = |k: &str| unit.get(k).map(String::as_str).unwrap_or_default();
        seen(field("StatusText"));
        assert!(
            matches!(field("Result"), "success" | ""),
            "{node}: {BOOTSTRAP} failed ({unit:?}):\n{}",
            rig.bootstrap_log(node)
        );
        let active = field("ActiveState") == "active";
        last = unit;
        active.then_some(())
    });
    if done.is_none() {
        let jobs = rig.exec(node, "systemctl", &["list-jobs", "--no-pager"]);
        panic!(
            "{node}: {BOOTSTRAP} did not finish in {CONVERGE:?} ({last:?}); jobs:\n{}\nlog:\n{}",
            String::from_utf8_lossy(&jobs.stdout),
            rig.bootstrap_log(node)
        );
    }
}

#[test]
fn cold_rack_bootstraps_through_real_systemd() {
    let masters = ["cp-1", "cp-2", "cp-3"];
    let mut rig = Rig::new(&[
        ("cp-1", &["control-plane", "ceph-mon"]),
        ("cp-2", &["control-plane", "ceph-mon"]),
        ("cp-3", &["control-plane"]),
        ("m-1", &["ceph-mon"]),
        ("w-1", &["worker"]),
    ]);
    let started = Instant::now();
    // All at once: the additional masters wait for cp-1's join service
    // for their CAs, the monitors for the first monitor's.
    let nodes = ["cp-1", "cp-2", "cp-3", "m-1", "w-1"];
    for node in nodes {
        rig.boot(node);
    }
    let mut statuses = BTreeSet::new();
    for node in nodes {
        wait_bootstrapped(&rig, node, |s| {
            statuses.insert(s.to_string());
        });
    }
    eprintln!(
        "cold rack: all nodes bootstrapped in {:.1?}",
        started.elapsed()
    );

    assert_voters(&rig, "cp-1", &masters);
    // Ceph: one quorum of the three monitors, asked from a monitor-only
    // node with the standard /etc/ceph files the phase wrote.
    let quorum = ceph_quorum_status(&rig, "m-1");
    assert_eq!(quorum_names(&quorum), ["cp-1", "cp-2", "m-1"], "{quorum:#}");
    for node in ["cp-1", "cp-2", "m-1"] {
        let mon = rig.unit(node, &format!("ceph-mon@{node}.service"));
        assert_eq!(mon["ActiveState"], "active", "{node}: {mon:?}");
        // A manager beside every monitor, run by systemd from our unit.
        let mgr = rig.unit(node, &format!("ceph-mgr@{node}.service"));
        assert_eq!(mgr["ActiveState"], "active", "{node}: {mgr:?}");
    }
    // While a node worked, `systemctl status` named its phase and step.
    assert!(
        statuses.iter().any(|s| s.starts_with("etcd: ")),
        "no STATUS= naming an etcd step was seen: {statuses:?}"
    );
    assert_eq!(
        rig.unit("cp-1", BOOTSTRAP)["StatusText"],
        "bootstrapped as master-first"
    );
    for node in ["cp-2", "cp-3"] {
        assert_eq!(
            rig.unit(node, BOOTSTRAP)["StatusText"],
            "joined as master-additional"
        );
    }
    for node in masters {
        // Started by the agent through systemd's D-Bus API, not as a
        // child process: systemd itself reports it running.
        let etcd = rig.unit(node, "etcd.service");
        assert_eq!(etcd["ActiveState"], "active", "{node}: {etcd:?}");
        // Every master serves joiners, under real systemd with the shipped
        // unit's sandboxing.
        let join = rig.unit(node, "cluster-join.service");
        assert_eq!(join["ActiveState"], "active", "{node}: {join:?}");
        // The node set its own address and hostname through networkd and
        // hostnamed.
        let hostname = rig.exec(node, "hostname", &[]);
        assert_eq!(String::from_utf8_lossy(&hostname.stdout).trim(), node);
    }
    // No Kubernetes binaries on these nodes: the control-plane phase says
    // so plainly, and `status` on the node shows it.
    let status = rig.exec("cp-2", "cluster-agent", &["status"]);
    let shown = String::from_utf8_lossy(&status.stdout);
    assert!(
        shown.contains("control-plane-binaries") && shown.contains("skipped"),
        "{shown}"
    );
    let journal: serde_json::Value = serde_json::from_slice(
        &std::fs::read(rig.root("cp-2").join("var/lib/cluster-state/journal.json")).unwrap(),
    )
    .unwrap();
    let skipped = journal["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "control-plane-binaries")
        .unwrap();
    assert!(
        skipped["note"]
            .as_str()
            .is_some_and(|n| n.contains("no Kubernetes control-plane binaries in /opt/bin")),
        "{skipped:#}"
    );
}

#[test]
fn reboots_mid_bootstrap_resume_and_converge() {
    let masters = ["cp-1", "cp-2", "cp-3"];
    let mut rig = Rig::new(&[
        ("cp-1", &["control-plane", "ceph-mon"]),
        ("cp-2", &["control-plane"]),
        ("cp-3", &["control-plane", "ceph-mon"]),
    ]);
    // cp-2 crashes right after etcd accepted it as a learner, before the
    // journal recorded it: the rebooted node must reuse that member.
    let dropin = rig
        .root("cp-2")
        .join("etc/systemd/system/cluster-bootstrap.service.d");
    std::fs::create_dir_all(&dropin).unwrap();
    std::fs::write(
        dropin.join("crash.conf"),
        "[Service]\nEnvironment=CLUSTER_AGENT_CRASH_AT=etcd-member-add:after\n",
    )
    .unwrap();
    rig.boot("cp-1");
    rig.boot("cp-2");
    wait_for(
        "cp-2's agent to crash at etcd-member-add:after",
        CONVERGE,
        || {
            rig.bootstrap_log("cp-2")
                .contains("aborting at etcd-member-add:after")
                .then_some(())
        },
    );
    std::fs::remove_dir_all(&dropin).unwrap();
    rig.power_off("cp-2");

    // cp-3 loses power at a random moment of its bootstrap.
    rig.boot("cp-3");
    let cut = Duration::from_millis(rand::random_range(0..3000));
    eprintln!("cp-3: power cut {cut:?} after boot");
    std::thread::sleep(cut);
    rig.power_off("cp-3");

    let started = Instant::now();
    rig.boot("cp-2");
    rig.boot("cp-3");
    for node in masters {
        wait_bootstrapped(&rig, node, |_| {});
    }
    eprintln!("after the reboots: converged in {:.1?}", started.elapsed());
    for node in masters {
        assert_voters(&rig, node, &masters);
    }
    // cp-3's monitor, cut off at a random moment, joined the one Ceph
    // cluster cp-1 seeded: one fsid, a quorum of both.
    let quorum = ceph_quorum_status(&rig, "cp-1");
    assert_eq!(quorum_names(&quorum), ["cp-1", "cp-3"], "{quorum:#}");
    for node in ["cp-1", "cp-3"] {
        let record: serde_json::Value = serde_json::from_slice(
            &std::fs::read(
                rig.root(node)
                    .join("var/lib/cluster-state/ceph-bootstrap.json"),
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(record["fsid"], quorum["monmap"]["fsid"], "{node}");
    }
}

/// `status` and `reset` inside a node, against its real systemd: reset
/// takes the member out of etcd and stops what the agent started; after a
/// reboot the node's bootstrap runs again and it rejoins.
#[test]
fn status_and_reset_inside_a_node_then_rejoin_after_reboot() {
    let masters = ["cp-1", "cp-2", "cp-3"];
    let mut rig = Rig::new(&[
        ("cp-1", &["control-plane"]),
        ("cp-2", &["control-plane"]),
        ("cp-3", &["control-plane"]),
    ]);
    for node in masters {
        rig.boot(node);
    }
    for node in masters {
        wait_bootstrapped(&rig, node, |_| {});
    }
    let status = rig.exec("cp-3", "cluster-agent", &["status"]);
    assert_eq!(
        status.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&status.stdout)
    );
    assert!(String::from_utf8_lossy(&status.stdout).contains("etcd"));

    let reset = rig.exec("cp-3", "cluster-agent", &["reset", "--yes"]);
    assert!(
        reset.status.success(),
        "{}{}",
        String::from_utf8_lossy(&reset.stdout),
        String::from_utf8_lossy(&reset.stderr)
    );
    assert_voters(&rig, "cp-1", &["cp-1", "cp-2"]);
    let etcd = rig.unit("cp-3", "etcd.service");
    assert_ne!(
        etcd["ActiveState"], "active",
        "reset stopped etcd through systemd: {etcd:?}"
    );

    let started = Instant::now();
    rig.power_off("cp-3");
    rig.boot("cp-3");
    wait_bootstrapped(&rig, "cp-3", |_| {});
    eprintln!("cp-3 rejoined {:.1?} after its reboot", started.elapsed());
    for node in masters {
        assert_voters(&rig, node, &masters);
    }
}

/// The joiner cannot reach the cluster during its join: it is the cluster's
/// side whose link goes down (the joiner's own link must be up for its boot
/// to reach network-online.target and start the agent at all).
#[test]
fn partitioned_joiner_waits_then_completes() {
    let mut rig = Rig::new(&[("cp-1", &["control-plane"]), ("cp-2", &["control-plane"])]);
    rig.boot("cp-1");
    wait_bootstrapped(&rig, "cp-1", |_| {});
    rig.set_link("cp-1", false);
    rig.boot("cp-2");
    // It says what it is waiting for, in systemd and in its journal.
    let status = wait_for("cp-2 to report what it waits for", CONVERGE, || {
        let text = rig.unit("cp-2", BOOTSTRAP).remove("StatusText")?;
        // Its first need is the cluster CAs from cp-1's join service.
        text.contains("pki-ca: waiting for control-plane material")
            .then_some(text)
    });
    eprintln!("cp-2 while partitioned: {status}");
    let healed = Instant::now();
    rig.set_link("cp-1", true);
    wait_bootstrapped(&rig, "cp-2", |_| {});
    eprintln!(
        "cp-2 joined {:.1?} after the link came back",
        healed.elapsed()
    );
    assert_voters(&rig, "cp-1", &["cp-1", "cp-2"]);
}

/// The API balancer's and the floating endpoint keeper's units as systemd
/// runs them, sandbox and all (the rig's image has no kubelet, so the
/// kubelet phase that installs them is skipped; the test installs them as
/// that phase renders them, with the kubeconfig the control-plane phase
/// writes). With no API server behind them: the balancer listens and says
/// it has nobody to send to; the keeper removes a floating address a killed
/// keeper left (rtnetlink under `CapabilityBoundingSet=CAP_NET_ADMIN
/// CAP_NET_RAW`), reports ready, says it cannot reach the Lease, and both
/// stop cleanly.
#[test]
fn the_balancer_and_the_address_keeper_run_in_their_sandboxes() {
    use cluster_agent::paths::HostPaths;
    let mut rig = Rig::new(&[("cp-1", &["control-plane"])]);
    let ip = rig.nodes[0].ip.clone();
    let vip = format!("{}.100", ip.rsplit_once('.').unwrap().0);
    let config_file = rig.root("cp-1").join("etc/cluster-config/cluster.yaml");
    let yaml = std::fs::read_to_string(&config_file).unwrap().replace(
        &format!("control_plane_endpoint: {ip}:6443\n"),
        &format!("control_plane_endpoint: {vip}:6443\n  floating_endpoint: true\n"),
    );
    assert!(yaml.contains("floating_endpoint: true"), "{yaml}");
    std::fs::write(&config_file, &yaml).unwrap();
    rig.boot("cp-1");
    wait_bootstrapped(&rig, "cp-1", |_| {});

    let config = cluster_agent::config::load(&rig.root("cp-1").join("etc/cluster-config")).unwrap();
    let node = config.nodes[0].clone();
    let inside = HostPaths::new(std::path::Path::new("/"), None, None);
    let agent = std::path::Path::new("/usr/bin/cluster-agent");
    let units = [
        cluster_agent::phases::api_balancer::render_unit(&inside, &node, agent),
        cluster_agent::phases::api_address::render_unit(&inside, &node, agent),
    ];
    let host = HostPaths::new(&rig.root("cp-1"), None, None);
    for unit in &units {
        cluster_agent::services::install_unit(&host, unit).unwrap();
    }
    let creds = cluster_agent::pki::read_client_credentials(
        &host,
        cluster_agent::pki::ClientCert::ApiAddress,
    )
    .unwrap();
    let kubeconfig = cluster_agent::k8s::render_kubeconfig(
        &config.cluster.name,
        &cluster_agent::balancer::server_url(&node),
        &creds.ca_pem,
        cluster_agent::pki::API_ADDRESS_USER,
        cluster_agent::k8s::Credentials::ClientCert {
            cert_pem: &creds.cert_pem,
            key_pem: &creds.key_pem,
        },
    );
    cluster_agent::fsutil::write_atomic(
        &host.host(cluster_agent::phases::control_plane::API_ADDRESS_CONF),
        kubeconfig.as_bytes(),
        0o600,
    )
    .unwrap();
    let interface = {
        let out = rig.exec("cp-1", "ip", &["-o", "-4", "address", "show", "to", &ip]);
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .nth(1)
            .expect("the node's interface")
            .to_string()
    };
    // What a keeper killed while holding the address leaves behind.
    let added = rig.exec(
        "cp-1",
        "ip",
        &["address", "add", &format!("{vip}/32"), "dev", &interface],
    );
    assert!(added.status.success(), "{added:?}");
    let has_vip = || {
        let out = rig.exec("cp-1", "ip", &["-o", "-4", "address", "show"]);
        String::from_utf8_lossy(&out.stdout).contains(&format!("inet {vip}/32"))
    };
    assert!(has_vip());

    let names: Vec<&str> = units.iter().map(|u| u.name.as_str()).collect();
    assert!(
        rig.exec("cp-1", "systemctl", &["daemon-reload"])
            .status
            .success()
    );
    let mut start = vec!["start"];
    start.extend(&names);
    let started = rig.exec("cp-1", "systemctl", &start);
    assert!(
        started.status.success(),
        "systemctl start: {}{}",
        String::from_utf8_lossy(&started.stderr),
        String::from_utf8_lossy(
            &rig.exec(
                "cp-1",
                "journalctl",
                &["--no-pager", "-o", "cat", "-u", names[1]]
            )
            .stdout
        )
    );
    for name in &names {
        assert_eq!(rig.unit("cp-1", name)["ActiveState"], "active", "{name}");
    }
    assert!(!has_vip(), "the keeper left {vip} on {interface}");

    let section = |name: &str| {
        let out = rig.exec("cp-1", "cluster-agent", &["status", "--json"]);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap()
            .clone()
    };
    // Unchecked at first, then out once its first check has failed.
    let balancer = wait_for(
        "the balancer's failed check",
        Duration::from_secs(30),
        || {
            let s = section("api-balancer");
            (s["data"]["backends"][0]["state"] == "unreachable").then_some(s)
        },
    );
    assert_eq!(balancer["health"], "failed", "{balancer}");
    assert!(
        balancer["summary"]
            .as_str()
            .unwrap()
            .contains("sends to 0 of 1 API servers"),
        "{balancer}"
    );
    let keeper = wait_for(
        "the keeper's failed attempt",
        Duration::from_secs(30),
        || {
            let s = section("api-address");
            s["data"]["error"].as_str().is_some().then_some(s)
        },
    );
    assert_eq!(keeper["health"], "warning", "{keeper}");
    assert_eq!(keeper["data"]["holding"], false, "{keeper}");
    assert_eq!(keeper["data"]["interface"], interface.as_str(), "{keeper}");

    let mut stop = vec!["stop"];
    stop.extend(&names);
    assert!(rig.exec("cp-1", "systemctl", &stop).status.success());
    for name in &names {
        let unit = rig.unit("cp-1", name);
        assert_eq!(unit["ActiveState"], "inactive", "{name}: {unit:?}");
        assert_eq!(unit["Result"], "success", "{name}: {unit:?}");
    }
}
