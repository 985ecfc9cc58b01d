//! Deploy and rollback. A deploy pulls in the app's repository, backs up the live build,
//! builds a new release *beside* the live one (a git worktree at the new commit under
//! `<state_dir>/releases/`), carries the previous build's static files into it, switches the
//! `current` symlink atomically and rolls every instance onto it. Running instances never see
//! a file change under them; any failure leaves them serving the previous release.
//!
//! Layout on disk:
//! - `<state_dir>/releases/<stamp>-<commit>/`: one release each; `current` points at the one
//!   new instances start in (no `current`: they start in `[app].dir`).
//! - `<state_dir>/deploys/<stamp>.log`: every step's command, output and exit status.
//! - `<backup_dir>/<stamp>/prod/`: the backup of the live build, while the deploy runs.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;
use protocol::{Counts, CtlResponse, DeployArgs, DeploySettings, RestartArgs};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;

use crate::clock::{now_unix_ms, stamp_utc};
use crate::fleet::{CtlCmd, FleetHandle};
use crate::ops::Operation;
use crate::process;

/// One step (pull, install, build) may take this long before its process group is killed.
const STEP_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// The lock files a reinstall removes, as the seed names them.
const LOCK_FILES: [&str; 3] = ["pnpm-lock.yaml", "package-lock.json", "yarn.lock"];
/// After a step exits, how long its last output lines may take to arrive.
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);
const CURRENT: &str = "current";
const GONE: &str = "the fleet worker is stopping";

#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("{what}: cannot start `{command}` in {dir}: {source}")]
    Spawn {
        what: String,
        command: String,
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: `{command}` failed ({status})")]
    Failed {
        what: String,
        command: String,
        status: String,
    },
    #[error("{what}: `{command}` still running after {} s: killed", STEP_TIMEOUT.as_secs())]
    Timeout { what: String, command: String },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DeployError {
    let path = path.to_path_buf();
    move |source| DeployError::Io { what, path, source }
}

/// What a deploy needs from the state machine, read once at its start.
#[derive(Debug, Clone)]
pub struct DeployContext {
    pub app_dir: PathBuf,
    pub env: Vec<(String, String)>,
    pub settings: DeploySettings,
    pub state_dir: PathBuf,
    pub counts: Counts,
}

/// The deploy log file; operations append their progress lines to it too.
pub struct DeployLog {
    path: PathBuf,
    file: Mutex<Option<std::fs::File>>,
}

impl DeployLog {
    fn open(path: PathBuf) -> Self {
        let file = path
            .parent()
            .map(std::fs::create_dir_all)
            .transpose()
            .and_then(|_| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
            });
        let file = match file {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!("deploy log {}: {e}", path.display());
                None
            }
        };
        DeployLog {
            path,
            file: Mutex::new(file),
        }
    }

    pub fn line(&self, line: &str) {
        if let Ok(mut guard) = self.file.lock() {
            if let Some(f) = guard.as_mut() {
                let _ = writeln!(f, "{line}");
            }
        }
    }
}

/// Kills a step's whole process group if the step is abandoned (its task dropped).
struct GroupGuard(Option<i32>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            let _ = process::signal_group(pgid, Signal::SIGKILL);
        }
    }
}

async fn forward_lines(
    stream: impl tokio::io::AsyncRead + Unpin,
    is_out: bool,
    tx: mpsc::UnboundedSender<(bool, String)>,
) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if tx.send((is_out, line)).is_err() {
            return;
        }
    }
}

/// Links (or copies) every file below `from` into `to` where `to` has none yet; returns how
/// many were added.
fn merge_tree(from: &Path, to: &Path) -> Result<u64, DeployError> {
    let mut added = 0;
    for entry in std::fs::read_dir(from).map_err(io_err("cannot read", from))? {
        let entry = entry.map_err(io_err("cannot read", from))?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type().map_err(io_err("cannot stat", &src))?;
        if kind.is_dir() {
            if !dst.exists() {
                std::fs::create_dir(&dst).map_err(io_err("cannot create", &dst))?;
            }
            added += merge_tree(&src, &dst)?;
        } else if kind.is_file() && !dst.exists() {
            if std::fs::hard_link(&src, &dst).is_err() {
                std::fs::copy(&src, &dst).map_err(io_err("cannot copy to", &dst))?;
            }
            added += 1;
        }
    }
    Ok(added)
}

