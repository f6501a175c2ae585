//! The upstream wire protocol (version 3, which speaks 2 as well): what the gateway's outbox
//! stores, and the frames that carry it to the central receiver over binary WebSocket
//! messages.
//!
//! `docs/PROTOCOL.md` is the normative description (byte layouts, sequence of frames,
//! idempotency rules); this module is its reference implementation.
//!
//! # Envelope
//!
//! ```text
//! offset 0  2 bytes  magic b"EF"
//!        2  u8       protocol version that defined the body (2; 1 for Hello and Error;
//!                    3 for Health)
//!        3  u8       frame kind (see FrameKind)
//!        4  u32 LE   body length
//!        8  u32 LE   CRC-32 (IEEE) of the body
//!       12  body     postcard
//! ```
//!
//! Bodies are postcard, which is not self-describing: fields are only ever *appended*, and
//! decoders ignore bytes after the fields they know. Everything else (new frames, changed
//! fields) needs a new frame kind or a new protocol version, negotiated in
//! [`Hello`]/[`Welcome`].
//!
//! # Gateway side
//!
//! Per connection: send [`Hello`], read [`Welcome`] (skip the seqs in `stored`), then for
//! each outbox batch call [`DictEncoder::encode_batch`] and send the optional [`Dict`] frame
//! before the [`Batch`] frame; delete a batch from the outbox when its seq comes back in an
//! [`Ack`]. With version 3 negotiated, report [`Health`] after Welcome and every 15 s. A new
//! connection needs a new [`DictEncoder`].
//!
//! # Server side
//!
//! [`decode`] each message, answer [`Hello`] with [`Welcome`], feed [`Dict`] frames to
//! [`DictDecoder::apply`] and turn [`Batch`] frames into outbox items with
//! [`DictDecoder::decode_batch`].

pub mod message;
pub mod packed;
use crate::model::aggregate::Aggregate;
use crate::model::{Alert, AlertState, SeriesInfo};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

// ---------------------------------------------------------------------------------------------
// What the outbox stores
// ---------------------------------------------------------------------------------------------

pub use crate::model::batch::{BatchKind, OutboxBatch, OutboxItem};

// ---------------------------------------------------------------------------------------------
// Constants
// ---------------------------------------------------------------------------------------------

/// First two bytes of every message.
pub const MAGIC: [u8; 2] = *b"EF";
/// The newest protocol version this module speaks (3 added the [`Health`] frame).
pub const PROTOCOL_VERSION: u16 = 3;
/// Every protocol version this module can speak, lowest first. A gateway offers them all in
/// Hello, so an older receiver (version 2 only) still takes its batches.
pub const SUPPORTED_VERSIONS: &[u16] = &[2, 3];
/// Envelope header length in bytes.
pub const HEADER_LEN: usize = 12;
/// Default largest body a receiver accepts (4 MiB).
pub const DEFAULT_MAX_FRAME: u32 = 4 * 1024 * 1024;
/// Most ranges a [`Welcome`] lists in `stored`.
pub const MAX_STORED_RANGES: usize = 1024;
/// Most dictionary entries one connection may define (bounds the server's memory).
pub const MAX_DICT_ENTRIES: usize = 1 << 20;

// ---------------------------------------------------------------------------------------------
// Frames
// ---------------------------------------------------------------------------------------------

/// Frame kind byte of the envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// [`Hello`]: the client introduces itself (first frame of a connection).
    Hello = 1,
    /// [`Welcome`]: the server's answer to Hello, with the negotiated version and limits.
    Welcome = 2,
    /// [`Dict`]: the client defines series ids for the rest of the connection.
    Dict = 3,
    /// [`Batch`]: one outbox batch, client → server.
    Batch = 4,
    /// [`Ack`]: the server has durably stored these batches.
    Ack = 5,
    /// [`Heartbeat`]: keep-alive, either direction.
    Heartbeat = 6,
    /// [`ErrorFrame`]: the last frame before closing, either direction.
    Error = 7,
    /// [`Health`]: the gateway's state, client → server (version 3).
    Health = 8,
}

impl FrameKind {
    /// The kind for an envelope byte, if known.
    pub fn from_byte(b: u8) -> Option<FrameKind> {
        Some(match b {
            1 => FrameKind::Hello,
            2 => FrameKind::Welcome,
            3 => FrameKind::Dict,
            4 => FrameKind::Batch,
            5 => FrameKind::Ack,
            6 => FrameKind::Heartbeat,
            7 => FrameKind::Error,
            8 => FrameKind::Health,
            _ => return None,
        })
    }
}

/// Client → server, first frame of a connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// Gateway id (`[A-Za-z0-9._-]`, 1..=128 bytes, not starting with `.`).
    pub gateway: String,
    /// Store epoch: random per gateway data directory.
    pub epoch: u64,
    /// Protocol versions the client speaks.
    pub versions: Vec<u16>,
    /// Oldest seq still in the outbox; every seq below is acknowledged or dropped.
    pub first_seq: u64,
    /// Client software, e.g. `edgeferry/0.1.0` (for logs).
    pub software: String,
}

/// Server → client, answer to [`Hello`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// The negotiated version: the highest one both sides speak (see [`negotiate`]).
    pub version: u16,
    /// Inclusive ranges of seqs `>= first_seq` already stored for (gateway, epoch), ascending,
    /// at most [`MAX_STORED_RANGES`] (the lowest ones).
    pub stored: Vec<(u64, u64)>,
    /// Most unacknowledged batches the client may have outstanding.
    pub max_in_flight: u32,
    /// Largest body the server accepts.
    pub max_frame: u32,
    /// Heartbeat interval; a peer silent for 3 intervals is dropped.
    pub heartbeat_secs: u32,
}

/// Client → server: series ids valid for the rest of the connection.
///
/// On the wire ([`DictWire`]) every distinct string (metric, tag key, tag value) appears
/// once in a string table and entries refer to it by index; the series key is not sent, as
/// it is derived from metric and tags ([`crate::model::series_key`]). A hundred sensors with
/// two tags then cost ~17 bytes each instead of ~83, which matters most for the MQTT upstream,
/// where every message carries the dictionary of its series.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(into = "DictWire", try_from = "DictWire")]
pub struct Dict {
    /// `(id, series)` pairs; every series' key is `series_key(metric, tags)`.
    pub entries: Vec<(u32, SeriesInfo)>,
}

