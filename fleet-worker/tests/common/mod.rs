//! In-process harness: runs the real `fleet_worker::run` in the test's runtime and plays the
//! launcher and the proxy around it over real seqpacket channels. App instances are real
//! processes (a tiny Python HTTP server); every process group the fleet reports is killed
//! when the harness drops, even when the test fails.
#![allow(dead_code)]

use std::collections::HashSet;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use protocol::ctl::CtlStream;
use protocol::{
    AppSettings, BackendStats, Channel, CtlRequest, CtlResponse, FleetInit, FleetState,
    FleetToLauncher, FleetToProxy, HealthSettings, InstanceId, LauncherToFleet, ListenerKind,
    ListenerSpec, Pool, PoolSettings, ProxyToFleet, Routes, ShutdownKind, StatusReport,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::task::JoinHandle;

pub const SERVER: &str = r#"
import http.server, os, signal, ssl, sys
env = os.environ
if env.get("IGNORE_TERM") == "1":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path != "/health":
            print("GET " + self.path, flush=True)
        body = ("pool=%s instance=%s port=%s\n" % (env["OVERWATCH_POOL"], env["OVERWATCH_INSTANCE"], env["PORT"])).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", int(env["PORT"])), H)
if env["OVERWATCH_POOL"] == "https":
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(env["TEST_CERT"], env["TEST_KEY"])
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
print("started pool=%s instance=%s port=%s hostname=%s host=%s app_env=%s" % (
    env["OVERWATCH_POOL"], env["OVERWATCH_INSTANCE"], env["PORT"], env["HOSTNAME"], env["HOST"],
    env.get("APP_ENV", "-")), flush=True)
server.serve_forever()
"#;

/// The real interpreter behind `python3` (skips pyenv-style shims, which start slowly).
pub fn python() -> &'static str {
    static PYTHON: OnceLock<String> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let out = std::process::Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .expect("python3 is needed for the fleet-worker harness tests");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    })
}

pub struct Config {
    pub https: u32,
    pub http: u32,
    pub root: bool,
    /// `{server}` is replaced by `python3 <path of the server script>`.
    pub command: String,
    pub http_command: Option<String>,
    pub backup: Option<String>,
    pub env: Vec<(String, String)>,
    pub ports: (u16, u16),
    pub ready_timeout_ms: u64,
    pub stop_timeout_ms: u64,
    pub interval_ms: u64,
    /// How long the simulated proxy takes to answer `Drain`.
    pub drain_delay: Duration,
    /// `[app].dir`; the harness's temp directory when `None`.
    pub app_dir: Option<PathBuf>,
    /// `[deploy]`; commands that do nothing, backups in `state/backup` when `None`.
    pub deploy: Option<protocol::DeploySettings>,
}

impl Config {
    pub fn new(ports: (u16, u16)) -> Self {
        Config {
            https: 0,
            http: 1,
            root: false,
            command: "exec {server}".into(),
            http_command: None,
            backup: None,
            env: vec![("APP_ENV".into(), "from-app-env".into())],
            ports,
            ready_timeout_ms: 10_000,
            stop_timeout_ms: 2_000,
            interval_ms: 500,
            drain_delay: Duration::ZERO,
            app_dir: None,
            deploy: None,
        }
    }
}

#[derive(Default, Debug)]
pub struct Recorded {
    pub routes: Vec<Routes>,
    pub states: Vec<FleetState>,
    pub status_lines: Vec<String>,
    pub ready: bool,
    pub stopped: bool,
    pub drains: Vec<InstanceId>,
    /// `Upgrade`/`Reload` requests, answered with `Answer { ok: true }`.
    pub asks: Vec<FleetToLauncher>,
}

impl Recorded {
    pub fn last_routes(&self) -> Option<&Routes> {
        self.routes.last()
    }

