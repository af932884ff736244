//! The seam to containerd, the container runtime of every Kubernetes node:
//! where its binaries, files and sockets are under `--root`, the
//! `config.toml` it runs with, and the CRI `Version` call that tells a
//! serving runtime from one that is not there yet ([`cri`]).
//!
//! Everything containerd touches on the host is placed under `--root` —
//! its root and state dirs, the gRPC/ttrpc sockets, NRI's socket, the CNI,
//! CDI and registry dirs — so several nodes can each run their own
//! containerd on one machine (tests, `lab`) without meeting.
//!
//! The kubelet must use the same two facts: [`cri_endpoint`] for
//! `containerRuntimeEndpoint` and [`cgroup_driver`] for `cgroupDriver`.

pub mod cri;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::config::ClusterConfig;
use crate::paths::HostPaths;

pub use cri::{CriError, RuntimeVersion};

pub const CONTAINERD: &str = "containerd";
pub const SHIM: &str = "containerd-shim-runc-v2";
pub const RUNC: &str = "runc";
/// The programs this module's phase needs, looked up with
/// [`HostPaths::find_binary`].
pub const BINARIES: [&str; 3] = [CONTAINERD, SHIM, RUNC];

pub const CONFIG_FILE: &str = "/etc/containerd/config.toml";
/// Operator drop-ins merged over [`CONFIG_FILE`] (containerd's own default
/// `imports`, here under `--root`).
pub const DROP_IN_GLOB: &str = "/etc/containerd/conf.d/*.toml";
pub const ROOT_DIR: &str = "/var/lib/containerd";
pub const STATE_DIR: &str = "/run/containerd";
pub const SOCKET: &str = "/run/containerd/containerd.sock";
/// containerd's `opt` plugin dir (it prepends `<dir>/bin` to its PATH).
pub const OPT_DIR: &str = "/opt/containerd";
pub const CERTS_DIR: &str = "/etc/containerd/certs.d";
pub const NRI_SOCKET: &str = "/run/nri/nri.sock";
pub const NRI_PLUGIN_DIR: &str = "/opt/nri/plugins";
pub const NRI_CONF_DIR: &str = "/etc/nri/conf.d";
pub const CDI_DIRS: [&str; 2] = ["/etc/cdi", "/run/cdi"];
pub const CNI_CONF_DIR: &str = "/etc/cni/net.d";
/// Where CNI plugin binaries are looked for, in this order. `/opt/cni/bin`
/// is the CNI convention: containerd's default, what Flatcar and the
/// network providers' DaemonSets (Calico, Cilium, Flannel) install into,
/// so a provider's plugins — built for it — win. `/usr/lib/cni` is where
/// Debian's containernetworking-plugins puts them. containerd 2.1+ takes a
/// list (`bin_dirs`) and searches it per plugin, and a missing dir is
/// simply skipped: listing both, whether they exist yet or not, keeps the
/// rendered config stable when a DaemonSet creates `/opt/cni/bin` later
/// (picking "the first that exists" would change the config, and restart
/// containerd, on the next run).
pub const CNI_BIN_DIRS: [&str; 2] = ["/opt/cni/bin", "/usr/lib/cni"];
/// `OVERLAYFS_SUPER_MAGIC` from `<linux/magic.h>`.
const OVERLAYFS_MAGIC: i64 = 0x794c_7630;

/// `<root>/run/containerd/containerd.sock`: the CRI (and containerd API)
/// socket.
pub fn cri_socket(paths: &HostPaths) -> PathBuf {
    paths.host(SOCKET)
}

/// `unix://<root>/run/containerd/containerd.sock`, the kubelet's
/// `containerRuntimeEndpoint` (and `crictl --runtime-endpoint`).
pub fn cri_endpoint(paths: &HostPaths) -> String {
    endpoint_of(&cri_socket(paths))
}

fn endpoint_of(socket: &Path) -> String {
    format!("unix://{}", socket.display())
}

/// Who creates the containers' cgroups. The kubelet's `cgroupDriver` and
/// runc's `SystemdCgroup` must agree, or the kubelet refuses to run pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupDriver {
    Systemd,
    Cgroupfs,
}

