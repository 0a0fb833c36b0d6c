//! Prometheus metrics, served at `GET /metrics` on the admin listener. Counters are atomics
//! kept outside the snapshot (per-route counters are looked up by route name when a snapshot
//! is built, so they survive reloads); nothing is locked on the request path, and each
//! serving worker adds to its own part of every counter ([`PerWorker`]). Labels stay
//! bounded: routes come from the config, codes from a fixed list, and key ids appear only if
//! `metrics.per_key` turns them on.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::rejection::{code_index, Rejection, CODES};

/// How many parts a [`PerWorker`] counter set is kept in. Workers past this many share
/// parts (by their number modulo this), as do the threads that are no serving worker.
pub(crate) const PARTS: usize = 16;

/// `N` counters kept in [`PARTS`] parts, each part on cache lines of its own: a serving
/// worker ([`crate::server::worker`]) adds to its own part, so that the counters every
/// request writes do not move between cores; a read sums the parts. A part is made on its
/// first count, so a route that two workers serve holds two parts, not sixteen.
#[derive(Debug)]
pub(crate) struct PerWorker<const N: usize>([OnceLock<Box<Part<N>>>; PARTS]);

#[derive(Debug)]
#[repr(align(64))]
struct Part<const N: usize>([AtomicU64; N]);

impl<const N: usize> Default for PerWorker<N> {
    fn default() -> Self {
        PerWorker(std::array::from_fn(|_| OnceLock::new()))
    }
}

impl<const N: usize> PerWorker<N> {
    /// Adds `n` to counter `i` in this thread's part; says which part, and the part's count
    /// before. Every counter asked for exists (a status class, a refusal's index into CODES,
    /// a bucket); were one missing, the count would be lost rather than panic.
    pub(crate) fn add(&self, i: usize, n: u64) -> (usize, u64) {
        let part = crate::server::worker().checked_rem(PARTS).unwrap_or(0);
        let before = self
            .0
            .get(part)
            .map(|p| p.get_or_init(|| Box::new(Part(std::array::from_fn(|_| AtomicU64::new(0))))))
            .and_then(|p| p.0.get(i))
            .map_or(0, |c| c.fetch_add(n, Ordering::Relaxed));
        (part, before)
    }

    /// Counter `i`, summed over the parts.
    pub(crate) fn get(&self, i: usize) -> u64 {
        self.0
            .iter()
            .filter_map(OnceLock::get)
            .filter_map(|p| p.0.get(i))
            .map(|c| c.load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add)
    }
}

/// The counters of a route: forwarded by status class, then refused and failed by code.
const ROUTE_COUNTERS: usize = 5 + 2 * CODES.len();
const REFUSED: usize = 5;
const FAILED: usize = 5 + CODES.len();

/// Requests of one route, by outcome: forwarded, by the upstream's status class (1xx..5xx);
/// refused before forwarding, by code; admitted, then failed in the gateway (413, 502,
/// 504), by code.
#[derive(Debug, Default)]
pub struct RouteCounters(PerWorker<ROUTE_COUNTERS>);

impl RouteCounters {
    pub fn upstream(&self, status: u16) {
        let class = match status {
            0..=199 => 0,
            200..=299 => 1,
            300..=399 => 2,
            400..=499 => 3,
            _ => 4,
        };
        self.0.add(class, 1);
    }

    pub fn refused(&self, r: &Rejection) {
        self.0.add(REFUSED.saturating_add(r.index()), 1);
    }

    pub fn failed(&self, r: &Rejection) {
        self.0.add(FAILED.saturating_add(r.index()), 1);
    }

    /// Counter `i`: a status class below [`REFUSED`], then the refusals' codes, then
    /// from [`FAILED`] the failures'.
    fn count(&self, i: usize) -> u64 {
        self.0.get(i)
    }
}

/// Where a decision without forwarding was asked for.
#[derive(Debug, Clone, Copy)]
pub enum AskedBy {
    /// The auth listener (forward auth from an ingress).
    Auth,
    /// `POST /v1/keys/verify`.
    Verify,
}

/// Decisions by where they were asked, each allowed (slot 0) or refused by code.
const DECISION_SLOTS: usize = CODES.len() + 1;

/// Decisions of the auth listener and the verify API: allowed (slot 0), or refused by code
/// (slot 1 + the code's index), the auth listener's first.
#[derive(Debug, Default)]
pub struct Decisions(PerWorker<{ 2 * DECISION_SLOTS }>);

