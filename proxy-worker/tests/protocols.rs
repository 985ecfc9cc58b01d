//! Wire protocols through the proxy: HTTP/2 over TLS, upgrades tunnelled both ways, streamed
//! server-sent events and request bodies.

mod common;

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::*;
use http_body_util::StreamBody;
use hyper::body::Frame;
use protocol::Pool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_over_tls_reaches_the_https_pool() {
    let https0 = TestBackend::tls("https-0", None).await;
    let http0 = TestBackend::plain("http-0").await;
    let h = Harness::start(
        settings(),
        vec![
            https0.route(1, Pool::Https, 0),
            http0.route(2, Pool::Http, 0),
        ],
    )
    .await;
    let client = h.client(false);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let client = client.clone();
        let url = h.https_url("localhost", "/h2");
        tasks.push(tokio::spawn(async move {
            let resp = client.get(url).send().await.unwrap();
            (
                resp.version(),
                resp.status().as_u16(),
                resp.text().await.unwrap(),
            )
        }));
    }
    for t in tasks {
        let (version, status, body) = within("an h2 response", t).await.unwrap();
        assert_eq!(version, reqwest::Version::HTTP_2);
        assert_eq!(status, 200);
        assert_eq!(Echo::parse(&body).name, "https-0");
    }
    assert_eq!(http0.hits(), 0);
}

/// A hand-rolled instance that answers an upgrade with 101 and then echoes bytes.
async fn upgrade_backend() -> (u16, Arc<Mutex<String>>, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let head = Arc::new(Mutex::new(String::new()));
    let task = tokio::spawn({
        let head = head.clone();
        async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = Vec::new();
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                let mut chunk = [0u8; 1024];
                let n = s.read(&mut chunk).await.unwrap();
                assert!(n > 0);
                buf.extend_from_slice(&chunk[..n]);
            }
            *head.lock().unwrap() = String::from_utf8_lossy(&buf).to_string();
            s.write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            )
            .await
            .unwrap();
            let mut chunk = [0u8; 1024];
            loop {
                let n = s.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                let mut reply = b"echo:".to_vec();
                reply.extend_from_slice(&chunk[..n]);
                if s.write_all(&reply).await.is_err() {
                    break;
                }
            }
        }
    });
    (port, head, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_passes_bytes_both_ways() {
    let (port, backend_head, backend) = upgrade_backend().await;
    let h = Harness::start(
        settings(),
        vec![protocol::Backend {
            id: 1,
            pool: Pool::Http,
            index: 0,
            port,
        }],
    )
    .await;
    let mut s = tokio::net::TcpStream::connect(h.http_addr).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut chunk = [0u8; 1024];
        let n = within("the 101", s.read(&mut chunk)).await.unwrap();
        assert!(n > 0, "closed before the 101");
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");

    let sent = backend_head.lock().unwrap().to_lowercase();
    assert!(sent.contains("connection: upgrade"), "{sent}");
    assert!(sent.contains("upgrade: websocket"), "{sent}");
    assert!(
        sent.contains("sec-websocket-key: dghlihnhbxbszsbub25jzq=="),
        "{sent}"
    );

    for msg in ["ping", "pong"] {
        s.write_all(msg.as_bytes()).await.unwrap();
        let expected = format!("echo:{msg}");
        let mut got = vec![0u8; expected.len()];
        within("echoed bytes", s.read_exact(&mut got))
            .await
            .unwrap();
        assert_eq!(String::from_utf8(got).unwrap(), expected);
    }
    drop(s);
    within("the backend to see the close", backend)
        .await
        .unwrap();
    // The tunnel counted as in flight until it closed.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while h.stats().await[0].in_flight != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "tunnel still counted"
        );
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sent_events_flow_event_by_event() {
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
    for (backend, url, http1) in [
        (&http0, h.http_url("localhost", "/sse"), true),
        (&https0, h.https_url("localhost", "/sse"), false),
    ] {
        let mut resp = h.client(http1).get(url).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        backend.wait_entered().await;
        let first = within("the first event", resp.chunk())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&first[..], b"data: one\n\n");
        backend.release();
        let second = within("the second event", resp.chunk())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&second[..], b"data: two\n\n");
        // HTTP/2 may end with an empty DATA frame carrying END_STREAM.
        while let Some(rest) = within("the end", resp.chunk()).await.unwrap() {
            assert!(rest.is_empty(), "{rest:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_both_ways() {
    let http0 = TestBackend::plain("http-0").await;
    let h = Harness::start(settings(), vec![http0.route(1, Pool::Http, 0)]).await;
    let size = 8 * 1024 * 1024;
    let chunks = futures_util::stream::iter(
        (0..size / 65536)
            .map(|_| Ok::<_, std::io::Error>(Frame::data(Bytes::from(vec![b'x'; 65536])))),
    );
    let resp = h
        .client(true)
        .put(h.http_url("localhost", "/upload"))
        .body(reqwest::Body::wrap(StreamBody::new(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let echo = Echo::parse(&resp.text().await.unwrap());
    assert_eq!(echo.get("body-bytes"), Some(size.to_string().as_str()));
    assert_eq!(echo.get("transfer-encoding"), Some("chunked"));
}
