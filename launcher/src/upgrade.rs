//! Self-upgrade by re-exec: open the new binary once, check who may have written it, probe it
//! through that descriptor, then execute that same descriptor with the listeners, the control
//! socket and the launcher's state inherited. Same PID, so systemd's MainPID holds.

use std::ffi::CString;
use std::io::{Read, Seek, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::fcntl::{open, OFlag};
use nix::sys::stat::Mode;

use protocol::fdpass::set_inheritable;

/// How long each step of the new binary's preflight (`probe`, `check-config`, `run --dry-run`)
/// may take.
pub const PREFLIGHT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("cannot open {path}: {source}")]
    Open { path: PathBuf, source: nix::Error },
    #[error("{path} is not trusted: {why}")]
    Untrusted { path: PathBuf, why: String },
    #[error("preflight of the new binary failed: {0}")]
    Preflight(String),
    #[error("the new binary speaks protocol {theirs}, this one {ours}; refusing")]
    Protocol { ours: u32, theirs: u32 },
    #[error("cannot pass state to the new binary: {0}")]
    State(std::io::Error),
    #[error("exec failed: {0}")]
    Exec(nix::Error),
}

/// Opens `path` for execution and checks that only root could have written it: the file and
/// every directory above it are owned by root and not writable by group or others. With
/// `strict == false` (a launcher not running as root) only the caller's own uid is accepted.
pub fn open_trusted(path: &Path, strict: bool) -> Result<OwnedFd, UpgradeError> {
    let untrusted = |why: String| UpgradeError::Untrusted {
        path: path.to_owned(),
        why,
    };
    let fd = open(path, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty()).map_err(|source| {
        UpgradeError::Open {
            path: path.to_owned(),
            source,
        }
    })?;
    let owner = if strict {
        0
    } else {
        nix::unistd::geteuid().as_raw()
    };
    let st = nix::sys::stat::fstat(&fd).map_err(|source| UpgradeError::Open {
        path: path.to_owned(),
        source,
    })?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(untrusted("not a regular file".into()));
    }
    if st.st_uid != owner {
        return Err(untrusted(format!(
            "owned by uid {}, not {owner}",
            st.st_uid
        )));
    }
    if st.st_mode & 0o022 != 0 {
        return Err(untrusted(format!(
            "mode {:o} is writable by group or others",
            st.st_mode & 0o7777
        )));
    }
    if st.st_mode & 0o100 == 0 {
        return Err(untrusted("not executable by its owner".into()));
    }
    let canonical = std::fs::canonicalize(path).map_err(|e| untrusted(e.to_string()))?;
    for dir in canonical.ancestors().skip(1) {
        let meta =
            std::fs::metadata(dir).map_err(|e| untrusted(format!("{}: {e}", dir.display())))?;
        if meta.uid() != owner {
            return Err(untrusted(format!(
                "directory {} is owned by uid {}, not {owner}",
                dir.display(),
                meta.uid()
            )));
        }
        if meta.mode() & 0o022 != 0 {
            return Err(untrusted(format!(
                "directory {} (mode {:o}) is writable by group or others",
                dir.display(),
                meta.mode() & 0o7777
            )));
        }
    }
    Ok(fd)
}

/// The path through which a child can execute the descriptor `fd` of this process.
fn proc_path(fd: BorrowedFd<'_>) -> String {
    format!("/proc/{}/fd/{}", std::process::id(), fd.as_raw_fd())
}

fn run_bounded(cmd: &mut Command, what: &str) -> Result<String, UpgradeError> {
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| UpgradeError::Preflight(format!("{what}: cannot start: {e}")))?;
    let deadline = std::time::Instant::now() + PREFLIGHT_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if std::time::Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(UpgradeError::Preflight(format!(
                    "{what}: no answer within {PREFLIGHT_TIMEOUT:?}"
                )));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(UpgradeError::Preflight(format!("{what}: {e}"))),
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|e| UpgradeError::Preflight(format!("{what}: {e}")))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(UpgradeError::Preflight(format!(
            "{what} exited with {}: {}",
            out.status,
            err.trim()
        )));
    }
    Ok(text)
}