impl Decisions {
    /// Counts one decision: `None` is allowed, else the refusal.
    pub fn count(&self, by: AskedBy, refused: Option<&Rejection>) {
        let slot = refused.map_or(0, |r| r.index().saturating_add(1));
        let first = match by {
            AskedBy::Auth => 0,
            AskedBy::Verify => DECISION_SLOTS,
        };
        self.0.add(first.saturating_add(slot), 1);
    }

    fn render(&self, out: &mut String) {
        header(
            out,
            "keygate_auth_decisions_total",
            "counter",
            "Decisions made without forwarding, by where they were asked (auth: the auth listener; verify: POST /v1/keys/verify) and code (allowed, or the refusal code).",
        );
        for (source, first) in [("auth", 0), ("verify", DECISION_SLOTS)] {
            let codes = std::iter::once("allowed").chain(CODES.iter().copied());
            for (slot, code) in codes.enumerate() {
                let n = self.0.get(first.saturating_add(slot));
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "keygate_auth_decisions_total{{source=\"{source}\",code=\"{code}\"}} {n}"
                    );
                }
            }
        }
    }
}

/// Upper bounds of the duration histograms, in seconds.
const BUCKETS: [f64; 16] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 10.0,
];

/// A histogram's counters: one a bucket, the last for +Inf, then the sum in nanoseconds.
const SUM_NANOS: usize = BUCKETS.len() + 1;

/// A fixed-bucket histogram of durations.
#[derive(Debug, Default)]
pub struct Histogram(PerWorker<{ SUM_NANOS + 1 }>);

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        // At most BUCKETS.len(), the index of the last (+Inf) bucket.
        let i = BUCKETS.partition_point(|&b| b < secs);
        self.0.add(i, 1);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.0.add(SUM_NANOS, nanos);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0u64;
        // One count per bound, and the last for +Inf.
        let bounds = BUCKETS.iter().map(Some).chain([None]);
        for (i, bound) in bounds.enumerate() {
            cumulative = cumulative.saturating_add(self.0.get(i));
            let _ = match bound {
                Some(bound) => {
                    writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}")
                }
                None => writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {cumulative}"),
            };
        }
        let sum = self.0.get(SUM_NANOS) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
    }
}

/// Every metric the gateway keeps.
#[derive(Debug, Default)]
pub struct Metrics {
    routes: Mutex<HashMap<String, Arc<RouteCounters>>>,
    /// Requests refused before a route was chosen.
    pub unrouted: Arc<RouteCounters>,
    /// Time spent in the gateway itself: deciding, and building the upstream request.
    pub gateway_time: Histogram,
    /// Time from sending upstream to the upstream's response headers.
    pub upstream_time: Histogram,
    pub upstream_connections: Arc<AtomicU64>,
    /// Requests sent upstream (counter 0) and answered or failed (counter 1).
    upstream_sent: PerWorker<2>,
    pub lockouts: AtomicU64,
    pub alerts_fired: AtomicU64,
    pub webhook_failures: AtomicU64,
    pub email_failures: AtomicU64,
    /// The auth listener's and the verify API's decisions.
    pub decisions: Decisions,
}

/// Gauges read from the rest of the gateway when rendering.
#[derive(Debug, Default)]
pub struct Gauges {
    pub generation: u64,
    pub keys: usize,
    pub routes: usize,
    pub reloads: u64,
    pub reload_failures: u64,
    pub key_changes: u64,
    pub locked_out_ips: usize,
    pub audit_lost: u64,
    /// Access-log lines dropped, when the access log is on.
    pub access_log_dropped: Option<u64>,
    /// `(key id, namespace, accepted today, refused today)`, only when `metrics.per_key` is on.
    pub per_key: Vec<(String, String, u64, u64)>,
    /// With shared limits: `(Redis up, decided by Redis, decided by the fail mode)`.
    pub shared_limits: Option<(bool, u64, u64)>,
}

impl Metrics {
    /// A request goes upstream: it is in flight until [`Metrics::upstream_done`].
    pub fn upstream_sent(&self) {
        self.upstream_sent.add(0, 1);
    }

    /// A request sent upstream has its answer, or failed.
    pub fn upstream_done(&self) {
        self.upstream_sent.add(1, 1);
    }

    /// The counters of the route named `name`, shared by every snapshot that has it.
    pub fn route(&self, name: &str) -> Arc<RouteCounters> {
        let mut map = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(name.to_string()).or_default().clone()
    }

