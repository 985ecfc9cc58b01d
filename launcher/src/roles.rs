//! The process roles, declared in one place: who each worker runs as, which capabilities the
//! launcher keeps and why, and the one function each worker calls to drop what it must not have.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use caps::{CapSet, Capability, CapsHashSet};
use nix::sys::prctl;
use nix::sys::signal::Signal;
use nix::unistd::{getppid, Pid};

use crate::config::{Account, Config};

/// The unprivileged worker processes the launcher starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Terminates TLS and proxies; runs as `[overwatch].user`; peers: launcher, fleet.
    Proxy,
    /// Runs the app instances and the control socket; runs as `[app].user`; peers: launcher, proxy.
    Fleet,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Proxy => "proxy",
            Role::Fleet => "fleet",
        }
    }

    pub fn account(self, config: &Config) -> &Account {
        match self {
            Role::Proxy => &config.proxy_user,
            Role::Fleet => &config.app_user,
        }
    }
}

/// What the launcher keeps after binding, and why. Everything else is dropped from the
/// effective, permitted, inheritable and bounding sets, so even a re-exec (upgrade) of the
/// launcher cannot regain it.
pub const LAUNCHER_CAPS: &[(Capability, &str)] = &[
    (
        Capability::CAP_SETUID,
        "start workers as [overwatch].user and [app].user (respawn, upgrade)",
    ),
    (
        Capability::CAP_SETGID,
        "set the workers' group and clear their supplementary groups",
    ),
    (
        Capability::CAP_KILL,
        "signal workers and orphaned instances, which run as other users",
    ),
    (
        Capability::CAP_NET_BIND_SERVICE,
        "bind a port below 1024 that a reload adds",
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum PrivError {
    #[error("capabilities: {0}")]
    Caps(String),
    #[error("prctl({what}): {source}")]
    Prctl {
        what: &'static str,
        source: nix::Error,
    },
    #[error("the launcher (pid {expected}) is gone; this worker's parent is now {actual}")]
    Orphaned { expected: i32, actual: i32 },
    #[error("still privileged after dropping: {0}")]
    StillPrivileged(String),
}

/// Reduces the launcher, running as root, to [`LAUNCHER_CAPS`].
pub fn drop_launcher_capabilities() -> Result<(), PrivError> {
    let keep: CapsHashSet = LAUNCHER_CAPS.iter().map(|(c, _)| *c).collect();
    let err = |e: caps::errors::CapsError| PrivError::Caps(e.to_string());
    for cap in caps::all() {
        if !keep.contains(&cap) && caps::has_cap(None, CapSet::Bounding, cap).map_err(err)? {
            caps::drop(None, CapSet::Bounding, cap).map_err(err)?;
        }
    }
    caps::set(None, CapSet::Inheritable, &CapsHashSet::new()).map_err(err)?;
    caps::set(None, CapSet::Effective, &keep).map_err(err)?;
    caps::set(None, CapSet::Permitted, &keep).map_err(err)?;
    Ok(())
}

/// Makes the launcher the reaper of orphaned descendants, so app instances left by a dead
/// fleet worker come back to it instead of to init.
pub fn become_subreaper() -> Result<(), PrivError> {
    prctl::set_child_subreaper(true).map_err(|source| PrivError::Prctl {
        what: "PR_SET_CHILD_SUBREAPER",
        source,
    })
}

/// Called first thing in a worker process, before it reads any input: die with the launcher,
/// never gain privileges again, hold no capabilities. The uid/gid switch itself happened
/// between fork and exec (see [`worker_command`]).
pub fn enter_worker(launcher_pid: i32) -> Result<(), PrivError> {
    prctl::set_pdeathsig(Signal::SIGTERM).map_err(|source| PrivError::Prctl {
        what: "PR_SET_PDEATHSIG",
        source,
    })?;
    // The launcher may have died between our fork and the line above.
    let parent = getppid().as_raw();
    if parent != launcher_pid {
        return Err(PrivError::Orphaned {
            expected: launcher_pid,
            actual: parent,
        });
    }
    prctl::set_no_new_privs().map_err(|source| PrivError::Prctl {
        what: "PR_SET_NO_NEW_PRIVS",
        source,
    })?;
    let err = |e: caps::errors::CapsError| PrivError::Caps(e.to_string());
    for set in [
        CapSet::Ambient,
        CapSet::Inheritable,
        CapSet::Effective,
        CapSet::Permitted,
    ] {
        caps::clear(None, set).map_err(err)?;
    }
    let left = caps::read(None, CapSet::Permitted).map_err(err)?;
    if !left.is_empty() {
        return Err(PrivError::StillPrivileged(format!("{left:?}")));
    }
    Ok(())
}

/// The command line that starts a worker of `role`: the launcher's own executable (the same
/// build, even if the file on disk was replaced), switched to the role's user when the
/// launcher is root. `channel_fd` must be inheritable when the command is spawned.
pub fn worker_command(
    role: Role,
    account: Option<&Account>,
    channel_fd: i32,
    launcher_pid: Pid,
    json_logs: bool,
) -> Command {
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg0("overwatch")
        .arg("worker")
        .arg(role.name())
        .arg("--channel-fd")
        .arg(channel_fd.to_string())
        .arg("--launcher-pid")
        .arg(launcher_pid.as_raw().to_string())
        .args(json_logs.then_some("--log-json"))
        .stdin(Stdio::null())
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDNAMES");
    if let Some(account) = account {
        // std clears the supplementary groups (setgroups(0)) when switching from root.
        cmd.uid(account.uid).gid(account.gid);
        if let Some(home) = nix::unistd::User::from_uid(account.uid.into())
            .ok()
            .flatten()
            .map(|u| u.dir)
        {
            cmd.env("HOME", home);
        }
        cmd.env("USER", &account.name);
    }
    cmd
}
