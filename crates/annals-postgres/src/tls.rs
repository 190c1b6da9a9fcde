//! TLS to PostgreSQL, with libpq's `sslmode` meanings.
//!
//! The connection URL may carry `sslmode` and `sslrootcert` query
//! parameters (the URL form, `postgres://…?sslmode=verify-full&sslrootcert=/etc/ca.pem`).
//! tokio-postgres knows only `disable`, `prefer` and `require` and no
//! certificate options, so [`split_url`] takes them out of the URL and
//! [`TlsSettings::connector`] builds a rustls connector that behaves as
//! libpq does:
//!
//! | `sslmode` | encrypts | checks the certificate |
//! |---|---|---|
//! | `disable` | never | — |
//! | `prefer` (default) | when the server offers TLS | no |
//! | `require` | always (fails if the server cannot) | no; with `sslrootcert`, as `verify-ca` |
//! | `verify-ca` | always | chain to `sslrootcert` |
//! | `verify-full` | always | chain to `sslrootcert` and the host name |
//!
//! `sslcert` and `sslkey` (both, PEM: the certificate chain and its private
//! key, PKCS#8, PKCS#1 or SEC1) give a client certificate, presented when
//! the server asks for one (`cert` authentication, or `clientcert=` in
//! `pg_hba.conf`). `sslpassword` (encrypted keys), `sslcrl` and `sslcrldir`
//! are refused with [`PgError::InvalidTls`], not ignored; so is one of
//! `sslcert`/`sslkey` without the other (libpq would look in
//! `~/.postgresql/` for the missing one; name both instead).

use std::{path::PathBuf, sync::Arc};

use percent_encoding::percent_decode_str;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, Error as TlsError, RootCertStore, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
};
use tokio_postgres::config::SslMode;
pub(crate) use tokio_postgres_rustls::MakeRustlsConnect as Connector;

use crate::PgError;

/// `sslmode`, as libpq defines it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl Mode {
    fn parse(value: &str) -> Result<Self, PgError> {
        Ok(match value {
            "disable" => Mode::Disable,
            "allow" | "prefer" => Mode::Prefer,
            "require" => Mode::Require,
            "verify-ca" => Mode::VerifyCa,
            "verify-full" => Mode::VerifyFull,
            other => {
                return Err(PgError::InvalidTls {
                    reason: format!(
                        "unknown sslmode '{other}' (use disable, prefer, require, verify-ca or verify-full)"
                    ),
                });
            }
        })
    }

    fn ssl_mode(self) -> SslMode {
        match self {
            Mode::Disable => SslMode::Disable,
            Mode::Prefer => SslMode::Prefer,
            Mode::Require | Mode::VerifyCa | Mode::VerifyFull => SslMode::Require,
        }
    }
}

/// The TLS part of a connection URL.
#[derive(Debug, Clone, Default)]
pub(crate) struct TlsSettings {
    /// `None`: not in the URL; whatever tokio-postgres parsed (a
    /// `key=value` connection string may set `sslmode` itself) stands.
    mode: Option<Mode>,
    root_cert: Option<PathBuf>,
    /// `sslcert`, `sslkey`.
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
}

