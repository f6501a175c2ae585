//! Sparkplug B (Eclipse Sparkplug 3.0): the industrial MQTT convention of Ignition, HiveMQ,
//! Kura and Node-RED. Topics `spBv1.0/{group}/{type}/{edge_node}[/{device}]`, payloads in
//! protobuf (the message types below, written for `prost`'s derive: no `protoc` at build).
//!
//! Unlike the other formats a Sparkplug message cannot be decoded on its own: DATA messages
//! name their metrics by the aliases the node's BIRTH certificate declared, and a gap in the
//! node's message counter (`seq`, 0–255) means messages were lost. So the decoder keeps state
//! per edge node ([`SparkplugState`]); the committer owns it and decodes in message order.
//!
//! - NBIRTH resets the node (and its devices): aliases, the metric types, `bdSeq`, `seq = 0`.
//!   DBIRTH does the same for one device. Their metric values are readings too.
//! - NDATA/DDATA: each numeric metric (integers of every width, float, double, boolean as 0/1)
//!   becomes a reading: metric = the Sparkplug metric name, tags `group`, `edge_node` and
//!   `device`, event time = the metric's timestamp (else the payload's, else the arrival).
//!   Historical metrics are taken with their own timestamps like any late reading.
//! - Skipped and counted (`edgeferry_sparkplug_events_total{event="skipped_metric"}`): null
//!   values and String, Text, UUID, DateTime, Bytes, File, DataSet and Template metrics.
//! - Not readings, state for the decoder: `bdSeq`, `Node Control/*`, `Device Control/*`,
//!   `Properties/*`.
//! - An alias never declared, a gap in `seq`, or data from a node or device whose birth was
//!   never seen: counted, and (unless `rebirth = false`) a rebirth request is published to the
//!   node (`NCMD` with `Node Control/Rebirth = true`), at most once per [`REBIRTH_EVERY`] per
//!   node. What resolves is still taken: a gap loses nothing that arrived.
//! - NDEATH (with the `bdSeq` of the node's current birth; an older one is stale and ignored)
//!   and DDEATH mark the node or device offline (counted). NCMD, DCMD and STATE carry no
//!   readings.
//!
//! The aliases survive restarts: each edge node's state is a small file of its own
//! (`state/sparkplug/`), written whenever a birth or death changes it, before that message's
//! journal group is synced and acknowledged, so DATA arriving after a restart resolves (or,
//! should the file be lost, a rebirth rebuilds it). One file per node, so that a birth
//! rewrites that node's few kilobytes, not the whole plant's state (flash wear).

use super::reject::{Reject, snippet};
use crate::model::Reading;
use prost::Message as _;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// The Sparkplug B payload (`org.eclipse.tahu.protobuf.Payload`): only the fields edgeferry
/// reads; prost skips the others (metadata, properties, DataSet, Template values).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Payload {
    /// Milliseconds since the epoch when the message was made.
    #[prost(uint64, optional, tag = "1")]
    pub timestamp: Option<u64>,
    /// The metrics.
    #[prost(message, repeated, tag = "2")]
    pub metrics: Vec<Metric>,
    /// The node's message counter, 0–255 (absent in NDEATH).
    #[prost(uint64, optional, tag = "3")]
    pub seq: Option<u64>,
}

/// One metric of a [`Payload`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct Metric {
    /// Its name (births always carry it; data may carry the alias only).
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    /// The number the birth assigned to the name.
    #[prost(uint64, optional, tag = "2")]
    pub alias: Option<u64>,
    /// Milliseconds since the epoch of the value.
    #[prost(uint64, optional, tag = "3")]
    pub timestamp: Option<u64>,
    /// The Sparkplug data type ([`datatype`]).
    #[prost(uint32, optional, tag = "4")]
    pub datatype: Option<u32>,
    /// A value from the node's store-and-forward history.
    #[prost(bool, optional, tag = "5")]
    pub is_historical: Option<bool>,
    /// A value that should not be stored (edgeferry takes it like any other).
    #[prost(bool, optional, tag = "6")]
    pub is_transient: Option<bool>,
    /// The value is null.
    #[prost(bool, optional, tag = "7")]
    pub is_null: Option<bool>,
    /// The value, by its wire type.
    #[prost(oneof = "Value", tags = "10, 11, 12, 13, 14, 15, 16")]
    pub value: Option<Value>,
}

/// The value of a [`Metric`] as it travels (its meaning depends on the data type).
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Value {
    /// Int8/16/32 (two's complement) and UInt8/16/32.
    #[prost(uint32, tag = "10")]
    Int(u32),
    /// Int64 (two's complement), UInt64 and DateTime.
    #[prost(uint64, tag = "11")]
    Long(u64),
    /// Float.
    #[prost(float, tag = "12")]
    Float(f32),
    /// Double.
    #[prost(double, tag = "13")]
    Double(f64),
    /// Boolean.
    #[prost(bool, tag = "14")]
    Boolean(bool),
    /// String, Text, UUID.
    #[prost(string, tag = "15")]
    String(String),
    /// Bytes, File.
    #[prost(bytes = "vec", tag = "16")]
    Bytes(Vec<u8>),
}

/// Sparkplug's data type numbers (the ones that matter here).
pub mod datatype {
    /// Signed 8-bit integer.
    pub const INT8: u32 = 1;
    /// Signed 16-bit integer.
    pub const INT16: u32 = 2;
    /// Signed 32-bit integer.
    pub const INT32: u32 = 3;
    /// Signed 64-bit integer.
    pub const INT64: u32 = 4;
    /// Unsigned 8-bit integer.
    pub const UINT8: u32 = 5;
    /// Unsigned 16-bit integer.
    pub const UINT16: u32 = 6;
    /// Unsigned 32-bit integer.
    pub const UINT32: u32 = 7;
    /// Unsigned 64-bit integer.
    pub const UINT64: u32 = 8;
    /// 32-bit float.
    pub const FLOAT: u32 = 9;
    /// 64-bit float.
    pub const DOUBLE: u32 = 10;
    /// Boolean.
    pub const BOOLEAN: u32 = 11;
}

