//! The built-in pod network, which needs no container image: on each node
//! a bridge with host-local addresses from the node's pod CIDR (the CNI
//! reference plugins, as in Kubernetes the Hard Way), and host-gateway
//! routes to every other node's pod CIDR through that node's address (as
//! flannel's host-gw). Pods reach each other across nodes unencapsulated,
//! which needs the nodes on one L2 segment, as a rack's are.
//!
//! The routes carry their own protocol number ([`ROUTE_PROTOCOL`]) so that
//! the agent knows which routes are its own: it replaces and removes those
//! only, never the operator's or networkd's. They are kept by
//! `cluster-pod-routes.service` (`cluster-agent pod-routes`), which watches
//! the Nodes, so a node that joins later gets routes to all and all get a
//! route to it, with nobody re-running anything.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Node;

use crate::k8s::node::{internal_ip, pod_cidr};

/// `/etc/cni/net.d` (containerd's `conf_dir`): the first file in name
/// order is the network containerd uses.
pub const CONFLIST_FILE: &str = "/etc/cni/net.d/10-cluster-agent.conflist";
/// host-local's leases (its default is the host's `/var/lib/cni`).
pub const IPAM_DIR: &str = "/var/lib/cni";
pub const NETWORK_NAME: &str = "cluster-agent";
pub const BRIDGE: &str = "cni0";
/// The reference plugins the conflist names, looked up in
/// [`crate::containerd::CNI_BIN_DIRS`].
pub const PLUGINS: [&str; 4] = ["bridge", "host-local", "portmap", "loopback"];
/// The routing protocol number the agent's routes carry (`ip route …
/// proto 201`); 201 is unassigned in `/etc/iproute2/rt_protos`.
pub const ROUTE_PROTOCOL: u8 = 201;

#[derive(Debug, thiserror::Error)]
pub enum PodNetError {
    #[error(
        "cannot run `{command}` (iproute2 and iptables are part of every node image): {source}"
    )]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed (exit {code:?}): {stderr}")]
    Failed {
        command: String,
        code: Option<i32>,
        stderr: String,
    },
    #[error("`{command}` printed what is not its JSON route list: {reason}")]
    Parse { command: String, reason: String },
}

/// iptables' exit status for "no such rule" (`-C`, `-D`).
const IPTABLES_NO_RULE: i32 = 1;
/// `ip route del` of a route that is not there: ESRCH.
const IP_NO_ROUTE: &str = "No such process";

/// The conflist for a node whose pod CIDR is `pod_cidr`. The bridge is the
/// pods' gateway. `ipMasq` stays off: the plugin would translate every
/// packet leaving the node's own range, other nodes' pods included, and
/// Kubernetes' network model wants pods to see each other's addresses.
/// Traffic from pods to outside the cluster's pod CIDR is masqueraded by
/// the route keeper's one rule instead ([`masquerade_rule`]).
pub fn render_conflist(pod_cidr: Ipv4Net, ipam_dir: &Path) -> String {
    let gateway = Ipv4Addr::from(u32::from(pod_cidr.network()) + 1);
    let conf = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": NETWORK_NAME,
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": pod_cidr.to_string(), "gateway": gateway.to_string()}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": ipam_dir.join("networks"),
                }
            },
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]
    });
    serde_json::to_string_pretty(&conf).expect("serialisable") + "\n"
}

/// The subnet a conflist written by [`render_conflist`] hands out.
pub fn conflist_subnet(text: &str) -> Option<Ipv4Net> {
    let conf: serde_json::Value = serde_json::from_str(text).ok()?;
    conf["plugins"][0]["ipam"]["ranges"][0][0]["subnet"]
        .as_str()?
        .parse()
        .ok()
}

/// The plugins of [`PLUGINS`] found in none of `dirs`.
pub fn missing_plugins(dirs: &[PathBuf]) -> Vec<&'static str> {
    PLUGINS
        .into_iter()
        .filter(|p| !dirs.iter().any(|d| d.join(p).is_file()))
        .collect()
}

/// One route to another node's pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PodRoute {
    pub pod_cidr: Ipv4Net,
    pub via: Ipv4Addr,
}

/// The routes `own` needs: every other Node with a pod CIDR and an
/// InternalIP. Nodes on loopback addresses share one host's network (tests,
/// `lab` without `--netns`): no route can lead to them, and none is needed.
pub fn desired_routes<'a>(nodes: impl IntoIterator<Item = &'a Node>, own: &str) -> Vec<PodRoute> {
    let mut routes: Vec<PodRoute> = nodes
        .into_iter()
        .filter(|n| n.metadata.name.as_deref() != Some(own))
        .filter_map(|n| {
            Some(PodRoute {
                pod_cidr: pod_cidr(n)?,
                via: internal_ip(n).filter(|ip| !ip.is_loopback())?,
            })
        })
        .collect();
    routes.sort();
    routes.dedup();
    routes
}

