//! Network boot of real virtual machines against `cluster-agent serve`.
//!
//! A segment of network namespaces: `lan` holds the bridge, `serve` (the
//! bootstrap machine, with `--pxe-interface` so its dnsmasq answers PXE as a
//! proxy) and the VMs' taps; `site` holds the site's own DHCP server (a
//! plain dnsmasq handing out addresses, with no PXE options), on a veth
//! into the bridge (two dnsmasqs cannot both bind DHCP on one interface).
//! QEMU's NIC ROM is Debian's iPXE: the VM gets its address from the site,
//! the proxy's answer sends it to `/boot.ipxe`, that chains to the script
//! for its MAC, and it boots the kernel and initramfs in the assets
//! directory. Flatcar's images cannot be downloaded here, so those are
//! Debian's kernel and an initramfs this test builds: busybox (plus
//! openssl, see [`initramfs`]) fetching `ignition.config.url` from its own
//! command line like Ignition would — the pointer over HTTP, then the
//! config it points at over HTTPS from the VM's own address, checked
//! against the pointer's SHA-512 — and printing the config's SHA-256 on the
//! serial console.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use support::vm::{Accel, Console, Cpio, Daemon, Kernel, Netns, clean, qemu_args, until};
use support::{AGENT, require_tool, text};

/// cp-1 of docs/example, and a MAC no node in it has.
const NODE: &str = "cp-1";
const NODE_MAC: &str = "52:54:00:aa:bb:01";
const STRANGER_MAC: &str = "52:54:00:de:ad:02";
const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
/// The segment, inside the test's own namespaces only.
const PREFIX: &str = "10.252.0";
const SITE_IP: &str = "10.252.0.1";
const SERVE_IP: &str = "10.252.0.5";
/// What the site's DHCP reserves for the node's MAC.
const NODE_IP: &str = "10.252.0.11";
const KERNEL_ASSET: &str = "flatcar_production_pxe.vmlinuz";
const INITRD_ASSET: &str = "flatcar_production_pxe_image.cpio.gz";
/// The initramfs's markers on the serial console.
const CONFIG_MARKER: &str = "IGNITION-SHA256 ";
const NO_CONFIG_MARKER: &str = "IGNITION-NONE ";
const PROBE_MARKER: &str = "VM-PROBE-OK";

/// PID 1 of the test's initramfs. (Debian's busybox 1.35 `wget -T`
/// segfaults, hence `timeout wget`.)
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin LD_LIBRARY_PATH=/lib/x86_64-linux-gnu
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
up() { cut -d' ' -f1 /proc/uptime; }
fail() { echo "IGNITION-NONE $* uptime=$(up)"; poweroff -f; }
echo "VM-INIT uptime=$(up)"
if grep -q vm.probe /proc/cmdline; then echo "VM-PROBE-OK uptime=$(up)"; poweroff -f; fi
for m in $(cat /etc/modules.load); do insmod /lib/modules/$m || fail "insmod $m"; done
nic=
for n in /sys/class/net/*; do [ "${n##*/}" = lo ] || { nic=${n##*/}; break; }; done
[ -n "$nic" ] || fail "no network interface"
echo "VM-NIC $nic $(cat /sys/class/net/$nic/address)"
udhcpc -i "$nic" -f -q -n -t 20 -T 1 -s /etc/udhcpc.script || fail "no DHCP lease on $nic"
echo "VM-LEASE $(ip -4 -o addr show dev "$nic" | awk '{print $4}') uptime=$(up)"
url=$(sed -n 's/.*ignition\.config\.url=\([^ ]*\).*/\1/p' /proc/cmdline)
[ -n "$url" ] || fail "no ignition.config.url on the command line"
timeout 20 wget -q -O /tmp/pointer.ign "$url" || fail "wget $url"
pointer=$(tr -d '\n' < /tmp/pointer.ign)
source=$(echo "$pointer" | sed -n 's/.*"source" *: *"\(https:[^"]*\)".*/\1/p')
hash=$(echo "$pointer" | sed -n 's/.*"hash" *: *"sha512-\([0-9a-f]*\)".*/\1/p')
[ -n "$source" ] && [ -n "$hash" ] || fail "no https source and sha512 in the pointer: $(head -c 300 /tmp/pointer.ign)"
echo "VM-POINTER $source uptime=$(up)"
timeout 20 wget -q --no-check-certificate -O /tmp/config.ign "$source" || fail "wget $source"
sum=$(sha512sum /tmp/config.ign | cut -d' ' -f1)
[ "$sum" = "$hash" ] || fail "the config's sha512 $sum is not the pointer's $hash"
echo "IGNITION-SHA256 $(sha256sum /tmp/config.ign | cut -d' ' -f1) uptime=$(up)"
poweroff -f
"#;

