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
//! Layers, lowest first; a module imports only lower layers (`tests/layering.rs` checks it,
//! and that no two files import each other in a cycle):
//!
//! 0. [`util`], [`clock`] (the one wall-clock helper), [`backoff`], [`validate`] (the
//!    collector of configuration problems), [`puback`] (MQTT acks on the connection they
//!    belong to): plumbing.
//! 1. [`model`]: the owned values every stage shares (readings, journal records, aggregates
//!    with exact moments, sketches, outbox batches, alerts, channel messages, the status
//!    report); [`tls`], [`broker`] (the one parser of `mqtt://`/`mqtts://` broker URLs for
//!    every MQTT client), [`telemetry`].
//! 2. [`protocol`]: the upstream wire format (frames, dictionary, packed columns, the
//!    self-contained MQTT message) used by both
//!    sides; [`store`]: segment log, journal, outbox and the store epoch; [`live`]: the live
//!    event bus behind `/live`.
//! 3. The stages, which never import one another: [`ingest`] (MQTT session, decoding,
//!    redelivery recognition, group commit), [`process`] (windows, rules, checkpoints),
//!    [`forward`] (the upstream link core and its WebSocket and MQTT transports), `collect`
//!    (the central receiver; cargo feature `central`).
//! 4. [`admin`] (`/metrics`, `/status`, dashboard), [`check`] (`edgeferry store
//!    verify|repair`, offline).
//! 5. [`config`]: the configuration file; each stage owns the type of its own section.
//! 6. [`daemon`]: wiring of the stages, ordered shutdown, systemd readiness and watchdog.
//! 7. `demo`: `edgeferry demo`, the whole product in one process (features `central` and
//!    `embedded-broker`, both on by default; `--no-default-features` is the gateway alone).
//! 8. [`cli`]: what each command prints and the exit code it returns; `main.rs` only parses
//!    the command line and calls it.
//!
//! The durability contract is written once, in `docs/ARCHITECTURE.md`.

pub mod admin;
pub mod backoff;
pub mod broker;
pub mod check;
pub mod cli;
pub mod clock;
#[cfg(feature = "central")]
pub mod collect;
pub mod config;
pub mod daemon;
#[cfg(all(feature = "central", feature = "embedded-broker"))]
pub mod demo;
pub mod forward;
pub mod ingest;
pub mod live;
pub mod model;
pub mod process;
pub mod protocol;
pub mod puback;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod util;
pub mod validate;

pub use config::Config;
