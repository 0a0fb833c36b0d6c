//! The shared limiter's Redis side (`rate_limit.backend: redis`): the client and its
//! connection, the Lua script, and whether Redis is up, kept between requests and, while its
//! settings are unchanged, between snapshots. The request stage that spends it is
//! [`crate::pipeline::shared_limit`].
//!
//! One Lua script per limited request does the quota check, the credits check, the GCRA,
//! and then the quota count and the credits spent, atomically, on Redis's clock (so nodes'
//! clocks need not agree): one round trip, and all or nothing (a request the GCRA refuses
//! spends no credit, and a request one rate limit refuses charges none of the key's other
//! limits). Redis keeps, under the store's prefix `P`, `P:rl:<key id>` and
//! `P:rl:<key id>:<limit name>` (each GCRA's theoretical arrival time, expiring once idle), `P:quota:<key id>:<period>` (a
//! counter expiring with its period) and `P:credits:<key id>:<version>:<period>` (the
//! credits spent of one setting in one refill period, expiring a day after it). When Redis
//! cannot be reached, a background probe notices it coming back.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::config::FailMode;
use crate::policy::credits::Credits;
use crate::policy::rate::{Name, SharedPolicy};

const SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local quota_limit = tonumber(ARGV[3])
local used = 0
if quota_limit > 0 then
  used = tonumber(redis.call('GET', KEYS[1]) or '0')
  if used >= quota_limit then
    return {2, 0, 0, used, 0}
  end
end
local budget = tonumber(ARGV[5])
local cost = tonumber(ARGV[6])
local spent = 0
if budget >= 0 then
  spent = tonumber(redis.call('GET', KEYS[2]) or '0')
  if spent + cost > budget then
    return {3, 0, 0, used, spent}
  end
end
local rates = tonumber(ARGV[1])
local reply = {0, 0, 0, used, spent}
local tats = {}
for j = 1, rates do
  local emission = tonumber(ARGV[5 + 2 * j])
  local burst = tonumber(ARGV[6 + 2 * j])
  local tat = tonumber(redis.call('GET', KEYS[2 + j]) or '0')
  if tat < now then
    tat = now
  end
  local tolerance = emission * burst
  local new_tat = tat + emission
  local allow_at = new_tat - tolerance
  if allow_at > now then
    return {1, j, allow_at - now, used, spent}
  end
  tats[j] = new_tat
  reply[4 + 2 * j] = math.floor((tolerance - (new_tat - now)) / emission)
  reply[5 + 2 * j] = new_tat - now
end
for j = 1, rates do
  redis.call('SET', KEYS[2 + j], string.format('%.0f', tats[j]), 'PX', math.ceil((tats[j] - now) / 1000) + 1000)
end
if quota_limit > 0 then
  used = redis.call('INCR', KEYS[1])
  if used == 1 then
    redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
  end
  reply[4] = used
end
if budget >= 0 then
  spent = redis.call('INCRBY', KEYS[2], cost)
  if tonumber(ARGV[2]) > 0 then
    redis.call('EXPIRE', KEYS[2], tonumber(ARGV[2]))
  end
  reply[5] = spent
end
return reply
";

/// How the shared limiter is set up; a reload with equal settings keeps the same limiter
/// (and its connection).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedSettings {
    pub url: String,
    /// The URL without its password, for the log.
    pub shown: String,
    pub prefix: String,
    pub fail_mode: FailMode,
    pub nodes: u32,
    pub timeout: Duration,
}

/// The shared limiter of one Redis.
#[derive(Debug)]
pub struct SharedLimiter {
    settings: SharedSettings,
    client: redis::Client,
    connection: tokio::sync::OnceCell<ConnectionManager>,
    script: redis::Script,
    up: AtomicBool,
    probing: AtomicBool,
    /// Limited requests decided by Redis, and by the fail mode.
    pub decided: AtomicU64,
    pub fallbacks: AtomicU64,
}

impl SharedLimiter {
    pub fn new(settings: SharedSettings) -> Result<Arc<SharedLimiter>, String> {
        let client = redis::Client::open(settings.url.as_str())
            .map_err(|e| format!("`{}`: {e}", settings.shown))?;
        Ok(Arc::new(SharedLimiter {
            settings,
            client,
            connection: tokio::sync::OnceCell::new(),
            script: redis::Script::new(SCRIPT),
            up: AtomicBool::new(true),
            probing: AtomicBool::new(false),
            decided: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
        }))
    }

    pub fn settings(&self) -> &SharedSettings {
        &self.settings
    }

