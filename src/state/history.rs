//! Each key's recent requests, for the exposure-window review after a leak: who used the key,
//! from where, between its exposure and its revocation.
//!
//! A key's ring lives in its usage cell, made on first use, so a key never used costs
//! nothing, and it grows only as the key is used: a key with three requests holds three. Two
//! bounds hold it: `request_history.per_key` entries a key, and `request_history.max_total`
//! entries over all keys. At the second, a ring that has entries replaces its oldest instead
//! of growing; a ring with none still takes one, so that every used key (a leaked key among
//! them) keeps its last request.
//!
//! On disk the rings are a journal of JSON lines beside the usage file. Housekeeping appends
//! the entries recorded since its last pass (then fsyncs), and rewrites the journal whole
//! (temp file, fsync, rename) once it holds more than twice what the rings do. At start the
//! journal is read back into the rings, so history survives a restart; a crash loses at most
//! one flush interval, as usage does.

use std::borrow::Cow;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, Write as _};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use http::{HeaderValue, Method};
use serde::{Deserialize, Serialize};

use super::usage::{KeyUsage, UsageBook};
use crate::rejection::CODES;

/// `request_history:` in the config. Read at start.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HistoryConfig {
    /// The requests kept per key, newest first, 0 to 100,000. `0` keeps none. Default 1,000.
    #[serde(default = "default_per_key")]
    pub per_key: u32,
    /// The requests kept over all keys, 0 to 100,000,000: 128 bytes each in memory (and a
    /// path past 54 bytes or a request id past 32 kept beside it).
    /// Default 1,000,000.
    #[serde(default = "default_max_total")]
    pub max_total: u64,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            per_key: default_per_key(),
            max_total: default_max_total(),
        }
    }
}

fn default_per_key() -> u32 {
    1000
}
fn default_max_total() -> u64 {
    1_000_000
}

/// The longest path an entry keeps, in bytes; longer ones are cut (on a character boundary).
const MAX_PATH: usize = 512;

/// The path bytes an entry holds inline: most API paths; a longer one goes to its spill.
const PATH_INLINE: usize = 54;

/// The request id bytes an entry holds inline: keygate's own ids (32 hex digits) and any
/// passed-on id as short; a longer one goes to its spill.
const ID_INLINE: usize = 32;

/// The methods an entry names by number (0 is another, kept in its spill).
const METHODS: [Method; 9] = [
    Method::GET,
    Method::POST,
    Method::PUT,
    Method::PATCH,
    Method::DELETE,
    Method::HEAD,
    Method::OPTIONS,
    Method::CONNECT,
    Method::TRACE,
];

/// One request made with a key, in two cache lines and with no allocation for the common
/// request: a standard method, a path of up to 54 bytes, a request id of up to 32. A ring
/// overwrites its oldest entry in place, so that recording a request writes these two
/// lines and frees nothing (the cost of the rings is their cache misses: PERFORMANCE.md).
#[derive(Debug, Clone, PartialEq, Eq)]
#[repr(align(64))]
pub struct Entry {
    /// Unix milliseconds.
    at_ms: i64,
    /// What does not fit inline: a long path or request id, another method.
    spill: Option<Box<Spill>>,
    ip: IpAddr,
    status: u16,
    /// 1 + the index of the refusal or gateway error code in [`CODES`]; 0 for none.
    code: u8,
    /// 1 + the index in [`METHODS`]; 0 for a method kept in the spill.
    method: u8,
    /// Bytes of `path` and `request_id` in use (when not spilled).
    path_len: u8,
    id_len: u8,
    path: [u8; PATH_INLINE],
    request_id: [u8; ID_INLINE],
}

const _: () = assert!(std::mem::size_of::<Entry>() == 128);

#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Spill {
    method: Option<Method>,
    path: Option<Box<str>>,
    request_id: Option<Box<str>>,
}