    pub fn backends(&self, pool: Pool) -> Vec<protocol::Backend> {
        self.last_routes()
            .map(|r| {
                r.backends
                    .iter()
                    .filter(|b| b.pool == pool)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }
}

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub control_path: PathBuf,
    pub launcher: Arc<Channel<LauncherToFleet, FleetToLauncher>>,
    pub rec: Arc<Mutex<Recorded>>,
    pub fleet: Option<JoinHandle<Result<(), fleet_worker::Error>>>,
    pgids: Arc<Mutex<HashSet<i32>>>,
    tasks: Vec<JoinHandle<()>>,
    /// Backends in the routes once every configured instance is ready.
    expected_backends: usize,
}

impl Harness {
    pub async fn start(cfg: Config) -> Harness {
        Self::start_with_state(cfg, None).await
    }

    pub async fn start_with_state(cfg: Config, state: Option<FleetState>) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("server.py");
        std::fs::write(&script, SERVER).unwrap();
        let (cert, key) = write_cert(dir.path());
        let server = format!("{} {}", python(), script.display());
        let command = cfg.command.replace("{server}", &server);
        let pool = |count: u32, command: &str| PoolSettings {
            count,
            command: command.to_string(),
            backup: cfg.backup.as_ref().map(|b| b.replace("{server}", &server)),
        };
        let mut env = cfg.env.clone();
        env.push(("TEST_CERT".into(), cert.display().to_string()));
        env.push(("TEST_KEY".into(), key.display().to_string()));
        let http_command = cfg
            .http_command
            .as_ref()
            .map(|c| c.replace("{server}", &server));
        let init = FleetInit {
            app: AppSettings {
                dir: cfg
                    .app_dir
                    .as_deref()
                    .unwrap_or(dir.path())
                    .display()
                    .to_string(),
                port_min: cfg.ports.0,
                port_max: cfg.ports.1,
                env,
                https: pool(cfg.https, &command),
                http: pool(cfg.http, http_command.as_deref().unwrap_or(&command)),
                root_enabled: cfg.root,
                root: pool(1, &command),
            },
            health: HealthSettings {
                path: "/health".into(),
                interval_ms: cfg.interval_ms,
                ready_timeout_ms: cfg.ready_timeout_ms,
                drain_timeout_ms: 5_000,
                stop_timeout_ms: cfg.stop_timeout_ms,
            },
            state_dir: dir.path().join("state").display().to_string(),
            control_gid: None,
            control_socket_path: dir.path().join("control.sock").display().to_string(),
            listeners: vec![ListenerSpec {
                kind: ListenerKind::Http,
                addr: "127.0.0.1:8080".into(),
            }],
            launcher_pid: std::process::id() as i32,
            launcher_started_unix_ms: 1,
            state,
            deploy: cfg.deploy.clone().unwrap_or(protocol::DeploySettings {
                build_dir: ".next".into(),
                backup_dir: dir.path().join("state/backup").display().to_string(),
                pull: "git pull --ff-only".into(),
                build: "true".into(),
                install: "true".into(),
                persistent: false,
                delete_old: true,
                keep: 5,
            }),
            log: protocol::LogSettings {
                json: false,
                max_size: 10 << 20,
                keep: 5,
            },
            upgrades: 0,
        };
        let expected_backends = (cfg.https + cfg.http + u32::from(cfg.root)) as usize;
        let control_path = dir.path().join("control.sock");
        let listener = std::os::unix::net::UnixListener::bind(&control_path).unwrap();

        let (launcher, fleet_end) = Channel::<LauncherToFleet, FleetToLauncher>::pair().unwrap();
        let fleet = tokio::spawn(fleet_worker::run(fleet_end));
        launcher.handshake().await.unwrap();
        launcher
            .send_with_fds(&LauncherToFleet::Start(init), &[listener.as_fd()])
            .await
            .unwrap();
        drop(listener);

