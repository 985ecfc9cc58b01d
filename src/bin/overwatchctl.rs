//! `overwatchctl`: the operator's client for the control socket. Argument parsing, one request,
//! the streamed answer printed as it arrives.
//!
//! Exit codes: 0 done, 1 the operation failed or was refused, 2 usage error, 3 cannot reach
//! Overwatch.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use protocol::ctl::CtlStream;
use protocol::{CtlRequest, CtlResponse, DeployArgs, InstanceStatus, RestartArgs, StatusReport};

const DEFAULT_SOCKET: &str = "/run/overwatch/control.sock";

#[derive(Parser)]
#[command(
    name = "overwatchctl",
    version = env!("CARGO_PKG_VERSION"),
    about = "Drive a running Overwatch over its control socket",
    after_help = "The seed's spelling works too: `restart-all -ssl=2 -http=1 -root=true`.\n\
                  Exit codes: 0 done, 1 failed or refused, 2 usage error, 3 cannot reach Overwatch."
)]
struct Cli {
    /// The control socket.
    #[arg(long, env = "OVERWATCH_SOCKET", default_value = DEFAULT_SOCKET, global = true)]
    socket: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Clone)]
enum Cmd {
    /// Instances, listeners and operations at a glance.
    Status {
        /// Machine-readable output (schema: docs/status-json.md).
        #[arg(long)]
        json: bool,
    },
    /// Rolling restart of every instance, optionally with new counts.
    RestartAll {
        #[command(flatten)]
        counts: Counts,
    },
    /// Pull, build beside the live app, and roll the instances onto the new build.
    Deploy {
        #[command(flatten)]
        counts: Counts,
        #[arg(long, value_name = "true|false")]
        persistent: Option<bool>,
        #[arg(long, value_name = "true|false")]
        delete_old: Option<bool>,
    },
    /// Replace the running Overwatch binary without closing a listener.
    Upgrade {
        #[arg(long)]
        binary: Option<PathBuf>,
    },
    /// Re-read the config and certificates and apply them without downtime.
    Reload,
    /// Switch back to the previous kept release with a rolling restart.
    Rollback,
    /// Show instance logs.
    Logs {
        /// An instance, like `https-0`, `http-1` or `root`; all when omitted.
        instance: Option<String>,
        #[arg(long, short)]
        follow: bool,
        #[arg(long, short = 'n', default_value_t = 50)]
        lines: u32,
    },
    /// Interactive console with line editing and history.
    Console,
    /// Internal: write the man page and shell completions into DIR (packaging/ in the repo).
    #[command(hide = true)]
    Generate { dir: PathBuf },
}

#[derive(clap::Args, Clone)]
struct Counts {
    /// HTTPS instances.
    #[arg(long)]
    ssl: Option<u32>,
    /// HTTP instances.
    #[arg(long)]
    http: Option<u32>,
    /// Whether the root instance runs.
    #[arg(long, value_name = "true|false")]
    root: Option<bool>,
}

impl From<Counts> for RestartArgs {
    fn from(c: Counts) -> Self {
        RestartArgs {
            ssl: c.ssl,
            http: c.http,
            root: c.root,
        }
    }
}

/// Rewrites the seed's single-dash spelling (`-ssl=2`, `-deleteOld=false`) into clap's.
fn normalize(args: impl IntoIterator<Item = String>) -> Vec<String> {
    args.into_iter()
        .map(|arg| {
            let Some(rest) = arg.strip_prefix('-') else {
                return arg;
            };
            if rest.starts_with('-') {
                return arg;
            }
            let Some((name, value)) = rest.split_once('=') else {
                return arg;
            };
            if name.len() < 2 || !name.chars().all(|c| c.is_ascii_alphabetic()) {
                return arg;
            }
            let mut kebab = String::new();
            for c in name.chars() {
                if c.is_ascii_uppercase() {
                    kebab.push('-');
                    kebab.push(c.to_ascii_lowercase());
                } else {
                    kebab.push(c);
                }
            }
            format!("--{kebab}={value}")
        })
        .collect()
}

enum Outcome {
    Done,
    Failed,
    Unreachable,
}