/// The wire form of a [`Dict`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DictWire {
    /// Distinct strings, in order of first use.
    pub strings: Vec<String>,
    /// `(id, metric, [(tag key, tag value)])`, strings as indices into `strings`, tags in
    /// ascending key order.
    pub entries: Vec<DictWireEntry>,
}

/// `(series id, metric, [(tag key, tag value)])` of a [`DictWire`], strings as indices.
pub type DictWireEntry = (u32, u32, Vec<(u32, u32)>);

impl From<Dict> for DictWire {
    fn from(d: Dict) -> DictWire {
        let mut index: HashMap<String, u32> = HashMap::new();
        let mut strings = Vec::new();
        let mut intern = |s: String| -> u32 {
            *index.entry(s).or_insert_with_key(|s| {
                strings.push(s.clone());
                // A Dict holds far fewer than 2^32 strings (MAX_DICT_ENTRIES series).
                (strings.len() - 1) as u32
            })
        };
        let entries = d
            .entries
            .into_iter()
            .map(|(id, info)| {
                let metric = intern(info.metric);
                let tags = info
                    .tags
                    .into_iter()
                    .map(|(k, v)| (intern(k), intern(v)))
                    .collect();
                (id, metric, tags)
            })
            .collect();
        DictWire { strings, entries }
    }
}

/// Why a dictionary frame's table is inconsistent (it decoded, but cannot be meant).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DictError {
    /// An entry refers to a string the table does not have.
    #[error("string index {index} beyond the {strings} strings")]
    StringIndex {
        /// The index referred to.
        index: u32,
        /// How many strings the table has.
        strings: usize,
    },
    /// A series lists the same tag key twice (its key would be ambiguous).
    #[error("series {0} repeats a tag key")]
    RepeatedTag(u32),
}

impl TryFrom<DictWire> for Dict {
    type Error = DictError;

    fn try_from(w: DictWire) -> Result<Dict, DictError> {
        let get = |i: u32| {
            w.strings
                .get(i as usize)
                .cloned()
                .ok_or(DictError::StringIndex {
                    index: i,
                    strings: w.strings.len(),
                })
        };
        let mut entries = Vec::with_capacity(w.entries.len());
        for (id, metric, tag_refs) in &w.entries {
            let metric = get(*metric)?;
            let mut tags = BTreeMap::new();
            for (k, v) in tag_refs {
                if tags.insert(get(*k)?, get(*v)?).is_some() {
                    return Err(DictError::RepeatedTag(*id));
                }
            }
            let key = crate::model::series_key(&metric, &tags);
            entries.push((
                *id,
                SeriesInfo {
                    key,
                    metric,
                    tags: tags.into(),
                },
            ));
        }
        Ok(Dict { entries })
    }
}

/// Client → server: one outbox batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    /// Sequence number within the client's epoch.
    pub seq: u64,
    /// Which outbox lane the batch comes from; a batch never mixes the two.
    pub kind: BatchKind,
    /// When the batch was sealed (epoch ms); times in items are relative to it.
    pub created_ms: i64,
    /// The items, in runs of one kind (their order is kept).
    pub items: Vec<WireGroup>,
}

/// Server → client: these batches are durably stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// Seqs of batches now durably stored (redelivered ones too), which the gateway may
    /// delete from its outbox.
    pub seqs: Vec<u64>,
}

/// Either direction, every `heartbeat_secs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Sender's clock, epoch ms.
    pub time_ms: i64,
}

/// Client → server (version 3 and later): how the gateway is doing, sent right after
/// Welcome and then every 15 s, so the central side can tell which gateways are behind, and
/// why, without asking them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// Sender's clock when measured, epoch ms.
    pub time_ms: i64,
    /// Seconds since the gateway's daemon started.
    pub uptime_secs: u64,
    /// Outbox batches not yet acknowledged (both lanes).
    pub backlog_batches: u64,
    /// Bytes the outbox holds on disk (acknowledged batches not yet freed included).
    pub backlog_bytes: u64,
    /// Age of the oldest unacknowledged batch, seconds; `None` when there is none.
    pub oldest_secs: Option<u64>,
    /// Whether the gateway is connected to its local MQTT broker.
    pub broker_connected: bool,
    /// Gateway software, e.g. `edgeferry/0.1.0`.
    pub software: String,
}

/// Why a connection is being closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// Bad or missing credentials.
    Unauthorized,
    /// No common protocol version, or an envelope version the receiver does not speak.
    UnsupportedVersion,
    /// The message could not be decoded or was not expected in this state.
    Malformed,
    /// The body exceeds `max_frame`.
    TooLarge,
    /// A batch referenced a series id no [`Dict`] defined.
    UnknownSeries,
    /// The receiver failed (e.g. storage); retry later.
    Internal,
}

/// Either direction, last frame before closing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorFrame {
    /// Machine-readable reason; the receiving side reports it together with `message`.
    pub code: ErrorCode,
    /// Human-readable detail for logs (e.g. the offered versions); not meant to be parsed.
    pub message: String,
}

/// Any frame: what [`decode`] returns and [`encode`] takes.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// Client → server, first frame; see [`Hello`].
    Hello(Hello),
    /// Server → client, answer to Hello; see [`Welcome`].
    Welcome(Welcome),
    /// Client → server, series ids for the following batches; see [`Dict`].
    Dict(Dict),
    /// Client → server, one outbox batch; see [`Batch`].
    Batch(Batch),
    /// Server → client, batches durably stored; see [`Ack`].
    Ack(Ack),
    /// Either direction, keep-alive; see [`Heartbeat`].
    Heartbeat(Heartbeat),
    /// Either direction, last frame before closing; see [`ErrorFrame`].
    Error(ErrorFrame),
    /// Client → server, the gateway's state (version 3); see [`Health`].
    Health(Health),
}

