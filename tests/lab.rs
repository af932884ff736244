//! `cluster-agent lab`: a cluster on this machine from one command, with
//! real etcd 3.6, ceph-mon, Kubernetes and containerd (as `.ci/setup`
//! builds them), and nothing left behind by `lab down`.

mod support;

use std::path::Path;
use std::process::{Command, Output};

use support::{AGENT, text};

fn lab(args: &[&str]) -> Output {
    Command::new(AGENT)
        .arg("lab")
        .args(args)
        .env_remove("NOTIFY_SOCKET")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

/// Processes whose command line or environment mention `dir`.
fn processes_of(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let p = entry.path();
        for file in ["cmdline", "environ"] {
            if let Ok(bytes) = std::fs::read(p.join(file))
                && String::from_utf8_lossy(&bytes).contains(&needle)
            {
                found.push(format!(
                    "{}: {}",
                    p.display(),
                    String::from_utf8_lossy(&bytes).replace('\0', " ")
                ));
                break;
            }
        }
    }
    found
}

#[test]
fn lab_up_status_down_leaves_nothing_behind() {
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("lab");
    let d = dir.to_str().unwrap();

    let up = lab(&[
        "up",
        "--dir",
        d,
        "--masters",
        "1",
        "--workers",
        "1",
        "--ceph-mons",
        "1",
    ]);
    assert!(up.status.success(), "{}", text(&up));
    assert!(text(&up).contains("2 nodes"), "{}", text(&up));
    // The last line points kubectl at the lab's real API server.
    let stdout = String::from_utf8_lossy(&up.stdout);
    let kubeconfig = stdout
        .lines()
        .last()
        .and_then(|l| l.strip_prefix("export KUBECONFIG="))
        .unwrap_or_else(|| panic!("no export line: {stdout}"));
    let ready = Command::new(support::built_binary("kubectl"))
        .args(["--kubeconfig", kubeconfig, "get", "--raw", "/readyz"])
        .output()
        .unwrap();
    assert!(ready.status.success(), "{}", text(&ready));
    assert_eq!(String::from_utf8_lossy(&ready.stdout), "ok");
    let nodes = Command::new(support::built_binary("kubectl"))
        .args(["--kubeconfig", kubeconfig, "get", "nodes", "-o", "name"])
        .output()
        .unwrap();
    // Masters are Nodes too.
    assert_eq!(
        String::from_utf8_lossy(&nodes.stdout).trim(),
        "node/cp-1\nnode/w-1"
    );
    // Everything ran: the worker joined Kubernetes through the master's
    // join service, the monitor is in quorum.
    assert!(
        dir.join("w-1/var/lib/kubelet/pki/kubelet-client-current.pem")
            .exists()
    );
    assert!(dir.join("cp-1/var/lib/ceph/mon/ceph-cp-1/done").exists());

    let status = lab(&["status", "--dir", d]);
    assert!(status.status.success(), "{}", text(&status));
    assert!(text(&status).contains("done"), "{}", text(&status));

    let again = lab(&["up", "--dir", d]);
    assert_eq!(again.status.code(), Some(2), "{}", text(&again));
    assert!(text(&again).contains("lab down"), "{}", text(&again));

    assert!(!processes_of(&dir).is_empty(), "the lab's daemons run");
    let down = lab(&["down", "--dir", d]);
    assert!(down.status.success(), "{}", text(&down));
    let left = processes_of(&dir);
    assert!(left.is_empty(), "left running: {left:#?}");
    assert!(!dir.exists());
}

