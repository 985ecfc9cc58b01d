//! Every message that crosses a process boundary: one enum per direction per channel, and
//! the settings and state they carry. Variants are append-only.

use serde::{Deserialize, Serialize};

/// A stable identifier for one app instance, unique for the life of the launcher.
pub type InstanceId = u64;

/// The three kinds of app instance, in rolling-restart order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pool {
    Https,
    Http,
    Root,
}

impl Pool {
    pub const ALL: [Pool; 3] = [Pool::Https, Pool::Http, Pool::Root];

    pub fn name(self) -> &'static str {
        match self {
            Pool::Https => "https",
            Pool::Http => "http",
            Pool::Root => "root",
        }
    }
}

impl std::fmt::Display for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How a worker is asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShutdownKind {
    /// Stop accepting, finish in-flight work (bounded by `drain_timeout`), stop instances.
    Graceful,
    /// Like `Graceful`, but leave app instances running for a successor to adopt.
    Upgrade,
    /// Close everything now.
    Fast,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerKind {
    Https,
    Http,
}

/// One entry of the listener manifest; the descriptor travels in the same message, by position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerSpec {
    pub kind: ListenerKind,
    pub addr: String,
}

/// Certificate chain and private key, read by the launcher (root-only files).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsMaterial {
    pub cert_chain_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("cert_chain_pem", &self.cert_chain_pem.len())
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxySettings {
    /// Requests whose Host is this go to the root instance…
    pub root_host: String,
    /// …from these client networks only (CIDR strings, validated by the launcher).
    pub root_allow: Vec<String>,
    /// Answer port-80 requests with 308 to https.
    pub redirect_http: bool,
    /// Verify HTTPS instances against this CA; `None`: accept their local certificate.
    pub https_ca_pem: Option<Vec<u8>>,
    pub drain_timeout_ms: u64,
    /// Loopback address for Prometheus text metrics (`[proxy].metrics`); `None`: off.
    pub metrics: Option<String>,
    /// Access-log lines as JSON (`[log].format = "json"`).
    pub json_logs: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyInit {
    /// Manifest of the listening sockets attached to this message, in order.
    pub listeners: Vec<ListenerSpec>,
    /// Present when there is at least one https listener: the default certificate.
    pub tls: Option<TlsMaterial>,
    /// More certificates, chosen by SNI among the names each one holds (`[[proxy.certificates]]`).
    pub certificates: Vec<TlsMaterial>,
    pub settings: ProxySettings,
}

/// Launcher → proxy worker.
// Sent a few times per process lifetime: boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LauncherToProxy {
    /// Descriptors: one listening socket per `listeners` entry, in order.
    Start(ProxyInit),
    /// Descriptors: exactly one, this worker's end of a new proxy↔fleet channel.
    FleetChannel,
    Shutdown(ShutdownKind),
    /// A reload: new settings and certificates. Descriptors: one listening socket per
    /// `listeners` entry, in order (the full new set; listeners not in it are closed).
    Reconfigure(ProxyInit),
}

/// Proxy worker → launcher.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProxyToLauncher {
    /// Serving the listeners with a routing table.
    Ready,
    /// Every connection is closed; the worker exits next.
    Drained,
}

/// A ready instance the proxy may send requests to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backend {
    pub id: InstanceId,
    pub pool: Pool,
    pub index: u32,
    pub port: u16,
}

/// The whole set of instances in rotation; replaces the previous one atomically.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Routes {
    pub generation: u64,
    pub backends: Vec<Backend>,
}

/// Fleet worker → proxy worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FleetToProxy {
    Routes(Routes),
    /// Send nothing new to `id`; answer `Drained` when its in-flight count is zero or
    /// `timeout_ms` has passed.
    Drain {
        id: InstanceId,
        timeout_ms: u64,
    },
    /// Ask for a [`ProxyToFleet::Stats`] answer.
    StatsRequest,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendStats {
    pub id: InstanceId,
    pub in_flight: u64,
    pub served: u64,
}

