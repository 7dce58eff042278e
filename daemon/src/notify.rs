//! systemd `Type=notify`: tell the service manager when the daemon is ready and when it
//! begins to stop. Outside systemd (`NOTIFY_SOCKET` unset) these do nothing.

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// READY=1 with a one-line status for `systemctl status`.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// STOPPING=1.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// A new status line, e.g. why the daemon is not ready.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}