impl Outcome {
    fn code(&self) -> ExitCode {
        match self {
            Outcome::Done => ExitCode::SUCCESS,
            Outcome::Failed => ExitCode::from(1),
            Outcome::Unreachable => ExitCode::from(3),
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse_from(normalize(std::env::args())) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("overwatchctl: {e}");
            return ExitCode::from(1);
        }
    };
    if let Cmd::Console = cli.cmd {
        return console(&runtime, cli.socket);
    }
    if let Cmd::Generate { dir } = &cli.cmd {
        return match generate(dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("overwatchctl: {}: {e}", dir.display());
                ExitCode::from(1)
            }
        };
    }
    runtime.block_on(execute(&cli.socket, cli.cmd)).code()
}

fn request_for(cmd: Cmd) -> Option<(CtlRequest, bool)> {
    Some(match cmd {
        Cmd::Status { json } => (CtlRequest::Status, json),
        Cmd::RestartAll { counts } => (CtlRequest::RestartAll(counts.into()), false),
        Cmd::Deploy {
            counts,
            persistent,
            delete_old,
        } => (
            CtlRequest::Deploy(DeployArgs {
                counts: counts.into(),
                persistent,
                delete_old,
            }),
            false,
        ),
        Cmd::Upgrade { binary } => (
            CtlRequest::Upgrade {
                binary: binary.map(|b| b.to_string_lossy().into_owned()),
            },
            false,
        ),
        Cmd::Reload => (CtlRequest::Reload, false),
        Cmd::Rollback => (CtlRequest::Rollback, false),
        Cmd::Logs {
            instance,
            follow,
            lines,
        } => (
            CtlRequest::Logs {
                instance,
                lines,
                follow,
            },
            false,
        ),
        Cmd::Console | Cmd::Generate { .. } => return None,
    })
}

/// The man page (`overwatchctl.1`) and bash, zsh and fish completions, from the clap
/// definitions, so they never drift from the real interface.
fn generate(dir: &std::path::Path) -> std::io::Result<()> {
    use clap::CommandFactory;
    std::fs::create_dir_all(dir.join("completions"))?;
    let mut cmd = Cli::command();
    let mut man = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut man)?;
    std::fs::write(dir.join("overwatchctl.1"), man)?;
    for (shell, file) in [
        (clap_complete::Shell::Bash, "overwatchctl.bash"),
        (clap_complete::Shell::Zsh, "_overwatchctl"),
        (clap_complete::Shell::Fish, "overwatchctl.fish"),
    ] {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut cmd, "overwatchctl", &mut out);
        std::fs::write(dir.join("completions").join(file), out)?;
    }
    Ok(())
}

/// One `status` request, quietly; `None` if Overwatch cannot be reached or answers otherwise.
async fn fetch_status(socket: &PathBuf) -> Option<StatusReport> {
    let stream = tokio::net::UnixStream::connect(socket).await.ok()?;
    let (mut conn, _) = CtlStream::<CtlRequest, CtlResponse>::handshake(stream)
        .await
        .ok()?;
    conn.send(&CtlRequest::Status).await.ok()?;
    match conn.recv().await {
        Ok(Some(CtlResponse::Status(report))) => Some(report),
        _ => None,
    }
}

/// How long an accepted upgrade may take to show in `status` (new workers up, instances
/// adopted and ready).
const UPGRADE_SETTLE: std::time::Duration = std::time::Duration::from_secs(120);

