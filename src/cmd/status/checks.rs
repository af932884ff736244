//! The live checks behind `status`: one async function per external system,
//! each returning a [`Section`]. [`CHECKS`] lists them; `status` runs them
//! all concurrently and cuts every one at the same deadline, so a new system
//! (Ceph's own phase, Kubernetes once it exists) is one function and one
//! line in that list, and can never make `status` hang.

use std::time::Duration;

use futures_util::future::BoxFuture;
use serde::Serialize;
use serde_json::json;
use tokio::time::Instant;

use crate::cli::ServicesArg;
use crate::config::{ClusterConfig, NodeRole, NodeSpec};
use crate::etcd::survey::{self, Survey};
use crate::etcd::{Member, member_id_hex, topology};
use crate::paths::HostPaths;
use crate::role::ordered_nodes;
use crate::services::{self, ActiveState};

/// `<root>/etc/kubernetes/admin.conf`, once the control-plane phase writes it.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Health {
    Ok,
    /// Works, but something needs attention (a peer down, a learner).
    Warning,
    Failed,
    /// Not part of this node (yet): no unit installed, no kubeconfig…
    NotConfigured,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Ok => "ok",
            Health::Warning => "warning",
            Health::Failed => "failed",
            Health::NotConfigured => "not configured",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Section {
    pub name: &'static str,
    pub health: Health,
    pub summary: String,
    /// Detail for people, one line each.
    #[serde(skip)]
    pub lines: Vec<String>,
    /// Detail for programs.
    #[serde(skip_serializing_if = "serde_json::Value::is_null")]
    pub data: serde_json::Value,
}

impl Section {
    fn new(name: &'static str, health: Health, summary: impl Into<String>) -> Section {
        Section {
            name,
            health,
            summary: summary.into(),
            lines: Vec::new(),
            data: serde_json::Value::Null,
        }
    }

    /// What a check that did not finish by the deadline reports.
    pub fn timed_out(name: &'static str, budget: Duration) -> Section {
        Section::new(
            name,
            Health::Failed,
            format!("no answer within {:.1} s", budget.as_secs_f64()),
        )
    }
}

/// What the checks may look at. `config`/`node` are absent when the
/// configuration cannot be loaded or this node cannot be identified.
pub struct Probe {
    pub paths: HostPaths,
    pub config: Option<ClusterConfig>,
    pub node: Option<NodeSpec>,
    pub services: ServicesArg,
    pub deadline: Instant,
}

type Check = for<'a> fn(&'a Probe) -> BoxFuture<'a, Section>;

/// Every live check, in display order.
pub const CHECKS: &[(&str, Check)] = &[
    ("services", |p| Box::pin(services_check(p))),
    ("etcd", |p| Box::pin(etcd_check(p))),
    ("container-runtime", |p| {
        Box::pin(container_runtime_check(p))
    }),
    ("api-balancer", |p| Box::pin(api_balancer_check(p))),
    ("api-address", |p| Box::pin(api_address_check(p))),
    ("kubernetes", |p| Box::pin(kubernetes_check(p))),
    ("ceph", |p| Box::pin(ceph_check(p))),
];

/// Runs every check concurrently; each is cut at `probe.deadline`.
pub async fn run_all(probe: &Probe, budget: Duration) -> Vec<Section> {
    let runs = CHECKS.iter().map(|(name, check)| async move {
        tokio::time::timeout_at(probe.deadline, check(probe))
            .await
            .unwrap_or_else(|_| Section::timed_out(name, budget))
    });
    futures_util::future::join_all(runs).await
}

