//! The audit log: append-only JSON lines saying who did what to which key, when, from where,
//! and how it went. No secret ever appears in it: events name key ids and prefixes only.
//!
//! The gateway writes through a background thread, so the request path only ever hands over
//! a line without waiting. Failed authentications are sampled per client address and code
//! (at most N a minute each); the rest are counted and written as one summary line, so a
//! flood of bad keys cannot fill the disk.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};

use dashmap::DashMap;
use serde::{Deserialize, Serialize};

use crate::clock::rfc3339;
use crate::keys::KeyRecord;

/// One audit event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// RFC 3339.
    pub time: String,
    /// The admin token's name, `cli:<user>`, `gateway` or the reload's cause.
    pub actor: String,
    /// `key.created`, `key.revoked`, `auth.failed`, `config.reloaded`, …
    pub action: String,
    pub key_id: Option<String>,
    pub prefix: Option<String>,
    pub ip: Option<String>,
    /// `success` or `failure`.
    pub outcome: String,
    pub reason: Option<String>,
    /// For `key.created` by a rotation: the key it replaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotated_from: Option<String>,
}

impl AuditEvent {
    pub fn new(now: i64, actor: &str, action: &str) -> Self {
        AuditEvent {
            time: rfc3339(now),
            actor: actor.to_string(),
            action: action.to_string(),
            key_id: None,
            prefix: None,
            ip: None,
            outcome: "success".into(),
            reason: None,
            rotated_from: None,
        }
    }

    pub fn rotated_from(mut self, id: &str) -> Self {
        self.rotated_from = Some(id.to_string());
        self
    }

    pub fn key(mut self, record: &KeyRecord) -> Self {
        self.key_id = Some(record.id.clone());
        self.prefix = Some(record.prefix.clone()).filter(|p| !p.is_empty());
        self
    }

    pub fn key_id(mut self, id: &str) -> Self {
        self.key_id = Some(id.to_string());
        self
    }

    pub fn ip(mut self, ip: Option<IpAddr>) -> Self {
        self.ip = ip.map(|ip| ip.to_string());
        self
    }

    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    pub fn failed(mut self, reason: impl Into<String>) -> Self {
        self.outcome = "failure".into();
        self.reason = Some(reason.into());
        self
    }

    fn line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).unwrap_or_default();
        line.push(b'\n');
        line
    }
}

enum Msg {
    Line(Vec<u8>),
    Flush(mpsc::Sender<()>),
}

/// Sampling state of one (address, code) pair.
#[derive(Debug, Clone, Copy)]
struct Window {
    minute: i64,
    written: u32,
    suppressed: u64,
}

/// How many (address, code) pairs are sampled one by one; past it, failures are only
/// counted, so a flood from many addresses cannot grow memory without bound.
const MAX_SAMPLED_PAIRS: usize = 100_000;

