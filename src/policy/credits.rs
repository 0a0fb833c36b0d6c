//! Credits: a key may hold N uses. Each accepted request spends one (or its route's `cost`);
//! at none left the key is refused with 429 `credits_exhausted`. A refill puts the balance
//! back to its amount on the calendar (00:00 UTC each day, or on a day of each month), not
//! on the next use, so periods never drift. What was spent lives outside the snapshot
//! ([`crate::state::credits`]); this module only says what a key holds in a period.

use super::quota::{civil_from_days, days_from_civil};

/// The most credits a key can hold, and the largest refill.
pub const MAX_CREDITS: u64 = 1_000_000_000_000;

/// How often a refill comes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Interval {
    /// At 00:00 UTC.
    Daily,
    /// At 00:00 UTC on this day of each month (1 to 31; the month's last day when it is
    /// shorter).
    Monthly { day: u32 },
}

/// Back to `amount` every `interval`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Refill {
    pub amount: u64,
    pub interval: Interval,
}

/// A key's credits: `remaining` as set at `set_at` (Unix seconds), and the refill.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Credits {
    pub remaining: u64,
    pub set_at: i64,
    /// Which setting of the balance this is: spending is counted per setting.
    pub version: u64,
    pub refill: Option<Refill>,
}

/// The balance of one period: the period's number (the same for every instant between two
/// refills), what the key holds in it before any spending, and when the next refill comes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Balance {
    pub period: i64,
    pub budget: u64,
    /// Unix seconds of the next refill; `None` without a refill.
    pub next_refill: Option<i64>,
}

impl Refill {
    /// The refill period holding `now`: its number and the instant of the next refill.
    pub fn period(&self, now: i64) -> (i64, i64) {
        let day = now.div_euclid(86_400);
        match self.interval {
            Interval::Daily => (day, day.saturating_add(1).saturating_mul(86_400)),
            Interval::Monthly { day: refill_day } => {
                let (y, m, _) = civil_from_days(day);
                // Months since year 0; this month's refill, or the last one if it is yet to come.
                let mut month = y
                    .saturating_mul(12)
                    .saturating_add(i64::from(m).saturating_sub(1));
                if refill_at(month, refill_day) > now {
                    month = month.saturating_sub(1);
                }
                (month, refill_at(month.saturating_add(1), refill_day))
            }
        }
    }
}

/// The instant of the refill in month `month` (months since year 0), on `day` or the
/// month's last day.
fn refill_at(month: i64, day: u32) -> i64 {
    let (y, m) = (month.div_euclid(12), month.rem_euclid(12));
    // `rem_euclid(12)` is 0..=11.
    let m = u32::try_from(m).unwrap_or(0).saturating_add(1);
    let first = days_from_civil(y, m, 1);
    let (ny, nm) = if m == 12 {
        (y.saturating_add(1), 1)
    } else {
        (y, m.saturating_add(1))
    };
    let days_in_month = days_from_civil(ny, nm, 1).saturating_sub(first);
    let day = i64::from(day.max(1)).min(days_in_month);
    first
        .saturating_add(day.saturating_sub(1))
        .saturating_mul(86_400)
}

impl Credits {
    /// What the key holds in the period of `now`: `remaining` in the period it was set in,
    /// the refill's amount in each period after.
    pub fn balance(&self, now: i64) -> Balance {
        match self.refill {
            None => Balance {
                period: 0,
                budget: self.remaining,
                next_refill: None,
            },
            Some(refill) => {
                let (period, next) = refill.period(now);
                let (set_period, _) = refill.period(self.set_at);
                Balance {
                    period,
                    budget: if period <= set_period {
                        self.remaining
                    } else {
                        refill.amount
                    },
                    next_refill: Some(next),
                }
            }
        }
    }
}

