//! The proxy worker through the real binary, with real clients: HTTP/1.1 and HTTP/2 over TLS,
//! SNI choosing a `[[proxy.certificates]]` certificate, an upgrade echo through both pools, a
//! 512 MiB streamed upload and download with the proxy's memory bounded, server-sent events
//! arriving one by one, forwarding headers the client cannot forge, and no failed request
//! while an instance is killed under load.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

const READY: Duration = Duration::from_secs(30);

fn start(https: u32, http: u32, extra: &str) -> (Sandbox, Launcher) {
    let sb = Sandbox::new();
    have_test_users();
    let config = sb.config(https, http, false, extra);
    let launcher = Launcher::run(&sb, &config);
    sb.wait_ready((https + http) as usize, READY);
    (sb, launcher)
}

fn https_addr(sb: &Sandbox) -> SocketAddr {
    format!("127.0.0.1:{}", sb.https_port).parse().unwrap()
}

#[test]
fn http1_and_http2_over_tls() {
    let (sb, _launcher) = start(1, 1, "");
    let h2 = sb.client().get(sb.https_url("/whoami")).send().unwrap();
    assert_eq!(h2.version(), reqwest::Version::HTTP_2);
    assert!(h2.text().unwrap().starts_with("pool=https"));
    let h1 = reqwest::blocking::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(sb.cert_pem.as_bytes()).unwrap())
        .http1_only()
        .build()
        .unwrap();
    for _ in 0..3 {
        let r = h1.get(sb.https_url("/whoami")).send().unwrap();
        assert_eq!(r.version(), reqwest::Version::HTTP_11);
        assert!(r.text().unwrap().starts_with("pool=https"));
    }
    let r = sb.client().get(sb.http_url("/whoami")).send().unwrap();
    assert!(r.text().unwrap().starts_with("pool=http "));
}

#[test]
fn sni_chooses_a_second_certificate() {
    let sb0 = Sandbox::new();
    let shop = rcgen::generate_simple_self_signed(vec!["shop.test".to_string()]).unwrap();
    std::fs::write(sb0.path().join("shop.pem"), shop.cert.pem()).unwrap();
    std::fs::write(sb0.path().join("shop.key"), shop.key_pair.serialize_pem()).unwrap();
    have_test_users();
    let config = sb0.config(
        1,
        0,
        false,
        "\n[[proxy.certificates]]\ncert = \"shop.pem\"\nkey = \"shop.key\"\n",
    );
    let _launcher = Launcher::run(&sb0, &config);
    sb0.wait_ready(1, READY);
    let only = |pem: &str, name: &str| {
        reqwest::blocking::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap())
            .resolve(name, https_addr(&sb0))
            .build()
            .unwrap()
    };
    let url = |name: &str| format!("https://{name}:{}/whoami", sb0.https_port);
    let r = only(&shop.cert.pem(), "shop.test")
        .get(url("shop.test"))
        .send();
    assert_eq!(r.unwrap().status(), 200);
    // Other names get the default certificate, not the shop's.
    assert!(only(&shop.cert.pem(), "localhost")
        .get(url("localhost"))
        .send()
        .is_err());
    let r = only(&sb0.cert_pem, "localhost")
        .get(url("localhost"))
        .send();
    assert_eq!(r.unwrap().status(), 200);
}

/// Sends an `Upgrade: echo` request and checks bytes come back through the tunnel.
async fn upgrade_echo(client: reqwest::Client, url: String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let resp = client
        .get(&url)
        .header("connection", "upgrade")
        .header("upgrade", "echo")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 101, "{url}");
    let mut io = resp.upgrade().await.unwrap();
    for msg in ["ping", "a longer message through the tunnel"] {
        io.write_all(msg.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(10), io.read_exact(&mut buf))
            .await
            .expect("echo in time")
            .unwrap();
        assert_eq!(buf, msg.as_bytes());
    }
}

