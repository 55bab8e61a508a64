//! The Kubernetes client stoker talks to the API server with.
//!
//! kube's default client speaks HTTP/1.1 only. Under a burst of pod creations its connection
//! pool opened a new TLS connection for nearly every request and kept them all (2,000 creates
//! left ~2,000 connections open, each a TLS handshake on the API server). This client is kube's
//! own stack (base URI, authentication, impersonation headers) over a hyper client that
//! negotiates HTTP/2 by ALPN, as client-go does: all requests made through one client share one
//! connection, with HTTP/2 pings to notice a dead one (stoker builds a second client for its
//! watch). Servers without HTTP/2 get HTTP/1.1.

use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use kube::client::ConfigExt;
use tower::{BoxError, ServiceBuilder};

use crate::K8sError;

/// How often an HTTP/2 connection is pinged, and how long a ping may go unanswered before the
/// connection is dropped (requests then open a new one; the watch resumes).
const PING_INTERVAL: Duration = Duration::from_secs(30);
const PING_TIMEOUT: Duration = Duration::from_secs(10);

/// Builds a client for `config` (from `kube::Config::infer`: kubeconfig or in-cluster).
pub fn client(config: kube::Config) -> Result<kube::Client, K8sError> {
    let wrap = |source| K8sError::Client { source };
    let tls = config.rustls_client_config().map_err(wrap)?;
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(config.connect_timeout);
    // Finds a dead peer on an HTTP/1.1 fallback connection too (HTTP/2 has its pings).
    http.set_keepalive(Some(PING_INTERVAL));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(http);
    let hyper = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .http2_keep_alive_interval(PING_INTERVAL)
        .http2_keep_alive_timeout(PING_TIMEOUT)
        .http2_keep_alive_while_idle(true)
        .build(https);
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.auth_layer().map_err(wrap)?)
        .layer(config.extra_headers_layer().map_err(wrap)?)
        .map_err(BoxError::from)
        .service(hyper);
    Ok(kube::Client::new(service, config.default_namespace))
}
