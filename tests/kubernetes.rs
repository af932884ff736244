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
use std::path::PathBuf;
use std::process::Command;

use support::etcd::{etcdctl, finish, run_ok, spawn_run};
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
            for n in ["cp-1", "w-1"] {
                assert_all_done(&c, n);
            }
            assert_eq!(
                registry(&c, "/registry/nodes/"),
                ["/registry/nodes/w-1"],
                "{step}:{when}"
            );
            assert_eq!(registry(&c, "/registry/clusterrolebindings/").len(), 3);
            assert_eq!(
                registry(&c, "/registry/secrets/kube-system/bootstrap-token-").len(),
                1
            );
            let client_csrs = registry(&c, "/registry/certificatesigningrequests/")
                .iter()
                .filter(|k| k.contains("node-csr-"))
                .count();
            assert_eq!(client_csrs, 1, "{step}:{when}: one client CSR");
        }
    }
}
