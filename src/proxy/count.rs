//! Count-tokens requests answered by ctxgate (`routes[].count_tokens = "local"`), for upstreams
//! that lack the endpoint (the Anthropic-compatible endpoints of GLM, Kimi, DeepSeek): Anthropic
//! `POST …/v1/messages/count_tokens` and OpenAI `POST …/responses/input_tokens`. The body is a
//! chat body of the route's dialect; the answer is the count pruning uses, in the endpoint's
//! own shape. Runs right after `route`, in place of the other phases: a count is never gated
//! per conversation, never pruned and never forwarded. On `count_tokens = "upstream"` (the
//! default) these requests pass through like any other.

use std::sync::Arc;

use http::StatusCode;

use crate::config::CountTokens;
use crate::error::Error;
use crate::prune::ChatRequest;

use super::call::Call;
use super::heavy::INLINE_BYTES;
use super::identify::read_body;
use super::stream::{simple_response, ResponseBody};
use super::Proxy;

impl Proxy {
    /// The local answer to a count-tokens request of a route that counts locally; `None` for
    /// every other request.
    pub(super) async fn count_locally(
        &self,
        call: &mut Call,
    ) -> Result<Option<http::Response<ResponseBody>>, Error> {
        let Some(route) = call.route.clone() else {
            return Ok(None);
        };
        let wire = call.dialect.wire();
        if route.config.count_tokens != CountTokens::Local
            || !wire.is_count(&call.request.method, call.request.uri.path())
        {
            return Ok(None);
        }
        let super::call::Payload::Stream(body) = std::mem::take(&mut call.payload) else {
            return Ok(None);
        };
        let bytes = read_body(body, self.max_body_bytes, &self.server, None)
            .await?
            .join();
        let big = bytes.len() > INLINE_BYTES;
        let (dialect, counter) = (call.dialect, Arc::clone(&self.pruning.counter));
        let count = move || -> Result<(u64, Option<String>), String> {
            let req = ChatRequest::parse(dialect, &bytes).map_err(|e| e.to_string())?;
            Ok((counter.count_request(&req), req.model().map(str::to_string)))
        };
        let counted = if big {
            let lane = self.heavy_lane(&call.request.headers);
            match self.heavy.run(&lane, count).await {
                Ok(r) => r,
                Err(super::heavy::Refused::Full(n)) => return Err(Error::Busy(n)),
                Err(super::heavy::Refused::Failed) => Err("counting failed".to_string()),
            }
        } else {
            count()
        };
        let (tokens, model) = counted.map_err(Error::BadChatBody)?;
        call.model = model;
        Ok(Some(simple_response(
            StatusCode::OK,
            "application/json",
            wire.count_answer(tokens),
        )))
    }
}
