//! The runbook: which phases, in which order, for which role. Each phase is a
//! list of steps executed by [`crate::engine`].

pub mod control_plane;
pub mod etcd;
pub mod join_service;
pub mod node;

use crate::config::{ClusterConfig, NodeSpec};
use crate::engine::Plan;
use crate::paths::HostPaths;
use crate::role::{CephRole, Role};
use crate::services::Unit;

/// The plan for a node. Every node runs the `node` phase first; the
/// Kubernetes and Ceph phases both require only it, so storage never waits
/// for (or fails with) Kubernetes.
pub fn build(role: Role, _ceph_role: CephRole) -> Plan {
    let mut phases = vec![node::phase()];
    if matches!(role, Role::MasterFirst | Role::MasterAdditional) {
        phases.push(etcd::phase());
        phases.push(join_service::phase());
        phases.push(control_plane::phase());
    }
    Plan { phases }
}

/// Every unit file the phases install on `node`, rendered as on its first
/// boot. `tests/systemd_units.rs` runs each through `systemd-analyze
/// verify`, so a phase that renders a unit adds it here and is checked.
pub fn rendered_units(paths: &HostPaths, config: &ClusterConfig, node: &NodeSpec) -> Vec<Unit> {
    let role = crate::role::decide(config, node);
    let mut units = Vec::new();
    units.extend(etcd::rendered_units(paths, config, node, role));
    if node.is_control_plane() {
        units.push(join_service::render_unit(
            paths,
            node,
            std::path::Path::new(join_service::IMAGE_AGENT),
        ));
    }
    units
}
