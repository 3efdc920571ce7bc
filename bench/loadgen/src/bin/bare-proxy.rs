//! The floor under ctxgate: a bare reverse proxy built from the same stack (hyper 1 server
//! via hyper-util's auto builder, hyper-util's pooled legacy client, tokio's multi-thread
//! runtime) that does nothing but forward. No routing table, no body reading, no gates,
//! counting, metrics or records. What ctxgate costs beyond this is its own work; what this
//! costs beyond nginx is the stack's.
//!
//! `bare-proxy --listen 127.0.0.1:0 --upstream http://127.0.0.1:PORT` prints
//! `listening on ADDR` once bound.

use std::net::SocketAddr;

use std::convert::Infallible;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper::http::uri::Authority;
use hyper::{Request, Response, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

#[derive(Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Upstream origin, `http://host:port` (the request's path and query are kept).
    #[arg(long)]
    upstream: String,
    /// Run on tokio's current-thread runtime (one thread) instead of the multi-thread one.
    #[arg(long)]
    current_thread: bool,
}

type Error = Box<dyn std::error::Error + Send + Sync>;
type Body = Either<Incoming, Empty<Bytes>>;

/// Forwards one request; any failure is a bare 502.
async fn forward(
    client: &Client<HttpConnector, Incoming>,
    authority: Authority,
    req: Request<Incoming>,
) -> Response<Body> {
    let (mut parts, body) = req.into_parts();
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_string();
    let Ok(uri) = Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(pq)
        .build()
    else {
        return bad_gateway();
    };
    parts.uri = uri;
    parts.headers.remove(hyper::header::HOST);
    parts.version = hyper::Version::HTTP_11;
    match client.request(Request::from_parts(parts, body)).await {
        Ok(resp) => resp.map(Either::Left),
        Err(_) => bad_gateway(),
    }
}

fn bad_gateway() -> Response<Body> {
    let mut r = Response::new(Either::Right(Empty::new()));
    *r.status_mut() = hyper::StatusCode::BAD_GATEWAY;
    r
}

fn main() -> Result<(), Error> {
    let args = Args::parse();
    let mut rt = if args.current_thread {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    rt.enable_all().build()?.block_on(run(args))
}

async fn run(args: Args) -> Result<(), Error> {
    let upstream: Uri = args.upstream.parse()?;
    let authority = upstream.authority().ok_or("upstream has no host")?.clone();
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> = Client::builder(TokioExecutor::new()).build(http);
    let listener = TcpListener::bind(args.listen).await?;
    println!("listening on {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let (client, authority) = (client.clone(), authority.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (client, authority) = (client.clone(), authority.clone());
                async move { Ok::<_, Infallible>(forward(&client, authority, req).await) }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
