//! The worker's life around requests: draining one instance, graceful and fast shutdown, a
//! replaced fleet channel, and the launcher going away.

mod common;

use common::*;
use protocol::{FleetToProxy, LauncherToProxy, Pool, ProxyToFleet, ShutdownKind};
use tokio::io::AsyncReadExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_waits_for_in_flight_and_stops_new_requests() {
    let a = TestBackend::plain("http-a").await;
    let b = TestBackend::plain("http-b").await;
    let h = Harness::start(settings(), vec![a.route(1, Pool::Http, 0)]).await;
    let client = h.client(true);

    let slow = tokio::spawn({
        let client = client.clone();
        let url = h.http_url("localhost", "/slow");
        async move { client.get(url).send().await.unwrap().text().await.unwrap() }
    });
    a.wait_entered().await;
    h.routes(
        2,
        vec![a.route(1, Pool::Http, 0), b.route(2, Pool::Http, 1)],
    )
    .await;
    h.fleet
        .send(&FleetToProxy::Drain {
            id: 1,
            timeout_ms: 10_000,
        })
        .await
        .unwrap();
    let stats = h.stats().await;
    assert_eq!(stats.iter().find(|s| s.id == 1).unwrap().in_flight, 1);

    for _ in 0..4 {
        let resp = client
            .get(h.http_url("localhost", "/"))
            .send()
            .await
            .unwrap();
        assert_eq!(Echo::parse(&resp.text().await.unwrap()).name, "http-b");
    }
    assert_eq!(a.hits(), 1);
    // Stats are answered in order: no Drained may have come before them.
    h.stats().await;
    assert!(
        h.fleet_seen.lock().unwrap().is_empty(),
        "nothing else before the in-flight request ended"
    );

    a.release();
    assert_eq!(
        Echo::parse(&within("slow response", slow).await.unwrap()).name,
        "http-a"
    );
    let drained = h
        .fleet_until(|m| matches!(m, ProxyToFleet::Drained { .. }))
        .await;
    assert_eq!(
        drained,
        ProxyToFleet::Drained {
            id: 1,
            in_flight_left: 0
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_reports_requests_left() {
    let a = TestBackend::plain("http-a").await;
    let h = Harness::start(settings(), vec![a.route(1, Pool::Http, 0)]).await;
    let slow = tokio::spawn({
        let client = h.client(true);
        let url = h.http_url("localhost", "/slow");
        async move { client.get(url).send().await.map(|r| r.status().as_u16()) }
    });
    a.wait_entered().await;
    h.fleet
        .send(&FleetToProxy::Drain {
            id: 1,
            timeout_ms: 50,
        })
        .await
        .unwrap();
    let drained = h
        .fleet_until(|m| matches!(m, ProxyToFleet::Drained { .. }))
        .await;
    assert_eq!(
        drained,
        ProxyToFleet::Drained {
            id: 1,
            in_flight_left: 1
        }
    );
    a.release();
    assert_eq!(within("slow response", slow).await.unwrap().unwrap(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_lets_an_in_flight_request_finish() {
    let a = TestBackend::plain("http-a").await;
    let mut h = Harness::start(settings(), vec![a.route(1, Pool::Http, 0)]).await;

    // An idle keep-alive connection: the proxy closes it when the shutdown starts.
    let mut idle = tokio::net::TcpStream::connect(h.http_addr).await.unwrap();
    let (head, _) = raw_request(&mut idle, "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");

    let slow = tokio::spawn({
        let client = h.client(true);
        let url = h.http_url("localhost", "/slow");
        async move {
            let resp = client.get(url).send().await.unwrap();
            let close = resp
                .headers()
                .get("connection")
                .map(|v| v.to_str().unwrap().to_string());
            (resp.status().as_u16(), close, resp.text().await.unwrap())
        }
    });
    a.wait_entered().await;
    h.launcher
        .send(&LauncherToProxy::Shutdown(ShutdownKind::Graceful))
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = within("the idle connection to close", idle.read(&mut buf))
        .await
        .unwrap_or(0);
    assert_eq!(n, 0, "idle connection closed without a response");

    a.release();
    let (status, close, body) = within("slow response", slow).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(close.as_deref(), Some("close"));
    assert_eq!(Echo::parse(&body).name, "http-a");
    h.wait_stopped().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_shutdown_does_not_wait() {
    let a = TestBackend::plain("http-a").await;
    let mut h = Harness::start(settings(), vec![a.route(1, Pool::Http, 0)]).await;
    let slow = tokio::spawn({
        let client = h.client(true);
        let url = h.http_url("localhost", "/slow");
        async move { client.get(url).send().await.is_err() }
    });
    a.wait_entered().await;
    h.shutdown(ShutdownKind::Fast).await.unwrap();
    assert!(within("the cut request", slow).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_launcher_channel_drains_and_returns() {
    let a = TestBackend::plain("http-a").await;
    let mut h = Harness::start(settings(), vec![a.route(1, Pool::Http, 0)]).await;
    let proxy = h.proxy.take().unwrap();
    // Our end of the launcher channel closing is what a dead launcher looks like.
    drop(std::mem::replace(
        &mut h.launcher,
        protocol::Channel::pair().unwrap().0,
    ));
    within("run to return", proxy).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_fleet_channel_keeps_routes_until_new_ones_arrive() {
    let a = TestBackend::plain("http-a").await;
    let b = TestBackend::plain("http-b").await;
    let mut h = Harness::start(settings(), vec![a.route(1, Pool::Http, 0)]).await;
    let client = h.client(true);

    let old = std::mem::replace(&mut h.fleet, connect_fleet(&h.launcher).await);
    drop(old);
    let resp = client
        .get(h.http_url("localhost", "/"))
        .send()
        .await
        .unwrap();
    assert_eq!(Echo::parse(&resp.text().await.unwrap()).name, "http-a");

    h.routes(7, vec![b.route(2, Pool::Http, 0)]).await;
    let resp = client
        .get(h.http_url("localhost", "/"))
        .send()
        .await
        .unwrap();
    assert_eq!(Echo::parse(&resp.text().await.unwrap()).name, "http-b");
    h.shutdown(ShutdownKind::Graceful).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_pool_waits_for_an_instance() {
    let a = TestBackend::plain("http-a").await;
    let https0 = TestBackend::tls("https-0", None).await;
    let h = Harness::start(settings(), vec![https0.route(1, Pool::Https, 0)]).await;
    let pending = tokio::spawn({
        let client = h.client(true);
        let url = h.http_url("localhost", "/");
        async move { client.get(url).send().await.unwrap().text().await.unwrap() }
    });
    // The request waits for the http pool; give it an instance.
    h.routes(
        2,
        vec![https0.route(1, Pool::Https, 0), a.route(2, Pool::Http, 0)],
    )
    .await;
    let body = within("the waiting request", pending).await.unwrap();
    assert_eq!(Echo::parse(&body).name, "http-a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconfigure_swaps_settings_and_listeners() {
    use std::os::fd::AsFd;
    let a = TestBackend::plain("http-a").await;
    let root = TestBackend::plain("root-0").await;
    let h = Harness::start(
        settings(),
        vec![a.route(1, Pool::Http, 0), root.route(2, Pool::Root, 0)],
    )
    .await;
    let client = h.client(true);
    let resp = client
        .get(h.http_url("root.localhost", "/"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    // The http listener stays, the https one goes, a new http one comes.
    let extra = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut s = settings();
    s.root_allow = vec!["10.0.0.0/8".into()];
    let init = protocol::ProxyInit {
        listeners: vec![
            protocol::ListenerSpec {
                kind: protocol::ListenerKind::Http,
                addr: h.http_addr.to_string(),
            },
            protocol::ListenerSpec {
                kind: protocol::ListenerKind::Http,
                addr: extra.local_addr().unwrap().to_string(),
            },
        ],
        tls: None,
        certificates: Vec::new(),
        settings: s,
    };
    h.launcher
        .send_with_fds(
            &LauncherToProxy::Reconfigure(init),
            &[h.listeners[0].as_fd(), extra.as_fd()],
        )
        .await
        .unwrap();
    // Reconfigure has no answer: poll until the new settings show.
    let url = h.http_url("root.localhost", "/");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let fresh = h.client(true);
        if fresh.get(&url).send().await.unwrap().status() == 403 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "settings never changed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let extra_url = format!("http://localhost:{}/", extra.local_addr().unwrap().port());
    let resp = h.client(true).get(extra_url).send().await.unwrap();
    assert_eq!(Echo::parse(&resp.text().await.unwrap()).name, "http-a");
    let resp = h
        .client(true)
        .get(h.http_url("localhost", "/"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_connection_at_shutdown_still_gets_its_first_answer() {
    use std::sync::Arc;
    use tokio::io::AsyncWriteExt;
    let a = TestBackend::plain("http-a").await;
    let https0 = TestBackend::tls("https-0", None).await;
    let mut h = Harness::start(
        settings(),
        vec![a.route(1, Pool::Http, 0), https0.route(2, Pool::Https, 0)],
    )
    .await;

    // A finished TLS handshake proves the proxy accepted this connection; no request yet.
    let mut roots = rustls::RootCertStore::empty();
    let der = rustls_pemfile::certs(&mut h.cert_pem.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    roots.add(der).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(h.https_addr).await.unwrap();
    let mut fresh = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();

    let mut idle = tokio::net::TcpStream::connect(h.http_addr).await.unwrap();
    raw_request(&mut idle, "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    h.launcher
        .send(&LauncherToProxy::Shutdown(ShutdownKind::Graceful))
        .await
        .unwrap();
    fresh
        .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut response = Vec::new();
    within(
        "the fresh connection's answer",
        fresh.read_to_end(&mut response),
    )
    .await
    .ok();
    let response = String::from_utf8_lossy(&response).to_lowercase();
    assert!(response.starts_with("http/1.1 200"), "{response}");
    assert!(response.contains("connection: close"), "{response}");
    assert!(response.contains("https-0"), "{response}");
    // The idle connection that sent nothing is closed once its grace is over.
    let mut buf = [0u8; 64];
    let n = within("the idle connection to close", idle.read(&mut buf))
        .await
        .unwrap_or(0);
    assert_eq!(n, 0);
    h.wait_stopped().await.unwrap();
}

/// Keep-alive clients in a tight loop while the worker hands over to a successor, as in an
/// upgrade: an idle keep-alive connection is never closed under a request that may already be
/// on the wire; its next request is answered with `Connection: close` instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drain_fails_no_keep_alive_request() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    let a = TestBackend::plain("http-a").await;
    let https0 = TestBackend::tls("https-0", None).await;
    let mut h = Harness::start(
        settings(),
        vec![a.route(1, Pool::Http, 0), https0.route(2, Pool::Https, 0)],
    )
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for i in 0..16 {
        let client = h.client(i % 4 != 3);
        let url = if i % 2 == 0 {
            h.http_url("localhost", "/")
        } else {
            h.https_url("localhost", "/")
        };
        let (stop, ok) = (stop.clone(), ok.clone());
        clients.push(tokio::spawn(async move {
            let mut errors = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                match client.get(&url).send().await {
                    Ok(r) if r.status() == 200 => match r.bytes().await {
                        Ok(_) => {
                            ok.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => errors.push(format!("body: {e:?}")),
                    },
                    Ok(r) => errors.push(format!("status {}", r.status())),
                    Err(e) => errors.push(format!("{e:?}")),
                }
            }
            errors
        }));
    }
    let wait_more = |n: usize| {
        let ok = ok.clone();
        async move {
            let target = ok.load(Ordering::SeqCst) + n;
            while ok.load(Ordering::SeqCst) < target {
                tokio::task::yield_now().await;
            }
        }
    };
    within("requests before the handover", wait_more(500)).await;
    let successor = h.successor().await;
    h.shutdown(ShutdownKind::Upgrade).await.unwrap();
    within("requests after the handover", wait_more(500)).await;
    stop.store(true, Ordering::SeqCst);
    let mut errors = Vec::new();
    for c in clients {
        errors.extend(within("a client to stop", c).await.unwrap());
    }
    assert!(
        errors.is_empty(),
        "{} failed: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    drop(successor);
}
