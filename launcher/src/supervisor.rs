//! The launcher's event loop: start the workers, hand them their sockets, connect them to each
//! other, respawn whichever dies, reap orphaned instances, reload, re-execute itself for an
//! upgrade, and shut everything down in order.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use protocol::fdpass::{seqpacket_pair, set_inheritable};
use protocol::{
    Channel, ChannelError, FleetInit, FleetState, FleetToLauncher, LauncherToFleet,
    LauncherToProxy, ListenerSpec, ProxyInit, ProxySettings, ProxyToLauncher, ShutdownKind,
    TlsMaterial, UpgradeState,
};

use crate::config::{Accounts, Config};
use crate::notify;
use crate::roles::{worker_command, Role};
use crate::upgrade;

/// How long a freshly spawned worker has to answer the hello.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A worker that dies sooner than this after starting counts as a crash loop…
const CRASH_LOOP_WINDOW: Duration = Duration::from_secs(2);
/// …and is respawned after a delay doubling up to this, instead of at once.
const MAX_RESPAWN_DELAY: Duration = Duration::from_secs(10);
/// Beyond drain/stop timeouts, how long a worker gets to exit after being asked.
const EXIT_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    #[error("cannot start the {role} worker: {source}")]
    Spawn {
        role: &'static str,
        source: std::io::Error,
    },
    #[error("{role} worker: {source}")]
    Channel {
        role: &'static str,
        source: ChannelError,
    },
    #[error("{role} worker did not answer the handshake within {HANDSHAKE_TIMEOUT:?}")]
    HandshakeTimeout { role: &'static str },
    #[error("cannot set up signal handling: {0}")]
    Signals(std::io::Error),
}

/// Everything the launcher prepared as root, handed to the event loop.
pub struct Prepared {
    pub config: Config,
    /// Run workers as the configured users (the launcher is root).
    pub switch_users: bool,
    pub listeners: Vec<(ListenerSpec, OwnedFd)>,
    pub control: OwnedFd,
    pub tls: Option<TlsMaterial>,
    pub certificates: Vec<TlsMaterial>,
    pub proxy_settings: ProxySettings,
    /// The binary `upgrade` without `--binary` executes: the path this one was started from.
    pub exe_path: PathBuf,
    /// Set when this launcher was re-executed by an upgrade.
    pub resume: Option<Resume>,
}

/// What a re-executed launcher inherits from its predecessor.
pub struct Resume {
    /// The previous build's proxy worker and its channel, retired once a new one serves.
    pub old_proxy: Option<(Pid, OwnedFd)>,
    pub fleet_state: Option<FleetState>,
    pub started_unix_ms: u64,
    pub upgrades: u32,
}

enum Event {
    Proxy(u64, Option<ProxyToLauncher>),
    Fleet(u64, Option<FleetToLauncher>),
    OldProxy(Option<ProxyToLauncher>),
}

struct Worker<Tx, Rx> {
    pid: Pid,
    generation: u64,
    started: Instant,
    chan: Rc<Channel<Tx, Rx>>,
}

/// An old proxy worker draining after an upgrade; killed at `deadline` if still there.
struct Retiring {
    pid: Pid,
    chan: Rc<Channel<LauncherToProxy, ProxyToLauncher>>,
    deadline: Option<Instant>,
}

#[derive(Default)]
struct Respawn {
    failures: u32,
    due: Option<Instant>,
}

impl Respawn {
    /// Records a death; schedules the respawn.
    fn after_death(&mut self, lived: Duration) {
        if lived < CRASH_LOOP_WINDOW {
            self.failures += 1;
        } else {
            self.failures = 0;
        }
        let delay = if self.failures <= 1 {
            Duration::ZERO
        } else {
            (Duration::from_millis(250) * 2u32.saturating_pow(self.failures - 2))
                .min(MAX_RESPAWN_DELAY)
        };
        self.due = Some(Instant::now() + delay);
    }
}

