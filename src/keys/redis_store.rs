//! Key records in Redis, so that several gateway nodes share one key set.
//!
//! Layout, under a prefix `P` (`store.prefix`, default `keygate`):
//! - `P:keys`: a hash from key id to the record as JSON (the same JSON as a file store line);
//! - `P:version`: a counter, one more after every write;
//! - `P:changes`: a pub/sub channel on which every write publishes the new version, followed
//!   by the ids of the records it set (space-separated) when there are at most
//!   [`MAX_LISTED`] of them;
//! - `P:lock`: the writers' lock, held for one read-modify-write (like the file store's);
//! - the writers' indexes, so that a write reads only the records it touches: `P:hashes`
//!   (each key's hash to its id), `P:counted:<namespace>` (a sorted set of the keys that count
//!   toward the namespace's tier, neither revoked nor expired, scored by their expiry),
//!   `P:counted_namespaces` (the namespaces that have such a set), and `P:indexed`, the
//!   version at which the indexes were last brought up to date. A writer that finds
//!   `P:indexed` behind `P:version` (the first write after an upgrade, or a write by an older
//!   keygate) rebuilds them from the records first, under the lock.
//!
//! A write runs as one Lua script: it checks the writer still holds the lock, sets the
//! changed records and their index entries, bumps the version and publishes it, atomically.
//! It is acknowledged only after Redis has run it; how durable that is depends on Redis's
//! own settings (see the README: `appendonly yes`, `appendfsync always` for no loss on power
//! failure).
//!
//! Nodes never read Redis on the request path: each holds the whole set in its snapshot.
//! When the next version is published with its ids, a node reads only those records and
//! applies them to its snapshot as a delta; otherwise (a version missed, a bulk write) it
//! reads the whole set again, as it does after a reconnect.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::records::Records;
use super::{KeyError, KeyRecord, Side, Status};

/// How long a writer may hold the lock before another may take it over.
const LOCK_TTL: Duration = Duration::from_secs(30);
/// How long a writer waits for the lock.
const LOCK_WAIT: Duration = Duration::from_secs(20);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Sets records with their index entries. KEYS: the records, the version, the lock, the
/// hash index, the indexed version, the counted namespaces. ARGV: the lock token, the
/// channel, `listed` or `version`, the counted sets' key prefix, then seven per record: id,
/// JSON, hash, the hash before (or empty), namespace, the namespace before (or empty), and
/// the expiry score if the key counts toward its tier (or empty).
const APPLY: &str = r"
if redis.call('GET', KEYS[3]) ~= ARGV[1] then
  return redis.error_reply('the store lock was lost')
end
local ids = {}
for i = 5, #ARGV, 7 do
  local id, hash, old_hash = ARGV[i], ARGV[i + 2], ARGV[i + 3]
  local ns, old_ns, score = ARGV[i + 4], ARGV[i + 5], ARGV[i + 6]
  redis.call('HSET', KEYS[1], id, ARGV[i + 1])
  if old_hash ~= '' and old_hash ~= hash and redis.call('HGET', KEYS[4], old_hash) == id then
    redis.call('HDEL', KEYS[4], old_hash)
  end
  redis.call('HSET', KEYS[4], hash, id)
  if old_ns ~= '' then
    redis.call('ZREM', ARGV[4] .. old_ns, id)
  end
  if score ~= '' then
    redis.call('ZADD', ARGV[4] .. ns, score, id)
    redis.call('SADD', KEYS[6], ns)
  end
  ids[#ids + 1] = id
end
local v = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[5], v)
if ARGV[3] == 'listed' then
  redis.call('PUBLISH', ARGV[2], v .. ' ' .. table.concat(ids, ' '))
else
  redis.call('PUBLISH', ARGV[2], v)
end
return v
";

/// Replaces a side collection (alert rules, identities, admin tokens). KEYS: the collection, the version,
/// the lock, the indexed version. ARGV: the lock token, the channel, the collection as a
/// JSON array. The indexes cover keys only, so they stay current when they were.
const SET_SIDE: &str = r"
if redis.call('GET', KEYS[3]) ~= ARGV[1] then
  return redis.error_reply('the store lock was lost')
