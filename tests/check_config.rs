//! `overwatch check-config` and `overwatch run` refuse each kind of bad config with the key and
//! line named, exit 1, and leave nothing running or bound.

mod common;

use common::*;
use std::process::Command;

fn check(config: &std::path::Path) -> (i32, String, String) {
    let out = Command::new(OVERWATCH)
        .args(["check-config", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Writes `base` with the line starting with `key =` in `[table]` replaced by `line`.
fn variant(sb: &Sandbox, table: &str, key: &str, line: &str) -> std::path::PathBuf {
    let path = sb.config(1, 1, false, "");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut out = Vec::new();
    let mut current = String::new();
    let mut done = false;
    for l in text.lines() {
        if l.starts_with('[') {
            if current == table && !done {
                out.push(line.to_string());
                done = true;
            }
            current = l.trim_matches(|c| c == '[' || c == ']').to_string();
        }
        if current == table && l.starts_with(&format!("{key} =")) {
            out.push(line.to_string());
            done = true;
            continue;
        }
        out.push(l.to_string());
    }
    if !done {
        if current != table {
            out.push(format!("[{table}]"));
        }
        out.push(line.to_string());
    }
    std::fs::write(&path, out.join("\n") + "\n").unwrap();
    path
}

fn line_of(path: &std::path::Path, needle: &str) -> usize {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .position(|l| l.contains(needle))
        .unwrap()
        + 1
}

#[test]
fn valid_config_prints_a_summary() {
    let sb = Sandbox::new();
    let (code, stdout, stderr) = check(&sb.config(2, 1, true, ""));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("valid"), "{stdout}");
    assert!(stdout.contains("2 https, 1 http, root on"), "{stdout}");
}

#[test]
fn each_bad_config_names_key_and_line() {
    let sb = Sandbox::new();
    let cases: &[(&str, &str, &str, &str, &str)] = &[
        // table, key, replacement line, expected key in message, expected words
        (
            "health",
            "bogus",
            "bogus = 1",
            "health.bogus",
            "unknown field",
        ),
        (
            "proxy",
            "http",
            "http = [\"nowhere:80\"]",
            "proxy.http",
            "invalid listen address",
        ),
        (
            "health",
            "interval",
            "interval = \"soon\"",
            "health.interval",
            "invalid duration",
        ),
        (
            "app.http",
            "count",
            "count = \"two\"",
            "app.http.count",
            "invalid type",
        ),
        (
            "proxy",
            "cert",
            "cert = \"missing.pem\"",
            "proxy.cert",
            "cannot read",
        ),
        (
            "proxy",
            "key",
            "key = \"cert.pem\"",
            "proxy.key",
            "no PEM private key",
        ),
        (
            "app",
            "ports",
            "ports = \"3000-3001\"",
            "app.ports",
            "holds 2 ports",
        ),
        (
            "app",
            "ports",
            "ports = \"banana\"",
            "app.ports",
            "invalid port range",
        ),
    ];
    for (table, key, line, want_key, words) in cases {
        let path = variant(&sb, table, key, line);
        let (code, _, stderr) = check(&path);
        assert_eq!(code, 1, "{line}: {stderr}");
        let want_line = line_of(&path, line);
        assert!(
            stderr.contains(&format!(":{want_line}: key `{want_key}`")),
            "{line}: expected key {want_key} at line {want_line}, got: {stderr}"
        );
        assert!(
            stderr.contains(words),
            "{line}: expected {words:?}, got: {stderr}"
        );
    }
}

#[test]
fn unknown_user_is_refused_when_root() {
    if !is_root() {
        eprintln!("skipped: only root switches users");
        return;
    }
    let sb = Sandbox::new();
    let path = variant(&sb, "app", "user", "user = \"no-such-user-ow\"");
    let (code, _, stderr) = check(&path);
    assert_eq!(code, 1);
    assert!(stderr.contains("key `app.user`"), "{stderr}");
    assert!(stderr.contains("unknown user"), "{stderr}");
}

#[test]
fn run_refuses_a_bad_config_and_leaves_nothing() {
    let sb = Sandbox::new();
    let path = variant(&sb, "health", "bogus", "bogus = 1");
    let out = Command::new(OVERWATCH)
        .args(["run", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("key `health.bogus`"), "{stderr}");
    assert!(!sb.socket().exists(), "control socket left behind");
    // The listener addresses are free again.
    std::net::TcpListener::bind(("127.0.0.1", sb.http_port)).unwrap();
}