// ----- releases on disk -----

pub fn releases_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("releases")
}

/// The release `current` points at: (its directory, its name).
pub fn current_release(state_dir: &Path) -> Option<(PathBuf, String)> {
    let dir = releases_dir(state_dir);
    let target = std::fs::read_link(dir.join(CURRENT)).ok()?;
    let name = target.file_name()?.to_str()?.to_string();
    let path = dir.join(&name);
    path.is_dir().then_some((path, name))
}

/// The file that marks release `name` as completely built (beside it, not in the app's tree).
fn built_marker(state_dir: &Path, name: &str) -> PathBuf {
    releases_dir(state_dir).join(format!(".{name}.built"))
}

/// Every release directory, oldest first (names start with a sortable UTC stamp): the built
/// ones, or the ones a deploy left unfinished (it was interrupted).
fn release_dirs(state_dir: &Path, built: bool) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(releases_dir(state_dir))
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .filter(|n| !n.starts_with('.') && n != CURRENT)
                .filter(|n| built_marker(state_dir, n).exists() == built)
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Every completely built release, oldest first.
pub fn list_releases(state_dir: &Path) -> Vec<String> {
    release_dirs(state_dir, true)
}

/// What `status` shows for a release: the commit part of its name.
pub fn release_label(name: &str) -> String {
    name.rsplit_once('-')
        .map_or(name, |(_, commit)| commit)
        .to_string()
}

/// Points `current` at `name` (or removes it: instances start in the app directory) with a
/// rename, so a reader sees the old link or the new one, never none.
fn switch_current(state_dir: &Path, name: Option<&str>) -> Result<(), DeployError> {
    let dir = releases_dir(state_dir);
    let link = dir.join(CURRENT);
    match name {
        Some(name) => {
            let tmp = dir.join(format!(".{CURRENT}.{}", std::process::id()));
            let _ = std::fs::remove_file(&tmp);
            std::os::unix::fs::symlink(name, &tmp).map_err(io_err("cannot create", &tmp))?;
            std::fs::rename(&tmp, &link).map_err(io_err("cannot rename onto", &link))
        }
        None => match std::fs::remove_file(&link) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(io_err("cannot remove", &link)(e))
            }
            _ => Ok(()),
        },
    }
}

/// Runs deploys and rollbacks for a control client; progress goes to the client and the
/// deploy log.
pub struct Deployer {
    fleet: FleetHandle,
    op: Operation,
    progress: mpsc::UnboundedSender<CtlResponse>,
    log: Arc<DeployLog>,
    stamp: String,
}

impl Deployer {
    pub fn new(
        fleet: FleetHandle,
        op: Operation,
        progress: mpsc::UnboundedSender<CtlResponse>,
        state_dir: &Path,
    ) -> Self {
        let stamp = stamp_utc(now_unix_ms());
        let log = Arc::new(DeployLog::open(
            state_dir.join("deploys").join(format!("{stamp}.log")),
        ));
        let op = op.with_log(log.clone());
        Deployer {
            fleet,
            op,
            progress,
            log,
            stamp,
        }
    }

    fn say(&self, line: String) {
        tracing::info!("{line}");
        self.log.line(&line);
        let _ = self.progress.send(CtlResponse::Progress(line));
    }

    /// Output of a step: to the log and the client, not to the worker's own log.
    fn output(&self, line: &str) {
        self.log.line(line);
        let _ = self
            .progress
            .send(CtlResponse::Progress(format!("  | {line}")));
    }

    async fn context(&self) -> Result<DeployContext, String> {
        self.fleet
            .ask(CtlCmd::DeployContext)
            .await
            .ok_or_else(|| GONE.to_string())
    }

