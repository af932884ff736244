//! Every unit file the project ships (`systemd/`) or renders
//! (`phases::rendered_units`, for every node of the example configuration
//! and of every valid fixture) passes the real `systemd-analyze verify`.
//!
//! Offline and without touching the host: `--root` points verify at a temp
//! dir holding a copy of the host's own unit dir (for `multi-user.target`,
//! `network-online.target` …), the units under test in `/etc/systemd/system`,
//! and executable stubs for their `Exec*=` programs (verify only checks that
//! those exist). systemd 252 reports an unknown directive as a warning and
//! still exits 0, so any output at all counts as a failure.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use cluster_agent::config;
use cluster_agent::paths::HostPaths;
use cluster_agent::phases;

const HOST_UNIT_DIR: &str = "/usr/lib/systemd/system";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Copies a directory tree, keeping symlinks as symlinks (the host's unit
/// dir is full of aliases, some of them dangling outside a full system).
fn copy_preserving_links(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        let kind = entry.file_type().unwrap();
        if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(entry.path()).unwrap(), &target).unwrap();
        } else if kind.is_dir() {
            copy_preserving_links(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// The absolute programs a unit's `Exec*=` lines run, prefixes (`-@:+!`)
/// and quotes stripped.
fn exec_programs(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| {
            let (key, value) = line.split_once('=')?;
            if !key.trim().starts_with("Exec") {
                return None;
            }
            let program = value
                .trim()
                .trim_start_matches(['-', '@', ':', '+', '!', '|'])
                .split_whitespace()
                .next()?
                .trim_matches('"');
            program.starts_with('/').then(|| PathBuf::from(program))
        })
        .collect()
}

struct VerifyRoot {
    dir: tempfile::TempDir,
}

impl VerifyRoot {
    fn new() -> VerifyRoot {
        let dir = tempfile::tempdir().unwrap();
        let host = Path::new(HOST_UNIT_DIR);
        assert!(
            host.is_dir(),
            "{HOST_UNIT_DIR} is missing: install systemd (Debian package `systemd`)"
        );
        copy_preserving_links(
            host,
            &dir.path().join(HOST_UNIT_DIR.trim_start_matches('/')),
        );
        VerifyRoot { dir }
    }

    fn host(&self, absolute: &Path) -> PathBuf {
        HostPaths::new(self.dir.path(), None, None).host(absolute)
    }

    /// Installs a unit; with `stub_programs`, also an executable stub for
    /// each program it runs.
    fn add(&self, name: &str, text: &str, stub_programs: bool) {
        let path = self.host(&Path::new("/etc/systemd/system").join(name));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        if stub_programs {
            for program in exec_programs(text) {
                let stub = self.host(&program);
                std::fs::create_dir_all(stub.parent().unwrap()).unwrap();
                std::fs::write(&stub, "#!/bin/sh\nexit 0\n").unwrap();
                std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755)).unwrap();
            }
        }
    }

    /// Runs `systemd-analyze ARGS --root=<this> UNITS`: (success, output).
    fn analyze(&self, args: &[&str], units: &[&str]) -> (bool, String) {
        let out = Command::new("systemd-analyze")
            .args(args)
            .arg(format!("--root={}", self.dir.path().display()))
            .args(units)
            .output()
            .expect("systemd-analyze runs (Debian package `systemd`)");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// `systemd-analyze verify`: exit 0 and not a word of output.
    fn verify(&self, units: &[&str]) -> Result<(), String> {
        match self.analyze(&["verify", "--man=no", "--generators=no"], units) {
            (true, text) if text.trim().is_empty() => Ok(()),
            (ok, text) => Err(format!("{units:?} (exit ok: {ok}):\n{text}")),
        }
    }
}

fn shipped_units() -> Vec<(String, String)> {
    let mut units: Vec<(String, String)> = std::fs::read_dir(repo().join("systemd"))
        .unwrap()
        .flatten()
        .map(|e| {
            (
                e.file_name().into_string().unwrap(),
                std::fs::read_to_string(e.path()).unwrap(),
            )
        })
        .collect();
    units.sort();
    units
}

