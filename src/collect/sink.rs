//! Where the collector makes batches durable: `--sink jsonl:DIR` (files and sled marks on
//! this machine, [`super::store`]) and `--sink nats://…` (NATS JetStream, shared by every
//! collector, [`super::nats`]), several at once. A batch is acknowledged only after every
//! sink made it durable; `Welcome` reports as stored only what every sink holds.

use super::nats::{NatsSink, NatsSpec};
use super::store::{Store, Stored, batch_lines};
use crate::protocol::OutboxItem;
use anyhow::{Context, Result, bail};
use bytes::Bytes;
use std::path::PathBuf;
use std::sync::Arc;

/// One `--sink` argument.
#[derive(Debug, Clone, PartialEq)]
pub enum SinkSpec {
    /// `jsonl:DIR`: `DIR/out/<gateway>.jsonl` and dedup marks in `DIR/marks`.
    Jsonl(PathBuf),
    /// `nats://host:port[,host:port…][?stream=…&replicas=…&max_age=…&max_bytes=…]`.
    Nats(NatsSpec),
}

impl std::str::FromStr for SinkSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<SinkSpec> {
        if let Some(dir) = s.strip_prefix("jsonl:") {
            if dir.is_empty() {
                bail!("{s:?}: jsonl:DIR needs a directory");
            }
            return Ok(SinkSpec::Jsonl(PathBuf::from(dir)));
        }
        if s.starts_with("nats://") {
            return Ok(SinkSpec::Nats(s.parse()?));
        }
        bail!("{s:?}: a sink is jsonl:DIR or nats://host:port[,host:port…]")
    }
}

impl std::fmt::Display for SinkSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SinkSpec::Jsonl(d) => write!(f, "jsonl:{}", d.display()),
            SinkSpec::Nats(n) => write!(f, "nats://{}?stream={}", n.servers.join(","), n.stream),
        }
    }
}

enum Sink {
    Jsonl(Arc<Store>),
    Nats(Arc<NatsSink>),
}

/// Every sink of a collector.
pub struct Sinks {
    sinks: Vec<Sink>,
}

