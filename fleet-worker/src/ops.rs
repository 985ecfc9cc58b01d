//! Mutating operations run for control clients: the rolling restart, which deploys and
//! rollbacks reuse. An operation runs in its own task, drives the state machine through
//! [`FleetHandle`] and reports each step as a progress line; it runs to completion even if
//! its client goes away.

use std::sync::Arc;
use std::time::Duration;

use protocol::{CtlResponse, HealthSettings, InstanceId, Pool, RestartArgs};
use tokio::sync::mpsc;

use crate::deploy::DeployLog;
use crate::fleet::{CtlCmd, FleetHandle};
use crate::logs::instance_name;
use crate::plan::{count, describe, restart_plan, target_counts, Step};

/// Slack on top of the configured timeouts before an operation stops waiting for the state
/// machine itself (which enforces the real timeouts).
const SLACK: Duration = Duration::from_secs(10);

const GONE: &str = "the fleet worker is stopping";

pub struct Operation {
    fleet: FleetHandle,
    health: HealthSettings,
    progress: mpsc::UnboundedSender<CtlResponse>,
    /// A deploy's log, which gets every progress line too.
    log: Option<Arc<DeployLog>>,
}

impl Operation {
    pub fn new(
        fleet: FleetHandle,
        health: HealthSettings,
        progress: mpsc::UnboundedSender<CtlResponse>,
    ) -> Self {
        Operation {
            fleet,
            health,
            progress,
            log: None,
        }
    }

    pub fn with_log(mut self, log: Arc<DeployLog>) -> Self {
        self.log = Some(log);
        self
    }

    fn say(&self, line: String) {
        tracing::info!("{line}");
        if let Some(log) = &self.log {
            log.line(&line);
        }
        let _ = self.progress.send(CtlResponse::Progress(line));
    }

    /// The rolling restart of DESIGN.md: HTTPS pool, then HTTP, then root; per instance drain,
    /// stop, start on a fresh port, wait ready, back into the routes. Returns (ok, message).
    pub async fn restart_all(&self, args: RestartArgs) -> (bool, String) {
        match self.restart_all_inner(args).await {
            Ok(message) => (true, message),
            Err(message) => (false, message),
        }
    }

    async fn restart_all_inner(&self, args: RestartArgs) -> Result<String, String> {
        let old = self.fleet.ask(CtlCmd::Counts).await.ok_or(GONE)?;
        let new = target_counts(old, &args);
        // Refuse before touching anything: every instance needs a port, plus one spare so a
        // replacement can start on a fresh port while the old one still holds its own.
        let (min, max) = self.fleet.ask(CtlCmd::PortRange).await.ok_or(GONE)?;
        let needed = count(new, Pool::Https) + count(new, Pool::Http) + count(new, Pool::Root) + 1;
        let available = u32::from(max - min) + 1;
        if needed > available {
            return Err(format!(
                "the port range {min}-{max} holds {available} ports; {} https, {} http, root {} need {needed} (one spare for rolling); nothing was changed",
                new.https,
                new.http,
                if new.root { "on" } else { "off" },
            ));
        }
        self.say(format!(
            "restart-all: {} -> {}",
            describe(old),
            describe(new)
        ));
        let plan = restart_plan(old, new);
        for pool in Pool::ALL {
            let wanted = count(new, pool);
            for step in plan.iter().filter(|s| step_pool(s) == pool) {
                let result = match *step {
                    Step::Roll { index, surge, .. } => self.roll(pool, index, surge).await,
                    Step::Remove { index, .. } => {
                        self.fleet.tell(CtlCmd::SetCount {
                            pool,
                            count: wanted,
                        });
                        self.remove(pool, index).await
                    }
                    Step::Add { index, .. } => {
                        self.fleet.tell(CtlCmd::SetCount {
                            pool,
                            count: wanted,
                        });
                        self.start(pool, index).await.map(drop)
                    }
                };
                if let Err(e) = result {
                    return Err(format!(
                        "restart-all stopped: {e}; instances not restarted yet keep serving"
                    ));
                }
            }
            self.fleet.tell(CtlCmd::SetCount {
                pool,
                count: wanted,
            });
        }
        Ok(format!("restart-all done: {}", describe(new)))
    }