/// `tag_names`: what the tags of a Sparkplug series are called (`group`, `edge_node` and
/// `device` unless configured), e.g. `{ group = "site", edge_node = "gateway" }` to match the
/// tags of the other subscriptions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TagNames {
    /// The tag holding the topic's group id.
    pub group: String,
    /// The tag holding the edge node id.
    pub edge_node: String,
    /// The tag holding the device id (device messages only).
    pub device: String,
}

impl Default for TagNames {
    fn default() -> Self {
        TagNames {
            group: "group".into(),
            edge_node: "edge_node".into(),
            device: "device".into(),
        }
    }
}

impl TagNames {
    /// The tags of a node's (or one of its devices') series.
    fn of(&self, group: &str, node: &str, device: Option<&str>) -> Vec<(String, String)> {
        let mut tags = vec![
            (self.group.clone(), group.to_string()),
            (self.edge_node.clone(), node.to_string()),
        ];
        if let Some(d) = device {
            tags.push((self.device.clone(), d.to_string()));
        }
        tags
    }

    /// Why these names cannot be used, if they cannot (empty or the same name twice).
    pub fn problem(&self) -> Option<String> {
        let names = [&self.group, &self.edge_node, &self.device];
        if names.iter().any(|n| n.trim().is_empty()) {
            return Some("a tag name is empty".into());
        }
        if names[0] == names[1] || names[0] == names[2] || names[1] == names[2] {
            return Some(format!("the names must differ: {names:?}"));
        }
        None
    }
}

/// How one `sparkplug_b` subscription decodes: its tag names and whether nodes are asked for
/// a rebirth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Ask nodes for a rebirth when their state is missing or messages were lost.
    pub rebirth: bool,
    /// The tags' names.
    pub names: TagNames,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            rebirth: true,
            names: TagNames::default(),
        }
    }
}

/// The first topic level of Sparkplug B.
pub const NAMESPACE: &str = "spBv1.0";

/// A node is asked for a rebirth at most this often (in ms of arrival time): a node that
/// keeps sending data with unknown aliases must not be flooded with requests.
pub const REBIRTH_EVERY: i64 = 5_000;

/// The message types of a Sparkplug topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    NBirth,
    NData,
    NDeath,
    DBirth,
    DData,
    DDeath,
    /// NCMD, DCMD, STATE: nothing for edgeferry to take.
    Other,
}

/// `(group, edge node, device, kind)` of a Sparkplug topic.
fn parse_topic(topic: &str) -> Result<(&str, &str, Option<&str>, Kind), Reject> {
    let bad = |why: &str| Reject::BadSparkplug {
        detail: format!("topic {:?} {why}", snippet(topic)),
    };
    let mut levels = topic.split('/');
    if levels.next() != Some(NAMESPACE) {
        return Err(bad("is not in the spBv1.0 namespace"));
    }
    let group = levels.next().filter(|g| !g.is_empty());
    let kind = levels.next();
    if group == Some("STATE") || kind.is_none() && group.is_some() {
        return Ok(("", "", None, Kind::Other));
    }
    let (Some(group), Some(kind)) = (group, kind) else {
        return Err(bad("lacks a group or message type"));
    };
    let kind = match kind {
        "NBIRTH" => Kind::NBirth,
        "NDATA" => Kind::NData,
        "NDEATH" => Kind::NDeath,
        "DBIRTH" => Kind::DBirth,
        "DDATA" => Kind::DData,
        "DDEATH" => Kind::DDeath,
        "NCMD" | "DCMD" => Kind::Other,
        other => return Err(bad(&format!("has an unknown message type {other:?}"))),
    };
    let node = levels
        .next()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| bad("lacks the edge node"))?;
    let device = levels.next().filter(|d| !d.is_empty());
    let device_kind = matches!(kind, Kind::DBirth | Kind::DData | Kind::DDeath);
    if device_kind != device.is_some() || levels.next().is_some() {
        return Err(bad("has the wrong number of levels for its type"));
    }
    Ok((group, node, device, kind))
}

/// Whether a metric is Sparkplug's own state, not a reading.
fn is_control(name: &str) -> bool {
    name == "bdSeq"
        || name.starts_with("Node Control/")
        || name.starts_with("Device Control/")
        || name.starts_with("Properties/")
}

/// A metric's value as a reading's value, by its data type (`None`: not numeric, or null).
fn numeric(datatype: u32, value: &Value) -> Option<f64> {
    use datatype::*;
    let v = match (datatype, value) {
        // Implementations differ in how they widen a negative Int8/Int16 into the u32 (sign
        // extended or not); the low bits are the same either way.
        (INT8, Value::Int(v)) => *v as u8 as i8 as f64,
        (INT16, Value::Int(v)) => *v as u16 as i16 as f64,
        (INT32, Value::Int(v)) => *v as i32 as f64,
        (INT64, Value::Long(v)) => *v as i64 as f64,
        (UINT8 | UINT16 | UINT32, Value::Int(v)) => *v as f64,
        (UINT64, Value::Long(v)) => *v as f64,
        (FLOAT, Value::Float(v)) => *v as f64,
        (DOUBLE, Value::Double(v)) => *v,
        (BOOLEAN, Value::Boolean(b)) => u8::from(*b) as f64,
        _ => return None,
    };
    v.is_finite().then_some(v)
}