/// Inclusive ranges held by both lists (each ascending and disjoint).
pub fn intersect(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < a.len() && j < b.len() {
        let lo = a[i].0.max(b[j].0);
        let hi = a[i].1.min(b[j].1);
        if lo <= hi {
            out.push((lo, hi));
        }
        if a[i].1 < b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

impl Sinks {
    /// Opens every sink: recovers the JSONL files, connects to NATS and creates or checks
    /// the stream and bucket.
    pub async fn open(specs: &[SinkSpec]) -> Result<Sinks> {
        if specs.is_empty() {
            bail!("no sink: give --sink jsonl:DIR or --sink nats://host:port");
        }
        let mut sinks = Vec::with_capacity(specs.len());
        for spec in specs {
            sinks.push(match spec {
                SinkSpec::Jsonl(dir) => {
                    let dir = dir.clone();
                    Sink::Jsonl(Arc::new(
                        tokio::task::spawn_blocking(move || Store::open(&dir))
                            .await
                            .context("store recovery panicked")??,
                    ))
                }
                SinkSpec::Nats(n) => Sink::Nats(Arc::new(NatsSink::open(n.clone()).await?)),
            });
        }
        Ok(Sinks { sinks })
    }

    /// Records the gateway's floor in every sink; the ranges stored in all of them.
    pub async fn hello(
        &self,
        gateway: &str,
        epoch: u64,
        first_seq: u64,
        cap: usize,
    ) -> Result<Vec<(u64, u64)>> {
        let mut common: Option<Vec<(u64, u64)>> = None;
        for sink in &self.sinks {
            let stored = match sink {
                Sink::Jsonl(store) => {
                    let (store, gw) = (store.clone(), gateway.to_string());
                    tokio::task::spawn_blocking(move || store.hello(&gw, epoch, first_seq, cap))
                        .await
                        .context("reading the dedup marks panicked")??
                }
                Sink::Nats(n) => n.hello(gateway, epoch, first_seq, cap).await?,
            };
            common = Some(match common {
                None => stored,
                Some(c) => intersect(&c, &stored),
            });
        }
        Ok(common.unwrap_or_default())
    }

    /// A batch as every sink stores it: its JSON lines ([`batch_lines`]).
    pub fn lines(gateway: &str, epoch: u64, seq: u64, items: &[OutboxItem]) -> Result<Bytes> {
        Ok(Bytes::from(batch_lines(gateway, epoch, seq, items)?))
    }

    /// Makes a batch (its [`Sinks::lines`], `items` aggregates and alerts) durable in every
    /// sink, in order; returns what the first sink that wrote it did (`Duplicate` when none
    /// had to). The collector runs it in a task of its own, so it finishes (and saves the
    /// gateway a resend) even when the connection goes first.
    pub async fn store_batch(
        &self,
        gateway: &str,
        epoch: u64,
        seq: u64,
        lines: Bytes,
        items: usize,
    ) -> Result<Stored> {
        let mut result: Option<Stored> = None;
        for sink in &self.sinks {
            let stored = match sink {
                Sink::Jsonl(store) => {
                    let (store, gw, lines) = (store.clone(), gateway.to_string(), lines.clone());
                    // File writes and fsync block: off the runtime's threads.
                    tokio::task::spawn_blocking(move || {
                        store.store_lines(&gw, epoch, seq, &lines, items)
                    })
                    .await
                    .context("storing a batch panicked")??
                }
                Sink::Nats(n) => {
                    n.store_batch(gateway, epoch, seq, lines.clone(), items)
                        .await?
                }
            };
            result = Some(match (result, stored) {
                (Some(Stored::Written(n)), _) | (_, Stored::Written(n)) => Stored::Written(n),
                (Some(r), _) => r,
                (None, s) => s,
            });
        }
        Ok(result.unwrap_or(Stored::Duplicate))
    }

    /// Publishes the gateways' state changes where a sink shares them with other collectors
    /// and the loader (NATS: the fleet bucket).
    pub fn publish_fleet(&self, fleet: &super::fleet::Fleet) {
        for sink in &self.sinks {
            if let Sink::Nats(n) = sink {
                n.spawn_fleet_writer(fleet.subscribe());
            }
        }
    }

    /// Why the collector cannot store batches now, if it cannot (for `/healthz`).
    pub fn unhealthy(&self) -> Option<String> {
        let why: Vec<String> = self
            .sinks
            .iter()
            .filter_map(|s| match s {
                Sink::Jsonl(_) => None,
                Sink::Nats(n) => n.unhealthy(),
            })
            .collect();
        (!why.is_empty()).then(|| why.join("; "))
    }

    /// Background upkeep of the sinks (health of the NATS ones) until `shutdown`.
    pub fn spawn_monitors(&self, shutdown: &tokio_util::sync::CancellationToken) {
        for s in &self.sinks {
            if let Sink::Nats(n) = s {
                let (n, stop) = (n.clone(), shutdown.clone());
                tokio::spawn(async move {
                    n.monitor(std::time::Duration::from_secs(2), stop).await;
                });
            }
        }
    }

    /// Flushes every sink (at shutdown; every acknowledged batch is already durable).
    pub async fn flush(&self) -> Result<()> {
        for s in &self.sinks {
            match s {
                Sink::Jsonl(store) => {
                    let store = store.clone();
                    tokio::task::spawn_blocking(move || store.flush())
                        .await
                        .context("flush panicked")??;
                }
                Sink::Nats(n) => n.flush().await?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn welcome_reports_only_what_every_sink_holds() {
        assert_eq!(
            intersect(&[(1, 5), (8, 12)], &[(3, 9), (11, 20)]),
            [(3, 5), (8, 9), (11, 12)]
        );
        assert_eq!(intersect(&[(1, 5)], &[]), []);
        assert_eq!(intersect(&[(1, 1), (3, 3)], &[(2, 2)]), []);
    }

    #[test]
    fn sink_arguments_are_checked() {
        assert_eq!(
            "jsonl:/var/lib/c".parse::<SinkSpec>().unwrap(),
            SinkSpec::Jsonl("/var/lib/c".into())
        );
        assert!(matches!(
            "nats://127.0.0.1:4222".parse::<SinkSpec>().unwrap(),
            SinkSpec::Nats(_)
        ));
        for bad in ["jsonl:", "kafka://x", "/var/lib/c"] {
            assert!(bad.parse::<SinkSpec>().is_err(), "{bad}");
        }
    }
}
