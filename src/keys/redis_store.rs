//! Key records in Redis, so that several gateway nodes share one key set.
//!
//! Layout, under a prefix `P` (`store.prefix`, default `keygate`):
//! - `P:keys`: a hash from key id to the record as JSON (the same JSON as a file store line);
//! - `P:version`: a counter, one more after every write;
//! - `P:changes`: a pub/sub channel on which every write publishes the new version, followed
//!   by the ids of the records it set (space-separated) when there are at most
//!   [`MAX_LISTED`] of them and none was deleted;
//! - `P:lock`: the writers' lock, held for one read-modify-write (like the file store's).
//!
//! A write runs as one Lua script: it checks the writer still holds the lock, sets or deletes
//! the changed records, bumps the version and publishes it, atomically. It is acknowledged
//! only after Redis has run it; how durable that is depends on Redis's own settings (see the
//! README: `appendonly yes`, `appendfsync always` for no loss on power failure).
//!
//! Nodes never read Redis on the request path: each holds the whole set in its snapshot.
//! When the next version is published with its ids, a node reads only those records and
//! applies them to its snapshot as a delta; otherwise (a version missed, a bulk write, a
//! deletion) it reads the whole set again, as it does after a reconnect.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::records::{DocumentRecords, Records};
use super::{KeyError, KeyRecord};
use crate::keys::store::StoreFile;

/// How long a writer may hold the lock before another may take it over.
const LOCK_TTL: Duration = Duration::from_secs(30);
/// How long a writer waits for the lock.
const LOCK_WAIT: Duration = Duration::from_secs(20);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const IO_TIMEOUT: Duration = Duration::from_secs(10);

const APPLY: &str = r"
if redis.call('GET', KEYS[3]) ~= ARGV[1] then
  return redis.error_reply('the store lock was lost')
end
local ids = {}
for i = 4, #ARGV, 2 do
  if ARGV[i + 1] == '' then
    redis.call('HDEL', KEYS[1], ARGV[i])
  else
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
  ids[#ids + 1] = ARGV[i]
end
local v = redis.call('INCR', KEYS[2])
if ARGV[3] == 'listed' then
  redis.call('PUBLISH', ARGV[2], v .. ' ' .. table.concat(ids, ' '))
else
  redis.call('PUBLISH', ARGV[2], v)
end
return v
";

const UNLOCK: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// A write that changes more records than this publishes its version alone, and every node
/// reads the whole set: one message stays small, and a bulk write costs one full read.
pub const MAX_LISTED: usize = 1_000;

/// What one publication on the change channel says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The store's version after the write.
    pub version: u64,
    /// The ids of the records the write set, if the writer listed them.
    pub ids: Option<Vec<String>>,
}

impl Change {
    /// Reads a publication: `VERSION [ID ...]`. Anything else is `None` (read the whole set).
    pub fn parse(payload: &str) -> Option<Change> {
        let mut words = payload.split(' ');
        let version = words.next()?.parse().ok()?;
        let ids: Vec<String> = words.map(str::to_string).collect();
        if ids.iter().any(String::is_empty) {
            return None;
        }
        Some(Change {
            version,
            ids: (!ids.is_empty()).then_some(ids),
        })
    }
}

/// A key store in Redis.
#[derive(Debug, Clone)]
pub struct RedisStore {
    client: redis::Client,
    /// The URL without any password, for messages.
    shown: String,
    prefix: String,
    keys: String,
    version: String,
    lock: String,
    changes: String,
}

impl RedisStore {
    /// A store at `url` (`redis://[user:password@]host:port[/db]`) under `prefix`. Nothing is
    /// contacted yet.
    pub fn new(url: &str, prefix: &str) -> Result<RedisStore, String> {
        let client = redis::Client::open(url).map_err(|e| format!("`{}`: {e}", redact(url)))?;
        Ok(RedisStore {
            client,
            shown: redact(url),
            prefix: prefix.to_string(),
            keys: format!("{prefix}:keys"),
            version: format!("{prefix}:version"),
            lock: format!("{prefix}:lock"),
            changes: format!("{prefix}:changes"),
        })
    }

