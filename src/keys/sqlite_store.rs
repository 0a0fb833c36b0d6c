//! The key store in an embedded SQLite database (`store.kind: sqlite`), for stores too big
//! to rewrite whole on every change.
//!
//! - One row per key: the record as the file store writes it (JSON), beside the columns the
//!   indexes need (hash, namespace, status, expiry, creation time, lowercased name).
//! - Every lifecycle operation is one `BEGIN IMMEDIATE` transaction, committed in WAL mode
//!   with `synchronous=FULL` before anyone is told it happened. Writers in other processes
//!   wait for each other (a busy timeout), never fail with "database is locked" unless one
//!   holds the lock past it.
//! - Each transaction appends to a change feed: one row per changed key (or one row for
//!   "everything" after a bulk write), numbered by a sequence that never goes back. The
//!   gateway keeps the number its snapshot was read at, and applies just the keys changed
//!   since (see `reload::follow_feed`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};

use super::records::Records;
use super::store::{ListQuery, RecordSink, Side};
use super::{KeyError, KeyRecord, Status};
use crate::config::ConfigError;

/// How long a writer waits for another process's transaction before giving up.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// A transaction that changed more keys than this writes one "everything" row to the feed,
/// and followers read the whole store once.
pub const MAX_LISTED: usize = 1_000;

/// Feed rows kept; a follower further behind than this reads the whole store.
const FEED_KEPT: i64 = 100_000;

/// The schema this build reads and writes (`PRAGMA user_version`). Version 2 adds the
/// alert rules made through the admin API, version 3 the identities, version 4 the admin
/// tokens; an older database is brought up to it when opened, with no step from the
/// operator.
const SCHEMA_VERSION: i64 = 4;

/// What version 4 adds to version 3.
const ADMIN_TOKENS: &str = "
CREATE TABLE IF NOT EXISTS admin_tokens (
    position INTEGER PRIMARY KEY NOT NULL,
    doc TEXT NOT NULL
);
";

/// What version 3 adds to version 2.
const IDENTITIES: &str = "
CREATE TABLE IF NOT EXISTS identities (
    position INTEGER PRIMARY KEY NOT NULL,
    doc TEXT NOT NULL
);
";

/// What version 2 adds to version 1.
const ALERT_RULES: &str = "
CREATE TABLE IF NOT EXISTS alert_rules (
    position INTEGER PRIMARY KEY NOT NULL,
    rule TEXT NOT NULL
);
";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    namespace TEXT NOT NULL,
    status TEXT NOT NULL,
    expires_unix INTEGER,
    created_at TEXT NOT NULL,
    name_lower TEXT NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS keys_by_created ON keys (created_at DESC, id, name_lower);
CREATE INDEX IF NOT EXISTS keys_by_namespace ON keys (namespace, created_at DESC, id);
CREATE INDEX IF NOT EXISTS keys_counted ON keys (namespace, status, expires_unix);
CREATE VIRTUAL TABLE IF NOT EXISTS key_names USING fts5 (name, tokenize = 'trigram');
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    key_id TEXT
);
";

/// What changed in the store since a sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Feed {
    /// Nothing: the number is the latest.
    Current,
    /// These keys changed, and the store is now at `to`.
    Keys { to: u64, ids: Vec<String> },
    /// Too much to list, or the feed no longer reaches back that far: read it all.
    Everything,
}

/// A SQLite key store, with one connection kept open for this process's reads and writes.
#[derive(Debug)]
pub struct SqliteStore {
    path: PathBuf,
    connection: Mutex<Option<Open>>,
}

/// The connection, and the file it was opened on: a database replaced under the same name
/// (a restore from a backup) is opened again.
#[derive(Debug)]
struct Open {
    connection: Connection,
    file: (u64, u64),
}

/// The device and inode of the file at `path`, if there is one.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

