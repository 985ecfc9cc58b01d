//! A typed async channel over a `SOCK_SEQPACKET` socket: one packet is one frame plus the
//! descriptors it names, so a message cannot be sent the wrong way or lose its descriptors.

use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use serde::{de::DeserializeOwned, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::fdpass::{recv_packet, send_packet, seqpacket_pair};
use crate::frame::{self, FrameError, HEADER, MAX_FRAME};
use crate::{HandshakeError, Hello};

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("channel I/O: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error("peer closed the channel before the handshake")]
    ClosedBeforeHello,
    #[error("message {what} carried {got} descriptors, expected {expected}")]
    FdCount {
        what: &'static str,
        expected: usize,
        got: usize,
    },
}

/// One received message and the descriptors that came with it.
#[derive(Debug)]
pub struct Received<T> {
    pub msg: T,
    pub fds: Vec<OwnedFd>,
}

impl<T> Received<T> {
    /// Checks the descriptor count against what the message's manifest promised.
    pub fn expect_fds(&self, what: &'static str, expected: usize) -> Result<(), ChannelError> {
        if self.fds.len() == expected {
            Ok(())
        } else {
            Err(ChannelError::FdCount {
                what,
                expected,
                got: self.fds.len(),
            })
        }
    }
}

/// Sends `Tx`, receives `Rx`. Both halves may be used at once from different tasks.
pub struct Channel<Tx, Rx> {
    fd: AsyncFd<OwnedFd>,
    _dir: PhantomData<fn(Tx) -> Rx>,
}

impl<Tx: Serialize, Rx: DeserializeOwned> Channel<Tx, Rx> {
    /// Wraps a connected seqpacket socket (made non-blocking here).
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        nix::fcntl::fcntl(
            &fd,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )?;
        // SAFETY: an `OwnedFd` is open, is closed only by its own drop, and always returns the
        // same number from `as_raw_fd`; the `AsyncFd` owns it for its whole life.
        let fd =
            unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::WRITABLE) }
                .map_err(|e| e.into_parts().1)?;
        Ok(Channel {
            fd,
            _dir: PhantomData,
        })
    }

    /// Both ends of a new channel, for tests and in-process harnesses.
    pub fn pair() -> io::Result<(Channel<Tx, Rx>, Channel<Rx, Tx>)>
    where
        Rx: Serialize,
        Tx: DeserializeOwned,
    {
        let (a, b) = seqpacket_pair()?;
        Ok((Channel::new(a)?, Channel::new(b)?))
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }

    pub async fn send(&self, msg: &Tx) -> Result<(), ChannelError> {
        self.send_with_fds(msg, &[]).await
    }

    pub async fn send_with_fds(
        &self,
        msg: &Tx,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), ChannelError> {
        let bytes = frame::encode(msg)?;
        self.send_bytes(&bytes, fds).await
    }

    async fn send_bytes(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), ChannelError> {
        loop {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|inner| send_packet(inner.get_ref().as_fd(), bytes, fds)) {
                Ok(result) => return Ok(result?),
                Err(_would_block) => continue,
            }
        }
    }

    async fn recv_bytes(&self, buf: &mut [u8]) -> Result<crate::fdpass::Packet, ChannelError> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|inner| recv_packet(inner.get_ref().as_fd(), buf)) {
                Ok(result) => return Ok(result?),
                Err(_would_block) => continue,
            }
        }
    }

    /// The next message, or `None` when the peer closed the channel.
    pub async fn recv(&self) -> Result<Option<Received<Rx>>, ChannelError> {
        let mut buf = vec![0u8; HEADER + MAX_FRAME];
        let packet = self.recv_bytes(&mut buf).await?;
        if packet.len == 0 && packet.fds.is_empty() {
            return Ok(None);
        }
        let msg = frame::decode_exact(&buf[..packet.len])?;
        Ok(Some(Received {
            msg,
            fds: packet.fds,
        }))
    }

    /// Sends our [`Hello`] and checks the peer's. Call once, first, on each end.
    pub async fn handshake(&self) -> Result<Hello, ChannelError> {
        self.send_bytes(&frame::encode(&Hello::ours())?, &[])
            .await?;
        let mut buf = vec![0u8; HEADER + 4096];
        let packet = self.recv_bytes(&mut buf).await?;
        if packet.len == 0 {
            return Err(ChannelError::ClosedBeforeHello);
        }
        let hello: Hello = frame::decode_exact(&buf[..packet.len])?;
        hello.check()?;
        Ok(hello)
    }

    pub fn into_fd(self) -> OwnedFd {
        self.fd.into_inner()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{CtlRequest, CtlResponse};

    #[tokio::test]
    async fn hello_then_messages_with_fds() {
        let (a, b) = Channel::<CtlRequest, CtlResponse>::pair().unwrap();
        let (ha, hb) = tokio::join!(a.handshake(), b.handshake());
        assert_eq!(ha.unwrap().protocol_version, crate::PROTOCOL_VERSION);
        hb.unwrap();
        let (extra, _keep) = seqpacket_pair().unwrap();
        a.send_with_fds(&CtlRequest::Status, &[extra.as_fd()])
            .await
            .unwrap();
        let got = b.recv().await.unwrap().unwrap();
        assert_eq!(got.msg, CtlRequest::Status);
        got.expect_fds("status", 1).unwrap();
        drop(a);
        assert!(b.recv().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn version_mismatch_is_refused() {
        let (a, b) = seqpacket_pair().unwrap();
        let a = Channel::<CtlRequest, CtlResponse>::new(a).unwrap();
        let bad = frame::encode(&Hello {
            protocol_version: crate::PROTOCOL_VERSION + 1,
            build: "other".into(),
        })
        .unwrap();
        send_packet(b.as_fd(), &bad, &[]).unwrap();
        let err = a.handshake().await.unwrap_err();
        assert!(matches!(err, ChannelError::Handshake(_)), "{err}");
        assert!(err.to_string().contains("mismatch"));
    }

    #[tokio::test]
    async fn corrupt_packet_is_an_error_not_a_panic() {
        let (a, b) = seqpacket_pair().unwrap();
        let a = Channel::<CtlRequest, CtlResponse>::new(a).unwrap();
        send_packet(b.as_fd(), &[0, 0, 0, 2, 0xff, 0xee], &[]).unwrap();
        assert!(a.recv().await.is_err());
    }
}
