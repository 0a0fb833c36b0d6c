//! The listeners: binding, accept loops, connection limits and timers, TLS, and graceful
//! shutdown. They serve the shared state in [`crate::gateway`].

use std::convert::Infallible;
use std::future::Future as _;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::gateway::Gateway;
use crate::snapshot::{ListenerSettings, Snapshot};
use crate::tls::CertResolver;
use tokio_rustls::TlsAcceptor;

/// Runs [`Gateway::housekeeping`] every `usage.flush_interval`, and once more at shutdown;
/// delivers the alerts it reports to the webhook and by email, off the request path.
async fn housekeeping(gw: Arc<Gateway>, mut stop: watch::Receiver<Option<Duration>>) {
    let every =
        crate::config::units::parse_duration(&gw.snapshot.load().config.usage.flush_interval)
            .unwrap_or(Duration::from_secs(5));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        let g = gw.clone();
        let Ok(events) = tokio::task::spawn_blocking(move || g.housekeeping()).await else {
            continue;
        };
        let snapshot = gw.snapshot.load_full();
        let (webhook, smtp) = (&snapshot.alerts.webhook, &snapshot.alerts.smtp);
        for event in events {
            if let Some(webhook) = webhook.clone() {
                let (g, event) = (gw.clone(), event.clone());
                tokio::spawn(async move {
                    if !crate::alerts::deliver(&webhook, &event).await {
                        g.metrics.webhook_failures.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(rule = %event.rule, "alert not delivered after every retry");
                    }
                });
            }
            if let (Some(smtp), false) = (smtp.clone(), event.email.is_empty()) {
                let g = gw.clone();
                tokio::spawn(async move {
                    let to = event.email.clone();
                    if !crate::alerts::email::send(&smtp, &to, &event, 3).await {
                        g.metrics.email_failures.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(rule = %event.rule, "alert email not sent after every retry");
                    }
                });
            }
        }
    }
    let g = gw.clone();
    let _ = tokio::task::spawn_blocking(move || {
        g.housekeeping();
        g.audit.flush();
    })
    .await;
}

/// A started gateway: its bound addresses, and the handle that stops it.
pub struct Running {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The auth listener's address, when `listen.auth` is set.
    pub auth_addr: Option<SocketAddr>,
    pub gateway: Arc<Gateway>,
    stop_proxy: watch::Sender<Option<Duration>>,
    stop_rest: watch::Sender<Option<Duration>>,
    proxy_task: JoinHandle<()>,
    /// The admin listener, housekeeping, the auth listener when there is one (the first
    /// `watched`), then the store followers and the file watch.
    rest: Vec<JoinHandle<()>>,
    watched: usize,
    /// The worker threads' runtimes, when clients are served by workers of their own.
    workers: Vec<tokio::runtime::Handle>,
    /// Dropped with this: the worker threads' runtimes end (see [`spawn_workers`]).
    _workers_end: watch::Sender<()>,
}

/// The signals a serving process answers, caught from the moment this is made. Made before
/// the listeners open: a SIGTERM that lands just after the first request is answered is a
/// drain, not the default action's abrupt death.
pub struct Signals {
    hup: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
}

impl Signals {
    /// Takes over SIGHUP, SIGTERM, SIGINT and SIGUSR1; they wait here until
    /// [`Running::run_until_signal`] reads them.
    pub fn catch() -> io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            hup: signal(SignalKind::hangup())?,
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            usr1: signal(SignalKind::user_defined1())?,
        })
    }
}

/// Binds both listeners (the config's addresses; port 0 picks a free one) and starts serving
/// on the current runtime. With `watch`, changes to the config, key store or certificates
/// are picked up by themselves.
pub async fn start(gateway: Arc<Gateway>, watch: bool) -> io::Result<Running> {
    start_with(gateway, watch, None, 1).await
}

