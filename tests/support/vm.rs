//! Virtual machines for network-boot tests: QEMU (KVM when it runs a stock
//! kernel, else TCG) on a bridge inside network namespaces the test makes,
//! booting Debian's kernel (`tools/vm-boot/fetch-kernel` caches it; Flatcar's
//! images cannot be downloaded here) with an initramfs the test writes
//! ([`Cpio`]). Every namespace and process is removed on drop, a failed test
//! included.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::{ip, require_tool, text};

/// Where `.ci/setup` caches what the tests need
/// (`$CLUSTER_AGENT_BIN_CACHE`, else `/var/cache/cluster-agent`).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("CLUSTER_AGENT_BIN_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/cluster-agent"))
}

/// Debian's kernel and its (uncompressed) modules, as
/// `tools/vm-boot/fetch-kernel` leaves them in `<cache>/vm-kernel/current`.
pub struct Kernel {
    pub vmlinuz: PathBuf,
    /// `lib/modules/<release>`, with a `modules.dep`.
    pub modules: PathBuf,
    pub release: String,
}

impl Kernel {
    /// The cached kernel; panics saying how to fetch it when it is missing.
    #[track_caller]
    pub fn cached() -> Kernel {
        let root = cache_dir().join("vm-kernel/current");
        let missing = |what: &str| -> ! {
            panic!(
                "{what}: run `.ci/setup` as root (or `tools/vm-boot/fetch-kernel`), which puts \
                 Debian's kernel (the package linux-image-amd64 depends on) into {}",
                root.display()
            )
        };
        if !root.join(".complete").is_file() {
            missing(&format!("no VM kernel in {}", root.display()));
        }
        let Some(release) = std::fs::read_dir(root.join("lib/modules"))
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
        else {
            missing(&format!("no lib/modules/<release> in {}", root.display()))
        };
        let vmlinuz = root.join("boot").join(format!("vmlinuz-{release}"));
        let modules = root.join("lib/modules").join(&release);
        if !vmlinuz.is_file() || !modules.join("modules.dep").is_file() {
            missing(&format!(
                "{} or {}/modules.dep is missing",
                vmlinuz.display(),
                modules.display()
            ));
        }
        Kernel {
            vmlinuz,
            modules,
            release,
        }
    }

    /// The module files `roots` (names like `virtio_net`) need, in an order
    /// `insmod` can load them: every module after what it depends on.
    pub fn load_order(&self, roots: &[&str]) -> Vec<PathBuf> {
        let dep = std::fs::read_to_string(self.modules.join("modules.dep")).unwrap();
        let deps: std::collections::HashMap<&str, Vec<&str>> = dep
            .lines()
            .filter_map(|line| line.split_once(':'))
            .map(|(module, deps)| (module, deps.split_whitespace().collect()))
            .collect();
        let by_name = |name: &str| -> &str {
            let file = format!("{}.ko", name.replace('-', "_"));
            deps.keys()
                .copied()
                .find(|path| path.rsplit('/').next().unwrap().replace('-', "_") == file)
                .unwrap_or_else(|| {
                    panic!(
                        "no module {name} in {}/modules.dep (built into the kernel?)",
                        self.modules.display()
                    )
                })
        };
        fn visit<'a>(
            module: &'a str,
            deps: &std::collections::HashMap<&'a str, Vec<&'a str>>,
            seen: &mut BTreeSet<&'a str>,
            order: &mut Vec<&'a str>,
        ) {
            if !seen.insert(module) {
                return;
            }
            for dep in deps.get(module).into_iter().flatten() {
                visit(dep, deps, seen, order);
            }
            order.push(module);
        }
        let mut seen = BTreeSet::new();
        let mut order = vec![];
        for root in roots {
            visit(by_name(root), &deps, &mut seen, &mut order);
        }
        order.iter().map(|m| self.modules.join(m)).collect()
    }
}

