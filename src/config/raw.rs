//! Raw layer: the shape of cluster.yaml and nodes/NAME.yaml, with positions.
//!
//! This plays the role of `#[serde(deny_unknown_fields)]` structs, but is
//! filled by a walk over the positioned [`tree`](super::tree) so that every
//! unknown key and every wrongly shaped value is reported, not just the first.
//! Scalars stay text here; `validate.rs` gives them their types.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::diagnostics::{Diagnostic, Severity};
use super::tree::{Kind, Node, Pos};

/// Allowed keys at each level. Also the list `docs/config-reference.md` is
/// checked against, so a new key cannot go undocumented.
pub const ROOT_KEYS: &[&str] = &["cluster", "nodes"];
pub const CLUSTER_KEYS: &[&str] = &[
    "name",
    "k8s_version",
    "control_plane_endpoint",
    "floating_endpoint",
    "networking",
    "bootstrap",
    "etcd",
    "containerd",
    "kubelet",
    "ceph",
    "provisioning",
];
pub const NETWORKING_KEYS: &[&str] = &[
    "pod_cidr",
    "service_cidr",
    "dns_domain",
    "gateway",
    "dns_servers",
    "prefix_length",
    "cni",
];
pub const CNI_KEYS: &[&str] = &["manifest"];
pub const BOOTSTRAP_KEYS: &[&str] = &["token_ttl", "join_port"];
pub const ETCD_KEYS: &[&str] = &["client_port", "peer_port"];
pub const CONTAINERD_KEYS: &[&str] = &["sandbox_image"];
pub const KUBELET_KEYS: &[&str] = &["eviction_hard"];
/// The kubelet's eviction signals (`pkg/kubelet/eviction/api`), the keys of
/// `kubelet.eviction_hard`.
pub const EVICTION_SIGNALS: &[&str] = &[
    "memory.available",
    "nodefs.available",
    "nodefs.inodesFree",
    "imagefs.available",
    "imagefs.inodesFree",
    "containerfs.available",
    "containerfs.inodesFree",
    "allocatableMemory.available",
    "pid.available",
];
pub const PROVISIONING_KEYS: &[&str] = &["kernel", "initrd"];
pub const CEPH_KEYS: &[&str] = &["public_network", "cluster_network", "dashboard"];
pub const NODE_KEYS: &[&str] = &["name", "hostname", "ip", "roles", "mac_addresses"];
pub const NODE_FILE_ROOT_KEYS: &[&str] = &["node"];
pub const NODE_FILE_NODE_KEYS: &[&str] = &["name", "hostname", "ip", "roles", "hardware"];
pub const HARDWARE_KEYS: &[&str] = &["mac_addresses"];

/// Where a value sits: file (relative to the config dir), position, field path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loc {
    pub file: PathBuf,
    pub pos: Pos,
    pub field: String,
}

impl Loc {
    pub fn diagnostic(&self, severity: Severity, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            severity,
            file: self.file.clone(),
            line: self.pos.line,
            column: self.pos.column,
            field: self.field.clone(),
            message: message.into(),
        }
    }

    pub fn error(&self, message: impl Into<String>) -> Diagnostic {
        self.diagnostic(Severity::Error, message)
    }

    /// `cluster.yaml:12:9`, for messages that point at a second place.
    pub fn at(&self) -> String {
        format!(
            "{}:{}:{}",
            self.file.display(),
            self.pos.line,
            self.pos.column
        )
    }

    /// The location of a missing child: the parent's position, the child's path.
    pub fn child(&self, key: &str) -> Loc {
        Loc {
            field: join(&self.field, key),
            ..self.clone()
        }
    }
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

/// A scalar value and where it was written.
#[derive(Debug, Clone, PartialEq)]
pub struct Val {
    pub text: String,
    /// False for quoted or tagged scalars, which YAML says are strings.
    pub plain: bool,
    pub loc: Loc,
}

