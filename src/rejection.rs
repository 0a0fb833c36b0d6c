//! Every refusal the gateway and its admin API can give, and the one place that turns a
//! refusal into an HTTP response (RFC 9457 problem details with a machine-readable `code`).

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{Response, StatusCode};

use crate::body::ResponseBody;
use crate::config::ConfigError;
use crate::policy::rate::RateHeaders;

/// Why a request was not forwarded, or an admin call not carried out.
#[derive(Debug)]
pub enum Rejection {
    // 401: who are you?
    MissingKey,
    MalformedKey,
    UnknownKey,
    ExpiredKey,
    RevokedKey,
    InactiveKey,
    WrongEnvironment,
    // 403: you may not.
    IpNotAllowed,
    ScopeDenied,
    NamespaceDenied,
    // 429: not now.
    /// Boxed: the headers are large, and keeping `Rejection` small keeps every stage's
    /// `Result` small.
    RateLimited(Box<RateHeaders>),
    QuotaExceeded(Box<RateHeaders>),
    /// Too many failed authentications from this address: locked out for `retry_after`
    /// seconds, without a lookup.
    TooManyFailedAttempts {
        retry_after: u64,
    },
    /// The key's credits are used up; `retry_after` is the time to the next refill, when it
    /// has one.
    CreditsExhausted {
        retry_after: Option<u64>,
    },
    // The request itself, and the way upstream.
    InvalidPath,
    NoRoute,
    BodyTooLarge,
    UpstreamUnavailable,
    UpstreamTimeout,
    // The admin API.
    AdminUnauthorized,
    /// The admin token's role does not allow this call.
    InsufficientRole,
    NotFound,
    MethodNotAllowed,
    ReloadFailed(Vec<ConfigError>),
    /// The key store on disk is invalid, so keys cannot be managed until it is fixed.
    StoreInvalid(Vec<ConfigError>),
    /// A request body or parameter is wrong; `field` names it when one is to blame.
    InvalidRequest {
        field: Option<String>,
        detail: String,
    },
    KeyNotFound,
    KeyRevoked,
    KeyLimitReached(String),
    KeyRotating,
    /// A secret-scanning report whose signature does not verify.
    InvalidSignature,
    /// No identity has this id.
    IdentityNotFound,
    /// No alert rule has this name.
    AlertNotFound,
    /// The alert rule is written in the config file: change it there.
    AlertInConfig,
    /// An alert rule with this name exists already.
    AlertExists,
    /// No admin token kept in the store has this name.
    AdminTokenNotFound,
    /// An admin token (in the config, the environment or the store) has this name already.
    AdminTokenExists,
    /// The admin token is in the config file or `KEYGATE_ADMIN_TOKEN`: remove it there.
    AdminTokenInConfig,
    /// The call would revoke its own token, the last working one with role `admin`.
    LastAdminToken,
    /// The shared rate limiter (Redis) cannot be reached and `rate_limit.fail_mode` is
    /// `closed`.
    LimiterUnavailable,
    /// The key store (Redis) cannot be reached, so keys cannot be changed just now.
    StoreUnavailable(String),
    /// An admin request's body did not arrive within `limits.header_read_timeout`.
    RequestTimeout,
    /// Something that should not happen. It is logged where it happens; the client learns
    /// nothing of it.
    Internal,
}

/// Every code a refusal can carry, in a fixed order: a code's index here is its slot in the
/// usage and metrics counters ([`Rejection::index`]).
pub const CODES: [&str; 42] = [
    "missing_key",
    "malformed_key",
    "unknown_key",
    "expired_key",
    "revoked_key",
    "inactive_key",
    "wrong_environment",
    "ip_not_allowed",
    "scope_denied",
    "namespace_denied",
    "rate_limited",
    "quota_exceeded",
    "too_many_failed_attempts",
    "invalid_path",
    "no_route",
    "body_too_large",
    "upstream_unavailable",
    "upstream_timeout",
    "invalid_admin_token",
    "not_found",
    "method_not_allowed",
    "invalid_config",
    "invalid_request",
    "key_not_found",
    "key_revoked",
    "key_limit_reached",
    "key_rotating",
    "internal",
    "limiter_unavailable",
    "store_unavailable",
    "request_timeout",
    "insufficient_role",
    "alert_not_found",
    "alert_in_config",
    "alert_exists",
    "credits_exhausted",
    "invalid_signature",
    "identity_not_found",
    "admin_token_not_found",
    "admin_token_exists",
    "admin_token_in_config",
    "last_admin_token",
];

