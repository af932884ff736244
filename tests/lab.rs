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

/// A `--netns` lab names its bridge and namespaces the same every time
/// (`calab0`, `calab-<node>`): such labs take turns. Hold the turn until
/// `lab down`.
fn netns_turn() -> std::sync::MutexGuard<'static, ()> {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    TURN.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `lab up --dir <dir> ARGS` that must succeed (a failed one is taken down
/// before the test fails), and its stdout.
fn lab_up_in(dir: &Path, args: &[&str]) -> String {
    let d = dir.to_str().unwrap();
    let up = lab(&[&["up", "--dir", d][..], args].concat());
    if !up.status.success() {
        eprintln!("lab up failed: {}", text(&up));
        lab_down(dir);
        panic!("{}", text(&up));
    }
    String::from_utf8_lossy(&up.stdout).into_owned()
}

fn lab_down(dir: &Path) {
    let out = lab(&["down", "--dir", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
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
    let _turn = netns_turn();
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("lab");
    let stdout = lab_up_in(
        &dir,
        &[
            "--netns",
            "--floating-endpoint",
            "--masters",
            "1",
            "--workers",
            "1",
            "--ceph-mons",
            "0",
        ],
    );
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
    lab_down(&dir);
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

/// `--ceph-dashboard` with three masters, each a monitor: the active
/// manager serves Ceph's dashboard over HTTPS with a certificate from the
/// cluster CA (`openssl verify` agrees, curl pinned to that CA connects),
/// each standby answers on its own node's address with a redirect to it,
/// and the admin password, generated once and 0600 on every monitor node
/// alike and in no log, logs in.
#[test]
fn a_lab_with_the_ceph_dashboard_serves_it_over_tls_from_the_cluster_ca() {
    support::require_tool("curl", "curl");
    support::require_tool("openssl", "openssl");
    support::require_tool("ceph-mgr", "ceph-mgr");
    let _turn = netns_turn();
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("lab");
    lab_up_in(
        &dir,
        &[
            "--netns",
            "--masters",
            "3",
            "--workers",
            "0",
            "--ceph-mons",
            "3",
            "--ceph-dashboard",
        ],
    );
    let masters = ["cp-1", "cp-2", "cp-3"];
    let in_netns = |node: &str, program: &str| {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/calab-{node}"))
            .arg("--")
            .arg(program);
        cmd
    };
    let root = dir.join("cp-1");
    let status = in_netns("cp-1", AGENT)
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
    let active = ceph["data"]["managers"]["active"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let ca = root.join("etc/kubernetes/pki/ca.crt");
    let verify: Vec<Output> = masters
        .iter()
        .map(|m| {
            Command::new("openssl")
                .arg("verify")
                .arg("-CAfile")
                .arg(&ca)
                .arg(dir.join(m).join("etc/ceph/dashboard/dashboard.crt"))
                .output()
                .unwrap()
        })
        .collect();
    let password_files: Vec<_> = masters
        .iter()
        .map(|m| dir.join(m).join("etc/ceph/dashboard/admin-password"))
        .collect();
    let passwords: Vec<String> = password_files
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap_or_default())
        .collect();
    let modes: Vec<u32> = password_files
        .iter()
        .map(|f| {
            std::fs::metadata(f)
                .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
                .unwrap_or_default()
        })
        .collect();
    let password = passwords[0].clone();
    let post = |url: &str, body: &str| {
        in_netns("cp-1", "curl")
            .args(["-sS", "--max-time", "20", "--cacert"])
            .arg(&ca)
            .args(["-X", "POST", "-w", "\n%{http_code}"])
            .args(["-H", "Accept: application/vnd.ceph.api.v1.0+json"])
            .args(["-H", "Content-Type: application/json"])
            .args(["-d", body])
            .arg(format!("{url}api/auth"))
            .output()
            .unwrap()
    };
    let login = url.as_ref().map(|url| {
        post(
            url,
            &serde_json::json!({"username": "admin", "password": password}).to_string(),
        )
    });
    let wrong = url
        .as_ref()
        .map(|url| post(url, r#"{"username": "admin", "password": "not-it"}"#));
    // The standbys, each on its own address with its own certificate.
    let standbys: Vec<(String, Output)> = (1..=3)
        .filter(|i| format!("cp-{i}") != active)
        .map(|i| {
            let address = format!("https://198.19.250.{}:8443/", 10 + i);
            let out = in_netns("cp-1", "curl")
                .args(["-sS", "--max-time", "20", "--cacert"])
                .arg(&ca)
                .args(["-o", "/dev/null", "-w", "%{http_code} %{redirect_url}"])
                .arg(&address)
                .output()
                .unwrap();
            (address, out)
        })
        .collect();
    // The monitors' store keeps it (where every monitor node reads it);
    // nothing else may: no log, no journal, no unit.
    let mut leaked: Vec<_> = grep_tree(&dir, &password)
        .into_iter()
        .filter(|p| !p.components().any(|c| c.as_os_str() == "mon"))
        .collect();
    leaked.sort();
    lab_down(&dir);

    let url = url.unwrap_or_else(|| panic!("no dashboard in status: {ceph:#}"));
    assert!(masters.contains(&active.as_str()), "{ceph:#}");
    let active_ip = 10 + active[3..].parse::<u8>().unwrap();
    assert_eq!(url, format!("https://198.19.250.{active_ip}:8443/"));
    for out in &verify {
        assert!(out.status.success(), "{}", text(out));
    }
    assert_eq!(password.len(), 24, "a generated password");
    assert!(passwords.iter().all(|p| *p == password), "one password");
    assert!(modes.iter().all(|m| *m == 0o600), "{modes:?}");
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
    assert_eq!(standbys.len(), 2);
    for (address, out) in &standbys {
        let answer = String::from_utf8_lossy(&out.stdout);
        assert!(
            answer.starts_with('3') && answer.ends_with(&url),
            "{address}: {answer} {}",
            text(out)
        );
    }
    assert_eq!(
        leaked, password_files,
        "the password is in its own files only"
    );
}

/// Every file under `dir` whose bytes contain `needle` (not empty).
fn grep_tree(dir: &Path, needle: &str) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    if needle.is_empty() {
        return found;
    }
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
