//! `restart-all` and scaling under sustained load on both listeners, with slow (2 s) requests in
//! flight: zero failed requests across a plain rolling restart, scaling up and down, root on
//! and off, and the SIGKILL of an instance. After each operation `status` shows the requested
//! counts, all ready; no process of an old instance is left (process groups checked) and no
//! port is held twice.

mod common;

use common::*;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct Tally {
    ok: u64,
    failed: Vec<String>,
}

fn load(
    sb: &Sandbox,
    url: String,
    fresh: bool,
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
) -> std::thread::JoinHandle<()> {
    let client = if fresh {
        sb.fresh_client()
    } else {
        sb.client()
    };
    std::thread::spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            let result = client.get(&url).send();
            let mut t = tally.lock().unwrap();
            match result {
                Ok(r) if r.status().is_success() => t.ok += 1,
                Ok(r) => t.failed.push(format!("{url}: status {}", r.status())),
                Err(e) => t.failed.push(format!("{url}: {e:?}")),
            }
        }
    })
}

struct Snapshot {
    pids: Vec<i32>,
    ports: Vec<u16>,
}

fn snapshot(status: &serde_json::Value) -> Snapshot {
    let instances = status["instances"].as_array().unwrap();
    Snapshot {
        pids: instances
            .iter()
            .map(|i| i["pid"].as_i64().unwrap() as i32)
            .collect(),
        ports: instances
            .iter()
            .map(|i| i["port"].as_u64().unwrap() as u16)
            .collect(),
    }
}

/// Listening sockets on a loopback port, from /proc/net/tcp.
fn listeners_on(port: u16) -> usize {
    let want = format!(":{port:04X}");
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(1).is_some_and(|a| a.ends_with(&want)) && f.get(3) == Some(&"0A")
        })
        .count()
}

/// Waits until `n` instances are ready and none of them is `pid` any more.
fn wait_replaced(sb: &Sandbox, n: usize, pid: i64, what: &str) {
    wait_for(
        &format!("{what} to be replaced"),
        Duration::from_secs(30),
        || {
            let s = sb.status()?;
            let instances = s["instances"].as_array()?;
            (instances.len() == n
                && instances.iter().all(|i| i["state"] == "ready")
                && !instances.iter().any(|i| i["pid"] == pid))
            .then_some(())
        },
    );
}

fn group_is_empty(pgid: i32) -> bool {
    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), None).is_err()
}

