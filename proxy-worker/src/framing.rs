//! A watch on the bytes of an HTTP/1 client connection, in front of hyper: it follows the
//! message framing (heads, `Content-Length` and chunked bodies) and refuses a request head
//! that has both `Content-Length` and `Transfer-Encoding`. hyper accepts such a head (RFC 9112
//! lets a server drop the length), but it is what request smuggling is made of, so the proxy
//! refuses it with 400 before the request exists: the head's last byte is replaced by one the
//! parser rejects, hyper answers 400 and closes, and nothing reaches an instance.
//!
//! The watch gives up (and lets every byte through untouched) as soon as the stream stops
//! looking like HTTP/1 requests it can follow: an HTTP/2 preface, an upgrade, a head too large
//! or malformed (hyper answers those itself).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Heads larger than this are left to hyper (431).
const MAX_HEAD: usize = 64 * 1024;
/// A chunk-size line (with extensions) longer than this: hyper will refuse it.
const MAX_CHUNK_LINE: usize = 4096;
/// What replaces a refused head's final `\n`; the parser wants `\n` there (400).
const POISON: u8 = b'!';

#[derive(Debug)]
enum State {
    Head(Vec<u8>),
    Fixed(u64),
    ChunkLine(Vec<u8>),
    ChunkData(u64),
    /// The CRLF after a chunk's data: bytes left.
    ChunkEnd(u8),
    Trailers(Vec<u8>),
    Off,
}

/// The framing tracker proper, separate from I/O so it can be tested on byte strings.
#[derive(Debug)]
pub struct Tracker {
    state: State,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker {
            state: State::Head(Vec::new()),
        }
    }
}

enum Framing {
    None,
    Length(u64),
    Chunked,
    Refuse,
    Stop,
}

fn framing_of(head: &[u8]) -> Framing {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Framing::Stop,
    }
    if req.method == Some("PRI") || req.method == Some("CONNECT") {
        return Framing::Stop;
    }
    let (mut te, mut cl, mut upgrade) = (None, None, false);
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            te = Some(h.value);
        } else if h.name.eq_ignore_ascii_case("content-length") {
            cl = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .or(Some(u64::MAX));
        } else if h.name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        }
    }
    match (te, cl) {
        (Some(_), Some(_)) => Framing::Refuse,
        _ if upgrade => Framing::Stop,
        (Some(te), None) => {
            let last = te.rsplit(|&b| b == b',').next().unwrap_or_default();
            if last.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                Framing::Chunked
            } else {
                Framing::Stop
            }
        }
        (None, Some(u64::MAX)) => Framing::Stop,
        (None, Some(0)) | (None, None) => Framing::None,
        (None, Some(n)) => Framing::Length(n),
    }
}

fn parse_chunk_size(line: &[u8]) -> Option<u64> {
    let size = line.split(|&b| b == b';').next()?.trim_ascii();
    if size.is_empty() || size.len() > 16 {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(size).ok()?, 16).ok()
}