/// [`start`], with the listeners the service manager handed over (`LISTEN_FDS`) in place of
/// binding those it names, and with `workers` serving threads: at 2 or more, the proxy's
/// and the auth listener's connections are served by that many threads of their own (see
/// [`spawn_workers`]); the admin listener, housekeeping and reloads stay on the current
/// runtime.
pub async fn start_with(
    gateway: Arc<Gateway>,
    watch: bool,
    mut inherited: Option<Inherited>,
    workers: usize,
) -> io::Result<Running> {
    let snapshot = gateway.snapshot.load_full();
    let settings = snapshot.listeners;
    raise_fd_limit(&snapshot, workers.max(1));
    let mut listener = |what: &str, position: usize, addr: SocketAddr| -> io::Result<_> {
        match inherited
            .as_mut()
            .map(|i| i.take(what, position))
            .transpose()?
            .flatten()
        {
            Some(handed) => {
                tracing::info!(
                    listener = what,
                    "listening on the socket the service manager handed over"
                );
                handed.set_nonblocking(true)?;
                Ok((TcpListener::from_std(handed)?, Bound::Handed))
            }
            None => Ok((bind(addr, what)?, Bound::Here)),
        }
    };
    let (proxy, proxy_bound) = listener("proxy", 0, settings.proxy)?;
    let (admin, _) = listener("admin", 1, settings.admin)?;
    let auth = match settings.auth {
        Some(addr) => Some(listener("auth", 2, addr)?),
        None => None,
    };
    let proxy_addr = proxy.local_addr()?;
    let admin_addr = admin.local_addr()?;
    let auth_addr = auth.as_ref().map(|(l, _)| l.local_addr()).transpose()?;
    let acceptor = |resolver: &Option<Arc<CertResolver>>| -> io::Result<_> {
        resolver
            .clone()
            .map(|r| crate::tls::server_config(r).map(TlsAcceptor::from))
            .transpose()
            .map_err(io::Error::other)
    };
    let (proxy_tls, admin_tls) = (
        acceptor(&gateway.proxy_certs)?,
        acceptor(&gateway.admin_certs)?,
    );
    let (stop_proxy, proxy_stop) = watch::channel(None);
    let (stop_rest, rest_stop) = watch::channel(None);
    let watched = if auth.is_some() { 3 } else { 2 };
    let (workers_end, ends) = watch::channel(());
    // The proxy's accept loop (or its workers'), then, when there is one, the auth
    // listener's: it stops with the proxy, since both answer clients' requests and drain
    // alike.
    let mut hot = vec![(proxy, proxy_bound, Listener::Proxy, proxy_tls)];
    hot.extend(auth.map(|(auth, bound)| (auth, bound, Listener::Auth, None)));
    let (hot_tasks, runtimes) = if workers >= 2 {
        spawn_workers(workers, hot, &gateway, settings, &proxy_stop, &ends)?
    } else {
        let tasks = hot.into_iter().map(|(listener, _, kind, tls)| {
            tokio::spawn(accept_loop(
                listener,
                gateway.clone(),
                settings,
                kind,
                tls,
                connection_slots(&settings),
                proxy_stop.clone(),
            ))
        });
        (tasks.collect(), Vec::new())
    };
    let mut hot_tasks = hot_tasks.into_iter();
    let Some(proxy_task) = hot_tasks.next() else {
        return Err(io::Error::other("the proxy listener did not start"));
    };
    let mut rest = vec![
        tokio::spawn(accept_loop(
            admin,
            gateway.clone(),
            settings,
            Listener::Admin,
            admin_tls,
            connection_slots(&settings),
            rest_stop.clone(),
        )),
        tokio::spawn(housekeeping(gateway.clone(), rest_stop.clone())),
    ];
    rest.extend(hot_tasks);
    if snapshot.store.database().is_some() {
        rest.push(tokio::spawn(crate::reload::follow_feed(
            gateway.clone(),
            rest_stop.clone(),
        )));
    }
    if snapshot.store.redis().is_some() {
        rest.push(tokio::spawn(crate::reload::follow_store(
            gateway.clone(),
            rest_stop.clone(),
        )));
        rest.push(tokio::spawn(crate::shared_usage::run(
            gateway.clone(),
            rest_stop.clone(),
        )));
    }
    if watch {
        match crate::reload::watch_files(gateway.clone(), rest_stop.clone()) {
            Ok(task) => rest.push(task),
            Err(e) => {
                tracing::warn!(error = %e, "file watch unavailable; reload with SIGHUP or POST /v1/reload")
            }
        }
    }
    tracing::info!(
        proxy = %proxy_addr,
        admin = %admin_addr,
        auth = %auth_addr.map_or_else(|| "off".to_string(), |a| a.to_string()),
        proxy_tls = settings.proxy_tls,
        admin_tls = settings.admin_tls,
        generation = snapshot.generation,
        keys = snapshot.key_count(),
        "keygate listening"
    );
    Ok(Running {
        proxy_addr,
        admin_addr,
        auth_addr,
        gateway,
        stop_proxy,
        stop_rest,
        proxy_task,
        rest,
        watched,
        workers: runtimes,
        _workers_end: workers_end,
    })
}

