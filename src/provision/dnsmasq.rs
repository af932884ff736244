//! PXE for `serve --pxe-interface`: Debian's dnsmasq as a proxy DHCP and
//! TFTP server. Proxy mode answers only the PXE part of a boot's DHCP
//! exchange, so the site's DHCP server stays in charge of addresses: a
//! firmware PXE client is handed iPXE over TFTP, and iPXE (a NIC ROM that
//! already is iPXE, too) is pointed at `serve`'s `/boot.ipxe`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use ipnet::Ipv4Net;
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};

use crate::paths::HostPaths;
use crate::wait::Poll;

pub const DNSMASQ: &str = "dnsmasq";
/// Debian's ipxe package: iPXE for BIOS PXE (`undionly.kpxe`, which keeps
/// using the NIC's UNDI driver) and for UEFI (`ipxe.efi`).
pub const IPXE_DIR: &str = "/usr/lib/ipxe";
pub const IPXE_IMAGES: [&str; 2] = ["undionly.kpxe", "ipxe.efi"];
const CONFIG_FILE: &str = "dnsmasq.conf";
/// DHCP and TFTP, whose sockets show dnsmasq is serving.
const DHCP_PORT: u16 = 67;
const TFTP_PORT: u16 = 69;
const START_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum PxeError {
    #[error(
        "dnsmasq is not installed under {dirs}; install Debian's dnsmasq-base (or run serve without --pxe-interface and chain to /boot.ipxe from the site's own DHCP/TFTP)"
    )]
    NoDnsmasq { dirs: String },
    #[error("{} is missing; install Debian's ipxe package", path.display())]
    NoIpxe { path: PathBuf },
    #[error(
        "interface {interface} has no IPv4 address; give --pxe-interface the interface on the nodes' segment"
    )]
    NoNetwork { interface: String },
    #[error(
        "--listen {listen} is not on --pxe-interface {interface} ({networks}); the machines that PXE-boot there could not reach it"
    )]
    ListenElsewhere {
        listen: SocketAddr,
        interface: String,
        networks: String,
    },
    #[error(transparent)]
    HostNet(#[from] crate::hostnet::HostNetError),
    #[error("writing {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: crate::fsutil::WriteError,
    },
    #[error("starting {}: {source}", binary.display())]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "dnsmasq exited with {status} before serving; its log is above (is another DHCP proxy or TFTP server bound on this machine?)"
    )]
    Exited { status: ExitStatus },
    #[error("waiting for dnsmasq: {0}")]
    Wait(#[source] std::io::Error),
    #[error(transparent)]
    Slow(#[from] crate::wait::WaitTimeout),
}

/// What the proxy needs to know, all decided before rendering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PxeSettings {
    pub interface: String,
    pub network: Ipv4Net,
    pub boot_url: String,
    pub tftp_root: PathBuf,
}

