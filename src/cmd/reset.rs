//! `cluster-agent reset`: undo this node's bootstrap so the next `run`
//! starts clean and the node rejoins. It is planned first, as a list of
//! [`Action`]s built from what is on this node (the units the agent
//! installed, the files it wrote) and what etcd says, then either printed
//! (`--dry-run`) or executed in order. Every action tolerates having been
//! done already, so an interrupted reset is finished by running it again.

use std::fmt;
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cli::{GlobalArgs, ResetArgs};
use crate::config::NodeRole;
use crate::etcd::survey::{self, Survey};
use crate::etcd::{EtcdClient, EtcdError, member_id_hex, topology};
use crate::paths::HostPaths;
use crate::phases::{kube_proxy, kubelet};
use crate::services::{self, ServiceManager, Unit};
use crate::state::{LOCK_FILE, StateStore};
use crate::wait::{self, Backoff, Poll};

use super::{CliError, EXIT_OK};

/// How long the peers get to answer before reset decides about leaving etcd.
const SURVEY_BUDGET: Duration = Duration::from_secs(5);
/// How long a refused-as-transient member removal is retried.
const REMOVE_WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Remove this node's etcd member through a voting peer.
    LeaveEtcd {
        member: u64,
        name: String,
        via: String,
    },
    /// Remove this node's monitor from the Ceph monmap through the quorum.
    LeaveCephMon {
        id: String,
    },
    /// Delete this node's manager from the Ceph cluster through the quorum:
    /// its key in the auth database and its dashboard settings.
    ForgetCephManager {
        id: String,
    },
    StopUnit(String),
    /// Stop and remove every pod sandbox through the CRI (the kubelet is
    /// stopped by then, so none comes back).
    StopPods,
    /// Delete this node's Node object with its kubelet's identity.
    DeleteNode {
        name: String,
    },
    /// `kube-proxy --cleanup`: the Service rules kube-proxy left behind.
    RemoveServiceRules {
        kube_proxy: PathBuf,
    },
    /// Remove the agent's pod routes and the pods' egress NAT rule.
    RemovePodNetwork {
        pod_cidr: Option<ipnet::Ipv4Net>,
    },
    /// Remove the floating endpoint's address, which a killed keeper left.
    RemoveFloatingAddress {
        address: std::net::Ipv4Addr,
    },
    /// Remove a `<target>.wants/` link (what enabling created).
    Disable(PathBuf),
    /// A file or a whole directory the agent created.
    Remove(PathBuf),
    /// Let the service manager forget the removed unit files.
    ReloadManager,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::LeaveEtcd { member, name, via } => write!(
                f,
                "remove etcd member {} ({name}) from the cluster through {via}",
                member_id_hex(*member)
            ),
            Action::ForgetCephManager { id } => write!(
                f,
                "delete Ceph manager {id}'s key (mgr.{id}) and dashboard settings through the quorum"
            ),
            Action::LeaveCephMon { id } => {
                write!(
                    f,
                    "remove Ceph monitor {id} from the monmap through the quorum"
                )
            }
            Action::StopUnit(u) => write!(f, "stop {u}"),
            Action::StopPods => f.write_str("stop and remove every pod through containerd's CRI"),
            Action::DeleteNode { name } => write!(f, "delete Node {name} from Kubernetes"),
            Action::RemoveServiceRules { .. } => f.write_str("remove kube-proxy's Service rules"),
            Action::RemovePodNetwork { pod_cidr } => match pod_cidr {
                Some(cidr) => write!(
                    f,
                    "remove the routes to other nodes' pods and the egress NAT rule of {cidr}"
                ),
                None => f.write_str("remove the routes to other nodes' pods"),
            },
            Action::RemoveFloatingAddress { address } => {
                write!(
                    f,
                    "remove the floating endpoint address {address} from this node"
                )
            }
            Action::Disable(link) => write!(f, "disable: remove {}", link.display()),
            Action::Remove(p) => write!(f, "remove {}", p.display()),
            Action::ReloadManager => f.write_str("reload the service manager"),
        }
    }
}

