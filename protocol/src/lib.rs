//! The one crate that owns every type crossing an Overwatch process boundary.
//!
//! # Layout
//! - [`frame`]: length-prefixed bincode frames with a maximum size; decoding tells
//!   "need more bytes", "clean end" and "corrupt" apart.
//! - [`fdpass`]: `sendmsg`/`recvmsg` with SCM_RIGHTS, and adopting a descriptor number handed
//!   over at `exec`. With the `AsyncFd` registration in [`channel`], the only `unsafe` in the
//!   workspace, each with a `SAFETY:` line.
//! - [`channel`]: a typed, async `SOCK_SEQPACKET` channel between Overwatch processes; one
//!   packet is one frame plus the descriptors it names.
//! - [`ctl`]: the control-socket stream (`overwatchctl` ↔ fleet worker).
//! - [`messages`]: one enum per direction per channel, and the settings they carry.
//!
//! Every channel opens with [`Hello`] both ways; a different `protocol_version` is refused.
//! Enum variants are append-only: bincode encodes the variant index.

pub mod channel;
pub mod ctl;
pub mod fdpass;
pub mod frame;
pub mod messages;

pub use channel::{Channel, ChannelError};
pub use messages::*;

use serde::{Deserialize, Serialize};

/// Bumped whenever a message type changes shape.
pub const PROTOCOL_VERSION: u32 = 1;

/// Identifies this build; workers and launcher must agree on [`PROTOCOL_VERSION`], and
/// report `build` so an operator can see which binary each process runs.
pub fn build_id() -> String {
    let extra = option_env!("OVERWATCH_BUILD_ID").unwrap_or("dev");
    format!("{} ({extra})", env!("CARGO_PKG_VERSION"))
}

/// The first frame each way on every channel. Its layout never changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_version: u32,
    pub build: String,
}

impl Hello {
    pub fn ours() -> Self {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            build: build_id(),
        }
    }

    /// Checks a peer's hello against ours.
    pub fn check(&self) -> Result<(), HandshakeError> {
        if self.protocol_version == PROTOCOL_VERSION {
            Ok(())
        } else {
            Err(HandshakeError {
                ours: PROTOCOL_VERSION,
                theirs: self.protocol_version,
                their_build: self.build.clone(),
            })
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("protocol version mismatch: we speak {ours}, peer (build {their_build}) speaks {theirs}")]
pub struct HandshakeError {
    pub ours: u32,
    pub theirs: u32,
    pub their_build: String,
}