impl CgroupDriver {
    /// The kubelet's `cgroupDriver` value.
    pub fn as_str(self) -> &'static str {
        match self {
            CgroupDriver::Systemd => "systemd",
            CgroupDriver::Cgroupfs => "cgroupfs",
        }
    }
}

/// `systemd` when the host runs systemd — `<root>/run/systemd/system` is a
/// directory, the test `sd_booted()` makes (and `--services auto`) — so
/// that systemd, which owns the cgroup tree there, is the one manager of
/// it, as Kubernetes recommends; `cgroupfs` otherwise (a temp root in
/// tests and the lab, where the process backend runs everything and no
/// systemd manages that root's cgroups). One function for containerd and
/// the kubelet, so the two cannot disagree.
pub fn cgroup_driver(paths: &HostPaths) -> CgroupDriver {
    let booted = paths
        .host("/run/systemd/system")
        .symlink_metadata()
        .is_ok_and(|m| m.is_dir());
    if booted {
        CgroupDriver::Systemd
    } else {
        CgroupDriver::Cgroupfs
    }
}

/// The cgroup under which the kubelet puts its pods (`cgroupRoot`), when
/// it is not the machine's root cgroup: a node under a `--root` other than
/// `/` shares the machine with other nodes (tests, `lab`), and kubelets
/// that share `/kubepods` remove each other's pods as orphans. A real
/// node (`--root /`) keeps the kubelet's default.
pub fn pod_cgroup_root(paths: &HostPaths, node: &str) -> Option<String> {
    (paths.root() != Path::new("/")).then(|| format!("/cluster-agent/{node}"))
}

/// Creates `cgroup` (a path like `/cluster-agent/w-1`) in every cgroup
/// hierarchy mounted on this machine: the kubelet refuses a `cgroupRoot`
/// that does not exist in each one it uses.
pub fn ensure_cgroup(cgroup: &str) -> std::io::Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    for line in mounts.lines() {
        let mut fields = line.split_whitespace();
        let (Some(_), Some(dir), Some(kind)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        if kind == "cgroup" || kind == "cgroup2" {
            std::fs::create_dir_all(Path::new(dir).join(cgroup.trim_start_matches('/')))?;
        }
    }
    Ok(())
}

/// How containerd stores image layers and container root file systems.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Snapshotter {
    Overlayfs,
    Native,
}

impl Snapshotter {
    pub fn as_str(self) -> &'static str {
        match self {
            Snapshotter::Overlayfs => "overlayfs",
            Snapshotter::Native => "native",
        }
    }

    /// For a root dir on a file system of type `magic` (statfs `f_type`).
    /// overlayfs (containerd's default) cannot use a dir that is itself on
    /// overlayfs as its upper layer: the kernel refuses the mount
    /// ("overlay: filesystem on … not supported as upperdir", seen on
    /// 6.18). containerd still loads the snapshotter and starts, so the
    /// failure would surface only later, at every image unpack and
    /// container start. That is exactly the case of a node running inside
    /// a container (kind, a CI runner, an nspawn root on overlay);
    /// `native` (plain copies) works on any file system, at the cost of
    /// disk space and speed.
    pub fn for_filesystem(magic: i64) -> Snapshotter {
        if magic == OVERLAYFS_MAGIC {
            Snapshotter::Native
        } else {
            Snapshotter::Overlayfs
        }
    }
}

/// The snapshotter for this node: [`Snapshotter::for_filesystem`] of the
/// file system that holds (or will hold) `<root>/var/lib/containerd` — its
/// nearest existing ancestor before the first start.
pub fn snapshotter(paths: &HostPaths) -> std::io::Result<Snapshotter> {
    let dir = paths.host(ROOT_DIR);
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let fs = nix::sys::statfs::statfs(existing).map_err(|errno| {
        std::io::Error::new(
            std::io::Error::from(errno).kind(),
            format!("statfs {}: {errno}", existing.display()),
        )
    })?;
    #[allow(clippy::unnecessary_cast)] // f_type's width differs by platform
    Ok(Snapshotter::for_filesystem(fs.filesystem_type().0 as i64))
}

