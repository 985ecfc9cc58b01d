//! Prometheus text metrics: counters kept with atomics on the request path, rendered on demand
//! by a small HTTP server on the loopback address `[proxy].metrics`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use protocol::{ListenerKind, Pool};
use tokio_util::sync::CancellationToken;

use crate::routes::Router;

/// Upper bounds of the latency histogram buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Pool labels: the three pools, and `-` for answers the proxy gave itself (403, 308…).
const POOLS: [&str; 4] = ["https", "http", "root", "-"];
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
const LISTENERS: [&str; 2] = ["https", "http"];
/// A metrics port held by the worker being replaced is retried this often.
const BIND_RETRY: Duration = Duration::from_secs(1);

/// Why an instance request failed.
#[derive(Debug, Clone, Copy)]
pub enum UpstreamError {
    Connect = 0,
    Request = 1,
    Timeout = 2,
}
const UPSTREAM_ERRORS: [&str; 3] = ["connect", "request", "timeout"];

fn pool_slot(pool: Option<Pool>) -> usize {
    match pool {
        Some(Pool::Https) => 0,
        Some(Pool::Http) => 1,
        Some(Pool::Root) => 2,
        None => 3,
    }
}

fn listener_slot(kind: ListenerKind) -> usize {
    match kind {
        ListenerKind::Https => 0,
        ListenerKind::Http => 1,
    }
}

#[derive(Default, Debug)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

/// Every counter the proxy keeps.
#[derive(Default, Debug)]
pub struct Metrics {
    requests: [[AtomicU64; CLASSES.len()]; POOLS.len()],
    latency: [Histogram; POOLS.len()],
    upstream_errors: [[AtomicU64; UPSTREAM_ERRORS.len()]; POOLS.len()],
    tls_ok: AtomicU64,
    tls_failed: AtomicU64,
    connections: [AtomicU64; LISTENERS.len()],
    open: [AtomicI64; LISTENERS.len()],
}