/// Takes the TLS parameters out of a URL-form connection string; returns
/// the rest for tokio-postgres. A `key=value` string passes unchanged (its
/// own `sslmode` of disable, prefer or require still works).
pub(crate) fn split_url(url: &str) -> Result<(String, TlsSettings), PgError> {
    let lower = url.get(..13).unwrap_or(url).to_ascii_lowercase();
    let is_url = lower.starts_with("postgres://") || lower.starts_with("postgresql://");
    let Some((base, query)) = url.split_once('?').filter(|_| is_url) else {
        return Ok((url.to_owned(), TlsSettings::default()));
    };
    let mut settings = TlsSettings::default();
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let decode = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();
        match decode(key).as_str() {
            "sslmode" => settings.mode = Some(Mode::parse(&decode(value))?),
            "sslrootcert" if decode(value) == "system" => {
                return Err(PgError::InvalidTls {
                    reason:
                        "sslrootcert=system (the operating system's roots) is not supported; name a PEM file \
                             of CA certificates instead"
                            .to_owned(),
                });
            }
            "sslrootcert" => settings.root_cert = Some(PathBuf::from(decode(value))),
            "sslcert" => settings.client_cert = Some(PathBuf::from(decode(value))),
            "sslkey" => settings.client_key = Some(PathBuf::from(decode(value))),
            k @ ("sslpassword" | "sslcrl" | "sslcrldir") => {
                return Err(PgError::InvalidTls {
                    reason: format!(
                        "'{k}' is not supported (no encrypted client keys or CRLs); remove it{}",
                        if k == "sslpassword" { " and give an unencrypted sslkey" } else { "" }
                    ),
                });
            }
            // Everything else as written: tokio-postgres decodes it.
            _ => kept.push(pair),
        }
    }
    if settings.client_cert.is_some() != settings.client_key.is_some() {
        return Err(PgError::InvalidTls {
            reason: "sslcert and sslkey go together: name the client certificate and its private key".into(),
        });
    }
    let rest = if kept.is_empty() { base.to_owned() } else { format!("{base}?{}", kept.join("&")) };
    Ok((rest, settings))
}

impl TlsSettings {
    /// Sets the mode on `config` and builds the connector for it.
    pub(crate) fn apply(&self, config: &mut tokio_postgres::Config) -> Result<Connector, PgError> {
        let mode = match self.mode {
            Some(mode) => mode,
            None => match config.get_ssl_mode() {
                SslMode::Disable => Mode::Disable,
                SslMode::Require => Mode::Require,
                _ => Mode::Prefer,
            },
        };
        config.ssl_mode(mode.ssl_mode());
        // libpq: `require` with a root certificate checks the chain.
        let mode = if mode == Mode::Require && self.root_cert.is_some() { Mode::VerifyCa } else { mode };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| PgError::InvalidTls { reason: e.to_string() })?;
        let wants_client_cert = match mode {
            Mode::Disable | Mode::Prefer | Mode::Require => {
                builder.dangerous().with_custom_certificate_verifier(Arc::new(EncryptOnly(
                    provider.signature_verification_algorithms,
                )))
            }
            Mode::VerifyCa | Mode::VerifyFull => {
                let Some(path) = &self.root_cert else {
                    return Err(PgError::InvalidTls {
                        reason: format!(
                            "sslmode={} needs sslrootcert=<file with the CA certificates, PEM>",
                            if mode == Mode::VerifyCa { "verify-ca" } else { "verify-full" }
                        ),
                    });
                };
                let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots(path)?), provider)
                    .build()
                    .map_err(|e| PgError::InvalidTls { reason: e.to_string() })?;
                if mode == Mode::VerifyFull {
                    builder.with_webpki_verifier(verifier)
                } else {
                    builder.dangerous().with_custom_certificate_verifier(Arc::new(ChainOnly(verifier)))
                }
            }
        };
        let config = match (&self.client_cert, &self.client_key) {
            (Some(cert_path), Some(key_path)) => {
                let (chain, key) = client_identity(cert_path, key_path)?;
                wants_client_cert.with_client_auth_cert(chain, key).map_err(|e| PgError::InvalidTls {
                    reason: format!(
                        "sslcert {} and sslkey {} do not make a client identity: {e}",
                        cert_path.display(),
                        key_path.display()
                    ),
                })?
            }
            _ => wants_client_cert.with_no_client_auth(),
        };
        Ok(Connector::new(config))
    }
}

/// The client certificate chain (`sslcert`, PEM, leaf first) and its
/// private key (`sslkey`, PEM), read when the store opens.
fn client_identity(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), PgError> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| PgError::InvalidTls { reason: format!("sslcert {}: {e}", cert.display()) })?;
    if chain.is_empty() {
        return Err(PgError::InvalidTls {
            reason: format!("sslcert {}: no certificate in it", cert.display()),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| PgError::InvalidTls {
        reason: format!("sslkey {}: {e} (an unencrypted PEM private key is needed)", key.display()),
    })?;
    Ok((chain, key))
}

/// The CA certificates in a PEM file.
fn roots(path: &std::path::Path) -> Result<RootCertStore, PgError> {
    let bad =
        |what: String| PgError::InvalidTls { reason: format!("sslrootcert {}: {what}", path.display()) };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(e.to_string()))? {
        roots.add(cert.map_err(|e| bad(e.to_string()))?).map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("holds no certificate".to_owned()));
    }
    Ok(roots)
}

