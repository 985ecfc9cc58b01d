//! SNI: the certificate a TLS client gets is chosen by the server name it sends, among the
//! names of `ProxyInit.certificates`, with the default certificate as fallback; a
//! `Reconfigure` swaps them for new handshakes without closing open connections.

mod common;

use std::os::fd::AsFd;
use std::sync::Arc;

use common::*;
use protocol::{LauncherToProxy, ListenerKind, ListenerSpec, Pool, ProxyInit, TlsMaterial};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A TLS client that trusts only `trusted` and sends `name` as SNI.
async fn handshake(
    addr: std::net::SocketAddr,
    name: &str,
    trusted: &TlsMaterial,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for der in rustls_pemfile::certs(&mut &trusted.cert_chain_pem[..]) {
        roots.add(der.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name.to_string().try_into().unwrap(), tcp)
        .await
}

async fn get(stream: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> String {
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = within("a response", stream.read(&mut buf)).await.unwrap();
    String::from_utf8_lossy(&buf[..n]).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_chooses_the_certificate_and_reconfigure_swaps_them() {
    let https0 = TestBackend::tls("https-0", None).await;
    let shop = self_signed(&["shop.example", "*.shop.example"]);
    let blog = self_signed(&["blog.example"]);
    let mut setup = Setup::new(settings(), vec![https0.route(1, Pool::Https, 0)]);
    setup.certificates = vec![shop.clone(), blog.clone()];
    let h = Harness::start_with(setup).await;

    let mut s = handshake(h.https_addr, "shop.example", &shop)
        .await
        .unwrap();
    assert!(get(&mut s).await.starts_with("HTTP/1.1 200"));
    handshake(h.https_addr, "www.shop.example", &shop)
        .await
        .unwrap();
    handshake(h.https_addr, "blog.example", &blog)
        .await
        .unwrap();
    handshake(h.https_addr, "localhost", &h.tls).await.unwrap();
    // An unknown name gets the default certificate.
    handshake(h.https_addr, "unknown.example", &h.tls)
        .await
        .unwrap_err();
    assert!(handshake(h.https_addr, "blog.example", &shop)
        .await
        .is_err());

    // A reload brings a new certificate for blog.example and drops shop.example.
    let blog2 = self_signed(&["blog.example"]);
    let init = ProxyInit {
        listeners: vec![
            ListenerSpec {
                kind: ListenerKind::Http,
                addr: h.http_addr.to_string(),
            },
            ListenerSpec {
                kind: ListenerKind::Https,
                addr: h.https_addr.to_string(),
            },
        ],
        tls: Some(h.tls.clone()),
        certificates: vec![blog2.clone()],
        settings: settings(),
    };
    h.launcher
        .send_with_fds(
            &LauncherToProxy::Reconfigure(init),
            &[h.listeners[0].as_fd(), h.listeners[1].as_fd()],
        )
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while handshake(h.https_addr, "blog.example", &blog2)
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new certificate never showed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(handshake(h.https_addr, "shop.example", &shop)
        .await
        .is_err());
    // The connection opened before the reload is still served.
    assert!(get(&mut s).await.starts_with("HTTP/1.1 200"));
}
