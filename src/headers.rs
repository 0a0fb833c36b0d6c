//! The names of the headers keygate itself sets, on answers and on forwarded requests. They
//! sit here, below the stages and the refusal mapping, because both write them.

use http::header::HeaderName;

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_KEYGATE_KEY_ID: HeaderName = HeaderName::from_static("x-keygate-key-id");
pub const X_KEYGATE_NAMESPACE: HeaderName = HeaderName::from_static("x-keygate-namespace");
pub const X_KEYGATE_ENVIRONMENT: HeaderName = HeaderName::from_static("x-keygate-environment");
/// On the auth listener's refusals: the refusal's code, and its problem body again, for an
/// ingress that keeps only an auth answer's headers (nginx `auth_request`).
pub const X_KEYGATE_CODE: HeaderName = HeaderName::from_static("x-keygate-code");
pub const X_KEYGATE_PROBLEM: HeaderName = HeaderName::from_static("x-keygate-problem");
