//! Shared test harness: a cluster of nodes, each a temp root on its own
//! 127.0.0.x address, driven through the real `cluster-agent` binary.
#![allow(dead_code)] // each test binary uses a different part of the harness

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub mod dbus;
pub mod etcd;
pub mod ignition;
pub mod node_csr;
pub mod nspawn;
pub mod oci;
pub mod systemd1_double;
pub mod vm;

pub const AGENT: &str = env!("CARGO_BIN_EXE_cluster-agent");

/// The directory `.ci/setup` (tools/kube-bins/build) links the real etcd,
/// Kubernetes and containerd binaries into.
pub fn built_bin_dir() -> PathBuf {
    cluster_agent::cmd::lab::built_bin_dir()
}

/// One of those binaries; a test that needs it fails, naming how to build it.
pub fn built_binary(name: &str) -> PathBuf {
    let path = built_bin_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `.ci/setup` (it builds etcd, Kubernetes, containerd, \
         ignition-validate and butane with tools/kube-bins/build)",
        path.display()
    );
    path
}

/// Links built binaries into `<root>/opt/bin`, where an image ships them.
pub fn install_built(root: &Path, names: &[&str]) {
    let bin = root.join("opt/bin");
    std::fs::create_dir_all(&bin).unwrap();
    for name in names {
        let link = bin.join(name);
        if !link.exists() {
            std::os::unix::fs::symlink(built_binary(name), link).unwrap();
        }
    }
}

#[derive(Debug, Clone)]
pub struct NodeDef {
    pub name: String,
    pub ip: String,
    pub roles: Vec<&'static str>,
    pub mac: String,
}

/// The tests' Ceph manager grace periods (see [`Cluster::ceph_test_overrides`]), in
/// seconds: the monitors' `mon_mgr_beacon_grace`.
pub const MGR_BEACON_GRACE: u64 = 10;
/// `mon_mgr_mkfs_grace` and `mon_mgr_inactive_grace`, in seconds.
pub const MGR_GRACE: u64 = 3;

/// A cluster laid out under one temp dir: `<dir>/<node>/` is each node's
/// `--root`, holding the same `etc/cluster-config/cluster.yaml`.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<NodeDef>,
    pub net: Net,
}

/// Where the nodes live on the network.
pub enum Net {
    /// Every node on its own 127.<subnet>.0.x address of the host's `lo`.
    /// Enough for everything but etcd peers: their connections leave from
    /// 127.0.0.1, which the peer certificate check rejects.
    Loopback { subnet: u8 },
    /// Every node in its own network namespace `ca<subnet>n<i>` with
    /// 198.18.<subnet>.x/24 (the benchmarking range, never routed) on a veth
    /// into one bridge: connections come from the node's own address, as
    /// between machines. Needs root.
    Namespaces { subnet: u8 },
}

/// Picks a fresh /24 inside 127.0.0.0/8 for every cluster: clusters of one
/// test binary run in parallel, and a new process starts elsewhere than a
/// crashed run's leftovers.
pub fn loopback_subnet() -> u8 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    u8::try_from(10 + (std::process::id() * 37 + n) % 240).expect("fits")
}

