//! Phase 1, route: the longest configured prefix that matches the path picks the route and its
//! upstream, and the upstream URL is formed. Only the path and query of the request target are
//! used, so absolute-form targets and `Host` headers cannot steer ctxgate to another host; dot
//! segments (plain or percent-encoded), encoded slashes and backslashes are refused, and a
//! body announced over `max_body_bytes` is refused before it is read.

use std::sync::Arc;

use http::{header, HeaderMap, Method, Uri};

use crate::config::Route;
use crate::dialect::Dialect;
use crate::error::Error;

use super::call::{Call, RouteState};
use super::Proxy;

impl Proxy {
    /// Routes the call: sets `call.route` and `call.dialect`, and returns the upstream URL.
    pub(super) fn route(&self, call: &mut Call) -> Result<Uri, Error> {
        let route = self
            .find_route(&call.request.method, &call.request.uri)
            .inspect_err(|_| {
                // No route, no dialect: answer in the one the request most likely speaks.
                call.dialect = Dialect::guess(call.request.uri.path(), &call.request.headers);
            })?;
        let path = call.request.uri.path();
        call.dialect = route.config.dialect.for_path(path);
        call.route = Some(route.clone());
        refuse_disguised(&route.config, &call.request.method, path)?;
        if let Some(len) = content_length(&call.request.headers) {
            if len > self.max_body_bytes {
                return Err(Error::BodyTooLarge {
                    limit: self.max_body_bytes,
                });
            }
        }
        let uri = &call.request.uri;
        upstream_uri(&route.config, uri.path(), uri.query())
    }

    /// The longest matching prefix. Only the path is looked at.
    pub fn find_route(&self, method: &Method, uri: &Uri) -> Result<Arc<RouteState>, Error> {
        let path = uri.path();
        if method == Method::CONNECT {
            return Err(Error::BadTarget(
                "CONNECT is not supported: ctxgate is not an open proxy".into(),
            ));
        }
        if method == Method::TRACE {
            return Err(Error::BadTarget(
                "TRACE is not supported: it would echo the request's credentials".into(),
            ));
        }
        check_path(path)?;
        for r in &self.routes {
            let p = r.config.prefix.as_str();
            // "/openai" (no trailing slash) also selects the "/openai/" route.
            if path.starts_with(p) || path == &p[..p.len() - 1] {
                return Ok(r.clone());
            }
        }
        Err(Error::NoRoute {
            method: method.to_string(),
            path: path.to_string(),
            prefixes: self
                .routes
                .iter()
                .map(|r| r.config.prefix.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }
}

/// The path as an upstream that normalises paths would read it: `;` parameters cut,
/// percent-encoded bytes decoded, trailing whitespace and slashes trimmed, repeated slashes
/// collapsed, ASCII lower case. Borrowed when there is nothing to normalise (the common case).
fn canonical(path: &str) -> std::borrow::Cow<'_, str> {
    let odd_byte = path
        .bytes()
        .any(|b| matches!(b, b';' | b'%' | b' ' | b'\t') || b.is_ascii_uppercase());
    let trailing = path.len() > 1 && path.ends_with('/');
    if !(odd_byte || trailing || path.contains("//")) {
        return std::borrow::Cow::Borrowed(path);
    }
    let path = path.split(';').next().unwrap_or("");
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                decoded.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        decoded.push(bytes[i]);
        i += 1;
    }
    let text = String::from_utf8_lossy(&decoded).to_ascii_lowercase();
    let mut out = String::with_capacity(text.len());
    for seg in text.split('/').map(str::trim).filter(|s| !s.is_empty()) {
        out.push('/');
        out.push_str(seg);
    }
    if out.is_empty() {
        out.push('/');
    }
    std::borrow::Cow::Owned(out)
}

/// Refuses a path that is not a chat or count endpoint as written but is one once normalised
/// (`/v1/chat/completions/`, `/v1//chat/completions`, `/v1/Chat/Completions`,
/// `/v1/chat/completions;x`, `/v1/chat/completions%20`): an upstream that normalises paths
/// would serve it as chat, so forwarding it would skip pruning.
fn refuse_disguised(route: &Route, method: &Method, path: &str) -> Result<(), Error> {
    let canon = canonical(path);
    if canon == path {
        return Ok(());
    }
    let endpoint = |p: &str| {
        let wire = route.dialect.for_path(p).wire();
        wire.is_chat(method, p) || wire.is_count(method, p)
    };
    // A path that is an endpoint as written is served as one (an upper-case route prefix,
    // say); only one that becomes an endpoint by normalising is refused.
    if endpoint(&canon) && !endpoint(path) {
        return Err(Error::BadTarget(format!(
            "{path:?} is not a canonical path; write the endpoint as {canon:?}"
        )));
    }
    Ok(())
}

/// Refuses dot segments (plain or percent-encoded) and backslashes, which some upstreams
/// would resolve to a path outside the route's base.
fn check_path(path: &str) -> Result<(), Error> {
    if !path.starts_with('/') {
        return Err(Error::BadTarget(format!(
            "path must start with '/', got {path:?}"
        )));
    }
    for seg in path.split('/') {
        let lower = seg.to_ascii_lowercase();
        let decoded = lower.replace("%2e", ".");
        if decoded == "." || decoded == ".." {
            return Err(Error::BadTarget(format!(
                "dot segments are not allowed in {path:?}"
            )));
        }
        if lower.contains('\\') || lower.contains("%5c") || lower.contains("%2f") {
            return Err(Error::BadTarget(format!(
                "encoded slashes and backslashes are not allowed in {path:?}"
            )));
        }
    }
    Ok(())
}

/// The upstream URL: the route's scheme and host, its base path, then the request path after
/// the prefix, then the query. Nothing from the client can change the scheme or host.
pub(super) fn upstream_uri(route: &Route, path: &str, query: Option<&str>) -> Result<Uri, Error> {
    let rest = path.get(route.prefix.len()..).unwrap_or("");
    let t = &route.target;
    let mut s = String::with_capacity(
        t.scheme.len() + t.authority.len() + t.base_path.len() + rest.len() + 8,
    );
    s.push_str(&t.scheme);
    s.push_str("://");
    s.push_str(&t.authority);
    s.push_str(&t.base_path);
    s.push_str(rest);
    if let Some(q) = query {
        s.push('?');
        s.push_str(q);
    }
    let uri: Uri = s
        .parse()
        .map_err(|_| Error::BadTarget(format!("cannot form an upstream URL from {path:?}")))?;
    // Belt and braces: the host must be the configured one.
    if uri.authority().map(|a| a.as_str()) != Some(t.authority.as_str()) {
        return Err(Error::BadTarget(format!(
            "path {path:?} would change the upstream host"
        )));
    }
    Ok(uri)
}

fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_refused() {
        for p in [
            "/v1/../admin",
            "/v1/%2e%2e/x",
            "/v1/./x",
            "/v1/%2E/x",
            "/v1/a%2fb",
            "/v1/a\\b",
        ] {
            assert!(check_path(p).is_err(), "{p}");
        }
        for p in ["/v1/chat/completions", "/v1//x", "/v1/a..b"] {
            assert!(check_path(p).is_ok(), "{p}");
        }
    }

