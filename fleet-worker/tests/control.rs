//! The control socket and the channels around it: status with the proxy's counters, requests
//! forwarded to the launcher, corrupt clients that must not hurt the worker, a restarted
//! proxy that gets the routes at once, and adoption of a previous worker's instances.

mod common;

use std::time::Duration;

use common::{get, port_free, Config, Harness};
use protocol::{CtlRequest, CtlResponse, DeployArgs, InstanceState, Pool, ShutdownKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_instances_with_proxy_counters() {
    let mut cfg = Config::new((20_500, 20_549));
    cfg.http = 1;
    cfg.root = true;
    let mut h = Harness::start(cfg).await;
    h.wait_ready().await;
    let report = h.status().await;
    assert_eq!(report.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(report.build, protocol::build_id());
    assert_eq!(report.launcher_pid, std::process::id() as i32);
    assert_eq!(report.listeners.len(), 1);
    assert_eq!(
        (report.counts.https, report.counts.http, report.counts.root),
        (0, 1, true)
    );
    assert_eq!(report.instances.len(), 2, "{report:#?}");
    for inst in &report.instances {
        assert_eq!(inst.state, InstanceState::Ready);
        assert!(inst.pid.is_some());
        assert_eq!(
            (inst.in_flight, inst.served),
            (1, 7),
            "proxy stats not merged: {inst:?}"
        );
        assert!(!inst.backup);
    }
    assert_eq!(report.instances[0].pool, Pool::Http);
    assert_eq!(report.instances[1].pool, Pool::Root);
    assert!(report.operation.is_none());
    h.shutdown(ShutdownKind::Graceful).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_for_the_launcher_and_a_deploy_outside_a_repository() {
    let mut cfg = Config::new((20_550, 20_599));
    cfg.http = 0;
    let mut h = Harness::start(cfg).await;
    h.wait_ready().await;
    // The app directory is no git repository: the pull fails and nothing changes.
    let deploy = h.request(CtlRequest::Deploy(DeployArgs::default())).await;
    match deploy.last() {
        Some(CtlResponse::Done { ok: false, message }) => {
            assert!(message.starts_with("pull: "), "{message}");
            assert!(message.contains("nothing changed"), "{message}");
        }
        other => panic!("expected a failed deploy, got {other:?}"),
    }
    let reload = h.request(CtlRequest::Reload).await;
    assert_eq!(
        reload.last(),
        Some(&CtlResponse::Done {
            ok: true,
            message: "test launcher: Reload accepted".into()
        })
    );
    // Tests run as root, so --binary is accepted and forwarded with the client's uid.
    let upgrade = h
        .request(CtlRequest::Upgrade {
            binary: Some("/usr/bin/true".into()),
        })
        .await;
    assert!(
        matches!(upgrade.last(), Some(CtlResponse::Done { ok: true, .. })),
        "{upgrade:?}"
    );
    let asks = h.rec.lock().unwrap().asks.clone();
    assert_eq!(asks.len(), 2);
    assert!(
        matches!(&asks[1], protocol::FleetToLauncher::Upgrade { uid, .. } if *uid == nix::unistd::geteuid().as_raw())
    );
    h.shutdown(ShutdownKind::Graceful).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_clients_lose_only_their_connection() {
    let mut cfg = Config::new((20_600, 20_649));
    cfg.http = 0;
    let mut h = Harness::start(cfg).await;
    h.wait_ready().await;

    // Garbage instead of a hello.
    let mut raw = UnixStream::connect(&h.control_path).await.unwrap();
    raw.write_all(&[0xff; 64]).await.unwrap();
    let mut sink = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut sink))
        .await
        .expect("connection with a bad hello was not closed")
        .ok();

    // A good hello, then a corrupt frame.
    let raw = UnixStream::connect(&h.control_path).await.unwrap();
    let (ctl, _) = protocol::ctl::CtlStream::<protocol::Hello, protocol::Hello>::handshake(raw)
        .await
        .unwrap();
    let mut raw = ctl_into_stream(ctl);
    raw.write_all(&[0, 0, 0, 3, 0xee, 0xee, 0xee])
        .await
        .unwrap();
    let mut sink = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut sink))
        .await
        .expect("connection with a corrupt frame was not closed")
        .ok();

    // A client that goes away mid-request.
    let mut ctl = h.ctl().await;
    ctl.send(&CtlRequest::Status).await.unwrap();
    drop(ctl);

    // The worker still answers.
    let report = h.status().await;
    assert_eq!(report.instances.len(), 0);
    h.shutdown(ShutdownKind::Graceful).await;
}