/// A cpio archive in the kernel's `newc` format (what an initramfs is):
/// files, directories, symlinks and device nodes, owned by root, written
/// without needing root or a `cpio` tool. Parent directories are added as
/// needed.
#[derive(Default)]
pub struct Cpio {
    out: Vec<u8>,
    dirs: BTreeSet<String>,
    inode: u32,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

impl Cpio {
    pub fn new() -> Cpio {
        Cpio::default()
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.inode += 1;
        let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
        let fields = [
            self.inode,
            mode,
            0,
            0,
            nlink,
            0,
            u32::try_from(data.len()).expect("an initramfs file under 4 GiB"),
            0,
            0,
            rdev.0,
            rdev.1,
            u32::try_from(name.len() + 1).unwrap(),
            0,
        ];
        self.out.extend_from_slice(b"070701");
        for field in fields {
            write!(self.out, "{field:08x}").unwrap();
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while self.out.len() % 4 != 0 {
            self.out.push(0);
        }
    }

    fn parents(&mut self, path: &str) {
        let mut prefix = String::new();
        let parts: Vec<&str> = path.split('/').collect();
        for part in &parts[..parts.len() - 1] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            if self.dirs.insert(prefix.clone()) {
                let name = prefix.clone();
                self.entry(&name, S_IFDIR | 0o755, (0, 0), b"");
            }
        }
    }

    /// `path` relative to the archive's root, like `bin/busybox`.
    pub fn dir(&mut self, path: &str) {
        self.parents(path);
        if self.dirs.insert(path.to_string()) {
            self.entry(path, S_IFDIR | 0o755, (0, 0), b"");
        }
    }

    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        self.parents(path);
        self.entry(path, S_IFREG | mode, (0, 0), data);
    }

    /// A copy of the host file `from`, following symlinks.
    pub fn copy(&mut self, path: &str, from: &Path) {
        use std::os::unix::fs::PermissionsExt;
        let data = std::fs::read(from).unwrap_or_else(|e| panic!("{}: {e}", from.display()));
        let mode = std::fs::metadata(from).unwrap().permissions().mode() & 0o7777;
        self.file(path, mode, &data);
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        self.parents(path);
        self.entry(path, S_IFLNK | 0o777, (0, 0), target.as_bytes());
    }

    pub fn char_device(&mut self, path: &str, mode: u32, major: u32, minor: u32) {
        self.parents(path);
        self.entry(path, S_IFCHR | mode, (major, minor), b"");
    }

    /// A dynamically linked host program at the same path, with the
    /// libraries and loader `ldd` names.
    pub fn program_with_libraries(&mut self, program: &Path) {
        let out = Command::new(require_tool("ldd", "libc-bin"))
            .arg(program)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ldd {}: {}",
            program.display(),
            text(&out)
        );
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // "libssl.so.3 => /lib/x86_64-linux-gnu/libssl.so.3 (0x…)" or
            // "/lib64/ld-linux-x86-64.so.2 (0x…)"; the vDSO has no file.
            let path = match line.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next(),
                None => line.split_whitespace().next(),
            };
            if let Some(path) = path.filter(|p| p.starts_with('/')) {
                self.copy(path.trim_start_matches('/'), Path::new(path));
            }
        }
        self.copy(program.to_str().unwrap().trim_start_matches('/'), program);
    }

    /// The archive, gzip-compressed (`gzip -n`: no name or time stamp).
    pub fn gzipped(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), b"");
        let mut gzip = Command::new(require_tool("gzip", "gzip"))
            .args(["-n", "-6", "-c"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = gzip.stdin.take().unwrap();
        let data = std::mem::take(&mut self.out);
        let writer = std::thread::spawn(move || stdin.write_all(&data));
        let out = gzip.wait_with_output().unwrap();
        writer.join().unwrap().unwrap();
        assert!(out.status.success(), "gzip failed");
        out.stdout
    }
}

