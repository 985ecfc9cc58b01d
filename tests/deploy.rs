//! `overwatchctl deploy` end to end with the real binaries and a real Next.js app
//! (`tests/fixtures/next-app`, built with the pinned pnpm) in a git repository cloned from a
//! local bare origin: a deploy of a new commit changes the page with zero failed requests
//! under load, and a page of the previous build still gets its chunks; a build that fails
//! leaves the previous release serving, again with zero failed requests. The many other
//! failure cases run against a small fast app in `fleet-worker/tests/deploy.rs`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{have_test_users, is_root, Launcher, Sandbox, APP_USER};

/// The pnpm `.ci/run` installs; the fixture's `packageManager` names the same.
const PNPM_VERSION: &str = "10.34.9";
/// pnpm's content-addressed store, kept between runs so installs are fast.
const PNPM_STORE: &str = "/var/cache/ow-pnpm-store";
const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/next-app");
/// The load loop stops by itself after this long, whatever happens.
const LOAD_LIMIT: Duration = Duration::from_secs(300);

/// pnpm at the pinned version, or why the test cannot run (a failure in CI).
fn have_pnpm() -> bool {
    let version = Command::new("pnpm")
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let ok = version.as_deref() == Some(PNPM_VERSION);
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have pnpm {PNPM_VERSION} (see .ci/run), found {version:?}"
        );
        eprintln!("skipped: needs pnpm {PNPM_VERSION}, found {version:?}");
    }
    ok
}

fn run(dir: &Path, program: &str, args: &[&str], env: &[(&str, &str)]) -> String {
    let out = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?} in {}: {}\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn git(dir: &Path, args: &[&str]) -> String {
    let mut all = vec![
        "-c",
        "user.name=t",
        "-c",
        "user.email=t@t",
        "-c",
        "init.defaultBranch=main",
    ];
    all.extend_from_slice(args);
    // A global config of our own, which git keeps for the origin's side of a push (it drops
    // `-c` and GIT_CONFIG_COUNT there): the origin belongs to the app user.
    let global = concat!(env!("CARGO_TARGET_TMPDIR"), "/deploy-test.gitconfig");
    std::fs::write(global, "[safe]\n\tdirectory = *\n").unwrap();
    run(dir, "git", &all, &[("GIT_CONFIG_GLOBAL", global)])
}

fn pnpm_env() -> [(&'static str, &'static str); 2] {
    [
        ("npm_config_store_dir", PNPM_STORE),
        ("NEXT_TELEMETRY_DISABLED", "1"),
    ]
}

/// A bare origin with `files` as its first commit, a working clone (`work`) the test commits
/// in, and the app directory (`app`) cloned from the origin.
fn make_repo(sandbox: &Sandbox, files: &[(&str, String)]) {
    let root = sandbox.path();
    git(root, &["init", "-q", "--bare", "origin.git"]);
    let work = root.join("work");
    for (name, text) in files {
        let path = work.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    git(&work, &["init", "-q"]);
    git(&work, &["add", "-A"]);
    git(&work, &["commit", "-q", "-m", "first release"]);
    git(&work, &["remote", "add", "origin", "../origin.git"]);
    git(&work, &["push", "-q", "-u", "origin", "main"]);
    // The sandbox made `app` for the demo app; the clone takes its place.
    std::fs::remove_dir(root.join("app")).unwrap();
    git(root, &["clone", "-q", "origin.git", "app"]);
}

fn push(sandbox: &Sandbox, files: &[(&str, &str)], message: &str) {
    let work = sandbox.path().join("work");
    for (name, text) in files {
        std::fs::write(work.join(name), text).unwrap();
    }
    git(&work, &["commit", "-q", "-am", message]);
    git(&work, &["push", "-q", "origin", "main"]);
}

/// A sandbox with the Next.js fixture committed to a bare origin, cloned as the app
/// directory, installed and built there, and the config to run it with 2 HTTP instances.
struct NextApp {
    sandbox: Sandbox,
    config: PathBuf,
}

impl NextApp {
    fn new() -> NextApp {
        let sandbox = Sandbox::new();
        let root = sandbox.path();
        let files: Vec<(&str, String)> = [
            "package.json",
            "pnpm-lock.yaml",
            "next.config.js",
            ".gitignore",
            "pages/index.js",
        ]
        .into_iter()
        .map(|f| {
            let text = std::fs::read_to_string(Path::new(FIXTURE).join(f)).unwrap();
            (f, text)
        })
        .collect();
        make_repo(&sandbox, &files);
        let app = root.join("app");
        std::fs::create_dir_all(PNPM_STORE).unwrap();
        run(&app, "pnpm", &["install", "--frozen-lockfile"], &pnpm_env());
        run(&app, "pnpm", &["build"], &pnpm_env());
        let home = root.join("home");
        std::fs::create_dir_all(&home).unwrap();
        if is_root() {
            // The app runs as the app user: it owns its repository, home and pnpm store.
            for path in [root.join("origin.git"), app.clone(), home.clone()] {
                run(
                    root,
                    "chown",
                    &["-R", APP_USER, path.to_str().unwrap()],
                    &[],
                );
            }
            run(root, "chown", &["-R", APP_USER, PNPM_STORE], &[]);
        }
        let env = format!(
            "NODE_ENV = \"production\", NEXT_TELEMETRY_DISABLED = \"1\", HOME = \"{}\", \
             npm_config_store_dir = \"{PNPM_STORE}\"",
            home.display()
        );
        let config = write_config(
            &sandbox,
            &AppConfig {
                command: "pnpm start",
                env,
                ready_timeout: "60s",
                build_dir: ".next",
                build: "pnpm build",
                install: "pnpm install --no-frozen-lockfile",
            },
        );
        NextApp { sandbox, config }
    }

    fn work(&self) -> PathBuf {
        self.sandbox.path().join("work")
    }

    /// Commits a new `pages/index.js` with `body` and pushes it.
    fn push_page(&self, body: &str, message: &str) {
        self.push(&[("pages/index.js", body)], message);
    }

    fn push(&self, files: &[(&str, &str)], message: &str) {
        push(&self.sandbox, files, message);
    }

    fn page(&self) -> String {
        page(&self.sandbox)
    }
}

/// What differs between the apps the tests deploy.
struct AppConfig<'a> {
    command: &'a str,
    env: String,
    ready_timeout: &'a str,
    build_dir: &'a str,
    build: &'a str,
    install: &'a str,
}

