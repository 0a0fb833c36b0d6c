//! Alerts: rules over keys' traffic, evaluated by housekeeping every few seconds, never on
//! the request path. When a rule's condition starts to hold for a key, `alert.fired` goes to
//! the audit log, a JSON payload is POSTed to the webhook (with a timeout and retries), and
//! the rule's `email` recipients get a message ([`email`]); when it stops holding,
//! `alert.resolved` does the same. Rules reload with the config; firing state lives outside
//! the snapshot, by rule name and key id.

pub mod email;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};

use crate::clock::rfc3339;
use crate::config::units::parse_duration;
use crate::config::Problems;
use crate::snapshot::KeyEntry;
use email::{Smtp, SmtpConfig};
use lettre::message::Mailbox;

/// The `alerts` section of the config.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    /// Where alert payloads are POSTed. Without one, alerts go to the audit log only.
    #[serde(default)]
    pub webhook: Option<WebhookConfig>,
    /// The SMTP server for rules with `email` recipients.
    #[serde(default)]
    pub smtp: Option<SmtpConfig>,
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
}

/// The alert webhook.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// `http://host:port/path`.
    pub url: String,
    /// Time allowed for each attempt, 1ms to 1m. Default `5s`.
    #[serde(default = "default_timeout")]
    pub timeout: String,
    /// Further attempts after a failure, one second apart, doubling; 0 to 10. Default `3`.
    #[serde(default = "default_retries")]
    pub retries: u32,
}

fn default_timeout() -> String {
    "5s".into()
}
fn default_retries() -> u32 {
    3
}

/// One rule: a scope (a key, a namespace's keys, or every key) and one condition. The same
/// shape in the config, in the key store (rules made through `/v1/alerts`) and in the API.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub name: String,
    /// Only this key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Only this namespace's keys, each on its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Fires when a key's requests in the last complete minute exceed this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u64>,
    /// Fires when the share of a key's requests that failed over `over` exceeds this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_rate_percent: Option<f64>,
    /// The window of `error_rate_percent`. Default `5m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub over: Option<String>,
    /// Requests needed in the window before the error rate counts. Default `10`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_requests: Option<u64>,
    /// Fires when a key has used this share of its quota.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_percent: Option<f64>,
    /// Addresses that get an email when the rule fires and when it resolves (needs
    /// `alerts.smtp`), such as `ops@example.com` or `On call <oncall@example.com>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub email: Vec<String>,
}

/// A compiled condition.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    RequestsPerMinute(u64),
    ErrorRate {
        percent: f64,
        minutes: i64,
        min_requests: u64,
    },
    QuotaUsed(f64),
}

/// A compiled rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub name: String,
    pub key: Option<String>,
    pub namespace: Option<String>,
    pub condition: Condition,
    /// Who is emailed when it fires or resolves.
    pub email: Vec<Mailbox>,
    /// The rule as written, for the API.
    pub source: RuleConfig,
    /// Made through the API and kept in the key store, not written in the config.
    pub stored: bool,
}

/// A compiled webhook.
#[derive(Debug, Clone, PartialEq)]
pub struct Webhook {
    pub url: http::Uri,
    pub timeout: Duration,
    pub retries: u32,
}

/// The rules and webhook of a snapshot.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AlertRules {
    pub rules: Vec<Rule>,
    pub webhook: Option<Webhook>,
    pub smtp: Option<Smtp>,
}

