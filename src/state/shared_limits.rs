//! The shared limiter's Redis side (`rate_limit.backend: redis`): the client and its
//! connection, the Lua script, and whether Redis is up, kept between requests and, while its
//! settings are unchanged, between snapshots. The request stage that spends it is
//! [`crate::pipeline::shared_limit`].
//!
//! One Lua script per limited request does the quota checks, the credits checks, the GCRAs,
//! and then the quota counts and the credits spent, for the key and the identity it names,
//! atomically, on Redis's clock (so nodes' clocks need not agree): one round trip, and all
//! or nothing (a request one limit refuses spends no credit and charges no other limit).
//! Redis keeps, under the store's prefix `P`, for a key id or `@<identity id>`:
//! `P:rl:<id>` and `P:rl:<id>:<limit name>` (each GCRA's theoretical arrival time, expiring
//! once idle), `P:quota:<id>:<period>` (a counter expiring with its period) and
//! `P:credits:<id>:<version>:<period>` (the credits spent of one setting in one refill
//! period, expiring a day after it). When Redis cannot be reached, a background probe
//! notices it coming back.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::config::FailMode;
use crate::policy::credits::Credits;
use crate::policy::quota::Quota;
use crate::policy::rate::{Name, SharedPolicy};

const SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local rates = tonumber(ARGV[1])
local counters = tonumber(ARGV[2])
local reply = {0, 0, 0}
for i = 1, counters do
  local a = 3 * i
  local value = tonumber(redis.call('GET', KEYS[i]) or '0')
  reply[3 + i] = value
  if value + tonumber(ARGV[a + 1]) > tonumber(ARGV[a]) then
    reply[1] = 2
    reply[2] = i
    return reply
  end
end
local base = 2 + 3 * counters
local tats = {}
for j = 1, rates do
  local emission = tonumber(ARGV[base + 2 * j - 1])
  local burst = tonumber(ARGV[base + 2 * j])
  local tat = tonumber(redis.call('GET', KEYS[counters + j]) or '0')
  if tat < now then
    tat = now
  end
  local tolerance = emission * burst
  local new_tat = tat + emission
  local allow_at = new_tat - tolerance
  if allow_at > now then
    reply[1] = 1
    reply[2] = j
    reply[3] = allow_at - now
    return reply
  end
  tats[j] = new_tat
  reply[2 + counters + 2 * j] = math.floor((tolerance - (new_tat - now)) / emission)
  reply[3 + counters + 2 * j] = new_tat - now
end
for j = 1, rates do
  redis.call('SET', KEYS[counters + j], string.format('%.0f', tats[j]), 'PX', math.ceil((tats[j] - now) / 1000) + 1000)
end
for i = 1, counters do
  local a = 3 * i
  local add = tonumber(ARGV[a + 1])
  local value = redis.call('INCRBY', KEYS[i], add)
  local ttl = tonumber(ARGV[a + 2])
  if ttl > 0 and value == add then
    redis.call('EXPIRE', KEYS[i], ttl)
  end
  reply[3 + i] = value
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

/// One party to a shared decision: a key, or the identity it names.
#[derive(Debug, Clone, Copy)]
pub struct Party<'a> {
    /// Where Redis counts it: the key's id, or `@<identity id>`.
    pub id: &'a str,
    pub policy: &'a SharedPolicy,
    pub credits: Option<&'a Credits>,
}

/// What one of the script's counters counts, and for whom.
#[derive(Debug, Clone, Copy)]
pub enum Counted<'a> {
    Quota(&'a Party<'a>, &'a Quota),
    Credits(&'a Party<'a>, &'a Credits),
}

/// The script's counters for `parties`, in its order: every party's quota, then every
/// party's credits (so a request over a quota is told so before it is told of credits).
pub fn counters<'a>(parties: &'a [Party<'a>]) -> impl Iterator<Item = Counted<'a>> + 'a {
    let quotas = parties
        .iter()
        .filter_map(|p| Some(Counted::Quota(p, p.policy.quota.as_ref()?)));
    let credits = parties
        .iter()
        .filter_map(|p| Some(Counted::Credits(p, p.credits?)));
    quotas.chain(credits)
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

    /// Runs the script for `parties` (a key, and the identity it names): `[outcome, which,
    /// wait (µs), each counter's value (see [`counters`]), then each rate's remaining and
    /// reset (µs)]`, the rates of every party in order. Outcome 0 admits; 1 is refused by
    /// the rate numbered `which` (from 1), and 2 by the counter numbered `which` (a quota
    /// or credits). Every limit is checked before any is spent, so a refusal charges none.
    pub(crate) async fn call(
        &self,
        parties: &[Party<'_>],
        cost: u64,
        now: i64,
    ) -> redis::RedisResult<Vec<i64>> {
        let connection = self.connection().await?;
        let prefix = &self.settings.prefix;
        let mut call = self.script.prepare_invoke();
        let rates: usize = parties.iter().map(|p| p.policy.rates.len()).sum();
        call.arg(rates).arg(counters(parties).count());
        for counted in counters(parties) {
            match counted {
                Counted::Quota(party, q) => {
                    let (period, end) = q.window(now);
                    call.key(format!("{prefix}:quota:{}:{period}", party.id))
                        .arg(q.limit)
                        .arg(1)
                        // Kept a minute past its period.
                        .arg(end.saturating_sub(now).max(1).saturating_add(60));
                }
                Counted::Credits(party, c) => {
                    let balance = c.balance(now);
                    call.key(self.credits_key(party.id, c, now))
                        .arg(balance.budget)
                        .arg(cost)
                        // A day past the refill; without one, kept.
                        .arg(
                            balance
                                .next_refill
                                .map_or(0, |t| t.saturating_sub(now).max(1).saturating_add(86_400)),
                        );
                }
            }
        }
        for party in parties {
            for rate in party.policy.rates.iter() {
                // A key's rate limit keeps the name it always had; a named one adds its name.
                call.key(match &rate.name {
                    name @ (Name::Named(_) | Name::Shared(_)) => {
                        format!("{prefix}:rl:{}:{}", party.id, name.as_str())
                    }
                    _ => format!("{prefix}:rl:{}", party.id),
                });
                call.arg(rate.emission_us).arg(rate.burst);
            }
        }
        let mut connection = connection.clone();
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
