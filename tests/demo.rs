//! `overwatch demo`: no config, no Node, no root. It prints the URLs and the control socket,
//! serves both pools and the root instance, answers `overwatchctl status`, and stops on Ctrl-C.

mod common;

use common::*;
use nix::sys::signal::Signal;
use std::time::Duration;

#[test]
fn demo_serves_both_pools_and_the_root_instance() {
    let sb = Sandbox::new();
    let dir = sb.path().join("demo");
    let https = format!("127.0.0.1:{}", sb.https_port);
    let http = format!("127.0.0.1:{}", sb.http_port);
    let mut launcher = Launcher::start(
        &[
            "demo",
            "--https",
            &https,
            "--http",
            &http,
            "--dir",
            dir.to_str().unwrap(),
        ],
        &[],
        sb.path().join("demo.log"),
    );
    let socket = dir.join("control.sock");
    let printed = wait_for("the banner", Duration::from_secs(10), || {
        let log = launcher.log_text();
        log.contains("overwatchctl --socket").then_some(log)
    });
    assert!(printed.contains(&format!("https://{https}/")), "{printed}");
    assert!(printed.contains(&format!("http://{http}/")), "{printed}");
    assert!(printed.contains(&socket.display().to_string()), "{printed}");

    let status = wait_for("5 ready instances", Duration::from_secs(30), || {
        let out = std::process::Command::new(OVERWATCHCTL)
            .args(["--socket", socket.to_str().unwrap(), "status", "--json"])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let n = v["instances"]
            .as_array()?
            .iter()
            .filter(|i| i["state"] == "ready")
            .count();
        (n == 5).then_some(v)
    });
    assert_eq!(status["counts"]["https"], 2);
    assert_eq!(status["counts"]["http"], 2);
    assert_eq!(status["counts"]["root"], true);

    let cert = std::fs::read(dir.join("cert.pem")).unwrap();
    let client = reqwest::blocking::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&cert).unwrap())
        .build()
        .unwrap();
    let page = client
        .get(format!("https://{https}/"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(page.contains("<b>https</b> instance #"), "{page}");
    assert!(page.contains("pid"), "{page}");
    let page = client
        .get(format!("http://{http}/"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(page.contains("<b>http</b> instance #"), "{page}");
    let page = client
        .get(format!("http://{http}/"))
        .header("Host", "root.localhost")
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(page.contains("<b>root</b> instance #0"), "{page}");

    let text = std::process::Command::new(OVERWATCHCTL)
        .args(["--socket", socket.to_str().unwrap(), "status"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("POOL"), "{text}");
    assert_eq!(text.matches("ready").count(), 5, "{text}");

    let everyone = descendants(launcher.pid);
    launcher.signal(Signal::SIGINT);
    assert_eq!(launcher.wait_exit(Duration::from_secs(20)).code(), Some(0));
    for pid in everyone {
        assert!(!alive(pid), "pid {pid} ({}) still running", cmdline(pid));
    }
}
