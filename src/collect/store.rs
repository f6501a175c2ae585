//! The collector's durable state: one JSONL file per gateway under `out/`, and dedup marks
//! in a sled database.
//!
//! # Write, then mark, then ack
//!
//! [`Store::store_batch`] appends a batch's lines to `out/<gateway>.jsonl`, `fsync`s the
//! file, records the mark `(gateway, epoch, seq)` and flushes sled; only then may the caller
//! acknowledge. Writes of one gateway are serialised by a per-gateway lock, and the mark is
//! checked under that lock, so a redelivered batch is never written twice, even when two
//! connections of the same gateway overlap.
//!
//! # Recovery
//!
//! Because a mark is written only after its lines are durable and the next batch of a
//! gateway is written only after the previous mark, at most the *last* batch in each file
//! can lack its mark (crash between write and mark, or a write cut short). Whenever a file is
//! opened (at start, or again after an I/O error), [`recover_file`] truncates a torn last
//! line and then the trailing lines of that last batch if its mark is absent. Such a batch
//! was never acknowledged, so the gateway still holds it and sends it again: after the
//! redelivery every item is in the file exactly once. (The file's lines carry `epoch` and
//! `batch` for exactly this.)
//!
//! # Floors
//!
//! A [`Hello`](crate::protocol::Hello) says every seq below `first_seq` is
//! acknowledged or dropped by the gateway and will never be sent again. The collector records
//! that *floor* per (gateway, epoch), deletes the marks below it (so marks stay bounded by
//! what gateways still hold) and acknowledges without writing any batch below the floor
//! (a stale connection's late delivery). Recovery keeps lines below the floor.
//!
//! # Keys (one sled tree)
//!
//! `b'm' gateway 0x00 epoch(u64 BE) seq(u64 BE)` → empty: a dedup mark.
//! `b'f' gateway 0x00 epoch(u64 BE)` → `first_seq` (u64 BE): the floor.
//! Gateway ids never contain `0x00` (see [`valid_gateway_id`]), so prefixes are unambiguous.

use crate::model::AlertState;
use crate::protocol::{OutboxItem, valid_gateway_id};
use anyhow::{Context, Result};
use serde::Serialize;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// What [`Store::store_batch`] did; the batch is acknowledged to the gateway in every case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Lines written and marked (the number of lines).
    Written(usize),
    /// The mark was present: a redelivery, nothing written.
    Duplicate,
    /// Below the gateway's floor: the gateway no longer holds it, nothing written.
    BelowFloor,
}

/// Output files and dedup marks.
pub struct Store {
    out_dir: PathBuf,
    db: sled::Db,
    files: Mutex<HashMap<String, Arc<Mutex<Option<File>>>>>,
}

fn mark_key(gateway: &str, epoch: u64, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(gateway.len() + 18);
    k.push(b'm');
    k.extend_from_slice(gateway.as_bytes());
    k.push(0);
    k.extend_from_slice(&epoch.to_be_bytes());
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn floor_key(gateway: &str, epoch: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(gateway.len() + 10);
    k.push(b'f');
    k.extend_from_slice(gateway.as_bytes());
    k.push(0);
    k.extend_from_slice(&epoch.to_be_bytes());
    k
}

fn be_u64(b: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(b.try_into().ok()?))
}

/// Inclusive ranges of consecutive values of an ascending sequence, at most `cap` ranges.
pub fn ranges(ascending: impl IntoIterator<Item = u64>, cap: usize) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for s in ascending {
        match out.last_mut() {
            Some((_, hi)) if hi.checked_add(1) == Some(s) => *hi = s,
            _ => {
                if out.len() == cap {
                    break;
                }
                out.push((s, s));
            }
        }
    }
    out
}

