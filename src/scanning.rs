//! Leaked keys, shut off in seconds. GitHub's secret-scanning partner program finds tokens
//! pushed to public repositories and POSTs them, signed, to the issuer: keygate serves that
//! endpoint on the proxy listener (`secret_scanning.github`), checks GitHub's ECDSA P-256
//! signature over the raw body against GitHub's published keys, and answers each token
//! `true_positive` (a key keygate issued) or `false_positive`. Every report, from GitHub,
//! from the admin API (`POST /v1/api-keys/leaked`) or from the CLI (`keygate keys leaked`),
//! takes the same path: [`crate::keys::leaked`] marks the keys and takes the action (revoke,
//! disable or report) in one write of the store; the change is live before the answer, and
//! each key found goes to the audit log (`key.leaked`, with the URL, never the token) and
//! to the alert webhook.
//!
//! An admin token reported leaked is looked up the same way, by its hash: one kept in the
//! store is revoked (on `revoke` and on `disable`, as a token has no disabled state; kept on
//! `report`), one in the config or `KEYGATE_ADMIN_TOKEN` can only be reported. Each is
//! audited as `admin_token.leaked` and sent to the webhook.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Request, Response, Uri};
use http_body_util::{BodyExt, Full, Limited};
use serde::{Deserialize, Serialize};

use crate::audit::AuditEvent;
use crate::body::ResponseBody;
use crate::config::Problems;
use crate::gateway::Gateway;
use crate::keys::{self, admin_token, LeakAction, LeakFound};
use crate::rejection::Rejection;

/// The largest report body.
const MAX_BODY: usize = 1 << 20;
/// GitHub's public keys are fetched again for an unknown key identifier at most this often,
/// in seconds: a stream of made-up identifiers costs GitHub one request a minute.
const REFRESH_EVERY_SECS: i64 = 60;
/// Time allowed to fetch the public keys.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Where GitHub POSTs, unless `path` says otherwise.
pub const DEFAULT_PATH: &str = "/.well-known/keygate/secret-scanning/github";

/// `secret_scanning`: leaked keys reported by secret scanners.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SecretScanningConfig {
    /// GitHub's secret-scanning partner endpoint, off unless set.
    #[serde(default)]
    pub github: Option<GithubConfig>,
}

/// `secret_scanning.github`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GithubConfig {
    /// Where GitHub publishes the keys it signs with:
    /// `https://api.github.com/meta/public_keys/secret_scanning`.
    pub public_keys_url: String,
    /// What to do with a key GitHub found: `revoke` (the default), `disable` or `report`.
    #[serde(default = "default_action")]
    pub action: String,
    /// The path on the proxy listener. Default `/.well-known/keygate/secret-scanning/github`.
    #[serde(default = "default_path")]
    pub path: String,
}

fn default_action() -> String {
    "revoke".into()
}

fn default_path() -> String {
    DEFAULT_PATH.into()
}

/// A compiled `secret_scanning.github`.
#[derive(Debug, Clone, PartialEq)]
pub struct Github {
    pub keys_url: Uri,
    pub action: LeakAction,
    pub path: String,
}

impl Github {
    pub fn compile(cfg: &SecretScanningConfig, p: &mut Problems) -> Option<Github> {
        let g = cfg.github.as_ref()?;
        let keys_url = match g.public_keys_url.parse::<Uri>() {
            Ok(u) if matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some() => {
                Some(u)
            }
            _ => {
                p.push(
                    "secret_scanning.github.public_keys_url",
                    format!("`{}` is not an http:// or https:// URL", g.public_keys_url),
                );
                None
            }
        };
        let action = LeakAction::parse(&g.action)
            .map_err(|e| p.push("secret_scanning.github.action", e))
            .ok();
        if !g.path.starts_with('/') || g.path.len() > 256 || g.path.contains(['?', '#', ' ']) {
            p.push(
                "secret_scanning.github.path",
                format!(
                    "`{}` must be a path starting with `/`, at most 256 bytes",
                    g.path
                ),
            );
        }
        Some(Github {
            keys_url: keys_url?,
            action: action?,
            path: g.path.clone(),
        })
    }
}