/// After the launcher accepted an upgrade, waits until the new build answers with every
/// instance ready.
async fn wait_upgraded(socket: &PathBuf, before: u32) -> Outcome {
    let deadline = tokio::time::Instant::now() + UPGRADE_SETTLE;
    while tokio::time::Instant::now() < deadline {
        if let Some(s) = fetch_status(socket).await {
            let ready = s
                .instances
                .iter()
                .all(|i| i.state == protocol::InstanceState::Ready);
            if s.upgrades > before && ready {
                println!(
                    "upgraded: launcher pid {} now runs build {} (upgrade #{}), {} instances ready",
                    s.launcher_pid,
                    s.build,
                    s.upgrades,
                    s.instances.len()
                );
                return Outcome::Done;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    eprintln!("overwatchctl: the upgrade did not complete within {UPGRADE_SETTLE:?}; see `overwatchctl status` and the journal");
    Outcome::Failed
}

async fn execute(socket: &PathBuf, cmd: Cmd) -> Outcome {
    let Some((request, json)) = request_for(cmd) else {
        eprintln!("overwatchctl: console cannot be nested");
        return Outcome::Failed;
    };
    let upgrades_before = match request {
        CtlRequest::Upgrade { .. } => fetch_status(socket).await.map(|s| s.upgrades),
        _ => None,
    };
    let stream = match tokio::net::UnixStream::connect(socket).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "overwatchctl: cannot reach Overwatch at {}: {e}\n\
                 hint: is the service running (systemctl status overwatch)? \
                 Use --socket or OVERWATCH_SOCKET for another path.",
                socket.display()
            );
            return Outcome::Unreachable;
        }
    };
    let mut conn = match CtlStream::<CtlRequest, CtlResponse>::handshake(stream).await {
        Ok((conn, _hello)) => conn,
        Err(e) => {
            eprintln!("overwatchctl: {}: {e}", socket.display());
            return Outcome::Unreachable;
        }
    };
    if let Err(e) = conn.send(&request).await {
        eprintln!("overwatchctl: cannot send the request: {e}");
        return Outcome::Unreachable;
    }
    loop {
        match conn.recv().await {
            Ok(Some(CtlResponse::Progress(line))) | Ok(Some(CtlResponse::Log(line))) => {
                println!("{line}")
            }
            Ok(Some(CtlResponse::Status(report))) => {
                if json {
                    match serde_json::to_string_pretty(&report) {
                        Ok(text) => println!("{text}"),
                        Err(e) => {
                            eprintln!("overwatchctl: {e}");
                            return Outcome::Failed;
                        }
                    }
                } else {
                    print!("{}", render_status(&report));
                }
                return Outcome::Done;
            }
            Ok(Some(CtlResponse::Done { ok, message })) => {
                if ok {
                    if !message.is_empty() {
                        println!("{message}");
                    }
                    if let Some(before) = upgrades_before {
                        return wait_upgraded(socket, before).await;
                    }
                    return Outcome::Done;
                }
                eprintln!("overwatchctl: {message}");
                return Outcome::Failed;
            }
            Ok(Some(CtlResponse::Refused(message))) => {
                eprintln!("overwatchctl: refused: {message}");
                return Outcome::Failed;
            }
            Ok(None) => {
                // An accepted upgrade retires the fleet worker holding this connection; it
                // may go before its answer does. The new build's status tells.
                if let Some(before) = upgrades_before {
                    return wait_upgraded(socket, before).await;
                }
                eprintln!("overwatchctl: Overwatch closed the connection before answering");
                return Outcome::Failed;
            }
            Err(e) => {
                eprintln!("overwatchctl: {e}");
                return Outcome::Failed;
            }
        }
    }
}

