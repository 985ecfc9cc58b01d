//! The proxy↔fleet channel: routes, drains and stats in; drain answers, stats and backend
//! failures out. The launcher may hand over a new channel at any time (a restarted fleet
//! worker); the routing table stays until the new fleet worker sends its own.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use protocol::{Channel, FleetToProxy, ProxyToFleet};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

use crate::routes::{wait_idle, Router};

pub type FleetChannel = Channel<ProxyToFleet, FleetToProxy>;

/// Events from the request path waiting to reach the fleet worker.
pub const EVENT_QUEUE: usize = 1024;

/// The current fleet channel, if any, and the task serving it.
pub struct FleetLink {
    current: Arc<ArcSwapOption<FleetChannel>>,
    router: Arc<Router>,
    session: Mutex<Option<JoinHandle<()>>>,
    forwarder: JoinHandle<()>,
}

impl FleetLink {
    /// Starts forwarding `events` to whichever fleet channel is current.
    pub fn new(router: Arc<Router>, mut events: mpsc::Receiver<ProxyToFleet>) -> Self {
        let current: Arc<ArcSwapOption<FleetChannel>> = Arc::new(ArcSwapOption::empty());
        let forwarder = tokio::spawn({
            let current = current.clone();
            async move {
                while let Some(msg) = events.recv().await {
                    match current.load_full() {
                        Some(chan) => {
                            if let Err(e) = chan.send(&msg).await {
                                tracing::warn!(error = %e, "cannot send to the fleet worker");
                            }
                        }
                        None => tracing::debug!(?msg, "no fleet channel; event dropped"),
                    }
                }
            }
        });
        FleetLink {
            current,
            router,
            session: Mutex::new(None),
            forwarder,
        }
    }

    /// Replaces the fleet channel with the one whose end is `fd`.
    pub fn connect(&self, fd: OwnedFd) {
        let mut session = self.session.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = session.take() {
            old.abort();
        }
        self.current.store(None);
        let chan = match FleetChannel::new(fd) {
            Ok(chan) => Arc::new(chan),
            Err(e) => {
                tracing::error!(error = %e, "cannot use the new fleet channel");
                return;
            }
        };
        *session = Some(tokio::spawn(serve(
            chan,
            self.current.clone(),
            self.router.clone(),
        )));
    }

    /// Stops serving the fleet channel.
    pub fn close(&self) {
        if let Some(session) = self
            .session
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            session.abort();
        }
        self.forwarder.abort();
        self.current.store(None);
    }
}

impl Drop for FleetLink {
    fn drop(&mut self) {
        self.close();
    }
}

async fn serve(
    chan: Arc<FleetChannel>,
    current: Arc<ArcSwapOption<FleetChannel>>,
    router: Arc<Router>,
) {
    match chan.handshake().await {
        Ok(hello) => tracing::info!(build = %hello.build, "fleet channel open"),
        Err(e) => {
            tracing::error!(error = %e, "fleet channel handshake failed");
            return;
        }
    }
    current.store(Some(chan.clone()));
    let mut drains = JoinSet::new();
    loop {
        let received = tokio::select! {
            r = chan.recv() => r,
            Some(_) = drains.join_next(), if !drains.is_empty() => continue,
        };
        let msg = match received {
            Ok(Some(r)) => {
                if !r.fds.is_empty() {
                    tracing::warn!(
                        count = r.fds.len(),
                        "fleet sent unexpected descriptors; closed them"
                    );
                }
                r.msg
            }
            Ok(None) => {
                tracing::info!("fleet channel closed");
                break;
            }
            Err(e) => {
                tracing::error!(error = %e, "fleet channel failed");
                break;
            }
        };
        match msg {
            FleetToProxy::Routes(routes) => router.install(routes),
            FleetToProxy::Drain { id, timeout_ms } => {
                // Out of rotation before the next message is read; the wait runs aside.
                let backend = router.start_drain(id);
                let chan = chan.clone();
                drains.spawn(async move {
                    let left = match backend {
                        Some(b) => wait_idle(&b, Duration::from_millis(timeout_ms)).await,
                        None => 0,
                    };
                    tracing::info!(id, in_flight_left = left, "instance drained");
                    let reply = ProxyToFleet::Drained {
                        id,
                        in_flight_left: left,
                    };
                    if let Err(e) = chan.send(&reply).await {
                        tracing::warn!(id, error = %e, "cannot report a drain to the fleet worker");
                    }
                });
            }
            FleetToProxy::StatsRequest => {
                if let Err(e) = chan.send(&ProxyToFleet::Stats(router.stats())).await {
                    tracing::warn!(error = %e, "cannot send stats to the fleet worker");
                }
            }
        }
    }
    let ours = current.load();
    if ours.as_ref().is_some_and(|c| Arc::ptr_eq(c, &chan)) {
        current.compare_and_swap(&ours, None);
    }
}
