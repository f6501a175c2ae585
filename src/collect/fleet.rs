//! What a collector knows of the gateways it serves: when each was last heard from, whether
//! it is connected now, and the health it reports (protocol version 3's `Health` frame:
//! backlog and its age, software, uptime, local broker). Served as JSON on `/fleet`; the
//! fleet-wide sums go to Prometheus, so the metrics' cardinality does not grow with the fleet.
//! Each change (Hello, Health, goodbye) is also handed to subscribers as a [`FleetRecord`]:
//! a NATS sink writes them into the fleet bucket, from which loaders keep PostgreSQL's
//! `gateways` table ([`super::gateways`]).
//!
//! Bounded: at most [`MAX_GATEWAYS`] entries. A newcomer beyond that replaces the gateway
//! heard from longest ago among those not connected (counted in
//! `edgeferry_collect_fleet_forgotten_total`); connected gateways are never forgotten, and
//! they are bounded by `--max-connections`.

use crate::clock::now_ms;
use crate::protocol::Health;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Mutex;
use tokio::sync::mpsc;

/// Most gateways remembered (connected or not).
pub const MAX_GATEWAYS: usize = 100_000;

/// One gateway as this collector saw it last.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GatewayState {
    /// The gateway id from its Hello.
    pub gateway: String,
    /// Whether a session of it is open on this collector now.
    pub connected: bool,
    /// Its store epoch (hex), from the latest Hello.
    pub epoch: String,
    /// Software it announced in Hello (e.g. `edgeferry/0.1.0`).
    pub software: String,
    /// Address it connected from, last time.
    pub peer: String,
    /// When its latest session started (epoch ms, this collector's clock).
    pub connected_at_ms: i64,
    /// When a frame of it last arrived (epoch ms).
    pub last_seen_ms: i64,
    /// Batches of it this collector acknowledged since start.
    pub batches_acked: u64,
    /// Its latest health report, if its protocol version sends them.
    pub health: Option<Health>,
    /// When that report arrived (epoch ms).
    pub health_at_ms: Option<i64>,
    #[serde(skip)]
    sessions: u32,
}

/// A gateway's state as one collector publishes it for the others and for the loader (the
/// fleet bucket, key `<gateway>.<collector>`): on each Hello, Health and disconnect.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FleetRecord {
    /// The collector that saw it (random per collector process).
    pub collector: String,
    /// When the collector wrote it (epoch ms, its clock).
    pub updated_ms: i64,
    /// What it saw.
    #[serde(flatten)]
    pub state: GatewayState,
}

/// Most state changes queued for the fleet bucket; beyond it they are dropped and counted
/// (`edgeferry_collect_fleet_updates_dropped_total`): the gateway's next Health (15 s)
/// writes its state again.
pub const MAX_QUEUED_RECORDS: usize = 10_000;

/// The gateways of one collector.
#[derive(Debug)]
pub struct Fleet {
    max: usize,
    /// This collector, in the records it publishes.
    id: String,
    gateways: Mutex<HashMap<String, GatewayState>>,
    /// Where state changes go (a NATS sink's fleet writer), if anywhere.
    publish: Mutex<Vec<mpsc::Sender<FleetRecord>>>,
}

/// Fleet-wide figures for Prometheus.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    /// Gateways with a session open.
    pub connected: u64,
    /// Gateways remembered but not connected.
    pub disconnected: u64,
    /// Unacknowledged batches the connected gateways reported, summed.
    pub backlog_batches: u64,
    /// Age of the oldest unacknowledged batch any connected gateway reported, seconds.
    pub oldest_secs: u64,
}

impl Default for Fleet {
    fn default() -> Fleet {
        Fleet::new(MAX_GATEWAYS)
    }
}

impl Fleet {
    /// A fleet remembering at most `max` gateways.
    pub fn new(max: usize) -> Fleet {
        Fleet {
            max: max.max(1),
            id: format!("{:016x}", rand::random::<u64>()),
            gateways: Mutex::new(HashMap::new()),
            publish: Mutex::new(Vec::new()),
        }
    }

    /// This collector's id in published records.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// State changes from now on, at most [`MAX_QUEUED_RECORDS`] waiting.
    pub fn subscribe(&self) -> mpsc::Receiver<FleetRecord> {
        let (tx, rx) = mpsc::channel(MAX_QUEUED_RECORDS);
        self.publish
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(tx);
        rx
    }

