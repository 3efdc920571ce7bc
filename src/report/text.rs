//! The report as aligned tables for a terminal (`ctxgate report` without `--json`), and the
//! number formats the page shares.

use std::fmt::Write;

/// The key columns of a per-route, model and day table: (heading, right-aligned).
pub(super) const KEY_COLUMNS: [(&str, bool); 3] =
    [("route", false), ("model", false), ("day", false)];

/// The figures of the tokens table ([`token_cells`]), after the key columns.
pub(super) const TOKEN_COLUMNS: [(&str, bool); 8] = [
    ("calls", true),
    ("holdout", true),
    ("tokens before", true),
    ("tokens after", true),
    ("saved", true),
    ("input", true),
    ("cache read", true),
    ("cache %", true),
];

/// The figures of the cost table ([`cost_cells`]), after the key columns.
pub(super) const COST_COLUMNS: [(&str, bool); 7] = [
    ("priced", true),
    ("cost", true),
    ("unpruned", true),
    ("saved", true),
    ("summaries", true),
    ("summary cost", true),
    ("net saved", true),
];

use super::{Figures, Group, Report};

/// `1234567` as `1,234,567`.
pub fn int(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A share as a percentage with one decimal, `-` when there is none.
pub fn pct(share: Option<f64>) -> String {
    share.map_or_else(|| "-".to_string(), |s| format!("{:.1}%", s * 100.0))
}

/// US dollars with four decimals (`$0.0215`, `-$0.0010`).
pub fn money(usd: f64) -> String {
    if usd < 0.0 && usd.abs() >= 0.000_05 {
        format!("-${:.4}", usd.abs())
    } else {
        format!("${:.4}", usd.abs())
    }
}

/// A cost figure, `-` when no call had an estimate.
fn cost(usd: f64, priced: u64) -> String {
    if priced == 0 {
        "-".to_string()
    } else {
        money(usd)
    }
}

/// A mean or other fractional figure with `decimals`, `-` when there is none.
pub fn num(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.decimals$}"))
}

/// Milliseconds, `-` when there are none.
pub fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.0} ms"))
}

