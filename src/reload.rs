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

use crate::config::ConfigError;
use crate::server::Gateway;

/// What a successful reload put in force.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ReloadOutcome {
    pub generation: u64,
    pub keys: usize,
    pub routes: usize,
}

/// Rebuilds the snapshot from the files and swaps it in if it is valid.
pub async fn reload(
    gw: &Arc<Gateway>,
    cause: &'static str,
) -> Result<ReloadOutcome, Vec<ConfigError>> {
    let _one_at_a_time = gw.reload_lock.lock().await;
    let builder = gw.clone();
    let built = tokio::task::spawn_blocking(move || builder.build_next())
        .await
        .unwrap_or_else(|e| {
            Err(vec![ConfigError::whole_file(
                &gw.config_path,
                format!("reload task failed: {e}"),
            )])
        });
    match built {
        Ok(snapshot) => {
            let outcome = ReloadOutcome {
                generation: snapshot.generation,
                keys: snapshot.key_count(),
                routes: snapshot.routes.len(),
            };
            gw.install(snapshot);
            gw.reloads.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                cause,
                generation = outcome.generation,
                keys = outcome.keys,
                routes = outcome.routes,
                "reloaded"
            );
            Ok(outcome)
        }
        Err(errors) => {
            gw.reload_failures.fetch_add(1, Ordering::Relaxed);
            for e in &errors {
                tracing::error!(cause, error = %e, "reload refused; the running snapshot stays in force");
            }
            Err(errors)
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
        if let Ok(event) = event {
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
            if relevant && reload(&gw, "file change").await.is_ok() {
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
    for file in [&snapshot.config_path, &snapshot.keys_path] {
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
    [&snapshot.config_path, &snapshot.keys_path]
        .iter()
        .any(|f| f.file_name() == path.file_name() && same_dir(f, path))
}

fn same_dir(a: &Path, b: &Path) -> bool {
    let (a, b) = (parent_dir(a), parent_dir(b));
    a == b || a.canonicalize().ok() == b.canonicalize().ok()
}
