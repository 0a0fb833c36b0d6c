//! What each key has spent of its credits, outside any snapshot, and the journal that makes
//! the spending survive a crash.
//!
//! Spending is exact: a key's cell counts its spent credits with a compare-and-swap that
//! never passes the balance, so no more requests are admitted than there are credits,
//! however many run at once. Spending is durable by reservation: before the count passes
//! what the journal holds as spent, the journal is told first (a line written and synced),
//! with a lease on top so that a sync comes once per lease, not once per request. After a
//! crash or a restart every leased credit counts as spent. So a crash never hands credits
//! back; it can take away at most the unspent part of one lease per key: 1 % of the
//! balance, at least 1 and at most [`MAX_LEASE`].

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use serde::{Deserialize, Serialize};

use crate::policy::credits::{Balance, Credits};

/// The most credits one lease takes ahead of use.
pub const MAX_LEASE: u64 = 1_000;

/// Credits taken ahead of use at a time: 1 % of the balance, from 1 to [`MAX_LEASE`].
pub fn lease(budget: u64) -> u64 {
    (budget / 100).clamp(1, MAX_LEASE)
}

/// One key's spending in one period of one setting of its credits.
#[derive(Debug)]
struct Cell {
    /// Which setting of the key's credits, and the refill period: a new one starts afresh.
    version: u64,
    period: i64,
    spent: AtomicU64,
    /// What the journal holds as spent: spending past it writes the journal first.
    reserved: AtomicU64,
}

/// Where a key (or an identity) keeps its credits cell between requests, so that spending
/// finds it without the book's lock and lookup. The book still owns every cell: a slot only
/// holds one of them, and is checked against the setting and period on each use.
///
/// The first cell a slot is given stays, read with a plain load. A cell of a later refill
/// period replaces the one before it behind arc-swap, whose load costs two atomic writes.
#[derive(Debug, Default)]
#[repr(C)]
pub struct CellSlot {
    /// First, so that it shares the cache line of what comes before it in a key's extras.
    first: OnceLock<Arc<Cell>>,
    later: arc_swap::ArcSwapOption<Cell>,
}

impl CellSlot {
    /// How much of a slot, from its start, a request reads while its first cell serves.
    pub const READ: usize = std::mem::size_of::<OnceLock<Arc<Cell>>>();
}

/// A journal line: the reservation of one key's cell.
#[derive(Debug, Serialize, Deserialize)]
struct Line {
    id: String,
    version: u64,
    period: i64,
    reserved: u64,
}

/// Why credits were not spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// None left; the next refill, if there is one (Unix seconds).
    Exhausted { next_refill: Option<i64> },
    /// The journal could not be written, so spending could not be made durable.
    Unavailable,
}

type Cells = HashMap<String, Arc<Cell>, std::hash::BuildHasherDefault<super::IdHasher>>;

/// Every key's spent credits.
#[derive(Debug)]
pub struct CreditBook {
    /// By key id (or `@<identity>`), hashed by FNV-1a: ids are keygate's or the
    /// operator's, never a client's.
    cells: Mutex<Cells>,
    /// The journal (`None`: kept in memory only, for checks and benches), held while a line
    /// is written or the journal is compacted.
    journal: Option<Mutex<Journal>>,
}

#[derive(Debug)]
struct Journal {
    path: PathBuf,
    file: Option<File>,
    /// Lines written since the journal was last compacted.
    lines: u64,
}

impl Journal {
    fn append(&mut self, line: &Line) -> io::Result<()> {
        if self.file.is_none() {
            self.file = Some(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.path)?,
            );
        }
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::other("no journal"))?;
        let mut text = serde_json::to_vec(line).map_err(io::Error::other)?;
        text.push(b'\n');
        file.write_all(&text)?;
        file.sync_data()?;
        self.lines = self.lines.saturating_add(1);
        Ok(())
    }
}

impl CreditBook {
    /// A book that keeps nothing on disk.
    pub fn in_memory() -> Self {
        CreditBook {
            cells: Mutex::new(Cells::default()),
            journal: None,
        }
    }

