//! What one write transaction sees of the key store, whatever its kind: the lifecycle asks
//! for single records and counts, and writes whole records, so that a store with indexes
//! (SQLite) answers each in O(log n), and a store kept as one document (the file, Redis)
//! edits that document in memory before it is written back.

use std::collections::HashMap;

use super::{KeyError, KeyRecord};
use crate::keys::StoreFile;

/// The records of one write transaction. Keys are never deleted, only revoked.
pub trait Records {
    /// The record with this id.
    fn get(&mut self, id: &str) -> Result<Option<KeyRecord>, KeyError>;

    /// The id of the key whose hash (`sha256:<hex>`) this is.
    fn hash_owner(&mut self, hash: &str) -> Result<Option<String>, KeyError>;

    /// How many keys of `namespace` count toward its tier at `now`: neither revoked nor
    /// expired.
    fn counted(&mut self, namespace: &str, now: i64) -> Result<usize, KeyError>;

    /// Writes `record`: it replaces the record with its id, or joins the store. Callers
    /// check first that no other record has its hash.
    fn put(&mut self, record: KeyRecord) -> Result<(), KeyError>;

    fn id_taken(&mut self, id: &str) -> Result<bool, KeyError> {
        Ok(self.get(id)?.is_some())
    }
}

/// [`Records`] over a whole store document in memory. Single lookups scan; the first
/// lookup by hash indexes the document, as bulk writes (import, load) make many.
pub struct DocumentRecords<'f> {
    file: &'f mut StoreFile,
    /// Position by id and id by hash, built on the first lookup by hash.
    index: Option<(HashMap<String, usize>, HashMap<String, String>)>,
}

impl<'f> DocumentRecords<'f> {
    pub fn new(file: &'f mut StoreFile) -> Self {
        DocumentRecords { file, index: None }
    }

    fn position(&self, id: &str) -> Option<usize> {
        match &self.index {
            Some((at, _)) => at.get(id).copied(),
            None => self.file.keys.iter().position(|r| r.id == id),
        }
    }

    fn index(&mut self) -> &mut (HashMap<String, usize>, HashMap<String, String>) {
        let keys = &self.file.keys;
        self.index.get_or_insert_with(|| {
            let at = keys
                .iter()
                .enumerate()
                .map(|(i, r)| (r.id.clone(), i))
                .collect();
            let owners = keys
                .iter()
                .map(|r| (r.hash.clone(), r.id.clone()))
                .collect();
            (at, owners)
        })
    }
}

impl Records for DocumentRecords<'_> {
    fn get(&mut self, id: &str) -> Result<Option<KeyRecord>, KeyError> {
        Ok(self
            .position(id)
            .and_then(|i| self.file.keys.get(i))
            .cloned())
    }

    fn hash_owner(&mut self, hash: &str) -> Result<Option<String>, KeyError> {
        Ok(self.index().1.get(hash).cloned())
    }

    fn counted(&mut self, namespace: &str, now: i64) -> Result<usize, KeyError> {
        Ok(self
            .file
            .keys
            .iter()
            .filter(|r| r.namespace == namespace && r.counts_toward_limit(now))
            .count())
    }

    fn put(&mut self, record: KeyRecord) -> Result<(), KeyError> {
        let at = self.position(&record.id);
        if let Some((positions, owners)) = &mut self.index {
            if let Some(old) = at.and_then(|i| self.file.keys.get(i)) {
                if owners.get(&old.hash) == Some(&old.id) {
                    owners.remove(&old.hash);
                }
            }
            owners.insert(record.hash.clone(), record.id.clone());
            if at.is_none() {
                positions.insert(record.id.clone(), self.file.keys.len());
            }
        }
        match at.and_then(|i| self.file.keys.get_mut(i)) {
            Some(slot) => *slot = record,
            None => self.file.keys.push(record),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::tests::record;

    #[test]
    fn a_document_answers_the_same_before_and_after_it_is_indexed() {
        let hashed = |id: &str, hash: &str| KeyRecord {
            hash: hash.into(),
            ..record(id)
        };
        let mut file = StoreFile {
            keys: vec![
                hashed("aaaa1111", "sha256:aa"),
                hashed("bbbb2222", "sha256:bb"),
            ],
            ..StoreFile::default()
        };
        let hash_b = "sha256:bb";
        let mut records = DocumentRecords::new(&mut file);
        assert!(records.id_taken("aaaa1111").unwrap());
        assert!(!records.id_taken("cccc3333").unwrap());
        assert_eq!(
            records.hash_owner(hash_b).unwrap().as_deref(),
            Some("bbbb2222")
        );
        let mut changed = hashed("bbbb2222", "sha256:00");
        changed.name = "renamed".into();
        records.put(changed).unwrap();
        records.put(hashed("cccc3333", "sha256:cc")).unwrap();
        assert_eq!(records.hash_owner(hash_b).unwrap(), None);
        assert_eq!(
            records.hash_owner("sha256:00").unwrap().as_deref(),
            Some("bbbb2222")
        );
        assert_eq!(records.get("bbbb2222").unwrap().unwrap().name, "renamed");
        assert!(records.id_taken("cccc3333").unwrap());
        assert_eq!(file.keys.len(), 3);
    }
}
