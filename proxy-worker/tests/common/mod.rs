//! In-process harness: a fake launcher and fleet worker around `proxy_worker::run`, small
//! hyper backends that answer with their name and the headers they got, and a client.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use protocol::{
    Backend, Channel, FleetToProxy, LauncherToProxy, ListenerKind, ListenerSpec, Pool, ProxyInit,
    ProxySettings, ProxyToFleet, ProxyToLauncher, Routes, TlsMaterial,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

/// Upper bound for anything a test waits for.
pub const DEADLINE: Duration = Duration::from_secs(15);

pub async fn within<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(DEADLINE, f)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

pub fn settings() -> ProxySettings {
    ProxySettings {
        root_host: "root.localhost".into(),
        root_allow: vec!["127.0.0.0/8".into(), "::1/128".into()],
        redirect_http: false,
        https_ca_pem: None,
        drain_timeout_ms: 10_000,
        metrics: None,
        json_logs: false,
    }
}

fn tls_server_config(cert: &rcgen::CertifiedKey) -> Arc<rustls::ServerConfig> {
    let key = rustls::pki_types::PrivateKeyDer::try_from(cert.key_pair.serialize_der()).unwrap();
    Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .unwrap(),
    )
}

type BackendBody = UnsyncBoxBody<Bytes, Infallible>;

/// A small app instance on 127.0.0.1: answers with its name, the request headers and the body
/// size; `/slow` waits for [`TestBackend::release`]; `/sse` sends one event, waits for a
/// release, then a second.
pub struct TestBackend {
    pub name: String,
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    /// One permit per request that reached `/slow` or `/sse`.
    pub entered: Arc<Semaphore>,
    gate: Arc<Semaphore>,
    task: JoinHandle<()>,
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestBackend {
    pub async fn plain(name: &str) -> Self {
        Self::start(name, None).await
    }

    /// TLS with a certificate for `localhost` and `127.0.0.1`, self-signed or by `ca`.
    pub async fn tls(name: &str, ca: Option<&TestCa>) -> Self {
        let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let cert = match ca {
            None => rcgen::generate_simple_self_signed(names).unwrap(),
            Some(ca) => ca.issue(names),
        };
        Self::start(
            name,
            Some(tokio_rustls::TlsAcceptor::from(tls_server_config(&cert))),
        )
        .await
    }

    async fn start(name: &str, tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let entered = Arc::new(Semaphore::new(0));
        let gate = Arc::new(Semaphore::new(0));
        let state = Arc::new((
            name.to_string(),
            hits.clone(),
            entered.clone(),
            gate.clone(),
        ));
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = state.clone();
                let tls = tls.clone();
                conns.spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(answer(req, &state).await) }
                    });
                    let builder = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => {
                            let _ = builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                        Some(acceptor) => {
                            if let Ok(s) = acceptor.accept(stream).await {
                                let _ = builder.serve_connection(TokioIo::new(s), service).await;
                            }
                        }
                    }
                });
                while conns.try_join_next().is_some() {}
            }
        });
        TestBackend {
            name: name.to_string(),
            addr,
            hits,
            entered,
            gate,
            task,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn route(&self, id: u64, pool: Pool, index: u32) -> Backend {
        Backend {
            id,
            pool,
            index,
            port: self.port(),
        }
    }

    /// Lets one waiting `/slow` or `/sse` request go on.
    pub fn release(&self) {
        self.gate.add_permits(1);
    }

    /// Waits until a `/slow` or `/sse` request arrived.
    pub async fn wait_entered(&self) {
        within("a request at the backend", self.entered.acquire())
            .await
            .unwrap()
            .forget();
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

type State = (String, Arc<AtomicUsize>, Arc<Semaphore>, Arc<Semaphore>);

async fn answer(req: Request<Incoming>, state: &State) -> Response<BackendBody> {
    let (name, hits, entered, gate) = state;
    hits.fetch_add(1, Ordering::SeqCst);
    let mut text = format!("{name}\n");
    for (k, v) in req.headers() {
        text.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
    }
    let path = req.uri().path().to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    text.push_str(&format!("body-bytes: {}\n", body.len()));
    match path.as_str() {
        "/slow" => {
            entered.add_permits(1);
            gate.acquire().await.unwrap().forget();
        }
        "/sse" => {
            entered.add_permits(1);
            let gate = gate.clone();
            let events = futures_util::stream::unfold(0u8, move |step| {
                let gate = gate.clone();
                async move {
                    match step {
                        0 => Some((Ok(Frame::data(Bytes::from("data: one\n\n"))), 1)),
                        1 => {
                            gate.acquire().await.unwrap().forget();
                            Some((Ok(Frame::data(Bytes::from("data: two\n\n"))), 2))
                        }
                        _ => None,
                    }
                }
            });
            let mut resp = Response::new(BodyExt::boxed_unsync(StreamBody::new(events)));
            resp.headers_mut()
                .insert("content-type", "text/event-stream".parse().unwrap());
            return resp;
        }
        _ => {}
    }
    Response::new(Full::new(Bytes::from(text)).boxed_unsync())
}

/// A certificate authority for HTTPS instances.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl TestCa {
    pub fn new() -> Self {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        TestCa { cert, key }
    }

    pub fn pem(&self) -> Vec<u8> {
        self.cert.pem().into_bytes()
    }

    fn issue(&self, names: Vec<String>) -> rcgen::CertifiedKey {
        let key_pair = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(names)
            .unwrap()
            .signed_by(&key_pair, &self.cert, &self.key)
            .unwrap();
        rcgen::CertifiedKey { cert, key_pair }
    }
}

/// What a backend echoed.
#[derive(Debug)]
pub struct Echo {
    pub name: String,
    pub lines: Vec<(String, String)>,
}

impl Echo {
    pub fn parse(text: &str) -> Self {
        let mut lines = text.lines();
        let name = lines.next().unwrap_or_default().to_string();
        let lines = lines
            .filter_map(|l| l.split_once(": "))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Echo { name, lines }
    }

    pub fn all(&self, key: &str) -> Vec<&str> {
        self.lines
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.all(key).first().copied()
    }
}

pub type Launcher = Channel<LauncherToProxy, ProxyToLauncher>;
pub type Fleet = Channel<FleetToProxy, ProxyToFleet>;

/// A running proxy worker with a fake launcher and fleet worker around it.
pub struct Harness {
    pub launcher: Launcher,
    pub fleet: Fleet,
    pub http_addr: SocketAddr,
    pub https_addr: SocketAddr,
    /// The proxy's certificate, for clients to trust.
    pub cert_pem: String,
    pub proxy: Option<JoinHandle<Result<(), proxy_worker::Error>>>,
    /// The launcher's own copies of the listening sockets.
    pub listeners: Vec<std::net::TcpListener>,
    /// Every message the fleet side received that a test did not wait for yet.
    pub fleet_seen: Mutex<Vec<ProxyToFleet>>,
    /// The default certificate.
    pub tls: TlsMaterial,
    pub setup: Setup,
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(task) = self.proxy.take() {
            task.abort();
        }
    }
}

