//! The fleet state machine: one task owns the instances table, the counts and the routes
//! generation. Channel readers, control connections, child watchers, probes and timers talk
//! to it only through [`Cmd`] messages, so nothing shares mutable state through a lock.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use protocol::channel::Received;
use protocol::{
    AppSettings, Backend, BackendStats, Channel, ChannelError, Counts, DeploySettings, FleetInit,
    FleetState, FleetToLauncher, FleetToProxy, HealthSettings, InstanceId, InstanceRecord,
    InstanceState, InstanceStatus, LauncherToFleet, ListenerSpec, LogSettings, OperationStatus,
    Pool, ProxyToFleet, Routes, ShutdownKind, StatusReport,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::backoff::Backoff;
use crate::clock::{format_utc, now_unix_ms};
use crate::deploy::{self, DeployContext};
use crate::health::Prober;
use crate::logs::{instance_name, log_path};
use crate::plan::{count, with_count};
use crate::ports::{self, PortRange};
use crate::process::{self, SpawnSpec, StopOutcome, StopTarget};

/// Interval between readiness probes of a starting instance.
const READY_POLL: Duration = Duration::from_millis(100);
/// Consecutive failed health probes that take a serving instance out of rotation.
const HEALTH_FAILURES: u32 = 3;
/// Longest a single health probe may take, whatever the interval.
const PROBE_TIMEOUT_MAX: Duration = Duration::from_secs(5);

pub type Reply<T> = oneshot::Sender<T>;

/// Everything the state machine reacts to.
pub enum Cmd {
    Launcher(Box<Received<LauncherToFleet>>),
    /// The launcher channel ended: cleanly (`None`) or with an error.
    LauncherClosed(Option<ChannelError>),
    ProxyUp {
        epoch: u64,
        tx: mpsc::UnboundedSender<FleetToProxy>,
    },
    Proxy {
        epoch: u64,
        msg: ProxyToFleet,
    },
    ProxyDown {
        epoch: u64,
    },
    ChildExited {
        id: InstanceId,
        how: String,
    },
    ReadyResult {
        id: InstanceId,
        result: Result<(), String>,
    },
    Health {
        id: InstanceId,
        result: Result<u16, String>,
    },
    StopDone {
        id: InstanceId,
        outcome: StopOutcome,
    },
    Retry {
        pool: Pool,
        index: u32,
    },
    Ctl(CtlCmd),
}

/// Requests from control connections and the operations they run.
pub enum CtlCmd {
    Stats(Reply<Vec<BackendStats>>),
    Status(Reply<StatusReport>),
    BeginOp {
        name: String,
        reply: Reply<Result<(), String>>,
    },
    EndOp {
        ok: bool,
        message: String,
    },
    Counts(Reply<Counts>),
    /// The instance port range, (first, last).
    PortRange(Reply<(u16, u16)>),
    SetCount {
        pool: Pool,
        count: u32,
    },
    Slot {
        pool: Pool,
        index: u32,
        reply: Reply<SlotInfo>,
    },
    /// Start an instance in the slot (primary command); the reply comes when it is ready
    /// and in the routes, or failed. It is supervised only once ready.
    Start {
        pool: Pool,
        index: u32,
        reply: Reply<Result<(InstanceId, u16), String>>,
    },
    Supervise {
        id: InstanceId,
        on: bool,
    },
    /// Out of the routes, then `Drain` to the proxy; the reply comes with `Drained`.
    Drain {
        id: InstanceId,
        reply: Reply<()>,
    },
    Stop {
        id: InstanceId,
        reply: Reply<()>,
    },
    /// What a deploy needs to know, read at its start.
    DeployContext(Reply<DeployContext>),
    /// New instances start in `dir` (`None`: the app directory); `label` is what `status`
    /// shows (`None`: the app directory's own).
    SetRelease {
        dir: Option<PathBuf>,
        label: Option<String>,
    },
    /// The commit the app directory holds, found at start.
    BaseRelease(String),
    /// Sends `msg` (`Upgrade` or `Reload`) to the launcher; the reply is its `Answer`.
    AskLauncher {
        msg: FleetToLauncher,
        reply: Reply<(bool, String)>,
    },
}

/// What an operation needs to know about one slot.
#[derive(Debug, Clone, Copy)]
pub struct SlotInfo {
    /// The running instance serving or starting in the slot: (id, port).
    pub current: Option<(InstanceId, u16)>,
    /// Other instances of the pool in the routes.
    pub others_serving: usize,
}

/// A cheap handle to the state machine for control connections and operations.
#[derive(Clone)]
pub struct FleetHandle(pub mpsc::UnboundedSender<Cmd>);

impl FleetHandle {
    /// Sends a request and waits for the answer; `None` when the fleet has stopped.
    pub async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> CtlCmd) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.0.send(Cmd::Ctl(make(tx))).ok()?;
        rx.await.ok()
    }

    pub fn tell(&self, cmd: CtlCmd) {
        let _ = self.0.send(Cmd::Ctl(cmd));
    }
}

/// Why the event loop ends.
pub enum Exit {
    Shutdown(ShutdownKind),
    LauncherGone(Option<ChannelError>),
}

/// What happens once an instance's process group is stopped.
#[derive(Debug)]
enum AfterStop {
    /// It is gone for good (an operation retired it, or the fleet is stopping).
    Remove,
    /// It failed: supervision replaces it (backup command first when it failed to start).
    Replace { reason: String, start_failure: bool },
}

