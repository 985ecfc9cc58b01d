//! The control-socket stream between `overwatchctl` and the fleet worker: the same frames as
//! every channel (length prefix with a maximum, then bincode) over a `SOCK_STREAM` socket.

use bytes::{Buf, BytesMut};
use futures_util::{SinkExt, StreamExt};
use serde::{de::DeserializeOwned, Serialize};
use tokio::net::UnixStream;
use tokio_util::codec::{Decoder, Encoder, Framed};

use crate::frame::{self, Decoded, FrameError, HEADER, MAX_FRAME};
use crate::{ChannelError, Hello};

/// A `tokio_util` codec for our frames, generic over what it sends and receives.
pub struct FrameCodec<Tx, Rx> {
    _dir: std::marker::PhantomData<fn(Tx) -> Rx>,
}

impl<Tx, Rx> Default for FrameCodec<Tx, Rx> {
    fn default() -> Self {
        FrameCodec {
            _dir: std::marker::PhantomData,
        }
    }
}

impl<Tx, Rx: DeserializeOwned> Decoder for FrameCodec<Tx, Rx> {
    type Item = Rx;
    type Error = ChannelError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Rx>, ChannelError> {
        match frame::decode::<Rx>(src)? {
            Decoded::Frame(value, used) => {
                src.advance(used);
                Ok(Some(value))
            }
            Decoded::Incomplete(need) => {
                src.reserve(need.saturating_sub(src.len()).min(HEADER + MAX_FRAME));
                Ok(None)
            }
        }
    }
}

impl<Tx: Serialize, Rx> Encoder<&Tx> for FrameCodec<Tx, Rx> {
    type Error = ChannelError;

    fn encode(&mut self, item: &Tx, dst: &mut BytesMut) -> Result<(), ChannelError> {
        dst.extend_from_slice(&frame::encode(item)?);
        Ok(())
    }
}

/// Either end of a control connection; the hello is a frame of its own type.
pub struct CtlStream<Tx, Rx> {
    framed: Framed<UnixStream, FrameCodec<Tx, Rx>>,
}

impl<Tx: Serialize, Rx: DeserializeOwned> CtlStream<Tx, Rx> {
    /// Exchanges hellos (ours first) and checks the peer's version.
    pub async fn handshake(stream: UnixStream) -> Result<(Self, Hello), ChannelError> {
        let mut hello_framed = Framed::new(stream, FrameCodec::<Hello, Hello>::default());
        hello_framed.send(&Hello::ours()).await?;
        let theirs = match hello_framed.next().await {
            Some(hello) => hello?,
            None => return Err(ChannelError::ClosedBeforeHello),
        };
        theirs.check()?;
        let parts = hello_framed.into_parts();
        let mut new_parts =
            tokio_util::codec::FramedParts::new::<&Tx>(parts.io, FrameCodec::<Tx, Rx>::default());
        new_parts.read_buf = parts.read_buf;
        new_parts.write_buf = parts.write_buf;
        Ok((
            CtlStream {
                framed: Framed::from_parts(new_parts),
            },
            theirs,
        ))
    }

    pub async fn send(&mut self, msg: &Tx) -> Result<(), ChannelError> {
        self.framed.send(msg).await
    }

    /// The next message; `None` on a clean end of stream.
    pub async fn recv(&mut self) -> Result<Option<Rx>, ChannelError> {
        self.framed.next().await.transpose()
    }

    pub fn get_ref(&self) -> &UnixStream {
        self.framed.get_ref()
    }
}

/// Decodes one control request frame from arbitrary bytes; the fuzz target's entry point.
pub fn decode_request(bytes: &[u8]) -> Result<Decoded<crate::CtlRequest>, FrameError> {
    frame::decode(bytes)
}
