//! Telling the service manager where the gateway is, by systemd's notification protocol
//! (`sd_notify`): one datagram a state, to the Unix socket `NOTIFY_SOCKET` names (a path, or
//! `@name` in the abstract namespace). `READY=1` once the listeners serve, `RELOADING=1` then
//! `READY=1` around a reload (SIGHUP), `STOPPING=1` when the drain begins, and `WATCHDOG=1`
//! every half of `WATCHDOG_USEC` when the unit sets `WatchdogSec` (sent once the main runtime
//! and every worker's have each run a task, so a stuck runtime stops it). Without `NOTIFY_SOCKET` every call is
//! a no-op; a datagram that cannot be sent is logged once and never stops the gateway.

use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Where the service manager listens, and how often it wants to hear that all is well.
#[derive(Debug)]
pub struct Notifier {
    socket: Option<(UnixDatagram, Target)>,
    watchdog: Option<Duration>,
    warned: AtomicBool,
}

#[derive(Debug)]
enum Target {
    Path(std::path::PathBuf),
    Abstract(Vec<u8>),
}

impl Notifier {
    /// The notifier the environment asks for (`NOTIFY_SOCKET`, `WATCHDOG_USEC` and, when it
    /// is set, `WATCHDOG_PID`, which must be this process).
    pub fn from_env() -> Notifier {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let target = var("NOTIFY_SOCKET").map(|s| match s.strip_prefix('@') {
            Some(name) => Target::Abstract(name.as_bytes().to_vec()),
            None => Target::Path(s.into()),
        });
        let ours = var("WATCHDOG_PID").is_none_or(|pid| pid == std::process::id().to_string());
        let watchdog = var("WATCHDOG_USEC")
            .and_then(|us| us.parse::<u64>().ok())
            .filter(|us| *us > 0 && ours)
            // Never zero: a timer of zero would spin (and tokio refuses it).
            .map(|us| Duration::from_micros(us / 2).max(Duration::from_millis(1)));
        let socket = target.and_then(|t| match UnixDatagram::unbound() {
            Ok(s) => Some((s, t)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot make a socket to notify the service manager");
                None
            }
        });
        Notifier {
            watchdog: watchdog.filter(|_| socket.is_some()),
            socket,
            warned: AtomicBool::new(false),
        }
    }

    /// How often to send `WATCHDOG=1`, when the service manager watches.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends `state` (newline-separated `KEY=value` lines).
    pub fn send(&self, state: &str) {
        let Some((socket, target)) = &self.socket else {
            return;
        };
        let sent = match target {
            Target::Path(path) => socket.send_to(state.as_bytes(), path),
            Target::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name)
                    .and_then(|addr| socket.send_to_addr(state.as_bytes(), &addr))
            }
        };
        if let Err(e) = sent {
            if !self.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(error = %e, "cannot notify the service manager; going on without it");
            }
        }
    }

    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}"));
    }

    pub fn reloading(&self) {
        self.send("RELOADING=1\nSTATUS=reloading");
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=draining in-flight requests");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_reach_a_bound_socket_and_nothing_is_sent_without_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier {
            socket: Some((UnixDatagram::unbound().unwrap(), Target::Path(path))),
            watchdog: None,
            warned: AtomicBool::new(false),
        };
        notifier.ready("serving");
        let mut buf = [0u8; 256];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving");
        // A socket that went away is logged once, and the gateway goes on.
        drop(listener);
        notifier.stopping();
        notifier.stopping();
        assert!(notifier.warned.load(Ordering::Relaxed));
        let silent = Notifier {
            socket: None,
            watchdog: None,
            warned: AtomicBool::new(false),
        };
        silent.ready("serving");
        assert!(!silent.warned.load(Ordering::Relaxed));
    }
}
