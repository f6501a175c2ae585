//! The self-contained message of the MQTT upstream (docs/PROTOCOL.md §10): `Hello`, `Dict`
//! and `Batch` envelopes back to back in one MQTT payload. Over MQTT there is no connection
//! state between a gateway and whoever consumes its batches (a broker sits in between and
//! may hand consecutive messages to different consumers), so every message carries the
//! gateway's id and epoch and the dictionary of the series its batch uses.
//!
//! The gateway's MQTT link writes it with [`encode_message`]; `edgeferry collect --mqtt`
//! reads it with [`decode_message`].

use super::{DictDecoder, DictEncoder, Frame, HEADER_LEN, Hello, ProtocolError, decode, encode};
use crate::model::batch::{OutboxBatch, OutboxItem};

/// Encodes one batch as a self-contained MQTT payload (Hello + Dict + Batch envelopes).
pub fn encode_message(hello: &Hello, seq: u64, batch: &OutboxBatch) -> Vec<u8> {
    let mut dict = DictEncoder::new();
    let (d, b) = dict.encode_batch(seq, batch);
    let mut out = encode(&Frame::Hello(hello.clone()));
    if let Some(d) = d {
        out.extend(encode(&d));
    }
    out.extend(encode(&b));
    out
}

/// One decoded MQTT upstream message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Who sent it: gateway id, store epoch, software.
    pub hello: Hello,
    /// The batch's sequence number within the epoch: with the gateway id and epoch, the
    /// batch id consumers deduplicate by.
    pub seq: u64,
    /// The aggregates and alerts, series resolved through the message's own dictionary.
    pub items: Vec<OutboxItem>,
}

/// Why a payload is not an upstream message.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    /// An envelope is damaged, too large or of a version not spoken here.
    #[error("envelope {index}: {source}")]
    Envelope {
        /// 0-based position of the envelope in the payload.
        index: usize,
        /// What is wrong with it.
        source: ProtocolError,
    },
    /// The payload ends inside an envelope.
    #[error("envelope {index} declares {declared} bytes but only {left} are left")]
    Truncated {
        /// 0-based position of the envelope in the payload.
        index: usize,
        /// Header plus body length the envelope declares, bytes.
        declared: u64,
        /// Bytes left in the payload.
        left: usize,
    },
    /// The envelopes are not Hello, (Dict,) Batch.
    #[error("{0}")]
    Shape(String),
    /// The gateway id in the Hello is not a valid one.
    #[error("gateway id {0:?} is not 1..=128 bytes of [A-Za-z0-9._-] not starting with '.'")]
    GatewayId(String),
    /// The batch does not decode against the message's dictionary.
    #[error("batch: {0}")]
    Batch(ProtocolError),
}

impl MessageError {
    /// A short, fixed name for metrics labels.
    pub fn reason(&self) -> &'static str {
        match self {
            MessageError::Envelope { source, .. } => match source {
                ProtocolError::TooLarge { .. } => "too_large",
                ProtocolError::UnsupportedVersion(_) => "version",
                ProtocolError::BadCrc { .. } => "crc",
                _ => "malformed",
            },
            MessageError::Truncated { .. } => "malformed",
            MessageError::Shape(_) => "shape",
            MessageError::GatewayId(_) => "gateway_id",
            MessageError::Batch(_) => "batch",
        }
    }
}