impl Frame {
    /// The envelope kind of this frame.
    pub fn kind(&self) -> FrameKind {
        match self {
            Frame::Hello(_) => FrameKind::Hello,
            Frame::Welcome(_) => FrameKind::Welcome,
            Frame::Dict(_) => FrameKind::Dict,
            Frame::Batch(_) => FrameKind::Batch,
            Frame::Ack(_) => FrameKind::Ack,
            Frame::Heartbeat(_) => FrameKind::Heartbeat,
            Frame::Error(_) => FrameKind::Error,
            Frame::Health(_) => FrameKind::Health,
        }
    }

    /// Shorthand for an [`ErrorFrame`].
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Frame {
        Frame::Error(ErrorFrame {
            code,
            message: message.into(),
        })
    }
}

/// A run of consecutive items of a [`Batch`] on the wire. Enum discriminants are part of
/// the format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WireGroup {
    /// Aggregates, packed in columns (see [`packed`]); at most
    /// [`packed::MAX_ROWS`] per group.
    Aggregates(Vec<u8>),
    /// Alerts, each naming its series by dictionary id.
    Alerts(Vec<WireAlert>),
}

/// An alert on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireAlert {
    /// Name of the `[[rules]]` entry that raised or cleared it.
    pub rule: String,
    /// Dictionary id of the series.
    pub series: u32,
    /// Raised or cleared.
    pub state: AlertState,
    /// The value that triggered it; none for silence alerts.
    pub value: Option<f64>,
    /// Alert time minus the batch's `created_ms`.
    pub time_dt_ms: i64,
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Why a message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// Shorter than the envelope header.
    #[error("message of {0} bytes is shorter than the {HEADER_LEN}-byte envelope header")]
    Truncated(usize),
    /// The first two bytes are not `EF`.
    #[error("bad magic {0:02x?} (expected \"EF\")")]
    BadMagic([u8; 2]),
    /// Envelope version not spoken here.
    #[error("unsupported protocol version {0} in envelope")]
    UnsupportedVersion(u8),
    /// Body longer than allowed.
    #[error("frame body of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Declared body length.
        len: u64,
        /// The receiver's `max_frame` limit, bytes.
        max: u32,
    },
    /// The declared body length does not match the message.
    #[error("envelope declares a {declared}-byte body but {actual} bytes follow the header")]
    LengthMismatch {
        /// Body length the envelope declares, bytes.
        declared: u32,
        /// Bytes actually following the envelope header.
        actual: usize,
    },
    /// The body's CRC-32 differs from the envelope's: the bytes were damaged on the way.
    #[error("body CRC-32 mismatch (envelope {expected:08x}, computed {actual:08x})")]
    BadCrc {
        /// CRC-32 the envelope declares.
        expected: u32,
        /// CRC-32 computed over the body as received.
        actual: u32,
    },
    /// Frame kind byte not known.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// The body does not decode as the frame's type, or its content is invalid.
    #[error("malformed {kind:?} body: {reason}")]
    Malformed {
        /// The frame kind being decoded.
        kind: FrameKind,
        /// The postcard (or packed-column) decoder's complaint.
        reason: String,
    },
    /// A batch references an undefined dictionary id.
    #[error("batch references series id {0}, which no Dict frame defined")]
    UnknownSeries(u32),
    /// A dictionary redefines an id differently, or grows too large.
    #[error("bad dictionary: {0}")]
    BadDict(String),
}

