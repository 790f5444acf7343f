//! tasklist-operator keeps applications logged in to Camunda's Tasklist API: for each
//! `TasklistConnection` it obtains the credential Tasklist wants, keeps it fresh in a
//! Secret, and reports in status whether Tasklist accepts it.

pub mod allocator;
pub mod camunda;
pub mod check;
pub mod controller;
pub mod crd;
pub mod credential;
pub mod derived_secret;
pub mod events;
pub mod host_health;
pub mod inputs;
pub mod key_hash;
pub mod leader;
pub mod logging;
pub mod machinery;
pub mod metrics;
pub mod nudge;
pub mod obtain;
pub mod policy;
pub mod reason;
pub mod schedule;
pub mod serve;
pub mod service_account_token;
pub mod shard;
pub mod status;
pub mod time;
pub mod token_cache;
