//! Matchbox data for PXE-booting the nodes: one profile per node (Flatcar's
//! PXE kernel and initrd, Ignition from Matchbox) and one group per MAC
//! address that selects it. The layout is Matchbox's `-data-path`:
//! `groups/`, `profiles/`, `ignition/`.

use serde::{Deserialize, Serialize};

use super::ipxe::mac_hyphens;
use crate::config::{ClusterConfig, NodeSpec};

/// Where Matchbox's `get-flatcar` script puts a release under `-assets-path`.
pub const DEFAULT_KERNEL: &str = "/assets/flatcar/current/flatcar_production_pxe.vmlinuz";
pub const DEFAULT_INITRD: &str = "/assets/flatcar/current/flatcar_production_pxe_image.cpio.gz";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Group {
    pub id: String,
    pub name: String,
    pub profile: String,
    pub selector: Selector,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selector {
    /// Lower-case, colon-separated: the form Matchbox normalises to.
    pub mac: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub id: String,
    pub name: String,
    pub boot: Boot,
    /// A file in Matchbox's `ignition/` dir; `.ign` makes Matchbox serve it
    /// as Ignition JSON rather than render it as a Butane template.
    pub ignition_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Boot {
    pub kernel: String,
    pub initrd: Vec<String>,
    pub args: Vec<String>,
}

/// Where the machines fetch things from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootSource {
    /// Matchbox's HTTPS endpoint, e.g. `https://matchbox.example.net:8443`.
    pub matchbox_url: String,
    pub kernel: String,
    pub initrd: String,
}

#[derive(Debug, thiserror::Error)]
pub enum MatchboxError {
    #[error(
        "--matchbox-url {url:?} is not an https:// URL; the Ignition configs carry the join secret, \
         which never travels in plaintext: run Matchbox with -web-ssl and give its https:// address"
    )]
    NotHttps { url: String },
    #[error(
        "node(s) {nodes} have no mac_addresses; Matchbox selects machines by MAC, so add them to \
         cluster.yaml (or provision those machines another way)"
    )]
    NoMac { nodes: String },
}

impl BootSource {
    pub fn new(
        matchbox_url: &str,
        kernel: &str,
        initrd: &str,
    ) -> Result<BootSource, MatchboxError> {
        let parsed = reqwest::Url::parse(matchbox_url).ok();
        let https = parsed
            .as_ref()
            .is_some_and(|u| u.scheme() == "https" && u.host_str().is_some());
        if !https {
            return Err(MatchboxError::NotHttps {
                url: matchbox_url.to_string(),
            });
        }
        Ok(BootSource {
            matchbox_url: matchbox_url.trim_end_matches('/').to_string(),
            kernel: kernel.to_string(),
            initrd: initrd.to_string(),
        })
    }
}

/// `<node>.ign`: the file name in `ignition/` and the profile's `ignition_id`.
pub fn ignition_id(node: &NodeSpec) -> String {
    format!("{}.ign", node.name)
}

pub fn profile(config: &ClusterConfig, node: &NodeSpec, source: &BootSource) -> Profile {
    let initrd_name = source.initrd.rsplit('/').next().unwrap_or(&source.initrd);
    Profile {
        id: node.name.clone(),
        name: format!(
            "Flatcar node {} of cluster {}",
            node.name, config.cluster.name
        ),
        boot: Boot {
            kernel: source.kernel.clone(),
            initrd: vec![source.initrd.clone()],
            // iPXE expands ${mac:hexhyp}; Matchbox matches it against the
            // group's selector.
            args: super::ipxe::kernel_args(
                initrd_name,
                &format!("{}/ignition?mac=${{mac:hexhyp}}", source.matchbox_url),
            ),
        },
        ignition_id: ignition_id(node),
    }
}

/// One group per MAC address: a group's selectors must all match, so one
/// group cannot list several MACs.
pub fn groups(node: &NodeSpec) -> Vec<Group> {
    node.mac_addresses
        .iter()
        .map(|mac| Group {
            id: format!("{}-{}", node.name, mac_hyphens(mac)),
            name: format!("{} ({mac})", node.name),
            profile: node.name.clone(),
            selector: Selector {
                mac: mac.to_string(),
            },
        })
        .collect()
}

/// Fails, naming them all, if any node has no MAC to select it by.
pub fn require_macs(config: &ClusterConfig) -> Result<(), MatchboxError> {
    let missing: Vec<&str> = config
        .nodes
        .iter()
        .filter(|n| n.mac_addresses.is_empty())
        .map(|n| n.name.as_str())
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(MatchboxError::NoMac {
            nodes: missing.join(", "),
        })
    }
}

pub fn to_json(value: &impl Serialize) -> String {
    let mut text = serde_json::to_string_pretty(value).expect("Matchbox data serialises");
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_urls_with_a_host_are_accepted() {
        for bad in ["http://m:8080", "m.example.net", "https://", "ftp://m", ""] {
            assert!(
                BootSource::new(bad, DEFAULT_KERNEL, DEFAULT_INITRD).is_err(),
                "{bad}"
            );
        }
        let ok = BootSource::new(
            "https://m.example.net:8443/",
            DEFAULT_KERNEL,
            DEFAULT_INITRD,
        )
        .unwrap();
        assert_eq!(ok.matchbox_url, "https://m.example.net:8443");
    }
}