/// busybox udhcpc's hook: configure the lease.
const UDHCPC_SCRIPT: &str = r#"#!/bin/sh
case "$1" in
deconfig) ip link set "$interface" up; ip -4 addr flush dev "$interface" ;;
bound|renew)
  ip -4 addr flush dev "$interface"
  ip addr add "$ip/$mask" dev "$interface"
  [ -z "$router" ] || ip route replace default via "${router%% *}" dev "$interface"
  ;;
esac
exit 0
"#;

/// Everything the test runs, found before anything is set up; each names
/// the Debian package that brings it.
struct Tools {
    qemu: PathBuf,
    dnsmasq: PathBuf,
    busybox: PathBuf,
    openssl: PathBuf,
}

fn tools() -> Tools {
    // dnsmasq lives in /usr/sbin, which a test's PATH may lack.
    let dnsmasq = PathBuf::from("/usr/sbin/dnsmasq");
    assert!(
        dnsmasq.is_file(),
        "{} is missing: run `.ci/setup` as root (or `apt-get install dnsmasq-base`)",
        dnsmasq.display()
    );
    for (rom, package) in [
        // QEMU's virtio-net-pci boot ROM (BIOS and UEFI in one image), on
        // Debian's QEMU firmware path (`qemu-system-x86_64 -L help`).
        ("/usr/lib/ipxe/qemu/efi-virtio.rom", "ipxe-qemu"),
        ("/usr/lib/ipxe/undionly.kpxe", "ipxe"),
        ("/usr/lib/ipxe/ipxe.efi", "ipxe"),
    ] {
        assert!(
            Path::new(rom).exists(),
            "{rom} is missing: run `.ci/setup` as root (or `apt-get install {package}`)"
        );
    }
    Tools {
        qemu: require_tool("qemu-system-x86_64", "qemu-system-x86"),
        dnsmasq,
        busybox: require_tool("busybox", "busybox-static"),
        openssl: require_tool("openssl", "openssl"),
    }
}

/// The initramfs: static busybox, the NIC's modules in load order,
/// [`INIT`], and openssl with its libraries. busybox's own TLS (1.35) sends
/// no signature_algorithms extension, which rustls requires of a TLS 1.2
/// client ("peer is incompatible: SignatureAlgorithmsExtensionRequired");
/// busybox wget runs `openssl s_client` instead when there is one.
fn initramfs(tools: &Tools, kernel: &Kernel) -> Vec<u8> {
    let mut cpio = Cpio::new();
    for dir in [
        "bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "etc", "root",
    ] {
        cpio.dir(dir);
    }
    // The console the kernel opens for PID 1, before devtmpfs is mounted.
    cpio.char_device("dev/console", 0o600, 5, 1);
    cpio.copy("bin/busybox", &tools.busybox);
    cpio.file("init", 0o755, INIT.as_bytes());
    cpio.file("etc/udhcpc.script", 0o755, UDHCPC_SCRIPT.as_bytes());
    let mut load = String::new();
    for module in kernel.load_order(&["virtio_pci", "virtio_net"]) {
        let name = module.file_name().unwrap().to_str().unwrap().to_string();
        cpio.copy(&format!("lib/modules/{name}"), &module);
        load.push_str(&name);
        load.push('\n');
    }
    cpio.file("etc/modules.load", 0o644, load.as_bytes());
    cpio.program_with_libraries(&tools.openssl);
    cpio.gzipped()
}

