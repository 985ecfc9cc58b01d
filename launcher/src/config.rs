//! The configuration file: parsed strictly (unknown keys are errors), validated, and turned
//! into the settings each worker receives. Every error names the key and its line.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer};
use toml::Spanned;

use protocol::{
    AppSettings, DeploySettings, HealthSettings, ListenerKind, ListenerSpec, LogSettings,
    PoolSettings, ProxySettings,
};

/// The default path of `overwatch run` and `check-config`.
pub const DEFAULT_PATH: &str = "/etc/overwatch/overwatch.toml";

/// A config problem: which key, on which line, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub key: Option<String>,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": key `{key}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text).map_err(|e| {
        serde::de::Error::custom(format!(
            "invalid duration {text:?}: {e} (write it like \"500ms\", \"10s\" or \"2m\")"
        ))
    })
}

fn addresses<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SocketAddr>, D::Error> {
    let list = Vec::<String>::deserialize(d)?;
    list.iter()
        .map(|text| {
            text.parse().map_err(|_| {
                serde::de::Error::custom(format!(
                    "invalid listen address {text:?} (expected IP:PORT, like \"0.0.0.0:443\" or \"[::]:443\")"
                ))
            })
        })
        .collect()
}

fn networks<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
    let list = Vec::<String>::deserialize(d)?;
    list.iter()
        .map(|text| {
            text.parse::<IpNet>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    serde::de::Error::custom(format!(
                        "invalid network {text:?} (expected CIDR, like \"127.0.0.0/8\")"
                    ))
                })
        })
        .collect()
}

fn port_range<'de, D: Deserializer<'de>>(d: D) -> Result<(u16, u16), D::Error> {
    let text = String::deserialize(d)?;
    let bad = || {
        serde::de::Error::custom(format!(
            "invalid port range {text:?} (expected \"FIRST-LAST\", like \"3000-3999\")"
        ))
    };
    let (a, b) = text.split_once('-').ok_or_else(bad)?;
    let a: u16 = a.trim().parse().map_err(|_| bad())?;
    let b: u16 = b.trim().parse().map_err(|_| bad())?;
    if a == 0 || a > b {
        return Err(bad());
    }
    Ok((a, b))
}

fn d_secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    overwatch: RawOverwatch,
    #[serde(default)]
    proxy: RawProxy,
    #[serde(default)]
    app: RawApp,
    #[serde(default)]
    health: RawHealth,
    #[serde(default)]
    deploy: RawDeploy,
    #[serde(default)]
    log: RawLog,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawOverwatch {
    user: Spanned<String>,
    group: Spanned<String>,
    control_socket: String,
    state_dir: String,
}

