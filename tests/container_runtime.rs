//! The container-runtime phase against the real containerd 2 (built by
//! `tools/kube-bins/build containerd`), Debian's runc and CNI plugins: a
//! worker root with containerd in `/opt/bin` and runc where Debian puts it
//! runs `cluster-agent run --services process`; the CRI must then answer
//! `Version` through the agent's probe and through the real `ctr`, a crash
//! before and after every step must converge to one containerd serving the
//! same config, a re-run must change nothing, and a changed setting must
//! reach the running containerd. The node is a worker without a kubelet, so
//! the worker phase after this one skips itself.

mod support;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use support::etcd::{run_ok, spawn_run};
use support::{Cluster, install_built, journal_outcome, require_tool, text};

const NODE: &str = "w-1";
const STEPS: [&str; 4] = [
    "containerd-binaries",
    "containerd-config",
    "containerd-unit",
    "containerd-start",
];

/// A master (cluster.yaml needs one; it never runs here) and a worker whose
/// image has containerd 2 in /opt/bin and Debian's runc in /usr/sbin.
fn worker() -> Cluster {
    let c = Cluster::new(&[("cp-1", &["control-plane"]), (NODE, &["worker"])]);
    install_built(&c.root(NODE), &["containerd", "containerd-shim-runc-v2"]);
    link_runc(&c.root(NODE));
    c
}

fn link_runc(root: &Path) {
    let runc = require_tool("runc", "runc");
    let sbin = root.join("usr/sbin");
    std::fs::create_dir_all(&sbin).unwrap();
    std::os::unix::fs::symlink(runc, sbin.join("runc")).unwrap();
}

fn socket(c: &Cluster) -> PathBuf {
    c.root(NODE).join("run/containerd/containerd.sock")
}

fn config(c: &Cluster) -> String {
    std::fs::read_to_string(c.root(NODE).join("etc/containerd/config.toml")).unwrap()
}

/// The phase's records only: what follows it depends on the image.
fn phase_outcome(c: &Cluster) -> Vec<(String, String)> {
    journal_outcome(&c.journal(NODE))
        .into_iter()
        .filter(|(name, _)| STEPS.contains(&name.as_str()))
        .collect()
}

fn all_done() -> Vec<(String, String)> {
    STEPS
        .iter()
        .map(|s| (s.to_string(), "done".to_string()))
        .collect()
}

fn cri_version(c: &Cluster) -> cluster_agent::containerd::RuntimeVersion {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime
        .block_on(cluster_agent::containerd::cri::version(
            &socket(c),
            Duration::from_secs(5),
        ))
        .unwrap_or_else(|e| panic!("the CRI does not answer: {e}"))
}

/// `ctr version` against the node's socket: the real client as the judge.
/// Returns the server's version line.
fn ctr_server_version(c: &Cluster) -> String {
    let out = std::process::Command::new(support::built_binary("ctr"))
        .arg("--address")
        .arg(socket(c))
        .arg("version")
        .output()
        .unwrap();
    assert!(out.status.success(), "ctr version: {}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let server = stdout
        .split("Server:")
        .nth(1)
        .unwrap_or_else(|| panic!("no Server section: {stdout}"));
    server
        .lines()
        .find_map(|l| l.trim().strip_prefix("Version:"))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no server version: {stdout}"))
}

/// Every live containerd started with this node's config: there must be
/// exactly one, whatever crashed on the way.
fn containerd_pids(c: &Cluster) -> Vec<u32> {
    let config = c.root(NODE).join("etc/containerd/config.toml");
    let config = config.to_string_lossy().into_owned();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let argv: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let zombie = std::fs::read_to_string(entry.path().join("stat")).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        });
        if !zombie
            && argv.first().is_some_and(|a| a.ends_with("containerd"))
            && argv.contains(&config)
        {
            pids.push(pid);
        }
    }
    pids
}

fn one_containerd(c: &Cluster, what: &str) -> u32 {
    let pids = containerd_pids(c);
    assert_eq!(pids.len(), 1, "{what}: one containerd, found {pids:?}");
    pids[0]
}

