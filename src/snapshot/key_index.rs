//! The snapshot's keys: compiled entries, found by the SHA-256 of the key (the request path)
//! or by id (the admin API).
//!
//! Both maps are split into [`SHARDS`] shards, each behind its own `Arc`. A snapshot made
//! for a change to a few keys clones the shard list (pointers) and copies only the shards
//! those keys live in, so the cost of a key change does not grow with the key count: at a
//! million keys a shard holds about 250 entries. Every other shard, and every entry in it,
//! is shared with the snapshot before.
//!
//! An entry is one allocation, and both maps hold only a pointer to it: each finds its key
//! (the hash, the id) inside the entry. What many keys share is held once: each namespace and
//! environment (with its header value), each distinct scope set, CIDR set and set of limits,
//! interned through the index's [`Interner`]. What only a used key needs (its usage cell, its
//! id as a header) is made on its first use.

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hash, Hasher};

use crate::state::IdHasher;
use std::sync::{Arc, Mutex, OnceLock};

use http::HeaderValue;

use crate::keys::Status;
use crate::policy::net::CidrSet;
use crate::policy::quota::Quota;
use crate::policy::rate::RatePolicy;
use crate::policy::rate::SharedPolicy;
use crate::policy::scope::ScopeSet;
use crate::state::limiters::{KeyLimiter, Limiters, Policies};
use crate::state::usage::{Cells, KeyUsage, UsageReport};

use super::hash_shard::HashShard;

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

/// What a key's rate limit and quota compile to: shared by every key with the same ones (a
/// tier's quota, a common rate).
#[derive(Debug, PartialEq)]
pub struct Limits {
    /// The key's own rate limit (this node's share, with shared limits); its limiter is
    /// made on the key's first request, from `limiters`.
    pub rate: Option<RatePolicy>,
    /// The key's named limits, in order (this node's share, with shared limits).
    pub named: Box<[(Arc<str>, RatePolicy)]>,
    pub limiters: Limiters,
    /// The key's own quota, or its tier's (this node's share, with shared limits).
    pub quota: Option<Quota>,
    /// `RateLimit-Policy` for the key's rate limit and quota.
    pub header: Option<HeaderValue>,
    /// With `rate_limit.backend: redis`: the key's whole limits, counted in Redis. Then
    /// `rate` and `quota` are this node's share, for `fail_mode: local`.
    pub shared: Option<SharedPolicy>,
}

/// A key's limits as written, before any node share: its rate, named limits and quota.
type LimitsKey = (Option<RatePolicy>, Vec<(String, RatePolicy)>, Option<Quota>);

/// The shared values of a key index's entries. A whole build starts a new one; key changes
/// add to the one they share, so what a value costs is paid once per build, not per key.
#[derive(Debug, Default)]
pub struct Interner {
    labels: HashMap<Box<str>, Arc<Label>>,
    scopes: HashMap<Vec<String>, Arc<ScopeSet>>,
    cidrs: HashMap<Vec<String>, Arc<CidrSet>>,
    limits: HashMap<LimitsKey, Arc<Limits>>,
    identities: std::collections::HashSet<IdentityById>,
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

    /// The identity named `id`, made once.
    pub fn identity(&mut self, id: &str) -> Arc<IdentityName> {
        if let Some(kept) = self.identities.get(id) {
            return Arc::clone(&kept.0);
        }
        let made = Arc::new(IdentityName {
            id: id.into(),
            header: crate::headers::meta_value(&serde_json::Value::String(id.to_string())),
        });
        self.identities.insert(IdentityById(Arc::clone(&made)));
        made
    }

    /// The limits a key's rate, named limits and quota (as written, before any node share)
    /// compile to, made by `make` the first time; `None` for a key with none.
    pub fn limits(
        &mut self,
        written: LimitsKey,
        make: impl FnOnce() -> Limits,
    ) -> Option<Arc<Limits>> {
        if written.0.is_none() && written.1.is_empty() && written.2.is_none() {
            return None;
        }
        let l = self
            .limits
            .entry(written)
            .or_insert_with(|| Arc::new(make()));
        Some(Arc::clone(l))
    }
}

