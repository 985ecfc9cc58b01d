//! Client side: accept loops on the inherited listeners, TLS handshakes, HTTP/1.1 and HTTP/2
//! connections, and the graceful shutdown of all of them.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use protocol::{ListenerKind, ShutdownKind};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::framing::Watched;
use crate::proxy::{ConnInfo, Proxy};

/// A client gets this long to send a request's head (slowloris protection). hyper runs this
/// timer while an idle keep-alive connection waits for its next request too, so it is also
/// the keep-alive idle limit: nginx's 75 s, above the idle timeouts of load balancers that
/// may sit in front (ALB: 60 s), so they close first and never send on a closing connection.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(75);
/// HTTP/2 pings an idle client this often, and drops it after as long without an answer.
const H2_KEEP_ALIVE: Duration = Duration::from_secs(30);
/// And this long to finish the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest HTTP/2 header list accepted; HTTP/1 heads are bounded by hyper's read buffer.
const MAX_HEADER_LIST_SIZE: u32 = 64 * 1024;
/// Largest HTTP/1 request head (431 beyond); also hyper's read buffer limit.
const MAX_HEAD_SIZE: usize = 64 * 1024;
/// Most headers in one HTTP/1 request.
const MAX_HEADERS: usize = 128;
/// Client connections served at once; beyond it new connections wait in the kernel's accept
/// queue. Each costs two descriptors (client and instance side).
const MAX_CONNECTIONS: usize = 16_384;
/// An idle HTTP/1 connection at shutdown (fresh, or keep-alive between requests) may have its
/// next request on the way: it gets this long to arrive, and is answered with
/// `Connection: close`, instead of a close under it. Well above a round trip, well below any
/// drain timeout.
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Pause after an accept error such as EMFILE, so a descriptor shortage is no busy loop.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// One inherited listening socket. The launcher keeps its own copy: ours is only dropped,
/// never shut down, so connections queue for a successor.
pub struct Listener {
    pub kind: ListenerKind,
    pub addr: String,
    pub socket: TcpListener,
    pub tls: Option<TlsAcceptor>,
}

struct Shared {
    proxy: Arc<Proxy>,
    builder: auto::Builder<TokioExecutor>,
    stop_accept: CancellationToken,
    graceful: CancellationToken,
    permits: Arc<Semaphore>,
}

/// The accept loops and every client connection.
pub struct Server {
    shared: Arc<Shared>,
    accept: TaskTracker,
    /// Stops the accept loops of the current listener set (a reload brings a new set).
    current_set: std::sync::Mutex<CancellationToken>,
}

impl Server {
    pub fn new(proxy: Arc<Proxy>, header_read_timeout: Duration) -> Self {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout)
            .max_headers(MAX_HEADERS)
            .max_buf_size(MAX_HEAD_SIZE)
            .keep_alive(true);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(MAX_HEADER_LIST_SIZE)
            .keep_alive_interval(H2_KEEP_ALIVE)
            .keep_alive_timeout(H2_KEEP_ALIVE);
        Server {
            shared: Arc::new(Shared {
                proxy,
                builder,
                stop_accept: CancellationToken::new(),
                graceful: CancellationToken::new(),
                permits: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            }),
            accept: TaskTracker::new(),
            current_set: std::sync::Mutex::new(CancellationToken::new()),
        }
    }

    /// Accepts on every listener of `listeners`, and no longer on those of an earlier set.
    /// Connections already open stay; a socket in both sets loses no queued connection.
    pub fn start(&self, listeners: Vec<Listener>) {
        let set = self.shared.stop_accept.child_token();
        let old = std::mem::replace(
            &mut *self.current_set.lock().unwrap_or_else(|e| e.into_inner()),
            set.clone(),
        );
        old.cancel();
        for listener in listeners {
            tracing::info!(addr = %listener.addr, kind = ?listener.kind, "accepting");
            self.accept
                .spawn(accept_loop(listener, self.shared.clone(), set.clone()));
        }
    }

    /// Stops accepting, closes every connection gracefully within `drain_timeout` (`Fast`: at
    /// once), then drops whatever is left.
    pub async fn shutdown(&self, kind: ShutdownKind, drain_timeout: Duration) {
        let shared = &self.shared;
        shared.stop_accept.cancel();
        self.accept.close();
        self.accept.wait().await;
        let tasks = &shared.proxy.tasks;
        tracing::info!(?kind, connections = tasks.len(), "draining connections");
        shared.proxy.draining.store(true, Ordering::Release);
        shared.graceful.cancel();
        tasks.close();
        let budget = match kind {
            ShutdownKind::Fast => Duration::ZERO,
            ShutdownKind::Graceful | ShutdownKind::Upgrade => drain_timeout,
        };
        if tokio::time::timeout(budget, tasks.wait()).await.is_err() {
            if kind != ShutdownKind::Fast {
                tracing::warn!(
                    left = tasks.len(),
                    "drain deadline passed; closing the rest"
                );
            }
            shared.proxy.hard_stop.cancel();
            tasks.wait().await;
        }
    }
}

fn is_per_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted)
}

