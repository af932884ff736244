//! `render ignition` and `render matchbox` through the real binary: every
//! Ignition config generated for the example configuration and for every
//! valid fixture validates against the official Ignition 3.4 schema
//! (`../shared/schemas/ignition-v3.4.json`, draft-04), declares no key the
//! schema does not know, and carries the files a node needs to find itself.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use base64::Engine as _;
use serde_json::Value;

use cluster_agent::config;
use cluster_agent::paths::HostPaths;
use cluster_agent::phases::node::render_network;
use cluster_agent::provision::ignition;
use support::{AGENT, copy_tree, text};

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn schema() -> Value {
    let path = repo().join("../shared/schemas/ignition-v3.4.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read the Ignition schema {}: {e}; the project's shared files must sit \
             next to the repository (../shared, see ../shared/README.md)",
            path.display()
        )
    });
    serde_json::from_str(&text).expect("the Ignition schema is JSON")
}

struct Checker {
    schema: Value,
    validator: jsonschema::Validator,
}

impl Checker {
    fn new() -> Checker {
        let schema = schema();
        assert_eq!(
            schema["$schema"], "http://json-schema.org/draft-04/schema#",
            "expected the draft-04 Ignition schema"
        );
        let validator = jsonschema::draft4::new(&schema).expect("the Ignition schema compiles");
        Checker { schema, validator }
    }

    /// Every problem with `config`: schema violations, then keys the
    /// schema does not declare. (The official schema allows additional
    /// properties, and Ignition rejects unknown keys, so a misspelled key
    /// would otherwise pass.)
    fn problems(&self, config: &Value) -> Vec<String> {
        let mut problems: Vec<String> = self
            .validator
            .iter_errors(config)
            .map(|e| format!("{}: {e}", e.instance_path()))
            .collect();
        undeclared_keys(&self.schema, &self.schema, config, "", &mut problems);
        problems
    }

    fn assert_valid(&self, what: &str, config: &Value) {
        let problems = self.problems(config);
        assert!(problems.is_empty(), "{what}:\n{}", problems.join("\n"));
        assert_eq!(config["ignition"]["version"], "3.4.0", "{what}");
    }
}

/// Follows `$ref`s (`#/definitions/...`) within the schema.
fn resolve<'s>(root: &'s Value, mut schema: &'s Value) -> &'s Value {
    while let Some(pointer) = schema.get("$ref").and_then(Value::as_str) {
        schema = root
            .pointer(pointer.trim_start_matches('#'))
            .unwrap_or_else(|| panic!("unresolvable $ref {pointer}"));
    }
    schema
}

/// The subschemas an instance must satisfy together (`allOf` flattened).
fn parts<'s>(root: &'s Value, schema: &'s Value) -> Vec<&'s Value> {
    let schema = resolve(root, schema);
    let mut out = vec![schema];
    if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
        out.extend(all.iter().flat_map(|s| parts(root, s)));
    }
    out
}

