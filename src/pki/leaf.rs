//! Leaf certificates of a control-plane node: what each must say, and
//! whether the one on disk still says it.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use rcgen::KeyPair;
use time::OffsetDateTime;

use super::ca::{LoadedCa, load_ca};
use super::cert::{
    CertInfo, LeafProfile, San, generate_key, issue_leaf, read_optional, write_cert, write_key,
};
use super::error::PkiError;
use super::layout::{CaKind, CertKeyPaths, LeafKind, PkiPaths};
use super::{LEAF_VALIDITY, RENEW_BEFORE};
use crate::config::{ClusterConfig, NodeSpec};
use crate::paths::HostPaths;

/// Group that bypasses RBAC. kubeadm ≥ 1.29 puts its admin and
/// kubelet-client certs in `kubeadm:cluster-admins` instead, but that group
/// only has rights through a ClusterRoleBinding kubeadm creates; we do not run
/// kubeadm, so the built-in group is the one that works from the first boot.
pub const MASTERS_GROUP: &str = "system:masters";
/// Every kubelet's group.
pub const NODES_GROUP: &str = "system:nodes";
/// kube-proxy's user: Kubernetes' bootstrap RBAC binds it to the
/// `system:node-proxier` ClusterRole.
pub const KUBE_PROXY_USER: &str = "system:kube-proxy";
/// The floating endpoint keeper's user; the control-plane phase's Role
/// lets it read and write its Lease only.
pub const API_ADDRESS_USER: &str = "cluster-agent:api-address";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReissueReason {
    /// The cert file cannot be parsed.
    Unreadable(String),
    /// The key file is missing or unusable, so a new key was made.
    KeyUnusable,
    /// The cert does not belong to the key next to it.
    KeyMismatch,
    /// Not signed by the current CA (e.g. the CA was imported after the
    /// leaf had been issued by another one).
    WrongIssuer,
    /// Expired or expiring within [`RENEW_BEFORE`].
    Expiring {
        not_after: OffsetDateTime,
    },
    WrongSubject {
        found: String,
    },
    WrongSans {
        missing: Vec<San>,
        unexpected: Vec<San>,
    },
    WrongUsage,
}

