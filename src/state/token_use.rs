//! When each admin token was last used. A successful authentication notes the time in
//! memory (a map lookup under a lock: admin calls are few); housekeeping writes the book to
//! a small file beside the usage file when it changed, off the request path, so that it
//! survives a restart and `keygate tokens list` can show it. Tokens are named by the hex
//! SHA-256 they are stored as, never by the token. Each node keeps its own book.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// The book's default place: beside the usage file.
pub fn book_path(usage_file: &Path) -> PathBuf {
    usage_file.with_file_name("admin-tokens-used.json")
}

/// The file: each token's hash (`sha256:<hex>`) to the Unix second of its last use.
#[derive(Debug, Default, Serialize, Deserialize)]
struct BookFile {
    version: u32,
    last_used: BTreeMap<String, i64>,
}

/// Last uses by token hash, and whether they changed since the last flush.
#[derive(Debug, Default)]
pub struct TokenUse {
    path: Option<PathBuf>,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    last_used: BTreeMap<[u8; 32], i64>,
    dirty: bool,
}

impl TokenUse {
    /// A book kept in memory only.
    pub fn in_memory() -> Self {
        TokenUse::default()
    }

    /// Opens the book at `path`, with what an earlier run flushed. A missing file is an
    /// empty book; an unreadable one is logged and started afresh.
    pub fn open(path: PathBuf) -> Self {
        let last_used = read(&path)
            .into_iter()
            .filter_map(|(hash, at)| Some((crate::keys::parse_sha256(&hash).ok()?, at)))
            .collect();
        TokenUse {
            path: Some(path),
            inner: Mutex::new(Inner {
                last_used,
                dirty: false,
            }),
        }
    }

    /// Notes that the token with `hash` was used at `now`.
    pub fn used(&self, hash: &[u8; 32], now: i64) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let slot = inner.last_used.entry(*hash).or_insert(i64::MIN);
        if *slot < now {
            *slot = now;
            inner.dirty = true;
        }
    }

    /// When the token with `hash` was last used.
    pub fn last_used(&self, hash: &[u8; 32]) -> Option<i64> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.last_used.get(hash).copied()
    }

    /// Keeps only the tokens `keep` says exist (a revoked token's entry goes). Called as a
    /// snapshot is put in force, with that snapshot's tokens, so that a token made since a
    /// snapshot read earlier cannot lose its use.
    pub fn retain(&self, keep: impl Fn(&[u8; 32]) -> bool) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let before = inner.last_used.len();
        inner.last_used.retain(|hash, _| keep(hash));
        if inner.last_used.len() != before {
            inner.dirty = true;
        }
    }

    /// Writes the book if it changed. Blocking: for housekeeping.
    pub fn flush(&self) -> io::Result<()> {
        let bytes = {
            let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            if self.path.is_none() || !inner.dirty {
                return Ok(());
            }
            inner.dirty = false;
            let file = BookFile {
                version: 1,
                last_used: inner
                    .last_used
                    .iter()
                    .map(|(hash, at)| (format!("sha256:{}", crate::keys::hex(hash)), *at))
                    .collect(),
            };
            serde_json::to_vec(&file).map_err(io::Error::other)?
        };
        let Some(path) = &self.path else {
            return Ok(());
        };
        let written = crate::keys::store::write_atomically(path, &bytes);
        if written.is_err() {
            // Tried again at the next flush.
            self.inner.lock().unwrap_or_else(|e| e.into_inner()).dirty = true;
        }
        written
    }
}

/// The book at `path` as written: each token's `sha256:<hex>` to its last use. Empty when
/// there is none, or it cannot be read.
pub fn read(path: &Path) -> BTreeMap<String, i64> {
    match std::fs::read(path) {
        Ok(bytes) => match serde_json::from_slice::<BookFile>(&bytes) {
            Ok(file) => file.last_used,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "the admin tokens' last uses are unreadable; starting afresh");
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
    fn last_uses_survive_a_restart_and_revoked_tokens_leave() {
        let dir = tempfile::tempdir().unwrap();
        let path = book_path(&dir.path().join("usage.json"));
        let book = TokenUse::open(path.clone());
        let (a, b) = ([1u8; 32], [2u8; 32]);
        book.used(&a, 100);
        book.used(&a, 90);
        book.used(&b, 50);
        assert_eq!(book.last_used(&a), Some(100), "never goes back");
        book.flush().unwrap();
        let again = TokenUse::open(path.clone());
        assert_eq!(
            (again.last_used(&a), again.last_used(&b)),
            (Some(100), Some(50))
        );
        again.retain(|h| h == &a);
        again.flush().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(&crate::keys::hex(&a)) && !text.contains(&crate::keys::hex(&b)));
        assert_eq!(TokenUse::open(path).last_used(&b), None);
    }
}
