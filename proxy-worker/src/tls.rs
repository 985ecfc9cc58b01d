//! TLS configuration: the server side for clients (certificate from the launcher, TLS 1.2/1.3,
//! ALPN h2 + http/1.1) and the client side for HTTPS instances on loopback.

use std::sync::Arc;

use protocol::TlsMaterial;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
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

/// The server configuration for the https listeners.
pub fn server_config(tls: &TlsMaterial) -> Result<Arc<ServerConfig>, TlsError> {
    let what = "proxy certificate";
    let chain = certs(&tls.cert_chain_pem, what)?;
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut &tls.key_pem[..])
        .map_err(|source| TlsError::Pem { what, source })?
        .ok_or(TlsError::Missing {
            what,
            item: "private key",
        })?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|source| TlsError::Rustls { what, source })?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|source| TlsError::Rustls { what, source })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
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
        let err = server_config(&TlsMaterial {
            cert_chain_pem: b"not pem".to_vec(),
            key_pem: b"not pem".to_vec(),
        })
        .unwrap_err();
        assert!(err.to_string().contains("no certificate"), "{err}");
    }

    #[test]
    fn client_config_offers_no_alpn() {
        let config = instance_client_config(None).unwrap();
        assert!(config.alpn_protocols.is_empty());
    }
}
