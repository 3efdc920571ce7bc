//! File-content elision: older turns keep their prose but lose the files pasted into them.
//!
//! Replaced, each by one marker line naming the file and the tokens removed
//! (`[ctxgate: elided file src/main.rs, 1234 tokens]`):
//! - fenced code blocks (```` ``` ```` or `~~~`) of at least `min_file_lines` lines; the file
//!   name is taken from the info string when it looks like a path (`` ```rust src/main.rs ``),
//!   else the marker says `code block (lang)`;
//! - `--- BEGIN FILE: p ---` … `--- END FILE: p ---` blocks, any length;
//! - `<file …>` … `</file>` blocks opening at the start of a line (name from `path=`/`name=`);
//! - image, file, audio and document content parts/blocks, replaced by a text part/block
//!   carrying the marker (a `cache_control` on the replaced block stays on its replacement,
//!   in the same place).
//!
//! Only text content is elided: tool call arguments and `tool_use` inputs are left alone,
//! because the API checks them against the tool's schema. A marker is a pure function of the
//! text it replaces, so the same message always elides to the same bytes, and markers match
//! none of the patterns, so eliding twice changes nothing.

use serde_json::{Map, Value};

use crate::dialect::Dialect;
use crate::prune::tokens::{estimate_bytes, image_tokens, Counter, Encoding};

/// The marker that replaces one file.
pub(crate) fn marker(name: &str, tokens: u64) -> String {
    format!("[ctxgate: elided {name}, {tokens} tokens]")
}

/// Elides file contents in a message in place. Returns the number of files elided.
pub(crate) fn elide_message(
    v: &mut Value,
    dialect: Dialect,
    min_lines: u64,
    counter: &Counter,
    enc: Encoding,
) -> usize {
    if dialect == Dialect::Responses {
        // Responses items: a message's `content`, a tool output's `output`; `reasoning` and
        // `compaction` items are opaque and never edited.
        let ty = v.get("type").and_then(Value::as_str).unwrap_or("message");
        let key = match ty {
            "message" => "content",
            t if t.ends_with("_call_output") => "output",
            _ => return 0,
        };
        return match v.get_mut(key) {
            Some(c) => elide_content(c, dialect, min_lines, counter, enc),
            None => 0,
        };
    }
    let Some(content) = v.get_mut("content") else {
        return 0;
    };
    elide_content(content, dialect, min_lines, counter, enc)
}

fn elide_content(
    content: &mut Value,
    dialect: Dialect,
    min_lines: u64,
    counter: &Counter,
    enc: Encoding,
) -> usize {
    match content {
        Value::String(s) => match elide_text(s, min_lines, counter, enc) {
            Some((t, n)) => {
                *s = t;
                n
            }
            None => 0,
        },
        Value::Array(parts) => {
            let mut n = 0;
            for part in parts.iter_mut() {
                n += elide_part(part, dialect, min_lines, counter, enc);
            }
            n
        }
        _ => 0,
    }
}

fn elide_part(
    part: &mut Value,
    dialect: Dialect,
    min_lines: u64,
    counter: &Counter,
    enc: Encoding,
) -> usize {
    let Value::Object(map) = part else {
        return 0;
    };
    let ty = map
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    match ty.as_str() {
        "text" | "input_text" | "output_text" => match map.get_mut("text") {
            Some(Value::String(s)) => match elide_text(s, min_lines, counter, enc) {
                Some((t, n)) => {
                    *s = t;
                    n
                }
                None => 0,
            },
            _ => 0,
        },
        "tool_result" => match map.get_mut("content") {
            Some(c) => elide_content(c, dialect, min_lines, counter, enc),
            None => 0,
        },
        "image_url" | "input_image" | "image" => {
            let tokens = image_tokens(dialect, map).unwrap_or(0);
            replace_with_marker(map, dialect, &marker("image", tokens));
            1
        }
        "file" | "input_file" => {
            let f = map.get("file").unwrap_or(&Value::Null);
            let name = f
                .get("filename")
                .or_else(|| map.get("filename"))
                .or_else(|| f.get("file_id"))
                .and_then(Value::as_str)
                .unwrap_or("attachment")
                .to_string();
            let tokens = payload_tokens(map, counter, enc);
            replace_with_marker(map, dialect, &marker(&format!("file {name}"), tokens));
            1
        }
        "input_audio" => {
            let tokens = payload_tokens(map, counter, enc);
            replace_with_marker(map, dialect, &marker("audio", tokens));
            1
        }
        "document" => {
            let name = map
                .get("title")
                .and_then(Value::as_str)
                .unwrap_or("document")
                .to_string();
            let tokens = payload_tokens(map, counter, enc);
            replace_with_marker(map, dialect, &marker(&format!("file {name}"), tokens));
            1
        }
        _ => 0,
    }
}

