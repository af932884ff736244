//! The runbook: which phases, in which order, for which role. Each phase is a
//! list of steps executed by [`crate::engine`].

pub mod addons;
pub mod api_address;
pub mod api_balancer;
pub mod ceph;
pub mod ceph_dashboard;
pub mod container_runtime;
pub mod control_plane;
pub mod etcd;
pub mod join_service;
pub mod kube_proxy;
pub mod kubelet;
pub mod node;

use crate::config::{ClusterConfig, NodeSpec};
use crate::engine::Plan;
use crate::paths::HostPaths;
use crate::role::{CephRole, Role};
use crate::services::Unit;

/// The plan for a node. Every node runs the `node` phase first; the
/// Kubernetes and Ceph phases both require only it and run side by side,
/// so storage never waits for (or fails with) Kubernetes; only the
/// dashboard, whose certificate comes from the cluster CA, waits for both.
pub fn build(role: Role, ceph_role: CephRole, config: &ClusterConfig) -> Plan {
    let control_plane = matches!(role, Role::MasterFirst | Role::MasterAdditional);
    let monitor = ceph_role != CephRole::None;
    let mut phases = vec![node::phase()];
    if control_plane {
        phases.push(etcd::phase());
    }
    if monitor {
        phases.push(ceph::phase());
    }
    let dashboard = config.cluster.ceph.as_ref().is_some_and(|c| c.dashboard);
    if monitor && control_plane && dashboard {
        phases.push(ceph_dashboard::phase());
    }
    // It requires only `node` and so starts beside etcd and ceph; it
    // answers "not yet" (503) for what they have not made yet.
    if control_plane || monitor {
        phases.push(join_service::phase());
    }
    if control_plane {
        phases.push(control_plane::phase());
        phases.push(addons::phase());
    }
    // The runtime first: a kubelet exits when no CRI answers.
    if runs_kubelet(role) {
        phases.push(container_runtime::phase());
        phases.push(kubelet::phase(role));
        phases.push(kube_proxy::phase(role));
    }
    Plan { phases }
}

/// Every phase a node can run, each once: `reset` undoes what they own,
/// whatever role this node had (its configuration may have changed since).
pub fn catalog() -> Vec<crate::engine::Phase> {
    vec![
        node::phase(),
        etcd::phase(),
        ceph::phase(),
        ceph_dashboard::phase(),
        join_service::phase(),
        control_plane::phase(),
        addons::phase(),
        container_runtime::phase(),
        kubelet::phase(Role::Worker),
        kube_proxy::phase(Role::Worker),
    ]
}

/// Nodes whose plan has a kubelet, and so a container runtime before it:
/// every Kubernetes node, masters included (kubeadm's masters are Nodes
/// too, tainted so that ordinary pods stay off).
pub fn runs_kubelet(role: Role) -> bool {
    matches!(
        role,
        Role::MasterFirst | Role::MasterAdditional | Role::Worker
    )
}

/// Every unit file the phases install on `node`, rendered as on its first
/// boot. `tests/systemd_units.rs` runs each through `systemd-analyze
/// verify`, so a phase that renders a unit adds it here and is checked.
pub fn rendered_units(paths: &HostPaths, config: &ClusterConfig, node: &NodeSpec) -> Vec<Unit> {
    let role = crate::role::decide(config, node);
    let mut units = Vec::new();
    units.extend(etcd::rendered_units(paths, config, node, role));
    if node.is_control_plane() {
        units.extend(control_plane::render_units(paths, config, node));
    }
    if runs_kubelet(role) {
        units.push(container_runtime::render_unit(paths));
        units.push(kubelet::render_kubelet_unit(paths, node));
        units.push(kube_proxy::render_unit(paths));
        let agent = std::path::Path::new(join_service::IMAGE_AGENT);
        units.push(kubelet::render_routes_unit(paths, node, agent));
        units.push(api_balancer::render_unit(paths, node, agent));
        if node.is_control_plane() && config.cluster.floating_endpoint.is_some() {
            units.push(api_address::render_unit(paths, node, agent));
        }
    }
    if node.has_role(crate::config::NodeRole::CephMon) {
        units.push(ceph::render_unit(paths, node));
        units.push(ceph::render_mgr_unit(paths, node));
    }
    if node.is_control_plane() || node.has_role(crate::config::NodeRole::CephMon) {
        units.push(join_service::render_unit(
            paths,
            node,
            std::path::Path::new(join_service::IMAGE_AGENT),
        ));
    }
    units
}

