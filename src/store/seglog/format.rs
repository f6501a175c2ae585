//! The bytes on disk: segment names, the header, frames and their checksums, and the
//! kinds of damage a stretch of a segment can show.

use std::fmt;
use std::io::{self, BufReader, Read, Seek};

/// Record sequence number: 0, 1, 2, … contiguous across segments; gaps appear only where
/// recovery quarantined damaged data.
pub type Lsn = u64;

/// Extension of segment files; files without it are ignored.
pub const SEGMENT_EXT: &str = "seg";
/// Sub-directory that receives damaged bytes found by recovery.
pub const QUARANTINE_DIR: &str = "quarantine";
/// Lock file taken exclusively by [`super::SegmentLog::open`].
pub const LOCK_FILE: &str = "LOCK";
/// Size of the segment header in bytes.
pub const HEADER_LEN: u64 = 20;
/// Bytes a record takes on disk besides its payload (len, crc, lsn).
pub const FRAME_OVERHEAD: u64 = 16;

pub(super) const MAGIC: [u8; 6] = *b"EFLOG\0";
/// The frame format (the low byte of the header's version field) of segments that hold only
/// records.
pub(super) const FORMAT_VERSION: u8 = 1;
/// The frame format of segments that may also hold padding frames ([`PAD_LSN`]): a build
/// that knows only format 1 refuses such a segment (quarantines it, loudly) instead of
/// taking its first padding frame for damage and cutting the segment there.
pub(super) const FORMAT_PADDED: u8 = 2;
/// The lsn field of a padding frame: bytes written after a group's records so that the
/// group ends on a page boundary (see [`super::LogConfig::pad_syncs`]). It is no record,
/// takes no lsn, and its payload is zeros under the usual checksum.
pub(super) const PAD_LSN: Lsn = u64::MAX;
/// The page size padding aligns to: what the kernel writes back per dirty page.
pub const PAGE: u64 = 4096;
/// The highest payload tag this build knows (the journal's compact records: 1).
pub(super) const MAX_PAYLOAD_TAG: u8 = 1;
pub(super) const WRITE_BUFFER: usize = 64 * 1024;
pub(super) const READ_BUFFER: usize = 64 * 1024;

/// What is wrong with a stretch of a segment file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Damage {
    /// The file is shorter than a segment header.
    ShortHeader { len: u64 },
    /// The file does not start with the segment magic.
    BadMagic,
    /// Written by a format version this code does not know.
    UnsupportedVersion(u16),
    /// The header checksum does not match.
    HeaderChecksum,
    /// The header's first lsn is not the one in the file name.
    HeaderLsnMismatch { name: Lsn, header: Lsn },
    /// The segment starts below the end of the previous segment.
    Overlap { first: Lsn, previous_end: Lsn },
    /// A frame runs past the end of the file (a torn write).
    TornFrame,
    /// A frame's checksum does not match (the lsn is as found, unverified).
    Checksum { lsn: Lsn },
    /// A frame carries another lsn than the position it sits at.
    LsnMismatch { expected: Lsn, found: Lsn },
    /// The bytes could not be read at all.
    ReadError(String),
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Damage::ShortHeader { len } => {
                write!(f, "file of {len} bytes is shorter than a segment header")
            }
            Damage::BadMagic => write!(f, "bad magic (not a segment header)"),
            Damage::UnsupportedVersion(v) => write!(f, "unsupported format version {v}"),
            Damage::HeaderChecksum => write!(f, "header checksum mismatch"),
            Damage::HeaderLsnMismatch { name, header } => {
                write!(
                    f,
                    "header says first lsn {header} but the file name says {name}"
                )
            }
            Damage::Overlap {
                first,
                previous_end,
            } => write!(
                f,
                "segment starts at lsn {first}, below the end {previous_end} of the previous segment"
            ),
            Damage::TornFrame => write!(f, "incomplete record (torn write)"),
            Damage::Checksum { lsn } => write!(f, "record checksum mismatch (lsn field {lsn})"),
            Damage::LsnMismatch { expected, found } => {
                write!(f, "record carries lsn {found} where lsn {expected} belongs")
            }
            Damage::ReadError(e) => write!(f, "read error: {e}"),
        }
    }
}

pub(super) fn segment_file_name(first_lsn: Lsn) -> String {
    format!("{first_lsn:020}.{SEGMENT_EXT}")
}

pub(super) fn parse_segment_name(name: &str) -> Option<Lsn> {
    let stem = name.strip_suffix(".seg")?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

/// A segment's header: `payload_tag` is the log user's name for how the segment's payloads
/// are encoded (see [`super::LogConfig::payload_tag`]), stored as the version field's high
/// byte so that a build that does not know the tag refuses the segment loudly
/// ([`Damage::UnsupportedVersion`]) instead of misreading its records.
pub(super) fn encode_header(
    first_lsn: Lsn,
    payload_tag: u8,
    padded: bool,
) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[0..6].copy_from_slice(&MAGIC);
    h[6] = if padded {
        FORMAT_PADDED
    } else {
        FORMAT_VERSION
    };
    h[7] = payload_tag;
    h[8..16].copy_from_slice(&first_lsn.to_le_bytes());
    let crc = crc32fast::hash(&h[0..16]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    h
}

/// What a valid segment header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Header {
    pub(super) first_lsn: Lsn,
    pub(super) tag: u8,
    /// Frame format [`FORMAT_PADDED`]: padding frames may follow a group of records.
    pub(super) padded: bool,
}

