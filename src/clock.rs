//! Time, injected. Every policy takes `now` from a [`Clock`], and the per-key limiters use the
//! same clock, so tests drive expiry and rate refill by advancing a fake clock instead of
//! sleeping.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use governor::nanos::Nanos;

/// The gateway's time source: the real clocks, or a fake one that only moves when told to.
#[derive(Clone, Debug)]
pub struct Clock {
    source: Arc<Source>,
}

#[derive(Debug)]
enum Source {
    Real {
        started: Instant,
    },
    Fake {
        wall_start: SystemTime,
        offset_nanos: AtomicU64,
    },
}

impl Clock {
    /// The system's wall clock for expiry, its monotonic clock for rate limits.
    pub fn real() -> Self {
        Clock {
            source: Arc::new(Source::Real {
                started: Instant::now(),
            }),
        }
    }

    /// A clock frozen at `wall_start` until [`Clock::advance`] moves it.
    pub fn fake(wall_start: SystemTime) -> Self {
        Clock {
            source: Arc::new(Source::Fake {
                wall_start,
                offset_nanos: AtomicU64::new(0),
            }),
        }
    }

    /// Moves a fake clock forward. A real clock cannot be moved, so this does nothing to it.
    pub fn advance(&self, by: Duration) {
        if let Source::Fake { offset_nanos, .. } = &*self.source {
            let nanos = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
            // Saturating: a test that moves the clock by centuries must not wrap it.
            let _ = offset_nanos.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                Some(n.saturating_add(nanos))
            });
        }
    }

    /// Wall-clock time, for expiry and timestamps.
    pub fn wall(&self) -> SystemTime {
        match &*self.source {
            Source::Real { .. } => SystemTime::now(),
            Source::Fake {
                wall_start,
                offset_nanos,
            } => wall_start
                .checked_add(Duration::from_nanos(offset_nanos.load(Ordering::SeqCst)))
                .unwrap_or(*wall_start),
        }
    }

    /// Wall-clock time as whole seconds since the Unix epoch.
    pub fn unix_secs(&self) -> i64 {
        unix_secs(self.wall())
    }
}

/// The last second RFC 3339 text can name, 9999-12-31T23:59:59Z: the latest time keygate
/// accepts or writes.
pub const LATEST: i64 = 253_402_300_799;

/// Seconds since the Unix epoch (negative before it).
pub fn unix_secs(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_secs()).map_or(i64::MIN, i64::saturating_neg),
    }
}

/// RFC 3339 text (UTC, whole seconds) for a Unix time, clamped to the years 1970 to 9999
/// that the format can hold. Validation keeps stored times inside them; the clamp makes
/// this total, so that no value can make it fail.
pub fn rfc3339(unix: i64) -> String {
    let secs = u64::try_from(unix.clamp(0, LATEST)).unwrap_or(0);
    let t = UNIX_EPOCH
        .checked_add(Duration::from_secs(secs))
        .unwrap_or(UNIX_EPOCH);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The UTC date (`YYYY-MM-DD`) of a Unix time, clamped as [`rfc3339`] clamps.
pub fn date(unix: i64) -> String {
    let stamp = rfc3339(unix);
    stamp.split('T').next().unwrap_or_default().to_owned()
}

/// Parses RFC 3339 text into a Unix time.
pub fn parse_rfc3339(text: &str) -> Result<i64, String> {
    humantime::parse_rfc3339_weak(text)
        .map(unix_secs)
        .map_err(|e| format!("`{text}` is not an RFC 3339 time ({e})"))
}

impl Clock {
    /// Monotonic time for the rate limits: nanoseconds since the clock began (since the
    /// process started, for a real clock; about 584 years before it saturates).
    pub fn monotonic_nanos(&self) -> u64 {
        match &*self.source {
            Source::Real { started } => {
                u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX)
            }
            Source::Fake { offset_nanos, .. } => offset_nanos.load(Ordering::SeqCst),
        }
    }
}

/// The same count for governor's limiters: the check that keygate's GCRA counts as
/// governor's does runs both on one fake clock.
impl governor::clock::Clock for Clock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        Nanos::new(self.monotonic_nanos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_clock_moves_only_when_advanced() {
        let start = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let clock = Clock::fake(start);
        assert_eq!(clock.unix_secs(), 1_700_000_000);
        clock.advance(Duration::from_secs(90));
        assert_eq!(clock.unix_secs(), 1_700_000_090);
        assert_eq!(clock.monotonic_nanos(), 90_000_000_000);
    }

    #[test]
    fn rfc3339_round_trips() {
        let t = parse_rfc3339("2026-11-23T08:00:00Z").unwrap();
        assert_eq!(rfc3339(t), "2026-11-23T08:00:00Z");
        assert!(parse_rfc3339("yesterday").is_err());
    }

    #[test]
    fn rfc3339_is_total() {
        assert_eq!(rfc3339(LATEST), "9999-12-31T23:59:59Z");
        assert_eq!(rfc3339(i64::MAX), "9999-12-31T23:59:59Z");
        assert_eq!(rfc3339(i64::MIN), "1970-01-01T00:00:00Z");
        assert_eq!(parse_rfc3339("9999-12-31T23:59:59Z"), Ok(LATEST));
    }

    #[test]
    fn a_fake_clock_saturates() {
        let clock = Clock::fake(UNIX_EPOCH);
        clock.advance(Duration::MAX);
        clock.advance(Duration::MAX);
        assert_eq!(clock.monotonic_nanos(), u64::MAX);
    }
}