/// `text` inline when it fits in `N` bytes (with its length), else `None`.
fn inline<const N: usize>(text: &str) -> Option<([u8; N], u8)> {
    let mut bytes = [0u8; N];
    let len = u8::try_from(text.len()).ok()?;
    bytes
        .get_mut(..text.len())?
        .copy_from_slice(text.as_bytes());
    Some((bytes, len))
}

/// The text of `len` inline bytes (written from a `&str`, so valid UTF-8).
fn inline_str(bytes: &[u8], len: u8) -> &str {
    bytes
        .get(..usize::from(len))
        .and_then(|b| std::str::from_utf8(b).ok())
        .unwrap_or_default()
}

impl Entry {
    /// An entry for a request not yet answered (status 0), with its path cut to 512 bytes.
    pub fn new(
        at_ms: i64,
        ip: IpAddr,
        method: &Method,
        path: &str,
        request_id: &HeaderValue,
    ) -> Entry {
        let path = cut(path, MAX_PATH);
        let request_id = request_id.to_str().unwrap_or_default();
        let mut spill = Spill::default();
        let method = match METHODS.iter().position(|m| m == method) {
            Some(i) => u8::try_from(i.saturating_add(1)).unwrap_or(0),
            None => {
                spill.method = Some(method.clone());
                0
            }
        };
        let (path, path_len) = inline(path).unwrap_or_else(|| {
            spill.path = Some(path.into());
            ([0; PATH_INLINE], 0)
        });
        let (request_id, id_len) = inline(request_id).unwrap_or_else(|| {
            spill.request_id = Some(request_id.into());
            ([0; ID_INLINE], 0)
        });
        Entry {
            at_ms,
            spill: (spill != Spill::default()).then(|| Box::new(spill)),
            ip,
            status: 0,
            code: 0,
            method,
            path_len,
            id_len,
            path,
            request_id,
        }
    }

    /// The entry with the answer.
    pub fn answered(mut self, status: u16, code: Option<&'static str>) -> Entry {
        self.status = status;
        self.code = code
            .and_then(|c| CODES.iter().position(|k| *k == c))
            .and_then(|i| u8::try_from(i.saturating_add(1)).ok())
            .unwrap_or(0);
        self
    }

    /// Unix milliseconds.
    pub fn at_ms(&self) -> i64 {
        self.at_ms
    }

    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    pub fn status(&self) -> u16 {
        self.status
    }

    /// The refusal or gateway error code; `None` for the upstream's answer.
    pub fn code(&self) -> Option<&'static str> {
        CODES.get(usize::from(self.code).checked_sub(1)?).copied()
    }

    pub fn method(&self) -> &str {
        match (usize::from(self.method).checked_sub(1), &self.spill) {
            (Some(i), _) => METHODS.get(i).map_or("", Method::as_str),
            (None, Some(spill)) => spill.method.as_ref().map_or("", Method::as_str),
            (None, None) => "",
        }
    }

    /// Without the query.
    pub fn path(&self) -> &str {
        match self.spill.as_ref().and_then(|s| s.path.as_deref()) {
            Some(long) => long,
            None => inline_str(&self.path, self.path_len),
        }
    }

    pub fn request_id(&self) -> &str {
        match self.spill.as_ref().and_then(|s| s.request_id.as_deref()) {
            Some(long) => long,
            None => inline_str(&self.request_id, self.id_len),
        }
    }

    /// The entry as the API shows it.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "time": rfc3339_millis(self.at_ms),
            "ip": self.ip.to_string(),
            "method": self.method(),
            "path": self.path(),
            "status": self.status,
            "code": self.code(),
            "request_id": self.request_id(),
        })
    }
}

/// Unix milliseconds of `t`.
pub fn millis(t: std::time::SystemTime) -> i64 {
    match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(_) => 0,
    }
}

fn cut(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end = end.saturating_sub(1);
    }
    text.get(..end).unwrap_or_default()
}