/// The state of every unit the agent installed, through the same backend
/// `run` would use.
async fn services_check(probe: &Probe) -> Section {
    const NAME: &str = "services";
    let units = match services::agent_units(&probe.paths) {
        Ok(u) => u,
        Err(e) => return Section::new(NAME, Health::Failed, crate::error_chain(&e)),
    };
    if units.is_empty() {
        return Section::new(
            NAME,
            Health::NotConfigured,
            "the agent installed no unit yet",
        );
    }
    let backend = crate::cmd::services_backend(probe.services, &probe.paths);
    let manager = match services::connect(backend, &probe.paths).await {
        Ok(m) => m,
        Err(e) => return Section::new(NAME, Health::Failed, crate::error_chain(&e)),
    };
    let mut section = Section::new(NAME, Health::Ok, "");
    let mut rows = Vec::new();
    let mut active = 0;
    for unit in &units {
        let enabled = services::unit_enabled(&probe.paths, unit);
        let (state, line) = match manager.state(&unit.name).await {
            Ok(s) => {
                let label = format!("{:?}", s.active_state).to_lowercase();
                if s.active_state == ActiveState::Active {
                    active += 1;
                }
                let pid = s.main_pid.map(|p| format!(" pid {p}")).unwrap_or_default();
                (
                    json!({"unit": unit.name, "active_state": label, "sub_state": s.sub_state,
                           "main_pid": s.main_pid, "enabled": enabled}),
                    format!("{:<20} {label}/{}{pid}", unit.name, s.sub_state),
                )
            }
            Err(e) => {
                let error = crate::error_chain(&e);
                (
                    json!({"unit": unit.name, "error": error, "enabled": enabled}),
                    format!("{:<20} unknown: {error}", unit.name),
                )
            }
        };
        rows.push(state);
        let enabled = if enabled { "enabled" } else { "not enabled" };
        section.lines.push(format!("{line}, {enabled}"));
    }
    if active < units.len() {
        section.health = Health::Failed;
    }
    section.summary = format!(
        "{active} of {} units active ({} backend)",
        units.len(),
        backend.as_str()
    );
    section.data = json!({ "backend": backend.as_str(), "units": rows });
    section
}

/// The node-local API balancer's own view: which API servers it sends
/// to, which not and why.
async fn api_balancer_check(probe: &Probe) -> Section {
    const NAME: &str = "api-balancer";
    use crate::balancer::{Health as Backend, View};
    if !services::unit_path(&probe.paths, crate::phases::api_balancer::UNIT).exists() {
        return Section::new(
            NAME,
            Health::NotConfigured,
            "not installed on this node yet",
        );
    }
    let path = probe.paths.host(crate::balancer::VIEW_FILE);
    let view: View = match std::fs::read(&path) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(v) => v,
            Err(e) => {
                return Section::new(NAME, Health::Failed, format!("{}: {e}", path.display()));
            }
        },
        Err(e) => {
            return Section::new(
                NAME,
                Health::Failed,
                format!(
                    "{}: {e} (is {} running?)",
                    path.display(),
                    crate::phases::api_balancer::UNIT
                ),
            );
        }
    };
    let ready = view
        .backends
        .iter()
        .filter(|b| b.health == Backend::Ready)
        .count();
    let health = match ready {
        0 => Health::Failed,
        n if n < view.backends.len() => Health::Warning,
        _ => Health::Ok,
    };
    let mut section = Section::new(
        NAME,
        health,
        format!(
            "{} sends to {ready} of {} API servers",
            view.listen,
            view.backends.len()
        ),
    );
    for b in &view.backends {
        let verdict = match &b.health {
            Backend::Ready => "in".to_string(),
            Backend::Unknown => "not checked yet".to_string(),
            Backend::NotReady(why) => format!("out, not ready: {why}"),
            Backend::Unreachable(why) => format!("out, unreachable: {why}"),
        };
        section.lines.push(format!(
            "{:<21} {verdict} (since {}, {} connections)",
            b.address, b.since, b.connections
        ));
    }
    section.data = serde_json::to_value(&view).unwrap_or_default();
    section
}

