//! The key store, whatever its kind: the YAML file (below), Redis ([`super::redis_store`]) or
//! SQLite ([`super::sqlite_store`]).
//!
//! The file store is a YAML file with one key per line (each a JSON-style flow mapping, which
//! is valid YAML), so diffs and greps read well and an editor can change it by hand. Writes
//! are atomic (temp file in the same folder, fsync, rename, fsync the folder), so a reader
//! sees the old store or the new one, never half of one. Writers hold an advisory lock on
//! `<store>.lock` for the whole read-modify-write, so two `keys create` at once both land.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::records::{DocumentRecords, Records};
use super::redis_store::RedisStore;
use super::sqlite_store::SqliteStore;
use super::{KeyError, KeyRecord};
use crate::config::{parse_yaml, Config, ConfigError, StoreKind};

/// The store's document.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StoreFile {
    /// Format version; this build writes and reads 1.
    #[serde(default = "current_version")]
    pub version: u32,
    #[serde(default)]
    pub keys: Vec<KeyRecord>,
    /// Alert rules made through the admin API (`/v1/alerts`), each as its JSON object,
    /// beside those in the config. The alerts module reads them; the store only keeps them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alerts: Vec<serde_json::Value>,
    /// Identities (`/v1/identities`): the limits, credits and metadata a customer's keys
    /// share, each as its JSON object. The identities module reads them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<serde_json::Value>,
    /// Admin tokens made by `keygate tokens create` and `POST /v1/admin-tokens`, beside those
    /// in the config: each its hash, role and times, never the token. The admin_token module
    /// reads them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub admin_tokens: Vec<serde_json::Value>,
}

/// A collection of JSON documents the store keeps beside the keys, read with them and
/// written whole: the alert rules made through the API, the identities, and the admin
/// tokens made through the CLI or the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Alerts,
    Identities,
    AdminTokens,
}

impl Side {
    /// Every side collection, in the order the file store writes them.
    pub const ALL: [Side; 3] = [Side::Alerts, Side::Identities, Side::AdminTokens];

    /// The collection's name: its section of the file store, its Redis key's last part.
    pub fn name(self) -> &'static str {
        match self {
            Side::Alerts => "alerts",
            Side::Identities => "identities",
            Side::AdminTokens => "admin_tokens",
        }
    }
}

impl StoreFile {
    /// The documents of `side`.
    pub fn side_mut(&mut self, side: Side) -> &mut Vec<serde_json::Value> {
        match side {
            Side::Alerts => &mut self.alerts,
            Side::Identities => &mut self.identities,
            Side::AdminTokens => &mut self.admin_tokens,
        }
    }

    /// The documents of `side`.
    pub fn side(&self, side: Side) -> &[serde_json::Value] {
        match side {
            Side::Alerts => &self.alerts,
            Side::Identities => &self.identities,
            Side::AdminTokens => &self.admin_tokens,
        }
    }
}

impl Default for StoreFile {
    fn default() -> Self {
        StoreFile {
            version: current_version(),
            keys: Vec::new(),
            alerts: Vec::new(),
            identities: Vec::new(),
            admin_tokens: Vec::new(),
        }
    }
}

fn current_version() -> u32 {
    1
}

/// One listing request (`GET /v1/api-keys`, `keygate keys list`).
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// `active`, `inactive`, `expired`, `revoked` or `all`.
    pub status: String,
    pub namespace: Option<String>,
    /// Lowercase: a part of the name, or the start of the id.
    pub search: Option<String>,
    /// Only the keys that name this identity.
    pub identity: Option<String>,
    pub limit: usize,
    /// The sort position of the last key already shown: `(created_at, id)`.
    pub after: Option<(String, String)>,
    pub now: i64,
}

impl ListQuery {
    /// Whether `r` belongs in the listing (before the cursor and limit).
    pub fn matches(&self, r: &KeyRecord) -> bool {
        (self.status == "all" || r.effective_status(self.now) == self.status)
            && self.namespace.as_ref().is_none_or(|ns| &r.namespace == ns)
            && self
                .identity
                .as_ref()
                .is_none_or(|i| r.identity.as_ref() == Some(i))
            && self.search.as_ref().is_none_or(|s| {
                r.name.to_lowercase().contains(s.as_str()) || r.id.starts_with(s.as_str())
            })
    }
}

