//! Listeners: the accept loop of the proxy (HTTP/1.1 and h2c through hyper-util's auto
//! builder) and of the admin endpoints, the limits on client connections (`[server]`), and
//! graceful shutdown: on the shutdown signal, stop accepting, let in-flight requests (streams
//! included) finish within `shutdown_grace`, then cut what is left and return.
//!
//! Every client connection is closed by something: at most `max_connections` are open (past
//! it, accepting waits); its first bytes must come within `first_bytes_timeout` (a connection
//! that sends nothing, or part of the HTTP/2 preface, is closed); HTTP/1.1 headers within
//! `header_read_timeout` (hyper's timer); with no call in flight and no bytes either way for
//! `idle_timeout`, it is closed (an idle h2c connection, an idle keep-alive); and the request
//! path closes a connection whose client stopped reading (`conn::ConnKill`). Each close is
//! counted by reason in `ctxgate_client_connections_closed_total`.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use prometheus::{IntCounterVec, IntGauge};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::config::Server;
use crate::conn::{set_loop_index, ConnKill, Killable};
use crate::metrics::Metrics;
use crate::proxy::stream::ResponseBody;

/// How long connections get, once the grace period is over and their calls are cut, to send
/// the error that ends each call before they are dropped.
const CUT_FLUSH: Duration = Duration::from_secs(1);

/// Why a client connection closed (the `reason` label).
const CLOSE_REASONS: [&str; 8] = [
    "ended",
    "error",
    "bad_request",
    "first_bytes_timeout",
    "header_read_timeout",
    "idle_timeout",
    "client_write",
    "error_not_taken",
];

/// The client-connection metric families.
#[derive(Clone)]
pub struct ConnMetrics {
    /// `ctxgate_client_connections`: open now.
    pub open: IntGauge,
    /// `ctxgate_client_connections_closed_total{reason}`.
    pub closed: IntCounterVec,
}

impl ConnMetrics {
    /// Registers the families, every reason at 0.
    pub fn register(m: &Metrics) -> ConnMetrics {
        let c = ConnMetrics {
            open: m.gauge(
                "ctxgate_client_connections",
                "Client connections open on the proxy listener.",
            ),
            closed: m.counter_vec(
                "ctxgate_client_connections_closed_total",
                "Client connections closed, by reason: ended (by the client or keep-alive), error, bad_request (hyper answered 400/414/431 to an unparseable request), first_bytes_timeout, header_read_timeout, idle_timeout, client_write (the client stopped reading), error_not_taken (a cut call's client read nothing).",
                &["reason"],
            ),
        };
        for r in CLOSE_REASONS {
            c.closed.with_label_values(&[r]);
        }
        c
    }
}

/// The event loops that serve client connections (`server.io_threads`): single-threaded
/// runtimes, one per thread. The accept loop hands each new connection to the loop with the
/// fewest open connections (ties: the next one round), and the connection, its calls and the
/// tasks they spawn stay on that loop.
///
/// Why: on tokio's work-stealing runtime a call's tasks (the client connection, the upstream
/// connection, the body) wake each other across threads; with one loop per core they wake
/// each other in place. `bench/run`'s closed loop measured the difference (README
/// "Benchmarks").
#[derive(Clone)]
pub struct Loops {
    handles: Arc<[tokio::runtime::Handle]>,
    open: Arc<[AtomicUsize]>,
    next: Arc<AtomicUsize>,
}

impl Loops {
    /// Only the runtime this is called on (tests, the admin listener): connections are spawned
    /// on it with `tokio::spawn`, wherever its scheduler runs them.
    pub fn here() -> Loops {
        Loops::new(vec![tokio::runtime::Handle::current()])
    }

