//! The unprivileged fleet worker: starts, health-checks and supervises the app instances,
//! tells the proxy which of them serve, and answers the control socket.
//!
//! # Layout
//! - [`run`]: the entry point; the launcher handshake, then the event loop.
//! - `fleet`: the state machine that owns the instances table, counts and routes; every
//!   other part talks to it through messages.
//! - `ops`: mutating operations for control clients (the rolling restart).
//! - `deploy`: deploy (pull, back up, build a release beside the live one, switch, roll) and
//!   rollback.
//! - `control`: the control socket: peer check, requests, log streaming.
//! - `process`: spawning an instance in its own process group, stopping the whole group.
//! - `health`: HTTP/HTTPS readiness and health probes.
//! - `ports`, `backoff`, `plan`, `logs`, `access`, `clock`: small pure parts, unit-tested.
#![forbid(unsafe_code)]

mod access;
mod backoff;
mod clock;
mod control;
mod deploy;
mod fleet;
mod health;
mod logs;
mod ops;
mod plan;
mod ports;
mod process;

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use protocol::{Channel, ChannelError, FleetToLauncher, LauncherToFleet, ShutdownKind};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::fleet::{Cmd, Exit, Fleet, FleetHandle};

/// How long queued messages to the launcher (`State`, `Stopped`) may take to go out at exit.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("launcher channel handshake: {0}")]
    Handshake(#[source] ChannelError),
    #[error("launcher channel: {0}")]
    Launcher(#[source] ChannelError),
    #[error("the launcher closed the channel before sending Start")]
    ClosedBeforeStart,
    #[error("expected Start from the launcher, got {got}")]
    NotStart { got: String },
    #[error("control socket {path}: {source}")]
    ControlSocket {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("empty instance port range {min}-{max}")]
    PortRange { min: u16, max: u16 },
    #[error(transparent)]
    Health(#[from] health::HealthError),
}

/// Runs the fleet worker until the launcher says `Shutdown` or closes the channel.
pub async fn run(launcher: Channel<FleetToLauncher, LauncherToFleet>) -> Result<(), Error> {
    launcher.handshake().await.map_err(Error::Handshake)?;
    let first = launcher
        .recv()
        .await
        .map_err(Error::Launcher)?
        .ok_or(Error::ClosedBeforeStart)?;
    if !matches!(first.msg, LauncherToFleet::Start(_)) {
        return Err(Error::NotStart {
            got: variant(&first.msg),
        });
    }
    first.expect_fds("Start", 1).map_err(Error::Launcher)?;
    let LauncherToFleet::Start(mut init) = first.msg else {
        return Err(Error::ClosedBeforeStart);
    };
    let control_path = init.control_socket_path.clone();
    let control_fd = first
        .fds
        .into_iter()
        .next()
        .ok_or(Error::ClosedBeforeStart)?;
    let control = control_listener(control_fd).map_err(|source| Error::ControlSocket {
        path: control_path.clone(),
        source,
    })?;
    let prober = health::Prober::new(&init.health.path)?;
    let adopt = init.state.take();
    let (min, max) = (init.app.port_min, init.app.port_max);
    let state_dir = PathBuf::from(&init.state_dir);
    let log_settings = init.log.clone();
    let health = init.health.clone();
    let control_gid = init.control_gid;
    let app_dir = PathBuf::from(&init.app.dir);

    let (cmd_tx, mut cmd_rx) = mpsc::unbounded_channel();
    let launcher = Arc::new(launcher);
    let (launcher_tx, writer) = launcher_writer(launcher.clone());
    let reader = tokio::spawn(launcher_reader(launcher, cmd_tx.clone()));
    let Some(mut fleet) = Fleet::new(init, launcher_tx, cmd_tx.clone(), prober) else {
        reader.abort();
        return Err(Error::PortRange { min, max });
    };
    tokio::spawn(logs::rotate_forever(
        logs::log_dir(&state_dir),
        log_settings.max_size,
        log_settings.keep,
    ));
    let ctx = Arc::new(control::Context {
        fleet: FleetHandle(cmd_tx.clone()),
        state_dir,
        health,
        our_uid: nix::unistd::geteuid().as_raw(),
        control_gid,
    });
    let acceptor = tokio::spawn(control::serve(control, ctx));
    tokio::spawn(base_release(app_dir, FleetHandle(cmd_tx.clone())));
    tracing::info!(control = %control_path, "fleet worker started");

    if let Some(state) = adopt {
        fleet.adopt(state).await;
    }
    fleet.start_missing();
    fleet.sync();
    let result = loop {
        let Some(cmd) = cmd_rx.recv().await else {
            break Ok(());
        };
        match fleet.handle(cmd) {
            None => fleet.sync(),
            Some(Exit::Shutdown(kind)) => {
                tracing::info!(?kind, "shutdown requested by the launcher");
                fleet.shutdown(kind).await;
                break Ok(());
            }
            Some(Exit::LauncherGone(err)) => {
                match &err {
                    None => tracing::warn!("launcher channel closed: stopping all instances"),
                    Some(e) => {
                        tracing::error!("launcher channel failed: {e}; stopping all instances")
                    }
                }
                fleet.shutdown(ShutdownKind::Graceful).await;
                break err.map_or(Ok(()), |e| Err(Error::Launcher(e)));
            }
        }
    };
    acceptor.abort();
    reader.abort();
    drop(fleet);
    let _ = tokio::time::timeout(FLUSH_TIMEOUT, writer).await;
    result
}

/// The listening control socket handed over by the launcher, made non-blocking for tokio.
fn control_listener(fd: OwnedFd) -> std::io::Result<tokio::net::UnixListener> {
    let listener = std::os::unix::net::UnixListener::from(fd);
    listener.set_nonblocking(true)?;
    tokio::net::UnixListener::from_std(listener)
}

/// Messages to the launcher go through one queue so the state machine never waits on the
/// socket; the task ends when the queue's sender is dropped and everything is sent.
fn launcher_writer(
    channel: Arc<Channel<FleetToLauncher, LauncherToFleet>>,
) -> (mpsc::UnboundedSender<FleetToLauncher>, JoinHandle<()>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<FleetToLauncher>();
    let task = tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            if let Err(e) = channel.send(&msg).await {
                tracing::warn!("launcher channel send: {e}");
                return;
            }
        }
    });
    (tx, task)
}

