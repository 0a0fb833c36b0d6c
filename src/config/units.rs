//! The small value syntaxes shared by the config, the key store and the CLI: durations
//! (`30s`, `24h`, `30d`), sizes (`10MiB`) and rates (`100/s`).

use std::time::Duration;

/// A duration such as `500ms`, `30s`, `24h` or `30d`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|_| format!("`{text}` is not a duration (examples: 500ms, 30s, 24h, 30d)"))
}

/// A duration from `min` to `max`, both included: every duration a user gives has a range,
/// so that no timer or deadline built from it can overflow.
pub fn parse_duration_in(text: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let d = parse_duration(text)?;
    if d < min || d > max {
        return Err(format!(
            "`{text}` must be from {} to {}",
            humantime::format_duration(min),
            humantime::format_duration(max)
        ));
    }
    Ok(d)
}

/// A byte size such as `1024`, `64KiB`, `10MiB`, `1GB`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit_bytes: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1_000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        _ => {
            return Err(format!(
                "`{text}` is not a size (examples: 65536, 64KiB, 10MiB, 1GB)"
            ))
        }
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit_bytes))
        .ok_or_else(|| format!("`{text}` is not a size (examples: 65536, 64KiB, 10MiB, 1GB)"))
}

/// The most requests a rate may allow per unit: one every microsecond at `N/s`.
pub const MAX_RATE: u32 = 1_000_000;

/// A request rate: `count` requests per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

impl Rate {
    /// The period's unit letter as written (`s`, `m` or `h`).
    pub fn unit(&self) -> &'static str {
        match self.per.as_secs() {
            1 => "s",
            60 => "m",
            _ => "h",
        }
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.count, self.unit())
    }
}

/// A rate such as `100/s`, `600/m` or `10000/h`, with N from 1 to [`MAX_RATE`].
pub fn parse_rate(text: &str) -> Result<Rate, String> {
    let bad =
        || format!("`{text}` is not a rate: write N/s, N/m or N/h with N from 1 to {MAX_RATE}");
    let (count, unit) = text.trim().split_once('/').ok_or_else(bad)?;
    let count: u32 = count.trim().parse().map_err(|_| bad())?;
    if !(1..=MAX_RATE).contains(&count) {
        return Err(bad());
    }
    let per = match unit.trim() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        _ => return Err(bad()),
    };
    Ok(Rate { count, per })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("30d").unwrap(),
            Duration::from_secs(30 * 86_400)
        );
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert!(parse_duration("soon").unwrap_err().contains("`soon`"));
        let (min, max) = (Duration::from_millis(1), Duration::from_secs(3600));
        assert!(parse_duration_in("1h", min, max).is_ok());
        assert_eq!(
            parse_duration_in("99999999999d", min, max).unwrap_err(),
            "`99999999999d` must be from 1ms to 1h"
        );
        assert!(parse_duration_in("0s", min, max).is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10MiB").unwrap(), 10 << 20);
        assert_eq!(parse_size("65536").unwrap(), 65536);
        assert_eq!(parse_size("1GB").unwrap(), 1_000_000_000);
        assert!(parse_size("10 potatoes").is_err());
        assert!(parse_size("99999999999999999999GiB").is_err());
    }

    #[test]
    fn rates() {
        let r = parse_rate("100/s").unwrap();
        assert_eq!((r.count, r.per), (100, Duration::from_secs(1)));
        assert_eq!(parse_rate("600/m").unwrap().to_string(), "600/m");
        assert!(parse_rate("0/s").is_err());
        assert!(parse_rate("1000000/s").is_ok());
        for too_fast in ["1000001/s", "2000000000/s", "4294967295/s", "4294967296/s"] {
            assert!(parse_rate(too_fast).unwrap_err().contains("1 to 1000000"));
        }
        assert!(parse_rate("100/day").is_err());
        assert!(parse_rate("fast").is_err());
    }
}
