//! Reloading: a file watch, SIGHUP and `POST /v1/reload` all end here. A reload builds the
//! next snapshot off the request path (a blocking task), and swaps it in only if it is valid;
//! otherwise the errors are reported and the snapshot in force keeps serving.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::audit::AuditEvent;
use crate::config::ConfigError;
use crate::gateway::Gateway;
use crate::keys::lifecycle::Op;
use crate::keys::redis_store::{Change, RedisStore};
use crate::keys::sqlite_store::Feed;
use crate::keys::{KeyError, KeyRecord};
use crate::rejection::Rejection;
use crate::snapshot::{Fingerprint, Snapshot, Written};

/// What a successful reload put in force.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ReloadOutcome {
    pub generation: u64,
    pub keys: usize,
    pub routes: usize,
}

/// What asked for a reload.
#[derive(Debug, Clone, Copy)]
pub enum Trigger<'a> {
    /// The config file or key store changed on disk.
    FileWatch,
    Sighup,
    /// `POST /v1/reload`, by the named admin token.
    Admin(&'a str),
    /// A key change through the admin API, made live before the API answers.
    KeyChange(&'a str),
    /// The Redis store published a new version (another node or the CLI changed a key), or
    /// this node resubscribed and resyncs; or a SQLite store's change feed moved on.
    StoreChange,
}

impl Trigger<'_> {
    fn actor(&self) -> &str {
        match self {
            Trigger::FileWatch => "file watch",
            Trigger::StoreChange => "store change",
            Trigger::Sighup => "sighup",
            Trigger::Admin(actor) | Trigger::KeyChange(actor) => actor,
        }
    }

    /// An operator's explicit reload and a key change always rebuild (a Redis store has no
    /// file to compare); the file watch skips files that have not changed since the snapshot
    /// in force was read.
    fn forced(&self) -> bool {
        !matches!(self, Trigger::FileWatch)
    }
}

fn outcome_of(s: &crate::snapshot::Snapshot) -> ReloadOutcome {
    ReloadOutcome {
        generation: s.generation,
        keys: s.key_count(),
        routes: s.routes.len(),
    }
}

/// Rebuilds the snapshot from the files and swaps it in if it is valid.
pub async fn reload(
    gw: &Arc<Gateway>,
    trigger: Trigger<'_>,
) -> Result<ReloadOutcome, Vec<ConfigError>> {
    let _one_at_a_time = gw.reload_lock.lock().await;
    let current = gw.snapshot.load_full();
    if !trigger.forced() && Fingerprint::current(&current) == current.fingerprint {
        return Ok(outcome_of(&current));
    }
    // Built and installed on a blocking thread: request threads only ever see the swap.
    let builder = gw.clone();
    let built = tokio::task::spawn_blocking(move || {
        let snapshot = builder.build_next()?;
        let outcome = outcome_of(&snapshot);
        builder.install(snapshot);
        Ok(outcome)
    })
    .await
    .unwrap_or_else(|e| {
        Err(vec![ConfigError::whole_file(
            &gw.config_path,
            format!("reload task failed: {e}"),
        )])
    });
    let actor = trigger.actor();
    let now = gw.clock.unix_secs();
    match built {
        Ok(outcome) => {
            gw.reloads.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                actor,
                generation = outcome.generation,
                keys = outcome.keys,
                routes = outcome.routes,
                "reloaded"
            );
            if !matches!(trigger, Trigger::KeyChange(_) | Trigger::StoreChange) {
                gw.audit.record(
                    &AuditEvent::new(now, actor, "config.reloaded").reason(format!(
                        "generation {}: {}, {}",
                        outcome.generation,
                        crate::keys::counted(outcome.keys, "key"),
                        crate::keys::counted(outcome.routes, "route")
                    )),
                );
            }
            Ok(outcome)
        }
        Err(errors) => {
            gw.reload_failures.fetch_add(1, Ordering::Relaxed);
            for e in &errors {
                tracing::error!(actor, error = %e, "reload refused; the running snapshot stays in force");
            }
            let first = errors.first().map(|e| e.to_string()).unwrap_or_default();
            gw.audit.record(
                &AuditEvent::new(now, actor, "config.reload_failed")
                    .failed(format!("{} problem(s); the first: {first}", errors.len())),
            );
            Err(errors)
        }
    }
}

/// What a lifecycle operation wrote: the records to make live.
pub trait Wrote {
    fn records(&self) -> Vec<KeyRecord>;
}

impl Wrote for KeyRecord {
    fn records(&self) -> Vec<KeyRecord> {
        vec![self.clone()]
    }
}