end
redis.call('SET', KEYS[1], ARGV[3])
local before = redis.call('GET', KEYS[2])
local indexed = redis.call('GET', KEYS[4])
local v = redis.call('INCR', KEYS[2])
if indexed and indexed == before then
  redis.call('SET', KEYS[4], v)
end
redis.call('PUBLISH', ARGV[2], v)
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
    hashes: String,
    /// The prefix of the counted sets, `P:counted:`, which the namespace completes.
    counted: String,
    counted_namespaces: String,
    indexed: String,
    alerts: String,
    identities: String,
    admin_tokens: String,
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
            hashes: format!("{prefix}:hashes"),
            counted: format!("{prefix}:counted:"),
            counted_namespaces: format!("{prefix}:counted_namespaces"),
            indexed: format!("{prefix}:indexed"),
            alerts: format!("{prefix}:alerts"),
            identities: format!("{prefix}:identities"),
            admin_tokens: format!("{prefix}:admin_tokens"),
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
            records.push(self.parse(&id, &json)?);
        }
        // The hash has no order: the file store's order is creation order.
        records.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok((records, version.unwrap_or(0)))
    }

    fn parse(&self, id: &str, json: &str) -> Result<KeyRecord, String> {
        serde_json::from_str(json)
            .map_err(|e| format!("{}: the record of key `{id}` is not valid: {e}", self.keys))
    }

    /// Every record, the side collections (in the order of [`Side::ALL`]: alert rules,
    /// identities, admin tokens) and the version they are at, read atomically.
    #[allow(clippy::type_complexity)]
    pub fn load_with_sides(
        &self,
    ) -> Result<(Vec<KeyRecord>, [Vec<serde_json::Value>; 3], u64), String> {
        let mut con = self.connect()?;
        let (version, entries, alerts, identities, admin_tokens): (
            Option<u64>,
            HashMap<String, String>,
            Option<String>,
            Option<String>,
            Option<String>,
        ) = redis::pipe()
            .atomic()
            .get(&self.version)
            .hgetall(&self.keys)
            .get(&self.alerts)
            .get(&self.identities)
            .get(&self.admin_tokens)
            .query(&mut con)
            .map_err(|e| self.unreachable(&e))?;
        let mut records = Vec::with_capacity(entries.len());
        for (id, json) in entries {
            records.push(self.parse(&id, &json)?);
        }
        records.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok((
            records,
            [
                self.parse_side(Side::Alerts, alerts.as_deref())?,
                self.parse_side(Side::Identities, identities.as_deref())?,
                self.parse_side(Side::AdminTokens, admin_tokens.as_deref())?,
            ],
            version.unwrap_or(0),
        ))
    }

    /// The Redis key a side collection is kept under, as one JSON array.
    fn side_key(&self, side: Side) -> &str {
        match side {
            Side::Alerts => &self.alerts,
            Side::Identities => &self.identities,
            Side::AdminTokens => &self.admin_tokens,
        }
    }

    fn parse_side(&self, side: Side, text: Option<&str>) -> Result<Vec<serde_json::Value>, String> {
        text.map_or(Ok(Vec::new()), |t| {
            serde_json::from_str(t)
                .map_err(|e| format!("{}: cannot be read: {e}", self.side_key(side)))
        })
    }

    /// One read-modify-write of a side collection under the writers' lock. Bumps and publishes
    /// the version, so every node reads the store again; returns the result and the
    /// versions before and after.
    pub fn change_side<T>(
        &self,
        side: Side,
        change: impl FnOnce(&mut Vec<serde_json::Value>) -> Result<T, KeyError>,
    ) -> Result<(T, u64, u64), KeyError> {
        let mut con = self.connect().map_err(KeyError::Unavailable)?;
        let token = lock_token();
        self.acquire(&mut con, &token)?;
        let unavailable = |e: redis::RedisError| KeyError::Unavailable(self.unreachable(&e));
        let result = (|| {
            let (before, text): (Option<u64>, Option<String>) = redis::pipe()
                .atomic()
                .get(&self.version)
                .get(self.side_key(side))
                .query(&mut con)
                .map_err(unavailable)?;
            let mut rules = self
                .parse_side(side, text.as_deref())
                .map_err(KeyError::Unavailable)?;
            let out = change(&mut rules)?;
            let after: u64 = redis::Script::new(SET_SIDE)
                .key(self.side_key(side))
                .key(&self.version)
                .key(&self.lock)
                .key(&self.indexed)
                .arg(&token)
                .arg(&self.changes)
                .arg(serde_json::Value::from(rules).to_string())
                .invoke(&mut con)
                .map_err(unavailable)?;
            Ok((out, before.unwrap_or(0), after))
        })();
        let released: Result<i64, _> = redis::Script::new(UNLOCK)
            .key(&self.lock)
            .arg(&token)
            .invoke(&mut con);
        if let Err(e) = released {
            tracing::warn!(error = %e, "could not release the store lock; it expires by itself");
        }
        result
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
            records.push(self.parse(id, &json)?);
        }
        Ok(Some(records))
    }

    /// One read-modify-write under the writers' lock: `change` reads the records it needs
    /// (through the indexes, so a change to one key reads a few entries whatever the key
    /// count), and only the records it changed are written, with the version bump, in one
    /// script.
    pub fn transact<T>(
        &self,
        change: impl FnOnce(&mut dyn Records) -> Result<T, KeyError>,
    ) -> Result<T, KeyError> {
        let mut con = self.connect().map_err(KeyError::Unavailable)?;
        let token = lock_token();
        self.acquire(&mut con, &token)?;
        let result = self
            .index(&mut con)
            .and_then(|()| self.apply(&mut con, &token, change));
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

    /// Brings the writers' indexes up to date with the records, if a write they did not see
    /// came in between (an older keygate's, or any before the indexes existed): one whole
    /// read, then the indexes made anew in one transaction. Runs under the lock.
    fn index(&self, con: &mut redis::Connection) -> Result<(), KeyError> {
        let unavailable = |e: redis::RedisError| KeyError::Unavailable(self.unreachable(&e));
        let (version, indexed): (Option<u64>, Option<u64>) = redis::cmd("MGET")
            .arg(&self.version)
            .arg(&self.indexed)
            .query(con)
            .map_err(unavailable)?;
        if version == indexed {
            return Ok(());
        }
        let (records, version) = self.read(con).map_err(KeyError::Unavailable)?;
        let stale: Vec<String> = redis::cmd("SMEMBERS")
            .arg(&self.counted_namespaces)
            .query(con)
            .map_err(unavailable)?;
        let mut pipe = redis::pipe();
        pipe.atomic()
            .del(&self.hashes)
            .del(&self.counted_namespaces);
        for ns in &stale {
            pipe.del(format!("{}{ns}", self.counted));
        }
        for chunk in records.chunks(1_000) {
            let owners: Vec<(&str, &str)> = chunk
                .iter()
                .map(|r| (r.hash.as_str(), r.id.as_str()))
                .collect();
            pipe.hset_multiple(&self.hashes, &owners);
        }
        for r in &records {
            if let Some(score) = counted_score(r) {
                pipe.zadd(format!("{}{}", self.counted, r.namespace), &r.id, score)
                    .sadd(&self.counted_namespaces, &r.namespace);
            }
        }
        pipe.set(&self.indexed, version);
        pipe.query::<()>(con).map_err(unavailable)?;
        tracing::info!(
            keys = records.len(),
            version,
            "the Redis store's write indexes were rebuilt"
        );
        Ok(())
    }

    fn apply<T>(
        &self,
        con: &mut redis::Connection,
        token: &str,
        change: impl FnOnce(&mut dyn Records) -> Result<T, KeyError>,
    ) -> Result<T, KeyError> {
        let mut records = RedisRecords {
            store: self,
            con,
            before: HashMap::new(),
            owners: HashMap::new(),
            whole: false,
            single_reads: 0,
            written: Vec::new(),
            written_at: HashMap::new(),
            written_owners: HashMap::new(),
        };
        let out = change(&mut records)?;
        let apply = redis::Script::new(APPLY);
        let mut script = apply.prepare_invoke();
        script
            .key(&self.keys)
            .key(&self.version)
            .key(&self.lock)
            .key(&self.hashes)
            .key(&self.indexed)
            .key(&self.counted_namespaces)
            .arg(token)
            .arg(&self.changes);
        let mut set = Vec::new();
        for r in &records.written {
            let before = records.before.get(&r.id).and_then(Option::as_ref);
            let now = json(r)?;
            if before.map(json).transpose()?.as_ref() == Some(&now) {
                continue;
            }
            set.push((r, before, now));
        }
        // Listed only when a follower can apply the ids as they are: a few records, each id
        // one word.
        let listed = set.len() <= MAX_LISTED
            && set
                .iter()
                .all(|(r, ..)| !r.id.is_empty() && !r.id.contains(' '));
        script
            .arg(if listed { "listed" } else { "version" })
            .arg(&self.counted);
        for (r, before, now) in &set {
            script
                .arg(&r.id)
                .arg(now)
                .arg(&r.hash)
                .arg(before.map_or("", |b| b.hash.as_str()))
                .arg(&r.namespace)
                .arg(before.map_or("", |b| b.namespace.as_str()))
                .arg(counted_score(r).unwrap_or_default());
        }
        if !set.is_empty() {
            let _version: u64 = script
                .invoke(records.con)
                .map_err(|e| KeyError::Unavailable(self.unreachable(&e)))?;
        }
        Ok(out)
    }
}

