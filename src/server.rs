//! Listeners: the accept loop of the proxy (HTTP/1.1 and h2c through hyper-util's auto
//! builder) and of the admin endpoints, and graceful shutdown: on the shutdown signal, stop
//! accepting, let in-flight requests (streams included) finish within `shutdown_grace`, then
//! return.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::conn::{ConnKill, Killable};
use crate::proxy::stream::ResponseBody;

/// The connection builder: HTTP/1.1 with keep-alive, and HTTP/2 with prior knowledge (h2c).
fn builder() -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1().timer(TokioTimer::new()).keep_alive(true);
    b.http2().timer(TokioTimer::new());
    b
}

/// How long connections get, once the grace period is over and their calls are cut, to send
/// the error that ends each call before they are dropped.
const CUT_FLUSH: Duration = Duration::from_secs(1);

/// Accepts connections on `listener` and serves each with `handler` until `shutdown`
/// resolves; then stops accepting and waits up to `grace` for open connections to finish.
/// When the grace period ends with connections still open, `cut` is called (it ends the calls
/// still running, each with its error and its record) and they get [`CUT_FLUSH`] more to send
/// it. Returns whether every connection finished within the grace period.
pub async fn serve_until<H, F>(
    listener: TcpListener,
    handler: H,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
    name: &'static str,
    cut: impl FnOnce(),
) -> bool
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<ResponseBody>, Infallible>> + Send + 'static,
{
    let builder = builder();
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        tracing::warn!(listener = name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let h = handler.clone();
                // The connection's kill switch rides in each request, so the request path can
                // close a connection whose client stopped reading.
                let kill = ConnKill::default();
                let io = TokioIo::new(Killable::new(stream, kill.clone()));
                let service = service_fn(move |mut req: Request<Incoming>| {
                    req.extensions_mut().insert(kill.clone());
                    h(req)
                });
                let conn = builder.serve_connection(io, service);
                let fut = graceful.watch(conn.into_owned());
                tokio::spawn(async move {
                    if let Err(e) = fut.await {
                        tracing::debug!(listener = name, error = %e, "connection ended with an error");
                    }
                });
            }
            _ = &mut shutdown => break,
        }
    }
    drop(listener);
    tracing::info!(listener = name, grace = ?grace, "stopped accepting; draining connections");
    let drained = graceful.shutdown();
    tokio::pin!(drained);
    tokio::select! {
        _ = &mut drained => return true,
        _ = tokio::time::sleep(grace) => {}
    }
    tracing::warn!(
        listener = name,
        "grace period over with calls still running; cutting them"
    );
    cut();
    let _ = tokio::time::timeout(CUT_FLUSH, drained).await;
    false
}

/// Serves the admin endpoints until `shutdown` resolves.
pub async fn serve_admin(
    listener: TcpListener,
    admin: Arc<crate::admin::Admin>,
    shutdown: impl Future<Output = ()>,
) {
    let handler = move |req| admin.clone().handle(req);
    serve_until(
        listener,
        handler,
        shutdown,
        Duration::from_secs(1),
        "admin",
        || {},
    )
    .await;
}
