//! Phase 5, forward: the request goes to the route's pooled client (`upstream`) with
//! hop-by-hop headers removed, `Host` set by the client from the upstream URL and everything
//! else passed through as is (`Authorization` and `x-api-key` included, never logged). An
//! unchanged body is forwarded byte for byte; a pruned one has its `Content-Length` already
//! fixed by the prune phase. The wait for the response headers is bounded by
//! `timeouts.connect` (in the connector), `timeouts.response_headers` and `timeouts.total`.

use http::header::{self, HeaderMap, HeaderName};
use http::{Request, Response, Uri, Version};
use http_body_util::{Either, Full, Limited};
use hyper::body::Incoming;

use crate::config::{Route, Timeouts};
use crate::error::{Error, Phase};

use super::call::{Call, Payload};
use super::upstream::{error_chain, ConnectTimeout, RequestBody};
use super::Proxy;

impl Proxy {
    /// Sends the call's request upstream and waits for the response headers.
    pub(super) async fn forward(
        &self,
        call: &mut Call,
        uri: Uri,
    ) -> Result<Response<Incoming>, Error> {
        let Some(route) = call.route.clone() else {
            return Err(Error::BadTarget("no route".into()));
        };
        let cfg = &route.config;
        let body: RequestBody = match std::mem::take(&mut call.payload) {
            Payload::Stream(b) => {
                let limit = usize::try_from(self.max_body_bytes).unwrap_or(usize::MAX);
                Either::Left(Limited::new(b, limit))
            }
            Payload::Opaque(b) | Payload::Chat(b, _) | Payload::Ready(b) => {
                Either::Right(Full::new(b))
            }
            Payload::Taken => Either::Right(Full::new(bytes::Bytes::new())),
        };
        let mut parts = std::mem::replace(&mut call.request, Request::new(()).into_parts().0);
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(header::HOST);
        parts.uri = uri;
        // Keep what the record and the response phase still read.
        call.request.method = parts.method.clone();
        call.request.version = parts.version;
        parts.version = Version::HTTP_11;
        let up_req = Request::from_parts(parts, body);

        call.forwarded_at = Some(std::time::Instant::now());
        let deadline = tokio::time::Instant::now() + cfg.timeouts.total;
        call.deadline = Some(deadline);
        tokio::select! {
            r = await_headers(route.client().request(up_req), &cfg.timeouts, deadline) => {
                r?.map_err(|e| classify(&e, cfg, self.max_body_bytes))
            }
            _ = self.cut_signal() => Err(Error::ShuttingDown),
        }
    }
}

/// Waits for the upstream's response headers, bounded by `timeouts.response_headers` and by
/// the call's `total` deadline, whichever comes first; the error names the phase that fired.
pub async fn await_headers<F: std::future::Future>(
    fut: F,
    timeouts: &Timeouts,
    deadline: tokio::time::Instant,
) -> Result<F::Output, Error> {
    let headers_deadline = (tokio::time::Instant::now() + timeouts.response_headers).min(deadline);
    match tokio::time::timeout_at(headers_deadline, fut).await {
        Ok(out) => Ok(out),
        Err(_) if headers_deadline >= deadline => Err(Error::Timeout {
            phase: Phase::Total,
            after: timeouts.total,
        }),
        Err(_) => Err(Error::Timeout {
            phase: Phase::ResponseHeaders,
            after: timeouts.response_headers,
        }),
    }
}

/// Whether a header name (lowercase, as `http` keeps them) is always hop-by-hop.
fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection" | "keep-alive" | "te" | "trailer" | "transfer-encoding" | "upgrade"
    ) || name.starts_with("proxy-")
}