    fn changed(&self, state: &GatewayState) {
        let subscribers = self.publish.lock().unwrap_or_else(|e| e.into_inner());
        for tx in subscribers.iter() {
            let record = FleetRecord {
                collector: self.id.clone(),
                updated_ms: now_ms(),
                state: state.clone(),
            };
            if tx.try_send(record).is_err() {
                metrics::counter!("edgeferry_collect_fleet_updates_dropped_total").increment(1);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, GatewayState>> {
        self.gateways.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A session of `gateway` started (its Hello was accepted).
    pub fn connected(&self, gateway: &str, epoch: u64, software: &str, peer: &str) {
        let now = now_ms();
        let mut g = self.lock();
        if !g.contains_key(gateway) && g.len() >= self.max {
            let oldest = g
                .values()
                .filter(|s| s.sessions == 0)
                .min_by_key(|s| s.last_seen_ms)
                .map(|s| s.gateway.clone());
            match oldest {
                Some(id) => {
                    g.remove(&id);
                    metrics::counter!("edgeferry_collect_fleet_forgotten_total").increment(1);
                }
                // Every one is connected: max_connections is above MAX_GATEWAYS.
                None => return,
            }
        }
        let s = g
            .entry(gateway.to_string())
            .or_insert_with(|| GatewayState {
                gateway: gateway.to_string(),
                connected: false,
                epoch: String::new(),
                software: String::new(),
                peer: String::new(),
                connected_at_ms: now,
                last_seen_ms: now,
                batches_acked: 0,
                health: None,
                health_at_ms: None,
                sessions: 0,
            });
        s.sessions += 1;
        s.connected = true;
        s.epoch = format!("{epoch:016x}");
        software.clone_into(&mut s.software);
        peer.clone_into(&mut s.peer);
        s.connected_at_ms = now;
        s.last_seen_ms = now;
        let s = s.clone();
        drop(g);
        self.changed(&s);
    }

    /// A frame of `gateway` arrived; `acked` batches of it were acknowledged.
    pub fn seen(&self, gateway: &str, acked: u64) {
        if let Some(s) = self.lock().get_mut(gateway) {
            s.last_seen_ms = now_ms();
            s.batches_acked += acked;
        }
    }

    /// `gateway` reported its health.
    pub fn health(&self, gateway: &str, health: Health) {
        let changed = self.lock().get_mut(gateway).map(|s| {
            let now = now_ms();
            s.last_seen_ms = now;
            s.health = Some(health);
            s.health_at_ms = Some(now);
            s.clone()
        });
        if let Some(s) = changed {
            self.changed(&s);
        }
    }

    /// A session of `gateway` ended.
    pub fn disconnected(&self, gateway: &str) {
        let changed = self.lock().get_mut(gateway).map(|s| {
            s.sessions = s.sessions.saturating_sub(1);
            s.connected = s.sessions > 0;
            s.clone()
        });
        if let Some(s) = changed {
            self.changed(&s);
        }
    }

    /// Every gateway, by id.
    pub fn snapshot(&self) -> Vec<GatewayState> {
        let mut v: Vec<GatewayState> = self.lock().values().cloned().collect();
        v.sort_by(|a, b| a.gateway.cmp(&b.gateway));
        v
    }

    /// The fleet-wide figures.
    pub fn totals(&self) -> Totals {
        let mut t = Totals::default();
        for s in self.lock().values() {
            if !s.connected {
                t.disconnected += 1;
                continue;
            }
            t.connected += 1;
            if let Some(h) = &s.health {
                t.backlog_batches += h.backlog_batches;
                t.oldest_secs = t.oldest_secs.max(h.oldest_secs.unwrap_or(0));
            }
        }
        t
    }

    /// Sets the fleet gauges (called every few seconds).
    pub fn report(&self) {
        let t = self.totals();
        metrics::gauge!("edgeferry_collect_fleet_gateways", "state" => "connected")
            .set(t.connected as f64);
        metrics::gauge!("edgeferry_collect_fleet_gateways", "state" => "disconnected")
            .set(t.disconnected as f64);
        metrics::gauge!("edgeferry_collect_fleet_backlog_batches").set(t.backlog_batches as f64);
        metrics::gauge!("edgeferry_collect_fleet_oldest_backlog_seconds").set(t.oldest_secs as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(backlog: u64, oldest: Option<u64>) -> Health {
        Health {
            time_ms: 0,
            uptime_secs: 5,
            backlog_batches: backlog,
            backlog_bytes: backlog * 100,
            oldest_secs: oldest,
            broker_connected: true,
            software: "edgeferry/test".into(),
        }
    }

    #[test]
    fn sessions_health_and_totals_follow_what_gateways_do() {
        let f = Fleet::new(10);
        f.connected("gw-a", 7, "edgeferry/1", "127.0.0.1:1");
        f.connected("gw-b", 8, "edgeferry/1", "127.0.0.1:2");
        f.health("gw-a", health(3, Some(40)));
        f.health("gw-b", health(2, None));
        f.seen("gw-a", 5);
        assert_eq!(
            f.totals(),
            Totals {
                connected: 2,
                disconnected: 0,
                backlog_batches: 5,
                oldest_secs: 40
            }
        );
        // A second session of gw-a (failover racing the old one's timeout): still connected
        // until both ended.
        f.connected("gw-a", 7, "edgeferry/1", "127.0.0.1:3");
        f.disconnected("gw-a");
        assert!(f.snapshot()[0].connected);
        f.disconnected("gw-a");
        let snap = f.snapshot();
        assert_eq!(snap[0].gateway, "gw-a");
        assert!(!snap[0].connected);
        assert_eq!(snap[0].batches_acked, 5);
        assert_eq!(snap[0].epoch, "0000000000000007");
        assert_eq!(snap[0].health.as_ref().unwrap().backlog_batches, 3);
        assert_eq!(f.totals().connected, 1);
        assert_eq!(
            f.totals().backlog_batches,
            2,
            "only connected gateways count"
        );
        // Unknown gateways are ignored (no Hello, no entry).
        f.health("gw-x", health(1, None));
        assert_eq!(f.snapshot().len(), 2);
    }

    #[test]
    fn at_the_limit_the_longest_silent_disconnected_gateway_is_forgotten() {
        let f = Fleet::new(2);
        f.connected("old", 1, "", "");
        f.disconnected("old");
        f.connected("live", 1, "", "");
        f.connected("new", 1, "", "");
        let ids: Vec<String> = f.snapshot().into_iter().map(|s| s.gateway).collect();
        assert_eq!(ids, ["live", "new"]);
        // All connected: a newcomer is not remembered (it is still served).
        f.connected("newest", 1, "", "");
        assert_eq!(f.snapshot().len(), 2);
    }
}