/// The binaries of [`BINARIES`] that are missing.
pub fn missing_binaries(paths: &HostPaths) -> Vec<&'static str> {
    BINARIES
        .into_iter()
        .filter(|name| paths.find_binary(name).is_none())
        .collect()
}

/// Everything [`render_config`] needs, as facts already decided: the
/// rendering itself is pure, so tests pin each choice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigInputs {
    pub root_dir: PathBuf,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub drop_ins: PathBuf,
    pub opt_dir: PathBuf,
    pub certs_dir: PathBuf,
    pub nri_socket: PathBuf,
    pub nri_plugin_dir: PathBuf,
    pub nri_conf_dir: PathBuf,
    pub cdi_dirs: Vec<PathBuf>,
    pub cni_conf_dir: PathBuf,
    pub cni_bin_dirs: Vec<PathBuf>,
    pub shim: PathBuf,
    pub runc: PathBuf,
    pub cgroup_driver: CgroupDriver,
    pub snapshotter: Snapshotter,
    pub sandbox_image: String,
    /// `linux/amd64`: the platform images are unpacked for.
    pub platform: String,
    /// The agent (and so containerd) lacks `CAP_SYS_RESOURCE`: the kubelet
    /// asks for OOM scores below containerd's own (-998 for sandboxes),
    /// which only that capability may set, and runc then fails every
    /// container with "write /proc/self/oom_score_adj: permission denied".
    /// That is the case inside a container or a sandbox that drops the
    /// capability (a CI runner, this project's build machines); containerd
    /// then clamps the scores to its own instead.
    pub restrict_oom_score_adj: bool,
}

impl ConfigInputs {
    /// The inputs for this node, every path under `--root`.
    pub fn detect(paths: &HostPaths, config: &ClusterConfig) -> std::io::Result<ConfigInputs> {
        Ok(ConfigInputs {
            root_dir: paths.host(ROOT_DIR),
            state_dir: paths.host(STATE_DIR),
            socket: cri_socket(paths),
            drop_ins: paths.host(DROP_IN_GLOB),
            opt_dir: paths.host(OPT_DIR),
            certs_dir: paths.host(CERTS_DIR),
            nri_socket: paths.host(NRI_SOCKET),
            nri_plugin_dir: paths.host(NRI_PLUGIN_DIR),
            nri_conf_dir: paths.host(NRI_CONF_DIR),
            cdi_dirs: CDI_DIRS.iter().map(|d| paths.host(d)).collect(),
            cni_conf_dir: paths.host(CNI_CONF_DIR),
            cni_bin_dirs: CNI_BIN_DIRS.iter().map(|d| paths.host(d)).collect(),
            shim: paths.binary(SHIM),
            runc: paths.binary(RUNC),
            cgroup_driver: cgroup_driver(paths),
            snapshotter: snapshotter(paths)?,
            sandbox_image: config.cluster.containerd.sandbox_image.to_string(),
            platform: platform(),
            restrict_oom_score_adj: !has_effective_capability(
                &std::fs::read_to_string("/proc/self/status")?,
                CAP_SYS_RESOURCE,
            ),
        })
    }
}

/// `CAP_SYS_RESOURCE` from `<linux/capability.h>`.
const CAP_SYS_RESOURCE: u32 = 24;

/// Whether `/proc/<pid>/status` text shows capability `bit` in `CapEff`.
/// Unreadable text counts as not having it: clamping scores is the safe
/// side (containers still run; only their OOM ranking is coarser).
fn has_effective_capability(status: &str, bit: u32) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << bit) != 0)
}

/// containerd's name for this machine's platform (Go's GOOS/GOARCH).
fn platform() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "powerpc64" => "ppc64le",
        other => other,
    };
    format!("linux/{arch}")
}

/// A TOML basic string.
fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn toml_path(p: &Path) -> String {
    toml_str(&p.to_string_lossy())
}

fn toml_paths(ps: &[PathBuf]) -> String {
    let items: Vec<String> = ps.iter().map(|p| toml_path(p)).collect();
    format!("[{}]", items.join(", "))
}