impl ProtocolError {
    /// The [`ErrorCode`] to send to the peer for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtocolError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            ProtocolError::TooLarge { .. } => ErrorCode::TooLarge,
            ProtocolError::UnknownSeries(_) => ErrorCode::UnknownSeries,
            _ => ErrorCode::Malformed,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Envelope
// ---------------------------------------------------------------------------------------------

fn body_of(frame: &Frame) -> Vec<u8> {
    let r = match frame {
        Frame::Hello(f) => postcard::to_stdvec(f),
        Frame::Welcome(f) => postcard::to_stdvec(f),
        Frame::Dict(f) => postcard::to_stdvec(f),
        Frame::Batch(f) => postcard::to_stdvec(f),
        Frame::Ack(f) => postcard::to_stdvec(f),
        Frame::Heartbeat(f) => postcard::to_stdvec(f),
        Frame::Error(f) => postcard::to_stdvec(f),
        Frame::Health(f) => postcard::to_stdvec(f),
    };
    // postcard only fails for types it cannot represent (none here) or a full buffer
    // (a Vec grows).
    r.expect("postcard serialization of protocol frames is infallible")
}

/// Encodes a frame into one WebSocket message (envelope + postcard body).
///
/// Bodies above 4 GiB cannot be framed; the forwarder keeps batches far below the peer's
/// `max_frame` anyway (check the returned length against it).
pub fn encode(frame: &Frame) -> Vec<u8> {
    let body = body_of(frame);
    let len = u32::try_from(body.len()).expect("frame bodies are far below 4 GiB");
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&MAGIC);
    // The version byte names the version that defined the body (PROTOCOL.md §8): Hello and
    // Error are the same in every version (1, so any receiver reads them); version 3 only
    // added Health, so the other frames stay version 2 and a version 2 receiver reads them.
    let version = match frame {
        Frame::Hello(_) | Frame::Error(_) => 1,
        Frame::Health(_) => 3,
        _ => 2,
    };
    out.push(version as u8);
    out.push(frame.kind() as u8);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

fn body<'a, T: Deserialize<'a>>(kind: FrameKind, bytes: &'a [u8]) -> Result<T, ProtocolError> {
    // take_from_bytes: bytes after the known fields are ignored (append-only evolution).
    postcard::take_from_bytes(bytes)
        .map(|(v, _rest)| v)
        .map_err(|e| ProtocolError::Malformed {
            kind,
            reason: e.to_string(),
        })
}

/// Decodes one WebSocket message. Checks, in order: header length, magic, version, body
/// length against `max_frame`, declared against actual length, CRC, kind, body.
pub fn decode(msg: &[u8], max_frame: u32) -> Result<Frame, ProtocolError> {
    if msg.len() < HEADER_LEN {
        return Err(ProtocolError::Truncated(msg.len()));
    }
    let magic = [msg[0], msg[1]];
    if magic != MAGIC {
        return Err(ProtocolError::BadMagic(magic));
    }
    let version = msg[2];
    // Version 1 envelopes are read for the frames whose bodies did not change (a Hello of
    // an older gateway gets an UnsupportedVersion answer, not a malformed-frame one); a
    // version 1 Batch is not (its rows were laid out differently).
    if version != 1 && !SUPPORTED_VERSIONS.contains(&u16::from(version)) {
        return Err(ProtocolError::UnsupportedVersion(version));
    }
    let kind_byte = msg[3];
    let len = u32::from_le_bytes([msg[4], msg[5], msg[6], msg[7]]);
    let crc = u32::from_le_bytes([msg[8], msg[9], msg[10], msg[11]]);
    if len > max_frame {
        return Err(ProtocolError::TooLarge {
            len: u64::from(len),
            max: max_frame,
        });
    }
    let body_bytes = &msg[HEADER_LEN..];
    if body_bytes.len() != len as usize {
        return Err(ProtocolError::LengthMismatch {
            declared: len,
            actual: body_bytes.len(),
        });
    }
    let actual = crc32fast::hash(body_bytes);
    if actual != crc {
        return Err(ProtocolError::BadCrc {
            expected: crc,
            actual,
        });
    }
    let kind = FrameKind::from_byte(kind_byte).ok_or(ProtocolError::UnknownKind(kind_byte))?;
    if kind == FrameKind::Batch && version == 1 {
        return Err(ProtocolError::UnsupportedVersion(version));
    }
    Ok(match kind {
        FrameKind::Hello => Frame::Hello(body(kind, body_bytes)?),
        FrameKind::Welcome => Frame::Welcome(body(kind, body_bytes)?),
        FrameKind::Dict => Frame::Dict(body(kind, body_bytes)?),
        FrameKind::Batch => Frame::Batch(body(kind, body_bytes)?),
        FrameKind::Ack => Frame::Ack(body(kind, body_bytes)?),
        FrameKind::Heartbeat => Frame::Heartbeat(body(kind, body_bytes)?),
        FrameKind::Error => Frame::Error(body(kind, body_bytes)?),
        FrameKind::Health => Frame::Health(body(kind, body_bytes)?),
    })
}

/// The version both sides speak: the highest one in both lists.
pub fn negotiate(ours: &[u16], theirs: &[u16]) -> Option<u16> {
    ours.iter().filter(|v| theirs.contains(v)).max().copied()
}

/// Whether `id` is acceptable as a gateway id (it names the collector's output file).
pub fn valid_gateway_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

// ---------------------------------------------------------------------------------------------
// Dictionary coding of batches
// ---------------------------------------------------------------------------------------------

/// Client side, one per connection: assigns series ids and turns outbox batches into frames.
#[derive(Debug, Default)]
pub struct DictEncoder {
    /// By the series key alone, which is the series' identity everywhere in the pipeline: a
    /// whole [`SeriesInfo`] per entry (its tag map is a B-tree node of ~0.5 KiB) cost 5.4 MiB
    /// of the gateway's peak heap at 10,000 series (heaptrack, `benches/flash.rs`).
    ids: HashMap<Box<str>, u32>,
}

impl DictEncoder {
    /// A fresh dictionary (use one per connection).
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of series defined so far on this connection.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether no series has been defined yet.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    fn id_of(&mut self, series: &SeriesInfo, new: &mut Vec<(u32, SeriesInfo)>) -> u32 {
        if let Some(&id) = self.ids.get(series.key.as_str()) {
            return id;
        }
        // Ids are dense from 0; more than u32::MAX series on one connection is impossible
        // (the server refuses far fewer, MAX_DICT_ENTRIES).
        let id = u32::try_from(self.ids.len()).expect("fewer than 2^32 series per connection");
        self.ids.insert(series.key.as_str().into(), id);
        new.push((id, series.clone()));
        id
    }