/// A key's score in its namespace's counted set: its expiry (Unix seconds, or `+inf`), if it
/// counts toward the tier when not expired, that is, unless it is revoked.
fn counted_score(record: &KeyRecord) -> Option<String> {
    if record.status == Status::Revoked {
        return None;
    }
    Some(
        record
            .expires_at_unix()
            .map_or_else(|| "+inf".to_string(), |t| t.to_string()),
    )
}

/// After this many single reads, a write reads the whole set once instead: a bulk write
/// (`keys load`, an import) touches every record, and one `HGETALL` beats a million `HGET`s.
const SINGLE_READS: usize = 64;

/// [`Records`] for one write to Redis: single records and hash owners are read through the
/// indexes as the lifecycle asks for them, and what it writes is kept here until the
/// transaction's script sets it.
struct RedisRecords<'s, 'c> {
    store: &'s RedisStore,
    con: &'c mut redis::Connection,
    /// Records as Redis holds them, by id, as far as they were read (`None`: no such key).
    before: HashMap<String, Option<KeyRecord>>,
    /// Hash owners as Redis holds them, as far as they were read.
    owners: HashMap<String, Option<String>>,
    /// Every record and owner has been read: what is not in the maps is not in Redis.
    whole: bool,
    single_reads: usize,
    /// What this transaction wrote, in the order it first wrote each id.
    written: Vec<KeyRecord>,
    written_at: HashMap<String, usize>,
    /// The hash of each record written, to its id.
    written_owners: HashMap<String, String>,
}

