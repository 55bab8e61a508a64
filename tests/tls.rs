//! TLS on the gRPC port and the metrics endpoint, over loopback, with certificates generated
//! here: a TLS client is served and a plaintext one is not; with a client CA, only clients with
//! a certificate from it are; a certificate rotated on disk is served to the next connection
//! while an open connection keeps working; a bad new file keeps the previous certificate; the
//! `stoker apps` client speaks TLS.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use stoker::config::{ClientArgs, Limits};
use stoker::server::{self, Running, Settings};
use stoker::tls::{ServerTls, TlsError, TlsSettings};
use stoker_core::{AppId, EngineConfig, ExecutorBackend, ExecutorId, LaunchRequest, Millis};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const ADMIN: &str = "admin-token-for-tests-0123456789";

/// Executors never start: these tests are about the transport.
struct NullBackend;

impl ExecutorBackend for NullBackend {
    fn name(&self) -> &'static str {
        "null"
    }

    fn launch(&self, _request: LaunchRequest) {}

    fn terminate(&self, _app_id: &AppId, _executor_id: ExecutorId, _grace: Millis) {}
}

/// A certificate authority that issues server and client certificates.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).expect("CA certificate");
        Self {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate for `names` (host names or IP addresses), its PEM and its key's PEM.
    fn issue(&self, names: &[&str], usage: ExtendedKeyUsagePurpose) -> Leaf {
        let key = KeyPair::generate().expect("leaf key");
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).expect("leaf params");
        params.extended_key_usages = vec![usage];
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("leaf certificate");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }

    fn server(&self) -> Leaf {
        self.issue(
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    fn client(&self) -> Leaf {
        self.issue(&["driver"], ExtendedKeyUsagePurpose::ClientAuth)
    }
}

struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
}

/// The server's TLS files in a temporary directory.
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new(server: &Leaf, client_ca: Option<&Ca>) -> Self {
        let files = Self {
            dir: tempfile::tempdir().expect("temp dir"),
        };
        files.install(server);
        if let Some(ca) = client_ca {
            std::fs::write(files.path("client-ca.pem"), &ca.pem).expect("write client CA");
        }
        files
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Replaces the certificate and key as a secret volume does: written aside, then renamed
    /// over (the key first, then the certificate).
    fn install(&self, leaf: &Leaf) {
        for (name, content) in [("tls.key", &leaf.key_pem), ("tls.crt", &leaf.cert_pem)] {
            let aside = self.path(&format!(".{name}.new"));
            std::fs::write(&aside, content).expect("write");
            std::fs::rename(&aside, self.path(name)).expect("rename");
        }
    }

    fn settings(&self, client_ca: bool) -> TlsSettings {
        TlsSettings {
            cert: self.path("tls.crt"),
            key: self.path("tls.key"),
            client_ca: client_ca.then(|| self.path("client-ca.pem")),
            reload_interval: Duration::from_millis(50),
            metrics: true,
        }
    }
}

async fn start(tls: TlsSettings) -> Running {
    let tls = ServerTls::start(tls).expect("TLS files load");
    let settings = Settings {
        listen: "127.0.0.1:0".parse().expect("addr"),
        metrics_listen: Some("127.0.0.1:0".parse().expect("addr")),
        engine: EngineConfig::default(),
        limits: Limits::default(),
        admin_token: ADMIN.into(),
        incarnation: "tls-test".into(),
        tls: Some(tls),
        namespace_selector: None,
        queues: None,
    };
    server::start(settings, |_sink| {
        Ok(Arc::new(NullBackend) as Arc<dyn ExecutorBackend>)
    })
    .await
    .expect("server starts")
}

/// A tonic channel over TLS to `running`, trusting `ca`, presenting `identity` if any.
async fn tls_channel(
    running: &Running,
    ca: &Ca,
    identity: Option<&Leaf>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca.pem))
        .domain_name("localhost");
    if let Some(leaf) = identity {
        tls = tls.identity(Identity::from_pem(&leaf.cert_pem, &leaf.key_pem));
    }
    Endpoint::from_shared(format!("https://{}", running.grpc_addr))?
        .tls_config(tls)?
        .connect()
        .await
}

/// A health check: the call every TLS test makes, independent of authentication.
async fn check(channel: Channel) -> Result<(), tonic::Status> {
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(|_| ())
}