fn rfc3339_millis(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH
        .checked_add(std::time::Duration::from_millis(
            u64::try_from(ms.max(0)).unwrap_or(0),
        ))
        .unwrap_or(std::time::UNIX_EPOCH);
    let mut text = Vec::with_capacity(24);
    crate::access_log::write_rfc3339_millis(&mut text, t);
    String::from_utf8(text).unwrap_or_default()
}

/// A key's ring. It grows one entry at a time while its bounds allow, then overwrites its
/// oldest entry in place: oldest to newest, the entries are `slots[next..]` then
/// `slots[..next]`.
#[derive(Debug, Default)]
pub struct Ring {
    slots: Vec<Entry>,
    /// The oldest entry once the ring has wrapped; 0 until then.
    next: usize,
    /// Entries at the newest end not yet in the journal.
    unflushed: usize,
}

impl Ring {
    fn len(&self) -> usize {
        self.slots.len()
    }

    /// Adds `entry` as the newest: in a new slot when `grow`, else over the oldest.
    fn push(&mut self, entry: Entry, grow: bool) {
        if grow || self.slots.is_empty() {
            if self.next == 0 {
                self.slots.push(entry);
            } else {
                self.slots.insert(self.next, entry);
                self.next = self.next.saturating_add(1);
            }
        } else if let Some(oldest) = self.slots.get_mut(self.next) {
            *oldest = entry;
            self.next = self
                .next
                .saturating_add(1)
                .checked_rem(self.slots.len())
                .unwrap_or(0);
        }
    }

    /// Oldest first.
    fn oldest_first(&self) -> impl DoubleEndedIterator<Item = &Entry> {
        let (newer, older) = self.slots.split_at(self.next.min(self.slots.len()));
        older.iter().chain(newer)
    }
}

/// The journal text a flush gathers before handing it to the file.
const TEXT_CHUNK: usize = 64 << 10;

/// The journal's line for one entry, as read back. Text borrows from the line unless it was
/// escaped (a path or request id with a quote or backslash).
#[derive(Debug, Deserialize)]
struct Line<'a> {
    #[serde(borrow)]
    key: Cow<'a, str>,
    t: i64,
    ip: IpAddr,
    #[serde(borrow)]
    m: Cow<'a, str>,
    #[serde(borrow)]
    p: Cow<'a, str>,
    s: u16,
    #[serde(borrow)]
    c: Option<Cow<'a, str>>,
    #[serde(borrow)]
    r: Cow<'a, str>,
}

/// Appends the journal's line for `key`'s `entry`, newline included: the fields of [`Line`],
/// written by hand with the access log's helpers, as every request's entry passes through
/// here once (serde_json's field by field serialising took about half of a flush's time).
/// Text is escaped as JSON, so a path or request id can never break a line.
fn write_line(out: &mut Vec<u8>, key: &str, e: &Entry) {
    out.extend_from_slice(b"{\"key\":\"");
    crate::access_log::escape_json(out, key);
    out.extend_from_slice(b"\",\"t\":");
    if e.at_ms < 0 {
        out.push(b'-');
    }
    crate::access_log::push_u64(out, e.at_ms.unsigned_abs());
    out.extend_from_slice(b",\"ip\":\"");
    crate::access_log::push_ip(out, e.ip);
    out.extend_from_slice(b"\",\"m\":\"");
    crate::access_log::escape_json(out, e.method());
    out.extend_from_slice(b"\",\"p\":\"");
    crate::access_log::escape_json(out, e.path());
    out.extend_from_slice(b"\",\"s\":");
    crate::access_log::push_u64(out, u64::from(e.status));
    match e.code() {
        Some(code) => {
            out.extend_from_slice(b",\"c\":\"");
            crate::access_log::escape_json(out, code);
            out.extend_from_slice(b"\",\"r\":\"");
        }
        None => out.extend_from_slice(b",\"c\":null,\"r\":\""),
    }
    crate::access_log::escape_json(out, e.request_id());
    out.extend_from_slice(b"\"}\n");
}