#[derive(Debug, Clone, PartialEq)]
pub struct List {
    pub items: Vec<Val>,
    pub loc: Loc,
    /// False when the value was not a list or an item was not a scalar
    /// (already reported); later checks must not trust `items` then.
    pub complete: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RawClusterFile {
    pub root: Loc,
    pub cluster: Option<RawCluster>,
    pub nodes: Option<RawNodes>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RawNodes {
    pub loc: Loc,
    pub items: Vec<RawNode>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RawCluster {
    pub loc: Loc,
    pub name: Option<Val>,
    pub k8s_version: Option<Val>,
    pub control_plane_endpoint: Option<Val>,
    pub floating_endpoint: Option<Val>,
    pub networking: Option<RawNetworking>,
    pub bootstrap: Option<RawBootstrap>,
    pub etcd: Option<RawEtcd>,
    pub containerd: Option<RawContainerd>,
    pub kubelet: Option<RawKubelet>,
    pub ceph: Option<RawCeph>,
    pub provisioning: Option<RawProvisioning>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RawNetworking {
    pub pod_cidr: Option<Val>,
    pub service_cidr: Option<Val>,
    pub dns_domain: Option<Val>,
    pub gateway: Option<Val>,
    pub dns_servers: Option<List>,
    pub prefix_length: Option<Val>,
    pub cni: Option<RawCni>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RawCni {
    pub loc: Loc,
    pub manifest: Option<Val>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RawBootstrap {
    pub token_ttl: Option<Val>,
    pub join_port: Option<Val>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RawEtcd {
    pub client_port: Option<Val>,
    pub peer_port: Option<Val>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RawContainerd {
    pub sandbox_image: Option<Val>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RawKubelet {
    /// `(signal, threshold)`, in the order of [`EVICTION_SIGNALS`].
    pub eviction_hard: Vec<(String, Val)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RawProvisioning {
    pub kernel: Option<Val>,
    pub initrd: Option<Val>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RawCeph {
    pub loc: Loc,
    pub public_network: Option<Val>,
    pub cluster_network: Option<Val>,
    pub dashboard: Option<Val>,
}

/// A node as written in cluster.yaml `nodes[i]` or in a node file's `node:`.
#[derive(Debug, Clone, PartialEq)]
pub struct RawNode {
    pub loc: Loc,
    pub name: Option<Val>,
    pub hostname: Option<Val>,
    pub ip: Option<Val>,
    pub roles: Option<List>,
    pub mac_addresses: Option<List>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RawNodeFile {
    /// `nodes/cp-2.yaml`
    pub file: PathBuf,
    pub root: Loc,
    pub node: Option<RawNode>,
}

/// Reads cluster.yaml's tree; shape problems go to `errors`.
pub fn cluster_file(
    file: &Path,
    root: Option<&Node>,
    errors: &mut Vec<Diagnostic>,
) -> RawClusterFile {
    let mut w = Walker { file, errors };
    let root_loc = w.file_loc(root);
    let Some(f) = w.root(root, ROOT_KEYS) else {
        return RawClusterFile {
            root: root_loc,
            cluster: None,
            nodes: None,
        };
    };
    let cluster = w
        .required(&f, "cluster")
        .and_then(|n| w.cluster(n, "cluster"));
    let nodes = f.get("nodes").and_then(|n| w.nodes(n, "nodes"));
    RawClusterFile {
        root: root_loc,
        cluster,
        nodes,
    }
}

/// Reads a nodes/NAME.yaml tree; shape problems go to `errors`.
pub fn node_file(file: &Path, root: Option<&Node>, errors: &mut Vec<Diagnostic>) -> RawNodeFile {
    let mut w = Walker { file, errors };
    let root_loc = w.file_loc(root);
    let node = w
        .root(root, NODE_FILE_ROOT_KEYS)
        .and_then(|f| w.required(&f, "node"))
        .and_then(|n| w.node_file_node(n, "node"));
    RawNodeFile {
        file: file.to_path_buf(),
        root: root_loc,
        node,
    }
}

struct Walker<'a> {
    file: &'a Path,
    errors: &'a mut Vec<Diagnostic>,
}

/// The entries of one mapping, after unknown and duplicate keys were reported.
struct Fields<'n> {
    loc: Loc,
    entries: HashMap<&'n str, &'n Node>,
}

impl<'n> Fields<'n> {
    fn get(&self, key: &str) -> Option<&'n Node> {
        self.entries.get(key).copied()
    }
}

impl Walker<'_> {
    fn loc(&self, node: &Node, field: String) -> Loc {
        Loc {
            file: self.file.to_path_buf(),
            pos: node.pos,
            field,
        }
    }

    /// An empty file has no root node; findings about it concern the whole file.
    fn file_loc(&self, root: Option<&Node>) -> Loc {
        Loc {
            file: self.file.to_path_buf(),
            pos: root.map(|r| r.pos).unwrap_or_default(),
            field: String::new(),
        }
    }

    /// The top-level mapping; an empty file is reported as a whole.
    fn root<'n>(&mut self, root: Option<&'n Node>, allowed: &[&str]) -> Option<Fields<'n>> {
        let Some(root) = root else {
            let loc = self.file_loc(None);
            self.errors.push(loc.error("the file is empty"));
            return None;
        };
        if root.is_null() {
            self.expected(root, "", "a mapping");
            return None;
        }
        self.map(root, "", allowed)
    }

    /// A key whose absence is an error, reported at the enclosing mapping.
    fn required<'n>(&mut self, f: &Fields<'n>, key: &str) -> Option<&'n Node> {
        let node = f.get(key).filter(|n| !n.is_null());
        if node.is_none() {
            self.errors
                .push(f.loc.child(key).error("required field is missing"));
        }
        node
    }

    fn expected(&mut self, node: &Node, field: &str, what: &str) {
        let got = match &node.kind {
            Kind::Scalar { text, .. } if !node.is_null() => format!("{text:?}"),
            _ => node.describe().to_owned(),
        };
        let loc = self.loc(node, field.to_owned());
        self.errors
            .push(loc.error(format!("expected {what}, got {got}")));
    }

    /// A mapping with only `allowed` keys. Null counts as absent.
    fn map<'n>(&mut self, node: &'n Node, field: &str, allowed: &[&str]) -> Option<Fields<'n>> {
        if node.is_null() {
            return None;
        }
        let Kind::Map(pairs) = &node.kind else {
            self.expected(node, field, "a mapping");
            return None;
        };
        let mut entries: HashMap<&str, &Node> = HashMap::new();
        let mut first_seen: HashMap<&str, Pos> = HashMap::new();
        for (key, value) in pairs {
            let Kind::Scalar { text, .. } = &key.kind else {
                self.expected(key, field, "a plain key");
                continue;
            };
            let path = join(field, text);
            if !allowed.contains(&text.as_str()) {
                let loc = self.loc(key, path);
                self.errors
                    .push(loc.error(unknown_key_message(text, allowed)));
                continue;
            }
            if let Some(first) = first_seen.get(text.as_str()) {
                let loc = self.loc(key, path);
                let message = format!(
                    "duplicate key `{text}` (first given on line {})",
                    first.line
                );
                self.errors.push(loc.error(message));
                continue;
            }
            first_seen.insert(text, key.pos);
            entries.insert(text, value);
        }
        Some(Fields {
            loc: self.loc(node, field.to_owned()),
            entries,
        })
    }

    /// A scalar. Null counts as absent, like an omitted key.
    fn scalar(&mut self, node: &Node, field: String) -> Option<Val> {
        match &node.kind {
            _ if node.is_null() => None,
            Kind::Scalar { text, plain } => Some(Val {
                text: text.clone(),
                plain: *plain,
                loc: self.loc(node, field),
            }),
            _ => {
                self.expected(node, &field, "a single value");
                None
            }
        }
    }

    fn scalar_field(&mut self, f: &Fields, key: &str) -> Option<Val> {
        let node = f.get(key)?;
        self.scalar(node, join(&f.loc.field, key))
    }

    /// A list of scalars; a null list is absent, a null item is an error.
    /// A scalar that must be present; its absence is reported at the
    /// enclosing mapping.
    fn required_scalar(&mut self, f: &Fields, key: &str) -> Option<Val> {
        let node = self.required(f, key)?;
        self.scalar(node, join(&f.loc.field, key))
    }

    fn list_field(&mut self, f: &Fields, key: &str) -> Option<List> {
        let node = f.get(key)?;
        let field = join(&f.loc.field, key);
        if node.is_null() {
            return None;
        }
        let loc = self.loc(node, field.clone());
        let Kind::Seq(nodes) = &node.kind else {
            self.expected(node, &field, "a list");
            return Some(List {
                items: vec![],
                loc,
                complete: false,
            });
        };
        let mut items = Vec::with_capacity(nodes.len());
        for (i, item) in nodes.iter().enumerate() {
            let item_field = format!("{field}[{i}]");
            if item.is_null() {
                self.expected(item, &item_field, "a value");
            } else if let Some(v) = self.scalar(item, item_field) {
                items.push(v);
            }
        }
        Some(List {
            complete: items.len() == nodes.len(),
            items,
            loc,
        })
    }

    fn sub_map<'n>(&mut self, f: &Fields<'n>, key: &str, allowed: &[&str]) -> Option<Fields<'n>> {
        let node = f.get(key)?;
        self.map(node, &join(&f.loc.field, key), allowed)
    }

