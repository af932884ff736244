//! `cluster-agent lab`: a cluster on this machine from one command, with
//! real etcd and ceph-mon (and the Kubernetes doubles standing in for the
//! binaries that cannot be installed here), and nothing left behind by
//! `lab down`.

mod support;

use std::path::{Path, PathBuf};
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

/// The doubles under the names the lab looks for.
fn kube_bin_dir(base: &Path) -> PathBuf {
    let dir = base.join("kube-bin");
    std::fs::create_dir_all(&dir).unwrap();
    let examples = PathBuf::from(AGENT).parent().unwrap().join("examples");
    for name in [
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "kubelet",
    ] {
        let double = examples.join(format!("{name}-double"));
        assert!(
            double.exists(),
            "{}: `cargo test` builds it",
            double.display()
        );
        std::os::unix::fs::symlink(double, dir.join(name)).unwrap();
    }
    dir
}

#[test]
fn lab_up_status_down_leaves_nothing_behind() {
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("lab");
    let d = dir.to_str().unwrap();
    let bins = kube_bin_dir(base.path());

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
        "--kube-bin-dir",
        bins.to_str().unwrap(),
    ]);
    assert!(up.status.success(), "{}", text(&up));
    assert!(text(&up).contains("2 nodes"), "{}", text(&up));
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

#[test]
fn several_masters_without_namespaces_are_refused_plainly() {
    let base = tempfile::tempdir().unwrap();
    let d = base.path().join("lab");
    let out = lab(&["up", "--dir", d.to_str().unwrap(), "--masters", "3"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("--netns"), "{}", text(&out));
    assert!(!d.exists());
}