impl PxeSettings {
    /// Checks the image and the interface: dnsmasq and iPXE installed,
    /// `listen` on one of `interface`'s networks.
    pub fn for_interface(
        paths: &HostPaths,
        interface: &str,
        listen: SocketAddr,
    ) -> Result<PxeSettings, PxeError> {
        let tftp_root = paths.host(IPXE_DIR);
        for image in IPXE_IMAGES {
            let path = tftp_root.join(image);
            if !path.is_file() {
                return Err(PxeError::NoIpxe { path });
            }
        }
        let networks = crate::hostnet::ipv4_networks(interface)?;
        let std::net::IpAddr::V4(ip) = listen.ip() else {
            return Err(PxeError::NoNetwork {
                interface: interface.to_string(),
            });
        };
        let network = match networks.iter().find(|n| n.contains(&ip)) {
            Some(n) => n.trunc(),
            None if networks.is_empty() => {
                return Err(PxeError::NoNetwork {
                    interface: interface.to_string(),
                });
            }
            None => {
                return Err(PxeError::ListenElsewhere {
                    listen,
                    interface: interface.to_string(),
                    networks: networks
                        .iter()
                        .map(|n| n.to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
        };
        Ok(PxeSettings {
            interface: interface.to_string(),
            network,
            boot_url: format!("http://{listen}/boot.ipxe"),
            tftp_root,
        })
    }
}

/// dnsmasq's configuration: no DNS, proxy DHCP on the interface's network,
/// TFTP of the iPXE images, and a log line for every DHCP exchange.
pub fn render(settings: &PxeSettings) -> String {
    let PxeSettings {
        interface,
        network,
        boot_url,
        tftp_root,
    } = settings;
    format!(
        "# Rendered by cluster-agent serve; removed when it stops.\n\
         port=0\n\
         # Dropping to another user or group would clear dnsmasq's parent-death\n\
         # signal, and a SIGKILLed serve would leave a DHCP proxy on the segment.\n\
         user=root\n\
         group=root\n\
         interface={interface}\n\
         bind-interfaces\n\
         dhcp-range={network_address},proxy,{netmask}\n\
         leasefile-ro\n\
         log-dhcp\n\
         # iPXE says so in its DHCP user class; firmware PXE does not.\n\
         dhcp-userclass=set:ipxe,iPXE\n\
         pxe-service=tag:!ipxe,x86PC,\"Chain to iPXE\",undionly.kpxe\n\
         pxe-service=tag:!ipxe,X86-64_EFI,\"Chain to iPXE\",ipxe.efi\n\
         pxe-service=tag:!ipxe,BC_EFI,\"Chain to iPXE\",ipxe.efi\n\
         pxe-service=tag:ipxe,x86PC,\"cluster-agent serve\",{boot_url}\n\
         pxe-service=tag:ipxe,X86-64_EFI,\"cluster-agent serve\",{boot_url}\n\
         pxe-service=tag:ipxe,BC_EFI,\"cluster-agent serve\",{boot_url}\n\
         enable-tftp\n\
         tftp-root={tftp_root}\n",
        network_address = network.network(),
        netmask = network.netmask(),
        tftp_root = tftp_root.display(),
    )
}

/// A running dnsmasq, killed when dropped so that no exit path of `serve`
/// leaves a DHCP proxy behind.
pub struct Dnsmasq {
    child: Child,
    config: PathBuf,
}

impl Dnsmasq {
    /// Writes the config to `run_dir` and starts dnsmasq in the foreground,
    /// its log lines forwarded to the agent's; returns once it has bound
    /// DHCP and TFTP.
    pub async fn start(
        paths: &HostPaths,
        run_dir: &Path,
        settings: &PxeSettings,
    ) -> Result<Dnsmasq, PxeError> {
        let binary = paths
            .find_binary(DNSMASQ)
            .ok_or_else(|| PxeError::NoDnsmasq {
                dirs: paths.binary_dirs(),
            })?;
        let config = run_dir.join(CONFIG_FILE);
        crate::fsutil::write_atomic(
            &config,
            render(settings).as_bytes(),
            crate::fsutil::PUBLIC_MODE,
        )
        .map_err(|source| PxeError::Write {
            path: config.clone(),
            source,
        })?;
        let mut command = Command::new(&binary);
        // SAFETY: only async-signal-safe calls (prctl, getppid) between fork
        // and exec.
        unsafe {
            command.pre_exec(|| {
                // A SIGKILLed serve must not leave a DHCP proxy answering on
                // the segment. The signal follows the forking thread, which
                // is the main one (`serve` runs on the runtime's block_on),
                // and survives exec but not a change of user: hence
                // `user=root` and `group=root` in the config.
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)?;
                if nix::unistd::getppid() == nix::unistd::Pid::from_raw(1) {
                    return Err(std::io::Error::other("serve exited while dnsmasq started"));
                }
                Ok(())
            });
        }
        let mut child = command
            .arg("--keep-in-foreground")
            .arg("--log-facility=-")
            .arg(format!("--conf-file={}", config.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| PxeError::Spawn {
                binary: binary.clone(),
                source,
            })?;
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    tracing::info!(target: "dnsmasq", "dnsmasq: {line}");
                }
            });
        }
        // From here on, dropping `dnsmasq` kills it; its config goes with
        // it on every early return below.
        let mut dnsmasq = Dnsmasq { child, config };
        let pid = dnsmasq.child.id().unwrap_or_default();
        let child = &mut dnsmasq.child;
        let started = crate::wait::poll_until(
            "dnsmasq to bind DHCP and TFTP",
            START_DEADLINE,
            crate::wait::Backoff::local(),
            || {
                let exited = child.try_wait();
                async move {
                    match exited {
                        Ok(Some(status)) => Poll::Ready(Err(PxeError::Exited { status })),
                        Err(source) => Poll::Ready(Err(PxeError::Wait(source))),
                        Ok(None)
                            if udp_bound_by(pid, DHCP_PORT) && udp_bound_by(pid, TFTP_PORT) =>
                        {
                            Poll::Ready(Ok(()))
                        }
                        Ok(None) => Poll::Pending("not bound yet".into()),
                    }
                }
            },
        )
        .await
        .map_err(PxeError::from)
        .and_then(|started| started);
        match started {
            Ok(()) => Ok(dnsmasq),
            Err(e) => {
                dnsmasq.stop().await;
                Err(e)
            }
        }
    }

    /// Resolves when dnsmasq exits on its own.
    pub async fn exited(&mut self) -> std::io::Result<ExitStatus> {
        self.child.wait().await
    }

    /// Stops dnsmasq and removes its config.
    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        let _ = crate::fsutil::remove_durable(&self.config);
    }
}

/// Whether process `pid` holds a socket bound to UDP `port` (another
/// DHCP server on the machine, libvirt's say, must not pass for ours).
fn udp_bound_by(pid: u32, port: u16) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    let inodes: std::collections::HashSet<String> = fds
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy();
            Some(
                target
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_string(),
            )
        })
        .collect();
    let Ok(table) = std::fs::read_to_string("/proc/net/udp") else {
        return false;
    };
    let wanted = format!(":{port:04X}");
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.get(1).is_some_and(|local| local.ends_with(&wanted))
            && fields.get(9).is_some_and(|inode| inodes.contains(*inode))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_proxy_chains_firmware_to_ipxe_and_ipxe_to_serve() {
        let settings = PxeSettings {
            interface: "br0".into(),
            network: "10.9.0.0/24".parse().unwrap(),
            boot_url: "http://10.9.0.1:8080/boot.ipxe".into(),
            tftp_root: "/usr/lib/ipxe".into(),
        };
        let conf = render(&settings);
        for line in [
            "port=0",
            "interface=br0",
            "dhcp-range=10.9.0.0,proxy,255.255.255.0",
            "pxe-service=tag:!ipxe,x86PC,\"Chain to iPXE\",undionly.kpxe",
            "pxe-service=tag:ipxe,X86-64_EFI,\"cluster-agent serve\",http://10.9.0.1:8080/boot.ipxe",
            "tftp-root=/usr/lib/ipxe",
        ] {
            assert!(
                conf.lines().any(|l| l == line),
                "{line} missing from\n{conf}"
            );
        }
    }
}
