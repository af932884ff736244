//! PKI tests against the real `openssl` CLI: what it accepts is what etcd,
//! kube-apiserver and kubectl will accept.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration as StdDuration;

use time::{Duration, OffsetDateTime};

use super::*;
use crate::config::{
    BootstrapSettings, ClusterSettings, Endpoint, EtcdSettings, Networking, NodeRole,
};

// ---------------------------------------------------------------- fixtures

fn node(name: &str, ip: [u8; 4], roles: &[NodeRole]) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        hostname: format!("{name}.lab.example"),
        ip: Ipv4Addr::from(ip),
        roles: roles.iter().copied().collect(),
        mac_addresses: vec![],
    }
}

fn cluster() -> ClusterConfig {
    let cp = [NodeRole::ControlPlane];
    ClusterConfig {
        source_dir: PathBuf::from("/nonexistent"),
        cluster: ClusterSettings {
            name: "lab".into(),
            k8s_version: "1.37.0".into(),
            control_plane_endpoint: Endpoint {
                host: "api.lab.example".into(),
                port: 6443,
            },
            floating_endpoint: None,
            networking: Networking {
                pod_cidr: "10.244.0.0/16".parse().unwrap(),
                service_cidr: "10.96.0.0/12".parse().unwrap(),
                dns_domain: "cluster.local".into(),
                gateway: None,
                dns_servers: vec![],
                prefix_length: 24,
                cni: Default::default(),
            },
            bootstrap: BootstrapSettings {
                token_ttl: StdDuration::from_secs(3600),
                join_port: 9443,
            },
            etcd: EtcdSettings {
                client_port: 2379,
                peer_port: 2380,
            },
            containerd: crate::config::ContainerdSettings {
                sandbox_image: crate::config::ImageReference::parse("registry.k8s.io/pause:3.10.1")
                    .unwrap(),
            },
            kubelet: Default::default(),
            ceph: None,
            provisioning: Default::default(),
        },
        nodes: vec![
            node("m1", [192, 168, 1, 11], &cp),
            node("m2", [192, 168, 1, 12], &cp),
            node("m3", [192, 168, 1, 13], &cp),
            node("w1", [192, 168, 1, 21], &[NodeRole::Worker]),
        ],
        warnings: vec![],
    }
}

/// One simulated host: a temp dir used as `--root`.
struct Host {
    _dir: tempfile::TempDir,
    paths: HostPaths,
}

impl Host {
    fn new() -> Host {
        let dir = tempfile::tempdir().unwrap();
        let paths = HostPaths::new(dir.path(), None, None);
        Host { _dir: dir, paths }
    }

    fn pki(&self) -> PkiPaths {
        PkiPaths::new(&self.paths)
    }

    fn cas(&self, source: CaSource<'_>) -> CaReport {
        ensure_cluster_cas(&self.paths, source).unwrap()
    }

    fn certs(&self, config: &ClusterConfig, node: &str, loopback: bool) -> LeafReport {
        self.certs_at(config, node, loopback, OffsetDateTime::now_utc())
    }

    fn certs_at(
        &self,
        config: &ClusterConfig,
        node: &str,
        loopback: bool,
        now: OffsetDateTime,
    ) -> LeafReport {
        let node = config.node(node).unwrap();
        leaf::ensure_node_certs_at(&self.paths, config, node, loopback, now).unwrap()
    }

    /// A control-plane node with everything issued.
    fn bootstrapped(node: &str) -> Host {
        let host = Host::new();
        host.cas(CaSource::Generate);
        host.certs(&cluster(), node, true);
        host
    }

    /// Every file under the PKI dir, by relative path.
    fn snapshot(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        let mut files = BTreeMap::new();
        collect(self.pki().dir(), self.pki().dir(), &mut files);
        files
    }

    fn ca_files(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        self.snapshot()
            .into_iter()
            .filter(|(p, _)| shared_file_names().contains(p))
            .collect()
    }
}

