//! Forwarding to the central system: the `[upstream]` configuration and the wire protocol
//! ([`protocol`], specified in docs/PROTOCOL.md). The forwarder loop itself is not built yet;
//! see docs/ARCHITECTURE.md.

pub mod config;
pub mod protocol;

pub use config::UpstreamConfig;
