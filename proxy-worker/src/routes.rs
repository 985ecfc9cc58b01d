//! The routing table: the backends of each pool, swapped atomically (the request path only
//! loads an `Arc`); per-backend in-flight and served counters; least-in-flight selection with
//! round-robin tie breaking; drain waits.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use protocol::{BackendStats, InstanceId, Pool, Routes};
use tokio::sync::{watch, Notify};

/// A backend whose connection just failed is tried last for this long, so a dead instance
/// does not cost every request a failed connect until the fleet worker replaces it.
const FAILURE_COOLDOWN: Duration = Duration::from_secs(2);

/// One app instance, with counters that outlive routing-table swaps.
#[derive(Debug)]
pub struct BackendState {
    pub id: InstanceId,
    pub pool: Pool,
    pub index: u32,
    pub port: u16,
    in_flight: AtomicU64,
    served: AtomicU64,
    /// Set by `Drain`; stays set: a drained instance is on its way out.
    draining: AtomicBool,
    /// Milliseconds since the router's epoch of the last connect failure, plus one; 0: none.
    failed_at: AtomicU64,
    idle: Notify,
}

impl BackendState {
    fn new(b: &protocol::Backend) -> Self {
        BackendState {
            id: b.id,
            pool: b.pool,
            index: b.index,
            port: b.port,
            in_flight: AtomicU64::new(0),
            served: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            failed_at: AtomicU64::new(0),
            idle: Notify::new(),
        }
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Acquire)
    }

    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    pub fn count_served(&self) {
        self.served.fetch_add(1, Ordering::Relaxed);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}

/// Waits until `backend` has no request in flight or `timeout` passed; returns the requests
/// still in flight.
pub async fn wait_idle(backend: &BackendState, timeout: Duration) -> u64 {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let idle = backend.idle.notified();
        tokio::pin!(idle);
        idle.as_mut().enable();
        if backend.in_flight() == 0 {
            return 0;
        }
        if tokio::time::timeout_at(deadline, idle).await.is_err() {
            return backend.in_flight();
        }
    }
}

/// Counts one request as in flight on a backend until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<BackendState>);

impl InFlight {
    pub fn new(backend: Arc<BackendState>) -> Self {
        backend.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(backend)
    }

    pub fn backend(&self) -> &Arc<BackendState> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

#[derive(Debug, Default)]
struct Table {
    generation: u64,
    pools: [Vec<Arc<BackendState>>; 3],
}

fn slot(pool: Pool) -> usize {
    match pool {
        Pool::Https => 0,
        Pool::Http => 1,
        Pool::Root => 2,
    }
}

/// The current routing table and every backend the proxy still tracks.
#[derive(Debug)]
pub struct Router {
    table: ArcSwap<Table>,
    /// Every tracked backend by id; used by the control path only (install, drain, stats).
    registry: Mutex<HashMap<InstanceId, Arc<BackendState>>>,
    rr: [AtomicUsize; 3],
    /// Number of tables installed so far; bumped on every install.
    installs: watch::Sender<u64>,
    epoch: Instant,
}

impl Default for Router {
    fn default() -> Self {
        Router {
            table: ArcSwap::from_pointee(Table::default()),
            registry: Mutex::new(HashMap::new()),
            rr: Default::default(),
            installs: watch::Sender::new(0),
            epoch: Instant::now(),
        }
    }
}

impl Router {
    /// Replaces the routing table. Backends keep their counters (and drain state) by id;
    /// backends no longer routed are forgotten once idle.
    pub fn install(&self, routes: Routes) {
        let mut registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        let mut table = Table {
            generation: routes.generation,
            pools: Default::default(),
        };
        let mut seen = Vec::with_capacity(routes.backends.len());
        for b in &routes.backends {
            let state = registry
                .entry(b.id)
                .and_modify(|s| {
                    if s.port != b.port || s.pool != b.pool || s.index != b.index {
                        *s = Arc::new(BackendState::new(b));
                    }
                })
                .or_insert_with(|| Arc::new(BackendState::new(b)))
                .clone();
            seen.push(b.id);
            table.pools[slot(b.pool)].push(state);
        }
        registry.retain(|id, s| seen.contains(id) || s.in_flight() > 0);
        tracing::info!(
            generation = routes.generation,
            https = table.pools[0].len(),
            http = table.pools[1].len(),
            root = table.pools[2].len(),
            "routes installed"
        );
        self.table.store(Arc::new(table));
        drop(registry);
        self.installs.send_modify(|n| *n += 1);
    }