        let rec = Arc::new(Mutex::new(Recorded::default()));
        let pgids = Arc::new(Mutex::new(HashSet::new()));
        let launcher = Arc::new(launcher);
        let mut h = Harness {
            dir,
            control_path,
            launcher: launcher.clone(),
            rec: rec.clone(),
            fleet: Some(fleet),
            pgids: pgids.clone(),
            tasks: Vec::new(),
            expected_backends,
        };
        h.tasks.push(tokio::spawn(async move {
            while let Ok(Some(received)) = launcher.recv().await {
                if let FleetToLauncher::Upgrade { .. } | FleetToLauncher::Reload = received.msg {
                    let message = format!("test launcher: {:?} accepted", received.msg);
                    rec.lock().unwrap().asks.push(received.msg);
                    let _ = launcher
                        .send(&LauncherToFleet::Answer { ok: true, message })
                        .await;
                    continue;
                }
                let mut rec = rec.lock().unwrap();
                match received.msg {
                    FleetToLauncher::Ready => rec.ready = true,
                    FleetToLauncher::Status(line) => rec.status_lines.push(line),
                    FleetToLauncher::State(state) => {
                        pgids
                            .lock()
                            .unwrap()
                            .extend(state.instances.iter().map(|i| i.pgid));
                        rec.states.push(state);
                    }
                    FleetToLauncher::Stopped => rec.stopped = true,
                    FleetToLauncher::Upgrade { .. } | FleetToLauncher::Reload => {}
                }
            }
        }));
        h.connect_proxy(cfg.drain_delay).await;
        h
    }