/// What a harness starts with besides its two listeners.
pub struct Setup {
    pub settings: ProxySettings,
    pub backends: Vec<Backend>,
    pub tuning: proxy_worker::Tuning,
    /// SNI certificates besides the default one.
    pub certificates: Vec<TlsMaterial>,
}

impl Setup {
    pub fn new(settings: ProxySettings, backends: Vec<Backend>) -> Self {
        Setup {
            settings,
            backends,
            tuning: proxy_worker::Tuning::default(),
            certificates: Vec::new(),
        }
    }
}

/// A proxy worker started on existing listeners: its launcher and fleet ends and its task.
pub struct Worker {
    pub launcher: Launcher,
    pub fleet: Fleet,
    pub proxy: JoinHandle<Result<(), proxy_worker::Error>>,
}

/// Starts a worker on `listeners` (http, https), gives it routes and waits for `Ready`.
pub async fn start_worker(
    listeners: &[std::net::TcpListener],
    tls: &TlsMaterial,
    setup: &Setup,
) -> Worker {
    let (launcher, proxy_end) = Channel::<LauncherToProxy, ProxyToLauncher>::pair().unwrap();
    let proxy = tokio::spawn(proxy_worker::run_tuned(proxy_end, setup.tuning.clone()));
    within("launcher handshake", launcher.handshake())
        .await
        .unwrap();
    let init = ProxyInit {
        certificates: setup.certificates.clone(),
        listeners: vec![
            ListenerSpec {
                kind: ListenerKind::Http,
                addr: listeners[0].local_addr().unwrap().to_string(),
            },
            ListenerSpec {
                kind: ListenerKind::Https,
                addr: listeners[1].local_addr().unwrap().to_string(),
            },
        ],
        tls: Some(tls.clone()),
        settings: setup.settings.clone(),
    };
    launcher
        .send_with_fds(
            &LauncherToProxy::Start(init),
            &[listeners[0].as_fd(), listeners[1].as_fd()],
        )
        .await
        .unwrap();
    let fleet = connect_fleet(&launcher).await;
    fleet
        .send(&FleetToProxy::Routes(Routes {
            generation: 1,
            backends: setup.backends.clone(),
        }))
        .await
        .unwrap();
    let ready = within("Ready", launcher.recv()).await.unwrap().unwrap();
    assert_eq!(ready.msg, ProxyToLauncher::Ready);
    Worker {
        launcher,
        fleet,
        proxy,
    }
}

