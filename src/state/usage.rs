//! What a key did: its usage cell, counted at the end of the request spine. On the request
//! path this is a handful of atomic increments on the key's own cell, and a lock that is
//! only ever tried, never waited on. "Today", the per-minute series and persistence are derived off the request path by
//! [`UsageBook::tick`], which the gateway's housekeeping calls every few seconds: it records
//! each counter's value at the start of the day and of the minute, and the deltas.
//!
//! The book lives outside the snapshot, keyed by key id, and is made durable every few
//! seconds and at shutdown, so a crash loses at most one interval: the keys whose figures
//! moved are appended to a journal beside the usage file and synced, and the file is
//! rewritten atomically, retiring the journal, when the journal has grown to its size
//! ([`UsageBook::flush`]). A flush costs what the keys in use cost, whatever the key count.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher as _};
use std::io::{self, Read as _, Seek as _, Write as _};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use http::HeaderValue;
use serde::{Deserialize, Serialize};

use crate::clock::rfc3339;
use crate::keys::LastUse;
use crate::rejection::{Rejection, CODES};
use crate::state::IdHasher;

/// Counter slots: the outcome classes, then one per refusal code.
const ACCEPTED: usize = 0;
const REFUSED: usize = 1;
const UPSTREAM_4XX: usize = 2;
const UPSTREAM_5XX: usize = 3;
/// Admitted, but the gateway answered an error itself (413, 502, 504).
const FAILED: usize = 4;
const BY_CODE: usize = 5;
pub(crate) const SLOTS: usize = BY_CODE + CODES.len();
/// Minutes of per-minute history kept.
const SERIES_MINUTES: i64 = 24 * 60;
/// The pseudo-key under which refusals that never identified a key are counted.
pub const ANONYMOUS: &str = "*";

/// [`KeyUsage`]'s mark for the usage file: the cell moved since a flush last saved it.
const UNSAVED: u8 = 1;
/// [`KeyUsage`]'s mark for the Redis push: the cell moved since the push last sent it.
const UNPUSHED: u8 = 2;

/// One key's usage.
#[derive(Debug)]
pub struct KeyUsage {
    /// The key's id as a header value (`X-Keygate-Key-Id`), made with the cell on the key's
    /// first use, so that forwarding never allocates it.
    id_header: HeaderValue,
    /// Unix seconds; 0 for never.
    last_used: AtomicI64,
    /// `last_ip` as [`ip_mark`] gives it, read without the lock; 0 for none.
    last_mark: AtomicU64,
    last_ip: Mutex<Option<IpAddr>>,
    /// The quota period the count below belongs to.
    quota_period: AtomicI64,
    quota_used: AtomicU64,
    /// Made on first use, so keys that are never used cost little.
    counts: OnceLock<Box<Counts>>,
    /// The minute (since the epoch) of the last [`KeyUsage::tick`], so that the next in the
    /// same minute returns without reading the history from another cache line.
    ticked: AtomicI64,
    /// Whether a count, the quota or the last use moved since a flush last saved the cell
    /// ([`UNSAVED`]), and since the Redis push last sent it ([`UNPUSHED`]): each reads its
    /// bit, on the cell's first line, instead of comparing every counter.
    dirty: AtomicU8,
    /// The key's recent requests ([`super::history`]); empty until it is used.
    pub(crate) requests: Mutex<super::history::Ring>,
}

#[derive(Debug)]
struct Counts {
    totals: [AtomicU64; SLOTS],
    /// Touched by housekeeping and readers only, never by the request path.
    history: Mutex<History>,
    /// The cell as the usage file last had it, when this process read or wrote it.
    synced: Mutex<Synced>,
}

/// A cell's figures as the usage file last had them: what another process added since is
/// the file's less these.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Synced {
    totals: Vec<u64>,
    /// The quota period and its count.
    quota: (i64, u64),
}

impl Default for Synced {
    fn default() -> Self {
        Synced {
            totals: vec![0; SLOTS],
            quota: (0, 0),
        }
    }
}

impl Default for Counts {
    fn default() -> Self {
        Counts {
            totals: std::array::from_fn(|_| AtomicU64::new(0)),
            history: Mutex::new(History::default()),
            synced: Mutex::default(),
        }
    }
}

/// Baselines and the per-minute series, kept by [`UsageBook::tick`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct History {
    /// The UTC day (days since the epoch) `day_base` belongs to.
    day: i64,
    day_base: Vec<u64>,
    /// The minute (since the epoch) `minute_base` belongs to.
    minute: i64,
    minute_base: Vec<u64>,
    /// Completed minutes with traffic, oldest first, at most a day's worth.
    series: VecDeque<Minute>,
}

/// Traffic in one minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Minute {
    /// Minutes since the epoch.
    pub minute: i64,
    pub accepted: u64,
    pub refused: u64,
    /// Admitted, then answered 4xx/5xx by the upstream or failed on the way (413, 502, 504).
    pub errors: u64,
}

impl Minute {
    fn has_traffic(&self) -> bool {
        self.accepted > 0 || self.refused > 0 || self.errors > 0
    }
}

/// An IPv4 address (or an IPv6 one that maps one) as a non-zero word, so that [`KeyUsage::seen`]
/// can tell it from the last one without a lock; 0 for any other IPv6 address, which is
/// always written.
fn ip_mark(ip: IpAddr) -> u64 {
    let (kind, v4) = match ip {
        IpAddr::V4(v4) => (1 << 32, v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => (1 << 33, v4),
            None => return 0,
        },
    };
    kind | u64::from(u32::from(v4))
}

impl Default for KeyUsage {
    fn default() -> Self {
        KeyUsage::for_key("")
    }
}

impl KeyUsage {
    /// A new cell for the key with this id.
    pub fn for_key(id: &str) -> Self {
        KeyUsage {
            // Ids are hex digits: always a header value.
            id_header: HeaderValue::from_str(id).unwrap_or_else(|_| HeaderValue::from_static("")),
            last_used: AtomicI64::new(0),
            last_mark: AtomicU64::new(0),
            last_ip: Mutex::new(None),
            quota_period: AtomicI64::new(0),
            quota_used: AtomicU64::new(0),
            counts: OnceLock::new(),
            ticked: AtomicI64::new(i64::MIN),
            dirty: AtomicU8::new(0),
            requests: Mutex::default(),
        }
    }

    /// The key's id as a header value.
    pub fn id_header(&self) -> &HeaderValue {
        &self.id_header
    }

    /// Notes that the key was presented from `ip` at `now`. A key is "used" whenever it is
    /// presented and identified, even if a later check refuses the request.
    ///
    /// A key seen again in the same second from the same IPv4 address (the usual case for a
    /// busy key) is not written at all: the two loads cost less than the store, the lock's
    /// two atomic operations and the wait for earlier stores that those make.
    pub fn seen(&self, now: i64, ip: IpAddr) {
        let mark = ip_mark(ip);
        if mark != 0
            && self.last_used.load(Ordering::Relaxed) == now
            && self.last_mark.load(Ordering::Relaxed) == mark
        {
            return;
        }
        self.last_used.store(now, Ordering::Relaxed);
        self.last_mark.store(mark, Ordering::Relaxed);
        if let Ok(mut slot) = self.last_ip.try_lock() {
            *slot = Some(ip);
        }
        self.mark_dirty();
    }

    /// Notes that the cell moved since a flush last saved it. The count it follows is a
    /// sequentially consistent read-modify-write, and this load too (on x86 both are the
    /// instructions a relaxed one would be), so that a flush that cleared the mark before
    /// this load saw it set reads that count in its save ([`KeyUsage::take_dirty`]).
    fn mark_dirty(&self) {
        self.mark(UNSAVED | UNPUSHED);
    }

    /// Sets the marks `bits`, with one load when they are set already.
    fn mark(&self, bits: u8) {
        if self.dirty.load(Ordering::SeqCst) & bits != bits {
            self.dirty.fetch_or(bits, Ordering::SeqCst);
        }
    }

