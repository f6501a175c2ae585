//! Upstream compaction: bytes sent upstream ÷ bytes of raw payload ingested, for 1 Hz sensors.
//!
//! Simulates 100 sensors (temperature-like random walks, 2-decimal values) publishing one
//! JSON reading per second (`{"value":21.37,"ts":1700000000000}`, the payload a sensor sends),
//! folds them into windows exactly as the daemon does (`process::window`), batches the closed
//! windows as the processor does (one batch per window close, at most `batch_max` 500 items)
//! and encodes them with the real wire protocol (`forward::protocol`: envelope,
//! per-connection series dictionary, column-packed aggregates). The dictionary is counted
//! once, as it is sent once per connection; WebSocket and TLS framing are not counted (see
//! docs/PROTOCOL.md §10). The last column is the MQTT upstream, whose messages are
//! self-contained (each carries its Hello and the dictionary of its series), so that any
//! consumer can decode any message on its own. Two kinds of sensor clocks:
//!
//! * **aligned**: every reading's `ts` is on a whole second (sensors polled on a tick);
//! * **free-running**: each sensor has its own phase within the second and ±5 ms jitter, so
//!   first/last event times differ per series and per window.
//!
//! Run:
//!
//! ```sh
//! cargo bench --bench compaction        # 1 hour of data
//! ```
//! Without `--bench` (as `cargo test --all-targets` runs it) it simulates 5 minutes.

use edgeferry::model::SeriesInfo;
use edgeferry::model::batch::{BatchKind, OutboxBatch, OutboxItem};
use edgeferry::process::window::{WindowSpec, Windows};
use edgeferry::protocol::{self, DictDecoder, DictEncoder, Frame};
use std::collections::BTreeMap;

/// xorshift64: deterministic, so every run measures the same data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [-0.5, 0.5).
    fn centered(&mut self) -> f64 {
        (self.next() % 1000) as f64 / 1000.0 - 0.5
    }
}

struct Outcome {
    raw: u64,
    /// WebSocket upstream: frames, dictionary once per connection.
    sent: u64,
    dict: u64,
    /// MQTT upstream: one self-contained message per batch (Hello + Dict + Batch).
    mqtt: u64,
    items: u64,
}

fn run(windows_secs: &[u32], seconds: i64, sensors: usize, free_running: bool) -> Outcome {
    let mut w = Windows::new(WindowSpec {
        lengths_secs: windows_secs.to_vec(),
        allowed_lateness_ms: 2_000,
        retention_ms: 120_000,
    });
    let infos: Vec<SeriesInfo> = (0..sensors)
        .map(|i| {
            let tags = BTreeMap::from([
                ("site".to_string(), format!("site{}", i % 5)),
                ("device".to_string(), format!("sensor-{i}")),
            ]);
            SeriesInfo {
                key: edgeferry::model::series_key("temperature", &tags),
                metric: "temperature".into(),
                tags: tags.into(),
            }
        })
        .collect();
    let by_key: BTreeMap<String, SeriesInfo> =
        infos.iter().map(|s| (s.key.clone(), s.clone())).collect();
    let mut value: Vec<f64> = (0..sensors).map(|i| 20.0 + (i % 7) as f64).collect();
    let phase: Vec<i64> = (0..sensors)
        .map(|i| {
            if free_running {
                (i as i64 * 7919) % 1000
            } else {
                0
            }
        })
        .collect();
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let start = 1_700_000_000_000i64;
    let mut out = Outcome {
        raw: 0,
        sent: 0,
        dict: 0,
        mqtt: 0,
        items: 0,
    };
    let mut enc = DictEncoder::new();
    let mut dec = DictDecoder::new();
    let mut pending: Vec<OutboxItem> = Vec::new();
    let mut emitted = Vec::new();
    let mut seq = 0u64;
    let mut flush = |pending: &mut Vec<OutboxItem>, out: &mut Outcome, now: i64| {
        for chunk in pending.chunks(500) {
            let batch = OutboxBatch {
                kind: BatchKind::Aggregates,
                created_ms: now,
                items: chunk.to_vec(),
            };
            let (d, b) = enc.encode_batch(seq, &batch);
            seq += 2;
            if let Some(d) = d {
                let bytes = protocol::encode(&d).len() as u64;
                out.dict += bytes;
                out.sent += bytes;
                let Frame::Dict(d) = d else { unreachable!() };
                dec.apply(&d).unwrap();
            }
            let bytes = protocol::encode(&b);
            out.sent += bytes.len() as u64;
            out.mqtt +=
                edgeferry::forward::mqtt::encode_message(&hello(seq), seq, &batch).len() as u64;
            // What is sent must decode to exactly what was batched.
            let Ok(Frame::Batch(b)) = protocol::decode(&bytes, protocol::DEFAULT_MAX_FRAME) else {
                panic!("batch does not decode")
            };
            assert_eq!(dec.decode_batch(&b).unwrap(), batch.items);
        }
        pending.clear();
    };
    for t in 0..seconds {
        let second = start + t * 1000;
        for (i, info) in infos.iter().enumerate() {
            value[i] += rng.centered() * 0.1;
            let v = (value[i] * 100.0).round() / 100.0;
            let jitter = if free_running {
                (rng.centered() * 10.0) as i64
            } else {
                0
            };
            let ts = second + phase[i] + jitter;
            out.raw += format!(r#"{{"value":{v},"ts":{ts}}}"#).len() as u64;
            w.apply(&info.key, v, ts, ts + 50);
        }
        let now = second + 1000;
        w.close_due(now, &mut emitted);
        for a in emitted.drain(..) {
            out.items += 1;
            pending.push(OutboxItem::Aggregate {
                series: std::sync::Arc::new(by_key[&a.series].clone()),
                window_start_ms: a.window_start_ms,
                window_secs: a.window_secs,
                version: a.version,
                agg: a.agg,
            });
        }
        if !pending.is_empty() {
            flush(&mut pending, &mut out, now);
        }
    }
    out
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let seconds = if full { 3600 } else { 300 };
    println!("upstream compaction: 100 sensors at 1 Hz for {seconds} s, real wire encoding\n");
    println!(
        "| sensor clocks | windows | raw payload bytes | bytes sent upstream (of which dictionary) | aggregates | bytes/aggregate | sent ÷ raw | MQTT upstream ÷ raw |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for free_running in [false, true] {
        for windows in [&[10u32][..], &[60], &[10, 60]] {
            let o = run(windows, seconds, 100, free_running);
            assert!(o.items > 0 && o.sent > 0);
            println!(
                "| {} | {:?} s | {} | {} ({}) | {} | {:.2} | **{:.2} %** | {:.2} % |",
                if free_running {
                    "free-running"
                } else {
                    "aligned"
                },
                windows,
                o.raw,
                o.sent,
                o.dict,
                o.items,
                o.sent as f64 / o.items as f64,
                100.0 * o.sent as f64 / o.raw as f64,
                100.0 * o.mqtt as f64 / o.raw as f64
            );
        }
    }
    println!("\ngoal (issue 5): ≤ 2 % for 10 s and for 1 min windows");
}

/// The `Hello` an MQTT message of gateway `gw-1` starts with.
fn hello(first_seq: u64) -> edgeferry::protocol::Hello {
    edgeferry::protocol::Hello {
        gateway: "gw-1".into(),
        epoch: 1,
        versions: edgeferry::protocol::SUPPORTED_VERSIONS.to_vec(),
        first_seq,
        software: format!("edgeferry/{}", env!("CARGO_PKG_VERSION")),
    }
}