impl Store {
    /// Opens (creating) `data_dir/marks` and `data_dir/out/`, and recovers every output file.
    pub fn open(data_dir: &Path) -> Result<Store> {
        let out_dir = data_dir.join("out");
        std::fs::create_dir_all(&out_dir)
            .with_context(|| format!("cannot create {}", out_dir.display()))?;
        let marks = data_dir.join("marks");
        let db = sled::Config::new()
            .path(&marks)
            .open()
            .with_context(|| format!("cannot open the dedup marks in {}", marks.display()))?;
        let store = Store {
            out_dir,
            db,
            files: Mutex::new(HashMap::new()),
        };
        let entries = std::fs::read_dir(&store.out_dir)
            .with_context(|| format!("cannot list {}", store.out_dir.display()))?;
        for e in entries {
            let e = e?;
            let name = e.file_name();
            let Some(gateway) = name.to_str().and_then(|n| n.strip_suffix(".jsonl")) else {
                continue;
            };
            if !valid_gateway_id(gateway) {
                continue;
            }
            store.with_file(gateway, |_| Ok(()))?;
        }
        Ok(store)
    }

    /// The output file of a gateway.
    pub fn out_path(&self, gateway: &str) -> PathBuf {
        self.out_dir.join(format!("{gateway}.jsonl"))
    }

    fn is_marked(&self, gateway: &str, epoch: u64, seq: u64) -> Result<bool> {
        Ok(self.db.contains_key(mark_key(gateway, epoch, seq))?)
    }

    fn floor(&self, gateway: &str, epoch: u64) -> Result<u64> {
        Ok(self
            .db
            .get(floor_key(gateway, epoch))?
            .and_then(|v| be_u64(&v))
            .unwrap_or(0))
    }

    /// Runs `f` on the gateway's open output file, under the gateway's lock. Opens (and
    /// recovers) the file first if needed; drops the handle when `f` fails so the next call
    /// reopens and recovers it.
    fn with_file<T>(&self, gateway: &str, f: impl FnOnce(&mut File) -> Result<T>) -> Result<T> {
        let slot = {
            let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
            files.entry(gateway.to_string()).or_default().clone()
        };
        let mut guard = slot.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            let path = self.out_path(gateway);
            let existed = path.exists();
            let mut file = OpenOptions::new()
                .create(true)
                .read(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            if existed {
                recover_file(&mut file, &path, |epoch, seq| {
                    Ok(self.is_marked(gateway, epoch, seq)? || seq < self.floor(gateway, epoch)?)
                })?;
            } else {
                // Make the new directory entry durable before anything is acknowledged.
                File::open(&self.out_dir)
                    .and_then(|d| d.sync_all())
                    .with_context(|| format!("cannot sync {}", self.out_dir.display()))?;
            }
            *guard = Some(file);
        }
        let Some(file) = guard.as_mut() else {
            unreachable!("opened above")
        };
        let r = f(file);
        if r.is_err() {
            *guard = None;
        }
        r
    }

    /// Records `first_seq` as the floor of (gateway, epoch), deletes the marks below it and
    /// returns the stored ranges at or above it (at most `cap`).
    pub fn hello(
        &self,
        gateway: &str,
        epoch: u64,
        first_seq: u64,
        cap: usize,
    ) -> Result<Vec<(u64, u64)>> {
        // Under the gateway's lock, so no batch of this gateway is being stored meanwhile.
        self.with_file(gateway, |_| {
            let floor = self.floor(gateway, epoch)?;
            if first_seq > floor {
                let mut batch = sled::Batch::default();
                batch.insert(floor_key(gateway, epoch), &first_seq.to_be_bytes());
                for k in self
                    .db
                    .range(mark_key(gateway, epoch, 0)..mark_key(gateway, epoch, first_seq))
                    .keys()
                {
                    batch.remove(k?);
                }
                self.db.apply_batch(batch)?;
                self.db.flush()?;
            }
            let start = mark_key(gateway, epoch, first_seq.max(floor));
            let prefix_len = start.len() - 8;
            let prefix = start[..prefix_len].to_vec();
            let seqs = self
                .db
                .range(start..)
                .keys()
                .map_while(|k| match k {
                    Ok(k) if k.starts_with(&prefix) => be_u64(&k[prefix_len..]).map(Ok),
                    Ok(_) => None,
                    Err(e) => Some(Err(e)),
                })
                .collect::<Result<Vec<u64>, _>>()?;
            Ok(ranges(seqs, cap))
        })
    }