/// A key id: 1 to 64 hex digits, 8 to 10 for nearly every key keygate makes. Up to
/// [`KeyId::INLINE`] bytes are held in place, so a million ids cost no allocation.
#[derive(Clone, PartialEq, Eq)]
pub enum KeyId {
    Inline { len: u8, bytes: [u8; KeyId::INLINE] },
    Heap(Box<str>),
}

impl KeyId {
    pub const INLINE: usize = 22;

    pub fn new(id: &str) -> KeyId {
        let mut bytes = [0; KeyId::INLINE];
        match (bytes.get_mut(..id.len()), u8::try_from(id.len())) {
            (Some(place), Ok(len)) => {
                place.copy_from_slice(id.as_bytes());
                KeyId::Inline { len, bytes }
            }
            _ => KeyId::Heap(id.into()),
        }
    }

    /// The id's bytes, without the UTF-8 check of [`KeyId::as_str`]: the id map's key.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            KeyId::Inline { len, bytes } => bytes.get(..usize::from(*len)).unwrap_or_default(),
            KeyId::Heap(id) => id.as_bytes(),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            // Made from a `str` cut at its end, so always whole UTF-8.
            KeyId::Inline { len, bytes } => bytes
                .get(..usize::from(*len))
                .and_then(|b| std::str::from_utf8(b).ok())
                .unwrap_or_default(),
            KeyId::Heap(id) => id,
        }
    }
}

impl std::ops::Deref for KeyId {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Debug for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<str> for KeyId {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for KeyId {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<String> for KeyId {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other
    }
}

/// One key, compiled for the request path.
#[derive(Debug)]
pub struct KeyEntry {
    pub hash: KeyHash,
    pub id: KeyId,
    pub namespace: Arc<Label>,
    pub environment: Arc<Label>,
    pub status: Status,
    /// The key was imported (its secret was not made by keygate).
    pub imported: bool,
    /// Unix seconds; [`NEVER`] for a key that does not expire (one word, not an `Option`'s
    /// two, to keep the entry small).
    pub expires: i64,
    pub scopes: Arc<ScopeSet>,
    pub allowed_cidrs: Arc<CidrSet>,
    /// The key's rate, quota, `RateLimit-Policy` and shared limits, if it has a rate or a quota.
    pub limits: Option<Arc<Limits>>,
    /// The usage book's cells, where this key's is found or made on its first use.
    pub cells: Cells,
    /// The key's usage cell, held here from its first use on.
    pub usage: OnceLock<Arc<KeyUsage>>,
    /// The key's rate limiter, made on its first rate-limited request.
    pub limiter: OnceLock<Arc<KeyLimiter>>,
    /// What few keys carry (metadata, credits), out of line: a key with none costs a word.
    pub extra: Option<Box<Extra>>,
}

/// What few keys carry. What every request of such a key reads (the identity, the
/// credits, the first of the credits' cells) comes first and fills one cache line; the
/// metadata, which only routes that forward it read, comes after.
#[derive(Debug, Default)]
#[repr(C, align(64))]
pub struct Extra {
    /// The identity the key belongs to, shared by every key of the index that names it.
    pub identity: Option<Arc<IdentityName>>,
    pub credits: Option<crate::policy::credits::Credits>,
    /// The credits' cell in the book, kept from the first spending.
    pub credit_cell: crate::state::credits::CellSlot,
    pub meta: Option<KeyMeta>,
}

/// An identity as its keys name it: its id, and as `X-Keygate-Identity` sends it. Interned,
/// so that the keys of one identity share it, and a request reads bytes the identity's other
/// keys keep in the cache.
#[derive(Debug)]
pub struct IdentityName {
    pub id: Box<str>,
    pub header: HeaderValue,
}

/// [`IdentityName`] in the interner, found by its id.
#[derive(Debug)]
struct IdentityById(Arc<IdentityName>);

impl std::borrow::Borrow<str> for IdentityById {
    fn borrow(&self) -> &str {
        &self.0.id
    }
}

impl PartialEq for IdentityById {
    fn eq(&self, other: &IdentityById) -> bool {
        self.0.id == other.0.id
    }
}

impl Eq for IdentityById {}

impl std::hash::Hash for IdentityById {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.id.hash(state);
    }
}

/// [`KeyEntry::expires`] of a key that never expires.
pub const NEVER: i64 = i64::MAX;

/// A key's metadata as the request path and the verify API use it.
#[derive(Debug)]
pub struct KeyMeta {
    /// The whole object, as compact JSON.
    pub json: Box<str>,
    /// The members some route forwards, each as its header value.
    pub forwarded: Box<[(Box<str>, HeaderValue)]>,
}

impl KeyMeta {
    /// The header value of member `field`, if a route forwards it and the key has it.
    pub fn header(&self, field: &str) -> Option<&HeaderValue> {
        self.forwarded
            .iter()
            .find(|(f, _)| &**f == field)
            .map(|(_, v)| v)
    }
}

impl KeyEntry {
    /// The key's metadata, if it has any.
    pub fn meta(&self) -> Option<&KeyMeta> {
        self.extra.as_ref()?.meta.as_ref()
    }

