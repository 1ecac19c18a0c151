//! TLS for the admin API (`admin.tls`): the certificate and key are re-read when their files
//! change (a Kubernetes Secret volume swaps them in place), without a restart and without
//! dropping a connection: each new handshake takes the newest pair. A changed pair that does
//! not load (a half-written file, a key that does not go with the certificate) is logged and
//! the last good one stays.

use lb_api::FieldError;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config;

/// A handshake that takes longer is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; more connections wait to be accepted.
const MAX_HANDSHAKES: usize = 64;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificate every new handshake presents: the last pair that loaded.
#[derive(Debug)]
pub struct Reloading {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        )
    }
}

/// The admin API's TLS: the acceptor and what reloads its certificate.
pub struct AdminTls {
    pub acceptor: TlsAcceptor,
    pub certs: Arc<Reloading>,
    pub reload_interval: Duration,
}

impl std::fmt::Debug for AdminTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminTls")
            .field("cert_file", &self.certs.cert_file)
            .finish()
    }
}

/// Reads a certificate chain and its key; the error says which file and why.
fn load_pair(cert_file: &Path, key_file: &Path) -> Result<CertifiedKey, (&'static str, String)> {
    let certs = CertificateDer::pem_file_iter(cert_file)
        .map_err(|e| {
            (
                "admin.tls.certFile",
                format!("{}: {e}", cert_file.display()),
            )
        })?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            (
                "admin.tls.certFile",
                format!("{}: {e}", cert_file.display()),
            )
        })?;
    if certs.is_empty() {
        return Err((
            "admin.tls.certFile",
            format!("{}: no PEM certificate in it", cert_file.display()),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| {
        (
            "admin.tls.keyFile",
            format!("{}: no usable PEM private key: {e}", key_file.display()),
        )
    })?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| ("admin.tls.keyFile", format!("{}: {e}", key_file.display())))?;
    let pair = CertifiedKey::new(certs, signing);
    pair.keys_match().map_err(|e| {
        (
            "admin.tls.keyFile",
            format!(
                "{} does not go with the certificate in {}: {e}",
                key_file.display(),
                cert_file.display()
            ),
        )
    })?;
    Ok(pair)
}

impl AdminTls {
    /// Reads the files once; a bad one stops the proxy before it binds, naming the field.
    pub fn load(cfg: &config::AdminTls) -> Result<AdminTls, FieldError> {
        let pair =
            load_pair(&cfg.cert_file, &cfg.key_file).map_err(|(f, e)| FieldError::new(f, e))?;
        let certs = Arc::new(Reloading {
            cert_file: cfg.cert_file.clone(),
            key_file: cfg.key_file.clone(),
            current: RwLock::new(Arc::new(pair)),
        });
        let server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(rustls::DEFAULT_VERSIONS)
            .map_err(|e| FieldError::new("admin.tls", e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(certs.clone());
        let mut server = server;
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(AdminTls {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            certs,
            reload_interval: cfg.reload_interval,
        })
    }
}

/// Re-reads the files every `interval` and swaps in a pair whose bytes changed, once it loads.
pub async fn watch(certs: Arc<Reloading>, interval: Duration, shutdown: CancellationToken) {
    let read = |c: &Reloading| {
        (
            std::fs::read(&c.cert_file).ok(),
            std::fs::read(&c.key_file).ok(),
        )
    };
    let mut seen = read(&certs);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.cancelled() => return,
        }
        let now = read(&certs);
        if now == seen {
            continue;
        }
        seen = now;
        match load_pair(&certs.cert_file, &certs.key_file) {
            Ok(pair) => {
                *certs
                    .current
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(pair);
                info!(
                    cert = %certs.cert_file.display(),
                    "admin TLS certificate reloaded: new connections present it"
                );
            }
            Err((field, e)) => warn!(
                "admin TLS: the changed {field} does not load ({e}); the previous certificate \
                 stays until it does"
            ),
        }
    }
}

/// Accepted TLS connections for `axum::serve`: a task accepts and shakes hands (each
/// handshake in a task of its own, bounded in time and number), so that a slow client holds
/// up nobody.
pub struct TlsListener {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    pub fn new(listener: TcpListener, acceptor: TlsAcceptor, shutdown: CancellationToken) -> Self {
        let local = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = shutdown.cancelled() => return,
                };
                let (tcp, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        debug!("admin accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let _slot = slot;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => debug!(%peer, "admin TLS handshake failed: {e}"),
                        Err(_) => debug!(%peer, "admin TLS handshake timed out"),
                    }
                });
            }
        });
        TlsListener { rx, local }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accept task ended (shutdown): nothing more comes.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