/// The floating endpoint as this master's keeper sees it: who holds the
/// address, whether this node does, and the last failed attempt.
async fn api_address_check(probe: &Probe) -> Section {
    const NAME: &str = "api-address";
    use crate::floating::View;
    let Some(config) = &probe.config else {
        return Section::new(NAME, Health::NotConfigured, "no usable configuration");
    };
    if config.cluster.floating_endpoint.is_none() {
        return Section::new(
            NAME,
            Health::NotConfigured,
            "control_plane_endpoint is not floating",
        );
    }
    if !services::unit_path(&probe.paths, crate::phases::api_address::UNIT).exists() {
        return Section::new(
            NAME,
            Health::NotConfigured,
            format!(
                "{} is not installed on this node (masters only)",
                crate::phases::api_address::UNIT
            ),
        );
    }
    let path = probe.paths.host(crate::floating::VIEW_FILE);
    let view: View = match std::fs::read(&path)
        .map_err(|e| format!("{e} (is {} running?)", crate::phases::api_address::UNIT))
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(v) => v,
        Err(e) => return Section::new(NAME, Health::Failed, format!("{}: {e}", path.display())),
    };
    let address = view.address;
    let (health, summary) = match (&view.holder, view.holding) {
        (_, true) => (
            Health::Ok,
            format!(
                "this node holds {address} on {} since {}",
                view.interface, view.since
            ),
        ),
        (Some(holder), false) => (
            Health::Ok,
            format!("{holder} holds {address} (since {})", view.since),
        ),
        (None, false) => (
            Health::Warning,
            format!(
                "nobody holds {address} as this node sees it (since {})",
                view.since
            ),
        ),
    };
    let mut section = Section::new(NAME, health, summary);
    if let Some(e) = &view.error {
        section.health = Health::Warning;
        section.lines.push(format!("last attempt failed: {e}"));
    }
    section.data = serde_json::to_value(&view).unwrap_or_default();
    section
}

/// Membership and health of the whole etcd cluster as this node sees it,
/// with the client certificate the etcd phase uses.
async fn etcd_check(probe: &Probe) -> Section {
    const NAME: &str = "etcd";
    let (Some(config), Some(node)) = (&probe.config, &probe.node) else {
        return Section::new(NAME, Health::NotConfigured, "no usable configuration");
    };
    if !node.has_role(NodeRole::ControlPlane) {
        return Section::new(NAME, Health::NotConfigured, "not a control-plane node");
    }
    if !services::unit_path(&probe.paths, topology::UNIT_NAME).exists() {
        return Section::new(
            NAME,
            Health::NotConfigured,
            format!("{} is not installed on this node yet", topology::UNIT_NAME),
        );
    }
    let endpoints = ordered_nodes(config, NodeRole::ControlPlane)
        .into_iter()
        .map(|n| (n.name.clone(), topology::client_url(config, n)))
        .collect();
    let tls = topology::agent_tls(&probe.paths);
    let found = survey::survey(endpoints, &tls, probe.deadline).await;
    judge_etcd(&found, &node.name)
}