pub async fn reset(
    global: &GlobalArgs,
    paths: &HostPaths,
    args: &ResetArgs,
) -> Result<i32, CliError> {
    if args.dry_run {
        let actions = plan(global, paths, args.force).await?;
        if actions.is_empty() {
            println!("nothing to reset");
        }
        for action in actions {
            println!("would {action}");
        }
        return Ok(EXIT_OK);
    }
    if !args.yes && !std::io::stdin().is_terminal() {
        return Err(CliError::Usage(
            "reset needs --yes when not run interactively (or --dry-run to see what it does)"
                .into(),
        ));
    }
    // Held from planning to the end: a `run` never works under our feet.
    let store = StateStore::new(paths.state_dir());
    let _lock = store.lock()?;
    let actions = plan(global, paths, args.force).await?;
    if actions.is_empty() {
        println!("nothing to reset");
        return Ok(EXIT_OK);
    }
    if !args.yes && !confirm(&actions)? {
        return Err(CliError::Usage(
            "reset not confirmed; nothing was changed".into(),
        ));
    }
    let manager = if actions
        .iter()
        .any(|a| matches!(a, Action::StopUnit(_) | Action::ReloadManager))
    {
        Some(services::connect(super::services_backend(global.services, paths), paths).await?)
    } else {
        None
    };
    for action in &actions {
        execute(paths, action, manager.as_deref(), args.force).await?;
        println!("done: {action}");
    }
    println!("reset done; the next `cluster-agent run` starts from the beginning");
    Ok(EXIT_OK)
}

/// Everything reset will do, in order. Read-only.
pub async fn plan(
    global: &GlobalArgs,
    paths: &HostPaths,
    force: bool,
) -> Result<Vec<Action>, CliError> {
    let units = services::agent_units(paths)?;
    let has_kubelet = units.iter().any(|u| u.name == kubelet::UNIT);
    let mut actions = Vec::new();
    // The kubelet first, so that it neither restarts the pods stopped next
    // nor registers its Node again once that is deleted.
    if has_kubelet {
        actions.push(Action::StopUnit(kubelet::UNIT.into()));
    }
    actions.extend(leave_kubernetes(global, paths, force, has_kubelet).await?);
    // The control plane before its etcd member leaves: an API server whose
    // etcd is gone would hang in its shutdown until the stop timeout. The
    // floating endpoint's keeper before its API server: it releases its
    // Lease through it, so another master takes the address at once.
    let order = stop_order(&units);
    let keeper = crate::phases::api_address::UNIT;
    let control_plane: Vec<String> = order
        .iter()
        .filter(|u| *u == keeper)
        .chain(order.iter().filter(|u| {
            crate::phases::control_plane::COMPONENTS
                .iter()
                .any(|c| **u == format!("{c}.service"))
        }))
        .cloned()
        .collect();
    actions.extend(control_plane.iter().cloned().map(Action::StopUnit));
    actions.extend(leave_etcd(global, paths, force).await?);
    actions.extend(leave_ceph_monitor(global, paths, force, &units).await?);

    let stopped: Vec<String> = actions
        .iter()
        .filter_map(|a| match a {
            Action::StopUnit(u) => Some(u.clone()),
            _ => None,
        })
        .collect();
    actions.extend(
        order
            .into_iter()
            .filter(|u| !stopped.contains(u))
            .map(Action::StopUnit),
    );
    // kube-proxy is stopped by now: it would write them again.
    if units.iter().any(|u| u.name == kube_proxy::UNIT)
        && let Some(binary) = paths.find_binary(kube_proxy::KUBE_PROXY)
    {
        actions.push(Action::RemoveServiceRules { kube_proxy: binary });
    }
    // The keeper is stopped by now; one killed before left it.
    if let Ok(config) = super::load_config(paths)
        && let Some(address) = config.cluster.floating_endpoint
        && crate::hostnet::has_address(address).unwrap_or(false)
    {
        actions.push(Action::RemoveFloatingAddress { address });
    }
    // The route keeper is stopped by now: it would put them back.
    let conflist = paths.host(crate::podnet::CONFLIST_FILE);
    let pod_cidr = crate::phases::read_text(&conflist)
        .ok()
        .flatten()
        .and_then(|t| crate::podnet::conflist_subnet(&t));
    let has_routes = crate::podnet::installed_routes()
        .await
        .is_ok_and(|r| !r.is_empty());
    if pod_cidr.is_some() || has_routes {
        actions.push(Action::RemovePodNetwork { pod_cidr });
    }
    for unit in &units {
        actions.extend(
            services::enable_links(paths, unit)
                .into_iter()
                .map(Action::Disable),
        );
        actions.push(Action::Remove(services::unit_path(paths, &unit.name)));
        // An optional one is the operator's (Debian's /etc/default/ceph).
        if let Some(env) = &unit.service.environment_file
            && !env.optional
        {
            actions.push(Action::Remove(env.path.clone()));
        }
    }
    if !units.is_empty() {
        actions.push(Action::ReloadManager);
    }

    // What every phase declares it created (a phase that never ran here
    // has none of it), then the state dir's entries.
    let node = super::load_config(paths).ok().and_then(|config| {
        super::target(global, paths, &config)
            .ok()
            .map(|(node, _)| node.clone())
    });
    let mut created: Vec<PathBuf> = crate::phases::catalog()
        .iter()
        .flat_map(|phase| (phase.owns)(paths, node.as_ref()))
        .collect();
    created.extend(state_entries(paths)?);
    actions.extend(
        created
            .into_iter()
            .filter(|p| p.symlink_metadata().is_ok())
            .map(Action::Remove),
    );
    guard(paths, &actions)?;
    Ok(actions)
}

