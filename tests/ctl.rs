//! `overwatchctl` against a running `overwatch`: status as text and JSON, the seed's spelling,
//! live progress, one mutating operation at a time, a client killed mid-operation, the console
//! in a pseudo-terminal, access control, malformed frames, and every exit code.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn ctl_cmd(sb: &Sandbox, args: &[&str]) -> Command {
    let mut cmd = Command::new(OVERWATCHCTL);
    cmd.arg("--socket").arg(sb.socket()).args(args);
    cmd
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn counts(sb: &Sandbox) -> (u64, u64, bool) {
    let s = sb.status().unwrap();
    (
        s["counts"]["https"].as_u64().unwrap(),
        s["counts"]["http"].as_u64().unwrap(),
        s["counts"]["root"].as_bool().unwrap(),
    )
}

#[test]
fn status_text_json_and_exit_codes() {
    let sb = Sandbox::new();
    let config = sb.config(1, 1, true, "");
    let launcher = Launcher::run(&sb, &config);
    sb.wait_ready(3, Duration::from_secs(30));

    let out = sb.ctl(&["status"]);
    assert_eq!(out.status.code(), Some(0));
    let t = text(&out);
    for needle in [
        "POOL",
        "https",
        "http",
        "root",
        "ready",
        &format!("launcher pid {}", launcher.pid),
    ] {
        assert!(t.contains(needle), "status lacks {needle}: {t}");
    }
    let json = sb.status().unwrap();
    assert_eq!(json["launcher_pid"], launcher.pid);
    for field in [
        "version",
        "build",
        "uptime_secs",
        "listeners",
        "counts",
        "instances",
        "operation",
        "last_operation",
    ] {
        assert!(json.get(field).is_some(), "status --json lacks {field}");
    }
    for field in [
        "id",
        "pool",
        "index",
        "port",
        "pid",
        "state",
        "uptime_secs",
        "restarts",
        "in_flight",
        "served",
        "backup",
        "last_error",
    ] {
        assert!(
            json["instances"][0].get(field).is_some(),
            "instance lacks {field}"
        );
    }

    // 2: usage errors.
    assert_eq!(
        sb.ctl(&["restart-all", "--ssl", "many"]).status.code(),
        Some(2)
    );
    assert_eq!(sb.ctl(&["frobnicate"]).status.code(), Some(2));
    // 3: nobody there, with a hint naming the socket.
    let out = Command::new(OVERWATCHCTL)
        .args(["--socket", "/nonexistent/ow.sock", "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let t = text(&out);
    assert!(
        t.contains("/nonexistent/ow.sock") && t.contains("is the service running"),
        "{t}"
    );
    // OVERWATCH_SOCKET is honoured.
    let out = Command::new(OVERWATCHCTL)
        .arg("status")
        .env("OVERWATCH_SOCKET", sb.socket())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

#[test]
fn restart_all_progress_busy_seed_spelling_and_a_vanishing_client() {
    let sb = Sandbox::new();
    let config = sb.config(2, 1, false, "");
    let _launcher = Launcher::run(&sb, &config);
    sb.wait_ready(3, Duration::from_secs(30));

    // Progress arrives while the operation still runs.
    let started = Instant::now();
    let mut child = ctl_cmd(&sb, &["restart-all"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(!first.is_empty());
    let running = sb.status().unwrap();
    assert!(
        running["operation"].is_object() || child.try_wait().unwrap().is_none(),
        "first progress line {first:?} arrived only after the operation ended"
    );
    // A second mutating operation meanwhile is refused as busy.
    let busy = sb.ctl(&["restart-all"]);
    if child.try_wait().unwrap().is_none() {
        assert_eq!(busy.status.code(), Some(1), "{}", text(&busy));
        assert!(
            text(&busy).contains("busy: restart-all running since"),
            "{}",
            text(&busy)
        );
    }
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    assert!(
        child.wait().unwrap().success(),
        "{first}\n{}",
        rest.join("\n")
    );
    assert!(
        rest.len() >= 2,
        "expected progress per instance: {first} {rest:?}"
    );
    eprintln!("restart-all took {:?}", started.elapsed());

    // The seed's spelling, on the command line.
    let out = sb.ctl(&["restart-all", "-ssl=1", "-http=2", "-root=true"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(counts(&sb), (1, 2, true));
    sb.wait_ready(4, Duration::from_secs(30));

    // A client killed mid-operation: the operation still completes.
    let mut child = ctl_cmd(
        &sb,
        &[
            "restart-all",
            "--ssl",
            "2",
            "--http",
            "1",
            "--root",
            "false",
        ],
    )
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut first)
        .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let done = wait_for(
        "the abandoned restart-all to finish",
        Duration::from_secs(60),
        || {
            let s = sb.status()?;
            (s["operation"].is_null() && s["last_operation"]["ok"] == true).then_some(s)
        },
    );
    assert_eq!(done["counts"]["https"], 2);
    assert_eq!(done["counts"]["root"], false);
    sb.wait_ready(3, Duration::from_secs(30));
}

#[test]
fn console_in_a_pseudo_terminal() {
    let sb = Sandbox::new();
    let config = sb.config(1, 1, false, "");
    let _launcher = Launcher::run(&sb, &config);
    sb.wait_ready(2, Duration::from_secs(30));
    // `script` gives the console a real pseudo-terminal. Each line is typed only once the
    // prompt is shown: a line editor discards what was typed before it set up the terminal.
    let cmdline = format!("{OVERWATCHCTL} --socket {} console", sb.socket().display());
    let mut child = Command::new("script")
        .args(["-qfec", &cmdline, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let screen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let screen = screen.clone();
        let mut stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                screen
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    let prompts = || screen.lock().unwrap().matches("overwatch> ").count();
    for (i, line) in [
        "help",
        "status",
        "restart-all -http=2",
        "status --json",
        "exit",
    ]
    .iter()
    .enumerate()
    {
        wait_for(
            &format!("prompt {}", i + 1),
            Duration::from_secs(60),
            || (prompts() > i).then_some(()),
        );
        stdin.write_all(format!("{line}\r").as_bytes()).unwrap();
        stdin.flush().unwrap();
    }
    let status = wait_for("the console to exit", Duration::from_secs(20), || {
        child.try_wait().unwrap()
    });
    drop(stdin);
    reader.join().unwrap();
    assert!(status.success());
    let out = screen.lock().unwrap().clone();
    assert!(out.contains("commands:"), "{out}");
    assert!(out.contains("POOL"), "{out}");
    assert!(out.contains("\"instances\""), "{out}");
    assert_eq!(counts(&sb).1, 2, "{out}");
}

#[test]
fn access_control_by_group() {
    if !have_test_users() {
        return;
    }
    let sb = Sandbox::new();
    let config = sb.config(1, 0, false, "");
    let _launcher = Launcher::run(&sb, &config);
    sb.wait_ready(1, Duration::from_secs(30));
    let as_user = |user: &str| {
        Command::new("setpriv")
            .args([
                "--reuid",
                user,
                "--regid",
                user,
                "--init-groups",
                OVERWATCHCTL,
                "--socket",
            ])
            .arg(sb.socket())
            .arg("status")
            .output()
            .unwrap()
    };
    let member = as_user("ow-member");
    assert_eq!(member.status.code(), Some(0), "{}", text(&member));
    let outsider = as_user(OUTSIDER);
    assert_ne!(outsider.status.code(), Some(0));
    assert!(
        text(&outsider).to_lowercase().contains("permission denied"),
        "{}",
        text(&outsider)
    );
}

/// Sends raw bytes to the control socket; returns whatever comes back before it closes.
fn raw_exchange(sb: &Sandbox, bytes: &[u8]) -> Vec<u8> {
    let mut s = UnixStream::connect(sb.socket()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut back = Vec::new();
    let _ = s.read_to_end(&mut back);
    back
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(payload);
    out
}

#[test]
fn malformed_frames_close_only_that_connection() {
    let sb = Sandbox::new();
    let config = sb.config(1, 0, false, "");
    let _launcher = Launcher::run(&sb, &config);
    sb.wait_ready(1, Duration::from_secs(30));
    // A client in the middle of a long `logs --follow` must not notice.
    let mut follower = ctl_cmd(&sb, &["logs", "--follow"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();

    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let hello = protocol::frame::encode(&protocol::Hello::ours()).unwrap();
    let wrong_version = protocol::frame::encode(&protocol::Hello {
        protocol_version: protocol::PROTOCOL_VERSION + 7,
        build: "from the future".into(),
    })
    .unwrap();
    let mut truncated = hello.clone();
    truncated.extend_from_slice(&frame(b"\x00\x01\x02")[..5]);
    let mut oversized = hello.clone();
    oversized.extend_from_slice(&u32::MAX.to_be_bytes());
    let mut bad_request = hello.clone();
    bad_request.extend_from_slice(&frame(&[0xff; 12]));
    for (what, bytes) in [
        ("random bytes", garbage),
        ("wrong version", wrong_version),
        ("truncated frame", truncated),
        ("oversized length", oversized),
        ("undecodable request", bad_request),
        ("nothing", Vec::new()),
    ] {
        let t0 = Instant::now();
        raw_exchange(&sb, &bytes);
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{what}: connection not closed"
        );
        let out = sb.ctl(&["status"]);
        assert_eq!(out.status.code(), Some(0), "after {what}: {}", text(&out));
    }
    assert!(
        follower.try_wait().unwrap().is_none(),
        "the following client was dropped"
    );
    follower.kill().unwrap();
    follower.wait().unwrap();
}
