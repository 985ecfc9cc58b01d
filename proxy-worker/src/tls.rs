//! TLS configuration: the server side for clients (certificate from the launcher, TLS 1.2/1.3,
//! ALPN h2 + http/1.1) and the client side for HTTPS instances on loopback.

use std::collections::HashMap;
use std::sync::Arc;

use protocol::TlsMaterial;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig};

static VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what}: cannot read PEM: {source}")]
    Pem {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{what}: no {item} found in the PEM data")]
    Missing {
        what: &'static str,
        item: &'static str,
    },
    #[error("{what}: {source}")]
    Rustls {
        what: &'static str,
        source: rustls::Error,
    },
    #[error(
        "[[proxy.certificates]] entry {index}: the certificate names no DNS name (subjectAltName)"
    )]
    NoNames { index: usize },
    #[error("https instance CA: {0}")]
    Verifier(#[from] rustls::client::VerifierBuilderError),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(pem: &[u8], what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem { what, source })?;
    if certs.is_empty() {
        return Err(TlsError::Missing {
            what,
            item: "certificate",
        });
    }
    Ok(certs)
}

fn certified_key(tls: &TlsMaterial, what: &'static str) -> Result<CertifiedKey, TlsError> {
    let chain = certs(&tls.cert_chain_pem, what)?;
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut &tls.key_pem[..])
        .map_err(|source| TlsError::Pem { what, source })?
        .ok_or(TlsError::Missing {
            what,
            item: "private key",
        })?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|source| TlsError::Rustls { what, source })?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|source| TlsError::Rustls { what, source })?;
    Ok(certified)
}

/// The server configuration for the https listeners: `default` for clients that send no
/// server name or one no certificate holds; each of `more` for the DNS names in its leaf
/// certificate (wildcards `*.example.com` match one label).
pub fn server_config(
    default: &TlsMaterial,
    more: &[TlsMaterial],
) -> Result<Arc<ServerConfig>, TlsError> {
    let what = "proxy certificate";
    let mut resolver = SniResolver {
        default: Arc::new(certified_key(default, what)?),
        exact: HashMap::new(),
        wildcard: HashMap::new(),
    };
    for (index, material) in more.iter().enumerate() {
        let what = "[[proxy.certificates]] entry";
        let key = Arc::new(certified_key(material, what)?);
        let names = dns_names(&key.cert[0]);
        if names.is_empty() {
            return Err(TlsError::NoNames { index });
        }
        for name in names {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            // The first certificate naming a host wins, as in the configuration's order.
            match name.strip_prefix("*.") {
                Some(parent) => resolver.wildcard.entry(parent.to_owned()),
                None => resolver.exact.entry(name),
            }
            .or_insert_with(|| key.clone());
        }
    }
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|source| TlsError::Rustls { what, source })?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Chooses the certificate by the client's server name (SNI).
#[derive(Debug)]
struct SniResolver {
    default: Arc<CertifiedKey>,
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// By the parent domain of a `*.` name.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
}

impl SniResolver {
    fn lookup(&self, name: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = name else {
            return self.default.clone();
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(key) = self.exact.get(&name) {
            return key.clone();
        }
        name.split_once('.')
            .and_then(|(_, parent)| self.wildcard.get(parent))
            .unwrap_or(&self.default)
            .clone()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.lookup(hello.server_name()))
    }
}

/// One DER element: tag, contents, and what follows it.
fn der_next(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        rest = &rest[n..];
        len
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The DNS names of a certificate's subjectAltName extension (RFC 5280, section 4.2.1.6).
fn dns_names(cert: &CertificateDer<'_>) -> Vec<String> {
    const SEQUENCE: u8 = 0x30;
    const EXTENSIONS: u8 = 0xa3;
    const OID: u8 = 0x06;
    const OCTET_STRING: u8 = 0x04;
    const DNS_NAME: u8 = 0x82;
    const SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11];
    let names = || -> Option<Vec<String>> {
        let (_, cert, _) = der_next(cert.as_ref()).filter(|(t, ..)| *t == SEQUENCE)?;
        let (_, mut tbs, _) = der_next(cert).filter(|(t, ..)| *t == SEQUENCE)?;
        let mut names = Vec::new();
        while let Some((tag, contents, rest)) = der_next(tbs) {
            tbs = rest;
            if tag != EXTENSIONS {
                continue;
            }
            let (_, mut exts, _) = der_next(contents).filter(|(t, ..)| *t == SEQUENCE)?;
            while let Some((_, ext, rest)) = der_next(exts) {
                exts = rest;
                let (tag, oid, mut fields) = der_next(ext)?;
                if tag != OID || oid != SUBJECT_ALT_NAME {
                    continue;
                }
                // Skip `critical` if present; the value is the OCTET STRING.
                while let Some((tag, value, rest)) = der_next(fields) {
                    fields = rest;
                    if tag != OCTET_STRING {
                        continue;
                    }
                    let (_, mut general, _) = der_next(value).filter(|(t, ..)| *t == SEQUENCE)?;
                    while let Some((tag, name, rest)) = der_next(general) {
                        general = rest;
                        if tag == DNS_NAME {
                            if let Ok(name) = std::str::from_utf8(name) {
                                names.push(name.to_owned());
                            }
                        }
                    }
                }
            }
        }
        Some(names)
    };
    names().unwrap_or_default()
}