impl SqliteStore {
    pub fn new(path: impl Into<PathBuf>) -> SqliteStore {
        SqliteStore {
            path: path.into(),
            connection: Mutex::new(None),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn fail(&self, e: impl std::fmt::Display) -> String {
        format!("the key store {} cannot be used: {e}", self.path.display())
    }

    /// This process's connection, opened (and the schema made) on first use. A connection
    /// that failed is dropped, so the next call opens the file again.
    fn connection(&self) -> Result<Connected<'_>, String> {
        let mut guard = self.connection.lock().unwrap_or_else(|e| e.into_inner());
        let file = file_id(&self.path);
        if guard.as_ref().is_none_or(|open| Some(open.file) != file) {
            *guard = None;
            let connection = self.open().map_err(|e| self.fail(e))?;
            let file = file_id(&self.path).unwrap_or_default();
            *guard = Some(Open { connection, file });
        }
        Ok(Connected { guard })
    }

    fn open(&self) -> rusqlite::Result<Connection> {
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // A missing folder is reported by the open that follows.
            let _ = std::fs::create_dir_all(dir);
        }
        let con = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        con.busy_timeout(BUSY_TIMEOUT)?;
        con.pragma_update(None, "journal_mode", "WAL")?;
        con.pragma_update(None, "synchronous", "FULL")?;
        let version: i64 = con.pragma_query_value(None, "user_version", |r| r.get(0))?;
        match version {
            SCHEMA_VERSION => {}
            0 => {
                con.execute_batch(&format!(
                    "BEGIN IMMEDIATE; {SCHEMA} {ALERT_RULES} {IDENTITIES} {ADMIN_TOKENS} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
                ))?;
            }
            1 => {
                con.execute_batch(&format!(
                    "BEGIN IMMEDIATE; {ALERT_RULES} {IDENTITIES} {ADMIN_TOKENS} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
                ))?;
            }
            2 => {
                con.execute_batch(&format!(
                    "BEGIN IMMEDIATE; {IDENTITIES} {ADMIN_TOKENS} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
                ))?;
            }
            3 => {
                con.execute_batch(&format!(
                    "BEGIN IMMEDIATE; {ADMIN_TOKENS} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
                ))?;
            }
            other => {
                return Err(rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_MISMATCH),
                    Some(format!(
                        "schema version {other} is not supported by this keygate ({SCHEMA_VERSION})"
                    )),
                ))
            }
        }
        Ok(con)
    }

    /// Reads every record into `sink`, parsing each row as it is read, and returns the change
    /// feed's number the records are current to. Every unreadable row is reported, with its id.
    pub fn load_each(&self, sink: &mut dyn RecordSink) -> Result<u64, Vec<ConfigError>> {
        let whole = |e: String| vec![ConfigError::whole_file(&self.path, e)];
        let mut con = self.connection().map_err(whole)?;
        let mut errors = Vec::new();
        let read = (|| {
            let tx = con.get()?.transaction()?;
            let seq = last_seq(&tx)?;
            // Keys are never deleted, so the last rowid is their count, read without a scan.
            let last: Option<i64> =
                tx.query_row("SELECT max(rowid) FROM keys", [], |r| r.get(0))?;
            sink.expect(last.and_then(|n| usize::try_from(n).ok()).unwrap_or(0));
            for side in Side::ALL {
                match read_side(&tx, side) {
                    Ok(docs) => sink.side(side, docs),
                    Err(e) => errors.push(ConfigError::at(&self.path, side_table(side).0, e)),
                }
            }
            {
                let mut stmt = tx.prepare("SELECT id, record FROM keys ORDER BY rowid")?;
                let mut cursor = stmt.query([])?;
                while let Some(row) = cursor.next()? {
                    let json = row.get_ref(1)?.as_str()?;
                    match serde_json::from_str::<KeyRecord>(json) {
                        Ok(r) => sink.add(r),
                        Err(e) => errors.push(ConfigError::at(
                            &self.path,
                            &format!("keys.{}", row.get_ref(0)?.as_str()?),
                            format!("the stored record cannot be read: {e}"),
                        )),
                    }
                }
            }
            tx.commit()?;
            Ok::<_, rusqlite::Error>(seq)
        })();
        let seq = read.map_err(|e| con.failed(self, e)).map_err(whole)?;
        if errors.is_empty() {
            Ok(seq)
        } else {
            Err(errors)
        }
    }

    /// The records with these ids, in order; `None` if one is missing.
    pub fn records(&self, ids: &[String]) -> Result<Option<Vec<KeyRecord>>, String> {
        let mut con = self.connection()?;
        let read = (|| {
            let c = con.get()?;
            let mut stmt = c.prepare_cached("SELECT record FROM keys WHERE id = ?1")?;
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                let json: Option<String> = stmt.query_row([id], |r| r.get(0)).optional()?;
                match json {
                    Some(json) => out.push(json),
                    None => return Ok(None),
                }
            }
            Ok(Some(out))
        })();
        let Some(rows) = read.map_err(|e| con.failed(self, e))? else {
            return Ok(None);
        };
        rows.iter()
            .map(|json| {
                serde_json::from_str(json)
                    .map_err(|e| self.fail(format!("a stored record cannot be read: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// What changed since `seq`.
    pub fn changes_since(&self, seq: u64) -> Result<Feed, String> {
        let mut con = self.connection()?;
        let read = (|| {
            let tx = con.get()?.transaction()?;
            let last = last_seq(&tx)?;
            let mut stmt = tx.prepare_cached(
                "SELECT seq, key_id FROM changes WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )?;
            let rows = stmt
                .query_map(
                    params![
                        i64::try_from(seq).unwrap_or(i64::MAX),
                        i64::try_from(MAX_LISTED.saturating_add(1)).unwrap_or(i64::MAX)
                    ],
                    |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Option<String>>(1)?)),
                )?
                .collect::<Result<Vec<_>, _>>()?;
            Ok::<_, rusqlite::Error>((last, rows))
        })();
        let (last, rows) = read.map_err(|e| con.failed(self, e))?;
        Ok(feed_of(seq, last, rows))
    }

    /// One listing page, newest first, and whether more follow.
    pub fn list(&self, q: &ListQuery) -> Result<(Vec<KeyRecord>, bool), String> {
        let mut sql = String::from("SELECT record FROM keys WHERE 1");
        let now = q.now;
        match q.status.as_str() {
            "active" | "inactive" => {
                sql.push_str(" AND status = ?1 AND (expires_unix IS NULL OR expires_unix > ?2)")
            }
            "expired" => sql.push_str(" AND status != 'revoked' AND expires_unix <= ?2"),
            "revoked" => sql.push_str(" AND status = ?1"),
            _ => {}
        }
        if q.namespace.is_some() {
            sql.push_str(" AND namespace = ?3");
        }
        // Read from each record: a scan of the keys the other conditions leave.
        sql.push_str(if q.identity.is_some() {
            " AND json_extract(record, '$.identity') = ?9"
        } else {
            " AND ?9 IS NULL"
        });
        // A search of three characters or more is looked up in the names' trigram index and
        // the id index, and only the keys found are sorted. A shorter one matches many keys:
        // the creation-time index, which holds the names, is read until a page is found.
        let phrase = q
            .search
            .as_ref()
            .filter(|s| s.chars().count() >= 3)
            .map(|s| format!("\"{}\"", s.replace('"', "\"\"")));
        match (&q.search, &phrase) {
            (Some(_), Some(_)) => sql.push_str(
                " AND rowid IN (SELECT rowid FROM key_names WHERE key_names MATCH ?8
                   UNION SELECT rowid FROM keys WHERE id >= ?4 AND id < ?4 || char(1114111))",
            ),
            // `?8` is NULL here, and named only so that every query takes the same parameters.
            (Some(_), None) => sql.push_str(
                " AND (instr(name_lower, ?4) > 0 OR substr(id, 1, length(?4)) = ?4) AND ?8 IS NULL",
            ),
            (None, _) => sql.push_str(" AND ?8 IS NULL"),
        }
        if q.after.is_some() {
            sql.push_str(" AND (created_at < ?5 OR (created_at = ?5 AND id > ?6))");
        }
        // Unary `+` keeps an indexed search from walking the creation-time index instead.
        sql.push_str(if phrase.is_some() {
            " ORDER BY +created_at DESC, +id LIMIT ?7"
        } else {
            " ORDER BY created_at DESC, id LIMIT ?7"
        });
        let (after_at, after_id) = q.after.clone().unwrap_or_default();
        let limit = i64::try_from(q.limit.saturating_add(1)).unwrap_or(i64::MAX);
        let mut con = self.connection()?;
        let read = (|| {
            let c = con.get()?;
            let mut stmt = c.prepare_cached(&sql)?;
            let rows = stmt
                .query_map(
                    params![
                        q.status,
                        now,
                        q.namespace,
                        q.search,
                        after_at,
                        after_id,
                        limit,
                        phrase,
                        q.identity
                    ],
                    |r| r.get::<_, String>(0),
                )?
                .collect::<Result<Vec<_>, _>>()?;
            Ok::<_, rusqlite::Error>(rows)
        })();
        let rows = read.map_err(|e| con.failed(self, e))?;
        let more = rows.len() > q.limit;
        let records = rows
            .iter()
            .take(q.limit)
            .map(|json| {
                serde_json::from_str(json)
                    .map_err(|e| self.fail(format!("a stored record cannot be read: {e}")))
            })
            .collect::<Result<Vec<KeyRecord>, _>>()?;
        Ok((records, more))
    }

    /// Every namespace that holds a key, with how many of its keys count toward a tier's
    /// limit at `now` (active or inactive, and not expired): one pass over the namespace
    /// index, without reading a record.
    pub fn namespace_counts(&self, now: i64) -> Result<BTreeMap<String, usize>, String> {
        let mut con = self.connection()?;
        let read = (|| {
            let c = con.get()?;
            let mut stmt = c.prepare_cached(
                "SELECT namespace, sum(status IN ('active', 'inactive')
                   AND (expires_unix IS NULL OR expires_unix > ?1)) FROM keys GROUP BY namespace",
            )?;
            let rows = stmt
                .query_map(params![now], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok::<_, rusqlite::Error>(rows)
        })();
        let rows = read.map_err(|e| con.failed(self, e))?;
        Ok(rows
            .into_iter()
            .map(|(ns, n)| (ns, usize::try_from(n).unwrap_or(0)))
            .collect())
    }

    /// One lifecycle operation in one transaction, committed before it returns. Also returns
    /// the feed's sequence number before and after it.
    pub fn transact<T>(
        &self,
        change: impl FnOnce(&mut dyn Records) -> Result<T, KeyError>,
    ) -> Result<(T, u64, u64), KeyError> {
        let mut con = self.connection().map_err(KeyError::Unavailable)?;
        let done = (|| {
            let tx = con
                .get()?
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            let before = last_seq(&tx)?;
            let mut records = TxRecords {
                tx: &tx,
                store: self,
                changed: Vec::new(),
            };
            // Returning early drops the transaction unwritten, which rolls it back.
            let out = match change(&mut records) {
                Ok(out) => out,
                Err(e) => return Ok(Err(e)),
            };
            let changed = std::mem::take(&mut records.changed);
            if !changed.is_empty() {
                let mut feed = tx.prepare_cached("INSERT INTO changes (key_id) VALUES (?1)")?;
                if changed.len() <= MAX_LISTED {
                    for id in &changed {
                        feed.execute([id])?;
                    }
                } else {
                    feed.execute([Option::<String>::None])?;
                }
            }
            let after = last_seq(&tx)?;
            tx.execute(
                "DELETE FROM changes WHERE seq <= ?1",
                [i64::try_from(after)
                    .unwrap_or(i64::MAX)
                    .saturating_sub(FEED_KEPT)],
            )?;
            tx.commit()?;
            Ok::<_, rusqlite::Error>(Ok((out, before, after)))
        })();
        done.map_err(|e| KeyError::Unavailable(con.failed(self, e)))?
    }
}

impl SqliteStore {
    /// One transaction over a side collection: `change` edits the whole list, which then
    /// replaces the stored one. Returns its result and the change feed's numbers before and
    /// after: alert rules do not move the feed; identities and admin tokens write one
    /// "everything" row, so that other processes following this database (a gateway, after
    /// the CLI's change) read it whole again.
    pub fn change_side<T>(
        &self,
        side: Side,
        change: impl FnOnce(&mut Vec<serde_json::Value>) -> Result<T, KeyError>,
    ) -> Result<(T, u64, u64), KeyError> {
        let mut con = self.connection().map_err(KeyError::Unavailable)?;
        let (table, column) = side_table(side);
        let done = (|| {
            let tx = con
                .get()?
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            let before = last_seq(&tx)?;
            let mut docs = match read_side(&tx, side) {
                Ok(docs) => docs,
                Err(e) => return Ok(Err(KeyError::Unavailable(self.fail(e)))),
            };
            let out = match change(&mut docs) {
                Ok(out) => out,
                Err(e) => return Ok(Err(e)),
            };
            tx.execute(&format!("DELETE FROM {table}"), [])?;
            {
                let mut insert = tx.prepare_cached(&format!(
                    "INSERT INTO {table} (position, {column}) VALUES (?1, ?2)"
                ))?;
                for (position, doc) in (0i64..).zip(&docs) {
                    insert.execute(params![position, doc.to_string()])?;
                }
            }
            if matches!(side, Side::Identities | Side::AdminTokens) {
                tx.execute("INSERT INTO changes (key_id) VALUES (NULL)", [])?;
            }
            let after = last_seq(&tx)?;
            tx.commit()?;
            Ok::<_, rusqlite::Error>(Ok((out, before, after)))
        })();
        done.map_err(|e| KeyError::Unavailable(con.failed(self, e)))?
    }
}

/// The table and column a side collection lives in.
fn side_table(side: Side) -> (&'static str, &'static str) {
    match side {
        Side::Alerts => ("alert_rules", "rule"),
        Side::Identities => ("identities", "doc"),
        Side::AdminTokens => ("admin_tokens", "doc"),
    }
}

/// The stored documents of a side collection, in order.
fn read_side(tx: &rusqlite::Transaction<'_>, side: Side) -> Result<Vec<serde_json::Value>, String> {
    let (table, column) = side_table(side);
    let mut stmt = tx
        .prepare_cached(&format!("SELECT {column} FROM {table} ORDER BY position"))
        .map_err(|e| e.to_string())?;
    let rows = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .map_err(|e| e.to_string())?;
    let mut docs = Vec::new();
    for row in rows {
        let text = row.map_err(|e| e.to_string())?;
        docs.push(
            serde_json::from_str(&text)
                .map_err(|e| format!("a stored member of {} cannot be read: {e}", side.name()))?,
        );
    }
    Ok(docs)
}

/// This process's connection, held for one operation.
struct Connected<'s> {
    guard: MutexGuard<'s, Option<Open>>,
}

impl Connected<'_> {
    fn get(&mut self) -> rusqlite::Result<&mut Connection> {
        self.guard
            .as_mut()
            .map(|open| &mut open.connection)
            .ok_or(rusqlite::Error::InvalidQuery)
    }

    /// Says what failed, and drops the connection so that the next use opens the file again
    /// (a replaced or repaired database is then seen).
    fn failed(&mut self, store: &SqliteStore, e: rusqlite::Error) -> String {
        *self.guard = None;
        store.fail(e)
    }
}

