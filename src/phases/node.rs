//! Phase `node` (the seed's phase 1, the Flatcar way): a systemd-networkd
//! file for the static address, the hostname through hostname1, and
//! networkd told to pick the file up.

use std::net::IpAddr;
use std::time::Duration;

use async_trait::async_trait;

use crate::config::{ClusterConfig, NodeSpec};
use crate::engine::{Context, Outcome, Phase, Step, StepError};
use crate::fsutil::{self, PUBLIC_MODE};
use crate::services;
use crate::wait::{self, Backoff, Poll};

pub const PHASE: &str = "node";
pub const NETWORK_FILE: &str = "/etc/systemd/network/10-cluster-agent.network";
pub const HOSTNAME_FILE: &str = "/etc/hostname";
const ADDRESS_TIMEOUT: Duration = Duration::from_secs(60);

pub fn phase() -> Phase {
    Phase {
        name: PHASE,
        requires: vec![],
        owns: |paths, _| vec![paths.host(NETWORK_FILE)],
        steps: vec![
            Box::new(NetworkConfig),
            Box::new(Hostname),
            Box::new(NetworkApply),
        ],
    }
}

/// The `.network` file for this node, from cluster.yaml alone (Ignition
/// ships the same bytes, so the first run finds it in place).
pub fn render_network(config: &ClusterConfig, node: &NodeSpec) -> String {
    let net = &config.cluster.networking;
    let mut out = String::from(
        "# Written by cluster-agent from cluster.yaml; edit the configuration, not this file.\n[Match]\n",
    );
    if node.mac_addresses.is_empty() {
        // Without a MAC the node was identified by name; match the wired NICs.
        out.push_str("Type=ether\n");
    } else {
        let macs: Vec<String> = node.mac_addresses.iter().map(|m| m.to_string()).collect();
        out.push_str(&format!("MACAddress={}\n", macs.join(" ")));
    }
    // The node's address is what etcd and the monitors bind to: keep it
    // through a pulled cable or a rebooting switch, so a daemon neither
    // fails to bind at boot nor loses its address while running.
    out.push_str(&format!(
        "\n[Network]\nAddress={}/{}\nConfigureWithoutCarrier=yes\nIgnoreCarrierLoss=yes\n",
        node.ip, net.prefix_length
    ));
    if let Some(gw) = net.gateway {
        out.push_str(&format!("Gateway={gw}\n"));
    }
    for dns in &net.dns_servers {
        out.push_str(&format!("DNS={dns}\n"));
    }
    out
}

fn read_file(path: &std::path::Path) -> Result<Option<Vec<u8>>, StepError> {
    fsutil::read_optional(path).map_err(|source| StepError::Read {
        path: path.to_path_buf(),
        source,
    })
}

struct NetworkConfig;

#[async_trait]
impl Step for NetworkConfig {
    fn name(&self) -> &'static str {
        "network-config"
    }
    fn summary(&self) -> &'static str {
        "render the systemd-networkd file for the node's static address"
    }
    async fn check(&self, ctx: &Context) -> Result<bool, StepError> {
        let current = read_file(&ctx.paths.host(NETWORK_FILE))?;
        Ok(current.as_deref() == Some(render_network(&ctx.config, &ctx.node).as_bytes()))
    }
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
        fsutil::write_atomic(
            &ctx.paths.host(NETWORK_FILE),
            render_network(&ctx.config, &ctx.node).as_bytes(),
            PUBLIC_MODE,
        )?;
        Ok(Outcome::Done)
    }
}

#[zbus::proxy(
    interface = "org.freedesktop.hostname1",
    default_service = "org.freedesktop.hostname1",
    default_path = "/org/freedesktop/hostname1"
)]
trait Hostname1 {
    fn set_static_hostname(&self, hostname: &str, interactive: bool) -> zbus::Result<()>;
    #[zbus(property)]
    fn static_hostname(&self) -> zbus::Result<String>;
}

#[zbus::proxy(
    interface = "org.freedesktop.network1.Manager",
    default_service = "org.freedesktop.network1",
    default_path = "/org/freedesktop/network1"
)]
trait Network1Manager {
    fn reload(&self) -> zbus::Result<()>;
}

