//! The request path: choose the pool (https, http or root), pick an instance, rewrite headers,
//! forward with retries that are safe, stream the response back, tunnel upgrades.

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body as _, Incoming};
use hyper::upgrade::OnUpgrade;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use protocol::{ListenerKind, Pool, ProxyToFleet};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::body::{is_client_body_error, AccessLog, RequestBody, Tracked, UpstreamBody};
use crate::config::{normalize_host, Settings};
use crate::headers;
use crate::metrics::{Metrics, UpstreamError};
use crate::routes::{InFlight, Router};
use crate::tls::{self, TlsError};

/// How long a request waits for its pool to get an instance before a 503: covers a fleet
/// worker restart or the first instance of a pool still starting.
pub const NO_BACKEND_WAIT: Duration = Duration::from_secs(10);
/// How long an instance may take to send response headers before a 504. Generous: server-side
/// rendering, slow APIs and long polls are normal; a hung instance is what this catches.
pub const UPSTREAM_RESPONSE_TIMEOUT: Duration = Duration::from_secs(300);
/// A chunked request body's first chunk is read before an instance is chosen, so a malformed
/// one is refused (400) and never forwarded; a client slower than this is forwarded as is.
pub const FIRST_CHUNK_WAIT: Duration = Duration::from_secs(5);
/// A response body with a `Content-Length` up to this is read whole before the head is sent,
/// so head and body leave in one write (nginx's proxy buffering, for small answers only);
/// larger or unsized bodies (downloads, server-sent events) stream.
const SMALL_RESPONSE: u64 = 64 * 1024;
/// Connecting on loopback is immediate; this only bounds a full accept queue.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle pooled upstream connections are closed before Node's default 5 s keep-alive timeout,
/// so the proxy never reuses a connection the instance is closing.
const UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// Who is on the other end of one client connection, and on which kind of listener.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub kind: ListenerKind,
    pub client: SocketAddr,
}

/// The part of the request path a reload replaces: settings and upstream clients.
pub struct Upstream {
    pub settings: Settings,
    http: Client<HttpConnector, UpstreamBody>,
    https: Client<HttpsConnector<HttpConnector>, UpstreamBody>,
}

impl Upstream {
    pub fn new(settings: Settings) -> Result<Self, TlsError> {
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(UPSTREAM_IDLE_TIMEOUT);
        let tls_config = tls::instance_client_config(settings.https_ca_pem.as_deref())?;
        let https_connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config)
            .https_only()
            .enable_http1()
            .wrap_connector(connector());
        Ok(Upstream {
            http: builder.build(connector()),
            https: builder.build(https_connector),
            settings,
        })
    }
}

impl ConnInfo {
    fn proto(&self) -> &'static str {
        match self.kind {
            ListenerKind::Https => "https",
            ListenerKind::Http => "http",
        }
    }
}

/// Everything the request path shares.
pub struct Proxy {
    /// Swapped whole by a reload; each request loads it once.
    upstream: ArcSwap<Upstream>,
    pub router: Arc<Router>,
    events: mpsc::Sender<ProxyToFleet>,
    /// Client connections and the upgrade tunnels they start.
    pub tasks: TaskTracker,
    /// Cancelled when the drain deadline passed: whatever is still open is dropped.
    pub hard_stop: CancellationToken,
    /// Set when the worker starts draining: HTTP/1 responses say `Connection: close`.
    pub draining: AtomicBool,
    response_timeout: Duration,
    /// How long a chunked request body's first chunk is waited for before forwarding.
    first_chunk_wait: Duration,
    pub metrics: Arc<Metrics>,
}