/// The latest sequence number the feed has handed out (0 for a new store).
fn last_seq(con: &Connection) -> rusqlite::Result<u64> {
    let seq: Option<i64> = con
        .query_row(
            "SELECT seq FROM sqlite_sequence WHERE name = 'changes'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    Ok(seq.and_then(|s| u64::try_from(s).ok()).unwrap_or(0))
}

/// What the feed rows after `held` say, given the latest number `last`.
fn feed_of(held: u64, last: u64, rows: Vec<(i64, Option<String>)>) -> Feed {
    if last == held {
        return Feed::Current;
    }
    let first = rows.first().and_then(|(s, _)| u64::try_from(*s).ok());
    // Behind the oldest row kept, a database replaced by an older one, or a bulk write.
    if last < held
        || first != Some(held.saturating_add(1))
        || rows.len() > MAX_LISTED
        || rows.iter().any(|(_, id)| id.is_none())
    {
        return Feed::Everything;
    }
    let to = rows
        .last()
        .and_then(|(s, _)| u64::try_from(*s).ok())
        .unwrap_or(held);
    let mut ids: Vec<String> = rows.into_iter().filter_map(|(_, id)| id).collect();
    ids.sort_unstable();
    ids.dedup();
    Feed::Keys { to, ids }
}

/// [`Records`] inside one transaction, noting which keys it wrote.
struct TxRecords<'t> {
    tx: &'t rusqlite::Transaction<'t>,
    store: &'t SqliteStore,
    changed: Vec<String>,
}