/// Every key's recent requests: the bounds, the count, the journal.
#[derive(Debug)]
pub struct History {
    per_key: usize,
    max_total: u64,
    /// Entries over all rings, give or take what housekeeping has not yet recounted.
    total: AtomicU64,
    journal: Option<PathBuf>,
    /// Lines in the journal, to know when to rewrite it.
    journal_lines: Mutex<u64>,
    /// Lines past twice the rings' entries that the journal may hold before a rewrite.
    slack: u64,
}

impl History {
    /// The history kept beside the usage file `usage_path` (none for a book kept in memory),
    /// with the rings `book`'s cells hold filled from the journal.
    pub fn open(config: &HistoryConfig, usage_path: Option<&Path>, book: &UsageBook) -> History {
        let history = History {
            per_key: usize::try_from(config.per_key).unwrap_or(usize::MAX),
            max_total: config.max_total,
            total: AtomicU64::new(0),
            journal: usage_path.map(journal_path),
            journal_lines: Mutex::new(0),
            slack: 10_000,
        };
        if let Some(path) = &history.journal {
            history.load(path, book);
        }
        history
    }

    /// Whether requests are kept at all (`request_history.per_key` above 0): the request
    /// path makes no entry otherwise.
    pub fn is_on(&self) -> bool {
        self.per_key > 0
    }

    /// Records a request made with the key whose cell is `usage`.
    pub fn record(&self, usage: &KeyUsage, entry: Entry) {
        if self.per_key == 0 {
            return;
        }
        let mut ring = usage.requests.lock().unwrap_or_else(|e| e.into_inner());
        self.push(&mut ring, entry);
        ring.unflushed = ring.unflushed.saturating_add(1).min(ring.len());
    }

    fn push(&self, ring: &mut Ring, entry: Entry) {
        let grow = ring.len() < self.per_key
            && (ring.len() == 0 || self.total.load(Ordering::Relaxed) < self.max_total);
        if grow {
            self.total.fetch_add(1, Ordering::Relaxed);
        }
        ring.push(entry, grow);
    }

    /// The key's requests from `since` to `until` (Unix milliseconds, both included) whose
    /// status `wanted` accepts, newest first, at most `limit`.
    pub fn of(
        usage: &KeyUsage,
        since: i64,
        until: i64,
        wanted: impl Fn(u16) -> bool,
        limit: usize,
    ) -> Vec<Entry> {
        let ring = usage.requests.lock().unwrap_or_else(|e| e.into_inner());
        ring.oldest_first()
            .rev()
            .filter(|e| (since..=until).contains(&e.at_ms) && wanted(e.status))
            .take(limit)
            .cloned()
            .collect()
    }