impl Cluster {
    /// `spec`: (name, roles) pairs; addresses are assigned in order.
    pub fn new(spec: &[(&str, &[&'static str])]) -> Cluster {
        Self::build(
            spec,
            Net::Loopback {
                subnet: loopback_subnet(),
            },
        )
    }

    pub fn with_subnet(spec: &[(&str, &[&'static str])], subnet: u8) -> Cluster {
        Self::build(spec, Net::Loopback { subnet })
    }

    /// Nodes in their own network namespaces (see [`Net::Namespaces`]).
    pub fn isolated(spec: &[(&str, &[&'static str])]) -> Cluster {
        let cluster = Self::build(
            spec,
            Net::Namespaces {
                subnet: loopback_subnet(),
            },
        );
        cluster.create_namespaces();
        cluster
    }

    fn build(spec: &[(&str, &[&'static str])], net: Net) -> Cluster {
        let nodes = spec
            .iter()
            .enumerate()
            .map(|(i, (name, roles))| NodeDef {
                name: name.to_string(),
                ip: format!("{}.{}", net.prefix(), i + 11),
                roles: roles.to_vec(),
                mac: format!("52:54:00:00:{:02x}:{:02x}", net.subnet(), i + 1),
            })
            .collect();
        let cluster = Cluster {
            dir: tempfile::tempdir().expect("tempdir"),
            nodes,
            net,
        };
        let secret: [u8; 32] = rand::random();
        for node in &cluster.nodes {
            cluster.write_config(&node.name, &cluster.cluster_yaml());
            // As an image ships it: a node that may run etcd has it in
            // /opt/bin (etcd 3.6, built by `.ci/setup`).
            if node.roles.contains(&"control-plane") {
                install_built(&cluster.root(&node.name), &["etcd"]);
            }
            // As `render ignition` ships it: worker-only nodes get the worker
            // secret derived from the cluster's.
            let worker_only = node.roles.iter().all(|r| *r == "worker");
            if worker_only {
                let derived = cluster_agent::join::JoinKeys::worker_secret(&secret, "test");
                cluster.write_join_secret(&node.name, &derived);
            } else {
                cluster.write_join_secret(&node.name, &secret);
            }
        }
        cluster
    }

    /// As Ignition does: the same secret on every node, 0600.
    pub fn write_join_secret(&self, node: &str, secret: &[u8]) {
        use std::os::unix::fs::PermissionsExt;
        let path = self.config_dir(node).join("secrets/join-secret");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, secret).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    pub fn cluster_yaml(&self) -> String {
        cluster_yaml(&self.nodes, &self.net.prefix(), true)
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

    /// `node`'s network namespace, if the nodes have their own.
    pub fn netns(&self, node: &str) -> Option<String> {
        let Net::Namespaces { subnet } = self.net else {
            return None;
        };
        let i = self
            .nodes
            .iter()
            .position(|n| n.name == node)
            .expect("known node");
        Some(format!("ca{subnet}n{i}"))
    }

    /// `program` run inside `node`'s network (its namespace, if any).
    pub fn command_on(&self, node: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let program = program.as_ref();
        match self.netns(node) {
            Some(ns) => {
                // nsenter, not `ip netns exec`: that one remounts /sys for
                // the namespace, which hides the cgroup mounts the kubelet
                // needs.
                let mut cmd = Command::new("nsenter");
                cmd.arg(format!("--net=/run/netns/{ns}"))
                    .arg("--")
                    .arg(program);
                cmd
            }
            None => Command::new(program),
        }
    }

    /// The agent for `node`, with the process backend and its root.
    pub fn agent(&self, node: &str) -> Command {
        let mut cmd = self.command_on(node, AGENT);
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

impl Cluster {
    /// Generates the shared CAs once, with the agent's own PKI code, and puts
    /// them into every node's `<config-dir>/pki` as an operator bringing
    /// the cluster's own CAs does (instead of master-first generating them
    /// and the others fetching them through the join service).
    pub fn share_ca(&self) {
        let seed = self.dir.path().join("ca-seed");
        let paths = cluster_agent::paths::HostPaths::new(&seed, None, None);
        cluster_agent::pki::ensure_cluster_cas(&paths, cluster_agent::pki::CaSource::Generate)
            .expect("generate CAs");
        let pki = cluster_agent::pki::PkiPaths::new(&paths);
        for node in &self.nodes {
            copy_tree(pki.dir(), &self.config_dir(&node.name).join("pki"));
        }
    }

    /// The test machines' disks are fuller than Ceph's 30 % free-space warning
    /// allows, and the test clusters have no OSDs (which the managers would
    /// rightly warn about). A lost manager is noticed after 10 s instead of 30
    /// (more than the monitors' 5 s tick plus the manager's 2 s beacon, or
    /// every tick is taken for a stall), and "no active mgr" is raised after
    /// 3 s instead of 60 and 120. Operators set such overrides the same way.
    pub fn ceph_test_overrides(&self, node: &str) {
        let defaults = self.root(node).join("etc/default/ceph");
        std::fs::create_dir_all(defaults.parent().unwrap()).unwrap();
        std::fs::write(
            &defaults,
            format!(
                "CEPH_ARGS=\"--mon_data_avail_warn=1 --mon_warn_on_too_few_osds=false \
                 --mon_mgr_beacon_grace={MGR_BEACON_GRACE} --mon_mgr_inactive_grace={MGR_GRACE} \
                 --mon_mgr_mkfs_grace={MGR_GRACE}\"\n"
            ),
        )
        .unwrap();
    }

    /// `ceph` as an operator on `node` runs it: its ceph.conf and admin key.
    pub fn ceph(&self, node: &str, args: &[&str]) -> std::process::Output {
        let root = self.root(node);
        Command::new(require_tool("ceph", "ceph-common"))
            .arg("--connect-timeout")
            .arg("20")
            .arg("-c")
            .arg(root.join("etc/ceph/ceph.conf"))
            .args(args)
            .env(
                "CEPH_ARGS",
                format!(
                    "--keyring {}",
                    root.join("etc/ceph/ceph.client.admin.keyring").display()
                ),
            )
            .output()
            .unwrap()
    }

    /// [`Cluster::ceph`] with `-f json`, which must succeed.
    pub fn ceph_json(&self, node: &str, args: &[&str]) -> serde_json::Value {
        let all: Vec<&str> = args.iter().copied().chain(["-f", "json"]).collect();
        let out = self.ceph(node, &all);
        assert!(
            out.status.success(),
            "ceph {args:?} via {node}: {}",
            text(&out)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The check `name` of `status --json` on `node`.
    pub fn status_section(&self, node: &str, name: &str) -> serde_json::Value {
        let status = self.run(node, &["status", "--json"]);
        let report: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in {report}"))
            .clone()
    }

    /// SIGKILLs one daemon the process backend started for `node`, as if
    /// its unit had stopped.
    pub fn stop_unit(&self, node: &str, unit: &str) {
        let pid_file = self
            .root(node)
            .join("run/cluster-agent")
            .join(format!("{unit}.pid"));
        assert!(pid_file.exists(), "{node} runs no {unit}");
        kill_pid_file(&pid_file);
    }

    /// The end of every daemon's log on every node, for a failed test: the
    /// temp dir with the logs goes with the cluster.
    fn print_daemon_logs(&self) {
        const TAIL: usize = 15;
        for node in &self.nodes {
            let dir = self.root(&node.name).join("var/log/cluster-agent");
            let mut logs: Vec<_> = std::fs::read_dir(&dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .collect();
            logs.sort();
            for log in logs {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                eprintln!("--- {}: {} (last {TAIL} lines)", node.name, log.display());
                for line in &lines[lines.len().saturating_sub(TAIL)..] {
                    eprintln!("{line}");
                }
            }
        }
    }

    /// SIGKILLs every daemon the process backend started for `node`.
    pub fn kill_daemons(&self, node: &str) {
        let run = self.root(node).join("run/cluster-agent");
        let Ok(entries) = std::fs::read_dir(&run) else {
            return;
        };
        for entry in entries.flatten() {
            if entry.path().extension().is_some_and(|e| e == "pid") {
                kill_pid_file(&entry.path());
            }
        }
    }

    /// Every agent process whose command line names this cluster's
    /// directory (`run`s a test spawned and did not wait for); the
    /// long-running ones under the process backend have pid files and go
    /// with the daemons.
    fn kill_agents(&self) {
        let dir = self.dir.path().to_string_lossy().into_owned();
        let me = std::process::id();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let words: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            let is_agent_run = words.first().is_some_and(|w| w.ends_with(b"cluster-agent"))
                && words.iter().any(|w| *w == b"run")
                && words
                    .iter()
                    .any(|w| String::from_utf8_lossy(w).starts_with(&dir));
            if pid != me && is_agent_run {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }

    /// Pods outlive containerd and its shims' parents: stop the kubelet
    /// (it would restart them), then remove every pod through the CRI.
    fn stop_pods(&self, node: &str) {
        let root = self.root(node);
        kill_pid_file(&root.join("run/cluster-agent/kubelet.service.pid"));
        let socket = root.join("run/containerd/containerd.sock");
        if !socket.exists() {
            return;
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        if let Err(e) = runtime.block_on(cluster_agent::containerd::cri::remove_all_pods(
            &socket,
            std::time::Duration::from_secs(30),
        )) {
            eprintln!("{node}: pods not removed: {e}");
        }
    }
}

impl Net {
    fn subnet(&self) -> u8 {
        match *self {
            Net::Loopback { subnet } | Net::Namespaces { subnet } => subnet,
        }
    }

    /// The first three octets of the nodes' /24.
    fn prefix(&self) -> String {
        match *self {
            Net::Loopback { subnet } => format!("127.{subnet}.0"),
            Net::Namespaces { subnet } => format!("198.18.{subnet}"),
        }
    }
}

/// `name` as found on `PATH`, for a test that runs it. Panics, naming the
/// Debian `package` that ships it and `.ci/setup` (which installs it), when
/// it is not there: a test never passes without the program it checks.
#[track_caller]
pub fn require_tool(name: &str, package: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        });
    // Not in a closure, so the panic names the test's line.
    let Some(program) = found else {
        panic!(
            "`{name}` is not on PATH ({}) and this test needs it: run `.ci/setup` as root \
             (or `apt-get install {package}`)",
            path.to_string_lossy()
        )
    };
    program
}

/// Runs `ip args`, which must succeed.
#[track_caller]
pub fn ip(args: &[&str]) {
    let out = Command::new(require_tool("ip", "iproute2"))
        .args(args)
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {} (network namespaces need root)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ip_quiet(args: &[&str]) {
    let _ = Command::new("ip").args(args).output();
}

impl Cluster {
    fn bridge(&self) -> String {
        format!("cab{}", self.net.subnet())
    }

    fn create_namespaces(&self) {
        let bridge = self.bridge();
        self.remove_namespaces();
        ip(&["link", "add", &bridge, "type", "bridge"]);
        ip(&["link", "set", &bridge, "up"]);
        for (i, node) in self.nodes.iter().enumerate() {
            let ns = self.netns(&node.name).unwrap();
            let veth = format!("{bridge}v{i}");
            ip(&["netns", "add", &ns]);
            ip(&[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ]);
            ip(&["link", "set", &veth, "master", &bridge, "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", node.ip),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            // As on a real node: the Service range is routed (by default)
            // before kube-proxy's DNAT applies.
            ip(&["-n", &ns, "route", "add", "default", "dev", "eth0"]);
        }
    }

    fn remove_namespaces(&self) {
        for node in &self.nodes {
            if let Some(ns) = self.netns(&node.name) {
                ip_quiet(&["netns", "del", &ns]);
            }
        }
        ip_quiet(&["link", "del", &self.bridge()]);
    }
}

/// SIGKILLs the process group a process backend pid file names.
fn kill_pid_file(path: &Path) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    if let Some(pid) = text.split_whitespace().next().and_then(|p| p.parse().ok()) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // First the agents a failed test left running: they would go on
        // starting daemons after the cleanup below.
        self.kill_agents();
        if std::thread::panicking() {
            self.print_daemon_logs();
        }
        for node in &self.nodes {
            self.stop_pods(&node.name);
        }
        for node in &self.nodes {
            self.kill_daemons(&node.name);
        }
        if matches!(self.net, Net::Namespaces { .. }) {
            self.remove_namespaces();
        }
        // The kubelet's self bind-mount would keep the temp dir.
        let _ = cluster_agent::fsutil::unmount_under(self.dir.path());
    }
}

/// cluster.yaml for `nodes` on the /24 `prefix` (first three octets); the
/// first node's IP is the API endpoint. Without `macs`, nodes are known by
/// their node-identity file alone (machines whose MACs are not known in
/// advance, like containers).
pub fn cluster_yaml(nodes: &[NodeDef], prefix: &str, macs: bool) -> String {
    let mut yaml = format!(
        "cluster:\n  name: test\n  control_plane_endpoint: {}:6443\n  networking:\n    prefix_length: 24\n    gateway: {prefix}.1\n    dns_servers: [{prefix}.1]\n  kubelet:\n    eviction_hard: {{{}}}\n  ceph:\n    public_network: {prefix}.0/24\n    cluster_network: {prefix}.0/24\nnodes:\n",
        nodes[0].ip,
        cluster_agent::config::SHARED_DISK_EVICTION_HARD,
    );
    for n in nodes {
        yaml.push_str(&format!(
            "  - name: {}\n    ip: {}\n    roles: [{}]\n",
            n.name,
            n.ip,
            n.roles.join(", "),
        ));
        if macs {
            yaml.push_str(&format!("    mac_addresses: [\"{}\"]\n", n.mac));
        }
    }
    yaml
}

pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// docs/example copied to `<dir>/cluster`, with `secret` as its join secret
/// (0600): the configuration a bootstrap machine serves.
pub fn example_config_dir(dir: &Path, secret: &[u8]) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let config = dir.join("cluster");
    copy_tree(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/example"),
        &config,
    );
    let path = config.join("secrets/join-secret");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, secret).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    config
}

/// What `render ignition` prints for `node`.
pub fn rendered_ignition(config: &Path, node: &str) -> Vec<u8> {
    let out = Command::new(AGENT)
        .args(["--config-dir", config.to_str().unwrap(), "--node", node])
        .args(["render", "ignition"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    out.stdout
}
