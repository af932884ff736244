//! The join protocol: how a booting node gets what it needs from the nodes
//! already running (`cluster-agent serve-join`), authenticated both ways by
//! the cluster's join secret and bound to one TLS session.
//!
//! One exchange, `POST /v1/join` over TLS 1.3:
//! * the client sends who it is, what it wants, a timestamp, a fresh nonce
//!   and a *proof*: HMAC-SHA256 under a key derived from the join secret over
//!   all of that **and the TLS session's exporter value**;
//! * the server checks the proof (constant time), the clock, the nonce, that
//!   the node is listed in cluster.yaml and connects from its own address,
//!   and that its roles entitle it to what it asked for;
//! * the answer is sealed with ChaCha20-Poly1305 under a second key derived
//!   from the join secret, with the same exporter value, the client's nonce,
//!   node and purpose as associated data. The client trusts nothing it
//!   received before that seal opens.
//!
//! Neither side ever sends the secret, and a captured exchange is useless on
//! any other TLS session. `docs/join-protocol.md` has the reasoning and the
//! comparison with kubeadm's token discovery.

pub mod client;
pub mod keys;
pub mod server;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::ceph::CephBootstrap;
use crate::config::{ClusterConfig, NodeRole, NodeSpec};
use crate::pki::CaBundle;

pub use client::JoinClient;
pub use keys::JoinKeys;

/// Seconds since the Unix epoch: request timestamps.
pub(crate) fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The join services a node asks for `purpose`: every other node that holds
/// that material — ceph-mon nodes for Ceph, control-plane nodes otherwise —
/// in cluster.yaml's order.
pub fn servers_for(config: &ClusterConfig, me: &NodeSpec, purpose: Purpose) -> Vec<SocketAddr> {
    let holders = match purpose {
        Purpose::CephMon => NodeRole::CephMon,
        Purpose::ControlPlane | Purpose::Worker => NodeRole::ControlPlane,
    };
    crate::role::ordered_nodes(config, holders)
        .into_iter()
        .filter(|n| n.name != me.name)
        .map(|n| SocketAddr::new(IpAddr::V4(n.ip), config.cluster.bootstrap.join_port))
        .collect()
}

/// The one route that hands out material.
pub const JOIN_PATH: &str = "/v1/join";
/// Unauthenticated liveness for operators and load balancers; says nothing.
pub const HEALTH_PATH: &str = "/healthz";
pub const PROTOCOL_VERSION: u32 = 1;
/// RFC 5705/8446 exporter label; both sides derive the same 32 bytes from
/// the TLS 1.3 session, and every proof and seal covers them.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-cluster-agent-join-v1";
pub const EXPORTER_LEN: usize = 32;
pub const NONCE_LEN: usize = 16;
/// Requests are small JSON objects; anything larger is not ours.
pub const MAX_REQUEST_BYTES: usize = 4096;
/// How far a request's timestamp may be from the server's clock. Nodes run
/// NTP (Flatcar's timesyncd); a few minutes absorb a cold RTC at first boot.
pub const MAX_CLOCK_SKEW_SECS: i64 = 300;

/// What a joining node asks for. The server hands each only to nodes whose
/// roles need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Purpose {
    /// API endpoint, cluster CA, a bootstrap token.
    Worker,
    /// The shared CA keys, the etcd CA and the service-account key pair.
    ControlPlane,
    /// The Ceph fsid and the keyring a new monitor's store starts with.
    CephMon,
}

impl Purpose {
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Worker => "worker",
            Purpose::ControlPlane => "control-plane",
            Purpose::CephMon => "ceph-mon",
        }
    }
}

impl fmt::Display for Purpose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The client's request body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    pub version: u32,
    pub node: String,
    pub purpose: Purpose,
    /// Seconds since the Unix epoch.
    pub timestamp: i64,
    /// Base64 of [`NONCE_LEN`] random bytes.
    pub nonce: String,
    /// Base64 of the HMAC-SHA256 proof.
    pub proof: String,
}

/// The server's answer to an authenticated request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealedAnswer {
    pub version: u32,
    /// Base64 of the 12-byte AEAD nonce.
    pub nonce: String,
    /// Base64 of ciphertext and tag of a JSON [`Material`].
    pub sealed: String,
}

/// Every refusal: a reason for the operator and nothing else.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Refusal {
    pub error: String,
}

/// What a worker needs to TLS-bootstrap its kubelet.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerMaterial {
    /// `https://host:port` of the API server.
    pub api_server: String,
    pub ca_pem: String,
    /// `[a-z0-9]{6}.[a-z0-9]{16}`.
    pub bootstrap_token: String,
    /// RFC 3339.
    pub token_expires: String,
}

impl fmt::Debug for WorkerMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerMaterial")
            .field("api_server", &self.api_server)
            .field("token_expires", &self.token_expires)
            .finish_non_exhaustive()
    }
}

/// The sealed payload, tagged by purpose so an answer for one purpose can
/// never be read as another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "purpose", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Material {
    Worker(WorkerMaterial),
    ControlPlane { cas: CaBundle },
    CephMon(CephBootstrap),
}

impl Material {
    pub fn purpose(&self) -> Purpose {
        match self {
            Material::Worker(_) => Purpose::Worker,
            Material::ControlPlane { .. } => Purpose::ControlPlane,
            Material::CephMon(_) => Purpose::CephMon,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("cannot read the join secret {}: {source}", path.display())]
    SecretRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the join secret {} is unusable: {reason}; write a new one with `cluster-agent gen-join-secret` and distribute it to every node",
        path.display()
    )]
    SecretInvalid { path: PathBuf, reason: String },
    #[error(
        "the join secret {} is readable by group or others (mode {mode:o}); run `chmod 600` on it",
        path.display()
    )]
    SecretExposed { path: PathBuf, mode: u32 },
    #[error("join service at {server}: {reason}")]
    Server { server: String, reason: String },
    #[error("join service at {server} refused this node ({status}): {reason}")]
    Refused {
        server: String,
        status: u16,
        reason: String,
    },
    #[error(
        "the answer from {server} failed authentication: it does not hold this cluster's join secret, or the connection was tampered with; nothing it sent was used"
    )]
    Unauthenticated { server: String },
    #[error("cannot serve on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "no join service served {purpose} material within {waited:.1?} (last round: {failures}); check that a control-plane node is up and reachable on the join port, and that this node's join secret is the cluster's"
    )]
    NoServer {
        purpose: Purpose,
        waited: std::time::Duration,
        failures: String,
    },
    #[error(
        "this node holds the worker join secret, which cannot ask for {purpose} material; a node with that role needs the cluster's join secret (re-render its Ignition config)"
    )]
    NotEntitled { purpose: Purpose },
    #[error("TLS setup: {0}")]
    Tls(String),
}