/// A key store: a file at a path, records in Redis (`store.kind: redis`), or a SQLite
/// database (`store.kind: sqlite`).
#[derive(Debug, Clone)]
pub struct Store {
    path: PathBuf,
    backend: Backend,
    /// Set by [`Store::witnessed`]: where a file write notes what it saw.
    witness: Option<Arc<Mutex<Option<Written>>>>,
    /// Set by [`Store::remembering`]: the document as the last write through this handle
    /// (or a clone of it) left it, shared by every clone.
    memo: Option<Arc<Mutex<Option<Memo>>>>,
}

/// A parsed store document and the stamp of the file that holds exactly it.
#[derive(Debug)]
struct Memo {
    stamp: FileStamp,
    file: StoreFile,
}

/// Identity of a file's content as the file system sees it: an atomic write makes a new
/// inode, and any edit changes the length or the modification time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_nanos: i128,
}

impl FileStamp {
    /// The stamp of `path`; a missing file has the default stamp.
    pub fn of(path: &Path) -> FileStamp {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).map_or(FileStamp::default(), |m| FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            // Two i64s cannot overflow an i128 this way; saturating only says so.
            mtime_nanos: i128::from(m.mtime())
                .saturating_mul(1_000_000_000)
                .saturating_add(i128::from(m.mtime_nsec())),
        })
    }
}

#[derive(Debug, Clone)]
enum Backend {
    File,
    Redis(Arc<RedisStore>),
    Sqlite(Arc<SqliteStore>),
}

/// What one write saw of the store, under the writers' lock: whether it started from the
/// store a snapshot was read from, and what the store is after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// The file's stamp before it was read and after it was replaced.
    File { before: FileStamp, after: FileStamp },
    /// A SQLite store's change feed number before the transaction and after it.
    Feed { before: u64, after: u64 },
}

/// Held while a writer reads, changes and writes the store; dropping it unlocks.
#[derive(Debug)]
pub struct StoreLock {
    _file: File,
}

/// Where a store's records go as they are read.
pub trait RecordSink {
    /// About how many records follow (a database's estimate), for sizing what holds them.
    fn expect(&mut self, _count: usize) {}
    fn add(&mut self, record: KeyRecord);
    /// A side collection kept in the store (alert rules, identities), read with the records.
    fn side(&mut self, _side: Side, _docs: Vec<serde_json::Value>) {}
}

/// A whole store document, gathered from any kind of store.
impl RecordSink for StoreFile {
    fn expect(&mut self, count: usize) {
        self.keys.reserve(count);
    }

    fn add(&mut self, record: KeyRecord) {
        self.keys.push(record);
    }

    fn side(&mut self, side: Side, docs: Vec<serde_json::Value>) {
        *self.side_mut(side) = docs;
    }
}

impl RecordSink for Vec<KeyRecord> {
    fn expect(&mut self, count: usize) {
        self.reserve(count);
    }

    fn add(&mut self, record: KeyRecord) {
        self.push(record);
    }
}

