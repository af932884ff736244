//! The Kubernetes side end to end: three masters and two workers from cold,
//! each `cluster-agent run --services process` in its own network
//! namespace, with real etcd and real TLS everywhere. kube-apiserver,
//! kube-controller-manager, kube-scheduler and the kubelet cannot be
//! installed here, so each node's `/opt/bin` holds the test doubles built
//! from `tests/doubles/` (cargo examples); the agent starts them through
//! their units exactly as it would start the real binaries. The API double
//! keeps its objects in the cluster's etcd, so `etcdctl` checks them.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestCondition, CertificateSigningRequestSpec,
    CertificateSigningRequestStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};

use support::etcd::{etcdctl, finish, run_ok, spawn_run};
use support::node_csr::node_csr_pem;
use support::{AGENT, Cluster, journal_outcome, text};

const MASTERS: [&str; 3] = ["cp-1", "cp-2", "cp-3"];
const WORKERS: [&str; 2] = ["w-1", "w-2"];

fn double(name: &str) -> PathBuf {
    let path = PathBuf::from(AGENT)
        .parent()
        .unwrap()
        .join("examples")
        .join(format!("{name}-double"));
    assert!(
        path.exists(),
        "{} is missing: `cargo test` builds it (or run `cargo build --examples`)",
        path.display()
    );
    path
}

/// What the image would ship in /opt/bin: here, the doubles.
fn install_doubles(c: &Cluster, node: &str, binaries: &[&str]) {
    let bin = c.root(node).join("opt/bin");
    std::fs::create_dir_all(&bin).unwrap();
    for b in binaries {
        std::os::unix::fs::symlink(double(b), bin.join(b)).unwrap();
    }
}

fn rack() -> Cluster {
    let c = Cluster::isolated(&[
        ("cp-1", &["control-plane"]),
        ("cp-2", &["control-plane"]),
        ("cp-3", &["control-plane"]),
        ("w-1", &["worker"]),
        ("w-2", &["worker"]),
    ]);
    for m in MASTERS {
        install_doubles(
            &c,
            m,
            &[
                "kube-apiserver",
                "kube-controller-manager",
                "kube-scheduler",
            ],
        );
    }
    for w in WORKERS {
        install_doubles(&c, w, &["kubelet"]);
    }
    c
}

