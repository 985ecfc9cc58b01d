//! `overwatchctl upgrade`: the launcher re-executes a new binary with the same PID and the same
//! listening sockets, new workers take over, the old proxy worker drains and exits, app
//! instances are adopted (same PIDs), and not one request fails under load — ten times in a
//! row with no descriptor or process left behind. Binaries that are not trusted, fail the
//! preflight or speak another protocol are refused and everything keeps serving.

mod common;

use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A root-owned directory, 0755 all the way up, for binaries the launcher will trust.
struct TrustedDir(PathBuf);

impl TrustedDir {
    fn new() -> Self {
        use std::sync::atomic::AtomicU32;
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = PathBuf::from(format!(
            "/run/ow-upgrade-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        TrustedDir(dir)
    }

    /// A copy of the overwatch binary (a distinct file, so /proc/PID/exe shows the switch).
    fn binary(&self, name: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::copy(OVERWATCH, &path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn script(&self, name: &str, body: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }
}

impl Drop for TrustedDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn hammer(
    sb: &Sandbox,
    url: String,
    fresh: bool,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(u64, Vec<String>)> {
    let client = if fresh {
        sb.fresh_client()
    } else {
        sb.client()
    };
    std::thread::spawn(move || {
        let (mut ok, mut failed) = (0, Vec::new());
        while !stop.load(Ordering::SeqCst) {
            match client.get(&url).send() {
                Ok(r) if r.status().is_success() => ok += 1,
                Ok(r) => failed.push(format!("status {}", r.status())),
                Err(e) => failed.push(format!("{e:?}")),
            }
        }
        (ok, failed)
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

fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn exe(pid: i32) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/exe")).unwrap()
}

fn upgrade(sb: &Sandbox, binary: &Path) -> std::process::Output {
    sb.ctl(&["upgrade", "--binary", binary.to_str().unwrap()])
}

/// Waits until the upgrade has landed: the launcher runs `binary`, exactly one proxy and one
/// fleet worker (both new) are left, and the instances are ready again.
fn wait_upgraded(sb: &Sandbox, launcher: &Launcher, binary: &Path, old: (i32, i32), n: usize) {
    wait_for(
        "the launcher to run the new binary",
        Duration::from_secs(20),
        || (exe(launcher.pid) == binary).then_some(()),
    );
    wait_for("only the new workers", Duration::from_secs(30), || {
        let workers: Vec<i32> = children_of(launcher.pid)
            .into_iter()
            .filter(|p| cmdline(*p).contains("worker"))
            .collect();
        (workers.len() == 2 && !workers.contains(&old.0) && !workers.contains(&old.1)).then_some(())
    });
    sb.wait_ready(n, Duration::from_secs(30));
}

#[test]
fn upgrade_under_load_keeps_pid_sockets_instances_and_every_request() {
    if !have_test_users() {
        return;
    }
    let sb = Sandbox::new();
    let trusted = TrustedDir::new();
    let config = sb.config(2, 2, false, "");
    let launcher = Launcher::run(&sb, &config);
    sb.wait_ready(4, Duration::from_secs(30));
    let instances = instance_pids(&sb);
    let listen_inodes: Vec<u64> = [sb.https_port, sb.http_port]
        .iter()
        .map(|p| listening_inode(format!("127.0.0.1:{p}").parse().unwrap()).unwrap())
        .collect();

    let stop = Arc::new(AtomicBool::new(false));
    let clients = vec![
        hammer(&sb, sb.http_url("/whoami"), true, stop.clone()),
        hammer(&sb, sb.https_url("/whoami"), true, stop.clone()),
        hammer(&sb, sb.http_url("/slow?ms=50"), false, stop.clone()),
        hammer(&sb, sb.https_url("/slow?ms=50"), false, stop.clone()),
    ];

    // The first upgrade settles the descriptor count (the launcher's own runtime, logs);
    // every later one must leave it exactly as it was.
    let mut counts = Vec::new();
    for round in 0..10 {
        let old = (
            launcher.worker_pid("proxy").unwrap(),
            launcher.worker_pid("fleet").unwrap(),
        );
        let binary = trusted.binary(&format!("overwatch-{round}"));
        let out = upgrade(&sb, &binary);
        assert!(
            out.status.success(),
            "round {round}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        wait_upgraded(&sb, &launcher, &binary, old, 4);
        counts.push((fd_count(launcher.pid), descendants(launcher.pid).len()));
        if round >= 1 {
            // The old binary file can go: the launcher runs from its own descriptor.
            let _ = std::fs::remove_file(trusted.0.join(format!("overwatch-{}", round - 1)));
        }
    }
    stop.store(true, Ordering::SeqCst);
    let mut total = 0;
    for c in clients {
        let (ok, failed) = c.join().unwrap();
        assert!(
            failed.is_empty(),
            "{} failed requests: {:?}",
            failed.len(),
            &failed[..failed.len().min(5)]
        );
        total += ok;
    }
    assert!(total > 100, "only {total} requests during ten upgrades");

    assert!(alive(launcher.pid), "the launcher PID changed or died");
    assert_eq!(
        instance_pids(&sb),
        instances,
        "instances were restarted, not adopted"
    );
    for (port, inode) in [sb.https_port, sb.http_port].iter().zip(&listen_inodes) {
        let now = listening_inode(format!("127.0.0.1:{port}").parse().unwrap()).unwrap();
        assert_eq!(now, *inode, "listening socket on :{port} was replaced");
        assert!(socket_inodes(launcher.pid).contains(inode));
    }
    assert!(
        counts[1..].iter().all(|c| *c == counts[1]),
        "descriptors / processes drift across upgrades: {counts:?}"
    );
    assert_eq!(
        counts.last().unwrap().1,
        2 + 4,
        "workers + instances: {counts:?}"
    );
    // Privileges are what they were before the first exec.
    let keep: u64 = [6u32, 7, 5, 10].iter().map(|b| 1u64 << b).sum();
    for field in ["CapEff", "CapPrm", "CapBnd"] {
        let v = u64::from_str_radix(&proc_status(launcher.pid, field), 16).unwrap();
        assert_eq!(v, keep, "launcher {field} after upgrades: {v:x}");
    }
    for role in ["proxy", "fleet"] {
        let pid = launcher.worker_pid(role).unwrap();
        assert_eq!(
            proc_status(pid, "CapEff"),
            "0000000000000000",
            "{role} CapEff"
        );
        assert_eq!(proc_status(pid, "NoNewPrivs"), "1", "{role} NoNewPrivs");
        assert_ne!(
            proc_status(pid, "Uid").split_whitespace().next(),
            Some("0"),
            "{role} is root"
        );
    }
}

#[test]
fn refused_binaries_change_nothing() {
    if !have_test_users() {
        return;
    }
    let sb = Sandbox::new();
    let trusted = TrustedDir::new();
    let config = sb.config(1, 1, false, "");
    let launcher = Launcher::run(&sb, &config);
    sb.wait_ready(2, Duration::from_secs(30));
    let workers = (
        launcher.worker_pid("proxy").unwrap(),
        launcher.worker_pid("fleet").unwrap(),
    );
    let exe_before = exe(launcher.pid);

    let untrusted = sb.path().join("overwatch-copy"); // below /tmp: world-writable parent
    std::fs::copy(OVERWATCH, &untrusted).unwrap();
    let failing = trusted.script("fails-probe", "exit 1");
    let other_protocol = trusted.script(
        "other-protocol",
        "case \"$1\" in probe) echo protocol=999; echo build=alien;; *) exit 0;; esac",
    );
    let bad_config = trusted.script(
        "bad-config",
        &format!(
            "case \"$1\" in probe) echo protocol={}; echo build=x;; check-config) echo 'nope' >&2; exit 1;; esac",
            protocol::PROTOCOL_VERSION
        ),
    );
    let exits_at_start = trusted.script(
        "exits-at-start",
        &format!(
            "case \"$1\" in probe) echo protocol={}; echo build=x;; check-config) exit 0;; *) echo 'cannot start' >&2; exit 1;; esac",
            protocol::PROTOCOL_VERSION
        ),
    );
    for (binary, words) in [
        (exits_at_start.as_path(), "run --dry-run"),
        (untrusted.as_path(), "not trusted"),
        (failing.as_path(), "preflight"),
        (other_protocol.as_path(), "protocol 999"),
        (bad_config.as_path(), "check-config"),
        (Path::new("/nonexistent/overwatch"), "cannot open"),
    ] {
        let out = upgrade(&sb, binary);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{}: {stderr}", binary.display());
        assert!(
            stderr.contains(words),
            "{}: expected {words:?} in {stderr}",
            binary.display()
        );
        let body = sb
            .client()
            .get(sb.http_url("/whoami"))
            .send()
            .unwrap()
            .text()
            .unwrap();
        assert!(body.starts_with("pool=http"));
    }
    assert_eq!(exe(launcher.pid), exe_before);
    assert_eq!(launcher.worker_pid("proxy"), Some(workers.0));
    assert_eq!(launcher.worker_pid("fleet"), Some(workers.1));
}
