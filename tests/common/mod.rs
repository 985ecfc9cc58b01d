//! Shared harness for the end-to-end tests: a temp directory with a config and certificate,
//! the real `overwatch` binary started as a user would, `overwatchctl`, real HTTP/TLS clients,
//! and polling with deadlines. Every process a test starts is stopped by its guard's `Drop`.

#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub const OVERWATCH: &str = env!("CARGO_BIN_EXE_overwatch");
pub const OVERWATCHCTL: &str = env!("CARGO_BIN_EXE_overwatchctl");

/// Unprivileged accounts `.ci/run` creates for the privilege-separation tests.
pub const PROXY_USER: &str = "ow-proxy";
pub const APP_USER: &str = "ow-app";
pub const CTL_GROUP: &str = "ow-ctl";
pub const OUTSIDER: &str = "ow-outsider";

/// Polls `check` until it returns `Some`, or panics with `what` at the deadline.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A port that was free a moment ago (bound to port 0, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A disjoint range of instance ports per test process, to avoid collisions between tests.
pub fn port_range(len: u16) -> (u16, u16) {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let slot = NEXT.fetch_add(1, Ordering::SeqCst);
    let base = 20000 + (std::process::id() % 50) as u16 * 200 + slot * 40;
    (base, base + len - 1)
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// True when the privilege-separation accounts exist (CI creates them). Outside CI a test
/// that needs them is skipped with a note; in CI their absence is a failure.
pub fn have_test_users() -> bool {
    let ok = is_root()
        && nix::unistd::User::from_name(PROXY_USER)
            .ok()
            .flatten()
            .is_some()
        && nix::unistd::User::from_name(APP_USER)
            .ok()
            .flatten()
            .is_some();
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run as root with the users {PROXY_USER} and {APP_USER} (see .ci/run)"
        );
        eprintln!("skipped: needs root and the users {PROXY_USER}/{APP_USER} (see .ci/run)");
    }
    ok
}

/// A world-traversable temp directory holding a certificate, the binary, and a config.
pub struct Sandbox {
    pub dir: tempfile::TempDir,
    pub cert_pem: String,
    pub https_port: u16,
    pub http_port: u16,
    pub ports: (u16, u16),
}

impl Sandbox {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("ow-e2e-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let cert = rcgen::generate_simple_self_signed(vec![
            "localhost".into(),
            "127.0.0.1".into(),
            "root.localhost".into(),
        ])
        .unwrap();
        let cert_pem = cert.cert.pem();
        std::fs::write(dir.path().join("cert.pem"), &cert_pem).unwrap();
        std::fs::write(dir.path().join("key.pem"), cert.key_pair.serialize_pem()).unwrap();
        std::fs::set_permissions(
            dir.path().join("key.pem"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        // The app instances run the demo app as an unprivileged user, who may not be able to
        // reach the build directory: give them a copy (a hard link when possible) in here.
        let app_bin = dir.path().join("overwatch-app");
        if std::fs::hard_link(OVERWATCH, &app_bin).is_err() {
            std::fs::copy(OVERWATCH, &app_bin).unwrap();
        }
        std::fs::create_dir(dir.path().join("app")).unwrap();
        std::fs::set_permissions(
            dir.path().join("app"),
            std::fs::Permissions::from_mode(0o777),
        )
        .unwrap();
        Sandbox {
            dir,
            cert_pem,
            https_port: free_port(),
            http_port: free_port(),
            ports: port_range(40),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn socket(&self) -> PathBuf {
        self.path().join("control.sock")
    }

    pub fn app_command(&self) -> String {
        format!("exec {}/overwatch-app demo-app", self.path().display())
    }

    /// A config running the demo app; as root it names the unprivileged test accounts (a
    /// root launcher refuses to run workers as root). `extra` is appended: pass only tables
    /// not written here.
    pub fn config(&self, https: u32, http: u32, root: bool, extra: &str) -> PathBuf {
        let users = is_root();
        let accounts = if users {
            format!("user = \"{PROXY_USER}\"\ngroup = \"{CTL_GROUP}\"\n")
        } else {
            String::new()
        };
        let app_user = if users {
            format!("user = \"{APP_USER}\"\n")
        } else {
            String::new()
        };
        let cmd = self.app_command();
        let text = format!(
            r#"[overwatch]
{accounts}control_socket = "control.sock"
state_dir = "state"

[proxy]
https = ["127.0.0.1:{hp}"]
http = ["127.0.0.1:{p}"]
cert = "cert.pem"
key = "key.pem"

[app]
dir = "app"
{app_user}ports = "{pmin}-{pmax}"

[app.https]
count = {https}
command = "{cmd}"

[app.http]
count = {http}
command = "{cmd}"

[app.root]
enabled = {root}
command = "{cmd}"

[app.backup]
command = "{cmd}"

[health]
path = "/health"
interval = "500ms"
ready_timeout = "10s"
drain_timeout = "5s"
stop_timeout = "2s"
{extra}"#,
            hp = self.https_port,
            p = self.http_port,
            pmin = self.ports.0,
            pmax = self.ports.1,
        );
        let path = self.path().join("overwatch.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    pub fn https_url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.https_port)
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http_port)
    }

    /// A blocking client trusting this sandbox's certificate.
    pub fn client(&self) -> reqwest::blocking::Client {
        reqwest::blocking::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(self.cert_pem.as_bytes()).unwrap())
            .timeout(Duration::from_secs(15))
            .build()
            .unwrap()
    }

    /// Like [`client`](Self::client), but a new connection for every request.
    pub fn fresh_client(&self) -> reqwest::blocking::Client {
        reqwest::blocking::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(self.cert_pem.as_bytes()).unwrap())
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(15))
            .build()
            .unwrap()
    }

    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(OVERWATCHCTL)
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .output()
            .unwrap()
    }

    /// `overwatchctl status --json`, parsed.
    pub fn status(&self) -> Option<serde_json::Value> {
        let out = self.ctl(&["status", "--json"]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Waits until `status` shows `n` instances, all ready.
    pub fn wait_ready(&self, n: usize, timeout: Duration) -> serde_json::Value {
        wait_for(&format!("{n} ready instances"), timeout, || {
            let s = self.status()?;
            let instances = s["instances"].as_array()?;
            (instances.len() == n && instances.iter().all(|i| i["state"] == "ready")).then_some(s)
        })
    }
}

/// A running `overwatch` launcher; stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Launcher {
    pub child: Option<Child>,
    pub pid: i32,
    pub log: PathBuf,
}