impl TxRecords<'_> {
    fn fail(&self, e: rusqlite::Error) -> KeyError {
        match &e {
            rusqlite::Error::SqliteFailure(f, _)
                if f.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                KeyError::Import(format!("two keys would share an id or a hash: {e}"))
            }
            _ => KeyError::Unavailable(self.store.fail(e)),
        }
    }
}

impl Records for TxRecords<'_> {
    fn get(&mut self, id: &str) -> Result<Option<KeyRecord>, KeyError> {
        let json: Option<String> = self
            .tx
            .prepare_cached("SELECT record FROM keys WHERE id = ?1")
            .and_then(|mut s| s.query_row([id], |r| r.get(0)).optional())
            .map_err(|e| self.fail(e))?;
        json.map(|j| {
            serde_json::from_str(&j).map_err(|e| {
                KeyError::Unavailable(
                    self.store
                        .fail(format!("the record of key `{id}` cannot be read: {e}")),
                )
            })
        })
        .transpose()
    }

    fn id_taken(&mut self, id: &str) -> Result<bool, KeyError> {
        self.tx
            .prepare_cached("SELECT 1 FROM keys WHERE id = ?1")
            .and_then(|mut s| s.exists([id]))
            .map_err(|e| self.fail(e))
    }

    fn hash_owner(&mut self, hash: &str) -> Result<Option<String>, KeyError> {
        self.tx
            .prepare_cached("SELECT id FROM keys WHERE hash = ?1")
            .and_then(|mut s| s.query_row([hash], |r| r.get(0)).optional())
            .map_err(|e| self.fail(e))
    }

    fn counted(&mut self, namespace: &str, now: i64) -> Result<usize, KeyError> {
        let n: i64 = self
            .tx
            .prepare_cached(
                "SELECT count(*) FROM keys WHERE namespace = ?1 AND status IN ('active', 'inactive')
                 AND (expires_unix IS NULL OR expires_unix > ?2)",
            )
            .and_then(|mut s| s.query_row(params![namespace, now], |r| r.get(0)))
            .map_err(|e| self.fail(e))?;
        Ok(usize::try_from(n).unwrap_or(0))
    }

    fn put(&mut self, record: KeyRecord) -> Result<(), KeyError> {
        let json =
            serde_json::to_string(&record).map_err(|e| KeyError::Io(std::io::Error::other(e)))?;
        let status = match record.status {
            Status::Active => "active",
            Status::Inactive => "inactive",
            Status::Revoked => "revoked",
        };
        self.tx
            .prepare_cached(
                "INSERT INTO keys (id, hash, namespace, status, expires_unix, created_at, name_lower, record)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT (id) DO UPDATE SET hash = excluded.hash, namespace = excluded.namespace,
                   status = excluded.status, expires_unix = excluded.expires_unix,
                   created_at = excluded.created_at, name_lower = excluded.name_lower,
                   record = excluded.record",
            )
            .and_then(|mut s| {
                s.execute(params![
                    record.id,
                    record.hash,
                    record.namespace,
                    status,
                    record.expires_at_unix(),
                    record.created_at,
                    record.name.to_lowercase(),
                    json
                ])
            })
            .map_err(|e| self.fail(e))?;
        let names = (|| {
            let rowid: i64 = self
                .tx
                .prepare_cached("SELECT rowid FROM keys WHERE id = ?1")?
                .query_row([&record.id], |r| r.get(0))?;
            self.tx
                .prepare_cached("DELETE FROM key_names WHERE rowid = ?1")?
                .execute([rowid])?;
            if !record.name.is_empty() {
                self.tx
                    .prepare_cached("INSERT INTO key_names (rowid, name) VALUES (?1, ?2)")?
                    .execute(params![rowid, record.name])?;
            }
            Ok(())
        })();
        names.map_err(|e| self.fail(e))?;
        self.changed.push(record.id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(store: &SqliteStore) -> Result<(Vec<KeyRecord>, u64), Vec<ConfigError>> {
        let mut records = Vec::new();
        let seq = store.load_each(&mut records)?;
        Ok((records, seq))
    }
    use crate::keys::tests::record;

    fn hashed(id: &str, n: u8) -> KeyRecord {
        KeyRecord {
            hash: format!("sha256:{}", crate::keys::hex(&[n; 32])),
            ..record(id)
        }
    }

    #[test]
    fn the_feed_lists_each_write_and_a_bulk_write_as_everything() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::new(dir.path().join("keys.db"));
        assert_eq!(store.changes_since(0).unwrap(), Feed::Current);
        let ((), before, after) = store.transact(|r| r.put(hashed("aaaa1111", 1))).unwrap();
        assert_eq!((before, after), (0, 1));
        let ((), _, after) = store
            .transact(|r| {
                r.put(hashed("bbbb2222", 2))?;
                r.put(hashed("aaaa1111", 3))
            })
            .unwrap();
        assert_eq!(after, 3);
        assert_eq!(
            store.changes_since(1).unwrap(),
            Feed::Keys {
                to: 3,
                ids: vec!["aaaa1111".into(), "bbbb2222".into()]
            }
        );
        assert_eq!(store.changes_since(3).unwrap(), Feed::Current);
        // A store replaced by an older copy, or a follower ahead of it, reads it all.
        assert_eq!(store.changes_since(9).unwrap(), Feed::Everything);
        let ((), _, _) = store
            .transact(|r| {
                for i in 0..=MAX_LISTED {
                    let id = format!("c{i:07}");
                    let mut rec = hashed(&id, 0);
                    rec.hash = format!("sha256:{:064x}", i.saturating_add(100));
                    r.put(rec)?;
                }
                Ok(())
            })
            .unwrap();
        assert_eq!(store.changes_since(3).unwrap(), Feed::Everything);
        let (records, seq) = load(&store).unwrap();
        assert_eq!(records.len(), MAX_LISTED + 3);
        assert_eq!(seq, 4);
    }

    #[test]
    fn a_failed_operation_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::new(dir.path().join("keys.db"));
        let err = store
            .transact(|r| {
                r.put(hashed("aaaa1111", 1))?;
                Err::<(), _>(KeyError::NotFound("x".into()))
            })
            .unwrap_err();
        assert!(matches!(err, KeyError::NotFound(_)));
        assert_eq!(load(&store).unwrap(), (vec![], 0));
        // Two keys with one hash: the commit refuses, and nothing lands.
        let err = store
            .transact(|r| {
                r.put(hashed("aaaa1111", 1))?;
                r.put(hashed("bbbb2222", 1))
            })
            .unwrap_err();
        assert!(err.to_string().contains("hash"), "{err}");
        assert_eq!(load(&store).unwrap().0.len(), 0);
    }

    #[test]
    fn a_version_3_database_gains_admin_tokens_and_their_writes_move_the_feed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.db");
        // A database as the build before admin tokens left it, with a key in it.
        Connection::open(&path)
            .unwrap()
            .execute_batch(&format!(
                "{SCHEMA} {ALERT_RULES} {IDENTITIES} PRAGMA user_version = 3;"
            ))
            .unwrap();
        let store = SqliteStore::new(&path);
        store.transact(|r| r.put(hashed("aaaa1111", 1))).unwrap();
        let doc = serde_json::json!({"name": "ci", "hash": "sha256:00", "role": "read"});
        let (added, before, after) = store
            .change_side(Side::AdminTokens, |docs| {
                docs.push(doc.clone());
                Ok(docs.len())
            })
            .unwrap();
        assert_eq!((added, after), (1, before + 1));
        // Another process following the feed reads the store whole again.
        assert_eq!(store.changes_since(before).unwrap(), Feed::Everything);
        let mut file = crate::keys::StoreFile::default();
        store.load_each(&mut file).unwrap();
        assert_eq!((file.keys.len(), file.admin_tokens), (1, vec![doc]));
        let version: i64 = Connection::open(&path)
            .unwrap()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
    }

    #[test]
    fn a_file_that_is_not_a_database_is_one_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.db");
        std::fs::write(&path, "version: 1\nkeys: []\n".repeat(100)).unwrap();
        let store = SqliteStore::new(&path);
        let errors = load(&store).unwrap_err();
        let text = errors[0].to_string();
        assert!(
            text.contains("keys.db") && text.contains("not a database"),
            "{text}"
        );
        assert!(!text.contains('\n'), "{text}");
        let err = store
            .transact(|r| r.put(hashed("aaaa1111", 1)))
            .unwrap_err();
        assert!(matches!(err, KeyError::Unavailable(_)), "{err}");
    }

    #[test]
    fn a_listing_pages_by_creation_time_with_filters() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::new(dir.path().join("keys.db"));
        let mut all = Vec::new();
        for i in 0u8..7 {
            let mut r = hashed(&format!("{i:08}"), i);
            r.created_at = format!("2026-01-0{}T00:00:00Z", i / 2 + 1);
            r.name = if i % 2 == 0 {
                "CI Bot".into()
            } else {
                "web".into()
            };
            if i == 3 {
                r.status = Status::Revoked;
            }
            if i == 4 {
                r.expires_at = Some("2026-01-01T00:00:00Z".into());
            }
            if i % 3 == 0 {
                r.identity = Some("cus_1".into());
            }
            all.push(r);
        }
        let load = all.clone();
        store
            .transact(move |r| load.into_iter().try_for_each(|k| r.put(k)))
            .unwrap();
        let now = crate::clock::parse_rfc3339("2026-02-01T00:00:00Z").unwrap();
        for status in ["active", "inactive", "expired", "revoked", "all"] {
            for search in [
                None,
                Some("ci b"),
                Some("0000000"),
                Some("we"),
                Some("0"),
                Some("i\"b"),
            ] {
                let identity = (search.is_none()).then(|| "cus_1".to_string());
                for identity in [None, identity] {
                    let mut q = ListQuery {
                        status: status.into(),
                        search: search.map(String::from),
                        identity,
                        limit: 2,
                        now,
                        ..ListQuery::default()
                    };
                    let mut want: Vec<&KeyRecord> = all.iter().filter(|r| q.matches(r)).collect();
                    want.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(a.id.cmp(&b.id)));
                    let mut got = Vec::new();
                    loop {
                        let (page, more) = store.list(&q).unwrap();
                        assert!(page.len() <= 2);
                        got.extend(page.iter().map(|r| r.id.clone()));
                        match (more, page.last()) {
                            (true, Some(last)) => {
                                q.after = Some((last.created_at.clone(), last.id.clone()))
                            }
                            _ => break,
                        }
                    }
                    let want: Vec<String> = want.iter().map(|r| r.id.clone()).collect();
                    assert_eq!(got, want, "{status} {search:?} {:?}", q.identity);
                }
            }
        }
        // The namespaces' counts agree with the records' own rule, revoked and expired keys
        // left out but their namespace still listed.
        let mut other = hashed("99999999", 99);
        other.namespace = "globex".into();
        other.status = Status::Revoked;
        store.transact(move |r| r.put(other)).unwrap();
        let counts = store.namespace_counts(now).unwrap();
        let acme = all.iter().filter(|r| r.counts_toward_limit(now)).count();
        assert_eq!(acme, 5);
        assert_eq!(
            counts.into_iter().collect::<Vec<_>>(),
            [("acme".to_string(), acme), ("globex".to_string(), 0)]
        );
    }
}