    /// The id of the identity the key belongs to, if it names one.
    pub fn identity_id(&self) -> Option<&str> {
        self.extra.as_ref()?.identity.as_ref().map(|i| &*i.id)
    }

    /// `X-Keygate-Identity` for the key, if it names an identity.
    pub fn identity_header(&self) -> Option<&HeaderValue> {
        self.extra.as_ref()?.identity.as_ref().map(|i| &i.header)
    }

    /// The key's credits, if it is a limited-use key.
    pub fn credits(&self) -> Option<&crate::policy::credits::Credits> {
        self.extra.as_ref()?.credits.as_ref()
    }

    /// Where the key's credits cell is kept between requests, if it has credits.
    pub fn credit_cell(&self) -> Option<&crate::state::credits::CellSlot> {
        self.extra.as_ref().map(|e| &e.credit_cell)
    }

    /// When the key expires (Unix seconds), if it does.
    pub fn expires_at(&self) -> Option<i64> {
        (self.expires != NEVER).then_some(self.expires)
    }

    /// The key's usage cell, made on its first use.
    pub fn usage(&self) -> &KeyUsage {
        self.usage.get_or_init(|| self.cells.get_or_make(&self.id))
    }

    /// The key's id as a header value, for `X-Keygate-Key-Id`.
    pub fn id_header(&self) -> &HeaderValue {
        self.usage().id_header()
    }

    /// The key's usage cell if it was ever used: for reports, which must not make cells.
    fn used(&self) -> Option<Arc<KeyUsage>> {
        match self.usage.get() {
            Some(u) => Some(Arc::clone(u)),
            None => self.cells.used(&self.id),
        }
    }

    /// The key's usage as reported, without making a cell for a key never used.
    pub fn usage_report(&self, now: i64) -> UsageReport {
        self.used().map(|u| u.report(now)).unwrap_or_default()
    }

    /// How much of the quota period `period` the key has used, without making a cell.
    pub fn quota_used(&self, period: i64) -> u64 {
        self.used().map_or(0, |u| u.quota_used(period))
    }

    /// The key's own quota, or its tier's.
    pub fn quota(&self) -> Option<Quota> {
        self.limits.as_ref().and_then(|l| l.quota)
    }

    /// The key's rate limit and named limits (this node's share, with shared limits), if
    /// it has any.
    pub fn rate_limits(&self) -> Option<Policies<'_>> {
        let limits = self.limits.as_ref()?;
        (limits.rate.is_some() || !limits.named.is_empty()).then_some((limits.rate, &limits.named))
    }

    /// The key's rate limiters, if it has a rate limit or named limits: the ones the
    /// registry holds for its id and policies, or new ones, made on the key's first
    /// rate-limited request.
    pub fn limiter(&self) -> Option<&KeyLimiter> {
        let policies = self.rate_limits()?;
        let limits = self.limits.as_ref()?;
        Some(
            self.limiter
                .get_or_init(|| limits.limiters.limiter_for(&self.id, policies)),
        )
    }

    /// `RateLimit-Policy` for the key's rate limit and quota, if it has either.
    pub fn limits_header(&self) -> Option<&HeaderValue> {
        self.limits.as_ref().and_then(|l| l.header.as_ref())
    }

