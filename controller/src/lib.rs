//! The rollguard controller: a mutual-TLS HTTPS server that keeps a fleet of
//! agents connected, rolls signed bundles out to them in waves, halts on its
//! own when something looks wrong, and pushes kill orders. The operator CLI
//! `rollguard` and its client are the `rollguard-cli` crate.
//!
//! The controller never signs or authorizes code: agents run only bundles
//! whose signatures meet their own policy's threshold. A compromised
//! controller can delay or withhold, not make a host run unsigned code.
#![forbid(unsafe_code)]

pub mod alertmanager_api;
pub mod alerts;
pub mod bundle;
pub mod cluster;
pub mod config;
pub mod engine;
pub mod enroll;
pub mod http_out;
pub mod hub;
pub mod metrics;
pub mod notify;
pub mod pki;
pub mod presence;
pub mod server;
pub mod server_cli;
pub mod store;
pub mod tls;
