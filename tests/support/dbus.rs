//! A real dbus-daemon with a system-type bus on a private socket.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

pub struct PrivateBus {
    child: Child,
    pub address: String,
}

impl PrivateBus {
    /// Listens on `socket`. Fails the test when dbus-daemon is not installed.
    pub fn start(config_dir: &Path, socket: &Path) -> PrivateBus {
        let daemon = super::require_tool("dbus-daemon", "dbus");
        std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
        let config = config_dir.join("system-bus.conf");
        // A system-type bus whose policy lets the test own systemd's name.
        std::fs::write(
            &config,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"#,
                socket.display()
            ),
        )
        .unwrap();
        let mut child = Command::new(daemon)
            .arg(format!("--config-file={}", config.display()))
            .args(["--nofork", "--nopidfile", "--print-address=1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run dbus-daemon: {e}"));
        // The address is printed once the socket accepts connections.
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(
            !line.trim().is_empty(),
            "dbus-daemon exited without an address"
        );
        PrivateBus {
            child,
            address: line.trim().to_string(),
        }
    }
}

impl Drop for PrivateBus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
