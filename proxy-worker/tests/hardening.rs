//! Hostile and broken clients, in raw bytes: a client dribbling its head is cut off while
//! others are served; oversize heads and too many headers get 431; ambiguous framing
//! (`Content-Length` with `Transfer-Encoding`, two different lengths, a bad chunk size) gets
//! 400 and never reaches an instance; an instance that sends no response head in time gets
//! the client a 504.

mod common;

use std::time::Duration;

use common::*;
use protocol::Pool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `request` (ignoring a write the proxy refused halfway) and reads until the proxy
/// closes the connection.
async fn exchange(h: &Harness, request: &[u8]) -> String {
    let mut s = TcpStream::connect(h.http_addr).await.unwrap();
    let _ = s.write_all(request).await;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match within("the proxy to answer and close", s.read(&mut buf)).await {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).to_string()
}

async fn start(a: &TestBackend) -> Harness {
    let mut setup = Setup::new(settings(), vec![a.route(1, Pool::Http, 0)]);
    setup.tuning.header_read_timeout = Duration::from_millis(500);
    setup.tuning.upstream_response_timeout = Duration::from_millis(300);
    Harness::start_with(setup).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dribbling_client_is_cut_off_and_nobody_else_notices() {
    let a = TestBackend::plain("http-a").await;
    let h = start(&a).await;
    let mut slow = TcpStream::connect(h.http_addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .unwrap();
    let (mut rd, mut wr) = slow.into_split();
    // One header line every 50 ms, for up to 10 s: far longer than the 500 ms allowed.
    let dribble = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        for i in 0..200 {
            tick.tick().await;
            if wr
                .write_all(format!("X-{i}: y\r\n").as_bytes())
                .await
                .is_err()
            {
                return i;
            }
        }
        200
    });
    // Served meanwhile, on a connection of their own.
    for _ in 0..5 {
        let mut other = TcpStream::connect(h.http_addr).await.unwrap();
        let (head, _) = raw_request(&mut other, "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    }
    let mut answer = Vec::new();
    let _ = within("the dribbler to be cut off", rd.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
    let lines = within("the dribbler to notice", dribble).await.unwrap();
    assert!(lines < 200, "the dribbling client was never cut off");
    assert_eq!(a.hits(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_heads_and_too_many_headers_get_431() {
    let a = TestBackend::plain("http-a").await;
    let h = start(&a).await;
    let big = format!(
        "GET / HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    let answer = exchange(&h, big.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    let mut many = String::from("GET / HTTP/1.1\r\nHost: localhost\r\n");
    for i in 0..200 {
        many.push_str(&format!("X-{i}: 1\r\n"));
    }
    many.push_str("\r\n");
    let answer = exchange(&h, many.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert_eq!(a.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_framing_gets_400_and_is_never_forwarded() {
    let a = TestBackend::plain("http-a").await;
    let h = start(&a).await;
    let cases: [&[u8]; 5] = [
        b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        b"POST / HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX\r\n0\r\n\r\n",
    ];
    for case in cases {
        let answer = exchange(&h, case).await;
        assert!(
            answer.starts_with("HTTP/1.1 400"),
            "{}\n=> {answer}",
            String::from_utf8_lossy(case)
        );
    }
    // The same smuggling attempt after a good request on a keep-alive connection.
    let answer = exchange(
        &h,
        b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\nPOST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("HTTP/1.1 400"), "{answer}");
    assert_eq!(a.hits(), 1, "only the good request reached the instance");
    // A good chunked upload still passes.
    let answer = exchange(
        &h,
        b"POST / HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("body-bytes: 5"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_without_response_headers_in_time_gets_504() {
    let a = TestBackend::plain("http-a").await;
    let h = start(&a).await;
    let answer = exchange(
        &h,
        b"GET /slow HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
    a.release();
}