/// GitHub's signing keys as last fetched, by identifier: each an uncompressed P-256 point.
#[derive(Debug, Default)]
pub struct GithubKeys {
    cache: tokio::sync::Mutex<KeyCache>,
}

#[derive(Debug, Default)]
struct KeyCache {
    keys: HashMap<String, Vec<u8>>,
    /// When the last fetch was tried (Unix seconds on the gateway's clock).
    fetched: Option<i64>,
}

/// GitHub's `public_keys` document.
#[derive(Debug, Deserialize)]
struct PublicKeys {
    public_keys: Vec<PublicKey>,
}

#[derive(Debug, Deserialize)]
struct PublicKey {
    key_identifier: String,
    key: String,
}

/// The DER prefix of every P-256 SubjectPublicKeyInfo with an uncompressed point: the
/// algorithm (id-ecPublicKey, prime256v1) and the bit string's header. What follows is the
/// 65-byte point ring verifies with. Anything else is not a key GitHub signs with.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// The P-256 point of a PEM public key (SubjectPublicKeyInfo).
pub fn p256_point(pem: &str) -> Option<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::SubjectPublicKeyInfoDer::from_pem_slice(pem.as_bytes()).ok()?;
    let point = der.as_ref().strip_prefix(&P256_SPKI_PREFIX)?;
    (point.len() == 65 && point.first() == Some(&0x04)).then(|| point.to_vec())
}

impl GithubKeys {
    /// The point for `identifier`, fetching the keys again when it is unknown (at most once
    /// a minute; `now` in Unix seconds).
    async fn point(&self, url: &Uri, identifier: &str, now: i64) -> Option<Vec<u8>> {
        let mut cache = self.cache.lock().await;
        if let Some(point) = cache.keys.get(identifier) {
            return Some(point.clone());
        }
        if cache
            .fetched
            .is_some_and(|at| now.abs_diff(at) < REFRESH_EVERY_SECS.unsigned_abs())
        {
            return None;
        }
        cache.fetched = Some(now);
        match fetch_keys(url).await {
            Ok(keys) => {
                tracing::info!(keys = keys.len(), "GitHub's secret-scanning keys fetched");
                cache.keys = keys;
            }
            Err(e) => {
                tracing::warn!(error = %e, url = %url, "GitHub's secret-scanning keys cannot be fetched")
            }
        }
        cache.keys.get(identifier).cloned()
    }
}

async fn fetch_keys(url: &Uri) -> Result<HashMap<String, Vec<u8>>, String> {
    let tls = crate::tls::client_config(None).map_err(|e| e.to_string())?;
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    let client: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(connector);
    let req = Request::get(url.clone())
        .header(http::header::USER_AGENT, "keygate")
        .header(http::header::ACCEPT, "application/json")
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let fetch = async {
        let response = client.request(req).await.map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("answered {}", response.status()));
        }
        let body = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        let doc: PublicKeys = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        Ok(doc
            .public_keys
            .into_iter()
            .filter_map(|k| Some((k.key_identifier, p256_point(&k.key)?)))
            .collect())
    };
    tokio::time::timeout(FETCH_TIMEOUT, fetch)
        .await
        .map_err(|_| format!("no answer within {FETCH_TIMEOUT:?}"))?
}

/// One token GitHub reports.
#[derive(Debug, Deserialize)]
struct Found {
    token: String,
    #[serde(default, rename = "type")]
    kind: String,
    #[serde(default)]
    url: String,
}

/// One answer to GitHub.
#[derive(Debug, Serialize)]
struct Label {
    token_hash: String,
    token_type: String,
    label: &'static str,
}