struct Instance {
    id: InstanceId,
    pool: Pool,
    index: u32,
    port: u16,
    /// `None` for a failed slot waiting for its retry.
    pid: Option<i32>,
    state: InstanceState,
    backup: bool,
    restarts: u32,
    last_error: Option<String>,
    started_unix_ms: u64,
    ready_since: Option<Instant>,
    adopted: bool,
    /// Crashes and health failures lead to a replacement; off while an operation owns it.
    supervised: bool,
    in_routes: bool,
    health_failures: u32,
    /// `true` once the leader has exited; dropping it ends the instance's probe tasks.
    exited: watch::Sender<bool>,
    after_stop: AfterStop,
    ready_waiter: Option<Reply<Result<(InstanceId, u16), String>>>,
    stop_waiters: Vec<Reply<()>>,
}

impl Instance {
    fn new(id: InstanceId, pool: Pool, index: u32) -> Self {
        Instance {
            id,
            pool,
            index,
            port: 0,
            pid: None,
            state: InstanceState::Starting,
            backup: false,
            restarts: 0,
            last_error: None,
            started_unix_ms: now_unix_ms(),
            ready_since: None,
            adopted: false,
            supervised: true,
            in_routes: false,
            health_failures: 0,
            exited: watch::channel(false).0,
            after_stop: AfterStop::Remove,
            ready_waiter: None,
            stop_waiters: Vec::new(),
        }
    }

    fn name(&self) -> String {
        instance_name(self.pool, self.index)
    }

    fn live(&self) -> bool {
        self.pid.is_some()
    }

    fn in_slot(&self, pool: Pool, index: u32) -> bool {
        self.pool == pool && self.index == index
    }
}

#[derive(Default)]
struct Slot {
    backoff: Backoff,
    restarts: u32,
}

/// The state machine. Owned by the event loop in [`crate::run`].
pub struct Fleet {
    app: AppSettings,
    health: HealthSettings,
    state_dir: PathBuf,
    listeners: Vec<ListenerSpec>,
    launcher_pid: i32,
    launcher_started_unix_ms: u64,
    counts: Counts,
    instances: BTreeMap<InstanceId, Instance>,
    slots: HashMap<(Pool, u32), Slot>,
    next_id: InstanceId,
    ports: PortRange,
    generation: u64,
    routes_sent: Option<Vec<Backend>>,
    proxy: Option<mpsc::UnboundedSender<FleetToProxy>>,
    proxy_epoch: u64,
    proxy_task: Option<JoinHandle<()>>,
    launcher: mpsc::UnboundedSender<FleetToLauncher>,
    cmd_tx: mpsc::UnboundedSender<Cmd>,
    prober: Prober,
    drain_waiters: HashMap<InstanceId, Vec<Reply<()>>>,
    stats_waiters: Vec<Reply<Vec<BackendStats>>>,
    operation: Option<OperationStatus>,
    last_operation: Option<OperationStatus>,
    ready_sent: bool,
    last_status_line: String,
    last_state: Option<FleetState>,
    shutting_down: bool,
    launcher_answer: Option<Reply<(bool, String)>>,
    deploy: DeploySettings,
    log: LogSettings,
    upgrades: u32,
    /// The release the instances run (set by deploys).
    release: Option<String>,
    last_deploy: Option<OperationStatus>,
    /// Where new instances start: the current release, or `None` for the app directory.
    release_dir: Option<PathBuf>,
    /// What `status` shows while the instances run the app directory.
    base_release: Option<String>,
}

impl Fleet {
    /// `None` when the port range is empty.
    pub fn new(
        init: FleetInit,
        launcher: mpsc::UnboundedSender<FleetToLauncher>,
        cmd_tx: mpsc::UnboundedSender<Cmd>,
        prober: Prober,
    ) -> Option<Self> {
        let ports = PortRange::new(init.app.port_min, init.app.port_max)?;
        let counts = Counts {
            https: init.app.https.count,
            http: init.app.http.count,
            root: init.app.root_enabled,
        };
        let state_dir = PathBuf::from(&init.state_dir);
        let current = deploy::current_release(&state_dir);
        Some(Fleet {
            release: current
                .as_ref()
                .map(|(_, name)| deploy::release_label(name)),
            release_dir: current.map(|(dir, _)| dir),
            base_release: None,
            app: init.app,
            health: init.health,
            state_dir: PathBuf::from(init.state_dir),
            listeners: init.listeners,
            launcher_pid: init.launcher_pid,
            launcher_started_unix_ms: init.launcher_started_unix_ms,
            counts,
            instances: BTreeMap::new(),
            slots: HashMap::new(),
            next_id: 1,
            ports,
            generation: 0,
            routes_sent: None,
            proxy: None,
            proxy_epoch: 0,
            proxy_task: None,
            launcher,
            cmd_tx,
            prober,
            drain_waiters: HashMap::new(),
            stats_waiters: Vec::new(),
            operation: None,
            last_operation: None,
            ready_sent: false,
            last_status_line: String::new(),
            last_state: None,
            shutting_down: false,
            launcher_answer: None,
            deploy: init.deploy,
            log: init.log,
            upgrades: init.upgrades,
            last_deploy: None,
        })
    }

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    fn send_launcher(&self, msg: FleetToLauncher) {
        let _ = self.launcher.send(msg);
    }

    fn send_proxy(&self, msg: FleetToProxy) -> bool {
        self.proxy.as_ref().is_some_and(|p| p.send(msg).is_ok())
    }

    // ----- adoption and start-up -----