    fn cluster(&mut self, node: &Node, field: &str) -> Option<RawCluster> {
        let f = self.map(node, field, CLUSTER_KEYS)?;
        let networking = self
            .sub_map(&f, "networking", NETWORKING_KEYS)
            .map(|n| RawNetworking {
                pod_cidr: self.scalar_field(&n, "pod_cidr"),
                service_cidr: self.scalar_field(&n, "service_cidr"),
                dns_domain: self.scalar_field(&n, "dns_domain"),
                gateway: self.scalar_field(&n, "gateway"),
                dns_servers: self.list_field(&n, "dns_servers"),
                prefix_length: self.scalar_field(&n, "prefix_length"),
                cni: self.sub_map(&n, "cni", CNI_KEYS).map(|c| RawCni {
                    manifest: self.required_scalar(&c, "manifest"),
                    loc: c.loc,
                }),
            });
        let bootstrap = self
            .sub_map(&f, "bootstrap", BOOTSTRAP_KEYS)
            .map(|b| RawBootstrap {
                token_ttl: self.scalar_field(&b, "token_ttl"),
                join_port: self.scalar_field(&b, "join_port"),
            });
        let etcd = self.sub_map(&f, "etcd", ETCD_KEYS).map(|e| RawEtcd {
            client_port: self.scalar_field(&e, "client_port"),
            peer_port: self.scalar_field(&e, "peer_port"),
        });
        let containerd = self
            .sub_map(&f, "containerd", CONTAINERD_KEYS)
            .map(|c| RawContainerd {
                sandbox_image: self.scalar_field(&c, "sandbox_image"),
            });
        let kubelet = self.sub_map(&f, "kubelet", KUBELET_KEYS).map(|k| {
            let eviction_hard = self
                .sub_map(&k, "eviction_hard", EVICTION_SIGNALS)
                .map(|e| {
                    EVICTION_SIGNALS
                        .iter()
                        .filter_map(|signal| {
                            let threshold = self.scalar_field(&e, signal)?;
                            Some((signal.to_string(), threshold))
                        })
                        .collect()
                })
                .unwrap_or_default();
            RawKubelet { eviction_hard }
        });
        let ceph = self.sub_map(&f, "ceph", CEPH_KEYS).map(|c| RawCeph {
            public_network: self.required_scalar(&c, "public_network"),
            cluster_network: self.scalar_field(&c, "cluster_network"),
            dashboard: self.scalar_field(&c, "dashboard"),
            loc: c.loc,
        });
        let provisioning = self
            .sub_map(&f, "provisioning", PROVISIONING_KEYS)
            .map(|p| RawProvisioning {
                kernel: self.scalar_field(&p, "kernel"),
                initrd: self.scalar_field(&p, "initrd"),
            });
        Some(RawCluster {
            name: self.required_scalar(&f, "name"),
            k8s_version: self.scalar_field(&f, "k8s_version"),
            control_plane_endpoint: self.scalar_field(&f, "control_plane_endpoint"),
            floating_endpoint: self.scalar_field(&f, "floating_endpoint"),
            networking,
            bootstrap,
            etcd,
            containerd,
            kubelet,
            ceph,
            provisioning,
            loc: f.loc,
        })
    }