/// The GitHub partner endpoint: 200 with a label for each token; 401 when the signature does
/// not verify; 400 for a body that is not GitHub's JSON; 413 past 1 MiB. Only a verified
/// report changes anything.
pub async fn github(
    gw: &Arc<Gateway>,
    req: Request<hyper::body::Incoming>,
    gh: &Github,
) -> Response<ResponseBody> {
    match github_report(gw, req, gh).await {
        Ok(labels) => {
            let mut response = Response::new(ResponseBody::full(
                serde_json::to_vec(&labels).unwrap_or_default(),
            ));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        Err(rejection) => {
            tracing::info!(
                code = rejection.code(),
                "GitHub secret-scanning report refused"
            );
            rejection.into_response(None)
        }
    }
}

async fn github_report(
    gw: &Arc<Gateway>,
    req: Request<hyper::body::Incoming>,
    gh: &Github,
) -> Result<Vec<Label>, Rejection> {
    if req.method() != http::Method::POST {
        return Err(Rejection::MethodNotAllowed);
    }
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (identifier, signature) = (
        header("github-public-key-identifier"),
        header("github-public-key-signature"),
    );
    let within = gw.snapshot.load().listeners.header_read_timeout;
    let body = match tokio::time::timeout(within, Limited::new(req.into_body(), MAX_BODY).collect())
        .await
    {
        Err(_) => return Err(Rejection::RequestTimeout),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(Rejection::BodyTooLarge)
        }
        Ok(Err(_)) => {
            return Err(Rejection::InvalidRequest {
                field: None,
                detail: "the body could not be read".into(),
            })
        }
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    let (Some(identifier), Some(signature)) = (identifier, signature) else {
        return Err(Rejection::InvalidSignature);
    };
    let signature = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(signature.trim())
            .map_err(|_| Rejection::InvalidSignature)?
    };
    let point = gw
        .github_keys
        .point(&gh.keys_url, &identifier, gw.clock.unix_secs())
        .await
        .ok_or(Rejection::InvalidSignature)?;
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, &point)
        .verify(&body, &signature)
        .map_err(|_| Rejection::InvalidSignature)?;
    let found: Vec<Found> =
        serde_json::from_slice(&body).map_err(|e| Rejection::InvalidRequest {
            field: Some("body".into()),
            detail: format!(
                "not GitHub's report, a JSON array of {{token, type, url, source}}: {e}"
            ),
        })?;
    // One source URL for the whole batch is what the store keeps per key; each key gets
    // the URL of the report that found it.
    let mut labels = Vec::with_capacity(found.len());
    let mut by_url: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, f) in found.iter().enumerate() {
        by_url.entry(f.url.clone()).or_default().push(i);
    }
    let mut outcome: Vec<Option<LeakFound>> = (0..found.len()).map(|_| None).collect();
    for (url, indexes) in by_url {
        let tokens: Vec<String> = indexes
            .iter()
            .filter_map(|&i| found.get(i).map(|f| f.token.clone()))
            .collect();
        let (results, _) = report(gw, tokens, gh.action, &url, "github").await?;
        for (i, r) in indexes.into_iter().zip(results) {
            if let Some(slot) = outcome.get_mut(i) {
                *slot = Some(r);
            }
        }
    }
    for (f, r) in found.iter().zip(outcome) {
        let token_hash = r.as_ref().map_or_else(
            || crate::keys::hex(&keys::format::hash(&f.token)),
            |r| r.token_hash.clone(),
        );
        labels.push(Label {
            token_hash,
            token_type: f.kind.clone(),
            label: if r.is_some_and(|r| r.key.is_some() || r.admin_token.is_some()) {
                "true_positive"
            } else {
                "false_positive"
            },
        });
    }
    Ok(labels)
}

