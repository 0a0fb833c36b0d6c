//! The range of every number and duration the config takes. Each bounds a value that later
//! becomes a timer, a deadline, a thread count or a buffer, so that none can overflow or
//! exhaust the machine there. Outside its range a value is a located config error. The
//! doc comment of each config field states its range; these are the values they state.

use std::fmt::Display;
use std::ops::RangeInclusive;
use std::time::Duration;

use super::units::parse_size;
use super::Problems;

const MS: Duration = Duration::from_millis(1);
const SECOND: Duration = Duration::from_secs(1);
const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

pub const HEADER_READ_TIMEOUT: (Duration, Duration) =
    (Duration::from_millis(100), MINUTE.saturating_mul(10));
pub const IDLE_TIMEOUT: (Duration, Duration) = (SECOND, HOUR);
pub const TUNNEL_IDLE_TIMEOUT: (Duration, Duration) = (SECOND, DAY.saturating_mul(7));
pub const DRAIN_TIMEOUT: (Duration, Duration) = (MS, HOUR);
pub const CONNECT_TIMEOUT: (Duration, Duration) = (MS, MINUTE.saturating_mul(5));
pub const RESPONSE_TIMEOUT: (Duration, Duration) = (MS, HOUR);
pub const POOL_IDLE_TIMEOUT: (Duration, Duration) = (MS, HOUR);
pub const FLUSH_INTERVAL: (Duration, Duration) = (Duration::from_millis(10), HOUR);
pub const QUIET_PERIOD: (Duration, Duration) = (SECOND, DAY.saturating_mul(365));
/// As [`crate::keys::lifecycle::MAX_GRACE_SECS`]: ten years.
pub const GRACE: (Duration, Duration) = (SECOND, DAY.saturating_mul(3650));
pub const LOCKOUT_WINDOW: (Duration, Duration) = (SECOND, DAY);
pub const LOCKOUT_COOLDOWN: (Duration, Duration) = (SECOND, DAY.saturating_mul(30));
pub const LIMITER_TIMEOUT: (Duration, Duration) = (MS, Duration::from_secs(10));
pub const WEBHOOK_TIMEOUT: (Duration, Duration) = (MS, MINUTE);

/// Bytes: 8 KiB to 16 MiB.
pub const MAX_HEADER_SIZE: RangeInclusive<u64> = 8 << 10..=16 << 20;
/// Bytes: up to 1 TiB.
pub const MAX_REQUEST_BODY: RangeInclusive<u64> = 0..=1 << 40;
pub const MAX_HEADERS: RangeInclusive<usize> = 1..=10_000;
pub const MAX_CONNECTIONS: RangeInclusive<usize> = 1..=1_000_000;
pub const H2_STREAMS: RangeInclusive<u32> = 1..=10_000;
pub const POOL_MAX_IDLE: RangeInclusive<usize> = 0..=100_000;
pub const WORKERS: RangeInclusive<usize> = 0..=1024;
pub const AUTH_FAILURES_PER_MINUTE: RangeInclusive<u32> = 0..=1_000_000;
pub const MAX_FAILURES: RangeInclusive<u32> = 1..=1_000_000;
pub const NODES: RangeInclusive<u32> = 1..=1000;
pub const WEBHOOK_RETRIES: RangeInclusive<u32> = 0..=10;
pub const HISTORY_PER_KEY: RangeInclusive<u32> = 0..=100_000;
pub const HISTORY_MAX_TOTAL: RangeInclusive<u64> = 0..=100_000_000;

/// `value` if it is in `range`, else a problem at `path`.
pub fn within<T: PartialOrd + Display + Copy>(
    value: T,
    range: RangeInclusive<T>,
    path: &str,
    p: &mut Problems,
) -> Option<T> {
    if range.contains(&value) {
        return Some(value);
    }
    p.push(
        path,
        format!(
            "{value} is out of range: use {} to {}",
            range.start(),
            range.end()
        ),
    );
    None
}

/// A size such as `64KiB` in `range`, else a problem at `path`.
pub fn size_in(
    text: &str,
    range: RangeInclusive<u64>,
    path: &str,
    p: &mut Problems,
) -> Option<u64> {
    match parse_size(text) {
        Ok(n) if range.contains(&n) => Some(n),
        Ok(_) => {
            p.push(
                path,
                format!(
                    "`{text}` is out of range: use {} to {} bytes",
                    range.start(),
                    range.end()
                ),
            );
            None
        }
        Err(e) => {
            p.push(path, e);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_values_name_their_range() {
        let mut p = Problems::default();
        assert_eq!(
            within(0usize, MAX_CONNECTIONS, "limits.max_connections", &mut p),
            None
        );
        assert_eq!(within(5usize, MAX_CONNECTIONS, "x", &mut p), Some(5));
        assert_eq!(
            size_in(
                "2000GiB",
                MAX_REQUEST_BODY,
                "limits.max_request_body",
                &mut p
            ),
            None
        );
        assert_eq!(
            size_in("1KiB", MAX_HEADER_SIZE, "limits.max_header_size", &mut p),
            None
        );
        let errors = p.locate(std::path::Path::new("k.yaml"), "");
        assert_eq!(errors.len(), 3);
        assert!(
            errors[0].message.contains("use 1 to 1000000"),
            "{}",
            errors[0]
        );
    }
}