/// The first of `addrs` (`host:port`) that accepts a TCP connection within
/// `timeout`, all probed at once. Needs no credentials, so a node can tell
/// whether a peer already runs a daemon before it holds any key (the
/// split-brain guards of etcd and Ceph).
pub(crate) async fn first_listening(
    addrs: impl Iterator<Item = String>,
    timeout: std::time::Duration,
) -> Option<String> {
    let mut set = tokio::task::JoinSet::new();
    for addr in addrs {
        set.spawn(async move {
            match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(&addr)).await {
                Ok(Ok(_)) => Some(addr),
                _ => None,
            }
        });
    }
    while let Some(result) = set.join_next().await {
        if let Ok(Some(addr)) = result {
            return Some(addr);
        }
    }
    None
}

/// Starts `unit` and waits until `probe` says it is ready. Readiness, not
/// the backend's notion of a finished start, decides: the process backend
/// watches a `Type=simple` daemon for a settle window before it calls the
/// start done, and a monitor or API server is often ready well inside it.
/// A start that fails before readiness fails the wait with its error.
pub(crate) async fn start_until_ready<T, F, Fut>(
    ctx: &crate::engine::Context,
    unit: &str,
    what: &str,
    timeout: std::time::Duration,
    probe: F,
) -> Result<T, crate::engine::StepError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = crate::wait::Poll<T>>,
{
    let services = ctx.services.clone();
    let name = unit.to_string();
    let mut start = tokio::spawn(async move { services.start(&name).await });
    ctx.progress.waiting(what);
    let ready = crate::wait::poll_until(what, timeout, crate::wait::Backoff::local(), probe);
    tokio::pin!(ready);
    tokio::select! {
        started = &mut start => {
            started.expect("the start task does not panic")?;
            Ok(ready.await?)
        }
        value = &mut ready => {
            if start.is_finished() {
                start.await.expect("the start task does not panic")?;
            }
            Ok(value?)
        }
    }
}

/// A restart owed to a unit whose inputs (config, unit file,
/// certificates) were rewritten while it ran: a marker in the state dir,
/// written before the inputs and removed once the unit runs on them, so a
/// crash in between cannot leave it running on the old ones for good (the
/// next run would find the files current and restart nothing).
pub(crate) struct RestartDue(pub &'static str);

impl RestartDue {
    fn path(&self, ctx: &crate::engine::Context) -> std::path::PathBuf {
        ctx.paths.state_file(&format!("{}-restart-due", self.0))
    }

    pub fn mark(&self, ctx: &crate::engine::Context) -> Result<(), crate::engine::StepError> {
        crate::fsutil::write_atomic(&self.path(ctx), b"", crate::fsutil::PUBLIC_MODE)?;
        Ok(())
    }

    pub fn pending(&self, ctx: &crate::engine::Context) -> bool {
        self.path(ctx).exists()
    }

    pub fn clear(&self, ctx: &crate::engine::Context) -> Result<(), crate::engine::StepError> {
        let path = self.path(ctx);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(crate::engine::StepError::Precondition(format!(
                    "cannot remove {}: {e}",
                    path.display()
                )))
            }
            // Not fsynced: a marker that comes back after a power cut costs
            // one more restart, never a missed one.
            _ => Ok(()),
        }
    }

    /// Restarts `unit` if a restart is due and it runs (one that does not
    /// run starts on the new inputs anyway), then forgets the restart.
    pub async fn settle(
        &self,
        ctx: &crate::engine::Context,
        unit: &str,
    ) -> Result<(), crate::engine::StepError> {
        if self.pending(ctx)
            && ctx.services.state(unit).await?.active_state == crate::services::ActiveState::Active
        {
            ctx.services.restart(unit).await?;
        }
        self.clear(ctx)
    }
}

