//! systemd integration without systemd: a test NOTIFY_SOCKET receives READY/STATUS and the
//! listening sockets (FDSTORE=1 with names); a launcher started with those descriptors in
//! LISTEN_FDS/LISTEN_FDNAMES serves on them instead of binding again.

mod common;

use common::*;
use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Duration;

/// Reads notify datagrams, keeping the descriptors of FDSTORE=1 messages by FDNAME.
fn drain(
    sock: &std::os::unix::net::UnixDatagram,
    texts: &mut Vec<String>,
    fds: &mut HashMap<String, OwnedFd>,
) {
    let mut buf = [0u8; 4096];
    while let Ok(packet) = protocol::fdpass::recv_packet(sock.as_fd(), &mut buf) {
        let text = String::from_utf8_lossy(&buf[..packet.len]).into_owned();
        if text.lines().any(|l| l == "FDSTORE=1") {
            let name = text
                .lines()
                .find_map(|l| l.strip_prefix("FDNAME="))
                .expect("FDSTORE without FDNAME")
                .to_string();
            assert_eq!(packet.fds.len(), 1, "{text}");
            fds.insert(name, packet.fds.into_iter().next().unwrap());
        }
        texts.push(text);
    }
}

#[test]
fn fd_store_round_trip_and_listen_fds_start() {
    let sb = Sandbox::new();
    let config = sb.config(1, 1, false, "");
    let notify_path = sb.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify.set_nonblocking(true).unwrap();
    let mut launcher = Launcher::start(
        &["run", "--config", config.to_str().unwrap()],
        &[("NOTIFY_SOCKET", notify_path.to_str().unwrap())],
        sb.path().join("first.log"),
    );
    let (mut texts, mut stored) = (Vec::new(), HashMap::new());
    wait_for("READY=1", Duration::from_secs(30), || {
        drain(&notify, &mut texts, &mut stored);
        texts
            .iter()
            .any(|t| t.lines().any(|l| l == "READY=1"))
            .then_some(())
    });
    let https_name = format!("https_127.0.0.1_{}", sb.https_port);
    let http_name = format!("http_127.0.0.1_{}", sb.http_port);
    for name in [&https_name, &http_name, &"control".to_string()] {
        assert!(
            stored.contains_key(name),
            "{name} not stored: {:?}",
            stored.keys()
        );
    }
    let inode = |port: u16| listening_inode(format!("127.0.0.1:{port}").parse().unwrap()).unwrap();
    let (https_inode, http_inode) = (inode(sb.https_port), inode(sb.http_port));

    // The launcher goes away; the store (this test) still holds the listening sockets.
    launcher.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(launcher.wait_exit(Duration::from_secs(20)).code(), Some(0));
    assert_eq!(
        inode(sb.https_port),
        https_inode,
        "the stored socket stopped listening"
    );

    // Start again the way systemd would: descriptors 3.. with their names.
    let order = [https_name.clone(), http_name.clone()];
    let mut redirect = String::new();
    for (i, name) in order.iter().enumerate() {
        let fd = stored[name].as_fd();
        protocol::fdpass::set_inheritable(fd, true).unwrap();
        redirect.push_str(&format!("{}<&{} ", 3 + i, fd.as_raw_fd()));
    }
    let script = format!(
        "exec {redirect}; LISTEN_PID=$$ LISTEN_FDS={} LISTEN_FDNAMES={} exec {OVERWATCH} run --config {}",
        order.len(),
        order.join(":"),
        config.display()
    );
    let second = Launcher::start_program(
        "/bin/sh",
        &["-c", &script],
        &[],
        sb.path().join("second.log"),
    );
    sb.wait_ready(2, Duration::from_secs(30));
    assert_eq!(
        inode(sb.https_port),
        https_inode,
        "bound a new https socket instead of reusing"
    );
    assert_eq!(
        inode(sb.http_port),
        http_inode,
        "bound a new http socket instead of reusing"
    );
    let body = sb
        .client()
        .get(sb.https_url("/whoami"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(body.starts_with("pool=https"), "{body}");
    assert!(
        second.log_text().contains("taken from systemd"),
        "{}",
        second.log_text()
    );
}
