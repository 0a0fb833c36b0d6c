//! The snapshot's keys: compiled entries, found by the SHA-256 of the key (the request path)
//! or by id (the admin API).
//!
//! Both maps are split into [`SHARDS`] shards, each behind its own `Arc`. A snapshot made
//! for a change to a few keys clones the shard list (pointers) and copies only the shards
//! those keys live in, so the cost of a key change does not grow with the key count: at a
//! million keys a shard holds about 250 entries. Every other shard, and every entry in it,
//! is shared with the snapshot before.
//!
//! What many keys share is held once: each namespace and environment (with its header
//! value), each distinct scope set and CIDR set, interned through the index's [`Interner`].

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::{Arc, Mutex};

use http::HeaderValue;

use crate::keys::Status;
use crate::pipeline::rate_limit::KeyLimiter;
use crate::pipeline::shared_limit::SharedPolicy;
use crate::pipeline::usage::{KeyUsage, UsageCell, UsageReport};
use crate::policy::net::CidrSet;
use crate::policy::quota::Quota;
use crate::policy::scope::ScopeSet;

/// Shards per map. A power of two, so a byte of a digest picks one evenly.
pub const SHARDS: usize = 4096;

/// A name many keys share (a namespace, an environment), held once with its header value.
#[derive(Debug, PartialEq, Eq)]
pub struct Label {
    name: Box<str>,
    header: HeaderValue,
}

