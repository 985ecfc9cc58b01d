//! `overwatch`: the launcher (`run`, `demo`), the config checker, and — internally — the
//! workers and the built-in demo app. Argument parsing and wiring only.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "overwatch",
    version = env!("CARGO_PKG_VERSION"),
    about = "Keeps a web application up on one host: TLS reverse proxy, app instances, zero-downtime restarts"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the launcher (as root under systemd, normally).
    Run {
        #[arg(long, env = "OVERWATCH_CONFIG", default_value = launcher::config::DEFAULT_PATH)]
        config: PathBuf,
        /// Internal: set by a launcher re-executing itself for an upgrade.
        #[arg(long, hide = true)]
        upgrade_state_fd: Option<i32>,
        /// Internal: JSON logs from the start (`[log].format`), set on re-exec.
        #[arg(long, hide = true)]
        log_json: bool,
        /// Go through start-up (config, certificates, runtime) without binding or spawning.
        #[arg(long)]
        dry_run: bool,
    },
    /// Validate a config file and print a summary; exit 0 valid, 1 invalid.
    CheckConfig {
        #[arg(long, env = "OVERWATCH_CONFIG", default_value = launcher::config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Run the embedded default: the built-in demo app behind the proxy. No config, no root.
    Demo {
        /// HTTPS listener.
        #[arg(long, default_value = "127.0.0.1:8443")]
        https: SocketAddr,
        /// HTTP listener.
        #[arg(long, default_value = "127.0.0.1:8080")]
        http: SocketAddr,
        /// Where to keep the certificate, config, logs and control socket.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Print the protocol version and build, for an upgrade's preflight.
    #[command(hide = true)]
    Probe,
    /// Internal: a worker process, started by the launcher.
    #[command(hide = true)]
    Worker {
        role: WorkerRole,
        #[arg(long)]
        channel_fd: i32,
        #[arg(long)]
        launcher_pid: i32,
        #[arg(long)]
        log_json: bool,
    },
    /// Internal: the built-in demo app (reads PORT, OVERWATCH_POOL, OVERWATCH_INSTANCE).
    #[command(hide = true)]
    DemoApp {
        /// Serve TLS with a self-signed certificate even outside the https pool.
        #[arg(long)]
        tls: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum WorkerRole {
    Proxy,
    Fleet,
}

/// Logs go to stderr (the journal under systemd), as text or, with `[log].format = "json"`,
/// one JSON object a line; `RUST_LOG` filters them.
fn init_logging(role: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(true);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    tracing::debug!("{role} logging started");
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("overwatch: {message}");
    ExitCode::from(1)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Probe => {
            println!(
                "protocol={}\nbuild={}",
                protocol::PROTOCOL_VERSION,
                protocol::build_id()
            );
            ExitCode::SUCCESS
        }
        Cmd::CheckConfig { config } => match launcher::check_config(&config) {
            Ok(summary) => {
                println!("{summary}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        Cmd::Run {
            upgrade_state_fd: Some(fd),
            log_json,
            ..
        } => {
            init_logging("launcher", log_json);
            match launcher::resume(fd) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        Cmd::Run {
            config, dry_run, ..
        } => {
            let accounts = launcher::accounts_for_current_user();
            let config = match launcher::config::Config::load(&config, accounts) {
                Ok(c) => c,
                Err(e) => return fail(format!("invalid configuration: {e}")),
            };
            if dry_run {
                return match launcher::dry_run(&config) {
                    Ok(summary) => {
                        println!("{summary}");
                        ExitCode::SUCCESS
                    }
                    Err(e) => fail(e),
                };
            }
            init_logging("launcher", config.log.json);
            if accounts == launcher::config::Accounts::Inherit {
                tracing::warn!("not started as root: workers run as the current user");
            }
            match launcher::run(config, accounts) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        Cmd::Demo { https, http, dir } => {
            init_logging("launcher", false);
            run_demo(https, http, dir.unwrap_or_else(launcher::demo::default_dir))
        }
        Cmd::Worker {
            role,
            channel_fd,
            launcher_pid,
            log_json,
        } => {
            let name = match role {
                WorkerRole::Proxy => "proxy",
                WorkerRole::Fleet => "fleet",
            };
            init_logging(name, log_json);
            if let Err(e) = launcher::roles::enter_worker(launcher_pid) {
                return fail(format!("{name} worker: {e}"));
            }
            match run_worker(role, channel_fd) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(format!("{name} worker: {e:#}")),
            }
        }
        Cmd::DemoApp { tls } => {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => return fail(e),
            };
            match runtime.block_on(demo_app::run(tls)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(format!("demo app: {e}")),
            }
        }
    }
}

fn run_worker(role: WorkerRole, channel_fd: i32) -> anyhow::Result<()> {
    let fd = protocol::fdpass::adopt_inherited_socket(channel_fd)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match role {
            WorkerRole::Proxy => proxy_worker::run(protocol::Channel::new(fd)?).await?,
            WorkerRole::Fleet => fleet_worker::run(protocol::Channel::new(fd)?).await?,
        }
        Ok(())
    })
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn run_demo(https: SocketAddr, http: SocketAddr, dir: PathBuf) -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => return fail(format!("cannot find my own executable: {e}")),
    };
    let opts = launcher::demo::DemoOptions {
        https,
        http,
        dir: dir.clone(),
        app_command: format!("exec {} demo-app", shell_quote(&exe.to_string_lossy())),
    };
    let config_path = match launcher::demo::write(&opts) {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    let accounts = launcher::config::Accounts::Inherit;
    if launcher::accounts_for_current_user() == launcher::config::Accounts::Switch {
        tracing::warn!(
            "the demo runs everything as the user that starts it: as root, the workers drop every \
             capability but keep uid 0; run it as a normal user, or `overwatch run` with a config"
        );
    }
    let config = match launcher::config::Config::load(&config_path, accounts) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let socket = config.control_socket.clone();
    println!(
        "Overwatch demo: 2 https + 2 http instances of the built-in demo app, and a root instance.\n\
         \n  https://{https}/    (self-signed certificate: curl -k)\n  http://{http}/\n  \
         root instance: curl -H 'Host: root.localhost' http://{http}/   (from this host only)\n\
         \n  overwatchctl --socket {sock} status\n  overwatchctl --socket {sock} restart-all --ssl 3 --http 1\n\
         \nfiles in {dir}; Ctrl-C stops everything.",
        sock = socket.display(),
        dir = dir.display(),
    );
    match launcher::run(config, accounts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}
