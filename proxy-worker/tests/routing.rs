//! Routing through a real proxy worker: pools kept apart, round robin, root access control,
//! forwarding headers, retry on a refused instance, redirects and stats.

mod common;

use common::*;
use protocol::{Pool, ProxyToFleet};

async fn get(client: &reqwest::Client, url: &str) -> (u16, Echo) {
    let resp = within("a response", client.get(url).send()).await.unwrap();
    let status = resp.status().as_u16();
    (status, Echo::parse(&resp.text().await.unwrap()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_are_kept_apart_and_spread_round_robin() {
    let https0 = TestBackend::tls("https-0", None).await;
    let http0 = TestBackend::plain("http-0").await;
    let http1 = TestBackend::plain("http-1").await;
    let root = TestBackend::plain("root-0").await;
    let h = Harness::start(
        settings(),
        vec![
            https0.route(1, Pool::Https, 0),
            http0.route(2, Pool::Http, 0),
            http1.route(3, Pool::Http, 1),
            root.route(4, Pool::Root, 0),
        ],
    )
    .await;
    let client = h.client(true);

    let mut names = Vec::new();
    for _ in 0..6 {
        let (status, echo) = get(&client, &h.http_url("localhost", "/")).await;
        assert_eq!(status, 200);
        names.push(echo.name);
    }
    assert_eq!(
        names.iter().filter(|n| *n == "http-0").count(),
        3,
        "{names:?}"
    );
    assert_eq!(
        names.iter().filter(|n| *n == "http-1").count(),
        3,
        "{names:?}"
    );
    assert!(
        names.windows(2).all(|w| w[0] != w[1]),
        "alternates: {names:?}"
    );

    for _ in 0..3 {
        let (status, echo) = get(&client, &h.https_url("localhost", "/")).await;
        assert_eq!(status, 200);
        assert_eq!(echo.name, "https-0");
    }
    let (status, echo) = get(&client, &h.http_url("root.localhost", "/")).await;
    assert_eq!((status, echo.name.as_str()), (200, "root-0"));
    let (status, echo) = get(&client, &h.https_url("ROOT.localhost", "/")).await;
    assert_eq!((status, echo.name.as_str()), (200, "root-0"));
    assert_eq!(root.hits(), 2);
    assert_eq!(https0.hits(), 3);

    let stats = h.stats().await;
    let served: Vec<_> = stats
        .iter()
        .map(|s| (s.id, s.served, s.in_flight))
        .collect();
    assert_eq!(served, vec![(1, 3, 0), (2, 3, 0), (3, 3, 0), (4, 2, 0)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_host_is_refused_outside_root_allow() {
    let http0 = TestBackend::plain("http-0").await;
    let root = TestBackend::plain("root-0").await;
    let mut s = settings();
    s.root_allow = vec!["10.0.0.0/8".into(), "::1/128".into()];
    let h = Harness::start(
        s,
        vec![http0.route(1, Pool::Http, 0), root.route(2, Pool::Root, 0)],
    )
    .await;
    let client = h.client(true);
    let (status, _) = get(&client, &h.http_url("root.localhost", "/")).await;
    assert_eq!(status, 403);
    let (status, _) = get(&client, &h.https_url("root.localhost", "/")).await;
    assert_eq!(status, 403);
    assert_eq!(root.hits(), 0);
    let (status, echo) = get(&client, &h.http_url("localhost", "/")).await;
    assert_eq!((status, echo.name.as_str()), (200, "http-0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_are_set_and_client_values_replaced() {
    let http0 = TestBackend::plain("http-0").await;
    let https0 = TestBackend::tls("https-0", None).await;
    let h = Harness::start(
        settings(),
        vec![
            http0.route(1, Pool::Http, 0),
            https0.route(2, Pool::Https, 0),
        ],
    )
    .await;
    let client = h.client(true);
    let resp = client
        .get(h.http_url("localhost", "/x?y=1"))
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-forwarded-host", "evil.example")
        .header("forwarded", "for=6.6.6.6")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "secret")
        .send()
        .await
        .unwrap();
    let echo = Echo::parse(&resp.text().await.unwrap());
    let host = format!("localhost:{}", h.http_addr.port());
    assert_eq!(echo.all("x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(echo.get("x-forwarded-proto"), Some("http"));
    assert_eq!(echo.get("x-forwarded-host"), Some(host.as_str()));
    assert_eq!(echo.get("host"), Some(host.as_str()));
    assert_eq!(
        echo.all("forwarded"),
        [format!("for=127.0.0.1;proto=http;host=\"{host}\"").as_str()]
    );
    assert_eq!(echo.get("x-hop"), None);

    // HTTP/2 client: Host comes from :authority.
    let client = h.client(false);
    let resp = client
        .get(h.https_url("localhost", "/"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    let echo = Echo::parse(&resp.text().await.unwrap());
    let host = format!("localhost:{}", h.https_addr.port());
    assert_eq!(echo.name, "https-0");
    assert_eq!(echo.get("x-forwarded-proto"), Some("https"));
    assert_eq!(echo.get("host"), Some(host.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_instance_is_retried_on_another_and_reported() {
    let dead_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let live = TestBackend::plain("http-1").await;
    let dead = protocol::Backend {
        id: 1,
        pool: Pool::Http,
        index: 0,
        port: dead_port,
    };
    let h = Harness::start(settings(), vec![dead, live.route(2, Pool::Http, 1)]).await;
    let client = h.client(true);
    // The first pick is the first backend: the refused one. A POST with a body is retried
    // too, since nothing reached the refused instance.
    let resp = client
        .post(h.http_url("localhost", "/form"))
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let echo = Echo::parse(&resp.text().await.unwrap());
    assert_eq!(echo.name, "http-1");
    assert_eq!(echo.get("body-bytes"), Some("5"));
    for _ in 0..4 {
        let (status, echo) = get(&client, &h.http_url("localhost", "/")).await;
        assert_eq!((status, echo.name.as_str()), (200, "http-1"));
    }
    match h
        .fleet_until(|m| matches!(m, ProxyToFleet::BackendFailed { .. }))
        .await
    {
        ProxyToFleet::BackendFailed { id, reason } => {
            assert_eq!(id, 1);
            assert!(!reason.is_empty());
        }
        _ => unreachable!(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_dead_instances_give_502() {
    let dead_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dead = protocol::Backend {
        id: 1,
        pool: Pool::Http,
        index: 0,
        port: dead_port,
    };
    let h = Harness::start(settings(), vec![dead]).await;
    let (status, _) = get(&h.client(true), &h.http_url("localhost", "/")).await;
    assert_eq!(status, 502);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_http_answers_308_to_https() {
    let http0 = TestBackend::plain("http-0").await;
    let mut s = settings();
    s.redirect_http = true;
    let h = Harness::start(s, vec![http0.route(1, Pool::Http, 0)]).await;
    let resp = h
        .client(true)
        .get(h.http_url("localhost", "/a/b?c=d"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 308);
    assert_eq!(resp.headers()["location"], "https://localhost/a/b?c=d");
    assert_eq!(http0.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_instances_are_verified_against_the_configured_ca() {
    let ca = TestCa::new();
    let good = TestBackend::tls("https-good", Some(&ca)).await;
    let mut s = settings();
    s.https_ca_pem = Some(ca.pem());
    let h = Harness::start(s, vec![good.route(1, Pool::Https, 0)]).await;
    let client = h.client(true);
    let (status, echo) = get(&client, &h.https_url("localhost", "/")).await;
    assert_eq!((status, echo.name.as_str()), (200, "https-good"));

    // A self-signed instance is refused when a CA is configured.
    let rogue = TestBackend::tls("https-rogue", None).await;
    h.routes(2, vec![rogue.route(2, Pool::Https, 0)]).await;
    let (status, _) = get(&client, &h.https_url("localhost", "/")).await;
    assert_eq!(status, 502);
}

/// An instance that reads a request head and closes the connection without answering.
async fn slammer() -> (u16, tokio::task::JoinHandle<()>) {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            let mut buf = Vec::new();
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                let mut chunk = [0u8; 1024];
                match s.read(&mut chunk).await {
                    Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                    _ => break,
                }
            }
        }
    });
    (port, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_idempotent_requests_are_retried_after_a_send_failure() {
    let (port, slam) = slammer().await;
    let live = TestBackend::plain("http-1").await;
    let broken = protocol::Backend {
        id: 1,
        pool: Pool::Http,
        index: 0,
        port,
    };
    let h = Harness::start(settings(), vec![broken, live.route(2, Pool::Http, 1)]).await;
    let client = h.client(true);
    // Round robin starts at the broken instance, and comes back to it every other pick.
    let (status, echo) = get(&client, &h.http_url("localhost", "/")).await;
    assert_eq!((status, echo.name.as_str()), (200, "http-1"));
    let resp = client
        .post(h.http_url("localhost", "/order"))
        .body("buy")
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        502,
        "a POST that reached an instance is not sent twice"
    );
    assert_eq!(live.hits(), 1);
    slam.abort();
}
