//! Real nodes for the end-to-end rig: each node is a `systemd-nspawn`
//! container booting real systemd as PID 1, from one cached Debian bookworm
//! root file system, with
//!
//! * its own persistent overlay (so a reboot keeps what the node wrote, as a
//!   disk would) and its own cgroup;
//! * its own address on a bridge the rig creates (198.19.<subnet>.x/24, the
//!   benchmarking range, never routed), assigned by systemd-networkd from
//!   the file the agent renders;
//! * the freshly built agent as `/usr/bin/cluster-agent` and our `systemd/`
//!   units in `/usr/lib/systemd/system` (what the image ships), on
//!   control-plane nodes the built etcd and etcdctl (3.6, `.ci/setup`)
//!   copied into `/opt/bin`, and
//!   `/etc/cluster-config` laid out as our Ignition configs lay it out
//!   (cluster.yaml, node-identity, secrets/join-secret 0600) with
//!   `cluster-bootstrap.service` enabled.
//!
//! Needs root, `systemd-container` and `debootstrap` (`.ci/setup`), and the
//! Debian mirror the first time. Every container, mount, cgroup and link the
//! rig makes is removed on drop, also when a test fails.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::{AGENT, NodeDef, built_binary, cluster_yaml};

/// Bump when the root file system's contents or preparation change: the
/// cache is keyed by it.
const ROOTFS_VERSION: &str = "bookworm-v3";
/// No etcd: Debian's (3.4) is not what the agent runs; each control-plane
/// node gets the built one (see [`Rig::install_node`]). debootstrap does
/// not resolve virtual packages: python3-cffi-backend provides the
/// `python3-cffi-backend-api-*` that ceph-mgr's python3-bcrypt and
/// python3-cryptography need.
const PACKAGES: &str = "systemd,systemd-sysv,dbus,libpam-systemd,iproute2,ceph-mon,ceph-mgr,ceph-common,python3-cffi-backend";
const MIRROR: &str = "http://deb.debian.org/debian";

fn target_dir() -> PathBuf {
    // <target>/debug/deps/<test binary>
    let exe = std::env::current_exe().expect("test binary path");
    exe.ancestors()
        .nth(3)
        .expect("inside target/")
        .to_path_buf()
}

/// The root file system every node boots from, built once per machine and
/// cached under `target/` (~40-90 s the first time). Concurrent tests wait
/// for the one that builds it.
pub fn rootfs() -> PathBuf {
    let cache = target_dir().join("rig-rootfs");
    fs::create_dir_all(&cache).unwrap();
    let lock = fs::File::create(cache.join(".lock")).unwrap();
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("lock the rootfs cache");
    let done = cache.join(ROOTFS_VERSION);
    if done.join("usr/bin/ceph-mgr").exists() {
        return done;
    }
    for tool in ["debootstrap", "systemd-nspawn", "nsenter"] {
        assert!(
            which(tool),
            "the nspawn rig needs `{tool}`: run `.ci/setup` (apt-get install systemd-container debootstrap)"
        );
    }
    let building = cache.join(format!("{ROOTFS_VERSION}.partial"));
    let _ = fs::remove_dir_all(&building);
    let log = cache.join("debootstrap.log");
    let started = Instant::now();
    let status = Command::new("debootstrap")
        .args([
            "--variant=minbase",
            &format!("--include={PACKAGES}"),
            "bookworm",
        ])
        .arg(&building)
        .arg(MIRROR)
        .stdout(fs::File::create(&log).unwrap())
        .stderr(Stdio::inherit())
        .status()
        .expect("run debootstrap");
    assert!(
        status.success(),
        "debootstrap failed ({status}); see {}",
        log.display()
    );
    prepare_image(&building);
    fs::rename(&building, &done).unwrap();
    eprintln!(
        "rig: built the node root file system in {:.1?}",
        started.elapsed()
    );
    done
}

fn which(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file()))
}