fn connector() -> HttpConnector {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    c.set_connect_timeout(Some(CONNECT_TIMEOUT));
    c.enforce_http(false);
    c
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// The host part of a `Host` value or authority, normalized.
fn host_only(authority: &str) -> String {
    match authority.parse::<http::uri::Authority>() {
        Ok(a) => normalize_host(a.host()),
        Err(_) => normalize_host(authority),
    }
}

/// An error and all its sources on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn local(status: StatusCode, message: &str, mut log: AccessLog) -> Response<Tracked> {
    log.status = status.as_u16();
    let body = Full::new(Bytes::from(format!("{message}\n")))
        .map_err(|never| match never {})
        .boxed();
    let mut resp = Response::new(Tracked::new(body, None, log));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

impl Proxy {
    pub fn new(
        upstream: Upstream,
        router: Arc<Router>,
        events: mpsc::Sender<ProxyToFleet>,
        response_timeout: Duration,
        first_chunk_wait: Duration,
    ) -> Self {
        Proxy {
            response_timeout,
            first_chunk_wait,
            metrics: Arc::new(Metrics::default()),
            upstream: ArcSwap::from_pointee(upstream),
            router,
            events,
            tasks: TaskTracker::new(),
            hard_stop: CancellationToken::new(),
            draining: AtomicBool::new(false),
        }
    }

    /// New settings for requests from now on; requests already running keep theirs.
    pub fn reconfigure(&self, upstream: Upstream) {
        self.upstream.store(Arc::new(upstream));
    }

    pub fn drain_timeout(&self) -> Duration {
        self.upstream.load().settings.drain_timeout
    }

    fn report(&self, msg: ProxyToFleet) {
        if self.events.try_send(msg).is_err() {
            tracing::debug!("fleet event queue full; event dropped");
        }
    }

    /// Answers one client request.
    pub async fn handle(&self, req: Request<Incoming>, conn: &ConnInfo) -> Response<Tracked> {
        let upstream = self.upstream.load_full();
        let settings = &upstream.settings;
        let client = conn.client.ip().to_canonical();
        let host_full = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                req.headers()
                    .get(header::HOST)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            });
        let host = host_full.as_deref().map(host_only).unwrap_or_default();
        let log = AccessLog {
            started: Instant::now(),
            client,
            host: host_full.clone().unwrap_or_else(|| "-".into()),
            method: req.method().clone(),
            path: req.uri().path().to_owned(),
            status: 0,
            pool: None,
            instance: None,
            metrics: self.metrics.clone(),
        };
        if req.method() == Method::CONNECT {
            return local(
                StatusCode::METHOD_NOT_ALLOWED,
                "CONNECT is not supported",
                log,
            );
        }
        if conn.kind == ListenerKind::Http && settings.redirect_http {
            return redirect(&req, host_full.as_deref(), log);
        }
        let pool = if settings.is_root_host(&host) {
            if !settings.root_allowed(client) {
                tracing::warn!(%client, host = %host, "root host requested from a client outside root_allow");
                return local(StatusCode::FORBIDDEN, "forbidden", log);
            }
            Pool::Root
        } else {
            match conn.kind {
                ListenerKind::Https => Pool::Https,
                ListenerKind::Http => Pool::Http,
            }
        };
        self.forward(&upstream, req, pool, conn, host_full, log)
            .await
    }

    async fn forward(
        &self,
        upstream: &Upstream,
        mut req: Request<Incoming>,
        pool: Pool,
        conn: &ConnInfo,
        host_full: Option<String>,
        mut log: AccessLog,
    ) -> Response<Tracked> {
        log.pool = Some(pool);
        let client = conn.client.ip();
        let upgrade = if req.version() == Version::HTTP_11 {
            headers::upgrade_protocol(req.headers())
        } else {
            None
        };
        let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
        let (parts, body) = req.into_parts();
        let mut headers = parts.headers;
        headers::strip_hop_by_hop(&mut headers);
        if parts.version == Version::HTTP_2 {
            headers::merge_cookies(&mut headers);
        }
        if let Some(protocol) = &upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, protocol.clone());
        }
        headers::set_forwarded(&mut headers, client, conn.proto(), host_full.as_deref());
        if let Some(host) = host_full
            .as_deref()
            .and_then(|h| HeaderValue::from_str(h).ok())
        {
            headers.insert(header::HOST, host);
        }
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .filter(|p| p.starts_with('/'))
            .unwrap_or("/");
        let body = RequestBody::new(body);
        if parts.version < Version::HTTP_2 && !body.is_empty() && body.hint().exact().is_none() {
            if let Err(e) = body.read_ahead(self.first_chunk_wait).await {
                tracing::debug!(client = %conn.client, error = %e, "bad request body");
                return bad_request(log);
            }
        }
        let replay_after_send = body.is_empty() && is_idempotent(&parts.method);
        let scheme = if pool == Pool::Https { "https" } else { "http" };
        let mut tried = Vec::new();
        let mut client_upgrade = client_upgrade;
        loop {
            let backend = if tried.is_empty() {
                self.router
                    .pick_or_wait(pool, &tried, NO_BACKEND_WAIT)
                    .await
            } else {
                self.router.pick(pool, &tried)
            };
            let Some(backend) = backend else {
                return if tried.is_empty() {
                    tracing::warn!(%pool, "no instance in the pool");
                    local(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "no instance available",
                        log,
                    )
                } else {
                    local(StatusCode::BAD_GATEWAY, "bad gateway", log)
                };
            };
            tried.push(backend.id);
            log.instance = Some(backend.index);
            let in_flight = InFlight::new(backend.clone());
            let uri: Uri = match format!("{scheme}://127.0.0.1:{}{path}", backend.port).parse() {
                Ok(uri) => uri,
                Err(_) => return local(StatusCode::BAD_REQUEST, "bad request target", log),
            };
            let mut up = Request::new(body.attempt());
            *up.method_mut() = parts.method.clone();
            *up.uri_mut() = uri;
            *up.version_mut() = Version::HTTP_11;
            *up.headers_mut() = headers.clone();
            let sent = if pool == Pool::Https {
                upstream.https.request(up)
            } else {
                upstream.http.request(up)
            };
            match tokio::time::timeout(self.response_timeout, sent).await {
                Err(_) => {
                    self.metrics.upstream_error(pool, UpstreamError::Timeout);
                    tracing::warn!(%pool, instance = backend.index, "instance sent no response headers in time");
                    return local(StatusCode::GATEWAY_TIMEOUT, "gateway timeout", log);
                }
                Ok(Ok(resp)) => {
                    backend.count_served();
                    return self
                        .respond(resp, in_flight, client_upgrade.take(), log)
                        .await;
                }
                Ok(Err(e)) if is_client_body_error(&e) => {
                    tracing::debug!(client = %conn.client, error = %error_chain(&e), "bad request body");
                    return bad_request(log);
                }
                Ok(Err(e)) => {
                    let connect = e.is_connect();
                    let reason = error_chain(&e);
                    let kind = if connect {
                        UpstreamError::Connect
                    } else {
                        UpstreamError::Request
                    };
                    self.metrics.upstream_error(pool, kind);
                    if connect {
                        self.router.mark_failed(&backend);
                        self.report(ProxyToFleet::BackendFailed {
                            id: backend.id,
                            reason: reason.clone(),
                        });
                    }
                    let retry = (connect && !body.is_taken()) || replay_after_send;
                    tracing::warn!(%pool, instance = backend.index, id = backend.id, error = %reason, retry, "instance request failed");
                    if !retry {
                        return local(StatusCode::BAD_GATEWAY, "bad gateway", log);
                    }
                }
            }
        }
    }

    async fn respond(
        &self,
        mut resp: Response<Incoming>,
        in_flight: InFlight,
        client_upgrade: Option<OnUpgrade>,
        mut log: AccessLog,
    ) -> Response<Tracked> {
        log.status = resp.status().as_u16();
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let Some(client_upgrade) = client_upgrade else {
                tracing::warn!(
                    instance = in_flight.backend().index,
                    "instance switched protocols unasked"
                );
                return local(StatusCode::BAD_GATEWAY, "bad gateway", log);
            };
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            let (parts, _) = resp.into_parts();
            self.tasks.spawn(tunnel(
                client_upgrade,
                upstream_upgrade,
                in_flight,
                self.hard_stop.clone(),
            ));
            let empty = Empty::new().map_err(|never| match never {}).boxed();
            return Response::from_parts(parts, Tracked::new(empty, None, log));
        }
        let (mut parts, body) = resp.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers);
        let small = body
            .size_hint()
            .exact()
            .is_some_and(|n| n <= SMALL_RESPONSE);
        let body = if small {
            match body.collect().await {
                Ok(collected) => Full::new(collected.to_bytes())
                    .map_err(|never| match never {})
                    .boxed(),
                Err(e) => {
                    let index = in_flight.backend().index;
                    tracing::warn!(instance = index, error = %e, "instance response body failed");
                    return local(StatusCode::BAD_GATEWAY, "bad gateway", log);
                }
            }
        } else {
            body.map_err(Into::into).boxed()
        };
        Response::from_parts(parts, Tracked::new(body, Some(in_flight), log))
    }
}