thread_local! {
    /// This thread's serving worker number: 1 and up on a worker thread, 0 elsewhere.
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The serving worker this thread is (1 and up), or 0 off the worker threads: the upstream
/// pool keeps each worker's connections apart by it.
pub fn worker() -> usize {
    WORKER.try_with(std::cell::Cell::get).unwrap_or(0)
}

/// Makes this thread serving worker `number` (1 and up).
pub(crate) fn become_worker(number: usize) {
    let _ = WORKER.try_with(|w| w.set(number));
}

/// Where a listening socket came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bound {
    /// Bound here, with `SO_REUSEPORT`.
    Here,
    /// Handed over by the service manager.
    Handed,
}

/// A listener whose connections the workers serve, where it came from, its kind and its TLS.
type Hot = (TcpListener, Bound, Listener, Option<TlsAcceptor>);

/// Serves each `hot` listener on `workers` threads, as nginx's worker processes do: each
/// thread runs its own single-thread runtime and accepts on a listening socket of its own,
/// so that a connection, its requests and the upstream connections they lease stay on the
/// thread that accepted it, and a request never wakes a task on another core.
///
/// A socket bound here gets a sibling per worker on the same address (`SO_REUSEPORT`, as
/// nginx's `reuseport`): the kernel spreads new connections evenly over the workers, and a
/// new connection wakes one worker, not all. A socket the service manager handed over is
/// shared instead (a copy of its descriptor per worker), so that it alone holds the
/// connections that wait while keygate restarts.
///
/// Returns, for each listener in order, a task that ends once every worker's accept loop for
/// it has ended (drained, after `stop`), ends at once if one ends on its own, and panics
/// with the panic of one that panicked. Each worker's runtime, with the upgraded connections
/// and pooled upstream connections on it, lives until `end`'s sender is dropped (with the
/// [`Running`] that holds it).
fn spawn_workers(
    workers: usize,
    hot: Vec<Hot>,
    gateway: &Arc<Gateway>,
    settings: ListenerSettings,
    stop: &watch::Receiver<Option<Duration>>,
    end: &watch::Receiver<()>,
) -> io::Result<(Vec<JoinHandle<()>>, Vec<tokio::runtime::Handle>)> {
    // How a worker's accept loop ended: `Err(None)` when it never started.
    type Ended = tokio::sync::mpsc::UnboundedSender<Result<(), Option<tokio::task::JoinError>>>;
    let mut listeners = Vec::with_capacity(hot.len());
    let mut coordinators = Vec::with_capacity(hot.len());
    for (listener, bound, kind, tls) in hot {
        let (ended, mut reports): (Ended, _) = tokio::sync::mpsc::unbounded_channel();
        let slots = connection_slots(&settings);
        listeners.push((listener.into_std()?, bound, kind, tls, slots, ended));
        coordinators.push(tokio::spawn(async move {
            for _ in 0..workers {
                match reports.recv().await {
                    Some(Ok(())) => {}
                    Some(Err(Some(e))) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                    // Cancelled, never started, or its thread gone: the listener is not
                    // served whole, and its task ends so that the process does.
                    _ => {
                        tracing::error!(listener = ?kind, "a worker stopped serving");
                        return;
                    }
                }
            }
        }));
    }
    let mut runtimes = Vec::with_capacity(workers);
    for worker in 1..=workers {
        let mut loops = Vec::with_capacity(listeners.len());
        for (listener, bound, kind, tls, slots, ended) in &listeners {
            let own = match bound {
                Bound::Here if worker > 1 => {
                    bind(listener.local_addr()?, kind.name())?.into_std()?
                }
                _ => listener.try_clone()?,
            };
            loops.push((own, *kind, tls.clone(), slots.clone(), ended.clone()));
        }
        let (gateway, stop, mut end) = (gateway.clone(), stop.clone(), end.clone());
        // The runtime is made and dropped on its own thread: a runtime dropped where
        // blocking is not allowed (this async function) would panic.
        let (made, handle) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name(format!("keygate-w{worker}"))
            .spawn(move || {
                become_worker(worker);
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = made.send(Err(e));
                        return;
                    }
                };
                let _ = made.send(Ok(runtime.handle().clone()));
                runtime.block_on(async move {
                    for (listener, kind, tls, slots, ended) in loops {
                        let listener = match TcpListener::from_std(listener) {
                            Ok(listener) => listener,
                            Err(e) => {
                                tracing::error!(error = %e, listener = ?kind, worker, "cannot serve the listener");
                                let _ = ended.send(Err(None));
                                continue;
                            }
                        };
                        let task = tokio::spawn(accept_loop(
                            listener,
                            gateway.clone(),
                            settings,
                            kind,
                            tls,
                            slots,
                            stop.clone(),
                        ));
                        tokio::spawn(async move {
                            let _ = ended.send(task.await.map_err(Some));
                        });
                    }
                    // Fails once the sender is dropped: then this worker's runtime ends.
                    while end.changed().await.is_ok() {}
                });
            })?;
        // A moment's wait at start, for a thread that is only making its runtime.
        let runtime = handle
            .recv()
            .map_err(|_| io::Error::other("a worker thread ended as it started"))??;
        runtimes.push(runtime);
    }
    Ok((coordinators, runtimes))
}