/// The slot of `code` in [`CODES`].
pub fn code_index(code: &str) -> Option<usize> {
    CODES.iter().position(|c| *c == code)
}

/// Builds a problem+json body at compile time.
macro_rules! problem {
    ($status:literal, $title:literal, $code:literal, $detail:literal) => {
        concat!(
            "{\"type\":\"about:blank\",\"title\":\"",
            $title,
            "\",\"status\":",
            $status,
            ",\"detail\":\"",
            $detail,
            "\",\"code\":\"",
            $code,
            "\"}"
        )
    };
}

const PROBLEM_JSON: HeaderValue = HeaderValue::from_static("application/problem+json");
const BEARER_CHALLENGE: HeaderValue =
    HeaderValue::from_static("Bearer realm=\"keygate\", error=\"invalid_token\"");
const ADMIN_CHALLENGE: HeaderValue = HeaderValue::from_static("Bearer realm=\"keygate-admin\"");

impl Rejection {
    /// The contract's machine-readable code.
    pub fn code(&self) -> &'static str {
        self.parts().1
    }

    /// The code's slot in [`CODES`].
    pub fn index(&self) -> usize {
        use Rejection::*;
        match self {
            MissingKey => 0,
            MalformedKey => 1,
            UnknownKey => 2,
            ExpiredKey => 3,
            RevokedKey => 4,
            InactiveKey => 5,
            WrongEnvironment => 6,
            IpNotAllowed => 7,
            ScopeDenied => 8,
            NamespaceDenied => 9,
            RateLimited(_) => 10,
            QuotaExceeded(_) => 11,
            TooManyFailedAttempts { .. } => 12,
            InvalidPath => 13,
            NoRoute => 14,
            BodyTooLarge => 15,
            UpstreamUnavailable => 16,
            UpstreamTimeout => 17,
            AdminUnauthorized => 18,
            NotFound => 19,
            MethodNotAllowed => 20,
            ReloadFailed(_) | StoreInvalid(_) => 21,
            InvalidRequest { .. } => 22,
            KeyNotFound => 23,
            KeyRevoked => 24,
            KeyLimitReached(_) => 25,
            KeyRotating => 26,
            Internal => 27,
            LimiterUnavailable => 28,
            StoreUnavailable(_) => 29,
            RequestTimeout => 30,
            InsufficientRole => 31,
            AlertNotFound => 32,
            AlertInConfig => 33,
            AlertExists => 34,
            CreditsExhausted { .. } => 35,
            InvalidSignature => 36,
            IdentityNotFound => 37,
            AdminTokenNotFound => 38,
            AdminTokenExists => 39,
            AdminTokenInConfig => 40,
            LastAdminToken => 41,
        }
    }

    pub fn status(&self) -> StatusCode {
        self.parts().0
    }

    /// Status, code and the static problem body for every refusal.
    fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        use Rejection::*;
        use StatusCode as S;
        match self {
            MissingKey => (S::UNAUTHORIZED, "missing_key", problem!(401, "Unauthorized", "missing_key", "Send an API key as `Authorization: Bearer <key>`.")),
            MalformedKey => (S::UNAUTHORIZED, "malformed_key", problem!(401, "Unauthorized", "malformed_key", "The credential is not a well-formed API key; check for a typo or truncation.")),
            UnknownKey => (S::UNAUTHORIZED, "unknown_key", problem!(401, "Unauthorized", "unknown_key", "The API key is not known.")),
            ExpiredKey => (S::UNAUTHORIZED, "expired_key", problem!(401, "Unauthorized", "expired_key", "The API key has expired.")),
            RevokedKey => (S::UNAUTHORIZED, "revoked_key", problem!(401, "Unauthorized", "revoked_key", "The API key has been revoked.")),
            InactiveKey => (S::UNAUTHORIZED, "inactive_key", problem!(401, "Unauthorized", "inactive_key", "The API key is disabled.")),
            WrongEnvironment => (S::UNAUTHORIZED, "wrong_environment", problem!(401, "Unauthorized", "wrong_environment", "The API key belongs to another environment.")),
            IpNotAllowed => (S::FORBIDDEN, "ip_not_allowed", problem!(403, "Forbidden", "ip_not_allowed", "The API key may not be used from this address.")),
            ScopeDenied => (S::FORBIDDEN, "scope_denied", problem!(403, "Forbidden", "scope_denied", "The API key's scopes do not allow this method on this path.")),
            NamespaceDenied => (S::FORBIDDEN, "namespace_denied", problem!(403, "Forbidden", "namespace_denied", "The API key's namespace may not use this route.")),
            RateLimited(_) => (S::TOO_MANY_REQUESTS, "rate_limited", problem!(429, "Too Many Requests", "rate_limited", "The API key's rate limit is exhausted; retry after the time in Retry-After.")),
            QuotaExceeded(_) => (S::TOO_MANY_REQUESTS, "quota_exceeded", problem!(429, "Too Many Requests", "quota_exceeded", "The API key's quota for this period is used up; it resets at the time in Retry-After.")),
            CreditsExhausted { .. } => (S::TOO_MANY_REQUESTS, "credits_exhausted", problem!(429, "Too Many Requests", "credits_exhausted", "The API key has no credits left; they come back at the refill in Retry-After, if the key has one.")),
            TooManyFailedAttempts { .. } => (S::TOO_MANY_REQUESTS, "too_many_failed_attempts", problem!(429, "Too Many Requests", "too_many_failed_attempts", "Too many failed authentications from this address; retry after the time in Retry-After.")),
            InvalidPath => (S::BAD_REQUEST, "invalid_path", problem!(400, "Bad Request", "invalid_path", "The request path is not a valid origin-form path, holds an encoded slash, backslash, semicolon or NUL, or has path parameters (`;`) that this route does not allow.")),
            NoRoute => (S::NOT_FOUND, "no_route", problem!(404, "Not Found", "no_route", "No route matches this host and path.")),
            BodyTooLarge => (S::PAYLOAD_TOO_LARGE, "body_too_large", problem!(413, "Content Too Large", "body_too_large", "The request body is larger than this route allows.")),
            UpstreamUnavailable => (S::BAD_GATEWAY, "upstream_unavailable", problem!(502, "Bad Gateway", "upstream_unavailable", "The upstream could not be reached.")),
            UpstreamTimeout => (S::GATEWAY_TIMEOUT, "upstream_timeout", problem!(504, "Gateway Timeout", "upstream_timeout", "The upstream did not answer in time.")),
            AdminUnauthorized => (S::UNAUTHORIZED, "invalid_admin_token", problem!(401, "Unauthorized", "invalid_admin_token", "Send a valid admin token as `Authorization: Bearer <token>`.")),
            InsufficientRole => (S::FORBIDDEN, "insufficient_role", problem!(403, "Forbidden", "insufficient_role", "The admin token's role does not allow this call: read tokens may only read, verify tokens may only verify keys.")),
            NotFound => (S::NOT_FOUND, "not_found", problem!(404, "Not Found", "not_found", "There is nothing at this path.")),
            MethodNotAllowed => (S::METHOD_NOT_ALLOWED, "method_not_allowed", problem!(405, "Method Not Allowed", "method_not_allowed", "This path does not take this method.")),
            ReloadFailed(_) | StoreInvalid(_) => (S::UNPROCESSABLE_ENTITY, "invalid_config", ""),
            InvalidRequest { .. } => (S::BAD_REQUEST, "invalid_request", ""),
            KeyNotFound => (S::NOT_FOUND, "key_not_found", problem!(404, "Not Found", "key_not_found", "No key has this id.")),
            KeyRevoked => (S::CONFLICT, "key_revoked", problem!(409, "Conflict", "key_revoked", "The key is revoked, and a revoked key cannot be changed or enabled again.")),
            KeyLimitReached(_) => (S::CONFLICT, "key_limit_reached", ""),
            KeyRotating => (S::CONFLICT, "key_rotating", problem!(409, "Conflict", "key_rotating", "The key is already being rotated: rotate its replacement, or wait for the grace to end.")),
            InvalidSignature => (S::UNAUTHORIZED, "invalid_signature", problem!(401, "Unauthorized", "invalid_signature", "The report's signature does not verify against the scanner's published keys; nothing was changed.")),
            IdentityNotFound => (S::NOT_FOUND, "identity_not_found", problem!(404, "Not Found", "identity_not_found", "No identity has this id.")),
            AlertNotFound => (S::NOT_FOUND, "alert_not_found", problem!(404, "Not Found", "alert_not_found", "No alert rule has this name.")),
            AlertInConfig => (S::CONFLICT, "alert_in_config", problem!(409, "Conflict", "alert_in_config", "This alert rule is written in the config file: change or remove it there.")),
            AlertExists => (S::CONFLICT, "alert_exists", problem!(409, "Conflict", "alert_exists", "An alert rule with this name exists already: choose another name, or change that rule.")),
            AdminTokenNotFound => (S::NOT_FOUND, "admin_token_not_found", problem!(404, "Not Found", "admin_token_not_found", "No admin token kept in the store has this name.")),
            AdminTokenExists => (S::CONFLICT, "admin_token_exists", problem!(409, "Conflict", "admin_token_exists", "An admin token with this name exists already, in the config, the environment or the store: choose another name.")),
            AdminTokenInConfig => (S::CONFLICT, "admin_token_in_config", problem!(409, "Conflict", "admin_token_in_config", "This admin token is written in the config file (admin_tokens) or is KEYGATE_ADMIN_TOKEN: remove it there, then reload.")),
            LastAdminToken => (S::CONFLICT, "last_admin_token", problem!(409, "Conflict", "last_admin_token", "This is the token that made the call and the last working admin token: make another admin token first, or nobody could manage the gateway through this API.")),
            LimiterUnavailable => (S::SERVICE_UNAVAILABLE, "limiter_unavailable", problem!(503, "Service Unavailable", "limiter_unavailable", "The shared rate limiter cannot be reached, and this gateway is set to refuse rather than guess; retry after the time in Retry-After.")),
            StoreUnavailable(_) => (S::SERVICE_UNAVAILABLE, "store_unavailable", ""),
            RequestTimeout => (S::REQUEST_TIMEOUT, "request_timeout", problem!(408, "Request Timeout", "request_timeout", "The request body did not arrive in time.")),
            Internal => (S::INTERNAL_SERVER_ERROR, "internal", problem!(500, "Internal Server Error", "internal", "The gateway failed to handle the request.")),
        }
    }

    /// The one mapping from a refusal to a response.
    pub fn into_response(self, request_id: Option<HeaderValue>) -> Response<ResponseBody> {
        let (status, _, body) = self.parts();
        let body = match &self {
            Rejection::ReloadFailed(errors) => Bytes::from(invalid_config_body(
                errors,
                "The new configuration has {n}; the running one stays in force.",
            )),
            Rejection::StoreInvalid(errors) => Bytes::from(invalid_config_body(
                errors,
                "The key store has {n}; fix it before managing keys.",
            )),
            Rejection::InvalidRequest { field, detail } => Bytes::from(dynamic_body(
                status,
                "invalid_request",
                detail,
                field.as_deref(),
            )),
            Rejection::KeyLimitReached(detail) => {
                Bytes::from(dynamic_body(status, "key_limit_reached", detail, None))
            }
            Rejection::StoreUnavailable(detail) => {
                Bytes::from(dynamic_body(status, "store_unavailable", detail, None))
            }
            _ => Bytes::from_static(body.as_bytes()),
        };
        let mut response = Response::new(ResponseBody::full(body));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, PROBLEM_JSON);
        if let Some(id) = request_id {
            headers.insert(crate::headers::X_REQUEST_ID, id);
        }
        match self {
            Rejection::RateLimited(rate) | Rejection::QuotaExceeded(rate) => {
                rate.write(headers, true)
            }
            Rejection::LimiterUnavailable | Rejection::StoreUnavailable(_) => {
                headers.insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            Rejection::TooManyFailedAttempts { retry_after }
            | Rejection::CreditsExhausted {
                retry_after: Some(retry_after),
            } => {
                headers.insert(http::header::RETRY_AFTER, HeaderValue::from(retry_after));
            }
            Rejection::AdminUnauthorized => {
                headers.insert(WWW_AUTHENTICATE, ADMIN_CHALLENGE);
            }
            _ if status == StatusCode::UNAUTHORIZED => {
                headers.insert(WWW_AUTHENTICATE, BEARER_CHALLENGE);
            }
            _ => {}
        }
        response
    }
}