impl AlertRules {
    /// Compiles `cfg`; `base` is the config file's folder, for `alerts.smtp.ca_file`.
    pub fn compile(cfg: &AlertsConfig, base: &std::path::Path, p: &mut Problems) -> AlertRules {
        let smtp = cfg.smtp.as_ref().and_then(|s| Smtp::compile(s, base, p));
        let webhook = cfg.webhook.as_ref().and_then(|w| {
            let url = match w.url.parse::<http::Uri>() {
                Ok(u)
                    if u.scheme() == Some(&http::uri::Scheme::HTTP) && u.authority().is_some() =>
                {
                    Some(u)
                }
                _ => {
                    p.push(
                        "alerts.webhook.url",
                        format!("`{}` is not an http:// URL", w.url),
                    );
                    None
                }
            };
            let (min, max) = crate::config::ranges::WEBHOOK_TIMEOUT;
            let timeout = crate::config::units::parse_duration_in(&w.timeout, min, max)
                .map_err(|e| p.push("alerts.webhook.timeout", e))
                .ok();
            let retries = crate::config::ranges::within(
                w.retries,
                crate::config::ranges::WEBHOOK_RETRIES,
                "alerts.webhook.retries",
                p,
            );
            Some(Webhook {
                url: url?,
                timeout: timeout?,
                retries: retries?,
            })
        });
        let mut names = std::collections::HashSet::new();
        let rules = compile_rules(
            &cfg.rules,
            "alerts.rules",
            cfg.smtp.is_some(),
            false,
            &mut names,
            p,
        );
        AlertRules {
            rules,
            webhook,
            smtp,
        }
    }
}

/// Compiles `rules` (found at `path[i]`), each name unused in `names`.
fn compile_rules(
    rules: &[RuleConfig],
    path: &str,
    has_smtp: bool,
    stored: bool,
    names: &mut std::collections::HashSet<String>,
    p: &mut Problems,
) -> Vec<Rule> {
    rules
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let path = format!("{path}[{i}]");
            if r.name.trim().is_empty() || !names.insert(r.name.clone()) {
                p.push(format!("{path}.name"), "every rule needs a name of its own");
            }
            if r.key.is_some() && r.namespace.is_some() {
                p.push(&path, "a rule names a key or a namespace, not both");
            }
            let given = [r.requests_per_minute.is_some(), r.error_rate_percent.is_some(), r.quota_percent.is_some()];
            if given.iter().filter(|g| **g).count() != 1 {
                p.push(&path, "a rule needs exactly one of requests_per_minute, error_rate_percent, quota_percent");
                return None;
            }
            let percent_ok = |v: f64, field: &str, p: &mut Problems| {
                if !(0.0..=100.0).contains(&v) {
                    p.push(format!("{path}.{field}"), "must be between 0 and 100");
                }
            };
            let condition = if let Some(n) = r.requests_per_minute {
                Condition::RequestsPerMinute(n)
            } else if let Some(percent) = r.error_rate_percent {
                percent_ok(percent, "error_rate_percent", p);
                let over = r.over.as_deref().unwrap_or("5m");
                let minutes = match parse_duration(over)
                    .ok()
                    .filter(|d| (60..=86_400).contains(&d.as_secs()))
                    .and_then(|d| i64::try_from(d.as_secs() / 60).ok())
                {
                    Some(minutes) => minutes,
                    None => {
                        p.push(format!("{path}.over"), format!("`{over}` must be a duration from 1m to 24h"));
                        5
                    }
                };
                Condition::ErrorRate { percent, minutes, min_requests: r.min_requests.unwrap_or(10) }
            } else {
                let percent = r.quota_percent.unwrap_or_default();
                percent_ok(percent, "quota_percent", p);
                Condition::QuotaUsed(percent)
            };
            let email = email::recipients(&r.email, &format!("{path}.email"), p);
            if !r.email.is_empty() && !has_smtp {
                p.push(format!("{path}.email"), "emailing an alert needs alerts.smtp");
            }
            Some(Rule {
                name: r.name.clone(),
                key: r.key.clone(),
                namespace: r.namespace.clone(),
                condition,
                email,
                source: r.clone(),
                stored,
            })
        })
        .collect()
}

impl AlertRules {
    /// Adds the rules kept in the key store (made through the API) after the config's, each
    /// checked as a config rule is. Problems are reported at `alerts[i]`.
    pub fn add_stored(&mut self, stored: &[serde_json::Value], p: &mut Problems) {
        let mut names: std::collections::HashSet<String> =
            self.rules.iter().map(|r| r.name.clone()).collect();
        let parsed: Vec<RuleConfig> = stored
            .iter()
            .enumerate()
            .filter_map(|(i, v)| {
                serde_json::from_value(v.clone())
                    .map_err(|e| p.push(format!("alerts[{i}]"), format!("not an alert rule: {e}")))
                    .ok()
            })
            .collect();
        let has_smtp = self.smtp.is_some();
        self.rules.extend(compile_rules(
            &parsed, "alerts", has_smtp, true, &mut names, p,
        ));
    }