fn page(sandbox: &Sandbox) -> String {
    let response = sandbox.client().get(sandbox.http_url("/")).send().unwrap();
    assert_eq!(response.status(), 200);
    response.text().unwrap()
}

fn write_config(sandbox: &Sandbox, app: &AppConfig<'_>) -> PathBuf {
    let users = if is_root() {
        format!(
            "user = \"{}\"\ngroup = \"{}\"\n",
            common::PROXY_USER,
            common::CTL_GROUP
        )
    } else {
        String::new()
    };
    let app_user = if is_root() {
        format!("user = \"{APP_USER}\"\n")
    } else {
        String::new()
    };
    let text = format!(
        r#"[overwatch]
{users}control_socket = "control.sock"
state_dir = "state"

[proxy]
https = ["127.0.0.1:{hp}"]
http = ["127.0.0.1:{p}"]
cert = "cert.pem"
key = "key.pem"

[app]
dir = "app"
{app_user}ports = "{pmin}-{pmax}"
env = {{ {env} }}

[app.https]
count = 0
command = "{command}"

[app.http]
count = 2
command = "{command}"

[health]
path = "/"
interval = "1s"
ready_timeout = "{ready_timeout}"
drain_timeout = "5s"
stop_timeout = "5s"

[deploy]
build_dir = "{build_dir}"
pull = "git pull --ff-only"
build = "{build}"
install = "{install}"
"#,
        hp = sandbox.https_port,
        p = sandbox.http_port,
        pmin = sandbox.ports.0,
        pmax = sandbox.ports.1,
        env = app.env,
        command = app.command,
        ready_timeout = app.ready_timeout,
        build_dir = app.build_dir,
        build = app.build,
        install = app.install,
    );
    let path = sandbox.path().join("overwatch.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A client thread looping GETs of `/` through the proxy until stopped (or [`LOAD_LIMIT`]);
/// joins into (requests, failures with their reasons).
struct Load {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<(u64, Vec<String>)>>,
}

impl Load {
    /// Every answer must be a 200 whose body contains `expect`.
    fn start(sandbox: &Sandbox, expect: &'static str) -> Load {
        let client = sandbox.client();
        let url = sandbox.http_url("/");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            let (mut requests, mut failures) = (0u64, Vec::new());
            while !flag.load(Ordering::Relaxed) && started.elapsed() < LOAD_LIMIT {
                requests += 1;
                match client.get(&url).send() {
                    Ok(r) if r.status() == 200 => match r.text() {
                        Ok(body) if body.contains(expect) => {}
                        Ok(body) => failures.push(format!("unexpected body: {body:.200}")),
                        Err(e) => failures.push(format!("body: {e}")),
                    },
                    Ok(r) => failures.push(format!("status {}", r.status())),
                    Err(e) => failures.push(format!("{e}")),
                }
            }
            (requests, failures)
        });
        Load {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The `/_next/static/...` script URLs a page asks for.
fn chunks(html: &str) -> Vec<String> {
    html.split("src=\"")
        .skip(1)
        .filter_map(|s| s.split('"').next())
        .filter(|s| s.starts_with("/_next/static/"))
        .map(str::to_string)
        .collect()
}

fn start(app: &NextApp) -> Launcher {
    let launcher = Launcher::run(&app.sandbox, &app.config);
    app.sandbox.wait_ready(2, Duration::from_secs(120));
    launcher
}

#[test]
fn deploy_of_a_new_commit_under_load_changes_the_page_and_keeps_old_chunks() {
    if !have_test_users() || !have_pnpm() {
        return;
    }
    let app = NextApp::new();
    let _launcher = start(&app);
    let first = app.page();
    assert!(first.contains("MESSAGE: first release"), "{first}");
    let old_chunks = chunks(&first);
    let page_chunk = old_chunks
        .iter()
        .find(|c| c.contains("/chunks/pages/index-"))
        .expect("the page's own chunk")
        .clone();

    app.push_page(
        "export default function Home() {\n  return <p id=\"message\">MESSAGE: second release</p>;\n}\n",
        "second release",
    );
    let load = Load::start(&app.sandbox, "MESSAGE:");
    let began = Instant::now();
    let out = app.sandbox.ctl(&["deploy"]);
    let took = began.elapsed();
    let (requests, failures) = load.finish();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "deploy failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "deploy took {took:?}; {requests} requests during it, {} failed",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );
    assert!(requests > 20, "too little load: {requests}");
    assert!(stdout.contains("build: exit status: 0"), "{stdout}");

    let second = app.page();
    assert!(second.contains("MESSAGE: second release"), "{second}");
    assert!(
        !chunks(&second).contains(&page_chunk),
        "the page chunk did not change: {page_chunk}"
    );
    // A browser holding the first page still gets its chunks.
    let client = app.sandbox.client();
    for chunk in &old_chunks {
        let response = client.get(app.sandbox.http_url(chunk)).send().unwrap();
        assert_eq!(response.status(), 200, "{chunk}");
    }
    let status = app.sandbox.status().unwrap();
    let head = git(&app.work(), &["rev-parse", "--short=7", "HEAD"]);
    assert_eq!(status["release"], head.as_str(), "{status}");
    assert_eq!(status["last_deploy"]["ok"], true, "{status}");
    let logs: Vec<_> = std::fs::read_dir(app.sandbox.path().join("state/deploys"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(logs.len(), 1);
    let log = std::fs::read_to_string(logs[0].path()).unwrap();
    assert!(log.contains("$ pnpm build"), "{log}");
}

#[test]
fn failed_build_under_load_keeps_the_previous_release_serving_and_a_reinstall_fixes_modules() {
    if !have_test_users() || !have_pnpm() {
        return;
    }
    let app = NextApp::new();
    let _launcher = start(&app);
    let before = app.sandbox.status().unwrap();

    app.push_page(
        "export default function Home() {\n  return <p>MESSAGE: broken release</p\n}\n",
        "a syntax error",
    );
    let load = Load::start(&app.sandbox, "MESSAGE:");
    let began = Instant::now();
    let out = app.sandbox.ctl(&["deploy", "--persistent", "false"]);
    let took = began.elapsed();
    let (requests, failures) = load.finish();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("`pnpm build` failed"), "{stderr}");
    assert!(stderr.contains("the instances keep serving"), "{stderr}");
    eprintln!(
        "failed deploy took {took:?}; {requests} requests during it, {} failed",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );
    assert!(app.page().contains("MESSAGE: first release"));
    let after = app.sandbox.status().unwrap();
    let ids = |s: &serde_json::Value| -> Vec<u64> {
        s["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(ids(&after), ids(&before), "the instances were restarted");
    assert_eq!(after["last_deploy"]["ok"], false);
    assert!(!app.sandbox.path().join("state/releases/current").exists());

    // A commit that needs a package the carried-over node_modules lack: the first build
    // fails; `persistent` removes node_modules and the lock file, pnpm installs, the build
    // passes and the page changes, again with zero failed requests.
    let package = std::fs::read_to_string(Path::new(FIXTURE).join("package.json"))
        .unwrap()
        .replace(
            r#""next": "#,
            r#""ms": "2.1.3",
    "next": "#,
        );
    app.push(
        &[
            ("package.json", &package),
            (
                "pages/index.js",
                "import ms from \"ms\";\nexport default function Home() {\n  return <p>MESSAGE: third release {ms(60000)}</p>;\n}\n",
            ),
        ],
        "a new dependency",
    );
    let load = Load::start(&app.sandbox, "MESSAGE:");
    let began = Instant::now();
    let out = app.sandbox.ctl(&["deploy", "--persistent", "true"]);
    let took = began.elapsed();
    let (requests, failures) = load.finish();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "deploy failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "deploy with reinstall took {took:?}; {requests} requests during it, {} failed",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );
    assert!(stdout.contains("build failed; persistent"), "{stdout}");
    assert!(stdout.contains("removed pnpm-lock.yaml"), "{stdout}");
    assert!(stdout.contains("install: exit status: 0"), "{stdout}");
    assert!(
        stdout.contains("build (after install): exit status: 0"),
        "{stdout}"
    );
    let page = app.page();
    assert!(page.contains("MESSAGE: third release <!-- -->1m"), "{page}");
}

const FAST_APP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/fast-app");

#[test]
fn a_release_that_never_gets_ready_rolls_back_and_rollback_works_under_load() {
    if !have_test_users() {
        return;
    }
    let sandbox = Sandbox::new();
    let mut files: Vec<(&str, String)> = ["app.py", "build.sh", ".gitignore"]
        .into_iter()
        .map(|f| {
            let text = std::fs::read_to_string(Path::new(FAST_APP).join(f)).unwrap();
            (f, text)
        })
        .collect();
    files.push(("message.txt", "v1".into()));
    make_repo(&sandbox, &files);
    let root = sandbox.path();
    run(&root.join("app"), "sh", &["build.sh"], &[]);
    if is_root() {
        for dir in ["origin.git", "app"] {
            run(root, "chown", &["-R", APP_USER, dir], &[]);
        }
    }
    let config = write_config(
        &sandbox,
        &AppConfig {
            command: "exec python3 app.py",
            env: String::new(),
            ready_timeout: "3s",
            build_dir: "build",
            build: "sh build.sh",
            install: "true",
        },
    );
    let _launcher = Launcher::run(&sandbox, &config);
    let before = sandbox.wait_ready(2, Duration::from_secs(30));
    assert_eq!(page(&sandbox), "v1");

    // The new release answers 500: never ready; every answer during the deploy is v1.
    push(&sandbox, &[("message.txt", "UNHEALTHY v2")], "v2");
    let load = Load::start(&sandbox, "v1");
    let out = sandbox.ctl(&["deploy"]);
    let (requests, failures) = load.finish();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("did not become ready"), "{stderr}");
    assert!(
        stderr.contains("rolled back: every instance serves the app directory again"),
        "{stderr}"
    );
    eprintln!(
        "rolled-back deploy: {requests} requests, {} failed",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );
    assert!(requests > 20, "too little load: {requests}");
    let after = sandbox.wait_ready(2, Duration::from_secs(30));
    assert_eq!(after["release"], before["release"]);
    assert_eq!(after["last_deploy"]["ok"], false);

    // A good release, then `overwatchctl rollback` to the app directory, both under load.
    push(&sandbox, &[("message.txt", "v3")], "v3");
    let load = Load::start(&sandbox, "v");
    let deployed = sandbox.ctl(&["deploy", "-deleteOld=false"]);
    assert!(
        deployed.status.success(),
        "{}",
        String::from_utf8_lossy(&deployed.stderr)
    );
    assert_eq!(page(&sandbox), "v3");
    let rolled = sandbox.ctl(&["rollback"]);
    let (requests, failures) = load.finish();
    assert!(
        rolled.status.success(),
        "{}",
        String::from_utf8_lossy(&rolled.stderr)
    );
    let stdout = String::from_utf8_lossy(&rolled.stdout);
    assert!(
        stdout.contains("rollback done: the app directory serves"),
        "{stdout}"
    );
    eprintln!(
        "deploy and rollback: {requests} requests, {} failed",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );
    assert_eq!(page(&sandbox), "v1");
    let backups: Vec<_> = std::fs::read_dir(root.join("state/backup"))
        .unwrap()
        .collect();
    assert_eq!(backups.len(), 1, "-deleteOld=false keeps the backup");
    let status = sandbox.status().unwrap();
    assert_eq!(status["last_deploy"]["name"], "rollback");
    assert_eq!(status["release"], before["release"]);
}