    fn is_dirty(&self) -> bool {
        self.dirty.load(Ordering::SeqCst) & UNSAVED != 0
    }

    /// Whether the cell moved since the last call, clearing the mark. Called before the
    /// cell is saved: a count that lands after it marks the cell again.
    fn take_dirty(&self) -> bool {
        self.dirty.fetch_and(!UNSAVED, Ordering::SeqCst) & UNSAVED != 0
    }

    /// [`KeyUsage::take_dirty`] for the Redis push (`crate::shared_usage`): whether the
    /// cell moved since the push last took the mark. Read the counts after it.
    /// An unmarked cell, nearly every cell of a large book, costs one load.
    fn take_unpushed(&self) -> bool {
        self.dirty.load(Ordering::SeqCst) & UNPUSHED != 0
            && self.dirty.fetch_and(!UNPUSHED, Ordering::SeqCst) & UNPUSHED != 0
    }

    /// Marks the cell for the next Redis push again, when this one failed.
    pub(crate) fn mark_unpushed(&self) {
        self.mark(UNPUSHED);
    }

    fn counts(&self) -> &Counts {
        self.counts.get_or_init(Box::default)
    }

    fn add(&self, slot: usize) {
        if let Some(total) = self.counts().totals.get(slot) {
            total.fetch_add(1, Ordering::SeqCst);
        }
        self.mark_dirty();
    }

    fn add_code(&self, rejection: &Rejection) {
        self.add(BY_CODE.saturating_add(rejection.index()));
    }

    /// The gateway refused the request before forwarding it.
    pub fn refused(&self, rejection: &Rejection) {
        self.add(REFUSED);
        self.add_code(rejection);
    }

    /// The request passed every check.
    pub fn accepted(&self) {
        self.add(ACCEPTED);
    }

    /// An admitted request's outcome: the upstream's status, or the gateway's own error.
    pub fn outcome(&self, status: u16, gateway_error: Option<&Rejection>) {
        match gateway_error {
            Some(r) => {
                self.add(FAILED);
                self.add_code(r);
            }
            None if (400..500).contains(&status) => self.add(UPSTREAM_4XX),
            None if status >= 500 => self.add(UPSTREAM_5XX),
            None => {}
        }
    }

    /// Requests counted against the quota in `period` so far, starting the period afresh if
    /// it is a new one.
    pub fn quota_used(&self, period: i64) -> u64 {
        let current = self.quota_period.load(Ordering::Acquire);
        if current != period
            && self
                .quota_period
                .compare_exchange(current, period, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.quota_used.store(0, Ordering::Release);
        }
        self.quota_used.load(Ordering::Acquire)
    }

    /// Counts one request against the quota; returns the count including it.
    pub fn quota_spend(&self) -> u64 {
        let used = self.quota_used.fetch_add(1, Ordering::SeqCst);
        self.mark_dirty();
        used.saturating_add(1)
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

    fn totals(&self) -> Option<Vec<u64>> {
        self.counts
            .get()
            .map(|c| c.totals.iter().map(|t| t.load(Ordering::SeqCst)).collect())
    }

    /// Rolls the day and minute baselines forward to `now`, recording the minute just ended.
    /// Counts between the last tick and a boundary are attributed to the later side, so
    /// "today" and the series are exact to within one housekeeping interval.
    fn tick(&self, now: i64) {
        let (day, minute) = (now.div_euclid(86_400), now.div_euclid(60));
        // Most ticks fall in the minute of the one before: nothing rolls.
        if self.ticked.load(Ordering::Relaxed) == minute {
            return;
        }
        let Some(counts) = self.counts.get() else {
            return;
        };
        let mut h = counts.history.lock().unwrap_or_else(|e| e.into_inner());
        self.ticked.store(minute, Ordering::Relaxed);
        let started = h.minute_base.len() == SLOTS && h.day_base.len() == SLOTS;
        if started && h.minute == minute && h.day == day {
            return;
        }
        let totals: Vec<u64> = counts
            .totals
            .iter()
            .map(|t| t.load(Ordering::Relaxed))
            .collect();
        if !started {
            // The first tick of a new cell: everything so far belongs to this minute and day.
            *h = History {
                day,
                day_base: vec![0; SLOTS],
                minute,
                minute_base: vec![0; SLOTS],
                series: VecDeque::new(),
            };
        }
        if h.minute != minute {
            let delta = minute_of(h.minute, &totals, &h.minute_base);
            if delta.has_traffic() {
                h.series.push_back(delta);
            }
            h.minute = minute;
            h.minute_base = totals.clone();
        }
        if h.day != day {
            h.day = day;
            h.day_base = totals;
        }
        while h
            .series
            .front()
            .is_some_and(|m| m.minute <= minute.saturating_sub(SERIES_MINUTES))
        {
            h.series.pop_front();
        }
    }

    /// Today's figures, the last 24 hours' series, and the last use.
    pub fn report(&self, now: i64) -> UsageReport {
        let totals = self.totals().unwrap_or_else(|| vec![0; SLOTS]);
        let (day_base, series, current) = match self.counts.get() {
            Some(c) => {
                let h = c.history.lock().unwrap_or_else(|e| e.into_inner());
                // Before the first tick of a new day, the last baseline is the nearest.
                let base = if h.day == now.div_euclid(86_400) && h.day_base.len() == SLOTS {
                    h.day_base.clone()
                } else if h.minute_base.len() == SLOTS {
                    h.minute_base.clone()
                } else {
                    vec![0; SLOTS]
                };
                let current = (h.minute_base.len() == SLOTS)
                    .then(|| minute_of(h.minute, &totals, &h.minute_base));
                let since = now.div_euclid(60).saturating_sub(SERIES_MINUTES);
                (
                    base,
                    h.series
                        .iter()
                        .filter(|m| m.minute > since)
                        .copied()
                        .collect::<Vec<_>>(),
                    current,
                )
            }
            None => (vec![0; SLOTS], Vec::new(), None),
        };
        let today: Vec<u64> = totals
            .iter()
            .zip(&day_base)
            .map(|(t, b)| t.saturating_sub(*b))
            .collect();
        let mut series = series;
        if let Some(m) = current.filter(Minute::has_traffic) {
            series.push(m);
        }
        UsageReport {
            series,
            ..UsageReport::from_slots(&today, self.last_use())
        }
    }

    /// Every counter since the process started (or since the usage file's), slot by slot.
    pub fn slots(&self) -> Vec<u64> {
        self.totals().unwrap_or_else(|| vec![0; SLOTS])
    }

    /// Takes in what another process counted for this key since this one last read or
    /// wrote the usage file (`on_disk`, the key's entry there now): the file's totals less
    /// those last seen are added to this cell's, and a later last use or a bigger count in
    /// the same quota period is taken. Two processes that both do this before they write
    /// (an upgrade runs them side by side) each keep the other's requests.
    fn sync(&self, on_disk: Option<&SavedUsage>) {
        let Some(file) = on_disk else {
            return;
        };
        if let Some(theirs) = file.totals.as_ref() {
            let counts = self.counts();
            let synced = counts.synced.lock().unwrap_or_else(|e| e.into_inner());
            for ((total, seen), on_file) in counts.totals.iter().zip(&synced.totals).zip(theirs) {
                let added = on_file.saturating_sub(*seen);
                if added > 0 {
                    total.fetch_add(added, Ordering::Relaxed);
                }
            }
        }
        if let Some(at) = file
            .last_used_at
            .filter(|at| *at > self.last_used.load(Ordering::Relaxed))
        {
            self.last_used.store(at, Ordering::Relaxed);
            if let Ok(mut slot) = self.last_ip.lock() {
                *slot = file.last_used_ip.as_deref().and_then(|s| s.parse().ok());
            }
        }
        let period = self.quota_period.load(Ordering::Acquire);
        if file.quota_period == period {
            let counts = self.counts();
            let synced = counts
                .synced
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .quota;
            let seen = if synced.0 == period { synced.1 } else { 0 };
            let added = file.quota_used.saturating_sub(seen);
            if added > 0 {
                self.quota_used.fetch_add(added, Ordering::AcqRel);
            }
        }
    }

    /// Notes the cell's figures as the file now has them (just written).
    fn synced(&self, saved: &SavedUsage) {
        if let Some(counts) = self.counts.get() {
            let mut synced = counts.synced.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(totals) = &saved.totals {
                synced.totals.clone_from(totals);
            }
            synced.quota = (saved.quota_period, saved.quota_used);
        }
    }

    fn save(&self) -> Option<SavedUsage> {
        // The counts first: read in sequential consistency after [`KeyUsage::take_dirty`],
        // they hold every count a request made before it found the cell marked.
        let totals = self.totals();
        let last = self.last_use();
        let quota_used = self.quota_used.load(Ordering::SeqCst);
        if last.is_none() && totals.is_none() && quota_used == 0 {
            return None;
        }
        let history = self
            .counts
            .get()
            .map(|c| c.history.lock().unwrap_or_else(|e| e.into_inner()).clone());
        Some(SavedUsage {
            last_used_at: last.as_ref().map(|l| l.at),
            last_used_ip: last.and_then(|l| l.ip),
            totals,
            history,
            quota_period: self.quota_period.load(Ordering::Relaxed),
            quota_used,
        })
    }

    fn restore(id: &str, saved: SavedUsage) -> Self {
        let usage = KeyUsage {
            last_used: AtomicI64::new(saved.last_used_at.unwrap_or(0)),
            last_ip: Mutex::new(saved.last_used_ip.as_deref().and_then(|s| s.parse().ok())),
            quota_period: AtomicI64::new(saved.quota_period),
            quota_used: AtomicU64::new(saved.quota_used),
            ..KeyUsage::for_key(id)
        };
        // A file from a build that knew fewer refusal codes has fewer slots: new codes are
        // appended to the list, so its counts are a prefix of ours.
        if let Some(totals) = saved.totals.filter(|t| t.len() <= SLOTS) {
            let mut history = saved.history.unwrap_or_default();
            for base in [&mut history.day_base, &mut history.minute_base] {
                if !base.is_empty() && base.len() < SLOTS {
                    base.resize(SLOTS, 0);
                }
            }
            let mut synced = Synced {
                totals: totals.clone(),
                quota: (saved.quota_period, saved.quota_used),
            };
            synced.totals.resize(SLOTS, 0);
            let counts = Counts {
                totals: std::array::from_fn(|i| {
                    AtomicU64::new(totals.get(i).copied().unwrap_or(0))
                }),
                history: Mutex::new(history),
                synced: Mutex::new(synced),
            };
            let _ = usage.counts.set(Box::new(counts));
        }
        usage
    }
}

fn minute_of(minute: i64, totals: &[u64], base: &[u64]) -> Minute {
    let at = |counts: &[u64], slot: usize| counts.get(slot).copied().unwrap_or(0);
    let d = |slot: usize| at(totals, slot).saturating_sub(at(base, slot));
    Minute {
        minute,
        accepted: d(ACCEPTED),
        refused: d(REFUSED),
        errors: d(UPSTREAM_4XX)
            .saturating_add(d(UPSTREAM_5XX))
            .saturating_add(d(FAILED)),
    }
}

/// One key's usage as reported: today (UTC) unless said otherwise.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageReport {
    pub accepted: u64,
    pub refused: u64,
    pub upstream_4xx: u64,
    pub upstream_5xx: u64,
    /// Admitted, then failed in the gateway (413, 502, 504).
    pub failed: u64,
    /// Upstream 5xx plus the gateway's 502 and 504.
    pub upstream_errors: u64,
    pub by_code: BTreeMap<&'static str, u64>,
    /// The last 24 hours, minutes with traffic only, the current minute last.
    pub series: Vec<Minute>,
    pub last_use: Option<LastUse>,
}