    /// Takes over the instances a previous fleet worker left running: healthy ones that fill
    /// a wanted slot serve on; the rest are stopped (whole process group).
    pub async fn adopt(&mut self, state: FleetState) {
        self.counts = state.counts;
        let max_id = state.instances.iter().map(|r| r.id).max().unwrap_or(0);
        self.next_id = state.next_id.max(max_id + 1);
        let mut probes = JoinSet::new();
        for record in state.instances {
            let prober = self.prober.clone();
            probes.spawn(async move {
                let result = adopt_probe(&prober, &record).await;
                (record, result)
            });
        }
        let mut results = Vec::new();
        while let Some(joined) = probes.join_next().await {
            if let Ok(pair) = joined {
                results.push(pair);
            }
        }
        results.sort_by_key(|(r, _)| r.id);
        for (record, result) in results {
            let name = instance_name(record.pool, record.index);
            if record.pid <= 1 || record.pgid <= 1 {
                tracing::warn!(
                    id = record.id,
                    pid = record.pid,
                    "not adopting {name}: invalid pid"
                );
                continue;
            }
            let wanted = record.index < count(self.counts, record.pool)
                && !self
                    .instances
                    .values()
                    .any(|i| i.in_slot(record.pool, record.index) && i.in_routes);
            let mut inst = Instance::new(record.id, record.pool, record.index);
            inst.port = record.port;
            inst.pid = Some(record.pid);
            inst.backup = record.backup;
            inst.restarts = record.restarts;
            inst.started_unix_ms = record.started_unix_ms;
            inst.adopted = true;
            self.slots
                .entry((record.pool, record.index))
                .or_default()
                .restarts = record.restarts;
            let id = inst.id;
            match (result, wanted) {
                (Ok(()), true) => {
                    tracing::info!(id, pid = record.pid, port = record.port, "adopted {name}");
                    inst.state = if inst.backup {
                        InstanceState::Backup
                    } else {
                        InstanceState::Ready
                    };
                    inst.in_routes = true;
                    inst.ready_since = Some(Instant::now());
                    self.spawn_health_monitor(&inst);
                    self.instances.insert(id, inst);
                }
                (result, _) => {
                    let why = match result {
                        Err(e) => format!("not healthy: {e}"),
                        Ok(()) => "its slot is not wanted".to_string(),
                    };
                    tracing::warn!(
                        id,
                        pid = record.pid,
                        "not adopting {name}: {why}; stopping it"
                    );
                    inst.last_error = Some(why);
                    self.instances.insert(id, inst);
                    self.begin_stop(id, AfterStop::Remove);
                }
            }
        }
    }

    /// Starts an instance in every wanted slot that has none.
    pub fn start_missing(&mut self) {
        for pool in Pool::ALL {
            for index in 0..count(self.counts, pool) {
                let filled = self.instances.values().any(|i| {
                    i.in_slot(pool, index) && i.live() && i.state != InstanceState::Stopping
                });
                if !filled {
                    self.start_instance(pool, index, false, None);
                }
            }
        }
    }

    // ----- events -----

    /// Handles one event; `Some` ends the event loop.
    pub fn handle(&mut self, cmd: Cmd) -> Option<Exit> {
        match cmd {
            Cmd::Launcher(received) => return self.on_launcher(*received),
            Cmd::LauncherClosed(err) => return Some(Exit::LauncherGone(err)),
            Cmd::ProxyUp { epoch, tx } => {
                if epoch == self.proxy_epoch {
                    tracing::info!(epoch, "proxy channel ready");
                    self.proxy = Some(tx);
                    self.publish_routes(true);
                }
            }
            Cmd::Proxy { epoch, msg } if epoch == self.proxy_epoch => self.on_proxy(msg),
            Cmd::Proxy { .. } => {}
            Cmd::ProxyDown { epoch } => {
                if epoch == self.proxy_epoch {
                    tracing::warn!(epoch, "proxy channel closed; waiting for a new one");
                    self.proxy = None;
                    self.routes_sent = None;
                    // Nothing is in flight through a proxy that is gone.
                    for (_, waiters) in self.drain_waiters.drain() {
                        for w in waiters {
                            let _ = w.send(());
                        }
                    }
                    self.stats_waiters.clear();
                }
            }
            Cmd::ChildExited { id, how } => self.on_exit(id, how),
            Cmd::ReadyResult { id, result } => self.on_ready_result(id, result),
            Cmd::Health { id, result } => self.on_health(id, result),
            Cmd::StopDone { id, outcome } => {
                if outcome == StopOutcome::PortStillBusy {
                    if let Some(inst) = self.instances.get(&id) {
                        tracing::error!(
                            id,
                            port = inst.port,
                            "port still busy after SIGKILL of {}",
                            inst.name()
                        );
                    }
                }
                self.finish_stop(id);
            }
            Cmd::Retry { pool, index } => self.on_retry(pool, index),
            Cmd::Ctl(ctl) => self.on_ctl(ctl),
        }
        None
    }

    fn on_launcher(&mut self, received: Received<LauncherToFleet>) -> Option<Exit> {
        match received.msg {
            LauncherToFleet::Start(_) => {
                tracing::warn!("ignoring a second Start from the launcher")
            }
            LauncherToFleet::ProxyChannel => {
                if let Err(e) = received.expect_fds("ProxyChannel", 1) {
                    tracing::warn!("ignoring ProxyChannel: {e}");
                } else if let Some(fd) = received.fds.into_iter().next() {
                    self.connect_proxy(fd);
                }
            }
            LauncherToFleet::Exited { pid, code, signal } => {
                let how = match (code, signal) {
                    (Some(code), _) => format!("exit status: {code}"),
                    (None, Some(sig)) => format!("signal: {sig}"),
                    (None, None) => "exited".to_string(),
                };
                let found = self
                    .instances
                    .values()
                    .find(|i| i.adopted && i.pid == Some(pid))
                    .map(|i| i.id);
                match found {
                    Some(id) => self.on_exit(id, how),
                    None => tracing::debug!(
                        pid,
                        "launcher reaped a process that is not an adopted instance"
                    ),
                }
            }
            LauncherToFleet::Shutdown(kind) => return Some(Exit::Shutdown(kind)),
            LauncherToFleet::Answer { ok, message } => match self.launcher_answer.take() {
                Some(reply) => {
                    let _ = reply.send((ok, message));
                }
                None => tracing::warn!("unexpected Answer from the launcher: {message}"),
            },
            LauncherToFleet::Reconfigure(init) => self.reconfigure(init),
        }
        None
    }

