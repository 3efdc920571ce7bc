//! The admin listener: `/metrics` (Prometheus text format), `/healthz` (200 while the process
//! runs) and `/readyz` (503 until every upstream finished its warm-up, then 200; the body says
//! how each warm-up went). It is a separate listener so that scrapes and probes never queue
//! behind proxied traffic and are never exposed on the proxy's address.

use std::convert::Infallible;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::metrics::Metrics;
use crate::proxy::stream::{simple_response, ResponseBody};
use crate::proxy::upstream::Readiness;

/// What the admin endpoints read.
pub struct Admin {
    /// The metrics to render.
    pub metrics: Metrics,
    /// Warm-up state per upstream.
    pub readiness: Arc<Readiness>,
    /// Called before each scrape to refresh gauges computed on demand.
    pub before_scrape: Option<Box<dyn Fn() + Send + Sync>>,
}

impl Admin {
    /// Serves one admin request.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<ResponseBody>, Infallible> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return Ok(simple_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "use GET\n",
            ));
        }
        let resp = match req.uri().path() {
            "/metrics" => {
                if let Some(f) = &self.before_scrape {
                    f();
                }
                simple_response(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    self.metrics.render(),
                )
            }
            "/healthz" => simple_response(StatusCode::OK, "text/plain", "ok\n"),
            "/readyz" => {
                let (ready, report) = self.readiness.report();
                let status = if ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                simple_response(status, "text/plain", report)
            }
            _ => simple_response(
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found: try /metrics, /healthz or /readyz\n",
            ),
        };
        Ok(resp)
    }
}
