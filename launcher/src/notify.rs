//! systemd notifications (`Type=notify`): READY, RELOADING, STOPPING, STATUS, and the
//! file-descriptor store (FDSTORE=1 going out, LISTEN_FDS coming back), so a launcher that
//! crashes and is restarted by systemd gets its very listening sockets back. Silent without
//! NOTIFY_SOCKET / LISTEN_FDS.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};

use protocol::ListenerSpec;

use sd_notify::NotifyState;

fn enabled() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

fn send(states: &[NotifyState<'_>]) {
    if enabled() {
        if let Err(e) = sd_notify::notify(false, states) {
            tracing::warn!("sd_notify: {e}");
        }
    }
}

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

pub fn status(line: &str) {
    send(&[NotifyState::Status(line)]);
}

pub fn reloading() {
    send(&[NotifyState::Reloading]);
}

/// The name the control socket is stored under.
pub const CONTROL_FD_NAME: &str = "control";

/// The name a listener is stored under: kind and address, `:` (the separator of
/// LISTEN_FDNAMES) replaced by `_`.
pub fn fd_name(spec: &ListenerSpec) -> String {
    let kind = match spec.kind {
        protocol::ListenerKind::Https => "https",
        protocol::ListenerKind::Http => "http",
    };
    format!("{kind}_{}", spec.addr.replace(':', "_"))
}

/// Takes the descriptors systemd passed (LISTEN_FDS for our PID), by name, and unsets the
/// variables so no child sees them.
pub fn take_listen_fds() -> HashMap<String, OwnedFd> {
    let mut out = HashMap::new();
    let Ok(fds) = sd_notify::listen_fds_with_names(true) else {
        return out;
    };
    for (raw, name) in fds {
        match protocol::fdpass::adopt_inherited(raw, true) {
            Ok(fd) => {
                out.insert(name, fd);
            }
            Err(e) => tracing::warn!("LISTEN_FDS descriptor {raw} ({name}): {e}"),
        }
    }
    out
}

/// Puts the listeners and the control socket in systemd's file-descriptor store.
pub fn store_fds(listeners: &[(ListenerSpec, OwnedFd)], control: &OwnedFd) {
    if !enabled() {
        return;
    }
    let named = listeners
        .iter()
        .map(|(spec, fd)| (fd_name(spec), fd))
        .chain(std::iter::once((CONTROL_FD_NAME.to_string(), control)));
    for (name, fd) in named {
        let states = [NotifyState::FdStore, NotifyState::FdName(&name)];
        if let Err(e) = sd_notify::notify_with_fds(false, &states, &[fd.as_fd()]) {
            tracing::warn!("FDSTORE {name}: {e}");
        }
    }
}

/// Removes a descriptor from the store.
pub fn forget_fd(name: &str) {
    send(&[NotifyState::FdStoreRemove, NotifyState::FdName(name)]);
}
