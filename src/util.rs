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
    use std::io::Write;

    #[test]
    fn a_streamed_framed_file_reads_back_and_replaces_the_old_one_only_when_committed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.bin");
        super::write_framed(&path, b"TEST", 3, b"old").unwrap();

        let mut w = super::FramedWriter::create(&path, b"TEST", 3).unwrap();
        let body: Vec<u8> = (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect();
        for chunk in body.chunks(777) {
            w.write_all(chunk).unwrap();
        }
        let (staged, len) = w.finish().unwrap();
        assert_eq!(len, body.len() as u64);
        // Not committed (as after a crash right here): the old file is what a reader sees.
        let old = std::fs::read(&path).unwrap();
        assert_eq!(super::read_framed(&old, b"TEST", 3).unwrap(), b"old");
        staged.commit().unwrap();
        let new = std::fs::read(&path).unwrap();
        assert_eq!(super::read_framed(&new, b"TEST", 3).unwrap(), &body[..]);
        assert!(!path.with_extension("tmp").exists());
    }

    #[test]
    fn a_staged_file_costs_its_own_bytes_plus_its_temporary_copy() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.bin");
        assert_eq!(super::staged_bytes(&p), 0);
        std::fs::write(&p, [0u8; 100]).unwrap();
        std::fs::write(p.with_extension("tmp"), [0u8; 30]).unwrap();
        assert_eq!(super::staged_bytes(&p), 130);
    }

    #[test]
    fn formats_utc_with_milliseconds() {
        assert_eq!(
            super::rfc3339_ms(1_700_000_000_123),
            "2023-11-14T22:13:20.123Z"
        );
        assert_eq!(super::rfc3339_ms(0), "1970-01-01T00:00:00Z");
    }
}

/// Bytes on disk of `path` and of the temporary file [`StagingFile`] writes beside it (absent
/// files count 0): what an atomically replaced file costs, mid-write included.
pub fn staged_bytes(path: &std::path::Path) -> u64 {
    let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    size(path) + size(&path.with_extension("tmp"))
}

/// The size of the filesystem holding `path` (`statvfs`), if it can be asked: a quota
/// larger than the disk it lives on is bounded by the disk.
pub fn filesystem_bytes(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a properly sized out-parameter.
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    (r == 0).then(|| (st.f_blocks as u64).saturating_mul(st.f_frsize as u64))
}

/// `fdatasync` of `file`, counted in `edgeferry_disk_syncs_total{kind="data"}`: every sync
/// rewrites at least the file's last, partly filled page, so syncs per second times 4 KiB is a
/// floor on what the flash is made to write.
pub fn sync_data(file: &std::fs::File) -> std::io::Result<()> {
    metrics::counter!("edgeferry_disk_syncs_total", "kind" => "data").increment(1);
    file.sync_data()
}

/// `fsync` of the directory `dir` (making created, renamed or deleted entries durable),
/// counted in `edgeferry_disk_syncs_total{kind="dir"}`.
pub fn sync_dir(dir: &std::path::Path) -> std::io::Result<()> {
    metrics::counter!("edgeferry_disk_syncs_total", "kind" => "dir").increment(1);
    std::fs::File::open(dir)?.sync_all()
}

/// Replaces `path` atomically with `bytes`: temp file, `fdatasync`, rename, directory `fsync`.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = StagingFile::create(path)?;
    f.write_all(bytes)?;
    f.commit()
}

/// A file being written next to `path` under a temporary name, to replace `path` atomically
/// with [`StagingFile::commit`].
pub struct StagingFile {
    file: std::fs::File,
    tmp: std::path::PathBuf,
    path: std::path::PathBuf,
}

impl StagingFile {
    fn create(path: &std::path::Path) -> std::io::Result<StagingFile> {
        let tmp = path.with_extension("tmp");
        Ok(StagingFile {
            file: std::fs::File::create(&tmp)?,
            tmp,
            path: path.to_path_buf(),
        })
    }

    /// `fdatasync`, rename over the target, `fsync` of the directory: afterwards a reader sees
    /// the new file, and after a crash before it the old one. Blocking (the slow part).
    pub fn commit(self) -> std::io::Result<()> {
        sync_data(&self.file)?;
        drop(self.file);
        std::fs::rename(&self.tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            sync_dir(dir)?;
        }
        Ok(())
    }
}

