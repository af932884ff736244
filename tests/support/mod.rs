//! Shared test harness: a cluster of nodes, each a temp root on its own
//! 127.0.0.x address, driven through the real `cluster-agent` binary.
#![allow(dead_code)] // each test binary uses a different part of the harness

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub mod dbus;
pub mod systemd1_double;

pub const AGENT: &str = env!("CARGO_BIN_EXE_cluster-agent");

#[derive(Debug, Clone)]
pub struct NodeDef {
    pub name: String,
    pub ip: String,
    pub roles: Vec<&'static str>,
    pub mac: String,
}

/// A cluster laid out under one temp dir: `<dir>/<node>/` is each node's
/// `--root`, holding the same `etc/cluster-config/cluster.yaml`.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<NodeDef>,
}

/// Picks a /24 inside 127.0.0.0/8 per test process so parallel test binaries
/// (and leftovers of a crashed run) never share etcd addresses.
pub fn loopback_subnet() -> u8 {
    let pid = std::process::id();
    u8::try_from(10 + pid % 240).expect("fits")
}

impl Cluster {
    /// `spec`: (name, roles) pairs; addresses are assigned in order.
    pub fn new(spec: &[(&str, &[&'static str])]) -> Cluster {
        let subnet = loopback_subnet();
        Self::with_subnet(spec, subnet)
    }

    pub fn with_subnet(spec: &[(&str, &[&'static str])], subnet: u8) -> Cluster {
        let nodes = spec
            .iter()
            .enumerate()
            .map(|(i, (name, roles))| NodeDef {
                name: name.to_string(),
                ip: format!("127.{subnet}.0.{}", i + 11),
                roles: roles.to_vec(),
                mac: format!("52:54:00:00:{subnet:02x}:{:02x}", i + 1),
            })
            .collect();
        let cluster = Cluster {
            dir: tempfile::tempdir().expect("tempdir"),
            nodes,
        };
        for node in &cluster.nodes {
            cluster.write_config(&node.name, &cluster.cluster_yaml());
        }
        cluster
    }

    pub fn cluster_yaml(&self) -> String {
        let subnet = self.nodes[0].ip.split('.').nth(1).unwrap().to_string();
        let mut yaml = format!(
            "cluster:\n  name: test\n  control_plane_endpoint: {}:6443\n  networking:\n    prefix_length: 8\n    gateway: 127.0.0.1\n    dns_servers: [127.0.0.1]\n  ceph:\n    public_network: 127.{subnet}.0.0/24\n    cluster_network: 127.{subnet}.0.0/24\nnodes:\n",
            self.nodes[0].ip
        );
        for n in &self.nodes {
            yaml.push_str(&format!(
                "  - name: {}\n    ip: {}\n    roles: [{}]\n    mac_addresses: [\"{}\"]\n",
                n.name,
                n.ip,
                n.roles.join(", "),
                n.mac
            ));
        }
        yaml
    }

    pub fn root(&self, node: &str) -> PathBuf {
        self.dir.path().join(node)
    }

    pub fn config_dir(&self, node: &str) -> PathBuf {
        self.root(node).join("etc/cluster-config")
    }

    pub fn state_dir(&self, node: &str) -> PathBuf {
        self.root(node).join("var/lib/cluster-state")
    }

    pub fn write_config(&self, node: &str, yaml: &str) {
        let dir = self.config_dir(node);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cluster.yaml"), yaml).unwrap();
    }

    /// The agent for `node`, with the process backend and its root.
    pub fn agent(&self, node: &str) -> Command {
        let mut cmd = Command::new(AGENT);
        cmd.arg("--root")
            .arg(self.root(node))
            .arg("--node")
            .arg(node)
            .arg("--services")
            .arg("process")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("CLUSTER_AGENT_CRASH_AT")
            .env_remove("DBUS_SYSTEM_BUS_ADDRESS")
            .env("RUST_LOG", "warn");
        cmd
    }

    pub fn run(&self, node: &str, args: &[&str]) -> Output {
        self.agent(node).args(args).output().expect("spawn agent")
    }

    pub fn journal(&self, node: &str) -> serde_json::Value {
        let text = std::fs::read_to_string(self.state_dir(node).join("journal.json"))
            .expect("journal exists");
        serde_json::from_str(&text).expect("journal parses")
    }
}

/// `(name, status)` of every journal record: the part of the journal that
/// must converge whatever happened on the way.
pub fn journal_outcome(journal: &serde_json::Value) -> Vec<(String, String)> {
    journal["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

pub fn text(output: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

pub fn plan_steps(cluster: &Cluster, node: &str) -> Vec<String> {
    let out = cluster.run(node, &["--json", "plan"]);
    assert!(out.status.success(), "{}", text(&out));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    plan["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

pub fn exists(p: &Path) -> bool {
    p.exists()
}
