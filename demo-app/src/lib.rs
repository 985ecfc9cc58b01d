//! The small app `overwatch demo` runs as its instances (`overwatch demo-app`): it says which
//! instance answered, and has a few endpoints the end-to-end tests use.
//!
//! It reads `PORT`, `HOSTNAME`, `OVERWATCH_POOL` and `OVERWATCH_INSTANCE` like any app under
//! Overwatch; the `https` pool serves TLS with a fresh self-signed certificate.
//!
//! | path | answer |
//! |---|---|
//! | `/` | an HTML page naming pool, index, port and pid |
//! | `/whoami` | `pool=… index=… port=… pid=…` as plain text |
//! | `/health` | `ok` |
//! | `/slow?ms=N` | waits N ms, then answers like `/whoami` |
//! | `/headers` | the request headers, one `name: value` a line |
//! | `/echo` | the request body, streamed back |
//! | `/sse?n=N&ms=M` | N server-sent events, M ms apart |
//! | `/upgrade` | `101` for `Upgrade: echo`, then echoes raw bytes |
//! | `/exit` | exits the process with status 3 (crash tests) |
//! | `/sick` | `/health` answers 503 from then on (health-failure tests) |

#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

type Body = BoxBody<Bytes, hyper::Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("PORT is missing or not a port number")]
    Port,
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot make a self-signed certificate: {0}")]
    Cert(String),
}

/// Who this instance is, from its environment.
#[derive(Debug)]
pub struct Identity {
    pub pool: String,
    pub index: String,
    pub port: u16,
    pub pid: u32,
    /// Set by `/sick`: `/health` answers 503 from then on (health-failure tests).
    pub sick: std::sync::atomic::AtomicBool,
}

impl Identity {
    pub fn from_env() -> Result<Self, Error> {
        let port = std::env::var("PORT")
            .ok()
            .and_then(|p| p.parse().ok())
            .ok_or(Error::Port)?;
        Ok(Identity {
            pool: std::env::var("OVERWATCH_POOL").unwrap_or_else(|_| "http".into()),
            index: std::env::var("OVERWATCH_INSTANCE").unwrap_or_else(|_| "0".into()),
            port,
            pid: std::process::id(),
            sick: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn line(&self) -> String {
        format!(
            "pool={} index={} port={} pid={}\n",
            self.pool, self.index, self.port, self.pid
        )
    }
}

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed()
}

fn query_u64(req: &Request<Incoming>, key: &str, default: u64) -> u64 {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(default)
}

async fn handle(id: Arc<Identity>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let text = |s: String| {
        Response::builder()
            .header("content-type", "text/plain; charset=utf-8")
            .header("x-instance", format!("{}-{}", id.pool, id.index))
            .body(full(s))
            .expect("static response")
    };
    let resp = match req.uri().path() {
        "/health" if id.sick.load(std::sync::atomic::Ordering::SeqCst) => Response::builder()
            .status(StatusCode::SERVICE_UNAVAILABLE)
            .body(full("sick\n"))
            .expect("static response"),
        "/health" => text("ok\n".into()),
        "/sick" => {
            id.sick.store(true, std::sync::atomic::Ordering::SeqCst);
            text("health now fails\n".into())
        }
        "/whoami" => text(id.line()),
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(query_u64(&req, "ms", 1000))).await;
            text(id.line())
        }
        "/headers" => {
            let mut out = String::new();
            for (name, value) in req.headers() {
                out.push_str(&format!("{}: {}\n", name, value.to_str().unwrap_or("?")));
            }
            text(out)
        }
        "/echo" => Response::new(req.into_body().boxed()),
        "/sse" => {
            let n = query_u64(&req, "n", 5);
            let ms = query_u64(&req, "ms", 200);
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, hyper::Error>>(4);
            tokio::spawn(async move {
                for i in 0..n {
                    let event = Frame::data(Bytes::from(format!("data: event {i}\n\n")));
                    if tx.send(Ok(event)).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
            });
            let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
            Response::builder()
                .header("content-type", "text/event-stream")
                .header("cache-control", "no-cache")
                .body(BodyExt::boxed(StreamBody::new(stream)))
                .expect("static response")
        }
        "/upgrade" => upgrade_echo(req),
        "/exit" => {
            tokio::spawn(async {
                tokio::time::sleep(Duration::from_millis(10)).await;
                std::process::exit(3);
            });
            text("exiting\n".into())
        }
        "/" => Response::builder()
            .header("content-type", "text/html; charset=utf-8")
            .header("x-instance", format!("{}-{}", id.pool, id.index))
            .body(full(format!(
                "<!doctype html><title>Overwatch demo</title>\
                 <h1>Overwatch demo app</h1>\
                 <p>Answered by the <b>{}</b> instance #{} on port {}, pid {}.</p>\n",
                id.pool, id.index, id.port, id.pid
            )))
            .expect("static response"),
        _ => Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(full("not found\n"))
            .expect("static response"),
    };
    Ok(resp)
}

fn upgrade_echo(mut req: Request<Incoming>) -> Response<Body> {
    let wants = req
        .headers()
        .get(http::header::UPGRADE)
        .map(|v| {
            v.as_bytes().eq_ignore_ascii_case(b"echo")
                || v.as_bytes().eq_ignore_ascii_case(b"websocket")
        })
        .unwrap_or(false);
    if !wants {
        return Response::builder()
            .status(StatusCode::BAD_REQUEST)
            .body(full("expected Upgrade: echo\n"))
            .expect("static response");
    }
    let protocol = req.headers()[http::header::UPGRADE].clone();
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(upgraded) = on_upgrade.await {
            let io = TokioIo::new(upgraded);
            let (mut r, mut w) = tokio::io::split(io);
            let _ = tokio::io::copy(&mut r, &mut w).await;
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(http::header::CONNECTION, "upgrade")
        .header(http::header::UPGRADE, protocol)
        .body(full(Bytes::new()))
        .expect("static response")
}

fn tls_acceptor() -> Result<tokio_rustls::TlsAcceptor, Error> {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .map_err(|e| Error::Cert(e.to_string()))?;
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Cert(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .map_err(|e| Error::Cert(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Serves until the process is signalled. TLS when the pool is `https` or `tls` is set.
pub async fn run(tls: bool) -> Result<(), Error> {
    let id = Arc::new(Identity::from_env()?);
    let tls = tls || id.pool == "https";
    let host = std::env::var("HOSTNAME")
        .ok()
        .and_then(|h| h.parse().ok())
        .unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]));
    let addr = SocketAddr::new(host, id.port);
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })?;
    let acceptor = if tls { Some(tls_acceptor()?) } else { None };
    eprintln!("demo app listening on {addr} ({})", id.line().trim());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("signal handler");
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = term.recv() => {
                eprintln!("demo app: SIGTERM, exiting");
                return Ok(());
            }
        };
        let id = id.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(id.clone(), req));
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            match acceptor {
                Some(acceptor) => {
                    if let Ok(tls) = acceptor.accept(stream).await {
                        let _ = builder
                            .serve_connection_with_upgrades(TokioIo::new(tls), service)
                            .await;
                    }
                }
                None => {
                    let _ = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await;
                }
            }
        });
    }
}
