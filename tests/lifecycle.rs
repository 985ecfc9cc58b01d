//! The launcher keeps serving through the death of either worker (respawned within a second,
//! new connections queue in the kernel and none is refused, instances adopted rather than
//! duplicated), tells systemd when it is ready, and on SIGTERM stops everything and exits 0.

mod common;

use common::*;
use nix::sys::signal::Signal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a client saw: successes, connections refused (never allowed), and requests cut off
/// in flight (allowed only on a worker that was SIGKILLed under them).
#[derive(Default, Debug)]
struct Seen {
    ok: u64,
    refused: Vec<String>,
    cut: Vec<String>,
}

/// Whether the connection was refused (nobody listening), as opposed to cut off after the
/// kernel accepted it (a worker killed in the middle of a handshake or a request).
fn refused(e: &reqwest::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return true;
            }
        }
        source = err.source();
    }
    false
}

/// Runs a client opening a new connection per request until stopped.
fn hammer(sb: &Sandbox, url: String, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Seen> {
    let client = sb.fresh_client();
    std::thread::spawn(move || {
        let mut seen = Seen::default();
        while !stop.load(Ordering::SeqCst) {
            match client.get(&url).send() {
                Ok(r) if r.status().is_success() => seen.ok += 1,
                Ok(r) => seen.refused.push(format!("status {}", r.status())),
                Err(e) if refused(&e) => seen.refused.push(format!("{e:?}")),
                Err(e) => seen.cut.push(format!("{e:?}")),
            }
        }
        seen
    })
}

fn instance_pids(sb: &Sandbox) -> Vec<i64> {
    let mut pids: Vec<i64> = sb.status().unwrap()["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["pid"].as_i64().unwrap())
        .collect();
    pids.sort();
    pids
}

#[test]
fn killed_workers_are_respawned_without_refusing_a_connection() {
    let sb = Sandbox::new();
    have_test_users();
    let config = sb.config(2, 2, false, "");
    let launcher = Launcher::run(&sb, &config);
    sb.wait_ready(4, Duration::from_secs(30));
    let before = instance_pids(&sb);

    let stop = Arc::new(AtomicBool::new(false));
    let clients = vec![
        hammer(&sb, sb.http_url("/whoami"), stop.clone()),
        hammer(&sb, sb.https_url("/whoami"), stop.clone()),
    ];

    // The proxy worker.
    let proxy = launcher.wait_worker("proxy", None, Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(300));
    let killed_at = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(proxy), Signal::SIGKILL).unwrap();
    let new_proxy = launcher.wait_worker("proxy", Some(proxy), Duration::from_secs(1));
    assert!(killed_at.elapsed() < Duration::from_secs(1));
    assert_ne!(new_proxy, proxy);
    std::thread::sleep(Duration::from_millis(500));

    // The fleet worker: its instances are adopted, not duplicated or orphaned.
    let fleet = launcher.wait_worker("fleet", None, Duration::from_secs(5));
    let killed_at = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(fleet), Signal::SIGKILL).unwrap();
    launcher.wait_worker("fleet", Some(fleet), Duration::from_secs(1));
    assert!(killed_at.elapsed() < Duration::from_secs(1));
    sb.wait_ready(4, Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(500));

    stop.store(true, Ordering::SeqCst);
    let mut total = 0;
    for c in clients {
        let seen = c.join().unwrap();
        assert!(
            seen.refused.is_empty(),
            "refused or failed: {:?}",
            seen.refused
        );
        // One request per client can be in flight on the proxy worker when it is killed.
        assert!(
            seen.cut.len() <= 1,
            "more than the in-flight request was lost: {:?}",
            seen.cut
        );
        total += seen.ok;
    }
    assert!(total > 20, "only {total} requests went through");
    assert_eq!(
        instance_pids(&sb),
        before,
        "instances were replaced instead of adopted"
    );
    // Exactly the instances, the two workers and nothing else below the launcher.
    let demo_apps = descendants(launcher.pid)
        .into_iter()
        .filter(|p| cmdline(*p).contains("demo-app"))
        .count();
    assert_eq!(demo_apps, 4, "duplicate or orphaned instances");
}