/// Proxy worker → fleet worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProxyToFleet {
    Drained {
        id: InstanceId,
        in_flight_left: u64,
    },
    /// Connecting to the instance failed; the request went elsewhere.
    BackendFailed {
        id: InstanceId,
        reason: String,
    },
    Stats(Vec<BackendStats>),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolSettings {
    pub count: u32,
    pub command: String,
    /// Started in place of an instance whose command does not become ready.
    pub backup: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppSettings {
    pub dir: String,
    /// Inclusive port range for instances.
    pub port_min: u16,
    pub port_max: u16,
    pub env: Vec<(String, String)>,
    pub https: PoolSettings,
    pub http: PoolSettings,
    pub root_enabled: bool,
    pub root: PoolSettings,
}

impl AppSettings {
    pub fn pool(&self, pool: Pool) -> &PoolSettings {
        match pool {
            Pool::Https => &self.https,
            Pool::Http => &self.http,
            Pool::Root => &self.root,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthSettings {
    pub path: String,
    pub interval_ms: u64,
    pub ready_timeout_ms: u64,
    pub drain_timeout_ms: u64,
    pub stop_timeout_ms: u64,
}

/// `[deploy]`: how the fleet worker pulls, builds and keeps releases.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploySettings {
    /// The build output the instances read (`.next`), relative to the app directory.
    pub build_dir: String,
    /// Where backups go, an absolute path (`<state_dir>/<backup_dir>`).
    pub backup_dir: String,
    pub pull: String,
    pub build: String,
    pub install: String,
    pub persistent: bool,
    pub delete_old: bool,
    /// Releases kept for `rollback`.
    pub keep: u32,
}

/// `[log]`: instance log rotation and the log format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogSettings {
    pub json: bool,
    /// Bytes an instance log grows to before it is rotated.
    pub max_size: u64,
    /// Rotated files kept per instance.
    pub keep: u32,
}

/// Instance counts the operator asked for; they persist across restarts of the fleet worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub https: u32,
    pub http: u32,
    pub root: bool,
}

/// What the launcher remembers of a running instance, to hand to a new fleet worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub id: InstanceId,
    pub pool: Pool,
    pub index: u32,
    pub port: u16,
    pub pid: i32,
    /// Process group (== pid: every instance leads its own group).
    pub pgid: i32,
    pub started_unix_ms: u64,
    pub backup: bool,
    pub restarts: u32,
}

/// The fleet worker's durable state, kept by the launcher across fleet restarts and upgrades.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetState {
    pub counts: Counts,
    pub instances: Vec<InstanceRecord>,
    pub next_id: InstanceId,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetInit {
    pub app: AppSettings,
    pub health: HealthSettings,
    /// Writable by the fleet worker: logs live below it.
    pub state_dir: String,
    /// Members of this group (and uid 0) may use the control socket; `None`: only our uid and 0.
    pub control_gid: Option<u32>,
    pub control_socket_path: String,
    pub listeners: Vec<ListenerSpec>,
    pub launcher_pid: i32,
    pub launcher_started_unix_ms: u64,
    /// Instances already running (from a previous fleet worker) to adopt.
    pub state: Option<FleetState>,
    pub deploy: DeploySettings,
    pub log: LogSettings,
    /// How many times the launcher has re-executed itself (shown in status).
    pub upgrades: u32,
}

/// Launcher → fleet worker.
// Sent a few times per process lifetime: boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LauncherToFleet {
    /// Descriptors: exactly one, the listening control socket.
    Start(FleetInit),
    /// Descriptors: exactly one, this worker's end of a new proxy↔fleet channel.
    ProxyChannel,
    /// An adopted instance (no longer the fleet worker's child) was reaped by the launcher.
    Exited {
        pid: i32,
        code: Option<i32>,
        signal: Option<i32>,
    },
    Shutdown(ShutdownKind),
    /// The answer to [`FleetToLauncher::Upgrade`] or [`FleetToLauncher::Reload`]: `ok: false`
    /// means nothing changed; for an accepted upgrade a `Shutdown(Upgrade)` follows.
    Answer {
        ok: bool,
        message: String,
    },
    /// A reload changed the app or health settings (counts apply at the next restart-all).
    Reconfigure(FleetInit),
}