impl RedisRecords<'_, '_> {
    fn unavailable(&self, e: &redis::RedisError) -> KeyError {
        KeyError::Unavailable(self.store.unreachable(e))
    }

    /// Counts a single read; past [`SINGLE_READS`], reads everything at once.
    fn single_read(&mut self) -> Result<bool, KeyError> {
        if self.whole {
            return Ok(false);
        }
        self.single_reads = self.single_reads.saturating_add(1);
        if self.single_reads <= SINGLE_READS {
            return Ok(true);
        }
        let (records, _) = self.store.read(self.con).map_err(KeyError::Unavailable)?;
        for r in records {
            self.owners.insert(r.hash.clone(), Some(r.id.clone()));
            self.before.entry(r.id.clone()).or_insert(Some(r));
        }
        self.whole = true;
        Ok(false)
    }

    /// The record with this id as Redis holds it.
    fn before(&mut self, id: &str) -> Result<Option<KeyRecord>, KeyError> {
        if let Some(r) = self.before.get(id) {
            return Ok(r.clone());
        }
        if !self.single_read()? {
            return Ok(self.before.get(id).cloned().flatten());
        }
        let json: Option<String> = redis::cmd("HGET")
            .arg(&self.store.keys)
            .arg(id)
            .query(self.con)
            .map_err(|e| self.unavailable(&e))?;
        let record = json
            .map(|j| self.store.parse(id, &j))
            .transpose()
            .map_err(KeyError::Unavailable)?;
        self.before.insert(id.to_string(), record.clone());
        Ok(record)
    }