#[test]
fn sigterm_stops_everything_and_exits_zero() {
    let sb = Sandbox::new();
    have_test_users();
    let config = sb.config(1, 1, true, "");
    let mut launcher = Launcher::run(&sb, &config);
    sb.wait_ready(3, Duration::from_secs(30));
    let everyone = descendants(launcher.pid);
    assert!(everyone.len() >= 5, "workers and instances: {everyone:?}");
    launcher.signal(Signal::SIGTERM);
    let status = launcher.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{}", launcher.log_text());
    for pid in everyone {
        assert!(!alive(pid), "pid {pid} ({}) still running", cmdline(pid));
    }
    assert!(!sb.socket().exists(), "control socket left behind");
}

#[test]
fn sigint_stops_too() {
    let sb = Sandbox::new();
    let config = sb.config(1, 0, false, "");
    let mut launcher = Launcher::run(&sb, &config);
    sb.wait_ready(1, Duration::from_secs(30));
    let everyone = descendants(launcher.pid);
    launcher.signal(Signal::SIGINT);
    assert_eq!(launcher.wait_exit(Duration::from_secs(20)).code(), Some(0));
    for pid in everyone {
        assert!(!alive(pid), "pid {pid} ({}) still running", cmdline(pid));
    }
}

#[test]
fn notify_socket_gets_ready_then_stopping() {
    let sb = Sandbox::new();
    let config = sb.config(1, 1, false, "");
    let notify_path = sb.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut launcher = Launcher::start(
        &["run", "--config", config.to_str().unwrap()],
        &[("NOTIFY_SOCKET", notify_path.to_str().unwrap())],
        sb.path().join("overwatch.log"),
    );
    let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut buf = [0u8; 4096];
    let mut read = |seen: &Arc<std::sync::Mutex<Vec<String>>>| {
        if let Ok(n) = notify.recv(&mut buf) {
            seen.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    };
    wait_for("READY=1", Duration::from_secs(30), || {
        read(&seen);
        seen.lock()
            .unwrap()
            .iter()
            .any(|m| m.lines().any(|l| l == "READY=1"))
            .then_some(())
    });
    // READY only once the instances answer.
    let body = sb
        .client()
        .get(sb.http_url("/whoami"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(body.starts_with("pool=http"));
    assert!(seen.lock().unwrap().iter().any(|m| m.contains("STATUS=")));
    let counter = AtomicU64::new(0);
    launcher.signal(Signal::SIGTERM);
    wait_for("STOPPING=1", Duration::from_secs(20), || {
        counter.fetch_add(1, Ordering::Relaxed);
        read(&seen);
        seen.lock()
            .unwrap()
            .iter()
            .any(|m| m.lines().any(|l| l == "STOPPING=1"))
            .then_some(())
    });
    assert_eq!(launcher.wait_exit(Duration::from_secs(20)).code(), Some(0));
}

#[test]
fn json_log_format_covers_launcher_and_workers() {
    let sb = Sandbox::new();
    let config = sb.config(1, 1, false, "\n[log]\nformat = \"json\"\n");
    let launcher = Launcher::run(&sb, &config);
    sb.wait_ready(2, Duration::from_secs(30));
    sb.client().get(sb.http_url("/whoami")).send().unwrap();
    let log = launcher.log_text();
    let mut targets = std::collections::HashSet::new();
    for line in log.lines().filter(|l| l.starts_with('{')) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        targets.insert(
            v["target"]
                .as_str()
                .unwrap_or("")
                .split("::")
                .next()
                .unwrap()
                .to_string(),
        );
    }
    for t in ["launcher", "proxy_worker", "fleet_worker"] {
        assert!(
            targets.contains(t),
            "no JSON line from {t}: {targets:?}\n{log}"
        );
    }
    let plain: Vec<&str> = log
        .lines()
        .filter(|l| !l.starts_with('{') && !l.starts_with("demo app"))
        .collect();
    assert!(plain.is_empty(), "non-JSON log lines: {plain:?}");
}