impl std::io::Write for StagingFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Writes a file in the envelope of [`write_framed`] while its body is being produced (e.g.
/// serialized straight into it), so a large body is never held in memory.
pub struct FramedWriter {
    out: std::io::BufWriter<StagingFile>,
    crc: crc32fast::Hasher,
    len: u64,
    magic: [u8; 4],
    version: u16,
}

impl FramedWriter {
    /// Starts `path`'s replacement: a temporary file with room for the header.
    pub fn create(path: &std::path::Path, magic: &[u8; 4], version: u16) -> std::io::Result<Self> {
        use std::io::Write;
        let mut out = std::io::BufWriter::with_capacity(64 * 1024, StagingFile::create(path)?);
        out.write_all(&[0; FRAME_HEADER])?;
        Ok(FramedWriter {
            out,
            crc: crc32fast::Hasher::new(),
            len: 0,
            magic: *magic,
            version,
        })
    }

    /// Fills in the header. The file is complete but not yet durable nor in place:
    /// [`StagingFile::commit`] does that. Returns it and the body length.
    pub fn finish(self) -> std::io::Result<(StagingFile, u64)> {
        use std::io::{Seek, Write};
        let mut staged = self.out.into_inner().map_err(|e| e.into_error())?;
        let mut header = Vec::with_capacity(FRAME_HEADER);
        header.extend_from_slice(&self.magic);
        header.extend_from_slice(&self.version.to_le_bytes());
        header.extend_from_slice(&self.len.to_le_bytes());
        header.extend_from_slice(&self.crc.finalize().to_le_bytes());
        staged.file.seek(std::io::SeekFrom::Start(0))?;
        staged.file.write_all(&header)?;
        Ok((staged, self.len))
    }
}

impl std::io::Write for FramedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.out.write(buf)?;
        self.crc.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// Length of the envelope header: magic, version, body length, CRC32.
const FRAME_HEADER: usize = 4 + 2 + 8 + 4;

/// Writes `body` to `path` atomically inside a small envelope (magic, version, length, CRC32):
/// temp file, `fdatasync`, rename, directory `fsync`. A reader sees the old or the new file,
/// never a mix, and can tell a damaged file from a valid one.
pub fn write_framed(
    path: &std::path::Path,
    magic: &[u8; 4],
    version: u16,
    body: &[u8],
) -> std::io::Result<()> {
    use std::io::Write;
    let mut w = FramedWriter::create(path, magic, version)?;
    w.write_all(body)?;
    w.finish()?.0.commit()
}

/// Why the bytes of a framed file (see [`write_framed`]) are unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The file does not start with the expected magic: another kind of file, or garbage.
    #[error("not a file of this kind (bad magic)")]
    BadMagic,
    /// Written by a version of edgeferry whose format this one does not read.
    #[error("unknown format version {found} (expected {expected})")]
    Version {
        /// The version in the file.
        found: u16,
        /// The version this build reads.
        expected: u16,
    },
    /// Shorter than its header says: cut off while being written or copied.
    #[error("truncated")]
    Truncated,
    /// The body does not match its checksum.
    #[error("checksum mismatch")]
    Checksum,
}

