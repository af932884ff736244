//! The Kubernetes side end to end against the real thing: kube-apiserver,
//! kube-controller-manager, kube-scheduler, kubelet (v1.34.4), etcd 3.6 and
//! containerd 2 as `.ci/setup` builds them (tools/kube-bins), linked into
//! each node's `/opt/bin` as an image ships them, each started by the
//! agent through its own unit (`cluster-agent run --services process`).
//! The built kubectl judges what the agent made: readiness through every
//! kubeconfig it writes, what a bootstrap token may do, the CSRs' fate and
//! the `cluster-info` signature a `kubeadm join --discovery-token` checks.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine as _;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestCondition, CertificateSigningRequestSpec,
    CertificateSigningRequestStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};

use support::etcd::{finish, run_ok, spawn_run};
use support::node_csr::node_csr_pem;
use support::{Cluster, built_binary, install_built, journal_outcome, text};

const MASTERS: [&str; 3] = ["cp-1", "cp-2", "cp-3"];
const WORKERS: [&str; 2] = ["w-1", "w-2"];
const VERSION: &str = "v1.34.4";
const MASTER_BINARIES: [&str; 4] = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
];
const NODE_BINARIES: [&str; 4] = [
    "containerd",
    "containerd-shim-runc-v2",
    "kubelet",
    "kube-proxy",
];
/// A worker's steps that always apply on a fresh join, in the order it runs
/// them. Not the binary checks (they find their binaries and apply
/// nothing), nor `node-ready` (the Node may be Ready before it runs).
const WORKER_STEPS: [&str; 10] = [
    "worker-join-material",
    "api-balancer",
    "kubelet-version-skew",
    "kubelet-config",
    "kubelet-start",
    "pod-network",
    "pod-routes",
    "kube-proxy-credentials",
    "kube-proxy-config",
    "kube-proxy-start",
];
/// Debian's CNI reference plugins (containernetworking-plugins).
const CNI_PLUGINS: &str = "/usr/lib/cni";
const CONTROL_PLANE_LABEL: &str = "node-role.kubernetes.io/control-plane";