    /// Hands the fleet a new proxy channel and plays the proxy on it: records routes,
    /// answers `Drain` after `drain_delay` and `StatsRequest` with served = 7 per backend.
    pub async fn connect_proxy(&mut self, drain_delay: Duration) {
        let (ours, theirs) = protocol::fdpass::seqpacket_pair().unwrap();
        self.launcher
            .send_with_fds(&LauncherToFleet::ProxyChannel, &[theirs.as_fd()])
            .await
            .unwrap();
        drop(theirs);
        let proxy = Arc::new(Channel::<ProxyToFleet, FleetToProxy>::new(ours).unwrap());
        proxy.handshake().await.unwrap();
        let rec = self.rec.clone();
        self.tasks.push(tokio::spawn(async move {
            while let Ok(Some(received)) = proxy.recv().await {
                match received.msg {
                    FleetToProxy::Routes(routes) => rec.lock().unwrap().routes.push(routes),
                    FleetToProxy::Drain { id, .. } => {
                        rec.lock().unwrap().drains.push(id);
                        let proxy = proxy.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(drain_delay).await;
                            let _ = proxy
                                .send(&ProxyToFleet::Drained {
                                    id,
                                    in_flight_left: 0,
                                })
                                .await;
                        });
                    }
                    FleetToProxy::StatsRequest => {
                        let stats: Vec<BackendStats> = rec
                            .lock()
                            .unwrap()
                            .last_routes()
                            .map(|r| {
                                r.backends
                                    .iter()
                                    .map(|b| BackendStats {
                                        id: b.id,
                                        in_flight: 1,
                                        served: 7,
                                    })
                                    .collect()
                            })
                            .unwrap_or_default();
                        let _ = proxy.send(&ProxyToFleet::Stats(stats)).await;
                    }
                }
            }
        }));
    }

    /// Polls `f` on the recorded messages until it returns `Some`, at most `timeout`.
    pub async fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&Recorded) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = f(&self.rec.lock().unwrap()) {
                return v;
            }
            if Instant::now() > deadline {
                let rec = self.rec.lock().unwrap();
                panic!(
                    "timed out after {timeout:?} waiting for {what}\nstatus lines: {:?}\nlast routes: {:?}\nlogs:\n{}",
                    rec.status_lines,
                    rec.last_routes(),
                    self.all_logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for `Ready` and for the proxy to have seen every configured instance (the two
    /// travel on different channels).
    pub async fn wait_ready(&self) {
        let want = self.expected_backends;
        self.wait_for("Ready", Duration::from_secs(20), |r| {
            let routed = r.last_routes().map_or(0, |routes| routes.backends.len());
            (r.ready && routed == want).then_some(())
        })
        .await;
    }

    pub fn log_path(&self, name: &str) -> PathBuf {
        self.dir
            .path()
            .join("state/logs")
            .join(format!("{name}.log"))
    }

    pub fn all_logs(&self) -> String {
        let mut out = String::new();
        if let Ok(entries) = std::fs::read_dir(self.dir.path().join("state/logs")) {
            for entry in entries.flatten() {
                out.push_str(&format!("== {}\n", entry.path().display()));
                out.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
            }
        }
        out
    }

    pub async fn ctl(&self) -> CtlStream<CtlRequest, CtlResponse> {
        let stream = UnixStream::connect(&self.control_path).await.unwrap();
        CtlStream::handshake(stream).await.unwrap().0
    }

    /// Sends `request` on a new connection and collects every response up to the final
    /// `Status`, `Done` or `Refused`.
    pub async fn request(&self, request: CtlRequest) -> Vec<CtlResponse> {
        let mut ctl = self.ctl().await;
        ctl.send(&request).await.unwrap();
        collect(&mut ctl).await
    }

    pub async fn status(&self) -> StatusReport {
        match self.request(CtlRequest::Status).await.pop() {
            Some(CtlResponse::Status(report)) => report,
            other => panic!("expected a status report, got {other:?}"),
        }
    }

    /// Sends `Shutdown(kind)` and waits for `run` to return; checks `Stopped` was sent.
    pub async fn shutdown(&mut self, kind: ShutdownKind) {
        self.launcher
            .send(&LauncherToFleet::Shutdown(kind))
            .await
            .unwrap();
        let fleet = self.fleet.take().unwrap();
        let result = tokio::time::timeout(Duration::from_secs(30), fleet)
            .await
            .expect("run did not return after Shutdown")
            .unwrap();
        result.unwrap();
        self.wait_for("Stopped", Duration::from_secs(5), |r| {
            r.stopped.then_some(())
        })
        .await;
    }
}

impl Harness {
    /// Leaves the instances running when the harness drops (for a successor to adopt).
    pub fn forget_processes(&self) {
        self.pgids.lock().unwrap().clear();
    }

    /// The process groups seen in `State` messages.
    pub fn known_pgids(&self) -> Vec<i32> {
        self.pgids.lock().unwrap().iter().copied().collect()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(fleet) = self.fleet.take() {
            fleet.abort();
        }
        for task in &self.tasks {
            task.abort();
        }
        for pgid in self.pgids.lock().unwrap().iter() {
            if *pgid > 1 {
                let _ = killpg(Pid::from_raw(*pgid), Signal::SIGKILL);
            }
        }
    }
}

/// Reads responses until the final one of a request.
pub async fn collect(ctl: &mut CtlStream<CtlRequest, CtlResponse>) -> Vec<CtlResponse> {
    let mut out = Vec::new();
    loop {
        let next = tokio::time::timeout(Duration::from_secs(60), ctl.recv())
            .await
            .expect("no control response within 60 s")
            .unwrap();
        let Some(response) = next else { return out };
        let last = matches!(
            response,
            CtlResponse::Status(_) | CtlResponse::Done { .. } | CtlResponse::Refused(_)
        );
        out.push(response);
        if last {
            return out;
        }
    }
}

/// A self-signed certificate for the HTTPS instances.
fn write_cert(dir: &Path) -> (PathBuf, PathBuf) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.key_pair.serialize_pem()).unwrap();
    (cert, key)
}

/// A plain HTTP/1.0 GET to an instance; the response body.
pub async fn get(port: u16, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string()
}

pub fn port_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

pub fn group_alive(pgid: i32) -> bool {
    killpg(Pid::from_raw(pgid), None::<Signal>).is_ok()
}

/// Polls a plain condition with a deadline.
pub async fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether every process left in group `pgid` is a zombie waiting to be reaped (killed
/// already; whoever is its parent has not collected it yet).
pub fn zombie_only(pgid: i32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    for entry in entries.flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // fields[0] = state, [1] = ppid, [2] = pgrp
        if fields.get(2) == Some(&pgid.to_string().as_str()) && fields.first() != Some(&"Z") {
            return false;
        }
    }
    true
}