pub struct Supervisor {
    prepared: Prepared,
    pid: Pid,
    started_unix_ms: u64,
    upgrades: u32,
    generation: u64,
    events_tx: mpsc::UnboundedSender<Event>,
    events: mpsc::UnboundedReceiver<Event>,
    proxy: Option<Worker<LauncherToProxy, ProxyToLauncher>>,
    fleet: Option<Worker<LauncherToFleet, FleetToLauncher>>,
    proxy_respawn: Respawn,
    fleet_respawn: Respawn,
    proxy_ready: bool,
    fleet_ready: bool,
    announced_ready: bool,
    fleet_state: Option<FleetState>,
    old_proxy_fd: Option<(Pid, OwnedFd)>,
    retiring: Option<Retiring>,
    stopping: bool,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Forwards every message of a worker channel into the event queue, then its end.
fn forward<Tx, Rx>(
    chan: Rc<Channel<Tx, Rx>>,
    tx: mpsc::UnboundedSender<Event>,
    name: &'static str,
    wrap: impl Fn(Option<Rx>) -> Event + 'static,
) where
    Tx: serde::Serialize + 'static,
    Rx: serde::de::DeserializeOwned + 'static,
{
    tokio::task::spawn_local(async move {
        loop {
            match chan.recv().await {
                Ok(Some(r)) => {
                    if tx.send(wrap(Some(r.msg))).is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::error!("{name} worker channel: {e}");
                    break;
                }
            }
        }
        let _ = tx.send(wrap(None));
    });
}

impl Supervisor {
    pub fn new(mut prepared: Prepared) -> Self {
        let (events_tx, events) = mpsc::unbounded_channel();
        let (old_proxy_fd, fleet_state, started_unix_ms, upgrades) = match prepared.resume.take() {
            Some(r) => (r.old_proxy, r.fleet_state, r.started_unix_ms, r.upgrades),
            None => (None, None, unix_ms(SystemTime::now()), 0),
        };
        Supervisor {
            prepared,
            pid: nix::unistd::getpid(),
            started_unix_ms,
            upgrades,
            generation: 0,
            events_tx,
            events,
            proxy: None,
            fleet: None,
            proxy_respawn: Respawn::default(),
            fleet_respawn: Respawn::default(),
            proxy_ready: false,
            fleet_ready: false,
            announced_ready: false,
            fleet_state,
            old_proxy_fd,
            retiring: None,
            stopping: false,
        }
    }

    /// Spawns `role` with its channel end inherited as the only extra descriptor.
    async fn spawn<Tx, Rx>(&mut self, role: Role) -> Result<Worker<Tx, Rx>, SuperviseError>
    where
        Tx: serde::Serialize,
        Rx: serde::de::DeserializeOwned,
    {
        let name = role.name();
        let spawn_err = |source| SuperviseError::Spawn { role: name, source };
        let (ours, theirs) = seqpacket_pair().map_err(spawn_err)?;
        set_inheritable(theirs.as_fd(), true).map_err(spawn_err)?;
        let account = self
            .prepared
            .switch_users
            .then(|| role.account(&self.prepared.config));
        let child = worker_command(
            role,
            account,
            theirs.as_raw_fd(),
            self.pid,
            self.prepared.config.log.json,
        )
        .spawn()
        .map_err(spawn_err)?;
        drop(theirs);
        let pid = Pid::from_raw(child.id() as i32);
        // Reaped by `reap` through waitpid, never through `child`.
        drop(child);
        let chan = Channel::new(ours).map_err(spawn_err)?;
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, chan.handshake()).await {
            Ok(Ok(hello)) => {
                tracing::info!(pid = pid.as_raw(), build = %hello.build, "{name} worker started")
            }
            Ok(Err(source)) => {
                let _ = kill(pid, Signal::SIGKILL);
                return Err(SuperviseError::Channel { role: name, source });
            }
            Err(_) => {
                let _ = kill(pid, Signal::SIGKILL);
                return Err(SuperviseError::HandshakeTimeout { role: name });
            }
        }
        self.generation += 1;
        Ok(Worker {
            pid,
            generation: self.generation,
            started: Instant::now(),
            chan: Rc::new(chan),
        })
    }

