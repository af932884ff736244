//! Config loader against fixture directories: one per validation rule, each
//! asserting the exact `file:line:col: field: message` text.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cluster_agent::config::{
    self, BootstrapSettings, CephSettings, ClusterConfig, ClusterSettings, ConfigError,
    ContainerdSettings, Endpoint, EtcdSettings, ImageReference, KubeletSettings, MacAddr,
    Networking, NodeRole, NodeSpec, Severity, ValidationReport,
};

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/config")
        .join(case)
}

fn load_ok(case: &str) -> ClusterConfig {
    match config::load(&fixture(case)) {
        Ok(c) => c,
        Err(e) => panic!("{case} should load: {e}"),
    }
}

fn report(case: &str) -> ValidationReport {
    match config::load(&fixture(case)) {
        Err(ConfigError::Invalid { dir, report }) => {
            assert_eq!(dir, fixture(case));
            report
        }
        other => panic!("{case} should be invalid, got {other:?}"),
    }
}

fn errors(case: &str) -> Vec<String> {
    report(case)
        .errors
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[track_caller]
fn assert_errors(case: &str, expected: &[&str]) {
    assert_eq!(errors(case), expected, "fixture {case}");
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn roles(r: &[NodeRole]) -> BTreeSet<NodeRole> {
    r.iter().copied().collect()
}

fn default_networking() -> Networking {
    Networking {
        pod_cidr: "10.244.0.0/16".parse().unwrap(),
        service_cidr: "10.96.0.0/12".parse().unwrap(),
        dns_domain: "cluster.local".into(),
        gateway: None,
        dns_servers: vec![],
        prefix_length: 24,
        cni: Default::default(),
    }
}

fn node(name: &str, hostname: &str, addr: &str, r: &[NodeRole], macs: &[&str]) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        hostname: hostname.into(),
        ip: ip(addr),
        roles: roles(r),
        mac_addresses: macs.iter().map(|m| MacAddr::parse(m).unwrap()).collect(),
    }
}

use NodeRole::{CephMon, ControlPlane, Worker};

#[test]
fn valid_full_config_loads_exactly() {
    let expected = ClusterConfig {
        source_dir: fixture("valid-full"),
        cluster: ClusterSettings {
            name: "prod".into(),
            k8s_version: "1.30.4".into(),
            control_plane_endpoint: Endpoint {
                host: "api.example.net".into(),
                port: 6443,
            },
            floating_endpoint: None,
            networking: Networking {
                pod_cidr: "10.32.0.0/16".parse().unwrap(),
                service_cidr: "10.96.0.0/12".parse().unwrap(),
                dns_domain: "k8s.example.net".into(),
                gateway: Some(ip("192.168.1.1")),
                dns_servers: vec![ip("192.168.1.1"), ip("192.168.1.2")],
                prefix_length: 23,
                cni: Default::default(),
            },
            bootstrap: BootstrapSettings {
                token_ttl: Duration::from_secs(5400),
                join_port: 9444,
            },
            etcd: EtcdSettings {
                client_port: 12379,
                peer_port: 12380,
            },
            containerd: ContainerdSettings {
                sandbox_image: ImageReference::parse(
                    "registry.example.net:5000/infra/pause:3.10.1",
                )
                .unwrap(),
            },
            kubelet: KubeletSettings {
                eviction_hard: [("memory.available", "500Mi"), ("nodefs.available", "5%")]
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .into(),
            },
            ceph: Some(CephSettings {
                public_network: "192.168.0.0/23".parse().unwrap(),
                cluster_network: "10.10.0.0/24".parse().unwrap(),
                dashboard: false,
            }),
            provisioning: Default::default(),
        },
        nodes: vec![
            node(
                "cp-1",
                "cp-1.example.net",
                "192.168.1.11",
                &[ControlPlane, CephMon],
                &["52:54:00:aa:bb:01", "52:54:00:aa:bb:02"],
            ),
            node("w-1", "w-1", "192.168.0.21", &[Worker], &[]),
        ],
        warnings: vec![],
    };
    assert_eq!(load_ok("valid-full"), expected);
}