/// `--netns --floating-endpoint`: the API endpoint is an address no node
/// has, held by the master, and the exported kubeconfig reaches the API
/// through it from a node's network.
#[test]
fn a_lab_with_a_floating_endpoint_answers_on_it() {
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("lab");
    let d = dir.to_str().unwrap();
    let up = lab(&[
        "up",
        "--dir",
        d,
        "--netns",
        "--floating-endpoint",
        "--masters",
        "1",
        "--workers",
        "1",
        "--ceph-mons",
        "0",
    ]);
    let down = || {
        let out = lab(&["down", "--dir", d]);
        assert!(out.status.success(), "{}", text(&out));
    };
    if !up.status.success() {
        down();
        panic!("{}", text(&up));
    }
    let stdout = String::from_utf8_lossy(&up.stdout);
    let kubeconfig = stdout
        .lines()
        .last()
        .and_then(|l| l.strip_prefix("export KUBECONFIG="))
        .unwrap_or_else(|| panic!("no export line: {stdout}"))
        .to_string();
    let endpoint = "198.19.250.10";
    assert!(
        std::fs::read_to_string(&kubeconfig)
            .unwrap()
            .contains(&format!("server: https://{endpoint}:6443")),
        "{kubeconfig}"
    );
    // The keeper reports ready before its first campaign; poll.
    let has_address = || {
        let out = Command::new("ip")
            .args([
                "-n",
                "calab-cp-1",
                "-4",
                "-o",
                "address",
                "show",
                "dev",
                "eth0",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains(&format!("inet {endpoint}/32"))
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut held = has_address();
    while !held && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
        held = has_address();
    }
    let ready = Command::new("nsenter")
        .arg("--net=/run/netns/calab-w-1")
        .arg("--")
        .arg(support::built_binary("kubectl"))
        .args(["--kubeconfig", &kubeconfig, "get", "--raw", "/readyz"])
        .output()
        .unwrap();
    down();
    assert!(held, "cp-1 never held {endpoint}");
    assert!(ready.status.success(), "{}", text(&ready));
    assert_eq!(String::from_utf8_lossy(&ready.stdout), "ok");
}

#[test]
fn several_masters_without_namespaces_are_refused_plainly() {
    let base = tempfile::tempdir().unwrap();
    let d = base.path().join("lab");
    let out = lab(&["up", "--dir", d.to_str().unwrap(), "--masters", "3"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("--netns"), "{}", text(&out));
    assert!(!d.exists());
}

#[test]
fn without_the_built_binaries_the_lab_says_how_to_build_them() {
    let base = tempfile::tempdir().unwrap();
    let d = base.path().join("lab");
    let empty = base.path().join("no-binaries");
    std::fs::create_dir_all(&empty).unwrap();
    let out = lab(&[
        "up",
        "--dir",
        d.to_str().unwrap(),
        "--bin-dir",
        empty.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let shown = text(&out);
    assert!(
        shown.contains("kube-apiserver") && shown.contains(".ci/setup"),
        "{shown}"
    );
    assert!(!d.exists(), "nothing laid out");
}

/// `--ceph-dashboard`: the monitor's manager serves Ceph's dashboard over
/// HTTPS with a certificate from the cluster CA (`openssl verify` agrees,
/// curl pinned to that CA connects), and the generated admin password,
/// 0600 on the node and in no log, logs in.
#[test]
fn a_lab_with_the_ceph_dashboard_serves_it_over_tls_from_the_cluster_ca() {
    support::require_tool("curl", "curl");
    support::require_tool("openssl", "openssl");
    support::require_tool("ceph-mgr", "ceph-mgr");
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("lab");
    let d = dir.to_str().unwrap();
    let up = lab(&[
        "up",
        "--dir",
        d,
        "--masters",
        "1",
        "--workers",
        "0",
        "--ceph-mons",
        "1",
        "--ceph-dashboard",
    ]);
    let down = || {
        let out = lab(&["down", "--dir", d]);
        assert!(out.status.success(), "{}", text(&out));
    };
    if !up.status.success() {
        down();
        panic!("{}", text(&up));
    }
    let root = dir.join("cp-1");
    let status = Command::new(AGENT)
        .arg("--root")
        .arg(&root)
        .args(["status", "--json"])
        .output()
        .unwrap();
    let report: serde_json::Value =
        serde_json::from_slice(&status.stdout).unwrap_or_else(|_| panic!("{}", text(&status)));
    let ceph = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "ceph")
        .cloned()
        .unwrap();
    let url = ceph["data"]["dashboard"].as_str().map(str::to_string);
    let ca = root.join("etc/kubernetes/pki/ca.crt");
    let cert = root.join("etc/ceph/dashboard/dashboard.crt");
    let verify = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(&ca)
        .arg(&cert)
        .output()
        .unwrap();
    let password_file = root.join("etc/ceph/dashboard/admin-password");
    let password = std::fs::read_to_string(&password_file).unwrap_or_default();
    let mode = std::fs::metadata(&password_file)
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
        .unwrap_or_default();
    let login = url.as_ref().map(|url| {
        Command::new("curl")
            .args(["-sS", "--max-time", "20", "--cacert"])
            .arg(&ca)
            .args(["-X", "POST", "-w", "\n%{http_code}"])
            .args(["-H", "Accept: application/vnd.ceph.api.v1.0+json"])
            .args(["-H", "Content-Type: application/json"])
            .args([
                "-d",
                &serde_json::json!({"username": "admin", "password": password}).to_string(),
            ])
            .arg(format!("{url}api/auth"))
            .output()
            .unwrap()
    });
    let wrong = url.as_ref().map(|url| {
        Command::new("curl")
            .args(["-sS", "--max-time", "20", "--cacert"])
            .arg(&ca)
            .args(["-X", "POST", "-w", "\n%{http_code}"])
            .args(["-H", "Accept: application/vnd.ceph.api.v1.0+json"])
            .args(["-H", "Content-Type: application/json"])
            .args(["-d", r#"{"username": "admin", "password": "not-it"}"#])
            .arg(format!("{url}api/auth"))
            .output()
            .unwrap()
    });
    // The monitors' store keeps it (where every monitor node reads it);
    // nothing else may: no log, no journal, no unit.
    let mon_store = root.join("var/lib/ceph/mon");
    let leaked: Vec<_> = grep_tree(&dir, &password)
        .into_iter()
        .filter(|p| !p.starts_with(&mon_store))
        .collect();
    down();

    let url = url.unwrap_or_else(|| panic!("no dashboard in status: {ceph:#}"));
    assert!(url.starts_with("https://127.77.0.11:8443"), "{url}");
    assert!(verify.status.success(), "{}", text(&verify));
    assert_eq!(password.len(), 24, "a generated password");
    assert_eq!(mode, 0o600);
    let login = login.unwrap();
    let answer = String::from_utf8_lossy(&login.stdout);
    assert!(
        answer.ends_with("\n201") && answer.contains("\"token\""),
        "{}",
        text(&login)
    );
    // The dashboard answers bad credentials with 400 and this code.
    let refused = String::from_utf8_lossy(&wrong.unwrap().stdout).into_owned();
    assert!(
        refused.ends_with("\n400") && refused.contains("invalid_credentials"),
        "{refused}"
    );
    assert_eq!(
        leaked,
        vec![password_file.clone()],
        "the password is in its own file only"
    );
}

/// Every file under `dir` whose bytes contain `needle`.
fn grep_tree(dir: &Path, needle: &str) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file()
                && std::fs::read(&path)
                    .is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle.as_bytes()))
            {
                found.push(path);
            }
        }
    }
    found
}
