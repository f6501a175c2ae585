//! `edgeferry collect`: the reference central receiver of the upstream protocol
//! (`docs/PROTOCOL.md`).
//!
//! Gateways connect over WebSocket (optionally TLS, optionally mutual TLS), authenticate with
//! a bearer token in the HTTP upgrade request, and send [`Batch`](crate::protocol::Batch) frames;
//! or they publish self-contained batch messages to an MQTT broker, which the collector
//! subscribes to ([`mqtt`], `--mqtt`).
//! Each batch becomes JSON lines (one object per aggregate or alert, [`store::batch_lines`])
//! and is acknowledged only after every configured sink made it durable ([`sink`]):
//!
//! * `jsonl:DIR` ([`store`]): appended to `DIR/out/<gateway>.jsonl`, fsynced together with its
//!   dedup mark in a local sled tree. Exact for one collector; several need sticky routing by
//!   gateway id, or a redelivery reaching another instance is written there again.
//! * `nats://…` ([`nats`]): one NATS JetStream message per batch on its own subject, which
//!   the stream accepts once, whichever collector sends it and however late; marks and
//!   resume points in a JetStream key-value bucket. Collectors share nothing but the engine.
//!
//! [`load`] is the other half of the central side: a JetStream consumer that upserts the
//! lines into PostgreSQL. docs/CENTRAL.md is the operator's picture.

pub mod buffer;
pub mod config;
pub mod fleet;
pub mod gateways;
pub mod load;
pub mod mqtt;
pub mod nats;
pub mod schema;
pub mod server;
pub mod sink;
pub mod store;

pub use config::{CollectConfig, MqttSourceConfig};
pub use server::{Health, run, run_with};
pub use sink::{SinkSpec, Sinks};
pub use store::{Store, Stored};