    /// Encodes `batch` as seq `seq`. Returns the [`Dict`] frame of series not yet defined on
    /// this connection (send it first) and the [`Batch`] frame.
    pub fn encode_batch(&mut self, seq: u64, batch: &OutboxBatch) -> (Option<Frame>, Frame) {
        let mut new = Vec::new();
        let created_ms = batch.created_ms;
        let mut items = Vec::new();
        let mut rows: Vec<packed::Row> = Vec::new();
        let mut alerts: Vec<WireAlert> = Vec::new();
        let splits = window_length_splits(&batch.items);
        for (item, split) in batch.items.iter().zip(splits) {
            match item {
                OutboxItem::Aggregate {
                    series,
                    window_start_ms,
                    window_secs,
                    version,
                    agg,
                } => {
                    if !alerts.is_empty() {
                        items.push(WireGroup::Alerts(std::mem::take(&mut alerts)));
                    }
                    if rows.len() == packed::MAX_ROWS || split {
                        items.push(WireGroup::Aggregates(packed::encode(&rows, created_ms)));
                        rows.clear();
                    }
                    rows.push(packed::Row {
                        series: self.id_of(series, &mut new),
                        window_start_ms: *window_start_ms,
                        window_secs: *window_secs,
                        version: *version,
                        agg: agg.to_parts(),
                    });
                }
                OutboxItem::Alert(a) => {
                    if !rows.is_empty() {
                        items.push(WireGroup::Aggregates(packed::encode(&rows, created_ms)));
                        rows.clear();
                    }
                    let info = SeriesInfo {
                        key: a.series.clone(),
                        metric: a.metric.clone(),
                        tags: (&a.tags).into(),
                    };
                    alerts.push(WireAlert {
                        rule: a.rule.clone(),
                        series: self.id_of(&info, &mut new),
                        state: a.state,
                        value: a.value,
                        time_dt_ms: a.time_ms.wrapping_sub(created_ms),
                    });
                }
            }
        }
        if !rows.is_empty() {
            items.push(WireGroup::Aggregates(packed::encode(&rows, created_ms)));
        }
        if !alerts.is_empty() {
            items.push(WireGroup::Alerts(alerts));
        }
        let dict = (!new.is_empty()).then_some(Frame::Dict(Dict { entries: new }));
        let frame = Frame::Batch(Batch {
            seq,
            kind: batch.kind,
            created_ms,
            items,
        });
        (dict, frame)
    }
}

/// Where a new packed group should start: before an aggregate whose window length differs
/// from the previous aggregate's, when both runs are long enough to pay for a group's column
/// headers (~60 bytes). Within a group of one window length, window, count and time columns
/// are nearly constant and cost almost nothing per aggregate; mixed, they cost ~4 bytes.
fn window_length_splits(items: &[OutboxItem]) -> Vec<bool> {
    const MIN_RUN: usize = 16;
    let secs = |item: &OutboxItem| match item {
        OutboxItem::Aggregate { window_secs, .. } => Some(*window_secs),
        OutboxItem::Alert(_) => None,
    };
    // Length of the run of equal window lengths each item is in.
    let mut run_of = vec![0usize; items.len()];
    let mut start = 0;
    for i in 1..=items.len() {
        if i == items.len() || secs(&items[i]) != secs(&items[start]) {
            run_of[start..i].fill(i - start);
            start = i;
        }
    }
    (0..items.len())
        .map(|i| {
            i > 0
                && secs(&items[i]).is_some()
                && secs(&items[i - 1]).is_some()
                && secs(&items[i]) != secs(&items[i - 1])
                && run_of[i] >= MIN_RUN
                && run_of[i - 1] >= MIN_RUN
        })
        .collect()
}

/// Server side, one per connection: the dictionary the client defined.
#[derive(Debug, Default)]
pub struct DictDecoder {
    /// Shared with the items decoded (one copy per series, not one per aggregate).
    series: HashMap<u32, Arc<SeriesInfo>>,
}

impl DictDecoder {
    /// An empty dictionary.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a [`Dict`] frame's entries. Redefining an id with a different series, or growing
    /// beyond [`MAX_DICT_ENTRIES`], is an error.
    pub fn apply(&mut self, dict: &Dict) -> Result<(), ProtocolError> {
        for (id, info) in &dict.entries {
            match self.series.get(id) {
                Some(existing) if **existing == *info => {}
                Some(_) => {
                    return Err(ProtocolError::BadDict(format!(
                        "series id {id} redefined with a different series"
                    )));
                }
                None => {
                    if self.series.len() >= MAX_DICT_ENTRIES {
                        return Err(ProtocolError::BadDict(format!(
                            "more than {MAX_DICT_ENTRIES} series on one connection"
                        )));
                    }
                    self.series.insert(*id, Arc::new(info.clone()));
                }
            }
        }
        Ok(())
    }

    fn get(&self, id: u32) -> Result<&Arc<SeriesInfo>, ProtocolError> {
        self.series.get(&id).ok_or(ProtocolError::UnknownSeries(id))
    }