    /// New app and health settings from a reload. Counts stay until the next restart-all;
    /// running instances keep their command until they are replaced.
    fn reconfigure(&mut self, init: FleetInit) {
        match PortRange::new(init.app.port_min, init.app.port_max) {
            Some(ports) => self.ports = ports,
            None => {
                tracing::warn!(
                    min = init.app.port_min,
                    max = init.app.port_max,
                    "reload: empty port range ignored"
                );
                return;
            }
        }
        match Prober::new(&init.health.path) {
            Ok(prober) => self.prober = prober,
            Err(e) => tracing::warn!("reload: keeping the old health prober: {e}"),
        }
        self.app = init.app;
        self.health = init.health;
        self.listeners = init.listeners;
        self.deploy = init.deploy;
        self.log = init.log;
        tracing::info!("settings reloaded");
    }

    fn connect_proxy(&mut self, fd: OwnedFd) {
        self.proxy_epoch += 1;
        self.proxy = None;
        self.routes_sent = None;
        if let Some(old) = self.proxy_task.take() {
            old.abort();
        }
        let epoch = self.proxy_epoch;
        tracing::info!(epoch, "new proxy channel");
        self.proxy_task = Some(tokio::spawn(proxy_link(epoch, fd, self.cmd_tx.clone())));
    }

    fn on_proxy(&mut self, msg: ProxyToFleet) {
        match msg {
            ProxyToFleet::Drained { id, in_flight_left } => {
                if in_flight_left > 0 {
                    tracing::warn!(id, in_flight_left, "drain timed out in the proxy");
                }
                for w in self.drain_waiters.remove(&id).unwrap_or_default() {
                    let _ = w.send(());
                }
            }
            ProxyToFleet::BackendFailed { id, reason } => {
                let name = self
                    .instances
                    .get(&id)
                    .map(Instance::name)
                    .unwrap_or_default();
                tracing::warn!(id, "proxy could not reach {name}: {reason}");
            }
            ProxyToFleet::Stats(stats) => {
                for w in self.stats_waiters.drain(..) {
                    let _ = w.send(stats.clone());
                }
            }
        }
    }

    fn on_exit(&mut self, id: InstanceId, how: String) {
        let Some(inst) = self.instances.get_mut(&id) else {
            return;
        };
        inst.exited.send_replace(true);
        let name = inst.name();
        match inst.state {
            InstanceState::Stopping | InstanceState::Failed | InstanceState::Backoff => {}
            InstanceState::Starting => {
                self.start_failed(id, format!("exited while starting ({how})"))
            }
            InstanceState::Ready | InstanceState::Backup | InstanceState::Draining => {
                tracing::warn!(id, pid = inst.pid, "{name} exited unexpectedly ({how})");
                let after = if inst.supervised && !self.shutting_down {
                    AfterStop::Replace {
                        reason: format!("exited ({how})"),
                        start_failure: false,
                    }
                } else {
                    AfterStop::Remove
                };
                self.begin_stop(id, after);
            }
        }
    }

    fn on_ready_result(&mut self, id: InstanceId, result: Result<(), String>) {
        let Some(inst) = self.instances.get_mut(&id) else {
            return;
        };
        if inst.state != InstanceState::Starting {
            return;
        }
        match result {
            Err(reason) => self.start_failed(id, reason),
            Ok(()) => {
                inst.state = if inst.backup {
                    InstanceState::Backup
                } else {
                    InstanceState::Ready
                };
                inst.in_routes = true;
                inst.supervised = true;
                inst.ready_since = Some(Instant::now());
                inst.health_failures = 0;
                if !inst.backup {
                    inst.last_error = None;
                }
                tracing::info!(
                    id,
                    port = inst.port,
                    backup = inst.backup,
                    "{} ready",
                    inst.name()
                );
                if let Some(w) = inst.ready_waiter.take() {
                    let _ = w.send(Ok((id, inst.port)));
                }
                let inst = &self.instances[&id];
                self.spawn_health_monitor(inst);
            }
        }
    }

    fn on_health(&mut self, id: InstanceId, result: Result<u16, String>) {
        let Some(inst) = self.instances.get_mut(&id) else {
            return;
        };
        if !matches!(inst.state, InstanceState::Ready | InstanceState::Backup) {
            return;
        }
        match result {
            Ok(_) => inst.health_failures = 0,
            Err(e) => {
                inst.health_failures += 1;
                tracing::warn!(
                    id,
                    failures = inst.health_failures,
                    "{} health check failed: {e}",
                    inst.name()
                );
                if inst.health_failures >= HEALTH_FAILURES && inst.supervised {
                    let reason =
                        format!("health check failed {HEALTH_FAILURES} times in a row: {e}");
                    inst.last_error = Some(reason.clone());
                    self.begin_stop(
                        id,
                        AfterStop::Replace {
                            reason,
                            start_failure: false,
                        },
                    );
                }
            }
        }
    }

    fn on_retry(&mut self, pool: Pool, index: u32) {
        if self.shutting_down {
            return;
        }
        if index >= count(self.counts, pool) {
            self.instances
                .retain(|_, i| !i.in_slot(pool, index) || i.live());
            return;
        }
        let has_live = self
            .instances
            .values()
            .any(|i| i.in_slot(pool, index) && i.live());
        let has_failed = self
            .instances
            .values()
            .any(|i| i.in_slot(pool, index) && !i.live());
        if !has_live && has_failed {
            self.start_instance(pool, index, false, None);
        }
    }

    // ----- instance lifecycle -----

    fn ports_in_use(&self) -> HashSet<u16> {
        self.instances
            .values()
            .filter(|i| i.port != 0)
            .map(|i| i.port)
            .collect()
    }

