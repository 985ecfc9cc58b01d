//! Instances: they start with the right environment and ports, are routed once ready, are
//! replaced when they die, fall back to the backup command, and are stopped as a whole
//! process group even when they ignore SIGTERM.

mod common;

use std::time::{Duration, Instant};

use common::{get, group_alive, port_free, Config, Harness};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use protocol::{CtlResponse, InstanceState, Pool, ShutdownKind};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_start_with_env_and_are_routed() {
    let mut cfg = Config::new((20_000, 20_049));
    cfg.https = 1;
    cfg.http = 2;
    cfg.root = true;
    let mut h = Harness::start(cfg).await;
    h.wait_ready().await;

    let routes = h.rec.lock().unwrap().last_routes().unwrap().clone();
    assert_eq!(routes.backends.len(), 4, "{routes:?}");
    let mut ports: Vec<u16> = routes.backends.iter().map(|b| b.port).collect();
    ports.sort();
    ports.dedup();
    assert_eq!(ports.len(), 4, "two instances on one port: {routes:?}");
    assert!(ports.iter().all(|p| (20_000..=20_049).contains(p)));
    let generations: Vec<u64> = h
        .rec
        .lock()
        .unwrap()
        .routes
        .iter()
        .map(|r| r.generation)
        .collect();
    assert!(
        generations.windows(2).all(|w| w[1] == w[0] + 1),
        "{generations:?}"
    );

    for b in &routes.backends {
        let name = format!("{}-{}", b.pool, b.index);
        let log = std::fs::read_to_string(h.log_path(&name)).unwrap();
        let want = format!(
            "started pool={} instance={} port={} hostname=127.0.0.1 host=127.0.0.1 app_env=from-app-env",
            b.pool, b.index, b.port
        );
        assert!(log.contains(&want), "{name}: {log}");
        if b.pool == Pool::Http {
            assert_eq!(
                get(b.port, "/").await,
                format!("pool=http instance={} port={}\n", b.index, b.port)
            );
        }
    }
    let line = h
        .wait_for("status line", Duration::from_secs(5), |r| {
            r.status_lines.last().cloned()
        })
        .await;
    assert_eq!(line, "1 https, 2 http, root: ready");
    let state = h.rec.lock().unwrap().states.last().unwrap().clone();
    assert_eq!(state.instances.len(), 4);
    assert!(state.instances.iter().all(|i| i.pid == i.pgid));

    let pgids: Vec<i32> = state.instances.iter().map(|i| i.pgid).collect();
    h.shutdown(ShutdownKind::Graceful).await;
    for pgid in pgids {
        assert!(
            !group_alive(pgid) || common::zombie_only(pgid),
            "group {pgid} survived the shutdown"
        );
    }
    for port in ports {
        assert!(port_free(port), "port {port} still busy after shutdown");
    }
    assert_eq!(
        h.rec.lock().unwrap().states.last().unwrap().instances.len(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_instance_is_replaced() {
    let mut cfg = Config::new((20_050, 20_099));
    cfg.http = 2;
    let mut h = Harness::start(cfg).await;
    h.wait_ready().await;
    let before = h.rec.lock().unwrap().backends(Pool::Http);
    let victim = before.iter().find(|b| b.index == 0).unwrap().clone();
    let other = before.iter().find(|b| b.index == 1).unwrap().clone();
    let pgid = h
        .rec
        .lock()
        .unwrap()
        .states
        .last()
        .unwrap()
        .instances
        .iter()
        .find(|i| i.id == victim.id)
        .unwrap()
        .pgid;
    let routes_before_kill = h.rec.lock().unwrap().routes.len();
    killpg(Pid::from_raw(pgid), Signal::SIGKILL).unwrap();

    h.wait_for("http-0 out of the routes", Duration::from_secs(10), |r| {
        r.last_routes()
            .filter(|routes| routes.backends.iter().all(|b| b.id != victim.id))
            .map(|_| ())
    })
    .await;
    let replacement = h
        .wait_for("a new http-0 in the routes", Duration::from_secs(20), |r| {
            r.backends(Pool::Http)
                .into_iter()
                .find(|b| b.index == 0 && b.id != victim.id)
        })
        .await;
    assert_ne!(
        replacement.port, victim.port,
        "the replacement should get a fresh port"
    );
    // The other instance served all along.
    let served_all_along = h.rec.lock().unwrap().routes[routes_before_kill..]
        .iter()
        .all(|r| r.backends.iter().any(|b| b.id == other.id));
    assert!(served_all_along);
    let report = h.status().await;
    let http0 = report
        .instances
        .iter()
        .find(|i| i.id == replacement.id)
        .unwrap();
    assert_eq!(http0.restarts, 1);
    assert_eq!(http0.state, InstanceState::Ready);
    h.shutdown(ShutdownKind::Fast).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_command_falls_back_to_backup() {
    let mut cfg = Config::new((20_100, 20_149));
    cfg.http = 1;
    cfg.http_command = Some("overwatch-test-no-such-command --serve".into());
    cfg.backup = Some("exec {server}".into());
    let mut h = Harness::start(cfg).await;
    h.wait_ready().await;
    let routed = h.rec.lock().unwrap().backends(Pool::Http);
    assert_eq!(routed.len(), 1);
    let report = h.status().await;
    let serving: Vec<_> = report
        .instances
        .iter()
        .filter(|i| i.pool == Pool::Http && i.pid.is_some())
        .collect();
    assert_eq!(serving.len(), 1, "{report:#?}");
    let inst = serving[0];
    assert_eq!(inst.id, routed[0].id);
    assert_eq!(inst.state, InstanceState::Backup);
    assert!(inst.backup);
    let error = inst.last_error.clone().unwrap_or_default();
    assert!(
        error.contains("127"),
        "last_error should say why: {error:?}"
    );
    let line = h.rec.lock().unwrap().status_lines.last().cloned().unwrap();
    assert!(line.contains("1 http (1 backup)"), "{line}");
    h.shutdown(ShutdownKind::Graceful).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_command_without_backup_shows_failed_and_retries() {
    let mut cfg = Config::new((20_150, 20_199));
    cfg.http = 1;
    cfg.http_command = Some("echo broken build; exit 3".into());
    let mut h = Harness::start(cfg).await;
    let mut ctl_status = None;
    common::eventually("http-0 failed twice", Duration::from_secs(10), || {
        let log = std::fs::read_to_string(h.log_path("http-0")).unwrap_or_default();
        log.matches("broken build").count() >= 2
    })
    .await;
    for _ in 0..50 {
        let report = h.status().await;
        let failed = report.instances.iter().find(|i| {
            i.pool == Pool::Http
                && matches!(i.state, InstanceState::Failed)
                && i.last_error.is_some()
        });
        if let Some(f) = failed {
            ctl_status = Some(f.clone());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let failed = ctl_status.expect("status never showed http-0 as failed");
    assert!(failed.last_error.unwrap().contains("exit status: 3"));
    assert!(!h.rec.lock().unwrap().ready);
    h.shutdown(ShutdownKind::Graceful).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_ignoring_sigterm_is_killed_after_stop_timeout() {
    let mut cfg = Config::new((20_200, 20_249));
    cfg.http = 1;
    // Like pnpm: the leader dies on SIGTERM, its child ignores it and holds the port.
    cfg.http_command = Some("{server} & wait".into());
    cfg.env.push(("IGNORE_TERM".into(), "1".into()));
    cfg.stop_timeout_ms = 700;
    let mut h = Harness::start(cfg).await;
    h.wait_ready().await;
    let record = h.rec.lock().unwrap().states.last().unwrap().instances[0].clone();
    assert!(!port_free(record.port));
    let started = Instant::now();
    h.shutdown(ShutdownKind::Graceful).await;
    assert!(
        started.elapsed() >= Duration::from_millis(700),
        "stopped after {:?}, before the stop timeout: was SIGTERM ignored?",
        started.elapsed()
    );
    assert!(port_free(record.port), "port {} still held", record.port);
    common::eventually("the group to be gone", Duration::from_secs(5), || {
        !group_alive(record.pgid) || common::zombie_only(record.pgid)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_served_over_the_control_socket() {
    let mut cfg = Config::new((20_250, 20_299));
    cfg.http = 1;
    let mut h = Harness::start(cfg).await;
    h.wait_ready().await;
    let port = h.rec.lock().unwrap().backends(Pool::Http)[0].port;
    get(port, "/first").await;
    common::eventually("GET /first in the log", Duration::from_secs(5), || {
        std::fs::read_to_string(h.log_path("http-0"))
            .unwrap_or_default()
            .contains("GET /first")
    })
    .await;

    let responses = h
        .request(protocol::CtlRequest::Logs {
            instance: Some("http-0".into()),
            lines: 2,
            follow: false,
        })
        .await;
    let lines: Vec<&str> = responses
        .iter()
        .filter_map(|r| match r {
            CtlResponse::Log(l) => Some(l.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(lines.len(), 2, "{responses:?}");
    assert!(lines[0].starts_with("started pool=http"), "{lines:?}");
    assert_eq!(lines[1], "GET /first");
    assert!(matches!(
        responses.last(),
        Some(CtlResponse::Done { ok: true, .. })
    ));

    // All logs, prefixed with the instance name.
    let all = h
        .request(protocol::CtlRequest::Logs {
            instance: None,
            lines: 1,
            follow: false,
        })
        .await;
    assert_eq!(all[0], CtlResponse::Log("[http-0] GET /first".into()));

    let bad = h
        .request(protocol::CtlRequest::Logs {
            instance: Some("../../etc/passwd".into()),
            lines: 5,
            follow: false,
        })
        .await;
    assert!(
        matches!(&bad[..], [CtlResponse::Done { ok: false, .. }]),
        "{bad:?}"
    );

    // Follow: new lines arrive until the client goes away.
    let mut ctl = h.ctl().await;
    ctl.send(&protocol::CtlRequest::Logs {
        instance: Some("http-0".into()),
        lines: 0,
        follow: true,
    })
    .await
    .unwrap();
    // The follow starts when the worker has read the request: ask until a line comes.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let line = loop {
        get(port, "/followed").await;
        if let Ok(line) = tokio::time::timeout(Duration::from_millis(500), ctl.recv()).await {
            break line.unwrap();
        }
        assert!(std::time::Instant::now() < deadline, "no followed line");
    };
    assert_eq!(line, Some(CtlResponse::Log("GET /followed".into())));
    drop(ctl);
    h.shutdown(ShutdownKind::Graceful).await;
}