/// Why a framed state file (the checkpoint, the acknowledgement state) cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    /// The envelope (magic, version, length, checksum) is wrong.
    #[error("{0}")]
    Frame(#[from] FrameError),
    /// The envelope is intact but its body does not decode as this version's contents.
    #[error("undecodable contents: {0}")]
    Body(#[from] postcard::Error),
    /// The envelope is intact but its compressed body does not inflate.
    #[error("compressed contents do not inflate: {0}")]
    Inflate(String),
}

/// Serializes `value` with postcard, compressed with DEFLATE (fast level), into `out`. For
/// state files that are written often and compress well: a checkpoint's series names, tags
/// and aggregates compress about five-fold (issue 11), and bytes written are what wears a
/// gateway's flash card out. The body's checksum (in `out`'s envelope) covers the compressed
/// bytes, so damage is found before anything is inflated.
pub fn to_deflated<T: serde::Serialize + ?Sized>(
    value: &T,
    out: &mut FramedWriter,
) -> std::io::Result<()> {
    use std::io::Write;
    let encoder = flate2::write::DeflateEncoder::new(out, flate2::Compression::fast());
    // postcard writes field by field (often a byte or two): the compressor gets them in runs.
    let mut buffered = std::io::BufWriter::with_capacity(32 * 1024, encoder);
    postcard::to_io(value, &mut buffered).map_err(std::io::Error::other)?;
    buffered.flush()?;
    let encoder = buffered.into_inner().map_err(|e| e.into_error())?;
    encoder.finish()?;
    Ok(())
}

/// Most bytes a compressed body may inflate to: far above any state edgeferry writes (the
/// window state of 10,000 series is ~16 MB), so only a crafted file reaches it, and then it
/// is refused instead of exhausting memory.
pub const MAX_INFLATED: u64 = 1 << 30;

/// Checks the envelope of a body written by [`to_deflated`], inflates it and decodes it.
pub fn decode_framed_deflated<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    magic: &[u8; 4],
    version: u16,
) -> Result<T, StateFileError> {
    use std::io::Read;
    let body = read_framed(bytes, magic, version)?;
    let mut inflated = Vec::new();
    flate2::read::DeflateDecoder::new(body)
        .take(MAX_INFLATED + 1)
        .read_to_end(&mut inflated)
        .map_err(|e| StateFileError::Inflate(e.to_string()))?;
    if inflated.len() as u64 > MAX_INFLATED {
        return Err(StateFileError::Inflate(format!(
            "inflates to more than {MAX_INFLATED} bytes"
        )));
    }
    Ok(postcard::from_bytes(&inflated)?)
}

/// Checks the envelope written by [`write_framed`] and decodes its postcard body.
pub fn decode_framed<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    magic: &[u8; 4],
    version: u16,
) -> Result<T, StateFileError> {
    Ok(postcard::from_bytes(read_framed(bytes, magic, version)?)?)
}

/// Checks the envelope written by [`write_framed`] and returns the body.
pub fn read_framed<'a>(
    bytes: &'a [u8],
    magic: &[u8; 4],
    version: u16,
) -> Result<&'a [u8], FrameError> {
    if bytes.len() < FRAME_HEADER || &bytes[..4] != magic {
        return Err(FrameError::BadMagic);
    }
    let v = u16::from_le_bytes([bytes[4], bytes[5]]);
    if v != version {
        return Err(FrameError::Version {
            found: v,
            expected: version,
        });
    }
    let len = u64::from_le_bytes(bytes[6..14].try_into().expect("8 bytes"));
    let crc = u32::from_le_bytes(bytes[14..18].try_into().expect("4 bytes"));
    // A damaged length can be anything up to 2^64 - 1: no arithmetic on it may overflow.
    let end = usize::try_from(len)
        .ok()
        .and_then(|len| FRAME_HEADER.checked_add(len))
        .ok_or(FrameError::Truncated)?;
    let body = bytes.get(FRAME_HEADER..end).ok_or(FrameError::Truncated)?;
    if crc32fast::hash(body) != crc {
        return Err(FrameError::Checksum);
    }
    Ok(body)
}

#[cfg(test)]
mod framed_tests {
    use super::*;

    #[test]
    fn a_length_near_two_to_the_64_is_truncation_not_an_overflow() {
        // Found by fuzz/fuzz_targets/checkpoint.rs: a checkpoint header whose length field
        // is 0xffff_ffff_ffff_fff6 made `FRAME_HEADER + len` overflow.
        let bytes = [
            0x45, 0x46, 0x43, 0x4b, 0x04, 0x00, 0xf6, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x4a,
        ];
        assert_eq!(read_framed(&bytes, b"EFCK", 4), Err(FrameError::Truncated));
    }

    #[test]
    fn framed_files_round_trip_and_damage_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.bin");
        write_framed(&p, b"TEST", 3, b"hello").unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(read_framed(&bytes, b"TEST", 3).unwrap(), b"hello");
        assert_eq!(
            read_framed(&bytes, b"TEST", 4),
            Err(FrameError::Version {
                found: 3,
                expected: 4
            })
        );
        assert_eq!(read_framed(&bytes, b"NOPE", 3), Err(FrameError::BadMagic));
        let mut bad = bytes.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(read_framed(&bad, b"TEST", 3), Err(FrameError::Checksum));
        assert_eq!(
            read_framed(&bytes[..bytes.len() - 1], b"TEST", 3),
            Err(FrameError::Truncated)
        );
        assert_eq!(
            read_framed(&bad, b"TEST", 3).unwrap_err().to_string(),
            "checksum mismatch"
        );
    }
}