/// Fleet worker → launcher.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FleetToLauncher {
    /// Every configured instance is ready and the proxy has the routes.
    Ready,
    /// One line for systemd's `STATUS=`.
    Status(String),
    /// The whole durable state, sent after every change.
    State(FleetState),
    /// Every instance is stopped (or left for adoption); the worker exits next.
    Stopped,
    /// `overwatchctl upgrade` from a client with this uid.
    Upgrade { binary: Option<String>, uid: u32 },
    /// `overwatchctl reload`.
    Reload,
}

/// What a launcher hands to the binary it re-executes: the numbers of the descriptors it
/// inherits and the state it must carry on. Read back from a memfd with the same codec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeState {
    pub config_path: String,
    /// Listener manifest with the inherited descriptor number of each.
    pub listeners: Vec<(ListenerSpec, i32)>,
    pub control_fd: i32,
    pub switch_users: bool,
    /// The old proxy worker (pid, channel descriptor), retired once the new one is serving.
    pub old_proxy: Option<(i32, i32)>,
    pub fleet_state: Option<FleetState>,
    pub started_unix_ms: u64,
    pub upgrades: u32,
    /// The path `upgrade` without `--binary` executes.
    pub exe_path: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartArgs {
    pub ssl: Option<u32>,
    pub http: Option<u32>,
    pub root: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployArgs {
    pub counts: RestartArgs,
    pub persistent: Option<bool>,
    pub delete_old: Option<bool>,
}

/// `overwatchctl` → fleet worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CtlRequest {
    Status,
    RestartAll(RestartArgs),
    Deploy(DeployArgs),
    Upgrade {
        binary: Option<String>,
    },
    Reload,
    Logs {
        instance: Option<String>,
        lines: u32,
        follow: bool,
    },
    /// Back to the release before the current one, with a rolling restart.
    Rollback,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    Starting,
    Ready,
    Draining,
    Stopping,
    Backup,
    Failed,
    Backoff,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceStatus {
    pub id: InstanceId,
    pub pool: Pool,
    pub index: u32,
    pub port: u16,
    pub pid: Option<i32>,
    pub state: InstanceState,
    pub uptime_secs: u64,
    pub restarts: u32,
    pub in_flight: u64,
    pub served: u64,
    pub backup: bool,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperationStatus {
    pub name: String,
    pub started_unix: u64,
    /// For a finished operation: whether it succeeded and what it said.
    pub ok: Option<bool>,
    pub message: Option<String>,
}

/// `overwatchctl status`; also the `--json` schema (documented in docs/status-json.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    pub version: String,
    pub build: String,
    pub launcher_pid: i32,
    pub uptime_secs: u64,
    pub listeners: Vec<ListenerSpec>,
    pub counts: Counts,
    pub instances: Vec<InstanceStatus>,
    pub operation: Option<OperationStatus>,
    pub last_operation: Option<OperationStatus>,
    /// Times the launcher re-executed itself since it was started.
    pub upgrades: u32,
    /// The release the instances run (for example the git commit), when known.
    pub release: Option<String>,
    pub last_deploy: Option<OperationStatus>,
}

/// Fleet worker → `overwatchctl`; a request gets any number of `Progress`/`Log` lines and
/// ends with exactly one `Status`, `Done` or `Refused`.
// Sent a few times per process lifetime: boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CtlResponse {
    Status(StatusReport),
    Progress(String),
    Log(String),
    Done {
        ok: bool,
        message: String,
    },
    /// Not allowed (access) or not now (busy); nothing was done.
    Refused(String),
}
