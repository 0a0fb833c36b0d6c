//! The last stage: note that a key was used. On the request path this is one atomic store
//! and a lock that is only ever tried, never waited on. The book of every key's usage lives
//! outside the snapshot, keyed by key id, and is flushed atomically to the usage file every
//! few seconds and at shutdown, so it survives restarts and the CLI can read it.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::keys::LastUse;

/// One key's usage. A key is "used" whenever it is presented and identified, whether or not
/// the request is then allowed: that is what tells an operator a key is still out there.
#[derive(Debug, Default)]
pub struct KeyUsage {
    /// Unix seconds; 0 for never.
    last_used: AtomicI64,
    last_ip: Mutex<Option<IpAddr>>,
}

impl KeyUsage {
    /// Records a use. Never blocks: if another request holds the address slot, this one's
    /// address is skipped, as both are equally recent.
    pub fn record(&self, now: i64, ip: IpAddr) {
        self.last_used.store(now, Ordering::Relaxed);
        if let Ok(mut slot) = self.last_ip.try_lock() {
            *slot = Some(ip);
        }
    }

    pub fn last_use(&self) -> Option<LastUse> {
        match self.last_used.load(Ordering::Relaxed) {
            0 => None,
            at => Some(LastUse {
                at,
                ip: self
                    .last_ip
                    .lock()
                    .ok()
                    .and_then(|g| g.map(|ip| ip.to_string())),
            }),
        }
    }

    fn restore(last: &LastUse) -> Self {
        KeyUsage {
            last_used: AtomicI64::new(last.at),
            last_ip: Mutex::new(last.ip.as_deref().and_then(|s| s.parse().ok())),
        }
    }
}

/// The usage file's document.
#[derive(Debug, Default, Serialize, Deserialize)]
struct UsageFile {
    version: u32,
    keys: BTreeMap<String, LastUse>,
}

/// Every key's usage, by key id.
#[derive(Debug)]
pub struct UsageBook {
    path: Option<PathBuf>,
    by_id: Mutex<HashMap<String, Arc<KeyUsage>>>,
    flushed: Mutex<BTreeMap<String, LastUse>>,
}

impl UsageBook {
    /// A book that is never written anywhere (checks, benches).
    pub fn in_memory() -> Self {
        UsageBook {
            path: None,
            by_id: Mutex::new(HashMap::new()),
            flushed: Mutex::new(BTreeMap::new()),
        }
    }

    /// Opens the book at `path`, loading what an earlier run flushed. A missing file is an
    /// empty book; an unreadable one is logged and started afresh.
    pub fn open(path: PathBuf) -> Self {
        let loaded = read_file(&path);
        let by_id = loaded
            .iter()
            .map(|(id, last)| (id.clone(), Arc::new(KeyUsage::restore(last))))
            .collect();
        UsageBook {
            path: Some(path),
            by_id: Mutex::new(by_id),
            flushed: Mutex::new(loaded),
        }
    }

    /// The usage cell of a key, made on first sight.
    pub fn for_key(&self, id: &str) -> Arc<KeyUsage> {
        let mut map = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(id.to_string()).or_default().clone()
    }

    pub fn last_use(&self, id: &str) -> Option<LastUse> {
        let map = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
        map.get(id).and_then(|u| u.last_use())
    }

    /// Forgets keys no longer in the store.
    pub fn retain(&self, live: impl Fn(&str) -> bool) {
        let mut map = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|id, _| live(id));
    }

    /// Writes the book out (temp file, fsync, rename) if it changed since the last flush.
    pub fn flush(&self) -> io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let current: BTreeMap<String, LastUse> = {
            let map = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
            map.iter()
                .filter_map(|(id, u)| u.last_use().map(|l| (id.clone(), l)))
                .collect()
        };
        let mut flushed = self.flushed.lock().unwrap_or_else(|e| e.into_inner());
        if *flushed == current {
            return Ok(());
        }
        let doc = UsageFile {
            version: 1,
            keys: current,
        };
        crate::keys::store::write_atomically(
            path,
            &serde_json::to_vec(&doc).map_err(io::Error::other)?,
        )?;
        *flushed = doc.keys;
        Ok(())
    }
}

/// Reads a usage file as flushed by a gateway; missing or unreadable gives an empty map.
pub fn read_file(path: &Path) -> BTreeMap<String, LastUse> {
    match std::fs::read(path) {
        Ok(bytes) => match serde_json::from_slice::<UsageFile>(&bytes) {
            Ok(doc) => doc.keys,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "usage file unreadable; starting afresh");
                BTreeMap::new()
            }
        },
        Err(_) => BTreeMap::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_survives_a_flush_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.json");
        let book = UsageBook::open(path.clone());
        assert!(book.last_use("k1").is_none());
        book.for_key("k1")
            .record(1_700_000_000, "10.1.2.3".parse().unwrap());
        book.flush().unwrap();
        let reopened = UsageBook::open(path.clone());
        assert_eq!(
            reopened.last_use("k1"),
            Some(LastUse {
                at: 1_700_000_000,
                ip: Some("10.1.2.3".into())
            })
        );
        assert_eq!(read_file(&path).len(), 1);
        reopened.retain(|_| false);
        assert!(reopened.last_use("k1").is_none());
    }

    #[test]
    fn a_corrupt_file_starts_afresh() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.json");
        std::fs::write(&path, b"{not json").unwrap();
        assert!(UsageBook::open(path).last_use("x").is_none());
    }
}
