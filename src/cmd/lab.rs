//! `lab up|status|down`: a whole cluster on one machine. Every node is a
//! directory used as `--root`, with its own cluster config and join secret,
//! running this very binary's `run` with the process backend against real
//! etcd and ceph-mon. Nodes share loopback (127.77.0.x) or, with `--netns`
//! (root), each gets a network namespace on a bridge — needed for more than
//! one master, because etcd checks a peer's certificate against the address
//! it connects from.

use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cli::{LabCommand, LabUpArgs};
use crate::paths::HostPaths;
use crate::services::ServiceManager;
use crate::state::{StateStore, StepStatus};

use super::{CliError, EXIT_FAILURE, EXIT_OK};

const BRIDGE: &str = "calab0";
const NETNS_PREFIX: &str = "calab-";
const LOOPBACK_NET: [u8; 3] = [127, 77, 0];
const BRIDGE_NET: [u8; 3] = [198, 19, 250];
/// What each node's image needs, linked into its `/opt/bin`.
const MASTER_BINARIES: &[&str] = &[
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
];
/// Every node runs a kubelet, masters too.
const NODE_BINARIES: &[&str] = &[
    "containerd",
    "containerd-shim-runc-v2",
    "runc",
    "kubelet",
    "kube-proxy",
];
/// Debian's CNI reference plugins (containernetworking-plugins), linked as
/// each node's `/usr/lib/cni`.
const CNI_PLUGIN_DIR: &str = "/usr/lib/cni";
/// Debian's packages (runc) put theirs here, not in the build's directory.
const HOST_BINARY_DIRS: &[&str] = &["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin"];
const LAB_CLUSTER: &str = "lab";
const UP_DEADLINE: Duration = Duration::from_secs(900);

/// What `lab up` wrote, for `status` and `down`.
#[derive(serde::Serialize, serde::Deserialize)]
struct LabRecord {
    netns: bool,
    nodes: Vec<LabNode>,
}

#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct LabNode {
    name: String,
    ip: Ipv4Addr,
    roles: Vec<String>,
}

fn record_path(dir: &Path) -> PathBuf {
    dir.join("lab.json")
}

fn load(dir: &Path) -> Result<LabRecord, CliError> {
    let text = std::fs::read(record_path(dir)).map_err(|e| {
        CliError::Usage(format!(
            "no lab in {} ({e}); start one with `cluster-agent lab up`",
            dir.display()
        ))
    })?;
    serde_json::from_slice(&text)
        .map_err(|e| CliError::Failed(format!("{} is corrupt: {e}", record_path(dir).display())))
}

fn node_paths(dir: &Path, node: &str) -> HostPaths {
    HostPaths::new(&dir.join(node), None, None)
}

pub async fn lab(command: &LabCommand) -> Result<i32, CliError> {
    match command {
        LabCommand::Up(args) => up(args).await,
        LabCommand::Status { dir } => {
            status(dir).map(|done| if done { EXIT_OK } else { EXIT_FAILURE })
        }
        LabCommand::Down { dir } => down(dir).await,
    }
}

fn plan_nodes(args: &LabUpArgs) -> Vec<LabNode> {
    let net = if args.netns { BRIDGE_NET } else { LOOPBACK_NET };
    let ip = |host: u8| Ipv4Addr::new(net[0], net[1], net[2], host);
    let mut nodes: Vec<LabNode> = (1..=args.masters)
        .map(|i| LabNode {
            name: format!("cp-{i}"),
            ip: ip(10 + i),
            roles: vec!["control-plane".into()],
        })
        .chain((1..=args.workers).map(|i| LabNode {
            name: format!("w-{i}"),
            ip: ip(100 + i),
            roles: vec!["worker".into()],
        }))
        .collect();
    // Monitors go with the first nodes, as on a small rack.
    for node in nodes.iter_mut().take(args.ceph_mons as usize) {
        node.roles.push("ceph-mon".into());
    }
    nodes
}

