//! The cluster's PKI, laid out exactly like kubeadm's `/etc/kubernetes/pki`.
//!
//! Two steps, both idempotent:
//! 1. [`ensure_cluster_cas`] puts the shared material in place (three CAs
//!    and the service-account key pair): generated on the first
//!    control-plane node, imported on the others. Shared material is never
//!    replaced; anything inconsistent is an error for the operator.
//! 2. [`ensure_node_certs`] issues this node's leaf certificates, keeping
//!    those that are still right and re-issuing the others (expiring, wrong
//!    SANs, not signed by the current CA…).
//!
//! All keys are ECDSA P-256 (PKCS#8 PEM), including `sa.key`: kube-apiserver
//! signs service-account tokens with ES256 from it. Keys are written 0600,
//! certs and `sa.pub` 0644, each atomically.

mod ca;
mod cert;
mod error;
mod layout;
mod leaf;

#[cfg(test)]
mod tests;

use std::path::Path;

use time::{Duration, OffsetDateTime};

pub use ca::{CaBundle, CaItem, CaOutcome, CaReport};
pub use cert::San;
pub use error::PkiError;
pub use layout::{CaKind, CertKeyPaths, ClientCert, LeafKind, PKI_DIR, PkiPaths};
pub use leaf::{
    API_ADDRESS_USER, KUBE_PROXY_USER, LeafOutcome, LeafReport, MASTERS_GROUP, NODES_GROUP,
    ReissueReason,
};

use crate::config::{ClusterConfig, NodeSpec};
use crate::paths::HostPaths;

/// CAs live ten years, as kubeadm's; rotating one is a manual operation.
pub const CA_VALIDITY: Duration = Duration::days(3650);
/// Leaves live one year and are renewed by simply running the agent again.
pub const LEAF_VALIDITY: Duration = Duration::days(365);
/// A leaf with less than this left is re-issued.
pub const RENEW_BEFORE: Duration = Duration::days(30);

/// Where the shared CA material comes from.
#[derive(Debug, Clone, Copy)]
pub enum CaSource<'a> {
    /// Create whatever is missing (first control-plane node).
    Generate,
    /// Copy from a directory laid out like the PKI dir (`ca.*`,
    /// `front-proxy-ca.*`, `etcd/ca.*`, `sa.*`).
    Import(&'a Path),
    /// Install a bundle received from another node (the join service).
    Bundle(&'a CaBundle),
}

/// Puts the three CAs and the service-account key pair in place.
///
/// `Generate` creates what is missing and keeps what is there. `Import` and
/// `Bundle` check the whole source first, then copy what is missing; a local
/// item that differs from the imported one is an error, never overwritten.
pub fn ensure_cluster_cas(paths: &HostPaths, source: CaSource<'_>) -> Result<CaReport, PkiError> {
    ca::ensure_cluster_cas_at(paths, source, OffsetDateTime::now_utc())
}

/// Issues (or keeps) every leaf certificate of control-plane `node`.
/// `etcd_listens_on_loopback` adds `localhost`, `127.0.0.1` and `::1` to the
/// etcd server cert, which must not claim names etcd does not serve on.
/// The CAs must already be in place ([`ensure_cluster_cas`]).
pub fn ensure_node_certs(
    paths: &HostPaths,
    config: &ClusterConfig,
    node: &NodeSpec,
    etcd_listens_on_loopback: bool,
) -> Result<LeafReport, PkiError> {
    leaf::ensure_node_certs_at(
        paths,
        config,
        node,
        etcd_listens_on_loopback,
        OffsetDateTime::now_utc(),
    )
}

/// The Ceph dashboard's serving certificate on monitor node `node` (at
/// `at`), from the cluster CA: the node's hostname and address, an RSA key
/// (the dashboard refuses others). Kept while it serves, renewed like
/// every leaf.
pub fn ensure_ceph_dashboard_cert(
    paths: &HostPaths,
    node: &NodeSpec,
    at: &CertKeyPaths,
) -> Result<LeafOutcome, PkiError> {
    let now = OffsetDateTime::now_utc();
    let ca = ca::load_ca(&PkiPaths::new(paths), CaKind::Cluster, now)?;
    let wanted = ceph_dashboard_profile(node);
    leaf::ensure_leaf(
        at,
        "the Ceph dashboard",
        &wanted,
        &ca,
        now,
        cert::generate_rsa_key,
    )
}

/// Whether [`ensure_ceph_dashboard_cert`] would keep what is at `at`.
pub fn ceph_dashboard_cert_current(
    paths: &HostPaths,
    node: &NodeSpec,
    at: &CertKeyPaths,
) -> Result<bool, PkiError> {
    let now = OffsetDateTime::now_utc();
    let ca = ca::load_ca(&PkiPaths::new(paths), CaKind::Cluster, now)?;
    let (verdict, _) = leaf::assess_pair(at, &ceph_dashboard_profile(node), &ca, now)?;
    Ok(matches!(verdict, leaf::Verdict::Current))
}

fn ceph_dashboard_profile(node: &NodeSpec) -> cert::LeafProfile {
    cert::LeafProfile {
        common_name: format!("ceph-dashboard {}", node.name),
        organizations: vec![],
        sans: [San::dns(&node.hostname), San::Ip(node.ip.into())].into(),
        server_auth: true,
        client_auth: false,
    }
}

/// A CA and a server certificate it signed, made in memory for one run of
/// a server whose clients learn the CA out of band (the bootstrap machine's
/// Ignition pointer names it) and never written anywhere: nothing to
/// protect, rotate or clean up once the run ends.
pub struct EphemeralServing {
    pub ca_pem: String,
    pub cert_pem: String,
    /// PKCS#8 DER.
    pub key_der: Vec<u8>,
}

impl std::fmt::Debug for EphemeralServing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EphemeralServing")
            .field("key_der", &"<redacted>")
            .finish_non_exhaustive()
    }
}

