//! Small shared helpers.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Formats milliseconds since the epoch as RFC 3339 UTC (`2026-11-29T04:31:30.123Z`).
pub fn rfc3339_ms(ms: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| format!("{ms}ms"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_utc_with_milliseconds() {
        assert_eq!(
            super::rfc3339_ms(1_700_000_000_123),
            "2023-11-14T22:13:20.123Z"
        );
        assert_eq!(super::rfc3339_ms(0), "1970-01-01T00:00:00Z");
    }
}

/// Replaces `path` atomically with `bytes`: temp file, `fdatasync`, rename, directory `fsync`.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_parts(path, &[bytes])
}

/// [`write_atomic`] of the concatenation of `parts`, without building it in memory (a
/// checkpoint is megabytes; a copy would double its memory peak).
fn write_atomic_parts(path: &std::path::Path, parts: &[&[u8]]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    for part in parts {
        f.write_all(part)?;
    }
    f.sync_data()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Writes `body` to `path` atomically inside a small envelope (magic, version, length, CRC32):
/// temp file, `fdatasync`, rename, directory `fsync`. A reader sees the old or the new file,
/// never a mix, and can tell a damaged file from a valid one.
pub fn write_framed(
    path: &std::path::Path,
    magic: &[u8; 4],
    version: u16,
    body: &[u8],
) -> std::io::Result<()> {
    let mut header = Vec::with_capacity(18);
    header.extend_from_slice(magic);
    header.extend_from_slice(&version.to_le_bytes());
    header.extend_from_slice(&(body.len() as u64).to_le_bytes());
    header.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    write_atomic_parts(path, &[&header, body])
}

/// Checks the envelope written by [`write_framed`] and returns the body.
pub fn read_framed<'a>(bytes: &'a [u8], magic: &[u8; 4], version: u16) -> Result<&'a [u8], String> {
    if bytes.len() < 18 || &bytes[..4] != magic {
        return Err("not a file of this kind (bad magic)".into());
    }
    let v = u16::from_le_bytes([bytes[4], bytes[5]]);
    if v != version {
        return Err(format!("unknown format version {v} (expected {version})"));
    }
    let len = u64::from_le_bytes(bytes[6..14].try_into().expect("8 bytes")) as usize;
    let crc = u32::from_le_bytes(bytes[14..18].try_into().expect("4 bytes"));
    let body = bytes.get(18..18 + len).ok_or("truncated")?;
    if crc32fast::hash(body) != crc {
        return Err("checksum mismatch".into());
    }
    Ok(body)
}

#[cfg(test)]
mod framed_tests {
    use super::*;

    #[test]
    fn framed_files_round_trip_and_damage_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.bin");
        write_framed(&p, b"TEST", 3, b"hello").unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(read_framed(&bytes, b"TEST", 3).unwrap(), b"hello");
        assert!(read_framed(&bytes, b"TEST", 4).is_err());
        assert!(read_framed(&bytes, b"NOPE", 3).is_err());
        let mut bad = bytes.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(
            read_framed(&bad, b"TEST", 3).unwrap_err(),
            "checksum mismatch"
        );
        assert!(read_framed(&bytes[..bytes.len() - 1], b"TEST", 3).is_err());
    }
}