impl Tracker {
    /// Follows `data`, the next bytes from the client; may poison a refused head in place.
    pub fn feed(&mut self, data: &mut [u8]) {
        let mut i = 0;
        while i < data.len() {
            match &mut self.state {
                State::Off => return,
                State::Head(buf) => {
                    // Empty lines before a request line are allowed (RFC 9112, 2.2).
                    if buf.is_empty() {
                        while i < data.len() && (data[i] == b'\r' || data[i] == b'\n') {
                            i += 1;
                        }
                        if i == data.len() {
                            return;
                        }
                    }
                    // Up to and including the next line feed: only there can the head end.
                    let rest = &data[i..];
                    let take = rest
                        .iter()
                        .position(|&b| b == b'\n')
                        .map_or(rest.len(), |p| p + 1);
                    buf.extend_from_slice(&rest[..take]);
                    i += take;
                    if buf.len() > MAX_HEAD {
                        self.state = State::Off;
                    } else if buf.ends_with(b"\r\n\r\n") || buf.ends_with(b"\n\n") {
                        let mut head = std::mem::take(buf);
                        let framing = framing_of(&head);
                        head.clear();
                        self.state = match framing {
                            Framing::None => State::Head(head),
                            Framing::Length(n) => State::Fixed(n),
                            Framing::Chunked => State::ChunkLine(Vec::new()),
                            Framing::Stop => State::Off,
                            Framing::Refuse => {
                                data[i - 1] = POISON;
                                State::Off
                            }
                        };
                    }
                }
                State::Fixed(left) => {
                    let n = (*left).min((data.len() - i) as u64);
                    i += n as usize;
                    *left -= n;
                    if *left == 0 {
                        self.state = State::Head(Vec::new());
                    }
                }
                State::ChunkLine(line) => {
                    let b = data[i];
                    i += 1;
                    line.push(b);
                    if line.len() > MAX_CHUNK_LINE {
                        self.state = State::Off;
                    } else if line.ends_with(b"\n") {
                        self.state = match parse_chunk_size(line.trim_ascii_end()) {
                            Some(0) => State::Trailers(Vec::new()),
                            Some(n) => State::ChunkData(n),
                            None => State::Off,
                        };
                    }
                }
                State::ChunkData(left) => {
                    let n = (*left).min((data.len() - i) as u64);
                    i += n as usize;
                    *left -= n;
                    if *left == 0 {
                        self.state = State::ChunkEnd(2);
                    }
                }
                State::ChunkEnd(left) => {
                    i += 1;
                    *left -= 1;
                    if *left == 0 {
                        self.state = State::ChunkLine(Vec::new());
                    }
                }
                State::Trailers(buf) => {
                    buf.push(data[i]);
                    i += 1;
                    if buf.len() > MAX_HEAD {
                        self.state = State::Off;
                    } else if buf == b"\r\n" || buf.ends_with(b"\r\n\r\n") {
                        self.state = State::Head(Vec::new());
                    }
                }
            }
        }
    }
}

/// A client stream whose incoming bytes pass through a [`Tracker`].
pub struct Watched<S> {
    inner: S,
    tracker: Tracker,
}

impl<S> Watched<S> {
    pub fn new(inner: S) -> Self {
        Watched {
            inner,
            tracker: Tracker::default(),
        }
    }

    /// A stream the tracker never looks at (HTTP/2 by ALPN).
    pub fn unwatched(inner: S) -> Self {
        Watched {
            inner,
            tracker: Tracker { state: State::Off },
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if !matches!(this.tracker.state, State::Off) {
            this.tracker.feed(&mut buf.filled_mut()[before..]);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `step` bytes; returns what the parser would see.
    fn run(input: &[u8], step: usize) -> Vec<u8> {
        let mut t = Tracker::default();
        let mut out = input.to_vec();
        for piece in out.chunks_mut(step) {
            t.feed(piece);
        }
        out
    }

    #[test]
    fn conflicting_framing_is_poisoned_in_any_piece_size() {
        let req = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        for step in [1, 3, 7, 1000] {
            let out = run(req, step);
            let end = req.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 3;
            assert_eq!(out[end], POISON, "step {step}");
            assert_eq!(&out[..end], &req[..end]);
        }
    }

    #[test]
    fn bodies_are_skipped_so_later_heads_are_seen() {
        let mut req = b"POST / HTTP/1.1\r\nContent-Length: 39\r\n\r\nTransfer-Encoding: x\r\nContent-Length: 1".to_vec();
        req.extend_from_slice(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n4;x=y\r\nabcd\r\n0\r\nT: 1\r\n\r\n");
        req.extend_from_slice(
            b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
        );
        let out = run(&req, 5);
        assert_eq!(&out[..req.len() - 1], &req[..req.len() - 1]);
        assert_eq!(*out.last().unwrap(), POISON);
    }

    #[test]
    fn h2_preface_and_upgrades_stop_the_watch() {
        let mut req = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        req.extend_from_slice(
            b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
        );
        assert_eq!(run(&req, 4), req);
        let up = b"GET / HTTP/1.1\r\nUpgrade: echo\r\nConnection: upgrade\r\n\r\nPOST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n";
        assert_eq!(run(up, 2), up);
    }
}