#[test]
fn minimal_config_gets_defaults() {
    let expected = ClusterConfig {
        source_dir: fixture("valid-minimal"),
        cluster: ClusterSettings {
            name: "lab".into(),
            k8s_version: "1.34.4".into(),
            // First control-plane node, default API port.
            control_plane_endpoint: Endpoint {
                host: "10.0.0.5".into(),
                port: 6443,
            },
            floating_endpoint: None,
            networking: default_networking(),
            bootstrap: BootstrapSettings {
                token_ttl: Duration::from_secs(24 * 3600),
                join_port: 9443,
            },
            etcd: EtcdSettings {
                client_port: 2379,
                peer_port: 2380,
            },
            // containerd 2.2's own default.
            containerd: ContainerdSettings {
                sandbox_image: ImageReference::parse("registry.k8s.io/pause:3.10.1").unwrap(),
            },
            // The kubelet's own eviction defaults.
            kubelet: KubeletSettings::default(),
            ceph: None,
            provisioning: Default::default(),
        },
        nodes: vec![
            node("n1", "n1", "10.0.0.5", &[ControlPlane], &[]),
            // Roles default to worker.
            node("n2", "n2", "10.0.0.6", &[Worker], &[]),
        ],
        warnings: vec![],
    };
    assert_eq!(load_ok("valid-minimal"), expected);
}

#[test]
fn master_is_a_synonym_of_control_plane() {
    let c = load_ok("synonym-master");
    let r: Vec<_> = c.nodes.iter().map(|n| n.roles.clone()).collect();
    assert_eq!(
        r,
        [
            roles(&[ControlPlane]),
            roles(&[ControlPlane, Worker]),
            roles(&[ControlPlane])
        ]
    );
    assert!(
        c.warnings.is_empty(),
        "3 control-plane nodes: {:?}",
        c.warnings
    );
}

#[test]
fn node_files_merge_into_cluster_yaml() {
    let c = load_ok("merge");
    assert_eq!(
        c.nodes,
        [
            // hostname and MAC filled in from nodes/cp-1.yaml; `master` agrees
            // with `control-plane`.
            node(
                "cp-1",
                "cp-1.lab",
                "10.0.0.11",
                &[ControlPlane],
                &["52:54:00:00:00:01"]
            ),
            // Only in nodes/w-1.yaml: appended.
            node("w-1", "w-1", "10.0.0.21", &[Worker], &["52:54:00:00:00:21"]),
        ]
    );
}

#[test]
fn nodes_may_come_only_from_node_files() {
    let c = load_ok("node-files-only");
    let names: Vec<_> = c.nodes.iter().map(|n| n.name.as_str()).collect();
    // Sorted by file name; .yml accepted, README.txt ignored.
    assert_eq!(names, ["a", "b"]);
    assert_eq!(
        c.cluster.control_plane_endpoint.to_string(),
        "10.0.0.11:6443"
    );
}

#[test]
fn even_control_plane_count_is_only_a_warning() {
    let c = load_ok("even-cp");
    assert_eq!(c.nodes.len(), 2);
    let w: Vec<String> = c.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        w,
        [
            "cluster.yaml:4:3: warning: nodes: 2 control-plane nodes: etcd needs a majority, \
          so 2 tolerate no more failures than 1; use an odd number"
        ]
    );
    assert_eq!(c.warnings[0].severity, Severity::Warning);
}

#[test]
fn examples_load_without_errors() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for dir in ["docs/example", "state-fixtures/example/etc/cluster-config"] {
        let c = config::load(&root.join(dir)).unwrap_or_else(|e| panic!("{dir}: {e}"));
        assert!(c.warnings.is_empty(), "{dir}: {:?}", c.warnings);
        let cps = c.nodes.iter().filter(|n| n.is_control_plane()).count();
        let mons = c.nodes.iter().filter(|n| n.has_role(CephMon)).count();
        assert_eq!((c.nodes.len(), cps, mons), (5, 3, 3), "{dir}");
    }
    let doc = std::fs::read(root.join("docs/example/cluster.yaml")).unwrap();
    let state =
        std::fs::read(root.join("state-fixtures/example/etc/cluster-config/cluster.yaml")).unwrap();
    assert_eq!(doc, state, "the two example copies drifted apart");
}

