//! Health probes: HTTP GET `health.path` on an instance (HTTPS pool: over TLS, accepting the
//! instance's self-signed certificate); any status below 500 counts as healthy.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use protocol::Pool;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("TLS client configuration for health probes: {0}")]
    Tls(#[from] rustls::Error),
}

/// Probes instances; cheap to clone.
#[derive(Clone)]
pub struct Prober {
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    path: Arc<str>,
}

impl Prober {
    pub fn new(path: &str) -> Result<Self, HealthError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build(connector);
        let path = if path.starts_with('/') {
            path.to_string()
        } else {
            format!("/{path}")
        };
        Ok(Prober {
            client,
            path: path.into(),
        })
    }

    /// One probe, bounded by `timeout`: the status code when it is below 500.
    pub async fn probe(&self, pool: Pool, port: u16, timeout: Duration) -> Result<u16, String> {
        let scheme = if pool == Pool::Https { "https" } else { "http" };
        let uri = format!("{scheme}://127.0.0.1:{port}{}", self.path);
        let request = http::Request::get(&uri)
            .header(http::header::USER_AGENT, "overwatch-health")
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("bad health URL {uri}: {e}"))?;
        let response = match tokio::time::timeout(timeout, self.client.request(request)).await {
            Err(_) => {
                return Err(format!(
                    "GET {uri}: no answer within {} ms",
                    timeout.as_millis()
                ))
            }
            Ok(Err(e)) => return Err(format!("GET {uri}: {}", error_chain(&e))),
            Ok(Ok(response)) => response,
        };
        let status = response.status().as_u16();
        if status < 500 {
            Ok(status)
        } else {
            Err(format!("GET {uri}: status {status}"))
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Instances listen on loopback with self-signed certificates: any certificate is accepted,
/// but the handshake signature is still checked so the connection is real TLS.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
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
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn one_shot_server(status: &'static str) -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(
                    format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await;
        });
        port
    }

    #[tokio::test]
    async fn status_below_500_is_healthy() {
        let prober = Prober::new("/health").unwrap();
        let port = one_shot_server("404 Not Found").await;
        assert_eq!(
            prober.probe(Pool::Http, port, Duration::from_secs(5)).await,
            Ok(404)
        );
        let port = one_shot_server("503 Service Unavailable").await;
        let err = prober
            .probe(Pool::Http, port, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(err.contains("status 503"), "{err}");
    }

    #[tokio::test]
    async fn nothing_listening_is_unhealthy() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let prober = Prober::new("/").unwrap();
        assert!(prober
            .probe(Pool::Http, port, Duration::from_secs(5))
            .await
            .is_err());
    }
}