/// Takes `action` on each of `tokens` that is one of keygate's keys or admin tokens, found
/// at `url`, by `actor`: in one write of the store for the keys (and one for the admin
/// tokens, if any is revoked), live before it returns, audited and sent to the alert
/// webhook. Returns each token's hash, key and admin token, and any warning for the caller.
pub async fn report(
    gw: &Arc<Gateway>,
    tokens: Vec<String>,
    action: LeakAction,
    url: &str,
    actor: &str,
) -> Result<(Vec<LeakFound>, Vec<String>), Rejection> {
    let now = gw.clock.unix_secs();
    let url_owned = url.to_string();
    let hashes: Vec<[u8; 32]> = tokens.iter().map(|t| keys::format::hash(t)).collect();
    let (mut found, mut warnings) = crate::reload::change_keys(gw, actor, move |op| {
        keys::leaked(op, &tokens, action, &url_owned)
    })
    .await?;
    // Admin tokens: matched against every token in force, and only a stored one revoked.
    let actions = admin_token::leak_actions(&hashes, &gw.snapshot.load().admin_tokens, action);
    let revoked = admin_token::to_revoke(&hashes, &actions);
    if !revoked.is_empty() {
        crate::reload::change_side(gw, actor, keys::Side::AdminTokens, move |docs| {
            Ok(admin_token::leaked(docs, &revoked, true))
        })
        .await?;
    }
    let mut alerts = Vec::new();
    for (f, leaked) in found.iter_mut().zip(actions) {
        let Some(leaked) = leaked else { continue };
        let (event, alert) = notice_token(now, actor, &leaked, url);
        gw.audit.record(&event);
        alerts.push(alert);
        if leaked.source != admin_token::Source::Store {
            warnings.push(format!(
                "admin token `{}` is in the config file or KEYGATE_ADMIN_TOKEN, so it was not revoked: remove it there",
                leaked.name
            ));
        }
        f.admin_token = Some(leaked);
    }
    let records: Vec<_> = found.iter().filter_map(|f| f.key.clone()).collect();
    for record in &records {
        let (event, alert) = notice(now, actor, record, url, action);
        gw.audit.record(&event);
        alerts.push(alert);
    }
    let webhook = gw.snapshot.load().alerts.webhook.clone();
    for alert in alerts {
        if let Some(webhook) = webhook.clone() {
            let g = gw.clone();
            tokio::spawn(async move {
                if !crate::alerts::deliver(&webhook, &alert).await {
                    g.metrics
                        .webhook_failures
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
    }
    Ok((found, warnings))
}

/// What is told of a key found leaked: its audit line (`key.leaked`, with where it was
/// found and the action) and the alert webhook's body. Neither holds the token.
pub fn notice(
    now: i64,
    actor: &str,
    record: &crate::keys::KeyRecord,
    url: &str,
    action: LeakAction,
) -> (AuditEvent, serde_json::Value) {
    tracing::warn!(key_id = %record.id, action = action.as_str(), url, "key reported leaked");
    let event = AuditEvent::new(now, actor, "key.leaked")
        .key(record)
        .reason(format!("found at {url}; action: {}", action.as_str()));
    let alert = serde_json::json!({
        "event": "key.leaked",
        "key_id": record.id,
        "namespace": record.namespace,
        "url": url,
        "action": action.as_str(),
        "time": crate::clock::rfc3339(now),
    });
    (event, alert)
}

/// What is told of an admin token found leaked: its audit line (`admin_token.leaked`, with
/// where it was found and the action) and the alert webhook's body. Neither holds the token.
pub fn notice_token(
    now: i64,
    actor: &str,
    leaked: &admin_token::LeakedToken,
    url: &str,
) -> (AuditEvent, serde_json::Value) {
    let action = leaked.action.as_str();
    tracing::warn!(admin_token = %leaked.name, source = leaked.source.as_str(), action, url, "admin token reported leaked");
    let event = AuditEvent::new(now, actor, "admin_token.leaked").reason(format!(
        "{} ({}): found at {url}; action: {action}",
        leaked.name,
        leaked.source.as_str()
    ));
    let alert = serde_json::json!({
        "event": "admin_token.leaked",
        "admin_token": leaked.name,
        "source": leaked.source.as_str(),
        "url": url,
        "action": action,
        "time": crate::clock::rfc3339(now),
    });
    (event, alert)
}

/// A body for the admin route: `{"keys": [...], "action"?, "source"?}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportBody {
    pub keys: Vec<String>,
    #[serde(default)]
    pub action: Option<String>,
    #[serde(default)]
    pub source: Option<String>,
}

/// The answer for one reported token: never the token, only its hash.
pub fn answer(found: &[LeakFound], action: LeakAction) -> serde_json::Value {
    let keys: Vec<_> = found
        .iter()
        .map(|f| {
            let token = f.admin_token.as_ref();
            serde_json::json!({
                "token_hash": f.token_hash,
                "label": if f.key.is_some() || token.is_some() { "true_positive" } else { "false_positive" },
                "key_id": f.key.as_ref().map(|k| k.id.clone()),
                "admin_token": token.map(|t| t.name.clone()),
                "action": f.key.as_ref().map(|_| action.as_str()).or(token.map(|t| t.action.as_str())),
            })
        })
        .collect();
    serde_json::json!({ "keys": keys })
}

/// The tokens in a scanner's output: one per line, or the JSON of gitleaks (an array of
/// findings with `Secret`) or TruffleHog (JSON lines with `Raw`). Blank lines and `#`
/// comments are skipped.
pub fn tokens_in(text: &str) -> Vec<String> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') {
        if let Ok(findings) = serde_json::from_str::<Vec<serde_json::Value>>(trimmed) {
            return findings
                .iter()
                .filter_map(|f| f.get("Secret").and_then(|s| s.as_str()).map(str::to_string))
                .collect();
        }
    }
    let mut tokens = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with('{') {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
                if let Some(raw) = v.get("Raw").and_then(|s| s.as_str()) {
                    tokens.push(raw.to_string());
                }
                continue;
            }
        }
        tokens.push(line.to_string());
    }
    tokens
}