impl UsageReport {
    /// A report from one day's counters, slot by slot (missing slots count 0), without a
    /// per-minute series.
    pub fn from_slots(today: &[u64], last_use: Option<LastUse>) -> UsageReport {
        let at = |slot: usize| today.get(slot).copied().unwrap_or(0);
        let code = |r: &Rejection| at(BY_CODE.saturating_add(r.index()));
        UsageReport {
            accepted: at(ACCEPTED),
            refused: at(REFUSED),
            upstream_4xx: at(UPSTREAM_4XX),
            upstream_5xx: at(UPSTREAM_5XX),
            failed: at(FAILED),
            upstream_errors: at(UPSTREAM_5XX)
                .saturating_add(code(&Rejection::UpstreamUnavailable))
                .saturating_add(code(&Rejection::UpstreamTimeout)),
            by_code: CODES
                .iter()
                .enumerate()
                .map(|(i, code)| (*code, at(BY_CODE.saturating_add(i))))
                .filter(|(_, n)| *n > 0)
                .collect(),
            series: Vec::new(),
            last_use,
        }
    }

    pub fn requests(&self) -> u64 {
        self.accepted.saturating_add(self.refused)
    }

    /// Share of requests that did not end well: refused, failed, or answered 4xx/5xx.
    pub fn error_rate(&self) -> f64 {
        match self.requests() {
            0 => 0.0,
            // An outcome counted just after midnight for a request of the day before could
            // otherwise tip the rate past 1.
            n => {
                let bad = self
                    .refused
                    .saturating_add(self.failed)
                    .saturating_add(self.upstream_4xx)
                    .saturating_add(self.upstream_5xx);
                (bad as f64 / n as f64).min(1.0)
            }
        }
    }

    /// The per-minute series as JSON, oldest first.
    pub fn series_json(&self) -> serde_json::Value {
        self.series
            .iter()
            .map(|m| serde_json::json!({"minute": rfc3339(m.minute.saturating_mul(60)), "accepted": m.accepted, "refused": m.refused, "errors": m.errors}))
            .collect()
    }

    /// The contract's usage JSON.
    pub fn to_json(&self, now: i64) -> serde_json::Value {
        let mut v = self.counts_json();
        let series = self.series_json();
        if let Some(o) = v.as_object_mut() {
            o.insert("date".into(), crate::clock::date(now).into());
            o.insert("by_code_today".into(), serde_json::json!(self.by_code));
            o.insert(
                "last_used_at".into(),
                self.last_use.as_ref().map(|u| rfc3339(u.at)).into(),
            );
            o.insert(
                "last_used_ip".into(),
                self.last_use.as_ref().and_then(|u| u.ip.clone()).into(),
            );
            o.insert("series".into(), series);
        }
        v
    }

    /// Today's counts and error rate: the members a key's usage and a sum over keys share.
    pub fn counts_json(&self) -> serde_json::Value {
        serde_json::json!({
            "requests_today": self.requests(),
            "accepted_today": self.accepted,
            "refused_today": self.refused,
            "upstream_4xx_today": self.upstream_4xx,
            "upstream_5xx_today": self.upstream_5xx,
            "upstream_errors_today": self.upstream_errors,
            "failed_today": self.failed,
            "error_rate": (self.error_rate() * 10_000.0).round() / 10_000.0,
        })
    }

    /// Adds another report's counts to this one (for sums over keys): the totals, the codes
    /// and the per-minute series (minute by minute).
    pub fn add_counts(&mut self, other: &UsageReport) {
        self.accepted = self.accepted.saturating_add(other.accepted);
        self.refused = self.refused.saturating_add(other.refused);
        self.upstream_4xx = self.upstream_4xx.saturating_add(other.upstream_4xx);
        self.upstream_5xx = self.upstream_5xx.saturating_add(other.upstream_5xx);
        self.failed = self.failed.saturating_add(other.failed);
        self.upstream_errors = self.upstream_errors.saturating_add(other.upstream_errors);
        for (code, n) in &other.by_code {
            let sum = self.by_code.entry(code).or_default();
            *sum = sum.saturating_add(*n);
        }
        if other.series.is_empty() {
            return;
        }
        let mut minutes: BTreeMap<i64, Minute> =
            self.series.drain(..).map(|m| (m.minute, m)).collect();
        for m in &other.series {
            let sum = minutes.entry(m.minute).or_insert(Minute {
                minute: m.minute,
                accepted: 0,
                refused: 0,
                errors: 0,
            });
            sum.accepted = sum.accepted.saturating_add(m.accepted);
            sum.refused = sum.refused.saturating_add(m.refused);
            sum.errors = sum.errors.saturating_add(m.errors);
        }
        self.series = minutes.into_values().collect();
    }
}

