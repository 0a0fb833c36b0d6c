//! What a key did: its usage cell, counted at the end of the request spine. On the request
//! path this is a handful of atomic increments on the key's own cell, and a lock that is
//! only ever tried, never waited on. "Today", the per-minute series and persistence are derived off the request path by
//! [`UsageBook::tick`], which the gateway's housekeeping calls every few seconds: it records
//! each counter's value at the start of the day and of the minute, and the deltas.
//!
//! The book lives outside the snapshot, keyed by key id, and is flushed atomically to the
//! usage file every few seconds and at shutdown, so a crash loses at most one interval.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{self, Read as _, Seek as _, Write as _};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use http::HeaderValue;
use serde::{Deserialize, Serialize};

use crate::clock::rfc3339;
use crate::keys::LastUse;
use crate::rejection::{Rejection, CODES};

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
    /// The key's recent requests ([`super::history`]); empty until it is used.
    pub(crate) requests: Mutex<super::history::Ring>,
}

#[derive(Debug)]
struct Counts {
    totals: [AtomicU64; SLOTS],
    /// Touched by housekeeping and readers only, never by the request path.
    history: Mutex<History>,
    /// The totals as the usage file last had them, when this process read or wrote it:
    /// what another process added since is the file's totals less these.
    synced: Mutex<Vec<u64>>,
    /// The quota period and count as the usage file last had them, likewise.
    synced_quota: Mutex<(i64, u64)>,
}

impl Default for Counts {
    fn default() -> Self {
        Counts {
            totals: std::array::from_fn(|_| AtomicU64::new(0)),
            history: Mutex::new(History::default()),
            synced: Mutex::new(vec![0; SLOTS]),
            synced_quota: Mutex::new((0, 0)),
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
    }

    fn counts(&self) -> &Counts {
        self.counts.get_or_init(Box::default)
    }

    fn add(&self, slot: usize) {
        if let Some(total) = self.counts().totals.get(slot) {
            total.fetch_add(1, Ordering::Relaxed);
        }
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
        self.quota_used
            .fetch_add(1, Ordering::AcqRel)
            .saturating_add(1)
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
            .map(|c| c.totals.iter().map(|t| t.load(Ordering::Relaxed)).collect())
    }

    /// Rolls the day and minute baselines forward to `now`, recording the minute just ended.
    /// Counts between the last tick and a boundary are attributed to the later side, so
    /// "today" and the series are exact to within one housekeeping interval.
    fn tick(&self, now: i64) {
        let Some(counts) = self.counts.get() else {
            return;
        };
        let totals: Vec<u64> = counts
            .totals
            .iter()
            .map(|t| t.load(Ordering::Relaxed))
            .collect();
        let mut h = counts.history.lock().unwrap_or_else(|e| e.into_inner());
        let (day, minute) = (now.div_euclid(86_400), now.div_euclid(60));
        if h.minute_base.len() != SLOTS || h.day_base.len() != SLOTS {
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
            let mut synced = counts.synced.lock().unwrap_or_else(|e| e.into_inner());
            for ((total, seen), on_file) in counts.totals.iter().zip(synced.iter_mut()).zip(theirs)
            {
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
            let synced = *counts
                .synced_quota
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let seen = if synced.0 == period { synced.1 } else { 0 };
            let added = file.quota_used.saturating_sub(seen);
            if added > 0 {
                self.quota_used.fetch_add(added, Ordering::AcqRel);
            }
        }
    }

    /// Notes the totals as the file now has them (just written).
    fn synced(&self, saved: &SavedUsage) {
        if let Some(counts) = self.counts.get() {
            if let Some(totals) = &saved.totals {
                *counts.synced.lock().unwrap_or_else(|e| e.into_inner()) = totals.clone();
            }
            *counts
                .synced_quota
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = (saved.quota_period, saved.quota_used);
        }
    }

    fn save(&self) -> Option<SavedUsage> {
        let last = self.last_use();
        let totals = self.totals();
        if last.is_none() && totals.is_none() && self.quota_used.load(Ordering::Relaxed) == 0 {
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
            quota_used: self.quota_used.load(Ordering::Relaxed),
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
            let mut synced = totals.clone();
            synced.resize(SLOTS, 0);
            let counts = Counts {
                totals: std::array::from_fn(|i| {
                    AtomicU64::new(totals.get(i).copied().unwrap_or(0))
                }),
                history: Mutex::new(history),
                synced: Mutex::new(synced),
                synced_quota: Mutex::new((saved.quota_period, saved.quota_used)),
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
    keys: BTreeMap<String, SavedUsage>,
}

/// The usage file's document as a flush writes it: [`UsageFile`]'s shape, its keys a list
/// sorted by id and written as the same JSON object.
#[derive(Serialize)]
struct UsageFileOut<'a> {
    version: u32,
    #[serde(serialize_with = "keys_as_map")]
    keys: &'a [(&'a str, Option<&'a KeyUsage>, SavedUsage)],
}

fn keys_as_map<S: serde::Serializer>(
    keys: &&[(&str, Option<&KeyUsage>, SavedUsage)],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_map(keys.iter().map(|(id, _, saved)| (id, saved)))
}

/// The cells of the keys that have been used, by key id.
type Registry = Mutex<HashMap<String, Arc<KeyUsage>>>;

/// The book's cells as each snapshot entry holds them: a key's cell is found or made on its
/// first use rather than at load, so a key that is never used costs a pointer here and
/// nothing in the book.
#[derive(Debug, Clone)]
pub struct Cells(Arc<Registry>);

impl Cells {
    /// The key's cell, made (and entered in the book) if it has none.
    pub fn get_or_make(&self, id: &str) -> Arc<KeyUsage> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(u) = map.get(id) {
            return Arc::clone(u);
        }
        Arc::clone(
            map.entry(id.to_string())
                .or_insert_with(|| Arc::new(KeyUsage::for_key(id))),
        )
    }

    /// The key's cell if it was ever used: for reports, which must not make cells.
    pub fn used(&self, id: &str) -> Option<Arc<KeyUsage>> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
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
            by_id: Arc::default(),
            anonymous: Arc::default(),
            flushed: Mutex::default(),
        }
    }

    /// Opens the book at `path`, loading what an earlier run flushed. A missing file is an
    /// empty book; an unreadable one is logged and started afresh.
    pub fn open(path: PathBuf) -> Self {
        let mut saved = read_saved(&path);
        let anonymous = saved
            .remove(ANONYMOUS)
            .map(|s| KeyUsage::restore("", s))
            .unwrap_or_default();
        let by_id = saved
            .into_iter()
            .map(|(id, s)| {
                let usage = Arc::new(KeyUsage::restore(&id, s));
                (id, usage)
            })
            .collect();
        UsageBook {
            path: Some(path),
            by_id: Arc::new(Mutex::new(by_id)),
            anonymous: Arc::new(anonymous),
            flushed: Mutex::default(),
        }
    }

    /// The cells, for the entries of a snapshot.
    pub fn cells(&self) -> Cells {
        Cells(Arc::clone(&self.by_id))
    }

    /// Every cell made so far, by key id: the keys that were ever used, whatever the key
    /// count, for reports that need only them.
    pub fn in_use(&self) -> Vec<(String, Arc<KeyUsage>)> {
        self.by_id
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(id, u)| (id.clone(), Arc::clone(u)))
            .collect()
    }

