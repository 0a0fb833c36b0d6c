//! Usage across nodes. With a Redis store, every node adds what it counted to Redis once a
//! second, in one atomic pipeline, so that a key's requests today, error rate and last use
//! add up over every node. The request path only bumps the node's own atomics, as always.
//!
//! In Redis, under the store's prefix `P`:
//! - `P:usage:<day>:<key id>`: a hash from counter slot (the usage counters' order; refusal
//!   codes are only ever appended) to today's count, expiring three days later;
//! - `P:last_used`: a hash from key id to `<unix seconds> <client address>`, only ever moved
//!   forward.
//!
//! A push takes only the cells marked since the last one ([`UsageBook::unpushed`]), so a
//! node with a million used keys and a few busy ones sends, and compares, the few. A push
//! that fails marks its cells again and is retried at the next tick: counts are never lost
//! while the node runs, and at most the last second's are if it dies. The per-minute series
//! stays per node.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::gateway::Gateway;
use crate::keys::redis_store::RedisStore;
use crate::keys::LastUse;
#[cfg(doc)]
use crate::state::usage::UsageBook;
use crate::state::usage::{Cell, KeyUsage, UsageReport, SLOTS};

const LATEST: &str = r"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur or tonumber(string.match(cur, '^(%d+)')) < tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. ARGV[3])
end
return 0
";

/// Keeps the usage pushed: what each key's counters and last use were at the last push.
#[derive(Default)]
struct Pushed {
    slots: HashMap<Arc<str>, Vec<u64>>,
    last_use: HashMap<Arc<str>, i64>,
    failing: bool,
}

/// Pushes this node's usage to Redis every second until stopped, then once more.
pub async fn run(gw: Arc<Gateway>, mut stop: watch::Receiver<Option<Duration>>) {
    // Counts from before this start (restored from the usage file) were pushed by the run
    // that made them.
    let mut pushed = Pushed::default();
    for (id, usage) in gw.usage.all() {
        pushed.slots.insert(id.clone(), usage.slots());
        if let Some(u) = usage.last_use() {
            pushed.last_use.insert(id, u.at);
        }
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            _ = stop.changed() => true,
        };
        let snapshot = gw.snapshot.load_full();
        if let Some(redis) = snapshot.store.redis() {
            push(&gw, redis, &mut pushed).await;
        }
        if stopping {
            return;
        }
    }
}

/// One push: the pipeline, whether it holds a command, and every cell whose mark it took.
struct Batch {
    pipe: redis::Pipeline,
    commands: bool,
    taken: Vec<Taken>,
}

/// A cell a push took the mark of, with what to remember of it once the push is through.
struct Taken {
    id: Arc<str>,
    usage: Arc<KeyUsage>,
    slots: Vec<u64>,
    last_at: Option<i64>,
}

/// The commands that add what `cells`, the cells whose marks the push took
/// ([`UsageBook::unpushed`]), counted since `pushed`.
fn batch(cells: Vec<Cell>, pushed: &Pushed, prefix: &str, day: i64) -> Batch {
    let mut pipe = redis::pipe();
    pipe.atomic();
    let mut commands = false;
    let mut taken = Vec::new();
    for (id, usage) in cells {
        let now = usage.slots();
        let before = pushed.slots.get(&id);
        let key = format!("{prefix}:usage:{day}:{id}");
        let mut moved = false;
        for (slot, n) in now.iter().enumerate() {
            let was = before.and_then(|b| b.get(slot)).copied().unwrap_or(0);
            if let Some(delta) = n.checked_sub(was).filter(|&d| d > 0) {
                pipe.hincr(&key, slot, delta).ignore();
                moved = true;
                commands = true;
            }
        }
        if moved {
            pipe.expire(&key, 3 * 86_400).ignore();
        }
        let last = usage.last_use();
        if let Some(u) = &last {
            if pushed.last_use.get(&id) != Some(&u.at) {
                pipe.cmd("EVAL")
                    .arg(LATEST)
                    .arg(1)
                    .arg(format!("{prefix}:last_used"))
                    .arg(&*id)
                    .arg(u.at)
                    .arg(u.ip.as_deref().unwrap_or("-"))
                    .ignore();
                commands = true;
            }
        }
        taken.push(Taken {
            id,
            usage,
            slots: now,
            last_at: last.map(|u| u.at),
        });
    }
    Batch {
        pipe,
        commands,
        taken,
    }
}

