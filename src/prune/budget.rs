//! The budget of one request, decided here and nowhere else. Config validates each level of
//! `[prune]` (top-level table → route → model entry, each inheriting from the one above) into
//! a [`Budget`]; for one request, [`Budget::for_request`] picks the model's entry (first
//! matching glob) or the route's, and lowers it to the request's own `x-ctxgate-token-limit`;
//! inside `prune`, [`Budget::limit`] takes the request's `max_tokens` off the hard limit when
//! `reserve_output` is set.

use crate::config::RoutePrune;

use super::{Budget, ChatRequest};

/// The hard limit one request is pruned to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// Prompt tokens allowed.
    pub tokens: u64,
    /// Whether `reserve_output` lowered it (named in a rejection's message).
    pub reserved: bool,
}

impl Budget {
    /// The budget for one request of a route: its model's entry or the route's, lowered (never
    /// raised) to `header_limit` when the request sent a smaller one. The target keeps its
    /// ratio to the limit.
    pub fn for_request(
        route: &RoutePrune,
        model: Option<&str>,
        header_limit: Option<u64>,
    ) -> Budget {
        let mut b = model
            .and_then(|m| route.models.iter().find(|e| glob_match(&e.pattern, m)))
            .map_or(&route.budget, |e| &e.budget)
            .clone();
        if let Some(l) = header_limit {
            if l < b.hard_token_limit {
                b.target_tokens = (u128::from(b.target_tokens) * u128::from(l)
                    / u128::from(b.hard_token_limit.max(1)))
                    as u64;
                b.target_tokens = b.target_tokens.clamp(1, l);
                b.hard_token_limit = l;
            }
        }
        b
    }

    /// The hard limit for `req`: `hard_token_limit`, minus the request's `max_tokens` /
    /// `max_completion_tokens` when `reserve_output` is set.
    pub fn limit(&self, req: &ChatRequest) -> Limit {
        let reserve = if self.reserve_output {
            req.max_output_tokens().unwrap_or(0)
        } else {
            0
        };
        let tokens = self.hard_token_limit.saturating_sub(reserve);
        Limit {
            tokens,
            reserved: tokens < self.hard_token_limit,
        }
    }
}

pub use crate::prices::glob_match;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("gpt-4o*", "gpt-4o-mini"));
        assert!(glob_match("*", "x"));
        assert!(glob_match("claude-*-4-5", "claude-sonnet-4-5"));
        assert!(!glob_match("claude-*-4-5", "claude-sonnet-4-1"));
        assert!(glob_match("glm-4", "glm-4"));
        assert!(!glob_match("glm-4", "glm-4.5"));
        assert!(!glob_match("a*a", "a"));
    }
}
