//! The policy file: TOML, checked as a whole so that every problem is reported with its
//! `FILE:LINE:COL`, not just the first.

use std::num::NonZeroU32;
use std::ops::Range;

use capgate_schema::{suggest, Catalog};
use toml::de::{DeTable, DeValue};
use toml::Spanned;

mod methods;
use methods::method_rules;

use crate::class::AllowRule;
use crate::{parse_bytes, parse_duration, ClientClass, Matcher, PolicyError, PolicyErrors, Quotas};

const TOP_KEYS: &[&str] = &["defaults", "client"];
const QUOTA_KEYS: &[&str] = &[
    "max_message_bytes",
    "max_inflight_calls",
    "max_inflight_bytes",
    "max_open_answers",
    "max_exports",
    "max_caps_per_message",
    "max_client_outgoing_bytes",
    "calls_per_second",
    "burst",
    "max_connections",
    "max_class_connections",
    "idle_timeout",
];
const CLIENT_KEYS: &[&str] = &["name", "match", "allow", "methods"];
const MATCH_KEYS: &[&str] = &[
    "source",
    "unix_uid",
    "cert_cn",
    "cert_san",
    "cert_spki_sha256",
];

struct Diags<'a> {
    file: &'a str,
    text: &'a str,
    errors: Vec<PolicyError>,
}

impl Diags<'_> {
    fn at(&mut self, span: Range<usize>, message: impl Into<String>) {
        let (line, column) = self.position(span.start);
        self.errors
            .push(PolicyError::new(self.file, line, column, message));
    }

    fn position(&self, offset: usize) -> (usize, usize) {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        (line, column)
    }

    fn location(&self, span: &Range<usize>) -> String {
        let (line, column) = self.position(span.start);
        format!("{}:{line}:{column}", self.file)
    }

    fn unknown_key(&mut self, span: Range<usize>, key: &str, section: &str, known: &[&str]) {
        let mut msg = format!("unknown key `{key}` in {section}");
        match suggest(key, known.iter().copied()) {
            Some(s) => msg.push_str(&format!(" (did you mean `{s}`?)")),
            None => msg.push_str(&format!("; expected one of: {}", known.join(", "))),
        }
        self.at(span, msg);
    }
}

type Value<'i> = Spanned<DeValue<'i>>;

pub(crate) fn parse(
    file: &str,
    text: &str,
    catalog: &Catalog,
) -> Result<Vec<ClientClass>, PolicyErrors> {
    let mut d = Diags {
        file,
        text,
        errors: Vec::new(),
    };
    let (root, syntax) = DeTable::parse_recoverable(text);
    for e in &syntax {
        d.at(e.span().unwrap_or(0..0), e.message().trim().to_string());
    }
    if !d.errors.is_empty() {
        return Err(PolicyErrors(d.errors));
    }
    let root = root.into_inner();
    for (k, _) in root.iter() {
        if !TOP_KEYS.contains(&k.get_ref().as_ref()) {
            d.unknown_key(k.span(), k.get_ref(), "the policy file", TOP_KEYS);
        }
    }
    let mut defaults = Quotas::default();
    if let Some(v) = root.get("defaults") {
        match v.get_ref() {
            DeValue::Table(t) => {
                for (k, v) in t.iter() {
                    if QUOTA_KEYS.contains(&k.get_ref().as_ref()) {
                        apply_quota(&mut d, &mut defaults, k.get_ref(), v);
                    } else {
                        d.unknown_key(k.span(), k.get_ref(), "[defaults]", QUOTA_KEYS);
                    }
                }
            }
            _ => d.at(v.span(), "`defaults` must be a table: write `[defaults]`"),
        }
    }
    let mut classes: Vec<ClientClass> = Vec::new();
    let mut names: Vec<(String, String)> = Vec::new();
    let mut catch_all: Option<(String, String)> = None;
    match root.get("client") {
        None => d.at(
            0..0,
            "no client classes: add at least one `[[client]]` table",
        ),
        Some(v) => match v.get_ref() {
            DeValue::Array(items) => {
                for item in items {
                    if let Some(class) =
                        client(&mut d, item, &defaults, catalog, &mut names, &mut catch_all)
                    {
                        classes.push(class);
                    }
                }
            }
            _ => d.at(
                v.span(),
                "`client` must be an array of tables: write `[[client]]`",
            ),
        },
    }
    if d.errors.is_empty() {
        Ok(classes)
    } else {
        d.errors.sort_by_key(|e| (e.line, e.column));
        Err(PolicyErrors(d.errors))
    }
}