/// Whether a plaintext gRPC client gets an answer from `addr`.
async fn plaintext_answers(addr: std::net::SocketAddr) -> bool {
    let Ok(channel) = Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
    else {
        return false;
    };
    check(channel).await.is_ok()
}

fn rustls_client(ca: &Ca, alpn: &[u8]) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca.pem.as_bytes()) {
        roots.add(cert.expect("CA PEM")).expect("CA root");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    TlsConnector::from(Arc::new(config))
}

/// A new TLS connection to `addr`, and the certificate the server presented on it.
async fn connect_raw(
    addr: std::net::SocketAddr,
    ca: &Ca,
    alpn: &[u8],
) -> std::io::Result<(TlsStream<TcpStream>, Vec<u8>)> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").expect("server name");
    let stream = rustls_client(ca, alpn).connect(name, tcp).await?;
    let served = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|cert| cert.to_vec())
        .unwrap_or_default();
    Ok((stream, served))
}

/// A tonic channel over one TLS connection established beforehand: it cannot reconnect, so a
/// call that succeeds on it went over that very connection.
async fn channel_over(stream: TlsStream<TcpStream>) -> Channel {
    let slot = Arc::new(Mutex::new(Some(stream)));
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_uri| {
            let stream = slot.lock().expect("slot").take();
            async move {
                stream
                    .map(hyper_util::rt::TokioIo::new)
                    .ok_or_else(|| std::io::Error::other("this channel has one connection only"))
            }
        }))
        .await
        .expect("channel over the connection")
}

/// GET /metrics over HTTPS.
async fn metrics_text(addr: std::net::SocketAddr, ca: &Ca) -> String {
    let (mut stream, _) = connect_raw(addr, ca, b"http/1.1")
        .await
        .expect("metrics TLS connection");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .expect("request");
    let mut body = String::new();
    // The server closes the connection (Connection: close) without a TLS close_notify at
    // times; what was read is all there is.
    let _ = stream.read_to_string(&mut body).await;
    body
}

fn tls_reloads(text: &str, result: &str) -> u64 {
    let prefix = format!("stoker_tls_reloads_total{{result=\"{result}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no stoker_tls_reloads_total{{result={result:?}}} in {text}"))
}

