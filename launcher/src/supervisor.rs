//! The launcher's event loop: start the workers, hand them their sockets, connect them to each
//! other, respawn whichever dies, reap orphaned instances, and shut everything down in order.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
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
    TlsMaterial,
};

use crate::config::Config;
use crate::notify;
use crate::roles::{worker_command, Role};

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
    pub proxy_settings: ProxySettings,
}

enum Event {
    Proxy(u64, Option<ProxyToLauncher>),
    Fleet(u64, Option<FleetToLauncher>),
}

struct Worker<Tx, Rx> {
    pid: Pid,
    generation: u64,
    started: Instant,
    chan: Rc<Channel<Tx, Rx>>,
}

#[derive(Default)]
struct Respawn {
    failures: u32,
    due: Option<Instant>,
}

impl Respawn {
    /// Records a death; returns when to respawn.
    fn after_death(&mut self, lived: Duration) -> Instant {
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
        let due = Instant::now() + delay;
        self.due = Some(due);
        due
    }
}

pub struct Supervisor {
    prepared: Prepared,
    pid: Pid,
    started_unix_ms: u64,
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
    stopping: bool,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Supervisor {
    pub fn new(prepared: Prepared) -> Self {
        let (events_tx, events) = mpsc::unbounded_channel();
        Supervisor {
            prepared,
            pid: nix::unistd::getpid(),
            started_unix_ms: unix_ms(SystemTime::now()),
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
            fleet_state: None,
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
        let child = worker_command(role, account, theirs.as_raw_fd(), self.pid)
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

    async fn start_proxy(&mut self) -> Result<(), SuperviseError> {
        let worker = self
            .spawn::<LauncherToProxy, ProxyToLauncher>(Role::Proxy)
            .await?;
        let init = ProxyInit {
            listeners: self
                .prepared
                .listeners
                .iter()
                .map(|(s, _)| s.clone())
                .collect(),
            tls: self.prepared.tls.clone(),
            settings: self.prepared.proxy_settings.clone(),
        };
        let fds: Vec<BorrowedFd<'_>> = self
            .prepared
            .listeners
            .iter()
            .map(|(_, fd)| fd.as_fd())
            .collect();
        worker
            .chan
            .send_with_fds(&LauncherToProxy::Start(init), &fds)
            .await
            .map_err(|source| SuperviseError::Channel {
                role: "proxy",
                source,
            })?;
        let (chan, generation, tx) = (
            worker.chan.clone(),
            worker.generation,
            self.events_tx.clone(),
        );
        tokio::task::spawn_local(async move {
            loop {
                match chan.recv().await {
                    Ok(Some(r)) => {
                        let _ = tx.send(Event::Proxy(generation, Some(r.msg)));
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::error!("proxy worker channel: {e}");
                        break;
                    }
                }
            }
            let _ = tx.send(Event::Proxy(generation, None));
        });
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
        let (chan, generation, tx) = (
            worker.chan.clone(),
            worker.generation,
            self.events_tx.clone(),
        );
        tokio::task::spawn_local(async move {
            loop {
                match chan.recv().await {
                    Ok(Some(r)) => {
                        let _ = tx.send(Event::Fleet(generation, Some(r.msg)));
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::error!("fleet worker channel: {e}");
                        break;
                    }
                }
            }
            let _ = tx.send(Event::Fleet(generation, None));
        });
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

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Proxy(generation, msg) => {
                if self.proxy.as_ref().map(|w| w.generation) != Some(generation) {
                    return;
                }
                match msg {
                    Some(ProxyToLauncher::Ready) => {
                        self.proxy_ready = true;
                        tracing::info!("proxy worker serving");
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
            Event::Fleet(generation, msg) => {
                if self.fleet.as_ref().map(|w| w.generation) != Some(generation) {
                    return;
                }
                match msg {
                    Some(FleetToLauncher::Ready) => {
                        self.fleet_ready = true;
                        tracing::info!("fleet worker: instances ready");
                    }
                    Some(FleetToLauncher::Status(line)) => notify::status(&line),
                    Some(FleetToLauncher::State(state)) => self.fleet_state = Some(state),
                    Some(FleetToLauncher::Stopped) => tracing::info!("fleet worker stopped"),
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
    }

    /// Reaps every exited child: a worker (respawned unless stopping) or an orphaned instance
    /// (the fleet worker is told, so it can replace it).
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

    fn next_respawn(&self) -> Option<Instant> {
        [self.proxy_respawn.due, self.fleet_respawn.due]
            .into_iter()
            .flatten()
            .min()
    }

    /// Runs until SIGTERM or SIGINT, then shuts down in order. Must run inside a `LocalSet`.
    pub async fn run(mut self) -> Result<(), SuperviseError> {
        let mut sigchld = signal(SignalKind::child()).map_err(SuperviseError::Signals)?;
        let mut sigterm = signal(SignalKind::terminate()).map_err(SuperviseError::Signals)?;
        let mut sigint = signal(SignalKind::interrupt()).map_err(SuperviseError::Signals)?;
        let mut sighup = signal(SignalKind::hangup()).map_err(SuperviseError::Signals)?;

        self.start_proxy().await?;
        self.start_fleet().await?;
        self.connect_peers().await;

        loop {
            let respawn_at = self.next_respawn();
            tokio::select! {
                Some(event) = self.events.recv() => self.on_event(event),
                _ = sigchld.recv() => {
                    self.reap().await;
                    self.respawn_due().await;
                }
                _ = async {
                    match respawn_at {
                        Some(at) => tokio::time::sleep_until(at.into()).await,
                        None => std::future::pending().await,
                    }
                } => self.respawn_due().await,
                _ = sigterm.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
                _ = sigint.recv() => { tracing::info!("SIGINT: shutting down"); break; }
                _ = sighup.recv() => {
                    tracing::warn!("SIGHUP: reload is not implemented yet; configuration unchanged");
                }
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
            let gone = match role {
                Role::Proxy => self.proxy.is_none(),
                Role::Fleet => self.fleet.is_none(),
            };
            if gone {
                return;
            }
            tokio::select! {
                Some(event) = self.events.recv() => self.on_event(event),
                _ = sigchld.recv() => self.reap().await,
                _ = tokio::time::sleep_until(until) => {
                    let pid = match role {
                        Role::Proxy => self.proxy.as_ref().map(|w| w.pid),
                        Role::Fleet => self.fleet.as_ref().map(|w| w.pid),
                    };
                    if let Some(pid) = pid {
                        tracing::warn!("{} worker did not exit in {deadline:?}; killing it", role.name());
                        let _ = kill(pid, Signal::SIGKILL);
                    }
                    // The exit is reaped on the next SIGCHLD.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    self.reap().await;
                }
            }
        }
    }
}