    /// Opens the journal at `path`, counting every credit it reserved as spent. A missing
    /// journal is an empty book; lines that cannot be read are skipped with a warning (the
    /// last line of a crash may be half written).
    pub fn open(path: PathBuf) -> Self {
        let mut cells = Cells::default();
        let mut lines = 0u64;
        match File::open(&path) {
            Ok(file) => {
                for text in io::BufReader::new(file).lines() {
                    let Ok(text) = text else { break };
                    match serde_json::from_str::<Line>(&text) {
                        Ok(l) => {
                            cells.insert(
                                l.id,
                                Arc::new(Cell {
                                    version: l.version,
                                    period: l.period,
                                    spent: AtomicU64::new(l.reserved),
                                    reserved: AtomicU64::new(l.reserved),
                                }),
                            );
                            lines = lines.saturating_add(1);
                        }
                        Err(e) => {
                            tracing::warn!(path = %path.display(), error = %e, "a credits journal line cannot be read; skipped")
                        }
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "the credits journal cannot be read")
            }
        }
        CreditBook {
            cells: Mutex::new(cells),
            journal: Some(Mutex::new(Journal {
                path,
                file: None,
                lines,
            })),
        }
    }

    /// The key's cell for this setting and period, made afresh for a new one.
    fn cell(&self, id: &str, credits: &Credits, balance: &Balance) -> Arc<Cell> {
        let mut cells = self.cells.lock().unwrap_or_else(|e| e.into_inner());
        match cells.get(id) {
            Some(c) if c.version == credits.version && c.period == balance.period => Arc::clone(c),
            _ => {
                let c = Arc::new(Cell {
                    version: credits.version,
                    period: balance.period,
                    spent: AtomicU64::new(0),
                    reserved: AtomicU64::new(0),
                });
                cells.insert(id.to_string(), Arc::clone(&c));
                c
            }
        }
    }

    /// Spends `cost` of key `id`'s credits at `now`; returns what is left. `slot`, when
    /// given, keeps the cell for the next time. `id` is made text only when the cell must be
    /// found or the journal written, not on every spending (a key id checks its UTF-8 each
    /// time it becomes text).
    pub fn spend(
        &self,
        id: &dyn std::ops::Deref<Target = str>,
        credits: &Credits,
        cost: u64,
        now: i64,
        slot: Option<&CellSlot>,
    ) -> Result<u64, Refused> {
        let balance = credits.balance(now);
        let fits = |c: &&Cell| c.version == credits.version && c.period == balance.period;
        let first = slot.and_then(|s| s.first.get()).map(|c| &**c).filter(fits);
        // A later cell is read under arc-swap's guard, without a count of its own.
        let guard = slot.filter(|_| first.is_none()).map(|s| s.later.load());
        let later = guard.as_ref().and_then(|g| g.as_deref()).filter(fits);
        let made;
        let cell: &Cell = match first.or(later) {
            Some(c) => c,
            None => {
                made = self.cell(id, credits, &balance);
                if let Some(s) = slot {
                    if s.first.set(Arc::clone(&made)).is_err() {
                        s.later.store(Some(Arc::clone(&made)));
                    }
                }
                &made
            }
        };
        let exhausted = Refused::Exhausted {
            next_refill: balance.next_refill,
        };
        loop {
            let spent = cell.spent.load(Ordering::Acquire);
            let after = spent.checked_add(cost).ok_or(exhausted)?;
            if after > balance.budget {
                return Err(exhausted);
            }
            if after > cell.reserved.load(Ordering::Acquire) {
                self.reserve(id, cell, after, balance.budget)?;
            }
            if cell
                .spent
                .compare_exchange(spent, after, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return Ok(balance.budget.saturating_sub(after));
            }
        }
    }

    /// Gives back `cost` credits spent for a request a later check refused.
    pub fn refund(&self, id: &str, cost: u64) {
        let cell = self
            .cells
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned();
        if let Some(cell) = cell {
            let _ = cell
                .spent
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                    Some(s.saturating_sub(cost))
                });
        }
    }

    /// Makes the journal hold at least `needed` spent (plus a lease) before the count passes
    /// what it held. In memory only, the reservation is just the number.
    fn reserve(&self, id: &str, cell: &Cell, needed: u64, budget: u64) -> Result<(), Refused> {
        let target = needed.saturating_add(lease(budget)).min(budget);
        let Some(journal) = &self.journal else {
            cell.reserved.fetch_max(target, Ordering::AcqRel);
            return Ok(());
        };
        let mut journal = journal.lock().unwrap_or_else(|e| e.into_inner());
        if cell.reserved.load(Ordering::Acquire) >= needed {
            return Ok(());
        }
        let line = Line {
            id: id.to_string(),
            version: cell.version,
            period: cell.period,
            reserved: target,
        };
        if let Err(e) = journal.append(&line) {
            tracing::error!(error = %e, path = %journal.path.display(), "the credits journal cannot be written; refusing to spend credits");
            journal.file = None;
            return Err(Refused::Unavailable);
        }
        cell.reserved.fetch_max(target, Ordering::AcqRel);
        Ok(())
    }

    /// Credits spent by key `id` in the period of `now` under its current setting.
    pub fn spent(&self, id: &str, credits: &Credits, now: i64) -> u64 {
        let balance = credits.balance(now);
        self.cells
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .filter(|c| c.version == credits.version && c.period == balance.period)
            .map_or(0, |c| c.spent.load(Ordering::Acquire))
    }

    /// What key `id` has left at `now`.
    pub fn left(&self, id: &str, credits: &Credits, now: i64) -> u64 {
        credits
            .balance(now)
            .budget
            .saturating_sub(self.spent(id, credits, now))
    }

    /// A key's credits as the APIs show them: its stored `credits` with `remaining` made the
    /// balance left now, and `next_refill` (RFC 3339) when it has a refill.
    pub fn show(
        &self,
        id: &str,
        stored: &serde_json::Value,
        credits: &Credits,
        now: i64,
    ) -> serde_json::Value {
        let mut v = stored.clone();
        if let Some(o) = v.as_object_mut() {
            o.insert("remaining".into(), self.left(id, credits, now).into());
            if let Some(next) = credits.balance(now).next_refill {
                o.insert("next_refill".into(), crate::clock::rfc3339(next).into());
            }
        }
        v
    }

    /// Rewrites the journal with one line a key, atomically, once it has grown: by
    /// housekeeping, off the request path.
    pub fn compact(&self) -> io::Result<()> {
        let Some(journal) = &self.journal else {
            return Ok(());
        };
        let mut journal = journal.lock().unwrap_or_else(|e| e.into_inner());
        let cells = self.cells.lock().unwrap_or_else(|e| e.into_inner());
        let count = u64::try_from(cells.len()).unwrap_or(u64::MAX);
        if journal.lines <= count.saturating_mul(2).max(1_000) {
            return Ok(());
        }
        let cells: Vec<(String, Arc<Cell>)> = cells
            .iter()
            .map(|(id, c)| (id.clone(), Arc::clone(c)))
            .collect();
        Self::rewrite(&mut journal, &cells)
    }

    /// Writes one line a key, atomically, in place of the journal.
    fn rewrite(journal: &mut Journal, cells: &[(String, Arc<Cell>)]) -> io::Result<()> {
        let mut text = Vec::new();
        for (id, c) in cells {
            let line = Line {
                id: id.clone(),
                version: c.version,
                period: c.period,
                reserved: c.reserved.load(Ordering::Acquire),
            };
            text.extend(serde_json::to_vec(&line).map_err(io::Error::other)?);
            text.push(b'\n');
        }
        crate::keys::store::write_atomically(&journal.path, &text)?;
        journal.file = None;
        journal.lines = u64::try_from(cells.len()).unwrap_or(u64::MAX);
        Ok(())
    }

    /// The journal's path, if there is one.
    pub fn path(&self) -> Option<PathBuf> {
        self.journal
            .as_ref()
            .map(|j| j.lock().unwrap_or_else(|e| e.into_inner()).path.clone())
    }
}