/// `2026-12-03 14:05:09 UTC` from Unix seconds (civil-from-days, no time-zone database).
fn utc(unix: u64) -> String {
    let (days, rem) = ((unix / 86_400) as i64, unix % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

fn human_duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

fn render_status(r: &StatusReport) -> String {
    let mut out = String::new();
    let listeners: Vec<String> = r
        .listeners
        .iter()
        .map(|l| format!("{}://{}", serde_plain(&l.kind), l.addr))
        .collect();
    out.push_str(&format!(
        "overwatch {} (build {}), launcher pid {}, up {}\nlisteners: {}\ncounts: {} https, {} http, root {}\n",
        r.version,
        r.build,
        r.launcher_pid,
        human_duration(r.uptime_secs),
        if listeners.is_empty() { "none".into() } else { listeners.join(", ") },
        r.counts.https,
        r.counts.http,
        if r.counts.root { "on" } else { "off" },
    ));
    if r.upgrades > 0 {
        out.push_str(&format!("upgraded in place {} time(s)\n", r.upgrades));
    }
    out.push_str(&format!(
        "release: {}\n",
        r.release.as_deref().unwrap_or("unknown (no deploy yet)")
    ));
    if let Some(d) = &r.last_deploy {
        out.push_str(&format!(
            "last deploy: {} {}{}\n",
            match d.ok {
                Some(true) => "succeeded",
                Some(false) => "FAILED",
                None => "running",
            },
            utc(d.started_unix),
            d.message
                .as_ref()
                .map(|m| format!(": {m}"))
                .unwrap_or_default()
        ));
    }
    if let Some(op) = &r.operation {
        out.push_str(&format!(
            "running: {} since {}\n",
            op.name,
            utc(op.started_unix)
        ));
    }
    if let Some(op) = &r.last_operation {
        out.push_str(&format!(
            "last operation: {} {}{}\n",
            op.name,
            match op.ok {
                Some(true) => "succeeded",
                Some(false) => "FAILED",
                None => "unfinished",
            },
            op.message
                .as_ref()
                .map(|m| format!(": {m}"))
                .unwrap_or_default()
        ));
    }
    out.push('\n');
    out.push_str(&format!(
        "{:<8} {:>5} {:>6} {:>8} {:<9} {:>8} {:>8} {:>9} {:>9}\n",
        "POOL", "INDEX", "PORT", "PID", "STATE", "UPTIME", "RESTARTS", "IN-FLIGHT", "SERVED"
    ));
    for i in &r.instances {
        out.push_str(&render_instance(i));
    }
    out
}

fn render_instance(i: &InstanceStatus) -> String {
    let mut line = format!(
        "{:<8} {:>5} {:>6} {:>8} {:<9} {:>8} {:>8} {:>9} {:>9}\n",
        i.pool.name(),
        i.index,
        i.port,
        i.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
        serde_plain(&i.state),
        human_duration(i.uptime_secs),
        i.restarts,
        i.in_flight,
        i.served,
    );
    if let Some(err) = &i.last_error {
        line.push_str(&format!("         last error: {err}\n"));
    }
    line
}

/// The lowercase name serde gives a unit enum variant.
fn serde_plain<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

fn console(runtime: &tokio::runtime::Runtime, socket: PathBuf) -> ExitCode {
    let mut editor = match rustyline::DefaultEditor::new() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("overwatchctl: cannot start the console: {e}");
            return ExitCode::from(1);
        }
    };
    println!(
        "Overwatch console on {}. Type `help` for commands, `exit` to leave.",
        socket.display()
    );
    loop {
        let line = match editor.readline("overwatch> ") {
            Ok(line) => line,
            Err(rustyline::error::ReadlineError::Interrupted) => continue,
            Err(_) => return ExitCode::SUCCESS,
        };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let _ = editor.add_history_entry(line);
        match line {
            "exit" | "quit" => return ExitCode::SUCCESS,
            "help" | "?" => {
                println!(
                    "commands:\n  status [--json]\n  restart-all [--ssl N] [--http N] [--root true|false]   (or -ssl=N -http=N -root=true)\n  \
                     deploy [--ssl N] [--http N] [--root B] [--persistent B] [--delete-old B]\n  upgrade [--binary PATH]\n  \
                     reload\n  rollback\n  logs [INSTANCE] [--lines N]\n  exit"
                );
                continue;
            }
            _ => {}
        }
        let Some(words) = shlex::split(line) else {
            println!("unbalanced quotes");
            continue;
        };
        let args = normalize(std::iter::once("overwatchctl".to_string()).chain(words));
        match Cli::try_parse_from(args) {
            Ok(Cli {
                cmd: Cmd::Console, ..
            }) => println!("already in the console"),
            Ok(cli) => {
                runtime.block_on(execute(&socket, cli.cmd));
            }
            Err(e) => println!("{}", e.render()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::normalize;

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(super::utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(super::utc(1_796_310_309), "2026-12-03 15:05:09 UTC");
    }

    #[test]
    fn seed_spelling_is_rewritten() {
        let got = normalize(
            [
                "overwatchctl",
                "restart-all",
                "-ssl=2",
                "-http=1",
                "-root=true",
                "-deleteOld=false",
                "-n",
                "--lines=3",
            ]
            .map(String::from),
        );
        assert_eq!(
            got,
            [
                "overwatchctl",
                "restart-all",
                "--ssl=2",
                "--http=1",
                "--root=true",
                "--delete-old=false",
                "-n",
                "--lines=3"
            ]
        );
    }
}
