//! Model prices, for estimating what a call cost and what pruning saved. `[prices]` in the
//! config maps a model-name glob to its prices in US dollars per million tokens; its entries
//! come first, then the shipped table below ([`SHIPPED`], list prices as the providers
//! published them on [`SHIPPED_TAKEN`]). The first matching glob wins.
//!
//! Costs are estimates: from the upstream's reported usage (what it billed), with ctxgate's
//! own count only for the part pruning removed. A model without a price has no cost.

use serde::Serialize;

/// The date the shipped prices were taken from the providers' pricing pages.
pub const SHIPPED_TAKEN: &str = "2025-11-20";

/// Prices of one model, US dollars per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Price {
    /// Prompt tokens not served from the cache.
    pub input: f64,
    /// Prompt tokens served from the provider's cache (read).
    pub cached_input: f64,
    /// Prompt tokens written to the provider's cache (Anthropic charges a premium for them;
    /// elsewhere the input price).
    pub cache_write: f64,
    /// Completion tokens.
    pub output: f64,
}

/// A glob and its prices.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PriceEntry {
    /// Model-name glob (`*` matches any run of characters).
    #[serde(rename = "match")]
    pub pattern: String,
    /// The prices.
    #[serde(flatten)]
    pub price: Price,
}

const fn p(input: f64, cached_input: f64, cache_write: f64, output: f64) -> Price {
    Price {
        input,
        cached_input,
        cache_write,
        output,
    }
}

/// The shipped table, most specific globs first (taken [`SHIPPED_TAKEN`]).
pub const SHIPPED: &[(&str, Price)] = &[
    // OpenAI (cache writes cost the input price).
    ("gpt-5-nano*", p(0.05, 0.005, 0.05, 0.40)),
    ("gpt-5-mini*", p(0.25, 0.025, 0.25, 2.00)),
    ("gpt-5*", p(1.25, 0.125, 1.25, 10.00)),
    ("gpt-4.1-nano*", p(0.10, 0.025, 0.10, 0.40)),
    ("gpt-4.1-mini*", p(0.40, 0.10, 0.40, 1.60)),
    ("gpt-4.1*", p(2.00, 0.50, 2.00, 8.00)),
    ("gpt-4o-mini*", p(0.15, 0.075, 0.15, 0.60)),
    ("gpt-4o*", p(2.50, 1.25, 2.50, 10.00)),
    ("o4-mini*", p(1.10, 0.275, 1.10, 4.40)),
    ("o3-mini*", p(1.10, 0.55, 1.10, 4.40)),
    ("o3*", p(2.00, 0.50, 2.00, 8.00)),
    // Anthropic (cache writes at 1.25x input, the 5-minute cache).
    ("claude-opus-4-5*", p(5.00, 0.50, 6.25, 25.00)),
    ("claude-opus-4*", p(15.00, 1.50, 18.75, 75.00)),
    ("claude-sonnet-4*", p(3.00, 0.30, 3.75, 15.00)),
    ("claude-3-7-sonnet*", p(3.00, 0.30, 3.75, 15.00)),
    ("claude-haiku-4-5*", p(1.00, 0.10, 1.25, 5.00)),
    ("claude-3-5-haiku*", p(0.80, 0.08, 1.00, 4.00)),
    // DeepSeek (V3.2, one price for chat and reasoner).
    ("deepseek-*", p(0.28, 0.028, 0.28, 0.42)),
    // Zhipu GLM.
    ("glm-4.6*", p(0.60, 0.11, 0.60, 2.20)),
    ("glm-4.5-air*", p(0.20, 0.03, 0.20, 1.10)),
    ("glm-4.5*", p(0.60, 0.11, 0.60, 2.20)),
    // Moonshot Kimi.
    ("kimi-k2*", p(0.60, 0.15, 0.60, 2.50)),
];

/// The price table: the config's entries, then the shipped ones.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(transparent)]
pub struct Prices {
    /// `[prices]` entries, in the order written.
    pub entries: Vec<PriceEntry>,
}

impl Prices {
    /// The price of `model`, and the glob that matched it (a bounded metric label).
    pub fn find(&self, model: &str) -> Option<(&str, Price)> {
        self.find_indexed(model).map(|(_, g, p)| (g, p))
    }

    /// [`Prices::find`], with the matching entry's place in the whole table (the config's
    /// entries, then the shipped ones): a dense key, below [`Prices::table_len`], for state
    /// kept per priced model.
    pub fn find_indexed(&self, model: &str) -> Option<(usize, &str, Price)> {
        self.table()
            .enumerate()
            .find_map(|(i, (g, p))| glob_match(g, model).then_some((i, g, p)))
    }

    /// The glob of the entry at `index` of the whole table.
    pub fn glob(&self, index: usize) -> Option<&str> {
        self.table().nth(index).map(|(g, _)| g)
    }

