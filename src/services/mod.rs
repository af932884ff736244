//! Running the daemons the agent renders units for (etcd, kubelet, ceph-mon…)
//! behind one small interface, [`ServiceManager`], with two backends:
//!
//! * [`SystemdManager`]: systemd over D-Bus (never `systemctl`);
//! * [`ProcessManager`]: runs the same unit file's `ExecStart` as a detached
//!   process with a pid file, for tests, the lab and machines without systemd.
//!
//! Both read the unit files in `<root>/etc/systemd/system` written by
//! [`install_unit`], so what the lab runs is what production runs.

mod process;
mod systemd;
pub mod unit;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::fsutil::WriteError;
use crate::paths::HostPaths;
use crate::wait::WaitTimeout;

pub use process::ProcessManager;
pub use systemd::SystemdManager;
pub use unit::{
    EnvironmentFile, InstallSection, RestartPolicy, ServiceSection, ServiceType, Unit, agent_units,
    enable_links, install_unit, parse_env_file, parse_unit, unit_enabled, unit_installed,
    unit_path,
};

/// How long `start`/`restart` wait for a unit to become active when the unit
/// sets no `TimeoutStartSec=`.
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(90);
/// How long `stop` waits; etcd that lost quorum takes 5–10 s to exit.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActiveState {
    Active,
    Activating,
    Inactive,
    Failed,
    Deactivating,
    /// Anything else systemd reports (`reloading`, `maintenance`, …).
    Unknown,
}

impl ActiveState {
    pub fn from_systemd(s: &str) -> ActiveState {
        match s {
            "active" => ActiveState::Active,
            "activating" => ActiveState::Activating,
            "inactive" => ActiveState::Inactive,
            "failed" => ActiveState::Failed,
            "deactivating" => ActiveState::Deactivating,
            _ => ActiveState::Unknown,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitState {
    pub active_state: ActiveState,
    /// Backend-specific detail: systemd's SubState (`running`, `dead`, …).
    pub sub_state: String,
    pub main_pid: Option<u32>,
}

#[async_trait]
pub trait ServiceManager: Send + Sync {
    /// Makes the manager pick up unit files changed on disk.
    async fn daemon_reload(&self) -> Result<(), ServicesError>;
    /// Starts `unit` and waits until it is active; fails with the job result
    /// or the log tail if it fails or does not become active in time.
    /// Starting an active unit is a no-op.
    async fn start(&self, unit: &str) -> Result<(), ServicesError>;
    /// Stops `unit` and waits until it is gone. Stopping a stopped unit is a
    /// no-op.
    async fn stop(&self, unit: &str) -> Result<(), ServicesError>;
    /// Stops (if running) and starts `unit`, e.g. after its file changed.
    async fn restart(&self, unit: &str) -> Result<(), ServicesError>;
    async fn state(&self, unit: &str) -> Result<UnitState, ServicesError>;
    /// Makes `unit` start at boot (its `WantedBy=` targets).
    async fn enable(&self, unit: &str) -> Result<(), ServicesError>;
}

#[derive(Debug, thiserror::Error)]
pub enum ServicesError {
    #[error("unit {unit} is invalid: {reason}")]
    InvalidUnit { unit: String, reason: String },

    #[error("{}:{line}: {message}", path.display())]
    Parse {
        path: PathBuf,
        line: usize,
        message: String,
    },

    #[error("unit {unit} not found at {}; install it with install_unit before starting it", path.display())]
    UnitNotFound { unit: String, path: PathBuf },

    #[error("cannot {what} ({}): {source}", path.display())]
    Io {
        what: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(transparent)]
    Write(#[from] WriteError),

    #[error("cannot run {program} for {unit}: {source}; check that it is installed and executable")]
    Spawn {
        unit: String,
        program: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{unit} exited right after starting ({status}); log {}:\n{log_tail}", log.display())]
    ExitedEarly {
        unit: String,
        status: String,
        log: PathBuf,
        log_tail: String,
    },

    #[error(
        "{action} {unit} failed: job result `{result}`, state {state:?}/{sub_state}; see `journalctl -u {unit}`"
    )]
    JobFailed {
        unit: String,
        action: &'static str,
        result: String,
        state: ActiveState,
        sub_state: String,
    },

    #[error("{action} {unit}: {source}")]
    Timeout {
        unit: String,
        action: &'static str,
        #[source]
        source: WaitTimeout,
    },

    #[error("cannot signal {unit} (pid {pid}): {source}")]
    Signal {
        unit: String,
        pid: u32,
        #[source]
        source: nix::Error,
    },

    #[error("D-Bus {call} for {unit} failed: {source}")]
    Bus {
        call: &'static str,
        unit: String,
        #[source]
        source: zbus::Error,
    },

    #[error(
        "cannot connect to the system bus at {address}: {source}; is dbus running (or set DBUS_SYSTEM_BUS_ADDRESS)?"
    )]
    Connect {
        address: String,
        #[source]
        source: zbus::Error,
    },

    #[error("no system bus socket at {}; use the process backend on machines without systemd", path.display())]
    NoSystemBus { path: PathBuf },

    #[error("{unit}: {what} is not supported by the {backend} backend")]
    Unsupported {
        unit: String,
        what: String,
        backend: &'static str,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Systemd,
    Process,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Systemd => "systemd",
            Backend::Process => "process",
        }
    }
}