/// Checks the state after an operation: counts, all ready, old instances gone, ports unique.
fn check_after(
    sb: &Sandbox,
    what: &str,
    https: u64,
    http: u64,
    root: bool,
    before: &Snapshot,
) -> Snapshot {
    let n = (https + http + root as u64) as usize;
    let status = sb.wait_ready(n, Duration::from_secs(60));
    assert_eq!(status["counts"]["https"], https, "{what}");
    assert_eq!(status["counts"]["http"], http, "{what}");
    assert_eq!(status["counts"]["root"], root, "{what}");
    let pools: Vec<&str> = status["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["pool"].as_str().unwrap())
        .collect();
    assert_eq!(
        pools.iter().filter(|p| **p == "https").count() as u64,
        https,
        "{what}"
    );
    assert_eq!(
        pools.iter().filter(|p| **p == "http").count() as u64,
        http,
        "{what}"
    );
    let now = snapshot(&status);
    let unique: HashSet<u16> = now.ports.iter().copied().collect();
    assert_eq!(
        unique.len(),
        now.ports.len(),
        "{what}: a port is held twice: {:?}",
        now.ports
    );
    for port in &now.ports {
        assert_eq!(
            listeners_on(*port),
            1,
            "{what}: port {port} has other listeners"
        );
    }
    for pid in &before.pids {
        if !now.pids.contains(pid) {
            wait_for(
                &format!("{what}: old instance group {pid} to be empty"),
                Duration::from_secs(20),
                || group_is_empty(*pid).then_some(()),
            );
        }
    }
    for port in &before.ports {
        if !now.ports.contains(port) {
            assert_eq!(listeners_on(*port), 0, "{what}: old port {port} still held");
        }
    }
    now
}

#[test]
fn rolling_restarts_and_scaling_under_load_fail_nothing() {
    let sb = Sandbox::new();
    have_test_users();
    let config = sb.config(2, 2, true, "");
    let launcher = Launcher::run(&sb, &config);
    let mut snap = snapshot(&sb.wait_ready(5, Duration::from_secs(30)));

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut threads = Vec::new();
    for (url, fresh) in [
        (sb.https_url("/whoami"), false),
        (sb.http_url("/whoami"), false),
        (sb.https_url("/whoami"), true),
        (sb.http_url("/whoami"), true),
        (sb.https_url("/slow?ms=2000"), false),
        (sb.http_url("/slow?ms=2000"), false),
    ] {
        threads.push(load(&sb, url, fresh, stop.clone(), tally.clone()));
    }

    let ops: [(&[&str], u64, u64, bool); 4] = [
        (&["restart-all"], 2, 2, true),
        (&["restart-all", "--ssl", "4", "--http", "1"], 4, 1, true),
        (
            &[
                "restart-all",
                "--ssl",
                "1",
                "--http",
                "3",
                "--root",
                "false",
            ],
            1,
            3,
            false,
        ),
        (
            &["restart-all", "--ssl", "2", "--http", "2", "--root", "true"],
            2,
            2,
            true,
        ),
    ];
    for (args, https, http, root) in ops {
        let started = Instant::now();
        let out = sb.ctl(args);
        assert!(
            out.status.success(),
            "{args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("{args:?} took {:?}", started.elapsed());
        snap = check_after(&sb, &format!("{args:?}"), https, http, root, &snap);
    }

    // SIGKILL of an instance: replaced, and idempotent requests retried elsewhere.
    let status = sb.status().unwrap();
    let victim = status["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["pool"] == "http")
        .unwrap()["pid"]
        .as_i64()
        .unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_replaced(&sb, 5, victim as i64, "the killed instance");
    let _ = snap;

    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().unwrap();
    }
    let tally = tally.lock().unwrap();
    assert!(
        tally.failed.is_empty(),
        "{} of {} requests failed: {:?}",
        tally.failed.len(),
        tally.ok + tally.failed.len() as u64,
        &tally.failed[..tally.failed.len().min(5)]
    );
    assert!(tally.ok > 100, "only {} requests went through", tally.ok);
    drop(launcher);
}

#[test]
fn scaling_beyond_the_port_range_is_refused_and_changes_nothing() {
    let sb = Sandbox::new();
    have_test_users();
    let config = sb.config(1, 1, false, "");
    let _launcher = Launcher::run(&sb, &config);
    let before = snapshot(&sb.wait_ready(2, Duration::from_secs(30)));
    // The sandbox's range holds 40 ports.
    let out = sb.ctl(&["restart-all", "--ssl", "30", "--http", "30"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("port"),
        "the refusal should say the port range is too small: {text}"
    );
    let after = snapshot(&sb.wait_ready(2, Duration::from_secs(10)));
    assert_eq!(after.pids, before.pids, "running instances were touched");
    let status = sb.status().unwrap();
    assert_eq!(status["counts"]["https"], 1);
    assert_eq!(status["counts"]["http"], 1);
}

#[test]
fn an_instance_failing_health_is_taken_out_and_replaced_without_failures() {
    let sb = Sandbox::new();
    have_test_users();
    let config = sb.config(0, 2, false, "");
    let _launcher = Launcher::run(&sb, &config);
    let status = sb.wait_ready(2, Duration::from_secs(30));
    let sick = &status["instances"][0];
    let (sick_pid, sick_port) = (
        sick["pid"].as_i64().unwrap(),
        sick["port"].as_u64().unwrap(),
    );

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let threads = vec![
        load(
            &sb,
            sb.http_url("/whoami"),
            false,
            stop.clone(),
            tally.clone(),
        ),
        load(
            &sb,
            sb.http_url("/whoami"),
            true,
            stop.clone(),
            tally.clone(),
        ),
    ];
    // Straight to the instance on loopback: from now on its /health answers 503.
    let body = sb
        .client()
        .get(format!("http://127.0.0.1:{sick_port}/sick"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(body.contains("health now fails"), "{body}");
    // Three failed probes (interval 500 ms) take it out and replace it.
    wait_replaced(&sb, 2, sick_pid, "the sick instance");
    wait_for(
        "the sick instance's group to be gone",
        Duration::from_secs(20),
        || group_is_empty(sick_pid as i32).then_some(()),
    );
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().unwrap();
    }
    let tally = tally.lock().unwrap();
    assert!(
        tally.failed.is_empty(),
        "failed: {:?}",
        &tally.failed[..tally.failed.len().min(5)]
    );
    assert!(tally.ok > 10, "only {} requests", tally.ok);
}