    /// Counts a request decided by Redis, or by the fail mode.
    pub(crate) fn count(&self, by_redis: bool) {
        let counter = if by_redis {
            &self.decided
        } else {
            &self.fallbacks
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether Redis answered last time it was asked.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Runs the script for the key `id`: `[outcome, which, wait (µs), used, credits spent,
    /// then each rate's remaining and reset (µs)]`. Outcome 0 admits (and the pairs follow,
    /// one per rate of `policy`, in order), 1 is the rate limit numbered `which` (from 1),
    /// 2 the quota, 3 the credits. Every rate is checked before any is spent, so a refusal
    /// charges none.
    pub(crate) async fn call(
        &self,
        id: &str,
        policy: &SharedPolicy,
        credits: Option<(&Credits, u64)>,
        now: i64,
    ) -> redis::RedisResult<Vec<i64>> {
        let connection = self.connection().await?;
        let prefix = &self.settings.prefix;
        let (quota_key, limit, ttl) = match policy.quota {
            Some(q) => {
                let (period, end) = q.window(now);
                (
                    format!("{prefix}:quota:{id}:{period}"),
                    q.limit,
                    end.saturating_sub(now).max(1).saturating_add(60),
                )
            }
            None => (format!("{prefix}:quota:{id}:none"), 0, 1),
        };
        let (credits_key, budget, cost, credits_ttl) = match credits {
            Some((c, cost)) => {
                let balance = c.balance(now);
                (
                    self.credits_key(id, c, now),
                    i64::try_from(balance.budget).unwrap_or(i64::MAX),
                    cost,
                    // A day past the refill; without one, kept.
                    balance
                        .next_refill
                        .map_or(0, |t| t.saturating_sub(now).max(1).saturating_add(86_400)),
                )
            }
            None => (format!("{prefix}:credits:{id}:none"), -1, 0, 0),
        };
        let mut connection = connection.clone();
        let mut call = self.script.prepare_invoke();
        call.key(quota_key)
            .key(credits_key)
            .arg(policy.rates.len())
            .arg(credits_ttl)
            .arg(limit)
            .arg(ttl)
            .arg(budget)
            .arg(cost);
        for rate in policy.rates.iter() {
            // The rate limit's count keeps the name it always had; a named one adds its name.
            call.key(match &rate.name {
                Name::Named(name) => format!("{prefix}:rl:{id}:{name}"),
                _ => format!("{prefix}:rl:{id}"),
            });
            call.arg(rate.emission_us).arg(rate.burst);
        }
        call.invoke_async(&mut connection).await
    }

    /// Where Redis counts the credits key `id` spent of this setting in this period.
    fn credits_key(&self, id: &str, c: &Credits, now: i64) -> String {
        format!(
            "{}:credits:{id}:{}:{}",
            self.settings.prefix,
            c.version,
            c.balance(now).period
        )
    }

    /// The credits each key of `keys` has spent now, as Redis counts them.
    pub async fn credits_spent(
        &self,
        keys: &[(&str, &Credits)],
        now: i64,
    ) -> redis::RedisResult<Vec<u64>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut connection = self.connection().await?.clone();
        let names: Vec<String> = keys
            .iter()
            .map(|(id, c)| self.credits_key(id, c, now))
            .collect();
        let spent: Vec<Option<u64>> = redis::cmd("MGET")
            .arg(names)
            .query_async(&mut connection)
            .await?;
        Ok(spent.into_iter().map(Option::unwrap_or_default).collect())
    }

    async fn connection(&self) -> redis::RedisResult<&ConnectionManager> {
        self.connection
            .get_or_try_init(|| {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(
                        self.settings.timeout.max(Duration::from_millis(200)),
                    ))
                    .set_response_timeout(Some(self.settings.timeout))
                    .set_number_of_retries(1);
                ConnectionManager::new_with_config(self.client.clone(), config)
            })
            .await
    }

    /// Switches to the fail mode, logging the switch once, and starts a probe that switches
    /// back when Redis answers again.
    pub(crate) fn went_down(self: &Arc<Self>, why: &str) {
        if self.up.swap(false, Ordering::SeqCst) {
            tracing::warn!(
                redis = %self.settings.shown,
                fail_mode = self.settings.fail_mode.as_str(),
                error = why,
                "shared rate limiter unavailable; limiting by the fail mode until it returns"
            );
        }
        if !self.probing.swap(true, Ordering::SeqCst) {
            tokio::spawn(probe(Arc::downgrade(self)));
        }
    }
}

/// Pings Redis every 250 ms until it answers, then switches the limiter back. Ends early if
/// the limiter is dropped (a reload replaced it).
async fn probe(limiter: Weak<SharedLimiter>) {
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let Some(l) = limiter.upgrade() else { return };
        // Through the limiter's own connection when it has one: a ping on a broken one makes
        // it reconnect, so the first request after the switch back finds it ready.
        let ping = async {
            match l.connection.get() {
                Some(c) => {
                    redis::cmd("PING")
                        .query_async::<String>(&mut c.clone())
                        .await
                }
                None => {
                    let mut c = l.client.get_multiplexed_async_connection().await?;
                    redis::cmd("PING").query_async::<String>(&mut c).await
                }
            }
        };
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(1), ping).await {
            l.probing.store(false, Ordering::SeqCst);
            l.up.store(true, Ordering::SeqCst);
            tracing::info!(redis = %l.settings.shown, "shared rate limiter available again");
            return;
        }
    }
}
