//! The control socket: accepts `overwatchctl` connections, checks each peer with
//! SO_PEERCRED, and answers requests. A bad handshake or corrupt frame closes only that
//! connection.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use protocol::ctl::CtlStream;
use protocol::{
    CtlRequest, CtlResponse, DeployArgs, FleetToLauncher, HealthSettings, RestartArgs, StatusReport,
};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::access::{self, Peer, SystemDb};
use crate::deploy::Deployer;
use crate::fleet::{CtlCmd, FleetHandle};
use crate::logs::{self, Follower};
use crate::ops::Operation;

/// A client that connects and says nothing is dropped after this long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `status` waits for the proxy's in-flight and served counters.
const STATS_TIMEOUT: Duration = Duration::from_millis(200);
/// An upgrade starts new workers and waits for them to be ready before it answers.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(300);
const RELOAD_TIMEOUT: Duration = Duration::from_secs(60);
/// How often `logs --follow` looks for new lines.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

type Ctl = CtlStream<CtlResponse, CtlRequest>;

/// What connections need besides the state machine.
pub struct Context {
    pub fleet: FleetHandle,
    pub state_dir: PathBuf,
    pub health: HealthSettings,
    pub our_uid: u32,
    pub control_gid: Option<u32>,
}

/// Accepts connections until the task is dropped; dropping it also ends every connection.
pub async fn serve(listener: UnixListener, ctx: Arc<Context>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(connection(stream, ctx.clone()));
                }
                Err(e) => {
                    tracing::warn!("control socket accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn connection(stream: UnixStream, ctx: Arc<Context>) {
    let decision = match stream.peer_cred() {
        Ok(cred) => {
            let peer = Peer {
                uid: cred.uid(),
                gid: cred.gid(),
                pid: cred.pid(),
            };
            let (our_uid, gid) = (ctx.our_uid, ctx.control_gid);
            tokio::task::spawn_blocking(move || {
                (peer, access::check(peer, our_uid, gid, &SystemDb))
            })
            .await
            .map_err(|e| format!("permission denied: access check failed: {e}"))
            .and_then(|(peer, result)| result.map(|()| peer))
        }
        Err(e) => Err(format!(
            "permission denied: cannot read peer credentials: {e}"
        )),
    };
    let mut ctl = match tokio::time::timeout(HANDSHAKE_TIMEOUT, Ctl::handshake(stream)).await {
        Ok(Ok((ctl, _hello))) => ctl,
        Ok(Err(e)) => {
            tracing::info!("control connection closed: handshake failed: {e}");
            return;
        }
        Err(_) => {
            tracing::info!("control connection closed: no handshake within {HANDSHAKE_TIMEOUT:?}");
            return;
        }
    };
    let peer = match decision {
        Ok(peer) => peer,
        Err(why) => {
            tracing::warn!("control connection refused: {why}");
            let _ = ctl.send(&CtlResponse::Refused(why)).await;
            return;
        }
    };
    loop {
        let request = match ctl.recv().await {
            Ok(Some(request)) => request,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(uid = peer.uid, "control connection closed: {e}");
                return;
            }
        };
        tracing::info!(
            uid = peer.uid,
            pid = peer.pid,
            "control request: {request:?}"
        );
        let open = match request {
            CtlRequest::Status => match status(&ctx.fleet).await {
                Some(report) => ctl.send(&CtlResponse::Status(report)).await.is_ok(),
                None => done(&mut ctl, false, "the fleet worker is stopping").await,
            },
            CtlRequest::RestartAll(args) => operation(&mut ctl, &ctx, Work::Restart(args)).await,
            CtlRequest::Deploy(args) => operation(&mut ctl, &ctx, Work::Deploy(args)).await,
            CtlRequest::Rollback => operation(&mut ctl, &ctx, Work::Rollback).await,
            CtlRequest::Logs {
                instance,
                lines,
                follow,
            } => serve_logs(&mut ctl, &ctx, instance, lines as usize, follow).await,
            CtlRequest::Upgrade { binary } => {
                if binary.is_some() && peer.uid != 0 {
                    let why = format!(
                        "permission denied: upgrade --binary is accepted from uid 0 only, not uid {}",
                        peer.uid
                    );
                    tracing::warn!("{why}");
                    ctl.send(&CtlResponse::Refused(why)).await.is_ok()
                } else {
                    let msg = FleetToLauncher::Upgrade {
                        binary,
                        uid: peer.uid,
                    };
                    ask_launcher(&mut ctl, &ctx, "upgrade", msg, UPGRADE_TIMEOUT).await
                }
            }
            CtlRequest::Reload => {
                let msg = FleetToLauncher::Reload;
                ask_launcher(&mut ctl, &ctx, "reload", msg, RELOAD_TIMEOUT).await
            }
        };
        if !open {
            return;
        }
    }
}

/// The operations that run in their own task with progress lines.
enum Work {
    Restart(RestartArgs),
    Deploy(DeployArgs),
    Rollback,
}

impl Work {
    fn name(&self) -> &'static str {
        match self {
            Work::Restart(_) => "restart-all",
            Work::Deploy(_) => "deploy",
            Work::Rollback => "rollback",
        }
    }
}

