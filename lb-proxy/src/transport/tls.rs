//! SIP over TLS (RFC 3261 26.2: transport `tls`, `sips:` URIs) with rustls and its `ring`
//! provider.
//!
//! A `tls` listener presents `tls.certFile`/`tls.keyFile`; a connection the proxy opens checks
//! the server's certificate against `tls.caFile` (or the system's roots) and the name it was
//! asked for: the destination URI's host, a DNS name or an IP address (matched against IP
//! SANs). After the handshake a connection belongs to the TCP transport ([`super::tcp`]): the
//! same framing, limits, timeouts and connection registry.

use lb_api::FieldError;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tracing::debug;

use super::tcp::NewConn;
use super::Upward;
use crate::config;

/// The TLS side of the proxy, built from the `tls` section.
pub struct Tls {
    acceptor: TlsAcceptor,
    connector: TlsConnector,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls")
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Tls {
    /// Reads and checks the certificate, key and roots; the error names the field and file.
    pub fn load(cfg: &config::Tls) -> Result<Tls, FieldError> {
        let chain = read_certs("tls.certFile", &cfg.cert_file)?;
        let key = PrivateKeyDer::from_pem_file(&cfg.key_file).map_err(|e| {
            FieldError::new(
                "tls.keyFile",
                format!("{}: no usable PEM private key: {e}", cfg.key_file.display()),
            )
        })?;
        let versions = rustls::DEFAULT_VERSIONS;
        let server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .map_err(|e| FieldError::new("tls", e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| {
                FieldError::new(
                    "tls.keyFile",
                    format!(
                        "{} does not go with the certificate in {}: {e}",
                        cfg.key_file.display(),
                        cfg.cert_file.display()
                    ),
                )
            })?;
        let client = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .map_err(|e| FieldError::new("tls", e.to_string()))?;
        let client = if cfg.verify_destinations {
            client.with_root_certificates(roots(cfg)?)
        } else {
            client
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerification(provider())))
        };
        // Offered only to a server that asks for a client certificate (mutual TLS).
        let client = client.with_client_auth_cert(chain, key).map_err(|e| {
            FieldError::new("tls.keyFile", format!("{}: {e}", cfg.key_file.display()))
        })?;
        Ok(Tls {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            connector: TlsConnector::from(Arc::new(client)),
        })
    }

    /// Opens TLS on a connected stream to `remote`, checking the certificate against `name`
    /// (the IP address of `remote` when None).
    pub(super) async fn connect(
        &self,
        stream: TcpStream,
        remote: SocketAddr,
        name: Option<&str>,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let name = server_name(name, remote.ip())?;
        self.connector.connect(name, stream).await
    }
}

/// The name a server certificate is checked against: an IP address (IP SAN) or a DNS name.
fn server_name(name: Option<&str>, ip: IpAddr) -> std::io::Result<ServerName<'static>> {
    let Some(name) = name else {
        return Ok(ServerName::from(ip));
    };
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(ServerName::from(ip));
    }
    ServerName::try_from(name.to_string()).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{name:?} is not a name a certificate can be checked against"),
        )
    })
}

fn read_certs(field: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, FieldError> {
    let bad = |e: String| FieldError::new(field, format!("{}: {e}", path.display()));
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no PEM certificate in it".into()));
    }
    Ok(certs)
}

/// The roots destination certificates must chain to: `caFile`, or the system's.
fn roots(cfg: &config::Tls) -> Result<RootCertStore, FieldError> {
    let mut roots = RootCertStore::empty();
    match &cfg.ca_file {
        Some(path) => {
            for cert in read_certs("tls.caFile", path)? {
                roots.add(cert).map_err(|e| {
                    FieldError::new(
                        "tls.caFile",
                        format!("{}: not a usable CA certificate: {e}", path.display()),
                    )
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(FieldError::new(
                    "tls.caFile",
                    "not set, and no system root certificate was found: name the CA file that \
                     destination certificates chain to",
                ));
            }
        }
    }
    Ok(roots)
}

/// `tls.verifyDestinations: false`: any server certificate is taken (the handshake's
/// signatures are still checked, so the stream is encrypted, but to whoever answers).
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

type Dss = DigitallySignedStruct;
type Signed = Result<HandshakeSignatureValid, rustls::Error>;

impl ServerCertVerifier for NoVerification {
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

    fn verify_tls12_signature(&self, m: &[u8], c: &CertificateDer<'_>, d: &Dss) -> Signed {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(&self, m: &[u8], c: &CertificateDer<'_>, d: &Dss) -> Signed {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Runs the server handshake of an accepted connection (within `tcp.messageTimeout`, so a
/// peer that starts one and stalls holds its place no longer than a stalled message), then
/// hands the connection to the TCP transport. A peer that does not speak TLS (plain SIP sent
/// to the TLS port, say) fails the handshake and is closed; nothing reaches the core.
pub(super) async fn accept<E: Upward>(tls: Arc<Tls>, stream: TcpStream, conn: NewConn<E>) {
    let shared = &conn.shared;
    let remote = conn.remote;
    let handshake =
        tokio::time::timeout(shared.limits.message_timeout, tls.acceptor.accept(stream));
    let stream = tokio::select! {
        r = handshake => match r {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                shared.counters.tls_handshake_failed_accept.inc();
                debug!(%remote, "tls handshake failed: {e}");
                return;
            }
            Err(_) => {
                shared.counters.tls_handshake_failed_accept.inc();
                debug!(%remote, "tls handshake not complete within tcp.messageTimeout");
                return;
            }
        },
        _ = shared.shutdown.cancelled() => return,
    };
    let (read, write) = tokio::io::split(stream);
    conn.run(read, write);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_files_are_read_and_named_in_errors() {
        let dir = std::env::temp_dir().join(format!("lb-proxy-tls-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let junk = dir.join("junk.pem");
        std::fs::write(
            &junk,
            "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let missing = dir.join("missing.pem");
        for cert in [&missing, &empty, &junk] {
            let cfg = config::Tls {
                cert_file: cert.clone(),
                key_file: "x".into(),
                ca_file: None,
                verify_destinations: true,
            };
            let e = Tls::load(&cfg).unwrap_err().to_string();
            assert!(
                e.contains("tls.certFile") && e.contains(&cert.display().to_string()),
                "{}: {e}",
                cert.display()
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn server_names() {
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        assert_eq!(server_name(None, ip).unwrap(), ServerName::from(ip));
        let v6: IpAddr = "::1".parse().unwrap();
        assert_eq!(server_name(Some("::1"), ip).unwrap(), ServerName::from(v6));
        assert!(matches!(
            server_name(Some("mrcp-0.mrcp.speech.svc"), ip).unwrap(),
            ServerName::DnsName(_)
        ));
        assert!(server_name(Some("bad name!"), ip).is_err());
    }
}
