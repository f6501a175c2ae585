//! Ingest: MQTT subscription → decode → journal commit → acknowledgement.
//!
//! ```text
//!  broker ──publish──▶ [poll task] ──Incoming──▶ [committer] ──Committed──▶ processing
//!     ▲                  │   ▲ (bounded channel,      │ journal.append × N
//!     │                  │   │  max_unacked permits)  │ journal.sync (group commit)
//!     └──── PUBACKs ◀────┘   └──── ack group ─────────┘ (in order, after the sync)
//! ```
//!
//! The durability rule: a PUBACK leaves only after the message's journal group is synced, so
//! a crash at any point makes the broker redeliver exactly what is not yet durable. What *is*
//! durable but not yet acknowledged comes back with DUP=1 and is recognised ([`dedup`]).
//!
//! The poll task owns rumqttc's event loop and writes each commit group's PUBACKs straight
//! into the connection's buffer with one flush (rumqttc's `AsyncClient::ack` flushes per ack
//! and can block while the event loop is not polled). It stops reading from the socket when
//! `max_unacked` messages are not yet durable, which is what bounds memory (Mosquitto does
//! not hold its inflight window for a client that acknowledges late); a permit comes back as
//! soon as its message is durable.
//!
//! QoS 0 messages are journaled too, but cannot be protected: the broker forgets them as soon
//! as they are sent, so one in the socket buffer when edgeferry dies is gone.

mod commit;
pub mod config;
pub mod decode;
pub mod dedup;
#[cfg(feature = "embedded-broker")]
pub mod embedded;
mod error;
mod poll;
pub mod session;
pub mod status;
pub mod subscriptions;

pub use config::{MqttConfig, SubscribeConfig, validate_filter};
pub use session::{IngestError, run};
pub use status::{IngestStatus, REJECTS_KEPT};