/// A PEM certificate and key for `names`, self-signed.
pub fn self_signed(names: &[&str]) -> TlsMaterial {
    let cert =
        rcgen::generate_simple_self_signed(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    TlsMaterial {
        cert_chain_pem: cert.cert.pem().into_bytes(),
        key_pem: cert.key_pair.serialize_pem().into_bytes(),
    }
}

impl Harness {
    /// Starts the worker with an http and an https listener and the given routes; returns
    /// once it reported `Ready`.
    pub async fn start(settings: ProxySettings, backends: Vec<Backend>) -> Harness {
        Self::start_with(Setup::new(settings, backends)).await
    }

    pub async fn start_with(setup: Setup) -> Harness {
        let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let https = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let tls = self_signed(&["localhost", "root.localhost"]);
        let listeners = vec![http, https];
        let worker = start_worker(&listeners, &tls, &setup).await;
        Harness {
            launcher: worker.launcher,
            fleet: worker.fleet,
            http_addr: listeners[0].local_addr().unwrap(),
            https_addr: listeners[1].local_addr().unwrap(),
            cert_pem: String::from_utf8(tls.cert_chain_pem.clone()).unwrap(),
            proxy: Some(worker.proxy),
            listeners,
            fleet_seen: Mutex::new(Vec::new()),
            tls,
            setup,
        }
    }

    /// A second worker on the same listeners, as an upgrade starts one.
    pub async fn successor(&self) -> Worker {
        start_worker(&self.listeners, &self.tls, &self.setup).await
    }

    pub async fn routes(&self, generation: u64, backends: Vec<Backend>) {
        self.fleet
            .send(&FleetToProxy::Routes(Routes {
                generation,
                backends,
            }))
            .await
            .unwrap();
        // A stats round trip proves the proxy processed the routes.
        self.stats().await;
    }

    /// The next fleet message matching `pred`; the others are kept in `fleet_seen`.
    pub async fn fleet_until(&self, pred: impl Fn(&ProxyToFleet) -> bool) -> ProxyToFleet {
        {
            let mut seen = self.fleet_seen.lock().unwrap();
            if let Some(pos) = seen.iter().position(&pred) {
                return seen.remove(pos);
            }
        }
        loop {
            let msg = within("a fleet message", self.fleet.recv())
                .await
                .unwrap()
                .expect("fleet channel open")
                .msg;
            if pred(&msg) {
                return msg;
            }
            self.fleet_seen.lock().unwrap().push(msg);
        }
    }

    pub async fn stats(&self) -> Vec<protocol::BackendStats> {
        self.fleet.send(&FleetToProxy::StatsRequest).await.unwrap();
        match self
            .fleet_until(|m| matches!(m, ProxyToFleet::Stats(_)))
            .await
        {
            ProxyToFleet::Stats(s) => s,
            _ => unreachable!(),
        }
    }

    /// A client that trusts the proxy and resolves `localhost`/`root.localhost` to it.
    pub fn client(&self, http1_only: bool) -> reqwest::Client {
        let mut b = reqwest::Client::builder()
            .no_proxy()
            .add_root_certificate(reqwest::Certificate::from_pem(self.cert_pem.as_bytes()).unwrap())
            .resolve("localhost", "127.0.0.1:0".parse().unwrap())
            .resolve("root.localhost", "127.0.0.1:0".parse().unwrap())
            .redirect(reqwest::redirect::Policy::none());
        if http1_only {
            b = b.http1_only();
        }
        b.build().unwrap()
    }

    pub fn http_url(&self, host: &str, path: &str) -> String {
        format!("http://{host}:{}{path}", self.http_addr.port())
    }

    pub fn https_url(&self, host: &str, path: &str) -> String {
        format!("https://{host}:{}{path}", self.https_addr.port())
    }

    /// Sends `Shutdown` and waits for `Drained` and for `run` to return.
    pub async fn shutdown(
        &mut self,
        kind: protocol::ShutdownKind,
    ) -> Result<(), proxy_worker::Error> {
        self.launcher
            .send(&LauncherToProxy::Shutdown(kind))
            .await
            .unwrap();
        self.wait_stopped().await
    }

    pub async fn wait_stopped(&mut self) -> Result<(), proxy_worker::Error> {
        let drained = within("Drained", self.launcher.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(drained.msg, ProxyToLauncher::Drained);
        within("run to return", self.proxy.take().unwrap())
            .await
            .unwrap()
    }
}

/// Hands the worker a new fleet channel through the launcher and handshakes on our end.
pub async fn connect_fleet(launcher: &Launcher) -> Fleet {
    let (ours, theirs) = protocol::fdpass::seqpacket_pair().unwrap();
    launcher
        .send_with_fds(&LauncherToProxy::FleetChannel, &[theirs.as_fd()])
        .await
        .unwrap();
    drop(theirs);
    let fleet = Fleet::new(ours).unwrap();
    within("fleet handshake", fleet.handshake()).await.unwrap();
    fleet
}

/// One HTTP/1.1 request on a raw connection; returns the head and the body
/// (`Content-Length` bodies only).
pub async fn raw_request(stream: &mut tokio::net::TcpStream, request: &str) -> (String, Vec<u8>) {
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = within("a response head", stream.read(&mut chunk))
            .await
            .unwrap();
        assert!(n > 0, "connection closed before a response head");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let mut chunk = [0u8; 4096];
        let n = within("a response body", stream.read(&mut chunk))
            .await
            .unwrap();
        assert!(n > 0, "connection closed inside a body");
        body.extend_from_slice(&chunk[..n]);
    }
    (head, body)
}