/// 400 for a request whose body cannot be read; the connection closes after it.
fn bad_request(log: AccessLog) -> Response<Tracked> {
    let mut resp = local(StatusCode::BAD_REQUEST, "bad request", log);
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

fn redirect(req: &Request<Incoming>, host_full: Option<&str>, log: AccessLog) -> Response<Tracked> {
    let Some(host) = host_full.and_then(|h| h.parse::<http::uri::Authority>().ok()) else {
        return local(StatusCode::BAD_REQUEST, "missing Host", log);
    };
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .filter(|p| p.starts_with('/'))
        .unwrap_or("/");
    let location = format!("https://{}{path}", host.host());
    let mut resp = local(StatusCode::PERMANENT_REDIRECT, &location, log);
    match HeaderValue::from_str(&location) {
        Ok(v) => {
            resp.headers_mut().insert(header::LOCATION, v);
        }
        Err(_) => *resp.status_mut() = StatusCode::BAD_REQUEST,
    }
    resp
}

/// Copies bytes both ways between an upgraded client connection and instance connection.
async fn tunnel(
    client: OnUpgrade,
    upstream: OnUpgrade,
    in_flight: InFlight,
    hard_stop: CancellationToken,
) {
    let index = in_flight.backend().index;
    let (client, upstream) = tokio::select! {
        pair = async { tokio::join!(client, upstream) } => pair,
        _ = hard_stop.cancelled() => return,
    };
    let (client, upstream) = match (client, upstream) {
        (Ok(c), Ok(u)) => (c, u),
        (Err(e), _) | (_, Err(e)) => {
            tracing::debug!(instance = index, error = %e, "upgrade did not complete");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut upstream = TokioIo::new(upstream);
    tokio::select! {
        copied = tokio::io::copy_bidirectional(&mut client, &mut upstream) => match copied {
            Ok((up, down)) => tracing::debug!(instance = index, up, down, "tunnel closed"),
            Err(e) => tracing::debug!(instance = index, error = %e, "tunnel ended"),
        },
        _ = hard_stop.cancelled() => tracing::debug!(instance = index, "tunnel cut at drain deadline"),
    }
    drop(in_flight);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_only_drops_port_and_case() {
        assert_eq!(host_only("Root.Localhost:8443"), "root.localhost");
        assert_eq!(host_only("example.com."), "example.com");
        assert_eq!(host_only("[::1]:443"), "[::1]");
    }

    #[test]
    fn idempotent_methods() {
        assert!(is_idempotent(&Method::GET));
        assert!(is_idempotent(&Method::DELETE));
        assert!(!is_idempotent(&Method::POST));
        assert!(!is_idempotent(&Method::PATCH));
    }
}