/// What the decoder remembers of one edge node (written to its node file).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Node {
    /// Alias → (device, metric name), from the births.
    aliases: BTreeMap<u64, (Option<String>, String)>,
    /// (device, metric name) → data type, from the births.
    types: BTreeMap<(Option<String>, String), u32>,
    /// The devices born since the node's birth, and whether each is online.
    devices: BTreeMap<String, bool>,
    /// The `bdSeq` of the node's current birth: an NDEATH with another one is stale.
    bd_seq: Option<u64>,
    /// Between NBIRTH and NDEATH.
    online: bool,
    /// The tag names of the subscription its birth came on (for its series after a restart).
    names: TagNames,
    /// The last `seq` seen (not persisted: after a restart the next message sets it).
    #[serde(skip)]
    seq: Option<u8>,
}

impl Node {
    /// What the node counts against the state's bound: itself, its devices, aliases and types.
    fn entries(&self) -> usize {
        1 + self.devices.len() + self.aliases.len() + self.types.len()
    }
}

/// The decoder's state for every edge node seen: see the module docs.
#[derive(Debug, Default)]
pub struct SparkplugState {
    nodes: HashMap<(String, String), Node>,
    /// Alias and type entries over all nodes, bounded by `max_entries`.
    entries: usize,
    max_entries: usize,
    /// Nodes whose persisted state changed since [`SparkplugState::take_dirty`].
    dirty: std::collections::BTreeSet<(String, String)>,
    /// Rebirth requests to publish: (topic, payload).
    rebirths: Vec<(String, Vec<u8>)>,
    /// When each node was last asked for a rebirth (arrival ms), at most [`MAX_ASKED`].
    asked: HashMap<(String, String), i64>,
    /// Sources that died since [`SparkplugState::take_offline`]: their tags.
    offline: Vec<Vec<(String, String)>>,
}

/// Nodes whose last rebirth request is remembered for the rate limit; when full, those asked
/// longer than [`REBIRTH_EVERY`] ago are forgotten (and past that, requests go unlimited
/// rather than unbounded memory).
const MAX_ASKED: usize = 4096;

/// The directory of the node files, in the processing state directory.
pub const STATE_DIR: &str = "sparkplug";

/// The node files' extension.
pub const NODE_EXT: &str = "node";

/// A node file's magic and version (see [`crate::util::write_framed`]).
pub const STATE_MAGIC: &[u8; 4] = b"EFSP";
/// A node file's format version.
pub const STATE_VERSION: u16 = 1;

/// The persisted part of one node: its (group, edge node) and state.
#[derive(Serialize, Deserialize)]
struct Persisted {
    key: (String, String),
    node: Node,
}

/// The file name of a node's state: a stable 64-bit digest of its group and id (any
/// characters, any length, in a name every file system takes). Two nodes with one digest
/// would share a file: the one written last wins, and the other is asked for a rebirth.
pub fn node_file(group: &str, node: &str) -> String {
    format!(
        "{:08x}{:08x}.{NODE_EXT}",
        crc32fast::hash(group.as_bytes()),
        crc32fast::hash(node.as_bytes())
    )
}

/// The node files in `dir`, sorted by name (none when the directory does not exist: no
/// Sparkplug B birth was seen yet). Sorted so that, when `max_series` cannot hold them all,
/// the same nodes are kept at every start.
pub fn node_files(dir: &std::path::Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut files: Vec<_> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == NODE_EXT))
        .collect();
    files.sort();
    Ok(files)
}

/// One node file's contents: (group, edge node), whether it is online, and how many aliases.
pub fn inspect_node_file(
    bytes: &[u8],
) -> Result<(String, String, bool, usize), crate::util::StateFileError> {
    let p: Persisted = crate::util::decode_framed(bytes, STATE_MAGIC, STATE_VERSION)?;
    Ok((p.key.0, p.key.1, p.node.online, p.node.aliases.len()))
}

impl SparkplugState {
    /// An empty state holding at most `max_entries` nodes, devices, aliases and metric types
    /// in all (each alias is a series a birth declared: `[process] max_series` is the natural
    /// bound). A birth beyond it is still decoded, but what does not fit is not remembered
    /// (counted as `state_full`): data that needs it is rejected as `unknown_alias`.
    pub fn new(max_entries: usize) -> SparkplugState {
        SparkplugState {
            max_entries,
            ..Default::default()
        }
    }

    /// The node files whose state changed since the last call: (file name, body for
    /// [`crate::util::write_framed`]), or no body when the node is no longer kept (its file
    /// goes: an old birth's aliases must not come back after a restart).
    pub fn take_dirty(&mut self) -> Vec<(String, Option<Vec<u8>>)> {
        std::mem::take(&mut self.dirty)
            .into_iter()
            .map(|key| {
                let name = node_file(&key.0, &key.1);
                let body = self.nodes.get(&key).map(|node| {
                    postcard::to_stdvec(&Persisted {
                        key,
                        node: node.clone(),
                    })
                    .expect("sparkplug state encodes")
                });
                (name, body)
            })
            .collect()
    }

    /// Adds the node a node file holds (a damaged one is refused as such).
    pub fn add_node_file(&mut self, bytes: &[u8]) -> Result<(), crate::util::StateFileError> {
        let p: Persisted = crate::util::decode_framed(bytes, STATE_MAGIC, STATE_VERSION)?;
        if self.entries + p.node.entries() > self.max_entries {
            event("state_full");
            return Ok(());
        }
        self.entries += p.node.entries();
        if let Some(old) = self.nodes.insert(p.key, p.node) {
            self.entries -= old.entries();
        }
        Ok(())
    }

