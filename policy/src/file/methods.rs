//! `[client.methods."PATTERN"]` tables: per-method quotas, checked like the rest of the file.

use std::num::NonZeroU32;
use std::ops::Range;

use capgate_schema::Catalog;
use toml::de::DeValue;

use super::{integer, Diags, Value};
use crate::method_quota::MAX_METHOD_RULES;
use crate::MethodQuota;

const METHOD_KEYS: &[&str] = &["calls_per_second", "burst", "max_inflight_calls"];

/// `[client.methods."PATTERN"]` tables: the quotas of the methods each pattern names.
pub(super) fn method_rules(
    d: &mut Diags<'_>,
    v: &Value<'_>,
    catalog: &Catalog,
) -> Vec<(MethodQuota, Range<usize>)> {
    let DeValue::Table(t) = v.get_ref() else {
        d.at(
            v.span(),
            "`methods` must be a table of method rules: write `[client.methods.\"Iface.method\"]`",
        );
        return Vec::new();
    };
    if t.len() > MAX_METHOD_RULES {
        d.at(
            v.span(),
            format!(
                "{} method rules in one class: at most {MAX_METHOD_RULES}",
                t.len()
            ),
        );
        return Vec::new();
    }
    let mut out = Vec::new();
    for (k, body) in t.iter() {
        let pattern = k.get_ref().as_ref();
        let mut rule = match MethodQuota::located(pattern, catalog, d.location(&k.span())) {
            Ok(r) => r,
            Err(e) => {
                d.at(k.span(), e.to_string());
                continue;
            }
        };
        let DeValue::Table(q) = body.get_ref() else {
            d.at(
                body.span(),
                format!("method rule `{pattern}` must be a table of quotas: write `[client.methods.\"{pattern}\"]` and `calls_per_second = N` below it"),
            );
            continue;
        };
        let mut rate = None;
        let mut burst = None;
        let mut ok = true;
        for (key, val) in q.iter() {
            let name = key.get_ref().as_ref();
            if !METHOD_KEYS.contains(&name) {
                d.unknown_key(
                    key.span(),
                    name,
                    &format!("method rule `{pattern}`"),
                    METHOD_KEYS,
                );
                ok = false;
                continue;
            }
            let n = match integer(val).and_then(|n| u32::try_from(n).ok()) {
                Some(n) => n,
                None => {
                    d.at(
                        val.span(),
                        format!("`{name}` must be a whole number from 0 to {}", u32::MAX),
                    );
                    ok = false;
                    continue;
                }
            };
            match name {
                "max_inflight_calls" => rule = rule.with_max_inflight_calls(n),
                _ => match NonZeroU32::new(n) {
                    Some(n) if name == "burst" => burst = Some((n, key.span())),
                    Some(n) => rate = Some(n),
                    None => {
                        d.at(val.span(), format!("`{name}` must be at least 1"));
                        ok = false;
                    }
                },
            }
        }
        match (rate, burst) {
            // One second's worth when the burst is not given.
            (Some(r), b) => rule = rule.with_rate(r, b.map_or(r, |(b, _)| b)),
            (None, Some((_, span))) => {
                d.at(
                    span,
                    format!("`burst` needs `calls_per_second` in method rule `{pattern}`"),
                );
                ok = false;
            }
            (None, None) => {}
        }
        if ok && rule.rate.is_none() && rule.max_inflight_calls.is_none() {
            d.at(
                k.span(),
                format!("method rule `{pattern}` sets no quota: add `calls_per_second` (and `burst`) or `max_inflight_calls`"),
            );
            ok = false;
        }
        if ok {
            out.push((rule, k.span()));
        }
    }
    out
}