/// Whether every worker's runtime runs a task within `limit`, one after the other: a worker
/// stuck in a busy loop or a blocking call does not, and the watchdog then stops pinging.
async fn workers_respond(workers: &[tokio::runtime::Handle], limit: Duration) -> bool {
    for worker in workers {
        if !matches!(
            tokio::time::timeout(limit, worker.spawn(async {})).await,
            Ok(Ok(()))
        ) {
            return false;
        }
    }
    true
}

/// Descriptors kept aside for the key store, logs, certificates and the like.
const FD_RESERVE: u64 = 256;

/// Raises the soft limit on open files to the hard limit, as Go's runtime and nginx's
/// `worker_rlimit_nofile` do: systemd's default soft limit (1024) would otherwise make
/// `limits.max_connections` a fiction. Warns when the cap cannot fit: each proxied
/// connection may hold one upstream connection too, and each worker's pools keep idle ones.
fn raise_fd_limit(snapshot: &Snapshot, workers: usize) {
    let (soft, hard) = match rlimit::Resource::NOFILE.get() {
        Ok(limits) => limits,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the open-file limit");
            return;
        }
    };
    let in_force = if soft < hard {
        match rlimit::Resource::NOFILE.set(hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                tracing::warn!(error = %e, soft, hard, "cannot raise the open-file limit");
                soft
            }
        }
    } else {
        soft
    };
    let connections = snapshot.listeners.max_connections as u64;
    let pooled = (snapshot.config.upstream.pool_max_idle_per_host as u64)
        .saturating_mul(snapshot.clients.len() as u64)
        .saturating_mul(workers as u64);
    let needed = connections
        .saturating_mul(2)
        .saturating_add(pooled)
        .saturating_add(FD_RESERVE);
    tracing::info!(limit = in_force, was = soft, needed, "open-file limit");
    if in_force < needed {
        tracing::warn!(
            limit = in_force,
            needed,
            max_connections = connections,
            "the open-file limit cannot hold limits.max_connections with an upstream connection each; raise LimitNOFILE (systemd) or ulimit -n, or lower limits.max_connections"
        );
    }
}

/// Listening sockets the service manager handed over (systemd socket activation:
/// `LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES`), so that the socket outlives every restart
/// and no connection is refused while keygate is down: it waits in the socket's queue.
pub struct Inherited {
    fds: listenfd::ListenFd,
    names: Vec<String>,
}

impl Inherited {
    /// The sockets the environment hands over, if any. Read before the runtime starts its
    /// threads: it takes the variables out of the environment.
    pub fn from_env() -> Option<Inherited> {
        let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
        let fds = listenfd::ListenFd::from_env();
        (fds.len() > 0).then(|| Inherited {
            fds,
            names: names.split(':').map(str::to_string).collect(),
        })
    }