    /// Makes a batch durable: lines written and synced, then the mark recorded and flushed.
    /// Returns only after both are durable; the caller acknowledges after that.
    pub fn store_batch(
        &self,
        gateway: &str,
        epoch: u64,
        seq: u64,
        items: &[OutboxItem],
    ) -> Result<Stored> {
        let lines = batch_lines(gateway, epoch, seq, items)?;
        self.store_lines(gateway, epoch, seq, &lines, items.len())
    }

    /// [`Store::store_batch`] with the batch's lines already made ([`batch_lines`]), so that
    /// several sinks encode a batch once.
    pub fn store_lines(
        &self,
        gateway: &str,
        epoch: u64,
        seq: u64,
        buf: &[u8],
        items: usize,
    ) -> Result<Stored> {
        self.with_file(gateway, |file| {
            if self.is_marked(gateway, epoch, seq)? {
                return Ok(Stored::Duplicate);
            }
            if seq < self.floor(gateway, epoch)? {
                return Ok(Stored::BelowFloor);
            }
            if !buf.is_empty() {
                let before = file.metadata()?.len();
                let written = file.write_all(buf).and_then(|()| file.sync_data());
                if let Err(e) = written {
                    // Leave no partial batch behind if we can; recovery handles it otherwise.
                    let _ = file.set_len(before);
                    return Err(e).context("cannot write the output file");
                }
            }
            self.db.insert(mark_key(gateway, epoch, seq), &[])?;
            self.db.flush().context("cannot flush the dedup marks")?;
            Ok(Stored::Written(items))
        })
        .with_context(|| format!("storing batch {seq} of {gateway} epoch {epoch}"))
    }

    /// Flushes sled (called at shutdown; every mark is already flushed when acknowledged).
    pub fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }
}

/// Position of the last `\n` in `[0, end)`.
fn rfind_newline(f: &File, end: u64) -> std::io::Result<Option<u64>> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut pos = end;
    while pos > 0 {
        let from = pos.saturating_sub(buf.len() as u64);
        let n = (pos - from) as usize;
        f.read_exact_at(&mut buf[..n], from)?;
        if let Some(i) = buf[..n].iter().rposition(|&b| b == b'\n') {
            return Ok(Some(from + i as u64));
        }
        pos = from;
    }
    Ok(None)
}

/// `(epoch, batch)` of a line, if it is one of ours.
fn batch_id_of(line: &[u8]) -> Option<(u64, u64)> {
    #[derive(serde::Deserialize)]
    struct Id {
        epoch: u64,
        batch: u64,
    }
    let id: Id = serde_json::from_slice(line).ok()?;
    Some((id.epoch, id.batch))
}

/// Repairs the tail of an output file after a crash: truncates a torn last line, unreadable
/// trailing lines, and the trailing lines of the last batch unless `durable(epoch, seq)` says
/// it was marked (or is below the floor). Returns the number of bytes removed.
pub fn recover_file(
    file: &mut File,
    path: &Path,
    durable: impl Fn(u64, u64) -> Result<bool>,
) -> Result<u64> {
    let len = file.metadata()?.len();
    // `end` is always just after a '\n' (or 0): the end of the complete lines.
    let mut end = match rfind_newline(file, len)? {
        Some(p) => p + 1,
        None => 0,
    };
    let mut last_batch: Option<(u64, u64)> = None;
    let mut lines_removed = 0usize;
    while end > 0 {
        let start = rfind_newline(file, end - 1)?.map_or(0, |p| p + 1);
        let mut line = vec![0u8; (end - 1 - start) as usize];
        file.read_exact_at(&mut line, start)?;
        match (batch_id_of(&line), last_batch) {
            // Garbage (e.g. zeros after a power loss): never acknowledged, drop it.
            (None, None) => {}
            (Some(id), None) => {
                if durable(id.0, id.1)? {
                    break;
                }
                last_batch = Some(id);
            }
            (Some(id), Some(b)) if id == b => {}
            _ => break,
        }
        lines_removed += 1;
        end = start;
    }
    let removed = len - end;
    if removed > 0 {
        file.set_len(end)
            .and_then(|()| file.sync_all())
            .with_context(|| format!("cannot truncate {}", path.display()))?;
        tracing::warn!(
            file = %path.display(),
            bytes = removed,
            lines = lines_removed,
            batch = ?last_batch,
            "recovery removed the unacknowledged tail of an output file (it will be redelivered)"
        );
    }
    Ok(removed)
}