    fn proxy_init(&self) -> (ProxyInit, Vec<BorrowedFd<'_>>) {
        let init = ProxyInit {
            listeners: self
                .prepared
                .listeners
                .iter()
                .map(|(s, _)| s.clone())
                .collect(),
            tls: self.prepared.tls.clone(),
            certificates: self.prepared.certificates.clone(),
            settings: self.prepared.proxy_settings.clone(),
        };
        let fds = self
            .prepared
            .listeners
            .iter()
            .map(|(_, fd)| fd.as_fd())
            .collect();
        (init, fds)
    }

    async fn start_proxy(&mut self) -> Result<(), SuperviseError> {
        let worker = self
            .spawn::<LauncherToProxy, ProxyToLauncher>(Role::Proxy)
            .await?;
        let (init, fds) = self.proxy_init();
        worker
            .chan
            .send_with_fds(&LauncherToProxy::Start(init), &fds)
            .await
            .map_err(|source| SuperviseError::Channel {
                role: "proxy",
                source,
            })?;
        let generation = worker.generation;
        forward(
            worker.chan.clone(),
            self.events_tx.clone(),
            "proxy",
            move |m| Event::Proxy(generation, m),
        );
        self.proxy = Some(worker);
        self.proxy_ready = false;
        Ok(())
    }

    fn fleet_init(&self) -> FleetInit {
        let c = &self.prepared.config;
        FleetInit {
            app: c.app.clone(),
            health: c.health.clone(),
            state_dir: c.state_dir.to_string_lossy().into_owned(),
            control_gid: c.control_group.as_ref().map(|(_, gid)| *gid),
            control_socket_path: c.control_socket.to_string_lossy().into_owned(),
            listeners: self
                .prepared
                .listeners
                .iter()
                .map(|(s, _)| s.clone())
                .collect(),
            launcher_pid: self.pid.as_raw(),
            launcher_started_unix_ms: self.started_unix_ms,
            state: self.fleet_state.clone(),
            deploy: c.deploy.clone(),
            log: c.log.clone(),
            upgrades: self.upgrades,
        }
    }

    async fn start_fleet(&mut self) -> Result<(), SuperviseError> {
        let worker = self
            .spawn::<LauncherToFleet, FleetToLauncher>(Role::Fleet)
            .await?;
        worker
            .chan
            .send_with_fds(
                &LauncherToFleet::Start(self.fleet_init()),
                &[self.prepared.control.as_fd()],
            )
            .await
            .map_err(|source| SuperviseError::Channel {
                role: "fleet",
                source,
            })?;
        let generation = worker.generation;
        forward(
            worker.chan.clone(),
            self.events_tx.clone(),
            "fleet",
            move |m| Event::Fleet(generation, m),
        );
        self.fleet = Some(worker);
        self.fleet_ready = false;
        Ok(())
    }

    /// Gives both workers the two ends of a fresh proxy↔fleet channel.
    async fn connect_peers(&mut self) {
        let (Some(proxy), Some(fleet)) = (&self.proxy, &self.fleet) else {
            return;
        };
        let (a, b) = match seqpacket_pair() {
            Ok(pair) => pair,
            Err(e) => {
                tracing::error!("cannot create the proxy-fleet channel: {e}");
                return;
            }
        };
        if let Err(e) = proxy
            .chan
            .send_with_fds(&LauncherToProxy::FleetChannel, &[a.as_fd()])
            .await
        {
            tracing::error!("cannot hand the fleet channel to the proxy worker: {e}");
        }
        if let Err(e) = fleet
            .chan
            .send_with_fds(&LauncherToFleet::ProxyChannel, &[b.as_fd()])
            .await
        {
            tracing::error!("cannot hand the proxy channel to the fleet worker: {e}");
        }
    }

    async fn answer_fleet(&self, ok: bool, message: String) {
        if let Some(fleet) = &self.fleet {
            if let Err(e) = fleet
                .chan
                .send(&LauncherToFleet::Answer { ok, message })
                .await
            {
                tracing::warn!("cannot answer the fleet worker: {e}");
            }
        }
    }

