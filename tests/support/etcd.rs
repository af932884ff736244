//! etcd as the tests see it: etcdctl with a node's healthcheck client
//! certificate, and the one-cluster assertion every formation test ends with.

use std::process::{Child, Output};

use super::{Cluster, text};

pub fn node_ip(c: &Cluster, node: &str) -> String {
    c.nodes.iter().find(|n| n.name == node).unwrap().ip.clone()
}

/// etcdctl as `node`'s healthcheck client, against `node`'s etcd.
pub fn etcdctl(c: &Cluster, node: &str, args: &[&str]) -> Output {
    let pki = c.root(node).join("etc/kubernetes/pki/etcd");
    c.command_on(node, super::built_binary("etcdctl"))
        .arg(format!("--endpoints=https://{}:2379", node_ip(c, node)))
        .arg(format!("--cacert={}", pki.join("ca.crt").display()))
        .arg(format!(
            "--cert={}",
            pki.join("healthcheck-client.crt").display()
        ))
        .arg(format!(
            "--key={}",
            pki.join("healthcheck-client.key").display()
        ))
        .arg("--command-timeout=5s")
        .args(args)
        .output()
        .expect("spawn etcdctl")
}

#[derive(Debug)]
pub struct EtcdMember {
    pub id: String,
    pub name: String,
    pub started: bool,
    pub learner: bool,
}

pub fn members(c: &Cluster, via: &str) -> Vec<EtcdMember> {
    let out = etcdctl(c, via, &["member", "list", "-w", "json"]);
    assert!(out.status.success(), "member list: {}", text(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    json["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| EtcdMember {
            // etcdctl prints ids as decimal; the agent records hex.
            id: format!("{:x}", m["ID"].as_u64().unwrap()),
            name: m["name"].as_str().unwrap_or_default().to_string(),
            started: m["clientURLs"].as_array().is_some_and(|u| !u.is_empty()),
            learner: m["isLearner"].as_bool().unwrap_or(false),
        })
        .collect()
}

pub fn spawn_run(c: &Cluster, node: &str, crash_at: Option<&str>) -> Child {
    let mut cmd = c.agent(node);
    cmd.arg("run");
    if let Some(at) = crash_at {
        cmd.env("CLUSTER_AGENT_CRASH_AT", at);
    }
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

pub fn finish(node: &str, child: Child) {
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{node}: {}", text(&out));
}

pub fn run_ok(c: &Cluster, node: &str) {
    let out = c.run(node, &["run"]);
    assert!(out.status.success(), "{node}: {}", text(&out));
}

/// The steps that find a phase's binaries in the image, and what each one's
/// note must say when the image (etcd only, as here) has none.
const IMAGE_GATES: &[(&str, &[&str])] = &[
    (
        "control-plane-binaries",
        &["control-plane binaries", "etcd is formed"],
    ),
    ("containerd-binaries", &["no containerd in"]),
    ("kubelet-binary", &["kubelet not found in"]),
    ("kube-proxy-binary", &["runs no kube-proxy"]),
];

/// One cluster: exactly the given nodes as started voting members, each
/// node's recorded member id among them, every etcd step done.
pub fn assert_converged(c: &Cluster, nodes: &[&str]) {
    for via in nodes {
        let health = etcdctl(c, via, &["endpoint", "health"]);
        assert!(health.status.success(), "{via} health: {}", text(&health));
    }
    let list = members(c, nodes[0]);
    let mut names: Vec<&str> = list.iter().map(|m| m.name.as_str()).collect();
    names.sort();
    assert_eq!(names, nodes, "members: {list:?}");
    assert!(list.iter().all(|m| m.started && !m.learner), "{list:?}");
    for node in nodes {
        assert_eq!(
            members(c, node).len(),
            nodes.len(),
            "one cluster, seen from {node}"
        );
        let recorded = std::fs::read_to_string(c.state_dir(node).join("etcd-member-id")).unwrap();
        let mine = list.iter().find(|m| m.name == *node).unwrap();
        assert_eq!(recorded.trim(), mine.id, "{node}'s recorded member id");
        let journal = c.journal(node);
        for step in journal["steps"].as_array().unwrap() {
            let name = step["name"].as_str().unwrap();
            let note = step["note"].as_str().unwrap_or_default();
            if let Some((_, must_say)) = IMAGE_GATES.iter().find(|(gate, _)| *gate == name) {
                // No Kubernetes in these images: the gate skips its phase
                // with a note saying what is missing, and etcd is kept.
                assert_eq!(step["status"], "skipped", "{node}: {step}");
                assert!(must_say.iter().all(|m| note.contains(m)), "{node}: {note}");
            } else if IMAGE_GATES
                .iter()
                .any(|(gate, _)| note.starts_with(&format!("skipped with {gate}:")))
            {
                assert_eq!(step["status"], "skipped", "{node}: {step}");
            } else {
                assert_eq!(step["status"], "done", "{node}: {step}");
            }
        }
    }
}

/// `formation` from `node`'s `etcd-bootstrap.json`: `new` or `join`.
pub fn formation(c: &Cluster, node: &str) -> String {
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(c.state_dir(node).join("etcd-bootstrap.json")).unwrap(),
    )
    .unwrap();
    record["formation"].as_str().unwrap_or_default().to_string()
}