fn judge_etcd(found: &Survey, me: &str) -> Section {
    const NAME: &str = "etcd";
    let mine = found.endpoints.iter().find(|e| e.node == me);
    let healthy = found.healthy_ids();
    let mut section = Section::new(NAME, Health::Ok, "");
    // A member's endpoint: the one that answered with its id, else the
    // configured node of the same name (a down endpoint has no id).
    let endpoint_of = |m: &Member| {
        found
            .endpoints
            .iter()
            .find(|e| e.status.as_ref().is_some_and(|s| s.member_id == m.id))
            .or_else(|| found.endpoints.iter().find(|e| e.node == m.name))
    };
    let leader = found
        .endpoints
        .iter()
        .filter_map(|e| e.status.as_ref())
        .map(|s| s.leader)
        .find(|l| *l != 0);
    let members = found.members.clone().unwrap_or_default();
    let voters = members.iter().filter(|m| !m.is_learner).count();
    let healthy_voters = members
        .iter()
        .filter(|m| !m.is_learner && healthy.contains(&m.id))
        .count();
    for m in &members {
        let name = if m.name.is_empty() {
            "(not started)"
        } else {
            &m.name
        };
        let kind = if m.is_learner { "learner" } else { "voter" };
        let state = if healthy.contains(&m.id) {
            "healthy".to_string()
        } else {
            match endpoint_of(m) {
                Some(e) => format!(
                    "unhealthy: {}",
                    brief(e.error.as_deref().unwrap_or("no linearizable read"))
                ),
                None => "unknown (not a configured control-plane node)".into(),
            }
        };
        let lead = if Some(m.id) == leader { ", leader" } else { "" };
        section.lines.push(format!(
            "{name:<12} {:<16} {kind}{lead}  {state}",
            member_id_hex(m.id)
        ));
    }
    for e in found.endpoints.iter().filter(|e| {
        !members
            .iter()
            .any(|m| endpoint_of(m).is_some_and(|x| x.node == e.node))
    }) {
        let why = brief(e.error.as_deref().unwrap_or("not a member"));
        section
            .lines
            .push(format!("{:<12} {} — {why}", e.node, e.url));
    }
    let leader_name = members
        .iter()
        .find(|m| Some(m.id) == leader)
        .map_or("none", |m| m.name.as_str());
    section.summary = format!(
        "{voters} voting member(s), {healthy_voters} healthy, {} learner(s); leader {leader_name}",
        members.len() - voters
    );
    let local_ok = mine.is_some_and(|e| e.healthy);
    section.health = if !local_ok {
        let why = mine
            .and_then(|e| e.error.clone())
            .unwrap_or_else(|| "no answer".into());
        section.summary = format!(
            "this node's member is not healthy ({why}); {}",
            section.summary
        );
        Health::Failed
    } else if members.is_empty() || healthy_voters < survey::quorum(voters) {
        section.summary = format!("no quorum: {}", section.summary);
        Health::Failed
    } else if healthy_voters < voters || voters < members.len() {
        Health::Warning
    } else {
        Health::Ok
    };
    section.data = json!({
        "local_member": mine.and_then(|e| e.status.as_ref()).map(|s| member_id_hex(s.member_id)),
        "leader": leader.map(member_id_hex),
        "voters": voters,
        "healthy_voters": healthy_voters,
        "quorum": survey::quorum(voters),
        "members": members.iter().map(|m| json!({
            "id": member_id_hex(m.id),
            "name": m.name,
            "is_learner": m.is_learner,
            "healthy": healthy.contains(&m.id),
            "peer_urls": m.peer_urls,
            "client_urls": m.client_urls,
        })).collect::<Vec<_>>(),
        "endpoints": found.endpoints,
    });
    section
}

/// The gist of a transport error for the human view (gRPC wraps the root
/// cause in several layers of debug output); JSON keeps the whole chain.
fn brief(error: &str) -> &str {
    const GISTS: [(&str, &str); 5] = [
        (
            "Connection refused",
            "connection refused (etcd is not running there)",
        ),
        ("No route to host", "no route to host"),
        ("Network is unreachable", "network unreachable"),
        ("deadline", "timed out"),
        ("timed out", "timed out"),
    ];
    GISTS
        .iter()
        .find(|(needle, _)| error.contains(needle))
        .map_or(error, |(_, gist)| gist)
}

/// The CRI's own answer (`RuntimeService/Version`, what a kubelet asks
/// first), where the container-runtime phase installed containerd's unit.
async fn container_runtime_check(probe: &Probe) -> Section {
    const NAME: &str = "container-runtime";
    let unit = crate::phases::container_runtime::UNIT;
    if !services::unit_path(&probe.paths, unit).exists() {
        return Section::new(
            NAME,
            Health::NotConfigured,
            format!("{unit} is not installed on this node"),
        );
    }
    let socket = crate::containerd::cri_socket(&probe.paths);
    let budget = probe
        .deadline
        .saturating_duration_since(Instant::now())
        .min(Duration::from_secs(2));
    match crate::containerd::cri::version(&socket, budget).await {
        Ok(v) => {
            let mut section = Section::new(
                NAME,
                Health::Ok,
                format!(
                    "{} {} serves CRI {}",
                    v.runtime_name, v.runtime_version, v.runtime_api_version
                ),
            );
            section.lines = vec![crate::containerd::cri_endpoint(&probe.paths)];
            section.data = json!({
                "endpoint": crate::containerd::cri_endpoint(&probe.paths),
                "runtime_name": v.runtime_name,
                "runtime_version": v.runtime_version,
                "runtime_api_version": v.runtime_api_version,
            });
            section
        }
        Err(e) => Section::new(NAME, Health::Failed, crate::error_chain(&e)),
    }
}

