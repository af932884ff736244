//! The runbook: which phases, in which order, for which role. Each phase is a
//! list of steps executed by [`crate::engine`].

pub mod control_plane;
pub mod etcd;
pub mod node;

use crate::engine::Plan;
use crate::role::{CephRole, Role};

/// The plan for a node. Every node runs the `node` phase first; the
/// Kubernetes and Ceph phases both require only it, so storage never waits
/// for (or fails with) Kubernetes.
pub fn build(role: Role, _ceph_role: CephRole) -> Plan {
    let mut phases = vec![node::phase()];
    if matches!(role, Role::MasterFirst | Role::MasterAdditional) {
        phases.push(etcd::phase());
        phases.push(control_plane::phase());
    }
    Plan { phases }
}