fn dbus_err(call: &'static str) -> impl FnOnce(zbus::Error) -> StepError {
    move |source| StepError::Dbus { call, source }
}

struct Hostname;

#[async_trait]
impl Step for Hostname {
    fn name(&self) -> &'static str {
        "hostname"
    }
    fn summary(&self) -> &'static str {
        "set the static hostname (hostname1 over D-Bus; /etc/hostname without a bus)"
    }
    async fn check(&self, ctx: &Context) -> Result<bool, StepError> {
        let want = &ctx.node.hostname;
        match services::system_bus(&ctx.paths).await? {
            Some(bus) => {
                let proxy = Hostname1Proxy::new(&bus)
                    .await
                    .map_err(dbus_err("hostname1"))?;
                let current = proxy
                    .static_hostname()
                    .await
                    .map_err(dbus_err("hostname1.StaticHostname"))?;
                Ok(&current == want)
            }
            None => {
                let current = read_file(&ctx.paths.host(HOSTNAME_FILE))?;
                Ok(
                    current.map(|c| String::from_utf8_lossy(&c).trim().to_string())
                        == Some(want.clone()),
                )
            }
        }
    }
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
        let want = &ctx.node.hostname;
        match services::system_bus(&ctx.paths).await? {
            Some(bus) => {
                Hostname1Proxy::new(&bus)
                    .await
                    .map_err(dbus_err("hostname1"))?
                    .set_static_hostname(want, false)
                    .await
                    .map_err(dbus_err("hostname1.SetStaticHostname"))?;
                Ok(Outcome::Done)
            }
            None => {
                fsutil::write_atomic(
                    &ctx.paths.host(HOSTNAME_FILE),
                    format!("{want}\n").as_bytes(),
                    PUBLIC_MODE,
                )?;
                tracing::info!(hostname = %want, "no system bus; wrote /etc/hostname under the root instead of calling hostname1");
                Ok(Outcome::Done)
            }
        }
    }
}

/// True when the node's address is configured on some interface of the
/// network namespace the agent runs in.
fn address_present(ip: std::net::Ipv4Addr) -> bool {
    nix::ifaddrs::getifaddrs()
        .map(|addrs| {
            addrs.into_iter().any(|a| {
                a.address
                    .and_then(|s| s.as_sockaddr_in().map(|sin| sin.ip()))
                    .map(|found| IpAddr::V4(found) == IpAddr::V4(ip))
                    .unwrap_or(false)
            })
        })
        .unwrap_or(false)
}

struct NetworkApply;

#[async_trait]
impl Step for NetworkApply {
    fn name(&self) -> &'static str {
        "network-apply"
    }
    fn summary(&self) -> &'static str {
        "ask systemd-networkd to reload and wait for the node's address"
    }
    async fn check(&self, ctx: &Context) -> Result<bool, StepError> {
        Ok(address_present(ctx.node.ip))
    }
    async fn apply(&self, ctx: &Context) -> Result<Outcome, StepError> {
        let Some(bus) = services::system_bus(&ctx.paths).await? else {
            return Ok(Outcome::Skipped(format!(
                "no system bus at {}; {NETWORK_FILE} takes effect when systemd-networkd starts",
                services::system_bus_address(&ctx.paths)
            )));
        };
        Network1ManagerProxy::new(&bus)
            .await
            .map_err(dbus_err("network1"))?
            .reload()
            .await
            .map_err(dbus_err("network1.Manager.Reload"))?;
        let ip = ctx.node.ip;
        ctx.progress
            .waiting(&format!("address {ip} on an interface"));
        wait::poll_until(
            &format!("address {ip} to be configured by systemd-networkd"),
            ADDRESS_TIMEOUT,
            Backoff::local(),
            || async move {
                if address_present(ip) {
                    Poll::Ready(())
                } else {
                    Poll::Pending(format!("{ip} not on any interface"))
                }
            },
        )
        .await?;
        Ok(Outcome::Done)
    }
}
