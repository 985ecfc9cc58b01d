//! Observability: Prometheus text on the loopback `metrics` address (requests by pool and
//! status class, latency histogram, in-flight per instance, TLS handshakes, upstream errors,
//! connections), and one structured access-log line per request, JSON with the process's JSON
//! formatter.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use common::*;
use protocol::Pool;

/// Log lines of the whole test binary, formatted as JSON the way `overwatch` does with
/// `[log].format = "json"`.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn captured() -> &'static Captured {
    static LOGS: OnceLock<Captured> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Captured::default();
        let writer = logs.clone();
        tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_writer(move || writer.clone())
            .init();
        logs
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_access_log() {
    let logs = captured();
    let a = TestBackend::plain("http-a").await;
    let https0 = TestBackend::tls("https-0", None).await;
    let port = free_port();
    let mut s = settings();
    s.metrics = Some(format!("127.0.0.1:{port}"));
    s.json_logs = true;
    let h = Harness::start(
        s,
        vec![
            a.route(1, Pool::Http, 0),
            https0.route(2, Pool::Https, 0),
            // Nothing listens there: a connect error, retried on nothing else: 502.
            protocol::Backend {
                id: 3,
                pool: Pool::Root,
                index: 0,
                port: free_port(),
            },
        ],
    )
    .await;
    let client = h.client(true);
    for _ in 0..3 {
        let r = client
            .get(h.http_url("localhost", "/x?secret=1"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    let r = client
        .get(h.https_url("localhost", "/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    let r = client
        .get(h.http_url("root.localhost", "/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    r.bytes().await.unwrap();

    let url = format!("http://127.0.0.1:{port}/metrics");
    let text = within("the metrics endpoint", async {
        loop {
            if let Ok(r) = reqwest::Client::new().get(&url).send().await {
                if r.status() == 200 {
                    break r.text().await.unwrap();
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(
        value(
            &text,
            "overwatch_proxy_requests_total{pool=\"http\",class=\"2xx\"}"
        ),
        3.0
    );
    assert_eq!(
        value(
            &text,
            "overwatch_proxy_requests_total{pool=\"https\",class=\"2xx\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            "overwatch_proxy_requests_total{pool=\"root\",class=\"5xx\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            "overwatch_proxy_request_duration_seconds_bucket{pool=\"http\",le=\"+Inf\"}"
        ),
        3.0
    );
    assert_eq!(
        value(
            &text,
            "overwatch_proxy_in_flight{pool=\"http\",instance=\"0\",id=\"1\"}"
        ),
        0.0
    );
    assert_eq!(
        value(
            &text,
            "overwatch_proxy_served_total{pool=\"http\",instance=\"0\",id=\"1\"}"
        ),
        3.0
    );
    assert_eq!(
        value(
            &text,
            "overwatch_proxy_upstream_errors_total{pool=\"root\",kind=\"connect\"}"
        ),
        1.0
    );
    assert_eq!(
        value(&text, "overwatch_proxy_tls_handshakes_total{result=\"ok\"}"),
        1.0
    );
    assert!(
        value(
            &text,
            "overwatch_proxy_connections_total{listener=\"http\"}"
        ) >= 1.0
    );
    assert_eq!(
        reqwest::get(format!("http://127.0.0.1:{port}/other"))
            .await
            .unwrap()
            .status(),
        404
    );

    // One JSON line per request with the access-log fields.
    let lines: Vec<serde_json::Value> = String::from_utf8(logs.0.lock().unwrap().clone())
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &serde_json::Value| v["target"] == "access")
        .collect();
    let http: Vec<_> = lines.iter().filter(|v| v["pool"] == "http").collect();
    assert_eq!(http.len(), 3, "{lines:?}");
    let line = http[0];
    assert_eq!(line["method"], "GET");
    assert_eq!(line["path"], "/x");
    assert_eq!(line["status"], 200);
    assert_eq!(line["instance"], 0);
    assert_eq!(line["client"], "127.0.0.1");
    assert!(line["host"].as_str().unwrap().starts_with("localhost:"));
    assert!(line["bytes"].as_u64().unwrap() > 0);
    assert!(line["duration_ms"].is_u64());
}