/// Makes the Debian tree look like a Flatcar node before Ignition: networkd
/// manages the links; the daemons Debian enables on install (its ceph
/// units) are not enabled, because on our nodes only the agent starts them.
fn prepare_image(root: &Path) {
    let wants = |target: &str| {
        root.join("etc/systemd/system")
            .join(format!("{target}.wants"))
    };
    for leftover in [
        wants("multi-user.target").join("ceph.target"),
        wants("multi-user.target").join("ceph-mon.target"),
        wants("ceph.target").join("ceph-mon.target"),
        wants("multi-user.target").join("ceph-mgr.target"),
        wants("ceph.target").join("ceph-mgr.target"),
    ] {
        let _ = fs::remove_file(leftover);
    }
    for (target, unit) in [
        ("multi-user.target", "systemd-networkd.service"),
        ("sockets.target", "systemd-networkd.socket"),
        (
            "network-online.target",
            "systemd-networkd-wait-online.service",
        ),
    ] {
        enable(root, target, &format!("/usr/lib/systemd/system/{unit}"));
    }
}

/// What `systemctl enable` (or Ignition's `enabled: true`) leaves behind.
fn enable(root: &Path, target: &str, unit_path: &str) {
    let dir = root
        .join("etc/systemd/system")
        .join(format!("{target}.wants"));
    fs::create_dir_all(&dir).unwrap();
    let link = dir.join(Path::new(unit_path).file_name().unwrap());
    let _ = fs::remove_file(&link);
    symlink(unit_path, link).unwrap();
}

pub struct Rig {
    dir: tempfile::TempDir,
    pub nodes: Vec<NodeDef>,
    subnet: u8,
    lower: PathBuf,
    /// The running `systemd-nspawn` of each booted node.
    running: BTreeMap<String, Child>,
}

