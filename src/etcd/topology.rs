//! Where each control-plane node's etcd listens, and the unit that runs it.
//! Every path in the rendered unit is already under `--root`, because the
//! unit file is what both service backends execute.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::{ClusterConfig, NodeRole, NodeSpec};
use crate::paths::HostPaths;
use crate::pki::{CaKind, LeafKind, PkiPaths};
use crate::role::ordered_nodes;
use crate::services::{EnvironmentFile, RestartPolicy, ServiceSection, ServiceType, Unit};

use super::ClientTls;

pub const UNIT_NAME: &str = "etcd.service";
pub const ETCD_BINARY: &str = "etcd";
pub const DATA_DIR: &str = "/var/lib/etcd";
pub const ENV_FILE: &str = "/etc/etcd/etcd.env";

pub fn client_url(config: &ClusterConfig, node: &NodeSpec) -> String {
    format!("https://{}:{}", node.ip, config.cluster.etcd.client_port)
}

pub fn peer_url(config: &ClusterConfig, node: &NodeSpec) -> String {
    format!("https://{}:{}", node.ip, config.cluster.etcd.peer_port)
}

/// `ETCD_INITIAL_CLUSTER` of a founder: itself alone.
pub fn founding_initial_cluster(config: &ClusterConfig, node: &NodeSpec) -> String {
    format!("{}={}", node.name, peer_url(config, node))
}

/// Client URLs of the other control-plane nodes, in the stable order.
pub fn peer_client_urls(config: &ClusterConfig, me: &NodeSpec) -> Vec<String> {
    ordered_nodes(config, NodeRole::ControlPlane)
        .into_iter()
        .filter(|n| n.name != me.name)
        .map(|n| client_url(config, n))
        .collect()
}

/// The identity the agent uses towards etcd (the healthcheck client, as
/// kubeadm's probes do; etcd's client-cert auth accepts any cert its CA
/// signed).
pub fn agent_tls(paths: &HostPaths) -> ClientTls {
    let pki = PkiPaths::new(paths);
    let leaf = pki.leaf(LeafKind::EtcdHealthcheckClient);
    ClientTls {
        ca: pki.ca(CaKind::Etcd).cert,
        cert: leaf.cert,
        key: leaf.key,
    }
}

pub fn data_dir(paths: &HostPaths) -> PathBuf {
    paths.host(DATA_DIR)
}

/// True once etcd has written a member into the data dir (its WAL): from
/// then on the dir belongs to one member id and must not be reused blindly.
pub fn has_local_member(paths: &HostPaths) -> bool {
    data_dir(paths).join("member/wal").is_dir()
}

/// How this node's etcd member came to be, persisted before etcd starts so a
/// crash never changes the decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Formation {
    /// Founded a single-member cluster.
    New,
    /// Joined an existing cluster as a learner.
    Join,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EtcdRecord {
    pub formation: Formation,
    /// `name=peer-url,…` as etcd wants it in `ETCD_INITIAL_CLUSTER`.
    pub initial_cluster: String,
    /// Hex member id, known once the member was added (join) or started (new).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member_id: Option<String>,
}

pub fn render_unit(
    paths: &HostPaths,
    config: &ClusterConfig,
    node: &NodeSpec,
    record: &EtcdRecord,
) -> Unit {
    let pki = PkiPaths::new(paths);
    let ca = pki.ca(CaKind::Etcd).cert;
    let server = pki.leaf(LeafKind::EtcdServer);
    let peer = pki.leaf(LeafKind::EtcdPeer);
    let client_url = client_url(config, node);
    let peer_url = peer_url(config, node);
    let path = |p: &PathBuf| p.display().to_string();
    let vars: BTreeMap<String, String> = [
        ("ETCD_NAME", node.name.clone()),
        ("ETCD_DATA_DIR", path(&data_dir(paths))),
        ("ETCD_LISTEN_CLIENT_URLS", client_url.clone()),
        ("ETCD_ADVERTISE_CLIENT_URLS", client_url),
        ("ETCD_LISTEN_PEER_URLS", peer_url.clone()),
        ("ETCD_INITIAL_ADVERTISE_PEER_URLS", peer_url),
        ("ETCD_INITIAL_CLUSTER", record.initial_cluster.clone()),
        (
            "ETCD_INITIAL_CLUSTER_STATE",
            match record.formation {
                Formation::New => "new",
                Formation::Join => "existing",
            }
            .to_string(),
        ),
        (
            "ETCD_INITIAL_CLUSTER_TOKEN",
            format!("{}-etcd", config.cluster.name),
        ),
        ("ETCD_CERT_FILE", path(&server.cert)),
        ("ETCD_KEY_FILE", path(&server.key)),
        ("ETCD_TRUSTED_CA_FILE", path(&ca)),
        ("ETCD_CLIENT_CERT_AUTH", "true".to_string()),
        ("ETCD_PEER_CERT_FILE", path(&peer.cert)),
        ("ETCD_PEER_KEY_FILE", path(&peer.key)),
        ("ETCD_PEER_TRUSTED_CA_FILE", path(&ca)),
        ("ETCD_PEER_CLIENT_CERT_AUTH", "true".to_string()),
        ("ETCD_LOGGER", "zap".to_string()),
        ("ETCD_LOG_OUTPUTS", "stderr".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    Unit {
        name: UNIT_NAME.to_string(),
        description: format!(
            "etcd member {} of cluster {}",
            node.name, config.cluster.name
        ),
        after: vec!["network-online.target".into()],
        wants: vec!["network-online.target".into()],
        requires: vec![],
        service: ServiceSection {
            type_: ServiceType::Notify,
            exec_start: vec![path(&paths.binary(ETCD_BINARY))],
            environment: BTreeMap::new(),
            environment_file: Some(EnvironmentFile {
                path: paths.host(ENV_FILE),
                optional: false,
                vars,
            }),
            working_directory: None,
            restart: Some(RestartPolicy::Always),
            restart_sec: Some(std::time::Duration::from_secs(5)),
            timeout_start_sec: Some(std::time::Duration::from_secs(120)),
            timeout_stop_sec: None,
            limit_nofile: Some(65536),
        },
        install: crate::services::InstallSection {
            wanted_by: vec!["multi-user.target".into()],
        },
        systemd_only: Vec::new(),
    }
}

/// `ETCD_INITIAL_CLUSTER` for a joiner: every member that has started (etcd
/// knows its name) plus the joiner itself, as `etcdctl member add` prints it.
pub fn initial_cluster_for_join(
    members: &[super::Member],
    my_name: &str,
    my_peer_url: &str,
) -> String {
    let mut parts: Vec<String> = members
        .iter()
        .filter(|m| m.started() && m.name != my_name)
        .flat_map(|m| m.peer_urls.iter().map(move |u| format!("{}={u}", m.name)))
        .collect();
    parts.push(format!("{my_name}={my_peer_url}"));
    parts.join(",")
}