    /// Handles one event; returns a binary to re-execute when an upgrade is under way.
    async fn on_event(
        &mut self,
        event: Event,
        sigchld: &mut tokio::signal::unix::Signal,
    ) -> Option<OwnedFd> {
        match event {
            Event::Proxy(generation, msg) => {
                if self.proxy.as_ref().map(|w| w.generation) != Some(generation) {
                    return None;
                }
                match msg {
                    Some(ProxyToLauncher::Ready) => {
                        self.proxy_ready = true;
                        tracing::info!("proxy worker serving");
                        self.retire_old_proxy().await;
                    }
                    Some(ProxyToLauncher::Drained) => tracing::info!("proxy worker drained"),
                    None => {
                        // The process exit (reaped below) is what triggers the respawn.
                        if let Some(w) = &self.proxy {
                            let _ = kill(w.pid, Signal::SIGKILL);
                        }
                    }
                }
            }
            Event::OldProxy(msg) => {
                if let Some(ProxyToLauncher::Drained) = msg {
                    tracing::info!("old proxy worker drained");
                }
            }
            Event::Fleet(generation, msg) => {
                if self.fleet.as_ref().map(|w| w.generation) != Some(generation) {
                    return None;
                }
                match msg {
                    Some(FleetToLauncher::Ready) => {
                        self.fleet_ready = true;
                        tracing::info!("fleet worker: instances ready");
                    }
                    Some(FleetToLauncher::Status(line)) => notify::status(&line),
                    Some(FleetToLauncher::State(state)) => self.fleet_state = Some(state),
                    Some(FleetToLauncher::Stopped) => tracing::info!("fleet worker stopped"),
                    Some(FleetToLauncher::Reload) => {
                        let (ok, message) = match self.reload().await {
                            Ok(m) => (true, m),
                            Err(m) => (false, m),
                        };
                        self.answer_fleet(ok, message).await;
                    }
                    Some(FleetToLauncher::Upgrade { binary, uid }) => {
                        match self.prepare_upgrade(binary, uid).await {
                            Ok((fd, build)) => {
                                self.answer_fleet(
                                    true,
                                    format!("preflight passed (build {build}); re-executing"),
                                )
                                .await;
                                self.stop_fleet_for_upgrade(sigchld).await;
                                return Some(fd);
                            }
                            Err(message) => {
                                tracing::warn!("upgrade refused: {message}");
                                self.answer_fleet(false, message).await;
                            }
                        }
                    }
                    None => {
                        if let Some(w) = &self.fleet {
                            let _ = kill(w.pid, Signal::SIGKILL);
                        }
                    }
                }
            }
        }
        if self.proxy_ready && self.fleet_ready && !self.announced_ready {
            self.announced_ready = true;
            let line = "serving: listeners open, instances ready";
            tracing::info!("{line}");
            notify::ready(line);
        }
        None
    }