/// What `binary --version` prints on stdout: how the binary steps learn
/// an image's versions.
pub(crate) async fn version_output(
    binary: &std::path::Path,
) -> Result<String, crate::engine::StepError> {
    let out = tokio::process::Command::new(binary)
        .arg("--version")
        .output()
        .await
        .map_err(|e| {
            crate::engine::StepError::Precondition(format!(
                "cannot run {} --version: {e}",
                binary.display()
            ))
        })?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A file's text, `None` when it does not exist.
pub(crate) fn read_text(
    path: &std::path::Path,
) -> Result<Option<String>, crate::engine::StepError> {
    crate::fsutil::read_optional(path)
        .map(|b| b.map(|b| String::from_utf8_lossy(&b).into_owned()))
        .map_err(|source| crate::engine::StepError::Read {
            path: path.to_path_buf(),
            source,
        })
}

/// A phase's JSON record, `None` when it does not exist; one that does not
/// parse is corrupt (the operator resets the node), never silently redone.
pub(crate) fn load_record<T: serde::de::DeserializeOwned>(
    path: &std::path::Path,
) -> Result<Option<T>, crate::engine::StepError> {
    let Some(text) = read_text(path)? else {
        return Ok(None);
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| crate::engine::StepError::Corrupt {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

/// Writes a phase's JSON record atomically (temp, fsync, rename, fsync dir).
pub(crate) fn save_record(
    path: &std::path::Path,
    record: &impl serde::Serialize,
) -> Result<(), crate::engine::StepError> {
    let bytes = serde_json::to_vec_pretty(record).expect("records serialise");
    crate::fsutil::write_atomic(path, &bytes, crate::fsutil::PUBLIC_MODE)?;
    Ok(())
}

/// `purpose` material from the join service of any other node that holds
/// it, authenticated with this node's join secret; `extract` takes the
/// variant the caller needs (the client already refuses an answer for
/// another purpose).
pub(crate) async fn fetch_join_material<T>(
    ctx: &crate::engine::Context,
    purpose: crate::join::Purpose,
    deadline: std::time::Duration,
    extract: impl FnOnce(crate::join::Material) -> Option<T>,
) -> Result<T, crate::engine::StepError> {
    let client = crate::join::JoinClient::new(
        crate::join::JoinKeys::load(&ctx.paths, &ctx.config, &ctx.node)?,
        &ctx.node.name,
        std::net::IpAddr::V4(ctx.node.ip),
    );
    let servers = crate::join::servers_for(&ctx.config, &ctx.node, purpose);
    let material = client
        .fetch(&servers, purpose, deadline, |what| {
            ctx.progress.waiting(what)
        })
        .await?;
    let answered = material.purpose();
    extract(material).ok_or_else(|| {
        crate::engine::StepError::Precondition(format!(
            "the join service answered with {answered} material to a {purpose} request"
        ))
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// A phase a plan can hold but the catalog lacks would leave its files
    /// behind every reset.
    #[test]
    fn the_catalog_holds_every_phase_a_plan_can_run_once() {
        let catalog: Vec<&str> = catalog().iter().map(|p| p.name).collect();
        let unique: BTreeSet<&str> = catalog.iter().copied().collect();
        assert_eq!(unique.len(), catalog.len(), "{catalog:?}");
        let roles = [Role::MasterFirst, Role::MasterAdditional, Role::Worker];
        let ceph_roles = [CephRole::None, CephRole::MonFirst, CephRole::MonAdditional];
        // With every optional phase: the dashboard's.
        let config = crate::config::parse_cluster_yaml(
            b"cluster:\n  name: t\n  ceph:\n    public_network: 10.0.0.0/24\n    dashboard: true\n\
              nodes:\n  - {name: cp-1, ip: 10.0.0.11, roles: [control-plane, ceph-mon]}\n",
        )
        .unwrap();
        for role in roles {
            for ceph_role in ceph_roles {
                for phase in build(role, ceph_role, &config).phases {
                    assert!(
                        unique.contains(phase.name),
                        "{role:?}/{ceph_role:?}: {}",
                        phase.name
                    );
                }
            }
        }
    }

    /// What the phases own is under `--root`, and the shared CA material
    /// that lets a node rejoin is not among it.
    #[test]
    fn phases_own_only_files_under_the_root_and_not_the_shared_cas() {
        let root = std::path::Path::new("/tmp/some-node");
        let paths = HostPaths::new(root, None, None);
        let pki = crate::pki::PkiPaths::new(&paths);
        let owned: Vec<std::path::PathBuf> = catalog()
            .iter()
            .flat_map(|p| (p.owns)(&paths, None))
            .collect();
        assert!(owned.iter().all(|p| p.starts_with(root)), "{owned:?}");
        for ca in crate::pki::CaKind::ALL {
            let pair = pki.ca(ca);
            assert!(!owned.contains(&pair.cert) && !owned.contains(&pair.key));
        }
        assert!(!owned.contains(&pki.sa_key()));
        for kubeconfig in [control_plane::ADMIN_CONF, kubelet::BOOTSTRAP_KUBECONFIG] {
            assert!(owned.contains(&paths.host(kubeconfig)), "{kubeconfig}");
        }
    }
}
