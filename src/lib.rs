//! keygate: an API-key gateway in front of existing HTTP APIs.
//!
//! Every request is decided before anything reaches the upstream:
//!
//! ```text
//!  client ──▶ client_ip ──▶ route ──▶ credential ──▶ lookup ──▶ authorize ──▶ rate_limit ──▶ forward ──▶ upstream
//!             (peer or      (host +    (Bearer,       (SHA-256    (status, expiry,  (GCRA per   (strip, add
//!              trusted XFF)  prefix)    checksum)      in the      environment,      key id)     headers,
//!                                                      snapshot)   namespace, CIDR,              stream)
//!                                                                  scope)
//!        any stage may stop the request with a Rejection ──▶ problem+json 4xx/5xx
//! ```
//!
//! The snapshot the stages read is immutable and swapped whole by [`reload`] (file watch,
//! SIGHUP, `POST /v1/reload`); per-key rate-limit state lives outside it, keyed by key id.
//!
//! # Layout
//! - [`cli`]: `serve`, `demo`, `check`, `keys …` ([`main`](../keygate/index.html) is thin).
//! - [`gateway`]: the shared [`gateway::Gateway`] state every stage, admin route and reload
//!   reads, low in the tree.
//! - [`server`]: listeners, accept loops, connection limits, draining; it serves the gateway.
//! - [`auth_listener`]: the auth listener, where an ingress asks for the pipeline's decision
//!   ([`pipeline::decide`]) without the forwarding; the verify API asks it in [`admin`].
//! - [`pipeline`]: the spine, [`pipeline::handle`], and one module per stage:
//!   [`pipeline::client_ip`], [`pipeline::route`], [`pipeline::credential`],
//!   [`pipeline::authorize`], [`pipeline::rate_limit`] (or [`pipeline::shared_limit`],
//!   through Redis), [`pipeline::forward`] (with its upstream pool). The lockout check comes
//!   first, in the spine itself. Usage is counted on the key's own cell at the end.
//! - [`policy`]: the values the stages decide with ([`policy::scope`], [`policy::net`],
//!   [`policy::rate`], [`policy::quota`], [`policy::lockout`]), below the keys, the snapshot
//!   and the stages.
//! - [`state`]: what lives between snapshots and across restarts, below the snapshot and
//!   the stages: [`state::limiters`] (each key's limiter), [`state::usage`] (counters, the
//!   quota count, the usage book and its file), [`state::lockouts`] (failed guesses by
//!   address), [`state::shared_limits`] (the shared limiter's Redis client) and
//!   [`state::token_use`] (each admin token's last use).
//! - [`headers`]: the header names keygate sets.
//! - [`rejection`]: every refusal and its one mapping to a response.
//! - [`snapshot`]: the immutable view (keys by hash, compiled routes) and how it is built.
//! - [`config`]: documented config types, YAML loading, located errors.
//! - [`reload`]: file watch and reload, and following a Redis store's changes.
//! - [`keys`]: key format, key records, the key store (a file, SQLite or Redis), lifecycle
//!   operations, and the admin tokens kept beside the keys ([`keys::admin_token`]).
//! - [`shared_usage`]: usage summed over nodes through Redis.
//! - [`admin`]: the admin listener, its key-management API and its admin tokens.
//! - [`audit`]: the append-only audit log; [`access_log`]: one line per request.
//! - [`metrics`]: Prometheus counters and histograms; [`alerts`]: rules, webhook.
//! - [`tls`]: listener certificates (SNI, hot swap) and upstream TLS.
//! - [`body`], [`clock`], [`demo`]: streaming bodies, injected time, the demo.
#![forbid(unsafe_code)]
// One process serves every client: a panic that input can reach costs at least that
// client's connection, and in a listener or housekeeping, the whole process (README, "No
// panic reachable from input").
// These lints keep unwrap, expect, panics, unchecked indexing and arithmetic, and truncating
// casts out of the product; each exception is an `#[allow]` on the smallest item, with a
// comment saying why it cannot fail. Unit tests may panic: that is how they fail.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::unreachable,
        clippy::todo,
        clippy::unimplemented,
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_possible_wrap
    )
)]

pub mod access_log;
pub mod admin;
pub mod alerts;
pub mod audit;
pub mod auth_listener;
pub mod body;
pub mod cli;
pub mod clock;
pub mod config;
pub mod demo;
pub mod gateway;
pub mod headers;
pub mod init;
pub mod keys;
pub mod metrics;
pub mod notify;
pub mod pipeline;
pub mod policy;
pub mod rejection;
pub mod reload;
pub mod scanning;
pub mod server;
pub mod shared_usage;
pub mod snapshot;
pub mod state;
pub mod tls;
