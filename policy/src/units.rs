//! Human-readable sizes and durations for configuration: `"4 MiB"`, `"30s"`, `"5 min"`.

use std::time::Duration;

/// Parses a byte size: a whole number with an optional unit (`B`, `KiB`, `MiB`, `GiB`, or the
/// decimal `KB`, `MB`, `GB`), space optional, e.g. `"4 MiB"`, `"512KiB"`, `"65536"`.
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let (num, unit) = split_number(s)?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" | "k" => 1 << 10,
        "mib" | "m" => 1 << 20,
        "gib" | "g" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        _ => {
            return Err(format!(
                "unknown size unit {unit:?} in {s:?}: use B, KiB, MiB or GiB (e.g. \"4 MiB\")"
            ))
        }
    };
    num.checked_mul(mult)
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| format!("size {s:?} is too large"))
}

/// Parses a duration: a whole number with a unit (`us`, `ms`, `s`, `min`, `h`), space
/// optional, e.g. `"30s"`, `"500 ms"`, `"5 min"`, `"200us"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = split_number(s)?;
    let d = match unit.to_ascii_lowercase().as_str() {
        "us" | "µs" => Duration::from_micros(num),
        "ms" => Duration::from_millis(num),
        "s" | "sec" | "secs" => Duration::from_secs(num),
        "m" | "min" | "mins" => Duration::from_secs(num.saturating_mul(60)),
        "h" => Duration::from_secs(num.saturating_mul(3600)),
        "" => {
            return Err(format!(
                "duration {s:?} has no unit: write e.g. \"30s\", \"500ms\" or \"5 min\""
            ))
        }
        _ => {
            return Err(format!(
                "unknown duration unit {unit:?} in {s:?}: use us, ms, s, min or h"
            ))
        }
    };
    Ok(d)
}

fn split_number(s: &str) -> Result<(u64, &str), String> {
    let t = s.trim();
    let digits = t
        .find(|c: char| !c.is_ascii_digit() && c != '_')
        .unwrap_or(t.len());
    if digits == 0 {
        return Err(format!("{s:?} does not start with a number"));
    }
    let num: u64 = t[..digits]
        .replace('_', "")
        .parse()
        .map_err(|_| format!("number in {s:?} is too large"))?;
    Ok((num, t[digits..].trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("4 MiB"), Ok(4 << 20));
        assert_eq!(parse_bytes("512KiB"), Ok(512 << 10));
        assert_eq!(parse_bytes("65_536"), Ok(65536));
        assert!(parse_bytes("4 parsecs")
            .unwrap_err()
            .contains("unknown size unit"));
        assert!(parse_bytes("MiB").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5 min"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("200us"), Ok(Duration::from_micros(200)));
        assert_eq!(parse_duration("200 µs"), Ok(Duration::from_micros(200)));
        assert!(parse_duration("30").unwrap_err().contains("no unit"));
    }
}