/// The floating endpoint's host part on the lab's bridge, below every
/// node's.
const FLOATING_HOST: u8 = 10;

fn cluster_yaml(nodes: &[LabNode], args: &LabUpArgs) -> String {
    let net = if args.netns { BRIDGE_NET } else { LOOPBACK_NET };
    let prefix = format!("{}.{}.{}", net[0], net[1], net[2]);
    let endpoint = if args.floating_endpoint {
        format!("{prefix}.{FLOATING_HOST}:6443\n  floating_endpoint: true")
    } else {
        format!("{}:6443", nodes[0].ip)
    };
    let mut yaml = format!(
        "# Written by `cluster-agent lab up`.\ncluster:\n  name: {LAB_CLUSTER}\n  control_plane_endpoint: {endpoint}\n  networking:\n    prefix_length: 24\n  kubelet:\n    eviction_hard: {{{}}}\n  ceph:\n    public_network: {prefix}.0/24\n    dashboard: {}\nnodes:\n",
        crate::config::SHARED_DISK_EVICTION_HARD,
        args.ceph_dashboard,
    );
    for n in nodes {
        yaml.push_str(&format!(
            "  - name: {}\n    ip: {}\n    roles: [{}]\n",
            n.name,
            n.ip,
            n.roles.join(", ")
        ));
    }
    yaml
}

