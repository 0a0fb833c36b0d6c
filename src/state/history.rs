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

use std::collections::VecDeque;
use std::fs::OpenOptions;
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
    /// The requests kept over all keys, 0 to 100,000,000: about 150 bytes each in memory.
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

/// One request made with a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Unix milliseconds.
    pub at_ms: i64,
    pub ip: IpAddr,
    pub method: Method,
    /// Without the query.
    pub path: Box<str>,
    pub status: u16,
    /// The refusal or gateway error code; `None` for the upstream's answer.
    pub code: Option<&'static str>,
    pub request_id: RequestId,
}

/// A request id, kept inline when it is keygate's own (32 hex digits), so that recording a
/// request allocates only its path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestId {
    Inline {
        len: u8,
        bytes: [u8; 32],
    },
    /// A longer id, passed on from a trusted proxy (up to 128 bytes).
    Long(Box<str>),
}

impl RequestId {
    fn of(value: &HeaderValue) -> RequestId {
        let text = value.to_str().unwrap_or_default();
        let mut bytes = [0u8; 32];
        match (bytes.get_mut(..text.len()), u8::try_from(text.len())) {
            (Some(slot), Ok(len)) => {
                slot.copy_from_slice(text.as_bytes());
                RequestId::Inline { len, bytes }
            }
            _ => RequestId::Long(text.into()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            RequestId::Inline { len, bytes } => bytes
                .get(..usize::from(*len))
                .and_then(|b| std::str::from_utf8(b).ok())
                .unwrap_or_default(),
            RequestId::Long(text) => text,
        }
    }
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
        Entry {
            at_ms,
            ip,
            method: method.clone(),
            path: cut(path, MAX_PATH).into(),
            status: 0,
            code: None,
            request_id: RequestId::of(request_id),
        }
    }

    /// The entry with the answer.
    pub fn answered(mut self, status: u16, code: Option<&'static str>) -> Entry {
        self.status = status;
        self.code = code;
        self
    }

    /// The entry as the API shows it.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "time": rfc3339_millis(self.at_ms),
            "ip": self.ip.to_string(),
            "method": self.method.as_str(),
            "path": &*self.path,
            "status": self.status,
            "code": self.code,
            "request_id": self.request_id.as_str(),
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

/// A key's ring: the newest entries at the back.
#[derive(Debug, Default)]
pub struct Ring {
    entries: VecDeque<Entry>,
    /// Entries at the back not yet in the journal.
    unflushed: usize,
}

/// The journal's line for one entry.
#[derive(Debug, Serialize, Deserialize)]
struct Line<'a> {
    key: &'a str,
    t: i64,
    ip: IpAddr,
    m: &'a str,
    p: &'a str,
    s: u16,
    c: Option<&'a str>,
    r: &'a str,
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
        ring.unflushed = ring.unflushed.saturating_add(1).min(ring.entries.len());
    }

    fn push(&self, ring: &mut Ring, entry: Entry) {
        let grow = ring.entries.len() < self.per_key
            && (ring.entries.is_empty() || self.total.load(Ordering::Relaxed) < self.max_total);
        if grow {
            self.total.fetch_add(1, Ordering::Relaxed);
        } else {
            ring.entries.pop_front();
        }
        ring.entries.push_back(entry);
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
        ring.entries
            .iter()
            .rev()
            .filter(|e| (since..=until).contains(&e.at_ms) && wanted(e.status))
            .take(limit)
            .cloned()
            .collect()
    }

    /// Appends what was recorded since the last flush to the journal, and rewrites it whole
    /// when it has grown past twice what the rings hold. Blocking: housekeeping and shutdown.
    pub fn flush(&self, book: &UsageBook) -> io::Result<()> {
        let cells = book.in_use();
        let total: usize = cells
            .iter()
            .map(|(_, u)| u.requests.lock().map_or(0, |r| r.entries.len()))
            .sum();
        self.total.store(total as u64, Ordering::Relaxed);
        let Some(path) = &self.journal else {
            return Ok(());
        };
        let mut lines = self.journal_lines.lock().unwrap_or_else(|e| e.into_inner());
        let whole = *lines > (total as u64).saturating_mul(2).saturating_add(self.slack);
        let mut text = Vec::new();
        let mut written = 0u64;
        for (id, usage) in &cells {
            let mut ring = usage.requests.lock().unwrap_or_else(|e| e.into_inner());
            let new = if whole {
                ring.entries.len()
            } else {
                ring.unflushed
            };
            let skip = ring.entries.len().saturating_sub(new);
            for e in ring.entries.iter().skip(skip) {
                let line = Line {
                    key: id,
                    t: e.at_ms,
                    ip: e.ip,
                    m: e.method.as_str(),
                    p: &e.path,
                    s: e.status,
                    c: e.code,
                    r: e.request_id.as_str(),
                };
                serde_json::to_writer(&mut text, &line).map_err(io::Error::other)?;
                text.push(b'\n');
                written = written.saturating_add(1);
            }
            ring.unflushed = 0;
        }
        if whole {
            crate::keys::store::write_atomically(path, &text)?;
            *lines = written;
        } else if !text.is_empty() {
            let mut file = OpenOptions::new().create(true).append(true).open(path)?;
            file.write_all(&text)?;
            file.sync_data()?;
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
                Some((id, u)) if id == l.key => Arc::clone(u),
                _ => {
                    let u = cells.get_or_make(l.key);
                    last = Some((l.key.to_string(), Arc::clone(&u)));
                    u
                }
            };
            let code = l.c.and_then(|c| CODES.iter().copied().find(|k| *k == c));
            let (Ok(method), Ok(id)) = (
                Method::from_bytes(l.m.as_bytes()),
                HeaderValue::from_str(l.r),
            ) else {
                bad = bad.saturating_add(1);
                continue;
            };
            let entry = Entry::new(l.t, l.ip, &method, l.p, &id).answered(l.s, code);
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
        assert_eq!(kept[0].at_ms, 99_999, "newest first");
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
        assert_eq!(only_4xx.iter().map(|e| e.at_ms).collect::<Vec<_>>(), [9, 8]);
        let long = Entry::new(
            0,
            "::1".parse().unwrap(),
            &Method::GET,
            &"é".repeat(400),
            &HeaderValue::from_static("r"),
        );
        assert_eq!(&*long.path, "é".repeat(256));
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
            back.iter().map(|e| e.at_ms).collect::<Vec<_>>(),
            [20_000, 19_999, 19_998]
        );
        assert_eq!(back[0].code, Some("scope_denied"));
        assert_eq!(back[0].ip, "::1".parse::<IpAddr>().unwrap());
        let _ = h;
    }
}
