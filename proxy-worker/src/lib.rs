//! The unprivileged proxy worker: terminates TLS on the listeners the launcher hands over,
//! routes each request to an app instance of the right pool, tracks in-flight requests, drains
//! instances on request and closes connections gracefully on shutdown.
//!
//! # Layout
//! - [`run`]: the worker's life: handshake, `Start`, fleet channel, `Ready`, `Shutdown`.
//! - `config`: the launcher's [`protocol::ProxySettings`], parsed for the request path.
//! - `tls`: rustls configurations, for clients and for HTTPS instances on loopback.
//! - `routes`: the routing table (swapped atomically), in-flight and served counters,
//!   least-in-flight selection, drain waits.
//! - `fleet`: the proxy↔fleet channel, replaceable at any time.
//! - `framing`: a watch on HTTP/1 request framing that refuses ambiguous heads.
//! - `server`: accept loops, TLS handshakes, HTTP/1.1 and HTTP/2 connections, graceful close.
//! - `proxy`: one request: pool choice, root access check, header rewriting, safe retries,
//!   streaming, upgrades.
//! - `metrics`: Prometheus counters and the loopback endpoint that serves them.
//! - `headers`, `body`: hop-by-hop and forwarding headers; replayable request bodies and
//!   response bodies that count in-flight time and write the access log.
#![forbid(unsafe_code)]

mod body;
mod config;
mod fleet;
mod framing;
mod headers;
mod metrics;
mod proxy;
mod routes;
mod server;
mod tls;

use std::os::fd::OwnedFd;
use std::sync::Arc;

use protocol::{
    Channel, ChannelError, LauncherToProxy, ListenerKind, ProxyInit, ProxyToLauncher, ShutdownKind,
};
use tokio::sync::mpsc;

pub use config::ConfigError;
pub use proxy::{NO_BACKEND_WAIT, UPSTREAM_RESPONSE_TIMEOUT};
pub use server::HEADER_READ_TIMEOUT;
pub use tls::TlsError;

/// Timeouts the worker is built with. `Default` is what production runs; tests shorten them
/// instead of waiting minutes.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// A client gets this long to send a request head; also the HTTP/1 keep-alive idle limit.
    pub header_read_timeout: std::time::Duration,
    /// An instance gets this long to send response headers before the client gets a 504.
    pub upstream_response_timeout: std::time::Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            header_read_timeout: HEADER_READ_TIMEOUT,
            upstream_response_timeout: UPSTREAM_RESPONSE_TIMEOUT,
        }
    }
}