impl Wrote for (KeyRecord, String) {
    fn records(&self) -> Vec<KeyRecord> {
        vec![self.0.clone()]
    }
}

/// A top-up: the record as written, and its credits before.
impl Wrote for (KeyRecord, Option<crate::keys::CreditsRecord>) {
    fn records(&self) -> Vec<KeyRecord> {
        vec![self.0.clone()]
    }
}

/// An update: the record and its changes; nothing was written when there were none.
impl Wrote for (KeyRecord, Vec<String>) {
    fn records(&self) -> Vec<KeyRecord> {
        if self.1.is_empty() {
            return Vec::new();
        }
        vec![self.0.clone()]
    }
}

impl Wrote for (KeyRecord, String, KeyRecord) {
    fn records(&self) -> Vec<KeyRecord> {
        vec![self.0.clone(), self.2.clone()]
    }
}

/// Runs a lifecycle operation on a blocking thread, then makes what it wrote live. Returns
/// its result and any warning for the caller.
pub async fn change_keys<T: Wrote + Send + 'static>(
    gw: &Arc<Gateway>,
    actor: &str,
    operation: impl FnOnce(Op<'_>) -> Result<T, KeyError> + Send + 'static,
) -> Result<(T, Vec<String>), Rejection> {
    let snapshot = gw.snapshot.load_full();
    let actor_owned = actor.to_string();
    let now = gw.clock.unix_secs();
    let (done, written) = tokio::task::spawn_blocking(move || {
        let store = snapshot.store.witnessed();
        let done = operation(Op {
            store: &store,
            config: &snapshot.config,
            actor: &actor_owned,
            now,
        });
        done.map(|d| (d, store.written()))
    })
    .await
    .map_err(|_| Rejection::Internal)??;
    let mut warnings = Vec::new();
    let records = done.records();
    if records.is_empty() {
        // Nothing was written (an update that changed nothing): nothing to make live.
        return Ok((done, warnings));
    }
    let live = apply_key_changes(gw, actor, records, written).await;
    if let Err(errors) = live {
        warnings.push(format!(
            "the change is saved, but the gateway could not reload ({} problem(s) in the config or store), so it is not live yet",
            errors.len()
        ));
    }
    Ok((done, warnings))
}

/// A leak report: the keys it found.
impl Wrote for Vec<crate::keys::LeakFound> {
    fn records(&self) -> Vec<KeyRecord> {
        self.iter().filter_map(|f| f.key.clone()).collect()
    }
}

/// Makes the records a key change wrote live before the admin API answers. When the write
/// started from the store the snapshot in force was read from (no other writer came in
/// between), the records are applied to it as a delta: the new snapshot shares everything
/// else, so the cost does not grow with the key count. Otherwise, or if the delta is
/// refused, the whole store is read again, as any reload does.
pub async fn apply_key_changes(
    gw: &Arc<Gateway>,
    actor: &str,
    records: Vec<KeyRecord>,
    written: Option<Written>,
) -> Result<ReloadOutcome, Vec<ConfigError>> {
    {
        let _one_at_a_time = gw.reload_lock.lock().await;
        let current = gw.snapshot.load_full();
        if let Some(Written::Feed { before, after }) = written {
            // The feed's follower may have applied this write already; or another process
            // wrote in between, and the feed says what changed since the snapshot.
            if current.store_version.is_some_and(|v| v >= after) {
                return Ok(outcome_of(&current));
            }
            if current.store_version != Some(before) {
                drop(_one_at_a_time);
                return feed_past(gw, after).await;
            }
        }
        let follows = match &written {
            Some(w) => current.follows(w),
            None => current.store.redis().is_some(),
        };
        if follows && !records.is_empty() {
            match install_delta(gw, current, records, written, None).await {
                Ok((outcome, changed)) => {
                    tracing::info!(
                        actor,
                        generation = outcome.generation,
                        keys = outcome.keys,
                        changed,
                        "key change applied"
                    );
                    return Ok(outcome);
                }
                Err(errors) => {
                    for e in &errors {
                        tracing::warn!(actor, error = %e, "key change not applied as a delta; reading the whole store");
                    }
                }
            }
        }
    }
    reload(gw, Trigger::KeyChange(actor)).await
}

