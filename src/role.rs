//! The role decision. Every node computes it from the same configuration and
//! must reach the same answer, so the order is defined on names alone —
//! byte-wise, locale-independent, with digit runs compared as numbers so
//! `cp-9` comes before `cp-10`.

use std::cmp::Ordering;
use std::fmt;

use serde::Serialize;

use crate::config::{ClusterConfig, NodeRole, NodeSpec};

/// The node's Kubernetes role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    MasterFirst,
    MasterAdditional,
    Worker,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::MasterFirst => "master-first",
            Role::MasterAdditional => "master-additional",
            Role::Worker => "worker",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The node's Ceph monitor role, decided by the same order among ceph-mon nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CephRole {
    MonFirst,
    MonAdditional,
    None,
}

/// Natural order of node names: non-digit runs compare byte-wise, digit runs
/// numerically (leading zeros ignored, then shorter-first as a tiebreak).
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let (da, ra) = split_digits(a);
                let (db, rb) = split_digits(b);
                let (ta, tb) = (trim_zeros(da), trim_zeros(db));
                let ord = ta
                    .len()
                    .cmp(&tb.len())
                    .then_with(|| ta.cmp(tb))
                    .then_with(|| da.len().cmp(&db.len()));
                if ord != Ordering::Equal {
                    return ord;
                }
                (a, b) = (ra, rb);
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                (a, b) = (&a[1..], &b[1..]);
            }
        }
    }
}

fn split_digits(s: &[u8]) -> (&[u8], &[u8]) {
    let n = s.iter().take_while(|c| c.is_ascii_digit()).count();
    s.split_at(n)
}

fn trim_zeros(s: &[u8]) -> &[u8] {
    let n = s.iter().take_while(|c| **c == b'0').count();
    &s[n..]
}

/// Nodes carrying `role`, in the stable order every node agrees on.
pub fn ordered_nodes(config: &ClusterConfig, role: NodeRole) -> Vec<&NodeSpec> {
    let mut nodes: Vec<&NodeSpec> = config.nodes.iter().filter(|n| n.has_role(role)).collect();
    nodes.sort_by(|a, b| natural_cmp(&a.name, &b.name));
    nodes
}

pub fn decide(config: &ClusterConfig, node: &NodeSpec) -> Role {
    if !node.is_control_plane() {
        return Role::Worker;
    }
    match ordered_nodes(config, NodeRole::ControlPlane).first() {
        Some(first) if first.name == node.name => Role::MasterFirst,
        _ => Role::MasterAdditional,
    }
}

pub fn decide_ceph(config: &ClusterConfig, node: &NodeSpec) -> CephRole {
    if !node.has_role(NodeRole::CephMon) {
        return CephRole::None;
    }
    match ordered_nodes(config, NodeRole::CephMon).first() {
        Some(first) if first.name == node.name => CephRole::MonFirst,
        _ => CephRole::MonAdditional,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order() {
        let mut names = vec![
            "cp-10", "cp-9", "cp-1", "cp-01", "cp-b", "cp-a", "cp-100", "cp",
        ];
        names.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            names,
            [
                "cp", "cp-1", "cp-01", "cp-9", "cp-10", "cp-100", "cp-a", "cp-b"
            ]
        );
    }

    #[test]
    fn natural_order_is_total_and_antisymmetric() {
        let names = ["a1", "a01", "a001", "a1b", "a10", "a", "b", "A", "1", "01"];
        for x in names {
            for y in names {
                assert_eq!(natural_cmp(x, y), natural_cmp(y, x).reverse(), "{x} {y}");
                assert_eq!(natural_cmp(x, y) == Ordering::Equal, x == y, "{x} {y}");
            }
        }
    }
}