/// Polls `probe` until it returns `Some`, for at most 10 s.
async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    mut probe: impl FnMut() -> F,
) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not reached in 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_tls_client_is_served_and_a_plaintext_client_is_not() {
    let ca = Ca::new("test CA");
    let files = Files::new(&ca.server(), None);
    let running = start(files.settings(false)).await;

    let channel = tls_channel(&running, &ca, None)
        .await
        .expect("TLS connects");
    check(channel).await.expect("health over TLS");

    assert!(
        !plaintext_answers(running.grpc_addr).await,
        "a plaintext client must get no answer from the TLS port"
    );
    let other = Ca::new("another CA");
    let refused = match tls_channel(&running, &other, None).await {
        Ok(channel) => check(channel).await.is_err(),
        Err(_) => true,
    };
    assert!(
        refused,
        "a client that does not trust the certificate fails"
    );

    let metrics = running.metrics_addr.expect("metrics");
    let text = metrics_text(metrics, &ca).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("stoker_applications"), "{text}");
    assert_eq!(tls_reloads(&text, "ok"), 0);
    running.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn silent_connections_do_not_hold_up_other_clients() {
    let ca = Ca::new("test CA");
    let files = Files::new(&ca.server(), None);
    let running = start(files.settings(false)).await;
    // Connections that never send a ClientHello: each handshake waits in its own task.
    let mut silent = Vec::new();
    for _ in 0..8 {
        silent.push(
            TcpStream::connect(running.grpc_addr)
                .await
                .expect("connect"),
        );
    }
    // Well within the 10 s a silent handshake is given: no queueing behind the silent ones.
    tokio::time::timeout(Duration::from_secs(5), async {
        let channel = tls_channel(&running, &ca, None)
            .await
            .expect("TLS connects");
        check(channel)
            .await
            .expect("health while others stay silent");
    })
    .await
    .expect("served while silent connections wait");
    let metrics = metrics_text(running.metrics_addr.expect("metrics"), &ca).await;
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    drop(silent);
    running.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn with_a_client_ca_only_clients_with_its_certificates_are_served() {
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let files = Files::new(&server_ca.server(), Some(&client_ca));
    let running = start(files.settings(true)).await;

    let with_cert = tls_channel(&running, &server_ca, Some(&client_ca.client()))
        .await
        .expect("TLS connects with a client certificate");
    check(with_cert)
        .await
        .expect("health with a client certificate");

    for (what, identity) in [
        ("no client certificate", None),
        (
            "a certificate from another CA",
            Some(Ca::new("rogue").client()),
        ),
    ] {
        let refused = match tls_channel(&running, &server_ca, identity.as_ref()).await {
            Ok(channel) => check(channel).await.is_err(),
            Err(_) => true,
        };
        assert!(refused, "a client with {what} must be refused");
    }

    // Scrapers have no client certificate: the metrics endpoint asks for none.
    let text = metrics_text(running.metrics_addr.expect("metrics"), &server_ca).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    running.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_rotated_certificate_is_served_to_new_connections_while_open_ones_keep_working() {
    let ca = Ca::new("test CA");
    let first = ca.server();
    let files = Files::new(&first, None);
    let running = start(files.settings(false)).await;
    let addr = running.grpc_addr;

    let (open, served) = connect_raw(addr, &ca, b"h2")
        .await
        .expect("first connection");
    assert_eq!(served, first.der, "the first certificate is served");
    let open = channel_over(open).await;
    check(open.clone())
        .await
        .expect("health on the open connection");

    let second = ca.server();
    files.install(&second);
    let served = eventually("the rotated certificate served", || async {
        let (_, served) = connect_raw(addr, &ca, b"h2").await.ok()?;
        (served == second.der).then_some(served)
    })
    .await;
    assert_eq!(served, second.der);

    check(open)
        .await
        .expect("the connection opened before the rotation still works");
    let fresh = tls_channel(&running, &ca, None).await.expect("new channel");
    check(fresh).await.expect("health on a new connection");
    let text = metrics_text(running.metrics_addr.expect("metrics"), &ca).await;
    assert!(tls_reloads(&text, "ok") >= 1, "{text}");
    running.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_bad_new_certificate_keeps_the_previous_one_and_is_counted() {
    let ca = Ca::new("test CA");
    let first = ca.server();
    let files = Files::new(&first, None);
    let running = start(files.settings(false)).await;
    let metrics = running.metrics_addr.expect("metrics");

    // Not PEM at all, then a well-formed pair whose key is not the certificate's, then no
    // certificate file at all.
    std::fs::write(files.path("tls.crt"), "not a certificate").expect("write");
    eventually("the bad certificate counted", || async {
        (tls_reloads(&metrics_text(metrics, &ca).await, "error") >= 1).then_some(())
    })
    .await;
    let other = ca.server();
    std::fs::write(files.path("tls.crt"), &other.cert_pem).expect("write");
    eventually("the mismatched pair counted", || async {
        (tls_reloads(&metrics_text(metrics, &ca).await, "error") >= 2).then_some(())
    })
    .await;

    std::fs::remove_file(files.path("tls.crt")).expect("remove");
    eventually("the missing certificate counted", || async {
        (tls_reloads(&metrics_text(metrics, &ca).await, "error") >= 3).then_some(())
    })
    .await;

    let (_, served) = connect_raw(running.grpc_addr, &ca, b"h2")
        .await
        .expect("still served");
    assert_eq!(served, first.der, "the previous certificate stays in use");
    let channel = tls_channel(&running, &ca, None)
        .await
        .expect("TLS connects");
    check(channel).await.expect("health");
    let text = metrics_text(metrics, &ca).await;
    assert_eq!(tls_reloads(&text, "ok"), 0, "{text}");
    running.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn unusable_files_are_refused_at_start_with_the_file_named() {
    let ca = Ca::new("test CA");
    let files = Files::new(&ca.server(), None);
    let mut missing = files.settings(false);
    missing.key = files.path("absent.key");
    let err = ServerTls::start(missing).expect_err("missing key");
    assert!(matches!(err, TlsError::Read { what: "key", .. }), "{err:?}");
    assert!(err.to_string().contains("absent.key"), "{err}");

    std::fs::write(files.path("tls.key"), ca.server().key_pem).expect("write");
    let err = ServerTls::start(files.settings(false)).expect_err("mismatched key");
    assert!(matches!(err, TlsError::Pair { .. }), "{err:?}");
}

/// The elements inside the DER SEQUENCE `der` (short and long lengths), as (tag, content).
fn der_children(der: &[u8]) -> Vec<(u8, &[u8])> {
    fn element(der: &[u8]) -> (u8, &[u8], &[u8]) {
        let tag = der[0];
        let (len, header) = match der[1] {
            n if n < 0x80 => (usize::from(n), 2),
            n => {
                let count = usize::from(n & 0x7f);
                let len = der[2..2 + count]
                    .iter()
                    .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
                (len, 2 + count)
            }
        };
        (tag, &der[header..header + len], &der[header + len..])
    }
    let (_, mut rest, _) = element(der);
    let mut children = Vec::new();
    while !rest.is_empty() {
        let (tag, content, after) = element(rest);
        children.push((tag, content));
        rest = after;
    }
    children
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[tokio::test]
async fn a_sec1_ec_key_as_cert_manager_writes_it_is_served() {
    let ca = Ca::new("test CA");
    let leaf = ca.server();
    // PKCS#8 wraps the SEC1 `ECPrivateKey` in its last element (an OCTET STRING).
    let pkcs8 = rustls::pki_types::PrivatePkcs8KeyDer::from_pem_slice(leaf.key_pem.as_bytes())
        .expect("PKCS#8 key");
    let children = der_children(pkcs8.secret_pkcs8_der());
    let (tag, sec1) = children.last().copied().expect("private key element");
    assert_eq!(tag, 0x04, "an OCTET STRING");
    let sec1_pem = format!(
        "-----BEGIN EC PRIVATE KEY-----\n{}\n-----END EC PRIVATE KEY-----\n",
        base64(sec1)
    );
    let files = Files::new(&leaf, None);
    std::fs::write(files.path("tls.key"), sec1_pem).expect("write SEC1 key");
    let running = start(files.settings(false)).await;
    let (_, served) = connect_raw(running.grpc_addr, &ca, b"h2")
        .await
        .expect("TLS with a SEC1 key");
    assert_eq!(served, leaf.der);
    let channel = tls_channel(&running, &ca, None)
        .await
        .expect("TLS connects");
    check(channel).await.expect("health");
    running.shutdown().await.expect("shutdown");
}

fn client_args(running: &Running, ca: Option<&Path>, identity: Option<&Files>) -> ClientArgs {
    ClientArgs {
        server: format!("https://{}", running.grpc_addr),
        token: Some(ADMIN.into()),
        work_dir: None,
        tls_ca: ca.map(Path::to_owned),
        tls_cert: identity.map(|f| f.path("tls.crt")),
        tls_key: identity.map(|f| f.path("tls.key")),
        tls_server_name: Some("localhost".into()),
        bearer_token_file: None,
    }
}

#[tokio::test]
async fn stoker_apps_connects_over_tls_with_its_ca_and_client_certificate() {
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let files = Files::new(&server_ca.server(), Some(&client_ca));
    std::fs::write(files.path("server-ca.pem"), &server_ca.pem).expect("write");
    let client = Files::new(&client_ca.client(), None);
    let running = start(files.settings(true)).await;
    let ca = files.path("server-ca.pem");

    let table = stoker::cli::apps(client_args(&running, Some(&ca), Some(&client)))
        .await
        .expect("stoker apps over TLS");
    assert!(table.starts_with("APP"), "{table}");

    let without_cert = stoker::cli::apps(client_args(&running, Some(&ca), None)).await;
    assert!(without_cert.is_err(), "no client certificate: refused");
    let untrusted = stoker::cli::apps(client_args(&running, None, Some(&client))).await;
    assert!(
        untrusted.is_err(),
        "the system's trust store does not know the test CA"
    );
    let mut plaintext = client_args(&running, Some(&ca), None);
    plaintext.server = format!("http://{}", running.grpc_addr);
    let err = stoker::cli::apps(plaintext)
        .await
        .expect_err("--tls-ca with http://");
    assert!(err.to_string().contains("https://"), "{err}");
    running.shutdown().await.expect("shutdown");
}
