//! sd_notify: `systemctl status cluster-bootstrap` shows the current step, and
//! long waits stretch the unit's start timeout instead of tripping it.
//! Outside systemd (no NOTIFY_SOCKET) every call is a no-op.

use std::time::Duration;

use sd_notify::NotifyState;

/// How much each wait report extends the start timeout by.
pub const WAIT_EXTENSION: Duration = Duration::from_secs(300);

pub fn status(text: &str) {
    send(&[NotifyState::Status(text)]);
}

pub fn extend_timeout(by: Duration) {
    send(&[NotifyState::ExtendTimeoutUsec(
        u32::try_from(by.as_micros()).unwrap_or(u32::MAX),
    )]);
}

pub fn ready(text: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(text)]);
}

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}