fn ip_cmd(args: &[&str]) -> Result<(), CliError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| CliError::Failed(format!("cannot run `ip`: {e} (install iproute2)")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(CliError::Failed(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

fn create_network(nodes: &[LabNode]) -> Result<(), CliError> {
    ip_cmd(&["link", "add", BRIDGE, "type", "bridge"])?;
    ip_cmd(&["link", "set", BRIDGE, "up"])?;
    for (i, node) in nodes.iter().enumerate() {
        let ns = format!("{NETNS_PREFIX}{}", node.name);
        let veth = format!("{BRIDGE}v{i}");
        ip_cmd(&["netns", "add", &ns])?;
        ip_cmd(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        ip_cmd(&["link", "set", &veth, "master", BRIDGE, "up"])?;
        ip_cmd(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{}/24", node.ip),
            "dev",
            "eth0",
        ])?;
        ip_cmd(&["-n", &ns, "link", "set", "eth0", "up"])?;
        ip_cmd(&["-n", &ns, "link", "set", "lo", "up"])?;
        // A node's own traffic to a ClusterIP is routed before kube-proxy's
        // DNAT rewrites it, so the Service range needs a route: a default
        // one, as every real node has.
        ip_cmd(&["-n", &ns, "route", "add", "default", "dev", "eth0"])?;
    }
    Ok(())
}

/// The directory tools/kube-bins/build links the binaries it built into:
/// `$CLUSTER_AGENT_BIN_CACHE/bin`, else `/var/cache/cluster-agent/bin`.
/// The tests find them there too.
pub fn built_bin_dir() -> PathBuf {
    std::env::var_os("CLUSTER_AGENT_BIN_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/cluster-agent"))
        .join("bin")
}

fn node_binaries(node: &LabNode) -> Vec<&'static str> {
    let mut names = NODE_BINARIES.to_vec();
    if node.roles.iter().any(|r| r == "control-plane") {
        names.extend(MASTER_BINARIES);
    }
    names
}

/// `name` from the build's directory, else from the host's system dirs.
fn lab_binary(bin_dir: &Path, name: &str) -> Option<PathBuf> {
    std::iter::once(bin_dir.to_path_buf())
        .chain(HOST_BINARY_DIRS.iter().map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Every binary the lab's nodes need is there; else how to get them.
fn check_binaries(dir: &Path, nodes: &[LabNode]) -> Result<(), CliError> {
    let mut missing: Vec<&str> = nodes
        .iter()
        .flat_map(node_binaries)
        .filter(|name| lab_binary(dir, name).is_none())
        .collect();
    let plugins: Vec<PathBuf> = vec![PathBuf::from(CNI_PLUGIN_DIR)];
    if !crate::podnet::missing_plugins(&plugins).is_empty() {
        return Err(CliError::Usage(format!(
            "the CNI reference plugins are not in {CNI_PLUGIN_DIR}: `sudo .ci/setup` installs \
             Debian's containernetworking-plugins"
        )));
    }
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    Err(CliError::Usage(format!(
        "{} not in {} or the system's directories: `sudo .ci/setup` installs runc and builds \
         the real etcd, Kubernetes and containerd binaries (tools/kube-bins/build; about 25 \
         minutes the first time), or point --bin-dir at a directory that has them",
        missing.join(", "),
        dir.display()
    )))
}

async fn up(args: &LabUpArgs) -> Result<i32, CliError> {
    if args.masters == 0 {
        return Err(CliError::Usage(
            "a cluster needs at least one master (--masters)".into(),
        ));
    }
    if args.masters > 1 && !args.netns {
        return Err(CliError::Usage(
            "more than one master needs --netns (as root): etcd checks each peer's certificate \
             against the address it connects from, and on a shared loopback every peer comes \
             from 127.0.0.1"
                .into(),
        ));
    }
    if args.ceph_dashboard && args.ceph_mons > args.masters {
        return Err(CliError::Usage(format!(
            "--ceph-dashboard needs every monitor on a master (its certificate comes from the \
             cluster CA): --ceph-mons {} is more than --masters {}",
            args.ceph_mons, args.masters
        )));
    }
    let dir = &args.dir;
    if record_path(dir).exists() {
        return Err(CliError::Usage(format!(
            "a lab already runs in {}; `cluster-agent lab down --dir {}` first",
            dir.display(),
            dir.display()
        )));
    }
    let nodes = plan_nodes(args);
    let bin_dir = args.bin_dir.clone().unwrap_or_else(built_bin_dir);
    check_binaries(&bin_dir, &nodes)?;
    let agent = std::env::current_exe()
        .map_err(|e| CliError::Failed(format!("cannot find this binary: {e}")))?;
    let yaml = cluster_yaml(&nodes, args);
    let secret: [u8; 32] = rand::random();
    for node in &nodes {
        let paths = node_paths(dir, &node.name);
        let write = |path: PathBuf, bytes: &[u8], mode| {
            crate::fsutil::write_atomic(&path, bytes, mode)
                .map_err(|e| CliError::Failed(crate::error_chain(&e)))
        };
        write(
            paths.config_dir().join(crate::config::CLUSTER_FILE),
            yaml.as_bytes(),
            crate::fsutil::PUBLIC_MODE,
        )?;
        // As `render ignition` ships it: worker-only nodes get the worker
        // secret derived from the cluster's.
        let config = crate::config::load(paths.config_dir())?;
        let spec = config
            .node(&node.name)
            .expect("the lab's cluster.yaml lists every lab node");
        let node_secret = if crate::join::JoinKeys::holds_worker_secret(spec) {
            crate::join::JoinKeys::worker_secret(&secret, LAB_CLUSTER).to_vec()
        } else {
            secret.to_vec()
        };
        write(
            paths.config_dir().join(crate::config::JOIN_SECRET_FILE),
            &node_secret,
            crate::fsutil::SECRET_MODE,
        )?;
        let bin = paths.host(crate::paths::BINARY_DIRS[0]);
        for name in node_binaries(node) {
            let found = lab_binary(&bin_dir, name).expect("checked before");
            std::fs::create_dir_all(&bin)
                .and_then(|_| std::os::unix::fs::symlink(&found, bin.join(name)))
                .map_err(|e| CliError::Failed(format!("linking {}: {e}", found.display())))?;
        }
        let cni = paths.host(CNI_PLUGIN_DIR);
        std::fs::create_dir_all(cni.parent().expect("under the root"))
            .and_then(|_| std::os::unix::fs::symlink(CNI_PLUGIN_DIR, &cni))
            .map_err(|e| CliError::Failed(format!("linking {}: {e}", cni.display())))?;
    }
    let record = LabRecord {
        netns: args.netns,
        nodes: nodes.clone(),
    };
    crate::fsutil::write_atomic(
        &record_path(dir),
        &serde_json::to_vec_pretty(&record).expect("serialisable"),
        crate::fsutil::PUBLIC_MODE,
    )
    .map_err(|e| CliError::Failed(crate::error_chain(&e)))?;
    if args.netns {
        create_network(&nodes)?;
    }

    let started = Instant::now();
    let mut children: Vec<(String, Child, Option<Duration>)> = Vec::new();
    for node in &nodes {
        let root = dir.join(&node.name);
        let log = std::fs::File::create(root.join("agent.log"))
            .map_err(|e| CliError::Failed(format!("agent log: {e}")))?;
        let mut cmd = if args.netns {
            // nsenter, not `ip netns exec`: that one remounts /sys for the
            // namespace, which hides the cgroup mounts the kubelet needs.
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/run/netns/{NETNS_PREFIX}{}", node.name))
                .arg("--")
                .arg(&agent);
            c
        } else {
            Command::new(&agent)
        };
        cmd.arg("--root")
            .arg(&root)
            .args(["--node", &node.name, "--services", "process", "run"])
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(
                log.try_clone()
                    .map_err(|e| CliError::Failed(e.to_string()))?,
            )
            .stderr(log);
        let child = cmd
            .spawn()
            .map_err(|e| CliError::Failed(format!("starting {}: {e}", node.name)))?;
        children.push((node.name.clone(), child, None));
    }

    // Live progress: one line per node, redrawn in place.
    let mut drawn = 0;
    let mut interval = tokio::time::interval(Duration::from_millis(200));
    loop {
        interval.tick().await;
        for (_, child, finished) in children.iter_mut() {
            if finished.is_none() && child.try_wait().ok().flatten().is_some() {
                *finished = Some(started.elapsed());
            }
        }
        let lines: Vec<String> = nodes
            .iter()
            .zip(&children)
            .map(|(node, (_, _, finished))| progress_line(dir, node, *finished, started.elapsed()))
            .collect();
        let mut out = std::io::stdout().lock();
        if drawn > 0 {
            let _ = write!(out, "\x1b[{drawn}A");
        }
        for line in &lines {
            let _ = writeln!(out, "\x1b[2K{line}");
        }
        let _ = out.flush();
        drawn = lines.len();
        if children.iter().all(|(_, _, f)| f.is_some()) || started.elapsed() > UP_DEADLINE {
            break;
        }
    }
    let mut failed = Vec::new();
    for (name, mut child, _) in children {
        let ok = child.try_wait().ok().flatten().is_some_and(|s| s.success());
        if !ok {
            let _ = child.kill();
            failed.push(name);
        }
    }
    println!(
        "lab in {}: {} nodes in {:.1?}{}",
        dir.display(),
        nodes.len(),
        started.elapsed(),
        if failed.is_empty() {
            String::new()
        } else {
            format!("; failed: {} (see <node>/agent.log)", failed.join(", "))
        }
    );
    println!(
        "`cluster-agent lab status --dir {0}`, `cluster-agent lab down --dir {0}`",
        dir.display()
    );
    // Last, so that `eval "$(cluster-agent lab up | tail -1)"` works.
    let first_master = &nodes[0].name;
    println!(
        "export KUBECONFIG={}",
        node_paths(dir, first_master)
            .state_file(crate::phases::control_plane::OPERATOR_KUBECONFIG)
            .display()
    );
    Ok(if failed.is_empty() {
        EXIT_OK
    } else {
        EXIT_FAILURE
    })
}

/// `cp-1  control-plane,ceph-mon  12/24  etcd-start (waiting for …)  3.1s`
fn progress_line(dir: &Path, node: &LabNode, finished: Option<Duration>, now: Duration) -> String {
    let journal = StateStore::new(node_paths(dir, &node.name).state_dir())
        .load_journal()
        .ok()
        .flatten();
    let all_complete = journal.as_ref().is_some_and(|j| j.all_complete());
    let (done, total, current, skipped, failed) = match &journal {
        None => (0, 0, "starting".to_string(), 0, None),
        Some(j) => {
            let complete = j.steps.iter().filter(|s| s.status.is_complete()).count();
            let skipped = j
                .steps
                .iter()
                .filter(|s| s.status == StepStatus::Skipped)
                .count();
            let failed = j
                .steps
                .iter()
                .find(|s| s.status == StepStatus::Failed)
                .map(|s| format!("{}: {}", s.name, s.last_error.clone().unwrap_or_default()));
            let current = j
                .steps
                .iter()
                .find(|s| s.status == StepStatus::Running)
                .map(|s| match &s.waiting_for {
                    Some(w) => format!("{} (waiting for {w})", s.name),
                    None => s.name.clone(),
                })
                .unwrap_or_default();
            (complete, j.steps.len(), current, skipped, failed)
        }
    };
    let state = match (finished, failed) {
        (_, Some(f)) => format!("FAILED {f}"),
        (Some(t), None) => format!("done in {t:.1?} ({skipped} skipped)"),
        (None, None) if all_complete => format!("done ({skipped} skipped)"),
        (None, None) => format!("{current} {now:.0?}"),
    };
    let mut line = format!(
        "{:<6} {:<24} {done:>2}/{total:<2} {state}",
        node.name,
        node.roles.join(",")
    );
    line.truncate(160);
    line
}

fn status(dir: &Path) -> Result<bool, CliError> {
    let record = load(dir)?;
    let mut all_done = true;
    for node in &record.nodes {
        let journal = StateStore::new(node_paths(dir, &node.name).state_dir())
            .load_journal()
            .ok()
            .flatten();
        let complete = journal.as_ref().is_some_and(|j| j.all_complete());
        all_done &= complete;
        println!("{}", progress_line(dir, node, None, Duration::ZERO));
    }
    Ok(all_done)
}

async fn down(dir: &Path) -> Result<i32, CliError> {
    let record = load(dir)?;
    for node in &record.nodes {
        let paths = node_paths(dir, &node.name);
        let services = crate::services::ProcessManager::new(paths.clone());
        // Pods outlive containerd (KillMode=process): stop the kubelet so
        // it does not restart them, then the pods, then the rest.
        let kubelet = crate::phases::kubelet::UNIT;
        if let Err(e) = services.stop(kubelet).await {
            eprintln!("{}: stopping {kubelet}: {e}", node.name);
        }
        let socket = crate::containerd::cri_socket(&paths);
        if socket.exists()
            && let Err(e) =
                crate::containerd::cri::remove_all_pods(&socket, Duration::from_secs(60)).await
        {
            eprintln!("{}: stopping pods: {e}", node.name);
        }
        // In reset's order: a unit before those it needs, so etcd outlives
        // the API server (which otherwise sits out its stop timeout).
        let units = crate::services::agent_units(&paths)?;
        for unit in super::reset::stop_order(&units) {
            if let Err(e) = services.stop(&unit).await {
                eprintln!("{}: stopping {unit}: {e}", node.name);
            }
        }
    }
    if record.netns {
        for node in &record.nodes {
            let _ = ip_cmd(&["netns", "delete", &format!("{NETNS_PREFIX}{}", node.name)]);
        }
        let _ = ip_cmd(&["link", "delete", BRIDGE]);
    }
    crate::fsutil::unmount_under(dir)
        .map_err(|e| CliError::Failed(format!("unmounting under {}: {e}", dir.display())))?;
    std::fs::remove_dir_all(dir)
        .map_err(|e| CliError::Failed(format!("removing {}: {e}", dir.display())))?;
    println!("lab in {} removed", dir.display());
    Ok(EXIT_OK)
}