impl Default for RawOverwatch {
    fn default() -> Self {
        RawOverwatch {
            user: Spanned::new(0..0, "overwatch".into()),
            group: Spanned::new(0..0, "overwatch".into()),
            control_socket: "/run/overwatch/control.sock".into(),
            state_dir: "/var/lib/overwatch".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawProxy {
    #[serde(deserialize_with = "addresses")]
    https: Vec<SocketAddr>,
    #[serde(deserialize_with = "addresses")]
    http: Vec<SocketAddr>,
    cert: Spanned<String>,
    key: Spanned<String>,
    redirect_http: bool,
    root_host: String,
    #[serde(deserialize_with = "networks")]
    root_allow: Vec<IpNet>,
    /// More certificates, chosen by SNI.
    certificates: Vec<RawCertificate>,
    /// Loopback address for Prometheus metrics.
    metrics: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCertificate {
    cert: Spanned<String>,
    key: Spanned<String>,
}

impl Default for RawProxy {
    fn default() -> Self {
        RawProxy {
            https: vec!["0.0.0.0:443".parse().unwrap(), "[::]:443".parse().unwrap()],
            http: vec!["0.0.0.0:80".parse().unwrap(), "[::]:80".parse().unwrap()],
            cert: Spanned::new(0..0, "/etc/overwatch/tls/fullchain.pem".into()),
            key: Spanned::new(0..0, "/etc/overwatch/tls/privkey.pem".into()),
            redirect_http: false,
            root_host: "root.localhost".into(),
            root_allow: vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()],
            certificates: Vec::new(),
            metrics: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawPool {
    count: u32,
    command: String,
    backup: Option<String>,
    ca: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawRoot {
    enabled: bool,
    command: String,
    backup: Option<String>,
}

impl Default for RawRoot {
    fn default() -> Self {
        RawRoot {
            enabled: false,
            command: "pnpm dev".into(),
            backup: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawBackup {
    command: Option<String>,
}

impl Default for RawBackup {
    fn default() -> Self {
        RawBackup {
            command: Some("pnpm dev".into()),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawApp {
    dir: Spanned<String>,
    user: Spanned<String>,
    #[serde(deserialize_with = "port_range")]
    ports: (u16, u16),
    env: BTreeMap<String, String>,
    https: RawPool,
    http: RawPool,
    root: RawRoot,
    backup: RawBackup,
}

impl Default for RawApp {
    fn default() -> Self {
        RawApp {
            dir: Spanned::new(0..0, "/srv/app".into()),
            user: Spanned::new(0..0, "overwatch".into()),
            ports: (3000, 3999),
            env: BTreeMap::from([("NODE_ENV".into(), "production".into())]),
            https: RawPool {
                count: 2,
                command: "pnpm start:https".into(),
                backup: None,
                ca: None,
            },
            http: RawPool {
                count: 2,
                command: "pnpm start".into(),
                backup: None,
                ca: None,
            },
            root: RawRoot::default(),
            backup: RawBackup::default(),
        }
    }
}

impl Default for RawPool {
    fn default() -> Self {
        RawPool {
            count: 1,
            command: String::new(),
            backup: None,
            ca: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawHealth {
    path: String,
    #[serde(deserialize_with = "duration")]
    interval: Duration,
    #[serde(deserialize_with = "duration")]
    ready_timeout: Duration,
    #[serde(deserialize_with = "duration")]
    drain_timeout: Duration,
    #[serde(deserialize_with = "duration")]
    stop_timeout: Duration,
}

impl Default for RawHealth {
    fn default() -> Self {
        RawHealth {
            path: "/".into(),
            interval: d_secs(1),
            ready_timeout: d_secs(60),
            drain_timeout: d_secs(30),
            stop_timeout: d_secs(10),
        }
    }
}

/// `[deploy]` as written.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RawDeploy {
    pub build_dir: String,
    pub backup_dir: String,
    pub pull: String,
    pub build: String,
    pub install: String,
    pub persistent: bool,
    pub delete_old: bool,
    pub keep: u32,
}

impl Default for RawDeploy {
    fn default() -> Self {
        RawDeploy {
            build_dir: ".next".into(),
            backup_dir: "backup".into(),
            pull: "git pull --ff-only".into(),
            build: "pnpm build".into(),
            install: "pnpm install".into(),
            persistent: false,
            delete_old: true,
            keep: 5,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RawLog {
    pub format: LogFormat,
    pub level: String,
    pub max_size: u64,
    pub keep: u32,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            format: LogFormat::Text,
            level: "info".into(),
            max_size: 10 << 20,
            keep: 5,
        }
    }
}

/// A user the workers switch to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub proxy_user: Account,
    pub app_user: Account,
    /// The control-socket group, when it exists on this host.
    pub control_group: Option<(String, u32)>,
    pub control_socket: PathBuf,
    pub state_dir: PathBuf,
    pub https: Vec<SocketAddr>,
    pub http: Vec<SocketAddr>,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub redirect_http: bool,
    pub root_host: String,
    pub root_allow: Vec<IpNet>,
    pub https_ca: Option<PathBuf>,
    /// `[[proxy.certificates]]`: (certificate chain, key) pairs chosen by SNI.
    pub certificates: Vec<(PathBuf, PathBuf)>,
    pub metrics: Option<SocketAddr>,
    pub app: AppSettings,
    pub health: HealthSettings,
    pub deploy: DeploySettings,
    pub log: LogSettings,
}

/// How strictly accounts are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accounts {
    /// Users must exist and must not be root (a launcher started as root).
    Switch,
    /// Workers run as whoever runs the launcher (`demo`, or a launcher not started as root).
    Inherit,
}

impl Config {
    /// Reads, parses and validates `path`.
    pub fn load(path: &Path, accounts: Accounts) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            key: None,
            line: None,
            message: format!("cannot read: {e}"),
        })?;
        Config::parse(path, &text, accounts)
    }

    /// Parses and validates `text`, read from `path` (relative paths are relative to it).
    pub fn parse(path: &Path, text: &str, accounts: Accounts) -> Result<Config, ConfigError> {
        let locate = Locator { path, text };
        let raw: RawConfig = toml::from_str(text).map_err(|e| locate.toml_error(&e))?;
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let resolve = |p: &str| -> PathBuf {
            let p = Path::new(p);
            if p.is_absolute() {
                p.to_owned()
            } else {
                base.join(p)
            }
        };

        let proxy_user = account(&raw.overwatch.user, "overwatch.user", accounts, &locate)?;
        let app_user = account(&raw.app.user, "app.user", accounts, &locate)?;
        let group_name = raw.overwatch.group.get_ref().clone();
        let control_group = match nix::unistd::Group::from_name(&group_name) {
            Ok(Some(g)) => Some((group_name, g.gid.as_raw())),
            Ok(None) if accounts == Accounts::Inherit => None,
            Ok(None) => {
                return Err(locate.at(
                    &raw.overwatch.group,
                    "overwatch.group",
                    format!("unknown group {group_name:?} (create it, e.g. with systemd-sysusers)"),
                ))
            }
            Err(e) => {
                return Err(locate.at(
                    &raw.overwatch.group,
                    "overwatch.group",
                    format!("cannot look up group {group_name:?}: {e}"),
                ))
            }
        };

        let cert = resolve(raw.proxy.cert.get_ref());
        let key = resolve(raw.proxy.key.get_ref());
        if !raw.proxy.https.is_empty() {
            check_pem(&cert, PemKind::Certificates)
                .map_err(|m| locate.at(&raw.proxy.cert, "proxy.cert", m))?;
            check_pem(&key, PemKind::Key).map_err(|m| locate.at(&raw.proxy.key, "proxy.key", m))?;
        }
        let https_ca = match &raw.app.https.ca {
            Some(ca) => {
                let p = resolve(ca.get_ref());
                check_pem(&p, PemKind::Certificates)
                    .map_err(|m| locate.at(ca, "app.https.ca", m))?;
                Some(p)
            }
            None => None,
        };

        let mut certificates = Vec::new();
        for (i, c) in raw.proxy.certificates.iter().enumerate() {
            let (cert, key) = (resolve(c.cert.get_ref()), resolve(c.key.get_ref()));
            check_pem(&cert, PemKind::Certificates)
                .map_err(|m| locate.at(&c.cert, &format!("proxy.certificates[{i}].cert"), m))?;
            check_pem(&key, PemKind::Key)
                .map_err(|m| locate.at(&c.key, &format!("proxy.certificates[{i}].key"), m))?;
            certificates.push((cert, key));
        }
        let metrics = match &raw.proxy.metrics {
            Some(text) => {
                let addr: SocketAddr = text.get_ref().parse().map_err(|_| {
                    locate.at(
                        text,
                        "proxy.metrics",
                        format!("invalid address {:?} (expected IP:PORT)", text.get_ref()),
                    )
                })?;
                if !addr.ip().is_loopback() {
                    return Err(locate.at(
                        text,
                        "proxy.metrics",
                        format!(
                            "{addr} is not a loopback address; metrics are served on loopback only"
                        ),
                    ));
                }
                Some(addr)
            }
            None => None,
        };

        let app_dir = resolve(raw.app.dir.get_ref());
        if !app_dir.is_dir() {
            return Err(locate.at(
                &raw.app.dir,
                "app.dir",
                format!("{} is not a directory", app_dir.display()),
            ));
        }
        let (port_min, port_max) = raw.app.ports;
        let needed = raw.app.https.count as u64
            + raw.app.http.count as u64
            + raw.app.root.enabled as u64
            + 1;
        let available = (port_max - port_min) as u64 + 1;
        if available < needed {
            return Err(locate.key_error(
                "app.ports",
                format!(
                    "{port_min}-{port_max} holds {available} ports; {} instances need at least {needed} (one spare for rolling restarts)",
                    needed - 1
                ),
            ));
        }
        for (pool, p) in [("https", &raw.app.https), ("http", &raw.app.http)] {
            if p.count > 0 && p.command.trim().is_empty() {
                return Err(locate.key_error(
                    &format!("app.{pool}.command"),
                    format!("[app.{pool}] has count = {} but no command", p.count),
                ));
            }
        }
        if !raw.health.path.starts_with('/') {
            return Err(locate.key_error("health.path", "must start with '/'".into()));
        }
        if raw.health.interval.is_zero() {
            return Err(locate.key_error("health.interval", "must be greater than zero".into()));
        }

        let default_backup = raw
            .app
            .backup
            .command
            .clone()
            .filter(|c| !c.trim().is_empty());
        let pool = |p: &RawPool| PoolSettings {
            count: p.count,
            command: p.command.clone(),
            backup: p.backup.clone().or_else(|| default_backup.clone()),
        };
        let app = AppSettings {
            dir: app_dir.to_string_lossy().into_owned(),
            port_min,
            port_max,
            env: raw.app.env.clone().into_iter().collect(),
            https: pool(&raw.app.https),
            http: pool(&raw.app.http),
            root_enabled: raw.app.root.enabled,
            root: PoolSettings {
                count: raw.app.root.enabled as u32,
                command: raw.app.root.command.clone(),
                backup: raw
                    .app
                    .root
                    .backup
                    .clone()
                    .or_else(|| default_backup.clone()),
            },
        };
        let ms = |d: Duration| d.as_millis().min(u64::MAX as u128) as u64;
        let health = HealthSettings {
            path: raw.health.path.clone(),
            interval_ms: ms(raw.health.interval),
            ready_timeout_ms: ms(raw.health.ready_timeout),
            drain_timeout_ms: ms(raw.health.drain_timeout),
            stop_timeout_ms: ms(raw.health.stop_timeout),
        };
        let state_dir = resolve(&raw.overwatch.state_dir);
        let deploy = DeploySettings {
            build_dir: raw.deploy.build_dir.clone(),
            backup_dir: state_dir
                .join(&raw.deploy.backup_dir)
                .to_string_lossy()
                .into_owned(),
            pull: raw.deploy.pull.clone(),
            build: raw.deploy.build.clone(),
            install: raw.deploy.install.clone(),
            persistent: raw.deploy.persistent,
            delete_old: raw.deploy.delete_old,
            keep: raw.deploy.keep,
        };
        let log = LogSettings {
            json: raw.log.format == LogFormat::Json,
            max_size: raw.log.max_size,
            keep: raw.log.keep,
        };
        Ok(Config {
            path: path.to_owned(),
            proxy_user,
            app_user,
            control_group,
            control_socket: resolve(&raw.overwatch.control_socket),
            state_dir,
            https: raw.proxy.https,
            http: raw.proxy.http,
            cert,
            key,
            redirect_http: raw.proxy.redirect_http,
            root_host: raw.proxy.root_host.to_ascii_lowercase(),
            root_allow: raw.proxy.root_allow,
            https_ca,
            certificates,
            metrics,
            app,
            health,
            deploy,
            log,
        })
    }

    /// The listener manifest, in binding order: https first, then http.
    pub fn listeners(&self) -> Vec<ListenerSpec> {
        let https = self.https.iter().map(|a| ListenerSpec {
            kind: ListenerKind::Https,
            addr: a.to_string(),
        });
        let http = self.http.iter().map(|a| ListenerSpec {
            kind: ListenerKind::Http,
            addr: a.to_string(),
        });
        https.chain(http).collect()
    }

    pub fn proxy_settings(&self) -> Result<ProxySettings, std::io::Error> {
        let https_ca_pem = match &self.https_ca {
            Some(p) => Some(std::fs::read(p)?),
            None => None,
        };
        Ok(ProxySettings {
            root_host: self.root_host.clone(),
            root_allow: self.root_allow.iter().map(|n| n.to_string()).collect(),
            redirect_http: self.redirect_http,
            https_ca_pem,
            drain_timeout_ms: self.health.drain_timeout_ms,
            metrics: self.metrics.map(|a| a.to_string()),
            json_logs: self.log.json,
        })
    }

    /// The few lines `check-config` prints for a valid file.
    pub fn summary(&self) -> String {
        let addrs = |v: &[SocketAddr]| {
            if v.is_empty() {
                "none".to_string()
            } else {
                v.iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        format!(
            "{path}: valid\n\
             listeners: https {https}; http {http}\n\
             instances: {hs} https, {h} http, root {root} (ports {pmin}-{pmax}) in {dir}\n\
             users: proxy worker {pu}, fleet worker and app {au}; control socket {sock}\n\
             state: {state}",
            path = self.path.display(),
            https = addrs(&self.https),
            http = addrs(&self.http),
            hs = self.app.https.count,
            h = self.app.http.count,
            root = if self.app.root_enabled { "on" } else { "off" },
            pmin = self.app.port_min,
            pmax = self.app.port_max,
            dir = self.app.dir,
            pu = self.proxy_user.name,
            au = self.app_user.name,
            sock = self.control_socket.display(),
            state = self.state_dir.display(),
        )
    }
}

fn account(
    name: &Spanned<String>,
    key: &str,
    accounts: Accounts,
    locate: &Locator<'_>,
) -> Result<Account, ConfigError> {
    if accounts == Accounts::Inherit {
        let uid = nix::unistd::geteuid();
        let user = nix::unistd::User::from_uid(uid).ok().flatten();
        return Ok(Account {
            name: user.map(|u| u.name).unwrap_or_else(|| uid.to_string()),
            uid: uid.as_raw(),
            gid: nix::unistd::getegid().as_raw(),
        });
    }
    match nix::unistd::User::from_name(name.get_ref()) {
        Ok(Some(u)) if u.uid.is_root() => Err(locate.at(
            name,
            key,
            format!(
                "{:?} is root; workers must run unprivileged",
                name.get_ref()
            ),
        )),
        Ok(Some(u)) => Ok(Account {
            name: u.name,
            uid: u.uid.as_raw(),
            gid: u.gid.as_raw(),
        }),
        Ok(None) => Err(locate.at(
            name,
            key,
            format!(
                "unknown user {:?} (create it, e.g. with systemd-sysusers or useradd --system)",
                name.get_ref()
            ),
        )),
        Err(e) => Err(locate.at(name, key, format!("cannot look up user: {e}"))),
    }
}

enum PemKind {
    Certificates,
    Key,
}

fn check_pem(path: &Path, kind: PemKind) -> Result<(), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut reader = &bytes[..];
    match kind {
        PemKind::Certificates => {
            let certs: Result<Vec<_>, _> = rustls_pemfile::certs(&mut reader).collect();
            match certs {
                Ok(c) if !c.is_empty() => Ok(()),
                Ok(_) => Err(format!("{} holds no PEM certificate", path.display())),
                Err(e) => Err(format!("{}: bad PEM: {e}", path.display())),
            }
        }
        PemKind::Key => match rustls_pemfile::private_key(&mut reader) {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(format!("{} holds no PEM private key", path.display())),
            Err(e) => Err(format!("{}: bad PEM: {e}", path.display())),
        },
    }
}

/// Turns byte offsets into lines and dotted keys, for messages.
struct Locator<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Locator<'_> {
    fn line_of(&self, offset: usize) -> usize {
        self.text[..offset.min(self.text.len())]
            .bytes()
            .filter(|b| *b == b'\n')
            .count()
            + 1
    }

    /// The dotted key written on the line holding `offset`, with its table.
    fn key_at(&self, offset: usize) -> Option<String> {
        let line_no = self.line_of(offset);
        let mut table = String::new();
        let mut key = None;
        for (i, line) in self.text.lines().enumerate() {
            let l = line.trim();
            if i + 1 > line_no {
                break;
            }
            if l.starts_with('[') {
                table = l.trim_matches(|c| c == '[' || c == ']').trim().to_string();
                key = None;
            }
            if i + 1 == line_no {
                if let Some((k, _)) = l.split_once('=') {
                    key = Some(k.trim().trim_matches('"').to_string());
                } else if !l.starts_with('[') && !l.is_empty() {
                    key = Some(l.trim_end_matches(',').trim().to_string());
                }
            }
        }
        match key {
            Some(k) if table.is_empty() => Some(k),
            Some(k) => Some(format!("{table}.{k}")),
            None if !table.is_empty() => Some(table),
            None => None,
        }
    }

    fn toml_error(&self, e: &toml::de::Error) -> ConfigError {
        let offset = e.span().map(|s| s.start);
        let mut message = e.message().trim().to_string();
        if message.starts_with("unknown field") {
            message.push_str(" (see packaging/overwatch.example.toml for every key)");
        }
        ConfigError {
            file: self.path.to_owned(),
            key: offset.and_then(|o| self.key_at(o)),
            line: offset.map(|o| self.line_of(o)),
            message,
        }
    }

    fn at<T>(&self, spanned: &Spanned<T>, key: &str, message: String) -> ConfigError {
        let span = spanned.span();
        // Defaults carry an empty span at 0: no line to point at.
        let line = (span != (0..0)).then(|| self.line_of(span.start));
        ConfigError {
            file: self.path.to_owned(),
            key: Some(key.to_string()),
            line,
            message,
        }
    }

    /// An error for a key whose value carries no span: find its line by name.
    fn key_error(&self, key: &str, message: String) -> ConfigError {
        let (table, leaf) = key.rsplit_once('.').unwrap_or(("", key));
        let mut current = String::new();
        let mut line = None;
        for (i, l) in self.text.lines().enumerate() {
            let l = l.trim();
            if l.starts_with('[') {
                current = l.trim_matches(|c| c == '[' || c == ']').trim().to_string();
            } else if current == table {
                if let Some((k, _)) = l.split_once('=') {
                    if k.trim() == leaf {
                        line = Some(i + 1);
                    }
                }
            }
        }
        ConfigError {
            file: self.path.to_owned(),
            key: Some(key.to_string()),
            line,
            message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let dir = std::env::temp_dir();
        Config::parse(&dir.join("t.toml"), text, Accounts::Inherit)
    }

    const MINIMAL: &str = "[proxy]\nhttps = []\nhttp = [\"127.0.0.1:0\"]\n[app]\ndir = \".\"\nports = \"3000-3010\"\n";

    #[test]
    fn minimal_is_valid() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.app.https.count, 2);
        assert_eq!(c.health.drain_timeout_ms, 30_000);
        assert_eq!(c.app.https.backup.as_deref(), Some("pnpm dev"));
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let e = parse(&format!("{MINIMAL}[health]\npath = \"/\"\nbogus = 1\n")).unwrap_err();
        assert_eq!(e.line, Some(9), "{e}");
        assert_eq!(e.key.as_deref(), Some("health.bogus"), "{e}");
        assert!(e.message.contains("unknown field"), "{e}");
    }

    #[test]
    fn bad_duration() {
        let e = parse(&format!("{MINIMAL}[health]\ninterval = \"soon\"\n")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("health.interval"), "{e}");
        assert_eq!(e.line, Some(8));
        assert!(e.message.contains("invalid duration"), "{e}");
    }

    #[test]
    fn bad_address() {
        let e = parse("[proxy]\nhttps = []\nhttp = [\"nowhere:80\"]\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("proxy.http"), "{e}");
        assert_eq!(e.line, Some(3));
    }

    #[test]
    fn count_not_a_number() {
        let e = parse(&format!(
            "{MINIMAL}[app.http]\ncount = \"two\"\ncommand = \"x\"\n"
        ))
        .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("app.http.count"), "{e}");
        assert_eq!(e.line, Some(8));
    }

    #[test]
    fn port_range_too_small() {
        let text = "[proxy]\nhttps = []\nhttp = []\n[app]\ndir = \".\"\nports = \"3000-3003\"\n";
        let e = parse(text).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("app.ports"), "{e}");
        assert_eq!(e.line, Some(6));
    }

    #[test]
    fn missing_certificate() {
        let e = parse("[proxy]\nhttps = [\"127.0.0.1:0\"]\ncert = \"/nonexistent/cert.pem\"\n")
            .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("proxy.cert"), "{e}");
        assert_eq!(e.line, Some(3));
    }

    #[test]
    fn unknown_user_when_switching() {
        let e = Config::parse(
            Path::new("/tmp/t.toml"),
            "[overwatch]\nuser = \"no-such-user-xyz\"\n",
            Accounts::Switch,
        )
        .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("overwatch.user"), "{e}");
        assert_eq!(e.line, Some(2));
    }

    #[test]
    fn root_user_is_refused() {
        let e = Config::parse(
            Path::new("/tmp/t.toml"),
            "[overwatch]\nuser = \"nobody\"\ngroup = \"nogroup\"\n[app]\nuser = \"root\"\n",
            Accounts::Switch,
        )
        .unwrap_err();
        assert!(e.message.contains("root"), "{e}");
    }
}
