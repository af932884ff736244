//! Who am I? `--node`, else the `node-identity` file, else this machine's
//! physical MAC addresses matched against the configuration.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::config::{ClusterConfig, IDENTITY_FILE, MacAddr, NodeSpec};
use crate::paths::HostPaths;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "node {name:?} ({source_desc}) is not in the cluster configuration; known nodes: {known}"
    )]
    UnknownNode {
        name: String,
        source_desc: String,
        known: String,
    },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "no node in the configuration has any of this machine's MAC addresses ({seen}); add one to a node's mac_addresses or write the node name to {identity_file}"
    )]
    NoMatch {
        seen: String,
        identity_file: PathBuf,
    },
    #[error(
        "this machine's MAC addresses match several nodes ({nodes}); fix mac_addresses in the configuration or write the node name to {identity_file}"
    )]
    Ambiguous {
        nodes: String,
        identity_file: PathBuf,
    },
}

/// How the identity was established, for `plan`/`status` output.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case", tag = "by", content = "detail")]
pub enum IdentitySource {
    CommandLine,
    IdentityFile(PathBuf),
    Mac(String),
}

pub fn resolve<'c>(
    paths: &HostPaths,
    config: &'c ClusterConfig,
    node_override: Option<&str>,
) -> Result<(&'c NodeSpec, IdentitySource), IdentityError> {
    let identity_file = paths.config_dir().join(IDENTITY_FILE);
    let named = |name: &str, source: IdentitySource| {
        config
            .node(name)
            .map(|n| (n, source.clone()))
            .ok_or_else(|| IdentityError::UnknownNode {
                name: name.to_string(),
                source_desc: match &source {
                    IdentitySource::CommandLine => "from --node".to_string(),
                    IdentitySource::IdentityFile(p) => format!("from {}", p.display()),
                    IdentitySource::Mac(m) => format!("by MAC {m}"),
                },
                known: config
                    .nodes
                    .iter()
                    .map(|n| n.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    };
    if let Some(name) = node_override {
        return named(name, IdentitySource::CommandLine);
    }
    match fs::read_to_string(&identity_file) {
        Ok(text) if !text.trim().is_empty() => {
            return named(text.trim(), IdentitySource::IdentityFile(identity_file));
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(IdentityError::Io {
                path: identity_file,
                source,
            });
        }
    }
    let macs = physical_macs(&paths.host("/sys/class/net"))?;
    let matches: Vec<(&NodeSpec, MacAddr)> = config
        .nodes
        .iter()
        .filter_map(|n| {
            n.mac_addresses
                .iter()
                .find(|m| macs.contains(m))
                .map(|m| (n, *m))
        })
        .collect();
    match matches.as_slice() {
        [(node, mac)] => Ok((node, IdentitySource::Mac(mac.to_string()))),
        [] => Err(IdentityError::NoMatch {
            seen: if macs.is_empty() {
                "none found".to_string()
            } else {
                macs.iter()
                    .map(MacAddr::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            },
            identity_file,
        }),
        several => Err(IdentityError::Ambiguous {
            nodes: several
                .iter()
                .map(|(n, m)| format!("{} by {m}", n.name))
                .collect::<Vec<_>>()
                .join(", "),
            identity_file,
        }),
    }
}

/// MACs of interfaces backed by a device (`/sys/class/net/X/device` exists):
/// bridges, bonds, veths and loopback have none, and their addresses are
/// random or copied, so they must not decide who this machine is.
pub fn physical_macs(sys_class_net: &Path) -> Result<Vec<MacAddr>, IdentityError> {
    let entries = match fs::read_dir(sys_class_net) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(IdentityError::Io {
                path: sys_class_net.to_path_buf(),
                source,
            });
        }
    };
    let mut macs = Vec::new();
    for entry in entries.flatten() {
        let dir = entry.path();
        if !dir.join("device").exists() {
            continue;
        }
        if let Ok(text) = fs::read_to_string(dir.join("address"))
            && let Some(mac) = MacAddr::parse(&text)
        {
            macs.push(mac);
        }
    }
    macs.sort();
    macs.dedup();
    Ok(macs)
}
