//! Stages 3 and 4: find the credential, check its format, and look its SHA-256 up in the
//! snapshot. The checksum check comes first, so a made-up key costs no hash and no lookup.

use http::header::AUTHORIZATION;
use http::HeaderMap;

use crate::keys::format;
use crate::rejection::Rejection;
use crate::snapshot::{KeyEntry, Snapshot};

/// The header that carries a key when `x_api_key` is on.
pub const X_API_KEY: &str = "x-api-key";

/// The presented token: `Authorization: Bearer <token>`, or `X-API-Key` when allowed.
pub fn extract(headers: &HeaderMap, allow_x_api_key: bool) -> Result<&str, Rejection> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    if let Some(value) = values.next() {
        if values.next().is_some() {
            return Err(Rejection::MalformedKey);
        }
        let text = value.to_str().map_err(|_| Rejection::MalformedKey)?;
        let text = text.trim();
        let (scheme, token) = text.split_once(' ').unwrap_or((text, ""));
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(Rejection::MalformedKey);
        }
        return match token.trim_start() {
            "" => Err(Rejection::MissingKey),
            token => Ok(token),
        };
    }
    if allow_x_api_key {
        let mut values = headers.get_all(X_API_KEY).iter();
        if let Some(value) = values.next() {
            if values.next().is_some() {
                return Err(Rejection::MalformedKey);
            }
            return match value.to_str().map_err(|_| Rejection::MalformedKey)?.trim() {
                "" => Err(Rejection::MissingKey),
                token => Ok(token),
            };
        }
    }
    Err(Rejection::MissingKey)
}

/// The longest token looked up without the format check (imported keys).
pub const MAX_IMPORTED_LEN: usize = 512;

/// The key a token names: format check, then SHA-256, then one map lookup. A token not in
/// keygate's format is looked up only if the store holds imported keys, and only if it does
/// not start like a keygate key (those must pass their checksum).
pub fn identify<'s>(snapshot: &'s Snapshot, token: &str) -> Result<&'s KeyEntry, Rejection> {
    if format::parse(token).is_err() {
        let unformatted_ok = snapshot.accepts_unformatted
            && token.len() <= MAX_IMPORTED_LEN
            && !snapshot
                .prefix_bases
                .iter()
                .any(|b| token.starts_with(b.as_str()));
        if !unformatted_ok {
            return Err(Rejection::MalformedKey);
        }
    }
    snapshot
        .key_by_hash(&format::hash(token))
        .ok_or(Rejection::UnknownKey)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn bearer_is_read_case_insensitively() {
        assert_eq!(
            extract(&headers(&[("authorization", "Bearer abc")]), false).unwrap(),
            "abc"
        );
        assert_eq!(
            extract(&headers(&[("authorization", "bearer  abc ")]), false).unwrap(),
            "abc"
        );
    }

    #[test]
    fn missing_and_malformed_are_told_apart() {
        assert!(matches!(
            extract(&HeaderMap::new(), false),
            Err(Rejection::MissingKey)
        ));
        assert!(matches!(
            extract(&headers(&[("authorization", "Bearer ")]), false),
            Err(Rejection::MissingKey)
        ));
        assert!(matches!(
            extract(&headers(&[("authorization", "Basic abc")]), false),
            Err(Rejection::MalformedKey)
        ));
        assert!(matches!(
            extract(&headers(&[("authorization", "Bearer")]), false),
            Err(Rejection::MissingKey)
        ));
        assert!(matches!(
            extract(&headers(&[("authorization", "abc")]), false),
            Err(Rejection::MalformedKey)
        ));
        let two = headers(&[("authorization", "Bearer a"), ("authorization", "Bearer b")]);
        assert!(matches!(extract(&two, false), Err(Rejection::MalformedKey)));
    }

    #[test]
    fn x_api_key_only_when_allowed() {
        let h = headers(&[("x-api-key", "abc")]);
        assert!(matches!(extract(&h, false), Err(Rejection::MissingKey)));
        assert_eq!(extract(&h, true).unwrap(), "abc");
    }
}