/// Nodes as the API server sees them, with the Ready condition's reason
/// for those that are not: through the admin kubeconfig on a master, else
/// with the kubelet's identity (which may list Nodes, for the route
/// keeper).
async fn kubernetes_check(probe: &Probe) -> Section {
    use crate::k8s::node::Readiness;
    const NAME: &str = "kubernetes";
    let admin = probe.paths.host(crate::phases::control_plane::ADMIN_CONF);
    let kubelet = probe.paths.host(crate::phases::kubelet::KUBECONFIG);
    let Some(path) = [admin, kubelet].into_iter().find(|p| p.exists()) else {
        return Section::new(
            NAME,
            Health::NotConfigured,
            "no admin or kubelet kubeconfig on this node",
        );
    };
    let me = probe.node.as_ref().map(|n| n.name.as_str());
    match kube_nodes(&path).await {
        Ok(nodes) => {
            let ready = nodes.iter().filter(|(_, r)| *r == Readiness::Ready).count();
            let mine = nodes.iter().find(|(n, _)| Some(n.as_str()) == me);
            let health = match mine {
                Some((_, Readiness::NotReady(_))) => Health::Failed,
                _ if ready == nodes.len() => Health::Ok,
                _ => Health::Warning,
            };
            let mut summary = format!("{ready} of {} nodes Ready", nodes.len());
            if let (Some(me), None) = (me, mine)
                && path.ends_with("kubelet.conf")
            {
                summary.push_str(&format!("; no Node {me}"));
            }
            let mut section = Section::new(NAME, health, summary);
            section.lines = nodes
                .iter()
                .map(|(n, r)| match r {
                    Readiness::Ready => format!("{n:<12} Ready"),
                    Readiness::NotReady(why) => format!("{n:<12} NotReady: {why}"),
                })
                .collect();
            section.data = json!({"nodes": nodes.iter().map(|(n, r)| json!({
                "name": n,
                "ready": *r == Readiness::Ready,
                "reason": match r { Readiness::NotReady(why) => Some(why), Readiness::Ready => None },
            })).collect::<Vec<_>>()});
            section
        }
        Err(e) => Section::new(NAME, Health::Failed, format!("{}: {e}", path.display())),
    }
}

async fn kube_nodes(
    kubeconfig: &std::path::Path,
) -> Result<Vec<(String, crate::k8s::node::Readiness)>, String> {
    use k8s_openapi::api::core::v1::Node;
    let client = crate::k8s::client_with_timeouts(
        kubeconfig,
        Duration::from_secs(1),
        Duration::from_secs(2),
    )
    .await
    .map_err(|e| e.to_string())?;
    let list = kube::Api::<Node>::all(client)
        .list(&Default::default())
        .await
        .map_err(|e| e.to_string())?;
    Ok(list
        .items
        .iter()
        .map(|n| {
            (
                n.metadata.name.clone().unwrap_or_default(),
                crate::k8s::node::readiness(n),
            )
        })
        .collect())
}

fn at_least_warning(health: Health) -> Health {
    if health == Health::Ok {
        Health::Warning
    } else {
        health
    }
}

