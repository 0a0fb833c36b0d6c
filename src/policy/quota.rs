//! Quotas: a key (or its tier) may allow N requests per UTC day or calendar month. The count
//! lives in the key's usage cell, outside the snapshot, so it survives reloads and restarts.
//! The check runs before the rate limiter and the count after it, so a refused request
//! never spends budget. Under concurrency the count may pass the limit by at most the
//! number of requests in flight at the instant it is reached.

/// How often a quota resets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Period {
    /// At 00:00 UTC.
    Day,
    /// At 00:00 UTC on the first of the month.
    Month,
}

/// A quota: `limit` requests per `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Quota {
    pub limit: u64,
    pub period: Period,
}

/// The largest quota: a trillion requests a period.
pub const MAX_QUOTA: u64 = 1_000_000_000_000;

impl Quota {
    /// `10000/day` or `1000000/month`, with N from 1 to [`MAX_QUOTA`].
    pub fn parse(text: &str) -> Result<Quota, String> {
        let bad = || {
            format!("`{text}` is not a quota: write N/day or N/month with N from 1 to {MAX_QUOTA}")
        };
        let (n, per) = text.trim().split_once('/').ok_or_else(bad)?;
        let limit: u64 = n
            .trim()
            .parse()
            .ok()
            .filter(|n| (1..=MAX_QUOTA).contains(n))
            .ok_or_else(bad)?;
        let period = match per.trim() {
            "day" | "d" => Period::Day,
            "month" | "mo" => Period::Month,
            _ => return Err(bad()),
        };
        Ok(Quota { limit, period })
    }

    /// The period containing `now`: its index (days or months since the epoch) and its end
    /// (Unix seconds).
    pub fn window(&self, now: i64) -> (i64, i64) {
        match self.period {
            // Saturating: only a clock near the ends of i64 could reach the limits.
            Period::Day => {
                let day = now.div_euclid(86_400);
                (day, day.saturating_add(1).saturating_mul(86_400))
            }
            Period::Month => {
                let (y, m, _) = civil_from_days(now.div_euclid(86_400));
                let index = y
                    .saturating_mul(12)
                    .saturating_add(i64::from(m))
                    .saturating_sub(1);
                let (ny, nm) = match m {
                    12 => (y.saturating_add(1), 1),
                    m => (y, m.saturating_add(1)),
                };
                (index, days_from_civil(ny, nm, 1).saturating_mul(86_400))
            }
        }
    }

    /// The nominal window for `RateLimit-Policy` (`w`): a day, or 30 days for a month.
    pub fn window_secs(&self) -> u64 {
        match self.period {
            Period::Day => 86_400,
            Period::Month => 30 * 86_400,
        }
    }
}

impl std::fmt::Display for Quota {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let per = match self.period {
            Period::Day => "day",
            Period::Month => "month",
        };
        write!(f, "{}/{per}", self.limit)
    }
}

/// Days either side of 1970 that the calendar functions take: more than an i64 of seconds
/// holds. Beyond them, they clamp.
const MAX_DAYS: i64 = 1 << 47;
/// Years either side of 0 that [`days_from_civil`] takes: more than [`MAX_DAYS`] days make.
const MAX_YEARS: i64 = 1 << 40;

/// Year, month (1-12), day (1-31) of a day count since 1970-01-01 (proleptic Gregorian).
// Howard Hinnant's algorithm. With z within ±MAX_DAYS no step comes near i64's range (the
// year is at most about 4 * 10^11), and the day and month casts are of 1..=31 and 1..=12.
#[allow(
    clippy::arithmetic_side_effects,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)]
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z.clamp(-MAX_DAYS, MAX_DAYS) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Days since 1970-01-01 of a civil date.
// Howard Hinnant's algorithm. With y within ±MAX_YEARS and m and d any u32, no step comes
// near i64's range (the largest, era * 146_097, is below 10^15).
#[allow(clippy::arithmetic_side_effects)]
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = y.clamp(-MAX_YEARS, MAX_YEARS);
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::parse_rfc3339;

    #[test]
    fn parse_and_display() {
        assert_eq!(
            Quota::parse("10000/day").unwrap(),
            Quota {
                limit: 10_000,
                period: Period::Day
            }
        );
        assert_eq!(Quota::parse("5/month").unwrap().to_string(), "5/month");
        for bad in ["0/day", "x/day", "10/week", "10"] {
            assert!(Quota::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn civil_dates_round_trip() {
        for days in [-800_000, -1, 0, 59, 60, 365, 11_016, 20_000, 2_000_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn windows_end_at_midnight_and_month_start() {
        let now = parse_rfc3339("2026-11-23T08:30:00Z").unwrap();
        let day = Quota::parse("1/day").unwrap();
        assert_eq!(
            day.window(now).1,
            parse_rfc3339("2026-11-24T00:00:00Z").unwrap()
        );
        let month = Quota::parse("1/month").unwrap();
        assert_eq!(
            month.window(now).1,
            parse_rfc3339("2026-12-01T00:00:00Z").unwrap()
        );
        let december = parse_rfc3339("2026-12-31T23:59:59Z").unwrap();
        assert_eq!(
            month.window(december).1,
            parse_rfc3339("2027-01-01T00:00:00Z").unwrap()
        );
        assert_ne!(month.window(now).0, month.window(december).0);
    }

    #[test]
    fn a_clock_at_the_ends_of_time_saturates() {
        for quota in ["1/day", "1/month"] {
            let q = Quota::parse(quota).unwrap();
            for now in [i64::MIN, i64::MIN + 1, -1, i64::MAX - 1, i64::MAX] {
                // The period still ends after now, unless the end saturated.
                let (_, end) = q.window(now);
                assert!(end > now || end == i64::MAX, "{quota} at {now}: {end}");
            }
        }
        let (y, m, d) = civil_from_days(i64::MAX);
        assert_eq!(days_from_civil(y, m, d), 1 << 47);
        assert_eq!(
            days_from_civil(i64::MIN, u32::MAX, u32::MAX),
            days_from_civil(-(1 << 40), u32::MAX, u32::MAX)
        );
    }
}