    /// Turns a [`Batch`] frame back into outbox items (exactly the items that were encoded).
    pub fn decode_batch(&self, batch: &Batch) -> Result<Vec<OutboxItem>, ProtocolError> {
        let created_ms = batch.created_ms;
        let mut out = Vec::new();
        for group in &batch.items {
            match group {
                WireGroup::Aggregates(bytes) => {
                    let rows = packed::decode(bytes, created_ms).map_err(|e| {
                        ProtocolError::Malformed {
                            kind: FrameKind::Batch,
                            reason: e.to_string(),
                        }
                    })?;
                    for row in rows {
                        out.push(OutboxItem::Aggregate {
                            series: self.get(row.series)?.clone(),
                            window_start_ms: row.window_start_ms,
                            window_secs: row.window_secs,
                            version: row.version,
                            agg: Aggregate::from_parts(row.agg),
                        });
                    }
                }
                WireGroup::Alerts(alerts) => {
                    for w in alerts {
                        let s = self.get(w.series)?;
                        out.push(OutboxItem::Alert(Alert {
                            rule: w.rule.clone(),
                            series: s.key.clone(),
                            metric: s.metric.clone(),
                            tags: s.tags.to_map(),
                            state: w.state,
                            value: w.value,
                            time_ms: w.time_dt_ms.wrapping_add(created_ms),
                        }));
                    }
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn series_info() -> impl Strategy<Value = SeriesInfo> {
        (
            "[a-z]{1,6}",
            prop::collection::btree_map("[a-z]{1,3}", "[a-z0-9]{0,4}", 0..3),
        )
            .prop_map(|(metric, tags)| SeriesInfo {
                key: crate::model::series_key(&metric, &tags),
                metric,
                tags: tags.into(),
            })
    }

    use crate::model::aggregate::{MAX_MANTISSA, decimal_value};

    fn aggregate() -> impl Strategy<Value = Aggregate> {
        prop::collection::vec(
            (
                prop_oneof![
                    -1e6f64..1e6,
                    Just(0.0),
                    Just(-0.0),
                    1e-12f64..1e-6,
                    -1e12f64..1e12,
                    // What sensors send: decimals, the exact (column-packed integer) case.
                    (-10_000_000i64..10_000_000, 0u8..=4).prop_map(|(k, s)| decimal_value(k, s)),
                    (-MAX_MANTISSA..=MAX_MANTISSA, 0u8..=15).prop_map(|(k, s)| decimal_value(k, s)),
                ],
                -70_000i64..70_000,
            ),
            0..60,
        )
        .prop_map(|rs| {
            let mut agg = Aggregate::new();
            for (v, t) in rs {
                agg.add(v, 1_764_000_000_000 + t);
            }
            agg
        })
    }

    fn item(pool: Vec<SeriesInfo>) -> impl Strategy<Value = OutboxItem> {
        let n = pool.len();
        let pool2 = pool.clone();
        prop_oneof![
            (
                0..n,
                prop_oneof![
                    (1_763_000_000i64..1_765_000_000).prop_map(|s| s * 1000),
                    any::<i64>(),
                ],
                any::<u32>(),
                any::<u32>(),
                aggregate()
            )
                .prop_map(move |(i, start, secs, version, agg)| {
                    OutboxItem::Aggregate {
                        series: std::sync::Arc::new(pool[i].clone()),
                        window_start_ms: start,
                        window_secs: secs,
                        version,
                        agg,
                    }
                }),
            (
                0..n,
                "[a-z ]{0,10}",
                any::<bool>(),
                prop::option::of(-1e9f64..1e9),
                any::<i64>()
            )
                .prop_map(move |(i, rule, raised, value, time_ms)| {
                    let s = &pool2[i];
                    OutboxItem::Alert(Alert {
                        rule,
                        series: s.key.clone(),
                        metric: s.metric.clone(),
                        tags: s.tags.to_map(),
                        state: if raised {
                            AlertState::Raised
                        } else {
                            AlertState::Cleared
                        },
                        value,
                        time_ms,
                    })
                }),
        ]
    }

    fn batches() -> impl Strategy<Value = Vec<OutboxBatch>> {
        prop::collection::vec(series_info(), 1..6).prop_flat_map(|pool| {
            prop::collection::vec(
                (
                    prop_oneof![Just(BatchKind::Aggregates), Just(BatchKind::Alerts)],
                    prop_oneof![1_764_000_000_000i64..1_764_000_100_000, any::<i64>()],
                    prop::collection::vec(item(pool.clone()), 0..8),
                )
                    .prop_map(|(kind, created_ms, items)| OutboxBatch {
                        kind,
                        created_ms,
                        items,
                    }),
                1..5,
            )
        })
    }

    proptest! {
        #[test]
        fn outbox_batches_round_trip_exactly_through_the_wire(bs in batches()) {
            let mut enc = DictEncoder::new();
            let mut dec = DictDecoder::new();
            for (i, b) in bs.iter().enumerate() {
                let seq = 1000 + i as u64;
                let (dict, frame) = enc.encode_batch(seq, b);
                if let Some(d) = dict {
                    let Frame::Dict(d) = decode(&encode(&d), DEFAULT_MAX_FRAME).unwrap() else {
                        panic!("not a Dict");
                    };
                    dec.apply(&d).unwrap();
                }
                let Frame::Batch(w) = decode(&encode(&frame), DEFAULT_MAX_FRAME).unwrap() else {
                    panic!("not a Batch");
                };
                prop_assert_eq!(w.seq, seq);
                let back = OutboxBatch {
                    kind: w.kind,
                    created_ms: w.created_ms,
                    items: dec.decode_batch(&w).unwrap(),
                };
                prop_assert_eq!(&back, b);
            }
        }

        #[test]
        fn decode_never_panics_on_garbage(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes, 1024);
        }

        #[test]
        fn decode_never_panics_on_corrupted_bodies(
            bs in batches(), flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..4)
        ) {
            let (_, frame) = DictEncoder::new().encode_batch(1, &bs[0]);
            let mut msg = encode(&frame);
            for (at, x) in flips {
                let i = HEADER_LEN + at % (msg.len() - HEADER_LEN).max(1);
                if i < msg.len() {
                    msg[i] ^= x | 1;
                }
            }
            // Fix the CRC so the body decoder itself sees the damage.
            let crc = crc32fast::hash(&msg[HEADER_LEN..]);
            msg[8..12].copy_from_slice(&crc.to_le_bytes());
            let _ = decode(&msg, DEFAULT_MAX_FRAME);
        }
    }

    fn all_frames() -> Vec<Frame> {
        vec![
            Frame::Hello(Hello {
                gateway: "gw-1".into(),
                epoch: 0x0123_4567_89ab_cdef,
                versions: vec![1],
                first_seq: 42,
                software: "edgeferry/0.1.0".into(),
            }),
            Frame::Welcome(Welcome {
                version: 1,
                stored: vec![(42, 44), (50, 50)],
                max_in_flight: 64,
                max_frame: DEFAULT_MAX_FRAME,
                heartbeat_secs: 15,
            }),
            Frame::Dict(Dict {
                entries: vec![(
                    0,
                    SeriesInfo {
                        key: "t".into(),
                        metric: "t".into(),
                        tags: BTreeMap::new().into(),
                    },
                )],
            }),
            Frame::Ack(Ack {
                seqs: vec![3, 1, 2],
            }),
            Frame::Heartbeat(Heartbeat { time_ms: -5 }),
            Frame::error(ErrorCode::UnknownSeries, "id 7"),
        ]
    }

    #[test]
    fn every_frame_kind_round_trips() {
        for f in all_frames() {
            assert_eq!(decode(&encode(&f), DEFAULT_MAX_FRAME).unwrap(), f);
        }
    }

    #[test]
    fn envelope_errors_are_detected_in_order() {
        let msg = encode(&Frame::Heartbeat(Heartbeat { time_ms: 1 }));
        assert_eq!(decode(&msg[..5], 100), Err(ProtocolError::Truncated(5)));
        let mut m = msg.clone();
        m[0] = b'X';
        assert!(matches!(decode(&m, 100), Err(ProtocolError::BadMagic(_))));
        let mut m = msg.clone();
        m[2] = 9;
        assert_eq!(decode(&m, 100), Err(ProtocolError::UnsupportedVersion(9)));
        assert!(matches!(
            decode(&msg, 0),
            Err(ProtocolError::TooLarge { .. })
        ));
        let mut m = msg.clone();
        m.push(0);
        assert!(matches!(
            decode(&m, 100),
            Err(ProtocolError::LengthMismatch { .. })
        ));
        let mut m = msg.clone();
        *m.last_mut().unwrap() ^= 0x40;
        assert!(matches!(decode(&m, 100), Err(ProtocolError::BadCrc { .. })));
        let mut m = msg.clone();
        m[3] = 200;
        assert_eq!(decode(&m, 100), Err(ProtocolError::UnknownKind(200)));
        assert_eq!(ProtocolError::UnknownKind(200).code(), ErrorCode::Malformed);
    }

    #[test]
    fn appended_fields_are_ignored_by_older_decoders() {
        let f = Frame::Heartbeat(Heartbeat { time_ms: 7 });
        let mut body = postcard::to_stdvec(&Heartbeat { time_ms: 7 }).unwrap();
        body.extend_from_slice(&[1, 2, 3]); // a field a later version appended
        let mut msg = encode(&f)[..4].to_vec();
        msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
        msg.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        msg.extend_from_slice(&body);
        assert_eq!(decode(&msg, 100).unwrap(), f);
    }

    #[test]
    fn envelopes_match_the_documented_hex_examples() {
        // docs/PROTOCOL.md, "Worked examples".
        let hex = |f: &Frame| -> String { encode(f).iter().map(|b| format!("{b:02x}")).collect() };
        let heartbeat = Frame::Heartbeat(Heartbeat {
            time_ms: 1_764_000_000_000,
        });
        assert_eq!(hex(&heartbeat), "4546020606000000fa39c44f80a0bfe9d666");
        let ack = Frame::Ack(Ack { seqs: vec![5, 300] });
        assert_eq!(hex(&ack), "4546020504000000b5473a610205ac02");
        let hello = Frame::Hello(Hello {
            gateway: "gw-1".into(),
            epoch: 7,
            versions: vec![1],
            first_seq: 42,
            software: "ef/0.1".into(),
        });
        assert_eq!(
            hex(&hello),
            "4546010110000000fe6b85070467772d310701012a0665662f302e31"
        );
        let body = &encode(&hello)[HEADER_LEN..];
        assert_eq!(body, b"\x04gw-1\x07\x01\x01\x2a\x06ef/0.1");
    }

    #[test]
    fn long_runs_of_one_window_length_get_their_own_packed_group() {
        let item = |series: usize, secs: u32| {
            let mut agg = Aggregate::new();
            agg.add(21.5, 1_764_000_000_000);
            OutboxItem::Aggregate {
                series: std::sync::Arc::new(SeriesInfo {
                    key: format!("t{{d={series}}}"),
                    metric: "t".into(),
                    tags: BTreeMap::from([("d".to_string(), series.to_string())]).into(),
                }),
                window_start_ms: 1_764_000_000_000,
                window_secs: secs,
                version: 1,
                agg,
            }
        };
        let groups = |items: Vec<OutboxItem>| {
            let batch = OutboxBatch {
                kind: BatchKind::Aggregates,
                created_ms: 1_764_000_070_000,
                items,
            };
            let mut enc = DictEncoder::new();
            let mut dec = DictDecoder::new();
            let (dict, frame) = enc.encode_batch(1, &batch);
            let (Some(Frame::Dict(dict)), Frame::Batch(b)) = (dict, frame) else {
                panic!("expected a dictionary and a batch")
            };
            dec.apply(&dict).unwrap();
            assert_eq!(dec.decode_batch(&b).unwrap(), batch.items, "order is kept");
            b.items.len()
        };
        let long: Vec<OutboxItem> = (0..40)
            .map(|s| item(s, if s < 20 { 10 } else { 60 }))
            .collect();
        assert_eq!(groups(long), 2);
        // Short runs (corrections of a few windows) stay in one group: a group's column
        // headers would cost more than mixing saves.
        let short: Vec<OutboxItem> = (0..40).map(|s| item(s, [10, 60][s % 2])).collect();
        assert_eq!(groups(short), 1);
    }

    #[test]
    fn version_3_adds_health_and_leaves_every_other_body_readable_by_version_2() {
        let health = Health {
            time_ms: 1_764_000_000_000,
            uptime_secs: 3600,
            backlog_batches: 12,
            backlog_bytes: 34_567,
            oldest_secs: Some(90),
            broker_connected: false,
            software: "edgeferry/0.1.0".into(),
        };
        let bytes = encode(&Frame::Health(health.clone()));
        assert_eq!((bytes[2], bytes[3]), (3, 8), "version 3, kind 8");
        assert_eq!(decode(&bytes, 1024).unwrap(), Frame::Health(health));
        // What a version 2 receiver reads: every frame but Health says version 2 (or 1).
        let ack = encode(&Frame::Ack(Ack { seqs: vec![1] }));
        let hb = encode(&Frame::Heartbeat(Heartbeat { time_ms: 1 }));
        assert_eq!((ack[2], hb[2]), (2, 2));
        // A gateway offers both; an old collector (2 only) and a new one agree on their best.
        assert_eq!(negotiate(&[2], SUPPORTED_VERSIONS), Some(2));
        assert_eq!(negotiate(SUPPORTED_VERSIONS, SUPPORTED_VERSIONS), Some(3));
        assert_eq!(negotiate(SUPPORTED_VERSIONS, &[2]), Some(2));
    }

    #[test]
    fn hello_says_version_1_and_a_version_1_batch_is_refused() {
        let hello = encode(&Frame::Hello(Hello {
            gateway: "gw".into(),
            epoch: 1,
            versions: vec![1],
            first_seq: 0,
            software: "old".into(),
        }));
        assert_eq!(hello[2], 1);
        assert!(matches!(decode(&hello, 1024), Ok(Frame::Hello(_))));
        let batch = Frame::Batch(Batch {
            seq: 1,
            kind: BatchKind::Aggregates,
            created_ms: 0,
            items: vec![],
        });
        let mut msg = encode(&batch);
        assert_eq!(msg[2], 2);
        assert_eq!(decode(&msg, 1024), Ok(batch));
        msg[2] = 1;
        assert_eq!(
            decode(&msg, 1024),
            Err(ProtocolError::UnsupportedVersion(1))
        );
    }

    #[test]
    fn negotiation_picks_the_highest_common_version() {
        assert_eq!(negotiate(&[1, 2, 3], &[2, 3, 4]), Some(3));
        assert_eq!(negotiate(&[1], &[2]), None);
        assert_eq!(negotiate(SUPPORTED_VERSIONS, &[1]), None);
        assert_eq!(negotiate(SUPPORTED_VERSIONS, &[1, 2]), Some(2));
    }

    #[test]
    fn dictionary_strings_travel_once_and_bad_references_are_malformed() {
        let info = |device: &str| {
            let tags = BTreeMap::from([
                ("device".to_string(), device.to_string()),
                ("site".to_string(), "plant-a".to_string()),
            ]);
            SeriesInfo {
                key: crate::model::series_key("temperature", &tags),
                metric: "temperature".into(),
                tags: tags.into(),
            }
        };
        let dict = Frame::Dict(Dict {
            entries: (0..100)
                .map(|i| (i, info(&format!("dev-{i:03}"))))
                .collect(),
        });
        let bytes = encode(&dict);
        assert_eq!(decode(&bytes, 1 << 20).unwrap(), dict);
        // "temperature", "device", "site", "plant-a" once; per series its id, 3 references
        // and its own device name.
        assert!(bytes.len() < 100 * 17, "{} bytes", bytes.len());

        let bad_index = DictWire {
            strings: vec!["t".into()],
            entries: vec![(0, 5, vec![])],
        };
        let repeated_key = DictWire {
            strings: vec!["t".into(), "k".into()],
            entries: vec![(0, 0, vec![(1, 0), (1, 1)])],
        };
        for wire in [bad_index, repeated_key] {
            let body = postcard::to_stdvec(&wire).unwrap();
            let mut msg =
                encode(&Frame::Heartbeat(Heartbeat { time_ms: 0 }))[..HEADER_LEN].to_vec();
            msg[3] = FrameKind::Dict as u8;
            msg[4..8].copy_from_slice(&(body.len() as u32).to_le_bytes());
            msg[8..12].copy_from_slice(&crc32fast::hash(&body).to_le_bytes());
            msg.extend_from_slice(&body);
            assert!(
                matches!(decode(&msg, 1024), Err(ProtocolError::Malformed { .. })),
                "{wire:?}"
            );
        }
    }

    #[test]
    fn dictionary_rejects_redefinition_and_unknown_ids() {
        let s = |k: &str| SeriesInfo {
            key: crate::model::series_key(k, &BTreeMap::new()),
            metric: k.into(),
            tags: BTreeMap::new().into(),
        };
        let mut d = DictDecoder::new();
        d.apply(&Dict {
            entries: vec![(0, s("a"))],
        })
        .unwrap();
        d.apply(&Dict {
            entries: vec![(0, s("a"))],
        })
        .unwrap();
        assert!(
            d.apply(&Dict {
                entries: vec![(0, s("b"))]
            })
            .is_err()
        );
        let batch = Batch {
            seq: 1,
            kind: BatchKind::Alerts,
            created_ms: 0,
            items: vec![WireGroup::Alerts(vec![WireAlert {
                rule: "r".into(),
                series: 9,
                state: AlertState::Raised,
                value: None,
                time_dt_ms: 0,
            }])],
        };
        assert_eq!(d.decode_batch(&batch), Err(ProtocolError::UnknownSeries(9)));
    }

    #[test]
    fn gateway_ids_are_restricted_to_safe_file_names() {
        assert!(valid_gateway_id("gw-01.site_a"));
        for bad in ["", ".hidden", "a/b", "..", "a b", "é", &"x".repeat(129)] {
            assert!(!valid_gateway_id(bad), "{bad:?}");
        }
    }

    /// Bytes per aggregate for 1 Hz sensors, against ~52-byte raw JSON readings.
    #[test]
    fn wire_size_of_one_hertz_aggregates() {
        const RAW_READING_JSON: usize = 52;
        const SERIES: usize = 100;
        type Signal = fn(usize, i64) -> f64;
        let signals: [(&str, Signal); 2] = [
            ("temperature 21.5±0.5, 2 decimals", |s, i| {
                let v = 21.5 + 0.5 * ((i as f64) * 0.7 + s as f64).sin() + 0.01 * i as f64;
                (v * 100.0).round() / 100.0
            }),
            ("spread over 20..30 in sixths (no decimal form)", |s, i| {
                20.0 + ((i * 7919 + s as i64) % 60) as f64 / 6.0
            }),
        ];
        let start_ms = 1_764_000_000_000i64;
        for (name, signal) in signals {
            for secs in [10u32, 60] {
                let items: Vec<OutboxItem> = (0..SERIES)
                    .map(|s| {
                        let mut agg = Aggregate::new();
                        for i in 0..i64::from(secs) {
                            // Sensors are not phase-aligned with the window.
                            agg.add(signal(s, i), start_ms + i * 1000 + (s as i64 * 37) % 1000);
                        }
                        let mut tags = BTreeMap::new();
                        tags.insert("device".to_string(), format!("dev-{s:03}"));
                        tags.insert("site".to_string(), "plant-a".to_string());
                        OutboxItem::Aggregate {
                            series: std::sync::Arc::new(SeriesInfo {
                                key: crate::model::series_key("temperature", &tags),
                                metric: "temperature".into(),
                                tags: tags.into(),
                            }),
                            window_start_ms: start_ms,
                            window_secs: secs,
                            version: 1,
                            agg,
                        }
                    })
                    .collect();
                let batch = OutboxBatch {
                    kind: BatchKind::Aggregates,
                    created_ms: start_ms + i64::from(secs) * 1000 + 2500,
                    items,
                };
                let mut enc = DictEncoder::new();
                let (dict, first) = enc.encode_batch(1, &batch);
                let dict_len = encode(&dict.unwrap()).len();
                let first_len = encode(&first).len();
                // Steady state: the same series again, dictionary already sent.
                let (none, steady) = enc.encode_batch(2, &batch);
                assert!(none.is_none());
                let steady_len = encode(&steady).len();
                let per_agg = steady_len as f64 / SERIES as f64;
                let raw = RAW_READING_JSON as f64 * f64::from(secs);
                println!(
                    "{name}, {secs} s windows, {SERIES} series per batch: \
                     {per_agg:.1} bytes/aggregate steady state ({:.2} bytes per raw reading, \
                     {:.1}% of {raw:.0} raw JSON bytes); first batch {:.1} bytes/aggregate \
                     including the {dict_len}-byte Dict",
                    per_agg / f64::from(secs),
                    100.0 * per_agg / raw,
                    (first_len + dict_len) as f64 / SERIES as f64,
                );
                // Decimal readings pack into a few bits per column; values like 20 + 1/6
                // have no decimal form and travel as raw f64 (the fallback).
                let bound = if name.contains("decimals") {
                    12.0
                } else {
                    80.0
                };
                assert!(per_agg < bound, "{per_agg} bytes per aggregate");
            }
        }
    }
}