    pub fn get(&self, id: &str) -> Option<Arc<KeyUsage>> {
        self.by_id
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    pub fn last_use(&self, id: &str) -> Option<LastUse> {
        self.get(id).and_then(|u| u.last_use())
    }

    /// Every key's cell, for reports and alerts.
    pub fn all(&self) -> Vec<(String, Arc<KeyUsage>)> {
        let map = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
        map.iter().map(|(id, u)| (id.clone(), u.clone())).collect()
    }

    /// Forgets keys no longer in the store.
    pub fn retain(&self, live: impl Fn(&str) -> bool) {
        let mut map = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|id, _| live(id));
    }

    /// Rolls every key's day and minute forward (housekeeping, every few seconds).
    pub fn tick(&self, now: i64) {
        for (_, usage) in self.all() {
            usage.tick(now);
        }
        self.anonymous.tick(now);
    }

    /// Writes the book out (temp file, fsync, rename) if it changed since the last flush.
    ///
    /// Another process may share the file: during an upgrade the old and the new gateway run
    /// side by side. Under an exclusive lock on a file beside it, the book first takes in what
    /// the other wrote since this one last did ([`KeyUsage::sync`]), and keeps the other's
    /// keys this one never saw; so the counts of both add up, whichever writes last. When
    /// the file is still as this process left it, it is not read again.
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
        let mut on_disk = if last_writer == flushed.mark() {
            BTreeMap::new()
        } else {
            read_saved(path)
        };
        let mut cells: Vec<(String, Arc<KeyUsage>)> = self.all();
        cells.push((ANONYMOUS.to_string(), Arc::clone(&self.anonymous)));
        // Every key's record beside its cell, sorted by id as the file's map is: sorting
        // once costs what a map's inserts did, and marking the cells synced below needs no
        // lookup (at 100,000 keys those lookups' comparisons were an eighth of a flush).
        let mut keys: Vec<(&str, Option<&KeyUsage>, SavedUsage)> = Vec::with_capacity(cells.len());
        for (id, usage) in &cells {
            usage.sync(on_disk.remove(id).as_ref());
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
        let bytes = serde_json::to_vec(&UsageFileOut {
            version: 2,
            keys: &keys,
        })
        .map_err(io::Error::other)?;
        let fingerprint = fingerprint(&bytes);
        if flushed.fingerprint != fingerprint || last_writer != flushed.mark() {
            crate::keys::store::write_atomically(path, &bytes)?;
            flushed.fingerprint = fingerprint;
            flushed.writes = flushed.writes.wrapping_add(1);
            let mark = flushed.mark();
            lock.set_len(0)?;
            lock.seek(io::SeekFrom::Start(0))?;
            lock.write_all(mark.as_bytes())?;
        }
        // The file now holds what was saved of every cell.
        for (_, usage, saved) in &keys {
            if let Some(usage) = usage {
                usage.synced(saved);
            }
        }
        drop(flushed);
        lock.unlock()
    }
}

