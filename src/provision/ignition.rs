//! Per-node Ignition configs (spec 3.4.0, what Flatcar's Ignition reads) as
//! typed values: the subset of the spec the agent needs, serialised with
//! serde, never templated. Tests validate the output against the official
//! JSON schema.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::config::{
    CLUSTER_FILE, ClusterConfig, IDENTITY_FILE, JOIN_SECRET_FILE, NodeSpec, Sources,
};
use crate::fsutil::{PUBLIC_MODE, SECRET_MODE};
use crate::paths::DEFAULT_CONFIG_DIR;
use crate::phases::node::{HOSTNAME_FILE, NETWORK_FILE, render_network};

pub const SPEC_VERSION: &str = "3.4.0";

/// The units shipped in `systemd/`, embedded so that a config never
/// disagrees with the repository.
pub const BOOTSTRAP_UNIT: (&str, &str) = (
    "cluster-bootstrap.service",
    include_str!("../../systemd/cluster-bootstrap.service"),
);
pub const JOIN_UNIT: (&str, &str) = (
    "cluster-join.service",
    include_str!("../../systemd/cluster-join.service"),
);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub ignition: Ignition,
    pub storage: Storage,
    pub systemd: Systemd,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ignition {
    pub version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Storage {
    pub directories: Vec<Directory>,
    pub files: Vec<File>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Directory {
    pub path: String,
    pub mode: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    pub path: String,
    /// Ignition refuses to replace an existing file unless told to; the
    /// image may already carry one (e.g. `/etc/hostname`).
    pub overwrite: bool,
    /// Decimal in JSON, as the spec wants it.
    pub mode: u32,
    pub contents: Resource,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resource {
    /// A `data:` URL: the config carries every byte itself.
    pub source: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Systemd {
    pub units: Vec<SystemdUnit>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SystemdUnit {
    pub name: String,
    /// `None` installs the unit without touching its enablement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    pub contents: String,
}

#[derive(Debug, thiserror::Error)]
pub enum IgnitionError {
    #[error(
        "the join secret {} is missing; create it with `cluster-agent gen-join-secret` \
         (it goes into every node's Ignition config)",
        path.display()
    )]
    MissingJoinSecret { path: std::path::PathBuf },
    #[error("cannot read the join secret {}: {source}", path.display())]
    ReadJoinSecret {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the join secret {} is empty; recreate it with `cluster-agent gen-join-secret --force`",
        path.display()
    )]
    EmptyJoinSecret { path: std::path::PathBuf },
}

/// `data:;base64,…` (RFC 2397), which Ignition decodes itself.
pub fn data_url(bytes: &[u8]) -> String {
    format!(
        "data:;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

fn file(path: String, mode: u32, bytes: &[u8]) -> File {
    File {
        path,
        overwrite: true,
        mode,
        contents: Resource {
            source: data_url(bytes),
        },
    }
}

/// Reads `<config_dir>/secrets/join-secret`, the one input beyond the
/// configuration files themselves.
pub fn read_join_secret(config_dir: &std::path::Path) -> Result<Vec<u8>, IgnitionError> {
    let path = config_dir.join(JOIN_SECRET_FILE);
    match std::fs::read(&path) {
        Ok(bytes) if bytes.is_empty() => Err(IgnitionError::EmptyJoinSecret { path }),
        Ok(bytes) => Ok(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(IgnitionError::MissingJoinSecret { path })
        }
        Err(source) => Err(IgnitionError::ReadJoinSecret { path, source }),
    }
}

/// The Ignition config for `node`: the configuration files as read
/// (`sources`), the node's identity, the join secret (0600 in a 0700 dir;
/// a worker-only node gets the worker secret derived from it),
/// its hostname and networkd file (the same bytes the `node` phase writes),
/// and the units. The paths are the machine's, whatever `--config-dir` the
/// operator rendered from.
pub fn render(
    sources: &Sources,
    join_secret: &[u8],
    config: &ClusterConfig,
    node: &NodeSpec,
) -> Config {
    let etc = |rel: &str| format!("{DEFAULT_CONFIG_DIR}/{rel}");
    let mut files = vec![file(etc(CLUSTER_FILE), PUBLIC_MODE, &sources.cluster_yaml)];
    files.extend(sources.node_files.iter().map(|f| {
        file(
            etc(&f.path.to_string_lossy()),
            PUBLIC_MODE,
            f.bytes.as_slice(),
        )
    }));
    // Every node's configuration names the CNI manifest, so every node
    // has it; add-ons are applied by masters only.
    files.extend(sources.cni_manifest.iter().map(|f| {
        file(
            etc(&f.path.to_string_lossy()),
            PUBLIC_MODE,
            f.bytes.as_slice(),
        )
    }));
    if node.is_control_plane() {
        files.extend(sources.manifests.iter().map(|f| {
            file(
                etc(&f.path.to_string_lossy()),
                PUBLIC_MODE,
                f.bytes.as_slice(),
            )
        }));
    }
    files.push(file(
        etc(IDENTITY_FILE),
        PUBLIC_MODE,
        format!("{}\n", node.name).as_bytes(),
    ));
    // Worker-only nodes get the worker secret derived from the cluster's:
    // enough to join, not enough to ask for CA or Ceph keys.
    let secret = if crate::join::JoinKeys::holds_worker_secret(node) {
        crate::join::JoinKeys::worker_secret(join_secret, &config.cluster.name).to_vec()
    } else {
        join_secret.to_vec()
    };
    files.push(file(etc(JOIN_SECRET_FILE), SECRET_MODE, &secret));
    files.push(file(
        HOSTNAME_FILE.to_string(),
        PUBLIC_MODE,
        format!("{}\n", node.hostname).as_bytes(),
    ));
    files.push(file(
        NETWORK_FILE.to_string(),
        PUBLIC_MODE,
        render_network(config, node).as_bytes(),
    ));
    let secrets_dir = std::path::Path::new(JOIN_SECRET_FILE)
        .parent()
        .expect("the join secret lives in a directory");
    Config {
        ignition: Ignition {
            version: SPEC_VERSION.to_string(),
        },
        storage: Storage {
            directories: vec![Directory {
                path: etc(&secrets_dir.to_string_lossy()),
                mode: 0o700,
            }],
            files,
        },
        systemd: Systemd {
            units: vec![
                SystemdUnit {
                    name: BOOTSTRAP_UNIT.0.to_string(),
                    enabled: Some(true),
                    contents: BOOTSTRAP_UNIT.1.to_string(),
                },
                // Started by whoever serves joins on this node, not at boot
                // by default.
                SystemdUnit {
                    name: JOIN_UNIT.0.to_string(),
                    enabled: None,
                    contents: JOIN_UNIT.1.to_string(),
                },
            ],
        },
    }
}

/// What `serve` answers over plain HTTP instead of a node's config: no
/// secret, only where Ignition fetches the real config over HTTPS, which
/// CA that server's certificate chains to, and the config's SHA-512, so a
/// node accepts nothing else (Ignition's `config.replace`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PointerConfig {
    pub ignition: PointerIgnition,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PointerIgnition {
    pub version: String,
    pub config: ConfigReferences,
    pub security: Security,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigReferences {
    pub replace: VerifiedResource,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifiedResource {
    pub source: String,
    pub verification: Verification,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Verification {
    /// `sha512-<hex>`, the form Ignition checks.
    pub hash: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Security {
    pub tls: Tls,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    #[serde(rename = "certificateAuthorities")]
    pub certificate_authorities: Vec<Resource>,
}

/// A pointer to `config` (the exact bytes a node gets) at `https_url`,
/// served with a certificate that chains to `ca_pem`.
pub fn pointer(https_url: &str, config: &[u8], ca_pem: &str) -> PointerConfig {
    let digest = ring::digest::digest(&ring::digest::SHA512, config);
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    PointerConfig {
        ignition: PointerIgnition {
            version: SPEC_VERSION.to_string(),
            config: ConfigReferences {
                replace: VerifiedResource {
                    source: https_url.to_string(),
                    verification: Verification {
                        hash: format!("sha512-{hex}"),
                    },
                },
            },
            security: Security {
                tls: Tls {
                    certificate_authorities: vec![Resource {
                        source: data_url(ca_pem.as_bytes()),
                    }],
                },
            },
        },
    }
}

/// Pretty JSON with a trailing newline, as written to files and stdout.
pub fn to_json(config: &impl Serialize) -> String {
    let mut text = serde_json::to_string_pretty(config).expect("an Ignition config serialises");
    text.push('\n');
    text
}
