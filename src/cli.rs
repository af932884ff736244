//! Command-line interface. Every global option has an environment fallback
//! so the systemd unit and the lab can configure the agent without flags.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "cluster-agent",
    version,
    about = "Turns freshly booted bare-metal machines into a Kubernetes cluster with a Ceph monitor quorum",
    after_help = "Exit codes: 0 success, 1 runtime failure, 2 configuration or usage error, \
                  3 another agent holds the lock, 4 (status only) bootstrap still in progress."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    /// Configuration directory [default: <root>/etc/cluster-config; CONFIG_DIR is honoured too]
    #[arg(long, global = true, env = "CLUSTER_CONFIG_DIR")]
    pub config_dir: Option<PathBuf>,
    /// State directory [default: <root>/var/lib/cluster-state]
    #[arg(long, global = true, env = "CLUSTER_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Prefix for every host path the agent reads or writes
    #[arg(long, global = true, env = "CLUSTER_ROOT", default_value = "/")]
    pub root: PathBuf,
    /// This node's name, overriding node-identity and MAC matching
    #[arg(long, global = true, env = "CLUSTER_NODE")]
    pub node: Option<String>,
    /// Machine-readable JSON output
    #[arg(long, global = true, env = "CLUSTER_AGENT_JSON")]
    pub json: bool,
    /// How components are run: systemd over D-Bus, or detached processes
    /// (tests, the lab, machines without systemd)
    #[arg(long, global = true, env = "CLUSTER_SERVICES", value_enum, default_value_t = ServicesArg::Auto)]
    pub services: ServicesArg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ServicesArg {
    /// systemd when `<root>/run/systemd/system` exists, else process
    Auto,
    Systemd,
    Process,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate the configuration, work out this node's role and run its phases
    Run,
    /// Print the phases and steps `run` would execute; touches nothing
    Plan(PlanArgs),
    /// Check the configuration and report every problem at once
    Validate,
    /// Show this node's bootstrap progress and the live state of what it runs
    /// (exit 0 healthy, 1 failed, 4 still in progress)
    Status(StatusArgs),
    /// Undo this node's bootstrap: leave etcd, stop the agent's units, delete
    /// what the agent created, so the next `run` starts clean
    Reset(ResetArgs),
    /// Write a new cluster join secret (32 random bytes, mode 0600)
    GenJoinSecret(GenJoinSecretArgs),
    /// Serve join material to nodes that prove they hold the join secret
    /// (the long-running cluster-join.service on control-plane nodes)
    ServeJoin(ServeJoinArgs),
    /// Keep a route to every other node's pod CIDR and the pods' egress NAT
    /// (the long-running cluster-pod-routes.service on Kubernetes nodes)
    PodRoutes,
    /// Forward the node's API traffic to the control-plane API servers that
    /// pass their health checks (the long-running cluster-api-balancer.service
    /// on Kubernetes nodes)
    ApiBalancer,
    /// Hold the floating control_plane_endpoint when this master wins its
    /// Lease, and forward what arrives on it to the ready API servers (the
    /// long-running cluster-api-address.service on control-plane nodes)
    ApiAddress,
    /// Render provisioning data from the config dir: Ignition configs, Matchbox data
    #[command(subcommand)]
    Render(RenderCommand),
    /// The bootstrap machine: serve iPXE scripts, boot assets and each
    /// machine's Ignition config by MAC (Matchbox's endpoints), and with
    /// --pxe-interface PXE too, until Ctrl-C or SIGTERM (SIGHUP re-arms
    /// every node's config)
    Serve(ServeArgs),
    /// A whole cluster on this machine: nodes as temp roots running the real
    /// agent with real etcd and ceph-mon
    #[command(subcommand)]
    Lab(LabCommand),
}

#[derive(Debug, Subcommand)]
pub enum LabCommand {
    /// Create the nodes and bootstrap them all at once, showing progress
    Up(LabUpArgs),
    /// Show each node's progress (exit 0 when every node is done)
    Status {
        #[arg(long, default_value = DEFAULT_LAB_DIR)]
        dir: PathBuf,
    },
    /// Stop every daemon of the lab and remove it
    Down {
        #[arg(long, default_value = DEFAULT_LAB_DIR)]
        dir: PathBuf,
    },
}

pub const DEFAULT_LAB_DIR: &str = "/tmp/cluster-agent-lab";

