//! Raw → merged inputs → validated [`ClusterConfig`].
//!
//! Every check runs even after earlier ones failed, so one run lists every
//! problem. Values that failed to parse become `None` and are skipped by the
//! cross-checks that need them, so one typo does not cascade into more errors.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Display;
use std::hash::Hash;
use std::net::Ipv4Addr;
use std::path::Path;

use ipnet::Ipv4Net;

use super::diagnostics::{Diagnostic, Severity};
use super::raw::{List, Loc, RawCluster, RawClusterFile, RawNode, RawNodeFile, Val};
use super::values;
use super::{
    BootstrapSettings, CephSettings, ClusterConfig, ClusterSettings, ContainerdSettings,
    EtcdSettings, ImageReference, MacAddr, Networking, NodeRole, NodeSpec,
};

pub const DEFAULT_K8S_VERSION: &str = "1.34.4";
pub const DEFAULT_API_PORT: u16 = 6443;
pub const DEFAULT_POD_CIDR: &str = "10.244.0.0/16";
pub const DEFAULT_SERVICE_CIDR: &str = "10.96.0.0/12";
pub const DEFAULT_DNS_DOMAIN: &str = "cluster.local";
pub const DEFAULT_PREFIX_LENGTH: u8 = 24;
pub const DEFAULT_TOKEN_TTL: &str = "24h";
pub const DEFAULT_JOIN_PORT: u16 = 9443;
pub const DEFAULT_ETCD_CLIENT_PORT: u16 = 2379;
pub const DEFAULT_ETCD_PEER_PORT: u16 = 2380;
/// containerd 2.2's own default (`internal/cri/config`), so a cluster.yaml
/// without the key runs what an unconfigured containerd would.
pub const DEFAULT_SANDBOX_IMAGE: &str = "registry.k8s.io/pause:3.10.1";

/// A value and where it came from.
#[derive(Debug, Clone)]
struct At<T> {
    value: T,
    loc: Loc,
}

type AtList<T> = At<Vec<At<T>>>;

/// One node after parsing its fields; `None` where the field was absent or
/// invalid (invalid ones have already been reported).
#[derive(Debug, Clone)]
struct NodeInput {
    name: Option<At<String>>,
    hostname: Option<At<String>>,
    ip: Option<At<Ipv4Addr>>,
    roles: Option<AtList<NodeRole>>,
    /// False when a role could not be parsed, so role counts are unreliable.
    roles_valid: bool,
    mac_addresses: Option<AtList<MacAddr>>,
}

impl NodeInput {
    fn role_set(&self) -> BTreeSet<NodeRole> {
        match &self.roles {
            Some(roles) => roles.value.iter().map(|r| r.value).collect(),
            None => BTreeSet::from([NodeRole::Worker]),
        }
    }

    fn display_name(&self) -> &str {
        self.name.as_ref().map_or("?", |n| n.value.as_str())
    }
}

#[derive(Default)]
pub struct Findings {
    pub errors: Vec<Diagnostic>,
    pub warnings: Vec<Diagnostic>,
}