/// How long reset gives containerd to stop and remove the pods.
const STOP_PODS_WAIT: Duration = Duration::from_secs(120);

/// A Kubernetes node stops its pods and deletes its Node object, so the
/// cluster forgets it until it joins again. The Node is deleted with the
/// kubelet's own identity (RBAC lets `system:nodes` delete Nodes, and
/// NodeRestriction only its own), through the API server its kubeconfig
/// names: a worker's is the cluster endpoint, a master's its own API
/// server, still running at that point. When the API does not answer,
/// reset refuses without `--force`: the Node would stay behind, NotReady.
async fn leave_kubernetes(
    global: &GlobalArgs,
    paths: &HostPaths,
    force: bool,
    has_kubelet: bool,
) -> Result<Vec<Action>, CliError> {
    let mut actions = Vec::new();
    if has_kubelet && crate::containerd::cri_socket(paths).exists() {
        actions.push(Action::StopPods);
    }
    let kubeconfig = paths.host(kubelet::KUBECONFIG);
    if !kubeconfig.exists() {
        return Ok(actions);
    }
    let config = match super::load_config(paths) {
        Ok(c) => c,
        Err(_) => return Ok(actions),
    };
    let (node, _) = super::target(global, paths, &config)?;
    let asked = async {
        let client =
            crate::k8s::client_with_timeouts(&kubeconfig, SURVEY_BUDGET, SURVEY_BUDGET).await?;
        crate::k8s::node::get_optional(&client, &node.name).await
    };
    match tokio::time::timeout(SURVEY_BUDGET * 2, asked).await {
        Ok(Ok(Some(_))) => actions.push(Action::DeleteNode {
            name: node.name.clone(),
        }),
        Ok(Ok(None)) => {}
        Ok(Err(e)) => refuse_unless(
            force,
            format!(
                "this node is Node {} in Kubernetes, but the API cannot be asked to delete it \
                 ({})",
                node.name,
                crate::error_chain(&e)
            ),
        )?,
        Err(_) => refuse_unless(
            force,
            format!(
                "this node is Node {} in Kubernetes, but the API did not answer within {:?}",
                node.name,
                SURVEY_BUDGET * 2
            ),
        )?,
    }
    Ok(actions)
}

/// Refuses with `why`, or, with `--force`, warns and goes ahead.
fn refuse_unless(force: bool, why: String) -> Result<(), CliError> {
    if force {
        eprintln!("cluster-agent: warning: {why}; going ahead (--force)");
        Ok(())
    } else {
        Err(CliError::Failed(format!(
            "{why}. Nothing was changed. Fix that first, or reset with --force"
        )))
    }
}

