//! The system bus, found under `--root` so a temp-root run never talks to
//! the host's systemd by accident.

use crate::paths::HostPaths;

pub const SYSTEM_BUS_ENV: &str = "DBUS_SYSTEM_BUS_ADDRESS";

/// `DBUS_SYSTEM_BUS_ADDRESS` if set, else the socket under the root.
pub fn system_bus_address(paths: &HostPaths) -> String {
    std::env::var(SYSTEM_BUS_ENV).unwrap_or_else(|_| {
        format!(
            "unix:path={}",
            paths.host("/run/dbus/system_bus_socket").display()
        )
    })
}

/// `Ok(None)` when there is no bus to talk to (temp roots, the lab, machines
/// without systemd); callers then fall back to files and say so.
pub async fn system_bus(paths: &HostPaths) -> Result<Option<zbus::Connection>, zbus::Error> {
    let address = system_bus_address(paths);
    if let Some(socket) = address.strip_prefix("unix:path=")
        && !std::path::Path::new(socket).exists()
    {
        return Ok(None);
    }
    let connection = zbus::connection::Builder::address(address.as_str())
        .build()
        .await?;
    Ok(Some(connection))
}