    /// The socket for listener `what`: the one named so (`FileDescriptorName=` in the
    /// socket unit), else the one at `position` (proxy, admin, auth) unless that one is
    /// named for another listener.
    fn take(&mut self, what: &str, position: usize) -> io::Result<Option<std::net::TcpListener>> {
        let ours = ["proxy", "admin", "auth"];
        let index = match self.names.iter().position(|n| n == what) {
            Some(i) => i,
            None if self
                .names
                .get(position)
                .is_some_and(|n| ours.contains(&n.as_str())) =>
            {
                return Ok(None)
            }
            None => position,
        };
        self.fds.take_tcp_listener(index).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("the {what} socket handed over by the service manager: {e}"),
            )
        })
    }
}

/// Connections a listener's kernel queue holds before the gateway accepts them.
const BACKLOG: u32 = 4096;

/// A listener on `addr` with `SO_REUSEPORT` (and `SO_REUSEADDR`), so that a new keygate can
/// start beside a running one on the same addresses, and the kernel spreads new connections
/// over both until the old one drains and exits: an upgrade refuses no connection.
fn bind(addr: SocketAddr, what: &str) -> io::Result<TcpListener> {
    let listen = || {
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        socket.set_reuseport(true)?;
        socket.bind(addr)?;
        socket.listen(BACKLOG)
    };
    listen().map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr} ({what}): {e}")))
}

impl Running {
    /// Drains and stops: `/readyz` turns unready at once; the proxy stops accepting; requests
    /// and upgraded connections in flight get up to `drain` to finish; then usage and audit
    /// are flushed and the admin listener closes. `/healthz` answers throughout.
    pub async fn shutdown(self, drain: Duration) {
        self.gateway.draining.store(true, Ordering::SeqCst);
        // The drain is at most an hour (ranges::DRAIN_TIMEOUT): the adds cannot overflow.
        let start = tokio::time::Instant::now();
        let deadline = start.checked_add(drain).unwrap_or(start);
        let grace = deadline
            .checked_add(Duration::from_secs(1))
            .unwrap_or(deadline);
        let _ = self.stop_proxy.send(Some(drain));
        if tokio::time::timeout_at(grace, self.proxy_task)
            .await
            .is_err()
        {
            tracing::warn!("requests still in flight at the drain timeout");
        }
        if tokio::time::timeout_at(deadline, self.gateway.tunnels.drained())
            .await
            .is_err()
        {
            tracing::warn!(
                open = self.gateway.tunnels.open(),
                "upgraded connections still open at the drain timeout; closing them"
            );
        }
        let _ = self.stop_rest.send(Some(Duration::from_secs(1)));
        for task in self.rest {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        // Every request has been answered: the access log's last lines are written.
        let g = Arc::clone(&self.gateway);
        let _ = tokio::task::spawn_blocking(move || g.close_access_log()).await;
    }

    /// A gateway with a dead listener must not run on as if it served: it flushes usage and
    /// the audit log and ends, so that the service manager starts a whole one.
    async fn stopped_by(self, (task, panicked): (usize, bool)) -> io::Result<()> {
        let what = match task {
            0 => "the proxy listener",
            1 => "the admin listener",
            2 => "housekeeping",
            _ => "the auth listener",
        };
        tracing::error!(
            task = what,
            panicked,
            "a core task ended; exiting so that the service manager restarts keygate"
        );
        self.gateway.draining.store(true, Ordering::SeqCst);
        let g = self.gateway.clone();
        let _ = tokio::task::spawn_blocking(move || {
            g.housekeeping();
            g.audit.flush();
            g.close_access_log();
        })
        .await;
        Err(io::Error::other(format!(
            "{what} stopped unexpectedly{}; see the log",
            if panicked { " (it panicked)" } else { "" }
        )))
    }

    /// Serves until SIGTERM or SIGINT (then drains for `limits.drain_timeout`) and reloads
    /// on SIGHUP; reopens the access log on SIGUSR1.
    pub async fn run_until_signal(mut self, signals: Signals) -> io::Result<()> {
        let Signals {
            mut hup,
            mut term,
            mut int,
            mut usr1,
        } = signals;
        // The service manager hears that the listeners serve (the snapshot was built before
        // they opened), around each SIGHUP reload, and when the drain begins.
        let notifier = Arc::new(crate::notify::Notifier::from_env());
        let serving = |gw: &Gateway| format!("serving {} keys", gw.snapshot.load().key_count());
        notifier.ready(&serving(&self.gateway));
        // Sent from this runtime, once every worker's runtime has run a task too: a stuck
        // one, here or on a worker, stops the pings.
        let watchdog = notifier.watchdog().map(|every| {
            let notifier = Arc::clone(&notifier);
            let workers = self.workers.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tick.tick().await;
                    if workers_respond(&workers, every).await {
                        notifier.send("WATCHDOG=1");
                    }
                }
            })
        });
        let ended = loop {
            tokio::select! {
                _ = hup.recv() => {
                    notifier.reloading();
                    let _ = crate::reload::reload(&self.gateway, crate::reload::Trigger::Sighup).await;
                    notifier.ready(&serving(&self.gateway));
                }
                // As nginx: logrotate renames the access log, then asks for a new one.
                _ = usr1.recv() => {
                    if let Some(log) = &self.gateway.access_log {
                        log.reopen();
                    }
                }
                _ = term.recv() => break None,
                _ = int.recv() => break None,
                ended = first_task_to_end(&mut self.proxy_task, self.rest.get_mut(..self.watched).unwrap_or_default()) => break Some(ended),
            }
        };
        notifier.stopping();
        if let Some(ended) = ended {
            return self.stopped_by(ended).await;
        }
        let drain = self.gateway.snapshot.load().listeners.drain;
        tracing::info!(
            drain_secs = drain.as_secs(),
            "shutting down: draining in-flight requests"
        );
        self.shutdown(drain).await;
        if let Some(task) = watchdog {
            task.abort();
        }
        Ok(())
    }
}