/// The Ceph counterpart of [`leave_etcd`]: a node with a monitor store
/// leaves the monmap through the quorum before its unit is stopped, unless
/// that costs the quorum (or it is the last monitor) and `--force` is not
/// given. Its manager stops and its key is deleted first, while the
/// quorum still has this monitor.
async fn leave_ceph_monitor(
    global: &GlobalArgs,
    paths: &HostPaths,
    force: bool,
    units: &[Unit],
) -> Result<Vec<Action>, CliError> {
    let config = match super::load_config(paths) {
        Ok(c) => c,
        Err(_) => return Ok(Vec::new()),
    };
    let (node, _) = super::target(global, paths, &config)?;
    if !crate::ceph::mon_data_dir(paths, node).exists() {
        return Ok(Vec::new());
    }
    let id = crate::ceph::mon_id(node).to_string();
    let refuse = |why: String| refuse_unless(force, why).map(|()| Vec::new());
    let status = crate::ceph::quorum_status(
        &paths.host(crate::ceph::CONF_FILE),
        &paths.host(crate::ceph::ADMIN_KEYRING),
        SURVEY_BUDGET,
    )
    .await;
    let (in_quorum, mons) = match status {
        Ok(s) => s,
        Err(e) => {
            return refuse(format!(
                "this node has a Ceph monitor, but the quorum cannot be asked ({e})"
            ));
        }
    };
    // A crash (or an image without ceph-mgr) may have left the key but no
    // unit: a unit that was never installed is not stopped.
    let mut actions = Vec::new();
    let mgr_unit = crate::phases::ceph::mgr_unit_name(node);
    if units.iter().any(|u| u.name == mgr_unit) {
        actions.push(Action::StopUnit(mgr_unit));
    }
    if crate::ceph::mgr_keyring(paths, node).exists() {
        actions.push(Action::ForgetCephManager {
            id: crate::ceph::mgr_id(node).to_string(),
        });
    }
    if !mons.contains(&id) {
        return Ok(actions);
    }
    // Forced past a guard, the manager is still forgotten: only the
    // monitor stays in the monmap.
    let refuse_leaving = |why: String| refuse_unless(force, why).map(|()| actions.clone());
    let remaining = mons.len() - 1;
    if remaining == 0 {
        return refuse_leaving(format!(
            "monitor {id} is the cluster's last: removing it ends the Ceph cluster"
        ));
    }
    let others_in_quorum = in_quorum.iter().filter(|m| **m != id).count();
    if others_in_quorum < survey::quorum(remaining) {
        return refuse_leaving(format!(
            "without monitor {id}, {others_in_quorum} of the remaining {remaining} monitors are \
             in quorum, fewer than the {} a quorum needs",
            survey::quorum(remaining)
        ));
    }
    actions.push(Action::LeaveCephMon { id });
    Ok(actions)
}

/// On a control-plane node whose etcd has a member: remove it through a
/// healthy voting peer, unless that costs the quorum (or the last fault
/// tolerance) and `--force` is not given.
async fn leave_etcd(
    global: &GlobalArgs,
    paths: &HostPaths,
    force: bool,
) -> Result<Vec<Action>, CliError> {
    if !has_member(paths) {
        return Ok(Vec::new());
    }
    let refuse = |why: String| refuse_unless(force, why).map(|()| Vec::new());
    let config = match super::load_config(paths) {
        Ok(c) => c,
        Err(e) => {
            return refuse(format!(
                "this node runs etcd, but without its configuration ({}) reset cannot find the \
                 peers to leave the cluster through",
                crate::error_chain(&e)
            ));
        }
    };
    let (node, _) = super::target(global, paths, &config)?;
    if !node.has_role(NodeRole::ControlPlane) {
        return Ok(Vec::new());
    }
    let endpoints = crate::role::ordered_nodes(&config, NodeRole::ControlPlane)
        .into_iter()
        .map(|n| (n.name.clone(), topology::client_url(&config, n)))
        .collect();
    let deadline = tokio::time::Instant::now() + SURVEY_BUDGET;
    let found = survey::survey(endpoints, &topology::agent_tls(paths), deadline).await;
    let peer_url = topology::peer_url(&config, node);
    match decide_leave(&found, &node.name, &peer_url) {
        Err(why) => refuse(why),
        Ok((actions, Some(risk))) => refuse(risk).map(|_| actions),
        Ok((actions, None)) => Ok(actions),
    }
}

