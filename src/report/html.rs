//! The report as one self-contained HTML page (`ctxgate report --html FILE`): inline CSS and
//! inline SVG charts, no script, no external resource, so it opens from a file, a mail
//! attachment or an air-gapped machine alike.
//!
//! Charts: tokens before against after per day, cost saved per day, cache-read share per
//! day, and holdout against pruned; then the report's tables. Every bar carries a `<title>`,
//! which browsers show on hover.

use std::fmt::Write;

use super::text::{comparison_lines, coverage, int, money, pct, source_line};
use super::{Figures, Group, Report};

/// `s` with HTML's special characters escaped (text and attribute values alike).
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = r#"
:root { --ink: #0f172a; --muted: #64748b; --line: #e2e8f0; --card: #ffffff; --bg: #f8fafc;
  --before: #94a3b8; --after: #0f766e; --saved: #16a34a; --loss: #dc2626; --cache: #2563eb;
  --pruned: #0f766e; --holdout: #d97706; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 28px 24px 48px; }
h1 { font-size: 24px; margin: 0 0 4px; letter-spacing: -0.01em; }
h2 { font-size: 16px; margin: 32px 0 10px; }
h3 { font-size: 14px; margin: 0 0 6px; }
p.sub { margin: 0; color: var(--muted); }
.kpis { display: grid; grid-template-columns: repeat(auto-fit, minmax(170px, 1fr)); gap: 12px; margin-top: 20px; }
.kpi { background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 12px 14px; }
.kpi .label { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.kpi .value { font-size: 22px; font-weight: 650; margin-top: 2px; font-variant-numeric: tabular-nums; }
.kpi .note { color: var(--muted); font-size: 12px; }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(520px, 1fr)); gap: 16px; margin-top: 20px; }
figure { margin: 0; background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 14px 16px 8px; }
figcaption { font-weight: 600; margin-bottom: 4px; }
figure .legend { color: var(--muted); font-size: 12px; margin-bottom: 4px; }
.swatch { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin: 0 4px 0 10px; vertical-align: -1px; }
.swatch:first-child { margin-left: 0; }
svg { display: block; width: 100%; height: auto; }
svg text { font: 12px system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif; fill: var(--muted); }
svg .grid { stroke: var(--line); stroke-width: 1; }
svg .axis { stroke: #cbd5e1; stroke-width: 1; }
svg .val { fill: var(--ink); }
svg .empty { font-size: 13px; }
.before { fill: var(--before); background: var(--before); }
.after { fill: var(--after); background: var(--after); }
.saved { fill: var(--saved); background: var(--saved); }
.loss { fill: var(--loss); background: var(--loss); }
.cache { fill: var(--cache); background: var(--cache); }
.pruned { fill: var(--pruned); background: var(--pruned); }
.holdout { fill: var(--holdout); background: var(--holdout); }
.table-wrap { overflow-x: auto; background: var(--card); border: 1px solid var(--line); border-radius: 10px; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { padding: 6px 10px; border-bottom: 1px solid var(--line); white-space: nowrap; }
th { text-align: left; font-weight: 600; color: var(--muted); font-size: 12px; background: #f1f5f9; }
td.n, th.n { text-align: right; }
tr.total td { font-weight: 650; border-top: 2px solid #cbd5e1; }
tbody tr:last-child td { border-bottom: 0; }
.notes { color: var(--muted); font-size: 13px; max-width: 900px; }
.notes li { margin: 4px 0; }
footer { margin-top: 32px; color: var(--muted); font-size: 12px; }
"#;

/// Chart geometry, in SVG user units.
const W: f64 = 640.0;
const H: f64 = 250.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 12.0;
const TOP: f64 = 12.0;
const BOTTOM: f64 = 30.0;

/// A step of 1, 2 or 5 × 10ⁿ giving at most five intervals up to `max`.
fn nice_step(max: f64) -> f64 {
    if max <= 0.0 || !max.is_finite() {
        return 1.0;
    }
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let f = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    f * mag
}

/// A short axis label for a token count.
fn short(v: f64) -> String {
    let a = v.abs();
    if a >= 1e9 {
        format!("{:.1}B", v / 1e9)
    } else if a >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if a >= 1e3 {
        format!("{:.0}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

/// One series of a bar chart: its name, its CSS class and a value per category.
struct Series<'a> {
    name: &'a str,
    class: &'a str,
    values: Vec<f64>,
}

/// A vertical bar chart: a band per category, a bar per series in each band; negative values
/// hang below the zero line in the `loss` class.
fn bars(
    label: &str,
    categories: &[String],
    series: &[Series<'_>],
    axis: fn(f64, usize) -> String,
    value: fn(f64) -> String,
) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg class="chart" viewBox="0 0 {W} {H}" role="img" aria-label="{}">"#,
        esc(label)
    );
    let all = series.iter().flat_map(|x| x.values.iter().copied());
    let (lo, hi) = all.fold((0.0f64, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if categories.is_empty() {
        let _ = write!(
            s,
            r#"<text class="empty" x="{}" y="{}" text-anchor="middle">no data</text></svg>"#,
            W / 2.0,
            H / 2.0
        );
        return s;
    }
    let step = nice_step((hi - lo).max(f64::MIN_POSITIVE));
    let top = if hi > 0.0 {
        (hi / step).ceil() * step
    } else {
        0.0
    };
    let bottom = if lo < 0.0 {
        (lo / step).floor() * step
    } else {
        0.0
    };
    let span = if top - bottom > 0.0 {
        top - bottom
    } else {
        1.0
    };
    // Enough decimals that neighbouring grid labels differ.
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    let plot_h = H - TOP - BOTTOM;
    let y = |v: f64| TOP + (top - v) / span * plot_h;
    // Grid lines and their labels.
    let mut t = bottom;
    while t <= top + step / 2.0 {
        let _ = write!(
            s,
            r#"<line class="grid" x1="{LEFT}" x2="{}" y1="{y:.1}" y2="{y:.1}"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
            W - RIGHT,
            LEFT - 6.0,
            y(t) + 4.0,
            esc(&axis(t, decimals)),
            y = y(t)
        );
        t += step;
    }
    let band = (W - LEFT - RIGHT) / categories.len() as f64;
    // Bars no wider than 56 units each, centred in their band, however few the days.
    let bar_w = ((band * 0.8) / series.len().max(1) as f64).min(56.0);
    let gap = band - bar_w * series.len().max(1) as f64;
    // Label every category when they fit, else every nth.
    let every = (categories.len() as f64 / ((W - LEFT - RIGHT) / 70.0))
        .ceil()
        .max(1.0) as usize;
    for (i, cat) in categories.iter().enumerate() {
        let x0 = LEFT + i as f64 * band + gap / 2.0;
        for (j, ser) in series.iter().enumerate() {
            let v = ser.values.get(i).copied().unwrap_or(0.0);
            let (a, b) = (y(v.max(0.0)), y(v.min(0.0)));
            let class = if v < 0.0 { "loss" } else { ser.class };
            let _ = write!(
                s,
                r#"<rect class="bar {class}" x="{:.1}" y="{a:.1}" width="{:.1}" height="{:.1}" rx="2"><title>{}: {} {}</title></rect>"#,
                x0 + j as f64 * bar_w,
                (bar_w - 2.0).max(1.0),
                (b - a).max(0.0),
                esc(cat),
                esc(ser.name),
                esc(&value(v))
            );
        }
        if i % every == 0 {
            let _ = write!(
                s,
                r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
                x0 + (band - gap) / 2.0,
                H - BOTTOM + 16.0,
                esc(cat)
            );
        }
    }
    let _ = write!(
        s,
        r#"<line class="axis" x1="{LEFT}" x2="{}" y1="{z:.1}" y2="{z:.1}"/></svg>"#,
        W - RIGHT,
        z = y(0.0)
    );
    s
}

fn legend(items: &[(&str, &str)]) -> String {
    let mut s = String::from(r#"<div class="legend">"#);
    for (class, name) in items {
        let _ = write!(s, r#"<span class="swatch {class}"></span>{}"#, esc(name));
    }
    s.push_str("</div>");
    s
}

fn figure(caption: &str, legend_html: &str, svg: &str) -> String {
    format!(
        "<figure><figcaption>{}</figcaption>{legend_html}{svg}</figure>",
        esc(caption)
    )
}

/// Holdout against pruned as small multiples: per measure, a bar per group scaled to the
/// larger of the two.
fn comparison_chart(pruned: &Group, holdout: &Group) -> String {
    type Measure = (&'static str, fn(&Group) -> Option<f64>, fn(f64) -> String);
    let measures: [Measure; 6] = [
        (
            "mean tokens sent",
            |g| g.mean_tokens_sent,
            |v| int(v.round() as u64),
        ),
        (
            "mean output tokens",
            |g| g.mean_output_tokens,
            |v| format!("{v:.1}"),
        ),
        (
            "calls per conversation",
            |g| g.calls_per_conversation,
            |v| format!("{v:.2}"),
        ),
        ("error rate", |g| g.error_rate, |v| pct(Some(v))),
        (
            "latency p50",
            |g| g.latency_p50_ms,
            |v| format!("{v:.0} ms"),
        ),
        (
            "latency p95",
            |g| g.latency_p95_ms,
            |v| format!("{v:.0} ms"),
        ),
    ];
    let row_h = 46.0;
    let height = TOP + row_h * measures.len() as f64;
    let label_w = 170.0;
    let bar_max = W - label_w - 90.0;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg class="chart" viewBox="0 0 {W} {height}" role="img" aria-label="holdout against pruned">"#
    );
    for (i, (name, get, fmt)) in measures.iter().enumerate() {
        let y0 = TOP + i as f64 * row_h;
        let vals = [get(pruned), get(holdout)];
        let max = vals.iter().flatten().fold(0.0f64, |m, v| m.max(*v));
        let _ = write!(
            s,
            r#"<text class="val" x="0" y="{:.1}">{}</text>"#,
            y0 + 19.0,
            esc(name)
        );
        for (j, (class, v)) in ["pruned", "holdout"].iter().zip(vals).enumerate() {
            let by = y0 + 4.0 + j as f64 * 18.0;
            let w = match v {
                Some(v) if max > 0.0 => (v / max * bar_max).max(1.0),
                _ => 0.0,
            };
            let shown = v.map_or_else(|| "-".to_string(), fmt);
            let _ = write!(
                s,
                r#"<rect class="bar {class}" x="{label_w}" y="{by:.1}" width="{w:.1}" height="14" rx="2"><title>{class}: {}</title></rect><text class="val" x="{:.1}" y="{:.1}">{}</text>"#,
                esc(&shown),
                label_w + w + 6.0,
                by + 11.0,
                esc(&shown)
            );
        }
    }
    s.push_str("</svg>");
    s
}

fn table(head: &[(&str, bool)], rows: &[(Vec<String>, bool)]) -> String {
    let mut s = String::from(r#"<div class="table-wrap"><table><thead><tr>"#);
    for (h, num) in head {
        let _ = write!(
            s,
            r#"<th{}>{}</th>"#,
            if *num { r#" class="n""# } else { "" },
            esc(h)
        );
    }
    s.push_str("</tr></thead><tbody>");
    for (cells, total) in rows {
        s.push_str(if *total {
            r#"<tr class="total">"#
        } else {
            "<tr>"
        });
        for (cell, (_, num)) in cells.iter().zip(head) {
            let _ = write!(
                s,
                r#"<td{}>{}</td>"#,
                if *num { r#" class="n""# } else { "" },
                esc(cell)
            );
        }
        s.push_str("</tr>");
    }
    s.push_str("</tbody></table></div>");
    s
}

fn keyed_rows(report: &Report, cells: fn(&Figures) -> Vec<String>) -> Vec<(Vec<String>, bool)> {
    let mut rows: Vec<(Vec<String>, bool)> = report
        .rows
        .iter()
        .map(|r| {
            let mut v = vec![
                r.route.clone(),
                r.model.clone().unwrap_or_else(|| "-".into()),
                r.day.to_string(),
            ];
            v.extend(cells(&r.figures));
            (v, false)
        })
        .collect();
    let mut total = vec!["total".to_string(), String::new(), String::new()];
    total.extend(cells(&report.totals));
    rows.push((total, true));
    rows
}

fn kpi(label: &str, value: &str, note: &str) -> String {
    format!(
        r#"<div class="kpi"><div class="label">{}</div><div class="value">{}</div><div class="note">{}</div></div>"#,
        esc(label),
        esc(value),
        esc(note)
    )
}

/// The report as a self-contained HTML page.
pub fn render(report: &Report) -> String {
    let t = &report.totals;
    let mut s = String::new();
    s.push_str(r#"<!doctype html><html lang="en"><head><meta charset="utf-8">"#);
    s.push_str(r#"<meta name="viewport" content="width=device-width, initial-scale=1">"#);
    s.push_str("<title>ctxgate report</title><style>");
    s.push_str(STYLE);
    s.push_str("</style></head><body><main>");
    let _ = write!(
        s,
        r#"<h1>ctxgate report</h1><p class="sub">{}</p><p class="sub">{}</p>"#,
        esc(&coverage(report)),
        esc(&source_line(report))
    );

    // Headline figures.
    let priced = t.priced_calls > 0;
    let or_dash = |v: f64| if priced { money(v) } else { "-".to_string() };
    s.push_str(r#"<section class="kpis" id="totals">"#);
    s.push_str(&kpi(
        "Tokens saved",
        &int(t.tokens_before.saturating_sub(t.tokens_after)),
        &format!(
            "{} of {} before pruning",
            pct(t.saved_share),
            int(t.tokens_before)
        ),
    ));
    s.push_str(&kpi(
        "Cost saved",
        &or_dash(t.cost_saved_usd),
        &format!(
            "{} unpruned → {} sent",
            or_dash(t.cost_unpruned_usd),
            or_dash(t.cost_usd)
        ),
    ));
    s.push_str(&kpi(
        "Net of summaries",
        &or_dash(t.net_saved_usd),
        &format!(
            "{} summary calls, {}",
            int(t.summary_calls),
            money(t.summary_cost_usd)
        ),
    ));
    s.push_str(&kpi(
        "Cache-read share",
        &pct(t.cache_read_share),
        &format!(
            "{} of {} input tokens",
            int(t.cache_read_tokens),
            int(t.input_tokens)
        ),
    ));
    s.push_str(&kpi(
        "Calls",
        &int(t.calls),
        &format!("{} in the holdout", int(t.holdout_calls)),
    ));
    s.push_str("</section>");

    // Charts.
    let days: Vec<String> = report.days.iter().map(|d| d.day.to_string()).collect();
    let per_day = |f: fn(&Figures) -> f64| -> Vec<f64> {
        report.days.iter().map(|d| f(&d.figures)).collect()
    };
    s.push_str(r#"<h2>Per day</h2><section class="charts">"#);
    s.push_str(&figure(
        "Tokens before and after pruning",
        &legend(&[("before", "before"), ("after", "after (sent)")]),
        &bars(
            "tokens before and after pruning per day",
            &days,
            &[
                Series {
                    name: "before",
                    class: "before",
                    values: per_day(|f| f.tokens_before as f64),
                },
                Series {
                    name: "after",
                    class: "after",
                    values: per_day(|f| f.tokens_after as f64),
                },
            ],
            |v, _| short(v),
            |v| int(v.max(0.0) as u64),
        ),
    ));
    s.push_str(&figure(
        "Cost saved (USD)",
        &legend(&[("saved", "saved"), ("loss", "cost more")]),
        &bars(
            "cost saved per day",
            &days,
            &[Series {
                name: "saved",
                class: "saved",
                values: per_day(|f| f.cost_saved_usd),
            }],
            |v, d| {
                let sign = if v < 0.0 { "-" } else { "" };
                format!("{sign}${:.*}", d.max(2), v.abs())
            },
            money,
        ),
    ));
    s.push_str(&figure(
        "Cache-read share of input tokens",
        &legend(&[("cache", "served from the provider's cache")]),
        &bars(
            "cache-read share per day",
            &days,
            &[Series {
                name: "cache-read share",
                class: "cache",
                values: per_day(|f| f.cache_read_share.unwrap_or(0.0)),
            }],
            |v, _| format!("{:.0}%", v * 100.0),
            |v| pct(Some(v)),
        ),
    ));
    s.push_str(&figure(
        "Holdout vs pruned",
        &legend(&[("pruned", "pruned"), ("holdout", "holdout (unpruned)")]),
        &comparison_chart(&report.holdout.pruned, &report.holdout.holdout),
    ));
    s.push_str("</section>");

    // Tables.
    let key = super::text::KEY_COLUMNS;
    s.push_str("<h2>Tokens</h2>");
    let mut head = key.to_vec();
    head.extend(super::text::TOKEN_COLUMNS);
    s.push_str(&table(&head, &keyed_rows(report, super::text::token_cells)));
    s.push_str("<h2>Cost (US dollar estimates)</h2>");
    let mut head = key.to_vec();
    head.extend(super::text::COST_COLUMNS);
    s.push_str(&table(&head, &keyed_rows(report, super::text::cost_cells)));
    s.push_str("<h2>Holdout vs pruned</h2>");
    let rows: Vec<(Vec<String>, bool)> = comparison_lines(report)
        .into_iter()
        .map(|(l, a, b)| (vec![l.to_string(), a, b], false))
        .collect();
    s.push_str(&table(
        &[("", false), ("pruned", true), ("holdout", true)],
        &rows,
    ));

    s.push_str(r#"<h2>Reading it</h2><ul class="notes">"#);
    for note in NOTES {
        let _ = write!(s, "<li>{}</li>", esc(note));
    }
    s.push_str("</ul>");
    let _ = writeln!(
        s,
        "<footer>ctxgate {} · report format {}</footer></main></body></html>",
        esc(env!("CARGO_PKG_VERSION")),
        report.version
    );
    s
}

/// What the figures mean, under the tables.
const NOTES: &[&str] = &[
    "Days are UTC days of each record's arrival time. Calls are the clients' calls; token and cost figures cover the calls pruning applied to, not those in the holdout (a holdout call's \"after\" was never sent).",
    "Tokens before and after are ctxgate's own counts of the prompt as received and as forwarded; input and cache read are what the upstream reported.",
    "Costs are estimates from the upstream's usage and the price table ([[prices]] and the shipped list); \"unpruned\" adds the tokens pruning removed at the call's own mix of cached and fresh prices. Calls without usage or a price have none (\"priced\" counts those that do).",
    "Summaries are ctxgate's own calls summarising what pruning dropped; they count where they ran, and \"net saved\" subtracts them.",
    "Holdout vs pruned compares conversations forwarded unpruned on purpose (prune.holdout_percent) with the others. Conversations that never outgrow the budget are alike in both groups, so differences are diluted; small groups differ by chance; latency includes the upstream's own variance.",
];