fn sha256_hex(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The namespaces, bridge and the site's DHCP server. Fields drop in
/// order: processes before the namespaces they run in.
struct Segment {
    site_dhcp: Option<Daemon>,
    site: Netns,
    lan: Netns,
}

impl Segment {
    fn new(tools: &Tools, dir: &Path) -> Segment {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let tag = format!(
            "capxe{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let lan = Netns::new(&format!("{tag}-lan"));
        let site = Netns::new(&format!("{tag}-site"));
        lan.ip(&["link", "add", "br0", "type", "bridge"]);
        // Forward at once: a new port otherwise learns for 15 s first.
        lan.ip(&["link", "set", "br0", "type", "bridge", "forward_delay", "0"]);
        lan.ip(&["addr", "add", &format!("{SERVE_IP}/24"), "dev", "br0"]);
        lan.ip(&["link", "set", "br0", "up"]);
        lan.ip(&[
            "link", "add", "site", "type", "veth", "peer", "name", "eth0", "netns", &site.name,
        ]);
        lan.ip(&["link", "set", "site", "master", "br0", "up"]);
        site.ip(&["addr", "add", &format!("{SITE_IP}/24"), "dev", "eth0"]);
        site.ip(&["link", "set", "eth0", "up"]);
        let mut command = site.command(&tools.dnsmasq);
        command
            .args([
                "--keep-in-foreground",
                "--log-facility=-",
                "--conf-file=/dev/null",
            ])
            .args(["--port=0", "--interface=eth0", "--bind-interfaces"])
            .args([
                "--user=root",
                "--pid-file=",
                "--log-dhcp",
                "--dhcp-authoritative",
            ])
            .arg(format!(
                "--dhcp-range={PREFIX}.100,{PREFIX}.199,255.255.255.0,1h"
            ))
            .arg(format!("--dhcp-host={NODE_MAC},{NODE_IP}"))
            .arg(format!("--dhcp-option=option:router,{SITE_IP}"))
            .arg(format!(
                "--dhcp-leasefile={}",
                dir.join("site.leases").display()
            ));
        let mut site_dhcp = Daemon::spawn(
            "the site's DHCP (dnsmasq)",
            command,
            &dir.join("site-dhcp.log"),
        );
        until(Duration::from_secs(10), || {
            site_dhcp
                .log_text()
                .contains("DHCP, IP range")
                .then_some(())
        })
        .unwrap_or_else(|| {
            panic!(
                "the site's dnsmasq did not start ({:?}):\n{}",
                site_dhcp.exited(),
                site_dhcp.log_text()
            )
        });
        Segment {
            site_dhcp: Some(site_dhcp),
            site,
            lan,
        }
    }

    /// A tap on the bridge for a VM.
    fn tap(&self, name: &str) {
        self.lan.ip(&["tuntap", "add", "dev", name, "mode", "tap"]);
        self.lan.ip(&["link", "set", name, "master", "br0", "up"]);
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        drop(self.site_dhcp.take());
    }
}

/// A VM: QEMU in `lan` on its own tap, killed on drop.
struct Vm {
    qemu: Daemon,
    console: Console,
    started: Instant,
    /// When QEMU was seen to have exited (since `started`), and how.
    ended: Option<(Duration, ExitStatus)>,
}

impl Vm {
    fn start(
        tools: &Tools,
        segment: &Segment,
        dir: &Path,
        name: &str,
        mac: &str,
        accel: Accel,
    ) -> Vm {
        let tap = format!("tap-{name}");
        segment.tap(&tap);
        let serial = dir.join(format!("{name}.serial"));
        let mut command = segment.lan.command(&tools.qemu);
        command.args(qemu_args(accel, mac, &tap, &serial));
        let started = Instant::now();
        let qemu = Daemon::spawn(
            &format!("QEMU {name}"),
            command,
            &dir.join(format!("{name}.qemu.log")),
        );
        Vm {
            qemu,
            console: Console::new(serial, started),
            started,
            ended: None,
        }
    }

    fn poll(&mut self) {
        self.console.poll();
        if self.ended.is_none() {
            if let Some(status) = self.qemu.exited() {
                // The console's last lines were written before the exit.
                self.console.poll();
                self.ended = Some((self.started.elapsed(), status));
            }
        }
    }

    /// The console lines containing one of `needles`, with their times.
    fn timeline(&self, needles: &[&str]) -> String {
        self.console
            .lines
            .iter()
            .filter(|(_, l)| needles.iter().any(|n| l.contains(n)))
            .map(|(t, l)| format!("  {:6.1} s  {l}", t.as_secs_f64()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- {} serial console:\n{}",
                self.qemu.name,
                self.console.text()
            );
        }
        self.qemu.stop(Signal::SIGKILL, Duration::from_secs(5));
    }
}

/// KVM when `/dev/kvm` works and boots the kernel (to the initramfs's
/// first line) within 30 s, else TCG; `CLUSTER_AGENT_VM_ACCEL=kvm|tcg`
/// chooses. The reason goes with it.
fn choose_accel(tools: &Tools, kernel: &Kernel, initrd: &Path, dir: &Path) -> (Accel, String) {
    match std::env::var("CLUSTER_AGENT_VM_ACCEL").as_deref() {
        Ok("kvm") => return (Accel::Kvm, "CLUSTER_AGENT_VM_ACCEL=kvm".into()),
        Ok("tcg") => return (Accel::Tcg, "CLUSTER_AGENT_VM_ACCEL=tcg".into()),
        Ok(other) => panic!("CLUSTER_AGENT_VM_ACCEL={other}: expected kvm or tcg"),
        Err(_) => {}
    }
    if let Err(why) = support::vm::kvm_device() {
        return (Accel::Tcg, why);
    }
    let serial = dir.join("kvm-probe.serial");
    let mut command = Command::new(&tools.qemu);
    command
        .args([
            "-accel",
            "kvm",
            "-m",
            "256",
            "-nographic",
            "-monitor",
            "none",
        ])
        .args(["-nic", "none", "-no-reboot", "-serial"])
        .arg(format!("file:{}", serial.display()))
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 quiet vm.probe"]);
    let mut console = Console::new(serial, Instant::now());
    let mut probe = Daemon::spawn("QEMU KVM probe", command, &dir.join("kvm-probe.log"));
    let outcome = until(Duration::from_secs(30), || {
        console.poll();
        if let Some((t, _)) = console.find(PROBE_MARKER) {
            return Some(Ok(t));
        }
        probe.exited().map(Err)
    });
    probe.stop(Signal::SIGKILL, Duration::from_secs(5));
    match outcome {
        Some(Ok(t)) => (Accel::Kvm, format!("/dev/kvm booted the kernel in {t:.1?}")),
        Some(Err(status)) => (
            Accel::Tcg,
            format!(
                "QEMU with KVM exited ({status}): {}",
                probe.log_text().trim()
            ),
        ),
        None => (Accel::Tcg, "KVM did not boot the kernel within 30 s".into()),
    }
}

/// A running `serve` in `lan`.
fn start_serve(segment: &Segment, dir: &Path, config: &Path) -> Daemon {
    let mut command = segment.lan.command(AGENT);
    command
        .args(["--config-dir", config.to_str().unwrap(), "serve"])
        .args(["--listen", &format!("{SERVE_IP}:8080")])
        .args(["--tls-listen", &format!("{SERVE_IP}:8443")])
        .arg("--assets")
        .arg(dir.join("assets"))
        .arg("--run-dir")
        .arg(dir.join("serve-run"))
        .args(["--pxe-interface", "br0"]);
    let mut serve = Daemon::spawn("serve", command, &dir.join("serve.log"));
    until(Duration::from_secs(30), || {
        serve
            .log_text()
            .contains("power on your nodes")
            .then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "serve did not start ({:?}):\n{}",
            serve.exited(),
            serve.log_text()
        )
    });
    serve
}

/// `key`'s value in one of serve's log lines (`key=value` or
/// `key="value"`), colours removed.
fn field<'l>(line: &'l str, key: &str) -> Option<&'l str> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    let rest = &line[start..];
    match rest.strip_prefix('"') {
        Some(quoted) => quoted.split('"').next(),
        None => rest.split_whitespace().next(),
    }
}