#[derive(Debug, Args)]
pub struct LabUpArgs {
    #[arg(long, default_value_t = 1)]
    pub masters: u8,
    #[arg(long, default_value_t = 1)]
    pub workers: u8,
    /// Monitors, placed on the first nodes (masters first)
    #[arg(long, default_value_t = 1)]
    pub ceph_mons: u8,
    /// Where the nodes' roots go
    #[arg(long, default_value = DEFAULT_LAB_DIR)]
    pub dir: PathBuf,
    /// Where the real etcd, Kubernetes and containerd binaries are, as
    /// `.ci/setup` (tools/kube-bins/build) links them [default:
    /// $CLUSTER_AGENT_BIN_CACHE/bin, else /var/cache/cluster-agent/bin]
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// One network namespace per node on a bridge (root; needed for more
    /// than one master)
    #[arg(long)]
    pub netns: bool,
    /// With --netns: the masters hold the API endpoint's address
    /// (`<subnet>.10`, `floating_endpoint: true`) instead of it being cp-1's
    #[arg(long, requires = "netns")]
    pub floating_endpoint: bool,
    /// The monitors' managers serve Ceph's dashboard over HTTPS
    /// (`ceph.dashboard: true`; monitors must be on masters)
    #[arg(long)]
    pub ceph_dashboard: bool,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// Plan every node in the configuration instead of this one
    #[arg(long)]
    pub all_nodes: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Redraw in place every --interval seconds until Ctrl-C
    #[arg(long)]
    pub watch: bool,
    /// Seconds between two refreshes with --watch
    #[arg(long, default_value_t = 2.0, value_parser = parse_interval)]
    pub interval: f64,
}

fn parse_interval(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.1..=3600.0).contains(&v) => Ok(v),
        _ => Err("expected seconds between 0.1 and 3600".into()),
    }
}

#[derive(Debug, Args)]
pub struct ResetArgs {
    /// Do it without asking
    #[arg(long)]
    pub yes: bool,
    /// List every action and change nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Go ahead even when leaving etcd would cost the cluster its quorum or
    /// its last fault tolerance, or no peer can be reached to leave it
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct ServeJoinArgs {
    /// Address to listen on [default: this node's IP and `bootstrap.join_port`]
    #[arg(long)]
    pub listen: Option<std::net::SocketAddr>,
    /// Seconds a client has for its TLS handshake, and again for each request
    /// from first header byte to last body byte
    #[arg(long, default_value_t = 5.0, value_parser = parse_interval)]
    pub request_timeout: f64,
}

#[derive(Debug, Args)]
pub struct GenJoinSecretArgs {
    /// Where to write it [default: <config-dir>/secrets/join-secret]
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Replace an existing secret (nodes holding the old one can no longer join)
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// HTTP address the machines reach this one by (iPXE scripts, assets,
    /// Ignition pointers); a concrete IP, not 0.0.0.0
    #[arg(long)]
    pub listen: std::net::SocketAddr,
    /// HTTPS address for the Ignition configs themselves [default: the
    /// --listen IP, port 8443]
    #[arg(long)]
    pub tls_listen: Option<std::net::SocketAddr>,
    /// Directory served under /assets/ (the kernel and initramfs named by
    /// cluster.provisioning)
    #[arg(long)]
    pub assets: PathBuf,
    /// Also answer PXE on this interface: dnsmasq as proxy DHCP and TFTP
    /// (the site's DHCP server keeps handing out addresses)
    #[arg(long)]
    pub pxe_interface: Option<String>,
    /// Where serve keeps its pid file and dnsmasq's config while it runs
    /// [default: <root>/run/cluster-agent/serve]
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
}

pub const DEFAULT_TLS_PORT: u16 = 8443;

#[derive(Debug, Subcommand)]
pub enum RenderCommand {
    /// Ignition config (spec 3.4.0) for the node named by --node, or for every node
    Ignition(RenderIgnitionArgs),
    /// Matchbox data dir: a profile per node, a group per MAC, the Ignition configs
    Matchbox(RenderMatchboxArgs),
}

#[derive(Debug, Args)]
pub struct RenderIgnitionArgs {
    /// Render every node to <output-dir>/<node>.ign instead of one node
    #[arg(long, requires = "output_dir", conflicts_with = "output")]
    pub all_nodes: bool,
    /// Where to write the one node's config (`-`: stdout); it holds the join secret
    #[arg(long, default_value = "-")]
    pub output: PathBuf,
    /// Directory for --all-nodes (files are written with mode 0600)
    #[arg(long, requires = "all_nodes")]
    pub output_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RenderMatchboxArgs {
    /// Matchbox data dir to write (groups/, profiles/, ignition/)
    #[arg(long)]
    pub output_dir: PathBuf,
    /// Matchbox's https:// address as the machines reach it
    #[arg(long)]
    pub matchbox_url: String,
    /// Flatcar PXE kernel (a Matchbox asset path or a URL)
    #[arg(long, default_value = crate::provision::matchbox::DEFAULT_KERNEL)]
    pub kernel: String,
    /// Flatcar PXE initrd (a Matchbox asset path or a URL)
    #[arg(long, default_value = crate::provision::matchbox::DEFAULT_INITRD)]
    pub initrd: String,
}
