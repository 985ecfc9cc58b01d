//! `deploy` and `rollback` over the control socket with a small fast app in a real git
//! repository cloned from a local bare origin: a release built beside the live one, backups,
//! every failure (pull, build, build after reinstall, never ready) leaving the running
//! instances serving what they served, reinstall fixing a broken `node_modules`, the busy
//! refusal, and rollback through the kept releases.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{collect, get, python, Config, Harness};
use protocol::{CtlRequest, CtlResponse, DeployArgs, DeploySettings, Pool, StatusReport};

const APP: &str = r#"
import http.server, os
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        static = self.path.startswith("/static/")
        try:
            name = "build/static/" + os.path.basename(self.path) if static else "build/page.txt"
            with open(name, "rb") as f:
                body = f.read()
        except OSError:
            self.send_error(404 if static else 500)
            return
        self.send_response(500 if b"UNHEALTHY" in body else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"#;

/// Builds `build/` from `message.txt`; fails when `broken` exists, or when `needs-install`
/// exists and the install has not run; waits for `$WAIT_FOR` when set.
const BUILD: &str = r#"set -e
if [ -f broken ]; then echo "build: broken on purpose" >&2; exit 3; fi
if [ -f needs-install ] && [ ! -f node_modules/installed ]; then
  echo "build: node_modules is broken" >&2; exit 4
fi
if [ -n "$WAIT_FOR" ]; then echo "build: waiting"; while [ ! -f "$WAIT_FOR" ]; do sleep 0.05; done; fi
mkdir -p build/static
cp message.txt build/page.txt
cp message.txt "build/static/chunk-$(cksum < message.txt | cut -d' ' -f1).js"
echo "built: $(cat message.txt)"
"#;

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@t"])
        .args([
            "-c",
            "init.defaultBranch=main",
            "-c",
            "advice.detachedHead=false",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?} in {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A bare origin, a working clone the test commits in, and the app directory (a clone with
/// the first release built).
struct Repo {
    dir: tempfile::TempDir,
}

impl Repo {
    fn new() -> Repo {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repo { dir };
        git(repo.root(), &["init", "-q", "--bare", "origin.git"]);
        git(repo.root(), &["init", "-q", "work"]);
        let work = repo.work();
        std::fs::write(work.join("app.py"), APP).unwrap();
        std::fs::write(work.join("build.sh"), BUILD).unwrap();
        std::fs::write(work.join(".gitignore"), "build/\nnode_modules/\n").unwrap();
        std::fs::write(work.join("pnpm-lock.yaml"), "lockfileVersion: '9.0'\n").unwrap();
        repo.commit(&[("message.txt", "v1")], "v1");
        git(&work, &["remote", "add", "origin", "../origin.git"]);
        git(&work, &["push", "-q", "-u", "origin", "main"]);
        git(repo.root(), &["clone", "-q", "origin.git", "app"]);
        let built = Command::new("sh")
            .arg("build.sh")
            .current_dir(repo.app())
            .output()
            .unwrap();
        assert!(built.status.success());
        repo
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn work(&self) -> PathBuf {
        self.root().join("work")
    }

    fn app(&self) -> PathBuf {
        self.root().join("app")
    }

    fn backups(&self) -> PathBuf {
        self.root().join("backup")
    }

    /// Writes `files` (an empty content removes the file), commits; returns the short commit.
    fn commit(&self, files: &[(&str, &str)], message: &str) -> String {
        let work = self.work();
        for (name, text) in files {
            if text.is_empty() {
                let _ = std::fs::remove_file(work.join(name));
            } else {
                std::fs::write(work.join(name), text).unwrap();
            }
        }
        git(&work, &["add", "-A"]);
        git(&work, &["commit", "-q", "-m", message]);
        git(&work, &["rev-parse", "--short=7", "HEAD"])
    }

    /// Commits and pushes to the origin.
    fn push(&self, files: &[(&str, &str)], message: &str) -> String {
        let short = self.commit(files, message);
        git(&self.work(), &["push", "-q", "origin", "main"]);
        short
    }

    fn config(&self, ports: (u16, u16), http: u32) -> Config {
        let mut cfg = Config::new(ports);
        cfg.http = http;
        cfg.command = format!("exec {} app.py", python());
        cfg.app_dir = Some(self.app());
        cfg.deploy = Some(DeploySettings {
            build_dir: "build".into(),
            backup_dir: self.backups().display().to_string(),
            pull: "git pull --ff-only".into(),
            build: "sh build.sh".into(),
            install: "mkdir -p node_modules && touch node_modules/installed".into(),
            persistent: false,
            delete_old: true,
            keep: 5,
        });
        cfg
    }

    fn backup_entries(&self) -> Vec<PathBuf> {
        entries(&self.backups())
    }
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn releases(h: &Harness) -> Vec<String> {
    entries(&h.dir.path().join("state/releases"))
        .iter()
        .filter_map(|p| p.file_name()?.to_str().map(str::to_string))
        .filter(|n| n != "current" && !n.starts_with('.'))
        .collect()
}

fn lines(responses: &[CtlResponse]) -> String {
    responses
        .iter()
        .filter_map(|r| match r {
            CtlResponse::Progress(line) => Some(line.as_str()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs a deploy; (ok, message, progress lines).
async fn deploy(h: &Harness, args: DeployArgs) -> (bool, String, String) {
    finish(h.request(CtlRequest::Deploy(args)).await)
}

fn finish(responses: Vec<CtlResponse>) -> (bool, String, String) {
    match responses.last() {
        Some(CtlResponse::Done { ok, message }) => (*ok, message.clone(), lines(&responses)),
        other => panic!("expected Done, got {other:?}\n{}", lines(&responses)),
    }
}

/// (id, port) of every serving instance, and what each one answers on `/`.
async fn serving(h: &Harness) -> Vec<(u64, u16, String)> {
    let report: StatusReport = h.status().await;
    let mut out = Vec::new();
    for i in report.instances {
        out.push((i.id, i.port, get(i.port, "/").await));
    }
    out
}

async fn assert_all_say(h: &Harness, message: &str) {
    for (id, port, body) in serving(h).await {
        assert_eq!(body, message, "instance {id} on port {port}");
    }
}

fn http_routes_never_empty(h: &Harness, from: usize) {
    let rec = h.rec.lock().unwrap();
    for routes in &rec.routes[from..] {
        assert!(
            routes.backends.iter().any(|b| b.pool == Pool::Http),
            "no http instance in generation {}",
            routes.generation
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_builds_beside_the_live_app_and_keeps_backups_as_asked() {
    let repo = Repo::new();
    let h = Harness::start(repo.config((21_000, 21_049), 2)).await;
    h.wait_ready().await;
    assert_all_say(&h, "v1").await;
    let base = git(&repo.app(), &["rev-parse", "--short", "HEAD"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let before = loop {
        let report = h.status().await;
        if report.release.as_deref() == Some(base.as_str()) {
            break report;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "release {:?}",
            report.release
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let v1_chunk = format!(
        "/static/{}",
        entries(&repo.app().join("build/static"))[0]
            .file_name()
            .unwrap()
            .to_string_lossy()
    );

    let v2 = repo.push(&[("message.txt", "v2")], "v2");
    let mark = h.rec.lock().unwrap().routes.len();
    let (ok, message, progress) = deploy(
        &h,
        DeployArgs {
            delete_old: Some(false),
            ..Default::default()
        },
    )
    .await;
    assert!(ok, "{message}\n{progress}");
    assert!(
        progress.contains("pull: $ git pull --ff-only"),
        "{progress}"
    );
    assert!(progress.contains("build: exit status: 0"), "{progress}");
    assert!(progress.contains("  | built: v2"), "{progress}");
    http_routes_never_empty(&h, mark);
    let after = serving(&h).await;
    assert_eq!(after.len(), 2);
    for (id, port, body) in &after {
        assert_eq!(body, "v2", "instance {id} on port {port}");
        assert!(before.instances.iter().all(|i| i.id != *id), "not rolled");
        // The previous build's chunk is still there in the new release.
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", *port))
            .await
            .unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(format!("GET {v1_chunk} HTTP/1.0\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).await.unwrap();
        assert!(text.starts_with("HTTP/1.0 200"), "{v1_chunk}: {text}");
    }
    // The live app directory's build was never touched: the release was built beside it.
    assert_eq!(
        std::fs::read_to_string(repo.app().join("build/page.txt")).unwrap(),
        "v1"
    );
    let report = h.status().await;
    assert_eq!(report.release.as_deref(), Some(v2.as_str()));
    let last = report.last_deploy.expect("last_deploy");
    assert_eq!((last.name.as_str(), last.ok), ("deploy", Some(true)));
    // delete_old=false: the backup of v1 stays.
    let backups = repo.backup_entries();
    assert_eq!(backups.len(), 1, "{backups:?}");
    assert_eq!(
        std::fs::read_to_string(backups[0].join("prod/page.txt")).unwrap(),
        "v1"
    );
    let logs = entries(&h.dir.path().join("state/deploys"));
    assert_eq!(logs.len(), 1);
    let log = std::fs::read_to_string(&logs[0]).unwrap();
    assert!(log.contains("$ sh build.sh"), "{log}");
    assert!(log.contains("built: v2"), "{log}");
    assert!(log.contains("deploy done"), "{log}");

    // Default delete_old=true: this deploy's backup goes, the earlier one stays. What an
    // interrupted deploy left (a release never marked built) is swept away.
    let leftover = h
        .dir
        .path()
        .join("state/releases/20000101T000000.000Z-leftover");
    std::fs::create_dir_all(&leftover).unwrap();
    repo.push(&[("message.txt", "v3")], "v3");
    let (ok, message, progress) = deploy(&h, DeployArgs::default()).await;
    assert!(ok, "{message}\n{progress}");
    assert_all_say(&h, "v3").await;
    assert_eq!(repo.backup_entries(), backups);
    assert!(!leftover.exists());
    assert_eq!(releases(&h).len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_pulls_change_nothing() {
    let repo = Repo::new();
    let h = Harness::start(repo.config((21_050, 21_099), 2)).await;
    h.wait_ready().await;
    let before = serving(&h).await;

    // A conflict: the app directory has a local commit the origin does not.
    git(
        &repo.app(),
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "-q",
            "--allow-empty",
            "-m",
            "local",
        ],
    );
    repo.push(&[("message.txt", "v2")], "v2");
    let (ok, message, progress) = deploy(&h, DeployArgs::default()).await;
    assert!(!ok, "{progress}");
    assert!(
        message.starts_with("pull: `git pull --ff-only` failed"),
        "{message}"
    );
    assert!(message.contains("nothing changed"), "{message}");
    assert_eq!(serving(&h).await, before);

    // An unreachable origin.
    git(&repo.app(), &["reset", "-q", "--hard", "origin/main"]);
    git(
        &repo.app(),
        &["remote", "set-url", "origin", "/nonexistent/origin.git"],
    );
    let (ok, message, progress) = deploy(&h, DeployArgs::default()).await;
    assert!(!ok, "{progress}");
    assert!(message.starts_with("pull:"), "{message}");
    assert_eq!(serving(&h).await, before);
    assert!(repo.backup_entries().is_empty());
    assert!(releases(&h).is_empty());
    let report = h.status().await;
    assert_eq!(report.last_deploy.unwrap().ok, Some(false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_builds_leave_the_instances_alone_and_a_reinstall_can_fix_them() {
    let repo = Repo::new();
    let h = Harness::start(repo.config((21_100, 21_149), 2)).await;
    h.wait_ready().await;
    let before = serving(&h).await;
    let live_build = || std::fs::read_to_string(repo.app().join("build/page.txt")).unwrap();

    // The build fails; not persistent: no reinstall.
    repo.push(&[("message.txt", "v2"), ("broken", "yes")], "broken");
    let (ok, message, progress) = deploy(&h, DeployArgs::default()).await;
    assert!(!ok, "{progress}");
    assert!(
        message.contains("build: `sh build.sh` failed (exit status: 3)"),
        "{message}"
    );
    assert!(
        progress.contains("  | build: broken on purpose"),
        "{progress}"
    );
    assert!(!progress.contains("install:"), "{progress}");
    assert_eq!(serving(&h).await, before);
    assert_eq!(live_build(), "v1");

    // Persistent: the build fails after the reinstall too.
    let (ok, message, progress) = deploy(
        &h,
        DeployArgs {
            persistent: Some(true),
            delete_old: Some(false),
            ..Default::default()
        },
    )
    .await;
    assert!(!ok, "{progress}");
    assert!(progress.contains("install: exit status: 0"), "{progress}");
    assert!(message.contains("build (after install)"), "{message}");
    assert_eq!(serving(&h).await, before);
    assert_eq!(live_build(), "v1");
    assert!(releases(&h).is_empty(), "{:?}", releases(&h));
    assert_eq!(repo.backup_entries().len(), 1, "delete_old=false keeps it");

    // A broken node_modules: the reinstall fixes it.
    std::fs::create_dir_all(repo.app().join("node_modules")).unwrap();
    std::fs::write(repo.app().join("node_modules/stale"), "x").unwrap();
    repo.push(
        &[
            ("broken", ""),
            ("needs-install", "yes"),
            ("message.txt", "v3"),
        ],
        "v3",
    );
    let (ok, message, progress) = deploy(&h, DeployArgs::default()).await;
    assert!(!ok, "without persistent: {progress}");
    assert!(message.contains("exit status: 4"), "{message}");
    let (ok, message, progress) = deploy(
        &h,
        DeployArgs {
            persistent: Some(true),
            ..Default::default()
        },
    )
    .await;
    assert!(ok, "{message}\n{progress}");
    assert!(
        progress.contains("  | build: node_modules is broken"),
        "{progress}"
    );
    assert!(progress.contains("removed pnpm-lock.yaml"), "{progress}");
    assert!(
        progress.contains("build (after install): exit status: 0"),
        "{progress}"
    );
    assert_all_say(&h, "v3").await;
    let release = h.dir.path().join("state/releases/current");
    assert!(release.join("node_modules/installed").exists());
    assert!(!release.join("node_modules/stale").exists());
    assert!(!release.join("pnpm-lock.yaml").exists());
    // The live app directory kept its own node_modules.
    assert!(repo.app().join("node_modules/stale").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_that_never_gets_ready_is_rolled_back() {
    let repo = Repo::new();
    let mut cfg = repo.config((21_150, 21_199), 2);
    cfg.ready_timeout_ms = 1_500;
    let h = Harness::start(cfg).await;
    h.wait_ready().await;
    let base = git(&repo.app(), &["rev-parse", "--short", "HEAD"]);
    repo.push(&[("message.txt", "UNHEALTHY v2")], "v2");
    let mark = h.rec.lock().unwrap().routes.len();
    let (ok, message, progress) = deploy(&h, DeployArgs::default()).await;
    assert!(!ok, "{progress}");
    assert!(message.contains("http-0 did not become ready"), "{message}");
    assert!(
        message.contains("rolled back: every instance serves the app directory again"),
        "{message}"
    );
    http_routes_never_empty(&h, mark);
    let after = serving(&h).await;
    assert_eq!(after.len(), 2, "{after:?}");
    for (_, _, body) in &after {
        assert_eq!(body, "v1");
    }
    assert!(releases(&h).is_empty(), "{:?}", releases(&h));
    assert!(repo.backup_entries().is_empty());
    let report = h.status().await;
    assert_eq!(report.release.as_deref(), Some(base.as_str()));
    assert!(report.instances.iter().all(|i| !i.backup));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_deploy_is_refused_while_one_runs() {
    let repo = Repo::new();
    let mut cfg = repo.config((21_200, 21_249), 1);
    let go = repo.root().join("go");
    cfg.env.push(("WAIT_FOR".into(), go.display().to_string()));
    let h = Harness::start(cfg).await;
    h.wait_ready().await;
    repo.push(&[("message.txt", "v2")], "v2");

    let mut first = h.ctl().await;
    first
        .send(&CtlRequest::Deploy(DeployArgs::default()))
        .await
        .unwrap();
    // Wait until the build is running.
    loop {
        match tokio::time::timeout(Duration::from_secs(30), first.recv())
            .await
            .unwrap()
            .unwrap()
        {
            Some(CtlResponse::Progress(line)) if line.contains("build: waiting") => break,
            Some(CtlResponse::Progress(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    for request in [
        CtlRequest::Deploy(DeployArgs::default()),
        CtlRequest::Rollback,
    ] {
        match h.request(request).await.pop() {
            Some(CtlResponse::Refused(why)) => {
                assert!(why.starts_with("busy: deploy running"), "{why}")
            }
            other => panic!("expected busy, got {other:?}"),
        }
    }
    std::fs::write(&go, "").unwrap();
    let (ok, message, progress) = finish(collect(&mut first).await);
    assert!(ok, "{message}\n{progress}");
    assert_all_say(&h, "v2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_walks_back_through_kept_releases() {
    let repo = Repo::new();
    let h = Harness::start(repo.config((21_250, 21_299), 2)).await;
    h.wait_ready().await;
    let (ok, message, _) = finish(h.request(CtlRequest::Rollback).await);
    assert!(!ok);
    assert!(message.contains("nothing older"), "{message}");

    let v2 = repo.push(&[("message.txt", "v2")], "v2");
    assert!(deploy(&h, DeployArgs::default()).await.0);
    let v3 = repo.push(&[("message.txt", "v3")], "v3");
    assert!(deploy(&h, DeployArgs::default()).await.0);
    assert_all_say(&h, "v3").await;
    assert_eq!(h.status().await.release.as_deref(), Some(v3.as_str()));

    let mark = h.rec.lock().unwrap().routes.len();
    let (ok, message, progress) = finish(h.request(CtlRequest::Rollback).await);
    assert!(ok, "{message}\n{progress}");
    assert!(message.starts_with("rollback done: release "), "{message}");
    http_routes_never_empty(&h, mark);
    assert_all_say(&h, "v2").await;
    let report = h.status().await;
    assert_eq!(report.release.as_deref(), Some(v2.as_str()));
    assert_eq!(report.last_deploy.unwrap().name, "rollback");

    let (ok, message, _) = finish(h.request(CtlRequest::Rollback).await);
    assert!(ok, "{message}");
    assert!(message.contains("the app directory serves"), "{message}");
    assert_all_say(&h, "v1").await;
    let (ok, _, _) = finish(h.request(CtlRequest::Rollback).await);
    assert!(!ok);
    assert_all_say(&h, "v1").await;

    // A new deploy after the rollbacks; old releases beyond `keep` are pruned.
    for n in 4..=8 {
        repo.push(&[("message.txt", &format!("v{n}"))], "next");
        let (ok, message, progress) = deploy(&h, DeployArgs::default()).await;
        assert!(ok, "{message}\n{progress}");
    }
    assert_all_say(&h, "v8").await;
    assert_eq!(releases(&h).len(), 5, "{:?}", releases(&h));
}