fn collect(base: &Path, dir: &Path, files: &mut BTreeMap<PathBuf, Vec<u8>>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect(base, &path, files);
        } else {
            let rel = path.strip_prefix(base).unwrap().to_path_buf();
            files.insert(rel, fs::read(&path).unwrap());
        }
    }
}

fn shared_file_names() -> BTreeSet<PathBuf> {
    let layout = PkiPaths::at(Path::new(""));
    let mut names: BTreeSet<PathBuf> = CaKind::ALL
        .into_iter()
        .flat_map(|k| {
            let p = layout.ca(k);
            [p.cert, p.key]
        })
        .collect();
    names.extend([layout.sa_key(), layout.sa_pub()]);
    names
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn openssl(args: &[&str], path: &Path) -> (bool, String) {
    let out = Command::new(crate::test_tools::require_tool("openssl", "openssl"))
        .args(args)
        .arg(path)
        .output()
        .expect("run openssl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `openssl verify` with the purpose the leaf is for, so the EKUs are
/// checked the way TLS stacks check them, not only the signature.
fn assert_verifies(pki: &PkiPaths, ca_dir: &PkiPaths, leaf: LeafKind) {
    let ca = ca_dir.ca(leaf.issuer()).cert;
    let cert = pki.leaf(leaf).cert;
    let purposes: &[&str] = match leaf {
        LeafKind::ApiServer => &["sslserver"],
        LeafKind::EtcdServer | LeafKind::EtcdPeer => &["sslserver", "sslclient"],
        _ => &["sslclient"],
    };
    for purpose in purposes {
        let ca_arg = ca.to_str().unwrap();
        let (ok, text) = openssl(&["verify", "-purpose", purpose, "-CAfile", ca_arg], &cert);
        assert!(ok && text.contains(": OK"), "{leaf} ({purpose}): {text}");
    }
}

fn extensions(path: &Path) -> String {
    let args = [
        "x509",
        "-noout",
        "-ext",
        "subjectAltName,extendedKeyUsage,basicConstraints,keyUsage",
        "-in",
    ];
    let (ok, text) = openssl(&args, path);
    assert!(ok, "{text}");
    text
}

fn subject(path: &Path) -> String {
    let (ok, text) = openssl(
        &["x509", "-noout", "-subject", "-nameopt", "RFC2253", "-in"],
        path,
    );
    assert!(ok, "{text}");
    text.trim().to_owned()
}

/// Whether `openssl x509 -checkend` says the cert is still valid `days` from now.
fn valid_in(path: &Path, days: i64) -> bool {
    let secs = (days * 86_400).to_string();
    openssl(&["x509", "-noout", "-checkend", &secs, "-in"], path).0
}

fn assert_contains_all(text: &str, wanted: &[&str], absent: &[&str]) {
    for w in wanted {
        assert!(text.contains(w), "missing {w:?} in:\n{text}");
    }
    for a in absent {
        assert!(!text.contains(a), "unexpected {a:?} in:\n{text}");
    }
}

fn assert_all(report: &LeafReport, pred: impl Fn(&LeafOutcome) -> bool, what: &str) {
    assert_eq!(report.items.len(), LeafKind::ALL.len());
    for (leaf, outcome) in &report.items {
        assert!(pred(outcome), "{leaf}: expected {what}, got {outcome:?}");
    }
}

// ------------------------------------------------------------------- tests

#[test]
fn fresh_node_gets_kubeadm_layout_and_modes() {
    let host = Host::new();
    let cas = host.cas(CaSource::Generate);
    assert!(
        cas.items.iter().all(|(_, o)| *o == CaOutcome::Generated),
        "{cas:?}"
    );
    let leaves = host.certs(&cluster(), "m1", true);
    assert_all(&leaves, |o| *o == LeafOutcome::Issued, "Issued");

    let expected: BTreeSet<PathBuf> = [
        "ca.crt",
        "ca.key",
        "apiserver.crt",
        "apiserver.key",
        "apiserver-kubelet-client.crt",
        "apiserver-kubelet-client.key",
        "apiserver-etcd-client.crt",
        "apiserver-etcd-client.key",
        "front-proxy-ca.crt",
        "front-proxy-ca.key",
        "front-proxy-client.crt",
        "front-proxy-client.key",
        "sa.key",
        "sa.pub",
        "etcd/ca.crt",
        "etcd/ca.key",
        "etcd/server.crt",
        "etcd/server.key",
        "etcd/peer.crt",
        "etcd/peer.key",
        "etcd/healthcheck-client.crt",
        "etcd/healthcheck-client.key",
        "clients/admin.crt",
        "clients/admin.key",
        "clients/controller-manager.crt",
        "clients/controller-manager.key",
        "clients/scheduler.crt",
        "clients/scheduler.key",
        "clients/kubelet.crt",
        "clients/kubelet.key",
        "clients/kube-proxy.crt",
        "clients/kube-proxy.key",
        "clients/api-address.crt",
        "clients/api-address.key",
    ]
    .into_iter()
    .map(PathBuf::from)
    .collect();
    let files = host.snapshot();
    assert_eq!(files.keys().cloned().collect::<BTreeSet<_>>(), expected);
    for rel in files.keys() {
        let path = host.pki().dir().join(rel);
        let want = if rel.extension().unwrap() == "key" {
            0o600
        } else {
            0o644
        };
        assert_eq!(mode(&path), want, "{}", rel.display());
    }
    assert_eq!(
        PkiPaths::on_host().leaf(LeafKind::EtcdServer).cert,
        Path::new("/etc/kubernetes/pki/etcd/server.crt")
    );
}

#[test]
fn every_leaf_chains_to_its_ca_for_its_purpose() {
    let host = Host::bootstrapped("m1");
    for leaf in LeafKind::ALL {
        assert_verifies(&host.pki(), &host.pki(), leaf);
    }
    // And not to another CA: the etcd CA must not vouch for cluster clients.
    let (ok, text) = openssl(
        &[
            "verify",
            "-CAfile",
            host.pki().ca(CaKind::Etcd).cert.to_str().unwrap(),
        ],
        &host.pki().leaf(LeafKind::Admin).cert,
    );
    assert!(!ok, "admin cert verified against the etcd CA: {text}");
}

#[test]
fn cas_are_cas_and_live_ten_years() {
    let host = Host::bootstrapped("m1");
    for kind in CaKind::ALL {
        let cert = host.pki().ca(kind).cert;
        let ext = extensions(&cert);
        assert_contains_all(&ext, &["CA:TRUE", "Certificate Sign"], &[]);
        assert!(valid_in(&cert, 3640), "{kind} shorter than 10 years");
        assert!(!valid_in(&cert, 3660), "{kind} longer than 10 years");
    }
    for leaf in LeafKind::ALL {
        let cert = host.pki().leaf(leaf).cert;
        assert_contains_all(&extensions(&cert), &["CA:FALSE"], &["Certificate Sign"]);
        assert!(valid_in(&cert, 364), "{leaf} shorter than a year");
        assert!(!valid_in(&cert, 366), "{leaf} longer than a year");
    }
}

#[test]
fn sans_and_ekus_match_each_role() {
    let host = Host::bootstrapped("m2");
    let pki = host.pki();
    let cases: &[(LeafKind, &[&str], &[&str])] = &[
        (
            LeafKind::ApiServer,
            &[
                "DNS:api.lab.example",
                "DNS:m2.lab.example",
                "DNS:kubernetes,",
                "DNS:kubernetes.default,",
                "DNS:kubernetes.default.svc,",
                "DNS:kubernetes.default.svc.cluster.local",
                "IP Address:10.96.0.1",
                "IP Address:192.168.1.11",
                "IP Address:192.168.1.12",
                "IP Address:192.168.1.13",
                // Every node's API balancer: clients behind it dial it.
                "IP Address:127.0.0.1",
                "TLS Web Server Authentication",
            ],
            // A worker's own address is not an API server's.
            &["192.168.1.21", "Client Authentication"],
        ),
        (
            LeafKind::EtcdServer,
            &[
                "DNS:m2.lab.example",
                "IP Address:192.168.1.12",
                "DNS:localhost",
                "IP Address:127.0.0.1",
                "IP Address:0:0:0:0:0:0:0:1",
                "TLS Web Server Authentication",
                "TLS Web Client Authentication",
            ],
            &["192.168.1.11"],
        ),
        (
            LeafKind::EtcdPeer,
            &[
                "DNS:m2.lab.example",
                "IP Address:192.168.1.12",
                "TLS Web Server Authentication",
                "TLS Web Client Authentication",
            ],
            &["127.0.0.1", "localhost"],
        ),
    ];
    for (leaf, wanted, absent) in cases {
        assert_contains_all(&extensions(&pki.leaf(*leaf).cert), wanted, absent);
    }
    for leaf in LeafKind::ALL {
        if !matches!(
            leaf,
            LeafKind::ApiServer | LeafKind::EtcdServer | LeafKind::EtcdPeer
        ) {
            let ext = extensions(&pki.leaf(leaf).cert);
            assert_contains_all(
                &ext,
                &["TLS Web Client Authentication"],
                &["Server Authentication", "Subject Alternative Name"],
            );
        }
    }
}

#[test]
fn etcd_server_claims_loopback_only_when_listening_there() {
    let host = Host::new();
    host.cas(CaSource::Generate);
    host.certs(&cluster(), "m1", false);
    let ext = extensions(&host.pki().leaf(LeafKind::EtcdServer).cert);
    assert_contains_all(
        &ext,
        &["IP Address:192.168.1.11"],
        &["127.0.0.1", "localhost"],
    );

    // Starting to listen on loopback later changes the wanted SANs.
    let report = host.certs(&cluster(), "m1", true);
    assert!(matches!(
        report.outcome(LeafKind::EtcdServer),
        Some(LeafOutcome::Reissued(ReissueReason::WrongSans { .. }))
    ));
    let ext = extensions(&host.pki().leaf(LeafKind::EtcdServer).cert);
    assert_contains_all(&ext, &["IP Address:127.0.0.1", "DNS:localhost"], &[]);
}

#[test]
fn client_subjects_are_what_rbac_expects() {
    let host = Host::bootstrapped("m1");
    let cases = [
        (LeafKind::Admin, "CN=kubernetes-admin,O=system:masters"),
        (
            LeafKind::ControllerManager,
            "CN=system:kube-controller-manager",
        ),
        (LeafKind::Scheduler, "CN=system:kube-scheduler"),
        (LeafKind::Kubelet, "CN=system:node:m1,O=system:nodes"),
        (LeafKind::KubeProxy, "CN=system:kube-proxy"),
        (LeafKind::ApiAddress, "CN=cluster-agent:api-address"),
        (
            LeafKind::ApiServerKubeletClient,
            "CN=kube-apiserver-kubelet-client,O=system:masters",
        ),
        (
            LeafKind::ApiServerEtcdClient,
            "CN=kube-apiserver-etcd-client",
        ),
        (LeafKind::FrontProxyClient, "CN=front-proxy-client"),
        (
            LeafKind::EtcdHealthcheckClient,
            "CN=kube-etcd-healthcheck-client",
        ),
        (LeafKind::EtcdServer, "CN=m1.lab.example"),
    ];
    for (leaf, want) in cases {
        assert_eq!(
            subject(&host.pki().leaf(leaf).cert),
            format!("subject={want}")
        );
    }
}

#[test]
fn second_run_keeps_everything_byte_identical() {
    let host = Host::bootstrapped("m1");
    let before = host.snapshot();
    assert!(host.cas(CaSource::Generate).unchanged());
    assert!(host.certs(&cluster(), "m1", true).unchanged());
    assert_eq!(host.snapshot(), before);
}

#[test]
fn changed_node_ip_reissues_exactly_the_leaves_naming_it() {
    let host = Host::bootstrapped("m1");
    let before = host.snapshot();
    let mut config = cluster();
    config.nodes[0].ip = Ipv4Addr::new(192, 168, 1, 111);

    let report = host.certs(&config, "m1", true);
    let naming_ip = [
        LeafKind::ApiServer,
        LeafKind::EtcdServer,
        LeafKind::EtcdPeer,
    ];
    for (leaf, outcome) in &report.items {
        if naming_ip.contains(leaf) {
            let LeafOutcome::Reissued(ReissueReason::WrongSans {
                missing,
                unexpected,
            }) = outcome
            else {
                panic!("{leaf}: {outcome:?}");
            };
            assert_eq!(missing, &[San::Ip("192.168.1.111".parse().unwrap())]);
            assert_eq!(unexpected, &[San::Ip("192.168.1.11".parse().unwrap())]);
            let ext = extensions(&host.pki().leaf(*leaf).cert);
            assert_contains_all(&ext, &["IP Address:192.168.1.111"], &["192.168.1.11\n"]);
            assert_verifies(&host.pki(), &host.pki(), *leaf);
        } else {
            assert_eq!(outcome, &LeafOutcome::Kept, "{leaf}");
        }
    }
    // Re-issue keeps the key (like `kubeadm certs renew`).
    let after = host.snapshot();
    for leaf in naming_ip {
        let key = PathBuf::from(format!("{}.key", leaf.base_name()));
        assert_eq!(before[&key], after[&key], "{leaf} key changed");
    }
    assert!(host.certs(&config, "m1", true).unchanged());
}

#[test]
fn expired_and_expiring_leaves_are_reissued_others_kept() {
    // (age of the leaves in days, whether a run today must re-issue them);
    // leaves live 365 days and are renewed with less than 30 left.
    let cases = [(400, true), (340, true), (300, false)];
    for (age, reissue) in cases {
        let host = Host::new();
        host.cas(CaSource::Generate);
        let issued_at = OffsetDateTime::now_utc() - Duration::days(age);
        host.certs_at(&cluster(), "m1", true, issued_at);
        let expired = age > 365;
        let (ok, _) = openssl(
            &[
                "verify",
                "-CAfile",
                host.pki().ca(CaKind::Cluster).cert.to_str().unwrap(),
            ],
            &host.pki().leaf(LeafKind::ApiServer).cert,
        );
        assert_eq!(
            ok, !expired,
            "age {age}: openssl's view of the planted cert"
        );

        let report = host.certs(&cluster(), "m1", true);
        if reissue {
            assert_all(
                &report,
                |o| matches!(o, LeafOutcome::Reissued(ReissueReason::Expiring { .. })),
                "Reissued(Expiring)",
            );
            for leaf in LeafKind::ALL {
                assert_verifies(&host.pki(), &host.pki(), leaf);
                assert!(
                    valid_in(&host.pki().leaf(leaf).cert, 364),
                    "age {age}: {leaf}"
                );
            }
        } else {
            assert!(report.unchanged(), "age {age}: {report:?}");
        }
    }
}

#[test]
fn leaf_from_another_ca_is_reissued() {
    let host = Host::bootstrapped("m1");
    let stranger = Host::bootstrapped("m1");
    for leaf in [LeafKind::EtcdServer, LeafKind::Admin] {
        let (ours, theirs) = (host.pki().leaf(leaf), stranger.pki().leaf(leaf));
        fs::copy(&theirs.cert, &ours.cert).unwrap();
        fs::copy(&theirs.key, &ours.key).unwrap();
    }
    let report = host.certs(&cluster(), "m1", true);
    for (leaf, outcome) in &report.items {
        if matches!(leaf, LeafKind::EtcdServer | LeafKind::Admin) {
            assert_eq!(outcome, &LeafOutcome::Reissued(ReissueReason::WrongIssuer));
            assert_verifies(&host.pki(), &host.pki(), *leaf);
        } else {
            assert_eq!(outcome, &LeafOutcome::Kept, "{leaf}");
        }
    }
}

#[test]
fn damaged_leaf_files_are_repaired() {
    let host = Host::bootstrapped("m1");
    let pki = host.pki();
    fs::remove_file(pki.leaf(LeafKind::Scheduler).key).unwrap();
    fs::write(pki.leaf(LeafKind::EtcdPeer).cert, "garbage").unwrap();
    fs::remove_file(pki.leaf(LeafKind::FrontProxyClient).cert).unwrap();
    let report = host.certs(&cluster(), "m1", true);
    assert_eq!(
        report.outcome(LeafKind::Scheduler),
        Some(&LeafOutcome::Reissued(ReissueReason::KeyUnusable))
    );
    assert!(matches!(
        report.outcome(LeafKind::EtcdPeer),
        Some(LeafOutcome::Reissued(ReissueReason::Unreadable(_)))
    ));
    assert_eq!(
        report.outcome(LeafKind::FrontProxyClient),
        Some(&LeafOutcome::Issued)
    );
    for leaf in [
        LeafKind::Scheduler,
        LeafKind::EtcdPeer,
        LeafKind::FrontProxyClient,
    ] {
        assert_verifies(&pki, &pki, leaf);
    }
    assert_eq!(mode(&pki.leaf(LeafKind::Scheduler).key), 0o600);
}

#[test]
fn ca_cert_without_its_key_is_an_error_and_never_replaced() {
    for kind in CaKind::ALL {
        let host = Host::bootstrapped("m1");
        fs::remove_file(host.pki().ca(kind).key).unwrap();
        let before = host.snapshot();

        let err = ensure_cluster_cas(&host.paths, CaSource::Generate).unwrap_err();
        assert!(
            matches!(err, PkiError::CaKeyMissing { ca, .. } if ca == kind),
            "{err:?}"
        );
        let message = err.to_string();
        assert_contains_all(&message, &[kind.base_name(), "restore the key"], &[]);

        let node = cluster().nodes[0].clone();
        let err = ensure_node_certs(&host.paths, &cluster(), &node, true).unwrap_err();
        assert!(matches!(err, PkiError::CaKeyMissing { .. }), "{err:?}");
        assert_eq!(host.snapshot(), before, "{kind}: files changed");
    }
}

#[test]
fn ca_key_of_another_ca_is_an_error_and_never_replaced() {
    let host = Host::bootstrapped("m1");
    let other = Host::bootstrapped("m1");
    fs::copy(
        other.pki().ca(CaKind::Etcd).key,
        host.pki().ca(CaKind::Etcd).key,
    )
    .unwrap();
    let before = host.snapshot();
    let err = ensure_cluster_cas(&host.paths, CaSource::Generate).unwrap_err();
    assert!(
        matches!(
            err,
            PkiError::CaKeyMismatch {
                ca: CaKind::Etcd,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(host.snapshot(), before);
}

#[test]
fn sa_public_key_without_private_key_is_an_error() {
    let host = Host::bootstrapped("m1");
    fs::remove_file(host.pki().sa_key()).unwrap();
    let err = ensure_cluster_cas(&host.paths, CaSource::Generate).unwrap_err();
    assert!(matches!(err, PkiError::SaKeyMissing { .. }), "{err:?}");
    assert!(!host.pki().sa_key().exists());
}

#[test]
fn crash_between_key_and_public_half_is_repaired() {
    let host = Host::bootstrapped("m1");
    let old_key = fs::read(host.pki().ca(CaKind::FrontProxy).key).unwrap();
    let old_leaf = fs::read(host.pki().leaf(LeafKind::FrontProxyClient).cert).unwrap();
    fs::remove_file(host.pki().ca(CaKind::FrontProxy).cert).unwrap();
    fs::remove_file(host.pki().sa_pub()).unwrap();

    let report = host.cas(CaSource::Generate);
    assert_eq!(
        report.outcome(CaItem::Ca(CaKind::FrontProxy)),
        Some(CaOutcome::Repaired)
    );
    assert_eq!(
        report.outcome(CaItem::ServiceAccountKey),
        Some(CaOutcome::Repaired)
    );
    assert_eq!(
        report.outcome(CaItem::Ca(CaKind::Cluster)),
        Some(CaOutcome::Kept)
    );
    assert_eq!(
        fs::read(host.pki().ca(CaKind::FrontProxy).key).unwrap(),
        old_key
    );
    // Same key, so the existing leaf still verifies (and is kept).
    assert_verifies(&host.pki(), &host.pki(), LeafKind::FrontProxyClient);
    assert!(host.certs(&cluster(), "m1", true).unchanged());
    assert_eq!(
        fs::read(host.pki().leaf(LeafKind::FrontProxyClient).cert).unwrap(),
        old_leaf
    );
}

#[test]
fn sa_key_pair_is_p256_and_consistent() {
    let host = Host::bootstrapped("m1");
    let (ok, text) = openssl(&["pkey", "-noout", "-text", "-in"], &host.pki().sa_key());
    assert!(ok && text.contains("prime256v1"), "{text}");
    let (ok, public) = openssl(&["pkey", "-pubout", "-in"], &host.pki().sa_key());
    assert!(ok, "{public}");
    assert_eq!(public, fs::read_to_string(host.pki().sa_pub()).unwrap());
}

#[test]
fn import_into_second_root_yields_identical_cas_and_verifying_leaves() {
    let first = Host::bootstrapped("m1");
    let second = Host::new();
    let report = second.cas(CaSource::Import(first.pki().dir()));
    assert!(
        report.items.iter().all(|(_, o)| *o == CaOutcome::Imported),
        "{report:?}"
    );
    assert_eq!(second.ca_files(), first.ca_files());
    assert_eq!(second.ca_files().len(), shared_file_names().len());
    for path in shared_file_names() {
        let want = if path.extension().unwrap() == "key" {
            0o600
        } else {
            0o644
        };
        assert_eq!(
            mode(&second.pki().dir().join(&path)),
            want,
            "{}",
            path.display()
        );
    }

    second.certs(&cluster(), "m2", true);
    for leaf in LeafKind::ALL {
        // Against the first node's CA files: the same CA, not a look-alike.
        assert_verifies(&second.pki(), &first.pki(), leaf);
    }
    let before = second.snapshot();
    assert!(second.cas(CaSource::Import(first.pki().dir())).unchanged());
    assert_eq!(second.snapshot(), before);
}

#[test]
fn bundle_round_trips_through_json_and_hides_keys_in_debug() {
    let first = Host::bootstrapped("m1");
    let bundle = read_shared_ca_bundle(&first.paths).unwrap();
    let debug = format!("{bundle:?}");
    assert!(!debug.contains("PRIVATE KEY"), "{debug}");
    assert!(debug.contains("CERTIFICATE"));

    let wire = serde_json::to_string(&bundle).unwrap();
    let received: CaBundle = serde_json::from_str(&wire).unwrap();
    let third = Host::new();
    third.cas(CaSource::Bundle(&received));
    assert_eq!(third.ca_files(), first.ca_files());
}

#[test]
fn import_over_a_different_local_ca_is_refused_without_writing() {
    let first = Host::bootstrapped("m1");
    let other = Host::bootstrapped("m1");
    let before = other.snapshot();
    let err = ensure_cluster_cas(&other.paths, CaSource::Import(first.pki().dir())).unwrap_err();
    assert!(matches!(err, PkiError::CaConflict { .. }), "{err:?}");
    assert_eq!(other.snapshot(), before);
}

#[test]
fn import_completes_a_partial_local_copy_and_rejects_an_incomplete_source() {
    let first = Host::bootstrapped("m1");
    let second = Host::new();
    second.cas(CaSource::Import(first.pki().dir()));
    fs::remove_file(second.pki().ca(CaKind::Etcd).key).unwrap();
    let report = second.cas(CaSource::Import(first.pki().dir()));
    assert_eq!(
        report.outcome(CaItem::Ca(CaKind::Etcd)),
        Some(CaOutcome::Imported)
    );
    assert_eq!(
        report.outcome(CaItem::Ca(CaKind::Cluster)),
        Some(CaOutcome::Kept)
    );
    assert_eq!(second.ca_files(), first.ca_files());

    fs::remove_file(first.pki().ca(CaKind::FrontProxy).key).unwrap();
    let third = Host::new();
    let err = ensure_cluster_cas(&third.paths, CaSource::Import(first.pki().dir())).unwrap_err();
    assert!(matches!(err, PkiError::ImportIncomplete { .. }), "{err:?}");
    assert!(
        !third.pki().dir().exists(),
        "nothing written from a bad source"
    );
}

#[test]
fn client_credentials_are_read_back_for_kubeconfigs() {
    let host = Host::new();
    host.cas(CaSource::Generate);
    let err = read_client_credentials(&host.paths, ClientCert::Admin).unwrap_err();
    assert!(matches!(err, PkiError::ClientCertMissing { .. }), "{err:?}");

    host.certs(&cluster(), "m1", true);
    for client in ClientCert::ALL {
        let creds = read_client_credentials(&host.paths, client).unwrap();
        let files = host.pki().client(client);
        assert_eq!(creds.cert_pem, fs::read_to_string(files.cert).unwrap());
        assert_eq!(creds.key_pem, fs::read_to_string(files.key).unwrap());
        let ca = fs::read_to_string(host.pki().ca(CaKind::Cluster).cert).unwrap();
        assert_eq!(creds.ca_pem, ca);
        assert!(!format!("{creds:?}").contains("PRIVATE KEY"));
    }
}

#[test]
fn workers_and_missing_cas_are_refused() {
    let host = Host::new();
    let config = cluster();
    let err = ensure_node_certs(&host.paths, &config, &config.nodes[0], true).unwrap_err();
    assert!(
        matches!(
            err,
            PkiError::CaMissing {
                ca: CaKind::Cluster,
                ..
            }
        ),
        "{err:?}"
    );

    host.cas(CaSource::Generate);
    let worker = config.node("w1").unwrap();
    let err = ensure_node_certs(&host.paths, &config, worker, true).unwrap_err();
    assert!(matches!(err, PkiError::NotControlPlane { .. }), "{err:?}");
}

#[test]
fn a_requested_client_keeps_its_key_and_is_asked_for_again_only_when_stale() {
    let host = Host::bootstrapped("m1");
    let pki = host.pki();
    let ca = pki.ca(CaKind::Cluster).cert;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("pki/client.key");
    let cert = dir.path().join("pki/client.crt");

    let (first_key, csr) = super::client_request(&key, super::KUBE_PROXY_USER).unwrap();
    let (again, _) = super::client_request(&key, super::KUBE_PROXY_USER).unwrap();
    assert_eq!(
        first_key, again,
        "a crash between request and answer keeps the key"
    );
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let (_, pem) = x509_parser::pem::parse_x509_pem(csr.as_bytes()).unwrap();
    let (_, request) =
        <x509_parser::certification_request::X509CertificationRequest as x509_parser::prelude::FromDer<'_, _>>::from_der(&pem.contents)
            .unwrap();
    let subject = request.certification_request_info.subject.to_string();
    assert_eq!(subject, "CN=system:kube-proxy");

    let stale = |cn: &str| super::requested_client_stale(&cert, &key, &ca, cn).unwrap();
    assert_eq!(
        stale(super::KUBE_PROXY_USER).as_deref(),
        Some("no certificate yet")
    );
    // The master's own kube-proxy pair stands in for what a signer issues.
    let issued = pki.leaf(LeafKind::KubeProxy);
    std::fs::copy(&issued.cert, &cert).unwrap();
    assert!(
        stale(super::KUBE_PROXY_USER)
            .unwrap()
            .contains("does not match its private key"),
        "a certificate for another key"
    );
    std::fs::copy(&issued.key, &key).unwrap();
    assert_eq!(stale(super::KUBE_PROXY_USER), None);
    assert!(stale("system:node:m1").unwrap().contains("wrong subject"));
    let other_ca = Host::bootstrapped("m2");
    let foreign = super::requested_client_stale(
        &cert,
        &key,
        &other_ca.pki().ca(CaKind::Cluster).cert,
        super::KUBE_PROXY_USER,
    )
    .unwrap();
    assert!(foreign.unwrap().contains("not signed by the current CA"));
}