    /// Appends what was recorded since the last flush to the journal, and rewrites it whole
    /// when it has grown past twice what the rings hold. Blocking: housekeeping and shutdown.
    pub fn flush(&self, book: &UsageBook) -> io::Result<()> {
        let cells = book.all();
        // One pass counts every ring and notes those with entries to append, so that the
        // append visits only them.
        let mut total = 0usize;
        let mut pending = Vec::new();
        for (id, u) in &cells {
            let ring = u.requests.lock().unwrap_or_else(|e| e.into_inner());
            total = total.saturating_add(ring.len());
            if ring.unflushed > 0 {
                pending.push((id, u));
            }
        }
        self.total.store(total as u64, Ordering::Relaxed);
        let Some(path) = &self.journal else {
            return Ok(());
        };
        let mut lines = self.journal_lines.lock().unwrap_or_else(|e| e.into_inner());
        let whole = *lines > (total as u64).saturating_mul(2).saturating_add(self.slack);
        let visit: Vec<_> = if whole {
            cells.iter().map(|(id, u)| (id, u)).collect()
        } else {
            pending
        };
        // Each ring's lines go straight into the file's buffer: a flush never holds the
        // whole batch in memory, which at tens of thousands of requests a second would be
        // megabytes grown and copied, and fresh pages faulted in, every interval.
        let write = |out: &mut io::BufWriter<File>| -> io::Result<u64> {
            let mut written = 0u64;
            let mut text = Vec::with_capacity(TEXT_CHUNK.saturating_add(1024));
            for (id, usage) in &visit {
                let mut ring = usage.requests.lock().unwrap_or_else(|e| e.into_inner());
                let new = if whole { ring.len() } else { ring.unflushed };
                let skip = ring.len().saturating_sub(new);
                for e in ring.oldest_first().skip(skip) {
                    write_line(&mut text, id, e);
                    written = written.saturating_add(1);
                    if text.len() >= TEXT_CHUNK {
                        out.write_all(&text)?;
                        text.clear();
                    }
                }
                ring.unflushed = 0;
            }
            out.write_all(&text)?;
            Ok(written)
        };
        if whole {
            let mut written = 0;
            crate::keys::store::write_atomically_with(path, |out| {
                written = write(out)?;
                Ok(())
            })?;
            *lines = written;
        } else if !visit.is_empty() {
            let file = OpenOptions::new().create(true).append(true).open(path)?;
            let mut out = io::BufWriter::with_capacity(1 << 16, file);
            let written = write(&mut out)?;
            out.into_inner()
                .map_err(io::IntoInnerError::into_error)?
                .sync_data()?;
            *lines = lines.saturating_add(written);
        }
        Ok(())
    }

    fn load(&self, path: &Path, book: &UsageBook) {
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "the request history could not be read; starting without it");
                return;
            }
        };
        let cells = book.cells();
        let mut count = 0u64;
        let mut bad = 0u64;
        let mut last: Option<(String, Arc<KeyUsage>)> = None;
        for (n, line) in io::BufReader::new(file).lines().enumerate() {
            let Ok(line) = line else {
                bad = bad.saturating_add(1);
                break;
            };
            count = count.saturating_add(1);
            let Ok(l) = serde_json::from_str::<Line<'_>>(&line) else {
                // A line cut short by a crash, or damaged: skipped, and said.
                bad = bad.saturating_add(1);
                tracing::debug!(path = %path.display(), line = n.saturating_add(1), "skipped a request-history line that is not valid");
                continue;
            };
            let usage = match &last {
                Some((id, u)) if *id == l.key => Arc::clone(u),
                _ => {
                    let u = cells.get_or_make(&l.key);
                    last = Some((l.key.to_string(), Arc::clone(&u)));
                    u
                }
            };
            let code = l.c.and_then(|c| CODES.iter().copied().find(|k| *k == c));
            let (Ok(method), Ok(id)) = (
                Method::from_bytes(l.m.as_bytes()),
                HeaderValue::from_str(&l.r),
            ) else {
                bad = bad.saturating_add(1);
                continue;
            };
            let entry = Entry::new(l.t, l.ip, &method, &l.p, &id).answered(l.s, code);
            let mut ring = usage.requests.lock().unwrap_or_else(|e| e.into_inner());
            self.push(&mut ring, entry);
        }
        if bad > 0 {
            tracing::warn!(path = %path.display(), lines = bad, "request-history lines skipped: not valid JSON");
        }
        *self.journal_lines.lock().unwrap_or_else(|e| e.into_inner()) = count;
    }
}

