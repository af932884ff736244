//! Cluster configuration: raw YAML → merged inputs → validated settings.
//!
//! The types in this file are the validated layer: once a [`ClusterConfig`]
//! exists, every address, CIDR and name in it is well-formed and consistent,
//! so the phases never re-check them.

mod diagnostics;
mod load;
mod raw;
mod tree;
mod validate;
pub mod values;

use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::Ipv4Net;

pub use diagnostics::{Diagnostic, Severity, ValidationReport};
pub use load::{
    ConfigError, SourceFile, Sources, load, parse_cluster_yaml, parse_sources, read_manifests,
    read_sources,
};

/// File names inside the config directory.
pub const CLUSTER_FILE: &str = "cluster.yaml";
pub const NODES_DIR: &str = "nodes";
/// Add-on manifests the masters apply (`phases::addons`).
pub const MANIFESTS_DIR: &str = "manifests";
pub const IDENTITY_FILE: &str = "node-identity";
pub const JOIN_SECRET_FILE: &str = "secrets/join-secret";

#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    /// Where the configuration was read from (for messages).
    pub source_dir: PathBuf,
    pub cluster: ClusterSettings,
    /// Nodes in the order they are declared in cluster.yaml.
    pub nodes: Vec<NodeSpec>,
    /// Non-fatal findings (e.g. an even number of control-plane nodes).
    pub warnings: Vec<Diagnostic>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClusterSettings {
    pub name: String,
    pub k8s_version: String,
    pub control_plane_endpoint: Endpoint,
    /// `floating_endpoint: true`: the endpoint's address, which the masters
    /// hold themselves, one at a time (`crate::floating`).
    pub floating_endpoint: Option<Ipv4Addr>,
    pub networking: Networking,
    pub bootstrap: BootstrapSettings,
    pub etcd: EtcdSettings,
    pub containerd: ContainerdSettings,
    pub kubelet: KubeletSettings,
    /// `None` when cluster.yaml has no `ceph:` section (then no node may carry
    /// the ceph-mon role).
    pub ceph: Option<CephSettings>,
    pub provisioning: ProvisioningSettings,
}

/// Flatcar's PXE images as `serve` finds them in its assets directory.
pub const DEFAULT_PXE_KERNEL: &str = "flatcar_production_pxe.vmlinuz";
pub const DEFAULT_PXE_INITRD: &str = "flatcar_production_pxe_image.cpio.gz";

/// What `serve` boots the machines with: files in its assets directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvisioningSettings {
    pub kernel: String,
    pub initrd: String,
}

impl Default for ProvisioningSettings {
    fn default() -> ProvisioningSettings {
        ProvisioningSettings {
            kernel: DEFAULT_PXE_KERNEL.to_string(),
            initrd: DEFAULT_PXE_INITRD.to_string(),
        }
    }
}

/// `host:port`; host is an IPv4 address or a DNS name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Networking {
    pub pod_cidr: Ipv4Net,
    pub service_cidr: Ipv4Net,
    pub dns_domain: String,
    pub gateway: Option<Ipv4Addr>,
    pub dns_servers: Vec<Ipv4Addr>,
    pub prefix_length: u8,
    pub cni: Cni,
}

/// Where the pods' network comes from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Cni {
    /// The agent's bridge + host-local CNI config and host-gateway routes.
    #[default]
    BuiltIn,
    /// An operator's CNI manifest (Calico, say), relative to the config
    /// dir, applied by the masters; its own installer configures the nodes.
    Manifest(std::path::PathBuf),
}

#[derive(Debug, Clone, PartialEq)]
pub struct BootstrapSettings {
    pub token_ttl: Duration,
    pub join_port: u16,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EtcdSettings {
    pub client_port: u16,
    pub peer_port: u16,
}

/// What the container runtime on every Kubernetes node is told.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerdSettings {
    /// The pod sandbox ("pause") image: the one image every pod needs.
    pub sandbox_image: ImageReference,
}

/// `cluster.kubelet.eviction_hard` (a YAML flow mapping's inside) for nodes
/// that share one disk, as in `lab up` and the tests: its free space is the
/// host's, which no node's eviction can restore, so the disk signals are off.
pub const SHARED_DISK_EVICTION_HARD: &str =
    "nodefs.available: 0%, nodefs.inodesFree: 0%, imagefs.available: 0%, imagefs.inodesFree: 0%";

/// What every node's kubelet is told beyond what the agent derives.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct KubeletSettings {
    /// Hard eviction thresholds by signal (`nodefs.available` → `10%`);
    /// signals not listed keep the kubelet's defaults.
    pub eviction_hard: std::collections::BTreeMap<String, String>,
}

/// An OCI image reference (`[host[:port]/]path[:tag][@digest]`), checked
/// against the grammar of distribution's `reference` package; it cannot
/// hold anything containerd would refuse to parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageReference(String);

impl ImageReference {
    pub fn parse(text: &str) -> Result<ImageReference, String> {
        values::image_reference(text).map(|()| ImageReference(text.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ImageReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct CephSettings {
    pub public_network: Ipv4Net,
    pub cluster_network: Ipv4Net,
    /// `dashboard: true`: the managers serve Ceph's dashboard over HTTPS
    /// with a certificate from the cluster CA.
    pub dashboard: bool,
}

/// What a node is configured to be. `master` in YAML is a synonym of
/// `control-plane`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NodeRole {
    ControlPlane,
    Worker,
    CephMon,
}

impl NodeRole {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeRole::ControlPlane => "control-plane",
            NodeRole::Worker => "worker",
            NodeRole::CephMon => "ceph-mon",
        }
    }
}

/// A MAC address, stored normalised (lower case, colon separated).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// Accepts `aa:bb:cc:dd:ee:ff` and `aa-bb-cc-dd-ee-ff`, any case.
    pub fn parse(text: &str) -> Option<MacAddr> {
        let parts: Vec<&str> = text.trim().split([':', '-']).collect();
        if parts.len() != 6 {
            return None;
        }
        let mut bytes = [0u8; 6];
        for (byte, part) in bytes.iter_mut().zip(parts) {
            if part.len() != 2 {
                return None;
            }
            *byte = u8::from_str_radix(part, 16).ok()?;
        }
        Some(MacAddr(bytes))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct NodeSpec {
    pub name: String,
    pub hostname: String,
    pub ip: Ipv4Addr,
    pub roles: BTreeSet<NodeRole>,
    pub mac_addresses: Vec<MacAddr>,
}

impl NodeSpec {
    pub fn has_role(&self, role: NodeRole) -> bool {
        self.roles.contains(&role)
    }
    pub fn is_control_plane(&self) -> bool {
        self.has_role(NodeRole::ControlPlane)
    }
}

impl ClusterConfig {
    pub fn node(&self, name: &str) -> Option<&NodeSpec> {
        self.nodes.iter().find(|n| n.name == name)
    }
}