    /// The rebirth requests decided since the last call.
    pub fn take_rebirths(&mut self) -> Vec<(String, Vec<u8>)> {
        std::mem::take(&mut self.rebirths)
    }

    /// Edge nodes known.
    pub fn nodes(&self) -> usize {
        self.nodes.len()
    }

    /// The sources that died since the last call (the tags their series carry).
    pub fn take_offline(&mut self) -> Vec<Vec<(String, String)>> {
        std::mem::take(&mut self.offline)
    }

    /// Every node and device the state holds as dead (not born again since): after a
    /// restart, processing raises their silence alerts again where replay did not.
    pub fn offline_sources(&self) -> Vec<Vec<(String, String)>> {
        let mut out = Vec::new();
        for ((group, node_id), node) in &self.nodes {
            if !node.online {
                out.push(node.names.of(group, node_id, None));
                continue;
            }
            for (device, online) in &node.devices {
                if !online {
                    out.push(node.names.of(group, node_id, Some(device)));
                }
            }
        }
        out.sort();
        out
    }

    /// The state a previous run left in `dir` (empty when there is none; a damaged or
    /// unreadable node file is logged and left out: that node is asked for a rebirth when
    /// its data cannot resolve).
    pub fn load(dir: &std::path::Path, max_entries: usize) -> SparkplugState {
        let mut s = SparkplugState::new(max_entries);
        let files = match node_files(dir) {
            Ok(files) => files,
            Err(e) => {
                tracing::error!("cannot read the Sparkplug B state {}: {e}", dir.display());
                return s;
            }
        };
        for path in files {
            let added = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| s.add_node_file(&b).map_err(|e| e.to_string()));
            if let Err(e) = added {
                tracing::error!(
                    "Sparkplug B node state {} unusable ({e}); left out (the node is asked for \
                     a rebirth)",
                    path.display()
                );
            }
        }
        s
    }

    /// Decodes one message, appending its readings to `out` (none for deaths, commands and
    /// births of control metrics only). `options`: the subscription's tag names, and whether
    /// nodes are asked for a rebirth when their state is missing or a message was lost.
    pub fn decode(
        &mut self,
        topic: &str,
        payload: &[u8],
        arrival_ms: i64,
        options: &Options,
        out: &mut Vec<Reading>,
    ) -> Result<(), Reject> {
        let rebirth = options.rebirth;
        let (group, node_id, device, kind) = parse_topic(topic)?;
        if kind == Kind::Other {
            return Ok(());
        }
        let p = Payload::decode(payload).map_err(|e| Reject::BadSparkplug {
            detail: format!("payload is not a Sparkplug B protobuf: {e}"),
        })?;
        let key = (group.to_string(), node_id.to_string());
        let start = out.len();
        let mut unknown = Vec::new();
        let mut lost = false;
        match kind {
            Kind::NBirth => {
                if let Some(old) = self.nodes.remove(&key) {
                    self.entries -= old.entries();
                }
                let mut node = Node {
                    online: true,
                    names: options.names.clone(),
                    seq: p.seq.map(|s| s as u8),
                    bd_seq: bd_seq(&p),
                    ..Default::default()
                };
                event("birth");
                self.dirty.insert(key.clone());
                if self.entries + node.entries() > self.max_entries {
                    // Decoded, not remembered: its data will ask for a rebirth.
                    event("state_full");
                    self.learn(&mut node, None, &p, false);
                    readings(
                        &p,
                        &node,
                        group,
                        node_id,
                        None,
                        arrival_ms,
                        &mut unknown,
                        out,
                    );
                    return Ok(());
                }
                self.entries += node.entries();
                self.learn(&mut node, None, &p, true);
                self.nodes.insert(key.clone(), node);
            }
            Kind::DBirth => {
                let Some(mut node) = self.nodes.remove(&key) else {
                    return self.unborn(&key, rebirth, arrival_ms, "DBIRTH");
                };
                lost = track_seq(&mut node, p.seq);
                let device_key = device.map(str::to_string);
                let before = node.entries();
                node.aliases.retain(|_, (d, _)| *d != device_key);
                node.types.retain(|(d, _), _| *d != device_key);
                self.entries -= before - node.entries();
                let d = device.expect("a device topic").to_string();
                let known = node.devices.contains_key(&d);
                let fits = known || self.entries < self.max_entries;
                if fits {
                    if !known {
                        self.entries += 1;
                    }
                    node.devices.insert(d, true);
                    self.learn(&mut node, device, &p, true);
                } else {
                    event("state_full");
                }
                event("birth");
                self.dirty.insert(key.clone());
                self.nodes.insert(key.clone(), node);
            }
            Kind::NData | Kind::DData => {
                let Some(node) = self.nodes.get_mut(&key) else {
                    return self.unborn(&key, rebirth, arrival_ms, "DATA");
                };
                lost = track_seq(node, p.seq);
                if let Some(d) = device
                    && !node.devices.contains_key(d)
                {
                    unknown.push(format!("device {d:?}"));
                }
            }
            Kind::NDeath => {
                if let Some(node) = self.nodes.get_mut(&key) {
                    let stale = matches!((bd_seq(&p), node.bd_seq), (Some(a), Some(b)) if a != b);
                    if stale {
                        event("stale_death");
                    } else {
                        node.online = false;
                        self.dirty.insert(key.clone());
                        self.offline.push(node.names.of(group, node_id, None));
                        event("death");
                    }
                }
                return Ok(());
            }
            Kind::DDeath => {
                if let Some(node) = self.nodes.get_mut(&key) {
                    lost = track_seq(node, p.seq);
                    if let Some(online) = device.and_then(|d| node.devices.get_mut(d)) {
                        *online = false;
                        self.dirty.insert(key.clone());
                        self.offline.push(node.names.of(group, node_id, device));
                        event("death");
                    }
                }
                if lost {
                    self.request_rebirth(&key, rebirth, arrival_ms, "seq_gap");
                }
                return Ok(());
            }
            Kind::Other => unreachable!("returned above"),
        }
        let node = self.nodes.get(&key).expect("present for births and data");
        if unknown.is_empty() {
            readings(
                &p,
                node,
                group,
                node_id,
                device,
                arrival_ms,
                &mut unknown,
                out,
            );
        }
        if lost {
            self.request_rebirth(&key, rebirth, arrival_ms, "seq_gap");
        }
        if !unknown.is_empty() {
            self.request_rebirth(&key, rebirth, arrival_ms, "unknown_alias");
            if out.len() == start {
                return Err(Reject::UnknownAlias {
                    detail: format!(
                        "{}: no birth declared {}",
                        snippet(topic),
                        unknown.join(", ")
                    ),
                });
            }
        }
        Ok(())
    }

    /// Data or a device birth from a node whose birth was never seen.
    fn unborn(
        &mut self,
        key: &(String, String),
        rebirth: bool,
        arrival_ms: i64,
        what: &str,
    ) -> Result<(), Reject> {
        self.request_rebirth(key, rebirth, arrival_ms, "unknown_alias");
        Err(Reject::UnknownAlias {
            detail: format!(
                "{what} from edge node {}/{} before its NBIRTH",
                key.0, key.1
            ),
        })
    }

    /// Takes the names, aliases and types a birth declares (for `device`, or the node);
    /// `counted`: the node is kept, so what it learns counts against the bound (and what does
    /// not fit is left out, counted as `state_full`).
    fn learn(&mut self, node: &mut Node, device: Option<&str>, p: &Payload, counted: bool) {
        for m in &p.metrics {
            let Some(name) = &m.name else { continue };
            if is_control(name) {
                continue;
            }
            let new = usize::from(m.alias.is_some()) + usize::from(m.datatype.is_some());
            if counted && self.entries + new > self.max_entries {
                event("state_full");
                continue;
            }
            let target = (device.map(str::to_string), name.clone());
            let before = node.entries();
            if let Some(t) = m.datatype {
                node.types.insert(target.clone(), t);
            }
            if let Some(a) = m.alias {
                node.aliases.insert(a, target);
            }
            if counted {
                self.entries += node.entries() - before;
            }
        }
    }

    /// Queues a rebirth request for the node, unless one went out within [`REBIRTH_EVERY`]
    /// or requests are off; `why` is counted either way.
    fn request_rebirth(
        &mut self,
        key: &(String, String),
        rebirth: bool,
        arrival_ms: i64,
        why: &'static str,
    ) {
        event(why);
        if !rebirth {
            return;
        }
        if self
            .asked
            .get(key)
            .is_some_and(|&at| arrival_ms - at < REBIRTH_EVERY)
        {
            event("rebirth_suppressed");
            return;
        }
        if self.asked.len() >= MAX_ASKED {
            self.asked.retain(|_, at| arrival_ms - *at < REBIRTH_EVERY);
        }
        if self.asked.len() < MAX_ASKED {
            self.asked.insert(key.clone(), arrival_ms);
        }
        event("rebirth_requested");
        self.rebirths.push((
            format!("{NAMESPACE}/{}/NCMD/{}", key.0, key.1),
            rebirth_request(arrival_ms),
        ));
    }
}