/// A network namespace of the test's own; on drop every process still in
/// it is SIGKILLed and the namespace (with its links) deleted.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> Netns {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        ip(&["netns", "add", name]);
        let ns = Netns {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n <name> args`.
    #[track_caller]
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// `program` to be run inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }

    /// The processes in the namespace.
    pub fn pids(&self) -> Vec<i32> {
        let out = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for pid in self.pids() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A program the test started, its stdout and stderr in `log`; on drop
/// it gets SIGTERM, then SIGKILL if it has not exited within 5 s.
pub struct Daemon {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Daemon {
    pub fn spawn(name: &str, mut command: Command, log: &Path) -> Daemon {
        let file = std::fs::File::create(log).unwrap();
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Daemon {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
        }
    }

    pub fn log_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    pub fn signal(&self, signal: Signal) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), signal);
    }

    /// Its exit status if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Sends `signal` and waits up to `timeout` for the exit; `None` if it
    /// is still running.
    pub fn stop(&mut self, signal: Signal, timeout: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.exited() {
            return Some(status);
        }
        self.signal(signal);
        super::nspawn::poll(timeout, || self.child.try_wait().unwrap())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.stop(Signal::SIGTERM, Duration::from_secs(5)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            let log = self.log_text();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!("--- {} ({}, last 60 lines):", self.name, self.log.display());
            for line in &lines[lines.len().saturating_sub(60)..] {
                eprintln!("{line}");
            }
        }
    }
}

/// How QEMU runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn arg(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// Whether `/dev/kvm` is there and answers `KVM_GET_API_VERSION` (12).
pub fn kvm_device() -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("/dev/kvm: {e}"))?;
    const KVM_GET_API_VERSION: nix::libc::c_ulong = 0xAE00;
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns a value.
    let version = unsafe { nix::libc::ioctl(kvm.as_raw_fd(), KVM_GET_API_VERSION as _, 0) };
    if version != 12 {
        return Err(format!("/dev/kvm answers API version {version}, not 12"));
    }
    // PVM ("pagetable-based virtual machine", KVM without hardware
    // virtualisation inside a VM) runs only kernels built as PVM guests: a
    // stock kernel crawls through its decompressor for minutes.
    if Path::new("/sys/module/kvm_pvm").exists() {
        return Err(
            "/dev/kvm is PVM (kvm_pvm is loaded), which runs only PVM-enabled guest \
                    kernels, not Debian's"
                .to_string(),
        );
    }
    Ok(())
}

/// QEMU's options for a VM with one virtio NIC on the tap `tap` (which
/// must exist in the namespace QEMU runs in), its serial console in
/// `serial`: no disk, 256 MiB, no reboot (a guest reboot ends QEMU).
pub fn qemu_args(accel: Accel, mac: &str, tap: &str, serial: &Path) -> Vec<String> {
    let mut args: Vec<String> = [
        "-accel",
        accel.arg(),
        "-m",
        "256",
        "-smp",
        "1",
        // No display; the firmware's and iPXE's text goes to the serial
        // port too.
        "-nographic",
        "-monitor",
        "none",
        "-no-reboot",
        // Network boot only; when it fails, the BIOS "reboots" at once,
        // which ends QEMU.
        "-boot",
        "order=n,reboot-timeout=0",
    ]
    .map(String::from)
    .to_vec();
    args.push("-serial".into());
    args.push(format!("file:{}", serial.display()));
    args.push("-netdev".into());
    args.push(format!("tap,id=n0,ifname={tap},script=no,downscript=no"));
    args.push("-device".into());
    args.push(format!("virtio-net-pci,netdev=n0,mac={mac}"));
    args
}

/// A VM's serial console, read as it grows: each complete line, colours
/// and spinners removed, with the time since `started` it was first seen.
pub struct Console {
    pub path: PathBuf,
    started: Instant,
    read: usize,
    pub lines: Vec<(Duration, String)>,
}

impl Console {
    pub fn new(path: PathBuf, started: Instant) -> Console {
        Console {
            path,
            started,
            read: 0,
            lines: vec![],
        }
    }

    /// Takes in what QEMU wrote since the last poll.
    pub fn poll(&mut self) {
        let now = self.started.elapsed();
        let bytes = std::fs::read(&self.path).unwrap_or_default();
        let new = bytes.get(self.read..).unwrap_or_default();
        if let Some(end) = new.iter().rposition(|b| *b == b'\n') {
            let chunk = clean(&String::from_utf8_lossy(&new[..=end]));
            self.lines
                .extend(chunk.lines().map(|l| (now, l.to_string())));
            self.read += end + 1;
        }
    }

    /// The first line containing `needle`, and when it came.
    pub fn find(&self, needle: &str) -> Option<(Duration, &str)> {
        self.lines
            .iter()
            .find(|(_, l)| l.contains(needle))
            .map(|(t, l)| (*t, l.as_str()))
    }

    /// Everything so far, cleaned, the incomplete last line too.
    pub fn text(&self) -> String {
        clean(&String::from_utf8_lossy(
            &std::fs::read(&self.path).unwrap_or_default(),
        ))
    }
}

/// Console or log text without terminal colours (CSI sequences),
/// backspace spinners, carriage returns and empty lines.
pub fn clean(raw: &str) -> String {
    let mut out = String::new();
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for c in chars.by_ref() {
                        if c.is_ascii_alphabetic() {
                            break;
                        }
                    }
                }
            }
            '\u{8}' | '\r' => {}
            c => out.push(c),
        }
    }
    out.split('\n')
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits until `probe` yields, polling every 50 ms; `None` after `timeout`.
pub fn until<T>(timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
