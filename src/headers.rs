//! The names of the headers keygate itself sets, on answers and on forwarded requests. They
//! sit here, below the stages and the refusal mapping, because both write them.

use http::header::HeaderName;

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_KEYGATE_KEY_ID: HeaderName = HeaderName::from_static("x-keygate-key-id");
pub const X_KEYGATE_NAMESPACE: HeaderName = HeaderName::from_static("x-keygate-namespace");
pub const X_KEYGATE_ENVIRONMENT: HeaderName = HeaderName::from_static("x-keygate-environment");
/// The key's identity (the operator's customer id), percent-encoded as metadata is.
pub const X_KEYGATE_IDENTITY: HeaderName = HeaderName::from_static("x-keygate-identity");
/// On the auth listener's refusals: the refusal's code, and its problem body again, for an
/// ingress that keeps only an auth answer's headers (nginx `auth_request`).
pub const X_KEYGATE_CODE: HeaderName = HeaderName::from_static("x-keygate-code");
pub const X_KEYGATE_PROBLEM: HeaderName = HeaderName::from_static("x-keygate-problem");
/// W3C Trace Context: passed upstream untouched, or set when keygate makes one.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// A key's `meta` member as a header value: a string as its text, anything else as its
/// JSON, with every byte outside visible ASCII, and `%` itself, percent-encoded (UTF-8).
/// What reaches the upstream is then always one header of visible characters: no CR, LF or
/// NUL can end it early or start another.
pub fn meta_value(value: &serde_json::Value) -> http::HeaderValue {
    let text = match value {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x21..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    // Only visible ASCII is left, which is always a header value.
    http::HeaderValue::from_str(&out).unwrap_or_else(|_| http::HeaderValue::from_static(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_values_cannot_break_out_of_their_header() {
        let v = |j: serde_json::Value| meta_value(&j).to_str().unwrap().to_string();
        assert_eq!(v("pro".into()), "pro");
        assert_eq!(v("a\r\nX-Evil: 1".into()), "a%0D%0AX-Evil:%201");
        assert_eq!(v("grün 100%".into()), "gr%C3%BCn%20100%25");
        assert_eq!(v(serde_json::json!(5)), "5");
        assert_eq!(v(serde_json::json!({"a": [1, true]})), "{\"a\":[1,true]}");
        assert_eq!(v("\u{0}".into()), "%00");
    }
}