/// Checks a header and returns what it says.
pub(super) fn decode_header(
    h: &[u8; HEADER_LEN as usize],
    name_lsn: Lsn,
) -> Result<Header, Damage> {
    if h[0..6] != MAGIC {
        return Err(Damage::BadMagic);
    }
    let crc = u32::from_le_bytes([h[16], h[17], h[18], h[19]]);
    if crc32fast::hash(&h[0..16]) != crc {
        return Err(Damage::HeaderChecksum);
    }
    if !(h[6] == FORMAT_VERSION || h[6] == FORMAT_PADDED) || h[7] > MAX_PAYLOAD_TAG {
        return Err(Damage::UnsupportedVersion(u16::from_le_bytes([h[6], h[7]])));
    }
    let mut lsn = [0u8; 8];
    lsn.copy_from_slice(&h[8..16]);
    let header = u64::from_le_bytes(lsn);
    if header != name_lsn {
        return Err(Damage::HeaderLsnMismatch {
            name: name_lsn,
            header,
        });
    }
    Ok(Header {
        first_lsn: header,
        tag: h[7],
        padded: h[6] == FORMAT_PADDED,
    })
}

pub(super) fn frame_crc(lsn: Lsn, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&lsn.to_le_bytes());
    h.update(payload);
    h.finalize()
}

pub(super) fn read_damage(e: io::Error) -> Damage {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        Damage::TornFrame
    } else {
        Damage::ReadError(e.to_string())
    }
}

/// A good frame as [`read_frame`] found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Frame {
    /// The record at the expected lsn; the frame's bytes on disk.
    Record(u64),
    /// Padding of this many bytes (frame included): no record, no lsn.
    Pad(u64),
}

/// Reads one frame. `remaining` is the number of bytes left in the file from the current
/// position; it bounds the length field so garbage can never cause a huge allocation.
/// Returns `Ok(None)` at a clean end of file, `Ok(Some(frame))` for a good frame (a
/// record's payload in `buf` when `want_payload`, else skipped after checking only the lsn).
/// Padding is always checksummed: a stray lsn field of all ones must not hide a record.
pub(super) fn read_frame<R: Read + Seek>(
    r: &mut BufReader<R>,
    remaining: u64,
    expected: Lsn,
    buf: &mut Vec<u8>,
    want_payload: bool,
) -> Result<Option<Frame>, Damage> {
    if remaining == 0 {
        return Ok(None);
    }
    if remaining < FRAME_OVERHEAD {
        return Err(Damage::TornFrame);
    }
    let mut h = [0u8; FRAME_OVERHEAD as usize];
    r.read_exact(&mut h).map_err(read_damage)?;
    let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as u64;
    let crc = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    let mut lsn = [0u8; 8];
    lsn.copy_from_slice(&h[8..16]);
    let lsn = u64::from_le_bytes(lsn);
    if len > remaining - FRAME_OVERHEAD {
        return Err(Damage::TornFrame);
    }
    if want_payload || lsn == PAD_LSN {
        buf.clear();
        buf.resize(len as usize, 0);
        r.read_exact(buf).map_err(read_damage)?;
        if frame_crc(lsn, buf) != crc {
            return Err(Damage::Checksum { lsn });
        }
        if lsn == PAD_LSN {
            return Ok(Some(Frame::Pad(FRAME_OVERHEAD + len)));
        }
        if lsn != expected {
            return Err(Damage::LsnMismatch {
                expected,
                found: lsn,
            });
        }
    } else {
        if lsn != expected {
            return Err(Damage::LsnMismatch {
                expected,
                found: lsn,
            });
        }
        r.seek_relative(len as i64).map_err(read_damage)?;
    }
    Ok(Some(Frame::Record(FRAME_OVERHEAD + len)))
}

/// The padding frame that fills the page `file_len` is in, or `None` when `file_len` is
/// already on a page boundary or the page has less room left than a frame needs. (Filling
/// that page and the whole next one would cost a page write of nothing but padding; leaving
/// it costs the same one page write, when the next sync writes this page again, and no
/// disk space.)
pub(super) fn padding_for(file_len: u64) -> Option<Vec<u8>> {
    let room = (PAGE - file_len % PAGE) % PAGE;
    if room < FRAME_OVERHEAD {
        return None;
    }
    let zeros = (room - FRAME_OVERHEAD) as usize;
    let mut f = vec![0u8; room as usize];
    f[0..4].copy_from_slice(&(zeros as u32).to_le_bytes());
    let crc = frame_crc(PAD_LSN, &f[16..]);
    f[4..8].copy_from_slice(&crc.to_le_bytes());
    f[8..16].copy_from_slice(&PAD_LSN.to_le_bytes());
    Some(f)
}
