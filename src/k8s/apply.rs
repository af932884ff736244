//! Server-side apply of arbitrary manifests (the add-ons an operator puts
//! in the config dir): each object through the API's discovery, applied
//! with field manager [`FIELD_MANAGER`], so a re-apply of the same object is
//! a no-op and a changed one updates exactly the fields it sets.

use kube::api::{Api, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::discovery::{self, Scope};

/// Whose fields these are (`metadata.managedFields[].manager`).
pub const FIELD_MANAGER: &str = "cluster-agent";

/// Why one object was not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// Not a Kubernetes object: no `apiVersion`, `kind` or `metadata.name`.
    #[error("{0}")]
    Malformed(String),
    /// The API serves no such kind (yet: a CRD applied just before it may
    /// not be established).
    #[error("the API server serves no {kind} in {api_version}")]
    UnknownKind { api_version: String, kind: String },
    /// The API refused it, with its reason.
    #[error("the API server refused it ({code} {reason}): {message}")]
    Rejected {
        code: u16,
        reason: String,
        message: String,
    },
    /// No answer, or one saying to come back later.
    #[error("the API server did not answer: {0}")]
    Unreachable(String),
}

impl ApplyError {
    /// Worth trying again within the deadline: the API was busy or away,
    /// or a CRD is being established. A malformed object or a refusal for
    /// cause stays what it is.
    pub fn is_transient(&self) -> bool {
        match self {
            ApplyError::Malformed(_) => false,
            ApplyError::UnknownKind { .. } | ApplyError::Unreachable(_) => true,
            // 404: a namespace created just before by another manifest is
            // not visible yet; 409: a conflicting write raced ours;
            // 429/5xx: the API asks to come back.
            ApplyError::Rejected { code, .. } => matches!(code, 404 | 409 | 429 | 500..),
        }
    }
}

/// `Kind namespace/name` (or `Kind name`) of a manifest object, for
/// messages; `None` when it has no kind or name.
pub fn describe(object: &serde_json::Value) -> Option<String> {
    let kind = object["kind"].as_str()?;
    let name = object["metadata"]["name"].as_str()?;
    Some(match object["metadata"]["namespace"].as_str() {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    })
}

fn api_error(e: kube::Error) -> ApplyError {
    match e {
        kube::Error::Api(status) => ApplyError::Rejected {
            code: status.code,
            reason: status.reason.clone(),
            message: status.message.clone(),
        },
        other => ApplyError::Unreachable(crate::error_chain(&other)),
    }
}

/// Applies one object (server-side apply, forced: the agent owns what
/// the manifests say). Namespaced objects without a namespace go to
/// `default`, as `kubectl apply` puts them.
pub async fn apply(client: &kube::Client, object: &serde_json::Value) -> Result<(), ApplyError> {
    let (Some(api_version), Some(kind), Some(name)) = (
        object["apiVersion"].as_str(),
        object["kind"].as_str(),
        object["metadata"]["name"].as_str(),
    ) else {
        return Err(ApplyError::Malformed(
            "not a Kubernetes object: apiVersion, kind and metadata.name are required".into(),
        ));
    };
    let (group, version) = match api_version.split_once('/') {
        Some((group, version)) => (group, version),
        None => ("", api_version),
    };
    let gvk = GroupVersionKind::gvk(group, version, kind);
    let (resource, capabilities) = match discovery::pinned_kind(client, &gvk).await {
        Ok(found) => found,
        Err(kube::Error::Discovery(_)) => {
            return Err(ApplyError::UnknownKind {
                api_version: api_version.into(),
                kind: kind.into(),
            });
        }
        // An API group nobody serves answers 404 to its discovery.
        Err(kube::Error::Api(status)) if status.code == 404 => {
            return Err(ApplyError::UnknownKind {
                api_version: api_version.into(),
                kind: kind.into(),
            });
        }
        Err(e) => return Err(api_error(e)),
    };
    let api: Api<DynamicObject> = match capabilities.scope {
        Scope::Cluster => Api::all_with(client.clone(), &resource),
        Scope::Namespaced => Api::namespaced_with(
            client.clone(),
            object["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default"),
            &resource,
        ),
    };
    api.patch(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
    .map(drop)
    .map_err(api_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_are_named_by_kind_namespace_and_name() {
        let cm = serde_json::json!({"kind": "ConfigMap", "metadata": {"name": "a", "namespace": "kube-system"}});
        assert_eq!(describe(&cm).as_deref(), Some("ConfigMap kube-system/a"));
        let ns = serde_json::json!({"kind": "Namespace", "metadata": {"name": "x"}});
        assert_eq!(describe(&ns).as_deref(), Some("Namespace x"));
        assert_eq!(describe(&serde_json::json!({"kind": "Pod"})), None);
    }

    #[test]
    fn only_passing_conditions_are_retried() {
        let rejected = |code| ApplyError::Rejected {
            code,
            reason: "r".into(),
            message: "m".into(),
        };
        assert!(!rejected(422).is_transient());
        assert!(!rejected(403).is_transient());
        assert!(!rejected(400).is_transient());
        assert!(rejected(503).is_transient());
        assert!(rejected(429).is_transient());
        assert!(rejected(404).is_transient());
        assert!(!ApplyError::Malformed("x".into()).is_transient());
        assert!(ApplyError::Unreachable("x".into()).is_transient());
    }
}