/// The gateway's audit log.
#[derive(Debug)]
pub struct Audit {
    path: PathBuf,
    tx: SyncSender<Msg>,
    per_minute: u32,
    windows: DashMap<(IpAddr, &'static str), Window>,
    /// Failures not written because the sampling table was full.
    overflow: AtomicU64,
    /// Lines dropped because the writer fell behind.
    pub lost: AtomicU64,
}

impl Audit {
    /// Opens (creating) the log and starts its writer thread.
    pub fn open(path: PathBuf, per_minute: u32) -> io::Result<Audit> {
        let file = open_append(&path)?;
        let (tx, rx) = mpsc::sync_channel(16_384);
        std::thread::Builder::new()
            .name("keygate-audit".into())
            .spawn(move || writer(file, rx))?;
        Ok(Audit {
            path,
            tx,
            per_minute,
            windows: DashMap::new(),
            overflow: AtomicU64::new(0),
            lost: AtomicU64::new(0),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues an event; never blocks. If the writer has fallen 16,384 lines behind, the
    /// event is counted in `lost` instead.
    pub fn record(&self, event: &AuditEvent) {
        match self.tx.try_send(Msg::Line(event.line())) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.lost.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A refused authentication from the proxy, sampled per address and code.
    pub fn auth_failed(&self, now: i64, ip: IpAddr, code: &'static str, key_id: Option<&str>) {
        let minute = now.div_euclid(60);
        let write = {
            // A pair already sampled is found with one lookup; only a new one counts the
            // pairs (every shard of the map), to keep their number bounded.
            let mut w = match self.windows.get_mut(&(ip, code)) {
                Some(w) => w,
                None if self.windows.len() >= MAX_SAMPLED_PAIRS => {
                    self.overflow.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                None => self.windows.entry((ip, code)).or_insert(Window {
                    minute,
                    written: 0,
                    suppressed: 0,
                }),
            };
            if w.minute != minute {
                if w.suppressed > 0 {
                    self.record(&summary(w.minute, ip, code, w.suppressed));
                }
                *w = Window {
                    minute,
                    written: 0,
                    suppressed: 0,
                };
            }
            if w.written < self.per_minute {
                w.written = w.written.saturating_add(1);
                true
            } else {
                w.suppressed = w.suppressed.saturating_add(1);
                false
            }
        };
        if write {
            let mut event = AuditEvent::new(now, "gateway", "auth.failed")
                .ip(Some(ip))
                .failed(code);
            event.key_id = key_id.map(String::from);
            self.record(&event);
        }
    }

    /// Writes the summaries of sampling windows that have closed, and forgets them. The
    /// gateway calls this every few seconds.
    pub fn sweep(&self, now: i64) {
        let minute = now.div_euclid(60);
        let mut closed = Vec::new();
        self.windows.retain(|&(ip, code), w| {
            if w.minute >= minute {
                return true;
            }
            if w.suppressed > 0 {
                closed.push(summary(w.minute, ip, code, w.suppressed));
            }
            false
        });
        for event in &closed {
            self.record(event);
        }
        let overflow = self.overflow.swap(0, Ordering::Relaxed);
        if overflow > 0 {
            self.record(
                &AuditEvent::new(now, "gateway", "auth.failed")
                    .failed(format!("{overflow} failed authentications from too many addresses to sample one by one")),
            );
        }
    }

    /// Waits until every queued line is written and synced.
    pub fn flush(&self) {
        let (done, wait) = mpsc::channel();
        if self.tx.send(Msg::Flush(done)).is_ok() {
            let _ = wait.recv();
        }
    }
}

fn summary(minute: i64, ip: IpAddr, code: &str, suppressed: u64) -> AuditEvent {
    let start = minute.saturating_mul(60);
    AuditEvent::new(start.saturating_add(59), "gateway", "auth.failed")
        .ip(Some(ip))
        .failed(format!(
            "{code}: {suppressed} more from this address in the minute from {}",
            rfc3339(start)
        ))
}

fn open_append(path: &Path) -> io::Result<File> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    OpenOptions::new().create(true).append(true).open(path)
}

/// Writes lines as they come, syncing once per batch.
fn writer(mut file: File, rx: Receiver<Msg>) {
    while let Ok(first) = rx.recv() {
        let mut waiting = Vec::new();
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Line(line) => {
                    if let Err(e) = file.write_all(&line) {
                        tracing::error!(error = %e, "audit log write failed");
                    }
                }
                Msg::Flush(done) => waiting.push(done),
            }
            next = rx.try_recv().ok();
        }
        let _ = file.sync_data();
        for done in waiting {
            let _ = done.send(());
        }
    }
}

/// Appends one event synchronously, for the CLI (O_APPEND keeps concurrent writers' lines
/// whole).
pub fn append(path: &Path, event: &AuditEvent) -> io::Result<()> {
    let mut file = open_append(path)?;
    file.write_all(&event.line())?;
    file.sync_data()
}

/// What to read back.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub limit: usize,
    pub key_id: Option<String>,
    pub action: Option<String>,
    /// Unix seconds, both included.
    pub since: Option<i64>,
    pub until: Option<i64>,
}

/// How much of the end of the log `read` looks at.
const READ_TAIL: u64 = 32 << 20;

/// Events from the log, newest first, filtered. Reads the last 32 MiB at most.
pub fn read(path: &Path, filter: &Filter) -> io::Result<Vec<AuditEvent>> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    let start = len.saturating_sub(READ_TAIL);
    file.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    file.take(READ_TAIL).read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().skip(usize::from(start > 0)).collect();
    let mut events: Vec<AuditEvent> = lines
        .into_iter()
        .rev()
        .filter_map(|l| serde_json::from_str::<AuditEvent>(l).ok())
        .filter(|e| {
            filter
                .key_id
                .as_ref()
                .is_none_or(|k| e.key_id.as_ref() == Some(k))
        })
        .filter(|e| filter.action.as_ref().is_none_or(|a| &e.action == a))
        .filter(|e| {
            if filter.since.is_none() && filter.until.is_none() {
                return true;
            }
            let Ok(t) = crate::clock::parse_rfc3339(&e.time) else {
                return false;
            };
            filter.since.is_none_or(|s| t >= s) && filter.until.is_none_or(|u| t <= u)
        })
        .take(filter.limit)
        .collect();
    events.shrink_to_fit();
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_written_and_read_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let audit = Audit::open(path.clone(), 10).unwrap();
        audit.record(&AuditEvent::new(100, "ops", "key.created").key_id("a1"));
        audit.record(&AuditEvent::new(101, "ops", "key.revoked").key_id("a1"));
        audit.record(&AuditEvent::new(102, "ops", "key.created").key_id("b2"));
        audit.flush();
        append(
            &path,
            &AuditEvent::new(103, "cli:me", "key.disabled").key_id("b2"),
        )
        .unwrap();
        let all = read(
            &path,
            &Filter {
                limit: 10,
                ..Filter::default()
            },
        )
        .unwrap();
        assert_eq!(
            all.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(),
            ["key.disabled", "key.created", "key.revoked", "key.created"]
        );
        let a1 = read(
            &path,
            &Filter {
                limit: 10,
                key_id: Some("a1".into()),
                ..Filter::default()
            },
        )
        .unwrap();
        assert_eq!(a1.len(), 2);
        let created = read(
            &path,
            &Filter {
                limit: 1,
                action: Some("key.created".into()),
                ..Filter::default()
            },
        )
        .unwrap();
        assert_eq!(created[0].key_id.as_deref(), Some("b2"));
    }

    #[test]
    fn failed_authentications_are_sampled_with_a_summary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let audit = Audit::open(path.clone(), 3).unwrap();
        let ip: IpAddr = "198.51.100.7".parse().unwrap();
        let other: IpAddr = "198.51.100.8".parse().unwrap();
        for _ in 0..1000 {
            audit.auth_failed(600, ip, "unknown_key", None);
        }
        audit.auth_failed(600, other, "unknown_key", None);
        audit.auth_failed(600, ip, "expired_key", Some("k1"));
        audit.sweep(660);
        audit.flush();
        let events = read(
            &path,
            &Filter {
                limit: 100,
                ..Filter::default()
            },
        )
        .unwrap();
        assert_eq!(events.len(), 3 + 1 + 1 + 1, "{events:#?}");
        let summary = events
            .iter()
            .find(|e| e.reason.as_deref().unwrap_or("").contains("997 more"))
            .expect("a summary");
        assert_eq!(summary.ip.as_deref(), Some("198.51.100.7"));
        assert!(events.iter().any(|e| e.key_id.as_deref() == Some("k1")));
    }
}