async fn accept_loop(listener: Listener, shared: Arc<Shared>, stop: CancellationToken) {
    let Listener {
        kind,
        addr,
        socket,
        tls,
    } = listener;
    loop {
        let permit = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            p = shared.permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };
        let accepted = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            r = socket.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                let conn = serve(stream, peer, kind, tls.clone(), permit, shared.clone());
                shared.proxy.tasks.spawn(conn);
            }
            Err(e) if is_per_connection(&e) => continue,
            Err(e) => {
                tracing::warn!(%addr, error = %e, "accept failed; backing off");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(ACCEPT_ERROR_BACKOFF) => {}
                }
            }
        }
    }
    tracing::info!(%addr, "stopped accepting");
}

async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    kind: ListenerKind,
    tls: Option<TlsAcceptor>,
    _permit: OwnedSemaphorePermit,
    shared: Arc<Shared>,
) {
    let _ = stream.set_nodelay(true);
    let _open = shared.proxy.metrics.connection(kind);
    let info = ConnInfo { kind, client: peer };
    let Some(acceptor) = tls else {
        return serve_http(TokioIo::new(Watched::new(stream)), info, &shared).await;
    };
    let handshake = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream));
    let tls_stream = tokio::select! {
        r = handshake => r,
        _ = shared.proxy.hard_stop.cancelled() => return,
    };
    let metrics = &shared.proxy.metrics;
    metrics.tls_handshake(matches!(tls_stream, Ok(Ok(_))));
    match tls_stream {
        Ok(Ok(s)) => {
            let s = if s.get_ref().1.alpn_protocol() == Some(b"h2") {
                Watched::unwatched(s)
            } else {
                Watched::new(s)
            };
            serve_http(TokioIo::new(s), info, &shared).await
        }
        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
    }
}

async fn serve_http<I>(io: I, info: ConnInfo, shared: &Shared)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let peer = info.client;
    let info = Arc::new(info);
    let proxy = shared.proxy.clone();
    let activity = Arc::new(Activity::default());
    let service = service_fn({
        let activity = activity.clone();
        move |req: hyper::Request<hyper::body::Incoming>| {
            let guard = Activity::start(&activity, req.version());
            let proxy = proxy.clone();
            let info = info.clone();
            async move {
                let http1 = req.version() < http::Version::HTTP_2;
                let mut resp = proxy.handle(req, &info).await;
                // Draining: this response is the connection's last, and says so, so the
                // client does not send another request on a connection about to close.
                if http1
                    && proxy.draining.load(Ordering::Acquire)
                    && resp.status() != http::StatusCode::SWITCHING_PROTOCOLS
                {
                    resp.headers_mut().insert(
                        http::header::CONNECTION,
                        http::HeaderValue::from_static("close"),
                    );
                }
                resp.body_mut().hold(guard);
                Ok::<_, Infallible>(resp)
            }
        }
    });
    let conn = shared.builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    let hard_stop = &shared.proxy.hard_stop;
    tokio::select! {
        biased;
        _ = hard_stop.cancelled() => return,
        _ = shared.graceful.cancelled() => {}
        r = conn.as_mut() => return log_end(peer, r),
    }
    // A connection that has not started a request yet may have its first one on the way (its
    // protocol is not even known): it gets the grace below, like an idle HTTP/1 connection.
    // HTTP/2: then GOAWAY, the open streams finish. HTTP/1: never close under a request
    // that may be on the wire. A request in progress gets `Connection: close` on its response
    // (or, if its head already went out, the next one does); an idle connection gets a grace
    // period for its next request, which is answered with `Connection: close`; a connection
    // idle all through the grace is closed.
    loop {
        let changed = activity.changed.notified();
        tokio::pin!(changed);
        if activity.version.load(Ordering::Acquire) == VERSION_H2 {
            break;
        }
        let busy = activity.active.load(Ordering::Acquire) > 0;
        tokio::select! {
            biased;
            _ = hard_stop.cancelled() => return,
            r = conn.as_mut() => return log_end(peer, r),
            _ = changed => continue,
            _ = tokio::time::sleep(IDLE_CLOSE_GRACE), if !busy => break,
        }
    }
    conn.as_mut().graceful_shutdown();
    let result = tokio::select! {
        biased;
        _ = hard_stop.cancelled() => return,
        r = conn.as_mut() => r,
    };
    log_end(peer, result);
}

fn log_end(peer: SocketAddr, result: Result<(), Box<dyn std::error::Error + Send + Sync>>) {
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "client connection ended with an error");
    }
}

const VERSION_UNKNOWN: u8 = 0;
const VERSION_H1: u8 = 1;
const VERSION_H2: u8 = 2;

/// What one client connection is doing: requests whose response is not finished yet, and
/// which HTTP version it speaks. The drain waits on it.
#[derive(Default)]
struct Activity {
    active: AtomicUsize,
    version: AtomicU8,
    /// One waiter (the connection's drain); `notify_one` keeps a permit, so no change is lost.
    changed: Notify,
}

impl Activity {
    fn start(this: &Arc<Self>, version: http::Version) -> RequestGuard {
        if this.version.load(Ordering::Relaxed) == VERSION_UNKNOWN {
            let v = if version == http::Version::HTTP_2 {
                VERSION_H2
            } else {
                VERSION_H1
            };
            this.version.store(v, Ordering::Release);
        }
        this.active.fetch_add(1, Ordering::AcqRel);
        this.changed.notify_one();
        RequestGuard(this.clone())
    }
}

/// Counts one request as in progress on its connection until its response body is done.
pub struct RequestGuard(Arc<Activity>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
        self.0.changed.notify_one();
    }
}
