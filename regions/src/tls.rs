//! TLS from the gateway to its servers (the `server_tls` section): the modes libpq's `sslmode` names, and
//! the rustls client configuration they come to. Both the pooled server connections (the gateway's own
//! SSLRequest negotiation) and the side connections (tokio-postgres) use it, so one setting covers every
//! connection the gateway opens to the primary and the replicas.
//!
//! As in libpq: `prefer` and `require` encrypt without checking who answers unless a CA is given, in which
//! case they check the chain like `verify-ca`; `verify-ca` checks the chain against the CA; `verify-full`
//! also checks that the certificate names the host the URL gives (DNS name or IP address).

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use serde::Deserialize;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServerTlsMode {
    /// Never TLS.
    Disable,
    /// TLS when the server offers it, plain otherwise (libpq's default).
    #[default]
    Prefer,
    /// TLS or no connection.
    Require,
    /// TLS, with a certificate chain that leads to `ca`.
    VerifyCa,
    /// TLS, with a certificate from `ca` that names the server's host.
    VerifyFull,
}

/// The `server_tls` section. The rustls configuration is built (files read, chain checked) on first use and
/// kept: configuration validation builds it, so a bad file is reported at load time, not at a connect.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTls {
    #[serde(default)]
    pub mode: ServerTlsMode,
    /// CA certificates (PEM) the servers' certificates must chain to.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// A client certificate chain (PEM) to present, for servers that authenticate the gateway by certificate.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[serde(default)]
    pub key: Option<PathBuf>,
    #[serde(skip)]
    built: OnceLock<Result<Arc<ClientConfig>, String>>,
}

impl fmt::Display for ServerTlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ServerTlsMode::Disable => "disable",
            ServerTlsMode::Prefer => "prefer",
            ServerTlsMode::Require => "require",
            ServerTlsMode::VerifyCa => "verify-ca",
            ServerTlsMode::VerifyFull => "verify-full",
        })
    }
}

impl PartialEq for ServerTls {
    fn eq(&self, other: &Self) -> bool {
        (self.mode, &self.ca, &self.cert, &self.key)
            == (other.mode, &other.ca, &other.cert, &other.key)
    }
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("mode", &self.mode)
            .field("ca", &self.ca)
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish()
    }
}

impl ServerTls {
    pub fn with_mode(mode: ServerTlsMode) -> ServerTls {
        ServerTls {
            mode,
            ..ServerTls::default()
        }
    }

    /// Whether the gateway asks servers for TLS at all.
    pub fn enabled(&self) -> bool {
        self.mode != ServerTlsMode::Disable
    }

    /// Whether a server that declines TLS is refused.
    pub fn required(&self) -> bool {
        !matches!(self.mode, ServerTlsMode::Disable | ServerTlsMode::Prefer)
    }

    /// The rustls configuration the modes come to (also for `disable`, where it is never used).
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, String> {
        self.built
            .get_or_init(|| self.build().map(Arc::new))
            .clone()
    }

    /// Checks the section: the files a mode needs are given and readable. Errors name the key.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if matches!(
            self.mode,
            ServerTlsMode::VerifyCa | ServerTlsMode::VerifyFull
        ) && self.ca.is_none()
        {
            return Err((
                "server_tls.ca",
                "server_tls.mode verify-ca and verify-full need the CA certificates (server_tls.ca)"
                    .into(),
            ));
        }
        if self.cert.is_some() != self.key.is_some() {
            return Err((
                "server_tls.cert",
                "server_tls.cert and server_tls.key go together".into(),
            ));
        }
        self.client_config().map(drop).map_err(|e| {
            // The messages start with the key whose file is wrong.
            let key = ["server_tls.ca", "server_tls.key", "server_tls.cert"]
                .into_iter()
                .find(|key| e.starts_with(key))
                .unwrap_or("server_tls");
            (key, e)
        })
    }

    /// The tokio-postgres `sslmode` for side connections (which leave verification to the rustls config).
    pub fn ssl_mode(&self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode;
        match self.mode {
            ServerTlsMode::Disable => SslMode::Disable,
            ServerTlsMode::Prefer => SslMode::Prefer,
            _ => SslMode::Require,
        }
    }

    fn build(&self) -> Result<ClientConfig, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = match &self.ca {
            Some(path) => {
                let mut roots = RootCertStore::empty();
                let certs = read_certs(path).map_err(|e| format!("server_tls.ca {e}"))?;
                for cert in certs {
                    roots
                        .add(cert)
                        .map_err(|e| format!("server_tls.ca {}: {e}", path.display()))?;
                }
                Some(Arc::new(roots))
            }
            None => None,
        };
        let chain = match roots {
            Some(roots) => Some(
                WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                    .build()
                    .map_err(|e| format!("server_tls.ca: {e}"))?,
            ),
            None => None,
        };
        let verifier: Arc<dyn ServerCertVerifier> = match (chain, self.mode) {
            (Some(chain), ServerTlsMode::VerifyFull) => chain,
            (chain, _) => Arc::new(Lenient {
                chain,
                provider: provider.clone(),
            }),
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("server_tls: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let certs = read_certs(cert).map_err(|e| format!("server_tls.cert {e}"))?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| format!("server_tls.key {}: {e}", key.display()))?;
                builder
                    .with_client_auth_cert(certs, key)
                    .map_err(|e| format!("server_tls.cert/server_tls.key: {e}"))
            }
            _ => Ok(builder.with_no_client_auth()),
        }
    }
}

fn read_certs(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in it", path.display()));
    }
    Ok(certs)
}

/// A configuration that accepts no server certificate, for when the configured one cannot be built.
pub fn refusing_config() -> Arc<ClientConfig> {
    Arc::new(
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth(),
    )
}

/// The name rustls checks the certificate against (`verify-full`): the URL's host, a DNS name or an IP.
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(host.to_string()).map_err(|e| format!("server name {host:?}: {e}"))
}

/// The modes short of `verify-full`: with `chain` (a CA was given), the certificate must chain to it but its
/// name is not looked at (`verify-ca`); without, any certificate is taken: the connection is encrypted, not
/// authenticated. Either way the handshake signatures are checked against the certificate.
#[derive(Debug)]
struct Lenient {
    chain: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
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
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
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
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_as_libpq_names_them() {
        let tls: ServerTls = serde_norway::from_str("mode: verify-full\nca: /x/ca.pem\n").unwrap();
        assert_eq!(tls.mode, ServerTlsMode::VerifyFull);
        assert!(tls.required());
        assert_eq!(ServerTls::default().mode, ServerTlsMode::Prefer);
        assert!(!ServerTls::default().required());
        assert!(ServerTls::default().client_config().is_ok());
    }

    #[test]
    fn verify_modes_need_a_ca_and_missing_files_are_named() {
        let tls = ServerTls::with_mode(ServerTlsMode::VerifyFull);
        assert_eq!(tls.validate().unwrap_err().0, "server_tls.ca");
        let tls: ServerTls =
            serde_norway::from_str("mode: verify-ca\nca: /nonexistent/ca.pem\n").unwrap();
        let (key, message) = tls.validate().unwrap_err();
        assert_eq!(key, "server_tls.ca");
        assert!(message.contains("/nonexistent/ca.pem"), "{message}");
        let tls: ServerTls = serde_norway::from_str("cert: /x/c.pem\n").unwrap();
        assert_eq!(tls.validate().unwrap_err().0, "server_tls.cert");
    }
}