impl Label {
    /// A label for `name`; `None` if it cannot be sent as a header value (the record check
    /// allows only `a-z`, `0-9`, `_` and `-`, so it always can).
    pub fn new(name: &str) -> Option<Label> {
        Some(Label {
            header: HeaderValue::from_str(name).ok()?,
            name: name.into(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.name
    }

    /// The name as a header value, shared by every key with it.
    pub fn header(&self) -> &HeaderValue {
        &self.header
    }
}

impl std::ops::Deref for Label {
    type Target = str;
    fn deref(&self) -> &str {
        &self.name
    }
}

impl PartialEq<str> for Label {
    fn eq(&self, other: &str) -> bool {
        &*self.name == other
    }
}

impl PartialEq<String> for Label {
    fn eq(&self, other: &String) -> bool {
        *self.name == **other
    }
}

/// The shared values of a key index's entries. A whole build starts a new one; key changes
/// add to the one they share, so what a value costs is paid once per build, not per key.
#[derive(Debug, Default)]
pub struct Interner {
    labels: HashMap<Box<str>, Arc<Label>>,
    scopes: HashMap<Vec<String>, Arc<ScopeSet>>,
    cidrs: HashMap<Vec<String>, Arc<CidrSet>>,
}

impl Interner {
    /// The label for `name`, made once.
    pub fn label(&mut self, name: &str) -> Option<Arc<Label>> {
        if let Some(l) = self.labels.get(name) {
            return Some(Arc::clone(l));
        }
        let l = Arc::new(Label::new(name)?);
        self.labels.insert(name.into(), Arc::clone(&l));
        Some(l)
    }

    /// The scope set written as `text`, compiled by `make` the first time it is seen.
    pub fn scopes(&mut self, text: &[String], make: impl FnOnce() -> ScopeSet) -> Arc<ScopeSet> {
        if let Some(s) = self.scopes.get(text) {
            return Arc::clone(s);
        }
        let s = Arc::new(make());
        self.scopes.insert(text.to_vec(), Arc::clone(&s));
        s
    }

    /// The CIDR set written as `text`, compiled by `make` the first time it is seen.
    pub fn cidrs(&mut self, text: &[String], make: impl FnOnce() -> CidrSet) -> Arc<CidrSet> {
        if let Some(c) = self.cidrs.get(text) {
            return Arc::clone(c);
        }
        let c = Arc::new(make());
        self.cidrs.insert(text.to_vec(), Arc::clone(&c));
        c
    }
}

impl KeyEntry {
    /// The key's usage cell, made on its first use.
    pub fn usage(&self) -> &KeyUsage {
        self.usage.get(&self.id)
    }

    /// The key's usage as reported, without making a cell for a key never used.
    pub fn usage_report(&self, now: i64) -> UsageReport {
        self.usage
            .used(&self.id)
            .map(|u| u.report(now))
            .unwrap_or_default()
    }

    /// How much of the quota period `period` the key has used, without making a cell.
    pub fn quota_used(&self, period: i64) -> u64 {
        self.usage
            .used(&self.id)
            .map_or(0, |u| u.quota_used(period))
    }
}

/// One key, compiled for the request path.
#[derive(Debug)]
pub struct KeyEntry {
    pub id: String,
    pub namespace: Arc<Label>,
    pub environment: Arc<Label>,
    pub status: Status,
    /// Unix seconds.
    pub expires_at: Option<i64>,
    pub scopes: Arc<ScopeSet>,
    pub allowed_cidrs: Arc<CidrSet>,
    pub limiter: Option<Arc<KeyLimiter>>,
    /// The key's own quota, or its tier's.
    pub quota: Option<Quota>,
    /// `RateLimit-Policy` for the key's rate limit and quota, if it has either.
    pub limits_header: Option<HeaderValue>,
    /// With `rate_limit.backend: redis`: the key's whole limits, counted in Redis. Then
    /// `limiter` and `quota` above are this node's share, for `fail_mode: local`.
    pub shared: Option<SharedPolicy>,
    pub usage: UsageCell,
    pub id_header: HeaderValue,
    /// The key was imported (its secret was not made by keygate).
    pub imported: bool,
}

/// A SHA-256 digest as a map key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyHash(pub [u8; 32]);

impl KeyHash {
    /// The shard a digest lives in: the low 12 bits of its last two bytes. The map inside
    /// hashes the first eight, so the two never correlate.
    fn shard(&self) -> usize {
        let [.., a, b] = self.0;
        usize::from(u16::from_le_bytes([a, b])) % SHARDS
    }
}

impl Hash for KeyHash {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // The digest is already uniform: its first 8 bytes are as good a hash as any.
        let [b0, b1, b2, b3, b4, b5, b6, b7, ..] = self.0;
        state.write_u64(u64::from_le_bytes([b0, b1, b2, b3, b4, b5, b6, b7]));
    }
}

/// Passes a [`KeyHash`]'s own bits through instead of hashing them again.
#[derive(Debug, Default)]
pub struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type HashShard = HashMap<KeyHash, Arc<KeyEntry>, BuildHasherDefault<DigestHasher>>;
type IdShard = HashMap<Box<str>, KeyHash>;

/// The shard an id lives in (FNV-1a of its bytes; ids are not chosen by clients).
fn id_shard(id: &str) -> usize {
    let h = id.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    usize::try_from(h).unwrap_or(0) % SHARDS
}

/// Why an entry could not join the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clash {
    /// Another key has the same id.
    Id,
    /// Another key has the same hash.
    Hash,
}

/// Every key of a snapshot. Cloning shares every shard.
#[derive(Debug, Clone)]
pub struct KeyIndex {
    by_hash: Vec<Arc<HashShard>>,
    by_id: Vec<Arc<IdShard>>,
    len: usize,
    imported: usize,
    interner: Arc<Mutex<Interner>>,
}

impl Default for KeyIndex {
    fn default() -> Self {
        KeyIndex {
            by_hash: (0..SHARDS).map(|_| Arc::default()).collect(),
            by_id: (0..SHARDS).map(|_| Arc::default()).collect(),
            len: 0,
            imported: 0,
            interner: Arc::default(),
        }
    }
}

impl KeyIndex {
    /// Runs `f` with the index's interner, for compiling entries that join it.
    pub fn intern<T>(&self, f: impl FnOnce(&mut Interner) -> T) -> T {
        f(&mut self.interner.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The key with this SHA-256: the request path's one lookup.
    pub fn by_hash(&self, hash: &[u8; 32]) -> Option<&KeyEntry> {
        let hash = KeyHash(*hash);
        self.by_hash.get(hash.shard())?.get(&hash).map(|e| &**e)
    }

    pub fn by_id(&self, id: &str) -> Option<&KeyEntry> {
        let hash = self.by_id.get(id_shard(id))?.get(id)?;
        self.by_hash(&hash.0)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether any key was imported.
    pub fn any_imported(&self) -> bool {
        self.imported > 0
    }

    pub fn iter(&self) -> impl Iterator<Item = &KeyEntry> + Clone {
        self.by_hash
            .iter()
            .flat_map(|shard| shard.values())
            .map(|e| &**e)
    }

    /// Adds a key that is not in the index yet (a build from the whole store).
    pub fn insert(&mut self, hash: KeyHash, entry: KeyEntry) -> Result<(), Clash> {
        if self.by_id(&entry.id).is_some() {
            return Err(Clash::Id);
        }
        if self.by_hash(&hash.0).is_some() {
            return Err(Clash::Hash);
        }
        self.put(hash, entry);
        Ok(())
    }

    /// Adds a key, or replaces the one with the same id (a regenerated key gets a new hash).
    /// Only the shards the two touch are copied, and only if another snapshot shares them.
    pub fn upsert(&mut self, hash: KeyHash, entry: KeyEntry) -> Result<(), Clash> {
        let old = self
            .by_id
            .get(id_shard(&entry.id))
            .and_then(|s| s.get(entry.id.as_str()))
            .copied();
        if let Some(holder) = self.by_hash(&hash.0) {
            if holder.id != entry.id {
                return Err(Clash::Hash);
            }
        }
        if let Some(old) = old {
            self.remove(old);
        }
        self.put(hash, entry);
        Ok(())
    }

    fn put(&mut self, hash: KeyHash, entry: KeyEntry) {
        if entry.imported {
            self.imported = self.imported.saturating_add(1);
        }
        if let Some(shard) = self.by_id.get_mut(id_shard(&entry.id)) {
            Arc::make_mut(shard).insert(entry.id.as_str().into(), hash);
        }
        if let Some(shard) = self.by_hash.get_mut(hash.shard()) {
            if Arc::make_mut(shard).insert(hash, Arc::new(entry)).is_none() {
                self.len = self.len.saturating_add(1);
            }
        }
    }

    fn remove(&mut self, hash: KeyHash) {
        let Some(shard) = self.by_hash.get_mut(hash.shard()) else {
            return;
        };
        let Some(entry) = Arc::make_mut(shard).remove(&hash) else {
            return;
        };
        self.len = self.len.saturating_sub(1);
        if entry.imported {
            self.imported = self.imported.saturating_sub(1);
        }
        if let Some(shard) = self.by_id.get_mut(id_shard(&entry.id)) {
            Arc::make_mut(shard).remove(entry.id.as_str());
        }
    }

    /// How many shards of `self` are not shared with `other`: what a change copied.
    pub fn unshared_shards(&self, other: &KeyIndex) -> usize {
        let count = |a: &[Arc<HashShard>], b: &[Arc<HashShard>]| {
            a.iter().zip(b).filter(|(x, y)| !Arc::ptr_eq(x, y)).count()
        };
        let ids = self
            .by_id
            .iter()
            .zip(&other.by_id)
            .filter(|(x, y)| !Arc::ptr_eq(x, y))
            .count();
        count(&self.by_hash, &other.by_hash).saturating_add(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, imported: bool) -> KeyEntry {
        KeyEntry {
            id: id.into(),
            namespace: Arc::new(Label::new("acme").unwrap()),
            environment: Arc::new(Label::new("production").unwrap()),
            status: Status::Active,
            expires_at: None,
            scopes: Arc::new(ScopeSet::new(Vec::new())),
            allowed_cidrs: Arc::default(),
            limiter: None,
            quota: None,
            limits_header: None,
            shared: None,
            usage: crate::pipeline::usage::UsageBook::in_memory().cell_for(id),
            id_header: HeaderValue::from_static("x"),
            imported,
        }
    }

    fn digest(n: u32) -> KeyHash {
        KeyHash(crate::keys::format::hash(&format!("key {n}")))
    }

    #[test]
    fn a_change_copies_only_the_shards_it_touches() {
        let mut index = KeyIndex::default();
        for n in 0..10_000 {
            index
                .insert(digest(n), entry(&format!("id{n}"), false))
                .unwrap();
        }
        let before = index.clone();
        assert_eq!(index.unshared_shards(&before), 0);

        // A new key: one hash shard and one id shard.
        index.upsert(digest(10_000), entry("new", false)).unwrap();
        assert_eq!(index.unshared_shards(&before), 2);
        assert_eq!((index.len(), before.len()), (10_001, 10_000));
        assert!(index.by_id("new").is_some() && before.by_id("new").is_none());

        // A regenerated key: its old hash is gone, its new one found, under the same id.
        let mut next = index.clone();
        next.upsert(digest(20_000), entry("id7", false)).unwrap();
        assert!(next.by_hash(&digest(7).0).is_none());
        assert_eq!(next.by_hash(&digest(20_000).0).unwrap().id, "id7");
        assert_eq!(next.by_id("id7").unwrap().id, "id7");
        assert_eq!(next.len(), 10_001);
        assert!(next.unshared_shards(&index) <= 3);
        // The snapshot before still answers for the old hash.
        assert_eq!(index.by_hash(&digest(7).0).unwrap().id, "id7");
    }

    #[test]
    fn clashes_are_refused_and_change_nothing() {
        let mut index = KeyIndex::default();
        index.insert(digest(1), entry("a", false)).unwrap();
        assert_eq!(index.insert(digest(2), entry("a", false)), Err(Clash::Id));
        assert_eq!(index.insert(digest(1), entry("b", false)), Err(Clash::Hash));
        assert_eq!(index.upsert(digest(1), entry("b", false)), Err(Clash::Hash));
        assert_eq!(index.len(), 1);
        assert!(index.by_id("b").is_none());
    }

    #[test]
    fn imported_keys_are_counted_through_changes() {
        let mut index = KeyIndex::default();
        index.insert(digest(1), entry("a", true)).unwrap();
        assert!(index.any_imported());
        // Regenerated: keygate made the new secret.
        index.upsert(digest(2), entry("a", false)).unwrap();
        assert!(!index.any_imported());
        assert_eq!(index.iter().count(), 1);
    }
}