/// What the image would ship: the built binaries, Debian's runc and CNI
/// plugins; masters also the control plane (every node runs a kubelet).
fn install_image(c: &Cluster, node: &str) {
    let root = c.root(node);
    if MASTERS.contains(&node) {
        install_built(&root, &MASTER_BINARIES);
    }
    install_built(&root, &NODE_BINARIES);
    let runc = support::require_tool("runc", "runc");
    let link = root.join("opt/bin/runc");
    if !link.exists() {
        std::os::unix::fs::symlink(runc, link).unwrap();
    }
    assert!(
        Path::new(CNI_PLUGINS).join("bridge").is_file(),
        "no CNI plugins in {CNI_PLUGINS}: install Debian's containernetworking-plugins (.ci/setup does)"
    );
    let cni = root.join("usr/lib/cni");
    if !cni.exists() {
        std::fs::create_dir_all(cni.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(CNI_PLUGINS, cni).unwrap();
    }
}

fn with_images(c: Cluster) -> Cluster {
    for n in c.nodes.clone() {
        install_image(&c, &n.name);
    }
    c
}

/// Three masters and two workers, each in its own network namespace: etcd
/// peers and kubelets need addresses of their own (a kubelet refuses a
/// loopback node IP, and without one it never asks for a serving
/// certificate).
fn rack() -> Cluster {
    with_images(Cluster::isolated(&[
        ("cp-1", &["control-plane"]),
        ("cp-2", &["control-plane"]),
        ("cp-3", &["control-plane"]),
        ("w-1", &["worker"]),
        ("w-2", &["worker"]),
    ]))
}

/// The controller-manager and scheduler serve their health ports on
/// 127.0.0.1 (10257, 10259), as kubeadm's do: two masters that share the
/// host's loopback collide there, so tests with a loopback master take
/// turns. Hold the turn for as long as the cluster lives.
fn loopback_turn() -> std::sync::MutexGuard<'static, ()> {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    TURN.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One master and one worker on loopback addresses (take a
/// [`loopback_turn`] first).
fn pair() -> Cluster {
    with_images(Cluster::new(&[
        ("cp-1", &["control-plane"]),
        ("w-1", &["worker"]),
    ]))
}

fn admin(c: &Cluster) -> PathBuf {
    c.state_dir("cp-1").join("admin.conf")
}

/// The built kubectl with `kubeconfig`, run inside `node`'s network.
fn kubectl(c: &Cluster, node: &str, kubeconfig: &Path, args: &[&str]) -> String {
    let out = c
        .command_on(node, built_binary("kubectl"))
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
}

/// `kubectl get <what> -o json` as the admin: the list's items.
fn items(c: &Cluster, what: &[&str]) -> Vec<serde_json::Value> {
    let mut args = vec!["get"];
    args.extend(what);
    args.extend(["-o", "json"]);
    let list: serde_json::Value =
        serde_json::from_str(&kubectl(c, "cp-1", &admin(c), &args)).unwrap();
    list["items"].as_array().cloned().unwrap_or_default()
}

fn names(objects: &[serde_json::Value]) -> Vec<String> {
    let mut names: Vec<String> = objects
        .iter()
        .map(|o| o["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

/// Our bootstrap tokens (the Secrets serve-join minted).
fn tokens(c: &Cluster) -> Vec<serde_json::Value> {
    items(c, &["secrets", "-n", "kube-system"])
        .into_iter()
        .filter(|s| s["type"] == "bootstrap.kubernetes.io/token")
        .collect()
}

/// Every step done; on a loopback node, kube-proxy's skipped (nodes that
/// share the host's network share its iptables).
fn assert_all_done(c: &Cluster, node: &str) {
    let journal = c.journal(node);
    let outcome = journal_outcome(&journal);
    let shares_host_network = c.netns(node).is_none();
    let floating = std::fs::read_to_string(c.config_dir(node).join("cluster.yaml"))
        .unwrap()
        .contains("floating_endpoint: true");
    let not_done: Vec<_> = outcome
        .iter()
        .filter(|(s, st)| {
            let kube_proxy_skipped =
                shares_host_network && s.starts_with("kube-proxy-") && st == "skipped";
            let endpoint_fixed = !floating && s == "api-address" && st == "skipped";
            st != "done" && s != "network-apply" && !kube_proxy_skipped && !endpoint_fixed
        })
        .collect();
    assert!(not_done.is_empty(), "{node}: {not_done:?}");
    if shares_host_network {
        let note = journal["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "kube-proxy-binary")
            .map(|s| s["note"].to_string())
            .unwrap_or_default();
        assert!(note.contains("runs no kube-proxy"), "{node}: {note}");
    }
}

fn b64(value: &serde_json::Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(value.as_str().unwrap())
        .unwrap()
}

/// What every joined cluster shows, whatever happened on the way: every
/// step done, the workers registered with certificates from the cluster CA
/// (one client CSR each, approved by the real controller-manager through
/// the agent's RBAC bindings), the bootstrap objects exactly once.
fn assert_joined(c: &Cluster, masters: &[&str], workers: &[&str]) {
    for n in masters.iter().chain(workers) {
        assert_all_done(c, n);
    }
    let nodes = items(c, &["nodes"]);
    let mut all: Vec<String> = masters
        .iter()
        .chain(workers)
        .map(|n| n.to_string())
        .collect();
    all.sort();
    assert_eq!(names(&nodes), all, "every master and worker is a Node");
    for node in &nodes {
        let name = node["metadata"]["name"].as_str().unwrap();
        let ready = node["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Ready")
            .unwrap();
        assert_eq!(ready["status"], "True", "{name}: {ready:#}");
        let master = masters.contains(&name);
        let labelled = node["metadata"]["labels"][CONTROL_PLANE_LABEL].is_string();
        let tainted = node["spec"]["taints"].as_array().is_some_and(|t| {
            t.iter()
                .any(|t| t["key"] == CONTROL_PLANE_LABEL && t["effect"] == "NoSchedule")
        });
        assert_eq!((labelled, tainted), (master, master), "{name}: {node:#}");
        assert!(node["spec"]["podCIDR"].is_string(), "{name}: a pod CIDR");
        let conflist = c.root(name).join("etc/cni/net.d/10-cluster-agent.conflist");
        let conf: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&conflist).unwrap()).unwrap();
        assert_eq!(
            conf["plugins"][0]["ipam"]["ranges"][0][0]["subnet"], node["spec"]["podCIDR"],
            "{name}: the CNI hands out the Node's range"
        );
    }
    let ca = c.root("cp-1").join("etc/kubernetes/pki/ca.crt");
    for w in workers {
        let cert = c
            .root(w)
            .join("var/lib/kubelet/pki/kubelet-client-current.pem");
        let out = Command::new("openssl")
            .arg("verify")
            .arg("-CAfile")
            .arg(&ca)
            .arg(&cert)
            .output()
            .expect("openssl runs (.ci/setup installs it)");
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
    let client_csrs: Vec<_> = items(c, &["csr"])
        .into_iter()
        .filter(|csr| csr["spec"]["signerName"] == "kubernetes.io/kube-apiserver-client-kubelet")
        .collect();
    // A master's kubelet starts with the agent's certificate and, rotation
    // being on, at once trades it for one of its own (renewal as itself,
    // auto-approved through the selfnodeclient binding), as kubeadm's do.
    let mut requesters: Vec<String> = client_csrs
        .iter()
        .map(|csr| {
            csr["spec"]["username"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    requesters.sort();
    let expected: Vec<String> = masters
        .iter()
        .map(|m| format!("system:node:{m}"))
        .chain(workers.iter().map(|_| "system:bootstrap".to_string()))
        .collect();
    assert_eq!(
        requesters
            .iter()
            .map(|r| if r.starts_with("system:bootstrap:") {
                "system:bootstrap".to_string()
            } else {
                r.clone()
            })
            .filter(|r| r.starts_with("system:node:"))
            .collect::<Vec<_>>(),
        expected
            .iter()
            .filter(|r| r.starts_with("system:node:"))
            .cloned()
            .collect::<Vec<_>>(),
        "each master's kubelet renewed its agent-issued certificate once"
    );
    assert_eq!(
        client_csrs.len(),
        masters.len() + workers.len(),
        "one client CSR per kubelet"
    );
    for csr in &client_csrs {
        let types: Vec<_> = csr["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["Approved"], "{csr:#}");
        assert!(csr["status"]["certificate"].is_string(), "issued: {csr:#}");
    }
    let bindings = names(&items(c, &["clusterrolebindings"]));
    for (name, _, _) in cluster_agent::k8s::TLS_BOOTSTRAP_BINDINGS {
        assert!(bindings.contains(&name.to_string()), "{name}: {bindings:?}");
    }
    let reader = cluster_agent::k8s::CLUSTER_INFO_READER.to_string();
    assert!(names(&items(c, &["roles", "-n", "kube-public"])).contains(&reader));
    assert!(names(&items(c, &["rolebindings", "-n", "kube-public"])).contains(&reader));
    // Each master's join service mints a token only when none of ours is
    // fresh enough; concurrent first joins on different masters may each
    // mint one.
    let minted = tokens(c).len();
    assert!((1..=masters.len()).contains(&minted), "{minted} tokens");
    for m in masters {
        let admin = c.state_dir(m).join("admin.conf");
        let mode = std::fs::metadata(&admin).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{m}");
    }
}

/// `kube-public/cluster-info`, which a joining node without credentials
/// may read: fetched as `system:anonymous` (impersonated by the admin).
fn anonymous_cluster_info(c: &Cluster) -> serde_json::Value {
    let path = "/api/v1/namespaces/kube-public/configmaps/cluster-info";
    serde_json::from_str(&kubectl(
        c,
        "cp-1",
        &admin(c),
        &["--as=system:anonymous", "get", "--raw", path],
    ))
    .unwrap()
}

/// That ConfigMap and its signature checked the way `kubeadm join --discovery-token`
/// checks it: a detached JWS (HS256, keyed by the token's secret) over the
/// kubeconfig, one per signing token.
fn assert_cluster_info_signed(c: &Cluster) {
    let info = anonymous_cluster_info(c);
    let kubeconfig = info["data"]["kubeconfig"].as_str().unwrap();
    assert!(
        kubeconfig.contains("certificate-authority-data"),
        "{info:#}"
    );
    let tokens = tokens(c);
    assert!(!tokens.is_empty());
    for token in &tokens {
        let id = String::from_utf8(b64(&token["data"]["token-id"])).unwrap();
        let secret = b64(&token["data"]["token-secret"]);
        let deadline = Instant::now() + Duration::from_secs(60);
        let jws = loop {
            let info = anonymous_cluster_info(c);
            if let Some(jws) = info["data"][format!("jws-kubeconfig-{id}")].as_str() {
                break jws.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no signature for token {id}: {info:#}"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        let (header, signature) = jws.split_once("..").expect("a detached JWS");
        let url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header_json: serde_json::Value =
            serde_json::from_slice(&url.decode(header).unwrap()).unwrap();
        assert_eq!(header_json["alg"], "HS256");
        assert_eq!(header_json["kid"], id.as_str());
        let signed = format!("{header}.{}", url.encode(kubeconfig));
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret);
        ring::hmac::verify(&key, signed.as_bytes(), &url.decode(signature).unwrap())
            .unwrap_or_else(|_| panic!("token {id}'s signature does not match the kubeconfig"));
    }
}

/// `/readyz?verbose` through every kubeconfig the agent wrote, each used
/// where its owner runs; `/version` reads the built version.
fn assert_kubeconfigs_work(c: &Cluster, masters: &[&str], workers: &[&str]) {
    let mut uses: Vec<(&str, PathBuf)> = Vec::new();
    for m in masters {
        let k = c.root(m).join("etc/kubernetes");
        uses.push((m, c.state_dir(m).join("admin.conf")));
        for file in [
            "admin.conf",
            "controller-manager.conf",
            "scheduler.conf",
            "kubelet.conf",
        ] {
            uses.push((m, k.join(file)));
        }
    }
    for w in workers {
        let k = c.root(w).join("etc/kubernetes");
        uses.push((w, k.join("bootstrap-kubelet.conf")));
        uses.push((w, k.join("kubelet.conf")));
    }
    for (node, kubeconfig) in &uses {
        let ready = kubectl(c, node, kubeconfig, &["get", "--raw", "/readyz?verbose"]);
        assert!(ready.contains("readyz check passed"), "{ready}");
        assert!(ready.contains("[+]etcd ok"), "{ready}");
        let version: serde_json::Value =
            serde_json::from_str(&kubectl(c, node, kubeconfig, &["get", "--raw", "/version"]))
                .unwrap();
        assert_eq!(version["gitVersion"], VERSION, "{}", kubeconfig.display());
    }
}

/// A bootstrap token may create CSRs and nothing more.
fn assert_bootstrap_token_scoped(c: &Cluster, worker: &str) {
    let bootstrap = c.root(worker).join("etc/kubernetes/bootstrap-kubelet.conf");
    let can = |args: &[&str]| {
        let out = c
            .command_on(worker, built_binary("kubectl"))
            .arg("--kubeconfig")
            .arg(&bootstrap)
            .args(["auth", "can-i"])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(
        can(&["create", "certificatesigningrequests.certificates.k8s.io"]),
        "yes"
    );
    assert_eq!(can(&["get", "secrets", "-n", "kube-system"]), "no");
    assert_eq!(can(&["list", "nodes"]), "no");
    assert_eq!(can(&["get", "configmaps", "-n", "kube-system"]), "no");
}

fn approver_holder(c: &Cluster) -> String {
    let lease: serde_json::Value = serde_json::from_str(&kubectl(
        c,
        "cp-1",
        &admin(c),
        &[
            "get",
            "lease",
            "-n",
            "kube-system",
            cluster_agent::k8s::approver::LEASE_NAME,
            "-o",
            "json",
        ],
    ))
    .unwrap();
    lease["spec"]["holderIdentity"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The kubelets' serving CSRs (real ones, with the node's hostname and
/// address) are approved, once each, by one master's join service: the
/// holder of the approver Lease.
fn assert_serving_certificates_approved(c: &Cluster, kubelets: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(90);
    let approved = loop {
        let serving: Vec<_> = items(c, &["csr"])
            .into_iter()
            .filter(|csr| csr["spec"]["signerName"] == "kubernetes.io/kubelet-serving")
            .collect();
        let decided: Vec<_> = serving
            .iter()
            .filter(|csr| csr["status"]["conditions"].is_array())
            .cloned()
            .collect();
        if serving.len() == kubelets.len() && decided.len() == serving.len() {
            break decided;
        }
        assert!(Instant::now() < deadline, "serving CSRs: {serving:#?}");
        std::thread::sleep(Duration::from_millis(200));
    };
    for csr in &approved {
        let conditions = csr["status"]["conditions"].as_array().unwrap();
        assert_eq!(conditions.len(), 1, "decided once: {csr:#}");
        assert_eq!(conditions[0]["type"], "Approved", "{csr:#}");
    }
    assert!(MASTERS.contains(&approver_holder(c).as_str()));
}

/// `kubectl` as the admin, from cp-1, with `input` on stdin.
fn kubectl_stdin(c: &Cluster, args: &[&str], input: &str) -> String {
    use std::io::Write;
    let mut child = c
        .command_on("cp-1", built_binary("kubectl"))
        .arg("--kubeconfig")
        .arg(admin(c))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "kubectl {args:?}: {}", text(&out));
    String::from_utf8(out.stdout).unwrap()
}

/// A pod of the test image (no registry: imported, pull policy Never),
/// on `node` when given, else wherever the scheduler puts it.
fn pod_manifest(name: &str, node: Option<&str>, command: &[&str]) -> String {
    let mut spec = serde_json::json!({
        "containers": [{
            "name": "main",
            "image": support::oci::APP_IMAGE,
            "imagePullPolicy": "Never",
            "command": command,
        }],
        "terminationGracePeriodSeconds": 1,
    });
    if let Some(node) = node {
        spec["nodeSelector"] = serde_json::json!({"kubernetes.io/hostname": node});
    }
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": name}},
        "spec": spec,
    })
    .to_string()
}

/// What the client pod (on w-2) fetches from `url`. busybox's wget: no
/// -T (Debian's 1.35 segfaults with it).
fn wget_from_client(c: &Cluster, url: &str) -> String {
    kubectl(
        c,
        "cp-1",
        &admin(c),
        &["exec", "client", "--", "wget", "-q", "-O", "-", url],
    )
}

/// Real pods on the built-in network: an HTTP server on w-1 answers a
/// client on w-2 by pod IP, routed (not translated) between the nodes by
/// the agent's host-gateway routes; pods the scheduler places land on
/// workers only (the masters' taint).
fn assert_pods_talk_across_nodes(c: &Cluster) {
    let work = tempfile::tempdir().unwrap();
    import_test_images(c, work.path());
    let serve = "mkdir -p /www && echo hello from $(hostname) > /www/index.html && exec httpd -f -p 8080 -h /www";
    kubectl_stdin(
        c,
        &["apply", "-f", "-"],
        &pod_manifest("server", Some("w-1"), &["/bin/sh", "-c", serve]),
    );
    kubectl_stdin(
        c,
        &["apply", "-f", "-"],
        &pod_manifest("client", Some("w-2"), &support::oci::SLEEP_FOREVER),
    );
    for i in 0..3 {
        kubectl_stdin(
            c,
            &["apply", "-f", "-"],
            &pod_manifest(&format!("anywhere-{i}"), None, &support::oci::SLEEP_FOREVER),
        );
    }
    let waited = c
        .command_on("cp-1", built_binary("kubectl"))
        .arg("--kubeconfig")
        .arg(admin(c))
        .args([
            "wait",
            "--for=condition=Ready",
            "pod",
            "--all",
            "--timeout=180s",
        ])
        .output()
        .unwrap();
    if !waited.status.success() {
        let pods = kubectl(c, "cp-1", &admin(c), &["get", "pods", "-o", "wide"]);
        let events = kubectl(c, "cp-1", &admin(c), &["get", "events", "-A"]);
        panic!("pods not Ready: {}\n{pods}\n{events}", text(&waited));
    }
    let pods = items(c, &["pods", "-n", "default"]);
    let pod = |name: &str| {
        pods.iter()
            .find(|p| p["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
            .clone()
    };
    let server = pod("server");
    assert_eq!(server["spec"]["nodeName"], "w-1");
    assert_eq!(pod("client")["spec"]["nodeName"], "w-2");
    let server_ip = server["status"]["podIP"].as_str().unwrap().to_string();
    let w1: serde_json::Value = serde_json::from_str(&kubectl(
        c,
        "cp-1",
        &admin(c),
        &["get", "node", "w-1", "-o", "json"],
    ))
    .unwrap();
    let w1_range: ipnet::Ipv4Net = w1["spec"]["podCIDR"].as_str().unwrap().parse().unwrap();
    assert!(
        w1_range.contains(&server_ip.parse::<std::net::Ipv4Addr>().unwrap()),
        "the server's IP {server_ip} is from w-1's range {w1_range}"
    );
    for i in 0..3 {
        let node = pod(&format!("anywhere-{i}"))["spec"]["nodeName"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(WORKERS.contains(&node.as_str()), "anywhere-{i} on {node}");
    }
    let url = format!("http://{server_ip}:8080/");
    assert_eq!(
        wget_from_client(c, &url).trim(),
        "hello from server",
        "{url}"
    );
    // Each worker's routes lead to the other nodes' pod ranges.
    for w in WORKERS {
        let routes = pod_routes(c, w);
        assert_eq!(
            routes.len(),
            MASTERS.len() + WORKERS.len() - 1,
            "{w}: {routes:?}"
        );
    }
}

/// `iptables-save` in `node`'s network.
fn iptables_rules(c: &Cluster, node: &str) -> String {
    let out = c.command_on(node, "iptables-save").output().unwrap();
    assert!(out.status.success(), "{node}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A ClusterIP Service for the server pod answers through kube-proxy: from
/// the client pod on the other worker, and from the hosts of a worker and
/// a master (a master's kube-proxy runs on the certificate the agent
/// issued, a worker's on one it asked for with a CSR the join service's
/// approver granted).
fn assert_service_answers_across_nodes(c: &Cluster) {
    let service = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "server", "namespace": "default"},
        "spec": {"selector": {"app": "server"}, "ports": [{"port": 80, "targetPort": 8080}]},
    });
    kubectl_stdin(c, &["apply", "-f", "-"], &service.to_string());
    let cluster_ip = kubectl(
        c,
        "cp-1",
        &admin(c),
        &[
            "get",
            "service",
            "server",
            "-o",
            "jsonpath={.spec.clusterIP}",
        ],
    );
    for node in ["w-2", "cp-2"] {
        wait_for(
            &format!("kube-proxy on {node} to write default/server's rules"),
            || iptables_rules(c, node).contains("default/server"),
        );
    }
    let url = format!("http://{cluster_ip}/");
    assert_eq!(
        wget_from_client(c, &url).trim(),
        "hello from server",
        "{url} from a pod"
    );
    let busybox = support::require_tool("busybox", "busybox-static");
    for node in ["w-2", "cp-2"] {
        let out = c
            .command_on(node, &busybox)
            .args(["wget", "-q", "-O", "-", &url])
            .output()
            .unwrap();
        assert!(out.status.success(), "{url} from {node}: {}", text(&out));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "hello from server"
        );
    }
    let requests: Vec<_> = items(c, &["csr"])
        .into_iter()
        .filter(|csr| csr["spec"]["signerName"] == "kubernetes.io/kube-apiserver-client")
        .collect();
    for w in WORKERS {
        let own: Vec<_> = requests
            .iter()
            .filter(|r| r["spec"]["username"] == format!("system:node:{w}"))
            .collect();
        assert_eq!(own.len(), 1, "{w}: one kube-proxy CSR: {own:#?}");
        let approved = own[0]["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["type"] == "Approved" && c["reason"] == "ClusterAgentApproved");
        assert!(approved, "{w}: {:#}", own[0]);
        assert!(own[0]["status"]["certificate"].is_string(), "{w}: signed");
    }
    assert!(
        requests.iter().all(|r| r["spec"]["username"]
            .as_str()
            .is_some_and(|u| u.starts_with("system:node:w-"))),
        "masters ask for no kube-proxy certificate: {requests:#?}"
    );
}

/// `metadata` of a ConfigMap, as the admin sees it.
fn config_map(c: &Cluster, namespace: &str, name: &str) -> serde_json::Value {
    serde_json::from_str(&kubectl(
        c,
        "cp-1",
        &admin(c),
        &[
            "get",
            "configmap",
            name,
            "-n",
            namespace,
            "-o",
            "json",
            "--show-managed-fields",
        ],
    ))
    .unwrap()
}

/// Add-on manifests in an additional master's config dir: applied with
/// server-side apply by that master, a broken file and a refused object
/// reported by file, object and the API's reason while the rest is
/// applied; a changed manifest applied again, an unchanged one not.
fn assert_manifests_applied(c: &Cluster, master: &str) {
    let dir = c.config_dir(master).join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    let settings = |level: u32| {
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: addons-test\n---\n\
             apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\n  namespace: addons-test\n\
             data:\n  level: \"{level}\"\n"
        )
    };
    std::fs::write(dir.join("settings.yaml"), settings(1)).unwrap();
    std::fs::write(
        dir.join("broken.yaml"),
        "kind: ConfigMap\n metadata: [unclosed\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("refused.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: Not_A_Name\n",
    )
    .unwrap();
    std::fs::write(dir.join("README.md"), "not a manifest").unwrap();

    let out = c.run(master, &["run"]);
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    for line in [
        "2 add-on manifest object(s) not applied",
        "broken.yaml: not YAML",
        "refused.yaml: ConfigMap Not_A_Name: the API server refused it (422 Invalid)",
    ] {
        assert!(said.contains(line), "{line}: {said}");
    }
    let applied = config_map(c, "addons-test", "settings");
    assert_eq!(applied["data"]["level"], "1");
    let managers: Vec<_> = applied["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            format!(
                "{}/{}",
                f["manager"].as_str().unwrap(),
                f["operation"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(managers, ["cluster-agent/Apply"]);

    std::fs::remove_file(dir.join("broken.yaml")).unwrap();
    std::fs::remove_file(dir.join("refused.yaml")).unwrap();
    std::fs::write(dir.join("settings.yaml"), settings(2)).unwrap();
    run_ok(c, master);
    assert_eq!(
        config_map(c, "addons-test", "settings")["data"]["level"],
        "2"
    );
    // An unchanged manifest is not sent again: an operator's edit of the
    // object stays until the manifest itself changes.
    kubectl(
        c,
        "cp-1",
        &admin(c),
        &[
            "patch",
            "configmap",
            "settings",
            "-n",
            "addons-test",
            "-p",
            r#"{"data":{"level":"3"}}"#,
        ],
    );
    run_ok(c, master);
    assert_eq!(
        config_map(c, "addons-test", "settings")["data"]["level"],
        "3"
    );
}

/// The kubelet runs cluster.yaml's `eviction_hard` over its own defaults:
/// the disk signals the tests turn off, the memory one still the default.
fn assert_eviction_thresholds(c: &Cluster, node: &str) {
    let configz: serde_json::Value = serde_json::from_str(&kubectl(
        c,
        "cp-1",
        &admin(c),
        &[
            "get",
            "--raw",
            &format!("/api/v1/nodes/{node}/proxy/configz"),
        ],
    ))
    .unwrap();
    let hard = &configz["kubeletconfig"]["evictionHard"];
    assert_eq!(hard["nodefs.available"], "0%", "{configz}");
    assert_eq!(hard["imagefs.available"], "0%", "{configz}");
    assert_eq!(hard["memory.available"], "100Mi", "{configz}");
}

/// [`rack`], every node's first run started at once and finished.
fn rack_from_cold() -> Cluster {
    start_cold(rack())
}

/// Every node of `c` run at once, workers first, each to success.
fn start_cold(c: Cluster) -> Cluster {
    let children: Vec<_> = WORKERS
        .iter()
        .chain(&MASTERS)
        .map(|n| (*n, spawn_run(&c, n, None)))
        .collect();
    for (node, child) in children {
        finish(node, child);
    }
    c
}

/// The test images into both workers' containerd (no registry here).
fn import_test_images(c: &Cluster, work: &Path) {
    for w in WORKERS {
        support::oci::import_for_node(&c.root(w), &work.join(w));
    }
}

#[test]
fn three_masters_and_two_workers_join_from_cold() {
    let c = rack_from_cold();
    assert_joined(&c, &MASTERS, &WORKERS);
    let kubelets: Vec<&str> = MASTERS.iter().chain(&WORKERS).copied().collect();
    assert_serving_certificates_approved(&c, &kubelets);
    assert_pods_talk_across_nodes(&c);
    assert_service_answers_across_nodes(&c);
    assert_cluster_info_signed(&c);
    assert_kubeconfigs_work(&c, &MASTERS, &WORKERS);
    assert_bootstrap_token_scoped(&c, "w-1");
    for w in WORKERS {
        let node: serde_json::Value = serde_json::from_str(&kubectl(
            &c,
            "cp-1",
            &admin(&c),
            &["get", "node", w, "-o", "json"],
        ))
        .unwrap();
        assert_eq!(node["status"]["nodeInfo"]["kubeletVersion"], VERSION);
    }
    assert_eviction_thresholds(&c, "w-2");
    let minted = names(&tokens(&c));

    // Re-runs change nothing and create nothing: every master again, now
    // that cluster-info carries the bootstrapsigner's signatures.
    for n in MASTERS.iter().chain(&WORKERS) {
        run_ok(&c, n);
    }
    assert_joined(&c, &MASTERS, &WORKERS);
    assert_eq!(names(&tokens(&c)), minted);
    assert_manifests_applied(&c, "cp-2");
    reset_worker_and_rejoin(&c, "w-2");
}

/// The agent's routes on `node` (proto 201), one line each.
/// `node`'s API balancer's view of the API server at `ip`: its state.
fn balancer_state(c: &Cluster, node: &str, ip: &str) -> String {
    let path = cluster_agent::paths::HostPaths::new(&c.root(node), None, None)
        .host(cluster_agent::balancer::VIEW_FILE);
    let Ok(bytes) = std::fs::read(&path) else {
        return "no view".into();
    };
    let view: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    view["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == format!("{ip}:6443"))
        .map_or("absent".into(), |b| {
            b["state"].as_str().unwrap().to_string()
        })
}

fn node_ip(c: &Cluster, node: &str) -> String {
    c.nodes
        .iter()
        .find(|n| n.name == node)
        .unwrap()
        .ip
        .to_string()
}

/// The admin's kubeconfig aimed at `node`'s API balancer, to be used from
/// inside that node's network.
fn admin_via_balancer(c: &Cluster, node: &str) -> PathBuf {
    let text = std::fs::read_to_string(admin(c)).unwrap();
    let endpoint = format!("server: https://{}:6443", node_ip(c, "cp-1"));
    assert!(text.contains(&endpoint), "{text}");
    let path = c.root(node).join("admin-via-balancer.conf");
    std::fs::write(
        &path,
        text.replace(&endpoint, "server: https://127.0.0.1:7445"),
    )
    .unwrap();
    path
}

/// kubectl as the admin through `node`'s balancer; `Err` with its output
/// when it fails.
fn kubectl_via(c: &Cluster, node: &str, args: &[&str]) -> Result<String, String> {
    kubectl_result(c, node, &admin_via_balancer(c, node), "10s", args)
}

/// kubectl with `kubeconfig` inside `node`'s network; `Err` with its output
/// when it fails.
fn kubectl_result(
    c: &Cluster,
    node: &str,
    kubeconfig: &Path,
    timeout: &str,
    args: &[&str],
) -> Result<String, String> {
    let out = c
        .command_on(node, built_binary("kubectl"))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg(format!("--request-timeout={timeout}"))
        .args(args)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).unwrap())
    } else {
        Err(text(&out))
    }
}

/// Both workers' Node leases are renewed after this moment (their kubelets
/// reach the API), and their Nodes are Ready.
fn assert_workers_keep_the_api(c: &Cluster, what: &str) {
    let renewed = |w: &str| {
        kubectl_via(
            c,
            "w-1",
            &[
                "get",
                "lease",
                "-n",
                "kube-node-lease",
                w,
                "-o",
                "jsonpath={.spec.renewTime}",
            ],
        )
        .unwrap_or_default()
    };
    let before: Vec<String> = WORKERS.iter().map(|w| renewed(w)).collect();
    for (w, before) in WORKERS.iter().zip(before) {
        wait_for(&format!("{w}'s kubelet to renew its lease {what}"), || {
            renewed(w) > before
        });
        let node: serde_json::Value = serde_json::from_str(
            &kubectl_via(c, "w-1", &["get", "node", w, "-o", "json"]).unwrap(),
        )
        .unwrap();
        let ready = node["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        assert!(ready, "{w} not Ready {what}: {node}");
    }
}

/// A new pod on `node`, created through w-1's balancer, scheduled and
/// started.
fn assert_new_pod_runs(c: &Cluster, name: &str, node: &str) {
    let manifest = pod_manifest(name, Some(node), &["sleep", "3600"]);
    let manifest_path = c.root("w-1").join(format!("{name}.json"));
    std::fs::write(&manifest_path, manifest).unwrap();
    let path = manifest_path.to_string_lossy().into_owned();
    wait_for(&format!("pod {name} to be created"), || {
        kubectl_via(c, "w-1", &["apply", "-f", &path]).is_ok()
    });
    let waited = kubectl_via(
        c,
        "w-1",
        &[
            "wait",
            "--for=condition=Ready",
            "--timeout=110s",
            &format!("pod/{name}"),
        ],
    );
    assert!(waited.is_ok(), "pod {name} on {node}: {waited:?}");
}

fn ip_in(c: &Cluster, node: &str, args: &[&str]) {
    let out = c.command_on(node, "ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?} on {node}: {}",
        text(&out)
    );
}

/// Every node reaches the API through its own balancer, so losing a master
/// costs nothing: cp-1's API server stops, then cp-1 loses power (its link
/// goes silent, every daemon dies), and the workers' kubelets go on
/// renewing their leases, their Nodes stay Ready and new pods start, all
/// through the balancer; cp-1 comes back and is taken in again. A master
/// whose API server answers but is not ready (its etcd stopped) gets no
/// request; with every API server down a client gets a clear error, and
/// traffic resumes by itself when one returns.
#[test]
fn the_nodes_keep_the_api_when_a_master_goes() {
    let c = rack_from_cold();
    let images = tempfile::tempdir().unwrap();
    import_test_images(&c, images.path());
    let [cp1, cp2, _] = MASTERS.map(|m| node_ip(&c, m));
    for n in MASTERS.iter().chain(&WORKERS) {
        for m in MASTERS {
            let ip = node_ip(&c, m);
            wait_for(&format!("{n}'s balancer to take {m} in"), || {
                balancer_state(&c, n, &ip) == "ready"
            });
        }
    }

    c.stop_unit("cp-1", "kube-apiserver.service");
    for w in WORKERS {
        wait_for(&format!("{w}'s balancer to take cp-1 out"), || {
            balancer_state(&c, w, &cp1) == "unreachable"
        });
    }
    assert_workers_keep_the_api(&c, "with cp-1's API server stopped");
    assert_new_pod_runs(&c, "after-apiserver-stop", "w-2");

    // A power cut: no RST ever comes back from cp-1.
    ip_in(&c, "cp-1", &["link", "set", "eth0", "down"]);
    c.kill_daemons("cp-1");
    assert_workers_keep_the_api(&c, "with cp-1 powered off");
    assert_new_pod_runs(&c, "after-power-cut", "w-1");

    ip_in(&c, "cp-1", &["link", "set", "eth0", "up"]);
    // The link going down took the default route (the Service range's).
    ip_in(&c, "cp-1", &["route", "replace", "default", "dev", "eth0"]);
    run_ok(&c, "cp-1");
    for w in WORKERS {
        wait_for(&format!("{w}'s balancer to take cp-1 back"), || {
            balancer_state(&c, w, &cp1) == "ready"
        });
    }

    // cp-2's API server without its etcd answers /readyz with 500.
    c.stop_unit("cp-2", "etcd.service");
    wait_for("w-1's balancer to see cp-2 not ready", || {
        balancer_state(&c, "w-1", &cp2) == "not-ready"
    });
    for i in 0..30 {
        let read = kubectl_via(
            &c,
            "w-1",
            &["get", "--raw", "/api/v1/namespaces/default/pods"],
        );
        assert!(read.is_ok(), "read {i} through w-1's balancer: {read:?}");
    }
    run_ok(&c, "cp-2");

    for m in MASTERS {
        c.stop_unit(m, "kube-apiserver.service");
    }
    wait_for("w-1's balancer to find no API server", || {
        MASTERS
            .iter()
            .all(|m| balancer_state(&c, "w-1", &node_ip(&c, m)) == "unreachable")
    });
    let refused = kubectl_via(&c, "w-1", &["get", "--raw", "/readyz"]).unwrap_err();
    // The balancer closes what it cannot forward; its view says why.
    assert!(
        refused.contains("Unable to connect to the server"),
        "{refused}"
    );
    let section = c.status_section("w-1", "api-balancer");
    assert_eq!(section["health"], "failed", "{section}");
    assert!(
        section["summary"]
            .as_str()
            .unwrap()
            .contains("sends to 0 of 3 API servers"),
        "{section}"
    );
    for backend in section["data"]["backends"].as_array().unwrap() {
        assert_eq!(backend["state"], "unreachable", "{section}");
        assert!(
            backend["reason"].as_str().is_some_and(|r| !r.is_empty()),
            "{section}"
        );
    }
    run_ok(&c, "cp-3");
    wait_for("traffic through w-1's balancer to resume", || {
        kubectl_via(&c, "w-1", &["get", "--raw", "/readyz"]).is_ok()
    });

    // A master's reset deletes its Node, stops its control plane, and only
    // then takes its etcd member out (an API server without its etcd would
    // hang in its shutdown); the workers' balancers drop it.
    for m in ["cp-1", "cp-2"] {
        run_ok(&c, m);
    }
    let done = reset_ok(&c, "cp-2");
    let at = |what: &str| position(&done, what);
    assert!(
        at("done: delete Node cp-2") < at("done: stop kube-apiserver.service"),
        "{done}"
    );
    assert!(
        at("done: stop kube-apiserver.service") < at("done: remove etcd member"),
        "{done}"
    );
    assert!(
        at("done: remove etcd member") < at("done: stop etcd.service"),
        "{done}"
    );
    for w in WORKERS {
        wait_for(&format!("{w}'s balancer to take cp-2 out"), || {
            balancer_state(&c, w, &cp2) == "unreachable"
        });
    }
}

/// `reset --yes` on `node`, which must succeed: what it printed.
fn reset_ok(c: &Cluster, node: &str) -> String {
    let reset = c.run(node, &["reset", "--yes"]);
    assert!(reset.status.success(), "{}", text(&reset));
    String::from_utf8_lossy(&reset.stdout).into_owned()
}

/// Where `what` is in `output`, which must hold it.
fn position(output: &str, what: &str) -> usize {
    output
        .find(what)
        .unwrap_or_else(|| panic!("{what:?} not in:\n{output}"))
}

fn pod_routes(c: &Cluster, node: &str) -> Vec<String> {
    let out = c
        .command_on(node, "ip")
        .args(["-4", "route", "show", "proto", "201"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A node may delete its own Node object only (RBAC grants `system:nodes`
/// the verb, NodeRestriction narrows it). `reset` on a worker stops its
/// pods and kubelet, deletes its Node with its own identity and removes its
/// kubelet state, kubeconfigs, CNI config and routes; the other nodes drop
/// their route to it; the next `run` joins again and is Ready.
fn reset_worker_and_rejoin(c: &Cluster, worker: &str) {
    let other = WORKERS.iter().find(|w| **w != worker).unwrap();
    let own = c.root(other).join("etc/kubernetes/kubelet.conf");
    let denied = c
        .command_on(other, built_binary("kubectl"))
        .arg("--kubeconfig")
        .arg(&own)
        .args(["delete", "node", "cp-1", "--wait=false"])
        .output()
        .unwrap();
    assert!(
        !denied.status.success() && text(&denied).contains("Forbidden"),
        "{other} may not delete cp-1: {}",
        text(&denied)
    );
    let routes_before = pod_routes(c, other).len();

    let out = c.run(worker, &["reset", "--yes"]);
    assert!(out.status.success(), "reset {worker}: {}", text(&out));
    let said = text(&out);
    for line in [
        "done: stop kubelet.service",
        "done: stop and remove every pod",
        &format!("done: delete Node {worker}"),
        "done: stop kube-proxy.service",
        "done: remove kube-proxy's Service rules",
        "done: remove the routes to other nodes' pods",
    ] {
        assert!(said.contains(line), "{line}: {said}");
    }
    assert!(!names(&items(c, &["nodes"])).contains(&worker.to_string()));
    for gone in [
        "var/lib/kubelet",
        "etc/kubernetes/kubelet.conf",
        "etc/kubernetes/bootstrap-kubelet.conf",
        "etc/cni/net.d/10-cluster-agent.conflist",
        "var/lib/cni",
        "etc/kubernetes/kube-proxy.conf",
        "var/lib/kube-proxy",
    ] {
        assert!(
            !support::exists(&c.root(worker).join(gone)),
            "{worker}: {gone} remains"
        );
    }
    assert_eq!(pod_routes(c, worker), Vec::<String>::new());
    assert!(
        !iptables_rules(c, worker).contains("KUBE-SERVICES"),
        "{worker}: kube-proxy's rules remain"
    );
    wait_for(
        &format!("{other} to drop its route to {worker}'s pods"),
        || pod_routes(c, other).len() == routes_before - 1,
    );

    // The rejoin crashes right after each of its steps in turn, every run
    // resuming where the last stopped, before one run finishes it.
    let attempts = |step: &str| {
        c.journal(worker)["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == step)
            .map(|s| s["attempts"].as_u64().unwrap())
    };
    for step in WORKER_STEPS {
        let out = spawn_run(c, worker, Some(&format!("{step}:after")))
            .wait_with_output()
            .unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&out.status),
            Some(6),
            "{worker} {step}:after: {}",
            text(&out)
        );
        if step == "worker-join-material" {
            // A token that expired before the kubelet used it is replaced
            // by the next run, not kept for good.
            assert_eq!(attempts(step), Some(1));
            std::fs::write(
                c.state_dir(worker).join("bootstrap-token.json"),
                r#"{"expires": "2000-01-01T00:00:00Z"}"#,
            )
            .unwrap();
        }
    }
    assert_eq!(attempts("worker-join-material"), Some(2), "fetched again");
    run_ok(c, worker);
    assert_all_done(c, worker);
    wait_for(
        &format!("{other} to route to {worker}'s pods again"),
        || pod_routes(c, other).len() == routes_before,
    );
    let (ready, node) = node_ready(c, worker);
    assert!(ready, "{worker} Ready again: {node:#}");
}

/// Whether `node`'s Ready condition is True, and the Node as the admin
/// sees it.
fn node_ready(c: &Cluster, node: &str) -> (bool, serde_json::Value) {
    let object: serde_json::Value = serde_json::from_str(&kubectl(
        c,
        "cp-1",
        &admin(c),
        &["get", "node", node, "-o", "json"],
    ))
    .unwrap();
    let ready = object["status"]["conditions"]
        .as_array()
        .is_some_and(|all| {
            all.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        });
    (ready, object)
}

/// After interrupted runs and re-runs: every step done, one Node, no
/// duplicate objects, the kubelet bootstrapped once (one client CSR).
fn assert_pair_converged(c: &Cluster, what: &str) {
    eprintln!("checking: {what}");
    assert_joined(c, &["cp-1"], &["w-1"]);
}

/// A crash before and after every Kubernetes step, on a master and on a
/// worker, then a re-run: one control plane, one Node, no duplicate
/// objects, the kubelet's first certificate kept. One pair at a time: the
/// controller-manager and scheduler serve their health ports on
/// 127.0.0.1, as kubeadm's do, so two masters cannot share a loopback.
#[test]
fn a_crash_at_every_kubernetes_step_converges() {
    let _turn = loopback_turn();
    let master_steps = [
        "control-plane-binaries",
        "control-plane-kubeconfigs",
        "control-plane-config",
        "kube-apiserver-start",
        "controllers-start",
        "cluster-objects",
        // The master's kubelet shares its steps with the worker's, crashed
        // there; labelling is the master's own.
        "node-role-label",
    ];
    let worker_steps = [
        "kubelet-binary",
        "worker-join-material",
        "kubelet-version-skew",
        "kubelet-config",
        "kubelet-start",
        "pod-network",
        "pod-routes",
        "node-ready",
    ];
    let points: Vec<(&str, &str, &str)> = master_steps
        .iter()
        .map(|s| ("cp-1", *s))
        .chain(worker_steps.iter().map(|s| ("w-1", *s)))
        .flat_map(|(node, step)| ["before", "after"].map(|when| (node, step, when)))
        .collect();
    for (node, step, when) in points {
        let c = pair();
        if node == "w-1" {
            run_ok(&c, "cp-1");
        }
        let out = spawn_run(&c, node, Some(&format!("{step}:{when}")))
            .wait_with_output()
            .unwrap();
        // A step whose effect is there from the start (the binaries) never
        // applies, so it cannot crash after applying.
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

/// `networking.cni.manifest`: the master applies the operator's CNI
/// manifest, no node writes the built-in CNI config or runs the route
/// keeper, and a Node is Ready once that CNI's installer configured the
/// node; until then the journal says why it is not Ready. The installer is
/// played by the test (a real CNI's needs a registry image): it writes a
/// conflist, as Calico's install-cni container does.
#[test]
fn an_operator_cni_manifest_replaces_the_built_in_network() {
    let _turn = loopback_turn();
    let c = pair();
    let yaml = c.cluster_yaml().replacen(
        "  networking:\n",
        "  networking:\n    cni: {manifest: cni/operator.yaml}\n",
        1,
    );
    assert!(yaml.contains("cni/operator.yaml"), "{yaml}");
    for n in ["cp-1", "w-1"] {
        c.write_config(n, &yaml);
        let dir = c.config_dir(n).join("cni");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("operator.yaml"),
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: operator-cni\n  namespace: kube-system\ndata:\n  backend: test\n",
        )
        .unwrap();
    }
    let children = cold_start(&c);
    let waiting_for = |node: &str| {
        if !c.state_dir(node).join("journal.json").exists() {
            return String::new();
        }
        c.journal(node)["steps"]
            .as_array()
            .map(|steps| {
                steps
                    .iter()
                    .find(|s| s["name"] == "node-ready")
                    .map(|s| s["waiting_for"].to_string())
                    .unwrap_or_default()
            })
            .unwrap_or_default()
    };
    for node in ["cp-1", "w-1"] {
        let deadline = Instant::now() + Duration::from_secs(240);
        while !waiting_for(node).contains("NetworkPluginNotReady") {
            assert!(
                Instant::now() < deadline,
                "{node} never waited for the operator's CNI: {}",
                waiting_for(node)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        // This installer hands out the range node IPAM gives the Node.
        let mut pod_cidr = String::new();
        wait_for(&format!("a pod CIDR for {node}"), || {
            pod_cidr = kubectl(
                &c,
                "cp-1",
                &admin(&c),
                &["get", "node", node, "-o", "jsonpath={.spec.podCIDR}"],
            );
            !pod_cidr.is_empty()
        });
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "operator",
            "plugins": [{
                "type": "bridge",
                "bridge": format!("op{}", &node[..2]),
                "isGateway": true,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": pod_cidr}]]},
            }],
        });
        let net_d = c.root(node).join("etc/cni/net.d");
        std::fs::create_dir_all(&net_d).unwrap();
        std::fs::write(net_d.join("10-operator.conflist"), conflist.to_string()).unwrap();
    }
    for (node, child) in children {
        finish(node, child);
    }
    let applied = items(&c, &["configmaps", "-n", "kube-system"]);
    assert!(
        names(&applied).contains(&"operator-cni".to_string()),
        "the CNI manifest was applied: {:?}",
        names(&applied)
    );
    for node in ["cp-1", "w-1"] {
        let journal = c.journal(node);
        for step in ["pod-network", "pod-routes"] {
            let s = journal["steps"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["name"] == step)
                .unwrap();
            assert_eq!(s["status"], "skipped", "{node} {step}: {s}");
            assert!(
                s["note"]
                    .as_str()
                    .unwrap()
                    .contains("networking.cni.manifest"),
                "{node} {step}: {s}"
            );
        }
        assert!(
            !support::exists(&c.root(node).join("etc/cni/net.d/10-cluster-agent.conflist")),
            "{node}: no built-in CNI config"
        );
        assert!(
            !support::exists(
                &c.root(node)
                    .join("etc/systemd/system/cluster-pod-routes.service")
            ),
            "{node}: no route keeper"
        );
    }
    for node in ["cp-1", "w-1"] {
        let (ready, object) = node_ready(&c, node);
        assert!(ready, "{node} Ready on the operator's CNI: {object:#}");
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
    let _turn = loopback_turn();
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
    let _turn = loopback_turn();
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
    assert_eq!(approver_holder(&c), "cp-1");
}

/// The pid the process backend recorded for `unit` on `node`.
fn unit_pid(c: &Cluster, node: &str, unit: &str) -> String {
    let file = c.root(node).join(format!("run/cluster-agent/{unit}.pid"));
    let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    text.split_whitespace().next().unwrap().to_string()
}

/// A renewed certificate reaches the component that reads it: the API
/// server's serving certificate is reissued (here: removed, so the PKI
/// phase issues a new one) and the next run restarts kube-apiserver, which
/// then serves the new certificate; the components whose inputs did not
/// change keep running.
#[test]
fn renewed_certificates_restart_the_components_that_read_them() {
    let _turn = loopback_turn();
    let c = pair();
    run_ok(&c, "cp-1");
    let apiserver = unit_pid(&c, "cp-1", "kube-apiserver.service");
    let scheduler = unit_pid(&c, "cp-1", "kube-scheduler.service");
    let pki = c.root("cp-1").join("etc/kubernetes/pki");
    let old = std::fs::read_to_string(pki.join("apiserver.crt")).unwrap();
    std::fs::remove_file(pki.join("apiserver.crt")).unwrap();
    std::fs::remove_file(pki.join("apiserver.key")).unwrap();
    run_ok(&c, "cp-1");
    let new = std::fs::read_to_string(pki.join("apiserver.crt")).unwrap();
    assert_ne!(old, new, "a new certificate was issued");
    assert_ne!(
        unit_pid(&c, "cp-1", "kube-apiserver.service"),
        apiserver,
        "kube-apiserver restarted"
    );
    // The scheduler's inputs did not change, so the agent leaves it alone;
    // it may still have exited by itself, as upstream's does when the API
    // server was away past its lease's renew deadline (a loaded machine).
    if unit_pid(&c, "cp-1", "kube-scheduler.service") != scheduler {
        let log = std::fs::read_to_string(
            c.root("cp-1")
                .join("var/log/cluster-agent/kube-scheduler.service.log"),
        )
        .unwrap();
        assert!(
            log.to_ascii_lowercase().contains("leaderelection lost"),
            "the scheduler restarted without losing its lease: {log}"
        );
    }
    let served = Command::new("openssl")
        .args(["s_client", "-connect"])
        .arg(format!("{}:6443", c.nodes[0].ip))
        .arg("-showcerts")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl runs");
    let served = String::from_utf8_lossy(&served.stdout);
    let first = new.lines().nth(1).unwrap();
    assert!(
        served.contains(first),
        "the new certificate is served: {served}"
    );

    // A restart owed when a run died between rewriting the kubelet's
    // inputs and restarting it is made by the next run, though the files
    // already look right.
    let kubelet = unit_pid(&c, "cp-1", "kubelet.service");
    let due = c.state_dir("cp-1").join("kubelet-restart-due");
    std::fs::write(&due, "").unwrap();
    run_ok(&c, "cp-1");
    assert_ne!(
        unit_pid(&c, "cp-1", "kubelet.service"),
        kubelet,
        "kubelet restarted"
    );
    assert!(!due.exists(), "the owed restart is forgotten once made");
}

/// The rack with `control_plane_endpoint` on `<prefix>.100`, an address no
/// node has, and `floating_endpoint: true`.
fn floating_rack() -> (Cluster, String) {
    let c = rack();
    let cp1 = node_ip(&c, "cp-1");
    let vip = format!("{}.100", cp1.rsplit_once('.').unwrap().0);
    let yaml = c.cluster_yaml().replace(
        &format!("control_plane_endpoint: {cp1}:6443\n"),
        &format!("control_plane_endpoint: {vip}:6443\n  floating_endpoint: true\n"),
    );
    assert!(yaml.contains("floating_endpoint: true"), "{yaml}");
    for n in MASTERS.iter().chain(&WORKERS) {
        c.write_config(n, &yaml);
    }
    (c, vip)
}

/// `master`'s floating endpoint keeper's view.
fn keeper_view(c: &Cluster, master: &str) -> Option<serde_json::Value> {
    let path = cluster_agent::paths::HostPaths::new(&c.root(master), None, None)
        .host(cluster_agent::floating::VIEW_FILE);
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The masters whose network has `vip` now.
fn vip_holders(c: &Cluster, vip: &str) -> Vec<&'static str> {
    MASTERS
        .into_iter()
        .filter(|m| {
            let out = c
                .command_on(m, "ip")
                .args(["-4", "-o", "address", "show", "dev", "eth0"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).contains(&format!("inet {vip}/32"))
        })
        .collect()
}

/// The one master but those in `not` (powered off, say) that holds `vip`:
/// its keeper says so and no other such master's network has the address.
fn sole_holder(c: &Cluster, vip: &str, not: &[&str]) -> &'static str {
    let mut found = None;
    wait_for(&format!("one master but {not:?} to hold {vip}"), || {
        let holders: Vec<_> = vip_holders(c, vip)
            .into_iter()
            .filter(|h| !not.contains(h))
            .collect();
        found = match holders[..] {
            [one] => Some(one),
            _ => None,
        };
        found.is_some_and(|h| keeper_view(c, h).is_some_and(|v| v["holding"] == true))
    });
    found.unwrap()
}

fn mac_of(c: &Cluster, node: &str) -> String {
    let out = c
        .command_on(node, "ip")
        .args(["-j", "link", "show", "eth0"])
        .output()
        .unwrap();
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    links[0]["address"].as_str().unwrap().to_string()
}

/// w-1's neighbour entry for `vip`: the MAC it sends the address's
/// packets to.
fn neighbour_mac(c: &Cluster, vip: &str) -> Option<String> {
    let out = c
        .command_on("w-1", "ip")
        .args(["-j", "neigh", "show", vip])
        .output()
        .unwrap();
    let entries: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    entries[0]["lladdr"].as_str().map(str::to_string)
}

/// The operator's kubeconfig (server: the floating endpoint) from w-1, as
/// an operator keeps it: a copy outside any node, which no reset removes.
fn kubectl_via_vip(c: &Cluster) -> Result<String, String> {
    let copy = c.root("w-1").join("operator-admin.conf");
    if !copy.exists() {
        std::fs::copy(admin(c), &copy).unwrap();
    }
    kubectl_result(c, "w-1", &copy, "2s", &["get", "--raw", "/readyz"])
}

/// With `floating_endpoint: true` the masters elect one holder of the
/// endpoint's address through their Lease: it has the address, announces
/// it (w-1's neighbour entry follows it) and forwards to every ready API
/// server. A holder whose own API server stops keeps the address, and
/// kubectl through it answers all the while; a holder that loses power is
/// replaced within seconds; a keeper killed holding the address removes it
/// when it starts again; a reset hands the address over at once.
#[test]
fn the_floating_endpoint_follows_a_working_master() {
    let (c, vip) = floating_rack();
    let c = start_cold(c);
    let first = sole_holder(&c, &vip, &[]);
    assert!(kubectl_via_vip(&c).is_ok_and(|r| r == "ok"));
    wait_for("w-1's neighbour entry to name the holder", || {
        neighbour_mac(&c, &vip) == Some(mac_of(&c, first))
    });
    let section = c.status_section(first, "api-address");
    assert_eq!(section["health"], "ok", "{section}");
    assert!(
        section["summary"]
            .as_str()
            .unwrap()
            .starts_with(&format!("this node holds {vip}:6443 on eth0")),
        "{section}"
    );
    let other = MASTERS.into_iter().find(|m| *m != first).unwrap();
    let section = c.status_section(other, "api-address");
    assert!(
        section["summary"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{first} holds {vip}:6443")),
        "{section}"
    );

    // Its API server stops: the holder renews through the node's balancer
    // and forwards to the others, so the address stays and every request
    // through it succeeds.
    c.stop_unit(first, "kube-apiserver.service");
    let stopped = Instant::now();
    let mut requests = 0;
    while stopped.elapsed() < cluster_agent::floating::LEASE_DURATION * 2 {
        let answer = kubectl_via_vip(&c);
        assert!(
            answer.is_ok(),
            "request {requests} through {vip}: {answer:?}"
        );
        requests += 1;
    }
    assert_eq!(vip_holders(&c, &vip), [first]);
    eprintln!("{first}'s API server stopped: {requests} requests through {vip}, all answered");

    // The holder loses power: another master takes over.
    let cut = Instant::now();
    ip_in(&c, first, &["link", "set", "eth0", "down"]);
    c.kill_daemons(first);
    let second = sole_holder(&c, &vip, &[first]);
    wait_for(
        &format!("kubectl through {vip} after the power cut"),
        || kubectl_via_vip(&c).is_ok(),
    );
    eprintln!(
        "power cut: {vip} moved {first} → {second}, answering again after {:?}",
        cut.elapsed()
    );
    wait_for("w-1's neighbour entry to follow the address", || {
        neighbour_mac(&c, &vip) == Some(mac_of(&c, second))
    });

    // Power back: the killed keeper left the address on its link; started
    // again, it removes it and follows the holder.
    ip_in(&c, first, &["link", "set", "eth0", "up"]);
    ip_in(&c, first, &["route", "replace", "default", "dev", "eth0"]);
    assert!(vip_holders(&c, &vip).contains(&first));
    run_ok(&c, first);
    assert_eq!(sole_holder(&c, &vip, &[]), second);
    let section = c.status_section(first, "api-address");
    assert_eq!(section["health"], "ok", "{section}");

    // A reset stops the keeper before its API server, so it releases the
    // Lease and the next master need not wait it out.
    let done = reset_ok(&c, second);
    let at = |what: &str| position(&done, what);
    assert!(
        at("done: stop cluster-api-address.service") < at("done: stop kube-apiserver.service"),
        "{done}"
    );
    let handed = Instant::now();
    let third = sole_holder(&c, &vip, &[second]);
    eprintln!(
        "reset: {vip} moved {second} → {third} in {:?}",
        handed.elapsed()
    );
    wait_for(&format!("kubectl through {vip} after the reset"), || {
        kubectl_via_vip(&c).is_ok()
    });
}

const DASHBOARD_STEPS: [&str; 4] = [
    "ceph-dashboard-cert",
    "ceph-dashboard-settings",
    "ceph-dashboard-enable",
    "ceph-dashboard-admin",
];

/// `ceph.dashboard: true` on a master that is also the monitor: runs
/// crashed before and after each dashboard step in turn resume, and the
/// last run converges on one served dashboard whose password file is the
/// stored one. A further run issues nothing new.
#[test]
fn a_master_monitors_dashboard_converges_after_a_crash_at_each_step() {
    support::require_tool("ceph-mgr", "ceph-mgr");
    let _turn = loopback_turn();
    let c = with_images(Cluster::new(&[("cp-1", &["control-plane", "ceph-mon"])]));
    let yaml = c.cluster_yaml().replacen(
        "    cluster_network:",
        "    dashboard: true\n    cluster_network:",
        1,
    );
    assert!(yaml.contains("dashboard: true"), "{yaml}");
    c.write_config("cp-1", &yaml);
    c.ceph_test_overrides("cp-1");
    for step in DASHBOARD_STEPS {
        for when in ["before", "after"] {
            let out = spawn_run(&c, "cp-1", Some(&format!("{step}:{when}")))
                .wait_with_output()
                .unwrap();
            let aborted = std::os::unix::process::ExitStatusExt::signal(&out.status) == Some(6);
            assert!(aborted, "cp-1 {step}:{when}: {}", text(&out));
        }
    }
    run_ok(&c, "cp-1");
    assert_all_done(&c, "cp-1");
    let services = c.ceph_json("cp-1", &["mgr", "services"]);
    let ip = node_ip(&c, "cp-1");
    assert_eq!(
        services["dashboard"],
        format!("https://{ip}:8443/"),
        "{services:#}"
    );
    let root = c.root("cp-1");
    let password = std::fs::read_to_string(root.join("etc/ceph/dashboard/admin-password")).unwrap();
    let stored = c.ceph(
        "cp-1",
        &[
            "config-key",
            "get",
            "cluster-agent/ceph-dashboard/admin-password",
        ],
    );
    assert!(stored.status.success(), "{}", text(&stored));
    assert_eq!(String::from_utf8_lossy(&stored.stdout), password);
    let user = c.ceph_json("cp-1", &["dashboard", "ac-user-show", "admin"]);
    assert_eq!(
        user["roles"],
        serde_json::json!(["administrator"]),
        "{user:#}"
    );

    let cert = std::fs::read(root.join("etc/ceph/dashboard/dashboard.crt")).unwrap();
    run_ok(&c, "cp-1");
    assert_eq!(
        std::fs::read(root.join("etc/ceph/dashboard/dashboard.crt")).unwrap(),
        cert,
        "a converged node keeps its certificate"
    );
    assert_all_done(&c, "cp-1");
}