/// Keys under an etcd prefix, as the API double stores objects.
fn registry(c: &Cluster, prefix: &str) -> Vec<String> {
    let out = etcdctl(c, "cp-1", &["get", "--prefix", "--keys-only", prefix]);
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

fn assert_all_done(c: &Cluster, node: &str) {
    let outcome = journal_outcome(&c.journal(node));
    let not_done: Vec<_> = outcome
        .iter()
        .filter(|(s, st)| st != "done" && s != "network-apply")
        .collect();
    assert!(not_done.is_empty(), "{node}: {not_done:?}");
}

fn assert_joined(c: &Cluster) {
    for n in MASTERS.iter().chain(&WORKERS) {
        assert_all_done(c, n);
    }
    assert_eq!(
        registry(c, "/registry/nodes/"),
        ["/registry/nodes/w-1", "/registry/nodes/w-2"]
    );
    let ca = c.root("cp-1").join("etc/kubernetes/pki/ca.crt");
    for w in WORKERS {
        // The kubelet's client certificate was issued by the cluster CA,
        // through the CSR the bootstrap token let it create.
        let cert = c
            .root(w)
            .join("var/lib/kubelet/pki/kubelet-client-current.pem");
        let out = Command::new("openssl")
            .arg("verify")
            .arg("-CAfile")
            .arg(&ca)
            .arg(&cert)
            .output()
            .unwrap();
        assert!(out.status.success(), "{w}: {}", text(&out));
        let subject = Command::new("openssl")
            .args(["x509", "-noout", "-subject", "-in"])
            .arg(&cert)
            .output()
            .unwrap();
        assert!(
            text(&subject).contains(&format!("system:node:{w}")),
            "{}",
            text(&subject)
        );
        let bootstrap = c.root(w).join("etc/kubernetes/bootstrap-kubelet.conf");
        let mode = std::fs::metadata(&bootstrap).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{w}");
    }
    assert_eq!(
        registry(c, "/registry/clusterrolebindings/"),
        [
            "/registry/clusterrolebindings/kubeadm:kubelet-bootstrap",
            "/registry/clusterrolebindings/kubeadm:node-autoapprove-bootstrap",
            "/registry/clusterrolebindings/kubeadm:node-autoapprove-certificate-rotation",
        ]
    );
    assert_eq!(
        registry(c, "/registry/configmaps/kube-public/"),
        ["/registry/configmaps/kube-public/cluster-info"]
    );
    // Each master's join service mints a token only when none of ours is
    // fresh enough; concurrent first joins on different masters may each
    // mint one.
    let tokens = registry(c, "/registry/secrets/kube-system/bootstrap-token-");
    assert!((1..=MASTERS.len()).contains(&tokens.len()), "{tokens:?}");
    for m in MASTERS {
        let admin = c.state_dir(m).join("admin.conf");
        let mode = std::fs::metadata(&admin).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{m}");
    }
}

/// Objects under an etcd prefix, as the API double stores them.
fn objects(c: &Cluster, prefix: &str) -> Vec<serde_json::Value> {
    let out = etcdctl(
        c,
        "cp-1",
        &["get", "--prefix", "--print-value-only", prefix],
    );
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The kubelets' serving CSRs are approved, once each, by one master's
/// join service: the holder of the approver Lease.
fn assert_serving_certificates_approved(c: &Cluster) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let approved = loop {
        let serving: Vec<_> = objects(c, "/registry/certificatesigningrequests/")
            .into_iter()
            .filter(|csr| csr["spec"]["signerName"] == "kubernetes.io/kubelet-serving")
            .collect();
        let decided: Vec<_> = serving
            .iter()
            .filter(|csr| csr["status"]["conditions"].is_array())
            .cloned()
            .collect();
        if serving.len() == WORKERS.len() && decided.len() == serving.len() {
            break decided;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "serving CSRs: {serving:#?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    for csr in &approved {
        let conditions = csr["status"]["conditions"].as_array().unwrap();
        assert_eq!(conditions.len(), 1, "decided once: {csr:#}");
        assert_eq!(conditions[0]["type"], "Approved", "{csr:#}");
    }
    let leases = objects(c, "/registry/leases/kube-system/");
    assert_eq!(leases.len(), 1, "{leases:#?}");
    let holder = leases[0]["spec"]["holderIdentity"].as_str().unwrap();
    assert!(MASTERS.contains(&holder), "{holder}");
}

#[test]
fn three_masters_and_two_workers_join_from_cold() {
    let c = rack();
    let children: Vec<_> = WORKERS
        .iter()
        .chain(&MASTERS)
        .map(|n| (*n, spawn_run(&c, n, None)))
        .collect();
    for (node, child) in children {
        finish(node, child);
    }
    assert_joined(&c);
    assert_serving_certificates_approved(&c);
    let tokens = registry(&c, "/registry/secrets/kube-system/bootstrap-token-");

    // Re-runs change nothing and create nothing.
    run_ok(&c, "w-1");
    run_ok(&c, "cp-2");
    assert_joined(&c);
    assert_eq!(
        registry(&c, "/registry/secrets/kube-system/bootstrap-token-"),
        tokens
    );
}

#[test]
fn a_kubelet_newer_than_the_api_server_is_refused() {
    let c = rack();
    run_ok(&c, "cp-1");
    let out = c
        .agent("w-1")
        .arg("run")
        .env("KUBELET_DOUBLE_VERSION", "v1.32.0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let shown = text(&out);
    assert!(
        shown.contains(
            "kubelet v1.32.0 is newer than the cluster (v1.31.0, from the API server's /version)"
        ),
        "{shown}"
    );
    assert!(!c.root("w-1").join("var/lib/kubelet/config.yaml").exists());
}

/// One master and one worker, doubles installed.
fn pair() -> Cluster {
    let c = Cluster::new(&[("cp-1", &["control-plane"]), ("w-1", &["worker"])]);
    install_doubles(
        &c,
        "cp-1",
        &[
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
        ],
    );
    install_doubles(&c, "w-1", &["kubelet"]);
    c
}

/// After interrupted runs and re-runs: every step done, one Node, no
/// duplicate objects, and the kubelet bootstrapped once (one client CSR).
fn assert_pair_converged(c: &Cluster, what: &str) {
    for n in ["cp-1", "w-1"] {
        assert_all_done(c, n);
    }
    assert_eq!(
        registry(c, "/registry/nodes/"),
        ["/registry/nodes/w-1"],
        "{what}"
    );
    assert_eq!(
        registry(c, "/registry/clusterrolebindings/").len(),
        3,
        "{what}"
    );
    assert_eq!(
        registry(c, "/registry/configmaps/kube-public/").len(),
        1,
        "{what}"
    );
    assert_eq!(
        registry(c, "/registry/secrets/kube-system/bootstrap-token-").len(),
        1,
        "{what}"
    );
    let client_csrs = registry(c, "/registry/certificatesigningrequests/")
        .iter()
        .filter(|k| k.contains("node-csr-"))
        .count();
    assert_eq!(client_csrs, 1, "{what}: one client CSR");
}

/// A crash before and after every Kubernetes step, on a master and on a
/// worker, then a re-run: one control plane, one Node, no duplicate
/// objects, the kubelet's first certificate kept.
#[test]
fn a_crash_at_every_kubernetes_step_converges() {
    let master_steps = [
        "control-plane-binaries",
        "control-plane-kubeconfigs",
        "control-plane-config",
        "kube-apiserver-start",
        "controllers-start",
        "cluster-objects",
    ];
    let worker_steps = [
        "kubelet-binary",
        "worker-join-material",
        "kubelet-version-skew",
        "kubelet-config",
        "kubelet-start",
    ];
    let points = master_steps
        .iter()
        .map(|s| ("cp-1", *s))
        .chain(worker_steps.iter().map(|s| ("w-1", *s)));
    for (node, step) in points {
        for when in ["before", "after"] {
            let c = pair();
            if node == "w-1" {
                run_ok(&c, "cp-1");
            }
            let out = spawn_run(&c, node, Some(&format!("{step}:{when}")))
                .wait_with_output()
                .unwrap();
            // A step whose effect is there from the start (the binaries)
            // never applies, so it cannot crash after applying.
            let aborted = std::os::unix::process::ExitStatusExt::signal(&out.status) == Some(6);
            let nothing_to_apply =
                when == "after" && (step == "control-plane-binaries" || step == "kubelet-binary");
            assert!(
                aborted || (nothing_to_apply && out.status.success()),
                "{node} {step}:{when}: {}",
                text(&out)
            );
            run_ok(&c, "cp-1");
            run_ok(&c, "w-1");
            assert_pair_converged(&c, &format!("{step}:{when}"));
        }
    }
}

fn cold_start(c: &Cluster) -> Vec<(&'static str, std::process::Child)> {
    ["cp-1", "w-1"]
        .iter()
        .map(|n| (*n, spawn_run(c, n, None)))
        .collect()
}

/// SIGKILL of the agent at a random moment of a cold start, then the run
/// again (as `Restart=on-failure` would). Usually only the agent dies: the
/// components it started are their own units under systemd and survive
/// it, as the process backend's daemons do here. Sometimes the master
/// loses power instead: etcd, the API server and the join service die with
/// the agent while the worker is joining through them.
#[test]
fn sigkill_at_random_moments_of_a_cold_start_converges() {
    // Kills land inside an undisturbed cold start, measured here, so the
    // window fits this machine's speed.
    let c = pair();
    let started = Instant::now();
    for (node, child) in cold_start(&c) {
        finish(node, child);
    }
    let window = started.elapsed();
    drop(c);
    let mut killed = 0;
    for round in 0..6 {
        let c = pair();
        let mut children = cold_start(&c);
        let victim = rand::random_range(0..children.len());
        let delay = window.mul_f64(rand::random_range(0.0..1.0));
        let started = Instant::now();
        while started.elapsed() < delay && children[victim].1.try_wait().unwrap().is_none() {
            std::thread::sleep(Duration::from_millis(5));
        }
        let name = children[victim].0;
        let power_cut = name == "cp-1" && rand::random();
        if children[victim].1.try_wait().unwrap().is_none() {
            killed += 1;
            eprintln!(
                "round {round}: SIGKILL {name}{} after {delay:?} of {window:?}",
                if power_cut { " and its daemons" } else { "" }
            );
        }
        let _ = children[victim].1.kill();
        let _ = children[victim].1.wait();
        if power_cut {
            c.kill_daemons(name);
        }
        children[victim].1 = spawn_run(&c, name, None);
        for (node, child) in children {
            finish(node, child);
        }
        assert_pair_converged(&c, &format!("round {round}, {name} killed after {delay:?}"));
    }
    eprintln!("{killed} of 6 kills landed before the run ended");
}

async fn client(kubeconfig: &Path) -> kube::Client {
    cluster_agent::k8s::client_from_kubeconfig(kubeconfig)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A kubeconfig for a node cluster.yaml does not list, with a client
/// certificate from the cluster CA: an impostor that got hold of a
/// certificate, which only the approver's node check stops.
fn unlisted_node_kubeconfig(c: &Cluster, name: &str) -> PathBuf {
    let pki = c.root("cp-1").join("etc/kubernetes/pki");
    let ca_pem = std::fs::read_to_string(pki.join("ca.crt")).unwrap();
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(pki.join("ca.key")).unwrap()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let user = format!("system:node:{name}");
    let cert = rcgen::CertificateSigningRequestParams::from_pem(&node_csr_pem(&key, &user, &[]))
        .unwrap()
        .signed_by(&issuer)
        .unwrap();
    let admin =
        kube::config::Kubeconfig::read_from(c.state_dir("cp-1").join("admin.conf")).unwrap();
    let server = admin.clusters[0]
        .cluster
        .as_ref()
        .and_then(|c| c.server.clone())
        .unwrap();
    let path = c.dir.path().join(format!("{name}.conf"));
    std::fs::write(
        &path,
        cluster_agent::k8s::render_kubeconfig(
            "test",
            &server,
            &ca_pem,
            &user,
            cluster_agent::k8s::Credentials::ClientCert {
                cert_pem: &cert.pem(),
                key_pem: &key.serialize_pem(),
            },
        ),
    )
    .unwrap();
    path
}

/// Submits a serving CSR as `requester` and returns the condition the
/// approver set on it.
async fn serving_verdict(
    requester: &kube::Client,
    observer: &Api<CertificateSigningRequest>,
    name: &str,
    cn: &str,
    sans: &[&str],
) -> CertificateSigningRequestCondition {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = CertificateSigningRequest {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec: CertificateSigningRequestSpec {
            request: k8s_openapi::ByteString(node_csr_pem(&key, cn, sans).into_bytes()),
            signer_name: "kubernetes.io/kubelet-serving".into(),
            usages: Some(vec!["digital signature".into(), "server auth".into()]),
            ..Default::default()
        },
        status: None,
    };
    Api::<CertificateSigningRequest>::all(requester.clone())
        .create(&PostParams::default(), &csr)
        .await
        .unwrap_or_else(|e| panic!("create {name}: {e}"));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let conditions = observer
            .get(name)
            .await
            .unwrap()
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default();
        if let [only] = conditions.as_slice() {
            return only.clone();
        }
        assert!(conditions.is_empty(), "{name}: {conditions:#?}");
        assert!(Instant::now() < deadline, "{name}: no decision");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The serving-CSR approver against the API, with each requester's own
/// credentials: a node asking for names not its own, a node cluster.yaml
/// does not list and a requester that is not a node are denied with the
/// reason; neither a bootstrap token nor a node may approve a CSR itself.
#[test]
fn the_serving_csr_approver_denies_with_reasons_through_the_api() {
    let c = pair();
    run_ok(&c, "cp-1");
    run_ok(&c, "w-1");
    let w1_ip = c.nodes.iter().find(|n| n.name == "w-1").unwrap().ip.clone();
    let ghost = unlisted_node_kubeconfig(&c, "ghost");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let kubernetes = c.root("w-1").join("etc/kubernetes");
        let admin = client(&c.state_dir("cp-1").join("admin.conf")).await;
        let node = client(&kubernetes.join("kubelet.conf")).await;
        let bootstrap = client(&kubernetes.join("bootstrap-kubelet.conf")).await;
        let observer: Api<CertificateSigningRequest> = Api::all(admin.clone());

        let cases = [
            (
                &node,
                "evil-sans",
                "system:node:w-1",
                vec!["evil.example.com", w1_ip.as_str()],
                "DNS SAN evil.example.com is not node w-1's hostname",
            ),
            (
                &node,
                "foreign-ip",
                "system:node:w-1",
                vec!["w-1", "192.0.2.7"],
                "IP SAN 192.0.2.7 is not node w-1's address",
            ),
            (
                &client(&ghost).await,
                "unlisted-node",
                "system:node:ghost",
                vec!["ghost"],
                "node ghost is not listed in cluster.yaml",
            ),
            (
                &admin,
                "not-a-node",
                "system:node:w-1",
                vec!["w-1", w1_ip.as_str()],
                "not by a node",
            ),
        ];
        for (requester, name, cn, sans, reason) in &cases {
            let verdict = serving_verdict(requester, &observer, name, cn, sans).await;
            assert_eq!(verdict.type_, "Denied", "{name}: {verdict:#?}");
            let message = verdict.message.unwrap_or_default();
            assert!(message.contains(reason), "{name}: {message}");
        }

        // The same requests with the node's own names are approved.
        let good = serving_verdict(
            &node,
            &observer,
            "own-names",
            "system:node:w-1",
            &["w-1", &w1_ip],
        )
        .await;
        assert_eq!(good.type_, "Approved", "{good:#?}");

        // Approving is not for the requester: the API refuses both the
        // bootstrap token and the node, and the denial stands.
        let mut forged = observer.get("evil-sans").await.unwrap();
        forged.status = Some(CertificateSigningRequestStatus {
            conditions: Some(vec![CertificateSigningRequestCondition {
                type_: "Approved".into(),
                status: "True".into(),
                reason: Some("SelfApproved".into()),
                ..Default::default()
            }]),
            ..Default::default()
        });
        for (who, requester) in [("bootstrap token", &bootstrap), ("node", &node)] {
            let refused = Api::<CertificateSigningRequest>::all(requester.clone())
                .replace_subresource("approval", "evil-sans", &PostParams::default(), &forged)
                .await;
            match refused {
                Err(kube::Error::Api(status)) => assert_eq!(status.code, 403, "{who}: {status:?}"),
                other => panic!("{who} approved a CSR: {other:?}"),
            }
        }
        let conditions = observer
            .get("evil-sans")
            .await
            .unwrap()
            .status
            .unwrap()
            .conditions
            .unwrap();
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].type_, "Denied");
    });
    let leases = objects(&c, "/registry/leases/kube-system/");
    assert_eq!(leases.len(), 1, "{leases:#?}");
    assert_eq!(leases[0]["spec"]["holderIdentity"], "cp-1");
}

/// The kubeconfigs the agent writes, read by the real kubectl: parsed by
/// `config view`, and used for requests to the API server (client
/// certificate, CA pinning). `.ci/setup` installs Debian's
/// kubernetes-client when the machine has no kubectl.
#[test]
fn kubectl_reads_and_uses_the_kubeconfigs() {
    assert!(
        Command::new("kubectl")
            .args(["version", "--client"])
            .output()
            .is_ok(),
        "kubectl is not installed: run .ci/setup"
    );
    let c = pair();
    run_ok(&c, "cp-1");
    run_ok(&c, "w-1");
    let kubernetes = |node: &str| c.root(node).join("etc/kubernetes");
    let kubeconfigs = [
        c.state_dir("cp-1").join("admin.conf"),
        kubernetes("cp-1").join("admin.conf"),
        kubernetes("cp-1").join("controller-manager.conf"),
        kubernetes("cp-1").join("scheduler.conf"),
        kubernetes("w-1").join("bootstrap-kubelet.conf"),
    ];
    let kubectl = |kubeconfig: &Path, args: &[&str]| {
        let out = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "kubectl {args:?} with {}: {}",
            kubeconfig.display(),
            text(&out)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    for kubeconfig in &kubeconfigs {
        let view: serde_json::Value =
            serde_json::from_str(&kubectl(kubeconfig, &["config", "view", "-o", "json"])).unwrap();
        let server = view["clusters"][0]["cluster"]["server"].as_str().unwrap();
        assert!(server.starts_with("https://"), "{view:#}");
        assert!(view["current-context"].is_string(), "{view:#}");
        let version: serde_json::Value =
            serde_json::from_str(&kubectl(kubeconfig, &["get", "--raw", "/version"])).unwrap();
        assert_eq!(version["gitVersion"], "v1.31.0");
    }
    // The admin's client certificate authenticates as system:masters.
    let info: serde_json::Value = serde_json::from_str(&kubectl(
        &kubeconfigs[0],
        &[
            "get",
            "--raw",
            "/api/v1/namespaces/kube-public/configmaps/cluster-info",
        ],
    ))
    .unwrap();
    assert!(
        info["data"]["kubeconfig"]
            .as_str()
            .is_some_and(|k| k.contains("certificate-authority-data")),
        "{info:#}"
    );
}
