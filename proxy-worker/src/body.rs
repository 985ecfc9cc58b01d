//! Body wrappers: a request body that can be offered to a second instance as long as the first
//! never started reading it, and a response body that keeps its request counted as in flight
//! and writes the access-log line when it ends.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::metrics::Metrics;
use crate::routes::InFlight;
use crate::server::RequestGuard;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A client's request body, not yet handed to any instance.
#[derive(Debug, Clone)]
pub struct RequestBody {
    /// `None` for a request without a body.
    slot: Option<Arc<Mutex<Option<Pending>>>>,
    hint: SizeHint,
}

/// A client body not yet sent anywhere, with its first frame if it was read ahead.
#[derive(Debug)]
struct Pending {
    first: Option<Frame<Bytes>>,
    rest: Incoming,
}

/// Reading the client's request body failed (bad chunked encoding, the client went away):
/// the client's fault, never the instance's.
#[derive(Debug, thiserror::Error)]
#[error("client request body: {0}")]
pub struct ClientBodyError(#[source] pub hyper::Error);

/// Whether `e` or one of its sources is a [`ClientBodyError`].
pub fn is_client_body_error(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(e);
    while let Some(e) = current {
        if e.is::<ClientBodyError>() {
            return true;
        }
        current = e.source();
    }
    false
}

impl RequestBody {
    pub fn new(body: Incoming) -> Self {
        let hint = body.size_hint();
        if body.is_end_stream() {
            RequestBody { slot: None, hint }
        } else {
            RequestBody {
                slot: Some(Arc::new(Mutex::new(Some(Pending {
                    first: None,
                    rest: body,
                })))),
                hint,
            }
        }
    }

    /// Reads the first frame of a body of unknown length (HTTP/1 chunked) before any
    /// instance is chosen, so a malformed one is refused without forwarding anything. Waits
    /// at most `wait`; a client slower than that is forwarded as it comes.
    pub async fn read_ahead(&self, wait: std::time::Duration) -> Result<(), ClientBodyError> {
        let Some(slot) = &self.slot else {
            return Ok(());
        };
        let Some(mut pending) = slot.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return Ok(());
        };
        let result = match tokio::time::timeout(wait, pending.rest.frame()).await {
            Ok(Some(Ok(frame))) => {
                pending.first = Some(frame);
                Ok(())
            }
            Ok(Some(Err(e))) => Err(ClientBodyError(e)),
            Ok(None) | Err(_) => Ok(()),
        };
        *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(pending);
        result
    }

    pub fn hint(&self) -> &SizeHint {
        &self.hint
    }

    pub fn is_empty(&self) -> bool {
        self.slot.is_none()
    }

    /// Whether an upstream connection started reading the body (so it cannot be replayed).
    pub fn is_taken(&self) -> bool {
        self.slot
            .as_ref()
            .is_some_and(|s| s.lock().unwrap_or_else(|e| e.into_inner()).is_none())
    }

    /// A body for one upstream attempt; it takes the client's body on its first poll.
    pub fn attempt(&self) -> UpstreamBody {
        UpstreamBody {
            state: match &self.slot {
                None => State::Empty,
                Some(slot) => State::Waiting(slot.clone()),
            },
            hint: self.hint,
        }
    }
}

#[derive(Debug)]
enum State {
    Empty,
    Waiting(Arc<Mutex<Option<Pending>>>),
    Streaming(Pending),
}

/// The body of one upstream request attempt.
#[derive(Debug)]
pub struct UpstreamBody {
    state: State,
    hint: SizeHint,
}

#[derive(Debug, thiserror::Error)]
#[error("the request body was already sent to another instance")]
struct BodyGone;

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let State::Waiting(slot) = &this.state {
            let taken = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
            match taken {
                Some(body) => this.state = State::Streaming(body),
                None => return Poll::Ready(Some(Err(BodyGone.into()))),
            }
        }
        match &mut this.state {
            State::Empty | State::Waiting(_) => Poll::Ready(None),
            State::Streaming(body) => match body.first.take() {
                Some(frame) => Poll::Ready(Some(Ok(frame))),
                None => Pin::new(&mut body.rest)
                    .poll_frame(cx)
                    .map_err(|e| ClientBodyError(e).into()),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.state {
            State::Empty => true,
            State::Waiting(_) => false,
            State::Streaming(body) => body.first.is_none() && body.rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            State::Empty => SizeHint::with_exact(0),
            State::Waiting(_) => self.hint,
            State::Streaming(body) => match &body.first {
                None => body.rest.size_hint(),
                Some(_) => self.hint,
            },
        }
    }
}

/// What the access log says about one request.
#[derive(Debug)]
pub struct AccessLog {
    pub started: Instant,
    pub client: std::net::IpAddr,
    pub host: String,
    pub method: http::Method,
    pub path: String,
    pub status: u16,
    pub pool: Option<protocol::Pool>,
    pub instance: Option<u32>,
    pub metrics: Arc<Metrics>,
}

impl AccessLog {
    /// Writes the access-log line and counts the request in the metrics.
    pub fn emit(&self, bytes: u64, complete: bool) {
        let elapsed = self.started.elapsed();
        self.metrics.request(self.pool, self.status, elapsed);
        tracing::info!(
            target: "access",
            client = %self.client,
            host = %self.host,
            method = %self.method,
            path = %self.path,
            status = self.status,
            pool = self.pool.map(|p| p.name()).unwrap_or("-"),
            instance = self.instance.map(i64::from).unwrap_or(-1),
            duration_ms = elapsed.as_millis() as u64,
            bytes,
            complete,
        );
    }
}

/// A response body on its way to the client.
pub struct Tracked {
    inner: BoxBody<Bytes, BoxError>,
    in_flight: Option<InFlight>,
    log: Option<AccessLog>,
    bytes: u64,
    /// Keeps the request counted on its client connection until the body is gone.
    _conn: Option<RequestGuard>,
}

impl Tracked {
    pub fn new(
        inner: BoxBody<Bytes, BoxError>,
        in_flight: Option<InFlight>,
        log: AccessLog,
    ) -> Self {
        Tracked {
            inner,
            in_flight,
            log: Some(log),
            bytes: 0,
            _conn: None,
        }
    }

    /// Holds `guard` until this body is dropped (written out, or abandoned).
    pub fn hold(&mut self, guard: RequestGuard) {
        self._conn = Some(guard);
    }

    fn finish(&mut self, complete: bool) {
        self.in_flight = None;
        if let Some(log) = self.log.take() {
            log.emit(self.bytes, complete);
        }
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = loop {
            match Pin::new(&mut this.inner).poll_frame(cx) {
                // An empty chunk (from an HTTP/1 instance) is no frame worth sending.
                Poll::Ready(Some(Ok(frame))) if frame.data_ref().is_some_and(|d| d.is_empty()) => {
                    if this.inner.is_end_stream() {
                        break Poll::Ready(None);
                    }
                }
                other => break other,
            }
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                }
                if this.inner.is_end_stream() {
                    this.finish(true);
                }
            }
            Poll::Ready(None) => this.finish(true),
            Poll::Ready(Some(Err(_))) => this.finish(false),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        let complete = self.inner.is_end_stream();
        self.finish(complete);
    }
}