/// Removes hop-by-hop headers: those `Connection` names, then the fixed list of RFC 9110
/// (see [`is_hop_by_hop`]; any other `Proxy-*` header is meant for a proxy, i.e. for ctxgate,
/// not the upstream).
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Most messages carry none: one pass over the names decides (a header `Connection`
    // names is only hop-by-hop when `Connection` itself is present).
    if !h.keys().any(|k| is_hop_by_hop(k.as_str())) {
        return;
    }
    let mut hop: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    hop.extend(h.keys().filter(|k| is_hop_by_hop(k.as_str())).cloned());
    for n in hop {
        h.remove(n);
    }
}

/// Maps a client error to what the caller sees.
fn classify(e: &hyper_util::client::legacy::Error, route: &Route, max_body: u64) -> Error {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = src {
        if let Some(t) = s.downcast_ref::<ConnectTimeout>() {
            return Error::Timeout {
                phase: Phase::Connect,
                after: t.0,
            };
        }
        if s.downcast_ref::<http_body_util::LengthLimitError>()
            .is_some()
        {
            return Error::BodyTooLarge { limit: max_body };
        }
        src = s.source();
    }
    let reason = error_chain(e);
    if e.is_connect() {
        Error::UpstreamConnect {
            upstream: route.target.authority.clone(),
            reason,
        }
    } else {
        Error::UpstreamReset {
            upstream: route.target.authority.clone(),
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use http::StatusCode;
    use std::time::Duration;
    use tokio::time::Instant;

    #[test]
    fn hop_by_hop_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("proxy-foo", HeaderValue::from_static("1"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer sk-x"),
        );
        h.insert("x-api-key", HeaderValue::from_static("k"));
        strip_hop_by_hop(&mut h);
        let mut keys: Vec<_> = h.keys().map(|k| k.as_str().to_string()).collect();
        keys.sort();
        assert_eq!(keys, ["authorization", "x-api-key"]);

        // Each hop-by-hop header alone is removed; a name that only `Connection` could make
        // hop-by-hop stays when there is no `Connection`.
        for name in [
            "connection",
            "keep-alive",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "proxy-authorization",
            "proxy-connection",
            "proxy-anything",
        ] {
            let mut h = HeaderMap::new();
            h.insert(HeaderName::from_static(name), HeaderValue::from_static("1"));
            h.insert("x-secret-hop", HeaderValue::from_static("1"));
            strip_hop_by_hop(&mut h);
            let keys: Vec<_> = h.keys().map(|k| k.as_str().to_string()).collect();
            assert_eq!(keys, ["x-secret-hop"], "{name}");
        }
    }

    const T: Timeouts = Timeouts {
        connect: Duration::from_secs(10),
        response_headers: Duration::from_secs(120),
        stream_idle: Duration::from_secs(60),
        total: Duration::from_secs(300),
        client_write: Duration::from_secs(30),
    };

    #[tokio::test(start_paused = true)]
    async fn response_headers_fires_at_its_time() {
        let t0 = Instant::now();
        let e = await_headers(std::future::pending::<()>(), &T, t0 + T.total)
            .await
            .unwrap_err();
        assert_eq!(t0.elapsed(), Duration::from_secs(120));
        assert_eq!(e.kind(), "timeout_response_headers");
        assert_eq!(e.status(), StatusCode::GATEWAY_TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn total_fires_first_when_less_is_left() {
        let t0 = Instant::now();
        // 250 s of the call already spent (say, in a slow upload): 50 s are left of total.
        let deadline = t0 + Duration::from_secs(50);
        let e = await_headers(std::future::pending::<()>(), &T, deadline)
            .await
            .unwrap_err();
        assert_eq!(t0.elapsed(), Duration::from_secs(50));
        assert_eq!(e.kind(), "timeout_total");
        assert_eq!(
            e.to_string(),
            "upstream call did not finish within 300s (timeouts.total)"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn headers_in_time_pass_through() {
        let t0 = Instant::now();
        let fut = async {
            tokio::time::sleep(Duration::from_secs(119)).await;
            7
        };
        assert_eq!(await_headers(fut, &T, t0 + T.total).await.unwrap(), 7);
    }
}