    /// The key's whole limits, with `rate_limit.backend: redis`.
    pub fn shared(&self) -> Option<&SharedPolicy> {
        self.limits.as_ref().and_then(|l| l.shared.as_ref())
    }
}

/// A SHA-256 digest as a map key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyHash(pub [u8; 32]);

impl KeyHash {
    /// The shard a digest lives in: the low 12 bits of its last two bytes. The shard's table
    /// indexes by the first eight, so the two never correlate.
    fn shard(&self) -> usize {
        let [.., a, b] = self.0;
        usize::from(u16::from_le_bytes([a, b])) % SHARDS
    }
}

/// An entry in the id map: equal to, and hashed as, its key's id.
#[derive(Debug, Clone)]
struct ById(Arc<KeyEntry>);

impl Borrow<[u8]> for ById {
    fn borrow(&self) -> &[u8] {
        self.0.id.as_bytes()
    }
}

impl PartialEq for ById {
    fn eq(&self, other: &Self) -> bool {
        self.0.id.as_bytes() == other.0.id.as_bytes()
    }
}

impl Eq for ById {}

impl Hash for ById {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // As `[u8]` hashes, so that a lookup by bytes finds it.
        self.0.id.as_bytes().hash(state);
    }
}

type IdShard = HashSet<ById, BuildHasherDefault<IdHasher>>;