    /// The rule named `name`.
    pub fn get(&self, name: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| r.name == name)
    }
}

impl Rule {
    fn applies_to(&self, key: &KeyEntry) -> bool {
        self.key.as_ref().is_none_or(|k| key.id == *k)
            && self
                .namespace
                .as_ref()
                .is_none_or(|n| n.as_str() == key.namespace.as_str())
    }

    /// The measured value, and whether it breaks the rule.
    fn measure(&self, key: &KeyEntry, now: i64) -> Option<(f64, bool)> {
        let minute = now.div_euclid(60);
        match &self.condition {
            Condition::RequestsPerMinute(limit) => {
                let report = key.usage_report(now);
                let previous = minute.saturating_sub(1);
                let last = report.series.iter().find(|m| m.minute == previous);
                let n = last.map_or(0, |m| m.accepted.saturating_add(m.refused));
                Some((n as f64, n > *limit))
            }
            Condition::ErrorRate {
                percent,
                minutes,
                min_requests,
            } => {
                let report = key.usage_report(now);
                let window = report
                    .series
                    .iter()
                    .filter(|m| m.minute >= minute.saturating_sub(*minutes) && m.minute < minute);
                let (total, bad) = window.fold((0u64, 0u64), |(t, b), m| {
                    (
                        t.saturating_add(m.accepted).saturating_add(m.refused),
                        b.saturating_add(m.refused).saturating_add(m.errors),
                    )
                });
                if total < *min_requests {
                    return Some((0.0, false));
                }
                let rate = 100.0 * bad as f64 / total as f64;
                Some((rate, rate > *percent))
            }
            Condition::QuotaUsed(percent) => {
                let quota = key.quota()?;
                let (period, _) = quota.window(now);
                let used = 100.0 * key.quota_used(period) as f64 / quota.limit as f64;
                Some((used, used >= *percent))
            }
        }
    }

    fn describe(&self) -> String {
        match &self.condition {
            Condition::RequestsPerMinute(n) => format!("requests per minute > {n}"),
            Condition::ErrorRate {
                percent, minutes, ..
            } => format!("error rate > {percent}% over {minutes}m"),
            Condition::QuotaUsed(p) => format!("quota used >= {p}%"),
        }
    }

    fn threshold(&self) -> f64 {
        match self.condition {
            Condition::RequestsPerMinute(n) => n as f64,
            Condition::ErrorRate { percent, .. } => percent,
            Condition::QuotaUsed(p) => p,
        }
    }
}

/// A change of an alert's state, to be recorded and delivered.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AlertEvent {
    /// `alert.fired` or `alert.resolved`.
    pub event: &'static str,
    pub rule: String,
    pub condition: String,
    pub key_id: String,
    pub namespace: String,
    pub value: f64,
    pub threshold: f64,
    pub time: String,
    /// The rule's email recipients: where to send it, not part of the webhook's payload.
    #[serde(skip)]
    pub email: Vec<Mailbox>,
}

/// Which (rule, key) pairs are firing now.
#[derive(Debug, Default)]
pub struct AlertState {
    firing: Mutex<HashMap<(String, String), f64>>,
}

impl AlertState {
    /// Evaluates every rule against every key in scope; returns what changed.
    pub fn evaluate<'k>(
        &self,
        rules: &AlertRules,
        keys: impl Iterator<Item = &'k KeyEntry> + Clone,
        now: i64,
    ) -> Vec<AlertEvent> {
        let mut firing = self.firing.lock().unwrap_or_else(|e| e.into_inner());
        let mut events = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for rule in &rules.rules {
            for key in keys.clone().filter(|k| rule.applies_to(k)) {
                let Some((value, breaks)) = rule.measure(key, now) else {
                    continue;
                };
                let pair = (rule.name.clone(), key.id.to_string());
                let was = firing.contains_key(&pair);
                let event = |event| AlertEvent {
                    event,
                    rule: rule.name.clone(),
                    condition: rule.describe(),
                    key_id: key.id.to_string(),
                    namespace: key.namespace.to_string(),
                    value: (value * 100.0).round() / 100.0,
                    threshold: rule.threshold(),
                    time: rfc3339(now),
                    email: rule.email.clone(),
                };
                if breaks && !was {
                    firing.insert(pair.clone(), value);
                    events.push(event("alert.fired"));
                } else if !breaks && was {
                    firing.remove(&pair);
                    events.push(event("alert.resolved"));
                }
                seen.insert(pair);
            }
        }
        // Rules or keys that went away resolve quietly.
        firing.retain(|pair, _| seen.contains(pair));
        events
    }
}

