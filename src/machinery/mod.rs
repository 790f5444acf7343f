//! Shared machinery, written once: the pieces the caches and lanes of the operator are
//! built from (the token cache, the probe lane, the referenced values, the HTTP clients,
//! the host slots and the server facts the clients learn).
//!
//! - [`lock`]: the one rule for a poisoned lock;
//! - [`single_flight`]: one request in flight per key, its answer shared, never kept;
//! - [`slots`]: counted slots with limits per key, given back by a guard;
//! - [`bounded`]: the one rule that keeps a map bounded;
//! - [`users`]: values shared by users, dropped with their last user.
//!
//! Nothing here knows about Kubernetes, Camunda or credentials.

pub mod bounded;
pub mod lock;
pub mod single_flight;
pub mod slots;
pub mod users;
