//! `edgeferry collect`: the reference central receiver of the upstream protocol
//! (`docs/PROTOCOL.md`).
//!
//! Gateways connect over WebSocket (optionally TLS, optionally mutual TLS), authenticate with
//! a bearer token in the HTTP upgrade request, and send [`Batch`](crate::protocol::Batch) frames.
//! Each batch is written as JSON lines to `DIR/out/<gateway>.jsonl`, made durable together
//! with its dedup mark, and only then acknowledged (see [`store`]).
//!
//! The collector keeps no state apart from the output files and the dedup marks, which are
//! per instance: several instances behind a load balancer must route each gateway to the
//! same instance (sticky by gateway id), otherwise a redelivered batch reaching another
//! instance would be written again there — still harmless for consumers that upsert by
//! (gateway, series, window_start, window_secs, version), but no longer "exactly once" in
//! the files.

pub mod config;
pub mod load;
pub mod nats;
pub mod server;
pub mod sink;
pub mod store;

pub use config::CollectConfig;
pub use server::{Health, run, run_with};
pub use sink::{SinkSpec, Sinks};
pub use store::{Store, Stored};