/// Runs `work` as the one mutating operation (or answers busy) in its own task, and streams
/// its progress to the client; the operation goes on if the client leaves. Returns whether
/// the connection is still open.
async fn operation(ctl: &mut Ctl, ctx: &Context, work: Work) -> bool {
    let Some(begin) = ctx
        .fleet
        .ask(|reply| CtlCmd::BeginOp {
            name: work.name().into(),
            reply,
        })
        .await
    else {
        return false;
    };
    if let Err(busy) = begin {
        return ctl.send(&CtlResponse::Refused(busy)).await.is_ok();
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let fleet = ctx.fleet.clone();
    let op = Operation::new(fleet.clone(), ctx.health.clone(), tx.clone());
    let state_dir = ctx.state_dir.clone();
    tokio::spawn(async move {
        let (ok, message) = match work {
            Work::Restart(args) => op.restart_all(args).await,
            Work::Deploy(args) => {
                Deployer::new(fleet.clone(), op, tx.clone(), &state_dir)
                    .deploy(args)
                    .await
            }
            Work::Rollback => {
                Deployer::new(fleet.clone(), op, tx.clone(), &state_dir)
                    .rollback()
                    .await
            }
        };
        fleet.tell(CtlCmd::EndOp {
            ok,
            message: message.clone(),
        });
        let _ = tx.send(CtlResponse::Done { ok, message });
    });
    forward(ctl, rx).await
}

/// Runs `upgrade` or `reload` as the one mutating operation: the launcher does the work
/// and answers.
async fn ask_launcher(
    ctl: &mut Ctl,
    ctx: &Context,
    name: &str,
    msg: FleetToLauncher,
    timeout: Duration,
) -> bool {
    let Some(begin) = ctx
        .fleet
        .ask(|reply| CtlCmd::BeginOp {
            name: name.into(),
            reply,
        })
        .await
    else {
        return false;
    };
    if let Err(busy) = begin {
        return ctl.send(&CtlResponse::Refused(busy)).await.is_ok();
    }
    let _ = ctl
        .send(&CtlResponse::Progress(format!(
            "{name}: asking the launcher"
        )))
        .await;
    let answer = tokio::time::timeout(
        timeout,
        ctx.fleet.ask(|reply| CtlCmd::AskLauncher { msg, reply }),
    )
    .await;
    let (ok, message) = match answer {
        Ok(Some(answer)) => answer,
        Ok(None) => (false, format!("{name}: the launcher did not answer")),
        Err(_) => (
            false,
            format!(
                "{name}: no answer from the launcher within {} s",
                timeout.as_secs()
            ),
        ),
    };
    ctx.fleet.tell(CtlCmd::EndOp {
        ok,
        message: message.clone(),
    });
    done(ctl, ok, &message).await
}

async fn done(ctl: &mut Ctl, ok: bool, message: &str) -> bool {
    ctl.send(&CtlResponse::Done {
        ok,
        message: message.to_string(),
    })
    .await
    .is_ok()
}

/// Streams an operation's lines until its `Done`; `false` when the client went away (the
/// operation carries on).
async fn forward(ctl: &mut Ctl, mut rx: mpsc::UnboundedReceiver<CtlResponse>) -> bool {
    while let Some(response) = rx.recv().await {
        let last = matches!(response, CtlResponse::Done { .. });
        if ctl.send(&response).await.is_err() {
            tracing::info!("control client left; the operation goes on");
            return false;
        }
        if last {
            return true;
        }
    }
    false
}

/// The status report with the proxy's counters merged in (zeros if it does not answer
/// within [`STATS_TIMEOUT`]).
async fn status(fleet: &FleetHandle) -> Option<StatusReport> {
    let stats = tokio::time::timeout(STATS_TIMEOUT, fleet.ask(CtlCmd::Stats))
        .await
        .ok()
        .flatten()
        .unwrap_or_default();
    let mut report = fleet.ask(CtlCmd::Status).await?;
    for inst in &mut report.instances {
        if let Some(s) = stats.iter().find(|s| s.id == inst.id) {
            inst.in_flight = s.in_flight;
            inst.served = s.served;
        }
    }
    Some(report)
}

async fn serve_logs(
    ctl: &mut Ctl,
    ctx: &Context,
    instance: Option<String>,
    lines: usize,
    follow: bool,
) -> bool {
    let files = match &instance {
        Some(name) => match logs::parse_instance_name(name) {
            Ok((pool, index)) => vec![(name.clone(), logs::log_path(&ctx.state_dir, pool, index))],
            Err(e) => return done(ctl, false, &e.to_string()).await,
        },
        None => logs::all_logs(&ctx.state_dir),
    };
    let prefix = instance.is_none();
    let mut followers: Vec<(String, Follower)> = Vec::new();
    for (name, path) in files {
        match logs::tail_path(&name, &path, lines) {
            Ok((tail, follower)) => {
                for line in tail {
                    if ctl
                        .send(&CtlResponse::Log(label(prefix, &name, line)))
                        .await
                        .is_err()
                    {
                        return false;
                    }
                }
                followers.push((name, follower));
            }
            Err(e) => return done(ctl, false, &e.to_string()).await,
        }
    }
    if !follow {
        return done(ctl, true, "").await;
    }
    loop {
        tokio::select! {
            // Anything from the client, or its leaving, ends the follow.
            _ = ctl.recv() => return false,
            _ = tokio::time::sleep(FOLLOW_POLL) => {}
        }
        for (name, follower) in &mut followers {
            let new = match follower.poll() {
                Ok(new) => new,
                Err(e) => return done(ctl, false, &e.to_string()).await,
            };
            for line in new {
                if ctl
                    .send(&CtlResponse::Log(label(prefix, name, line)))
                    .await
                    .is_err()
                {
                    return false;
                }
            }
        }
    }
}

fn label(prefix: bool, name: &str, line: String) -> String {
    if prefix {
        format!("[{name}] {line}")
    } else {
        line
    }
}