/// Whether this node may be an etcd member: its data dir holds a WAL, or
/// its record names a member id (a learner added just before a crash is
/// known only there). A record that does not parse counts as a member.
fn has_member(paths: &HostPaths) -> bool {
    let record = paths.state_file(crate::phases::etcd::RECORD_FILE);
    topology::has_local_member(paths)
        || match crate::fsutil::read_optional(&record) {
            Ok(Some(bytes)) => serde_json::from_slice::<topology::EtcdRecord>(&bytes)
                .map_or(true, |r| r.member_id.is_some()),
            Ok(None) => false,
            Err(_) => true,
        }
}

/// The etcd part of the plan, from what the cluster answered, and the risk
/// it carries (which only `--force` accepts). An error: nothing can be done
/// through etcd at all.
fn decide_leave(
    found: &Survey,
    name: &str,
    peer_url: &str,
) -> Result<(Vec<Action>, Option<String>), String> {
    let Some(members) = &found.members else {
        let errors: Vec<String> = found
            .endpoints
            .iter()
            .map(|e| format!("{}: {}", e.node, e.error.as_deref().unwrap_or("unhealthy")))
            .collect();
        return Err(format!(
            "no healthy etcd voter answered ({}), so this node's member cannot be removed; \
             after a forced reset it stays in the cluster until this node rejoins (the agent \
             then removes it) or `etcdctl member remove` removes it",
            errors.join("; ")
        ));
    };
    let Some(mine) = members
        .iter()
        .find(|m| m.peer_urls.iter().any(|u| u == peer_url))
    else {
        // Not (or no longer) a member: nothing to leave.
        return Ok((Vec::new(), None));
    };
    let risk = survey::removal_risk(members, &found.healthy_ids(), mine.id);
    let actions = match found.healthy_voter_url(Some(mine.id)) {
        Some(via) => vec![Action::LeaveEtcd {
            member: mine.id,
            name: name.to_string(),
            via,
        }],
        // The only voter: there is no cluster left to leave.
        None => Vec::new(),
    };
    Ok((actions, risk))
}

/// Units nothing else installed depends on are stopped first, so etcd goes
/// after whatever (kube-apiserver) needs it.
pub(super) fn stop_order(units: &[Unit]) -> Vec<String> {
    let mut left: Vec<&Unit> = units.iter().collect();
    let mut order = Vec::new();
    while !left.is_empty() {
        let needed = |u: &Unit| {
            left.iter().any(|o| {
                o.name != u.name
                    && o.after
                        .iter()
                        .chain(&o.requires)
                        .chain(&o.wants)
                        .any(|d| d == &u.name)
            })
        };
        // A dependency cycle would stall: then stop the rest as they are.
        let next = left.iter().position(|u| !needed(u)).unwrap_or(0);
        order.push(left.remove(next).name.clone());
    }
    order
}

/// Everything in the state dir except the lock file, which reset holds.
fn state_entries(paths: &HostPaths) -> Result<Vec<PathBuf>, CliError> {
    let dir = paths.state_dir();
    let entries = match std::fs::read_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        other => {
            other.map_err(|e| CliError::Failed(format!("cannot list {}: {e}", dir.display())))?
        }
    };
    let mut found: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_name() != LOCK_FILE)
        .map(|e| e.path())
        .collect();
    found.sort();
    Ok(found)
}

/// Reset removes only what the agent created: never the configuration dir
/// (which holds the join secret), never anything outside `--root`.
fn guard(paths: &HostPaths, actions: &[Action]) -> Result<(), CliError> {
    for action in actions {
        if let Action::Remove(p) | Action::Disable(p) = action
            && (p.starts_with(paths.config_dir()) || !p.starts_with(paths.root()))
        {
            return Err(CliError::Failed(format!(
                "refusing to remove {}: it is not something the agent created under {}",
                p.display(),
                paths.root().display()
            )));
        }
    }
    Ok(())
}