/// The journal beside the usage file: `usage.json` → `usage.requests.jsonl`.
pub fn journal_path(usage_path: &Path) -> PathBuf {
    usage_path.with_extension("requests.jsonl")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(ms: i64, status: u16) -> Entry {
        let id = HeaderValue::from_static("r");
        Entry::new(ms, "10.0.0.1".parse().unwrap(), &Method::GET, "/x", &id).answered(status, None)
    }

    #[test]
    fn journal_lines_are_json_that_reads_back_as_written() {
        let long_path = format!("/{}", "p\"".repeat(40));
        let paths = [
            "/x",
            "/a\"b\\c",
            "/tab\there\u{1}\u{7f}",
            "/caf\u{e9}/\u{1F511}",
            &long_path,
        ];
        let ids = [
            HeaderValue::from_static("r"),
            HeaderValue::from_static("id \"quoted\" \\ back"),
            HeaderValue::from_str(&"9".repeat(70)).unwrap(),
        ];
        let ips: [IpAddr; 2] = [
            "203.0.113.9".parse().unwrap(),
            "2001:db8::1".parse().unwrap(),
        ];
        let methods = [Method::GET, Method::from_bytes(b"PURGE").unwrap()];
        let mut cases = Vec::new();
        for path in paths {
            for id in &ids {
                for ip in ips {
                    for method in &methods {
                        let ms = 7 * i64::try_from(cases.len()).unwrap() - 5;
                        cases.push(
                            Entry::new(ms, ip, method, path, id).answered(401, Some("unknown_key")),
                        );
                    }
                }
            }
        }
        let mut n = 0;
        for e in cases {
            for (key, e) in [("k\"1", e.clone()), ("ab12", e.answered(200, None))] {
                let mut out = Vec::new();
                write_line(&mut out, key, &e);
                assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
                assert_eq!(out.last(), Some(&b'\n'));
                let written: serde_json::Value = serde_json::from_slice(&out).unwrap();
                let expected = serde_json::json!({
                    "key": key, "t": e.at_ms(), "ip": e.ip(), "m": e.method(), "p": e.path(),
                    "s": e.status(), "c": e.code(), "r": e.request_id(),
                });
                assert_eq!(written, expected);
                let l: Line<'_> = serde_json::from_slice(&out).unwrap();
                assert_eq!(
                    (l.key.as_ref(), l.p.as_ref(), l.r.as_ref()),
                    (key, e.path(), e.request_id())
                );
                n += 1;
            }
        }
        assert_eq!(n, 5 * 3 * 2 * 2 * 2);
    }

    #[test]
    fn rings_are_bounded_per_key_and_over_all_keys() {
        let book = UsageBook::in_memory();
        let config = HistoryConfig {
            per_key: 5,
            max_total: 8,
        };
        let h = History::open(&config, None, &book);
        let cells = book.cells();
        let (a, b, c) = (
            cells.get_or_make("a"),
            cells.get_or_make("b"),
            cells.get_or_make("c"),
        );
        for i in 0..100_000 {
            h.record(&a, entry(i, 200));
        }
        let kept = History::of(&a, 0, i64::MAX, |_| true, usize::MAX);
        assert_eq!(kept.len(), 5, "per key");
        assert_eq!(kept[0].at_ms(), 99_999, "newest first");
        for i in 0..10 {
            h.record(&b, entry(i, 401));
        }
        assert_eq!(
            History::of(&b, 0, i64::MAX, |_| true, 9).len(),
            3,
            "8 in all"
        );
        h.record(&c, entry(1, 200));
        assert_eq!(
            History::of(&c, 0, i64::MAX, |_| true, 9).len(),
            1,
            "a used key keeps its last request even at the bound"
        );
        let only_4xx = History::of(&b, 8, 9, |s| (400..500).contains(&s), 9);
        assert_eq!(
            only_4xx.iter().map(Entry::at_ms).collect::<Vec<_>>(),
            [9, 8]
        );
        let long = Entry::new(
            0,
            "::1".parse().unwrap(),
            &Method::GET,
            &"é".repeat(400),
            &HeaderValue::from_static("r"),
        );
        assert_eq!(long.path(), "é".repeat(256));
    }

    /// What does not fit in an entry's two lines is kept whole beside it: a long path, a
    /// long request id, a method of the client's own.
    #[test]
    fn entries_keep_what_does_not_fit_inline() {
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let short = Entry::new(
            1,
            ip,
            &Method::PATCH,
            "/v1/a",
            &HeaderValue::from_static("r1"),
        )
        .answered(429, Some("rate_limited"));
        assert_eq!(
            (
                short.method(),
                short.path(),
                short.request_id(),
                short.code()
            ),
            ("PATCH", "/v1/a", "r1", Some("rate_limited"))
        );
        assert!(short.spill.is_none(), "nothing allocated");
        let path = format!("/v1/{}", "p".repeat(200));
        let id = "i".repeat(100);
        let purge = Method::from_bytes(b"PURGE").unwrap();
        let long = Entry::new(2, ip, &purge, &path, &HeaderValue::from_str(&id).unwrap())
            .answered(200, None);
        assert_eq!(
            (long.method(), long.path(), long.request_id(), long.code()),
            ("PURGE", path.as_str(), id.as_str(), None)
        );
        let exact = "x".repeat(PATH_INLINE);
        let at_edge = Entry::new(3, ip, &Method::GET, &exact, &HeaderValue::from_static("r"));
        assert_eq!(
            (at_edge.path(), at_edge.spill.is_none()),
            (exact.as_str(), true)
        );
    }

    /// A ring overwrites its oldest entry once full, keeps its order, and grows again in
    /// place when the bound over all keys makes room.
    #[test]
    fn a_ring_overwrites_its_oldest_in_order_and_grows_again() {
        let mut ring = Ring::default();
        for i in 0..7 {
            ring.push(entry(i, 200), i < 3);
        }
        let order = |ring: &Ring| ring.oldest_first().map(Entry::at_ms).collect::<Vec<_>>();
        assert_eq!(order(&ring), [4, 5, 6]);
        ring.push(entry(7, 200), true);
        assert_eq!(order(&ring), [4, 5, 6, 7]);
        ring.push(entry(8, 200), false);
        assert_eq!(order(&ring), [5, 6, 7, 8]);
    }

    #[test]
    fn the_journal_brings_the_rings_back_and_is_rewritten_when_it_grows() {
        let dir = tempfile::tempdir().unwrap();
        let usage_path = dir.path().join("usage.json");
        let config = HistoryConfig {
            per_key: 3,
            max_total: 100,
        };
        let book = UsageBook::in_memory();
        let mut h = History::open(&config, Some(&usage_path), &book);
        h.slack = 10;
        let a = book.cells().get_or_make("a");
        for i in 0..20_000 {
            h.record(&a, entry(i, 200));
            if i % 100 == 0 {
                h.flush(&book).unwrap();
            }
        }
        let id = HeaderValue::from_static("q");
        let last = Entry::new(20_000, "::1".parse().unwrap(), &Method::POST, "/y", &id);
        h.record(&a, last.answered(403, Some("scope_denied")));
        h.flush(&book).unwrap();
        let journal = std::fs::read_to_string(journal_path(&usage_path)).unwrap();
        assert!(
            journal.lines().count() <= 16,
            "rewritten, not grown without end"
        );
        // A crash mid-line leaves a torn last line: skipped.
        std::fs::write(
            journal_path(&usage_path),
            format!("{journal}{{\"key\":\"a\",\"t\""),
        )
        .unwrap();

        let book = UsageBook::in_memory();
        let h = History::open(&config, Some(&usage_path), &book);
        let a = book.cells().get_or_make("a");
        let back = History::of(&a, 0, i64::MAX, |_| true, 10);
        assert_eq!(
            back.iter().map(Entry::at_ms).collect::<Vec<_>>(),
            [20_000, 19_999, 19_998]
        );
        assert_eq!(back[0].code(), Some("scope_denied"));
        assert_eq!(back[0].ip(), "::1".parse::<IpAddr>().unwrap());
        let _ = h;
    }
}
