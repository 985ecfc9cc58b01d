//! Instance processes: start a command with `sh -c` in its own process group with its log
//! attached, and stop the whole group (SIGTERM, then SIGKILL after the stop timeout).

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::{getpgrp, Pid};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use crate::ports;

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot create log directory {path}: {source}")]
    LogDir { path: PathBuf, source: io::Error },
    #[error("cannot open log file {path}: {source}")]
    LogFile { path: PathBuf, source: io::Error },
    #[error("cannot start `sh -c {command:?}` in {dir}: {source}")]
    Spawn {
        command: String,
        dir: PathBuf,
        source: io::Error,
    },
}

/// What to run for one instance.
pub struct SpawnSpec<'a> {
    pub command: &'a str,
    pub dir: &'a Path,
    pub env: &'a [(String, String)],
    pub log: &'a Path,
    /// Written to the log before the command starts.
    pub banner: &'a str,
}

/// Starts `sh -c command` as the leader of a new process group, stdin from /dev/null,
/// stdout and stderr appended to the log file.
pub fn spawn(spec: &SpawnSpec<'_>) -> Result<Child, ProcessError> {
    if let Some(dir) = spec.log.parent() {
        std::fs::create_dir_all(dir).map_err(|source| ProcessError::LogDir {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    let log_err = |source| ProcessError::LogFile {
        path: spec.log.to_path_buf(),
        source,
    };
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(spec.log)
        .map_err(log_err)?;
    writeln!(log, "{}", spec.banner).map_err(log_err)?;
    let stderr = log.try_clone().map_err(log_err)?;
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(spec.command)
        .current_dir(spec.dir)
        // systemd's notification and socket-activation variables are for Overwatch only.
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDNAMES")
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(stderr))
        .process_group(0);
    cmd.spawn().map_err(|source| ProcessError::Spawn {
        command: spec.command.to_string(),
        dir: spec.dir.to_path_buf(),
        source,
    })
}

/// Signals every process of group `pgid`. Refuses group numbers that are not an instance's:
/// 0 and 1, and our own group. A group that is already gone is not an error.
pub fn signal_group(pgid: i32, signal: Signal) -> Result<(), Errno> {
    if pgid <= 1 || pgid == getpgrp().as_raw() {
        return Err(Errno::EINVAL);
    }
    match killpg(Pid::from_raw(pgid), signal) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Whether any process is still in group `pgid`.
#[cfg(test)]
pub fn group_alive(pgid: i32) -> bool {
    pgid > 1 && killpg(Pid::from_raw(pgid), None::<Signal>).is_ok()
}

/// Whether process `pid` has exited: gone, or a zombie waiting for its parent. Adopted
/// instances are not our children, so this is how their exit is seen.
pub fn exited(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => {
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next());
            matches!(state, Some('Z' | 'X'))
        }
    }
}

/// The process group to stop, with what tells that its leader exited.
pub struct StopTarget {
    pub pgid: i32,
    pub pid: i32,
    pub port: u16,
    /// Becomes `true` when the leader has been reaped (our child) or reported gone.
    pub exited: watch::Receiver<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopOutcome {
    /// The leader exited and the port was free within the stop timeout.
    Stopped,
    /// SIGKILL was needed; the port is free now.
    Killed,
    /// Even after SIGKILL the port stayed busy (a process outside the group holds it).
    PortStillBusy,
}

/// After SIGKILL, how long to wait for the kernel to tear the group down and free the port.
const KILL_GRACE: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(25);

/// SIGTERM to the whole group (SIGKILL at once when `fast`), then wait until the leader has
/// exited and nothing listens on the port, at most `stop_timeout`; then SIGKILL the group.
pub async fn stop_group(target: StopTarget, stop_timeout: Duration, fast: bool) -> StopOutcome {
    let StopTarget {
        pgid,
        pid,
        port,
        exited: gone,
    } = target;
    let done = || (*gone.borrow() || exited(pid)) && ports::is_free(port);
    let mut killed = fast;
    if let Err(e) = signal_group(
        pgid,
        if fast {
            Signal::SIGKILL
        } else {
            Signal::SIGTERM
        },
    ) {
        tracing::warn!(pgid, "cannot signal process group: {e}");
    }
    let mut deadline = Instant::now() + if fast { KILL_GRACE } else { stop_timeout };
    loop {
        if done() {
            // Stragglers that left the port alone still belong to the instance.
            let _ = signal_group(pgid, Signal::SIGKILL);
            return if killed {
                StopOutcome::Killed
            } else {
                StopOutcome::Stopped
            };
        }
        if Instant::now() >= deadline {
            if killed {
                return StopOutcome::PortStillBusy;
            }
            tracing::warn!(
                pgid,
                port,
                "still running after {} ms: SIGKILL",
                stop_timeout.as_millis()
            );
            let _ = signal_group(pgid, Signal::SIGKILL);
            killed = true;
            deadline = Instant::now() + KILL_GRACE;
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_to_signal_our_own_or_special_groups() {
        assert_eq!(signal_group(0, Signal::SIGTERM), Err(Errno::EINVAL));
        assert_eq!(signal_group(1, Signal::SIGTERM), Err(Errno::EINVAL));
        assert_eq!(
            signal_group(getpgrp().as_raw(), Signal::SIGTERM),
            Err(Errno::EINVAL)
        );
    }

    #[test]
    fn exited_sees_missing_processes() {
        assert!(!exited(std::process::id() as i32));
        assert!(exited(i32::MAX));
    }

    #[tokio::test]
    async fn stop_kills_a_group_that_ignores_sigterm() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("logs/t.log");
        let mut child = spawn(&SpawnSpec {
            command: "trap '' TERM; echo armed; sleep 30 & wait",
            dir: dir.path(),
            env: &[],
            log: &log,
            banner: "test",
        })
        .unwrap();
        let pid = child.id().unwrap() as i32;
        let (tx, rx) = watch::channel(false);
        let waiter = tokio::spawn(async move {
            let _ = child.wait().await;
            tx.send_replace(true);
        });
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let armed = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&log).unwrap().contains("armed") {
            assert!(Instant::now() < armed, "the test command never started");
            tokio::time::sleep(POLL).await;
        }
        let start = Instant::now();
        let target = StopTarget {
            pgid: pid,
            pid,
            port,
            exited: rx,
        };
        let outcome = stop_group(target, Duration::from_millis(300), false).await;
        assert_eq!(outcome, StopOutcome::Killed);
        assert!(start.elapsed() >= Duration::from_millis(300));
        waiter.await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while group_alive(pid) && Instant::now() < deadline {
            tokio::time::sleep(POLL).await;
        }
        assert!(!group_alive(pid));
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "test\narmed\n");
    }
}
