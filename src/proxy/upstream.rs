//! Upstream connections: a pooled hyper-util client per route, HTTPS through rustls with the
//! system's native roots plus the route's optional extra CA, HTTP/2 by ALPN where the upstream
//! offers it, a connect timeout that covers TCP and TLS together, and the start-up warm-up.
//!
//! Each route has its own client (and so its own pool) because its extra CA is trusted for
//! that upstream only; connections to one host are pooled and reused across requests.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Uri;
use http_body_util::{Either, Full, Limited};
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use crate::config::Route;

/// The request body sent upstream: the client's body streamed through (capped at
/// `max_body_bytes`), or a buffered one (chat bodies, which ctxgate reads to prune).
pub type RequestBody = Either<Limited<Incoming>, Full<Bytes>>;

/// The pooled client of one route.
pub type UpstreamClient = Client<TimeoutConnector<HttpsConnector<HttpConnector>>, RequestBody>;

/// The error a connect attempt gives when `timeouts.connect` fires.
#[derive(Debug, thiserror::Error)]
#[error("connect timed out after {0:?}")]
pub struct ConnectTimeout(pub Duration);

/// Wraps the HTTPS connector so that `timeouts.connect` bounds TCP connect and TLS handshake
/// together (hyper-util's own connect timeout stops at TCP).
#[derive(Clone)]
pub struct TimeoutConnector<C> {
    inner: C,
    timeout: Duration,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<C> tower_service::Service<Uri> for TimeoutConnector<C>
where
    C: tower_service::Service<Uri>,
    C::Error: Into<BoxError>,
    C::Future: Send + 'static,
{
    type Response = C::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let fut = self.inner.call(dst);
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, fut).await {
                Ok(r) => r.map_err(Into::into),
                Err(_) => Err(Box::new(ConnectTimeout(timeout)) as BoxError),
            }
        })
    }
}

/// Why a route's client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The extra CA file could not be read or holds no certificate.
    #[error("routes.{route}.tls.extra_ca_file: {reason}")]
    ExtraCa { route: String, reason: String },
    /// rustls refused the configuration.
    #[error("route {route}: tls setup failed: {reason}")]
    Tls { route: String, reason: String },
    /// The token vocabularies could not be loaded.
    #[error("{0}")]
    Counter(String),
}

/// The system's native roots, loaded once and shared by every route.
pub fn native_roots() -> RootCertStore {
    let mut roots = RootCertStore::empty();
    let loaded = rustls_native_certs::load_native_certs();
    for e in &loaded.errors {
        tracing::warn!(error = %e, "could not load some native root certificates");
    }
    let (added, ignored) = roots.add_parsable_certificates(loaded.certs);
    tracing::debug!(added, ignored, "native root certificates loaded");
    roots
}