#[test]
fn containerd_serves_the_cri_and_a_rerun_changes_nothing() {
    let c = worker();
    run_ok(&c, NODE);
    assert_eq!(phase_outcome(&c), all_done(), "{:#}", c.journal(NODE));

    let version = cri_version(&c);
    assert_eq!(version.runtime_name, "containerd");
    assert!(version.runtime_version.starts_with("v2."), "{version:?}");
    assert_eq!(version.runtime_api_version, "v1");
    assert_eq!(ctr_server_version(&c), version.runtime_version);

    // A temp root has no booted systemd: cgroupfs, as the kubelet will be
    // told; every path is the node's own.
    let text = config(&c);
    assert!(text.contains("SystemdCgroup = false\n"), "{text}");
    assert!(
        text.contains("sandbox = \"registry.k8s.io/pause:3.10.1\"\n"),
        "{text}"
    );
    let root = c.root(NODE).display().to_string();
    assert!(
        text.contains(&format!("BinaryName = \"{root}/usr/sbin/runc\"\n")),
        "{text}"
    );
    let pid = one_containerd(&c, "first run");

    let steps_before = c.journal(NODE)["steps"].clone();
    let config_before = std::fs::metadata(c.root(NODE).join("etc/containerd/config.toml"))
        .unwrap()
        .modified()
        .unwrap();
    run_ok(&c, NODE);
    for (a, b) in steps_before
        .as_array()
        .unwrap()
        .iter()
        .zip(c.journal(NODE)["steps"].as_array().unwrap())
    {
        if STEPS.contains(&a["name"].as_str().unwrap()) {
            assert_eq!(a, b, "a done step must not be re-applied");
        }
    }
    let config_after = std::fs::metadata(c.root(NODE).join("etc/containerd/config.toml"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(config_before, config_after, "the config is not rewritten");
    assert_eq!(one_containerd(&c, "re-run"), pid, "containerd kept running");

    // status asks the CRI too.
    let out = c.run(NODE, &["--json", "status"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let check = status["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "container-runtime")
        .cloned()
        .unwrap();
    assert_eq!(check["health"], "ok", "{status:#}");
    assert_eq!(
        check["data"]["runtime_version"],
        version.runtime_version.as_str()
    );
}

/// A crash before and after every step, then a re-run: the phase done, one
/// containerd, serving over the CRI.
#[test]
fn a_crash_at_every_containerd_step_converges() {
    for step in STEPS {
        for when in ["before", "after"] {
            let c = worker();
            let out = spawn_run(&c, NODE, Some(&format!("{step}:{when}")))
                .wait_with_output()
                .unwrap();
            // The binaries are there from the start: that step's check
            // holds and it never applies, so it cannot crash after applying.
            let aborted = out.status.signal() == Some(6);
            let nothing_to_apply = step == "containerd-binaries" && when == "after";
            assert!(
                aborted || (nothing_to_apply && out.status.success()),
                "{step}:{when}: {}",
                text(&out)
            );
            run_ok(&c, NODE);
            assert_eq!(phase_outcome(&c), all_done(), "{step}:{when}");
            assert_eq!(cri_version(&c).runtime_name, "containerd", "{step}:{when}");
            one_containerd(&c, &format!("{step}:{when}"));
            assert!(
                !c.state_dir(NODE).join("containerd-restart-due").exists(),
                "{step}:{when}: no restart left due"
            );
        }
    }
}

/// A setting changed in cluster.yaml reaches the running containerd: the
/// config is rewritten and containerd restarted, also when the agent dies
/// right after writing the config (the restart stays due).
#[test]
fn a_changed_setting_restarts_containerd_even_across_a_crash() {
    for crash in [None, Some("containerd-config:after")] {
        let c = worker();
        run_ok(&c, NODE);
        let first = one_containerd(&c, "first run");
        let yaml = c.cluster_yaml().replace(
            "cluster:\n  name: test\n",
            "cluster:\n  name: test\n  containerd:\n    sandbox_image: registry.example.net/infra/pause:9\n",
        );
        assert!(yaml.contains("sandbox_image"), "{yaml}");
        c.write_config(NODE, &yaml);
        if let Some(at) = crash {
            let out = spawn_run(&c, NODE, Some(at)).wait_with_output().unwrap();
            assert_eq!(out.status.signal(), Some(6), "{at}: {}", text(&out));
            assert!(config(&c).contains("registry.example.net/infra/pause:9"));
            assert_eq!(
                one_containerd(&c, "after the crash"),
                first,
                "not restarted yet"
            );
        }
        run_ok(&c, NODE);
        assert!(config(&c).contains("sandbox = \"registry.example.net/infra/pause:9\"\n"));
        let second = one_containerd(&c, &format!("after the change ({crash:?})"));
        assert_ne!(
            first, second,
            "containerd restarted with the new config ({crash:?})"
        );
        assert_eq!(phase_outcome(&c), all_done());
        cri_version(&c);
    }
}

/// Without containerd the phase skips itself (an image without a runtime);
/// with only part of it, the run fails naming what is missing.
#[test]
fn an_image_without_containerd_skips_and_a_partial_one_fails() {
    let c = Cluster::new(&[("cp-1", &["control-plane"]), (NODE, &["worker"])]);
    link_runc(&c.root(NODE));
    run_ok(&c, NODE);
    let outcome = phase_outcome(&c);
    assert!(outcome.iter().all(|(_, s)| s == "skipped"), "{outcome:?}");

    install_built(&c.root(NODE), &["containerd"]);
    let out = c.run(NODE, &["run"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let journal = c.journal(NODE);
    let binaries = journal["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "containerd-binaries")
        .unwrap();
    assert_eq!(binaries["status"], "failed");
    let error = binaries["last_error"].as_str().unwrap();
    assert!(error.contains("containerd-shim-runc-v2 missing"), "{error}");
    assert!(containerd_pids(&c).is_empty());
}

/// reset stops containerd and removes its state, config and unit; the next
/// run brings it back.
#[test]
fn reset_removes_containerd_and_a_run_brings_it_back() {
    let c = worker();
    run_ok(&c, NODE);
    one_containerd(&c, "first run");
    let out = c.run(NODE, &["reset", "--yes"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(containerd_pids(&c).is_empty(), "containerd stopped");
    for gone in [
        "var/lib/containerd",
        "run/containerd",
        "etc/containerd/config.toml",
        "etc/systemd/system/containerd.service",
        "etc/systemd/system/multi-user.target.wants/containerd.service",
    ] {
        let p = c.root(NODE).join(gone);
        assert!(p.symlink_metadata().is_err(), "{} is left", p.display());
    }
    run_ok(&c, NODE);
    assert_eq!(phase_outcome(&c), all_done());
    cri_version(&c);
}

/// Unmounts (lazily: containerd may still hold files there) when dropped.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// A root whose /var/lib is on overlayfs (a node inside a container): the
/// kernel refuses overlay mounts with an upper dir there, so the agent
/// picks the `native` snapshotter, and the real containerd serves with it.
#[test]
fn on_overlayfs_the_native_snapshotter_is_used() {
    let c = worker();
    let layers = c.dir.path().join("overlay");
    for d in ["lower", "upper", "work"] {
        std::fs::create_dir_all(layers.join(d)).unwrap();
    }
    let var_lib = c.root(NODE).join("var/lib");
    std::fs::create_dir_all(&var_lib).unwrap();
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        layers.join("lower").display(),
        layers.join("upper").display(),
        layers.join("work").display()
    );
    nix::mount::mount(
        Some("overlay"),
        &var_lib,
        Some("overlay"),
        nix::mount::MsFlags::empty(),
        Some(options.as_str()),
    )
    .unwrap_or_else(|e| panic!("mount overlayfs on {} (needs root): {e}", var_lib.display()));
    let _mounted = Mounted(var_lib);
    run_ok(&c, NODE);
    let text = config(&c);
    assert_eq!(
        text.matches("snapshotter = \"native\"\n").count(),
        2,
        "{text}"
    );
    assert_eq!(phase_outcome(&c), all_done());
    cri_version(&c);
    // The real containerd has the snapshotter the CRI was configured with.
    let out = std::process::Command::new(support::built_binary("ctr"))
        .arg("--address")
        .arg(socket(&c))
        .args(["plugins", "ls"])
        .output()
        .unwrap();
    let plugins = String::from_utf8_lossy(&out.stdout);
    assert!(
        plugins
            .lines()
            .any(|l| l.contains("io.containerd.snapshotter.v1")
                && l.contains(" native ")
                && l.trim_end().ends_with("ok")),
        "{plugins}"
    );
    // Killed while the mount still exists (the guard drops after this).
    c.kill_daemons(NODE);
}