    #[test]
    fn canonical_paths() {
        for (p, want) in [
            ("/v1/chat/completions", "/v1/chat/completions"),
            ("/v1/chat/completions/", "/v1/chat/completions"),
            ("/v1/chat//completions", "/v1/chat/completions"),
            ("/v1/Chat/Completions", "/v1/chat/completions"),
            ("/v1/chat/completions;", "/v1/chat/completions"),
            ("/v1/chat/completions;jsessionid=1", "/v1/chat/completions"),
            ("/v1/chat/completions%20", "/v1/chat/completions"),
            ("/v1/chat/completions%09%20", "/v1/chat/completions"),
            ("/v1/chat/complet%69ons", "/v1/chat/completions"),
            ("/anthropic/v1/messages/", "/anthropic/v1/messages"),
            ("/", "/"),
            ("/x%", "/x%"),
        ] {
            assert_eq!(canonical(p), want, "{p}");
        }
        assert!(matches!(
            canonical("/v1/models"),
            std::borrow::Cow::Borrowed(_)
        ));
        let route: Route = crate::config::Config::from_toml(
            "[[routes]]\nname = \"r\"\nprefix = \"/OpenAI/\"\nupstream = \"http://x/\"\ndialect = \"openai\"\n",
            Vec::new(),
        )
        .unwrap()
        .routes
        .remove(0);
        let post = Method::POST;
        assert!(refuse_disguised(&route, &post, "/OpenAI/v1/chat/completions").is_ok());
        assert!(refuse_disguised(&route, &post, "/OpenAI/v1/chat/completions/").is_err());
        assert!(refuse_disguised(&route, &post, "/OpenAI/v1/Models").is_ok());
    }
}