/// containerd 2.x `config.toml` (config version 3). Only what differs from
/// containerd's defaults, or what must be under `--root`, is written;
/// operators add more through drop-ins in [`DROP_IN_GLOB`].
pub fn render_config(i: &ConfigInputs) -> String {
    let systemd_cgroup = i.cgroup_driver == CgroupDriver::Systemd;
    let cri_runtime = "plugins.'io.containerd.cri.v1.runtime'";
    let cri_images = "plugins.'io.containerd.cri.v1.images'";
    let runc = format!("{cri_runtime}.containerd.runtimes.runc");
    let transfer = "plugins.'io.containerd.transfer.v1.local'";
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line(crate::services::unit::AGENT_HEADER.into());
    line("# containerd 2.x; settings of your own go into drop-ins:".into());
    line(format!("#   {}", i.drop_ins.display()));
    line("version = 3".into());
    line(format!("root = {}", toml_path(&i.root_dir)));
    line(format!("state = {}", toml_path(&i.state_dir)));
    line(format!("imports = [{}]", toml_path(&i.drop_ins)));
    // The CRI plugin is what the kubelet talks to: never disabled (some
    // packaged configs disable it), and required, so containerd refuses
    // to start without it instead of running without a CRI.
    line("disabled_plugins = []".into());
    line("required_plugins = [\"io.containerd.grpc.v1.cri\"]".into());
    line(String::new());
    line("[grpc]".into());
    line(format!("  address = {}", toml_path(&i.socket)));
    line(String::new());
    line("[ttrpc]".into());
    line(format!(
        "  address = {}",
        toml_str(&format!("{}.ttrpc", i.socket.display()))
    ));
    line(String::new());
    line("[plugins.'io.containerd.internal.v1.opt']".into());
    line(format!("  path = {}", toml_path(&i.opt_dir)));
    line(String::new());
    line("[plugins.'io.containerd.nri.v1.nri']".into());
    line(format!("  socket_path = {}", toml_path(&i.nri_socket)));
    line(format!("  plugin_path = {}", toml_path(&i.nri_plugin_dir)));
    line(format!(
        "  plugin_config_path = {}",
        toml_path(&i.nri_conf_dir)
    ));
    line(String::new());
    line(format!("[{cri_images}]"));
    line(format!(
        "  snapshotter = {}",
        toml_str(i.snapshotter.as_str())
    ));
    line(String::new());
    line(format!("[{cri_images}.pinned_images]"));
    line(format!("  sandbox = {}", toml_str(&i.sandbox_image)));
    line(String::new());
    line(format!("[{cri_images}.registry]"));
    line(format!("  config_path = {}", toml_path(&i.certs_dir)));
    line(String::new());
    line(format!("[{cri_runtime}]"));
    line(format!("  cdi_spec_dirs = {}", toml_paths(&i.cdi_dirs)));
    line(format!(
        "  restrict_oom_score_adj = {}",
        i.restrict_oom_score_adj
    ));
    line(String::new());
    line(format!("[{cri_runtime}.containerd]"));
    line("  default_runtime_name = \"runc\"".into());
    line(String::new());
    line(format!("[{runc}]"));
    line("  runtime_type = \"io.containerd.runc.v2\"".into());
    // Explicit programs: containerd would otherwise search its PATH (the
    // host's, not the root's).
    line(format!("  runtime_path = {}", toml_path(&i.shim)));
    line(String::new());
    line(format!("[{runc}.options]"));
    line(format!("  BinaryName = {}", toml_path(&i.runc)));
    line(format!("  SystemdCgroup = {systemd_cgroup}"));
    line(String::new());
    line(format!("[{cri_runtime}.cni]"));
    line(format!("  bin_dirs = {}", toml_paths(&i.cni_bin_dirs)));
    line(format!("  conf_dir = {}", toml_path(&i.cni_conf_dir)));
    line(String::new());
    // The transfer service (CRI pulls, `ctr images import`) checks at load
    // time that its unpack snapshotter exists; its default is overlayfs.
    line(format!("[{transfer}]"));
    line(format!("  config_path = {}", toml_path(&i.certs_dir)));
    line(String::new());
    line(format!("[[{transfer}.unpack_config]]"));
    line(format!("  platform = {}", toml_str(&i.platform)));
    line(format!(
        "  snapshotter = {}",
        toml_str(i.snapshotter.as_str())
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(root: &Path) -> ConfigInputs {
        let paths = HostPaths::new(root, None, None);
        ConfigInputs {
            root_dir: paths.host(ROOT_DIR),
            state_dir: paths.host(STATE_DIR),
            socket: cri_socket(&paths),
            drop_ins: paths.host(DROP_IN_GLOB),
            opt_dir: paths.host(OPT_DIR),
            certs_dir: paths.host(CERTS_DIR),
            nri_socket: paths.host(NRI_SOCKET),
            nri_plugin_dir: paths.host(NRI_PLUGIN_DIR),
            nri_conf_dir: paths.host(NRI_CONF_DIR),
            cdi_dirs: CDI_DIRS.iter().map(|d| paths.host(d)).collect(),
            cni_conf_dir: paths.host(CNI_CONF_DIR),
            cni_bin_dirs: CNI_BIN_DIRS.iter().map(|d| paths.host(d)).collect(),
            shim: paths.binary(SHIM),
            runc: paths.host("/usr/sbin/runc"),
            cgroup_driver: CgroupDriver::Cgroupfs,
            snapshotter: Snapshotter::Overlayfs,
            sandbox_image: "registry.k8s.io/pause:3.10.1".into(),
            platform: "linux/amd64".into(),
            restrict_oom_score_adj: false,
        }
    }

    #[test]
    fn oom_scores_are_clamped_without_cap_sys_resource() {
        // This build machine's bounding set: everything but bit 24.
        let without = "Name:\tx\nCapEff:\t000001fffeffffff\nCapBnd:\t000001fffeffffff\n";
        let with = "CapEff:\t000001ffffffffff\n";
        assert!(!has_effective_capability(without, CAP_SYS_RESOURCE));
        assert!(has_effective_capability(with, CAP_SYS_RESOURCE));
        assert!(!has_effective_capability("garbage", CAP_SYS_RESOURCE));
        let mut i = inputs(Path::new("/r"));
        assert!(render_config(&i).contains("restrict_oom_score_adj = false\n"));
        i.restrict_oom_score_adj = true;
        assert!(render_config(&i).contains("restrict_oom_score_adj = true\n"));
    }

    #[test]
    fn every_path_containerd_touches_is_under_the_root() {
        let text = render_config(&inputs(Path::new("/tmp/n1")));
        for key in [
            "root",
            "state",
            "address",
            "path",
            "socket_path",
            "plugin_path",
            "plugin_config_path",
            "config_path",
            "runtime_path",
            "BinaryName",
            "conf_dir",
        ] {
            let values: Vec<&str> = text
                .lines()
                .filter_map(|l| l.trim().strip_prefix(&format!("{key} = ")))
                .collect();
            assert!(!values.is_empty(), "{key} is rendered\n{text}");
            for v in values {
                assert!(v.starts_with("\"/tmp/n1/"), "{key} = {v}");
            }
        }
        assert!(text.contains("address = \"/tmp/n1/run/containerd/containerd.sock\"\n"));
        assert!(text.contains("root = \"/tmp/n1/var/lib/containerd\"\n"));
        assert!(text.contains("state = \"/tmp/n1/run/containerd\"\n"));
        assert!(text.contains("bin_dirs = [\"/tmp/n1/opt/cni/bin\", \"/tmp/n1/usr/lib/cni\"]\n"));
        assert!(text.contains("conf_dir = \"/tmp/n1/etc/cni/net.d\"\n"));
        assert!(text.contains("imports = [\"/tmp/n1/etc/containerd/conf.d/*.toml\"]\n"));
        assert!(text.contains("sandbox = \"registry.k8s.io/pause:3.10.1\"\n"));
        assert!(text.starts_with(crate::services::unit::AGENT_HEADER));
        assert!(text.contains("version = 3\n"));
        assert!(text.contains("required_plugins = [\"io.containerd.grpc.v1.cri\"]\n"));
    }

    #[test]
    fn the_cgroup_driver_follows_sd_booted() {
        let dir = tempfile::tempdir().unwrap();
        let paths = HostPaths::new(dir.path(), None, None);
        assert_eq!(cgroup_driver(&paths), CgroupDriver::Cgroupfs);
        // A file is not a booted systemd; sd_booted() wants a directory.
        std::fs::create_dir_all(dir.path().join("run/systemd")).unwrap();
        std::fs::write(dir.path().join("run/systemd/system"), "").unwrap();
        assert_eq!(cgroup_driver(&paths), CgroupDriver::Cgroupfs);
        std::fs::remove_file(dir.path().join("run/systemd/system")).unwrap();
        std::fs::create_dir(dir.path().join("run/systemd/system")).unwrap();
        assert_eq!(cgroup_driver(&paths), CgroupDriver::Systemd);
        assert_eq!(cgroup_driver(&paths).as_str(), "systemd");

        let mut i = inputs(dir.path());
        assert!(render_config(&i).contains("SystemdCgroup = false\n"));
        i.cgroup_driver = CgroupDriver::Systemd;
        assert!(render_config(&i).contains("SystemdCgroup = true\n"));
    }

    #[test]
    fn the_snapshotter_avoids_overlay_on_overlay() {
        assert_eq!(
            Snapshotter::for_filesystem(OVERLAYFS_MAGIC),
            Snapshotter::Native
        );
        // ext4 (also the magic of ext2/3), xfs, btrfs, tmpfs.
        for magic in [0xef53, 0x5846_5342, 0x9123_683e, 0x0102_1994] {
            assert_eq!(Snapshotter::for_filesystem(magic), Snapshotter::Overlayfs);
        }
        // Both places that name a snapshotter name the same one.
        let mut i = inputs(Path::new("/r"));
        i.snapshotter = Snapshotter::Native;
        let text = render_config(&i);
        assert_eq!(
            text.matches("snapshotter = \"native\"\n").count(),
            2,
            "{text}"
        );
        assert!(!text.contains("overlayfs"));
    }

    /// statfs of the nearest existing ancestor: before the first start,
    /// `<root>/var/lib/containerd` does not exist yet.
    #[test]
    fn the_snapshotter_is_decided_before_the_root_dir_exists() {
        let dir = tempfile::tempdir().unwrap();
        let paths = HostPaths::new(dir.path(), None, None);
        let magic = nix::sys::statfs::statfs(dir.path())
            .unwrap()
            .filesystem_type()
            .0;
        #[allow(clippy::unnecessary_cast)]
        let want = Snapshotter::for_filesystem(magic as i64);
        assert_eq!(snapshotter(&paths).unwrap(), want);
    }

    #[test]
    fn runc_is_found_where_flatcar_or_debian_put_it() {
        let dir = tempfile::tempdir().unwrap();
        let paths = HostPaths::new(dir.path(), None, None);
        assert_eq!(paths.find_binary(RUNC), None);
        assert_eq!(missing_binaries(&paths), BINARIES);
        let debian = dir.path().join("usr/sbin/runc");
        std::fs::create_dir_all(debian.parent().unwrap()).unwrap();
        std::fs::write(&debian, "").unwrap();
        assert_eq!(paths.find_binary(RUNC), Some(debian));
        assert_eq!(missing_binaries(&paths), [CONTAINERD, SHIM]);
        let flatcar = dir.path().join("usr/bin/runc");
        std::fs::create_dir_all(flatcar.parent().unwrap()).unwrap();
        std::fs::write(&flatcar, "").unwrap();
        assert_eq!(paths.find_binary(RUNC), Some(flatcar));
    }

    #[test]
    fn strings_are_toml_escaped() {
        assert_eq!(toml_str(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(toml_str("x\ny\u{1}"), "\"x\\ny\\u0001\"");
        assert_eq!(
            cri_endpoint(&HostPaths::new(Path::new("/tmp/n1"), None, None)),
            "unix:///tmp/n1/run/containerd/containerd.sock"
        );
    }
}