    /// These runtimes; each must be driven (by a thread in `block_on`) for as long as the
    /// server runs.
    pub fn new(handles: Vec<tokio::runtime::Handle>) -> Loops {
        let open = handles.iter().map(|_| AtomicUsize::new(0)).collect();
        Loops {
            handles: handles.into(),
            open,
            next: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The loops' runtimes, in order.
    pub fn handles(&self) -> &[tokio::runtime::Handle] {
        &self.handles
    }

    /// How many loops there are.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Whether there are none (never, for a built `Loops`).
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Connections open on each loop now.
    pub fn open(&self) -> Vec<usize> {
        self.open
            .iter()
            .map(|o| o.load(Ordering::Relaxed))
            .collect()
    }

    /// Prepares an accepted connection to be served on another loop: with more than one,
    /// its socket leaves this loop's poller.
    fn movable(&self, stream: TcpStream) -> Movable {
        if self.handles.len() == 1 {
            return Movable::Here(stream);
        }
        match stream.into_std() {
            Ok(s) => Movable::Std(s),
            Err(e) => Movable::Failed(e),
        }
    }

    /// Spawns a connection's task on the loop with the fewest open connections.
    fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let n = self.handles.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let i = (0..n)
            .map(|k| (start + k) % n)
            .min_by_key(|&i| self.open[i].load(Ordering::Relaxed))
            .unwrap_or(0);
        self.open[i].fetch_add(1, Ordering::Relaxed);
        let open = self.open.clone();
        self.handles[i].spawn(async move {
            task.await;
            open[i].fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// The event loops `main` serves on: single-threaded tokio runtimes, the first driven by the
/// thread that calls [`EventLoops::block_on`] (it also accepts, and runs the admin listener
/// and the background tasks), each other by its own thread (`ctxgate-loop-N`) until
/// [`EventLoops::stop`].
pub struct EventLoops {
    main: tokio::runtime::Runtime,
    others: Vec<(
        tokio::runtime::Handle,
        tokio::sync::oneshot::Sender<()>,
        std::thread::JoinHandle<()>,
    )>,
}

impl EventLoops {
    /// Starts `n` loops (at least one).
    pub fn start(n: usize) -> std::io::Result<EventLoops> {
        let build = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        };
        let main = build()?;
        let mut others = Vec::new();
        for i in 1..n.max(1) {
            let rt = build()?;
            let handle = rt.handle().clone();
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("ctxgate-loop-{i}"))
                .spawn(move || {
                    set_loop_index(i);
                    rt.block_on(async {
                        let _ = stop_rx.await;
                    });
                })?;
            others.push((handle, stop_tx, thread));
        }
        Ok(EventLoops { main, others })
    }

    /// The loops' handles, the main one first (for [`Loops::new`]).
    pub fn handles(&self) -> Vec<tokio::runtime::Handle> {
        std::iter::once(self.main.handle().clone())
            .chain(self.others.iter().map(|(h, _, _)| h.clone()))
            .collect()
    }

    /// Drives the main loop on this thread until `f` completes.
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        set_loop_index(0);
        self.main.block_on(f)
    }

    /// Stops the other loops (their connections are closed by then) and waits for them.
    pub fn stop(self) {
        for (_, stop, thread) in self.others {
            let _ = stop.send(());
            let _ = thread.join();
        }
    }
}

/// An accepted connection on its way to the loop that serves it.
enum Movable {
    /// Registered with the poller of the runtime it is served on.
    Here(TcpStream),
    /// Registered with none, yet.
    Std(std::net::TcpStream),
    /// Could not be taken off the accepting loop's poller (closed).
    Failed(std::io::Error),
}

impl Movable {
    /// The connection, registered with the poller of the runtime this runs on.
    fn settle(self) -> Option<TcpStream> {
        let r = match self {
            Movable::Here(s) => return Some(s),
            Movable::Std(s) => TcpStream::from_std(s),
            Movable::Failed(e) => Err(e),
        };
        r.map_err(|e| tracing::debug!(error = %e, "accepted connection lost on hand-off"))
            .ok()
    }
}

/// The connection builder: HTTP/1.1 with keep-alive, and HTTP/2 with prior knowledge (h2c).
fn builder(limits: &Server) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(limits.header_read_timeout);
    b.http2().timer(TokioTimer::new());
    b
}

/// The start of the HTTP/2 connection preface (h2c with prior knowledge).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Waits until the connection has sent enough to tell its protocol: any first byte that is
/// not the start of the HTTP/2 preface, or the whole preface. `false` if it closed first.
async fn first_bytes(s: &TcpStream) -> bool {
    let mut buf = [0u8; PREFACE.len()];
    loop {
        match s.peek(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) if n >= PREFACE.len() || buf[..n] != PREFACE[..n] => return true,
            // Part of the preface: more must come (peek would return the same bytes at once).
            Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Accepts connections on `listener` and serves each with `handler` until `shutdown`
/// resolves; then stops accepting and waits up to `grace` for open connections to finish.
/// When the grace period ends with connections still open, `cut` is called (it ends the calls
/// still running, each with its error and its record) and they get [`CUT_FLUSH`] more to send
/// it. Returns whether every connection finished within the grace period. Connections are
/// served on `loops`.
#[allow(clippy::too_many_arguments)]
pub async fn serve_until<H, F>(
    listener: TcpListener,
    loops: &Loops,
    handler: H,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
    name: &'static str,
    limits: &Server,
    metrics: Option<ConnMetrics>,
    cut: impl FnOnce(),
) -> bool
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<ResponseBody>, Infallible>> + Send + 'static,
{
    let builder = builder(limits);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    // Turns true when accepting stops: a connection that has not yet said which protocol it
    // speaks has no call to finish, and is closed at once.
    let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        // At most max_connections open: past it, new ones wait in the listen backlog.
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => break,
            },
            _ = &mut shutdown => break,
        };
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        // Accepted here, the socket is registered with this loop's poller; the loop that
        // serves it must own its readiness, or every event would cross threads.
        let stream = loops.movable(stream);
        let h = handler.clone();
        // The connection's kill switch rides in each request, so the request path can close a
        // connection whose client stopped reading.
        let kill = ConnKill::default();
        let service = {
            let kill = kill.clone();
            service_fn(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(kill.clone());
                h(req)
            })
        };
        let (first_bytes_timeout, idle) = (limits.first_bytes_timeout, limits.idle_timeout);
        let metrics = metrics.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let mut stopping = stopping.clone();
        loops.spawn(async move {
            let _slot = slot;
            let Some(stream) = stream.settle() else {
                return;
            };
            if let Some(m) = &metrics {
                m.open.inc();
            }
            let reason = serve_one(
                stream,
                builder,
                service,
                (watcher, &mut stopping),
                kill,
                first_bytes_timeout,
                idle,
                name,
            )
            .await;
            if let Some(m) = &metrics {
                m.open.dec();
                m.closed.with_label_values(&[reason]).inc();
            }
        });
    }
    drop(listener);
    stopping_tx.send_replace(true);
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

