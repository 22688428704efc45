//! TLS (rustls) on both sides: the client-facing acceptor built from the configured certificate and key,
//! the server-side negotiation, and the one stream type for both, plain TCP or TLS over it.
//!
//! A client asks for TLS with an SSLRequest before its StartupMessage ("SSL Session Encryption" in the
//! protocol documentation); the gateway answers `S` and runs the handshake when `tls.mode` is `allow` or
//! `require`, `N` otherwise. With `require`, a client that starts without TLS is refused with 28000.
//!
//! Towards servers the gateway is the one asking, as `server_tls.mode` says (see `regions::tls`).

use crate::config::{Config, ConfigError, TlsConfig, TlsMode};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

/// The SSLRequest code ("SSL Session Encryption"): a client's first packet asking for TLS, and what the
/// gateway sends a server to ask the same.
pub(crate) const SSL_REQUEST: i32 = 80877103;

/// Builds the acceptor from the certificate chain and key files (PEM). The error names the file and what is
/// wrong with it.
pub fn acceptor(config: &TlsConfig) -> Result<Option<TlsAcceptor>, String> {
    let (Some(cert), Some(key)) = (&config.cert, &config.key) else {
        return Ok(None);
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("tls.cert {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("tls.cert {}: no certificate in it", cert.display()));
    }
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(|e| format!("tls.key {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("tls.cert/tls.key: {e}"))?;
    Ok(Some(TlsAcceptor::from(Arc::new(server))))
}

/// The client-facing acceptor for a configuration about to be taken into use (at startup, by a reload, by
/// `check-config`). Configuration validation does not build it: the configuration knows no TLS. A
/// certificate or key that does not load refuses the configuration with the key `tls.cert` named, as
/// validation names keys, unless `tls.mode` is `disable`, which never offers TLS and so has no acceptor.
pub fn configured_acceptor(config: &Config) -> Result<Option<TlsAcceptor>, ConfigError> {
    match acceptor(&config.tls) {
        Ok(acceptor) => Ok(acceptor),
        Err(_) if config.tls.mode == TlsMode::Disable => Ok(None),
        Err(message) => Err(config.invalid("tls.cert", message)),
    }
}

/// Asks a server for TLS on a fresh connection and runs the handshake, as `server_tls.mode` says: a server
/// that declines gets the plain connection under `prefer` and is refused under the stricter modes. The error
/// says why, for the client's 08006 and the log.
pub async fn connect_server(
    mut tcp: TcpStream,
    tls: &regions::ServerTls,
    host: &str,
) -> Result<Stream, String> {
    if !tls.enabled() {
        return Ok(Stream::Plain(tcp));
    }
    // SSLRequest ("SSL Session Encryption"): length 8 and the code; the server answers one byte.
    let mut request = [0u8; 8];
    request[..4].copy_from_slice(&8i32.to_be_bytes());
    request[4..].copy_from_slice(&SSL_REQUEST.to_be_bytes());
    let answer = async {
        tcp.write_all(&request).await?;
        tcp.read_u8().await
    };
    match answer.await.map_err(|e| format!("asking for TLS: {e}"))? {
        b'S' => {}
        b'N' if !tls.required() => return Ok(Stream::Plain(tcp)),
        b'N' => {
            return Err(format!(
                "the server does not accept TLS, and server_tls.mode is {}",
                tls.mode
            ))
        }
        other => return Err(format!("unexpected answer {other:#04x} to the SSLRequest")),
    }
    let config = tls.client_config()?;
    let name = regions::tls::server_name(host)?;
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake: {e}"))?;
    Ok(Stream::Tls(Box::new(stream.into())))
}

/// The tls-server-end-point channel binding data of a server certificate (RFC 5929, section 4.1): its hash
/// with the hash function of its signature, SHA-256 in place of MD5 and SHA-1. None for signatures without
/// such a hash function (Ed25519, RSASSA-PSS), which PostgreSQL cannot bind to either.
pub fn tls_server_end_point(certificate: &[u8]) -> Option<Vec<u8>> {
    use sha2::Digest;
    use x509_cert::der::Decode;
    let parsed = x509_cert::Certificate::from_der(certificate).ok()?;
    let algorithm = parsed.signature_algorithm.oid.to_string();
    Some(match algorithm.as_str() {
        // md5WithRSA, sha1WithRSA, sha256WithRSA, ecdsa-with-SHA1, ecdsa-with-SHA256, dsa-with-SHA1/SHA256
        "1.2.840.113549.1.1.4"
        | "1.2.840.113549.1.1.5"
        | "1.2.840.113549.1.1.11"
        | "1.2.840.10045.4.1"
        | "1.2.840.10045.4.3.2"
        | "1.2.840.10040.4.3"
        | "2.16.840.1.101.3.4.3.2" => sha2::Sha256::digest(certificate).to_vec(),
        // sha384WithRSA, ecdsa-with-SHA384
        "1.2.840.113549.1.1.12" | "1.2.840.10045.4.3.3" => {
            sha2::Sha384::digest(certificate).to_vec()
        }
        // sha512WithRSA, ecdsa-with-SHA512
        "1.2.840.113549.1.1.13" | "1.2.840.10045.4.3.4" => {
            sha2::Sha512::digest(certificate).to_vec()
        }
        _ => return None,
    })
}

/// A connection to a client or a server: plain TCP, or TLS over it.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
}

impl Stream {
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// The channel binding data of the peer's certificate (the server's, on a server connection).
    pub fn server_end_point(&self) -> Option<Vec<u8>> {
        let Stream::Tls(stream) = self else {
            return None;
        };
        let certificate = stream.get_ref().1.peer_certificates()?.first()?;
        tls_server_end_point(certificate)
    }

    /// True while the peer has neither closed the connection nor sent anything: what an idle pooled server
    /// connection must look like. Cheap: tokio answers from readiness it already has, without a system call,
    /// when nothing arrived. (Over TLS, records without data, such as session tickets, are consumed.)
    pub fn is_quiet(&mut self) -> bool {
        let mut probe = [0u8; 1];
        match self {
            Stream::Plain(stream) => matches!(
                stream.try_read(&mut probe),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock
            ),
            Stream::Tls(stream) => {
                let mut cx = Context::from_waker(std::task::Waker::noop());
                let mut buf = ReadBuf::new(&mut probe);
                Pin::new(stream.as_mut())
                    .poll_read(&mut cx, &mut buf)
                    .is_pending()
            }
        }
    }

    /// Writes what it can without waiting (WouldBlock when nothing could be written). Over TLS, bytes rustls
    /// accepted may still wait in its buffer: [`Stream::wants_flush`] says so.
    pub fn try_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(stream) => stream.try_write(buf),
            Stream::Tls(stream) => {
                let mut cx = Context::from_waker(std::task::Waker::noop());
                match Pin::new(stream.as_mut()).poll_write(&mut cx, buf) {
                    Poll::Ready(result) => result,
                    Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
                }
            }
        }
    }

    /// Reads what is there without waiting (WouldBlock when nothing is). Over TLS, what rustls has decrypted
    /// already comes first, and a record only partly received stays in rustls for the next read.
    pub fn try_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(stream) => stream.try_read(buf),
            Stream::Tls(stream) => {
                let mut cx = Context::from_waker(std::task::Waker::noop());
                let mut buf = ReadBuf::new(buf);
                match Pin::new(stream.as_mut()).poll_read(&mut cx, &mut buf) {
                    Poll::Ready(Ok(())) => Ok(buf.filled().len()),
                    Poll::Ready(Err(error)) => Err(error),
                    Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
                }
            }
        }
    }

    /// The TCP socket (under TLS, the one the TLS runs over): its readiness says when to read again after
    /// [`Stream::try_read`] would block.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(stream) => stream,
            Stream::Tls(stream) => stream.get_ref().0,
        }
    }

    /// TLS records are waiting to go out.
    pub fn wants_flush(&self) -> bool {
        match self {
            Stream::Plain(_) => false,
            Stream::Tls(stream) => stream.get_ref().1.wants_write(),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            Stream::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            Stream::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(stream) => Pin::new(stream).poll_flush(cx),
            Stream::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            Stream::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }
}