/// The lock file two processes sharing a usage file take turns on.
fn lock_path(usage: &Path) -> PathBuf {
    usage.with_extension("lock")
}

/// What was last flushed: a fingerprint to skip writing an unchanged book, and this book's
/// mark (its own random id and its count of writes), which it leaves in the lock file after
/// each write, to tell whether another process wrote the usage file since.
#[derive(Debug)]
struct Flushed {
    fingerprint: u64,
    writer: u64,
    writes: u64,
}

impl Default for Flushed {
    fn default() -> Self {
        let mut id = [0u8; 8];
        // Without OS randomness, the time: two processes started apart still differ.
        if getrandom::fill(&mut id).is_err() {
            id = crate::state::history::millis(std::time::SystemTime::now()).to_le_bytes();
        }
        Flushed {
            fingerprint: 0,
            writer: u64::from_le_bytes(id),
            writes: 0,
        }
    }
}

impl Flushed {
    fn mark(&self) -> String {
        format!("{:016x} {}", self.writer, self.writes)
    }
}

/// A cheap fingerprint to tell an unchanged book from a changed one: FNV-1a's steps over
/// eight bytes at a time, then the tail's bytes, then a final mix so that every input bit
/// reaches every output bit. A byte at a time, the multiplications' chain took a tenth of a
/// flush at 100,000 keys.
fn fingerprint(bytes: &[u8]) -> u64 {
    const PRIME: u64 = 0x100_0000_01b3;
    let words = bytes.chunks_exact(8);
    let tail = words.remainder();
    let h = words
        .map(|w| u64::from_le_bytes(w.try_into().unwrap_or([0; 8])))
        .fold(0xcbf2_9ce4_8422_2325, |h, w| (h ^ w).wrapping_mul(PRIME));
    let h = tail
        .iter()
        .fold(h, |h, &b| (h ^ u64::from(b)).wrapping_mul(PRIME));
    // The length, so that trailing zero bytes count; then splitmix64's finaliser.
    let mut z = h ^ bytes.len() as u64;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn read_saved(path: &Path) -> BTreeMap<String, SavedUsage> {
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

/// Every key's usage as flushed by a running gateway (for the CLI): id → report.
pub fn read_file(path: &Path, now: i64) -> BTreeMap<String, UsageReport> {
    read_saved(path)
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
        let on_disk = read_saved(&path);
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
        assert!(read_saved(&path).contains_key("k2"));
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
            keys: BTreeMap<String, SavedUsage>,
        }
        let keys = read_saved(&path);
        let ids: Vec<&str> = keys.keys().map(String::as_str).collect();
        assert_eq!(ids, ["a", "aa", "b", "c", "zz"]);
        let before = serde_json::to_vec(&AsBefore { version: 2, keys }).unwrap();
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            String::from_utf8(before).unwrap()
        );
        let saved = read_saved(&path);
        assert_eq!(
            saved["b"].totals.as_ref().unwrap()[ACCEPTED],
            3,
            "1 there + 2 here"
        );
        assert_eq!(saved["zz"].totals.as_ref().unwrap()[ACCEPTED], 2);
    }

    #[test]
    fn fingerprints_tell_books_apart() {
        let text = br#"{"version":2,"keys":{"a":{"last_used_at":1}}}"#;
        let mut seen = std::collections::HashSet::new();
        for cut in 0..=text.len() {
            assert!(
                seen.insert(fingerprint(&text[..cut])),
                "the first {cut} bytes"
            );
        }
        let mut changed = text.to_vec();
        for at in 0..changed.len() {
            changed[at] ^= 1;
            assert!(seen.insert(fingerprint(&changed)), "byte {at} changed");
            changed[at] ^= 1;
        }
        assert!(!seen.insert(fingerprint(text)));
        assert_ne!(fingerprint(&[0; 8]), fingerprint(&[0; 16]));
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