async fn push(gw: &Gateway, redis: &RedisStore, pushed: &mut Pushed) {
    let day = gw.clock.unix_secs().div_euclid(86_400);
    let Batch {
        pipe,
        commands,
        taken,
    } = batch(gw.usage.unpushed(), pushed, redis.prefix(), day);
    if !commands {
        return;
    }
    let sent = async {
        let mut c = redis.client().get_multiplexed_async_connection().await?;
        pipe.query_async::<()>(&mut c).await
    };
    match tokio::time::timeout(Duration::from_secs(2), sent).await {
        Ok(Ok(())) => {
            if std::mem::take(&mut pushed.failing) {
                tracing::info!(redis = redis.shown(), "usage reaches Redis again");
            }
            for Taken {
                id, slots, last_at, ..
            } in taken
            {
                if let Some(at) = last_at {
                    pushed.last_use.insert(id.clone(), at);
                }
                pushed.slots.insert(id, slots);
            }
        }
        failed => {
            for t in &taken {
                t.usage.mark_unpushed();
            }
            if !std::mem::replace(&mut pushed.failing, true) {
                let why = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "no answer within 2s".into(),
                };
                tracing::warn!(
                    redis = redis.shown(),
                    error = why,
                    "cannot push usage to Redis; keeping it until it can"
                );
            }
        }
    }
}

/// Today's usage of `ids` summed over every node, from Redis. Blocking: call it from a
/// blocking thread.
pub fn read(
    redis: &RedisStore,
    ids: &[String],
    now: i64,
) -> Result<HashMap<String, UsageReport>, String> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let day = now.div_euclid(86_400);
    let prefix = redis.prefix();
    let mut con = redis.connection()?;
    let mut pipe = redis::pipe();
    for id in ids {
        pipe.hgetall(format!("{prefix}:usage:{day}:{id}"));
    }
    pipe.cmd("HMGET")
        .arg(format!("{prefix}:last_used"))
        .arg(ids);
    let mut replies: Vec<redis::Value> = pipe
        .query(&mut con)
        .map_err(|e| format!("Redis at {} is unavailable: {e}", redis.shown()))?;
    let last: Vec<Option<String>> = replies
        .pop()
        .map(redis::from_redis_value)
        .transpose()
        .map_err(|e| e.to_string())?
        .unwrap_or_default();
    let mut out = HashMap::with_capacity(ids.len());
    for ((id, reply), last) in ids.iter().zip(replies).zip(last) {
        let counts: HashMap<usize, u64> =
            redis::from_redis_value(reply).map_err(|e| e.to_string())?;
        // Redis is written by every node, of any version: a slot this build does not know
        // is ignored, so no field can size or overflow the vector.
        let mut slots = vec![0; SLOTS];
        for (slot, n) in counts {
            if let Some(count) = slots.get_mut(slot) {
                *count = n;
            }
        }
        let last_use = last.as_deref().and_then(|text| {
            let (at, ip) = text.split_once(' ')?;
            Some(LastUse {
                at: at.parse().ok()?,
                ip: (ip != "-").then(|| ip.to_string()),
            })
        });
        out.insert(id.clone(), UsageReport::from_slots(&slots, last_use));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::usage::UsageBook;

    fn sent(b: &Batch) -> String {
        String::from_utf8_lossy(&b.pipe.get_packed_pipeline()).into_owned()
    }

    fn ids(b: &Batch) -> Vec<&str> {
        let mut ids: Vec<&str> = b.taken.iter().map(|t| &*t.id).collect();
        ids.sort_unstable();
        ids
    }

    /// A push takes only the cells that moved since the last one: an idle cell is passed
    /// over, and a cell a failed push marked again is taken and sends what it still owes.
    #[test]
    fn a_push_sends_only_the_cells_marked_since_the_last() {
        let dir = tempfile::tempdir().unwrap();
        let book = UsageBook::open(dir.path().join("usage.json"));
        let cells: Vec<_> = ["busy", "idle", "again"]
            .iter()
            .map(|id| book.cells().get_or_make(id))
            .collect();
        for u in &cells {
            u.accepted();
        }
        let mut pushed = Pushed::default();
        let first = batch(book.unpushed(), &pushed, "p", 7);
        assert_eq!(ids(&first), ["again", "busy", "idle"]);
        assert!(first.commands && sent(&first).contains("p:usage:7:idle"));
        // "again" is left out of what the push remembers, as when its push failed.
        for t in first.taken {
            if &*t.id == "again" {
                t.usage.mark_unpushed();
            } else {
                pushed.slots.insert(t.id, t.slots);
            }
        }
        cells[0].accepted();
        let second = batch(book.unpushed(), &pushed, "p", 7);
        assert_eq!(ids(&second), ["again", "busy"]);
        let text = sent(&second);
        assert!(text.contains("p:usage:7:busy") && text.contains("p:usage:7:again"));
        assert!(!text.contains("idle"), "{text}");
        // Nothing moved since: nothing is taken.
        let third = batch(book.unpushed(), &pushed, "p", 7);
        assert!(third.taken.is_empty() && !third.commands);
    }
}