/// Writes a side collection of the store (alert rules, identities, admin tokens) through
/// `change`, on a blocking thread, then puts the new collection in force before it returns,
/// as `actor`. Returns what `change` returned.
pub async fn change_side<T: Send + 'static>(
    gw: &Arc<Gateway>,
    actor: &str,
    side: crate::keys::Side,
    change: impl FnOnce(&mut Vec<serde_json::Value>) -> Result<T, KeyError> + Send + 'static,
) -> Result<T, Rejection> {
    let snapshot = gw.snapshot.load_full();
    let (out, stored, written) = tokio::task::spawn_blocking(move || {
        let store = snapshot.store.witnessed();
        let mut after = Vec::new();
        let out = store.change_side(side, |docs| {
            let out = change(docs)?;
            after = docs.clone();
            Ok(out)
        })?;
        Ok::<_, KeyError>((out, after, store.written()))
    })
    .await
    .map_err(|_| Rejection::Internal)??;
    apply_side(gw, actor, side, stored, written)
        .await
        .map_err(Rejection::ReloadFailed)?;
    Ok(out)
}

/// Puts a side collection of the store in force after the admin API wrote it (`stored`,
/// through `written`): as a change to the snapshot in force when the write started from the
/// store it was read from, otherwise by reading everything again.
pub async fn apply_side(
    gw: &Arc<Gateway>,
    actor: &str,
    side: crate::keys::Side,
    stored: Vec<serde_json::Value>,
    written: Option<Written>,
) -> Result<ReloadOutcome, Vec<ConfigError>> {
    {
        let _one_at_a_time = gw.reload_lock.lock().await;
        let current = gw.snapshot.load_full();
        if written.as_ref().is_some_and(|w| current.follows(w)) {
            let builder = gw.clone();
            let path = current.store.path().to_path_buf();
            let applied = tokio::task::spawn_blocking(move || {
                let next = builder.next_with_side(&current, side, stored, written.as_ref())?;
                let outcome = outcome_of(&next);
                builder.put_side(next);
                Ok(outcome)
            })
            .await
            .unwrap_or_else(|e| {
                Err(vec![ConfigError::whole_file(
                    &path,
                    format!("{} change task failed: {e}", side.name()),
                )])
            });
            match applied {
                Ok(outcome) => return Ok(outcome),
                Err(errors) => {
                    for e in &errors {
                        tracing::warn!(actor, error = %e, side = side.name(), "not applied as a change; reading the whole store");
                    }
                }
            }
        }
    }
    reload(gw, Trigger::KeyChange(actor)).await
}

/// Builds the snapshot after a change to `records` and puts it in force, on a blocking
/// thread: copying the touched shards and the bookkeeping take a fraction of a millisecond
/// at a million keys, which must not stall a request thread. With `version`, the new
/// snapshot holds that store version. Callers hold the reload lock. Returns what is in force
/// and how many keys changed.
async fn install_delta(
    gw: &Arc<Gateway>,
    current: Arc<Snapshot>,
    records: Vec<KeyRecord>,
    written: Option<Written>,
    version: Option<u64>,
) -> Result<(ReloadOutcome, usize), Vec<ConfigError>> {
    let builder = gw.clone();
    let path = current.store.path().to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut next = builder.next_with_key_changes(&current, &records, written.as_ref())?;
        if version.is_some() {
            next.store_version = version;
        }
        let outcome = outcome_of(&next);
        let ids: Vec<String> = records.into_iter().map(|r| r.id).collect();
        builder.install_key_changes(next, &ids);
        builder.key_changes.fetch_add(1, Ordering::Relaxed);
        Ok((outcome, ids.len()))
    })
    .await
    .unwrap_or_else(|e| {
        Err(vec![ConfigError::whole_file(
            &path,
            format!("key change task failed: {e}"),
        )])
    })
}

/// Catches the snapshot up with a SQLite store's change feed until it holds the feed number
/// `after` (the follower may be applying changes at the same time), then reads the whole
/// store if it still does not.
async fn feed_past(gw: &Arc<Gateway>, after: u64) -> Result<ReloadOutcome, Vec<ConfigError>> {
    for _ in 0..5 {
        let current = gw.snapshot.load_full();
        if current.store_version.is_some_and(|v| v >= after) {
            return Ok(outcome_of(&current));
        }
        if let Err(e) = catch_up(gw).await {
            return Err(vec![ConfigError::whole_file(current.store.path(), e)]);
        }
    }
    reload(gw, Trigger::StoreChange).await
}

/// One publication from the Redis store's change stream. The very next version, with the ids
/// it set, is applied as a delta: only those records are read. A version already held is
/// skipped. Anything else (a version missed, a bulk write, a deletion, a publication this
/// build cannot read) reads the whole set.
async fn follow_change(gw: &Arc<Gateway>, redis: &RedisStore, change: Option<Change>) {
    let held = gw.snapshot.load().store_version;
    if let (Some(c), Some(v)) = (&change, held) {
        if c.version <= v {
            return;
        }
        if let (Some(ids), true) = (&c.ids, c.version == v.saturating_add(1)) {
            if apply_store_delta(gw, redis, c.version, ids).await {
                return;
            }
        }
    }
    let _ = reload(gw, Trigger::StoreChange).await;
}

