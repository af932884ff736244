use std::io;
use std::path::PathBuf;

use time::OffsetDateTime;

use super::layout::{CaKind, LeafKind};
use crate::fsutil::WriteError;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(transparent)]
    Write(#[from] WriteError),

    #[error("{path} is not a usable certificate ({reason}); restore it from a backup or remove it")]
    BadCert { path: PathBuf, reason: String },

    #[error(
        "{path} is not a usable private key ({reason}); only unencrypted PKCS#8 ECDSA P-256, \
         P-384 or Ed25519 keys are supported (convert with `openssl pkcs8 -topk8 -nocrypt`)"
    )]
    BadKey { path: PathBuf, reason: String },

    #[error(
        "the {ca} certificate {cert} exists but its private key {key} is missing; \
         restore the key from a backup (or from another control-plane node). \
         The agent will not replace an existing CA: every certificate and kubeconfig \
         signed by it would stop working"
    )]
    CaKeyMissing {
        ca: CaKind,
        cert: PathBuf,
        key: PathBuf,
    },

    #[error(
        "the private key {key} does not belong to the {ca} certificate {cert}; \
         restore the matching pair from a backup (or from another control-plane node). \
         The agent will not replace an existing CA"
    )]
    CaKeyMismatch {
        ca: CaKind,
        cert: PathBuf,
        key: PathBuf,
    },

    #[error("{cert} cannot serve as the {ca}: {reason}; restore the right CA from a backup")]
    NotACa {
        ca: CaKind,
        cert: PathBuf,
        reason: String,
    },

    #[error(
        "the {ca} {cert} expired at {not_after}; a CA rotation is a manual operation \
         (every node's certificates and kubeconfigs must be re-issued)"
    )]
    CaExpired {
        ca: CaKind,
        cert: PathBuf,
        not_after: OffsetDateTime,
    },

    #[error(
        "the {ca} is missing ({cert}); set up the cluster CAs (ensure_cluster_cas) \
         before issuing node certificates"
    )]
    CaMissing { ca: CaKind, cert: PathBuf },

    #[error(
        "the local {ca} {local} differs from the one being imported; this node was set up \
         for another cluster or with another CA. Wipe {local_dir} on this node if it holds \
         nothing of value, or import the CA this node already has"
    )]
    CaConflict {
        ca: CaKind,
        local: PathBuf,
        local_dir: PathBuf,
    },

    #[error("the {what} to import is incomplete: {missing} is missing")]
    ImportIncomplete { what: String, missing: PathBuf },

    #[error(
        "the service-account public key {public} exists but its private key {key} is \
         missing; restore sa.key from a backup (or another control-plane node): \
         replacing it would invalidate every service-account token"
    )]
    SaKeyMissing { public: PathBuf, key: PathBuf },

    #[error(
        "the service-account key pair {key} / {public} does not match; restore both from \
         a backup (or another control-plane node)"
    )]
    SaKeyMismatch { public: PathBuf, key: PathBuf },

    #[error(
        "the local service-account key {local} differs from the one being imported; this \
         node was set up for another cluster"
    )]
    SaConflict { local: PathBuf },

    #[error("node {node} is not a control-plane node; it gets no control-plane certificates")]
    NotControlPlane { node: String },

    #[error("cannot derive SANs for {leaf}: {reason}")]
    BadSan { leaf: LeafKind, reason: String },

    #[error("client certificate {path} is missing; issue node certificates first")]
    ClientCertMissing { path: PathBuf },

    #[error("cannot create {what}: {source}")]
    Generate {
        what: String,
        #[source]
        source: rcgen::Error,
    },

    #[error("cannot create an RSA key for {what}: {reason}")]
    RsaKey { what: String, reason: String },
}

pub(crate) fn gen_err(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> PkiError {
    let what = what.into();
    move |source| PkiError::Generate { what, source }
}