/// The example configuration and every fixture that loads.
fn valid_configs() -> Vec<(PathBuf, config::ClusterConfig)> {
    let mut dirs = vec![repo().join("docs/example")];
    let mut fixtures: Vec<PathBuf> = std::fs::read_dir(repo().join("tests/fixtures/config"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    fixtures.sort();
    dirs.extend(fixtures);
    dirs.into_iter()
        .filter_map(|d| config::load(&d).ok().map(|c| (d, c)))
        .collect()
}

#[test]
fn shipped_units_pass_verify() {
    let root = VerifyRoot::new();
    let units = shipped_units();
    let names: Vec<&str> = units.iter().map(|(n, _)| n.as_str()).collect();
    assert!(
        names.contains(&"cluster-bootstrap.service") && names.contains(&"cluster-join.service"),
        "{names:?}"
    );
    for (name, text) in &units {
        root.add(name, text, true);
    }
    root.verify(&names).unwrap();
}

#[test]
fn rendered_units_pass_verify() {
    let root = VerifyRoot::new();
    // Production paths: the unit as systemd on a real node reads it.
    let paths = HostPaths::new(Path::new("/"), None, None);
    let configs = valid_configs();
    assert!(configs.len() >= 4, "too few valid configurations found");
    let mut verified = 0;
    for (dir, config) in &configs {
        for node in &config.nodes {
            let units = phases::rendered_units(&paths, config, node);
            for unit in &units {
                let text = unit.render().unwrap();
                // The process backend reads the same file back.
                let parsed =
                    cluster_agent::services::parse_unit(&unit.name, &text, Path::new(&unit.name))
                        .unwrap_or_else(|e| panic!("{} node {}: {e}", dir.display(), node.name));
                assert_eq!(
                    parsed.render().unwrap(),
                    text,
                    "{} does not read back as rendered",
                    unit.name
                );
                root.add(&unit.name, &text, true);
            }
            let names: Vec<&str> = units.iter().map(|u| u.name.as_str()).collect();
            if !names.is_empty() {
                root.verify(&names)
                    .unwrap_or_else(|e| panic!("{} node {}: {e}", dir.display(), node.name));
            }
            verified += names.len();
        }
    }
    // The example alone has three control-plane nodes, each with etcd.
    assert!(verified >= 3, "only {verified} rendered units verified");
    println!("{verified} rendered units verified");
}

#[test]
fn verify_rejects_a_typo_in_a_directive() {
    let root = VerifyRoot::new();
    let (name, text) = shipped_units()
        .into_iter()
        .find(|(n, _)| n == "cluster-bootstrap.service")
        .unwrap();
    root.add(&name, &text, true);
    root.verify(&[&name]).unwrap();
    root.add(&name, &text.replace("RestartSec=", "RestratSec="), true);
    let err = root.verify(&[&name]).unwrap_err();
    assert!(err.contains("Unknown key 'RestratSec'"), "{err}");
}

#[test]
fn verify_rejects_a_missing_program() {
    let root = VerifyRoot::new();
    let (name, text) = shipped_units()
        .into_iter()
        .find(|(n, _)| n == "cluster-join.service")
        .unwrap();
    root.add(&name, &text, false);
    let err = root.verify(&[&name]).unwrap_err();
    assert!(err.contains("/usr/bin/cluster-agent"), "{err}");
}

/// The join service faces the network: keep its sandbox tight. 25 is
/// systemd's exposure score ×10 ("2.5 OK"); it is 1.9 today.
#[test]
fn join_unit_exposure_stays_low() {
    let root = VerifyRoot::new();
    for (name, text) in shipped_units() {
        root.add(&name, &text, true);
    }
    let (ok, text) = root.analyze(
        &["security", "--offline=yes", "--threshold=25", "--no-pager"],
        &["cluster-join.service"],
    );
    assert!(ok, "exposure above 2.5:\n{text}");
}

/// The API balancer carries every node's API traffic and holds no
/// capability: keep it sandboxed as tightly as the join service.
#[test]
fn api_balancer_unit_exposure_stays_low() {
    let root = VerifyRoot::new();
    let paths = HostPaths::new(Path::new("/"), None, None);
    let (_, config) = valid_configs().into_iter().next().unwrap();
    let worker = config
        .nodes
        .iter()
        .find(|n| !n.is_control_plane())
        .or(config.nodes.first())
        .unwrap();
    let unit = phases::rendered_units(&paths, &config, worker)
        .into_iter()
        .find(|u| u.name == phases::api_balancer::UNIT)
        .expect("every Kubernetes node renders the balancer");
    root.add(&unit.name, &unit.render().unwrap(), true);
    let (ok, text) = root.analyze(
        &["security", "--offline=yes", "--threshold=25", "--no-pager"],
        &[&unit.name],
    );
    assert!(ok, "exposure above 2.5:\n{text}");
}

/// The floating endpoint's keeper holds CAP_NET_ADMIN and CAP_NET_RAW and
/// nothing else; everything else as sandboxed as the balancer's.
#[test]
fn api_address_unit_exposure_stays_low() {
    let root = VerifyRoot::new();
    let paths = HostPaths::new(Path::new("/"), None, None);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/config/floating-endpoint");
    let config = cluster_agent::config::load(&dir).unwrap();
    let master = config.nodes.iter().find(|n| n.is_control_plane()).unwrap();
    let unit = phases::rendered_units(&paths, &config, master)
        .into_iter()
        .find(|u| u.name == phases::api_address::UNIT)
        .expect("a master renders the keeper when the endpoint floats");
    root.add(&unit.name, &unit.render().unwrap(), true);
    root.verify(&[&unit.name]).unwrap();
    let (ok, text) = root.analyze(
        &["security", "--offline=yes", "--threshold=25", "--no-pager"],
        &[&unit.name],
    );
    assert!(ok, "exposure above 2.5:\n{text}");
}