#[test]
fn a_vm_network_boots_through_serve_to_its_own_config_and_a_stranger_gets_none() {
    let tools = tools();
    let kernel = Kernel::cached();
    let dir = tempfile::tempdir().unwrap();
    let config = support::example_config_dir(dir.path(), SECRET);
    let expected = sha256_hex(&support::rendered_ignition(&config, NODE));

    let assets = dir.path().join("assets");
    std::fs::create_dir_all(&assets).unwrap();
    std::fs::copy(&kernel.vmlinuz, assets.join(KERNEL_ASSET)).unwrap();
    let built = Instant::now();
    std::fs::write(assets.join(INITRD_ASSET), initramfs(&tools, &kernel)).unwrap();
    println!(
        "initramfs: {} KiB in {:.1?}; kernel {}",
        std::fs::metadata(assets.join(INITRD_ASSET)).unwrap().len() / 1024,
        built.elapsed(),
        kernel.release
    );
    let (accel, why) = choose_accel(&tools, &kernel, &assets.join(INITRD_ASSET), dir.path());
    println!("accelerator: {accel:?} ({why})");

    let segment = Segment::new(&tools, dir.path());
    let mut serve = start_serve(&segment, dir.path(), &config);

    // TFTP from the segment: what a firmware PXE client would chain to.
    for image in ["undionly.kpxe", "ipxe.efi"] {
        let local = dir.path().join(image);
        let out = segment
            .site
            .command(&tools.busybox)
            .args(["tftp", "-g", "-r", image, "-l"])
            .arg(&local)
            .arg(SERVE_IP)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tftp {image} from the site: {}",
            text(&out)
        );
        assert!(
            std::fs::read(&local).unwrap()
                == std::fs::read(Path::new("/usr/lib/ipxe").join(image)).unwrap(),
            "{image} over TFTP differs from Debian's"
        );
    }

    let node_vm = Vm::start(&tools, &segment, dir.path(), "node", NODE_MAC, accel);
    let stranger_vm = Vm::start(
        &tools,
        &segment,
        dir.path(),
        "stranger",
        STRANGER_MAC,
        accel,
    );
    let boot_deadline = match accel {
        Accel::Kvm => Duration::from_secs(120),
        Accel::Tcg => Duration::from_secs(300),
    };
    let mut node_vm = node_vm;
    let mut stranger_vm = stranger_vm;
    // Until the node printed its verdict (or QEMU ended) and the stranger's
    // QEMU ended.
    let deadline = Instant::now() + boot_deadline;
    loop {
        node_vm.poll();
        stranger_vm.poll();
        let node_done = node_vm.console.find(CONFIG_MARKER).is_some()
            || node_vm.console.find(NO_CONFIG_MARKER).is_some()
            || node_vm.ended.is_some();
        if (node_done && stranger_vm.ended.is_some()) || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    // The node: its config, the bytes `render ignition` gives.
    let marker = node_vm
        .console
        .find(CONFIG_MARKER)
        .or_else(|| node_vm.console.find(NO_CONFIG_MARKER));
    let Some((boot_time, marker)) = marker else {
        panic!(
            "no config marker on the node's serial console within {boot_deadline:?} \
             (QEMU ended: {:?})",
            node_vm.ended
        );
    };
    let Some(sha) = marker
        .split(CONFIG_MARKER)
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
    else {
        panic!("the node got no config: {marker}");
    };
    assert_eq!(
        sha, expected,
        "the node's VM got another config than `render ignition` for {NODE}"
    );
    let uptime = |prefix: &str| -> Option<f64> {
        node_vm
            .console
            .find(prefix)
            .and_then(|(_, l)| l.rsplit("uptime=").next())
            .and_then(|u| u.parse().ok())
    };
    let shown = |u: Option<f64>| u.map_or("?".to_string(), |u| format!("{u:.1} s"));
    let in_linux = uptime(CONFIG_MARKER);
    println!(
        "node VM ({accel:?}): QEMU start to its config's SHA-256 on the console in {:.1?}: \
         firmware, iPXE (DHCP, proxy DHCP, scripts) and the kernel and initramfs downloads {}, \
         then Linux {} (at uptime: init {}, DHCP lease {}, pointer {}, config {})\n{}",
        boot_time,
        shown(in_linux.map(|u| boot_time.as_secs_f64() - u)),
        shown(in_linux),
        shown(uptime("VM-INIT")),
        shown(uptime("VM-LEASE")),
        shown(uptime("VM-POINTER")),
        shown(in_linux),
        node_vm.timeline(&[
            "iPXE initialising",
            "Configuring (net0",
            "PXEBS",
            "boot.ipxe :",
            "... ok",
            "Linux version",
            "VM-",
            "IGNITION-",
        ]),
    );
    let serial = node_vm.console.text();
    assert!(
        serial.contains(&format!("VM-LEASE {NODE_IP}/24")),
        "the node did not get its address from the site's DHCP:\n{serial}"
    );
    let log = clean(&serve.log_text());
    let requests: Vec<&str> = log.lines().filter(|l| field(l, "path").is_some()).collect();
    let from =
        |ip: &str, l: &&str| field(l, "source").and_then(|s| s.split(':').next()) == Some(ip);
    for (path, scheme) in [
        ("/boot.ipxe", "http"),
        ("/ipxe", "http"),
        ("/assets/flatcar_production_pxe.vmlinuz", "http"),
        ("/assets/flatcar_production_pxe_image.cpio.gz", "http"),
        ("/ignition", "http"),
        ("/ignition", "https"),
    ] {
        // What is asked by MAC names the MAC and the node.
        let by_mac = matches!(path, "/ipxe" | "/ignition");
        assert!(
            requests.iter().any(|l| from(NODE_IP, l)
                && field(l, "path") == Some(path)
                && field(l, "scheme") == Some(scheme)
                && field(l, "status") == Some("200")
                && (!by_mac
                    || (field(l, "mac") == Some(NODE_MAC) && field(l, "node") == Some(NODE)))),
            "serve's log has no {scheme} {path} from {NODE_IP} (naming {NODE} and {NODE_MAC}):\n{log}"
        );
    }

    // The stranger: iPXE gets a 404 for its MAC, boots nothing, and the
    // BIOS's reboot ends QEMU.
    let serial = stranger_vm.console.text();
    let Some((ended, _)) = stranger_vm.ended else {
        panic!("the stranger's VM still runs after {boot_deadline:?}:\n{serial}");
    };
    println!(
        "stranger VM ({accel:?}): QEMU start to giving up in {ended:.1?}\n{}",
        stranger_vm.timeline(&[
            "Configuring (net0",
            "PXEBS",
            "boot.ipxe :",
            "ipxe?mac",
            "No bootable device"
        ]),
    );
    assert!(
        serial.contains("No bootable device")
            && !serial.contains("Linux version")
            && !serial.contains("IGNITION-"),
        "the stranger's VM booted something:\n{serial}"
    );
    let log = clean(&serve.log_text());
    let refused = log
        .lines()
        .find(|l| field(l, "path") == Some("/ipxe") && field(l, "mac") == Some(STRANGER_MAC))
        .unwrap_or_else(|| {
            panic!("serve's log has no /ipxe for the stranger ({STRANGER_MAC}):\n{log}")
        });
    assert_eq!(field(refused, "status"), Some("404"), "{refused}");
    assert!(
        log.contains("no node in cluster.yaml has this MAC"),
        "serve did not say why the stranger gets nothing:\n{log}"
    );
    let stranger_ip = field(refused, "source")
        .unwrap()
        .split(':')
        .next()
        .unwrap()
        .to_string();
    let further: Vec<&str> = log
        .lines()
        .filter(|l| {
            from(&stranger_ip, l) && !matches!(field(l, "path"), Some("/boot.ipxe" | "/ipxe"))
        })
        .collect();
    assert!(
        further.is_empty(),
        "the stranger ({stranger_ip}) got further than its iPXE script:\n{}",
        further.join("\n")
    );
    drop(node_vm);
    drop(stranger_vm);
    let status = serve.stop(Signal::SIGTERM, Duration::from_secs(15));
    assert!(
        status.is_some_and(|s| s.success()),
        "serve did not exit cleanly on SIGTERM ({status:?}):\n{}",
        serve.log_text()
    );
    let left = segment.lan.pids();
    assert!(
        left.is_empty(),
        "processes left in the lan namespace after serve exited (its dnsmasq?): {left:?}"
    );
}
