//! The shipped Grafana dashboard uses only metric names ctxgate exports.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use prometheus::core::Collector;

/// Every `expr` in the dashboard, panels and template variables alike.
fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                    ("query", serde_json::Value::String(s)) if s.contains('(') => {
                        out.push(s.clone())
                    }
                    ("query", serde_json::Value::Object(q)) => {
                        if let Some(s) = q.get("query").and_then(|s| s.as_str()) {
                            out.push(s.to_string());
                        }
                    }
                    _ => exprs(x, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| exprs(x, out)),
        _ => {}
    }
}

/// The expression without label matchers (`{…}`) and grouping clauses (`by (…)`, …), which
/// name labels, not metrics.
fn strip_labels(expr: &str) -> String {
    let mut out = String::new();
    let mut depth_brace = 0;
    let chars: Vec<char> = expr.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '{' {
            depth_brace += 1;
        } else if c == '}' {
            depth_brace -= 1;
        } else if depth_brace == 0 {
            out.push(c);
        }
        i += 1;
        for kw in [
            "by",
            "without",
            "on",
            "ignoring",
            "group_left",
            "group_right",
        ] {
            if out.ends_with(kw) {
                let before = out[..out.len() - kw.len()].chars().last();
                if before.is_some_and(|b| b.is_ascii_alphanumeric() || b == '_') {
                    continue;
                }
                let mut j = i;
                while j < chars.len() && chars[j] == ' ' {
                    j += 1;
                }
                if j < chars.len() && chars[j] == '(' {
                    while j < chars.len() && chars[j] != ')' {
                        j += 1;
                    }
                    i = j + 1;
                }
            }
        }
    }
    out
}

/// Identifiers in a PromQL expression that name ctxgate or GenAI metrics.
fn metric_names(expr: &str) -> Vec<String> {
    let expr = strip_labels(expr);
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_string = false;
    for ch in expr.chars().chain(std::iter::once(' ')) {
        if ch == '"' {
            in_string = !in_string;
        }
        if !in_string && (ch.is_ascii_alphanumeric() || ch == '_' || ch == ':') {
            cur.push(ch);
        } else {
            if cur.starts_with("ctxgate_") || cur.starts_with("gen_ai_") {
                out.push(std::mem::take(&mut cur));
            }
            cur.clear();
        }
    }
    out
}

#[test]
fn every_dashboard_metric_is_exported() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/dashboards/ctxgate.json"
    ))
    .unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut all = Vec::new();
    exprs(&dash, &mut all);
    assert!(all.len() >= 30, "only {} queries found", all.len());

    let m = ctxgate::metrics::Metrics::new();
    ctxgate::proxy::ProxyMetrics::register(&m, &[]);
    let t = ctxgate::transcript::TranscriptMetrics::register(m.registry());
    ctxgate::state::StateMetrics::register(&m);
    let mut exported: BTreeSet<String> = m.names().iter().cloned().collect();
    let transcript: [&dyn Collector; 5] = [
        &t.queue_depth,
        &t.written,
        &t.dropped,
        &t.write_failures,
        &t.batch_write,
    ];
    for c in transcript {
        exported.extend(c.desc().iter().map(|d| d.fq_name.clone()));
    }

    let mut used = BTreeSet::new();
    let mut missing = Vec::new();
    for e in &all {
        for name in metric_names(e) {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|b| exported.contains(*b)))
                .unwrap_or(&name)
                .to_string();
            if !exported.contains(&base) {
                missing.push(format!("{name} (in {e})"));
            }
            used.insert(base);
        }
    }
    assert!(
        missing.is_empty(),
        "dashboard uses names ctxgate does not export:\n{}",
        missing.join("\n")
    );
    // The dashboard covers each area the README promises.
    for must in [
        "ctxgate_http_requests_total",
        "ctxgate_proxy_overhead_seconds",
        "ctxgate_prune_tokens_removed_total",
        "ctxgate_upstream_tokens_total",
        "ctxgate_gate_rejections_total",
        "ctxgate_timeouts_total",
        "ctxgate_transcript_queue_depth",
        "ctxgate_token_estimate_ratio",
        "ctxgate_upstream_ready",
        "ctxgate_effect_cost_usd_total",
        "ctxgate_effect_calls_total",
        "ctxgate_effect_call_duration_seconds",
    ] {
        assert!(used.contains(must), "the dashboard has no panel on {must}");
    }
}

#[test]
fn name_extraction() {
    assert_eq!(
        metric_names("sum by (le) (rate(ctxgate_http_request_duration_seconds_bucket{route=~\"$route\"}[$__rate_interval]))"),
        ["ctxgate_http_request_duration_seconds_bucket"]
    );
    assert_eq!(
        metric_names("label_values(ctxgate_http_requests_total, route)"),
        ["ctxgate_http_requests_total"]
    );
    assert_eq!(
        metric_names("sum by (gen_ai_provider_name, le) (rate(gen_ai_client_token_usage_sum{gen_ai_token_type=\"input\"}[5m]))"),
        ["gen_ai_client_token_usage_sum"]
    );
}