pub async fn connect(
    backend: Backend,
    paths: &HostPaths,
) -> Result<Arc<dyn ServiceManager>, ServicesError> {
    Ok(match backend {
        Backend::Systemd => Arc::new(SystemdManager::connect(paths).await?),
        Backend::Process => Arc::new(ProcessManager::new(paths.clone())),
    })
}

const SYSTEM_BUS_SOCKET: &str = "/run/dbus/system_bus_socket";

/// `DBUS_SYSTEM_BUS_ADDRESS` if set, else the socket under `--root`.
pub fn system_bus_address(paths: &HostPaths) -> String {
    bus_address_from(std::env::var("DBUS_SYSTEM_BUS_ADDRESS").ok(), paths)
}

fn bus_address_from(env: Option<String>, paths: &HostPaths) -> String {
    env.filter(|a| !a.is_empty())
        .unwrap_or_else(|| format!("unix:path={}", paths.host(SYSTEM_BUS_SOCKET).display()))
}

/// A connection to the system bus, or `None` when this machine has none
/// (no socket), so callers can fall back instead of failing.
pub async fn system_bus(paths: &HostPaths) -> Result<Option<zbus::Connection>, ServicesError> {
    bus_at(system_bus_address(paths)).await
}

async fn bus_at(address: String) -> Result<Option<zbus::Connection>, ServicesError> {
    if let Some(socket) = address.strip_prefix("unix:path=")
        && !Path::new(socket.split(',').next().unwrap_or(socket)).exists()
    {
        return Ok(None);
    }
    let connect = |source| ServicesError::Connect {
        address: address.clone(),
        source,
    };
    let conn = zbus::connection::Builder::address(address.as_str())
        .build()
        .await
        .map_err(connect)?;
    Ok(Some(conn))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_address_prefers_env_then_root() {
        let paths = HostPaths::new(Path::new("/tmp/n1"), None, None);
        assert_eq!(
            bus_address_from(None, &paths),
            "unix:path=/tmp/n1/run/dbus/system_bus_socket"
        );
        assert_eq!(
            bus_address_from(Some("unix:path=/x".into()), &paths),
            "unix:path=/x"
        );
    }

    /// The socket under `--root`, whatever `DBUS_SYSTEM_BUS_ADDRESS` says.
    #[tokio::test]
    async fn missing_bus_socket_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let paths = HostPaths::new(dir.path(), None, None);
        let address = bus_address_from(None, &paths);
        assert!(bus_at(address).await.unwrap().is_none());
    }
}
