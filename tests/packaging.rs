//! The systemd unit passes `systemd-analyze verify` (pointed at the binary just built), and
//! names what the launcher needs.

mod common;

use common::*;

#[test]
fn unit_verifies() {
    let Ok(analyze) = which("systemd-analyze") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have systemd-analyze"
        );
        eprintln!("skipped: no systemd-analyze");
        return;
    };
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/packaging/systemd/overwatch.service"
    ))
    .unwrap();
    for needed in [
        "Type=notify",
        "ExecReload=",
        "RuntimeDirectory=",
        "StateDirectory=",
        "CapabilityBoundingSet=",
        "FileDescriptorStoreMax=",
        "ProtectSystem=",
    ] {
        assert!(unit.contains(needed), "unit lacks {needed}");
    }
    let dir = tempfile::tempdir().unwrap();
    let local = unit.replace("/usr/bin/overwatch", OVERWATCH);
    let path = dir.path().join("overwatch.service");
    std::fs::write(&path, local).unwrap();
    let out = std::process::Command::new(analyze)
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let problems: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("overwatch.service"))
        .collect();
    assert!(out.status.success() && problems.is_empty(), "{stderr}");
}

fn which(name: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(name))
                .find(|p| p.exists())
        })
        .ok_or(())
}

/// The man page and completions in packaging/ are what the clap definitions produce now.
#[test]
fn man_page_and_completions_are_current() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(OVERWATCHCTL)
        .arg("generate")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging");
    for file in [
        "overwatchctl.1",
        "completions/overwatchctl.bash",
        "completions/_overwatchctl",
        "completions/overwatchctl.fish",
    ] {
        let fresh = std::fs::read_to_string(dir.path().join(file)).unwrap();
        let committed = std::fs::read_to_string(repo.join(file)).unwrap_or_default();
        assert!(
            fresh == committed,
            "packaging/{file} is stale: run `cargo run --bin overwatchctl -- generate packaging`"
        );
    }
    assert!(std::fs::read_to_string(repo.join("overwatchctl.1"))
        .unwrap()
        .contains("restart\\-all"));
}