/// Reads the records `ids` and applies them to the snapshot in force at `version - 1`,
/// making it `version`. False if that cannot be done exactly (then the caller reads the
/// whole set).
async fn apply_store_delta(
    gw: &Arc<Gateway>,
    redis: &RedisStore,
    version: u64,
    ids: &[String],
) -> bool {
    let fetch = (redis.clone(), ids.to_vec());
    let read = tokio::task::spawn_blocking(move || fetch.0.records(&fetch.1)).await;
    let Some(from) = version.checked_sub(1) else {
        return false;
    };
    apply_fetched(gw, read, from, version).await == Fetched::Applied
}

/// What became of records read for a store change.
#[derive(Debug, PartialEq, Eq)]
enum Fetched {
    Applied,
    /// The snapshot moved on meanwhile (another change was applied first).
    Stale,
    /// They could not all be read, or the delta was refused: only a whole read is exact.
    Failed,
}

/// Applies records read for a store change to the snapshot in force, if it is still at the
/// store version `from`, making it `to`.
async fn apply_fetched(
    gw: &Arc<Gateway>,
    read: Result<Result<Option<Vec<KeyRecord>>, String>, tokio::task::JoinError>,
    from: u64,
    to: u64,
) -> Fetched {
    let records = match read {
        Ok(Ok(Some(records))) => records,
        Ok(Err(error)) => {
            tracing::warn!(%error, "could not read the changed keys; reading the whole set");
            return Fetched::Failed;
        }
        _ => return Fetched::Failed,
    };
    let _one_at_a_time = gw.reload_lock.lock().await;
    let current = gw.snapshot.load_full();
    if current.store_version != Some(from) {
        return Fetched::Stale;
    }
    match install_delta(gw, current, records, None, Some(to)).await {
        Ok((outcome, changed)) => {
            tracing::info!(
                generation = outcome.generation,
                version = to,
                changed,
                "key change from the store applied"
            );
            Fetched::Applied
        }
        Err(errors) => {
            for e in &errors {
                tracing::warn!(error = %e, "key change from the store not applied as a delta; reading the whole set");
            }
            Fetched::Failed
        }
    }
}

/// How often the gateway reads a SQLite store's change feed.
pub const FEED_POLL: Duration = Duration::from_millis(250);

/// Follows a SQLite store's change feed: every [`FEED_POLL`], the snapshot catches up with
/// it ([`catch_up`]). While the database cannot be read, the node keeps serving the keys it
/// has, and says so once.
pub async fn follow_feed(gw: Arc<Gateway>, mut stop: watch::Receiver<Option<Duration>>) {
    let mut failing = false;
    loop {
        tokio::select! {
            () = tokio::time::sleep(FEED_POLL) => {}
            _ = stop.changed() => return,
        }
        if gw.snapshot.load().store.database().is_none() {
            return;
        }
        match catch_up(&gw).await {
            Ok(()) => {
                if std::mem::take(&mut failing) {
                    tracing::info!("the key store's change feed can be read again");
                }
            }
            Err(error) => {
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!(%error, "cannot read the key store's change feed; serving the keys held until it can");
                }
            }
        }
    }
}

/// Brings the snapshot in force up to a SQLite store's change feed: the keys changed since
/// the snapshot's feed number are read and applied as a delta. A bulk write, or a feed that
/// no longer reaches back far enough, reads the whole store.
async fn catch_up(gw: &Arc<Gateway>) -> Result<(), String> {
    let snapshot = gw.snapshot.load_full();
    let Some(held) = snapshot.store_version else {
        return Ok(());
    };
    let store = snapshot.store.clone();
    drop(snapshot);
    let read = tokio::task::spawn_blocking(move || {
        let db = store
            .database()
            .ok_or_else(|| "not a database".to_string())?;
        let feed = db.changes_since(held)?;
        let records = match &feed {
            Feed::Keys { ids, .. } => db.records(ids)?,
            _ => None,
        };
        Ok::<_, String>((feed, records))
    })
    .await
    .map_err(|e| e.to_string())?;
    let fetched = match read? {
        (Feed::Current, _) => return Ok(()),
        (Feed::Keys { to, .. }, records) => apply_fetched(gw, Ok(Ok(records)), held, to).await,
        (Feed::Everything, _) => Fetched::Failed,
    };
    // A snapshot that moved on meanwhile (the admin API applied its own write) catches up
    // at the next read of the feed.
    if fetched == Fetched::Failed {
        let _ = reload(gw, Trigger::StoreChange).await;
    }
    Ok(())
}