    /// Forgets routes no longer configured.
    pub fn retain_routes(&self, live: impl Fn(&str) -> bool) {
        self.routes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|name, _| live(name));
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn render(&self, g: &Gauges) -> String {
        let mut out = String::with_capacity(16 * 1024);
        header(&mut out, "keygate_requests_total", "counter", "Requests by route, outcome (forwarded, refused, failed) and code (status class or refusal code).");
        let mut routes: Vec<(String, Arc<RouteCounters>)> = {
            let map = self.routes.lock().unwrap_or_else(|e| e.into_inner());
            map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        routes.sort_by(|a, b| a.0.cmp(&b.0));
        routes.push((String::new(), self.unrouted.clone()));
        for (name, c) in &routes {
            let route = escape(name);
            for (class, name) in ["1xx", "2xx", "3xx", "4xx", "5xx"].iter().enumerate() {
                let n = c.count(class);
                if n > 0 {
                    let _ = writeln!(out, "keygate_requests_total{{route=\"{route}\",outcome=\"forwarded\",code=\"{name}\"}} {n}");
                }
            }
            for (outcome, first) in [("refused", REFUSED), ("failed", FAILED)] {
                for (i, code) in CODES.iter().enumerate() {
                    let n = c.count(first.saturating_add(i));
                    if n > 0 {
                        let _ = writeln!(out, "keygate_requests_total{{route=\"{route}\",outcome=\"{outcome}\",code=\"{code}\"}} {n}");
                    }
                }
            }
        }
        let refused_total = |code: &str| -> u64 {
            code_index(code).map_or(0, |i| {
                routes
                    .iter()
                    .map(|(_, c)| c.count(REFUSED.saturating_add(i)))
                    .fold(0, u64::saturating_add)
            })
        };
        self.decisions.render(&mut out);
        counter(
            &mut out,
            "keygate_rate_limited_total",
            "Requests refused by a key's rate limit.",
            refused_total("rate_limited"),
        );
        counter(
            &mut out,
            "keygate_quota_exceeded_total",
            "Requests refused by a key's quota.",
            refused_total("quota_exceeded"),
        );
        header(
            &mut out,
            "keygate_request_duration_seconds",
            "histogram",
            "Time per request, split into the gateway's own part and the upstream's.",
        );
        self.gateway_time.render(
            &mut out,
            "keygate_request_duration_seconds",
            "part=\"gateway\"",
        );
        self.upstream_time.render(
            &mut out,
            "keygate_request_duration_seconds",
            "part=\"upstream\"",
        );
        counter(
            &mut out,
            "keygate_upstream_connections_opened_total",
            "TCP connections opened to upstreams (the rest of the requests reused pooled ones).",
            self.upstream_connections.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "keygate_upstream_requests_in_flight",
            "Requests waiting on an upstream now.",
            self.upstream_sent
                .get(0)
                .saturating_sub(self.upstream_sent.get(1)),
        );
        gauge(
            &mut out,
            "keygate_snapshot_generation",
            "Generation of the snapshot in force.",
            g.generation,
        );
        gauge(
            &mut out,
            "keygate_keys",
            "Keys in the snapshot in force.",
            g.keys as u64,
        );
        gauge(
            &mut out,
            "keygate_routes",
            "Routes in the snapshot in force.",
            g.routes as u64,
        );
        if let Some((up, redis, fallback)) = g.shared_limits {
            gauge(
                &mut out,
                "keygate_limiter_redis_up",
                "Whether the shared rate limiter's Redis answers (1) or the fail mode decides (0).",
                u64::from(up),
            );
            header(
                &mut out,
                "keygate_limiter_decisions_total",
                "counter",
                "Limited requests decided by the shared limiter (`by` = redis) or, while Redis is unreachable, by the fail mode (`by` = fail_mode).",
            );
            let _ = writeln!(
                out,
                "keygate_limiter_decisions_total{{by=\"redis\"}} {redis}"
            );
            let _ = writeln!(
                out,
                "keygate_limiter_decisions_total{{by=\"fail_mode\"}} {fallback}"
            );
        }
        counter(
            &mut out,
            "keygate_reloads_total",
            "Reloads put in force.",
            g.reloads,
        );
        counter(
            &mut out,
            "keygate_reload_failures_total",
            "Reloads refused for errors in the config or key store.",
            g.reload_failures,
        );
        counter(
            &mut out,
            "keygate_key_changes_applied_total",
            "Key changes through the admin API applied to the snapshot in force as deltas, without a reload.",
            g.key_changes,
        );
        counter(
            &mut out,
            "keygate_lockouts_total",
            "Client addresses locked out for too many failed authentications.",
            self.lockouts.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "keygate_locked_out_addresses",
            "Client addresses locked out now.",
            g.locked_out_ips as u64,
        );
        counter(
            &mut out,
            "keygate_alerts_fired_total",
            "Alert rules that fired.",
            self.alerts_fired.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "keygate_alert_webhook_failures_total",
            "Alert deliveries that failed after every retry.",
            self.webhook_failures.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "keygate_alert_email_failures_total",
            "Alert emails that failed after every retry.",
            self.email_failures.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "keygate_audit_lines_lost_total",
            "Audit lines dropped because the writer fell behind.",
            g.audit_lost,
        );
        if let Some(dropped) = g.access_log_dropped {
            counter(
                &mut out,
                "keygate_access_log_dropped_total",
                "Access-log lines dropped: the writer fell behind, or a write failed.",
                dropped,
            );
        }
        if !g.per_key.is_empty() {
            header(
                &mut out,
                "keygate_key_requests_today",
                "gauge",
                "Requests per key today (UTC), by outcome; on because metrics.per_key is set.",
            );
            for (id, ns, accepted, refused) in &g.per_key {
                let (id, ns) = (escape(id), escape(ns));
                let _ = writeln!(out, "keygate_key_requests_today{{key_id=\"{id}\",namespace=\"{ns}\",outcome=\"accepted\"}} {accepted}");
                let _ = writeln!(out, "keygate_key_requests_today{{key_id=\"{id}\",namespace=\"{ns}\",outcome=\"refused\"}} {refused}");
            }
        }
        out
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    header(out, name, "counter", help);
    let _ = writeln!(out, "{name} {value}");
}

fn gauge(out: &mut String, name: &str, help: &str, value: u64) {
    header(out, name, "gauge", help);
    let _ = writeln!(out, "{name} {value}");
}

/// A label value as the text format wants it.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A part is made by its first count: a counter set no worker has counted in holds none,
    /// and one that two threads counted in holds two.
    #[test]
    fn parts_are_made_as_workers_first_count() {
        let counters = Arc::new(PerWorker::<3>::default());
        let made = |c: &PerWorker<3>| c.0.iter().filter(|p| p.get().is_some()).count();
        assert_eq!(made(&counters), 0);
        counters.add(2, 5);
        assert_eq!(made(&counters), 1);
        let other = counters.clone();
        std::thread::spawn(move || {
            crate::server::become_worker(3);
            other.add(2, 1);
        })
        .join()
        .unwrap();
        assert_eq!(
            (made(&counters), counters.get(2), counters.get(0)),
            (2, 6, 0)
        );
    }

    /// Each worker adds to its own part, and what is read is every part summed: counts made
    /// on four threads at once (no worker, workers 1 and 2, and 17, which shares worker 1's
    /// part) all show, in the route counters, a histogram and the in-flight gauge.
    #[test]
    fn counts_from_every_worker_add_up() {
        let metrics = Arc::new(Metrics::default());
        let route = metrics.route("api");
        let threads: Vec<_> = [0, 1, 2, 17]
            .into_iter()
            .map(|worker| {
                let (metrics, route) = (metrics.clone(), route.clone());
                std::thread::spawn(move || {
                    if worker > 0 {
                        crate::server::become_worker(worker);
                    }
                    for _ in 0..250 {
                        route.upstream(200);
                        route.refused(&Rejection::UnknownKey);
                        metrics.gateway_time.observe(Duration::from_micros(30));
                        metrics.upstream_sent();
                    }
                    metrics.upstream_done();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let out = metrics.render(&Gauges::default());
        for line in [
            "keygate_requests_total{route=\"api\",outcome=\"forwarded\",code=\"2xx\"} 1000\n",
            "keygate_requests_total{route=\"api\",outcome=\"refused\",code=\"unknown_key\"} 1000\n",
            "keygate_request_duration_seconds_count{part=\"gateway\"} 1000\n",
            "keygate_upstream_requests_in_flight 996\n",
        ] {
            assert!(out.contains(line), "no {line} in {out}");
        }
    }

    #[test]
    fn histograms_are_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(30));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let mut out = String::new();
        h.render(&mut out, "x", "part=\"gateway\"");
        assert!(
            out.contains("x_bucket{part=\"gateway\",le=\"0.00005\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("x_bucket{part=\"gateway\",le=\"0.005\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("x_bucket{part=\"gateway\",le=\"+Inf\"} 3\n"),
            "{out}"
        );
        assert!(out.contains("x_count{part=\"gateway\"} 3\n"));
    }
}