/// The `bdSeq` metric of a birth or death certificate.
fn bd_seq(p: &Payload) -> Option<u64> {
    p.metrics
        .iter()
        .find(|m| m.name.as_deref() == Some("bdSeq"))
        .and_then(|m| match m.value {
            Some(Value::Long(v)) => Some(v),
            Some(Value::Int(v)) => Some(v as u64),
            _ => None,
        })
}

/// Notes the message's `seq`; true when messages were lost in between (it does not follow
/// the previous one, modulo 256). The first after a restart only sets it.
fn track_seq(node: &mut Node, seq: Option<u64>) -> bool {
    let Some(seq) = seq.map(|s| s as u8) else {
        return false;
    };
    let lost = node.seq.is_some_and(|last| last.wrapping_add(1) != seq);
    node.seq = Some(seq);
    lost
}

/// The readings of a birth or data message; unresolvable aliases go to `unknown`.
#[allow(clippy::too_many_arguments)]
fn readings(
    p: &Payload,
    node: &Node,
    group: &str,
    node_id: &str,
    device: Option<&str>,
    arrival_ms: i64,
    unknown: &mut Vec<String>,
    out: &mut Vec<Reading>,
) {
    let device_key = device.map(str::to_string);
    for m in &p.metrics {
        let name = match (&m.name, m.alias) {
            (Some(n), _) => n.clone(),
            (None, Some(a)) => match node.aliases.get(&a) {
                Some((d, n)) if *d == device_key => n.clone(),
                _ => {
                    unknown.push(format!("alias {a}"));
                    continue;
                }
            },
            (None, None) => {
                event("skipped_metric");
                continue;
            }
        };
        if is_control(&name) {
            continue;
        }
        let datatype = m
            .datatype
            .or_else(|| node.types.get(&(device_key.clone(), name.clone())).copied());
        let value = match (&m.value, datatype, m.is_null) {
            (Some(v), Some(t), None | Some(false)) => numeric(t, v),
            _ => None,
        };
        let time = m.timestamp.or(p.timestamp).map_or(arrival_ms, |t| t as i64);
        let Some(value) = value.filter(|_| (0..=super::time::MAX_TIME_MS).contains(&time)) else {
            event("skipped_metric");
            continue;
        };
        let tags = node.names.of(group, node_id, device).into_iter().collect();
        out.push(Reading {
            metric: name,
            tags,
            value,
            time_ms: time,
        });
    }
}

