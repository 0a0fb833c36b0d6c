//! Stage 5: may this key make this request? Status, expiry and environment answer 401;
//! namespace, address and scope answer 403. The checks run in that order, so a client learns
//! no more about a key than its own state allows.

use std::net::IpAddr;

use http::Method;

use crate::keys::Status;
use crate::pipeline::route::Route;
use crate::rejection::Rejection;
use crate::snapshot::KeyEntry;

/// Checks `key` against the request; `now` is Unix seconds.
pub fn authorize(
    key: &KeyEntry,
    route: &Route,
    client: IpAddr,
    method: &Method,
    path: &str,
    now: i64,
) -> Result<(), Rejection> {
    match key.status {
        Status::Revoked => return Err(Rejection::RevokedKey),
        Status::Inactive => return Err(Rejection::InactiveKey),
        Status::Active => {}
    }
    if key.expires_at.is_some_and(|t| t <= now) {
        return Err(Rejection::ExpiredKey);
    }
    if key.environment.as_str() != route.environment.as_str() {
        return Err(Rejection::WrongEnvironment);
    }
    if !route.namespaces.is_empty()
        && !route
            .namespaces
            .iter()
            .any(|n| n.as_str() == key.namespace.as_str())
    {
        return Err(Rejection::NamespaceDenied);
    }
    if !key.allowed_cidrs.is_empty() && !key.allowed_cidrs.contains(client) {
        return Err(Rejection::IpNotAllowed);
    }
    if !key.scopes.allows(method, path) {
        return Err(Rejection::ScopeDenied);
    }
    Ok(())
}
