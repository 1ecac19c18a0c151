//! The HTTP client the operator talks to the proxies' admin API with (pushes and load reads),
//! and the scheme of the proxies it discovers. With `--proxy-tls` the discovered proxies are
//! reached over HTTPS at their pod IP; their certificate must chain to `--proxy-ca-file` (or
//! the system's roots) and name `--proxy-tls-server-name` (the admin Service's DNS name, say)
//! rather than the pod IP, which a certificate issued before the pod cannot know.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::path::PathBuf;
use std::sync::Arc;

use crate::error::Error;
use crate::settings::Settings;

/// `--proxy-tls` and what goes with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyTls {
    /// The CA the proxies' admin certificates chain to; None: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// The name their certificates are checked against; None: the host of the URL (the pod
    /// IP, which the certificate must then carry as an IP SAN).
    pub server_name: Option<String>,
}

/// `https` with `--proxy-tls`, else `http`.
pub fn scheme(settings: &Settings) -> &'static str {
    if settings.proxy_tls.is_some() {
        "https"
    } else {
        "http"
    }
}

/// The client for every call to a proxy.
pub fn client(settings: &Settings) -> Result<reqwest::Client, Error> {
    let builder = reqwest::Client::builder();
    let Some(tls) = &settings.proxy_tls else {
        return builder.build().map_err(Error::HttpClient);
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    match &tls.ca_file {
        Some(path) => {
            let bad =
                |e: String| Error::ProxyTls(format!("--proxy-ca-file {}: {e}", path.display()));
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| bad(e.to_string()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(e.to_string()))?;
            if certs.is_empty() {
                return Err(bad("no PEM certificate in it".into()));
            }
            for c in certs {
                roots.add(c).map_err(|e| bad(e.to_string()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for c in found.certs {
                let _ = roots.add(c);
            }
        }
    }
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| Error::ProxyTls(e.to_string()))?;
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(rustls::DEFAULT_VERSIONS)
        .map_err(|e| Error::ProxyTls(e.to_string()))?;
    let config = match &tls.server_name {
        Some(name) => {
            let name = ServerName::try_from(name.clone())
                .map_err(|e| Error::ProxyTls(format!("--proxy-tls-server-name {name:?}: {e}")))?;
            config
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(FixedName { webpki, name }))
        }
        None => config.with_webpki_verifier(webpki),
    };
    let config = config.with_no_client_auth();
    builder
        .use_preconfigured_tls(config)
        .build()
        .map_err(Error::HttpClient)
}

/// Verifies the chain as usual, against one configured name instead of the URL's host.
#[derive(Debug)]
struct FixedName {
    webpki: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for FixedName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.webpki
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}