    /// Reaps every exited child: a worker (respawned unless stopping), a retired proxy, or an
    /// orphaned instance (the fleet worker is told, so it can replace it).
    async fn reap(&mut self) {
        loop {
            let status = match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(nix::Error::ECHILD) => return,
                Ok(status) => status,
                Err(e) => {
                    tracing::error!("waitpid: {e}");
                    return;
                }
            };
            let (pid, code, sig) = match status {
                WaitStatus::Exited(pid, code) => (pid, Some(code), None),
                WaitStatus::Signaled(pid, sig, _) => (pid, None, Some(sig as i32)),
                _ => continue,
            };
            if self.proxy.as_ref().map(|w| w.pid) == Some(pid) {
                let w = self.proxy.take().expect("checked");
                self.proxy_ready = false;
                if !self.stopping {
                    tracing::error!(
                        pid = pid.as_raw(),
                        ?code,
                        ?sig,
                        "proxy worker died; respawning"
                    );
                    self.proxy_respawn.after_death(w.started.elapsed());
                }
            } else if self.fleet.as_ref().map(|w| w.pid) == Some(pid) {
                let w = self.fleet.take().expect("checked");
                self.fleet_ready = false;
                if !self.stopping {
                    tracing::error!(
                        pid = pid.as_raw(),
                        ?code,
                        ?sig,
                        "fleet worker died; respawning"
                    );
                    self.fleet_respawn.after_death(w.started.elapsed());
                }
            } else if self.retiring.as_ref().map(|r| r.pid) == Some(pid) {
                tracing::info!(pid = pid.as_raw(), "old proxy worker exited");
                self.retiring = None;
            } else {
                if let Some(state) = &mut self.fleet_state {
                    state.instances.retain(|i| i.pid != pid.as_raw());
                }
                if let Some(fleet) = &self.fleet {
                    let msg = LauncherToFleet::Exited {
                        pid: pid.as_raw(),
                        code,
                        signal: sig,
                    };
                    if let Err(e) = fleet.chan.send(&msg).await {
                        tracing::warn!("cannot tell the fleet worker about pid {pid}: {e}");
                    }
                }
            }
        }
    }

    /// Respawns whichever worker is due.
    async fn respawn_due(&mut self) {
        let now = Instant::now();
        let mut respawned = false;
        if self.proxy.is_none() && self.proxy_respawn.due.is_some_and(|d| d <= now) {
            self.proxy_respawn.due = None;
            match self.start_proxy().await {
                Ok(()) => respawned = true,
                Err(e) => {
                    tracing::error!("{e}");
                    self.proxy_respawn.after_death(Duration::ZERO);
                }
            }
        }
        if self.fleet.is_none() && self.fleet_respawn.due.is_some_and(|d| d <= now) {
            self.fleet_respawn.due = None;
            match self.start_fleet().await {
                Ok(()) => respawned = true,
                Err(e) => {
                    tracing::error!("{e}");
                    self.fleet_respawn.after_death(Duration::ZERO);
                }
            }
        }
        if respawned {
            self.connect_peers().await;
        }
    }

    fn next_timer(&self) -> Option<Instant> {
        [
            self.proxy_respawn.due,
            self.fleet_respawn.due,
            self.retiring.as_ref().and_then(|r| r.deadline),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    async fn on_timer(&mut self) {
        if let Some(r) = &mut self.retiring {
            if r.deadline.is_some_and(|d| d <= Instant::now()) {
                tracing::warn!(
                    pid = r.pid.as_raw(),
                    "old proxy worker missed its deadline; killing it"
                );
                let _ = kill(r.pid, Signal::SIGKILL);
                r.deadline = None;
            }
        }
        self.respawn_due().await;
    }

    /// Once a new proxy worker serves, the previous build's one stops accepting and drains.
    async fn retire_old_proxy(&mut self) {
        let Some(r) = &mut self.retiring else {
            return;
        };
        if r.deadline.is_some() {
            return;
        }
        tracing::info!(
            pid = r.pid.as_raw(),
            "new proxy worker serving; draining the old one"
        );
        let _ = r
            .chan
            .send(&LauncherToProxy::Shutdown(ShutdownKind::Graceful))
            .await;
        r.deadline = Some(
            Instant::now()
                + Duration::from_millis(self.prepared.config.health.drain_timeout_ms)
                + EXIT_GRACE,
        );
    }

    /// Re-reads the config and certificates and pushes them to both workers. Nothing changes
    /// unless everything could be read and bound.
    async fn reload(&mut self) -> Result<String, String> {
        let path = self.prepared.config.path.clone();
        let accounts = if self.prepared.switch_users {
            Accounts::Switch
        } else {
            Accounts::Inherit
        };
        let new =
            Config::load(&path, accounts).map_err(|e| format!("invalid configuration: {e}"))?;
        let old = &self.prepared.config;
        for (what, changed) in [
            (
                "[overwatch].control_socket",
                new.control_socket != old.control_socket,
            ),
            ("[overwatch].state_dir", new.state_dir != old.state_dir),
            ("[overwatch].user", new.proxy_user != old.proxy_user),
            ("[app].user", new.app_user != old.app_user),
        ] {
            if changed {
                return Err(format!(
                    "changing {what} needs a restart; configuration unchanged"
                ));
            }
        }
        let (tls, certificates) = crate::read_tls(&new).map_err(|e| e.to_string())?;
        let proxy_settings = new
            .proxy_settings()
            .map_err(|e| format!("CA bundle: {e}"))?;
        // Keep the sockets of listeners that stay; bind the new ones.
        let mut old_listeners: Vec<Option<(ListenerSpec, OwnedFd)>> =
            std::mem::take(&mut self.prepared.listeners)
                .into_iter()
                .map(Some)
                .collect();
        let mut listeners = Vec::new();
        for spec in new.listeners() {
            let reuse = old_listeners.iter_mut().find(|slot| {
                slot.as_ref().is_some_and(|(s, _)| {
                    s.kind == spec.kind && (s.addr == spec.addr || spec.addr.ends_with(":0"))
                })
            });
            match reuse.and_then(Option::take) {
                Some(kept) => listeners.push(kept),
                None => match crate::bind::tcp_listener(spec.addr.parse().expect("validated")) {
                    Ok((fd, bound)) => listeners.push((
                        ListenerSpec {
                            kind: spec.kind,
                            addr: bound.to_string(),
                        },
                        fd,
                    )),
                    Err(e) => {
                        // Put everything back as it was.
                        let mut restored: Vec<_> = old_listeners.into_iter().flatten().collect();
                        restored.extend(listeners);
                        restored.sort_by_key(|(s, _)| {
                            (s.kind != protocol::ListenerKind::Https, s.addr.clone())
                        });
                        self.prepared.listeners = restored;
                        return Err(format!("{e}; configuration unchanged"));
                    }
                },
            }
        }
        let closed: Vec<String> = old_listeners
            .iter()
            .flatten()
            .map(|(s, _)| s.addr.clone())
            .collect();
        self.prepared.listeners = listeners;
        self.prepared.tls = tls;
        self.prepared.certificates = certificates;
        self.prepared.proxy_settings = proxy_settings;
        self.prepared.config = new;
        if let Some(proxy) = &self.proxy {
            let (init, fds) = self.proxy_init();
            if let Err(e) = proxy
                .chan
                .send_with_fds(&LauncherToProxy::Reconfigure(init), &fds)
                .await
            {
                tracing::error!("cannot reconfigure the proxy worker: {e}");
            }
        }
        if let Some(fleet) = &self.fleet {
            if let Err(e) = fleet
                .chan
                .send(&LauncherToFleet::Reconfigure(self.fleet_init()))
                .await
            {
                tracing::error!("cannot reconfigure the fleet worker: {e}");
            }
        }
        let message = if closed.is_empty() {
            "reloaded".to_string()
        } else {
            format!("reloaded; closed {}", closed.join(", "))
        };
        tracing::info!("{message}");
        Ok(message)
    }

    /// Checks who asks and what binary, then preflights it. Nothing has changed on error.
    async fn prepare_upgrade(
        &mut self,
        binary: Option<String>,
        uid: u32,
    ) -> Result<(OwnedFd, String), String> {
        if binary.is_some() && uid != 0 {
            return Err(format!(
                "upgrade --binary is accepted from uid 0 only (you are uid {uid})"
            ));
        }
        if self.retiring.is_some() {
            return Err(
                "an upgrade is still finishing: the previous proxy worker is draining".into(),
            );
        }
        let path = binary
            .map(PathBuf::from)
            .unwrap_or_else(|| self.prepared.exe_path.clone());
        let strict = nix::unistd::geteuid().is_root();
        let config = self.prepared.config.path.clone();
        tokio::task::spawn_blocking(move || {
            let fd = upgrade::open_trusted(&path, strict).map_err(|e| e.to_string())?;
            let build = upgrade::preflight(fd.as_fd(), &config).map_err(|e| e.to_string())?;
            Ok((fd, build))
        })
        .await
        .map_err(|e| format!("preflight task: {e}"))?
    }

    /// Asks the fleet worker to step aside, leaving its instances for the next one.
    async fn stop_fleet_for_upgrade(&mut self, sigchld: &mut tokio::signal::unix::Signal) {
        if let Some(fleet) = &self.fleet {
            let _ = fleet
                .chan
                .send(&LauncherToFleet::Shutdown(ShutdownKind::Upgrade))
                .await;
            self.stopping = true;
            self.wait_gone(sigchld, Role::Fleet, Duration::from_secs(10))
                .await;
            self.stopping = false;
        }
    }

    /// Re-executes `binary` with everything inherited. Returns only if the exec failed.
    fn exec_upgrade(&mut self, binary: OwnedFd) -> String {
        let proxy = self.proxy.as_ref().map(|w| (w.pid, w.chan.as_fd()));
        let state = UpgradeState {
            config_path: self.prepared.config.path.to_string_lossy().into_owned(),
            listeners: self
                .prepared
                .listeners
                .iter()
                .map(|(s, fd)| (s.clone(), fd.as_raw_fd()))
                .collect(),
            control_fd: self.prepared.control.as_raw_fd(),
            switch_users: self.prepared.switch_users,
            old_proxy: proxy.map(|(pid, fd)| (pid.as_raw(), fd.as_raw_fd())),
            fleet_state: self.fleet_state.clone(),
            started_unix_ms: self.started_unix_ms,
            upgrades: self.upgrades + 1,
            exe_path: self.prepared.exe_path.to_string_lossy().into_owned(),
        };
        let bytes = match protocol::frame::encode(&state) {
            Ok(b) => b,
            Err(e) => return e.to_string(),
        };
        let memfd = match upgrade::state_memfd(&bytes) {
            Ok(fd) => fd,
            Err(e) => return e.to_string(),
        };
        let mut keep: Vec<BorrowedFd<'_>> = self
            .prepared
            .listeners
            .iter()
            .map(|(_, fd)| fd.as_fd())
            .collect();
        keep.push(self.prepared.control.as_fd());
        keep.push(memfd.as_fd());
        if let Some((_, fd)) = proxy {
            keep.push(fd);
        }
        let mut args = vec![
            "overwatch".to_string(),
            "run".into(),
            "--config".into(),
            state.config_path.clone(),
            "--upgrade-state-fd".into(),
            memfd.as_raw_fd().to_string(),
        ];
        if self.prepared.config.log.json {
            args.push("--log-json".into());
        }
        tracing::info!(upgrades = state.upgrades, "re-executing");
        upgrade::exec(binary.as_fd(), &args, &keep).to_string()
    }

    /// Runs until SIGTERM or SIGINT, then shuts down in order. Must run inside a `LocalSet`.
    pub async fn run(mut self) -> Result<(), SuperviseError> {
        let mut sigchld = signal(SignalKind::child()).map_err(SuperviseError::Signals)?;
        let mut sigterm = signal(SignalKind::terminate()).map_err(SuperviseError::Signals)?;
        let mut sigint = signal(SignalKind::interrupt()).map_err(SuperviseError::Signals)?;
        let mut sighup = signal(SignalKind::hangup()).map_err(SuperviseError::Signals)?;

        if let Some((pid, fd)) = self.old_proxy_fd.take() {
            match Channel::new(fd) {
                Ok(chan) => {
                    let chan = Rc::new(chan);
                    forward(
                        chan.clone(),
                        self.events_tx.clone(),
                        "old proxy",
                        Event::OldProxy,
                    );
                    self.retiring = Some(Retiring {
                        pid,
                        chan,
                        deadline: None,
                    });
                }
                Err(e) => {
                    tracing::error!("cannot adopt the old proxy worker's channel: {e}; killing it");
                    let _ = kill(pid, Signal::SIGKILL);
                }
            }
        }
        // A fresh launcher that cannot start its workers fails (systemd shows why); one that
        // was re-executed keeps the old proxy serving and retries with backoff instead.
        let resumed = self.retiring.is_some() || self.upgrades > 0;
        for role in [Role::Fleet, Role::Proxy] {
            let started = match role {
                Role::Fleet => self.start_fleet().await,
                Role::Proxy => self.start_proxy().await,
            };
            match started {
                Ok(()) => {}
                Err(e) if resumed => {
                    tracing::error!("{e}; retrying");
                    match role {
                        Role::Fleet => self.fleet_respawn.after_death(Duration::ZERO),
                        Role::Proxy => self.proxy_respawn.after_death(Duration::ZERO),
                    }
                }
                Err(e) => return Err(e),
            }
        }
        self.connect_peers().await;
        // Children that exited while we were exec'ing.
        self.reap().await;

        loop {
            let timer = self.next_timer();
            let upgrade_to = tokio::select! {
                Some(event) = self.events.recv() => self.on_event(event, &mut sigchld).await,
                _ = sigchld.recv() => {
                    self.reap().await;
                    self.respawn_due().await;
                    None
                }
                _ = async {
                    match timer {
                        Some(at) => tokio::time::sleep_until(at.into()).await,
                        None => std::future::pending().await,
                    }
                } => { self.on_timer().await; None }
                _ = sigterm.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
                _ = sigint.recv() => { tracing::info!("SIGINT: shutting down"); break; }
                _ = sighup.recv() => {
                    notify::reloading();
                    match self.reload().await {
                        Ok(m) => tracing::info!("SIGHUP: {m}"),
                        Err(m) => tracing::error!("SIGHUP: reload refused: {m}"),
                    }
                    notify::ready("reloaded");
                    None
                }
            };
            if let Some(binary) = upgrade_to {
                let error = self.exec_upgrade(binary);
                tracing::error!(
                    "upgrade failed after preflight: {error}; restarting the fleet worker"
                );
                self.fleet_respawn.due = Some(Instant::now());
                self.respawn_due().await;
            }
        }
        self.shutdown(&mut sigchld).await;
        Ok(())
    }

    /// Drains the proxy first (requests in flight finish), then stops the fleet (instances
    /// get SIGTERM, then SIGKILL), then makes sure nothing is left.
    async fn shutdown(&mut self, sigchld: &mut tokio::signal::unix::Signal) {
        self.stopping = true;
        notify::stopping();
        let health = self.prepared.config.health.clone();
        if let Some(r) = &self.retiring {
            let _ = kill(r.pid, Signal::SIGKILL);
        }
        if let Some(proxy) = &self.proxy {
            let _ = proxy
                .chan
                .send(&LauncherToProxy::Shutdown(ShutdownKind::Graceful))
                .await;
            let deadline = Duration::from_millis(health.drain_timeout_ms) + EXIT_GRACE;
            self.wait_gone(sigchld, Role::Proxy, deadline).await;
        }
        if let Some(fleet) = &self.fleet {
            let _ = fleet
                .chan
                .send(&LauncherToFleet::Shutdown(ShutdownKind::Graceful))
                .await;
            let deadline = Duration::from_millis(health.stop_timeout_ms) * 2 + EXIT_GRACE;
            self.wait_gone(sigchld, Role::Fleet, deadline).await;
        }
        // Instances the fleet worker could not stop (or that a dead one left behind).
        if let Some(state) = self.fleet_state.take() {
            for i in &state.instances {
                if killpg(Pid::from_raw(i.pgid), Signal::SIGKILL).is_ok() {
                    tracing::warn!(
                        pid = i.pid,
                        "killed leftover instance {}-{}",
                        i.pool,
                        i.index
                    );
                }
            }
        }
        // Reap what is left; give up after a short grace.
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until {
            match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Err(nix::Error::ECHILD) => break,
                Ok(WaitStatus::StillAlive) => tokio::time::sleep(Duration::from_millis(20)).await,
                _ => {}
            }
        }
        tracing::info!("stopped");
    }

    /// Waits until the worker of `role` has exited, SIGKILLing it at `deadline`.
    async fn wait_gone(
        &mut self,
        sigchld: &mut tokio::signal::unix::Signal,
        role: Role,
        deadline: Duration,
    ) {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let pid = match role {
                Role::Proxy => self.proxy.as_ref().map(|w| w.pid),
                Role::Fleet => self.fleet.as_ref().map(|w| w.pid),
            };
            let Some(pid) = pid else {
                return;
            };
            tokio::select! {
                Some(event) = self.events.recv() => {
                    // Only bookkeeping while waiting: no new operations start.
                    if let Event::Fleet(_, Some(FleetToLauncher::State(state))) = event {
                        self.fleet_state = Some(state);
                    }
                }
                _ = sigchld.recv() => self.reap().await,
                _ = tokio::time::sleep_until(until) => {
                    tracing::warn!("{} worker did not exit in {deadline:?}; killing it", role.name());
                    let _ = kill(pid, Signal::SIGKILL);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    self.reap().await;
                }
            }
        }
    }
}