/// Tokens of a part's payload: text counted, binary data estimated (bytes / 4).
fn payload_tokens(map: &Map<String, Value>, counter: &Counter, enc: Encoding) -> u64 {
    let mut n = 0;
    walk_strings(&Value::Object(map.clone()), "", &mut |k, s| {
        n += if matches!(k, "data" | "file_data") || s.starts_with("data:") {
            estimate_bytes(s.len())
        } else if matches!(k, "type" | "media_type" | "title" | "filename") {
            0
        } else {
            counter.count_text(enc, s)
        };
    });
    n
}

fn walk_strings(v: &Value, key: &str, f: &mut dyn FnMut(&str, &str)) {
    match v {
        Value::String(s) => f(key, s),
        Value::Array(a) => a.iter().for_each(|x| walk_strings(x, key, f)),
        Value::Object(m) => m.iter().for_each(|(k, x)| walk_strings(x, k, f)),
        _ => {}
    }
}

/// Replaces a part with a text part (Responses: `input_text`; only input parts carry files)
/// holding `text`.
fn replace_with_marker(map: &mut Map<String, Value>, dialect: Dialect, text: &str) {
    let cache_control = map.remove("cache_control");
    map.clear();
    let ty = match dialect {
        Dialect::Responses => "input_text",
        Dialect::OpenAi | Dialect::Anthropic => "text",
    };
    map.insert("type".to_string(), Value::String(ty.to_string()));
    map.insert("text".to_string(), Value::String(text.to_string()));
    if let Some(cc) = cache_control {
        map.insert("cache_control".to_string(), cc);
    }
}

/// Elides files in a text. `None` when nothing is elided.
pub(crate) fn elide_text(
    text: &str,
    min_lines: u64,
    counter: &Counter,
    enc: Encoding,
) -> Option<(String, usize)> {
    // Cheap pre-check: most texts have none of the patterns.
    if !(text.contains("```")
        || text.contains("~~~")
        || text.contains("BEGIN FILE:")
        || text.contains("<file"))
    {
        return None;
    }
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let mut out = String::with_capacity(text.len() / 4);
    let mut files = 0usize;
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        if let Some((end, name)) = find_block(&lines, i, min_lines) {
            let removed: String = lines[i..=end].concat();
            let tokens = counter.count_text(enc, &removed);
            out.push_str(&marker(&name, tokens));
            if removed.ends_with('\n') {
                out.push('\n');
            }
            files += 1;
            i = end + 1;
            continue;
        }
        out.push_str(line);
        i += 1;
    }
    if files == 0 {
        None
    } else {
        Some((out, files))
    }
}

/// A block to elide starting at line `i`: its last line and the marker name.
fn find_block(lines: &[&str], i: usize, min_lines: u64) -> Option<(usize, String)> {
    let line = lines[i].trim_end_matches(['\n', '\r']);
    let trimmed = line.trim_start();
    if let Some(path) = begin_file(trimmed) {
        let end = (i + 1..lines.len()).find(|&j| {
            let l = lines[j].trim();
            l.starts_with("--- END FILE:") && l.ends_with("---")
        })?;
        return Some((end, format!("file {path}")));
    }
    if trimmed.starts_with("<file")
        && matches!(trimmed.as_bytes().get(5), Some(b' ' | b'>' | b'\t'))
    {
        let end = (i..lines.len()).find(|&j| {
            let l = if j == i { &trimmed[5..] } else { lines[j] };
            l.contains("</file>")
        })?;
        // Only whole lines go: the closing tag must end its line.
        if !lines[end].trim_end().ends_with("</file>") {
            return None;
        }
        let name = attr(trimmed, "path")
            .or_else(|| attr(trimmed, "name"))
            .unwrap_or("file");
        return Some((end, format!("file {name}")));
    }
    let indent = line.len() - trimmed.len();
    if indent <= 3 {
        let fence_char = trimmed.chars().next()?;
        if fence_char == '`' || fence_char == '~' {
            let flen = trimmed.chars().take_while(|&c| c == fence_char).count();
            if flen >= 3 {
                let info = trimmed[flen..].trim();
                if fence_char == '`' && info.contains('`') {
                    return None;
                }
                let end = (i + 1..lines.len()).find(|&j| {
                    let l = lines[j].trim();
                    l.len() >= flen && l.chars().all(|c| c == fence_char)
                })?;
                let inner = (end - i - 1) as u64;
                if inner < min_lines.max(1) {
                    return None;
                }
                return Some((end, fence_name(info)));
            }
        }
    }
    None
}

