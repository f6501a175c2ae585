//! The store epoch: a random id made when the data directory is created.
//!
//! Batch ids are (gateway, epoch, seq), so a wiped or replaced gateway never reuses ids the
//! central side has already seen, and the central side never mistakes new data for old. The
//! epoch belongs to the data directory, which is why it lives with the store: the daemon
//! loads it, the upstream link renews it when the central side proves this directory is an
//! older copy, and `store verify` checks it.

use std::path::{Path, PathBuf};
use thiserror::Error;

/// The epoch file's name inside the data directory.
pub const EPOCH_FILE: &str = "epoch";

/// Why the epoch could not be read or written.
#[derive(Debug, Error)]
pub enum EpochError {
    /// The file exists but does not hold an epoch.
    #[error("{0}")]
    Malformed(String),
    /// Reading, renaming or writing the file failed.
    #[error("store epoch {path}: {source}")]
    Io {
        /// The `epoch` file in the data directory, shown so the operator knows what to check.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
}

/// Parses the contents of the `epoch` file: 16 hexadecimal digits (and a newline).
pub fn parse_epoch(bytes: &[u8]) -> Result<u64, EpochError> {
    let s = std::str::from_utf8(bytes)
        .map_err(|_| EpochError::Malformed("not text".into()))?
        .trim();
    if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(EpochError::Malformed(format!(
            "expected 16 hexadecimal digits, found {} byte(s)",
            bytes.len()
        )));
    }
    u64::from_str_radix(s, 16).map_err(|e| EpochError::Malformed(e.to_string()))
}

/// Loads the epoch of `data_dir`, creating one for a new directory. A damaged epoch file is
/// moved aside (`epoch.bad-<ms>`) and a new epoch is made, with an error log: the daemon never
/// refuses to start because of it (batches not yet acknowledged are then sent again under new
/// ids, which the central side stores as new data, not as duplicates of anything).
pub fn load_or_create(data_dir: &Path) -> Result<u64, EpochError> {
    let path = data_dir.join(EPOCH_FILE);
    let err = |source| EpochError::Io {
        path: path.clone(),
        source,
    };
    match std::fs::read(&path) {
        Ok(bytes) => match parse_epoch(&bytes) {
            Ok(epoch) => return Ok(epoch),
            Err(why) => {
                let aside = data_dir.join(format!("epoch.bad-{}", crate::clock::now_ms()));
                std::fs::rename(&path, &aside).map_err(err)?;
                tracing::error!(
                    "store epoch {} is damaged ({why}); moved to {} and starting a new epoch \
                     (batches not yet acknowledged will be sent again under new ids)",
                    path.display(),
                    aside.display()
                );
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let epoch = renew(data_dir)?;
    tracing::info!("new store epoch {epoch:016x}");
    Ok(epoch)
}

/// Replaces the store epoch with a new random one, atomically (see [`load_or_create`]).
pub fn renew(data_dir: &Path) -> Result<u64, EpochError> {
    let path = data_dir.join(EPOCH_FILE);
    let epoch: u64 = rand::random();
    crate::util::write_atomic(&path, format!("{epoch:016x}\n").as_bytes())
        .map_err(|source| EpochError::Io { path, source })?;
    Ok(epoch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_directory_gets_an_epoch_that_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let e = load_or_create(dir.path()).unwrap();
        assert_eq!(load_or_create(dir.path()).unwrap(), e);
        let renewed = renew(dir.path()).unwrap();
        assert_ne!(renewed, e);
        assert_eq!(load_or_create(dir.path()).unwrap(), renewed);
    }

    #[test]
    fn a_damaged_epoch_is_moved_aside_and_replaced() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(EPOCH_FILE), b"garbage").unwrap();
        let e = load_or_create(dir.path()).unwrap();
        let text = std::fs::read_to_string(dir.path().join(EPOCH_FILE)).unwrap();
        assert_eq!(parse_epoch(text.as_bytes()).unwrap(), e);
        let aside: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|d| d.ok())
            .filter(|d| d.file_name().to_string_lossy().starts_with("epoch.bad-"))
            .collect();
        assert_eq!(aside.len(), 1);
    }

    #[test]
    fn parse_rejects_what_is_not_sixteen_hex_digits() {
        assert_eq!(parse_epoch(b"00000000000000ff\n").unwrap(), 255);
        for bad in [&b""[..], b"123", b"zzzzzzzzzzzzzzzz", b"\xff\xfe"] {
            assert!(parse_epoch(bad).is_err(), "{bad:?}");
        }
    }
}