#[test]
fn missing_cluster_yaml_is_io_error() {
    let dir = tempfile::tempdir().unwrap();
    match config::load(dir.path()) {
        Err(ConfigError::Io { path, source }) => {
            assert_eq!(path, dir.path().join("cluster.yaml"));
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected Io, got {other:?}"),
    }
}

#[test]
fn yaml_syntax_error_has_position() {
    assert_errors(
        "syntax-error",
        &["cluster.yaml:4:5: invalid YAML: unclosed bracket '{'"],
    );
}

#[test]
fn unknown_keys_are_all_reported_with_suggestions() {
    assert_errors(
        "unknown-key",
        &[
            "cluster.yaml:4:5: cluster.networking.pod_cdir: unknown field `pod_cdir`, did you mean `pod_cidr`?",
            "cluster.yaml:6:57: nodes[0].colour: unknown field `colour`, expected one of: name, hostname, ip, roles, mac_addresses",
        ],
    );
}

#[test]
fn missing_required_fields() {
    assert_errors(
        "missing-required",
        &[
            "cluster.yaml:2:3: cluster.name: required field is missing",
            "cluster.yaml:4:5: nodes[0].ip: required field is missing",
        ],
    );
    assert_errors(
        "missing-cluster",
        &["cluster.yaml:1:1: cluster: required field is missing"],
    );
}

#[test]
fn wrong_types() {
    assert_errors(
        "wrong-types",
        &[
            "cluster.yaml:2:9: cluster.name: expected a single value, got a list",
            "cluster.yaml:4:16: cluster.bootstrap.join_port: expected an integer, got the string \"9443\"",
            "cluster.yaml:6:20: cluster.networking.prefix_length: expected an integer, got \"twenty\"",
            "cluster.yaml:7:18: cluster.networking.dns_servers: expected a list, got \"192.168.1.1\"",
            "cluster.yaml:9:40: nodes[0].roles: expected a list, got \"control-plane\"",
        ],
    );
}

#[test]
fn duplicates_point_at_second_occurrence() {
    assert_errors(
        "duplicates",
        &[
            "cluster.yaml:9:11: nodes[1].name: node name \"cp-1\" is already used by node cp-1 (first at cluster.yaml:4:11)",
            "cluster.yaml:10:15: nodes[1].hostname: hostname \"CP-1.lab\" is already used by node cp-1 (first at cluster.yaml:5:15)",
            "cluster.yaml:11:9: nodes[1].ip: 10.0.0.11 is already used by node cp-1 (first at cluster.yaml:6:9)",
            "cluster.yaml:13:21: nodes[1].mac_addresses[0]: MAC address 52:54:00:00:00:01 is already used by node cp-1 (first at cluster.yaml:8:21)",
        ],
    );
}

#[test]
fn invalid_addresses() {
    assert_errors(
        "bad-addresses",
        &[
            "cluster.yaml:4:15: cluster.networking.pod_cidr: \"10.244.0.1/16\" has host bits set (did you mean 10.244.0.0/16?)",
            "cluster.yaml:5:19: cluster.networking.service_cidr: \"10.96.0.0/33\" is not an IPv4 CIDR (expected e.g. 10.244.0.0/16)",
            "cluster.yaml:6:14: cluster.networking.gateway: \"192.168.1.256\" is not an IPv4 address",
            "cluster.yaml:9:9: nodes[0].ip: \"10.0.0.300\" is not an IPv4 address",
            "cluster.yaml:11:21: nodes[0].mac_addresses[0]: \"52:54:00:zz:00:01\" is not a MAC address (expected e.g. 52:54:00:12:34:56)",
        ],
    );
}

#[test]
fn overlapping_pod_and_service_cidrs() {
    assert_errors(
        "cidr-overlap",
        &[
            "cluster.yaml:4:15: cluster.networking.pod_cidr: 10.96.0.0/16 overlaps service_cidr 10.96.0.0/12 (default)",
        ],
    );
}

/// Each kubelet node gets a /24 of the pod CIDR; a /23 holds two.
#[test]
fn a_pod_cidr_without_a_range_for_every_kubelet_is_refused() {
    assert_errors(
        "pod-cidr-too-small",
        &[
            "cluster.yaml:4:15: cluster.networking.pod_cidr: 10.244.0.0/23 has room for 2 node range(s) of /24, but 3 nodes run a kubelet and each gets one: use a /22 or larger",
        ],
    );
}

/// The operator's CNI manifest: a file of the config dir, outside
/// `manifests/`; every path error names where it was written.
#[test]
fn a_cni_manifest_is_a_yaml_file_inside_the_config_dir() {
    let config = load_ok("cni-manifest");
    assert_eq!(
        config.cluster.networking.cni,
        config::Cni::Manifest("cni/calico.yaml".into())
    );
    assert_errors(
        "bad-cni-manifest",
        &[
            "cluster.yaml:4:21: cluster.networking.cni.manifest: \"../calico.yaml\" must be a path inside the config dir, relative, without `..` (e.g. cni/calico.yaml)",
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("cni-manifest").join("cluster.yaml"),
        dir.path().join("cluster.yaml"),
    )
    .unwrap();
    match config::load(dir.path()) {
        Err(config::ConfigError::Invalid { report, .. }) => {
            let text = report.to_string();
            assert!(
                text.contains("cluster.yaml:5:17: cluster.networking.cni.manifest: cni/calico.yaml is not a file in"),
                "{text}"
            );
        }
        other => panic!("a missing CNI manifest is an error: {other:?}"),
    }
}

#[test]
fn at_least_one_control_plane() {
    assert_errors(
        "no-control-plane",
        &[
            "cluster.yaml:4:3: nodes: no node has the control-plane (or master) role; at least one is required",
        ],
    );
}

#[test]
fn ceph_mon_needs_ceph_networks() {
    assert_errors(
        "ceph-mon-without-ceph",
        &[
            "cluster.yaml:4:56: nodes[0].roles[1]: role ceph-mon needs a cluster.ceph section with public_network",
        ],
    );
}

#[test]
fn node_ip_must_be_in_ceph_public_network() {
    assert_errors(
        "ip-outside-ceph",
        &[
            "cluster.yaml:7:21: nodes[1].ip: 10.0.1.21 is outside ceph public_network 10.0.0.0/24 (cluster.yaml:4:21)",
        ],
    );
}

#[test]
fn unknown_role() {
    assert_errors(
        "unknown-role",
        &["cluster.yaml:4:56: nodes[0].roles[1]: unknown role \"wroker\", did you mean `worker`?"],
    );
}

#[test]
fn durations_and_ports() {
    assert_errors(
        "bad-durations-ports",
        &[
            "cluster.yaml:4:16: cluster.bootstrap.token_ttl: \"400d\" is longer than the maximum of 365d",
            "cluster.yaml:5:16: cluster.bootstrap.join_port: port must not be 0",
            "cluster.yaml:7:18: cluster.etcd.client_port: port 70000 is out of range (1-65535)",
            "cluster.yaml:8:16: cluster.etcd.peer_port: etcd client_port and peer_port are both 2379; they must differ",
            "cluster.yaml:9:27: cluster.control_plane_endpoint: \"10.0.0.1:0\" has an invalid port (expected 1-65535)",
        ],
    );
}

#[test]
fn sandbox_image_must_be_an_image_reference() {
    assert_errors(
        "bad-sandbox-image",
        &[
            "cluster.yaml:4:20: cluster.containerd.sandbox_image: \"registry.k8s.io/Pause:3.10\" is not an image reference (path components are lower-case letters and digits joined by `.`, `_`, `__` or `-`; expected e.g. registry.k8s.io/pause:3.10.1)",
        ],
    );
}

#[test]
fn eviction_thresholds_are_signals_and_kubelet_thresholds() {
    assert_errors(
        "bad-eviction-thresholds",
        &[
            "cluster.yaml:5:25: cluster.kubelet.eviction_hard.nodefs.available: \"110%\" is more than 100%",
            "cluster.yaml:6:25: cluster.kubelet.eviction_hard.memory.available: \"0Mi\": a quantity threshold must be positive (use 0% to turn the signal off)",
            "cluster.yaml:7:7: cluster.kubelet.eviction_hard.imagefs.availabel: unknown field `imagefs.availabel`, did you mean `imagefs.available`?",
            "cluster.yaml:8:22: cluster.kubelet.eviction_hard.pid.available: \"lots\" is not an eviction threshold (expected a percentage such as 10% or 0% to turn the signal off, or a quantity such as 500Mi)",
        ],
    );
}

#[test]
fn token_ttl_accepts_compound_durations() {
    for (text, secs) in [
        ("30m", 1800),
        ("24h", 86_400),
        ("7d", 604_800),
        ("1h30m", 5400),
        ("365d", 31_536_000),
    ] {
        let yaml = format!(
            "cluster: {{name: lab, bootstrap: {{token_ttl: {text}}}}}\nnodes: [{{name: a, ip: 10.0.0.1, roles: [master]}}]\n"
        );
        let c =
            config::parse_cluster_yaml(yaml.as_bytes()).unwrap_or_else(|r| panic!("{text}: {r}"));
        assert_eq!(
            c.cluster.bootstrap.token_ttl,
            Duration::from_secs(secs),
            "{text}"
        );
    }
    for text in ["0h", "366d", "24", "1h1h", "30m1h"] {
        let yaml = format!(
            "cluster: {{name: lab, bootstrap: {{token_ttl: {text}}}}}\nnodes: [{{name: a, ip: 10.0.0.1, roles: [master]}}]\n"
        );
        let r = config::parse_cluster_yaml(yaml.as_bytes()).expect_err(text);
        assert_eq!(r.errors.len(), 1, "{text}: {r}");
        assert_eq!(r.errors[0].field, "cluster.bootstrap.token_ttl");
        assert_eq!((r.errors[0].line, r.errors[0].column), (1, 45), "{text}");
    }
}

#[test]
fn node_file_disagreeing_with_cluster_yaml() {
    assert_errors(
        "node-file-disagrees",
        &[
            "nodes/cp-1.yaml:4:7: node.ip: 10.0.0.12 disagrees with cluster.yaml:6:9 (nodes[0].ip), which says 10.0.0.11",
            "nodes/cp-1.yaml:5:10: node.roles: [worker] disagrees with cluster.yaml:7:12 (nodes[0].roles), which says [control-plane]",
            "nodes/cp-1.yaml:7:20: node.hardware.mac_addresses: [52:54:00:00:00:02] disagrees with cluster.yaml:8:20 (nodes[0].mac_addresses), which says [52:54:00:00:00:01]",
        ],
    );
}

#[test]
fn node_file_name_must_match_node_name() {
    assert_errors(
        "node-file-name-mismatch",
        &[
            "nodes/cp-2.yaml:2:9: node.name: \"cp-3\" does not match the file name nodes/cp-2.yaml (expected \"cp-2\")",
        ],
    );
}

#[test]
fn many_errors_are_reported_in_one_go() {
    let r = report("many-errors");
    let got: Vec<String> = r.errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        got,
        [
            "cluster.yaml:2:3: cluster.nmae: unknown field `nmae`, did you mean `name`?",
            "cluster.yaml:2:3: cluster.name: required field is missing",
            "cluster.yaml:3:16: cluster.k8s_version: \"1.31\" is not a Kubernetes version (expected MAJOR.MINOR.PATCH, e.g. \"1.31.0\")",
            "cluster.yaml:5:15: cluster.networking.pod_cidr: \"10.244.0.1/16\" has host bits set (did you mean 10.244.0.0/16?)",
            "cluster.yaml:6:19: cluster.networking.service_cidr: \"10.244.0.0/12\" has host bits set (did you mean 10.240.0.0/12?)",
            "cluster.yaml:7:26: cluster.bootstrap.token_ttl: \"30m1h\" is not a duration (expected e.g. 30m, 24h, 7d, 1h30m)",
            "cluster.yaml:7:44: cluster.bootstrap.join_port: port must not be 0",
            "cluster.yaml:15:9: nodes[1].ip: \"10.0.0.300\" is not an IPv4 address",
            "cluster.yaml:17:21: nodes[1].mac_addresses[0]: MAC address 52:54:00:aa:bb:01 is already used by node cp-1 (first at cluster.yaml:13:21)",
            "cluster.yaml:18:11: nodes[2].name: \"Bad_Name\" is not a valid name (lower-case letters, digits and '-', at most 63 characters, not starting or ending with '-')",
            "cluster.yaml:19:9: nodes[2].ip: 192.168.1.11 is already used by node cp-1 (first at cluster.yaml:11:9)",
            "cluster.yaml:20:13: nodes[2].roles[0]: unknown role \"wrker\", did you mean `worker`?",
            "cluster.yaml:21:5: nodes[2].mac: unknown field `mac`, expected one of: name, hostname, ip, roles, mac_addresses",
            "nodes/cp-9.yaml:4:10: invalid YAML: unclosed bracket '['",
        ]
    );
    // The Display of the whole error lists everything too.
    let text = config::load(&fixture("many-errors"))
        .unwrap_err()
        .to_string();
    assert!(text.ends_with("14 error(s), 0 warning(s)"), "{text}");
}

#[test]
fn non_utf8_is_reported_with_position() {
    let r = config::parse_cluster_yaml(b"cluster:\n  name: l\xffb\n").unwrap_err();
    assert_eq!(
        r.errors[0].to_string(),
        "cluster.yaml:2:10: the file is not valid UTF-8"
    );
}

#[test]
fn empty_cluster_yaml() {
    let r = config::parse_cluster_yaml(b"").unwrap_err();
    assert_eq!(
        r.errors[0].to_string(),
        "cluster.yaml:0:0: the file is empty"
    );
}

/// Deterministic xorshift: no dependency, same inputs on every run.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Same function the fuzz target calls; mutations of a valid file reach the
/// deep validation paths, random bytes the parser's error paths.
#[test]
fn mutated_inputs_never_panic() {
    let seed = std::fs::read(fixture("valid-full").join("cluster.yaml")).unwrap();
    const TOKENS: &[&[u8]] = &[
        b":",
        b"-",
        b"[",
        b"]",
        b"{",
        b"}",
        b"&a",
        b"*a",
        b"!!str",
        b"\n",
        b"  ",
        b"\"",
        b"'",
        b"#",
        b"~",
        b"0",
        b"999999999999999999999",
        b"/",
        b".",
        b"\xff",
        b"\t",
        b"---\n",
        b"? ",
    ];
    let mut rng = Rng(0x5eed_c0ff_ee12_3456);
    for _ in 0..3000 {
        let mut input = seed.clone();
        for _ in 0..1 + rng.below(8) {
            let at = rng.below(input.len() + 1);
            match rng.below(4) {
                0 if at < input.len() => {
                    input.remove(at);
                }
                1 if at < input.len() => input[at] = rng.next() as u8,
                2 => {
                    let t = TOKENS[rng.below(TOKENS.len())];
                    input.splice(at..at, t.iter().copied());
                }
                _ => {
                    // Duplicate a slice: repeats keys, nodes and nesting.
                    let end = (at + rng.below(64)).min(input.len());
                    let copy = input[at..end].to_vec();
                    input.splice(at..at, copy);
                }
            }
        }
        let _ = config::parse_cluster_yaml(&input);
    }
    for len in 0..500 {
        let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        let _ = config::parse_cluster_yaml(&bytes);
    }
    // Deep nesting must not overflow the stack.
    let deep = "[".repeat(100_000);
    assert!(config::parse_cluster_yaml(deep.as_bytes()).is_err());
}

#[test]
fn a_floating_endpoint_is_an_unowned_ipv4_address_on_the_masters_segment() {
    let config = load_ok("floating-endpoint");
    assert_eq!(config.cluster.floating_endpoint, Some(ip("10.0.1.250")));
    assert_eq!(config.cluster.control_plane_endpoint.port, 6443);
    assert_eq!(load_ok("valid-full").cluster.floating_endpoint, None);
    assert_errors(
        "bad-floating-endpoint",
        &[
            "cluster.yaml:3:27: cluster.control_plane_endpoint: 10.0.1.10 is outside control-plane node cp-1's subnet 10.0.0.0/24 (networking.prefix_length 24): the masters move a floating endpoint with ARP, which stays on one segment",
            "cluster.yaml:3:27: cluster.control_plane_endpoint: 10.0.1.10 is node w-1's own address (cluster.yaml:7:21); a floating endpoint must be one no node has",
        ],
    );
    assert_errors(
        "bad-floating-endpoint-dns",
        &[
            "cluster.yaml:3:27: cluster.control_plane_endpoint: \"api.lab.example\" is a DNS name, but a floating endpoint (floating_endpoint: true at cluster.yaml:4:22) must be an IPv4 address",
        ],
    );
    assert_errors(
        "bad-floating-endpoint-bool",
        &[
            "cluster.yaml:4:22: cluster.floating_endpoint: \"yes\" is not a boolean (expected true or false, unquoted)",
        ],
    );
}

#[test]
fn the_ceph_dashboard_is_served_by_monitors_on_masters() {
    let config = load_ok("ceph-dashboard");
    assert!(config.cluster.ceph.as_ref().unwrap().dashboard);
    assert!(!load_ok("valid-full").cluster.ceph.unwrap().dashboard);
    let why = "cannot serve the dashboard (ceph.dashboard: true at cluster.yaml:5:16): its certificate is issued from the cluster CA, whose key only control-plane nodes hold; add control-plane or set dashboard: false";
    assert_errors(
        "bad-ceph-dashboard",
        &[
            &format!(
                "cluster.yaml:8:39: nodes[1].roles: a ceph-mon node without role control-plane {why}"
            ),
            &format!(
                "cluster.yaml:9:39: nodes[2].roles: a ceph-mon node without role control-plane {why}"
            ),
        ],
    );
    assert_errors(
        "bad-ceph-dashboard-bool",
        &[
            "cluster.yaml:5:16: cluster.ceph.dashboard: \"true\" is not a boolean (expected true or false, unquoted)",
        ],
    );
}