fn client(
    d: &mut Diags<'_>,
    item: &Value<'_>,
    defaults: &Quotas,
    catalog: &Catalog,
    names: &mut Vec<(String, String)>,
    catch_all: &mut Option<(String, String)>,
) -> Option<ClientClass> {
    let DeValue::Table(t) = item.get_ref() else {
        d.at(item.span(), "each `client` entry must be a table");
        return None;
    };
    let mut quotas = defaults.clone();
    for (k, v) in t.iter() {
        let key = k.get_ref().as_ref();
        if QUOTA_KEYS.contains(&key) {
            apply_quota(d, &mut quotas, key, v);
        } else if !CLIENT_KEYS.contains(&key) {
            let known: Vec<&str> = CLIENT_KEYS.iter().chain(QUOTA_KEYS).copied().collect();
            d.unknown_key(k.span(), key, "[[client]]", &known);
        }
    }
    let name = match t.get("name") {
        Some(v) => match v.get_ref() {
            DeValue::String(s) if !s.is_empty() => {
                let loc = d.location(&v.span());
                if let Some((_, first)) = names.iter().find(|(n, _)| n == s.as_ref()) {
                    d.at(
                        v.span(),
                        format!("duplicate client class `{s}` (first defined at {first})"),
                    );
                } else {
                    names.push((s.to_string(), loc));
                }
                Some(s.to_string())
            }
            _ => {
                d.at(v.span(), "`name` must be a non-empty string");
                None
            }
        },
        None => {
            d.at(
                item.span(),
                "client class without `name`: add `name = \"...\"`",
            );
            None
        }
    };
    let matcher = match t.get("match") {
        Some(v) => matcher(d, v),
        None => {
            d.at(item.span(), "client class without `match`: add e.g. `match = \"any\"` or `match = { source = \"127.0.0.1/32\" }`");
            None
        }
    };
    if let (Some(m), Some(v)) = (&matcher, t.get("match")) {
        if let Some((other, loc)) = catch_all.as_ref() {
            d.at(
                v.span(),
                format!(
                    "client class `{}` is unreachable: class `{other}` ({loc}) matches any client before it",
                    name.as_deref().unwrap_or("?")
                ),
            );
        } else if *m == Matcher::Any {
            *catch_all = Some((name.clone().unwrap_or_default(), d.location(&v.span())));
        }
    }
    let mut rules = Vec::new();
    match t.get("allow") {
        Some(v) => match v.get_ref() {
            DeValue::Array(entries) => {
                for e in entries {
                    match e.get_ref() {
                        DeValue::String(s) => match AllowRule::parse(s, catalog, d.location(&e.span())) {
                            Ok(r) => rules.push(r),
                            Err(err) => d.at(e.span(), err.to_string()),
                        },
                        _ => d.at(e.span(), "allowlist entries are strings: `Interface.method`, `Interface.*` or `*`"),
                    }
                }
            }
            _ => d.at(
                v.span(),
                "`allow` must be an array of strings, e.g. `allow = [\"Store.namespace\"]`",
            ),
        },
        None => d.at(
            item.span(),
            "client class without `allow`: add e.g. `allow = []` (deny everything)",
        ),
    }
    let mut class = ClientClass::new(name?, matcher?).with_quotas(quotas);
    for r in rules {
        class = class.with_rule(r);
    }
    if let Some(v) = t.get("methods") {
        for (rule, span) in method_rules(d, v, catalog) {
            if !rule
                .methods()
                .is_none_or(|ms| ms.iter().any(|&m| class.allows(m)))
            {
                d.at(
                    span,
                    format!(
                        "method rule `{}` has no effect: client class `{}` allows none of the \
                         methods it names (add them to `allow`, or remove the rule)",
                        rule.pattern,
                        class.name()
                    ),
                );
                continue;
            }
            class = class.with_method_quota(rule);
        }
    }
    Some(class)
}