impl Metrics {
    /// One request answered (its response ended, or was abandoned).
    pub fn request(&self, pool: Option<Pool>, status: u16, elapsed: Duration) {
        let p = pool_slot(pool);
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.requests[p][class].fetch_add(1, Ordering::Relaxed);
        let h = &self.latency[p];
        let secs = elapsed.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|&b| secs <= b) {
            h.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        h.count.fetch_add(1, Ordering::Relaxed);
        h.sum_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn upstream_error(&self, pool: Pool, kind: UpstreamError) {
        self.upstream_errors[pool_slot(Some(pool))][kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn tls_handshake(&self, ok: bool) {
        let counter = if ok { &self.tls_ok } else { &self.tls_failed };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a client connection as open until the guard is dropped.
    pub fn connection(self: &Arc<Self>, kind: ListenerKind) -> ConnectionGuard {
        let slot = listener_slot(kind);
        self.connections[slot].fetch_add(1, Ordering::Relaxed);
        self.open[slot].fetch_add(1, Ordering::Relaxed);
        ConnectionGuard {
            metrics: self.clone(),
            slot,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self, router: &Router) -> String {
        let mut out = String::with_capacity(8 * 1024);
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        out.push_str("# HELP overwatch_proxy_requests_total Requests answered, by pool and status class.\n# TYPE overwatch_proxy_requests_total counter\n");
        for (p, pool) in POOLS.iter().enumerate() {
            for (c, class) in CLASSES.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "overwatch_proxy_requests_total{{pool=\"{pool}\",class=\"{class}\"}} {}",
                    load(&self.requests[p][c])
                );
            }
        }
        out.push_str("# HELP overwatch_proxy_request_duration_seconds Time from request head to the end of the response.\n# TYPE overwatch_proxy_request_duration_seconds histogram\n");
        for (p, pool) in POOLS.iter().enumerate() {
            let h = &self.latency[p];
            let mut cumulative = 0;
            for (i, bound) in BUCKETS.iter().enumerate() {
                cumulative += load(&h.buckets[i]);
                let _ = writeln!(
                    out,
                    "overwatch_proxy_request_duration_seconds_bucket{{pool=\"{pool}\",le=\"{bound}\"}} {cumulative}"
                );
            }
            let count = load(&h.count);
            let _ = writeln!(
                out,
                "overwatch_proxy_request_duration_seconds_bucket{{pool=\"{pool}\",le=\"+Inf\"}} {count}\n\
                 overwatch_proxy_request_duration_seconds_sum{{pool=\"{pool}\"}} {}\n\
                 overwatch_proxy_request_duration_seconds_count{{pool=\"{pool}\"}} {count}",
                load(&h.sum_micros) as f64 / 1e6
            );
        }
        out.push_str("# HELP overwatch_proxy_in_flight Requests in flight per instance.\n# TYPE overwatch_proxy_in_flight gauge\n");
        out.push_str("# HELP overwatch_proxy_served_total Requests an instance answered.\n# TYPE overwatch_proxy_served_total counter\n");
        let mut backends = router.backends();
        backends.sort_by_key(|b| b.id);
        for b in &backends {
            let labels = format!(
                "pool=\"{}\",instance=\"{}\",id=\"{}\"",
                b.pool.name(),
                b.index,
                b.id
            );
            let _ = writeln!(
                out,
                "overwatch_proxy_in_flight{{{labels}}} {}\noverwatch_proxy_served_total{{{labels}}} {}",
                b.in_flight(),
                b.served()
            );
        }
        out.push_str("# HELP overwatch_proxy_upstream_errors_total Failed instance requests, by pool and kind.\n# TYPE overwatch_proxy_upstream_errors_total counter\n");
        for (p, pool) in POOLS[..3].iter().enumerate() {
            for (k, kind) in UPSTREAM_ERRORS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "overwatch_proxy_upstream_errors_total{{pool=\"{pool}\",kind=\"{kind}\"}} {}",
                    load(&self.upstream_errors[p][k])
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP overwatch_proxy_tls_handshakes_total TLS handshakes with clients, by result.\n\
             # TYPE overwatch_proxy_tls_handshakes_total counter\n\
             overwatch_proxy_tls_handshakes_total{{result=\"ok\"}} {}\n\
             overwatch_proxy_tls_handshakes_total{{result=\"failed\"}} {}",
            load(&self.tls_ok),
            load(&self.tls_failed)
        );
        out.push_str("# HELP overwatch_proxy_connections_total Client connections accepted.\n# TYPE overwatch_proxy_connections_total counter\n");
        for (i, l) in LISTENERS.iter().enumerate() {
            let _ = writeln!(
                out,
                "overwatch_proxy_connections_total{{listener=\"{l}\"}} {}",
                load(&self.connections[i])
            );
        }
        out.push_str("# HELP overwatch_proxy_connections_open Client connections open now.\n# TYPE overwatch_proxy_connections_open gauge\n");
        for (i, l) in LISTENERS.iter().enumerate() {
            let _ = writeln!(
                out,
                "overwatch_proxy_connections_open{{listener=\"{l}\"}} {}",
                self.open[i].load(Ordering::Relaxed)
            );
        }
        out
    }
}

/// One open client connection.
pub struct ConnectionGuard {
    metrics: Arc<Metrics>,
    slot: usize,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.metrics.open[self.slot].fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("[proxy].metrics {addr:?} is not an IP address and port")]
    Address { addr: String },
    #[error("[proxy].metrics {addr} is not a loopback address")]
    NotLoopback { addr: SocketAddr },
}

/// Parses `[proxy].metrics`: loopback only, metrics are not for the network.
pub fn parse_address(addr: &str) -> Result<SocketAddr, MetricsError> {
    let parsed: SocketAddr = addr.parse().map_err(|_| MetricsError::Address {
        addr: addr.to_owned(),
    })?;
    if !parsed.ip().to_canonical().is_loopback() {
        return Err(MetricsError::NotLoopback { addr: parsed });
    }
    Ok(parsed)
}

fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // The worker being replaced holds the port until it exits; both serve meanwhile.
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(64)
}

/// The metrics endpoint: binds `addr` (retrying while it is taken) and answers `GET /metrics`
/// until `stop`.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    router: Arc<Router>,
    stop: CancellationToken,
) {
    let listener = loop {
        match bind(addr) {
            Ok(l) => break l,
            Err(e) => {
                tracing::warn!(%addr, error = %e, "cannot bind the metrics address; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(BIND_RETRY) => {}
                }
            }
        }
    };
    tracing::info!(%addr, "serving metrics");
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::debug!(error = %e, "metrics accept failed");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    }
                }
            },
        };
        let (metrics, router, stop) = (metrics.clone(), router.clone(), stop.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let resp = if req.method() == Method::GET && req.uri().path() == "/metrics" {
                    let mut r = Response::new(Full::new(Bytes::from(metrics.render(&router))));
                    r.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("text/plain; version=0.0.4"),
                    );
                    r
                } else {
                    let mut r = Response::new(Full::new(Bytes::from_static(b"not found\n")));
                    *r.status_mut() = StatusCode::NOT_FOUND;
                    r
                };
                async move { Ok::<_, std::convert::Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_addresses() {
        assert!(parse_address("127.0.0.1:9100").is_ok());
        assert!(parse_address("[::1]:9100").is_ok());
        assert!(matches!(
            parse_address("0.0.0.0:9100"),
            Err(MetricsError::NotLoopback { .. })
        ));
        assert!(parse_address("localhost:9100").is_err());
    }

    #[test]
    fn render_counts_and_buckets() {
        let m = Metrics::default();
        m.request(Some(Pool::Http), 204, Duration::from_millis(3));
        m.request(None, 403, Duration::from_millis(30));
        m.upstream_error(Pool::Https, UpstreamError::Connect);
        m.tls_handshake(true);
        let text = m.render(&Router::default());
        assert!(text.contains("overwatch_proxy_requests_total{pool=\"http\",class=\"2xx\"} 1"));
        assert!(text.contains("overwatch_proxy_requests_total{pool=\"-\",class=\"4xx\"} 1"));
        assert!(text.contains(
            "overwatch_proxy_request_duration_seconds_bucket{pool=\"http\",le=\"0.001\"} 0"
        ));
        assert!(text.contains(
            "overwatch_proxy_request_duration_seconds_bucket{pool=\"http\",le=\"0.005\"} 1"
        ));
        assert!(text.contains("overwatch_proxy_request_duration_seconds_count{pool=\"http\"} 1"));
        assert!(text
            .contains("overwatch_proxy_upstream_errors_total{pool=\"https\",kind=\"connect\"} 1"));
        assert!(text.contains("overwatch_proxy_tls_handshakes_total{result=\"ok\"} 1"));
    }
}
