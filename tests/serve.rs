//! `serve` as the bootstrap machine, on a segment of network namespaces: a
//! bridge in the server's namespace and one namespace per machine, each
//! with the MAC a test gives it. Machines are judged with real clients
//! (`curl --cacert` against the CA the pointer names, busybox's TFTP), the
//! pointer by the real `ignition-validate`.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::Value;

use support::ignition::Validator;
use support::vm::Netns;
use support::{AGENT, require_tool, text};

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
const CP1_MAC: &str = "52:54:00:aa:bb:01";
const W1_MAC: &str = "52:54:00:aa:bb:11";
const STRANGER_MAC: &str = "52:54:00:de:ad:01";

/// The server's namespace with a bridge at `<prefix>.1/24`, and a
/// namespace per machine on it; each killed and removed on drop.
struct Segment {
    tag: String,
    prefix: String,
    machines: Vec<Netns>,
    server: Netns,
}

impl Segment {
    fn new() -> Segment {
        // Unique per segment, as the tests of this binary run at once.
        static SEGMENTS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = SEGMENTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pid = std::process::id();
        let tag = format!("cas-{pid}-{n}");
        let prefix = format!("10.253.{}", (pid * 4 + n) % 250);
        let server = Netns::new(&format!("{tag}-srv"));
        server.ip(&["link", "add", "br0", "type", "bridge", "forward_delay", "0"]);
        server.ip(&["addr", "add", &format!("{prefix}.1/24"), "dev", "br0"]);
        server.ip(&["link", "set", "br0", "up"]);
        Segment {
            tag,
            prefix,
            machines: vec![],
            server,
        }
    }

    fn server_ns(&self) -> String {
        self.server.name.clone()
    }

    fn server_ip(&self) -> String {
        format!("{}.1", self.prefix)
    }

    /// A machine at `<prefix>.<host>` with link-layer address `mac`.
    fn machine(&mut self, host: u8, mac: &str) -> String {
        let machine = Netns::new(&format!("{}-m{host}", self.tag));
        let ns = machine.name.clone();
        // Two machines with one MAC on a bridge: IPv6's own chatter would
        // move the bridge's forwarding entry between them mid-request.
        let sysctl = machine
            .command("sysctl")
            .args(["-qw", "net.ipv6.conf.all.disable_ipv6=1"])
            .output()
            .unwrap();
        assert!(sysctl.status.success(), "{}", text(&sysctl));
        let port = format!("m{host}");
        self.server.ip(&[
            "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        self.server
            .ip(&["link", "set", &port, "master", "br0", "up"]);
        machine.ip(&["link", "set", "eth0", "address", mac]);
        machine.ip(&[
            "addr",
            "add",
            &format!("{}.{host}/24", self.prefix),
            "dev",
            "eth0",
        ]);
        machine.ip(&["link", "set", "eth0", "up"]);
        self.machines.push(machine);
        ns
    }

    fn on(&self, ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", ns]).arg(program);
        command
    }
}

/// A running `serve`, SIGKILLed on drop if the test did not stop it.
struct Serve {
    child: Child,
    log: PathBuf,
}

impl Serve {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), signal).unwrap();
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("serve's log:\n{}", self.log());
        }
    }
}

/// `curl` from a machine: status and body.
fn fetch(segment: &Segment, ns: &str, url: &str, ca: Option<&Path>) -> (u16, Vec<u8>) {
    let mut command = segment.on(ns, require_tool("curl", "curl"));
    command.args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"]);
    if let Some(ca) = ca {
        command.arg("--cacert").arg(ca);
    }
    let out = command.arg(url).output().unwrap();
    assert!(out.status.success(), "curl {url}: {}", text(&out));
    let split = out.stdout.iter().rposition(|b| *b == b'\n').unwrap();
    let status = String::from_utf8_lossy(&out.stdout[split + 1..])
        .parse()
        .unwrap();
    (status, out.stdout[..split].to_vec())
}