fn matcher(d: &mut Diags<'_>, v: &Value<'_>) -> Option<Matcher> {
    match v.get_ref() {
        DeValue::String(s) if s.as_ref() == "any" => Some(Matcher::Any),
        DeValue::Table(t) => {
            let mut found = None;
            for (k, val) in t.iter() {
                let m = match k.get_ref().as_ref() {
                    "source" => match val.get_ref() {
                        DeValue::String(s) => match s
                            .parse::<ipnet::IpNet>()
                            .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                        {
                            Ok(net) => Some(Matcher::Source(net)),
                            Err(_) => {
                                d.at(val.span(), format!("`{s}` is not an address or network: write e.g. \"127.0.0.1/32\" or \"10.0.0.0/8\""));
                                None
                            }
                        },
                        _ => {
                            d.at(
                                val.span(),
                                "`source` must be a string such as \"127.0.0.1/32\"",
                            );
                            None
                        }
                    },
                    "unix_uid" => match integer(val) {
                        Some(n) if n <= u64::from(u32::MAX) => Some(Matcher::UnixUid(n as u32)),
                        _ => {
                            d.at(val.span(), "`unix_uid` must be a user id (a whole number)");
                            None
                        }
                    },
                    key @ ("cert_cn" | "cert_san" | "cert_spki_sha256") => match val.get_ref() {
                        DeValue::String(s)
                            if key == "cert_spki_sha256"
                                && (s.len() != 64 || !s.chars().all(|c| c.is_ascii_hexdigit())) =>
                        {
                            d.at(val.span(), "`cert_spki_sha256` must be 64 hex digits (the SHA-256 of the certificate's public key)");
                            None
                        }
                        DeValue::String(s) if !s.is_empty() => Some(match key {
                            "cert_cn" => Matcher::CertCn(s.to_string()),
                            "cert_san" => Matcher::CertSan(s.to_string()),
                            _ => Matcher::CertSpkiSha256(s.to_ascii_lowercase()),
                        }),
                        _ => {
                            d.at(val.span(), format!("`{key}` must be a non-empty string"));
                            None
                        }
                    },
                    other => {
                        d.unknown_key(k.span(), other, "`match`", MATCH_KEYS);
                        None
                    }
                };
                if found.is_some() && m.is_some() {
                    d.at(
                        k.span(),
                        "`match` takes exactly one of `source`, `unix_uid`",
                    );
                    return None;
                }
                found = found.or(m);
            }
            if found.is_none() && t.is_empty() {
                d.at(
                    v.span(),
                    "empty `match`: write `\"any\"`, `{ source = \"...\" }` or `{ unix_uid = N }`",
                );
            }
            found
        }
        _ => {
            d.at(
                v.span(),
                "`match` must be \"any\", `{ source = \"CIDR\" }` or `{ unix_uid = N }`",
            );
            None
        }
    }
}

fn integer(v: &Value<'_>) -> Option<u64> {
    match v.get_ref() {
        DeValue::Integer(i) => u64::from_str_radix(&i.as_str().replace('_', ""), i.radix()).ok(),
        _ => None,
    }
}

fn apply_quota(d: &mut Diags<'_>, q: &mut Quotas, key: &str, v: &Value<'_>) {
    let span = v.span();
    let bytes = |d: &mut Diags<'_>| -> Option<usize> {
        match v.get_ref() {
            DeValue::String(s) => match parse_bytes(s) {
                Ok(n) => Some(n),
                Err(e) => {
                    d.at(span.clone(), format!("`{key}`: {e}"));
                    None
                }
            },
            DeValue::Integer(_) => integer(v).and_then(|n| usize::try_from(n).ok()),
            _ => {
                d.at(
                    span.clone(),
                    format!("`{key}` must be a size such as \"4 MiB\""),
                );
                None
            }
        }
    };
    let count = |d: &mut Diags<'_>| -> Option<u32> {
        match integer(v).and_then(|n| u32::try_from(n).ok()) {
            Some(n) => Some(n),
            None => {
                d.at(
                    span.clone(),
                    format!("`{key}` must be a whole number from 0 to {}", u32::MAX),
                );
                None
            }
        }
    };
    match key {
        "max_message_bytes" => {
            if let Some(n) = bytes(d) {
                if n < 64 {
                    d.at(span, "`max_message_bytes` must be at least 64 bytes");
                } else {
                    q.max_message_bytes = Some(n);
                }
            }
        }
        "max_inflight_bytes" => {
            if let Some(n) = bytes(d) {
                q.max_inflight_bytes = n;
            }
        }
        "max_inflight_calls" => q.max_inflight_calls = count(d).unwrap_or(q.max_inflight_calls),
        "max_open_answers" => q.max_open_answers = count(d).unwrap_or(q.max_open_answers),
        "max_exports" => q.max_exports = count(d).unwrap_or(q.max_exports),
        "max_caps_per_message" => {
            q.max_caps_per_message = count(d).unwrap_or(q.max_caps_per_message)
        }
        "max_client_outgoing_bytes" => {
            if let Some(n) = bytes(d) {
                q.max_client_outgoing_bytes = n;
            }
        }
        "max_connections" => q.max_connections = count(d).unwrap_or(q.max_connections),
        "max_class_connections" => {
            q.max_class_connections = count(d).unwrap_or(q.max_class_connections)
        }
        "calls_per_second" | "burst" => {
            if let Some(n) = count(d) {
                match NonZeroU32::new(n) {
                    Some(n) if key == "burst" => q.burst = n,
                    Some(n) => q.calls_per_second = n,
                    None => d.at(span, format!("`{key}` must be at least 1")),
                }
            }
        }
        "idle_timeout" => match v.get_ref() {
            DeValue::String(s) => match parse_duration(s) {
                Ok(t) => q.idle_timeout = Some(t),
                Err(e) => d.at(span, format!("`idle_timeout`: {e}")),
            },
            _ => d.at(span, "`idle_timeout` must be a duration such as \"5 min\""),
        },
        _ => {}
    }
}
