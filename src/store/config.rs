//! Configuration of local storage (`[store]`).

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