/// Each removal succeeds when there is nothing to remove, so a reset
/// interrupted half-way is finished by running it again.
async fn forget_ceph_manager(paths: &HostPaths, id: &str) -> Result<(), crate::ceph::CephError> {
    let conf = paths.host(crate::ceph::CONF_FILE);
    let admin = paths.host(crate::ceph::ADMIN_KEYRING);
    let (options, keys) = crate::phases::ceph_dashboard::cluster_settings(id);
    for option in options {
        crate::ceph::config_rm(&conf, &admin, "mgr", &option).await?;
    }
    for key in keys {
        crate::ceph::config_key_rm(&conf, &admin, &key).await?;
    }
    crate::ceph::delete_key(&conf, &admin, &crate::ceph::mgr_entity_of(id)).await
}

/// With `--force`, an action that failed is a warning and reset goes on.
fn forgiven(force: bool, result: Result<(), CliError>) -> Result<(), CliError> {
    match result {
        Err(e) if force => {
            eprintln!("cluster-agent: warning: {e}; going ahead (--force)");
            Ok(())
        }
        other => other,
    }
}

async fn execute(
    paths: &HostPaths,
    action: &Action,
    manager: Option<&dyn ServiceManager>,
    force: bool,
) -> Result<(), CliError> {
    match action {
        Action::LeaveEtcd { member, via, .. } => {
            forgiven(force, remove_member(paths, *member, via).await)
        }
        Action::LeaveCephMon { id } => {
            let result = crate::ceph::remove_monitor(
                &paths.host(crate::ceph::CONF_FILE),
                &paths.host(crate::ceph::ADMIN_KEYRING),
                id,
            )
            .await
            .map_err(|e| CliError::Failed(format!("cannot leave the Ceph monmap: {e}")));
            forgiven(force, result)
        }
        Action::ForgetCephManager { id } => {
            let result = forget_ceph_manager(paths, id)
                .await
                .map_err(|e| CliError::Failed(format!("cannot delete Ceph manager {id}: {e}")));
            forgiven(force, result)
        }
        Action::StopUnit(unit) => {
            if let Some(m) = manager {
                m.stop(unit).await?;
            }
            Ok(())
        }
        Action::StopPods => {
            let socket = crate::containerd::cri_socket(paths);
            match crate::containerd::cri::remove_all_pods(&socket, STOP_PODS_WAIT).await {
                Ok(n) => {
                    tracing::info!("{n} pods stopped and removed");
                    Ok(())
                }
                // containerd is down: its pods went with it, or are kept
                // by shims that the next containerd start cleans up.
                Err(e @ crate::containerd::CriError::Connect { .. }) => {
                    eprintln!("cluster-agent: warning: {e}; no pods stopped");
                    Ok(())
                }
                Err(e) if force => {
                    eprintln!("cluster-agent: warning: {e}; going ahead (--force)");
                    Ok(())
                }
                Err(e) => Err(CliError::Failed(format!(
                    "cannot stop the pods: {e}; run reset again, or with --force"
                ))),
            }
        }
        Action::DeleteNode { name } => {
            let result = async {
                let client =
                    crate::k8s::client_from_kubeconfig(&paths.host(kubelet::KUBECONFIG)).await?;
                crate::k8s::node::delete(&client, name).await
            }
            .await
            .map_err(|e| {
                CliError::Failed(format!(
                    "cannot delete Node {name}: {}",
                    crate::error_chain(&e)
                ))
            });
            forgiven(force, result)
        }
        Action::RemoveServiceRules { kube_proxy } => {
            let output = kube_proxy::cleanup_command(kube_proxy)
                .output()
                .await
                .map_err(|e| {
                    CliError::Failed(format!(
                        "cannot run {} --cleanup: {e}",
                        kube_proxy.display()
                    ))
                })?;
            if output.status.success() || force {
                Ok(())
            } else {
                Err(CliError::Failed(format!(
                    "{} --cleanup failed ({}): {}; run reset again, or with --force",
                    kube_proxy.display(),
                    output.status,
                    String::from_utf8_lossy(&output.stderr).trim()
                )))
            }
        }
        Action::RemovePodNetwork { pod_cidr } => {
            let result = async {
                crate::podnet::reconcile(&[]).await?;
                if let Some(cidr) = pod_cidr
                    && let Ok(config) = super::load_config(paths)
                {
                    crate::podnet::remove_masquerade(*cidr, config.cluster.networking.pod_cidr)
                        .await?;
                }
                Ok::<_, crate::podnet::PodNetError>(())
            }
            .await;
            result.map_err(|e| {
                CliError::Failed(format!(
                    "cannot remove the pod network: {}",
                    crate::error_chain(&e)
                ))
            })
        }
        Action::RemoveFloatingAddress { address } => {
            let removed = crate::hostnet::interface_with(*address)
                .and_then(|interface| crate::hostnet::remove_address(&interface, *address));
            match removed {
                Ok(_) | Err(crate::hostnet::HostNetError::NoInterface(_)) => Ok(()),
                Err(e) => Err(CliError::Failed(crate::error_chain(&e))),
            }
        }
        Action::ReloadManager => {
            if let Some(m) = manager {
                m.daemon_reload().await?;
            }
            Ok(())
        }
        Action::Disable(p) | Action::Remove(p) => remove_path(p),
    }
}