impl fmt::Display for ReissueReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReissueReason::Unreadable(why) => write!(f, "unreadable: {why}"),
            ReissueReason::KeyUnusable => f.write_str("private key missing or unusable"),
            ReissueReason::KeyMismatch => f.write_str("does not match its private key"),
            ReissueReason::WrongIssuer => f.write_str("not signed by the current CA"),
            ReissueReason::Expiring { not_after } => write!(f, "expires at {not_after}"),
            ReissueReason::WrongSubject { found } => write!(f, "wrong subject {found}"),
            ReissueReason::WrongSans {
                missing,
                unexpected,
            } => {
                let list = |sans: &[San]| {
                    sans.iter()
                        .map(San::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                write!(
                    f,
                    "SANs differ (missing [{}], unexpected [{}])",
                    list(missing),
                    list(unexpected)
                )
            }
            ReissueReason::WrongUsage => f.write_str("wrong key usage"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeafOutcome {
    Kept,
    Issued,
    Reissued(ReissueReason),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafReport {
    pub items: Vec<(LeafKind, LeafOutcome)>,
}

impl LeafReport {
    pub fn outcome(&self, leaf: LeafKind) -> Option<&LeafOutcome> {
        self.items.iter().find(|(l, _)| *l == leaf).map(|(_, o)| o)
    }

    /// True when nothing was written.
    pub fn unchanged(&self) -> bool {
        self.items.iter().all(|(_, o)| *o == LeafOutcome::Kept)
    }
}

/// A plain client identity: `common_name` in `organization`, no SANs.
fn client_profile(common_name: &str, organization: Option<&str>) -> LeafProfile {
    LeafProfile {
        common_name: common_name.to_owned(),
        organizations: organization.into_iter().map(str::to_owned).collect(),
        sans: BTreeSet::new(),
        server_auth: false,
        client_auth: true,
    }
}

/// Why the client certificate `cert_pem` no longer serves as
/// `common_name` (no organisation) with `key_pem` under the CA `ca_pem`;
/// `None` when it still does. For identities a signer elsewhere issues
/// through a CSR, so that the node knows when to ask again.
pub(crate) fn assess_requested_client(
    cert_pem: &[u8],
    key_pem: &[u8],
    ca_pem: &[u8],
    common_name: &str,
    now: OffsetDateTime,
) -> Option<ReissueReason> {
    let Some(key) = std::str::from_utf8(key_pem)
        .ok()
        .and_then(|pem| KeyPair::from_pem(pem).ok())
    else {
        return Some(ReissueReason::KeyUnusable);
    };
    let (cert, ca) = match (CertInfo::parse_pem(cert_pem), CertInfo::parse_pem(ca_pem)) {
        (Ok(cert), Ok(ca)) => (cert, ca),
        (Err(why), _) | (_, Err(why)) => return Some(ReissueReason::Unreadable(why)),
    };
    assess(&client_profile(common_name, None), &cert, &key, &ca, now)
}

/// The SANs and names every leaf of `node` must carry.
pub(crate) fn profile(
    leaf: LeafKind,
    config: &ClusterConfig,
    node: &NodeSpec,
    etcd_listens_on_loopback: bool,
) -> Result<LeafProfile, PkiError> {
    let client = client_profile;
    let node_sans = || BTreeSet::from([San::dns(&node.hostname), San::Ip(IpAddr::V4(node.ip))]);
    Ok(match leaf {
        LeafKind::ApiServer => {
            let networking = &config.cluster.networking;
            let mut sans = BTreeSet::from([
                San::host(&config.cluster.control_plane_endpoint.host),
                San::dns(&node.hostname),
                San::Ip(IpAddr::V4(first_service_ip(config)?)),
                San::dns("kubernetes"),
                San::dns("kubernetes.default"),
                San::dns("kubernetes.default.svc"),
                San::dns(&format!("kubernetes.default.svc.{}", networking.dns_domain)),
            ]);
            // Every control-plane IP, not only this node's: a client that
            // picked any master's address keeps working when it fails over.
            sans.extend(
                config
                    .nodes
                    .iter()
                    .filter(|n| n.is_control_plane())
                    .map(|n| San::Ip(IpAddr::V4(n.ip))),
            );
            // Clients behind a node's API balancer dial its address.
            sans.extend(
                config
                    .nodes
                    .iter()
                    .map(|n| San::Ip(crate::balancer::listen_addr(n).ip())),
            );
            LeafProfile {
                common_name: "kube-apiserver".into(),
                organizations: vec![],
                sans,
                server_auth: true,
                client_auth: false,
            }
        }
        LeafKind::ApiServerKubeletClient => {
            client("kube-apiserver-kubelet-client", Some(MASTERS_GROUP))
        }
        LeafKind::ApiServerEtcdClient => client("kube-apiserver-etcd-client", None),
        LeafKind::FrontProxyClient => client("front-proxy-client", None),
        LeafKind::EtcdHealthcheckClient => client("kube-etcd-healthcheck-client", None),
        LeafKind::Admin => client("kubernetes-admin", Some(MASTERS_GROUP)),
        LeafKind::ControllerManager => client("system:kube-controller-manager", None),
        LeafKind::Scheduler => client("system:kube-scheduler", None),
        // What the Node authorizer and NodeRestriction know a kubelet by;
        // the name is the one the kubelet registers (--hostname-override).
        LeafKind::Kubelet => client(&format!("system:node:{}", node.name), Some(NODES_GROUP)),
        LeafKind::KubeProxy => client(KUBE_PROXY_USER, None),
        LeafKind::ApiAddress => client(API_ADDRESS_USER, None),
        LeafKind::EtcdServer => {
            let mut sans = node_sans();
            if etcd_listens_on_loopback {
                sans.extend([
                    San::dns("localhost"),
                    San::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST)),
                    San::Ip(IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)),
                ]);
            }
            LeafProfile {
                common_name: node.hostname.clone(),
                organizations: vec![],
                sans,
                server_auth: true,
                // etcd's gRPC gateway dials etcd itself presenting this cert
                // as a client cert, so it needs clientAuth too (as kubeadm's).
                client_auth: true,
            }
        }
        LeafKind::EtcdPeer => LeafProfile {
            common_name: node.hostname.clone(),
            organizations: vec![],
            sans: node_sans(),
            server_auth: true,
            client_auth: true,
        },
    })
}

/// The `kubernetes` Service's ClusterIP: the first address of the range.
fn first_service_ip(config: &ClusterConfig) -> Result<Ipv4Addr, PkiError> {
    let cidr = config.cluster.networking.service_cidr;
    u32::from(cidr.network())
        .checked_add(1)
        .map(Ipv4Addr::from)
        .filter(|ip| cidr.contains(ip))
        .ok_or_else(|| PkiError::BadSan {
            leaf: LeafKind::ApiServer,
            reason: format!("service CIDR {cidr} has no first host address"),
        })
}

fn assess(
    wanted: &LeafProfile,
    cert: &CertInfo,
    key: &KeyPair,
    ca: &CertInfo,
    now: OffsetDateTime,
) -> Option<ReissueReason> {
    if !cert.matches_key(key) {
        return Some(ReissueReason::KeyMismatch);
    }
    if !cert.signed_by(ca) {
        return Some(ReissueReason::WrongIssuer);
    }
    if cert.not_after - now < RENEW_BEFORE {
        return Some(ReissueReason::Expiring {
            not_after: cert.not_after,
        });
    }
    if cert.common_name.as_deref() != Some(wanted.common_name.as_str())
        || cert.organizations != wanted.organizations
    {
        return Some(ReissueReason::WrongSubject {
            found: format!(
                "CN={} O={:?}",
                cert.common_name.as_deref().unwrap_or(""),
                cert.organizations
            ),
        });
    }
    if cert.sans != wanted.sans {
        return Some(ReissueReason::WrongSans {
            missing: wanted.sans.difference(&cert.sans).cloned().collect(),
            unexpected: cert.sans.difference(&wanted.sans).cloned().collect(),
        });
    }
    if cert.is_ca
        || cert.server_auth != wanted.server_auth
        || cert.client_auth != wanted.client_auth
    {
        return Some(ReissueReason::WrongUsage);
    }
    None
}

pub(crate) fn ensure_node_certs_at(
    paths: &HostPaths,
    config: &ClusterConfig,
    node: &NodeSpec,
    etcd_listens_on_loopback: bool,
    now: OffsetDateTime,
) -> Result<LeafReport, PkiError> {
    if !node.is_control_plane() {
        return Err(PkiError::NotControlPlane {
            node: node.name.clone(),
        });
    }
    let pki = PkiPaths::new(paths);
    // Load (and thereby check) every CA before touching any leaf.
    let cluster = load_ca(&pki, CaKind::Cluster, now)?;
    let front_proxy = load_ca(&pki, CaKind::FrontProxy, now)?;
    let etcd = load_ca(&pki, CaKind::Etcd, now)?;
    let ca_of = |kind: CaKind| match kind {
        CaKind::Cluster => &cluster,
        CaKind::FrontProxy => &front_proxy,
        CaKind::Etcd => &etcd,
    };

    let mut items = Vec::new();
    for leaf in LeafKind::ALL {
        let wanted = profile(leaf, config, node, etcd_listens_on_loopback)?;
        let outcome = ensure_leaf(
            &pki.leaf(leaf),
            leaf.base_name(),
            &wanted,
            ca_of(leaf.issuer()),
            now,
            generate_key,
        )?;
        items.push((leaf, outcome));
    }
    Ok(LeafReport { items })
}

/// What a cert/key pair on disk is worth against its profile.
pub(crate) enum Verdict {
    Current,
    Missing,
    Stale(ReissueReason),
}

/// The pair at `paths` against `wanted` from `ca`, with its key if that
/// is usable.
pub(crate) fn assess_pair(
    paths: &CertKeyPaths,
    wanted: &LeafProfile,
    ca: &LoadedCa,
    now: OffsetDateTime,
) -> Result<(Verdict, Option<KeyPair>), PkiError> {
    // A leaf's key is worth nothing on its own: if it is unusable, make a new
    // one rather than stop the node.
    let key = read_optional(&paths.key)?
        .and_then(|pem| String::from_utf8(pem).ok())
        .and_then(|pem| KeyPair::from_pem(&pem).ok());
    let verdict = match (read_optional(&paths.cert)?, &key) {
        (None, _) => Verdict::Missing,
        (Some(_), None) => Verdict::Stale(ReissueReason::KeyUnusable),
        (Some(pem), Some(key)) => match CertInfo::parse_pem(&pem) {
            Err(why) => Verdict::Stale(ReissueReason::Unreadable(why)),
            Ok(info) => {
                assess(wanted, &info, key, &ca.info, now).map_or(Verdict::Current, Verdict::Stale)
            }
        },
    };
    Ok((verdict, key))
}

/// The certificate at `paths` as `wanted`, from `ca`: kept when it
/// still is, else (re)issued; `new_key` makes a key where none is usable.
pub(crate) fn ensure_leaf(
    paths: &CertKeyPaths,
    what: &str,
    wanted: &LeafProfile,
    ca: &LoadedCa,
    now: OffsetDateTime,
    new_key: fn(&str) -> Result<KeyPair, PkiError>,
) -> Result<LeafOutcome, PkiError> {
    let (verdict, existing_key) = assess_pair(paths, wanted, ca, now)?;
    let reason = match verdict {
        Verdict::Current => return Ok(LeafOutcome::Kept),
        Verdict::Missing => None,
        Verdict::Stale(reason) => Some(reason),
    };

    // Re-issuing keeps a usable key, like `kubeadm certs renew`; the key is
    // written before the cert, so a crash in between leaves a mismatch that
    // the next run repairs.
    let key = match existing_key {
        Some(key) => key,
        None => {
            let key = new_key(what)?;
            write_key(&paths.key, &key.serialize_pem())?;
            key
        }
    };
    let pem = issue_leaf(wanted, &key, &ca.cert_pem, &ca.key, now, LEAF_VALIDITY)?;
    write_cert(&paths.cert, &pem)?;
    Ok(reason.map_or(LeafOutcome::Issued, LeafOutcome::Reissued))
}