    /// The URL, without its password.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    /// The prefix of keygate's Redis keys.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A synchronous connection with timeouts, for blocking threads.
    pub fn connection(&self) -> Result<redis::Connection, String> {
        self.connect()
    }

    /// The channel every write publishes its version on.
    pub fn changes_channel(&self) -> &str {
        &self.changes
    }

    fn connect(&self) -> Result<redis::Connection, String> {
        let con = self
            .client
            .get_connection_with_timeout(CONNECT_TIMEOUT)
            .map_err(|e| self.unreachable(&e))?;
        con.set_read_timeout(Some(IO_TIMEOUT))
            .and_then(|()| con.set_write_timeout(Some(IO_TIMEOUT)))
            .map_err(|e| self.unreachable(&e))?;
        Ok(con)
    }

    fn unreachable(&self, e: &redis::RedisError) -> String {
        format!("Redis at {} is unavailable: {e}", self.shown)
    }

    /// Every record and the version they are at, read atomically.
    pub fn load(&self) -> Result<(Vec<KeyRecord>, u64), String> {
        let mut con = self.connect()?;
        self.read(&mut con)
    }

    fn read(&self, con: &mut redis::Connection) -> Result<(Vec<KeyRecord>, u64), String> {
        let (version, entries): (Option<u64>, HashMap<String, String>) = redis::pipe()
            .atomic()
            .get(&self.version)
            .hgetall(&self.keys)
            .query(con)
            .map_err(|e| self.unreachable(&e))?;
        let mut records = Vec::with_capacity(entries.len());
        for (id, json) in entries {
            let record: KeyRecord = serde_json::from_str(&json).map_err(|e| {
                format!("{}: the record of key `{id}` is not valid: {e}", self.keys)
            })?;
            records.push(record);
        }
        // The hash has no order: the file store's order is creation order.
        records.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok((records, version.unwrap_or(0)))
    }

    /// The records with these ids, as they are now; `None` if any of them is gone.
    pub fn records(&self, ids: &[String]) -> Result<Option<Vec<KeyRecord>>, String> {
        let mut con = self.connect()?;
        let found: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(&self.keys)
            .arg(ids)
            .query(&mut con)
            .map_err(|e| self.unreachable(&e))?;
        let mut records = Vec::with_capacity(found.len());
        for (id, json) in ids.iter().zip(found) {
            let Some(json) = json else { return Ok(None) };
            let record: KeyRecord = serde_json::from_str(&json).map_err(|e| {
                format!("{}: the record of key `{id}` is not valid: {e}", self.keys)
            })?;
            records.push(record);
        }
        Ok(Some(records))
    }

    /// One read-modify-write under the writers' lock: `change` edits the whole set, and only
    /// the records it changed are written, with the version bump, in one script.
    pub fn transact<T>(
        &self,
        change: impl FnOnce(&mut dyn Records) -> Result<T, KeyError>,
    ) -> Result<T, KeyError> {
        let mut con = self.connect().map_err(KeyError::Unavailable)?;
        let token = lock_token();
        self.acquire(&mut con, &token)?;
        let result = self.apply(&mut con, &token, change);
        let released: Result<i64, _> = redis::Script::new(UNLOCK)
            .key(&self.lock)
            .arg(&token)
            .invoke(&mut con);
        if let Err(e) = released {
            tracing::warn!(error = %e, "could not release the store lock; it expires by itself");
        }
        result
    }

    fn acquire(&self, con: &mut redis::Connection, token: &str) -> Result<(), KeyError> {
        let start = Instant::now();
        let mut pause = Duration::from_millis(2);
        loop {
            let taken: Option<String> = redis::cmd("SET")
                .arg(&self.lock)
                .arg(token)
                .arg("NX")
                .arg("PX")
                .arg(u64::try_from(LOCK_TTL.as_millis()).unwrap_or(u64::MAX))
                .query(con)
                .map_err(|e| KeyError::Unavailable(self.unreachable(&e)))?;
            if taken.is_some() {
                return Ok(());
            }
            if start.elapsed() >= LOCK_WAIT {
                return Err(KeyError::Unavailable(format!(
                    "another writer has held the key store lock in Redis at {} for {}s",
                    self.shown,
                    LOCK_WAIT.as_secs()
                )));
            }
            std::thread::sleep(pause);
            pause = pause.saturating_mul(2).min(Duration::from_millis(50));
        }
    }

