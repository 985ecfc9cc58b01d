//! `overwatch run` as root: the launcher binds the listeners and keeps them; the workers run as
//! the configured unprivileged users with no capabilities and no_new_privs; the proxy worker
//! holds the very listening sockets the launcher bound (passed by SCM_RIGHTS); TLS presents the
//! configured certificate; the control socket is 0660 root:group.

mod common;

use common::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

#[test]
fn workers_run_unprivileged_with_the_launchers_sockets() {
    if !have_test_users() {
        return;
    }
    let sb = Sandbox::new();
    let config = sb.config(2, 2, false, "");
    let launcher = Launcher::run(&sb, &config);
    sb.wait_ready(4, Duration::from_secs(30));

    let proxy = launcher.wait_worker("proxy", None, Duration::from_secs(5));
    let fleet = launcher.wait_worker("fleet", None, Duration::from_secs(5));
    for (pid, user) in [(proxy, PROXY_USER), (fleet, APP_USER)] {
        let uid = nix::unistd::User::from_name(user)
            .unwrap()
            .unwrap()
            .uid
            .as_raw();
        let uids = proc_status(pid, "Uid");
        assert!(
            uids.split_whitespace().all(|u| u == uid.to_string()),
            "{user} worker uids: {uids}"
        );
        let gid = nix::unistd::User::from_name(user)
            .unwrap()
            .unwrap()
            .gid
            .as_raw();
        assert!(proc_status(pid, "Gid")
            .split_whitespace()
            .all(|g| g == gid.to_string()));
        assert_eq!(
            proc_status(pid, "Groups"),
            "",
            "{user} worker keeps supplementary groups"
        );
        assert_eq!(
            proc_status(pid, "CapEff"),
            "0000000000000000",
            "{user} CapEff"
        );
        assert_eq!(
            proc_status(pid, "CapPrm"),
            "0000000000000000",
            "{user} CapPrm"
        );
        assert_eq!(
            proc_status(pid, "CapInh"),
            "0000000000000000",
            "{user} CapInh"
        );
        assert_eq!(proc_status(pid, "NoNewPrivs"), "1", "{user} NoNewPrivs");
    }
    // The launcher stays root but keeps only what it needs.
    let eff = u64::from_str_radix(&proc_status(launcher.pid, "CapEff"), 16).unwrap();
    let bnd = u64::from_str_radix(&proc_status(launcher.pid, "CapBnd"), 16).unwrap();
    let keep: u64 = [6u32, 7, 5, 10] // SETGID, SETUID, KILL, NET_BIND_SERVICE
        .iter()
        .map(|b| 1u64 << b)
        .sum();
    assert_eq!(eff, keep, "launcher CapEff {eff:x}");
    assert_eq!(bnd, keep, "launcher CapBnd {bnd:x}");

    // Same listening sockets in the launcher and the proxy worker.
    for port in [sb.https_port, sb.http_port] {
        let inode = listening_inode(format!("127.0.0.1:{port}").parse().unwrap())
            .expect("listening socket in /proc/net/tcp");
        assert!(
            socket_inodes(launcher.pid).contains(&inode),
            "launcher lacks :{port}"
        );
        assert!(
            socket_inodes(proxy).contains(&inode),
            "proxy worker lacks :{port}"
        );
        assert!(
            !socket_inodes(fleet).contains(&inode),
            "fleet worker holds :{port}"
        );
    }

    // Control socket: 0660, root, the control group.
    let meta = std::fs::metadata(sb.socket()).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.uid(), 0);
    let gid = nix::unistd::Group::from_name(CTL_GROUP)
        .unwrap()
        .unwrap()
        .gid
        .as_raw();
    assert_eq!(meta.gid(), gid);

    // Real requests, each pool answering on its own listener, over the configured certificate.
    let client = sb.client();
    let body = client
        .get(sb.https_url("/whoami"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(body.starts_with("pool=https"), "{body}");
    let body = client
        .get(sb.http_url("/whoami"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(body.starts_with("pool=http "), "{body}");
    // A client that trusts nothing but the configured certificate got through above; one that
    // trusts another certificate must not.
    let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
    let wrong = reqwest::blocking::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(other.cert.pem().as_bytes()).unwrap())
        .tls_built_in_root_certs(false)
        .build()
        .unwrap();
    assert!(wrong.get(sb.https_url("/")).send().is_err());

    // The instances run as the app user, in their own process groups.
    let status = sb.status().unwrap();
    for inst in status["instances"].as_array().unwrap() {
        let pid = inst["pid"].as_i64().unwrap() as i32;
        let uid = nix::unistd::User::from_name(APP_USER)
            .unwrap()
            .unwrap()
            .uid
            .as_raw();
        assert!(proc_status(pid, "Uid").starts_with(&uid.to_string()));
        assert_eq!(
            nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(pid)))
                .unwrap()
                .as_raw(),
            pid
        );
    }
}
