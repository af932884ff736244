//! Errors a step can fail with: one variant per external system, each
//! carrying enough context to tell the operator what to do.

use std::path::PathBuf;

use crate::fsutil::WriteError;
use crate::state::StateError;
use crate::wait::WaitTimeout;

#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Wait(#[from] WaitTimeout),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is corrupt ({reason}); run `cluster-agent reset` on this node", path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("{0}")]
    Precondition(String),
    #[error(transparent)]
    Etcd(#[from] crate::etcd::EtcdError),
    #[error(transparent)]
    Pki(#[from] crate::pki::PkiError),
    #[error(transparent)]
    Services(#[from] crate::services::ServicesError),
    #[error(transparent)]
    Join(#[from] crate::join::JoinError),
    #[error(transparent)]
    Ceph(#[from] crate::ceph::CephError),
    #[error(transparent)]
    K8s(#[from] crate::k8s::K8sError),
    #[error(transparent)]
    Manifests(#[from] crate::phases::addons::ManifestFailures),
    #[error("D-Bus call {call} failed: {source}")]
    Dbus {
        call: &'static str,
        #[source]
        source: zbus::Error,
    },
}