#[test]
fn upgrade_echo_through_both_pools() {
    let (sb, _launcher) = start(1, 1, "");
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(sb.cert_pem.as_bytes()).unwrap())
        .http1_only()
        .build()
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(upgrade_echo(client.clone(), sb.http_url("/upgrade")));
    rt.block_on(upgrade_echo(client, sb.https_url("/upgrade")));
}

fn vm_rss_kib(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// A deterministic stream of `len` bytes.
struct Pattern {
    pos: u64,
    len: u64,
}

impl Read for Pattern {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min((self.len - self.pos) as usize);
        for (i, b) in buf[..n].iter_mut().enumerate() {
            *b = ((self.pos + i as u64) % 251) as u8;
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// Reads an HTTP/1.1 response body (`Content-Length` or chunked) and checks it is the
/// pattern; returns its length.
fn read_pattern_body(r: &mut impl std::io::BufRead) -> u64 {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        assert!(
            r.read_line(&mut line).unwrap() > 0,
            "closed inside the head"
        );
        if line == "\r\n" {
            break;
        }
        head.push_str(&line.to_ascii_lowercase());
    }
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let mut got = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    let mut take = |r: &mut dyn Read, mut n: u64, got: &mut u64| {
        while n > 0 {
            let want = n.min(buf.len() as u64) as usize;
            r.read_exact(&mut buf[..want]).unwrap();
            for (i, b) in buf[..want].iter().enumerate() {
                assert_eq!(
                    *b,
                    ((*got + i as u64) % 251) as u8,
                    "byte {}",
                    *got + i as u64
                );
            }
            *got += want as u64;
            n -= want as u64;
        }
    };
    if let Some(len) = head.lines().find_map(|l| l.strip_prefix("content-length:")) {
        take(r, len.trim().parse().unwrap(), &mut got);
        return got;
    }
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    loop {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let size = u64::from_str_radix(line.trim().split(';').next().unwrap(), 16).unwrap();
        if size == 0 {
            return got;
        }
        take(r, size, &mut got);
        line.clear();
        r.read_line(&mut line).unwrap();
    }
}

#[test]
fn half_a_gigabyte_streams_both_ways_in_bounded_memory() {
    const LEN: u64 = 512 * 1024 * 1024;
    let (sb, launcher) = start(0, 1, "");
    let proxy = launcher.worker_pid("proxy").expect("a proxy worker");
    let before = vm_rss_kib(proxy).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(before));
    let sampler = std::thread::spawn({
        let (done, peak) = (done.clone(), peak.clone());
        move || {
            while !done.load(Ordering::SeqCst) {
                if let Some(kib) = vm_rss_kib(proxy) {
                    peak.fetch_max(kib, Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    });
    // Full duplex: the upload goes on while the echo comes back, on one connection.
    let stream = std::net::TcpStream::connect(("127.0.0.1", sb.http_port)).unwrap();
    let mut up = stream.try_clone().unwrap();
    let uploader = std::thread::spawn(move || {
        write!(
            up,
            "POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: {LEN}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        std::io::copy(&mut Pattern { pos: 0, len: LEN }, &mut up).unwrap()
    });
    let got = read_pattern_body(&mut std::io::BufReader::with_capacity(256 * 1024, stream));
    assert_eq!(uploader.join().unwrap(), LEN);
    assert_eq!(got, LEN);
    done.store(true, Ordering::SeqCst);
    sampler.join().unwrap();
    let peak = peak.load(Ordering::SeqCst);
    eprintln!("proxy worker VmRSS: {before} KiB before, {peak} KiB peak");
    assert!(
        peak < before + 64 * 1024,
        "the proxy worker grew from {before} KiB to {peak} KiB for 512 MiB each way"
    );
}

#[test]
fn server_sent_events_arrive_one_by_one() {
    let (sb, _launcher) = start(0, 1, "");
    let mut resp = sb
        .client()
        .get(sb.http_url("/sse?n=5&ms=200"))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let start = Instant::now();
    let mut arrivals = Vec::new();
    let mut text = String::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = resp.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        text.push_str(std::str::from_utf8(&buf[..n]).unwrap());
        while arrivals.len() < text.matches("\n\n").count() {
            arrivals.push(start.elapsed());
        }
    }
    assert_eq!(arrivals.len(), 5, "{text}");
    for pair in arrivals.windows(2) {
        assert!(
            pair[1] - pair[0] >= Duration::from_millis(100),
            "events were buffered: {arrivals:?}"
        );
    }
}

#[test]
fn forwarding_headers_are_set_and_client_values_replaced() {
    let (sb, _launcher) = start(1, 1, "");
    for (url, proto) in [
        (sb.https_url("/headers"), "https"),
        (sb.http_url("/headers"), "http"),
    ] {
        let text = sb
            .client()
            .get(&url)
            .header("x-forwarded-for", "6.6.6.6")
            .header("x-forwarded-proto", "gopher")
            .header("x-forwarded-host", "evil.example")
            .header("forwarded", "for=6.6.6.6")
            .send()
            .unwrap()
            .text()
            .unwrap();
        let port = if proto == "https" {
            sb.https_port
        } else {
            sb.http_port
        };
        assert!(text.contains("x-forwarded-for: 127.0.0.1\n"), "{text}");
        assert!(
            text.contains(&format!("x-forwarded-proto: {proto}\n")),
            "{text}"
        );
        assert!(
            text.contains(&format!("x-forwarded-host: 127.0.0.1:{port}\n")),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "forwarded: for=127.0.0.1;proto={proto};host=\"127.0.0.1:{port}\"\n"
            )),
            "{text}"
        );
        assert!(
            !text.contains("6.6.6.6") && !text.contains("evil"),
            "{text}"
        );
        assert!(
            text.contains(&format!("host: 127.0.0.1:{port}\n")),
            "{text}"
        );
    }
}

#[test]
fn a_killed_instance_fails_no_request() {
    let (sb, _launcher) = start(2, 2, "");
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for i in 0..8 {
        let client = if i % 4 < 2 {
            sb.client()
        } else {
            sb.fresh_client()
        };
        let url = if i % 2 == 0 {
            sb.http_url("/whoami")
        } else {
            sb.https_url("/slow?ms=20")
        };
        let (stop, ok) = (stop.clone(), ok.clone());
        clients.push(std::thread::spawn(move || {
            let mut failed = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                match client.get(&url).send().and_then(|r| {
                    let status = r.status();
                    r.text().map(|_| status)
                }) {
                    Ok(s) if s.is_success() => {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(s) => failed.push(format!("{url}: status {s}")),
                    Err(e) => failed.push(format!("{url}: {e:?}")),
                }
            }
            failed
        }));
    }
    let more = |n: u64| {
        let target = ok.load(Ordering::SeqCst) + n;
        wait_for("requests to go on", Duration::from_secs(30), || {
            (ok.load(Ordering::SeqCst) >= target).then_some(())
        });
    };
    more(200);
    let status = sb.status().unwrap();
    let instances = status["instances"].as_array().unwrap();
    let victims: Vec<(String, i64)> = ["http", "https"]
        .iter()
        .map(|pool| {
            let i = instances.iter().find(|i| i["pool"] == *pool).unwrap();
            (pool.to_string(), i["pid"].as_i64().unwrap())
        })
        .collect();
    for (pool, pid) in &victims {
        eprintln!("killing the {pool} instance {pid}");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        more(200);
    }
    // Until the replacements serve again.
    wait_for("the instances to be replaced", READY, || {
        let s = sb.status()?;
        let list = s["instances"].as_array()?;
        (list.len() == 4
            && list.iter().all(|i| i["state"] == "ready")
            && !list.iter().any(|i| {
                victims
                    .iter()
                    .any(|(_, pid)| i["pid"].as_i64() == Some(*pid))
            }))
        .then_some(())
    });
    more(200);
    stop.store(true, Ordering::SeqCst);
    let failed: Vec<String> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    assert!(
        failed.is_empty(),
        "{} failed requests: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    let _ = std::io::stderr().flush();
}