fn start_serve(segment: &Segment, dir: &Path, config: &Path, extra: &[&str]) -> Serve {
    let log = dir.join("serve.log");
    let server = segment.server_ip();
    let child = segment
        .on(&segment.server_ns(), AGENT)
        .args(["--config-dir", config.to_str().unwrap(), "serve"])
        .args(["--listen", &format!("{server}:8080")])
        .args(["--tls-listen", &format!("{server}:8443")])
        .arg("--assets")
        .arg(dir.join("assets"))
        .arg("--run-dir")
        .arg(dir.join("run"))
        .args(extra)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let serve = Serve { child, log };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !serve.log().contains("power on your nodes") {
        assert!(
            Instant::now() < deadline,
            "serve did not start:\n{}",
            serve.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    serve
}

/// The CA a pointer names, written where curl can read it.
fn pointer_ca(pointer: &Value, dir: &Path) -> PathBuf {
    let source = pointer["ignition"]["security"]["tls"]["certificateAuthorities"][0]["source"]
        .as_str()
        .unwrap();
    let pem = base64::engine::general_purpose::STANDARD
        .decode(source.strip_prefix("data:;base64,").unwrap())
        .unwrap();
    let path = dir.join("serve-ca.pem");
    std::fs::write(&path, pem).unwrap();
    path
}

fn wait_for_line(serve: &Serve, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !serve.log().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in serve's log:\n{}",
            serve.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn each_machine_gets_only_its_own_config_over_tls_and_only_once_until_rearmed() {
    let dir = tempfile::tempdir().unwrap();
    let config = support::example_config_dir(dir.path(), SECRET);
    std::fs::create_dir_all(dir.path().join("assets/flatcar")).unwrap();
    std::fs::write(
        dir.path().join("assets/flatcar_production_pxe.vmlinuz"),
        b"kernel",
    )
    .unwrap();
    std::fs::write(dir.path().join("secret-next-door"), b"not an asset").unwrap();
    // Matchbox's layout: `current` points at a release inside the assets.
    std::fs::create_dir_all(dir.path().join("assets/flatcar/4081.2.0")).unwrap();
    std::fs::write(dir.path().join("assets/flatcar/4081.2.0/k"), b"release").unwrap();
    std::os::unix::fs::symlink("4081.2.0", dir.path().join("assets/flatcar/current")).unwrap();
    std::os::unix::fs::symlink("../secret-next-door", dir.path().join("assets/escape")).unwrap();
    let mut segment = Segment::new();
    let cp1 = segment.machine(11, CP1_MAC);
    let stranger = segment.machine(21, STRANGER_MAC);
    let spoofer = segment.machine(31, CP1_MAC);
    let serve = start_serve(&segment, dir.path(), &config, &[]);
    let http = format!("http://{}:8080", segment.server_ip());
    let https = format!("https://{}:8443", segment.server_ip());

    let (status, script) = fetch(&segment, &cp1, &format!("{http}/boot.ipxe"), None);
    assert_eq!(
        (status, String::from_utf8_lossy(&script).as_ref()),
        (200, "#!ipxe\nchain ipxe?mac=${mac:hexhyp}\n")
    );
    let (status, script) = fetch(
        &segment,
        &cp1,
        &format!("{http}/ipxe?mac=52-54-00-AA-BB-01"),
        None,
    );
    let script = String::from_utf8(script).unwrap();
    assert_eq!(status, 200, "{script}");
    assert!(
        script.contains(&format!(
            "ignition.config.url={http}/ignition?mac=52-54-00-aa-bb-01 "
        )) && script.contains(&format!(
            "kernel {http}/assets/flatcar_production_pxe.vmlinuz "
        )),
        "{script}"
    );

    // The pointer: no secret, valid Ignition, pinning the config's hash.
    let (status, pointer) = fetch(
        &segment,
        &stranger,
        &format!("{http}/ignition?mac={CP1_MAC}"),
        None,
    );
    assert_eq!(status, 200);
    Validator::new().assert_valid("serve's pointer", &pointer);
    let pointer: Value = serde_json::from_slice(&pointer).unwrap();
    let want = support::rendered_ignition(&config, "cp-1");
    let hash = ring::digest::digest(&ring::digest::SHA512, &want);
    let hex: String = hash.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    let replace = &pointer["ignition"]["config"]["replace"];
    assert_eq!(replace["verification"]["hash"], format!("sha512-{hex}"));
    assert_eq!(
        replace["source"],
        format!("{https}/ignition?mac=52-54-00-aa-bb-01")
    );
    let ca = pointer_ca(&pointer, dir.path());
    let config_url = replace["source"].as_str().unwrap().to_string();

    // Another machine may not have cp-1's config, over TLS or not.
    let (status, body) = fetch(&segment, &stranger, &config_url, Some(&ca));
    assert_eq!(status, 403, "{}", String::from_utf8_lossy(&body));
    // cp-1 gets exactly what `render ignition` prints, over TLS that
    // verifies against the pointer's CA.
    let (status, body) = fetch(&segment, &cp1, &config_url, Some(&ca));
    assert_eq!(status, 200);
    assert!(
        body == want,
        "the served config differs from render ignition's"
    );
    // A second machine claiming cp-1's MAC, from another address: refused,
    // and the log says who fetched first.
    let (status, _) = fetch(&segment, &spoofer, &config_url, Some(&ca));
    assert_eq!(status, 403);
    wait_for_line(&serve, &format!("already fetched by {}.11", segment.prefix));
    // The first fetcher may fetch again (Ignition retries).
    assert_eq!(fetch(&segment, &cp1, &config_url, Some(&ca)).0, 200);

    // SIGHUP re-arms: now the first to ask wins again.
    serve.signal(nix::sys::signal::Signal::SIGHUP);
    wait_for_line(&serve, "re-armed");
    assert_eq!(fetch(&segment, &spoofer, &config_url, Some(&ca)).0, 200);
    assert_eq!(fetch(&segment, &cp1, &config_url, Some(&ca)).0, 403);

    // Unknown MACs, bad MACs, paths out of the assets directory.
    let unknown = fetch(
        &segment,
        &stranger,
        &format!("{http}/ipxe?mac=52-54-00-de-ad-01"),
        None,
    );
    assert_eq!(unknown.0, 404);
    wait_for_line(&serve, "no node in cluster.yaml has this MAC");
    assert_eq!(
        fetch(
            &segment,
            &stranger,
            &format!("{http}/ignition?mac=nonsense"),
            None
        )
        .0,
        400
    );
    for path in [
        "/assets/",
        "/assets/flatcar",
        "/assets/%2e%2e/secret-next-door",
        "/assets/../secret-next-door",
        "/cluster/cluster.yaml",
        "/assets/escape",
    ] {
        let mut command = segment.on(&stranger, require_tool("curl", "curl"));
        let out = command
            .args([
                "-sS",
                "--path-as-is",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
            ])
            .arg(format!("{http}{path}"))
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "404",
            "{path}: {}",
            text(&out)
        );
    }
    assert_eq!(
        fetch(
            &segment,
            &stranger,
            &format!("{http}/assets/flatcar_production_pxe.vmlinuz"),
            None
        ),
        (200, b"kernel".to_vec())
    );

    assert_eq!(
        fetch(
            &segment,
            &stranger,
            &format!("{http}/assets/flatcar/current/k"),
            None
        ),
        (200, b"release".to_vec())
    );

    // The log names MAC, node and source of each request, and never the secret.
    let log = serve.log();
    assert!(
        log.lines().any(|l| l.contains("/ignition")
            && l.contains("52:54:00:aa:bb:01")
            && l.contains("cp-1")
            && l.contains(&format!("{}.11", segment.prefix))),
        "{log}"
    );
    let worker_secret = cluster_agent::join::JoinKeys::worker_secret(SECRET, "prod");
    for secret in [SECRET, &worker_secret[..]] {
        let b64 = base64::engine::general_purpose::STANDARD.encode(secret);
        let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        assert!(
            !log.contains(&b64) && !log.contains(&hex),
            "a secret in the log"
        );
    }
    assert!(!log.contains(std::str::from_utf8(SECRET).unwrap()));

    // SIGTERM: a clean exit, nothing left behind.
    let mut serve = serve;
    serve.signal(nix::sys::signal::Signal::SIGTERM);
    let status = serve.child.wait().unwrap();
    assert!(status.success(), "{status}: {}", serve.log());
    assert!(!dir.path().join("run").exists());
}

#[test]
fn with_pxe_it_runs_a_proxy_dhcp_and_tftp_of_ipxe_and_stops_it_on_exit() {
    let dnsmasq = Path::new("/usr/sbin/dnsmasq");
    assert!(
        dnsmasq.is_file(),
        "dnsmasq is missing: run .ci/setup (apt-get install dnsmasq-base)"
    );
    let busybox = require_tool("busybox", "busybox-static");
    let dir = tempfile::tempdir().unwrap();
    let config = support::example_config_dir(dir.path(), SECRET);
    std::fs::create_dir_all(dir.path().join("assets")).unwrap();
    let mut segment = Segment::new();
    let machine = segment.machine(41, W1_MAC);
    let serve = start_serve(&segment, dir.path(), &config, &["--pxe-interface", "br0"]);
    let conf = std::fs::read_to_string(dir.path().join("run/dnsmasq.conf")).unwrap();
    assert!(
        conf.contains(&format!(
            "dhcp-range={}.0,proxy,255.255.255.0",
            segment.prefix
        )),
        "{conf}"
    );
    for image in ["undionly.kpxe", "ipxe.efi"] {
        let local = dir.path().join(image);
        let out = segment
            .on(&machine, &busybox)
            .args(["tftp", "-g", "-r", image, "-l"])
            .arg(&local)
            .arg(segment.server_ip())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tftp {image}: {}\n{}",
            text(&out),
            serve.log()
        );
        assert!(
            std::fs::read(&local).unwrap()
                == std::fs::read(Path::new("/usr/lib/ipxe").join(image)).unwrap(),
            "{image} over TFTP differs from Debian's"
        );
    }
    assert!(
        serve.log().contains("dnsmasq: "),
        "dnsmasq's log is not in serve's:\n{}",
        serve.log()
    );
    let mut serve = serve;
    serve.signal(nix::sys::signal::Signal::SIGINT);
    assert!(serve.child.wait().unwrap().success(), "{}", serve.log());
    assert_eq!(pids_in(&segment.server_ns()), "", "processes left behind");
    assert!(!dir.path().join("run").exists(), "serve left its run dir");

    // SIGKILLed, serve cannot stop dnsmasq itself: dnsmasq must go anyway,
    // or a DHCP proxy would go on answering on the segment.
    let mut serve = start_serve(&segment, dir.path(), &config, &["--pxe-interface", "br0"]);
    assert_ne!(pids_in(&segment.server_ns()), "");
    serve.signal(nix::sys::signal::Signal::SIGKILL);
    let _ = serve.child.wait();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pids_in(&segment.server_ns()).is_empty() {
        assert!(
            Instant::now() < deadline,
            "dnsmasq outlived a SIGKILLed serve: {}",
            text(
                &Command::new("ps")
                    .args(["-o", "pid,ppid,args", "-p"])
                    .arg(pids_in(&segment.server_ns()).replace('\n', ","))
                    .output()
                    .unwrap()
            )
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The pids of the processes in network namespace `ns`, one a line.
fn pids_in(ns: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn a_wildcard_listen_address_or_missing_assets_dir_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = support::example_config_dir(dir.path(), SECRET);
    std::fs::create_dir_all(dir.path().join("assets")).unwrap();
    let run = |args: &[&str]| -> Output {
        Command::new(AGENT)
            .args(["--config-dir", config.to_str().unwrap(), "serve"])
            .args(args)
            .output()
            .unwrap()
    };
    let assets = dir.path().join("assets");
    let out = run(&[
        "--listen",
        "0.0.0.0:18080",
        "--assets",
        assets.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("--listen 0.0.0.0:18080 is not a concrete IPv4 address"),
        "{}",
        text(&out)
    );
    let out = run(&[
        "--listen",
        "127.0.0.1:18080",
        "--assets",
        "/nonexistent/assets",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("/nonexistent/assets"), "{}", text(&out));
}
