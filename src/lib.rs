//! stoker: a cluster manager that runs Apache Spark executors for drivers that use the master
//! URL `spark+stoker://host:port`.
//!
//! The server ([`server`]) exposes the protocol in `proto/` ([`api`]); one actor per application
//! ([`app`]) drives the sans-IO engine of `stoker-core`; a backend (`stoker-local` today) runs the
//! executors.

pub mod api;
pub mod app;
pub mod auth;
pub mod cli;
pub mod clock;
pub mod config;
pub mod error;
pub mod metrics;
pub mod proto;
pub mod queues;
pub mod quota;
pub mod secret;
pub mod server;
pub mod sizes;
pub mod tls;
pub mod validate;

use rand::Rng;

/// A random 256-bit token, hex-encoded.
pub fn random_token() -> String {
    let bytes: [u8; 32] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