fn begin_file(line: &str) -> Option<&str> {
    let rest = line.strip_prefix("--- BEGIN FILE:")?;
    let path = rest.trim().strip_suffix("---")?.trim();
    Some(if path.is_empty() { "file" } else { path })
}

fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let pat = format!("{name}=\"");
    let start = tag.find(&pat)? + pat.len();
    let len = tag[start..].find('"')?;
    Some(&tag[start..start + len])
}

fn fence_name(info: &str) -> String {
    let lang = info.split_whitespace().next().unwrap_or("");
    let path = info
        .split_whitespace()
        .flat_map(|w| w.split(':'))
        .map(|w| {
            w.trim_start_matches("title=")
                .trim_start_matches("path=")
                .trim_matches('"')
        })
        .find(|w| w.contains('/') || (w.contains('.') && !w.starts_with('.')));
    match path {
        Some(p) => format!("file {p}"),
        None if lang.is_empty() => "code block".to_string(),
        None => format!("code block ({lang})"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn counter() -> Counter {
        Counter::new(Encoding::O200kBase).unwrap()
    }

    #[test]
    fn fenced_block_with_path() {
        let c = counter();
        let body: String = (0..30).map(|i| format!("    let x{i} = {i};\n")).collect();
        let text = format!("Here is the file:\n```rust src/main.rs\n{body}```\nThanks.");
        let removed = format!("```rust src/main.rs\n{body}```\n");
        let n = c.count_text(Encoding::O200kBase, &removed);
        let (out, files) = elide_text(&text, 20, &c, Encoding::O200kBase).unwrap_or_default();
        assert_eq!(files, 1);
        assert_eq!(
            out,
            format!("Here is the file:\n[ctxgate: elided file src/main.rs, {n} tokens]\nThanks.")
        );
        // Idempotent.
        assert_eq!(elide_text(&out, 20, &c, Encoding::O200kBase), None);
    }

    #[test]
    fn short_fence_kept_and_begin_file_elided() {
        let c = counter();
        let text = "a\n```py\nx = 1\n```\n--- BEGIN FILE: docs/a.md ---\nhello\nworld\n--- END FILE: docs/a.md ---\nend\n";
        let (out, files) = elide_text(text, 5, &c, Encoding::O200kBase).unwrap_or_default();
        assert_eq!(files, 1);
        let n = c.count_text(
            Encoding::O200kBase,
            "--- BEGIN FILE: docs/a.md ---\nhello\nworld\n--- END FILE: docs/a.md ---\n",
        );
        assert_eq!(
            out,
            format!("a\n```py\nx = 1\n```\n[ctxgate: elided file docs/a.md, {n} tokens]\nend\n")
        );
    }

    #[test]
    fn file_tag_and_unclosed_fence() {
        let c = counter();
        let text = "x\n<file path=\"a/b.txt\">\n1\n2\n</file>\n```\nopen\n";
        let (out, files) = elide_text(text, 1, &c, Encoding::O200kBase).unwrap_or_default();
        assert_eq!(files, 1);
        assert!(out.starts_with("x\n[ctxgate: elided file a/b.txt, "));
        assert!(out.ends_with(" tokens]\n```\nopen\n"));
    }

    #[test]
    fn parts_become_text_markers() {
        let c = counter();
        let mut v: Value = serde_json::json!({"role":"user","content":[
            {"type":"text","text":"look"},
            {"type":"image_url","image_url":{"url":"https://x/y.png","detail":"low"}},
            {"type":"file","file":{"filename":"r.pdf","file_data":"QUJDRA=="}}
        ]});
        let n = elide_message(&mut v, Dialect::OpenAi, 10, &c, Encoding::O200kBase);
        assert_eq!(n, 2);
        assert_eq!(
            v["content"],
            serde_json::json!([
                {"type":"text","text":"look"},
                {"type":"text","text":"[ctxgate: elided image, 85 tokens]"},
                {"type":"text","text":"[ctxgate: elided file r.pdf, 2 tokens]"}
            ])
        );
        let mut a: Value = serde_json::json!({"role":"user","content":[
            {"type":"tool_result","tool_use_id":"t1","content":[{"type":"image","source":{"type":"base64","media_type":"image/png","data":"AAAA"},"cache_control":{"type":"ephemeral"}}]}
        ]});
        assert_eq!(
            elide_message(&mut a, Dialect::Anthropic, 10, &c, Encoding::O200kBase),
            1
        );
        assert_eq!(
            a["content"][0]["content"][0],
            serde_json::json!({"type":"text","text":"[ctxgate: elided image, 1568 tokens]","cache_control":{"type":"ephemeral"}})
        );
    }
}