impl Store {
    /// The file store at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Store {
            path: path.into(),
            backend: Backend::File,
            witness: None,
            memo: None,
        }
    }

    /// The SQLite store at `path`.
    pub fn sqlite(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        Store {
            backend: Backend::Sqlite(Arc::new(SqliteStore::new(path.clone()))),
            ..Store::new(path)
        }
    }

    /// The store a config names: its file, its Redis or its database.
    pub fn for_config(config: &Config, config_path: &Path) -> Result<Store, ConfigError> {
        match (config.store.kind, config.store.url.as_deref()) {
            (StoreKind::File, _) => Ok(Store::new(config.keys_path(config_path))),
            (StoreKind::Sqlite, _) => Ok(Store::sqlite(config.keys_path(config_path))),
            (StoreKind::Redis, Some(url)) => {
                let redis = RedisStore::new(url, config.store.prefix())
                    .map_err(|e| ConfigError::at(config_path, "store.url", e))?;
                Ok(Store {
                    path: PathBuf::from(redis.shown()),
                    backend: Backend::Redis(Arc::new(redis)),
                    witness: None,
                    memo: None,
                })
            }
            (StoreKind::Redis, None) => Err(ConfigError::at(
                config_path,
                "store.url",
                "a redis store needs `url: redis://host:port`",
            )),
        }
    }

    /// This store, with a note of what its writes see: [`Store::written`] then tells whether
    /// the write started from the file a snapshot was read from.
    pub fn witnessed(&self) -> Store {
        Store {
            witness: Some(Arc::default()),
            ..self.clone()
        }
    }

    /// This store, keeping the document each write leaves in memory, so that the next write
    /// through it (or a clone) skips reading and parsing the file, as long as the file is
    /// still the one it wrote. It is for a long-running writer (the gateway's admin API): at
    /// 100,000 keys parsing the file is about 130 ms of every change, and the document costs
    /// about as much memory as the parsed records (see PERFORMANCE.md). A file any other
    /// writer replaced or edited is read again.
    pub fn remembering(self) -> Store {
        Store {
            memo: Some(Arc::default()),
            ..self
        }
    }

    /// What the last write through this [`Store::witnessed`] handle saw.
    pub fn written(&self) -> Option<Written> {
        let cell = self.witness.as_ref()?;
        *cell.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The file's path, or for Redis its URL without the password.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The Redis store, when the keys live in Redis.
    pub fn redis(&self) -> Option<&RedisStore> {
        match &self.backend {
            Backend::Redis(redis) => Some(redis),
            _ => None,
        }
    }

    /// The SQLite store, when the keys live in a database.
    pub fn database(&self) -> Option<&SqliteStore> {
        match &self.backend {
            Backend::Sqlite(db) => Some(db),
            _ => None,
        }
    }

    /// Whether the keys live in a file (and a file watch sees their changes).
    pub fn is_file(&self) -> bool {
        matches!(self.backend, Backend::File)
    }

    /// Reads the store, with its version for Redis (how many writes it has seen) and SQLite
    /// (its change feed's number).
    pub fn load_versioned(&self) -> Result<(StoreFile, String, Option<u64>), Vec<ConfigError>> {
        let mut file = StoreFile::default();
        let (src, version) = self.load_each(&mut file)?;
        Ok((file, src, version))
    }

    /// Reads the store into `sink`, a record at a time, and returns the file store's source
    /// text (for locating problems) and the store's version. A database hands over each row
    /// as it is read, so a whole build never holds all records at once.
    pub fn load_each(
        &self,
        sink: &mut dyn RecordSink,
    ) -> Result<(String, Option<u64>), Vec<ConfigError>> {
        let (keys, src, version) = match &self.backend {
            Backend::File => {
                let (mut file, src) = self.load()?;
                for side in Side::ALL {
                    sink.side(side, std::mem::take(file.side_mut(side)));
                }
                (file.keys, src, None)
            }
            Backend::Redis(redis) => {
                let (keys, sides, version) = redis
                    .load_with_sides()
                    .map_err(|e| vec![ConfigError::whole_file(&self.path, e)])?;
                for (side, docs) in Side::ALL.into_iter().zip(sides) {
                    sink.side(side, docs);
                }
                (keys, String::new(), Some(version))
            }
            Backend::Sqlite(db) => return Ok((String::new(), Some(db.load_each(sink)?))),
        };
        sink.expect(keys.len());
        keys.into_iter().for_each(|r| sink.add(r));
        Ok((src, version))
    }

    /// One read-modify-write under the writers' lock: all of it is written, or none.
    pub fn transact<T>(
        &self,
        change: impl FnOnce(&mut dyn Records) -> Result<T, KeyError>,
    ) -> Result<T, KeyError> {
        let db = match &self.backend {
            Backend::Redis(redis) => return redis.transact(change),
            Backend::Sqlite(db) => db,
            Backend::File => return self.transact_file(change),
        };
        let (out, before, after) = db.transact(change)?;
        self.witness_write(Written::Feed { before, after });
        Ok(out)
    }

    /// One locked read-modify-write of a side collection kept in the store: `change` edits
    /// the whole list, and all of it is written, or none. Keys are untouched.
    pub fn change_side<T>(
        &self,
        side: Side,
        change: impl FnOnce(&mut Vec<serde_json::Value>) -> Result<T, KeyError>,
    ) -> Result<T, KeyError> {
        match &self.backend {
            Backend::Redis(redis) => {
                let (out, before, after) = redis.change_side(side, change)?;
                self.witness_write(Written::Feed { before, after });
                Ok(out)
            }
            Backend::Sqlite(db) => {
                let (out, before, after) = db.change_side(side, change)?;
                self.witness_write(Written::Feed { before, after });
                Ok(out)
            }
            Backend::File => {
                let lock = self.lock()?;
                let before = FileStamp::of(&self.path);
                let remembered = self.memo.as_ref().and_then(|m| {
                    let memo = m.lock().unwrap_or_else(|e| e.into_inner()).take()?;
                    (memo.stamp == before).then_some(memo.file)
                });
                let mut file = match remembered {
                    Some(file) => file,
                    None => self.load().map_err(KeyError::Store)?.0,
                };
                let out = change(file.side_mut(side))?;
                self.save(&file, &lock)?;
                let after = FileStamp::of(&self.path);
                self.witness_write(Written::File { before, after });
                if let Some(m) = &self.memo {
                    *m.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(Memo { stamp: after, file });
                }
                Ok(out)
            }
        }
    }

    fn witness_write(&self, written: Written) {
        if let Some(cell) = &self.witness {
            *cell.lock().unwrap_or_else(|e| e.into_inner()) = Some(written);
        }
    }

    /// Every namespace that holds a key, with how many of its keys count toward a tier's
    /// limit at `now`: a grouped count in a database, a pass over every record otherwise.
    pub fn namespace_counts(&self, now: i64) -> Result<BTreeMap<String, usize>, KeyError> {
        if let Some(db) = self.database() {
            return db.namespace_counts(now).map_err(KeyError::Unavailable);
        }
        let (file, _) = self.load().map_err(KeyError::Store)?;
        let mut counts = BTreeMap::new();
        for r in &file.keys {
            let n: &mut usize = counts.entry(r.namespace.clone()).or_default();
            *n = n.saturating_add(usize::from(r.counts_toward_limit(now)));
        }
        Ok(counts)
    }

    /// One page of the listing: a query with indexes in a database, a filter over every
    /// record otherwise. Also says whether more follow.
    pub fn list(&self, q: &ListQuery) -> Result<(Vec<KeyRecord>, bool), KeyError> {
        if let Some(db) = self.database() {
            return db.list(q).map_err(KeyError::Unavailable);
        }
        let (file, _) = self.load().map_err(KeyError::Store)?;
        let mut keys: Vec<KeyRecord> = file
            .keys
            .into_iter()
            .filter(|r| {
                q.matches(r)
                    && q.after.as_ref().is_none_or(|(at, id)| {
                        r.created_at.as_str() < at.as_str()
                            || (&r.created_at == at && r.id.as_str() > id.as_str())
                    })
            })
            .collect();
        keys.sort_by(|a, b| {
            b.created_at
                .cmp(&a.created_at)
                .then_with(|| a.id.cmp(&b.id))
        });
        let more = keys.len() > q.limit;
        keys.truncate(q.limit);
        Ok((keys, more))
    }

    /// The record with this id.
    pub fn get(&self, id: &str) -> Result<Option<KeyRecord>, KeyError> {
        if let Some(db) = self.database() {
            let records = db
                .records(&[id.to_string()])
                .map_err(KeyError::Unavailable)?;
            return Ok(records.and_then(|r| r.into_iter().next()));
        }
        let (file, _) = self.load().map_err(KeyError::Store)?;
        Ok(file.keys.into_iter().find(|r| r.id == id))
    }

    fn transact_file<T>(
        &self,
        change: impl FnOnce(&mut dyn Records) -> Result<T, KeyError>,
    ) -> Result<T, KeyError> {
        let lock = self.lock()?;
        let before = FileStamp::of(&self.path);
        // Taken out: a change that fails part-way, or a failed write, leaves no memo behind.
        let remembered = self.memo.as_ref().and_then(|m| {
            let memo = m.lock().unwrap_or_else(|e| e.into_inner()).take()?;
            (memo.stamp == before).then_some(memo.file)
        });
        let mut file = match remembered {
            Some(file) => file,
            None => self.load().map_err(KeyError::Store)?.0,
        };
        let out = change(&mut DocumentRecords::new(&mut file))?;
        self.save(&file, &lock)?;
        let after = FileStamp::of(&self.path);
        self.witness_write(Written::File { before, after });
        if let Some(m) = &self.memo {
            *m.lock().unwrap_or_else(|e| e.into_inner()) = Some(Memo { stamp: after, file });
        }
        Ok(out)
    }

    /// Reads the store. A missing file is an empty store. Also returns the text read, so
    /// that later validation errors can be located in it.
    pub fn load(&self) -> Result<(StoreFile, String), Vec<ConfigError>> {
        if !self.is_file() {
            return self.load_versioned().map(|(file, src, _)| (file, src));
        }
        let src = match fs::read_to_string(&self.path) {
            Ok(src) => src,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(vec![ConfigError::whole_file(&self.path, e.to_string())]),
        };
        Ok((parse(&self.path, &src)?, src))
    }

    /// Takes the writers' lock, waiting for another writer to finish.
    pub fn lock(&self) -> io::Result<StoreLock> {
        let mut lock_path = self.path.clone().into_os_string();
        lock_path.push(".lock");
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(lock_path)?;
        file.lock()?;
        Ok(StoreLock { _file: file })
    }

    /// Writes the whole store atomically. Callers hold the lock.
    pub fn save(&self, file: &StoreFile, _lock: &StoreLock) -> io::Result<()> {
        write_atomically(&self.path, render(file)?.as_bytes())
    }
}

