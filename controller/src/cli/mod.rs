//! The `rollguard` operator CLI (subcommand implementations).

pub mod bundle;