    /// Number of routing tables installed so far, and a way to wait for the next.
    pub fn installs(&self) -> watch::Receiver<u64> {
        self.installs.subscribe()
    }

    pub fn generation(&self) -> u64 {
        self.table.load().generation
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Marks a backend as just failed: it is tried last for [`FAILURE_COOLDOWN`].
    pub fn mark_failed(&self, backend: &BackendState) {
        backend.failed_at.store(self.now_ms(), Ordering::Relaxed);
    }

    fn cooling(&self, backend: &BackendState, now_ms: u64) -> bool {
        let at = backend.failed_at.load(Ordering::Relaxed);
        at != 0 && now_ms.saturating_sub(at) < FAILURE_COOLDOWN.as_millis() as u64
    }

    /// The backend of `pool` with the fewest requests in flight, not draining and not in
    /// `tried`; ties go round robin.
    pub fn pick(&self, pool: Pool, tried: &[InstanceId]) -> Option<Arc<BackendState>> {
        let table = self.table.load();
        let list = &table.pools[slot(pool)];
        if list.is_empty() {
            return None;
        }
        let now = self.now_ms();
        let start = self.rr[slot(pool)].fetch_add(1, Ordering::Relaxed);
        let mut best: Option<((bool, u64), &Arc<BackendState>)> = None;
        for k in 0..list.len() {
            let b = &list[(start.wrapping_add(k)) % list.len()];
            if b.is_draining() || tried.contains(&b.id) {
                continue;
            }
            let key = (self.cooling(b, now), b.in_flight());
            if best.is_none_or(|(best_key, _)| key < best_key) {
                best = Some((key, b));
            }
        }
        best.map(|(_, b)| b.clone())
    }

    /// Like [`Router::pick`], but when the pool has no usable backend, waits up to `wait` for
    /// a routing table that has one.
    pub async fn pick_or_wait(
        &self,
        pool: Pool,
        tried: &[InstanceId],
        wait: Duration,
    ) -> Option<Arc<BackendState>> {
        if let Some(b) = self.pick(pool, tried) {
            return Some(b);
        }
        let deadline = tokio::time::Instant::now() + wait;
        let mut installs = self.installs();
        loop {
            installs.borrow_and_update();
            if let Some(b) = self.pick(pool, tried) {
                return Some(b);
            }
            match tokio::time::timeout_at(deadline, installs.changed()).await {
                Ok(Ok(())) => continue,
                _ => return None,
            }
        }
    }

    /// Stops new requests to `id` at once; [`wait_idle`] then waits for the ones in flight.
    /// `None`: the proxy does not know `id` (nothing in flight).
    pub fn start_drain(&self, id: InstanceId) -> Option<Arc<BackendState>> {
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        let backend = registry.get(&id).cloned()?;
        backend.draining.store(true, Ordering::Release);
        Some(backend)
    }

    /// Every backend the proxy still tracks.
    pub fn backends(&self) -> Vec<Arc<BackendState>> {
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        registry.values().cloned().collect()
    }

    /// Counters of every tracked backend, by id.
    pub fn stats(&self) -> Vec<BackendStats> {
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        let mut stats: Vec<BackendStats> = registry
            .values()
            .map(|b| BackendStats {
                id: b.id,
                in_flight: b.in_flight(),
                served: b.served(),
            })
            .collect();
        stats.sort_by_key(|s| s.id);
        stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::Backend;

    fn routes(generation: u64, backends: &[(InstanceId, Pool)]) -> Routes {
        Routes {
            generation,
            backends: backends
                .iter()
                .enumerate()
                .map(|(i, &(id, pool))| Backend {
                    id,
                    pool,
                    index: i as u32,
                    port: 1000 + id as u16,
                })
                .collect(),
        }
    }

    #[test]
    fn ties_go_round_robin_and_least_in_flight_wins() {
        let r = Router::default();
        r.install(routes(
            1,
            &[(1, Pool::Http), (2, Pool::Http), (3, Pool::Https)],
        ));
        let picks: Vec<_> = (0..4)
            .map(|_| r.pick(Pool::Http, &[]).unwrap().id)
            .collect();
        assert_eq!(picks.iter().filter(|&&id| id == 1).count(), 2);
        assert_eq!(picks.iter().filter(|&&id| id == 2).count(), 2);
        assert_ne!(picks[0], picks[1]);

        let busy = InFlight::new(r.pick(Pool::Http, &[]).unwrap());
        for _ in 0..3 {
            assert_ne!(r.pick(Pool::Http, &[]).unwrap().id, busy.backend().id);
        }
        assert_eq!(r.pick(Pool::Https, &[]).unwrap().id, 3);
        assert!(r.pick(Pool::Root, &[]).is_none());
        assert!(r.pick(Pool::Http, &[1, 2]).is_none());
    }

    #[test]
    fn counters_survive_a_new_table_and_idle_removed_backends_are_forgotten() {
        let r = Router::default();
        r.install(routes(1, &[(1, Pool::Http), (2, Pool::Http)]));
        let b1 = r.pick(Pool::Http, &[2]).unwrap();
        b1.count_served();
        let held = InFlight::new(r.pick(Pool::Http, &[1]).unwrap());
        r.install(routes(2, &[(1, Pool::Http)]));
        let stats = r.stats();
        assert_eq!(stats.len(), 2, "backend 2 still has a request in flight");
        assert_eq!(stats[0].served, 1);
        assert_eq!(stats[1].in_flight, 1);
        drop(held);
        r.install(routes(3, &[(1, Pool::Http)]));
        assert_eq!(r.stats().len(), 1);
        assert_eq!(r.generation(), 3);
    }

    #[test]
    fn failed_backend_is_tried_last() {
        let r = Router::default();
        r.install(routes(1, &[(1, Pool::Http), (2, Pool::Http)]));
        let b1 = r.pick(Pool::Http, &[2]).unwrap();
        r.mark_failed(&b1);
        for _ in 0..4 {
            assert_eq!(r.pick(Pool::Http, &[]).unwrap().id, 2);
        }
        assert_eq!(r.pick(Pool::Http, &[2]).unwrap().id, 1);
    }

    #[tokio::test]
    async fn drain_waits_for_in_flight_then_excludes() {
        let r = Arc::new(Router::default());
        r.install(routes(1, &[(1, Pool::Http), (2, Pool::Http)]));
        let held = InFlight::new(r.pick(Pool::Http, &[2]).unwrap());
        let draining = r.start_drain(1).unwrap();
        assert!(held.backend().is_draining());
        let drain =
            tokio::spawn(async move { wait_idle(&draining, Duration::from_secs(30)).await });
        for _ in 0..4 {
            assert_eq!(r.pick(Pool::Http, &[]).unwrap().id, 2);
        }
        drop(held);
        assert_eq!(drain.await.unwrap(), 0);
        assert!(r.start_drain(99).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn drain_timeout_reports_what_is_left() {
        let r = Router::default();
        r.install(routes(1, &[(1, Pool::Http)]));
        let _held = InFlight::new(r.pick(Pool::Http, &[]).unwrap());
        let b = r.start_drain(1).unwrap();
        assert_eq!(wait_idle(&b, Duration::from_millis(50)).await, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn empty_pool_waits_for_routes_then_gives_up() {
        let r = Arc::new(Router::default());
        assert!(r
            .pick_or_wait(Pool::Http, &[], Duration::from_secs(10))
            .await
            .is_none());
        let waiter = tokio::spawn({
            let r = r.clone();
            async move {
                r.pick_or_wait(Pool::Http, &[], Duration::from_secs(10))
                    .await
            }
        });
        tokio::task::yield_now().await;
        r.install(routes(1, &[(7, Pool::Http)]));
        assert_eq!(waiter.await.unwrap().unwrap().id, 7);
    }
}
