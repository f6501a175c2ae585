//! edgeferry: an edge/IoT gateway daemon.
//!
//! Sensors publish readings over MQTT to a broker on the gateway. edgeferry subscribes, makes
//! every reading durable in a local journal *before* acknowledging it to the broker, computes
//! windowed aggregates and local alerts within a latency budget, and forwards compacted
//! batches upstream whenever the link is up.
//!
//! # Layout
//!
//! The pipeline, one module per stage, connected by bounded channels of owned messages:
//!
//! ```text
//! broker ─▶ ingest ─Committed─▶ process ─▶ (outbox ─▶ forward ─▶ central)
//!             │                    │
//!             ▼                    ▼
//!          store::journal     checkpoint (window state + journal position)
//! ```
//!
//! - [`config`]: the configuration file, environment overrides and validation; each stage
//!   owns the type of its own section.
//! - [`ingest`]: MQTT session (rumqttc, manual acknowledgements), payload decoding
//!   ([`ingest::decode`]), redelivery recognition ([`ingest::dedup`]) and the group-commit loop.
//! - [`store`]: the append-only segment log ([`store::seglog`]) and the reading journal
//!   ([`store::journal`]) built on it.
//! - [`process`]: windowed aggregates, quantile sketches and their checkpoints.
//! - [`live`]: the live event feed behind the admin endpoint's `/live` WebSocket (sampled
//!   readings, emitted windows, alerts), for the dashboard and `edgeferry tail`.
//! - [`daemon`]: wiring of the stages, ordered shutdown, systemd readiness and watchdog.
//! - [`demo`]: `edgeferry demo`, the whole product in one process (embedded broker,
//!   simulated sensors, the daemon and the reference collector).
//! - [`tls`], [`telemetry`], [`backoff`], [`util`]: shared plumbing.
//!
//! The durability contract is written once, in `docs/ARCHITECTURE.md`.

pub mod admin;
pub mod backoff;
pub mod collect;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod forward;
pub mod ingest;
pub mod live;
pub mod model;
pub mod process;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod util;

pub use config::Config;