/// Validates cluster.yaml and the node files (sorted by file name); returns
/// the settings only if no error was found. Warnings are returned either way.
pub fn validate(
    source_dir: &Path,
    cluster_file: &RawClusterFile,
    node_files: &[RawNodeFile],
    findings: &mut Findings,
) -> Option<ClusterConfig> {
    let mut v = Validator { f: findings };
    let raw_cluster = cluster_file.cluster.as_ref();

    let mut nodes: Vec<NodeInput> = cluster_file
        .nodes
        .iter()
        .flat_map(|n| &n.items)
        .map(|raw| v.node(raw))
        .collect();
    let declared_in_cluster_file = nodes.len();
    for file in node_files {
        let Some(raw) = &file.node else { continue };
        let input = v.node(raw);
        let Some(name) = input.name.clone() else {
            continue;
        };
        let stem = file.file.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        if stem != name.value {
            v.error(
                &name.loc,
                format!(
                    "{:?} does not match the file name {} (expected {stem:?})",
                    name.value,
                    file.file.display()
                ),
            );
        }
        let existing = nodes[..declared_in_cluster_file]
            .iter_mut()
            .find(|n| n.name.as_ref().is_some_and(|n| n.value == name.value));
        match existing {
            Some(existing) => v.reconcile(existing, input),
            None => nodes.push(input),
        }
    }

    let nodes_loc = match &cluster_file.nodes {
        Some(n) => n.loc.clone(),
        None => cluster_file.root.child("nodes"),
    };
    v.unique_nodes(&nodes);
    let settings = raw_cluster.map(|c| v.cluster(c));
    v.control_plane_count(&nodes, &nodes_loc);
    if let Some(settings) = &settings {
        v.pod_cidr_room(settings, &nodes, &nodes_loc);
        v.floating_endpoint_consistency(settings, &nodes);
        if let Some(manifest) = &settings.cni_manifest
            && !source_dir.join(&manifest.value).is_file()
        {
            v.error(
                &manifest.loc,
                format!(
                    "{} is not a file in {}: the CNI manifest ships with the configuration",
                    manifest.value.display(),
                    source_dir.display()
                ),
            );
        }
        v.ceph_consistency(raw_cluster, settings.ceph.as_ref(), &nodes);
    }

    if !v.f.errors.is_empty() {
        return None;
    }
    let settings = settings?.finish(&nodes)?;
    let nodes = nodes
        .into_iter()
        .map(NodeInput::finish)
        .collect::<Option<Vec<_>>>()?;
    Some(ClusterConfig {
        source_dir: source_dir.to_path_buf(),
        cluster: settings,
        nodes,
        warnings: v.f.warnings.clone(),
    })
}

/// The prefix of each Node's pod range: the controller-manager's default
/// `--node-cidr-mask-size` for IPv4, which the agent does not change.
const NODE_CIDR_MASK: u8 = 24;

/// Cluster settings before the endpoint default (which needs the nodes).
struct PartialSettings {
    name: Option<String>,
    k8s_version: String,
    control_plane_endpoint: Option<At<super::Endpoint>>,
    /// `floating_endpoint`, where it was written.
    floating_endpoint: Option<At<bool>>,
    networking: Networking,
    bootstrap: BootstrapSettings,
    etcd: EtcdSettings,
    containerd: ContainerdSettings,
    kubelet: super::KubeletSettings,
    ceph: Option<CephSettings>,
    provisioning: super::ProvisioningSettings,
    /// Where pod_cidr was set; `None` for the default.
    pod_cidr_loc: Option<Loc>,
    /// `networking.cni.manifest`, where it was written.
    cni_manifest: Option<At<std::path::PathBuf>>,
}

impl PartialSettings {
    fn finish(self, nodes: &[NodeInput]) -> Option<ClusterSettings> {
        let control_plane_endpoint = match self.control_plane_endpoint {
            Some(e) => e.value,
            None => {
                // The node that founds the cluster (master-first), so the
                // default endpoint is up before any other API server.
                let name =
                    |n: &NodeInput| n.name.as_ref().map(|a| a.value.clone()).unwrap_or_default();
                let first_cp = nodes
                    .iter()
                    .filter(|n| n.role_set().contains(&NodeRole::ControlPlane))
                    .min_by(|a, b| crate::role::natural_cmp(&name(a), &name(b)))?;
                super::Endpoint {
                    host: first_cp.ip.as_ref()?.value.to_string(),
                    port: DEFAULT_API_PORT,
                }
            }
        };
        let floating_endpoint = match self.floating_endpoint {
            Some(At { value: true, .. }) => Some(control_plane_endpoint.host.parse().ok()?),
            _ => None,
        };
        Some(ClusterSettings {
            name: self.name?,
            k8s_version: self.k8s_version,
            control_plane_endpoint,
            floating_endpoint,
            networking: self.networking,
            bootstrap: self.bootstrap,
            etcd: self.etcd,
            containerd: self.containerd,
            kubelet: self.kubelet,
            ceph: self.ceph,
            provisioning: self.provisioning,
        })
    }
}

impl NodeInput {
    fn finish(self) -> Option<NodeSpec> {
        let roles = self.role_set();
        let name = self.name?.value;
        Some(NodeSpec {
            hostname: self.hostname.map_or_else(|| name.clone(), |h| h.value),
            name,
            ip: self.ip?.value,
            roles,
            mac_addresses: self
                .mac_addresses
                .map(|m| m.value.into_iter().map(|a| a.value).collect())
                .unwrap_or_default(),
        })
    }
}