    async fn roll(&self, pool: Pool, index: u32, surge: bool) -> Result<(), String> {
        let name = instance_name(pool, index);
        let slot = self
            .fleet
            .ask(|reply| CtlCmd::Slot { pool, index, reply })
            .await
            .ok_or(GONE)?;
        let Some((old, port)) = slot.current else {
            self.say(format!("{name}: not running"));
            return self.start(pool, index).await.map(drop);
        };
        self.fleet.tell(CtlCmd::Supervise { id: old, on: false });
        if surge || slot.others_serving == 0 {
            self.say(format!("{name}: starting the replacement of id {old} (port {port}) first: it is the only one in its pool"));
            if let Err(e) = self.start(pool, index).await {
                self.fleet.tell(CtlCmd::Supervise { id: old, on: true });
                return Err(e);
            }
            self.retire(&name, old, port).await
        } else {
            self.retire(&name, old, port).await?;
            self.start(pool, index).await.map(drop)
        }
    }

    async fn remove(&self, pool: Pool, index: u32) -> Result<(), String> {
        let name = instance_name(pool, index);
        let slot = self
            .fleet
            .ask(|reply| CtlCmd::Slot { pool, index, reply })
            .await
            .ok_or(GONE)?;
        match slot.current {
            Some((id, port)) => {
                self.fleet.tell(CtlCmd::Supervise { id, on: false });
                self.retire(&name, id, port).await?;
                self.say(format!("{name}: removed"));
            }
            None => self.say(format!("{name}: not running, nothing to remove")),
        }
        Ok(())
    }

    /// Out of the routes, drained (bounded by drain_timeout), stopped (whole group).
    async fn retire(&self, name: &str, id: InstanceId, port: u16) -> Result<(), String> {
        self.say(format!("{name}: draining id {id} (port {port})"));
        let drain_timeout = Duration::from_millis(self.health.drain_timeout_ms);
        match tokio::time::timeout(
            drain_timeout + SLACK,
            self.fleet.ask(|reply| CtlCmd::Drain { id, reply }),
        )
        .await
        {
            Ok(Some(())) => self.say(format!("{name}: drained")),
            Ok(None) => return Err(GONE.to_string()),
            Err(_) => self.say(format!(
                "{name}: drain not confirmed after {} ms, stopping anyway",
                drain_timeout.as_millis()
            )),
        }
        self.say(format!("{name}: stopping id {id}"));
        let stop_timeout = Duration::from_millis(self.health.stop_timeout_ms);
        match tokio::time::timeout(
            stop_timeout + SLACK,
            self.fleet.ask(|reply| CtlCmd::Stop { id, reply }),
        )
        .await
        {
            Ok(Some(())) => {
                self.say(format!("{name}: stopped"));
                Ok(())
            }
            Ok(None) => Err(GONE.to_string()),
            Err(_) => Err(format!("{name}: id {id} did not stop")),
        }
    }

    /// Starts the slot's command on a fresh port and waits until it is ready and routed.
    /// On failure the state machine hands the slot to supervision (backup command, retries)
    /// unless the old instance still serves in it.
    async fn start(&self, pool: Pool, index: u32) -> Result<InstanceId, String> {
        let name = instance_name(pool, index);
        self.say(format!("{name}: starting"));
        let ready_timeout = Duration::from_millis(self.health.ready_timeout_ms);
        let answer = tokio::time::timeout(
            ready_timeout + SLACK,
            self.fleet.ask(|reply| CtlCmd::Start { pool, index, reply }),
        )
        .await;
        let reason = match answer {
            Ok(Some(Ok((id, port)))) => {
                self.say(format!("{name}: ready (id {id}, port {port})"));
                return Ok(id);
            }
            Ok(Some(Err(reason))) => reason,
            Ok(None) => return Err(GONE.to_string()),
            Err(_) => format!(
                "no answer within {} ms",
                (ready_timeout + SLACK).as_millis()
            ),
        };
        self.say(format!("{name}: failed: {reason}"));
        Err(format!("{name} did not become ready: {reason}"))
    }
}

fn step_pool(step: &Step) -> Pool {
    match *step {
        Step::Roll { pool, .. } | Step::Remove { pool, .. } | Step::Add { pool, .. } => pool,
    }
}