    /// Starts the slot's primary (or backup) command on a fresh port. With `waiter` (an
    /// operation's start), the answer goes there and supervision begins only once ready.
    fn start_instance(
        &mut self,
        pool: Pool,
        index: u32,
        backup: bool,
        waiter: Option<Reply<Result<(InstanceId, u16), String>>>,
    ) -> InstanceId {
        let previous_error = self
            .instances
            .values()
            .filter(|i| i.in_slot(pool, index) && !i.live())
            .find_map(|i| i.last_error.clone());
        self.instances
            .retain(|_, i| !i.in_slot(pool, index) || i.live());
        let id = self.next_id;
        self.next_id += 1;
        let mut inst = Instance::new(id, pool, index);
        inst.backup = backup;
        inst.restarts = self.slots.entry((pool, index)).or_default().restarts;
        inst.supervised = waiter.is_none();
        inst.ready_waiter = waiter;
        if backup {
            inst.last_error = previous_error;
        }
        let settings = self.app.pool(pool);
        let command = match (backup, &settings.backup) {
            (false, _) => settings.command.clone(),
            (true, Some(command)) => command.clone(),
            (true, None) => {
                self.instances.insert(id, inst);
                self.start_failed(id, "no backup command".to_string());
                return id;
            }
        };
        let Some(port) = self.ports.pick(&self.ports_in_use(), ports::is_free) else {
            let reason = format!("no free port in {}-{}", self.ports.min(), self.ports.max());
            self.instances.insert(id, inst);
            self.start_failed(id, reason);
            return id;
        };
        inst.port = port;
        let name = inst.name();
        let mut env = self.app.env.clone();
        env.extend([
            ("PORT".to_string(), port.to_string()),
            ("HOSTNAME".to_string(), "127.0.0.1".to_string()),
            ("HOST".to_string(), "127.0.0.1".to_string()),
            ("OVERWATCH_POOL".to_string(), pool.name().to_string()),
            ("OVERWATCH_INSTANCE".to_string(), index.to_string()),
        ]);
        let log = log_path(&self.state_dir, pool, index);
        let banner = format!(
            "--- overwatch {}: starting {name} (id {id}) on port {port}{}: {command}",
            format_utc(now_unix_ms() / 1000),
            if backup { " as backup" } else { "" }
        );
        let dir = self
            .release_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(&self.app.dir));
        let spawned = process::spawn(&SpawnSpec {
            command: &command,
            dir: &dir,
            env: &env,
            log: &log,
            banner: &banner,
        });
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => {
                self.instances.insert(id, inst);
                self.start_failed(id, e.to_string());
                return id;
            }
        };
        let Some(pid) = child.id() else {
            self.instances.insert(id, inst);
            self.start_failed(id, "exited at once".to_string());
            return id;
        };
        let pid = pid as i32;
        inst.pid = Some(pid);
        tracing::info!(id, pid, port, backup, "starting {name}: {command}");
        let exited = inst.exited.clone();
        let tx = self.cmd_tx.clone();
        tokio::spawn(async move {
            let how = match child.wait().await {
                Ok(status) => status.to_string(),
                Err(e) => format!("wait failed: {e}"),
            };
            exited.send_replace(true);
            let _ = tx.send(Cmd::ChildExited { id, how });
        });
        let tx = self.cmd_tx.clone();
        let prober = self.prober.clone();
        let gone = inst.exited.subscribe();
        let timeout = Self::ms(self.health.ready_timeout_ms);
        tokio::spawn(async move {
            if let Some(result) = wait_ready(&prober, pool, port, timeout, gone).await {
                let _ = tx.send(Cmd::ReadyResult { id, result });
            }
        });
        self.instances.insert(id, inst);
        id
    }

    fn start_failed(&mut self, id: InstanceId, reason: String) {
        let Some(inst) = self.instances.get_mut(&id) else {
            return;
        };
        tracing::warn!(
            id,
            port = inst.port,
            backup = inst.backup,
            "{} failed to start: {reason}",
            inst.name()
        );
        inst.last_error = Some(reason.clone());
        if let Some(w) = inst.ready_waiter.take() {
            let _ = w.send(Err(reason.clone()));
        }
        // An operation's start is replaced too, unless the operation keeps the old instance
        // serving in the slot (see `slot_failed`).
        let after = AfterStop::Replace {
            reason,
            start_failure: true,
        };
        self.begin_stop(id, after);
    }

    /// Out of the routes, then the whole process group is stopped in the background;
    /// [`Cmd::StopDone`] continues with `after`.
    fn begin_stop(&mut self, id: InstanceId, after: AfterStop) {
        let stop_timeout = Self::ms(self.health.stop_timeout_ms);
        let Some(inst) = self.instances.get_mut(&id) else {
            return;
        };
        let already = inst.state == InstanceState::Stopping;
        if !already || matches!(after, AfterStop::Remove) {
            inst.after_stop = after;
        }
        if already {
            return;
        }
        inst.state = InstanceState::Stopping;
        inst.in_routes = false;
        let tx = self.cmd_tx.clone();
        match inst.pid {
            Some(pid) => {
                let target = StopTarget {
                    pgid: pid,
                    pid,
                    port: inst.port,
                    exited: inst.exited.subscribe(),
                };
                tokio::spawn(async move {
                    let outcome = process::stop_group(target, stop_timeout, false).await;
                    let _ = tx.send(Cmd::StopDone { id, outcome });
                });
            }
            None => {
                let _ = tx.send(Cmd::StopDone {
                    id,
                    outcome: StopOutcome::Stopped,
                });
            }
        }
    }

    fn finish_stop(&mut self, id: InstanceId) {
        let Some(mut inst) = self.instances.remove(&id) else {
            return;
        };
        for w in inst.stop_waiters.drain(..) {
            let _ = w.send(());
        }
        for w in self.drain_waiters.remove(&id).unwrap_or_default() {
            let _ = w.send(());
        }
        tracing::info!(id, port = inst.port, "{} stopped", inst.name());
        let AfterStop::Replace {
            reason,
            start_failure,
        } = std::mem::replace(&mut inst.after_stop, AfterStop::Remove)
        else {
            return;
        };
        let healthy_for = inst.ready_since.map(|t| t.elapsed()).unwrap_or_default();
        inst.pid = None;
        inst.in_routes = false;
        inst.exited = watch::channel(true).0;
        self.slot_failed(inst, reason, start_failure, healthy_for);
    }

    /// A slot lost its instance (`failed`, already stopped): start the backup command in
    /// its place when the primary failed to start, else retry after the backoff delay.
    fn slot_failed(
        &mut self,
        mut failed: Instance,
        reason: String,
        start_failure: bool,
        healthy_for: Duration,
    ) {
        let (pool, index) = (failed.pool, failed.index);
        if self.shutting_down || index >= count(self.counts, pool) {
            return;
        }
        let occupied = self
            .instances
            .values()
            .any(|i| i.in_slot(pool, index) && i.live() && i.state != InstanceState::Stopping);
        if occupied {
            return;
        }
        let slot = self.slots.entry((pool, index)).or_default();
        slot.restarts += 1;
        if start_failure && !failed.backup && self.app.pool(pool).backup.is_some() {
            tracing::warn!(
                "{}: starting the backup command in its place",
                failed.name()
            );
            failed.state = InstanceState::Failed;
            failed.last_error = Some(reason);
            self.instances.insert(failed.id, failed);
            self.start_instance(pool, index, true, None);
            return;
        }
        let delay = slot.backoff.on_failure(healthy_for);
        tracing::warn!(
            "{}: retrying in {} ms ({reason})",
            failed.name(),
            delay.as_millis()
        );
        failed.state = if start_failure {
            InstanceState::Failed
        } else {
            InstanceState::Backoff
        };
        failed.last_error = Some(reason);
        self.instances.insert(failed.id, failed);
        let tx = self.cmd_tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send(Cmd::Retry { pool, index });
        });
    }

    fn spawn_health_monitor(&self, inst: &Instance) {
        let (id, pool, port) = (inst.id, inst.pool, inst.port);
        let interval = Self::ms(self.health.interval_ms.max(10));
        let timeout = interval.clamp(Duration::from_millis(500), PROBE_TIMEOUT_MAX);
        let prober = self.prober.clone();
        let tx = self.cmd_tx.clone();
        let mut gone = inst.exited.subscribe();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    changed = gone.changed() => if changed.is_err() { return },
                }
                if *gone.borrow() {
                    return;
                }
                let result = prober.probe(pool, port, timeout).await;
                if tx.send(Cmd::Health { id, result }).is_err() {
                    return;
                }
            }
        });
    }

    // ----- control requests -----

    fn on_ctl(&mut self, cmd: CtlCmd) {
        match cmd {
            CtlCmd::Stats(reply) => {
                self.stats_waiters.retain(|w| !w.is_closed());
                if self.send_proxy(FleetToProxy::StatsRequest) {
                    self.stats_waiters.push(reply);
                } else {
                    let _ = reply.send(Vec::new());
                }
            }
            CtlCmd::Status(reply) => {
                let _ = reply.send(self.status_report());
            }
            CtlCmd::BeginOp { name, reply } => {
                let answer = match &self.operation {
                    Some(op) => Err(format!(
                        "busy: {} running since {}",
                        op.name,
                        format_utc(op.started_unix)
                    )),
                    None => {
                        self.operation = Some(OperationStatus {
                            name,
                            started_unix: now_unix_ms() / 1000,
                            ok: None,
                            message: None,
                        });
                        Ok(())
                    }
                };
                let _ = reply.send(answer);
            }
            CtlCmd::EndOp { ok, message } => {
                if let Some(mut op) = self.operation.take() {
                    op.ok = Some(ok);
                    op.message = Some(message);
                    if op.name == "deploy" || op.name == "rollback" {
                        self.last_deploy = Some(op.clone());
                    }
                    self.last_operation = Some(op);
                }
            }
            CtlCmd::Counts(reply) => {
                let _ = reply.send(self.counts);
            }
            CtlCmd::PortRange(reply) => {
                let _ = reply.send((self.app.port_min, self.app.port_max));
            }
            CtlCmd::SetCount { pool, count: n } => {
                self.counts = with_count(self.counts, pool, n);
                let n = count(self.counts, pool);
                self.instances
                    .retain(|_, i| !(i.pool == pool && i.index >= n && !i.live()));
            }
            CtlCmd::Slot { pool, index, reply } => {
                let current = self
                    .instances
                    .values()
                    .filter(|i| {
                        i.in_slot(pool, index) && i.live() && i.state != InstanceState::Stopping
                    })
                    .max_by_key(|i| (i.in_routes, i.id))
                    .map(|i| (i.id, i.port));
                let others_serving = self
                    .instances
                    .values()
                    .filter(|i| i.pool == pool && i.in_routes && Some(i.id) != current.map(|c| c.0))
                    .count();
                let _ = reply.send(SlotInfo {
                    current,
                    others_serving,
                });
            }
            CtlCmd::Start { pool, index, reply } => {
                self.start_instance(pool, index, false, Some(reply));
            }
            CtlCmd::Supervise { id, on } => {
                if let Some(inst) = self.instances.get_mut(&id) {
                    inst.supervised = on;
                }
            }
            CtlCmd::Drain { id, reply } => self.drain(id, reply),
            CtlCmd::DeployContext(reply) => {
                let _ = reply.send(DeployContext {
                    app_dir: PathBuf::from(&self.app.dir),
                    env: self.app.env.clone(),
                    settings: self.deploy.clone(),
                    state_dir: self.state_dir.clone(),
                    counts: self.counts,
                });
            }
            CtlCmd::SetRelease { dir, label } => {
                self.release = label.or_else(|| self.base_release.clone());
                self.release_dir = dir;
            }
            CtlCmd::BaseRelease(label) => {
                if self.release_dir.is_none() {
                    self.release = Some(label.clone());
                }
                self.base_release = Some(label);
            }
            CtlCmd::AskLauncher { msg, reply } => {
                if self
                    .launcher_answer
                    .as_ref()
                    .is_some_and(|r| !r.is_closed())
                {
                    let _ = reply.send((false, "busy: waiting for the launcher's answer".into()));
                } else {
                    self.launcher_answer = Some(reply);
                    self.send_launcher(msg);
                }
            }
            CtlCmd::Stop { id, reply } => match self.instances.get_mut(&id) {
                Some(inst) if inst.live() => {
                    inst.stop_waiters.push(reply);
                    self.begin_stop(id, AfterStop::Remove);
                }
                Some(_) => {
                    self.instances.remove(&id);
                    let _ = reply.send(());
                }
                None => {
                    let _ = reply.send(());
                }
            },
        }
    }

    fn drain(&mut self, id: InstanceId, reply: Reply<()>) {
        let Some(inst) = self.instances.get_mut(&id) else {
            let _ = reply.send(());
            return;
        };
        if !inst.live() || inst.state == InstanceState::Stopping {
            let _ = reply.send(());
            return;
        }
        inst.in_routes = false;
        inst.state = InstanceState::Draining;
        self.publish_routes(false);
        let timeout_ms = self.health.drain_timeout_ms;
        if self.send_proxy(FleetToProxy::Drain { id, timeout_ms }) {
            self.drain_waiters.entry(id).or_default().push(reply);
        } else {
            let _ = reply.send(());
        }
    }

    // ----- what the others see -----

    fn status_report(&self) -> StatusReport {
        let now_ms = now_unix_ms();
        let mut instances: Vec<&Instance> = self.instances.values().collect();
        instances.sort_by_key(|i| (i.pool, i.index, i.id));
        StatusReport {
            version: env!("CARGO_PKG_VERSION").to_string(),
            build: protocol::build_id(),
            launcher_pid: self.launcher_pid,
            uptime_secs: now_ms.saturating_sub(self.launcher_started_unix_ms) / 1000,
            listeners: self.listeners.clone(),
            counts: self.counts,
            instances: instances
                .into_iter()
                .map(|i| InstanceStatus {
                    id: i.id,
                    pool: i.pool,
                    index: i.index,
                    port: i.port,
                    pid: i.pid,
                    state: i.state,
                    uptime_secs: if i.live() {
                        now_ms.saturating_sub(i.started_unix_ms) / 1000
                    } else {
                        0
                    },
                    restarts: i.restarts,
                    in_flight: 0,
                    served: 0,
                    backup: i.backup,
                    last_error: i.last_error.clone(),
                })
                .collect(),
            operation: self.operation.clone(),
            last_operation: self.last_operation.clone(),
            upgrades: self.upgrades,
            release: self.release.clone(),
            last_deploy: self.last_deploy.clone(),
        }
    }

    fn publish_routes(&mut self, force: bool) {
        if self.proxy.is_none() {
            return;
        }
        let mut backends: Vec<Backend> = self
            .instances
            .values()
            .filter(|i| i.in_routes)
            .map(|i| Backend {
                id: i.id,
                pool: i.pool,
                index: i.index,
                port: i.port,
            })
            .collect();
        backends.sort_by_key(|b| (b.pool, b.index, b.id));
        if !force && self.routes_sent.as_ref() == Some(&backends) {
            return;
        }
        self.generation += 1;
        let routes = Routes {
            generation: self.generation,
            backends: backends.clone(),
        };
        if self.send_proxy(FleetToProxy::Routes(routes)) {
            self.routes_sent = Some(backends);
        }
    }

    fn fleet_state(&self) -> FleetState {
        FleetState {
            counts: self.counts,
            instances: self
                .instances
                .values()
                .filter_map(|i| {
                    let pid = i.pid?;
                    Some(InstanceRecord {
                        id: i.id,
                        pool: i.pool,
                        index: i.index,
                        port: i.port,
                        pid,
                        pgid: pid,
                        started_unix_ms: i.started_unix_ms,
                        backup: i.backup,
                        restarts: i.restarts,
                    })
                })
                .collect(),
            next_id: self.next_id,
        }
    }

    fn slot_serving(&self, pool: Pool, index: u32) -> Option<&Instance> {
        self.instances
            .values()
            .find(|i| i.in_slot(pool, index) && i.in_routes)
    }

    fn all_ready(&self) -> bool {
        Pool::ALL.into_iter().all(|pool| {
            (0..count(self.counts, pool)).all(|index| self.slot_serving(pool, index).is_some())
        })
    }

    /// `2 https, 2 http, root: ready`; pools not fully ready show `ready/wanted`.
    fn status_line(&self) -> String {
        let pool_part = |pool: Pool| {
            let wanted = count(self.counts, pool);
            let serving: Vec<&Instance> = (0..wanted)
                .filter_map(|i| self.slot_serving(pool, i))
                .collect();
            let backups = serving.iter().filter(|i| i.backup).count();
            let mut text = if serving.len() as u32 == wanted {
                format!("{wanted} {pool}")
            } else {
                format!("{}/{wanted} {pool}", serving.len())
            };
            if backups > 0 {
                text.push_str(&format!(" ({backups} backup)"));
            }
            text
        };
        let root = if !self.counts.root {
            "off"
        } else {
            match self
                .instances
                .values()
                .filter(|i| i.in_slot(Pool::Root, 0))
                .map(|i| i.state)
                .max_by_key(|s| match s {
                    InstanceState::Ready | InstanceState::Backup => 3,
                    InstanceState::Starting => 2,
                    _ => 1,
                }) {
                Some(InstanceState::Ready) => "ready",
                Some(InstanceState::Backup) => "backup",
                Some(InstanceState::Starting) | None => "starting",
                Some(_) => "failed",
            }
        };
        let mut line = format!(
            "{}, {}, root: {root}",
            pool_part(Pool::Https),
            pool_part(Pool::Http)
        );
        if let Some(op) = &self.operation {
            line.push_str(&format!("; {} running", op.name));
        }
        line
    }

    /// After every event: routes to the proxy, durable state, status line and the first
    /// `Ready` to the launcher, each only when it changed.
    pub fn sync(&mut self) {
        self.publish_routes(false);
        let state = self.fleet_state();
        if self.last_state.as_ref() != Some(&state) {
            self.send_launcher(FleetToLauncher::State(state.clone()));
            self.last_state = Some(state);
        }
        let line = self.status_line();
        if line != self.last_status_line {
            self.send_launcher(FleetToLauncher::Status(line.clone()));
            self.last_status_line = line;
        }
        if !self.ready_sent && self.routes_sent.is_some() && self.all_ready() {
            tracing::info!("all instances ready: {}", self.last_status_line);
            self.send_launcher(FleetToLauncher::Ready);
            self.ready_sent = true;
        }
    }

    /// Graceful/Fast: stop every instance (whole groups; Fast: SIGKILL at once), then
    /// `Stopped`. Upgrade: leave them running for the next fleet worker, send the state,
    /// then `Stopped`.
    pub async fn shutdown(&mut self, kind: ShutdownKind) {
        self.shutting_down = true;
        if kind != ShutdownKind::Upgrade {
            for inst in self.instances.values_mut() {
                inst.in_routes = false;
            }
            self.publish_routes(false);
            let stop_timeout = Self::ms(self.health.stop_timeout_ms);
            let fast = kind == ShutdownKind::Fast;
            let mut stops = JoinSet::new();
            for inst in self.instances.values() {
                if let Some(pid) = inst.pid {
                    let target = StopTarget {
                        pgid: pid,
                        pid,
                        port: inst.port,
                        exited: inst.exited.subscribe(),
                    };
                    stops.spawn(process::stop_group(target, stop_timeout, fast));
                }
            }
            tracing::info!(instances = stops.len(), ?kind, "stopping all instances");
            while stops.join_next().await.is_some() {}
            self.instances.clear();
        }
        let state = self.fleet_state();
        self.send_launcher(FleetToLauncher::State(state));
        self.send_launcher(FleetToLauncher::Stopped);
        if let Some(task) = self.proxy_task.take() {
            // Let queued routes reach the proxy before the link goes.
            self.proxy = None;
            let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
        }
    }
}