    fn nodes(&mut self, node: &Node, field: &str) -> Option<RawNodes> {
        let loc = self.loc(node, field.to_owned());
        if node.is_null() {
            return Some(RawNodes { loc, items: vec![] });
        }
        let Kind::Seq(items) = &node.kind else {
            self.expected(node, field, "a list of nodes");
            return None;
        };
        let items = items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| {
                let item_field = format!("{field}[{i}]");
                if item.is_null() {
                    self.expected(item, &item_field, "a node mapping");
                    return None;
                }
                let f = self.map(item, &item_field, NODE_KEYS)?;
                Some(self.node_fields(&f, "mac_addresses"))
            })
            .collect();
        Some(RawNodes { loc, items })
    }

    fn node_file_node(&mut self, node: &Node, field: &str) -> Option<RawNode> {
        let f = self.map(node, field, NODE_FILE_NODE_KEYS)?;
        let mut raw = self.node_fields(&f, "");
        raw.mac_addresses = self
            .sub_map(&f, "hardware", HARDWARE_KEYS)
            .and_then(|h| self.list_field(&h, "mac_addresses"));
        Some(raw)
    }

    /// The node keys shared by both files; `macs_key` is empty where MACs
    /// live elsewhere (under `hardware:` in node files).
    fn node_fields(&mut self, f: &Fields, macs_key: &str) -> RawNode {
        RawNode {
            loc: f.loc.clone(),
            name: self.required_scalar(f, "name"),
            hostname: self.scalar_field(f, "hostname"),
            ip: self.required_scalar(f, "ip"),
            roles: self.list_field(f, "roles"),
            mac_addresses: if macs_key.is_empty() {
                None
            } else {
                self.list_field(f, macs_key)
            },
        }
    }
}