async fn launcher_reader(
    channel: Arc<Channel<FleetToLauncher, LauncherToFleet>>,
    cmd_tx: mpsc::UnboundedSender<Cmd>,
) {
    loop {
        match channel.recv().await {
            Ok(Some(received)) => {
                if cmd_tx.send(Cmd::Launcher(Box::new(received))).is_err() {
                    return;
                }
            }
            Ok(None) => {
                let _ = cmd_tx.send(Cmd::LauncherClosed(None));
                return;
            }
            Err(e) => {
                let _ = cmd_tx.send(Cmd::LauncherClosed(Some(e)));
                return;
            }
        }
    }
}

/// Tells the state machine which commit the app directory holds, for `status`.
async fn base_release(app_dir: PathBuf, fleet: FleetHandle) {
    if !app_dir.join(".git").exists() {
        return;
    }
    let out = tokio::process::Command::new("git")
        .args(["-c", "safe.directory=*", "rev-parse", "--short", "HEAD"])
        .current_dir(&app_dir)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .await;
    match out {
        Ok(out) if out.status.success() => {
            let label = String::from_utf8_lossy(&out.stdout).trim().to_string();
            fleet.tell(fleet::CtlCmd::BaseRelease(label));
        }
        Ok(out) => tracing::debug!("git rev-parse in {}: {}", app_dir.display(), out.status),
        Err(e) => tracing::debug!("git rev-parse in {}: {e}", app_dir.display()),
    }
}

fn variant(msg: &LauncherToFleet) -> String {
    match msg {
        LauncherToFleet::Start(_) => "Start",
        LauncherToFleet::ProxyChannel => "ProxyChannel",
        LauncherToFleet::Exited { .. } => "Exited",
        LauncherToFleet::Shutdown(_) => "Shutdown",
        LauncherToFleet::Answer { .. } => "Answer",
        LauncherToFleet::Reconfigure(_) => "Reconfigure",
    }
    .to_string()
}
