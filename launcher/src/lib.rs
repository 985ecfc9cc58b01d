//! The launcher: the one process that runs as root. It reads the config and the TLS key, binds
//! the listeners and the control socket, keeps only the capabilities it still needs, and
//! supervises the unprivileged proxy and fleet workers. It never parses network input.
//!
//! # Layout
//! - [`config`]: the TOML file, validated with key and line in every error.
//! - [`roles`]: who each worker runs as, the capabilities the launcher keeps, the drop.
//! - [`bind`]: listening sockets and the control socket.
//! - [`supervisor`]: the event loop (spawn, connect, respawn, reap, shut down).
//! - [`demo`]: the embedded default configuration of `overwatch demo`.
//! - [`notify`]: systemd notifications.

#![forbid(unsafe_code)]

pub mod bind;
pub mod config;
pub mod demo;
pub mod notify;
pub mod roles;
pub mod supervisor;
pub mod upgrade;

use std::os::fd::OwnedFd;
use std::path::Path;

use protocol::{ListenerSpec, TlsMaterial};

use config::{Accounts, Config, ConfigError};
use supervisor::{Prepared, Supervisor};

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Bind(#[from] bind::BindError),
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("cannot prepare {path}: {source}")]
    StateDir {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Privileges(#[from] roles::PrivError),
    #[error(transparent)]
    Supervise(#[from] supervisor::SuperviseError),
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
}

/// How accounts are handled for a launcher started by the current user.
pub fn accounts_for_current_user() -> Accounts {
    if nix::unistd::geteuid().is_root() {
        Accounts::Switch
    } else {
        Accounts::Inherit
    }
}

/// `overwatch check-config`: the summary of a valid file.
pub fn check_config(path: &Path) -> Result<String, ConfigError> {
    Config::load(path, accounts_for_current_user()).map(|c| c.summary())
}

/// The default certificate and the SNI ones, read as root.
pub fn read_tls(config: &Config) -> Result<(Option<TlsMaterial>, Vec<TlsMaterial>), LaunchError> {
    if config.https.is_empty() {
        return Ok((None, Vec::new()));
    }
    let pair = |cert: &Path, key: &Path| -> Result<TlsMaterial, LaunchError> {
        Ok(TlsMaterial {
            cert_chain_pem: read("certificate", cert)?,
            key_pem: read("private key", key)?,
        })
    };
    let default = pair(&config.cert, &config.key)?;
    let extra = config
        .certificates
        .iter()
        .map(|(c, k)| pair(c, k))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((Some(default), extra))
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, LaunchError> {
    std::fs::read(path).map_err(|source| LaunchError::Read {
        what,
        path: path.display().to_string(),
        source,
    })
}

/// Does everything that needs root: bind, read secrets, create the state directory.
/// Nothing is left behind if it fails: sockets close with the error.
pub fn prepare(config: Config, accounts: Accounts) -> Result<Prepared, LaunchError> {
    let switch_users = accounts == Accounts::Switch;
    let mut inherited = notify::take_listen_fds();
    let mut listeners: Vec<(ListenerSpec, OwnedFd)> = Vec::new();
    for spec in config.listeners() {
        let addr = spec.addr.parse().expect("validated by the config");
        let (fd, bound) = match inherited.remove(&notify::fd_name(&spec)) {
            Some(fd) => {
                let bound = bind::local_addr(&fd).unwrap_or(addr);
                tracing::info!(%bound, "listener taken from systemd (LISTEN_FDS)");
                (fd, bound)
            }
            None => bind::tcp_listener(addr)?,
        };
        listeners.push((
            ListenerSpec {
                kind: spec.kind,
                addr: bound.to_string(),
            },
            fd,
        ));
    }
    let (tls, certificates) = read_tls(&config)?;
    let proxy_settings = config
        .proxy_settings()
        .map_err(|source| LaunchError::Read {
            what: "CA bundle",
            path: format!("{:?}", config.https_ca),
            source,
        })?;
    for dir in [config.state_dir.clone(), config.state_dir.join("logs")] {
        let err = |source| LaunchError::StateDir {
            path: dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(err)?;
        if switch_users {
            std::os::unix::fs::chown(&dir, Some(config.app_user.uid), Some(config.app_user.gid))
                .map_err(err)?;
        }
    }
    let owner = if switch_users {
        Some((
            0,
            config.control_group.as_ref().map(|(_, g)| *g).unwrap_or(0),
        ))
    } else {
        None
    };
    let control = match inherited.remove(notify::CONTROL_FD_NAME) {
        Some(fd) if config.control_socket.exists() => fd,
        _ => bind::control_socket(&config.control_socket, owner)?,
    };
    for (name, fd) in inherited {
        tracing::info!("closing stored descriptor {name}: not in the configuration");
        notify::forget_fd(&name);
        drop(fd);
    }
    notify::store_fds(&listeners, &control);
    Ok(Prepared {
        config,
        switch_users,
        listeners,
        control,
        tls,
        certificates,
        proxy_settings,
        exe_path: std::env::current_exe().unwrap_or_else(|_| "/usr/bin/overwatch".into()),
        resume: None,
    })
}

/// `overwatch run --dry-run`: everything `run` does before it binds or spawns (config, TLS
/// material, the runtime), so an upgrade's preflight exercises the new binary's start.
pub fn dry_run(config: &Config) -> Result<String, LaunchError> {
    let (tls, certificates) = read_tls(config)?;
    config
        .proxy_settings()
        .map_err(|source| LaunchError::Read {
            what: "CA bundle",
            path: format!("{:?}", config.https_ca),
            source,
        })?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(LaunchError::Runtime)?;
    runtime.block_on(async {});
    Ok(format!(
        "dry run: {} listeners, {} certificates, state in {}",
        config.listeners().len(),
        tls.iter().count() + certificates.len(),
        config.state_dir.display()
    ))
}

/// `overwatch run`: prepare, drop privileges, supervise until SIGTERM/SIGINT.
pub fn run(config: Config, accounts: Accounts) -> Result<(), LaunchError> {
    supervise(prepare(config, accounts)?)
}

/// `overwatch run --upgrade-state-fd N`: carry on from the launcher that re-executed us.
pub fn resume(state_fd: i32) -> Result<(), LaunchError> {
    use protocol::fdpass::{adopt_inherited, adopt_inherited_socket};
    let inherited = |what: &'static str, fd: i32, socket: bool| {
        let adopt = if socket {
            adopt_inherited_socket(fd)
        } else {
            adopt_inherited(fd, false)
        };
        adopt.map_err(|source| LaunchError::Read {
            what,
            path: format!("inherited descriptor {fd}"),
            source,
        })
    };
    let memfd = inherited("upgrade state", state_fd, false)?;
    let bytes = upgrade::read_state(memfd).map_err(|source| LaunchError::Read {
        what: "upgrade state",
        path: format!("descriptor {state_fd}"),
        source,
    })?;
    let state: protocol::UpgradeState =
        protocol::frame::decode_exact(&bytes).map_err(|e| LaunchError::Read {
            what: "upgrade state",
            path: format!("descriptor {state_fd}"),
            source: std::io::Error::other(e.to_string()),
        })?;
    // Take every descriptor first, so none leaks whatever happens next.
    let mut listeners = Vec::new();
    for (spec, fd) in &state.listeners {
        listeners.push((spec.clone(), inherited("listener", *fd, true)?));
    }
    let control = inherited("control socket", state.control_fd, true)?;
    let old_proxy = match state.old_proxy {
        Some((pid, fd)) => Some((
            nix::unistd::Pid::from_raw(pid),
            inherited("old proxy channel", fd, true)?,
        )),
        None => None,
    };
    let accounts = if state.switch_users {
        Accounts::Switch
    } else {
        Accounts::Inherit
    };
    let config = Config::load(Path::new(&state.config_path), accounts)?;
    let (tls, certificates) = read_tls(&config)?;
    let proxy_settings = config
        .proxy_settings()
        .map_err(|source| LaunchError::Read {
            what: "CA bundle",
            path: format!("{:?}", config.https_ca),
            source,
        })?;
    tracing::info!(upgrades = state.upgrades, build = %protocol::build_id(), "resumed after upgrade");
    supervise(Prepared {
        config,
        switch_users: state.switch_users,
        listeners,
        control,
        tls,
        certificates,
        proxy_settings,
        exe_path: state.exe_path.into(),
        resume: Some(supervisor::Resume {
            old_proxy,
            fleet_state: state.fleet_state,
            started_unix_ms: state.started_unix_ms,
            upgrades: state.upgrades,
        }),
    })
}

fn supervise(prepared: Prepared) -> Result<(), LaunchError> {
    roles::become_subreaper()?;
    if nix::unistd::geteuid().is_root() {
        roles::drop_launcher_capabilities()?;
        tracing::info!(
            kept = ?roles::LAUNCHER_CAPS.iter().map(|(c, _)| c.to_string()).collect::<Vec<_>>(),
            "capabilities dropped"
        );
    }
    let control_path = prepared.config.control_socket.clone();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(LaunchError::Runtime)?;
    let local = tokio::task::LocalSet::new();
    let result = local.block_on(&runtime, Supervisor::new(prepared).run());
    let _ = std::fs::remove_file(&control_path);
    Ok(result?)
}
