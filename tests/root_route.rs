//! The root instance is reachable only through `root_host` and only from `root_allow`: a
//! client in a network namespace (its own address, over a veth pair) gets 403; the same
//! request from loopback reaches the root instance; other hosts from the namespace reach the
//! ordinary pool.

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;

/// A network namespace joined to the host by a veth pair; removed on drop.
struct Netns {
    name: String,
    host_if: String,
    pub host_ip: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    fn new() -> Self {
        let id = std::process::id() % 100_000;
        let subnet = 1 + std::process::id() % 250;
        let name = format!("owt{id}");
        let (host_if, ns_if) = (format!("owh{id}"), format!("own{id}"));
        let host_ip = format!("10.201.{subnet}.1");
        let ns_ip = format!("10.201.{subnet}.2");
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let _ = Command::new("ip").args(["link", "del", &host_if]).output();
        ip(&["netns", "add", &name]);
        let ns = Netns {
            name: name.clone(),
            host_if: host_if.clone(),
            host_ip: host_ip.clone(),
        };
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ]);
        ip(&["link", "set", &ns_if, "netns", &name]);
        ip(&["addr", "add", &format!("{host_ip}/24"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        ip(&[
            "netns",
            "exec",
            &name,
            "ip",
            "addr",
            "add",
            &format!("{ns_ip}/24"),
            "dev",
            &ns_if,
        ]);
        ip(&["netns", "exec", &name, "ip", "link", "set", &ns_if, "up"]);
        ip(&["netns", "exec", &name, "ip", "link", "set", "lo", "up"]);
        ns
    }

    /// curl from inside the namespace; returns (status code, body).
    fn curl(&self, url: &str, host: &str) -> (u16, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "curl", "-s", "-m", "10", "-H"])
            .arg(format!("Host: {host}"))
            .args(["-w", "\n%{http_code}", url])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

#[test]
fn root_route_refused_from_another_host_served_from_loopback() {
    if !have_test_users() {
        return;
    }
    let ns = Netns::new();
    let sb = Sandbox::new();
    let port = sb.http_port;
    let config = sb.config(1, 1, true, "");
    // Listen on the veth address as well as loopback.
    let text = std::fs::read_to_string(&config).unwrap().replace(
        &format!("http = [\"127.0.0.1:{port}\"]"),
        &format!("http = [\"127.0.0.1:{port}\", \"{}:{port}\"]", ns.host_ip),
    );
    std::fs::write(&config, text).unwrap();
    let _launcher = Launcher::run(&sb, &config);
    sb.wait_ready(3, Duration::from_secs(30));

    let remote = format!("http://{}:{port}/whoami", ns.host_ip);
    let (code, body) = ns.curl(&remote, "root.localhost");
    assert_eq!(code, 403, "root route from the namespace: {body}");
    assert!(!body.contains("pool=root"), "{body}");
    let (code, body) = ns.curl(&remote, "ROOT.localhost:80");
    assert_eq!(
        code, 403,
        "case and port must not get around root_allow: {body}"
    );

    let (code, body) = ns.curl(&remote, "example.test");
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("pool=http "), "{body}");

    let client = sb.client();
    let local = client
        .get(sb.http_url("/whoami"))
        .header("Host", "root.localhost")
        .send()
        .unwrap();
    assert_eq!(local.status(), 200);
    assert!(local.text().unwrap().starts_with("pool=root"));
    // Over TLS the name travels as SNI and :authority (HTTP/2), not as a Host header.
    let tls_client = reqwest::blocking::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(sb.cert_pem.as_bytes()).unwrap())
        .resolve(
            "root.localhost",
            format!("127.0.0.1:{}", sb.https_port).parse().unwrap(),
        )
        .build()
        .unwrap();
    let local = tls_client
        .get(format!("https://root.localhost:{}/whoami", sb.https_port))
        .send()
        .unwrap();
    assert_eq!(local.status(), 200);
    assert!(local.text().unwrap().starts_with("pool=root"));
}