/// Serves one connection to its end; returns why it closed.
#[allow(clippy::too_many_arguments)]
async fn serve_one<S>(
    stream: TcpStream,
    builder: auto::Builder<TokioExecutor>,
    service: S,
    (watcher, stopping): (
        hyper_util::server::graceful::Watcher,
        &mut tokio::sync::watch::Receiver<bool>,
    ),
    kill: ConnKill,
    first_bytes_timeout: Duration,
    idle: Duration,
    name: &'static str,
) -> &'static str
where
    S: hyper::service::Service<
            Request<Incoming>,
            Response = Response<ResponseBody>,
            Error = Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    // Until it says which protocol it speaks, a connection has no call to finish: shutdown
    // closes it at once (dropping the watcher, so graceful shutdown does not wait for it).
    let detected = tokio::select! {
        d = tokio::time::timeout(first_bytes_timeout, first_bytes(&stream)) => d,
        _ = stopping.wait_for(|s| *s) => return "ended",
    };
    match detected {
        Ok(true) => {}
        Ok(false) => return "ended",
        Err(_) => return "first_bytes_timeout",
    }
    let io = TokioIo::new(Killable::new(stream, kill.clone()));
    let conn = watcher.watch(builder.serve_connection(io, service).into_owned());
    // The idle check never returns: it kills the connection, whose I/O then fails and ends
    // `conn`.
    let result = tokio::select! {
        r = conn => r,
        never = kill.close_when_idle(idle) => match never {},
    };
    match result {
        Ok(()) => kill.reason().unwrap_or("ended"),
        Err(e) => {
            if let Some(r) = kill.reason() {
                return r;
            }
            let hyper_error = e.downcast_ref::<hyper::Error>();
            tracing::debug!(listener = name, error = %e, "connection ended with an error");
            match hyper_error {
                Some(h) if h.is_timeout() => "header_read_timeout",
                // hyper answers these itself (400, 414, 431, with an empty body) and closes.
                Some(h) if h.is_parse() || h.is_parse_status() => "bad_request",
                _ => "error",
            }
        }
    }
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
        &Loops::here(),
        handler,
        shutdown,
        Duration::from_secs(1),
        "admin",
        &Server::default(),
        None,
        || {},
    )
    .await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Sends one keep-alive request on `s` and returns the body of the answer.
    async fn ask(s: &mut TcpStream) -> String {
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let mut got = Vec::new();
        loop {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before the answer");
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got).to_string();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .unwrap()
                    .parse()
                    .unwrap();
                if body.len() >= len {
                    return body[..len].to_string();
                }
            }
        }
    }

    /// Connections are spread over the loops by open connections (four open at once: two on
    /// each), each served on the loop it was handed to (its requests answer from there, every
    /// one), and the counts go back to zero as they close.
    #[test]
    fn connections_are_spread_over_the_loops_and_stay_on_theirs() {
        let loops = EventLoops::start(2).unwrap();
        let handles = loops.handles();
        loops.block_on(async move {
            let spread = Loops::new(handles);
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let s2 = spread.clone();
            let server = tokio::spawn(async move {
                let handler = |_req: Request<Incoming>| async {
                    let here = format!("{}", crate::conn::loop_index());
                    Ok::<_, Infallible>(crate::proxy::stream::simple_response(
                        http::StatusCode::OK,
                        "text/plain",
                        here,
                    ))
                };
                serve_until(
                    listener,
                    &s2,
                    handler,
                    async {
                        let _ = stop_rx.await;
                    },
                    Duration::from_secs(1),
                    "test",
                    &Server::default(),
                    None,
                    || {},
                )
                .await
            });
            let mut conns = Vec::new();
            let mut served = Vec::new();
            for _ in 0..4 {
                let mut s = TcpStream::connect(addr).await.unwrap();
                served.push(ask(&mut s).await);
                conns.push(s);
            }
            let mut sorted = served.clone();
            sorted.sort();
            assert_eq!(sorted, ["0", "0", "1", "1"], "served on {served:?}");
            assert_eq!(spread.open(), [2, 2]);
            // Each connection keeps its loop.
            for (s, first) in conns.iter_mut().zip(&served) {
                for _ in 0..3 {
                    assert_eq!(&ask(s).await, first);
                }
            }
            drop(conns);
            for _ in 0..200 {
                if spread.open() == [0, 0] {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(spread.open(), [0, 0]);
            let _ = stop_tx.send(());
            assert!(server.await.unwrap(), "drained within the grace period");
        });
        loops.stop();
    }
}