    fn apply<T>(
        &self,
        con: &mut redis::Connection,
        token: &str,
        change: impl FnOnce(&mut dyn Records) -> Result<T, KeyError>,
    ) -> Result<T, KeyError> {
        let (records, _) = self.read(con).map_err(KeyError::Unavailable)?;
        let before: HashMap<String, String> = records
            .iter()
            .map(|r| Ok((r.id.clone(), json(r)?)))
            .collect::<Result<_, KeyError>>()?;
        let mut file = StoreFile {
            keys: records,
            ..StoreFile::default()
        };
        let out = change(&mut DocumentRecords::new(&mut file))?;
        let apply = redis::Script::new(APPLY);
        let mut script = apply.prepare_invoke();
        script
            .key(&self.keys)
            .key(&self.version)
            .key(&self.lock)
            .arg(token)
            .arg(&self.changes);
        let mut set = Vec::new();
        let mut after = std::collections::HashSet::new();
        for r in &file.keys {
            after.insert(r.id.as_str());
            let now = json(r)?;
            if before.get(&r.id) != Some(&now) {
                set.push((r.id.as_str(), now));
            }
        }
        let deleted: Vec<&String> = before
            .keys()
            .filter(|id| !after.contains(id.as_str()))
            .collect();
        // Listed only when a follower can apply the ids as they are: a few set records, each
        // id one word.
        let listed = deleted.is_empty()
            && set.len() <= MAX_LISTED
            && set
                .iter()
                .all(|(id, _)| !id.is_empty() && !id.contains(' '));
        script.arg(if listed { "listed" } else { "version" });
        for (id, now) in &set {
            script.arg(*id).arg(now);
        }
        for id in &deleted {
            script.arg(*id).arg("");
        }
        if !set.is_empty() || !deleted.is_empty() {
            let _version: u64 = script
                .invoke(con)
                .map_err(|e| KeyError::Unavailable(self.unreachable(&e)))?;
        }
        Ok(out)
    }
}

fn json(record: &KeyRecord) -> Result<String, KeyError> {
    serde_json::to_string(record).map_err(|e| KeyError::Io(std::io::Error::other(e)))
}

fn lock_token() -> String {
    let mut bytes = [0u8; 16];
    // Without OS randomness, the process id and time still tell writers apart.
    if getrandom::fill(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
            .to_le_bytes();
        let pid = std::process::id().to_le_bytes();
        // The low 8 bytes of the time, which are the ones that change, then the pid.
        for (slot, &b) in bytes.iter_mut().zip(nanos.iter().take(8).chain(&pid)) {
            *slot = b;
        }
    }
    crate::keys::hex(&bytes)
}

/// `url` without the password, if it has one.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_publication_is_a_version_and_maybe_ids() {
        let change = |version, ids: Option<&[&str]>| {
            Some(Change {
                version,
                ids: ids.map(|ids| ids.iter().map(|s| s.to_string()).collect()),
            })
        };
        assert_eq!(Change::parse("7"), change(7, None));
        assert_eq!(
            Change::parse("8 ab12 cd34"),
            change(8, Some(&["ab12", "cd34"]))
        );
        for bad in ["", "x", "-1", "9  ab", "9 ab ", "18446744073709551616"] {
            assert_eq!(Change::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn passwords_never_appear_in_messages() {
        assert_eq!(
            redact("redis://:hunter2@10.0.0.1:6379/0"),
            "redis://:***@10.0.0.1:6379/0"
        );
        assert_eq!(redact("redis://app:pw@h:1"), "redis://app:***@h:1");
        assert_eq!(redact("redis://h:6379"), "redis://h:6379");
        let e = RedisStore::new("redis://:hunter2@[bad", "kg").unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
    }
}