    /// The id whose hash this is, as Redis holds it.
    fn owner_before(&mut self, hash: &str) -> Result<Option<String>, KeyError> {
        if let Some(owner) = self.owners.get(hash) {
            return Ok(owner.clone());
        }
        if !self.single_read()? {
            return Ok(self.owners.get(hash).cloned().flatten());
        }
        let owner: Option<String> = redis::cmd("HGET")
            .arg(&self.store.hashes)
            .arg(hash)
            .query(self.con)
            .map_err(|e| self.unavailable(&e))?;
        self.owners.insert(hash.to_string(), owner.clone());
        Ok(owner)
    }
}

impl Records for RedisRecords<'_, '_> {
    fn get(&mut self, id: &str) -> Result<Option<KeyRecord>, KeyError> {
        match self.written_at.get(id).and_then(|&i| self.written.get(i)) {
            Some(r) => Ok(Some(r.clone())),
            None => self.before(id),
        }
    }

    fn hash_owner(&mut self, hash: &str) -> Result<Option<String>, KeyError> {
        if let Some(id) = self.written_owners.get(hash) {
            return Ok(Some(id.clone()));
        }
        // A key this transaction wrote holds the hash it was given, not the one Redis has.
        Ok(self
            .owner_before(hash)?
            .filter(|id| !self.written_at.contains_key(id)))
    }

    fn counted(&mut self, namespace: &str, now: i64) -> Result<usize, KeyError> {
        let counts = |r: &KeyRecord| r.namespace == namespace && r.counts_toward_limit(now);
        let in_redis = if self.whole {
            self.before.values().flatten().filter(|r| counts(r)).count()
        } else {
            let n: u64 = redis::cmd("ZCOUNT")
                .arg(format!("{}{namespace}", self.store.counted))
                .arg(format!("({now}"))
                .arg("+inf")
                .query(self.con)
                .map_err(|e| self.unavailable(&e))?;
            usize::try_from(n).unwrap_or(usize::MAX)
        };
        // Redis counts the records as they were; this transaction's writes replace them.
        let (mut gone, mut added) = (0usize, 0usize);
        for r in &self.written {
            if self
                .before
                .get(&r.id)
                .and_then(Option::as_ref)
                .is_some_and(counts)
            {
                gone = gone.saturating_add(1);
            }
            if counts(r) {
                added = added.saturating_add(1);
            }
        }
        Ok(in_redis.saturating_sub(gone).saturating_add(added))
    }

    fn put(&mut self, record: KeyRecord) -> Result<(), KeyError> {
        // The record as Redis holds it must be known, to count and to replace its entries.
        self.before(&record.id)?;
        if let Some(&i) = self.written_at.get(&record.id) {
            if let Some(old) = self.written.get_mut(i) {
                if self.written_owners.get(&old.hash) == Some(&old.id) {
                    self.written_owners.remove(&old.hash);
                }
                self.written_owners
                    .insert(record.hash.clone(), record.id.clone());
                *old = record;
            }
            return Ok(());
        }
        self.written_owners
            .insert(record.hash.clone(), record.id.clone());
        self.written_at
            .insert(record.id.clone(), self.written.len());
        self.written.push(record);
        Ok(())
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
