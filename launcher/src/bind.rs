//! Binding the listening sockets and the control socket, as root, before privileges go.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::sys::socket::{
    bind, getsockname, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag,
    SockType, SockaddrStorage,
};

/// Connections the kernel queues while no worker accepts (a respawn or an upgrade).
const BACKLOG: i32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("cannot listen on {addr}: {source}")]
    Tcp {
        addr: SocketAddr,
        source: nix::Error,
    },
    #[error("control socket {path}: {what}: {source}")]
    Control {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("control socket {path} is in use: is another Overwatch running?")]
    ControlInUse { path: PathBuf },
}

/// Binds and listens on `addr`; returns the socket and the address it got (port 0 resolved).
pub fn tcp_listener(addr: SocketAddr) -> Result<(OwnedFd, SocketAddr), BindError> {
    let err = |source| BindError::Tcp { addr, source };
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).map_err(err)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(err)?;
    if addr.is_ipv6() {
        // "[::]:443" next to "0.0.0.0:443" must not collide.
        setsockopt(&fd, sockopt::Ipv6V6Only, &true).map_err(err)?;
    }
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr)).map_err(err)?;
    listen(&fd, Backlog::new(BACKLOG).unwrap_or(Backlog::MAXCONN)).map_err(err)?;
    let local: SockaddrStorage = getsockname(fd.as_raw_fd()).map_err(err)?;
    let bound = to_socket_addr(&local).unwrap_or(addr);
    Ok((fd, bound))
}

/// The address a listening socket is bound to.
pub fn local_addr(fd: &OwnedFd) -> Option<SocketAddr> {
    let local: SockaddrStorage = getsockname(fd.as_raw_fd()).ok()?;
    to_socket_addr(&local)
}

fn to_socket_addr(local: &SockaddrStorage) -> Option<SocketAddr> {
    local
        .as_sockaddr_in()
        .map(|a| SocketAddr::from(std::net::SocketAddrV4::from(*a)))
        .or_else(|| {
            local
                .as_sockaddr_in6()
                .map(|a| SocketAddr::from(std::net::SocketAddrV6::from(*a)))
        })
}

/// Binds the control socket at `path`, mode 0660, owned by `owner` (uid, gid) when given.
/// A stale socket file (nobody answers on it) is replaced; a live one is an error.
pub fn control_socket(path: &Path, owner: Option<(u32, u32)>) -> Result<OwnedFd, BindError> {
    let err = |what, source| BindError::Control {
        path: path.to_owned(),
        what,
        source,
    };
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(|e| err("create directory", e))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| err("chmod directory", e))?;
        }
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(BindError::ControlInUse {
                path: path.to_owned(),
            });
        }
        std::fs::remove_file(path).map_err(|e| err("remove stale socket", e))?;
    }
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(|e| err("bind", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| err("chmod", e))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(|e| err("chown", e))?;
    }
    Ok(OwnedFd::from(listener))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_address_is_named() {
        let (_held, addr) = tcp_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let e = tcp_listener(addr).unwrap_err();
        assert!(e.to_string().contains(&addr.to_string()), "{e}");
    }

    #[test]
    fn live_control_socket_is_not_stolen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let _first = control_socket(&path, None).unwrap();
        assert!(matches!(
            control_socket(&path, None),
            Err(BindError::ControlInUse { .. })
        ));
    }

    #[test]
    fn stale_control_socket_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        drop(control_socket(&path, None).unwrap());
        control_socket(&path, None).unwrap();
    }
}