/// The client configuration for HTTPS instances: verified against `ca_pem` when given, else
/// any certificate is accepted (the instance is on loopback and serves a self-signed one).
pub fn instance_client_config(ca_pem: Option<&[u8]>) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let what = "https instance client";
    let verifier: Arc<dyn ServerCertVerifier> = match ca_pem {
        Some(pem) => {
            let mut roots = RootCertStore::empty();
            for cert in certs(pem, "https instance CA")? {
                roots
                    .add(cert)
                    .map_err(|source| TlsError::Rustls { what, source })?;
            }
            let inner =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()?;
            Arc::new(LoopbackNameVerifier { inner })
        }
        None => Arc::new(AcceptAnyCertificate {
            algorithms: provider.signature_verification_algorithms,
        }),
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(VERSIONS)
        .map_err(|source| TlsError::Rustls { what, source })?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    // No ALPN: hyper-rustls requires it empty, and an instance then speaks HTTP/1.1.
    config.alpn_protocols.clear();
    Ok(config)
}

/// Verifies the chain against the configured CA; the name may be either `127.0.0.1` (what we
/// connect to) or `localhost` (what local development certificates usually name).
#[derive(Debug)]
struct LoopbackNameVerifier {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for LoopbackNameVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => self.inner.verify_server_cert(
                end_entity,
                intermediates,
                &ServerName::DnsName("localhost".try_into().expect("valid DNS name")),
                ocsp_response,
                now,
            ),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Accepts whatever certificate a loopback instance presents (still checking that the peer
/// holds its key). Used only for connections to `127.0.0.1` instances when no CA is set.
#[derive(Debug)]
struct AcceptAnyCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_material_is_a_clear_error() {
        let err = server_config(
            &TlsMaterial {
                cert_chain_pem: b"not pem".to_vec(),
                key_pem: b"not pem".to_vec(),
            },
            &[],
        )
        .unwrap_err();
        assert!(err.to_string().contains("no certificate"), "{err}");
    }

    fn material(names: &[&str]) -> TlsMaterial {
        let c = rcgen::generate_simple_self_signed(
            names.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
        )
        .unwrap();
        TlsMaterial {
            cert_chain_pem: c.cert.pem().into_bytes(),
            key_pem: c.key_pair.serialize_pem().into_bytes(),
        }
    }

    #[test]
    fn dns_names_come_from_the_leaf_certificate() {
        let m = material(&["a.example", "*.b.example", "127.0.0.1"]);
        let der = certs(&m.cert_chain_pem, "test").unwrap();
        assert_eq!(dns_names(&der[0]), ["a.example", "*.b.example"]);
        assert!(dns_names(&CertificateDer::from(vec![0x30, 0x81])).is_empty());
    }

    #[test]
    fn sni_chooses_exact_then_wildcard_then_default() {
        let default = material(&["localhost"]);
        server_config(&default, &[material(&["a.example", "*.b.example"])]).unwrap();
        let mut r = SniResolver {
            default: Arc::new(certified_key(&default, "d").unwrap()),
            exact: HashMap::new(),
            wildcard: HashMap::new(),
        };
        let ka = Arc::new(certified_key(&material(&["x"]), "a").unwrap());
        r.exact.insert("a.example".into(), ka.clone());
        r.wildcard.insert("b.example".into(), ka.clone());
        assert!(Arc::ptr_eq(&r.lookup(Some("A.Example.")), &ka));
        assert!(Arc::ptr_eq(&r.lookup(Some("x.b.example")), &ka));
        assert!(Arc::ptr_eq(&r.lookup(Some("b.example")), &r.default));
        assert!(Arc::ptr_eq(&r.lookup(Some("y.x.b.example")), &r.default));
        assert!(Arc::ptr_eq(&r.lookup(None), &r.default));
    }

    #[test]
    fn a_certificate_without_dns_names_is_refused() {
        let err = server_config(&material(&["localhost"]), &[material(&["10.0.0.1"])]).unwrap_err();
        assert!(matches!(err, TlsError::NoNames { index: 0 }), "{err}");
    }

    #[test]
    fn client_config_offers_no_alpn() {
        let config = instance_client_config(None).unwrap();
        assert!(config.alpn_protocols.is_empty());
    }
}