/// Resolves when the proxy's accept loop or one of `rest` (the admin listener's,
/// housekeeping and the auth listener's) ends, which before a shutdown only a bug can make it do (a panic unwinds
/// that task alone). Says which (0 is the proxy, then `rest` in order), and whether it
/// panicked. The store followers and the file watch may end on their own, and are not here.
async fn first_task_to_end(
    proxy: &mut JoinHandle<()>,
    rest: &mut [JoinHandle<()>],
) -> (usize, bool) {
    std::future::poll_fn(|cx| {
        let tasks = std::iter::once(&mut *proxy).chain(rest.iter_mut());
        for (i, task) in tasks.enumerate() {
            if let std::task::Poll::Ready(result) = std::pin::Pin::new(task).poll(cx) {
                return std::task::Poll::Ready((i, result.is_err_and(|e| e.is_panic())));
            }
        }
        std::task::Poll::Pending
    })
    .await
}

#[derive(Debug, Clone, Copy)]
enum Listener {
    Proxy,
    Admin,
    Auth,
}

impl Listener {
    fn name(self) -> &'static str {
        match self {
            Listener::Proxy => "proxy",
            Listener::Admin => "admin",
            Listener::Auth => "auth",
        }
    }
}

/// A listener's connection slots: `limits.max_connections`, shared by the workers that
/// accept on it. Past the cap, accept waits for a connection to end: never a crash, never a
/// refusal.
fn connection_slots(settings: &ListenerSettings) -> Arc<tokio::sync::Semaphore> {
    let cap = u32::try_from(settings.max_connections).unwrap_or(u32::MAX);
    Arc::new(tokio::sync::Semaphore::new(cap as usize))
}

