//! Forwarding to the central system (configuration only so far; see docs/ARCHITECTURE.md for
//! what is built and what is not).

pub mod config;
pub mod protocol;

pub use config::UpstreamConfig;
