//! Stage 5: may this key make this request? Status, expiry and environment answer 401;
//! namespace, address and scope answer 403. The checks run in that order, so a client learns
//! no more about a key than its own state allows.

use http::Method;

use crate::keys::Status;
use crate::pipeline::route::Route;
use crate::pipeline::Client;
use crate::rejection::Rejection;
use crate::snapshot::KeyEntry;

/// Checks `key` against the request `on` a route (its method and normalised path), or the
/// key alone when there is no route (a verify call that names no path); `now` is Unix
/// seconds.
pub fn authorize(
    key: &KeyEntry,
    on: Option<(&Route, &Method, &str)>,
    client: Client,
    now: i64,
) -> Result<(), Rejection> {
    match key.status {
        Status::Revoked => return Err(Rejection::RevokedKey),
        Status::Inactive => return Err(Rejection::InactiveKey),
        Status::Active => {}
    }
    if key.expires_at().is_some_and(|t| t <= now) {
        return Err(Rejection::ExpiredKey);
    }
    if let Some((route, ..)) = on {
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
    }
    if !key.allowed_cidrs.is_empty() {
        match client {
            Client::Known(ip) if key.allowed_cidrs.contains(ip) => {}
            _ => return Err(Rejection::IpNotAllowed),
        }
    }
    match on {
        Some((_, method, path)) if !key.scopes.allows(method, path) => Err(Rejection::ScopeDenied),
        _ => Ok(()),
    }
}
