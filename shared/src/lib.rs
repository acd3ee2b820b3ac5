//! Common types of rollguard: the bundle manifest and its scopes, target
//! matching, the bundle file format, signatures and trust, and (later) the
//! controller/agent wire protocol.
//!
//! Everything here parses untrusted input into typed values; code that runs
//! bundles only ever sees the typed values.
#![forbid(unsafe_code)]

pub mod alert_matcher;
pub mod archive;
pub mod endpoint;
pub mod exit;
pub mod logging;
pub mod manifest;
pub mod path;
pub mod path_io;
pub mod protocol;
pub mod report;
pub mod services;
pub mod signature;
pub mod targets;
pub mod terminal;
pub mod tls_client;
pub mod validated;
pub mod version;

pub use manifest::{Manifest, SourceManifest};
pub use path::ScopePath;
pub use path_io::PathIoError;
pub use targets::{HostIdentity, Targets};
