//! The key store on disk: a YAML file with one key per line (each a JSON-style flow mapping,
//! which is valid YAML), so diffs and greps read well and an editor can change it by hand.
//!
//! Writes are atomic (temp file in the same folder, fsync, rename, fsync the folder), so a
//! reader sees the old store or the new one, never half of one. Writers hold an advisory lock
//! on `<store>.lock` for the whole read-modify-write, so two `keys create` at once both land.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::KeyRecord;
use crate::config::{parse_yaml, ConfigError};

/// The store's document.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StoreFile {
    /// Format version; this build writes and reads 1.
    #[serde(default = "current_version")]
    pub version: u32,
    #[serde(default)]
    pub keys: Vec<KeyRecord>,
}

impl Default for StoreFile {
    fn default() -> Self {
        StoreFile {
            version: current_version(),
            keys: Vec::new(),
        }
    }
}

fn current_version() -> u32 {
    1
}

/// A key store at a path.
#[derive(Debug, Clone)]
pub struct Store {
    path: PathBuf,
}

/// Held while a writer reads, changes and writes the store; dropping it unlocks.
#[derive(Debug)]
pub struct StoreLock {
    _file: File,
}

impl Store {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Store { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the store. A missing file is an empty store. Also returns the text read, so
    /// that later validation errors can be located in it.
    pub fn load(&self) -> Result<(StoreFile, String), Vec<ConfigError>> {
        let src = match fs::read_to_string(&self.path) {
            Ok(src) => src,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(vec![ConfigError::whole_file(&self.path, e.to_string())]),
        };
        let file: StoreFile = parse_yaml(&self.path, &src)?;
        if file.version != 1 {
            return Err(vec![ConfigError::whole_file(
                &self.path,
                format!(
                    "store version {} is not supported by this keygate (1)",
                    file.version
                ),
            )]);
        }
        Ok((file, src))
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
        let text = render(file)?;
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = self.path.file_name().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "the key store path has no file name",
            )
        })?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".tmp-{}", std::process::id()));
        let tmp = dir.join(tmp_name);
        let result = (|| {
            let mut f = OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .open(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            drop(f);
            fs::rename(&tmp, &self.path)?;
            File::open(&dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }
}

/// The store's text: a header, then one record per line.
pub fn render(file: &StoreFile) -> io::Result<String> {
    let mut out = String::with_capacity(128 + file.keys.len() * 320);
    out.push_str(
        "# keygate key store: one key per line. Only SHA-256 hashes of keys are stored.\n\
         # Written by `keygate keys` and the admin API; a running gateway reloads it on change.\n",
    );
    out.push_str(&format!("version: {}\n", file.version));
    if file.keys.is_empty() {
        out.push_str("keys: []\n");
        return Ok(out);
    }
    out.push_str("keys:\n");
    for record in &file.keys {
        out.push_str("- ");
        out.push_str(&serde_json::to_string(record).map_err(io::Error::other)?);
        out.push('\n');
    }
    Ok(out)
}
