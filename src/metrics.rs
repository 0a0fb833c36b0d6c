//! Prometheus metrics, served at `GET /metrics` on the admin listener. Counters are atomics
//! kept outside the snapshot (per-route counters are looked up by route name when a snapshot
//! is built, so they survive reloads); nothing is locked on the request path. Labels stay
//! bounded: routes come from the config, codes from a fixed list, and key ids appear only if
//! `metrics.per_key` turns them on.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::rejection::{code_index, Rejection, CODES};

/// Requests of one route, by outcome.
#[derive(Debug)]
pub struct RouteCounters {
    /// Forwarded, by the upstream's status class (1xx..5xx).
    upstream: [AtomicU64; 5],
    /// Refused before forwarding, by code.
    refused: [AtomicU64; CODES.len()],
    /// Admitted, then failed in the gateway (413, 502, 504), by code.
    failed: [AtomicU64; CODES.len()],
}

impl Default for RouteCounters {
    fn default() -> Self {
        RouteCounters {
            upstream: std::array::from_fn(|_| AtomicU64::new(0)),
            refused: std::array::from_fn(|_| AtomicU64::new(0)),
            failed: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl RouteCounters {
    pub fn upstream(&self, status: u16) {
        let class = match status {
            0..=199 => 0,
            200..=299 => 1,
            300..=399 => 2,
            400..=499 => 3,
            _ => 4,
        };
        bump(self.upstream.get(class));
    }

    pub fn refused(&self, r: &Rejection) {
        bump(self.refused.get(r.index()));
    }

    pub fn failed(&self, r: &Rejection) {
        bump(self.failed.get(r.index()));
    }
}

/// Counts one in `counter`. Every slot asked for exists (a status class, or a refusal's
/// index into CODES); were one missing, the count would be lost rather than panic.
fn bump(counter: Option<&AtomicU64>) {
    if let Some(c) = counter {
        c.fetch_add(1, Ordering::Relaxed);
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

/// Decisions of the auth listener and the verify API: allowed (slot 0), or refused by code
/// (slot 1 + the code's index).
#[derive(Debug)]
pub struct Decisions([[AtomicU64; CODES.len() + 1]; 2]);

impl Default for Decisions {
    fn default() -> Self {
        Decisions(std::array::from_fn(|_| {
            std::array::from_fn(|_| AtomicU64::new(0))
        }))
    }
}

impl Decisions {
    /// Counts one decision: `None` is allowed, else the refusal.
    pub fn count(&self, by: AskedBy, refused: Option<&Rejection>) {
        let slot = refused.map_or(0, |r| r.index().saturating_add(1));
        bump(self.0.get(by as usize).and_then(|s| s.get(slot)));
    }

    fn render(&self, out: &mut String) {
        header(
            out,
            "keygate_auth_decisions_total",
            "counter",
            "Decisions made without forwarding, by where they were asked (auth: the auth listener; verify: POST /v1/keys/verify) and code (allowed, or the refusal code).",
        );
        for (source, slots) in ["auth", "verify"].iter().zip(&self.0) {
            let codes = std::iter::once("allowed").chain(CODES.iter().copied());
            for (code, n) in codes.zip(slots.iter()) {
                let n = n.load(Ordering::Relaxed);
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

/// A fixed-bucket histogram of durations.
#[derive(Debug)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_nanos: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        // At most BUCKETS.len(), the index of the last (+Inf) bucket.
        let i = BUCKETS.partition_point(|&b| b < secs);
        bump(self.counts.get(i));
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0u64;
        // One count per bound, and the last for +Inf.
        let bounds = BUCKETS.iter().map(Some).chain([None]);
        for (count, bound) in self.counts.iter().zip(bounds) {
            cumulative = cumulative.saturating_add(count.load(Ordering::Relaxed));
            let _ = match bound {
                Some(bound) => {
                    writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}")
                }
                None => writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {cumulative}"),
            };
        }
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
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
    pub upstream_in_flight: AtomicI64,
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
            for (class, n) in ["1xx", "2xx", "3xx", "4xx", "5xx"].iter().zip(&c.upstream) {
                let n = n.load(Ordering::Relaxed);
                if n > 0 {
                    let _ = writeln!(out, "keygate_requests_total{{route=\"{route}\",outcome=\"forwarded\",code=\"{class}\"}} {n}");
                }
            }
            for (outcome, counts) in [("refused", &c.refused), ("failed", &c.failed)] {
                for (code, n) in CODES.iter().zip(counts.iter()) {
                    let n = n.load(Ordering::Relaxed);
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
                    .filter_map(|(_, c)| c.refused.get(i))
                    .map(|n| n.load(Ordering::Relaxed))
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
            u64::try_from(self.upstream_in_flight.load(Ordering::Relaxed)).unwrap_or(0),
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