/// Reads a refill interval as the API and the store write it: `daily`, or `monthly` with an
/// optional day of the month (1 to 31, default 1).
pub fn interval(text: &str, day_of_month: Option<u32>) -> Result<Interval, String> {
    match (text, day_of_month) {
        ("daily", None) => Ok(Interval::Daily),
        ("daily", Some(_)) => Err("day_of_month goes with a monthly refill only".into()),
        ("monthly", None) => Ok(Interval::Monthly { day: 1 }),
        ("monthly", Some(d)) if (1..=31).contains(&d) => Ok(Interval::Monthly { day: d }),
        ("monthly", Some(d)) => Err(format!(
            "day_of_month {d} is not a day of a month (1 to 31)"
        )),
        (other, _) => Err(format!("`{other}` is not an interval: daily or monthly")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::parse_rfc3339;

    fn t(text: &str) -> i64 {
        parse_rfc3339(text).unwrap()
    }

    #[test]
    fn a_daily_refill_comes_at_midnight_utc() {
        let r = Refill {
            amount: 10,
            interval: Interval::Daily,
        };
        let (a, next) = r.period(t("2026-12-06T23:59:59Z"));
        assert_eq!(next, t("2026-12-07T00:00:00Z"));
        let (b, _) = r.period(t("2026-12-07T00:00:00Z"));
        assert_eq!(b, a + 1);
    }

    #[test]
    fn a_monthly_refill_comes_on_its_day_or_the_months_last() {
        let r = |day| Refill {
            amount: 10,
            interval: Interval::Monthly { day },
        };
        // The 15th: before it in December, the period began on November 15th.
        let (p, next) = r(15).period(t("2026-12-14T12:00:00Z"));
        assert_eq!(next, t("2026-12-15T00:00:00Z"));
        let (q, next) = r(15).period(t("2026-12-15T00:00:00Z"));
        assert_eq!((q, next), (p + 1, t("2027-01-15T00:00:00Z")));
        // The 31st in February is its last day, in a leap year too.
        let (_, next) = r(31).period(t("2027-02-01T00:00:00Z"));
        assert_eq!(next, t("2027-02-28T00:00:00Z"));
        let (_, next) = r(31).period(t("2028-02-10T00:00:00Z"));
        assert_eq!(next, t("2028-02-29T00:00:00Z"));
        let (_, next) = r(31).period(t("2028-02-29T00:00:00Z"));
        assert_eq!(next, t("2028-03-31T00:00:00Z"));
        // December's refill leads to January's.
        let (_, next) = r(1).period(t("2026-12-31T23:00:00Z"));
        assert_eq!(next, t("2027-01-01T00:00:00Z"));
    }

    #[test]
    fn the_balance_is_what_was_set_until_the_next_refill() {
        let c = Credits {
            remaining: 3,
            set_at: t("2026-12-06T10:00:00Z"),
            version: 1,
            refill: Some(Refill {
                amount: 100,
                interval: Interval::Daily,
            }),
        };
        let today = c.balance(t("2026-12-06T20:00:00Z"));
        assert_eq!(
            (today.budget, today.next_refill),
            (3, Some(t("2026-12-07T00:00:00Z")))
        );
        let tomorrow = c.balance(t("2026-12-07T00:00:00Z"));
        assert_eq!(tomorrow.budget, 100);
        assert_eq!(tomorrow.period, today.period + 1);
        let once = Credits { refill: None, ..c };
        assert_eq!(once.balance(t("2030-01-01T00:00:00Z")).budget, 3);
    }

    #[test]
    fn intervals_are_read_with_their_day() {
        assert_eq!(interval("daily", None), Ok(Interval::Daily));
        assert_eq!(
            interval("monthly", Some(31)),
            Ok(Interval::Monthly { day: 31 })
        );
        for (text, day) in [
            ("weekly", None),
            ("monthly", Some(0)),
            ("monthly", Some(32)),
            ("daily", Some(3)),
        ] {
            assert!(interval(text, day).is_err(), "{text} {day:?}");
        }
    }

    #[test]
    fn the_ends_of_time_saturate() {
        for interval in [Interval::Daily, Interval::Monthly { day: 31 }] {
            let r = Refill {
                amount: 1,
                interval,
            };
            for now in [i64::MIN, -1, 0, i64::MAX] {
                let (_, next) = r.period(now);
                assert!(
                    next > now || next == i64::MAX || now < -(1 << 50),
                    "{interval:?} {now}"
                );
            }
        }
    }
}
