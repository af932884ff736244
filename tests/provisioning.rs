//! `render ignition` and `render matchbox` through the real binary: every
//! Ignition config generated for the example configuration and for every
//! valid fixture passes the real `ignition-validate` with no error and no
//! warning, and carries the files a node needs to find itself; every
//! `ignition-snippets/*.bu`, translated by the real `butane --strict`,
//! installs exactly what `render ignition` emits. Both tools are built by
//! `.ci/setup` from the pinned modules in tools/kube-bins/{ignition,butane}.

mod support;

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use base64::Engine as _;
use serde_json::Value;

use cluster_agent::config;
use cluster_agent::paths::HostPaths;
use cluster_agent::phases::node::render_network;
use cluster_agent::provision::ignition;
use support::ignition::Validator;
use support::{AGENT, built_binary, copy_tree, require_tool, text};

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The example configuration and every fixture that loads, each copied
/// into a temp config dir with a join secret.
fn valid_config_dirs() -> Vec<(String, tempfile::TempDir)> {
    let mut sources = vec![("docs/example".to_string(), repo().join("docs/example"))];
    let mut fixtures: Vec<PathBuf> = std::fs::read_dir(repo().join("tests/fixtures/config"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    fixtures.sort();
    sources.extend(
        fixtures
            .into_iter()
            .map(|p| (p.strip_prefix(repo()).unwrap().display().to_string(), p)),
    );
    sources
        .into_iter()
        .filter(|(_, dir)| config::load(dir).is_ok())
        .map(|(name, dir)| {
            let tmp = tempfile::tempdir().unwrap();
            copy_tree(&dir, tmp.path());
            write_secret(tmp.path());
            (name, tmp)
        })
        .collect()
}

fn write_secret(config_dir: &Path) {
    let path = config_dir.join(config::JOIN_SECRET_FILE);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, SECRET).unwrap();
}

fn render(config_dir: &Path, args: &[&str]) -> Output {
    std::process::Command::new(AGENT)
        .arg("--config-dir")
        .arg(config_dir)
        .arg("render")
        .args(args)
        .env_remove("CLUSTER_NODE")
        .output()
        .unwrap()
}

fn render_all(config_dir: &Path, out: &Path) {
    let output = render(
        config_dir,
        &[
            "ignition",
            "--all-nodes",
            "--output-dir",
            out.to_str().unwrap(),
        ],
    );
    assert!(output.status.success(), "{}", text(&output));
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn decode(source: &str) -> Vec<u8> {
    let b64 = source
        .strip_prefix("data:;base64,")
        .unwrap_or_else(|| panic!("not a base64 data URL: {source}"));
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn every_generated_config_passes_ignition_validate() {
    let validator = Validator::new();
    let dirs = valid_config_dirs();
    assert!(dirs.len() >= 6, "too few valid configurations");
    let mut validated = 0;
    for (name, dir) in &dirs {
        let out = tempfile::tempdir().unwrap();
        render_all(dir.path(), out.path());
        for node in &config::load(dir.path()).unwrap().nodes {
            let path = out.path().join(format!("{}.ign", node.name));
            assert_eq!(mode(&path), 0o600, "{}", path.display());
            let what = format!("{name}: {}", node.name);
            validator.assert_valid(&what, &std::fs::read(&path).unwrap());
            validated += 1;
        }
    }
    println!(
        "{validated} Ignition configs from {} configurations validated",
        dirs.len()
    );
}

/// A machine given the config finds its configuration, its identity and
/// its secret where the agent looks, with the right modes; re-rendering
/// the node phase's files changes nothing.
#[test]
fn a_node_provisioned_with_its_config_finds_itself() {
    for (name, dir) in valid_config_dirs() {
        let loaded = config::load(dir.path()).unwrap();
        let out = tempfile::tempdir().unwrap();
        render_all(dir.path(), out.path());
        for node in &loaded.nodes {
            let raw = std::fs::read(out.path().join(format!("{}.ign", node.name))).unwrap();
            let ign: ignition::Config = serde_json::from_slice(&raw).unwrap();
            let machine = tempfile::tempdir().unwrap();
            let host = HostPaths::new(machine.path(), None, None);
            for f in &ign.storage.files {
                cluster_agent::fsutil::write_atomic(
                    &host.host(&f.path),
                    &decode(&f.contents.source),
                    f.mode,
                )
                .unwrap();
            }
            let file = |p: &str| std::fs::read(host.host(p)).unwrap();
            let what = format!("{name}: {}", node.name);

            // The configuration files, byte for byte, nodes/ included.
            let shipped = config::read_sources(dir.path()).unwrap();
            assert_eq!(
                file("/etc/cluster-config/cluster.yaml"),
                shipped.cluster_yaml
            );
            for f in &shipped.node_files {
                let on_node = Path::new("/etc/cluster-config").join(&f.path);
                assert_eq!(file(on_node.to_str().unwrap()), f.bytes, "{what}");
            }
            // Serving nodes get the cluster's secret; worker-only nodes the
            // worker secret derived from it.
            let expected = if cluster_agent::join::JoinKeys::holds_worker_secret(node) {
                cluster_agent::join::JoinKeys::worker_secret(SECRET, &loaded.cluster.name).to_vec()
            } else {
                SECRET.to_vec()
            };
            assert_eq!(
                file("/etc/cluster-config/secrets/join-secret"),
                expected,
                "{what}"
            );
            let secret = ign
                .storage
                .files
                .iter()
                .find(|f| f.path == "/etc/cluster-config/secrets/join-secret")
                .unwrap();
            assert_eq!(secret.mode, 0o600, "{what}");
            assert_eq!(
                ign.storage.directories[0].path, "/etc/cluster-config/secrets",
                "{what}"
            );
            assert_eq!(ign.storage.directories[0].mode, 0o700, "{what}");
            assert_eq!(
                file("/etc/hostname"),
                format!("{}\n", node.hostname).into_bytes()
            );
            assert_eq!(
                file("/etc/systemd/network/10-cluster-agent.network"),
                render_network(&loaded, node).into_bytes(),
                "{what}"
            );

            // The agent on that machine knows who it is without a MAC.
            let plan = std::process::Command::new(AGENT)
                .arg("--root")
                .arg(machine.path())
                .args(["--json", "plan"])
                .env_remove("CLUSTER_NODE")
                .env_remove("CLUSTER_CONFIG_DIR")
                .env_remove("CONFIG_DIR")
                .output()
                .unwrap();
            assert!(plan.status.success(), "{what}: {}", text(&plan));
            let plan: Value = serde_json::from_slice(&plan.stdout).unwrap();
            assert_eq!(plan["node"], node.name.as_str(), "{what}");

            // The units, exactly as shipped in systemd/.
            let units: Vec<(&str, Option<bool>, &str)> = ign
                .systemd
                .units
                .iter()
                .map(|u| (u.name.as_str(), u.enabled, u.contents.as_str()))
                .collect();
            let shipped_unit =
                |n: &str| std::fs::read_to_string(repo().join("systemd").join(n)).unwrap();
            assert_eq!(
                units,
                vec![
                    (
                        "cluster-bootstrap.service",
                        Some(true),
                        shipped_unit("cluster-bootstrap.service").as_str()
                    ),
                    (
                        "cluster-join.service",
                        None,
                        shipped_unit("cluster-join.service").as_str()
                    ),
                ],
                "{what}"
            );
        }
    }
}

#[test]
fn one_node_to_stdout_or_a_file_equals_the_all_nodes_rendering() {
    let (_, dir) = valid_config_dirs().remove(0);
    let all = tempfile::tempdir().unwrap();
    render_all(dir.path(), all.path());
    let expected = std::fs::read(all.path().join("cp-2.ign")).unwrap();

    let stdout = render(dir.path(), &["ignition", "--node", "cp-2"]);
    assert!(stdout.status.success(), "{}", text(&stdout));
    assert_eq!(stdout.stdout, expected);

    let file = all.path().join("single.ign");
    let written = render(
        dir.path(),
        &[
            "ignition",
            "--node",
            "cp-2",
            "--output",
            file.to_str().unwrap(),
        ],
    );
    assert!(written.status.success(), "{}", text(&written));
    assert_eq!(std::fs::read(&file).unwrap(), expected);
    assert_eq!(mode(&file), 0o600);
}

#[test]
fn missing_join_secret_unknown_node_or_no_node_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    copy_tree(&repo().join("docs/example"), dir.path());
    let out = tempfile::tempdir().unwrap();
    let target = out.path().join("x");
    let target = target.to_str().unwrap();

    let no_secret = render(
        dir.path(),
        &["ignition", "--all-nodes", "--output-dir", target],
    );
    assert_eq!(no_secret.status.code(), Some(2), "{}", text(&no_secret));
    let stderr = String::from_utf8_lossy(&no_secret.stderr);
    assert!(
        stderr.contains("secrets/join-secret is missing")
            && stderr.contains("cluster-agent gen-join-secret"),
        "{stderr}"
    );
    assert!(!Path::new(target).exists(), "nothing is written");

    write_secret(dir.path());
    let unknown = render(dir.path(), &["ignition", "--node", "cp-9"]);
    assert_eq!(unknown.status.code(), Some(2));
    assert!(text(&unknown).contains("known nodes: cp-1, cp-2, cp-3, w-1, w-2"));

    let no_node = render(dir.path(), &["ignition"]);
    assert_eq!(no_node.status.code(), Some(2));
    assert!(text(&no_node).contains("--node NAME"), "{}", text(&no_node));

    let invalid = tempfile::tempdir().unwrap();
    copy_tree(
        &repo().join("tests/fixtures/config/bad-addresses"),
        invalid.path(),
    );
    write_secret(invalid.path());
    let bad = render(invalid.path(), &["ignition", "--node", "cp-1"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(text(&bad).contains("is invalid"), "{}", text(&bad));
    assert!(bad.stdout.is_empty(), "no partial config on stdout");
}

/// What `serve` hands a node: over HTTPS its config (the bytes `render`
/// writes), over plain HTTP a pointer to that config (`ignition::pointer`,
/// the HTTPS address, the serving CA and the config's SHA-512). Both pass.
#[test]
fn what_serve_hands_out_passes_ignition_validate() {
    let validator = Validator::new();
    let (_, dir) = valid_config_dirs().remove(0);
    let bundle = cluster_agent::provision::Bundle::load(dir.path()).unwrap();
    let ca = rcgen::generate_simple_self_signed(vec!["cluster-agent serve".to_string()]).unwrap();
    let ca_pem = ca.cert.pem();
    for node in &bundle.config.nodes {
        let config = ignition::to_json(&bundle.ignition(node));
        validator.assert_valid(&node.name, config.as_bytes());
        let url = format!(
            "https://192.168.1.5:8443/ignition?mac={}",
            node.mac_addresses[0].to_string().replace(':', "-")
        );
        let pointer = ignition::to_json(&ignition::pointer(&url, config.as_bytes(), &ca_pem));
        validator.assert_valid(&format!("{}: the pointer", node.name), pointer.as_bytes());
    }
}

/// Proof that the judge judges: each broken variant of a valid config is
/// reported, naming what is wrong, whether ignition-validate calls it an
/// error (exit 1) or only warns (exit 0, which still fails a config here).
#[test]
fn broken_configs_are_rejected() {
    let validator = Validator::new();
    let (_, dir) = valid_config_dirs().remove(0);
    let out = tempfile::tempdir().unwrap();
    render_all(dir.path(), out.path());
    let good = read_json(&out.path().join("cp-1.ign"));
    validator.assert_valid("unbroken", &serde_json::to_vec(&good).unwrap());

    // (what, the breakage, ignition-validate exits 0, what it says)
    type Breakage = (&'static str, fn(&mut Value), bool, &'static str);
    let breakages: [Breakage; 8] = [
        (
            "mode as an octal string",
            |c| c["storage"]["files"][0]["mode"] = "0644".into(),
            false,
            "mode of type int",
        ),
        (
            "no ignition version",
            |c| {
                c["ignition"].as_object_mut().unwrap().remove("version");
            },
            false,
            "invalid config version",
        ),
        (
            "units as an object",
            |c| c["systemd"]["units"] = serde_json::json!({"name": "x"}),
            false,
            "Go struct field Systemd.systemd.units",
        ),
        (
            "a file without a path",
            |c| {
                c["storage"]["files"][1]
                    .as_object_mut()
                    .unwrap()
                    .remove("path");
            },
            false,
            "$.storage.files.1.path",
        ),
        (
            "a relative path",
            |c| c["storage"]["files"][1]["path"] = "etc/hostname".into(),
            false,
            "path not absolute",
        ),
        (
            "contents that are no data URL",
            |c| c["storage"]["files"][0]["contents"]["source"] = "data:;base64,%%".into(),
            false,
            "$.storage.files.0.contents.source",
        ),
        (
            "a unit that does not parse",
            |c| c["systemd"]["units"][0]["contents"] = "[Service]\nExecStart\n".into(),
            false,
            "$.systemd.units.0.contents",
        ),
        (
            "a misspelled key, only a warning to ignition-validate",
            |c| {
                let f = c["storage"]["files"][0].as_object_mut().unwrap();
                let v = f.remove("overwrite").unwrap();
                f.insert("overWrite".into(), v);
            },
            true,
            "warning at $.storage.files.0.overWrite",
        ),
    ];
    for (what, breaks, exits_zero, expected) in breakages {
        let mut broken = good.clone();
        breaks(&mut broken);
        let broken = serde_json::to_vec(&broken).unwrap();
        let judged = validator.judge(&broken);
        assert_eq!(
            judged.status.success(),
            exits_zero,
            "{what}: {}",
            text(&judged)
        );
        let problems = validator.problems(&broken);
        assert!(problems.contains(expected), "{what}: {problems}");
    }
}

#[test]
fn matchbox_data_dir_selects_each_mac_and_serves_each_node_its_config() {
    let validator = Validator::new();
    let (_, dir) = valid_config_dirs().remove(0);
    let loaded = config::load(dir.path()).unwrap();
    let out = tempfile::tempdir().unwrap();
    let data = out.path().join("matchbox");
    let output = render(
        dir.path(),
        &[
            "matchbox",
            "--output-dir",
            data.to_str().unwrap(),
            "--matchbox-url",
            "https://matchbox.example.net:8443/",
        ],
    );
    assert!(output.status.success(), "{}", text(&output));

    let mut groups = 0;
    for node in &loaded.nodes {
        let profile = read_json(&data.join(format!("profiles/{}.json", node.name)));
        assert_eq!(profile["id"], node.name.as_str());
        let ignition_id = profile["ignition_id"].as_str().unwrap();
        assert_eq!(ignition_id, format!("{}.ign", node.name));
        let ign_path = data.join("ignition").join(ignition_id);
        assert_eq!(mode(&ign_path), 0o600);
        validator.assert_valid(&node.name, &std::fs::read(&ign_path).unwrap());
        let args: Vec<&str> = profile["boot"]["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert!(args.contains(&"flatcar.first_boot=1"), "{args:?}");
        assert!(
            args.contains(
                &"ignition.config.url=https://matchbox.example.net:8443/ignition?mac=${mac:hexhyp}"
            ),
            "{args:?}"
        );
        assert!(
            args.contains(&"initrd=flatcar_production_pxe_image.cpio.gz"),
            "{args:?}"
        );
        assert_eq!(
            profile["boot"]["kernel"],
            "/assets/flatcar/current/flatcar_production_pxe.vmlinuz"
        );
        for mac in &node.mac_addresses {
            let id = format!("{}-{}", node.name, mac.to_string().replace(':', "-"));
            let group = read_json(&data.join(format!("groups/{id}.json")));
            assert_eq!(group["id"], id.as_str());
            assert_eq!(group["profile"], node.name.as_str());
            assert_eq!(
                group["selector"],
                serde_json::json!({"mac": mac.to_string()})
            );
            groups += 1;
        }
    }
    let group_files = std::fs::read_dir(data.join("groups")).unwrap().count();
    assert_eq!(group_files, groups, "one group per MAC, nothing else");
    assert_eq!(groups, 6, "the example has six MACs");
}

#[test]
fn matchbox_refuses_plain_http_and_nodes_without_macs() {
    let (_, dir) = valid_config_dirs().remove(0);
    let out = tempfile::tempdir().unwrap();
    let data = out.path().join("m");
    let http = render(
        dir.path(),
        &[
            "matchbox",
            "--output-dir",
            data.to_str().unwrap(),
            "--matchbox-url",
            "http://matchbox.example.net:8080",
        ],
    );
    assert_eq!(http.status.code(), Some(2));
    assert!(text(&http).contains("join secret"), "{}", text(&http));
    assert!(!data.exists());

    let minimal = tempfile::tempdir().unwrap();
    copy_tree(
        &repo().join("tests/fixtures/config/valid-minimal"),
        minimal.path(),
    );
    write_secret(minimal.path());
    let no_mac = render(
        minimal.path(),
        &[
            "matchbox",
            "--output-dir",
            data.to_str().unwrap(),
            "--matchbox-url",
            "https://m.example.net",
        ],
    );
    assert_eq!(no_mac.status.code(), Some(2));
    assert!(
        text(&no_mac).contains("n1, n2 have no mac_addresses"),
        "{}",
        text(&no_mac)
    );
    assert!(!data.exists());
}

/// The bytes a file's `contents` makes Ignition write: its data URL decoded
/// (base64 or percent-encoded), then gunzipped when `compression` says so.
fn written_bytes(contents: &Value) -> Vec<u8> {
    let source = contents["source"].as_str().expect("contents.source");
    let (header, data) = source
        .strip_prefix("data:")
        .and_then(|rest| rest.split_once(','))
        .unwrap_or_else(|| panic!("not a data URL: {source}"));
    let raw = if header.ends_with(";base64") {
        base64::engine::general_purpose::STANDARD
            .decode(data)
            .unwrap_or_else(|e| panic!("{source}: {e}"))
    } else {
        percent_decode(data)
    };
    match contents.get("compression").and_then(Value::as_str) {
        None | Some("") => raw,
        Some("gzip") => {
            let mut gzip = Command::new(require_tool("gzip", "gzip"))
                .arg("-dc")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            gzip.stdin.take().unwrap().write_all(&raw).unwrap();
            let out = gzip.wait_with_output().unwrap();
            assert!(out.status.success(), "gunzip {source}");
            out.stdout
        }
        Some(other) => panic!("compression {other:?} is not Ignition's"),
    }
}

fn percent_decode(data: &str) -> Vec<u8> {
    let bytes = data.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
            out.push(u8::from_str_radix(hex, 16).unwrap_or_else(|e| panic!("%{hex}: {e}")));
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

/// A config as a node would end up with it: each file's `contents`
/// (source and compression) replaced by the text or bytes written; every
/// other key kept as it is. Two configs that install the same thing are
/// then equal, however each encodes its files.
fn installed(config: &Value) -> Value {
    let mut config = config.clone();
    if let Some(files) = config["storage"]["files"].as_array_mut() {
        for file in files {
            let contents = file["contents"].as_object_mut().expect("a file's contents");
            let bytes = written_bytes(&Value::Object(contents.clone()));
            contents.remove("source");
            contents.remove("compression");
            let written = match String::from_utf8(bytes) {
                Ok(text) => serde_json::json!({ "text": text }),
                Err(e) => serde_json::json!({
                    "base64": base64::engine::general_purpose::STANDARD.encode(e.into_bytes())
                }),
            };
            contents.insert("written".into(), written);
        }
    }
    config
}

/// Every `ignition-snippets/*.bu` is the Butane form of what `render
/// ignition` emits for docs/example, for the node whose node-identity it
/// installs. The real `butane --strict` (which fails on any warning)
/// translates it, with `local:` files read from the config dir; its output
/// passes ignition-validate and is the rendered config once both are
/// reduced to what they install: the same directories, the same files with
/// the same modes and bytes, the same units, in the same order, and no key
/// either has that the other lacks. Any drift between the two fails here.
#[test]
fn butane_snippet_installs_what_render_emits() {
    let butane = built_binary("butane");
    let validator = Validator::new();
    let (_, dir) = valid_config_dirs().remove(0);

    let mut snippets: Vec<PathBuf> = std::fs::read_dir(repo().join("ignition-snippets"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "bu"))
        .collect();
    snippets.sort();
    assert!(!snippets.is_empty(), "no ignition-snippets/*.bu");
    for snippet in &snippets {
        let what = snippet.strip_prefix(repo()).unwrap().display().to_string();
        let translated = Command::new(&butane)
            .arg("--strict")
            .arg("--files-dir")
            .arg(dir.path())
            .arg(snippet)
            .output()
            .unwrap();
        assert!(
            translated.status.success() && translated.stderr.is_empty(),
            "{what}: butane --strict: {}",
            text(&translated)
        );
        validator.assert_valid(&what, &translated.stdout);
        let translated = installed(&serde_json::from_slice(&translated.stdout).unwrap());

        let identity = translated["storage"]["files"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["path"] == "/etc/cluster-config/node-identity")
            .unwrap_or_else(|| panic!("{what} installs no node-identity"));
        let node = identity["contents"]["written"]["text"]
            .as_str()
            .unwrap()
            .trim();
        let rendered = render(dir.path(), &["ignition", "--node", node]);
        assert!(rendered.status.success(), "{}", text(&rendered));
        let rendered = installed(&serde_json::from_slice(&rendered.stdout).unwrap());

        let pretty = |v: &Value| serde_json::to_string_pretty(v).unwrap();
        assert!(
            translated == rendered,
            "{what} through butane and `render ignition --node {node}` install different \
             things:\nbutane:\n{}\nrender:\n{}",
            pretty(&translated),
            pretty(&rendered)
        );
    }
}
