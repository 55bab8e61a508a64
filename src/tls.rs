//! TLS for the gRPC port and the metrics endpoint, with certificates that are reloaded when their
//! files change (cert-manager and the kubelet rotate them in place).
//!
//! # Flow
//!
//! [`ServerTls::start`] reads the certificate chain, the private key and (optionally) the CA that
//! client certificates must chain to, builds one rustls [`ServerConfig`] for gRPC (ALPN `h2`,
//! client certificates required when a client CA is given) and one for the metrics endpoint
//! (ALPN `http/1.1`, no client certificate: scrapers and probes have none), and starts a task
//! that reads the files again every `reload_interval`. When their bytes differ from the last
//! ones tried, it builds new configurations and swaps them in. [`accept`] takes the current
//! configuration for every new connection, so a rotated certificate is served from the next
//! connection on; open connections keep the session they negotiated.
//!
//! # Guarantees
//!
//! * A new file that does not parse, a key that does not match its certificate, or a client CA
//!   with no usable certificate keeps the previous configuration: the error is logged once per
//!   distinct content and counted in `stoker_tls_reloads_total{result="error"}`.
//! * The certificate, key and client CA are swapped together: a connection never sees a new
//!   certificate with an old key.
//! * A slow or silent client cannot hold up others: handshakes run in their own tasks, with a
//!   deadline and a bound on how many run at once.
//!
//! # Assumptions
//!
//! * Files are replaced whole (Kubernetes secret volumes swap a symlink atomically). A pair
//!   written in two steps may be read between the steps; the mismatch is then reported and the
//!   next read, one interval later, picks up the complete pair.
//!
//! Why whole configurations rather than a certificate resolver: the client CA is part of the
//! client-certificate verifier, which lives in the [`ServerConfig`]; swapping the configuration
//! reloads the CA with the same mechanism and keeps the three files consistent.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock, Weak};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, error, info, warn};

/// How long a client may take to complete its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS handshakes in progress at once on one port; further connections wait to be accepted.
const MAX_PENDING_HANDSHAKES: usize = 256;

/// Where the certificate, key and client CA are, and how often to look at them again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsSettings {
    /// PEM certificate chain, the server's own certificate first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificates that client certificates must chain to; none: no client
    /// certificates asked for.
    pub client_ca: Option<PathBuf>,
    /// How often the files are read again.
    pub reload_interval: Duration,
    /// Whether the metrics endpoint is served over TLS too (same certificate).
    pub metrics: bool,
}

