//! The human-readable report. Warnings are lines starting `warning:` (dead rules lead with
//! their `FILE:LINE:COL`, as compilers print them); empty sections are left out. The JSON
//! shape is the stable contract for tools, not this text.

use std::fmt;

use super::{AuditReport, ClassAudit, OpaqueKind};

impl fmt::Display for OpaqueKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OpaqueKind::AnyPointer => "AnyPointer",
            OpaqueKind::Capability => "Capability",
            OpaqueKind::UnboundGeneric => "unbound generic parameter",
        })
    }
}

impl fmt::Display for AuditReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "audit of {} from bootstrap {}",
            self.policy, self.bootstrap
        )?;
        for class in &self.classes {
            writeln!(f)?;
            write_class(f, class)?;
        }
        writeln!(f)?;
        match self.warnings {
            0 => writeln!(f, "no warnings"),
            1 => writeln!(f, "1 warning"),
            n => writeln!(f, "{n} warnings"),
        }
    }
}

fn write_class(f: &mut fmt::Formatter<'_>, c: &ClassAudit) -> fmt::Result {
    writeln!(f, "client \"{}\"", c.name)?;
    let rows = c
        .reachable_interfaces
        .iter()
        .map(|r| (r.name.clone(), r.via.clone()));
    table(f, "reachable interfaces", rows)?;
    writeln!(f, "  callable ({}):", c.callable.len())?;
    for m in &c.callable {
        writeln!(f, "    {m}")?;
    }
    for d in &c.dead_rules {
        writeln!(
            f,
            "  {}: warning: dead rule \"{}\": no allowed path reaches {}",
            d.location,
            d.pattern,
            d.methods.join(", ")
        )?;
    }
    for e in &c.opaque_escapes {
        let article = match e.kind {
            OpaqueKind::Capability => "a",
            _ => "an",
        };
        writeln!(
            f,
            "  warning: opaque escape: {} {} is {article} {} (the type graph cannot see \
             which capabilities it carries)",
            e.method, e.field, e.kind
        )?;
    }
    let rows = c.wildcard_allowed.iter().map(|w| {
        (
            w.method.clone(),
            format!("\"{}\" at {}", w.pattern, w.location),
        )
    });
    table(f, "allowed only by a wildcard", rows)?;
    let rows = c
        .callbacks
        .iter()
        .map(|cb| (format!("{} {}", cb.method, cb.field), cb.interface.clone()));
    table(f, "callbacks, handed to the server", rows)?;
    if !c.reachable_nothing_allowed.is_empty() {
        writeln!(
            f,
            "  reachable, nothing allowed: {}",
            c.reachable_nothing_allowed.join(", ")
        )?;
    }
    Ok(())
}

/// A titled two-column section, the first column padded; nothing when there are no rows.
fn table(
    f: &mut fmt::Formatter<'_>,
    title: &str,
    rows: impl Iterator<Item = (String, String)>,
) -> fmt::Result {
    let rows: Vec<(String, String)> = rows.collect();
    if rows.is_empty() {
        return Ok(());
    }
    let width = rows
        .iter()
        .map(|(a, _)| a.chars().count())
        .max()
        .unwrap_or(0);
    writeln!(f, "  {title} ({}):", rows.len())?;
    for (a, b) in &rows {
        writeln!(f, "    {a:width$}  {b}")?;
    }
    Ok(())
}