impl Rig {
    /// Lays out one node per `(name, roles)` and creates the bridge; boots
    /// nothing.
    pub fn new(spec: &[(&str, &[&'static str])]) -> Rig {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the nspawn rig needs root (containers, mounts, links)"
        );
        let subnet = super::loopback_subnet();
        let prefix = format!("198.19.{subnet}");
        let nodes: Vec<NodeDef> = spec
            .iter()
            .enumerate()
            .map(|(i, (name, roles))| NodeDef {
                name: name.to_string(),
                ip: format!("{prefix}.{}", i + 11),
                roles: roles.to_vec(),
                mac: String::new(),
            })
            .collect();
        let rig = Rig {
            dir: tempfile::tempdir().unwrap(),
            lower: rootfs(),
            subnet,
            running: BTreeMap::new(),
            nodes,
        };
        let yaml = cluster_yaml(&rig.nodes, &prefix, false);
        let secret: [u8; 32] = rand::random();
        for node in &rig.nodes {
            rig.install_node(&node.name, &yaml, &secret);
            rig.mount(&node.name);
        }
        let bridge = rig.bridge();
        let _ = Command::new("ip").args(["link", "del", &bridge]).output();
        ip(&["link", "add", &bridge, "type", "bridge"]);
        ip(&["link", "set", &bridge, "up"]);
        rig
    }

    fn bridge(&self) -> String {
        format!("rigbr{}", self.subnet)
    }

    fn machine(&self, node: &str) -> String {
        let i = self.nodes.iter().position(|n| n.name == node).unwrap();
        format!("rg{}n{i}", self.subnet)
    }

    fn base(&self, node: &str) -> PathBuf {
        self.dir.path().join(node)
    }

    /// The node's file system as it sees it (the mounted overlay).
    pub fn root(&self, node: &str) -> PathBuf {
        self.base(node).join("merged")
    }

    fn upper(&self, node: &str) -> PathBuf {
        self.base(node).join("upper")
    }

    /// The image's and Ignition's share of the node, written into the
    /// overlay's upper layer before the first boot.
    fn install_node(&self, node: &str, yaml: &str, secret: &[u8]) {
        let upper = self.upper(node);
        let config = upper.join("etc/cluster-config");
        fs::create_dir_all(config.join("secrets")).unwrap();
        fs::create_dir_all(self.base(node).join("work")).unwrap();
        fs::create_dir_all(self.root(node)).unwrap();
        fs::write(config.join("cluster.yaml"), yaml).unwrap();
        fs::write(config.join("node-identity"), format!("{node}\n")).unwrap();
        let secret_path = config.join("secrets/join-secret");
        fs::write(&secret_path, secret).unwrap();
        fs::set_permissions(&secret_path, fs::Permissions::from_mode(0o600)).unwrap();
        fs::create_dir_all(upper.join("usr/bin")).unwrap();
        fs::copy(AGENT, upper.join("usr/bin/cluster-agent")).unwrap();
        let units = upper.join("usr/lib/systemd/system");
        fs::create_dir_all(&units).unwrap();
        let repo_units = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd");
        for unit in fs::read_dir(repo_units).unwrap().flatten() {
            fs::copy(unit.path(), units.join(unit.file_name())).unwrap();
        }
        enable(
            &upper,
            "multi-user.target",
            "/usr/lib/systemd/system/cluster-bootstrap.service",
        );
        let spec = self.nodes.iter().find(|n| n.name == node).unwrap();
        if spec.roles.contains(&"control-plane") {
            // Copies: the container does not see the host's build cache.
            let bin = upper.join("opt/bin");
            fs::create_dir_all(&bin).unwrap();
            for name in ["etcd", "etcdctl"] {
                fs::copy(built_binary(name), bin.join(name)).unwrap();
            }
        }
    }

    fn mounted(&self, node: &str) -> bool {
        let merged = self.root(node);
        fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .any(|l| l.split(' ').nth(4) == merged.to_str())
    }

    /// The node's disk: the image below, what the node writes above.
    fn mount(&self, node: &str) {
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            self.lower.display(),
            self.upper(node).display(),
            self.base(node).join("work").display()
        );
        let out = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o", &options])
            .arg(self.root(node))
            .output()
            .unwrap();
        assert!(out.status.success(), "mount overlay: {}", text(&out));
    }

    /// The node's cgroup in every hierarchy systemd-nspawn consults: it
    /// places the container below the cgroup it finds itself in on the
    /// unified (v2) hierarchy, and mirrors that on v1's name=systemd one; a
    /// process moved on one hierarchy only would share `/payload` with every
    /// other container, and their systemds would manage each other's units.
    fn cgroups(&self, node: &str) -> Vec<PathBuf> {
        let name = format!("rig-{}", self.machine(node));
        let hybrid = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup/systemd"]
            .map(Path::new)
            .into_iter()
            .filter(|h| h.join("cgroup.procs").exists())
            .map(|h| h.join(&name))
            .collect::<Vec<_>>();
        if hybrid.is_empty() {
            vec![Path::new("/sys/fs/cgroup").join(name)]
        } else {
            hybrid
        }
    }

    /// Powers the node on: systemd boots, and with it
    /// cluster-bootstrap.service. Returns once the node's system bus
    /// answers.
    pub fn boot(&mut self, node: &str) {
        assert!(!self.running.contains_key(node), "{node} is already up");
        // One cgroup per container, or systemd-nspawn makes them share one.
        let procs: Vec<PathBuf> = self
            .cgroups(node)
            .into_iter()
            .map(|cgroup| {
                fs::create_dir_all(&cgroup).unwrap();
                cgroup.join("cgroup.procs")
            })
            .collect();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.base(node).join("console.log"))
            .unwrap();
        let mut cmd = Command::new("systemd-nspawn");
        cmd.arg("-D")
            .arg(self.root(node))
            .args(["-b", "-M", &self.machine(node)])
            .args(["--register=no", "--keep-unit", "--console=passive"])
            .arg(format!("--network-bridge={}", self.bridge()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // SAFETY: only write(2)s to cgroup files between fork and exec.
        unsafe {
            cmd.pre_exec(move || procs.iter().try_for_each(|p| fs::write(p, b"0")));
        }
        let child = cmd.spawn().expect("start systemd-nspawn");
        self.running.insert(node.to_string(), child);
        let up = poll(Duration::from_secs(60), || {
            let out = self.try_exec(node, "systemctl", &["is-system-running"])?;
            let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
            matches!(
                state.as_str(),
                "starting" | "running" | "degraded" | "initializing"
            )
            .then_some(())
        });
        if up.is_none() {
            let console =
                fs::read_to_string(self.base(node).join("console.log")).unwrap_or_default();
            panic!("{node} did not boot within 60 s; its console:\n{console}");
        }
    }

    /// PID 1 of the node's container, as the host sees it.
    pub fn leader(&self, node: &str) -> Option<u32> {
        let nspawn = self.running.get(node)?.id();
        let children = fs::read_to_string(format!("/proc/{nspawn}/task/{nspawn}/children")).ok()?;
        children.split_whitespace().next()?.parse().ok()
    }

    fn try_exec(&self, node: &str, program: &str, args: &[&str]) -> Option<Output> {
        let leader = self.leader(node)?;
        Command::new("nsenter")
            .args(["-t", &leader.to_string(), "-a", program])
            .args(args)
            .output()
            .ok()
    }

    /// Runs `program` inside the node (all its namespaces, as an operator
    /// over SSH would).
    pub fn exec(&self, node: &str, program: &str, args: &[&str]) -> Output {
        self.try_exec(node, program, args)
            .unwrap_or_else(|| panic!("{node} is not running"))
    }

    /// `systemctl show` of `unit` inside the node, as key → value.
    pub fn unit(&self, node: &str, unit: &str) -> BTreeMap<String, String> {
        let out = self.exec(
            node,
            "systemctl",
            &[
                "show",
                "-p",
                "ActiveState,SubState,Result,StatusText,ExecMainStatus,NRestarts",
                unit,
            ],
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The agent's log in the node's journal.
    pub fn bootstrap_log(&self, node: &str) -> String {
        text(&self.exec(
            node,
            "journalctl",
            &["-u", "cluster-bootstrap.service", "--no-pager", "-o", "cat"],
        ))
    }

    /// Pulls the plug: SIGKILL to the container's PID 1 ends every process
    /// in it at once, without a shutdown.
    pub fn power_off(&mut self, node: &str) {
        // Everything the container ever started is in its cgroup tree (its
        // systemd makes sub-cgroups below the one it was started in), so
        // that is what is killed: the container's PID 1 alone could be
        // missed while systemd-nspawn is still between its forks.
        let cgroups = self.cgroups(node);
        let emptied = poll(Duration::from_secs(10), || {
            let pids: Vec<i32> = cgroups.iter().flat_map(|c| cgroup_pids(c)).collect();
            for pid in &pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            pids.is_empty().then_some(())
        });
        if emptied.is_none() {
            // Not a panic: this also runs in Drop, while a test unwinds.
            eprintln!("rig: {node}: processes survived SIGKILL for 10 s");
        }
        if let Some(mut child) = self.running.remove(node) {
            let _ = child.wait();
        }
        // The link goes with the container's network namespace once its
        // last process is gone; the next boot needs the name again.
        let link = Path::new("/sys/class/net").join(self.link(node));
        if poll(Duration::from_secs(10), || (!link.exists()).then_some(())).is_none() {
            let _ = Command::new("ip")
                .args(["link", "del", &self.link(node)])
                .output();
        }
    }

    /// The host side of the node's link (what a switch port is).
    pub fn link(&self, node: &str) -> String {
        format!("vb-{}", self.machine(node))
    }

    pub fn set_link(&self, node: &str, up: bool) {
        ip(&[
            "link",
            "set",
            &self.link(node),
            if up { "up" } else { "down" },
        ]);
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let names: Vec<String> = self.running.keys().cloned().collect();
        for node in names {
            self.power_off(&node);
        }
        for node in self
            .nodes
            .iter()
            .map(|n| n.name.clone())
            .collect::<Vec<_>>()
        {
            if self.mounted(&node) {
                let _ = Command::new("umount").arg(self.root(&node)).output();
            }
            for cgroup in self.cgroups(&node) {
                remove_cgroup(&cgroup);
            }
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge()])
            .output();
    }
}

/// Every process in the cgroup `dir` and below.
fn cgroup_pids(dir: &Path) -> Vec<i32> {
    let mut pids: Vec<i32> = fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            pids.extend(cgroup_pids(&entry.path()));
        }
    }
    pids
}

/// Removes an emptied cgroup tree, children first (cgroupfs refuses
/// anything else).
fn remove_cgroup(dir: &Path) {
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup(&entry.path());
        }
    }
    let _ = fs::remove_dir(dir);
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("iproute2");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        text(&out)
    );
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Polls `probe` with a short, growing interval until it yields a value;
/// panics naming `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, probe: impl FnMut() -> Option<T>) -> T {
    poll(timeout, probe).unwrap_or_else(|| panic!("timed out after {timeout:?} waiting for {what}"))
}

/// Polls `probe` with a short, growing interval; `None` after `timeout`.
pub fn poll<T>(timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(10);
    loop {
        if let Some(value) = probe() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(200));
    }
}