    /// Entries in the whole table: the config's and the shipped ones.
    pub fn table_len(&self) -> usize {
        self.entries.len() + SHIPPED.len()
    }

    fn table(&self) -> impl Iterator<Item = (&str, Price)> {
        self.entries
            .iter()
            .map(|e| (e.pattern.as_str(), e.price))
            .chain(SHIPPED.iter().map(|(g, p)| (*g, *p)))
    }
}

/// What a call's usage cost, in US dollars. `input` counts every prompt token, cached ones
/// included (ctxgate's usage tap gives it so for every dialect).
pub fn cost(price: &Price, input: u64, cache_read: u64, cache_write: u64, output: u64) -> f64 {
    let fresh = input.saturating_sub(cache_read).saturating_sub(cache_write);
    (fresh as f64 * price.input
        + cache_read as f64 * price.cached_input
        + cache_write as f64 * price.cache_write
        + output as f64 * price.output)
        / 1e6
}

/// What `removed` prompt tokens would have cost had they been sent, at the call's own mix of
/// cached and fresh prompt tokens (the part pruning removes is the oldest, which an unpruned
/// conversation would often have read from the cache).
pub fn removed_cost(price: &Price, removed: u64, input: u64, cache_read: u64) -> f64 {
    let share = if input > 0 {
        (cache_read as f64 / input as f64).clamp(0.0, 1.0)
    } else {
        0.0
    };
    removed as f64 * (share * price.cached_input + (1.0 - share) * price.input) / 1e6
}

/// `*`-only glob matching (case-sensitive), enough for model names. Allocates nothing: it
/// runs on every call, over the price table.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let mut parts = parts.peekable();
    if parts.peek().is_none() {
        return rest.is_empty();
    }
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            // The last part ends the text, after whatever the parts before it took.
            return rest.len() >= part.len() && rest.ends_with(part);
        }
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_entries_come_before_the_shipped_ones() {
        let prices = Prices {
            entries: vec![PriceEntry {
                pattern: "gpt-4o".into(),
                price: p(1.0, 0.5, 1.0, 2.0),
            }],
        };
        assert_eq!(
            prices.find("gpt-4o").map(|(g, p)| (g, p.input)),
            Some(("gpt-4o", 1.0))
        );
        assert_eq!(
            prices.find("gpt-4o-mini").map(|(g, p)| (g, p.input)),
            Some(("gpt-4o-mini*", 0.15))
        );
        assert_eq!(prices.find("llama-3"), None);
        // The index counts the config's entries first, then the shipped ones.
        let (i, g, _) = prices.find_indexed("gpt-4o-mini").unwrap();
        assert_eq!((prices.glob(i), g), (Some("gpt-4o-mini*"), "gpt-4o-mini*"));
        assert_eq!(prices.find_indexed("gpt-4o").map(|(i, _, _)| i), Some(0));
        assert_eq!(prices.table_len(), SHIPPED.len() + 1);
        assert_eq!(prices.glob(prices.table_len()), None);
    }

    #[test]
    fn every_shipped_glob_is_reachable() {
        // A glob shadowed by an earlier, more general one would never match.
        for (i, (g, _)) in SHIPPED.iter().enumerate() {
            let name = g.replace('*', "-x");
            let first = SHIPPED.iter().position(|(h, _)| glob_match(h, &name));
            assert_eq!(first, Some(i), "{g} is shadowed");
        }
    }

    #[test]
    fn globs() {
        for (p, t, want) in [
            ("gpt-4o*", "gpt-4o-mini", true),
            ("*", "x", true),
            ("*", "", true),
            ("claude-*-4-5", "claude-sonnet-4-5", true),
            ("claude-*-4-5", "claude-sonnet-4-1", false),
            ("glm-4", "glm-4", true),
            ("glm-4", "glm-4.5", false),
            ("a*a", "a", false),
            ("a*a", "aa", true),
            ("a*b*c", "axbyc", true),
            ("a*b*c", "acb", false),
            ("*mini", "gpt-4o-mini", true),
            ("ab*ba", "aba", false),
        ] {
            assert_eq!(glob_match(p, t), want, "{p} ~ {t}");
        }
    }

    #[test]
    fn costs() {
        let price = p(3.0, 0.3, 3.75, 15.0);
        // 1M prompt tokens: 600k read from the cache, 100k written, 300k fresh; 10k output.
        let c = cost(&price, 1_000_000, 600_000, 100_000, 10_000);
        let want = 0.3 * 3.0 + 0.6 * 0.3 + 0.1 * 3.75 + 0.01 * 15.0;
        assert!((c - want).abs() < 1e-9, "{c} vs {want}");
        // Half the prompt was cached: removed tokens cost the half-and-half price.
        let r = removed_cost(&price, 1_000_000, 1000, 500);
        assert!((r - (0.5 * 0.3 + 0.5 * 3.0)).abs() < 1e-9);
        assert_eq!(removed_cost(&price, 0, 0, 0), 0.0);
    }
}