/// Why TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read the {what} {path}")]
    Read {
        /// Which file (`certificate`, `key`, `client CA`).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A file holds no usable PEM of the expected kind.
    #[error("the {what} {path} {problem}")]
    Pem {
        /// Which file.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// The key does not belong to the certificate, or rustls refused the pair.
    #[error("the certificate {cert} and the key {key} cannot be used together")]
    Pair {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls' reason.
        #[source]
        source: rustls::Error,
    },
    /// The client CA cannot verify client certificates.
    #[error("the client CA {path} cannot verify client certificates")]
    ClientCa {
        /// The client CA file.
        path: PathBuf,
        /// rustls' reason.
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    /// A certificate in the client CA file cannot be a trust anchor.
    #[error("the client CA {path} holds a certificate that cannot be a trust anchor")]
    ClientCaCertificate {
        /// The client CA file.
        path: PathBuf,
        /// rustls' reason.
        #[source]
        source: rustls::Error,
    },
    /// rustls refused the protocol versions of its own provider (not expected).
    #[error("cannot configure TLS")]
    Config(#[source] rustls::Error),
}

/// The label of `stoker_tls_reloads_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabel {
    /// `ok` (new files in use) or `error` (new files refused, the previous ones kept).
    pub result: &'static str,
}

/// The files' bytes as last read, to notice a change.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Material {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

/// The configurations in use.
struct Current {
    grpc: Arc<ServerConfig>,
    metrics: Arc<ServerConfig>,
    /// The bytes of the last read that was tried, good or bad: a bad file is reported once.
    tried: Material,
}

/// The server's TLS configurations, reloaded from their files (see the module doc).
pub struct ServerTls {
    settings: TlsSettings,
    current: RwLock<Current>,
    reloads: Family<ReloadLabel, Counter>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Loads the files (an error if they are unusable) and starts the task that reloads them;
    /// the task ends when the last reference to the returned value is dropped.
    pub fn start(settings: TlsSettings) -> Result<Arc<Self>, TlsError> {
        let material = read_material(&settings)?;
        let (grpc, metrics) = build_configs(&settings, &material)?;
        let reloads = Family::<ReloadLabel, Counter>::default();
        for result in ["ok", "error"] {
            let _ = reloads.get_or_create(&ReloadLabel { result });
        }
        let tls = Arc::new(Self {
            current: RwLock::new(Current {
                grpc,
                metrics,
                tried: material,
            }),
            reloads,
            settings,
        });
        info!(cert = %tls.settings.cert.display(), key = %tls.settings.key.display(),
            client_ca = ?tls.settings.client_ca, reload_interval = ?tls.settings.reload_interval,
            "TLS certificate loaded");
        tokio::spawn(reload_loop(
            Arc::downgrade(&tls),
            tls.settings.reload_interval,
        ));
        Ok(tls)
    }

    /// The settings this was started with.
    pub fn settings(&self) -> &TlsSettings {
        &self.settings
    }

    /// The gRPC port's configuration now.
    pub fn grpc_config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.read().grpc)
    }

    /// The metrics endpoint's configuration now.
    pub fn metrics_config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.read().metrics)
    }

    /// Reload counts by result, for the metrics registry.
    pub fn reloads(&self) -> Family<ReloadLabel, Counter> {
        self.reloads.clone()
    }

    /// Reads the files and, when they changed, swaps in configurations built from them.
    /// Returns whether new files are now in use; an error leaves the previous ones in use.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let material = read_material(&self.settings)?;
        if material == self.read().tried {
            return Ok(false);
        }
        let built = build_configs(&self.settings, &material);
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        current.tried = material;
        let (grpc, metrics) = built?;
        current.grpc = grpc;
        current.metrics = metrics;
        Ok(true)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Current> {
        // A panic while the lock was held cannot leave `Current` half-written (its fields are
        // assigned after everything that can fail), so a poisoned lock is still good.
        self.current.read().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Reads the files again every `interval` until the [`ServerTls`] is dropped.
async fn reload_loop(tls: Weak<ServerTls>, interval: Duration) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    // The last read error, so that a missing file (between two steps of a rotation, or for
    // good) is logged when it starts and not at every tick.
    let mut last_read_error: Option<String> = None;
    loop {
        ticks.tick().await;
        let Some(tls) = tls.upgrade() else {
            return;
        };
        // Small files, read off the async threads.
        let outcome = tokio::task::spawn_blocking(move || {
            let result = tls.reload();
            (tls, result)
        })
        .await;
        let Ok((tls, result)) = outcome else {
            error!("TLS reload task failed");
            continue;
        };
        match result {
            Ok(false) => last_read_error = None,
            Ok(true) => {
                last_read_error = None;
                tls.reloads
                    .get_or_create(&ReloadLabel { result: "ok" })
                    .inc();
                info!(cert = %tls.settings.cert.display(), "TLS certificate reloaded");
            }
            Err(err) => {
                let message = format!("{err:#}");
                let unread = matches!(err, TlsError::Read { .. });
                if !unread || last_read_error.as_deref() != Some(message.as_str()) {
                    tls.reloads
                        .get_or_create(&ReloadLabel { result: "error" })
                        .inc();
                    error!(error = &err as &dyn std::error::Error,
                        "TLS files changed but cannot be used: the previous certificate stays in use");
                }
                last_read_error = unread.then_some(message);
            }
        }
    }
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

fn read_material(settings: &TlsSettings) -> Result<Material, TlsError> {
    Ok(Material {
        cert: read_file("certificate", &settings.cert)?,
        key: read_file("key", &settings.key)?,
        client_ca: settings
            .client_ca
            .as_deref()
            .map(|path| read_file("client CA", path))
            .transpose()?,
    })
}

/// PEM certificates from `bytes`; at least one.
pub fn parse_certificates(
    what: &'static str,
    path: &Path,
    bytes: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_error = |problem: String| TlsError::Pem {
        what,
        path: path.to_owned(),
        problem,
    };
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| pem_error(format!("is not valid PEM: {err}")))?;
    if certs.is_empty() {
        return Err(pem_error("holds no CERTIFICATE block".to_owned()));
    }
    Ok(certs)
}