/// What a delivery names in its log lines.
pub trait HasRule {
    fn rule(&self) -> &str;
}

impl HasRule for AlertEvent {
    fn rule(&self) -> &str {
        &self.rule
    }
}

impl HasRule for serde_json::Value {
    fn rule(&self) -> &str {
        self.get("event").and_then(|e| e.as_str()).unwrap_or("")
    }
}

/// POSTs an alert to the webhook, retrying with backoff; returns whether it was delivered.
pub async fn deliver(webhook: &Webhook, event: &(impl Serialize + HasRule)) -> bool {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let body = Bytes::from(serde_json::to_vec(event).unwrap_or_default());
    let mut backoff = Duration::from_secs(1);
    for attempt in 0..=webhook.retries {
        let req = http::Request::post(webhook.url.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::USER_AGENT, "keygate-alerts")
            .body(Full::new(body.clone()));
        let Ok(req) = req else { return false };
        match tokio::time::timeout(webhook.timeout, client.request(req)).await {
            Ok(Ok(resp)) if resp.status().is_success() => return true,
            Ok(Ok(resp)) => {
                tracing::warn!(attempt, status = %resp.status(), rule = event.rule(), "alert webhook refused")
            }
            Ok(Err(e)) => {
                tracing::warn!(attempt, error = %e, rule = event.rule(), "alert webhook unreachable")
            }
            Err(_) => tracing::warn!(attempt, rule = event.rule(), "alert webhook timed out"),
        }
        if attempt < webhook.retries {
            tokio::time::sleep(backoff).await;
            backoff = backoff.saturating_mul(2);
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse_yaml, Config};
    use crate::metrics::Metrics;
    use crate::rejection::Rejection;
    use crate::snapshot::{BuildContext, Snapshot};
    use crate::state::limiters::Limiters;
    use crate::state::usage::UsageBook;
    use std::path::Path;

    /// 2026-12-01T00:00:00Z: a day's and a minute's start.
    const T: i64 = 1_796_083_200;

    /// A snapshot of one key (`ab12cd34`, namespace acme, whose tier allows 10 a day) under
    /// `rules`, with the usage book it counts in.
    fn world(rules: &str) -> (Snapshot, UsageBook) {
        let yaml = format!("tiers: {{pro: {{quota: 10/day}}}}\nnamespaces: {{acme: {{tier: pro}}}}\nalerts:\n  rules:\n{rules}");
        let config: Config = parse_yaml(Path::new("a.yaml"), &yaml).unwrap();
        let (limiters, metrics, usage) =
            (Limiters::new(), Metrics::default(), UsageBook::in_memory());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _in = runtime.enter();
        let ctx = BuildContext {
            config_path: Path::new("a.yaml"),
            generation: 1,
            limiters: &limiters,
            metrics: &metrics,
            usage: &usage,
            previous: None,
            env_admin_token: None,
        };
        let snapshot =
            Snapshot::from_parts(&ctx, config, &[crate::keys::tests::record("ab12cd34")]).unwrap();
        (snapshot, usage)
    }

    fn events(state: &AlertState, s: &Snapshot, now: i64) -> Vec<&'static str> {
        state
            .evaluate(&s.alerts, s.keys(), now)
            .iter()
            .map(|e| e.event)
            .collect()
    }

    #[test]
    fn an_error_rate_fires_over_its_window_and_resolves_when_it_passes() {
        let (s, usage) =
            world("    - {name: errors, error_rate_percent: 50, over: 5m, min_requests: 4}\n");
        let key = s.keys().next().unwrap();
        let state = AlertState::default();
        // Minute T: 2 accepted (one upstream 5xx), 3 refused: 4 of 5 failed, 80 %. A key's
        // usage cell starts with its first count, and its series with the tick after that.
        key.usage().accepted();
        usage.tick(T);
        key.usage().accepted();
        key.usage().outcome(503, None);
        for _ in 0..3 {
            key.usage().refused(&Rejection::ScopeDenied);
        }
        assert_eq!(
            events(&state, &s, T + 30),
            Vec::<&str>::new(),
            "the minute is not over"
        );
        usage.tick(T + 60);
        assert_eq!(events(&state, &s, T + 60), ["alert.fired"]);
        let fired = state
            .firing
            .lock()
            .unwrap()
            .values()
            .copied()
            .collect::<Vec<_>>();
        assert_eq!(fired, [80.0]);
        assert_eq!(
            events(&state, &s, T + 120),
            Vec::<&str>::new(),
            "fired once"
        );
        // Five minutes on, the bad minute has left the window.
        usage.tick(T + 6 * 60);
        assert_eq!(events(&state, &s, T + 6 * 60), ["alert.resolved"]);
    }

    #[test]
    fn an_error_rate_needs_its_minimum_of_requests() {
        let (s, usage) = world("    - {name: errors, error_rate_percent: 10, min_requests: 10}\n");
        let key = s.keys().next().unwrap();
        let state = AlertState::default();
        key.usage().refused(&Rejection::ScopeDenied);
        usage.tick(T);
        for _ in 0..8 {
            key.usage().refused(&Rejection::RateLimited(Box::new(
                crate::policy::rate::RateHeaders {
                    more: Vec::new(),
                    policy: http::HeaderValue::from_static("x"),
                    budgets: [None, None],
                    retry_after: None,
                },
            )));
        }
        usage.tick(T + 60);
        assert_eq!(
            events(&state, &s, T + 60),
            Vec::<&str>::new(),
            "9 of 9 failed, under 10 requests"
        );
        key.usage().refused(&Rejection::ScopeDenied);
        usage.tick(T + 120);
        assert_eq!(events(&state, &s, T + 120), ["alert.fired"]);
    }

    #[test]
    fn quota_use_fires_at_its_share_and_resolves_with_the_next_period() {
        let (s, _usage) = world("    - {name: quota, quota_percent: 80}\n");
        let key = s.keys().next().unwrap();
        let state = AlertState::default();
        let quota = key.quota().unwrap();
        key.usage().quota_used(quota.window(T).0);
        for _ in 0..7 {
            key.usage().quota_spend();
        }
        assert_eq!(
            events(&state, &s, T + 1),
            Vec::<&str>::new(),
            "7 of 10 is under 80 %"
        );
        key.usage().quota_spend();
        assert_eq!(events(&state, &s, T + 2), ["alert.fired"], "8 of 10");
        assert_eq!(
            events(&state, &s, T + 86_400),
            ["alert.resolved"],
            "a new day"
        );
    }

    #[test]
    fn a_rule_without_a_quota_to_measure_stays_quiet() {
        let (s, _usage) = world("    - {name: quota, quota_percent: 1, namespace: elsewhere}\n");
        assert_eq!(events(&AlertState::default(), &s, T), Vec::<&str>::new());
    }

    #[test]
    fn bad_rules_are_reported_with_their_place() {
        let cfg: AlertsConfig = serde_yaml::from_str(
            "rules:\n  - {name: a, error_rate_percent: 150}\n  - {name: b, error_rate_percent: 5, over: 30s}\n  - {name: c, quota_percent: -1}\n  - {name: d, quota_percent: 5, requests_per_minute: 3}\n  - {name: a, requests_per_minute: 1}\n",
        )
        .unwrap();
        let mut p = Problems::default();
        AlertRules::compile(&cfg, Path::new("."), &mut p);
        let paths: Vec<String> = p
            .locate(Path::new("x"), "")
            .into_iter()
            .map(|e| e.path)
            .collect();
        assert_eq!(
            paths,
            [
                "alerts.rules[0].error_rate_percent",
                "alerts.rules[1].over",
                "alerts.rules[2].quota_percent",
                "alerts.rules[3]",
                "alerts.rules[4].name"
            ]
        );
    }
}
