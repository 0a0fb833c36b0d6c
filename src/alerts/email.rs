//! Alerts by email: a rule's `email` recipients get a plain-text message for each change of
//! its state, through the SMTP server in `alerts.smtp` (lettre, over rustls). `smtp://` uses
//! STARTTLS, required unless `starttls: opportunistic` or `off` says otherwise; `smtps://` is
//! TLS from the first byte. The password comes from an environment variable, never the
//! config file, and no message carries anything secret: alerts name key ids.

use std::path::Path;
use std::time::Duration;

use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde::{Deserialize, Serialize};

use super::AlertEvent;
use crate::config::Problems;

/// `alerts.smtp`: the server alert emails go through.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SmtpConfig {
    /// `smtp://host[:port]` (STARTTLS; port 587 by default) or `smtps://host[:port]` (TLS
    /// from the start; port 465 by default).
    pub url: String,
    /// With `smtp://`: `required` (the default: no STARTTLS, no mail), `opportunistic`, or
    /// `off` (plain text, for a relay on the same host only).
    #[serde(default)]
    pub starttls: Option<String>,
    /// The sender, such as `keygate <keygate@example.com>`.
    pub from: String,
    /// The SMTP user, if the server wants one.
    #[serde(default)]
    pub username: Option<String>,
    /// The environment variable holding the SMTP password (never the password itself).
    #[serde(default)]
    pub password_env: Option<String>,
    /// A PEM file of CAs to trust besides the public ones, for a private relay; relative
    /// to the config file.
    #[serde(default)]
    pub ca_file: Option<String>,
    /// Time allowed for each attempt, 1ms to 1m. Default `10s`.
    #[serde(default = "default_timeout")]
    pub timeout: String,
}

fn default_timeout() -> String {
    "10s".into()
}

/// How the connection is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    /// TLS from the first byte (`smtps://`).
    Implicit,
    /// STARTTLS, refusing to send without it.
    Required,
    Opportunistic,
    Off,
}

/// A compiled `alerts.smtp`.
#[derive(Debug, Clone, PartialEq)]
pub struct Smtp {
    pub host: String,
    pub port: u16,
    pub security: Security,
    pub from: Mailbox,
    pub credentials: Option<(String, String)>,
    /// Extra trusted CAs, PEM.
    pub ca_pem: Option<Vec<u8>>,
    pub timeout: Duration,
}

impl Smtp {
    /// Checks `cfg`, reading the password's variable and the CA file now, so that a problem
    /// is a config error at load rather than a lost alert later.
    pub fn compile(cfg: &SmtpConfig, base: &Path, p: &mut Problems) -> Option<Smtp> {
        let path = "alerts.smtp";
        let url = cfg.url.parse::<http::Uri>().ok();
        let (implicit, default_port) = match url.as_ref().and_then(|u| u.scheme_str()) {
            Some("smtp") => (false, 587),
            Some("smtps") => (true, 465),
            _ => {
                p.push(
                    format!("{path}.url"),
                    format!("`{}` is not an smtp:// or smtps:// URL", cfg.url),
                );
                return None;
            }
        };
        let authority = url.as_ref().and_then(|u| u.authority().cloned());
        let Some(host) = authority.as_ref().map(|a| a.host().to_string()) else {
            p.push(format!("{path}.url"), "the URL names no host");
            return None;
        };
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = authority.and_then(|a| a.port_u16()).unwrap_or(default_port);
        let security = match (implicit, cfg.starttls.as_deref()) {
            (true, None) => Security::Implicit,
            (true, Some(_)) => {
                p.push(
                    format!("{path}.starttls"),
                    "smtps:// is TLS from the start: starttls does not apply",
                );
                Security::Implicit
            }
            (false, None | Some("required")) => Security::Required,
            (false, Some("opportunistic")) => Security::Opportunistic,
            (false, Some("off")) => Security::Off,
            (false, Some(other)) => {
                p.push(
                    format!("{path}.starttls"),
                    format!("`{other}` is not one of required, opportunistic, off"),
                );
                Security::Required
            }
        };
        let from = cfg
            .from
            .parse::<Mailbox>()
            .map_err(|e| {
                p.push(
                    format!("{path}.from"),
                    format!("`{}` is not an address: {e}", cfg.from),
                )
            })
            .ok();
        let credentials = match (&cfg.username, &cfg.password_env) {
            (None, None) => None,
            (Some(user), Some(var)) => match std::env::var(var) {
                Ok(password) if !password.is_empty() => Some((user.clone(), password)),
                _ => {
                    p.push(
                        format!("{path}.password_env"),
                        format!("the environment variable `{var}` is not set"),
                    );
                    None
                }
            },
            _ => {
                p.push(
                    path,
                    "username and password_env go together: set both, or neither",
                );
                None
            }
        };
        let ca_pem = cfg.ca_file.as_ref().and_then(|file| {
            let full = base.join(file);
            std::fs::read(&full)
                .map_err(|e| {
                    p.push(
                        format!("{path}.ca_file"),
                        format!("cannot read {}: {e}", full.display()),
                    )
                })
                .ok()
        });
        let (min, max) = crate::config::ranges::WEBHOOK_TIMEOUT;
        let timeout = crate::config::units::parse_duration_in(&cfg.timeout, min, max)
            .map_err(|e| p.push(format!("{path}.timeout"), e))
            .ok();
        Some(Smtp {
            host,
            port,
            security,
            from: from?,
            credentials,
            ca_pem,
            timeout: timeout?,
        })
    }

