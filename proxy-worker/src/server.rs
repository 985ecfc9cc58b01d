//! Client side: accept loops on the inherited listeners, TLS handshakes, HTTP/1.1 and HTTP/2
//! connections, and the graceful shutdown of all of them.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
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

use crate::proxy::{ConnInfo, Proxy};

/// A client gets this long to send a request's head (slowloris protection). hyper runs this
/// timer while an idle keep-alive connection waits for its next request too, so it is also
/// the keep-alive idle limit: nginx's 75 s, above the idle timeouts of load balancers that
/// may sit in front (ALB: 60 s), so they close first and never send on a closing connection.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(75);
/// HTTP/2 pings an idle client this often, and drops it after as long without an answer.
const H2_KEEP_ALIVE: Duration = Duration::from_secs(30);
/// And this long to finish the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest HTTP/2 header list accepted; HTTP/1 heads are bounded by hyper's read buffer.
const MAX_HEADER_LIST_SIZE: u32 = 64 * 1024;
/// Most headers in one HTTP/1 request.
const MAX_HEADERS: usize = 128;
/// Client connections served at once; beyond it new connections wait in the kernel's accept
/// queue. Each costs two descriptors (client and instance side).
const MAX_CONNECTIONS: usize = 16_384;
/// A connection accepted just before a shutdown has its first request on the way: it gets
/// this long to arrive, and is answered with `Connection: close`, instead of a close under it.
const FRESH_CONNECTION_GRACE: Duration = Duration::from_secs(2);
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
    pub fn new(proxy: Arc<Proxy>) -> Self {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .max_headers(MAX_HEADERS)
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
    let info = ConnInfo { kind, client: peer };
    let Some(acceptor) = tls else {
        return serve_http(TokioIo::new(stream), info, &shared).await;
    };
    let handshake = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream));
    let tls_stream = tokio::select! {
        r = handshake => r,
        _ = shared.proxy.hard_stop.cancelled() => return,
    };
    match tls_stream {
        Ok(Ok(s)) => serve_http(TokioIo::new(s), info, &shared).await,
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
    let first_request = Arc::new(FirstRequest::default());
    let service = service_fn({
        let first_request = first_request.clone();
        move |req| {
            first_request.seen();
            let proxy = proxy.clone();
            let info = info.clone();
            async move { Ok::<_, Infallible>(proxy.handle(req, &info).await) }
        }
    });
    let conn = shared.builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    let hard_stop = &shared.proxy.hard_stop;
    // Biased: once the shutdown signal is out, no response head is written before this
    // connection knows it must say `Connection: close`.
    tokio::select! {
        biased;
        _ = hard_stop.cancelled() => return,
        _ = shared.graceful.cancelled() => {}
        r = conn.as_mut() => return log_end(peer, r),
    }
    if !first_request.was_seen() {
        tokio::select! {
            biased;
            _ = hard_stop.cancelled() => return,
            _ = first_request.wait() => {}
            _ = tokio::time::sleep(FRESH_CONNECTION_GRACE) => {}
            r = conn.as_mut() => return log_end(peer, r),
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

/// Whether a connection has started a request yet.
#[derive(Default)]
struct FirstRequest {
    seen: AtomicBool,
    notify: Notify,
}

impl FirstRequest {
    fn seen(&self) {
        if !self.seen.swap(true, Ordering::AcqRel) {
            self.notify.notify_one();
        }
    }

    fn was_seen(&self) -> bool {
        self.seen.load(Ordering::Acquire)
    }

    async fn wait(&self) {
        self.notify.notified().await;
    }
}