    /// Environment of every step: the app's, and git trusting the app's repository whoever
    /// owns it (the fleet worker runs as the app user) and never prompting.
    fn step_env(ctx: &DeployContext) -> Vec<(String, String)> {
        let mut env = Vec::new();
        if std::env::var_os("GIT_CONFIG_COUNT").is_none()
            && !ctx.env.iter().any(|(k, _)| k == "GIT_CONFIG_COUNT")
        {
            env.extend([
                ("GIT_CONFIG_COUNT".into(), "1".into()),
                ("GIT_CONFIG_KEY_0".into(), "safe.directory".into()),
                ("GIT_CONFIG_VALUE_0".into(), "*".into()),
            ]);
        }
        env.push(("GIT_TERMINAL_PROMPT".into(), "0".into()));
        env.extend(ctx.env.iter().cloned());
        env
    }

    /// Runs `sh -c command` in `dir` (its own process group), every output line to the log
    /// and the client; fails on a non-zero exit.
    async fn shell(
        &self,
        what: &str,
        command: &str,
        dir: &Path,
        ctx: &DeployContext,
    ) -> Result<(), DeployError> {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(command);
        self.run(what, command, cmd, dir, ctx).await.map(drop)
    }

    /// Runs a program without a shell; returns its standard output.
    async fn exec(
        &self,
        what: &str,
        program: &str,
        args: &[&str],
        dir: &Path,
        ctx: &DeployContext,
    ) -> Result<String, DeployError> {
        let shown = std::iter::once(program)
            .chain(args.iter().copied())
            .collect::<Vec<_>>()
            .join(" ");
        let mut cmd = Command::new(program);
        cmd.args(args);
        self.run(what, &shown, cmd, dir, ctx).await
    }