fn unknown_key_message(key: &str, allowed: &[&str]) -> String {
    match suggest(key, allowed) {
        Some(best) => format!("unknown field `{key}`, did you mean `{best}`?"),
        None => format!(
            "unknown field `{key}`, expected one of: {}",
            allowed.join(", ")
        ),
    }
}

/// The closest candidate, if it is close enough to be a plausible typo.
pub fn suggest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).max(2);
    candidates
        .iter()
        .map(|c| (edit_distance(word, c), *c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Levenshtein distance, over chars.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_basics() {
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("pod_cdir", "pod_cidr"), 2);
        assert_eq!(edit_distance("same", "same"), 0);
    }

    #[test]
    fn suggestions_only_for_near_misses() {
        assert_eq!(suggest("pod_cdir", NETWORKING_KEYS), Some("pod_cidr"));
        assert_eq!(suggest("hostnme", NODE_KEYS), Some("hostname"));
        assert_eq!(suggest("colour", NODE_KEYS), None);
    }

    /// The reference must mention every key the loader accepts.
    #[test]
    fn every_key_is_documented() {
        let doc = include_str!("../../docs/config-reference.md");
        let all = [
            ROOT_KEYS,
            CLUSTER_KEYS,
            NETWORKING_KEYS,
            CNI_KEYS,
            BOOTSTRAP_KEYS,
            ETCD_KEYS,
            CONTAINERD_KEYS,
            KUBELET_KEYS,
            EVICTION_SIGNALS,
            CEPH_KEYS,
            NODE_KEYS,
            NODE_FILE_ROOT_KEYS,
            NODE_FILE_NODE_KEYS,
            HARDWARE_KEYS,
        ];
        for key in all.iter().flat_map(|keys| keys.iter()) {
            assert!(
                doc.contains(&format!("`{key}`")),
                "docs/config-reference.md lacks `{key}`"
            );
        }
    }
}
