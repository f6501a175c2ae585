//! Configuration of local storage (`[store]`).

use crate::validate::Problems;
use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

/// `[store]`: the disk quota shared by the journal and the outbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Upper bound of journal + outbox bytes on disk.
    #[serde(default = "default_max_disk")]
    pub max_disk: ByteSize,
    /// What to do when `max_disk` is reached.
    #[serde(default)]
    pub when_full: WhenFull,
    /// Journal segment file size: trimming frees whole segments, so smaller segments
    /// give back space sooner at the cost of more files.
    #[serde(default = "default_segment_size")]
    pub segment_size: ByteSize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            max_disk: default_max_disk(),
            when_full: WhenFull::default(),
            segment_size: default_segment_size(),
        }
    }
}

/// Policy at the disk quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Drop the oldest aggregate batches (never alerts before aggregates); counted.
    #[default]
    DropOldest,
    /// Stop acknowledging the broker: backpressure onto the broker's own queue.
    Block,
}

fn default_max_disk() -> ByteSize {
    ByteSize::gib(1)
}
fn default_segment_size() -> ByteSize {
    ByteSize::mib(8)
}

impl StoreConfig {
    /// Checks `[store]` beyond what serde can.
    pub fn validate(&self, p: &mut Problems) {
        if self.max_disk.as_u64() < 1024 * 1024 {
            p.push(format!(
                "store.max_disk = \"{}\": expected at least 1MiB",
                self.max_disk
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quota_below_one_mebibyte_is_refused() {
        let mut p = Problems::new();
        StoreConfig::default().validate(&mut p);
        assert!(p.is_empty());
        let small = StoreConfig {
            max_disk: ByteSize::kib(512),
            ..StoreConfig::default()
        };
        small.validate(&mut p);
        assert_eq!(
            p.into_vec(),
            ["store.max_disk = \"512.0 KiB\": expected at least 1MiB"]
        );
    }
}