/// Polls the instance every [`READY_POLL`] until it answers below 500 (`Ok`), `timeout`
/// passes (`Err`), or it exits or is removed (`None`: the exit is handled elsewhere).
async fn wait_ready(
    prober: &Prober,
    pool: Pool,
    port: u16,
    timeout: Duration,
    mut gone: watch::Receiver<bool>,
) -> Option<Result<(), String>> {
    let deadline = Instant::now() + timeout;
    loop {
        if *gone.borrow() {
            return None;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let last = match prober
            .probe(
                pool,
                port,
                left.clamp(Duration::from_millis(50), Duration::from_secs(2)),
            )
            .await
        {
            Ok(_) => return Some(Ok(())),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Some(Err(format!(
                "not ready after {} ms: {last}",
                timeout.as_millis()
            )));
        }
        tokio::select! {
            _ = tokio::time::sleep(READY_POLL) => {}
            changed = gone.changed() => if changed.is_err() { return None },
        }
    }
}

/// A previous fleet worker's instance is kept if its leader still runs and it answers.
async fn adopt_probe(prober: &Prober, record: &InstanceRecord) -> Result<(), String> {
    if process::exited(record.pid) {
        return Err(format!("process {} is gone", record.pid));
    }
    let mut last = String::new();
    for _ in 0..3 {
        match prober
            .probe(record.pool, record.port, Duration::from_secs(2))
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) => last = e,
        }
        tokio::time::sleep(READY_POLL).await;
    }
    Err(last)
}