/// A key's usage as written to the usage file.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SavedUsage {
    last_used_at: Option<i64>,
    last_used_ip: Option<String>,
    #[serde(default)]
    totals: Option<Vec<u64>>,
    #[serde(default)]
    history: Option<History>,
    #[serde(default)]
    quota_period: i64,
    #[serde(default)]
    quota_used: u64,
}

/// The usage file's document as read. Version 2 adds counters, history and quotas to version
/// 1's last use; both are read alike, so the `version` field is not read.
#[derive(Debug, Default, Deserialize)]
struct UsageFile {
    /// Which lines of the changes journal belong to this file (0 in files written before
    /// the journal, which no journal line names).
    #[serde(default)]
    generation: u64,
    keys: BTreeMap<String, SavedUsage>,
}

/// The usage file's document as a flush writes it: [`UsageFile`]'s shape, its keys a list
/// sorted by id and written as the same JSON object.
#[derive(Serialize)]
struct UsageFileOut<'a> {
    version: u32,
    generation: u64,
    #[serde(serialize_with = "keys_as_map")]
    keys: &'a [(&'a str, Option<&'a KeyUsage>, SavedUsage)],
}

fn keys_as_map<S: serde::Serializer>(
    keys: &&[(&str, Option<&KeyUsage>, SavedUsage)],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_map(keys.iter().map(|(id, _, saved)| (id, saved)))
}

/// A line of the changes journal: one key's record as it is now, for the usage file of
/// generation `g`. A later line for the same key replaces an earlier one.
#[derive(Deserialize)]
struct Change {
    g: u64,
    id: String,
    u: SavedUsage,
}

/// [`Change`] as a flush writes it.
#[derive(Serialize)]
struct ChangeOut<'a> {
    g: u64,
    id: &'a str,
    u: &'a SavedUsage,
}

/// The changes journal beside the usage file: `usage.json` → `usage.changes.jsonl`.
pub fn changes_path(usage_path: &Path) -> PathBuf {
    usage_path.with_extension("changes.jsonl")
}

/// Flushes in a row that must find the usage file as this book left it before changes go
/// to the journal rather than into a rewrite of the file. A process that reads only the
/// file (an older build, side by side during an upgrade) writes after each flush of ours,
/// so it is never given a journal to miss.
const QUIET_FLUSHES: u32 = 3;

/// The journal may grow to the usage file's size, and at least to this, before the next
/// flush rewrites the file instead: a rewrite then costs no more than the appends it ends.
const JOURNAL_FLOOR: u64 = 64 * 1024;

/// What a journal line adds to its record, about: `{"g":…,"id":"…","u":` and `}` and the
/// newline, with a key id of 24 characters.
const LINE_OVERHEAD: u64 = 48;

/// The cells of the keys that have been used, by key id. The ids are shared, so that a
/// housekeeping pass over a million cells copies pointers, not a million strings.
///
/// In [`PARTS`] parts, each behind its own lock. Every usage flush, minute tick and Redis
/// push walks the whole book, a part at a time, so a key's first request, which makes the
/// key's cell, waits at most for one part's walk: at a million used keys, about a sixtieth
/// of the fifth of a second a walk of the whole book takes.
#[derive(Debug)]
struct Registry {
    parts: [Mutex<Part>; PARTS],
}

type Part = HashMap<Arc<str>, Arc<KeyUsage>, BuildHasherDefault<IdHasher>>;

/// The registry's parts.
const PARTS: usize = 64;

impl Registry {
    fn new(cells: impl IntoIterator<Item = Cell>) -> Registry {
        let cells = cells.into_iter();
        // Each part sized once for its share of the cells read at start (and an eighth
        // over, for the spread), not grown by doubling through a million inserts.
        let share = cells.size_hint().0 / PARTS;
        let room = share.saturating_add(share / 8);
        let registry = Registry {
            parts: std::array::from_fn(|_| {
                Mutex::new(HashMap::with_capacity_and_hasher(room, Default::default()))
            }),
        };
        for (id, usage) in cells {
            registry.part(&id).insert(id, usage);
        }
        registry
    }

    /// The part that holds `id`'s cell, locked. Chosen by bits of the id's hash that the
    /// part's own table does not use for its buckets (the low ones) or its tags (the top
    /// seven).
    fn part(&self, id: &str) -> MutexGuard<'_, Part> {
        let [first, ..] = &self.parts;
        self.parts
            .get(part_of(id))
            .unwrap_or(first)
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Calls `f` with every cell, a part at a time, each part locked only while it is read.
    fn walk(&self, mut f: impl FnMut(&Arc<str>, &Arc<KeyUsage>)) {
        for part in &self.parts {
            let part = part.lock().unwrap_or_else(|e| e.into_inner());
            for (id, usage) in part.iter() {
                f(id, usage);
            }
        }
    }

    fn len(&self) -> usize {
        self.parts
            .iter()
            .map(|p| p.lock().unwrap_or_else(|e| e.into_inner()).len())
            .fold(0, usize::saturating_add)
    }
}

/// The index of the part that holds `id`'s cell.
fn part_of(id: &str) -> usize {
    let mut h = IdHasher::default();
    h.write(id.as_bytes());
    usize::try_from(h.finish() >> 32).unwrap_or(0) % PARTS
}

/// A key id and its cell, as a pass over the book takes them.
pub type Cell = (Arc<str>, Arc<KeyUsage>);

/// The book's cells as each snapshot entry holds them: a key's cell is found or made on its
/// first use rather than at load, so a key that is never used costs a pointer here and
/// nothing in the book.
#[derive(Debug, Clone)]
pub struct Cells(Arc<Registry>);

impl Cells {
    /// The key's cell, made (and entered in the book) if it has none.
    pub fn get_or_make(&self, id: &str) -> Arc<KeyUsage> {
        let mut part = self.0.part(id);
        if let Some(u) = part.get(id) {
            return Arc::clone(u);
        }
        Arc::clone(
            part.entry(Arc::from(id))
                .or_insert_with(|| Arc::new(KeyUsage::for_key(id))),
        )
    }

    /// The key's cell if it was ever used: for reports, which must not make cells.
    pub fn used(&self, id: &str) -> Option<Arc<KeyUsage>> {
        self.0.part(id).get(id).cloned()
    }
}

/// Every key's usage, by key id.
#[derive(Debug)]
pub struct UsageBook {
    path: Option<PathBuf>,
    by_id: Arc<Registry>,
    /// Refusals that never identified a key.
    pub anonymous: Arc<KeyUsage>,
    /// What was last flushed.
    flushed: Mutex<Flushed>,
}

impl UsageBook {
    /// A book that is never written anywhere (checks, benches).
    pub fn in_memory() -> Self {
        UsageBook {
            path: None,
            by_id: Arc::new(Registry::new([])),
            anonymous: Arc::default(),
            flushed: Mutex::default(),
        }
    }

    /// Opens the book at `path`, loading what an earlier run flushed. A missing file is an
    /// empty book; an unreadable one is logged and started afresh.
    pub fn open(path: PathBuf) -> Self {
        let (generation, mut saved) = read_saved(&path);
        let anonymous = saved
            .remove(ANONYMOUS)
            .map(|s| KeyUsage::restore("", s))
            .unwrap_or_default();
        let by_id = Registry::new(saved.into_iter().map(|(id, s)| {
            let usage = Arc::new(KeyUsage::restore(&id, s));
            (Arc::from(id), usage)
        }));
        UsageBook {
            path: Some(path),
            by_id: Arc::new(by_id),
            anonymous: Arc::new(anonymous),
            flushed: Mutex::new(Flushed {
                generation,
                ..Flushed::default()
            }),
        }
    }