/// Removes `member` through `via`, retrying refusals etcd calls transient;
/// a member that is already gone (reset interrupted after the removal) is
/// success.
async fn remove_member(paths: &HostPaths, member: u64, via: &str) -> Result<(), CliError> {
    let failed = |e: &EtcdError| {
        CliError::Failed(format!(
            "cannot remove etcd member {} through {via}: {}",
            member_id_hex(member),
            crate::error_chain(e)
        ))
    };
    let client = EtcdClient::connect(&[via.to_string()], &topology::agent_tls(paths))
        .await
        .map_err(|e| failed(&e))?;
    let outcome = wait::poll_until(
        "etcd to remove this node's member",
        REMOVE_WAIT,
        Backoff::remote(Duration::from_secs(2)),
        || {
            let mut c = client.clone();
            async move {
                match c.remove(member).await {
                    Err(e) if e.is_member_not_found() => Poll::Ready(Ok(())),
                    Err(e) if e.is_retryable() => Poll::Pending(crate::error_chain(&e)),
                    done => Poll::Ready(done),
                }
            }
        },
    )
    .await
    .map_err(|e| CliError::Failed(crate::error_chain(&e)))?;
    outcome.map_err(|e| failed(&e))
}

fn remove_path(p: &Path) -> Result<(), CliError> {
    // The kubelet's dir holds pod volumes mounted below it. Each removal
    // is synced, so reset's order survives a power cut.
    let result = match p.symlink_metadata() {
        Ok(m) if m.is_dir() => crate::fsutil::unmount_under(p).map(drop),
        _ => Ok(()),
    }
    .and_then(|()| crate::fsutil::remove_durable(p));
    result.map_err(|e| CliError::Failed(format!("cannot remove {}: {e}", p.display())))
}

