//! `overwatch demo`: the embedded default. A self-signed certificate, the built-in demo app as
//! every instance, everything under one directory the current user owns. No config, no Node,
//! no root.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Where `overwatch demo` keeps its files, unless told otherwise.
pub fn default_dir() -> PathBuf {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    base.join(format!("overwatch-demo-{}", nix::unistd::geteuid()))
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot generate a certificate: {0}")]
    Cert(String),
}

pub struct DemoOptions {
    pub https: SocketAddr,
    pub http: SocketAddr,
    pub dir: PathBuf,
    /// The command every instance runs (the demo app of this very binary).
    pub app_command: String,
}

/// Writes a certificate, a key and a config into `opts.dir`; returns the config's path.
pub fn write(opts: &DemoOptions) -> Result<PathBuf, DemoError> {
    let write = |path: &Path, bytes: &[u8]| {
        std::fs::write(path, bytes).map_err(|source| DemoError::Write {
            path: path.to_owned(),
            source,
        })
    };
    std::fs::create_dir_all(opts.dir.join("state")).map_err(|source| DemoError::Write {
        path: opts.dir.clone(),
        source,
    })?;
    let cert = rcgen::generate_simple_self_signed(vec![
        "localhost".into(),
        "127.0.0.1".into(),
        "root.localhost".into(),
    ])
    .map_err(|e| DemoError::Cert(e.to_string()))?;
    write(&opts.dir.join("cert.pem"), cert.cert.pem().as_bytes())?;
    write(
        &opts.dir.join("key.pem"),
        cert.key_pair.serialize_pem().as_bytes(),
    )?;
    let config = format!(
        r#"# Written by `overwatch demo`; every instance is the built-in demo app.
[overwatch]
control_socket = "control.sock"
state_dir = "state"

[proxy]
https = ["{https}"]
http = ["{http}"]
cert = "cert.pem"
key = "key.pem"
root_host = "root.localhost"

[app]
dir = "."
ports = "13100-13199"
env = {{ OVERWATCH_DEMO = "1" }}

[app.https]
count = 2
command = "{cmd}"

[app.http]
count = 2
command = "{cmd}"

[app.root]
enabled = true
command = "{cmd}"

[app.backup]
command = "{cmd}"

[health]
path = "/health"
interval = "1s"
ready_timeout = "10s"
drain_timeout = "5s"
stop_timeout = "3s"
"#,
        https = opts.https,
        http = opts.http,
        cmd = opts.app_command.replace('\\', "\\\\").replace('"', "\\\""),
    );
    let path = opts.dir.join("overwatch.toml");
    write(&path, config.as_bytes())?;
    Ok(path)
}