    /// The cells, for the entries of a snapshot.
    pub fn cells(&self) -> Cells {
        Cells(Arc::clone(&self.by_id))
    }

    pub fn get(&self, id: &str) -> Option<Arc<KeyUsage>> {
        self.cells().used(id)
    }

    pub fn last_use(&self, id: &str) -> Option<LastUse> {
        self.get(id).and_then(|u| u.last_use())
    }

    /// Every cell made so far, by key id: the keys that were ever used, whatever the key
    /// count, for housekeeping and for reports that need only them. `room` more cells fit
    /// without growing the list.
    pub fn all_and_room(&self, room: usize) -> Vec<Cell> {
        // Cells made while the pass runs may be left out: they are taken by the next.
        let mut cells = Vec::with_capacity(self.by_id.len().saturating_add(room));
        self.by_id
            .walk(|id, u| cells.push((Arc::clone(id), Arc::clone(u))));
        cells
    }

    /// [`UsageBook::all_and_room`] without room.
    pub fn all(&self) -> Vec<Cell> {
        self.all_and_room(0)
    }

    /// The cells that moved since the Redis push last took them, their marks taken: a pass
    /// of one load per idle cell, a part of the book at a time, copying only the cells it
    /// returns.
    pub fn unpushed(&self) -> Vec<Cell> {
        let mut cells = Vec::new();
        self.by_id.walk(|id, u| {
            if u.take_unpushed() {
                cells.push((Arc::clone(id), Arc::clone(u)));
            }
        });
        cells
    }

    /// Forgets keys no longer in the store.
    pub fn retain(&self, live: impl Fn(&str) -> bool) {
        for part in &self.by_id.parts {
            let mut part = part.lock().unwrap_or_else(|e| e.into_inner());
            part.retain(|id, _| live(id));
        }
    }

    /// Rolls every key's day and minute forward (housekeeping, every few seconds).
    pub fn tick(&self, now: i64) {
        for (_, usage) in self.all() {
            usage.tick(now);
        }
        self.anonymous.tick(now);
    }

    /// Makes what changed since the last flush durable.
    ///
    /// The records of the keys whose figures moved are appended to the changes journal and
    /// synced: the cost follows the keys in use, not the keys ever used. When the journal
    /// has grown to the usage file's size, the whole book is written instead (temp file,
    /// fsync, rename) under a new generation, which retires every journal line before it.
    ///
    /// Another process may share the file: during an upgrade the old and the new gateway run
    /// side by side. Under an exclusive lock on a file beside it, the book first takes in what
    /// the other wrote since this one last did ([`KeyUsage::sync`]), and keeps the other's
    /// keys this one never saw; so the counts of both add up, whichever writes last. When
    /// the file is still as this process left it, it is not read again. Only a book that
    /// wrote last, [`QUIET_FLUSHES`] times in a row, appends to the journal.
    pub fn flush(&self) -> io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let mut lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(lock_path(path))?;
        lock.lock()?;
        let mut flushed = self.flushed.lock().unwrap_or_else(|e| e.into_inner());
        // The lock file names the last writer; when that was this book, the file is as it
        // was left.
        let mut last_writer = String::new();
        let _ = lock.read_to_string(&mut last_writer);
        let ours = last_writer == flushed.mark();
        flushed.quiet = if ours {
            flushed.quiet.saturating_add(1)
        } else {
            0
        };
        let mut cells = self.all_and_room(1);
        cells.push((Arc::from(ANONYMOUS), Arc::clone(&self.anonymous)));
        let written = (|| {
            let appended = if ours && flushed.quiet > QUIET_FLUSHES {
                Some(append_changes(path, &cells, &mut flushed)?)
            } else {
                None
            };
            if matches!(appended, Some(Appended::Lines)) {
                flushed.note_write(&mut lock)?;
            } else if matches!(appended, Some(Appended::Nothing))
                || ours && appended.is_none() && !cells.iter().any(|(_, u)| u.is_dirty())
            {
                // The file and its journal already hold every cell.
            } else {
                let on_disk = if ours {
                    BTreeMap::new()
                } else {
                    let (generation, keys) = read_saved(path);
                    flushed.generation = flushed.generation.max(generation);
                    keys
                };
                rewrite(path, &cells, on_disk, &mut flushed)?;
                flushed.note_write(&mut lock)?;
            }
            Ok(())
        })();
        if let Err(e) = written {
            // The marks cleared for a write that did not happen are set again.
            for (_, usage) in &cells {
                usage.mark(UNSAVED);
            }
            return Err(e);
        }
        drop(flushed);
        lock.unlock()
    }
}

/// What [`append_changes`] did.
enum Appended {
    /// No key changed.
    Nothing,
    /// The changed keys' lines are in the journal, synced.
    Lines,
    /// Nothing: the lines would take the journal past its bound, so the file is to be
    /// rewritten instead.
    TooMany,
}

/// Appends a line for each cell that changed since the file last had it, and syncs them.
fn append_changes(path: &Path, cells: &[Cell], flushed: &mut Flushed) -> io::Result<Appended> {
    let changed: Vec<&Cell> = cells.iter().filter(|(_, u)| u.take_dirty()).collect();
    if changed.is_empty() {
        return Ok(Appended::Nothing);
    }
    // Judged first by the file's mean record and a line's own bytes, so that when most keys
    // changed their records are not serialised twice, for the journal and then for the file.
    let room = flushed
        .file_bytes
        .max(JOURNAL_FLOOR)
        .saturating_sub(flushed.journal_bytes);
    let mean = flushed
        .file_bytes
        .checked_div(flushed.file_records)
        .unwrap_or(0);
    if (changed.len() as u64).saturating_mul(mean.saturating_add(LINE_OVERHEAD)) > room {
        return Ok(Appended::TooMany);
    }
    let mut text = Vec::new();
    let mut written = Vec::new();
    for (id, usage) in changed {
        if let Some(saved) = usage.save() {
            let line = ChangeOut {
                g: flushed.generation,
                id,
                u: &saved,
            };
            serde_json::to_writer(&mut text, &line).map_err(io::Error::other)?;
            text.push(b'\n');
            written.push((usage, saved));
        }
    }
    if written.is_empty() {
        return Ok(Appended::Nothing);
    }
    if text.len() as u64 > room {
        return Ok(Appended::TooMany);
    }
    let size = flushed.journal_bytes.saturating_add(text.len() as u64);
    // Until the lines are whole on disk, a line cut short may end the journal: the next
    // flush rewrites the file rather than append after it.
    flushed.journal_bytes = u64::MAX;
    let mut journal = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(changes_path(path))?;
    journal.write_all(&text)?;
    journal.sync_data()?;
    flushed.journal_bytes = size;
    for (usage, saved) in &written {
        usage.synced(saved);
    }
    Ok(Appended::Lines)
}