/// The journal's default place: beside the usage file.
pub fn journal_path(usage_file: &Path) -> PathBuf {
    usage_file.with_file_name("credits.journal")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::credits::{Interval, Refill};

    fn credits(remaining: u64) -> Credits {
        Credits {
            remaining,
            set_at: 0,
            version: 1,
            refill: Some(Refill {
                amount: 5,
                interval: Interval::Daily,
            }),
        }
    }

    #[test]
    fn no_more_is_spent_than_there_is_even_at_once() {
        let book = Arc::new(CreditBook::in_memory());
        let c = credits(100);
        let admitted = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..50 {
                        if book.spend(&"k", &c, 1, 10, None).is_ok() {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(admitted.load(Ordering::Relaxed), 100);
        assert_eq!(
            book.spend(&"k", &c, 1, 10, None),
            Err(Refused::Exhausted {
                next_refill: Some(86_400)
            })
        );
        // The next day the refill's 5 are there; a new setting starts afresh.
        assert_eq!(book.spend(&"k", &c, 2, 86_400, None), Ok(3));
        let reset = Credits {
            set_at: 86_401,
            version: 2,
            remaining: 7,
            ..c
        };
        assert_eq!(book.spend(&"k", &reset, 1, 86_402, None), Ok(6));
        book.refund("k", 1);
        assert_eq!(book.left("k", &reset, 86_402), 7);
    }

    #[test]
    fn a_slot_follows_its_cell_across_refills_and_settings() {
        let book = CreditBook::in_memory();
        let slot = CellSlot::default();
        let c = credits(3);
        let spend = |c: &Credits, now| book.spend(&"k", c, 1, now, Some(&slot));
        // The first period's cell: kept in the slot from the first spending.
        assert_eq!(
            (spend(&c, 10), spend(&c, 11), spend(&c, 12)),
            (Ok(2), Ok(1), Ok(0))
        );
        assert!(spend(&c, 13).is_err());
        assert!(slot.first.get().is_some() && slot.later.load().is_none());
        // Each refill's period has a cell of its own, behind the first.
        for day in 1..4 {
            let now = day * 86_400 + 5;
            assert_eq!(spend(&c, now), Ok(4), "day {day}");
            assert_eq!(book.left("k", &c, now), 4, "day {day}");
            assert_eq!(slot.later.load().as_ref().map(|c| c.period), Some(day));
        }
        // A new setting counts afresh, in the book and in the slot.
        let reset = Credits {
            set_at: 5 * 86_400,
            version: 2,
            remaining: 10,
            ..c
        };
        assert_eq!(spend(&reset, 5 * 86_400 + 1), Ok(9));
        assert_eq!(spend(&reset, 5 * 86_400 + 2), Ok(8));
        assert_eq!(book.left("k", &reset, 5 * 86_400 + 2), 8);
    }

    #[test]
    fn a_restart_counts_every_leased_credit_as_spent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credits.journal");
        let c = Credits {
            remaining: 1_000,
            set_at: 0,
            version: 1,
            refill: None,
        };
        let book = CreditBook::open(path.clone());
        for _ in 0..25 {
            book.spend(&"k", &c, 1, 1, None).unwrap();
        }
        // 25 spent; the journal reserved in leases of 10 (1 % of 1,000).
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 3, "{text}");
        drop(book);
        let again = CreditBook::open(path.clone());
        let left = again.left("k", &c, 1);
        assert!(
            (1_000 - 25 - lease(1_000)..=1_000 - 25).contains(&left),
            "{left}"
        );
        // Leases of 10 reserved 1 + 10, then 12 + 10, then 23 + 10: 33 are counted spent.
        assert_eq!(
            left, 967,
            "the unspent part of the last lease is gone, no more"
        );
        // Compaction keeps a line a key, and the same state.
        {
            let cells: Vec<_> = again
                .cells
                .lock()
                .unwrap()
                .iter()
                .map(|(id, c)| (id.clone(), Arc::clone(c)))
                .collect();
            let mut journal = again.journal.as_ref().unwrap().lock().unwrap();
            CreditBook::rewrite(&mut journal, &cells).unwrap();
        }
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
        assert_eq!(CreditBook::open(path).left("k", &c, 1), 967);
    }
}