fn rfc3339_ms(ms: i64) -> Option<String> {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()?;
    t.format(&time::format_description::well_known::Rfc3339)
        .ok()
}

fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

#[derive(Serialize)]
struct AlertLine<'a> {
    kind: &'static str,
    gateway: &'a str,
    epoch: u64,
    batch: u64,
    rule: &'a str,
    series: &'a str,
    state: &'static str,
    value: Option<f64>,
    time: Option<String>,
}

/// The JSON lines of a whole batch, as every sink stores them.
pub fn batch_lines(gateway: &str, epoch: u64, seq: u64, items: &[OutboxItem]) -> Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(items.len() * 320);
    for item in items {
        write_line(&mut buf, gateway, epoch, seq, item)?;
    }
    Ok(buf)
}

/// Appends one JSON line for `item` to `buf`. Non-finite numbers (empty aggregates) and
/// times outside RFC 3339's range become `null`.
pub fn write_line(
    buf: &mut Vec<u8>,
    gateway: &str,
    epoch: u64,
    seq: u64,
    item: &OutboxItem,
) -> Result<()> {
    match item {
        OutboxItem::Aggregate {
            series,
            window_start_ms,
            window_secs,
            version,
            agg,
        } => {
            let bins = agg.sketch().keyed_bins();
            // Written field by field rather than through a derived `Serialize`: the names
            // are constants (no escaping) and this is most of a collector's CPU per
            // aggregate (`cargo bench --bench central`). Same fields, same order, same
            // number formatting as serde_json.
            fn json<T: Serialize + ?Sized>(buf: &mut Vec<u8>, v: &T) -> serde_json::Result<()> {
                serde_json::to_writer(buf, v)
            }
            buf.extend_from_slice(b"{\"kind\":\"aggregate\",\"gateway\":");
            json(buf, &gateway)?;
            buf.extend_from_slice(b",\"epoch\":");
            json(buf, &epoch)?;
            buf.extend_from_slice(b",\"batch\":");
            json(buf, &seq)?;
            buf.extend_from_slice(b",\"series\":");
            json(buf, &series.key.as_str())?;
            buf.extend_from_slice(b",\"metric\":");
            json(buf, &series.metric.as_str())?;
            buf.extend_from_slice(b",\"tags\":");
            json(buf, &series.tags)?;
            buf.extend_from_slice(b",\"window_start\":");
            json(buf, &rfc3339_ms(*window_start_ms))?;
            buf.extend_from_slice(b",\"window_secs\":");
            json(buf, window_secs)?;
            buf.extend_from_slice(b",\"version\":");
            json(buf, version)?;
            buf.extend_from_slice(b",\"count\":");
            json(buf, &agg.count())?;
            let stats: [(&[u8], Option<f64>); 10] = [
                (b",\"sum\":", finite(agg.sum())),
                (b",\"min\":", finite(agg.min())),
                (b",\"max\":", finite(agg.max())),
                (b",\"mean\":", finite(agg.mean())),
                (b",\"first\":", finite(agg.first())),
                (b",\"last\":", finite(agg.last())),
                (b",\"stddev\":", finite(agg.stddev())),
                (b",\"p50\":", agg.quantile(0.5).and_then(finite)),
                (b",\"p90\":", agg.quantile(0.9).and_then(finite)),
                (b",\"p99\":", agg.quantile(0.99).and_then(finite)),
            ];
            for (name, v) in stats {
                buf.extend_from_slice(name);
                json(buf, &v)?;
            }
            // The quantile sketch's non-empty bins in ascending order of value
            // ([`crate::model::sketch::Sketch::keyed_bins`]): keys and counts, so that
            // consumers merge windows and gateways by summing counts per key.
            buf.extend_from_slice(b",\"sketch_keys\":[");
            for (i, (k, _)) in bins.iter().enumerate() {
                if i > 0 {
                    buf.push(b',');
                }
                json(buf, k)?;
            }
            buf.extend_from_slice(b"],\"sketch_counts\":[");
            for (i, (_, n)) in bins.iter().enumerate() {
                if i > 0 {
                    buf.push(b',');
                }
                json(buf, n)?;
            }
            buf.extend_from_slice(b"]}");
        }
        OutboxItem::Alert(a) => serde_json::to_writer(
            &mut *buf,
            &AlertLine {
                kind: "alert",
                gateway,
                epoch,
                batch: seq,
                rule: &a.rule,
                series: &a.series,
                state: match a.state {
                    AlertState::Raised => "raised",
                    AlertState::Cleared => "cleared",
                },
                value: a.value.and_then(finite),
                time: rfc3339_ms(a.time_ms),
            },
        )?,
    }
    buf.push(b'\n');
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::aggregate::Aggregate;
    use crate::model::{Alert, SeriesInfo};
    use std::collections::BTreeMap;

    fn agg_item(v: u32) -> OutboxItem {
        let mut agg = Aggregate::new();
        agg.add(1.5, 1_764_000_000_500);
        agg.add(2.5, 1_764_000_009_000);
        OutboxItem::Aggregate {
            series: std::sync::Arc::new(SeriesInfo {
                key: "t{d=1}".into(),
                metric: "t".into(),
                tags: [("d".to_string(), "1".to_string())].into(),
            }),
            window_start_ms: 1_764_000_000_000,
            window_secs: 10,
            version: v,
            agg,
        }
    }

    #[test]
    fn ranges_merge_consecutive_seqs_and_respect_the_cap() {
        assert_eq!(ranges([1, 2, 3, 5, 7, 8], 10), vec![(1, 3), (5, 5), (7, 8)]);
        assert_eq!(ranges([1, 2, 3, 5, 7, 8], 2), vec![(1, 3), (5, 5)]);
        assert_eq!(ranges([], 2), vec![]);
        assert_eq!(
            ranges([u64::MAX - 1, u64::MAX], 2),
            vec![(u64::MAX - 1, u64::MAX)]
        );
    }

    #[test]
    fn lines_have_the_documented_fields() {
        let mut buf = Vec::new();
        write_line(&mut buf, "gw", 7, 3, &agg_item(2)).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
        assert_eq!(v["kind"], "aggregate");
        assert_eq!(v["window_start"], "2025-11-24T16:00:00Z");
        assert_eq!(v["count"], 2);
        assert_eq!(v["first"], 1.5);
        assert_eq!(v["last"], 2.5);
        assert_eq!(v["tags"]["d"], "1");
        assert_eq!(
            (v["epoch"].as_u64(), v["batch"].as_u64()),
            (Some(7), Some(3))
        );
        let mut buf = Vec::new();
        let alert = OutboxItem::Alert(Alert {
            rule: "hot".into(),
            series: "t".into(),
            metric: "t".into(),
            tags: BTreeMap::new(),
            state: AlertState::Cleared,
            value: None,
            time_ms: 1_764_000_000_250,
        });
        write_line(&mut buf, "gw", 7, 4, &alert).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
        assert_eq!(v["state"], "cleared");
        assert_eq!(v["time"], "2025-11-24T16:00:00.25Z");
        assert!(v["value"].is_null());
    }

    #[test]
    fn an_aggregate_line_is_exactly_the_documented_json() {
        let mut buf = Vec::new();
        write_line(&mut buf, "gw", 7, 3, &agg_item(2)).unwrap();
        let line = String::from_utf8(buf).unwrap();
        let want = concat!(
            r#"{"kind":"aggregate","gateway":"gw","epoch":7,"batch":3,"series":"t{d=1}","#,
            r#""metric":"t","tags":{"d":"1"},"window_start":"2025-11-24T16:00:00Z","#,
            r#""window_secs":10,"version":2,"count":2,"sum":4.0,"min":1.5,"max":2.5,"#,
            r#""mean":2.0,"first":1.5,"last":2.5,"stddev":0.5,"p50":"#
        );
        assert!(line.starts_with(want), "{line}");
        assert!(line.ends_with("]}\n"), "{line}");
        // Strings that need escaping come back as they went in.
        let mut item = agg_item(1);
        if let OutboxItem::Aggregate { series, .. } = &mut item {
            *series = std::sync::Arc::new(SeriesInfo {
                key: "t{d=\"a\\b\"}".into(),
                metric: "t\u{e9}\n".into(),
                tags: [("d".to_string(), "\"a\\b\"".to_string())].into(),
            });
        }
        let mut buf = Vec::new();
        write_line(&mut buf, "gw\"1", 7, 3, &item).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
        assert_eq!(v["series"], "t{d=\"a\\b\"}");
        assert_eq!(v["metric"], "t\u{e9}\n");
        assert_eq!(v["tags"]["d"], "\"a\\b\"");
        assert_eq!(v["gateway"], "gw\"1");
        assert_eq!(v["sketch_keys"].as_array().unwrap().len(), 2);
        assert_eq!(v["sketch_counts"], serde_json::json!([1, 1]));
    }

    #[test]
    fn duplicates_are_written_once_and_recovery_removes_an_unmarked_tail() {
        let dir = tempfile::tempdir().unwrap();
        let items = vec![agg_item(1), agg_item(2)];
        {
            let store = Store::open(dir.path()).unwrap();
            assert_eq!(
                store.store_batch("gw", 1, 10, &items).unwrap(),
                Stored::Written(2)
            );
            assert_eq!(
                store.store_batch("gw", 1, 10, &items).unwrap(),
                Stored::Duplicate
            );
            assert_eq!(
                store.store_batch("gw", 1, 11, &[]).unwrap(),
                Stored::Written(0)
            );
            assert_eq!(store.hello("gw", 1, 10, 10).unwrap(), vec![(10, 11)]);
            assert_eq!(store.hello("gw", 2, 0, 10).unwrap(), vec![]);
        }
        // Simulate a crash after writing batch 12 but before its mark, with a torn line.
        let path = dir.path().join("out/gw.jsonl");
        let mut tail = Vec::new();
        write_line(&mut tail, "gw", 1, 12, &agg_item(1)).unwrap();
        write_line(&mut tail, "gw", 1, 12, &agg_item(2)).unwrap();
        tail.extend_from_slice(b"{\"kind\":\"aggr");
        let good_len = std::fs::metadata(&path).unwrap().len();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&tail).unwrap();
        drop(f);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), good_len);
        assert_eq!(
            store.store_batch("gw", 1, 12, &items).unwrap(),
            Stored::Written(2)
        );
        // The floor moves up: marks below go, later deliveries below it are not written.
        assert_eq!(store.hello("gw", 1, 12, 10).unwrap(), vec![(12, 12)]);
        assert_eq!(
            store.store_batch("gw", 1, 10, &items).unwrap(),
            Stored::BelowFloor
        );
        drop(store);
        // A marked last batch is kept.
        let store = Store::open(dir.path()).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 4);
        drop(store);
    }
}
