//! Policy values: what a key or a route allows (scopes, networks, rates, quotas) and when an address is
//! locked out, parsed
//! and checked once. The key store and its record check build them, the snapshot holds
//! them, and the request stages in [`crate::pipeline`] only decide with them, so this layer
//! sits below all three and imports none of them.

pub mod credits;
pub mod lockout;
pub mod net;
pub mod quota;
pub mod rate;
pub mod scope;