/// Writes the whole book (temp file, fsync, rename) under the next generation, with the
/// keys only another process used (`on_disk` less this book's keys) as it wrote them, and
/// empties the journal, whose lines the new generation retires.
fn rewrite(
    path: &Path,
    cells: &[Cell],
    mut on_disk: BTreeMap<String, SavedUsage>,
    flushed: &mut Flushed,
) -> io::Result<()> {
    // Every key's record beside its cell, sorted by id as the file's map is: sorting
    // once costs what a map's inserts did, and marking the cells synced below needs no
    // lookup (at 100,000 keys those lookups' comparisons were an eighth of a flush).
    let mut keys: Vec<(&str, Option<&KeyUsage>, SavedUsage)> = Vec::with_capacity(cells.len());
    for (id, usage) in cells {
        usage.take_dirty();
        usage.sync(on_disk.remove(&**id).as_ref());
        if let Some(saved) = usage.save() {
            keys.push((id, Some(usage), saved));
        }
    }
    // Keys only another process used: kept as it wrote them.
    keys.extend(
        on_disk
            .iter()
            .map(|(id, saved)| (id.as_str(), None, saved.clone())),
    );
    keys.sort_unstable_by(|a, b| a.0.cmp(b.0));
    let generation = flushed.generation.wrapping_add(1).max(1);
    let bytes = serde_json::to_vec(&UsageFileOut {
        version: 2,
        generation,
        keys: &keys,
    })
    .map_err(io::Error::other)?;
    crate::keys::store::write_atomically(path, &bytes)?;
    flushed.generation = generation;
    flushed.file_bytes = bytes.len() as u64;
    flushed.file_records = keys.len() as u64;
    // The journal's lines are of the generation before: read with this file, they are
    // passed over, so emptying it needs no sync of its own.
    match std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(changes_path(path))
    {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    flushed.journal_bytes = 0;
    // The file now holds what was saved of every cell.
    for (_, usage, saved) in &keys {
        if let Some(usage) = usage {
            usage.synced(saved);
        }
    }
    Ok(())
}

/// The lock file two processes sharing a usage file take turns on.
fn lock_path(usage: &Path) -> PathBuf {
    usage.with_extension("lock")
}

/// What this book last wrote, and its mark (its own random id and its count of writes),
/// which it leaves in the lock file after each write, to tell whether another process
/// wrote the usage file since.
#[derive(Debug)]
struct Flushed {
    writer: u64,
    writes: u64,
    /// Flushes in a row that found the lock file with this book's mark.
    quiet: u32,
    /// The usage file's generation as this book last wrote or read it.
    generation: u64,
    /// The usage file's size and its count of records as this book last wrote it.
    file_bytes: u64,
    file_records: u64,
    /// What this book appended to the journal since; `u64::MAX` after a failed append.
    journal_bytes: u64,
}

impl Default for Flushed {
    fn default() -> Self {
        let mut id = [0u8; 8];
        // Without OS randomness, the time: two processes started apart still differ.
        if getrandom::fill(&mut id).is_err() {
            id = crate::state::history::millis(std::time::SystemTime::now()).to_le_bytes();
        }
        Flushed {
            writer: u64::from_le_bytes(id),
            writes: 0,
            quiet: 0,
            generation: 0,
            file_bytes: 0,
            file_records: 0,
            journal_bytes: 0,
        }
    }
}

impl Flushed {
    fn mark(&self) -> String {
        format!("{:016x} {}", self.writer, self.writes)
    }

    /// Counts a write and leaves the new mark in the lock file.
    fn note_write(&mut self, lock: &mut std::fs::File) -> io::Result<()> {
        self.writes = self.writes.wrapping_add(1);
        let mark = self.mark();
        lock.set_len(0)?;
        lock.seek(io::SeekFrom::Start(0))?;
        lock.write_all(mark.as_bytes())
    }
}

/// The usage file's generation and every key's record in it, with the journal's lines of
/// that generation applied, later lines over earlier ones. A line that does not parse (cut
/// short by a crash) is passed over and counted in a warning.
fn read_saved(path: &Path) -> (u64, BTreeMap<String, SavedUsage>) {
    let doc = match std::fs::read(path) {
        Ok(bytes) => match serde_json::from_slice::<UsageFile>(&bytes) {
            Ok(doc) => doc,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "usage file unreadable; starting afresh");
                UsageFile::default()
            }
        },
        Err(_) => UsageFile::default(),
    };
    let UsageFile {
        generation,
        mut keys,
    } = doc;
    let journal = changes_path(path);
    let Ok(text) = std::fs::read(&journal) else {
        return (generation, keys);
    };
    let mut bad = 0u64;
    for line in text.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        match serde_json::from_slice::<Change>(line) {
            Ok(change) if change.g == generation => {
                keys.insert(change.id, change.u);
            }
            Ok(_) => {}
            Err(_) => bad = bad.saturating_add(1),
        }
    }
    if bad > 0 {
        tracing::warn!(path = %journal.display(), lines = bad, "usage journal lines skipped: not valid JSON");
    }
    (generation, keys)
}

