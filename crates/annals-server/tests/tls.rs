//! TLS: the server speaks HTTPS when a certificate and key are configured.

mod common;

use std::sync::Arc;

use annals_server::config::TlsConfig;
use common::{open_config, start, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::{
    TlsConnector,
    rustls::{
        self, RootCertStore,
        pki_types::{CertificateDer, ServerName, pem::PemObject},
    },
};

const CERT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tls_test_cert.pem");
const CA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tls_test_ca.pem");
const KEY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tls_test_key.pem");

#[tokio::test]
async fn serves_https_with_the_configured_certificate() {
    within(60, async {
        let mut config = open_config();
        config.tls = Some(TlsConfig { cert: CERT.into(), key: KEY.into() });
        let s = start(config).await;

        let mut roots = RootCertStore::empty();
        roots.add(CertificateDer::from_pem_file(CA).unwrap()).unwrap();
        let client =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
        let mut tls = TlsConnector::from(Arc::new(client))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .expect("TLS handshake with the test certificate");
        tls.write_all(b"GET /info HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut response = Vec::new();
        tls.read_to_end(&mut response).await.unwrap();
        let text = String::from_utf8_lossy(&response);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.contains("\"tls\":true"), "{text}");

        // Plain HTTP on the TLS port gets no HTTP answer.
        let plain = s.client.get(s.url("/health/live")).send().await;
        assert!(plain.is_err());
        s.stop().await;
    })
    .await;
}

#[test]
fn missing_certificate_files_are_configuration_errors() {
    let mut config = open_config();
    config.tls = Some(TlsConfig { cert: "/nonexistent/cert.pem".into(), key: KEY.into() });
    let err = config.validate().unwrap_err();
    assert!(err.to_string().contains("tls.cert"), "{err}");
}