    fn transport(&self) -> Result<AsyncSmtpTransport<Tokio1Executor>, String> {
        let params = || {
            let mut b = TlsParameters::builder(self.host.clone());
            if let Some(pem) = &self.ca_pem {
                let cert = Certificate::from_pem(pem).map_err(|e| e.to_string())?;
                b = b.add_root_certificate(cert);
            }
            b.build_rustls().map_err(|e| e.to_string())
        };
        let tls = match self.security {
            Security::Implicit => Tls::Wrapper(params()?),
            Security::Required => Tls::Required(params()?),
            Security::Opportunistic => Tls::Opportunistic(params()?),
            Security::Off => Tls::None,
        };
        let mut b = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&self.host)
            .port(self.port)
            .tls(tls)
            .timeout(Some(self.timeout));
        if let Some((user, password)) = &self.credentials {
            b = b.credentials(Credentials::new(user.clone(), password.clone()));
        }
        Ok(b.build())
    }
}

/// Parses a rule's recipients; a bad one is reported at `path`.
pub fn recipients(list: &[String], path: &str, p: &mut Problems) -> Vec<Mailbox> {
    list.iter()
        .enumerate()
        .filter_map(|(i, a)| {
            a.parse::<Mailbox>()
                .map_err(|e| {
                    p.push(
                        format!("{path}[{i}]"),
                        format!("`{a}` is not an address: {e}"),
                    )
                })
                .ok()
        })
        .collect()
}

/// The message for `event`: what fired or resolved, for which key, with the figure.
fn message(smtp: &Smtp, to: &[Mailbox], event: &AlertEvent) -> Result<Message, String> {
    let state = if event.event == "alert.fired" {
        "fired"
    } else {
        "resolved"
    };
    let mut b = Message::builder().from(smtp.from.clone()).subject(format!(
        "[keygate] {} {state}: key {}",
        event.rule, event.key_id
    ));
    for m in to {
        b = b.to(m.clone());
    }
    let body = format!(
        "The alert rule \"{rule}\" {state} at {time}.\n\n\
         Key:        {key}\n\
         Namespace:  {ns}\n\
         Condition:  {cond}\n\
         Value:      {value}\n\
         Threshold:  {threshold}\n\n\
         See the key's usage and audit events in the console, or with\n  keygate keys show {key}\n",
        rule = event.rule,
        time = event.time,
        key = event.key_id,
        ns = event.namespace,
        cond = event.condition,
        value = event.value,
        threshold = event.threshold,
    );
    b.body(body).map_err(|e| e.to_string())
}

/// Sends `event` to `to`, retrying `retries` times with backoff; returns whether it was sent.
pub async fn send(smtp: &Smtp, to: &[Mailbox], event: &AlertEvent, retries: u32) -> bool {
    let sent = async {
        let transport = smtp.transport()?;
        let message = message(smtp, to, event)?;
        let mut backoff = Duration::from_secs(1);
        for attempt in 0..=retries {
            match transport.send(message.clone()).await {
                Ok(_) => return Ok(()),
                Err(e) => {
                    tracing::warn!(attempt, error = %e, rule = %event.rule, "alert email not sent")
                }
            }
            if attempt < retries {
                tokio::time::sleep(backoff).await;
                backoff = backoff.saturating_mul(2);
            }
        }
        Err("every attempt failed".to_string())
    };
    match sent.await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, rule = %event.rule, "alert email failed");
            false
        }
    }
}
