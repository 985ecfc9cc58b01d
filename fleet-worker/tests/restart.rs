//! `restart-all` over the control socket: pool order, surge-first pools of one, new counts,
//! the busy refusal, and a replacement that never gets ready.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{collect, Config, Harness};
use protocol::{CtlRequest, CtlResponse, Pool, RestartArgs, ShutdownKind};

fn progress(responses: &[CtlResponse]) -> Vec<String> {
    responses
        .iter()
        .filter_map(|r| match r {
            CtlResponse::Progress(line) => Some(line.clone()),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_all_rolls_pools_in_order_and_never_empties_one() {
    let mut cfg = Config::new((20_300, 20_349));
    cfg.https = 1;
    cfg.http = 2;
    cfg.root = true;
    let mut h = Harness::start(cfg).await;
    h.wait_ready().await;
    let (first, start_at) = {
        let rec = h.rec.lock().unwrap();
        (rec.last_routes().unwrap().clone(), rec.routes.len())
    };
    let old_ids: HashSet<u64> = first.backends.iter().map(|b| b.id).collect();

    let responses = h
        .request(CtlRequest::RestartAll(RestartArgs {
            ssl: None,
            http: Some(3),
            root: None,
        }))
        .await;
    let lines = progress(&responses);
    assert_eq!(
        responses.last(),
        Some(&CtlResponse::Done {
            ok: true,
            message: "restart-all done: 1 https, 3 http, root on".into()
        }),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("https-0: starting the replacement")),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("root: starting the replacement")),
        "{lines:#?}"
    );

    {
        let rec = h.rec.lock().unwrap();
        for routes in &rec.routes[start_at..] {
            for pool in Pool::ALL {
                assert!(
                    routes.backends.iter().any(|b| b.pool == pool),
                    "pool {pool} empty in generation {}: {routes:?}",
                    routes.generation
                );
            }
        }
        let last = rec.last_routes().unwrap();
        assert_eq!(
            last.backends
                .iter()
                .filter(|b| b.pool == Pool::Https)
                .count(),
            1
        );
        assert_eq!(
            last.backends
                .iter()
                .filter(|b| b.pool == Pool::Http)
                .count(),
            3
        );
        assert_eq!(
            last.backends
                .iter()
                .filter(|b| b.pool == Pool::Root)
                .count(),
            1
        );
        assert!(
            last.backends.iter().all(|b| !old_ids.contains(&b.id)),
            "not every instance was replaced: {last:?}"
        );
        // Drained in pool order: https, then http, then root.
        let pools: Vec<Pool> = rec
            .drains
            .iter()
            .map(|id| first.backends.iter().find(|b| b.id == *id).unwrap().pool)
            .collect();
        assert_eq!(pools, [Pool::Https, Pool::Http, Pool::Http, Pool::Root]);
        assert_eq!(rec.states.last().unwrap().counts.http, 3);
    }
    let report = h.status().await;
    assert_eq!(report.counts.http, 3);
    let last_op = report.last_operation.unwrap();
    assert_eq!(
        (last_op.name.as_str(), last_op.ok),
        ("restart-all", Some(true))
    );

    // Scale down: the last ones go without restart, root goes away.
    let mark = h.rec.lock().unwrap().routes.len();
    let responses = h
        .request(CtlRequest::RestartAll(RestartArgs {
            ssl: Some(1),
            http: Some(1),
            root: Some(false),
        }))
        .await;
    assert!(
        matches!(responses.last(), Some(CtlResponse::Done { ok: true, .. })),
        "{responses:#?}"
    );
    {
        let rec = h.rec.lock().unwrap();
        assert!(rec.routes[mark..]
            .iter()
            .all(|r| r.backends.iter().any(|b| b.pool == Pool::Http)));
        let last = rec.last_routes().unwrap();
        let http: Vec<_> = last
            .backends
            .iter()
            .filter(|b| b.pool == Pool::Http)
            .collect();
        assert_eq!(http.len(), 1);
        assert_eq!(http[0].index, 0);
        assert!(last.backends.iter().all(|b| b.pool != Pool::Root));
        let counts = rec.states.last().unwrap().counts;
        assert_eq!((counts.https, counts.http, counts.root), (1, 1, false));
    }
    h.wait_for(
        "the state without the removed instances",
        Duration::from_secs(5),
        |r| (r.states.last().unwrap().instances.len() == 2).then_some(()),
    )
    .await;
    h.shutdown(ShutdownKind::Graceful).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_operation_is_refused_while_one_runs_and_the_first_survives_its_client() {
    let mut cfg = Config::new((20_350, 20_399));
    cfg.http = 2;
    cfg.drain_delay = Duration::from_millis(800);
    let mut h = Harness::start(cfg).await;
    h.wait_ready().await;
    let old: HashSet<u64> = h
        .rec
        .lock()
        .unwrap()
        .backends(Pool::Http)
        .iter()
        .map(|b| b.id)
        .collect();

    let mut first = h.ctl().await;
    first
        .send(&CtlRequest::RestartAll(RestartArgs::default()))
        .await
        .unwrap();
    let line = first.recv().await.unwrap().unwrap();
    assert!(matches!(line, CtlResponse::Progress(_)), "{line:?}");

    let second = h
        .request(CtlRequest::RestartAll(RestartArgs::default()))
        .await;
    match &second[..] {
        [CtlResponse::Refused(why)] => {
            assert!(why.starts_with("busy: restart-all running since "), "{why}");
            assert!(why.ends_with(" UTC"), "{why}");
        }
        other => panic!("expected a busy refusal, got {other:?}"),
    }
    let report = h.status().await;
    assert_eq!(
        report.operation.map(|o| o.name),
        Some("restart-all".to_string())
    );

    // The client leaves; the restart goes on to the end.
    drop(first);
    h.wait_for(
        "every http instance replaced",
        Duration::from_secs(30),
        |r| {
            let now = r.backends(Pool::Http);
            (now.len() == 2 && now.iter().all(|b| !old.contains(&b.id))).then_some(())
        },
    )
    .await;
    let mut done = false;
    for _ in 0..200 {
        let report = h.status().await;
        if report.operation.is_none() && report.last_operation.and_then(|o| o.ok) == Some(true) {
            done = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(done, "restart-all did not finish after its client left");
    h.shutdown(ShutdownKind::Graceful).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacement_that_never_gets_ready_stops_the_restart() {
    let mut cfg = Config::new((20_400, 20_449));
    cfg.http = 2;
    cfg.command = "if test -f broken; then echo broken; exit 1; fi; exec {server}".into();
    let mut h = Harness::start(cfg).await;
    h.wait_ready().await;
    let before = h.rec.lock().unwrap().backends(Pool::Http);
    std::fs::write(h.dir.path().join("broken"), "").unwrap();

    let mut ctl = h.ctl().await;
    ctl.send(&CtlRequest::RestartAll(RestartArgs::default()))
        .await
        .unwrap();
    let responses = collect(&mut ctl).await;
    match responses.last() {
        Some(CtlResponse::Done { ok: false, message }) => {
            assert!(message.contains("http-0 did not become ready"), "{message}");
            assert!(message.contains("exit status: 1"), "{message}");
        }
        other => panic!("expected a failed Done, got {other:?}"),
    }
    // http-1 was never touched and serves on.
    let http1 = before.iter().find(|b| b.index == 1).unwrap();
    let now = h.rec.lock().unwrap().backends(Pool::Http);
    assert!(now.iter().any(|b| b.id == http1.id), "{now:?}");

    // Supervision keeps retrying http-0; once the build is fixed it comes back.
    std::fs::remove_file(h.dir.path().join("broken")).unwrap();
    h.wait_for("http-0 back", Duration::from_secs(20), |r| {
        r.backends(Pool::Http)
            .iter()
            .any(|b| b.index == 0)
            .then_some(())
    })
    .await;
    let report = h.status().await;
    assert_eq!(report.last_operation.and_then(|o| o.ok), Some(false));
    h.shutdown(ShutdownKind::Graceful).await;
}