/// Builds the pooled client of one route.
pub fn build_client(route: &Route, native: &RootCertStore) -> Result<UpstreamClient, BuildError> {
    let mut roots = native.clone();
    if let Some(path) = &route.tls.extra_ca_file {
        let ca_err = |reason: String| BuildError::ExtraCa {
            route: route.name.clone(),
            reason,
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| ca_err(format!("cannot read {}: {e}", path.display())))?
            .collect::<Result<_, _>>()
            .map_err(|e| ca_err(format!("bad PEM in {}: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(ca_err(format!("no certificate in {}", path.display())));
        }
        for c in certs {
            roots
                .add(c)
                .map_err(|e| ca_err(format!("bad certificate: {e}")))?;
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| BuildError::Tls {
        route: route.name.clone(),
        reason: e.to_string(),
    })?
    .with_root_certificates(roots)
    .with_no_client_auth();

    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_keepalive(Some(Duration::from_secs(60)));
    let https = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(http);
    let connector = TimeoutConnector {
        inner: https,
        timeout: route.timeouts.connect,
    };

    let client = Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(256)
        .build(connector);
    Ok(client)
}

/// Readiness of every upstream: `/readyz` answers 200 once each has finished its warm-up.
#[derive(Default)]
pub struct Readiness {
    state: Mutex<Vec<(String, Option<String>)>>,
}

impl Readiness {
    /// One pending entry per route.
    pub fn new(routes: &[Route]) -> Arc<Readiness> {
        Arc::new(Readiness {
            state: Mutex::new(routes.iter().map(|r| (r.name.clone(), None)).collect()),
        })
    }

    fn set(&self, route: &str, outcome: String) {
        if let Ok(mut s) = self.state.lock() {
            if let Some(e) = s.iter_mut().find(|(n, _)| n == route) {
                e.1 = Some(outcome);
            }
        }
    }

    /// Whether every upstream finished its warm-up (successfully or not), and a report with
    /// one line per upstream.
    pub fn report(&self) -> (bool, String) {
        let Ok(s) = self.state.lock() else {
            return (false, "readiness state unavailable\n".into());
        };
        let mut ready = true;
        let mut out = String::new();
        for (name, outcome) in s.iter() {
            match outcome {
                Some(o) => out.push_str(&format!("{name}: {o}\n")),
                None => {
                    ready = false;
                    out.push_str(&format!("{name}: warming up\n"));
                }
            }
        }
        (ready, out)
    }
}

/// Opens `prewarm_connections` connections to the route's upstream by sending that many
/// concurrent `HEAD` requests to its base URL (any HTTP answer means the connection is up and
/// now pooled), dealt out round the event loops' clients, each sent on its own loop. Records
/// the outcome in `readiness` and the metrics.
pub async fn warm_up(
    route: Route,
    clients: Vec<(UpstreamClient, tokio::runtime::Handle)>,
    readiness: Arc<Readiness>,
    metrics: WarmupMetrics,
) {
    let n = route.prewarm_connections;
    let label = route.name.as_str();
    if n == 0 {
        readiness.set(label, "ok (warm-up disabled)".into());
        metrics.ready.with_label_values(&[label]).set(1);
        return;
    }
    let start = Instant::now();
    let uri = format!(
        "{}://{}{}",
        route.target.scheme, route.target.authority, route.target.base_path
    );
    let mut tasks = Vec::with_capacity(n);
    for k in 0..n {
        let Some((client, on)) = clients.get(k % clients.len().max(1)) else {
            break;
        };
        let client = client.clone();
        let uri = uri.clone();
        tasks.push(on.spawn(async move {
            let req = http::Request::head(uri.as_str())
                .body(Either::Right(Full::new(Bytes::new())))
                .map_err(|e| e.to_string())?;
            let resp = client.request(req).await.map_err(|e| error_chain(&e))?;
            // Drain so the connection goes back to the pool.
            let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
            Ok::<(), String>(())
        }));
    }
    let mut failure = None;
    for t in tasks {
        match t.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failure = Some(e),
            Err(e) => failure = Some(e.to_string()),
        }
    }
    let took = start.elapsed();
    metrics
        .seconds
        .with_label_values(&[label])
        .set(took.as_secs_f64());
    match failure {
        None => {
            tracing::info!(route = label, upstream = %route.target.authority, connections = n,
                ms = took.as_secs_f64() * 1e3, "upstream warmed up");
            readiness.set(
                label,
                format!("ok ({n} connections in {} ms)", took.as_millis()),
            );
            metrics.ready.with_label_values(&[label]).set(1);
        }
        Some(reason) => {
            tracing::warn!(route = label, upstream = %route.target.authority, %reason,
                "upstream warm-up failed");
            readiness.set(label, format!("warm-up failed: {reason}"));
            metrics.ready.with_label_values(&[label]).set(0);
        }
    }
}

/// An error and its sources, joined with `: ` (hyper's top-level messages alone say little).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let msg = s.to_string();
        if !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        src = s.source();
    }
    out
}

/// The warm-up's metric families.
#[derive(Clone)]
pub struct WarmupMetrics {
    /// `ctxgate_upstream_warmup_seconds{upstream}`: time the start-up warm-up took.
    pub seconds: prometheus::GaugeVec,
    /// `ctxgate_upstream_ready{upstream}`: 1 once warm-up succeeded, 0 before or on failure.
    pub ready: prometheus::IntGaugeVec,
}

impl WarmupMetrics {
    /// Registers the families, every route's series at 0.
    pub fn register(m: &crate::metrics::Metrics, routes: &[&str]) -> WarmupMetrics {
        let w = WarmupMetrics {
            seconds: m.float_gauge_vec(
                "ctxgate_upstream_warmup_seconds",
                "Time the start-up warm-up took.",
                &["upstream"],
            ),
            ready: m.gauge_vec(
                "ctxgate_upstream_ready",
                "1 once the upstream's warm-up succeeded.",
                &["upstream"],
            ),
        };
        for r in routes {
            w.seconds.with_label_values(&[r]);
            w.ready.with_label_values(&[r]);
        }
        w
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connector whose connection attempts never finish (a black-holed host).
    #[derive(Clone)]
    struct Never;
    impl tower_service::Service<Uri> for Never {
        type Response = ();
        type Error = std::io::Error;
        type Future = std::future::Pending<Result<(), std::io::Error>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), std::io::Error>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: Uri) -> Self::Future {
            std::future::pending()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn connect_timeout_fires_at_its_time() {
        use tower_service::Service;
        let mut c = TimeoutConnector {
            inner: Never,
            timeout: Duration::from_secs(10),
        };
        let t0 = tokio::time::Instant::now();
        let e = c
            .call(Uri::from_static("https://example.invalid/"))
            .await
            .unwrap_err();
        assert_eq!(t0.elapsed(), Duration::from_secs(10));
        assert!(e.downcast_ref::<ConnectTimeout>().is_some());
    }
}
