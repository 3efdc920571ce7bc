//! Environment overrides: `CTXGATE_<PATH>` variables applied to the parsed TOML tree before
//! it is validated. The environment is passed in, so tests never touch the process's own.

use std::collections::BTreeMap;

use super::raw::TOP_LEVEL_KEYS;
use super::ConfigError;

/// Prefix of every environment override.
pub const ENV_PREFIX: &str = "CTXGATE_";

/// Applies `CTXGATE_…` overrides to the parsed TOML tree.
///
/// The variable name after `CTXGATE_` is a path whose segments are separated by `__` (double
/// underscore) and matched case-insensitively against keys: `CTXGATE_LISTEN`,
/// `CTXGATE_TIMEOUTS__TOTAL`. A segment after `ROUTES` names a route by its `name` (with `-`
/// written as `_`) or by its index: `CTXGATE_ROUTES__OPENAI__UPSTREAM`,
/// `CTXGATE_ROUTES__0__PREWARM_CONNECTIONS`. The value is read as a TOML value when it parses
/// as one (`42`, `true`, `"text"`) and as a plain string otherwise.
///
/// A variable whose first segment is not a top-level config key (`CTXGATE_BIN`, set by some
/// unrelated tool) is not an override: it is skipped and returned, so that the caller can
/// warn about it once; it never stops ctxgate from starting. One whose first segment is a key
/// but whose rest names nothing (`CTXGATE_PRUNE__HARD_TOKEN_LIMT`) is an error, like an
/// unknown key in the file: it was meant as an override and is misspelt.
pub fn apply_env(
    tree: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<String>, ConfigError> {
    // Sorted so that the order of application (and of errors) is stable.
    let vars: BTreeMap<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX))
        .collect();
    let mut ignored = Vec::new();
    for (name, value) in vars {
        // Variables the binary itself reads (the log filter) are not config keys.
        if name == "CTXGATE_LOG" || name == "CTXGATE_LOG_FORMAT" {
            continue;
        }
        let path: Vec<String> = name[ENV_PREFIX.len()..]
            .split("__")
            .map(|s| s.to_ascii_lowercase())
            .collect();
        if !TOP_LEVEL_KEYS.contains(&path[0].as_str()) {
            ignored.push(name);
            continue;
        }
        if path.iter().any(|s| s.is_empty()) {
            return Err(ConfigError::new(
                name.clone(),
                "malformed override: separate keys with '__', e.g. CTXGATE_TIMEOUTS__TOTAL",
            ));
        }
        let parsed = parse_env_value(&value);
        set_path(tree, &path, parsed).map_err(|problem| ConfigError::new(name.clone(), problem))?;
    }
    Ok(ignored)
}

fn parse_env_value(v: &str) -> toml::Value {
    let doc = format!("v = {v}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(v.to_string())),
        Err(_) => toml::Value::String(v.to_string()),
    }
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let Some((head, rest)) = path.split_first() else {
        return Err("empty key".into());
    };
    if head == "routes" {
        let Some((sel, rest)) = rest.split_first() else {
            return Err("routes cannot be replaced whole; name a route and a key".into());
        };
        let Some(toml::Value::Array(routes)) = table.get_mut("routes") else {
            return Err("no [[routes]] in the config to override".into());
        };
        let idx = match sel.parse::<usize>() {
            Ok(i) if i < routes.len() => i,
            Ok(i) => return Err(format!("no route at index {i}")),
            Err(_) => routes
                .iter()
                .position(|r| {
                    r.get("name")
                        .and_then(|n| n.as_str())
                        .map(|n| n.replace('-', "_").eq_ignore_ascii_case(sel))
                        .unwrap_or(false)
                })
                .ok_or_else(|| format!("no route named {sel:?}"))?,
        };
        let Some(toml::Value::Table(route)) = routes.get_mut(idx) else {
            return Err(format!("routes[{idx}] is not a table"));
        };
        return set_path(route, rest, value);
    }
    if rest.is_empty() {
        table.insert(head.clone(), value);
        return Ok(());
    }
    let entry = table
        .entry(head.clone())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    match entry {
        toml::Value::Table(t) => set_path(t, rest, value),
        _ => Err(format!("{head} is not a table")),
    }
}