/// Runs the new binary (through `fd`) as `probe`, `check-config` and `run --dry-run`; returns
/// its build.
pub fn preflight(fd: BorrowedFd<'_>, config: &Path) -> Result<String, UpgradeError> {
    let exe = proc_path(fd);
    let probe = run_bounded(Command::new(&exe).arg("probe"), "probe")?;
    let mut protocol = None;
    let mut build = None;
    for line in probe.lines() {
        if let Some(v) = line.strip_prefix("protocol=") {
            protocol = v.trim().parse::<u32>().ok();
        }
        if let Some(v) = line.strip_prefix("build=") {
            build = Some(v.trim().to_string());
        }
    }
    let theirs = protocol
        .ok_or_else(|| UpgradeError::Preflight(format!("probe said nothing useful: {probe:?}")))?;
    if theirs != protocol::PROTOCOL_VERSION {
        return Err(UpgradeError::Protocol {
            ours: protocol::PROTOCOL_VERSION,
            theirs,
        });
    }
    run_bounded(
        Command::new(&exe)
            .arg("check-config")
            .arg("--config")
            .arg(config),
        "check-config",
    )?;
    // The start-up path of `run` itself, short of binding and spawning: a binary that would
    // exit at start is refused here, while the old one still runs.
    run_bounded(
        Command::new(&exe)
            .arg("run")
            .arg("--dry-run")
            .arg("--config")
            .arg(config),
        "run --dry-run",
    )?;
    Ok(build.unwrap_or_else(|| "unknown".into()))
}

/// Puts `bytes` in an anonymous memory file the new binary reads back.
pub fn state_memfd(bytes: &[u8]) -> Result<OwnedFd, UpgradeError> {
    let fd = nix::sys::memfd::memfd_create(
        c"overwatch-upgrade-state",
        nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
    )
    .map_err(|e| UpgradeError::State(e.into()))?;
    let mut file = std::fs::File::from(fd);
    file.write_all(bytes).map_err(UpgradeError::State)?;
    file.rewind().map_err(UpgradeError::State)?;
    Ok(OwnedFd::from(file))
}

/// Reads back what [`state_memfd`] wrote.
pub fn read_state(fd: OwnedFd) -> std::io::Result<Vec<u8>> {
    let mut file = std::fs::File::from(fd);
    let mut bytes = Vec::new();
    file.rewind()?;
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Executes `binary` with `args`, the descriptors in `keep` inherited under their numbers.
/// Returns only if the exec failed, with every descriptor close-on-exec again.
pub fn exec(binary: BorrowedFd<'_>, args: &[String], keep: &[BorrowedFd<'_>]) -> UpgradeError {
    for fd in keep {
        if let Err(e) = set_inheritable(*fd, true) {
            for fd in keep {
                let _ = set_inheritable(*fd, false);
            }
            return UpgradeError::State(e);
        }
    }
    let args: Vec<CString> = args
        .iter()
        .map(|a| CString::new(a.as_bytes()).expect("no NUL in arguments"))
        .collect();
    let env: Vec<CString> = std::env::vars_os()
        .filter_map(|(k, v)| {
            let mut kv = k.into_encoded_bytes();
            kv.push(b'=');
            kv.extend(v.into_encoded_bytes());
            CString::new(kv).ok()
        })
        .collect();
    let err = match nix::unistd::fexecve(binary.as_fd(), &args, &env) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    for fd in keep {
        let _ = set_inheritable(*fd, false);
    }
    UpgradeError::Exec(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn group_writable_binary_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("overwatch");
        std::fs::write(&bin, b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o775)).unwrap();
        let e = open_trusted(&bin, false).unwrap_err();
        assert!(e.to_string().contains("writable by group or others"), "{e}");
    }

    #[test]
    fn world_writable_directory_is_refused() {
        // The temp dir's parent (/tmp) is world-writable.
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("overwatch");
        std::fs::write(&bin, b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = open_trusted(&bin, false).unwrap_err();
        assert!(e.to_string().contains("directory"), "{e}");
    }

    #[test]
    fn state_round_trips_through_memfd() {
        let fd = state_memfd(b"hello state").unwrap();
        assert_eq!(read_state(fd).unwrap(), b"hello state");
    }
}