/// Decodes one MQTT upstream payload; `max_frame` bounds each envelope's body.
pub fn decode_message(payload: &[u8], max_frame: u32) -> Result<Message, MessageError> {
    let mut frames = Vec::with_capacity(3);
    let mut at = 0usize;
    while at < payload.len() {
        let index = frames.len();
        if index == 3 {
            return Err(MessageError::Shape(format!(
                "{} bytes after the Batch envelope",
                payload.len() - at
            )));
        }
        let rest = &payload[at..];
        if rest.len() < HEADER_LEN {
            return Err(MessageError::Truncated {
                index,
                declared: HEADER_LEN as u64,
                left: rest.len(),
            });
        }
        // Not an envelope at all (JSON, text): say so, rather than read a length from it.
        if rest[..2] != super::MAGIC {
            return Err(MessageError::Envelope {
                index,
                source: ProtocolError::BadMagic([rest[0], rest[1]]),
            });
        }
        let len = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
        if len > max_frame {
            return Err(MessageError::Envelope {
                index,
                source: ProtocolError::TooLarge {
                    len: u64::from(len),
                    max: max_frame,
                },
            });
        }
        let end = HEADER_LEN + len as usize;
        if rest.len() < end {
            return Err(MessageError::Truncated {
                index,
                declared: end as u64,
                left: rest.len(),
            });
        }
        let frame = decode(&rest[..end], max_frame)
            .map_err(|source| MessageError::Envelope { index, source })?;
        frames.push(frame);
        at += end;
    }
    let mut frames = frames.into_iter();
    let hello = match frames.next() {
        Some(Frame::Hello(h)) => h,
        Some(other) => {
            return Err(MessageError::Shape(format!(
                "starts with {:?}, not Hello",
                other.kind()
            )));
        }
        None => return Err(MessageError::Shape("empty payload".into())),
    };
    if !super::valid_gateway_id(&hello.gateway) {
        return Err(MessageError::GatewayId(hello.gateway));
    }
    // A fresh dictionary: every message is self-contained.
    let mut dict = DictDecoder::new();
    let batch = match (frames.next(), frames.next()) {
        (Some(Frame::Batch(b)), None) => b,
        (Some(Frame::Dict(d)), Some(Frame::Batch(b))) => {
            dict.apply(&d).map_err(MessageError::Batch)?;
            b
        }
        (a, b) => {
            let kinds: Vec<_> = [a, b].iter().flatten().map(Frame::kind).collect();
            return Err(MessageError::Shape(format!(
                "after Hello expected (Dict,) Batch, got {kinds:?}"
            )));
        }
    };
    let items = dict.decode_batch(&batch).map_err(MessageError::Batch)?;
    Ok(Message {
        hello,
        seq: batch.seq,
        items,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SeriesInfo;
    use crate::model::aggregate::Aggregate;
    use crate::model::batch::BatchKind;
    use std::collections::BTreeMap;
    use std::sync::Arc;

    fn hello() -> Hello {
        Hello {
            gateway: "gw-1".into(),
            epoch: 7,
            versions: vec![2],
            first_seq: 4,
            software: "edgeferry test".into(),
        }
    }

    fn batch(series: &[&str]) -> OutboxBatch {
        let items = series
            .iter()
            .map(|s| {
                let mut agg = Aggregate::new();
                agg.add(21.5, 1_700_000_001_000);
                let tags = BTreeMap::from([("dev".to_string(), s.to_string())]);
                OutboxItem::Aggregate {
                    series: Arc::new(SeriesInfo {
                        key: crate::model::series_key("temp", &tags),
                        metric: "temp".into(),
                        tags: tags.into(),
                    }),
                    window_start_ms: 1_700_000_000_000,
                    window_secs: 10,
                    version: 0,
                    agg,
                }
            })
            .collect();
        OutboxBatch {
            kind: BatchKind::Aggregates,
            created_ms: 1_700_000_010_000,
            items,
        }
    }

    #[test]
    fn a_message_decodes_to_the_batch_it_was_made_of() {
        let b = batch(&["a", "b"]);
        let m = decode_message(&encode_message(&hello(), 42, &b), 1 << 20).unwrap();
        assert_eq!(m.hello, hello());
        assert_eq!(m.seq, 42);
        assert_eq!(m.items, b.items);
    }

    #[test]
    fn a_batch_without_items_has_no_dict_and_still_decodes() {
        let m = decode_message(&encode_message(&hello(), 3, &batch(&[])), 1 << 20).unwrap();
        assert_eq!((m.seq, m.items.len()), (3, 0));
    }

    #[test]
    fn damaged_or_misshapen_payloads_are_refused_with_a_reason() {
        let good = encode_message(&hello(), 1, &batch(&["t"]));
        let reason = |p: &[u8]| decode_message(p, 1 << 20).unwrap_err().reason();
        assert_eq!(reason(b""), "shape");
        assert_eq!(reason(b"{\"json\": true}"), "malformed");
        assert_eq!(reason(&good[..good.len() - 1]), "malformed");
        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 0xff;
        assert_eq!(reason(&flipped), "crc");
        let mut twice = good.clone();
        twice.extend_from_slice(&good);
        assert_eq!(reason(&twice), "shape");
        // The Batch alone, without its Hello.
        let hello_len = encode(&Frame::Hello(hello())).len();
        assert_eq!(reason(&good[hello_len..]), "shape");
        assert_eq!(
            decode_message(&good, 8).unwrap_err().reason(),
            "too_large",
            "an envelope above max_frame is refused before it is read"
        );
        let mut h = hello();
        h.gateway = "../etc".into();
        assert_eq!(reason(&encode_message(&h, 1, &batch(&["t"]))), "gateway_id");
    }
}