/// The payload of a rebirth request: `Node Control/Rebirth = true`.
pub fn rebirth_request(now_ms: i64) -> Vec<u8> {
    Payload {
        timestamp: Some(now_ms.max(0) as u64),
        metrics: vec![Metric {
            name: Some("Node Control/Rebirth".into()),
            timestamp: Some(now_ms.max(0) as u64),
            datatype: Some(datatype::BOOLEAN),
            value: Some(Value::Boolean(true)),
            ..Default::default()
        }],
        seq: None,
    }
    .encode_to_vec()
}

fn event(what: &'static str) {
    metrics::counter!("edgeferry_sparkplug_events_total", "event" => what).increment(1);
}

/// Every `event` label of `edgeferry_sparkplug_events_total`.
pub const EVENTS: &[&str] = &[
    "birth",
    "death",
    "stale_death",
    "unknown_alias",
    "seq_gap",
    "rebirth_requested",
    "rebirth_suppressed",
    "skipped_metric",
    "state_full",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn metric(name: Option<&str>, alias: Option<u64>, t: u32, v: Value) -> Metric {
        Metric {
            name: name.map(str::to_string),
            alias,
            timestamp: Some(1_700_000_000_000),
            datatype: Some(t),
            value: Some(v),
            ..Default::default()
        }
    }

    fn payload(seq: u64, metrics: Vec<Metric>) -> Vec<u8> {
        Payload {
            timestamp: Some(1_700_000_000_000),
            metrics,
            seq: Some(seq),
        }
        .encode_to_vec()
    }

    /// An NDATA of plant/gw1 with one double metric by alias, arriving at `at`.
    fn ndata(
        s: &mut SparkplugState,
        seq: u64,
        alias: u64,
        value: f64,
        at: i64,
        out: &mut Vec<Reading>,
    ) -> Result<(), Reject> {
        let p = payload(
            seq,
            vec![metric(
                None,
                Some(alias),
                datatype::DOUBLE,
                Value::Double(value),
            )],
        );
        s.decode("spBv1.0/plant/NDATA/gw1", &p, at, &Options::default(), out)
    }

    /// An NBIRTH of plant/gw2 with the one double metric `x` (alias 1).
    fn birth_of_gw2(s: &mut SparkplugState, out: &mut Vec<Reading>) {
        let p = payload(
            0,
            vec![metric(
                Some("x"),
                Some(1),
                datatype::DOUBLE,
                Value::Double(1.0),
            )],
        );
        s.decode("spBv1.0/plant/NBIRTH/gw2", &p, 5, &Options::default(), out)
            .unwrap();
    }

    fn birth(state: &mut SparkplugState) {
        let p = payload(
            0,
            vec![
                metric(Some("bdSeq"), None, datatype::INT64, Value::Long(3)),
                metric(Some("temp"), Some(1), datatype::DOUBLE, Value::Double(20.5)),
                metric(Some("level"), Some(2), datatype::INT8, Value::Int(0xFF)),
                metric(
                    Some("Node Control/Rebirth"),
                    None,
                    datatype::BOOLEAN,
                    Value::Boolean(false),
                ),
            ],
        );
        let mut out = Vec::new();
        state
            .decode(
                "spBv1.0/plant/NBIRTH/gw1",
                &p,
                5,
                &Options::default(),
                &mut out,
            )
            .unwrap();
        assert_eq!(
            out.len(),
            2,
            "the birth's values are readings, control ones not"
        );
        assert_eq!(out[1].value, -1.0, "Int8 0xFF is -1");
    }

    #[test]
    fn data_by_alias_resolves_through_the_birth_and_gets_the_topic_tags() {
        let mut s = SparkplugState::new(100);
        birth(&mut s);
        let p = payload(
            1,
            vec![metric(None, Some(1), datatype::DOUBLE, Value::Double(21.0))],
        );
        let mut out = Vec::new();
        s.decode(
            "spBv1.0/plant/NDATA/gw1",
            &p,
            5,
            &Options::default(),
            &mut out,
        )
        .unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].metric, "temp");
        assert_eq!(out[0].value, 21.0);
        assert_eq!(out[0].time_ms, 1_700_000_000_000);
        assert_eq!(out[0].tags["group"], "plant");
        assert_eq!(out[0].tags["edge_node"], "gw1");
        assert!(s.take_rebirths().is_empty());
    }

    #[test]
    fn an_unknown_alias_is_rejected_and_asks_for_a_rebirth_once_per_interval() {
        let mut s = SparkplugState::new(100);
        birth(&mut s);
        let p = payload(
            1,
            vec![metric(None, Some(9), datatype::DOUBLE, Value::Double(1.0))],
        );
        let mut out = Vec::new();
        let r = s.decode(
            "spBv1.0/plant/NDATA/gw1",
            &p,
            10,
            &Options::default(),
            &mut out,
        );
        assert_eq!(r.unwrap_err().reason(), "unknown_alias");
        let asked = s.take_rebirths();
        assert_eq!(asked.len(), 1);
        assert_eq!(asked[0].0, "spBv1.0/plant/NCMD/gw1");
        let cmd = Payload::decode(asked[0].1.as_slice()).unwrap();
        assert_eq!(cmd.metrics[0].name.as_deref(), Some("Node Control/Rebirth"));
        assert_eq!(cmd.metrics[0].value, Some(Value::Boolean(true)));
        let _ = ndata(&mut s, 2, 9, 1.0, 10 + REBIRTH_EVERY - 1, &mut out);
        assert!(s.take_rebirths().is_empty(), "rate-limited");
        let _ = ndata(&mut s, 3, 9, 1.0, 10 + REBIRTH_EVERY, &mut out);
        assert_eq!(s.take_rebirths().len(), 1);
    }

    #[test]
    fn a_seq_gap_takes_the_data_and_asks_for_a_rebirth_but_a_wrap_is_no_gap() {
        let mut s = SparkplugState::new(100);
        birth(&mut s);
        let mut out = Vec::new();
        for seq in 1..=255u64 {
            ndata(&mut s, seq, 1, 1.0, 10, &mut out).unwrap();
        }
        ndata(&mut s, 0, 1, 1.0, 10, &mut out).unwrap();
        assert!(s.take_rebirths().is_empty(), "255 → 0 is the wrap");
        ndata(&mut s, 2, 1, 2.0, 10, &mut out).unwrap();
        assert_eq!(out.last().unwrap().value, 2.0, "what arrived is taken");
        assert_eq!(s.take_rebirths().len(), 1, "seq 1 was lost");
    }

    #[test]
    fn the_state_survives_a_restart_one_file_per_node() {
        let mut s = SparkplugState::new(100);
        birth(&mut s);
        let dir = tempfile::tempdir().unwrap();
        let write = |s: &mut SparkplugState| {
            for (name, body) in s.take_dirty() {
                let path = dir.path().join(name);
                match body {
                    Some(b) => {
                        crate::util::write_framed(&path, STATE_MAGIC, STATE_VERSION, &b).unwrap()
                    }
                    None => std::fs::remove_file(&path).unwrap(),
                }
            }
        };
        write(&mut s);
        assert!(s.take_dirty().is_empty(), "written once");
        let mut out = Vec::new();
        birth_of_gw2(&mut s, &mut out);
        let dirty = s.take_dirty();
        assert_eq!(dirty.len(), 1, "a birth rewrites its own node only");
        assert_eq!(dirty[0].0, node_file("plant", "gw2"));
        let mut back = SparkplugState::load(dir.path(), 100);
        assert_eq!(back.nodes(), 1, "gw2 was not written");
        ndata(&mut back, 7, 2, 5.0, 5, &mut out).unwrap();
        assert_eq!(out.last().unwrap().metric, "level");
        assert!(
            back.take_rebirths().is_empty(),
            "the first seq after a restart is no gap"
        );
        // A damaged file is left out, and that node asks for a rebirth.
        std::fs::write(dir.path().join(node_file("plant", "gw1")), b"EFSP junk").unwrap();
        let mut lost = SparkplugState::load(dir.path(), 100);
        assert_eq!(lost.nodes(), 0);
        assert!(ndata(&mut lost, 8, 2, 5.0, 5, &mut out).is_err());
        assert_eq!(lost.take_rebirths().len(), 1);
    }

    #[test]
    fn data_before_any_birth_asks_for_one() {
        let mut s = SparkplugState::new(100);
        let p = payload(
            4,
            vec![metric(None, Some(1), datatype::DOUBLE, Value::Double(1.0))],
        );
        let mut out = Vec::new();
        let r = s.decode(
            "spBv1.0/plant/DDATA/gw2/pump",
            &p,
            5,
            &Options::default(),
            &mut out,
        );
        assert_eq!(r.unwrap_err().reason(), "unknown_alias");
        assert_eq!(s.take_rebirths()[0].0, "spBv1.0/plant/NCMD/gw2");
        let r = s.decode(
            "spBv1.0/plant/DDATA/gw2/pump",
            &p,
            6,
            &Options::default(),
            &mut out,
        );
        assert!(r.is_err());
        assert!(s.take_rebirths().is_empty(), "still rate-limited");
        assert!(out.is_empty());
    }

    #[test]
    fn deaths_commands_and_state_carry_no_readings_and_bad_topics_are_rejected() {
        let mut s = SparkplugState::new(100);
        birth(&mut s);
        let mut out = Vec::new();
        let stale = payload(
            0,
            vec![metric(Some("bdSeq"), None, datatype::INT64, Value::Long(2))],
        );
        s.decode(
            "spBv1.0/plant/NDEATH/gw1",
            &stale,
            5,
            &Options::default(),
            &mut out,
        )
        .unwrap();
        assert!(
            s.nodes[&("plant".into(), "gw1".into())].online,
            "an old bdSeq is stale"
        );
        let death = payload(
            0,
            vec![metric(Some("bdSeq"), None, datatype::INT64, Value::Long(3))],
        );
        s.decode(
            "spBv1.0/plant/NDEATH/gw1",
            &death,
            5,
            &Options::default(),
            &mut out,
        )
        .unwrap();
        assert!(!s.nodes[&("plant".into(), "gw1".into())].online);
        assert_eq!(
            s.take_offline(),
            [TagNames::default().of("plant", "gw1", None)],
            "one death, once"
        );
        assert_eq!(
            s.offline_sources(),
            [TagNames::default().of("plant", "gw1", None)]
        );
        let device_birth = payload(
            1,
            vec![metric(
                Some("rpm"),
                Some(5),
                datatype::UINT16,
                Value::Int(9),
            )],
        );
        s.decode(
            "spBv1.0/plant/DBIRTH/gw1/pump",
            &device_birth,
            5,
            &Options::default(),
            &mut out,
        )
        .unwrap();
        let device_death = payload(2, vec![]);
        s.decode(
            "spBv1.0/plant/DDEATH/gw1/pump",
            &device_death,
            5,
            &Options::default(),
            &mut out,
        )
        .unwrap();
        assert_eq!(
            s.take_offline(),
            [TagNames::default().of("plant", "gw1", Some("pump"))]
        );
        out.clear();
        s.decode(
            "spBv1.0/plant/NCMD/gw1",
            b"",
            5,
            &Options::default(),
            &mut out,
        )
        .unwrap();
        s.decode(
            "spBv1.0/STATE/host1",
            b"{}",
            5,
            &Options::default(),
            &mut out,
        )
        .unwrap();
        assert!(out.is_empty());
        for bad in [
            "spAv1.0/plant/NDATA/gw1",
            "spBv1.0/plant/NDATA",
            "spBv1.0/plant/DDATA/gw1",
            "spBv1.0/plant/XDATA/gw1",
        ] {
            let r = s.decode(bad, &death, 5, &Options::default(), &mut out);
            assert_eq!(r.unwrap_err().reason(), "bad_sparkplug", "{bad}");
        }
        let r = s.decode(
            "spBv1.0/plant/NDATA/gw1",
            b"\xff\xff\xff",
            5,
            &Options::default(),
            &mut out,
        );
        assert_eq!(r.unwrap_err().reason(), "bad_sparkplug");
    }

    #[test]
    fn strings_nulls_and_datasets_are_skipped_and_every_integer_width_is_read() {
        let mut s = SparkplugState::new(100);
        let null = Metric {
            is_null: Some(true),
            ..metric(Some("n"), None, datatype::DOUBLE, Value::Double(1.0))
        };
        let p = payload(
            0,
            vec![
                metric(Some("s"), None, 12, Value::String("x".into())),
                null,
                metric(Some("i16"), None, datatype::INT16, Value::Int(0xFFFF_FFFE)),
                metric(Some("i32"), None, datatype::INT32, Value::Int(0xFFFF_FFFD)),
                metric(Some("i64"), None, datatype::INT64, Value::Long(u64::MAX)),
                metric(Some("u64"), None, datatype::UINT64, Value::Long(1 << 40)),
                metric(Some("f"), None, datatype::FLOAT, Value::Float(1.5)),
                metric(Some("b"), None, datatype::BOOLEAN, Value::Boolean(true)),
            ],
        );
        let mut out = Vec::new();
        s.decode("spBv1.0/g/NBIRTH/n", &p, 5, &Options::default(), &mut out)
            .unwrap();
        let got: Vec<(&str, f64)> = out.iter().map(|r| (r.metric.as_str(), r.value)).collect();
        assert_eq!(
            got,
            [
                ("i16", -2.0),
                ("i32", -3.0),
                ("i64", -1.0),
                ("u64", (1u64 << 40) as f64),
                ("f", 1.5),
                ("b", 1.0)
            ]
        );
    }

    #[test]
    fn the_tag_names_are_configurable_and_kept_for_the_node() {
        let mut s = SparkplugState::new(100);
        let names = TagNames {
            group: "site".into(),
            edge_node: "gateway".into(),
            device: "machine".into(),
        };
        let options = Options {
            rebirth: false,
            names: names.clone(),
        };
        let p = payload(
            0,
            vec![metric(
                Some("temp"),
                Some(1),
                datatype::DOUBLE,
                Value::Double(1.0),
            )],
        );
        let mut out = Vec::new();
        s.decode("spBv1.0/plant/NBIRTH/gw1", &p, 5, &options, &mut out)
            .unwrap();
        assert_eq!(out[0].tags["site"], "plant");
        assert_eq!(out[0].tags["gateway"], "gw1");
        let death = payload(0, vec![]);
        s.decode("spBv1.0/plant/NDEATH/gw1", &death, 5, &options, &mut out)
            .unwrap();
        assert_eq!(s.offline_sources(), [names.of("plant", "gw1", None)]);
        assert!(TagNames::default().problem().is_none());
        let same = TagNames {
            device: "group".into(),
            ..TagNames::default()
        };
        assert!(same.problem().is_some());
    }

    #[test]
    fn a_birth_rewrites_one_small_file_of_its_own_node() {
        // A node of 100 metrics with names of 25 characters, every one with an alias.
        let metrics: Vec<Metric> = (0..100)
            .map(|i| {
                let name = format!("Line 03/Motor {i:03}/Current");
                assert_eq!(name.len(), 25);
                metric(Some(&name), Some(i), datatype::DOUBLE, Value::Double(1.0))
            })
            .collect();
        let mut s = SparkplugState::new(10_000);
        let mut out = Vec::new();
        for node in ["n1", "n2", "n3"] {
            let p = payload(0, metrics.clone());
            s.decode(
                &format!("spBv1.0/plant/NBIRTH/{node}"),
                &p,
                5,
                &Options::default(),
                &mut out,
            )
            .unwrap();
            let dirty = s.take_dirty();
            assert_eq!(dirty.len(), 1, "only the node that was born");
            let bytes = dirty[0].1.as_ref().unwrap().len();
            eprintln!("node file body: {bytes} bytes for 100 metrics");
            assert!(bytes < 100 * 64, "{bytes} bytes for 100 metrics");
        }
    }

    #[test]
    fn the_state_is_bounded() {
        let mut s = SparkplugState::new(3);
        birth(&mut s);
        let node = &s.nodes[&("plant".into(), "gw1".into())];
        assert_eq!(
            node.entries(),
            3,
            "the node and temp (type + alias) fit, level does not"
        );
        assert_eq!(s.entries, 3);
        // A node that does not fit at all: its birth is decoded, not remembered.
        let mut out = Vec::new();
        birth_of_gw2(&mut s, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(s.nodes(), 1);
        // A new birth of the same node replaces its entries instead of adding to them.
        birth(&mut s);
        assert_eq!(s.entries, 3);
    }
}