struct Validator<'a> {
    f: &'a mut Findings,
}

impl Validator<'_> {
    fn error(&mut self, loc: &Loc, message: impl Into<String>) {
        self.f.errors.push(loc.error(message));
    }

    /// Parses a scalar, reporting the failure at the scalar itself.
    fn parse<T>(
        &mut self,
        val: &Val,
        parse: impl FnOnce(&Val) -> Result<T, String>,
    ) -> Option<At<T>> {
        match parse(val) {
            Ok(value) => Some(At {
                value,
                loc: val.loc.clone(),
            }),
            Err(message) => {
                self.error(&val.loc, message);
                None
            }
        }
    }

    fn opt<T>(
        &mut self,
        val: Option<&Val>,
        parse: impl FnOnce(&Val) -> Result<T, String>,
    ) -> Option<At<T>> {
        val.and_then(|v| self.parse(v, parse))
    }

    /// All items or nothing: a partly valid list is not used.
    fn list<T>(
        &mut self,
        list: &List,
        parse: impl Fn(&Val) -> Result<T, String>,
    ) -> Option<AtList<T>> {
        let items: Vec<Option<At<T>>> = list.items.iter().map(|v| self.parse(v, &parse)).collect();
        if !list.complete {
            return None;
        }
        let value = items.into_iter().collect::<Option<Vec<_>>>()?;
        Some(At {
            value,
            loc: list.loc.clone(),
        })
    }

    /// An optional setting: the parsed value (or the default when absent or
    /// invalid) and where it was written (`None` when defaulted).
    fn setting<T>(
        &mut self,
        val: Option<&Val>,
        default: T,
        parse: impl FnOnce(&Val) -> Result<T, String>,
    ) -> (T, Option<Loc>) {
        match self.opt(val, parse) {
            Some(at) => (at.value, Some(at.loc)),
            None => (default, None),
        }
    }

    fn node(&mut self, raw: &RawNode) -> NodeInput {
        let name = self.opt(raw.name.as_ref(), |v| {
            values::dns_label(&v.text).map(|()| v.text.clone())
        });
        let ip = self.opt(raw.ip.as_ref(), |v| values::ipv4(&v.text));
        let hostname = self.opt(raw.hostname.as_ref(), |v| {
            values::dns_name(&v.text).map(|()| v.text.clone())
        });
        let roles = raw.roles.as_ref().and_then(|list| {
            if list.items.is_empty() && list.complete {
                self.error(&list.loc, "must list at least one role");
                return None;
            }
            self.list(list, |v| values::role(&v.text))
        });
        let roles_valid = raw.roles.is_none() || roles.is_some();
        let mac_addresses = raw
            .mac_addresses
            .as_ref()
            .and_then(|list| self.list(list, |v| values::mac(&v.text)));
        NodeInput {
            name,
            hostname,
            ip,
            roles,
            roles_valid,
            mac_addresses,
        }
    }

    /// A node declared in both cluster.yaml and its node file: every field
    /// the node file sets must match what cluster.yaml says, and fills in
    /// what cluster.yaml leaves out.
    fn reconcile(&mut self, ours: &mut NodeInput, theirs: NodeInput) {
        fn show_list<T: Display>(l: &[At<T>]) -> String {
            let items: Vec<String> = l.iter().map(|a| a.value.to_string()).collect();
            format!("[{}]", items.join(", "))
        }
        fn set<T: Ord + Copy>(l: &[At<T>]) -> BTreeSet<T> {
            l.iter().map(|a| a.value).collect()
        }
        self.agree(
            &mut ours.hostname,
            theirs.hostname,
            |a, b| a.eq_ignore_ascii_case(b),
            |h| format!("{h:?}"),
        );
        self.agree(&mut ours.ip, theirs.ip, |a, b| a == b, |ip| ip.to_string());
        ours.roles_valid &= theirs.roles_valid;
        self.agree(
            &mut ours.roles,
            theirs.roles,
            |a, b| set(a) == set(b),
            |roles| {
                let names: Vec<&str> = set(roles).into_iter().map(NodeRole::as_str).collect();
                format!("[{}]", names.join(", "))
            },
        );
        self.agree(
            &mut ours.mac_addresses,
            theirs.mac_addresses,
            |a, b| set(a) == set(b),
            |macs| show_list(macs),
        );
    }

    fn agree<T>(
        &mut self,
        ours: &mut Option<At<T>>,
        theirs: Option<At<T>>,
        same: impl Fn(&T, &T) -> bool,
        show: impl Fn(&T) -> String,
    ) {
        let Some(theirs) = theirs else { return };
        match ours {
            None => *ours = Some(theirs),
            Some(ours) if !same(&ours.value, &theirs.value) => self.error(
                &theirs.loc,
                format!(
                    "{} disagrees with {} ({}), which says {}",
                    show(&theirs.value),
                    ours.loc.at(),
                    ours.loc.field,
                    show(&ours.value)
                ),
            ),
            Some(_) => {}
        }
    }

    fn cluster(&mut self, raw: &RawCluster) -> PartialSettings {
        let name = self.opt(raw.name.as_ref(), |v| {
            values::dns_label(&v.text).map(|()| v.text.clone())
        });
        let (k8s_version, _) = self.setting(
            raw.k8s_version.as_ref(),
            DEFAULT_K8S_VERSION.to_owned(),
            |v| values::k8s_version(&v.text).map(|()| v.text.clone()),
        );
        let control_plane_endpoint = self.opt(raw.control_plane_endpoint.as_ref(), |v| {
            values::endpoint(&v.text, DEFAULT_API_PORT)
        });
        let floating_endpoint = self.opt(raw.floating_endpoint.as_ref(), |v| {
            values::boolean(&v.text, v.plain)
        });

        let net = raw.networking.as_ref();
        let default_pod: Ipv4Net = DEFAULT_POD_CIDR.parse().unwrap_or_default();
        let default_service: Ipv4Net = DEFAULT_SERVICE_CIDR.parse().unwrap_or_default();
        let (pod_cidr, pod_loc) =
            self.setting(net.and_then(|n| n.pod_cidr.as_ref()), default_pod, |v| {
                values::cidr(&v.text)
            });
        let (service_cidr, service_loc) = self.setting(
            net.and_then(|n| n.service_cidr.as_ref()),
            default_service,
            |v| values::cidr(&v.text),
        );
        self.no_overlap(pod_cidr, pod_loc.clone(), service_cidr, service_loc);
        let (dns_domain, _) = self.setting(
            net.and_then(|n| n.dns_domain.as_ref()),
            DEFAULT_DNS_DOMAIN.to_owned(),
            |v| values::dns_name(&v.text).map(|()| v.text.clone()),
        );
        let gateway = self
            .opt(net.and_then(|n| n.gateway.as_ref()), |v| {
                values::ipv4(&v.text)
            })
            .map(|at| at.value);
        let dns_servers = net
            .and_then(|n| n.dns_servers.as_ref())
            .and_then(|l| self.list(l, |v| values::ipv4(&v.text)))
            .map(|l| l.value.into_iter().map(|a| a.value).collect())
            .unwrap_or_default();
        let (prefix_length, _) = self.setting(
            net.and_then(|n| n.prefix_length.as_ref()),
            DEFAULT_PREFIX_LENGTH,
            |v| values::prefix_length(&v.text, v.plain),
        );
        let cni_manifest = self.opt(
            net.and_then(|n| n.cni.as_ref())
                .and_then(|c| c.manifest.as_ref()),
            |v| values::manifest_path(&v.text),
        );

        let boot = raw.bootstrap.as_ref();
        let default_ttl = values::duration(DEFAULT_TOKEN_TTL).unwrap_or_default();
        let (token_ttl, _) =
            self.setting(boot.and_then(|b| b.token_ttl.as_ref()), default_ttl, |v| {
                values::duration(&v.text)
            });
        let (join_port, _) = self.setting(
            boot.and_then(|b| b.join_port.as_ref()),
            DEFAULT_JOIN_PORT,
            |v| values::port(&v.text, v.plain),
        );

        let etcd = raw.etcd.as_ref();
        let (client_port, client_loc) = self.setting(
            etcd.and_then(|e| e.client_port.as_ref()),
            DEFAULT_ETCD_CLIENT_PORT,
            |v| values::port(&v.text, v.plain),
        );
        let (peer_port, peer_loc) = self.setting(
            etcd.and_then(|e| e.peer_port.as_ref()),
            DEFAULT_ETCD_PEER_PORT,
            |v| values::port(&v.text, v.plain),
        );
        if client_port == peer_port {
            if let Some(loc) = peer_loc.as_ref().or(client_loc.as_ref()) {
                self.error(
                    loc,
                    format!(
                        "etcd client_port and peer_port are both {peer_port}; they must differ"
                    ),
                );
            }
        }

        let default_sandbox =
            ImageReference::parse(DEFAULT_SANDBOX_IMAGE).expect("the default is a valid reference");
        let (sandbox_image, _) = self.setting(
            raw.containerd
                .as_ref()
                .and_then(|c| c.sandbox_image.as_ref()),
            default_sandbox,
            |v| ImageReference::parse(&v.text),
        );

        let eviction_hard = raw
            .kubelet
            .iter()
            .flat_map(|k| &k.eviction_hard)
            .filter_map(|(signal, threshold)| {
                let at = self.parse(threshold, |v| values::eviction_threshold(&v.text))?;
                Some((signal.clone(), at.value))
            })
            .collect();

        let ceph = raw.ceph.as_ref().and_then(|c| {
            let public = self.opt(c.public_network.as_ref(), |v| values::cidr(&v.text));
            let cluster = self.opt(c.cluster_network.as_ref(), |v| values::cidr(&v.text));
            let dashboard = self.opt(c.dashboard.as_ref(), |v| values::boolean(&v.text, v.plain));
            let public_network = public?.value;
            Some(CephSettings {
                public_network,
                cluster_network: cluster.map_or(public_network, |c| c.value),
                dashboard: dashboard.is_some_and(|d| d.value),
            })
        });

        let provisioning = raw.provisioning.as_ref();
        let (kernel, _) = self.setting(
            provisioning.and_then(|p| p.kernel.as_ref()),
            super::DEFAULT_PXE_KERNEL.to_string(),
            |v| values::asset_path(&v.text),
        );
        let (initrd, _) = self.setting(
            provisioning.and_then(|p| p.initrd.as_ref()),
            super::DEFAULT_PXE_INITRD.to_string(),
            |v| values::asset_path(&v.text),
        );

        PartialSettings {
            name: name.map(|n| n.value),
            k8s_version,
            control_plane_endpoint,
            floating_endpoint,
            networking: Networking {
                pod_cidr,
                service_cidr,
                dns_domain,
                gateway,
                dns_servers,
                prefix_length,
                cni: cni_manifest.as_ref().map_or(super::Cni::BuiltIn, |m| {
                    super::Cni::Manifest(m.value.clone())
                }),
            },
            bootstrap: BootstrapSettings {
                token_ttl,
                join_port,
            },
            etcd: EtcdSettings {
                client_port,
                peer_port,
            },
            containerd: ContainerdSettings { sandbox_image },
            kubelet: super::KubeletSettings { eviction_hard },
            ceph,
            provisioning: super::ProvisioningSettings { kernel, initrd },
            pod_cidr_loc: pod_loc,
            cni_manifest,
        }
    }

    /// The controller-manager gives every Node a /24 of the pod CIDR
    /// (`--node-cidr-mask-size`, 24 for IPv4); a node without one never
    /// gets a pod network and stays NotReady.
    fn pod_cidr_room(&mut self, settings: &PartialSettings, nodes: &[NodeInput], nodes_loc: &Loc) {
        let kubelets = nodes
            .iter()
            .filter(|n| {
                let roles = n.role_set();
                roles.contains(&NodeRole::ControlPlane) || roles.contains(&NodeRole::Worker)
            })
            .count();
        let cidr = settings.networking.pod_cidr;
        let room = 1u64 << NODE_CIDR_MASK.saturating_sub(cidr.prefix_len());
        let fits = cidr.prefix_len() <= NODE_CIDR_MASK && room >= kubelets as u64;
        if fits {
            return;
        }
        let needed = NODE_CIDR_MASK - (kubelets as u64).next_power_of_two().trailing_zeros() as u8;
        let message = format!(
            "{cidr} has room for {} node range(s) of /{NODE_CIDR_MASK}, but {kubelets} nodes run a \
             kubelet and each gets one: use a /{needed} or larger",
            if cidr.prefix_len() <= NODE_CIDR_MASK {
                room
            } else {
                0
            },
        );
        let loc = settings
            .pod_cidr_loc
            .clone()
            .unwrap_or_else(|| nodes_loc.clone());
        self.error(&loc, message);
    }

    /// A floating endpoint is an IPv4 address no node has, on the masters'
    /// own segment: the holder announces it with ARP, which no router
    /// forwards.
    fn floating_endpoint_consistency(&mut self, settings: &PartialSettings, nodes: &[NodeInput]) {
        let Some(At {
            value: true,
            loc: floating_loc,
        }) = &settings.floating_endpoint
        else {
            return;
        };
        let Some(endpoint) = &settings.control_plane_endpoint else {
            self.error(
                floating_loc,
                "needs cluster.control_plane_endpoint set to the address the masters should \
                 hold (one no node has, in their subnet)",
            );
            return;
        };
        let Ok(address) = endpoint.value.host.parse::<Ipv4Addr>() else {
            self.error(
                &endpoint.loc,
                format!(
                    "{:?} is a DNS name, but a floating endpoint (floating_endpoint: true at {}) \
                     must be an IPv4 address",
                    endpoint.value.host,
                    floating_loc.at()
                ),
            );
            return;
        };
        let prefix_length = settings.networking.prefix_length;
        for node in nodes {
            let Some(ip) = &node.ip else { continue };
            if ip.value == address {
                self.error(
                    &endpoint.loc,
                    format!(
                        "{address} is node {}'s own address ({}); a floating endpoint must be \
                         one no node has",
                        node.display_name(),
                        ip.loc.at()
                    ),
                );
                continue;
            }
            if !node.role_set().contains(&NodeRole::ControlPlane) {
                continue;
            }
            let subnet = Ipv4Net::new(ip.value, prefix_length)
                .map(|n| n.trunc())
                .unwrap_or_default();
            if !subnet.contains(&address) {
                self.error(
                    &endpoint.loc,
                    format!(
                        "{address} is outside control-plane node {}'s subnet {subnet} \
                         (networking.prefix_length {prefix_length}): the masters move a floating \
                         endpoint with ARP, which stays on one segment",
                        node.display_name()
                    ),
                );
            }
        }
    }

    /// Pod and service traffic are routed differently; shared addresses
    /// would make some Services unreachable.
    fn no_overlap(
        &mut self,
        pod: Ipv4Net,
        pod_loc: Option<Loc>,
        service: Ipv4Net,
        service_loc: Option<Loc>,
    ) {
        if !(pod.contains(&service.network()) || service.contains(&pod.network())) {
            return;
        }
        let other = |loc: &Option<Loc>| match loc {
            Some(loc) => loc.at(),
            None => "default".to_owned(),
        };
        if let Some(loc) = &service_loc {
            let message = format!("{service} overlaps pod_cidr {pod} ({})", other(&pod_loc));
            self.error(loc, message);
        } else if let Some(loc) = &pod_loc {
            let message = format!(
                "{pod} overlaps service_cidr {service} ({})",
                other(&service_loc)
            );
            self.error(loc, message);
        }
    }

    /// Names, IPs, hostnames and MACs identify machines: a repeat is always a
    /// copy-paste slip. Reported at the second occurrence.
    fn unique_nodes(&mut self, nodes: &[NodeInput]) {
        let owner = |n: &NodeInput| n.display_name().to_owned();
        self.unique(nodes.iter().filter_map(|n| {
            let name = n.name.as_ref()?;
            let what = format!("node name {:?}", name.value);
            Some((name.value.clone(), name.loc.clone(), what, owner(n)))
        }));
        self.unique(nodes.iter().filter_map(|n| {
            let ip = n.ip.as_ref()?;
            Some((ip.value, ip.loc.clone(), ip.value.to_string(), owner(n)))
        }));
        self.unique(nodes.iter().filter_map(|n| {
            // An omitted hostname defaults to the name, which can still
            // collide with another node's explicit hostname.
            let (at, what) = match (&n.hostname, &n.name) {
                (Some(h), _) => (h, format!("hostname {:?}", h.value)),
                (None, Some(name)) => (
                    name,
                    format!("hostname {:?} (defaulted from the name)", name.value),
                ),
                (None, None) => return None,
            };
            Some((
                at.value.to_ascii_lowercase(),
                at.loc.clone(),
                what,
                owner(n),
            ))
        }));
        self.unique(nodes.iter().flat_map(|n| {
            n.mac_addresses
                .iter()
                .flat_map(|m| &m.value)
                .map(move |mac| {
                    let what = format!("MAC address {}", mac.value);
                    (mac.value, mac.loc.clone(), what, owner(n))
                })
        }));
    }

    /// Reports every item whose key was seen before: (key, where, how to
    /// name it, which node it belongs to).
    fn unique<K: Hash + Eq>(&mut self, items: impl Iterator<Item = (K, Loc, String, String)>) {
        let mut first: HashMap<K, (Loc, String)> = HashMap::new();
        for (key, loc, what, owner) in items {
            match first.get(&key) {
                Some((first_loc, first_owner)) => {
                    let message = format!(
                        "{what} is already used by node {first_owner} (first at {})",
                        first_loc.at()
                    );
                    self.error(&loc, message);
                }
                None => {
                    first.insert(key, (loc, owner));
                }
            }
        }
    }

    /// etcd runs on the control-plane nodes and needs a majority of them.
    fn control_plane_count(&mut self, nodes: &[NodeInput], nodes_loc: &Loc) {
        if nodes.iter().any(|n| !n.roles_valid) {
            return;
        }
        let count = nodes
            .iter()
            .filter(|n| n.role_set().contains(&NodeRole::ControlPlane))
            .count();
        if count == 0 {
            self.error(
                nodes_loc,
                "no node has the control-plane (or master) role; at least one is required",
            );
        } else if count % 2 == 0 {
            self.f.warnings.push(nodes_loc.diagnostic(
                Severity::Warning,
                format!(
                    "{count} control-plane nodes: etcd needs a majority, so {count} tolerate no more \
                     failures than {}; use an odd number",
                    count - 1
                ),
            ));
        }
    }

    fn ceph_consistency(
        &mut self,
        raw: Option<&RawCluster>,
        ceph: Option<&CephSettings>,
        nodes: &[NodeInput],
    ) {
        let section_written = raw.is_some_and(|c| c.ceph.is_some());
        match ceph {
            // A ceph section with a bad network was already reported; no
            // need to blame every ceph-mon node for it too.
            None if section_written => {}
            None => {
                for role in nodes
                    .iter()
                    .filter_map(|n| n.roles.as_ref())
                    .flat_map(|r| &r.value)
                    .filter(|r| r.value == NodeRole::CephMon)
                {
                    self.error(
                        &role.loc,
                        "role ceph-mon needs a cluster.ceph section with public_network",
                    );
                }
            }
            Some(ceph) => {
                let public_loc = raw
                    .and_then(|c| c.ceph.as_ref())
                    .and_then(|c| c.public_network.as_ref())
                    .map(|v| v.loc.at())
                    .unwrap_or_default();
                for ip in nodes.iter().filter_map(|n| n.ip.as_ref()) {
                    if !ceph.public_network.contains(&ip.value) {
                        let message = format!(
                            "{} is outside ceph public_network {} ({public_loc})",
                            ip.value, ceph.public_network
                        );
                        self.error(&ip.loc, message);
                    }
                }
                let dashboard_loc = raw
                    .and_then(|c| c.ceph.as_ref())
                    .and_then(|c| c.dashboard.as_ref())
                    .map(|v| v.loc.at())
                    .unwrap_or_default();
                // The dashboard's certificate is issued on the monitor's
                // node from the cluster CA, whose key only masters hold.
                for node in nodes.iter().filter(|n| {
                    ceph.dashboard && n.roles_valid && {
                        let roles = n.role_set();
                        roles.contains(&NodeRole::CephMon)
                            && !roles.contains(&NodeRole::ControlPlane)
                    }
                }) {
                    if let Some(roles) = &node.roles {
                        self.error(
                            &roles.loc,
                            format!(
                                "a ceph-mon node without role control-plane cannot serve the \
                                 dashboard (ceph.dashboard: true at {dashboard_loc}): its \
                                 certificate is issued from the cluster CA, whose key only \
                                 control-plane nodes hold; add control-plane or set \
                                 dashboard: false"
                            ),
                        );
                    }
                }
            }
        }
    }
}