/// Why the proxy worker stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("launcher channel: {0}")]
    Launcher(#[from] ChannelError),
    #[error("launcher closed the channel before Start")]
    ClosedBeforeStart,
    #[error("expected Start as the launcher's first message, got {got}")]
    Unexpected { got: &'static str },
    #[error("listener {index} ({addr}): {source}")]
    Listener {
        index: usize,
        addr: String,
        source: std::io::Error,
    },
    #[error("https listener {addr} but the launcher sent no TLS material")]
    MissingTls { addr: String },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// The metrics server task, if `[proxy].metrics` is set.
#[derive(Default)]
struct MetricsEndpoint {
    current: Option<(std::net::SocketAddr, tokio_util::sync::CancellationToken)>,
}

impl MetricsEndpoint {
    /// Serves metrics on `addr` from now on (`None`: not at all).
    fn apply(&mut self, addr: Option<std::net::SocketAddr>, proxy: &Arc<proxy::Proxy>) {
        if self.current.as_ref().map(|(a, _)| *a) == addr {
            return;
        }
        if let Some((_, stop)) = self.current.take() {
            stop.cancel();
        }
        if let Some(addr) = addr {
            let stop = tokio_util::sync::CancellationToken::new();
            tokio::spawn(metrics::serve(
                addr,
                proxy.metrics.clone(),
                proxy.router.clone(),
                stop.clone(),
            ));
            self.current = Some((addr, stop));
        }
    }
}

fn message_name(msg: &LauncherToProxy) -> &'static str {
    match msg {
        LauncherToProxy::Start(_) => "Start",
        LauncherToProxy::FleetChannel => "FleetChannel",
        LauncherToProxy::Shutdown(_) => "Shutdown",
        LauncherToProxy::Reconfigure(_) => "Reconfigure",
    }
}

/// Turns the received descriptors into listeners, TLS where the manifest says https.
fn listeners(init: &ProxyInit, fds: Vec<OwnedFd>) -> Result<Vec<server::Listener>, Error> {
    let needs_tls = init
        .listeners
        .iter()
        .find(|l| l.kind == ListenerKind::Https);
    let acceptor = match (needs_tls, &init.tls) {
        (None, _) => None,
        (Some(_), Some(material)) => Some(tokio_rustls::TlsAcceptor::from(tls::server_config(
            material,
            &init.certificates,
        )?)),
        (Some(l), None) => {
            return Err(Error::MissingTls {
                addr: l.addr.clone(),
            })
        }
    };
    init.listeners
        .iter()
        .zip(fds)
        .enumerate()
        .map(|(index, (spec, fd))| {
            let err = |source| Error::Listener {
                index,
                addr: spec.addr.clone(),
                source,
            };
            let std_listener = std::net::TcpListener::from(fd);
            std_listener.set_nonblocking(true).map_err(err)?;
            let socket = tokio::net::TcpListener::from_std(std_listener).map_err(err)?;
            Ok(server::Listener {
                kind: spec.kind,
                addr: spec.addr.clone(),
                socket,
                tls: match spec.kind {
                    ListenerKind::Https => acceptor.clone(),
                    ListenerKind::Http => None,
                },
            })
        })
        .collect()
}

/// Checks a `Start` or `Reconfigure`: settings, TLS material and one listener per manifest
/// entry.
fn prepare(
    init: &ProxyInit,
    fds: Vec<OwnedFd>,
) -> Result<(proxy::Upstream, Vec<server::Listener>), Error> {
    if fds.len() != init.listeners.len() {
        return Err(Error::Launcher(ChannelError::FdCount {
            what: "listener manifest",
            expected: init.listeners.len(),
            got: fds.len(),
        }));
    }
    let settings = config::Settings::from_protocol(&init.settings)?;
    let upstream = proxy::Upstream::new(settings)?;
    Ok((upstream, listeners(init, fds)?))
}

/// Runs the proxy worker until the launcher asks it to stop (or goes away).
///
/// Order: handshake; `Start` with the listening sockets; `FleetChannel`; once the first
/// routing table arrived, accept and report `Ready`; on `Shutdown` (or a closed launcher
/// channel) stop accepting, close connections gracefully, report `Drained` and return.
/// Any time in between: a new `FleetChannel` replaces the old one; `Reconfigure` swaps
/// settings, certificate and listener set for new requests (a bad one is logged and ignored).
pub async fn run(launcher: Channel<ProxyToLauncher, LauncherToProxy>) -> Result<(), Error> {
    run_tuned(launcher, Tuning::default()).await
}

/// [`run`] with other timeouts.
pub async fn run_tuned(
    launcher: Channel<ProxyToLauncher, LauncherToProxy>,
    tuning: Tuning,
) -> Result<(), Error> {
    launcher.handshake().await?;
    let received = launcher.recv().await?.ok_or(Error::ClosedBeforeStart)?;
    let init = match &received.msg {
        LauncherToProxy::Start(init) => init.clone(),
        other => {
            return Err(Error::Unexpected {
                got: message_name(other),
            })
        }
    };
    let (upstream, listeners) = prepare(&init, received.fds)?;
    let mut pending_listeners = Some(listeners);
    let metrics_addr = upstream.settings.metrics;

    let router = Arc::new(routes::Router::default());
    let (events_tx, events_rx) = mpsc::channel(fleet::EVENT_QUEUE);
    let proxy = Arc::new(proxy::Proxy::new(
        upstream,
        router.clone(),
        events_tx,
        tuning.upstream_response_timeout,
        proxy::FIRST_CHUNK_WAIT.min(tuning.header_read_timeout),
    ));
    let server = server::Server::new(proxy.clone(), tuning.header_read_timeout);
    let fleet = fleet::FleetLink::new(router.clone(), events_rx);
    let mut installs = router.installs();
    let mut endpoint = MetricsEndpoint::default();
    endpoint.apply(metrics_addr, &proxy);

    let (kind, result) = loop {
        tokio::select! {
            received = launcher.recv() => match received {
                Ok(Some(r)) => match r.msg {
                    LauncherToProxy::FleetChannel => {
                        if let Err(e) = r.expect_fds("FleetChannel", 1) {
                            tracing::error!(error = %e, "ignoring FleetChannel");
                            continue;
                        }
                        let fd = r.fds.into_iter().next().expect("one descriptor");
                        fleet.connect(fd);
                    }
                    LauncherToProxy::Shutdown(kind) => break (kind, Ok(())),
                    LauncherToProxy::Start(_) => tracing::warn!("ignoring a second Start"),
                    LauncherToProxy::Reconfigure(init) => match prepare(&init, r.fds) {
                        Ok((upstream, listeners)) => {
                            endpoint.apply(upstream.settings.metrics, &proxy);
                            proxy.reconfigure(upstream);
                            match &mut pending_listeners {
                                Some(pending) => *pending = listeners,
                                None => server.start(listeners),
                            }
                            tracing::info!(listeners = init.listeners.len(), "reconfigured");
                        }
                        Err(e) => tracing::error!(error = %e, "reload refused; the previous configuration stays"),
                    },
                },
                Ok(None) => {
                    tracing::info!("launcher channel closed; draining");
                    break (ShutdownKind::Graceful, Ok(()));
                }
                Err(e) => {
                    tracing::error!(error = %e, "launcher channel failed; draining");
                    break (ShutdownKind::Graceful, Err(Error::Launcher(e)));
                }
            },
            first = async { installs.wait_for(|n| *n > 0).await.map(|_| ()) },
                if pending_listeners.is_some() =>
            {
                if first.is_ok() {
                    server.start(pending_listeners.take().unwrap_or_default());
                    if let Err(e) = launcher.send(&ProxyToLauncher::Ready).await {
                        tracing::error!(error = %e, "cannot report Ready; draining");
                        break (ShutdownKind::Graceful, Err(Error::Launcher(e)));
                    }
                    tracing::info!(generation = router.generation(), "ready");
                }
            }
        }
    };
    drop(pending_listeners);
    server.shutdown(kind, proxy.drain_timeout()).await;
    endpoint.apply(None, &proxy);
    fleet.close();
    if let Err(e) = launcher.send(&ProxyToLauncher::Drained).await {
        tracing::debug!(error = %e, "cannot report Drained; the launcher is gone");
    }
    tracing::info!(?kind, "proxy worker stopped");
    result
}