/// Follows a Redis store's change stream: every version published by a write elsewhere
/// reloads the keys, and after any reconnect the keys are reloaded whole, since changes may
/// have been missed meanwhile. While Redis is unreachable the node keeps serving the keys it
/// has, and says so once in the log. (A new `store.url` takes effect at the next start.)
pub async fn follow_store(gw: Arc<Gateway>, mut stop: watch::Receiver<Option<Duration>>) {
    use futures_util::StreamExt;
    let mut lost = false;
    loop {
        let Some(redis) = gw.snapshot.load().store.redis().cloned() else {
            return;
        };
        let subscribe = async {
            let mut pubsub = redis.client().get_async_pubsub().await?;
            pubsub.subscribe(redis.changes_channel()).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        if let Ok(Ok(mut pubsub)) = tokio::time::timeout(Duration::from_secs(3), subscribe).await {
            if std::mem::take(&mut lost) {
                tracing::info!(
                    redis = redis.shown(),
                    "key change stream from Redis is back; resyncing"
                );
            }
            let _ = reload(&gw, Trigger::StoreChange).await;
            let mut messages = pubsub.on_message();
            loop {
                tokio::select! {
                    message = messages.next() => {
                        let Some(message) = message else { break };
                        let payload: String = message.get_payload().unwrap_or_default();
                        follow_change(&gw, &redis, Change::parse(&payload)).await;
                    }
                    _ = stop.changed() => return,
                }
            }
        }
        if !std::mem::replace(&mut lost, true) {
            tracing::warn!(
                redis = redis.shown(),
                "lost the key change stream from Redis; serving the keys held until it returns"
            );
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.changed() => return,
        }
    }
}

/// How long the watch waits for a burst of file events to settle before reloading.
const DEBOUNCE: Duration = Duration::from_millis(150);

/// Watches the config file and the key store; any change reloads (debounced).
///
/// The folders are watched rather than the files, because an atomic write replaces the file
/// (a rename), which a watch on the old file would miss.
pub fn watch_files(
    gw: Arc<Gateway>,
    mut stop: watch::Receiver<Option<Duration>>,
) -> notify::Result<JoinHandle<()>> {
    let (tx, mut rx) = mpsc::unbounded_channel::<PathBuf>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // A read is no change: the gateway reads the key store itself (a listing of a file
        // store does), and those opens would otherwise keep the debounce below from ever
        // settling while the reads go on.
        if let Some(event) = event.ok().filter(|e| !e.kind.is_access()) {
            for path in event.paths {
                let _ = tx.send(path);
            }
        }
    })?;
    let mut watched: HashSet<PathBuf> = HashSet::new();
    watch_dirs(&gw, &mut watcher, &mut watched)?;
    Ok(tokio::spawn(async move {
        loop {
            let first = tokio::select! {
                path = rx.recv() => match path { Some(p) => p, None => break },
                _ = stop.changed() => break,
            };
            let mut relevant = is_watched_file(&gw, &first);
            // Let the burst settle: editors and atomic writes make several events per save.
            while let Ok(Some(p)) = tokio::time::timeout(DEBOUNCE, rx.recv()).await {
                relevant |= is_watched_file(&gw, &p);
            }
            if relevant && reload(&gw, Trigger::FileWatch).await.is_ok() {
                if let Err(e) = watch_dirs(&gw, &mut watcher, &mut watched) {
                    tracing::warn!(error = %e, "cannot watch the key store's new folder");
                }
            }
        }
        drop(watcher);
    }))
}

fn watch_dirs(
    gw: &Gateway,
    watcher: &mut impl Watcher,
    watched: &mut HashSet<PathBuf>,
) -> notify::Result<()> {
    let snapshot = gw.snapshot.load();
    for file in &snapshot.files {
        let dir = parent_dir(file);
        if watched.insert(dir.clone()) {
            watcher.watch(&dir, RecursiveMode::NonRecursive)?;
        }
    }
    Ok(())
}

fn parent_dir(file: &Path) -> PathBuf {
    match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Only the config file and the key store count; lock and temp files do not.
fn is_watched_file(gw: &Gateway, path: &Path) -> bool {
    let snapshot = gw.snapshot.load();
    snapshot
        .files
        .iter()
        .any(|f| f.file_name() == path.file_name() && same_dir(f, path))
}

fn same_dir(a: &Path, b: &Path) -> bool {
    let (a, b) = (parent_dir(a), parent_dir(b));
    a == b || a.canonicalize().ok() == b.canonicalize().ok()
}