/// The hello exchange is done by the typed stream; the rest of the test writes raw bytes.
fn ctl_into_stream(ctl: protocol::ctl::CtlStream<protocol::Hello, protocol::Hello>) -> UnixStream {
    let std = ctl.get_ref();
    let fd = std::os::fd::AsFd::as_fd(std).try_clone_to_owned().unwrap();
    let std = std::os::unix::net::UnixStream::from(fd);
    std.set_nonblocking(true).unwrap();
    UnixStream::from_std(std).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_proxy_channel_gets_the_routes_at_once() {
    let mut cfg = Config::new((20_650, 20_699));
    cfg.http = 2;
    let mut h = Harness::start(cfg).await;
    h.wait_ready().await;
    let (before, count) = {
        let rec = h.rec.lock().unwrap();
        (rec.last_routes().unwrap().clone(), rec.routes.len())
    };
    h.connect_proxy(Duration::ZERO).await;
    let after = h
        .wait_for(
            "routes on the new proxy channel",
            Duration::from_secs(5),
            |r| (r.routes.len() > count).then(|| r.last_routes().unwrap().clone()),
        )
        .await;
    assert_eq!(after.backends, before.backends);
    assert!(after.generation > before.generation);
    h.shutdown(ShutdownKind::Graceful).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_worker_adopts_running_instances() {
    let mut cfg = Config::new((20_700, 20_749));
    cfg.http = 2;
    let mut first = Harness::start(cfg).await;
    first.wait_ready().await;
    first.shutdown(ShutdownKind::Upgrade).await;
    let state = first.rec.lock().unwrap().states.last().unwrap().clone();
    assert_eq!(
        state.instances.len(),
        2,
        "Upgrade must leave the instances running"
    );
    let pgids = first.known_pgids();
    first.forget_processes();
    drop(first);
    for record in &state.instances {
        assert!(get(record.port, "/").await.contains("pool=http"));
    }

    // One of them turns bad before the new worker comes: it is stopped and replaced.
    let dead = state.instances[1].clone();
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(dead.pgid),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    let mut cfg = Config::new((20_700, 20_749));
    cfg.http = 2;
    cfg.stop_timeout_ms = 300;
    let mut second = Harness::start_with_state(cfg, Some(state.clone())).await;
    // The harness kills these at the end too, whatever happens.
    second.wait_ready().await;
    let routes = second.rec.lock().unwrap().backends(Pool::Http);
    let kept = &state.instances[0];
    assert!(
        routes
            .iter()
            .any(|b| b.id == kept.id && b.port == kept.port),
        "{routes:?}"
    );
    assert!(routes.iter().all(|b| b.id != dead.id), "{routes:?}");
    assert_eq!(routes.len(), 2);
    let new = routes.iter().find(|b| b.id != kept.id).unwrap();
    assert!(new.id >= state.next_id, "ids must not be reused");
    let report = second.status().await;
    let adopted = report.instances.iter().find(|i| i.id == kept.id).unwrap();
    assert_eq!(adopted.pid, Some(kept.pid));

    second.shutdown(ShutdownKind::Graceful).await;
    assert!(port_free(kept.port));
    common::eventually("adopted groups gone", Duration::from_secs(5), || {
        pgids
            .iter()
            .all(|p| !common::group_alive(*p) || common::zombie_only(*p))
    })
    .await;
}