/// Turns a signed GitHub report body into the headers that carry its signature, for tests
/// of the signature path from outside: base64 of a DER ECDSA signature.
pub fn signature_header(der: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(der)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scanner_output_gives_its_tokens() {
        assert_eq!(
            tokens_in("# leaked\nkg_live_a\n\n kg_live_b \n"),
            ["kg_live_a", "kg_live_b"]
        );
        let gitleaks = r#"[{"RuleID":"generic-api-key","Secret":"kg_live_x","File":"a.env"},{"Secret":"kg_live_y"}]"#;
        assert_eq!(tokens_in(gitleaks), ["kg_live_x", "kg_live_y"]);
        let trufflehog = "{\"SourceMetadata\":{},\"Raw\":\"kg_live_z\"}\n{\"Raw\":\"kg_test_w\",\"Verified\":false}\n";
        assert_eq!(tokens_in(trufflehog), ["kg_live_z", "kg_test_w"]);
    }

    #[test]
    fn only_a_p256_public_key_is_taken() {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            &rng,
        )
        .unwrap();
        let pair = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            pkcs8.as_ref(),
            &rng,
        )
        .unwrap();
        use ring::signature::KeyPair;
        let point = pair.public_key().as_ref().to_vec();
        let mut der = P256_SPKI_PREFIX.to_vec();
        der.extend_from_slice(&point);
        let pem = format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            signature_header(&der)
        );
        assert_eq!(p256_point(&pem), Some(point));
        assert_eq!(p256_point("not a key"), None);
        let mut other = der.clone();
        if let Some(b) = other.get_mut(20) {
            *b ^= 1;
        }
        let pem = format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            signature_header(&other)
        );
        assert_eq!(p256_point(&pem), None, "another curve or algorithm");
    }
}