fn parse_key(path: &Path, bytes: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(bytes).map_err(|err| TlsError::Pem {
        what: "key",
        path: path.to_owned(),
        problem: format!("holds no usable private key (PKCS#8, PKCS#1 or SEC1 PEM): {err}"),
    })
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The gRPC and the metrics configuration from the files' bytes.
fn build_configs(
    settings: &TlsSettings,
    material: &Material,
) -> Result<(Arc<ServerConfig>, Arc<ServerConfig>), TlsError> {
    let chain = parse_certificates("certificate", &settings.cert, &material.cert)?;
    let key = parse_key(&settings.key, &material.key)?;
    let pair_error = |source| TlsError::Pair {
        cert: settings.cert.clone(),
        key: settings.key.clone(),
        source,
    };
    let verifier = match (&settings.client_ca, &material.client_ca) {
        (Some(path), Some(bytes)) => {
            let mut roots = RootCertStore::empty();
            for cert in parse_certificates("client CA", path, bytes)? {
                roots
                    .add(cert)
                    .map_err(|source| TlsError::ClientCaCertificate {
                        path: path.clone(),
                        source,
                    })?;
            }
            Some(
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                    .build()
                    .map_err(|source| TlsError::ClientCa {
                        path: path.clone(),
                        source,
                    })?,
            )
        }
        _ => None,
    };
    let builder = || {
        ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)
    };
    let mut grpc = match verifier {
        Some(verifier) => builder()?.with_client_cert_verifier(verifier),
        None => builder()?.with_no_client_auth(),
    }
    .with_single_cert(chain.clone(), key.clone_key())
    .map_err(pair_error)?;
    grpc.alpn_protocols = vec![b"h2".to_vec()];
    let mut metrics = builder()?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(pair_error)?;
    metrics.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((Arc::new(grpc), Arc::new(metrics)))
}

/// Accepts TCP connections (TCP_NODELAY set) and completes their TLS handshake with the
/// configuration `config` returns at that moment, each in its own task; established
/// connections come out of the returned channel. Ends when `shutdown` turns true or the
/// receiver is dropped.
pub fn accept(
    listener: TcpListener,
    config: impl Fn() -> Arc<ServerConfig> + Send + 'static,
    mut shutdown: watch::Receiver<bool>,
) -> mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)> {
    let (tx, rx) = mpsc::channel(64);
    let handshakes = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = Arc::clone(&handshakes).acquire_owned().await else {
                return;
            };
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = shutdown.wait_for(|stop| *stop) => return,
                _ = tx.closed() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // EMFILE and the like: give other tasks a chance to close descriptors.
                    warn!(error = %err, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if let Err(err) = tcp.set_nodelay(true) {
                debug!(error = %err, %peer, "cannot set TCP_NODELAY");
            }
            let acceptor = TlsAcceptor::from(config());
            let tx = tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send((stream, peer)).await;
                    }
                    Ok(Err(err)) => debug!(error = %err, %peer, "TLS handshake failed"),
                    Err(_) => debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    rx
}

/// The metrics endpoint's listener over TLS, for `axum::serve`.
pub struct TlsListener {
    connections: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Serves TLS on `listener` with the metrics configuration of `tls`.
    pub fn metrics(
        listener: TcpListener,
        tls: Arc<ServerTls>,
        shutdown: watch::Receiver<bool>,
    ) -> io::Result<Self> {
        let local = listener.local_addr()?;
        let connections = accept(listener, move || tls.metrics_config(), shutdown);
        Ok(Self { connections, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.connections.recv().await {
            Some(connection) => connection,
            // The acceptor stopped (shutdown): nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}