/// Every key's usage as flushed by a running gateway (for the CLI): id → report.
pub fn read_file(path: &Path, now: i64) -> BTreeMap<String, UsageReport> {
    read_saved(path)
        .1
        .into_iter()
        .filter(|(id, _)| id != ANONYMOUS)
        .map(|(id, s)| {
            let report = KeyUsage::restore(&id, s).report(now);
            (id, report)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_763_884_800; // 2025-11-23T08:00:00Z

    #[test]
    fn the_last_use_keeps_the_latest_second_and_address() {
        let cell = KeyUsage::for_key("k1");
        let last = |cell: &KeyUsage| {
            let u = cell.last_use().unwrap();
            (u.at, u.ip.unwrap())
        };
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert!(cell.last_use().is_none());
        cell.seen(T0, a);
        assert_eq!(last(&cell), (T0, "10.0.0.1".to_string()));
        // The same second and address: nothing to write, nothing changes.
        cell.seen(T0, a);
        assert_eq!(last(&cell), (T0, "10.0.0.1".to_string()));
        // Another address in the same second, then the same one a second later.
        cell.seen(T0, b);
        assert_eq!(last(&cell), (T0, "10.0.0.2".to_string()));
        cell.seen(T0 + 1, b);
        assert_eq!(last(&cell), (T0 + 1, "10.0.0.2".to_string()));
        // An IPv4-mapped IPv6 address is not the IPv4 one; other IPv6 addresses always write.
        cell.seen(T0 + 1, mapped);
        assert_eq!(last(&cell), (T0 + 1, "::ffff:10.0.0.1".to_string()));
        cell.seen(T0 + 1, a);
        assert_eq!(last(&cell), (T0 + 1, "10.0.0.1".to_string()));
        cell.seen(T0 + 1, v6);
        cell.seen(T0 + 1, v6);
        assert_eq!(last(&cell), (T0 + 1, "2001:db8::1".to_string()));
        cell.seen(T0 + 1, a);
        assert_eq!(last(&cell), (T0 + 1, "10.0.0.1".to_string()));
    }

    #[test]
    fn two_processes_on_one_usage_file_keep_each_others_counts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.json");
        let count = |book: &UsageBook, n: usize| {
            let cell = book.cells().get_or_make("k1");
            for _ in 0..n {
                cell.accepted();
                cell.quota_used(7);
                cell.quota_spend();
            }
        };
        // The old process counts and flushes; the new one starts from its file.
        let old = UsageBook::open(path.clone());
        count(&old, 3);
        old.flush().unwrap();
        let new = UsageBook::open(path.clone());
        // Side by side: both count, and both flush, in either order, more than once.
        count(&new, 5);
        count(&old, 2);
        new.flush().unwrap();
        old.flush().unwrap();
        count(&old, 1);
        old.flush().unwrap();
        count(&new, 4);
        new.flush().unwrap();
        let (_, on_disk) = read_saved(&path);
        let saved = &on_disk["k1"];
        assert_eq!(
            saved.totals.as_ref().unwrap()[ACCEPTED],
            15,
            "3 + 5 + 2 + 1 + 4"
        );
        assert_eq!((saved.quota_period, saved.quota_used), (7, 15));
        // Each process's own view has the other's counts too.
        assert_eq!(new.get("k1").unwrap().slots()[ACCEPTED], 15);
        // A key only the other process used is kept.
        old.cells().get_or_make("k2").accepted();
        old.flush().unwrap();
        new.flush().unwrap();
        assert!(read_saved(&path).1.contains_key("k2"));
    }

    #[test]
    fn the_file_is_the_sorted_map_it_always_was() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.json");
        // Another process's keys, one of which this one uses too.
        let other = UsageBook::open(path.clone());
        for id in ["zz", "b"] {
            other.cells().get_or_make(id).accepted();
        }
        other.flush().unwrap();
        let book = UsageBook::open(path.clone());
        for (id, n) in [("c", 3), ("a", 1), ("b", 2), ("aa", 4)] {
            let cell = book.cells().get_or_make(id);
            cell.seen(T0, "10.0.0.1".parse().unwrap());
            for _ in 0..n {
                cell.accepted();
            }
        }
        other.cells().get_or_make("zz").accepted();
        other.flush().unwrap();
        book.flush().unwrap();

        let bytes = std::fs::read(&path).unwrap();
        #[derive(Serialize)]
        struct AsBefore {
            version: u32,
            generation: u64,
            keys: BTreeMap<String, SavedUsage>,
        }
        let (generation, keys) = read_saved(&path);
        let ids: Vec<&str> = keys.keys().map(String::as_str).collect();
        assert_eq!(ids, ["a", "aa", "b", "c", "zz"]);
        assert_eq!(generation, 3, "a rewrite by each flush");
        let before = serde_json::to_vec(&AsBefore {
            version: 2,
            generation,
            keys,
        })
        .unwrap();
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            String::from_utf8(before).unwrap()
        );
        let (_, saved) = read_saved(&path);
        assert_eq!(
            saved["b"].totals.as_ref().unwrap()[ACCEPTED],
            3,
            "1 there + 2 here"
        );
        assert_eq!(saved["zz"].totals.as_ref().unwrap()[ACCEPTED], 2);
    }

    /// Flushes a book until it appends to the journal: the first flush rewrites the file
    /// (no flush of this book wrote it yet), the next [`QUIET_FLUSHES`] find nothing new.
    fn settle(book: &UsageBook) {
        for _ in 0..=QUIET_FLUSHES {
            book.flush().unwrap();
        }
    }

    fn accepted(book: &UsageBook, id: &str, n: u64) {
        let cell = book.cells().get_or_make(id);
        for _ in 0..n {
            cell.accepted();
        }
    }

    fn accepted_on_disk(path: &Path, id: &str) -> u64 {
        read_saved(path).1[id].totals.as_ref().unwrap()[ACCEPTED]
    }

    #[test]
    fn a_flush_appends_only_the_keys_that_changed_and_they_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.json");
        let book = UsageBook::open(path.clone());
        for id in ["a", "b", "c"] {
            accepted(&book, id, 1);
        }
        settle(&book);
        let file = std::fs::read(&path).unwrap();
        let mark = std::fs::read_to_string(lock_path(&path)).unwrap();
        // Nothing changed: nothing is written, not even the mark.
        book.flush().unwrap();
        assert_eq!(std::fs::read_to_string(lock_path(&path)).unwrap(), mark);
        // Two keys change, one of them new; the last use moves on a third.
        accepted(&book, "a", 2);
        accepted(&book, "d", 5);
        book.cells()
            .get_or_make("b")
            .seen(T0, "10.0.0.1".parse().unwrap());
        book.flush().unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            file,
            "the file is not rewritten"
        );
        let journal = std::fs::read_to_string(changes_path(&path)).unwrap();
        let mut ids: Vec<String> = journal
            .lines()
            .map(|l| serde_json::from_str::<Change>(l).unwrap().id)
            .collect();
        ids.sort();
        assert_eq!(ids, ["a", "b", "d"]);
        book.flush().unwrap();
        assert_eq!(
            std::fs::read_to_string(changes_path(&path)).unwrap(),
            journal
        );
        // Read back, and in a book opened afresh, the journal's records win.
        assert_eq!(accepted_on_disk(&path, "a"), 3);
        assert_eq!(accepted_on_disk(&path, "d"), 5);
        assert_eq!(accepted_on_disk(&path, "c"), 1);
        let again = UsageBook::open(path.clone());
        assert_eq!(again.get("a").unwrap().slots()[ACCEPTED], 3);
        assert_eq!(again.last_use("b").unwrap().at, T0);
        // Counting on from what was read, a later line for the same key replaces the first.
        drop(again);
        accepted(&book, "a", 1);
        book.flush().unwrap();
        assert_eq!(accepted_on_disk(&path, "a"), 4);
    }

    #[test]
    fn a_journal_past_the_file_s_size_is_folded_into_a_new_generation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.json");
        let book = UsageBook::open(path.clone());
        accepted(&book, "a", 1);
        settle(&book);
        let (first, _) = read_saved(&path);
        // Each flush appends one line; the journal may grow to JOURNAL_FLOOR, then a flush
        // rewrites the file instead, and the journal starts empty.
        let mut rewrites = 0;
        let mut longest = 0;
        for n in 0..600u64 {
            accepted(&book, "a", 1);
            book.flush().unwrap();
            let journal = std::fs::metadata(changes_path(&path)).map_or(0, |m| m.len());
            longest = longest.max(journal);
            if journal == 0 {
                rewrites += 1;
            }
            assert_eq!(accepted_on_disk(&path, "a"), n + 2);
        }
        assert!(rewrites >= 2, "{rewrites} rewrites");
        assert!(longest <= JOURNAL_FLOOR, "{longest} bytes");
        let (generation, _) = read_saved(&path);
        assert_eq!(generation, first + rewrites);
        // A crash between the rewrite's rename and the journal's emptying leaves lines of
        // the generation before: they are passed over.
        let stale = serde_json::to_string(&ChangeOut {
            g: generation - 1,
            id: "a",
            u: &book
                .get("a")
                .unwrap()
                .save()
                .map(|mut s| {
                    s.totals = Some(vec![1; SLOTS]);
                    s
                })
                .unwrap(),
        })
        .unwrap();
        let mut journal = std::fs::read_to_string(changes_path(&path)).unwrap();
        journal.push_str(&stale);
        journal.push('\n');
        // And a line cut short by a crash is passed over too.
        journal.push_str(r#"{"g":1,"id":"a","u":{"last_us"#);
        std::fs::write(changes_path(&path), &journal).unwrap();
        assert_eq!(accepted_on_disk(&path, "a"), 601);
        // A book opened on it rewrites the file at its first flush: the cut line is gone.
        let again = UsageBook::open(path.clone());
        assert_eq!(again.get("a").unwrap().slots()[ACCEPTED], 601);
        again.flush().unwrap();
        assert_eq!(std::fs::read(changes_path(&path)).unwrap(), b"");
        assert_eq!(accepted_on_disk(&path, "a"), 601);
    }

    #[test]
    fn when_every_key_moved_the_file_is_rewritten_instead() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.json");
        let book = UsageBook::open(path.clone());
        let ids: Vec<String> = (0..600).map(|i| format!("{i:024x}")).collect();
        for id in &ids {
            accepted(&book, id, 1);
        }
        settle(&book);
        assert!(std::fs::metadata(&path).unwrap().len() > JOURNAL_FLOOR);
        let (generation, _) = read_saved(&path);
        for id in &ids {
            accepted(&book, id, 1);
        }
        book.flush().unwrap();
        assert_eq!(read_saved(&path).0, generation + 1);
        assert_eq!(std::fs::read(changes_path(&path)).unwrap_or_default(), b"");
        assert_eq!(accepted_on_disk(&path, &ids[599]), 2);
    }

    #[test]
    fn a_failed_append_is_written_by_the_next_flush() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.json");
        let book = UsageBook::open(path.clone());
        accepted(&book, "a", 1);
        settle(&book);
        accepted(&book, "a", 1);
        // The journal cannot be opened: the flush fails, and says so.
        std::fs::create_dir(changes_path(&path)).unwrap();
        assert!(book.flush().is_err());
        std::fs::remove_dir(changes_path(&path)).unwrap();
        // Nothing moves after it, and still the next flush writes the count.
        book.flush().unwrap();
        assert_eq!(accepted_on_disk(&path, "a"), 2);
        assert_eq!(UsageBook::open(path).get("a").unwrap().slots()[ACCEPTED], 2);
    }

    /// A pass over the book locks one part at a time: a key's first use in another part
    /// goes ahead while the pass holds its part, and every cell is found and walked once.
    #[test]
    fn a_first_use_waits_only_for_the_part_a_pass_holds() {
        let book = UsageBook::in_memory();
        let cells = book.cells();
        let ids: Vec<String> = (0..2_000).map(|i| format!("{i:012x}")).collect();
        for id in &ids {
            assert!(Arc::ptr_eq(&cells.get_or_make(id), &cells.get_or_make(id)));
        }
        let parts: std::collections::BTreeSet<usize> = ids.iter().map(|id| part_of(id)).collect();
        assert_eq!(parts.len(), PARTS, "the ids spread over every part");
        let mut walked = 0;
        let mut first = true;
        book.by_id.walk(|id, _| {
            walked += 1;
            if !std::mem::take(&mut first) {
                return;
            }
            // A new key whose cell goes in another part than the one held now.
            let held = part_of(id);
            let other = (0..10_000)
                .map(|i| format!("new{i}"))
                .find(|n| part_of(n) != held)
                .unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            let cells = cells.clone();
            std::thread::spawn(move || {
                cells.get_or_make(&other);
                let _ = tx.send(());
            });
            rx.recv_timeout(std::time::Duration::from_secs(10))
                .expect("the first use went ahead while the pass held another part");
        });
        // The new cell may or may not be walked, depending on where it went.
        assert!(walked == 2_000 || walked == 2_001, "{walked}");
        assert_eq!(book.all().len(), 2_001);
        book.retain(|id| id.starts_with('0'));
        assert_eq!(book.all().len(), 2_000);
        assert!(book.get("new0").is_none() && book.get(&ids[7]).is_some());
    }

    /// The usage file's mark and the Redis push's are taken apart: a flush that saved a
    /// count leaves it marked for the push, and a push that failed marks it for itself only.
    #[test]
    fn the_flush_and_the_redis_push_each_take_their_own_mark() {
        let cell = KeyUsage::for_key("k");
        assert!(
            !cell.take_dirty() && !cell.take_unpushed(),
            "a new cell moved nowhere"
        );
        cell.accepted();
        assert!(cell.take_dirty());
        assert!(!cell.take_dirty());
        assert!(cell.take_unpushed(), "the flush left the push's mark");
        assert!(!cell.take_unpushed());
        cell.mark_unpushed();
        assert!(!cell.is_dirty(), "a failed push marks only itself");
        assert!(cell.take_unpushed());
        // A last use marks both, and a quota count too.
        cell.seen(1_000, "127.0.0.1".parse().unwrap());
        assert!(cell.take_unpushed() && cell.take_dirty());
        cell.quota_spend();
        assert!(cell.take_dirty() && cell.take_unpushed());
    }

    #[test]
    fn a_journal_is_never_left_for_a_process_that_reads_only_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.json");
        let new = UsageBook::open(path.clone());
        accepted(&new, "k", 1);
        settle(&new);
        accepted(&new, "k", 1);
        new.flush().unwrap();
        assert!(std::fs::metadata(changes_path(&path)).unwrap().len() > 0);
        // Another process starts: it reads the journal with the file, and rewrites both.
        let other = UsageBook::open(path.clone());
        assert_eq!(other.get("k").unwrap().slots()[ACCEPTED], 2);
        accepted(&other, "k", 10);
        other.flush().unwrap();
        assert_eq!(std::fs::read(changes_path(&path)).unwrap(), b"");
        // While both write, each flush finds the other's mark and rewrites the file.
        for round in 0..QUIET_FLUSHES + 2 {
            accepted(&new, "k", 1);
            new.flush().unwrap();
            accepted(&other, "k", 1);
            other.flush().unwrap();
            assert_eq!(
                std::fs::read(changes_path(&path)).unwrap(),
                b"",
                "round {round}"
            );
        }
        let want = 2 + 10 + 2 * u64::from(QUIET_FLUSHES + 2);
        assert_eq!(accepted_on_disk(&path, "k"), want);
        // The other one stops; the one left goes back to the journal once the file has
        // been its own for QUIET_FLUSHES flushes.
        drop(other);
        settle(&new);
        accepted(&new, "k", 1);
        new.flush().unwrap();
        assert!(std::fs::metadata(changes_path(&path)).unwrap().len() > 0);
        assert_eq!(accepted_on_disk(&path, "k"), want + 1);
        assert_eq!(new.get("k").unwrap().slots()[ACCEPTED], want + 1);
    }

    #[test]
    fn counts_today_and_by_minute() {
        let u = KeyUsage::default();
        u.accepted();
        u.outcome(200, None);
        u.accepted();
        u.outcome(503, None);
        u.refused(&Rejection::ScopeDenied);
        // Housekeeping ticks every few seconds; the first tick owns what came before it.
        u.tick(T0 + 1);
        u.tick(T0 + 61);
        u.accepted();
        u.outcome(0, Some(&Rejection::UpstreamTimeout));
        let r = u.report(T0 + 70);
        assert_eq!(
            (
                r.requests(),
                r.accepted,
                r.refused,
                r.upstream_5xx,
                r.failed
            ),
            (4, 3, 1, 1, 1)
        );
        assert_eq!(r.upstream_errors, 2, "a 503 and a gateway timeout");
        assert_eq!(r.by_code.get("scope_denied"), Some(&1));
        assert_eq!(r.by_code.get("upstream_timeout"), Some(&1));
        assert!((r.error_rate() - 0.75).abs() < 1e-9);
        assert_eq!(r.series.len(), 2);
        assert_eq!(
            (
                r.series[0].accepted,
                r.series[0].refused,
                r.series[0].errors
            ),
            (2, 1, 1)
        );
        assert_eq!((r.series[1].accepted, r.series[1].errors), (1, 1));
    }

    #[test]
    fn a_new_day_starts_from_zero_and_old_minutes_age_out() {
        let u = KeyUsage::default();
        u.tick(T0);
        u.accepted();
        u.tick(T0 + 60);
        assert_eq!(u.report(T0 + 60).accepted, 1);
        let tomorrow = (T0.div_euclid(86_400) + 1) * 86_400 + 30;
        u.tick(tomorrow);
        let r = u.report(tomorrow);
        assert_eq!(r.accepted, 0, "yesterday's requests are not today's");
        u.accepted();
        assert_eq!(u.report(tomorrow).accepted, 1);
        u.tick(tomorrow + 2 * 86_400);
        assert!(u.report(tomorrow + 2 * 86_400).series.is_empty());
    }

    #[test]
    fn quotas_restart_each_period() {
        let u = KeyUsage::default();
        assert_eq!(u.quota_used(100), 0);
        u.quota_spend();
        u.quota_spend();
        assert_eq!(u.quota_used(100), 2);
        assert_eq!(u.quota_used(101), 0);
        assert_eq!(u.quota_spend(), 1);
    }

    #[test]
    fn usage_survives_a_flush_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.json");
        let book = UsageBook::open(path.clone());
        let cells = book.cells();
        assert!(
            cells.used("k1").is_none() && book.get("k1").is_none(),
            "a cell is made on first use, not before"
        );
        let u = cells.get_or_make("k1");
        assert!(Arc::ptr_eq(&u, &cells.get_or_make("k1")));
        book.tick(T0);
        u.seen(T0, "10.1.2.3".parse().unwrap());
        u.accepted();
        u.quota_spend();
        book.anonymous.refused(&Rejection::UnknownKey);
        book.tick(T0 + 5);
        book.flush().unwrap();
        let reopened = UsageBook::open(path.clone());
        assert_eq!(
            reopened.last_use("k1"),
            Some(LastUse {
                at: T0,
                ip: Some("10.1.2.3".into())
            })
        );
        let r = reopened.get("k1").unwrap().report(T0 + 5);
        assert_eq!(r.accepted, 1);
        assert_eq!(reopened.get("k1").unwrap().quota_used(0), 1);
        assert_eq!(
            reopened.anonymous.report(T0 + 5).by_code.get("unknown_key"),
            Some(&1)
        );
        assert_eq!(read_file(&path, T0 + 5)["k1"].accepted, 1);
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