fn undeclared_keys(root: &Value, schema: &Value, value: &Value, at: &str, out: &mut Vec<String>) {
    let parts = parts(root, schema);
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                let declared = parts
                    .iter()
                    .find_map(|p| p.get("properties").and_then(|props| props.get(key)));
                match declared {
                    Some(child_schema) => {
                        undeclared_keys(root, child_schema, child, &format!("{at}/{key}"), out)
                    }
                    None => out.push(format!("{at}/{key}: not a key of Ignition spec 3.4")),
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = parts.iter().find_map(|p| p.get("items")) {
                for (i, item) in items.iter().enumerate() {
                    undeclared_keys(root, item_schema, item, &format!("{at}/{i}"), out);
                }
            }
        }
        _ => {}
    }
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
fn every_generated_config_validates_against_the_schema() {
    let checker = Checker::new();
    let dirs = valid_config_dirs();
    assert!(dirs.len() >= 6, "too few valid configurations");
    let mut validated = 0;
    for (name, dir) in &dirs {
        let out = tempfile::tempdir().unwrap();
        render_all(dir.path(), out.path());
        for node in &config::load(dir.path()).unwrap().nodes {
            let path = out.path().join(format!("{}.ign", node.name));
            assert_eq!(mode(&path), 0o600, "{}", path.display());
            checker.assert_valid(&format!("{name}: {}", node.name), &read_json(&path));
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

/// Proof that the checks check: each broken variant of a valid config is
/// rejected, with the offending place named.
#[test]
fn broken_configs_are_rejected() {
    let checker = Checker::new();
    let (_, dir) = valid_config_dirs().remove(0);
    let out = tempfile::tempdir().unwrap();
    render_all(dir.path(), out.path());
    let good = read_json(&out.path().join("cp-1.ign"));
    checker.assert_valid("unbroken", &good);

    type Breakage = (&'static str, fn(&mut Value), &'static str);
    let breakages: [Breakage; 5] = [
        (
            "mode as an octal string",
            |c| c["storage"]["files"][0]["mode"] = "0644".into(),
            "/storage/files/0/mode",
        ),
        (
            "no ignition version",
            |c| {
                c["ignition"].as_object_mut().unwrap().remove("version");
            },
            "version",
        ),
        (
            "units as an object",
            |c| c["systemd"]["units"] = serde_json::json!({"name": "x"}),
            "/systemd/units",
        ),
        (
            "a file without a path",
            |c| {
                c["storage"]["files"][1]
                    .as_object_mut()
                    .unwrap()
                    .remove("path");
            },
            "path",
        ),
        (
            "a misspelled key",
            |c| {
                let f = c["storage"]["files"][0].as_object_mut().unwrap();
                let v = f.remove("overwrite").unwrap();
                f.insert("overWrite".into(), v);
            },
            "/storage/files/0/overWrite: not a key",
        ),
    ];
    for (what, breaks, expected) in breakages {
        let mut broken = good.clone();
        breaks(&mut broken);
        let problems = checker.problems(&broken).join("\n");
        assert!(problems.contains(expected), "{what}: {problems:?}");
    }
}

#[test]
fn matchbox_data_dir_selects_each_mac_and_serves_each_node_its_config() {
    let checker = Checker::new();
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
        checker.assert_valid(&node.name, &read_json(&ign_path));
        let args: Vec<&str> = profile["boot"]["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert!(args.contains(&"flatcar.first_boot=yes"), "{args:?}");
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

/// `ignition-snippets/cluster-agent.bu` is the Butane form of what `render
/// ignition --node cp-1` emits for docs/example: same directories, same
/// files with the same modes and bytes (`local:` read from the config dir),
/// same units. Any drift between the two fails here.
#[test]
fn butane_snippet_installs_what_render_emits() {
    let (_, dir) = valid_config_dirs().remove(0);
    let bundle = cluster_agent::provision::Bundle::load(dir.path()).unwrap();
    let rendered = bundle.ignition(bundle.node("cp-1").unwrap());

    let path = repo().join("ignition-snippets/cluster-agent.bu");
    let snippet: Value = serde_saphyr::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(snippet["variant"], "flatcar");
    // Butane's flatcar 1.1.0 is the variant that emits Ignition 3.4.0.
    assert_eq!(snippet["version"], "1.1.0");

    let mode = |v: &Value| v["mode"].as_u64().expect("an integer mode (write 0o...)") as u32;
    let dirs: Vec<(String, u32)> = snippet["storage"]["directories"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["path"].as_str().unwrap().to_string(), mode(d)))
        .collect();
    let rendered_dirs: Vec<(String, u32)> = rendered
        .storage
        .directories
        .iter()
        .map(|d| (d.path.clone(), d.mode))
        .collect();
    assert_eq!(dirs, rendered_dirs);

    let files: Vec<(String, bool, u32, Vec<u8>)> = snippet["storage"]["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let contents = &f["contents"];
            let bytes = match (contents["inline"].as_str(), contents["local"].as_str()) {
                (Some(inline), None) => inline.as_bytes().to_vec(),
                (None, Some(local)) => std::fs::read(dir.path().join(local)).unwrap(),
                _ => panic!("{f}: contents must be inline or local"),
            };
            (
                f["path"].as_str().unwrap().to_string(),
                f["overwrite"].as_bool().unwrap_or(false),
                mode(f),
                bytes,
            )
        })
        .collect();
    let rendered_files: Vec<(String, bool, u32, Vec<u8>)> = rendered
        .storage
        .files
        .iter()
        .map(|f| {
            (
                f.path.clone(),
                f.overwrite,
                f.mode,
                decode(&f.contents.source),
            )
        })
        .collect();
    assert_eq!(files, rendered_files);

    let units: Vec<(String, Option<bool>, String)> = snippet["systemd"]["units"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            (
                u["name"].as_str().unwrap().to_string(),
                u["enabled"].as_bool(),
                u["contents"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let rendered_units: Vec<(String, Option<bool>, String)> = rendered
        .systemd
        .units
        .iter()
        .map(|u| (u.name.clone(), u.enabled, u.contents.clone()))
        .collect();
    assert_eq!(units, rendered_units);
}