async fn accept_loop(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    settings: ListenerSettings,
    kind: Listener,
    tls: Option<TlsAcceptor>,
    slots: Arc<tokio::sync::Semaphore>,
    mut stop: watch::Receiver<Option<Duration>>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // The slowloris defence is the connection's own timer (`idle` below), which looks
        // at each connection a few times a timeout rather than arming a timer per request.
        .header_read_timeout(None)
        .max_buf_size(settings.max_header_size.max(8192))
        .max_headers(settings.max_headers)
        .writev(false)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(settings.h2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(settings.max_header_size).unwrap_or(u32::MAX))
        // A peer that stops answering PINGs is gone: its connection is closed, even while
        // a stream is open, and even while a graceful close waits for its PING's answer.
        .keep_alive_interval(Some(H2_PING_INTERVAL))
        .keep_alive_timeout(H2_PING_TIMEOUT)
        // The rapid-reset defence (CVE-2023-44487): a peer that resets streams faster than
        // they are served gets GOAWAY.
        .max_pending_accept_reset_streams(Some(20))
        .max_local_error_reset_streams(Some(256));
    let timers = ConnTimers {
        first_request: settings.header_read_timeout,
        idle: settings.idle_timeout,
    };
    let cap = u32::try_from(settings.max_connections).unwrap_or(u32::MAX);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            _ = stop.changed() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of descriptors and the like: wait a little instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let gw = gateway.clone();
        let secure = tls.is_some();
        let client = Arc::new(crate::pipeline::ClientConn::new(peer, secure));
        let conn_client = client.clone();
        let service = service_fn(move |req| {
            let (gw, client) = (gw.clone(), client.clone());
            async move {
                let _busy = client.activity.begin(req.version());
                Ok::<_, Infallible>(match kind {
                    Listener::Proxy => crate::pipeline::handle(&gw, req, &client).await,
                    Listener::Admin => crate::admin::handle(&gw, req, client.peer).await,
                    Listener::Auth => crate::auth_listener::handle(&gw, req, &client).await,
                })
            }
        });
        let (builder, tls, stop) = (builder.clone(), tls.clone(), stop.clone());
        let span = tracing::debug_span!("conn", listener = ?kind, %peer, tls = secure);
        tokio::spawn(
            async move {
                let _slot = slot;
                let conn = &conn_client;
                match tls {
                    None => serve_conn(&builder, stream, service, conn, timers, stop).await,
                    Some(acceptor) => {
                        let handshake = acceptor.accept(stream);
                        match tokio::time::timeout(timers.first_request, handshake).await {
                            Ok(Ok(tls_stream)) => {
                                serve_conn(&builder, tls_stream, service, conn, timers, stop).await
                            }
                            Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                            Err(_) => tracing::debug!("TLS handshake timed out"),
                        }
                    }
                }
            }
            .instrument(span),
        );
    }
    drop(listener);
    let drain = stop.borrow().unwrap_or_default();
    // Every connection holds a slot until it ends; each was told to close gracefully.
    if tokio::time::timeout(drain, slots.acquire_many(cap))
        .await
        .is_err()
    {
        tracing::warn!(listener = ?kind, "connections still open after the drain timeout; closing them");
    }
}

/// HTTP/2 keep-alive: a PING every this long on every connection...
const H2_PING_INTERVAL: Duration = Duration::from_secs(30);
/// ...answered within this long, or the peer is gone.
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// A connection's own deadlines, over HTTP/1 and HTTP/2 alike.
#[derive(Debug, Clone, Copy)]
struct ConnTimers {
    /// From the connection's start (or its TLS handshake's) to its first request: a socket
    /// that sends nothing, or an HTTP/2 preface and SETTINGS alone, is closed then. Over
    /// HTTP/1 it also bounds each later head, from its first bytes.
    first_request: Duration,
    /// With no request begun or in flight for this long, the connection is closed.
    idle: Duration,
}

impl ConnTimers {
    /// How often a connection's timer looks at it: twice a header timeout, and at least once
    /// an idle timeout.
    fn tick(self) -> Duration {
        self.first_request
            .checked_div(2)
            .unwrap_or(self.first_request)
            .min(self.idle)
            .max(Duration::from_millis(1))
    }
}

