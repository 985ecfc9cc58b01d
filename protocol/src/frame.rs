//! Frames: a 4-byte big-endian length, then that many bytes of bincode.

use serde::{de::DeserializeOwned, Serialize};

/// Largest payload accepted on any channel. Status reports and TLS material are far below it.
pub const MAX_FRAME: usize = 1 << 20;
/// Bytes in the length prefix.
pub const HEADER: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the maximum of {MAX_FRAME}")]
    TooLarge { len: usize },
    #[error("corrupt frame: {0}")]
    Decode(String),
    #[error("cannot encode message: {0}")]
    Encode(String),
    #[error("frame length {declared} does not match the {actual} bytes received")]
    LengthMismatch { declared: usize, actual: usize },
}

/// What [`decode`] found at the start of a buffer.
#[derive(Debug)]
pub enum Decoded<T> {
    /// A whole frame: the value and the number of bytes it used.
    Frame(T, usize),
    /// Not enough bytes yet; this many are needed in all.
    Incomplete(usize),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME>()
}

/// Encodes a value as bincode without a header.
pub fn to_payload<T: Serialize>(value: &T) -> Result<Vec<u8>, FrameError> {
    let payload = bincode::serde::encode_to_vec(value, config())
        .map_err(|e| FrameError::Encode(e.to_string()))?;
    if payload.len() > MAX_FRAME {
        return Err(FrameError::TooLarge { len: payload.len() });
    }
    Ok(payload)
}

/// Decodes a whole payload; trailing bytes make it corrupt.
pub fn from_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    if payload.len() > MAX_FRAME {
        return Err(FrameError::TooLarge { len: payload.len() });
    }
    let (value, used) = bincode::serde::decode_from_slice(payload, config())
        .map_err(|e| FrameError::Decode(e.to_string()))?;
    if used != payload.len() {
        return Err(FrameError::Decode(format!(
            "{} trailing bytes after the message",
            payload.len() - used
        )));
    }
    Ok(value)
}

/// Encodes a value as one frame: header and payload.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, FrameError> {
    let payload = to_payload(value)?;
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Decodes the frame at the start of `buf`, if it is all there.
pub fn decode<T: DeserializeOwned>(buf: &[u8]) -> Result<Decoded<T>, FrameError> {
    if buf.len() < HEADER {
        return Ok(Decoded::Incomplete(HEADER));
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge { len });
    }
    if buf.len() < HEADER + len {
        return Ok(Decoded::Incomplete(HEADER + len));
    }
    let value = from_payload(&buf[HEADER..HEADER + len])?;
    Ok(Decoded::Frame(value, HEADER + len))
}

/// Decodes a buffer that must hold exactly one frame (one packet of a seqpacket channel).
pub fn decode_exact<T: DeserializeOwned>(buf: &[u8]) -> Result<T, FrameError> {
    match decode(buf)? {
        Decoded::Frame(value, used) if used == buf.len() => Ok(value),
        Decoded::Frame(_, used) => Err(FrameError::LengthMismatch {
            declared: used - HEADER,
            actual: buf.len().saturating_sub(HEADER),
        }),
        Decoded::Incomplete(need) => Err(FrameError::LengthMismatch {
            declared: need - HEADER,
            actual: buf.len().saturating_sub(HEADER),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{CtlRequest, RestartArgs};

    #[test]
    fn round_trip() {
        let msg = CtlRequest::RestartAll(RestartArgs {
            ssl: Some(2),
            http: None,
            root: Some(true),
        });
        let bytes = encode(&msg).unwrap();
        match decode::<CtlRequest>(&bytes).unwrap() {
            Decoded::Frame(back, used) => {
                assert_eq!(used, bytes.len());
                assert_eq!(back, msg);
            }
            Decoded::Incomplete(_) => panic!("whole frame reported incomplete"),
        }
    }

    #[test]
    fn incomplete_then_whole() {
        let bytes = encode(&CtlRequest::Status).unwrap();
        for cut in 0..bytes.len() {
            assert!(matches!(
                decode::<CtlRequest>(&bytes[..cut]).unwrap(),
                Decoded::Incomplete(_)
            ));
        }
    }

    #[test]
    fn oversized_length_is_refused_before_reading() {
        let mut bytes = (u32::MAX).to_be_bytes().to_vec();
        bytes.extend_from_slice(&[0; 16]);
        assert!(matches!(
            decode::<CtlRequest>(&bytes),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn garbage_is_corrupt_not_a_panic() {
        let mut bytes = 3u32.to_be_bytes().to_vec();
        bytes.extend_from_slice(&[0xff, 0xff, 0xff]);
        assert!(decode::<CtlRequest>(&bytes).is_err());
    }

    #[test]
    fn trailing_bytes_are_corrupt() {
        let mut payload = to_payload(&CtlRequest::Status).unwrap();
        payload.push(0);
        assert!(from_payload::<CtlRequest>(&payload).is_err());
    }
}
