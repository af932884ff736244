//! Where every PKI file lives, laid out like kubeadm's `/etc/kubernetes/pki`
//! so that tooling and runbooks written for kubeadm clusters apply unchanged.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::paths::HostPaths;

/// The PKI directory as seen on the host (i.e. in rendered manifests and unit
/// files, which are read by processes that do not know about `--root`).
pub const PKI_DIR: &str = "/etc/kubernetes/pki";

/// The three certificate authorities of a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CaKind {
    /// `ca.*`: signs the API server, kubelet client and component client certs.
    Cluster,
    /// `front-proxy-ca.*`: signs the aggregation-layer client cert only.
    FrontProxy,
    /// `etcd/ca.*`: trusted by etcd only, so a cluster client cert cannot
    /// talk to etcd directly.
    Etcd,
}

impl CaKind {
    pub const ALL: [CaKind; 3] = [CaKind::Cluster, CaKind::FrontProxy, CaKind::Etcd];

    /// Path of the cert/key pair relative to the PKI dir, without extension.
    pub fn base_name(self) -> &'static str {
        match self {
            CaKind::Cluster => "ca",
            CaKind::FrontProxy => "front-proxy-ca",
            CaKind::Etcd => "etcd/ca",
        }
    }

    /// Common name of a CA we generate; the names kubeadm uses.
    pub(crate) fn common_name(self) -> &'static str {
        match self {
            CaKind::Cluster => "kubernetes",
            CaKind::FrontProxy => "front-proxy-ca",
            CaKind::Etcd => "etcd-ca",
        }
    }
}

impl fmt::Display for CaKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CaKind::Cluster => "cluster CA",
            CaKind::FrontProxy => "front-proxy CA",
            CaKind::Etcd => "etcd CA",
        })
    }
}

/// Every leaf certificate a control-plane node holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LeafKind {
    ApiServer,
    ApiServerKubeletClient,
    ApiServerEtcdClient,
    FrontProxyClient,
    EtcdServer,
    EtcdPeer,
    EtcdHealthcheckClient,
    Admin,
    ControllerManager,
    Scheduler,
    /// The master's kubelet, as `system:node:<name>`.
    Kubelet,
    /// The master's kube-proxy, as `system:kube-proxy` (a worker's comes
    /// from a CSR instead: its node holds no CA key).
    KubeProxy,
    /// The floating endpoint's keeper (`crate::floating`): it may hold one
    /// Lease, nothing else.
    ApiAddress,
}

impl LeafKind {
    pub const ALL: [LeafKind; 13] = [
        LeafKind::ApiServer,
        LeafKind::ApiServerKubeletClient,
        LeafKind::ApiServerEtcdClient,
        LeafKind::FrontProxyClient,
        LeafKind::EtcdServer,
        LeafKind::EtcdPeer,
        LeafKind::EtcdHealthcheckClient,
        LeafKind::Admin,
        LeafKind::ControllerManager,
        LeafKind::Scheduler,
        LeafKind::Kubelet,
        LeafKind::KubeProxy,
        LeafKind::ApiAddress,
    ];

    /// Path of the cert/key pair relative to the PKI dir, without extension.
    pub fn base_name(self) -> &'static str {
        match self {
            LeafKind::ApiServer => "apiserver",
            LeafKind::ApiServerKubeletClient => "apiserver-kubelet-client",
            LeafKind::ApiServerEtcdClient => "apiserver-etcd-client",
            LeafKind::FrontProxyClient => "front-proxy-client",
            LeafKind::EtcdServer => "etcd/server",
            LeafKind::EtcdPeer => "etcd/peer",
            LeafKind::EtcdHealthcheckClient => "etcd/healthcheck-client",
            LeafKind::Admin => "clients/admin",
            LeafKind::ControllerManager => "clients/controller-manager",
            LeafKind::Scheduler => "clients/scheduler",
            LeafKind::Kubelet => "clients/kubelet",
            LeafKind::KubeProxy => "clients/kube-proxy",
            LeafKind::ApiAddress => "clients/api-address",
        }
    }

    pub fn issuer(self) -> CaKind {
        match self {
            LeafKind::ApiServer
            | LeafKind::ApiServerKubeletClient
            | LeafKind::Admin
            | LeafKind::ControllerManager
            | LeafKind::Scheduler
            | LeafKind::Kubelet
            | LeafKind::KubeProxy
            | LeafKind::ApiAddress => CaKind::Cluster,
            LeafKind::FrontProxyClient => CaKind::FrontProxy,
            LeafKind::ApiServerEtcdClient
            | LeafKind::EtcdServer
            | LeafKind::EtcdPeer
            | LeafKind::EtcdHealthcheckClient => CaKind::Etcd,
        }
    }
}

impl fmt::Display for LeafKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.base_name())
    }
}

/// The client identities whose certs are later wrapped into kubeconfigs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ClientCert {
    Admin,
    ControllerManager,
    Scheduler,
    Kubelet,
    KubeProxy,
    ApiAddress,
}

impl ClientCert {
    pub const ALL: [ClientCert; 6] = [
        ClientCert::Admin,
        ClientCert::ControllerManager,
        ClientCert::Scheduler,
        ClientCert::Kubelet,
        ClientCert::KubeProxy,
        ClientCert::ApiAddress,
    ];

    pub fn leaf(self) -> LeafKind {
        match self {
            ClientCert::Admin => LeafKind::Admin,
            ClientCert::ControllerManager => LeafKind::ControllerManager,
            ClientCert::Scheduler => LeafKind::Scheduler,
            ClientCert::Kubelet => LeafKind::Kubelet,
            ClientCert::KubeProxy => LeafKind::KubeProxy,
            ClientCert::ApiAddress => LeafKind::ApiAddress,
        }
    }
}

/// A certificate and the private key that goes with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertKeyPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// File paths inside a PKI directory. Build it with [`PkiPaths::new`] to read
/// and write files (honours `--root`), or with [`PkiPaths::on_host`] to get
/// the paths to put into manifests and flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PkiPaths {
    dir: PathBuf,
}

impl PkiPaths {
    /// The node's PKI dir under `--root`.
    pub fn new(paths: &HostPaths) -> PkiPaths {
        PkiPaths {
            dir: paths.host(PKI_DIR),
        }
    }

    /// The PKI dir as the host's processes see it (`/etc/kubernetes/pki`).
    pub fn on_host() -> PkiPaths {
        PkiPaths::at(Path::new(PKI_DIR))
    }

    /// Any directory laid out like the PKI dir (e.g. CA material to import).
    pub fn at(dir: &Path) -> PkiPaths {
        PkiPaths {
            dir: dir.to_path_buf(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn ca(&self, ca: CaKind) -> CertKeyPaths {
        self.pair(ca.base_name())
    }

    pub fn leaf(&self, leaf: LeafKind) -> CertKeyPaths {
        self.pair(leaf.base_name())
    }

    pub fn client(&self, client: ClientCert) -> CertKeyPaths {
        self.leaf(client.leaf())
    }

    /// `sa.key`: signs service-account tokens (kube-apiserver
    /// `--service-account-signing-key-file`).
    pub fn sa_key(&self) -> PathBuf {
        self.dir.join("sa.key")
    }

    /// `sa.pub`: verifies them (`--service-account-key-file`).
    pub fn sa_pub(&self) -> PathBuf {
        self.dir.join("sa.pub")
    }

    fn pair(&self, base: &str) -> CertKeyPaths {
        CertKeyPaths {
            cert: self.dir.join(format!("{base}.crt")),
            key: self.dir.join(format!("{base}.key")),
        }
    }
}