pub fn ephemeral_serving(
    common_name: &str,
    sans: std::collections::BTreeSet<San>,
    validity: Duration,
) -> Result<EphemeralServing, PkiError> {
    // Machines PXE-boot on hardware clocks, some set to local time west of
    // UTC or reset by a dead battery: a certificate "not yet valid" for them
    // would stall Ignition silently. Nothing is kept, so backdating costs
    // nothing.
    let now = OffsetDateTime::now_utc() - Duration::days(2);
    let validity = validity + Duration::days(2);
    let ca_key = cert::generate_key(common_name)?;
    let ca_pem = cert::self_signed_ca(&format!("{common_name} CA"), &ca_key, now, validity)?;
    let key = cert::generate_key(common_name)?;
    let profile = cert::LeafProfile {
        common_name: common_name.to_string(),
        organizations: vec![],
        sans,
        server_auth: true,
        client_auth: false,
    };
    let cert_pem = cert::issue_leaf(&profile, &key, &ca_pem, &ca_key, now, validity)?;
    Ok(EphemeralServing {
        ca_pem,
        cert_pem,
        key_der: key.serialize_der(),
    })
}

/// Reads the shared CA material for shipping to a joining control-plane
/// node; checks it first so that nothing unusable is sent.
pub fn read_shared_ca_bundle(paths: &HostPaths) -> Result<CaBundle, PkiError> {
    ca::read_shared_ca_bundle(paths)
}

/// A client identity that a signer elsewhere issues through a CSR: the key
/// is made on this node (0600 at `key_path`, kept across runs so that a
/// request lost to a crash is simply made again) and never leaves it.
/// Returns the key and a CSR for `common_name` in PEM.
pub fn client_request(key_path: &Path, common_name: &str) -> Result<(String, String), PkiError> {
    let existing = cert::read_optional(key_path)?
        .and_then(|pem| String::from_utf8(pem).ok())
        .filter(|pem| rcgen::KeyPair::from_pem(pem).is_ok());
    let key_pem = match existing {
        Some(pem) => pem,
        None => {
            let pem = cert::generate_key(common_name)?.serialize_pem();
            cert::write_key(key_path, &pem)?;
            pem
        }
    };
    let key = cert::parse_key(key_path, key_pem.as_bytes())?;
    let csr = cert::client_request(common_name, &key)?;
    Ok((key_pem, csr))
}

/// Why the requested client certificate at `cert_path` (key at
/// `key_path`) must be asked for again: missing, unreadable, not the key's,
/// not signed by the CA at `ca_path`, not `common_name`, or within
/// [`RENEW_BEFORE`] of expiry. `None` when it still serves.
pub fn requested_client_stale(
    cert_path: &Path,
    key_path: &Path,
    ca_path: &Path,
    common_name: &str,
) -> Result<Option<String>, PkiError> {
    let (Some(cert), Some(key)) = (
        cert::read_optional(cert_path)?,
        cert::read_optional(key_path)?,
    ) else {
        return Ok(Some("no certificate yet".into()));
    };
    let ca = cert::read_optional(ca_path)?.ok_or_else(|| PkiError::CaMissing {
        ca: CaKind::Cluster,
        cert: ca_path.to_path_buf(),
    })?;
    Ok(
        leaf::assess_requested_client(&cert, &key, &ca, common_name, OffsetDateTime::now_utc())
            .map(|reason| reason.to_string()),
    )
}

/// PEM material for a kubeconfig: the client cert and key, and the cluster
/// CA to trust the API server with.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientCredentials {
    pub client: ClientCert,
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

impl std::fmt::Debug for ClientCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCredentials")
            .field("client", &self.client)
            .field("cert_pem", &self.cert_pem)
            .field("ca_pem", &self.ca_pem)
            .finish_non_exhaustive()
    }
}

/// Reads one client identity issued by [`ensure_node_certs`].
pub fn read_client_credentials(
    paths: &HostPaths,
    client: ClientCert,
) -> Result<ClientCredentials, PkiError> {
    let pki = PkiPaths::new(paths);
    let pair = pki.client(client);
    let read_text = |path: &Path, missing: fn(&Path) -> PkiError| {
        let bytes = cert::read_optional(path)?.ok_or_else(|| missing(path))?;
        String::from_utf8(bytes).map_err(|_| PkiError::BadCert {
            path: path.to_path_buf(),
            reason: "not UTF-8 text".into(),
        })
    };
    let client_missing = |path: &Path| PkiError::ClientCertMissing {
        path: path.to_path_buf(),
    };
    let ca_missing = |path: &Path| PkiError::CaMissing {
        ca: CaKind::Cluster,
        cert: path.to_path_buf(),
    };
    Ok(ClientCredentials {
        client,
        cert_pem: read_text(&pair.cert, client_missing)?,
        key_pem: read_text(&pair.key, client_missing)?,
        ca_pem: read_text(&pki.ca(CaKind::Cluster).cert, ca_missing)?,
    })
}