/// Columns, left-aligned (`false`) or right-aligned (`true`), and their rows; a row of `None`
/// draws a rule.
struct Table {
    head: Vec<(&'static str, bool)>,
    rows: Vec<Option<Vec<String>>>,
}

impl Table {
    fn render(&self, out: &mut String) {
        let mut width: Vec<usize> = self.head.iter().map(|(h, _)| h.chars().count()).collect();
        for row in self.rows.iter().flatten() {
            for (w, cell) in width.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let line = |out: &mut String, cells: Vec<&str>| {
            let mut s = String::new();
            for (i, cell) in cells.iter().enumerate() {
                let pad = width[i].saturating_sub(cell.chars().count());
                if i > 0 {
                    s.push_str("  ");
                }
                if self.head[i].1 {
                    s.push_str(&" ".repeat(pad));
                    s.push_str(cell);
                } else {
                    s.push_str(cell);
                    s.push_str(&" ".repeat(pad));
                }
            }
            out.push_str(s.trim_end());
            out.push('\n');
        };
        let rule = |out: &mut String| {
            let total = width.iter().sum::<usize>() + 2 * width.len().saturating_sub(1);
            out.push_str(&"-".repeat(total));
            out.push('\n');
        };
        line(out, self.head.iter().map(|(h, _)| *h).collect());
        rule(out);
        for row in &self.rows {
            match row {
                Some(cells) => line(out, cells.iter().map(String::as_str).collect()),
                None => rule(out),
            }
        }
    }
}

pub(crate) fn token_cells(f: &Figures) -> Vec<String> {
    vec![
        int(f.calls),
        int(f.holdout_calls),
        int(f.tokens_before),
        int(f.tokens_after),
        pct(f.saved_share),
        int(f.input_tokens),
        int(f.cache_read_tokens),
        pct(f.cache_read_share),
    ]
}

pub(crate) fn cost_cells(f: &Figures) -> Vec<String> {
    let summary_priced = u64::from(f.summary_calls > 0);
    vec![
        int(f.priced_calls),
        cost(f.cost_usd, f.priced_calls),
        cost(f.cost_unpruned_usd, f.priced_calls),
        cost(f.cost_saved_usd, f.priced_calls),
        int(f.summary_calls),
        cost(f.summary_cost_usd, summary_priced),
        cost(f.net_saved_usd, f.priced_calls + summary_priced),
    ]
}

fn keyed(report: &Report, cells: fn(&Figures) -> Vec<String>) -> Vec<Option<Vec<String>>> {
    let mut rows: Vec<Option<Vec<String>>> = report
        .rows
        .iter()
        .map(|r| {
            let mut v = vec![
                r.route.clone(),
                r.model.clone().unwrap_or_else(|| "-".into()),
                r.day.to_string(),
            ];
            v.extend(cells(&r.figures));
            Some(v)
        })
        .collect();
    rows.push(None);
    let mut total = vec!["total".to_string(), String::new(), String::new()];
    total.extend(cells(&report.totals));
    rows.push(Some(total));
    rows
}

/// The comparison's lines: label, then one figure per group (pruned, holdout).
pub fn comparison_lines(report: &Report) -> Vec<(&'static str, String, String)> {
    let (p, h) = (&report.holdout.pruned, &report.holdout.holdout);
    let both = |f: &dyn Fn(&Group) -> String| (f(p), f(h));
    let finish = |pick: fn(&super::FinishShares) -> f64| {
        move |g: &Group| pct(g.finish_reasons.as_ref().map(pick))
    };
    let rows: Vec<(&'static str, (String, String))> = vec![
        ("calls", both(&|g| int(g.calls))),
        ("conversations", both(&|g| int(g.conversations))),
        (
            "calls per conversation",
            both(&|g| num(g.calls_per_conversation, 2)),
        ),
        (
            "mean output tokens",
            both(&|g| num(g.mean_output_tokens, 1)),
        ),
        ("error rate", both(&|g| pct(g.error_rate))),
        ("finish: stop", both(&finish(|s| s.stop))),
        ("finish: length", both(&finish(|s| s.length))),
        ("finish: tool call", both(&finish(|s| s.tool))),
        ("finish: other", both(&finish(|s| s.other))),
        ("finish: none recorded", both(&finish(|s| s.none))),
        ("latency p50", both(&|g| ms(g.latency_p50_ms))),
        ("latency p95", both(&|g| ms(g.latency_p95_ms))),
        (
            "mean tokens sent",
            both(&|g| {
                g.mean_tokens_sent
                    .map_or_else(|| "-".into(), |v| int(v.round() as u64))
            }),
        ),
        ("cache-read share", both(&|g| pct(g.cache_read_share))),
        (
            "mean cost per call",
            both(&|g| g.mean_cost_usd.map_or_else(|| "-".into(), money)),
        ),
    ];
    rows.into_iter().map(|(l, (a, b))| (l, a, b)).collect()
}

/// What the report covers, in one line.
pub fn coverage(report: &Report) -> String {
    let f = &report.filter;
    let days = match (&f.since, &f.until) {
        (None, None) => "all days".to_string(),
        (Some(s), None) => format!("from {s}"),
        (None, Some(u)) => format!("up to {u}"),
        (Some(s), Some(u)) => format!("{s} to {u}"),
    };
    let route = f
        .route
        .as_ref()
        .map_or_else(|| "all routes".to_string(), |r| format!("route {r}"));
    format!("{days}, {route} (UTC days)")
}

/// Where the records came from, in one line.
pub fn source_line(report: &Report) -> String {
    let s = &report.source;
    let mut line = match s.files {
        Some(n) => format!(
            "{} records from {} JSONL file{}",
            int(s.records),
            int(n),
            if n == 1 { "" } else { "s" }
        ),
        None => format!("{} rows from PostgreSQL", int(s.records)),
    };
    let _ = write!(line, ", {} covered", int(s.matched));
    if s.malformed_lines > 0 {
        let _ = write!(
            line,
            "; {} malformed line{} skipped",
            int(s.malformed_lines),
            if s.malformed_lines == 1 { "" } else { "s" }
        );
    }
    if s.other_kinds > 0 {
        let _ = write!(line, "; {} of unknown kind left out", int(s.other_kinds));
    }
    line
}

/// The report as aligned tables.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "ctxgate report: {}", coverage(report));
    let _ = writeln!(out, "{}\n", source_line(report));

    let _ = writeln!(
        out,
        "Tokens (ctxgate's counts before/after pruning; upstream input and cache reads; \
         holdout calls are counted, not summed)"
    );
    let key = KEY_COLUMNS;
    let mut head = key.to_vec();
    head.extend(TOKEN_COLUMNS);
    Table {
        head,
        rows: keyed(report, token_cells),
    }
    .render(&mut out);

    let _ = writeln!(
        out,
        "\nCost (US dollar estimates from the upstream's usage and [[prices]]; summaries are \
         ctxgate's own calls)"
    );
    let mut head = key.to_vec();
    head.extend(COST_COLUMNS);
    Table {
        head,
        rows: keyed(report, cost_cells),
    }
    .render(&mut out);

    let _ = writeln!(out, "\nHoldout vs pruned (client calls, by conversation)");
    Table {
        head: vec![("", false), ("pruned", true), ("holdout", true)],
        rows: comparison_lines(report)
            .into_iter()
            .map(|(l, a, b)| Some(vec![l.to_string(), a, b]))
            .collect(),
    }
    .render(&mut out);
    if report.holdout.holdout.calls == 0 {
        let _ = writeln!(
            out,
            "No holdout calls: set prune.holdout_percent to forward a share of conversations \
             unpruned and compare."
        );
    }
    out
}
