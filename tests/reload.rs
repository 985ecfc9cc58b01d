//! `overwatchctl reload` and SIGHUP: an invalid config is refused with its key and line and the
//! old one keeps serving; a valid one applies new certificates to new handshakes and opens and
//! closes listeners, without dropping an open connection.

mod common;

use common::*;
use std::time::Duration;

fn new_cert(sb: &Sandbox) -> String {
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    std::fs::write(sb.path().join("cert.pem"), cert.cert.pem()).unwrap();
    std::fs::write(sb.path().join("key.pem"), cert.key_pair.serialize_pem()).unwrap();
    cert.cert.pem()
}

fn client_for(pem: &str) -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap())
        .tls_built_in_root_certs(false)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

#[test]
fn invalid_config_is_refused_and_the_old_one_keeps_serving() {
    let sb = Sandbox::new();
    let config = sb.config(1, 1, false, "");
    let _launcher = Launcher::run(&sb, &config);
    sb.wait_ready(2, Duration::from_secs(30));
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        good.replace("interval = \"500ms\"", "interval = \"often\""),
    )
    .unwrap();
    let out = sb.ctl(&["reload"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("key `health.interval`"), "{stderr}");
    let body = sb
        .client()
        .get(sb.https_url("/whoami"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(body.starts_with("pool=https"), "{body}");
    assert_eq!(
        sb.status().unwrap()["instances"].as_array().unwrap().len(),
        2
    );
}

#[test]
fn reload_applies_certificates_and_listeners_without_dropping_connections() {
    let sb = Sandbox::new();
    let config = sb.config(1, 1, false, "");
    let launcher = Launcher::run(&sb, &config);
    sb.wait_ready(2, Duration::from_secs(30));
    let old_client = sb.client();
    // An open keep-alive connection made before the reload.
    assert!(old_client
        .get(sb.https_url("/whoami"))
        .send()
        .unwrap()
        .status()
        .is_success());

    let pem = new_cert(&sb);
    let extra = free_port();
    let text = std::fs::read_to_string(&config).unwrap().replace(
        &format!("http = [\"127.0.0.1:{}\"]", sb.http_port),
        &format!(
            "http = [\"127.0.0.1:{}\", \"127.0.0.1:{extra}\"]",
            sb.http_port
        ),
    );
    std::fs::write(&config, text).unwrap();
    let out = sb.ctl(&["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // New handshakes present the new certificate; the old connection still works.
    let body = client_for(&pem)
        .get(sb.https_url("/whoami"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(body.starts_with("pool=https"), "{body}");
    assert!(client_for(&sb.cert_pem)
        .get(sb.https_url("/"))
        .send()
        .is_err());
    assert!(old_client
        .get(sb.https_url("/whoami"))
        .send()
        .unwrap()
        .status()
        .is_success());
    // The added listener serves the http pool.
    let body = sb
        .client()
        .get(format!("http://127.0.0.1:{extra}/whoami"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(body.starts_with("pool=http "), "{body}");

    // SIGHUP: remove the extra listener again.
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(&format!(", \"127.0.0.1:{extra}\""), "");
    std::fs::write(&config, text).unwrap();
    launcher.signal(nix::sys::signal::Signal::SIGHUP);
    wait_for(
        "the extra listener to close",
        Duration::from_secs(10),
        || {
            std::net::TcpStream::connect(("127.0.0.1", extra))
                .is_err()
                .then_some(())
        },
    );
    let body = sb
        .client()
        .get(sb.http_url("/whoami"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(body.starts_with("pool=http "), "{body}");
}