/// Serves one connection until it ends, closing it gracefully when it goes idle or the
/// listener drains. A graceful close never cuts an exchange short: HTTP/1 finishes the
/// response in progress, HTTP/2 sends GOAWAY and lets open streams finish.
async fn serve_conn<I, S>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    service: S,
    client: &Arc<crate::pipeline::ClientConn>,
    timers: ConnTimers,
    mut stop: watch::Receiver<Option<Duration>>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<crate::body::ResponseBody>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let activity = &client.activity;
    let io = Watched {
        inner: io,
        client: client.clone(),
    };
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut closing = false;
    // The drain began before the connection's first request did.
    let mut drain_after_first = false;
    let result = loop {
        tokio::select! {
            result = conn.as_mut() => break result,
            why = idle(activity, timers), if !closing => {
                if why == Closing::Late {
                    tracing::debug!("no whole request in time; connection dropped");
                    break Ok(());
                }
                tracing::debug!("connection idle; closing it");
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = stop.changed(), if !closing && !drain_after_first => {
                if activity.state().0 == 0 {
                    // Accepted just before the drain, its request still on the way: closing
                    // now would drop a request the client has already sent. It is served
                    // that one request first (HTTP/1 then closes after the answer), within
                    // the time any first request has (`limits.header_read_timeout`, after
                    // which the idle timer closes it).
                    drain_after_first = true;
                } else {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
            () = first_request_begun(activity), if drain_after_first && !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// Resolves once the connection's first request has begun. Only a connection accepted just
/// before a drain waits on it, so it is polled rather than signalled.
async fn first_request_begun(activity: &crate::pipeline::Activity) {
    while activity.state().0 == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Why a connection's timer ends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closing {
    /// No request begun or in flight for `idle`: closed gracefully.
    Idle,
    /// No whole request in the first `first_request`, or an HTTP/1 request's head still
    /// incomplete `first_request` after its first bytes: dropped, as a header timeout.
    Late,
}

/// Resolves once the connection should close. First, when it has made no request in
/// `first_request` of its start. Later it looks every [`ConnTimers::tick`]: a head whose bytes
/// began arriving more than `first_request` ago and is still incomplete (so it is cut
/// between one and one and a half of those after its first byte), or no request begun and
/// none in flight for `idle` (closed between `idle` and one tick more after its last
/// request). One timer per connection, not one per request.
async fn idle(activity: &crate::pipeline::Activity, timers: ConnTimers) -> Closing {
    tokio::time::sleep(timers.first_request).await;
    let (mut seen, busy) = activity.state();
    if seen == 0 && !busy {
        return Closing::Late;
    }
    let tick = timers.tick();
    let (mut quiet, mut slow) = (Duration::ZERO, Duration::ZERO);
    loop {
        tokio::time::sleep(tick).await;
        let (begun, busy) = activity.state();
        if begun != seen || busy {
            seen = begun;
            (quiet, slow) = (Duration::ZERO, Duration::ZERO);
            continue;
        }
        quiet = quiet.saturating_add(tick);
        slow = if activity.head_pending() {
            slow.saturating_add(tick)
        } else {
            Duration::ZERO
        };
        if slow > timers.first_request {
            return Closing::Late;
        }
        if quiet >= timers.idle {
            return Closing::Idle;
        }
    }
}

/// A client's stream, counting the reads that bring bytes into its connection's activity.
struct Watched<I> {
    inner: I,
    client: Arc<crate::pipeline::ClientConn>,
}

impl<I: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Watched<I> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.client.activity.read();
        }
        poll
    }
}

impl<I: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Watched<I> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_core_task_that_panics_is_found_and_named() {
        let mut proxy = tokio::spawn(std::future::pending::<()>());
        let mut rest = vec![
            tokio::spawn(std::future::pending::<()>()),
            tokio::spawn(async { panic!("a bug in housekeeping") }),
        ];
        assert_eq!(first_task_to_end(&mut proxy, &mut rest).await, (2, true));
        let mut rest = vec![tokio::spawn(async {})];
        assert_eq!(first_task_to_end(&mut proxy, &mut rest).await, (1, false));
        proxy.abort();
    }

    /// The watchdog's check: a worker whose runtime runs answers; one that never gets to run
    /// its tasks (here a runtime nothing drives, as a worker stuck in a blocking call) does
    /// not, within the limit.
    #[tokio::test]
    async fn the_watchdog_hears_from_every_running_worker_and_not_from_a_stuck_one() {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let (made, handle) = std::sync::mpsc::channel();
        let running = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            made.send(rt.handle().clone()).unwrap();
            rt.block_on(async {
                while stopped.try_recv().is_err() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            });
        });
        let alive = handle.recv().unwrap();
        assert!(workers_respond(std::slice::from_ref(&alive), Duration::from_secs(10)).await);
        let stuck = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let workers = [alive, stuck.handle().clone()];
        assert!(!workers_respond(&workers, Duration::from_millis(200)).await);
        stop.send(()).unwrap();
        running.join().unwrap();
        // Dropped off the async context, as a worker's runtime is.
        std::thread::spawn(move || drop(stuck)).join().unwrap();
    }
}