fn dynamic_body(status: StatusCode, code: &str, detail: &str, field: Option<&str>) -> Vec<u8> {
    let mut body = serde_json::json!({
        "type": "about:blank",
        "title": status.canonical_reason().unwrap_or(""),
        "status": status.as_u16(),
        "detail": detail,
        "code": code,
    });
    if let (Some(field), Some(object)) = (field, body.as_object_mut()) {
        object.insert("field".into(), field.into());
    }
    serde_json::to_vec(&body).unwrap_or_default()
}

/// Lifecycle errors as refusals. Store and I/O failures are logged here and answered
/// blandly, so nothing about the machine leaks.
impl From<crate::keys::KeyError> for Rejection {
    fn from(e: crate::keys::KeyError) -> Self {
        use crate::keys::KeyError as K;
        match e {
            K::Invalid { field, message } => Rejection::InvalidRequest {
                field: Some(field.to_string()),
                detail: message,
            },
            K::Import(message) => Rejection::InvalidRequest {
                field: Some("keys".into()),
                detail: message,
            },
            K::NotFound(_) => Rejection::KeyNotFound,
            K::Revoked(_) => Rejection::KeyRevoked,
            e @ K::LimitReached { .. } => Rejection::KeyLimitReached(e.to_string()),
            K::Rotating { .. } => Rejection::KeyRotating,
            K::Store(errors) => Rejection::StoreInvalid(errors),
            K::Unavailable(detail) => Rejection::StoreUnavailable(detail),
            e @ (K::Io(_) | K::Random(_)) => {
                tracing::error!(error = %e, "key store operation failed");
                Rejection::Internal
            }
        }
    }
}