/// What to change so that `installed` becomes `desired`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RouteChanges {
    pub replace: Vec<PodRoute>,
    pub remove: Vec<Ipv4Net>,
}

impl RouteChanges {
    pub fn is_empty(&self) -> bool {
        self.replace.is_empty() && self.remove.is_empty()
    }
}

pub fn route_changes(installed: &[PodRoute], desired: &[PodRoute]) -> RouteChanges {
    RouteChanges {
        replace: desired
            .iter()
            .filter(|d| !installed.contains(d))
            .copied()
            .collect(),
        remove: installed
            .iter()
            .filter(|i| !desired.iter().any(|d| d.pod_cidr == i.pod_cidr))
            .map(|i| i.pod_cidr)
            .collect(),
    }
}

async fn run(program: &str, args: &[String]) -> Result<String, PodNetError> {
    let command = format!("{program} {}", args.join(" "));
    let out = tokio::process::Command::new(program)
        .args(args)
        .output()
        .await
        .map_err(|source| PodNetError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(PodNetError::Failed {
            command,
            code: out.status.code(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn ip(args: &[String]) -> Result<String, PodNetError> {
    run("ip", args).await
}

fn args(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| w.to_string()).collect()
}

/// The agent's routes in this network namespace's main table.
pub async fn installed_routes() -> Result<Vec<PodRoute>, PodNetError> {
    let proto = ROUTE_PROTOCOL.to_string();
    let argv = args(&["-j", "-4", "route", "show", "proto", &proto]);
    let text = ip(&argv).await?;
    parse_routes(&text).map_err(|reason| PodNetError::Parse {
        command: format!("ip {}", argv.join(" ")),
        reason,
    })
}

fn parse_routes(text: &str) -> Result<Vec<PodRoute>, String> {
    #[derive(serde::Deserialize)]
    struct Entry {
        dst: String,
        gateway: Option<String>,
    }
    // `ip -j` prints nothing at all for an empty table on some versions.
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let entries: Vec<Entry> = serde_json::from_str(text).map_err(|e| e.to_string())?;
    entries
        .into_iter()
        .map(|e| {
            let pod_cidr = e
                .dst
                .parse()
                .map_err(|err| format!("dst {:?}: {err}", e.dst))?;
            let via = e
                .gateway
                .as_deref()
                .unwrap_or_default()
                .parse()
                .map_err(|err| format!("gateway of {}: {err}", e.dst))?;
            Ok(PodRoute { pod_cidr, via })
        })
        .collect()
}

pub async fn replace_route(route: PodRoute) -> Result<(), PodNetError> {
    let (cidr, via, proto) = (
        route.pod_cidr.to_string(),
        route.via.to_string(),
        ROUTE_PROTOCOL.to_string(),
    );
    ip(&args(&[
        "-4", "route", "replace", &cidr, "via", &via, "proto", &proto,
    ]))
    .await?;
    Ok(())
}

/// Removes the agent's route to `pod_cidr`; one already gone is success.
pub async fn remove_route(pod_cidr: Ipv4Net) -> Result<(), PodNetError> {
    let (cidr, proto) = (pod_cidr.to_string(), ROUTE_PROTOCOL.to_string());
    match ip(&args(&["-4", "route", "del", &cidr, "proto", &proto])).await {
        Err(PodNetError::Failed { stderr, .. }) if stderr.contains(IP_NO_ROUTE) => Ok(()),
        other => other.map(drop),
    }
}

/// Makes this namespace's agent routes exactly `desired`; what changed.
pub async fn reconcile(desired: &[PodRoute]) -> Result<RouteChanges, PodNetError> {
    let changes = route_changes(&installed_routes().await?, desired);
    for route in &changes.replace {
        replace_route(*route).await?;
    }
    for cidr in &changes.remove {
        remove_route(*cidr).await?;
    }
    Ok(changes)
}

/// The NAT rule for pod traffic leaving the cluster: from this node's pod
/// range to anywhere outside the cluster's pod CIDR, translated to the
/// node's address (what `ipMasq` would do, minus other nodes' pods).
pub fn masquerade_rule(node_cidr: Ipv4Net, cluster_cidr: Ipv4Net) -> Vec<String> {
    args(&[
        "POSTROUTING",
        "-s",
        &node_cidr.to_string(),
        "!",
        "-d",
        &cluster_cidr.to_string(),
        "-m",
        "comment",
        "--comment",
        "cluster-agent: pod egress",
        "-j",
        "MASQUERADE",
    ])
}

async fn iptables_nat(op: &str, rule: &[String]) -> Result<bool, PodNetError> {
    let mut argv = args(&["-w", "5", "-t", "nat", op]);
    argv.extend_from_slice(rule);
    match run("iptables", &argv).await {
        Ok(_) => Ok(true),
        Err(PodNetError::Failed {
            code: Some(IPTABLES_NO_RULE),
            ..
        }) if op != "-A" => Ok(false),
        Err(e) => Err(e),
    }
}

/// Adds [`masquerade_rule`] unless it is there; whether it was added.
pub async fn ensure_masquerade(
    node_cidr: Ipv4Net,
    cluster_cidr: Ipv4Net,
) -> Result<bool, PodNetError> {
    let rule = masquerade_rule(node_cidr, cluster_cidr);
    if iptables_nat("-C", &rule).await? {
        return Ok(false);
    }
    iptables_nat("-A", &rule).await
}

/// Removes [`masquerade_rule`]; one already gone is success.
pub async fn remove_masquerade(
    node_cidr: Ipv4Net,
    cluster_cidr: Ipv4Net,
) -> Result<(), PodNetError> {
    let rule = masquerade_rule(node_cidr, cluster_cidr);
    while iptables_nat("-D", &rule).await? {}
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, cidr: Option<&str>, ip: &str) -> Node {
        let mut spec = serde_json::json!({});
        if let Some(c) = cidr {
            spec["podCIDR"] = c.into();
        }
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": spec,
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]}
        }))
        .unwrap()
    }

    fn route(cidr: &str, via: &str) -> PodRoute {
        PodRoute {
            pod_cidr: cidr.parse().unwrap(),
            via: via.parse().unwrap(),
        }
    }

    #[test]
    fn routes_lead_to_every_other_node_with_a_pod_cidr() {
        let nodes = [
            node("cp-1", Some("10.244.0.0/24"), "10.0.0.11"),
            node("w-1", Some("10.244.1.0/24"), "10.0.0.21"),
            node("w-2", None, "10.0.0.22"),
            node("lo-1", Some("10.244.3.0/24"), "127.0.0.5"),
        ];
        assert_eq!(
            desired_routes(&nodes, "w-1"),
            [route("10.244.0.0/24", "10.0.0.11")]
        );
        assert_eq!(
            desired_routes(&nodes, "w-2"),
            [
                route("10.244.0.0/24", "10.0.0.11"),
                route("10.244.1.0/24", "10.0.0.21")
            ]
        );
    }

    #[test]
    fn changes_replace_moved_routes_and_drop_gone_nodes() {
        let installed = [
            route("10.244.1.0/24", "10.0.0.21"),
            route("10.244.2.0/24", "10.0.0.9"),
            route("10.244.5.0/24", "10.0.0.25"),
        ];
        let desired = [
            route("10.244.1.0/24", "10.0.0.21"),
            route("10.244.2.0/24", "10.0.0.22"),
            route("10.244.3.0/24", "10.0.0.23"),
        ];
        let changes = route_changes(&installed, &desired);
        assert_eq!(
            changes.replace,
            [
                route("10.244.2.0/24", "10.0.0.22"),
                route("10.244.3.0/24", "10.0.0.23")
            ]
        );
        assert_eq!(
            changes.remove,
            ["10.244.5.0/24".parse::<Ipv4Net>().unwrap()]
        );
        assert!(route_changes(&desired, &desired).is_empty());
    }

    #[test]
    fn ip_json_routes_parse() {
        let text = r#"[{"dst":"10.244.1.0/24","gateway":"10.9.0.2","dev":"d0","flags":[]}]"#;
        assert_eq!(
            parse_routes(text).unwrap(),
            [route("10.244.1.0/24", "10.9.0.2")]
        );
        assert_eq!(parse_routes("").unwrap(), []);
        assert_eq!(parse_routes("[]\n").unwrap(), []);
        assert!(parse_routes("[{\"dst\":\"default\"}]").is_err());
        assert!(parse_routes("garbage").is_err());
    }

    #[test]
    fn the_conflist_hands_out_the_nodes_range() {
        let cidr: Ipv4Net = "10.244.7.0/24".parse().unwrap();
        let text = render_conflist(cidr, Path::new("/tmp/n1/var/lib/cni"));
        assert_eq!(conflist_subnet(&text), Some(cidr));
        let conf: serde_json::Value = serde_json::from_str(&text).unwrap();
        let bridge = &conf["plugins"][0];
        assert_eq!(bridge["type"], "bridge");
        assert_eq!(bridge["isGateway"], true);
        assert_eq!(bridge["ipam"]["ranges"][0][0]["gateway"], "10.244.7.1");
        assert_eq!(bridge["ipam"]["dataDir"], "/tmp/n1/var/lib/cni/networks");
        assert_eq!(conflist_subnet("{}"), None);
    }

    #[test]
    fn missing_plugins_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let dirs = [dir.path().join("opt"), dir.path().join("usr")];
        assert_eq!(missing_plugins(&dirs), PLUGINS);
        std::fs::create_dir_all(&dirs[1]).unwrap();
        for p in ["bridge", "host-local", "loopback"] {
            std::fs::write(dirs[1].join(p), "").unwrap();
        }
        assert_eq!(missing_plugins(&dirs), ["portmap"]);
    }
}
