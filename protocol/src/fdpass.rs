//! Descriptor passing: `sendmsg`/`recvmsg` with SCM_RIGHTS on seqpacket sockets.
//!
//! This is the one module of the crate that needs `unsafe`: the kernel hands us descriptor
//! numbers and we take ownership of them.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};

/// Most descriptors one message may carry (listeners plus a channel end).
pub const MAX_FDS: usize = 32;

/// A connected `SOCK_SEQPACKET` pair, close-on-exec and non-blocking.
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let (a, b) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
    )?;
    Ok((a, b))
}

/// Sends one packet with `fds` attached. Returns `WouldBlock` when the socket is full.
pub fn send_packet(sock: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let iov = [IoSlice::new(data)];
    let cmsgs: Vec<ControlMessage<'_>> = if raw.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(&raw)]
    };
    let sent = sendmsg::<()>(
        sock.as_raw_fd(),
        &iov,
        &cmsgs,
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    if sent != data.len() {
        return Err(io::Error::other(format!(
            "short packet: sent {sent} of {} bytes",
            data.len()
        )));
    }
    Ok(())
}

/// One received packet. `len == 0` with no descriptors is the peer's orderly close.
pub struct Packet {
    pub len: usize,
    pub fds: Vec<OwnedFd>,
}

/// Receives one packet into `buf`, taking ownership of any descriptors (close-on-exec).
/// A packet larger than `buf` or descriptors beyond [`MAX_FDS`] are an error.
pub fn recv_packet(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Packet> {
    let mut cmsg_space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg_space),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            for fd in raw {
                // SAFETY: the kernel just installed `fd` in our descriptor table for this
                // message; nothing else in the process knows the number, so we own it.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(io::Error::other(
            "descriptors truncated: too many in one message",
        ));
    }
    if msg.flags.contains(MsgFlags::MSG_TRUNC) {
        return Err(io::Error::other("packet larger than the receive buffer"));
    }
    Ok(Packet {
        len: msg.bytes,
        fds,
    })
}

/// Takes ownership of a descriptor number inherited across `exec` (for example
/// `--channel-fd 3`). Checks that it is open and, with `socket`, that it is a socket; marks it
/// close-on-exec so it goes no further.
pub fn adopt_inherited(fd: RawFd, socket: bool) -> io::Result<OwnedFd> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    use nix::sys::stat::{fstat, SFlag};
    if fd < 3 {
        return Err(io::Error::other(format!(
            "refusing to adopt descriptor {fd}"
        )));
    }
    // SAFETY: `fd` is only borrowed for the duration of these two checks; it stays
    // valid because no other code in this freshly exec'd process closes descriptors.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let st = fstat(borrowed).map_err(|e| io::Error::other(format!("descriptor {fd}: {e}")))?;
    if socket && SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFSOCK {
        return Err(io::Error::other(format!("descriptor {fd} is not a socket")));
    }
    fcntl(borrowed, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    // SAFETY: the descriptor was passed to this process at exec for it alone to own, is
    // open (fstat succeeded) and is adopted exactly once, at startup.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// [`adopt_inherited`] for a socket.
pub fn adopt_inherited_socket(fd: RawFd) -> io::Result<OwnedFd> {
    adopt_inherited(fd, true)
}

/// Clears close-on-exec so a child started next inherits `fd` under the same number.
/// Call it only right before spawning that child, and close the parent's copy right after.
pub fn set_inheritable(fd: BorrowedFd<'_>, inheritable: bool) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    let flags = if inheritable {
        FdFlag::empty()
    } else {
        FdFlag::FD_CLOEXEC
    };
    fcntl(fd, FcntlArg::F_SETFD(flags))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn descriptors_travel_with_their_packet() {
        let (a, b) = seqpacket_pair().unwrap();
        let (mut x, y) = UnixStream::pair().unwrap();
        let y_fd: OwnedFd = y.into();
        send_packet(a.as_fd(), b"hello", &[y_fd.as_fd()]).unwrap();
        drop(y_fd);
        let mut buf = [0u8; 64];
        let packet = recv_packet(b.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..packet.len], b"hello");
        assert_eq!(packet.fds.len(), 1);
        let mut y2 = UnixStream::from(packet.fds.into_iter().next().unwrap());
        x.write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        y2.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
    }

    #[test]
    fn oversized_packet_is_an_error() {
        let (a, b) = seqpacket_pair().unwrap();
        send_packet(a.as_fd(), &[7u8; 100], &[]).unwrap();
        let mut buf = [0u8; 10];
        assert!(recv_packet(b.as_fd(), &mut buf).is_err());
    }
}