/// A 422 `invalid_config` body listing every error; `{n}` in `detail` becomes "1 problem" or
/// "N problems".
fn invalid_config_body(errors: &[ConfigError], detail: &str) -> Vec<u8> {
    let n = match errors.len() {
        1 => "1 problem".to_string(),
        n => format!("{n} problems"),
    };
    serde_json::to_vec(&serde_json::json!({
        "type": "about:blank",
        "title": "Unprocessable Content",
        "status": 422,
        "detail": detail.replace("{n}", &n),
        "code": "invalid_config",
        "errors": errors,
    }))
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_static_body_is_valid_problem_json() {
        use Rejection::*;
        for r in [
            MissingKey,
            MalformedKey,
            UnknownKey,
            ExpiredKey,
            RevokedKey,
            InactiveKey,
            WrongEnvironment,
            IpNotAllowed,
            ScopeDenied,
            NamespaceDenied,
            InvalidPath,
            NoRoute,
            BodyTooLarge,
            UpstreamUnavailable,
            UpstreamTimeout,
            AdminUnauthorized,
            InsufficientRole,
            NotFound,
            MethodNotAllowed,
            Internal,
            KeyNotFound,
            KeyRevoked,
            KeyRotating,
            AlertNotFound,
            AlertInConfig,
            AlertExists,
            InvalidSignature,
            IdentityNotFound,
            AdminTokenNotFound,
            AdminTokenExists,
            AdminTokenInConfig,
            LastAdminToken,
            RequestTimeout,
            TooManyFailedAttempts { retry_after: 1 },
            CreditsExhausted { retry_after: None },
        ] {
            assert_eq!(CODES[r.index()], r.code());
            let (status, code, body) = r.parts();
            let v: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(v["status"], status.as_u16());
            assert_eq!(v["code"], code);
            assert!(v["detail"].as_str().unwrap().len() > 10);
        }
    }

    #[test]
    fn dynamic_refusals_name_their_field() {
        let r = Rejection::InvalidRequest {
            field: Some("scopes".into()),
            detail: "bad \"scope\"".into(),
        };
        let resp = r.into_response(None);
        assert_eq!(resp.status(), 400);
        let ResponseBody::Full(Some(body)) = resp.into_body() else {
            panic!("a full body")
        };
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            (v["code"].as_str(), v["field"].as_str()),
            (Some("invalid_request"), Some("scopes"))
        );
        assert_eq!(v["detail"], "bad \"scope\"");
    }

    #[test]
    fn unauthorized_carries_the_bearer_challenge() {
        let resp = Rejection::UnknownKey.into_response(None);
        assert_eq!(resp.status(), 401);
        assert_eq!(resp.headers()[WWW_AUTHENTICATE], BEARER_CHALLENGE);
        assert_eq!(resp.headers()[CONTENT_TYPE], "application/problem+json");
        let resp = Rejection::ScopeDenied.into_response(None);
        assert!(resp.headers().get(WWW_AUTHENTICATE).is_none());
    }
}