/// Runs one proxy channel: handshake, then forwards what the proxy says as [`Cmd::Proxy`]
/// and writes what the fleet queues, in order.
async fn proxy_link(epoch: u64, fd: OwnedFd, cmd_tx: mpsc::UnboundedSender<Cmd>) {
    let channel = match Channel::<FleetToProxy, ProxyToFleet>::new(fd) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(epoch, "proxy channel: {e}");
            let _ = cmd_tx.send(Cmd::ProxyDown { epoch });
            return;
        }
    };
    if let Err(e) = channel.handshake().await {
        tracing::warn!(epoch, "proxy channel handshake: {e}");
        let _ = cmd_tx.send(Cmd::ProxyDown { epoch });
        return;
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    if cmd_tx.send(Cmd::ProxyUp { epoch, tx }).is_err() {
        return;
    }
    let writer = async {
        while let Some(msg) = rx.recv().await {
            if let Err(e) = channel.send(&msg).await {
                tracing::warn!(epoch, "proxy channel send: {e}");
                return;
            }
        }
    };
    let reader = async {
        loop {
            match channel.recv().await {
                Ok(Some(received)) => {
                    if cmd_tx
                        .send(Cmd::Proxy {
                            epoch,
                            msg: received.msg,
                        })
                        .is_err()
                    {
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(epoch, "proxy channel receive: {e}");
                    return;
                }
            }
        }
    };
    tokio::select! {
        _ = writer => {}
        _ = reader => {}
    }
    let _ = cmd_tx.send(Cmd::ProxyDown { epoch });
}