    async fn run(
        &self,
        what: &str,
        shown: &str,
        mut cmd: Command,
        dir: &Path,
        ctx: &DeployContext,
    ) -> Result<String, DeployError> {
        self.say(format!("{what}: $ {shown}   (in {})", dir.display()));
        cmd.current_dir(dir)
            .envs(Self::step_env(ctx))
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|source| DeployError::Spawn {
            what: what.to_string(),
            command: shown.to_string(),
            dir: dir.to_path_buf(),
            source,
        })?;
        let pgid = child.id().map(|p| p as i32);
        let _group = GroupGuard(pgid);
        let (tx, mut rx) = mpsc::unbounded_channel::<(bool, String)>();
        if let Some(stdout) = child.stdout.take() {
            tokio::spawn(forward_lines(stdout, true, tx.clone()));
        }
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(forward_lines(stderr, false, tx.clone()));
        }
        drop(tx);
        let mut captured = String::new();
        let mut record = |(is_out, line): (bool, String)| {
            self.output(&line);
            if is_out {
                captured.push_str(&line);
                captured.push('\n');
            }
        };
        let waited = async {
            let mut lines_open = true;
            loop {
                tokio::select! {
                    line = rx.recv(), if lines_open => match line {
                        Some(line) => record(line),
                        None => lines_open = false,
                    },
                    status = child.wait() => return status,
                }
            }
        };
        let status = match tokio::time::timeout(STEP_TIMEOUT, waited).await {
            Ok(Ok(status)) => status,
            Ok(Err(e)) => {
                return Err(DeployError::Spawn {
                    what: what.to_string(),
                    command: shown.to_string(),
                    dir: dir.to_path_buf(),
                    source: e,
                })
            }
            Err(_) => {
                if let Some(pgid) = pgid {
                    let _ = process::signal_group(pgid, Signal::SIGKILL);
                }
                self.say(format!("{what}: timed out, killed"));
                return Err(DeployError::Timeout {
                    what: what.to_string(),
                    command: shown.to_string(),
                });
            }
        };
        // Whatever the step left behind in its group goes with it; then the last lines.
        if let Some(pgid) = pgid {
            let _ = process::signal_group(pgid, Signal::SIGKILL);
        }
        let _ = tokio::time::timeout(OUTPUT_DRAIN, async {
            while let Some(line) = rx.recv().await {
                record(line);
            }
        })
        .await;
        self.say(format!("{what}: {status}"));
        if status.success() {
            Ok(captured)
        } else {
            Err(DeployError::Failed {
                what: what.to_string(),
                command: shown.to_string(),
                status: status.to_string(),
            })
        }
    }

    async fn remove_tree(&self, path: &Path) {
        let owned = path.to_path_buf();
        let result = tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&owned) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        })
        .await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => self.say(format!("cannot remove {}: {e}", path.display())),
            Err(e) => self.say(format!("cannot remove {}: {e}", path.display())),
        }
    }

    /// Copies `from` to `to` (a new path) with `cp -a`; hard links first when `link`.
    async fn copy_tree(
        &self,
        what: &str,
        from: &Path,
        to: &Path,
        link: bool,
        ctx: &DeployContext,
    ) -> Result<(), DeployError> {
        let (from_s, to_s) = (from.to_string_lossy(), to.to_string_lossy());
        if link
            && self
                .exec(what, "cp", &["-al", &from_s, &to_s], &ctx.app_dir, ctx)
                .await
                .is_ok()
        {
            return Ok(());
        }
        if link {
            self.remove_tree(to).await;
        }
        self.exec(what, "cp", &["-a", &from_s, &to_s], &ctx.app_dir, ctx)
            .await
            .map(drop)
    }

    // ----- deploy -----

    /// The whole deploy; returns (ok, message) for `Done`.
    pub async fn deploy(&self, args: DeployArgs) -> (bool, String) {
        let ctx = match self.context().await {
            Ok(ctx) => ctx,
            Err(e) => return (false, e),
        };
        self.say(format!("deploy: log in {}", self.log.path.display()));
        match self.deploy_inner(&ctx, args).await {
            Ok(message) => {
                self.say(message.clone());
                (true, message)
            }
            Err(message) => {
                self.say(format!("deploy failed: {message}"));
                (false, message)
            }
        }
    }

    async fn deploy_inner(&self, ctx: &DeployContext, args: DeployArgs) -> Result<String, String> {
        let s = &ctx.settings;
        let persistent = args.persistent.unwrap_or(s.persistent);
        let delete_old = args.delete_old.unwrap_or(s.delete_old);
        let previous = current_release(&ctx.state_dir);
        let live_dir = previous
            .as_ref()
            .map_or(ctx.app_dir.clone(), |(dir, _)| dir.clone());
        let live_name = previous
            .as_ref()
            .map_or("the app directory".to_string(), |(_, n)| {
                format!("release {n}")
            });
        self.say(format!(
            "deploy: instances run {live_name}; persistent={persistent}, delete_old={delete_old}"
        ));
        let untouched = format!("nothing changed: the instances keep serving {live_name}");
        self.sweep(ctx, previous.as_ref().map(|(_, n)| n.as_str()))
            .await;

        self.shell("pull", &s.pull, &ctx.app_dir, ctx)
            .await
            .map_err(|e| format!("{e}; {untouched}"))?;
        let git = ctx.app_dir.join(".git").exists();
        let commit = if git {
            let out = self
                .exec("commit", "git", &["rev-parse", "HEAD"], &ctx.app_dir, ctx)
                .await
                .map_err(|e| format!("{e}; {untouched}"))?;
            Some(out.trim().to_string())
        } else {
            None
        };
        let short: String = commit
            .as_deref()
            .map_or("build".into(), |c| c.chars().take(7).collect());

        // Back up the live build.
        let live_build = live_dir.join(&s.build_dir);
        let backup_root = PathBuf::from(&s.backup_dir).join(&self.stamp);
        let backup = if live_build.is_dir() {
            let to = backup_root.join("prod");
            std::fs::create_dir_all(&backup_root)
                .map_err(|e| format!("backup: cannot create {}: {e}", backup_root.display()))?;
            match self.copy_tree("backup", &live_build, &to, false, ctx).await {
                Ok(()) => Some(backup_root.clone()),
                Err(e) => {
                    self.remove_tree(&backup_root).await;
                    return Err(format!("{e}; {untouched}"));
                }
            }
        } else {
            self.say(format!(
                "backup: no build at {}, nothing to back up",
                live_build.display()
            ));
            None
        };

        // Build the new release beside the live one.
        let name = format!("{}-{short}", self.stamp);
        let release = releases_dir(&ctx.state_dir).join(&name);
        let built = self
            .build_release(ctx, &release, commit.as_deref(), &live_dir, persistent)
            .await;
        if let Err(e) = built {
            self.discard_release(ctx, &release, git).await;
            self.drop_backup(backup.as_deref(), delete_old).await;
            return Err(format!(
                "{e}; the build was not switched, {untouched} (its build was never touched)"
            ));
        }
        self.carry_static(&live_build, &release.join(&s.build_dir))
            .await;
        let marker = built_marker(&ctx.state_dir, &name);
        if let Err(e) = std::fs::write(&marker, b"") {
            self.discard_release(ctx, &release, git).await;
            self.drop_backup(backup.as_deref(), delete_old).await;
            return Err(format!(
                "cannot write {}: {e}; {untouched}",
                marker.display()
            ));
        }

        // Switch and roll.
        if let Err(e) = switch_current(&ctx.state_dir, Some(&name)) {
            self.discard_release(ctx, &release, git).await;
            self.drop_backup(backup.as_deref(), delete_old).await;
            return Err(format!("{e}; {untouched}"));
        }
        self.fleet.tell(CtlCmd::SetRelease {
            dir: Some(release.clone()),
            label: Some(release_label(&name)),
        });
        self.say(format!("switch: new instances start in release {name}"));
        let (ok, message) = self.op.restart_all(args.counts).await;
        if !ok {
            self.say(format!(
                "rollback: the new release did not serve ({message}); back to {live_name}"
            ));
            let back = self.switch_to(ctx, previous.as_ref().map(|(_, n)| n.as_str()));
            let counts = RestartArgs {
                ssl: Some(ctx.counts.https),
                http: Some(ctx.counts.http),
                root: Some(ctx.counts.root),
            };
            let (rolled, rmessage) = match back {
                Ok(()) => self.op.restart_all(counts).await,
                Err(e) => (false, e.to_string()),
            };
            self.drop_backup(backup.as_deref(), delete_old).await;
            if rolled {
                self.discard_release(ctx, &release, git).await;
                return Err(format!(
                    "{message}; rolled back: every instance serves {live_name} again"
                ));
            }
            return Err(format!(
                "{message}; the rollback to {live_name} failed too: {rmessage}"
            ));
        }
        self.drop_backup(backup.as_deref(), delete_old).await;
        self.prune(ctx, &name, git).await;
        Ok(format!("deploy done: release {name} serves ({message})"))
    }

    async fn drop_backup(&self, backup: Option<&Path>, delete_old: bool) {
        let Some(dir) = backup else { return };
        if delete_old {
            self.say(format!("backup: deleting {}", dir.display()));
            self.remove_tree(dir).await;
        } else {
            self.say(format!("backup: kept in {}", dir.display()));
        }
    }

    /// A worktree (or a copy) at `commit`, with the live `node_modules` carried over, built.
    async fn build_release(
        &self,
        ctx: &DeployContext,
        release: &Path,
        commit: Option<&str>,
        live_dir: &Path,
        persistent: bool,
    ) -> Result<(), DeployError> {
        let s = &ctx.settings;
        let parent = releases_dir(&ctx.state_dir);
        std::fs::create_dir_all(&parent).map_err(io_err("cannot create", &parent))?;
        let release_s = release.to_string_lossy();
        match commit {
            Some(commit) => {
                self.exec(
                    "release",
                    "git",
                    &["worktree", "add", "--detach", &release_s, commit],
                    &ctx.app_dir,
                    ctx,
                )
                .await?;
            }
            None => {
                self.copy_tree("release", &ctx.app_dir, release, false, ctx)
                    .await?;
                self.remove_tree(&release.join(&s.build_dir)).await;
            }
        }
        let modules = live_dir.join("node_modules");
        if modules.is_dir() && !release.join("node_modules").exists() {
            self.copy_tree(
                "node_modules",
                &modules,
                &release.join("node_modules"),
                true,
                ctx,
            )
            .await?;
        }
        let first = self.shell("build", &s.build, release, ctx).await;
        let Err(e) = first else { return Ok(()) };
        if !persistent {
            return Err(e);
        }
        self.say(
            "build failed; persistent: removing node_modules and lock files, then install and build again"
                .into(),
        );
        self.remove_tree(&release.join("node_modules")).await;
        for lock in LOCK_FILES {
            let path = release.join(lock);
            if path.exists() {
                std::fs::remove_file(&path).map_err(io_err("cannot remove", &path))?;
                self.say(format!("removed {lock}"));
            }
        }
        self.shell("install", &s.install, release, ctx).await?;
        self.shell("build (after install)", &s.build, release, ctx)
            .await
    }

    /// The previous build's static files go into the new build's, so a page of the previous
    /// build still gets its chunks (names are content hashes: nothing new is overwritten).
    async fn carry_static(&self, old_build: &Path, new_build: &Path) {
        let (old, new) = (old_build.join("static"), new_build.join("static"));
        if !old.is_dir() || !new.is_dir() {
            return;
        }
        let (from, to) = (old.clone(), new.clone());
        let carried = tokio::task::spawn_blocking(move || merge_tree(&from, &to)).await;
        match carried {
            Ok(Ok(n)) => self.say(format!(
                "static: {n} files of the previous build carried into {}",
                new.display()
            )),
            Ok(Err(e)) => self.say(format!(
                "static: {e}; pages of the previous build may miss chunks"
            )),
            Err(e) => self.say(format!("static: {e}")),
        }
    }

    async fn discard_release(&self, ctx: &DeployContext, release: &Path, git: bool) {
        self.say(format!("release: removing {}", release.display()));
        self.remove_tree(release).await;
        if let Some(name) = release.file_name().and_then(|n| n.to_str()) {
            let _ = std::fs::remove_file(built_marker(&ctx.state_dir, name));
        }
        if git {
            let _ = self
                .exec("release", "git", &["worktree", "prune"], &ctx.app_dir, ctx)
                .await;
        }
    }

    /// Removes what an interrupted deploy left: release directories never marked built.
    async fn sweep(&self, ctx: &DeployContext, current: Option<&str>) {
        let leftovers: Vec<String> = release_dirs(&ctx.state_dir, false)
            .into_iter()
            .filter(|n| Some(n.as_str()) != current)
            .collect();
        for name in &leftovers {
            self.say(format!(
                "releases: removing {name}, left unfinished by an interrupted deploy"
            ));
            self.remove_tree(&releases_dir(&ctx.state_dir).join(name))
                .await;
        }
        if !leftovers.is_empty() && ctx.app_dir.join(".git").exists() {
            let _ = self
                .exec("releases", "git", &["worktree", "prune"], &ctx.app_dir, ctx)
                .await;
        }
    }

    /// Keeps the newest `keep` releases and the current one.
    async fn prune(&self, ctx: &DeployContext, current: &str, git: bool) {
        let keep = ctx.settings.keep.max(1) as usize;
        let names = list_releases(&ctx.state_dir);
        let excess = names.len().saturating_sub(keep);
        let mut pruned = false;
        for name in names.iter().take(excess).filter(|n| *n != current) {
            self.say(format!("releases: removing {name} (keeping {keep})"));
            self.remove_tree(&releases_dir(&ctx.state_dir).join(name))
                .await;
            let _ = std::fs::remove_file(built_marker(&ctx.state_dir, name));
            pruned = true;
        }
        if pruned && git {
            let _ = self
                .exec("releases", "git", &["worktree", "prune"], &ctx.app_dir, ctx)
                .await;
        }
    }

    /// Points `current` and the state machine at `name` (`None`: the app directory).
    fn switch_to(&self, ctx: &DeployContext, name: Option<&str>) -> Result<(), DeployError> {
        switch_current(&ctx.state_dir, name)?;
        self.fleet.tell(CtlCmd::SetRelease {
            dir: name.map(|n| releases_dir(&ctx.state_dir).join(n)),
            label: name.map(release_label),
        });
        Ok(())
    }

    // ----- rollback -----

    /// Back to the release before the current one (the app directory before the first
    /// kept release) with a rolling restart.
    pub async fn rollback(&self) -> (bool, String) {
        let ctx = match self.context().await {
            Ok(ctx) => ctx,
            Err(e) => return (false, e),
        };
        self.say(format!("rollback: log in {}", self.log.path.display()));
        let result = self.rollback_inner(&ctx).await;
        let (ok, message) = match result {
            Ok(m) => (true, m),
            Err(m) => (false, m),
        };
        self.say(message.clone());
        (ok, message)
    }

    async fn rollback_inner(&self, ctx: &DeployContext) -> Result<String, String> {
        let Some((_, current)) = current_release(&ctx.state_dir) else {
            return Err(
                "rollback: no deployed release is current: the instances run the app directory, \
                 there is nothing older to go back to"
                    .into(),
            );
        };
        let names = list_releases(&ctx.state_dir);
        let target = names.iter().rev().find(|n| n.as_str() < current.as_str());
        let shown = target.map_or("the app directory".to_string(), |n| format!("release {n}"));
        self.say(format!("rollback: from release {current} to {shown}"));
        self.switch_to(ctx, target.map(String::as_str))
            .map_err(|e| format!("rollback: {e}; nothing changed"))?;
        let (ok, message) = self.op.restart_all(RestartArgs::default()).await;
        if ok {
            return Ok(format!("rollback done: {shown} serves ({message})"));
        }
        self.say(format!(
            "rollback: {shown} did not serve ({message}); back to release {current}"
        ));
        let back = self.switch_to(ctx, Some(&current));
        let (rolled, rmessage) = match back {
            Ok(()) => self.op.restart_all(RestartArgs::default()).await,
            Err(e) => (false, e.to_string()),
        };
        if rolled {
            Err(format!(
                "rollback failed: {message}; every instance serves release {current} again"
            ))
        } else {
            Err(format!(
                "rollback failed: {message}; returning to release {current} failed too: {rmessage}"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_tree_adds_only_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = (dir.path().join("old"), dir.path().join("new"));
        std::fs::create_dir_all(old.join("chunks/pages")).unwrap();
        std::fs::create_dir_all(new.join("chunks")).unwrap();
        std::fs::write(old.join("chunks/pages/index-1.js"), "old page").unwrap();
        std::fs::write(old.join("chunks/main.js"), "old main").unwrap();
        std::fs::write(new.join("chunks/main.js"), "new main").unwrap();
        assert_eq!(merge_tree(&old, &new).unwrap(), 1);
        let read = |p: &str| std::fs::read_to_string(new.join(p)).unwrap();
        assert_eq!(read("chunks/pages/index-1.js"), "old page");
        assert_eq!(read("chunks/main.js"), "new main");
    }

    #[test]
    fn labels_and_current_switches() {
        assert_eq!(release_label("20240501T123456.789Z-abc1234"), "abc1234");
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path();
        assert_eq!(current_release(state), None);
        for n in ["20240501T000002.000Z-b", "20240501T000001.000Z-a"] {
            std::fs::create_dir_all(releases_dir(state).join(n)).unwrap();
            std::fs::write(built_marker(state, n), "").unwrap();
        }
        std::fs::create_dir_all(releases_dir(state).join("20240501T000003.000Z-c")).unwrap();
        assert_eq!(release_dirs(state, false), ["20240501T000003.000Z-c"]);
        switch_current(state, Some("20240501T000001.000Z-a")).unwrap();
        assert_eq!(
            current_release(state).map(|(_, n)| n),
            Some("20240501T000001.000Z-a".to_string())
        );
        switch_current(state, Some("20240501T000002.000Z-b")).unwrap();
        assert_eq!(
            list_releases(state),
            ["20240501T000001.000Z-a", "20240501T000002.000Z-b"]
        );
        assert_eq!(
            current_release(state).map(|(_, n)| n),
            Some("20240501T000002.000Z-b".to_string())
        );
        switch_current(state, None).unwrap();
        switch_current(state, None).unwrap();
        assert_eq!(current_release(state), None);
    }
}