fn confirm(actions: &[Action]) -> Result<bool, CliError> {
    for a in actions {
        println!("will {a}");
    }
    print!("Proceed? [y/N] ");
    let _ = std::io::stdout().flush();
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .map_err(|e| CliError::Failed(format!("cannot read answer: {e}")))?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::etcd::survey::EndpointReport;
    use crate::etcd::{EndpointStatus, Member};

    fn survey_of(healthy: &[bool]) -> Survey {
        let endpoints = healthy
            .iter()
            .enumerate()
            .map(|(i, ok)| EndpointReport {
                node: format!("cp-{}", i + 1),
                url: format!("https://10.0.0.{}:2379", i + 1),
                status: ok.then(|| EndpointStatus {
                    member_id: i as u64 + 1,
                    leader: 1,
                    is_learner: false,
                    version: "3.4.23".into(),
                    db_size: 0,
                    raft_term: 2,
                    raft_index: 7,
                }),
                healthy: *ok,
                error: None,
            })
            .collect();
        let members = (1..=healthy.len() as u64)
            .map(|id| Member {
                id,
                name: format!("cp-{id}"),
                peer_urls: vec![format!("https://10.0.0.{id}:2380")],
                client_urls: vec![],
                is_learner: false,
            })
            .collect();
        Survey {
            endpoints,
            members: Some(members),
        }
    }

    #[test]
    fn leaving_goes_through_another_healthy_voter_and_names_the_risk() {
        let (actions, risk) = decide_leave(
            &survey_of(&[true, true, true]),
            "cp-3",
            "https://10.0.0.3:2380",
        )
        .unwrap();
        assert_eq!(risk, None);
        assert_eq!(
            actions,
            [Action::LeaveEtcd {
                member: 3,
                name: "cp-3".into(),
                via: "https://10.0.0.1:2379".into()
            }]
        );
        let (_, risk) = decide_leave(
            &survey_of(&[true, false, true]),
            "cp-3",
            "https://10.0.0.3:2380",
        )
        .unwrap();
        assert!(risk.is_some());
        // Not a member (any more): nothing to do, nothing at risk.
        let (actions, risk) =
            decide_leave(&survey_of(&[true, true]), "cp-3", "https://10.0.0.3:2380").unwrap();
        assert!(actions.is_empty() && risk.is_none());
        // The only voter: no peer to go through, and the risk is named.
        let (actions, risk) =
            decide_leave(&survey_of(&[true]), "cp-1", "https://10.0.0.1:2380").unwrap();
        assert!(actions.is_empty() && risk.unwrap().contains("only voting member"));
        let mut silent = survey_of(&[false, false]);
        silent.members = None;
        assert!(decide_leave(&silent, "cp-1", "https://10.0.0.1:2380").is_err());
    }

    #[test]
    fn a_member_is_known_by_its_wal_or_its_recorded_id() {
        let dir = tempfile::tempdir().unwrap();
        let paths = HostPaths::new(dir.path(), None, None);
        assert!(!has_member(&paths));
        let record = paths.state_file(crate::phases::etcd::RECORD_FILE);
        std::fs::create_dir_all(record.parent().unwrap()).unwrap();
        std::fs::write(&record, r#"{"formation": "new", "initial_cluster": "a=b"}"#).unwrap();
        assert!(!has_member(&paths), "decided, but no member yet");
        std::fs::write(
            &record,
            r#"{"formation": "join", "initial_cluster": "", "member_id": "2a"}"#,
        )
        .unwrap();
        assert!(has_member(&paths));
        std::fs::write(&record, "garbage").unwrap();
        assert!(has_member(&paths), "unreadable: assume a member");
        std::fs::remove_file(&record).unwrap();
        std::fs::create_dir_all(topology::data_dir(&paths).join("member/wal")).unwrap();
        assert!(has_member(&paths));
    }

    #[test]
    fn units_are_stopped_before_what_they_need() {
        let unit = |name: &str, after: &[&str]| Unit {
            name: name.into(),
            after: after.iter().map(|s| s.to_string()).collect(),
            ..Unit::default()
        };
        let units = [
            unit("etcd.service", &["network-online.target"]),
            unit("kube-apiserver.service", &["etcd.service"]),
            unit("kubelet.service", &["kube-apiserver.service"]),
        ];
        assert_eq!(
            stop_order(&units),
            ["kubelet.service", "kube-apiserver.service", "etcd.service"]
        );
    }

    #[test]
    fn nothing_outside_the_root_or_in_the_config_dir_is_removed() {
        let paths = HostPaths::new(Path::new("/tmp/n1"), None, None);
        assert!(guard(&paths, &[Action::Remove("/tmp/n1/var/lib/etcd".into())]).is_ok());
        for bad in [
            "/tmp/n1/etc/cluster-config/secrets/join-secret",
            "/etc/passwd",
        ] {
            assert!(
                guard(&paths, &[Action::Remove(bad.into())]).is_err(),
                "{bad}"
            );
        }
    }
}