impl Launcher {
    pub fn start(args: &[&str], env: &[(&str, &str)], log: PathBuf) -> Self {
        Launcher::start_program(OVERWATCH, args, env, log)
    }

    /// Starts `program` (which must end up exec'ing `overwatch`, keeping its PID).
    pub fn start_program(program: &str, args: &[&str], env: &[(&str, &str)], log: PathBuf) -> Self {
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .env("RUST_LOG", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        let pid = child.id() as i32;
        Launcher {
            child: Some(child),
            pid,
            log,
        }
    }

    pub fn run(sandbox: &Sandbox, config: &Path) -> Self {
        Launcher::start(
            &["run", "--config", config.to_str().unwrap()],
            &[],
            sandbox.path().join("overwatch.log"),
        )
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: Signal) {
        let _ = kill(Pid::from_raw(self.pid), sig);
    }

    /// Waits for the launcher to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("not yet waited");
        let status = wait_for("the launcher to exit", timeout, || {
            child.try_wait().unwrap()
        });
        self.child = None;
        status
    }

    /// The worker process of `role` ("proxy" or "fleet"), by its command line.
    pub fn worker_pid(&self, role: &str) -> Option<i32> {
        children_of(self.pid)
            .into_iter()
            .find(|pid| cmdline(*pid).contains(&format!("worker {role}")))
    }

    pub fn wait_worker(&self, role: &str, not: Option<i32>, timeout: Duration) -> i32 {
        wait_for(&format!("a {role} worker"), timeout, || {
            self.worker_pid(role).filter(|p| Some(*p) != not)
        })
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        let everyone = descendants(self.pid);
        let _ = kill(Pid::from_raw(self.pid), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        for pid in everyone {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        if std::thread::panicking() {
            eprintln!("--- overwatch log ---\n{}", self.log_text());
        }
    }
}

pub fn cmdline(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            String::from_utf8_lossy(&b)
                .split('\0')
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// Parent pid from /proc/PID/stat (the field after the parenthesised command).
pub fn ppid(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

pub fn all_pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

pub fn children_of(parent: i32) -> Vec<i32> {
    all_pids()
        .into_iter()
        .filter(|p| ppid(*p) == Some(parent))
        .collect()
}

/// Every process below `root`, depth first.
pub fn descendants(root: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut stack = vec![root];
    while let Some(p) = stack.pop() {
        for c in children_of(p) {
            out.push(c);
            stack.push(c);
        }
    }
    out
}

pub fn alive(pid: i32) -> bool {
    // A zombie still has a /proc entry; count it as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            let state = s[s.rfind(')').unwrap() + 2..].chars().next().unwrap_or('X');
            state != 'Z' && state != 'X'
        })
        .unwrap_or(false)
}

/// A field of /proc/PID/status, like `Uid` or `CapEff`.
pub fn proc_status(pid: i32, field: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

/// Inodes of the sockets a process holds open.
pub fn socket_inodes(pid: i32) -> Vec<u64> {
    let mut out = Vec::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for e in dir.flatten() {
            if let Ok(target) = std::fs::read_link(e.path()) {
                let t = target.to_string_lossy();
                if let Some(n) = t.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) {
                    out.push(n.parse().unwrap());
                }
            }
        }
    }
    out
}

/// Inode of the TCP socket listening on `addr`, from /proc/net/tcp.
pub fn listening_inode(addr: SocketAddr) -> Option<u64> {
    let SocketAddr::V4(v4) = addr else {
        return None;
    };
    let want = format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(v4.ip().octets()),
        v4.port()
    );
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1) == Some(&want.as_str()) && f.get(3) == Some(&"0A"))
            .then(|| f.get(9)?.parse().ok())
            .flatten()
    })
}