/// Monitor quorum and the mgr map, where a Ceph configuration exists under
/// the root.
async fn ceph_check(probe: &Probe) -> Section {
    const NAME: &str = "ceph";
    let conf = probe.paths.host(crate::ceph::CONF_FILE);
    if !conf.exists() {
        return Section::new(
            NAME,
            Health::NotConfigured,
            format!("no {}", crate::ceph::CONF_FILE),
        );
    }
    let keyring = probe.paths.host(crate::ceph::ADMIN_KEYRING);
    let budget = Duration::from_secs(2);
    let (quorum, managers, services) = tokio::join!(
        crate::ceph::quorum_status(&conf, &keyring, budget),
        crate::ceph::mgr_map(&conf, &keyring, budget),
        crate::ceph::mgr_services(&conf, &keyring, budget)
    );
    let (in_quorum, mons) = match quorum {
        Ok(q) => q,
        Err(e) => return Section::new(NAME, Health::Failed, e.to_string()),
    };
    let mut health = if in_quorum.len() < survey::quorum(mons.len()) {
        Health::Failed
    } else if in_quorum.len() < mons.len() {
        Health::Warning
    } else {
        Health::Ok
    };
    let mut summary = format!("{} of {} monitors in quorum", in_quorum.len(), mons.len());
    let mut lines: Vec<String> = mons
        .iter()
        .map(|m| {
            let state = if in_quorum.contains(m) {
                "in quorum"
            } else {
                "out of quorum"
            };
            format!("{m:<12} {state}")
        })
        .collect();
    let mgr = match managers {
        Ok(map) => {
            match map.active() {
                Some(active) => summary.push_str(&format!(", manager {active} active")),
                None => {
                    // No PG statistics, no orchestrator, no dashboard.
                    health = at_least_warning(health);
                    summary.push_str(", no active manager");
                }
            }
            lines.push(format!(
                "managers     active {}, standby {}",
                map.active().unwrap_or("none"),
                if map.standbys.is_empty() {
                    "none".to_string()
                } else {
                    map.standbys.join(", ")
                }
            ));
            json!({"active": map.active(), "standbys": map.standbys})
        }
        Err(e) => {
            health = at_least_warning(health);
            lines.push(format!("managers     cannot be read: {e}"));
            json!({"error": e.to_string()})
        }
    };
    let dashboard = services.ok().and_then(|s| s.get("dashboard").cloned());
    if let Some(url) = &dashboard {
        lines.push(format!("dashboard    {url}"));
    }
    let mut section = Section::new(NAME, health, summary);
    section.lines = lines;
    section.data = json!({
        "quorum_names": in_quorum,
        "monitors": mons,
        "managers": mgr,
        "dashboard": dashboard,
    });
    section
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::etcd::EndpointStatus;
    use crate::etcd::survey::EndpointReport;

    fn endpoint(node: &str, id: u64, healthy: bool) -> EndpointReport {
        EndpointReport {
            node: node.into(),
            url: format!("https://{node}:2379"),
            status: healthy.then(|| EndpointStatus {
                member_id: id,
                leader: 1,
                is_learner: false,
                version: "3.4.23".into(),
                db_size: 0,
                raft_term: 2,
                raft_index: 9,
            }),
            healthy,
            error: (!healthy).then(|| "connection refused".into()),
        }
    }

    fn member(name: &str, id: u64) -> Member {
        Member {
            id,
            name: name.into(),
            peer_urls: vec![],
            client_urls: vec![],
            is_learner: false,
        }
    }

    #[test]
    fn etcd_health_is_judged_from_this_node_and_the_quorum() {
        let members = Some(vec![member("a", 1), member("b", 2), member("c", 3)]);
        let all = Survey {
            endpoints: vec![
                endpoint("a", 1, true),
                endpoint("b", 2, true),
                endpoint("c", 3, true),
            ],
            members: members.clone(),
        };
        let s = judge_etcd(&all, "a");
        assert_eq!(s.health, Health::Ok, "{}", s.summary);
        assert_eq!(s.data["healthy_voters"], 3);
        assert_eq!(s.data["leader"], "1");

        let one_down = Survey {
            endpoints: vec![
                endpoint("a", 1, true),
                endpoint("b", 2, true),
                endpoint("c", 3, false),
            ],
            members: members.clone(),
        };
        assert_eq!(judge_etcd(&one_down, "a").health, Health::Warning);
        assert_eq!(judge_etcd(&one_down, "c").health, Health::Failed);

        let nothing = Survey {
            endpoints: vec![endpoint("a", 1, false), endpoint("b", 2, false)],
            members: None,
        };
        let s = judge_etcd(&nothing, "a");
        assert_eq!(s.health, Health::Failed);
        assert!(s.summary.contains("connection refused"), "{}", s.summary);
    }
}
