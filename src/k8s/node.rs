//! Node objects: what the kubelet phase waits for (a pod CIDR, the Ready
//! condition), the control-plane role label, and what a node's own
//! identity may do about Nodes (see [`ensure_node_agent_rbac`]).

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, Patch, PatchParams};

use super::{K8sError, api_error, create_or_keep, subject_names};

/// kubeadm's role label. A kubelet may not set `node-role.kubernetes.io/*`
/// labels on itself (NodeRestriction), so the agent sets it as the admin.
pub const CONTROL_PLANE_LABEL: &str = "node-role.kubernetes.io/control-plane";
/// The taint a master's kubelet registers with: ordinary pods stay off.
pub const CONTROL_PLANE_TAINT: &str = "node-role.kubernetes.io/control-plane:NoSchedule";
/// The ClusterRole (and its binding to `system:nodes`) that lets each
/// node's agent, as its kubelet's identity, see every Node (for the
/// routes to their pod CIDRs) and delete its own (reset).
pub const NODE_AGENT_ROLE: &str = "cluster-agent:node-agent";
const NODES_GROUP: &str = crate::pki::NODES_GROUP;

/// What the Node says about itself, for waits and `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    /// `Ready` is False or Unknown (or not reported yet): the condition's
    /// status, reason and message, as the kubelet set them.
    NotReady(String),
}

/// The Ready condition of `node`, in words when it is not True.
pub fn readiness(node: &Node) -> Readiness {
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"));
    match ready {
        Some(c) if c.status == "True" => Readiness::Ready,
        Some(c) => Readiness::NotReady(format!(
            "Ready={} ({}: {})",
            c.status,
            c.reason.as_deref().unwrap_or("no reason"),
            c.message.as_deref().unwrap_or("no message")
        )),
        None => Readiness::NotReady("no Ready condition reported yet".into()),
    }
}

/// The pod CIDR the controller-manager's node IPAM gave `node`.
pub fn pod_cidr(node: &Node) -> Option<ipnet::Ipv4Net> {
    node.spec.as_ref()?.pod_cidr.as_deref()?.parse().ok()
}

/// The Node's InternalIP.
pub fn internal_ip(node: &Node) -> Option<std::net::Ipv4Addr> {
    node.status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .find(|a| a.type_ == "InternalIP")?
        .address
        .parse()
        .ok()
}

pub async fn get(client: &kube::Client, name: &str) -> Result<Node, K8sError> {
    Api::<Node>::all(client.clone())
        .get(name)
        .await
        .map_err(api_error(format!("get Node {name}")))
}

/// `None` when the Node does not exist.
pub async fn get_optional(client: &kube::Client, name: &str) -> Result<Option<Node>, K8sError> {
    Api::<Node>::all(client.clone())
        .get_opt(name)
        .await
        .map_err(api_error(format!("get Node {name}")))
}

pub fn has_control_plane_label(node: &Node) -> bool {
    node.metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(CONTROL_PLANE_LABEL))
}

/// Adds the control-plane label (a merge patch: other labels stay).
pub async fn label_control_plane(client: &kube::Client, name: &str) -> Result<(), K8sError> {
    let patch = serde_json::json!({"metadata": {"labels": {CONTROL_PLANE_LABEL: ""}}});
    Api::<Node>::all(client.clone())
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(drop)
        .map_err(api_error(format!("label Node {name}")))
}

/// Deletes `name`; one already gone is success.
pub async fn delete(client: &kube::Client, name: &str) -> Result<(), K8sError> {
    match Api::<Node>::all(client.clone())
        .delete(name, &DeleteParams::default())
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(e) => Err(api_error(format!("delete Node {name}"))(e)),
    }
}

/// Since Kubernetes 1.32 (`AuthorizeNodeWithSelectors`) the Node
/// authorizer lets a kubelet read its own Node only. The agent's route
/// keeper needs every Node's pod CIDR and address, and reset deletes the
/// node's own Node with the node's identity; RBAC grants both to
/// `system:nodes`, and NodeRestriction still limits a node's writes,
/// deletion included, to its own Node object.
pub async fn ensure_node_agent_rbac(client: &kube::Client) -> Result<(), K8sError> {
    let meta = || ObjectMeta {
        name: Some(NODE_AGENT_ROLE.into()),
        ..Default::default()
    };
    let role = ClusterRole {
        metadata: meta(),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["nodes".into()]),
            verbs: ["get", "list", "watch", "delete"]
                .map(String::from)
                .to_vec(),
            ..Default::default()
        }]),
        aggregation_rule: None,
    };
    create_or_keep(
        &Api::all(client.clone()),
        &role,
        &format!("clusterrole {NODE_AGENT_ROLE}"),
        |r: &ClusterRole| format!("{:?}", r.rules),
    )
    .await?;
    let binding = ClusterRoleBinding {
        metadata: meta(),
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "ClusterRole".into(),
            name: NODE_AGENT_ROLE.into(),
        },
        subjects: Some(vec![Subject {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "Group".into(),
            name: NODES_GROUP.into(),
            namespace: None,
        }]),
    };
    create_or_keep(
        &Api::all(client.clone()),
        &binding,
        &format!("clusterrolebinding {NODE_AGENT_ROLE}"),
        |b: &ClusterRoleBinding| format!("{}→{:?}", b.role_ref.name, subject_names(&b.subjects)),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(json: serde_json::Value) -> Node {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn readiness_names_the_kubelets_reason() {
        let not_ready = node(serde_json::json!({
            "metadata": {"name": "w-1"},
            "status": {"conditions": [
                {"type": "MemoryPressure", "status": "False"},
                {"type": "Ready", "status": "False", "reason": "KubeletNotReady",
                 "message": "container runtime network not ready: cni plugin not initialized"}
            ]}
        }));
        assert_eq!(
            readiness(&not_ready),
            Readiness::NotReady(
                "Ready=False (KubeletNotReady: container runtime network not ready: cni plugin \
                 not initialized)"
                    .into()
            )
        );
        let ready = node(serde_json::json!({
            "metadata": {"name": "w-1"},
            "spec": {"podCIDR": "10.244.3.0/24"},
            "status": {
                "conditions": [{"type": "Ready", "status": "True"}],
                "addresses": [
                    {"type": "Hostname", "address": "w-1"},
                    {"type": "InternalIP", "address": "10.0.0.21"}
                ]
            }
        }));
        assert_eq!(readiness(&ready), Readiness::Ready);
        assert_eq!(pod_cidr(&ready), Some("10.244.3.0/24".parse().unwrap()));
        assert_eq!(internal_ip(&ready), Some("10.0.0.21".parse().unwrap()));
        let fresh = node(serde_json::json!({"metadata": {"name": "w-2"}}));
        assert!(matches!(readiness(&fresh), Readiness::NotReady(_)));
        assert_eq!(pod_cidr(&fresh), None);
        assert_eq!(internal_ip(&fresh), None);
    }
}
