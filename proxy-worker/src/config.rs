//! The proxy settings from the launcher, parsed once into the form the request path uses.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use protocol::ProxySettings;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("root_allow entry {entry:?} is neither a CIDR network nor an IP address")]
    RootAllow { entry: String },
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
}

/// What the request path needs from [`ProxySettings`].
#[derive(Debug, Clone)]
pub struct Settings {
    /// Lower case, without a trailing dot; empty: no root routing.
    pub root_host: String,
    pub root_allow: Vec<IpNet>,
    pub redirect_http: bool,
    pub https_ca_pem: Option<Vec<u8>>,
    pub drain_timeout: Duration,
    /// Where to serve Prometheus metrics (loopback only).
    pub metrics: Option<SocketAddr>,
}

impl Settings {
    pub fn from_protocol(s: &ProxySettings) -> Result<Self, ConfigError> {
        let root_allow = s
            .root_allow
            .iter()
            .map(|entry| {
                parse_net(entry).ok_or_else(|| ConfigError::RootAllow {
                    entry: entry.clone(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Settings {
            root_host: normalize_host(&s.root_host),
            root_allow,
            redirect_http: s.redirect_http,
            https_ca_pem: s.https_ca_pem.clone(),
            drain_timeout: Duration::from_millis(s.drain_timeout_ms),
            metrics: s
                .metrics
                .as_deref()
                .map(crate::metrics::parse_address)
                .transpose()?,
        })
    }

    /// Whether `host` (already normalized) names the root instance.
    pub fn is_root_host(&self, host: &str) -> bool {
        !self.root_host.is_empty() && host == self.root_host
    }

    /// Whether a client may reach the root instance. IPv4-mapped IPv6 addresses count as IPv4.
    pub fn root_allowed(&self, client: IpAddr) -> bool {
        let client = client.to_canonical();
        self.root_allow.iter().any(|net| net.contains(&client))
    }
}

fn parse_net(entry: &str) -> Option<IpNet> {
    let entry = entry.trim();
    entry
        .parse::<IpNet>()
        .ok()
        .or_else(|| entry.parse::<IpAddr>().ok().map(IpNet::from))
}

/// Lower case, without a trailing dot, so `Root.Localhost.` and `root.localhost` compare equal.
pub fn normalize_host(host: &str) -> String {
    host.trim().trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(allow: &[&str]) -> Settings {
        Settings::from_protocol(&ProxySettings {
            root_host: "Root.Localhost.".into(),
            root_allow: allow.iter().map(|s| s.to_string()).collect(),
            redirect_http: false,
            https_ca_pem: None,
            drain_timeout_ms: 1000,
            metrics: None,
            json_logs: false,
        })
        .unwrap()
    }

    #[test]
    fn root_allow_matches_ipv4_mapped_addresses() {
        let s = settings(&["127.0.0.0/8", "::1"]);
        assert!(s.is_root_host("root.localhost"));
        assert!(s.root_allowed("127.0.0.1".parse().unwrap()));
        assert!(s.root_allowed("::ffff:127.0.0.5".parse().unwrap()));
        assert!(s.root_allowed("::1".parse().unwrap()));
        assert!(!s.root_allowed("10.0.0.1".parse().unwrap()));
        assert!(!s.root_allowed("::ffff:10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn bad_root_allow_is_refused() {
        let err = Settings::from_protocol(&ProxySettings {
            root_host: String::new(),
            root_allow: vec!["nope".into()],
            redirect_http: false,
            https_ca_pem: None,
            drain_timeout_ms: 0,
            metrics: None,
            json_logs: false,
        })
        .unwrap_err();
        assert!(err.to_string().contains("nope"));
    }

    #[test]
    fn empty_root_host_matches_nothing() {
        let mut s = settings(&[]);
        s.root_host.clear();
        assert!(!s.is_root_host(""));
    }
}