/// Replaces `path` with `bytes` so that a reader sees the old file or the new one, never a
/// mix, and a crash loses nothing acknowledged: temp file in the same folder, fsync, rename,
/// fsync the folder.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomically_with(path, |f| f.write_all(bytes))
}

/// [`write_atomically`] for text made as it is written: `write` writes the whole new file
/// through a buffer, so that a large file is never held in memory whole.
pub fn write_atomically_with(
    path: &Path,
    write: impl FnOnce(&mut io::BufWriter<File>) -> io::Result<()>,
) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path has no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&tmp)?;
        let mut buffered = io::BufWriter::with_capacity(1 << 16, f);
        write(&mut buffered)?;
        let f = buffered
            .into_inner()
            .map_err(io::IntoInnerError::into_error)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        File::open(&dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Reads a store's text (`path` names it in errors): the layout [`render`] writes, or any
/// YAML of the same shape.
pub fn parse(path: &Path, src: &str) -> Result<StoreFile, Vec<ConfigError>> {
    let file = match parse_lines(src) {
        Some(file) => file,
        None => parse_yaml(path, src)?,
    };
    if file.version != 1 {
        return Err(vec![ConfigError::whole_file(
            path,
            format!(
                "store version {} is not supported by this keygate (1)",
                file.version
            ),
        )]);
    }
    Ok(file)
}

/// The fast path for a store in the layout [`render`] writes: each record line parsed as JSON,
/// several times faster than YAML for large stores. Anything else (a hand edit in block
/// style, a syntax error) returns `None`, and the YAML parser reads the file and locates
/// any error.
fn parse_lines(src: &str) -> Option<StoreFile> {
    #[derive(PartialEq)]
    enum In {
        Head,
        Keys,
        Side(Side),
    }
    let mut file = StoreFile::default();
    let mut section = In::Head;
    for line in src.lines() {
        let line = line.trim_end();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let item = line.strip_prefix("- ").filter(|r| r.starts_with('{'));
        match (&section, item) {
            (In::Keys, Some(record)) => file.keys.push(serde_json::from_str(record).ok()?),
            (In::Side(side), Some(doc)) => {
                file.side_mut(*side).push(serde_json::from_str(doc).ok()?)
            }
            _ if line == "keys:" && section == In::Head => section = In::Keys,
            _ if line == "keys: []" && section == In::Head => {}
            _ if line == "alerts:" && section != In::Side(Side::Alerts) => {
                section = In::Side(Side::Alerts)
            }
            _ if line == "identities:" && section != In::Side(Side::Identities) => {
                section = In::Side(Side::Identities)
            }
            _ if line == "admin_tokens:" && section != In::Side(Side::AdminTokens) => {
                section = In::Side(Side::AdminTokens)
            }
            (In::Head, None) => {
                file.version = line.strip_prefix("version: ")?.trim().parse().ok()?
            }
            _ => return None,
        }
    }
    Some(file)
}

/// The store's text: a header, then one record per line.
pub fn render(file: &StoreFile) -> io::Result<String> {
    let mut out = String::with_capacity(file.keys.len().saturating_mul(320).saturating_add(128));
    out.push_str(
        "# keygate key store: one key per line. Only SHA-256 hashes of keys are stored.\n\
         # Written by `keygate keys` and the admin API; a running gateway reloads it on change.\n",
    );
    out.push_str(&format!("version: {}\n", file.version));
    if file.keys.is_empty() {
        out.push_str("keys: []\n");
    } else {
        out.push_str("keys:\n");
    }
    for record in &file.keys {
        out.push_str("- ");
        out.push_str(&serde_json::to_string(record).map_err(io::Error::other)?);
        out.push('\n');
    }
    for side in Side::ALL {
        let docs = file.side(side);
        if docs.is_empty() {
            continue;
        }
        out.push_str(side.name());
        out.push_str(":\n");
        for doc in docs {
            out.push_str("- ");
            out.push_str(&serde_json::to_string(doc).map_err(io::Error::other)?);
            out.push('\n');
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fast_path_and_yaml_agree() {
        let mut record = crate::keys::tests::record("abcd1234");
        record.scopes = vec!["read:/v1/**".into()];
        record.note = "quote \" and unicode é".into();
        let mut file = StoreFile {
            version: 1,
            keys: vec![record.clone(), crate::keys::tests::record("ef567890")],
            alerts: Vec::new(),
            identities: Vec::new(),
            admin_tokens: Vec::new(),
        };
        let text = render(&file).unwrap();
        assert_eq!(parse_lines(&text).unwrap(), file);
        let via_yaml: StoreFile = parse_yaml(Path::new("k.yaml"), &text).unwrap();
        assert_eq!(via_yaml, file);
        // Alert rules follow the keys, one per line, and read back both ways.
        file.alerts = vec![
            serde_json::json!({"name": "hot", "requests_per_minute": 10}),
            serde_json::json!({"name": "quota", "quota_percent": 90.5, "email": ["a@b.c"]}),
        ];
        file.admin_tokens =
            vec![serde_json::json!({"name": "ci", "hash": "sha256:00", "role": "read"})];
        let text = render(&file).unwrap();
        assert!(text.contains("\nalerts:\n- {\"name\":\"hot\""), "{text}");
        assert!(
            text.ends_with(
                "\nadmin_tokens:\n- {\"name\":\"ci\",\"hash\":\"sha256:00\",\"role\":\"read\"}\n"
            ),
            "{text}"
        );
        assert_eq!(parse_lines(&text).unwrap(), file);
        let via_yaml: StoreFile = parse_yaml(Path::new("k.yaml"), &text).unwrap();
        assert_eq!(via_yaml, file);
        file.keys.clear();
        let text = render(&file).unwrap();
        assert_eq!(parse_lines(&text).unwrap(), file, "{text}");
        assert_eq!(
            parse_lines(&render(&StoreFile::default()).unwrap()).unwrap(),
            StoreFile::default()
        );
    }

    #[test]
    fn anything_else_falls_back_to_yaml() {
        assert!(parse_lines("version: 1\nkeys:\n  - id: x\n").is_none());
        assert!(parse_lines("version: 1\nkeys:\n- {\"id\": broken\n").is_none());
        assert!(parse_lines("colour: blue\n").is_none());
    }
}