/// `prefer` and `require`: the connection is encrypted and the handshake
/// is checked (the server proves it holds the certificate's key), but
/// whose certificate it is is not: protection against eavesdropping, not
/// against an impostor, exactly as libpq.
#[derive(Debug)]
struct EncryptOnly(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to a trusted root; the host name may
/// differ (the full check fails on the name only after the chain passed).
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(TlsError::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_leave_the_url_and_the_rest_stays_as_written() {
        let (rest, s) = split_url(
            "postgres://u:p%40ss@h:5432/db?options=-c%20jit%3Doff&sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem",
        )
        .unwrap();
        assert_eq!(rest, "postgres://u:p%40ss@h:5432/db?options=-c%20jit%3Doff");
        assert_eq!(s.mode, Some(Mode::VerifyFull));
        assert_eq!(s.root_cert, Some(PathBuf::from("/etc/ca.pem")));

        let (rest, s) = split_url("postgresql://h/db?sslmode=disable").unwrap();
        assert_eq!((rest.as_str(), s.mode), ("postgresql://h/db", Some(Mode::Disable)));
        // Not the URL form, or no query: unchanged.
        for same in ["host=h sslmode=require", "postgres://h/db"] {
            let (rest, s) = split_url(same).unwrap();
            assert_eq!((rest.as_str(), s.mode), (same, None));
        }
    }

    #[test]
    fn bad_tls_parameters_are_typed_errors() {
        for bad in [
            "postgres://h/db?sslmode=sometimes",
            "postgres://h/db?sslcert=/c.pem",
            "postgres://h/db?sslkey=k",
            "postgres://h/db?sslcert=/c.pem&sslkey=/k.pem&sslpassword=secret",
            "postgres://h/db?sslcrl=/crl.pem",
        ] {
            assert!(matches!(split_url(bad), Err(PgError::InvalidTls { .. })), "{bad}");
        }
        let needs_root = TlsSettings { mode: Some(Mode::VerifyFull), ..TlsSettings::default() };
        let mut config = tokio_postgres::Config::new();
        assert!(matches!(needs_root.apply(&mut config), Err(PgError::InvalidTls { .. })));
        let missing = TlsSettings {
            mode: Some(Mode::VerifyCa),
            root_cert: Some("/nonexistent/ca.pem".into()),
            ..TlsSettings::default()
        };
        assert!(matches!(missing.apply(&mut config), Err(PgError::InvalidTls { .. })));
        let (_, both) =
            split_url("postgres://h/db?sslcert=%2Fnonexistent%2Fc.pem&sslkey=/nonexistent/k.pem").unwrap();
        assert_eq!(
            (both.client_cert.as_deref(), both.client_key.as_deref()),
            (
                Some(std::path::Path::new("/nonexistent/c.pem")),
                Some(std::path::Path::new("/nonexistent/k.pem"))
            )
        );
        let Err(err) = both.apply(&mut config) else { panic!("missing client certificate files accepted") };
        assert!(matches!(&err, PgError::InvalidTls { reason } if reason.contains("sslcert")), "{err:?}");
    }

    #[test]
    fn the_mode_reaches_tokio_postgres() {
        for (mode, expected) in [
            (Mode::Disable, SslMode::Disable),
            (Mode::Prefer, SslMode::Prefer),
            (Mode::Require, SslMode::Require),
        ] {
            let mut config = tokio_postgres::Config::new();
            TlsSettings { mode: Some(mode), ..TlsSettings::default() }.apply(&mut config).unwrap();
            assert_eq!(config.get_ssl_mode(), expected);
        }
        // A key=value string's own sslmode stands when the URL had none.
        let mut config: tokio_postgres::Config = "host=h sslmode=disable".parse().unwrap();
        TlsSettings::default().apply(&mut config).unwrap();
        assert_eq!(config.get_ssl_mode(), SslMode::Disable);
    }
}
