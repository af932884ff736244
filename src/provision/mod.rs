//! What provisions a machine before the agent ever runs: per-node Ignition
//! configs and the Matchbox data that PXE-boots Flatcar with them. Rendered
//! on the operator's machine from the same config dir the nodes get.

pub mod dnsmasq;
pub mod ignition;
pub mod ipxe;
pub mod matchbox;
pub mod serve;

use std::path::{Path, PathBuf};

use crate::config::{self, ClusterConfig, ConfigError, NodeSpec, Sources};
use crate::fsutil::{self, PUBLIC_MODE, SECRET_MODE, WriteError};

pub use ignition::IgnitionError;
pub use matchbox::{BootSource, MatchboxError};

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Ignition(#[from] IgnitionError),
    #[error(transparent)]
    Matchbox(#[from] MatchboxError),
    #[error("node {name:?} is not in the cluster configuration; known nodes: {known}")]
    UnknownNode { name: String, known: String },
    #[error(transparent)]
    Write(#[from] WriteError),
}

/// A config dir read once: its files as they are, the validated
/// configuration, and the join secret (kept out of `Debug`).
#[derive(Clone)]
pub struct Bundle {
    pub sources: Sources,
    pub config: ClusterConfig,
    join_secret: Vec<u8>,
}

impl std::fmt::Debug for Bundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bundle")
            .field("config", &self.config.source_dir)
            .field("join_secret", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl Bundle {
    /// Fails on an invalid configuration (every finding) or a missing join
    /// secret, before anything is written.
    pub fn load(config_dir: &Path) -> Result<Bundle, ProvisionError> {
        let mut sources = config::read_sources(config_dir)?;
        let config = config::parse_sources(config_dir, &sources.cluster_yaml, &sources.node_files)
            .map_err(|report| ConfigError::Invalid {
                dir: config_dir.to_path_buf(),
                report,
            })?;
        sources.read_cni_manifest(config_dir, &config)?;
        let join_secret = ignition::read_join_secret(config_dir)?;
        Ok(Bundle {
            sources,
            config,
            join_secret,
        })
    }

    pub fn node(&self, name: &str) -> Result<&NodeSpec, ProvisionError> {
        self.config
            .node(name)
            .ok_or_else(|| ProvisionError::UnknownNode {
                name: name.to_string(),
                known: self
                    .config
                    .nodes
                    .iter()
                    .map(|n| n.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    pub fn ignition(&self, node: &NodeSpec) -> ignition::Config {
        ignition::render(&self.sources, &self.join_secret, &self.config, node)
    }

    /// `<dir>/<node>.ign` for every node, 0600 (they hold the join secret).
    pub fn write_ignition_all(&self, dir: &Path) -> Result<Vec<PathBuf>, ProvisionError> {
        let mut written = Vec::new();
        for node in &self.config.nodes {
            let path = dir.join(matchbox::ignition_id(node));
            let json = ignition::to_json(&self.ignition(node));
            fsutil::write_atomic(&path, json.as_bytes(), SECRET_MODE)?;
            written.push(path);
        }
        Ok(written)
    }

    /// A Matchbox data dir: `profiles/<node>.json`, `groups/<node>-<mac>.json`
    /// for each MAC, `ignition/<node>.ign`. Checks every node has a MAC
    /// before writing anything.
    pub fn write_matchbox(
        &self,
        dir: &Path,
        source: &BootSource,
    ) -> Result<Vec<PathBuf>, ProvisionError> {
        matchbox::require_macs(&self.config)?;
        let mut written = self.write_ignition_all(&dir.join("ignition"))?;
        for node in &self.config.nodes {
            let profile = matchbox::profile(&self.config, node, source);
            let path = dir.join("profiles").join(format!("{}.json", profile.id));
            fsutil::write_atomic(&path, matchbox::to_json(&profile).as_bytes(), PUBLIC_MODE)?;
            written.push(path);
            for group in matchbox::groups(node) {
                let path = dir.join("groups").join(format!("{}.json", group.id));
                fsutil::write_atomic(&path, matchbox::to_json(&group).as_bytes(), PUBLIC_MODE)?;
                written.push(path);
            }
        }
        Ok(written)
    }
}