/// The shard an id lives in: its 32-bit FNV-1a, apart from the 64-bit one the map inside
/// uses, so the two never correlate.
fn id_shard(id: &[u8]) -> usize {
    let h = id.iter().fold(0x811c_9dc5_u32, |h, &b| {
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

/// Shards in a group.
const GROUP: usize = 64;

/// [`SHARDS`] shards, in groups of [`GROUP`] that each sit behind their own `Arc`. A clone
/// copies the list of groups, and a change to one shard copies its group (pointers) and
/// then the shard: about a hundred pointers either way, where one flat list of shards would
/// make every change touch thousands (each a reference count, in a line of its own).
#[derive(Debug, Clone)]
struct Sharded<T> {
    groups: Vec<Arc<[T]>>,
}

impl<T: Default> Default for Sharded<T> {
    fn default() -> Self {
        Sharded {
            groups: (0..SHARDS / GROUP)
                .map(|_| (0..GROUP).map(|_| T::default()).collect())
                .collect(),
        }
    }
}

impl<T: Clone> Sharded<T> {
    fn get(&self, shard: usize) -> Option<&T> {
        self.groups.get(shard / GROUP)?.get(shard % GROUP)
    }

    /// The shard, its group copied first if another snapshot shares it.
    fn get_mut(&mut self, shard: usize) -> Option<&mut T> {
        Arc::make_mut(self.groups.get_mut(shard / GROUP)?).get_mut(shard % GROUP)
    }

    fn iter(&self) -> impl Iterator<Item = &T> + Clone {
        self.groups.iter().flat_map(|g| g.iter())
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.groups
            .iter_mut()
            .flat_map(|g| Arc::make_mut(g).iter_mut())
    }

    /// How many shards differ from `other`'s, by `same`.
    fn unshared(&self, other: &Sharded<T>, same: impl Fn(&T, &T) -> bool) -> usize {
        self.groups
            .iter()
            .zip(&other.groups)
            .filter(|(a, b)| !Arc::ptr_eq(a, b))
            .map(|(a, b)| a.iter().zip(b.iter()).filter(|(x, y)| !same(x, y)).count())
            .sum()
    }
}

/// Every key of a snapshot. Cloning shares every shard.
#[derive(Debug, Clone, Default)]
pub struct KeyIndex {
    by_hash: Sharded<HashShard>,
    by_id: Sharded<Arc<IdShard>>,
    len: usize,
    imported: usize,
    interner: Arc<Mutex<Interner>>,
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
        let id = id.as_bytes();
        self.by_id.get(id_shard(id))?.get(id).map(|e| &*e.0)
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
            .flat_map(|shard| shard.iter())
            .map(|e| &**e)
    }

    /// Makes room for about `count` keys in all, spread over the shards, so that a whole
    /// build does not grow each shard's table by doubling.
    pub fn reserve(&mut self, count: usize) {
        if count < SHARDS * 8 {
            // A small store: the shards grow from nothing at little cost.
            return;
        }
        let each = count.div_ceil(SHARDS).saturating_add(count / SHARDS / 8);
        for shard in self.by_hash.iter_mut() {
            shard.reserve(each);
        }
        for shard in self.by_id.iter_mut() {
            Arc::make_mut(shard).reserve(each);
        }
    }

    /// Adds a key that is not in the index yet (a build from the whole store): one probe of
    /// each map, undone if the second finds a clash.
    pub fn insert(&mut self, entry: KeyEntry) -> Result<(), Clash> {
        let entry = Arc::new(entry);
        let (Some(ids), Some(hashes)) = (
            self.by_id.get_mut(id_shard(entry.id.as_bytes())),
            self.by_hash.get_mut(entry.hash.shard()),
        ) else {
            return Err(Clash::Id);
        };
        if !Arc::make_mut(ids).insert(ById(Arc::clone(&entry))) {
            return Err(Clash::Id);
        }
        if hashes.get(&entry.hash).is_some() {
            Arc::make_mut(ids).remove(entry.id.as_bytes());
            return Err(Clash::Hash);
        }
        hashes.replace(Arc::clone(&entry));
        self.len = self.len.saturating_add(1);
        if entry.imported {
            self.imported = self.imported.saturating_add(1);
        }
        Ok(())
    }

    /// Adds a key, or replaces the one with the same id (a regenerated key gets a new hash).
    /// Only the shards the two touch are copied, and only if another snapshot shares them.
    pub fn upsert(&mut self, entry: KeyEntry) -> Result<(), Clash> {
        if let Some(holder) = self.by_hash(&entry.hash.0) {
            if holder.id != entry.id {
                return Err(Clash::Hash);
            }
        }
        let old = self.by_id(&entry.id).map(|e| e.hash);
        if let Some(old) = old {
            self.remove(old);
        }
        self.put(Arc::new(entry));
        Ok(())
    }

    fn put(&mut self, entry: Arc<KeyEntry>) {
        if entry.imported {
            self.imported = self.imported.saturating_add(1);
        }
        if let Some(shard) = self.by_id.get_mut(id_shard(entry.id.as_bytes())) {
            Arc::make_mut(shard).replace(ById(Arc::clone(&entry)));
        }
        if let Some(shard) = self.by_hash.get_mut(entry.hash.shard()) {
            if shard.replace(entry).is_none() {
                self.len = self.len.saturating_add(1);
            }
        }
    }

    fn remove(&mut self, hash: KeyHash) {
        let Some(shard) = self.by_hash.get_mut(hash.shard()) else {
            return;
        };
        let Some(entry) = shard.take(&hash) else {
            return;
        };
        self.len = self.len.saturating_sub(1);
        if entry.imported {
            self.imported = self.imported.saturating_sub(1);
        }
        if let Some(shard) = self.by_id.get_mut(id_shard(entry.id.as_bytes())) {
            Arc::make_mut(shard).remove(entry.id.as_bytes());
        }
    }

    /// How many shards of `self` are not shared with `other`: what a change copied.
    pub fn unshared_shards(&self, other: &KeyIndex) -> usize {
        let hashes = self
            .by_hash
            .unshared(&other.by_hash, HashShard::shares_with);
        let ids = self.by_id.unshared(&other.by_id, Arc::ptr_eq);
        hashes.saturating_add(ids)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn what_a_request_reads_of_a_keys_extras_is_one_cache_line() {
        assert_eq!(std::mem::align_of::<Extra>(), 64);
        let read = std::mem::offset_of!(Extra, credit_cell) + crate::state::credits::CellSlot::READ;
        assert!(read <= 64, "{read} bytes");
    }

    pub(crate) fn entry(n: u32, id: &str, imported: bool) -> KeyEntry {
        KeyEntry {
            hash: digest(n),
            id: KeyId::new(id),
            namespace: Arc::new(Label::new("acme").unwrap()),
            environment: Arc::new(Label::new("production").unwrap()),
            status: Status::Active,
            imported,
            expires: NEVER,
            scopes: Arc::new(ScopeSet::new(Vec::new())),
            allowed_cidrs: Arc::default(),
            limits: None,
            cells: crate::state::usage::UsageBook::in_memory().cells(),
            usage: OnceLock::new(),
            limiter: OnceLock::new(),
            extra: None,
        }
    }

    fn digest(n: u32) -> KeyHash {
        KeyHash(crate::keys::format::hash(&format!("key {n}")))
    }

    #[test]
    fn a_change_copies_only_the_shards_it_touches() {
        let mut index = KeyIndex::default();
        for n in 0..10_000 {
            index.insert(entry(n, &format!("id{n}"), false)).unwrap();
        }
        let before = index.clone();
        assert_eq!(index.unshared_shards(&before), 0);

        // A new key: one hash shard and one id shard.
        index.upsert(entry(10_000, "new", false)).unwrap();
        assert_eq!(index.unshared_shards(&before), 2);
        assert_eq!((index.len(), before.len()), (10_001, 10_000));
        assert!(index.by_id("new").is_some() && before.by_id("new").is_none());

        // A regenerated key: its old hash is gone, its new one found, under the same id.
        let mut next = index.clone();
        next.upsert(entry(20_000, "id7", false)).unwrap();
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
        index.insert(entry(1, "a", false)).unwrap();
        assert_eq!(index.insert(entry(2, "a", false)), Err(Clash::Id));
        assert_eq!(index.insert(entry(1, "b", false)), Err(Clash::Hash));
        assert_eq!(index.upsert(entry(1, "b", false)), Err(Clash::Hash));
        assert_eq!(index.len(), 1);
        assert!(index.by_id("b").is_none());
    }

    #[test]
    fn imported_keys_are_counted_through_changes() {
        let mut index = KeyIndex::default();
        index.insert(entry(1, "a", true)).unwrap();
        assert!(index.any_imported());
        // Regenerated: keygate made the new secret.
        index.upsert(entry(2, "a", false)).unwrap();
        assert!(!index.any_imported());
        assert_eq!(index.iter().count(), 1);
    }

    #[test]
    fn ids_are_held_in_place_up_to_22_bytes() {
        for id in ["a", "0123abcd", "0123456789abcdef012345"] {
            let k = KeyId::new(id);
            assert!(matches!(k, KeyId::Inline { .. }), "{id}");
            assert_eq!(k.as_str(), id);
        }
        let long = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        let k = KeyId::new(long);
        assert!(matches!(k, KeyId::Heap(_)));
        assert_eq!((k.as_str(), KeyId::new("")), (long, KeyId::new("")));
        assert_eq!(std::mem::size_of::<KeyId>(), 24);
    }

    #[test]
    fn an_entry_is_small_and_its_usage_is_made_on_first_use() {
        // One allocation of this size per key, plus a pointer in each map: the budget of
        // 300 bytes a key at a million keys depends on it.
        assert!(std::mem::size_of::<KeyEntry>() <= 160);
        let e = entry(1, "a", false);
        assert!(e.usage.get().is_none());
        assert_eq!(e.usage_report(0).accepted, 0);
        assert!(e.usage.get().is_none(), "a report makes no cell");
        e.usage().accepted();
        assert_eq!(e.id_header(), "a");
        assert_eq!(e.usage_report(0).accepted, 1);
    }

    #[test]
    fn keys_with_the_same_limits_share_them() {
        let index = KeyIndex::default();
        let rate = Some(RatePolicy {
            rate: crate::config::units::Rate {
                count: 10,
                per: std::time::Duration::from_secs(1),
            },
            burst: 10,
        });
        let limiters = Limiters::new();
        let make = || Limits {
            rate,
            named: Box::default(),
            limiters: limiters.clone(),
            quota: None,
            header: None,
            shared: None,
        };
        let (a, b, none) = index.intern(|i| {
            (
                i.limits((rate, Vec::new(), None), make),
                i.limits((rate, Vec::new(), None), make),
                i.limits((None, Vec::new(), None), make),
            )
        });
        assert!(Arc::ptr_eq(&a.unwrap(), &b.unwrap()));
        assert!(none.is_none());
    }
}
